//! Login decisions: store lookup with a short cache, throttling, constant
//! work for unknown users, the legacy upgrade, and fail-closed behaviour when
//! the store is down.
//!
//! The cache exists for reconnect storms (a network blip reconnects every
//! device within seconds; each would otherwise cost a MongoDB round trip).
//! It only ever *grants* within `cache_ttl`, and the periodic revalidation
//! (`revalidate`) re-reads every cached and live user, so a disabled user
//! stops being served from the cache within `revalidate_secs`. Refusals are
//! never cached: enabling a user works at once.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

use mqseal_store::{Algorithm, AnyStore, CredentialStore, Role, UserRecord, hash};
use zeroize::Zeroizing;

use crate::config::{AuthConfig, ThrottleConfig};
use crate::metrics::{LogEvery, Metrics};
use crate::pending::Origin;
use crate::throttle::{Outcome, Policy, Throttle};

/// Why a login was refused; each maps to its own CONNACK code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No username or no password.
    NoCredentials,
    /// Unknown user or wrong password (indistinguishable on purpose).
    BadCredentials,
    /// Right password, disabled user.
    Disabled,
    /// The username or the address is locked out after failures.
    Throttled,
    /// The store cannot be reached and nothing usable is cached.
    Unavailable,
}

impl Refusal {
    /// For log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoCredentials => "no credentials",
            Refusal::BadCredentials => "bad username or password",
            Refusal::Disabled => "user disabled",
            Refusal::Throttled => "locked out after failed logins",
            Refusal::Unavailable => "credential store unavailable",
        }
    }
}

/// Why a live session is being closed from the broker side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KickReason {
    /// The user was disabled.
    Disabled,
    /// The user was deleted.
    Deleted,
    /// The user's password changed (`mqseal device rotate`, `user passwd`):
    /// sessions opened with the old one must not outlive it.
    CredentialsChanged,
    /// The broker is shutting down.
    Shutdown,
}

struct Cached {
    record: UserRecord,
    fetched: Instant,
}

/// Decides logins.
pub struct Authenticator {
    store: Arc<AnyStore>,
    config: AuthConfig,
    cache: Mutex<HashMap<String, Cached>>,
    users: Throttle<String>,
    /// By source address; IPv6 by its /64, as the login share counts them.
    addresses: Throttle<Origin>,
    metrics: Arc<Metrics>,
    unavailable_log: LogEvery,
    hashing: Arc<Semaphore>,
}

/// A login's reserved check; ends with its outcome when dropped, however
/// the login ends (returned, refused, or abandoned mid-way by its
/// deadline).
struct Claim<'a> {
    auth: &'a Authenticator,
    user: String,
    /// The address's budget, once reserved.
    origin: Option<Origin>,
    outcome: Outcome,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        if self.auth.users.end(&self.user, self.outcome, now).is_some() {
            tracing::info!(user = %self.user.escape_debug(), "username locked out after failed logins");
        }
        // A success does not clear the address: one valid account must not
        // launder the guesses made from there.
        let address = if self.outcome == Outcome::Failed { Outcome::Failed } else { Outcome::Neither };
        if let Some(origin) = &self.origin
            && self.auth.addresses.end(origin, address, now).is_some()
        {
            tracing::info!(?origin, "address locked out after failed logins");
        }
    }
}

/// Entries kept per throttle table; beyond this the oldest are forgotten.
const THROTTLE_CAPACITY: usize = 100_000;

/// How many names one revalidation query asks for.
const REVALIDATE_BATCH: usize = 500;

