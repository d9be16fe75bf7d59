//! The agent's decisions, without the network.
//!
//! [`Agent::handle`] takes one publish (topic and bytes) plus the time and
//! an RNG, and says what to do: answer a challenge request, re-send a stored
//! response, execute a verified command, or nothing. [`Agent::finish`] turns
//! an execution result into the authenticated response. All verification is
//! `proto`'s; this module only decides the order and what to remember, so
//! the same code drives the real agent (`main.rs`) and the benchmark's
//! simulated fleet.

use std::collections::BTreeMap;

use mqseal_proto::challenge::{ChallengeDevice, ChallengeTable, Clock, Form, Registered, ReplyTo, command_msg_id};
use mqseal_proto::sealed::{self, KeyId, ReceiptKey, ReplayCache, SealedDevice, SealedReplyTo};
use mqseal_proto::topic::{Channel, Topic, topic};
use mqseal_proto::{Error, Kind, MsgId, Outcome, Policy, Status, peek};
use rand_core::CryptoRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::commands::CommandSpec;
use crate::config::Keys;
use crate::exec::Ran;
use crate::state::{Journal, ReplyContext, StateError, StateFile, Stored, challenge_key, sealed_key};

/// Outstanding challenges a device keeps: enough for several controllers
/// (and their retries) at once; a flood only evicts the oldest. Copies of
/// a command over several of them run once because the journal knows its
/// message id (docs/PROTOCOL.md §6.5).
pub const CHALLENGE_SLOTS: usize = 16;

/// The caller's clock.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Seconds since the Unix epoch.
    pub unix: u64,
    /// Monotonic milliseconds, for challenge lifetimes.
    pub mono_ms: u64,
}

