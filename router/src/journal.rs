//! What a persistent store must write: the router's changes since the
//! last commit, kept as *dirty keys* rather than as a log.
//!
//! **Why dirty keys.** The router stays free of I/O: it does not write a
//! store, it remembers which persisted keys changed — a session's record,
//! one queued or inflight message of a session, a retained topic — and the
//! front's writer asks for them ([`crate::Router::take_changes`]) when it is
//! ready for its next group commit. The snapshot then carries each key's
//! *current* state, or its absence. That keeps the journal bounded by the
//! state it describes (a message queued, sent and acknowledged between two
//! commits is one key, written as one delete, not three records), and a
//! slow disk makes commits bigger, never the broker's memory unbounded.
//!
//! **What is persisted.** Sessions that outlive their connection (session
//! expiry above 0, or 3.1.1 without clean-session): their subscriptions,
//! their unreleased incoming QoS 2 packet ids, and every QoS 1/2 copy they
//! hold, queued or inflight, with its packet id once it has one. QoS 0 is
//! not: an offline session does not queue it (MQTT-3.1.2-… allows either),
//! and after a restart every session is offline. Retained messages, all of
//! them. Wills are not persisted (docs/ROUTER.md, "Persistence").
//!
//! **Durability.** [`crate::Router::journal_version`] counts the changes a
//! client's acknowledgement promises: a copy queued for a persistent
//! session (the publisher's PUBACK/PUBREC), a subscription (SUBACK), a new
//! or ended session (CONNACK), an incoming QoS 2 id (PUBREC), a retained
//! message, the release of an incoming QoS 2 id (PUBCOMP), and for QoS 2
//! deliveries the packet id a copy is sent with and its PUBREC (the
//! PUBLISH and the PUBREL): QoS 2 is exactly once across a crash only if
//! the client never sees a step the store could forget. Output that
//! answers from state an earlier, still uncommitted promise made (a PUBREC
//! for a duplicate QoS 2 PUBLISH, the CONNACK of a resumed persistent
//! session) *depends* on that version without making a new one
//! ([`crate::Router::take_journal_depends`]). A front in durable mode holds such
//! output until its writer has committed the version it needs. Deletes
//! after PUBACK and QoS 1 packet ids promise nothing: losing one to a crash
//! means a QoS 1 message is delivered again, which QoS 1 allows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::message::{Message, QoS, SubOptions};

/// One persisted entry of a session: a copy of a message, or the
/// PUBREL a QoS 2 delivery still owes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredItem {
    /// A copy, queued (`pkid` is `None`) or sent and not yet acknowledged
    /// by PUBACK or PUBREC.
    Publish {
        /// The message.
        message: Arc<Message>,
        /// The QoS it is delivered at.
        qos: QoS,
        /// The RETAIN flag as delivered.
        retain: bool,
        /// Subscription identifiers it is delivered with.
        subscription_ids: Box<[u32]>,
        /// Its packet id once sent.
        pkid: Option<u16>,
    },
    /// QoS 2 after PUBREC: PUBREL owed or sent, waiting for PUBCOMP.
    Released(u16),
}

/// A persistent session's record, without its messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionState {
    /// The client id.
    pub client_id: Arc<str>,
    /// Session Expiry Interval in seconds.
    pub expiry_secs: u32,
    /// Its subscriptions and their options.
    pub subscriptions: Vec<(Box<str>, SubOptions)>,
    /// Incoming QoS 2 packet ids answered with PUBREC and not yet released.
    pub incoming_qos2: Vec<u16>,
}

/// The changes since the last snapshot, each with its current state. The
/// writer applies them in field order within one transaction: `ended`
/// first, since a client id may have ended and started again in between.
#[derive(Debug, Default)]
pub struct Changes {
    /// The [`crate::Router::journal_version`] these changes bring the store
    /// to once committed.
    pub version: u64,
    /// Sessions that ended: delete the record and every message of that
    /// client id with a sequence number below the bound.
    pub ended: Vec<(Arc<str>, u64)>,
    /// Session records to write (put).
    pub sessions: Vec<SessionState>,
    /// Messages by (client id, sequence number): put when `Some`, delete
    /// when `None`.
    pub items: Vec<(Arc<str>, u64, Option<StoredItem>)>,
    /// Retained topics: put when `Some`, delete when `None`.
    pub retained: Vec<(Arc<str>, Option<Arc<Message>>)>,
}

impl Changes {
    /// Whether there is nothing to write.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ended.is_empty() && self.sessions.is_empty() && self.items.is_empty() && self.retained.is_empty()
    }

    /// How many keys it writes or deletes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ended.len() + self.sessions.len() + self.items.len() + self.retained.len()
    }
}

/// The dirty keys, held by the router while persistence is on.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    version: u64,
    /// Output written since the front last asked answered from state an
    /// earlier promise made.
    depends: bool,
    pub sessions: HashSet<Arc<str>>,
    pub ended: HashMap<Arc<str>, u64>,
    pub items: HashSet<(Arc<str>, u64)>,
    pub retained: HashSet<Arc<str>>,
}

impl Journal {
    /// A change a client's acknowledgement depends on.
    pub fn promise(&mut self) {
        self.version += 1;
    }

    /// Output that answers from the state as it is now, which an earlier
    /// promise may not have committed yet.
    pub fn depend(&mut self) {
        self.depends = true;
    }

    pub fn take_depends(&mut self) -> bool {
        std::mem::take(&mut self.depends)
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Empties the dirty sets, keeping the version.
    pub fn take(&mut self) -> Self {
        Self {
            version: self.version,
            depends: self.depends,
            sessions: std::mem::take(&mut self.sessions),
            ended: std::mem::take(&mut self.ended),
            items: std::mem::take(&mut self.items),
            retained: std::mem::take(&mut self.retained),
        }
    }
}
