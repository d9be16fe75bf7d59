//! The router shared by every connection task, and how they are woken.
//!
//! **Why one lock.** The router core is a plain state machine; every
//! connection task takes the lock for one batch of packets (everything it
//! read in one go) or one pull of deliveries, and never across an await.
//! Those critical sections are microseconds; on the two to eight cores a
//! broker of this kind runs on, a sharded router would add complexity the
//! measurements do not ask for (docs/ROUTER.md, docs/BENCHMARKS.md).
//!
//! After each call the hub wakes the connections the router says now have
//! something to write (a `Notify` each, which keeps a permit, so a wake-up
//! that comes before the task waits is not lost) and logs the router's
//! events; `/metrics` reads the router's gauges when it is scraped.
//!
//! With persistence on, the hub is also where a durable acknowledgement
//! waits: a [`Locked`] knows whether its calls made a change that a client
//! is being promised ([`Locked::owed`]), wakes the writer when one was
//! made, and [`Hub::wait_committed`] lets the connection hold its output
//! until the writer reports that version on disk (`crate::persist`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mqseal_router::{Changes, Conn, Event, Limits, Millis, Router};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::auth::KickReason;
use crate::metrics::Metrics;

/// The user name the broker's own sessions (bridges) are registered
/// under: no login can have it, as user names cannot contain `!`.
pub const INTERNAL_USER: &str = "!broker";

/// How a connection task is woken: for output, a takeover or a kick.
///
/// One per connection, and the only per-connection registry: kicking a
/// user's sessions (disabled, deleted, new credentials, shutdown) walks
/// these rather than keeping a map of channels by user name of its own —
/// kicks are rare, and a fleet's idle connections are many (docs/BENCHMARKS.md
/// "Where the bytes go").
#[derive(Debug)]
pub struct Wake {
    /// Something to write, a takeover or a kick.
    pub notify: Notify,
    /// The session was taken by a newer connection.
    pub taken_over: AtomicBool,
    /// Why the broker closes the session, once it does (0: it does not).
    kicked: AtomicU8,
    /// Whose connection it is.
    username: Box<str>,
}

impl Wake {
    fn new(username: &str) -> Self {
        Self {
            notify: Notify::new(),
            taken_over: AtomicBool::new(false),
            kicked: AtomicU8::new(0),
            username: username.into(),
        }
    }

    /// Why the broker closes the session, if it does.
    pub fn kicked(&self) -> Option<KickReason> {
        match self.kicked.load(Ordering::Acquire) {
            1 => Some(KickReason::Disabled),
            2 => Some(KickReason::Deleted),
            3 => Some(KickReason::CredentialsChanged),
            4 => Some(KickReason::Shutdown),
            _ => None,
        }
    }

    fn kick(&self, reason: KickReason) {
        let code = match reason {
            KickReason::Disabled => 1,
            KickReason::Deleted => 2,
            KickReason::CredentialsChanged => 3,
            KickReason::Shutdown => 4,
        };
        self.kicked.store(code, Ordering::Release);
        self.notify.notify_one();
    }
}

struct Inner {
    router: Router,
    wakers: HashMap<Conn, Arc<Wake>>,
}

/// The writer's side of persistence, as the hub sees it.
struct Journal {
    /// Whether acknowledgements wait for commits.
    durable: bool,
    /// Wakes the writer when a promised change is made.
    changed: Notify,
    /// The journal version on disk.
    committed: watch::Sender<u64>,
}

/// The router and the connections' wake-ups.
pub struct Hub {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
    journal: Option<Journal>,
}

/// Wall-clock milliseconds, the router's time.
#[must_use]
pub fn now() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The router's state, while the lock is held. Dropping it wakes, logs
/// and counts.
pub struct Locked<'a> {
    guard: MutexGuard<'a, Inner>,
    metrics: &'a Metrics,
    journal: Option<&'a Journal>,
    /// The router's journal version when the lock was taken.
    version: u64,
    /// The time of this call.
    pub now: Millis,
}

