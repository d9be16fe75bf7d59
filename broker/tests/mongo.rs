//! The broker on its MongoDB store (SecantusDB, a real MongoDB wire-protocol
//! server, through the official driver): EMQX-compatible documents, the
//! seed's legacy layout and its upgrade, and an outage with recovery.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::{Document, doc};
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};
use mqseal_store::{MongoConfig, MongoStore, Role};
use mqseal_tests::broker::{BrokerConfig, Store, unique_database};
use mqseal_tests::mqtt::{Conn, Connect, Version};
use sha2::{Digest, Sha256};

async fn database(uri: &str, name: &str) -> Database {
    let mut opts = ClientOptions::parse(uri).await.unwrap();
    opts.server_selection_timeout = Some(Duration::from_secs(5));
    Client::with_options(opts).unwrap().database(name)
}

async fn store(uri: &str, database: &str) -> MongoStore {
    let config = MongoConfig {
        uri: uri.to_owned(),
        database: database.to_owned(),
        collection: "mqtt_user".into(),
        legacy: None,
        timeout: Duration::from_secs(5),
    };
    let store = MongoStore::connect(&config).await.unwrap();
    store.ensure_index().await.unwrap();
    store
}

fn mongo_config(uri: &str, database: &str, legacy: bool) -> BrokerConfig {
    BrokerConfig {
        store: Store::Mongo { uri: uri.to_owned(), database: database.to_owned(), legacy },
        ..BrokerConfig::default()
    }
}

/// Devices (salted SHA-256) and people (PBKDF2) in MongoDB, in EMQX's
/// document layout; a document written the way EMQX's own tools write it
/// (no mqseal fields) logs in too; refused logins get the right codes.
#[tokio::test]
async fn logins_against_emqx_compatible_documents() {
    let uri = mqseal_tests::mongodb_uri();
    let name = unique_database("mqseal_broker_login");
    let users = store(&uri, &name).await;
    let secret = add_device(&users, "dev-1").await;
    add_human(&users, "alice", "alice-pw", Role::Controller, &["dev-1"]).await;
    let db = database(&uri, &name).await;
    let raw = db.collection::<Document>("mqtt_user");
    // EMQX's documented example: password "public", salt "slat_foo123", sha256 with the salt as suffix.
    let emqx_hash = hex::encode(Sha256::digest(b"publicslat_foo123"));
    raw.insert_one(
        doc! { "username": "emqx-dev", "password_hash": &emqx_hash, "salt": "slat_foo123", "is_superuser": false },
    )
    .await
    .unwrap();

    let site = Site::start(mongo_config(&uri, &name, false)).await;
    assert!(site.broker.first_admin_password().is_none(), "the store has users: no admin is made");
    let port = site.port();
    use Version::{V4, V5};
    assert_eq!(connack(port, &login(V4, "dev-1", &secret)).await, Some(0));
    assert_eq!(connack(port, &login(V5, "dev-1", &secret)).await, Some(0));
    assert_eq!(connack(port, &login(V4, "dev-1", "wrong")).await, Some(4));
    assert_eq!(connack(port, &login(V5, "alice", "alice-pw")).await, Some(0));
    assert_eq!(connack(port, &login(V5, "alice", "alice-pW")).await, Some(0x86));
    assert_eq!(connack(port, &login(V4, "emqx-dev", "public")).await, Some(0));
    assert_eq!(connack(port, &login(V4, "emqx-dev", "Public")).await, Some(4));
    assert_eq!(mosquitto_pub(port, "mqttv5", "dev-1", &secret, &topic("dev-1", "status")).await.0, 0);

    // What mqseal wrote is what EMQX reads.
    let device = raw.find_one(doc! { "username": "dev-1" }).await.unwrap().unwrap();
    let salt = device.get_str("salt").unwrap();
    let expected = hex::encode(Sha256::digest([secret.as_bytes(), salt.as_bytes()].concat()));
    assert_eq!(device.get_str("password_hash").unwrap(), expected, "sha256(password ‖ salt), lowercase hex");
    assert!(!device.get_bool("is_superuser").unwrap());
    assert_eq!(device.get_str("algorithm").unwrap(), "sha256");
    assert_eq!(device.get_str("role").unwrap(), "device");
    let human = raw.find_one(doc! { "username": "alice" }).await.unwrap().unwrap();
    assert_eq!(human.get_str("algorithm").unwrap(), "pbkdf2_sha256");
    assert!(
        human
            .get_i64("iterations")
            .map(|i| i >= 1000)
            .or_else(|_| human.get_i32("iterations").map(|i| i >= 1000))
            .unwrap()
    );
    // The unique index on username is there.
    assert!(raw.insert_one(doc! { "username": "dev-1", "password_hash": "00", "salt": "" }).await.is_err());
    db.drop().await.unwrap();
}

