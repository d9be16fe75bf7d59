//! One client's session: its subscriptions, its bounded queue, its
//! inflight window and packet ids, and its exactly-once receive state.
//!
//! The queue is where the router's memory goes, so it is where the bounds
//! are: every session's queue holds at most `max_queued_messages` and
//! `max_queued_bytes`, and the inflight window at most the client's Receive
//! Maximum (or the configured cap). When a message does not fit, the
//! policy is fixed and documented (docs/ROUTER.md): a QoS 0 message goes
//! first — the new one if it is QoS 0, else the oldest queued QoS 0 — and
//! only then the oldest QoS 1/2 message. Every drop is counted by reason.
//! There is no shared log and no cursor to jump: what is not dropped this
//! way is delivered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::journal::{SessionState, StoredItem};
use crate::message::{Message, Millis, QoS, SubOptions, Will};
use crate::stats::{DropReason, Stats};

/// One copy of a message for one session.
#[derive(Clone, Debug)]
pub(crate) struct Item {
    /// Unique across the router's life (and restarts): the key a
    /// persistent store keeps this copy under.
    pub seq: u64,
    pub message: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Box<[u32]>,
}

#[derive(Debug)]
enum Flight {
    /// QoS 1 waiting for PUBACK, or QoS 2 waiting for PUBREC.
    Publish(Item),
    /// QoS 2 after PUBREC: PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
struct InFlight {
    pkid: u16,
    seq: u64,
    flight: Flight,
    /// Written on the current connection. Cleared for every entry when the
    /// connection goes, so a reconnect resends them (with DUP).
    sent: bool,
}

/// What the front writes next for a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// A PUBLISH.
    Publish(Delivery),
    /// A PUBREL for a QoS 2 delivery the client has PUBREC'd, resent after
    /// a reconnect.
    PubRel(u16),
}

/// A PUBLISH to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// The QoS it is delivered at: the lower of the publish's and the
    /// subscription's.
    pub qos: QoS,
    /// A resend after a reconnect.
    pub dup: bool,
    /// The RETAIN flag as delivered.
    pub retain: bool,
    /// The message.
    pub message: Arc<Message>,
    /// Subscription identifiers of the matching subscriptions (v5).
    pub subscription_ids: Box<[u32]>,
}

/// What an acknowledgement from the client matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    /// It completed (or advanced) a delivery.
    Done,
    /// No delivery in the matching state has this packet id. MQTT says to
    /// carry on (a v5 PUBREL gets PUBCOMP 0x92); the front logs it.
    Unknown,
}

/// How a QoS 2 PUBLISH from the client stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// First time: route it, answer PUBREC.
    Fresh,
    /// A resend of one not yet released: answer PUBREC, do not route again.
    Duplicate,
    /// The client has more unreleased QoS 2 publishes than the broker's
    /// Receive Maximum allows (v5 0x93).
    TooMany,
}

/// Why a session drops messages, accumulated between log lines.
#[derive(Debug, Default)]
pub(crate) struct DropLog {
    pub pending: u64,
    pub last_reason: Option<DropReason>,
    pub last_logged: Option<Millis>,
}

/// Bounds for one session.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    pub max_messages: usize,
    pub max_bytes: usize,
}

#[derive(Debug)]
pub(crate) struct Session {
    pub client_id: Arc<str>,
    pub generation: u32,
    pub epoch: u32,
    pub online: bool,
    /// Seconds the session outlives its connection; `u32::MAX` is never.
    pub expiry_secs: u32,
    pub expires_at: Option<Millis>,
    pub subscriptions: HashMap<Box<str>, SubOptions>,
    /// Boxed: most sessions have none, and the sessions' table holds one
    /// of these per slot.
    pub will: Option<Box<Will>>,
    pub will_at: Option<Millis>,
    pub ready: bool,
    pub drops: DropLog,
    /// Kept in the store (the router journals it): the session outlives
    /// its connection and persistence is on.
    pub persistent: bool,
    /// Sequence numbers of persisted copies changed since the router last
    /// moved them into its journal.
    pub touched: Vec<u64>,
    queue: VecDeque<Item>,
    queued_bytes: usize,
    queued_qos0: usize,
    inflight: VecDeque<InFlight>,
    unsent: usize,
    window: u16,
    next_pkid: u16,
    incoming: HashSet<u16>,
}

