//! The harness reaches every real component the later tests stand on.
//!
//! These are the canaries of the test command: if SecantusDB, Mosquitto, its
//! clients or paho-mqtt are missing or broken, these fail first and say which.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use mongodb::bson::{Document, doc};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, IndexModel};
use mqseal_tests::{Mosquitto, mongodb_uri, python, require_program, run};
use sha2::{Digest, Sha256};

const T: Duration = Duration::from_secs(20);

/// SecantusDB speaks the MongoDB wire protocol to the official Rust driver,
/// well enough for what the credential store will do: a unique index on
/// `username`, inserts, lookups, and refusing a duplicate. The document has
/// EMQX's MongoDB-authenticator layout, with EMQX's own documented example
/// (password `public`, salt `slat_foo123`, salt as suffix).
#[tokio::test]
async fn secantusdb_serves_the_official_mongodb_driver() {
    let uri = mongodb_uri();
    let mut opts = ClientOptions::parse(&uri).await.unwrap();
    opts.server_selection_timeout = Some(Duration::from_secs(5));
    opts.connect_timeout = Some(Duration::from_secs(5));
    let client = Client::with_options(opts).unwrap();
    let db = client.database(&format!("mqseal_harness_{}", std::process::id()));
    let users = db.collection::<Document>("mqtt_user");

    tokio::time::timeout(T, async {
        let unique = IndexOptions::builder().unique(true).build();
        users
            .create_index(IndexModel::builder().keys(doc! { "username": 1 }).options(unique).build())
            .await
            .unwrap_or_else(|e| panic!("create_index on {uri}: {e}"));
        let hash = hex::encode(Sha256::digest(b"publicslat_foo123"));
        users
            .insert_one(
                doc! { "username": "emqx_u", "password_hash": &hash, "salt": "slat_foo123", "is_superuser": false },
            )
            .await
            .unwrap();
        let found = users.find_one(doc! { "username": "emqx_u" }).await.unwrap().expect("inserted user");
        assert_eq!(found.get_str("password_hash").unwrap(), hash);
        assert!(!found.get_bool("is_superuser").unwrap());
        let dup = users.insert_one(doc! { "username": "emqx_u", "password_hash": "x", "salt": "y" }).await;
        assert!(dup.is_err(), "the unique index must refuse a second emqx_u");
        db.drop().await.unwrap();
    })
    .await
    .expect("SecantusDB did not answer in time");
}

/// Mosquitto and its command-line clients work: a retained message
/// published with `mosquitto_pub` is read back by `mosquitto_sub`, over
/// MQTT 3.1.1 and 5.
#[tokio::test]
async fn mosquitto_and_its_clients_round_trip() {
    let broker = Mosquitto::start("allow_anonymous true").await;
    let port = broker.port().to_string();
    let (publ, sub) = (require_program("mosquitto_pub"), require_program("mosquitto_sub"));
    for (version, topic) in [("mqttv311", "harness/v311"), ("mqttv5", "harness/v5")] {
        run(
            publ.to_str().unwrap(),
            &["-h", "127.0.0.1", "-p", &port, "-V", version, "-t", topic, "-r", "-m", "hello"],
            T,
        )
        .await
        .unwrap();
        let out = run(
            sub.to_str().unwrap(),
            &["-h", "127.0.0.1", "-p", &port, "-V", version, "-t", topic, "-C", "1", "-W", "10"],
            T,
        )
        .await
        .unwrap();
        assert_eq!(out.trim(), "hello", "{version}");
    }
}

/// The test venv's paho-mqtt 2.x talks to Mosquitto: subscribe, publish to
/// itself, receive.
#[tokio::test]
async fn paho_mqtt_round_trips_through_mosquitto() {
    let broker = Mosquitto::start("allow_anonymous true").await;
    let script = r#"
import sys, paho.mqtt.client as mqtt
port = int(sys.argv[1])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="harness-paho")
c.on_connect = lambda c, u, f, rc, p: c.subscribe("harness/paho", qos=1)
c.on_subscribe = lambda c, u, mid, rcs, p: c.publish("harness/paho", b"ping", qos=1)
def on_message(c, u, m):
    print(m.payload.decode()); c.disconnect()
c.on_message = on_message
c.connect("127.0.0.1", port, keepalive=10)
c.loop_forever(timeout=1.0)
"#;
    let py = python();
    let out = run(py.to_str().unwrap(), &["-c", script, &broker.port().to_string()], T).await.unwrap();
    assert_eq!(out.trim(), "ping");
}
