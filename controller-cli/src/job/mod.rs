//! Jobs: one command rolled out to many devices at a controlled rate,
//! delivered to devices that were offline when it started, retried,
//! stopped when too many fail, and resumable after the controller died.
//!
//! This module is the policy, without I/O — the same shape as
//! [`crate::exchange`]: a [`Job`] is told what happened (an envelope is
//! going out, a device answered, a device's status changed, time passed)
//! and says which devices to start next. Every change of state is an
//! [`Event`], and the state is nothing but the events applied in order
//! ([`Job::apply`] is the only place a device's state changes), so the
//! journal of events written before each step ([`journal`]) rebuilds the
//! job exactly after a crash: [`Job::replay`].
//!
//! # What a device goes through
//!
//! `pending` → (online, a free place, the rate allows) → `sent` (its
//! envelope is in the journal *before* it is published) → `ok`, `failed`
//! or `timed_out`; a failed or timed-out attempt goes back to `pending`
//! while retries are left (a new envelope: a new message id), and a
//! device still pending when the job is cancelled or aborted is
//! `skipped`, one still pending at the deadline `timed_out`.
//!
//! # Why nothing runs twice, and nothing is lost
//!
//! An attempt that was `sent` when the controller died is taken up again
//! from its journalled snapshot ([`crate::exchange::Snapshot`]): the same
//! envelope, byte for byte. A device that already ran it answers the copy
//! with its stored receipt, one still running it answers when it is done
//! (docs/PROTOCOL.md §9.1), one that never got it runs it — once. Only a
//! *new* attempt (a retry) carries a new envelope, and a retry follows only
//! an attempt that failed or timed out.

pub mod journal;
pub mod run;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::audit::Outcome;
use crate::exchange::{DeviceResult, Mode, Request, Snapshot, status_name};
use crate::session::{Finished, Start};

/// The shortest wait between two groups of rate-limited starts.
pub const START_GROUP: Duration = Duration::from_millis(250);

/// What a job is: written once, when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The job's id (also its folder's name).
    pub id: String,
    /// When it was created (Unix ms).
    pub created_at: u64,
    /// The broker user that created it.
    pub operator: String,
    /// Command name.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Envelope mode.
    pub mode: Mode,
    /// Challenge mode's hidden form.
    pub hidden: bool,
    /// Each envelope's lifetime (seconds).
    pub ttl_secs: u64,
    /// The targets, in rollout order.
    pub devices: Vec<String>,
    /// At most this many new attempts per minute (none: no limit).
    pub rate_per_min: Option<u32>,
    /// At most this many attempts out at once.
    pub max_in_flight: usize,
    /// Stop starting devices once this share of finished ones failed.
    pub abort: Option<AbortRule>,
    /// No new attempt after this (Unix ms); devices still pending then
    /// time out.
    pub deadline_at: u64,
    /// Attempts after the first, per device.
    pub retries: u32,
    /// How long one attempt waits for its answer (ms).
    pub attempt_timeout_ms: u64,
    /// Start a device only once its retained status says `online` (the
    /// default). Off: start every device as the rate and the places allow,
    /// online or not — its persistent session at the broker holds the
    /// command (or the challenge request) until it connects, within the
    /// attempt's timeout. For brokers whose retained messages a controller
    /// on another node does not see (RabbitMQ 3.10 keeps them per node).
    #[serde(default = "presence_default")]
    pub presence: bool,
}

fn presence_default() -> bool {
    true
}

impl JobSpec {
    /// The command each attempt sends.
    pub fn request(&self) -> Request {
        Request {
            name: self.command.clone(),
            args: self.args.clone(),
            mode: self.mode,
            hidden: self.hidden,
            ttl: Duration::from_secs(self.ttl_secs),
        }
    }
}

/// `--abort-if-failed P% --after M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortRule {
    /// Percentage (0-100) of finished devices that failed.
    pub failed_percent: u8,
    /// Only once at least this many devices have finished.
    pub after: usize,
}

/// Where a device stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Not sent yet (or to be retried).
    Pending,
    /// An attempt is out.
    Sent,
    /// Answered `ok`.
    Ok,
    /// Answered with another status, or could not be sent; no retry left.
    Failed,
    /// No answer, no retry left, or still pending at the deadline.
    TimedOut,
    /// Never sent: the job was cancelled or aborted first.
    Skipped,
}

