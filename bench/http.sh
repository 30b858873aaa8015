#!/usr/bin/env bash
# Benchmark (docs/architecture.md §11, "HTTP"): slotstream into a local HTTP receiver that
# answers at once (examples/http_receiver.rs, hyper), next to the file sink on the same changes
# in the same run: `slotstream run --once` for ROWS changes, each pipeline on a slot of its own,
# events/s of each, the ratio http/file, and the peak RSS of each (/usr/bin/time -v). The HTTP
# destination keeps one request in flight per pipeline (ordering): the ratio is what that costs
# against a destination without a round trip.
#
#   bench/http.sh
#   ROWS=500000 FORMAT=webhook GZIP=true bench/http.sh
#
# Environment:
#   ROWS=300000          rows inserted
#   TXN_ROWS=10000       rows per INSERT transaction
#   BATCH_EVENTS=10000   schedule.max_batch_events of both pipelines
#   ROUNDS=2             rounds (each pipeline reads the changes once per round, from a slot of
#                        its own); the best round of each is compared
#   FORMAT=rudderstack   destination.format (rudderstack | webhook)
#   GZIP=false           destination.gzip
#   MAX_REQUEST=4000KiB  destination.max_request_bytes
#   KEEP=1               keep the work directory (logs) and print its path
#   SLOTSTREAM_BIN=…     a prebuilt binary instead of `cargo build --release`
#
# Nothing is asserted (a benchmark is not a timed test): the figures are for a human to read.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROWS="${ROWS:-300000}"
TXN_ROWS="${TXN_ROWS:-10000}"
BATCH_EVENTS="${BATCH_EVENTS:-10000}"
ROUNDS="${ROUNDS:-2}"
FORMAT="${FORMAT:-rudderstack}"
GZIP="${GZIP:-false}"
MAX_REQUEST="${MAX_REQUEST:-4000KiB}"

receiver_pid=""
bench_extra_cleanup() {
    [[ -n "$receiver_pid" ]] && kill "$receiver_pid" 2>/dev/null || true
}
bench_start http

say "cargo build --release --example http_receiver"
cargo build --release --quiet --example http_receiver
receiver="${CARGO_TARGET_DIR:-$root/target}/release/examples/http_receiver"
"$receiver" > "$work/receiver.port" 2> "$work/receiver.log" &
receiver_pid=$!
until [[ -s "$work/receiver.port" ]]; do sleep 0.05; done
hport="$(head -n 1 "$work/receiver.port")"

bench_users_table
export SLOTSTREAM_BENCH_WRITE_KEY="bench-write-key"

# name, kind (file | http)
write_config() {
    local destination
    if [[ "$2" == file ]]; then
        destination="type = \"file\"
path = \"$work/$1.jsonl\""
    elif [[ "$FORMAT" == rudderstack ]]; then
        destination="type = \"http\"
url = \"http://127.0.0.1:$hport\"
write_key_env = \"SLOTSTREAM_BENCH_WRITE_KEY\"
gzip = $GZIP
max_request_bytes = \"$MAX_REQUEST\""
    else
        destination="type = \"http\"
format = \"webhook\"
url = \"http://127.0.0.1:$hport/hook\"
gzip = $GZIP
max_request_bytes = \"$MAX_REQUEST\""
    fi
    cat > "$work/$1.toml" <<TOML
name = "$1"

$(bench_source_toml)

[schedule]
frequency = "realtime"
max_batch_events = $BATCH_EVENTS

[destination]
$destination
TOML
}
delivered() {
    pgt_psql -d app -At -c "SELECT coalesce(sum(events), 0) FROM _rudderstack.cdc_sync_runs WHERE pipeline = '$1'"
}

say "$ROUNDS rounds of two pipelines (file, http): first run --once (full sync of the empty table, slots created)"
for round in $(seq 1 "$ROUNDS"); do
    for kind in file http; do
        write_config "$kind-$round" "$kind"
        "$bin" run --once --config "$work/$kind-$round.toml" 2> "$work/first-run-$kind-$round.log" \
            || { cat "$work/first-run-$kind-$round.log" >&2; exit 1; }
    done
done

say "loading $ROWS rows in $TXN_ROWS-row transactions"
bench_load_users "$ROWS" "$TXN_ROWS" 0

declare -A times rss
for round in $(seq 1 "$ROUNDS"); do
    # Alternate which pipeline goes first, so neither always reads a warm cache.
    kinds="file http"
    ((round % 2 == 0)) && kinds="http file"
    for kind in $kinds; do
        say "round $round: slotstream run --once into $kind"
        t0=$(now)
        /usr/bin/time -v -o "$work/time-$kind-$round" "$bin" run --once \
            --config "$work/$kind-$round.toml" 2> "$work/run-$kind-$round.log" \
            || { cat "$work/run-$kind-$round.log" >&2; exit 1; }
        t1=$(now)
        times[$kind]+="$(echo "$t1 - $t0" | bc -l) "
        kib="$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time-$kind-$round")"
        if [[ -z "${rss[$kind]:-}" ]] || ((kib > rss[$kind])); then rss[$kind]=$kib; fi
        got="$(delivered "$kind-$round")"
        if [[ "$got" -ne "$ROWS" ]]; then
            echo "warning: round $round: $kind delivered $got events, expected $ROWS" >&2
        fi
    done
done
kill -TERM "$receiver_pid" && wait "$receiver_pid" || true
receiver_pid=""

min() { printf '%s\n' "$@" | sort -g | head -n 1; }
# shellcheck disable=SC2086
file_secs=$(min ${times[file]})
# shellcheck disable=SC2086
http_secs=$(min ${times[http]})
file_rate=$(echo "$ROWS / $file_secs" | bc -l)
http_rate=$(echo "$ROWS / $http_secs" | bc -l)

printf '\nHTTP benchmark (receiver: examples/http_receiver.rs, answers 200 at once, on this machine)\n'
printf 'machine: %s, %s CPUs, %s\n' "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" \
    "$(nproc)" "$("$PGT_BIN/postgres" --version)"
printf 'load average: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%d changes (%d-row transactions), max_batch_events=%s; http: format=%s gzip=%s max_request_bytes=%s, one request in flight\n' \
    "$ROWS" "$TXN_ROWS" "$BATCH_EVENTS" "$FORMAT" "$GZIP" "$MAX_REQUEST"
printf 'receiver: %s\n' "$(cat "$work/receiver.log")"
printf 'rounds (s): file %s| http %s\n' "${times[file]}" "${times[http]}"
printf '%-6s %8.2f s  %10.0f events/s  peak RSS %6.1f MiB  (best of %d)\n' file "$file_secs" "$file_rate" \
    "$(echo "${rss[file]} / 1024" | bc -l)" "$ROUNDS"
printf '%-6s %8.2f s  %10.0f events/s  peak RSS %6.1f MiB  (best of %d)\n' http "$http_secs" "$http_rate" \
    "$(echo "${rss[http]} / 1024" | bc -l)" "$ROUNDS"
printf 'ratio http/file: %.3f\n' "$(echo "$http_rate / $file_rate" | bc -l)"
