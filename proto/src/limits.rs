//! Hard limits of the wire format.
//!
//! Every limit is checked while decoding, before anything is allocated or any
//! cryptographic operation runs, so an oversized envelope costs the receiver
//! a length comparison and nothing more. They are part of the protocol
//! (docs/PROTOCOL.md, "Limits"): an encoder that exceeds one produces an
//! envelope every conforming receiver rejects.

/// Largest envelope, in bytes, including the version and kind bytes.
///
/// 64 KiB fits comfortably in one MQTT packet on any broker and bounds what a
/// single publish can make a device parse.
pub const MAX_FRAME: usize = 64 * 1024;

/// Longest device id, in bytes. Ids are also MQTT client ids and topic levels.
pub const MAX_ID_LEN: usize = 64;

/// Longest topic name carried in a header, in bytes.
pub const MAX_TOPIC_LEN: usize = 128;

/// Longest command name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Most arguments one command may carry.
pub const MAX_ARGS: usize = 16;

/// Longest single argument, in bytes.
pub const MAX_ARG_LEN: usize = 256;

/// Longest command output carried back in a response, in bytes.
pub const MAX_OUTPUT_LEN: usize = 32 * 1024;

/// Length of a message id.
pub const MSG_ID_LEN: usize = 16;

/// Length of a challenge.
pub const CHALLENGE_LEN: usize = 16;

/// Length of an HMAC-SHA256 tag (never truncated).
pub const TAG_LEN: usize = 32;

/// Length of a per-device HMAC key: 256 bits (docs/PROTOCOL.md §6.1).
pub const HMAC_KEY_LEN: usize = 32;

/// Length of an RSA key id: SHA-256 of the DER SubjectPublicKeyInfo.
pub const KEY_ID_LEN: usize = 32;

/// Smallest RSA modulus accepted, in bits.
pub const RSA_MIN_BITS: usize = 2048;

/// Largest RSA modulus accepted, in bits.
pub const RSA_MAX_BITS: usize = 4096;

/// What a key outside [`RSA_MIN_BITS`]..=[`RSA_MAX_BITS`] is refused with.
pub const RSA_RANGE: &str = "RSA modulus must be 2048 to 4096 bits";

/// RSA modulus size mqseal generates unless told otherwise, in bits.
pub const RSA_DEFAULT_BITS: usize = 3072;
