//! What the agent must remember across restarts to execute each command at
//! most once, and answer each at least once.
//!
//! Two things, saved together in one file (`state.bin`, 0600) with the
//! write-to-temporary, fsync, rename, fsync-directory dance, *before* a
//! command runs:
//!
//! * `proto`'s sealed-mode replay cache, so a captured command republished
//!   after a restart is still refused;
//! * the response journal: for every command accepted, the SHA-256 of its
//!   envelope and — once it has run — the response sent. MQTT QoS 1 may
//!   deliver the same publish twice (the broker never saw our PUBACK); the
//!   second delivery finds its hash here and gets the stored response again
//!   instead of a second execution.
//!
//! Challenge-mode commands need no replay cache — their challenge is
//! single-use and lives only in memory, so a restart invalidates all of
//! them — but they go through the journal like sealed ones.
//!
//! Each entry also keeps what the command's receipt is bound to (its
//! [`ReplyContext`]: no command content, no secret), so that a command the
//! agent was killed in the middle of still gets an answer after the
//! restart — an authenticated `failed` saying it was interrupted and not
//! run again — instead of leaving its sender to time out.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Format version of `state.bin`: 2 added [`Entry::reply`]; version 1
/// files are still read (their entries have no reply context).
const VERSION: u8 = 2;

/// Journal entries kept; beyond this the soonest-expiring are forgotten (a
/// later redelivery of those then meets the replay cache, and is refused).
pub const JOURNAL_CAPACITY: usize = 1024;

/// A response as it was published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Where it went.
    pub topic: String,
    /// The envelope.
    pub payload: Vec<u8>,
}

/// What an accepted command's receipt is bound to, kept so that a receipt
/// can be made after a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyContext {
    /// Sealed mode: the signing controller's key id, the command's message
    /// id and expiry.
    Sealed {
        /// Key id of the controller that signed the command.
        sender: [u8; 32],
        /// The command's message id.
        msg_id: [u8; 16],
        /// Its expiry.
        expires_at: u64,
    },
    /// Challenge mode: the command's message id, the challenge it used (the
    /// receipt is tagged over it), its expiry and form.
    Challenge {
        /// The command's message id.
        msg_id: [u8; 16],
        /// The challenge it answered.
        challenge: [u8; 16],
        /// Its expiry.
        expires_at: u64,
        /// Whether it came in hidden form.
        hidden: bool,
    },
}

/// One accepted command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The command's expiry; the entry is useless after it (plus skew).
    pub expires_at: u64,
    /// `None` while running, or if the agent stopped mid-command and has
    /// not answered for it yet.
    pub response: Option<Stored>,
    /// What a receipt for it is bound to (`None` in version 1 files).
    pub reply: Option<ReplyContext>,
}

/// Version 1's entry, read for migration.
#[derive(Deserialize)]
struct EntryV1 {
    expires_at: u64,
    response: Option<Stored>,
}

/// The response journal, keyed by SHA-256 of the command envelope.
#[derive(Clone, Debug, Default)]
pub struct Journal {
    entries: BTreeMap<[u8; 32], Entry>,
}

impl Journal {
    /// The entry for an envelope hash.
    pub fn get(&self, key: &[u8; 32]) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Records that a command was accepted and is about to run.
    pub fn begin(&mut self, key: [u8; 32], expires_at: u64, reply: ReplyContext) {
        self.entries.insert(key, Entry { expires_at, response: None, reply: Some(reply) });
    }

    /// Commands accepted but never answered — the agent stopped while they
    /// ran — that can still be answered: their keys and reply contexts.
    pub fn unanswered(&self) -> Vec<([u8; 32], ReplyContext)> {
        self.entries.iter().filter(|(_, e)| e.response.is_none()).filter_map(|(k, e)| Some((*k, e.reply?))).collect()
    }

    /// Records the response a command got.
    pub fn complete(&mut self, key: [u8; 32], response: Stored) {
        if let Some(e) = self.entries.get_mut(&key) {
            e.response = Some(response);
        }
    }

    /// Forgets entries that can no longer matter at `now`, then the
    /// soonest-expiring ones beyond [`JOURNAL_CAPACITY`].
    pub fn prune(&mut self, now: u64, skew: u64) {
        self.entries.retain(|_, e| now < e.expires_at.saturating_add(skew));
        while self.entries.len() > JOURNAL_CAPACITY {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.expires_at).map(|(k, _)| *k) else { break };
            self.entries.remove(&oldest);
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    replay: Vec<u8>,
    journal: Vec<([u8; 32], Entry)>,
}

#[derive(Deserialize)]
struct PersistedV1 {
    replay: Vec<u8>,
    journal: Vec<([u8; 32], EntryV1)>,
}

/// Why saved state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not ours, or damaged.
    #[error("{path}: {what}; refusing to start with an empty replay cache (see --reset-state)")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
}

