#!/usr/bin/env bash
# Command benchmarks through mqseal-broker (docs/BENCHMARKS.md, "Commands").
#
#   ./scripts/bench-commands.sh            # RUNS=3 rounds, FLEET=10000 devices
#
# 1. command-rtt: send -> verify -> execute noop -> response verified, one
#    device, for plain MQTT request/response (the yardstick), challenge mode
#    (fresh challenge, and prefetched), sealed mode (3072-bit), and sealed
#    with the agent's replay state fsync'd to disk. Modes rotate each round.
# 2. fleet: FLEET simulated devices in one process (the agent core each),
#    and `mqseal broadcast noop --all` as its own process: its wall and CPU
#    time are the controller's part. Challenge mode for FLEET devices, and
#    sealed mode (3072-bit) for SEALED_FLEET of them.
# 3. job: `mqseal job run noop --all --rate JOB_RATE/min` over the same
#    FLEET (challenge mode, with its journal and audit log): the rate
#    achieved, the controller's CPU, the journal's and audit log's cost per
#    command — next to the broadcast of step 2.
# 4. `openssl speed rsa3072` in the same sitting, for the sealed-mode budget.
#
# PARTS="rtt fleet job" (the default) picks the steps.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
runs=${RUNS:-3}
fleet=${FLEET:-10000}
sealed_fleet=${SEALED_FLEET:-1000}
rtts=${RTTS:-300}
job_rate=${JOB_RATE:-60000}
parts=" ${PARTS:-rtt fleet job} "
out="$root/target/bench"
mkdir -p "$out"
results="$out/commands.jsonl"
: >"$results"
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
[ -x .venv/bin/python ] || die "run ./scripts/test.sh once first (it creates .venv)"
cargo build --release --locked -p mqseal-broker -p mqseal-bench -p mqseal-controller
bench="$root/target/release/mqseal-bench"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"
mkdir -p "$work/data"
"$bench" provision --devices "$fleet" --users-file "$work/data/users.json" >/dev/null
port=$(free_port)
cat >"$work/broker.toml" <<CONF
data_dir = "$work/data"
[listener]
bind = "127.0.0.1:$port"
[limits]
max_connections = 30000
CONF
"$root/target/release/mqseal-broker" --config "$work/broker.toml" >"$work/broker.out" 2>"$work/broker.log" &
pid=$!
wait_port "$port" || die "mqseal-broker did not start: $(tail -5 "$work/broker.log")"

run() { if "$bench" "$@" --port "$port" --label mqseal >>"$results" 2>"$work/last.err"; then tail -n 1 "$work/last.err";
        else echo "$* failed: $(tail -n 3 "$work/last.err")" >&2; fi; }
modes=(plain challenge challenge-prefetch sealed)
for round in $(seq "$runs"); do
  [[ $parts == *" rtt "* ]] || break
  shift_by=$(( (round - 1) % ${#modes[@]} ))
  order=("${modes[@]:$shift_by}" "${modes[@]:0:$shift_by}")
  echo "== round $round: ${order[*]}"
  for m in "${order[@]}"; do run command-rtt --mode "$m" --round-trips "$rtts"; done
  mkdir -p "$work/state-$round"
  run command-rtt --mode sealed --round-trips "$rtts" --state-dir "$work/state-$round"
  run command-rtt --mode challenge-prefetch --round-trips "$rtts" --state-dir "$work/state-$round"
done
for round in $(seq "$runs"); do
  if [[ $parts == *" fleet "* ]]; then
    run fleet --devices "$fleet" --mode challenge --mqseal "$root/target/release/mqseal"
    run fleet --devices "$sealed_fleet" --mode sealed --bits 3072 --mqseal "$root/target/release/mqseal"
  fi
  if [[ $parts == *" job "* ]]; then
    run fleet --devices "$fleet" --mode challenge --job-rate "$job_rate" --timeout-secs 300 --mqseal "$root/target/release/mqseal"
  fi
done
echo "== openssl speed rsa3072 (same sitting)"
openssl speed -seconds 3 rsa3072 2>/dev/null | tail -n 2 | tee "$work/openssl.txt"
.venv/bin/python - "$results" "$work/openssl.txt" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = statistics.median
rtt = {}
for r in rows:
    if r["scenario"] == "command_rtt":
        rtt.setdefault((r["mode"], r["state"]), []).append(r)
print(f"\n{'command-rtt':<32}{'n':>3}  p50 median (min-max)      p99 median")
plain = med([r["p50_us"] for r in rtt.get(("plain", "memory"), [])] or [float("nan")])
for key, rs in sorted(rtt.items()):
    p50 = [r["p50_us"] for r in rs]; p99 = [r["p99_us"] for r in rs]
    print(f"{key[0] + ' / ' + key[1]:<32}{len(rs):>3}  {med(p50):>7.0f} us ({min(p50)}-{max(p50)})  {med(p99):>7.0f} us"
          f"   {med(p50) / plain:.2f}x plain p50, lost {sum(r['lost'] for r in rs)}")
for r in rows:
    if r["scenario"] == "fleet":
        print(f"fleet {r['mode']} {r['devices']} devices: {r['summary']}, controller wall {r['wall_ms']} ms, cpu {r['cpu_ms']} ms")
jobs = [r for r in rows if r["scenario"] == "job"]
for r in jobs:
    t = r["timing"]
    print(f"job {r['mode']} {r['devices']} devices at {r['rate_per_min']}/min: {r['counts']}, achieved {r['achieved_per_min']:.0f}/min "
          f"({(r['achieved_per_min'] / r['rate_per_min'] - 1) * 100:+.1f}%), controller cpu {t['cpu_ms']} ms, wall {t['wall_ms']} ms, "
          f"journal {r['journal_us_per_command']:.1f} us/command, audit {r['audit_us_per_command']:.1f} us/command")
if jobs:
    print(f"job medians: cpu {med([r['timing']['cpu_ms'] for r in jobs]):.0f} ms, rate error "
          f"{med([(r['achieved_per_min'] / r['rate_per_min'] - 1) * 100 for r in jobs]):+.1f}%, "
          f"journal {med([r['journal_us_per_command'] for r in jobs]):.1f} us/command, audit {med([r['audit_us_per_command'] for r in jobs]):.1f} us/command")
line = open(sys.argv[2]).read().split("\n")
print("openssl:", " | ".join(l.strip() for l in line if l.strip()))
PY
