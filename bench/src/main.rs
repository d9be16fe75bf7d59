//! `mqseal-bench`: drives any MQTT 3.1.1 broker — mqseal-broker, Mosquitto
//! — with the same traffic, so their figures can be compared
//! from one run.
//!
//! The traffic is mqseal's own shape, so that mqseal-broker runs with its
//! authentication and ACL fully on and the peer broker is configured to
//! match (`provision` writes both sides' credentials): devices
//! `bench-dev-{i}` publish on their own `mqseal/v1/dev/{id}/resp` and
//! receive on their own `cmd`; the controller `bench-ctl` (granted every
//! device) subscribes with the wildcard `mqseal/v1/dev/+/resp`.
//!
//! Every scenario prints one JSON object on stdout (for scripts) and a line
//! for people on stderr. Nothing here asserts a speed: that is for the
//! person reading docs/BENCHMARKS.md.

#![forbid(unsafe_code)]

mod commands;
mod store_engines;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use serde_json::json;
use tokio::sync::{Notify, mpsc};

#[derive(Parser)]
#[command(name = "mqseal-bench", version, about = "Load generator for MQTT brokers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the bench users into an mqseal store and/or Mosquitto files.
    Provision(Provision),
    /// Publishers × subscribers: received messages per second.
    Throughput(Throughput),
    /// One publisher, many subscribers: deliveries per second.
    Fanout(Fanout),
    /// Command → response round trips through the broker: percentiles.
    Latency(Latency),
    /// N concurrent authenticated device connections opened at a given rate.
    Connections(Connections),
    /// Ping-pong between two sessions of mqseal's router core: what two
    /// trips through the router cost, with no socket.
    RouterHops(RouterHops),
    /// mqseal command round trips (plain, challenge, sealed) through a broker.
    CommandRtt(commands::CommandRtt),
    /// One broadcast to N simulated devices by the real `mqseal` CLI.
    Fleet(commands::Fleet),
    /// A connected fleet under a steady command rate: lost and duplicated
    /// executions, broker memory over time.
    Soak(commands::Soak),
    /// The broker's persistence workload (group commits of a queue, a
    /// reopen, a long queue) on redb and on fjall: one JSON object each.
    StoreEngines(store_engines::StoreEngines),
}

#[derive(Args)]
struct RouterHops {
    #[arg(long, default_value_t = 5000)]
    round_trips: usize,
}

#[derive(Args, Clone)]
struct Target {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Password of every bench device.
    #[arg(long, env = "MQSEAL_BENCH_SECRET")]
    secret: String,
    /// Password of the bench controller.
    #[arg(long, env = "MQSEAL_BENCH_CONTROLLER_PASSWORD")]
    controller_password: String,
    /// A label for the output (e.g. "mqseal", "mosquitto").
    #[arg(long, default_value = "broker")]
    label: String,
}

#[derive(Args)]
struct Provision {
    /// Number of devices `bench-dev-0..N`.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Password of every bench device.
    #[arg(long, env = "MQSEAL_BENCH_SECRET")]
    secret: String,
    /// Password of the bench controller (granted every device).
    #[arg(long, env = "MQSEAL_BENCH_CONTROLLER_PASSWORD")]
    controller_password: String,
    /// An mqseal file store to write.
    #[arg(long)]
    users_file: Option<PathBuf>,
    /// An mqseal MongoDB store to write.
    #[arg(long)]
    mongodb_uri: Option<String>,
    /// Database of the MongoDB store.
    #[arg(long, default_value = "mqseal")]
    database: String,
    /// Directory for Mosquitto's `passwd.txt` (plain, for `mosquitto_passwd -U`) and `acl`.
    #[arg(long)]
    mosquitto_dir: Option<PathBuf>,
    /// A RabbitMQ definitions file (`mqseal export rabbitmq`'s) for the
    /// same users.
    #[arg(long)]
    rabbitmq_definitions: Option<PathBuf>,
}

