//! Credentials in MongoDB, in EMQX's authenticator layout.
//!
//! Every call has a deadline twice over: the driver's server-selection and
//! connect timeouts (so it stops trying) and a `tokio::time::timeout` around
//! the whole call (so a half-open socket cannot hold a login forever). The
//! unique index on `username` is created in the background and retried until
//! it exists, so a broker can start while MongoDB is still down and recover
//! by itself.

use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::doc;
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, IndexModel};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{CredentialStore, StoreError, UserRecord};

/// Where the seed design kept its users: `IOT.login_info`, documents
/// `{username, password}` with `password` the unsalted SHA-256 hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyLayout {
    /// Database name (the seed used `IOT`).
    pub database: String,
    /// Collection name (the seed used `login_info`).
    pub collection: String,
}

impl Default for LegacyLayout {
    fn default() -> Self {
        LegacyLayout { database: "IOT".into(), collection: "login_info".into() }
    }
}

/// How to reach the collection.
#[derive(Clone, Debug)]
pub struct MongoConfig {
    /// `mongodb://…` URI; credentials in it are never logged.
    pub uri: String,
    /// Database holding the users collection.
    pub database: String,
    /// EMQX's default is `mqtt_user`.
    pub collection: String,
    /// Read the seed's legacy collection too (off unless asked for).
    pub legacy: Option<LegacyLayout>,
    /// Deadline for each call.
    pub timeout: Duration,
}

#[derive(Deserialize)]
struct LegacyDoc {
    password: String,
}

/// A MongoDB-backed [`CredentialStore`].
pub struct MongoStore {
    users: Collection<UserRecord>,
    legacy: Option<Collection<LegacyDoc>>,
    address: String,
    timeout: Duration,
}

impl MongoStore {
    /// Builds the client (no network traffic yet) and starts the background
    /// task that creates the unique `username` index.
    pub async fn connect(config: &MongoConfig) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(&config.uri)
            .await
            .map_err(|e| StoreError::Mongo { address: "(unparsable URI)".into(), message: e.to_string() })?;
        let address = options.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(",");
        options.server_selection_timeout = Some(config.timeout);
        options.connect_timeout = Some(config.timeout);
        options.app_name = Some("mqseal".into());
        let client = Client::with_options(options)
            .map_err(|e| StoreError::Mongo { address: address.clone(), message: e.to_string() })?;
        let users: Collection<UserRecord> = client.database(&config.database).collection(&config.collection);
        let legacy = config.legacy.as_ref().map(|l| client.database(&l.database).collection(&l.collection));
        let store = MongoStore { users, legacy, address, timeout: config.timeout };
        store.spawn_index_task();
        Ok(store)
    }

    /// The audit log collection `name` in the same database, on the same
    /// client, spooling to `spool` while MongoDB cannot be reached.
    pub fn audit_log(&self, name: &str, spool: std::path::PathBuf) -> crate::AuditLog {
        let db = self.users.namespace().db;
        crate::AuditLog::Mongo {
            records: self.users.client().database(&db).collection(name),
            address: self.address.clone(),
            timeout: self.timeout,
            spool,
        }
    }

    /// Replaces, in collection `name` of the same database, the documents
    /// an earlier call wrote (those carrying a `marker` field) with `docs`,
    /// each written with `marker = generation`: the new ones first, then
    /// the old ones go — so a reader (EMQX's authorizer) never sees none,
    /// and a failed write leaves the old set in place. Returns how many
    /// were removed.
    ///
    /// # Errors
    /// [`StoreError`] naming the MongoDB address, or a document that is not
    /// a JSON object.
    pub async fn replace_marked(
        &self,
        name: &str,
        marker: &str,
        generation: &str,
        docs: &[serde_json::Value],
    ) -> Result<u64, StoreError> {
        let db = self.users.namespace().db;
        let coll: Collection<mongodb::bson::Document> = self.users.client().database(&db).collection(name);
        let mut bson = Vec::with_capacity(docs.len());
        for d in docs {
            let mut doc = mongodb::bson::to_document(d).map_err(|e| StoreError::InvalidRecord(e.to_string()))?;
            doc.insert(marker, generation);
            bson.push(doc);
        }
        if !bson.is_empty() {
            self.deadline(coll.insert_many(bson)).await?;
        }
        let older = mongodb::bson::doc! { marker: { "$exists": true, "$ne": generation } };
        Ok(self.deadline(coll.delete_many(older)).await?.deleted_count)
    }

    /// Creates the unique index now, failing if MongoDB cannot be reached:
    /// for tools (the CLI) that want to know at once.
    pub async fn ensure_index(&self) -> Result<(), StoreError> {
        self.deadline(async { self.users.create_index(username_index()).await.map(|_| ()) }).await
    }

    fn spawn_index_task(&self) {
        let users = self.users.clone();
        let address = self.address.clone();
        let timeout = self.timeout;
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(500);
            loop {
                match tokio::time::timeout(timeout, users.create_index(username_index())).await {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => tracing_warn(&address, &e.to_string()),
                    Err(_) => tracing_warn(&address, "timed out creating the username index"),
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        });
    }

    async fn deadline<T>(
        &self,
        call: impl IntoFuture<Output = Result<T, mongodb::error::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call.into_future()).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(e)),
            Err(_) => Err(StoreError::Timeout { store: format!("MongoDB at {}", self.address), timeout: self.timeout }),
        }
    }

    /// Writes many records at once, replacing same-named ones: one delete
    /// and one bulk insert instead of a round trip per device.
    pub async fn put_many(&self, records: &[UserRecord]) -> Result<(), StoreError> {
        for r in records {
            r.validate()?;
        }
        let names: Vec<&str> = records.iter().map(|r| r.username.as_str()).collect();
        self.deadline(self.users.delete_many(doc! { "username": { "$in": names } })).await?;
        self.deadline(self.users.insert_many(records)).await.map(|_| ())
    }

    fn error(&self, e: mongodb::error::Error) -> StoreError {
        StoreError::Mongo { address: self.address.clone(), message: e.to_string() }
    }
}