impl DeviceState {
    /// Whether the device is done with.
    pub fn is_final(self) -> bool {
        !matches!(self, DeviceState::Pending | DeviceState::Sent)
    }
}

/// One line of a job's journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// An attempt's (new) envelope is about to be published.
    Sending {
        /// The device.
        device: String,
        /// 1 for the first attempt.
        attempt: u32,
        /// Unix ms.
        at: u64,
        /// What resuming the attempt needs.
        snapshot: Snapshot,
    },
    /// An attempt ended.
    Finished {
        /// The device.
        device: String,
        /// Which attempt.
        attempt: u32,
        /// Unix ms.
        at: u64,
        /// How it ended.
        outcome: Outcome,
        /// The device's status, if it answered.
        status: Option<String>,
        /// Its exit code.
        code: Option<i32>,
        /// Its output (lossy UTF-8).
        output: Option<String>,
        /// Why it could not be sent.
        error: Option<String>,
    },
    /// `mqseal job cancel`.
    Cancelled {
        /// Unix ms.
        at: u64,
    },
    /// The abort rule fired.
    Aborted {
        /// Unix ms.
        at: u64,
        /// The figures that fired it.
        reason: String,
    },
    /// Nothing more will be sent: every device is done, or what is still
    /// pending is skipped (cancelled, aborted) or timed out (deadline).
    Ended {
        /// Unix ms.
        at: u64,
    },
}

/// One device's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceProgress {
    /// Where it stands.
    pub state: DeviceState,
    /// Attempts sent so far.
    pub attempts: u32,
    /// When the last attempt was sent (Unix ms).
    pub sent_at: Option<u64>,
    /// When it reached its final state (Unix ms).
    pub finished_at: Option<u64>,
    /// The device's last answer: status, code, output.
    pub status: Option<String>,
    /// See `status`.
    pub code: Option<i32>,
    /// See `status`.
    pub output: Option<String>,
    /// Why the last attempt could not be sent.
    pub error: Option<String>,
    /// The last attempt's snapshot while it is out.
    #[serde(skip)]
    pub snapshot: Option<Snapshot>,
}

impl DeviceProgress {
    fn new() -> Self {
        DeviceProgress {
            state: DeviceState::Pending,
            attempts: 0,
            sent_at: None,
            finished_at: None,
            status: None,
            code: None,
            output: None,
            error: None,
            snapshot: None,
        }
    }
}

/// How a job stands as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Devices are still pending or out.
    Running,
    /// Cancelled: nothing new starts; what was out may still answer.
    Cancelled,
    /// Stopped by the abort rule, as for `Cancelled`.
    Aborted,
    /// Every device done.
    Ended,
}

/// Counts per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// See [`DeviceState`].
    pub pending: usize,
    /// See [`DeviceState`].
    pub sent: usize,
    /// See [`DeviceState`].
    pub ok: usize,
    /// See [`DeviceState`].
    pub failed: usize,
    /// See [`DeviceState`].
    pub timed_out: usize,
    /// See [`DeviceState`].
    pub skipped: usize,
}

/// A job's state and its policy.
///
/// Everything a step needs is kept up to date as events are applied, so a
/// step costs the same with ten devices or ten thousand: counts per state,
/// and the devices that may start now (pending, online, not out) in
/// rollout order.
pub struct Job {
    spec: JobSpec,
    devices: HashMap<String, DeviceProgress>,
    /// Each device's place in the rollout order.
    position: HashMap<String, usize>,
    counts: Counts,
    cancelled: bool,
    aborted: bool,
    ended: bool,
    /// Devices said to be online by their retained status.
    online: HashSet<String>,
    /// Devices handed out by [`Job::due`] and not yet finished, in this
    /// process: an attempt out when the journal was replayed is not in it
    /// until it is started again.
    driving: HashSet<String>,
    /// Pending, online and not out: may start now, by rollout position.
    ready: BTreeSet<(usize, String)>,
    /// Attempts that were out when the journal was replayed, to be taken
    /// up again first.
    to_resume: Vec<String>,
    /// When the rate allows the next start.
    next_start: Option<Instant>,
    /// Events applied since the last [`Job::take_events`].
    unsaved: Vec<Event>,
}

