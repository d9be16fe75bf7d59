//! mqseal on a real clustered broker: a two-node RabbitMQ cluster on
//! loopback (tests/src/rabbitmq.rs), its users and permissions written by
//! `mqseal export rabbitmq` from mqseal's own store and registry. Agents
//! connect to node 0, the controller to node 1: every command crosses the
//! cluster. The envelopes are end to end, so the broker only carries them;
//! the per-device permissions are the broker's, and are attacked here.
//!
//! One cluster serves every test of this binary (it takes seconds to
//! start); each test has its own operator and devices, named apart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use base64::Engine;
use mqseal_tests::mqtt::{Conn, Connect, Version};
use mqseal_tests::rabbitmq::{self, ClusterSite};
use mqseal_tests::topic;

const SECOND: Duration = Duration::from_secs(1);

/// The export hashes passwords the way RabbitMQ does: for a user the
/// cluster hashed itself (`rabbitmqctl add_user`), the export's function
/// with the salt taken from RabbitMQ's hash gives RabbitMQ's hash (and
/// every login of the other tests proves it again).
#[tokio::test]
async fn the_export_hashes_passwords_as_rabbitmq_does() {
    let cluster = rabbitmq::shared();
    cluster.ctl(0, &["add_user", "hash-check", "a-long-operator-password"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("defs.json");
    cluster.ctl(0, &["export_definitions", &file.display().to_string()]);
    cluster.ctl(0, &["delete_user", "hash-check"]);
    let defs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let user = defs["users"].as_array().unwrap().iter().find(|u| u["name"] == "hash-check").unwrap();
    assert_eq!(user["hashing_algorithm"], mqseal_controller::export::rabbitmq::HASHING_ALGORITHM);
    let hash = user["password_hash"].as_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD.decode(hash).unwrap();
    let salt: [u8; 4] = bytes[..4].try_into().unwrap();
    assert_eq!(mqseal_controller::export::rabbitmq::password_hash("a-long-operator-password", salt), hash);
}

/// Agents on node 0, the controller on node 1: sealed and challenge
/// commands (explicit and hidden) and a broadcast all cross the cluster,
/// and each runs exactly once.
#[tokio::test]
async fn both_envelope_modes_cross_the_cluster_and_run_once() {
    let site = ClusterSite::start("x", 3, false).await;
    let _agents = site.agents().await;
    for (args, runs) in [
        (vec!["send", "x-0", "mark", "--mode", "sealed"], [1, 0, 0]),
        (vec!["send", "x-0", "mark", "--mode", "challenge"], [2, 0, 0]),
        (vec!["send", "x-1", "mark", "--mode", "challenge", "--hidden"], [2, 1, 0]),
        (vec!["broadcast", "--all", "mark"], [3, 2, 1]),
        (vec!["broadcast", "--all", "mark", "--mode", "sealed"], [4, 3, 2]),
    ] {
        let out = site.op.mqseal(&args).await;
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
        let ran: Vec<usize> = site.devices.iter().map(|d| site.op.marks(d)).collect();
        assert_eq!(ran, runs, "after {args:?}");
    }
}

/// The cross-device attacks of attacks.rs, on the cluster's permissions:
/// a device logged in with its own credentials cannot read another's
/// commands (directly or with a wildcard), cannot publish as another
/// device, cannot publish commands at all, cannot take another's session
/// queue by taking its client id, and reaches nothing under a client id
/// not its own; a wrong password is refused, and a controller reaches
/// only the devices it was granted.
#[tokio::test]
async fn a_device_reaches_only_its_own_topics_on_the_cluster() {
    let site = ClusterSite::start("y", 2, false).await;
    let (a, b) = ("y-0", "y-1");
    let (pa, pb) = (site.password(a), site.password(b));
    for node in [0, 1] {
        // Its own: allowed.
        let (mut own, code) = site.connect(node, a, a, &pa).await.unwrap();
        assert_eq!(code, 0);
        assert_eq!(own.subscribe(&[(&topic(a, "cmd"), 1)]).await.unwrap(), [1]);
        own.publish(&topic(a, "resp"), b"x", 1, false).await.unwrap();
        // Denied: the broker closes the connection.
        let denied: [(&str, String, bool); 5] = [
            ("another device's commands", topic(b, "cmd"), false),
            ("every device's commands", "mqseal/v1/dev/+/cmd".into(), false),
            ("everything", "#".into(), false),
            ("another device's responses, as that device", topic(b, "resp"), true),
            ("a command to itself", topic(a, "cmd"), true),
        ];
        for (what, t, publish) in denied {
            let (mut c, _) = site.connect(node, a, a, &pa).await.unwrap();
            let r = if publish {
                c.publish(&t, b"forged", 1, false).await.map(|_| ())
            } else {
                c.subscribe(&[(&t, 1)]).await.map(|_| ())
            };
            assert!(r.is_err(), "node {node}: {what} ({t}) must be refused");
        }
        drop(own);
        // Under another device's client id: nothing, not even its own topics.
        if let Ok((mut c, 0)) = site.connect(node, b, a, &pa).await {
            assert!(c.subscribe(&[(&topic(a, "cmd"), 1)]).await.is_err(), "node {node}: a under b's client id");
        }
        // A wrong password.
        let refused = site.connect(node, a, a, "not-the-password").await;
        assert!(matches!(refused, Ok((_, 4 | 5)) | Err(_)), "node {node}: wrong password: {:?}", refused.map(|r| r.1));
    }
    // b's persistent session stays b's: a taking b's client id gets no
    // session queue (and b comes back to its queued commands).
    let mut persistent = Connect::new(Version::V4, b, b, &pb);
    persistent.clean = false;
    let (mut victim, _) = Conn::connect(site.cluster.mqtt_port(0), &persistent).await.unwrap();
    assert_eq!(victim.subscribe(&[(&topic(b, "cmd"), 1)]).await.unwrap(), [1]);
    let mut thief = Connect::new(Version::V4, b, a, &pa);
    thief.clean = false;
    match Conn::connect(site.cluster.mqtt_port(1), &thief).await {
        Ok((mut t, 0)) => assert!(t.closed(5 * SECOND).await.is_ok(), "the thief got b's session"),
        Ok((_, code)) => assert_ne!(code, 0),
        Err(_) => {}
    }
    // Taking the client id did cost b its connection (RabbitMQ has no way
    // to tie a client id to a user): b reconnects to its session and gets
    // what was queued for it meanwhile.
    drop(victim);
    let (mut ctl, _) = site.connect(1, "y-operator-0", "y-operator", "operator-password-1").await.unwrap();
    ctl.publish(&topic(b, "cmd"), b"queued for b", 1, false).await.unwrap();
    let (mut victim, code) = Conn::connect(site.cluster.mqtt_port(0), &persistent).await.unwrap();
    assert_eq!(code, 0);
    let m = victim.next_message(10 * SECOND).await.unwrap();
    assert_eq!(m.payload, b"queued for b");
    // A controller granted y-0 and y-1 only.
    let (mut ctl, code) = site.connect(1, "y-operator-1", "y-operator", "operator-password-1").await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(ctl.subscribe(&[(&topic(a, "resp"), 1)]).await.unwrap(), [1]);
    ctl.publish(&topic(b, "cmd"), b"x", 1, false).await.unwrap();
    let (mut ctl, _) = site.connect(1, "y-operator-2", "y-operator", "operator-password-1").await.unwrap();
    assert!(ctl.publish(&topic("x-0", "cmd"), b"x", 1, false).await.is_err(), "a device it was not granted");
}

/// A job run from node 1 reaches devices whose agents are on node 0, each
/// once, one of them started only after the job. RabbitMQ 3.10 keeps
/// retained messages per node, so the agents' retained `online` never
/// reaches a controller on the other node: the job runs
/// `--without-presence`, and the late device's challenge request waits in
/// its persistent session.
#[tokio::test]
async fn a_job_from_one_node_reaches_devices_on_the_other() {
    let site = ClusterSite::start("j", 4, false).await;
    // Once, so that its persistent session exists; then offline.
    let late = site.op.agent("j-3").await;
    late.stop().await;
    let mut agents = Vec::new();
    for d in &site.devices[..3] {
        agents.push(site.op.agent(d).await);
    }
    let args =
        ["job", "run", "mark", "--all", "--without-presence", "--rate", "600/min", "--deadline", "60s", "--json"];
    let job = site.op.spawn_mqseal(&args);
    tokio::time::sleep(3 * SECOND).await;
    agents.push(site.op.agent("j-3").await);
    let out = job.await.unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["counts"]["ok"], 4, "{doc}");
    for d in &site.devices {
        assert_eq!(site.op.marks(d), 1, "{d}");
    }
}
