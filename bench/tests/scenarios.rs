//! Every scenario of `mqseal-bench`, small, against a real mqseal-broker
//! (auth and ACL on): the tool must keep working, and at these sizes
//! nothing may be lost — a lost message here is a broker bug, not noise.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_mqseal-bench");

async fn bench(args: &[&str]) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(BENCH)
            .args(args)
            .env("MQSEAL_BENCH_SECRET", "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
            .env("MQSEAL_BENCH_CONTROLLER_PASSWORD", "controller-pw")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("mqseal-bench {args:?} hung"))
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mqseal-bench {args:?}: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_lossless_against_mqseal_broker() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.json");
    let v = bench(&["provision", "--devices", "60", "--users-file", users.to_str().unwrap()]).await;
    assert_eq!(v["devices"], 60);

    let mut config = mqseal_broker::config::Config { data_dir: dir.path().to_owned(), ..Default::default() };
    config.listener.bind = Some("127.0.0.1:0".parse().unwrap());
    config.auth.pbkdf2_iterations = 1000;
    let running = mqseal_broker::start(config).await.unwrap();
    let port = running.tcp.unwrap().port().to_string();
    let pid = std::process::id().to_string();

    for qos in ["0", "1"] {
        let v = bench(&[
            "throughput",
            "--port",
            &port,
            "--messages",
            "4000",
            "--publishers",
            "2",
            "--subscribers",
            "2",
            "--qos",
            qos,
        ])
        .await;
        assert_eq!(v["received"], v["expected"], "{v}");
        assert_eq!(v["expected"], 8000);
        assert!(v["received_per_sec"].as_f64().unwrap() > 0.0);
    }
    let v = bench(&["fanout", "--port", &port, "--subscribers", "20", "--messages", "50", "--qos", "1"]).await;
    assert_eq!((v["scenario"].as_str(), v["received"].as_u64()), (Some("fanout"), Some(1000)), "{v}");
    let v = bench(&["latency", "--port", &port, "--round-trips", "200"]).await;
    assert_eq!((v["round_trips"].as_u64(), v["lost"].as_u64()), (Some(200), Some(0)), "{v}");
    assert!(v["p50_us"].as_u64().unwrap() <= v["p99_us"].as_u64().unwrap());
    let v = bench(&[
        "connections",
        "--port",
        &port,
        "--count",
        "50",
        "--rate",
        "500",
        "--hold-secs",
        "0",
        "--settle-secs",
        "0",
        "--broker-pid",
        &pid,
    ])
    .await;
    assert_eq!((v["ok"].as_u64(), v["failed"].as_u64()), (Some(50), Some(0)), "{v}");
    assert!(v["rss_during_kib"].as_u64().unwrap() > 0);

    // Command round trips through the real agent core and controller
    // session: every one verified, in every mode (prefetch included).
    for mode in ["plain", "challenge", "challenge-prefetch", "sealed"] {
        let v = bench(&[
            "command-rtt",
            "--port",
            &port,
            "--mode",
            mode,
            "--round-trips",
            "20",
            "--bits",
            "2048",
            "--think-ms",
            "2",
        ])
        .await;
        assert_eq!((v["round_trips"].as_u64(), v["lost"].as_u64()), (Some(20), Some(0)), "{mode}: {v}");
    }
    // A broadcast by the real `mqseal` binary (built next to this one by
    // `cargo build --workspace --bins`) to a simulated fleet.
    let mqseal = std::path::Path::new(BENCH).with_file_name("mqseal");
    assert!(mqseal.exists(), "{} missing: run `cargo build --workspace --bins` first", mqseal.display());
    let v = bench(&[
        "fleet",
        "--port",
        &port,
        "--devices",
        "40",
        "--bits",
        "2048",
        "--timeout-secs",
        "20",
        "--mqseal",
        mqseal.to_str().unwrap(),
    ])
    .await;
    assert_eq!(v["summary"], serde_json::json!({ "ok": 40, "failed": 0, "timed_out": 0 }), "{v}");
    assert_eq!(v["rejected"], 0, "{v}");

    // A wrong password is a failed connection, reported as such.
    let out = tokio::process::Command::new(BENCH)
        .args(["latency", "--port", &port, "--round-trips", "1", "--secret", "wrong", "--controller-password", "x"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"), "{}", String::from_utf8_lossy(&out.stderr));
    running.shutdown(Duration::from_secs(2)).await;
}

/// The soak, short by default (500 devices, 100 commands/s, 10 s; the full
/// run of docs/BENCHMARKS.md is `MQSEAL_SOAK_DEVICES=10000
/// MQSEAL_SOAK_RATE=500 MQSEAL_SOAK_SECS=60`): every command is executed
/// exactly once — counted on the simulated devices — and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soak_loses_nothing_and_runs_nothing_twice() {
    let knob = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (devices, rate, secs) =
        (knob("MQSEAL_SOAK_DEVICES", 500), knob("MQSEAL_SOAK_RATE", 100), knob("MQSEAL_SOAK_SECS", 10));
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.json");
    bench(&["provision", "--devices", &devices.to_string(), "--users-file", users.to_str().unwrap()]).await;
    let mut config = mqseal_broker::config::Config { data_dir: dir.path().to_owned(), ..Default::default() };
    config.listener.bind = Some("127.0.0.1:0".parse().unwrap());
    config.auth.pbkdf2_iterations = 1000;
    config.limits.max_connections = usize::try_from(devices).unwrap() + 100;
    let running = mqseal_broker::start(config).await.unwrap();
    let port = running.tcp.unwrap().port().to_string();
    let pid = std::process::id().to_string();
    let v = bench(&[
        "soak",
        "--port",
        &port,
        "--devices",
        &devices.to_string(),
        "--rate",
        &rate.to_string(),
        "--duration-secs",
        &secs.to_string(),
        "--broker-pid",
        &pid,
    ])
    .await;
    eprintln!("{v}");
    assert!(v["sent"].as_u64().unwrap() >= rate * secs * 9 / 10, "the rate was kept: {v}");
    assert_eq!((v["lost"].as_u64(), v["duplicated"].as_u64()), (Some(0), Some(0)), "{v}");
    assert_eq!(v["ok"], v["sent"], "every command answered: {v}");
    assert_eq!(v["warmup"]["ok"], v["warmup"]["sent"], "the warm-up too: {v}");
    assert_eq!((v["timed_out"].as_u64(), v["failed"].as_u64(), v["rejected"].as_u64()), (Some(0), Some(0), Some(0)));
    running.shutdown(Duration::from_secs(2)).await;
}
