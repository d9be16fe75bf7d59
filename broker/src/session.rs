//! One client connection, from CONNECT to close.
//!
//! Everything a client sends is framed and checked here before the router
//! sees it: CONNECT (credentials, client id, will), every PUBLISH (topic
//! name, ACL), every SUBSCRIBE (filters, ACL). What passes is pushed into the
//! client's in-process router link; what the router sends back is made safe
//! for the client's protocol version and written out. Each connection is one
//! task with its own deadlines, so a slow or silent client only ever delays
//! itself.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Connect, Disconnect, DisconnectReasonCode, LastWill, LastWillProperties, Login, Packet, PubAck, PubAckReason,
    PubRec, PubRecReason, PublishProperties, Subscribe,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::acl::{Acl, Principal, valid_filter, valid_topic_name};
use crate::auth::{Authenticator, KickReason, Refusal};
use crate::codec::{self, ConnAckInfo, Frame, FrameError, Version, kind};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pending::Pending;
use crate::router::Links;

/// What every connection task shares.
pub struct Shared {
    /// The effective configuration.
    pub config: Config,
    /// Login decisions.
    pub auth: Authenticator,
    /// Topic rules.
    pub acl: Acl,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Opens router links.
    pub links: Links,
    /// Live sessions by username, for kicking.
    pub sessions: Sessions,
}

/// Live sessions, so that disabling a user can close them.
#[derive(Default)]
pub struct Sessions {
    next_id: AtomicU64,
    by_user: Mutex<HashMap<String, HashMap<u64, oneshot::Sender<KickReason>>>>,
}

impl Sessions {
    fn register(&self, username: &str) -> (u64, oneshot::Receiver<KickReason>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut map) = self.by_user.lock() {
            map.entry(username.to_owned()).or_default().insert(id, tx);
        }
        (id, rx)
    }

    fn unregister(&self, username: &str, id: u64) {
        if let Ok(mut map) = self.by_user.lock()
            && let Some(sessions) = map.get_mut(username)
        {
            sessions.remove(&id);
            if sessions.is_empty() {
                map.remove(username);
            }
        }
    }

    /// Usernames with at least one live session.
    pub fn live_usernames(&self) -> HashSet<String> {
        self.by_user.lock().map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// Closes every session of `username`; returns how many.
    pub fn kick(&self, username: &str, reason: KickReason) -> usize {
        let Ok(mut map) = self.by_user.lock() else { return 0 };
        let sessions = map.remove(username).unwrap_or_default();
        let n = sessions.len();
        for (_, tx) in sessions {
            let _ = tx.send(reason);
        }
        n
    }

    /// Closes every session (shutdown).
    pub fn kick_all(&self, reason: KickReason) -> usize {
        let names: Vec<String> = self.live_usernames().into_iter().collect();
        names.iter().map(|n| self.kick(n, reason)).sum()
    }
}

/// Properties of the listener a connection came in on.
#[derive(Clone, Copy, Debug)]
pub struct ListenerKind {
    /// For logs: "tcp" or "tls".
    pub name: &'static str,
    /// Whether password logins are acceptable here (TLS, loopback, or
    /// explicitly allowed).
    pub passwords_allowed: bool,
}

/// How a session ended, which decides the will and what the router is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Client DISCONNECT: no will.
    Clean,
    /// v5 DISCONNECT 0x04: publish the will.
    CleanWithWill,
    /// Socket closed or failed without DISCONNECT.
    Lost,
    /// No packet within 1.5 × keep-alive.
    KeepAlive,
    /// Malformed, forbidden or oversized packet.
    Protocol,
    /// Closed by the broker (user disabled/deleted, shutdown).
    Kicked(KickReason),
    /// Another connection took the client id (the router dropped our link).
    TakenOver,
}

impl End {
    fn publishes_will(self) -> bool {
        !matches!(self, End::Clean | End::TakenOver)
    }
}

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

