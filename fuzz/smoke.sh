#!/bin/sh
# Builds the fuzz targets and runs each for a bounded time: `make fuzz-smoke` (CI) and
# `make fuzz-build`. Usage: fuzz/smoke.sh build | run [target...]
#
# No cargo-fuzz needed: this is what `cargo fuzz build` does (same RUSTFLAGS as cargo-fuzz
# 0.13: SanitizerCoverage + AddressSanitizer, `--cfg fuzzing`, debug assertions), with plain
# cargo. The -Z flags need a nightly rustc; without one, the stable toolchain is used with
# RUSTC_BOOTSTRAP=1 (its sanitizer runtimes ship with it). `cargo +nightly fuzz run <target>`
# works too, on the same fuzz/ crate.
#
# FUZZ_SECS (default 20) bounds each target's run (a hard 10 s timeout per input too). Each run starts from the seeds in
# fuzz/corpus/<target> (read only) and writes what it finds to target/fuzz/corpus/<target>.
# A crash leaves its input in target/fuzz/artifacts/<target>/ and fails the run; turn it into
# a regression test under tests/ and add the input to fuzz/corpus/<target>.
set -eu
cd "$(dirname "$0")/.."
action=${1:-run}
[ $# -gt 0 ] && shift
targets=${*:-"frames ws_decode c_api nats_parse event_id"}
secs=${FUZZ_SECS:-20}
triple=x86_64-unknown-linux-gnu
# FDCAST_FUZZ_TARGET_DIR moves the build (CI keeps it outside the clone); the corpus, the
# artifacts and the logs stay under target/fuzz.
export CARGO_TARGET_DIR="${FDCAST_FUZZ_TARGET_DIR:-$PWD/target/fuzz}"
mkdir -p target/fuzz

if rustup run nightly rustc --version >/dev/null 2>&1; then
  cargo="rustup run nightly cargo"
else
  echo "fuzz: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1"
  cargo=cargo
  export RUSTC_BOOTSTRAP=1
fi
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Zsanitizer=address \
-Cllvm-args=-sanitizer-coverage-stack-depth -Cdebug-assertions -Ccodegen-units=1"
# Build scripts and proc macros are not instrumented (cargo applies RUSTFLAGS only to the
# --target build), as with cargo-fuzz.
$cargo build --release --locked --manifest-path fuzz/Cargo.toml --target $triple --bins

[ "$action" = build ] && exit 0

# ASan: leaks fail the run; the Makefile's ASAN_OPTIONS would otherwise apply as they are.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:symbolize=1"
status=0
for t in $targets; do
  work="target/fuzz/corpus/$t"
  artifacts="target/fuzz/artifacts/$t"
  mkdir -p "$work" "$artifacts"
  echo "== fuzz $t for ${secs}s"
  if ! "$CARGO_TARGET_DIR/$triple/release/$t" -max_total_time="$secs" -timeout=10 \
      -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 -artifact_prefix="$artifacts/" \
      "$work" "fuzz/corpus/$t" 2>"target/fuzz/$t.log"; then
    tail -n 60 "target/fuzz/$t.log"
    for crash in "$artifacts"/*; do
      [ -f "$crash" ] || continue
      echo "fuzz $t: crashing input $crash (base64):"
      base64 "$crash"
    done
    status=1
  else
    grep -E "^(stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb)" \
      "target/fuzz/$t.log" | sed "s/^/  $t /"
  fi
done
exit $status
