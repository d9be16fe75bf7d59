//! Persistence against the real broker process and its real redb file:
//! retained messages and persistent sessions survive `kill -9` and a clean
//! stop; in durable mode nothing acknowledged is lost by a crash; a
//! damaged or newer-format store stops the start with an error naming the
//! file, and nothing panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Site, T};
use mqseal_store::{CredentialStore, Role, UserRecord};
use mqseal_tests::broker::{BrokerConfig, BrokerProc};
use mqseal_tests::free_port;
use mqseal_tests::mqtt::{Conn, Connect, RecvError, Version, frame};

const PW: &str = "correct horse battery staple";

async fn site(config: BrokerConfig) -> Site {
    let site = Site::start(config).await;
    for name in ["alice", "bob"] {
        site.human(name, PW, Role::Admin, &[]).await;
    }
    site
}

/// Kills the broker with SIGKILL and starts it again on the same data.
async fn crash_and_restart(site: Site) -> Site {
    let Site { mut broker, dir } = site;
    broker.kill().await;
    let config = broker_config(&broker);
    drop(broker);
    let _ = std::fs::rename(dir.path().join("broker.log"), dir.path().join("broker.log.crashed"));
    Site::start_in(dir, config).await
}

/// Stops the broker with SIGTERM and starts it again on the same data.
async fn stop_and_restart(site: Site) -> Site {
    let Site { broker, dir } = site;
    let config = broker_config(&broker);
    let status = broker.terminate(T).await.unwrap();
    assert!(status.success(), "{status:?}");
    Site::start_in(dir, config).await
}

fn broker_config(broker: &BrokerProc) -> BrokerConfig {
    // The same port is free again once the process is gone.
    broker.config.clone()
}

fn store_file(site: &Site) -> PathBuf {
    site.dir.path().join("data").join("router.redb")
}

/// A 3.1.1 CONNECT without clean-session: the agent's kind of session.
fn persistent(user: &str, id: &str) -> Connect {
    let mut c = Connect::new(Version::V4, id, user, PW);
    c.clean = false;
    c
}

async fn connect(port: u16, c: &Connect) -> (Conn, bool) {
    let mut conn = Conn::open(port, c.version).await.unwrap();
    conn.send(&c.encode()).await.unwrap();
    let connack = conn.recv(T).await.unwrap();
    assert_eq!(connack.kind(), 2, "{connack:?}");
    assert_eq!(connack.body.get(1), Some(&0), "refused: {connack:?}");
    (conn, connack.body.first() == Some(&1))
}

/// The next PUBLISH as (payload, pkid, dup), not acknowledged.
async fn next_publish(conn: &mut Conn, timeout: Duration) -> Result<(Vec<u8>, u16, bool), RecvError> {
    common::next_publish(conn, timeout).await.map(|(_, payload, _, pkid, dup)| (payload, pkid, dup))
}

async fn puback(conn: &mut Conn, pkid: u16) {
    conn.send(&frame(0x40, &pkid.to_be_bytes())).await.unwrap();
}

/// A device's persistent session, subscribed to its commands and then
/// gone (its socket dropped).
async fn offline_device(port: u16, id: &str) {
    let (mut dev, _) = connect(port, &persistent("bob", id)).await;
    assert_eq!(dev.subscribe(&[(&format!("cmd/{id}"), 1)]).await.unwrap(), vec![1]);
}

#[tokio::test]
async fn retained_status_survives_kill_9() {
    let site = site(BrokerConfig::default()).await;
    let (mut p, _) = connect(site.port(), &Connect::new(Version::V4, "p", "alice", PW)).await;
    p.publish("status/dev-1", b"online", 1, true).await.unwrap();
    p.publish("status/dev-2", b"gone", 1, true).await.unwrap();
    // An empty retained publish clears: that must survive too.
    p.publish("status/dev-2", b"", 1, true).await.unwrap();

    let site = crash_and_restart(site).await;
    let (mut s, _) = connect(site.port(), &Connect::new(Version::V4, "s", "alice", PW)).await;
    s.subscribe(&[("status/#", 1)]).await.unwrap();
    let m = s.next_message(T).await.unwrap();
    assert_eq!((m.topic.as_str(), m.payload.as_slice(), m.retain), ("status/dev-1", &b"online"[..], true));
    assert_eq!(s.next_message(Duration::from_millis(500)).await.unwrap_err(), RecvError::Timeout);
    assert!(site.broker.log().contains("persistence store loaded"), "{}", site.broker.log());
}

