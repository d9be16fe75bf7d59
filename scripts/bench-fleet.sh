#!/usr/bin/env bash
# Fleet figures of docs/BENCHMARKS.md ("Fleet"), with Mosquitto in the same
# sitting and the same load generator:
#
# 1. fleet: the first broadcast to FLEET devices (`mqseal-bench fleet`, the
#    real `mqseal broadcast` CLI), connect to last answer.
# 2. soak: FLEET devices, RATE commands/s for DURATION s after WARMUP
#    flat-out rounds; broker RSS sampled, every command counted.
# 3. storm: three 10,000-connection storms at 2,000/s on one broker (idle
#    KiB per connection, and whether RSS comes back), on the file store —
#    bench.sh runs the same storms on the MongoDB store.
#
# Brokers, each started fresh: mqseal-broker on its file store with its
# default durable persistence (every device is a persistent session, so
# each command's PUBACK waits for the disk), and Mosquitto with a password
# file and the equivalent ACL, `persistence false` as in bench.sh.
#
#   ./scripts/bench-fleet.sh            # RUNS=1, FLEET=10000, RATE=500, DURATION=60, WARMUP=100
#   SCENARIOS=fleet ./scripts/bench-fleet.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
runs=${RUNS:-1}
fleet=${FLEET:-10000}
rate=${RATE:-500}
duration=${DURATION:-60}
warmup=${WARMUP:-100}
scenarios=${SCENARIOS:-"fleet soak storm"}
out="$root/target/bench"
mkdir -p "$out"
results="$out/fleet.jsonl"
: >"$results"
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
[ -x .venv/bin/python ] || die "run ./scripts/test.sh once first (it creates .venv)"
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$mosquitto" ] || die "mosquitto is not installed (./scripts/test.sh installs it)"
cargo build --release --locked -p mqseal-broker -p mqseal-bench -p mqseal-controller
bench="$root/target/release/mqseal-bench"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"
mkdir -p "$work/data" "$work/mosq"
"$bench" provision --devices "$fleet" --users-file "$work/data/users.json" --mosquitto-dir "$work/mosq" >/dev/null
cp "$work/mosq/passwd.txt" "$work/mosq/passwd"
mosquitto_passwd -U "$work/mosq/passwd"
chmod 644 "$work/mosq/passwd" "$work/mosq/acl"
chmod 755 "$work" "$work/mosq"
port=$(free_port)
cat >"$work/broker.toml" <<CONF
data_dir = "$work/data"
[listener]
bind = "127.0.0.1:$port"
[limits]
max_connections = 30000
CONF
cat >"$work/mosq.conf" <<CONF
listener $port 127.0.0.1
persistence false
allow_anonymous false
password_file $work/mosq/passwd
acl_file $work/mosq/acl
max_inflight_messages 100
max_queued_messages 0
log_dest none
CONF
start() { # broker
  case "$1" in
    mqseal)
      rm -f "$work/data/router.redb"
      "$root/target/release/mqseal-broker" --config "$work/broker.toml" >"$work/broker.out" 2>"$work/broker.log" & ;;
    mosquitto) "$mosquitto" -c "$work/mosq.conf" >/dev/null 2>&1 & ;;
  esac
  pid=$!
  wait_port "$port" || die "$1 did not start"
}
stop() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; }
run() { # broker args...
  local name=$1; shift
  if "$bench" "$@" --port "$port" --label "$name" >>"$results" 2>"$work/last.err"; then tail -n 2 "$work/last.err";
  else echo "[$name] $* failed: $(tail -n 3 "$work/last.err")" >&2; fi
}
# BROKERS="mqseal" runs one side only (the other from an earlier sitting).
read -r -a brokers <<<"${BROKERS:-mqseal mosquitto}"
for round in $(seq "$runs"); do
  shift_by=$(( (round - 1) % ${#brokers[@]} ))
  order=("${brokers[@]:$shift_by}" "${brokers[@]:0:$shift_by}")
  echo "== round $round: ${order[*]}"
  for name in "${order[@]}"; do
    for s in $scenarios; do
      start "$name"
      sleep 0.5
      case "$s" in
        fleet) run "$name" fleet --devices "$fleet" --mode challenge --mqseal "$root/target/release/mqseal" ;;
        soak) run "$name" soak --devices "$fleet" --rate "$rate" --duration-secs "$duration" \
                --warmup-rounds "$warmup" --broker-pid "$pid" ;;
        storm)
          for storm in 1 2 3; do
            run "$name/storm$storm" connections --count 10000 --rate 2000 --hold-secs 5 --settle-secs 20 --broker-pid "$pid"
          done ;;
      esac
      stop
    done
  done
done
echo "raw results: $results"
