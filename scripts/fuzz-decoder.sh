#!/usr/bin/env bash
# Fuzzes the pgoutput decoder (fuzz/fuzz_targets/pgoutput_decode.rs) for a fixed number of runs.
#
#   scripts/fuzz-decoder.sh                 # 200000 runs
#   FUZZ_RUNS=2000000 scripts/fuzz-decoder.sh
#   FUZZ_SANITIZER=none scripts/fuzz-decoder.sh   # faster; the decoder is safe Rust
#
# Works on a stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags. Builds in
# fuzz/target (its own workspace), so it never blocks the main build. The corpus grows in
# fuzz/corpus/pgoutput_decode, starting from the committed seeds in fuzz/seeds; a crash is saved
# under fuzz/artifacts/ and makes this script exit non-zero.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# Pin the fuzz workspace to the main crate's dependency versions on first use.
if [[ ! -f fuzz/Cargo.lock && -f Cargo.lock ]]; then
    cp Cargo.lock fuzz/Cargo.lock
fi

corpus="fuzz/corpus/pgoutput_decode"
mkdir -p "$corpus"

runs="${FUZZ_RUNS:-200000}"
start=$(date +%s)
cargo fuzz run pgoutput_decode \
    --fuzz-dir fuzz \
    --target-dir fuzz/target \
    --sanitizer "${FUZZ_SANITIZER:-address}" \
    "$corpus" fuzz/seeds \
    -- -runs="$runs" -max_len=4096 -timeout=10 -rss_limit_mb=2048
echo "fuzz-decoder: ${runs} runs without a crash in $(( $(date +%s) - start ))s (including the build)"
