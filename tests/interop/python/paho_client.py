"""A scriptable paho-mqtt 2.x client for the interoperability tests: what a
user's own Python tooling does against an MQTT broker.

  python paho_client.py --port P --username U --password-file F
      [--host H] [--client-id ID] [--version 3|5] [--tls-ca CA]
      [--sub TOPIC ...] [--pub TOPIC=PAYLOAD ...] [--retain]
      [--count N] [--timeout SECONDS]

Connects, subscribes (waits for the SUBACK), publishes at QoS 1 (waits for
each PUBACK), then prints `ready` and every message as it arrives, until
`--count` messages or `--timeout`. Every event is one JSON line on stdout:

  {"event": "connack", "reason": 0}
  {"event": "suback", "reasons": [1, 135]}
  {"event": "puback", "topic": "...", "reason": 0}
  {"event": "message", "topic": "...", "payload": "...", "retain": true}

Exit code: 0, or 5 when the broker refused the connection.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time

import paho.mqtt.client as mqtt


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def code(reason) -> int:
    return reason.value if hasattr(reason, "value") else int(reason)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--username", required=True)
    p.add_argument("--password-file", required=True)
    p.add_argument("--client-id")
    p.add_argument("--version", choices=["3", "5"], default="5")
    p.add_argument("--tls-ca")
    p.add_argument("--sub", nargs="+", action="extend", default=[])
    p.add_argument("--pub", nargs="+", action="extend", default=[])
    p.add_argument("--retain", action="store_true")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args()

    password = open(a.password_file, encoding="utf-8").readline().rstrip("\r\n")
    protocol = mqtt.MQTTv5 if a.version == "5" else mqtt.MQTTv311
    client_id = a.client_id or f"{a.username}-paho-{os.urandom(3).hex()}"
    events: queue.Queue = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    c.username_pw_set(a.username, password)
    if a.tls_ca:
        c.tls_set(ca_certs=a.tls_ca)
    c.on_connect = lambda _c, _u, _f, reason, _p: events.put(("connack", code(reason)))
    c.on_subscribe = lambda _c, _u, _m, reasons, _p: events.put(("suback", [code(r) for r in reasons]))
    c.on_publish = lambda _c, _u, mid, reason, _p: events.put(("puback", (mid, code(reason))))
    c.on_message = lambda _c, _u, msg: events.put(("message", msg))
    deadline = time.monotonic() + a.timeout

    def wait(kind: str):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                emit(event="timeout", waiting_for=kind)
                sys.exit(4)
            try:
                got, value = events.get(timeout=left)
            except queue.Empty:
                continue
            if got == kind:
                return value
            if got == "message":
                report(value)

    received = 0

    def report(msg) -> None:
        nonlocal received
        received += 1
        emit(event="message", topic=msg.topic, payload=msg.payload.decode("utf-8", "replace"), retain=msg.retain)

    try:
        c.connect(a.host, a.port, keepalive=30)
    except OSError as e:
        emit(event="error", error=str(e))
        return 5
    c.loop_start()
    reason = wait("connack")
    emit(event="connack", reason=reason)
    if reason != 0:
        return 5
    if a.sub:
        c.subscribe([(t, 1) for t in a.sub])
        emit(event="suback", reasons=wait("suback"))
    for item in a.pub:
        topic, _, payload = item.partition("=")
        info = c.publish(topic, payload.encode(), qos=1, retain=a.retain)
        while True:
            mid, reason = wait("puback")
            if mid == info.mid:
                break
        emit(event="puback", topic=topic, reason=reason)
    emit(event="ready")
    while received < a.count:
        left = deadline - time.monotonic()
        if left <= 0:
            emit(event="timeout", waiting_for="message")
            break
        try:
            got, value = events.get(timeout=left)
        except queue.Empty:
            continue
        if got == "message":
            report(value)
    c.disconnect()
    c.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
