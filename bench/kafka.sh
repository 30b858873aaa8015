#!/usr/bin/env bash
# Benchmark (docs/architecture.md §11, "Kafka"): slotstream into a real Kafka-API broker (tansu,
# in-memory storage) on this machine.
#
# 1. Throughput: `slotstream run --once` from commit to broker acknowledgement (idempotent
#    producer, acks=all) for ROWS+UPDATE_ROWS changes, next to `pg_recvlogical` reading the
#    same changes from a second slot in the same run (the server's own decoding rate, the
#    ceiling); goal: slotstream/pg_recvlogical >= 0.8. Peak RSS of slotstream.
# 2. Latency: `slotstream run` (realtime) while pgbench commits a steady RATE changes/s; the
#    commit -> broker-ack lag of every event (slotstream logs it per batch at debug level on
#    target slotstream::latency: now minus the event's commit time, once all its batch's
#    records are acknowledged), p50/p99; goal: p99 <= 50 ms.
#
#   bench/kafka.sh
#   ROWS=500000 RATE=5000 LATENCY_SECS=30 bench/kafka.sh
#
# Environment:
#   ROWS=300000         rows inserted for the throughput part
#   TXN_ROWS=10000      rows per INSERT transaction
#   UPDATE_ROWS=0       rows updated afterwards (same transaction size)
#   BATCH_EVENTS=10000  schedule.max_batch_events of the throughput pipelines
#   ROUNDS=2            times each reader reads the changes (each from a slot of its own,
#                       alternating); the best round of each is compared
#   COMPRESSION=none    destination.compression
#   RATE=5000           changes per second in the latency part
#   TX_CHANGES=50       rows per transaction in the latency part (RATE/TX_CHANGES tx/s)
#   LATENCY_SECS=20     length of the latency part
#   LAT_BATCH_EVENTS=500 LAT_BATCH_DELAY=10ms
#                       schedule.max_batch_events / max_batch_delay of the realtime pipeline
#   LEDGER=true         sync.ledger of both pipelines (false: no ledger writes)
#   KEEP=1              keep the work directory (logs) and print its path
#   SLOTSTREAM_BIN=…    a prebuilt binary instead of `cargo build --release`
#   TANSU_BIN=…         the broker (default: tansu on PATH, else ~/.cargo/bin/tansu)
#   WRAP="perf record -g -o /tmp/kafka.perf"
#                       a profiler to run the timed `slotstream run --once` under
#
# Nothing is asserted (a benchmark is not a timed test): the figures are for a human to read.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROWS="${ROWS:-300000}"
TXN_ROWS="${TXN_ROWS:-10000}"
UPDATE_ROWS="${UPDATE_ROWS:-0}"
BATCH_EVENTS="${BATCH_EVENTS:-10000}"
ROUNDS="${ROUNDS:-2}"
COMPRESSION="${COMPRESSION:-none}"
RATE="${RATE:-5000}"
TX_CHANGES="${TX_CHANGES:-50}"
LATENCY_SECS="${LATENCY_SECS:-20}"
LAT_BATCH_EVENTS="${LAT_BATCH_EVENTS:-500}"
LAT_BATCH_DELAY="${LAT_BATCH_DELAY:-10ms}"
LEDGER="${LEDGER:-true}"

tansu="${TANSU_BIN:-$(command -v tansu || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu")}"
[[ -x "$tansu" ]] || { echo "tansu not found: cargo install tansu --locked --features dynostore" >&2; exit 1; }

tansu_pid=""
run_pid=""
bench_extra_cleanup() {
    [[ -n "$run_pid" ]] && kill "$run_pid" 2>/dev/null || true
    [[ -n "$tansu_pid" ]] && kill "$tansu_pid" 2>/dev/null || true
}
bench_start kafka

say "tansu broker (memory storage)"
kport="$(free_port)"
"$tansu" broker --listener-url "tcp://127.0.0.1:$kport" --advertised-listener-url "tcp://127.0.0.1:$kport" \
    --storage-engine memory://tansu/ > "$work/tansu.log" 2>&1 &
tansu_pid=$!
until (exec 3<>"/dev/tcp/127.0.0.1/$kport") 2>/dev/null; do sleep 0.05; done

bench_users_table

