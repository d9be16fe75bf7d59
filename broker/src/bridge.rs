//! `[[bridge]]`: a site broker joined to an upstream broker (a cluster)
//! so that devices on the site are reachable by controllers on the
//! cluster — mqseal's envelopes are end to end, so the bridge only carries
//! them.
//!
//! A bridge is two sessions joined: a persistent session in this broker's
//! own router (client id `!bridge:NAME`, which no client can take: a
//! client's is its device id or `user!client id`, and neither starts with
//! `!`) subscribed to the `out` filters, and an MQTT connection to the
//! upstream broker (persistent too) subscribed to the `in` filters.
//!
//! * **QoS 1 end to end.** A message goes up, and is acknowledged to this
//!   broker's router only once the upstream broker has acknowledged it; a
//!   message comes down, and is acknowledged upstream only once this
//!   router has taken it (and, with durable persistence, committed it).
//!   A lost connection loses nothing: the local session redelivers what
//!   was not acknowledged upstream, the upstream session what was not
//!   acknowledged here.
//! * **No loops.** `out` and `in` must not overlap (checked at start: a
//!   topic both forwarded and brought back would circle for ever), and
//!   the local subscription is no-local, so what the bridge brings down
//!   is never sent back up.
//! * **Reconnects** with back-off (full jitter), moving through the
//!   upstream address list (`failover`), as agents and controllers do.
//! * **Counted** in `/metrics`: `mqseal_bridge_messages_up_total`,
//!   `…_down_total`, `…_connects_total`, `mqseal_bridges_connected`.
//!
//! The pairing of acknowledgements is [`Link`], without I/O; [`run`] is
//! the loop around it.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mqseal_client::BrokerEndpoint;
use mqseal_client::rumqttc::{self, AsyncClient, Event, Packet};
use mqseal_router::{ConnectRequest, Disconnect, Message, NEVER_EXPIRES, Outgoing, QoS, RetainHandling, SubOptions};
use serde::Deserialize;
use tracing::{info, warn};

use crate::hub::Hub;
use crate::metrics::Metrics;

/// `[[bridge]]` in broker.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Names the bridge in logs and in its local session (`!bridge:NAME`).
    pub name: String,
    /// The upstream broker: the keys of an agent's `[broker]` (host, port,
    /// failover, tls_ca, tls_server_name, username, password_file,
    /// keepalive_secs, connect_timeout_secs). Relative paths are relative
    /// to the broker's working directory.
    pub remote: BrokerEndpoint,
    /// Client id upstream (default `mqseal-bridge-NAME`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Filters whose messages go up (default: what devices publish —
    /// their responses, challenges and status).
    #[serde(default = "default_out")]
    pub out: Vec<String>,
    /// Filters whose messages come down (default: what controllers send
    /// devices — commands and challenge requests).
    #[serde(default = "default_in", rename = "in")]
    pub inbound: Vec<String>,
    /// Messages sent up and not yet acknowledged there, at most.
    #[serde(default = "default_window")]
    pub window: u16,
}

fn default_out() -> Vec<String> {
    crate::acl::FROM_DEVICE.iter().map(|c| format!("mqseal/v1/dev/+/{c}")).collect()
}
fn default_in() -> Vec<String> {
    crate::acl::TO_DEVICE.iter().map(|c| format!("mqseal/v1/dev/+/{c}")).collect()
}
fn default_window() -> u16 {
    100
}

impl BridgeConfig {
    /// Checks what can be checked before connecting.
    ///
    /// # Errors
    /// A message naming the bridge and what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(format!("bridge name {name:?}: letters, digits, '-', '_' and '.' only"));
        }
        if self.window == 0 {
            return Err(format!("bridge {name}: window must be at least 1"));
        }
        if self.out.is_empty() && self.inbound.is_empty() {
            return Err(format!("bridge {name}: nothing to forward (out and in are empty)"));
        }
        for f in self.out.iter().chain(&self.inbound) {
            if !mqseal_router::topic::valid_filter(f) {
                return Err(format!("bridge {name}: {f:?} is not a topic filter"));
            }
        }
        for o in &self.out {
            if let Some(i) = self.inbound.iter().find(|i| overlap(o, i)) {
                return Err(format!(
                    "bridge {name}: out filter {o:?} and in filter {i:?} overlap: a message on both would be \
                     forwarded back and forth"
                ));
            }
        }
        self.remote.brokers().map_err(|e| format!("bridge {name}: remote: {e}"))?;
        Ok(())
    }

    fn client_id(&self) -> String {
        self.client_id.clone().unwrap_or_else(|| format!("mqseal-bridge-{}", self.name))
    }
}

