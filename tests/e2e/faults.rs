//! Faults: the broker crashes mid-burst or is down when a controller
//! starts, copies of a running command arrive, MongoDB goes away, an agent
//! is killed mid-command, the agent's state directory fills up or turns
//! read-only. Real processes, real signals, real filesystems; executions are
//! counted on the device's side by the programs the agent runs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use mqseal_tests::broker::{BrokerConfig, Store};
use mqseal_tests::site::{Site, workspace_bin};
use mqseal_tests::{Secantus, Tmpfs, free_port, metric};

const SECOND: Duration = Duration::from_secs(1);

/// Lines in a file the device's programs append to (0 if absent).
fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

async fn wait_for_lines(path: &Path, n: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + 20 * SECOND;
    while lines(path) < n {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A burst of QoS 1 commands to three agents in both modes, twelve
/// controllers at once; the broker is killed with SIGKILL while they are in
/// flight and comes back a second later (losing every session, queued
/// message and retained status). The controllers reconnect and re-send the
/// same envelopes; every command runs exactly once and every controller gets
/// its answer.
#[tokio::test]
async fn a_broker_crash_mid_burst_loses_nothing_and_runs_nothing_twice() {
    let metrics = free_port();
    let mut site = Site::start_config(BrokerConfig { metrics_port: Some(metrics), ..BrokerConfig::default() }).await;
    let devices = ["f-1", "f-2", "f-3"];
    let dir = site.dir.clone();
    let runs = |d: &str| (dir.join(format!("start-{d}")), dir.join(format!("done-{d}")));
    for d in devices {
        site.add_device(d, &[]).await;
        let (start, done) = runs(d);
        site.add_slow_command(d, "work", 1.5, &start, &done);
    }
    let mut agents = Vec::new();
    for d in devices {
        agents.push(site.agent(d).await);
    }
    let forms: [&[&str]; 4] =
        [&["--mode", "sealed"], &["--mode", "challenge"], &["--mode", "challenge", "--hidden"], &["--mode", "sealed"]];
    let mut sends = Vec::new();
    for d in devices {
        for form in forms {
            let mut args = vec!["send", d, "work", "--timeout", "60s"];
            args.extend_from_slice(form);
            sends.push((d, form, site.spawn_mqseal(&args)));
        }
    }
    // Every controller logged in (3 agents + 12 controllers), commands are
    // running on the devices: now the broker dies.
    let deadline = tokio::time::Instant::now() + 20 * SECOND;
    while metric(metrics, "mqseal_sessions_active").await < 15 {
        assert!(tokio::time::Instant::now() < deadline, "the controllers never all connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started_before_crash: usize = devices.iter().map(|d| lines(&runs(d).0)).sum();
    site.crash_and_restart_broker(SECOND).await;

    for (d, form, send) in sends {
        let out = send.await.unwrap();
        assert_eq!(out.code, 0, "{d} {form:?}: {out:?}\nagent log:\n{}", agents_log(&site, d));
    }
    for d in devices {
        let (start, done) = runs(d);
        // Orphans of a run cannot exist here (no agent was killed), so all
        // four have finished by the time their answers arrived.
        assert_eq!((lines(&start), lines(&done)), (4, 4), "{d}: each command exactly once");
    }
    eprintln!(
        "broker crash: {started_before_crash} of 12 commands had started when it died; all 12 ran once and were answered"
    );
}

/// `mqseal send` started while the broker is down (a restart, a deploy)
/// keeps trying within its `--timeout`, as it would after losing a
/// connection later, and the command runs once when the broker is back.
/// Before, it exited 5 at once ("Connection refused", or "Connection reset
/// by peer" when the broker died between accept and CONNACK).
#[tokio::test]
async fn a_controller_started_while_the_broker_is_down_waits_for_it() {
    let mut site = Site::start(Store::File).await;
    site.add_device("w-1", &[]).await;
    site.add_mark_command("w-1");
    let agent = site.agent("w-1").await;
    site.kill_broker().await;
    let forms: [&[&str]; 2] = [&["--mode", "sealed"], &["--mode", "challenge"]];
    let sends: Vec<_> = forms
        .iter()
        .map(|form| {
            let mut args = vec!["send", "w-1", "mark", "--timeout", "30s"];
            args.extend_from_slice(form);
            site.spawn_mqseal(&args)
        })
        .collect();
    tokio::time::sleep(3 * SECOND).await;
    assert!(sends.iter().all(|s| !s.is_finished()), "a controller gave up while the broker was down");
    site.restart_broker().await;
    for (send, form) in sends.into_iter().zip(forms) {
        let out = send.await.unwrap();
        assert_eq!(out.code, 0, "{form:?}: {out:?}\nagent log:\n{}", agents_log(&site, "w-1"));
    }
    assert_eq!(site.marks("w-1"), 2, "each command ran once");
    agent.stop().await;
}

/// A command that runs longer than the controller's re-send interval: while
/// it runs, copies of its envelope reach the device — the same bytes again
/// at 2 s and 4 s, and in challenge mode copies over fresh challenges from
/// 3 s — and the device refuses each as a duplicate of a command still
/// running. It runs once, and its answer ends the wait when it finishes.
/// This is what makes re-sending while connected (for a broker that drops
/// messages) safe.
#[tokio::test]
async fn copies_of_a_command_still_running_do_not_run_it_again() {
    let site = Site::start(Store::File).await;
    let runs = |d: &str| (site.dir.join(format!("start-{d}")), site.dir.join(format!("done-{d}")));
    let devices = [("r-1", "sealed"), ("r-2", "challenge")];
    let mut agents = Vec::new();
    for (d, _) in devices {
        site.add_device(d, &[]).await;
        let (start, done) = runs(d);
        site.add_slow_command(d, "slow", 6.0, &start, &done);
        agents.push(site.agent(d).await);
    }
    let sends: Vec<_> = devices
        .iter()
        .map(|(d, mode)| site.spawn_mqseal(&["send", d, "slow", "--mode", mode, "--timeout", "40s"]))
        .collect();
    for ((send, (d, mode)), agent) in sends.into_iter().zip(devices).zip(&agents) {
        let out = send.await.unwrap();
        assert_eq!(out.code, 0, "{mode}: {out:?}\nagent log:\n{}", agent.text());
        let copies = agent.count("duplicate of a command still running");
        assert!(copies >= 2, "{mode}: the device saw {copies} copies while it ran:\n{}", agent.text());
        let (start, done) = runs(d);
        assert_eq!((lines(&start), lines(&done)), (1, 1), "{mode}: ran once");
    }
    tokio::time::sleep(3 * SECOND).await;
    for (d, _) in devices {
        assert_eq!(lines(&runs(d).0), 1, "{d}: never again");
    }
}

/// `mqseal send` to a device whose agent is down: the command waits in the
/// device's persistent session and runs, once, when the agent comes back
/// within the command's lifetime — also when the broker crashed while it
/// waited (the session and its queue come back from the broker's store).
#[tokio::test]
async fn a_command_for_an_agent_that_is_down_runs_once_when_it_comes_back() {
    let mut site = Site::start(Store::File).await;
    site.add_device("b-1", &[]).await;
    site.add_mark_command("b-1");
    // A first run leaves the agent's persistent session and subscription.
    site.agent("b-1").await.stop().await;

    let send = site.spawn_mqseal(&["send", "b-1", "mark", "--timeout", "60s"]);
    tokio::time::sleep(2 * SECOND).await;
    assert_eq!(site.marks("b-1"), 0, "no agent, no run");
    let agent = site.agent("b-1").await;
    let out = send.await.unwrap();
    assert_eq!(out.code, 0, "{out:?}\nagent log:\n{}", agents_log(&site, "b-1"));
    assert_eq!(site.marks("b-1"), 1);
    agent.stop().await;

    // Again, with a broker crash while the command waits for the agent.
    let send = site.spawn_mqseal(&["send", "b-1", "mark", "--timeout", "60s"]);
    tokio::time::sleep(2 * SECOND).await;
    site.crash_and_restart_broker(SECOND).await;
    assert!(site.broker.log().contains("persistence store loaded"), "{}", site.broker.log());
    let agent = site.agent("b-1").await;
    let out = send.await.unwrap();
    assert_eq!(out.code, 0, "{out:?}\nagent log:\n{}", agents_log(&site, "b-1"));
    assert_eq!(site.marks("b-1"), 2, "once each");
    agent.stop().await;
}

fn agents_log(site: &Site, d: &str) -> String {
    std::fs::read_to_string(site.dir.join(format!("agent-{d}.log"))).unwrap_or_default()
}

/// `kill -9` of the agent while a command runs, in each mode and form: after
/// the restart the command is not run again, and the controller that was
/// waiting gets an authenticated `failed` saying it was interrupted.
#[tokio::test]
async fn an_agent_killed_mid_command_never_runs_it_again_and_the_controller_learns_why() {
    let site = Site::start(Store::File).await;
    site.add_device("k-1", &[]).await;
    let (start, done) = (site.dir.join("start-k-1"), site.dir.join("done-k-1"));
    site.add_slow_command("k-1", "slow", 4.0, &start, &done);
    let mut agent = site.agent("k-1").await;
    let forms: [&[&str]; 3] = [&["--mode", "sealed"], &["--mode", "challenge"], &["--mode", "challenge", "--hidden"]];
    for (n, form) in forms.iter().enumerate() {
        let mut args = vec!["send", "k-1", "slow", "--timeout", "30s"];
        args.extend_from_slice(form);
        let send = site.spawn_mqseal(&args);
        wait_for_lines(&start, n + 1, "the command to start").await;
        agent.kill().await;
        agent = site.agent("k-1").await;
        let out = send.await.unwrap();
        assert_eq!(out.code, 3, "{form:?}: exit 3, the device answered `failed`: {out:?}");
        assert!(out.stderr.contains("failed"), "{form:?}: {out:?}");
        if !form.contains(&"--hidden") {
            assert!(out.stdout.contains("interrupted") && out.stdout.contains("not run again"), "{form:?}: {out:?}");
        }
        assert!(agent.text().contains("interrupted by the last stop"), "{}", agent.text());
        tokio::time::sleep(SECOND).await;
        assert_eq!(lines(&start), n + 1, "{form:?}: started once, never again");
    }
}

/// MongoDB stops while devices are connected, reconnect and connect for the
/// first time: docs/SECURITY.md's "Fails closed" — sessions already open go on, users
/// the broker has seen recently are still let in from its cache, anyone
/// else is refused (CONNACK "server unavailable") — and when MongoDB comes
/// back, the device that was refused gets in by itself.
#[tokio::test]
async fn a_mongodb_outage_fails_closed_for_new_logins_and_recovers_by_itself() {
    let data = tempfile::tempdir().unwrap();
    let mut db = Secantus::start(&data.path().join("db")).await;
    let metrics = free_port();
    let store = Store::Mongo { uri: db.uri(), database: "outage".into(), legacy: false };
    let site = Site::start_config(BrokerConfig { store, metrics_port: Some(metrics), ..BrokerConfig::default() }).await;
    for d in ["o-1", "o-2", "o-3"] {
        site.add_device(d, &[]).await;
    }
    let _a1 = site.agent("o-1").await;
    let a2 = site.agent("o-2").await;
    site.ok(&["send", "o-1", "ping"]).await;

    db.stop().await;
    // A live session keeps routing; the controller, seen a moment ago, logs in from the cache.
    let out = site.mqseal(&["send", "o-1", "ping", "--mode", "challenge"]).await;
    assert_eq!((out.code, out.stdout.trim()), (0, "pong"), "{out:?}");
    // Its audit record waits in the spool rather than being lost.
    assert!(out.stderr.contains("audit log unreachable"), "{out:?}");
    let spool = site.dir.join("ctl/audit-spool.jsonl");
    assert!(spool.exists());
    // A device that reconnects during the outage is let in from the cache.
    a2.kill().await;
    let _a2 = site.agent("o-2").await;
    assert_eq!(site.mqseal(&["send", "o-2", "ping"]).await.code, 0);
    // A device the broker has never seen is refused, and keeps trying.
    let log3 = site.dir.join("agent-o-3.log");
    let mut a3 = tokio::process::Command::new(workspace_bin("mqseal-agent"))
        .arg("--config")
        .arg(site.bundle("o-3"))
        .env("MQSEAL_LOG", "info")
        .stderr(std::fs::File::create(&log3).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let refused = |text: &str| text.lines().filter(|l| l.contains("connection:") && l.contains("retrying")).count();
    let deadline = tokio::time::Instant::now() + 20 * SECOND;
    while refused(&std::fs::read_to_string(&log3).unwrap_or_default()) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "o-3 was not refused twice");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = std::fs::read_to_string(&log3).unwrap();
    assert!(!text.contains("connected"), "a never-seen device got in during the outage:\n{text}");
    assert!(metric(metrics, "mqseal_logins_unavailable_total").await >= 2);

    db.restart().await;
    let deadline = tokio::time::Instant::now() + 60 * SECOND;
    while !std::fs::read_to_string(&log3).unwrap_or_default().contains("connected") {
        assert!(tokio::time::Instant::now() < deadline, "o-3 never got in after MongoDB came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = site.mqseal(&["send", "o-3", "echo", "back"]).await;
    assert_eq!((out.code, out.stdout.trim()), (0, "back"), "{out:?}");
    // The spooled records went to MongoDB ahead of the new one, and verify.
    assert!(!spool.exists(), "the spool was forwarded");
    let out = site.mqseal(&["audit", "verify", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["summary"]["verified"], 4, "{v}");
    let devices: Vec<&str> = v["records"].as_array().unwrap().iter().filter_map(|r| r["device"].as_str()).collect();
    assert_eq!(devices, ["o-1", "o-1", "o-2", "o-3"]);
    let _ = a3.start_kill();
}

/// The agent's state directory on a real 64 KiB filesystem: full, the agent
/// refuses to execute (an authenticated `failed` that says why, nothing
/// run); read-only, the same; with space and write access back, it works
/// again without a restart.
#[tokio::test]
async fn a_full_or_read_only_state_directory_refuses_to_execute_and_says_why() {
    let site = Site::start(Store::File).await;
    site.add_device("s-1", &[]).await;
    site.add_mark_command("s-1");
    let state: PathBuf = site.dir.join("ctl/agents/s-1-state");
    let fs = Tmpfs::mount(&state, "64k");
    let agent = site.agent("s-1").await;
    assert_eq!(site.mqseal(&["send", "s-1", "mark"]).await.code, 0);
    assert_eq!(site.marks("s-1"), 1);

    // Fill it: the next state write (before the command would run) fails.
    let filler = state.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 256 * 1024]);
    for mode in ["sealed", "challenge"] {
        let out = site.mqseal(&["send", "s-1", "mark", "--mode", mode]).await;
        assert_eq!(out.code, 3, "{mode}: {out:?}");
        assert!(out.stdout.contains("refused to execute") && out.stdout.contains("No space left"), "{out:?}");
    }
    assert_eq!(site.marks("s-1"), 1, "nothing ran while the state could not be saved");
    assert!(agent.text().contains("No space left on device"), "{}", agent.text());
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(site.mqseal(&["send", "s-1", "mark"]).await.code, 0, "space again: it works");
    assert_eq!(site.marks("s-1"), 2);

    fs.set_read_only(true);
    let out = site.mqseal(&["send", "s-1", "mark", "--mode", "challenge", "--hidden"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(agent.text().contains("Read-only file system"), "{}", agent.text());
    let out = site.mqseal(&["send", "s-1", "mark"]).await;
    assert!(out.code == 3 && out.stdout.contains("Read-only file system"), "{out:?}");
    assert_eq!(site.marks("s-1"), 2, "nothing ran on a read-only state");
    fs.set_read_only(false);
    assert_eq!(site.mqseal(&["send", "s-1", "mark"]).await.code, 0);
    assert_eq!(site.marks("s-1"), 3);
}
