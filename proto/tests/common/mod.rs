//! Fixtures shared by the integration tests: the test keys and the
//! deterministic RNG the test vectors are generated with.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use mqseal_proto::challenge::HmacKey;
use mqseal_proto::sealed::backend::{Backend, RustCrypto};
use mqseal_proto::sealed::{PrivateKey, PublicKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The RNG of the test vectors, specified in docs/PROTOCOL.md so that other
/// implementations can reproduce it: the stream
/// `SHA-256(seed ‖ be64(0)) ‖ SHA-256(seed ‖ be64(1)) ‖ …`, consumed in order.
pub struct VectorRng {
    seed: Vec<u8>,
    counter: u64,
    block: [u8; 32],
    used: usize,
    /// Every byte handed out, so a vector can list what went where.
    pub drawn: Vec<u8>,
}

impl VectorRng {
    pub fn new(seed: &[u8]) -> Self {
        VectorRng { seed: seed.to_vec(), counter: 0, block: [0; 32], used: 32, drawn: Vec::new() }
    }
}

impl rand_core::TryRng for VectorRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for d in dst.iter_mut() {
            if self.used == 32 {
                let mut h = Sha256::new();
                h.update(&self.seed);
                h.update(self.counter.to_be_bytes());
                self.block = h.finalize().into();
                self.counter += 1;
                self.used = 0;
            }
            *d = self.block[self.used];
            self.used += 1;
        }
        self.drawn.extend_from_slice(dst);
        Ok(())
    }
}

// Only for tests: the vectors need reproducible "randomness".
impl rand_core::TryCryptoRng for VectorRng {}

pub fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

#[derive(Deserialize)]
struct KeyFile {
    rsa: BTreeMap<String, RsaEntry>,
    hmac: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RsaEntry {
    bits: usize,
    private_pkcs8_pem: String,
    public_spki_pem: String,
}

/// The published test keys of `proto/tests/vectors/keys.json`.
pub struct Keys {
    rsa: BTreeMap<String, (PrivateKey, PublicKey)>,
    hmac: BTreeMap<String, HmacKey>,
}

impl Keys {
    /// The keys on the `rsa` crate: the backend that takes the caller's
    /// RNG, so that what they seal is reproducible.
    pub fn load() -> Self {
        Keys::load_with(&RustCrypto)
    }

    /// The keys on `backend`.
    pub fn load_with(backend: &'static dyn Backend) -> Self {
        let text = std::fs::read_to_string(vectors_dir().join("keys.json")).unwrap();
        let file: KeyFile = serde_json::from_str(&text).unwrap();
        let rsa = file
            .rsa
            .into_iter()
            .map(|(name, e)| {
                let private = PrivateKey::from_pkcs8_pem(&e.private_pkcs8_pem).unwrap().with_backend(backend).unwrap();
                let public = PublicKey::from_pem(&e.public_spki_pem).unwrap().with_backend(backend).unwrap();
                assert_eq!(private.public().backend().name(), backend.name());
                assert_eq!(private.public(), &public, "{name}: halves must match");
                assert_eq!(public.bits(), e.bits, "{name}");
                (name, (private, public))
            })
            .collect();
        let hmac = file
            .hmac
            .into_iter()
            .map(|(name, hex_key)| (name, HmacKey::from_slice(&hex::decode(hex_key).unwrap()).unwrap()))
            .collect();
        Keys { rsa, hmac }
    }

    pub fn private(&self, name: &str) -> &PrivateKey {
        &self.rsa.get(name).unwrap_or_else(|| panic!("no test key {name}")).0
    }

    pub fn public(&self, name: &str) -> &PublicKey {
        &self.rsa.get(name).unwrap_or_else(|| panic!("no test key {name}")).1
    }

    pub fn hmac(&self, name: &str) -> &HmacKey {
        self.hmac.get(name).unwrap_or_else(|| panic!("no hmac key {name}"))
    }
}

/// Hands out exactly the bytes it was given: how a test places a known
/// challenge in a `ChallengeTable` (which draws its challenges from the RNG).
pub struct Script {
    bytes: Vec<u8>,
    pos: usize,
}

impl Script {
    pub fn new(bytes: &[u8]) -> Self {
        Script { bytes: bytes.to_vec(), pos: 0 }
    }
}

impl rand_core::TryRng for Script {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        unimplemented!("Script only fills bytes")
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        unimplemented!("Script only fills bytes")
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        let end = self.pos + dst.len();
        dst.copy_from_slice(self.bytes.get(self.pos..end).expect("Script ran out of bytes"));
        self.pos = end;
        Ok(())
    }
}

impl rand_core::TryCryptoRng for Script {}

/// The private key PEM of a test key, for tests that use the rsa crate
/// directly (independently of the library).
pub fn keys_pem(name: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vectors_dir().join("keys.json")).unwrap()).unwrap();
    v["rsa"][name]["private_pkcs8_pem"].as_str().unwrap().to_owned()
}