impl Now {
    /// The system clock, with monotonic time counted from `started`.
    pub fn since(started: std::time::Instant) -> Now {
        Now {
            unix: mqseal_client::unix_now(),
            mono_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// A message to publish (QoS 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Topic.
    pub topic: String,
    /// Envelope.
    pub payload: Vec<u8>,
}

/// What to do with a publish.
#[derive(Debug)]
pub enum Action {
    /// Publish this challenge, answering a challenge request.
    Challenge(Outgoing),
    /// Publish this stored response again: the command duplicates (a QoS 1
    /// redelivery, or a replay of the same bytes) one that already ran.
    Resend(Outgoing),
    /// Run this command, then pass the result to [`Agent::finish`].
    Execute(Job),
}

/// A publish that was not acted on, with the reason for the one local log
/// line. Nothing about it goes back over the network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

impl From<Error> for Rejected {
    fn from(e: Error) -> Self {
        Rejected(e.to_string())
    }
}

/// A verified command waiting to run.
#[derive(Debug)]
pub struct Job {
    /// Command name.
    pub name: String,
    /// Its arguments (wiped on drop).
    pub args: Zeroizing<Vec<String>>,
    /// SHA-256 of the envelope, journaled with it.
    digest: [u8; 32],
    reply: Reply,
    /// Set when the state could not be saved: do not run, answer this.
    pub refuse: Option<String>,
}

/// What a job's receipt is bound to.
#[derive(Debug, Clone)]
enum Reply {
    Sealed(SealedReplyTo),
    Challenge(ReplyTo),
}

impl Reply {
    fn expires_at(&self) -> u64 {
        match self {
            Reply::Sealed(s) => s.expires_at,
            Reply::Challenge(c) => c.expires_at,
        }
    }

    /// The journal's copy of it.
    fn context(&self) -> ReplyContext {
        match self {
            Reply::Sealed(s) => ReplyContext::Sealed {
                sender: s.sender.0,
                msg_id: s.msg_id.0,
                expires_at: s.expires_at,
                receipt_key: s.receipt_key.to_bytes(),
            },
            Reply::Challenge(c) => ReplyContext::Challenge {
                msg_id: c.msg_id.0,
                challenge: c.challenge,
                expires_at: c.expires_at,
                hidden: c.form == Form::Hidden,
            },
        }
    }
}

impl Reply {
    /// The receipt binding kept in the journal; `None` for a sealed command
    /// journaled before receipt keys, which can no longer be answered.
    fn from_context(c: ReplyContext) -> Option<Reply> {
        Some(match c {
            ReplyContext::Sealed { sender, msg_id, expires_at, receipt_key } => Reply::Sealed(SealedReplyTo {
                sender: KeyId(sender),
                msg_id: MsgId(msg_id),
                expires_at,
                receipt_key: ReceiptKey::from_bytes(receipt_key),
            }),
            ReplyContext::SealedUnkeyed { .. } => return None,
            ReplyContext::Challenge { msg_id, challenge, expires_at, hidden } => Reply::Challenge(ReplyTo {
                msg_id: MsgId(msg_id),
                challenge,
                expires_at,
                form: if hidden { Form::Hidden } else { Form::Explicit },
            }),
        })
    }
}

/// What an interrupted command's receipt says.
pub const INTERRUPTED: &str =
    "interrupted: the agent stopped while this command ran; it was not run again, and whether it completed is unknown";

/// One device's verification state.
pub struct Agent {
    id: String,
    keys: Keys,
    policy: Policy,
    replay: ReplayCache,
    /// Remembers no message ids itself: the journal does, on disk (`M = 0`).
    challenges: ChallengeTable<CHALLENGE_SLOTS, 0>,
    journal: Journal,
    commands: BTreeMap<String, CommandSpec>,
    /// Hidden-form candidates: (name, args).
    hidden: Vec<(String, Vec<String>)>,
    state: Option<StateFile>,
    topics: Topics,
}

struct Topics {
    cmd: Topic,
    chal_req: Topic,
    chal: Topic,
    resp: Topic,
}

/// How to start from saved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    /// Load it; a damaged file is an error.
    Load,
    /// Discard it and refuse every sealed command issued before now (a
    /// reset floor on `issued_at` at `now + skew`): the operator's way out
    /// of a damaged state file that never reopens a replay window, and
    /// that accepts new commands as soon as the allowed clock skew has
    /// passed.
    Reset,
}

impl Agent {
    /// An agent for `id`, remembering its state in `state` (or only in
    /// memory when `None`, as the simulated fleet does).
    ///
    /// # Errors
    /// [`StateError`] when saved state is damaged or the folder unusable.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: &str,
        keys: Keys,
        policy: Policy,
        challenge_lifetime_ms: u64,
        replay_capacity: usize,
        commands: BTreeMap<String, CommandSpec>,
        state: Option<StateFile>,
        restore: Restore,
        now: Now,
    ) -> Result<Agent, AgentError> {
        let t = |c| topic(id, c).map_err(|e| AgentError::Id(e.to_string()));
        let topics = Topics {
            cmd: t(Channel::Command)?,
            chal_req: t(Channel::ChallengeRequest)?,
            chal: t(Channel::Challenge)?,
            resp: t(Channel::Response)?,
        };
        let mut replay = ReplayCache::new(replay_capacity, policy);
        let mut journal = Journal::default();
        if let Some(sf) = &state {
            match restore {
                Restore::Load => {
                    if let Some((bytes, j)) = sf.load()? {
                        replay = ReplayCache::restore(&bytes, replay_capacity, policy, now.unix).map_err(|e| {
                            AgentError::State(StateError::Corrupt { path: "state.bin".into(), what: e.to_string() })
                        })?;
                        journal = j;
                    }
                }
                Restore::Reset => {
                    // Whatever a controller issued before now carries an
                    // issued_at below now + skew (its clock is within the
                    // skew of ours): refused for good. Commands issued
                    // after that pass, whatever their lifetime.
                    replay.refuse_issued_before(now.unix.saturating_add(policy.max_skew_secs));
                    sf.save(&replay.export()?, &journal)?;
                }
            }
        }
        let hidden = commands
            .iter()
            .flat_map(|(name, spec)| spec.hidden_forms().into_iter().map(move |args| (name.clone(), args)))
            .collect();
        Ok(Agent {
            id: id.to_owned(),
            keys,
            policy,
            replay,
            challenges: ChallengeTable::new(challenge_lifetime_ms),
            journal,
            commands,
            hidden,
            state,
            topics,
        })
    }

    /// The device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The topics to subscribe to.
    pub fn subscriptions(&self) -> [&str; 2] {
        [&self.topics.cmd, &self.topics.chal_req]
    }

    /// The allow-list entry for `name`.
    pub fn command(&self, name: &str) -> Option<&CommandSpec> {
        self.commands.get(name)
    }

