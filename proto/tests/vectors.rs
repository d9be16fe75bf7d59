//! The published test vectors (`proto/tests/vectors/*.json`).
//!
//! Two halves, kept apart on purpose:
//!
//! * **generation** builds every vector through the library's public API and
//!   compares the result with the committed files byte for byte, so any
//!   change to the wire format fails here. `MQSEAL_BLESS=1 cargo test -p
//!   mqseal-proto --test vectors` rewrites them after a deliberate change.
//! * **checking** reads only the JSON and verifies it the way another
//!   implementation would from docs/PROTOCOL.md: it recomputes MAC inputs
//!   from the spec, recovers content keys, OAEP seeds and PSS salts with raw
//!   RSA, and checks offsets — then runs each negative vector against the
//!   receiver it describes and expects the named error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use mqseal_proto::Text;
use std::collections::BTreeSet;

use common::{Keys, Script, VectorRng, enc, keys_pem, old_form_receipt, resign, varint, vectors_dir};
use hmac::{KeyInit, Mac};
use mqseal_proto::challenge::{
    Answer, ChallengeController, ChallengeDevice, ChallengeTable, Clock, Form, Pending, Registered,
};
use mqseal_proto::sealed::backend::{self, Backend as _, RustCrypto};
use mqseal_proto::sealed::{
    Keyring, OAEP_LABEL, RECEIPT_KEY_LABEL, ReceiptKey, ReplayCache, SIGNATURE_LABEL, SealedController, SealedDevice,
    SealedReplyTo,
};
use mqseal_proto::topic::{Channel, topic};
use mqseal_proto::{Call, Error, Header, MsgId, Outcome, Policy, Status};
use rsa::BoxedUint;
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Issue time of every vector (2026-09-21T12:26:40Z).
const NOW: u64 = 1_790_000_000;
const SEALED_DEV: &str = "dev-sealed";
const CHAL_DEV: &str = "dev-chal";
const CHALLENGE_LIFETIME_MS: u64 = 30_000;