#[tokio::test]
async fn an_offline_persistent_session_gets_a_command_published_before_kill_9() {
    let site = site(BrokerConfig::default()).await;
    let port = site.port();
    offline_device(port, "dev-7").await;
    let (mut ctl, _) = connect(port, &Connect::new(Version::V4, "ctl", "alice", PW)).await;
    // The PUBACK is the broker's promise: once it is in, a crash may not
    // lose the command (durable mode, the default).
    ctl.publish("cmd/dev-7", b"reboot", 1, false).await.unwrap();

    let site = crash_and_restart(site).await;
    let (mut dev, present) = connect(site.port(), &persistent("bob", "dev-7")).await;
    assert!(present, "the session came back from the store");
    let (payload, pkid, _) = next_publish(&mut dev, T).await.unwrap();
    assert_eq!(payload, b"reboot");
    puback(&mut dev, pkid).await;
    // And its subscription came back with it: a new command arrives live.
    let (mut ctl, _) = connect(site.port(), &Connect::new(Version::V4, "ctl", "alice", PW)).await;
    ctl.publish("cmd/dev-7", b"again", 1, false).await.unwrap();
    assert_eq!(next_publish(&mut dev, T).await.unwrap().0, b"again");
}

#[tokio::test]
async fn in_durable_mode_nothing_acknowledged_is_lost_by_a_crash() {
    let site = site(BrokerConfig::default()).await;
    let port = site.port();
    for d in 0..5 {
        offline_device(port, &format!("d-{d}")).await;
    }
    let (mut ctl, _) = connect(port, &Connect::new(Version::V4, "ctl", "alice", PW)).await;
    for i in 0..100u32 {
        ctl.publish(&format!("cmd/d-{}", i % 5), &i.to_be_bytes(), 1, false).await.unwrap();
    }
    // Killed right behind the last PUBACK, with no pause for a commit.
    let site = crash_and_restart(site).await;
    for d in 0..5u32 {
        let (mut dev, present) = connect(site.port(), &persistent("bob", &format!("d-{d}"))).await;
        assert!(present);
        let mut got = Vec::new();
        while let Ok((payload, pkid, _)) = next_publish(&mut dev, Duration::from_millis(700)).await {
            got.push(u32::from_be_bytes(payload.try_into().unwrap()));
            puback(&mut dev, pkid).await;
        }
        let want: Vec<u32> = (0..100).filter(|i| i % 5 == d).collect();
        assert_eq!(got, want, "d-{d}: every acknowledged command, in order");
    }
}

/// A raw QoS 2 PUBLISH (3.1.1) with packet id `pkid`.
fn publish_qos2(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    frame(0x34, &body)
}

/// The next packet of `kind` (4 PUBACK, 5 PUBREC, 7 PUBCOMP) and its id.
async fn next_ack(conn: &mut Conn, kind: u8) -> u16 {
    loop {
        let p = conn.recv(T).await.unwrap();
        if p.kind() == kind {
            return u16::from_be_bytes([p.body[0], p.body[1]]);
        }
    }
}

