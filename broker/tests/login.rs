//! Logging in to the real broker on its embedded file store: first start,
//! CONNACK codes, the refusal floor, throttling, client ids, kicking, and
//! the configuration surface.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use mqseal_store::{CredentialStore, Role};
use mqseal_tests::broker::{BrokerConfig, BrokerProc};
use mqseal_tests::free_port;
use mqseal_tests::mqtt::{Conn, Connect, Version};

/// The README's first command in miniature: a fresh directory, no config
/// file, no users. The broker creates its data directory, an admin
/// credential shown once on stdout (never in the log), and that credential
/// works with mosquitto's own clients. A second start on the same data
/// creates nothing and shows nothing.
/// Starts the binary the way the README does (no config file in the
/// directory, so built-in defaults) and returns it with what it printed up
/// to "ready".
async fn start_plain(dir: &Path, bind: &str) -> (tokio::process::Child, Vec<String>) {
    let mut child = tokio::process::Command::new(BIN)
        .args(["--bind", bind])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut printed = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let ready = line.starts_with("mqseal-broker ready");
            printed.push(line);
            if ready {
                break;
            }
        }
    })
    .await
    .expect("broker did not get ready");
    (child, printed)
}

/// SIGTERM, then the exit status and everything the process logged.
async fn stop(mut child: tokio::process::Child) -> (std::process::ExitStatus, String) {
    mqseal_tests::run("kill", &["-TERM", &child.id().unwrap().to_string()], T).await.unwrap();
    let status = tokio::time::timeout(T, child.wait()).await.unwrap().unwrap();
    let mut log = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut log).await.unwrap();
    (status, log)
}

#[tokio::test]
async fn first_start_creates_an_admin_shown_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let (child, printed) = start_plain(dir.path(), &bind).await;
    let password =
        printed.iter().find_map(|l| l.trim().strip_prefix("password: ")).expect("admin password shown").to_owned();
    assert_eq!(password.len(), 64, "256-bit hex secret");
    assert!(printed.iter().any(|l| l.contains("username: admin")));
    assert!(printed.iter().any(|l| l.contains("mosquitto_sub")), "tells the user how to use it: {printed:?}");

    let data = dir.path().join("data");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(data.join("users.json")).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let stored = std::fs::read_to_string(data.join("users.json")).unwrap();
    assert!(!stored.contains(&password), "only the hash is stored");

    let (code, err) = mosquitto_pub(port, "mqttv311", "admin", &password, "any/topic").await;
    assert_eq!(code, 0, "{err}");
    let (code, err) = mosquitto_pub(port, "mqttv5", "admin", &password, "any/topic").await;
    assert_eq!(code, 0, "{err}");

    let (status, log) = stop(child).await;
    assert!(status.success(), "SIGTERM is a clean shutdown: {status}");
    assert!(!log.contains(&password), "the password never reaches the log");

    let (child, printed) = start_plain(dir.path(), &bind).await;
    assert!(!printed.iter().any(|l| l.contains("password")), "second start shows nothing: {printed:?}");
    let (status, log) = stop(child).await;
    assert!(status.success());
    assert!(!log.contains(&password));
}

