//! Authorization at the real broker: devices keep to their own topics,
//! controllers reach the devices they are granted, wills are checked, and a
//! client id cannot be used to take over someone else's session.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::*;
use mqseal_store::Role;
use mqseal_tests::broker::BrokerConfig;
use mqseal_tests::free_port;
use mqseal_tests::mqtt::{Conn, Connect, RecvError, Version, Will};

const QUIET: Duration = Duration::from_millis(700);

/// The default rules (README, "Who may do what"), seen from both protocol versions: refused
/// subscriptions get a failure code (3.1.1 0x80, v5 0x87) and deliver
/// nothing; refused publishes are dropped (v5 PUBACK 0x87; 3.1.1 has no
/// way to say so, its PUBACK looks like success) and counted.
#[tokio::test]
async fn devices_keep_to_their_own_topics() {
    let metrics = free_port();
    let site = Site::start(BrokerConfig { metrics_port: Some(metrics), ..BrokerConfig::default() }).await;
    let port = site.port();
    let a = site.device("dev-a").await;
    let b = site.device("dev-b").await;
    site.human("ops", "ops-pw", Role::Controller, &["dev-a"]).await;

    let mut dev_a = Conn::connected(port, &login(Version::V5, "dev-a", &a)).await;
    let mut dev_b = Conn::connected(port, &login(Version::V4, "dev-b", &b)).await;
    let mut ops = Conn::connected(port, &Connect::new(Version::V5, "ops-console", "ops", "ops-pw")).await;

    // Own command and challenge-request topics: granted at the asked QoS.
    let codes = dev_a.subscribe(&[(&topic("dev-a", "cmd"), 1), (&topic("dev-a", "chal/req"), 1)]).await.unwrap();
    assert_eq!(codes, vec![1, 1]);
    assert_eq!(dev_b.subscribe(&[(&topic("dev-b", "cmd"), 1)]).await.unwrap(), vec![1]);
    // Someone else's, everything, $SYS, and own topics the device only publishes.
    let v5_refused = dev_a
        .subscribe(&[
            (&topic("dev-b", "cmd"), 1),
            ("#", 0),
            ("$SYS/#", 0),
            ("mqseal/v1/dev/+/cmd", 0),
            (&topic("dev-a", "resp"), 0),
        ])
        .await
        .unwrap();
    assert_eq!(v5_refused, vec![0x87, 0x87, 0x8f, 0x87, 0x87]);
    let v4_refused =
        dev_b.subscribe(&[(&topic("dev-a", "cmd"), 1), ("#", 0), (&topic("dev-b", "cmd"), 0)]).await.unwrap();
    assert_eq!(v4_refused, vec![0x80, 0x80, 0], "3.1.1 has one failure code; the allowed filter still works");

    // The controller reaches dev-a, and is refused dev-b.
    assert_eq!(
        ops.subscribe(&[(&topic("dev-a", "resp"), 1), (&topic("dev-b", "resp"), 1)]).await.unwrap(),
        vec![1, 0x87]
    );
    assert_eq!(ops.publish(&topic("dev-a", "cmd"), b"open", 1, false).await.unwrap(), 0);
    assert_eq!(dev_a.next_message(T).await.unwrap().payload, b"open");
    assert_eq!(ops.publish(&topic("dev-b", "cmd"), b"not yours", 1, false).await.unwrap(), 0x87);

    // A device publishing into another device's command topic.
    assert_eq!(dev_a.publish(&topic("dev-b", "cmd"), b"forged", 1, false).await.unwrap(), 0x87);
    assert_eq!(dev_b.publish(&topic("dev-a", "cmd"), b"forged", 1, false).await.unwrap(), 0, "3.1.1 PUBACK");
    assert_eq!(dev_b.publish(&topic("dev-b", "cmd"), b"to myself", 1, false).await.unwrap(), 0);
    // Nothing of that arrived anywhere.
    assert_eq!(dev_b.next_message(QUIET).await, Err(RecvError::Timeout));
    assert_eq!(dev_a.next_message(QUIET).await, Err(RecvError::Timeout));

    // The device answers on its response topic; the controller gets it.
    assert_eq!(dev_a.publish(&topic("dev-a", "resp"), b"done", 1, false).await.unwrap(), 0);
    assert_eq!(ops.next_message(T).await.unwrap().payload, b"done");
    assert!(metric(metrics, "mqseal_acl_denied_publish_total").await >= 4);
    assert!(metric(metrics, "mqseal_acl_denied_subscribe_total").await >= 6);
    let log = site.broker.log();
    assert!(log.contains("publish denied by ACL") && log.contains("subscription denied by ACL"), "{log}");
}

/// A controller granted `*` reaches every device and may use wildcards
/// across devices; an admin reaches everything.
#[tokio::test]
async fn fleet_controllers_and_admins() {
    let site = Site::start(BrokerConfig::default()).await;
    let port = site.port();
    site.human("fleet", "fleet-pw", Role::Controller, &["*"]).await;
    site.human("root", "root-pw", Role::Admin, &[]).await;
    let a = site.device("dev-a").await;
    let mut fleet = Conn::connected(port, &Connect::new(Version::V4, "fleet-1", "fleet", "fleet-pw")).await;
    let mut root = Conn::connected(port, &Connect::new(Version::V5, "root-1", "root", "root-pw")).await;
    assert_eq!(fleet.subscribe(&[("mqseal/v1/dev/+/status", 1), ("mqseal/v1/dev/#", 1)]).await.unwrap(), vec![1, 0x80]);
    assert_eq!(root.subscribe(&[("#", 1)]).await.unwrap(), vec![1]);
    let mut dev = Conn::connected(port, &login(Version::V4, "dev-a", &a)).await;
    dev.publish(&topic("dev-a", "status"), b"online", 1, true).await.unwrap();
    assert_eq!(fleet.next_message(T).await.unwrap().payload, b"online");
    assert_eq!(root.next_message(T).await.unwrap().payload, b"online");
}

