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

use crate::Text;
use core::fmt;

use rand_core::CryptoRng;
use subtle::{Choice, ConstantTimeEq};
use zeroize::Zeroize;

use crate::header::HeaderOut;
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
            bytes.try_into().map_err(|_| Error::InvalidKey(Text(&"an HMAC key must be exactly 32 bytes")))?;
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

/// SHA-256's round constants (FIPS 180-4 §4.2.2).
#[rustfmt::skip]
const K: [u32; 64] = [
    0x428a_2f98, 0x7137_4491, 0xb5c0_fbcf, 0xe9b5_dba5, 0x3956_c25b, 0x59f1_11f1, 0x923f_82a4, 0xab1c_5ed5,
    0xd807_aa98, 0x1283_5b01, 0x2431_85be, 0x550c_7dc3, 0x72be_5d74, 0x80de_b1fe, 0x9bdc_06a7, 0xc19b_f174,
    0xe49b_69c1, 0xefbe_4786, 0x0fc1_9dc6, 0x240c_a1cc, 0x2de9_2c6f, 0x4a74_84aa, 0x5cb0_a9dc, 0x76f9_88da,
    0x983e_5152, 0xa831_c66d, 0xb003_27c8, 0xbf59_7fc7, 0xc6e0_0bf3, 0xd5a7_9147, 0x06ca_6351, 0x1429_2967,
    0x27b7_0a85, 0x2e1b_2138, 0x4d2c_6dfc, 0x5338_0d13, 0x650a_7354, 0x766a_0abb, 0x81c2_c92e, 0x9272_2c85,
    0xa2bf_e8a1, 0xa81a_664b, 0xc24b_8b70, 0xc76c_51a3, 0xd192_e819, 0xd699_0624, 0xf40e_3585, 0x106a_a070,
    0x19a4_c116, 0x1e37_6c08, 0x2748_774c, 0x34b0_bcb5, 0x391c_0cb3, 0x4ed8_aa4a, 0x5b9c_ca4f, 0x682e_6ff3,
    0x748f_82ee, 0x78a5_636f, 0x84c8_7814, 0x8cc7_0208, 0x90be_fffa, 0xa450_6ceb, 0xbef9_a3f7, 0xc671_78f2,
];

/// SHA-256's compression function (FIPS 180-4 §6.2.2) on one block of
/// big-endian words, which it uses up: the message schedule is computed
/// in place, a ring of 16 words.
///
/// Written here rather than taken from `sha2` (`block_api::compress256`,
/// which the first version of this HMAC used): on a Cortex-M, sha2's
/// compact variant copies the block into a word array and passes that
/// array by value — 216 B of stack at the bottom of the device's deepest
/// call; this keeps no copy of the block at all (docs/BENCHMARKS.md,
/// "Microcontroller agent").
/// Hosts lose sha2's SHA-NI path, which is a microsecond per command. The
/// tests check the HMAC built on it against the `hmac` crate (over `sha2`)
/// at every length around the padding boundaries and on random inputs.
// Every index is `x % 16` into 16 words or a constant below 8 into 8: in
// bounds by construction, and the compiler emits no panic path for them.
#[allow(clippy::indexing_slicing)]
fn compress(state: &mut [u32; 8], w: &mut [u32; 16]) {
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
    for (i, k) in K.iter().enumerate() {
        let wi = if i < 16 {
            w[i % 16]
        } else {
            let w15 = w[(i + 1) % 16];
            let w2 = w[(i + 14) % 16];
            let s0 = w15.rotate_right(7) ^ w15.rotate_right(18) ^ (w15 >> 3);
            let s1 = w2.rotate_right(17) ^ w2.rotate_right(19) ^ (w2 >> 10);
            let next = w[i % 16].wrapping_add(s0).wrapping_add(w[(i + 9) % 16]).wrapping_add(s1);
            w[i % 16] = next;
            next
        };
        let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
        let ch = (e & f) ^ (!e & g);
        let t1 = h.wrapping_add(s1).wrapping_add(ch).wrapping_add(*k).wrapping_add(wi);
        let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
        let maj = (a & b) ^ (a & c) ^ (b & c);
        let t2 = s0.wrapping_add(maj);
        h = g;
        g = f;
        f = e;
        e = d.wrapping_add(t1);
        d = c;
        c = b;
        b = a;
        a = t1.wrapping_add(t2);
    }
    // Constant indices into an array of eight: no bounds checks, and no
    // second array of the working variables on the stack.
    state[0] = state[0].wrapping_add(a);
    state[1] = state[1].wrapping_add(b);
    state[2] = state[2].wrapping_add(c);
    state[3] = state[3].wrapping_add(d);
    state[4] = state[4].wrapping_add(e);
    state[5] = state[5].wrapping_add(f);
    state[6] = state[6].wrapping_add(g);
    state[7] = state[7].wrapping_add(h);
}

