//! RSA keys, their ids, and the keyring of trusted signers.

use crate::Text;
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use pem_rfc7468::LineEnding;
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::backend::{self, Backend, RsaPrivate, RsaPublic};
use crate::limits::{KEY_ID_LEN, RSA_MAX_BITS, RSA_MIN_BITS, RSA_RANGE};
use crate::{Error, Result};

/// PEM label of a `SubjectPublicKeyInfo`.
const PUBLIC_LABEL: &str = "PUBLIC KEY";
/// PEM label of a PKCS#8 private key.
const PRIVATE_LABEL: &str = "PRIVATE KEY";

/// Names an RSA public key: SHA-256 of its DER `SubjectPublicKeyInfo`.
///
/// Envelopes carry the signer's and the recipient's key ids, so a device
/// can pick the right trusted key without trying each, and keys can be
/// rotated without renaming anything. Any implementation can compute it from
/// the public key file alone (`openssl pkey -pubin -outform DER | sha256sum`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// An RSA public key mqseal accepts: 2048 to 4096 bits, exponent 65537.
///
/// It remembers the [`Backend`] that read it, which does its arithmetic;
/// cloning shares the backend's key.
#[derive(Clone)]
pub struct PublicKey {
    ops: Arc<dyn RsaPublic>,
    backend: &'static dyn Backend,
    id: KeyId,
    der: Vec<u8>,
    bits: usize,
}

/// Refuses keys outside the protocol's range.
///
/// The exponent is pinned to 65537 — what every mainstream tool generates —
/// so that no odd key (e = 3, or a huge e that makes verification slow)
/// slips into a keyring. One check, whichever backend read the key.
fn check_public(key: &dyn RsaPublic) -> Result<usize> {
    let bits = key.modulus_bits();
    if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
        return Err(Error::InvalidKey(Text(&RSA_RANGE)));
    }
    if key.exponent() != [0x01, 0x00, 0x01] {
        return Err(Error::InvalidKey(Text(&"RSA public exponent must be 65537")));
    }
    Ok(bits)
}

impl PublicKey {
    fn from_ops(backend: &'static dyn Backend, ops: Box<dyn RsaPublic>) -> Result<Self> {
        let bits = check_public(&*ops)?;
        // The id covers the key as encoded afresh, so every spelling of one
        // key (and both backends) give it one id.
        let der = ops.spki_der()?;
        let id = KeyId(Sha256::digest(&der).into());
        Ok(PublicKey { ops: Arc::from(ops), backend, id, der, bits })
    }

    /// Reads a DER `SubjectPublicKeyInfo` with the [default backend](backend::DEFAULT).
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for anything but an RSA key in range.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        PublicKey::from_der_with(backend::DEFAULT, der)
    }

    /// Reads a DER `SubjectPublicKeyInfo` with `backend`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for anything but an RSA key in range.
    pub fn from_der_with(backend: &'static dyn Backend, der: &[u8]) -> Result<Self> {
        PublicKey::from_ops(backend, backend.public_key(der)?)
    }

    /// Reads a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) with the default backend.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for anything but an RSA key in range.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let der = pem_body(pem, PUBLIC_LABEL, Text(&"not a PEM RSA public key"))?;
        PublicKey::from_der(&der)
    }

    /// The same key, read by `backend`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] if that backend refuses it.
    pub fn with_backend(&self, backend: &'static dyn Backend) -> Result<Self> {
        PublicKey::from_der_with(backend, &self.der)
    }

    /// The backend that does this key's arithmetic.
    #[must_use]
    pub fn backend(&self) -> &'static dyn Backend {
        self.backend
    }

    /// The key as PEM `PUBLIC KEY`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] if encoding fails.
    pub fn to_pem(&self) -> Result<String> {
        pem_rfc7468::encode_string(PUBLIC_LABEL, LineEnding::LF, &self.der)
            .map_err(|_| Error::InvalidKey(Text(&"cannot encode the public key")))
    }

    /// The DER `SubjectPublicKeyInfo` the id is computed from.
    #[must_use]
    pub fn to_der(&self) -> &[u8] {
        &self.der
    }

    /// The key id.
    #[must_use]
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Modulus size in bits.
    #[must_use]
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Modulus size in bytes: the length of every signature by, and every
    /// key wrapped for, this key.
    #[must_use]
    pub fn size(&self) -> usize {
        self.bits.div_ceil(8)
    }

    pub(crate) fn ops(&self) -> &dyn RsaPublic {
        &*self.ops
    }
}

