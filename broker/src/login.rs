//! From the first packet to CONNACK: CONNECT is read and checked, the
//! client authenticated and authorised, and its router session opened.
//!
//! Every refusal after CONNECT is a login decision and is answered no
//! sooner than `auth.refusal_delay_ms` after the CONNECT arrived: how
//! quickly the broker says no must not tell what it checked (whether the
//! name could exist, is a device, is locked out), whoever the user.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use mqseal_router::{ConnectRequest, Limits, Message, NEVER_EXPIRES, QoS, Will, topic};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::acl::Principal;
use crate::auth::Refusal;
use crate::codec::decode::{self, Connect};
use crate::codec::{self, ConnAckInfo, Frame, Version, kind};
use crate::connection::{ListenerKind, Read, Shared, read_frame, send};
use crate::hub::Wake;
use crate::metrics::Metrics;
use crate::policy::Client;

/// Refusal codes for CONNACK, per version.
#[derive(Clone, Copy)]
pub(crate) struct Code {
    v4: u8,
    v5: u8,
}

impl Code {
    fn for_version(self, version: Version) -> u8 {
        if version == Version::V4 { self.v4 } else { self.v5 }
    }
}

const UNSUPPORTED_VERSION: Code = Code { v4: 0x01, v5: 0x84 };
/// v5 only: a 3.1.1 client that breaks the packet rules is disconnected.
const MALFORMED: Code = Code { v4: 0x00, v5: 0x81 };
const BAD_CLIENT_ID: Code = Code { v4: 0x02, v5: 0x85 };
const UNAVAILABLE: Code = Code { v4: 0x03, v5: 0x88 };
/// The front's connection limit: 3.1.1 has only "server unavailable".
pub(crate) const OVER_LIMIT: Code = Code { v4: 0x03, v5: 0x97 };
const BAD_CREDENTIALS: Code = Code { v4: 0x04, v5: 0x86 };
const NOT_AUTHORIZED: Code = Code { v4: 0x05, v5: 0x87 };
const BAD_AUTH_METHOD: Code = Code { v4: 0x05, v5: 0x8c };
const THROTTLED: Code = Code { v4: 0x05, v5: 0x97 };

fn refusal_code(r: Refusal) -> Code {
    match r {
        Refusal::NoCredentials | Refusal::Disabled => NOT_AUTHORIZED,
        Refusal::BadCredentials => BAD_CREDENTIALS,
        Refusal::Throttled => THROTTLED,
        Refusal::Unavailable => UNAVAILABLE,
    }
}

/// How long a refused client gets to read its CONNACK.
const REFUSAL_WRITE: Duration = Duration::from_secs(5);

/// Answers a CONNECT with a refusal, waiting at most until `until` for the
/// client to take it.
pub(crate) async fn refuse<W>(wr: &mut W, version: Version, code: Code, reason: Option<&'static str>, until: Instant)
where
    W: AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    codec::connack(version, false, code.for_version(version), &ConnAckInfo { reason, ..Default::default() }, &mut out);
    let _ = tokio::time::timeout_at(until, send(wr, &out)).await;
}

/// Longest client id accepted (MQTT guarantees 23; real fleets use more).
const MAX_CLIENT_ID: usize = 128;

/// Whether a client id may be used: no topic wildcards, `/`, `$` or NUL
/// (a device's id is its username, which fills a topic level in the ACL),
/// and not very long.
#[must_use]
pub fn valid_client_id(id: &str) -> bool {
    id.len() <= MAX_CLIENT_ID && !id.contains(['+', '#', '/', '$', '\0'])
}

/// Why a first packet is not a usable CONNECT.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// Not MQTT 3.1.1 or 5: the level named, or `None` when the protocol
    /// name is not MQTT at all.
    Level(Option<u8>),
    /// The flags or the body break a rule.
    Malformed(Version, &'static str),
}

