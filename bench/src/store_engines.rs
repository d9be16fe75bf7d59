//! `store-engines`: the same persistence workload on redb and on fjall.
//!
//! **Why this exists.** The broker keeps persistent sessions, their queued
//! QoS 1/2 messages and retained messages in an embedded store under
//! `data_dir`, and which store that is should be decided by measurement on
//! the broker's own access pattern, not by reputation or by the engines'
//! own benchmarks. That pattern is a single writer doing group commits:
//! every commit carries a batch of new queue entries and deletes the entries
//! that were acknowledged shortly after they were written, and each commit
//! must be on disk before the acknowledgements it holds are sent. A start
//! then reads everything back in key order. So this measures, for each
//! engine, on the disk it is run on:
//!
//! * **commit**: transactions of `--batch` inserts plus the removal of the
//!   `--batch` entries inserted two transactions earlier (a queue that is
//!   acknowledged shortly after), each committed durably (redb
//!   `Durability::Immediate`, its default; fjall a write batch with
//!   `PersistMode::SyncAll`), until `--entries` inserts; the latency of
//!   every commit, from the start of the write transaction to its durable
//!   return. Then 1,000 commits of one insert each (and, from the third
//!   on, the removal of the entry two commits earlier): a lone publisher, where
//!   nothing is grouped.
//! * **reopen**: the database dropped, reopened and every remaining entry
//!   read (their number is checked).
//! * **restart with a long queue**: `--entries` entries written in batches
//!   with no deletes, then reopened and read back.
//! * the size of the directory on disk after each phase.
//!
//! Keys are the broker's shape, a client id (10,000 of them, `dev-00042`),
//! a zero byte and a big-endian sequence number that grows across the run;
//! values are `--payload-bytes` of deterministic pseudo-random bytes. Both
//! engines get the broker's default cache (`persistence.cache_mib = 16`).
//! redb is also timed opening with `set_check_integrity_on_open(true)`, the
//! way the broker opens its file. The page cache is warm for every reopen:
//! the figures are what a restart costs, not a cold boot.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::json;

use crate::{Failure, percentile};

/// `store-engines`
#[derive(Args)]
pub struct StoreEngines {
    /// Directory to put the databases in (one sub-directory per engine and
    /// phase, removed afterwards); a temporary directory when absent. Put it
    /// on the disk the broker's `data_dir` is on.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Inserts in the commit phase, and entries in the long-queue phase.
    #[arg(long, default_value_t = 100_000)]
    entries: usize,
    /// Inserts (and removals) per transaction.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 300)]
    payload_bytes: usize,
    /// Which engine to measure.
    #[arg(long, value_enum, default_value_t = EngineChoice::Both)]
    engine: EngineChoice,
}

/// Which engine `store-engines` measures.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum EngineChoice {
    /// redb 4: a copy-on-write B-tree in one file.
    Redb,
    /// fjall 3: an LSM tree with a journal, in a directory.
    Fjall,
    /// redb, then fjall.
    Both,
}

/// Commits of the lone-publisher pass (one insert, and one removal, each).
const LONE_COMMITS: usize = 1000;
/// Distinct client ids in the keys.
const CLIENTS: u64 = 10_000;
/// The broker's default store cache (`persistence.cache_mib`).
const CACHE_BYTES: usize = 16 << 20;
/// How many transactions later an entry is removed in the queue phases.
const ACK_LAG: usize = 2;

/// One key and its value.
type Entry = (Vec<u8>, Vec<u8>);

/// What the workload needs of an engine.
trait Engine: Sized {
    const NAME: &'static str;
    /// Makes a new, empty database in `dir` (which exists and is empty).
    fn create(dir: &Path) -> Result<Self, Failure>;
    /// Opens the database `create` made in `dir`.
    fn open(dir: &Path) -> Result<Self, Failure>;
    /// Opens it the way the broker would after a crash or on every start,
    /// when that differs from `open`: `None` when it does not.
    fn open_verified(_dir: &Path) -> Result<Option<Self>, Failure> {
        Ok(None)
    }
    /// One transaction, durable when this returns.
    fn commit(&mut self, inserts: &[Entry], removes: &[Vec<u8>]) -> Result<(), Failure>;
    /// Reads every key and value: how many there are, and whether any
    /// value is not `payload` bytes long.
    fn scan(&self, payload: usize) -> Result<Scan, Failure>;
}

/// What a full scan saw.
struct Scan {
    rows: usize,
    bad_values: usize,
}

