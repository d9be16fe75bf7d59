//! Login throttling: growing lockouts after failed logins, per username and
//! per source address.
//!
//! After `free_failures` failures a key is locked for `base_delay`, and each
//! further failure doubles the lock up to `max_delay`. While a key is locked
//! *every* login on it is refused, a correct password included — otherwise
//! the lock would only slow an attacker down between guesses and still
//! confirm the right one. A success clears the username's count (not the
//! address's: one valid account must not launder an address's guesses).
//! Counts are forgotten after `forget_after` without failures, and the table
//! is bounded: when full, the entries idle longest are dropped first.
//!
//! # Attempts in flight
//!
//! A check takes time (PBKDF2, then the refusal floor), and a failure is
//! only known at its end. Counting failures alone would let a burst of
//! CONNECTs sent back to back all pass the "locked?" test before the first
//! one failed — an outside attack got 78 checked guesses per lockout that
//! way. So a login first [`reserve`](Throttle::reserve)s its check, and the
//! checks still running count against the budget: while any is in flight,
//! another is admitted only if the failures so far plus those in flight
//! stay below `free_failures`. Beyond that it *waits* for the checks in
//! flight to end (within the login's deadline): if they succeed — a fleet
//! behind one NAT address, parallel `mqseal send`s of one account — it goes
//! on; if their failures spend the budget, it is refused unchecked, the
//! right password included. And once a key has seen logins wait, the
//! failure that spends its free failures locks it at once (for
//! `base_delay`), so that a straggler of the same burst, arriving after
//! the checks ended, is not taken for an attempt made on its own. A burst
//! therefore gets at most `free_failures` checks; one attempt at a time
//! gets exactly what it got before (the free failures, then the one whose
//! failure locks, then one per lockout).

use std::collections::HashMap;
use std::hash::Hash;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Limits for one kind of key.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Failures allowed before the first lockout.
    pub free_failures: u32,
    /// First lockout.
    pub base_delay: Duration,
    /// Longest lockout.
    pub max_delay: Duration,
    /// A key with no failure for this long starts again from zero.
    pub forget_after: Duration,
}

#[derive(Clone, Debug)]
struct Entry {
    failures: u32,
    /// Checks reserved and not yet ended.
    in_flight: u32,
    locked_until: Option<Instant>,
    last_failure: Instant,
    /// Wakes logins waiting for a check in flight to end.
    ended: Arc<Notify>,
    /// Logins had to wait since the last success: concurrent attempts
    /// beyond the free failures, a burst.
    contended: bool,
}

impl Entry {
    fn failures_at(&self, now: Instant, policy: &Policy) -> u32 {
        if now.saturating_duration_since(self.last_failure) > policy.forget_after { 0 } else { self.failures }
    }
}

/// What [`Throttle::reserve`] decided.
#[derive(Debug)]
pub enum Reservation {
    /// Go ahead; end it with [`Throttle::end`].
    Admitted,
    /// Locked out, or the budget is spent: refuse without checking.
    Locked,
    /// Checks in flight hold the budget: ask again when one ends.
    Wait(Arc<Notify>),
}

/// How a reserved check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Wrong credentials: counts as a failure.
    Failed,
    /// Right credentials: clears the key's failures.
    Cleared,
    /// Neither (the store was down, the login was abandoned, or the key
    /// kind is not cleared by a success): only the reservation ends.
    Neither,
}

/// Failure counts for keys of type `K` (usernames or IP addresses).
pub struct Throttle<K> {
    policy: Policy,
    capacity: usize,
    entries: Mutex<HashMap<K, Entry>>,
}

impl<K: Eq + Hash + Clone> Throttle<K> {
    /// An empty table holding at most `capacity` keys.
    pub fn new(policy: Policy, capacity: usize) -> Self {
        Throttle { policy, capacity: capacity.max(1), entries: Mutex::new(HashMap::new()) }
    }

    /// Decides on one check for `key` at `now` (see the module docs).
    /// `waited` says whether this login already had to wait: one that
    /// arrived while checks were in flight never gets the attempt whose
    /// failure locks — that one is for attempts made one at a time.
    /// [`Reservation::Admitted`] must be followed by exactly one
    /// [`end`](Self::end).
    pub fn reserve(&self, key: &K, now: Instant, waited: bool) -> Reservation {
        let Ok(mut entries) = self.entries.lock() else { return Reservation::Locked };
        let policy = self.policy;
        if let Some(e) = entries.get_mut(key) {
            if e.locked_until.is_some_and(|until| until > now) {
                return Reservation::Locked;
            }
            let failures = e.failures_at(now, &policy);
            let admit = if e.in_flight == 0 {
                !waited || failures < policy.free_failures
            } else {
                failures.saturating_add(e.in_flight) < policy.free_failures
            };
            if admit {
                e.in_flight = e.in_flight.saturating_add(1);
                return Reservation::Admitted;
            }
            if e.in_flight == 0 {
                return Reservation::Locked;
            }
            e.contended = true;
            return Reservation::Wait(e.ended.clone());
        }
        if entries.len() >= self.capacity {
            self.evict(&mut entries, now);
        }
        let entry = Entry {
            failures: 0,
            in_flight: 1,
            locked_until: None,
            last_failure: now,
            ended: Arc::new(Notify::new()),
            contended: false,
        };
        entries.insert(key.clone(), entry);
        Reservation::Admitted
    }

