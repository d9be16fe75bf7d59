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

use rand_core::CryptoRng;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::limits::{CHALLENGE_LEN, HMAC_KEY_LEN, MAX_ARGS, TAG_LEN};
use crate::wire::{Call, Outcome, limit};
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
    /// SHA-256 states after the key block XOR ipad and XOR opad (RFC 2104):
    /// every tag starts from them, which saves two compressions per tag —
    /// half the work of a short command. As secret as the key.
    inner: [u32; 8],
    outer: [u32; 8],
}

impl HmacKey {
    /// Wraps 32 key bytes.
    #[must_use]
    pub fn new(bytes: [u8; HMAC_KEY_LEN]) -> Self {
        HmacKey { inner: keyed_state(&bytes, 0x36), outer: keyed_state(&bytes, 0x5c), bytes }
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
        self.inner.zeroize();
        self.outer.zeroize();
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

/// SHA-256's initial state (FIPS 180-4 §5.3.3).
const IV: [u32; 8] =
    [0x6a09_e667, 0xbb67_ae85, 0x3c6e_f372, 0xa54f_f53a, 0x510e_527f, 0x9b05_688c, 0x1f83_d9ab, 0x5be0_cd19];
const BLOCK: usize = 64;

/// The state after one compression of `key ‖ 0…0` XOR `pad`: HMAC's
/// inner (0x36) or outer (0x5c) starting point for a 32-byte key.
fn keyed_state(key: &[u8; HMAC_KEY_LEN], pad: u8) -> [u32; 8] {
    let mut block = [pad; BLOCK];
    block.iter_mut().zip(key).for_each(|(b, k)| *b ^= k);
    let mut state = IV;
    sha2::block_api::compress256(&mut state, core::slice::from_ref(&block));
    block.zeroize();
    state
}

/// HMAC-SHA256 fed the MAC input field by field, so no message buffer is
/// needed.
///
/// Written over `sha2`'s compression function rather than with the `hmac`
/// crate: on a Cortex-M the crate's finalisation (through `digest`'s
/// buffer and wrapper types) copied its state several times and cost
/// about 1.1 KiB of flash and 0.5 KiB of stack in the verification core;
/// this is one 64-byte block, the chaining value and a count, and
/// finalisation reuses the block for the outer hash (docs/BENCHMARKS.md,
/// "Microcontroller agent"). The compression function is still `sha2`'s
/// (with its SHA-NI and ARMv8 paths on hosts), and the tests check every
/// tag against the `hmac` crate.
pub(crate) struct MacInput<'k> {
    /// Whose outer state finishes the tag.
    key: &'k HmacKey,
    /// The inner hash's chaining value.
    state: [u32; 8],
    /// The block being filled.
    block: [u8; BLOCK],
    /// Bytes in `block`: always below 64 between calls.
    filled: usize,
    /// Bytes hashed so far, the key block included.
    total: u64,
    /// A field too long for its 16-bit length prefix, if one came: the tag
    /// is refused at the end rather than after every field (like
    /// `wire::Reader`'s errors).
    overlong: Option<&'static str>,
}

impl Drop for MacInput<'_> {
    fn drop(&mut self) {
        self.state.zeroize();
        self.block.zeroize();
    }
}

impl<'k> MacInput<'k> {
    /// A MAC over `key` with nothing absorbed yet.
    fn keyed(key: &'k HmacKey) -> Self {
        MacInput { key, state: key.inner, block: [0; BLOCK], filled: 0, total: BLOCK as u64, overlong: None }
    }

    fn new(key: &'k HmacKey, label: &[u8], form: Form, challenge: &[u8; CHALLENGE_LEN]) -> Self {
        let mut m = MacInput::keyed(key);
        m.update(label);
        m.update(&[form as u8]);
        m.update(challenge);
        m
    }