#[derive(Args)]
struct Throughput {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    #[arg(long, default_value_t = 4)]
    subscribers: usize,
    /// Messages published in total (split over the publishers); every
    /// subscriber receives all of them.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    #[arg(long, default_value_t = 256)]
    payload: usize,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Subscribers keep persistent sessions (clean-session off, fresh
    /// client ids each run): with a durable broker, every PUBACK then
    /// waits for the message to be on disk.
    #[arg(long)]
    persistent: bool,
}

#[derive(Args)]
struct Fanout {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    #[arg(long, default_value_t = 64)]
    payload: usize,
    #[arg(long, default_value_t = 0)]
    qos: u8,
}

#[derive(Args)]
struct Latency {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 5000)]
    round_trips: usize,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    #[arg(long, default_value_t = 64)]
    payload: usize,
}

#[derive(Args)]
struct Connections {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// How long the connections stay up, idle, once all are in.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
    /// Broker process to sample RSS from (/proc/PID/status).
    #[arg(long)]
    broker_pid: Option<u32>,
    /// After disconnecting, wait this long before the last RSS sample.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
}

type Failure = String;

fn device(i: usize) -> String {
    format!("bench-dev-{i}")
}

const CONTROLLER: &str = "bench-ctl";

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn client(t: &Target, client_id: &str, user: &str, password: &str, queue: usize) -> (AsyncClient, EventLoop) {
    client_with(t, client_id, user, password, queue, true)
}

fn client_with(
    t: &Target,
    client_id: &str,
    user: &str,
    password: &str,
    queue: usize,
    clean: bool,
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, t.host.clone(), t.port);
    opts.set_credentials(user, password);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_clean_session(clean);
    let (client, mut eventloop) = AsyncClient::new(opts, queue);
    let mut net = NetworkOptions::new();
    // A real client of a request/response protocol turns Nagle off; the
    // broker side is what the comparison is about.
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(30);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// Polls until CONNACK (or SUBACK when `subscribed` is asked for).
async fn until(eventloop: &mut EventLoop, want_suback: bool, deadline: Duration) -> Result<(), Failure> {
    let end = Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, eventloop.poll()).await {
            Err(_) => return Err("timed out".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                if ack.code != rumqttc::ConnectReturnCode::Success {
                    return Err(format!("refused: {:?}", ack.code));
                }
                if !want_suback {
                    return Ok(());
                }
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                let ok = ack.return_codes.iter().all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure));
                return if ok { Ok(()) } else { Err("subscription refused".into()) };
            }
            Ok(Ok(_)) => {}
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted.get(rank.min(sorted.len() - 1)).copied().unwrap_or(0)
}