impl Job {
    /// A new job: every device pending.
    pub fn new(spec: JobSpec) -> Job {
        let devices: HashMap<String, DeviceProgress> =
            spec.devices.iter().map(|d| (d.clone(), DeviceProgress::new())).collect();
        let position = spec.devices.iter().enumerate().map(|(i, d)| (d.clone(), i)).collect();
        let counts = Counts { pending: devices.len(), ..Counts::default() };
        let mut job = Job {
            spec,
            devices,
            position,
            counts,
            cancelled: false,
            aborted: false,
            ended: false,
            online: HashSet::new(),
            driving: HashSet::new(),
            ready: BTreeSet::new(),
            to_resume: Vec::new(),
            next_start: None,
            unsaved: Vec::new(),
        };
        // Without presence every pending device may start from the outset.
        if !job.spec.presence {
            for d in job.spec.devices.clone() {
                job.refresh(&d);
            }
        }
        job
    }

    /// The job as its journal left it.
    pub fn replay(spec: JobSpec, events: &[Event]) -> Job {
        let mut job = Job::new(spec);
        for e in events {
            job.apply(e);
        }
        job.to_resume = job
            .spec
            .devices
            .iter()
            .filter(|d| job.devices.get(*d).is_some_and(|p| p.state == DeviceState::Sent))
            .cloned()
            .collect();
        job.to_resume.reverse(); // popped from the end: first in rollout order first
        job
    }

    /// What it is.
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// Per device, in rollout order.
    pub fn devices(&self) -> impl Iterator<Item = (&String, &DeviceProgress)> {
        self.spec.devices.iter().filter_map(|d| Some((d, self.devices.get(d)?)))
    }

    /// One device's progress.
    pub fn progress(&self, device: &str) -> Option<&DeviceProgress> {
        self.devices.get(device)
    }

    /// Counts per state.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// As a whole.
    pub fn state(&self) -> JobState {
        if self.aborted {
            JobState::Aborted
        } else if self.cancelled {
            JobState::Cancelled
        } else if self.ended {
            JobState::Ended
        } else {
            JobState::Running
        }
    }

    /// Whether nothing more will happen in it.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Whether an event waiting to be journalled announces a command
    /// envelope: those must be on disk before it is published; the others
    /// (challenge requests, answers) may wait for the next write, since
    /// replaying without them only starts an attempt that ran nothing
    /// afresh, or sends an answered command again, which the device
    /// answers from its journal.
    pub fn must_save(&self) -> bool {
        self.ended || self.unsaved.iter().any(|e| matches!(e, Event::Sending { .. } | Event::Cancelled { .. }))
    }

