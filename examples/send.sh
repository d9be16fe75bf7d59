#!/usr/bin/env bash
# Send one command to one device from a shell script, and act on the outcome
# by mqseal's exit code (README, "Exit codes").
#
#   examples/send.sh DEVICE COMMAND [ARG ...]
#
# Needs `mqseal` on PATH and a controller config (./mqseal.toml, or
# MQSEAL_CONFIG=path). Prints "DEVICE: OUTPUT" when the device ran it.
set -uo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 DEVICE COMMAND [ARG ...]" >&2
  exit 2
fi
device=$1
shift

# `--` ends the options: an argument for the device that starts with `-`
# is not taken for one of mqseal's.
output=$(mqseal send --timeout 5s -- "$device" "$@")
rc=$?
case $rc in
  0) echo "$device: $output" ;;
  3) echo "$device refused the command or it failed" >&2 ;;
  4) echo "$device did not answer in time (offline, or the command was lost); it ran at most once" >&2 ;;
  5) echo "cannot reach the broker, or the login was refused" >&2 ;;
  *) echo "mqseal failed (exit $rc)" >&2 ;;
esac
exit $rc