/// postcard's unsigned varint (LEB128).
pub fn varint(mut n: usize) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Replaces the signature of a (modified) sealed envelope with one by
/// `signer`, as a trusted but buggy or malicious controller could. Written
/// from docs/PROTOCOL.md with the rsa crate, not with the library, so it
/// also checks the spec's account of what is signed. The old signature must
/// have the new signer's length.
pub fn resign(frame: &[u8], signer: &str) -> Vec<u8> {
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::signature::SignatureEncoding;
    use rsa::signature::hazmat::RandomizedPrehashSigner;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(&keys_pem(signer)).unwrap();
    let k = key.size();
    let signed = &frame[..frame.len() - k - varint(k).len()];
    let mut hh = Sha256::new();
    hh.update(mqseal_proto::sealed::SIGNATURE_LABEL);
    hh.update(signed);
    let sk = rsa::pss::SigningKey::<Sha256>::new_with_salt_len(key, 32);
    let sig = sk.sign_prehash_with_rng(&mut VectorRng::new(b"resign"), &hh.finalize()).unwrap().to_bytes();
    let mut out = signed.to_vec();
    out.extend(varint(sig.len()));
    out.extend_from_slice(&sig);
    out
}

/// Runs an encoder that writes into a `&mut [u8]` (the no-alloc API) and
/// returns what it wrote.
pub fn enc(f: impl FnOnce(&mut [u8]) -> mqseal_proto::Result<usize>) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let n = f(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// A receipt in the first, retired form (kind 2, docs/PROTOCOL.md §5.4):
/// a fresh content key RSA-wrapped to the controller, built the way agents
/// before receipt keys built it — what the refusal of that form is tested
/// against.
pub fn old_form_receipt(
    device: &str,
    controller: &str,
    header: &mqseal_proto::Header<'_>,
    in_reply_to: [u8; 16],
    outcome: &mqseal_proto::Outcome<'_>,
) -> Vec<u8> {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::signature::SignatureEncoding;
    use rsa::signature::hazmat::RandomizedPrehashSigner;
    let mut rng = VectorRng::new(b"old-form receipt");
    let signer = rsa::RsaPrivateKey::from_pkcs8_pem(&keys_pem(device)).unwrap();
    let recipient = rsa::RsaPrivateKey::from_pkcs8_pem(&keys_pem(controller)).unwrap().to_public_key();
    let id = |name: &str| PrivateKey::from_pkcs8_pem(&keys_pem(name)).unwrap().id().0;
    let mut cek = [0u8; 32];
    rand_core::Rng::fill_bytes(&mut rng, &mut cek);
    let oaep = rsa::Oaep::<Sha256>::new_with_label(mqseal_proto::sealed::OAEP_LABEL);
    let wrapped = recipient.encrypt(&mut rng, oaep, &cek).unwrap();
    let mut frame = vec![1u8, 2];
    frame.extend_from_slice(&id(device));
    frame.extend_from_slice(&id(controller));
    frame.extend(postcard_of::header(header));
    frame.extend_from_slice(&in_reply_to);
    frame.extend(varint(wrapped.len()));
    frame.extend_from_slice(&wrapped);
    let aead = chacha20poly1305::ChaCha20Poly1305::new(&cek.into());
    let plaintext = postcard_of::outcome(outcome);
    let ct = aead.encrypt(&Default::default(), Payload { msg: &plaintext, aad: &frame }).unwrap();
    frame.extend(varint(ct.len()));
    frame.extend_from_slice(&ct);
    let mut hh = Sha256::new();
    hh.update(mqseal_proto::sealed::SIGNATURE_LABEL);
    hh.update(&frame);
    let sk = rsa::pss::SigningKey::<Sha256>::new_with_salt_len(signer, 32);
    let sig = sk.sign_prehash_with_rng(&mut rng, &hh.finalize()).unwrap().to_bytes();
    frame.extend(varint(sig.len()));
    frame.extend_from_slice(&sig);
    frame
}

/// The postcard encoding of envelope values, by postcard itself through
/// serde mirrors of the types: an encoder independent of `proto`'s own
/// (`wire::Encode`), for building frames by hand and checking it.
pub mod postcard_of {
    use mqseal_proto::{Call, Header, Outcome};
    use serde::Serialize;

    #[derive(Serialize)]
    struct H<'a> {
        device: &'a str,
        topic: &'a str,
        msg_id: [u8; 16],
        issued_at: u64,
        expires_at: u64,
    }

    /// serde's unit variant: its index as a varint, like `Status`.
    #[derive(Serialize)]
    struct O<'a> {
        status: u32,
        code: i32,
        #[serde(with = "serde_bytes_ref")]
        output: &'a [u8],
    }

    /// `&[u8]` as postcard bytes (length + bytes), as serde_bytes would.
    mod serde_bytes_ref {
        pub fn serialize<S: serde::Serializer>(b: &&[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(b)
        }
    }

    #[derive(Serialize)]
    struct C<'a> {
        name: &'a str,
        args: Vec<&'a str>,
    }

    pub fn header(h: &Header<'_>) -> Vec<u8> {
        postcard::to_allocvec(&H {
            device: h.device,
            topic: h.topic,
            msg_id: h.msg_id.0,
            issued_at: h.issued_at,
            expires_at: h.expires_at,
        })
        .unwrap()
    }

    pub fn outcome(o: &Outcome<'_>) -> Vec<u8> {
        postcard::to_allocvec(&O { status: u32::from(o.status as u8), code: o.code, output: o.output }).unwrap()
    }

    pub fn call(c: &Call<'_>) -> Vec<u8> {
        postcard::to_allocvec(&C { name: c.name, args: c.args.iter().collect() }).unwrap()
    }
}