impl Session {
    pub fn new(client_id: Arc<str>, generation: u32, expiry_secs: u32, window: u16) -> Self {
        Self {
            client_id,
            generation,
            epoch: 0,
            online: true,
            expiry_secs,
            expires_at: None,
            subscriptions: HashMap::new(),
            will: None,
            will_at: None,
            ready: false,
            drops: DropLog::default(),
            persistent: false,
            touched: Vec::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            queued_qos0: 0,
            inflight: VecDeque::new(),
            unsent: 0,
            window: window.max(1),
            next_pkid: 0,
            incoming: HashSet::new(),
        }
    }

    /// Gives back the queue's and the window's memory once they are
    /// empty: a fleet is mostly idle sessions, and an empty `VecDeque`
    /// keeps the capacity of its busiest moment.
    pub fn trim(&mut self) {
        if self.queue.is_empty() && self.queue.capacity() > 0 {
            self.queue = VecDeque::new();
        }
        if self.inflight.is_empty() && self.inflight.capacity() > 0 {
            self.inflight = VecDeque::new();
        }
        if self.touched.is_empty() && self.touched.capacity() > 0 {
            self.touched = Vec::new();
        }
    }

    /// Whether the front has something to write now.
    pub fn has_output(&self) -> bool {
        self.online && (self.can_resend() || self.queue.front().is_some_and(|i| self.can_send(i)))
    }

    /// Whether an unsent inflight entry may go out: a reconnect with a
    /// smaller Receive Maximum than before resends only as many as the new
    /// window holds (MQTT-3.3.4-9), the rest as acks free places.
    fn can_resend(&self) -> bool {
        self.unsent > 0 && self.inflight.len() - self.unsent < usize::from(self.window)
    }

    fn can_send(&self, item: &Item) -> bool {
        item.qos == QoS::AtMostOnce || self.inflight.len() < usize::from(self.window)
    }

