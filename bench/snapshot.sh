#!/usr/bin/env bash
# Benchmark (docs/architecture.md §11, "full sync"): slotstream's full sync (`run --once` of a new pipeline:
# slot with an exported snapshot, COPY, events into the file sink, checkpoint) vs
# `psql -c "\copy (select <same columns> from users) to '/dev/null'"` on the same table, as the
# same role over the same TCP connection settings. The goal is slotstream/psql >= 0.8. Also
# prints slotstream's peak RSS per table size: it must stay flat as the table grows.
#
#   bench/snapshot.sh                               # 1M rows
#   ROWS_LIST="1000000 5000000" bench/snapshot.sh   # memory stays flat: compare the RSS lines
#
# Environment:
#   ROWS=1000000         rows of the table (when ROWS_LIST is not set)
#   ROWS_LIST="…"        several table sizes, one after the other in the same cluster
#   BATCH_EVENTS=10000   schedule.max_batch_events of the bench config (the default is 500:
#                        one fsync per 500 events; a bulk deployment sets it higher)
#   FSYNC=true           destination.fsync of the file sink
#   LEDGER=true          sync.ledger of the pipeline (the default; false: no ledger writes)
#   WORKERS=…            sync.snapshot_workers (parallel snapshot readers, 1–16); unset: the
#                        automatic choice (1 under 64 MiB or 100k rows, else min(cores, 4))
#   ROUNDS=3             full syncs per size, each by a pipeline of its own, alternating with
#                        psql; the best round of each is compared, all rounds are printed (the
#                        machine may be shared: the spread shows the noise)
#   KEEP=1               keep the work directory (events files, logs) and print its path
#   SLOTSTREAM_BIN=…     a prebuilt binary instead of `cargo build --release`
#   WRAP="valgrind --tool=callgrind --callgrind-out-file=/tmp/snapshot.callgrind"
#                        a profiler to run the timed `slotstream run --once` under (the figures
#                        then include its overhead; use a small ROWS)
#
# Nothing is asserted (a benchmark is not a timed test): the figures are for a human to read.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/pg-throwaway.sh

ROWS_LIST="${ROWS_LIST:-${ROWS:-1000000}}"
BATCH_EVENTS="${BATCH_EVENTS:-10000}"
FSYNC="${FSYNC:-true}"
LEDGER="${LEDGER:-true}"
WORKERS="${WORKERS:-}"
workers_line=""
[[ -n "$WORKERS" ]] && workers_line="snapshot_workers = $WORKERS"
ROUNDS="${ROUNDS:-3}"

say() { printf '== %s\n' "$*" >&2; }
now() { date +%s.%N; }
min() { printf '%s\n' "$@" | sort -g | head -n 1; }

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
    bin="${CARGO_TARGET_DIR:-$root/target}/release/slotstream"
fi

work="$(mktemp -d /tmp/slotstream-bench-snapshot.XXXXXX)"
chmod 755 "$work"
cleanup() {
    pgt_stop
    if [[ -n "${KEEP:-}" ]]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

say "throwaway PostgreSQL (wal_level=logical)"
pg_throwaway_start "$work/pg"
export SLOTSTREAM_PG_PASSWORD="bench-$RANDOM-$RANDOM"
report="$work/report"
: > "$report"

for rows in $ROWS_LIST; do
    db="app_$rows"
    pub="slotstream_bench_$rows"
    say "$rows rows: loading the users table of database $db"
    pgt_psql -d postgres -c "CREATE DATABASE $db"
    load_started=$(now)
    pgt_psql -d "$db" -v rows="$rows" <<'SQL'
CREATE TABLE public.users (
    id         bigserial PRIMARY KEY,
    user_id    text,
    email      text,
    name       text,
    plan       text,
    age        integer,
    balance    numeric(12,2),
    verified   boolean,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz
);
INSERT INTO public.users (user_id, email, name, plan, age, balance, verified, updated_at)
SELECT 'u_' || i, 'user' || i || '@example.com', 'User ' || i,
       (ARRAY['free', 'pro', 'team', 'enterprise'])[1 + i % 4], 18 + i % 60,
       (i % 100000) / 100.0, i % 3 = 0, now()
  FROM generate_series(1, :rows) AS i;
-- Hint bits set and statistics known: every reader then scans the same settled table.
VACUUM (FREEZE, ANALYZE) public.users;
SQL
    # The role exists once per cluster; setup.sql creates it, so later databases get the grants
    # by hand (the same ones setup.sql gives).
    if [[ "$rows" == "${ROWS_LIST%% *}" ]]; then
        pgt_psql -d "$db" -v schema=public -v table=users -v user=rudder \
            -v password="$SLOTSTREAM_PG_PASSWORD" -v publication="$pub" -f sql/setup.sql >/dev/null
    else
        pgt_psql -d "$db" >/dev/null <<SQL
GRANT USAGE ON SCHEMA public TO rudder;
GRANT SELECT ON TABLE public.users TO rudder;
CREATE SCHEMA IF NOT EXISTS "_rudderstack";
GRANT ALL ON SCHEMA "_rudderstack" TO rudder;
CREATE PUBLICATION $pub FOR TABLE public.users;
SQL
    fi
    table_size="$(pgt_psql -d "$db" -At -c "SELECT pg_size_pretty(pg_table_size('public.users'))")"
    say "loaded in $(echo "$(now) - $load_started" | bc) s ($table_size)"

    # slotstream's COPY reads the selected columns (all, by default), then the primary key for
    # the messageIds: psql reads exactly that.
    columns="$(pgt_psql -d "$db" -At -c "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum)
        FROM pg_attribute WHERE attrelid = 'public.users'::regclass AND attnum > 0 AND NOT attisdropped")"
    select="SELECT $columns, id FROM public.users"

    copy_times=()
    slot_times=()
    cpu_times=()
    cpu_sums=()
    loads=()
    readers=""
    rss_max=0
    for round in $(seq 1 "$ROUNDS"); do
        config="$work/slotstream-$rows-$round.toml"
        events="$work/events-$rows-$round.jsonl"
        cat > "$config" <<TOML