    /// The events to journal, in order, since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.unsaved)
    }

    /// The events not yet journalled, in order: kept until
    /// [`Job::saved`] says they were, so that a failed write loses none.
    pub fn unsaved(&self) -> &[Event] {
        &self.unsaved
    }

    /// The events [`Job::unsaved`] returned are in the journal.
    pub fn saved(&mut self) {
        self.unsaved.clear();
    }

    /// Moves `device` to `state`, keeping the counts and the ready set.
    fn set_state(&mut self, device: &str, state: DeviceState) {
        let Some(p) = self.devices.get_mut(device) else { return };
        let old = std::mem::replace(&mut p.state, state);
        let was = self.counts.of(old);
        *was = was.saturating_sub(1);
        *self.counts.of(state) += 1;
        self.refresh(device);
    }

    /// Whether `device` may start now is decided here only.
    fn refresh(&mut self, device: &str) {
        let Some(&pos) = self.position.get(device) else { return };
        let ready = self.devices.get(device).is_some_and(|p| p.state == DeviceState::Pending)
            && (!self.spec.presence || self.online.contains(device))
            && !self.driving.contains(device);
        let key = (pos, device.to_owned());
        if ready {
            self.ready.insert(key);
        } else {
            self.ready.remove(&key);
        }
    }

    /// Applies `e` (from the journal, or just recorded): the one place a
    /// device's state changes.
    pub fn apply(&mut self, e: &Event) {
        match e {
            Event::Sending { device, attempt, at, snapshot } => {
                let Some(p) = self.devices.get_mut(device) else { return };
                if p.state.is_final() {
                    return;
                }
                p.attempts = p.attempts.max(*attempt);
                p.sent_at = Some(*at);
                p.snapshot = Some(snapshot.clone());
                self.set_state(device, DeviceState::Sent);
            }
            Event::Finished { device, attempt, at, outcome, status, code, output, error } => {
                let retries = self.spec.retries;
                let stopping = self.cancelled || self.aborted || self.ended || *at >= self.spec.deadline_at;
                let Some(p) = self.devices.get_mut(device) else { return };
                if p.state.is_final() || *attempt < p.attempts {
                    return; // a late answer to an attempt already given up
                }
                p.attempts = *attempt;
                p.snapshot = None;
                (p.status, p.code, p.output, p.error) = (status.clone(), *code, output.clone(), error.clone());
                let retry =
                    matches!(outcome, Outcome::Failed | Outcome::TimedOut) && p.attempts <= retries && !stopping;
                let state = match outcome {
                    _ if retry => DeviceState::Pending,
                    Outcome::Ok => DeviceState::Ok,
                    Outcome::Failed | Outcome::Error => DeviceState::Failed,
                    Outcome::TimedOut => DeviceState::TimedOut,
                };
                if state.is_final() {
                    p.finished_at = Some(*at);
                }
                self.set_state(device, state);
            }
            Event::Cancelled { .. } => self.cancelled = true,
            Event::Aborted { .. } => self.aborted = true,
            Event::Ended { at } => {
                let deadline = *at >= self.spec.deadline_at;
                let stopped = self.cancelled || self.aborted || !deadline;
                let pending: Vec<String> = self
                    .devices
                    .iter()
                    .filter(|(_, p)| p.state == DeviceState::Pending)
                    .map(|(d, _)| d.clone())
                    .collect();
                for d in pending {
                    let Some(p) = self.devices.get_mut(&d) else { continue };
                    let state = if stopped { DeviceState::Skipped } else { DeviceState::TimedOut };
                    if state == DeviceState::TimedOut && p.error.is_none() && p.attempts == 0 {
                        let why = if self.spec.presence { "not online" } else { "not started" };
                        p.error = Some(format!("{why} before the deadline"));
                    }
                    p.finished_at = Some(*at);
                    self.set_state(&d, state);
                }
                self.ended = true;
            }
        }
    }

    fn record(&mut self, e: Event) {
        self.apply(&e);
        self.unsaved.push(e);
    }

    /// `mqseal job cancel` was asked for.
    pub fn cancel(&mut self, unix_ms: u64) {
        if !self.cancelled && !self.ended {
            self.record(Event::Cancelled { at: unix_ms });
        }
    }

    /// A device's retained status: `online` or anything else.
    pub fn on_status(&mut self, device: &str, payload: &[u8]) {
        if !self.position.contains_key(device) {
            return;
        }
        if payload == b"online" {
            self.online.insert(device.to_owned());
        } else {
            self.online.remove(device);
        }
        self.refresh(device);
    }

    /// The devices to start at `now` (Unix `unix_ms`), and when to be asked
    /// again: first every attempt that was out when the journal was
    /// written (the same envelope again, whether or not the device is
    /// online: its queue at the broker may hold it), then pending devices
    /// that are online, in rollout order, within the rate and
    /// `max_in_flight`.
    pub fn due(&mut self, now: Instant, unix_ms: u64) -> (Vec<Start>, Option<Instant>) {
        self.maybe_end(unix_ms);
        if self.ended {
            return (Vec::new(), None);
        }
        let left = Duration::from_millis(self.spec.deadline_at.saturating_sub(unix_ms));
        let timeout = Duration::from_millis(self.spec.attempt_timeout_ms);
        let give_up_after = timeout.min(left);
        let mut starts = Vec::new();
        while let Some(d) = self.to_resume.pop() {
            let resume = self.devices.get(&d).filter(|p| p.state == DeviceState::Sent).and_then(|p| p.snapshot.clone());
            if resume.is_some() {
                self.driving.insert(d.clone());
                // Past the deadline too: it may already have run, and only
                // asking again tells (while its envelope is valid).
                starts.push(Start { device: d, resume, give_up_after: timeout });
            }
        }
        let stopping = self.cancelled || self.aborted || unix_ms >= self.spec.deadline_at;
        let interval = self.spec.rate_per_min.filter(|r| *r > 0).map(|r| Duration::from_secs(60) / r);
        let mut wake = None;
        if !stopping {
            // The rate is a schedule: slots missed while this loop was
            // busy are caught up, slots while nothing could start are not.
            let mut slot = self.next_start.unwrap_or(now);
            while self.driving.len() < self.spec.max_in_flight {
                if interval.is_some() && slot > now {
                    // Starts go out in groups a few milliseconds apart,
                    // not one wake-up (and one journal sync) each: the
                    // rate holds over the run, not per millisecond.
                    wake = Some(slot.max(now + START_GROUP));
                    break;
                }
                let Some((_, d)) = self.ready.pop_first() else {
                    slot = slot.max(now);
                    break;
                };
                self.driving.insert(d.clone());
                starts.push(Start { device: d, resume: None, give_up_after });
                if let Some(every) = interval {
                    slot += every;
                }
            }
            // Slots that passed while every place was taken are not caught
            // up either: the rate is a ceiling.
            if self.driving.len() >= self.spec.max_in_flight {
                slot = slot.max(now);
            }
            self.next_start = Some(slot);
        }
        // Asked again at least every second while running: a cancel from
        // another process, the deadline.
        let tick = now + Duration::from_secs(1);
        (starts, Some(wake.map_or(tick, |w: Instant| w.min(tick))))
    }

    /// An attempt's envelope for `device` is going out. Only commands are
    /// journalled: a challenge request runs nothing, and an attempt whose
    /// command was never built starts afresh on resume.
    pub fn sending(&mut self, device: &str, snapshot: Snapshot, unix_ms: u64) {
        if snapshot.challenges.is_empty() && snapshot.receipt_key.is_none() {
            return;
        }
        let Some(p) = self.devices.get(device) else { return };
        // A resumed attempt keeps its number; a new one is the next.
        let attempt = if p.state == DeviceState::Sent { p.attempts } else { p.attempts + 1 };
        self.record(Event::Sending { device: device.to_owned(), attempt, at: unix_ms, snapshot });
    }

    /// An attempt ended.
    pub fn finished(&mut self, device: &str, f: &Finished, unix_ms: u64) {
        self.driving.remove(device);
        let Some(p) = self.devices.get(device) else { return };
        // An attempt that ended before its command was built (no challenge
        // came) still counts: retries run out, and the abort rule sees it.
        let attempt = if p.state == DeviceState::Sent { p.attempts } else { p.attempts + 1 };
        let (outcome, status, code, output, error) = match &f.result {
            DeviceResult::Answered(r) => (
                if r.status == mqseal_proto::Status::Ok { Outcome::Ok } else { Outcome::Failed },
                Some(status_name(r.status).to_owned()),
                Some(r.code),
                Some(String::from_utf8_lossy(&r.output).into_owned()),
                None,
            ),
            DeviceResult::TimedOut => (Outcome::TimedOut, None, None, None, None),
            DeviceResult::Error(e) => (Outcome::Error, None, None, None, Some(e.clone())),
        };
        self.record(Event::Finished {
            device: device.to_owned(),
            attempt,
            at: unix_ms,
            outcome,
            status,
            code,
            output,
            error,
        });
        self.refresh(device);
        self.check_abort(unix_ms);
        self.maybe_end(unix_ms);
    }

    fn check_abort(&mut self, unix_ms: u64) {
        let Some(rule) = self.spec.abort else { return };
        if self.aborted || self.ended {
            return;
        }
        let c = self.counts;
        let finished = c.ok + c.failed + c.timed_out;
        if finished >= rule.after.max(1) && c.failed * 100 >= usize::from(rule.failed_percent) * finished {
            let reason = format!(
                "{} of {finished} finished devices failed (the rule: {}% after {})",
                c.failed, rule.failed_percent, rule.after
            );
            self.record(Event::Aborted { at: unix_ms, reason });
        }
    }

    /// Ends the job once nothing is out and nothing more may start.
    fn maybe_end(&mut self, unix_ms: u64) {
        if self.ended || !self.driving.is_empty() {
            return;
        }
        let c = self.counts;
        let stopping = self.cancelled || self.aborted || unix_ms >= self.spec.deadline_at;
        if c.sent == 0 && (c.pending == 0 || stopping) {
            self.record(Event::Ended { at: unix_ms });
        }
    }
}