/// Right and wrong passwords through mosquitto's clients and byte-exact
/// CONNACKs: 3.1.1 return codes 4 and 5, v5 reason codes 0x86, 0x87, 0x8C.
#[tokio::test]
async fn refused_logins_get_real_connack_codes() {
    let site = Site::start(BrokerConfig::default()).await;
    let port = site.port();
    let secret = site.device("dev-1").await;
    site.human("alice", "correct horse", Role::Controller, &["dev-1"]).await;

    for v in ["mqttv311", "mqttv5"] {
        let (code, err) = mosquitto_pub(port, v, "dev-1", &secret, &topic("dev-1", "status")).await;
        assert_eq!(code, 0, "{v}: {err}");
    }
    // mosquitto_pub exits with the CONNACK code it was refused with.
    assert_eq!(mosquitto_pub(port, "mqttv311", "dev-1", "wrong", "t").await.0, 4);
    assert_eq!(mosquitto_pub(port, "mqttv5", "dev-1", "wrong", "t").await.0, 0x86);
    assert_eq!(mosquitto_pub(port, "mqttv311", "nobody", "wrong", "t").await.0, 4);

    use Version::{V4, V5};
    assert_eq!(connack(port, &login(V4, "alice", "correct horse")).await, Some(0));
    assert_eq!(connack(port, &login(V5, "alice", "correct horse")).await, Some(0));
    assert_eq!(connack(port, &login(V4, "alice", "wrong")).await, Some(4));
    assert_eq!(connack(port, &login(V5, "alice", "wrong")).await, Some(0x86));
    assert_eq!(connack(port, &login(V5, "ghost", "wrong")).await, Some(0x86));
    for v in [V4, V5] {
        let mut anonymous = login(v, "x", "");
        anonymous.username = None;
        anonymous.password = None;
        assert_eq!(connack(port, &anonymous).await, Some(if v == V4 { 5 } else { 0x87 }), "{v:?} no credentials");
    }
    // v5 enhanced authentication (property 0x15, Authentication Method).
    let mut enhanced = login(V5, "alice", "correct horse");
    enhanced.properties = vec![0x15, 0, 5, b'S', b'C', b'R', b'A', b'M'];
    assert_eq!(connack(port, &enhanced).await, Some(0x8c));
    // A username that cannot be a topic level is refused before any lookup.
    assert_eq!(connack(port, &login(V4, "a/b", "x")).await, Some(2), "client id a/b");
    assert_eq!(connack(port, &Connect::new(V4, "ok-id", "a#b", "x")).await, Some(4));

    let log = site.broker.log();
    assert!(log.contains("login refused") && log.contains("bad username or password"), "{log}");
    assert!(log.contains("user=ghost") || log.contains("user=\"ghost\""), "refusals name the user: {log}");
    assert!(!log.contains(&secret));
}

/// Every refused login is answered no sooner than `auth.refusal_delay_ms`
/// after CONNECT: a wrong password whether the name is unknown, a device
/// (one SHA-256) or a person (PBKDF2); a name that cannot be a topic level
/// (the outside attack's D5: a space, U+2010 and a trailing space were
/// answered in under 1 ms); and every other refusal — client id, missing
/// password, disabled user, lockout. Response time tells nothing about
/// which names exist or what the broker checked.
#[tokio::test]
async fn every_refusal_takes_the_same_floor() {
    let floor = Duration::from_millis(400);
    let config = BrokerConfig { refusal_delay_ms: 400, ..BrokerConfig::default() };
    let site = Site::start(config).await;
    let port = site.port();
    let secret = site.device("dev-1").await;
    site.human("alice", "pw-alice", Role::Controller, &[]).await;
    site.human("locked", "pw-locked", Role::Controller, &[]).await;
    let store = site.users();
    let mut off = store.get("alice").await.unwrap().unwrap();
    off.username = "disabled-one".into();
    off.disabled = true;
    store.put(&off, false).await.unwrap();
    // Three free failures, and the fourth locks "locked" for a second.
    for _ in 0..4 {
        assert_eq!(connack(port, &login(Version::V4, "locked", "wrong")).await, Some(4));
    }
    let mut no_password = login(Version::V5, "alice", "");
    no_password.password = None;
    let cases: Vec<(&str, Connect, u8)> = vec![
        ("locked out, right password", login(Version::V5, "locked", "pw-locked"), 0x97),
        ("device, wrong password", login(Version::V4, "dev-1", "wrong"), 4),
        ("person, wrong password", login(Version::V4, "alice", "wrong"), 4),
        ("unknown name", login(Version::V4, "nobody-at-all", "wrong"), 4),
        ("name with a space", login(Version::V4, "no body", "wrong"), 4),
        ("name with U+2010", login(Version::V5, "dev\u{2010}1", "wrong"), 0x86),
        ("name with a trailing space", login(Version::V4, "dev-1 ", &secret), 4),
        ("client id with a slash", Connect::new(Version::V4, "a/b", "dev-1", &secret), 2),
        ("device under another client id", Connect::new(Version::V5, "dev-2", "dev-1", &secret), 0x85),
        ("no password", no_password, 0x87),
        ("disabled user, right password", login(Version::V4, "disabled-one", "pw-alice"), 5),
    ];
    for (what, connect, expected) in cases {
        let start = Instant::now();
        let code = connack(port, &connect).await;
        let took = start.elapsed();
        assert_eq!(code, Some(expected), "{what}");
        assert!(took >= floor, "{what}: refused after {took:?}, before the {floor:?} floor");
        assert!(took < floor + Duration::from_secs(2), "{what}: {took:?}");
    }
    // A login that succeeds does not wait.
    let start = Instant::now();
    assert_eq!(connack(port, &login(Version::V4, "dev-1", &secret)).await, Some(0));
    assert!(start.elapsed() < floor, "a good login took {:?}", start.elapsed());
}

