#!/usr/bin/env bash
# The microcontroller agent on Cortex-M: builds the firmware images of
# device-agent/mcu/firmware for both targets (thumbv7em-none-eabihf, the
# Cortex-M4F of QEMU's mps2-an386; thumbv6m-none-eabi, the Cortex-M0 of the
# micro:bit), runs the test-vector and agent images under qemu-system-arm
# with a timeout, and prints the footprint: flash and RAM of (a) the
# verification core alone and (b) the whole challenge-mode agent with its
# MQTT client, plus the peak stacks measured in QEMU — and fails when one of
# the budgets of the seed's device class is exceeded (BUDGET_* below), so a
# change cannot grow the images unnoticed.
#
#   ./scripts/firmware.sh          checks, runs, prints the footprint and the budgets
#
# Needs: the two rustup targets, rustup's llvm-tools (llvm-size), Debian's
# qemu-system-arm. scripts/test.sh installs them; run alone, this script
# says what is missing.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
fw="$root/device-agent/mcu/firmware"
out="$root/target/firmware"
targets=(thumbv7em-none-eabihf thumbv6m-none-eabi)

die() { printf 'error: %s\n' "$*" >&2; exit 1; }

for t in "${targets[@]}"; do
  rustup target list --installed | grep -qx "$t" || die "rust target $t is missing (rustup target add $t)"
done
command -v qemu-system-arm >/dev/null 2>&1 || die "qemu-system-arm is missing (Debian: apt-get install qemu-system-arm)"
llvm_size="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-size"
[ -x "$llvm_size" ] || die "llvm-size is missing (rustup component add llvm-tools)"

board() { case "$1" in thumbv6m-*) echo microbit ;; *) echo mps2-an386 ;; esac; }

# Runs an image under QEMU; the image reports through semihosting and its
# exit code. 60 s is two orders of magnitude above what a run takes.
qemu() { # target image
  timeout 60 qemu-system-arm -machine "$(board "$1")" -nographic \
    -semihosting-config enable=on,target=native -kernel "$out/$1/release/$2"
}

cd "$fw"
echo "firmware: cargo fmt --check"
cargo fmt --check
declare -A stacks
for t in "${targets[@]}"; do
  echo "firmware: $t: clippy -D warnings, release build"
  cargo clippy -q --locked --release --target "$t" --features semihosting --bins -- -D warnings
  cargo build -q --locked --release --target "$t" --features semihosting --bins
  for image in vectors agent; do
    if ! line=$(qemu "$t" "$image" 2>&1); then
      printf '%s\n' "$line" >&2
      die "$image on $(board "$t") ($t) failed"
    fi
    line=$(printf '%s\n' "$line" | grep -v '^Timer with period zero' | tail -n 1)
    echo "  qemu: $line"
  done
  stacks[$t]=$line
done

# llvm-size's Berkeley format: text (vector table, code, rodata), data, bss.
size_of() { "$llvm_size" "$out/$1/release/$2" | awk 'NR==2 { print $1, $2, $3 }'; }
stack_of() { printf '%s\n' "${stacks[$1]}" | sed -n "s/.*$2 \([0-9]*\) B.*/\1/p"; }
# What the caller of Agent::handle holds, as the agent image reports it.
held_of() { printf '%s\n' "${stacks[$1]}" | sed -n 's/.*(+ Agent \([0-9]*\) B and envelope \([0-9]*\) B.*/\1 \2/p'; }

echo
echo "footprint (release: opt-level z, LTO, 1 codegen unit, panic=abort; bytes)"
printf '%-22s %-34s %8s %6s %6s %14s %11s\n' target image text data bss "text - empty" "peak stack"
for t in "${targets[@]}"; do
  read -r et _ _ < <(size_of "$t" size-empty)
  for image in size-empty size-minimq size-core size-agent; do
    read -r text data bss < <(size_of "$t" "$image")
    case "$image" in
      size-empty) what="empty (cortex-m-rt + panic-halt)"; stack="-" ;;
      size-minimq) what="reference: minimq alone"; stack="-" ;;
      size-core) what="(a) verification core"; read -r agent envelope < <(held_of "$t"); stack="$(stack_of "$t" core) + $(( agent + envelope ))" ;;
      size-agent) what="(b) agent with minimq"; stack=$(stack_of "$t" "agent with minimq") ;;
    esac
    printf '%-22s %-34s %8s %6s %6s %14s %11s\n' "$t" "$what" "$text" "$data" "$bss" "$(( text - et ))" "$stack"
  done
done
echo "peak stack of (a): deepest Agent::handle call + the Agent and envelope buffer its caller holds (sizes above)."
echo "peak stack of (b): net::serve with the agent, minimq's session and all buffers (rx, tx, envelope)."

# The budgets of the seed's device class (the Arduino design ran on a
# 32 KiB-flash part; docs/BENCHMARKS.md, "Microcontroller agent"), in bytes.
BUDGET_CORE_FLASH=8192   # (a) text - empty
BUDGET_CORE_STACK=1536   # (a) deepest Agent::handle + what its caller holds; no heap
BUDGET_AGENT_FLASH=32768 # (b) text - empty
BUDGET_AGENT_RAM=8192    # (b) data + bss + peak stack, buffers included

echo
echo "budgets (bytes)"
printf '%-22s %-44s %8s %8s  %s\n' target budget measured limit ""
over=0
check() { # target what measured limit
  local mark="ok"
  # A figure that could not be read is a failure, not a pass.
  [[ $3 =~ ^[0-9]+$ ]] || die "$1: no figure for $2 (got '$3')"
  if [ "$3" -gt "$4" ]; then mark="EXCEEDED"; over=1; fi
  printf '%-22s %-44s %8s %8s  %s\n' "$1" "$2" "$3" "$4" "$mark"
}
for t in "${targets[@]}"; do
  read -r et _ _ < <(size_of "$t" size-empty)
  read -r ct _ _ < <(size_of "$t" size-core)
  read -r at ad ab < <(size_of "$t" size-agent)
  read -r agent envelope < <(held_of "$t")
  core=$(stack_of "$t" core)
  whole=$(stack_of "$t" "agent with minimq")
  for figure in "$et" "$ct" "$at" "$ad" "$ab" "$agent" "$envelope" "$core" "$whole"; do
    [[ $figure =~ ^[0-9]+$ ]] || die "$t: a footprint figure could not be read (got '$figure')"
  done
  check "$t" "core flash" "$(( ct - et ))" "$BUDGET_CORE_FLASH"
  check "$t" "core peak stack + Agent + envelope buffer" "$(( core + agent + envelope ))" "$BUDGET_CORE_STACK"
  check "$t" "agent flash" "$(( at - et ))" "$BUDGET_AGENT_FLASH"
  check "$t" "agent RAM (static + peak stack)" "$(( ad + ab + whole ))" "$BUDGET_AGENT_RAM"
done
[ "$over" -eq 0 ] || die "a footprint budget is exceeded (above); docs/BENCHMARKS.md says where the bytes go"
