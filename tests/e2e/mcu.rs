//! The microcontroller agent (`mqseal-mcu-agent`, `#![no_std]`) on the
//! host: the very crate a Cortex-M links, driven through std
//! implementations of its traits — a tokio `TcpStream` behind
//! `embedded-io-adapters`, embassy-time's std driver, the OS RNG — against
//! the real `mqseal-broker`, provisioned and commanded by the real `mqseal`
//! CLI. Attacks come from mosquitto_pub, a third-party client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use embedded_io_adapters::tokio_1::FromTokio;
use mqseal_agent::config::AgentConfig;
use mqseal_mcu_agent::net::{self, Device, Event};
use mqseal_mcu_agent::sealed::SealedMode;
use mqseal_mcu_agent::{Agent, Call, Clock, Done, ENVELOPE_LEN, Registered};
use mqseal_proto::topic::Channel;
use mqseal_tests::broker::Store;
use mqseal_tests::site::Site;
use mqseal_tests::topic;

const SECOND: Duration = Duration::from_secs(1);

/// What the firmware saw: every call it ran, every event of the loop.
#[derive(Default)]
struct Seen {
    ran: Vec<String>,
    rejected: Vec<String>,
    connected: usize,
}

type Shared = Arc<Mutex<Seen>>;

fn seen(shared: &Shared) -> std::sync::MutexGuard<'_, Seen> {
    shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn wait_until(shared: &Shared, what: &str, f: impl Fn(&Seen) -> bool) {
    let deadline = Instant::now() + 10 * SECOND;
    while !f(&seen(shared)) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the no_std agent for the device whose bundle is `bundle`, on its own
/// thread (its futures borrow the stack, as on a board), reconnecting after
/// a second when a connection ends.
fn start_mcu_agent(bundle: &Path, port: u16, shared: Shared) {
    let config = AgentConfig::load(bundle).unwrap();
    let keys = config.keys(bundle).unwrap();
    let password = config.broker.password(bundle.parent().unwrap()).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            static HIDDEN: [Registered<'static>; 2] =
                [Registered { name: "open", args: &["25"] }, Registered { name: "open", args: &["50"] }];
            let id = config.device_id.as_str();
            let policy = config.policy.policy();
            let sealed = SealedMode::new(&keys.private, &keys.controllers, policy, 64);
            let mut agent: Agent<'_, 4> =
                Agent::new(id, &keys.hmac, policy, 30_000, &HIDDEN).unwrap().with_sealed(sealed);
            let status = agent.topic(Channel::Status).unwrap();
            // Sealed RSA-2048 envelopes are ~700 bytes: larger buffers than
            // the challenge-only RX_LEN/TX_LEN a small board would use.
            let (mut rx, mut tx) = (vec![0u8; 4096], vec![0u8; 4096]);
            let mut session = net::session(&mut rx, &mut tx, id, password.as_bytes(), &status, 30).unwrap();
            let started = Instant::now();
            let log_to = shared.clone();
            let mut commands = move |call: &Call<'_>, output: &mut [u8]| -> Done {
                let args: Vec<&str> = call.args.iter().collect();
                let line = format!("{} {}", call.name, args.join(" "));
                seen(&shared).ran.push(line.trim_end().to_owned());
                match (call.name, args.as_slice()) {
                    ("open", [_]) => Done::ok(0),
                    ("level", [n]) => {
                        let reply = format!("level={n}");
                        output[..reply.len()].copy_from_slice(reply.as_bytes());
                        Done::ok(reply.len())
                    }
                    ("level", _) => Done::bad_arguments(),
                    _ => Done::unknown(),
                }
            };
            let mut device = Device {
                rng: &mut mqseal_client::rng(),
                commands: &mut commands,
                clock: || Clock {
                    monotonic_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    unix_secs: Some(mqseal_client::unix_now()),
                },
                log: |e: Event| match e {
                    Event::Connected => seen(&log_to).connected += 1,
                    Event::Rejected(why) => seen(&log_to).rejected.push(why.to_string()),
                    Event::Answered(_) => {}
                },
            };
            let mut out = [0u8; ENVELOPE_LEN];
            loop {
                if let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = stream.set_nodelay(true);
                    let why = net::serve(&mut session, FromTokio::new(stream), &mut agent, &mut device, &mut out).await;
                    eprintln!("mcu agent: connection ended: {why}");
                }
                tokio::time::sleep(SECOND).await;
            }
        });
    });
}