/// Opens one connection per `(source, connect)` first, then sends every
/// CONNECT back to back, then reads every CONNACK: the outside attack's
/// burst. Returns the codes in order.
async fn burst(port: u16, attempts: &[(std::net::Ipv4Addr, Connect)]) -> Vec<u8> {
    let mut conns = Vec::new();
    for (source, c) in attempts {
        conns.push(Conn::open_from(port, *source, c.version).await.unwrap());
    }
    for (conn, (_, c)) in conns.iter_mut().zip(attempts) {
        conn.send(&c.encode()).await.unwrap();
    }
    let mut codes = Vec::new();
    for conn in &mut conns {
        let p = conn.recv(Duration::from_secs(20)).await.unwrap();
        assert_eq!(p.kind(), 2, "CONNACK");
        codes.push(p.body[1]);
    }
    codes
}

/// The outside attack's F1: CONNECTs sent back to back all passed the
/// lockout check before the first failure was recorded, so one name got
/// dozens of checked guesses per lockout and the right password among them
/// was accepted. Now checks in flight count against the budget. Three
/// bursts, the attack's own, under the default `[throttle]` (3 free
/// failures per name, 20 per address): 40 guesses at a person from 40
/// addresses with the right password 21st; 100 from one address with the
/// right one 51st; 40 at a device from 40 addresses with the right one
/// 21st. In each at most 3 guesses are checked (CONNACK 4), the rest —
/// the right password included — are refused unchecked (5), and the
/// throttle's metric counts them.
#[tokio::test]
async fn concurrent_guesses_are_checked_no_more_than_the_free_failures() {
    let metrics = free_port();
    let config = BrokerConfig {
        metrics_port: Some(metrics),
        refusal_delay_ms: 300,
        user_free_failures: 3,
        address_free_failures: 20,
        base_delay_ms: 1000,
        ..BrokerConfig::default()
    };
    let site = Site::start(config).await;
    let port = site.port();
    // PBKDF2 long enough (≈0.1 s) that every guess of a burst arrives
    // while the first ones are still being checked.
    let store = site.users();
    for name in ["victim-a", "victim-b"] {
        let record = mqseal_store::UserRecord::human(name, b"the-right-one", Role::Controller, 100_000).unwrap();
        store.put(&record, false).await.unwrap();
    }
    let device_secret = site.device("victim-dev").await;
    let guesses = |user: &str, n: usize, right_at: usize, right: &str, source: &dyn Fn(usize) -> std::net::Ipv4Addr| {
        (0..n)
            .map(|i| {
                let pw = if i == right_at { right.to_owned() } else { format!("guess-{i}") };
                (source(i), Connect::new(Version::V4, &format!("c-{i}"), user, &pw))
            })
            .collect::<Vec<_>>()
    };
    let many =
        |i: usize| std::net::Ipv4Addr::new(127, 9, u8::try_from(i / 200).unwrap(), u8::try_from(1 + i % 200).unwrap());
    let bursts = [
        ("person, 40 addresses", guesses("victim-a", 40, 20, "the-right-one", &many)),
        (
            "person, one address",
            guesses("victim-b", 100, 50, "the-right-one", &|_| std::net::Ipv4Addr::new(127, 9, 9, 9)),
        ),
    ];
    let mut device = guesses("victim-dev", 40, 20, &device_secret, &|i| {
        std::net::Ipv4Addr::new(127, 9, 20, u8::try_from(1 + i).unwrap())
    });
    // A device must use its name as client id.
    for (_, c) in &mut device {
        c.client_id = "victim-dev".into();
    }
    let mut total_unchecked = 0u64;
    let throttled_before = metric(metrics, "mqseal_logins_throttled_total").await;
    for (what, attempts) in bursts.into_iter().chain([("device, 40 addresses", device)]) {
        let right_at = if attempts.len() == 100 { 50 } else { 20 };
        let codes = burst(port, &attempts).await;
        let checked = codes.iter().filter(|&&c| c == 4).count();
        let unchecked = codes.iter().filter(|&&c| c == 5).count();
        eprintln!("{what}: {} attempts, {checked} checked, {unchecked} refused unchecked", codes.len());
        // The broker takes the burst's CONNECTs in whatever order its
        // tasks run, so the right password may be one of the (at most 3)
        // attempts checked — it then counts among them. Sent back to back
        // it is otherwise refused unchecked, like every attempt past the
        // budget. A success clears the name's failures (throttle.rs), so
        // when the right password got one of the first three slots, up to
        // three more wrong guesses may follow it: at most 2 + 3 wrong ones,
        // and an attacker who holds the right password gains nothing.
        let right_checked = usize::from(codes[right_at] == 0);
        let budget = if right_checked == 1 { 2 + 3 } else { 3 };
        assert!(checked <= budget, "{what}: {checked} wrong guesses checked: {codes:?}");
        assert_eq!(checked + unchecked + right_checked, codes.len(), "{what}: {codes:?}");
        if right_checked == 0 {
            assert_eq!(codes[right_at], 5, "{what}: the right password was not refused as locked out");
            // And the burst locked the name: the right password alone,
            // right after, is refused too.
            let (source, connect) = &attempts[right_at];
            let (_, code) = Conn::connect_from(port, *source, connect).await.unwrap();
            assert_eq!(code, 5, "{what}: the right password, after the burst");
            total_unchecked += 1;
        }
        total_unchecked += u64::try_from(unchecked).unwrap();
    }
    let throttled = metric(metrics, "mqseal_logins_throttled_total").await - throttled_before;
    assert_eq!(throttled, total_unchecked, "every attempt refused unchecked is counted");
}

