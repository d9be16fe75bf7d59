//! The embedded rumqttd router and the link between it and the front.
//!
//! **Why in-process links.** rumqttd's listeners would give every client a
//! second, loopback TCP connection behind the front, and the baselines in
//! `shared/research/broker-baselines.md` show what that costs: rumqttd never
//! sets TCP_NODELAY, so every QoS 1 request/response waits ~40 ms for a
//! delayed ACK; its accept loop manages ~880 connections/s; and its listener
//! code holds the crash paths of the audit. A `rumqttd::local::LinkBuilder`
//! link is two shared queues and a channel into the router thread: no socket,
//! no Nagle, no accept loop, and none of `server/broker.rs` (where the
//! poisoned-mutex panics live). The front owns every socket and speaks MQTT;
//! the router only routes. docs/BENCHMARKS.md has the measurements.
//!
//! Two things rumqttd's remote links do that a local link does not, and that
//! the front therefore does itself: wills (the front keeps the will and
//! publishes it through the client's link before disconnecting it), and
//! telling the router a client has gone (the front pushes a DISCONNECT
//! packet, because the router's own `Event::Disconnect` is not public).
//!
//! The router's event type is not nameable outside rumqttd, so the channel
//! into it is captured in a closure rather than stored in a struct field.

use std::sync::Arc;

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig};

use crate::config::RouterTuning;

/// Opens a router link for a client id and clean-session flag. Blocking:
/// call it from `spawn_blocking`. rumqttd's `LinkError` is over 800 bytes
/// (it embeds router events), hence the box.
pub type LinkFactory = Arc<dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), Box<LinkError>> + Send + Sync>;

/// Starts the router thread and returns the factory for links into it.
pub fn start(tuning: &RouterTuning, max_connections: usize) -> LinkFactory {
    let config = RouterConfig {
        // The front refuses connections well before this (it admits at most
        // `limits.max_connections`), so the router's own limit — whose
        // refusal path is one of the audit's crash cases — is never reached.
        max_connections: max_connections.saturating_mul(2).saturating_add(64),
        max_outgoing_packet_count: tuning.max_outgoing_packet_count,
        max_segment_size: tuning.max_segment_size,
        max_segment_count: tuning.max_segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let router_tx = Router::new(0, config).spawn();
    Arc::new(move |client_id: &str, clean: bool| {
        LinkBuilder::new(client_id, router_tx.clone())
            .clean_session(clean)
            // Publishes to topics nobody subscribed to yet are kept (as a
            // retained message may be), matching rumqttd's own listeners.
            .dynamic_filters(true)
            .build()
            .map_err(Box::new)
    })
}
