//! # mqseal-agent: the device side, for Linux devices
//!
//! Subscribes to the device's command and challenge-request topics, answers
//! challenge requests, and executes a command only when `mqseal-proto` has
//! verified it — signed by a trusted controller or tagged with the device's
//! key, addressed to this device on this topic, fresh, and not seen before —
//! and only if it is on the allow-list ([`commands`]). Every executed
//! command is answered with a sealed or tagged receipt.
//!
//! * [`config`] — `agent.toml`.
//! * [`agent`] — the decisions, without the network (sans-IO like `proto`).
//! * [`exec`] — running allow-listed commands with bounds.
//! * [`state`] — what survives a restart, so each command runs at most once.
//! * [`run`] — the MQTT loop (rumqttc): reconnects, status, shutdown.

#![forbid(unsafe_code)]

pub mod agent;
pub mod commands;
pub mod config;
pub mod exec;
pub mod run;
pub mod state;
