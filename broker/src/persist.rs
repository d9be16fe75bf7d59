//! The router's state on disk: retained messages and persistent sessions
//! in one redb file under `data_dir`, and the writer task that commits the
//! router's journal to it.
//!
//! **Why redb.** A B-tree with ACID transactions, one writer and many
//! readers, checksummed pages, pure Rust: a group commit is one write
//! transaction, and a start reads everything back in key order. It was
//! chosen over fjall by measurement (`mqseal-bench store-engines`,
//! docs/BENCHMARKS.md "Choosing the store").
//!
//! **What the writer does.** The router journals dirty keys
//! (`mqseal_router::journal`); the writer takes them with their current
//! state under the hub's lock (clones of `Arc`s, no encoding), encodes and
//! commits them on a blocking thread, and then tells the hub which journal
//! version is on disk. In durable mode it starts a commit as soon as a
//! change that an acknowledgement promises is made, and connections hold
//! those acknowledgements until the version is committed: whatever
//! arrived while one commit ran goes in the next (group commit). In
//! periodic mode it commits every `commit_interval_ms` and nobody waits.
//!
//! **When it fails.** A damaged file, a file from a newer broker, or a
//! record that does not decode stops the start with an error naming the
//! file ([`PersistError`]). A commit that fails is logged and counted; its
//! keys go back into the journal, so the next commit writes their state
//! then — nothing is skipped — and held acknowledgements wait for it.

pub mod records;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqseal_router::{Changes, Millis, Router, StoredItem};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tracing::{error, info, warn};

use crate::hub::Hub;
use crate::metrics::{LogEvery, Metrics};

/// The layout of the file this broker writes; a file with a higher
/// number was written by a newer broker and is refused.
pub const FORMAT: u64 = 1;

// Keys are bytes, not `&str`: redb decodes a `&str` key with an unwrap,
// so a file whose checksums are right but whose keys are not UTF-8 would
// panic the start instead of being refused (the load checks them itself).
const META: TableDefinition<&[u8], u64> = TableDefinition::new("meta");
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
const ITEMS: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("session_messages");
const RETAINED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("retained");

/// The highest sequence number a stored copy may carry: far beyond any
/// run (2^62 copies), and low enough that counting on from it cannot
/// overflow.
const MAX_SEQ: u64 = 1 << 62;

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The file cannot be opened as a redb database: damaged, not a
    /// database, an unsupported redb format, or locked by another broker.
    #[error(
        "persistence store {path}: cannot open it ({source}); if it is damaged, move it aside to start with empty sessions and retained messages"
    )]
    Open {
        /// The file.
        path: String,
        /// What redb said.
        source: redb::DatabaseError,
    },
    /// Written by a newer broker.
    #[error(
        "persistence store {path} has format {found}, newer than this broker's {FORMAT}: run the broker that wrote it, or move the file aside"
    )]
    Newer {
        /// The file.
        path: String,
        /// Its format.
        found: u64,
    },
    /// A record does not decode.
    #[error("persistence store {path} is damaged: table {table}, key {key}: {why}")]
    Damaged {
        /// The file.
        path: String,
        /// Which table.
        table: &'static str,
        /// Which key.
        key: String,
        /// What was wrong.
        why: String,
    },
    /// Reading or writing failed.
    #[error("persistence store {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What redb said.
        source: redb::Error,
    },
}

/// The open store.
pub struct Store {
    db: Database,
    path: PathBuf,
}

/// What a start read back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Sessions restored.
    pub sessions: usize,
    /// Their queued and inflight entries.
    pub messages: usize,
    /// Retained messages restored.
    pub retained: usize,
    /// Records dropped on the way: expired retained messages, entries of
    /// a session that is gone.
    pub discarded: usize,
    /// Sessions not restored because their expiry is 0 (they ended with
    /// the broker); the first commit deletes them.
    pub ended: usize,
}

