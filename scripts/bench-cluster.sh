#!/usr/bin/env bash
# Commands per second across a RabbitMQ cluster (docs/SCALING.md, "What
# was run here"): a two-node RabbitMQ 3.10 cluster on loopback (as
# tests/src/rabbitmq.rs starts it), FLEET simulated devices (the real agent
# core each) connected to node 0, and `mqseal broadcast noop --all` run
# against node 1 — every command and answer crosses the cluster — then the
# same with the controller on node 0, and against one mqseal-broker, all in
# the same sitting.
#
#   ./scripts/bench-cluster.sh          # RUNS=3 rounds, FLEET=2000 devices
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
runs=${RUNS:-3}
fleet=${FLEET:-2000}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
[ -x .venv/bin/python ] || die "run ./scripts/test.sh once first (it creates .venv and installs rabbitmq-server)"
sbin=/usr/lib/rabbitmq/bin
[ -x "$sbin/rabbitmq-server" ] || die "rabbitmq-server is not installed (./scripts/test.sh installs it)"
cargo build --release --locked -p mqseal-broker -p mqseal-bench -p mqseal-controller
bench="$root/target/release/mqseal-bench"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do /bin/kill -9 -- "-$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/home"
head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/home/.erlang.cookie"
chmod 400 "$work/home/.erlang.cookie"
epmd_port=$(free_port)
export HOME="$work/home" ERL_EPMD_PORT="$epmd_port" ERL_EPMD_ADDRESS=127.0.0.1
setsid epmd -port "$epmd_port" -address 127.0.0.1 >"$work/epmd.log" 2>&1 &
pids+=($!)
declare -a mqtt names
node_env() { # index
  local d="$work/node$1"
  export RABBITMQ_NODENAME="${names[$1]}" RABBITMQ_NODE_PORT="${amqp[$1]}" RABBITMQ_DIST_PORT="${dist[$1]}"
  export RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log"
  export RABBITMQ_PID_FILE="$d/pid" RABBITMQ_PLUGINS_EXPAND_DIR="$d/plugins-expand" RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf"
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}
ctl() { local i=$1; shift; (node_env "$i"; "$sbin/rabbitmqctl" -n "${names[$i]}" --timeout 60 "$@"); }
declare -a amqp dist
for i in 0 1; do
  names[i]="mqseal-bench-$$-$i@localhost"; mqtt[i]=$(free_port); amqp[i]=$(free_port); dist[i]=$(free_port)
  d="$work/node$i"; mkdir -p "$d"
  printf 'listeners.tcp.default = 127.0.0.1:%s\nmqtt.listeners.tcp.default = 127.0.0.1:%s\nmqtt.allow_anonymous = false\nloopback_users = none\n' \
    "${amqp[i]}" "${mqtt[i]}" >"$d/rabbitmq.conf"
  echo '[rabbitmq_mqtt].' >"$d/enabled_plugins"; echo '[].' >"$d/advanced.config"; : >"$d/rabbitmq-env.conf"
  (node_env "$i"; setsid "$sbin/rabbitmq-server" >"$d/server.out" 2>&1 &
   echo $! >"$d/group")
  pids+=("$(cat "$d/group")")
done
for i in 0 1; do
  for _ in $(seq 240); do ctl "$i" await_startup --timeout 10 >/dev/null 2>&1 && break; sleep 0.5; done
  ctl "$i" await_startup --timeout 10 >/dev/null 2>&1 || die "node $i did not start: $(tail -5 "$work/node$i/server.out")"
done
ctl 1 stop_app >/dev/null; ctl 1 join_cluster "${names[0]}" >/dev/null; ctl 1 start_app >/dev/null
ctl 0 delete_user guest >/dev/null
echo "cluster: ${names[*]}, MQTT on ${mqtt[*]}"

"$bench" provision --devices "$fleet" --rabbitmq-definitions "$work/defs.json" >/dev/null
ctl 0 import_definitions "$work/defs.json" >/dev/null

mkdir -p "$work/data"
"$bench" provision --devices "$fleet" --users-file "$work/data/users.json" >/dev/null
port=$(free_port)
printf 'data_dir = "%s/data"\n[listener]\nbind = "127.0.0.1:%s"\n[limits]\nmax_connections = 30000\n' "$work" "$port" >"$work/broker.toml"
setsid "$root/target/release/mqseal-broker" --config "$work/broker.toml" >"$work/broker.out" 2>"$work/broker.log" &
pids+=($!)
wait_port "$port" || die "mqseal-broker did not start"

out="$root/target/bench"; mkdir -p "$out"; results="$out/cluster.jsonl"; : >"$results"
run() { # label devices-port controller-port
  if "$bench" fleet --devices "$fleet" --mode challenge --port "$2" --controller-port "$3" \
       --mqseal "$root/target/release/mqseal" --label "$1" >>"$results" 2>"$work/last.err"; then tail -n 1 "$work/last.err";
  else echo "$1 failed: $(tail -n 3 "$work/last.err")" >&2; fi
}
for round in $(seq "$runs"); do
  echo "== round $round"
  run "rabbitmq, devices on node 0, controller on node 1" "${mqtt[0]}" "${mqtt[1]}"
  run "rabbitmq, devices and controller on node 0" "${mqtt[0]}" "${mqtt[0]}"
  run "mqseal-broker (one node)" "$port" "$port"
done
.venv/bin/python - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for label in dict.fromkeys(r["label"] for r in rows):
    rs = [r for r in rows if r["label"] == label]
    walls = [r["wall_ms"] for r in rs if r.get("wall_ms")]
    ok = [r["summary"].get("ok", 0) for r in rs]
    if walls:
        med = statistics.median(walls)
        print(f"{label}: answered {ok}, broadcast wall median {med:.0f} ms ({min(walls)}-{max(walls)}), "
              f"{rs[0]['devices'] / (med / 1000):.0f} commands/s")
PY
