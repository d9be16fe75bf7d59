"""mqseal wire protocol, version 1 — a second implementation, in Python.

Written from docs/PROTOCOL.md alone (section numbers below are that
document's), without reading the Rust crate, to show that the document is
enough to build a compatible controller or device. `check_vectors.py` holds
it to every published test vector; `controller.py` uses it to command a
running Rust agent through a real broker.

Cryptography comes from the `cryptography` package (OpenSSL): RSA-OAEP,
RSA-PSS, ChaCha20-Poly1305, HKDF. The standard library gives SHA-256 and
HMAC.
`cryptography` draws OAEP seeds and PSS salts itself, so to reproduce the
sealed vectors byte for byte `oaep_encrypt_with_seed` and
`pss_sign_with_salt` implement the two encodings of RFC 8017 by hand over
raw RSA; they are for the vectors only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# §3.1 framing
VERSION = 1
SEALED_COMMAND = 1
RETIRED_SEALED_RESPONSE = 2
CHALLENGE_REQUEST = 3
CHALLENGE = 4
CHALLENGE_COMMAND = 5
CHALLENGE_RESPONSE = 6
SEALED_RESPONSE = 7
KINDS = frozenset({1, 3, 4, 5, 6, 7})
RETIRED_KINDS = frozenset({RETIRED_SEALED_RESPONSE})

# §10 limits
MAX_FRAME = 65536
MAX_ID = 64
MAX_TOPIC = 128
MAX_NAME = 64
MAX_ARGS = 16
MAX_ARG = 256
MAX_OUTPUT = 32768
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 4096

# §5.2 and §6 labels
SIGNATURE_LABEL = b"mqseal/v1 sealed-envelope\0"
OAEP_LABEL = b"mqseal/v1 content-key"
RECEIPT_KEY_LABEL = b"mqseal/v1 receipt-key\0"
COMMAND_LABEL = b"mqseal/v1 challenge-command\0"
RESPONSE_LABEL = b"mqseal/v1 challenge-response\0"
HIDDEN, EXPLICIT = 0, 1

# §4.4 statuses
OK, FAILED, TIMED_OUT, UNKNOWN_COMMAND, BAD_ARGUMENTS = range(5)
STATUS_NAMES = ["ok", "failed", "timed_out", "unknown_command", "bad_arguments"]

# §7 default policy
SKEW = 60
MAX_LIFETIME = 600


class Rejected(Exception):
    """An envelope refused, with the §9 code."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


# §2 topics ------------------------------------------------------------------

ROOT = "mqseal/v1/dev/"


def topic(device: str, channel: str) -> str:
    """`channel` is one of cmd, resp, chal, chal/req, status."""
    return f"{ROOT}{device}/{channel}"


# §3.2 field encodings -------------------------------------------------------


def varint(n: int) -> bytes:
    """Unsigned LEB128, shortest form."""
    if n < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def zigzag(n: int) -> int:
    return ((n << 1) ^ (n >> 31)) & 0xFFFFFFFF


def enc_bytes(b: bytes) -> bytes:
    return varint(len(b)) + b


def enc_str(s: str) -> bytes:
    return enc_bytes(s.encode("utf-8"))


