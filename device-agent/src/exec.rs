//! Running a verified, allow-listed command.
//!
//! Programs start with an empty environment (plus `PATH` and
//! `MQSEAL_DEVICE`), no stdin, and their output read through a bounded
//! buffer: a program that prints gigabytes costs the agent at most
//! `max_output_bytes` of memory, and one that hangs is killed at its
//! timeout. The child is killed if the agent drops the future, so an
//! agent shutting down leaves nothing behind.

use std::process::Stdio;
use std::time::{Duration, Instant};

use mqseal_proto::Status;
use tokio::io::{AsyncRead, AsyncReadExt};
use zeroize::Zeroizing;

use crate::commands::CommandSpec;

/// What running a command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    /// How it ended.
    pub status: Status,
    /// Exit code, or 0.
    pub code: i32,
    /// Captured output (stdout, then stderr), bounded.
    pub output: Zeroizing<Vec<u8>>,
}

impl Ran {
    fn new(status: Status, code: i32, output: impl Into<Vec<u8>>) -> Ran {
        Ran { status, code, output: Zeroizing::new(output.into()) }
    }
}

/// What the executor needs besides the command.
#[derive(Debug, Clone)]
pub struct ExecContext {
    /// This device's id, for `info` and `MQSEAL_DEVICE`.
    pub device_id: String,
    /// When the agent started, for `info`.
    pub started: Instant,
    /// Output beyond this is cut.
    pub max_output: usize,
    /// Timeout for commands that set none.
    pub default_timeout: Duration,
}

/// Runs `name` with `args` if the allow-list has it.
pub async fn run(spec: Option<&CommandSpec>, name: &str, args: &[String], ctx: &ExecContext) -> Ran {
    let Some(spec) = spec else {
        return Ran::new(Status::UnknownCommand, 0, format!("{name}: not on this device's allow-list"));
    };
    let accepted = match spec.accept(args) {
        Ok(a) => Zeroizing::new(a),
        Err(e) => return Ran::new(Status::BadArguments, 0, format!("{name}: {e}")),
    };
    if let Some(builtin) = &spec.builtin {
        return builtin_action(builtin, &accepted, ctx);
    }
    let Some(argv) = spec.argv(&accepted) else {
        return Ran::new(Status::Failed, 0, format!("{name}: nothing to run"));
    };
    let timeout = spec.timeout_ms.map_or(ctx.default_timeout, Duration::from_millis);
    run_program(&argv, timeout, ctx).await
}

fn builtin_action(builtin: &str, args: &[String], ctx: &ExecContext) -> Ran {
    match builtin {
        "ping" => Ran::new(Status::Ok, 0, b"pong".to_vec()),
        "noop" => Ran::new(Status::Ok, 0, Vec::new()),
        "info" => Ran::new(
            Status::Ok,
            0,
            format!(
                "device={} agent=mqseal-agent/{} uptime_secs={}",
                ctx.device_id,
                env!("CARGO_PKG_VERSION"),
                ctx.started.elapsed().as_secs()
            ),
        ),
        "echo" => Ran::new(Status::Ok, 0, args.first().cloned().unwrap_or_default()),
        other => Ran::new(Status::Failed, 0, format!("unknown builtin {other}")),
    }
}

async fn run_program(argv: &[String], timeout: Duration, ctx: &ExecContext) -> Ran {
    let Some((program, rest)) = argv.split_first() else {
        return Ran::new(Status::Failed, 0, "empty argv");
    };
    let child = tokio::process::Command::new(program)
        .args(rest)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("MQSEAL_DEVICE", &ctx.device_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Ran::new(Status::Failed, 0, format!("cannot start {program}: {e}")),
    };
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let max = ctx.max_output;
    let work = async {
        let (out, err, status) = tokio::join!(bounded(stdout, max), bounded(stderr, max), child.wait());
        (out, err, status)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok((mut out, err, status)) => {
            let room = max.saturating_sub(out.len());
            out.extend(err.iter().take(room));
            let truncated = out.len() >= max;
            match status {
                Ok(s) if s.success() => Ran { status: Status::Ok, code: 0, output: mark(out, truncated) },
                Ok(s) => Ran { status: Status::Failed, code: s.code().unwrap_or(-1), output: mark(out, truncated) },
                Err(e) => Ran::new(Status::Failed, 0, format!("waiting for {program}: {e}")),
            }
        }
        Err(_) => {
            // kill_on_drop would do it too; killing here makes it happen
            // before the response is sent, not whenever the task ends.
            let _ = child.kill().await;
            Ran::new(Status::TimedOut, -1, format!("{program}: stopped after {} ms", timeout.as_millis()))
        }
    }
}

