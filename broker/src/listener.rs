//! Accept loops. Each accepted socket becomes its own task at once — the TLS
//! handshake and the wait for CONNECT happen inside that task, under one
//! deadline — so a client that connects and says nothing holds up nobody
//! (rumqttd's own TLS and websocket listeners handshake inline and stall).
//!
//! The connection limit is a semaphore taken at accept. Over the limit, a
//! small separate pool of tasks still reads the CONNECT to answer it with a
//! proper CONNACK ("server unavailable" / v5 "quota exceeded") instead of a
//! silent close; when that pool is full too, the socket is just closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::codec::{self, ConnAckInfo, Version};
use crate::metrics::Metrics;
use crate::session::{self, ListenerKind, Shared};

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
}

/// Accepts until the task is dropped.
pub async fn run(listener: Listener, shared: Arc<Shared>, limit: Arc<Semaphore>, refusals: Arc<Semaphore>) {
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
        let kind = listener.kind;
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    Metrics::inc(&shared.metrics.connections_active);
                    handle(socket, peer, deadline, kind, tls, shared.clone()).await;
                    Metrics::dec(&shared.metrics.connections_active);
                    drop(permit);
                });
            }
            Err(_) => {
                Metrics::inc(&metrics.connections_refused_limit_total);
                info!(%peer, listener = kind.name, "refused: connection limit reached");
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        refuse_busy(socket, deadline, tls, &metrics).await;
                        drop(permit);
                    });
                }
            }
        }
    }
}

async fn handle(
    socket: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    kind: ListenerKind,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let stream: Box<dyn session::Stream> = match tls {
        None => Box::new(socket),
        Some(acceptor) => match tokio::time::timeout_at(deadline, Box::pin(acceptor.accept(socket))).await {
            Ok(Ok(stream)) => Box::new(stream),
            Ok(Err(e)) => {
                Metrics::inc(&shared.metrics.tls_handshake_failures_total);
                info!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                Metrics::inc(&shared.metrics.tls_handshake_failures_total);
                debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
    };
    session::serve(stream, peer, deadline, kind, shared).await;
}

async fn refuse_busy(socket: TcpStream, deadline: Instant, tls: Option<TlsAcceptor>, metrics: &Metrics) {
    // Refusals get a shorter leash than real connections.
    let deadline = deadline.min(Instant::now() + Duration::from_secs(2));
    match tls {
        None => refuse_stream(socket, deadline, metrics).await,
        Some(acceptor) => {
            if let Ok(Ok(stream)) = tokio::time::timeout_at(deadline, acceptor.accept(socket)).await {
                refuse_stream(stream, deadline, metrics).await;
            }
        }
    }
}

async fn refuse_stream<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, deadline: Instant, _metrics: &Metrics) {
    let mut buf = BytesMut::with_capacity(256);
    let frame = tokio::time::timeout_at(deadline, async {
        loop {
            match codec::next_frame(&mut buf, 4096) {
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => {}
                Err(_) => return None,
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await;
    let Ok(Some(frame)) = frame else { return };
    let (version, code) = match codec::connect_level(&frame) {
        Some(5) => (Version::V5, 0x97),
        Some(_) => (Version::V4, 0x03),
        None => return,
    };
    let mut out = BytesMut::new();
    let info = ConnAckInfo { reason: Some("connection limit reached"), ..Default::default() };
    codec::connack(version, false, code, &info, &mut out);
    let _ = tokio::time::timeout_at(deadline, stream.write_all(&out)).await;
}

/// A permit pool for the connection limit, and one for refusals.
pub fn limits(max_connections: usize) -> (Arc<Semaphore>, Arc<Semaphore>) {
    (Arc::new(Semaphore::new(max_connections)), Arc::new(Semaphore::new(REFUSAL_TASKS)))
}
