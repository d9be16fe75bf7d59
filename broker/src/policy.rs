//! What the broker does with each packet of a logged-in client — the path
//! PUBLISH → checks → ACL → router in one place, without I/O.
//!
//! [`Client::on_packet`] takes a decoded packet, the router and the time,
//! makes the router calls the packet asks for and writes the answers
//! (acks, SUBACK, DISCONNECT) into an output buffer; it returns how the
//! connection ends, if it does. The connection loop (`connection.rs`) only
//! moves bytes; the unit tests below and the fuzz target drive this code
//! directly with a real [`Router`].

use std::net::SocketAddr;

use bytes::BytesMut;
use mqseal_router::{Ack, Conn, Message, Millis, QoS, Received, RetainHandling, Router, SubOptions, Subscribed, topic};
use tracing::info;

use crate::acl::{Acl, Principal};
use crate::auth::KickReason;
use crate::codec::decode::{self, Packet};
use crate::codec::{self, Version, kind};
use crate::metrics::Metrics;

/// MQTT 5 reason codes the policy answers with (§2.4).
pub mod reason {
    /// Normal disconnection / success.
    pub const SUCCESS: u8 = 0x00;
    /// UNSUBACK: no subscription existed.
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    /// DISCONNECT with will message.
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    /// Unspecified error (the persistence store failed to commit).
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    /// Malformed packet.
    pub const MALFORMED: u8 = 0x81;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// Server shutting down.
    pub const SHUTTING_DOWN: u8 = 0x8b;
    /// Bad authentication method (AUTH is not supported).
    pub const BAD_AUTH_METHOD: u8 = 0x8c;
    /// Session taken over.
    pub const TAKEN_OVER: u8 = 0x8e;
    /// Topic filter invalid.
    pub const TOPIC_FILTER_INVALID: u8 = 0x8f;
    /// Topic name invalid.
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    /// Packet identifier not found (PUBCOMP for an unknown PUBREL).
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    /// Receive Maximum exceeded.
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    /// Topic alias invalid.
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    /// Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// Quota exceeded (SUBACK: the session holds its maximum of subscriptions).
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    /// Administrative action (the user was disabled or deleted).
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
}

/// How a session ended, which decides the will and what the router is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Client DISCONNECT: no will. v5 may set a new session expiry.
    Clean(Option<u32>),
    /// v5 DISCONNECT 0x04: publish the will.
    CleanWithWill(Option<u32>),
    /// Socket closed or failed without DISCONNECT.
    Lost,
    /// No packet within 1.5 × keep-alive.
    KeepAlive,
    /// Malformed, forbidden or oversized packet.
    Protocol,
    /// Closed by the broker (user disabled/deleted, shutdown).
    Kicked(KickReason),
    /// Another connection took the session (same client id).
    TakenOver,
    /// The persistence store did not commit what the client was about to
    /// be told (durable mode): the acknowledgements are not sent.
    StoreFailed,
}

impl End {
    /// What the router is told.
    #[must_use]
    pub fn disconnect(self) -> mqseal_router::Disconnect {
        let (publish_will, session_expiry_secs) = match self {
            End::Clean(e) => (false, e),
            End::CleanWithWill(e) => (true, e),
            _ => (true, None),
        };
        mqseal_router::Disconnect { publish_will, session_expiry_secs }
    }

    /// The v5 DISCONNECT the broker sends for this end, if any.
    #[must_use]
    pub fn server_reason(self) -> Option<u8> {
        match self {
            End::Kicked(KickReason::Shutdown) => Some(reason::SHUTTING_DOWN),
            End::Kicked(_) => Some(reason::ADMINISTRATIVE_ACTION),
            End::TakenOver => Some(reason::TAKEN_OVER),
            End::StoreFailed => Some(reason::UNSPECIFIED_ERROR),
            _ => None,
        }
    }
}