impl Locked<'_> {
    /// The router.
    pub fn router(&mut self) -> &mut Router {
        &mut self.guard.router
    }

    /// Registers the task behind `username`'s new connection (and, on a
    /// takeover, tells the old one).
    pub fn register(&mut self, conn: Conn, taken_over: Option<Conn>, username: &str) -> Arc<Wake> {
        if let Some(old) = taken_over.and_then(|old| self.guard.wakers.remove(&old)) {
            old.taken_over.store(true, Ordering::Release);
            old.notify.notify_one();
        }
        let wake = Arc::new(Wake::new(username));
        self.guard.wakers.insert(conn, Arc::clone(&wake));
        wake
    }

    /// Forgets a connection's task.
    pub fn unregister(&mut self, conn: Conn) {
        self.guard.wakers.remove(&conn);
    }

    /// In durable mode, the journal version the store must reach before
    /// what these calls answered may be written to the client; 0 when
    /// nothing needs to wait: the current version when these calls made
    /// a promise (the lock is exclusive, so a newer version is theirs) or
    /// answered from one not yet committed.
    pub fn owed(&mut self) -> u64 {
        let router = &mut self.guard.router;
        let (version, depends) = (router.journal_version(), router.take_journal_depends());
        match self.journal {
            Some(j) if j.durable && (version > self.version || depends) => version,
            _ => 0,
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let inner = &mut *self.guard;
        for conn in inner.router.take_ready() {
            if let Some(w) = inner.wakers.get(&conn) {
                w.notify.notify_one();
            }
        }
        for event in inner.router.take_events() {
            log_event(&event, self.metrics);
        }
        if let Some(journal) = self.journal
            && inner.router.journal_version() != self.version
        {
            journal.changed.notify_one();
        }
    }
}

fn log_event(event: &Event, metrics: &Metrics) {
    match event {
        Event::Dropped { client_id, reason, count } => {
            warn!(client_id = %client_id, reason = reason.as_str(), count, "messages dropped for a client (counted in mqseal_messages_dropped_total)");
        }
        Event::RetainedRefused { topic } => {
            warn!(topic = %topic, "retained message not kept: [retained] limits reached");
        }
        Event::SessionExpired { client_id, lost } => {
            Metrics::inc(&metrics.sessions_expired_total);
            info!(client_id = %client_id, lost, "session expired");
        }
        Event::WillPublished { client_id, topic } => {
            Metrics::inc(&metrics.wills_published_total);
            info!(client_id = %client_id, topic = %topic, "will published");
        }
    }
}