// ---------------------------------------------------------------- JSON shapes

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct HeaderJ {
    device: String,
    topic: String,
    msg_id: String,
    issued_at: u64,
    expires_at: u64,
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct CallJ {
    name: String,
    args: Vec<String>,
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct OutcomeJ {
    status: u8,
    code: i32,
    output: String,
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
struct ChallengeVector {
    name: String,
    kind: String,
    key: String,
    device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rng_seed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_msg_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    challenge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    form: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<HeaderJ>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    call: Option<CallJ>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    registered: Option<Vec<CallJ>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    in_reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<OutcomeJ>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    candidates: Option<Vec<OutcomeJ>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    matches: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac_input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
    frame: String,
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct SealedVector {
    name: String,
    kind: String,
    signer: String,
    recipient: String,
    sender_key_id: String,
    recipient_key_id: String,
    rng_seed: String,
    /// Commands: the content key and OAEP seed, drawn before the salt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cek: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    oaep_seed: Option<String>,
    pss_salt: String,
    /// The command's receipt key (for a response: that of the command it answers).
    receipt_key: String,
    /// Responses: the AEAD nonce, the first 12 bytes of `header.msg_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
    header: HeaderJ,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    in_reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    call: Option<CallJ>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<OutcomeJ>,
    plaintext: String,
    aad_len: usize,
    signed_len: usize,
    frame: String,
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct Seen {
    sender_key_id: String,
    msg_id: String,
    expires_at: u64,
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct Outstanding {
    challenge: String,
    issued_ms: u64,
}

/// A command a challenge-mode device remembers having verified.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct Executed {
    msg_id: String,
    expires_at: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Who receives a negative vector, in what state. Every receiver uses the
/// default policy: 60 s skew, 600 s lifetime.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
#[serde(tag = "role", rename_all = "kebab-case", deny_unknown_fields)]
enum Receiver {
    SealedDevice {
        device: String,
        key: String,
        trusted: Vec<String>,
        arrived_on: String,
        now: u64,
        replay_floor: u64,
        replay_seen: Vec<Seen>,
        /// The reset floor (§8): commands issued before it are refused.
        #[serde(default, skip_serializing_if = "is_zero")]
        replay_not_before: u64,
    },
    ChallengeDevice {
        device: String,
        key: String,
        arrived_on: String,
        monotonic_ms: u64,
        unix_secs: Option<u64>,
        lifetime_ms: u64,
        outstanding: Vec<Outstanding>,
        registered: Vec<CallJ>,
        /// Commands the device verified lately (§6.1).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        executed: Vec<Executed>,
        /// Its floor: commands expiring at or before it are refused (§6.1).
        #[serde(default, skip_serializing_if = "is_zero")]
        executed_floor: u64,
    },
    SealedController {
        key: String,
        device: String,
        device_key: String,
        arrived_on: String,
        in_reply_to: String,
        /// The pending command's receipt key.
        receipt_key: String,
    },
    ChallengeController {
        key: String,
        device: String,
        arrived_on: String,
        challenge: String,
        in_reply_to: String,
        candidates: Vec<OutcomeJ>,
    },
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct Fill {
    byte: u8,
    len: usize,
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct NegativeVector {
    name: String,
    description: String,
    receiver: Receiver,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    frame: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    frame_fill: Option<Fill>,
    expected_error: String,
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
#[serde(deny_unknown_fields)]
struct File<V> {
    about: String,
    vectors: Vec<V>,
}

// ---------------------------------------------------------------- helpers

fn h(b: impl AsRef<[u8]>) -> String {
    hex::encode(b)
}
fn unh(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}
fn arr<const N: usize>(s: &str) -> [u8; N] {
    unh(s).try_into().unwrap()
}
/// `start, start+1, …` — recognisable fixed ids.
fn seq<const N: usize>(start: u8) -> [u8; N] {
    std::array::from_fn(|i| start.wrapping_add(i as u8))
}
fn header_j(hd: &Header<'_>) -> HeaderJ {
    HeaderJ {
        device: hd.device.into(),
        topic: hd.topic.into(),
        msg_id: h(hd.msg_id.0),
        issued_at: hd.issued_at,
        expires_at: hd.expires_at,
    }
}
fn header_of(j: &HeaderJ) -> Header<'_> {
    Header {
        device: &j.device,
        topic: &j.topic,
        msg_id: MsgId(arr(&j.msg_id)),
        issued_at: j.issued_at,
        expires_at: j.expires_at,
    }
}
fn call_j(name: &str, args: &[&str]) -> CallJ {
    CallJ { name: name.into(), args: args.iter().map(|a| a.to_string()).collect() }
}
fn outcome_j(o: &Outcome<'_>) -> OutcomeJ {
    OutcomeJ { status: o.status as u8, code: o.code, output: h(o.output) }
}
fn topic_s(dev: &str, ch: Channel) -> String {
    topic(dev, ch).unwrap().as_str().to_owned()
}
fn flip(frame: &[u8], at: usize, mask: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[at] ^= mask;
    f
}

/// `frame` with the varint starting at `at` spelt one byte longer (the same
/// value, a redundant `80 … 00` tail): what a decoder must refuse.
fn lengthen(frame: &[u8], at: usize) -> Vec<u8> {
    let last = (at..frame.len()).find(|&i| frame[i] & 0x80 == 0).unwrap();
    let mut f = frame.to_vec();
    f[last] |= 0x80;
    f.insert(last + 1, 0);
    f
}

/// Where a header's `expires_at` starts, `prefix` bytes into the frame.
fn expires_at_offset(prefix: usize, device: &str, topic: &str, issued_at: u64) -> usize {
    prefix + 1 + device.len() + 1 + topic.len() + 16 + varint(usize::try_from(issued_at).unwrap()).len()
}

fn set_interval() -> Call<'static> {
    Call::new("set-interval", &["30", "valve-3"]).unwrap()
}
fn registry_j() -> Vec<CallJ> {
    vec![call_j("led-on", &[]), call_j("led-off", &[]), call_j("reboot", &[]), call_j("set-interval", &["60"])]
}
const HIDDEN_INDEX: usize = 2;
fn candidates_j() -> Vec<OutcomeJ> {
    [(Status::Ok, 0, &b"on"[..]), (Status::Ok, 0, b"off"), (Status::Failed, 1, b"")]
        .iter()
        .map(|&(status, code, output)| outcome_j(&Outcome { status, code, output }))
        .collect()
}

/// Owned inputs that borrowed library types can point into.
struct Owned {
    registry: Vec<(String, Vec<String>)>,
    candidates: Vec<(Status, i32, Vec<u8>)>,
}
impl Owned {
    fn new(registry: &[CallJ], candidates: &[OutcomeJ]) -> Self {
        Owned {
            registry: registry.iter().map(|c| (c.name.clone(), c.args.clone())).collect(),
            candidates: candidates
                .iter()
                .map(|o| (Status::from_byte(o.status).unwrap(), o.code, unh(&o.output)))
                .collect(),
        }
    }
    fn with<T>(&self, f: impl FnOnce(&[Registered<'_>], &[Outcome<'_>]) -> T) -> T {
        let args: Vec<Vec<&str>> = self.registry.iter().map(|(_, a)| a.iter().map(String::as_str).collect()).collect();
        let reg: Vec<Registered<'_>> =
            self.registry.iter().zip(&args).map(|((n, _), a)| Registered { name: n, args: a }).collect();
        let cands: Vec<Outcome<'_>> =
            self.candidates.iter().map(|(s, c, o)| Outcome { status: *s, code: *c, output: o }).collect();
        f(&reg, &cands)
    }
}

// ------------------------------------------- the spec, written independently

/// `be16(len) ‖ bytes`.
fn lp(m: &mut Vec<u8>, b: &[u8]) {
    m.extend_from_slice(&u16::try_from(b.len()).unwrap().to_be_bytes());
    m.extend_from_slice(b);
}
fn mac_header(m: &mut Vec<u8>, hd: &HeaderJ) {
    lp(m, hd.device.as_bytes());
    lp(m, hd.topic.as_bytes());
    m.extend(unh(&hd.msg_id));
    m.extend(hd.issued_at.to_be_bytes());
    m.extend(hd.expires_at.to_be_bytes());
}
/// docs/PROTOCOL.md, "Command tag".
fn command_mac_input(form: u8, challenge: &[u8], hd: &HeaderJ, call: &CallJ) -> Vec<u8> {
    let mut m = b"mqseal/v1 challenge-command\0".to_vec();
    m.push(form);
    m.extend_from_slice(challenge);
    mac_header(&mut m, hd);
    lp(&mut m, call.name.as_bytes());
    m.push(u8::try_from(call.args.len()).unwrap());
    for a in &call.args {
        lp(&mut m, a.as_bytes());
    }
    m
}
/// docs/PROTOCOL.md, "Response tag".
fn response_mac_input(form: u8, challenge: &[u8], hd: &HeaderJ, in_reply_to: &str, o: &OutcomeJ) -> Vec<u8> {
    let mut m = b"mqseal/v1 challenge-response\0".to_vec();
    m.push(form);
    m.extend_from_slice(challenge);
    mac_header(&mut m, hd);
    m.extend(unh(in_reply_to));
    m.push(o.status);
    m.extend(o.code.to_be_bytes());
    lp(&mut m, &unh(&o.output));
    m
}
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
    m.update(msg);
    m.finalize().into_bytes().into()
}
fn mgf1(seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![];
    let mut counter = 0u32;
    while out.len() < len {
        let mut hh = Sha256::new();
        hh.update(seed);
        hh.update(counter.to_be_bytes());
        out.extend_from_slice(&hh.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}
fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}
fn rsa_private(pem: &str) -> rsa::RsaPrivateKey {
    use rsa::pkcs8::DecodePrivateKey;
    rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap()
}
/// Raw RSA with the private key (RSADP), then RFC 8017 EME-OAEP decoding:
/// returns (seed, message).
fn oaep_open(key: &rsa::RsaPrivateKey, c: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let k = key.size();
    let ci = BoxedUint::from_be_slice(c, key.n_bits_precision()).unwrap();
    let m = rsa::hazmat::rsa_decrypt_and_check(key, None::<&mut VectorRng>, &ci).unwrap();
    let em = pad_be(&m.to_be_bytes(), k);
    assert_eq!(em[0], 0);
    let (masked_seed, masked_db) = em[1..].split_at(32);
    let seed = xor(masked_seed, &mgf1(masked_db, 32));
    let db = xor(masked_db, &mgf1(&seed, masked_db.len()));
    assert_eq!(&db[..32], Sha256::digest(OAEP_LABEL).as_slice(), "OAEP label hash");
    let rest = &db[32..];
    let one = rest.iter().position(|&b| b != 0).unwrap();
    assert_eq!(rest[one], 1);
    (seed, rest[one + 1..].to_vec())
}
/// Raw RSA with the public key (RSAVP1), then RFC 8017 EMSA-PSS decoding:
/// returns the salt after checking the signature by hand.
fn pss_salt(key: &rsa::RsaPublicKey, sig: &[u8], message: &[u8]) -> Vec<u8> {
    let k = key.size();
    let si = BoxedUint::from_be_slice(sig, key.n_bits_precision()).unwrap();
    let m = rsa::hazmat::rsa_encrypt(key, &si).unwrap();
    let em_bits = key.n().bits() as usize - 1;
    let em_len = em_bits.div_ceil(8);
    let em = pad_be(&m.to_be_bytes(), k);
    let em = &em[k - em_len..];
    assert_eq!(*em.last().unwrap(), 0xbc);
    let (masked_db, rest) = em.split_at(em_len - 33);
    let hh = &rest[..32];
    let mut db = xor(masked_db, &mgf1(hh, masked_db.len()));
    db[0] &= 0xff >> (8 * em_len - em_bits);
    let salt = db[db.len() - 32..].to_vec();
    assert_eq!(db[db.len() - 33], 1);
    let mut mp = vec![0u8; 8];
    mp.extend_from_slice(&Sha256::digest(message));
    mp.extend_from_slice(&salt);
    assert_eq!(hh, Sha256::digest(&mp).as_slice(), "PSS H");
    salt
}
fn pad_be(b: &[u8], k: usize) -> Vec<u8> {
    let b = &b[b.len().saturating_sub(k)..];
    let mut v = vec![0u8; k - b.len()];
    v.extend_from_slice(b);
    v
}

// ---------------------------------------------------------------- generation

struct Generated {
    challenge: File<ChallengeVector>,
    sealed: File<SealedVector>,
    negative: File<NegativeVector>,
}

fn generate(keys: &Keys) -> Generated {
    let mut chal = vec![];
    let mut sealed = vec![];
    let mut neg = vec![];
    let key = keys.hmac(CHAL_DEV);
    let ctl = ChallengeController::new(CHAL_DEV, key).unwrap();
    let dev = ChallengeDevice::new(CHAL_DEV, key, Policy::default()).unwrap();

    // 1. challenge request and challenge
    let req_id = MsgId(seq(0x10));
    let request = enc(|b| ctl.request(req_id, b));
    chal.push(ChallengeVector {
        name: "challenge-request".into(),
        kind: "challenge-request".into(),
        key: CHAL_DEV.into(),
        device: CHAL_DEV.into(),
        request_msg_id: Some(h(req_id.0)),
        frame: h(&request),
        ..Default::default()
    });
    let seed = b"mqseal challenge vector";
    let mut rng = VectorRng::new(seed);
    let mut table = ChallengeTable::<4>::new(CHALLENGE_LIFETIME_MS);
    let challenge_frame = enc(|b| dev.answer_request(&request, &mut table, &mut rng, 0, b));
    let challenge: [u8; 16] = rng.drawn[..16].try_into().unwrap();
    chal.push(ChallengeVector {
        name: "challenge".into(),
        kind: "challenge".into(),
        key: CHAL_DEV.into(),
        device: CHAL_DEV.into(),
        rng_seed: Some(h(seed)),
        request_msg_id: Some(h(req_id.0)),
        challenge: Some(h(challenge)),
        ttl_ms: Some(CHALLENGE_LIFETIME_MS as u32),
        frame: h(&challenge_frame),
        ..Default::default()
    });

    // 2. explicit and hidden commands
    let cmd_topic = topic_s(CHAL_DEV, Channel::Command);
    let explicit_hd =
        Header { device: CHAL_DEV, topic: &cmd_topic, msg_id: MsgId(seq(0x20)), issued_at: NOW, expires_at: NOW + 300 };
    let call = set_interval();
    let explicit = enc(|b| ctl.command(&explicit_hd, &challenge, &call, Form::Explicit, b));
    let call_json = call_j(call.name, &call.args.iter().collect::<Vec<_>>());
    let mac_in = command_mac_input(1, &challenge, &header_j(&explicit_hd), &call_json);
    chal.push(ChallengeVector {
        name: "explicit-command".into(),
        kind: "challenge-command".into(),
        key: CHAL_DEV.into(),
        device: CHAL_DEV.into(),
        challenge: Some(h(challenge)),
        form: Some("explicit".into()),
        header: Some(header_j(&explicit_hd)),
        call: Some(call_json.clone()),
        tag: Some(h(hmac_sha256(key.as_bytes(), &mac_in))),
        mac_input: Some(h(&mac_in)),
        frame: h(&explicit),
        ..Default::default()
    });
    let hidden_challenge: [u8; 16] = seq(0x50);
    let hidden_hd =
        Header { device: CHAL_DEV, topic: &cmd_topic, msg_id: MsgId(seq(0x21)), issued_at: NOW, expires_at: NOW + 300 };
    let registry = registry_j();
    let hidden_call_j = registry[HIDDEN_INDEX].clone();
    let hidden_args: Vec<&str> = hidden_call_j.args.iter().map(String::as_str).collect();
    let hidden_call = Call::new(&hidden_call_j.name, &hidden_args).unwrap();
    let hidden = enc(|b| ctl.command(&hidden_hd, &hidden_challenge, &hidden_call, Form::Hidden, b));
    let mac_in = command_mac_input(0, &hidden_challenge, &header_j(&hidden_hd), &hidden_call_j);
    chal.push(ChallengeVector {
        name: "hidden-command".into(),
        kind: "challenge-command".into(),
        key: CHAL_DEV.into(),
        device: CHAL_DEV.into(),
        challenge: Some(h(hidden_challenge)),
        form: Some("hidden".into()),
        header: Some(header_j(&hidden_hd)),
        call: Some(hidden_call_j.clone()),
        registered: Some(registry.clone()),
        matches: Some(HIDDEN_INDEX),
        tag: Some(h(hmac_sha256(key.as_bytes(), &mac_in))),
        mac_input: Some(h(&mac_in)),
        frame: h(&hidden),
        ..Default::default()
    });

    // 3. responses: the device verifies each command, then answers.
    let owned = Owned::new(&registry, &candidates_j());
    let resp_topic = topic_s(CHAL_DEV, Channel::Response);
    let (explicit_resp, hidden_resp) = owned.with(|reg, cands| {
        let mut t = ChallengeTable::<4>::new(CHALLENGE_LIFETIME_MS);
        t.issue(&mut Script::new(&challenge), 0);
        t.issue(&mut Script::new(&hidden_challenge), 0);
        let clock = Clock { monotonic_ms: 5, unix_secs: Some(NOW + 1) };
        let v = dev.verify_command(&explicit, &cmd_topic, clock, &mut t, reg).unwrap();
        assert_eq!(v.call, call);
        let outcome = Outcome { status: Status::Ok, code: 0, output: b"interval=30\n" };
        let e = enc(|b| dev.respond(&v.reply_to(), Form::Explicit, &outcome, MsgId(seq(0x30)), Some(NOW + 1), b));
        let v =
            dev.verify_command(&hidden, &cmd_topic, Clock { monotonic_ms: 6, unix_secs: None }, &mut t, reg).unwrap();
        assert_eq!(v.registered, Some(HIDDEN_INDEX));
        let hd = enc(|b| dev.respond(&v.reply_to(), Form::Hidden, &cands[1], MsgId(seq(0x31)), None, b));
        (e, hd)
    });
    let explicit_outcome = OutcomeJ { status: 0, code: 0, output: h(b"interval=30\n") };
    let explicit_resp_hd = HeaderJ {
        device: CHAL_DEV.into(),
        topic: resp_topic.clone(),
        msg_id: h(seq::<16>(0x30)),
        issued_at: NOW + 1,
        expires_at: NOW + 300,
    };
    let mac_in = response_mac_input(1, &challenge, &explicit_resp_hd, &h(seq::<16>(0x20)), &explicit_outcome);
    chal.push(ChallengeVector {
        name: "explicit-response".into(),
        kind: "challenge-response".into(),
        key: CHAL_DEV.into(),
        device: CHAL_DEV.into(),
        challenge: Some(h(challenge)),
        form: Some("explicit".into()),
        header: Some(explicit_resp_hd),
        in_reply_to: Some(h(seq::<16>(0x20))),
        outcome: Some(explicit_outcome),
        tag: Some(h(hmac_sha256(key.as_bytes(), &mac_in))),
        mac_input: Some(h(&mac_in)),
        frame: h(&explicit_resp),
        ..Default::default()
    });
    let hidden_resp_hd = HeaderJ {
        device: CHAL_DEV.into(),
        topic: resp_topic.clone(),
        msg_id: h(seq::<16>(0x31)),
        issued_at: 0,
        expires_at: NOW + 300,
    };
    let cands = candidates_j();
    let mac_in = response_mac_input(0, &hidden_challenge, &hidden_resp_hd, &h(seq::<16>(0x21)), &cands[1]);
    chal.push(ChallengeVector {
        name: "hidden-response".into(),
        kind: "challenge-response".into(),
        key: CHAL_DEV.into(),
        device: CHAL_DEV.into(),
        challenge: Some(h(hidden_challenge)),
        form: Some("hidden".into()),
        header: Some(hidden_resp_hd),
        in_reply_to: Some(h(seq::<16>(0x21))),
        outcome: Some(cands[1].clone()),
        candidates: Some(cands.clone()),
        matches: Some(1),
        tag: Some(h(hmac_sha256(key.as_bytes(), &mac_in))),
        mac_input: Some(h(&mac_in)),
        frame: h(&hidden_resp),
        ..Default::default()
    });

    // 4. sealed commands at each size, and one response.
    let sealed_cmd_topic = topic_s(SEALED_DEV, Channel::Command);
    let mut sealed_2048 = None;
    for (i, bits) in [2048u32, 3072, 4096].into_iter().enumerate() {
        let (signer, recipient) = (format!("controller-{bits}"), format!("device-{bits}"));
        let seed = format!("mqseal sealed command vector {bits}");
        let mut rng = VectorRng::new(seed.as_bytes());
        let hd = Header {
            device: SEALED_DEV,
            topic: &sealed_cmd_topic,
            msg_id: MsgId(seq(0x60 + i as u8)),
            issued_at: NOW,
            expires_at: NOW + 300,
        };
        let sealed_cmd = SealedController::new(keys.private(&signer))
            .seal_command(&mut rng, keys.public(&recipient), &hd, &call)
            .unwrap();
        let frame = sealed_cmd.frame.clone();
        sealed.push(sealed_vector(
            keys,
            &format!("command-{bits}"),
            "sealed-command",
            &signer,
            &recipient,
            &seed,
            &rng,
            &hd,
            None,
            Some(call_j(call.name, &call.args.iter().collect::<Vec<_>>())),
            None,
            &common::postcard_of::call(&call),
            &frame,
            &sealed_cmd.receipt_key,
        ));
        if bits == 2048 {
            sealed_2048 = Some(sealed_cmd);
        }
    }
    let sealed_2048 = sealed_2048.unwrap();
    let receipt_key = sealed_2048.receipt_key.clone();
    let sealed_2048 = sealed_2048.frame;
    let trusted: Keyring = [keys.public("controller-2048").clone()].into_iter().collect();
    let sdev = SealedDevice::new(SEALED_DEV, keys.private("device-2048"), &trusted, Policy::default()).unwrap();
    let mut replay = ReplayCache::new(16, Policy::default());
    let opened = sdev
        .open_command(&mut VectorRng::new(b"blinding"), &sealed_2048, &sealed_cmd_topic, NOW + 1, &mut replay)
        .unwrap();
    let outcome = Outcome { status: Status::Ok, code: 0, output: b"interval=30\n" };
    let seed = "mqseal sealed response vector 2048";
    let mut rng = VectorRng::new(seed.as_bytes());
    let response = sdev.seal_response(&mut rng, &opened, &outcome, MsgId(seq(0x70)), NOW + 1).unwrap();
    let sealed_resp_topic = topic_s(SEALED_DEV, Channel::Response);
    let resp_hd = response_header(&sealed_resp_topic, 0x70);
    assert_eq!(opened.reply_to().receipt_key, receipt_key, "both ends derive one receipt key");
    sealed.push(sealed_vector(
        keys,
        "response-2048",
        "sealed-response",
        "device-2048",
        "controller-2048",
        seed,
        &rng,
        &resp_hd,
        Some(seq::<16>(0x60)),
        None,
        Some(outcome_j(&outcome)),
        &common::postcard_of::outcome(&outcome),
        &response,
        &receipt_key,
    ));

    negatives(
        keys,
        &mut neg,
        &Bases {
            sealed: &sealed_2048,
            response: &response,
            receipt_key: &receipt_key,
            reply_to: &opened.reply_to(),
            device: &sdev,
            outcome: &outcome,
            explicit: &explicit,
            hidden: &hidden,
            explicit_resp: &explicit_resp,
            hidden_resp: &hidden_resp,
            challenge,
            hidden_challenge,
        },
    );

    Generated {
        challenge: File { about: ABOUT_CHALLENGE.into(), vectors: chal },
        sealed: File { about: ABOUT_SEALED.into(), vectors: sealed },
        negative: File { about: ABOUT_NEGATIVE.into(), vectors: neg },
    }
}

const ABOUT_CHALLENGE: &str = "Challenge-mode vectors (docs/PROTOCOL.md). HMAC keys are in keys.json under `hmac`. `mac_input` is the exact byte string the tag is HMAC-SHA256 over; `frame` is the whole envelope. The `challenge` vector's challenge is the first 16 bytes of the vector RNG seeded with `rng_seed`.";
const ABOUT_SEALED: &str = "Sealed-mode vectors (docs/PROTOCOL.md). RSA keys are in keys.json under `rsa`. Commands: the vector RNG seeded with `rng_seed` yields, in order, `cek`, the OAEP seed and the PSS salt: implementations that can inject those reproduce `frame` byte for byte; others check it by verifying the signature, unwrapping `cek` and decrypting to `plaintext`. Responses: `receipt_key` is derived from the answered command's `cek` and msg_id (PROTOCOL.md §5.2), `nonce` is the first 12 bytes of the response's msg_id, and the RNG yields only the PSS salt; check by verifying the signature and decrypting under `receipt_key`. `aad_len`/`signed_len` are the lengths of the AEAD associated data and of the signed prefix.";
const ABOUT_NEGATIVE: &str = "Negative vectors: each `frame` must be rejected by the described receiver (default policy: 60 s skew, 600 s lifetime) with `expected_error`, the code of docs/PROTOCOL.md's rejection table. `frame_fill` stands for a frame of `len` copies of `byte`.";

#[allow(clippy::too_many_arguments)]
fn sealed_vector(
    keys: &Keys,
    name: &str,
    kind: &str,
    signer: &str,
    recipient: &str,
    seed: &str,
    rng: &VectorRng,
    hd: &Header<'_>,
    in_reply_to: Option<[u8; 16]>,
    call: Option<CallJ>,
    outcome: Option<OutcomeJ>,
    plaintext: &[u8],
    frame: &[u8],
    receipt_key: &ReceiptKey,
) -> SealedVector {
    let sig_len = keys.public(signer).size();
    let signed_len = frame.len() - sig_len - varint(sig_len).len();
    let ct_len = plaintext.len() + 16;
    let aad_len = signed_len - ct_len - varint(ct_len).len();
    let command = kind == "sealed-command";
    // A command draws the CEK, the OAEP seed, then the salt; a response the salt alone.
    let salt_at = if command { 64 } else { 0 };
    SealedVector {
        name: name.into(),
        kind: kind.into(),
        signer: signer.into(),
        recipient: recipient.into(),
        sender_key_id: h(keys.public(signer).id().0),
        recipient_key_id: h(keys.public(recipient).id().0),
        rng_seed: h(seed),
        cek: command.then(|| h(&rng.drawn[..32])),
        oaep_seed: command.then(|| h(&rng.drawn[32..64])),
        pss_salt: h(&rng.drawn[salt_at..salt_at + 32]),
        receipt_key: h(receipt_key.to_bytes()),
        nonce: (!command).then(|| h(&hd.msg_id.0[..12])),
        header: header_j(hd),
        in_reply_to: in_reply_to.map(h),
        call,
        outcome,
        plaintext: h(plaintext),
        aad_len,
        signed_len,
        frame: h(frame),
    }
}

/// RFC 5869 with SHA-256, written from docs/PROTOCOL.md §5.4 rather than
/// through the library: `PRK = HMAC(zeros, cek)`, `OKM = HMAC(PRK, label ‖ msg_id ‖ 01)`.
fn receipt_key_of(cek: &[u8], command_msg_id: &[u8]) -> [u8; 32] {
    let prk = hmac_sha256(&[0u8; 32], cek);
    hmac_sha256(&prk, &[RECEIPT_KEY_LABEL, command_msg_id, &[1]].concat())
}

/// The header of `dev-sealed`'s response with message id `seq(msg)`,
/// issued a second after the vectors' commands and expiring with them.
fn response_header(topic: &str, msg: u8) -> Header<'_> {
    Header { device: SEALED_DEV, topic, msg_id: MsgId(seq(msg)), issued_at: NOW + 1, expires_at: NOW + 300 }
}

struct Bases<'a> {
    sealed: &'a [u8],
    response: &'a [u8],
    receipt_key: &'a ReceiptKey,
    reply_to: &'a SealedReplyTo,
    /// The device that opened `command-2048` and sealed `response-2048`, and what it answered.
    device: &'a SealedDevice<'a>,
    outcome: &'a Outcome<'a>,
    explicit: &'a [u8],
    hidden: &'a [u8],
    explicit_resp: &'a [u8],
    hidden_resp: &'a [u8],
    challenge: [u8; 16],
    hidden_challenge: [u8; 16],
}

fn sealed_device(trusted: &[&str], arrived_on: &str, now: u64, floor: u64, seen: Vec<Seen>) -> Receiver {
    Receiver::SealedDevice {
        device: SEALED_DEV.into(),
        key: "device-2048".into(),
        trusted: trusted.iter().map(|s| s.to_string()).collect(),
        arrived_on: arrived_on.into(),
        now,
        replay_floor: floor,
        replay_seen: seen,
        replay_not_before: 0,
    }
}

fn challenge_device(arrived_on: &str, monotonic_ms: u64, unix_secs: Option<u64>, outstanding: &[[u8; 16]]) -> Receiver {
    Receiver::ChallengeDevice {
        device: CHAL_DEV.into(),
        key: CHAL_DEV.into(),
        arrived_on: arrived_on.into(),
        monotonic_ms,
        unix_secs,
        lifetime_ms: CHALLENGE_LIFETIME_MS,
        outstanding: outstanding.iter().map(|c| Outstanding { challenge: h(c), issued_ms: 0 }).collect(),
        registered: registry_j(),
        executed: vec![],
        executed_floor: 0,
    }
}

/// One negative vector with an explicit frame.
fn neg(name: &str, description: &str, receiver: Receiver, frame: Vec<u8>, expected: &str) -> NegativeVector {
    NegativeVector {
        name: name.into(),
        description: description.into(),
        receiver,
        frame: Some(h(frame)),
        frame_fill: None,
        expected_error: expected.into(),
    }
}

fn negatives(keys: &Keys, out: &mut Vec<NegativeVector>, b: &Bases<'_>) {
    let s_cmd = topic_s(SEALED_DEV, Channel::Command);
    let s_resp = topic_s(SEALED_DEV, Channel::Response);
    let c_cmd = topic_s(CHAL_DEV, Channel::Command);
    let c_resp = topic_s(CHAL_DEV, Channel::Response);
    let at = NOW + 5;
    let dev = || sealed_device(&["controller-2048"], &s_cmd, at, 0, vec![]);
    let cdev = |unix| challenge_device(&c_cmd, 10, unix, &[b.challenge, b.hidden_challenge]);
    let call = set_interval();
    let seal_with = |signer: &str, recipient: &str, hd: Header<'_>| {
        SealedController::new(keys.private(signer))
            .seal_command(&mut VectorRng::new(b"negative"), keys.public(recipient), &hd, &call)
            .unwrap()
            .frame
    };
    let hd = |device, topic, issued_at, expires_at| Header {
        device,
        topic,
        msg_id: MsgId(seq(0x80)),
        issued_at,
        expires_at,
    };

    // --- framing, both modes
    out.push(neg("bad-version", "first byte is not 1", dev(), flip(b.sealed, 0, 0x03), "unsupported_version"));
    out.push(neg(
        "unknown-kind",
        "kind byte 9",
        dev(),
        {
            let mut f = b.sealed.to_vec();
            f[1] = 9;
            f
        },
        "unknown_kind",
    ));
    out.push(neg("empty", "zero bytes", dev(), vec![], "truncated"));
    out.push(neg(
        "truncated-sealed",
        "last byte of the signature missing",
        dev(),
        b.sealed[..b.sealed.len() - 1].to_vec(),
        "truncated",
    ));
    out.push(neg(
        "trailing-byte",
        "a byte appended after the signature",
        dev(),
        [b.sealed, &[0]].concat(),
        "malformed",
    ));
    out.push(neg(
        "challenge-to-sealed-device",
        "mode confusion: a valid challenge-mode command given to a sealed-mode device",
        dev(),
        b.explicit.to_vec(),
        "wrong_kind",
    ));
    out.push(neg(
        "sealed-to-challenge-device",
        "mode confusion: a valid sealed command given to a challenge-mode device",
        cdev(None),
        b.sealed.to_vec(),
        "wrong_kind",
    ));
    out.push(neg(
        "challenge-body-under-sealed-kind",
        "mode confusion: a challenge command whose kind byte was changed to sealed-command",
        dev(),
        {
            let mut f = b.explicit.to_vec();
            f[1] = 1;
            f
        },
        "truncated",
    ));
    out.push(neg(
        "sealed-body-under-challenge-kind",
        "mode confusion: a sealed command whose kind byte was changed to challenge-command",
        cdev(None),
        {
            let mut f = b.sealed.to_vec();
            f[1] = 5;
            f
        },
        "malformed",
    ));

    // --- sealed device: header checks
    out.push(neg(
        "wrong-device",
        "sealed for dev-other, delivered to dev-sealed",
        dev(),
        seal_with("controller-2048", "device-2048", hd("dev-other", &s_cmd, NOW, NOW + 300)),
        "wrong_device",
    ));
    out.push(neg(
        "wrong-topic",
        "header names the response topic",
        dev(),
        seal_with("controller-2048", "device-2048", hd(SEALED_DEV, &s_resp, NOW, NOW + 300)),
        "wrong_topic",
    ));
    out.push(neg(
        "wrong-recipient",
        "content key wrapped for another device's key",
        dev(),
        seal_with("controller-2048", "device-3072", hd(SEALED_DEV, &s_cmd, NOW, NOW + 300)),
        "wrong_recipient",
    ));
    out.push(neg(
        "invalid-times",
        "expires before it is issued",
        dev(),
        seal_with("controller-2048", "device-2048", hd(SEALED_DEV, &s_cmd, NOW, NOW - 1)),
        "invalid_times",
    ));
    out.push(neg(
        "lifetime-too-long",
        "valid for 601 s",
        dev(),
        seal_with("controller-2048", "device-2048", hd(SEALED_DEV, &s_cmd, NOW, NOW + 601)),
        "lifetime_too_long",
    ));
    out.push(neg(
        "not-yet-valid",
        "issued 66 s in the receiver's future",
        dev(),
        seal_with("controller-2048", "device-2048", hd(SEALED_DEV, &s_cmd, at + 66, at + 100)),
        "not_yet_valid",
    ));
    out.push(neg(
        "expired",
        "expired 61 s before the receiver's now",
        dev(),
        seal_with("controller-2048", "device-2048", hd(SEALED_DEV, &s_cmd, at - 161, at - 61)),
        "expired",
    ));
    out.push(neg(
        "replayed",
        "the receiver already accepted this sender's message id",
        sealed_device(
            &["controller-2048"],
            &s_cmd,
            at,
            0,
            vec![Seen {
                sender_key_id: h(keys.public("controller-2048").id().0),
                msg_id: h(seq::<16>(0x60)),
                expires_at: NOW + 300,
            }],
        ),
        b.sealed.to_vec(),
        "replayed",
    ));
    out.push(neg(
        "beyond-replay-window",
        "expires at or before the replay cache's floor",
        sealed_device(&["controller-2048"], &s_cmd, at, NOW + 300, vec![]),
        b.sealed.to_vec(),
        "beyond_replay_window",
    ));
    out.push(neg(
        "issued-before-reset",
        "issued before the device lost its replay state: its reset floor (replay_not_before) is above issued_at",
        {
            let mut r = sealed_device(&["controller-2048"], &s_cmd, at, 0, vec![]);
            if let Receiver::SealedDevice { replay_not_before, .. } = &mut r {
                *replay_not_before = NOW + 1;
            }
            r
        },
        b.sealed.to_vec(),
        "beyond_replay_window",
    ));
    out.push(neg(
        "unknown-signer",
        "signed by a key the device does not trust",
        dev(),
        seal_with("intruder-2048", "device-2048", hd(SEALED_DEV, &s_cmd, NOW, NOW + 300)),
        "unknown_signer",
    ));
    out.push(neg(
        "revoked-signer",
        "the signing controller's key was removed from the device's keyring",
        sealed_device(&["controller-3072"], &s_cmd, at, 0, vec![]),
        b.sealed.to_vec(),
        "unknown_signer",
    ));
    // msg_id sits at a fixed offset: version, kind, 2 key ids, device, topic.
    let msg_id_at = 2 + 64 + 1 + SEALED_DEV.len() + 1 + s_cmd.len();
    out.push(neg(
        "tampered-header",
        "one bit of the message id flipped",
        dev(),
        flip(b.sealed, msg_id_at, 0x01),
        "bad_signature",
    ));
    out.push(neg(
        "tampered-signature",
        "one bit of the signature flipped",
        dev(),
        flip(b.sealed, b.sealed.len() - 1, 0x01),
        "bad_signature",
    ));
    let tail = b.sealed.len() - 256 - 2 - 1;
    out.push(neg(
        "undecryptable",
        "ciphertext changed, then re-signed by the trusted controller: signature valid, payload not",
        dev(),
        resign(&flip(b.sealed, tail, 0x01), "controller-2048"),
        "decrypt_failed",
    ));
    out.push(NegativeVector {
        name: "oversized".into(),
        description: "one byte over the 65536-byte limit".into(),
        receiver: dev(),
        frame: None,
        frame_fill: Some(Fill { byte: 1, len: 65537 }),
        expected_error: "too_large".into(),
    });

    // --- challenge device
    let ctl = ChallengeController::new(CHAL_DEV, keys.hmac(CHAL_DEV)).unwrap();
    let other = ChallengeController::new(CHAL_DEV, keys.hmac("dev-other")).unwrap();
    let cmd = |c: &ChallengeController<'_>, hd: Header<'_>, challenge: [u8; 16], call: &Call<'_>, form| {
        enc(|b| c.command(&hd, &challenge, call, form, b))
    };
    let chd = |device, topic, issued_at, expires_at| Header {
        device,
        topic,
        msg_id: MsgId(seq(0x90)),
        issued_at,
        expires_at,
    };
    out.push(neg(
        "challenge-wrong-device",
        "addressed to dev-other",
        cdev(None),
        cmd(&ctl, chd("dev-other", &c_cmd, NOW, NOW + 300), b.challenge, &call, Form::Explicit),
        "wrong_device",
    ));
    out.push(neg(
        "challenge-invalid-device-id",
        "device id with a '/'",
        cdev(None),
        cmd(&ctl, chd(CHAL_DEV, &c_cmd, NOW, NOW + 300), b.challenge, &call, Form::Explicit)
            .iter()
            .map(|&x| if x == b'-' { b'/' } else { x })
            .collect(),
        "invalid_id",
    ));
    out.push(neg(
        "challenge-wrong-topic",
        "names the response topic",
        cdev(None),
        cmd(&ctl, chd(CHAL_DEV, &c_resp, NOW, NOW + 300), b.challenge, &call, Form::Explicit),
        "wrong_topic",
    ));
    out.push(neg(
        "challenge-unknown",
        "answers a challenge the device never issued",
        cdev(None),
        cmd(&ctl, chd(CHAL_DEV, &c_cmd, NOW, NOW + 300), seq(0x77), &call, Form::Explicit),
        "unknown_challenge",
    ));
    out.push(neg(
        "challenge-copy-of-executed",
        "a genuine command over an outstanding challenge, but its msg_id is one the device executed (a copy, §6.5)",
        {
            let mut r = cdev(None);
            if let Receiver::ChallengeDevice { executed, .. } = &mut r {
                executed.push(Executed { msg_id: h(seq::<16>(0x20)), expires_at: NOW + 300 });
            }
            r
        },
        b.explicit.to_vec(),
        "replayed",
    ));
    out.push(neg(
        "challenge-beyond-floor",
        "a genuine command over an outstanding challenge, expiring at the floor the device raised when it forgot a command (§6.1)",
        {
            let mut r = cdev(None);
            if let Receiver::ChallengeDevice { executed_floor, .. } = &mut r {
                *executed_floor = NOW + 300;
            }
            r
        },
        b.explicit.to_vec(),
        "beyond_replay_window",
    ));
    out.push(neg(
        "challenge-expired-challenge",
        "the challenge was issued 30 s (its lifetime) ago on the device's monotonic clock",
        challenge_device(&c_cmd, CHALLENGE_LIFETIME_MS, None, &[b.challenge]),
        b.explicit.to_vec(),
        "unknown_challenge",
    ));
    out.push(neg(
        "challenge-expired",
        "the device has a clock and the header expired",
        cdev(Some(NOW + 400)),
        b.explicit.to_vec(),
        "expired",
    ));
    out.push(neg(
        "challenge-not-yet-valid",
        "the device has a clock and the header is from its future",
        cdev(Some(NOW - 100)),
        b.explicit.to_vec(),
        "not_yet_valid",
    ));
    out.push(neg(
        "challenge-bad-tag",
        "last tag byte flipped",
        cdev(None),
        flip(b.explicit, b.explicit.len() - 1, 0x01),
        "bad_tag",
    ));
    out.push(neg(
        "challenge-wrong-key",
        "tagged with another device's key",
        cdev(None),
        cmd(&other, chd(CHAL_DEV, &c_cmd, NOW, NOW + 300), b.challenge, &call, Form::Explicit),
        "bad_tag",
    ));
    let arg_at = b.explicit.len() - 32 - 1; // last byte of the last argument
    out.push(neg(
        "challenge-tampered-arg",
        "last argument byte changed, tag kept",
        cdev(None),
        flip(b.explicit, arg_at, 0x01),
        "bad_tag",
    ));
    out.push(neg(
        "hidden-no-match",
        "hidden tag over a command the device has not registered",
        cdev(None),
        cmd(
            &ctl,
            chd(CHAL_DEV, &c_cmd, NOW, NOW + 300),
            b.hidden_challenge,
            &Call::new("format-disk", &[]).unwrap(),
            Form::Hidden,
        ),
        "bad_tag",
    ));
    out.push(neg(
        "hidden-tampered",
        "hidden tag with one bit flipped",
        cdev(None),
        flip(b.hidden, b.hidden.len() - 5, 0x10),
        "bad_tag",
    ));
    out.push(neg(
        "challenge-response-as-command",
        "a response given to the device as a command",
        cdev(None),
        b.explicit_resp.to_vec(),
        "wrong_kind",
    ));
    out.push(neg(
        "challenge-truncated",
        "tag cut short",
        cdev(None),
        b.explicit[..b.explicit.len() - 1].to_vec(),
        "truncated",
    ));
    // Hand-built: name 'x', 17 empty arguments, then a zero tag. Limits are
    // checked before the tag, so no valid tag is needed.
    let mut too_many = b.explicit[..2].to_vec();
    let mut body =
        postcard::to_allocvec(&(CHAL_DEV, c_cmd.as_str(), seq::<16>(0x91), NOW, NOW + 300, b.challenge)).unwrap();
    body.extend([1u8, 1, b'x', 17]);
    body.extend([0u8; 17]);
    body.extend([0u8; 32]);
    too_many.extend(body);
    out.push(neg("challenge-too-many-args", "17 arguments (the limit is 16)", cdev(None), too_many, "limit_exceeded"));
    let mut bad_utf8 = b.explicit.to_vec();
    let name_at = b.explicit.len() - 32 - (2 + 1 + 1 + 1 + 7) - "set-interval".len();
    bad_utf8[name_at] = 0xff;
    out.push(neg("challenge-bad-utf8", "command name is not UTF-8", cdev(None), bad_utf8, "malformed"));
    // One spelling per value (§3.2): the genuine commands, each with its
    // expiry spelt one byte longer. The tags cover the values, so only the
    // decoder can tell.
    let expires = expires_at_offset(2, CHAL_DEV, &c_cmd, NOW);
    out.push(neg(
        "challenge-non-shortest-varint",
        "the genuine explicit command with expires_at spelt in 6 bytes instead of 5",
        cdev(None),
        lengthen(b.explicit, expires),
        "malformed",
    ));
    out.push(neg(
        "hidden-non-shortest-varint",
        "the genuine hidden command with expires_at spelt in 6 bytes instead of 5",
        cdev(None),
        lengthen(b.hidden, expires),
        "malformed",
    ));
    out.push(neg(
        "sealed-non-shortest-varint",
        "a sealed command with expires_at spelt in 6 bytes instead of 5",
        dev(),
        lengthen(b.sealed, expires_at_offset(2 + 32 + 32, SEALED_DEV, &s_cmd, NOW)),
        "malformed",
    ));

    // --- controllers reading responses
    let sctl = |in_reply_to: [u8; 16], arrived_on: &str| Receiver::SealedController {
        key: "controller-2048".into(),
        device: SEALED_DEV.into(),
        device_key: "device-2048".into(),
        arrived_on: arrived_on.into(),
        in_reply_to: h(in_reply_to),
        receipt_key: h(b.receipt_key.to_bytes()),
    };
    out.push(neg(
        "response-unexpected",
        "answers another command than the pending one",
        sctl(seq(0x61), &s_resp),
        b.response.to_vec(),
        "unexpected_reply",
    ));
    out.push(neg(
        "response-wrong-topic",
        "arrived on the command topic",
        sctl(seq(0x60), &s_cmd),
        b.response.to_vec(),
        "wrong_topic",
    ));
    out.push(neg(
        "response-tampered",
        "one bit of the signature flipped",
        sctl(seq(0x60), &s_resp),
        flip(b.response, b.response.len() - 1, 0x01),
        "bad_signature",
    ));
    // Signed by the device, but encrypted under a key not derived from the
    // pending command's CEK: what a device that never opened it would send.
    let other_key = SealedReplyTo { receipt_key: ReceiptKey::from_bytes([0x5a; 32]), ..b.reply_to.clone() };
    out.push(neg(
        "response-wrong-receipt-key",
        "signed by the device but encrypted under another key than the command's receipt key",
        sctl(seq(0x60), &s_resp),
        b.device
            .seal_response_to(&mut VectorRng::new(b"other key"), &other_key, b.outcome, MsgId(seq(0x71)), NOW + 1)
            .unwrap(),
        "decrypt_failed",
    ));
    let resp_hd = response_header(&s_resp, 0x72);
    out.push(neg(
        "response-retired-form",
        "a genuine receipt in the first form (kind 2: content key RSA-wrapped to the controller)",
        sctl(seq(0x60), &s_resp),
        old_form_receipt("device-2048", "controller-2048", &resp_hd, seq(0x60), b.outcome),
        "retired_kind",
    ));
    let cctl = |challenge: [u8; 16], in_reply_to: [u8; 16]| Receiver::ChallengeController {
        key: CHAL_DEV.into(),
        device: CHAL_DEV.into(),
        arrived_on: c_resp.clone(),
        challenge: h(challenge),
        in_reply_to: h(in_reply_to),
        candidates: candidates_j(),
    };
    out.push(neg(
        "challenge-response-unexpected",
        "answers another command",
        cctl(b.challenge, seq(0x22)),
        b.explicit_resp.to_vec(),
        "unexpected_reply",
    ));
    out.push(neg(
        "challenge-response-replayed",
        "an old response offered for a new exchange (other challenge)",
        cctl(seq(0x99), seq(0x20)),
        b.explicit_resp.to_vec(),
        "bad_tag",
    ));
    // From the end: tag (32), output (12), its length (1), code (1), status.
    // Flipping the status's low bit turns Ok into Failed.
    let status_at = b.explicit_resp.len() - 32 - 12 - 1 - 1 - 1;
    out.push(neg(
        "challenge-response-tampered",
        "status changed from ok to failed",
        cctl(b.challenge, seq(0x20)),
        flip(b.explicit_resp, status_at, 0x01),
        "bad_tag",
    ));
    out.push(neg(
        "challenge-response-non-shortest-varint",
        "the genuine response with its output length spelt in 2 bytes instead of 1",
        cctl(b.challenge, seq(0x20)),
        lengthen(b.explicit_resp, status_at + 2),
        "malformed",
    ));
    out.push(neg(
        "hidden-response-unknown",
        "hidden response matching no candidate",
        cctl(b.hidden_challenge, seq(0x21)),
        flip(b.hidden_resp, b.hidden_resp.len() - 1, 0x01),
        "bad_tag",
    ));
}

// ---------------------------------------------------------------- checking

fn frame_bytes(v: &NegativeVector) -> Vec<u8> {
    match (&v.frame, &v.frame_fill) {
        (Some(f), None) => unh(f),
        (None, Some(fill)) => vec![fill.byte; fill.len],
        _ => panic!("{}: exactly one of frame / frame_fill", v.name),
    }
}

/// Runs the receiver a negative vector describes; returns what it said.
fn run_receiver(keys: &Keys, r: &Receiver, frame: &[u8]) -> Result<(), Error> {
    match r {
        Receiver::SealedDevice {
            device,
            key,
            trusted,
            arrived_on,
            now,
            replay_floor,
            replay_seen,
            replay_not_before,
        } => {
            let ring: Keyring = trusted.iter().map(|k| keys.public(k).clone()).collect();
            let d = SealedDevice::new(device, keys.private(key), &ring, Policy::default())?;
            // Build the cache through its documented persistence format.
            let entries: Vec<([u8; 32], [u8; 16], u64)> =
                replay_seen.iter().map(|s| (arr(&s.sender_key_id), arr(&s.msg_id), s.expires_at)).collect();
            let mut state = vec![2u8];
            state.extend(postcard::to_allocvec(&(replay_floor, replay_not_before, entries)).unwrap());
            let mut cache = ReplayCache::restore(&state, 64, Policy::default(), *now)?;
            d.open_command(&mut VectorRng::new(b"blinding"), frame, arrived_on, *now, &mut cache).map(drop)
        }
        Receiver::ChallengeDevice {
            device,
            key,
            arrived_on,
            monotonic_ms,
            unix_secs,
            lifetime_ms,
            outstanding,
            registered,
            executed,
            executed_floor,
        } => {
            let d = ChallengeDevice::new(device, keys.hmac(key), Policy::default())?;
            let mut table = ChallengeTable::<8>::new(*lifetime_ms);
            for o in outstanding {
                table.issue(&mut Script::new(&unh(&o.challenge)), o.issued_ms);
            }
            for e in executed {
                table.record_executed(MsgId(arr(&e.msg_id)), e.expires_at, |_| false);
            }
            table.raise_floor(*executed_floor);
            let owned = Owned::new(registered, &[]);
            owned.with(|reg, _| {
                let clock = Clock { monotonic_ms: *monotonic_ms, unix_secs: *unix_secs };
                d.verify_command(frame, arrived_on, clock, &mut table, reg).map(drop)
            })
        }
        Receiver::SealedController { key, device, device_key, arrived_on, in_reply_to, receipt_key } => {
            SealedController::new(keys.private(key))
                .open_response(
                    frame,
                    arrived_on,
                    device,
                    keys.public(device_key),
                    MsgId(arr(in_reply_to)),
                    &ReceiptKey::from_bytes(arr(receipt_key)),
                )
                .map(drop)
        }
        Receiver::ChallengeController { key, device, arrived_on, challenge, in_reply_to, candidates } => {
            let c = ChallengeController::new(device, keys.hmac(key))?;
            let pending = Pending { challenge: arr(challenge), msg_id: MsgId(arr(in_reply_to)) };
            Owned::new(&[], candidates).with(|_, cands| c.read_response(frame, arrived_on, &pending, cands).map(drop))
        }
    }
}

fn check_challenge_vector(keys: &Keys, v: &ChallengeVector) {
    let key = keys.hmac(&v.key);
    let frame = unh(&v.frame);
    let ctl = ChallengeController::new(&v.device, key).unwrap();
    let dev = ChallengeDevice::new(&v.device, key, Policy::default()).unwrap();
    if let (Some(mac_input), Some(tag)) = (&v.mac_input, &v.tag) {
        // The tag is HMAC over the documented MAC input, and is the frame's last 32 bytes.
        let m = unh(mac_input);
        assert_eq!(h(hmac_sha256(key.as_bytes(), &m)), *tag, "{}", v.name);
        assert!(v.frame.ends_with(tag.as_str()), "{}", v.name);
        let form = if v.form.as_deref() == Some("hidden") { 0 } else { 1 };
        let hd = v.header.as_ref().unwrap();
        let challenge = unh(v.challenge.as_ref().unwrap());
        let expected = match v.kind.as_str() {
            "challenge-command" => command_mac_input(form, &challenge, hd, v.call.as_ref().unwrap()),
            _ => response_mac_input(form, &challenge, hd, v.in_reply_to.as_ref().unwrap(), v.outcome.as_ref().unwrap()),
        };
        assert_eq!(m, expected, "{}: MAC input differs from the spec", v.name);
    }
    match v.kind.as_str() {
        "challenge-request" => {
            let mut buf = [0u8; 256];
            let n = ctl.request(MsgId(arr(v.request_msg_id.as_ref().unwrap())), &mut buf).unwrap();
            assert_eq!(&buf[..n], &frame[..]);
        }
        "challenge" => {
            let offer = ctl.read_challenge(&frame, MsgId(arr(v.request_msg_id.as_ref().unwrap()))).unwrap();
            assert_eq!(h(offer.challenge), *v.challenge.as_ref().unwrap());
            assert_eq!(Some(offer.ttl_ms), v.ttl_ms);
            let mut rng = VectorRng::new(&unh(v.rng_seed.as_ref().unwrap()));
            let mut first = [0u8; 16];
            rand_core::Rng::fill_bytes(&mut rng, &mut first);
            assert_eq!(h(first), *v.challenge.as_ref().unwrap(), "challenge = first 16 RNG bytes");
        }
        "challenge-command" => {
            let hd = v.header.as_ref().unwrap();
            let mut table = ChallengeTable::<2>::new(CHALLENGE_LIFETIME_MS);
            table.issue(&mut Script::new(&unh(v.challenge.as_ref().unwrap())), 0);
            let registered = v.registered.clone().unwrap_or_default();
            Owned::new(&registered, &[]).with(|reg, _| {
                let clock = Clock { monotonic_ms: 1, unix_secs: Some(hd.issued_at + 1) };
                let verified = dev.verify_command(&frame, &hd.topic, clock, &mut table, reg).unwrap();
                let c = v.call.as_ref().unwrap();
                assert_eq!(verified.call.name, c.name);
                assert_eq!(
                    verified.call.args.iter().collect::<Vec<_>>(),
                    c.args.iter().map(String::as_str).collect::<Vec<_>>()
                );
                assert_eq!(verified.registered, v.matches);
                assert_eq!(verified.header, header_of(hd));
            });
        }
        "challenge-response" => {
            let hd = v.header.as_ref().unwrap();
            let pending = Pending {
                challenge: arr(v.challenge.as_ref().unwrap()),
                msg_id: MsgId(arr(v.in_reply_to.as_ref().unwrap())),
            };
            let cands = v.candidates.clone().unwrap_or_default();
            Owned::new(&[], &cands).with(|_, c| match ctl.read_response(&frame, &hd.topic, &pending, c).unwrap() {
                Answer::Explicit(o) => assert_eq!(outcome_j(&o), *v.outcome.as_ref().unwrap()),
                Answer::Hidden(i) => {
                    assert_eq!(Some(i), v.matches);
                    assert_eq!(cands[i], *v.outcome.as_ref().unwrap());
                }
            });
        }
        other => panic!("unknown kind {other}"),
    }
}

/// Checks a sealed vector from the JSON and docs/PROTOCOL.md alone (raw
/// RSA, the spec's HKDF), then has the library on `keys`' backend open it.
fn check_sealed_vector(keys: &Keys, v: &SealedVector) {
    let frame = unh(&v.frame);
    assert_eq!(h(keys.public(&v.signer).id().0), v.sender_key_id);
    assert_eq!(h(keys.public(&v.recipient).id().0), v.recipient_key_id);
    let command = v.kind == "sealed-command";
    // The RNG stream is what the vector says it is.
    let mut rng = VectorRng::new(&unh(&v.rng_seed));
    let mut first = [0u8; 96];
    rand_core::Rng::fill_bytes(&mut rng, &mut first);
    if command {
        assert_eq!(Some(h(&first[..32])), v.cek);
        assert_eq!(Some(h(&first[32..64])), v.oaep_seed);
        assert_eq!(h(&first[64..]), v.pss_salt);
    } else {
        assert_eq!((&v.cek, &v.oaep_seed), (&None, &None), "{}: a response wraps nothing", v.name);
        assert_eq!(h(&first[..32]), v.pss_salt);
    }

    // Offsets: signature last, ciphertext before it, AAD before that.
    let sig_len = keys.public(&v.signer).size();
    assert_eq!(frame.len(), v.signed_len + varint(sig_len).len() + sig_len);
    let ct = &frame[v.aad_len + varint(unh(&v.plaintext).len() + 16).len()..v.signed_len];
    let signature = &frame[frame.len() - sig_len..];

    // PSS over label ‖ signed prefix, with the listed salt.
    use rsa::pkcs8::DecodePublicKey;
    let signer_pub = rsa::RsaPublicKey::from_public_key_der(keys.public(&v.signer).to_der()).unwrap();
    let message = [SIGNATURE_LABEL, &frame[..v.signed_len]].concat();
    assert_eq!(h(pss_salt(&signer_pub, signature, &message)), v.pss_salt, "{}: PSS salt", v.name);
    let (key, nonce) = if command {
        // OAEP with the listed seed, wrapping the listed CEK; the receipt key from it.
        let wrapped_len = keys.public(&v.recipient).size();
        let wrapped = &frame[v.aad_len - wrapped_len..v.aad_len];
        let (seed, cek) = oaep_open(&rsa_private(&keys_pem(&v.recipient)), wrapped);
        assert_eq!(Some(h(seed)), v.oaep_seed, "{}: OAEP seed", v.name);
        assert_eq!(Some(h(&cek)), v.cek, "{}: CEK", v.name);
        assert_eq!(h(receipt_key_of(&cek, &unh(&v.header.msg_id))), v.receipt_key, "{}: receipt key", v.name);
        (cek, vec![0u8; 12])
    } else {
        // The response's key is its command's receipt key; its nonce, its msg_id's first 12 bytes.
        let nonce = unh(&v.header.msg_id)[..12].to_vec();
        assert_eq!(Some(h(&nonce)), v.nonce, "{}: nonce", v.name);
        (unh(&v.receipt_key), nonce)
    };
    use chacha20poly1305::aead::{Aead, KeyInit as _, Payload};
    let aead = chacha20poly1305::ChaCha20Poly1305::new(&chacha20poly1305::Key::try_from(&key[..]).unwrap());
    let nonce = chacha20poly1305::Nonce::try_from(&nonce[..]).unwrap();
    let pt = aead.decrypt(&nonce, Payload { msg: ct, aad: &frame[..v.aad_len] }).unwrap();
    assert_eq!(h(&pt), v.plaintext, "{}: plaintext", v.name);

    // And the library opens it.
    let hd = &v.header;
    match v.kind.as_str() {
        "sealed-command" => {
            let ring: Keyring = [keys.public(&v.signer).clone()].into_iter().collect();
            let d = SealedDevice::new(&hd.device, keys.private(&v.recipient), &ring, Policy::default()).unwrap();
            let mut cache = ReplayCache::new(4, Policy::default());
            let c = d.open_command(&mut VectorRng::new(b"b"), &frame, &hd.topic, hd.issued_at, &mut cache).unwrap();
            let call = v.call.as_ref().unwrap();
            assert_eq!((&c.name, &c.args), (&call.name, &call.args));
            assert_eq!(h(c.reply_to().receipt_key.to_bytes()), v.receipt_key, "{}: library's receipt key", v.name);
        }
        "sealed-response" => {
            let r = SealedController::new(keys.private(&v.recipient))
                .open_response(
                    &frame,
                    &hd.topic,
                    &hd.device,
                    keys.public(&v.signer),
                    MsgId(arr(v.in_reply_to.as_ref().unwrap())),
                    &ReceiptKey::from_bytes(arr(&v.receipt_key)),
                )
                .unwrap();
            let o = v.outcome.as_ref().unwrap();
            assert_eq!((r.status as u8, r.code, h(&r.output)), (o.status, o.code, o.output.clone()));
        }
        other => panic!("unknown kind {other}"),
    }
}

// ---------------------------------------------------------------- the tests

fn read<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = vectors_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write_or_compare<T: Serialize + PartialEq + std::fmt::Debug + serde::de::DeserializeOwned>(
    name: &str,
    generated: &T,
) {
    let path = vectors_dir().join(name);
    let text = serde_json::to_string_pretty(generated).unwrap() + "\n";
    if std::env::var_os("MQSEAL_BLESS").is_some() {
        std::fs::write(&path, text).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "{} differs from what the library generates now. If the wire format changed on purpose, \
         run `MQSEAL_BLESS=1 cargo test -p mqseal-proto --test vectors` and update docs/PROTOCOL.md.",
        path.display()
    );
}

#[test]
fn committed_vectors_match_the_library() {
    let keys = Keys::load();
    let g = generate(&keys);
    // The generator's own expectations hold before anything is written.
    for v in &g.negative.vectors {
        let err = run_receiver(&keys, &v.receiver, &frame_bytes(v)).expect_err(&v.name);
        assert_eq!(err.code(), v.expected_error, "{}: {err}", v.name);
    }
    write_or_compare("challenge.json", &g.challenge);
    write_or_compare("sealed.json", &g.sealed);
    write_or_compare("negative.json", &g.negative);
}

/// On every backend built in (aws-lc and the rsa crate in the tests).
#[test]
fn positive_vectors_verify_from_the_json_alone() {
    assert_eq!(backend::ALL.len(), 2, "the tests build both backends");
    let chal: File<ChallengeVector> = read("challenge.json");
    assert_eq!(chal.vectors.len(), 6);
    let sealed: File<SealedVector> = read("sealed.json");
    assert_eq!(sealed.vectors.len(), 4);
    for b in backend::ALL {
        let keys = Keys::load_with(*b);
        chal.vectors.iter().for_each(|v| check_challenge_vector(&keys, v));
        sealed.vectors.iter().for_each(|v| check_sealed_vector(&keys, v));
    }
}

/// On every backend built in.
#[test]
fn negative_vectors_fail_with_their_error() {
    let neg: File<NegativeVector> = read("negative.json");
    for b in backend::ALL {
        let keys = Keys::load_with(*b);
        for v in &neg.vectors {
            match run_receiver(&keys, &v.receiver, &frame_bytes(v)) {
                Ok(()) => panic!("{} on {}: accepted", v.name, b.name()),
                Err(e) => assert_eq!(e.code(), v.expected_error, "{} on {}: {e}", v.name, b.name()),
            }
        }
    }
}

/// The committed envelopes are what the `rsa` crate seals from the
/// vector RNG; the generator must run on it, whatever the default is.
#[test]
fn vectors_are_generated_on_the_backend_that_takes_the_rng() {
    let keys = Keys::load();
    assert_eq!(keys.private("controller-2048").public().backend().name(), RustCrypto.name());
}

/// One negative vector per rejection reason a receiver can give.
#[test]
fn every_rejection_reason_has_a_vector() {
    let neg: File<NegativeVector> = read("negative.json");
    let have: BTreeSet<&str> = neg.vectors.iter().map(|v| v.expected_error.as_str()).collect();
    let reasons = [
        Error::TooLarge { len: 0 },
        Error::UnsupportedVersion(0),
        Error::UnknownKind(0),
        Error::RetiredKind(2),
        Error::WrongKind { expected: mqseal_proto::Kind::Challenge, found: mqseal_proto::Kind::Challenge },
        Error::Truncated,
        Error::Malformed(Text(&"")),
        Error::LimitExceeded { field: Text(&""), max: 0 },
        Error::InvalidId,
        Error::WrongDevice,
        Error::WrongTopic,
        Error::WrongRecipient,
        Error::InvalidTimes,
        Error::LifetimeTooLong,
        Error::NotYetValid,
        Error::Expired,
        Error::Replayed,
        Error::BeyondReplayWindow,
        Error::UnknownSigner,
        Error::BadSignature,
        Error::DecryptFailed,
        Error::UnknownChallenge,
        Error::BadTag,
        Error::UnexpectedReply,
    ];
    let missing: Vec<&str> = reasons.iter().map(Error::code).filter(|c| !have.contains(c)).collect();
    assert!(missing.is_empty(), "no negative vector for {missing:?}");
}