/// Usernames are unique: the CLI's `add` relies on the refusal, and EMQX
/// reads at most one document per name.
fn username_index() -> IndexModel {
    IndexModel::builder()
        .keys(doc! { "username": 1 })
        .options(IndexOptions::builder().unique(true).name("username_unique".to_owned()).build())
        .build()
}

/// The store crate does not depend on `tracing`; index-creation failures go
/// to stderr once per attempt (with back-off, so at most every 30 s).
fn tracing_warn(address: &str, message: &str) {
    eprintln!("mqseal-store: MongoDB at {address}: cannot create the username index yet: {message}");
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::InsertMany(m) => m.write_errors.as_ref().is_some_and(|ws| ws.iter().any(|w| w.code == 11000)),
        _ => e.to_string().contains("E11000"),
    }
}

impl CredentialStore for MongoStore {
    async fn get(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let found = self.deadline(self.users.find_one(doc! { "username": username })).await?;
        Ok(found.map(UserRecord::normalize))
    }

    async fn get_many(&self, usernames: &[String]) -> Result<Vec<UserRecord>, StoreError> {
        let records = self
            .deadline(async {
                let cursor = self.users.find(doc! { "username": { "$in": usernames } }).await?;
                cursor.try_collect::<Vec<_>>().await
            })
            .await?;
        Ok(records.into_iter().map(UserRecord::normalize).collect())
    }

    async fn put(&self, record: &UserRecord, replace: bool) -> Result<(), StoreError> {
        record.validate()?;
        if replace {
            self.deadline(self.users.replace_one(doc! { "username": &record.username }, record).upsert(true))
                .await
                .map(|_| ())
        } else {
            match tokio::time::timeout(self.timeout, self.users.insert_one(record)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) if is_duplicate_key(&e) => Err(StoreError::Exists(record.username.clone())),
                Ok(Err(e)) => Err(self.error(e)),
                Err(_) => {
                    Err(StoreError::Timeout { store: format!("MongoDB at {}", self.address), timeout: self.timeout })
                }
            }
        }
    }

    async fn delete(&self, username: &str) -> Result<bool, StoreError> {
        let result = self.deadline(self.users.delete_one(doc! { "username": username })).await?;
        Ok(result.deleted_count > 0)
    }

    async fn list(&self) -> Result<Vec<UserRecord>, StoreError> {
        let mut records: Vec<UserRecord> = self
            .deadline(async {
                let cursor = self.users.find(doc! {}).await?;
                cursor.try_collect::<Vec<_>>().await
            })
            .await?;
        records.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(records.into_iter().map(UserRecord::normalize).collect())
    }

    async fn legacy_hash(&self, username: &str) -> Result<Option<Zeroizing<String>>, StoreError> {
        let Some(legacy) = &self.legacy else { return Ok(None) };
        let found = self.deadline(legacy.find_one(doc! { "username": username })).await?;
        Ok(found.map(|d| Zeroizing::new(d.password)))
    }

    async fn upgrade_legacy(&self, upgraded: &UserRecord) -> Result<(), StoreError> {
        self.put(upgraded, true).await?;
        // A delete never decodes documents, so the typed handle serves.
        if let Some(legacy) = &self.legacy {
            self.deadline(legacy.delete_many(doc! { "username": &upgraded.username })).await?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("MongoDB at {}", self.address)
    }
}
