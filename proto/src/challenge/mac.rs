//! The per-device HMAC key and the exact bytes each tag covers.
//!
//! Tags are *not* computed over the envelope bytes but over a separately
//! defined MAC input, for two reasons. In hidden form the command never
//! travels, so the device must compute candidate tags for its registered
//! commands without any envelope to hash. And a fixed, length-prefixed layout
//! (no varints) is what another implementation can reproduce from
//! docs/PROTOCOL.md alone.
//!
//! ```text
//! command:  "mqseal/v1 challenge-command\0" ‖ form ‖ challenge ‖ lp(device) ‖ lp(topic)
//!           ‖ msg_id ‖ be64(issued_at) ‖ be64(expires_at) ‖ lp(name) ‖ u8(n) ‖ lp(arg_1) … lp(arg_n)
//! response: "mqseal/v1 challenge-response\0" ‖ form ‖ challenge ‖ lp(device) ‖ lp(topic)
//!           ‖ msg_id ‖ be64(issued_at) ‖ be64(expires_at) ‖ in_reply_to ‖ u8(status) ‖ be32(code) ‖ lp(output)
//! lp(x) = be16(len x) ‖ x;  form = 0 hidden, 1 explicit
//! ```
//!
//! The NUL-terminated labels separate commands from responses (a device's
//! response tag can never pass as a command tag) and version the scheme; the
//! form byte separates hidden from explicit; the length prefixes make every
//! input parse one way only.

use core::fmt;

use hmac::{Hmac, KeyInit, Mac};
use rand_core::CryptoRng;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::limits::{CHALLENGE_LEN, HMAC_KEY_LEN, MAX_ARGS, TAG_LEN};
use crate::wire::{Outcome, limit};
use crate::{Error, Header, MsgId, Result};

/// Domain label of command tags.
pub const COMMAND_LABEL: &[u8] = b"mqseal/v1 challenge-command\0";
/// Domain label of response tags.
pub const RESPONSE_LABEL: &[u8] = b"mqseal/v1 challenge-response\0";

/// A device's 256-bit HMAC key.
///
/// One per device, never shared across a fleet: the lesson from the
/// Arduino design, where one password for every device meant one stolen
/// device unlocked them all (docs/SECURITY.md, "Stolen device"). The key is wiped from memory when dropped and
/// never printed by `Debug`.
#[derive(Clone)]
pub struct HmacKey {
    bytes: [u8; HMAC_KEY_LEN],
    /// HMAC state with the key already absorbed: saves two SHA-256
    /// compressions per tag, which is half the work of a short command.
    /// sha2's `zeroize` feature wipes it on drop.
    keyed: Hmac<Sha256>,
}

impl HmacKey {
    /// Wraps 32 key bytes.
    #[must_use]
    pub fn new(bytes: [u8; HMAC_KEY_LEN]) -> Self {
        // HMAC accepts keys of any length; the fallback is unreachable and
        // only avoids a panic path.
        let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(&bytes)
            .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()));
        HmacKey { bytes, keyed }
    }

    /// Wraps a key given as a slice.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] unless the slice is exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; HMAC_KEY_LEN] =
            bytes.try_into().map_err(|_| Error::InvalidKey("an HMAC key must be exactly 32 bytes"))?;
        Ok(HmacKey::new(arr))
    }

    /// Draws a fresh key.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = [0u8; HMAC_KEY_LEN];
        rng.fill_bytes(&mut bytes);
        let key = HmacKey::new(bytes);
        bytes.zeroize();
        key
    }

    /// The raw key, for writing it into a device's configuration.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; HMAC_KEY_LEN] {
        &self.bytes
    }
}

impl Drop for HmacKey {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HmacKey(<redacted>)")
    }
}

impl PartialEq for HmacKey {
    /// Constant time, like every comparison of secrets here.
    fn eq(&self, other: &Self) -> bool {
        self.bytes.ct_eq(&other.bytes).into()
    }
}
impl Eq for HmacKey {}

/// Hidden or explicit, as the one-byte form in the MAC input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Form {
    /// Only the tag travels; the receiver finds the matching candidate.
    Hidden = 0,
    /// The command (or outcome) travels in clear beside its tag.
    Explicit = 1,
}

/// An HMAC being fed the MAC input field by field, so no buffer is needed.
#[derive(Clone)]
pub(crate) struct MacInput(Hmac<Sha256>);