/// The body of a PEM document with `label`.
fn pem_body(pem: &str, label: &str, wrong: Text) -> Result<Zeroizing<Vec<u8>>> {
    let (found, der) = pem_rfc7468::decode_vec(pem.as_bytes()).map_err(|_| Error::InvalidKey(wrong))?;
    let der = Zeroizing::new(der);
    if found != label {
        return Err(Error::InvalidKey(wrong));
    }
    Ok(der)
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({} bits, {}, {})", self.bits(), self.id, self.backend.name())
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for PublicKey {}

/// An RSA private key: a controller's signing key, or a device's key that
/// content keys are wrapped for (and that signs its receipts).
///
/// Its PKCS#8 bytes are kept in memory that is wiped on drop, and the
/// backends wipe their own copies; `Debug` shows only the public half.
pub struct PrivateKey {
    ops: Box<dyn RsaPrivate>,
    pkcs8: Zeroizing<Vec<u8>>,
    public: PublicKey,
}

impl PrivateKey {
    /// Reads a PKCS#8 DER private key with `backend`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`].
    pub fn from_pkcs8_der_with(backend: &'static dyn Backend, der: &[u8]) -> Result<Self> {
        let ops = backend.private_key(der)?;
        let public = PublicKey::from_ops(backend, ops.public()?)?;
        Ok(PrivateKey { ops, pkcs8: Zeroizing::new(der.to_vec()), public })
    }

    /// Generates a key of `bits` bits (2048 to 4096; mqseal's default is
    /// [`crate::limits::RSA_DEFAULT_BITS`]) with the default backend.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for a size out of range (the aws-lc backend
    /// makes 2048, 3072 and 4096 only), [`Error::Crypto`] if generation fails.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R, bits: usize) -> Result<Self> {
        PrivateKey::generate_with(backend::DEFAULT, rng, bits)
    }

    /// [`generate`](Self::generate) with `backend`.
    ///
    /// # Errors
    /// As [`generate`](Self::generate).
    pub fn generate_with<R: CryptoRng + ?Sized>(
        backend: &'static dyn Backend,
        mut rng: &mut R,
        bits: usize,
    ) -> Result<Self> {
        if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
            return Err(Error::InvalidKey(Text(&RSA_RANGE)));
        }
        let der = backend.generate(&mut rng, bits)?;
        PrivateKey::from_pkcs8_der_with(backend, &der)
    }

    /// Reads a PKCS#8 DER private key with the [default backend](backend::DEFAULT).
    ///
    /// # Errors
    /// [`Error::InvalidKey`].
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self> {
        PrivateKey::from_pkcs8_der_with(backend::DEFAULT, der)
    }

    /// Reads a PKCS#8 PEM (`PRIVATE KEY`) private key with the default backend.
    ///
    /// # Errors
    /// [`Error::InvalidKey`].
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self> {
        let der = pem_body(pem, PRIVATE_LABEL, Text(&"not a PKCS#8 RSA private key"))?;
        PrivateKey::from_pkcs8_der(&der)
    }

    /// The same key, read by `backend`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] if that backend refuses it.
    pub fn with_backend(&self, backend: &'static dyn Backend) -> Result<Self> {
        PrivateKey::from_pkcs8_der_with(backend, &self.pkcs8)
    }

    /// The key as PKCS#8 PEM, in memory that is wiped when dropped.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] if encoding fails.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>> {
        pem_rfc7468::encode_string(PRIVATE_LABEL, LineEnding::LF, &self.pkcs8)
            .map(Zeroizing::new)
            .map_err(|_| Error::InvalidKey(Text(&"cannot encode the private key")))
    }

    /// The public half.
    #[must_use]
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The key id of the public half.
    #[must_use]
    pub fn id(&self) -> KeyId {
        self.public.id
    }

    pub(crate) fn ops(&self) -> &dyn RsaPrivate {
        &*self.ops
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public: {:?})", self.public)
    }
}

/// The public keys a device trusts to sign commands (or a controller trusts
/// to sign receipts), by key id.
///
/// Removing a key revokes it: from then on its envelopes are
/// [`Error::UnknownSigner`].
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<KeyId, PublicKey>,
}

impl Keyring {
    /// An empty keyring.
    #[must_use]
    pub fn new() -> Self {
        Keyring::default()
    }

    /// Trusts `key`. Returns `false` if it was already trusted.
    pub fn add(&mut self, key: PublicKey) -> bool {
        self.keys.insert(key.id(), key).is_none()
    }

    /// Stops trusting the key with id `id`. Returns whether it was trusted.
    pub fn remove(&mut self, id: &KeyId) -> bool {
        self.keys.remove(id).is_some()
    }

    /// The trusted key with id `id`.
    #[must_use]
    pub fn get(&self, id: &KeyId) -> Option<&PublicKey> {
        self.keys.get(id)
    }

    /// How many keys are trusted.
    #[must_use]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is trusted.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The trusted keys, by id.
    pub fn iter(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values()
    }
}

impl FromIterator<PublicKey> for Keyring {
    fn from_iter<I: IntoIterator<Item = PublicKey>>(iter: I) -> Self {
        let mut ring = Keyring::new();
        iter.into_iter().for_each(|k| {
            ring.add(k);
        });
        ring
    }
}
