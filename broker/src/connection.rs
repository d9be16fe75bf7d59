//! One client connection, from accept to close: the I/O loop.
//!
//! Everything here is moving bytes and waiting: [`crate::login`] turns the
//! first packet into a session, [`crate::policy`] decides what each packet
//! does, [`crate::delivery`] writes what the router has for the client.
//! Each connection is one task with its own deadlines, so a slow or silent
//! client only ever delays itself.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::acl::Acl;
use crate::auth::Authenticator;
use crate::codec::{self, Frame, FrameError};
use crate::config::Config;
use crate::hub::Hub;
use crate::login::{self, Opened};
use crate::metrics::Metrics;
use crate::pending::Pending;
use crate::policy::{Client, Context, End, reason};

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
    /// The router, and the connections' wake-ups (also for kicks).
    pub hub: Arc<Hub>,
}

impl Shared {
    /// What the per-packet policy needs.
    pub fn context(&self) -> Context<'_> {
        Context { acl: &self.acl, metrics: &self.metrics }
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
pub(crate) async fn send<W: AsyncWrite + Unpin + ?Sized>(wr: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

/// What a session runs over: TCP, TLS, WebSocket, or WebSocket over TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connection's place under `limits.max_connections` and in the
/// `connections_active` gauge. Whichever task holds the connection holds
/// this; dropping it gives the place back.
pub struct Admission {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Admission {
    /// Counts the connection in from now on.
    #[must_use]
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Self {
        Metrics::inc(&metrics.connections_active);
        Self { _permit: permit, metrics }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        Metrics::dec(&self.metrics.connections_active);
    }
}

/// Serves one connection until it ends. `deadline` bounds everything up to
/// and including CONNECT (the TLS handshake has already used part of it);
/// `pending` is the connection's place among the logins in progress, given
/// up once it has logged in or been refused.
///
/// The CONNECT phase (authentication, store calls) runs in a boxed future
/// of its own: it is the deepest stack of awaits a connection ever has.
/// Once logged in, the session moves to a task of its own (`run`): this
/// task's state — the handshake's and the login's arguments, which an
/// `async fn` keeps for as long as it runs — is then freed, and an idle
/// session carries only what it uses (docs/BENCHMARKS.md "Where the bytes
/// go").
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
    admission: Admission,
    shared: Arc<Shared>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut inbuf = BytesMut::with_capacity(256);
    let opened = Box::pin(login::open(&mut rd, &mut wr, &mut inbuf, peer, deadline, listener, &shared)).await;
    // Logged in (or refused and answered): no longer a login in progress.
    drop(pending);
    let Some(opened) = opened else { return };
    // The CONNECT is cut off; a session that now idles keeps the small buffer.
    shrink(&mut inbuf);
    tokio::spawn(run(Live { rd, wr, inbuf, opened, shared, _admission: admission }));
}

/// What a logged-in session's task owns.
struct Live {
    rd: ReadHalf<Box<dyn Stream>>,
    wr: WriteHalf<Box<dyn Stream>>,
    inbuf: BytesMut,
    opened: Opened,
    shared: Arc<Shared>,
    _admission: Admission,
}

/// The session's I/O loop, until it ends.
///
/// A plain function around an `async` block, not an `async fn`: the block
/// captures each part once, where an `async fn` would keep its argument
/// and the locals moved out of it side by side (~300 B more per session).
fn run(live: Live) -> impl Future<Output = ()> + Send {
    let Live { mut rd, mut wr, mut inbuf, opened, shared, _admission: admission } = live;
    let Opened { mut client, wake, keepalive, mut out, mut more, owed } = opened;
    async move {
        let mut held = Held::default();
        held.mark(0, owed);
        let metrics = shared.metrics.clone();
        let max_packet = shared.config.limits.max_packet_size;
        let write_timeout = Duration::from_millis(shared.config.limits.write_timeout_ms);
        // One keep-alive timer for the whole session, pushed back on each read.
        // Without keep-alive it never fires.
        let keepalive_timer = tokio::time::sleep(keepalive.unwrap_or(Duration::MAX / 4));
        tokio::pin!(keepalive_timer);

        // A client may send its first packets right behind CONNECT without
        // waiting for the CONNACK (paho does, over TLS often in one record):
        // they are already in the buffer, and no further read would bring them.
        let mut unread = !inbuf.is_empty();
        // The wait for a commit, boxed and made only while output is held: its
        // timer and channel would otherwise be part of every idle connection's
        // state (docs/BENCHMARKS.md "Where the bytes go").
        let mut commit_wait: Option<Pin<Box<dyn Future<Output = bool> + Send + '_>>> = None;

        let end = loop {
            if std::mem::take(&mut unread)
                && let Some(end) =
                    on_bytes(&mut client, &shared, &mut inbuf, max_packet, &mut out, &mut more, &mut held)
            {
                break end;
            }
            if std::mem::take(&mut more) {
                let mut locked = shared.hub.lock();
                let now = locked.now;
                let start = out.len();
                more = client.pull(&shared.context(), locked.router(), now, &mut out);
                // A QoS 2 delivery to a persistent session waits for its packet id.
                held.mark(start, locked.owed());
            }
            // Durable mode: what answers a promise to a persistent session
            // leaves only once the store has it, and nothing overtakes it.
            let n = held.sendable(out.len(), shared.hub.committed_version());
            if n > 0 {
                match tokio::time::timeout(write_timeout, send(&mut wr, out.get(..n).unwrap_or_default())).await {
                    Ok(Ok(())) => Metrics::add(&metrics.bytes_out_total, n as u64),
                    _ => break End::Lost,
                }
                out.advance(n);
                held.consumed(n);
                if more {
                    continue;
                }
                if out.is_empty() {
                    // About to wait: an idle connection keeps no write buffer
                    // (a fleet is mostly idle connections, and each buffer
                    // keeps the size of its largest batch). The next batch
                    // allocates anew.
                    out = BytesMut::new();
                }
            }
            // While output waits for a commit the client may go on sending
            // (that is what groups commits), up to a bound.
            let reading = out.len() < crate::delivery::OUTPUT_HIGH_WATER;
            if held.is_empty() {
                commit_wait = None;
            } else if commit_wait.is_none() {
                commit_wait = Some(Box::pin(shared.hub.wait_committed(held.waiting_for(), held.patience())));
            }
            tokio::select! {
                () = &mut keepalive_timer => {
                    // A client whose output waits for the disk is not read
                    // (beyond the high-water mark), so its PINGREQs are not
                    // seen: the commit wait has its own limit.
                    if !reading && !held.is_empty() && let Some(k) = keepalive {
                        keepalive_timer.as_mut().reset(Instant::now() + k);
                        continue;
                    }
                    Metrics::inc(&metrics.keepalive_timeouts_total);
                    break End::KeepAlive;
                }
                committed = async {
                    match commit_wait.as_mut() {
                        Some(wait) => wait.await,
                        None => std::future::pending().await,
                    }
                }, if commit_wait.is_some() => {
                    commit_wait = None;
                    if !committed {
                        break End::StoreFailed;
                    }
                }
                read = rd.read_buf(&mut inbuf), if reading => match read {
                    Ok(0) | Err(_) => break End::Lost,
                    Ok(n) => {
                        Metrics::add(&metrics.bytes_in_total, n as u64);
                        if let Some(k) = keepalive {
                            keepalive_timer.as_mut().reset(Instant::now() + k);
                        }
                        if let Some(end) = on_bytes(&mut client, &shared, &mut inbuf, max_packet, &mut out, &mut more, &mut held) {
                            break end;
                        }
                        shrink(&mut inbuf);
                    }
                },
                () = wake.notify.notified() => {
                    if wake.taken_over.load(Ordering::Acquire) {
                        break End::TakenOver;
                    }
                    if let Some(reason) = wake.kicked() {
                        break End::Kicked(reason);
                    }
                    more = true;
                }
            }
        };
        // Boxed for the same reason as the login: its timeouts and writes
        // would otherwise be part of every idle connection's state.
        Box::pin(finish(client, end, &shared, &mut wr, out, held)).await;
        Metrics::dec(&metrics.sessions_active);
        drop(admission);
    }
}

/// How long a durable acknowledgement waits for its commit before the
/// connection is closed without it (a commit takes milliseconds; this is
/// a disk that has stopped).
const COMMIT_WAIT: Duration = Duration::from_secs(30);

/// Output that waits for the store (durable mode). Each mark says: from
/// this offset of the output buffer on, bytes may leave only once the
/// journal version is committed. Bytes before the first mark go at once,
/// and nothing overtakes a held byte, so acknowledgements keep their order.
/// Empty for every connection that was promised nothing, which is all of
/// them without persistence.
#[derive(Debug, Default)]
struct Held {
    marks: VecDeque<(usize, u64, Instant)>,
}

impl Held {
    /// Output from `start` on needs `version` (0: needs nothing).
    fn mark(&mut self, start: usize, version: u64) {
        // A later mark with a version no higher adds nothing: its bytes
        // already wait behind the earlier one.
        if version == 0 || self.marks.back().is_some_and(|m| m.1 >= version) {
            return;
        }
        self.marks.push_back((start, version, Instant::now()));
    }

    /// How many bytes of an output of `len` may be written now that the
    /// store has `committed`.
    fn sendable(&mut self, len: usize, committed: u64) -> usize {
        while self.marks.front().is_some_and(|m| m.1 <= committed) {
            self.marks.pop_front();
        }
        self.marks.front().map_or(len, |m| m.0)
    }

    /// `n` bytes were written from the front of the output.
    fn consumed(&mut self, n: usize) {
        for m in &mut self.marks {
            m.0 -= n;
        }
    }

    fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }

    /// The version the first held byte waits for.
    fn waiting_for(&self) -> u64 {
        self.marks.front().map_or(0, |m| m.1)
    }

    /// The version every held byte waits for.
    fn waiting_for_all(&self) -> u64 {
        self.marks.back().map_or(0, |m| m.1)
    }

    /// How much longer the first held byte may wait.
    fn patience(&self) -> Duration {
        self.marks.front().map_or(COMMIT_WAIT, |m| COMMIT_WAIT.saturating_sub(m.2.elapsed()))
    }
}

/// Handles every complete frame in `inbuf` and then pulls what the router
/// has for the client, all under one router lock. `more` says whether the
/// router still holds more than fit; what the store must commit before the
/// new output may leave is marked in `held` (durable mode).
fn on_bytes(
    client: &mut Client,
    shared: &Shared,
    inbuf: &mut BytesMut,
    max: usize,
    out: &mut BytesMut,
    more: &mut bool,
    held: &mut Held,
) -> Option<End> {
    let ctx = shared.context();
    let mut locked = shared.hub.lock();
    let now = locked.now;
    let start = out.len();
    let end = loop {
        let frame = match codec::next_frame(inbuf, max) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                *more = client.pull(&ctx, locked.router(), now, out);
                break None;
            }
            Err(FrameError::TooLarge { size, max }) => {
                Metrics::inc(&shared.metrics.packets_too_large_total);
                info!(peer = %client.peer, client_id = %client.principal.client_id, user = %client.principal.username, size, max, "disconnected: packet too large");
                if client.version == codec::Version::V5 {
                    codec::disconnect(reason::PACKET_TOO_LARGE, out);
                }
                break Some(End::Protocol);
            }
            Err(FrameError::Malformed(why)) => break Some(client.protocol_error(&ctx, why, reason::MALFORMED, out)),
        };
        let packet = match codec::decode::packet(&frame, client.version) {
            Ok(p) => p,
            Err(e) => break Some(client.protocol_error(&ctx, e.rule(), e.reason_code(), out)),
        };
        if let Some(end) = client.on_packet(&ctx, locked.router(), now, packet, out) {
            break Some(end);
        }
    };
    held.mark(start, locked.owed());
    end
}