/// The state after one compression of `key ‖ 0…0` XOR `pad`: HMAC's
/// inner (0x36) or outer (0x5c) starting point for a 32-byte key.
fn keyed_state(key: &[u8; HMAC_KEY_LEN], pad: u8) -> [u32; 8] {
    let pad = u32::from_ne_bytes([pad; 4]);
    let mut w = [pad; 16];
    // `as_chunks`, not `chunks_exact`: its length needs no division (a
    // Cortex-M0 has no divider, and the library routine is 400 B).
    for (w, k) in w.iter_mut().zip(key.as_chunks::<4>().0) {
        *w ^= u32::from_be_bytes(*k);
    }
    let mut state = IV;
    compress(&mut state, &mut w);
    w.zeroize();
    state
}

/// HMAC-SHA256 fed the MAC input field by field, so no message buffer is
/// needed.
///
/// Written by hand rather than with the `hmac` crate: on a Cortex-M the
/// crate's finalisation (through `digest`'s buffer and wrapper types)
/// copies its state several times — 0.5–0.65 KiB more flash and 0.66–0.7
/// KiB more stack in the verification core, everything else equal. This is
/// one 64-byte block, kept as the words the compression function works on,
/// the chaining value and a count; finalisation reuses the block for the
/// outer hash (docs/BENCHMARKS.md, "Microcontroller agent", has the
/// alternatives measured). The tests check every tag against the `hmac`
/// crate.
pub(crate) struct MacInput<'k> {
    /// Whose outer state finishes the tag.
    key: &'k HmacKey,
    /// The inner hash's chaining value.
    state: [u32; 8],
    /// The block being filled, as big-endian words.
    block: [u32; 16],
    /// Bytes in `block`: always below 64 between calls.
    filled: usize,
    /// Bytes hashed so far, the key block included.
    total: u64,
    /// A field too long for its 16-bit length prefix, if one came: the tag
    /// is refused at the end rather than after every field (like
    /// `wire::Reader`'s errors).
    overlong: Option<&'static &'static str>,
}

impl Drop for MacInput<'_> {
    fn drop(&mut self) {
        self.state.zeroize();
        self.block.zeroize();
    }
}

impl<'k> MacInput<'k> {
    /// A MAC over `key` with nothing absorbed yet. Out of line: both kinds
    /// of tag start here, and the state is written straight into the
    /// caller's place for it.
    #[inline(never)]
    fn keyed(key: &'k HmacKey) -> Self {
        MacInput { key, state: key.inner, block: [0; 16], filled: 0, total: BLOCK as u64, overlong: None }
    }

    /// `label ‖ form ‖ challenge`, how every tag's input starts. A method
    /// on a state its caller made rather than a constructor: returning the
    /// state by value moved all 120 B of it once more.
    fn start(&mut self, label: &[u8], form: Form, challenge: &[u8; CHALLENGE_LEN]) {
        self.update(label);
        self.update(&[form as u8]);
        self.update(challenge);
    }

