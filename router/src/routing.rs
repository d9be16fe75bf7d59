//! The router: sessions by client id, the subscription index, retained
//! messages and timers, driven by calls from the front — no sockets, no
//! tasks, time passed in.
//!
//! The front calls in with what a client did (connect, subscribe,
//! publish, acknowledge, disconnect) and the time; the router changes its
//! state and tells the front, through [`Router::take_ready`], which
//! connections now have something to write, which the front then pulls
//! with [`Router::poll_transmit`]. [`Router::tick`] runs the clocks (will
//! delay, session expiry, retained expiry, deferred drop logs) and says
//! when it next needs to run. Everything the front must log comes out of
//! [`Router::take_events`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::index::{Hit, Index, Slot};
use crate::journal::{Changes, Journal, SessionState, StoredItem};
use crate::message::{Message, Millis, QoS, RetainHandling, SubOptions, Will, secs_after};
use crate::retained::{RetainRefused, Retained};
use crate::session::{Ack, Bounds, Item, Outgoing, Received, Session};
use crate::stats::{DropReason, Stats};
use crate::topic;

/// Session expiry that means "never" (MQTT 5: 0xFFFFFFFF; a 3.1.1
/// session without clean-session).
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// The router's bounds. Every one is a configuration key of the broker
/// (config/broker.toml, `[sessions]` and `[retained]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Messages a session's queue holds beyond its inflight window.
    pub max_queued_messages: usize,
    /// Topic and payload bytes a session's queue holds.
    pub max_queued_bytes: usize,
    /// The inflight window when the client asks for more (or, for 3.1.1,
    /// always).
    pub max_inflight: u16,
    /// Unreleased QoS 2 publishes a client may have (the Receive Maximum
    /// the broker announces).
    pub max_incoming_qos2: u16,
    /// Retained messages held in all.
    pub max_retained_messages: usize,
    /// Their topic and payload bytes.
    pub max_retained_bytes: usize,
    /// Longest session expiry a client may ask for, in seconds.
    pub max_session_expiry_secs: u32,
    /// Subscriptions one session may hold: each costs index memory and a
    /// visit on every matching publish.
    pub max_subscriptions: usize,
    /// At most one drop log line per client per this many milliseconds.
    pub drop_log_interval_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_queued_messages: 1_000_000,
            max_queued_bytes: 256 << 20,
            max_inflight: 100,
            max_incoming_qos2: 1024,
            max_retained_messages: 1_000_000,
            max_retained_bytes: 256 << 20,
            max_session_expiry_secs: 7 * 24 * 3600,
            max_subscriptions: 100_000,
            drop_log_interval_ms: 10_000,
        }
    }
}

/// One connection's handle on its session. Calls with a handle whose
/// connection has been taken over or closed get [`Stale`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Conn {
    slot: Slot,
    generation: u32,
    epoch: u32,
}

impl Conn {
    /// A number unique among live sessions, for the front's own maps.
    #[must_use]
    pub fn slot(self) -> Slot {
        self.slot
    }
}

/// The connection is no longer the session's: it was taken over by a new
/// connection with the same client id, or closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the connection no longer owns its session (taken over or closed)")]
pub struct Stale;

/// A CONNECT, as the router needs it.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// The client id, as the front namespaced it.
    pub client_id: Arc<str>,
    /// Clean Start (3.1.1: Clean Session): discard any existing session.
    pub clean_start: bool,
    /// Session Expiry Interval in seconds: 0 ends the session with the
    /// connection; [`NEVER_EXPIRES`] keeps it. Capped by the limits.
    pub session_expiry_secs: u32,
    /// The client's Receive Maximum (65,535 when it sent none).
    pub receive_maximum: u16,
    /// Its will, if any.
    pub will: Option<Will>,
}

/// What [`Router::subscribe`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subscribed {
    /// A new subscription.
    New,
    /// The session had this filter already; its options were replaced.
    Replaced,
    /// The session holds `max_subscriptions` already (SUBACK 0x97).
    QuotaExceeded,
}

/// What [`Router::connect`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connected {
    /// The new connection's handle.
    pub conn: Conn,
    /// Whether an existing session was resumed (CONNACK's Session Present).
    pub session_present: bool,
    /// The connection this one replaced, which the front must close
    /// (v5: DISCONNECT 0x8E). Its will is published only when a clean
    /// start ends the session it belonged to.
    pub taken_over: Option<Conn>,
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disconnect {
    /// Whether the will is due: every end but a normal DISCONNECT.
    pub publish_will: bool,
    /// A v5 DISCONNECT's new Session Expiry Interval.
    pub session_expiry_secs: Option<u32>,
}

/// What the front logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `count` messages for this client were dropped since the last line,
    /// the latest for `reason`.
    Dropped {
        /// The session's client id.
        client_id: Arc<str>,
        /// The latest drop's reason.
        reason: DropReason,
        /// Drops since the last line.
        count: u64,
    },
    /// A retained message was not kept.
    RetainedRefused {
        /// Its topic.
        topic: Arc<str>,
    },
    /// A session ended without a connection (expiry).
    SessionExpired {
        /// Its client id.
        client_id: Arc<str>,
        /// Messages it still held.
        lost: u64,
    },
    /// A will was published.
    WillPublished {
        /// Whose.
        client_id: Arc<str>,
        /// Where.
        topic: Arc<str>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Will,
    Expiry,
}