/// Whether some topic matches both filters.
pub fn overlap(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('/'), b.split('/'));
    loop {
        match (a.next(), b.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(x), Some(y)) if x == "+" || y == "+" || x == y => {}
            _ => return false,
        }
    }
}

/// The pairing of acknowledgements across the two sessions, without I/O.
///
/// Going up, the upstream client numbers a publish only when it writes it
/// (`Outgoing::Publish(id)`, in the order the publishes were handed to
/// it), so the local packet id of each publish handed over waits in a
/// queue until its upstream id is known, and then until that id is
/// acknowledged.
#[derive(Debug, Default)]
pub struct Link {
    /// Local packet ids (`None` for QoS 0) in the order handed upstream.
    handed: VecDeque<Option<u16>>,
    /// Upstream packet id → local packet id, written and not acknowledged.
    written: HashMap<u16, u16>,
}

impl Link {
    /// A local delivery (packet id `local`, 0 for QoS 0) was handed to the
    /// upstream client.
    pub fn handed(&mut self, local: u16, qos: QoS) {
        self.handed.push_back((qos != QoS::AtMostOnce).then_some(local));
    }

    /// The upstream client wrote the next publish as `remote`.
    pub fn written(&mut self, remote: u16) {
        if let Some(Some(local)) = self.handed.pop_front() {
            self.written.insert(remote, local);
        }
    }

    /// The upstream broker acknowledged `remote`: the local packet id to
    /// acknowledge in turn.
    pub fn acked(&mut self, remote: u16) -> Option<u16> {
        self.written.remove(&remote)
    }

    /// Publishes handed over and not written yet, or written and not
    /// acknowledged (QoS 0 ones count until written).
    pub fn in_flight(&self) -> usize {
        self.handed.len() + self.written.len()
    }

    /// The upstream connection is gone: nothing pending is acknowledged,
    /// and the local session sends it all again on the next connection.
    pub fn reset(&mut self) {
        self.handed.clear();
        self.written.clear();
    }
}

/// Why one upstream connection ended.
enum Ended {
    /// Lost or refused: try again after a delay.
    Lost(String),
    /// The broker is shutting down.
    Shutdown,
}