# name, topic, max_batch_events, max_batch_delay
write_config() {
    cat > "$work/$1.toml" <<TOML
name = "$1"

$(bench_source_toml)

[schedule]
frequency = "realtime"
max_batch_events = $3
max_batch_delay = "$4"

[sync]
ledger = $LEDGER

[destination]
type = "kafka"
brokers = "127.0.0.1:$kport"
topic = "$2"
compression = "$COMPRESSION"
create_topic = true
partitions = 1
TOML
}
recv() {
    local round=$1
    shift
    PGPASSWORD="$SLOTSTREAM_PG_PASSWORD" pg_recvlogical -h 127.0.0.1 -p "$PGT_PORT" -U rudder -d app \
        --slot "bench_recvlogical_$round" "$@"
}
delivered() {
    pgt_psql -d app -At -c "SELECT coalesce(sum(events), 0) FROM _rudderstack.cdc_sync_runs WHERE pipeline = '$1'"
}

say "$ROUNDS pipelines: first run --once (full sync of the empty table, slot and topic created)"
for round in $(seq 1 "$ROUNDS"); do
    write_config "bench-$round" "bench_$round" "$BATCH_EVENTS" 200ms
    "$bin" run --once --config "$work/bench-$round.toml" 2> "$work/first-run-$round.log" \
        || { cat "$work/first-run-$round.log" >&2; exit 1; }
    recv "$round" --create-slot -P pgoutput
done
write_config bench-rt bench_rt "$LAT_BATCH_EVENTS" "$LAT_BATCH_DELAY"
"$bin" run --once --config "$work/bench-rt.toml" 2> "$work/first-run-rt.log" \
    || { cat "$work/first-run-rt.log" >&2; exit 1; }

say "loading $ROWS rows in $TXN_ROWS-row transactions, then updating $UPDATE_ROWS"
bench_load_users "$ROWS" "$TXN_ROWS" "$UPDATE_ROWS"
end_lsn="$(pgt_psql -d app -At -c 'SELECT pg_current_wal_insert_lsn()')"
until [[ "$(pgt_psql -d app -At -c "SELECT pg_current_wal_flush_lsn() >= '$end_lsn'")" == t ]]; do
    sleep 0.1
done
changes=$((ROWS + UPDATE_ROWS))

# CPU seconds the broker used so far (it shares this machine's CPUs with the server and slotstream).
tansu_cpu() {
    echo "$(awk '{print $14 + $15}' "/proc/$tansu_pid/stat") / $(getconf CLK_TCK)" | bc -l
}
recv_times=()
slot_times=()
broker_cpu=()
cpu_times=()
rss_max=0
for round in $(seq 1 "$ROUNDS"); do
    say "round $round: pg_recvlogical --endpos $end_lsn"
    t0=$(now)
    recv "$round" --start --no-loop -o proto_version=1 -o publication_names="$pub" \
        -f /dev/null --endpos "$end_lsn"
    t1=$(now)
    recv_times+=("$(echo "$t1 - $t0" | bc -l)")

    say "round $round: slotstream run --once into Kafka"
    k0=$(tansu_cpu)
    t0=$(now)
    /usr/bin/time -f '%M %U %S' -o "$work/rss-$round" ${WRAP:-} "$bin" run --once \
        --config "$work/bench-$round.toml" 2> "$work/run-$round.log" \
        || { cat "$work/run-$round.log" >&2; exit 1; }
    t1=$(now)
    slot_times+=("$(echo "$t1 - $t0" | bc -l)")
    broker_cpu+=("$(printf '%.2f' "$(echo "$(tansu_cpu) - $k0" | bc -l)")")
    read -r rss_kib user_secs sys_secs < <(tail -n 1 "$work/rss-$round")
    ((rss_kib > rss_max)) && rss_max=$rss_kib
    cpu_times+=("$user_secs+$sys_secs")
    got="$(delivered "bench-$round")"
    if [[ "$got" -ne "$changes" ]]; then
        echo "warning: round $round: $got events acknowledged, expected $changes" >&2
    fi
done
min() { printf '%s\n' "$@" | sort -g | head -n 1; }
recv_secs=$(min "${recv_times[@]}")
slot_secs=$(min "${slot_times[@]}")
recv_rate=$(echo "$changes / $recv_secs" | bc -l)
slot_rate=$(echo "$changes / $slot_secs" | bc -l)

