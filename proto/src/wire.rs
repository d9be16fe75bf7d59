//! Framing and the value types both modes carry.
//!
//! An envelope is `version (1 byte) ‖ kind (1 byte) ‖ body`, where the body is
//! the kind's struct in [postcard] encoding. The two leading bytes are plain
//! bytes rather than part of the postcard value so that a receiver can
//! dispatch on them (and reject a future version) before decoding anything.
//!
//! Both directions are written by hand for the handful of postcard types
//! the envelopes use: [`Reader`] decodes, borrowing everything from the
//! input (arguments included), so it allocates nothing and copies nothing;
//! [`Encode`] writes field by field into any [`Sink`] — a caller's buffer
//! on a device, a vector in sealed mode. The same code runs on a
//! microcontroller without a heap, where serde's visitors cost about
//! 2 KiB of flash and 0.5 KiB of stack and its encoder another 0.5 KiB
//! (docs/BENCHMARKS.md, "Microcontroller agent"). The tests check both
//! against postcard itself.
//!
//! [postcard]: https://postcard.jamesmunns.com/wire-format

use crate::Text;
use core::fmt;

use crate::limits::{MAX_ARG_LEN, MAX_ARGS, MAX_FRAME, MAX_NAME_LEN, MAX_OUTPUT_LEN};
use crate::{Error, Result};

/// The envelope format version this build reads and writes.
pub const VERSION: u8 = 1;

/// What an envelope is; its second byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Sealed mode, controller to device.
    SealedCommand = 1,
    /// Sealed mode, device to controller: the receipt, encrypted under a key
    /// derived from the command's (docs/PROTOCOL.md §5.4).
    SealedResponse = 7,
    /// Challenge mode: a controller asks for a challenge.
    ChallengeRequest = 3,
    /// Challenge mode: the device hands one out.
    Challenge = 4,
    /// Challenge mode, controller to device.
    ChallengeCommand = 5,
    /// Challenge mode, device to controller.
    ChallengeResponse = 6,
}

impl Kind {
    /// The kind named by a kind byte.
    #[must_use]
    pub const fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::SealedCommand,
            3 => Kind::ChallengeRequest,
            4 => Kind::Challenge,
            5 => Kind::ChallengeCommand,
            6 => Kind::ChallengeResponse,
            7 => Kind::SealedResponse,
            _ => return None,
        })
    }

    /// Its name in docs/PROTOCOL.md.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Kind::SealedCommand => "sealed-command",
            Kind::SealedResponse => "sealed-response",
            Kind::ChallengeRequest => "challenge-request",
            Kind::Challenge => "challenge",
            Kind::ChallengeCommand => "challenge-command",
            Kind::ChallengeResponse => "challenge-response",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Kinds that version 1 once had and no longer accepts. Kind 2 was the
/// first sealed response, whose key was RSA-wrapped to the controller: a
/// second private-key operation on each side that kind 7 does without.
pub const RETIRED_KINDS: &[u8] = &[2];

/// Reads the version and kind bytes of an envelope without decoding the rest.
///
/// Receivers call this first to route an envelope to the right opener. It
/// also enforces [`MAX_FRAME`], so nothing larger is ever looked at.
///
/// # Errors
/// [`Error::TooLarge`], [`Error::Truncated`], [`Error::UnsupportedVersion`],
/// [`Error::RetiredKind`], [`Error::UnknownKind`].
pub fn peek(frame: &[u8]) -> Result<Kind> {
    if frame.len() > MAX_FRAME {
        return Err(Error::TooLarge { len: frame.len() });
    }
    match frame {
        [] | [_] => Err(Error::Truncated),
        // `iter().any`, not `contains`: `contains` on bytes links memchr,
        // 172 B on a Cortex-M for a one-entry list.
        [VERSION, kind, ..] if RETIRED_KINDS.iter().any(|r| r == kind) => Err(Error::RetiredKind(*kind)),
        [VERSION, kind, ..] => Kind::from_byte(*kind).ok_or(Error::UnknownKind(*kind)),
        [version, ..] => Err(Error::UnsupportedVersion(*version)),
    }
}

