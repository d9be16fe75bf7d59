//! Framing and the value types both modes carry.
//!
//! An envelope is `version (1 byte) ‖ kind (1 byte) ‖ body`, where the body is
//! the kind's struct in [postcard] encoding. The two leading bytes are plain
//! bytes rather than part of the postcard value so that a receiver can
//! dispatch on them (and reject a future version) before decoding anything.
//!
//! Encoding goes through serde's derives. Decoding reads postcard directly
//! with [`Reader`] — the handful of postcard types the envelopes use — and
//! borrows everything from the input, arguments included, so it allocates
//! nothing and copies nothing: the same decoder runs on a microcontroller
//! without a heap, where serde's visitors cost about 2 KiB of flash and
//! 0.5 KiB of stack (docs/BENCHMARKS.md, "Microcontroller agent").
//!
//! [postcard]: https://postcard.jamesmunns.com/wire-format

use core::fmt;

use serde::ser::SerializeSeq;
use serde::{Serialize, Serializer};

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
        return Err(Error::TooLarge { len: frame.len(), max: MAX_FRAME });
    }
    match frame {
        [] | [_] => Err(Error::Truncated),
        [VERSION, kind, ..] if RETIRED_KINDS.contains(kind) => Err(Error::RetiredKind(*kind)),
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
    /// Reads one value from the front of `r`.
    fn read(r: &mut Reader<'a>) -> Result<Self>;
}

/// Decodes one value from the front of `bytes`, returning the rest.
pub(crate) fn take<'a, T: Decode<'a>>(bytes: &'a [u8]) -> Result<(T, &'a [u8])> {
    let mut r = Reader::new(bytes);
    let value = T::read(&mut r)?;
    Ok((value, r.rest()))
}

/// Decodes a whole slice as one value: nothing may be left over.
pub(crate) fn decode<'a, T: Decode<'a>>(bytes: &'a [u8]) -> Result<T> {
    let (value, rest) = take(bytes)?;
    end(rest)?;
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
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader at the start of `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    /// What has not been read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.rest
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let (head, rest) = self.rest.split_at_checked(n).ok_or(Error::Truncated)?;
        self.rest = rest;
        Ok(head)
    }

    /// One byte.
    pub(crate) fn byte(&mut self) -> Result<u8> {
        let (&b, rest) = self.rest.split_first().ok_or(Error::Truncated)?;
        self.rest = rest;
        Ok(b)
    }

    /// `N` raw bytes (postcard's encoding of `[u8; N]`).
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.take(N)?.try_into().map_err(|_| Error::Truncated)
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
    fn varint(&mut self, max_bytes: u32, last_max: u8) -> Result<u64> {
        let mut out = 0u64;
        for i in 0..max_bytes {
            let b = self.byte()?;
            out |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(LONG_VARINT);
                }
                return if i == max_bytes - 1 && b > last_max { Err(BAD_VARINT) } else { Ok(out) };
            }
        }
        Err(BAD_VARINT)
    }

    /// A `u64` varint.
    pub(crate) fn u64(&mut self) -> Result<u64> {
        self.varint(10, 0x01)
    }

    /// A `u32` varint.
    pub(crate) fn u32(&mut self) -> Result<u32> {
        u32::try_from(self.varint(5, 0x0f)?).map_err(|_| BAD_VARINT)
    }

    /// An `i32`: zigzag, then a `u32` varint.
    pub(crate) fn i32(&mut self) -> Result<i32> {
        let z = self.u32()?;
        #[allow(clippy::cast_possible_wrap)] // zigzag: the bit pattern is the value
        Ok(((z >> 1) as i32) ^ -((z & 1) as i32))
    }

    /// A length: a varint, at most what is left to read of a 64 KiB frame.
    fn len(&mut self) -> Result<usize> {
        usize::try_from(self.u64()?).map_err(|_| Error::Truncated)
    }

    /// Length-prefixed bytes.
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    /// A length-prefixed UTF-8 string.
    pub(crate) fn str(&mut self) -> Result<&'a str> {
        core::str::from_utf8(self.bytes()?).map_err(|_| Error::Malformed("invalid UTF-8 in a string"))
    }

    /// An option's tag: `false` for `None`, `true` for `Some`.
    pub(crate) fn option(&mut self) -> Result<bool> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Error::Malformed("bad option tag")),
        }
    }

    /// A value that implements [`Decode`], if the option tag says so.
    pub(crate) fn maybe<T: Decode<'a>>(&mut self) -> Result<Option<T>> {
        if self.option()? { T::read(self).map(Some) } else { Ok(None) }
    }
}

const BAD_VARINT: Error = Error::Malformed("bad varint");
const LONG_VARINT: Error = Error::Malformed("varint not in its shortest form");

impl<'a> Decode<'a> for &'a [u8] {
    fn read(r: &mut Reader<'a>) -> Result<Self> {
        r.bytes()
    }
}

/// Refuses bytes left over after the last field: they are covered by no
/// check, so accepting them would let anyone append to a valid envelope.
pub(crate) fn end(rest: &[u8]) -> Result<()> {
    if rest.is_empty() { Ok(()) } else { Err(Error::Malformed("trailing bytes after the last field")) }
}

/// Writes `version ‖ kind ‖ postcard(body)` into `out`, returning the length.
pub(crate) fn encode_into<T: Serialize>(kind: Kind, body: &T, out: &mut [u8]) -> Result<usize> {
    let (head, rest) = out.split_at_mut_checked(2).ok_or(Error::BufferTooSmall)?;
    head.copy_from_slice(&[VERSION, kind as u8]);
    let used = postcard::to_slice(body, rest)?.len();
    check_frame_len(used + 2)
}

/// Appends the postcard encoding of `value` to `out`.
#[cfg(feature = "alloc")]
pub(crate) fn append<T: Serialize>(out: alloc::vec::Vec<u8>, value: &T) -> Result<alloc::vec::Vec<u8>> {
    Ok(postcard::to_extend(value, out)?)
}

/// Refuses to produce an envelope no receiver would accept.
pub(crate) fn check_frame_len(len: usize) -> Result<usize> {
    if len > MAX_FRAME { Err(Error::TooLarge { len, max: MAX_FRAME }) } else { Ok(len) }
}

/// Checks a length against its protocol limit.
pub(crate) fn limit(field: &'static str, len: usize, max: usize) -> Result<()> {
    if len > max { Err(Error::LimitExceeded { field, max }) } else { Ok(()) }
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
        limit("args", items.len(), MAX_ARGS)?;
        Ok(Args(ArgsRepr::List(items)))
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
                reader.str().ok()
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

impl Serialize for Args<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> core::result::Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.len()))?;
        self.iter().try_for_each(|a| seq.serialize_element(a))?;
        seq.end()
    }
}

impl<'a> Decode<'a> for Args<'a> {
    fn read(r: &mut Reader<'a>) -> Result<Self> {
        let count = r.len()?;
        let start = r.rest();
        // Each string takes at least one byte, so this loop is bounded by
        // the input even for a huge count (which then ends in `truncated`).
        for _ in 0..count {
            r.str()?;
        }
        let used = start.len() - r.rest().len();
        let items = start.get(..used).ok_or(Error::Truncated)?;
        Ok(Args(ArgsRepr::Encoded { items, count }))
    }
}

/// A command: a name from the device's allow-list and its arguments.
///
/// Arguments are strings; the device parses and validates them against the
/// types its allow-list declares. Nothing here is ever handed to a shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
            return Err(Error::Malformed("empty command name"));
        }
        limit("name", self.name.len(), MAX_NAME_LEN)?;
        limit("args", self.args.len(), MAX_ARGS)?;
        self.args.iter().try_for_each(|a| limit("arg", a.len(), MAX_ARG_LEN))
    }
}

impl<'a> Decode<'a> for Call<'a> {
    fn read(r: &mut Reader<'a>) -> Result<Self> {
        Ok(Call { name: r.str()?, args: Args::read(r)? })
    }
}

/// How a verified command ended on the device.
///
/// Only *verified* commands get a response; an envelope that fails any check
/// gets none, so an attacker learns nothing from the network. These statuses
/// are for the controller that sent a genuine command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Outcome<'a> {
    /// How it ended.
    pub status: Status,
    /// Exit code of a program, or a handler's own code; 0 when not applicable.
    pub code: i32,
    /// Captured output, at most [`MAX_OUTPUT_LEN`] bytes.
    pub output: &'a [u8],
}

impl<'a> Decode<'a> for Outcome<'a> {
    fn read(r: &mut Reader<'a>) -> Result<Self> {
        // An enum is its variant index as a u32 varint.
        let status =
            u8::try_from(r.u32()?).ok().and_then(Status::from_byte).ok_or(Error::Malformed("unknown variant"))?;
        Ok(Outcome { status, code: r.i32()?, output: r.bytes()? })
    }
}

impl Outcome<'_> {
    /// Checks the protocol limits.
    ///
    /// # Errors
    /// [`Error::LimitExceeded`] when the output is too long.
    pub fn validate(&self) -> Result<()> {
        limit("output", self.output.len(), MAX_OUTPUT_LEN)
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
        assert_eq!(peek(&big), Err(Error::TooLarge { len: MAX_FRAME + 1, max: MAX_FRAME }));
    }

    /// One spelling per value: every varint the encoder writes decodes,
    /// and the same value with a redundant `80 … 00` tail does not.
    #[test]
    fn only_shortest_varints_decode() {
        for value in [0u64, 1, 127, 128, 300, 16_383, 16_384, 1_790_000_300, u64::from(u32::MAX), u64::MAX] {
            let mut buf = [0u8; 16];
            let short = postcard::to_slice(&value, &mut buf).unwrap().to_vec();
            assert_eq!(Reader::new(&short).u64(), Ok(value), "{short:02x?}");
            if short.len() < 10 {
                let mut long = short.clone();
                *long.last_mut().unwrap() |= 0x80;
                long.push(0);
                assert_eq!(Reader::new(&long).u64(), Err(LONG_VARINT), "{long:02x?}");
            }
        }
        assert_eq!(Reader::new(&[0x80, 0x00]).u32(), Err(LONG_VARINT), "0 spelt in two bytes");
        assert_eq!(Reader::new(&[0xac, 0x82, 0x80, 0x00]).u32(), Err(LONG_VARINT));
        // Lengths too: "ab" with its length spelt in two bytes.
        assert_eq!(Reader::new(&[0x82, 0x00, b'a', b'b']).str(), Err(LONG_VARINT));
        assert_eq!(Reader::new(&[0x02, b'a', b'b']).str(), Ok("ab"));
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
        assert_eq!(call.validate(), Err(Error::LimitExceeded { field: "args", max: MAX_ARGS }));
        // and a valid call encodes as documented: name, count, items.
        let call = Call::new("ab", &["c"]).unwrap();
        let n = postcard::to_slice(&call, &mut buf).unwrap().len();
        assert_eq!(&buf[..n], &[2, b'a', b'b', 1, 1, b'c']);
    }

    #[test]
    fn status_bytes_round_trip() {
        for s in [Status::Ok, Status::Failed, Status::TimedOut, Status::UnknownCommand, Status::BadArguments] {
            assert_eq!(Status::from_byte(s as u8), Some(s));
        }
        assert_eq!(Status::from_byte(5), None);
    }
}
