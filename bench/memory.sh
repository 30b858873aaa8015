#!/usr/bin/env bash
# Benchmark (DESIGN.md §10, "memory"): slotstream's peak RSS while `run --once` streams ONE
# transaction of wide rows (a jsonb document of ~256 KiB each) into the file sink, at a small
# `[schedule] memory_limit`, printed next to the volume of data that went through. The goal:
# peak RSS ≤ 64 MiB + memory_limit, whatever the transaction's size.
#
#   bench/memory.sh                                  # 3,000 rows × 256 KiB at 16MiB
#   MEMORY_LIMITS="16MiB 64MiB 256MiB" bench/memory.sh
#
# Environment:
#   ROWS=3000              rows inserted, all in one transaction
#   ROW_KIB=256            size of each row's jsonb document as text, in KiB
#   SHAPE=doc              doc: an array of small objects (many small JSON values, the costly
#                          case in memory); blob: one long string
#   MEMORY_LIMITS=16MiB    schedule.memory_limit of each measured run (a pipeline of its own,
#                          all reading the same transaction)
#   BATCH_EVENTS=500       schedule.max_batch_events
#   FSYNC=true             destination.fsync of the file sink
#   KEEP=1                 keep the work directory (events files, logs) and print its path
#   SLOTSTREAM_BIN=…       a prebuilt binary instead of `cargo build --release`
#
# Prints, per memory_limit: peak RSS (GNU time's maximum resident set size), wall time, the
# events written, and the data volume (the documents as text, and the events file). Nothing is
# asserted (a benchmark is not a timed test): the figures are for a human to read.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/pg-throwaway.sh

ROWS="${ROWS:-3000}"
ROW_KIB="${ROW_KIB:-256}"
SHAPE="${SHAPE:-doc}"
MEMORY_LIMITS="${MEMORY_LIMITS:-16MiB}"
BATCH_EVENTS="${BATCH_EVENTS:-500}"
FSYNC="${FSYNC:-true}"

say() { printf '== %s\n' "$*" >&2; }
now() { date +%s.%N; }

apt_install() {
    apt-get install -y -qq "$@" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq "$@" >/dev/null; }
}
# GNU time for the peak RSS; bc for the arithmetic.
[[ -x /usr/bin/time ]] || { say "installing GNU time"; apt_install time; }
command -v bc >/dev/null || { say "installing bc"; apt_install bc; }

if [[ -n "${SLOTSTREAM_BIN:-}" ]]; then
    bin="$SLOTSTREAM_BIN"
else
    say "cargo build --release"
    cargo build --release --quiet
    bin="$root/target/release/slotstream"
fi

