//! What the agent must remember across restarts to execute each command at
//! most once, and answer each at least once.
//!
//! Two things, saved together in one file (`state.bin`, 0600) with the
//! write-to-temporary, fsync, rename, fsync-directory dance, *before* a
//! command runs:
//!
//! * `proto`'s sealed-mode replay cache, so a captured command republished
//!   after a restart is still refused;
//! * the response journal: for every command accepted, what identifies it
//!   and — once it has run — the response sent. MQTT QoS 1 may deliver the
//!   same publish twice (the broker never saw our PUBACK), and a controller
//!   may send copies of a challenge-mode command over other challenges
//!   (docs/PROTOCOL.md §6.5); a copy finds its entry here and, once the
//!   agent has checked that it is authentic, gets the stored response again
//!   instead of a second execution.
//!
//! An entry is keyed by the command's identity, not its bytes: the signing
//! controller's key id and the message id (sealed mode), or the message id
//! (challenge mode: one key per device, and a copy over another challenge
//! is the same command). Keyed by bytes, a re-encoded copy that ran first
//! would make the genuine one look new — then refused, its sender left
//! without an answer although the command ran (the outside attack's D4).
//! The envelope's SHA-256 is kept too: a byte-identical copy needs no
//! second verification.
//!
//! Challenge-mode commands need no replay cache — their challenge is
//! single-use and lives only in memory, so a restart invalidates all of
//! them — but they go through the journal like sealed ones.
//!
//! Each entry also keeps what the command's receipt is bound to (its
//! [`ReplyContext`]: no command content), so that a command the agent was
//! killed in the middle of still gets an answer after the restart — an
//! authenticated `failed` saying it was interrupted and not run again —
//! instead of leaving its sender to time out. For a sealed command that
//! includes its receipt key, a secret that reads that one receipt: the file
//! is 0600 in a 0700 folder, like the device's private key.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Format version of `state.bin`: 2 added [`Entry::reply`], 3 keys the
/// journal by command identity and added [`Entry::digest`]. Versions 1 and
/// 2 are still read (version 1 entries have no reply context, so they
/// keep their old key: they can no longer be matched, only expire).
const VERSION: u8 = 3;

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
///
/// `Debug` leaves out the receipt key: journals end up in logs and panic
/// messages, and the key is as secret as the command it answers.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyContext {
    /// Sealed mode without a receipt key: as agents before receipt keys
    /// wrote it (variant 0 of the file format), or a command already
    /// answered, whose key is dropped with the stored receipt
    /// ([`Journal::complete`]). Such a command cannot be answered anew and
    /// is kept only so that a copy still finds its stored response.
    SealedUnkeyed {
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
    /// Sealed mode: the signing controller's key id, the command's message
    /// id and expiry, and the key its receipt is encrypted under.
    Sealed {
        /// Key id of the controller that signed the command.
        sender: [u8; 32],
        /// The command's message id.
        msg_id: [u8; 16],
        /// Its expiry.
        expires_at: u64,
        /// `proto::sealed::ReceiptKey`'s bytes.
        receipt_key: [u8; 32],
    },
}

impl std::fmt::Debug for ReplyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyContext::SealedUnkeyed { sender, msg_id, expires_at } => f
                .debug_struct("SealedUnkeyed")
                .field("sender", sender)
                .field("msg_id", msg_id)
                .field("expires_at", expires_at)
                .finish(),
            ReplyContext::Challenge { msg_id, challenge, expires_at, hidden } => f
                .debug_struct("Challenge")
                .field("msg_id", msg_id)
                .field("challenge", challenge)
                .field("expires_at", expires_at)
                .field("hidden", hidden)
                .finish(),
            ReplyContext::Sealed { sender, msg_id, expires_at, .. } => f
                .debug_struct("Sealed")
                .field("sender", sender)
                .field("msg_id", msg_id)
                .field("expires_at", expires_at)
                .field("receipt_key", &"<redacted>")
                .finish(),
        }
    }
}

impl ReplyContext {
    /// The journal key of the command this context belongs to.
    pub fn key(&self) -> [u8; 32] {
        match self {
            ReplyContext::Sealed { sender, msg_id, .. } | ReplyContext::SealedUnkeyed { sender, msg_id, .. } => {
                sealed_key(sender, msg_id)
            }
            ReplyContext::Challenge { msg_id, .. } => challenge_key(msg_id),
        }
    }

    /// Whether a receipt can still be made from it.
    pub fn can_answer(&self) -> bool {
        !matches!(self, ReplyContext::SealedUnkeyed { .. })
    }

    fn is_sealed(&self) -> bool {
        !matches!(self, ReplyContext::Challenge { .. })
    }
}

