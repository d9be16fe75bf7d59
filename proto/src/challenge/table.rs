//! The device's table of outstanding challenges.

use rand_core::CryptoRng;

use crate::limits::{CHALLENGE_LEN, MSG_ID_LEN};
use crate::{Error, MsgId, Result};

/// A bounded set of outstanding, single-use challenges, and the message ids
/// of the last commands verified against them.
///
/// A plain struct with `N` slots and no allocation, so a microcontroller can
/// keep it in a `static` or on its stack. Several slots let two controllers
/// (or one controller and a retry) work at once; when all are taken, the
/// oldest challenge is evicted, which bounds what a flood of challenge
/// requests can cost the device — it can only make honest controllers retry.
///
/// Why the message ids: a controller that cannot tell whether its challenge
/// was genuine (challenges are not authenticated) or still outstanding (a
/// flood of requests may have evicted it) sends *copies* of one command —
/// the same header and message id — tagged over other challenges it
/// obtained (docs/PROTOCOL.md §6.5). Each copy verifies on its own, so the
/// device must recognise the message id to run the command once: the table
/// remembers the id and expiry of up to `M` commands it verified (`N`
/// unless the type says otherwise) and refuses another with one of them
/// ([`Error::Replayed`](crate::Error::Replayed)). A device that
/// deduplicates commands itself, with more memory, may choose `M = 0`
/// (`mqseal-agent` keeps a journal on disk, with the same floor rule).
///
/// Forgetting must never let a copy through — a malicious broker can hold
/// one back for as long as some challenge stays outstanding, and a
/// controller may ask for a fresh challenge after the device forgot. So the
/// table forgets like the sealed replay cache: an entry whose command has
/// expired by the device's clock goes freely (its copies fail the time
/// check); otherwise the entry expiring soonest goes and raises a **floor**
/// to its `expires_at`, and every command expiring at or before the floor is
/// refused ([`Error::BeyondReplayWindow`](crate::Error::BeyondReplayWindow)).
/// The floor compares the controllers' own `expires_at` values, so it works
/// on a device without a clock. Its price, as for sealed mode: with more
/// than `M` commands alive at once, an honest command expiring no later
/// than one forgotten — a shorter lifetime, or the same second when more
/// than `M` commands arrive within one — is refused; a copy never runs.
///
/// Time is a caller-supplied *monotonic* millisecond count (uptime, a tick
/// counter), not wall-clock time: challenge mode needs no real-time clock. A
/// device with no timer at all may pass `0` every time; challenges then never
/// expire by time and are only retired by use or eviction.
#[derive(Debug, Clone)]
pub struct ChallengeTable<const N: usize, const M: usize = N> {
    // Parallel arrays rather than `[Option<(value, time)>; N]`: an
    // `Option` beside a `u64` pads every entry to 32 bytes, these are 25.
    // On a microcontroller the table is most of the agent's memory.
    /// Outstanding challenges: the slots that are `taken`.
    values: [[u8; CHALLENGE_LEN]; N],
    issued_ms: [u64; N],
    taken: [bool; N],
    /// Message ids and expiries of verified commands: the entries that
    /// are `executed`.
    ids: [MsgId; M],
    expiries: [u64; M],
    executed: [bool; M],
    /// Commands expiring at or before this are refused: a forgotten
    /// entry's copies stay out.
    floor: u64,
    lifetime_ms: u64,
}

impl<const N: usize, const M: usize> ChallengeTable<N, M> {
    const NOT_EMPTY: () = assert!(N > 0, "a challenge table needs at least one slot");

    /// An empty table whose challenges live `lifetime_ms` milliseconds.
    #[must_use]
    pub const fn new(lifetime_ms: u64) -> Self {
        let () = Self::NOT_EMPTY;
        ChallengeTable {
            values: [[0; CHALLENGE_LEN]; N],
            issued_ms: [0; N],
            taken: [false; N],
            ids: [MsgId([0; MSG_ID_LEN]); M],
            expiries: [0; M],
            executed: [false; M],
            floor: 0,
            lifetime_ms,
        }
    }

    /// How long a challenge stays valid, in milliseconds.
    #[must_use]
    pub const fn lifetime_ms(&self) -> u64 {
        self.lifetime_ms
    }

