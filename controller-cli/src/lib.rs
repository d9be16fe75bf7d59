//! # mqseal-controller: the controller side
//!
//! The `mqseal` binary is a thin command line over these modules:
//!
//! * [`audit`] — the record of every command sent and the device's
//!   answer, and checking it again.
//! * [`config`] — `mqseal.toml`, with environment overrides.
//! * [`registry`] — what the controller knows of each device (public key,
//!   HMAC key), 0600.
//! * [`job`] — a command rolled out to many devices: rate, retries,
//!   offline delivery, abort rule, a journal to resume from.
//! * [`provision`] — creating, rotating and removing device credentials,
//!   and writing agent bundles.
//! * [`session`] — sending commands to one or many devices over one MQTT
//!   connection and verifying their answers with `mqseal-proto`.

#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod exchange;
pub mod export;
pub mod job;
pub mod provision;
pub mod registry;
pub mod session;