/// Reads a CONNECT frame: protocol level, flag rules, then the body.
///
/// # Errors
/// Which of those failed.
pub fn parse_connect(frame: &Frame) -> Result<Connect, ConnectError> {
    let version = match codec::connect_level(frame) {
        Some(4) => Version::V4,
        Some(5) => Version::V5,
        level => return Err(ConnectError::Level(level)),
    };
    codec::check_connect_flags(frame, version).map_err(|why| ConnectError::Malformed(version, why))?;
    decode::connect(frame).map_err(|e| ConnectError::Malformed(version, e.rule()))
}

/// What the router is asked for a logged-in CONNECT, and the session
/// expiry the client asked for (before the configured cap): a 3.1.1 clean
/// session ends with its connection, a persistent one never expires; a v5
/// client says.
#[must_use]
pub fn router_request(connect: &Connect, principal: &Principal, limits: &Limits) -> (ConnectRequest, u32) {
    let asked = match connect.version {
        Version::V4 if connect.clean_start => 0,
        Version::V4 => NEVER_EXPIRES,
        Version::V5 => connect.session_expiry_secs.unwrap_or(0),
    };
    let will = connect.will.as_ref().map(|w| Will {
        message: Message {
            topic: w.topic.as_str().into(),
            payload: w.payload.clone(),
            qos: QoS::from_u8(w.qos).unwrap_or(QoS::AtMostOnce),
            retain: w.retain,
            expires_at: None,
            properties: w.properties.clone(),
        },
        delay_secs: w.delay_secs,
        expiry_secs: w.expiry_secs,
    });
    let request = ConnectRequest {
        client_id: principal.router_id().into(),
        clean_start: connect.clean_start,
        session_expiry_secs: asked.min(limits.max_session_expiry_secs),
        receive_maximum: connect.receive_maximum.unwrap_or(u16::MAX),
        will,
    };
    (request, asked)
}

/// A session that got its CONNACK.
pub(crate) struct Opened {
    pub client: Client,
    pub wake: Arc<Wake>,
    pub keepalive: Option<Duration>,
    /// The CONNACK, and whatever the router already has for a resumed session.
    pub out: BytesMut,
    /// The router had more than fit behind the CONNACK.
    pub more: bool,
    /// The journal version the CONNACK waits for (durable mode), or 0.
    pub owed: u64,
}

