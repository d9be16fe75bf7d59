//! The front's own counters, served in Prometheus text format.
//!
//! What an operator of a secure broker needs is at the front: who was refused and why, what the ACL dropped,
//! traffic per direction. Counters are plain atomics (one cache line each is
//! not worth it at these rates) and the HTTP side is a few lines of tokio: a
//! scrape is one GET, and pulling in an HTTP framework for it would double
//! the dependency tree.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqseal_router::{DropReason, Stats};

use crate::hub::Hub;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

macro_rules! counters {
    ($($name:ident: $kind:literal, $help:literal;)*) => {
        /// Every counter the front keeps.
        #[derive(Default, Debug)]
        pub struct Metrics {
            $(#[doc = $help] pub $name: AtomicU64,)*
        }

        impl Metrics {
            /// Prometheus text exposition (version 0.0.4).
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP mqseal_{} {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE mqseal_{} {}", stringify!($name), $kind);
                    let _ = writeln!(out, "mqseal_{} {}", stringify!($name), self.$name.load(Ordering::Relaxed));
                )*
                out
            }
        }
    };
}

counters! {
    connections_accepted_total: "counter", "TCP connections accepted by the front.";
    connections_active: "gauge", "Connections currently open at the front (any state).";
    sessions_active: "gauge", "Authenticated MQTT sessions currently open.";
    connections_refused_limit_total: "counter", "Connections refused because the front's connection limit was reached.";
    connections_refused_logins_total: "counter", "Connections refused because the share of slots for logins in progress (limits.max_pending_logins_percent) was in use.";
    connections_refused_address_total: "counter", "Connections closed at accept because their address already had limits.max_pending_logins_per_address logins in progress while that share was under pressure.";
    logins_in_progress: "gauge", "Connections accepted that have not finished logging in (handshake, CONNECT, authentication, refusal delay).";
    handshake_failures_total: "counter", "TLS or WebSocket handshakes that failed or timed out.";
    connect_timeouts_total: "counter", "Connections closed because no CONNECT arrived in time.";
    logins_ok_total: "counter", "Successful logins.";
    logins_refused_total: "counter", "Logins refused for bad or missing credentials, disabled users, bad client ids or protocol errors.";
    logins_throttled_total: "counter", "Logins refused because the username or address is locked out after failures.";
    logins_unavailable_total: "counter", "Logins refused because the credential store could not be reached.";
    legacy_upgrades_total: "counter", "Legacy (unsalted SHA-256) credentials upgraded on login.";
    acl_denied_publish_total: "counter", "PUBLISH packets dropped by the ACL.";
    acl_denied_subscribe_total: "counter", "Subscription filters refused by the ACL.";
    acl_denied_will_total: "counter", "Connections refused because the will topic is not allowed.";
    packets_too_large_total: "counter", "Packets refused for exceeding the maximum packet size.";
    messages_discarded_too_large_total: "counter", "PUBLISH packets not sent because they exceed the receiving client's Maximum Packet Size.";
    protocol_errors_total: "counter", "Connections closed for malformed or forbidden packets.";
    acks_unknown_total: "counter", "PUBACK, PUBREC, PUBREL or PUBCOMP packets for a packet id with nothing pending (answered as MQTT says, logged).";
    sessions_expired_total: "counter", "Persistent sessions that ended because their session expiry ran out.";
    wills_published_total: "counter", "Wills published (on a lost connection, after their delay, or when their session ended).";
    sessions_kicked_total: "counter", "Sessions closed because their user was disabled or deleted.";
    keepalive_timeouts_total: "counter", "Sessions closed for missing keep-alive.";
    messages_in_total: "counter", "PUBLISH packets received from clients and forwarded.";
    messages_out_total: "counter", "PUBLISH packets sent to clients.";
    bytes_in_total: "counter", "Bytes read from client sockets.";
    bytes_out_total: "counter", "Bytes written to client sockets.";
    store_errors_total: "counter", "Credential store calls that failed or timed out.";
    persist_commits_total: "counter", "Transactions committed to the persistence store (sessions, their messages, retained messages).";
    persist_keys_written_total: "counter", "Keys written or deleted in the persistence store.";
    persist_commit_micros_total: "counter", "Microseconds spent committing to the persistence store (divide by persist_commits_total for the mean).";
    persist_last_commit_micros: "gauge", "How long the latest persistence commit took, in microseconds.";
    persist_commit_failures_total: "counter", "Persistence commits that failed (their changes are retried with the next commit).";
    subscriptions_revoked_total: "counter", "Subscriptions removed from a resumed session because the ACL no longer allows them (its copies on such topics, queued or in flight, count as drops, reason not_allowed).";
    bridge_connects_total: "counter", "Connections made by bridges (broker.toml bridge sections) to their upstream brokers.";
    bridges_connected: "gauge", "Bridges connected to their upstream broker now.";
    bridge_messages_up_total: "counter", "Messages a bridge forwarded upstream and the upstream broker acknowledged.";
    bridge_messages_down_total: "counter", "Messages a bridge brought down from its upstream broker.";
    persist_acks_withheld_total: "counter", "Connections closed in durable mode because the store did not commit in time; their acknowledgements were not sent.";
}