/// Checks the leading bytes and returns the body of an envelope of `expected` kind.
pub(crate) fn body(frame: &[u8], expected: Kind) -> Result<&[u8]> {
    let found = peek(frame)?;
    if found != expected {
        return Err(Error::WrongKind { expected, found });
    }
    frame.get(2..).ok_or(Error::Truncated)
}

/// A value read from postcard bytes by hand (see [`Reader`]).
pub(crate) trait Decode<'a>: Sized {
    /// Reads one value from the front of `r`. On bad input the reader
    /// records the error and the value is a placeholder nobody sees
    /// ([`take`] and [`decode`] return the error instead).
    fn read(r: &mut Reader<'a>) -> Self;
}

/// Decodes one value from the front of `bytes`, returning the rest.
#[cfg(any(feature = "sealed", test))]
pub(crate) fn take<'a, T: Decode<'a>>(bytes: &'a [u8]) -> Result<(T, &'a [u8])> {
    let mut r = Reader::new(bytes);
    let value = T::read(&mut r);
    Ok((value, r.finish()?))
}

/// Decodes a whole slice as one value: nothing may be left over.
pub(crate) fn decode<'a, T: Decode<'a>>(bytes: &'a [u8]) -> Result<T> {
    let mut r = Reader::new(bytes);
    let value = T::read(&mut r);
    end(r.finish()?)?;
    Ok(value)
}

/// A cursor over postcard-encoded bytes.
///
/// It reads exactly what postcard's own deserializer accepts for the types
/// mqseal uses — fixed byte arrays as raw bytes, LEB128 varints (with
/// postcard's bound on the last byte), zigzag for signed integers, lengths
/// as varints followed by the bytes, an option as a 0/1 tag — and reports
/// the same errors (`truncated`, `malformed`). Lengths are read as 64-bit
/// varints on every target, so a 32-bit device and a 64-bit controller
/// agree on every input.
///
/// Errors are sticky, as in a `std::io` stream's error state: the first
/// one is kept, the rest of the input is dropped (so every later read
/// fails at once and returns a zero value), and [`Reader::finish`] reports
/// it. A decoder is then straight-line code with one check at the end,
/// instead of a `?` after every field — on a microcontroller that plumbing
/// was the largest single item of the verification core (1.9 KiB,
/// docs/BENCHMARKS.md). The first error is the one a `?` chain would have
/// returned.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
    error: Option<Error>,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes, error: None }
    }

    /// What has not been read yet, or the first error.
    pub(crate) fn finish(self) -> Result<&'a [u8]> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.rest),
        }
    }

    /// Whether a read has failed.
    pub(crate) fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// Records `e` unless an earlier error is recorded, and drops the rest.
    // Out of line: every read has a failure path, and this is all of it.
    #[inline(never)]
    fn fail(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
        self.rest = &[];
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        if let Some((head, rest)) = self.rest.split_at_checked(n) {
            self.rest = rest;
            head
        } else {
            self.fail(Error::Truncated);
            &[]
        }
    }

    /// One byte.
    pub(crate) fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    /// `N` raw bytes (postcard's encoding of `[u8; N]`).
    pub(crate) fn array<const N: usize>(&mut self) -> [u8; N] {
        *self.array_ref()
    }

    /// `N` raw bytes, borrowed from the input (all zero after an error).
    pub(crate) fn array_ref<const N: usize>(&mut self) -> &'a [u8; N] {
        self.take(N).first_chunk::<N>().unwrap_or(&[0; N])
    }

    /// A varint of at most `max_bytes` bytes whose last byte is at most
    /// `last_max` (postcard's rule for a `bits`-bit integer), in its
    /// shortest form.
    ///
    /// Shortest means a varint of more than one byte does not end in a zero
    /// byte (`80 00` is 0 spelt long). postcard itself accepts such forms;
    /// mqseal may not. A challenge-mode tag covers *values*, so a second
    /// spelling of a number would be a second, equally valid envelope for
    /// the same command — different bytes that nothing checks, which an
    /// in-path party could use to make a device's duplicate detection miss
    /// a copy. With one spelling per value, the bytes of a valid envelope
    /// are fixed by what its tag or signature covers.
    fn varint(&mut self, max_bytes: usize, last_max: u8) -> u64 {
        // Find the last byte first, then fold from it down: shifting the
        // sum by a constant 7 rather than each byte by 7·i keeps 64-bit
        // variable shifts (a library call on a Cortex-M) out of it.
        let Some(last) = self.rest.iter().take(max_bytes).position(|b| b & 0x80 == 0) else {
            self.fail(if self.rest.len() < max_bytes { Error::Truncated } else { BAD_VARINT });
            return 0;
        };
        let bytes = self.take(last + 1);
        match bytes.last() {
            Some(&0) if last > 0 => self.fail(LONG_VARINT),
            Some(&b) if last == max_bytes - 1 && b > last_max => self.fail(BAD_VARINT),
            _ => {}
        }
        bytes.iter().rev().fold(0, |acc, b| acc << 7 | u64::from(b & 0x7f))
    }

    /// A `u64` varint.
    pub(crate) fn u64(&mut self) -> u64 {
        self.varint(10, 0x01)
    }

    /// A `u32` varint.
    pub(crate) fn u32(&mut self) -> u32 {
        // Five bytes with a last byte of at most 0x0f: 32 bits, never more.
        #[allow(clippy::cast_possible_truncation)]
        let v = self.varint(5, 0x0f) as u32;
        v
    }

    /// An `i32`: zigzag, then a `u32` varint.
    pub(crate) fn i32(&mut self) -> i32 {
        let z = self.u32();
        #[allow(clippy::cast_possible_wrap)] // zigzag: the bit pattern is the value
        let v = ((z >> 1) as i32) ^ -((z & 1) as i32);
        v
    }

    /// A length: a varint; one beyond the address space is truncated input.
    fn len(&mut self) -> usize {
        let n = self.u64();
        usize::try_from(n).unwrap_or_else(|_| {
            self.fail(Error::Truncated);
            0
        })
    }

    /// Length-prefixed bytes.
    pub(crate) fn bytes(&mut self) -> &'a [u8] {
        let n = self.len();
        self.take(n)
    }

    /// A length-prefixed UTF-8 string.
    pub(crate) fn str(&mut self) -> &'a str {
        let bytes = self.bytes();
        core::str::from_utf8(bytes).unwrap_or_else(|_| {
            self.fail(Error::Malformed(Text(&"invalid UTF-8 in a string")));
            ""
        })
    }

    /// An option's tag: `false` for `None`, `true` for `Some`.
    pub(crate) fn option(&mut self) -> bool {
        match self.byte() {
            0 => false,
            1 => true,
            _ => {
                self.fail(Error::Malformed(Text(&"bad option tag")));
                false
            }
        }
    }

    /// A value that implements [`Decode`], if the option tag says so.
    pub(crate) fn maybe<T: Decode<'a>>(&mut self) -> Option<T> {
        if self.option() { Some(T::read(self)) } else { None }
    }
}