work="$(mktemp -d /tmp/slotstream-bench-memory.XXXXXX)"
chmod 755 "$work"
cleanup() {
    pgt_stop
    if [[ -n "${KEEP:-}" ]]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

say "throwaway PostgreSQL (wal_level=logical)"
pg_throwaway_start "$work/pg"
pgt_psql -d postgres -c "CREATE DATABASE app"
pgt_psql -d app <<'SQL'
CREATE TABLE public.users (
    id      bigserial PRIMARY KEY,
    user_id text NOT NULL,
    email   text,
    doc     jsonb
);
SQL
export SLOTSTREAM_PG_PASSWORD="bench-$RANDOM-$RANDOM"
pub=slotstream_bench
pgt_psql -d app -v schema=public -v table=users -v user=rudder \
    -v password="$SLOTSTREAM_PG_PASSWORD" -v publication="$pub" -f sql/setup.sql >/dev/null

# One pipeline (own name, slot, checkpoint and events file) per memory limit.
write_config() {
    local i=$1 limit=$2
    cat > "$work/slotstream-$i.toml" <<TOML
name = "bench-memory-$i"

[source]
host = "127.0.0.1"
port = $PGT_PORT
database = "app"
user = "rudder"
password_env = "SLOTSTREAM_PG_PASSWORD"
sslmode = "disable"
table = "users"
publication = "$pub"

[schedule]
frequency = "realtime"
max_batch_events = $BATCH_EVENTS
memory_limit = "$limit"

[destination]
type = "file"
path = "$work/events-$i.jsonl"
fsync = $FSYNC
TOML
}

limits=($MEMORY_LIMITS)
say "${#limits[@]} pipelines: first run --once each (full sync of the empty table, slot created)"
for i in "${!limits[@]}"; do
    write_config "$i" "${limits[$i]}"
    "$bin" run --once --config "$work/slotstream-$i.toml" 2> "$work/first-run-$i.log" \
        || { cat "$work/first-run-$i.log" >&2; exit 1; }
done

say "inserting $ROWS rows of ~$ROW_KIB KiB ($SHAPE) in one transaction"
load_started=$(now)
# The document is built once and varied per row by one key, so loading is quick; every row
# still travels whole (pgoutput sends the detoasted value).
pgt_psql -d app -v rows="$ROWS" -v kib="$ROW_KIB" -v shape="$SHAPE" <<'SQL'
CREATE TEMP TABLE template AS
SELECT CASE :'shape'
         WHEN 'blob' THEN jsonb_build_object('blob', repeat('x', :kib * 1024 - 12))
         ELSE jsonb_build_object('items', (
             SELECT jsonb_agg(jsonb_build_object('i', j, 'name', 'item ' || j,
                                                 'text', md5(j::text) || md5((j + 1)::text)))
               FROM generate_series(1, (:kib * 1024) / 100) j))
       END AS doc;
BEGIN;
INSERT INTO public.users (user_id, email, doc)
SELECT 'u_' || g, 'user' || g || '@example.com', t.doc || jsonb_build_object('row', g)
  FROM generate_series(1, :rows) g, template t;
COMMIT;
SQL
end_lsn="$(pgt_psql -d app -At -c 'SELECT pg_current_wal_insert_lsn()')"
until [[ "$(pgt_psql -d app -At -c "SELECT pg_current_wal_flush_lsn() >= '$end_lsn'")" == t ]]; do
    sleep 0.1
done
doc_bytes="$(pgt_psql -d app -At -c 'SELECT sum(octet_length(doc::text)) FROM public.users')"
say "loaded in $(echo "$(now) - $load_started" | bc) s; $(echo "$doc_bytes / 1048576" | bc) MiB of documents"

mib() { printf '%.1f' "$(echo "$1 / 1048576" | bc -l)"; }
printf '\nmemory benchmark: %d rows × ~%d KiB jsonb (%s) in one transaction, file sink, fsync=%s\n' \
    "$ROWS" "$ROW_KIB" "$SHAPE" "$FSYNC"
printf 'machine: %s CPUs, %s\n' "$(nproc)" "$("$PGT_BIN/postgres" --version)"
printf 'data volume: %s MiB of jsonb documents as text\n' "$(mib "$doc_bytes")"
printf '%-14s %14s %10s %10s %16s\n' "memory_limit" "peak RSS" "wall" "events" "events file"
for i in "${!limits[@]}"; do
    say "memory_limit = ${limits[$i]}: slotstream run --once"
    t0=$(now)
    /usr/bin/time -f '%M' -o "$work/rss-$i" "$bin" run --once \
        --config "$work/slotstream-$i.toml" 2> "$work/run-$i.log" \
        || { cat "$work/run-$i.log" >&2; exit 1; }
    t1=$(now)
    rss_kib="$(tail -n 1 "$work/rss-$i")"
    events="$(wc -l < "$work/events-$i.jsonl")"
    file_bytes="$(stat -c %s "$work/events-$i.jsonl")"
    if [[ "$events" -ne "$ROWS" ]]; then
        echo "warning: the file sink holds $events events, expected $ROWS" >&2
    fi
    printf '%-14s %10s MiB %8.1f s %10d %12s MiB\n' "${limits[$i]}" \
        "$(printf '%.1f' "$(echo "$rss_kib / 1024" | bc -l)")" "$(echo "$t1 - $t0" | bc -l)" \
        "$events" "$(mib "$file_bytes")"
    [[ -n "${KEEP:-}" ]] || rm -f "$work/events-$i.jsonl"
done