/// At most one log line per interval for something that can come in
/// floods (a store outage, an address over its cap): the counter counts
/// every occurrence, the log says that it is happening, and a flood
/// cannot fill the disk.
#[derive(Debug, Default)]
pub struct LogEvery {
    last: Mutex<Option<Instant>>,
}

impl LogEvery {
    /// Whether a line may be logged now; if so, the next may not be before
    /// `interval` has passed.
    pub fn due(&self, interval: Duration) -> bool {
        let Ok(mut last) = self.last.lock() else { return false };
        let now = Instant::now();
        let due = last.is_none_or(|t| now.saturating_duration_since(t) >= interval);
        if due {
            *last = Some(now);
        }
        due
    }
}

impl Metrics {
    /// The router's gauges and drop counters, appended to `out`; read from
    /// the router at scrape time (`Hub::stats`), not copied on every call.
    pub fn render_router(s: &Stats, lost: u64, out: &mut String) {
        let gauges = [
            ("sessions_online", "Router sessions with a connection.", s.sessions_online),
            ("sessions_offline", "Persistent router sessions without a connection.", s.sessions_offline),
            ("subscriptions", "Subscriptions held (each member of a shared group counts).", s.subscriptions),
            ("retained_messages", "Retained messages held.", s.retained_messages),
            ("retained_bytes", "Topic and payload bytes of the retained messages.", s.retained_bytes),
            ("queued_messages", "Messages waiting in session queues, not yet sent.", s.queued_messages),
            ("queued_bytes", "Topic and payload bytes waiting in session queues.", s.queued_bytes),
            ("inflight_messages", "QoS 1/2 deliveries sent and not yet acknowledged.", s.inflight_messages),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP mqseal_{name} {help}\n# TYPE mqseal_{name} gauge\nmqseal_{name} {v}");
        }
        let counters = [
            ("messages_routed_total", "Publishes routed (client publishes and wills).", s.published),
            ("messages_unmatched_total", "Publishes that matched no subscription.", s.unmatched),
            ("router_events_lost_total", "Router log events dropped because too many came at once.", lost),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP mqseal_{name} {help}\n# TYPE mqseal_{name} counter\nmqseal_{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP mqseal_messages_dropped_total Messages not delivered to a subscriber, by reason (docs/ROUTER.md).\n# TYPE mqseal_messages_dropped_total counter"
        );
        for reason in DropReason::ALL {
            let _ =
                writeln!(out, "mqseal_messages_dropped_total{{reason=\"{}\"}} {}", reason.as_str(), s.drops(reason));
        }
    }

    /// Adds one.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts one (gauges).
    pub fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped: the
/// front's counters and the router's.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, hub: Arc<Hub>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        let hub = hub.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(512);
            let mut chunk = [0u8; 512];
            // A scrape sends a few hundred bytes; anything slower or larger
            // than this is not Prometheus.
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => request.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                    }
                }
                true
            })
            .await;
            if read != Ok(true) {
                return;
            }
            let response = if request.starts_with(b"GET /metrics ") || request.starts_with(b"GET /metrics?") {
                let mut body = metrics.render();
                let (stats, lost) = hub.stats();
                Metrics::render_router(&stats, lost, &mut body);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(response.as_bytes())).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_help_type_and_value() {
        let m = Metrics::default();
        Metrics::inc(&m.logins_ok_total);
        Metrics::add(&m.bytes_in_total, 10);
        let text = m.render();
        assert!(text.contains("# TYPE mqseal_logins_ok_total counter\nmqseal_logins_ok_total 1\n"));
        assert!(text.contains("mqseal_bytes_in_total 10\n"));
        assert!(text.contains("# TYPE mqseal_sessions_active gauge"));
    }
}
