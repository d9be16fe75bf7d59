//! The one error type of the envelope core.
//!
//! Each rejection reason is its own variant so that a device can write one
//! precise local log line, tests can assert the exact reason, and the negative
//! test vectors can name it (see [`Error::code`]). Over the network every
//! rejection looks the same: a device answers none of them.

use core::fmt;

use crate::limits::MAX_FRAME;
use crate::wire::Kind;

/// A fixed piece of text in an [`Error`]: what was malformed, which field
/// broke its limit, which key operation failed.
///
/// One pointer to a `&'static str` rather than the `&'static str` itself,
/// so that an `Error` is two words on a 32-bit device instead of four: every
/// `?` on a microcontroller moves one, and the smaller error took 160–220 B
/// off the verification core (docs/BENCHMARKS.md, "Microcontroller agent").
/// Written `Text(&"…")`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Text(pub &'static &'static str);

impl Text {
    /// The text.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

/// Why an envelope was rejected, or why one could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The envelope is larger than [`crate::limits::MAX_FRAME`].
    #[error("envelope of {len} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge {
        /// Length received.
        len: usize,
    },
    /// The first byte names a format version this build does not speak.
    #[error("unsupported envelope format version {0} (this build speaks version 1)")]
    UnsupportedVersion(u8),
    /// The second byte names no known envelope kind.
    #[error("unknown envelope kind {0}")]
    UnknownKind(u8),
    /// The second byte names a kind this version once had and has retired
    /// (see [`crate::RETIRED_KINDS`]): kind 2, a sealed response whose
    /// key is RSA-wrapped to the controller, from an agent that predates
    /// receipt keys.
    #[error(
        "envelope kind {0} is retired: a sealed response must be kind 7, encrypted under the key derived from its \
         command (docs/PROTOCOL.md §5.4); upgrade the sender's agent"
    )]
    RetiredKind(u8),
    /// A well-formed envelope of another kind than the receiver expects:
    /// mode confusion (a challenge envelope given to a sealed-mode device, a
    /// response where a command belongs).
    #[error("wrong envelope kind: expected {expected}, got {found}")]
    WrongKind {
        /// The kind the receiver accepts here.
        expected: Kind,
        /// The kind the envelope declares.
        found: Kind,
    },
    /// The envelope ends in the middle of a field.
    #[error("envelope is truncated")]
    Truncated,
    /// The bytes do not decode as the declared kind.
    #[error("malformed envelope: {0}")]
    Malformed(Text),
    /// A field is longer, or a list has more items, than the protocol allows.
    #[error("field `{field}` exceeds its limit of {max}")]
    LimitExceeded {
        /// Name of the field, as in docs/PROTOCOL.md.
        field: Text,
        /// The limit. Every limit fits 16 bits: the MAC input's length
        /// prefixes are 16-bit.
        max: u16,
    },
    /// A device id is empty, too long, or has a character outside
    /// `A-Z a-z 0-9 - _ . :`.
    #[error("invalid device id (1-64 characters from A-Z a-z 0-9 - _ . :)")]
    InvalidId,
    /// The envelope is addressed to another device.
    #[error("envelope is addressed to another device")]
    WrongDevice,
    /// The header names another topic than the one the envelope arrived on.
    #[error("envelope names another topic than the one it arrived on")]
    WrongTopic,
    /// A sealed envelope's content key is wrapped for another key than ours.
    #[error("envelope is encrypted for another key")]
    WrongRecipient,
    /// The envelope expires before it is issued.
    #[error("envelope expires before it is issued")]
    InvalidTimes,
    /// The validity window is longer than the receiver's policy allows.
    #[error("envelope validity exceeds the allowed lifetime")]
    LifetimeTooLong,
    /// Issued further in the future than the allowed clock skew.
    #[error("envelope is issued in the future beyond the allowed clock skew")]
    NotYetValid,
    /// Past its expiry time (plus the allowed clock skew).
    #[error("envelope has expired")]
    Expired,
    /// This sender already used this message id.
    #[error("envelope is a replay of one already accepted")]
    Replayed,
    /// Too old for the replay cache to vouch for it (see `sealed::ReplayCache`).
    #[error("envelope is older than the replay window")]
    BeyondReplayWindow,
    /// No trusted key has the sender key id.
    #[error("envelope is signed by an unknown key")]
    UnknownSigner,
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// The content key or the payload does not decrypt.
    #[error("envelope does not decrypt")]
    DecryptFailed,
    /// The challenge is not outstanding: never issued, already used, or expired.
    #[error("challenge is unknown, used or expired")]
    UnknownChallenge,
    /// The HMAC tag matches neither the explicit command nor any registered one.
    #[error("tag does not verify")]
    BadTag,
    /// A response or challenge answers another request than the one pending.
    #[error("reply does not answer the pending request")]
    UnexpectedReply,
    /// The caller's output buffer is too small for the envelope.
    #[error("output buffer too small")]
    BufferTooSmall,
    /// An RSA or HMAC key is unusable (wrong size, exponent or encoding).
    #[error("invalid key: {0}")]
    InvalidKey(Text),
    /// A cryptographic primitive failed while building an envelope.
    #[error("cryptographic operation failed: {0}")]
    Crypto(Text),
    /// Persisted replay state could not be restored.
    #[error("invalid replay state: {0}")]
    InvalidState(Text),
}