/// The shared parts a packet is judged by.
pub struct Context<'a> {
    /// Topic rules.
    pub acl: &'a Acl,
    /// Counters.
    pub metrics: &'a Metrics,
}

/// One logged-in client, as the policy sees it.
#[derive(Debug)]
pub struct Client {
    /// Protocol version.
    pub version: Version,
    /// Remote address, for logs.
    pub peer: SocketAddr,
    /// Who it is.
    pub principal: Principal,
    /// Its handle on its router session.
    pub conn: Conn,
    /// The client's MQTT 5 Maximum Packet Size: a larger PUBLISH is
    /// discarded instead of sent, as if it had been delivered (MQTT 5
    /// §3.1.2.11.4). A microcontroller announces its receive buffer this way.
    pub max_packet: Option<usize>,
    /// Whether CONNECT asked for a session expiry of 0: a v5 DISCONNECT
    /// may then not set one (MQTT-3.14.2-2).
    pub expiry_was_zero: bool,
    /// QoS 2 packet ids the ACL refused (3.1.1, which cannot say so in
    /// PUBREC): their PUBREL is answered here without the router.
    denied_qos2: Vec<u16>,
}

/// Longest list of refused QoS 2 ids kept for one 3.1.1 client.
const MAX_DENIED_QOS2: usize = 1024;

impl Client {
    /// A client that has just logged in.
    #[must_use]
    pub fn new(version: Version, peer: SocketAddr, principal: Principal, conn: Conn) -> Self {
        Self { version, peer, principal, conn, max_packet: None, expiry_was_zero: true, denied_qos2: Vec::new() }
    }

    fn v5(&self) -> bool {
        self.version == Version::V5
    }

    /// Counts and logs a protocol violation and, for v5, writes the
    /// DISCONNECT that names it.
    pub fn protocol_error(&self, ctx: &Context<'_>, why: &str, v5_code: u8, out: &mut BytesMut) -> End {
        Metrics::inc(&ctx.metrics.protocol_errors_total);
        info!(peer = %self.peer, client_id = %self.principal.client_id, user = %self.principal.username, reason = why, "disconnected: protocol error");
        if self.v5() {
            codec::disconnect(v5_code, out);
        }
        End::Protocol
    }

