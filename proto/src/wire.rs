//! Framing and the value types both modes carry.
//!
//! An envelope is `version (1 byte) ‖ kind (1 byte) ‖ body`, where the body is
//! the kind's struct in [postcard] encoding. The two leading bytes are plain
//! bytes rather than part of the postcard value so that a receiver can
//! dispatch on them (and reject a future version) before decoding anything.
//!
//! Decoding borrows from the input (`&str`, `&[u8]`) and collects arguments
//! into a fixed-capacity list, so it allocates nothing: the same decoder runs
//! on a microcontroller without a heap.
//!
//! [postcard]: https://postcard.jamesmunns.com/wire-format

use core::fmt;

use serde::de::{SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    /// Sealed mode, device to controller.
    SealedResponse = 2,
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
            2 => Kind::SealedResponse,
            3 => Kind::ChallengeRequest,
            4 => Kind::Challenge,
            5 => Kind::ChallengeCommand,
            6 => Kind::ChallengeResponse,
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

/// Reads the version and kind bytes of an envelope without decoding the rest.
///
/// Receivers call this first to route an envelope to the right opener. It
/// also enforces [`MAX_FRAME`], so nothing larger is ever looked at.
///
/// # Errors
/// [`Error::TooLarge`], [`Error::Truncated`], [`Error::UnsupportedVersion`],
/// [`Error::UnknownKind`].
pub fn peek(frame: &[u8]) -> Result<Kind> {
    if frame.len() > MAX_FRAME {
        return Err(Error::TooLarge { len: frame.len(), max: MAX_FRAME });
    }
    match frame {
        [] | [_] => Err(Error::Truncated),
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

/// Decodes one postcard value from the front of `bytes`, returning the rest.
pub(crate) fn take<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, &'a [u8])> {
    Ok(postcard::take_from_bytes(bytes)?)
}

/// Decodes a whole slice as one postcard value: nothing may be left over.
pub(crate) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    let (value, rest) = take(bytes)?;
    end(rest)?;
    Ok(value)
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
/// On the wire this is a postcard sequence of strings. Decoding collects into
/// a fixed-capacity list; a longer sequence is not an error *during*
/// decoding (postcard would lose the reason) but sets a flag that
/// [`Call::validate`] turns into [`Error::LimitExceeded`], so an oversized
/// command is reported as exactly that.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Args<'a> {
    items: heapless::Vec<&'a str, MAX_ARGS>,
    overflow: bool,
}

impl<'a> Args<'a> {
    /// Builds an argument list.
    ///
    /// # Errors
    /// [`Error::LimitExceeded`] with more than [`MAX_ARGS`] items.
    pub fn new(items: &[&'a str]) -> Result<Self> {
        let items =
            heapless::Vec::from_slice(items).map_err(|_| Error::LimitExceeded { field: "args", max: MAX_ARGS })?;
        Ok(Args { items, overflow: false })
    }

    /// The arguments.
    #[must_use]
    pub fn as_slice(&self) -> &[&'a str] {
        &self.items
    }
}

impl Serialize for Args<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> core::result::Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.items.len()))?;
        self.items.iter().try_for_each(|a| seq.serialize_element(a))?;
        seq.end()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Args<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> core::result::Result<Self, D::Error> {
        struct V<'a>(core::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Args<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence of strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> core::result::Result<Args<'a>, A::Error> {
                let mut args = Args::default();
                // Each element consumes at least one input byte, so this loop
                // is bounded by the envelope length even for a huge count.
                while let Some(item) = seq.next_element::<&'de str>()? {
                    if args.items.push(item).is_err() {
                        args.overflow = true;
                    }
                }
                Ok(args)
            }
        }
        d.deserialize_seq(V(core::marker::PhantomData))
    }
}

/// A command: a name from the device's allow-list and its arguments.
///
/// Arguments are strings; the device parses and validates them against the
/// types its allow-list declares. Nothing here is ever handed to a shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call<'a> {
    /// Command name, at most [`MAX_NAME_LEN`] bytes.
    pub name: &'a str,
    /// Arguments.
    #[serde(borrow)]
    pub args: Args<'a>,
}

impl<'a> Call<'a> {
    /// A command with arguments.
    ///
    /// # Errors
    /// [`Error::LimitExceeded`] when any limit is broken.
    pub fn new(name: &'a str, args: &[&'a str]) -> Result<Self> {
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
        if self.args.overflow {
            return Err(Error::LimitExceeded { field: "args", max: MAX_ARGS });
        }
        self.args.items.iter().try_for_each(|a| limit("arg", a.len(), MAX_ARG_LEN))
    }
}

/// How a verified command ended on the device.
///
/// Only *verified* commands get a response; an envelope that fails any check
/// gets none, so an attacker learns nothing from the network. These statuses
/// are for the controller that sent a genuine command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome<'a> {
    /// How it ended.
    pub status: Status,
    /// Exit code of a program, or a handler's own code; 0 when not applicable.
    pub code: i32,
    /// Captured output, at most [`MAX_OUTPUT_LEN`] bytes.
    pub output: &'a [u8],
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
        assert_eq!(peek(&[1, 7]), Err(Error::UnknownKind(7)));
        let big = [1u8; MAX_FRAME + 1];
        assert_eq!(peek(&big), Err(Error::TooLarge { len: MAX_FRAME + 1, max: MAX_FRAME }));
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
