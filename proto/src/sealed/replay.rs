//! The sealed-mode replay cache.

use crate::Text;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use super::KeyId;
use crate::{Error, MsgId, Policy, Result};

/// Format version of [`ReplayCache::export`]: 2 added the reset floor
/// (`not_before`); version 1 state is still read.
const STATE_VERSION: u8 = 2;

/// Remembers which `(sender key, message id)` pairs a device has accepted.
///
/// Bounded in memory, and never wrong in the dangerous direction:
///
/// * An entry is kept until its envelope could no longer pass the time check
///   (`expires_at + skew`), then forgotten.
/// * When the cache is full, the entry expiring soonest is evicted.
/// * Either way the cache raises a *floor* to the forgotten entry's expiry
///   and from then on refuses every envelope expiring at or before it
///   ([`Error::BeyondReplayWindow`]). A forgotten message id can therefore
///   never be replayed — not even if the device's clock is later set back —
///   and the price of a full cache is that an honest envelope with a very
///   short lifetime may be refused, never that a replay is accepted.
///
/// Only fully verified envelopes are recorded, so an attacker without a
/// trusted key cannot fill the cache. Agents persist it with
/// [`ReplayCache::export`] (fsync'd before executing) and reload it with
/// [`ReplayCache::restore`], so a replay is refused after a restart too.
///
/// A device whose saved cache is lost starts over with
/// [`refuse_issued_before`](Self::refuse_issued_before): a second floor, on
/// `issued_at`, that keeps everything issued before the loss out for good
/// while commands issued after it pass once the clock skew has gone by.
#[derive(Debug, Clone)]
pub struct ReplayCache {
    capacity: usize,
    policy: Policy,
    floor: u64,
    not_before: u64,
    seen: BTreeMap<(KeyId, MsgId), u64>,
    by_expiry: BTreeSet<(u64, KeyId, MsgId)>,
}

#[derive(Serialize, Deserialize)]
struct State {
    floor: u64,
    not_before: u64,
    entries: Vec<(KeyId, MsgId, u64)>,
}

/// Version 1 of [`State`], read for migration.
#[derive(Deserialize)]
struct StateV1 {
    floor: u64,
    entries: Vec<(KeyId, MsgId, u64)>,
}