#[tokio::test]
async fn a_qos2_id_released_just_before_a_crash_is_free_after_it() {
    // PUBCOMP tells the publisher the id is free; if the store still held
    // it, the next QoS 2 PUBLISH with that id would be taken for a
    // duplicate and never routed (durable mode waits for the release).
    let site = site(BrokerConfig::default()).await;
    let port = site.port();
    offline_device(port, "dev-q").await;
    let (mut p, _) = connect(port, &persistent("alice", "pub-q")).await;
    p.send(&publish_qos2("cmd/dev-q", 1, b"first")).await.unwrap();
    assert_eq!(next_ack(&mut p, 5).await, 1);
    p.send(&frame(0x62, &1u16.to_be_bytes())).await.unwrap();
    assert_eq!(next_ack(&mut p, 7).await, 1);
    drop(p);

    let site = crash_and_restart(site).await;
    let (mut p, present) = connect(site.port(), &persistent("alice", "pub-q")).await;
    assert!(present);
    p.send(&publish_qos2("cmd/dev-q", 1, b"second")).await.unwrap();
    assert_eq!(next_ack(&mut p, 5).await, 1);
    p.send(&frame(0x62, &1u16.to_be_bytes())).await.unwrap();
    assert_eq!(next_ack(&mut p, 7).await, 1);

    let (mut dev, _) = connect(site.port(), &persistent("bob", "dev-q")).await;
    let mut got = Vec::new();
    while let Ok((payload, pkid, _)) = next_publish(&mut dev, Duration::from_millis(700)).await {
        got.push(String::from_utf8(payload).unwrap());
        puback(&mut dev, pkid).await;
    }
    assert_eq!(got, ["first", "second"], "the second publish with id 1 was routed");
}

#[tokio::test]
async fn a_qos2_delivery_completed_before_a_crash_is_not_delivered_again() {
    // The subscriber saw PUBLISH, answered PUBREC, got PUBREL, answered
    // PUBCOMP and forgot the id: a store that had not kept the PUBREC
    // would send the message again after the crash, as a new one.
    let site = site(BrokerConfig::default()).await;
    let port = site.port();
    let (mut dev, _) = connect(port, &persistent("bob", "dev-r")).await;
    assert_eq!(dev.subscribe(&[("cmd/dev-r", 2)]).await.unwrap(), vec![2]);
    let (mut ctl, _) = connect(port, &Connect::new(Version::V4, "ctl", "alice", PW)).await;
    ctl.send(&publish_qos2("cmd/dev-r", 1, b"once")).await.unwrap();
    assert_eq!(next_ack(&mut ctl, 5).await, 1);
    let (payload, pkid, _) = next_publish(&mut dev, T).await.unwrap();
    assert_eq!(payload, b"once");
    dev.send(&frame(0x50, &pkid.to_be_bytes())).await.unwrap();
    let released = dev.recv(T).await.unwrap();
    assert_eq!(released.kind(), 6, "PUBREL: {released:?}");
    dev.send(&frame(0x70, &pkid.to_be_bytes())).await.unwrap();
    drop(dev);

    let site = crash_and_restart(site).await;
    let (mut dev, present) = connect(site.port(), &persistent("bob", "dev-r")).await;
    assert!(present);
    match dev.recv(Duration::from_millis(800)).await {
        Err(RecvError::Timeout) => {}
        // A PUBREL again is allowed (its PUBCOMP may not have been stored).
        Ok(p) if p.kind() == 6 => {}
        other => panic!("delivered again: {other:?}"),
    }
}

