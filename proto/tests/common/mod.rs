//! Fixtures shared by the integration tests: the test keys and the
//! deterministic RNG the test vectors are generated with.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use mqseal_proto::challenge::HmacKey;
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
    pub fn load() -> Self {
        let text = std::fs::read_to_string(vectors_dir().join("keys.json")).unwrap();
        let file: KeyFile = serde_json::from_str(&text).unwrap();
        let rsa = file
            .rsa
            .into_iter()
            .map(|(name, e)| {
                let private = PrivateKey::from_pkcs8_pem(&e.private_pkcs8_pem).unwrap();
                let public = PublicKey::from_pem(&e.public_spki_pem).unwrap();
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