impl Counts {
    fn of(&mut self, s: DeviceState) -> &mut usize {
        match s {
            DeviceState::Pending => &mut self.pending,
            DeviceState::Sent => &mut self.sent,
            DeviceState::Ok => &mut self.ok,
            DeviceState::Failed => &mut self.failed,
            DeviceState::TimedOut => &mut self.timed_out,
            DeviceState::Skipped => &mut self.skipped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::{Evidence, Reply};
    use mqseal_proto::Status;

    fn spec(n: usize) -> JobSpec {
        JobSpec {
            id: "j".into(),
            created_at: 0,
            operator: "op".into(),
            command: "go".into(),
            args: vec![],
            mode: Mode::Challenge,
            hidden: false,
            ttl_secs: 300,
            devices: (0..n).map(|i| format!("d-{i}")).collect(),
            rate_per_min: None,
            max_in_flight: 100,
            abort: None,
            deadline_at: 1_000_000,
            retries: 0,
            attempt_timeout_ms: 10_000,
            presence: true,
        }
    }

    fn snap() -> Snapshot {
        Snapshot {
            msg_id: "00".repeat(16),
            issued_at: 0,
            expires_at: 0,
            topic: "mqseal/v1/dev/d-0/cmd".into(),
            frame: String::new(),
            receipt_key: None,
            requests: vec!["11".repeat(16)],
            challenges: vec!["22".repeat(16)],
        }
    }

    fn answered(status: Status) -> Finished {
        let evidence = Evidence { frame: vec![], challenge: None, at_ms: 0 };
        Finished { msg_id: None, result: DeviceResult::Answered(Reply { status, code: 0, output: vec![], evidence }) }
    }

    fn online(job: &mut Job) {
        for d in job.spec.devices.clone() {
            job.on_status(&d, b"online");
        }
    }

    fn names(starts: &[Start]) -> Vec<&str> {
        starts.iter().map(|s| s.device.as_str()).collect()
    }

    /// Offline devices wait; the rate spaces starts; max in flight caps them.
    #[test]
    fn starts_wait_for_online_devices_the_rate_and_free_places() {
        let mut job = Job::new(JobSpec { rate_per_min: Some(60), max_in_flight: 2, ..spec(4) });
        let now = Instant::now();
        assert!(job.due(now, 10).0.is_empty(), "nobody online");
        online(&mut job);
        let (s, wake) = job.due(now, 10);
        assert_eq!(names(&s), ["d-0"]);
        assert_eq!(wake, Some(now + Duration::from_secs(1)), "60/min: one a second");
        assert!(job.due(now + Duration::from_millis(500), 10).0.is_empty());
        assert_eq!(names(&job.due(now + Duration::from_secs(1), 10).0), ["d-1"]);
        assert!(job.due(now + Duration::from_secs(2), 10).0.is_empty(), "two out: no free place");
        job.sending("d-0", snap(), 11);
        job.finished("d-0", &answered(Status::Ok), 12);
        assert_eq!(names(&job.due(now + Duration::from_secs(2), 12).0), ["d-2"]);
        // d-1 and d-2 are handed out but sent nothing yet: still pending.
        assert_eq!(job.counts(), Counts { pending: 3, sent: 0, ok: 1, ..Counts::default() });
    }

    /// A failed attempt is retried with a new attempt while retries last;
    /// the journal replayed gives the same state.
    #[test]
    fn retries_then_final_and_replay_agrees() {
        let mut job = Job::new(JobSpec { retries: 1, ..spec(1) });
        online(&mut job);
        let now = Instant::now();
        let mut events = Vec::new();
        for n in 1..=2 {
            assert_eq!(names(&job.due(now, 10).0), ["d-0"]);
            job.sending("d-0", snap(), 10);
            job.finished("d-0", &answered(Status::Failed), 11);
            events.extend(job.take_events());
            assert_eq!(job.devices["d-0"].attempts, n);
        }
        assert_eq!(job.devices["d-0"].state, DeviceState::Failed);
        assert!(job.is_ended());
        let again = Job::replay(job.spec.clone(), &events);
        assert_eq!(again.devices["d-0"], job.devices["d-0"]);
        assert!(again.is_ended());
    }

    /// The abort rule stops new starts; what is pending is skipped.
    #[test]
    fn the_abort_rule_stops_the_job() {
        let mut job =
            Job::new(JobSpec { max_in_flight: 1, abort: Some(AbortRule { failed_percent: 50, after: 2 }), ..spec(5) });
        online(&mut job);
        let now = Instant::now();
        for d in ["d-0", "d-1"] {
            assert_eq!(names(&job.due(now, 10).0), [d]);
            job.sending(d, snap(), 10);
            job.finished(d, &answered(Status::Failed), 11);
        }
        assert_eq!(job.state(), JobState::Aborted);
        assert!(job.is_ended());
        assert!(job.due(now, 12).0.is_empty());
        assert_eq!(job.counts(), Counts { failed: 2, skipped: 3, ..Counts::default() });
    }

    /// An attempt that times out before any command went out (no challenge
    /// came) uses up a retry like any other.
    #[test]
    fn attempts_without_a_command_count() {
        let mut job = Job::new(JobSpec { retries: 1, ..spec(1) });
        online(&mut job);
        let timed_out = Finished { msg_id: None, result: DeviceResult::TimedOut };
        for n in 1..=2 {
            assert_eq!(names(&job.due(Instant::now(), 10).0), ["d-0"]);
            job.finished("d-0", &timed_out, 11);
            assert_eq!(job.progress("d-0").map(|p| p.attempts), Some(n));
        }
        assert_eq!(job.progress("d-0").map(|p| p.state), Some(DeviceState::TimedOut));
        assert!(job.is_ended());
    }

    /// A challenge request is not journalled (it runs nothing); a command is.
    #[test]
    fn only_commands_are_journalled() {
        let mut job = Job::new(spec(1));
        online(&mut job);
        job.due(Instant::now(), 10);
        let mut request = snap();
        request.challenges.clear();
        job.sending("d-0", request, 10);
        assert!(job.take_events().is_empty());
        assert_eq!(job.counts().pending, 1, "nothing that can run is out yet");
        job.sending("d-0", snap(), 11);
        assert!(matches!(job.take_events().as_slice(), [Event::Sending { attempt: 1, .. }]));
    }

    /// After a crash, an attempt that was out is started again from its
    /// snapshot, with its attempt number, before anything new.
    #[test]
    fn an_attempt_out_at_a_crash_is_resumed_first() {
        let mut job = Job::new(spec(2));
        online(&mut job);
        let now = Instant::now();
        job.due(now, 10);
        job.sending("d-0", snap(), 10);
        let events = job.take_events();
        let mut again = Job::replay(job.spec.clone(), &events);
        let (s, _) = again.due(now, 20);
        assert_eq!(names(&s), ["d-0"]);
        assert_eq!(s[0].resume.as_ref(), Some(&snap()));
        again.on_status("d-1", b"online");
        assert_eq!(names(&again.due(now, 20).0), ["d-1"]);
        again.sending("d-0", snap(), 21);
        assert_eq!(again.devices["d-0"].attempts, 1, "the same attempt");
    }

    /// Pending at the deadline: timed out, and the job ends.
    /// Without presence, devices start as the rate allows, with no status
    /// heard at all.
    #[test]
    fn without_presence_devices_start_without_a_status() {
        let mut job = Job::new(JobSpec { presence: false, max_in_flight: 2, ..spec(3) });
        let (starts, _) = job.due(Instant::now(), 10);
        let names: Vec<&str> = starts.iter().map(|s| s.device.as_str()).collect();
        assert_eq!(names, ["d-0", "d-1"], "up to max_in_flight, in rollout order");
    }

    #[test]
    fn the_deadline_times_out_what_never_came_online() {
        let mut job = Job::new(spec(1));
        assert!(job.due(Instant::now(), 1_000_000).0.is_empty());
        assert!(job.is_ended());
        assert_eq!(job.devices["d-0"].state, DeviceState::TimedOut);
        assert_eq!(job.devices["d-0"].error.as_deref(), Some("not online before the deadline"));
    }
}