/// Wills are authorized like publishes: a device's last will on its own
/// status topic is delivered (retained) when it drops off; a will aimed at
/// another device's topic refuses the CONNECT.
#[tokio::test]
async fn wills_are_checked_and_delivered() {
    let site = Site::start(BrokerConfig::default()).await;
    let port = site.port();
    let a = site.device("dev-a").await;
    site.device("dev-b").await;
    site.human("ops", "ops-pw", Role::Controller, &["dev-a"]).await;

    let mut forged = login(Version::V5, "dev-a", &a);
    forged.will = Some(Will {
        topic: topic("dev-b", "status"),
        payload: b"offline".to_vec(),
        qos: 1,
        retain: true,
        properties: Vec::new(),
    });
    assert_eq!(connack(port, &forged).await, Some(0x87));
    forged.version = Version::V4;
    assert_eq!(connack(port, &forged).await, Some(5));

    let mut ops = Conn::connected(port, &Connect::new(Version::V4, "ops-1", "ops", "ops-pw")).await;
    ops.subscribe(&[(&topic("dev-a", "status"), 1)]).await.unwrap();
    let mut with_will = login(Version::V4, "dev-a", &a);
    with_will.will = Some(Will {
        topic: topic("dev-a", "status"),
        payload: b"offline".to_vec(),
        qos: 1,
        retain: true,
        properties: Vec::new(),
    });
    let mut dev = Conn::connected(port, &with_will).await;
    dev.publish(&topic("dev-a", "status"), b"online", 1, true).await.unwrap();
    assert_eq!(ops.next_message(T).await.unwrap().payload, b"online");
    drop(dev); // abrupt: no DISCONNECT
    let will = ops.next_message(T).await.unwrap();
    assert_eq!((will.payload.as_slice(), will.qos), (&b"offline"[..], 1));
    // Retained: a controller that comes later still learns the device is offline.
    let mut late = Conn::connected(port, &Connect::new(Version::V5, "ops-2", "ops", "ops-pw")).await;
    late.subscribe(&[(&topic("dev-a", "status"), 1)]).await.unwrap();
    let m = late.next_message(T).await.unwrap();
    assert!(m.retain && m.payload == b"offline", "{m:?}");

    // A clean DISCONNECT publishes no will.
    let mut dev = Conn::connected(port, &with_will).await;
    dev.publish(&topic("dev-a", "status"), b"online", 1, true).await.unwrap();
    assert_eq!(ops.next_message(T).await.unwrap().payload, b"online");
    dev.disconnect().await;
    assert_eq!(ops.next_message(QUIET).await, Err(RecvError::Timeout));
}

/// In plain MQTT whoever reuses a client id takes the session over. Here
/// only a device owns its bare id: a controller connecting with client id
/// "dev-a" gets a session of its own and the device stays connected.
#[tokio::test]
async fn a_client_id_does_not_take_over_a_device() {
    let site = Site::start(BrokerConfig::default()).await;
    let port = site.port();
    let a = site.device("dev-a").await;
    site.human("ops", "ops-pw", Role::Controller, &["dev-a"]).await;
    let mut dev = Conn::connected(port, &login(Version::V5, "dev-a", &a)).await;
    dev.subscribe(&[(&topic("dev-a", "cmd"), 1)]).await.unwrap();
    let mut ops = Conn::connected(port, &Connect::new(Version::V5, "dev-a", "ops", "ops-pw")).await;
    round_trip(&mut ops, &mut dev, &topic("dev-a", "cmd"), b"still here").await;
    // The device's own reconnect does take over its previous session (v5: 0x8E).
    let mut again = Conn::connected(port, &login(Version::V5, "dev-a", &a)).await;
    assert_eq!(dev.closed(T).await.unwrap(), Some(0x8e));
    again.subscribe(&[(&topic("dev-a", "cmd"), 1)]).await.unwrap();
    round_trip(&mut ops, &mut again, &topic("dev-a", "cmd"), b"new session").await;
}

/// Extra rules from the config, with placeholders filling whole levels.
#[tokio::test]
async fn configured_rules_extend_the_defaults() {
    let extra =
        "[[acl.rules]]\nrole = \"device\"\npublish = [\"telemetry/{username}/+\"]\nsubscribe = [\"fw/{clientid}\"]\n";
    let site = Site::start(BrokerConfig { extra: extra.into(), ..BrokerConfig::default() }).await;
    let port = site.port();
    let a = site.device("dev-a").await;
    let mut dev = Conn::connected(port, &login(Version::V5, "dev-a", &a)).await;
    assert_eq!(dev.publish("telemetry/dev-a/temp", b"21", 1, false).await.unwrap(), 0);
    assert_eq!(dev.publish("telemetry/dev-b/temp", b"21", 1, false).await.unwrap(), 0x87);
    assert_eq!(dev.publish("telemetry/dev-a/temp/x", b"21", 1, false).await.unwrap(), 0x87);
    assert_eq!(dev.subscribe(&[("fw/dev-a", 1), ("fw/dev-b", 1), ("fw/+", 1)]).await.unwrap(), vec![1, 0x87, 0x87]);
}
