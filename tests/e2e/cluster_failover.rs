//! Failover on the RabbitMQ cluster (its own cluster: this test stops a
//! node). Agents connect to node 0 with node 1 as their failover; the
//! controllers connect to node 1. Node 0 is killed (SIGKILL to the whole
//! node) while a burst of commands — both modes, commands that take 1.5 s
//! on the device — is in flight: the agents move to node 1, where their
//! mirrored sessions hold what was queued for them, every controller gets
//! its answer, and every command runs exactly once (counted on the
//! device's side). The failover time — kill to every agent connected
//! again, kill to the last answer — is printed for docs/SCALING.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use mqseal_tests::rabbitmq::ClusterSite;

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

#[tokio::test]
async fn agents_move_to_the_other_node_and_every_command_runs_once() {
    let site = ClusterSite::start("f", 3, true).await;
    let runs = |d: &str| (site.op.dir.join(format!("start-{d}")), site.op.dir.join(format!("done-{d}")));
    for d in &site.devices {
        let (start, done) = runs(d);
        site.op.add_slow_command(d, "work", 1.5, &start, &done);
    }
    let agents = site.agents().await;
    let connected: Vec<usize> = agents.iter().map(|a| a.count("connected")).collect();
    let forms: [&[&str]; 3] = [&["--mode", "sealed"], &["--mode", "challenge"], &["--mode", "challenge", "--hidden"]];
    let mut sends = Vec::new();
    for d in &site.devices {
        for form in forms {
            let mut args = vec!["send", d.as_str(), "work", "--timeout", "60s"];
            args.extend_from_slice(form);
            sends.push((d.clone(), form, site.op.spawn_mqseal(&args)));
        }
    }
    // Kill node 0 once every device is running a command.
    let deadline = Instant::now() + Duration::from_secs(60);
    while site.devices.iter().any(|d| lines(&runs(d).0) == 0) {
        assert!(Instant::now() < deadline, "the burst did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = Instant::now();
    let cluster = site.cluster;
    tokio::task::spawn_blocking(move || cluster.kill_node(0)).await.unwrap();
    for (a, before) in agents.iter().zip(&connected) {
        assert!(
            a.wait_for("connected", before + 1, Duration::from_secs(60)).await,
            "agent did not move:\n{}",
            a.text()
        );
    }
    let moved = killed.elapsed();
    for (d, form, send) in sends {
        let out = send.await.unwrap();
        assert_eq!(out.code, 0, "{d} {form:?}: {out:?}");
    }
    let answered = killed.elapsed();
    for d in &site.devices {
        let (start, done) = runs(d);
        assert_eq!((lines(&start), lines(&done)), (3, 3), "{d}: each of its three commands ran once");
    }
    // A controller whose first broker is the dead node moves on to the
    // next one in its list.
    let toml = std::fs::read_to_string(site.op.dir.join("mqseal.toml")).unwrap();
    let (zero, one) = (cluster.mqtt_port(0), cluster.mqtt_port(1));
    let swapped = toml.replace(
        &format!("port = {one}\nfailover = [\"127.0.0.1:{zero}\"]"),
        &format!("port = {zero}\nfailover = [\"127.0.0.1:{one}\"]"),
    );
    assert_ne!(swapped, toml, "{toml}");
    std::fs::write(site.op.dir.join("node0-first.toml"), swapped).unwrap();
    let t0 = Instant::now();
    let out = site.op.mqseal_with(&site.op.dir.join("node0-first.toml"), &["send", "f-0", "mark"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(site.op.marks("f-0"), 1);
    eprintln!("a controller whose first broker is down: answered in {} ms", t0.elapsed().as_millis());
    eprintln!(
        "failover: agents connected to node 1 {} ms after node 0 was killed; last answer {} ms after",
        moved.as_millis(),
        answered.as_millis()
    );
}
