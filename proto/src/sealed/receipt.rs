//! The receipt key: how a device encrypts its answer without a second RSA
//! operation on either side.
//!
//! The command's content key (CEK) is known to exactly two parties: the
//! controller that drew it and the device whose key unwrapped it. A key
//! derived from it is therefore already shared between the two ends of the
//! exchange, and encrypting the receipt under it costs an HKDF instead of
//! an RSA-OAEP wrap on the device and an unwrap on the controller (the
//! slowest step of the old round trip). What the derivation binds:
//!
//! * a domain label, so the receipt key is never the CEK itself or any
//!   other key derived from it;
//! * the command's message id, so a receipt key belongs to one command
//!   even if a broken RNG ever repeated a CEK.
//!
//! The receipt's own message id is its AEAD nonce: a device that answers
//! one command twice (an "interrupted" receipt after a crash, say) never
//! encrypts two messages under one key and nonce.

use hkdf::Hkdf;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::MsgId;

/// HKDF `info` prefix of the receipt key; the command's 16-byte message id
/// follows it.
pub const RECEIPT_KEY_LABEL: &[u8] = b"mqseal/v1 receipt-key\0";

/// The key a sealed command's receipt is encrypted under (32 bytes, wiped
/// on drop). Both ends derive it from the command's content key: the
/// controller when it seals the command, the device when it opens it.
///
/// A device that must answer after a restart keeps it on disk beside the
/// command's journal entry (0600): it opens that command's receipt, and
/// nothing else.
#[derive(Clone)]
pub struct ReceiptKey([u8; 32]);

impl ReceiptKey {
    /// `HKDF-SHA256(ikm = cek, salt = none, info = RECEIPT_KEY_LABEL ‖ command msg_id)`.
    pub(crate) fn derive(cek: &[u8; 32], command: &MsgId) -> Self {
        let mut okm = [0u8; 32];
        // 32 bytes is one HKDF block: expansion cannot fail.
        let _ = Hkdf::<Sha256>::new(None, cek).expand_multi_info(&[RECEIPT_KEY_LABEL, &command.0], &mut okm);
        ReceiptKey(okm)
    }

    /// A key kept from an earlier [`ReceiptKey::to_bytes`].
    #[must_use]
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ReceiptKey(bytes)
    }

    /// The key's bytes, for a journal that must survive a restart. Whoever
    /// holds them can read (not forge) the receipt of that one command.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    pub(crate) fn as_key(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Drop for ReceiptKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// In constant time: a key is a secret.
impl PartialEq for ReceiptKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl Eq for ReceiptKey {}

impl core::fmt::Debug for ReceiptKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ReceiptKey(<redacted>)")
    }
}
