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
//! * [`sealed`] (feature `rsa`): hybrid encryption and a signature. A fresh
//!   content key encrypts the command with ChaCha20-Poly1305, is wrapped for
//!   the device with RSA-OAEP-SHA256, and the sender signs the whole envelope
//!   with RSA-PSS-SHA256. The device checks the signature *before* any
//!   private-key operation (RUSTSEC-2023-0071 is a timing side channel in
//!   RSA decryption; we never decrypt unauthenticated input).
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
//! * `rsa` (implies `alloc`): sealed mode and the replay cache.
//! * `std` (default, with `rsa`): nothing beyond `alloc` today; reserved so
//!   that dependants can ask for std-only conveniences without a breaking
//!   change.
//!
//! The byte-level format is specified in `docs/PROTOCOL.md`, with test
//! vectors in `proto/tests/vectors/`.
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
#[cfg(feature = "rsa")]
pub mod sealed;
pub mod topic;
mod wire;

pub use error::Error;
pub use header::{Header, Policy};
pub use ids::{MsgId, validate_id};
pub use wire::{Args, Call, Kind, Outcome, Status, VERSION, peek};

/// Every fallible function in this crate returns this.
pub type Result<T, E = Error> = core::result::Result<T, E>;