impl ReplayCache {
    /// Default capacity: at the default 10-minute lifetime, a device can
    /// accept about 7 commands per second, sustained, before the floor starts
    /// refusing honest envelopes.
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// An empty cache holding at most `capacity` entries (at least one),
    /// forgetting entries by the rule of `policy`.
    #[must_use]
    pub fn new(capacity: usize, policy: Policy) -> Self {
        ReplayCache {
            capacity: capacity.max(1),
            policy,
            floor: 0,
            not_before: 0,
            seen: BTreeMap::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    /// Refuses an envelope already seen, or one too old to tell: expiring
    /// at or below the floor, or issued before the reset floor.
    ///
    /// # Errors
    /// [`Error::Replayed`], [`Error::BeyondReplayWindow`].
    pub fn check(&self, sender: &KeyId, msg_id: &MsgId, issued_at: u64, expires_at: u64) -> Result<()> {
        if self.seen.contains_key(&(*sender, *msg_id)) {
            return Err(Error::Replayed);
        }
        if expires_at <= self.floor || issued_at < self.not_before {
            return Err(Error::BeyondReplayWindow);
        }
        Ok(())
    }

    /// Records an accepted envelope.
    pub fn record(&mut self, sender: KeyId, msg_id: MsgId, expires_at: u64, now: u64) {
        self.forget_expired(now);
        while self.seen.len() >= self.capacity {
            if !self.forget_first() {
                break;
            }
        }
        if let Some(previous) = self.seen.insert((sender, msg_id), expires_at) {
            // Recorded twice (only a caller bypassing `check` can do this):
            // keep the two indexes in step.
            self.by_expiry.remove(&(previous, sender, msg_id));
        }
        self.by_expiry.insert((expires_at, sender, msg_id));
    }

    fn forget_expired(&mut self, now: u64) {
        while let Some(&(exp, _, _)) = self.by_expiry.first() {
            if self.policy.still_valid(exp, now) {
                break;
            }
            self.forget_first();
        }
    }

    /// Forgets the entry expiring soonest and raises the floor to it.
    fn forget_first(&mut self) -> bool {
        match self.by_expiry.pop_first() {
            Some((exp, sender, id)) => {
                self.seen.remove(&(sender, id));
                self.floor = self.floor.max(exp);
                true
            }
            None => false,
        }
    }

    /// Refuses, from now on, every envelope expiring at or before `floor`
    /// (the floor never goes down). An agent whose saved state is lost sets
    /// it past the expiry of anything it could have accepted before, so
    /// starting over never reopens a replay window.
    pub fn raise_floor(&mut self, floor: u64) {
        self.floor = self.floor.max(floor);
    }

    /// Envelopes expiring at or before this are refused.
    #[must_use]
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Refuses, from now on, every envelope issued before `not_before` (it
    /// never goes down). A device that lost its saved cache at time `now`
    /// passes `now + max_skew_secs`: whatever a controller issued before
    /// `now` carries an `issued_at` below that, as long as its clock is
    /// within the allowed skew, so no replay window reopens — and a command
    /// issued after it passes once the skew has gone by, not after a whole
    /// lifetime. The expiry floor could not do this: an old command with a
    /// long lifetime expires later than a new one with a short lifetime.
    pub fn refuse_issued_before(&mut self, not_before: u64) {
        self.not_before = self.not_before.max(not_before);
    }

    /// Envelopes issued before this are refused.
    #[must_use]
    pub fn not_before(&self) -> u64 {
        self.not_before
    }

    /// How many entries are held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no entry is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// The cache's state as bytes, for an agent to persist:
    /// `0x02 ‖ postcard { floor: varint, not_before: varint, entries: seq of (key id [32], msg id [16], expires_at varint) }`.
    ///
    /// # Errors
    /// [`Error::InvalidState`] if encoding fails, which encoding into a `Vec`
    /// does not short of memory exhaustion.
    pub fn export(&self) -> Result<Vec<u8>> {
        let state = State {
            floor: self.floor,
            not_before: self.not_before,
            entries: self.seen.iter().map(|(&(k, m), &e)| (k, m, e)).collect(),
        };
        let mut out = Vec::with_capacity(1 + 8 + state.entries.len() * 58);
        out.push(STATE_VERSION);
        postcard::to_extend(&state, out).map_err(|_| Error::InvalidState(Text(&"cannot encode")))
    }

    /// Rebuilds a cache from [`ReplayCache::export`]'s bytes.
    ///
    /// If the saved state holds more entries than `capacity`, the ones
    /// expiring soonest are forgotten through the floor, as at run time.
    ///
    /// # Errors
    /// [`Error::InvalidState`] naming what is wrong. An agent must treat this
    /// as fatal (refuse to execute) rather than start with an empty cache,
    /// which would accept replays.
    pub fn restore(bytes: &[u8], capacity: usize, policy: Policy, now: u64) -> Result<Self> {
        let undecodable = |_| Error::InvalidState(Text(&"undecodable"));
        let state: State = match bytes {
            [STATE_VERSION, body @ ..] => postcard::from_bytes(body).map_err(undecodable)?,
            [1, body @ ..] => {
                let v1: StateV1 = postcard::from_bytes(body).map_err(undecodable)?;
                State { floor: v1.floor, not_before: 0, entries: v1.entries }
            }
            [] => return Err(Error::InvalidState(Text(&"empty"))),
            _ => return Err(Error::InvalidState(Text(&"unknown format version"))),
        };
        let mut cache = ReplayCache::new(capacity, policy);
        cache.floor = state.floor;
        cache.not_before = state.not_before;
        for (k, m, e) in state.entries {
            cache.record(k, m, e, now);
        }
        Ok(cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy { max_skew_secs: 10, max_lifetime_secs: 100 };

    fn id(n: u8) -> MsgId {
        MsgId([n; 16])
    }

    #[test]
    fn replays_are_refused_and_expired_entries_forgotten() {
        let k = KeyId([1; 32]);
        let mut c = ReplayCache::new(8, P);
        c.record(k, id(1), 100, 50);
        assert_eq!(c.check(&k, &id(1), 0, 100), Err(Error::Replayed));
        assert_eq!(c.check(&KeyId([2; 32]), &id(1), 0, 100), Ok(()), "keyed by sender too");
        // At 110 the entry can no longer pass the time check: forgotten, and
        // the floor makes sure it stays refused.
        c.record(k, id(2), 200, 110);
        assert_eq!(c.len(), 1);
        assert_eq!(c.floor(), 100);
        assert_eq!(c.check(&k, &id(1), 0, 100), Err(Error::BeyondReplayWindow));
    }

    #[test]
    fn full_cache_evicts_soonest_expiring_and_raises_floor() {
        let k = KeyId([1; 32]);
        let mut c = ReplayCache::new(2, P);
        c.record(k, id(1), 105, 0);
        c.record(k, id(2), 103, 0);
        c.record(k, id(3), 104, 0);
        assert_eq!(c.len(), 2);
        assert_eq!(c.floor(), 103);
        assert_eq!(c.check(&k, &id(2), 0, 103), Err(Error::BeyondReplayWindow));
        assert_eq!(c.check(&k, &id(1), 0, 105), Err(Error::Replayed));
        assert_eq!(c.check(&k, &id(9), 0, 104), Ok(()), "fresh ids above the floor pass");
    }

    #[test]
    fn export_restore_round_trip() {
        let k = KeyId([7; 32]);
        let mut c = ReplayCache::new(16, P);
        for n in 0..5 {
            c.record(k, id(n), 100 + u64::from(n), 0);
        }
        let bytes = c.export().unwrap();
        let r = ReplayCache::restore(&bytes, 16, P, 0).unwrap();
        for n in 0..5 {
            assert_eq!(r.check(&k, &id(n), 0, 100 + u64::from(n)), Err(Error::Replayed));
        }
        // Smaller capacity on restore: the soonest-expiring are forgotten
        // through the floor, never silently.
        let r = ReplayCache::restore(&bytes, 2, P, 0).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.check(&k, &id(0), 0, 100), Err(Error::BeyondReplayWindow));
        assert_eq!(r.check(&k, &id(4), 0, 104), Err(Error::Replayed));
    }

    #[test]
    fn recording_twice_keeps_one_entry() {
        let k = KeyId([3; 32]);
        let mut c = ReplayCache::new(1, P);
        c.record(k, id(1), 100, 0);
        c.record(k, id(1), 150, 0);
        assert_eq!(c.len(), 1);
        // The stale expiry (100) is gone from the index: evicting now takes
        // the real entry and raises the floor to its real expiry.
        c.record(k, id(2), 200, 0);
        assert_eq!((c.len(), c.floor()), (1, 150));
    }

    #[test]
    fn the_floor_only_rises_and_survives_export() {
        let k = KeyId([4; 32]);
        let mut c = ReplayCache::new(4, P);
        c.raise_floor(500);
        c.raise_floor(100);
        assert_eq!(c.floor(), 500);
        assert_eq!(c.check(&k, &id(1), 0, 500), Err(Error::BeyondReplayWindow));
        assert_eq!(c.check(&k, &id(1), 0, 501), Ok(()));
        let r = ReplayCache::restore(&c.export().unwrap(), 4, P, 0).unwrap();
        assert_eq!(r.floor(), 500);
    }

    /// After a reset at 1000 with a 10 s skew: nothing issued before 1010
    /// passes, however long it lives; anything issued from then on does,
    /// whatever its lifetime. The floor survives export, and version 1
    /// state (without it) still loads.
    #[test]
    fn a_reset_refuses_what_was_issued_before_it_and_nothing_after() {
        let k = KeyId([5; 32]);
        let mut c = ReplayCache::new(4, P);
        c.refuse_issued_before(1000 + P.max_skew_secs);
        c.refuse_issued_before(500);
        assert_eq!(c.not_before(), 1010);
        assert_eq!(c.check(&k, &id(1), 1009, 1100), Err(Error::BeyondReplayWindow), "issued before: never");
        assert_eq!(c.check(&k, &id(1), 1010, 1011), Ok(()), "issued after, short-lived");
        assert_eq!(c.check(&k, &id(1), 1010, 1110), Ok(()), "issued after, long-lived");
        let r = ReplayCache::restore(&c.export().unwrap(), 4, P, 0).unwrap();
        assert_eq!(r.not_before(), 1010);
        let mut v1 = alloc::vec![1u8];
        v1 = postcard::to_extend(&(7u64, Vec::<(KeyId, MsgId, u64)>::new()), v1).unwrap();
        let r = ReplayCache::restore(&v1, 4, P, 0).unwrap();
        assert_eq!((r.floor(), r.not_before()), (7, 0));
    }

    #[test]
    fn corrupt_state_is_an_error() {
        assert_eq!(ReplayCache::restore(&[], 4, P, 0).unwrap_err(), Error::InvalidState(Text(&"empty")));
        assert_eq!(
            ReplayCache::restore(&[9, 0], 4, P, 0).unwrap_err(),
            Error::InvalidState(Text(&"unknown format version"))
        );
        assert_eq!(
            ReplayCache::restore(&[1, 0, 5, 1], 4, P, 0).unwrap_err(),
            Error::InvalidState(Text(&"undecodable"))
        );
        assert_eq!(
            ReplayCache::restore(&[2, 0, 0, 5, 1], 4, P, 0).unwrap_err(),
            Error::InvalidState(Text(&"undecodable"))
        );
    }
}
