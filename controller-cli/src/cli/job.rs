//! `mqseal job`: a command rolled out to many devices (run, status, list,
//! cancel, resume). The policy is `mqseal_controller::job`; this module
//! reads flags, opens what a run needs and prints.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mqseal_client::unix_ms;
use mqseal_controller::config::ControllerConfig;
use mqseal_controller::job::journal::{self, Journal, JournalError};
use mqseal_controller::job::run::JobRun;
use mqseal_controller::job::{AbortRule, Counts, DeviceState, Job, JobSpec, JobState};
use mqseal_controller::registry::DeviceKeys;
use mqseal_controller::session::{Mode, Session};
use mqseal_proto::Policy;
use serde_json::json;

use super::{Exit, Failure, audit_log, client_id, load_key, parse_duration, process_cpu_ms, registry};

#[derive(Subcommand)]
pub enum JobCmd {
    /// Roll a command out to many devices: at a rate, to devices as they
    /// come online, with retries and an abort rule; resumable.
    Run(RunArgs),
    /// A job's progress, per device.
    Status {
        /// Job id (see `mqseal job list`).
        id: String,
    },
    /// Every job, oldest first.
    List,
    /// Stop starting devices (what is out may still answer); the rest is
    /// skipped.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Go on with a job whose controller stopped: what was out is sent
    /// again (the same envelope), nothing answered is sent twice.
    Resume {
        /// Job id.
        id: String,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// Command name (on the devices' allow-lists).
    command: String,
    /// Its arguments.
    args: Vec<String>,
    /// Comma-separated device ids, in rollout order.
    #[arg(long, value_delimiter = ',', conflicts_with = "all", required_unless_present = "all")]
    devices: Vec<String>,
    /// Every device in the registry.
    #[arg(long)]
    all: bool,
    /// At most this many new attempts: N/min or N/s (default: no limit).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u32>,
    /// At most this many attempts out at once.
    #[arg(long, default_value_t = 100)]
    max_in_flight: usize,
    /// Stop starting devices once this share of the finished ones failed
    /// (e.g. 20%), counted from --after finished devices.
    #[arg(long, value_parser = parse_percent, requires = "after")]
    abort_if_failed: Option<u8>,
    /// See --abort-if-failed.
    #[arg(long)]
    after: Option<usize>,
    /// No new attempt after this long (e.g. 30m, 24h, 7d); devices not
    /// online by then time out.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    deadline: Duration,
    /// Attempts after the first, per device, for a failure or a timeout
    /// (each a new envelope).
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// challenge (HMAC, the fleet default) or sealed (RSA).
    #[arg(long, value_enum, default_value = "challenge")]
    mode: Mode,
    /// Challenge mode: send only the tag.
    #[arg(long)]
    hidden: bool,
    /// How long each attempt waits for its answer.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Start devices as the rate allows without waiting for their retained
    /// status to say `online`: an offline device gets its command from its
    /// persistent session when it connects (within --timeout; retries
    /// after that). For clustered brokers that keep retained messages per
    /// node (RabbitMQ 3.10).
    #[arg(long)]
    without_presence: bool,
    /// How long each envelope stays valid (at most the devices' 10-minute
    /// window): a resumed attempt is answered from the device's journal
    /// only while its envelope is valid.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    ttl: Duration,
}

/// `N/min` or `N/s` as attempts per minute.
fn parse_rate(s: &str) -> Result<u32, String> {
    let (n, per) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected N/min or N/s"))?;
    let n: u32 = n.trim().parse().map_err(|_| format!("{s:?}: {n:?} is not a number"))?;
    let per_min = match per.trim() {
        "min" | "m" => n,
        "s" | "sec" => n.saturating_mul(60),
        other => return Err(format!("{s:?}: unit {other:?} is not min or s")),
    };
    if per_min == 0 {
        return Err(format!("{s:?}: a rate must be above zero"));
    }
    Ok(per_min)
}

/// `20%` (or `20`) as a percentage.
fn parse_percent(s: &str) -> Result<u8, String> {
    let n: u8 = s.trim_end_matches('%').parse().map_err(|_| format!("{s:?}: expected a percentage such as 20%"))?;
    if n == 0 || n > 100 {
        return Err(format!("{s:?}: between 1% and 100%"));
    }
    Ok(n)
}

/// Runs the subcommand.
pub(super) async fn run(c: &ControllerConfig, cmd: JobCmd, json: bool) -> Result<Exit, Failure> {
    let data_dir = c.resolve(&c.data_dir);
    let journal_err = |e: JournalError| match e {
        e @ JournalError::Unknown(_) => Failure::usage(e),
        e => Failure::local(e),
    };
    match cmd {
        JobCmd::Run(a) => start(c, a, json).await,
        JobCmd::Status { id } => {
            let job = journal::read(&data_dir, &id).map_err(journal_err)?;
            print_job(&job, json, None);
            Ok(Exit::Ok)
        }
        JobCmd::List => {
            let jobs: Vec<(String, Result<Job, JournalError>)> = journal::list(&data_dir)
                .map_err(journal_err)?
                .into_iter()
                .map(|id| {
                    let job = journal::read(&data_dir, &id);
                    (id, job)
                })
                .collect();
            if json {
                let rows: Vec<_> = jobs
                    .iter()
                    .map(|(id, j)| match j {
                        Ok(job) => summary(job),
                        Err(e) => json!({ "id": id, "error": e.to_string() }),
                    })
                    .collect();
                println!("{}", json!({ "jobs": rows }));
                return Ok(Exit::Ok);
            }
            println!(
                "{:<26} {:<10} {:<16} {:>6} {:>6} {:>6} {:>6}",
                "job", "state", "command", "ok", "failed", "t/out", "left"
            );
            for (id, j) in &jobs {
                match j {
                    Ok(job) => {
                        let c = job.counts();
                        println!(
                            "{id:<26} {:<10} {:<16} {:>6} {:>6} {:>6} {:>6}",
                            state_name(job.state()),
                            job.spec().command,
                            c.ok,
                            c.failed,
                            c.timed_out,
                            c.pending + c.sent
                        );
                    }
                    Err(e) => println!("{id:<26} {e}"),
                }
            }
            Ok(Exit::Ok)
        }
        JobCmd::Cancel { id } => {
            let job = journal::request_cancel(&data_dir, &id, unix_ms()).map_err(journal_err)?;
            if json {
                println!("{}", json!({ "job": id, "result": "cancel requested", "state": job.state() }));
            } else {
                println!("{id}: cancel requested (devices not yet sent are skipped; what is out may still answer)");
            }
            Ok(Exit::Ok)
        }
        JobCmd::Resume { id } => {
            let (journal, job) = Journal::open(&data_dir, &id).map_err(journal_err)?;
            if job.is_ended() {
                print_job(&job, json, None);
                return Ok(exit_of(&job));
            }
            drive(c, journal, job, json).await
        }
    }
}

/// `job run`: checks everything, writes the job, then drives it.
async fn start(c: &ControllerConfig, a: RunArgs, json: bool) -> Result<Exit, Failure> {
    if a.hidden && a.mode != Mode::Challenge {
        return Err(Failure::usage("--hidden needs --mode challenge"));
    }
    if a.ttl.as_secs() > Policy::default().max_lifetime_secs || a.ttl.as_secs() == 0 {
        return Err(Failure::usage(format!(
            "--ttl {:?}: an envelope is valid for 1 s to {} s (the devices' window)",
            a.ttl,
            Policy::default().max_lifetime_secs
        )));
    }
    if a.max_in_flight == 0 {
        return Err(Failure::usage("--max-in-flight must be at least 1"));
    }
    let reg = registry(c)?;
    let devices: Vec<String> = if a.all { reg.devices.keys().cloned().collect() } else { a.devices };
    if devices.is_empty() {
        return Err(Failure::usage("no devices to send to"));
    }
    let mut seen = std::collections::HashSet::new();
    for d in &devices {
        // Known here; its keys are parsed once, when the job runs.
        if !reg.devices.contains_key(d) {
            return Err(Failure::usage(format!("unknown device {d} (see mqseal device list)")));
        }
        if !seen.insert(d) {
            return Err(Failure::usage(format!("{d} is named twice")));
        }
    }
    let endpoint = c.broker().map_err(Failure::local)?;
    let now = unix_ms();
    let spec = JobSpec {
        id: job_id(now),
        created_at: now,
        operator: endpoint.username.clone(),
        command: a.command,
        args: a.args,
        mode: a.mode,
        hidden: a.hidden,
        ttl_secs: a.ttl.as_secs(),
        devices,
        rate_per_min: a.rate,
        max_in_flight: a.max_in_flight,
        abort: a.abort_if_failed.map(|p| AbortRule { failed_percent: p, after: a.after.unwrap_or(1) }),
        deadline_at: now.saturating_add(u64::try_from(a.deadline.as_millis()).unwrap_or(u64::MAX)),
        retries: a.retries,
        attempt_timeout_ms: u64::try_from(a.timeout.as_millis()).unwrap_or(u64::MAX),
        presence: !a.without_presence,
    };
    spec.request().validate().map_err(|e| Failure::usage(format!("command: {e}")))?;
    let journal = Journal::create(&c.resolve(&c.data_dir), &spec).map_err(Failure::local)?;
    if !json {
        eprintln!("mqseal: job {} ({} devices)", spec.id, spec.devices.len());
    }
    drive(c, journal, Job::new(spec), json).await
}

/// A job id: its creation time (so ids sort by age) and 24 random bits.
fn job_id(unix_ms: u64) -> String {
    let mut r = [0u8; 3];
    rand_core::Rng::fill_bytes(&mut mqseal_client::rng(), &mut r);
    format!("j{unix_ms}-{}", hex::encode(r))
}

/// Connects and runs `job` to its end (or until the connection is lost
/// for good: then `resume` continues it).
async fn drive(c: &ControllerConfig, journal: Journal, job: Job, json: bool) -> Result<Exit, Failure> {
    let reg = registry(c)?;
    let owned: Vec<(String, DeviceKeys)> =
        job.spec().devices.iter().filter_map(|d| Some((d.clone(), reg.keys(d).ok()?))).collect();
    let keys: HashMap<String, &DeviceKeys> = owned.iter().map(|(d, k)| (d.clone(), k)).collect();
    let endpoint = c.broker().map_err(Failure::local)?;
    let key = load_key(c)?;
    let controller_key = key.id();
    let log = audit_log(c).await?;
    let id = job.spec().id.clone();
    let within = Duration::from_millis(job.spec().attempt_timeout_ms);
    let mut session = Session::connect(endpoint, &c.base, &client_id(&endpoint.username), key, within)
        .await
        .map_err(|e| resumable(&id, Failure::from(e)))?;
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(job.spec().devices.len() as u64);
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} done {msg} {elapsed}") {
            b.set_style(style);
        }
        b
    });
    let mut progress = |n: &Counts| {
        if let Some(b) = &bar {
            b.set_position((n.ok + n.failed + n.timed_out + n.skipped) as u64);
            b.set_message(format!("({} ok, {} failed, {} out)", n.ok, n.failed, n.sent));
        }
    };
    let mut run = JobRun::new(job, journal, &log, &endpoint.username, controller_key, &keys, &mut progress);
    let request = run.request().clone();
    let started = std::time::Instant::now();
    let driven = session.drive(&mut run, &keys, &request).await;
    session.close().await;
    let (job, audit_error, costs) = run.finish().await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(e) = &audit_error {
        eprintln!("mqseal: {e}");
    }
    driven.map_err(|e| resumable(&id, Failure::from(e)))?;
    let timing = json!({ "wall_ms": started.elapsed().as_millis(), "cpu_ms": process_cpu_ms(), "journal_ms": costs.journal_ms,
                         "audit_ms": costs.audit_ms, "audit_records": costs.audit_records });
    print_job(&job, json, Some(timing));
    let exit = exit_of(&job);
    Ok(if audit_error.is_some() { exit.max(Exit::Local) } else { exit })
}