async fn throughput(a: Throughput) -> Result<serde_json::Value, Failure> {
    let t = &a.target;
    let per_pub = a.messages / a.publishers.max(1);
    let expected = per_pub * a.publishers;
    let received = Arc::new(AtomicU64::new(0));
    let last = Arc::new(std::sync::Mutex::new(Instant::now()));
    let done = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(Notify::new());
    let mut subs = Vec::new();
    // Persistent subscribers get ids of their own each run, so that no
    // session (or queue) of an earlier run is resumed.
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    for s in 0..a.subscribers {
        let id = if a.persistent { format!("bench-sub-{s}-{run}") } else { format!("bench-sub-{s}") };
        let (c, mut el) = client_with(t, &id, CONTROLLER, &t.controller_password, 16, !a.persistent);
        c.subscribe("mqseal/v1/dev/+/resp", qos(a.qos)).await.map_err(|e| e.to_string())?;
        until(&mut el, true, Duration::from_secs(30)).await.map_err(|e| format!("subscriber {s}: {e}"))?;
        let (received, last, done, all_done) = (received.clone(), last.clone(), done.clone(), all_done.clone());
        let subscribers = a.subscribers;
        subs.push(tokio::spawn(async move {
            let mut mine = 0usize;
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        mine += 1;
                        received.fetch_add(1, Ordering::Relaxed);
                        if mine == expected {
                            if let Ok(mut l) = last.lock() {
                                *l = Instant::now();
                            }
                            if done.fetch_add(1, Ordering::AcqRel) + 1 == subscribers {
                                all_done.notify_one();
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            drop(c);
        }));
    }
    let mut pubs = Vec::new();
    let payload = Bytes::from(vec![b'x'; a.payload]);
    let mut ready = Vec::new();
    for p in 0..a.publishers {
        let id = device(p);
        let (c, mut el) = client(t, &id, &id, &t.secret, 1000);
        until(&mut el, false, Duration::from_secs(30)).await.map_err(|e| format!("publisher {id}: {e}"))?;
        ready.push((id, c, el));
    }
    let started = Instant::now();
    for (id, c, mut el) in ready {
        let topic = format!("mqseal/v1/dev/{id}/resp");
        let payload = payload.clone();
        let q = qos(a.qos);
        let want_acks = a.qos > 0;
        pubs.push(tokio::spawn(async move {
            let sender = tokio::spawn(async move {
                for _ in 0..per_pub {
                    if c.publish_bytes(topic.clone(), q, false, payload.clone()).await.is_err() {
                        break;
                    }
                }
                c
            });
            let mut acked = 0usize;
            let mut sent = 0usize;
            while (want_acks && acked < per_pub) || (!want_acks && sent < per_pub) {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => acked += 1,
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => sent += 1,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            // Keep the connection serviced until the subscribers are done.
            let _c = sender.await;
            loop {
                if el.poll().await.is_err() {
                    break;
                }
            }
        }));
    }
    let finished = tokio::time::timeout(Duration::from_secs(300), all_done.notified()).await.is_ok();
    let end = if finished { last.lock().map(|l| *l).unwrap_or_else(|_| Instant::now()) } else { Instant::now() };
    let secs = end.duration_since(started).as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    for h in subs.into_iter().chain(pubs) {
        h.abort();
    }
    let rate = got as f64 / secs.max(1e-9);
    eprintln!(
        "[{}] throughput qos{}{} {}x{} {}B: {} of {} received in {:.3}s = {:.0} msg/s",
        t.label,
        a.qos,
        if a.persistent { " persistent" } else { "" },
        a.publishers,
        a.subscribers,
        a.payload,
        got,
        expected * a.subscribers,
        secs,
        rate
    );
    Ok(
        json!({"scenario": "throughput", "label": t.label, "qos": a.qos, "persistent": a.persistent, "publishers": a.publishers,
        "subscribers": a.subscribers, "payload": a.payload, "expected": expected * a.subscribers,
        "received": got, "secs": secs, "received_per_sec": rate, "complete": finished}),
    )
}

async fn fanout(a: Fanout) -> Result<serde_json::Value, Failure> {
    let args = Throughput {
        target: a.target,
        publishers: 1,
        subscribers: a.subscribers,
        messages: a.messages,
        payload: a.payload,
        qos: a.qos,
        persistent: false,
    };
    let mut v = throughput(args).await?;
    if let Some(o) = v.as_object_mut() {
        o.insert("scenario".into(), json!("fanout"));
    }
    Ok(v)
}

async fn latency(a: Latency) -> Result<serde_json::Value, Failure> {
    let t = &a.target;
    let dev = device(0);
    let cmd = format!("mqseal/v1/dev/{dev}/cmd");
    let resp = format!("mqseal/v1/dev/{dev}/resp");
    let q = qos(a.qos);
    // The device: every command is answered on its response topic.
    let (dc, mut del) = client(t, &dev, &dev, &t.secret, 100);
    dc.subscribe(cmd.clone(), q).await.map_err(|e| e.to_string())?;
    until(&mut del, true, Duration::from_secs(30)).await.map_err(|e| format!("device: {e}"))?;
    let device_task = tokio::spawn(echo_device(dc, del, resp.clone(), q));
    let (cc, mut cel) = client(t, "bench-requester", CONTROLLER, &t.controller_password, 100);
    cc.subscribe(resp.clone(), q).await.map_err(|e| e.to_string())?;
    until(&mut cel, true, Duration::from_secs(30)).await.map_err(|e| format!("controller: {e}"))?;
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let ctl_task = tokio::spawn(async move {
        loop {
            match cel.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    if tx.send(()).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let payload = Bytes::from(vec![b'c'; a.payload]);
    let warmup = 200.min(a.round_trips / 10 + 1);
    let mut samples = Vec::with_capacity(a.round_trips);
    let mut lost = 0usize;
    for i in 0..warmup + a.round_trips {
        let t0 = Instant::now();
        cc.publish_bytes(cmd.clone(), q, false, payload.clone()).await.map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(())) => {
                if i >= warmup {
                    samples.push(t0.elapsed().as_micros() as u64);
                }
            }
            _ => lost += 1,
        }
    }
    device_task.abort();
    ctl_task.abort();
    samples.sort_unstable();
    let (p50, p90, p99) = (percentile(&samples, 50.0), percentile(&samples, 90.0), percentile(&samples, 99.0));
    eprintln!(
        "[{}] latency qos{}: {} round trips, p50 {p50} µs, p90 {p90} µs, p99 {p99} µs, lost {lost}",
        t.label,
        a.qos,
        samples.len()
    );
    Ok(json!({"scenario": "latency", "label": t.label, "qos": a.qos, "round_trips": samples.len(),
        "p50_us": p50, "p90_us": p90, "p99_us": p99, "max_us": samples.last().copied().unwrap_or(0), "lost": lost}))
}

/// The plain request/response yardstick's device: answers every request on
/// `resp` with the request itself, until its connection ends.
async fn echo_device(c: AsyncClient, mut el: EventLoop, resp: String, q: QoS) {
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if c.try_publish(resp.clone(), q, false, p.payload).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

pub(crate) fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn connections(a: Connections) -> Result<serde_json::Value, Failure> {
    let t = a.target.clone();
    let before = rss_kib(a.broker_pid);
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(tokio::sync::watch::channel(false).0);
    let (done_tx, mut done_rx) = mpsc::channel::<Duration>(a.count.max(1));
    let started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / f64::from(a.rate.max(1)));
    let mut tick = tokio::time::interval(gap);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut handles = Vec::with_capacity(a.count);
    for i in 0..a.count {
        tick.tick().await;
        let (t, ok, failed, errors, done_tx) = (t.clone(), ok.clone(), failed.clone(), errors.clone(), done_tx.clone());
        let mut stop_rx = stop.subscribe();
        handles.push(tokio::spawn(async move {
            let id = device(i);
            let (c, mut el) = client(&t, &id, &id, &t.secret, 4);
            let t0 = Instant::now();
            match until(&mut el, false, Duration::from_secs(30)).await {
                Ok(()) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                    let _ = done_tx.send(t0.elapsed()).await;
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut v) = errors.lock()
                        && v.len() < 5
                    {
                        v.push(format!("{id}: {e}"));
                    }
                    let _ = done_tx.send(Duration::MAX).await;
                    return;
                }
            }
            loop {
                tokio::select! {
                    r = el.poll() => if r.is_err() { return; },
                    _ = stop_rx.changed() => break,
                }
            }
            let _ = c.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), async { while el.poll().await.is_ok() {} }).await;
        }));
    }
    drop(done_tx);
    let mut connect_times = Vec::with_capacity(a.count);
    while let Some(d) = done_rx.recv().await {
        if d != Duration::MAX {
            connect_times.push(d.as_micros() as u64);
        }
        if connect_times.len() + failed.load(Ordering::Relaxed) >= a.count {
            break;
        }
    }
    let storm = started.elapsed();
    tokio::time::sleep(Duration::from_secs(a.hold_secs)).await;
    let during = rss_kib(a.broker_pid);
    let _ = stop.send(true);
    for h in handles {
        let _ = tokio::time::timeout(Duration::from_secs(30), h).await;
    }
    tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
    let after = rss_kib(a.broker_pid);
    connect_times.sort_unstable();
    let okn = ok.load(Ordering::Relaxed);
    let per_conn = match (before, during) {
        (Some(b), Some(d)) if okn > 0 => Some((d.saturating_sub(b)) as f64 / okn as f64),
        _ => None,
    };
    let errors = errors.lock().map(|v| v.clone()).unwrap_or_default();
    eprintln!(
        "[{}] connections: {okn} ok, {} failed, storm {:.2}s, connect p50 {} µs p99 {} µs, RSS KiB before {:?} during {:?} after {:?} ({:?} KiB/conn) {}",
        t.label,
        failed.load(Ordering::Relaxed),
        storm.as_secs_f64(),
        percentile(&connect_times, 50.0),
        percentile(&connect_times, 99.0),
        before,
        during,
        after,
        per_conn.map(|p| (p * 100.0).round() / 100.0),
        errors.join("; ")
    );
    Ok(json!({"scenario": "connections", "label": t.label, "count": a.count, "rate": a.rate, "ok": okn,
        "failed": failed.load(Ordering::Relaxed), "storm_secs": storm.as_secs_f64(),
        "connect_p50_us": percentile(&connect_times, 50.0), "connect_p99_us": percentile(&connect_times, 99.0),
        "rss_before_kib": before, "rss_during_kib": during, "rss_after_kib": after, "kib_per_connection": per_conn,
        "errors": errors}))
}