/// The state file in the state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    /// The state kept in `dir` (created 0700 if missing).
    ///
    /// # Errors
    /// [`StateError::Io`] if the folder cannot be created.
    pub fn open(dir: &Path) -> Result<StateFile, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Io { path: dir.display().to_string(), source })?;
        Ok(StateFile { dir: dir.to_owned() })
    }

    fn path(&self) -> PathBuf {
        self.dir.join("state.bin")
    }

    /// The saved replay cache bytes and journal, if a state file exists.
    ///
    /// # Errors
    /// [`StateError::Corrupt`] for a damaged file: the caller must not carry
    /// on as if nothing had been saved.
    pub fn load(&self) -> Result<Option<(Vec<u8>, Journal)>, StateError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path: path.display().to_string(), source }),
        };
        let corrupt = |what: &str| StateError::Corrupt { path: path.display().to_string(), what: what.into() };
        let p: Persisted = match bytes.split_first() {
            Some((&VERSION, body)) => postcard::from_bytes(body).map_err(|_| corrupt("undecodable"))?,
            Some((1, body)) => {
                let v1: PersistedV1 = postcard::from_bytes(body).map_err(|_| corrupt("undecodable"))?;
                Persisted {
                    replay: v1.replay,
                    journal: v1
                        .journal
                        .into_iter()
                        .map(|(k, e)| (k, Entry { expires_at: e.expires_at, response: e.response, reply: None }))
                        .collect(),
                }
            }
            Some(_) => return Err(corrupt("unknown format version")),
            None => return Err(corrupt("empty file")),
        };
        Ok(Some((p.replay, Journal { entries: p.journal.into_iter().collect() })))
    }

    /// Saves atomically and durably: after this returns, a power cut leaves
    /// either the old or the new state, never a torn one.
    ///
    /// # Errors
    /// [`StateError::Io`] naming the file; the caller must then refuse to
    /// execute.
    pub fn save(&self, replay: &[u8], journal: &Journal) -> Result<(), StateError> {
        let p = Persisted {
            replay: replay.to_vec(),
            journal: journal.entries.iter().map(|(k, e)| (*k, e.clone())).collect(),
        };
        let mut bytes = vec![VERSION];
        bytes = postcard::to_extend(&p, bytes).map_err(|_| StateError::Corrupt {
            path: self.path().display().to_string(),
            what: "cannot encode".into(),
        })?;
        let tmp = self.dir.join("state.bin.tmp");
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| StateError::Io { path, source }
        };
        let mut f =
            OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        let path = self.path();
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const CTX: ReplyContext =
        ReplyContext::Challenge { msg_id: [3; 16], challenge: [4; 16], expires_at: 50, hidden: false };

    /// A version 1 file (written before entries kept their reply context)
    /// still loads: its unanswered entries cannot be answered, but they
    /// still stop a second execution.
    #[test]
    fn version_1_state_is_read() {
        /// Version 1's entry: expiry and response.
        type EntryV1 = (u64, Option<Stored>);
        #[derive(Serialize)]
        struct V1 {
            replay: Vec<u8>,
            journal: Vec<([u8; 32], EntryV1)>,
        }
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::open(dir.path()).unwrap();
        let v1 = V1 { replay: b"r".to_vec(), journal: vec![([7; 32], (90, None))] };
        let bytes = postcard::to_extend(&v1, vec![1u8]).unwrap();
        fs::write(dir.path().join("state.bin"), bytes).unwrap();
        let (replay, j) = sf.load().unwrap().unwrap();
        assert_eq!(replay, b"r");
        assert_eq!(j.get(&[7; 32]), Some(&Entry { expires_at: 90, response: None, reply: None }));
        assert!(j.unanswered().is_empty());
    }

    #[test]
    fn state_round_trips_privately_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::open(&dir.path().join("s")).unwrap();
        assert!(sf.load().unwrap().is_none());
        let mut j = Journal::default();
        j.begin([1; 32], 100, CTX);
        j.complete([1; 32], Stored { topic: "t".into(), payload: vec![9, 9] });
        j.begin([2; 32], 50, CTX);
        sf.save(b"\x01replay", &j).unwrap();
        let (replay, back) = sf.load().unwrap().unwrap();
        assert_eq!(replay, b"\x01replay");
        assert_eq!(back.get(&[1; 32]).unwrap().response.as_ref().unwrap().payload, vec![9, 9]);
        assert_eq!(back.get(&[2; 32]).unwrap().response, None);
        assert_eq!(back.unanswered(), vec![([2; 32], CTX)]);
        let mode = fs::metadata(dir.path().join("s/state.bin")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        fs::write(dir.path().join("s/state.bin"), b"\x01garbage\xff\xff\xff").unwrap();
        assert!(sf.load().unwrap_err().to_string().contains("--reset-state"));
        fs::write(dir.path().join("s/state.bin"), b"").unwrap();
        assert!(sf.load().unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn an_unwritable_state_dir_is_an_error_not_a_silent_loss() {
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::open(dir.path()).unwrap();
        // A directory where the temporary file should go: fails even as root.
        fs::create_dir(dir.path().join("state.bin.tmp")).unwrap();
        let err = sf.save(b"x", &Journal::default()).unwrap_err().to_string();
        assert!(err.contains("state.bin.tmp"), "{err}");
    }

    #[test]
    fn pruning_forgets_expired_then_the_soonest_expiring() {
        let mut j = Journal::default();
        j.begin([1; 32], 10, CTX);
        j.begin([2; 32], 100, CTX);
        j.prune(20, 5);
        assert!(j.get(&[1; 32]).is_none() && j.get(&[2; 32]).is_some());
        for i in 0..JOURNAL_CAPACITY + 5 {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64).to_be_bytes());
            j.begin(k, 1000 + i as u64, CTX);
        }
        j.prune(20, 5);
        assert_eq!(j.len(), JOURNAL_CAPACITY);
        assert!(j.get(&[2; 32]).is_none(), "the soonest-expiring went first");
    }
}