    /// [`reserve`](Self::reserve), waiting as long as it says to: `true`
    /// once admitted, `false` when refused. The caller bounds the wait (the
    /// login's deadline); an abandoned wait holds nothing.
    pub async fn reserve_waiting(&self, key: &K) -> bool {
        let mut waited = false;
        loop {
            let notify = match self.reserve(key, Instant::now(), waited) {
                Reservation::Admitted => return true,
                Reservation::Locked => return false,
                Reservation::Wait(notify) => notify,
            };
            waited = true;
            // Registered before asking again, so that a check ending in
            // between is not missed.
            let mut ended = pin!(notify.notified());
            ended.as_mut().enable();
            match self.reserve(key, Instant::now(), waited) {
                Reservation::Admitted => return true,
                Reservation::Locked => return false,
                Reservation::Wait(_) => ended.await,
            }
        }
    }

    /// Ends a check reserved with [`reserve`](Self::reserve). Returns the
    /// lock end if this failure locks the key.
    pub fn end(&self, key: &K, outcome: Outcome, now: Instant) -> Option<Instant> {
        let Ok(mut entries) = self.entries.lock() else { return None };
        let policy = self.policy;
        let entry = entries.get_mut(key)?;
        entry.in_flight = entry.in_flight.saturating_sub(1);
        entry.ended.notify_waiters();
        let mut locked = None;
        match outcome {
            Outcome::Neither => {}
            Outcome::Cleared => {
                entry.failures = 0;
                entry.locked_until = None;
            }
            Outcome::Failed => {
                entry.failures = entry.failures_at(now, &policy).saturating_add(1);
                entry.last_failure = now;
                let delay = if entry.failures > policy.free_failures {
                    let doublings = (entry.failures - policy.free_failures - 1).min(20);
                    Some(policy.base_delay.saturating_mul(1u32 << doublings).min(policy.max_delay))
                } else if entry.contended && entry.failures == policy.free_failures {
                    // A burst spent the free failures: lock now, as the
                    // next failure would, so no straggler gets that check.
                    Some(policy.base_delay)
                } else {
                    None
                };
                if let Some(delay) = delay {
                    // The configuration bounds max_delay (a week), so this
                    // cannot overflow; if it did, the lock stays as it was.
                    entry.locked_until = now.checked_add(delay).or(entry.locked_until);
                    locked = entry.locked_until;
                }
            }
        }
        // The burst is over once nothing is in flight: a lock it earned is
        // already set, and its waiters have been woken to see it.
        if entry.in_flight == 0 {
            entry.contended = false;
            if entry.failures == 0 && entry.locked_until.is_none() {
                entries.remove(key);
            }
        }
        locked
    }

    /// Drops forgotten entries, then the oldest quarter if still full.
    /// Entries with checks in flight stay: their reservations must end on
    /// the entry they started on.
    fn evict(&self, entries: &mut HashMap<K, Entry>, now: Instant) {
        let forget = self.policy.forget_after;
        entries.retain(|_, e| {
            e.in_flight > 0
                || now.saturating_duration_since(e.last_failure) <= forget
                || e.locked_until.is_some_and(|u| u > now)
        });
        if entries.len() >= self.capacity {
            let mut ages: Vec<(K, Instant)> =
                entries.iter().filter(|(_, e)| e.in_flight == 0).map(|(k, e)| (k.clone(), e.last_failure)).collect();
            ages.sort_by_key(|(_, t)| *t);
            for (k, _) in ages.into_iter().take(self.capacity / 4 + 1) {
                entries.remove(&k);
            }
        }
    }

