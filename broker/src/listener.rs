//! Accept loops. Each accepted socket becomes its own task at once — the TLS
//! handshake and the wait for CONNECT happen inside that task, under one
//! deadline — so a client that connects and says nothing holds up nobody
//! (rumqttd's own TLS and websocket listeners handshake inline and stall).
//!
//! The connection limit is a semaphore taken at accept; so is a place among
//! the logins in progress ([`crate::pending`]), held until the session has
//! logged in. Over either limit, a small separate pool of tasks still reads
//! the CONNECT to answer it with a proper CONNACK ("server unavailable" /
//! v5 "quota exceeded") instead of a silent close; when that pool is full
//! too, the socket is just closed. A socket from an address over its share
//! of logins in progress is closed at once: answering it would spend the
//! refusal pool on the one client that is crowding the others out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::codec::{self, Version};
use crate::config::Limits;
use crate::connection::{self, Admission, ListenerKind, Shared};
use crate::login;
use crate::metrics::{LogEvery, Metrics};
use crate::pending::{Pending, PendingLogins, Refused};
use crate::ws;

/// Connections past the limit that still get a CONNACK.
const REFUSAL_TASKS: usize = 64;

/// One listening socket and how to treat what it accepts.
pub struct Listener {
    /// The bound socket.
    pub socket: TcpListener,
    /// TLS or not, and whether passwords are acceptable.
    pub kind: ListenerKind,
    /// Present for TLS listeners.
    pub tls: Option<TlsAcceptor>,
    /// MQTT over WebSockets (after TLS, when both).
    pub websocket: bool,
}

/// What every accept loop admits connections through.
#[derive(Clone)]
pub struct Gates {
    /// `limits.max_connections`.
    pub connections: Arc<Semaphore>,
    /// Tasks answering connections over a limit.
    pub refusals: Arc<Semaphore>,
    /// Logins in progress, overall and per address.
    pub logins: Arc<PendingLogins>,
    /// Addresses over their cap are logged at most every [`REFUSAL_LOG_EVERY`].
    origin_log: Arc<LogEvery>,
}

/// How often a refused over-cap address is logged; the counter counts all.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl Gates {
    /// The gates for `limits`.
    pub fn new(limits: &Limits, metrics: Arc<Metrics>) -> Gates {
        Gates {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            refusals: Arc::new(Semaphore::new(REFUSAL_TASKS)),
            logins: PendingLogins::new(
                limits.max_connections,
                limits.max_pending_logins_percent,
                limits.max_pending_logins_per_address,
                metrics,
            ),
            origin_log: Arc::default(),
        }
    }

    fn log_origin_refusal(&self, peer: SocketAddr, listener: &'static str, per_address: usize) {
        if self.origin_log.due(REFUSAL_LOG_EVERY) {
            warn!(%peer, listener, per_address,
                  "refused: this address already has limits.max_pending_logins_per_address logins in progress \
                   (further refusals counted in mqseal_connections_refused_address_total, logged every 10 s)");
        }
    }
}

/// Accepts until the task is dropped.
pub async fn run(listener: Listener, shared: Arc<Shared>, gates: Gates) {
    let metrics = shared.metrics.clone();
    loop {
        let (socket, peer) = match listener.socket.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(listener = listener.kind.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        Metrics::inc(&metrics.connections_accepted_total);
        // Latency over batching: a QoS 1 command must not wait for a delayed ACK.
        let _ = socket.set_nodelay(true);
        let deadline = Instant::now() + shared.config.connect_timeout();
        let tls = listener.tls.clone();
        let websocket = listener.websocket;
        let kind = listener.kind;
        match gates.connections.clone().try_acquire_owned() {
            Err(_) => {
                Metrics::inc(&metrics.connections_refused_limit_total);
                info!(%peer, listener = kind.name, "refused: connection limit reached");
            }
            Ok(permit) => match gates.logins.admit(peer.ip()) {
                Ok(pending) => {
                    let admission = Admission::new(permit, metrics.clone());
                    tokio::spawn(handle(
                        socket,
                        peer,
                        deadline,
                        kind,
                        tls,
                        websocket,
                        pending,
                        admission,
                        shared.clone(),
                    ));
                    continue;
                }
                Err(Refused::Origin) => {
                    Metrics::inc(&metrics.connections_refused_address_total);
                    gates.log_origin_refusal(peer, kind.name, shared.config.limits.max_pending_logins_per_address);
                    continue;
                }
                Err(Refused::Full) => {
                    Metrics::inc(&metrics.connections_refused_logins_total);
                    debug!(%peer, listener = kind.name, "refused: the share of slots for logins in progress is in use");
                }
            },
        }
        // Over a limit: answered with a CONNACK while the refusal pool has room.
        if let Ok(permit) = gates.refusals.clone().try_acquire_owned() {
            let metrics = metrics.clone();
            tokio::spawn(async move {
                refuse_busy(socket, deadline, tls, websocket, &metrics).await;
                drop(permit);
            });
        }
    }
}

/// Why a connection never got as far as MQTT.
#[derive(Debug, thiserror::Error)]
enum Handshake {
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("WebSocket: {0}")]
    WebSocket(tokio_tungstenite::tungstenite::Error),
    #[error("timed out")]
    TimedOut,
}

