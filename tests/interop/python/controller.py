"""A controller in Python: sends one command to a device through any MQTT
broker and verifies the device's answer, with mqseal.py (written from
docs/PROTOCOL.md) and paho-mqtt 2.x.

  python controller.py --host 127.0.0.1 --port 1883 --username operator \\
      --password-file operator.pw --key controller.key.pem \\
      --device lamp-1 --device-public-key lamp-1.pub.pem --hmac-key-file lamp-1.hmac \\
      [--tls-ca ca.pem] [--mode sealed|challenge] [--hidden] [--replay] NAME [ARG ...]

Prints one JSON object: the verified outcome (`status`, `code`, `output`),
and with --replay what came back when the same command bytes were
published again (a device must not execute it twice; `mqseal-agent`
re-sends its stored receipt, which this controller must then refuse as
`unexpected_reply` because nothing is pending any more).
Exit codes: 0 answered and verified, 4 no verified answer in time,
5 broker refused or unreachable, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization

import mqseal as m


class Broker:
    """A paho client whose publishes land in a queue."""

    def __init__(self, args: argparse.Namespace):
        password = open(args.password_file, encoding="utf-8").readline().rstrip("\r\n")
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.refused: list[str] = []
        client_id = f"{args.username}-py-{os.urandom(4).hex()}"
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(args.username, password)
        if args.tls_ca:
            self.c.tls_set(ca_certs=args.tls_ca)
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, msg.payload))
        self.c.connect(args.host, args.port, keepalive=30)
        self.c.loop_start()
        if not self.connected.wait(10) or self.refused:
            raise ConnectionError(f"broker {args.host}:{args.port} refused the login: {self.refused or 'no CONNACK'}")

    def _on_connect(self, _c, _u, _flags, reason, _props):
        if reason.is_failure:
            self.refused.append(str(reason))
        self.connected.set()

    def _on_subscribe(self, _c, _u, _mid, reasons, _props):
        self.refused += [str(r) for r in reasons if r.is_failure]
        self.subscribed.set()

    def subscribe(self, topics: list[str]) -> None:
        self.subscribed.clear()
        self.c.subscribe([(t, 1) for t in topics])
        if not self.subscribed.wait(10) or self.refused:
            raise PermissionError(f"subscription refused: {self.refused or 'no SUBACK'}")

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def next(self, deadline: float) -> tuple[str, bytes] | None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return self.messages.get(timeout=left)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def fresh_header(device: str, ttl: int) -> m.Header:
    now = int(time.time())
    return m.Header(device, m.topic(device, "cmd"), os.urandom(16), now, now + ttl)


def first_answer(b: Broker, device: str, until: float, open_response):
    """The first publish on the device's response topic before `until`,
    opened by `open_response`: (outcome, None), or (None, the code it was
    rejected with), or (None, "none") when nothing came."""
    while (msg := b.next(until)) is not None:
        topic, payload = msg
        if topic != m.topic(device, "resp"):
            continue
        try:
            return open_response(payload, topic), None
        except m.Rejected as e:
            return None, e.code
    return None, "none"


def send_sealed(b: Broker, a, controller, device_key, call: m.Call, deadline: float):
    header = fresh_header(a.device, a.ttl)
    cek = os.urandom(32)
    frame = m.seal(m.SEALED_COMMAND, controller, device_key, header, call.encode(), cek=cek)
    pending = {header.msg_id: m.receipt_key(cek, header.msg_id)}
    b.publish(header.topic, frame)

    def open_response(payload: bytes, topic: str) -> m.Outcome:
        _, _, outcome = m.open_sealed_response(payload, topic, controller, a.device, device_key, pending)
        pending.clear()
        return outcome

    def answer(until: float):
        return first_answer(b, a.device, until, open_response)

    return frame, header.topic, answer(deadline)[0], answer


def send_challenge(b: Broker, a, key: bytes, call: m.Call, deadline: float):
    request_id = os.urandom(16)
    b.publish(m.topic(a.device, "chal/req"), m.challenge_request(a.device, request_id))
    challenge = None
    while challenge is None:
        msg = b.next(deadline)
        if msg is None:
            return None, None, None, None
        topic, payload = msg
        if topic == m.topic(a.device, "chal"):
            try:
                challenge, _ttl = m.read_challenge(payload, a.device, request_id)
            except m.Rejected:
                continue
    header = fresh_header(a.device, a.ttl)
    frame = m.challenge_command(key, header, challenge, call, a.hidden)
    pending = [header.msg_id]
    # A hidden answer carries only its status (PROTOCOL.md §9.1).
    candidates = [m.Outcome(s) for s in range(5)]
    b.publish(header.topic, frame)

    def open_response(payload: bytes, topic: str) -> m.Outcome:
        # Once answered, nothing is pending: any later copy is unexpected.
        waiting_for = pending[0] if pending else None
        _, outcome, _ = m.open_challenge_response(payload, topic, key, a.device, challenge, waiting_for, candidates)
        pending.clear()
        return outcome

    def answer(until: float):
        return first_answer(b, a.device, until, open_response)

    return frame, header.topic, answer(deadline)[0], answer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--tls-ca")
    p.add_argument("--username", required=True)
    p.add_argument("--password-file", required=True)
    p.add_argument("--key", required=True, help="this controller's PKCS#8 PEM private key")
    p.add_argument("--device", required=True)
    p.add_argument("--device-public-key", required=True, help="the device's SPKI PEM public key")
    p.add_argument("--hmac-key-file", required=True, help="the device's HMAC key, 64 hex digits")
    p.add_argument("--mode", choices=["sealed", "challenge"], default="sealed")
    p.add_argument("--hidden", action="store_true")
    p.add_argument("--replay", action="store_true")
    p.add_argument("--ttl", type=int, default=60)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("name")
    p.add_argument("args", nargs="*")
    a = p.parse_args()
    if a.hidden and a.mode != "challenge":
        p.error("--hidden needs --mode challenge")
    call = m.Call(a.name, a.args)
    try:
        call.validate()
    except m.Rejected as e:
        p.error(f"command: {e}")

    with open(a.key, "rb") as f:
        controller = serialization.load_pem_private_key(f.read(), password=None)
    with open(a.device_public_key, "rb") as f:
        device_key = serialization.load_pem_public_key(f.read())
    with open(a.hmac_key_file, encoding="ascii") as f:
        hmac_key = bytes.fromhex(f.read().strip())

    try:
        b = Broker(a)
        b.subscribe([m.topic(a.device, "resp")] + ([m.topic(a.device, "chal")] if a.mode == "challenge" else []))
    except (ConnectionError, PermissionError, OSError) as e:
        print(json.dumps({"error": str(e)}))
        return 5
    deadline = time.monotonic() + a.timeout
    if a.mode == "sealed":
        frame, topic, outcome, answer = send_sealed(b, a, controller, device_key, call, deadline)
    else:
        frame, topic, outcome, answer = send_challenge(b, a, hmac_key, call, deadline)
    result: dict = {"device": a.device, "mode": a.mode, "hidden": a.hidden}
    if outcome is None:
        result["outcome"] = "timed_out"
        print(json.dumps(result))
        b.close()
        return 4
    result.update(
        outcome="answered",
        status=m.STATUS_NAMES[outcome.status],
        code=outcome.code,
        output=outcome.output.decode("utf-8", "replace"),
    )
    if a.replay:
        b.publish(topic, frame)
        _, why = answer(time.monotonic() + 2.0)
        result["replay"] = why
    print(json.dumps(result))
    b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
