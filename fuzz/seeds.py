"""Writes the fuzz targets' seed corpus (fuzz/corpus/<target>/), committed
beside this script: the published test vectors' frames for the envelope
targets, and a few whole client sessions for the broker target.
Deterministic; re-run after the vectors change:  python3 fuzz/seeds.py
"""

import hashlib
import json
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent
VECTORS = ROOT.parent / "proto" / "tests" / "vectors"


def write(target: str, data: bytes) -> None:
    d = ROOT / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()).write_bytes(data)


def frames(name: str, roles: tuple[str, ...]) -> list[bytes]:
    out = [bytes.fromhex(v["frame"]) for v in json.loads((VECTORS / name).read_text())["vectors"]]
    for v in json.loads((VECTORS / "negative.json").read_text())["vectors"]:
        if v["receiver"]["role"] in roles and "frame" in v:
            out.append(bytes.fromhex(v["frame"]))
    return out


for f in frames("challenge.json", ("challenge-device", "challenge-controller")):
    write("envelope_challenge", f)
for f in frames("sealed.json", ("sealed-device", "sealed-controller")):
    if len(f) < 4096:
        write("envelope_sealed", f)


# MQTT: the client's side of a session, as bytes on the wire.
def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(x: str) -> bytes:
    b = x.encode()
    return struct.pack(">H", len(b)) + b


def packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + varint(len(body)) + body


def connect(v5: bool, client: str, user: str, will: str | None = None) -> bytes:
    flags = 0xC2 | (0x0C if will else 0)
    body = s("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack(">H", 30)
    body += (b"\x00" if v5 else b"") + s(client)
    if will:
        body += (b"\x00" if v5 else b"") + s(will) + s("offline")
    body += s(user) + s("password")
    return packet(0x10, body)


def publish(v5: bool, topic: str, qos: int, payload: bytes) -> bytes:
    body = s(topic) + (struct.pack(">H", 7) if qos else b"") + (b"\x00" if v5 else b"") + payload
    return packet(0x30 | (qos << 1), body)


def subscribe(v5: bool, filters: list[str]) -> bytes:
    body = struct.pack(">H", 9) + (b"\x00" if v5 else b"") + b"".join(s(f) + b"\x01" for f in filters)
    return packet(0x82, body)


env = bytes.fromhex(json.loads((VECTORS / "challenge.json").read_text())["vectors"][2]["frame"])
for v5 in (False, True):
    for role, user in ((0, "dev-1"), (1, "ops"), (2, "fleet")):
        selector = bytes([(role << 1) | int(v5)])
        dev = "mqseal/v1/dev/dev-1/"
        session = (
            connect(v5, user, user, will=dev + "status" if role == 0 else None)
            + subscribe(v5, [dev + "cmd", dev + "chal/req", "#", "$SYS/#", "mqseal/v1/dev/+/resp"])
            + publish(v5, dev + "resp", 1, env)
            + publish(v5, "mqseal/v1/dev/dev-2/cmd", 1, env)
            + publish(v5, dev + "status", 0, b"online")
            + packet(0x40, struct.pack(">H", 7))
            + packet(0xC0, b"")
            + packet(0xE0, b"")
        )
        write("broker_packets", selector + session)
        write("broker_packets", bytes([selector[0] | 0x18]) + session)  # cut into 3-byte reads