/// The seed paper's users (`IOT.login_info`, unsalted SHA-256 hex) log in
/// only with the legacy option, and are upgraded to PBKDF2 on that login.
#[tokio::test]
async fn legacy_seed_users_only_with_the_option_then_upgraded() {
    let uri = mqseal_tests::mongodb_uri();
    let name = unique_database("mqseal_broker_legacy");
    let users = store(&uri, &name).await;
    add_device(&users, "some-device").await;
    // The broker reads the legacy collection from "<database>_IOT" (see the harness).
    let legacy_db = database(&uri, &format!("{name}_IOT")).await;
    let legacy = legacy_db.collection::<Document>("login_info");
    let seed_hash = hex::encode(Sha256::digest(b"qwerty"));
    legacy.insert_one(doc! { "username": "IOT_JCOMP", "password": &seed_hash }).await.unwrap();

    let site = Site::start(mongo_config(&uri, &name, false)).await;
    assert_eq!(connack(site.port(), &login(Version::V4, "IOT_JCOMP", "qwerty")).await, Some(4), "off by default");
    drop(site);

    let site = Site::start(mongo_config(&uri, &name, true)).await;
    let port = site.port();
    assert_eq!(connack(port, &login(Version::V4, "IOT_JCOMP", "wrong")).await, Some(4));
    assert_eq!(connack(port, &login(Version::V4, "IOT_JCOMP", "qwerty")).await, Some(0));
    let db = database(&uri, &name).await;
    let upgraded = db.collection::<Document>("mqtt_user").find_one(doc! { "username": "IOT_JCOMP" }).await.unwrap();
    let upgraded = upgraded.expect("upgraded record");
    assert_eq!(upgraded.get_str("algorithm").unwrap(), "pbkdf2_sha256");
    assert_ne!(upgraded.get_str("password_hash").unwrap(), seed_hash);
    assert!(legacy.find_one(doc! { "username": "IOT_JCOMP" }).await.unwrap().is_none(), "legacy document removed");
    // Next login through the upgraded record.
    assert_eq!(connack(port, &login(Version::V5, "IOT_JCOMP", "qwerty")).await, Some(0));
    assert!(site.broker.log().contains("upgraded"));
    db.drop().await.unwrap();
    legacy_db.drop().await.unwrap();
}

/// MongoDB goes away: live sessions continue, a user logged in a moment
/// ago may log in again from the cache, a user never seen is refused
/// ("server unavailable": fail closed), the address is logged once per
/// interval, and when MongoDB is back logins work again with no restart.
#[tokio::test]
async fn mongodb_outage_fails_closed_and_recovers() {
    let data = tempfile::tempdir().unwrap();
    let mut mongo = mqseal_tests::Secantus::start(data.path()).await;
    let uri = mongo.uri();
    let name = unique_database("mqseal_broker_outage");
    let users = store(&uri, &name).await;
    let a = add_device(&users, "dev-a").await;
    let b = add_device(&users, "dev-b").await;
    let c = add_device(&users, "dev-c").await;
    add_human(&users, "ops", "ops-pw", Role::Controller, &["*"]).await;

    let site = Site::start(BrokerConfig { cache_ttl_secs: 1, ..mongo_config(&uri, &name, false) }).await;
    let port = site.port();
    let mut dev_a = Conn::connected(port, &login(Version::V4, "dev-a", &a)).await;
    dev_a.subscribe(&[(&topic("dev-a", "cmd"), 1)]).await.unwrap();
    let mut ops = Conn::connected(port, &Connect::new(Version::V5, "ops-1", "ops", "ops-pw")).await;
    Conn::connected(port, &login(Version::V4, "dev-b", &b)).await.disconnect().await;

    mongo.stop().await;
    let stopped = Instant::now();
    assert_eq!(connack(port, &login(Version::V4, "dev-c", &c)).await, Some(3), "never seen: fail closed");
    assert_eq!(connack(port, &login(Version::V5, "dev-c", &c)).await, Some(0x88));
    assert_eq!(connack(port, &login(Version::V4, "dev-b", &b)).await, Some(0), "seen recently: from the cache");
    assert_eq!(connack(port, &login(Version::V4, "dev-b", "wrong")).await, Some(4), "the cache still checks");
    round_trip(&mut ops, &mut dev_a, &topic("dev-a", "cmd"), b"during the outage").await;
    // Let the revalidation loop fail a few times: live sessions are not kicked for it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    round_trip(&mut ops, &mut dev_a, &topic("dev-a", "cmd"), b"still").await;
    let log = site.broker.log();
    let lines = log.lines().filter(|l| l.contains("credential store unreachable")).count();
    assert!(lines >= 1, "{log}");
    assert!(lines <= 1 + stopped.elapsed().as_secs() as usize / 10, "logged once per interval, not per login: {lines}");
    let address = uri.trim_start_matches("mongodb://").split('/').next().unwrap();
    assert!(log.contains(address), "names the address {address}");

    mongo.restart().await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            connack(port, &login(Version::V4, "dev-c", &c)).await == Some(0)
        })
        .await,
        "logins recover after MongoDB is back"
    );
    round_trip(&mut ops, &mut dev_a, &topic("dev-a", "cmd"), b"after").await;
}
