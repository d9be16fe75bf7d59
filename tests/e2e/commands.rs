//! The agent and the controller end to end, through the real broker.
//!
//! Every test runs the compiled `mqseal-broker`, `mqseal` and
//! `mqseal-agent` as processes, like an operator would; attacks replay and
//! tamper with traffic using mosquitto_pub/sub. Execution is counted by a
//! `mark` command whose program appends a line to a file, so "not executed"
//! is observed on the device's side, not inferred from the controller.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use mqseal_tests::broker::{Store, unique_database};
use mqseal_tests::site::Site;
use mqseal_tests::{mongodb_uri, topic};

const SECOND: Duration = Duration::from_secs(1);

/// Seed 000 (the paper): users with SHA-256-based hashes in MongoDB; valid
/// credentials → a sealed command is executed and its encrypted, signed
/// response returns; invalid credentials → refused at the broker.
#[tokio::test]
async fn paper_flow_on_mongodb_sealed_command_and_refused_login() {
    let database = unique_database("e2e_paper");
    let site = Site::start(Store::Mongo { uri: mongodb_uri(), database: database.clone(), legacy: false }).await;
    site.add_device("lamp-1", &[]).await;
    let agent = site.agent("lamp-1").await;

    // The user and the device are in MongoDB in EMQX's layout, hashed.
    let client = mongodb::Client::with_uri_str(mongodb_uri()).await.unwrap();
    let users = client.database(&database).collection::<mongodb::bson::Document>("mqtt_user");
    let op = users.find_one(mongodb::bson::doc! { "username": "operator" }).await.unwrap().unwrap();
    assert_eq!(op.get_str("algorithm").unwrap(), "pbkdf2_sha256");
    assert_eq!(op.get_str("password_hash").unwrap().len(), 64, "hex SHA-256-sized hash");
    assert!(!op.get_str("password_hash").unwrap().contains("operator-password"));
    let dev = users.find_one(mongodb::bson::doc! { "username": "lamp-1" }).await.unwrap().unwrap();
    assert_eq!(dev.get_str("algorithm").unwrap(), "sha256", "device secrets: salted SHA-256");
    assert_eq!(op.get_array("grants").unwrap().len(), 1, "device add granted the controller");

    // Valid credentials: executed, sealed answer verified and printed.
    let out = site.mqseal(&["send", "lamp-1", "echo", "InternetOfThings,50255", "--mode", "sealed"]).await;
    assert_eq!(out.code, 0, "{out:?}\n{}", agent.text());
    assert_eq!(out.stdout.trim(), "InternetOfThings,50255");
    let json = site.mqseal(&["send", "lamp-1", "info", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["status"], "ok");
    assert!(v["output"].as_str().unwrap().contains("device=lamp-1"));

    // Invalid credentials: refused by the broker, exit code 5, nothing runs.
    std::fs::write(site.dir.join("wrong.pw"), "not-the-password\n").unwrap();
    let executed = agent.count("executing verified command");
    let out = site.mqseal(&["--password-file", "wrong.pw", "send", "lamp-1", "ping"]).await;
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("refused"), "{}", out.stderr);
    assert_eq!(agent.count("executing verified command"), executed);
}