/// A run that stopped early says how to go on.
fn resumable(id: &str, mut f: Failure) -> Failure {
    f.message = format!("{}; the job is kept: `mqseal job resume {id}` goes on with it", f.message);
    f
}

/// The worst device outcome, as for broadcast: a device not done (the
/// job not ended) counts as timed out, a skipped one as failed.
fn exit_of(job: &Job) -> Exit {
    job.devices()
        .map(|(_, p)| match p.state {
            DeviceState::Ok => Exit::Ok,
            DeviceState::Failed | DeviceState::Skipped => Exit::Failed,
            DeviceState::TimedOut | DeviceState::Pending | DeviceState::Sent => Exit::TimedOut,
        })
        .max()
        .unwrap_or(Exit::Ok)
}

fn summary(job: &Job) -> serde_json::Value {
    let s = job.spec();
    json!({ "id": s.id, "created_at": s.created_at, "operator": s.operator, "command": s.command,
            "mode": s.mode, "state": job.state(), "counts": job.counts(), "devices": s.devices.len() })
}

/// The job, per device and in sum; `timing` for the run that just ended.
fn print_job(job: &Job, json: bool, timing: Option<serde_json::Value>) {
    let c = job.counts();
    if json {
        let mut doc = summary(job);
        let rows: Vec<_> = job.devices().map(|(d, p)| json!({ "device": d, "progress": p })).collect();
        if let Some(o) = doc.as_object_mut() {
            o.insert("results".into(), json!(rows));
            if let Some(t) = timing {
                o.insert("timing".into(), t);
            }
        }
        println!("{doc}");
        return;
    }
    for (d, p) in job.devices() {
        match p.state {
            DeviceState::Ok => {}
            _ => println!(
                "{d}: {}{}",
                json!(p.state).as_str().unwrap_or("?"),
                p.status
                    .as_ref()
                    .map(|s| format!(" ({s}, code {})", p.code.unwrap_or(0)))
                    .or_else(|| p.error.as_ref().map(|e| format!(" ({e})")))
                    .unwrap_or_default()
            ),
        }
    }
    let state = state_name(job.state());
    println!(
        "job {} {state}: {} ok, {} failed, {} timed out, {} skipped, {} pending",
        job.spec().id,
        c.ok,
        c.failed,
        c.timed_out,
        c.skipped,
        c.pending + c.sent
    );
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Running => "running",
        JobState::Cancelled => "cancelled",
        JobState::Aborted => "aborted",
        JobState::Ended => "ended",
    }
}