impl Hub {
    /// A hub around a new router.
    #[must_use]
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self::with_router(Router::new(limits), metrics, None)
    }

    /// A hub around a router restored from the store (journal enabled);
    /// `durable` says whether acknowledgements wait for commits.
    #[must_use]
    pub fn persistent(router: Router, metrics: Arc<Metrics>, durable: bool) -> Self {
        let version = router.journal_version();
        let journal = Journal { durable, changed: Notify::new(), committed: watch::Sender::new(version) };
        Self::with_router(router, metrics, Some(journal))
    }

    fn with_router(router: Router, metrics: Arc<Metrics>, journal: Option<Journal>) -> Self {
        Self { inner: Mutex::new(Inner { router, wakers: HashMap::new() }), metrics, journal }
    }

    /// Waits until the store holds journal version `version`; false when
    /// it did not get there within `limit` (the disk is failing).
    pub async fn wait_committed(&self, version: u64, limit: Duration) -> bool {
        let Some(journal) = &self.journal else { return true };
        let mut rx = journal.committed.subscribe();
        matches!(tokio::time::timeout(limit, rx.wait_for(|&c| c >= version)).await, Ok(Ok(_)))
    }

    /// The journal version the store has committed (0 without one).
    #[must_use]
    pub fn committed_version(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| *j.committed.borrow())
    }

    /// Resolves when a promised change has been made since the writer
    /// last looked (never without persistence).
    pub async fn journal_changed(&self) {
        match &self.journal {
            Some(j) => j.changed.notified().await,
            None => std::future::pending().await,
        }
    }

    /// The journal's dirty keys with their state, for the writer.
    pub fn take_changes(&self) -> Option<Changes> {
        self.lock().guard.router.take_changes()
    }

    /// Gives back changes the writer could not commit.
    pub fn requeue(&self, changes: &Changes) {
        self.lock().guard.router.requeue(changes);
    }

    /// The writer committed `version`: acknowledgements waiting for it go.
    pub fn committed(&self, version: u64) {
        if let Some(j) = &self.journal {
            j.committed.send_if_modified(|c| {
                let newer = version > *c;
                if newer {
                    *c = version;
                }
                newer
            });
        }
    }

    /// Takes the lock. A poisoned lock (a panic while it was held, which
    /// the code forbids) is taken anyway: the router's state is updated
    /// call by call and stays consistent between them.
    pub fn lock(&self) -> Locked<'_> {
        let mut guard = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A dependency noted by calls nobody asked about (timers, the
        // writer) is not these calls'.
        let _ = guard.router.take_journal_depends();
        let version = guard.router.journal_version();
        Locked { guard, metrics: &self.metrics, journal: self.journal.as_ref(), version, now: now() }
    }

    fn wakers(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Closes every session of `username`; returns how many.
    pub fn kick(&self, username: &str, reason: KickReason) -> usize {
        let inner = self.wakers();
        let theirs = inner.wakers.values().filter(|w| &*w.username == username);
        theirs.map(|w| w.kick(reason)).count()
    }

    /// Closes every session (shutdown); returns how many.
    pub fn kick_all(&self, reason: KickReason) -> usize {
        self.wakers().wakers.values().map(|w| w.kick(reason)).count()
    }

    /// User names with at least one live session: what the periodic
    /// revalidation checks against the store. The broker's own sessions
    /// (a bridge's, registered under [`INTERNAL_USER`]) have no login to
    /// revalidate and are left out.
    pub fn live_usernames(&self) -> HashSet<String> {
        self.wakers()
            .wakers
            .values()
            .filter(|w| &*w.username != INTERNAL_USER)
            .map(|w| w.username.to_string())
            .collect()
    }

    /// A copy of the router's gauges and counters, and the events it lost.
    pub fn stats(&self) -> (mqseal_router::Stats, u64) {
        let inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (inner.router.stats().clone(), inner.router.events_lost())
    }

    /// Runs the router's clocks (will delay, session expiry, retained
    /// expiry, deferred drop logs) for as long as the broker runs.
    pub async fn run_timers(self: Arc<Self>) {
        // The router says when it next needs to run; a new timer (a
        // disconnect with a will delay) may be sooner, hence the cap.
        const MAX_SLEEP: Duration = Duration::from_millis(250);
        loop {
            let next = {
                let mut locked = self.lock();
                let now = locked.now;
                locked.router().tick(now).map(|at| at.saturating_sub(now))
            };
            let sleep = next.map_or(MAX_SLEEP, |ms| Duration::from_millis(ms).min(MAX_SLEEP));
            tokio::time::sleep(sleep.max(Duration::from_millis(5))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc as StdArc;

    use mqseal_router::ConnectRequest;

    use super::*;

    fn connect(hub: &Hub, id: &str, user: &str) -> StdArc<Wake> {
        let mut locked = hub.lock();
        let now = locked.now;
        let req = ConnectRequest {
            client_id: id.into(),
            clean_start: true,
            session_expiry_secs: 0,
            receive_maximum: 10,
            will: None,
        };
        let c = locked.router().connect(req, now);
        locked.register(c.conn, c.taken_over, user)
    }

    #[test]
    fn sessions_can_be_kicked_by_user() {
        let hub = Hub::new(Limits::default(), StdArc::new(Metrics::default()));
        let a = connect(&hub, "a1", "u");
        let b = connect(&hub, "a2", "u");
        let c = connect(&hub, "c", "v");
        assert_eq!(hub.live_usernames(), HashSet::from(["u".to_owned(), "v".to_owned()]));
        assert_eq!(hub.kick("u", KickReason::Disabled), 2);
        assert_eq!(
            (a.kicked(), b.kicked(), c.kicked()),
            (Some(KickReason::Disabled), Some(KickReason::Disabled), None)
        );
        assert_eq!(hub.kick_all(KickReason::Shutdown), 3);
        assert_eq!(c.kicked(), Some(KickReason::Shutdown));
    }
}
