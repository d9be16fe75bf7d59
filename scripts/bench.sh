#!/usr/bin/env bash
# The broker benchmarks of docs/BENCHMARKS.md: mqseal-broker (MongoDB store,
# authentication and ACL on) next to Debian's Mosquitto (password file and
# an equivalent ACL file, with and without set_tcp_nodelay) in the same run,
# with the same load generator (mqseal-bench), brokers in rotated order.
#
#   ./scripts/bench.sh                 3 rounds (RUNS=n to change)
#   SCENARIOS="latency" ./scripts/bench.sh
#
# Needs what ./scripts/test.sh installs (mosquitto, the .venv with
# SecantusDB). Prints a table of medians; raw results go to
# target/bench/results.jsonl.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
runs=${RUNS:-3}
scenarios=${SCENARIOS:-"throughput1 throughput0 durable1 fanout latency connections"}
out="$root/target/bench"
mkdir -p "$out"
results="$out/results.jsonl"
: >"$results"

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
[ -x .venv/bin/secantusd-py ] || die "run ./scripts/test.sh once first (it creates .venv with SecantusDB)"
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || die "mosquitto is not installed (./scripts/test.sh installs it)"
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)

cargo build --release --locked -p mqseal-broker -p mqseal-bench
broker_bin="$root/target/release/mqseal-broker"
bench="$root/target/release/mqseal-bench"

# 10,000 connections per broker plus the load generator's own sockets.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"

mongo_port=$(free_port)
.venv/bin/secantusd-py --host 127.0.0.1 --port "$mongo_port" --storage-path :memory: --log-level WARNING \
  >"$work/secantusd.log" 2>&1 &
pids+=($!)
wait_port "$mongo_port" || die "SecantusDB did not start"
mongo_uri="mongodb://127.0.0.1:$mongo_port/"

"$bench" provision --devices 10000 --mongodb-uri "$mongo_uri" --database bench --mosquitto-dir "$work/mosq" >/dev/null
cp "$work/mosq/passwd.txt" "$work/mosq/passwd"
mosquitto_passwd -U "$work/mosq/passwd"
# Mosquitto drops privileges to its own user and must still read these.
chmod 644 "$work/mosq/passwd" "$work/mosq/acl"
chmod 755 "$work" "$work/mosq"

mqseal_port=$(free_port)
mkdir -p "$work/mqseal"
cat >"$work/mqseal/broker.toml" <<EOF
data_dir = "$work/mqseal/data"
[listener]
bind = "127.0.0.1:$mqseal_port"
[limits]
max_connections = 20000
[store]
kind = "mongodb"
mongodb_uri = "$mongo_uri"
database = "bench"
# The default session bounds hold a 100,000-message burst for a lagging
# subscriber (Mosquitto below runs with max_queued_messages 0): the
# comparison is lossless on both sides.
EOF

mosq_conf() { # port nodelay [persist]
  cat <<EOF
listener $1 127.0.0.1
persistence ${3:-false}
persistence_location $work/mosq-data/
allow_anonymous false
password_file $work/mosq/passwd
acl_file $work/mosq/acl
max_inflight_messages 100
max_queued_messages 0
log_dest none
EOF
  if [ "$2" = yes ]; then echo "set_tcp_nodelay true"; fi
}
mosq_port=$(free_port)
mosq_nd_port=$(free_port)
mosq_conf "$mosq_port" no >"$work/mosq.conf"
mosq_conf "$mosq_nd_port" yes >"$work/mosq-nodelay.conf"
# For durable1: Mosquitto's own persistence (snapshots on its autosave
# interval and at shutdown; it never waits for the disk before a PUBACK).
mosq_persist_port=$(free_port)
mkdir -p "$work/mosq-data"
chmod 777 "$work/mosq-data"
mosq_conf "$mosq_persist_port" yes true >"$work/mosq-persist.conf"

# start_broker NAME -> sets PORT and PID
start_broker() {
  case "$1" in
    mqseal)
      # No state from an earlier scenario: durable1 leaves persistent
      # sessions that would otherwise be restored and receive everything.
      rm -f "$work/mqseal/data/router.redb"
      "$broker_bin" --config "$work/mqseal/broker.toml" >"$work/mqseal.out" 2>"$work/mqseal.log" &
      PID=$!; PORT=$mqseal_port ;;
    mosquitto)
      "$mosquitto" -c "$work/mosq.conf" >/dev/null 2>&1 &
      PID=$!; PORT=$mosq_port ;;
    mosquitto-nodelay)
      "$mosquitto" -c "$work/mosq-nodelay.conf" >/dev/null 2>&1 &
      PID=$!; PORT=$mosq_nd_port ;;
    mosquitto-persist)
      "$mosquitto" -c "$work/mosq-persist.conf" >/dev/null 2>&1 &
      PID=$!; PORT=$mosq_persist_port ;;
  esac
  pids+=("$PID")
  wait_port "$PORT" || die "$1 did not start"
}
stop_broker() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }

run() { # broker scenario args...
  local name=$1; shift
  if "$bench" "$@" --port "$PORT" --label "$name" >>"$results" 2>"$work/last.err"; then
    tail -n 1 "$work/last.err"
  else
    echo "[$name] $* failed: $(tail -n 3 "$work/last.err")" >&2
  fi
}