    /// Decides what to do with a publish that arrived on `topic`.
    ///
    /// # Errors
    /// [`Rejected`] with the reason, for the caller's log line.
    pub fn handle<R: CryptoRng + ?Sized>(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Now,
        rng: &mut R,
    ) -> Result<Action, Rejected> {
        let kind = peek(payload)?;
        if topic == self.topics.chal_req.as_str() {
            return self.answer_challenge_request(payload, now, rng);
        }
        if topic != self.topics.cmd.as_str() {
            return Err(Rejected(format!("publish on unexpected topic {topic}")));
        }
        let key = match kind {
            Kind::SealedCommand => {
                let (sender, msg_id) = sealed::command_id(payload)?;
                sealed_key(&sender.0, &msg_id.0)
            }
            Kind::ChallengeCommand => challenge_key(&command_msg_id(payload)?.0),
            other => return Err(Rejected(format!("a {other} envelope on the command topic"))),
        };
        let digest: [u8; 32] = Sha256::digest(payload).into();
        if let Some(entry) = self.journal.get(&key) {
            // The same command again. Byte for byte the one accepted, it is
            // authentic; otherwise it must prove it is (a tampered copy
            // claiming the same identity is refused like any forgery).
            if entry.digest != Some(digest) {
                self.authenticate_copy(kind, payload, topic, now)?;
            }
            return match &entry.response {
                Some(stored) => {
                    Ok(Action::Resend(Outgoing { topic: stored.topic.clone(), payload: stored.payload.clone() }))
                }
                None => Err(Rejected("duplicate of a command still running or interrupted by a restart".into())),
            };
        }
        let job = match kind {
            Kind::SealedCommand => self.open_sealed(payload, topic, now, rng, digest)?,
            _ => self.verify_challenge(payload, topic, now, digest)?,
        };
        Ok(Action::Execute(self.commit(job, now)))
    }

    /// Checks a copy of a command already accepted, without its single-use
    /// state (replay cache, challenge): `proto`'s checks, all of them but
    /// those.
    fn authenticate_copy(&self, kind: Kind, frame: &[u8], topic: &str, now: Now) -> Result<(), Rejected> {
        if kind == Kind::SealedCommand {
            let device = SealedDevice::new(&self.id, &self.keys.private, &self.keys.controllers, self.policy)?;
            device.authenticate_copy(frame, topic, now.unix)?;
        } else {
            let device = ChallengeDevice::new(&self.id, &self.keys.hmac, self.policy)?;
            let (args, clock) =
                (hidden_args(&self.hidden), Clock { monotonic_ms: now.mono_ms, unix_secs: Some(now.unix) });
            device.authenticate_copy(frame, topic, clock, &registry(&self.hidden, &args))?;
        }
        Ok(())
    }

    fn answer_challenge_request<R: CryptoRng + ?Sized>(
        &mut self,
        payload: &[u8],
        now: Now,
        rng: &mut R,
    ) -> Result<Action, Rejected> {
        let device = ChallengeDevice::new(&self.id, &self.keys.hmac, self.policy)?;
        let mut out = [0u8; 256];
        let n = device.answer_request(payload, &mut self.challenges, rng, now.mono_ms, &mut out)?;
        let payload = out.get(..n).ok_or(Error::BufferTooSmall)?.to_vec();
        Ok(Action::Challenge(Outgoing { topic: self.topics.chal.to_string(), payload }))
    }

    fn open_sealed<R: CryptoRng + ?Sized>(
        &mut self,
        frame: &[u8],
        topic: &str,
        now: Now,
        rng: &mut R,
        digest: [u8; 32],
    ) -> Result<Job, Rejected> {
        let device = SealedDevice::new(&self.id, &self.keys.private, &self.keys.controllers, self.policy)?;
        let opened = device.open_command(rng, frame, topic, now.unix, &mut self.replay)?;
        Ok(Job {
            name: opened.name.clone(),
            args: Zeroizing::new(opened.args.clone()),
            digest,
            reply: Reply::Sealed(opened.reply_to()),
            refuse: None,
        })
    }

    fn verify_challenge(&mut self, frame: &[u8], topic: &str, now: Now, digest: [u8; 32]) -> Result<Job, Rejected> {
        let device = ChallengeDevice::new(&self.id, &self.keys.hmac, self.policy)?;
        let args = hidden_args(&self.hidden);
        let registry = registry(&self.hidden, &args);
        let clock = Clock { monotonic_ms: now.mono_ms, unix_secs: Some(now.unix) };
        let v = device.verify_command(frame, topic, clock, &mut self.challenges, &registry)?;
        if v.header.expires_at <= self.journal.challenge_floor() {
            return Err(Error::BeyondReplayWindow.into());
        }
        Ok(Job {
            name: v.call.name.to_owned(),
            args: Zeroizing::new(v.call.args.iter().map(str::to_owned).collect()),
            digest,
            reply: Reply::Challenge(v.reply_to()),
            refuse: None,
        })
    }

    /// Journals the accepted command and saves state before anything runs.
    fn commit(&mut self, mut job: Job, now: Now) -> Job {
        self.journal.prune(now.unix, self.policy.max_skew_secs);
        self.journal.begin(job.reply.context(), job.reply.expires_at(), job.digest);
        if let Err(e) = self.save() {
            job.refuse = Some(format!("refused to execute: replay state cannot be saved ({e})"));
        }
        job
    }

    fn save(&self) -> Result<(), AgentError> {
        if let Some(sf) = &self.state {
            sf.save(&self.replay.export()?, &self.journal)?;
        }
        Ok(())
    }

