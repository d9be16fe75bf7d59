//! Where the controller's audit records live: an append-only JSON Lines
//! file next to the file store, or a MongoDB collection next to the users
//! when the store is MongoDB — the same choice as for credentials, made in
//! the same `[store]` section, so every controller of a deployment writes
//! to one log.
//!
//! Records are JSON objects whose shape is the controller's business
//! (`mqseal-controller`'s `audit` module); this module only needs two of
//! their fields, `device` and `at` (Unix milliseconds), to filter. The file
//! is opened for appending only, created 0600, and each batch is written
//! under the same kind of cross-process lock as the credential file and
//! synced before the call returns: a record the CLI reported is on disk.
//!
//! MongoDB may be down while the broker still lets a controller in from
//! its cache (docs/SECURITY.md, "Fails closed"), and a command sent then
//! must not lose its record: records MongoDB does not take are kept in a
//! local *spool* file beside the controller's registry and forwarded at
//! the next append that reaches MongoDB. Reads show spooled records too.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
#[cfg(feature = "mongodb")]
use std::time::Duration;

use serde_json::Value;

/// Why the audit log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log file could not be read or written.
    #[error("audit log {path}: {source}")]
    File {
        /// Which file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A record could not be encoded (it is not a JSON object).
    #[error("audit record: {0}")]
    Encode(String),
    /// MongoDB answered with an error or could not be reached.
    #[error("audit log in MongoDB at {address}: {message}")]
    Mongo {
        /// The hosts from the URI (never the credentials in it).
        address: String,
        /// The driver's message.
        message: String,
    },
}

/// Which records to read.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only this device's.
    pub device: Option<String>,
    /// Only those written at or after this Unix time (ms).
    pub since_ms: Option<u64>,
}

impl AuditQuery {
    fn matches(&self, record: &Value) -> bool {
        let device_ok = self.device.as_deref().is_none_or(|d| record.get("device").and_then(Value::as_str) == Some(d));
        let since_ok = self.since_ms.is_none_or(|s| record.get("at").and_then(Value::as_u64).is_some_and(|at| at >= s));
        device_ok && since_ok
    }
}

/// One stored record, or why it could not be read, with where it is
/// (`line 12`, or a MongoDB `_id`) so a report can name it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Where the record is.
    pub at: String,
    /// The record, or what is wrong with its bytes.
    pub record: Result<Value, String>,
}

/// The audit log of a deployment.
pub enum AuditLog {
    /// `data_dir/audit.jsonl` (or beside `store.path`).
    File(PathBuf),
    /// A collection in the store's MongoDB database.
    #[cfg(feature = "mongodb")]
    Mongo {
        /// The collection.
        records: mongodb::Collection<mongodb::bson::Document>,
        /// The hosts, for error messages.
        address: String,
        /// Deadline for each call.
        timeout: Duration,
        /// Where records wait while MongoDB cannot be reached.
        spool: PathBuf,
    },
}

/// Where appended records went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Into the log.
    Stored,
    /// MongoDB could not be reached: into the spool file, to be forwarded
    /// by a later append.
    Spooled {
        /// The spool file.
        spool: PathBuf,
        /// Why MongoDB did not take them.
        why: String,
    },
}

impl AuditLog {
    /// Where the records go, for messages.
    pub fn describe(&self) -> String {
        match self {
            AuditLog::File(p) => p.display().to_string(),
            #[cfg(feature = "mongodb")]
            AuditLog::Mongo { records, address, .. } => {
                format!("MongoDB at {address}, {}.{}", records.namespace().db, records.name())
            }
        }
    }