/// Seed 003 (the Arduino design): challenge → HMAC(challenge ‖ command) →
/// the device identifies the command among its registered ones → tagged
/// response identified by the controller.
#[tokio::test]
async fn arduino_flow_hidden_and_explicit_challenge_commands() {
    let site = Site::start(Store::File).await;
    site.add_device("valve-3", &[]).await;
    site.add_mark_command("valve-3");
    site.append_to_bundle(
        "valve-3",
        "[commands.open]\nprogram = [\"/bin/echo\", \"opening to {percent}\"]\n\
         args = [{ name = \"percent\", type = \"int\", min = 0, max = 100 }]\nhidden = [[\"25\"], [\"50\"]]\n",
    );
    let agent = site.agent("valve-3").await;

    // Hidden: only the tag travels; the device recognises `open 25`.
    let capture = site.capture(&topic("valve-3", "cmd")).await;
    let out = site.mqseal(&["send", "valve-3", "open", "25", "--mode", "challenge", "--hidden", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}\n{}", agent.text());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["output"].as_str()),
        (Some("ok"), Some("")),
        "hidden answers carry status only"
    );
    let wire = capture.bytes().await;
    assert!(!wire.windows(4).any(|w| w == b"open"), "the command name never crosses the network in hidden form");
    // A command the device does not know in hidden form cannot be identified:
    // no answer, so the controller times out (exit 4).
    let out =
        site.mqseal(&["send", "valve-3", "open", "26", "--mode", "challenge", "--hidden", "--timeout", "2s"]).await;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(agent.wait_for("rejected: tag does not verify", 1, 5 * SECOND).await, "{}", agent.text());

    // Explicit: command and arguments travel with the tag.
    let out = site.mqseal(&["send", "valve-3", "open", "70", "--mode", "challenge"]).await;
    assert_eq!((out.code, out.stdout.trim()), (0, "opening to 70"), "{out:?}");
    // Typed arguments are enforced on the device: 170 is out of range.
    let out = site.mqseal(&["send", "valve-3", "open", "170", "--mode", "challenge"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("bad_arguments"), "{out:?}");
    let out = site.mqseal(&["send", "valve-3", "mark", "--mode", "challenge"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(site.marks("valve-3"), 1);
}

/// Captured commands republished with mosquitto_pub — as is, tampered, to
/// another device, after an agent restart — are never executed again.
#[tokio::test]
async fn replayed_tampered_and_redirected_commands_are_not_executed() {
    let site = Site::start(Store::File).await;
    for d in ["dev-a", "dev-b"] {
        site.add_device(d, &[]).await;
        site.add_mark_command(d);
    }
    let a = site.agent("dev-a").await;
    let b = site.agent("dev-b").await;

    let mut captured = Vec::new();
    for mode in ["sealed", "challenge"] {
        let capture = site.capture(&topic("dev-a", "cmd")).await;
        let out = site.mqseal(&["send", "dev-a", "mark", "--mode", mode]).await;
        assert_eq!(out.code, 0, "{out:?}\n{}", a.text());
        captured.push(capture.bytes().await);
    }
    assert_eq!(site.marks("dev-a"), 2);

    // Replay as is: the agent re-sends its stored answer (what a QoS 1
    // redelivery needs) and does not run the command again.
    for frame in &captured {
        site.publish_raw(&topic("dev-a", "cmd"), frame).await;
    }
    assert!(a.wait_for("re-sent its stored response", 2, 10 * SECOND).await, "{}", a.text());

    // Tampered: one byte flipped anywhere in the middle.
    for frame in &captured {
        let mut t = frame.clone();
        let mid = t.len() / 2;
        t[mid] ^= 0x01;
        site.publish_raw(&topic("dev-a", "cmd"), &t).await;
    }
    // Malformed input, small and large: rejected, and the agent stays up.
    site.publish_raw(&topic("dev-a", "cmd"), b"\x01\x01garbage").await;
    site.publish_raw(&topic("dev-a", "cmd"), &vec![0x01; 60 * 1024]).await;
    assert!(a.wait_for("rejected:", 4, 10 * SECOND).await, "{}", a.text());

    // Redirected to device B: B refuses what was meant for A.
    for frame in &captured {
        site.publish_raw(&topic("dev-b", "cmd"), frame).await;
    }
    assert!(b.wait_for("rejected:", 2, 10 * SECOND).await, "{}", b.text());
    assert!(b.text().contains("another topic") || b.text().contains("another device"), "{}", b.text());

    // After a restart the replay state is still there.
    a.stop().await;
    let a = site.agent("dev-a").await;
    // One log file across restarts: count from here.
    let resent = a.count("re-sent its stored response");
    let executed = a.count("executing verified command");
    for frame in &captured {
        site.publish_raw(&topic("dev-a", "cmd"), frame).await;
    }
    assert!(a.wait_for("re-sent its stored response", resent + 2, 10 * SECOND).await, "{}", a.text());

    tokio::time::sleep(SECOND).await;
    assert_eq!(site.marks("dev-a"), 2, "nothing ran twice:\n{}", a.text());
    assert_eq!(site.marks("dev-b"), 0, "nothing meant for A ran on B");
    assert_eq!(a.count("executing verified command"), executed, "the restarted agent executed nothing");
    // And genuine commands still work afterwards.
    assert_eq!(site.mqseal(&["send", "dev-a", "mark"]).await.code, 0);
    assert_eq!(site.marks("dev-a"), 3);
}

/// A command captured while its device was offline is refused once it has
/// expired.
#[tokio::test]
async fn expired_commands_are_not_executed() {
    let site = Site::start(Store::File).await;
    site.add_device("meter-9", &[]).await;
    site.add_mark_command("meter-9");
    let bundle = site.bundle("meter-9");
    let text = std::fs::read_to_string(&bundle).unwrap().replace("max_skew_secs = 60", "max_skew_secs = 1");
    std::fs::write(&bundle, text).unwrap();

    let capture = site.capture(&topic("meter-9", "cmd")).await;
    let out = site.mqseal(&["send", "meter-9", "mark", "--ttl", "1s", "--timeout", "1s"]).await;
    assert_eq!(out.code, 4, "no agent yet, so no answer: {out:?}");
    let frame = capture.bytes().await;
    tokio::time::sleep(3 * SECOND).await;

    let agent = site.agent("meter-9").await;
    site.publish_raw(&topic("meter-9", "cmd"), &frame).await;
    assert!(agent.wait_for("rejected: envelope has expired", 1, 10 * SECOND).await, "{}", agent.text());
    assert_eq!(site.marks("meter-9"), 0);
}

/// Two controllers — different users, different keys — sending to the same
/// device at the same time all get their own verified answers.
#[tokio::test]
async fn two_controllers_send_to_one_device_concurrently() {
    let site = Site::start(Store::File).await;
    site.ok(&["keygen", "--bits", "2048", "--out", "second.key.pem"]).await;
    std::fs::write(site.dir.join("second.pw"), "second-password-1\n").unwrap();
    site.add_device("shared-1", &["--trust", "second.key.pem.pub"]).await;
    site.ok(&["user", "add", "second", "--grant", "shared-1", "--password-file", "second.pw"]).await;
    let second = site.dir.join("second.toml");
    let text = std::fs::read_to_string(site.dir.join("mqseal.toml"))
        .unwrap()
        .replace("controller.key.pem", "second.key.pem")
        .replace("\"operator\"", "\"second\"")
        .replace("operator.pw", "second.pw");
    std::fs::write(&second, text).unwrap();
    let agent = site.agent("shared-1").await;

    let one = async {
        let mut codes = Vec::new();
        for i in 0..4 {
            let mode = if i % 2 == 0 { "sealed" } else { "challenge" };
            let out = site.mqseal(&["send", "shared-1", "echo", &format!("one-{i}"), "--mode", mode]).await;
            codes.push((out.code, out.stdout.trim().to_owned()));
        }
        codes
    };
    let two = async {
        let mut codes = Vec::new();
        for i in 0..4 {
            let mode = if i % 2 == 0 { "challenge" } else { "sealed" };
            let out =
                site.mqseal_with(&second, &["send", "shared-1", "echo", &format!("two-{i}"), "--mode", mode]).await;
            codes.push((out.code, out.stdout.trim().to_owned()));
        }
        codes
    };
    let (one, two) = tokio::join!(one, two);
    for (i, (code, out)) in one.iter().enumerate() {
        assert_eq!((*code, out.as_str()), (0, format!("one-{i}").as_str()), "{}", agent.text());
    }
    for (i, (code, out)) in two.iter().enumerate() {
        assert_eq!((*code, out.as_str()), (0, format!("two-{i}").as_str()), "{}", agent.text());
    }
}

/// If the agent cannot save its replay state it refuses to execute, and says
/// so in an authenticated answer and in its log.
#[tokio::test]
async fn an_unwritable_state_dir_fails_closed() {
    let site = Site::start(Store::File).await;
    site.add_device("ro-1", &[]).await;
    site.add_mark_command("ro-1");
    let agent = site.agent("ro-1").await;
    // A directory where the state's temporary file must go: writing fails
    // even for root.
    std::fs::create_dir_all(site.dir.join("ctl/agents/ro-1-state/state.bin.tmp")).unwrap();
    let out = site.mqseal(&["send", "ro-1", "mark"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stdout.contains("refused to execute") || out.stderr.contains("failed"), "{out:?}");
    assert!(agent.wait_for("refused to execute: replay state cannot be saved", 1, 5 * SECOND).await);
    assert_eq!(site.marks("ro-1"), 0);
}

/// `device list` shows online/offline; `rotate` replaces every credential
/// (the old bundle stops working); `remove` revokes the device; broadcast
/// reports per device.
#[tokio::test]
async fn device_lifecycle_status_rotation_removal_and_broadcast() {
    let site = Site::start(Store::File).await;
    for d in ["gw-1", "gw-2", "gw-3"] {
        site.add_device(d, &[]).await;
    }
    let out = site.mqseal(&["device", "add", "gw-1", "--bits", "2048"]).await;
    assert_eq!(out.code, 1, "adding twice is refused: {out:?}");
    let mut a1 = site.agent("gw-1").await;
    let a2 = site.agent("gw-2").await;

    let list = site.ok(&["device", "list", "--json", "--wait", "3s"]).await;
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let status =
        |id: &str| v["devices"].as_array().unwrap().iter().find(|d| d["device"] == id).unwrap()["status"].clone();
    assert_eq!((status("gw-1"), status("gw-2")), ("online".into(), "online".into()));
    assert_eq!(status("gw-3"), "unknown", "never connected");

    // Broadcast: two answer, the third has no agent and times out.
    let out = site.mqseal(&["broadcast", "ping", "--all", "--timeout", "3s", "--json"]).await;
    assert_eq!(out.code, 4, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["summary"], serde_json::json!({ "ok": 2, "failed": 0, "timed_out": 1 }));

    // Rotate gw-1: the running agent holds the old credentials and is
    // closed by the broker; the new bundle works.
    let old_bundle = std::fs::read_to_string(site.bundle("gw-1")).unwrap();
    site.ok(&["device", "rotate", "gw-1", "--bits", "2048"]).await;
    assert_ne!(std::fs::read_to_string(site.bundle("gw-1")).unwrap(), old_bundle);
    assert!(a1.wait_for("connection:", 1, 10 * SECOND).await, "old session closed:\n{}", a1.text());
    assert!(a1.is_running(), "the old agent keeps retrying, it does not crash");
    a1.stop().await;
    let list = site.ok(&["device", "list", "--json", "--wait", "2s"]).await;
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let gw1 = v["devices"].as_array().unwrap().iter().find(|d| d["device"] == "gw-1").unwrap().clone();
    assert_eq!(gw1["status"], "offline", "a stopped agent leaves a retained offline status");
    let a1 = site.agent("gw-1").await;
    assert_eq!(site.mqseal(&["send", "gw-1", "ping"]).await.code, 0, "{}", a1.text());

    // Remove gw-2: its login is gone, the controller no longer knows it.
    site.ok(&["device", "remove", "gw-2"]).await;
    assert!(a2.wait_for("connection:", 1, 10 * SECOND).await, "{}", a2.text());
    let out = site.mqseal(&["send", "gw-2", "ping"]).await;
    assert_eq!(out.code, 2, "unknown device is a usage error: {out:?}");
    let users = site.ok(&["user", "list", "--json"]).await;
    assert!(!users.contains("gw-2"), "{users}");
}

/// Usage errors, bad files and bad key sizes are reported, never a panic.
#[tokio::test]
async fn bad_input_gets_clear_errors_and_distinct_exit_codes() {
    let site = Site::start(Store::File).await;
    let out = site.mqseal(&["send"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = site.mqseal(&["send", "x", "ping", "--timeout", "soon"]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("unit"), "{}", out.stderr);
    let out = site.mqseal(&["keygen", "--bits", "1024", "--out", "small.pem"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = site.mqseal(&["keygen", "--bits", "2048"]).await;
    assert_eq!(out.code, 1, "an existing key is not overwritten: {out:?}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(site.dir.join("controller.key.pem")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let out = site.mqseal(&["user", "add", "eve"]).await;
    assert_eq!(out.code, 2, "no terminal, no password source: {out:?}");
    assert!(out.stderr.contains("--password-file"), "{}", out.stderr);

    // A broken agent config names the file and line.
    std::fs::write(site.dir.join("bad.toml"), "device_id = \"d\"\nstate_dir = 5\n").unwrap();
    let out = tokio::process::Command::new(mqseal_tests::site::workspace_bin("mqseal-agent"))
        .arg("--config")
        .arg(site.dir.join("bad.toml"))
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("bad.toml:2:"), "{err}");
    // An unreachable broker: exit 5 naming the address.
    site.add_device("d1", &[]).await;
    let out = site.mqseal(&["--broker", "127.0.0.1:1", "send", "d1", "ping"]).await;
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("127.0.0.1:1"), "{}", out.stderr);
}

/// Agent and controller over TLS, verifying the broker with the CA file.
#[tokio::test]
async fn agent_and_controller_over_tls() {
    let (site, tls_port, ca) = Site::start_tls().await;
    site.add_device("tls-1", &[]).await;
    let plain = format!("port = {}\n", site.broker.port());
    let tls = format!("port = {tls_port}\ntls_ca = \"{}\"\n", ca.display());
    let bundle = site.bundle("tls-1");
    let text = std::fs::read_to_string(&bundle).unwrap();
    assert!(text.contains(&plain), "{text}");
    std::fs::write(&bundle, text.replacen(&plain, &tls, 1)).unwrap();
    let controller = site.dir.join("tls.toml");
    let text = std::fs::read_to_string(site.dir.join("mqseal.toml")).unwrap();
    std::fs::write(&controller, text.replacen(&plain, &tls, 1)).unwrap();

    let agent = site.agent("tls-1").await;
    let out = site.mqseal_with(&controller, &["send", "tls-1", "echo", "over-tls"]).await;
    assert_eq!((out.code, out.stdout.trim()), (0, "over-tls"), "{out:?}\n{}", agent.text());
    // tls_server_name is the name verified instead of the host connected
    // to: the certificate's own name works, any other is refused.
    let tls_text = std::fs::read_to_string(&controller).unwrap();
    for (name, code) in [("broker.example", 0), ("other.example", 5)] {
        let named = site.dir.join(format!("tls-{name}.toml"));
        std::fs::write(&named, tls_text.replacen(&tls, &format!("{tls}tls_server_name = \"{name}\"\n"), 1)).unwrap();
        let out = site.mqseal_with(&named, &["send", "tls-1", "ping", "--timeout", "3s"]).await;
        assert_eq!(out.code, code, "tls_server_name = {name}: {out:?}");
    }
    // Another CA (a second gen-cert) does not vouch for this broker: exit 5.
    let other = site.dir.join("other-ca");
    let made = std::process::Command::new(mqseal_tests::site::workspace_bin("mqseal-broker"))
        .args(["gen-cert", "--dir"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(made.status.success());
    let text = std::fs::read_to_string(&controller)
        .unwrap()
        .replace(&ca.display().to_string(), &other.join("ca.pem").display().to_string());
    std::fs::write(&controller, text).unwrap();
    let out = site.mqseal_with(&controller, &["send", "tls-1", "ping"]).await;
    assert_eq!(out.code, 5, "{out:?}");
}

/// `mqseal user add|disable|enable|passwd|del|list` against the store the
/// broker reads, observed by logging in through the broker.
#[tokio::test]
async fn user_management_takes_effect_at_the_broker() {
    let site = Site::start(Store::File).await;
    site.add_device("u-dev", &[]).await;
    let _agent = site.agent("u-dev").await;
    std::fs::write(site.dir.join("second.pw"), "second-password-1\n").unwrap();
    std::fs::write(site.dir.join("second-new.pw"), "second-password-2\n").unwrap();
    site.ok(&["user", "add", "second", "--grant", "u-dev", "--password-file", "second.pw"]).await;
    let config = site.dir.join("second.toml");
    let text = std::fs::read_to_string(site.dir.join("mqseal.toml"))
        .unwrap()
        .replace("\"operator\"", "\"second\"")
        .replace("operator.pw", "second.pw");
    std::fs::write(&config, &text).unwrap();
    let send = || site.mqseal_with(&config, &["send", "u-dev", "ping", "--timeout", "5s"]);
    assert_eq!(send().await.code, 0);

    site.ok(&["user", "disable", "second"]).await;
    assert_eq!(send().await.code, 5, "disabled");
    site.ok(&["user", "enable", "second"]).await;
    assert_eq!(send().await.code, 0, "enabled again");

    site.ok(&["user", "passwd", "second", "--password-file", "second-new.pw"]).await;
    assert_eq!(send().await.code, 5, "the old password no longer works");
    std::fs::write(&config, text.replace("second.pw", "second-new.pw")).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the one failure's lockout
    assert_eq!(send().await.code, 0, "the new one does");

    let list: serde_json::Value = serde_json::from_str(&site.ok(&["user", "list", "--json"]).await).unwrap();
    let second = list["users"].as_array().unwrap().iter().find(|u| u["username"] == "second").unwrap().clone();
    assert_eq!((second["role"].as_str(), second["algorithm"].as_str()), (Some("controller"), Some("pbkdf2_sha256")));
    assert_eq!(second["grants"], serde_json::json!(["u-dev"]));

    site.ok(&["user", "del", "second"]).await;
    assert_eq!(send().await.code, 5, "deleted");
    assert_eq!(site.mqseal(&["user", "del", "second"]).await.code, 1, "deleting twice names the missing user");
}

/// A long-lived controller with prefetch on (a service, the soak) keeps
/// working across idle gaps longer than the device's challenge lifetime
/// (1.5 s here, 3 s idle, its connection unread): each command is answered
/// and runs once. The rule that keeps a late-read challenge from being used
/// is unit-tested in `controller-cli/src/session.rs`; this checks the whole
/// path against the real agent.
#[tokio::test]
async fn a_prefetching_controller_keeps_working_across_idle_gaps() {
    use mqseal_controller::registry::Registry;
    use mqseal_controller::session::{Mode, Request, Session};

    let site = Site::start(Store::File).await;
    let bundle = site.add_device("p-1", &[]).await;
    let mut config: toml::Table = toml::from_str(&std::fs::read_to_string(&bundle).unwrap()).unwrap();
    config["policy"].as_table_mut().unwrap().insert("challenge_lifetime_ms".into(), toml::Value::Integer(1500));
    std::fs::write(&bundle, toml::to_string(&config).unwrap()).unwrap();
    site.add_mark_command("p-1");
    let agent = site.agent("p-1").await;

    let registry = Registry::open(&site.dir.join("ctl")).unwrap();
    let keys = registry.keys("p-1").unwrap();
    let key_pem = std::fs::read_to_string(site.dir.join("controller.key.pem")).unwrap();
    let key = mqseal_proto::sealed::PrivateKey::from_pkcs8_pem(&key_pem).unwrap();
    let mut endpoint = mqseal_client::BrokerEndpoint::new("127.0.0.1", site.broker.port(), "operator");
    endpoint.password_file = Some(site.dir.join("operator.pw"));
    let mut session = Session::connect(&endpoint, &site.dir, "operator-prefetch", key, Duration::ZERO).await.unwrap();
    session.set_prefetch(true);
    let request = Request { name: "mark".into(), args: vec![], mode: Mode::Challenge, hidden: false, ttl: 60 * SECOND };
    let targets = [("p-1".to_owned(), &keys)];
    for round in 1..=3 {
        let results = session.run(&targets, &request, 10 * SECOND, &mut |_, _| {}).await.unwrap();
        assert!(
            matches!(&results[0].result, mqseal_controller::session::DeviceResult::Answered(r) if r.status == mqseal_proto::Status::Ok),
            "round {round}: {results:?}"
        );
        // Idle without reading: the prefetched challenge expires unread.
        tokio::time::sleep(3 * SECOND).await;
    }
    assert_eq!(site.marks("p-1"), 3, "{}", agent.text());
}