class Reader:
    """A cursor over a body; running out of input is `truncated`."""

    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise Rejected("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def _varint(self, max_bytes: int, last_max: int) -> int:
        out = 0
        for i in range(max_bytes):
            b = self.u8()
            out |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if i > 0 and b == 0:
                    # §3.2: one spelling per value; `80 00` is 0 spelt long.
                    raise Rejected("malformed", "varint not in its shortest form")
                if i == max_bytes - 1 and b > last_max:
                    raise Rejected("malformed", "varint wider than its type")
                return out
        raise Rejected("malformed", "varint does not end")

    def u32(self) -> int:
        return self._varint(5, 0x0F)

    def u64(self) -> int:
        return self._varint(10, 0x01)

    def i32(self) -> int:
        z = self.u32()
        return (z >> 1) ^ -(z & 1)

    def bytes_(self) -> bytes:
        return self.take(self.u64())

    def str_(self) -> str:
        raw = self.bytes_()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("malformed", "invalid UTF-8") from None

    def option(self) -> bool:
        tag = self.u8()
        if tag not in (0, 1):
            raise Rejected("malformed", "option tag")
        return tag == 1

    def end(self) -> None:
        if self.pos != len(self.data):
            raise Rejected("malformed", "trailing bytes")


def frame_body(frame: bytes, accepted: tuple[int, ...]) -> Reader:
    """§3.1: the two leading bytes, then a reader over the body."""
    if len(frame) > MAX_FRAME:
        raise Rejected("too_large")
    if len(frame) < 2:
        raise Rejected("truncated")
    if frame[0] != VERSION:
        raise Rejected("unsupported_version")
    if frame[1] in RETIRED_KINDS:
        raise Rejected("retired_kind")
    if frame[1] not in KINDS:
        raise Rejected("unknown_kind")
    if frame[1] not in accepted:
        raise Rejected("wrong_kind")
    return Reader(frame, 2)


# §4 common values ----------------------------------------------------------

ID_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:")


def valid_id(device: str) -> bool:
    raw = device.encode("utf-8")
    return 1 <= len(raw) <= MAX_ID and all(c in ID_ALPHABET for c in raw)


@dataclass
class Header:
    device: str
    topic: str
    msg_id: bytes
    issued_at: int
    expires_at: int

    def encode(self) -> bytes:
        return (
            enc_str(self.device)
            + enc_str(self.topic)
            + self.msg_id
            + varint(self.issued_at)
            + varint(self.expires_at)
        )

    @staticmethod
    def read(r: Reader) -> "Header":
        return Header(r.str_(), r.str_(), r.take(16), r.u64(), r.u64())

    def mac(self) -> bytes:
        """The header's part of a MAC input (§6.3)."""
        return (
            lp(self.device.encode())
            + lp(self.topic.encode())
            + self.msg_id
            + struct.pack(">QQ", self.issued_at, self.expires_at)
        )

    def check_received(self, me: str, arrived_on: str) -> None:
        """Device and topic checks of §5.3 step 2 / §6.3."""
        if not valid_id(self.device):
            raise Rejected("invalid_id")
        if len(self.topic.encode()) > MAX_TOPIC:
            raise Rejected("limit_exceeded", "topic")
        if self.device != me:
            raise Rejected("wrong_device")
        if self.topic != arrived_on:
            raise Rejected("wrong_topic")

    def check_response(self, device: str, arrived_on: str) -> None:
        """§5.4: from the device commanded, on its response topic, where it arrived."""
        self.check_received(device, arrived_on)
        if self.topic != topic(device, "resp"):
            raise Rejected("wrong_topic")


@dataclass
class Call:
    name: str
    args: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        return enc_str(self.name) + varint(len(self.args)) + b"".join(enc_str(a) for a in self.args)

    @staticmethod
    def read(r: Reader) -> "Call":
        name = r.str_()
        count = r.u64()
        args = []
        # Every string takes at least one byte, so a huge count runs out of
        # input (`truncated`) long before it runs out of memory.
        while len(args) < count:
            args.append(r.str_())
        return Call(name, args)

    def validate(self) -> None:
        if not 1 <= len(self.name.encode()) <= MAX_NAME:
            raise Rejected("limit_exceeded", "name")
        if len(self.args) > MAX_ARGS:
            raise Rejected("limit_exceeded", "args")
        if any(len(a.encode()) > MAX_ARG for a in self.args):
            raise Rejected("limit_exceeded", "arg")

    def mac(self) -> bytes:
        return lp(self.name.encode()) + bytes([len(self.args)]) + b"".join(lp(a.encode()) for a in self.args)


@dataclass
class Outcome:
    status: int
    code: int = 0
    output: bytes = b""

    def encode(self) -> bytes:
        return varint(self.status) + varint(zigzag(self.code)) + enc_bytes(self.output)

    @staticmethod
    def read(r: Reader) -> "Outcome":
        status = r.u32()
        if status > BAD_ARGUMENTS:
            raise Rejected("malformed", "unknown status")
        return Outcome(status, r.i32(), r.bytes_())

    def validate(self) -> None:
        if len(self.output) > MAX_OUTPUT:
            raise Rejected("limit_exceeded", "output")

    def mac(self) -> bytes:
        return bytes([self.status]) + struct.pack(">i", self.code) + lp(self.output)


# §7 time ------------------------------------------------------------------


def check_times(issued_at: int, expires_at: int, now: int, skew: int = SKEW, max_lifetime: int = MAX_LIFETIME) -> None:
    if issued_at > expires_at:
        raise Rejected("invalid_times")
    if expires_at - issued_at > max_lifetime:
        raise Rejected("lifetime_too_long")
    if issued_at > now + skew:
        raise Rejected("not_yet_valid")
    if not now < expires_at + skew:
        raise Rejected("expired")


# §5 sealed mode -------------------------------------------------------------


def key_id(public_key: rsa.RSAPublicKey) -> bytes:
    """§5.1: SHA-256 of the DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def modulus_len(key) -> int:
    return (key.key_size + 7) // 8


OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=OAEP_LABEL)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
ZERO_NONCE = bytes(12)


def receipt_key(cek: bytes, command_msg_id: bytes) -> bytes:
    """§5.2: the key a command's response is encrypted under."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=RECEIPT_KEY_LABEL + command_msg_id).derive(cek)


def response_nonce(msg_id: bytes) -> bytes:
    """§5.4: the first 12 bytes of the response's own msg_id."""
    return msg_id[:12]


def seal(
    kind: int,
    signer: rsa.RSAPrivateKey,
    recipient: rsa.RSAPublicKey,
    header: Header,
    plaintext: bytes,
    in_reply_to: bytes | None = None,
    cek: bytes | None = None,
    wrap=None,
    sign=None,
) -> bytes:
    """Builds a sealed envelope (§5.3 steps 1-4; §5.4).

    For a command, `cek` and `wrap` default to a fresh key and OAEP from
    `cryptography`. For a response, `cek` is the answered command's receipt
    key (required) and nothing is wrapped. `sign` defaults to PSS from
    `cryptography`; the vector check passes deterministic ones.
    """
    aad = bytes([VERSION, kind]) + key_id(signer.public_key()) + key_id(recipient) + header.encode()
    if kind == SEALED_RESPONSE:
        if cek is None or in_reply_to is None:
            raise ValueError("a response needs its command's receipt key and msg_id")
        aad += in_reply_to
        nonce = response_nonce(header.msg_id)
    else:
        cek = cek if cek is not None else os.urandom(32)
        wrapped = wrap(recipient, cek) if wrap else recipient.encrypt(cek, OAEP)
        aad += enc_bytes(wrapped)
        nonce = ZERO_NONCE
    ciphertext = ChaCha20Poly1305(cek).encrypt(nonce, plaintext, aad)
    signed = aad + enc_bytes(ciphertext)
    message = SIGNATURE_LABEL + signed
    signature = sign(signer, message) if sign else signer.sign(message, PSS, hashes.SHA256())
    return signed + enc_bytes(signature)


@dataclass
class SealedView:
    """A decoded sealed envelope and the spans its checks cover."""

    sender: bytes
    recipient: bytes
    header: Header
    in_reply_to: bytes | None
    wrapped_key: bytes | None
    ciphertext: bytes
    signature: bytes
    aad: bytes
    signed: bytes


def parse_sealed(frame: bytes, kind: int) -> SealedView:
    """§5.3/§5.4 step 1: framing, then every field."""
    r = frame_body(frame, (kind,))
    sender = r.take(32)
    recipient = r.take(32)
    header = Header.read(r)
    in_reply_to = r.take(16) if kind == SEALED_RESPONSE else None
    wrapped_key = r.bytes_() if kind == SEALED_COMMAND else None
    aad_end = r.pos
    ciphertext = r.bytes_()
    signed_end = r.pos
    signature = r.bytes_()
    r.end()
    return SealedView(
        sender, recipient, header, in_reply_to, wrapped_key, ciphertext, signature, frame[:aad_end], frame[:signed_end]
    )


def verify(view: SealedView, signer: rsa.RSAPublicKey) -> None:
    """§5.3 step 6 / §5.4: the signature's length, then the signature."""
    if len(view.signature) != modulus_len(signer):
        raise Rejected("malformed", "signature length")
    try:
        signer.verify(view.signature, SIGNATURE_LABEL + view.signed, PSS, hashes.SHA256())
    except InvalidSignature:
        raise Rejected("bad_signature") from None


def verify_then_decrypt(view: SealedView, signer: rsa.RSAPublicKey, own: rsa.RSAPrivateKey) -> tuple[bytes, bytes]:
    """§5.3 steps 6-7, in that order: no private-key operation before the
    signature verifies. Returns the plaintext and the CEK."""
    if view.wrapped_key is None or len(view.wrapped_key) != modulus_len(own):
        raise Rejected("malformed", "wrapped key length")
    verify(view, signer)
    try:
        cek = own.decrypt(view.wrapped_key, OAEP)
        if len(cek) != 32:
            raise ValueError("CEK length")
        return ChaCha20Poly1305(cek).decrypt(ZERO_NONCE, view.ciphertext, view.aad), cek
    except (ValueError, InvalidTag):
        raise Rejected("decrypt_failed") from None


class ReplayCache:
    """§8, as a receiver's state: seen `(sender, msg_id)`, the floor, and the
    reset floor (`not_before`, on `issued_at`)."""

    def __init__(self, floor: int = 0, seen: dict[tuple[bytes, bytes], int] | None = None, not_before: int = 0):
        self.floor = floor
        self.not_before = not_before
        self.seen = dict(seen or {})

    def check(self, sender: bytes, msg_id: bytes, issued_at: int, expires_at: int) -> None:
        if (sender, msg_id) in self.seen:
            raise Rejected("replayed")
        if expires_at <= self.floor or issued_at < self.not_before:
            raise Rejected("beyond_replay_window")

    def record(self, sender: bytes, msg_id: bytes, expires_at: int) -> None:
        self.seen[(sender, msg_id)] = expires_at


class SealedDevice:
    """The device side of §5.3."""

    def __init__(self, device: str, key: rsa.RSAPrivateKey, trusted: list[rsa.RSAPublicKey], replay: ReplayCache):
        self.device = device
        self.key = key
        self.trusted = {key_id(k): k for k in trusted}
        self.replay = replay

    def open_command(self, frame: bytes, arrived_on: str, now: int) -> tuple[Header, Call, bytes, bytes]:
        """Returns the header, the call, the signer's key id and the
        command's receipt key (§5.2), which its response is sealed under."""
        v = parse_sealed(frame, SEALED_COMMAND)
        v.header.check_received(self.device, arrived_on)
        if v.recipient != key_id(self.key.public_key()):
            raise Rejected("wrong_recipient")
        check_times(v.header.issued_at, v.header.expires_at, now)
        self.replay.check(v.sender, v.header.msg_id, v.header.issued_at, v.header.expires_at)
        signer = self.trusted.get(v.sender)
        if signer is None:
            raise Rejected("unknown_signer")
        plaintext, cek = verify_then_decrypt(v, signer, self.key)
        r = Reader(plaintext)
        call = Call.read(r)
        r.end()
        call.validate()
        self.replay.record(v.sender, v.header.msg_id, v.header.expires_at)
        return v.header, call, v.sender, receipt_key(cek, v.header.msg_id)


def open_sealed_response(
    frame: bytes,
    arrived_on: str,
    controller: rsa.RSAPrivateKey,
    device: str,
    device_key: rsa.RSAPublicKey,
    pending: dict[bytes, bytes],
) -> tuple[Header, bytes, Outcome]:
    """The controller side of §5.4. `pending` maps the msg_id of each
    command waiting for an answer to its receipt key."""
    v = parse_sealed(frame, SEALED_RESPONSE)
    v.header.check_response(device, arrived_on)
    if v.recipient != key_id(controller.public_key()):
        raise Rejected("wrong_recipient")
    if v.sender != key_id(device_key):
        raise Rejected("unknown_signer")
    if v.in_reply_to not in pending:
        raise Rejected("unexpected_reply")
    verify(v, device_key)
    try:
        plaintext = ChaCha20Poly1305(pending[v.in_reply_to]).decrypt(
            response_nonce(v.header.msg_id), v.ciphertext, v.aad
        )
    except InvalidTag:
        raise Rejected("decrypt_failed") from None
    r = Reader(plaintext)
    outcome = Outcome.read(r)
    r.end()
    outcome.validate()
    return v.header, v.in_reply_to, outcome


# §6 challenge mode ----------------------------------------------------------


def lp(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def command_mac_input(form: int, challenge: bytes, header: Header, call: Call) -> bytes:
    return COMMAND_LABEL + bytes([form]) + challenge + header.mac() + call.mac()


def response_mac_input(form: int, challenge: bytes, header: Header, in_reply_to: bytes, outcome: Outcome) -> bytes:
    return RESPONSE_LABEL + bytes([form]) + challenge + header.mac() + in_reply_to + outcome.mac()


def tag(key: bytes, mac_input: bytes) -> bytes:
    return hmac.new(key, mac_input, hashlib.sha256).digest()


def challenge_request(device: str, msg_id: bytes) -> bytes:
    return bytes([VERSION, CHALLENGE_REQUEST]) + enc_str(device) + msg_id


def read_challenge_request(frame: bytes) -> tuple[str, bytes]:
    r = frame_body(frame, (CHALLENGE_REQUEST,))
    device, msg_id = r.str_(), r.take(16)
    r.end()
    return device, msg_id


def challenge_envelope(device: str, in_reply_to: bytes, challenge: bytes, ttl_ms: int) -> bytes:
    return bytes([VERSION, CHALLENGE]) + enc_str(device) + in_reply_to + challenge + varint(ttl_ms)


def read_challenge(frame: bytes, device: str, request_msg_id: bytes) -> tuple[bytes, int]:
    """§6.2, controller side: the challenge answering our request."""
    r = frame_body(frame, (CHALLENGE,))
    dev, in_reply_to, challenge, ttl_ms = r.str_(), r.take(16), r.take(16), r.u32()
    r.end()
    if dev != device:
        raise Rejected("wrong_device")
    if in_reply_to != request_msg_id:
        raise Rejected("unexpected_reply")
    return challenge, ttl_ms


def challenge_command(key: bytes, header: Header, challenge: bytes, call: Call, hidden: bool) -> bytes:
    form = HIDDEN if hidden else EXPLICIT
    t = tag(key, command_mac_input(form, challenge, header, call))
    body = header.encode() + challenge + (b"\x00" if hidden else b"\x01" + call.encode()) + t
    return bytes([VERSION, CHALLENGE_COMMAND]) + body


def challenge_response(
    key: bytes, header: Header, challenge: bytes, in_reply_to: bytes, outcome: Outcome, hidden: bool
) -> bytes:
    form = HIDDEN if hidden else EXPLICIT
    t = tag(key, response_mac_input(form, challenge, header, in_reply_to, outcome))
    body = header.encode() + in_reply_to + (b"\x00" if hidden else b"\x01" + outcome.encode()) + t
    return bytes([VERSION, CHALLENGE_RESPONSE]) + body


class ChallengeDevice:
    """The device side of §6.1-§6.3: a table of outstanding challenges on a
    monotonic millisecond clock."""

    def __init__(self, device: str, key: bytes, lifetime_ms: int, registered: list[Call]):
        self.device = device
        self.key = key
        self.lifetime_ms = lifetime_ms
        self.registered = registered
        self.outstanding: list[tuple[bytes, int]] = []  # (challenge, issued_ms)
        # §6.1: the commands verified, (msg_id, expires_at), at most 16; a
        # copy of one is `replayed`. Forgetting one raises the floor to its
        # expiry, and what expires at or below the floor is refused.
        self.executed: list[tuple[bytes, int]] = []
        self.floor = 0

    def issue(self, challenge: bytes, now_ms: int) -> None:
        self.outstanding.append((challenge, now_ms))

    def record_executed(self, msg_id: bytes, expires_at: int, unix_secs: int | None = None) -> None:
        if len(self.executed) >= 16:
            expired = [e for e in self.executed if unix_secs is not None and unix_secs >= e[1] + SKEW]
            victim = expired[0] if expired else min(self.executed, key=lambda e: e[1])
            if not expired:
                self.floor = max(self.floor, victim[1])
            self.executed.remove(victim)
        self.executed.append((msg_id, expires_at))

    def verify_command(
        self, frame: bytes, arrived_on: str, now_ms: int, unix_secs: int | None
    ) -> tuple[Header, Call, int]:
        r = frame_body(frame, (CHALLENGE_COMMAND,))
        header = Header.read(r)
        challenge = r.take(16)
        call = Call.read(r) if r.option() else None
        got = r.take(32)
        r.end()
        header.check_received(self.device, arrived_on)
        if call is not None:
            call.validate()
        if unix_secs is not None:
            check_times(header.issued_at, header.expires_at, unix_secs)
        live = [c for c, issued in self.outstanding if now_ms < issued + self.lifetime_ms]
        if challenge not in live:
            raise Rejected("unknown_challenge")
        if any(header.msg_id == m for m, _ in self.executed):
            raise Rejected("replayed")
        if header.expires_at <= self.floor:
            raise Rejected("beyond_replay_window")
        if call is not None:
            form = EXPLICIT
            if not hmac.compare_digest(tag(self.key, command_mac_input(form, challenge, header, call)), got):
                raise Rejected("bad_tag")
        else:
            form = HIDDEN
            # Every candidate is computed and compared (§6.3 SHOULD).
            matches = [
                c
                for c in self.registered
                if hmac.compare_digest(tag(self.key, command_mac_input(form, challenge, header, c)), got)
            ]
            if not matches:
                raise Rejected("bad_tag")
            call = matches[0]
        self.outstanding = [(c, i) for c, i in self.outstanding if c != challenge]
        self.record_executed(header.msg_id, header.expires_at, unix_secs)
        return header, call, form


def open_challenge_response(
    frame: bytes,
    arrived_on: str,
    key: bytes,
    device: str,
    challenge: bytes,
    pending: bytes | None,
    candidates: list[Outcome] | None = None,
) -> tuple[Header, Outcome, int]:
    """§6.4, controller side. `candidates` identify a hidden response."""
    r = frame_body(frame, (CHALLENGE_RESPONSE,))
    header = Header.read(r)
    in_reply_to = r.take(16)
    outcome = Outcome.read(r) if r.option() else None
    got = r.take(32)
    r.end()
    header.check_response(device, arrived_on)
    if in_reply_to != pending:
        raise Rejected("unexpected_reply")
    if outcome is not None:
        outcome.validate()
        mac_in = response_mac_input(EXPLICIT, challenge, header, in_reply_to, outcome)
        if not hmac.compare_digest(tag(key, mac_in), got):
            raise Rejected("bad_tag")
        return header, outcome, EXPLICIT
    for c in candidates or []:
        if hmac.compare_digest(tag(key, response_mac_input(HIDDEN, challenge, header, in_reply_to, c)), got):
            return header, c, HIDDEN
    raise Rejected("bad_tag")


# RFC 8017 encodings over raw RSA, for reproducing the sealed vectors -------


def mgf1(seed: bytes, length: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(seed + struct.pack(">I", counter)).digest()
        counter += 1
    return out[:length]


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def oaep_encrypt_with_seed(public: rsa.RSAPublicKey, message: bytes, seed: bytes) -> bytes:
    """RSAES-OAEP-ENCRYPT (RFC 8017 §7.1.1) with a given seed."""
    n, e = public.public_numbers().n, public.public_numbers().e
    k = modulus_len(public)
    h = 32
    ps = bytes(k - len(message) - 2 * h - 2)
    db = hashlib.sha256(OAEP_LABEL).digest() + ps + b"\x01" + message
    masked_db = xor(db, mgf1(seed, k - h - 1))
    masked_seed = xor(seed, mgf1(masked_db, h))
    em = b"\x00" + masked_seed + masked_db
    return pow(int.from_bytes(em, "big"), e, n).to_bytes(k, "big")


def pss_sign_with_salt(private: rsa.RSAPrivateKey, message: bytes, salt: bytes) -> bytes:
    """RSASSA-PSS-SIGN (RFC 8017 §8.1.1, EMSA-PSS §9.1.1) with a given salt."""
    numbers = private.private_numbers()
    n, d = numbers.public_numbers.n, numbers.d
    mod_bits = n.bit_length()
    em_bits = mod_bits - 1
    em_len = (em_bits + 7) // 8
    h = 32
    m_hash = hashlib.sha256(message).digest()
    hh = hashlib.sha256(bytes(8) + m_hash + salt).digest()
    db = bytes(em_len - len(salt) - h - 2) + b"\x01" + salt
    masked_db = bytearray(xor(db, mgf1(hh, em_len - h - 1)))
    masked_db[0] &= 0xFF >> (8 * em_len - em_bits)
    em = bytes(masked_db) + hh + b"\xbc"
    return pow(int.from_bytes(em, "big"), d, n).to_bytes(modulus_len(private), "big")


def vector_rng(seed: bytes, n: int) -> bytes:
    """§11: SHA-256(seed ‖ be64(0)) ‖ SHA-256(seed ‖ be64(1)) ‖ …"""
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(seed + struct.pack(">Q", i)).digest()
        i += 1
    return out[:n]
