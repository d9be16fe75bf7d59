//! Password hashes, in the formats other MQTT brokers already read.
//!
//! Device secrets are 256-bit random strings made by a machine, so one round
//! of salted SHA-256 is enough: nobody can guess them, and the salt only stops
//! two devices with the same secret from sharing a hash. The layout is EMQX's
//! "sha256, salt suffix": `hex(sha256(password ‖ salt))`, where the salt is
//! the stored *string* (not hex-decoded), so an EMQX cluster can read the same
//! collection. Human passwords are guessable, so they get PBKDF2-HMAC-SHA256
//! with a per-user iteration count that can be raised over time.
//!
//! Every comparison goes through [`subtle`] and every stored hash is decoded
//! to the same length before comparing, so the time taken does not depend on
//! where the first wrong byte is.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// How a record's `password_hash` was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// `hex(sha256(password ‖ salt))`: EMQX's `sha256` with `salt_position = suffix`.
    Sha256,
    /// `hex(pbkdf2_hmac_sha256(password, salt, iterations, 32))`.
    Pbkdf2Sha256,
}

/// OWASP's 2023 recommendation for PBKDF2-HMAC-SHA256.
pub const DEFAULT_PBKDF2_ITERATIONS: u32 = 600_000;

/// Below this a human password hash is too cheap to brute-force offline; the
/// store refuses to write it (tests use exactly this to stay fast).
pub const MIN_PBKDF2_ITERATIONS: u32 = 1_000;

/// Random salt of 16 bytes, hex-encoded, because EMQX treats the salt as a
/// string and a printable salt survives every tool that touches the document.
pub fn new_salt() -> Result<String, getrandom::Error> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt)?;
    Ok(hex::encode(salt))
}

/// A 256-bit random secret, hex-encoded: what device credentials and the
/// first admin password are made of.
pub fn new_secret() -> Result<Zeroizing<String>, getrandom::Error> {
    let mut raw = Zeroizing::new([0u8; 32]);
    getrandom::fill(raw.as_mut())?;
    Ok(Zeroizing::new(hex::encode(raw.as_ref())))
}

/// EMQX `sha256` + suffix salt, as lowercase hex.
pub fn sha256_salted(password: &[u8], salt: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(password);
    hasher.update(salt.as_bytes());
    hex::encode(hasher.finalize())
}

/// The seed design's layout: unsalted SHA-256 of the password, lowercase hex.
pub fn sha256_legacy(password: &[u8]) -> String {
    hex::encode(Sha256::digest(password))
}

/// PBKDF2-HMAC-SHA256 with a 32-byte output, as lowercase hex.
pub fn pbkdf2_sha256(password: &[u8], salt: &str, iterations: u32) -> String {
    let out: [u8; 32] = pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt.as_bytes(), iterations);
    hex::encode(out)
}

/// Computes the hash `algorithm` would store for `password`.
pub fn compute(algorithm: Algorithm, password: &[u8], salt: &str, iterations: u32) -> String {
    match algorithm {
        Algorithm::Sha256 => sha256_salted(password, salt),
        Algorithm::Pbkdf2Sha256 => pbkdf2_sha256(password, salt, iterations),
    }
}

/// Constant-time comparison of a computed hash with a stored one.
///
/// The stored value is lowercased and decoded to 32 bytes first; anything
/// that is not 64 hex digits compares unequal (after the same amount of work)
/// rather than erroring, so a corrupt record looks like a wrong password.
pub fn hashes_equal(computed_hex: &str, stored_hex: &str) -> bool {
    let mut computed = [0u8; 32];
    let mut stored = [0u8; 32];
    let computed_ok = hex::decode_to_slice(computed_hex, &mut computed).is_ok();
    let stored_ok = hex::decode_to_slice(stored_hex.to_ascii_lowercase(), &mut stored).is_ok();
    bool::from(computed.ct_eq(&stored)) & computed_ok & stored_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    /// EMQX's documentation example for its MongoDB authenticator: password
    /// `public`, salt `slat_foo123` (sic), `sha256` with the salt as a suffix.
    #[test]
    fn emqx_documented_vector() {
        assert_eq!(
            sha256_salted(b"public", "slat_foo123"),
            "44edc2d57cde8d79c98145003e105b90a14f1460b79186ea9cfe83942fc5abb5"
        );
        // The schema default (prefix) gives a different hash: this is why the
        // docs say "suffix" explicitly.
        assert_ne!(sha256_salted(b"slat_foo123", "public"), sha256_salted(b"public", "slat_foo123"));
    }

    /// RFC 7914 §11 lists PBKDF2-HMAC-SHA256 vectors; this is the first
    /// (P = "passwd", S = "salt", c = 1), truncated to our 32-byte output.
    #[test]
    fn pbkdf2_rfc7914_vector() {
        assert_eq!(
            pbkdf2_sha256(b"passwd", "salt", 1),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }

    #[test]
    fn legacy_is_plain_sha256() {
        // The seed's example user: IOT_JCOMP / qwerty.
        assert_eq!(sha256_legacy(b"qwerty"), "65e84be33532fb784c48129675f9eff3a682b27168c0ea744b2cf58ee02337c5");
    }

    #[test]
    fn comparison_rejects_malformed_and_accepts_uppercase() {
        let h = sha256_salted(b"pw", "s");
        assert!(hashes_equal(&h, &h.to_ascii_uppercase()));
        assert!(!hashes_equal(&h, "zz"));
        assert!(!hashes_equal(&h, ""));
        assert!(!hashes_equal(&h, &sha256_salted(b"pw2", "s")));
    }
}
