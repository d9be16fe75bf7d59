//! Interoperability: mqseal among the MQTT tools its users already run.
//!
//! * Third-party clients — mosquitto_pub/sub on MQTT 3.1.1 and 5, Python
//!   paho-mqtt 2.x — against `mqseal-broker`, with the credentials `mqseal`
//!   provisions, over TCP and TLS: retained status, the last will, refusals.
//! * `mqseal-agent` and `mqseal` through Debian's Mosquitto (password file,
//!   ACL file equivalent to mqseal's default rules), and through a standard
//!   MQTT bridge from a second broker into the site broker: the agent and
//!   the controller do not depend on mqseal's broker.
//! * A second implementation of the protocol in Python
//!   (`tests/interop/python/`), written from docs/PROTOCOL.md alone: every
//!   test vector, and live commands to the Rust agent.
//! * MongoDB documents an EMQX cluster can verify (hashes recomputed with
//!   Python's hashlib as EMQX documents them).
//! * The Prometheus endpoint, read with Prometheus' own Python parser.
//! * The CLI's `--json` and exit codes as a script sees them, and `examples/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use mqseal_tests::broker::{BrokerConfig, Store, unique_database};
use mqseal_tests::site::{AgentProc, Output, Site, mqseal_in, start_agent, workspace_bin};
use mqseal_tests::{Mosquitto, exec, free_port, mongodb_uri, python_script, require_program, spawn_until, topic};
use serde_json::Value;
use tokio::process::Command;

const T: Duration = Duration::from_secs(60);

fn json(out: &Output) -> Value {
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("not one JSON document ({e}): {out:?}"))
}

/// The JSON lines a Python tool printed.
fn events(out: &Output) -> Vec<Value> {
    out.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{out:?}"))).collect()
}

/// The payloads of the `message` events, in order.
fn payloads(out: &Output) -> Vec<String> {
    events(out).iter().filter(|e| e["event"] == "message").map(|e| e["payload"].as_str().unwrap().to_owned()).collect()
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_owned()
}

/// A device's broker password, as `mqseal device add` put it in its bundle.
fn bundle_password(bundle: &Path) -> String {
    let config = mqseal_agent::config::AgentConfig::load(bundle).unwrap();
    config.broker.password(bundle.parent().unwrap()).unwrap().as_str().to_owned()
}

async fn tool(program: &str, args: &[&str]) -> Output {
    exec(Command::new(require_program(program)).args(args), Duration::from_secs(30)).await
}

/// mosquitto_pub on MQTT 5 at QoS 1 as `(user, client id, password)`: a
/// refusal shows as "Not authorized" (PUBACK 0x87) on stderr, exit code 0.
async fn publish_v5(port: &str, (user, client_id, pw): (&str, &str, &str), t: &str, payload: &str) -> Output {
    tool(
        "mosquitto_pub",
        &["-p", port, "-V", "mqttv5", "-i", client_id, "-u", user, "-P", pw, "-q", "1", "-t", t, "-m", payload],
    )
    .await
}

async fn paho(args: &[&str]) -> Output {
    exec(python_script("paho_client.py").args(args), Duration::from_secs(30)).await
}

/// mosquitto_sub's arguments for one retained message on `t`.
fn sub_one<'a>(port: &'a str, user: &'a str, pw: &'a str, version: &'a str, t: &'a str) -> Vec<&'a str> {
    vec!["-h", "127.0.0.1", "-p", port, "-u", user, "-P", pw, "-V", version, "-t", t, "-C", "1", "-W", "5"]
}

#[tokio::test]
async fn a_python_implementation_written_from_protocol_md_checks_every_vector() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/tests/vectors");
    let out = exec(python_script("check_vectors.py").arg(&dir), T).await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let count = |file: &str| {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        v["vectors"].as_array().unwrap().len()
    };
    let summary = format!(
        "{} challenge, {} sealed, {} negative vectors passed; 0 failed",
        count("challenge.json"),
        count("sealed.json"),
        count("negative.json")
    );
    assert!(out.stdout.contains(&summary), "expected {summary:?} in:\n{}", out.stdout);
}

/// The Python controller (its own MQTT client, its own crypto) commands the
/// Rust agent through mqseal-broker in sealed mode and in both challenge
/// forms, and verifies every answer; the agent executes each command once
/// even when the Python side publishes the same bytes again.
#[tokio::test]
async fn a_python_controller_commands_the_rust_agent_in_both_modes() {
    let site = Site::start(Store::File).await;
    site.add_device("py-1", &[]).await;
    site.add_mark_command("py-1");
    let agent = site.agent("py-1").await;
    // What a controller must know of the device: its public key and HMAC
    // key, from the registry `mqseal device add` keeps.
    let registry: Value =
        serde_json::from_str(&std::fs::read_to_string(site.dir.join("ctl/devices.json")).unwrap()).unwrap();
    let public = write(&site.dir.join("py-1.pub.pem"), registry["py-1"]["public_key"].as_str().unwrap());
    let hmac = write(&site.dir.join("py-1.hmac"), registry["py-1"]["hmac_key"].as_str().unwrap());
    let port = site.broker.port().to_string();
    let key = site.dir.join("controller.key.pem");
    let pw = site.dir.join("operator.pw");
    let send = |extra: Vec<&'static str>| {
        let mut cmd = python_script("controller.py");
        cmd.args(["--port", &port, "--username", "operator", "--device", "py-1"])
            .arg("--password-file")
            .arg(&pw)
            .arg("--key")
            .arg(&key)
            .arg("--device-public-key")
            .arg(&public)
            .arg("--hmac-key-file")
            .arg(&hmac)
            .args(extra);
        async move { exec(&mut cmd, T).await }
    };

    let out = send(vec!["--mode", "sealed", "echo", "hello from python"]).await;
    assert_eq!(out.code, 0, "{out:?}\n{}", agent.text());
    let v = json(&out);
    assert_eq!((v["status"].as_str(), v["output"].as_str()), (Some("ok"), Some("hello from python")), "{v}");

    let out = send(vec!["--mode", "challenge", "echo", "explicit"]).await;
    let v = json(&out);
    assert_eq!((out.code, v["status"].as_str(), v["output"].as_str()), (0, Some("ok"), Some("explicit")), "{v}");

    // A genuine command the device cannot run gets an authenticated refusal.
    let out = send(vec!["--mode", "challenge", "echo", "one", "two"]).await;
    assert_eq!(json(&out)["status"], "bad_arguments", "{out:?}");

    // Exactly once, seen from outside: the same bytes published again run
    // nothing, and the agent's re-sent receipt is refused by the controller
    // (nothing is pending any more).
    for mode in [vec!["--mode", "sealed"], vec!["--mode", "challenge", "--hidden"]] {
        let before = site.marks("py-1");
        let mut args = mode.clone();
        args.extend(["--replay", "mark"]);
        let out = send(args).await;
        let v = json(&out);
        assert_eq!((out.code, v["status"].as_str()), (0, Some("ok")), "{mode:?}: {v}");
        assert_eq!(v["replay"], "unexpected_reply", "{mode:?}: {v}");
        assert_eq!(site.marks("py-1"), before + 1, "{mode:?} ran exactly once");
    }
    assert!(agent.count("duplicate") >= 2, "the agent saw both duplicates:\n{}", agent.text());
}