say "latency: realtime run, pgbench at $RATE changes/s ($TX_CHANGES-row transactions) for $LATENCY_SECS s"
# The realtime pipeline first catches up with the bulk load (its slot holds it), then the
# measured load starts.
RUST_LOG="warn,slotstream::latency=debug" NO_COLOR=1 "$bin" run --config "$work/bench-rt.toml" \
    2> "$work/rt.log" &
run_pid=$!
until [[ "$(delivered bench-rt)" -ge "$changes" ]]; do sleep 0.2; done
sleep 1
skip="$(wc -l < "$work/rt.log")"
cat > "$work/insert.sql" <<SQL
INSERT INTO public.users (user_id, email, name, plan, age, balance, verified, updated_at)
SELECT 'rt_' || g, 'rt' || g || '@example.com', 'RT ' || g, 'free', 30, 1.5, true, now()
  FROM generate_series(1, $TX_CHANGES) g;
SQL
PGOPTIONS="-c synchronous_commit=on" "$PGT_BIN/pgbench" -n -h "$PGT_SOCK" -p "$PGT_PORT" -U postgres \
    -f "$work/insert.sql" -R "$((RATE / TX_CHANGES))" -T "$LATENCY_SECS" -c 2 -j 1 app \
    > "$work/pgbench.log" 2>&1
sleep 2
kill -TERM "$run_pid"
wait "$run_pid" || true
run_pid=""
lat_stats="$(tail -n +"$((skip + 1))" "$work/rt.log" | grep -o 'lag_ms=[0-9.x,]*' | sed 's/lag_ms=//' | tr ',' '\n' | python3 -c '
import sys
lags = []
for item in sys.stdin.read().split():
    ms, n = item.split("x")
    lags.extend([float(ms)] * int(n))
lags.sort()
if not lags:
    print("no samples")
else:
    q = lambda p: lags[min(len(lags) - 1, int(p * len(lags)))]
    print(f"{len(lags)} events: p50 {q(0.50):.1f} ms, p90 {q(0.90):.1f} ms, p99 {q(0.99):.1f} ms, max {lags[-1]:.1f} ms")
')"
tps="$(grep -Eo 'tps = [0-9.]+' "$work/pgbench.log" | head -n 1 | awk '{print $3}')"

printf '\nKafka benchmark (broker: tansu %s, in-memory storage, on this machine)\n' "$("$tansu" --version 2>/dev/null | head -n 1 | awk '{print $NF}')"
printf 'machine: %s, %s CPUs, %s\n' "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" \
    "$(nproc)" "$("$PGT_BIN/postgres" --version)"
printf 'load average: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
printf 'throughput: %d changes (%d-row transactions), max_batch_events=%s, compression=%s, idempotent producer, acks=all\n' \
    "$changes" "$TXN_ROWS" "$BATCH_EVENTS" "$COMPRESSION"
printf 'rounds (s): pg_recvlogical %s | slotstream %s\n' "${recv_times[*]}" "${slot_times[*]}"
printf 'CPU (s) per round: slotstream user+sys %s | the broker (tansu) meanwhile %s\n' "${cpu_times[*]}" "${broker_cpu[*]}"
printf '%-16s %8.2f s  %10.0f rows/s  (best of %d)\n' "pg_recvlogical" "$recv_secs" "$recv_rate" "$ROUNDS"
printf '%-16s %8.2f s  %10.0f rows/s  (best of %d, commit -> broker ack)\n' "slotstream" "$slot_secs" "$slot_rate" "$ROUNDS"
printf 'ratio slotstream/pg_recvlogical: %.3f  (goal >= 0.8)\n' "$(echo "$slot_rate / $recv_rate" | bc -l)"
printf 'slotstream peak RSS: %.1f MiB\n' "$(echo "$rss_max / 1024" | bc -l)"
printf 'latency commit -> broker ack at %s changes/s (pgbench: %s tx/s of %s rows; max_batch_events=%s, max_batch_delay=%s): %s  (goal p99 <= 50 ms)\n' \
    "$RATE" "${tps:-?}" "$TX_CHANGES" "$LAT_BATCH_EVENTS" "$LAT_BATCH_DELAY" "$lat_stats"