    /// Builds, journals and returns the response to `job`.
    ///
    /// # Errors
    /// [`AgentError`] if no response can be built (the controller that sent
    /// the command was removed from the keyring meanwhile). A failure to
    /// *save* the response is not an error: it is returned anyway, because
    /// the command has run and its sender should learn so.
    pub fn finish<R: CryptoRng + ?Sized>(
        &mut self,
        job: Job,
        ran: &Ran,
        now: Now,
        rng: &mut R,
    ) -> Result<(Outgoing, Option<AgentError>), AgentError> {
        let out = self.respond(&job.reply, ran, now, rng)?;
        self.journal
            .complete(job.reply.context().key(), Stored { topic: out.topic.clone(), payload: out.payload.clone() });
        Ok((out, self.save().err()))
    }

    /// Receipts for the commands the agent was running when it last
    /// stopped (a crash, a power cut, `kill -9`): each gets an
    /// authenticated `failed` saying it was interrupted — never a second
    /// execution — and the receipt is journaled, so a redelivery of the
    /// command gets the same one. Call once, after connecting.
    ///
    /// Each item is the receipt to publish, or why none could be made (the
    /// controller was removed from the keyring meanwhile). A failure to
    /// save the journal is reported last, as for [`finish`](Self::finish).
    pub fn interrupted<R: CryptoRng + ?Sized>(&mut self, now: Now, rng: &mut R) -> Vec<Result<Outgoing, AgentError>> {
        self.journal.prune(now.unix, self.policy.max_skew_secs);
        let ran = Agent::refusal(INTERRUPTED);
        let mut out = Vec::new();
        // `unanswered` leaves out what cannot be answered any more.
        for (key, reply) in
            self.journal.unanswered().into_iter().filter_map(|(k, c)| Some((k, Reply::from_context(c)?)))
        {
            let receipt = self.respond(&reply, &ran, now, rng);
            if let Ok(o) = &receipt {
                self.journal.complete(key, Stored { topic: o.topic.clone(), payload: o.payload.clone() });
            }
            out.push(receipt);
        }
        if !out.is_empty()
            && let Err(e) = self.save()
        {
            out.push(Err(e));
        }
        out
    }

    /// Builds the authenticated response to a command, in its own mode and form.
    fn respond<R: CryptoRng + ?Sized>(
        &self,
        reply: &Reply,
        ran: &Ran,
        now: Now,
        rng: &mut R,
    ) -> Result<Outgoing, AgentError> {
        let msg_id = MsgId::random(rng);
        let payload = match reply {
            Reply::Sealed(to) => {
                let outcome = Outcome { status: ran.status, code: ran.code, output: &ran.output };
                let device = SealedDevice::new(&self.id, &self.keys.private, &self.keys.controllers, self.policy)?;
                device.seal_response_to(rng, to, &outcome, msg_id, now.unix)?
            }
            Reply::Challenge(c) => {
                // A hidden response cannot carry output the controller would
                // have to guess: it confirms the status alone.
                let outcome = match c.form {
                    Form::Explicit => Outcome { status: ran.status, code: ran.code, output: &ran.output },
                    Form::Hidden => Outcome { status: ran.status, code: 0, output: &[] },
                };
                let device = ChallengeDevice::new(&self.id, &self.keys.hmac, self.policy)?;
                let mut out = vec![0u8; mqseal_proto::limits::MAX_FRAME];
                let n = device.respond(c, c.form, &outcome, msg_id, Some(now.unix), &mut out)?;
                out.truncate(n);
                out
            }
        };
        Ok(Outgoing { topic: self.topics.resp.to_string(), payload })
    }

    /// The outcome to report for a refused job.
    pub fn refusal(reason: &str) -> Ran {
        Ran { status: Status::Failed, code: 0, output: Zeroizing::new(reason.as_bytes().to_vec()) }
    }

    /// Sealed commands remembered by the replay cache.
    pub fn replay_len(&self) -> usize {
        self.replay.len()
    }
}

/// The hidden-form candidates' arguments, borrowed for [`registry`].
fn hidden_args(hidden: &[(String, Vec<String>)]) -> Vec<Vec<&str>> {
    hidden.iter().map(|(_, a)| a.iter().map(String::as_str).collect()).collect()
}

/// The hidden-form candidates as `proto` takes them.
fn registry<'a>(hidden: &'a [(String, Vec<String>)], args: &'a [Vec<&'a str>]) -> Vec<Registered<'a>> {
    hidden.iter().zip(args).map(|((name, _), args)| Registered { name, args }).collect()
}

/// Errors of the agent core.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The device id cannot name topics.
    #[error("device id: {0}")]
    Id(String),
    /// Saved state.
    #[error(transparent)]
    State(#[from] StateError),
    /// A `proto` error while building a response.
    #[error("{0}")]
    Proto(#[from] Error),
}