const BAD_VARINT: Error = Error::Malformed(Text(&"bad varint"));
const LONG_VARINT: Error = Error::Malformed(Text(&"varint not in its shortest form"));

impl<'a> Decode<'a> for &'a [u8] {
    fn read(r: &mut Reader<'a>) -> Self {
        r.bytes()
    }
}

/// Refuses bytes left over after the last field: they are covered by no
/// check, so accepting them would let anyone append to a valid envelope.
pub(crate) fn end(rest: &[u8]) -> Result<()> {
    if rest.is_empty() { Ok(()) } else { Err(Error::Malformed(Text(&"trailing bytes after the last field"))) }
}

/// Where an encoder writes.
///
/// Writes cannot fail here: a buffer that runs out remembers it and the
/// caller asks once at the end ([`encode_into`]), the way [`Reader`]
/// keeps its first error — the encoders are straight-line code.
pub(crate) trait Sink {
    /// Appends `bytes`.
    fn put(&mut self, bytes: &[u8]);

    /// A varint (LEB128, as postcard writes every integer wider than a byte).
    fn varint(&mut self, mut value: u64) {
        loop {
            // Truncation intended: the low seven bits.
            #[allow(clippy::cast_possible_truncation)]
            let low = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                self.put(&[low]);
                return;
            }
            self.put(&[low | 0x80]);
        }
    }

    /// Length-prefixed bytes (postcard's `&[u8]` and `&str`).
    fn bytes(&mut self, bytes: &[u8]) {
        self.varint(bytes.len() as u64);
        self.put(bytes);
    }
}

