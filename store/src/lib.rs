//! Who may log in to the broker, and with what.
//!
//! One record per user or device, in the document layout of EMQX's MongoDB
//! authenticator (`username`, lowercase-hex `password_hash`, `salt`,
//! `is_superuser`) plus the fields mqseal needs (`algorithm`, `iterations`,
//! `role`, `disabled`, `grants`). The same records live either in a local
//! file (the embedded default, [`FileStore`]) or in a MongoDB collection
//! ([`MongoStore`]); both sit behind [`CredentialStore`], so the broker and
//! the controller CLI never care which one is configured.
//!
//! This crate only stores and checks credentials. Throttling, caching and
//! what a role may do on which topic belong to the broker.

#![forbid(unsafe_code)]

pub mod audit;
mod config;
mod file;
pub mod hash;
#[cfg(feature = "mongodb")]
mod mongo;

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use audit::{Appended, AuditError, AuditLog, AuditQuery, Stored};
pub use config::{StoreConfig, StoreKind};
pub use file::{FileStore, write_private};
pub use hash::Algorithm;
#[cfg(feature = "mongodb")]
pub use mongo::{LegacyLayout, MongoConfig, MongoStore};

/// What a principal is, which decides the topics it reaches (the broker's
/// ACL rules are written per role).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A device: its own topics only, and it must use its username as client id.
    Device,
    /// A person or script sending commands to the devices it is granted.
    Controller,
    /// Everything, including `#`.
    Admin,
}

impl Role {
    /// The name used in config files, documents and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Controller => "controller",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "device" => Ok(Role::Device),
            "controller" => Ok(Role::Controller),
            "admin" => Ok(Role::Admin),
            other => Err(StoreError::InvalidRecord(format!("unknown role {other:?} (device, controller, admin)"))),
        }
    }
}

/// One credential, exactly as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Login name; for a device also its id and its MQTT client id.
    pub username: String,
    /// Lowercase hex, computed as [`algorithm`](Self::algorithm) says.
    pub password_hash: String,
    /// Used as a string, as EMQX does.
    pub salt: String,
    /// How `password_hash` was made. Documents written by EMQX tools lack
    /// the field and are EMQX's `sha256` + suffix, the default here.
    #[serde(default = "default_algorithm")]
    pub algorithm: Algorithm,
    /// PBKDF2 iteration count; 0 for SHA-256.
    #[serde(default)]
    pub iterations: u32,
    /// EMQX's flag; kept equal to `role == Admin` so an EMQX cluster reading
    /// the same collection agrees on who is a superuser.
    #[serde(default)]
    pub is_superuser: bool,
    /// What the principal may reach. Missing in EMQX-written documents:
    /// those are devices, or admins when `is_superuser` is set.
    #[serde(default = "default_role")]
    pub role: Role,
    /// A disabled user keeps its record but may not log in, and its live
    /// sessions are closed.
    #[serde(default)]
    pub disabled: bool,
    /// For controllers: the device ids they may command (`*` for all).
    #[serde(default)]
    pub grants: Vec<String>,
}

fn default_algorithm() -> Algorithm {
    Algorithm::Sha256
}

fn default_role() -> Role {
    Role::Device
}

impl UserRecord {
    /// Makes `role` and `is_superuser` agree, the superuser flag winning:
    /// that is what an EMQX cluster reading the same document would do.
    pub fn normalize(mut self) -> Self {
        if self.is_superuser {
            self.role = Role::Admin;
        }
        self
    }

    /// A device record: salted SHA-256, because the secret is machine-made
    /// and 256 bits long (see [`hash`]).
    pub fn device(username: &str, secret: &[u8]) -> Result<Self, StoreError> {
        validate_username(username)?;
        let salt = hash::new_salt().map_err(StoreError::Random)?;
        Ok(UserRecord {
            username: username.to_owned(),
            password_hash: hash::sha256_salted(secret, &salt),
            salt,
            algorithm: Algorithm::Sha256,
            iterations: 0,
            is_superuser: false,
            role: Role::Device,
            disabled: false,
            grants: Vec::new(),
        })
    }