/// mosquitto_pub/sub and paho with the credentials `mqseal` made, on MQTT
/// 3.1.1 and 5, plain and TLS: controllers read the agent's retained status
/// and its last will; the ACL refuses what README's "Who may do what" says.
#[tokio::test]
async fn third_party_clients_use_mqseal_credentials_over_tcp_and_tls() {
    let (site, tls_port, ca) = Site::start_tls().await;
    site.add_device("d-1", &[]).await;
    let other = site.add_device("d-2", &[]).await;
    let agent = site.agent("d-1").await;
    let (plain, tls) = (site.broker.port().to_string(), tls_port.to_string());
    let ca_s = ca.display().to_string();
    let op_pw = "operator-password-1";
    let status = topic("d-1", "status");

    // mosquitto_sub as the controller: 3.1.1 on TCP, 5 on TLS.
    let out = tool("mosquitto_sub", &sub_one(&plain, "operator", op_pw, "mqttv311", &status)).await;
    assert_eq!((out.code, out.stdout.trim()), (0, "online"), "{out:?}");
    let mut args = sub_one(&tls, "operator", op_pw, "mqttv5", &status);
    args.extend(["--cafile", &ca_s]);
    let out = tool("mosquitto_sub", &args).await;
    assert_eq!((out.code, out.stdout.trim()), (0, "online"), "{out:?}");

    // paho as the controller on TLS (3.1.1) waits for the status to change;
    // the agent dies without a goodbye and the broker publishes its will.
    let pw_file = site.dir.join("operator.pw");
    let pw_s = pw_file.display().to_string();
    let mut watch = python_script("paho_client.py");
    watch.args(["--port", &tls, "--username", "operator", "--password-file", &pw_s, "--version", "3"]).args([
        "--tls-ca",
        &ca_s,
        "--sub",
        &status,
        "--count",
        "2",
        "--timeout",
        "20",
    ]);
    let watcher = spawn_until(&mut watch, "ready", T).await;
    agent.kill().await;
    let out = watcher.finish(T).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(payloads(&out), ["online", "offline"], "retained status, then the will: {out:?}");
    assert_eq!(events(&out)[1]["reasons"], serde_json::json!([1]), "SUBACK granted QoS 1: {out:?}");
    // The will was retained: a newcomer (paho, MQTT 5, TCP) sees `offline`.
    let out =
        paho(&["--port", &plain, "--username", "operator", "--password-file", &pw_s, "--sub", &status, "--count", "1"])
            .await;
    assert_eq!(payloads(&out), ["offline"], "{out:?}");

    // A device with its own credential (from its bundle): its own status is
    // fine; someone else's command topic, everything and $SYS are refused.
    let d2_pw = bundle_password(&other);
    let d2_pw_file = write(&site.dir.join("d-2.pw"), &d2_pw);
    let d2_pw_s = d2_pw_file.display().to_string();
    let out = paho(&[
        "--port",
        &plain,
        "--username",
        "d-2",
        "--client-id",
        "d-2",
        "--password-file",
        &d2_pw_s,
        "--retain",
        "--pub",
        &format!("{}=online", topic("d-2", "status")),
        "--pub",
        &format!("{}=forged", topic("d-1", "cmd")),
        "--sub",
        &topic("d-1", "cmd"),
        "#",
        "$SYS/#",
        &topic("d-2", "cmd"),
    ])
    .await;
    let ev = events(&out);
    let pubacks: Vec<_> = ev.iter().filter(|e| e["event"] == "puback").map(|e| e["reason"].clone()).collect();
    assert_eq!(pubacks, [0, 135], "own status accepted, another device's cmd refused (0x87): {out:?}");
    let suback = ev.iter().find(|e| e["event"] == "suback").unwrap();
    assert_eq!(suback["reasons"], serde_json::json!([135, 135, 143, 1]), "{out:?}");
    // The same over 3.1.1 with mosquitto_sub: a refusal is SUBACK 0x80,
    // which mosquitto_sub reports, then stops (with exit code 0).
    let out = tool(
        "mosquitto_sub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &plain,
            "-V",
            "mqttv311",
            "-i",
            "d-2",
            "-u",
            "d-2",
            "-P",
            &d2_pw,
            "-t",
            "#",
            "-W",
            "5",
        ],
    )
    .await;
    assert!(out.stderr.contains("All subscription requests were denied"), "{out:?}");
    // A device may not take another's client id; wrong passwords get their CONNACK codes.
    let out = tool(
        "mosquitto_pub",
        &["-p", &plain, "-V", "mqttv5", "-i", "d-1", "-u", "d-2", "-P", &d2_pw, "-t", "x", "-m", "y"],
    )
    .await;
    assert_eq!(out.code, 0x85, "client identifier not valid: {out:?}");
    let out = tool(
        "mosquitto_pub",
        &["-p", &plain, "-V", "mqttv311", "-i", "d-2", "-u", "d-2", "-P", "wrong", "-t", "x", "-m", "y"],
    )
    .await;
    assert_eq!(out.code, 4, "3.1.1 bad user name or password: {out:?}");

    // A controller granted only d-2 is refused d-1 (user made by the CLI).
    write(&site.dir.join("viewer.pw"), "viewer-password-1\n");
    site.ok(&["user", "add", "viewer", "--grant", "d-2", "--password-file", "viewer.pw"]).await;
    let d2_status = topic("d-2", "status");
    let out = tool(
        "mosquitto_sub",
        &[
            "-p",
            &plain,
            "-V",
            "mqttv5",
            "-u",
            "viewer",
            "-P",
            "viewer-password-1",
            "-v",
            "-t",
            &status,
            "-t",
            &d2_status,
            "-C",
            "2",
            "-W",
            "3",
        ],
    )
    .await;
    // Both statuses are retained (d-1 `offline`, d-2 `online`); only the
    // granted one arrives, then mosquitto_sub times out waiting (27).
    assert_eq!((out.code, out.stdout.trim()), (27, format!("{d2_status} online").as_str()), "{out:?}");
}