    /// Whether slot `i` holds a challenge still valid at `now_ms`.
    fn live(&self, i: usize, now_ms: u64) -> bool {
        let issued = self.issued_ms.get(i).copied().unwrap_or(0);
        self.taken.get(i).copied().unwrap_or(false) && now_ms.saturating_sub(issued) < self.lifetime_ms
    }

    /// Draws a fresh challenge and remembers it, evicting an expired or else
    /// the oldest one when the table is full.
    pub fn issue<R: CryptoRng + ?Sized>(&mut self, rng: &mut R, now_ms: u64) -> [u8; CHALLENGE_LEN] {
        let mut value = [0u8; CHALLENGE_LEN];
        rng.fill_bytes(&mut value);
        // A free or expired slot if there is one, else the oldest (the
        // first of equals).
        let mut victim = 0;
        let mut oldest = u64::MAX;
        for i in 0..N {
            if !self.live(i, now_ms) {
                victim = i;
                break;
            }
            // Strictly older: the first of equals stays (slot 0 when every
            // slot was issued at u64::MAX).
            let issued = self.issued_ms.get(i).copied().unwrap_or(0);
            if issued < oldest {
                oldest = issued;
                victim = i;
            }
        }
        if let (Some(v), Some(t), Some(taken)) =
            (self.values.get_mut(victim), self.issued_ms.get_mut(victim), self.taken.get_mut(victim))
        {
            *v = value;
            *t = now_ms;
            *taken = true;
        }
        value
    }

    /// Index of `challenge` if it is outstanding at `now_ms`.
    pub(crate) fn position(&self, challenge: &[u8; CHALLENGE_LEN], now_ms: u64) -> Option<usize> {
        // Challenges are public (they travel in clear), so a plain comparison
        // leaks nothing.
        (0..N).find(|&i| self.live(i, now_ms) && self.values.get(i) == Some(challenge))
    }

    /// Retires the challenge at `index`: single use.
    pub(crate) fn consume(&mut self, index: usize) {
        if let Some(t) = self.taken.get_mut(index) {
            *t = false;
        }
    }

    /// Refuses a command this table already verified, or one it cannot
    /// vouch for (expiring at or before the floor).
    ///
    /// # Errors
    /// [`Error::Replayed`], [`Error::BeyondReplayWindow`].
    pub fn check_executed(&self, id: &MsgId, expires_at: u64) -> Result<()> {
        if self.ids.iter().zip(&self.executed).any(|(e, &x)| x && e == id) {
            return Err(Error::Replayed);
        }
        if expires_at <= self.floor {
            return Err(Error::BeyondReplayWindow);
        }
        Ok(())
    }

    /// Remembers a verified command (nothing with `M = 0`). When all `M`
    /// entries are taken, one
    /// whose command `expired` (by the device's clock, if it has one) goes
    /// first; else the one expiring soonest goes and raises the floor.
    /// ([`ChallengeDevice::verify_command`](super::ChallengeDevice::verify_command)
    /// does this; a device that restores its memory calls it directly.)
    pub fn record_executed(&mut self, id: MsgId, expires_at: u64, expired: impl Fn(u64) -> bool) {
        // A free entry, else an expired one, else the one expiring soonest
        // (the first of equals), which raises the floor.
        let mut victim = None;
        let mut soonest: Option<(usize, u64)> = None;
        for i in 0..M {
            let exp = self.expiries.get(i).copied().unwrap_or(0);
            if !self.executed.get(i).copied().unwrap_or(false) || expired(exp) {
                victim = Some(i);
                break;
            }
            if soonest.is_none_or(|(_, s)| exp < s) {
                soonest = Some((i, exp));
            }
        }
        let victim = match (victim, soonest) {
            (Some(i), _) => i,
            (None, Some((i, exp))) => {
                self.floor = self.floor.max(exp);
                i
            }
            (None, None) => return,
        };
        if let (Some(slot), Some(e), Some(x)) =
            (self.ids.get_mut(victim), self.expiries.get_mut(victim), self.executed.get_mut(victim))
        {
            *slot = id;
            *e = expires_at;
            *x = true;
        }
    }

    /// Commands expiring at or before this are refused.
    #[must_use]
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Refuses, from now on, every command expiring at or before `floor`
    /// (the floor never goes down): for a device restoring its memory.
    pub fn raise_floor(&mut self, floor: u64) {
        self.floor = self.floor.max(floor);
    }

