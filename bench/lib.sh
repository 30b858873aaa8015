# The common start of a benchmark (sourced): helpers, the slotstream binary, a work directory
# removed on exit (kept with KEEP=1), and a throwaway PostgreSQL with wal_level=logical.
#
#   source bench/lib.sh
#   bench_start window        # sets $root, $bin, $work; starts PostgreSQL ($PGT_PORT, pgt_psql)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/pg-throwaway.sh

say() { printf '== %s\n' "$*" >&2; }
now() { date +%s.%N; }

apt_install() {
    apt-get install -y -qq "$@" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq "$@" >/dev/null; }
}

bench_cleanup() {
    # A benchmark with processes of its own defines bench_extra_cleanup to stop them.
    if declare -F bench_extra_cleanup >/dev/null; then bench_extra_cleanup; fi
    pgt_stop
    if [[ -n "${KEEP:-}" ]]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}

bench_start() {
    local name=$1
    command -v bc >/dev/null || { say "installing bc"; apt_install bc; }
    if [[ -n "${SLOTSTREAM_BIN:-}" ]]; then
        bin="$SLOTSTREAM_BIN"
    else
        say "cargo build --release"
        cargo build --release --quiet
        bin="${CARGO_TARGET_DIR:-$root/target}/release/slotstream"
    fi
    work="$(mktemp -d "/tmp/slotstream-bench-$name.XXXXXX")"
    chmod 755 "$work"
    trap bench_cleanup EXIT
    say "throwaway PostgreSQL (wal_level=logical)"
    pg_throwaway_start "$work/pg"
}
