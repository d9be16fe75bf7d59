//! `mqseal job` end to end: real broker (mqseal-broker: offline devices'
//! commands wait for them in their persistent sessions), real agents, the
//! CLI as an operator runs it. Executions are counted on the devices' side
//! (a command that appends to a file), never inferred from the controller.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use mqseal_tests::broker::Store;
use mqseal_tests::site::{AgentProc, Output, Site, workspace_bin};
use serde_json::Value;

fn json(out: &Output) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

/// Devices `prefix-0..n` with a `mark` command (and `refuse`, which marks
/// then fails).
async fn fleet(site: &Site, prefix: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for id in &ids {
        site.add_device(id, &[]).await;
        site.add_mark_command(id);
        let marks = site.dir.join(format!("marks-{id}"));
        site.append_to_bundle(
            id,
            &format!(
                "[commands.refuse]\nprogram = [\"/bin/sh\", \"-c\", \"echo x >> '{}'; exit 1\"]\n",
                marks.display()
            ),
        );
    }
    ids
}

async fn agents(site: &Site, ids: &[String]) -> Vec<AgentProc> {
    let mut out = Vec::new();
    for id in ids {
        out.push(site.agent(id).await);
    }
    out
}

fn sent_times(doc: &Value) -> Vec<u64> {
    let mut t: Vec<u64> =
        doc["results"].as_array().unwrap().iter().filter_map(|r| r["progress"]["sent_at"].as_u64()).collect();
    t.sort_unstable();
    t
}

/// 50 devices, 10 of them offline when the job starts and started while it
/// runs: every one ends `ok` and ran the command once; the rate is a
/// ceiling (600/min: one start per 100 ms); every attempt is in the audit
/// log as `job`.
#[tokio::test]
async fn a_job_reaches_fifty_devices_including_late_ones_each_once_at_its_rate() {
    let site = Site::start(Store::File).await;
    let ids = fleet(&site, "f", 50).await;
    let (online, late) = ids.split_at(40);
    let _early = agents(&site, online).await;
    let job = site.spawn_mqseal(&[
        "job",
        "run",
        "mark",
        "--all",
        "--rate",
        "600/min",
        "--timeout",
        "20s",
        "--deadline",
        "40s",
        "--json",
    ]);
    // The late ten come online while the job runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!job.is_finished(), "the job waits for the late devices");
    let _late = agents(&site, late).await;
    let out = job.await.unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    let doc = json(&out);
    assert_eq!(doc["state"], "ended");
    assert_eq!(doc["counts"]["ok"], 50, "{doc}");
    for id in &ids {
        assert_eq!(site.marks(id), 1, "{id} ran it once");
    }
    let t = sent_times(&doc);
    assert_eq!(t.len(), 50);
    let first_40 = t[39] - t[0];
    assert!(first_40 >= 39 * 100 * 9 / 10, "600/min honoured: 40 starts took {first_40} ms");
    // Status and the audit log agree.
    let id = doc["id"].as_str().unwrap();
    let status = json(&site.mqseal(&["job", "status", id, "--json"]).await);
    assert_eq!(status["counts"]["ok"], 50);
    let list = json(&site.mqseal(&["job", "list", "--json"]).await);
    assert_eq!(list["jobs"][0]["id"], id);
    let audit = json(&site.mqseal(&["audit", "--json"]).await);
    let jobs: Vec<&Value> =
        audit["records"].as_array().unwrap().iter().filter(|r| r["record"]["via"] == "job").collect();
    assert_eq!(jobs.len(), 50);
    let verify = site.mqseal(&["audit", "verify", "--json"]).await;
    assert_eq!((verify.code, json(&verify)["summary"]["verified"].as_u64()), (0, Some(50)), "{verify:?}");
}