    /// Number of keys tracked.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            free_failures: 2,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            forget_after: Duration::from_secs(60),
        }
    }

    fn admitted<K: Eq + Hash + Clone>(t: &Throttle<K>, key: &K, now: Instant) -> bool {
        matches!(t.reserve(key, now, false), Reservation::Admitted)
    }

    /// One attempt at a time: the check reserved (`None` if refused), then
    /// ended as a failure.
    fn fail<K: Eq + Hash + Clone>(t: &Throttle<K>, key: K, now: Instant) -> Option<Option<Instant>> {
        admitted(t, &key, now).then(|| t.end(&key, Outcome::Failed, now))
    }

    #[test]
    fn lockouts_grow_and_cap_and_end() {
        let t = Throttle::new(policy(), 100);
        let now = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(fail(&t, "u", now), Some(None));
        assert_eq!(fail(&t, "u", now), Some(None));
        assert_eq!(fail(&t, "u", now), Some(Some(now + s(1))), "2 free, the third locks");
        assert_eq!(fail(&t, "u", now), None, "locked: not even checked");
        assert_eq!(fail(&t, "u", now + s(1)), Some(Some(now + s(1) + s(2))));
        assert_eq!(fail(&t, "u", now + s(3)), Some(Some(now + s(3) + s(4))));
        assert_eq!(fail(&t, "u", now + s(7)), Some(Some(now + s(7) + s(8))));
        assert_eq!(fail(&t, "u", now + s(14)), None, "still locked");
        assert_eq!(fail(&t, "u", now + s(15)), Some(Some(now + s(15) + s(8))), "16 s, capped at 8");
        assert!(!admitted(&t, &"u", now + s(22)));
        assert!(admitted(&t, &"other", now));
        t.end(&"other", Outcome::Neither, now);
        assert!(admitted(&t, &"u", now + s(23)));
        t.end(&"u", Outcome::Cleared, now + s(23));
        assert!(admitted(&t, &"u", now + s(23)) && admitted(&t, &"u", now + s(23)), "a success clears the count");
    }

    /// The outside attack's burst: many checks reserved before any ends.
    /// Only the free failures are admitted; the rest wait, and once the
    /// burst's failures land they are refused unchecked — the right
    /// password among them too. One attempt at a time afterwards gets the
    /// check whose failure locks, as before.
    #[test]
    fn checks_in_flight_count_against_the_budget() {
        let t = Throttle::new(policy(), 100);
        let now = Instant::now();
        let decisions: Vec<Reservation> = (0..40).map(|_| t.reserve(&"u", now, false)).collect();
        let admitted_n = decisions.iter().filter(|d| matches!(d, Reservation::Admitted)).count();
        assert_eq!(admitted_n, 2, "free_failures = 2");
        assert!(decisions.iter().skip(2).all(|d| matches!(d, Reservation::Wait(_))), "the rest wait");
        assert_eq!(t.end(&"u", Outcome::Failed, now), None);
        assert!(matches!(t.reserve(&"u", now, true), Reservation::Wait(_)), "one failure, one in flight");
        assert_eq!(t.end(&"u", Outcome::Failed, now), Some(now + Duration::from_secs(1)), "locked at once");
        // The burst's failures spent the budget: it is locked at once, its
        // waiters refused, and a straggler arriving on its own too.
        assert!(matches!(t.reserve(&"u", now, true), Reservation::Locked));
        assert!(!admitted(&t, &"u", now), "a straggler of the burst");
        // After the lock, an attempt made on its own is checked, as before.
        let later = now + Duration::from_secs(1);
        assert!(admitted(&t, &"u", later));
        assert_eq!(t.end(&"u", Outcome::Failed, later), Some(later + Duration::from_secs(1)));
        assert!(!admitted(&t, &"u", later));
        // An abandoned check (login timeout, store down) frees its slot
        // without counting.
        let t = Throttle::new(policy(), 100);
        assert!(admitted(&t, &"v", now) && admitted(&t, &"v", now));
        t.end(&"v", Outcome::Neither, now);
        t.end(&"v", Outcome::Neither, now);
        assert_eq!(t.len(), 0);
    }

    /// The review's case: logins that succeed — a fleet behind one NAT
    /// address, parallel sends of one account — are delayed behind the
    /// checks in flight, never refused.
    #[tokio::test]
    async fn concurrent_good_logins_wait_and_go_on() {
        let t = Arc::new(Throttle::new(policy(), 100));
        let now = Instant::now();
        assert!(admitted(&t, &"u", now) && admitted(&t, &"u", now));
        let waiting: Vec<_> = (0..10)
            .map(|_| {
                let t = t.clone();
                tokio::spawn(async move {
                    let ok = t.reserve_waiting(&"u").await;
                    if ok {
                        t.end(&"u", Outcome::Cleared, Instant::now());
                    }
                    ok
                })
            })
            .collect();
        tokio::task::yield_now().await;
        t.end(&"u", Outcome::Cleared, now);
        t.end(&"u", Outcome::Cleared, now);
        for w in waiting {
            assert!(tokio::time::timeout(Duration::from_secs(5), w).await.unwrap().unwrap(), "refused a good login");
        }
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn counts_are_forgotten_and_the_table_is_bounded() {
        let t = Throttle::new(policy(), 8);
        let now = Instant::now();
        fail(&t, 0u32, now).expect("admitted");
        fail(&t, 0u32, now).expect("admitted");
        // A failure long after the last one starts from zero.
        assert_eq!(fail(&t, 0u32, now + Duration::from_secs(61)), Some(None));
        // A check in flight survives eviction.
        assert!(admitted(&t, &1000, now + Duration::from_secs(62)));
        for k in 1..100u32 {
            fail(&t, k, now + Duration::from_secs(62)).expect("admitted");
        }
        assert!(t.len() <= 8);
        assert_eq!(t.end(&1000, Outcome::Neither, now + Duration::from_secs(62)), None);
    }
}
