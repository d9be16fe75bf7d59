//! `[store]`: which credential store, as the broker's config file and the
//! controller CLI name it.
//!
//! It lives here rather than in the broker so that `mqseal user add` opens
//! exactly the store the broker reads, from the same section of the same file.

use std::path::{Path, PathBuf};
#[cfg(feature = "mongodb")]
use std::time::Duration;

use serde::Deserialize;

use crate::{AnyStore, AuditLog, FileStore, StoreError};
#[cfg(feature = "mongodb")]
use crate::{LegacyLayout, MongoConfig, MongoStore};

/// Which credential store.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// `data_dir/users.json` (or `store.path`).
    File,
    /// `store.mongodb_uri`.
    Mongodb,
}

/// `[store]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `file` (default) or `mongodb`.
    pub kind: StoreKind,
    /// File store path; default `data_dir/users.json`.
    pub path: Option<PathBuf>,
    /// MongoDB URI.
    pub mongodb_uri: Option<String>,
    /// MongoDB database.
    pub database: String,
    /// MongoDB collection (EMQX's default name).
    pub collection: String,
    /// Also accept the seed's `IOT.login_info` unsalted SHA-256 users, and
    /// upgrade each to PBKDF2 on its next successful login.
    pub legacy_login_info: bool,
    /// Database of the legacy collection.
    pub legacy_database: String,
    /// Legacy collection.
    pub legacy_collection: String,
    /// Deadline for every store call.
    pub timeout_ms: u64,
    /// MongoDB collection of the controllers' audit log.
    pub audit_collection: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::File,
            path: None,
            mongodb_uri: None,
            database: "mqseal".into(),
            collection: "mqtt_user".into(),
            legacy_login_info: false,
            legacy_database: "IOT".into(),
            legacy_collection: "login_info".into(),
            timeout_ms: 2_000,
            audit_collection: "mqseal_audit".into(),
        }
    }
}

impl StoreConfig {
    /// The file store's path: `path`, else `data_dir/users.json`.
    pub fn file_path(&self, data_dir: &Path) -> PathBuf {
        self.path.clone().unwrap_or_else(|| data_dir.join("users.json"))
    }

    /// The audit log that goes with this store: `file` when the store is a
    /// file, the collection `audit_collection` of the same MongoDB database
    /// when it is MongoDB (every controller of a deployment then writes to
    /// one log), with `audit-spool.jsonl` beside `file` for records written
    /// while MongoDB cannot be reached.
    ///
    /// # Errors
    /// [`StoreError`] naming the MongoDB address.
    pub async fn open_audit(&self, file: PathBuf) -> Result<AuditLog, StoreError> {
        match self.kind {
            StoreKind::File => Ok(AuditLog::File(file)),
            #[cfg(not(feature = "mongodb"))]
            StoreKind::Mongodb => Err(StoreError::Mongo {
                address: "-".into(),
                message: "this build has no MongoDB support (feature `mongodb`)".into(),
            }),
            #[cfg(feature = "mongodb")]
            StoreKind::Mongodb => match self.open(Path::new(".")).await? {
                AnyStore::Mongo(m) => Ok(m.audit_log(&self.audit_collection, file.with_file_name("audit-spool.jsonl"))),
                AnyStore::File(_) => Err(StoreError::InvalidRecord("a MongoDB store opened as a file".into())),
            },
        }
    }

    /// Opens the configured store (connecting to MongoDB if that is the kind).
    ///
    /// # Errors
    /// [`StoreError`] naming the file or the MongoDB address.
    pub async fn open(&self, data_dir: &Path) -> Result<AnyStore, StoreError> {
        Ok(match self.kind {
            StoreKind::File => AnyStore::File(FileStore::open(self.file_path(data_dir))?),
            #[cfg(not(feature = "mongodb"))]
            StoreKind::Mongodb => {
                return Err(StoreError::Mongo {
                    address: "-".into(),
                    message: "this build has no MongoDB support (feature `mongodb`)".into(),
                });
            }
            #[cfg(feature = "mongodb")]
            StoreKind::Mongodb => {
                let mongo = MongoConfig {
                    uri: self.mongodb_uri.clone().unwrap_or_default(),
                    database: self.database.clone(),
                    collection: self.collection.clone(),
                    legacy: self.legacy_login_info.then(|| LegacyLayout {
                        database: self.legacy_database.clone(),
                        collection: self.legacy_collection.clone(),
                    }),
                    timeout: Duration::from_millis(self.timeout_ms),
                };
                AnyStore::Mongo(MongoStore::connect(&mongo).await?)
            }
        })
    }
}