/// After `user_free_failures` wrong passwords the username is locked with
/// a growing delay; during the lockout even the right password is refused
/// (v5 0x97, 3.1.1 rc 5); afterwards it works again. The metric counts it.
#[tokio::test]
async fn repeated_failures_lock_the_username_even_for_the_right_password() {
    let metrics = free_port();
    let config = BrokerConfig { metrics_port: Some(metrics), base_delay_ms: 1500, ..BrokerConfig::default() };
    let site = Site::start(config).await;
    let port = site.port();
    let secret = site.device("dev-1").await;
    for _ in 0..4 {
        assert_eq!(connack(port, &login(Version::V5, "dev-1", "guess")).await, Some(0x86));
    }
    let locked_at = Instant::now();
    assert_eq!(connack(port, &login(Version::V5, "dev-1", &secret)).await, Some(0x97), "locked out");
    assert_eq!(connack(port, &login(Version::V4, "dev-1", &secret)).await, Some(5), "locked out (3.1.1)");
    assert!(metric(metrics, "mqseal_logins_throttled_total").await >= 2);
    assert!(metric(metrics, "mqseal_logins_refused_total").await >= 4);
    // Another user is not affected by dev-1's lockout.
    let other = site.device("dev-2").await;
    assert_eq!(connack(port, &login(Version::V4, "dev-2", &other)).await, Some(0));
    tokio::time::sleep((locked_at + Duration::from_millis(1700)).saturating_duration_since(Instant::now())).await;
    assert_eq!(connack(port, &login(Version::V5, "dev-1", &secret)).await, Some(0), "lock over");
    assert!(metric(metrics, "mqseal_logins_ok_total").await >= 2);
}