    pub fn queued(&self) -> (usize, usize) {
        (self.queue.len(), self.queued_bytes)
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// A new connection for this session, with the client's Receive
    /// Maximum: what was in flight is resent, with DUP.
    pub fn reconnected(&mut self, window: u16) {
        self.online = true;
        self.epoch = self.epoch.wrapping_add(1);
        self.window = window.max(1);
        self.expires_at = None;
        self.will_at = None;
        // Whatever the last connection was told, this one has not been.
        self.ready = false;
        for entry in &mut self.inflight {
            entry.sent = false;
        }
        self.unsent = self.inflight.len();
    }

    pub fn went_offline(&mut self) {
        self.online = false;
        self.ready = false;
        self.epoch = self.epoch.wrapping_add(1);
        for entry in &mut self.inflight {
            entry.sent = false;
        }
        self.unsent = self.inflight.len();
    }

    fn pop(&mut self, stats: &mut Stats) -> Option<Item> {
        let item = self.queue.pop_front()?;
        self.forget(&item, stats);
        Some(item)
    }

    /// Notes a change to a persisted copy, for the journal.
    fn touch(&mut self, qos: QoS, seq: u64) {
        if self.persistent && qos != QoS::AtMostOnce {
            self.touched.push(seq);
        }
    }

    fn forget(&mut self, item: &Item, stats: &mut Stats) {
        self.touch(item.qos, item.seq);
        let size = item.message.size();
        self.queued_bytes -= size;
        stats.queued_messages -= 1;
        stats.queued_bytes -= size as u64;
        if item.qos == QoS::AtMostOnce {
            self.queued_qos0 -= 1;
        }
    }

    /// Withholds the copies whose topic `keep` refuses; returns how many.
    /// Queued ones are dropped. In-flight ones are not resent either: a
    /// copy counts as in flight once it was pulled for the socket, which
    /// does not mean the client got it. A QoS 1 copy is dropped; a QoS 2
    /// copy becomes a PUBREL without its payload (a client that had the
    /// PUBLISH completes the flow, one that did not answers PUBCOMP for an
    /// id it does not know).
    pub fn withhold(&mut self, mut keep: impl FnMut(&str) -> bool, stats: &mut Stats) -> usize {
        let (kept, gone): (VecDeque<Item>, VecDeque<Item>) =
            std::mem::take(&mut self.queue).into_iter().partition(|i| keep(&i.message.topic));
        self.queue = kept;
        for item in &gone {
            self.forget(item, stats);
        }
        let mut withheld = gone.len();
        let mut i = 0;
        while let Some(entry) = self.inflight.get_mut(i) {
            let denied = match &entry.flight {
                Flight::Publish(item) if !keep(&item.message.topic) => Some(item.qos),
                _ => None,
            };
            let Some(qos) = denied else {
                i += 1;
                continue;
            };
            withheld += 1;
            if qos == QoS::ExactlyOnce {
                entry.flight = Flight::Released;
                let seq = entry.seq;
                self.touch(QoS::ExactlyOnce, seq);
                i += 1;
            } else {
                self.complete(Some(i), stats);
            }
        }
        withheld
    }

    /// Queues a copy, applying the bounds; returns whether it was kept
    /// and the drops it caused (the copy itself or older ones), for the
    /// caller to count and log.
    pub fn push(&mut self, item: Item, bounds: Bounds, stats: &mut Stats) -> (bool, Vec<DropReason>) {
        let size = item.message.size();
        if size > bounds.max_bytes {
            return (false, vec![DropReason::TooLargeForQueue]);
        }
        if !self.online && item.qos == QoS::AtMostOnce {
            return (false, vec![DropReason::OfflineQos0]);
        }
        let mut dropped = Vec::new();
        while self.queue.len() >= bounds.max_messages || self.queued_bytes + size > bounds.max_bytes {
            if item.qos == QoS::AtMostOnce {
                dropped.push(DropReason::QueueFullQos0);
                return (false, dropped);
            }
            let victim = if self.queued_qos0 > 0 {
                self.queue.iter().position(|i| i.qos == QoS::AtMostOnce).and_then(|i| self.queue.remove(i))
            } else {
                self.queue.pop_front()
            };
            let Some(victim) = victim else { break };
            self.forget(&victim, stats);
            dropped.push(if victim.qos == QoS::AtMostOnce {
                DropReason::QueueFullQos0
            } else {
                DropReason::QueueFullOldest
            });
        }
        self.queued_bytes += size;
        stats.queued_messages += 1;
        stats.queued_bytes += size as u64;
        if item.qos == QoS::AtMostOnce {
            self.queued_qos0 += 1;
        }
        // Only now: a copy the bounds refused was never persisted.
        self.touch(item.qos, item.seq);
        self.queue.push_back(item);
        (true, dropped)
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            let id = self.next_pkid;
            if !self.inflight.iter().any(|e| e.pkid == id) {
                return id;
            }
        }
    }