/// Runs bridge `config` for as long as the broker runs.
/// `max_packet` is the broker's own `limits.max_packet_size`.
pub async fn run(config: BridgeConfig, hub: Arc<Hub>, metrics: Arc<Metrics>, max_packet: usize) {
    let mut backoff = mqseal_client::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut failover = match mqseal_client::Failover::new(&config.remote) {
        Ok(f) => f,
        Err(e) => {
            warn!(bridge = %config.name, "bridge not started: remote: {e}");
            return;
        }
    };
    loop {
        let address = config.remote.address_at(failover.current());
        match connect_once(&config, failover.current(), (&hub, &metrics, max_packet), &mut backoff).await {
            Ended::Shutdown => return,
            Ended::Lost(why) => {
                let delay = backoff.next_delay();
                warn!(bridge = %config.name, upstream = %address, "bridge: {why}; again in {} ms", delay.as_millis());
                failover.advance();
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// A link that stayed up this long resets the reconnect back-off; one
/// that fails sooner after connecting (a message the upstream refuses, a
/// refused subscription) backs off further, not in a tight loop.
const STABLE: Duration = Duration::from_secs(10);

/// Aborts the upstream event-loop task when the connection ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One upstream connection, from CONNECT until it ends.
async fn connect_once(
    config: &BridgeConfig,
    broker: usize,
    shared: (&Hub, &Metrics, usize),
    backoff: &mut mqseal_client::Backoff,
) -> Ended {
    let (hub, metrics, max_packet) = shared;
    let mut options = match config.remote.mqtt_options_at(broker, &config.client_id(), Path::new(".")) {
        Ok(o) => o,
        Err(e) => return Ended::Lost(e.to_string()),
    };
    let window = usize::from(config.window);
    let capacity = window * 2 + 16;
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_inflight(config.window)
        // Whatever this broker accepted must fit through the bridge.
        .set_max_packet_size(max_packet, max_packet)
        .set_request_channel_capacity(capacity);
    let (client, mut events) = AsyncClient::new(options, capacity);
    events.set_network_options(config.remote.network_options());
    let limit = Duration::from_secs(config.remote.connect_timeout_secs.max(1) + 5);
    match tokio::time::timeout(limit, events.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) if ack.code == rumqttc::ConnectReturnCode::Success => {}
        Ok(Ok(other)) => return Ended::Lost(format!("expected CONNACK, got {other:?}")),
        Ok(Err(e)) => return Ended::Lost(e.to_string()),
        Err(_) => return Ended::Lost("no CONNACK in time".into()),
    }
    for f in &config.inbound {
        if let Err(e) = client.try_subscribe(f.as_str(), rumqttc::QoS::AtLeastOnce) {
            return Ended::Lost(format!("subscribing to {f}: {e}"));
        }
    }
    // rumqttc's poll is not cancel-safe (a write held up by a full socket
    // would be lost if another branch of a select won), so it runs in a
    // task of its own and hands its events over a bounded channel.
    let (tx, mut rx) = tokio::sync::mpsc::channel(capacity);
    let _poller = AbortOnDrop(tokio::spawn(async move {
        loop {
            let event = events.poll().await;
            let end = event.is_err();
            if tx.send(event).await.is_err() || end {
                return;
            }
        }
    }));
    let connected_at = tokio::time::Instant::now();
    Metrics::inc(&metrics.bridge_connects_total);
    info!(bridge = %config.name, upstream = %config.remote.address_at(broker), "bridge connected");

    // The local session: resumed, so what queued while upstream was away
    // (and what was in flight) is sent now.
    let local_id = format!("!bridge:{}", config.name);
    let (conn, wake) = {
        let mut locked = hub.lock();
        let now = locked.now;
        let req = ConnectRequest {
            client_id: local_id.as_str().into(),
            clean_start: false,
            session_expiry_secs: NEVER_EXPIRES,
            receive_maximum: config.window,
            will: None,
        };
        let c = locked.router().connect(req, now);
        // Retained messages only for a new subscription: a reconnect does
        // not send every retained status upstream again.
        let sub = SubOptions {
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::OnNewSubscription,
            ..SubOptions::qos(QoS::AtLeastOnce)
        };
        for f in &config.out {
            let _ = locked.router().subscribe(c.conn, f, sub, now);
        }
        let wake = locked.register(c.conn, c.taken_over, crate::hub::INTERNAL_USER);
        (c.conn, wake)
    };
    Metrics::inc(&metrics.bridges_connected);
    let mut link = Link::default();
    let ended = 'conn: loop {
        // Whatever the local session has for upstream, within the window
        // (QoS 0 counted too: each takes a place in the client's queue).
        let mut more = true;
        while more && link.in_flight() < window {
            let next = {
                let mut locked = hub.lock();
                let now = locked.now;
                locked.router().poll_transmit(conn, now)
            };
            match next {
                None => more = false,
                Some(Outgoing::PubRel(_)) => {}
                Some(Outgoing::Publish(d)) => {
                    let qos =
                        if d.qos == QoS::AtMostOnce { rumqttc::QoS::AtMostOnce } else { rumqttc::QoS::AtLeastOnce };
                    let m = &d.message;
                    if let Err(e) = client.try_publish(&*m.topic, qos, d.retain, m.payload.to_vec()) {
                        // The local session keeps it in flight; it goes
                        // again on the next connection.
                        break 'conn Ended::Lost(format!("upstream client: {e}"));
                    }
                    link.handed(d.pkid, d.qos);
                }
            }
        }
        if wake.kicked().is_some() {
            break Ended::Shutdown;
        }
        let event = tokio::select! {
            () = wake.notify.notified() => continue,
            event = rx.recv() => event,
        };
        match event {
            None => break Ended::Lost("upstream event loop ended".into()),
            Some(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(remote)))) => link.written(remote),
            Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(local) = link.acked(ack.pkid) {
                    let _ = hub.lock().router().puback(conn, local);
                    Metrics::inc(&metrics.bridge_messages_up_total);
                }
            }
            Some(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    break Ended::Lost(format!("the upstream broker refused a subscription of {:?}", config.inbound));
                }
            }
            Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let qos = if p.qos == rumqttc::QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                let (taken, owed) = {
                    let mut locked = hub.lock();
                    let now = locked.now;
                    let message = Message::new(&p.topic, p.payload.clone(), qos, p.retain);
                    let taken = locked.router().publish(Some(conn), message, now).is_ok();
                    (taken, locked.owed())
                };
                // Not taken (the local session is gone): not acknowledged,
                // so the upstream session sends it again.
                if !taken {
                    break Ended::Lost("the local session ended".into());
                }
                Metrics::inc(&metrics.bridge_messages_down_total);
                // Acknowledged upstream once it is ours to keep.
                if owed > 0 && !hub.wait_committed(owed, Duration::from_secs(10)).await {
                    break Ended::Lost("the persistence store did not commit in time".into());
                }
                if let Err(e) = client.try_ack(&p) {
                    break Ended::Lost(format!("upstream client: {e}"));
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => break Ended::Lost(e.to_string()),
        }
    };
    {
        let mut locked = hub.lock();
        let now = locked.now;
        let _ = locked.router().disconnect(conn, Disconnect { publish_will: false, session_expiry_secs: None }, now);
        locked.unregister(conn);
    }
    Metrics::dec(&metrics.bridges_connected);
    link.reset();
    if connected_at.elapsed() >= STABLE {
        backoff.reset();
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_filters_are_found() {
        for (a, b) in [
            ("mqseal/v1/dev/+/resp", "mqseal/v1/dev/x/resp"),
            ("a/#", "a"),
            ("#", "anything/at/all"),
            ("a/+/c", "+/b/+"),
        ] {
            assert!(overlap(a, b) && overlap(b, a), "{a} ~ {b}");
        }
        for (a, b) in [("mqseal/v1/dev/+/resp", "mqseal/v1/dev/+/cmd"), ("a/b", "a/b/c"), ("a/+", "a")] {
            assert!(!overlap(a, b) && !overlap(b, a), "{a} !~ {b}");
        }
    }

    #[test]
    fn the_defaults_do_not_loop_and_a_loop_is_refused() {
        let mut c: BridgeConfig = toml::from_str(
            "name = \"site-1\"\n[remote]\nhost = \"cluster\"\nport = 1883\nusername = \"b\"\npassword = \"p\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.validate(), Ok(()));
        c.inbound.push("mqseal/v1/dev/+/status".into());
        let err = c.validate().unwrap_err();
        assert!(err.contains("overlap") && err.contains("status"), "{err}");
    }

    /// Up: each local id is acknowledged once, after its upstream id is,
    /// whatever order the acknowledgements come in; QoS 0 takes no id.
    #[test]
    fn acknowledgements_pair_across_the_two_sessions() {
        let mut l = Link::default();
        l.handed(7, QoS::AtLeastOnce);
        l.handed(0, QoS::AtMostOnce);
        l.handed(9, QoS::AtLeastOnce);
        assert_eq!(l.in_flight(), 3, "QoS 0 holds a place until written");
        l.written(1);
        l.written(0);
        l.written(2);
        assert_eq!(l.acked(2), Some(9));
        assert_eq!(l.acked(2), None, "once");
        assert_eq!(l.acked(1), Some(7));
        assert_eq!(l.in_flight(), 0);
        l.handed(3, QoS::AtLeastOnce);
        l.reset();
        l.written(5);
        assert_eq!(l.acked(5), None, "nothing survives a lost connection");
    }
}