/// How long a refused client gets to read its CONNACK.
const REFUSAL_WRITE: Duration = Duration::from_secs(5);

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

/// Longest client id accepted (MQTT guarantees 23; real fleets use more).
const MAX_CLIENT_ID: usize = 128;

/// Whether a client id may reach the router: rumqttd mishandles ids with
/// topic wildcards, `/`, `$` or NUL (the audit's crash (b)), and very long ones.
#[must_use]
pub fn valid_client_id(id: &str) -> bool {
    id.len() <= MAX_CLIENT_ID && !id.contains(['+', '#', '/', '$', '\0'])
}

/// A complete frame, or why there is none.
pub(crate) enum Read {
    Frame(Frame),
    Eof,
    Bad(FrameError),
}

pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
    metrics: &Metrics,
) -> Read {
    loop {
        match codec::next_frame(buf, max) {
            Ok(Some(frame)) => return Read::Frame(frame),
            Ok(None) => {}
            Err(e) => return Read::Bad(e),
        }
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return Read::Eof,
            Ok(n) => Metrics::add(&metrics.bytes_in_total, n as u64),
        }
    }
}

/// Writes `bytes` and flushes: TCP ignores the flush, but a WebSocket
/// message only leaves on it.
async fn send<W: AsyncWrite + Unpin + ?Sized>(wr: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

/// What a session runs over: TCP, TLS, WebSocket, or WebSocket over TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A session that got its CONNACK.
struct Opened {
    state: State,
    link_rx: LinkRx,
    kick: oneshot::Receiver<KickReason>,
    session_id: u64,
    keepalive: Option<Duration>,
    will: Option<Box<(LastWill, Option<LastWillProperties>)>>,
}

/// Reads and checks CONNECT, authenticates, opens the router link and
/// queues the CONNACK. `None` when the connection was refused (the refusal
/// has been written) or went away.
async fn open<R, W>(
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
    let version = match codec::connect_level(&first) {
        Some(4) => Version::V4,
        Some(5) => Version::V5,
        level => {
            Metrics::inc(&metrics.logins_refused_total);
            info!(%peer, ?level, "refused: unsupported MQTT protocol level");
            if level.is_some() {
                refuse(wr, Version::V4, UNSUPPORTED_VERSION, None, deadline).await;
            }
            return None;
        }
    };
    if let Err(reason) = codec::check_connect_flags(&first, version) {
        Metrics::inc(&metrics.protocol_errors_total);
        info!(%peer, listener = listener.name, ?version, reason, "refused: malformed CONNECT");
        // 3.1.1 has no code for it: the connection is just closed.
        if version == Version::V5 {
            refuse(wr, version, MALFORMED, Some(reason), deadline).await;
        }
        return None;
    }
    let connect = match codec::decode(version, first) {
        Ok(Packet::Connect(connect, props, will, will_props, login)) => {
            ConnectRequest { connect, props, will, will_props, login }
        }
        Ok(_) | Err(_) => {
            Metrics::inc(&metrics.protocol_errors_total);
            info!(%peer, "refused: malformed CONNECT");
            return None;
        }
    };
    // Every refusal from here on is a login decision, and each is answered
    // no sooner than the floor after the CONNECT arrived: how quickly the
    // broker says no must not tell what it checked (whether the name could
    // exist, is a device, is locked out), whoever the user.
    let answer_at = Instant::now() + Duration::from_millis(shared.config.auth.refusal_delay_ms);
    // Every step inside has its own deadline (store calls, the hashing
    // queue); this one bounds their sum, so no CONNECT waits without end.
    let login_timeout = Duration::from_millis(shared.config.limits.login_timeout_ms);
    let admitting = admit(shared, &connect, version, peer, listener, answer_at);
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

    // Open the router link (on the link-opener thread: building one blocks).
    let built = tokio::time::timeout(
        Duration::from_secs(10),
        shared.links.open(principal.router_id(), connect.connect.clean_session),
    )
    .await;
    let (link_tx, link_rx, ack) = match built {
        Ok(Ok(link)) => link,
        _ => {
            warn!(%peer, client_id = %principal.client_id, "refused: the router did not accept the connection");
            refuse(wr, version, UNAVAILABLE, None, Instant::now() + REFUSAL_WRITE).await;
            return None;
        }
    };
    let session_present = matches!(Option::<Packet>::from(ack), Some(Packet::ConnAck(ack, _)) if ack.session_present);
    let info = ConnAckInfo {
        max_packet_size: u32::try_from(max).unwrap_or(u32::MAX),
        assigned_client_id: assigned,
        reason: None,
    };
    let mut out = BytesMut::new();
    codec::connack(version, session_present, 0, &info, &mut out);

    let (session_id, kick) = shared.sessions.register(&principal.username);
    Metrics::inc(&metrics.logins_ok_total);
    Metrics::inc(&metrics.sessions_active);
    info!(%peer, listener = listener.name, client_id = %principal.client_id, user = %principal.username,
          role = principal.role.as_str(), ?version, "session started");

    let keepalive = match connect.connect.keep_alive {
        0 => None,
        k => Some(Duration::from_millis(u64::from(k) * 1500)),
    };
    let will = connect.will.map(|w| Box::new((w, connect.will_props)));
    let state = State {
        version,
        peer,
        principal,
        shared: shared.clone(),
        link_tx,
        out,
        to_router: Vec::new(),
        pending_subs: Vec::new(),
        denied_qos2: Vec::new(),
        unscheduled: false,
        client_max_packet: connect
            .props
            .as_ref()
            .and_then(|p| p.max_packet_size)
            .filter(|_| version == Version::V5)
            .and_then(|n| usize::try_from(n).ok()),
    };
    Some(Opened { state, link_rx, kick, session_id, keepalive, will })
}

/// Serves one connection until it ends. `deadline` bounds everything up to
/// and including CONNECT (the TLS handshake has already used part of it);
/// `pending` is the connection's place among the logins in progress, given
/// up once it has logged in or been refused.
///
/// The CONNECT phase (authentication, store calls, opening the router link)
/// runs in a boxed future of its own: it is the deepest stack of awaits a
/// connection ever has, and an idle session should not carry its size for
/// hours. What stays alive is the session state and the loop's few futures.
///
/// The stream is boxed behind a trait object: one copy of this code serves
/// TCP and TLS, and a TLS stream (rustls keeps kilobytes of state inline)
/// lives on the heap once instead of inside every session's future.
pub async fn serve(
    stream: Box<dyn Stream>,
    peer: SocketAddr,
    deadline: Instant,
    listener: ListenerKind,
    pending: Pending,
    shared: Arc<Shared>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut inbuf = BytesMut::with_capacity(256);
    let opened = Box::pin(open(&mut rd, &mut wr, &mut inbuf, peer, deadline, listener, &shared)).await;
    // Logged in (or refused and answered): no longer a login in progress.
    drop(pending);
    let Some(Opened { mut state, mut link_rx, mut kick, session_id, keepalive, will }) = opened else { return };
    let metrics = shared.metrics.clone();
    let write_timeout = Duration::from_millis(shared.config.limits.write_timeout_ms);
    // One keep-alive timer for the whole session, pushed back on each read
    // (not a new timer per loop turn: the loop turns for every batch the
    // router delivers too). Without keep-alive it never fires.
    let keepalive_timer = tokio::time::sleep(keepalive.unwrap_or(Duration::MAX / 4));
    tokio::pin!(keepalive_timer);

    // A client may send its first packets right behind CONNECT without
    // waiting for the CONNACK (paho does, over TLS often in one record):
    // they are already in the buffer, and no further read would bring them.
    let mut unread = !inbuf.is_empty();

    let end = loop {
        if std::mem::take(&mut unread)
            && let Some(end) = state.on_bytes(&mut inbuf).await
        {
            break end;
        }
        if !state.out.is_empty() {
            let n = state.out.len();
            match tokio::time::timeout(write_timeout, send(&mut wr, &state.out)).await {
                Ok(Ok(())) => Metrics::add(&metrics.bytes_out_total, n as u64),
                _ => break End::Lost,
            }
            state.out.clear();
            if std::mem::take(&mut state.unscheduled) && Box::pin(link_rx.wake()).await.is_err() {
                break End::TakenOver;
            }
        }
        tokio::select! {
            reason = &mut kick => break End::Kicked(reason.unwrap_or(KickReason::Shutdown)),
            _ = &mut keepalive_timer => {
                Metrics::inc(&metrics.keepalive_timeouts_total);
                break End::KeepAlive;
            }
            read = rd.read_buf(&mut inbuf) => match read {
                Ok(0) | Err(_) => break End::Lost,
                Ok(n) => {
                    Metrics::add(&metrics.bytes_in_total, n as u64);
                    if let Some(k) = keepalive {
                        keepalive_timer.as_mut().reset(Instant::now() + k);
                    }
                    if let Some(end) = state.on_bytes(&mut inbuf).await {
                        break end;
                    }
                    shrink(&mut inbuf);
                }
            },
            notification = link_rx.next() => match notification {
                Ok(Some(n)) => {
                    if let Some(end) = state.on_notification(n) {
                        break end;
                    }
                    // Drain what the router already queued, without waiting.
                    if let Some(end) = state.drain(&mut link_rx) {
                        break end;
                    }
                    // Acknowledgements for discarded oversized messages.
                    if let Err(end) = state.flush_to_router().await {
                        break end;
                    }
                }
                Ok(None) => {}
                Err(_) => break End::TakenOver,
            },
        }
    };

    let username = state.principal.username.clone();
    Box::pin(state.finish(end, will.map(|w| *w), &mut wr)).await;
    shared.sessions.unregister(&username, session_id);
    Metrics::dec(&metrics.sessions_active);
}

/// An idle connection should not keep a large buffer from one big packet.
fn shrink(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 64 * 1024 {
        *buf = BytesMut::with_capacity(256);
    }
}

struct ConnectRequest {
    connect: Connect,
    props: Option<rumqttd::protocol::ConnectProperties>,
    will: Option<LastWill>,
    will_props: Option<LastWillProperties>,
    login: Option<Login>,
}

type Admitted = (Principal, Option<String>);

/// CONNECT checks in order: client id, auth method, credentials, role rules,
/// will. Returns the principal and an assigned client id, or the CONNACK
/// code and a reason for the log; the caller holds every refusal back
/// until `answer_at`.
async fn admit(
    shared: &Shared,
    req: &ConnectRequest,
    version: Version,
    peer: SocketAddr,
    listener: ListenerKind,
    answer_at: Instant,
) -> Result<Admitted, (Code, &'static str)> {
    let metrics = &shared.metrics;
    let client_id = req.connect.client_id.as_str();
    let username = req.login.as_ref().map(|l| l.username.as_str()).unwrap_or("");
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
    if client_id.is_empty() && !req.connect.clean_session {
        return refuse(BAD_CLIENT_ID, "empty client id needs a clean session", false);
    }
    if req.props.as_ref().is_some_and(|p| p.authentication_method.is_some()) {
        return refuse(BAD_AUTH_METHOD, "enhanced authentication (AUTH) is not supported", false);
    }
    let Some(login) = &req.login else {
        return refuse(NOT_AUTHORIZED, "no username and password", false);
    };
    if login.username.is_empty() || login.password.is_empty() {
        return refuse(NOT_AUTHORIZED, "no username or no password", false);
    }
    if !listener.passwords_allowed {
        return refuse(NOT_AUTHORIZED, "password login over plain TCP on a non-loopback address", false);
    }
    if mqseal_store::validate_username(&login.username).is_err() {
        return refuse(BAD_CREDENTIALS, "username contains characters that cannot be a topic level", false);
    }
    let record = match shared.auth.login(&login.username, login.password.as_bytes(), peer.ip(), answer_at).await {
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
    if let Some(will) = &req.will {
        let topic = std::str::from_utf8(&will.topic).unwrap_or("");
        if !valid_topic_name(topic) || !shared.acl.can_publish(&principal, topic) {
            Metrics::inc(&metrics.acl_denied_will_total);
            return refuse(NOT_AUTHORIZED, "will topic not allowed", false);
        }
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

/// A SUBSCRIBE whose refused filters the front must merge into the router's SUBACK.
struct PendingSub {
    pkid: u16,
    /// Per filter: `Some(code)` refused here, `None` forwarded.
    codes: Vec<Option<u8>>,
}

struct State {
    version: Version,
    peer: SocketAddr,
    principal: Principal,
    shared: Arc<Shared>,
    link_tx: LinkTx,
    out: BytesMut,
    to_router: Vec<Packet>,
    pending_subs: Vec<PendingSub>,
    /// QoS 2 packet ids the front refused (3.1.1): their PUBREL is answered here.
    denied_qos2: Vec<u16>,
    /// The router paused us (queue full) and wants a wake-up after a flush.
    unscheduled: bool,
    /// The client's MQTT 5 Maximum Packet Size: a larger packet is discarded
    /// instead of sent, as if it had been delivered (MQTT 5 §3.1.2.11.4).
    /// A microcontroller announces its receive buffer this way.
    client_max_packet: Option<usize>,
}

impl State {
    fn v5(&self) -> bool {
        self.version == Version::V5
    }

    fn protocol_error(&mut self, reason: &str, v5_code: u8) -> End {
        Metrics::inc(&self.shared.metrics.protocol_errors_total);
        info!(peer = %self.peer, client_id = %self.principal.client_id, user = %self.principal.username, reason, "disconnected: protocol error");
        if self.v5() {
            codec::disconnect(v5_code, &mut self.out);
        }
        End::Protocol
    }

    /// Handles every complete frame in `inbuf`, then forwards what passed.
    async fn on_bytes(&mut self, inbuf: &mut BytesMut) -> Option<End> {
        let max = self.shared.config.limits.max_packet_size;
        let mut end = None;
        loop {
            let frame = match codec::next_frame(inbuf, max) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(FrameError::TooLarge { size, max }) => {
                    Metrics::inc(&self.shared.metrics.packets_too_large_total);
                    info!(peer = %self.peer, client_id = %self.principal.client_id, user = %self.principal.username, size, max, "disconnected: packet too large");
                    if self.v5() {
                        codec::disconnect(0x95, &mut self.out);
                    }
                    end = Some(End::Protocol);
                    break;
                }
                Err(FrameError::Malformed(why)) => {
                    end = Some(self.protocol_error(why, 0x81));
                    break;
                }
            };
            if let Some(e) = self.on_frame(frame) {
                end = Some(e);
                break;
            }
        }
        if let Err(e) = self.flush_to_router().await {
            return Some(end.unwrap_or(e));
        }
        end
    }

    fn on_frame(&mut self, frame: Frame) -> Option<End> {
        match frame.kind() {
            kind::PINGREQ => {
                codec::pingresp(&mut self.out);
                None
            }
            kind::DISCONNECT => {
                let with_will = self.v5() && codec::disconnect_reason(&frame) == 0x04;
                Some(if with_will { End::CleanWithWill } else { End::Clean })
            }
            kind::CONNECT => Some(self.protocol_error("second CONNECT", 0x82)),
            kind::AUTH => Some(self.protocol_error("AUTH is not supported", 0x8c)),
            kind::PUBLISH => self.on_publish(frame),
            kind::PUBREL => {
                let pkid = codec::ack_pkid(&frame);
                if let Some(i) = pkid.and_then(|p| self.denied_qos2.iter().position(|d| *d == p)) {
                    let pkid = self.denied_qos2.swap_remove(i);
                    codec::ack(self.version, kind::PUBCOMP, pkid, 0, &mut self.out);
                    return None;
                }
                self.decode_and_forward(frame)
            }
            kind::SUBSCRIBE => match codec::decode(self.version, frame) {
                Ok(Packet::Subscribe(sub, props)) => self.on_subscribe(sub, props),
                other => Some(self.decode_failed(other.err())),
            },
            kind::UNSUBSCRIBE => match codec::decode(self.version, frame) {
                Ok(Packet::Unsubscribe(unsub, props)) => {
                    if unsub.filters.iter().all(|f| valid_filter(f)) {
                        self.to_router.push(Packet::Unsubscribe(unsub, props));
                        None
                    } else {
                        Some(self.protocol_error("invalid topic filter in UNSUBSCRIBE", 0x8f))
                    }
                }
                other => Some(self.decode_failed(other.err())),
            },
            // PUBACK, PUBREC, PUBCOMP for deliveries: the router's business.
            _ => self.decode_and_forward(frame),
        }
    }

    fn decode_failed(&mut self, err: Option<codec::DecodeError>) -> End {
        if matches!(err, Some(codec::DecodeError::Panicked)) {
            Metrics::inc(&self.shared.metrics.codec_panics_total);
        }
        self.protocol_error("malformed packet", 0x81)
    }

    fn decode_and_forward(&mut self, frame: Frame) -> Option<End> {
        match codec::decode(self.version, frame) {
            Ok(packet) => {
                self.to_router.push(packet);
                None
            }
            Err(e) => Some(self.decode_failed(Some(e))),
        }
    }

    fn on_publish(&mut self, frame: Frame) -> Option<End> {
        let Some((qos, pkid)) = codec::publish_qos_pkid(&frame) else {
            return Some(self.protocol_error("truncated PUBLISH", 0x81));
        };
        let (publish, props) = match codec::decode(self.version, frame) {
            Ok(Packet::Publish(p, props)) => (p, props),
            other => return Some(self.decode_failed(other.err())),
        };
        if props.as_ref().is_some_and(|p| p.topic_alias.is_some()) {
            return Some(self.protocol_error("topic alias (the broker announced a maximum of 0)", 0x94));
        }
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Some(self.protocol_error("topic name is not UTF-8", 0x90));
        };
        if !valid_topic_name(topic) {
            return Some(self.protocol_error("wildcard, NUL or empty topic name in PUBLISH", 0x90));
        }
        if !self.shared.acl.can_publish(&self.principal, topic) {
            Metrics::inc(&self.shared.metrics.acl_denied_publish_total);
            info!(peer = %self.peer, client_id = %self.principal.client_id, user = %self.principal.username, topic, "publish denied by ACL");
            match qos {
                1 => codec::ack(self.version, kind::PUBACK, pkid, 0x87, &mut self.out),
                2 => {
                    codec::ack(self.version, kind::PUBREC, pkid, 0x87, &mut self.out);
                    if !self.v5() && !self.denied_qos2.contains(&pkid) {
                        self.denied_qos2.push(pkid);
                    }
                }
                _ => {}
            }
            return None;
        }
        Metrics::inc(&self.shared.metrics.messages_in_total);
        self.to_router.push(Packet::Publish(publish, props));
        None
    }

    fn on_subscribe(
        &mut self,
        mut sub: Subscribe,
        props: Option<rumqttd::protocol::SubscribeProperties>,
    ) -> Option<End> {
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut allowed = Vec::with_capacity(sub.filters.len());
        for filter in sub.filters.drain(..) {
            if !valid_filter(&filter.path) {
                info!(peer = %self.peer, client_id = %self.principal.client_id, user = %self.principal.username, filter = %filter.path, "subscription refused: invalid filter");
                codes.push(Some(0x8f));
            } else if !self.shared.acl.can_subscribe(&self.principal, &filter.path) {
                Metrics::inc(&self.shared.metrics.acl_denied_subscribe_total);
                info!(peer = %self.peer, client_id = %self.principal.client_id, user = %self.principal.username, filter = %filter.path, "subscription denied by ACL");
                codes.push(Some(0x87));
            } else {
                codes.push(None);
                allowed.push(filter);
            }
        }
        if allowed.is_empty() {
            let codes: Vec<u8> = codes.into_iter().map(|c| c.unwrap_or(0x80)).collect();
            codec::suback(self.version, sub.pkid, &codes, &mut self.out);
            return None;
        }
        if codes.iter().any(Option::is_some) {
            self.pending_subs.push(PendingSub { pkid: sub.pkid, codes });
        }
        sub.filters = allowed;
        self.to_router.push(Packet::Subscribe(sub, props));
        None
    }

    /// Pushes the accepted packets into the router link with one wake-up.
    async fn flush_to_router(&mut self) -> Result<(), End> {
        let Some(last) = self.to_router.pop() else { return Ok(()) };
        {
            let mut buffer = self.link_tx.buffer();
            buffer.extend(self.to_router.drain(..));
        }
        self.link_tx.send(last).await.map(|_| ()).map_err(|_| End::TakenOver)
    }

    fn on_notification(&mut self, notification: Notification) -> Option<End> {
        if matches!(notification, Notification::Unschedule) {
            self.unscheduled = true;
            return None;
        }
        let packet = Option::<Packet>::from(notification)?;
        match packet {
            Packet::SubAck(ack, _) => {
                let router_codes: Vec<u8> = ack.return_codes.iter().map(codec::suback_code).collect();
                let merged = match self.pending_subs.iter().position(|p| p.pkid == ack.pkid) {
                    Some(i) => {
                        let pending = self.pending_subs.swap_remove(i);
                        let mut from_router = router_codes.into_iter();
                        pending
                            .codes
                            .into_iter()
                            .map(|c| c.unwrap_or_else(|| from_router.next().unwrap_or(0x80)))
                            .collect()
                    }
                    None => router_codes,
                };
                codec::suback(self.version, ack.pkid, &merged, &mut self.out);
                None
            }
            Packet::Disconnect(d, props) => {
                if self.v5() {
                    let _ = codec::encode(self.version, Packet::Disconnect(d, props), &mut self.out);
                }
                Some(End::TakenOver)
            }
            packet => {
                let publish = matches!(packet, Packet::Publish(..));
                let packet = codec::for_version(self.version, packet)?;
                let start = self.out.len();
                match codec::encode(self.version, packet, &mut self.out) {
                    Ok(_) if publish => {
                        self.discard_if_too_large(start);
                        None
                    }
                    Ok(_) => None,
                    Err(e) => {
                        if matches!(e, codec::DecodeError::Panicked) {
                            Metrics::inc(&self.shared.metrics.codec_panics_total);
                        }
                        warn!(peer = %self.peer, client_id = %self.principal.client_id, error = %e, "could not encode a packet for the client");
                        Some(End::Protocol)
                    }
                }
            }
        }
    }

    /// Counts the PUBLISH just encoded at `start` of the output, or takes it
    /// back out if it exceeds the client's Maximum Packet Size. A discarded
    /// QoS 1/2 message is acknowledged to the router on the client's behalf,
    /// which is what "behave as if it had completed sending" means: the
    /// router must not keep redelivering what the client cannot take.
    fn discard_if_too_large(&mut self, start: usize) {
        let size = self.out.len().saturating_sub(start);
        let Some(max) = self.client_max_packet.filter(|max| size > *max) else {
            Metrics::inc(&self.shared.metrics.messages_out_total);
            return;
        };
        let mut tail = self.out.split_off(start);
        let ack = codec::next_frame(&mut tail, usize::MAX).ok().flatten().and_then(|f| codec::publish_qos_pkid(&f));
        Metrics::inc(&self.shared.metrics.messages_discarded_too_large_total);
        info!(peer = %self.peer, client_id = %self.principal.client_id, user = %self.principal.username, size, max,
              "publish discarded: larger than the client's maximum packet size");
        match ack {
            Some((1, pkid)) => {
                self.to_router.push(Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None));
            }
            Some((2, pkid)) => {
                self.to_router.push(Packet::PubRec(PubRec { pkid, reason: PubRecReason::Success }, None));
            }
            _ => {}
        }
    }

    /// Takes what the router has already queued, up to a bound, without awaiting.
    fn drain(&mut self, link_rx: &mut LinkRx) -> Option<End> {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        for _ in 0..1024 {
            if self.out.len() > 256 * 1024 {
                break;
            }
            let mut next = pin!(link_rx.next());
            match Pin::as_mut(&mut next).poll(&mut cx) {
                Poll::Ready(Ok(Some(n))) => {
                    if let Some(end) = self.on_notification(n) {
                        return Some(end);
                    }
                }
                Poll::Ready(Ok(None)) | Poll::Pending => break,
                Poll::Ready(Err(_)) => return Some(End::TakenOver),
            }
        }
        None
    }

    /// Tells the client (v5) and the router how the session ended, publishing
    /// the will when the end calls for it.
    async fn finish<W: AsyncWrite + Unpin>(
        mut self,
        end: End,
        will: Option<(LastWill, Option<LastWillProperties>)>,
        wr: &mut W,
    ) {
        let reason = match end {
            End::Kicked(KickReason::Shutdown) => Some(0x8b),
            End::Kicked(_) => Some(0x98),
            End::TakenOver => Some(0x8e),
            _ => None,
        };
        if let (Some(code), true) = (reason, self.v5()) {
            codec::disconnect(code, &mut self.out);
        }
        if let End::Kicked(why) = end {
            Metrics::inc(&self.shared.metrics.sessions_kicked_total);
            info!(peer = %self.peer, client_id = %self.principal.client_id, user = %self.principal.username, ?why, "session closed by the broker");
        } else {
            debug!(peer = %self.peer, client_id = %self.principal.client_id, ?end, "session ended");
        }
        if !self.out.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(2), send(wr, &self.out)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), wr.shutdown()).await;
        if end == End::TakenOver {
            // The router already dropped this link; anything sent now would
            // land on whichever connection reuses its id.
            return;
        }
        self.to_router.clear();
        if end.publishes_will()
            && let Some((will, props)) = will
            && let Some(publish) = codec::router_publish(&will.topic, &will.message, will.qos as u8, will.retain)
        {
            self.to_router.push(Packet::Publish(publish, props.map(will_properties)));
        }
        self.to_router
            .push(Packet::Disconnect(Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection }, None));
        let _ = self.flush_to_router().await;
    }
}

fn will_properties(p: LastWillProperties) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        subscription_identifiers: Vec::new(),
        content_type: p.content_type,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_that_break_rumqttd_are_refused() {
        for bad in ["a/b", "a+", "#", "$x", "a\0"] {
            assert!(!valid_client_id(bad), "{bad:?}");
        }
        assert!(valid_client_id("dev-1") && valid_client_id(""));
        assert!(!valid_client_id(&"x".repeat(129)));
    }

    #[test]
    fn sessions_can_be_kicked_by_user() {
        let s = Sessions::default();
        let (id, mut rx) = s.register("u");
        let (_, mut rx2) = s.register("u");
        assert_eq!(s.live_usernames().len(), 1);
        assert_eq!(s.kick("u", KickReason::Disabled), 2);
        assert_eq!(rx.try_recv().unwrap(), KickReason::Disabled);
        assert_eq!(rx2.try_recv().unwrap(), KickReason::Disabled);
        s.unregister("u", id);
        assert!(s.live_usernames().is_empty());
    }
}
