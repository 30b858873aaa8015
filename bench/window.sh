#!/usr/bin/env bash
# Benchmark (docs/architecture.md §11, "load"): what slotstream reads and sends for a window of
# changes, next to what a periodic full scan of the same table reads and sends (RudderStack's
# Warehouse Actions model: every run reads the whole table and sends every row again), and
# what the sent-state ledger and the window stage cost the source database.
#
#   bench/window.sh                  # 1M rows; 1% of them updated 5 times in the window
#   ROWS=200000 bench/window.sh
#
# Environment:
#   ROWS=1000000        rows in the table
#   CHANGED_PCT=1       percent of the rows changed in the window
#   TIMES=5             times each changed row is updated (each in its own transaction batch)
#   KEEP=1              keep the work directory and print its path
#   SLOTSTREAM_BIN=…    a prebuilt binary instead of `cargo build --release`
#
# Three pipelines read the same changes from slots of their own:
#   window    frequency = "manual", ledger on: `run --once` catches up, stages, and delivers
#             the window (coalesced per row) when caught up;
#   realtime  frequency = "realtime", ledger on: every change is an event;
#   no-ledger frequency = "realtime", ledger off: the checkpoint's own writes only.
# For each: rows read (changes decoded), events sent, wall time, rows written to _rudderstack
# (pg_stat_user_tables) and WAL bytes generated while it ran, per delivered change. The full
# scan's figures are the table's size (rows read and sent per run) and the time of
# `\copy (SELECT …) TO /dev/null` (the read alone, before any delivery). Nothing is asserted:
# the figures are for a human to read.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROWS="${ROWS:-1000000}"
CHANGED_PCT="${CHANGED_PCT:-1}"
TIMES="${TIMES:-5}"

bench_start window
pgt_psql -d postgres -c "CREATE DATABASE app"
pgt_psql -d app <<'SQL'
CREATE TABLE public.users (
    id         bigserial PRIMARY KEY,
    user_id    text,
    email      text,
    name       text,
    plan       text,
    age        integer,
    balance    numeric(12,2),
    updated_at timestamptz
);
SQL
bench_publish

say "loading $ROWS rows"
pgt_psql -d app -v rows="$ROWS" <<'SQL'
INSERT INTO public.users (user_id, email, name, plan, age, balance, updated_at)
SELECT 'u_' || i, 'user' || i || '@example.com', 'User ' || i,
       (ARRAY['free', 'pro', 'team', 'enterprise'])[1 + i % 4], 18 + i % 60,
       (i % 100000) / 100.0, now()
  FROM generate_series(1, :rows) AS i;
VACUUM ANALYZE public.users;
SQL

pipelines=(window realtime no-ledger)  # printed in this order
write_config() {
    local name=$1 frequency=$2 ledger=$3
    cat > "$work/$name.toml" <<TOML
name = "bench-$name"

$(bench_source_toml)

[schedule]
frequency = "$frequency"
max_batch_events = 10000

[sync]
ledger = $ledger

[destination]
type = "file"
path = "$work/events-$name.jsonl"
fsync = false
TOML
}
write_config window manual true
write_config realtime realtime true
write_config no-ledger realtime false

for p in "${pipelines[@]}"; do
    say "$p: first run (full sync of $ROWS rows)"
    t0=$(now)
    "$bin" run --once --config "$work/$p.toml" 2> "$work/first-$p.log" \
        || { cat "$work/first-$p.log" >&2; exit 1; }
    say "$p: full sync in $(printf '%.1f' "$(echo "$(now) - $t0" | bc -l)") s"
done

# Every slot moves past the full syncs' WAL (the ledger's own writes among it) before the
# changes, so each measured run decodes the same WAL.
for p in "${pipelines[@]}"; do
    "$bin" run --once --config "$work/$p.toml" 2> "$work/settle-$p.log" \
        || { cat "$work/settle-$p.log" >&2; exit 1; }
done

