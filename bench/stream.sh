#!/usr/bin/env bash
# Benchmark (docs/architecture.md §11, "stream"): slotstream `run --once` into the file sink vs
# `pg_recvlogical` reading the same changes, pgoutput proto v1, from a second slot. The server's
# own decoding rate is the ceiling; the goal is slotstream/pg_recvlogical ≥ 0.9.
#
#   bench/stream.sh                 # 1M inserted rows in 10k-row transactions, plus updates
#   ROWS=200000 bench/stream.sh
#
# Environment:
#   ROWS=1000000        rows inserted
#   TXN_ROWS=10000      rows per INSERT transaction
#   UPDATE_ROWS=ROWS/10 rows updated afterwards (same transaction size)
#   BATCH_EVENTS=10000  schedule.max_batch_events of the bench config (the default is 500;
#                       a bulk deployment sets it higher: fewer fsyncs per event)
#   FSYNC=true          destination.fsync of the file sink
#   TRANSPORT=tcp       how both readers reach the server, as the same role (rudder): tcp
#                       (127.0.0.1, SCRAM) or unix (the socket directory). It matters: over
#                       loopback TCP the walsender spends much more CPU feeding pg_recvlogical
#                       than over the socket (the CPU line below shows it), so compare both
#   ROUNDS=3            times each reader reads the changes, each from a slot of its own,
#                       alternating; printed: every round, the ratio of the best rounds, and
#                       the median of the per-round ratios (on a shared machine the spread
#                       shows the noise; the median of adjacent pairs is the steadier figure)
#   LEDGER=true         sync.ledger of the pipelines (the default; false: no ledger writes, one
#                       row written per delivered row key otherwise)
#   METRICS=1           serve [metrics] on a local port and scrape /metrics every second
#                       during the timed runs (the slot's watch polls either way); compare
#                       against a build from before the metrics with SLOTSTREAM_BIN
#   KEEP=1              keep the work directory (events file, logs) and print its path
#   SLOTSTREAM_BIN=…    a prebuilt binary instead of `cargo build --release`
#   WRAP="perf record -g -o /tmp/stream.perf"
#                       a profiler to run the timed `slotstream run --once` under (the figures
#                       then include its overhead)
#
# Prints rows/s of each reader, the ratio, slotstream's CPU time and peak RSS, and the CPU the
# server's backends (mostly the walsender) used while each reader read. Nothing is asserted (a
# benchmark is not a timed test): the figures are for a human to read.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/pg-throwaway.sh

ROWS="${ROWS:-1000000}"
TXN_ROWS="${TXN_ROWS:-10000}"
UPDATE_ROWS="${UPDATE_ROWS:-$((ROWS / 10))}"
BATCH_EVENTS="${BATCH_EVENTS:-10000}"
FSYNC="${FSYNC:-true}"
ROUNDS="${ROUNDS:-3}"
TRANSPORT="${TRANSPORT:-tcp}"
METRICS="${METRICS:-}"
LEDGER="${LEDGER:-true}"
metrics_port() { echo $((19100 + $1)); }

say() { printf '== %s\n' "$*" >&2; }
now() { date +%s.%N; }

if [[ -n "${SLOTSTREAM_BIN:-}" ]]; then
    bin="$SLOTSTREAM_BIN"
else
    say "cargo build --release"
    cargo build --release --quiet
    bin="$root/target/release/slotstream"
fi

work="$(mktemp -d /tmp/slotstream-bench-stream.XXXXXX)"
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
SQL
export SLOTSTREAM_PG_PASSWORD="bench-$RANDOM-$RANDOM"
pub=slotstream_bench
pgt_psql -d app -v schema=public -v table=users -v user=rudder \
    -v password="$SLOTSTREAM_PG_PASSWORD" -v publication="$pub" -f sql/setup.sql >/dev/null

case "$TRANSPORT" in
    tcp) pg_host=127.0.0.1 ;;
    unix) pg_host="$PGT_SOCK" ;;
    *) echo "TRANSPORT must be tcp or unix" >&2; exit 2 ;;
