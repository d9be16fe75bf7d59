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

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    locked_until: Option<Instant>,
    last_failure: Instant,
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

    /// When `key` is locked at `now`, the time the lock ends.
    pub fn locked(&self, key: &K, now: Instant) -> Option<Instant> {
        let entries = self.entries.lock().ok()?;
        entries.get(key).and_then(|e| e.locked_until).filter(|until| *until > now)
    }

    /// Records a failure; returns the lock end if this failure locks the key.
    pub fn fail(&self, key: &K, now: Instant) -> Option<Instant> {
        let Ok(mut entries) = self.entries.lock() else { return None };
        if !entries.contains_key(key) && entries.len() >= self.capacity {
            self.evict(&mut entries, now);
        }
        let policy = self.policy;
        let entry = entries.entry(key.clone()).or_insert(Entry { failures: 0, locked_until: None, last_failure: now });
        if now.saturating_duration_since(entry.last_failure) > policy.forget_after {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = now;
        if entry.failures > policy.free_failures {
            let doublings = (entry.failures - policy.free_failures - 1).min(20);
            let delay = policy.base_delay.saturating_mul(1u32 << doublings).min(policy.max_delay);
            let until = now + delay;
            entry.locked_until = Some(until);
            Some(until)
        } else {
            None
        }
    }

    /// Clears `key` after a successful login.
    pub fn succeed(&self, key: &K) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(key);
        }
    }

    /// Drops forgotten entries, then the oldest quarter if still full.
    fn evict(&self, entries: &mut HashMap<K, Entry>, now: Instant) {
        let forget = self.policy.forget_after;
        entries.retain(|_, e| {
            now.saturating_duration_since(e.last_failure) <= forget || e.locked_until.is_some_and(|u| u > now)
        });
        if entries.len() >= self.capacity {
            let mut ages: Vec<(K, Instant)> = entries.iter().map(|(k, e)| (k.clone(), e.last_failure)).collect();
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

    #[test]
    fn lockouts_grow_and_cap_and_end() {
        let t = Throttle::new(policy(), 100);
        let now = Instant::now();
        assert_eq!(t.fail(&"u", now), None);
        assert_eq!(t.fail(&"u", now), None);
        assert_eq!(t.fail(&"u", now), Some(now + Duration::from_secs(1)));
        assert_eq!(t.fail(&"u", now), Some(now + Duration::from_secs(2)));
        assert_eq!(t.fail(&"u", now), Some(now + Duration::from_secs(4)));
        assert_eq!(t.fail(&"u", now), Some(now + Duration::from_secs(8)));
        assert_eq!(t.fail(&"u", now), Some(now + Duration::from_secs(8)));
        assert!(t.locked(&"u", now + Duration::from_secs(7)).is_some());
        assert!(t.locked(&"u", now + Duration::from_secs(8)).is_none());
        assert!(t.locked(&"other", now).is_none());
        t.succeed(&"u");
        assert!(t.locked(&"u", now).is_none());
    }

    #[test]
    fn counts_are_forgotten_and_the_table_is_bounded() {
        let t = Throttle::new(policy(), 8);
        let now = Instant::now();
        t.fail(&0u32, now);
        t.fail(&0u32, now);
        // A failure long after the last one starts from zero.
        assert_eq!(t.fail(&0u32, now + Duration::from_secs(61)), None);
        for k in 1..100u32 {
            t.fail(&k, now + Duration::from_secs(62));
        }
        assert!(t.len() <= 8);
    }
}