/// Every protocol limit fits [`Error::LimitExceeded`]'s 16 bits.
const _: () = {
    use crate::limits::{MAX_ARG_LEN, MAX_ARGS, MAX_ID_LEN, MAX_NAME_LEN, MAX_OUTPUT_LEN, MAX_TOPIC_LEN};
    let mut limits: &[usize] = &[MAX_ARG_LEN, MAX_ARGS, MAX_ID_LEN, MAX_NAME_LEN, MAX_OUTPUT_LEN, MAX_TOPIC_LEN];
    while let [limit, rest @ ..] = limits {
        assert!(*limit <= u16::MAX as usize, "a protocol limit beyond 16 bits");
        limits = rest;
    }
};

impl Error {
    /// `field` is longer than the protocol's `max`. Callers pass one of
    /// `limits`' constants, which all fit 16 bits (checked above).
    pub(crate) const fn limit_exceeded(field: &'static &'static str, max: usize) -> Error {
        #[allow(clippy::cast_possible_truncation)] // checked above for every limit
        Error::LimitExceeded { field: Text(field), max: max as u16 }
    }

    /// A stable, machine-readable name for the variant.
    ///
    /// Negative test vectors and the agents' log lines use these; they never
    /// change once released, while the `Display` text may be reworded.
    #[must_use]
    pub const fn code(&self) -> &'static str {
        match self {
            Error::TooLarge { .. } => "too_large",
            Error::UnsupportedVersion(_) => "unsupported_version",
            Error::UnknownKind(_) => "unknown_kind",
            Error::RetiredKind(_) => "retired_kind",
            Error::WrongKind { .. } => "wrong_kind",
            Error::Truncated => "truncated",
            Error::Malformed(_) => "malformed",
            Error::LimitExceeded { .. } => "limit_exceeded",
            Error::InvalidId => "invalid_id",
            Error::WrongDevice => "wrong_device",
            Error::WrongTopic => "wrong_topic",
            Error::WrongRecipient => "wrong_recipient",
            Error::InvalidTimes => "invalid_times",
            Error::LifetimeTooLong => "lifetime_too_long",
            Error::NotYetValid => "not_yet_valid",
            Error::Expired => "expired",
            Error::Replayed => "replayed",
            Error::BeyondReplayWindow => "beyond_replay_window",
            Error::UnknownSigner => "unknown_signer",
            Error::BadSignature => "bad_signature",
            Error::DecryptFailed => "decrypt_failed",
            Error::UnknownChallenge => "unknown_challenge",
            Error::BadTag => "bad_tag",
            Error::UnexpectedReply => "unexpected_reply",
            Error::BufferTooSmall => "buffer_too_small",
            Error::InvalidKey(_) => "invalid_key",
            Error::Crypto(_) => "crypto",
            Error::InvalidState(_) => "invalid_state",
        }
    }
}

impl From<postcard::Error> for Error {
    fn from(e: postcard::Error) -> Self {
        use postcard::Error as P;
        match e {
            P::DeserializeUnexpectedEnd => Error::Truncated,
            P::DeserializeBadVarint => Error::Malformed(Text(&"bad varint")),
            P::DeserializeBadUtf8 => Error::Malformed(Text(&"invalid UTF-8 in a string")),
            P::DeserializeBadBool => Error::Malformed(Text(&"bad boolean")),
            P::DeserializeBadOption => Error::Malformed(Text(&"bad option tag")),
            P::DeserializeBadEnum => Error::Malformed(Text(&"unknown variant")),
            P::SerializeBufferFull => Error::BufferTooSmall,
            // serde's derive reports unknown enum variants through its custom
            // error; postcard keeps no message for those in no_std.
            P::SerdeDeCustom => Error::Malformed(Text(&"invalid value")),
            _ => Error::Malformed(Text(&"undecodable")),
        }
    }
}
