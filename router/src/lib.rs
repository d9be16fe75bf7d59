//! `mqseal-router`: the broker's MQTT routing core, without I/O.
//!
//! The front (`mqseal-broker`) owns sockets, TLS, logins and the ACL; what a
//! client is allowed to do comes here as plain calls with the time passed
//! in, in the manner of `mqseal-proto`, `rustls` and `quinn-proto`: no
//! sockets, no tokio, no clock of its own. That keeps every routing rule —
//! which session a topic reaches, which QoS a copy gets, what a full queue
//! drops, when a will or a session expires — testable by unit and property
//! tests, and drivable by the fuzzer, without a network.
//!
//! * [`topic`]: MQTT's topic-name and filter rules, in one place.
//! * [`index`]: exact filters in a hash map, wildcard filters in a trie.
//! * [`retained`]: retained messages in their own trie.
//! * [`session`]: one session's bounded queue, inflight window and acks.
//! * [`journal`]: what a persistent store must write, as dirty keys.
//! * [`routing`]: the [`Router`] that ties them together.
//! * [`stats`]: gauges and drops by reason.
//!
//! docs/ROUTER.md explains the design and why it replaced rumqttd's router.

#![forbid(unsafe_code)]

pub mod index;
pub mod journal;
pub mod message;
pub mod retained;
pub mod routing;
pub mod session;
pub mod stats;
pub mod topic;

pub use journal::{Changes, SessionState, StoredItem};
pub use message::{Message, Millis, Properties, QoS, RetainHandling, SubOptions, Will, secs_after};
pub use routing::{
    Conn, ConnectRequest, Connected, Disconnect, Event, Limits, NEVER_EXPIRES, Router, Stale, Subscribed,
};
pub use session::{Ack, Delivery, Outgoing, Received};
pub use stats::{DropReason, Stats};
