#!/usr/bin/env bash
# mqseal's one test command (see README). On a fresh Debian 12 machine it
# installs what the tests need, starts the servers they talk to, runs every
# check, and stops what it started. Every install step is idempotent.
#
#   ./scripts/test.sh            everything
#   MQSEAL_KEEP_LOGS=1 ...       keep .test-run/ logs after a successful run
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
run_dir="$root/.test-run"
venv="$root/.venv"
mkdir -p "$run_dir"

step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nerror: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

# --- Debian packages: Mosquitto and its clients, RabbitMQ ---------------------
# rabbitmq-server (3.10, with its MQTT plugin) is the clustered broker of
# tests/e2e/cluster.rs; procps gives the /bin/kill its harness uses.
step "Debian packages"
missing=()
for pkg in mosquitto mosquitto-clients rabbitmq-server procps; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y -q "${missing[@]}" >"$run_dir/apt.log" 2>&1 \
    || { as_root apt-get update -q >>"$run_dir/apt.log" 2>&1 && as_root apt-get install -y -q "${missing[@]}" >>"$run_dir/apt.log" 2>&1; } \
    || { tail -n 20 "$run_dir/apt.log" >&2; die "apt-get could not install ${missing[*]} (log: $run_dir/apt.log)"; }
  # The package enables a system broker on port 1883 where systemd runs; the
  # tests start their own brokers, and 1883 belongs to mqseal-broker.
  if [ -d /run/systemd/system ] && systemctl is-active --quiet mosquitto 2>/dev/null; then
    echo "stopping and disabling the packaged mosquitto service (it holds port 1883)"
    as_root systemctl disable --now mosquitto || true
  fi
  # Likewise RabbitMQ's (ports 5672, 25672 and epmd's 4369): the tests run
  # their own two-node cluster on ports of their own.
  if [ -d /run/systemd/system ] && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
    echo "stopping and disabling the packaged rabbitmq-server service"
    as_root systemctl disable --now rabbitmq-server || true
  fi
fi
# QEMU for the microcontroller images (no GUI or audio extras).
if ! dpkg-query -W -f='${Status}' qemu-system-arm 2>/dev/null | grep -q "install ok installed"; then
  echo "installing qemu-system-arm"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y -q --no-install-recommends qemu-system-arm >>"$run_dir/apt.log" 2>&1 \
    || { as_root apt-get update -q >>"$run_dir/apt.log" 2>&1 && as_root apt-get install -y -q --no-install-recommends qemu-system-arm >>"$run_dir/apt.log" 2>&1; } \
    || { tail -n 20 "$run_dir/apt.log" >&2; die "apt-get could not install qemu-system-arm (log: $run_dir/apt.log)"; }
fi
command -v qemu-system-arm >/dev/null 2>&1 || die "qemu-system-arm is still missing after installation"
echo "qemu: $(qemu-system-arm --version | head -n 1)"
for prog in mosquitto mosquitto_pub mosquitto_sub; do
  command -v "$prog" >/dev/null 2>&1 || [ -x "/usr/sbin/$prog" ] || die "$prog is still missing after installation"
done
echo "mosquitto: $( (/usr/sbin/mosquitto -h 2>/dev/null || true) | head -n 1)"
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || die "rabbitmq-server is still missing after installation"
echo "rabbitmq: $(dpkg-query -W -f='${Version}' rabbitmq-server)"

# --- Rust targets -------------------------------------------------------------
step "Rust targets"
command -v cargo >/dev/null 2>&1 || die "cargo is not installed (https://rustup.rs)"
for target in thumbv7em-none-eabihf thumbv6m-none-eabi; do
  if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target" || die "rustup could not add $target"
  fi
  echo "$target: installed"
done
# Nightly and cargo-fuzz, for the bounded fuzzing step.
if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal || die "rustup could not install the nightly toolchain"
fi
echo "nightly: $(rustup run nightly rustc --version)"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2 >"$run_dir/cargo-fuzz.log" 2>&1 \
    || { tail -n 20 "$run_dir/cargo-fuzz.log" >&2; die "cargo install cargo-fuzz failed (log: $run_dir/cargo-fuzz.log)"; }
fi
echo "cargo-fuzz: $(cargo fuzz --version)"
# llvm-size, for the firmware footprint.
if ! rustup component list --installed | grep -q '^llvm-tools'; then
  rustup component add llvm-tools || die "rustup could not add llvm-tools"
fi
echo "llvm-tools: installed"

# --- Python venv: SecantusDB and paho-mqtt ------------------------------------
step "Python venv ($venv)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
fi
if ! "$venv/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m, pathlib
want = {}
for line in pathlib.Path("tests/requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        want[name] = version
assert all(m.version(n) == v for n, v in want.items())
PY
then
  "$venv/bin/python" -m pip install -q -r tests/requirements.txt || die "pip could not install tests/requirements.txt"
fi
[ -x "$venv/bin/secantusd-py" ] || die "secantusd-py missing from $venv after installing SecantusDB"
"$venv/bin/python" -m pip list 2>/dev/null | grep -i -E "^(secantusdb|paho-mqtt) " || true

# --- Servers: SecantusDB on a free port ---------------------------------------
step "Starting SecantusDB"
pids=()
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  if [ "$rc" -ne 0 ]; then
    echo "logs of this run: $run_dir" >&2
  elif [ -z "${MQSEAL_KEEP_LOGS:-}" ]; then
    rm -rf "$run_dir"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { # port seconds
  local i
  for i in $(seq $(( $2 * 10 ))); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

mongo_port=$(free_port)
"$venv/bin/secantusd-py" --host 127.0.0.1 --port "$mongo_port" --storage-path :memory: --log-level WARNING \
  >"$run_dir/secantusd.log" 2>&1 &
pids+=($!)
wait_port "$mongo_port" 30 || { cat "$run_dir/secantusd.log" >&2; die "SecantusDB did not listen on 127.0.0.1:$mongo_port within 30 s"; }
echo "SecantusDB on 127.0.0.1:$mongo_port (pid ${pids[0]})"
export MQSEAL_TEST_MONGODB_URI="mongodb://127.0.0.1:$mongo_port/?serverSelectionTimeoutMS=5000"
export MQSEAL_TEST_PYTHON="$venv/bin/python"

# --- Checks -------------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build --bins (the end-to-end tests run the real binaries)"
cargo build --workspace --bins --locked

step "cargo test"
cargo test --workspace --locked

step "cargo doc (broken links and missing docs are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "proto and the mcu agent on thumbv7em-none-eabihf: challenge path without alloc, and sealed mode on the rsa crate"
cargo build -p mqseal-proto --locked --target thumbv7em-none-eabihf --no-default-features
cargo build -p mqseal-proto --locked --target thumbv7em-none-eabihf --no-default-features --features sealed,rustcrypto
cargo build -p mqseal-mcu-agent --locked --target thumbv7em-none-eabihf
cargo build -p mqseal-mcu-agent --locked --target thumbv7em-none-eabihf --features sealed
cargo build -p mqseal-mcu-agent --locked --target thumbv6m-none-eabi

step "firmware under QEMU (test vectors, the agent) and its footprint"
./scripts/firmware.sh

step "fuzzing: ${MQSEAL_FUZZ_SECONDS:-60} s per target (MQSEAL_FUZZ_SECONDS)"
./scripts/fuzz.sh

step "all checks passed"