#[tokio::test]
async fn no_std_agent_against_the_real_broker_and_cli() {
    let site = Site::start(Store::File).await;
    let bundle = site.add_device("mcu-1", &[]).await;
    let shared = Shared::default();
    start_mcu_agent(&bundle, site.broker.port(), shared.clone());
    wait_until(&shared, "the agent to connect", |s| s.connected == 1).await;

    // Its status is the Linux agent's: retained `online`.
    let list = site.ok(&["device", "list", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v["devices"][0]["status"].as_str(), Some("online"), "{list}");

    // Hidden form: the device identifies `open 25` among its registrations.
    let capture = site.capture(&topic("mcu-1", "cmd")).await;
    let out = site.mqseal(&["send", "mcu-1", "open", "25", "--mode", "challenge", "--hidden", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["status"].as_str(), Some("ok"), "{v}");
    let hidden_wire = capture.bytes().await;
    assert!(!hidden_wire.windows(4).any(|w| w == b"open"), "hidden form carries no name");
    assert_eq!(seen(&shared).ran, ["open 25"]);

    // Not registered in hidden form: nothing runs, no answer (exit 4).
    let out = site.mqseal(&["send", "mcu-1", "open", "26", "--mode", "challenge", "--hidden", "--timeout", "2s"]).await;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(seen(&shared).rejected.iter().any(|r| r.contains("tag")), "{:?}", seen(&shared).rejected);

    // Explicit form: the handler's output comes back, tagged.
    let capture = site.capture(&topic("mcu-1", "cmd")).await;
    let out = site.mqseal(&["send", "mcu-1", "level", "7", "--mode", "challenge"]).await;
    assert_eq!((out.code, out.stdout.trim()), (0, "level=7"), "{out:?}");
    let explicit_wire = capture.bytes().await;
    // A handler's own verdicts travel as statuses: exit 3.
    let out = site.mqseal(&["send", "mcu-1", "level", "--mode", "challenge"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    let out = site.mqseal(&["send", "mcu-1", "reboot", "--mode", "challenge"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    let ran_before = seen(&shared).ran.clone();
    assert_eq!(ran_before, ["open 25", "level 7", "level", "reboot"]);

    // Sealed mode (feature `sealed`): RSA-signed and encrypted, as `send`'s default.
    let capture = site.capture(&topic("mcu-1", "cmd")).await;
    let out = site.mqseal(&["send", "mcu-1", "level", "3"]).await;
    assert_eq!((out.code, out.stdout.trim()), (0, "level=3"), "{out:?}");
    let sealed_wire = capture.bytes().await;
    let ran_before = seen(&shared).ran.clone();

    // Attacks with a third-party client: replays of all three, one flipped
    // byte of each, junk, and a copy moved to another device's topic.
    let rejected_before = seen(&shared).rejected.len();
    let mut attacks = 0;
    for frame in [&hidden_wire, &explicit_wire, &sealed_wire] {
        site.publish_raw(&topic("mcu-1", "cmd"), frame).await;
        let mut t = frame.clone();
        let mid = t.len() / 2;
        t[mid] ^= 0x40;
        site.publish_raw(&topic("mcu-1", "cmd"), &t).await;
        attacks += 2;
    }
    site.publish_raw(&topic("mcu-1", "cmd"), b"\x01\x05garbage").await;
    attacks += 1;
    wait_until(&shared, "every attack to be rejected", |s| s.rejected.len() >= rejected_before + attacks).await;
    let rejected = seen(&shared).rejected[rejected_before..].to_vec();
    assert!(rejected.iter().filter(|r| r.contains("challenge")).count() >= 2, "challenge replays: {rejected:?}");
    assert!(rejected.iter().any(|r| r.contains("replay") || r.contains("seen")), "sealed replay: {rejected:?}");
    assert_eq!(seen(&shared).ran, ran_before, "no attack ran anything");

    // A sealed command captured on its way to another device, moved here.
    site.add_device("mcu-2", &[]).await;
    let capture = site.capture(&topic("mcu-2", "cmd")).await;
    let out = site.mqseal(&["send", "mcu-2", "level", "1", "--timeout", "2s"]).await;
    assert_eq!(out.code, 4, "mcu-2 has no agent: {out:?}");
    let other = capture.bytes().await;
    let before = seen(&shared).rejected.len();
    site.publish_raw(&topic("mcu-1", "cmd"), &other).await;
    wait_until(&shared, "the moved command to be rejected", |s| s.rejected.len() > before).await;
    let why = seen(&shared).rejected[before].clone();
    assert!(why.contains("device") || why.contains("topic"), "{why}");
    assert_eq!(seen(&shared).ran, ran_before);

    // A publish larger than the device's receive buffer (4 KiB here,
    // announced as MQTT 5's Maximum Packet Size) never reaches it: the
    // broker discards it for this client instead of breaking its connection.
    let before = seen(&shared).rejected.len();
    site.publish_raw(&topic("mcu-1", "cmd"), &vec![0x01; 6000]).await;
    tokio::time::sleep(SECOND).await;
    assert_eq!(seen(&shared).rejected.len(), before, "the oversized publish reached the agent");

    // After all that the device still serves genuine commands.
    let out = site.mqseal(&["send", "mcu-1", "level", "9", "--mode", "challenge"]).await;
    assert_eq!((out.code, out.stdout.trim()), (0, "level=9"), "{out:?}");
    assert_eq!(seen(&shared).connected, 1, "one connection throughout");
}