/// A caller's buffer, filled from the start.
pub(crate) struct Cursor<'b> {
    out: &'b mut [u8],
    len: usize,
    /// Something did not fit (and nothing after it was written).
    overflow: bool,
}

impl<'b> Cursor<'b> {
    pub(crate) fn new(out: &'b mut [u8]) -> Self {
        Cursor { out, len: 0, overflow: false }
    }

    /// The length written, unless something did not fit.
    pub(crate) fn finish(&self) -> Result<usize> {
        if self.overflow { Err(Error::BufferTooSmall) } else { Ok(self.len) }
    }
}

impl Sink for Cursor<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.len.saturating_add(bytes.len());
        match self.out.get_mut(self.len..end) {
            Some(room) if !self.overflow => {
                room.copy_from_slice(bytes);
                self.len = end;
            }
            _ => self.overflow = true,
        }
    }
}

#[cfg(feature = "alloc")]
impl Sink for alloc::vec::Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A value written in postcard's encoding (the mirror of [`Decode`]).
pub(crate) trait Encode {
    /// Writes the value to `s`.
    fn write<S: Sink + ?Sized>(&self, s: &mut S);
}

impl Encode for &[u8] {
    fn write<S: Sink + ?Sized>(&self, s: &mut S) {
        s.bytes(self);
    }
}

impl<T: Encode> Encode for Option<T> {
    fn write<S: Sink + ?Sized>(&self, s: &mut S) {
        match self {
            None => s.put(&[0]),
            Some(v) => {
                s.put(&[1]);
                v.write(s);
            }
        }
    }
}

/// Writes `version ‖ kind ‖ postcard(body)` into `out`, returning the length.
pub(crate) fn encode_into<T: Encode>(kind: Kind, body: &T, out: &mut [u8]) -> Result<usize> {
    let mut c = Cursor::new(out);
    c.put(&[VERSION, kind as u8]);
    body.write(&mut c);
    check_frame_len(c.finish()?)
}

/// How many bytes `value` encodes to.
#[cfg(feature = "alloc")]
pub(crate) fn encoded_len<T: Encode>(value: &T) -> usize {
    struct Count(usize);
    impl Sink for Count {
        fn put(&mut self, bytes: &[u8]) {
            self.0 = self.0.saturating_add(bytes.len());
        }
    }
    let mut count = Count(0);
    value.write(&mut count);
    count.0
}

/// Appends the postcard encoding of `value` to `out`.
#[cfg(feature = "alloc")]
pub(crate) fn append<T: Encode>(mut out: alloc::vec::Vec<u8>, value: &T) -> alloc::vec::Vec<u8> {
    value.write(&mut out);
    out
}

/// Refuses to produce an envelope no receiver would accept.
pub(crate) fn check_frame_len(len: usize) -> Result<usize> {
    if len > MAX_FRAME { Err(Error::TooLarge { len }) } else { Ok(len) }
}

/// Checks a length against its protocol limit.
pub(crate) fn limit(field: &'static &'static str, len: usize, max: usize) -> Result<()> {
    if len > max { Err(Error::limit_exceeded(field, max)) } else { Ok(()) }
}

/// The arguments of a command: at most [`MAX_ARGS`] strings.
///
/// On the wire this is a postcard sequence of strings. A list built here
/// borrows the caller's slice; a decoded list borrows the encoded bytes and
/// is read again on each iteration, so neither holds a copy (this is what
/// keeps a microcontroller's verification frame small). A decoded list
/// longer than [`MAX_ARGS`] is kept as such, and [`Call::validate`] reports
/// it as exactly that.
#[derive(Clone, Copy)]
pub struct Args<'a>(ArgsRepr<'a>);

#[derive(Clone, Copy)]
enum ArgsRepr<'a> {
    List(&'a [&'a str]),
    /// `items` holds exactly `count` length-prefixed, valid UTF-8 strings.
    Encoded {
        items: &'a [u8],
        count: usize,
    },
}