    /// Whether `challenge` is outstanding at `now_ms`.
    #[must_use]
    pub fn is_outstanding(&self, challenge: &[u8; CHALLENGE_LEN], now_ms: u64) -> bool {
        self.position(challenge, now_ms).is_some()
    }

    /// How many challenges are outstanding at `now_ms`.
    #[must_use]
    pub fn outstanding(&self, now_ms: u64) -> usize {
        (0..N).filter(|&i| self.live(i, now_ms)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counter RNG: good enough to tell challenges apart in a unit test.
    struct Counter(u8);
    impl rand_core::TryRng for Counter {
        type Error = core::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            Ok(0)
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            Ok(0)
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            self.0 += 1;
            dst.fill(self.0);
            Ok(())
        }
    }
    impl rand_core::TryCryptoRng for Counter {}

    #[test]
    fn challenges_are_single_use_and_expire() {
        let mut t = ChallengeTable::<2>::new(1000);
        let mut rng = Counter(0);
        let a = t.issue(&mut rng, 0);
        assert!(t.is_outstanding(&a, 999));
        assert!(!t.is_outstanding(&a, 1000), "expired at its lifetime");
        let i = t.position(&a, 10).unwrap();
        t.consume(i);
        assert!(!t.is_outstanding(&a, 10), "single use");
    }

    #[test]
    fn full_table_evicts_the_oldest() {
        let mut t = ChallengeTable::<3>::new(10_000);
        let mut rng = Counter(0);
        let a = t.issue(&mut rng, 1);
        let b = t.issue(&mut rng, 2);
        let c = t.issue(&mut rng, 3);
        assert_eq!(t.outstanding(3), 3);
        let d = t.issue(&mut rng, 4);
        assert!(!t.is_outstanding(&a, 4), "oldest evicted");
        for x in [b, c, d] {
            assert!(t.is_outstanding(&x, 4));
        }
    }

    #[test]
    fn expired_slots_are_reused_before_live_ones() {
        let mut t = ChallengeTable::<2>::new(100);
        let mut rng = Counter(0);
        let _old = t.issue(&mut rng, 0);
        let live = t.issue(&mut rng, 150);
        let _new = t.issue(&mut rng, 160);
        assert!(t.is_outstanding(&live, 160), "the expired slot was taken, not the live one");
        assert_eq!(t.outstanding(160), 2);
    }

    /// The review's case: a copy held back over a challenge that stays
    /// outstanding while newer commands push its id out. Forgetting raises
    /// the floor, so the copy is refused all the same; a command that has
    /// expired by the device's clock is forgotten without raising it.
    #[test]
    fn forgotten_message_ids_stay_refused() {
        let mut t = ChallengeTable::<2>::new(100);
        let id = |n| MsgId([n; 16]);
        let never = |_| false;
        t.record_executed(id(1), 160, never);
        t.record_executed(id(2), 150, never);
        assert_eq!(t.check_executed(&id(1), 160), Err(Error::Replayed));
        assert_eq!(t.check_executed(&id(3), 170), Ok(()));
        t.record_executed(id(3), 170, never);
        assert_eq!(t.floor(), 150, "the soonest-expiring went, raising the floor");
        assert_eq!(t.check_executed(&id(2), 150), Err(Error::BeyondReplayWindow), "its copy stays out");
        assert_eq!(t.check_executed(&id(1), 160), Err(Error::Replayed), "the longer-lived one is kept");
        assert_eq!(t.check_executed(&id(4), 151), Ok(()), "newer commands pass");
        // With a clock: an expired command goes without raising the floor.
        t.record_executed(id(4), 180, |exp| exp <= 160);
        assert_eq!(t.floor(), 150);
        assert_eq!(t.check_executed(&id(3), 170), Err(Error::Replayed));
    }

    #[test]
    fn clockless_devices_rely_on_eviction() {
        let mut t = ChallengeTable::<1>::new(1);
        let mut rng = Counter(0);
        let a = t.issue(&mut rng, 0);
        assert!(t.is_outstanding(&a, 0), "now = 0 forever: never expires by time");
        let _b = t.issue(&mut rng, 0);
        assert!(!t.is_outstanding(&a, 0));
    }
}
