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
        // A client id that would break out of a pattern that used
        // {client_id} (the export never does): still only its own topics.
        let (mut c, code) = site.connect(node, r"y-1\.)|(?=", a, &pa).await.unwrap();
        assert_eq!(code, 0);
        assert!(c.publish(&topic(b, "status"), b"online", 1, true).await.is_err(), "node {node}: regex injection");
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
    let (mut ctl, _) = site.connect(1, "y-operator-000000000000", "y-operator", "operator-password-1").await.unwrap();
    ctl.publish(&topic(b, "cmd"), b"queued for b", 1, false).await.unwrap();
    let (mut victim, code) = Conn::connect(site.cluster.mqtt_port(0), &persistent).await.unwrap();
    assert_eq!(code, 0);
    let m = victim.next_message(10 * SECOND).await.unwrap();
    assert_eq!(m.payload, b"queued for b");
    // A controller under a client id not of mqseal's form gets no session
    // queue (so it cannot resume a device's, or another controller's).
    let (mut c, _) = site.connect(1, "y-operator-x", "y-operator", "operator-password-1").await.unwrap();
    assert!(c.subscribe(&[(&topic(a, "resp"), 1)]).await.is_err(), "a controller under a foreign client id");
    // A disabled device: the next export takes its password and access.
    site.op.ok(&["user", "disable", b]).await;
    site.export();
    assert!(!matches!(site.connect(0, b, b, &pb).await, Ok((_, 0))), "a disabled device logs in no more");
    // A controller granted y-0 and y-1 only.
    let (mut ctl, code) =
        site.connect(1, "y-operator-000000000001", "y-operator", "operator-password-1").await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(ctl.subscribe(&[(&topic(a, "resp"), 1)]).await.unwrap(), [1]);
    ctl.publish(&topic(b, "cmd"), b"x", 1, false).await.unwrap();
    let (mut ctl, _) = site.connect(1, "y-operator-000000000002", "y-operator", "operator-password-1").await.unwrap();
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