#[tokio::test]
async fn a_session_kept_across_a_restart_loses_what_a_withdrawn_grant_allowed() {
    let metrics = free_port();
    let site = site(BrokerConfig { metrics_port: Some(metrics), ..BrokerConfig::default() }).await;
    let port = site.port();
    site.device("dev-a").await;
    site.device("dev-b").await;
    site.human("ops", PW, Role::Controller, &["dev-a", "dev-b"]).await;
    let (a, b) = (common::topic("dev-a", "resp"), common::topic("dev-b", "resp"));
    let (mut ops, _) = connect(port, &persistent("ops", "ops-1")).await;
    assert_eq!(ops.subscribe(&[(&a, 1), (&b, 1)]).await.unwrap(), vec![1, 1]);
    drop(ops);
    let (mut admin, _) = connect(port, &Connect::new(Version::V4, "adm", "alice", PW)).await;
    admin.publish(&a, b"from a", 1, false).await.unwrap();
    admin.publish(&b, b"from b", 1, false).await.unwrap();
    drop(admin);

    // The operator withdraws the grant for dev-b and restarts the broker.
    let mut ops_record = UserRecord::human("ops", PW.as_bytes(), Role::Controller, 1000).unwrap();
    ops_record.grants = vec!["dev-a".to_owned()];
    site.users().put(&ops_record, true).await.unwrap();
    let site = stop_and_restart(site).await;
    let (mut ops, present) = connect(site.port(), &persistent("ops", "ops-1")).await;
    assert!(present);
    let m = ops.next_message(T).await.unwrap();
    assert_eq!((m.topic.as_str(), m.payload.as_slice()), (a.as_str(), &b"from a"[..]));
    assert_eq!(ops.next_message(Duration::from_millis(500)).await.unwrap_err(), RecvError::Timeout, "not dev-b's");
    let (mut admin, _) = connect(site.port(), &Connect::new(Version::V4, "adm", "alice", PW)).await;
    admin.publish(&b, b"later", 1, false).await.unwrap();
    assert_eq!(ops.next_message(Duration::from_millis(500)).await.unwrap_err(), RecvError::Timeout, "unsubscribed");
    assert_eq!(mqseal_tests::metric(metrics, "mqseal_subscriptions_revoked_total").await, 1);
    assert_eq!(mqseal_tests::metric(metrics, "mqseal_messages_dropped_total{reason=\"not_allowed\"}").await, 1);
    assert!(site.broker.log().contains("the ACL no longer allows"), "{}", site.broker.log());
}

#[tokio::test]
async fn what_was_in_flight_is_resent_with_dup_and_what_was_acknowledged_is_not() {
    let site =
        site(BrokerConfig { extra: "[persistence]\ncommit_interval_ms = 100\n".into(), ..BrokerConfig::default() })
            .await;
    let port = site.port();
    let (mut dev, _) = connect(port, &persistent("bob", "dev-9")).await;
    dev.subscribe(&[("cmd/dev-9", 1)]).await.unwrap();
    let (mut ctl, _) = connect(port, &Connect::new(Version::V4, "ctl", "alice", PW)).await;
    for p in [&b"one"[..], b"two", b"three"] {
        ctl.publish("cmd/dev-9", p, 1, false).await.unwrap();
    }
    let first = next_publish(&mut dev, T).await.unwrap();
    let second = next_publish(&mut dev, T).await.unwrap();
    assert_eq!((first.0.as_slice(), second.0.as_slice()), (&b"one"[..], &b"two"[..]));
    puback(&mut dev, first.1).await;
    // "two" is in flight, unacknowledged; "three" went out too. Give the
    // periodic part of the writer (packet ids, the delete) time to run.
    let third = next_publish(&mut dev, T).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;

    let site = crash_and_restart(site).await;
    let (mut dev, present) = connect(site.port(), &persistent("bob", "dev-9")).await;
    assert!(present);
    let again = next_publish(&mut dev, T).await.unwrap();
    assert_eq!(again, (b"two".to_vec(), second.1, true), "resent with its packet id and DUP");
    let again = next_publish(&mut dev, T).await.unwrap();
    assert_eq!(again, (b"three".to_vec(), third.1, true));
    assert_eq!(
        next_publish(&mut dev, Duration::from_millis(500)).await.unwrap_err(),
        RecvError::Timeout,
        "not \"one\""
    );
}

