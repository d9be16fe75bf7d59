//! Benchmarks of mqseal commands end to end, through a running broker.
//!
//! * `command-rtt`: one device, one controller; the time from "send" to "the
//!   device's response has verified", for a plain MQTT request/response
//!   (the yardstick: same broker, same QoS, same think time) and for each
//!   envelope mode. The device side is the real agent core
//!   (`mqseal_agent::agent`), executing the built-in `noop`.
//! * `fleet`: N simulated devices in this process (the same agent core per
//!   device, in memory, on rumqttc connections), and the real `mqseal
//!   broadcast --all` as a separate process, whose own wall and CPU time are
//!   the controller's part.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, ValueEnum};
use mqseal_agent::agent::{Action, Agent, Now, Restore};
use mqseal_agent::config::{AgentConfig, Keys};
use mqseal_agent::exec::Ran;
use mqseal_agent::state::StateFile;
use mqseal_client::{BrokerEndpoint, rng};
use mqseal_controller::registry::DeviceKeys;
use mqseal_controller::session::{DeviceResult, Finished, Mode, Request, Session};
use mqseal_proto::challenge::HmacKey;
use mqseal_proto::sealed::{Keyring, PrivateKey};
use mqseal_proto::{Policy, Status};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeFilter};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

use crate::{CONTROLLER, Failure, Target, client, device, echo_device, percentile, until};

/// `command-rtt`
#[derive(Args)]
pub struct CommandRtt {
    #[command(flatten)]
    target: Target,
    /// What to measure.
    #[arg(long, value_enum)]
    mode: RttMode,
    #[arg(long, default_value_t = 500)]
    round_trips: usize,
    /// RSA modulus of both keys (sealed mode).
    #[arg(long, default_value_t = 3072)]
    bits: usize,
    /// Pause between round trips (same for every mode).
    #[arg(long, default_value_t = 5)]
    think_ms: u64,
    /// Keep the agent's replay state on disk here (fsync per command, as
    /// the real agent does); in memory when absent.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

/// What `command-rtt` measures.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum RttMode {
    /// Plain MQTT: the device echoes the request.
    Plain,
    /// Challenge mode, a fresh challenge per command (two round trips).
    Challenge,
    /// Challenge mode with the next challenge fetched ahead (one round trip).
    ChallengePrefetch,
    /// Sealed mode.
    Sealed,
}

/// Keys of the simulated side.
struct Material {
    controller: PrivateKey,
    device: Arc<PrivateKey>,
}

impl Material {
    fn new(bits: usize) -> Result<Material, Failure> {
        let g = |b| PrivateKey::generate(&mut rng(), b).map_err(|e| e.to_string());
        Ok(Material { controller: g(bits)?, device: Arc::new(g(bits)?) })
    }

    fn agent(&self, id: &str, hmac: &HmacKey, state: Option<StateFile>) -> Result<Agent, Failure> {
        let controllers: Keyring = [self.controller.public().clone()].into_iter().collect();
        let keys = Keys { hmac: hmac.clone(), private: self.device.clone(), controllers };
        let commands: BTreeMap<_, _> = AgentConfig::default_commands();
        Agent::new(
            id,
            keys,
            Policy::default(),
            30_000,
            4096,
            commands,
            state,
            Restore::Load,
            Now::since(Instant::now()),
        )
        .map_err(|e| e.to_string())
    }
}