impl MacInput {
    fn new(key: &HmacKey, label: &[u8], form: Form, challenge: &[u8; CHALLENGE_LEN]) -> Self {
        let mut m = key.keyed.clone();
        m.update(label);
        m.update(&[form as u8]);
        m.update(challenge);
        MacInput(m)
    }

    /// `be16(len) ‖ bytes`.
    fn lp(&mut self, field: &'static str, bytes: &[u8]) -> Result<()> {
        let len = u16::try_from(bytes.len()).map_err(|_| Error::LimitExceeded { field, max: u16::MAX as usize })?;
        self.0.update(&len.to_be_bytes());
        self.0.update(bytes);
        Ok(())
    }

    fn header(&mut self, h: &Header<'_>) -> Result<()> {
        self.lp("device", h.device.as_bytes())?;
        self.lp("topic", h.topic.as_bytes())?;
        self.0.update(&h.msg_id.0);
        self.0.update(&h.issued_at.to_be_bytes());
        self.0.update(&h.expires_at.to_be_bytes());
        Ok(())
    }

    /// Everything of a command's MAC input that precedes the command itself.
    ///
    /// Hidden-form search clones this once per candidate, so the shared part
    /// is hashed once, not once per registered command.
    pub(crate) fn command_prefix(
        key: &HmacKey,
        form: Form,
        challenge: &[u8; CHALLENGE_LEN],
        header: &Header<'_>,
    ) -> Result<Self> {
        let mut m = MacInput::new(key, COMMAND_LABEL, form, challenge);
        m.header(header)?;
        Ok(m)
    }

    /// Finishes a command tag from a prefix: `lp(name) ‖ u8(n) ‖ lp(arg)…`.
    pub(crate) fn command_tag<'s>(
        &self,
        name: &str,
        args: impl ExactSizeIterator<Item = &'s str>,
    ) -> Result<[u8; TAG_LEN]> {
        limit("args", args.len(), MAX_ARGS)?;
        let mut m = self.clone();
        m.lp("name", name.as_bytes())?;
        // MAX_ARGS (16) fits a byte; checked just above.
        m.0.update(&[u8::try_from(args.len()).map_err(|_| Error::LimitExceeded { field: "args", max: MAX_ARGS })?]);
        for a in args {
            m.lp("arg", a.as_bytes())?;
        }
        Ok(m.0.finalize().into_bytes().into())
    }

    /// The whole tag of a response.
    pub(crate) fn response_tag(
        key: &HmacKey,
        form: Form,
        challenge: &[u8; CHALLENGE_LEN],
        header: &Header<'_>,
        in_reply_to: &MsgId,
        outcome: &Outcome<'_>,
    ) -> Result<[u8; TAG_LEN]> {
        let mut m = MacInput::new(key, RESPONSE_LABEL, form, challenge);
        m.header(header)?;
        m.0.update(&in_reply_to.0);
        m.0.update(&[outcome.status as u8]);
        m.0.update(&outcome.code.to_be_bytes());
        m.lp("output", outcome.output)?;
        Ok(m.0.finalize().into_bytes().into())
    }
}

/// Constant-time tag comparison.
pub(crate) fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> subtle::Choice {
    a.ct_eq(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2 through our keyed-state shortcut: proves the
    /// pre-keyed clone computes plain HMAC-SHA256.
    #[test]
    fn keyed_state_is_plain_hmac_sha256() {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        // HMAC pads short keys with zeros, so "Jefe" and "Jefe\0…" are the same key.
        let k = HmacKey::new(key);
        let mut m = k.keyed.clone();
        m.update(b"what do ya want for nothing?");
        let tag: [u8; 32] = m.finalize().into_bytes().into();
        assert_eq!(hex::encode(tag), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn key_from_slice_requires_32_bytes() {
        assert!(HmacKey::from_slice(&[0u8; 31]).is_err());
        assert!(HmacKey::from_slice(&[0u8; 33]).is_err());
        assert_eq!(HmacKey::from_slice(&[7u8; 32]).unwrap(), HmacKey::new([7u8; 32]));
    }

    #[test]
    fn debug_never_prints_the_key() {
        let k = HmacKey::new([0x41; 32]);
        let mut s = heapless::String::<64>::new();
        fmt::write(&mut s, format_args!("{k:?}")).unwrap();
        assert!(!s.contains("41") && !s.contains("65"), "{s}");
    }
}
