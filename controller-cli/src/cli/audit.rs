//! `mqseal audit`: reading the audit log, and checking it again.

use std::time::Duration;

use clap::{Args, Subcommand};
use mqseal_client::unix_ms;
use mqseal_controller::audit::{self, Record, Verdict};
use mqseal_controller::config::ControllerConfig;
use mqseal_store::{AuditQuery, Stored};
use serde_json::json;

use super::{Exit, Failure, audit_log, parse_duration, registry};

#[derive(Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    action: Option<AuditCmd>,
    /// Only this device's records.
    #[arg(long, global = true)]
    device: Option<String>,
    /// Only records from this long ago until now (e.g. 30m, 24h, 7d).
    #[arg(long, global = true, value_parser = parse_duration)]
    since: Option<Duration>,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check every stored answer again: sealed receipts' signatures with
    /// the devices' public keys, challenge-mode tags with their keys.
    /// Exits 6 if any record does not verify.
    Verify,
}

/// Lists or verifies the records the flags select.
pub(super) async fn run(c: &ControllerConfig, args: AuditArgs, json: bool) -> Result<Exit, Failure> {
    let log = audit_log(c).await?;
    let since_ms = args.since.map(|d| unix_ms().saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
    let query = AuditQuery { device: args.device, since_ms };
    let stored = log.read(&query).await.map_err(Failure::local)?;
    match args.action {
        None => list(&stored, json),
        Some(AuditCmd::Verify) => verify(c, &stored, json, &log.describe()),
    }
}

/// A stored record in the controller's shape, or why it is not one.
fn parse(s: &Stored) -> Result<Record, String> {
    let value = s.record.clone()?;
    serde_json::from_value(value).map_err(|e| format!("not an audit record: {e}"))
}

fn list(stored: &[Stored], json: bool) -> Result<Exit, Failure> {
    if json {
        let rows: Vec<_> = stored
            .iter()
            .map(|s| match parse(s) {
                Ok(r) => json!({ "where": s.at, "record": r }),
                Err(e) => json!({ "where": s.at, "error": e }),
            })
            .collect();
        println!("{}", json!({ "records": rows }));
        return Ok(Exit::Ok);
    }
    println!(
        "{:<24} {:<24} {:<16} {:<9} {:<9} {:<16} operator",
        "sent", "device", "command", "mode", "outcome", "msg_id"
    );
    for s in stored {
        match parse(s) {
            Ok(r) => println!(
                "{:<24} {:<24} {:<16} {:<9} {:<9} {:<16} {}",
                utc(r.sent_at),
                r.device,
                r.command,
                json!(r.mode).as_str().unwrap_or("?"),
                json!(r.outcome).as_str().unwrap_or("?"),
                r.msg_id.as_deref().and_then(|m| m.get(..16)).unwrap_or("-"),
                r.operator
            ),
            Err(e) => println!("{}: {e}", s.at),
        }
    }
    Ok(Exit::Ok)
}

fn verify(c: &ControllerConfig, stored: &[Stored], json: bool, source: &str) -> Result<Exit, Failure> {
    let reg = registry(c)?;
    let (mut verified, mut failed, mut unverifiable, mut no_answer) = (0usize, 0usize, 0usize, 0usize);
    let mut rows = Vec::new();
    for s in stored {
        let (device, msg_id, verdict) = match parse(s) {
            Ok(r) => (Some(r.device.clone()), r.msg_id.clone(), audit::verify(&r, &reg)),
            Err(e) => (None, None, Verdict::Failed(e)),
        };
        let (name, reason) = match &verdict {
            Verdict::Verified => {
                verified += 1;
                ("verified", None)
            }
            Verdict::NoAnswer => {
                no_answer += 1;
                ("no_answer", None)
            }
            Verdict::Unverifiable(why) => {
                unverifiable += 1;
                ("unverifiable", Some(why.clone()))
            }
            Verdict::Failed(why) => {
                failed += 1;
                ("failed", Some(why.clone()))
            }
        };
        if !json && matches!(verdict, Verdict::Failed(_) | Verdict::Unverifiable(_)) {
            let who = device.as_deref().unwrap_or("?");
            println!(
                "{}: {name}: {who} {}: {}",
                s.at,
                msg_id.as_deref().unwrap_or("-"),
                reason.as_deref().unwrap_or("")
            );
        }
        rows.push(json!({ "where": s.at, "device": device, "msg_id": msg_id, "verdict": name, "reason": reason }));
    }
    if json {
        println!(
            "{}",
            json!({ "log": source, "records": rows,
                    "summary": { "verified": verified, "failed": failed, "unverifiable": unverifiable,
                                 "no_answer": no_answer } })
        );
    } else {
        println!(
            "{source}: {verified} verified, {failed} do not verify, {unverifiable} cannot be checked, {no_answer} without an answer"
        );
    }
    Ok(if failed > 0 { Exit::Unverified } else { Exit::Ok })
}

/// Unix milliseconds as an ISO 8601 UTC time (days-to-civil from Howard
/// Hinnant's `chrono`-compatible algorithms; no time-zone database needed).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