/// Drives one simulated device until `stop`: every publish goes through the
/// agent core, and `noop`-like built-ins run inline.
async fn run_device(
    client: AsyncClient,
    mut el: EventLoop,
    mut agent: Agent,
    mut stop: watch::Receiver<bool>,
    rejected: Arc<AtomicUsize>,
    executed: Option<Executions>,
) {
    let started = Instant::now();
    loop {
        tokio::select! {
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    match agent.handle(&p.topic, &p.payload, Now::since(started), &mut rng()) {
                        Ok(Action::Challenge(out) | Action::Resend(out)) => {
                            let _ = client.try_publish(out.topic, QoS::AtLeastOnce, false, out.payload);
                        }
                        Ok(Action::Execute(job)) => {
                            if let Some(ex) = &executed {
                                ex.record(agent.id(), &job.args.join(" "));
                            }
                            let ran = Ran { status: Status::Ok, code: 0, output: Zeroizing::new(Vec::new()) };
                            if let Ok((out, _)) = agent.finish(job, &ran, Now::since(started), &mut rng()) {
                                let _ = client.try_publish(out.topic, QoS::AtLeastOnce, false, out.payload);
                            }
                        }
                        Err(reason) => {
                            if rejected.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("{}: rejected: {reason}", agent.id());
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
            _ = stop.changed() => return,
        }
    }
}

/// Every execution on the simulated devices, by device and arguments: a
/// command run twice shows as a count of 2, one never run as a gap.
#[derive(Clone, Default)]
pub(crate) struct Executions(Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>);

impl Executions {
    fn record(&self, device: &str, args: &str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(format!("{device} {args}")).or_insert(0) += 1;
        }
    }

    /// (distinct commands executed, executions beyond the first).
    pub(crate) fn tally(&self) -> (usize, u64) {
        self.0.lock().map_or((0, 0), |m| (m.len(), m.values().map(|&n| u64::from(n.saturating_sub(1))).sum()))
    }
}

/// A simulated fleet, connected: each device's id and HMAC key (they share
/// one RSA key, `material.device`).
pub(crate) struct Started {
    pub(crate) devices: Vec<(String, HmacKey)>,
    pub(crate) connect_secs: f64,
}

/// Connects `n` simulated devices (`bench-dev-0..n`) at `rate` per second,
/// each running the real agent core in memory until `stop`.
async fn start_fleet(
    t: &Target,
    material: &Arc<Material>,
    n: usize,
    rate: u32,
    stop_rx: &watch::Receiver<bool>,
    rejected: &Arc<AtomicUsize>,
    executed: Option<Executions>,
) -> Result<Started, Failure> {
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(String, HmacKey), Failure>>(n.max(1));
    let gap = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut tick = tokio::time::interval(gap);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let connect_started = Instant::now();
    for i in 0..n {
        tick.tick().await;
        let (t, material, stop_rx, rejected, ready_tx, executed) =
            (t.clone(), material.clone(), stop_rx.clone(), rejected.clone(), ready_tx.clone(), executed.clone());
        tokio::spawn(async move {
            let id = device(i);
            let hmac = HmacKey::generate(&mut rng());
            let agent = match material.agent(&id, &hmac, None) {
                Ok(a) => a,
                Err(e) => {
                    let _ = ready_tx.send(Err(e)).await;
                    return;
                }
            };
            match connect_device(&t, &id).await {
                Ok((c, el)) => {
                    let _ = ready_tx.send(Ok((id, hmac))).await;
                    run_device(c, el, agent, stop_rx, rejected, executed).await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e)).await;
                }
            }
        });
    }
    drop(ready_tx);
    let (mut devices, mut failed) = (Vec::with_capacity(n), Vec::new());
    while let Some(r) = ready_rx.recv().await {
        match r {
            Ok(d) => devices.push(d),
            Err(e) => failed.push(e),
        }
        if devices.len() + failed.len() >= n {
            break;
        }
    }
    if !failed.is_empty() {
        return Err(format!("{} devices failed to connect, first: {}", failed.len(), failed.join("; ")));
    }
    Ok(Started { devices, connect_secs: connect_started.elapsed().as_secs_f64() })
}