/// Most events held between two [`Router::take_events`] calls; beyond it
/// events are counted in `events_lost` rather than kept.
const MAX_EVENTS: usize = 65_536;

/// Removes a session's pending will and expiry timers (a reconnect or
/// its end makes them moot; left in place they would pile up, one per
/// disconnect, until their deadlines).
fn cancel_timers(timers: &mut BTreeSet<(Millis, Slot, u32, Timer)>, session: &Session, slot: Slot) {
    if let Some(at) = session.will_at {
        timers.remove(&(at, slot, session.generation, Timer::Will));
    }
    if let Some(at) = session.expires_at {
        timers.remove(&(at, slot, session.generation, Timer::Expiry));
    }
}

/// The session `conn` owns, if it still owns it.
fn owned(sessions: &mut [Option<Box<Session>>], conn: Conn) -> Result<&mut Session, Stale> {
    match sessions.get_mut(conn.slot as usize) {
        Some(Some(s)) if s.generation == conn.generation && s.epoch == conn.epoch && s.online => Ok(s),
        _ => Err(Stale),
    }
}

/// mqseal's MQTT router core.
#[derive(Debug)]
pub struct Router {
    limits: Limits,
    /// Boxed: the table doubles, and an empty slot should cost a pointer,
    /// not a session (docs/BENCHMARKS.md "Where the bytes go").
    sessions: Vec<Option<Box<Session>>>,
    free: Vec<Slot>,
    by_client: HashMap<Arc<str>, Slot>,
    index: Index,
    retained: Retained,
    timers: BTreeSet<(Millis, Slot, u32, Timer)>,
    ready: Vec<Conn>,
    unlogged: HashSet<Slot>,
    events: Vec<Event>,
    events_lost: u64,
    next_gen: u32,
    /// The next copy's sequence number (see [`crate::journal`]).
    next_seq: u64,
    /// Dirty keys for the store, when persistence is on.
    journal: Option<Journal>,
    stats: Stats,
}

impl Router {
    /// An empty router.
    #[must_use]
    pub fn new(limits: Limits) -> Self {
        let retained = Retained::new(limits.max_retained_messages, limits.max_retained_bytes);
        Self {
            limits,
            sessions: Vec::new(),
            free: Vec::new(),
            by_client: HashMap::new(),
            index: Index::default(),
            retained,
            timers: BTreeSet::new(),
            ready: Vec::new(),
            unlogged: HashSet::new(),
            events: Vec::new(),
            events_lost: 0,
            next_gen: 0,
            next_seq: 0,
            journal: None,
            stats: Stats::default(),
        }
    }

    /// Turns persistence on: from now on the router journals what a store
    /// must keep ([`Router::take_changes`]). Call it on a new router,
    /// before restoring what the store held and before the first
    /// connection: sessions that exist already are not journaled.
    pub fn enable_journal(&mut self) {
        self.journal.get_or_insert_with(Journal::default);
    }

    /// Every persisted key's current state, as if all were dirty: what a
    /// store that has applied every [`Changes`] so far must hold (for
    /// checks, and for writing a store afresh).
    #[must_use]
    pub fn snapshot_all(&self) -> Changes {
        let mut all = Changes { version: self.journal_version(), ..Changes::default() };
        for session in self.sessions.iter().flatten().filter(|s| s.persistent) {
            all.sessions.push(session.state());
            for seq in session.persisted_seqs() {
                let item = session.stored(seq);
                all.items.push((Arc::clone(&session.client_id), seq, item));
            }
        }
        all.retained = self.retained.all().into_iter().map(|m| (Arc::clone(&m.topic), Some(m))).collect();
        all
    }

    /// How many changes that a client's acknowledgement promises have been
    /// made so far (0 without persistence). A durable front holds such an
    /// acknowledgement until its store has committed this version.
    #[must_use]
    pub fn journal_version(&self) -> u64 {
        self.journal.as_ref().map_or(0, Journal::version)
    }

    /// Whether output written since the last call answered from state an
    /// earlier promise made, which the store may not have yet (a PUBREC for
    /// a duplicate QoS 2 PUBLISH, the CONNACK of a resumed persistent
    /// session, a resent QoS 2 delivery or PUBREL); clears it. A durable
    /// front holds that output until the current
    /// [`Router::journal_version`] is committed, as it does for output
    /// that answers a new promise.
    pub fn take_journal_depends(&mut self) -> bool {
        self.journal.as_mut().is_some_and(Journal::take_depends)
    }

