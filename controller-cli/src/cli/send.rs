//! `mqseal send` and `mqseal broadcast`.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mqseal_client::unix_ms;
use mqseal_controller::audit::{self, Sending};
use mqseal_controller::config::ControllerConfig;
use mqseal_controller::exchange::status_name;
use mqseal_controller::registry::DeviceKeys;
use mqseal_controller::session::{DeviceResult, Finished, Mode, Request, Session};
use mqseal_proto::Status;
use mqseal_store::{Appended, AuditLog};
use serde_json::json;

use super::{Exit, Failure, audit_log, client_id, load_key, parse_duration, process_cpu_ms, registry};

#[derive(Args)]
pub struct CommandArgs {
    /// Command name (on the device's allow-list).
    command: String,
    /// Its arguments.
    args: Vec<String>,
    /// sealed (RSA, default for send) or challenge (HMAC, default for broadcast).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Challenge mode: send only the tag; the device recognises the command.
    #[arg(long)]
    hidden: bool,
    /// How long to wait for the answer (e.g. 10s, 500ms, 2m); a broker that
    /// cannot be reached is tried again for as long before giving up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// How long the command stays valid.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    ttl: Duration,
}

/// Sends `cmd` to `devices`, waits for their answers, appends one audit
/// record per device and prints the results.
pub(super) async fn run(
    c: &ControllerConfig,
    devices: Vec<String>,
    cmd: CommandArgs,
    default_mode: Mode,
    json: bool,
    broadcast: bool,
) -> Result<Exit, Failure> {
    let mode = cmd.mode.unwrap_or(default_mode);
    if cmd.hidden && mode != Mode::Challenge {
        return Err(Failure::usage("--hidden needs --mode challenge"));
    }
    let reg = registry(c)?;
    let mut keys: Vec<(String, DeviceKeys)> = Vec::with_capacity(devices.len());
    for d in &devices {
        keys.push((d.clone(), reg.keys(d).map_err(Failure::usage)?));
    }
    let targets: Vec<(String, &DeviceKeys)> = keys.iter().map(|(d, k)| (d.clone(), k)).collect();
    let endpoint = c.broker().map_err(Failure::local)?;
    let key = load_key(c)?;
    let controller_key = key.id();
    // Opened first: a log that cannot be reached stops the command before
    // anything is sent, not after.
    let log = audit_log(c).await?;
    let request = Request { name: cmd.command.clone(), args: cmd.args.clone(), mode, hidden: cmd.hidden, ttl: cmd.ttl };
    request.validate().map_err(|e| Failure::usage(format!("command: {e}")))?;

    let started = std::time::Instant::now();
    let sent_at = unix_ms();
    // A broker that is restarting is waited for as long as the answers
    // would be: the connect is retried within --timeout, then the wait for
    // answers gets its own --timeout.
    let mut session = Session::connect(endpoint, &c.base, &client_id(&endpoint.username), key, cmd.timeout).await?;
    let bar = (broadcast && !json && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(targets.len() as u64);
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} answered {elapsed}") {
            b.set_style(style);
        }
        b
    });
    let mut progress = |done: usize, _total: usize| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    };
    // A connection lost for good still leaves answers that were heard:
    // they are reported and audited like any others, then the loss decides
    // the exit code.
    let (results, stopped) = match session.run(&targets, &request, cmd.timeout, &mut progress).await {
        Ok(results) => (results, None),
        Err(s) => (s.results, Some(Failure::from(s.error))),
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if session.held_dropped() > 0 {
        eprintln!("mqseal: {} publishes were dropped while subscribing (too many at once)", session.held_dropped());
    }
    session.close().await;
    let timing = Timing { wall_ms: started.elapsed().as_millis(), cpu_ms: process_cpu_ms() };
    let via = if broadcast { "broadcast" } else { "send" };
    let sending = Sending { via, operator: &endpoint.username, controller_key, request: &request, sent_at };
    let audited = append_records(&log, &sending, &targets, &results).await;
    let results: Vec<DeviceResult> = results.into_iter().map(|f| f.result).collect();
    let mut code = report(&devices, &results, mode, json, broadcast, &timing, audited.as_ref().err())?;
    if let Some(f) = stopped {
        eprintln!("mqseal: {}", f.message);
        code = code.max(f.exit);
    }
    // The commands ran either way; a record that could not be written is
    // a local failure the operator must see, whatever the devices said.
    if audited.is_err() {
        code = code.max(Exit::Local);
    }
    Ok(code)
}