    /// Handles one decoded packet.
    pub fn on_packet(
        &mut self,
        ctx: &Context<'_>,
        router: &mut Router,
        now: Millis,
        packet: Packet,
        out: &mut BytesMut,
    ) -> Option<End> {
        if !router.is_current(self.conn) {
            return Some(End::TakenOver);
        }
        match packet {
            Packet::PingReq => {
                codec::pingresp(out);
                None
            }
            Packet::Disconnect(d) => {
                if d.session_expiry_secs.is_some_and(|e| e > 0) && self.expiry_was_zero {
                    return Some(self.protocol_error(
                        ctx,
                        "DISCONNECT sets a session expiry after CONNECT set 0",
                        reason::PROTOCOL_ERROR,
                        out,
                    ));
                }
                let expiry = d.session_expiry_secs.filter(|_| self.v5());
                // Only a normal disconnection (0x00) discards the will;
                // 0x04 asks for it and every error code implies it (MQTT 5
                // §3.1.2.5, §3.14.4).
                Some(if self.v5() && d.reason != reason::SUCCESS {
                    End::CleanWithWill(expiry)
                } else {
                    End::Clean(expiry)
                })
            }
            Packet::Connect => Some(self.protocol_error(ctx, "second CONNECT", reason::PROTOCOL_ERROR, out)),
            Packet::Auth => Some(self.protocol_error(ctx, "AUTH is not supported", reason::BAD_AUTH_METHOD, out)),
            Packet::Publish(p) => self.on_publish(ctx, router, now, p, out),
            Packet::PubAck(a) => {
                self.on_ack(ctx, "PUBACK", router.puback(self.conn, a.pkid));
                None
            }
            Packet::PubRec(a) => {
                let accepted = a.reason < 0x80;
                let answer = router.pubrec(self.conn, a.pkid, accepted);
                if answer == Ok(Ack::Done) && accepted {
                    codec::ack(self.version, kind::PUBREL, a.pkid, 0, out);
                }
                self.on_ack(ctx, "PUBREC", answer);
                None
            }
            Packet::PubComp(a) => {
                self.on_ack(ctx, "PUBCOMP", router.pubcomp(self.conn, a.pkid));
                None
            }
            Packet::PubRel(a) => {
                if let Some(i) = self.denied_qos2.iter().position(|d| *d == a.pkid) {
                    self.denied_qos2.swap_remove(i);
                    codec::ack(self.version, kind::PUBCOMP, a.pkid, 0, out);
                    return None;
                }
                let known = router.release_qos2(self.conn, a.pkid).unwrap_or(false);
                if !known {
                    Metrics::inc(&ctx.metrics.acks_unknown_total);
                    info!(peer = %self.peer, client_id = %self.principal.client_id, pkid = a.pkid, "PUBREL for a packet id with no QoS 2 publish pending");
                }
                let code = if known { reason::SUCCESS } else { reason::PACKET_ID_NOT_FOUND };
                codec::ack(self.version, kind::PUBCOMP, a.pkid, code, out);
                None
            }
            Packet::Subscribe(s) => self.on_subscribe(ctx, router, now, s, out),
            Packet::Unsubscribe(u) => {
                // A filter that could not have been subscribed (`$SYS/#`,
                // which tools send) is answered per filter, like SUBSCRIBE.
                let codes: Vec<u8> = u
                    .filters
                    .iter()
                    .map(|f| {
                        if !topic::valid_filter(f) {
                            reason::TOPIC_FILTER_INVALID
                        } else if router.unsubscribe(self.conn, f).unwrap_or(false) {
                            reason::SUCCESS
                        } else {
                            reason::NO_SUBSCRIPTION_EXISTED
                        }
                    })
                    .collect();
                codec::unsuback(self.version, u.pkid, &codes, out);
                None
            }
        }
    }

    /// An acknowledgement that matched nothing is logged and counted; MQTT
    /// says to carry on, and a client that repeats an ack after a
    /// reconnect is not an attacker.
    fn on_ack(&self, ctx: &Context<'_>, what: &'static str, answer: Result<Ack, mqseal_router::Stale>) {
        if answer == Ok(Ack::Unknown) {
            Metrics::inc(&ctx.metrics.acks_unknown_total);
            info!(peer = %self.peer, client_id = %self.principal.client_id, packet = what, "acknowledgement for a packet id with no delivery in flight");
        }
    }