/// Reads and checks CONNECT, authenticates, opens the router session and
/// queues the CONNACK. `None` when the connection was refused (the refusal
/// has been written) or went away.
pub(crate) async fn open<R, W>(
    rd: &mut R,
    wr: &mut W,
    inbuf: &mut BytesMut,
    peer: SocketAddr,
    deadline: Instant,
    listener: ListenerKind,
    shared: &Arc<Shared>,
) -> Option<Opened>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let metrics = shared.metrics.clone();
    let max = shared.config.limits.max_packet_size;
    let first = match tokio::time::timeout_at(deadline, read_frame(rd, inbuf, max, &metrics)).await {
        Err(_) => {
            Metrics::inc(&metrics.connect_timeouts_total);
            debug!(%peer, listener = listener.name, "closed: no CONNECT within the connect timeout");
            return None;
        }
        Ok(Read::Eof) => return None,
        Ok(Read::Bad(e)) => {
            Metrics::inc(&metrics.protocol_errors_total);
            info!(%peer, listener = listener.name, reason = %e, "refused before CONNECT");
            return None;
        }
        Ok(Read::Frame(f)) => f,
    };
    if first.kind() != kind::CONNECT {
        Metrics::inc(&metrics.protocol_errors_total);
        info!(%peer, listener = listener.name, "refused: first packet is not CONNECT");
        return None;
    }
    let connect = match parse_connect(&first) {
        Ok(c) => c,
        Err(ConnectError::Level(level)) => {
            Metrics::inc(&metrics.logins_refused_total);
            info!(%peer, ?level, "refused: unsupported MQTT protocol level");
            if level.is_some() {
                refuse(wr, Version::V4, UNSUPPORTED_VERSION, None, deadline).await;
            }
            return None;
        }
        Err(ConnectError::Malformed(version, reason)) => {
            Metrics::inc(&metrics.protocol_errors_total);
            info!(%peer, listener = listener.name, ?version, reason, "refused: malformed CONNECT");
            // 3.1.1 has no code for it: the connection is just closed.
            if version == Version::V5 {
                refuse(wr, version, MALFORMED, Some(reason), deadline).await;
            }
            return None;
        }
    };
    let version = connect.version;
    let answer_at = Instant::now() + Duration::from_millis(shared.config.auth.refusal_delay_ms);
    // Every step inside has its own deadline (store calls, the hashing
    // queue); this one bounds their sum, so no CONNECT waits without end.
    let login_timeout = Duration::from_millis(shared.config.limits.login_timeout_ms);
    let admitting = admit(shared, &connect, peer, listener, answer_at);
    let admitted = match tokio::time::timeout(login_timeout, admitting).await {
        Ok(admitted) => admitted,
        Err(_) => {
            Metrics::inc(&metrics.logins_unavailable_total);
            info!(%peer, listener = listener.name, "login refused: authentication took longer than limits.login_timeout_ms");
            Err((UNAVAILABLE, "authentication timed out"))
        }
    };
    let (principal, assigned) = match admitted {
        Ok(ok) => ok,
        Err((code, reason)) => {
            tokio::time::sleep_until(answer_at).await;
            refuse(wr, version, code, Some(reason), Instant::now() + REFUSAL_WRITE).await;
            return None;
        }
    };

    let mut locked = shared.hub.lock();
    let now = locked.now;
    let limits = locked.router().limits();
    let receive_maximum = limits.max_incoming_qos2;
    let (request, asked_expiry) = router_request(&connect, &principal, limits);
    let expiry = request.session_expiry_secs;
    let connected = locked.router().connect(request, now);
    if connected.session_present {
        // The session may have been kept across a change of the rules (a
        // restart, with the store): it keeps nothing they now deny.
        let allowed = |f: &str| shared.acl.can_subscribe(&principal, f);
        if let Ok((refused, dropped)) = locked.router().revoke(connected.conn, allowed, now)
            && (!refused.is_empty() || dropped > 0)
        {
            Metrics::add(&metrics.subscriptions_revoked_total, refused.len() as u64);
            warn!(%peer, client_id = %principal.client_id, user = %principal.username, ?refused, dropped,
                  "resumed session: subscriptions and copies (queued or in flight) the ACL no longer allows were removed");
        }
    }
    let wake = locked.register(connected.conn, connected.taken_over, &principal.username);
    let info = ConnAckInfo {
        max_packet_size: u32::try_from(max).unwrap_or(u32::MAX),
        receive_maximum,
        session_expiry_secs: (version == Version::V5 && expiry != asked_expiry).then_some(expiry),
        assigned_client_id: assigned,
        reason: None,
    };
    let mut out = BytesMut::new();
    codec::connack(version, connected.session_present, 0, &info, &mut out);
    let mut client = Client::new(version, peer, principal, connected.conn);
    client.max_packet =
        connect.max_packet_size.filter(|_| version == Version::V5).and_then(|n| usize::try_from(n).ok());
    client.expiry_was_zero = asked_expiry == 0;
    let ctx = shared.context();
    // A resumed session's queue goes out right behind the CONNACK.
    let more = client.pull(&ctx, locked.router(), now, &mut out);
    // A new persistent session is on disk before its CONNACK (durable mode).
    let owed = locked.owed();
    drop(locked);

    Metrics::inc(&metrics.logins_ok_total);
    Metrics::inc(&metrics.sessions_active);
    info!(%peer, listener = listener.name, client_id = %client.principal.client_id, user = %client.principal.username,
          role = client.principal.role.as_str(), ?version, session_present = connected.session_present, "session started");
    let keepalive = match connect.keep_alive {
        0 => None,
        k => Some(Duration::from_millis(u64::from(k) * 1500)),
    };
    Some(Opened { client, wake, keepalive, out, more, owed })
}