/// The journal key of a sealed command: its signer's key id and message id.
pub fn sealed_key(sender: &[u8; 32], msg_id: &[u8; 16]) -> [u8; 32] {
    key_of(b"sealed", &[sender, msg_id])
}

/// The journal key of a challenge-mode command: its message id.
pub fn challenge_key(msg_id: &[u8; 16]) -> [u8; 32] {
    key_of(b"challenge", &[msg_id])
}

fn key_of(mode: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"mqseal-agent journal key\0");
    h.update(mode);
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
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
    /// SHA-256 of the envelope that was accepted: a copy with these bytes
    /// is authentic without a second check.
    pub digest: Option<[u8; 32]>,
}

/// Version 2's entry (keyed by envelope hash), read for migration.
#[derive(Deserialize)]
struct EntryV2 {
    expires_at: u64,
    response: Option<Stored>,
    reply: Option<ReplyContext>,
}

/// Version 1's entry, read for migration.
#[derive(Deserialize)]
struct EntryV1 {
    expires_at: u64,
    response: Option<Stored>,
}

/// The response journal, keyed by command identity ([`sealed_key`],
/// [`challenge_key`]).
///
/// It is also what keeps a challenge-mode command from running twice (the
/// agent's challenge table remembers no ids of its own), so it forgets the
/// way `proto`'s tables do: beyond [`JOURNAL_CAPACITY`] live entries, the
/// one expiring soonest goes and, for a challenge-mode command, raises a
/// floor — a challenge-mode command expiring at or before it is refused, so
/// a copy of a forgotten command never runs (docs/PROTOCOL.md §6.1).
/// Sealed commands have the replay cache's own floor.
#[derive(Clone, Debug, Default)]
pub struct Journal {
    entries: BTreeMap<[u8; 32], Entry>,
    challenge_floor: u64,
}

impl Journal {
    /// The entry for a command key.
    pub fn get(&self, key: &[u8; 32]) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Records that a command was accepted and is about to run; `digest` is
    /// its envelope's SHA-256.
    pub fn begin(&mut self, reply: ReplyContext, expires_at: u64, digest: [u8; 32]) {
        self.entries
            .insert(reply.key(), Entry { expires_at, response: None, reply: Some(reply), digest: Some(digest) });
    }

    /// Commands accepted but never answered — the agent stopped while they
    /// ran — that can still be answered: their keys and reply contexts.
    pub fn unanswered(&self) -> Vec<([u8; 32], ReplyContext)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.response.is_none())
            .filter_map(|(k, e)| Some((*k, e.reply.filter(ReplyContext::can_answer)?)))
            .collect()
    }

    /// Records the response a command got.
    pub fn complete(&mut self, key: [u8; 32], response: Stored) {
        if let Some(e) = self.entries.get_mut(&key) {
            e.response = Some(response);
            // A copy gets the stored receipt; no new one will be made, so
            // the key that would make one need not outlive this call on
            // disk.
            if let Some(ReplyContext::Sealed { sender, msg_id, expires_at, .. }) = e.reply {
                e.reply = Some(ReplyContext::SealedUnkeyed { sender, msg_id, expires_at });
            }
        }
    }

    /// Forgets entries that can no longer matter at `now`, then the
    /// soonest-expiring ones beyond [`JOURNAL_CAPACITY`] (raising the
    /// challenge-mode floor for those).
    pub fn prune(&mut self, now: u64, skew: u64) {
        self.entries.retain(|_, e| now < e.expires_at.saturating_add(skew));
        while self.entries.len() > JOURNAL_CAPACITY {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.expires_at).map(|(k, _)| *k) else { break };
            if let Some(e) = self.entries.remove(&oldest)
                && !e.reply.is_some_and(|r| r.is_sealed())
            {
                self.challenge_floor = self.challenge_floor.max(e.expires_at);
            }
        }
    }

    /// Challenge-mode commands expiring at or before this are refused.
    pub fn challenge_floor(&self) -> u64 {
        self.challenge_floor
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
    challenge_floor: u64,
}