/// Appends one record per target.
///
/// # Errors
/// Why the log could not be written, for the report.
pub(super) async fn append_records(
    log: &AuditLog,
    sending: &Sending<'_>,
    targets: &[(String, &DeviceKeys)],
    results: &[Finished],
) -> Result<(), String> {
    let now = unix_ms();
    let records: Vec<audit::Record> =
        targets.iter().zip(results).map(|((d, k), f)| audit::record(sending, d, k, f, now)).collect();
    match log.append(&records).await {
        Ok(Appended::Stored) => Ok(()),
        Ok(Appended::Spooled { spool, why }) => {
            eprintln!(
                "mqseal: audit log unreachable ({why}): {} records kept in {}, forwarded at the next run",
                records.len(),
                spool.display()
            );
            Ok(())
        }
        Err(e) => Err(format!("the command was sent but its audit records were not written: {e}")),
    }
}

/// How long a send or broadcast took, from connecting to the last answer.
struct Timing {
    wall_ms: u128,
    /// This process's CPU time (user + system), if /proc tells.
    cpu_ms: Option<u64>,
}

/// Prints the results and picks the exit code: the worst outcome wins
/// (timeout over failure over success).
fn report(
    devices: &[String],
    results: &[DeviceResult],
    mode: Mode,
    json: bool,
    broadcast: bool,
    timing: &Timing,
    audit_error: Option<&String>,
) -> Result<Exit, Failure> {
    let mut code = Exit::Ok;
    let mut rows = Vec::new();
    let (mut ok, mut failed, mut timed_out) = (0usize, 0usize, 0usize);
    for (d, r) in devices.iter().zip(results) {
        let (outcome, row_code) = match r {
            DeviceResult::Answered(reply) if reply.status == Status::Ok => {
                ok += 1;
                ("ok", Exit::Ok)
            }
            DeviceResult::Answered(_) | DeviceResult::Error(_) => {
                failed += 1;
                ("failed", Exit::Failed)
            }
            DeviceResult::TimedOut => {
                timed_out += 1;
                ("timed_out", Exit::TimedOut)
            }
        };
        code = code.max(row_code);
        let (status, exit, output, error) = match r {
            DeviceResult::Answered(reply) => (
                Some(status_name(reply.status)),
                Some(reply.code),
                Some(String::from_utf8_lossy(&reply.output).into_owned()),
                None,
            ),
            DeviceResult::Error(e) => (None, None, None, Some(e.clone())),
            DeviceResult::TimedOut => (None, None, None, None),
        };
        rows.push(json!({ "device": d, "outcome": outcome, "status": status, "code": exit,
                          "output": output, "error": error }));
        if !json {
            match r {
                DeviceResult::Answered(reply) if !broadcast => {
                    let out = String::from_utf8_lossy(&reply.output);
                    print!("{out}");
                    if !out.is_empty() && !out.ends_with('\n') {
                        println!();
                    }
                    if reply.status != Status::Ok {
                        eprintln!("mqseal: {d}: {} (code {})", status_name(reply.status), reply.code);
                    }
                }
                DeviceResult::Answered(reply) => {
                    println!("{d}: {} (code {})", status_name(reply.status), reply.code);
                }
                DeviceResult::TimedOut => eprintln!("mqseal: {d}: no authenticated answer in time"),
                DeviceResult::Error(e) => eprintln!("mqseal: {d}: {e}"),
            }
        }
    }
    if json {
        let mut doc = if broadcast {
            json!({ "mode": mode, "results": rows,
                    "summary": { "ok": ok, "failed": failed, "timed_out": timed_out },
                    "timing": { "wall_ms": timing.wall_ms, "cpu_ms": timing.cpu_ms } })
        } else {
            rows.into_iter().next().unwrap_or(serde_json::Value::Null)
        };
        if let (Some(e), Some(obj)) = (audit_error, doc.as_object_mut()) {
            obj.insert("audit_error".into(), json!(e));
        }
        println!("{doc}");
    } else if broadcast {
        println!("{ok} ok, {failed} failed, {timed_out} timed out ({} ms)", timing.wall_ms);
    }
    if let (Some(e), false) = (audit_error, json) {
        eprintln!("mqseal: {e}");
    }
    Ok(code)
}
