//! The audit log end to end: real broker, real agents, the `mqseal` binary.
//!
//! Every command `send` and `broadcast` sent is recorded with the device's
//! answer itself; `mqseal audit verify` checks each again — sealed
//! receipts with the device's public key, challenge-mode tags with its
//! key — and names the record that no longer verifies once one byte of it
//! is changed, whether the log is the file or a MongoDB collection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use mqseal_tests::broker::{Store, unique_database};
use mqseal_tests::mongodb_uri;
use mqseal_tests::site::{Output, Site};
use serde_json::Value;

fn json(out: &Output) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

/// Sends the commands every variant records: a sealed `send`, an explicit
/// and a hidden challenge-mode `broadcast` to two devices, and a `send` to
/// a device that never answers. Returns the agents so they outlive it.
async fn send_the_commands(site: &Site) -> Vec<mqseal_tests::site::AgentProc> {
    for id in ["au-1", "au-2", "au-3"] {
        site.add_device(id, &[]).await;
    }
    let agents = vec![site.agent("au-1").await, site.agent("au-2").await];
    let out = site.mqseal(&["send", "au-1", "echo", "hello", "--mode", "sealed"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = site.mqseal(&["broadcast", "--devices", "au-1,au-2", "echo", "all"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = site.mqseal(&["broadcast", "--devices", "au-1,au-2", "ping", "--hidden"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = site.mqseal(&["send", "au-3", "ping", "--timeout", "2s"]).await;
    assert_eq!(out.code, 4, "au-3 has no agent: {out:?}");
    agents
}

/// `mqseal audit --json`: the records, oldest first.
async fn records(site: &Site, filter: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "--json"];
    args.extend(filter);
    let out = site.mqseal(&args).await;
    assert_eq!(out.code, 0, "{out:?}");
    json(&out)["records"].as_array().unwrap().iter().map(|r| r["record"].clone()).collect()
}

/// Asserts what was recorded for the commands of [`send_the_commands`].
fn check_records(all: &[Value]) {
    assert_eq!(all.len(), 6, "one record per target: {all:#?}");
    let sealed = &all[0];
    assert_eq!(
        (sealed["via"].as_str(), sealed["device"].as_str(), sealed["command"].as_str(), sealed["mode"].as_str()),
        (Some("send"), Some("au-1"), Some("echo"), Some("sealed"))
    );
    assert_eq!(sealed["operator"], "operator");
    assert_eq!(sealed["outcome"], "ok");
    // SHA-256 of the one argument "hello", framed with its 4-byte length.
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest([&[0u8, 0, 0, 5][..], b"hello"].concat()))
    };
    assert_eq!(sealed["args_sha256"], digest.as_str());
    assert_eq!(sealed["msg_id"].as_str().unwrap().len(), 32);
    assert!(sealed["response"].as_str().unwrap().len() > 512, "the whole signed receipt is kept");
    assert!(sealed["challenge"].is_null());
    for r in &all[1..5] {
        assert_eq!(
            (r["via"].as_str(), r["mode"].as_str(), r["outcome"].as_str()),
            (Some("broadcast"), Some("challenge"), Some("ok"))
        );
        assert_eq!(r["challenge"].as_str().unwrap().len(), 32, "{r}");
    }
    assert_eq!((all[3]["hidden"].as_bool(), all[3]["command"].as_str()), (Some(true), Some("ping")));
    let timed_out = &all[5];
    assert_eq!((timed_out["device"].as_str(), timed_out["outcome"].as_str()), (Some("au-3"), Some("timed_out")));
    assert!(timed_out["response"].is_null() && timed_out["msg_id"].is_string());
}

fn verify_summary(out: &Output) -> (u64, u64, u64) {
    let s = &json(out)["summary"];
    (s["verified"].as_u64().unwrap(), s["failed"].as_u64().unwrap(), s["no_answer"].as_u64().unwrap())
}

/// The file store: records in `data_dir/audit.jsonl`, 0600; every answer
/// verifies; one changed byte of the sealed receipt, or a recorded status
/// changed under a challenge-mode tag, fails naming the line.
#[tokio::test]
async fn send_and_broadcast_are_recorded_and_verify_names_a_changed_record() {
    let site = Site::start(Store::File).await;
    let _agents = send_the_commands(&site).await;
    let path = site.dir.join("ctl/audit.jsonl");
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    check_records(&records(&site, &[]).await);
    assert_eq!(records(&site, &["--device", "au-2"]).await.len(), 2);
    assert_eq!(records(&site, &["--device", "au-1", "--since", "1h"]).await.len(), 3);

    let out = site.mqseal(&["audit", "verify", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(verify_summary(&out), (5, 0, 1));
    let text = site.mqseal(&["audit", "verify"]).await;
    assert!(text.stdout.contains("5 verified, 0 do not verify"), "{text:?}");

    // One byte of the stored receipt (inside its ciphertext).
    let original = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = original.lines().map(str::to_owned).collect();
    let mut first: Value = serde_json::from_str(&lines[0]).unwrap();
    let mut receipt = hex::decode(first["response"].as_str().unwrap()).unwrap();
    let middle = receipt.len() / 2;
    receipt[middle] ^= 0x01;
    first["response"] = Value::String(hex::encode(receipt));
    lines[0] = first.to_string();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let out = site.mqseal(&["audit", "verify", "--json"]).await;
    assert_eq!(out.code, 6, "{out:?}");
    assert_eq!(verify_summary(&out), (4, 1, 1));
    let bad = &json(&out)["records"][0];
    assert_eq!((bad["where"].as_str(), bad["verdict"].as_str()), (Some("line 1"), Some("failed")), "{bad}");
    assert!(bad["reason"].as_str().unwrap().contains("signature"), "{bad}");
    let text = site.mqseal(&["audit", "verify"]).await;
    assert_eq!(text.code, 6);
    assert!(text.stdout.contains("line 1: failed: au-1"), "{text:?}");

    // A challenge-mode record whose status is rewritten: the tag still
    // verifies, but over another outcome.
    let mut lines: Vec<String> = original.lines().map(str::to_owned).collect();
    let mut second: Value = serde_json::from_str(&lines[1]).unwrap();
    second["status"] = Value::String("failed".into());
    lines[1] = second.to_string();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let out = site.mqseal(&["audit", "verify", "--json"]).await;
    assert_eq!(out.code, 6, "{out:?}");
    let bad = &json(&out)["records"][1];
    assert_eq!((bad["where"].as_str(), bad["verdict"].as_str()), (Some("line 2"), Some("failed")), "{bad}");
    assert!(bad["reason"].as_str().unwrap().contains("the record says failed"), "{bad}");

    // A line that is not a record at all is reported, not skipped.
    std::fs::write(&path, original.clone() + "{\"device\":\n").unwrap();
    let out = site.mqseal(&["audit", "verify", "--json"]).await;
    assert_eq!(out.code, 6, "{out:?}");
    assert_eq!(json(&out)["records"][6]["where"], "line 7");

    // A rotated device's old records can no longer be checked, and say so.
    std::fs::write(&path, &original).unwrap();
    site.ok(&["device", "rotate", "au-2"]).await;
    let out = site.mqseal(&["audit", "verify", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(json(&out)["summary"]["unverifiable"], 2);
}

/// MongoDB: the records go to the store's database (`mqseal_audit`), not
/// to a file; a byte changed in the stored document fails naming its `_id`.
#[tokio::test]
async fn on_mongodb_the_log_is_a_collection_and_verify_names_a_changed_document() {
    let database = unique_database("e2e_audit");
    let site = Site::start(Store::Mongo { uri: mongodb_uri(), database: database.clone(), legacy: false }).await;
    let _agents = send_the_commands(&site).await;
    assert!(!site.dir.join("ctl/audit.jsonl").exists(), "MongoDB deployments log to MongoDB");
    check_records(&records(&site, &[]).await);
    let out = site.mqseal(&["audit", "verify", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(verify_summary(&out), (5, 0, 1));

    let client = mongodb::Client::with_uri_str(mongodb_uri()).await.unwrap();
    let log = client.database(&database).collection::<mongodb::bson::Document>("mqseal_audit");
    assert_eq!(log.count_documents(mongodb::bson::doc! {}).await.unwrap(), 6);
    let doc = log.find_one(mongodb::bson::doc! { "mode": "sealed" }).await.unwrap().unwrap();
    let id = doc.get_object_id("_id").unwrap();
    let mut receipt = hex::decode(doc.get_str("response").unwrap()).unwrap();
    receipt[40] ^= 0x80;
    log.update_one(
        mongodb::bson::doc! { "_id": id },
        mongodb::bson::doc! { "$set": { "response": hex::encode(receipt) } },
    )
    .await
    .unwrap();
    let out = site.mqseal(&["audit", "verify", "--json"]).await;
    assert_eq!(out.code, 6, "{out:?}");
    let bad = &json(&out)["records"][0];
    assert_eq!(bad["verdict"], "failed", "{bad}");
    assert!(bad["where"].as_str().unwrap().contains(&id.to_hex()), "{bad}");
    client.database(&database).drop().await.unwrap();
}

/// Two controllers on one host forwarding the MongoDB spool at once: each
/// spooled record reaches the collection once, and no record appended
/// meanwhile is removed with the spool.
#[tokio::test]
async fn concurrent_appends_forward_the_spool_once_and_lose_nothing() {
    use mqseal_store::{MongoConfig, MongoStore};
    let database = unique_database("e2e_spool");
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("audit-spool.jsonl");
    let waiting: String = (0..20).map(|i| format!("{{\"device\":\"spooled-{i}\",\"at\":{i}}}\n")).collect();
    std::fs::write(&spool, waiting).unwrap();
    let config = MongoConfig {
        uri: mongodb_uri(),
        database: database.clone(),
        collection: "mqtt_user".into(),
        legacy: None,
        timeout: std::time::Duration::from_secs(5),
    };
    // Each "controller" has its own client and its own opening of the
    // lock file, as two processes would.
    let mut tasks = Vec::new();
    for c in 0..6 {
        let store = MongoStore::connect(&config).await.unwrap();
        let log = store.audit_log("mqseal_audit", spool.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..3 {
                let record = serde_json::json!({ "device": format!("c{c}-{n}"), "at": 1000 + n });
                let appended = log.append(&[record]).await.unwrap();
                assert!(matches!(appended, mqseal_store::Appended::Stored), "{c}-{n}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let client = mongodb::Client::with_uri_str(mongodb_uri()).await.unwrap();
    let log = client.database(&database).collection::<mongodb::bson::Document>("mqseal_audit");
    let mut devices: Vec<String> = Vec::new();
    let mut cursor = log.find(mongodb::bson::doc! {}).await.unwrap();
    while cursor.advance().await.unwrap() {
        devices.push(cursor.deserialize_current().unwrap().get_str("device").unwrap().to_owned());
    }
    devices.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("spooled-{i}")).collect();
    expected.extend((0..6).flat_map(|c| (0..3).map(move |n| format!("c{c}-{n}"))));
    expected.sort();
    assert_eq!(devices, expected, "every record once");
    assert!(!spool.exists(), "the forwarded spool is removed");
    client.database(&database).drop().await.unwrap();
}

/// A broadcast whose broker goes away for good after one device answered:
/// it ends with the broker's exit code, and still records (and reports)
/// the answer it heard — the device ran the command — next to the device
/// it never heard from.
#[tokio::test]
async fn answers_heard_before_the_broker_went_away_for_good_are_recorded() {
    let mut site = Site::start(Store::File).await;
    for id in ["gone-1", "gone-2"] {
        site.add_device(id, &[]).await;
    }
    let agent = site.agent("gone-1").await;
    let run = site.spawn_mqseal(&["broadcast", "--devices", "gone-1,gone-2", "echo", "x", "--timeout", "6s", "--json"]);
    assert!(agent.wait_for("answered", 1, 10 * std::time::Duration::from_secs(1)).await, "{}", agent.text());
    // Let the answer reach the controller before the broker dies.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    site.kill_broker().await;
    let out = run.await.unwrap();
    assert_eq!(out.code, 5, "the broker was lost for good: {out:?}");
    let doc = json(&out);
    assert_eq!(
        (doc["results"][0]["outcome"].as_str(), doc["results"][1]["outcome"].as_str()),
        (Some("ok"), Some("timed_out")),
        "{doc}"
    );
    let log = std::fs::read_to_string(site.dir.join("ctl/audit.jsonl")).unwrap();
    let all: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(all.len(), 2, "{all:#?}");
    assert_eq!((all[0]["device"].as_str(), all[0]["outcome"].as_str()), (Some("gone-1"), Some("ok")));
    assert!(all[0]["response"].is_string(), "the device's tagged answer is kept");
    assert_eq!((all[1]["device"].as_str(), all[1]["outcome"].as_str()), (Some("gone-2"), Some("timed_out")));
}