brokers=(mqseal mosquitto mosquitto-nodelay)
for round in $(seq "$runs"); do
  # What the router core itself costs: two passes through mqseal's router
  # with no socket at all.
  "$bench" router-hops --round-trips 5000 >>"$results" 2>"$work/last.err" && tail -n 1 "$work/last.err"
  # Rotate the order each round: the machine warms up and cools down.
  shift_by=$(( (round - 1) % ${#brokers[@]} ))
  order=("${brokers[@]:$shift_by}" "${brokers[@]:0:$shift_by}")
  echo "== round $round: ${order[*]}"
  for name in "${order[@]}"; do
    for s in $scenarios; do
      # Every scenario on a freshly started broker: connection-storm RSS is
      # measured from a clean start, and no scenario inherits another's state.
      start_broker "$name"
      sleep 0.5
      case "$s" in
        throughput1) run "$name" throughput --qos 1 --publishers 4 --subscribers 4 --messages 100000 --payload 256 ;;
        throughput0) run "$name" throughput --qos 0 --publishers 4 --subscribers 4 --messages 100000 --payload 256 ;;
        durable1)
          # QoS 1 to persistent sessions: mqseal in its default durable
          # mode (every PUBACK after the commit), Mosquitto with
          # `persistence true`.
          case "$name" in
            mqseal) run "$name" throughput --qos 1 --publishers 4 --subscribers 4 --messages 100000 --payload 256 --persistent ;;
            mosquitto)
              stop_broker; start_broker mosquitto-persist; sleep 0.5
              run mosquitto-persist throughput --qos 1 --publishers 4 --subscribers 4 --messages 100000 --payload 256 --persistent ;;
          esac ;;
        fanout) run "$name" fanout --qos 0 --subscribers 1000 --messages 1000 --payload 64 ;;
        latency)
          # Mosquitto without nodelay waits ~40 ms per delayed ACK: a few
          # hundred round trips show it.
          if [ "$name" = mosquitto ]; then n=300; else n=5000; fi
          run "$name" latency --qos 1 --round-trips "$n" ;;
        connections)
          # Three storms on the same broker: the first from a clean start
          # (KiB per connection), the next two show whether memory comes
          # back to the same level or keeps growing.
          for storm in 1 2 3; do
            "$bench" connections --port "$PORT" --label "$name/storm$storm" --count 10000 --rate 2000 \
              --hold-secs 5 --settle-secs 20 --broker-pid "$PID" >>"$results" 2>"$work/last.err" \
              && tail -n 1 "$work/last.err" || echo "[$name] storm $storm failed: $(tail -n 3 "$work/last.err")" >&2
          done ;;
      esac
      stop_broker
    done
  done
done

.venv/bin/python - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(xs): return statistics.median(xs) if xs else float("nan")
groups = {}
for r in rows:
    scenario = r["scenario"] + ("/persistent" if r.get("persistent") else "")
    key = (scenario, r.get("qos"), r["label"])
    groups.setdefault(key, []).append(r)
print(f"\n{'scenario':<22}{'qos':>4}  {'broker':<18}{'n':>3}  median (min-max)")
for (scenario, qos, label), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
    if scenario in ("throughput", "throughput/persistent", "fanout"):
        xs = [r["received_per_sec"] for r in rs]
        lost = sum(r["expected"] - r["received"] for r in rs)
        text = f"{med(xs):,.0f} msg/s ({min(xs):,.0f}-{max(xs):,.0f}), lost {lost}"
    elif scenario == "latency":
        p50 = [r["p50_us"] for r in rs]; p99 = [r["p99_us"] for r in rs]
        text = f"p50 {med(p50):.0f} us ({min(p50)}-{max(p50)}), p99 {med(p99):.0f} us ({min(p99)}-{max(p99)})"
    elif scenario == "router_hops":
        p50 = [r["p50_ns"] for r in rs]; p99 = [r["p99_ns"] for r in rs]
        text = f"p50 {med(p50):.0f} ns ({min(p50)}-{max(p50)}), p99 {med(p99):.0f} ns ({min(p99)}-{max(p99)})"
    elif scenario == "connections":
        kib = [r["kib_per_connection"] for r in rs if r["kib_per_connection"] is not None]
        storm = [r["storm_secs"] for r in rs]
        failed = sum(r["failed"] for r in rs)
        back = [100.0 * (r["rss_after_kib"] - r["rss_before_kib"]) / r["rss_before_kib"] for r in rs if r["rss_before_kib"]]
        text = (f"{med(kib):.2f} KiB/conn ({min(kib):.2f}-{max(kib):.2f}), storm {med(storm):.2f}s, failed {failed}, "
                f"RSS before {med([r['rss_before_kib'] for r in rs]) / 1024:.1f} MiB, "
                f"during {med([r['rss_during_kib'] for r in rs]) / 1024:.1f} MiB, "
                f"after {med([r['rss_after_kib'] for r in rs]) / 1024:.1f} MiB ({med(back):+.0f}%)")
    else:
        continue
    print(f"{scenario:<22}{str(qos):>4}  {label:<18}{len(rs):>3}  {text}")
PY