impl<'a> Args<'a> {
    /// An argument list over `items`.
    ///
    /// # Errors
    /// [`Error::LimitExceeded`] with more than [`MAX_ARGS`] items.
    pub fn new(items: &'a [&'a str]) -> Result<Self> {
        limit(&"args", items.len(), MAX_ARGS)?;
        Ok(Args::unchecked(items))
    }

    /// An argument list over `items`, whatever their number: for a
    /// device's registered commands, whose tags are computed (and so their
    /// number checked) before anything uses them.
    pub(crate) const fn unchecked(items: &'a [&'a str]) -> Self {
        Args(ArgsRepr::List(items))
    }

    /// How many arguments there are.
    #[must_use]
    pub fn len(&self) -> usize {
        match self.0 {
            ArgsRepr::List(items) => items.len(),
            ArgsRepr::Encoded { count, .. } => count,
        }
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The arguments, in order.
    #[must_use]
    pub fn iter(&self) -> ArgsIter<'a> {
        ArgsIter(match self.0 {
            ArgsRepr::List(items) => IterRepr::List(items.iter()),
            ArgsRepr::Encoded { items, count } => IterRepr::Encoded { reader: Reader::new(items), left: count },
        })
    }
}

impl Default for Args<'_> {
    fn default() -> Self {
        Args(ArgsRepr::List(&[]))
    }
}

impl PartialEq for Args<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Args<'_> {}

impl fmt::Debug for Args<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> IntoIterator for &Args<'a> {
    type Item = &'a str;
    type IntoIter = ArgsIter<'a>;
    fn into_iter(self) -> ArgsIter<'a> {
        self.iter()
    }
}

/// Iterator over [`Args`].
#[derive(Debug, Clone)]
pub struct ArgsIter<'a>(IterRepr<'a>);

#[derive(Debug, Clone)]
enum IterRepr<'a> {
    List(core::slice::Iter<'a, &'a str>),
    Encoded { reader: Reader<'a>, left: usize },
}

impl<'a> Iterator for ArgsIter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        match &mut self.0 {
            IterRepr::List(items) => items.next().copied(),
            IterRepr::Encoded { reader, left } => {
                *left = left.checked_sub(1)?;
                // Validated when decoded; a failure here cannot happen and
                // ends the iteration rather than panicking.
                let s = reader.str();
                if reader.failed() { None } else { Some(s) }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match &self.0 {
            IterRepr::List(items) => items.len(),
            IterRepr::Encoded { left, .. } => *left,
        };
        (n, Some(n))
    }
}

impl ExactSizeIterator for ArgsIter<'_> {}

impl Encode for Args<'_> {
    fn write<S: Sink + ?Sized>(&self, s: &mut S) {
        s.varint(self.len() as u64);
        self.iter().for_each(|a| s.bytes(a.as_bytes()));
    }
}

impl<'a> Decode<'a> for Args<'a> {
    fn read(r: &mut Reader<'a>) -> Self {
        let count = r.len();
        let start = r.rest;
        // Each string takes at least one byte, so this loop is bounded by
        // the input even for a huge count (which then ends in `truncated`).
        for _ in 0..count {
            r.str();
            if r.failed() {
                return Args::default();
            }
        }
        let used = start.len() - r.rest.len();
        Args(ArgsRepr::Encoded { items: start.get(..used).unwrap_or_default(), count })
    }
}

/// A command: a name from the device's allow-list and its arguments.
///
/// Arguments are strings; the device parses and validates them against the
/// types its allow-list declares. Nothing here is ever handed to a shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call<'a> {
    /// Command name, at most [`MAX_NAME_LEN`] bytes.
    pub name: &'a str,
    /// Arguments.
    pub args: Args<'a>,
}

impl<'a> Call<'a> {
    /// A command with arguments.
    ///
    /// # Errors
    /// [`Error::LimitExceeded`] when any limit is broken.
    pub fn new(name: &'a str, args: &'a [&'a str]) -> Result<Self> {
        let call = Call { name, args: Args::new(args)? };
        call.validate()?;
        Ok(call)
    }

    /// Checks the protocol limits; decoders call this on every received call.
    ///
    /// # Errors
    /// [`Error::LimitExceeded`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty() {
            return Err(Error::Malformed(Text(&"empty command name")));
        }
        limit(&"name", self.name.len(), MAX_NAME_LEN)?;
        limit(&"args", self.args.len(), MAX_ARGS)?;
        self.args.iter().try_for_each(|a| limit(&"arg", a.len(), MAX_ARG_LEN))
    }
}