/// Connects a simulated device, subscribes it to its two topics and
/// publishes its retained `online` status, as the agent does (a job waits
/// for it).
async fn connect_device(t: &Target, id: &str) -> Result<(AsyncClient, EventLoop), Failure> {
    let (c, mut el) = client(t, id, id, &t.secret, 64);
    let filters = [format!("mqseal/v1/dev/{id}/cmd"), format!("mqseal/v1/dev/{id}/chal/req")]
        .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce));
    c.try_subscribe_many(filters).map_err(|e| e.to_string())?;
    c.try_publish(format!("mqseal/v1/dev/{id}/status"), QoS::AtLeastOnce, true, "online").map_err(|e| e.to_string())?;
    until(&mut el, true, Duration::from_secs(60)).await.map_err(|e| format!("{id}: {e}"))?;
    Ok((c, el))
}

fn controller_endpoint(t: &Target) -> BrokerEndpoint {
    let mut e = BrokerEndpoint::new(&t.host, t.port, CONTROLLER);
    e.password = Some(Zeroizing::new(t.controller_password.clone()));
    e
}

/// `command-rtt`
///
/// # Errors
/// When the broker refuses or a round trip is lost.
pub async fn command_rtt(a: CommandRtt) -> Result<serde_json::Value, Failure> {
    let t = &a.target;
    let dev = device(0);
    let material = Material::new(a.bits)?;
    let hmac = HmacKey::generate(&mut rng());
    let state = match &a.state_dir {
        Some(d) => Some(StateFile::open(d).map_err(|e| e.to_string())?),
        None => None,
    };
    let agent = material.agent(&dev, &hmac, state)?;
    let (dc, del) = connect_device(t, &dev).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let rejected = Arc::new(AtomicUsize::new(0));
    let plain = a.mode == RttMode::Plain;
    let device_task = if plain {
        tokio::spawn(echo_device(dc, del, format!("mqseal/v1/dev/{dev}/resp"), QoS::AtLeastOnce))
    } else {
        tokio::spawn(run_device(dc, del, agent, stop_rx, rejected.clone(), None))
    };
    let think = Duration::from_millis(a.think_ms);
    let warmup = 20.min(a.round_trips / 10 + 1);
    let mut samples = Vec::with_capacity(a.round_trips);
    let mut lost = 0usize;
    if plain {
        let (cc, mut cel) = client(t, "bench-rtt-ctl", CONTROLLER, &t.controller_password, 100);
        cc.subscribe(format!("mqseal/v1/dev/{dev}/resp"), QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
        until(&mut cel, true, Duration::from_secs(30)).await?;
        let payload = Bytes::from(vec![b'c'; 64]);
        for i in 0..warmup + a.round_trips {
            let t0 = Instant::now();
            cc.try_publish(format!("mqseal/v1/dev/{dev}/cmd"), QoS::AtLeastOnce, false, payload.clone())
                .map_err(|e| e.to_string())?;
            let got = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match cel.poll().await {
                        Ok(Event::Incoming(Packet::Publish(_))) => return true,
                        Ok(_) => {}
                        Err(_) => return false,
                    }
                }
            })
            .await;
            match got {
                Ok(true) if i >= warmup => samples.push(t0.elapsed().as_micros() as u64),
                Ok(true) => {}
                _ => lost += 1,
            }
            let _ = tokio::time::timeout(think, async { while cel.poll().await.is_ok() {} }).await;
        }
    } else {
        let mut session = Session::connect(
            &controller_endpoint(t),
            std::path::Path::new("."),
            "bench-rtt",
            material.controller,
            Duration::ZERO,
        )
        .await
        .map_err(|e| e.to_string())?;
        session.set_prefetch(a.mode == RttMode::ChallengePrefetch);
        let keys = DeviceKeys { public: material.device.public().clone(), hmac: hmac.clone() };
        let targets = [(dev.clone(), &keys)];
        let request = Request {
            name: "noop".into(),
            args: vec![],
            mode: if a.mode == RttMode::Sealed { Mode::Sealed } else { Mode::Challenge },
            hidden: false,
            ttl: Duration::from_secs(60),
        };
        for i in 0..warmup + a.round_trips {
            let t0 = Instant::now();
            let r = session.run(&targets, &request, Duration::from_secs(5), &mut |_, _| {}).await;
            let elapsed = t0.elapsed();
            match r.as_deref() {
                Ok([Finished { result: DeviceResult::Answered(reply), .. }]) if reply.status == Status::Ok => {
                    if i >= warmup {
                        samples.push(elapsed.as_micros() as u64);
                    }
                }
                _ => lost += 1,
            }
            session.idle(think).await.map_err(|e| e.to_string())?;
        }
    }
    let _ = stop_tx.send(true);
    device_task.abort();
    samples.sort_unstable();
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    let mode = format!("{:?}", a.mode).to_lowercase();
    eprintln!(
        "[{}] command-rtt {mode}: {} round trips, p50 {p50} µs, p99 {p99} µs, lost {lost}, rejected {}",
        t.label,
        samples.len(),
        rejected.load(Ordering::Relaxed)
    );
    Ok(json!({"scenario": "command_rtt", "label": t.label, "mode": mode, "bits": a.bits,
        "state": if a.state_dir.is_some() { "disk" } else { "memory" },
        "round_trips": samples.len(), "p50_us": p50, "p99_us": p99, "lost": lost}))
}