name = "bench-$rows-$round"

[source]
host = "127.0.0.1"
port = $PGT_PORT
database = "$db"
user = "rudder"
password_env = "SLOTSTREAM_PG_PASSWORD"
sslmode = "disable"
table = "users"
publication = "$pub"

[sync]
ledger = $LEDGER
$workers_line

[schedule]
frequency = "realtime"
max_batch_events = $BATCH_EVENTS

[destination]
type = "file"
path = "$events"
fsync = $FSYNC
TOML
        say "$rows rows, round $round: psql \\copy"
        t0=$(now)
        PGPASSWORD="$SLOTSTREAM_PG_PASSWORD" PGSSLMODE=disable "$PGT_BIN/psql" -X -q \
            -h 127.0.0.1 -p "$PGT_PORT" -U rudder -d "$db" -c "\\copy ($select) to '/dev/null'"
        t1=$(now)
        copy_times+=("$(echo "$t1 - $t0" | bc -l)")

        say "$rows rows, round $round: slotstream run --once (full sync)"
        t0=$(now)
        /usr/bin/time -f '%M %U %S' -o "$work/rss-$rows-$round" ${WRAP:-} "$bin" run --once \
            --config "$config" 2> "$work/run-$rows-$round.log" \
            || { cat "$work/run-$rows-$round.log" >&2; exit 1; }
        t1=$(now)
        slot_times+=("$(echo "$t1 - $t0" | bc -l)")
        read -r rss_kib user_secs sys_secs < <(tail -n 1 "$work/rss-$rows-$round")
        ((rss_kib > rss_max)) && rss_max=$rss_kib
        cpu_times+=("$user_secs+$sys_secs")
        cpu_sums+=("$(echo "$user_secs + $sys_secs" | bc -l)")
        loads+=("$(cut -d' ' -f1 /proc/loadavg)")
        readers="$(grep -o 'readers=[0-9]*' "$work/run-$rows-$round.log" | head -n 1 || true)"
        sent="$(wc -l < "$events")"
        if [[ "$sent" -ne "$rows" ]]; then
            echo "warning: $rows rows, round $round: the file sink holds $sent events" >&2
        fi
        [[ -n "${KEEP:-}" ]] || rm -f "$events"
        # Each round's pipeline goes away: its slot would hold WAL for nothing.
        "$bin" teardown --yes --config "$config" >/dev/null 2>&1
    done
    copy_secs=$(min "${copy_times[@]}")
    slot_secs=$(min "${slot_times[@]}")
    copy_rate=$(echo "$rows / $copy_secs" | bc -l)
    slot_rate=$(echo "$rows / $slot_secs" | bc -l)
    {
        printf '\n%d rows (table %s)\n' "$rows" "$table_size"
        printf '  rounds (s): psql %s | slotstream %s | slotstream CPU user+sys %s\n' \
            "${copy_times[*]}" "${slot_times[*]}" "${cpu_times[*]}"
        printf '  %-12s %8.2f s  %10.0f rows/s  (best of %d)\n' "psql \\copy" "$copy_secs" "$copy_rate" "$ROUNDS"
        printf '  %-12s %8.2f s  %10.0f rows/s  (best of %d)\n' "slotstream" "$slot_secs" "$slot_rate" "$ROUNDS"
        printf '  ratio slotstream/psql: %.3f  (goal >= 0.8)\n' "$(echo "$slot_rate / $copy_rate" | bc -l)"
        printf '  slotstream peak RSS: %.1f MiB\n' "$(echo "$rss_max / 1024" | bc -l)"
        printf '  slotstream CPU per million rows (least of the rounds): %.2f s\n' \
            "$(echo "$(min "${cpu_sums[@]}") * 1000000 / $rows" | bc -l)"
        printf '  snapshot readers: %s (WORKERS=%s)\n' "${readers:-readers=1}" "${WORKERS:-auto}"
        printf '  1-minute load average after each round: %s\n' "${loads[*]}"
    } >> "$report"
    pgt_psql -d postgres -c "DROP DATABASE $db" >/dev/null
done

printf '\nfull sync benchmark\n'
printf 'machine: %s, %s CPUs, %s\n' "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" \
    "$(nproc)" "$("$PGT_BIN/postgres" --version)"
printf 'load average: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
printf 'slotstream config: max_batch_events=%s fsync=%s (file sink) ledger=%s snapshot_workers=%s, all columns selected\n' \
    "$BATCH_EVENTS" "$FSYNC" "$LEDGER" "${WORKERS:-auto}"
cat "$report"
