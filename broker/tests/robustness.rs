//! The rumqttd audit's listener-killing sequences, the idle-socket stall,
//! oversized and malformed packets, and limits — each against the running
//! broker, each followed by proof that everyone else is still served.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use mqseal_store::Role;
use mqseal_tests::broker::BrokerConfig;
use mqseal_tests::mqtt::{self, Conn, Connect, Version};

/// A fresh admin-less site with an admin-role user "root" (any topic).
async fn site_with_root(config: BrokerConfig) -> Site {
    let site = Site::start(config).await;
    site.human("root", "root-pw", Role::Admin, &[]).await;
    site
}

fn root(version: Version, client_id: &str) -> Connect {
    Connect::new(version, client_id, "root", "root-pw")
}

/// Proof of health: a brand-new publisher and subscriber round-trip.
async fn still_serving(port: u16, tag: &str) {
    let mut sub = Conn::connected(port, &root(Version::V4, &format!("check-sub-{tag}"))).await;
    sub.subscribe(&[("health/#", 1)]).await.unwrap();
    let mut publisher = Conn::connected(port, &root(Version::V5, &format!("check-pub-{tag}"))).await;
    round_trip(&mut publisher, &mut sub, &format!("health/{tag}"), tag.as_bytes()).await;
}

/// Audit case (a): a v5 publish with properties reaching a 3.1.1
/// subscriber panicked rumqttd's v4 writer, and the subscriber's reconnect
/// then poisoned the listener. Here the 3.1.1 subscriber gets the message
/// without properties, a v5 subscriber gets it with them, and the 3.1.1
/// client reconnects as often as it likes.
#[tokio::test]
async fn v5_properties_reach_a_v4_subscriber_stripped() {
    let site = site_with_root(BrokerConfig::default()).await;
    let port = site.port();
    let mut v4 = Conn::connected(port, &root(Version::V4, "old-client")).await;
    v4.subscribe(&[("mixed/#", 1)]).await.unwrap();
    let mut v5 = Conn::connected(port, &root(Version::V5, "new-client")).await;
    v5.subscribe(&[("mixed/#", 1)]).await.unwrap();
    let mut publisher = Conn::connected(port, &root(Version::V5, "publisher")).await;
    // User property, response topic, content type.
    let each =
        [mqtt::user_property("k", "v"), vec![0x08, 0, 3, b'r', b'/', b't'], vec![0x03, 0, 4, b't', b'e', b'x', b't']];
    let props = each.concat();
    for round in 0..3 {
        publisher.publish_with("mixed/t", b"with props", 1, false, &props).await.unwrap();
        let m = v4.next_message(T).await.unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        assert_eq!(m.payload, b"with props");
        assert!(m.properties.is_empty(), "3.1.1 has no properties");
        let m = v5.next_message(T).await.unwrap();
        // Intact, though re-encoded in the broker's own property order.
        assert_eq!(m.properties.len(), props.len(), "{:?}", m.properties);
        for p in &each {
            assert!(m.properties.windows(p.len()).any(|w| w == p.as_slice()), "{p:?} missing from {:?}", m.properties);
        }
        v4.disconnect().await;
        v4 = Conn::connected(port, &root(Version::V4, "old-client")).await;
        v4.subscribe(&[("mixed/#", 1)]).await.unwrap();
    }
    still_serving(port, "a").await;
}

/// Audit case (b): the same invalid client id connecting twice panicked a
/// listener task with a lock held. Here both attempts get CONNACK
/// "identifier rejected" and nothing else changes.
#[tokio::test]
async fn the_same_bad_client_id_twice_is_refused_twice() {
    let site = site_with_root(BrokerConfig::default()).await;
    let port = site.port();
    for version in [Version::V4, Version::V5, Version::V4, Version::V5] {
        for bad in ["bad/id", "bad+id", "#", "$bad"] {
            let code = connack(port, &root(version, bad)).await;
            assert_eq!(code, Some(if version == Version::V4 { 2 } else { 0x85 }), "{version:?} {bad}");
        }
    }
    still_serving(port, "b").await;
}