impl Authenticator {
    /// An authenticator over `store`.
    pub fn new(store: Arc<AnyStore>, config: AuthConfig, throttle: &ThrottleConfig, metrics: Arc<Metrics>) -> Self {
        let policy = |free| Policy {
            free_failures: free,
            base_delay: Duration::from_millis(throttle.base_delay_ms),
            max_delay: Duration::from_secs(throttle.max_delay_secs),
            forget_after: Duration::from_secs(throttle.forget_after_secs),
        };
        Authenticator {
            store,
            config,
            cache: Mutex::new(HashMap::new()),
            users: Throttle::new(policy(throttle.user_free_failures), THROTTLE_CAPACITY),
            addresses: Throttle::new(policy(throttle.address_free_failures), THROTTLE_CAPACITY),
            metrics,
            unavailable_log: LogEvery::default(),
            // PBKDF2 is hundreds of milliseconds of CPU per login. Without a
            // bound, a flood of password attempts from many addresses (each
            // under its throttle) would queue one blocking thread per attempt
            // — up to tokio's 512 — and starve routing. Hashing gets all
            // cores but one; the rest wait their turn (and give up at
            // `limits.login_timeout_ms`).
            hashing: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map(|n| n.get().saturating_sub(1).max(1)).unwrap_or(1),
            )),
        }
    }

    /// Checks a login. On success returns the user's record.
    ///
    /// A wrong password is answered no sooner than `answer_at` (the refusal
    /// floor), and its check stays in flight — counting against the name's
    /// and the address's budgets — until then: a burst of guesses cannot
    /// all be checked while the first ones wait out the floor.
    pub async fn login(
        &self,
        username: &str,
        password: &[u8],
        peer: IpAddr,
        answer_at: tokio::time::Instant,
    ) -> Result<UserRecord, Refusal> {
        let mut claim = self.claim(username, peer).await.ok_or(Refusal::Throttled)?;
        let now = Instant::now();
        let verdict = match self.lookup(username, now).await? {
            Some(record) => {
                let ok = self.verify(&record, password).await;
                ok.then_some(record)
            }
            None => self.legacy_or_decoy(username, password).await?,
        };
        let Some(record) = verdict else {
            // Set before waiting: a login abandoned during the wait (its
            // deadline, a closed socket) still counts as the failure it was.
            claim.outcome = Outcome::Failed;
            tokio::time::sleep_until(answer_at).await;
            return Err(Refusal::BadCredentials);
        };
        if record.disabled {
            return Err(Refusal::Disabled);
        }
        claim.outcome = Outcome::Cleared;
        Ok(record)
    }

    /// Reserves a check in the username's and then the address's budget
    /// (always in that order, so two logins never wait on each other), or
    /// `None` when either is spent. Waits while checks in flight hold a
    /// budget; the login's deadline bounds the wait.
    async fn claim(&self, username: &str, peer: IpAddr) -> Option<Claim<'_>> {
        let user = username.to_owned();
        let origin = Origin::of(peer);
        if !self.users.reserve_waiting(&user).await {
            return None;
        }
        // From here the claim ends the user's reservation however this
        // returns; the address is only ended once it was reserved.
        let mut claim = Claim { auth: self, user, origin: None, outcome: Outcome::Neither };
        if !self.addresses.reserve_waiting(&origin).await {
            return None;
        }
        claim.origin = Some(origin);
        Some(claim)
    }

    async fn lookup(&self, username: &str, now: Instant) -> Result<Option<UserRecord>, Refusal> {
        // The file store is an in-memory map refreshed on a `stat`: asking
        // it costs less than the cache would save, and asking it every time
        // is what makes `user disable` refuse the very next login.
        let ttl = match *self.store {
            AnyStore::File(_) => Duration::ZERO,
            #[cfg(feature = "mongodb")]
            AnyStore::Mongo(_) => Duration::from_secs(self.config.cache_ttl_secs),
        };
        if let Some(record) = self.cached(username, |age| age < ttl, now) {
            return Ok(Some(record));
        }
        match self.store.get(username).await {
            Ok(found) => {
                if let (Some(record), Ok(mut cache)) = (&found, self.cache.lock()) {
                    cache.insert(username.to_owned(), Cached { record: record.clone(), fetched: now });
                }
                Ok(found)
            }
            Err(e) => {
                self.store_failed(&e);
                let stale = Duration::from_secs(self.config.stale_ttl_secs);
                match self.cached(username, |age| age < stale, now) {
                    Some(record) => Ok(Some(record)),
                    None => Err(Refusal::Unavailable),
                }
            }
        }
    }

    fn cached(&self, username: &str, fresh: impl Fn(Duration) -> bool, now: Instant) -> Option<UserRecord> {
        let cache = self.cache.lock().ok()?;
        let entry = cache.get(username)?;
        fresh(now.saturating_duration_since(entry.fetched)).then(|| entry.record.clone())
    }

    /// Counts a failed store call and logs it, once per `revalidate_secs`
    /// (at least 10 s) while the store is down: enough to be seen, not
    /// enough to fill a disk during a long outage.
    fn store_failed(&self, error: &mqseal_store::StoreError) {
        Metrics::inc(&self.metrics.store_errors_total);
        if self.unavailable_log.due(Duration::from_secs(self.config.revalidate_secs.max(10))) {
            tracing::error!(store = %self.store.describe(), %error, "credential store unreachable; new logins fail closed");
        }
    }

    /// No record: try the seed's legacy layout when configured, else burn
    /// the same CPU a real check would.
    async fn legacy_or_decoy(&self, username: &str, password: &[u8]) -> Result<Option<UserRecord>, Refusal> {
        let legacy = match self.store.legacy_hash(username).await {
            Ok(found) => found,
            Err(e) => {
                self.store_failed(&e);
                return Err(Refusal::Unavailable);
            }
        };
        let iterations = self.config.pbkdf2_iterations;
        let Some(legacy_hex) = legacy else {
            let password = Zeroizing::new(password.to_vec());
            let _ =
                self.hash(move || mqseal_store::verify_unknown(&password, Algorithm::Pbkdf2Sha256, iterations)).await;
            return Ok(None);
        };
        if !hash::hashes_equal(&hash::sha256_legacy(password), &legacy_hex) {
            return Ok(None);
        }
        // The legacy users are people (the seed's operators): they move to
        // PBKDF2 as controllers with no grants until an admin grants them.
        let pw = Zeroizing::new(password.to_vec());
        let name = username.to_owned();
        let upgraded = self.hash(move || UserRecord::human(&name, &pw, Role::Controller, iterations)).await;
        let Some(Ok(record)) = upgraded else { return Err(Refusal::Unavailable) };
        match self.store.upgrade_legacy(&record).await {
            Ok(()) => {
                Metrics::inc(&self.metrics.legacy_upgrades_total);
                tracing::info!(user = %username, "legacy unsalted SHA-256 credential upgraded to PBKDF2-HMAC-SHA256");
            }
            // The login itself was valid; the upgrade is retried next time.
            Err(e) => tracing::warn!(user = %username, error = %e, "legacy credential upgrade failed"),
        }
        Ok(Some(record))
    }

    /// Re-reads every live and cached user; returns the live ones to close.
    pub async fn revalidate(&self, live: &HashSet<String>) -> Vec<(String, KickReason)> {
        let mut names: HashSet<String> = live.clone();
        if let Ok(cache) = self.cache.lock() {
            names.extend(cache.keys().cloned());
        }
        let names: Vec<String> = names.into_iter().collect();
        let mut kicks = Vec::new();
        for batch in names.chunks(REVALIDATE_BATCH) {
            let records = match self.store.get_many(batch).await {
                Ok(records) => records,
                Err(e) => {
                    self.store_failed(&e);
                    return kicks;
                }
            };
            let found: HashMap<&str, &UserRecord> = records.iter().map(|r| (r.username.as_str(), r)).collect();
            let now = Instant::now();
            let Ok(mut cache) = self.cache.lock() else { return kicks };
            for name in batch {
                match found.get(name.as_str()) {
                    Some(record) if !record.disabled => {
                        if let Some(entry) = cache.get_mut(name) {
                            let changed = entry.record.password_hash != record.password_hash;
                            *entry = Cached { record: (*record).clone(), fetched: now };
                            if changed && live.contains(name) {
                                kicks.push((name.clone(), KickReason::CredentialsChanged));
                            }
                        }
                    }
                    Some(_) => {
                        cache.remove(name);
                        if live.contains(name) {
                            kicks.push((name.clone(), KickReason::Disabled));
                        }
                    }
                    None => {
                        cache.remove(name);
                        if live.contains(name) {
                            kicks.push((name.clone(), KickReason::Deleted));
                        }
                    }
                }
            }
            // Drop entries nobody will use again (bounded memory).
            let stale = Duration::from_secs(self.config.stale_ttl_secs);
            cache.retain(|_, c| now.saturating_duration_since(c.fetched) < stale);
        }
        kicks
    }
}

impl Authenticator {
    /// Runs password hashing on the blocking pool, at most one job per core
    /// at a time. `None` if the job could not run (the pool is shutting
    /// down), which callers treat as a failed check.
    async fn hash<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let permit = self.hashing.clone().acquire_owned().await.ok()?;
        // The permit goes with the job: a login abandoned while its hash
        // runs must not free the slot before the CPU is.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .ok()
    }

    /// PBKDF2 takes hundreds of milliseconds: off the async workers, under
    /// the hashing bound. SHA-256 takes a microsecond: inline.
    async fn verify(&self, record: &UserRecord, password: &[u8]) -> bool {
        if record.algorithm == Algorithm::Sha256 {
            return record.verify(password);
        }
        let record = record.clone();
        let password = Zeroizing::new(password.to_vec());
        self.hash(move || record.verify(&password)).await.unwrap_or(false)
    }
}
