//! The fast backend: aws-lc-rs (AWS-LC, a BoringSSL descendant).
//!
//! Chosen over the `openssl` crate on Debian's libssl by measurement
//! (docs/BENCHMARKS.md "Sealed mode against OpenSSL"): at 3072 and 4096 bits
//! AWS-LC's AVX-512 IFMA Montgomery code does a private-key operation in
//! about 0.35× OpenSSL 3.0's time on this project's machines, at 2048 bits
//! within 0.8–1.2×; it is rustls's default provider; and it builds from
//! source with the C compiler alone, so a fresh machine needs nothing
//! installed by hand.
//!
//! AWS-LC takes no caller RNG: it draws OAEP seeds, PSS salts and blinding
//! values from its own generator, so envelopes it seals are correct but not
//! reproducible. The vectors' byte-for-byte check runs on the
//! `RustCrypto` backend; this one is held to opening
//! every vector and to round trips with the other.
//!
//! Key material lives inside AWS-LC, which wipes it when the key is freed
//! (`OPENSSL_free` cleanses every allocation).

use crate::Text;
use alloc::boxed::Box;
use alloc::vec::Vec;

use aws_lc_rs::digest::{Digest, SHA256};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::error::KeyRejected;
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    PublicEncryptingKey,
};
use aws_lc_rs::signature::{ParsedPublicKey, RSA_PSS_2048_8192_SHA256, RSA_PSS_SHA256, RsaKeyPair};
use rand_core::CryptoRng;
use zeroize::Zeroizing;

use super::{Backend, RsaPrivate, RsaPublic};
use crate::limits::RSA_RANGE as RANGE;
use crate::{Error, Result};

/// aws-lc-rs: constant-time RSA at OpenSSL's speed or better.
#[derive(Debug, Clone, Copy, Default)]
pub struct AwsLc;

struct Public {
    /// For PSS verification; `RSA_PSS_2048_8192_SHA256` requires the salt
    /// length to equal the digest's (32), as docs/PROTOCOL.md §5.2 does.
    verifying: ParsedPublicKey,
    encrypting: OaepPublicEncryptingKey,
    exponent: Vec<u8>,
}

struct Private {
    signing: RsaKeyPair,
    decrypting: OaepPrivateDecryptingKey,
    /// The public half as SPKI DER, to hand out as a [`Public`].
    public_der: Vec<u8>,
}

/// AWS-LC reads no RSA key under 2048 bits (nor over 8192): say that in
/// the words of proto's own range check, not as an unreadable key.
fn rejected(e: &KeyRejected, otherwise: Text) -> Error {
    match e.description_() {
        "TooSmall" | "TooLarge" => Error::InvalidKey(Text(&RANGE)),
        _ => Error::InvalidKey(otherwise),
    }
}

/// What an unreadable public key is refused with.
const NOT_RSA: Text = Text(&"not a DER RSA public key");
/// What an unreadable private key is refused with.
const BAD_PRIVATE: Text = Text(&"not a consistent PKCS#8 RSA private key");

fn public_from_spki(spki_der: &[u8]) -> Result<Public> {
    const NOT_RSA: Error = Error::InvalidKey(self::NOT_RSA);
    let key = PublicEncryptingKey::from_der(spki_der).map_err(|e| rejected(&e, self::NOT_RSA))?;
    let exponent = aws_lc_rs::rsa::PublicKey::from_der(spki_der)
        .map_err(|_| NOT_RSA)?
        .exponent()
        .big_endian_without_leading_zero()
        .to_vec();
    Ok(Public {
        verifying: ParsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, spki_der).map_err(|_| NOT_RSA)?,
        encrypting: OaepPublicEncryptingKey::new(key).map_err(|_| NOT_RSA)?,
        exponent,
    })
}