/// Marks output cut at the bound, so the reader knows it is partial.
fn mark(mut out: Zeroizing<Vec<u8>>, truncated: bool) -> Zeroizing<Vec<u8>> {
    if truncated {
        out.extend_from_slice(b"\n[output truncated]");
    }
    out
}

/// Reads a pipe to its end, keeping the first `max` bytes; the rest is read
/// and dropped so the child never blocks on a full pipe.
async fn bounded<R: AsyncRead + Unpin>(pipe: Option<R>, max: usize) -> Zeroizing<Vec<u8>> {
    let mut kept = Zeroizing::new(Vec::new());
    let Some(mut pipe) = pipe else { return kept };
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                kept.extend(buf.iter().take(n.min(room)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::commands::ArgSpec;

    fn ctx(max_output: usize) -> ExecContext {
        ExecContext {
            device_id: "d1".into(),
            started: Instant::now(),
            max_output,
            default_timeout: Duration::from_secs(5),
        }
    }

    fn program(argv: &[&str], args: Vec<ArgSpec>, timeout_ms: Option<u64>) -> CommandSpec {
        CommandSpec {
            builtin: None,
            program: Some(argv.iter().map(|s| (*s).to_owned()).collect()),
            args,
            timeout_ms,
            hidden: vec![],
        }
    }

    #[tokio::test]
    async fn programs_run_with_exit_codes_timeouts_and_bounded_output() {
        let c = ctx(1000);
        let echo = program(&["/bin/echo", "{x}"], vec![ArgSpec::string("x", 64)], None);
        let r = run(Some(&echo), "e", &["a;b $(c)".into()], &c).await;
        assert_eq!((r.status, r.output.as_slice()), (Status::Ok, &b"a;b $(c)\n"[..]), "no shell");

        let fail = program(&["/bin/sh", "-c", "echo oops >&2; exit 3"], vec![], None);
        let r = run(Some(&fail), "f", &[], &c).await;
        assert_eq!((r.status, r.code, r.output.as_slice()), (Status::Failed, 3, &b"oops\n"[..]));

        let slow = program(&["/bin/sleep", "5"], vec![], Some(200));
        let t = Instant::now();
        let r = run(Some(&slow), "s", &[], &c).await;
        assert_eq!(r.status, Status::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(2));

        let big = program(&["/bin/sh", "-c", "head -c 100000 /dev/zero"], vec![], None);
        let r = run(Some(&big), "b", &[], &ctx(100)).await;
        assert_eq!(r.status, Status::Ok);
        assert!(r.output.len() < 200 && r.output.ends_with(b"[output truncated]"));

        let missing = program(&["/nonexistent/prog"], vec![], None);
        let r = run(Some(&missing), "m", &[], &c).await;
        assert_eq!(r.status, Status::Failed);
        assert!(String::from_utf8_lossy(&r.output).contains("/nonexistent/prog"));
    }

    #[tokio::test]
    async fn unknown_commands_and_bad_arguments_are_reported_not_run() {
        let c = ctx(1000);
        assert_eq!(run(None, "rm", &[], &c).await.status, Status::UnknownCommand);
        let echo = CommandSpec::builtin("echo", vec![ArgSpec::string("t", 4)]);
        let r = run(Some(&echo), "echo", &["toolong".into()], &c).await;
        assert_eq!(r.status, Status::BadArguments);
        let r = run(Some(&echo), "echo", &["hi".into()], &c).await;
        assert_eq!((r.status, r.output.as_slice()), (Status::Ok, &b"hi"[..]));
    }
}