impl Store {
    /// Opens (or creates) the store at `path` and checks its format.
    ///
    /// # Errors
    /// [`PersistError`] naming the file.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, PersistError> {
        // Errors name the file as an operator can find it, whatever the
        // working directory was.
        let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let shown = path.display().to_string();
        // redb checks page checksums when it recovers from a crash, not on
        // every open: a file damaged some other way would be trusted, and
        // a read of a damaged page can panic inside redb. So every start
        // verifies the whole file first (it costs a read of the file, and
        // it is the same check as the recovery after a `kill -9`:
        // docs/BENCHMARKS.md "Choosing the store").
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|source| PersistError::Open { path: shown.clone(), source })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Queued commands and retained status are the fleet's data.
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        let store = Self { db, path: path.to_owned() };
        let txn = store.db.begin_write().map_err(|e| store.io(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| store.io(e))?;
            let found = meta.get(&b"format"[..]).map_err(|e| store.io(e))?.map(|v| v.value());
            match found {
                Some(found) if found > FORMAT => return Err(PersistError::Newer { path: shown, found }),
                Some(_) => {}
                None => {
                    meta.insert(&b"format"[..], FORMAT).map_err(|e| store.io(e))?;
                }
            }
            txn.open_table(SESSIONS).map_err(|e| store.io(e))?;
            txn.open_table(ITEMS).map_err(|e| store.io(e))?;
            txn.open_table(RETAINED).map_err(|e| store.io(e))?;
        }
        txn.commit().map_err(|e| store.io(e))?;
        Ok(store)
    }

    /// The file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, e: impl Into<redb::Error>) -> PersistError {
        PersistError::Io { path: self.path.display().to_string(), source: e.into() }
    }

    fn damaged(&self, table: &'static str, key: String, why: impl std::fmt::Display) -> PersistError {
        PersistError::Damaged { path: self.path.display().to_string(), table, key, why: why.to_string() }
    }

    /// Reads everything back into `router` (a new one, journal enabled),
    /// then deletes what was not restored.
    ///
    /// # Errors
    /// [`PersistError`] naming the file, the table and the key.
    pub fn load(&self, router: &mut Router, now: Millis) -> Result<Loaded, PersistError> {
        let mut loaded = Loaded::default();
        let mut orphans: Vec<(String, u64)> = Vec::new();
        let mut stale_retained: Vec<String> = Vec::new();
        {
            let txn = self.db.begin_read().map_err(|e| self.io(e))?;
            let sessions = txn.open_table(SESSIONS).map_err(|e| self.io(e))?;
            let items = txn.open_table(ITEMS).map_err(|e| self.io(e))?;
            let mut by_client: HashMap<String, Vec<(u64, StoredItem)>> = HashMap::new();
            for entry in items.iter().map_err(|e| self.io(e))? {
                let (key, value) = entry.map_err(|e| self.io(e))?;
                let (client, seq) = key.value();
                let client = utf8(client).map_err(|e| self.damaged("session_messages", shown(client, seq), e))?;
                if seq > MAX_SEQ {
                    return Err(self.damaged(
                        "session_messages",
                        format!("{client}#{seq}"),
                        "sequence number out of range",
                    ));
                }
                let item = records::decode_item(value.value())
                    .map_err(|e| self.damaged("session_messages", format!("{client}#{seq}"), e))?;
                by_client.entry(client.to_owned()).or_default().push((seq, item));
            }
            for entry in sessions.iter().map_err(|e| self.io(e))? {
                let (key, value) = entry.map_err(|e| self.io(e))?;
                let client = key.value();
                let client = utf8(client).map_err(|e| self.damaged("sessions", lossy(client), e))?;
                let state = records::decode_session(client, value.value())
                    .map_err(|e| self.damaged("sessions", client.to_owned(), e))?;
                // In key order already, which is sequence order.
                let items = by_client.remove(client).unwrap_or_default();
                if let Some(pkid) = repeated_pkid(&items) {
                    return Err(self.damaged(
                        "session_messages",
                        client.to_owned(),
                        format!("packet id {pkid} in flight twice"),
                    ));
                }
                let n = items.len();
                if router.restore_session(state, items, now) {
                    loaded.sessions += 1;
                    loaded.messages += n;
                } else {
                    loaded.ended += 1;
                }
            }
            for (client, items) in by_client {
                orphans.extend(items.into_iter().map(|(seq, _)| (client.clone(), seq)));
            }
            let retained = txn.open_table(RETAINED).map_err(|e| self.io(e))?;
            for entry in retained.iter().map_err(|e| self.io(e))? {
                let (key, value) = entry.map_err(|e| self.io(e))?;
                let topic = key.value();
                let topic = utf8(topic).map_err(|e| self.damaged("retained", lossy(topic), e))?;
                let message = records::decode_message(value.value())
                    .map_err(|e| self.damaged("retained", topic.to_owned(), e))?;
                if router.restore_retained(message, now) {
                    loaded.retained += 1;
                } else {
                    stale_retained.push(topic.to_owned());
                }
            }
        }
        loaded.discarded = orphans.len() + stale_retained.len();
        if loaded.discarded > 0 {
            let txn = self.db.begin_write().map_err(|e| self.io(e))?;
            {
                let mut items = txn.open_table(ITEMS).map_err(|e| self.io(e))?;
                for (client, seq) in &orphans {
                    items.remove((client.as_bytes(), *seq)).map_err(|e| self.io(e))?;
                }
                let mut retained = txn.open_table(RETAINED).map_err(|e| self.io(e))?;
                for topic in &stale_retained {
                    retained.remove(topic.as_bytes()).map_err(|e| self.io(e))?;
                }
            }
            txn.commit().map_err(|e| self.io(e))?;
        }
        Ok(loaded)
    }

    /// Writes `changes` in one durable transaction; returns how many keys
    /// it wrote or deleted.
    ///
    /// # Errors
    /// [`PersistError::Io`] when the transaction could not be committed;
    /// nothing of it is then on disk.
    pub fn apply(&self, changes: &Changes) -> Result<usize, PersistError> {
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut sessions = txn.open_table(SESSIONS).map_err(|e| self.io(e))?;
            let mut items = txn.open_table(ITEMS).map_err(|e| self.io(e))?;
            let mut retained = txn.open_table(RETAINED).map_err(|e| self.io(e))?;
            // Ended first: the same client id may have started again since.
            for (client, bound) in &changes.ended {
                sessions.remove(client.as_bytes()).map_err(|e| self.io(e))?;
                items
                    .retain_in((client.as_bytes(), 0)..(client.as_bytes(), *bound), |_, _| false)
                    .map_err(|e| self.io(e))?;
            }
            for state in &changes.sessions {
                let bytes = records::encode_session(state);
                sessions.insert(state.client_id.as_bytes(), bytes.as_slice()).map_err(|e| self.io(e))?;
            }
            for (client, seq, item) in &changes.items {
                match item {
                    Some(item) => {
                        let bytes = records::encode_item(item);
                        items.insert((client.as_bytes(), *seq), bytes.as_slice()).map_err(|e| self.io(e))?;
                    }
                    None => {
                        items.remove((client.as_bytes(), *seq)).map_err(|e| self.io(e))?;
                    }
                }
            }
            for (topic, message) in &changes.retained {
                match message {
                    Some(m) => {
                        let bytes = records::encode_message(m);
                        retained.insert(topic.as_bytes(), bytes.as_slice()).map_err(|e| self.io(e))?;
                    }
                    None => {
                        retained.remove(topic.as_bytes()).map_err(|e| self.io(e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.io(e))?;
        Ok(changes.len())
    }
}

/// A packet id two in-flight entries of one session share: one of them
/// could never be acknowledged.
fn repeated_pkid(items: &[(u64, StoredItem)]) -> Option<u16> {
    records::repeated_id(items.iter().filter_map(|(_, item)| match item {
        StoredItem::Publish { pkid, .. } => *pkid,
        StoredItem::Released(pkid) => Some(*pkid),
    }))
}

/// A key's text, or why it is not text.
fn utf8(key: &[u8]) -> Result<&str, &'static str> {
    std::str::from_utf8(key).map_err(|_| "key is not UTF-8")
}

/// A key that is not text, as an operator can read it.
fn lossy(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

fn shown(client: &[u8], seq: u64) -> String {
    format!("{}#{seq}", lossy(client))
}

/// How the writer commits (`[persistence] mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Acknowledgements wait for the commit.
    Durable,
    /// A commit per interval; a crash loses up to one interval.
    Periodic,
}

/// Commits the router's journal until `stop` says so. It stops only
/// between commits: a commit in flight lands (or is requeued) before the
/// task ends, so the shutdown's final commit never races an older one.
pub async fn run_writer(
    hub: Arc<Hub>,
    store: Arc<Store>,
    mode: Mode,
    interval: Duration,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let failures = LogEvery::default();
    loop {
        let wait = async {
            if mode == Mode::Durable {
                // A promise wakes it at once; deletes and packet-id
                // updates wait for the interval.
                let _ = tokio::time::timeout(interval, hub.journal_changed()).await;
            } else {
                tokio::time::sleep(interval).await;
            }
        };
        tokio::select! {
            () = wait => {}
            // Only a real stop: a dropped sender (a `Running` let go
            // without `shutdown`) leaves the writer running.
            Ok(_) = stop.wait_for(|&stop| stop) => return,
        }
        if !commit(&hub, &store, &metrics, &failures).await {
            // Do not spin on a broken disk.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Takes the journal and commits it; whether it is on disk.
pub async fn commit(hub: &Hub, store: &Arc<Store>, metrics: &Metrics, failures: &LogEvery) -> bool {
    let Some(changes) = hub.take_changes() else { return true };
    if changes.is_empty() {
        hub.committed(changes.version);
        return true;
    }
    let started = Instant::now();
    let writer = Arc::clone(store);
    // Shared with the blocking task, so that the keys survive it whatever
    // becomes of it.
    let changes = Arc::new(changes);
    let applying = Arc::clone(&changes);
    let result = match tokio::task::spawn_blocking(move || writer.apply(&applying)).await {
        Ok(result) => result,
        Err(e) => {
            // The blocking task failed (a panic, or a runtime shutting
            // down): its transaction did not commit, so its keys are
            // dirty again, and nothing waiting for it is released.
            error!(error = %e, keys = changes.len(), "persistence writer task failed; retrying");
            Metrics::inc(&metrics.persist_commit_failures_total);
            hub.requeue(&changes);
            return false;
        }
    };
    match result {
        Ok(keys) => {
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            Metrics::inc(&metrics.persist_commits_total);
            Metrics::add(&metrics.persist_keys_written_total, keys as u64);
            Metrics::add(&metrics.persist_commit_micros_total, micros);
            metrics.persist_last_commit_micros.store(micros, std::sync::atomic::Ordering::Relaxed);
            hub.committed(changes.version);
            true
        }
        Err(e) => {
            Metrics::inc(&metrics.persist_commit_failures_total);
            if failures.due(Duration::from_secs(10)) {
                error!(error = %e, keys = changes.len(), "persistence commit failed; retrying (counted in mqseal_persist_commit_failures_total)");
            }
            hub.requeue(&changes);
            false
        }
    }
}

/// Opens the store, reads it into `router` and logs what came back.
///
/// # Errors
/// [`PersistError`] naming the file.
pub fn open_and_load(path: &Path, cache_bytes: usize, router: &mut Router, now: Millis) -> Result<Store, PersistError> {
    let started = Instant::now();
    let store = Store::open(path, cache_bytes)?;
    let loaded = store.load(router, now)?;
    if loaded.discarded > 0 {
        warn!(
            discarded = loaded.discarded,
            "persistence store: dropped retained messages that expired or are beyond the [retained] limits, and entries of ended sessions"
        );
    }
    info!(file = %path.display(), sessions = loaded.sessions, messages = loaded.messages, retained = loaded.retained,
          ended = loaded.ended, ms = started.elapsed().as_millis(), "persistence store loaded");
    Ok(store)
}
