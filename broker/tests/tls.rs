//! TLS: `gen-cert`, the TLS listener with mosquitto's and paho's clients to
//! `localhost` and to `127.0.0.1`, and certificate problems found at start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use mqseal_store::Role;
use mqseal_tests::broker::{BrokerConfig, BrokerProc};
use mqseal_tests::free_port;

struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

async fn gen_cert(dir: &Path) -> Certs {
    let out = dir.join("tls");
    let (code, stdout, err) =
        tool(BIN, &["gen-cert", "--dir", out.to_str().unwrap(), "--name", "broker.example"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("ca.pem"), "{stdout}");
    Certs { ca: out.join("ca.pem"), cert: out.join("server.pem"), key: out.join("server.key") }
}

/// mosquitto_pub/sub with `--cafile` to `localhost` and to `127.0.0.1`
/// (mosquitto sends an IP address as SNI, which rumqttd's rustls 0.22
/// refused), and paho-mqtt over TLS; plain MQTT on the TLS port fails.
#[tokio::test]
async fn tls_clients_connect_by_name_and_by_address() {
    let dir = tempfile::tempdir().unwrap();
    let certs = gen_cert(dir.path()).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&certs.key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let tls_port = free_port();
    let config =
        BrokerConfig { tls: Some((tls_port, certs.cert.clone(), certs.key.clone())), ..BrokerConfig::default() };
    let site = Site::start_in(dir, config).await;
    site.human("ops", "ops-pw", Role::Controller, &["*"]).await;
    let secret = site.device("dev-1").await;
    assert!(site.broker.stdout.iter().any(|l| l.contains(&format!("mqtts://127.0.0.1:{tls_port}"))));

    let port = tls_port.to_string();
    let ca = certs.ca.to_str().unwrap();
    let status = topic("dev-1", "status");
    for host in ["localhost", "127.0.0.1"] {
        for version in ["mqttv311", "mqttv5"] {
            let (code, _, err) = tool(
                "mosquitto_pub",
                &[
                    "-h", host, "-p", &port, "--cafile", ca, "-V", version, "-i", "dev-1", "-u", "dev-1", "-P",
                    &secret, "-t", &status, "-m", "online", "-r", "-q", "1",
                ],
            )
            .await;
            assert_eq!(code, 0, "{host} {version}: {err}");
        }
        let (code, out, err) = tool(
            "mosquitto_sub",
            &[
                "-h", host, "-p", &port, "--cafile", ca, "-u", "ops", "-P", "ops-pw", "-t", &status, "-C", "1", "-W",
                "5",
            ],
        )
        .await;
        assert_eq!((code, out.trim()), (0, "online"), "{host}: {err}");
    }
    // Without the CA the certificate is not trusted.
    let (code, _, _) =
        tool("mosquitto_pub", &["-h", "localhost", "-p", &port, "-u", "ops", "-P", "ops-pw", "-t", "x", "-m", "y"])
            .await;
    assert_ne!(code, 0);
    // paho-mqtt (Python's ssl module) to 127.0.0.1.
    let script = r#"
import ssl, sys, paho.mqtt.client as mqtt
port, ca = int(sys.argv[1]), sys.argv[2]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-tls", protocol=mqtt.MQTTv5)
c.username_pw_set("ops", "ops-pw")
c.tls_set(ca_certs=ca)
rc = c.connect("127.0.0.1", port, 10)
got = []
c.on_message = lambda cl, ud, m: got.append(m.payload.decode())
c.subscribe(sys.argv[3], 1)
import time
end = time.time() + 10
while not got and time.time() < end:
    c.loop(0.2)
print(got[0] if got else "nothing")
"#;
    let py = mqseal_tests::python();
    let (code, out, err) = tool(py.to_str().unwrap(), &["-c", script, &port, ca, &status]).await;
    assert_eq!((code, out.trim()), (0, "online"), "{err}");
    // Plain MQTT on the TLS port is not MQTT to it.
    assert_eq!(connack(tls_port, &login(mqseal_tests::mqtt::Version::V4, "dev-1", &secret)).await, None);
}

/// A certificate problem stops the start with the path in the message,
/// instead of failing the first client.
#[tokio::test]
async fn certificate_problems_fail_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let certs = gen_cert(dir.path()).await;
    let other = gen_cert(&dir.path().join("other")).await;
    let bin = Path::new(BIN);
    let cases = [
        (dir.path().join("nope.pem"), certs.key.clone(), "nope.pem"),
        (certs.cert.clone(), dir.path().join("nokey.pem"), "nokey.pem"),
        (certs.cert.clone(), other.key.clone(), "server.pem"),
        (certs.ca.clone(), certs.ca.clone(), "ca.pem"),
    ];
    for (cert, key, named) in cases {
        let config = BrokerConfig { tls: Some((free_port(), cert, key)), ..BrokerConfig::default() };
        let failure = BrokerProc::start(bin, dir.path(), config).await.err().expect("start must fail");
        assert!(failure.status.is_some_and(|s| !s.success()), "{failure:?}");
        assert!(failure.stderr.contains(named), "{named}: {}", failure.stderr);
    }
}