    // Out of line: called for every field, and inlined at each it would be
    // the largest part of the tag code on a microcontroller.
    #[inline(never)]
    fn update(&mut self, data: &[u8]) {
        for &byte in data {
            // Byte `filled` of the block is byte `filled % 4` of word
            // `filled / 4`, most significant first; a word's first byte
            // clears what the compression left in it.
            let shift = 24 - 8 * (self.filled % 4);
            if let Some(word) = self.block.get_mut(self.filled / 4) {
                *word = if shift == 24 { 0 } else { *word } | u32::from(byte) << shift;
            }
            self.filled += 1;
            if self.filled == BLOCK {
                compress(&mut self.state, &mut self.block);
                self.filled = 0;
            }
        }
        self.total += data.len() as u64;
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

    /// The tag, written out or compared, unless a field was too long.
    ///
    /// Tags are written into the caller's array or compared with the one
    /// given rather than returned: a `Result<[u8; 32]>` keeps its array at
    /// an odd offset, and every caller copied it out again, then held it
    /// beside the tag it compared (32 B more stack at each level on a
    /// Cortex-M).
    #[inline(always)]
    fn finish(&mut self, tag: Tag<'_>) -> Result<Choice> {
        if let Some(field) = self.overlong {
            return Err(Error::LimitExceeded { field: Text(field), max: u16::MAX });
        }
        self.finalize();
        Ok(match tag {
            Tag::Write(out) => {
                store_be(&self.state, out);
                Choice::from(1)
            }
            Tag::Compare(given) => {
                let mut diff = 0u32;
                for (w, t) in self.state.iter().zip(given.as_chunks::<4>().0) {
                    diff |= w ^ u32::from_be_bytes(*t);
                }
                diff.ct_eq(&0)
            }
        })
    }

    /// The inner digest, then the outer hash over it, in the same block.
    /// By reference, not by value: moving the state in costs its size in
    /// stack a second time. Leaves the state spent (it is wiped on drop).
    fn finalize(&mut self) {
        self.pad();
        // The inner digest goes straight into the (empty) block, and the
        // state becomes the outer one: its key block was one compression
        // (`HmacKey::outer`), and the digest follows it.
        let (digest, _) = self.block.split_at_mut(8);
        digest.copy_from_slice(&self.state);
        self.filled = TAG_LEN;
        self.total = (BLOCK + TAG_LEN) as u64;
        self.state = self.key.outer;
        self.pad();
    }

    /// `be16(len)`, or — when `len` does not fit — `field` remembered as
    /// too long and `false`: the bytes must not follow.
    fn length(&mut self, field: &'static &'static str, len: usize) -> bool {
        match u16::try_from(len) {
            Ok(len) => {
                self.update(&len.to_be_bytes());
                true
            }
            Err(_) => {
                self.overlong.get_or_insert(field);
                false
            }
        }
    }

    /// `be16(len) ‖ bytes`.
    fn lp(&mut self, field: &'static &'static str, bytes: &[u8]) {
        if self.length(field, bytes.len()) {
            self.update(bytes);
        }
    }

    /// `be16(len) ‖ bytes` of a field given as pieces.
    fn lp_pieces(&mut self, field: &'static &'static str, pieces: &[&str]) {
        if self.length(field, pieces.iter().map(|p| p.len()).fold(0usize, usize::saturating_add)) {
            pieces.iter().for_each(|p| self.update(p.as_bytes()));
        }
    }

    fn header(&mut self, h: &HeaderOut<'_>) {
        self.lp(&"device", h.device.as_bytes());
        self.lp_pieces(&"topic", h.topic);
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
        tag: Tag<'_>,
    ) -> Result<Choice> {
        limit(&"args", call.args.len(), MAX_ARGS)?;
        let mut m = MacInput::keyed(key);
        m.start(COMMAND_LABEL, form, challenge);
        m.header(&header.out());
        m.lp(&"name", call.name.as_bytes());
        // MAX_ARGS (16) fits a byte; checked just above.
        #[allow(clippy::cast_possible_truncation)]
        m.update(&[call.args.len() as u8]);
        for a in call.args.iter() {
            m.lp(&"arg", a.as_bytes());
        }
        m.finish(tag)
    }

    /// The whole tag of a response.
    pub(crate) fn response_tag(
        key: &'k HmacKey,
        form: Form,
        challenge: &[u8; CHALLENGE_LEN],
        header: &HeaderOut<'_>,
        in_reply_to: &MsgId,
        outcome: &Outcome<'_>,
        tag: Tag<'_>,
    ) -> Result<Choice> {
        let mut m = MacInput::keyed(key);
        m.start(RESPONSE_LABEL, form, challenge);
        m.header(header);
        m.update(&in_reply_to.0);
        m.update(&[outcome.status as u8]);
        m.update(&outcome.code.to_be_bytes());
        m.lp(&"output", outcome.output);
        m.finish(tag)
    }
}

/// What to do with a tag once computed.
pub(crate) enum Tag<'t> {
    /// Write it (building an envelope).
    Write(&'t mut [u8; TAG_LEN]),
    /// Compare it, in constant time, with one received.
    Compare(&'t [u8; TAG_LEN]),
}

/// SHA-256's big-endian output of `words` into the front of `out`.
fn store_be(words: &[u32; 8], out: &mut [u8]) {
    out.as_chunks_mut::<4>().0.iter_mut().zip(words).for_each(|(o, w)| *o = w.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain HMAC-SHA256 of `data` under `key`, through `MacInput`.
    fn hmac(key: &[u8; 32], data: &[u8]) -> [u8; 32] {
        let k = HmacKey::new(*key);
        let mut m = MacInput::keyed(&k);
        m.update(data);
        m.finalize();
        let mut tag = [0; 32];
        store_be(&m.state, &mut tag);
        tag
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
            m.finalize();
            let mut tag = [0; 32];
            store_be(&m.state, &mut tag);
            assert_eq!(tag, <[u8; 32]>::from(reference.finalize().into_bytes()), "length {len}");
        }
    }

    proptest::proptest! {
        /// Random keys and messages, fed in random pieces, against the
        /// `hmac` crate.
        #[test]
        fn agrees_with_the_hmac_crate_on_random_input(
            key: [u8; 32], data in proptest::collection::vec(proptest::num::u8::ANY, 0..2000), piece in 1usize..200,
        ) {
            use hmac::{Hmac, KeyInit, Mac};
            let mut reference = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).unwrap();
            reference.update(&data);
            let k = HmacKey::new(key);
            let mut m = MacInput::keyed(&k);
            data.chunks(piece).for_each(|p| m.update(p));
            m.finalize();
            let mut tag = [0; 32];
            store_be(&m.state, &mut tag);
            proptest::prop_assert_eq!(tag, <[u8; 32]>::from(reference.finalize().into_bytes()));
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