esac
# One pipeline (own name, slot, checkpoint and events file) and one pg_recvlogical slot per round.
write_config() {
    local round=$1
    cat > "$work/slotstream-$round.toml" <<TOML
name = "bench-$round"

[source]
host = "$pg_host"
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

[sync]
ledger = $LEDGER

[destination]
type = "file"
path = "$work/events-$round.jsonl"
fsync = $FSYNC
TOML
    if [[ -n "$METRICS" ]]; then
        printf '\n[metrics]\nlisten = "127.0.0.1:%s"\n' "$(metrics_port "$round")" \
            >> "$work/slotstream-$round.toml"
    fi
}
recv() {
    local round=$1
    shift
    PGPASSWORD="$SLOTSTREAM_PG_PASSWORD" pg_recvlogical -h "$pg_host" -p "$PGT_PORT" -U rudder -d app \
        --slot "bench_recvlogical_$round" "$@"
}

say "$ROUNDS pipelines: first run --once (full sync of the empty table, slot created); $ROUNDS pg_recvlogical slots"
for round in $(seq 1 "$ROUNDS"); do
    write_config "$round"
    "$bin" run --once --config "$work/slotstream-$round.toml" 2> "$work/first-run-$round.log" \
        || { cat "$work/first-run-$round.log" >&2; exit 1; }
    recv "$round" --create-slot -P pgoutput
done

say "loading $ROWS rows in $TXN_ROWS-row transactions, then updating $UPDATE_ROWS"
load_started=$(now)
pgt_psql -d app -v rows="$ROWS" -v txn="$TXN_ROWS" -v upd="$UPDATE_ROWS" <<'SQL'
CREATE PROCEDURE bench_load(n bigint, txn bigint, upd bigint) LANGUAGE plpgsql AS $$
DECLARE
    lo bigint := 1;
BEGIN
    WHILE lo <= n LOOP
        INSERT INTO public.users (user_id, email, name, plan, age, balance, verified, updated_at)
        SELECT 'u_' || i, 'user' || i || '@example.com', 'User ' || i,
               (ARRAY['free', 'pro', 'team', 'enterprise'])[1 + i % 4], 18 + i % 60,
               (i % 100000) / 100.0, i % 3 = 0, now()
          FROM generate_series(lo, least(lo + txn - 1, n)) AS i;
        COMMIT;
        lo := lo + txn;
    END LOOP;
    lo := 1;
    WHILE lo <= upd LOOP
        UPDATE public.users SET plan = 'pro', updated_at = now()
         WHERE id BETWEEN lo AND least(lo + txn - 1, upd);
        COMMIT;
        lo := lo + txn;
    END LOOP;
END $$;
CALL bench_load(:rows, :txn, :upd);
SQL
# The insert position: with synchronous_commit=off the write position can lag the last commit.
end_lsn="$(pgt_psql -d app -At -c 'SELECT pg_current_wal_insert_lsn()')"
# Neither reader should wait for the WAL writer: let it flush everything first.
until [[ "$(pgt_psql -d app -At -c "SELECT pg_current_wal_flush_lsn() >= '$end_lsn'")" == t ]]; do
    sleep 0.1
done
changes=$((ROWS + UPDATE_ROWS))
say "loaded in $(echo "$(now) - $load_started" | bc) s; end LSN $end_lsn; $changes changes"