/// `--abort-if-failed 50% --after 2`, one device at a time, a command that
/// fails everywhere: two devices run it, then the job stops and the other
/// four are skipped; exit 3.
#[tokio::test]
async fn the_abort_rule_stops_a_job_whose_devices_fail() {
    let site = Site::start(Store::File).await;
    let ids = fleet(&site, "a", 6).await;
    let _agents = agents(&site, &ids).await;
    let out = site
        .mqseal(&[
            "job",
            "run",
            "refuse",
            "--all",
            "--max-in-flight",
            "1",
            "--abort-if-failed",
            "50%",
            "--after",
            "2",
            "--json",
        ])
        .await;
    assert_eq!(out.code, 3, "{out:?}");
    let doc = json(&out);
    assert_eq!(doc["state"], "aborted");
    assert_eq!((doc["counts"]["failed"].as_u64(), doc["counts"]["skipped"].as_u64()), (Some(2), Some(4)), "{doc}");
    let ran: usize = ids.iter().map(|id| site.marks(id)).sum();
    assert_eq!(ran, 2, "nothing started after the rule fired");
    // Retries: a failure is tried again, with a new envelope, and counted.
    let out = site.mqseal(&["job", "run", "refuse", "--devices", "a-0", "--retries", "2", "--json"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(json(&out)["results"][0]["progress"]["attempts"], 3);
    assert_eq!(site.marks("a-0"), 1 + 3);
}

/// The controller is killed (SIGKILL) with attempts out and devices left;
/// `job resume` sends what was out again — the same envelopes — and the
/// rest: every device ends `ok`, and no device ran the command twice.
#[tokio::test]
async fn a_job_killed_mid_way_resumes_without_running_anything_twice() {
    let site = Site::start(Store::File).await;
    let ids: Vec<String> = (0..12).map(|i| format!("k-{i}")).collect();
    for id in &ids {
        site.add_device(id, &[]).await;
        let (start, done) = (site.dir.join(format!("start-{id}")), site.dir.join(format!("done-{id}")));
        site.add_slow_command(id, "slow", 1.5, &start, &done);
    }
    let _agents = agents(&site, &ids).await;
    for mode in ["challenge", "sealed"] {
        let mut run = tokio::process::Command::new(workspace_bin("mqseal"))
            .arg("--config")
            .arg(site.dir.join("mqseal.toml"))
            .args(["job", "run", "slow", "--all", "--max-in-flight", "4", "--mode", mode, "--timeout", "20s"])
            .current_dir(&site.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let started = |ids: &[String]| {
            ids.iter()
                .map(|id| {
                    std::fs::read_to_string(site.dir.join(format!("start-{id}"))).unwrap_or_default().lines().count()
                })
                .sum::<usize>()
        };
        let base = started(&ids);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while started(&ids) < base + 6 {
            assert!(tokio::time::Instant::now() < deadline, "{mode}: the job did not get going");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        run.kill().await.unwrap();
        let list = json(&site.mqseal(&["job", "list", "--json"]).await);
        let job = list["jobs"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(job["state"], "running", "{mode}: killed mid-way: {job}");
        let id = job["id"].as_str().unwrap();
        let out = site.spawn_mqseal(&["job", "resume", id, "--json"]).await.unwrap();
        assert_eq!(out.code, 0, "{mode}: {out:?}");
        assert_eq!(json(&out)["counts"]["ok"], 12, "{mode}: {out:?}");
        for (n, id) in ids.iter().enumerate() {
            let runs = std::fs::read_to_string(site.dir.join(format!("start-{id}"))).unwrap().lines().count();
            let expected = if mode == "challenge" { 1 } else { 2 };
            assert_eq!(runs, expected, "{mode}: device {n} ran it once per job");
        }
        // Resuming an ended job sends nothing and says how it ended.
        let again = site.mqseal(&["job", "resume", id, "--json"]).await;
        assert_eq!((again.code, json(&again)["counts"]["ok"].as_u64()), (0, Some(12)));
    }
}

/// An audit log that cannot be written (here: a folder where the file
/// should be) stops the job before it says any device answered; once the
/// log is writable again, `job resume` asks the answered devices again
/// with the same envelopes, records every answer, and no device ran the
/// command twice.
#[tokio::test]
async fn an_audit_log_that_cannot_be_written_stops_the_job_and_resume_records_every_answer() {
    let site = Site::start(Store::File).await;
    let ids = fleet(&site, "w", 6).await;
    let _agents = agents(&site, &ids).await;
    let log = site.dir.join("ctl/audit.jsonl");
    std::fs::create_dir_all(&log).unwrap();
    let out = site.mqseal(&["job", "run", "mark", "--all", "--json"]).await;
    assert_eq!(out.code, 1, "a local failure: {out:?}");
    let error = json(&out)["error"].as_str().unwrap().to_owned();
    assert!(error.contains("audit log") && error.contains("Is a directory") && error.contains("job resume"), "{out:?}");
    assert!(out.stderr.contains("audit records were not written"), "{out:?}");
    let ran: usize = ids.iter().map(|id| site.marks(id)).sum();
    assert!(ran >= 1, "devices had answered before the log was first written");
    std::fs::remove_dir(&log).unwrap();
    let list = json(&site.mqseal(&["job", "list", "--json"]).await);
    let job = list["jobs"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(job["state"], "running", "{job}");
    let out = site.mqseal(&["job", "resume", job["id"].as_str().unwrap(), "--json"]).await;
    assert_eq!((out.code, json(&out)["counts"]["ok"].as_u64()), (0, Some(6)), "{out:?}");
    for id in &ids {
        assert_eq!(site.marks(id), 1, "{id} ran it once");
    }
    let records: Vec<Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for id in &ids {
        let ok = records.iter().filter(|r| r["device"] == id.as_str() && r["outcome"] == "ok").count();
        assert_eq!(ok, 1, "{id}: one record of its answer: {records:#?}");
    }
}
