//! The embedded rumqttd router and the link between it and the front.
//!
//! **Why in-process links.** rumqttd's listeners would give every client a
//! second, loopback TCP connection behind the front, and the baselines in
//! docs/RUMQTTD.md show what that costs: rumqttd never
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
//! into it lives inside the link-opener thread rather than in a struct field.
//!
//! **Why one link-opener thread.** `LinkBuilder::build` blocks until the
//! router thread has registered the connection. Run from `spawn_blocking`,
//! a storm of 10,000 logins grew tokio's blocking pool to hundreds of
//! threads — each with its stack and, under glibc, its own malloc arena —
//! and the broker's memory kept growing from one storm to the next. The
//! router registers connections one at a time anyway, so one thread that
//! opens links in turn loses nothing and keeps the process at a fixed
//! number of threads.

use std::collections::VecDeque;

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig, SegmentConfig};
use tokio::sync::{mpsc, oneshot};

use crate::config::RouterTuning;

/// A link into the router: what the session sends, what it receives, and
/// the router's CONNACK (which says whether a session was present).
pub type Link = (LinkTx, LinkRx, Notification);

/// Why a link could not be opened. rumqttd's `LinkError` is over 800 bytes
/// (it embeds router events), hence the box.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The router refused or failed.
    #[error("router: {0}")]
    Router(Box<LinkError>),
    /// The link-opener thread is gone (the router died).
    #[error("the router is not running")]
    Gone,
}

struct Request {
    client_id: String,
    clean: bool,
    reply: oneshot::Sender<Result<Link, OpenError>>,
}

/// Opens router links, from async code, without blocking a runtime thread.
#[derive(Clone)]
pub struct Links {
    requests: mpsc::UnboundedSender<Request>,
}

impl Links {
    /// Opens a link for `client_id` (the router id, see
    /// `Principal::router_id`). The caller bounds the wait.
    pub async fn open(&self, client_id: String, clean: bool) -> Result<Link, OpenError> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(Request { client_id, clean, reply }).map_err(|_| OpenError::Gone)?;
        answer.await.unwrap_or(Err(OpenError::Gone))
    }
}

/// Starts the router thread and the link-opener thread.
pub fn start(tuning: &RouterTuning, max_connections: usize) -> std::io::Result<Links> {
    let config = RouterConfig {
        // The front refuses connections well before this (it admits at most
        // `limits.max_connections`), so the router's own limit — whose
        // refusal path is one of the audit's crash cases — is never reached.
        max_connections: max_connections.saturating_mul(2).saturating_add(64),
        max_outgoing_packet_count: tuning.max_outgoing_packet_count,
        max_segment_size: tuning.max_segment_size,
        max_segment_count: tuning.max_segment_count,
        custom_segment: Some(
            tuning
                .filters
                .iter()
                .map(|(filter, t)| {
                    let segment =
                        SegmentConfig { max_segment_size: t.max_segment_size, max_segment_count: t.max_segment_count };
                    (filter.clone(), segment)
                })
                .collect(),
        ),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let router_tx = Router::new(0, config).spawn();
    let (requests, mut incoming) = mpsc::unbounded_channel::<Request>();
    std::thread::Builder::new().name("link-opener".into()).spawn(move || {
        while let Some(Request { client_id, clean, reply }) = incoming.blocking_recv() {
            let opened = LinkBuilder::new(&client_id, router_tx.clone())
                .clean_session(clean)
                // Publishes to topics nobody subscribed to yet are kept (as a
                // retained message may be), matching rumqttd's own listeners.
                .dynamic_filters(true)
                .build()
                .map(|(tx, rx, ack)| {
                    // rumqttd gives every link an incoming queue with room
                    // for 200 packets of 392 bytes (78 KiB) up front. The
                    // router swaps queues with the link on every batch, so
                    // an empty queue per idle client is enough: it grows
                    // only when that client actually sends.
                    *tx.buffer() = VecDeque::new();
                    (tx, rx, ack)
                })
                .map_err(|e| OpenError::Router(Box::new(e)));
            // The session may have given up waiting; its link then just drops.
            let _ = reply.send(opened);
        }
    })?;
    Ok(Links { requests })
}
