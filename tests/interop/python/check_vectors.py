"""Checks every test vector of docs/PROTOCOL.md §11 with the Python
implementation (mqseal.py), the way another implementation would:

* challenge mode: every MAC input, tag and frame rebuilt byte for byte from
  its fields; each frame decoded and verified by a device or controller of
  this implementation;
* sealed mode: CEK, OAEP seed and PSS salt drawn from the vector RNG, each
  command's receipt key derived with `cryptography`'s HKDF, and every frame
  reproduced byte for byte (RFC 8017 encodings over raw RSA); each frame
  then opened with `cryptography`'s OAEP, PSS and ChaCha20-Poly1305 by the
  receiver the vector names;
* negative vectors: each receiver, in the state the vector gives, rejects
  the frame with exactly the expected code.

Usage: python check_vectors.py [VECTOR_DIR]   (default: proto/tests/vectors)
Prints one line per vector and a summary; exits 1 if any check failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

import mqseal as m

ROOT = Path(__file__).resolve().parents[3]


def load(dir_: Path, name: str) -> dict:
    return json.loads((dir_ / name).read_text())


class Keys:
    def __init__(self, doc: dict):
        self.rsa = doc["rsa"]
        self.hmac = {k: bytes.fromhex(v) for k, v in doc["hmac"].items()}

    def private(self, name: str):
        return serialization.load_pem_private_key(self.rsa[name]["private_pkcs8_pem"].encode(), password=None)

    def public(self, name: str):
        return serialization.load_pem_public_key(self.rsa[name]["public_spki_pem"].encode())


def header(h: dict) -> m.Header:
    return m.Header(h["device"], h["topic"], bytes.fromhex(h["msg_id"]), h["issued_at"], h["expires_at"])


def call(c: dict) -> m.Call:
    return m.Call(c["name"], list(c["args"]))


def outcome(o: dict) -> m.Outcome:
    return m.Outcome(o["status"], o["code"], bytes.fromhex(o["output"]))


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def check_challenge(v: dict, keys: Keys) -> None:
    key = keys.hmac[v["key"]]
    frame = bytes.fromhex(v["frame"])
    kind = v["kind"]
    if kind == "challenge-request":
        msg_id = bytes.fromhex(v["request_msg_id"])
        expect(m.challenge_request(v["device"], msg_id) == frame, "request frame")
        expect(m.read_challenge_request(frame) == (v["device"], msg_id), "request decodes")
        return
    if kind == "challenge":
        challenge = bytes.fromhex(v["challenge"])
        expect(m.vector_rng(bytes.fromhex(v["rng_seed"]), 16) == challenge, "challenge = first 16 RNG bytes")
        req = bytes.fromhex(v["request_msg_id"])
        expect(m.challenge_envelope(v["device"], req, challenge, v["ttl_ms"]) == frame, "challenge frame")
        expect(m.read_challenge(frame, v["device"], req) == (challenge, v["ttl_ms"]), "challenge decodes")
        return
    challenge = bytes.fromhex(v["challenge"])
    hidden = v["form"] == "hidden"
    form = m.HIDDEN if hidden else m.EXPLICIT
    h = header(v["header"])
    if kind == "challenge-command":
        c = call(v["call"])
        mac_input = m.command_mac_input(form, challenge, h, c)
        expect(mac_input.hex() == v["mac_input"], "command MAC input")
        expect(m.tag(key, mac_input).hex() == v["tag"], "command tag")
        expect(m.challenge_command(key, h, challenge, c, hidden) == frame, "command frame")
        registered = [call(r) for r in v.get("registered", [])]
        dev = m.ChallengeDevice(v["device"], key, 30_000, registered)
        dev.issue(challenge, 0)
        got_h, got_c, got_form = dev.verify_command(frame, h.topic, 1, h.issued_at)
        expect((got_h, got_c, got_form) == (h, c, form), "device verifies the command")
        if hidden:
            expect(registered.index(got_c) == v["matches"], "hidden command identified")
        try:
            dev.verify_command(frame, h.topic, 2, h.issued_at)
            raise AssertionError("the challenge was not used up")
        except m.Rejected as e:
            expect(e.code == "unknown_challenge", f"second use: {e.code}")
        return
    if kind == "challenge-response":
        o = outcome(v["outcome"])
        in_reply_to = bytes.fromhex(v["in_reply_to"])
        mac_input = m.response_mac_input(form, challenge, h, in_reply_to, o)
        expect(mac_input.hex() == v["mac_input"], "response MAC input")
        expect(m.tag(key, mac_input).hex() == v["tag"], "response tag")
        expect(m.challenge_response(key, h, challenge, in_reply_to, o, hidden) == frame, "response frame")
        candidates = [outcome(c) for c in v.get("candidates", [])]
        got_h, got_o, got_form = m.open_challenge_response(
            frame, h.topic, key, v["device"], challenge, in_reply_to, candidates
        )
        expect((got_h, got_o, got_form) == (h, o, form), "controller verifies the response")
        if hidden:
            expect(candidates.index(got_o) == v["matches"], "hidden outcome identified")
        return
    raise AssertionError(f"unknown challenge vector kind {kind}")


# Receipt keys of the command vectors checked so far, by msg_id: the
# response vector answers one of them.
RECEIPT_KEYS: dict[bytes, bytes] = {}


def check_sealed(v: dict, keys: Keys) -> None:
    signer, recipient = keys.private(v["signer"]), keys.private(v["recipient"])
    expect(m.key_id(signer.public_key()).hex() == v["sender_key_id"], "sender key id")
    expect(m.key_id(recipient.public_key()).hex() == v["recipient_key_id"], "recipient key id")
    h = header(v["header"])
    frame = bytes.fromhex(v["frame"])
    response = v["kind"] == "sealed-response"
    plaintext = outcome(v["outcome"]).encode() if response else call(v["call"]).encode()
    expect(plaintext.hex() == v["plaintext"], "plaintext encoding")
    kind = m.SEALED_RESPONSE if response else m.SEALED_COMMAND
    in_reply_to = bytes.fromhex(v["in_reply_to"]) if response else None
    if response:
        # A response draws only its PSS salt; its key is the answered command's.
        salt = m.vector_rng(bytes.fromhex(v["rng_seed"]), 32)
        expect(salt.hex() == v["pss_salt"] and "cek" not in v and "oaep_seed" not in v, "RNG draw order")
        key = bytes.fromhex(v["receipt_key"])
        expect(RECEIPT_KEYS.get(in_reply_to) == key, "the answered command's receipt key")
        expect(m.response_nonce(h.msg_id).hex() == v["nonce"], "nonce")
        seed = None
    else:
        drawn = m.vector_rng(bytes.fromhex(v["rng_seed"]), 96)
        key, seed, salt = drawn[:32], drawn[32:64], drawn[64:]
        expect((key.hex(), seed.hex(), salt.hex()) == (v["cek"], v["oaep_seed"], v["pss_salt"]), "RNG draw order")
        receipt = m.receipt_key(key, h.msg_id)
        expect(receipt.hex() == v["receipt_key"], "receipt key derived from the CEK")
        RECEIPT_KEYS[h.msg_id] = receipt
    rebuilt = m.seal(
        kind,
        signer,
        recipient.public_key(),
        h,
        plaintext,
        in_reply_to=in_reply_to,
        cek=key,
        wrap=lambda pub, k: m.oaep_encrypt_with_seed(pub, k, seed),
        sign=lambda priv, msg: m.pss_sign_with_salt(priv, msg, salt),
    )
    expect(rebuilt == frame, "frame reproduced byte for byte")
    view = m.parse_sealed(frame, kind)
    expect((len(view.aad), len(view.signed)) == (v["aad_len"], v["signed_len"]), "aad and signed spans")
    if response:
        got_h, got_reply, got_o = m.open_sealed_response(
            frame, h.topic, recipient, h.device, signer.public_key(), {in_reply_to: key}
        )
        expect((got_h, got_reply, got_o) == (h, in_reply_to, outcome(v["outcome"])), "controller opens it")
        fresh = m.seal(kind, signer, recipient.public_key(), h, plaintext, in_reply_to=in_reply_to, cek=key)
        expect(fresh != frame and len(fresh) == len(frame), "random sealing differs, same length")
        got = m.open_sealed_response(fresh, h.topic, recipient, h.device, signer.public_key(), {in_reply_to: key})
        expect(got[2] == outcome(v["outcome"]), "fresh response opens")
    else:
        dev = m.SealedDevice(h.device, recipient, [signer.public_key()], m.ReplayCache())
        got_h, got_c, sender, got_key = dev.open_command(frame, h.topic, h.issued_at)
        expect((got_h, got_c, sender.hex()) == (h, call(v["call"]), v["sender_key_id"]), "device opens it")
        expect(got_key.hex() == v["receipt_key"], "device derives the receipt key")
        try:
            dev.open_command(frame, h.topic, h.issued_at)
            raise AssertionError("a replay was accepted")
        except m.Rejected as e:
            expect(e.code == "replayed", f"replay: {e.code}")
        # A fresh envelope sealed by cryptography's own OAEP/PSS opens too.
        fresh = m.seal(kind, signer, recipient.public_key(), h, plaintext)
        expect(fresh != frame and len(fresh) == len(frame), "random sealing differs, same length")
        view = m.parse_sealed(fresh, kind)
        expect(m.verify_then_decrypt(view, signer.public_key(), recipient)[0] == plaintext, "fresh envelope opens")


def negative(v: dict, keys: Keys) -> str:
    """Runs the vector's receiver; returns the rejection code it produced."""
    r = v["receiver"]
    if "frame_fill" in v:
        frame = bytes([v["frame_fill"]["byte"]]) * v["frame_fill"]["len"]
    else:
        frame = bytes.fromhex(v["frame"])
    role = r["role"]
    try:
        if role == "sealed-device":
            seen = {
                (bytes.fromhex(s["sender_key_id"]), bytes.fromhex(s["msg_id"])): s["expires_at"]
                for s in r["replay_seen"]
            }
            dev = m.SealedDevice(
                r["device"],
                keys.private(r["key"]),
                [keys.public(t) for t in r["trusted"]],
                m.ReplayCache(r["replay_floor"], seen, r.get("replay_not_before", 0)),
            )
            dev.open_command(frame, r["arrived_on"], r["now"])
        elif role == "sealed-controller":
            m.open_sealed_response(
                frame,
                r["arrived_on"],
                keys.private(r["key"]),
                r["device"],
                keys.public(r["device_key"]),
                {bytes.fromhex(r["in_reply_to"]): bytes.fromhex(r["receipt_key"])},
            )
        elif role == "challenge-device":
            dev = m.ChallengeDevice(
                r["device"], keys.hmac[r["key"]], r["lifetime_ms"], [call(c) for c in r["registered"]]
            )
            for o in r["outstanding"]:
                dev.issue(bytes.fromhex(o["challenge"]), o["issued_ms"])
            for e in r.get("executed", []):
                dev.record_executed(bytes.fromhex(e["msg_id"]), e["expires_at"])
            dev.floor = r.get("executed_floor", 0)
            dev.verify_command(frame, r["arrived_on"], r["monotonic_ms"], r["unix_secs"])
        elif role == "challenge-controller":
            m.open_challenge_response(
                frame,
                r["arrived_on"],
                keys.hmac[r["key"]],
                r["device"],
                bytes.fromhex(r["challenge"]),
                bytes.fromhex(r["in_reply_to"]),
                [outcome(c) for c in r["candidates"]],
            )
        else:
            raise AssertionError(f"unknown receiver role {role}")
    except m.Rejected as e:
        return e.code
    return "accepted"


def main() -> int:
    vectors = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "proto" / "tests" / "vectors"
    keys = Keys(load(vectors, "keys.json"))
    failures = 0
    counts = {"challenge": 0, "sealed": 0, "negative": 0}
    for group, check in (("challenge", check_challenge), ("sealed", check_sealed)):
        for v in load(vectors, f"{group}.json")["vectors"]:
            try:
                check(v, keys)
                print(f"ok   {group}/{v['name']}")
                counts[group] += 1
            except (AssertionError, m.Rejected) as e:
                failures += 1
                print(f"FAIL {group}/{v['name']}: {e}")
    for v in load(vectors, "negative.json")["vectors"]:
        got = negative(v, keys)
        if got == v["expected_error"]:
            print(f"ok   negative/{v['name']}: {got}")
            counts["negative"] += 1
        else:
            failures += 1
            print(f"FAIL negative/{v['name']}: expected {v['expected_error']}, got {got}")
    print(
        f"{counts['challenge']} challenge, {counts['sealed']} sealed, {counts['negative']} negative vectors "
        f"passed; {failures} failed"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