changed=$((ROWS * CHANGED_PCT / 100))
say "window of changes: $changed rows updated $TIMES times each ($((changed * TIMES)) changes)"
for t in $(seq 1 "$TIMES"); do
    pgt_psql -d app -q -c "UPDATE public.users SET plan = 'plan $t', updated_at = now()
                           WHERE id % (100 / $CHANGED_PCT) = 0"
done
pgt_psql -d app -q -c "CHECKPOINT"

lsn() { pgt_psql -d app -At -c "SELECT pg_current_wal_insert_lsn()"; }
written() {
    pgt_psql -d app -At -c "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)
                              FROM pg_stat_user_tables WHERE schemaname = '_rudderstack'"
}
wal_bytes() { pgt_psql -d app -At -c "SELECT '$2'::pg_lsn - '$1'::pg_lsn"; }

declare -A read sent secs writes wal
# The pipeline that writes the least WAL first: a later one decodes what an earlier one wrote.
for p in no-ledger realtime window; do
    before_lines=$(wc -l < "$work/events-$p.jsonl")
    pgt_psql -d app -q -c "SELECT pg_stat_force_next_flush()" >/dev/null 2>&1 || true
    w0=$(written)
    l0=$(lsn)
    t0=$(now)
    "$bin" run --once --config "$work/$p.toml" 2> "$work/run-$p.log" \
        || { cat "$work/run-$p.log" >&2; exit 1; }
    t1=$(now)
    l1=$(lsn)
    sleep 1 # table statistics are flushed by the backends within a second
    pgt_psql -d app -q -c "SELECT pg_stat_clear_snapshot()" >/dev/null
    w1=$(written)
    secs[$p]=$(printf '%.2f' "$(echo "$t1 - $t0" | bc -l)")
    sent[$p]=$(( $(wc -l < "$work/events-$p.jsonl") - before_lines ))
    read[$p]=$(pgt_psql -d app -At -c "SELECT coalesce(sum(rows), 0) FROM _rudderstack.cdc_sync_runs
                                        WHERE pipeline = 'bench-$p' AND kind <> 'snapshot'")
    writes[$p]=$((w1 - w0))
    wal[$p]=$(wal_bytes "$l0" "$l1")
done

say "full scan: \\copy (SELECT the mapped columns) TO /dev/null"
t0=$(now)
pgt_psql -d app -q -c "\\copy (SELECT id, user_id, email, name, plan, age, balance, updated_at FROM public.users) TO '/dev/null'"
scan_secs=$(printf '%.2f' "$(echo "$(now) - $t0" | bc -l)")

changes=$((changed * TIMES))
per() { if [[ "$2" -gt 0 ]]; then printf '%.1f' "$(echo "$1 / $2" | bc -l)"; else echo "-"; fi; }
echo
echo "table: $ROWS rows; window: $changed rows changed $TIMES times = $changes changes"
printf '%-22s %12s %12s %9s %16s %18s\n' "" "rows read" "events sent" "seconds" "writes/event" "WAL bytes/event"
printf '%-22s %12s %12s %9s %16s %18s\n' "full scan (per run)" "$ROWS" "$ROWS" "$scan_secs+" "-" "-"
for p in "${pipelines[@]}"; do
    printf '%-22s %12s %12s %9s %16s %18s\n' "slotstream $p" "${read[$p]}" "${sent[$p]}" "${secs[$p]}" \
        "$(per "${writes[$p]}" "${sent[$p]}")" "$(per "${wal[$p]}" "${sent[$p]}")"
done
echo
echo "events: full scan / slotstream window = $(per "$ROWS" "${sent[window]}")x fewer sent"
echo "rows read: full scan / slotstream window = $(per "$ROWS" "${read[window]}")x fewer read"
echo "(writes/event: rows slotstream wrote to _rudderstack per delivered event — ledger, stage,"
echo " checkpoint, sync run; WAL bytes/event: all WAL generated while it ran, per delivered event)"
