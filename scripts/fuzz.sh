#!/usr/bin/env bash
# Bounded fuzzing of mqseal's cargo-fuzz targets (fuzz/): envelope decoding
# and verification in both modes (device and controller ends, and the
# no_std agent), and the broker's packet and authorization layer.
#
#   ./scripts/fuzz.sh                         every target, 60 s each, side by side
#   MQSEAL_FUZZ_SECONDS=600 ./scripts/fuzz.sh longer
#   ./scripts/fuzz.sh broker_packets          one target
#
# Needs the nightly toolchain and cargo-fuzz (scripts/test.sh installs
# both). Each target starts from the committed seed corpus (fuzz/corpus/,
# read-only here) and writes what it learns and any crash under
# .test-run/fuzz/. A crash fails the script and names the input that
# reproduces it; fix the bug, then add that input to a regression test.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
secs=${MQSEAL_FUZZ_SECONDS:-60}
work="$root/.test-run/fuzz"
all=(envelope_challenge envelope_sealed broker_packets)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
rustup toolchain list | grep -q '^nightly' || die "the nightly toolchain is missing (rustup toolchain install nightly --profile minimal)"
command -v cargo-fuzz >/dev/null 2>&1 || die "cargo-fuzz is missing (cargo install cargo-fuzz --locked)"

cd "$root/fuzz"
# No sanitizer: every crate of ours is forbid(unsafe_code); coverage
# guidance, debug assertions and overflow checks stay on.
flags=(-O -s none)
echo "fuzz: building ${targets[*]}"
cargo +nightly fuzz build "${flags[@]}" 2>&1 | tail -n 1
# The targets run side by side, each for the full time: on two cores each
# gets most of one, and the step takes one period instead of three.
run_target() { # target
  local t=$1
  mkdir -p "$work/$t/corpus" "$work/$t/crashes"
  cargo +nightly fuzz run "${flags[@]}" "$t" "$work/$t/corpus" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$work/$t/crashes/" >"$work/$t/log" 2>&1
}
declare -A pid
for t in "${targets[@]}"; do
  run_target "$t" &
  pid[$t]=$!
done
failed=()
for t in "${targets[@]}"; do
  log="$work/$t/log"
  if ! wait "${pid[$t]}"; then
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" >&2 || tail -n 30 "$log" >&2
    echo "error: $t found a failing input (in $work/$t/crashes/; reproduce: cd fuzz && cargo +nightly fuzz run ${flags[*]} $t <input>)" >&2
    failed+=("$t")
    continue
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  cov=$(grep -E '^#[0-9]+.*DONE' "$log" | sed -n 's/.*cov: \([0-9]*\) ft: \([0-9]*\) corp: \([0-9]*\).*/cov \1, features \2, corpus \3/p')
  echo "fuzz: $t: ${runs:-?} inputs in ${secs} s (${rate:-?}/s), no failure; $cov"
done
[ ${#failed[@]} -eq 0 ] || die "fuzzing failed: ${failed[*]}"