/// A device must use its username as client id; client ids that rumqttd
/// chokes on (`+ # / $`, NUL) are refused with "identifier rejected".
#[tokio::test]
async fn devices_must_use_their_own_id_and_ids_must_be_clean() {
    let site = Site::start(BrokerConfig::default()).await;
    let port = site.port();
    let secret = site.device("dev-1").await;
    assert_eq!(connack(port, &Connect::new(Version::V4, "dev-2", "dev-1", &secret)).await, Some(2));
    assert_eq!(connack(port, &Connect::new(Version::V5, "dev-2", "dev-1", &secret)).await, Some(0x85));
    for bad in ["a/b", "a+", "#", "$SYS", "nul\0"] {
        assert_eq!(connack(port, &Connect::new(Version::V4, bad, "dev-1", &secret)).await, Some(2), "{bad:?}");
    }
    assert_eq!(connack(port, &login(Version::V4, "dev-1", &secret)).await, Some(0));
}

/// Disabling or deleting a user refuses its next login and closes its live
/// sessions within a few seconds (v5 clients are told 0x98).
#[tokio::test]
async fn disabled_and_deleted_users_are_disconnected() {
    let site = Site::start(BrokerConfig::default()).await;
    let port = site.port();
    let a = site.device("dev-a").await;
    let b = site.device("dev-b").await;
    let mut conn_a = Conn::connected(port, &login(Version::V5, "dev-a", &a)).await;
    let mut conn_b = Conn::connected(port, &login(Version::V4, "dev-b", &b)).await;

    let store = site.users();
    let mut record = store.get("dev-a").await.unwrap().unwrap();
    record.disabled = true;
    store.put(&record, true).await.unwrap();
    assert!(store.delete("dev-b").await.unwrap());
    let changed = Instant::now();

    assert_eq!(connack(port, &login(Version::V5, "dev-a", &a)).await, Some(0x87), "disabled: refused at once");
    assert_eq!(connack(port, &login(Version::V4, "dev-b", &b)).await, Some(4), "deleted: refused at once");
    assert_eq!(conn_a.closed(T).await.unwrap(), Some(0x98), "administrative action");
    assert_eq!(conn_b.closed(T).await.unwrap(), None);
    assert!(changed.elapsed() < Duration::from_secs(5), "kicked after {:?}", changed.elapsed());
    let log = site.broker.log();
    assert!(log.contains("session closed by the broker"), "{log}");
}

/// Passwords over plain TCP on a non-loopback listener would cross the
/// network in clear: refused unless explicitly allowed.
#[tokio::test]
async fn password_logins_on_a_public_plain_listener_need_an_explicit_option() {
    let port = free_port();
    let site = Site::start(BrokerConfig { bind: format!("0.0.0.0:{port}"), ..BrokerConfig::default() }).await;
    let secret = site.device("dev-1").await;
    assert_eq!(connack(port, &login(Version::V4, "dev-1", &secret)).await, Some(5));
    assert_eq!(connack(port, &login(Version::V5, "dev-1", &secret)).await, Some(0x87));
    assert!(site.broker.log().contains("password login over plain TCP"));

    let port = free_port();
    let allowed = BrokerConfig {
        bind: format!("0.0.0.0:{port}"),
        allow_insecure_password_logins: true,
        ..BrokerConfig::default()
    };
    let site = Site::start(allowed).await;
    let secret = site.device("dev-1").await;
    assert_eq!(connack(port, &login(Version::V4, "dev-1", &secret)).await, Some(0));
}

/// A bad configuration file is refused with file, line and field, and the
/// process exits non-zero without listening.
#[tokio::test]
async fn bad_configuration_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("broker.toml");
    std::fs::write(&conf, "[listener]\nbind = \"127.0.0.1:1\"\n\n[limits]\nmax_conections = 5\n").unwrap();
    let (code, _, err) = tool(BIN, &["--config", conf.to_str().unwrap()]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("broker.toml:5:") && err.contains("max_conections"), "{err}");

    std::fs::write(&conf, "[limits]\nmax_packet_size = \"big\"\n").unwrap();
    let (code, _, err) = tool(BIN, &["--config", conf.to_str().unwrap()]).await;
    assert_eq!(code, 2);
    assert!(err.contains("broker.toml:2:") && err.contains("max_packet_size"), "{err}");

    let (code, _, err) = tool(BIN, &["--config", dir.path().join("missing.toml").to_str().unwrap()]).await;
    assert_eq!(code, 2);
    assert!(err.contains("missing.toml"), "{err}");

    let (code, _, err) = tool(BIN, &["--no-such-flag"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("Usage"), "{err}");
}