    /// The next packet to write, if the session is online and one is due:
    /// first what a reconnect must resend, then the queue in order, as far
    /// as the inflight window allows. Expired messages are dropped here,
    /// the last moment before onward delivery starts (MQTT-3.3.2-5).
    pub fn poll(&mut self, now: Millis, stats: &mut Stats) -> (Option<Outgoing>, Vec<DropReason>) {
        let mut dropped = Vec::new();
        if !self.online {
            return (None, dropped);
        }
        if self.can_resend()
            && let Some(entry) = self.inflight.iter_mut().find(|e| !e.sent)
        {
            entry.sent = true;
            self.unsent -= 1;
            let out = match &entry.flight {
                Flight::Publish(item) => Outgoing::Publish(Delivery {
                    pkid: entry.pkid,
                    qos: item.qos,
                    dup: true,
                    retain: item.retain,
                    message: Arc::clone(&item.message),
                    subscription_ids: item.subscription_ids.clone(),
                }),
                Flight::Released => Outgoing::PubRel(entry.pkid),
            };
            return (Some(out), dropped);
        }
        while let Some(front) = self.queue.front() {
            if !self.can_send(front) {
                break;
            }
            let Some(item) = self.pop(stats) else { break };
            if item.message.expired(now) {
                dropped.push(DropReason::Expired);
                continue;
            }
            let pkid = if item.qos == QoS::AtMostOnce { 0 } else { self.next_pkid() };
            let seq = item.seq;
            let delivery = Delivery {
                pkid,
                qos: item.qos,
                dup: false,
                retain: item.retain,
                message: Arc::clone(&item.message),
                subscription_ids: item.subscription_ids.clone(),
            };
            if item.qos != QoS::AtMostOnce {
                // `pop` touched it: the store learns its packet id.
                self.inflight.push_back(InFlight { pkid, seq, flight: Flight::Publish(item), sent: true });
                stats.inflight_messages += 1;
            }
            return (Some(Outgoing::Publish(delivery)), dropped);
        }
        (None, dropped)
    }

    fn position(&self, pkid: u16, want: impl Fn(&Flight) -> bool) -> Option<usize> {
        self.inflight.iter().position(|e| e.pkid == pkid && want(&e.flight))
    }

    /// PUBACK for a QoS 1 delivery.
    pub fn puback(&mut self, pkid: u16, stats: &mut Stats) -> Ack {
        let found = self.position(pkid, |f| matches!(f, Flight::Publish(i) if i.qos == QoS::AtLeastOnce));
        self.complete(found, stats)
    }

    /// PUBREC for a QoS 2 delivery. `accepted` is false for a v5 reason
    /// code of 0x80 or more: the client refused it and the flow ends there.
    /// When accepted, the caller writes the PUBREL.
    pub fn pubrec(&mut self, pkid: u16, accepted: bool, stats: &mut Stats) -> Ack {
        let found = self.position(pkid, |f| matches!(f, Flight::Publish(i) if i.qos == QoS::ExactlyOnce));
        if !accepted {
            return self.complete(found, stats);
        }
        match found.and_then(|i| self.inflight.get_mut(i)) {
            Some(entry) => {
                entry.flight = Flight::Released;
                let seq = entry.seq;
                // The caller writes the PUBREL now; a resend is not owed.
                if !std::mem::replace(&mut entry.sent, true) {
                    self.unsent -= 1;
                }
                self.touch(QoS::ExactlyOnce, seq);
                Ack::Done
            }
            None => Ack::Unknown,
        }
    }

    /// PUBCOMP for a released QoS 2 delivery.
    pub fn pubcomp(&mut self, pkid: u16, stats: &mut Stats) -> Ack {
        let found = self.position(pkid, |f| matches!(f, Flight::Released));
        self.complete(found, stats)
    }

    fn complete(&mut self, found: Option<usize>, stats: &mut Stats) -> Ack {
        match found.and_then(|i| self.inflight.remove(i)) {
            Some(entry) => {
                if !entry.sent {
                    self.unsent -= 1;
                }
                self.touch(QoS::AtLeastOnce, entry.seq);
                stats.inflight_messages -= 1;
                Ack::Done
            }
            None => Ack::Unknown,
        }
    }

    /// A QoS 2 PUBLISH from the client with `pkid`.
    pub fn receive_qos2(&mut self, pkid: u16, max: usize) -> Received {
        if self.incoming.contains(&pkid) {
            Received::Duplicate
        } else if self.incoming.len() >= max {
            Received::TooMany
        } else {
            self.incoming.insert(pkid);
            Received::Fresh
        }
    }

    /// PUBREL from the client: whether `pkid` was waiting for it.
    pub fn release_qos2(&mut self, pkid: u16) -> bool {
        self.incoming.remove(&pkid)
    }