/// `fleet`
#[derive(Args)]
pub struct Fleet {
    #[command(flatten)]
    target: Target,
    /// Simulated devices `bench-dev-0..N` (provisioned with the bench secret).
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Device connections opened per second.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Envelope mode of the broadcast.
    #[arg(long, value_enum, default_value = "challenge")]
    mode: Mode,
    /// RSA modulus of the controller and (shared) device key.
    #[arg(long, default_value_t = 3072)]
    bits: usize,
    /// The `mqseal` binary to run as the controller.
    #[arg(long)]
    mqseal: PathBuf,
    /// Broadcast timeout.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Run `mqseal job run` at this many devices per minute instead of a
    /// broadcast (with its journal and audit log).
    #[arg(long)]
    job_rate: Option<u32>,
    /// The port the controller connects to, if not the devices' (a
    /// cluster: devices on one node, the controller on another).
    #[arg(long)]
    controller_port: Option<u16>,
    /// The job's cap on attempts out at once.
    #[arg(long, default_value_t = 1000)]
    job_max_in_flight: usize,
}

/// `fleet`
///
/// # Errors
/// When devices cannot connect or the controller cannot run.
pub async fn fleet(a: Fleet) -> Result<serde_json::Value, Failure> {
    let t = a.target.clone();
    let material = Arc::new(Material::new(a.bits)?);
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let rejected = Arc::new(AtomicUsize::new(0));
    let started = start_fleet(&t, &material, a.devices, a.rate, &stop_rx, &rejected, None).await?;
    let connect_secs = started.connect_secs;
    let public_pem = material.device.public().to_pem().map_err(|e| e.to_string())?;
    let mut registry = serde_json::Map::new();
    for (id, hmac) in started.devices {
        registry.insert(id, json!({ "public_key": public_pem, "hmac_key": hex::encode(hmac.as_bytes()), "since": 0 }));
    }

    // The controller: a real `mqseal` process with a registry of the fleet.
    let dir = work.path();
    let ctl = dir.join("ctl");
    std::fs::create_dir_all(&ctl).map_err(|e| e.to_string())?;
    mqseal_store::write_private(
        &ctl.join("devices.json"),
        serde_json::to_string(&registry).map_err(|e| e.to_string())?.as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let key_pem = material.controller.to_pkcs8_pem().map_err(|e| e.to_string())?;
    mqseal_store::write_private(&dir.join("ctl.key.pem"), key_pem.as_bytes()).map_err(|e| e.to_string())?;
    mqseal_store::write_private(&dir.join("ctl.pw"), t.controller_password.as_bytes()).map_err(|e| e.to_string())?;
    let config = format!(
        "data_dir = \"ctl\"\nkey = \"ctl.key.pem\"\n[broker]\nhost = \"{}\"\nport = {}\nusername = \"{CONTROLLER}\"\npassword_file = \"ctl.pw\"\n",
        t.host,
        a.controller_port.unwrap_or(t.port)
    );
    std::fs::write(dir.join("mqseal.toml"), config).map_err(|e| e.to_string())?;
    let mode = format!("{:?}", a.mode).to_lowercase();
    let mut cmd = tokio::process::Command::new(&a.mqseal);
    cmd.arg("--config").arg(dir.join("mqseal.toml"));
    match a.job_rate {
        None => cmd
            .args(["broadcast", "noop", "--all", "--json", "--mode", &mode, "--timeout"])
            .arg(format!("{}s", a.timeout_secs)),
        Some(rate) => cmd
            .args(["job", "run", "noop", "--all", "--json", "--mode", &mode, "--rate"])
            .arg(format!("{rate}/min"))
            .arg("--max-in-flight")
            .arg(a.job_max_in_flight.to_string())
            .arg("--deadline")
            .arg(format!("{}s", a.timeout_secs)),
    };
    let out = cmd
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{}: {e}", a.mqseal.display()))?;
    let _ = stop_tx.send(true);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("mqseal output: {e}: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(rate) = a.job_rate {
        return Ok(job_figures(&t, &doc, a.devices, rate, connect_secs, &mode));
    }
    let summary = doc.get("summary").cloned().unwrap_or_default();
    let timing = doc.get("timing").cloned().unwrap_or_default();
    let (wall_ms, cpu_ms) = (timing.get("wall_ms").cloned(), timing.get("cpu_ms").cloned());
    eprintln!(
        "[{}] fleet {mode}: {} devices connected in {connect_secs:.1}s; broadcast {summary}, controller wall {} ms, cpu {} ms, rejected {}",
        t.label,
        a.devices,
        wall_ms.clone().unwrap_or_default(),
        cpu_ms.clone().unwrap_or_default(),
        rejected.load(Ordering::Relaxed)
    );
    Ok(json!({"scenario": "fleet", "label": t.label, "mode": mode, "devices": a.devices, "bits": a.bits,
        "connect_secs": connect_secs, "summary": summary, "wall_ms": wall_ms, "cpu_ms": cpu_ms,
        "rejected": rejected.load(Ordering::Relaxed)}))
}

/// A job's figures: counts, the controller's wall and CPU time, the rate
/// achieved (starts over the time from the first to the last) against the
/// one asked for, and the journal's and audit log's cost per command.
fn job_figures(
    t: &Target,
    doc: &serde_json::Value,
    devices: usize,
    rate: u32,
    connect_secs: f64,
    mode: &str,
) -> serde_json::Value {
    let mut sent: Vec<u64> = doc
        .get("results")
        .and_then(serde_json::Value::as_array)
        .map(|rs| rs.iter().filter_map(|r| r.pointer("/progress/sent_at")?.as_u64()).collect())
        .unwrap_or_default();
    sent.sort_unstable();
    let span_ms = match (sent.first(), sent.last()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64,
        _ => f64::NAN,
    };
    let achieved = (sent.len().saturating_sub(1)) as f64 * 60_000.0 / span_ms;
    let timing = doc.get("timing").cloned().unwrap_or_default();
    let field = |k: &str| timing.get(k).cloned().unwrap_or_default();
    let per_command = |k: &str| field(k).as_f64().map(|ms| ms * 1000.0 / devices.max(1) as f64);
    eprintln!(
        "[{}] job {mode}: {devices} devices connected in {connect_secs:.1}s; {} ; rate {achieved:.0}/min of {rate}/min \
         ({:+.1}%), controller cpu {} ms, wall {} ms, journal {:.1} us/command, audit {:.1} us/command",
        t.label,
        doc.get("counts").cloned().unwrap_or_default(),
        (achieved / f64::from(rate) - 1.0) * 100.0,
        field("cpu_ms"),
        field("wall_ms"),
        per_command("journal_ms").unwrap_or(f64::NAN),
        per_command("audit_ms").unwrap_or(f64::NAN),
    );
    json!({"scenario": "job", "label": t.label, "mode": mode, "devices": devices, "rate_per_min": rate,
        "achieved_per_min": achieved, "counts": doc.get("counts"), "timing": timing,
        "journal_us_per_command": per_command("journal_ms"), "audit_us_per_command": per_command("audit_ms")})
}

/// `soak`
#[derive(Args)]
pub struct Soak {
    #[command(flatten)]
    target: Target,
    /// Simulated devices `bench-dev-0..N`, connected for the whole run.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Device connections opened per second before the soak starts.
    #[arg(long, default_value_t = 2000)]
    connect_rate: u32,
    /// Commands per second, round-robin over the devices.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// How long commands are sent.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Envelope mode.
    #[arg(long, value_enum, default_value = "challenge")]
    mode: Mode,
    /// RSA modulus of the controller and (shared) device key.
    #[arg(long, default_value_t = 2048)]
    bits: usize,
    /// Controller connections sharing the load (each a `Session`).
    #[arg(long, default_value_t = 8)]
    controllers: usize,
    /// How long a command may wait for its answer.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// The broker's process id: its resident memory is sampled every second.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Before the measured window, send every device this many commands as
    /// fast as the controllers go (reported apart): the rounds a broker
    /// needs to reach its steady memory (rumqttd, before mqseal's own
    /// router, matched each topic's first publish against every filter and
    /// grew its logs for 100 rounds).
    #[arg(long, default_value_t = 1)]
    warmup_rounds: usize,
}

/// One batch of the soak: a command with a unique argument, sent to a slice
/// of the fleet at once.
struct Batch {
    seq: u64,
    targets: Vec<usize>,
}

/// `soak`: a fleet stays connected while controllers send `rate` commands a
/// second, each with a unique argument, for `duration`. The devices count
/// every execution, so a lost command (never executed) and a duplicated one
/// (executed twice) are counted where they happen, not inferred from the
/// controller; the broker's resident memory is sampled throughout.
///
/// # Errors
/// When devices or controllers cannot connect.
pub async fn soak(a: Soak) -> Result<serde_json::Value, Failure> {
    let t = a.target.clone();
    let material = Arc::new(Material::new(a.bits)?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let rejected = Arc::new(AtomicUsize::new(0));
    let executed = Executions::default();
    let started =
        start_fleet(&t, &material, a.devices, a.connect_rate, &stop_rx, &rejected, Some(executed.clone())).await?;
    let keys: Arc<Vec<(String, DeviceKeys)>> = Arc::new(
        started
            .devices
            .into_iter()
            .map(|(id, hmac)| (id, DeviceKeys { public: material.device.public().clone(), hmac }))
            .collect(),
    );

    // Controllers: a pool of sessions taking batches from one queue.
    let key_pem = material.controller.to_pkcs8_pem().map_err(|e| e.to_string())?;
    let endpoint = controller_endpoint(&t);
    // One queue, many takers: each idle controller takes the next batch.
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(a.controllers * 4);
    let batch_rx = Arc::new(tokio::sync::Mutex::new(batch_rx));
    let outcomes = Arc::new(std::sync::Mutex::new((0u64, 0u64, 0u64, Vec::<u64>::new())));
    let mut workers = Vec::new();
    for w in 0..a.controllers {
        let key = PrivateKey::from_pkcs8_pem(&key_pem).map_err(|e| e.to_string())?;
        let mut session = Session::connect(
            &endpoint,
            std::path::Path::new("."),
            &format!("{CONTROLLER}-soak-{w}"),
            key,
            Duration::ZERO,
        )
        .await
        .map_err(|e| format!("controller {w}: {e}"))?;
        session.set_prefetch(a.mode == Mode::Challenge);
        let (rx, keys, outcomes, mode) = (batch_rx.clone(), keys.clone(), outcomes.clone(), a.mode);
        let timeout = Duration::from_secs(a.timeout_secs);
        workers.push(tokio::spawn(async move {
            loop {
                // Between batches the session keeps reading its connection
                // (prefetched challenges, everyone else's answers on the
                // wildcard filters), as a long-lived controller must.
                let next = rx.lock().await.try_recv();
                let batch = match next {
                    Ok(b) => b,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if let Err(e) = session.idle(Duration::from_millis(20)).await {
                            eprintln!("controller: {e}");
                        }
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                };
                let Batch { seq, targets } = batch;
                let ts: Vec<(String, &DeviceKeys)> =
                    targets.iter().filter_map(|&i| keys.get(i)).map(|(id, k)| (id.clone(), k)).collect();
                let request = Request {
                    name: "echo".into(),
                    args: vec![format!("soak-{seq}")],
                    mode,
                    hidden: false,
                    ttl: Duration::from_secs(60),
                };
                let sent = Instant::now();
                let results = session.run(&ts, &request, timeout, &mut |_, _| {}).await;
                let ms = u64::try_from(sent.elapsed().as_millis()).unwrap_or(u64::MAX);
                if let Ok(mut o) = outcomes.lock() {
                    match results {
                        Ok(rs) => {
                            for r in rs {
                                match r.result {
                                    DeviceResult::Answered(reply) if reply.status == Status::Ok => o.0 += 1,
                                    DeviceResult::TimedOut => o.1 += 1,
                                    _ => o.2 += 1,
                                }
                            }
                        }
                        Err(e) => {
                            eprintln!("controller: {e}");
                            o.2 += ts.len() as u64;
                        }
                    }
                    o.3.push(ms);
                }
            }
            session.close().await;
        }));
    }
    drop(batch_rx);

    // Warm-up: every device, `warmup_rounds` times, as fast as it goes.
    let answered = |o: &std::sync::Mutex<(u64, u64, u64, Vec<u64>)>| o.lock().map_or(0, |o| o.0 + o.1 + o.2);
    let warm_started = Instant::now();
    let (mut seq, mut warm_sent) = (0u64, 0u64);
    let per_batch = (a.rate as usize).div_ceil(10).max(1);
    let all: Vec<usize> = (0..keys.len()).collect();
    'rounds: for _ in 0..a.warmup_rounds {
        for chunk in all.chunks(per_batch) {
            if batch_tx.send(Batch { seq, targets: chunk.to_vec() }).await.is_err() {
                break 'rounds; // every controller has stopped
            }
            warm_sent += chunk.len() as u64;
            seq += 1;
        }
    }
    // Each batch ends within `timeout_secs` of being taken; only controllers
    // that all stopped could leave it unanswered, so stop waiting then too.
    while answered(&outcomes) < warm_sent && !workers.iter().all(|w| w.is_finished()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let warm_secs = warm_started.elapsed().as_secs_f64();
    let warm_out = outcomes.lock().map(|o| (o.0, o.1, o.2)).unwrap_or_default();
    if let Ok(mut o) = outcomes.lock() {
        *o = (0, 0, 0, Vec::new());
    }
    eprintln!(
        "[{}] soak warm-up: {warm_sent} commands ({} rounds over the fleet) in {warm_secs:.1}s ({:.0}/s): {} ok, {} timed out, {} failed",
        t.label,
        a.warmup_rounds,
        warm_sent as f64 / warm_secs.max(1e-9),
        warm_out.0,
        warm_out.1,
        warm_out.2
    );
    let rss_start = crate::rss_kib(a.broker_pid);

    // Memory, once a second, from the start of the soak.
    let sampler = a.broker_pid.map(|pid| {
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => samples.extend(crate::rss_kib(Some(pid))),
                    _ = stop.changed() => return samples,
                }
            }
        })
    });

    // The producer: ten batches a second, round-robin over the fleet.
    let soak_started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut next, mut sent) = (0usize, 0u64);
    while soak_started.elapsed() < Duration::from_secs(a.duration_secs) {
        tick.tick().await;
        let targets: Vec<usize> = (0..per_batch).map(|k| (next + k) % keys.len().max(1)).collect();
        next = (next + per_batch) % keys.len().max(1);
        let n = targets.len() as u64;
        if batch_tx.send(Batch { seq, targets }).await.is_err() {
            break;
        }
        sent += n;
        seq += 1;
    }
    let send_secs = soak_started.elapsed().as_secs_f64();
    drop(batch_tx);
    for w in workers {
        let _ = w.await;
    }
    let drain_secs = soak_started.elapsed().as_secs_f64() - send_secs;
    // Late duplicates would show after the answers: give them a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    let rss: Vec<u64> = match sampler {
        Some(s) => s.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let (ok, timed_out, failed, mut batch_ms) =
        outcomes.lock().map(|o| o.clone()).map_err(|_| "outcome lock poisoned".to_string())?;
    batch_ms.sort_unstable();
    let (executed_distinct, duplicated) = executed.tally();
    let lost = (warm_sent + sent).saturating_sub(executed_distinct as u64);
    // Flat after warm-up: the last quarter against the second quarter.
    let quarter = |k: usize| -> Option<u64> {
        let n = rss.len() / 4;
        let part = rss.get(k * n..(k + 1) * n).filter(|p| !p.is_empty())?;
        Some(part.iter().sum::<u64>() / part.len() as u64)
    };
    let (warm, last) = (quarter(1), quarter(3));
    let growth_pct = match (warm, last) {
        (Some(w), Some(l)) if w > 0 => Some((l as f64 - w as f64) * 100.0 / w as f64),
        _ => None,
    };
    eprintln!(
        "[{}] soak {:?}: {} devices (connected in {:.1}s), {sent} commands in {send_secs:.1}s ({:.0}/s) + {drain_secs:.1}s drain: \
         {ok} ok, {timed_out} timed out, {failed} failed; executed {executed_distinct} (warm-up included), lost {lost}, duplicated {duplicated}; \
         batch p50 {} ms p99 {} ms; broker RSS start {:?} KiB, warm {:?}, end {:?}, max {:?} ({growth_pct:?} % after warm-up)",
        t.label,
        a.mode,
        a.devices,
        started.connect_secs,
        sent as f64 / send_secs,
        percentile(&batch_ms, 50.0),
        percentile(&batch_ms, 99.0),
        rss_start,
        warm,
        last,
        rss.iter().max(),
    );
    Ok(json!({"scenario": "soak", "label": t.label, "mode": a.mode, "devices": a.devices,
        "connect_secs": started.connect_secs, "duration_secs": a.duration_secs, "rate": a.rate,
        "warmup": {"sent": warm_sent, "secs": warm_secs, "ok": warm_out.0, "timed_out": warm_out.1, "failed": warm_out.2},
        "sent": sent, "achieved_per_sec": sent as f64 / send_secs, "drain_secs": drain_secs,
        "ok": ok, "timed_out": timed_out, "failed": failed,
        "executed": executed_distinct, "lost": lost, "duplicated": duplicated,
        "rejected": rejected.load(Ordering::Relaxed),
        "batch_p50_ms": percentile(&batch_ms, 50.0), "batch_p99_ms": percentile(&batch_ms, 99.0),
        "rss_kib": {"start": rss_start, "warm": warm, "end": last, "max": rss.iter().max(),
                    "growth_after_warmup_pct": growth_pct, "samples": rss}}))
}
