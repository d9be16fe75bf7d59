//! A job driven over a [`Session`](crate::session::Session): the
//! [`Driver`] that joins the job's policy ([`Job`]), its journal and the
//! audit log to the session's one loop.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use mqseal_client::unix_ms;
use mqseal_proto::sealed::KeyId;
use mqseal_store::AuditLog;
use tokio::time::Instant;

use super::journal::Journal;
use super::{Counts, Job};
use crate::audit::{self, Sending};
use crate::exchange::{Request, Snapshot};
use crate::registry::DeviceKeys;
use crate::session::{Driver, Finished, Start};

/// How often a running job looks for a cancel request.
const CANCEL_CHECK: Duration = Duration::from_millis(500);

/// How long answers' events and audit records may wait to be written with
/// the next batch: each write is an fsync.
const SAVE_EVERY: Duration = Duration::from_millis(200);

/// How long a command envelope may wait for others to share its journal
/// write (a group commit): commands built over challenges that arrive a
/// millisecond apart go out together, after one fsync instead of one
/// each.
const GROUP_COMMIT: Duration = Duration::from_millis(50);

/// A job being run by this process.
pub struct JobRun<'a> {
    job: Job,
    journal: Journal,
    request: Request,
    audit: &'a AuditLog,
    operator: String,
    controller_key: KeyId,
    keys: &'a HashMap<String, &'a DeviceKeys>,
    /// Audit records not yet written (kept, and tried again, if the log
    /// fails).
    records: Vec<audit::Record>,
    /// The last time the audit log failed, and why.
    audit_error: Option<String>,
    progress: &'a mut (dyn FnMut(&Counts) + Send),
    deadline: Instant,
    cancel_checked: Instant,
    /// Time spent writing the journal and the audit log (what a job costs
    /// beyond a broadcast).
    costs: Costs,
    /// When the journal and the audit log were last written.
    saved: Instant,
    /// When the oldest command envelope not yet journalled was built.
    unsaved_since: Option<Instant>,
}

/// Where a job's bookkeeping time went.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Costs {
    /// Appending and syncing the journal (ms).
    pub journal_ms: f64,
    /// Appending audit records (ms).
    pub audit_ms: f64,
    /// Audit records written.
    pub audit_records: u64,
}

impl<'a> JobRun<'a> {
    /// Runs `job` (new, or as its journal left it) with the journal it was
    /// read from, writing audit records to `audit` as `operator` with the
    /// controller key `controller_key`.
    pub fn new(
        job: Job,
        journal: Journal,
        audit: &'a AuditLog,
        operator: &str,
        controller_key: KeyId,
        keys: &'a HashMap<String, &'a DeviceKeys>,
        progress: &'a mut (dyn FnMut(&Counts) + Send),
    ) -> JobRun<'a> {
        let left = Duration::from_millis(job.spec().deadline_at.saturating_sub(unix_ms()));
        let request = job.spec().request();
        let attempt_timeout = Duration::from_millis(job.spec().attempt_timeout_ms);
        progress(&job.counts());
        JobRun {
            job,
            journal,
            request,
            audit,
            operator: operator.to_owned(),
            controller_key,
            keys,
            records: Vec::new(),
            audit_error: None,
            progress,
            // A little past the job's deadline (or an attempt's timeout,
            // for one resumed after it), so the last answers are heard
            // before the session gives up.
            deadline: Instant::now() + left.max(attempt_timeout) + Duration::from_secs(5),
            cancel_checked: Instant::now(),
            costs: Costs::default(),
            saved: Instant::now(),
            unsaved_since: None,
        }
    }

    /// What each attempt sends.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// The job as it stands.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Writes the audit records still waiting, once more, then the
    /// journal's last events: what failed, if it fails again.
    pub async fn finish(mut self) -> (Job, Option<String>, Costs) {
        if !self.records.is_empty() {
            match self.audit.append(&self.records).await {
                Ok(_) => self.audit_error = None,
                Err(e) => {
                    // The events that say those devices answered are not
                    // journalled either: `resume` asks them again with the
                    // same envelopes, each device answers with its stored
                    // receipt, and the records are written then.
                    let n = self.records.len();
                    self.audit_error = Some(format!(
                        "{n} audit records were not written ({e}); the job's journal leaves those devices \
                         unanswered, so `mqseal job resume` records them"
                    ));
                    return (self.job, self.audit_error, self.costs);
                }
            }
        }
        match self.journal.append(self.job.unsaved()) {
            Ok(()) => self.job.saved(),
            Err(e) => self.audit_error = Some(format!("job journal: {e}")),
        }
        (self.job, self.audit_error, self.costs)
    }
}