fn router_hops(a: RouterHops) -> Result<serde_json::Value, Failure> {
    use mqseal_router::{ConnectRequest, Limits, Message, Outgoing, QoS, Router, SubOptions};
    // The same ping-pong as the rumqttd figure in docs/BENCHMARKS.md, through
    // mqseal's router core: A publishes on hop/ping, B receives it and
    // answers on hop/pong, A receives that. Two router passes per round trip,
    // QoS 1 with the acks, no socket and no thread hand-off — the router is
    // called in place, as the broker's connection tasks call it.
    let mut router = Router::new(Limits::default());
    let mut open = |id: &str| {
        let req = ConnectRequest {
            client_id: id.into(),
            clean_start: true,
            session_expiry_secs: 0,
            receive_maximum: 100,
            will: None,
        };
        router.connect(req, 0).conn
    };
    let (ca, cb) = (open("hop-a"), open("hop-b"));
    let q1 = SubOptions::qos(QoS::AtLeastOnce);
    router.subscribe(ca, "hop/pong", q1, 0).map_err(|e| e.to_string())?;
    router.subscribe(cb, "hop/ping", q1, 0).map_err(|e| e.to_string())?;
    let payload = Bytes::from(vec![0u8; 64]);
    let hop = |router: &mut Router, from, to, topic: &str| -> Result<(), Failure> {
        router
            .publish(Some(from), Message::new(topic, payload.clone(), QoS::AtLeastOnce, false), 0)
            .map_err(|e| e.to_string())?;
        match router.poll_transmit(to, 0) {
            Some(Outgoing::Publish(d)) => router.puback(to, d.pkid).map(|_| ()).map_err(|e| e.to_string()),
            other => Err(format!("expected a delivery, got {other:?}")),
        }
    };
    let warmup = 200;
    let mut samples = Vec::with_capacity(a.round_trips);
    for i in 0..warmup + a.round_trips {
        let t0 = Instant::now();
        hop(&mut router, ca, cb, "hop/ping")?;
        hop(&mut router, cb, ca, "hop/pong")?;
        if i >= warmup {
            samples.push(t0.elapsed().as_nanos() as u64);
        }
    }
    samples.sort_unstable();
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    eprintln!(
        "[mqseal router core alone] {} round trips (two router passes each): p50 {p50} ns, p99 {p99} ns",
        samples.len()
    );
    Ok(
        json!({"scenario": "router_hops", "label": "mqseal-router", "round_trips": samples.len(), "p50_ns": p50, "p99_ns": p99}),
    )
}

