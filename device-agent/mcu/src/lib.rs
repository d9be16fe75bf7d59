//! # mqseal-mcu-agent: the device side, for microcontrollers
//!
//! The Arduino design of seed 003, on anything Rust targets without an
//! operating system: the device hands out single-use challenges, executes a
//! command only when its HMAC-SHA256 tag over the challenge, its header and
//! the call checks out (`mqseal-proto`'s challenge core — the same code the
//! Linux agent and the controller run), and answers with a tagged response.
//!
//! `#![no_std]`, no allocator, no `unsafe`. Everything it keeps is in
//! fixed-size values the firmware places where it likes (a `static`, its
//! main stack): the [`Agent`] with its challenge table (32 bytes per slot),
//! minimq's receive and transmit buffers, and one envelope buffer.
//!
//! * [`agent`] — the decisions, sans-IO: one publish in, one envelope out.
//! * [`net`] (feature `mqtt`, default) — the MQTT loop over `minimq`.
//! * `sealed` (feature `sealed`) — sealed mode too, for parts with an
//!   allocator and a real-time clock.
//!
//! ## What the firmware supplies
//!
//! * **A byte stream to the broker**: any `embedded_io_async::Read + Write`
//!   (smoltcp/embassy-net TCP, a TLS stream, a modem's socket), opened and
//!   re-opened by the firmware; [`net::serve`] runs one connection.
//! * **Randomness**: a `rand_core::CryptoRng`, normally the part's hardware
//!   RNG (or a DRBG seeded from it). Challenges are only as unpredictable as
//!   this source: a predictable RNG lets an attacker who once saw a tag for
//!   a challenge replay it when the challenge comes round again. A device
//!   without an entropy source must not run this agent.
//! * **A monotonic millisecond count** ([`Clock::monotonic_ms`]: uptime,
//!   a tick counter) for challenge lifetimes. A device with no timer may pass
//!   0: challenges then expire only by use or eviction.
//! * **Optionally, Unix time** ([`Clock::unix_secs`]): header times are
//!   checked too when present. Challenge mode does not need it.
//! * **Key storage**: the 256-bit HMAC key and the broker password from the
//!   bundle `mqseal device add` wrote, kept where the firmware keeps
//!   secrets (flash, a secure element's slot); the agent borrows them.
//! * **An embassy-time driver** (feature `mqtt`): minimq's keepalive and the
//!   connect timeout read `embassy_time::Instant`.
//!
//! Nothing survives a reboot, and nothing needs to: challenges are lost with
//! RAM, so every command captured before a reboot is dead after it.
//!
//! [`Clock::monotonic_ms`]: mqseal_proto::challenge::Clock::monotonic_ms
//! [`Clock::unix_secs`]: mqseal_proto::challenge::Clock::unix_secs
#![no_std]
#![forbid(unsafe_code)]

#[cfg(feature = "sealed")]
extern crate alloc;

pub mod agent;
#[cfg(feature = "mqtt")]
pub mod net;
#[cfg(feature = "sealed")]
pub mod sealed;

pub use agent::{Agent, Commands, Done, ENVELOPE_LEN, OUTPUT_LEN, Rejected, Reply, envelope_len};
pub use mqseal_proto::challenge::{Clock, HmacKey, Registered};
pub use mqseal_proto::{Call, Policy, Status};