    /// Appends `records` (JSON objects), durably, before returning.
    ///
    /// # Errors
    /// [`AuditError`] naming the file; nothing is half-written to it (one
    /// write of whole lines under the lock). MongoDB being unreachable is
    /// not an error: the records are spooled ([`Appended::Spooled`]).
    pub async fn append<T: serde::Serialize + Sync>(&self, records: &[T]) -> Result<Appended, AuditError> {
        if records.is_empty() {
            return Ok(Appended::Stored);
        }
        let text = lines(records)?;
        match self {
            AuditLog::File(path) => write_lines(path, text).await.map(|()| Appended::Stored),
            #[cfg(feature = "mongodb")]
            AuditLog::Mongo { records: coll, address, timeout, spool } => {
                // Held until the spool is forwarded or added to: another
                // controller on this host must neither forward the same
                // records nor remove the spool while this one appends.
                // Each holder keeps it for at most one MongoDB timeout, so
                // this waits for a queue of them, not for ever.
                let _lock = lock_spool(spool, (*timeout * 10).max(Duration::from_secs(60))).await?;
                // Spooled records first, so the log keeps its order.
                let waiting = read_file(spool, "spool")?;
                let mut docs = Vec::new();
                let mut damaged = false;
                for s in &waiting {
                    match &s.record {
                        Ok(v) => docs.push(to_document(v)?),
                        Err(_) => damaged = true,
                    }
                }
                for r in records {
                    docs.push(mongodb::bson::to_document(r).map_err(|e| AuditError::Encode(e.to_string()))?);
                }
                match tokio::time::timeout(*timeout, coll.insert_many(docs)).await {
                    Ok(Ok(_)) => {
                        if !waiting.is_empty() {
                            // A damaged line (a torn write) is kept aside for
                            // a person, not dropped and not forwarded.
                            let gone = if damaged {
                                fs::rename(spool, spool.with_extension("damaged"))
                            } else {
                                fs::remove_file(spool)
                            };
                            gone.map_err(|source| AuditError::File { path: spool.display().to_string(), source })?;
                        }
                        Ok(Appended::Stored)
                    }
                    Ok(Err(e)) => spool_them(spool, text, format!("MongoDB at {address}: {e}")).await,
                    Err(_) => {
                        spool_them(spool, text, format!("MongoDB at {address}: no answer within {timeout:?}")).await
                    }
                }
            }
        }
    }

    /// The records `query` selects, oldest first. A record that cannot be
    /// parsed is returned as such (with where it is), not skipped: an
    /// auditor must see it.
    ///
    /// # Errors
    /// [`AuditError`] when the log cannot be read at all. A missing file is
    /// an empty log.
    pub async fn read(&self, query: &AuditQuery) -> Result<Vec<Stored>, AuditError> {
        let keep = |s: &Stored| s.record.as_ref().map_or(true, |r| query.matches(r));
        match self {
            AuditLog::File(path) => Ok(read_file(path, "line")?.into_iter().filter(keep).collect()),
            #[cfg(feature = "mongodb")]
            AuditLog::Mongo { records, address, timeout, spool } => {
                let mut all = read_mongo(records, address, *timeout, query).await?;
                all.extend(read_file(spool, "spool line")?.into_iter().filter(keep));
                Ok(all)
            }
        }
    }
}

/// `records` as JSON Lines, each serialised straight to its line (no
/// intermediate JSON tree: a job writes tens of thousands).
fn lines<T: serde::Serialize>(records: &[T]) -> Result<String, AuditError> {
    let mut text = Vec::new();
    for r in records {
        let start = text.len();
        serde_json::to_writer(&mut text, r).map_err(|e| AuditError::Encode(e.to_string()))?;
        if text.get(start) != Some(&b'{') {
            return Err(AuditError::Encode("not a JSON object".into()));
        }
        text.push(b'\n');
    }
    String::from_utf8(text).map_err(|e| AuditError::Encode(e.to_string()))
}

async fn write_lines(path: &Path, text: String) -> Result<(), AuditError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || append_lines(&path, text.as_bytes()))
        .await
        .map_err(|e| AuditError::Encode(format!("writer task: {e}")))?
}

#[cfg(feature = "mongodb")]
async fn spool_them(spool: &Path, text: String, why: String) -> Result<Appended, AuditError> {
    write_lines(spool, text).await.map(|()| Appended::Spooled { spool: spool.to_owned(), why })
}

#[cfg(feature = "mongodb")]
fn to_document(v: &Value) -> Result<mongodb::bson::Document, AuditError> {
    mongodb::bson::to_document(v).map_err(|e| AuditError::Encode(e.to_string()))
}

/// The records of a JSON Lines file, each labelled `{label} N`; a missing
/// file has none.
fn read_file(path: &Path, label: &str) -> Result<Vec<Stored>, AuditError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(AuditError::File { path: path.display().to_string(), source }),
    };
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| Stored {
            at: format!("{label} {}", i + 1),
            record: serde_json::from_str::<Value>(l).map_err(|e| format!("not a JSON record: {e}")),
        })
        .collect())
}