/// `mqseal` with Debian's Mosquitto as the broker: Mosquitto's own password
/// file (hashed by `mosquitto_passwd`) and an ACL file saying what mqseal's
/// default rules say, a controller `operator` granted `devices` (and
/// Mosquitto's `$SYS` counters), the devices' bundles made by `mqseal
/// device add`. `mqseal`'s own store only records what it made.
struct OnMosquitto {
    dir: tempfile::TempDir,
    mosq: Mosquitto,
    config: PathBuf,
}

impl OnMosquitto {
    /// `extra` is appended to Mosquitto's config.
    async fn start(devices: &[&str], extra: &str) -> OnMosquitto {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let passwd = d.join("passwd");
        let acl = d.join("acl");
        write(&passwd, "");
        write(&acl, &format!("{}topic read $SYS/#\n", mosquitto_acl("operator", devices)));
        let mosq = Mosquitto::start(&format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}\n{extra}",
            passwd.display(),
            acl.display()
        ))
        .await;
        write(&d.join("operator.pw"), "operator-password-1\n");
        let config = write(
            &d.join("mqseal.toml"),
            &format!(
                "data_dir = \"ctl\"\nkey = \"controller.key.pem\"\npbkdf2_iterations = 1000\n\n\
                 [broker]\nhost = \"127.0.0.1\"\nport = {}\nusername = \"operator\"\npassword_file = \"operator.pw\"\n\n\
                 [store]\nkind = \"file\"\npath = \"{}\"\n",
                mosq.port(),
                d.join("records.json").display()
            ),
        );
        let site = OnMosquitto { dir, mosq, config };
        assert_eq!(site.mqseal(&["keygen", "--bits", "2048"]).await.code, 0);
        for id in devices {
            let out = site.mqseal(&["device", "add", id, "--bits", "2048"]).await;
            assert_eq!(out.code, 0, "{out:?}");
        }
        // Mosquitto's own tool hashes the passwords into its own file.
        let mosquitto_passwd = require_program("mosquitto_passwd").display().to_string();
        let passwd_s = passwd.display().to_string();
        let mut users = vec![("operator".to_owned(), "operator-password-1".to_owned())];
        users.extend(devices.iter().map(|id| ((*id).to_owned(), bundle_password(&site.bundle(id)))));
        for (user, pw) in users {
            let out = tool(&mosquitto_passwd, &["-b", &passwd_s, &user, &pw]).await;
            assert_eq!(out.code, 0, "{out:?}");
        }
        // Mosquitto reads its password file at start and on SIGHUP.
        site.mosq.reload().await;
        site
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.path().join("ctl/agents").join(format!("{id}.toml"))
    }

    async fn mqseal(&self, args: &[&str]) -> Output {
        mqseal_in(self.path(), &self.config, args).await
    }

    /// `mqseal ARGS` in the background.
    fn spawn_mqseal(&self, args: &[&str]) -> tokio::task::JoinHandle<Output> {
        let (dir, config) = (self.path().to_owned(), self.config.clone());
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            mqseal_in(&dir, &config, &args).await
        })
    }

    async fn agent(&self, id: &str) -> AgentProc {
        start_agent(&self.bundle(id), &self.path().join(format!("agent-{id}.log"))).await
    }

    /// Mosquitto's `$SYS` counter `name` as the operator reads it (it is
    /// published every `sys_interval`).
    async fn sys_counter(&self, name: &str) -> u64 {
        let port = self.mosq.port().to_string();
        let t = format!("$SYS/broker/{name}");
        let out = tool(
            "mosquitto_sub",
            &["-p", &port, "-u", "operator", "-P", "operator-password-1", "-t", &t, "-C", "1", "-W", "10"],
        )
        .await;
        assert_eq!(out.code, 0, "{t}: {out:?}");
        out.stdout.trim().parse().unwrap_or_else(|e| panic!("{t}: {e}: {out:?}"))
    }
}