    /// The persisted form of the copy `seq`, if the session still holds it.
    pub fn stored(&self, seq: u64) -> Option<StoredItem> {
        let publish = |item: &Item, pkid| StoredItem::Publish {
            message: Arc::clone(&item.message),
            qos: item.qos,
            retain: item.retain,
            subscription_ids: item.subscription_ids.clone(),
            pkid,
        };
        // The window holds at most Receive Maximum entries; the queue is
        // in sequence order (copies are only ever appended).
        if let Some(entry) = self.inflight.iter().find(|e| e.seq == seq) {
            return Some(match &entry.flight {
                Flight::Publish(item) => publish(item, Some(entry.pkid)),
                Flight::Released => StoredItem::Released(entry.pkid),
            });
        }
        let at = self.queue.binary_search_by_key(&seq, |i| i.seq).ok()?;
        self.queue.get(at).filter(|i| i.qos != QoS::AtMostOnce).map(|i| publish(i, None))
    }

    /// Sequence numbers of every persisted copy it holds.
    pub fn persisted_seqs(&self) -> Vec<u64> {
        let window = self.inflight.iter().map(|e| e.seq);
        let queue = self.queue.iter().filter(|i| i.qos != QoS::AtMostOnce).map(|i| i.seq);
        window.chain(queue).collect()
    }

    /// The session's record for the store.
    pub fn state(&self) -> SessionState {
        let mut incoming_qos2: Vec<u16> = self.incoming.iter().copied().collect();
        incoming_qos2.sort_unstable();
        SessionState {
            client_id: Arc::clone(&self.client_id),
            expiry_secs: self.expiry_secs,
            subscriptions: self.subscriptions.iter().map(|(f, o)| (f.clone(), *o)).collect(),
            incoming_qos2,
        }
    }

    /// Puts back an entry read from the store (in sequence order, after
    /// the session itself): what was in flight is resent with DUP and its
    /// packet id on the next connection; what was queued waits its turn.
    pub fn restore(&mut self, seq: u64, stored: StoredItem, stats: &mut Stats) {
        let (pkid, flight) = match stored {
            StoredItem::Publish { message, qos, retain, subscription_ids, pkid } => {
                let item = Item { seq, message, qos, retain, subscription_ids };
                match pkid {
                    Some(pkid) => (pkid, Flight::Publish(item)),
                    None => {
                        let size = item.message.size();
                        self.queued_bytes += size;
                        stats.queued_messages += 1;
                        stats.queued_bytes += size as u64;
                        self.queue.push_back(item);
                        return;
                    }
                }
            }
            StoredItem::Released(pkid) => (pkid, Flight::Released),
        };
        self.inflight.push_back(InFlight { pkid, seq, flight, sent: false });
        self.unsent += 1;
        stats.inflight_messages += 1;
    }

    /// Drops the oldest queued copies until the queue is within `bounds`
    /// (a restart with lower bounds than the store was written under);
    /// returns how many.
    pub fn fit(&mut self, bounds: Bounds, stats: &mut Stats) -> usize {
        let mut dropped = 0;
        while self.queue.len() > bounds.max_messages || self.queued_bytes > bounds.max_bytes {
            let Some(item) = self.queue.pop_front() else { break };
            self.forget(&item, stats);
            dropped += 1;
        }
        dropped
    }

    /// Restores the incoming QoS 2 ids a PUBREC was sent for.
    pub fn restore_incoming(&mut self, ids: &[u16]) {
        self.incoming.extend(ids.iter().copied());
    }

    /// Empties the queue and the window (the session ends); returns how
    /// many messages that loses.
    pub fn clear(&mut self, stats: &mut Stats) -> u64 {
        let mut lost = 0;
        while self.pop(stats).is_some() {
            lost += 1;
        }
        for entry in self.inflight.drain(..) {
            stats.inflight_messages -= 1;
            if matches!(entry.flight, Flight::Publish(_)) {
                lost += 1;
            }
        }
        self.unsent = 0;
        lost
    }
}