    /// A human record: PBKDF2-HMAC-SHA256 with `iterations` rounds.
    pub fn human(username: &str, password: &[u8], role: Role, iterations: u32) -> Result<Self, StoreError> {
        validate_username(username)?;
        if iterations < hash::MIN_PBKDF2_ITERATIONS {
            return Err(StoreError::InvalidRecord(format!(
                "{iterations} PBKDF2 iterations is below the minimum of {}",
                hash::MIN_PBKDF2_ITERATIONS
            )));
        }
        let salt = hash::new_salt().map_err(StoreError::Random)?;
        Ok(UserRecord {
            username: username.to_owned(),
            password_hash: hash::pbkdf2_sha256(password, &salt, iterations),
            salt,
            algorithm: Algorithm::Pbkdf2Sha256,
            iterations,
            is_superuser: role == Role::Admin,
            role,
            disabled: false,
            grants: Vec::new(),
        })
    }

    /// Whether `password` matches, in constant time for a given record.
    ///
    /// This is CPU work (up to hundreds of milliseconds for PBKDF2): async
    /// callers run it on a blocking thread.
    pub fn verify(&self, password: &[u8]) -> bool {
        let computed = hash::compute(self.algorithm, password, &self.salt, self.iterations);
        hash::hashes_equal(&computed, &self.password_hash)
    }

    /// Checks what the store cannot express in its schema.
    pub fn validate(&self) -> Result<(), StoreError> {
        validate_username(&self.username)?;
        if self.algorithm == Algorithm::Pbkdf2Sha256 && self.iterations < hash::MIN_PBKDF2_ITERATIONS {
            return Err(StoreError::InvalidRecord(format!("{}: too few PBKDF2 iterations", self.username)));
        }
        for grant in &self.grants {
            if grant != "*" {
                validate_username(grant)?;
            }
        }
        Ok(())
    }
}

/// Burns the same CPU as checking a password against a record that uses
/// `algorithm`/`iterations`, for logins naming a user that does not exist:
/// otherwise the response time would tell an attacker which names are real.
pub fn verify_unknown(password: &[u8], algorithm: Algorithm, iterations: u32) -> bool {
    let computed = hash::compute(algorithm, password, "mqseal-unknown-user-salt", iterations);
    // black_box keeps the optimiser from dropping the hashing.
    std::hint::black_box(hash::hashes_equal(&computed, &computed));
    false
}

/// Usernames (and device ids) become whole topic levels, so the MQTT
/// wildcard and separator characters, `$` (reserved topics) and NUL can never
/// appear; the set is the one `proto` accepts for device ids, so every device
/// can also be a user.
pub fn validate_username(name: &str) -> Result<(), StoreError> {
    let ok_len = !name.is_empty() && name.len() <= MAX_USERNAME_LEN;
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok_len && ok_chars { Ok(()) } else { Err(StoreError::InvalidUsername(name.chars().take(80).collect())) }
}

/// Longest username: the same bound as a device id in `proto`.
pub const MAX_USERNAME_LEN: usize = 64;