impl<'a> Decode<'a> for Call<'a> {
    fn read(r: &mut Reader<'a>) -> Self {
        Call { name: r.str(), args: Args::read(r) }
    }
}

impl Encode for Call<'_> {
    fn write<S: Sink + ?Sized>(&self, s: &mut S) {
        s.bytes(self.name.as_bytes());
        self.args.write(s);
    }
}

/// How a verified command ended on the device.
///
/// Only *verified* commands get a response; an envelope that fails any check
/// gets none, so an attacker learns nothing from the network. These statuses
/// are for the controller that sent a genuine command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// Ran and succeeded.
    Ok = 0,
    /// Ran and failed (non-zero exit code, handler error).
    Failed = 1,
    /// Ran out of its time limit and was stopped.
    TimedOut = 2,
    /// The name is not on the device's allow-list.
    UnknownCommand = 3,
    /// The arguments do not match what the allow-list declares.
    BadArguments = 4,
}

impl Status {
    /// The status named by its wire byte.
    #[must_use]
    pub const fn from_byte(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Ok,
            1 => Status::Failed,
            2 => Status::TimedOut,
            3 => Status::UnknownCommand,
            4 => Status::BadArguments,
            _ => return None,
        })
    }
}

/// What a device reports back about one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome<'a> {
    /// How it ended.
    pub status: Status,
    /// Exit code of a program, or a handler's own code; 0 when not applicable.
    pub code: i32,
    /// Captured output, at most [`MAX_OUTPUT_LEN`] bytes.
    pub output: &'a [u8],
}

impl<'a> Decode<'a> for Outcome<'a> {
    fn read(r: &mut Reader<'a>) -> Self {
        // An enum is its variant index as a u32 varint.
        let index = r.u32();
        let status = u8::try_from(index).ok().and_then(Status::from_byte).unwrap_or_else(|| {
            r.fail(Error::Malformed(Text(&"unknown variant")));
            Status::Ok
        });
        Outcome { status, code: r.i32(), output: r.bytes() }
    }
}

impl Encode for Outcome<'_> {
    fn write<S: Sink + ?Sized>(&self, s: &mut S) {
        // The variant index (declaration order, which is the status byte).
        s.varint(u64::from(self.status as u8));
        // Zigzag, then a varint; the casts reinterpret the bits.
        #[allow(clippy::cast_sign_loss)]
        s.varint(u64::from(((self.code << 1) ^ (self.code >> 31)) as u32));
        s.bytes(self.output);
    }
}

