# Shared by the benchmark scripts (sourced, not run): free loopback ports,
# waiting for a listener, and fresh random credentials for the bench users.
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
MQSEAL_BENCH_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
MQSEAL_BENCH_CONTROLLER_PASSWORD=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
export MQSEAL_BENCH_SECRET MQSEAL_BENCH_CONTROLLER_PASSWORD