/// Everything that can go wrong with a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The name has characters that cannot go into a topic level.
    #[error("invalid username {0:?}: use 1-64 of A-Z a-z 0-9 - _ . :")]
    InvalidUsername(String),
    /// A record that would be unsafe or unusable.
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    /// `add` of a name that exists.
    #[error("user {0:?} already exists")]
    Exists(String),
    /// The credential file could not be read or written.
    #[error("credential file {path}: {source}")]
    File {
        /// Which file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The credential file is not valid JSON of the expected shape.
    #[error("credential file {path}: line {line}, column {column}: {message}")]
    Corrupt {
        /// Which file.
        path: String,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong there.
        message: String,
    },
    /// MongoDB answered with an error or could not be reached (or this
    /// build has no MongoDB support).
    #[error("MongoDB at {address}: {message}")]
    Mongo {
        /// The hosts from the URI (never the credentials in it).
        address: String,
        /// The driver's message.
        message: String,
    },
    /// A store call took longer than its deadline.
    #[error("{store} did not answer within {timeout:?}")]
    Timeout {
        /// Which store (with its address for MongoDB).
        store: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The OS random source failed.
    #[error("random number generator: {0}")]
    Random(getrandom::Error),
}

/// The operations the broker and the CLI need from a credential store.
///
/// Futures are `Send` so the broker can call the store from any task.
pub trait CredentialStore: Send + Sync {
    /// The record for `username`, if there is one.
    fn get(&self, username: &str) -> impl Future<Output = Result<Option<UserRecord>, StoreError>> + Send;
    /// The records for many names at once (missing ones are left out): the
    /// broker re-checks its live sessions with this, in batches.
    fn get_many(&self, usernames: &[String]) -> impl Future<Output = Result<Vec<UserRecord>, StoreError>> + Send;
    /// Inserts `record`; with `replace` false an existing name is an error.
    fn put(&self, record: &UserRecord, replace: bool) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Removes `username`; says whether it existed.
    fn delete(&self, username: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Every record, sorted by username.
    fn list(&self) -> impl Future<Output = Result<Vec<UserRecord>, StoreError>> + Send;
    /// The seed design's unsalted SHA-256 hex for `username`, when the store
    /// is configured to read that legacy layout; `None` otherwise.
    fn legacy_hash(&self, username: &str)
    -> impl Future<Output = Result<Option<Zeroizing<String>>, StoreError>> + Send;
    /// Replaces a legacy credential by `upgraded` (written first, then the
    /// legacy document removed, so a crash in between loses nothing).
    fn upgrade_legacy(&self, upgraded: &UserRecord) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Where the data lives, for log lines (never includes credentials).
    fn describe(&self) -> String;
}

/// The configured store: one of the two implementations, chosen at startup.
pub enum AnyStore {
    /// The embedded default.
    File(FileStore),
    /// MongoDB for real deployments (feature `mongodb`, on by default).
    #[cfg(feature = "mongodb")]
    Mongo(MongoStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::File($s) => $e,
            #[cfg(feature = "mongodb")]
            AnyStore::Mongo($s) => $e,
        }
    };
}

impl CredentialStore for AnyStore {
    async fn get(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        dispatch!(self, s => s.get(username).await)
    }
    async fn get_many(&self, usernames: &[String]) -> Result<Vec<UserRecord>, StoreError> {
        dispatch!(self, s => s.get_many(usernames).await)
    }
    async fn put(&self, record: &UserRecord, replace: bool) -> Result<(), StoreError> {
        dispatch!(self, s => s.put(record, replace).await)
    }
    async fn delete(&self, username: &str) -> Result<bool, StoreError> {
        dispatch!(self, s => s.delete(username).await)
    }
    async fn list(&self) -> Result<Vec<UserRecord>, StoreError> {
        dispatch!(self, s => s.list().await)
    }
    async fn legacy_hash(&self, username: &str) -> Result<Option<Zeroizing<String>>, StoreError> {
        dispatch!(self, s => s.legacy_hash(username).await)
    }
    async fn upgrade_legacy(&self, upgraded: &UserRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.upgrade_legacy(upgraded).await)
    }
    fn describe(&self) -> String {
        dispatch!(self, s => s.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_that_would_break_topics_are_refused() {
        for bad in ["", "a/b", "a+b", "a#", "$sys", "a\0b", "a b", &"x".repeat(65)] {
            assert!(validate_username(bad).is_err(), "{bad:?}");
        }
        for good in ["dev-1", "IOT_JCOMP", "site.a:7", &"x".repeat(64)] {
            assert!(validate_username(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn records_verify_their_own_password_only() {
        let d = UserRecord::device("dev-1", b"secret").unwrap();
        assert!(d.verify(b"secret") && !d.verify(b"secreT"));
        assert_eq!(d.algorithm, Algorithm::Sha256);
        let h = UserRecord::human("alice", b"pw", Role::Admin, 1000).unwrap();
        assert!(h.verify(b"pw") && !h.verify(b"pW"));
        assert!(h.is_superuser);
        assert!(UserRecord::human("bob", b"pw", Role::Controller, 10).is_err());
        assert!(!verify_unknown(b"pw", Algorithm::Pbkdf2Sha256, 1000));
    }
}
