//! What the router counts: gauges of what it holds and every drop by reason.

/// Why a message did not reach a subscriber. Every drop is one of these,
/// counted in [`Stats::drops`] and logged once per interval per client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The session's queue was full and the dropped message was QoS 0
    /// (QoS 0 goes first, new or queued).
    QueueFullQos0,
    /// The session's queue was full of QoS 1/2 messages: the oldest went.
    QueueFullOldest,
    /// The message alone is larger than the session's byte bound.
    TooLargeForQueue,
    /// Its Message Expiry Interval ran out before it could be sent.
    Expired,
    /// QoS 0 for a session that is offline (not queued, as in Mosquitto's
    /// default).
    OfflineQos0,
    /// The session ended with the message still queued or unacknowledged:
    /// it expired, or a clean start replaced it.
    SessionEnded,
    /// A retained message the retained store had no room for.
    RetainedFull,
    /// Queued for a session whose client may no longer read its topic
    /// (the ACL changed while it was away): dropped when it came back.
    NotAllowed,
}

impl DropReason {
    /// Every reason, in metric order.
    pub const ALL: [DropReason; 8] = [
        Self::QueueFullQos0,
        Self::QueueFullOldest,
        Self::TooLargeForQueue,
        Self::Expired,
        Self::OfflineQos0,
        Self::SessionEnded,
        Self::RetainedFull,
        Self::NotAllowed,
    ];

    /// The label in metrics and logs.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFullQos0 => "queue_full_qos0",
            Self::QueueFullOldest => "queue_full_oldest",
            Self::TooLargeForQueue => "too_large_for_queue",
            Self::Expired => "expired",
            Self::OfflineQos0 => "offline_qos0",
            Self::SessionEnded => "session_ended",
            Self::RetainedFull => "retained_full",
            Self::NotAllowed => "not_allowed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The router's counters and gauges, kept up to date by every call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sessions with a connection.
    pub sessions_online: u64,
    /// Persistent sessions without one.
    pub sessions_offline: u64,
    /// Subscriptions held (a shared group's members each count).
    pub subscriptions: u64,
    /// Retained messages held.
    pub retained_messages: u64,
    /// Their topic and payload bytes.
    pub retained_bytes: u64,
    /// Messages waiting in session queues (not yet sent).
    pub queued_messages: u64,
    /// Their topic and payload bytes.
    pub queued_bytes: u64,
    /// QoS 1/2 messages sent and not yet acknowledged.
    pub inflight_messages: u64,
    /// Publishes routed.
    pub published: u64,
    /// Copies handed to sessions (queued or sent).
    pub delivered: u64,
    /// Publishes that matched no subscription.
    pub unmatched: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Stats {
    /// Drops for one reason.
    #[must_use]
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.index()).copied().unwrap_or(0)
    }

    /// Drops for every reason.
    #[must_use]
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub(crate) fn count_drop(&mut self, reason: DropReason, n: u64) {
        if let Some(c) = self.drops.get_mut(reason.index()) {
            *c += n;
        }
    }
}