impl Driver for JobRun<'_> {
    fn devices(&self) -> Vec<String> {
        self.job.spec().devices.clone()
    }

    fn wants_status(&self) -> bool {
        self.job.spec().presence
    }

    fn wants_snapshots(&self) -> bool {
        true
    }

    fn due(&mut self, now: Instant) -> (Vec<Start>, Option<Instant>) {
        if now.duration_since(self.cancel_checked) >= CANCEL_CHECK {
            self.cancel_checked = now;
            if self.journal.cancel_requested() {
                self.job.cancel(unix_ms());
            }
        }
        self.job.due(now, unix_ms())
    }

    fn sending(&mut self, device: &str, snapshot: Snapshot) {
        self.job.sending(device, snapshot, unix_ms());
        if self.unsaved_since.is_none() && self.job.must_save() {
            self.unsaved_since = Some(Instant::now());
        }
    }

    fn hold_until(&self) -> Option<Instant> {
        self.unsaved_since.map(|t| t + GROUP_COMMIT)
    }

    fn finished(&mut self, device: &str, finished: Finished) {
        let now = unix_ms();
        let sent_at = self.job.progress(device).and_then(|p| p.sent_at).unwrap_or(now);
        if let Some(keys) = self.keys.get(device) {
            let s = Sending {
                via: "job",
                operator: &self.operator,
                controller_key: self.controller_key,
                request: &self.request,
                sent_at,
            };
            self.records.push(audit::record(&s, device, keys, &finished, now));
        }
        self.job.finished(device, &finished, now);
        (self.progress)(&self.job.counts());
    }

    fn status(&mut self, device: &str, payload: &[u8]) {
        self.job.on_status(device, payload);
    }

    fn flush(&mut self) -> impl Future<Output = Result<(), String>> + Send {
        // Envelopes about to go out must be journalled first; answers may
        // wait a little, to share a sync with the next ones. An answer's
        // audit record is written before its `finished` event: a crash in
        // between sends the envelope again on resume and records the
        // answer again, never loses it.
        let now = Instant::now();
        let due = self.job.must_save() || now.duration_since(self.saved) >= SAVE_EVERY;
        if due {
            self.saved = now;
            self.unsaved_since = None;
        }
        let records = if due { std::mem::take(&mut self.records) } else { Vec::new() };
        let (audit, journal, costs, job) = (self.audit, &mut self.journal, &mut self.costs, &mut self.job);
        let (failed, audit_error) = (&mut self.records, &mut self.audit_error);
        async move {
            if !due {
                return Ok(());
            }
            if !records.is_empty() {
                let t0 = std::time::Instant::now();
                let appended = audit.append(&records).await;
                costs.audit_ms += t0.elapsed().as_secs_f64() * 1000.0;
                costs.audit_records += records.len() as u64;
                if let Err(e) = appended {
                    // A job whose answers cannot be recorded stops: the
                    // events that say they were answered would be
                    // journalled without their records (a MongoDB that is
                    // down spools; this is the local file failing). The
                    // records are kept for `finish` to try once more.
                    *audit_error = Some(e.to_string());
                    failed.extend(records);
                    return Err(format!("the job stopped: {e}"));
                }
            }
            let t0 = std::time::Instant::now();
            let journalled = journal.append(job.unsaved()).map_err(|e| format!("job journal: {e}"));
            costs.journal_ms += t0.elapsed().as_secs_f64() * 1000.0;
            // Kept on failure, for `finish` to write once more.
            if journalled.is_ok() {
                job.saved();
            }
            journalled
        }
    }

    fn is_done(&self) -> bool {
        self.job.is_ended()
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }
}