/// MQTT over WebSockets, plain and over TLS, with paho-mqtt (MQTT 3.1.1
/// and 5): logins with the right codes, and messages crossing between a
/// WebSocket client and a TCP client in both directions.
#[tokio::test]
async fn websocket_clients_talk_to_tcp_clients() {
    let dir = tempfile::tempdir().unwrap();
    let certs = gen_cert(dir.path()).await;
    let (ws_port, wss_port, tls_port) = (free_port(), free_port(), free_port());
    // Two brokers: one with ws://, one with wss:// (one [websocket] each).
    let ws_site = Site::start(BrokerConfig { websocket: Some((ws_port, false)), ..BrokerConfig::default() }).await;
    let wss_config = BrokerConfig {
        tls: Some((tls_port, certs.cert.clone(), certs.key.clone())),
        websocket: Some((wss_port, true)),
        ..BrokerConfig::default()
    };
    let wss_site = Site::start_in(dir, wss_config).await;
    assert!(ws_site.broker.stdout.iter().any(|l| l.contains(&format!("ws://127.0.0.1:{ws_port}"))));
    assert!(wss_site.broker.stdout.iter().any(|l| l.contains(&format!("wss://127.0.0.1:{wss_port}"))));

    let script = r#"
import ssl, sys, time, paho.mqtt.client as mqtt
port, ca, user, password, sub_topic, pub_topic = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
out = []
for proto in (mqtt.MQTTv311, mqtt.MQTTv5):
    codes, got = [], []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=proto, transport="websockets")
    c.username_pw_set(user, password)
    if ca != "-":
        c.tls_set(ca_certs=ca)
    c.on_connect = lambda cl, ud, flags, rc, props=None: codes.append(rc.value)
    c.on_message = lambda cl, ud, m: got.append(m.payload.decode())
    c.connect("127.0.0.1", port, 10)
    end = time.time() + 10
    while not codes and time.time() < end:
        c.loop(0.1)
    if codes and codes[0] == 0:
        c.subscribe(sub_topic, 1)
        for _ in range(5):
            c.loop(0.1)
        print("subscribed", flush=True)
        c.publish(pub_topic, "from-ws-%d" % proto, qos=1)
        end = time.time() + 10
        while not got and time.time() < end:
            c.loop(0.1)
    c.disconnect()
    out.append("%s:%s" % (codes[0] if codes else "none", got[0] if got else "-"))
print(" ".join(out), flush=True)
"#;
    let py = mqseal_tests::python();
    for (site, port, ca) in
        [(&ws_site, ws_port, "-".to_owned()), (&wss_site, wss_port, certs.ca.to_str().unwrap().to_owned())]
    {
        let secret = site.device("dev-1").await;
        site.human("ops", "ops-pw", Role::Controller, &["dev-1"]).await;
        let tcp = site.port();
        // A TCP controller answers every status message with a command.
        let mut ops = mqseal_tests::mqtt::Conn::connected(
            tcp,
            &mqseal_tests::mqtt::Connect::new(mqseal_tests::mqtt::Version::V4, "ops-1", "ops", "ops-pw"),
        )
        .await;
        ops.subscribe(&[(&topic("dev-1", "status"), 1)]).await.unwrap();
        let child = tokio::process::Command::new(&py)
            .args([
                "-c",
                script,
                &port.to_string(),
                &ca,
                "dev-1",
                &secret,
                &topic("dev-1", "cmd"),
                &topic("dev-1", "status"),
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        for version in [4, 5] {
            let m = ops.next_message(T).await.unwrap();
            assert_eq!(m.payload, format!("from-ws-{version}").as_bytes());
            ops.publish(&topic("dev-1", "cmd"), b"to-ws", 1, false).await.unwrap();
        }
        let out = tokio::time::timeout(T, child.wait_with_output()).await.unwrap().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().last(), Some("0:to-ws 0:to-ws"), "port {port}");
        let (code, out, err) =
            tool(py.to_str().unwrap(), &["-c", script, &port.to_string(), &ca, "dev-1", "wrong", "a", "b"]).await;
        assert_eq!((code, out.trim()), (0, "134:- 134:-"), "{err}");
    }
}
