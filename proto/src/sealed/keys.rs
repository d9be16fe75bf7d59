//! RSA keys, their ids, and the keyring of trusted signers.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use rand_core::CryptoRng;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey, pss};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::limits::{KEY_ID_LEN, RSA_MAX_BITS, RSA_MIN_BITS};
use crate::{Error, Result};

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
#[derive(Clone)]
pub struct PublicKey {
    verifying: pss::VerifyingKey<Sha256>,
    id: KeyId,
    der: Vec<u8>,
}

/// Refuses keys outside the protocol's range.
///
/// The exponent is pinned to 65537 — what every mainstream tool generates —
/// so that no odd key (e = 3, or a huge e that makes verification slow)
/// slips into a keyring.
fn check_public(key: &RsaPublicKey) -> Result<()> {
    let bits = key.n().bits() as usize;
    if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
        return Err(Error::InvalidKey("RSA modulus must be 2048 to 4096 bits"));
    }
    if *key.e_bytes() != [0x01, 0x00, 0x01] {
        return Err(Error::InvalidKey("RSA public exponent must be 65537"));
    }
    Ok(())
}

impl PublicKey {
    fn from_rsa(key: RsaPublicKey) -> Result<Self> {
        check_public(&key)?;
        let der = key.to_public_key_der().map_err(|_| Error::InvalidKey("cannot encode the public key"))?.into_vec();
        let id = KeyId(Sha256::digest(&der).into());
        // PSS with a 32-byte salt (the digest length), checked strictly so
        // that every implementation agrees on what is a valid signature.
        let verifying = pss::VerifyingKey::<Sha256>::new_with_salt_len(key, 32);
        Ok(PublicKey { verifying, id, der })
    }

    /// Reads a DER `SubjectPublicKeyInfo`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for anything but an RSA key in range.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        let key = RsaPublicKey::from_public_key_der(der).map_err(|_| Error::InvalidKey("not a DER RSA public key"))?;
        PublicKey::from_rsa(key)
    }

    /// Reads a PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for anything but an RSA key in range.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let key = RsaPublicKey::from_public_key_pem(pem).map_err(|_| Error::InvalidKey("not a PEM RSA public key"))?;
        PublicKey::from_rsa(key)
    }

    /// The key as PEM `PUBLIC KEY`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] if encoding fails.
    pub fn to_pem(&self) -> Result<String> {
        self.rsa().to_public_key_pem(LineEnding::LF).map_err(|_| Error::InvalidKey("cannot encode the public key"))
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
        self.rsa().n().bits() as usize
    }

    /// Modulus size in bytes: the length of every signature by, and every
    /// key wrapped for, this key.
    #[must_use]
    pub fn size(&self) -> usize {
        self.rsa().size()
    }

    pub(crate) fn rsa(&self) -> &RsaPublicKey {
        self.verifying.as_ref()
    }

    pub(crate) fn verifying(&self) -> &pss::VerifyingKey<Sha256> {
        &self.verifying
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({} bits, {})", self.bits(), self.id)
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
/// The rsa crate wipes the key material when it is dropped; `Debug` shows
/// only the public half.
pub struct PrivateKey {
    signing: pss::SigningKey<Sha256>,
    public: PublicKey,
}

impl PrivateKey {
    fn from_rsa(key: RsaPrivateKey) -> Result<Self> {
        key.validate().map_err(|_| Error::InvalidKey("RSA private key is inconsistent"))?;
        let public = PublicKey::from_rsa(key.to_public_key())?;
        Ok(PrivateKey { signing: pss::SigningKey::<Sha256>::new_with_salt_len(key, 32), public })
    }

    /// Generates a key of `bits` bits (2048 to 4096; mqseal's default is
    /// [`crate::limits::RSA_DEFAULT_BITS`]).
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for a size out of range, [`Error::Crypto`] if
    /// generation fails.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R, bits: usize) -> Result<Self> {
        if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
            return Err(Error::InvalidKey("RSA modulus must be 2048 to 4096 bits"));
        }
        let key = RsaPrivateKey::new(rng, bits).map_err(|_| Error::Crypto("RSA key generation failed"))?;
        PrivateKey::from_rsa(key)
    }

    /// Reads a PKCS#8 DER private key.
    ///
    /// # Errors
    /// [`Error::InvalidKey`].
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self> {
        let key = RsaPrivateKey::from_pkcs8_der(der).map_err(|_| Error::InvalidKey("not a PKCS#8 RSA private key"))?;
        PrivateKey::from_rsa(key)
    }

    /// Reads a PKCS#8 PEM (`PRIVATE KEY`) private key.
    ///
    /// # Errors
    /// [`Error::InvalidKey`].
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self> {
        let key = RsaPrivateKey::from_pkcs8_pem(pem).map_err(|_| Error::InvalidKey("not a PKCS#8 RSA private key"))?;
        PrivateKey::from_rsa(key)
    }

    /// The key as PKCS#8 PEM, in memory that is wiped when dropped.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] if encoding fails.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>> {
        self.rsa().to_pkcs8_pem(LineEnding::LF).map_err(|_| Error::InvalidKey("cannot encode the private key"))
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

    pub(crate) fn rsa(&self) -> &RsaPrivateKey {
        self.signing.as_ref()
    }

    pub(crate) fn signing(&self) -> &pss::SigningKey<Sha256> {
        &self.signing
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
