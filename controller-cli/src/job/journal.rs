//! A job on disk: `data_dir/jobs/ID/` holds `job.json` (the [`JobSpec`],
//! written once), `events.jsonl` (the [`Event`]s, appended and fsync'd
//! before the envelopes they describe are published), `lock` (held by the
//! process running the job, so two cannot drive it at once) and, when
//! asked, `cancel` (how `mqseal job cancel` reaches a running job). All
//! 0600: the journal holds sealed attempts' receipt keys, the registry
//! beside it holds the devices' HMAC keys.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use mqseal_store::write_private;

use super::{Event, Job, JobSpec};

/// Why a job's files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file is not what a job's should be.
    #[error("{path}: line {line}: {message}")]
    Corrupt {
        /// Which file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// No such job.
    #[error("no job {0} (see mqseal job list)")]
    Unknown(String),
    /// Another process is running it.
    #[error("job {0} is being run by another process")]
    Busy(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.display().to_string(), source }
}

/// The folder holding every job.
pub fn jobs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("jobs")
}

/// One job's files, opened by the process that runs it (holding its lock).
pub struct Journal {
    dir: PathBuf,
    events: File,
    _lock: File,
}

impl Journal {
    /// Creates the job's folder and writes its spec.
    ///
    /// # Errors
    /// [`JournalError`] naming the file.
    pub fn create(data_dir: &Path, spec: &JobSpec) -> Result<Journal, JournalError> {
        let dir = jobs_dir(data_dir).join(&spec.id);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join("job.json");
        let text = serde_json::to_string_pretty(spec).map_err(|e| JournalError::Corrupt {
            path: path.display().to_string(),
            line: 0,
            message: e.to_string(),
        })?;
        write_private(&path, text.as_bytes()).map_err(io(&path))?;
        Journal::open_dir(dir, &spec.id)
    }

    /// Opens an existing job for running it, and the job as its journal
    /// left it.
    ///
    /// # Errors
    /// [`JournalError::Unknown`], [`JournalError::Busy`], or a file that
    /// cannot be read.
    pub fn open(data_dir: &Path, id: &str) -> Result<(Journal, Job), JournalError> {
        // Known first, then locked, then read: what another runner wrote up
        // to its last breath is in what this one replays.
        let journal = Journal::open_dir(job_dir(data_dir, id)?, id)?;
        Ok((journal, read(data_dir, id)?))
    }

    fn open_dir(dir: PathBuf, id: &str) -> Result<Journal, JournalError> {
        let lock_path = dir.join("lock");
        let lock = private_file(&lock_path, false)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(JournalError::Busy(id.to_owned())),
            Err(fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let events_path = dir.join("events.jsonl");
        let events = private_file(&events_path, true)?;
        // A torn last line (a crash mid-append) is cut off before anything
        // is appended after it; `read` already ignores it.
        let text = zeroize::Zeroizing::new(fs::read(&events_path).map_err(io(&events_path))?);
        if !text.is_empty() && !text.ends_with(b"\n") {
            let keep = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            events.set_len(keep as u64).map_err(io(&events_path))?;
        }
        Ok(Journal { dir, events, _lock: lock })
    }

    /// Appends `events` and syncs them to disk.
    ///
    /// # Errors
    /// [`JournalError`] naming the file.
    pub fn append(&mut self, events: &[Event]) -> Result<(), JournalError> {
        if events.is_empty() {
            return Ok(());
        }
        let path = self.dir.join("events.jsonl");
        // Sealed-mode events carry receipt keys: the buffer is wiped.
        let mut text = zeroize::Zeroizing::new(Vec::new());
        for e in events {
            serde_json::to_writer(&mut *text, e).map_err(|e| JournalError::Corrupt {
                path: path.display().to_string(),
                line: 0,
                message: e.to_string(),
            })?;
            text.push(b'\n');
        }
        self.events.write_all(&text).map_err(io(&path))?;
        self.events.sync_data().map_err(io(&path))
    }

    /// Whether `mqseal job cancel` asked this job to stop.
    pub fn cancel_requested(&self) -> bool {
        self.dir.join("cancel").exists()
    }
}

/// Opens (creating, 0600) a file for appending or for its lock.
fn private_file(path: &Path, append: bool) -> Result<File, JournalError> {
    let mut options = OpenOptions::new();
    options.create(true);
    if append {
        options.append(true);
    } else {
        options.write(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map_err(io(path))
}

/// The folder of job `id`, if `id` names one (ids are letters, digits
/// and `-`: never a path).
fn job_dir(data_dir: &Path, id: &str) -> Result<PathBuf, JournalError> {
    let dir = jobs_dir(data_dir).join(id);
    let valid = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if valid && dir.join("job.json").exists() { Ok(dir) } else { Err(JournalError::Unknown(id.to_owned())) }
}

/// A job as its files say, for `status` and `list` (no lock taken).
///
/// # Errors
/// [`JournalError::Unknown`], or a file that cannot be read or parsed.
pub fn read(data_dir: &Path, id: &str) -> Result<Job, JournalError> {
    let dir = job_dir(data_dir, id)?;
    let spec_path = dir.join("job.json");
    let text = match fs::read_to_string(&spec_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(JournalError::Unknown(id.to_owned())),
        Err(e) => return Err(io(&spec_path)(e)),
    };
    let spec: JobSpec = serde_json::from_str(&text).map_err(|e| JournalError::Corrupt {
        path: spec_path.display().to_string(),
        line: e.line(),
        message: e.to_string(),
    })?;
    let events_path = dir.join("events.jsonl");
    // Wiped after parsing: sealed-mode events carry receipt keys.
    let text = match fs::read_to_string(&events_path) {
        Ok(t) => zeroize::Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => zeroize::Zeroizing::new(String::new()),
        Err(e) => return Err(io(&events_path)(e)),
    };
    let mut events = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Event>(line) {
            Ok(e) => events.push(e),
            // A crash in the middle of an append leaves a torn last line:
            // the step it describes never happened (its envelopes were not
            // published before the append returned).
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => {
                return Err(JournalError::Corrupt {
                    path: events_path.display().to_string(),
                    line: i + 1,
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(Job::replay(spec, &events))
}

/// Every job's id, oldest first (ids start with their creation time).
///
/// # Errors
/// The jobs folder cannot be read.
pub fn list(data_dir: &Path) -> Result<Vec<String>, JournalError> {
    let dir = jobs_dir(data_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&dir)(e)),
    };
    let mut ids: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("job.json").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    ids.sort();
    Ok(ids)
}

/// Asks job `id` to stop: the process running it sees the request within
/// a second; with none running, the job is ended here.
///
/// # Errors
/// [`JournalError`] as for [`read`], or the request cannot be written.
pub fn request_cancel(data_dir: &Path, id: &str, unix_ms: u64) -> Result<Job, JournalError> {
    let job = read(data_dir, id)?;
    let marker = job_dir(data_dir, id)?.join("cancel");
    write_private(&marker, b"").map_err(io(&marker))?;
    match Journal::open(data_dir, id) {
        Ok((mut journal, mut job)) => {
            job.cancel(unix_ms);
            job.due(tokio::time::Instant::now(), unix_ms);
            journal.append(&job.take_events())?;
            Ok(job)
        }
        Err(JournalError::Busy(_)) => Ok(job),
        Err(e) => Err(e),
    }
}