impl Outcome<'_> {
    /// Checks the protocol limits.
    ///
    /// # Errors
    /// [`Error::LimitExceeded`] when the output is too long.
    pub fn validate(&self) -> Result<()> {
        limit(&"output", self.output.len(), MAX_OUTPUT_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_reads_version_and_kind() {
        assert_eq!(peek(&[1, 5, 0]), Ok(Kind::ChallengeCommand));
        assert_eq!(peek(&[]), Err(Error::Truncated));
        assert_eq!(peek(&[1]), Err(Error::Truncated));
        assert_eq!(peek(&[2, 1]), Err(Error::UnsupportedVersion(2)));
        assert_eq!(peek(&[1, 0]), Err(Error::UnknownKind(0)));
        assert_eq!(peek(&[1, 7]), Ok(Kind::SealedResponse));
        assert_eq!(peek(&[1, 8]), Err(Error::UnknownKind(8)));
        assert_eq!(peek(&[1, 2, 0]), Err(Error::RetiredKind(2)));
        // Every kind byte names its kind, and no kind has a retired byte.
        for b in 0..=u8::MAX {
            if let Some(k) = Kind::from_byte(b) {
                assert_eq!(k as u8, b);
                assert!(!RETIRED_KINDS.contains(&b));
            }
        }
        let big = [1u8; MAX_FRAME + 1];
        assert_eq!(peek(&big), Err(Error::TooLarge { len: MAX_FRAME + 1 }));
    }

    /// One spelling per value: every varint the encoder writes decodes,
    /// and the same value with a redundant `80 … 00` tail does not.
    #[test]
    fn only_shortest_varints_decode() {
        for value in [0u64, 1, 127, 128, 300, 16_383, 16_384, 1_790_000_300, u64::from(u32::MAX), u64::MAX] {
            let mut buf = [0u8; 16];
            let short = postcard::to_slice(&value, &mut buf).unwrap().to_vec();
            assert_eq!(read(&short, Reader::u64), Ok(value), "{short:02x?}");
            if short.len() < 10 {
                let mut long = short.clone();
                *long.last_mut().unwrap() |= 0x80;
                long.push(0);
                assert_eq!(read(&long, Reader::u64), Err(LONG_VARINT), "{long:02x?}");
            }
        }
        assert_eq!(read(&[0x80, 0x00], Reader::u32), Err(LONG_VARINT), "0 spelt in two bytes");
        assert_eq!(read(&[0xac, 0x82, 0x80, 0x00], Reader::u32), Err(LONG_VARINT));
        assert_eq!(read(&[0xff, 0xff, 0xff, 0xff, 0x1f], Reader::u32), Err(BAD_VARINT), "33 bits");
        assert_eq!(read(&[0xff, 0xff, 0xff, 0xff, 0x0f], Reader::u32), Ok(u32::MAX));
        assert_eq!(read(&[0x80, 0x80], Reader::u32), Err(Error::Truncated));
        // Lengths too: "ab" with its length spelt in two bytes.
        assert_eq!(read(&[0x82, 0x00, b'a', b'b'], Reader::str), Err(LONG_VARINT));
        assert_eq!(read(&[0x02, b'a', b'b'], Reader::str), Ok("ab"));
    }

    /// The first error is the one reported, and nothing is read after it.
    #[test]
    fn the_first_error_sticks() {
        let mut r = Reader::new(&[0x03, 0xff, 0xfe, 0xfd, 0x05]);
        assert_eq!(r.str(), "");
        assert_eq!(r.u32(), 0, "the rest was dropped");
        assert_eq!(r.finish(), Err(Error::Malformed(Text(&"invalid UTF-8 in a string"))));
        let mut r = Reader::new(&[0x05, b'a']);
        let _ = r.bytes();
        let _ = r.option();
        assert_eq!(r.finish(), Err(Error::Truncated));
        let mut r = Reader::new(&[0x02]);
        assert!(!r.option());
        assert_eq!(r.finish(), Err(Error::Malformed(Text(&"bad option tag"))));
    }

    /// One read through a fresh reader, as a `Result`.
    fn read<'a, T>(bytes: &'a [u8], f: impl FnOnce(&mut Reader<'a>) -> T) -> Result<T> {
        let mut r = Reader::new(bytes);
        let v = f(&mut r);
        r.finish().map(|_| v)
    }

    #[test]
    fn every_kind_byte_round_trips() {
        for b in 0..=255u8 {
            if let Some(k) = Kind::from_byte(b) {
                assert_eq!(k as u8, b);
            }
        }
    }

    #[test]
    fn too_many_args_is_reported_as_such() {
        let mut buf = [0u8; 256];
        // name "x", 17 empty arguments.
        let mut bytes = heapless::Vec::<u8, 64>::new();
        bytes.extend_from_slice(&[1, b'x', 17]).unwrap();
        bytes.extend_from_slice(&[0u8; 17]).unwrap();
        let (call, rest) = take::<Call<'_>>(&bytes).unwrap();
        assert!(rest.is_empty());
        assert_eq!(call.validate(), Err(Error::limit_exceeded(&"args", MAX_ARGS)));
        // and a valid call encodes as documented: name, count, items.
        let call = Call::new("ab", &["c"]).unwrap();
        let mut c = Cursor::new(&mut buf);
        call.write(&mut c);
        let n = c.finish().unwrap();
        assert_eq!(&buf[..n], &[2, b'a', b'b', 1, 1, b'c']);
    }

    /// A buffer one byte short is refused, never overrun.
    #[test]
    fn a_short_buffer_is_buffer_too_small() {
        let call = Call::new("abc", &["de", "f"]).unwrap();
        let mut buf = [0u8; 10];
        let mut c = Cursor::new(&mut buf);
        c.put(&[0; 11]);
        assert_eq!(c.finish(), Err(Error::BufferTooSmall));
        let mut c = Cursor::new(&mut buf[..9]);
        call.write(&mut c);
        assert_eq!(c.finish(), Err(Error::BufferTooSmall));
        let mut c = Cursor::new(&mut buf[..2]);
        c.put(&[1, 2, 3]);
        c.put(&[4]);
        assert_eq!(c.finish(), Err(Error::BufferTooSmall), "nothing is written after an overflow");
        let mut c = Cursor::new(&mut buf);
        call.write(&mut c);
        assert_eq!(c.finish(), Ok(10));
    }

    /// serde mirrors of the envelope values, encoded by postcard itself.
    mod mirror {
        #[derive(serde::Serialize)]
        pub struct Outcome<'a> {
            pub status: u32,
            pub code: i32,
            #[serde(serialize_with = "bytes")]
            pub output: &'a [u8],
        }
        #[derive(serde::Serialize)]
        pub struct Call<'a> {
            pub name: &'a str,
            pub args: &'a [&'a str],
        }
        #[derive(serde::Serialize)]
        pub struct Header<'a> {
            pub device: &'a str,
            pub topic: &'a str,
            pub msg_id: [u8; 16],
            pub issued_at: u64,
            pub expires_at: u64,
            pub ttl: u32,
            pub some: Option<Call<'a>>,
        }
        fn bytes<S: serde::Serializer>(b: &&[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(b)
        }
    }

    fn encoded(f: impl FnOnce(&mut Cursor<'_>)) -> heapless::Vec<u8, 4096> {
        let mut buf = [0u8; 4096];
        let mut c = Cursor::new(&mut buf);
        f(&mut c);
        let n = c.finish().unwrap();
        heapless::Vec::from_slice(&buf[..n]).unwrap()
    }

    proptest::proptest! {
        /// The hand encoder writes exactly postcard's bytes, and the
        /// reader reads them back.
        #[test]
        fn the_encoder_writes_what_postcard_writes(
            status in 0u8..5, code: i32, output in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            name in "[a-z]{1,40}", args in proptest::collection::vec("[ -~]{0,130}", 0..16),
            issued_at: u64, expires_at: u64, ttl: u32, msg_id: [u8; 16], some: bool,
        ) {
            let mut buf = [0u8; 4096];
            let status = Status::from_byte(status).unwrap();
            let o = Outcome { status, code, output: &output };
            let mine = encoded(|c| o.write(c));
            let theirs = postcard::to_slice(&mirror::Outcome { status: status as u32, code, output: &output }, &mut buf).unwrap();
            proptest::prop_assert_eq!(&mine[..], &theirs[..]);
            proptest::prop_assert_eq!(take::<Outcome<'_>>(&mine).unwrap(), (o, &[][..]));

            let arg_refs: heapless::Vec<&str, 16> = args.iter().map(alloc::string::String::as_str).collect();
            let call = Call { name: &name, args: Args::new(&arg_refs).unwrap() };
            let h = crate::Header { device: &name, topic: "t/o/p", msg_id: crate::MsgId(msg_id), issued_at, expires_at };
            let opt = some.then_some(call);
            let mine = encoded(|c| { h.write(c); c.varint(u64::from(ttl)); opt.write(c) });
            let m = mirror::Header {
                device: &name, topic: "t/o/p", msg_id, issued_at, expires_at, ttl,
                some: some.then_some(mirror::Call { name: &name, args: &arg_refs }),
            };
            let theirs = postcard::to_slice(&m, &mut buf).unwrap();
            proptest::prop_assert_eq!(&mine[..], &theirs[..]);
            let mut r = Reader::new(&mine);
            proptest::prop_assert_eq!(crate::Header::read(&mut r), h);
            proptest::prop_assert_eq!(r.u32(), ttl);
            proptest::prop_assert_eq!(r.maybe::<Call<'_>>(), opt);
            proptest::prop_assert_eq!(r.finish(), Ok(&[][..]));
        }
    }

    #[test]
    fn status_bytes_round_trip() {
        for s in [Status::Ok, Status::Failed, Status::TimedOut, Status::UnknownCommand, Status::BadArguments] {
            assert_eq!(Status::from_byte(s as u8), Some(s));
        }
        assert_eq!(Status::from_byte(5), None);
    }
}