/// TLS and/or WebSocket handshakes, within the connection's deadline. The
/// futures are boxed: they are large and done with before the session runs.
async fn establish(
    socket: TcpStream,
    deadline: Instant,
    tls: Option<TlsAcceptor>,
    websocket: bool,
) -> Result<Box<dyn connection::Stream>, Handshake> {
    let within = |f| tokio::time::timeout_at(deadline, f);
    let stream: Box<dyn connection::Stream> = match tls {
        None => Box::new(socket),
        Some(acceptor) => match within(Box::pin(acceptor.accept(socket))).await {
            Ok(Ok(stream)) => Box::new(stream),
            Ok(Err(e)) => return Err(Handshake::Tls(e)),
            Err(_) => return Err(Handshake::TimedOut),
        },
    };
    if !websocket {
        return Ok(stream);
    }
    match tokio::time::timeout_at(deadline, Box::pin(ws::accept(stream))).await {
        Ok(Ok(ws)) => Ok(Box::new(ws)),
        Ok(Err(e)) => Err(Handshake::WebSocket(e)),
        Err(_) => Err(Handshake::TimedOut),
    }
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    socket: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    kind: ListenerKind,
    tls: Option<TlsAcceptor>,
    websocket: bool,
    pending: Pending,
    admission: Admission,
    shared: Arc<Shared>,
) {
    // Boxed: the handshake's state (TLS, WebSocket) is the largest of the
    // task's, and unboxed it would stay allocated in every idle
    // connection's task for as long as the connection lives.
    match Box::pin(establish(socket, deadline, tls, websocket)).await {
        Ok(stream) => connection::serve(stream, peer, deadline, kind, pending, admission, shared).await,
        Err(Handshake::TimedOut) => {
            Metrics::inc(&shared.metrics.handshake_failures_total);
            debug!(%peer, listener = kind.name, "handshake timed out");
        }
        Err(e) => {
            Metrics::inc(&shared.metrics.handshake_failures_total);
            info!(%peer, listener = kind.name, error = %e, "handshake failed");
        }
    }
}

async fn refuse_busy(
    socket: TcpStream,
    deadline: Instant,
    tls: Option<TlsAcceptor>,
    websocket: bool,
    metrics: &Metrics,
) {
    // Refusals get a shorter leash than real connections.
    let deadline = deadline.min(Instant::now() + Duration::from_secs(2));
    if let Ok(stream) = establish(socket, deadline, tls, websocket).await {
        refuse_stream(stream, deadline, metrics).await;
    }
}

async fn refuse_stream(mut stream: Box<dyn connection::Stream>, deadline: Instant, metrics: &Metrics) {
    let mut buf = BytesMut::with_capacity(256);
    let read = connection::read_frame(&mut stream, &mut buf, 4096, metrics);
    let Ok(connection::Read::Frame(frame)) = tokio::time::timeout_at(deadline, read).await else { return };
    let version = match codec::connect_level(&frame) {
        Some(5) => Version::V5,
        Some(_) => Version::V4,
        None => return,
    };
    login::refuse(&mut stream, version, login::OVER_LIMIT, Some("connection limit reached"), deadline).await;
}