#[tokio::test]
async fn a_clean_stop_keeps_the_queue_and_forgets_what_was_acknowledged() {
    let site = site(BrokerConfig::default()).await;
    let port = site.port();
    let (mut dev, _) = connect(port, &persistent("bob", "dev-3")).await;
    dev.subscribe(&[("cmd/dev-3", 1)]).await.unwrap();
    let (mut ctl, _) = connect(port, &Connect::new(Version::V4, "ctl", "alice", PW)).await;
    ctl.publish("cmd/dev-3", b"first", 1, false).await.unwrap();
    let (payload, pkid, _) = next_publish(&mut dev, T).await.unwrap();
    assert_eq!(payload, b"first");
    puback(&mut dev, pkid).await;
    drop(dev);
    ctl.publish("cmd/dev-3", b"second", 1, false).await.unwrap();
    ctl.publish("cmd/dev-3", b"third", 1, false).await.unwrap();
    drop(ctl);

    let site = stop_and_restart(site).await;
    let (mut dev, present) = connect(site.port(), &persistent("bob", "dev-3")).await;
    assert!(present);
    let a = next_publish(&mut dev, T).await.unwrap();
    let b = next_publish(&mut dev, T).await.unwrap();
    assert_eq!((a.0.as_slice(), b.0.as_slice()), (&b"second"[..], &b"third"[..]));
    assert_eq!(next_publish(&mut dev, Duration::from_millis(500)).await.unwrap_err(), RecvError::Timeout);
}

#[tokio::test]
async fn a_clean_session_ends_in_the_store_too() {
    let site = site(BrokerConfig::default()).await;
    let port = site.port();
    offline_device(port, "dev-5").await;
    let (mut ctl, _) = connect(port, &Connect::new(Version::V4, "ctl", "alice", PW)).await;
    ctl.publish("cmd/dev-5", b"stale", 1, false).await.unwrap();
    // The device comes back with clean-session: its old session and queue
    // are gone, and must not come back from the store after a crash.
    let clean = Connect::new(Version::V4, "dev-5", "bob", PW);
    let (dev, present) = connect(port, &clean).await;
    assert!(!present);
    drop(dev);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let site = crash_and_restart(site).await;
    let (mut dev, present) = connect(site.port(), &persistent("bob", "dev-5")).await;
    assert!(!present, "no session came back");
    assert_eq!(next_publish(&mut dev, Duration::from_millis(500)).await.unwrap_err(), RecvError::Timeout);
}

#[tokio::test]
async fn with_persistence_off_a_restart_starts_empty() {
    let site = site(BrokerConfig { extra: "[persistence]\nmode = \"off\"\n".into(), ..BrokerConfig::default() }).await;
    let (mut p, _) = connect(site.port(), &Connect::new(Version::V4, "p", "alice", PW)).await;
    p.publish("status/x", b"on", 1, true).await.unwrap();
    assert!(!store_file(&site).exists());
    let site = crash_and_restart(site).await;
    let (mut s, _) = connect(site.port(), &Connect::new(Version::V4, "s", "alice", PW)).await;
    s.subscribe(&[("status/#", 1)]).await.unwrap();
    assert_eq!(s.next_message(Duration::from_millis(500)).await.unwrap_err(), RecvError::Timeout);
}

#[tokio::test]
async fn commits_are_counted_in_the_metrics() {
    let metrics = free_port();
    let site = site(BrokerConfig { metrics_port: Some(metrics), ..BrokerConfig::default() }).await;
    offline_device(site.port(), "dev-m").await;
    let (mut ctl, _) = connect(site.port(), &Connect::new(Version::V4, "ctl", "alice", PW)).await;
    ctl.publish("cmd/dev-m", b"x", 1, false).await.unwrap();
    assert!(mqseal_tests::metric(metrics, "mqseal_persist_commits_total").await >= 1);
    assert!(
        mqseal_tests::metric(metrics, "mqseal_persist_keys_written_total").await >= 3,
        "session, its subscription, the message"
    );
    assert!(mqseal_tests::metric(metrics, "mqseal_persist_commit_micros_total").await > 0);
    assert_eq!(mqseal_tests::metric(metrics, "mqseal_persist_commit_failures_total").await, 0);
}