# CPU seconds of the server's exited backends (the walsender of a finished reader among them).
server_cpu() {
    local pid ticks
    pid="$(head -n 1 "$PGT_DIR/data/postmaster.pid")"
    ticks="$(awk '{print $16 + $17}' "/proc/$pid/stat")"
    echo "$ticks / $(getconf CLK_TCK)" | bc -l
}
recv_server=()
slot_server=()
recv_times=()
slot_times=()
cpu_times=()
round_ratios=()
rss_max=0
for round in $(seq 1 "$ROUNDS"); do
    say "round $round: pg_recvlogical --endpos $end_lsn"
    c0=$(server_cpu)
    t0=$(now)
    recv "$round" --start --no-loop -o proto_version=1 -o publication_names="$pub" \
        -f /dev/null --endpos "$end_lsn"
    t1=$(now)
    recv_times+=("$(echo "$t1 - $t0" | bc -l)")
    sleep 0.2 # the walsender has exited and been reaped
    recv_server+=("$(printf '%.2f' "$(echo "$(server_cpu) - $c0" | bc -l)")")

    say "round $round: slotstream run --once"
    scraper=""
    if [[ -n "$METRICS" ]]; then
        (while sleep 1; do
            curl -s -o /dev/null "http://127.0.0.1:$(metrics_port "$round")/metrics" || true
        done) &
        scraper=$!
    fi
    c0=$(server_cpu)
    t0=$(now)
    /usr/bin/time -f '%M %U %S' -o "$work/rss-$round" ${WRAP:-} "$bin" run --once \
        --config "$work/slotstream-$round.toml" 2> "$work/run-$round.log" \
        || { cat "$work/run-$round.log" >&2; exit 1; }
    t1=$(now)
    [[ -z "$scraper" ]] || kill "$scraper" 2>/dev/null || true
    slot_times+=("$(echo "$t1 - $t0" | bc -l)")
    sleep 0.2
    slot_server+=("$(printf '%.2f' "$(echo "$(server_cpu) - $c0" | bc -l)")")
    round_ratios+=("$(echo "${recv_times[-1]} / ${slot_times[-1]}" | bc -l)")
    read -r rss_kib user_secs sys_secs < <(tail -n 1 "$work/rss-$round")
    ((rss_kib > rss_max)) && rss_max=$rss_kib
    cpu_times+=("$user_secs+$sys_secs")

    events="$(wc -l < "$work/events-$round.jsonl")"
    if [[ "$events" -ne "$changes" ]]; then
        echo "warning: round $round: the file sink holds $events events, expected $changes" >&2
    fi
    [[ -n "${KEEP:-}" ]] || rm -f "$work/events-$round.jsonl"
done
min() { printf '%s\n' "$@" | sort -g | head -n 1; }
median() { printf '%s\n' "$@" | sort -g | sed -n "$((($# + 1) / 2))p"; }
recv_secs=$(min "${recv_times[@]}")
slot_secs=$(min "${slot_times[@]}")

rate() { echo "$1 / $2" | bc -l; }
recv_rate=$(rate "$changes" "$recv_secs")
slot_rate=$(rate "$changes" "$slot_secs")
printf '\nstream benchmark: %d changes (%d inserts, %d updates; %d-row transactions)\n' \
    "$changes" "$ROWS" "$UPDATE_ROWS" "$TXN_ROWS"
printf 'machine: %s, %s CPUs, %s\n' "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" \
    "$(nproc)" "$("$PGT_BIN/postgres" --version)"
printf 'load average: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
printf 'slotstream config: max_batch_events=%s fsync=%s ledger=%s (file sink); both readers over %s; metrics endpoint %s\n' \
    "$BATCH_EVENTS" "$FSYNC" "$LEDGER" "$TRANSPORT" "$([[ -n "$METRICS" ]] && echo "on, scraped every second" || echo off)"
printf 'rounds (s): pg_recvlogical %s | slotstream %s\n' "${recv_times[*]}" "${slot_times[*]}"
printf 'CPU (s) per round: slotstream user+sys %s | server backends while pg_recvlogical read %s, while slotstream read %s\n' \
    "${cpu_times[*]}" "${recv_server[*]}" "${slot_server[*]}"
printf '%-16s %8.2f s  %10.0f rows/s  (best of %d)\n' "pg_recvlogical" "$recv_secs" "$recv_rate" "$ROUNDS"
printf '%-16s %8.2f s  %10.0f rows/s  (best of %d)\n' "slotstream" "$slot_secs" "$slot_rate" "$ROUNDS"
printf 'ratio slotstream/pg_recvlogical: %.3f best/best, %.3f median of the rounds  (goal >= 0.9)\n' \
    "$(echo "$slot_rate / $recv_rate" | bc -l)" "$(median "${round_ratios[@]}")"
printf 'slotstream peak RSS: %.1f MiB\n' "$(echo "$rss_max / 1024" | bc -l)"