/// `client id ++ 0x00 ++ seq (big-endian)`, client ids `dev-00000..dev-09999`.
fn key(seq: u64) -> Vec<u8> {
    let mut k = format!("dev-{:05}", seq % CLIENTS).into_bytes();
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `len` bytes that do not compress, the same for the same `seq`
/// (splitmix64 seeded with it).
fn value(seq: u64, len: usize) -> Vec<u8> {
    let mut state = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        v.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    v.truncate(len);
    v
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The sum of the lengths of the files under `dir`.
fn dir_bytes(dir: &Path) -> Result<u64, Failure> {
    let mut total = 0;
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let meta = entry.metadata().map_err(|e| format!("{}: {e}", entry.path().display()))?;
        if meta.is_dir() {
            total += dir_bytes(&entry.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

/// What a run of commits measured.
struct Commits {
    /// Per-commit latencies, sorted.
    latencies_us: Vec<u64>,
    inserts: usize,
    removes: usize,
    wall: Duration,
    /// Entries that should still be in the database.
    remaining: usize,
}

impl Commits {
    fn ops_per_sec(&self) -> f64 {
        (self.inserts + self.removes) as f64 / self.wall.as_secs_f64().max(1e-9)
    }
    fn p(&self, p: f64) -> u64 {
        percentile(&self.latencies_us, p)
    }
}

/// Commits `inserts` new entries, `batch` per transaction. With `ack_lag`,
/// each transaction also removes the entries inserted that many
/// transactions before it.
fn run_commits<E: Engine>(
    store: &mut E,
    seq: &mut u64,
    inserts: usize,
    batch: usize,
    payload: usize,
    ack_lag: Option<usize>,
) -> Result<Commits, Failure> {
    let mut unacked: VecDeque<Vec<Vec<u8>>> = VecDeque::new();
    let mut latencies_us = Vec::with_capacity(inserts.div_ceil(batch.max(1)));
    let (mut inserted, mut removed, mut kept) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    while inserted < inserts {
        let n = batch.min(inserts - inserted);
        let new: Vec<Entry> = (0..n)
            .map(|_| {
                let s = *seq;
                *seq += 1;
                (key(s), value(s, payload))
            })
            .collect();
        let acked = match ack_lag {
            Some(lag) if unacked.len() >= lag => unacked.pop_front().unwrap_or_default(),
            _ => Vec::new(),
        };
        let t0 = Instant::now();
        store.commit(&new, &acked)?;
        latencies_us.push(micros(t0.elapsed()));
        inserted += n;
        removed += acked.len();
        if ack_lag.is_some() {
            unacked.push_back(new.into_iter().map(|(k, _)| k).collect());
        } else {
            kept += n;
        }
    }
    let wall = started.elapsed();
    latencies_us.sort_unstable();
    let remaining = kept + unacked.iter().map(Vec::len).sum::<usize>();
    Ok(Commits { latencies_us, inserts: inserted, removes: removed, wall, remaining })
}

/// What a reopen and full scan measured.
struct Reopen {
    open: Duration,
    open_scan: Duration,
    /// Open with the engine's integrity check, then scan (redb only).
    verified_open: Option<Duration>,
    verified_open_scan: Option<Duration>,
    rows: usize,
}

fn scan_checked<E: Engine>(store: &E, expected: usize, payload: usize, what: &str) -> Result<usize, Failure> {
    let scan = store.scan(payload)?;
    if scan.rows != expected {
        return Err(format!("{}: {what}: read back {} entries, expected {expected}", E::NAME, scan.rows));
    }
    if scan.bad_values > 0 {
        return Err(format!("{}: {what}: {} values are not {payload} bytes long", E::NAME, scan.bad_values));
    }
    Ok(scan.rows)
}

/// Opens the closed database in `dir`, reads everything, checks the count.
fn reopen<E: Engine>(dir: &Path, expected: usize, payload: usize, what: &str) -> Result<Reopen, Failure> {
    let t0 = Instant::now();
    let store = E::open(dir)?;
    let open = t0.elapsed();
    let rows = scan_checked(&store, expected, payload, what)?;
    let open_scan = t0.elapsed();
    drop(store);
    let t0 = Instant::now();
    let (verified_open, verified_open_scan) = match E::open_verified(dir)? {
        Some(store) => {
            let open = t0.elapsed();
            scan_checked(&store, expected, payload, what)?;
            (Some(open), Some(t0.elapsed()))
        }
        None => (None, None),
    };
    Ok(Reopen { open, open_scan, verified_open, verified_open_scan, rows })
}

/// A fresh sub-directory of `base` for one engine and phase.
fn phase_dir(base: &Path, engine: &str, phase: &str) -> Result<PathBuf, Failure> {
    let dir = base.join(format!("{engine}-{phase}"));
    if dir.exists() {
        return Err(format!("{} exists already: remove it, or pass another --dir", dir.display()));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

fn remove_dir(dir: &Path) -> Result<(), Failure> {
    std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()))
}

fn run<E: Engine>(a: &StoreEngines, base: &Path) -> Result<serde_json::Value, Failure> {
    let (batch, payload) = (a.batch, a.payload_bytes);
    let mut seq = 0u64;

    // Group commit: a queue acknowledged two transactions after it was written.
    let dir = phase_dir(base, E::NAME, "queue")?;
    let mut store = E::create(&dir)?;
    let grouped = run_commits(&mut store, &mut seq, a.entries, batch, payload, Some(ACK_LAG))?;
    let disk_after_commit = dir_bytes(&dir)?;
    drop(store);
    let queue_reopen = reopen::<E>(&dir, grouped.remaining, payload, "reopen after the commit phase")?;
    let disk_after_reopen = dir_bytes(&dir)?;
    remove_dir(&dir)?;

    // A lone publisher: one insert (and one removal) per commit, nothing grouped.
    let dir = phase_dir(base, E::NAME, "lone")?;
    let mut store = E::create(&dir)?;
    let lone = run_commits(&mut store, &mut seq, LONE_COMMITS, 1, payload, Some(ACK_LAG))?;
    let disk_after_batch1 = dir_bytes(&dir)?;
    drop(store);
    remove_dir(&dir)?;

    // A restart with a long queue: nothing acknowledged.
    let dir = phase_dir(base, E::NAME, "fill")?;
    let mut store = E::create(&dir)?;
    let fill = run_commits(&mut store, &mut seq, a.entries, batch, payload, None)?;
    let disk_after_fill = dir_bytes(&dir)?;
    drop(store);
    let fill_reopen = reopen::<E>(&dir, fill.remaining, payload, "reopen after the fill")?;
    let disk_after_fill_reopen = dir_bytes(&dir)?;
    remove_dir(&dir)?;

    let ms = |d: Option<Duration>| d.map(millis);
    eprintln!(
        "[{}] batch {batch}, {payload} B: {} commits p50 {} µs p99 {} µs, {:.0} ops/s; batch 1: p50 {} µs p99 {} µs; \
         reopen+scan {:.1} ms ({} left); {} entries filled in {:.2} s, reopen+scan {:.1} ms{}; disk {} → {} bytes",
        E::NAME,
        grouped.latencies_us.len(),
        grouped.p(50.0),
        grouped.p(99.0),
        grouped.ops_per_sec(),
        lone.p(50.0),
        lone.p(99.0),
        millis(queue_reopen.open_scan),
        queue_reopen.rows,
        fill_reopen.rows,
        fill.wall.as_secs_f64(),
        millis(fill_reopen.open_scan),
        fill_reopen.verified_open_scan.map_or(String::new(), |d| format!(" (verified open: {:.1} ms)", millis(d))),
        disk_after_commit,
        disk_after_fill,
    );
    Ok(json!({
        "scenario": "store_engines", "engine": E::NAME,
        "entries": a.entries, "batch": batch, "payload_bytes": payload,
        "commits": grouped.latencies_us.len(),
        "commit_p50_us": grouped.p(50.0), "commit_p99_us": grouped.p(99.0),
        "commit_max_us": grouped.latencies_us.last().copied().unwrap_or(0),
        "inserts": grouped.inserts, "removes": grouped.removes,
        "commit_secs": grouped.wall.as_secs_f64(), "ops_per_sec": grouped.ops_per_sec(),
        "batch1_commits": lone.latencies_us.len(),
        "batch1_p50_us": lone.p(50.0), "batch1_p99_us": lone.p(99.0),
        "batch1_max_us": lone.latencies_us.last().copied().unwrap_or(0),
        "reopen_rows": queue_reopen.rows,
        "reopen_open_ms": millis(queue_reopen.open),
        "reopen_scan_ms": millis(queue_reopen.open_scan),
        "reopen_verified_open_ms": ms(queue_reopen.verified_open),
        "reopen_verified_scan_ms": ms(queue_reopen.verified_open_scan),
        "fill_rows": fill_reopen.rows,
        "fill_secs": fill.wall.as_secs_f64(),
        "fill_commit_p50_us": fill.p(50.0), "fill_commit_p99_us": fill.p(99.0),
        "fill_reopen_open_ms": millis(fill_reopen.open),
        "fill_reopen_scan_ms": millis(fill_reopen.open_scan),
        "fill_reopen_verified_open_ms": ms(fill_reopen.verified_open),
        "fill_reopen_verified_scan_ms": ms(fill_reopen.verified_open_scan),
        "disk_bytes": {
            "after_commit": disk_after_commit,
            "after_reopen": disk_after_reopen,
            "after_batch1": disk_after_batch1,
            "after_fill": disk_after_fill,
            "after_fill_reopen": disk_after_fill_reopen,
        },
    }))
}

/// Runs the workload on the engines asked for: one JSON object each.
pub fn store_engines(a: StoreEngines) -> Result<serde_json::Value, Failure> {
    if a.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    let temp;
    let base = match &a.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::TempDir::new().map_err(|e| format!("temporary directory: {e}"))?;
            temp.path().to_owned()
        }
    };
    let mut results = Vec::new();
    if matches!(a.engine, EngineChoice::Redb | EngineChoice::Both) {
        results.push(run::<Redb>(&a, &base)?);
    }
    if matches!(a.engine, EngineChoice::Fjall | EngineChoice::Both) {
        results.push(run::<Fjall>(&a, &base)?);
    }
    Ok(serde_json::Value::Array(results))
}

const REDB_FILE: &str = "store.redb";
const REDB_TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("queue");

fn redb_error(e: impl Into<redb::Error>) -> Failure {
    format!("redb: {}", e.into())
}

/// One redb file, one table.
struct Redb {
    db: redb::Database,
}

impl Redb {
    fn builder() -> redb::Builder {
        let mut b = redb::Database::builder();
        b.set_cache_size(CACHE_BYTES);
        b
    }
}

impl Engine for Redb {
    const NAME: &'static str = "redb";

    fn create(dir: &Path) -> Result<Self, Failure> {
        let db = Self::builder().create(dir.join(REDB_FILE)).map_err(redb_error)?;
        let txn = db.begin_write().map_err(redb_error)?;
        txn.open_table(REDB_TABLE).map_err(redb_error)?;
        txn.commit().map_err(redb_error)?;
        Ok(Self { db })
    }

    fn open(dir: &Path) -> Result<Self, Failure> {
        let db = Self::builder().open(dir.join(REDB_FILE)).map_err(redb_error)?;
        Ok(Self { db })
    }

    fn open_verified(dir: &Path) -> Result<Option<Self>, Failure> {
        let db = Self::builder().set_check_integrity_on_open(true).open(dir.join(REDB_FILE)).map_err(redb_error)?;
        Ok(Some(Self { db }))
    }

    fn commit(&mut self, inserts: &[Entry], removes: &[Vec<u8>]) -> Result<(), Failure> {
        // Durability::Immediate is the default: durable when commit returns.
        let txn = self.db.begin_write().map_err(redb_error)?;
        {
            let mut table = txn.open_table(REDB_TABLE).map_err(redb_error)?;
            for (k, v) in inserts {
                table.insert(k.as_slice(), v.as_slice()).map_err(redb_error)?;
            }
            for k in removes {
                table.remove(k.as_slice()).map_err(redb_error)?;
            }
        }
        txn.commit().map_err(redb_error)
    }

    fn scan(&self, payload: usize) -> Result<Scan, Failure> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.db.begin_read().map_err(redb_error)?;
        let table = txn.open_table(REDB_TABLE).map_err(redb_error)?;
        let mut scan = Scan { rows: 0, bad_values: 0 };
        for entry in table.iter().map_err(redb_error)? {
            let (_key, value) = entry.map_err(redb_error)?;
            scan.rows += 1;
            if value.value().len() != payload {
                scan.bad_values += 1;
            }
        }
        Ok(scan)
    }
}

fn fjall_error(e: fjall::Error) -> Failure {
    format!("fjall: {e}")
}

/// One fjall database (a directory), one keyspace.
struct Fjall {
    db: fjall::Database,
    keyspace: fjall::Keyspace,
}

impl Engine for Fjall {
    const NAME: &'static str = "fjall";

    fn create(dir: &Path) -> Result<Self, Failure> {
        Self::open(dir)
    }

    fn open(dir: &Path) -> Result<Self, Failure> {
        let db = fjall::Database::builder(dir).cache_size(CACHE_BYTES as u64).open().map_err(fjall_error)?;
        let keyspace = db.keyspace("queue", fjall::KeyspaceCreateOptions::default).map_err(fjall_error)?;
        Ok(Self { db, keyspace })
    }

    fn commit(&mut self, inserts: &[Entry], removes: &[Vec<u8>]) -> Result<(), Failure> {
        // The batch fsyncs its journal (SyncAll) before commit returns,
        // under the journal's lock: the same as `db.persist(SyncAll)` after
        // it, without another writer's batch slipping in between.
        let mut batch = self.db.batch().durability(Some(fjall::PersistMode::SyncAll));
        for (k, v) in inserts {
            batch.insert(&self.keyspace, k.as_slice(), v.as_slice());
        }
        for k in removes {
            batch.remove(&self.keyspace, k.as_slice());
        }
        batch.commit().map_err(fjall_error)
    }

    fn scan(&self, payload: usize) -> Result<Scan, Failure> {
        let mut scan = Scan { rows: 0, bad_values: 0 };
        for guard in self.keyspace.iter() {
            let (_key, value) = guard.into_inner().map_err(fjall_error)?;
            scan.rows += 1;
            if value.len() != payload {
                scan.bad_values += 1;
            }
        }
        Ok(scan)
    }
}