/// Takes the lock beside `spool` (`audit-spool.lock`), waiting at most
/// `wait` for another controller to let go of it.
#[cfg(feature = "mongodb")]
async fn lock_spool(spool: &Path, wait: Duration) -> Result<File, AuditError> {
    let path = spool.with_extension("lock");
    let err = |source| AuditError::File { path: path.display().to_string(), source };
    let file = open_append_0600(&path).map_err(err)?;
    let until = tokio::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(fs::TryLockError::WouldBlock) => {
                let held = format!("held by another controller for more than {wait:?}");
                return Err(err(std::io::Error::new(std::io::ErrorKind::TimedOut, held)));
            }
            Err(fs::TryLockError::Error(e)) => return Err(err(e)),
        }
    }
}

/// `path` opened for appending, created 0600 (with its folder), and made
/// 0600 if it was not.
fn open_append_0600(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// One locked, synced append of whole lines to a 0600 file.
fn append_lines(path: &Path, bytes: &[u8]) -> Result<(), AuditError> {
    let err = |source| AuditError::File { path: path.display().to_string(), source };
    let mut file = open_append_0600(path).map_err(err)?;
    // Two controllers appending at once must not interleave their lines.
    file.lock().map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(feature = "mongodb")]
async fn read_mongo(
    records: &mongodb::Collection<mongodb::bson::Document>,
    address: &str,
    timeout: Duration,
    query: &AuditQuery,
) -> Result<Vec<Stored>, AuditError> {
    use futures_util::TryStreamExt;
    use mongodb::bson::{Bson, doc};
    let mut filter = doc! {};
    if let Some(d) = &query.device {
        filter.insert("device", d.clone());
    }
    if let Some(s) = query.since_ms {
        filter.insert("at", doc! { "$gte": i64::try_from(s).unwrap_or(i64::MAX) });
    }
    let mongo = |message: String| AuditError::Mongo { address: address.to_owned(), message };
    let find = async {
        // Oldest first: by the time each record was written, then by `_id`,
        // which the driver draws with a per-process counter (so one
        // batch keeps its order) but not in order across processes.
        let cursor = records.find(filter).sort(doc! { "at": 1, "_id": 1 }).await?;
        cursor.try_collect::<Vec<_>>().await
    };
    let docs = match tokio::time::timeout(timeout, find).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return Err(mongo(e.to_string())),
        Err(_) => return Err(mongo(format!("no answer within {timeout:?}"))),
    };
    Ok(docs
        .into_iter()
        .map(|mut d| {
            let id = d.remove("_id").map_or_else(|| "(no _id)".to_owned(), |id| format!("_id {id}"));
            Stored { at: id, record: Ok(Bson::Document(d).into_relaxed_extjson()) }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_are_appended_0600_and_read_back_in_order_with_filters() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::File(dir.path().join("audit.jsonl"));
        assert!(log.read(&AuditQuery::default()).await.unwrap().is_empty(), "no file is an empty log");
        let r = |d: &str, at: u64| serde_json::json!({ "device": d, "at": at });
        log.append(&[r("a", 1), r("b", 2)]).await.unwrap();
        log.append(&[r("a", 3)]).await.unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join("audit.jsonl")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let all = log.read(&AuditQuery::default()).await.unwrap();
        let ats: Vec<u64> = all.iter().map(|s| s.record.as_ref().unwrap()["at"].as_u64().unwrap()).collect();
        assert_eq!(ats, [1, 2, 3]);
        assert_eq!(all[2].at, "line 3");
        let a = log.read(&AuditQuery { device: Some("a".into()), since_ms: Some(2) }).await.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].record.as_ref().unwrap()["at"], 3);
        assert!(matches!(log.append(&[serde_json::json!([1])]).await, Err(AuditError::Encode(_))));
    }

    #[tokio::test]
    async fn a_damaged_line_is_reported_where_it_is_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fs::write(&path, "{\"device\":\"a\",\"at\":1}\n{\"device\":\"a\",\"at\"\n").unwrap();
        let all = AuditLog::File(path).read(&AuditQuery::default()).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].at, "line 2");
        assert!(all[1].record.as_ref().unwrap_err().contains("not a JSON record"));
    }
}