/// Flags beat environment variables, which beat the file.
#[tokio::test]
async fn flags_and_environment_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file_port = free_port();
    let flag_port = free_port();
    let config = BrokerConfig { bind: format!("127.0.0.1:{file_port}"), ..BrokerConfig::default() };
    let flag = format!("127.0.0.1:{flag_port}");
    let broker = BrokerProc::start_with_args(Path::new(BIN), dir.path(), config, &["--bind", &flag]).await.unwrap();
    assert!(broker.stdout.iter().any(|l| l.contains(&flag)), "{:?}", broker.stdout);
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", file_port)).await.is_err());
    drop(broker);

    let env_port = free_port();
    let mut child = tokio::process::Command::new(BIN)
        .env("MQSEAL_BROKER_BIND", format!("127.0.0.1:{env_port}"))
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    mqseal_tests::wait_for_port(env_port, T).await.unwrap();
    child.start_kill().unwrap();
}

/// paho-mqtt 2.x, MQTT 3.1.1 and 5: good and bad passwords, with the
/// return and reason codes paho reports.
#[tokio::test]
async fn paho_logins_on_both_protocol_versions() {
    let site = Site::start(BrokerConfig::default()).await;
    let secret = site.device("dev-1").await;
    let script = r#"
import sys, paho.mqtt.client as mqtt
port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
out = []
for proto in (mqtt.MQTTv311, mqtt.MQTTv5):
    codes = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=proto)
    c.username_pw_set(user, password)
    c.on_connect = lambda cl, ud, flags, rc, props=None: codes.append(rc.value)
    try:
        c.connect("127.0.0.1", port, 10)
        for _ in range(50):
            c.loop(0.1)
            if codes:
                break
    except Exception as e:
        codes.append(str(e))
    c.disconnect()
    out.append(str(codes[0]) if codes else "none")
print(" ".join(out))
"#;
    let py = mqseal_tests::python();
    let port = site.port().to_string();
    let (code, out, err) = tool(py.to_str().unwrap(), &["-c", script, &port, "dev-1", &secret]).await;
    assert_eq!((code, out.trim()), (0, "0 0"), "{err}");
    let (code, out, err) = tool(py.to_str().unwrap(), &["-c", script, &port, "dev-1", "wrong"]).await;
    // paho maps 3.1.1 rc 4 and v5 0x86 to the same ReasonCode value 134.
    assert_eq!((code, out.trim()), (0, "134 134"), "{err}");
}

/// The other side of the in-flight rule: logins that succeed are delayed
/// behind the checks in flight, never refused. 10 logins of one account at
/// once (parallel `mqseal send`s; PBKDF2 at 100,000 rounds) and 40 devices
/// logging in at once from one address (a fleet behind one NAT address,
/// above the 20 free failures per address) all get in.
#[tokio::test]
async fn concurrent_good_logins_are_delayed_not_refused() {
    let config = BrokerConfig {
        user_free_failures: 3,
        address_free_failures: 20,
        refusal_delay_ms: 300,
        ..BrokerConfig::default()
    };
    let site = Site::start(config).await;
    let port = site.port();
    let record = mqseal_store::UserRecord::human("ops", b"ops-password", Role::Controller, 100_000).unwrap();
    site.users().put(&record, false).await.unwrap();
    let one = std::net::Ipv4Addr::new(127, 9, 30, 1);
    let same_account: Vec<_> =
        (0..10).map(|i| (one, Connect::new(Version::V4, &format!("ops-{i}"), "ops", "ops-password"))).collect();
    let codes = burst(port, &same_account).await;
    assert!(codes.iter().all(|&c| c == 0), "one account, 10 at once: {codes:?}");
    let mut fleet = Vec::new();
    for i in 0..40 {
        let name = format!("nat-{i}");
        let secret = site.device(&name).await;
        fleet.push((std::net::Ipv4Addr::new(127, 9, 30, 2), Connect::new(Version::V4, &name, &name, &secret)));
    }
    let codes = burst(port, &fleet).await;
    assert!(codes.iter().all(|&c| c == 0), "40 devices from one address at once: {codes:?}");
}