/// mqseal-broker as a site broker with a `[[bridge]]` to the cluster:
/// devices on the site, the controller on the cluster. Both modes and a
/// broadcast get through, each command runs once, the bridge counts what
/// it carried, and when the cluster drops the bridge's connection it
/// reconnects and carries on. The bridge's cost is printed: the same
/// command through the cluster and straight to the site.
#[tokio::test]
async fn a_site_broker_bridged_to_the_cluster_serves_controllers_on_the_cluster() {
    use mqseal_tests::broker::BrokerConfig;
    use mqseal_tests::site::Site;
    let cluster = rabbitmq::shared();
    // The bridge's login on the cluster: the cluster's own user, allowed
    // every device topic (it carries them all).
    cluster.ctl(0, &["add_user", "site-b-bridge", "bridge-password-1"]);
    cluster.ctl(0, &["set_permissions", "site-b-bridge", ".*", ".*", ".*"]);
    let pw = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pw.path(), "bridge-password-1\n").unwrap();
    let metrics = mqseal_tests::free_port();
    let bridge = format!(
        "\n[[bridge]]\nname = \"cluster\"\n[bridge.remote]\nhost = \"127.0.0.1\"\nport = {}\nfailover = [\"127.0.0.1:{}\"]\n\
         username = \"site-b-bridge\"\npassword_file = \"{}\"\n",
        cluster.mqtt_port(1),
        cluster.mqtt_port(0),
        pw.path().display()
    );
    let site =
        Site::start_config(BrokerConfig { metrics_port: Some(metrics), extra: bridge, ..BrokerConfig::default() })
            .await;
    for d in ["b-0", "b-1"] {
        site.add_device(d, &[]).await;
        site.add_mark_command(d);
    }
    let agents = [site.agent("b-0").await, site.agent("b-1").await];
    // The operator and the devices on the cluster, from the site's own store.
    let out = site.mqseal(&["export", "rabbitmq", "--out", "rabbitmq.json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    cluster.import_definitions(&site.dir.join("rabbitmq.json"));
    let toml = std::fs::read_to_string(site.dir.join("mqseal.toml")).unwrap();
    let on_cluster =
        toml.replace(&format!("port = {}\n", site.broker.port()), &format!("port = {}\n", cluster.mqtt_port(1)));
    assert_ne!(on_cluster, toml);
    std::fs::write(site.dir.join("cluster.toml"), on_cluster).unwrap();
    let cluster_toml = site.dir.join("cluster.toml");
    let deadline = std::time::Instant::now() + 30 * SECOND;
    while mqseal_tests::metric(metrics, "mqseal_bridges_connected").await != 1 {
        let log = std::fs::read_to_string(site.dir.join("broker.log")).unwrap_or_default();
        let m = mqseal_tests::metric(metrics, "mqseal_bridges_connected").await;
        let c = mqseal_tests::metric(metrics, "mqseal_bridge_connects_total").await;
        assert!(std::time::Instant::now() < deadline, "the bridge did not connect ({m}, {c}):\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (args, runs) in [
        (vec!["send", "b-0", "mark", "--mode", "sealed"], [1, 0]),
        (vec!["send", "b-1", "mark", "--mode", "challenge"], [1, 1]),
        (vec!["send", "b-1", "mark", "--mode", "challenge", "--hidden"], [1, 2]),
        (vec!["broadcast", "--devices", "b-0,b-1", "mark"], [2, 3]),
    ] {
        let out = site.mqseal_with(&cluster_toml, &args).await;
        let log = std::fs::read_to_string(site.dir.join("broker.log")).unwrap_or_default();
        assert_eq!(out.code, 0, "{args:?} through the cluster: {out:?}\n{log}\n{}", agents[0].text());
        assert_eq!([site.marks("b-0"), site.marks("b-1")], runs, "after {args:?}");
    }
    let (up, down) = (
        mqseal_tests::metric(metrics, "mqseal_bridge_messages_up_total").await,
        mqseal_tests::metric(metrics, "mqseal_bridge_messages_down_total").await,
    );
    // Up: at least the five responses, three challenges and two statuses;
    // down: at least the five commands and three challenge requests.
    assert!(up >= 10 && down >= 8, "up {up}, down {down}");

    // The cluster drops the bridge (another connection takes its client
    // id, which any MQTT broker answers by closing the older one): it
    // comes back by itself.
    let mut thief = Connect::new(Version::V4, "mqseal-bridge-cluster", "site-b-bridge", "bridge-password-1");
    thief.clean = false;
    let (thief, code) = Conn::connect(cluster.mqtt_port(1), &thief).await.unwrap();
    assert_eq!(code, 0);
    drop(thief);
    let deadline = std::time::Instant::now() + 60 * SECOND;
    while mqseal_tests::metric(metrics, "mqseal_bridge_connects_total").await < 2 {
        assert!(std::time::Instant::now() < deadline, "the bridge did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = site.mqseal_with(&cluster_toml, &["send", "b-0", "mark"]).await;
    assert_eq!(out.code, 0, "after the bridge reconnected: {out:?}");
    assert_eq!(site.marks("b-0"), 3);

    // What the bridge costs: the same sealed command, through the cluster
    // and straight to the site (medians of 5).
    let timed = |config: std::path::PathBuf| {
        let site = &site;
        async move {
            let mut ms = Vec::new();
            for _ in 0..5 {
                let t = std::time::Instant::now();
                let out = site.mqseal_with(&config, &["send", "b-1", "mark", "--mode", "challenge"]).await;
                assert_eq!(out.code, 0, "{out:?}");
                ms.push(t.elapsed().as_millis());
            }
            ms.sort_unstable();
            ms[2]
        }
    };
    let via_cluster = timed(cluster_toml.clone()).await;
    let direct = timed(site.dir.join("mqseal.toml")).await;
    eprintln!(
        "bridge: `mqseal send` (challenge mode, whole process) median {via_cluster} ms through the cluster and the bridge, {direct} ms straight to the site broker"
    );
}