    // Out of line: called for every field, and inlined at each it would be
    // the largest part of the tag code on a microcontroller.
    #[inline(never)]
    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let free = self.block.get_mut(self.filled..).unwrap_or_default();
            let n = free.len().min(data.len());
            let (now, later) = data.split_at(n);
            free.iter_mut().zip(now).for_each(|(b, d)| *b = *d);
            data = later;
            self.filled += n;
            self.total += n as u64;
            if self.filled == BLOCK {
                sha2::block_api::compress256(&mut self.state, core::slice::from_ref(&self.block));
                self.filled = 0;
            }
        }
    }

    /// SHA-256's padding — 0x80, zeros up to 56 mod 64, the length in bits —
    /// through `update` itself, which leaves the digest in `state`.
    fn pad(&mut self) {
        let bits = self.total.wrapping_mul(8).to_be_bytes();
        self.update(&[0x80]);
        while self.filled != BLOCK - 8 {
            self.update(&[0]);
        }
        self.update(&bits);
    }

    /// The tag, unless a field was too long.
    fn finish(&mut self) -> Result<[u8; TAG_LEN]> {
        match self.overlong {
            Some(field) => Err(Error::LimitExceeded { field, max: u16::MAX as usize }),
            None => Ok(self.finalize()),
        }
    }

    /// The inner digest, then the outer hash over it, in the same block.
    /// By reference, not by value: moving the state in costs its size in
    /// stack a second time. Leaves the state spent (it is wiped on drop).
    fn finalize(&mut self) -> [u8; TAG_LEN] {
        self.pad();
        let mut inner = self.state;
        // The outer key block was one compression (`HmacKey::outer`).
        // Word by word: a whole-array assignment here links `memmove`
        // (1.5 KiB on a Cortex-M) for 32 bytes.
        self.state.iter_mut().zip(self.key.outer).for_each(|(s, o)| *s = o);
        self.total = BLOCK as u64;
        inner.iter().for_each(|w| self.update(&w.to_be_bytes()));
        inner.zeroize();
        self.pad();
        let mut tag = [0u8; TAG_LEN];
        tag.chunks_exact_mut(4).zip(self.state).for_each(|(t, w)| t.copy_from_slice(&w.to_be_bytes()));
        tag
    }

    /// `be16(len) ‖ bytes`.
    fn lp(&mut self, field: &'static str, bytes: &[u8]) {
        let Ok(len) = u16::try_from(bytes.len()) else {
            self.overlong.get_or_insert(field);
            return;
        };
        self.update(&len.to_be_bytes());
        self.update(bytes);
    }

    fn header(&mut self, h: &Header<'_>) {
        self.lp("device", h.device.as_bytes());
        self.lp("topic", h.topic.as_bytes());
        self.update(&h.msg_id.0);
        self.update(&h.issued_at.to_be_bytes());
        self.update(&h.expires_at.to_be_bytes());
    }

    /// The whole tag of a command: `lp(name) ‖ u8(n) ‖ lp(arg)…` after
    /// the header.
    ///
    /// Hidden-form search calls this once per registered command and hashes
    /// the shared prefix each time (two compressions) rather than cloning a
    /// state that has absorbed it: a second live state was 120 B more stack
    /// on a microcontroller, where the registry is a handful of commands.
    /// Out of line for the same reason: its caller's frame never holds a
    /// MAC state.
    #[inline(never)]
    pub(crate) fn command_tag(
        key: &'k HmacKey,
        form: Form,
        challenge: &[u8; CHALLENGE_LEN],
        header: &Header<'_>,
        call: &Call<'_>,
    ) -> Result<[u8; TAG_LEN]> {
        limit("args", call.args.len(), MAX_ARGS)?;
        let mut m = MacInput::new(key, COMMAND_LABEL, form, challenge);
        m.header(header);
        m.lp("name", call.name.as_bytes());
        // MAX_ARGS (16) fits a byte; checked just above.
        #[allow(clippy::cast_possible_truncation)]
        m.update(&[call.args.len() as u8]);
        for a in call.args.iter() {
            m.lp("arg", a.as_bytes());
        }
        m.finish()
    }

    /// The whole tag of a response.
    pub(crate) fn response_tag(
        key: &'k HmacKey,
        form: Form,
        challenge: &[u8; CHALLENGE_LEN],
        header: &Header<'_>,
        in_reply_to: &MsgId,
        outcome: &Outcome<'_>,
    ) -> Result<[u8; TAG_LEN]> {
        let mut m = MacInput::new(key, RESPONSE_LABEL, form, challenge);
        m.header(header);
        m.update(&in_reply_to.0);
        m.update(&[outcome.status as u8]);
        m.update(&outcome.code.to_be_bytes());
        m.lp("output", outcome.output);
        m.finish()
    }
}

/// Constant-time tag comparison.
pub(crate) fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> subtle::Choice {
    a.ct_eq(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain HMAC-SHA256 of `data` under `key`, through `MacInput`.
    fn hmac(key: &[u8; 32], data: &[u8]) -> [u8; 32] {
        let k = HmacKey::new(*key);
        let mut m = MacInput::keyed(&k);
        m.update(data);
        m.finalize()
    }

    /// RFC 4231 test cases 1, 2 and 4 (keys of 20, 4 and 25 bytes, which
    /// HMAC zero-pads, so they are 32-byte keys here too) and 3 (50 bytes of
    /// data, across no block boundary) — `MacInput` computes plain
    /// HMAC-SHA256.
    #[test]
    fn rfc_4231_vectors() {
        let pad = |k: &[u8]| {
            let mut key = [0u8; 32];
            key.iter_mut().zip(k).for_each(|(a, b)| *a = *b);
            key
        };
        let cases: [(&[u8], &[u8], &str); 4] = [
            (&[0x0b; 20], b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
            (
                b"Jefe",
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (&[0xaa; 20], &[0xdd; 50], "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
            (
                &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25],
                &[0xcd; 50],
                "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
            ),
        ];
        for (key, data, tag) in cases {
            assert_eq!(hex::encode(hmac(&pad(key), data)), tag);
        }
    }

    /// Every length around the padding's block boundaries (55/56 bytes in
    /// the last block, whole blocks), fed in uneven pieces, against the
    /// `hmac` crate.
    #[test]
    fn agrees_with_the_hmac_crate_at_every_boundary() {
        use hmac::{Hmac, KeyInit, Mac};
        let key = [0x5a; 32];
        let data: [u8; 300] = core::array::from_fn(|i| (i * 7) as u8);
        for len in 0..data.len() {
            let mut reference = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).unwrap();
            reference.update(&data[..len]);
            let k = HmacKey::new(key);
            let mut m = MacInput::keyed(&k);
            for piece in data[..len].chunks(len % 13 + 1) {
                m.update(piece);
            }
            assert_eq!(m.finalize(), <[u8; 32]>::from(reference.finalize().into_bytes()), "length {len}");
        }
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
