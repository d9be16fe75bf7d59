//! The seam between sealed mode and the library that does its RSA.
//!
//! Sealed mode's checks and their order (parse → header → times → replay →
//! signer → signature → unwrap → decrypt → record) live once, in
//! [`super`]; what differs between an RSA library and another is four
//! private- and public-key primitives and reading a key. This module names
//! exactly those, the way rustls's `CryptoProvider` names the pieces a TLS
//! stack needs, so that the same envelope code runs on
//!
//! * `AwsLc` (feature `aws-lc`, the default where there is `std`):
//!   aws-lc-rs, rustls's default provider. Its private-key operations are
//!   constant-time and measured at 0.35–1.2× OpenSSL's time on this
//!   project's machines (docs/BENCHMARKS.md "Sealed mode against
//!   OpenSSL"), against 2.5–2.8× for the pure-Rust crate; a round trip
//!   holds three of them.
//! * `RustCrypto` (feature `rustcrypto`): the pure-Rust `rsa` crate, for
//!   the microcontroller agent (`no_std` + `alloc`), where no C library
//!   builds. Its decryption has a known timing side channel
//!   (RUSTSEC-2023-0071), which sealed mode's order keeps out of an
//!   attacker's reach: no private-key operation runs before the sender's
//!   signature has verified.
//!
//! Everything that decides whether a key or an envelope is acceptable —
//! modulus range, exponent, key ids, lengths, salt length — is checked in
//! `proto`, not here: a backend reports what a key *is*, and does the
//! arithmetic.
//!
//! Both backends produce the same bytes for the same key (the SPKI DER a
//! key id is computed from), accept each other's envelopes in both
//! directions, and pass every test vector (`proto/tests/vectors.rs`,
//! `proto/tests/backends.rs`).

#[cfg(feature = "aws-lc")]
mod aws_lc;
#[cfg(feature = "rustcrypto")]
mod rustcrypto;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use rand_core::CryptoRng;
use zeroize::Zeroizing;

#[cfg(feature = "aws-lc")]
pub use aws_lc::AwsLc;
#[cfg(feature = "rustcrypto")]
pub use rustcrypto::RustCrypto;

use crate::Result;

/// An RSA library, as sealed mode uses it: reading keys and making them.
///
/// A backend is a unit value (`&AwsLc`, `&RustCrypto`); the keys it reads
/// carry their backend with them, so one process may hold keys of both
/// (the cross-backend tests do).
pub trait Backend: Send + Sync + fmt::Debug {
    /// The backend's name, for logs and benchmarks.
    fn name(&self) -> &'static str;

    /// Reads a DER `SubjectPublicKeyInfo` holding an RSA key.
    ///
    /// # Errors
    /// [`Error::InvalidKey`](crate::Error::InvalidKey) for anything else.
    fn public_key(&self, spki_der: &[u8]) -> Result<Box<dyn RsaPublic>>;

    /// Reads a PKCS#8 DER RSA private key, checking that its parts are
    /// consistent.
    ///
    /// # Errors
    /// [`Error::InvalidKey`](crate::Error::InvalidKey).
    fn private_key(&self, pkcs8_der: &[u8]) -> Result<Box<dyn RsaPrivate>>;

    /// Generates a key of `bits` bits and returns it as PKCS#8 DER.
    ///
    /// # Errors
    /// [`Error::InvalidKey`](crate::Error::InvalidKey) for a size the
    /// backend cannot make, [`Error::Crypto`](crate::Error::Crypto).
    fn generate(&self, rng: &mut dyn CryptoRng, bits: usize) -> Result<Zeroizing<Vec<u8>>>;
}

/// The public half of an RSA key: what anyone may do with it.
pub trait RsaPublic: Send + Sync {
    /// The key as DER `SubjectPublicKeyInfo`, encoded afresh (not the
    /// bytes it was read from): what its key id is the SHA-256 of, so two
    /// spellings of one key get one id.
    ///
    /// # Errors
    /// [`Error::InvalidKey`](crate::Error::InvalidKey) if it cannot be encoded.
    fn spki_der(&self) -> Result<Vec<u8>>;

    /// Modulus size in bits.
    fn modulus_bits(&self) -> usize;

    /// The public exponent, big-endian, without leading zeros.
    fn exponent(&self) -> Vec<u8>;

    /// Checks an RSASSA-PSS signature (SHA-256, MGF1-SHA-256, salt length
    /// exactly 32) over the SHA-256 `digest` of the signed message.
    ///
    /// # Errors
    /// [`Error::BadSignature`](crate::Error::BadSignature).
    fn verify_pss_sha256(&self, digest: &[u8; 32], signature: &[u8]) -> Result<()>;

    /// RSAES-OAEP (SHA-256, MGF1-SHA-256) encryption of `plaintext` under
    /// `label`. The OAEP seed comes from `rng` where the backend can take
    /// one (so the test vectors reproduce byte for byte), else from the
    /// backend's own generator.
    ///
    /// # Errors
    /// [`Error::Crypto`](crate::Error::Crypto).
    fn encrypt_oaep_sha256(&self, rng: &mut dyn CryptoRng, label: &[u8], plaintext: &[u8]) -> Result<Vec<u8>>;
}

/// The private half: signing and unwrapping.
///
/// Both operations must run in time independent of the key and of the
/// input's validity where the backend can promise it; see the module docs
/// for the one that cannot, and why sealed mode's order makes that safe.
pub trait RsaPrivate: Send + Sync {
    /// The public half.
    ///
    /// # Errors
    /// [`Error::InvalidKey`](crate::Error::InvalidKey).
    fn public(&self) -> Result<Box<dyn RsaPublic>>;

    /// RSASSA-PSS (SHA-256, MGF1-SHA-256, salt length 32) over the SHA-256
    /// `digest` of the message. The salt comes from `rng` where the backend
    /// can take one.
    ///
    /// # Errors
    /// [`Error::Crypto`](crate::Error::Crypto).
    fn sign_pss_sha256(&self, rng: &mut dyn CryptoRng, digest: &[u8; 32]) -> Result<Vec<u8>>;

    /// RSAES-OAEP (SHA-256, MGF1-SHA-256) decryption under `label`. `rng`
    /// blinds the operation where the backend takes one.
    ///
    /// # Errors
    /// [`Error::DecryptFailed`](crate::Error::DecryptFailed), with no more
    /// detail: which step failed is what a padding oracle needs.
    fn decrypt_oaep_sha256(
        &self,
        rng: &mut dyn CryptoRng,
        label: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>>;
}

/// The backend keys are read with unless the caller names one: aws-lc-rs
/// when it is built in, else the `rsa` crate.
#[cfg(feature = "aws-lc")]
pub static DEFAULT: &dyn Backend = &AwsLc;

/// The backend keys are read with unless the caller names one: aws-lc-rs
/// when it is built in, else the `rsa` crate.
#[cfg(not(feature = "aws-lc"))]
pub static DEFAULT: &dyn Backend = &RustCrypto;

/// Every backend built in, default first: what the cross-backend tests and
/// benchmarks run over.
pub static ALL: &[&dyn Backend] = &[
    #[cfg(feature = "aws-lc")]
    &AwsLc,
    #[cfg(feature = "rustcrypto")]
    &RustCrypto,
];