/// What an idle session's read buffer is brought back to. A small packet
/// (PINGREQ, PUBACK, a short command) fits; a longer one costs a second
/// read, sized by its header (`codec::next_frame` reserves the rest). A
/// fleet is mostly idle sessions, each holding this.
const IDLE_READ_BUF: usize = 64;

/// An idle connection should not keep a large read buffer from one big
/// packet or a burst: once every frame is cut off, the buffer goes back to
/// [`IDLE_READ_BUF`]. That includes a buffer of capacity 0, which is what
/// is left when the last frame took all of it: it still shares the frame's
/// allocation, and the next read would take that back whole.
fn shrink(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() != IDLE_READ_BUF {
        *buf = BytesMut::with_capacity(IDLE_READ_BUF);
    }
}

/// Tells the client (v5) and the router how the session ended; the router
/// publishes the will when the end calls for it.
async fn finish<W: AsyncWrite + Unpin>(
    client: Client,
    end: End,
    shared: &Shared,
    wr: &mut W,
    mut out: BytesMut,
    mut held: Held,
) {
    // Output still held waits for its commit, briefly; what is still
    // unconfirmed then is not sent.
    if !held.is_empty() {
        shared.hub.wait_committed(held.waiting_for_all(), Duration::from_secs(2)).await;
        out.truncate(held.sendable(out.len(), shared.hub.committed_version()));
    }
    if let End::StoreFailed = end {
        Metrics::inc(&shared.metrics.persist_acks_withheld_total);
        warn!(peer = %client.peer, client_id = %client.principal.client_id, "disconnected: the persistence store did not commit in time; acknowledgements withheld");
    }
    if let (Some(code), codec::Version::V5) = (end.server_reason(), client.version) {
        codec::disconnect(code, &mut out);
    }
    if let End::Kicked(why) = end {
        Metrics::inc(&shared.metrics.sessions_kicked_total);
        info!(peer = %client.peer, client_id = %client.principal.client_id, user = %client.principal.username, ?why, "session closed by the broker");
    } else {
        debug!(peer = %client.peer, client_id = %client.principal.client_id, ?end, "session ended");
    }
    {
        let mut locked = shared.hub.lock();
        let now = locked.now;
        // A stale handle (taken over) changes nothing: the session is the
        // newer connection's.
        let _ = locked.router().disconnect(client.conn, end.disconnect(), now);
        locked.unregister(client.conn);
    }
    if !out.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(2), send(wr, &out)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), wr.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_read_buffer_goes_back_to_its_small_size_after_a_long_packet() {
        // A 303-byte PUBLISH arriving in two reads: the header's read, then
        // exactly the rest, which `next_frame` reserved.
        let mut packet = vec![0x30, 0xac, 0x02, 0x00, 0x01, b't'];
        packet.resize(303, b'x');
        let mut buf = BytesMut::with_capacity(IDLE_READ_BUF);
        buf.extend_from_slice(&packet[..IDLE_READ_BUF]);
        assert!(matches!(codec::next_frame(&mut buf, 1 << 20), Ok(None)));
        buf.extend_from_slice(&packet[IDLE_READ_BUF..]);
        let frame = codec::next_frame(&mut buf, 1 << 20);
        assert!(matches!(frame, Ok(Some(_))), "one whole frame");
        drop(frame);
        shrink(&mut buf);
        assert_eq!(buf.capacity(), IDLE_READ_BUF, "not the frame's allocation, taken back whole");
    }

    #[test]
    fn held_output_leaves_in_order_once_its_version_is_committed() {
        let mut h = Held::default();
        assert_eq!(h.sendable(10, 0), 10, "nothing held, everything goes");
        h.mark(4, 0);
        assert!(h.is_empty(), "version 0 holds nothing");
        h.mark(4, 7);
        h.mark(6, 7);
        h.mark(8, 5);
        assert_eq!(h.marks.len(), 1, "later marks no higher than the last add nothing");
        h.mark(9, 9);
        assert_eq!((h.waiting_for(), h.waiting_for_all()), (7, 9));
        assert_eq!(h.sendable(12, 6), 4, "bytes before the first mark only");
        h.consumed(4);
        assert_eq!(h.sendable(8, 7), 5, "version 7 frees up to the next mark, which waits for 9");
        h.consumed(5);
        assert_eq!(h.sendable(3, 9), 3);
        assert!(h.is_empty());
    }
}