async fn provision(a: Provision) -> Result<serde_json::Value, Failure> {
    use mqseal_store::{Role, UserRecord};
    let mut records = Vec::with_capacity(a.devices + 1);
    for i in 0..a.devices {
        records.push(UserRecord::device(&device(i), a.secret.as_bytes()).map_err(|e| e.to_string())?);
    }
    let mut ctl = UserRecord::human(CONTROLLER, a.controller_password.as_bytes(), Role::Controller, 1000)
        .map_err(|e| e.to_string())?;
    ctl.grants = vec!["*".into()];
    records.push(ctl);
    if let Some(path) = &a.users_file {
        let store = mqseal_store::FileStore::open(path).map_err(|e| e.to_string())?;
        store.put_many(&records).await.map_err(|e| e.to_string())?;
    }
    if let Some(uri) = &a.mongodb_uri {
        let config = mqseal_store::MongoConfig {
            uri: uri.clone(),
            database: a.database.clone(),
            collection: "mqtt_user".into(),
            legacy: None,
            timeout: Duration::from_secs(30),
        };
        let store = mqseal_store::MongoStore::connect(&config).await.map_err(|e| e.to_string())?;
        store.ensure_index().await.map_err(|e| e.to_string())?;
        store.put_many(&records).await.map_err(|e| e.to_string())?;
    }
    if let Some(dir) = &a.mosquitto_dir {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let mut passwd = String::new();
        for i in 0..a.devices {
            passwd.push_str(&format!("{}:{}\n", device(i), a.secret));
        }
        passwd.push_str(&format!("{CONTROLLER}:{}\n", a.controller_password));
        mqseal_store::write_private(&dir.join("passwd.txt"), passwd.as_bytes()).map_err(|e| e.to_string())?;
        // mqseal's default rules, in Mosquitto's ACL language.
        let acl = format!(
            "user {CONTROLLER}\ntopic write mqseal/v1/dev/+/cmd\ntopic write mqseal/v1/dev/+/chal/req\n\
             topic read mqseal/v1/dev/+/resp\ntopic read mqseal/v1/dev/+/chal\ntopic read mqseal/v1/dev/+/status\n\n\
             pattern read mqseal/v1/dev/%u/cmd\npattern read mqseal/v1/dev/%u/chal/req\n\
             pattern write mqseal/v1/dev/%u/resp\npattern write mqseal/v1/dev/%u/chal\npattern write mqseal/v1/dev/%u/status\n"
        );
        std::fs::write(dir.join("acl"), acl).map_err(|e| e.to_string())?;
    }
    if let Some(path) = &a.rabbitmq_definitions {
        let mut passwords = std::collections::HashMap::new();
        for r in &records {
            let pw = if r.username == CONTROLLER { &a.controller_password } else { &a.secret };
            passwords.insert(r.username.clone(), zeroize::Zeroizing::new(pw.clone()));
        }
        let (defs, _) =
            mqseal_controller::export::rabbitmq::definitions(&records, &passwords, "/", &mut mqseal_client::rng());
        let text = serde_json::to_string(&defs).map_err(|e| e.to_string())?;
        mqseal_store::write_private(path, text.as_bytes()).map_err(|e| e.to_string())?;
    }
    eprintln!("provisioned {} devices and {CONTROLLER}", a.devices);
    Ok(json!({"scenario": "provision", "devices": a.devices}))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Latency runs on one thread: the device, the requester and their event
    // loops then hand messages to each other without waking another core,
    // so the figure is the broker's, not the load generator's scheduling.
    // The load scenarios want both cores.
    let runtime = match &cli.command {
        Command::Latency(_) | Command::CommandRtt(_) => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        _ => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mqseal-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Provision(a) => provision(a).await,
            Command::Throughput(a) => throughput(a).await,
            Command::Fanout(a) => fanout(a).await,
            Command::Latency(a) => latency(a).await,
            Command::Connections(a) => connections(a).await,
            Command::CommandRtt(a) => commands::command_rtt(a).await,
            Command::Fleet(a) => commands::fleet(a).await,
            Command::Soak(a) => commands::soak(a).await,
            Command::RouterHops(a) => {
                tokio::task::spawn_blocking(move || router_hops(a)).await.unwrap_or_else(|e| Err(e.to_string()))
            }
            Command::StoreEngines(a) => tokio::task::spawn_blocking(move || store_engines::store_engines(a))
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
        }
    });
    match result {
        // A scenario that measures several things (store-engines: one per
        // engine) prints one object per line.
        Ok(serde_json::Value::Array(vs)) => {
            for v in vs {
                println!("{v}");
            }
            ExitCode::SUCCESS
        }
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqseal-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