    /// The keys changed since the last call, each with its current state,
    /// for the store's next commit; `None` without persistence.
    pub fn take_changes(&mut self) -> Option<Changes> {
        let dirty = self.journal.as_mut()?.take();
        let (sessions, by_client) = (&self.sessions, &self.by_client);
        let persisted = |client_id: &str| {
            by_client
                .get(client_id)
                .and_then(|&slot| sessions.get(slot as usize))
                .and_then(Option::as_ref)
                .filter(|s| s.persistent)
        };
        let mut changes = Changes { version: dirty.version(), ..Changes::default() };
        changes.ended = dirty.ended.into_iter().collect();
        changes.sessions = dirty.sessions.iter().filter_map(|c| persisted(c)).map(|s| s.state()).collect();
        changes.items = dirty
            .items
            .into_iter()
            .map(|(client_id, seq)| {
                let item = persisted(&client_id).and_then(|s| s.stored(seq));
                (client_id, seq, item)
            })
            .collect();
        changes.retained = dirty
            .retained
            .into_iter()
            .map(|topic| {
                let message = self.retained.get(&topic);
                (topic, message)
            })
            .collect();
        Some(changes)
    }

    /// Gives back changes a store failed to commit: their keys are dirty
    /// again, so the next snapshot carries their state as it is then.
    pub fn requeue(&mut self, changes: &Changes) {
        let Some(journal) = self.journal.as_mut() else { return };
        for (client, bound) in &changes.ended {
            let at = journal.ended.entry(Arc::clone(client)).or_insert(*bound);
            *at = (*at).max(*bound);
        }
        journal.sessions.extend(changes.sessions.iter().map(|s| Arc::clone(&s.client_id)));
        journal.items.extend(changes.items.iter().map(|(client, seq, _)| (Arc::clone(client), *seq)));
        journal.retained.extend(changes.retained.iter().map(|(topic, _)| Arc::clone(topic)));
    }