/// The mqseal CLI and agent need nothing of mqseal's broker: through
/// Debian's Mosquitto, with Mosquitto's own password file and an ACL file
/// that says what mqseal's default rules say, both envelope modes work end
/// to end, and Mosquitto's ACL keeps a device out of another's topics.
#[tokio::test]
async fn agent_and_cli_work_through_mosquitto() {
    let site = OnMosquitto::start(&["m-1", "m-2"], "").await;
    let (d, mosq) = (site.path(), &site.mosq);
    let bundle = |id: &str| site.bundle(id);
    let mqseal = |args: Vec<&'static str>| {
        let site = &site;
        async move { site.mqseal(&args).await }
    };

    let mut agent = start_agent(&bundle("m-1"), &d.join("agent-m-1.log")).await;
    let out = mqseal(vec!["send", "m-1", "echo", "via mosquitto"]).await;
    assert_eq!((out.code, out.stdout.trim()), (0, "via mosquitto"), "sealed: {out:?}\n{}", agent.text());
    let out = mqseal(vec!["send", "m-1", "echo", "challenge via mosquitto", "--mode", "challenge"]).await;
    assert_eq!((out.code, out.stdout.trim()), (0, "challenge via mosquitto"), "explicit: {out:?}");
    let out = mqseal(vec!["send", "m-1", "ping", "--mode", "challenge", "--hidden", "--json"]).await;
    assert_eq!((out.code, json(&out)["status"].as_str()), (0, Some("ok")), "hidden: {out:?}");
    let out = mqseal(vec!["device", "list", "--json"]).await;
    let v = json(&out);
    assert_eq!(v["devices"][0]["status"], "online", "retained status through Mosquitto: {v}");
    assert_eq!(v["devices"][1]["status"], "unknown", "{v}");

    // m-2's credential cannot reach m-1: Mosquitto grants the subscription
    // but delivers nothing, and drops the publish. The spy (paho, as m-2)
    // also listens on its own command topic, where a probe sent last must
    // arrive: it was listening all along.
    let m2_pw = write(&d.join("m-2.pw"), &bundle_password(&bundle("m-2")));
    let m2 = bundle_password(&bundle("m-2"));
    let port = mosq.port().to_string();
    let mut spy = python_script("paho_client.py");
    spy.args(["--port", &port, "--username", "m-2", "--client-id", "m-2", "--password-file"]).arg(&m2_pw).args([
        "--sub",
        &topic("m-1", "cmd"),
        &topic("m-2", "cmd"),
        "--count",
        "1",
        "--timeout",
        "30",
    ]);
    let spy = spawn_until(&mut spy, "ready", T).await;
    let executed = agent.count("executing verified command");
    let out = publish_v5(&port, ("m-2", "m-2-x", &m2), &topic("m-1", "cmd"), "forged").await;
    assert!(out.stderr.contains("Not authorized"), "v5 PUBACK says so: {out:?}");
    let out = mqseal(vec!["send", "m-1", "noop", "--mode", "challenge"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = operator_publish(&port, &topic("m-2", "cmd"), "probe").await;
    assert_eq!(out.code, 0, "{out:?}");
    let spied = spy.finish(T).await;
    assert_eq!(payloads(&spied), ["probe"], "m-2 received only its own: {spied:?}");
    assert_eq!(agent.count("executing verified command"), executed + 1, "only the genuine command ran");
    assert!(!agent.text().contains("forged"), "the forged publish never reached m-1");
    assert!(agent.is_running());
}

/// A broker that drops a command and says nothing of it: Mosquitto holds
/// at most `max_queued_messages` for a client that is offline and drops
/// the rest (counting them in `$SYS/broker/publish/messages/dropped`),
/// while the sender's PUBACK only says the broker has the message. Here the
/// device's queue is already full when the sealed command comes, so the
/// command is dropped; once the device is back, the controller's re-send
/// (the same envelope, 2 s, 4 s, 8 s … after) is what reaches it, and it
/// runs once. Without re-sends the controller timed out (exit 4).
#[tokio::test]
async fn a_command_mosquitto_dropped_gets_through_on_a_re_send() {
    let site = OnMosquitto::start(&["q-1"], "max_inflight_messages 1\nmax_queued_messages 1\nsys_interval 1\n").await;
    let marks = site.path().join("marks-q-1");
    let bundle = site.bundle("q-1");
    let mut text = std::fs::read_to_string(&bundle).unwrap();
    text.push_str(&format!(
        "\n[commands.mark]\nprogram = [\"/bin/sh\", \"-c\", \"echo x >> '{}'\"]\n",
        marks.display()
    ));
    write(&bundle, &text);
    // A first run leaves the agent's persistent session (and its queue) at
    // Mosquitto.
    site.agent("q-1").await.stop().await;
    let dropped_before = site.sys_counter("publish/messages/dropped").await;
    let port = site.mosq.port().to_string();
    for i in 0..4 {
        let out = operator_publish(&port, &topic("q-1", "cmd"), &format!("filler {i}")).await;
        assert_eq!(out.code, 0, "{out:?}");
    }
    let send = site.spawn_mqseal(&["send", "q-1", "mark", "--mode", "sealed", "--timeout", "60s"]);
    // The command, and its first re-send, meet the full queue.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut dropped = site.sys_counter("publish/messages/dropped").await;
    while dropped < dropped_before + 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        dropped = site.sys_counter("publish/messages/dropped").await;
    }
    assert!(dropped >= dropped_before + 4, "Mosquitto dropped {} messages", dropped - dropped_before);
    assert!(!send.is_finished());
    let agent = site.agent("q-1").await;
    let out = send.await.unwrap();
    assert_eq!(out.code, 0, "{out:?}\nagent log:\n{}", agent.text());
    assert_eq!(std::fs::read_to_string(&marks).unwrap().lines().count(), 1, "ran once");
    assert!(agent.count("rejected:") >= 1, "the queued fillers reached the agent first:\n{}", agent.text());
    assert_eq!(agent.count("executing verified command"), 1, "{}", agent.text());
    agent.stop().await;
}

/// `mosquitto_pub` as the operator, QoS 1: raw bytes on a topic the
/// operator's credential may write.
async fn operator_publish(port: &str, topic: &str, message: &str) -> Output {
    let args = ["-p", port, "-u", "operator", "-P", "operator-password-1", "-q", "1", "-t", topic, "-m", message];
    tool("mosquitto_pub", &args).await
}

