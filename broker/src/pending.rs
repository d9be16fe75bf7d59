//! Connections that have not finished logging in, bounded overall and per
//! source address.
//!
//! A socket that connects and says nothing holds a connection slot until
//! `limits.connect_timeout_ms`; one that sends a wrong password holds it
//! for the refusal delay. An outside attack re-opened idle sockets from one
//! address as fast as the deadline closed them and kept 25 of 30 device
//! logins out of a 50-connection broker. Two rules stop that:
//!
//! * logins in progress, all addresses together, may hold only a share of
//!   `max_connections` (`max_pending_logins_percent`); the rest is kept for
//!   sessions that logged in;
//! * once half of that share is in use, an address already holding
//!   `max_pending_logins_per_address` (or half the share, if that is less)
//!   gets no more. Below half, an address may have as many as it likes — a
//!   NAT'd fleet reconnecting, a benchmark on loopback — so the cap only
//!   bites when there is something to protect, and one address never holds
//!   more than half the share.
//!
//! IPv6 addresses are grouped by their /64: that is what one subscriber
//! line usually gets, and counting single addresses there would cap
//! nothing. IPv4-mapped IPv6 addresses count as the IPv4 address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;

/// Whose logins are counted together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// One IPv4 address.
    V4(u32),
    /// One IPv6 /64 prefix.
    V6(u64),
}

impl Origin {
    /// The origin of a peer address.
    pub fn of(ip: IpAddr) -> Origin {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Origin::V4(u32::from(v4)),
            IpAddr::V6(v6) => Origin::V6(u64::try_from(u128::from(v6) >> 64).unwrap_or(u64::MAX)),
        }
    }
}

/// Why a new connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The share of slots for logins in progress is used up.
    Full,
    /// The share is under pressure and this origin holds its cap.
    Origin,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_origin: HashMap<Origin, usize>,
}

/// The logins in progress.
#[derive(Debug)]
pub struct PendingLogins {
    capacity: usize,
    per_origin: usize,
    counts: Mutex<Counts>,
    metrics: Arc<Metrics>,
}

impl PendingLogins {
    /// Room for `percent` of `max_connections` (at least one), at most
    /// `per_origin` per origin under pressure.
    pub fn new(max_connections: usize, percent: u32, per_origin: usize, metrics: Arc<Metrics>) -> Arc<PendingLogins> {
        let share = max_connections.saturating_mul(usize::try_from(percent.min(100)).unwrap_or(100)) / 100;
        Arc::new(PendingLogins {
            capacity: share.max(1),
            per_origin: per_origin.max(1),
            counts: Mutex::default(),
            metrics,
        })
    }

    /// How many logins may be in progress at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Admits one more login from `ip`; it stays counted until the
    /// returned [`Pending`] is dropped.
    ///
    /// # Errors
    /// [`Refused`] saying which rule refused it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Pending, Refused> {
        let origin = Origin::of(ip);
        let Ok(mut counts) = self.counts.lock() else { return Err(Refused::Full) };
        if counts.total >= self.capacity {
            return Err(Refused::Full);
        }
        let held = counts.by_origin.get(&origin).copied().unwrap_or(0);
        let half = self.capacity.div_ceil(2);
        let pressure = counts.total >= half;
        if pressure && held >= self.per_origin.min(half) {
            return Err(Refused::Origin);
        }
        counts.total += 1;
        counts.by_origin.insert(origin, held + 1);
        Metrics::inc(&self.metrics.logins_in_progress);
        Ok(Pending { logins: self.clone(), origin })
    }

    /// Logins in progress now.
    pub fn in_progress(&self) -> usize {
        self.counts.lock().map(|c| c.total).unwrap_or(0)
    }

    fn release(&self, origin: Origin) {
        let Ok(mut counts) = self.counts.lock() else { return };
        counts.total = counts.total.saturating_sub(1);
        Metrics::dec(&self.metrics.logins_in_progress);
        if let Some(n) = counts.by_origin.get_mut(&origin) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.by_origin.remove(&origin);
            }
        }
    }
}

/// One login in progress; dropping it (logged in, refused, or gone) frees
/// its place.
#[derive(Debug)]
pub struct Pending {
    logins: Arc<PendingLogins>,
    origin: Origin,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.logins.release(self.origin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The outside attack's shape: one address opens idle sockets without
    /// end. It gets half the share (the rest of that half only while
    /// nobody else needs it), and another address still gets in.
    #[test]
    fn one_address_cannot_take_every_login_slot() {
        let logins = PendingLogins::new(50, 25, 16, Arc::default());
        assert_eq!(logins.capacity(), 12);
        let mut attacker = Vec::new();
        while let Ok(p) = logins.admit(ip("127.0.0.1")) {
            attacker.push(p);
        }
        assert_eq!(attacker.len(), 6, "half of 12 (the cap of 16 is above it)");
        assert_eq!(logins.admit(ip("127.0.0.1")).unwrap_err(), Refused::Origin);
        let devices: Vec<_> = (0..6).map(|_| logins.admit(ip("127.0.0.2")).unwrap()).collect();
        assert_eq!(logins.admit(ip("127.0.0.3")).unwrap_err(), Refused::Full, "the share itself is bounded");
        drop(devices);
        assert!(logins.admit(ip("127.0.0.3")).is_ok(), "released on drop");
        drop(attacker);
        assert_eq!(logins.in_progress(), 0);
    }

    #[test]
    fn without_pressure_an_address_is_not_capped() {
        let logins = PendingLogins::new(20_000, 25, 16, Arc::default());
        let held: Vec<_> = (0..100).map(|_| logins.admit(ip("10.0.0.1")).unwrap()).collect();
        assert_eq!(held.len(), 100);
        // Under pressure, an address above its cap is refused, one below
        // it is not.
        let filler: Vec<_> =
            (0..2_400).map(|i| logins.admit(IpAddr::from([10, 1, (i / 250) as u8, i as u8])).unwrap()).collect();
        assert_eq!(logins.admit(ip("10.0.0.1")).unwrap_err(), Refused::Origin);
        assert!(logins.admit(ip("10.2.0.1")).is_ok());
        drop(filler);
    }

    #[test]
    fn ipv6_counts_by_prefix_and_mapped_ipv4_as_ipv4() {
        assert_eq!(Origin::of(ip("2001:db8:1:2::1")), Origin::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(Origin::of(ip("2001:db8:1:2::1")), Origin::of(ip("2001:db8:1:3::1")));
        assert_eq!(Origin::of(ip("::ffff:192.0.2.7")), Origin::of(ip("192.0.2.7")));
    }
}