#[derive(Deserialize)]
struct PersistedV2 {
    replay: Vec<u8>,
    journal: Vec<([u8; 32], EntryV2)>,
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
            Some((2, body)) => {
                let v2: PersistedV2 = postcard::from_bytes(body).map_err(|_| corrupt("undecodable"))?;
                let journal = v2.journal.into_iter().map(|(hash, e)| {
                    let key = e.reply.map_or(hash, |r| r.key());
                    (key, Entry { expires_at: e.expires_at, response: e.response, reply: e.reply, digest: Some(hash) })
                });
                Persisted { replay: v2.replay, journal: journal.collect(), challenge_floor: 0 }
            }
            Some((1, body)) => {
                let v1: PersistedV1 = postcard::from_bytes(body).map_err(|_| corrupt("undecodable"))?;
                let journal = v1.journal.into_iter().map(|(hash, e)| {
                    (hash, Entry { expires_at: e.expires_at, response: e.response, reply: None, digest: Some(hash) })
                });
                Persisted { replay: v1.replay, journal: journal.collect(), challenge_floor: 0 }
            }
            Some(_) => return Err(corrupt("unknown format version")),
            None => return Err(corrupt("empty file")),
        };
        Ok(Some((p.replay, Journal { entries: p.journal.into_iter().collect(), challenge_floor: p.challenge_floor })))
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
            challenge_floor: journal.challenge_floor,
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

    fn challenge_ctx(n: u8, expires_at: u64) -> ReplyContext {
        ReplyContext::Challenge { msg_id: [n; 16], challenge: [4; 16], expires_at, hidden: false }
    }

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
        assert_eq!(
            j.get(&[7; 32]),
            Some(&Entry { expires_at: 90, response: None, reply: None, digest: Some([7; 32]) })
        );
        assert!(j.unanswered().is_empty());
    }

    /// Version 2 keyed entries by envelope hash; they move to their
    /// command's identity, the hash becoming the digest.
    #[test]
    fn version_2_state_is_rekeyed_by_identity() {
        type EntryV2 = (u64, Option<Stored>, Option<ReplyContext>);
        #[derive(Serialize)]
        struct V2 {
            replay: Vec<u8>,
            journal: Vec<([u8; 32], EntryV2)>,
        }
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::open(dir.path()).unwrap();
        let v2 = V2 { replay: b"r".to_vec(), journal: vec![([9; 32], (50, None, Some(CTX)))] };
        fs::write(dir.path().join("state.bin"), postcard::to_extend(&v2, vec![2u8]).unwrap()).unwrap();
        let (_, j) = sf.load().unwrap().unwrap();
        let entry = j.get(&challenge_key(&[3; 16])).unwrap();
        assert_eq!((entry.reply, entry.digest), (Some(CTX), Some([9; 32])));
        assert_eq!(j.unanswered(), vec![(challenge_key(&[3; 16]), CTX)]);
    }

    /// A version 3 file written before receipt keys holds sealed entries in
    /// the first variant, without the key: they load (a copy still finds
    /// its stored response) but are never offered for an "interrupted"
    /// receipt, which could not be encrypted.
    #[test]
    fn sealed_entries_from_before_receipt_keys_load_but_are_not_answered() {
        /// The sealed variant as it was written then: variant 0, no key.
        #[derive(Serialize)]
        enum OldContext {
            Sealed { sender: [u8; 32], msg_id: [u8; 16], expires_at: u64 },
        }
        type OldEntry = (u64, Option<Stored>, Option<OldContext>, Option<[u8; 32]>);
        #[derive(Serialize)]
        struct V3 {
            replay: Vec<u8>,
            journal: Vec<([u8; 32], OldEntry)>,
            challenge_floor: u64,
        }
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::open(dir.path()).unwrap();
        let old = OldContext::Sealed { sender: [1; 32], msg_id: [2; 16], expires_at: 90 };
        let v3 = V3 {
            replay: b"r".to_vec(),
            journal: vec![(sealed_key(&[1; 32], &[2; 16]), (90, None, Some(old), None))],
            challenge_floor: 0,
        };
        fs::write(dir.path().join("state.bin"), postcard::to_extend(&v3, vec![3u8]).unwrap()).unwrap();
        let (_, j) = sf.load().unwrap().unwrap();
        let entry = j.get(&sealed_key(&[1; 32], &[2; 16])).unwrap();
        assert_eq!(entry.reply, Some(ReplyContext::SealedUnkeyed { sender: [1; 32], msg_id: [2; 16], expires_at: 90 }));
        assert!(j.unanswered().is_empty());
    }

    /// A sealed command's receipt key is journaled so that an
    /// "interrupted" receipt can be made after a crash. Once the receipt is
    /// stored it is no longer needed, so it leaves the journal (and the
    /// file) with that; and `Debug` never prints it.
    #[test]
    fn a_receipt_key_leaves_the_journal_once_answered_and_is_never_printed() {
        let ctx = ReplyContext::Sealed { sender: [1; 32], msg_id: [2; 16], expires_at: 90, receipt_key: [0x5a; 32] };
        let shown = format!("{ctx:?}");
        assert!(shown.contains("<redacted>") && !shown.contains("90, 90, 90"), "{shown}");
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::open(dir.path()).unwrap();
        let mut j = Journal::default();
        j.begin(ctx, 90, [7; 32]);
        sf.save(b"r", &j).unwrap();
        let (_, loaded) = sf.load().unwrap().unwrap();
        assert_eq!(loaded.unanswered(), vec![(ctx.key(), ctx)], "kept, with its key, while unanswered");
        j.complete(ctx.key(), Stored { topic: "t".into(), payload: b"receipt".to_vec() });
        sf.save(b"r", &j).unwrap();
        let file = fs::read(dir.path().join("state.bin")).unwrap();
        assert!(!file.windows(32).any(|w| w == [0x5a; 32]), "the key is not on disk once answered");
        let (_, loaded) = sf.load().unwrap().unwrap();
        let entry = loaded.get(&ctx.key()).unwrap();
        assert_eq!(entry.reply, Some(ReplyContext::SealedUnkeyed { sender: [1; 32], msg_id: [2; 16], expires_at: 90 }));
        assert_eq!(entry.response.as_ref().map(|r| r.payload.as_slice()), Some(&b"receipt"[..]));
    }

    #[test]
    fn keys_are_the_commands_identity() {
        let sealed = |sender, msg_id| {
            ReplyContext::Sealed { sender: [sender; 32], msg_id: [msg_id; 16], expires_at: 9, receipt_key: [0x5a; 32] }
                .key()
        };
        assert_eq!(sealed(1, 2), sealed_key(&[1; 32], &[2; 16]));
        let unkeyed = ReplyContext::SealedUnkeyed { sender: [1; 32], msg_id: [2; 16], expires_at: 9 };
        assert_eq!(unkeyed.key(), sealed(1, 2), "a command journaled before receipt keys keeps its identity");
        assert_ne!(sealed(1, 2), sealed(3, 2), "another controller's message id is another command");
        let over = |challenge| ReplyContext::Challenge { msg_id: [2; 16], challenge, expires_at: 9, hidden: true };
        assert_eq!(over([5; 16]).key(), over([6; 16]).key(), "a copy over another challenge is the same command");
        assert_ne!(over([5; 16]).key(), sealed(0, 2), "modes never collide");
    }

    #[test]
    fn state_round_trips_privately_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::open(&dir.path().join("s")).unwrap();
        assert!(sf.load().unwrap().is_none());
        let mut j = Journal::default();
        let (one, two) = (challenge_ctx(1, 100), challenge_ctx(2, 50));
        j.begin(one, 100, [11; 32]);
        j.complete(one.key(), Stored { topic: "t".into(), payload: vec![9, 9] });
        j.begin(two, 50, [12; 32]);
        sf.save(b"\x01replay", &j).unwrap();
        let (replay, back) = sf.load().unwrap().unwrap();
        assert_eq!(replay, b"\x01replay");
        assert_eq!(back.get(&one.key()).unwrap().response.as_ref().unwrap().payload, vec![9, 9]);
        assert_eq!(back.get(&one.key()).unwrap().digest, Some([11; 32]));
        assert_eq!(back.get(&two.key()).unwrap().response, None);
        assert_eq!(back.unanswered(), vec![(two.key(), two)]);
        let mode = fs::metadata(dir.path().join("s/state.bin")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        fs::write(dir.path().join("s/state.bin"), b"\x03garbage\xff\xff\xff").unwrap();
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
        j.begin(challenge_ctx(1, 10), 10, [0; 32]);
        j.begin(challenge_ctx(2, 100), 100, [0; 32]);
        j.prune(20, 5);
        assert!(j.get(&challenge_ctx(1, 10).key()).is_none() && j.get(&challenge_ctx(2, 100).key()).is_some());
        for i in 0..JOURNAL_CAPACITY + 5 {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let ctx = ReplyContext::Sealed {
                sender: [1; 32],
                msg_id: id,
                expires_at: 1000 + i as u64,
                receipt_key: [0x5a; 32],
            };
            j.begin(ctx, 1000 + i as u64, [0; 32]);
        }
        j.prune(20, 5);
        assert_eq!(j.len(), JOURNAL_CAPACITY);
        assert!(j.get(&challenge_ctx(2, 100).key()).is_none(), "the soonest-expiring went first");
        assert_eq!(j.challenge_floor(), 100, "a forgotten challenge-mode command raised the floor");
        // Sealed ones leave it to the replay cache.
        for i in 0..10 {
            let ctx =
                ReplyContext::Sealed { sender: [2; 32], msg_id: [i; 16], expires_at: 900, receipt_key: [0x5a; 32] };
            j.begin(ctx, 900, [0; 32]);
        }
        j.prune(20, 5);
        assert_eq!(j.challenge_floor(), 100);
    }
}