/// What mqseal's default rules (broker/src/acl.rs) say, in Mosquitto's
/// acl_file syntax: a device (user name = device id) subscribes to its own
/// `cmd` and `chal/req` and publishes to its own `resp`, `chal` and
/// `status`; a controller does the mirror image for the devices it is granted.
fn mosquitto_acl(controller: &str, grants: &[&str]) -> String {
    let mut acl = String::from(
        "# mqseal's default rules for Mosquitto (%u is the user name, which for a device is its id)\n\
         pattern read mqseal/v1/dev/%u/cmd\npattern read mqseal/v1/dev/%u/chal/req\n\
         pattern write mqseal/v1/dev/%u/resp\npattern write mqseal/v1/dev/%u/chal\n\
         pattern write mqseal/v1/dev/%u/status\n\n",
    );
    acl.push_str(&format!("user {controller}\n"));
    for g in grants {
        for (access, channel) in
            [("write", "cmd"), ("write", "chal/req"), ("read", "resp"), ("read", "chal"), ("read", "status")]
        {
            acl.push_str(&format!("topic {access} {}\n", topic(g, channel)));
        }
    }
    acl
}

/// Scale-out topology: devices on a site's mqseal-broker, controllers on a
/// central broker (Mosquitto standing in for an EMQX cluster) that bridges
/// into the site with a controller credential granted `*`. Commands go out
/// over the bridge, answers and statuses come back; the envelopes are
/// end-to-end, so neither broker nor the bridge can alter them.
#[tokio::test]
async fn a_central_broker_bridged_into_the_site_reaches_its_devices() {
    let site = Site::start(Store::File).await;
    site.add_device("b-1", &[]).await;
    let agent = site.agent("b-1").await;
    write(&site.dir.join("bridge.pw"), "bridge-password-1\n");
    site.ok(&["user", "add", "bridge", "--grant", "*", "--password-file", "bridge.pw"]).await;

    let central_dir = tempfile::tempdir().unwrap();
    let passwd = central_dir.path().join("passwd");
    let acl = write(&central_dir.path().join("acl"), &mosquitto_acl("operator", &["b-1"]));
    write(&passwd, "");
    let out = tool("mosquitto_passwd", &["-b", passwd.to_str().unwrap(), "operator", "operator-password-1"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    // Mosquitto's bridge: `out` carries the controller → device channels
    // into the site, `in` the device → controller ones back. Notifications
    // are off: they would publish to $SYS on the site, which its ACL refuses.
    let central = Mosquitto::start(&format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}\n\n\
         connection site-1\naddress 127.0.0.1:{}\nremote_username bridge\nremote_password bridge-password-1\n\
         remote_clientid bridge-site-1\ntry_private false\nbridge_protocol_version mqttv311\nnotifications false\n\
         cleansession true\nrestart_timeout 1\n\
         topic mqseal/v1/dev/+/cmd out 1\ntopic mqseal/v1/dev/+/chal/req out 1\n\
         topic mqseal/v1/dev/+/resp in 1\ntopic mqseal/v1/dev/+/chal in 1\ntopic mqseal/v1/dev/+/status in 1\n",
        passwd.display(),
        acl.display(),
        site.broker.port()
    ))
    .await;
    let broker = format!("127.0.0.1:{}", central.port());
    let via = |args: &[&str]| {
        let mut all = vec!["--broker", broker.as_str()];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    // The bridge logs in to the site as `bridge` (a controller) and
    // subscribes; wait until a command gets through.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let args = via(&["send", "b-1", "echo", "over the bridge", "--timeout", "2s"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = site.mqseal(&args).await;
        if out.code == 0 {
            assert_eq!(out.stdout.trim(), "over the bridge");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing crossed the bridge: {out:?}\n{}", agent.text());
    }
    for args in [
        via(&["send", "b-1", "echo", "challenge over the bridge", "--mode", "challenge"]),
        via(&["send", "b-1", "ping", "--mode", "challenge", "--hidden"]),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = site.mqseal(&args).await;
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
    }
    let args = via(&["device", "list", "--json"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = json(&site.mqseal(&args).await);
    assert_eq!(v["devices"][0]["status"], "online", "the retained status crossed the bridge: {v}");
}

/// The MongoDB collection mqseal writes is one an EMQX cluster can log the
/// same users in from: every hash recomputes with Python's hashlib exactly
/// as EMQX's MongoDB authenticator documents it (sha256 with the salt as a
/// suffix for devices, PBKDF2-HMAC-SHA256 for people), `is_superuser` says
/// who is an admin, and a wrong password matches nothing.
#[tokio::test]
async fn mongodb_documents_verify_the_way_emqx_documents_them() {
    let database = unique_database("interop_emqx");
    let site = Site::start(Store::Mongo { uri: mongodb_uri(), database: database.clone(), legacy: false }).await;
    let bundle = site.add_device("e-1", &[]).await;
    let dev_pw = write(&site.dir.join("e-1.pw"), &bundle_password(&bundle));
    let admin_pw = write(&site.dir.join("admin.pw"), &site.admin_password);
    write(&site.dir.join("root.pw"), "root-password-1\n");
    site.ok(&["user", "add", "root", "--role", "admin", "--password-file", "root.pw"]).await;
    let arg = |user: &str, file: &Path| format!("{user}={}", file.display());
    let out = exec(
        python_script("emqx_hashes.py")
            .args(["--uri", &mongodb_uri(), "--database", &database, "--pbkdf2-iterations", "1000", "--password"])
            .arg(arg("operator", &site.dir.join("operator.pw")))
            .arg(arg("root", &site.dir.join("root.pw")))
            .arg(arg("admin", &admin_pw))
            .arg(arg("e-1", &dev_pw)),
        T,
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let v = json(&out);
    for (user, algorithm, superuser) in [
        ("operator", "pbkdf2 sha256", false),
        ("root", "pbkdf2 sha256", true),
        ("admin", "pbkdf2 sha256", true),
        ("e-1", "sha256 suffix", false),
    ] {
        assert_eq!(v[user]["emqx_algorithm"], algorithm, "{user}: {v}");
        assert_eq!(v[user]["is_superuser"], superuser, "{user}: {v}");
        assert_eq!(v[user]["hash_is_lowercase_hex"], true, "{user}: {v}");
    }
}

/// `mqseal export emqx` writes an EMQX 5 configuration whose keys are
/// EMQX's own and which, used as EMQX uses it (Python, pymongo, hashlib:
/// emqx_config_check.py), logs each user in through the right
/// authenticator from mqseal's collection, refuses wrong passwords,
/// disabled devices and a device under another client id, and keeps each
/// device to its own topics with the ACL documents it wrote; a second
/// export replaces those documents rather than adding to them.
#[tokio::test]
async fn the_emqx_export_logs_in_and_authorizes_as_emqx_would() {
    let database = unique_database("interop_emqx_export");
    let site = Site::start(Store::Mongo { uri: mongodb_uri(), database: database.clone(), legacy: false }).await;
    let mut pw = std::collections::HashMap::new();
    for d in ["x-1", "x-2", "x-3"] {
        let bundle = site.add_device(d, &[]).await;
        pw.insert(d, write(&site.dir.join(format!("{d}.pw")), &bundle_password(&bundle)));
    }
    site.ok(&["user", "disable", "x-3"]).await;
    write(&site.dir.join("narrow.pw"), "narrow-password-1\n");
    site.ok(&["user", "add", "narrow", "--grant", "x-1", "--password-file", "narrow.pw"]).await;
    write(&site.dir.join("root.pw"), "root-password-1\n");
    site.ok(&["user", "add", "root", "--role", "admin", "--password-file", "root.pw"]).await;
    for round in 0..2 {
        let out = site.mqseal(&["export", "emqx", "--out", "emqx.conf", "--json"]).await;
        assert_eq!(out.code, 0, "{out:?}");
        let summary = json(&out);
        // x-1, x-2: two documents each; operator and narrow: two each.
        assert_eq!(summary["acl_documents"], 8, "{summary}");
        assert_eq!(summary["replaced"], if round == 0 { 0 } else { 8 }, "{summary}");
    }
    let login = |who: &str, file: &Path| format!("{who}={}", file.display());
    let checks = [
        ("x-1:subscribe:mqseal/v1/dev/x-1/cmd", "allow"),
        ("x-1:subscribe:mqseal/v1/dev/x-1/chal/req", "allow"),
        ("x-1:publish:mqseal/v1/dev/x-1/resp", "allow"),
        ("x-1:publish:mqseal/v1/dev/x-1/status", "allow"),
        ("x-1:subscribe:mqseal/v1/dev/x-2/cmd", "deny"),
        ("x-1:subscribe:mqseal/v1/dev/+/cmd", "deny"),
        ("x-1:publish:mqseal/v1/dev/x-1/cmd", "deny"),
        ("x-1:publish:mqseal/v1/dev/x-2/resp", "deny"),
        ("operator:publish:mqseal/v1/dev/x-2/cmd", "allow"),
        ("operator:subscribe:mqseal/v1/dev/x-2/resp", "allow"),
        ("narrow:publish:mqseal/v1/dev/x-1/cmd", "allow"),
        ("narrow:publish:mqseal/v1/dev/x-2/cmd", "deny"),
        ("narrow:subscribe:mqseal/v1/dev/x-2/resp", "deny"),
    ];
    let mut cmd = python_script("emqx_config_check.py");
    cmd.args(["--config"]).arg(site.dir.join("emqx.conf")).args(["--uri", &mongodb_uri(), "--login"]);
    cmd.arg(login("x-1:x-1", &pw["x-1"]))
        .arg(login("x-1:x-2", &pw["x-1"]))
        .arg(login("x-3:x-3", &pw["x-3"]))
        .arg(login("operator:operator-1", &site.dir.join("operator.pw")))
        .arg(login("root:any", &site.dir.join("root.pw")))
        .arg("--check")
        .args(checks.iter().map(|(c, _)| *c));
    let out = exec(&mut cmd, T).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v = json(&out);
    assert_eq!(v["schema"], serde_json::json!([]), "{v}");
    let logins = &v["logins"];
    assert_eq!(
        (logins["x-1:x-1"]["authenticator"].as_u64(), logins["x-1:x-1"]["wrong_password"].as_u64()),
        (Some(0), None),
        "{v}"
    );
    assert!(logins["x-1:x-2"]["authenticator"].is_null(), "a device under another client id: {v}");
    assert!(logins["x-3:x-3"]["authenticator"].is_null(), "a disabled device: {v}");
    assert_eq!(logins["operator:operator-1"]["authenticator"], 1, "people: the PBKDF2 authenticator: {v}");
    assert_eq!(
        (logins["root:any"]["authenticator"].as_u64(), logins["root:any"]["is_superuser"].as_bool()),
        (Some(1), Some(true)),
        "{v}"
    );
    for (check, want) in checks {
        assert_eq!(v["checks"][check], want, "{check}: {v}");
    }
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(site.dir.join("emqx.conf")).unwrap()).unwrap();
    assert_eq!(
        conf["authentication"][1]["password_hash_algorithm"]["iterations"], 1000,
        "the controller's pbkdf2_iterations"
    );
    assert_eq!(conf["authentication"][0]["password_hash_algorithm"]["salt_position"], "suffix");
}

/// Prometheus' own parser reads the endpoint, and the counters an operator
/// alerts on move with what clients do: logins accepted and refused, ACL
/// denials, messages in and out.
#[tokio::test]
async fn prometheus_parses_the_metrics_and_the_counters_move() {
    let metrics = free_port();
    let site = Site::start_config(BrokerConfig { metrics_port: Some(metrics), ..BrokerConfig::default() }).await;
    let bundle = site.add_device("p-1", &[]).await;
    site.add_device("p-2", &[]).await;
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let scrape = || async {
        let out = exec(python_script("scrape.py").arg(&url), T).await;
        assert_eq!(out.code, 0, "{out:?}");
        json(&out)
    };
    let before = scrape().await;
    assert_eq!(before["content_type"], "text/plain; version=0.0.4");
    assert_eq!(before["types"]["mqseal_logins_ok"], "counter", "{before}");
    assert_eq!(before["types"]["mqseal_sessions_active"], "gauge", "{before}");

    let port = site.broker.port().to_string();
    let pw = bundle_password(&bundle);
    let p1_cmd = topic("p-1", "cmd");
    // One subscriber that receives one message, one refused login, one
    // denied publish and one denied subscription.
    let p1_pw = write(&site.dir.join("p-1.pw"), &pw);
    let mut sub = python_script("paho_client.py");
    sub.args(["--port", &port, "--username", "p-1", "--client-id", "p-1", "--password-file"]).arg(&p1_pw).args([
        "--sub",
        &p1_cmd,
        "--count",
        "1",
        "--timeout",
        "30",
    ]);
    let sub = spawn_until(&mut sub, "ready", T).await;
    let admin = site.admin_password.clone();
    assert_eq!(
        tool("mosquitto_pub", &["-p", &port, "-u", "admin", "-P", &admin, "-q", "1", "-t", &p1_cmd, "-m", "x"])
            .await
            .code,
        0
    );
    assert_eq!(payloads(&sub.finish(T).await), ["x"]);
    assert_eq!(
        tool("mosquitto_pub", &["-p", &port, "-u", "p-1", "-P", "wrong", "-i", "p-1", "-t", "x", "-m", "y"]).await.code,
        4
    );
    let out = publish_v5(&port, ("p-1", "p-1", &pw), &topic("p-2", "cmd"), "z").await;
    assert!(out.stderr.contains("Not authorized"), "{out:?}");
    let out = tool("mosquitto_sub", &["-p", &port, "-u", "p-1", "-i", "p-1", "-P", &pw, "-t", "#", "-W", "2"]).await;
    assert!(out.stderr.contains("denied"), "{out:?}");

    let after = scrape().await;
    let moved = |name: &str| {
        let (b, a) = (before["samples"][name].as_f64(), after["samples"][name].as_f64());
        assert!(b.is_some() && a.is_some(), "{name} missing: {after}");
        a.unwrap() - b.unwrap()
    };
    assert!(moved("mqseal_logins_ok_total") >= 4.0, "{after}");
    assert_eq!(moved("mqseal_logins_refused_total"), 1.0, "{after}");
    assert_eq!(moved("mqseal_acl_denied_publish_total"), 1.0, "{after}");
    assert_eq!(moved("mqseal_acl_denied_subscribe_total"), 1.0, "{after}");
    assert!(moved("mqseal_messages_in_total") >= 1.0, "{after}");
    assert!(moved("mqseal_messages_out_total") >= 1.0, "{after}");
    assert!(moved("mqseal_bytes_in_total") > 0.0 && moved("mqseal_bytes_out_total") > 0.0, "{after}");
}

/// Every `mqseal` command as a script sees it: one JSON document on stdout
/// with `--json` (errors too), and the exit codes `mqseal --help` and the
/// README document: 0 ok, 1 local error, 2 usage, 3 device failure,
/// 4 timeout, 5 broker unreachable or login refused.
#[tokio::test]
async fn every_cli_command_speaks_json_with_the_documented_exit_codes() {
    let site = Site::start(Store::File).await;
    let run = |args: &'static [&'static str]| site.mqseal(args);
    let ok = |out: Output| {
        assert_eq!(out.code, 0, "{out:?}");
        json(&out)
    };
    let failed = |out: Output, code: i32| {
        assert_eq!(out.code, code, "{out:?}");
        let v = json(&out);
        assert_eq!(v["exit_code"], code, "{v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        v
    };

    let v = ok(run(&["--json", "keygen", "--bits", "2048", "--out", "second.pem"]).await);
    assert_eq!((v["bits"].as_u64(), v["key_id"].as_str().map(str::len)), (Some(2048), Some(64)), "{v}");
    assert!(site.dir.join("second.pem.pub").exists());
    failed(run(&["--json", "keygen", "--bits", "2048", "--out", "second.pem"]).await, 1);
    failed(run(&["--json", "keygen", "--bits", "1024", "--out", "third.pem"]).await, 2);

    write(&site.dir.join("ci.pw"), "ci-password-1\n");
    write(&site.dir.join("ci2.pw"), "ci-password-2\n");
    assert_eq!(
        ok(run(&["--json", "user", "add", "ci", "--grant", "x-1", "--password-file", "ci.pw"]).await)["result"],
        "added"
    );
    failed(run(&["--json", "user", "add", "ci", "--password-file", "ci.pw"]).await, 1);
    failed(run(&["--json", "user", "add", "nofile", "--password-file", "missing.pw"]).await, 1);
    write(&site.dir.join("short.pw"), "short\n");
    failed(run(&["--json", "user", "add", "short", "--password-file", "short.pw"]).await, 2);
    assert_eq!(
        ok(run(&["--json", "user", "passwd", "ci", "--password-file", "ci2.pw"]).await)["result"],
        "password changed"
    );
    assert_eq!(ok(run(&["--json", "user", "disable", "ci"]).await)["result"], "disabled");
    assert_eq!(ok(run(&["--json", "user", "enable", "ci"]).await)["result"], "enabled");
    let v = ok(run(&["--json", "user", "list"]).await);
    let ci = v["users"].as_array().unwrap().iter().find(|u| u["username"] == "ci").unwrap().clone();
    assert_eq!((ci["role"].as_str(), ci["disabled"].as_bool()), (Some("controller"), Some(false)), "{v}");
    assert_eq!(ci["grants"], serde_json::json!(["x-1"]));
    assert_eq!(ok(run(&["--json", "user", "del", "ci"]).await)["result"], "deleted");
    failed(run(&["--json", "user", "del", "ci"]).await, 1);

    let v = ok(run(&["--json", "device", "add", "x-1", "--bits", "2048"]).await);
    assert_eq!((v["device"].as_str(), v["granted_to"].as_str()), (Some("x-1"), Some("operator")), "{v}");
    assert!(Path::new(v["bundle"].as_str().unwrap()).exists(), "{v}");
    failed(run(&["--json", "device", "add", "x-1", "--bits", "2048"]).await, 1);
    failed(run(&["--json", "device", "add", "bad/id", "--bits", "2048"]).await, 2);
    ok(run(&["--json", "device", "add", "x-2", "--bits", "2048"]).await);
    site.add_mark_command("x-1");
    let agent = site.agent("x-1").await;
    let v = ok(run(&["--json", "device", "list"]).await);
    assert_eq!(
        v["devices"],
        serde_json::json!([
            { "device": "x-1", "status": "online", "since": v["devices"][0]["since"] },
            { "device": "x-2", "status": "unknown", "since": v["devices"][1]["since"] },
        ]),
        "{v}"
    );

    let v = ok(run(&["--json", "send", "x-1", "echo", "hi"]).await);
    assert_eq!(
        v,
        serde_json::json!({ "device": "x-1", "outcome": "ok", "status": "ok", "code": 0, "output": "hi", "error": null })
    );
    let v = failed_device(run(&["--json", "send", "x-1", "reboot"]).await, 3);
    assert_eq!((v["outcome"].as_str(), v["status"].as_str()), (Some("failed"), Some("unknown_command")), "{v}");
    let v = failed_device(run(&["--json", "send", "x-2", "ping", "--timeout", "1s"]).await, 4);
    assert_eq!(v["outcome"], "timed_out", "{v}");
    failed(run(&["--json", "send", "x-1", "ping", "--hidden"]).await, 2);
    failed(run(&["--json", "send", "nobody", "ping"]).await, 2);
    failed(run(&["--json", "--broker", "127.0.0.1:1", "send", "x-1", "ping"]).await, 5);
    write(&site.dir.join("wrong.pw"), "wrong-password-1\n");
    failed(run(&["--json", "--password-file", "wrong.pw", "send", "x-1", "ping"]).await, 5);
    // Usage errors caught by the argument parser: usage on stderr, exit 2.
    let out = run(&["--json", "send", "x-1"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("Usage"), "{out:?}");
    let out = run(&["--json", "send", "x-1", "ping", "--timeout", "soon"]).await;
    assert_eq!(out.code, 2, "{out:?}");

    let v = failed_device(run(&["--json", "broadcast", "--all", "mark", "--timeout", "3s"]).await, 4);
    assert_eq!(v["summary"], serde_json::json!({ "ok": 1, "failed": 0, "timed_out": 1 }), "{v}");
    assert_eq!(v["mode"], "challenge");
    assert!(v["timing"]["wall_ms"].as_u64().is_some(), "{v}");
    let v = ok(run(&["--json", "broadcast", "--devices", "x-1", "mark", "--mode", "sealed"]).await);
    assert_eq!(v["summary"], serde_json::json!({ "ok": 1, "failed": 0, "timed_out": 0 }), "{v}");
    assert_eq!(site.marks("x-1"), 2);

    let v = ok(run(&["--json", "device", "rotate", "x-2", "--bits", "2048"]).await);
    assert_eq!(v["device"], "x-2");
    assert_eq!(ok(run(&["--json", "device", "remove", "x-2"]).await)["result"], "removed");
    failed(run(&["--json", "device", "remove", "x-2"]).await, 1);
    drop(agent);
}

/// The outcome document of a send or broadcast whose exit code says the
/// device failed (3) or did not answer (4): still one JSON document.
fn failed_device(out: Output, code: i32) -> Value {
    assert_eq!(out.code, code, "{out:?}");
    json(&out)
}

/// `examples/` as a user runs them: the shell script and the Python script,
/// with `mqseal` on PATH and the site's config in MQSEAL_CONFIG.
#[tokio::test]
async fn the_examples_command_a_real_device() {
    let site = Site::start(Store::File).await;
    site.add_device("ex-1", &[]).await;
    site.add_device("ex-2", &[]).await;
    let _agent = site.agent("ex-1").await;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let bin_dir = workspace_bin("mqseal").parent().unwrap().to_owned();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let example = |program: PathBuf, script: &str, args: &[&str]| {
        let mut cmd = Command::new(program);
        cmd.arg(examples.join(script))
            .args(args)
            .current_dir(&site.dir)
            .env("PATH", &path)
            .env("MQSEAL_CONFIG", site.dir.join("mqseal.toml"));
        async move { exec(&mut cmd, T).await }
    };
    let bash = PathBuf::from("/bin/bash");
    let out = example(bash.clone(), "send.sh", &["ex-1", "echo", "from a shell script"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "ex-1: from a shell script", "{out:?}");
    let out = example(bash.clone(), "send.sh", &["ex-1", "reboot"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("ex-1 refused the command or it failed"), "{out:?}");
    let out = example(bash, "send.sh", &["ex-2", "ping"]).await;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("ex-2 did not answer"), "{out:?}");

    let python = mqseal_tests::python();
    let out = example(python.clone(), "send.py", &["ex-1", "echo", "from Python"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "ex-1: ok: from Python", "{out:?}");
    let out = example(python, "send.py", &["--all", "ping"]).await;
    assert_eq!(out.code, 4, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines, ["ex-1: ok: pong", "ex-2: timed_out", "1 ok, 0 failed, 1 timed out"], "{out:?}");
}