/// Audit case (c): reaching rumqttd's max_connections and retrying with the
/// same id bricked the listener. The front's limit sits below the router's:
/// over it, clients are told "server unavailable" (3.1.1) / "quota
/// exceeded" (v5), retries are told again, and once a slot frees up the
/// same ids connect normally.
#[tokio::test]
async fn the_connection_limit_refuses_politely_and_recovers() {
    let site = site_with_root(BrokerConfig { max_connections: 3, ..BrokerConfig::default() }).await;
    let port = site.port();
    let mut holders = Vec::new();
    for i in 0..3 {
        holders.push(Conn::connected(port, &root(Version::V4, &format!("holder-{i}"))).await);
    }
    for _ in 0..3 {
        assert_eq!(connack(port, &root(Version::V4, "client-b")).await, Some(3));
        assert_eq!(connack(port, &root(Version::V5, "client-b")).await, Some(0x97));
    }
    holders.pop().unwrap().disconnect().await;
    // The slot is released when the holder's task ends; the same id that
    // was refused three times now gets in, and works (a round trip to itself).
    let deadline = Instant::now() + T;
    let mut b = loop {
        match Conn::connect(port, &root(Version::V4, "client-b")).await {
            Ok((conn, 0)) => break conn,
            other => assert!(Instant::now() < deadline, "a freed slot stays unusable: {:?}", other.map(|(_, c)| c)),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    b.subscribe(&[("limit/#", 1)]).await.unwrap();
    b.publish("limit/self", b"me", 1, false).await.unwrap();
    assert_eq!(b.next_message(T).await.unwrap().payload, b"me");
    assert!(site.broker.log().contains("connection limit reached"));
}

/// rumqttd's TLS and websocket listeners handshake inline: one idle TCP
/// socket stalls every later client. Here idle sockets on the plain, TLS
/// and WebSocket listeners cost nobody anything and are closed at the
/// connect timeout.
#[tokio::test]
async fn idle_sockets_stall_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let certs = mqseal_broker::tls::generate(&dir.path().join("tls"), &[]).unwrap();
    let tls_port = mqseal_tests::free_port();
    let ws_port = mqseal_tests::free_port();
    let config = BrokerConfig {
        tls: Some((tls_port, certs.server_cert.clone(), certs.server_key.clone())),
        websocket: Some((ws_port, false)),
        connect_timeout_ms: 4000,
        ..BrokerConfig::default()
    };
    let site = site_with_root(config).await;
    let port = site.port();
    let mut idle = Vec::new();
    for p in [port, tls_port, ws_port, port, tls_port, ws_port] {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", p)).await.unwrap());
    }
    let started = Instant::now();
    let (code, err) = {
        let ca = certs.ca_cert.to_str().unwrap().to_owned();
        let tls = tls_port.to_string();
        let (code, _, err) = tool(
            "mosquitto_pub",
            &[
                "-h",
                "localhost",
                "-p",
                &tls,
                "--cafile",
                &ca,
                "-u",
                "root",
                "-P",
                "root-pw",
                "-t",
                "x",
                "-m",
                "y",
                "-q",
                "1",
            ],
        )
        .await;
        (code, err)
    };
    assert_eq!(code, 0, "TLS client during idle sockets: {err}");
    still_serving(port, "idle").await;
    // A stalled listener would hold these clients until the idle sockets
    // are closed at the 4 s connect timeout.
    assert!(started.elapsed() < Duration::from_secs(3), "served in {:?} despite idle sockets", started.elapsed());
    // And the idle ones are closed once the connect timeout passes.
    for mut s in idle {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(T, tokio::io::AsyncReadExt::read(&mut s, &mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "idle socket still open: {read:?}");
    }
}

/// A packet over `max_packet_size` is refused from its fixed header alone:
/// v5 clients learn the limit in CONNACK and get DISCONNECT 0x95; nobody
/// else notices.
#[tokio::test]
async fn oversized_packets_are_refused_without_harming_others() {
    let site = site_with_root(BrokerConfig { max_packet_size: 4096, ..BrokerConfig::default() }).await;
    let port = site.port();
    let mut sub = Conn::connected(port, &root(Version::V4, "bystander")).await;
    sub.subscribe(&[("big/#", 1)]).await.unwrap();

    // CONNACK carries Maximum Packet Size (0x27) = 4096.
    let mut raw = Conn::open(port, Version::V5).await.unwrap();
    raw.send(&root(Version::V5, "big-v5").encode()).await.unwrap();
    let connack = raw.recv(T).await.unwrap();
    assert!(connack.body.windows(5).any(|w| w == [0x27, 0, 0, 0x10, 0]), "{connack:?}");
    raw.send(&mqtt::publish(Version::V5, "big/t", &[7u8; 8192], 1, 1, false, &[])).await.unwrap();
    assert_eq!(raw.closed(T).await.unwrap(), Some(0x95));

    let mut v4 = Conn::connected(port, &root(Version::V4, "big-v4")).await;
    v4.send(&mqtt::publish(Version::V4, "big/t", &[7u8; 8192], 0, 0, false, &[])).await.unwrap();
    assert_eq!(v4.closed(T).await.unwrap(), None);

    // Just under the limit is fine.
    let mut ok = Conn::connected(port, &root(Version::V5, "fits")).await;
    ok.publish("big/t", &[1u8; 4000], 1, false).await.unwrap();
    assert_eq!(sub.next_message(T).await.unwrap().payload.len(), 4000);
    still_serving(port, "size").await;
}

/// A v5 client's own Maximum Packet Size (a microcontroller's receive
/// buffer) is honoured: a larger message is discarded for that client, at
/// QoS 0 and 1 alike, without closing its connection; the router treats a
/// discarded QoS 1 message as delivered (nothing is redelivered), smaller
/// messages keep flowing, and other subscribers get everything.
#[tokio::test]
async fn a_clients_maximum_packet_size_is_honoured() {
    let metrics = mqseal_tests::free_port();
    let site = site_with_root(BrokerConfig { metrics_port: Some(metrics), ..BrokerConfig::default() }).await;
    let port = site.port();
    let mut small = root(Version::V5, "small-buffer");
    small.properties = vec![0x27, 0, 0, 0x01, 0x00]; // Maximum Packet Size 256
    let mut small = Conn::connected(port, &small).await;
    small.subscribe(&[("mps/#", 1)]).await.unwrap();
    let mut big = Conn::connected(port, &root(Version::V5, "big-buffer")).await;
    big.subscribe(&[("mps/#", 1)]).await.unwrap();
    let mut publisher = Conn::connected(port, &root(Version::V5, "publisher")).await;

    for qos in [0u8, 1] {
        publisher.publish("mps/t", &[9u8; 300], qos, false).await.unwrap();
        publisher.publish("mps/t", &[qos; 100], qos, false).await.unwrap();
        assert_eq!(big.next_message(T).await.unwrap().payload.len(), 300, "qos {qos}");
        assert_eq!(big.next_message(T).await.unwrap().payload, vec![qos; 100]);
        // The small client skips the 300-byte message and gets the next one.
        let m = small.next_message(T).await.unwrap();
        assert_eq!(m.payload, vec![qos; 100], "qos {qos}: only the message that fits arrives");
    }
    // Nothing was held back for redelivery, and the connection is alive.
    assert!(small.next_message(Duration::from_millis(500)).await.is_err(), "no late redelivery");
    publisher.publish("mps/t", b"still here", 1, false).await.unwrap();
    assert_eq!(small.next_message(T).await.unwrap().payload, b"still here");
    assert_eq!(metric(metrics, "mqseal_messages_discarded_too_large_total").await, 2);
}

/// Protocol violations close that one connection (v5: with a reason code):
/// garbage instead of CONNECT, a second CONNECT, reserved flag bits, a
/// server-only packet type, a wildcard in a PUBLISH topic, half a packet.
#[tokio::test]
async fn malformed_packets_close_only_their_connection() {
    let mut site = site_with_root(BrokerConfig { connect_timeout_ms: 1500, ..BrokerConfig::default() }).await;
    let port = site.port();
    let mut bystander = Conn::connected(port, &root(Version::V5, "bystander")).await;
    bystander.subscribe(&[("ok/#", 1)]).await.unwrap();

    let mut garbage = Conn::open(port, Version::V4).await.unwrap();
    garbage.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(garbage.closed(T).await.unwrap(), None);

    let cases: Vec<(&str, Vec<u8>, Option<u8>)> = vec![
        ("second CONNECT", root(Version::V5, "x").encode(), Some(0x82)),
        ("reserved flags on SUBSCRIBE", vec![0x80, 0x02, 0x00, 0x01], Some(0x81)),
        ("CONNACK from a client", vec![0x20, 0x02, 0x00, 0x00], Some(0x81)),
        ("wildcard topic name", mqtt::publish(Version::V5, "ok/#", b"x", 1, 1, false, &[]), Some(0x90)),
        ("QoS 3", vec![0x36, 0x00], Some(0x81)),
        // MQTT-3.3.1-2 (the outside attack's D2): a QoS 0 message is never a redelivery.
        (
            "DUP on a QoS 0 PUBLISH",
            {
                let mut p = mqtt::publish(Version::V5, "ok/dup", b"x", 0, 0, false, &[]);
                p[0] |= 0x08;
                p
            },
            Some(0x81),
        ),
    ];
    for (what, bytes, reason) in cases {
        let mut c = Conn::connected(port, &root(Version::V5, "violator")).await;
        c.send(&bytes).await.unwrap();
        assert_eq!(c.closed(T).await.unwrap(), reason, "{what}");
    }
    // Half a packet, then silence: closed at the keep-alive, not a hang.
    let mut half = root(Version::V4, "half");
    half.keep_alive = 1;
    let mut c = Conn::connected(port, &half).await;
    c.send(&[0x30, 0x10, 0x00]).await.unwrap();
    assert_eq!(c.closed(T).await.unwrap(), None);

    // The same on 3.1.1, which has no reason codes: the connection closes.
    let mut c = Conn::connected(port, &root(Version::V4, "violator-v4")).await;
    let mut dup = mqtt::publish(Version::V4, "ok/dup", b"x", 0, 0, false, &[]);
    dup[0] |= 0x08;
    c.send(&dup).await.unwrap();
    assert_eq!(c.closed(T).await.unwrap(), None, "DUP on QoS 0, 3.1.1");

    let mut publisher = Conn::connected(port, &root(Version::V4, "publisher")).await;
    round_trip(&mut publisher, &mut bystander, "ok/fine", b"fine").await;
    assert!(bystander.next_message(Duration::from_millis(300)).await.is_err(), "a DUP QoS 0 message was routed");
    assert!(site.broker.is_running());
    let log = site.broker.log();
    assert!(log.contains("protocol error") || log.contains("refused before CONNECT"), "{log}");
    assert!(log.contains("DUP flag set on a QoS 0 PUBLISH"), "{log}");
}

/// The outside attack's D2: a CONNECT with the reserved flag bit set was
/// accepted. MQTT-3.1.2-3 says disconnect: 3.1.1 clients are closed without
/// a CONNACK, v5 clients get CONNACK 0x81 (malformed packet). The other
/// flag rules the parser did not check are enforced the same way — a will
/// QoS of 3, will QoS or retain without a will, and (3.1.1) a password
/// without a user name — and each refusal is logged and counted.
#[tokio::test]
async fn connect_flags_that_break_the_rules_are_refused() {
    let metrics = mqseal_tests::free_port();
    let site = site_with_root(BrokerConfig { metrics_port: Some(metrics), ..BrokerConfig::default() }).await;
    let port = site.port();
    // The flags byte of an encoded CONNECT: fixed header (2 bytes for these
    // short packets), protocol name (6), level (1).
    const FLAGS: usize = 2 + 6 + 1;
    let cases: [(&str, u8, u8); 4] = [
        ("reserved CONNECT flag set", 0b0000_0001, 0),
        ("will QoS or will retain set without a will", 0b0000_1000, 0),
        ("will QoS or will retain set without a will", 0b0010_0000, 0),
        ("password flag set without a user name", 0, 0b1000_0000),
    ];
    let before = metric(metrics, "mqseal_protocol_errors_total").await;
    let mut refused = 0;
    for (why, set, clear) in cases {
        for version in [Version::V4, Version::V5] {
            if why.starts_with("password") && version == Version::V5 {
                continue; // MQTT 5 allows a password without a user name.
            }
            let mut bytes = root(version, "flags").encode();
            bytes[FLAGS] = (bytes[FLAGS] | set) & !clear;
            let mut c = Conn::open(port, version).await.unwrap();
            c.send(&bytes).await.unwrap();
            let answer = c.recv(T).await;
            match version {
                Version::V4 => assert!(answer.is_err(), "{why}, 3.1.1: {answer:?}"),
                Version::V5 => {
                    let p = answer.unwrap();
                    assert_eq!((p.kind(), p.body[1]), (2, 0x81), "{why}, v5: CONNACK 0x81");
                    assert_eq!(c.closed(T).await.unwrap(), None, "{why}: closed after the CONNACK");
                }
            }
            refused += 1;
        }
        assert!(site.broker.log().contains(why), "{why} not logged");
    }
    // Will QoS 3 needs a will to be expressible.
    let mut will = root(Version::V5, "flags");
    will.will =
        Some(mqtt::Will { topic: "w/t".into(), payload: b"x".to_vec(), qos: 1, retain: false, properties: Vec::new() });
    let mut bytes = will.encode();
    bytes[FLAGS] |= 0b0001_1000;
    let mut c = Conn::open(port, Version::V5).await.unwrap();
    c.send(&bytes).await.unwrap();
    assert_eq!(c.recv(T).await.unwrap().body[1], 0x81, "will QoS 3");
    refused += 1;
    assert_eq!(metric(metrics, "mqseal_protocol_errors_total").await - before, refused);
    // The same CONNECT with its flags intact logs in.
    assert_eq!(connack(port, &root(Version::V4, "flags")).await, Some(0));
    still_serving(port, "flags").await;
}

/// The outside attack's I1: with `max_connections = 50`, one client
/// re-opening idle sockets as the connect deadline closed them let only 5
/// of 30 device logins through in 12 s. Logins in progress now hold at most
/// a share of the slots (25 % by default), and under pressure one address
/// gets at most its cap of them (here half the share: 6): devices from
/// another address all log in while the attacker keeps trying, and the
/// refusals are counted.
#[tokio::test]
async fn one_address_holding_idle_sockets_does_not_keep_devices_out() {
    let metrics = mqseal_tests::free_port();
    let config = BrokerConfig {
        max_connections: 50,
        connect_timeout_ms: 3000,
        metrics_port: Some(metrics),
        ..BrokerConfig::default()
    };
    let site = site_with_root(config).await;
    let port = site.port();
    let mut secrets = Vec::new();
    for i in 0..30 {
        secrets.push(site.device(&format!("dev-{i}")).await);
    }
    // The attacker: idle sockets from 127.0.0.1, re-opened whenever one is
    // closed, as many as the broker takes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attack = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut held: Vec<tokio::net::TcpStream> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Drop the ones the broker closed.
                let mut open = Vec::new();
                for s in held.drain(..) {
                    let mut byte = [0u8; 1];
                    match s.try_read(&mut byte) {
                        Ok(0) => {}
                        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {}
                        _ => open.push(s),
                    }
                }
                held = open;
                while held.len() < 100 {
                    match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        Ok(s) => held.push(s),
                        Err(_) => break,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let mut devices = Vec::new();
    for (i, secret) in secrets.iter().enumerate() {
        let name = format!("dev-{i}");
        let c = Connect::new(Version::V4, &name, &name, secret);
        let deadline = Instant::now() + T;
        let conn = loop {
            // Refused only while the share is full: retry as a device would.
            match Conn::connect_from(port, std::net::Ipv4Addr::new(127, 0, 0, 2), &c).await {
                Ok((conn, 0)) => break conn,
                other => assert!(Instant::now() < deadline, "{name} kept out: {:?}", other.map(|(_, code)| code)),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        devices.push(conn);
    }
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    attack.await.unwrap();
    eprintln!("30 device logins next to the idle-socket attacker in {took:?}");
    assert!(took < Duration::from_secs(12), "30 device logins took {took:?}");
    assert!(metric(metrics, "mqseal_connections_refused_address_total").await > 0, "the attacker was never capped");
    assert!(site.broker.log().contains("max_pending_logins_per_address"));
    // The logged-in devices still work.
    let mut first = devices.remove(0);
    first.subscribe(&[(&topic("dev-0", "cmd"), 1)]).await.unwrap();
}

/// Keep-alive 0 is legal MQTT (rumqttd refuses it); keep-alive expiry
/// closes the session after 1.5 × the interval and fires the will.
#[tokio::test]
async fn keep_alive_zero_is_accepted_and_expiry_fires_the_will() {
    let site = site_with_root(BrokerConfig::default()).await;
    let port = site.port();
    let mut forever = root(Version::V4, "no-keepalive");
    forever.keep_alive = 0;
    let mut quiet = Conn::connected(port, &forever).await;

    let mut watcher = Conn::connected(port, &root(Version::V5, "watcher")).await;
    watcher.subscribe(&[("wills/#", 1)]).await.unwrap();
    let mut short = root(Version::V4, "short");
    short.keep_alive = 1;
    short.will = Some(mqtt::Will {
        topic: "wills/short".into(),
        payload: b"expired".to_vec(),
        qos: 1,
        retain: false,
        properties: Vec::new(),
    });
    let _silent = Conn::connected(port, &short).await;
    let started = Instant::now();
    let will = watcher.next_message(T).await.unwrap();
    assert_eq!(will.payload, b"expired");
    assert!(started.elapsed() >= Duration::from_millis(1400), "expired after {:?}", started.elapsed());
    // The keep-alive-0 client is still there after the other expired.
    assert_eq!(quiet.publish("wills/quiet", b"alive", 1, false).await.unwrap(), 0);
}

/// SIGTERM: v5 clients are told "server shutting down" (0x8B), the process
/// exits 0.
#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let site = site_with_root(BrokerConfig::default()).await;
    let port = site.port();
    let mut v5 = Conn::connected(port, &root(Version::V5, "listener")).await;
    let mut v4 = Conn::connected(port, &root(Version::V4, "listener-4")).await;
    let Site { broker, dir: _dir } = site;
    let status = broker.terminate(T).await.unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(v5.closed(T).await.unwrap(), Some(0x8b));
    assert_eq!(v4.closed(T).await.unwrap(), None);
}

/// A flood of password guesses for names that do not exist (each one costs
/// a decoy PBKDF2) from many connections at once: hashing leaves a core to
/// routing, which goes on meanwhile for connected devices, every guess is
/// refused, and a login that cannot be decided within
/// `limits.login_timeout_ms` is told "server unavailable" instead of waiting.
#[tokio::test]
async fn a_login_flood_does_not_starve_routing() {
    let config = BrokerConfig { pbkdf2_iterations: 200_000, login_timeout_ms: 1000, ..BrokerConfig::default() };
    let site = site_with_root(config).await;
    let port = site.port();
    let mut sub = Conn::connected(port, &root(Version::V4, "during-flood-sub")).await;
    sub.subscribe(&[("flood/#", 1)]).await.unwrap();
    let mut publisher = Conn::connected(port, &root(Version::V5, "during-flood-pub")).await;

    let flood: Vec<_> = (0..60)
        .map(|i| {
            tokio::spawn(async move {
                connack(port, &Connect::new(Version::V4, &format!("g{i}"), &format!("ghost-{i}"), "guess")).await
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        let started = Instant::now();
        round_trip(&mut publisher, &mut sub, "flood/t", format!("m{i}").as_bytes()).await;
        worst = worst.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut codes = Vec::new();
    for f in flood {
        codes.push(f.await.unwrap());
    }
    assert!(worst < Duration::from_millis(500), "a round trip took {worst:?} during the flood");
    assert!(codes.iter().all(|c| matches!(c, Some(4) | Some(3))), "{codes:?}");
    assert!(codes.contains(&Some(3)), "the hashing queue outlasted login_timeout_ms for some: {codes:?}");
    assert!(codes.contains(&Some(4)), "{codes:?}");
}

/// A client may send SUBSCRIBE and PUBLISH right behind CONNECT, in the
/// same segment, without waiting for the CONNACK (paho over TLS often
/// does). Everything in that first read is served, not left waiting for a
/// next read that never comes.
#[tokio::test]
async fn packets_pipelined_behind_connect_are_served() {
    let site = site_with_root(BrokerConfig::default()).await;
    let mut c = Conn::open(site.port(), Version::V5).await.unwrap();
    let burst = [
        root(Version::V5, "eager").encode(),
        mqtt::subscribe(Version::V5, 1, &[("eager/#", 1)]),
        mqtt::publish(Version::V5, "eager/t", b"right away", 1, 2, false, &[]),
    ]
    .concat();
    c.send(&burst).await.unwrap();
    let mut kinds = Vec::new();
    let mut payload = None;
    while kinds.len() < 4 {
        let p = c.recv(T).await.unwrap_or_else(|e| panic!("after {kinds:?}: {e:?}"));
        if p.kind() == 3 {
            payload = Some(p.body.clone());
        }
        kinds.push(p.kind());
    }
    kinds.sort_unstable();
    assert_eq!(kinds, vec![2, 3, 4, 9], "CONNACK, PUBLISH, PUBACK, SUBACK");
    assert!(payload.unwrap().ends_with(b"right away"));
}