type Admitted = (Principal, Option<String>);

/// CONNECT checks in order: client id, auth method, credentials, role rules,
/// will. Returns the principal and an assigned client id, or the CONNACK
/// code and a reason for the log; the caller holds every refusal back
/// until `answer_at`.
async fn admit(
    shared: &Shared,
    req: &Connect,
    peer: SocketAddr,
    listener: ListenerKind,
    answer_at: Instant,
) -> Result<Admitted, (Code, &'static str)> {
    let metrics = &shared.metrics;
    let version = req.version;
    let client_id = req.client_id.as_str();
    let username = req.username.as_deref().unwrap_or("");
    let refuse = |code: Code, reason: &'static str, throttled: bool| {
        Metrics::inc(if throttled { &metrics.logins_throttled_total } else { &metrics.logins_refused_total });
        info!(%peer, listener = listener.name, client_id = %client_id.escape_debug(), user = %username.escape_debug(),
              ?version, reason, "login refused");
        Err((code, reason))
    };

    if !valid_client_id(client_id) {
        return refuse(BAD_CLIENT_ID, "client id contains + # / $ or NUL, or is too long", false);
    }
    let mut assigned = None;
    if client_id.is_empty() && !req.clean_start {
        return refuse(BAD_CLIENT_ID, "empty client id needs a clean session", false);
    }
    if req.auth_method.is_some() {
        return refuse(BAD_AUTH_METHOD, "enhanced authentication (AUTH) is not supported", false);
    }
    let (Some(user), Some(password)) = (&req.username, &req.password) else {
        return refuse(NOT_AUTHORIZED, "no username and password", false);
    };
    if user.is_empty() || password.is_empty() {
        return refuse(NOT_AUTHORIZED, "no username or no password", false);
    }
    if !listener.passwords_allowed {
        return refuse(NOT_AUTHORIZED, "password login over plain TCP on a non-loopback address", false);
    }
    if mqseal_store::validate_username(user).is_err() {
        return refuse(BAD_CREDENTIALS, "username contains characters that cannot be a topic level", false);
    }
    let record = match shared.auth.login(user, password.as_slice(), peer.ip(), answer_at).await {
        Ok(record) => record,
        Err(r) => {
            if r == Refusal::Unavailable {
                Metrics::inc(&metrics.logins_unavailable_total);
            }
            return refuse(refusal_code(r), r.as_str(), r == Refusal::Throttled);
        }
    };
    let client_id = if client_id.is_empty() {
        let id = auto_client_id();
        assigned = Some(id.clone());
        id
    } else {
        client_id.to_owned()
    };
    if record.role == mqseal_store::Role::Device && client_id != record.username {
        return refuse(BAD_CLIENT_ID, "a device must use its username as client id", false);
    }
    let principal =
        Principal { username: record.username.clone(), client_id, role: record.role, grants: record.grants.clone() };
    if let Some(will) = &req.will
        && (!topic::valid_topic_name(&will.topic) || !shared.acl.can_publish(&principal, &will.topic))
    {
        Metrics::inc(&metrics.acl_denied_will_total);
        return refuse(NOT_AUTHORIZED, "will topic not allowed", false);
    }
    Ok((principal, assigned))
}

fn auto_client_id() -> String {
    let mut raw = [0u8; 8];
    // A failing OS RNG only makes ids guessable, not colliding with a
    // device's (those never start with "auto-").
    let _ = getrandom::fill(&mut raw);
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    format!("auto-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_that_cannot_be_topic_levels_are_refused() {
        for bad in ["a/b", "a+", "#", "$x", "a\0"] {
            assert!(!valid_client_id(bad), "{bad:?}");
        }
        assert!(valid_client_id("dev-1") && valid_client_id(""));
        assert!(!valid_client_id(&"x".repeat(129)));
    }
}
