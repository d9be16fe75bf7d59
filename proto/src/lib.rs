//! # mqseal-proto: the envelope core
//!
//! Every part of mqseal — the std agent, the microcontroller agent, the
//! controller CLI, the tests — turns bytes into verified commands through this
//! crate, so there is exactly one implementation of each check.
//!
//! It is *sans-IO* in the manner of `rustls` and `quinn-proto`: it never
//! touches a socket, a clock or a file. Callers pass the current time and a
//! random number generator in, and get bytes or verified values out. That is
//! what lets the same code run on a Linux agent under tokio, on a Cortex-M
//! without an allocator, and in deterministic test vectors.
//!
//! ## Two envelope modes
//!
//! * [`sealed`] (feature `sealed`): hybrid encryption and a signature. A
//!   fresh content key encrypts the command with ChaCha20-Poly1305, is
//!   wrapped for the device with RSA-OAEP-SHA256, and the sender signs the
//!   whole envelope with RSA-PSS-SHA256. The device checks the signature
//!   *before* any private-key operation (RUSTSEC-2023-0071 is a timing side
//!   channel in the `rsa` crate's decryption; we never decrypt
//!   unauthenticated input). Its receipt is encrypted under a key derived
//!   from the command's and signed by the device.
//! * [`challenge`]: HMAC-SHA256 challenge-response for devices too small for
//!   RSA. The device hands out single-use challenges; the controller answers
//!   with a tag over the challenge, the device id and the command. Needs no
//!   allocator and no clock.
//!
//! Both modes name the target device, the topic, a message id and issue and
//! expiry times inside what the signature or tag covers ([`Header`]).
//!
//! ## Features
//!
//! * no default features: the challenge path, `#![no_std]`, no allocator.
//! * `alloc`: `Vec`-returning encoders.
//! * `sealed` (implies `alloc`): sealed mode and the replay cache, with one
//!   or both RSA backends ([`sealed::backend`]):
//!   * `aws-lc` (default): aws-lc-rs, constant-time, within 1.14× of
//!     OpenSSL 3.0 at 2048 bits and 2.5× faster at 3072 and 4096
//!     (docs/BENCHMARKS.md); needs `std` and a C compiler at build time;
//!   * `rustcrypto`: the pure-Rust `rsa` crate, for `no_std` targets.
//! * `std` (default, with `sealed` and `aws-lc`): `alloc`, plus std support
//!   in the dependencies that have it.
//!
//! The byte-level format is specified in `docs/PROTOCOL.md`, with test
//! vectors in `proto/tests/vectors/`.
//!
//! ## Example
//!
//! A controller building a hidden-form challenge command (the README shows
//! the same code):
//!
//! ```
//! use mqseal_proto::challenge::{ChallengeController, Form, HmacKey};
//! use mqseal_proto::topic::{Channel, topic};
//! use mqseal_proto::{Call, Header, MsgId};
//!
//! /// Builds a hidden-form command for device "valve-3" over a challenge it
//! /// handed out; returns the envelope's length in `out`.
//! fn open_valve(key: &HmacKey, challenge: &[u8; 16], now: u64, msg_id: MsgId, out: &mut [u8]) -> mqseal_proto::Result<usize> {
//!     let controller = ChallengeController::new("valve-3", key)?;
//!     let cmd_topic = topic("valve-3", Channel::Command)?;
//!     let header = Header { device: "valve-3", topic: &cmd_topic, msg_id, issued_at: now, expires_at: now + 30 };
//!     controller.command(&header, challenge, &Call::new("open", &["25"])?, Form::Hidden, out)
//! }
//!
//! let mut out = [0u8; 256];
//! let len = open_valve(&HmacKey::new([1; 32]), &[2; 16], 1_800_000_000, MsgId([3; 16]), &mut out).unwrap();
//! assert_eq!(mqseal_proto::peek(&out[..len]), Ok(mqseal_proto::Kind::ChallengeCommand));
//! ```
#![no_std]
#![forbid(unsafe_code)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod challenge;
mod error;
mod header;
mod ids;
pub mod limits;
#[cfg(feature = "sealed")]
pub mod sealed;

#[cfg(all(feature = "sealed", not(any(feature = "aws-lc", feature = "rustcrypto"))))]
compile_error!("sealed mode needs an RSA backend: enable `aws-lc` (std) or `rustcrypto` (no_std)");
pub mod topic;
mod wire;

pub use error::{Error, Text};
pub use header::{Header, Policy};
pub use ids::{MsgId, validate_id};
pub use wire::{Args, Call, Kind, Outcome, RETIRED_KINDS, Status, VERSION, peek};

/// Every fallible function in this crate returns this.
pub type Result<T, E = Error> = core::result::Result<T, E>;