    /// Puts back a session read from the store, offline, with its entries
    /// in sequence order; whether it was kept. Its expiry clock starts
    /// now: the store does not know how long the broker was down.
    ///
    /// A session whose expiry is 0 (it was online, resumed without an
    /// expiry, when the broker died; or `max_session_expiry_secs` is 0
    /// now) ended with its connection: it is not kept, and the journal
    /// deletes it from the store.
    pub fn restore_session(&mut self, state: SessionState, items: Vec<(u64, StoredItem)>, now: Millis) -> bool {
        if self.by_client.contains_key(&state.client_id) {
            return false;
        }
        // Sequence numbers keep growing past everything the store holds,
        // kept or not.
        if let Some(last) = items.iter().map(|&(seq, _)| seq).max() {
            self.next_seq = self.next_seq.max(last.saturating_add(1));
        }
        let expiry = state.expiry_secs.min(self.limits.max_session_expiry_secs);
        if expiry == 0 {
            if let Some(journal) = self.journal.as_mut() {
                journal.ended.insert(Arc::clone(&state.client_id), self.next_seq);
            }
            return false;
        }
        let generation = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1);
        let mut session = Session::new(Arc::clone(&state.client_id), generation, expiry, 1);
        session.went_offline();
        session.persistent = self.journal.is_some() && expiry > 0;
        let slot = self.free.pop().unwrap_or_else(|| {
            self.sessions.push(None);
            Slot::try_from(self.sessions.len() - 1).unwrap_or(Slot::MAX)
        });
        let mut over_limit = false;
        for (filter, opts) in state.subscriptions {
            if session.subscriptions.len() >= self.limits.max_subscriptions {
                // Today's limit, whatever the file was written under; the
                // record is rewritten without the rest.
                over_limit = true;
                break;
            }
            if self.index.insert(&filter, slot, opts) {
                self.stats.subscriptions += 1;
            }
            session.subscriptions.insert(filter, opts);
        }
        session.restore_incoming(&state.incoming_qos2);
        for (seq, item) in items {
            session.restore(seq, item, &mut self.stats);
        }
        // The bounds are today's, whatever the file was written under.
        let over = session.fit(self.bounds(), &mut self.stats);
        if expiry != NEVER_EXPIRES {
            let at = secs_after(now, expiry);
            session.expires_at = Some(at);
            self.timers.insert((at, slot, generation, Timer::Expiry));
        }
        if let Some(entry) = self.sessions.get_mut(slot as usize) {
            *entry = Some(Box::new(session));
        }
        self.by_client.insert(state.client_id, slot);
        self.stats.sessions_offline += 1;
        self.journal_items(slot);
        if over_limit {
            self.journal_session(slot, false);
        }
        if over > 0 {
            self.count_drops(slot, &vec![DropReason::QueueFullOldest; over], now);
        }
        true
    }

    /// Puts back a retained message read from the store; whether it was
    /// kept (not expired, within the bounds).
    pub fn restore_retained(&mut self, message: Message, now: Millis) -> bool {
        if message.expired(now) || message.payload.is_empty() {
            return false;
        }
        let kept = self.retained.apply(Arc::new(message)).is_ok();
        self.stats.retained_messages = self.retained.len() as u64;
        self.stats.retained_bytes = self.retained.bytes() as u64;
        kept
    }

    /// A change a client's acknowledgement depends on, to a session's
    /// record.
    fn journal_session(&mut self, slot: Slot, promise: bool) {
        let Some(journal) = self.journal.as_mut() else { return };
        let Some(session) = self.sessions.get(slot as usize).and_then(Option::as_ref) else { return };
        if session.persistent {
            journal.sessions.insert(Arc::clone(&session.client_id));
            if promise {
                journal.promise();
            }
        }
    }

    /// Output for a persistent session's client that the store must have
    /// first: a new promise (`promise`), or what is promised so far.
    fn journal_owe(&mut self, slot: Slot, promise: bool) {
        let Some(journal) = self.journal.as_mut() else { return };
        if self.sessions.get(slot as usize).and_then(Option::as_ref).is_some_and(|s| s.persistent) {
            if promise {
                journal.promise();
            } else {
                journal.depend();
            }
        }
    }

    /// Moves a session's touched copies into the journal.
    fn journal_items(&mut self, slot: Slot) {
        let Some(session) = self.sessions.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        if session.touched.is_empty() {
            return;
        }
        let Some(journal) = self.journal.as_mut() else {
            session.touched.clear();
            return;
        };
        for seq in session.touched.drain(..) {
            journal.items.insert((Arc::clone(&session.client_id), seq));
        }
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// The counters and gauges.
    #[must_use]
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Events dropped because nobody took them in time.
    #[must_use]
    pub fn events_lost(&self) -> u64 {
        self.events_lost
    }

    /// The limits in force.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn bounds(&self) -> Bounds {
        Bounds { max_messages: self.limits.max_queued_messages, max_bytes: self.limits.max_queued_bytes }
    }

    fn session(&self, conn: Conn) -> Result<&Session, Stale> {
        match self.sessions.get(conn.slot as usize) {
            Some(Some(s)) if s.generation == conn.generation && s.epoch == conn.epoch && s.online => Ok(s),
            _ => Err(Stale),
        }
    }

    fn session_mut(&mut self, conn: Conn) -> Result<&mut Session, Stale> {
        owned(&mut self.sessions, conn)
    }

    /// Whether `conn` still owns its session.
    #[must_use]
    pub fn is_current(&self, conn: Conn) -> bool {
        self.session(conn).is_ok()
    }

    fn handle(session: &Session, slot: Slot) -> Conn {
        Conn { slot, generation: session.generation, epoch: session.epoch }
    }

    fn push_event(&mut self, event: Event) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(event);
        } else {
            self.events_lost += 1;
        }
    }

    /// Takes from a resumed session what its client may no longer read
    /// (`allowed` says, for a filter or a topic): the subscriptions it
    /// refuses, and the copies on topics it refuses, queued or in flight
    /// (counted as [`DropReason::NotAllowed`]; a QoS 2 copy in flight is
    /// released without its payload). A front calls it right after a
    /// resuming [`Router::connect`], so that a session kept across an ACL
    /// change — by a restart, with the store — keeps nothing the rules
    /// now deny. Returns the refused filters and the dropped copies.
    ///
    /// # Errors
    /// [`Stale`] for a connection that no longer owns its session.
    pub fn revoke(
        &mut self,
        conn: Conn,
        mut allowed: impl FnMut(&str) -> bool,
        now: Millis,
    ) -> Result<(Vec<Box<str>>, usize), Stale> {
        let session = self.session_mut(conn)?;
        let refused: Vec<Box<str>> = session.subscriptions.keys().filter(|f| !allowed(f)).cloned().collect();
        for filter in &refused {
            self.unsubscribe(conn, filter)?;
        }
        let session = owned(&mut self.sessions, conn)?;
        let dropped = session.withhold(&mut allowed, &mut self.stats);
        self.journal_items(conn.slot);
        if dropped > 0 {
            self.count_drops(conn.slot, &vec![DropReason::NotAllowed; dropped], now);
        }
        Ok((refused, dropped))
    }

    /// A client logged in: resume its session or start one.
    pub fn connect(&mut self, req: ConnectRequest, now: Millis) -> Connected {
        let expiry = req.session_expiry_secs.min(self.limits.max_session_expiry_secs);
        let window = req.receive_maximum.min(self.limits.max_inflight);
        let mut taken_over = None;
        if let Some(&slot) = self.by_client.get(&req.client_id) {
            if let Some(Some(old)) = self.sessions.get(slot as usize)
                && old.online
            {
                taken_over = Some(Self::handle(old, slot));
            }
            if req.clean_start {
                // The old session ends here: a will it still owed is due now.
                self.end_session(slot, now, true);
            } else if let Some(Some(session)) = self.sessions.get_mut(slot as usize) {
                if session.online {
                    self.stats.sessions_online -= 1;
                } else {
                    self.stats.sessions_offline -= 1;
                }
                cancel_timers(&mut self.timers, session, slot);
                session.reconnected(window);
                let changed = session.expiry_secs != expiry;
                session.expiry_secs = expiry;
                session.will = req.will.map(Box::new);
                if self.journal.is_some() && expiry > 0 && !session.persistent {
                    // Resumed with an expiry it did not have: from now on
                    // it is kept, with what it already holds.
                    session.persistent = true;
                    session.touched = session.persisted_seqs();
                }
                self.stats.sessions_online += 1;
                let conn = Self::handle(session, slot);
                if changed {
                    self.journal_session(slot, true);
                } else {
                    // "Session present" is only true once the session's
                    // record is on disk.
                    self.journal_owe(slot, false);
                }
                self.journal_items(slot);
                self.mark_ready(slot);
                return Connected { conn, session_present: true, taken_over };
            }
        }
        let generation = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1);
        let mut session = Session::new(Arc::clone(&req.client_id), generation, expiry, window);
        session.will = req.will.map(Box::new);
        session.persistent = self.journal.is_some() && expiry > 0;
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.sessions.push(None);
                Slot::try_from(self.sessions.len() - 1).unwrap_or(Slot::MAX)
            }
        };
        let conn = Self::handle(&session, slot);
        if let Some(entry) = self.sessions.get_mut(slot as usize) {
            *entry = Some(Box::new(session));
        }
        self.by_client.insert(req.client_id, slot);
        self.stats.sessions_online += 1;
        self.journal_session(slot, true);
        Connected { conn, session_present: false, taken_over }
    }

    /// A connection ended. The session goes offline (its inflight messages
    /// will be resent on reconnect) or, with expiry 0, ends; the will is
    /// published now or after its delay — or when the session ends, if
    /// that is sooner.
    ///
    /// # Errors
    /// [`Stale`] when the connection had already been taken over.
    pub fn disconnect(&mut self, conn: Conn, how: Disconnect, now: Millis) -> Result<(), Stale> {
        let session = owned(&mut self.sessions, conn)?;
        let changed = how.session_expiry_secs.is_some_and(|e| e != session.expiry_secs);
        if let Some(expiry) = how.session_expiry_secs {
            session.expiry_secs = expiry;
        }
        session.went_offline();
        let expiry = session.expiry_secs.min(self.limits.max_session_expiry_secs);
        if !how.publish_will {
            session.will = None;
        }
        let generation = session.generation;
        let will_delay = session.will.as_ref().map(|w| w.delay_secs.min(expiry));
        self.stats.sessions_online -= 1;
        self.stats.sessions_offline += 1;
        if expiry == 0 {
            self.end_session(conn.slot, now, true);
            return Ok(());
        }
        if changed {
            self.journal_session(conn.slot, false);
        }
        if let Some(session) = self.sessions.get_mut(conn.slot as usize).and_then(Option::as_mut) {
            if expiry != NEVER_EXPIRES {
                let at = secs_after(now, expiry);
                session.expires_at = Some(at);
                self.timers.insert((at, conn.slot, generation, Timer::Expiry));
            }
            match will_delay {
                Some(0) => self.publish_will(conn.slot, now),
                Some(delay) => {
                    let at = secs_after(now, delay);
                    session.will_at = Some(at);
                    self.timers.insert((at, conn.slot, generation, Timer::Will));
                }
                None => {}
            }
        }
        Ok(())
    }

    fn publish_will(&mut self, slot: Slot, now: Millis) {
        let Some(session) = self.sessions.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        if let Some(at) = session.will_at.take() {
            self.timers.remove(&(at, slot, session.generation, Timer::Will));
        }
        let Some(will) = session.will.take().map(|w| *w) else { return };
        let client_id = Arc::clone(&session.client_id);
        let topic = Arc::clone(&will.message.topic);
        let mut message = will.message;
        message.expires_at = will.expiry_secs.map(|s| secs_after(now, s));
        self.route(None, message, now);
        self.push_event(Event::WillPublished { client_id, topic });
    }

    /// Ends the session in `slot`: its will (if `with_will`) is published,
    /// its subscriptions leave the index, and what it still held is
    /// counted as dropped.
    fn end_session(&mut self, slot: Slot, now: Millis, with_will: bool) -> u64 {
        if with_will {
            self.publish_will(slot, now);
        }
        let Some(mut session) = self.sessions.get_mut(slot as usize).and_then(Option::take) else { return 0 };
        cancel_timers(&mut self.timers, &session, slot);
        if session.persistent
            && let Some(journal) = self.journal.as_mut()
        {
            // Everything it had in the store goes, whatever comes next
            // under the same client id (which numbers from `next_seq`).
            journal.ended.insert(Arc::clone(&session.client_id), self.next_seq);
            journal.promise();
        }
        self.free.push(slot);
        self.by_client.remove(&session.client_id);
        self.unlogged.remove(&slot);
        for filter in session.subscriptions.keys() {
            if self.index.remove(filter, slot) {
                self.stats.subscriptions -= 1;
            }
        }
        if session.online {
            self.stats.sessions_online -= 1;
        } else {
            self.stats.sessions_offline -= 1;
        }
        let lost = session.clear(&mut self.stats);
        self.stats.count_drop(DropReason::SessionEnded, lost);
        lost
    }

    /// Adds or replaces a subscription (a valid filter, ACL already
    /// passed) and queues the retained messages its retain handling asks
    /// for.
    ///
    /// # Errors
    /// [`Stale`] for a connection that no longer owns its session.
    pub fn subscribe(&mut self, conn: Conn, filter: &str, opts: SubOptions, now: Millis) -> Result<Subscribed, Stale> {
        let max = self.limits.max_subscriptions;
        let session = owned(&mut self.sessions, conn)?;
        if !session.subscriptions.contains_key(filter) && session.subscriptions.len() >= max {
            return Ok(Subscribed::QuotaExceeded);
        }
        let existed = session.subscriptions.insert(filter.into(), opts).is_some();
        if self.index.insert(filter, conn.slot, opts) {
            self.stats.subscriptions += 1;
        }
        self.journal_session(conn.slot, true);
        let send_retained = match opts.retain_handling {
            RetainHandling::OnSubscribe => true,
            RetainHandling::OnNewSubscription => !existed,
            RetainHandling::Never => false,
        };
        // Retained messages are not sent for shared subscriptions (MQTT 5 §4.8.2).
        if send_retained && topic::parse_shared(filter).is_none() {
            let ids: Box<[u32]> = opts.id.into_iter().collect();
            for message in self.retained.matching(filter, now) {
                let qos = message.qos.min(opts.qos);
                let item = Item { seq: self.take_seq(), message, qos, retain: true, subscription_ids: ids.clone() };
                self.deliver(conn.slot, item, now);
            }
        }
        Ok(if existed { Subscribed::Replaced } else { Subscribed::New })
    }

    /// Removes a subscription; whether there was one.
    ///
    /// # Errors
    /// [`Stale`] for a connection that no longer owns its session.
    pub fn unsubscribe(&mut self, conn: Conn, filter: &str) -> Result<bool, Stale> {
        let session = self.session_mut(conn)?;
        let existed = session.subscriptions.remove(filter).is_some();
        if self.index.remove(filter, conn.slot) {
            self.stats.subscriptions -= 1;
        }
        if existed {
            self.journal_session(conn.slot, true);
        }
        Ok(existed)
    }

    /// Routes a PUBLISH that passed the front's checks (topic, ACL, and
    /// for QoS 2 [`Router::receive_qos2`]); returns how many sessions it
    /// was handed to. `from` is the publisher (for no-local), `None` for
    /// the broker's own messages.
    ///
    /// # Errors
    /// [`Stale`] for a publisher that no longer owns its session.
    pub fn publish(&mut self, from: Option<Conn>, message: Message, now: Millis) -> Result<usize, Stale> {
        let publisher = match from {
            Some(conn) => {
                self.session(conn)?;
                Some(conn.slot)
            }
            None => None,
        };
        Ok(self.route(publisher, message, now))
    }

    fn route(&mut self, publisher: Option<Slot>, message: Message, now: Millis) -> usize {
        self.stats.published += 1;
        if message.expired(now) {
            self.stats.count_drop(DropReason::Expired, 1);
            return 0;
        }
        let message = Arc::new(message);
        if message.retain {
            match self.retained.apply(Arc::clone(&message)) {
                Ok(()) => {
                    if let Some(journal) = self.journal.as_mut() {
                        journal.retained.insert(Arc::clone(&message.topic));
                        journal.promise();
                    }
                }
                Err(RetainRefused::Full | RetainRefused::TooLarge) => {
                    self.stats.count_drop(DropReason::RetainedFull, 1);
                    self.push_event(Event::RetainedRefused { topic: Arc::clone(&message.topic) });
                }
            }
            self.stats.retained_messages = self.retained.len() as u64;
            self.stats.retained_bytes = self.retained.bytes() as u64;
        }
        let mut targets: Vec<(Slot, SubOptions)> = Vec::new();
        let sessions = &self.sessions;
        let online = |slot: Slot| sessions.get(slot as usize).and_then(Option::as_ref).is_some_and(|s| s.online);
        self.index.for_each_match(&message.topic, &mut |hit| match hit {
            Hit::Direct(slot, opts) => {
                if !(opts.no_local && publisher == Some(slot)) {
                    targets.push((slot, *opts));
                }
            }
            Hit::Group(group) => targets.extend(group.pick(online)),
        });
        if targets.is_empty() {
            self.stats.unmatched += 1;
            return 0;
        }
        // One copy per session (MQTT-3.3.4-2 allows it): the highest QoS
        // of its matching subscriptions, and all their identifiers.
        targets.sort_unstable_by_key(|(slot, _)| *slot);
        let mut copies = 0;
        let mut i = 0;
        while let Some(&(slot, first)) = targets.get(i) {
            let mut qos = first.qos;
            let mut keep_retain = first.retain_as_published;
            let mut ids: Vec<u32> = first.id.into_iter().collect();
            i += 1;
            while let Some((_, o)) = targets.get(i).filter(|(s, _)| *s == slot) {
                qos = qos.max(o.qos);
                keep_retain |= o.retain_as_published;
                ids.extend(o.id);
                i += 1;
            }
            let item = Item {
                seq: self.take_seq(),
                message: Arc::clone(&message),
                qos: message.qos.min(qos),
                retain: message.retain && keep_retain,
                subscription_ids: ids.into_boxed_slice(),
            };
            self.deliver(slot, item, now);
            copies += 1;
        }
        self.stats.delivered += copies as u64;
        copies
    }

    fn deliver(&mut self, slot: Slot, item: Item, now: Millis) {
        let bounds = self.bounds();
        let Some(session) = self.sessions.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        let persisted = session.persistent && item.qos != QoS::AtMostOnce;
        let (kept, dropped) = session.push(item, bounds, &mut self.stats);
        let ready = session.has_output();
        if kept
            && persisted
            && let Some(journal) = self.journal.as_mut()
        {
            journal.promise();
        }
        self.journal_items(slot);
        if !dropped.is_empty() {
            self.count_drops(slot, &dropped, now);
        }
        if ready {
            self.mark_ready(slot);
        }
    }

    fn mark_ready(&mut self, slot: Slot) {
        let Some(session) = self.sessions.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        if session.online && !session.ready && session.has_output() {
            session.ready = true;
            let conn = Self::handle(session, slot);
            self.ready.push(conn);
        }
    }

    /// Counts drops for a session and logs them at most once per interval.
    fn count_drops(&mut self, slot: Slot, dropped: &[DropReason], now: Millis) {
        for &reason in dropped {
            self.stats.count_drop(reason, 1);
        }
        let interval = self.limits.drop_log_interval_ms;
        let Some(session) = self.sessions.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        session.drops.pending += dropped.len() as u64;
        session.drops.last_reason = dropped.last().copied();
        let due = session.drops.last_logged.is_none_or(|at| now.saturating_sub(at) >= interval);
        if !due {
            self.unlogged.insert(slot);
            return;
        }
        let event = Self::drop_event(session, now);
        self.unlogged.remove(&slot);
        if let Some(event) = event {
            self.push_event(event);
        }
    }

    fn drop_event(session: &mut Session, now: Millis) -> Option<Event> {
        let reason = session.drops.last_reason?;
        let count = std::mem::take(&mut session.drops.pending);
        session.drops.last_logged = Some(now);
        (count > 0).then(|| Event::Dropped { client_id: Arc::clone(&session.client_id), reason, count })
    }

    /// The next packet to write on `conn`, if any is due.
    pub fn poll_transmit(&mut self, conn: Conn, now: Millis) -> Option<Outgoing> {
        let session = owned(&mut self.sessions, conn).ok()?;
        let (out, dropped) = session.poll(now, &mut self.stats);
        if out.is_none() {
            session.ready = false;
            session.trim();
        }
        self.journal_items(conn.slot);
        if !dropped.is_empty() {
            self.count_drops(conn.slot, &dropped, now);
        }
        match &out {
            // A QoS 2 copy leaves with a packet id the store must know: a
            // store that forgot it would send the copy again under a new
            // id, which the client takes for a new message. The promise
            // also comes after the publisher's, so the copy cannot be
            // received before the publisher's PUBREC is safe.
            Some(Outgoing::Publish(d)) if d.qos == QoS::ExactlyOnce => self.journal_owe(conn.slot, !d.dup),
            Some(Outgoing::PubRel(_)) => self.journal_owe(conn.slot, false),
            _ => {}
        }
        out
    }

    /// Connections that have something to write since the last call. The
    /// front wakes each; a woken connection pulls with
    /// [`Router::poll_transmit`] until it gets `None`.
    pub fn take_ready(&mut self) -> Vec<Conn> {
        std::mem::take(&mut self.ready)
    }

    /// What the front should log since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn ack(&mut self, conn: Conn, f: impl FnOnce(&mut Session, &mut Stats) -> Ack) -> Result<Ack, Stale> {
        let session = owned(&mut self.sessions, conn)?;
        let ack = f(session, &mut self.stats);
        self.journal_items(conn.slot);
        // A completed delivery frees a place in the window.
        if ack == Ack::Done {
            self.mark_ready(conn.slot);
        }
        if let Some(session) = self.sessions.get_mut(conn.slot as usize).and_then(Option::as_mut)
            && !session.ready
        {
            session.trim();
        }
        Ok(ack)
    }

    /// PUBACK from the client.
    ///
    /// # Errors
    /// [`Stale`] for a connection that no longer owns its session.
    pub fn puback(&mut self, conn: Conn, pkid: u16) -> Result<Ack, Stale> {
        self.ack(conn, |s, stats| s.puback(pkid, stats))
    }

    /// PUBREC from the client; on [`Ack::Done`] with `accepted` the front
    /// writes PUBREL.
    ///
    /// # Errors
    /// [`Stale`] for a connection that no longer owns its session.
    pub fn pubrec(&mut self, conn: Conn, pkid: u16, accepted: bool) -> Result<Ack, Stale> {
        let ack = self.ack(conn, |s, stats| s.pubrec(pkid, accepted, stats))?;
        if ack == Ack::Done && accepted {
            // The PUBREL lets the client forget the message: a store that
            // forgot the PUBREC would send the PUBLISH again, as new.
            self.journal_owe(conn.slot, true);
        }
        Ok(ack)
    }

    /// PUBCOMP from the client.
    ///
    /// # Errors
    /// [`Stale`] for a connection that no longer owns its session.
    pub fn pubcomp(&mut self, conn: Conn, pkid: u16) -> Result<Ack, Stale> {
        self.ack(conn, |s, stats| s.pubcomp(pkid, stats))
    }

    /// A QoS 2 PUBLISH from the client: route it only when
    /// [`Received::Fresh`].
    ///
    /// # Errors
    /// [`Stale`] for a connection that no longer owns its session.
    pub fn receive_qos2(&mut self, conn: Conn, pkid: u16) -> Result<Received, Stale> {
        let max = usize::from(self.limits.max_incoming_qos2);
        let received = self.session_mut(conn)?.receive_qos2(pkid, max);
        match received {
            Received::Fresh => self.journal_session(conn.slot, true),
            // Its PUBREC says the id is held: the record of the first
            // PUBLISH may still be on its way to the disk.
            Received::Duplicate => self.journal_owe(conn.slot, false),
            Received::TooMany => {}
        }
        Ok(received)
    }

    /// PUBREL from the client: whether that packet id was waiting (v5
    /// answers PUBCOMP 0x92 when not).
    ///
    /// # Errors
    /// [`Stale`] for a connection that no longer owns its session.
    pub fn release_qos2(&mut self, conn: Conn, pkid: u16) -> Result<bool, Stale> {
        let released = self.session_mut(conn)?.release_qos2(pkid);
        if released {
            // PUBCOMP frees the id for the client's next QoS 2 PUBLISH: a
            // store that still held it would take that one for a duplicate.
            self.journal_session(conn.slot, true);
        }
        Ok(released)
    }

    /// Runs the clocks up to `now`: delayed wills, session expiry,
    /// retained expiry, deferred drop logs. Returns when it next needs to
    /// run, if any timer is set.
    pub fn tick(&mut self, now: Millis) -> Option<Millis> {
        while let Some(&(at, slot, generation, timer)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            let Some(session) = self.sessions.get(slot as usize).and_then(Option::as_ref) else { continue };
            if session.generation != generation || session.online {
                continue;
            }
            match timer {
                Timer::Will if session.will_at == Some(at) => self.publish_will(slot, now),
                Timer::Expiry if session.expires_at == Some(at) => {
                    let client_id = Arc::clone(&session.client_id);
                    let lost = self.end_session(slot, now, true);
                    self.push_event(Event::SessionExpired { client_id, lost });
                }
                _ => {}
            }
        }
        let expired = self.retained.expire(now);
        if !expired.is_empty() {
            self.stats.retained_messages = self.retained.len() as u64;
            self.stats.retained_bytes = self.retained.bytes() as u64;
            if let Some(journal) = self.journal.as_mut() {
                journal.retained.extend(expired);
            }
        }
        let interval = self.limits.drop_log_interval_ms;
        let due: Vec<Slot> = self
            .unlogged
            .iter()
            .copied()
            .filter(|&slot| {
                self.sessions
                    .get(slot as usize)
                    .and_then(Option::as_ref)
                    .and_then(|s| s.drops.last_logged)
                    .is_none_or(|at| now.saturating_sub(at) >= interval)
            })
            .collect();
        for slot in due {
            self.unlogged.remove(&slot);
            if let Some(event) =
                self.sessions.get_mut(slot as usize).and_then(Option::as_mut).and_then(|s| Self::drop_event(s, now))
            {
                self.push_event(event);
            }
        }
        let next_log = self.unlogged.iter().filter_map(|&slot| {
            self.sessions.get(slot as usize).and_then(Option::as_ref).and_then(|s| s.drops.last_logged)
        });
        let next_log = next_log.min().map(|at| at.saturating_add(interval));
        let next_timer = self.timers.first().map(|(at, ..)| *at);
        match (next_timer, next_log) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Messages queued and bytes for one session (for tests and the admin
    /// view), by client id.
    #[must_use]
    pub fn queued(&self, client_id: &str) -> Option<(usize, usize)> {
        let slot = *self.by_client.get(client_id)?;
        self.sessions.get(slot as usize)?.as_ref().map(|s| s.queued())
    }

    /// QoS 1/2 deliveries awaiting acknowledgement for one session.
    #[must_use]
    pub fn inflight(&self, client_id: &str) -> Option<usize> {
        let slot = *self.by_client.get(client_id)?;
        self.sessions.get(slot as usize)?.as_ref().map(|s| s.inflight_len())
    }

    /// Will and expiry timers pending (for tests: they must not pile up).
    #[must_use]
    pub fn timers_pending(&self) -> usize {
        self.timers.len()
    }

    /// Whether a session exists for `client_id` (online or not).
    #[must_use]
    pub fn has_session(&self, client_id: &str) -> bool {
        self.by_client.contains_key(client_id)
    }

    /// The retained store (read-only).
    #[must_use]
    pub fn retained(&self) -> &Retained {
        &self.retained
    }

    /// Subscribers of one exact filter (for tests).
    #[must_use]
    pub fn holders_of(&mut self, filter: &str) -> usize {
        self.index.holders_of(filter)
    }
}