impl Backend for AwsLc {
    fn name(&self) -> &'static str {
        "aws-lc"
    }

    fn public_key(&self, spki_der: &[u8]) -> Result<Box<dyn RsaPublic>> {
        Ok(Box::new(public_from_spki(spki_der)?))
    }

    fn private_key(&self, pkcs8_der: &[u8]) -> Result<Box<dyn RsaPrivate>> {
        // Both parsers run AWS-LC's RSA_check_key: an inconsistent key is
        // refused here, as the other backend's `validate` does.
        const BAD: Error = Error::InvalidKey(BAD_PRIVATE);
        let decrypting = PrivateDecryptingKey::from_pkcs8(pkcs8_der).map_err(|e| rejected(&e, BAD_PRIVATE))?;
        let public_der = decrypting.public_key().as_der().map_err(|_| BAD)?.as_ref().to_vec();
        Ok(Box::new(Private {
            signing: RsaKeyPair::from_pkcs8(pkcs8_der).map_err(|_| BAD)?,
            decrypting: OaepPrivateDecryptingKey::new(decrypting).map_err(|_| BAD)?,
            public_der,
        }))
    }

    fn generate(&self, _rng: &mut dyn CryptoRng, bits: usize) -> Result<Zeroizing<Vec<u8>>> {
        let size = match bits {
            2048 => KeySize::Rsa2048,
            3072 => KeySize::Rsa3072,
            4096 => KeySize::Rsa4096,
            _ => return Err(Error::InvalidKey(Text(&"aws-lc generates RSA keys of 2048, 3072 or 4096 bits"))),
        };
        let key =
            PrivateDecryptingKey::generate(size).map_err(|_| Error::Crypto(Text(&"RSA key generation failed")))?;
        let der = key.as_der().map_err(|_| Error::InvalidKey(Text(&"cannot encode the private key")))?;
        Ok(Zeroizing::new(der.as_ref().to_vec()))
    }
}

impl RsaPublic for Public {
    fn spki_der(&self) -> Result<Vec<u8>> {
        Ok(self
            .verifying
            .as_der()
            .map_err(|_| Error::InvalidKey(Text(&"cannot encode the public key")))?
            .as_ref()
            .to_vec())
    }

    fn modulus_bits(&self) -> usize {
        self.encrypting.key_size_bits()
    }

    fn exponent(&self) -> Vec<u8> {
        self.exponent.clone()
    }

    fn verify_pss_sha256(&self, digest: &[u8; 32], signature: &[u8]) -> Result<()> {
        let digest = Digest::import_less_safe(digest, &SHA256).map_err(|_| Error::BadSignature)?;
        self.verifying.verify_digest_sig(&digest, signature).map_err(|_| Error::BadSignature)
    }

    fn encrypt_oaep_sha256(&self, _rng: &mut dyn CryptoRng, label: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut out = alloc::vec![0u8; self.encrypting.ciphertext_size()];
        let n = self
            .encrypting
            .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, Some(label))
            .map_err(|_| Error::Crypto(Text(&"RSA-OAEP encryption failed")))?
            .len();
        out.truncate(n);
        Ok(out)
    }
}

impl RsaPrivate for Private {
    fn public(&self) -> Result<Box<dyn RsaPublic>> {
        Ok(Box::new(public_from_spki(&self.public_der)?))
    }

    fn sign_pss_sha256(&self, _rng: &mut dyn CryptoRng, digest: &[u8; 32]) -> Result<Vec<u8>> {
        const FAILED: Error = Error::Crypto(Text(&"RSA-PSS signing failed"));
        let digest = Digest::import_less_safe(digest, &SHA256).map_err(|_| FAILED)?;
        let mut signature = alloc::vec![0u8; self.signing.public_modulus_len()];
        self.signing.sign_digest(&RSA_PSS_SHA256, &digest, &mut signature).map_err(|_| FAILED)?;
        Ok(signature)
    }

    fn decrypt_oaep_sha256(
        &self,
        _rng: &mut dyn CryptoRng,
        label: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let mut out = Zeroizing::new(alloc::vec![0u8; self.decrypting.min_output_size()]);
        let n = self
            .decrypting
            .decrypt(&OAEP_SHA256_MGF1SHA256, ciphertext, &mut out, Some(label))
            .map_err(|_| Error::DecryptFailed)?
            .len();
        out.truncate(n);
        Ok(out)
    }
}