    fn on_publish(
        &mut self,
        ctx: &Context<'_>,
        router: &mut Router,
        now: Millis,
        p: decode::Publish,
        out: &mut BytesMut,
    ) -> Option<End> {
        if p.topic_alias.is_some() {
            return Some(self.protocol_error(
                ctx,
                "topic alias (the broker announced a maximum of 0)",
                reason::TOPIC_ALIAS_INVALID,
                out,
            ));
        }
        if !topic::valid_topic_name(&p.topic) {
            return Some(self.protocol_error(
                ctx,
                "wildcard, NUL or empty topic name in PUBLISH",
                reason::TOPIC_NAME_INVALID,
                out,
            ));
        }
        if !ctx.acl.can_publish(&self.principal, &p.topic) {
            Metrics::inc(&ctx.metrics.acl_denied_publish_total);
            info!(peer = %self.peer, client_id = %self.principal.client_id, user = %self.principal.username, topic = %p.topic, "publish denied by ACL");
            match p.qos {
                1 => codec::ack(self.version, kind::PUBACK, p.pkid, reason::NOT_AUTHORIZED, out),
                2 => {
                    codec::ack(self.version, kind::PUBREC, p.pkid, reason::NOT_AUTHORIZED, out);
                    if !self.v5() && !self.denied_qos2.contains(&p.pkid) && self.denied_qos2.len() < MAX_DENIED_QOS2 {
                        self.denied_qos2.push(p.pkid);
                    }
                }
                _ => {}
            }
            return None;
        }
        let qos = QoS::from_u8(p.qos).unwrap_or(QoS::AtMostOnce);
        if qos == QoS::ExactlyOnce {
            match router.receive_qos2(self.conn, p.pkid) {
                Ok(Received::Fresh) => {}
                Ok(Received::Duplicate) => {
                    // Routed the first time; a resend only gets its PUBREC again.
                    codec::ack(self.version, kind::PUBREC, p.pkid, 0, out);
                    return None;
                }
                Ok(Received::TooMany) => {
                    return Some(self.protocol_error(
                        ctx,
                        "more unreleased QoS 2 publishes than the Receive Maximum",
                        reason::RECEIVE_MAXIMUM_EXCEEDED,
                        out,
                    ));
                }
                Err(_) => return Some(End::TakenOver),
            }
        }
        let message = Message {
            topic: p.topic.into(),
            payload: p.payload,
            qos,
            retain: p.retain,
            expires_at: p.expiry_secs.map(|s| mqseal_router::secs_after(now, s)),
            properties: p.properties,
        };
        Metrics::inc(&ctx.metrics.messages_in_total);
        if router.publish(Some(self.conn), message, now).is_err() {
            return Some(End::TakenOver);
        }
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => codec::ack(self.version, kind::PUBACK, p.pkid, 0, out),
            QoS::ExactlyOnce => codec::ack(self.version, kind::PUBREC, p.pkid, 0, out),
        }
        None
    }

    fn on_subscribe(
        &mut self,
        ctx: &Context<'_>,
        router: &mut Router,
        now: Millis,
        s: decode::Subscribe,
        out: &mut BytesMut,
    ) -> Option<End> {
        let mut codes = Vec::with_capacity(s.filters.len());
        for (filter, o) in &s.filters {
            let shared = topic::parse_shared(filter).is_some();
            if shared && o.no_local {
                // MQTT-3.8.3-4.
                return Some(self.protocol_error(
                    ctx,
                    "no-local on a shared subscription",
                    reason::PROTOCOL_ERROR,
                    out,
                ));
            }
            if !topic::valid_filter(filter) {
                info!(peer = %self.peer, client_id = %self.principal.client_id, user = %self.principal.username, filter = %filter, "subscription refused: invalid filter");
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            }
            if !ctx.acl.can_subscribe(&self.principal, filter) {
                Metrics::inc(&ctx.metrics.acl_denied_subscribe_total);
                info!(peer = %self.peer, client_id = %self.principal.client_id, user = %self.principal.username, filter = %filter, "subscription denied by ACL");
                codes.push(reason::NOT_AUTHORIZED);
                continue;
            }
            let qos = QoS::from_u8(o.qos).unwrap_or(QoS::AtMostOnce);
            let options = SubOptions {
                qos,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                retain_handling: match o.retain_handling {
                    0 => RetainHandling::OnSubscribe,
                    1 => RetainHandling::OnNewSubscription,
                    _ => RetainHandling::Never,
                },
                id: s.id.filter(|_| self.v5()),
            };
            match router.subscribe(self.conn, filter, options, now) {
                Err(_) => return Some(End::TakenOver),
                Ok(Subscribed::QuotaExceeded) => {
                    info!(peer = %self.peer, client_id = %self.principal.client_id, filter = %filter, "subscription refused: sessions.max_subscriptions reached");
                    codes.push(reason::QUOTA_EXCEEDED);
                }
                Ok(Subscribed::New | Subscribed::Replaced) => codes.push(qos as u8),
            }
        }
        codec::suback(self.version, s.pkid, &codes, out);
        None
    }
}
