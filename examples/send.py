#!/usr/bin/env python3
"""Send a command to one device or to all of them from Python, through the
mqseal CLI's JSON output: with `--json` every run prints one document,
with an outcome per device, and exits with the documented code.

    python examples/send.py DEVICE COMMAND [ARG ...]
    python examples/send.py --all COMMAND [ARG ...]    # every registered device

Needs `mqseal` on PATH and a controller config (./mqseal.toml or
MQSEAL_CONFIG). To speak the protocol itself from Python, without the CLI,
see tests/interop/python/ (a client written from docs/PROTOCOL.md).
"""

import json
import subprocess
import sys


def mqseal(*args: str) -> tuple[int, dict]:
    """Runs `mqseal --json ARGS`; returns its exit code and its document."""
    p = subprocess.run(["mqseal", "--json", *args], capture_output=True, text=True, timeout=300)
    try:
        return p.returncode, json.loads(p.stdout)
    except json.JSONDecodeError:
        # Usage errors come from the argument parser, as text on stderr.
        sys.exit(f"mqseal {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")


def describe(result: dict) -> str:
    """One line per device: `ok: OUTPUT`, `failed`, `timed_out`, …"""
    if result["outcome"] == "timed_out":
        return f"{result['device']}: timed_out"
    if result["status"] is None:
        return f"{result['device']}: error: {result['error']}"
    line = f"{result['device']}: {result['status']}"
    return f"{line}: {result['output']}" if result["output"] else line


def main() -> int:
    args = sys.argv[1:]
    if len(args) < 2:
        print(__doc__.strip().splitlines()[4:6], file=sys.stderr)
        return 2
    if args[0] == "--all":
        code, doc = mqseal("broadcast", "--all", "--timeout", "5s", "--", *args[1:])
        if "exit_code" in doc:  # mqseal itself failed: {"error", "exit_code"}
            print(doc["error"], file=sys.stderr)
            return code
        for result in doc["results"]:
            print(describe(result))
        s = doc["summary"]
        print(f"{s['ok']} ok, {s['failed']} failed, {s['timed_out']} timed out")
        return code
    code, doc = mqseal("send", "--timeout", "5s", "--", *args)
    if "exit_code" in doc:
        print(doc["error"], file=sys.stderr)
    else:
        print(describe(doc))
    return code


if __name__ == "__main__":
    sys.exit(main())