/// Starts the broker on a copy of `dir`'s data and expects it to refuse,
/// naming the file (each refused start gets its own copy, so the original
/// stays for the next case).
async fn assert_refused(dir: &tempfile::TempDir, want: &str) {
    let copy = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(copy.path().join("data")).unwrap();
    for entry in std::fs::read_dir(dir.path().join("data")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join("data").join(entry.file_name())).unwrap();
    }
    let Err(failure) = BrokerProc::start(std::path::Path::new(common::BIN), copy.path(), BrokerConfig::default()).await
    else {
        panic!("the broker started on a bad store ({want})");
    };
    let shown = file_in(&copy).display().to_string();
    assert!(failure.stderr.contains(&shown), "the error names {shown}:\n{}", failure.stderr);
    assert!(failure.stderr.contains(want), "{want}:\n{}", failure.stderr);
    assert!(!failure.stderr.contains("panicked"), "{}", failure.stderr);
    assert_ne!(failure.status.and_then(|s| s.code()), Some(0), "{:?}", failure.status);
}

#[tokio::test]
async fn a_damaged_store_stops_the_start_with_an_error_naming_the_file() {
    let site = site(BrokerConfig::default()).await;
    offline_device(site.port(), "dev-d").await;
    let (mut p, _) = connect(site.port(), &Connect::new(Version::V4, "p", "alice", PW)).await;
    p.publish("status/ok", b"on", 1, true).await.unwrap();
    let Site { broker, dir } = site;
    broker.terminate(T).await.unwrap();
    let file = file_in(&dir);
    let good = std::fs::read(&file).unwrap();
    // Not a database at all.
    std::fs::write(&file, vec![0x5a; good.len()]).unwrap();
    assert_refused(&dir, "persistence store").await;
    // A redb file whose pages were overwritten past the header.
    let mut damaged = good.clone();
    for b in damaged.iter_mut().skip(4096) {
        *b ^= 0xff;
    }
    std::fs::write(&file, &damaged).unwrap();
    assert_refused(&dir, "persistence store").await;
    // A record that does not decode.
    plant(&file, &good, |txn| {
        let mut t = txn.open_table(redb::TableDefinition::<&[u8], &[u8]>::new("retained")).unwrap();
        t.insert(&b"status/bad"[..], &b"\xff\xff\xff"[..]).unwrap();
    });
    assert_refused(&dir, "table retained, key status/bad").await;
    // Checksums right, a key that is not text: refused, not a panic.
    plant(&file, &good, |txn| {
        let mut t = txn.open_table(redb::TableDefinition::<&[u8], &[u8]>::new("sessions")).unwrap();
        t.insert(&b"dev-\xff"[..], &b"\x00"[..]).unwrap();
    });
    assert_refused(&dir, "key is not UTF-8").await;
    // A queued copy the router would never write (QoS 0), under a valid key:
    // ItemRec::Publish { topic "t", payload "x", QoS 0, ... } in postcard.
    plant(&file, &good, |txn| {
        let t = redb::TableDefinition::<(&[u8], u64), &[u8]>::new("session_messages");
        let mut t = txn.open_table(t).unwrap();
        t.insert((&b"dev-d"[..], 1), &b"\x00\x01t\x01x\x00\x00\x00\x00\x00\x00\x00\x00"[..]).unwrap();
    });
    assert_refused(&dir, "table session_messages, key dev-d#1").await;
}

#[tokio::test]
async fn a_store_from_a_newer_broker_is_refused() {
    let site = site(BrokerConfig::default()).await;
    let Site { broker, dir } = site;
    broker.terminate(T).await.unwrap();
    {
        let db = redb::Database::create(file_in(&dir)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(redb::TableDefinition::<&[u8], u64>::new("meta")).unwrap();
            t.insert(&b"format"[..], mqseal_broker::persist::FORMAT + 1).unwrap();
        }
        txn.commit().unwrap();
    }
    assert_refused(&dir, "newer than this broker's").await;
}

/// Puts the good file back, then writes into it what `write` does, as a
/// file damaged under valid checksums would hold it.
fn plant(file: &std::path::Path, good: &[u8], write: impl FnOnce(&redb::WriteTransaction)) {
    std::fs::write(file, good).unwrap();
    let db = redb::Database::create(file).unwrap();
    let txn = db.begin_write().unwrap();
    write(&txn);
    txn.commit().unwrap();
}

fn file_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("data").join("router.redb")
}
