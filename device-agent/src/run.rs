//! The agent's MQTT loop.
//!
//! One task owns the [`Agent`] and the rumqttc event loop; commands run in
//! their own tasks (at most `limits.max_concurrent` at once) and hand their
//! result back over a channel, so a slow command never stops the device from
//! answering challenges or receiving the next command.
//!
//! The session is persistent (`clean_session = false`) so that QoS 1
//! commands published while the device was offline are delivered when it
//! comes back; the journal makes a redelivery harmless.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqseal_client::rumqttc::{AsyncClient, Event, LastWill, Packet, QoS};
use mqseal_client::{Backoff, rng};
use tokio::sync::{Semaphore, mpsc};
use tracing::{error, info, warn};

use crate::agent::{Action, Agent, Job, Now, Outgoing, Restore};
use crate::config::AgentConfig;
use crate::exec::{self, ExecContext, Ran};
use crate::state::StateFile;

/// Payload of the retained status while connected.
pub const ONLINE: &[u8] = b"online";
/// Payload of the retained status after the device left (the last will).
pub const OFFLINE: &[u8] = b"offline";

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `agent.toml`.
    #[error(transparent)]
    Config(#[from] mqseal_tomlfile::ConfigError),
    /// The broker section.
    #[error(transparent)]
    Client(#[from] mqseal_client::ClientError),
    /// The agent core (state, ids).
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    /// The state folder.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// Runs the agent described by `config_path` until SIGINT or SIGTERM.
///
/// # Errors
/// [`StartError`] for anything that stops it from starting; once running it
/// only logs and retries.
pub async fn run(config_path: &Path, restore: Restore) -> Result<(), StartError> {
    let config = AgentConfig::load(config_path)?;
    let base = config_path.parent().unwrap_or(Path::new("."));
    let keys = config.keys(config_path)?;
    let started = Instant::now();
    let now = || Now::since(started);
    let state = StateFile::open(&config.state_path(config_path))?;
    let mut agent = Agent::new(
        &config.device_id,
        keys,
        config.policy.policy(),
        config.policy.challenge_lifetime_ms,
        config.policy.replay_capacity,
        config.commands.clone(),
        Some(state),
        restore,
        now(),
    )?;

    let status_topic = mqseal_proto::topic::topic(&config.device_id, mqseal_proto::topic::Channel::Status)
        .map_err(|e| crate::agent::AgentError::Id(e.to_string()))?
        .to_string();
    // Broker `i` of the endpoint's list (several for a cluster): the same
    // persistent session and will wherever the agent connects.
    let options_for = |i: usize| -> Result<_, mqseal_client::ClientError> {
        let mut options = config.broker.mqtt_options_at(i, &config.device_id, base)?;
        options.set_clean_session(false).set_request_channel_capacity(1024).set_last_will(LastWill::new(
            &status_topic,
            OFFLINE,
            QoS::AtLeastOnce,
            true,
        ));
        Ok(options)
    };
    let mut failover = mqseal_client::Failover::new(&config.broker)?;
    let (client, mut events) = AsyncClient::new(options_for(failover.current())?, 1024);
    events.set_network_options(config.broker.network_options());

    let ctx = Arc::new(ExecContext {
        device_id: config.device_id.clone(),
        started,
        max_output: config.limits.max_output_bytes,
        default_timeout: Duration::from_millis(config.limits.default_timeout_ms),
    });
    let slots = Arc::new(Semaphore::new(config.limits.max_concurrent));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Job, Ran)>();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    let mut address = config.broker.address();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    // Commands interrupted by the last stop are answered once, on the first
    // connection (later reconnects of this process have nothing to add).
    let mut first_connect = true;
    info!(device = %config.device_id, broker = %address, "agent starting");

    loop {
        tokio::select! {
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    info!(broker = %address, "connected");
                    for t in agent.subscriptions() {
                        if let Err(e) = client.try_subscribe(t, QoS::AtLeastOnce) {
                            warn!("subscribing to {t}: {e}");
                        }
                    }
                    if let Err(e) = client.try_publish(&status_topic, QoS::AtLeastOnce, true, ONLINE) {
                        warn!("publishing status: {e}");
                    }
                    if first_connect {
                        first_connect = false;
                        for receipt in agent.interrupted(now(), &mut rng()) {
                            match receipt {
                                Ok(out) => {
                                    warn!("a command was interrupted by the last stop: answered `failed`, not run again");
                                    publish(&client, out);
                                }
                                Err(e) => error!("cannot answer a command interrupted by the last stop: {e}"),
                            }
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    match agent.handle(&p.topic, &p.payload, now(), &mut rng()) {
                        Ok(Action::Challenge(out)) => publish(&client, out),
                        Ok(Action::Resend(out)) => {
                            info!("duplicate delivery of an executed command: re-sent its stored response");
                            publish(&client, out);
                        }
                        Ok(Action::Execute(job)) => {
                            info!(command = %job.name, "executing verified command");
                            let spec = agent.command(&job.name).cloned();
                            let (ctx, slots, done) = (ctx.clone(), slots.clone(), done_tx.clone());
                            tokio::spawn(async move {
                                let ran = match &job.refuse {
                                    Some(reason) => Agent::refusal(reason),
                                    None => {
                                        let _permit = slots.acquire().await;
                                        exec::run(spec.as_ref(), &job.name, &job.args, &ctx).await
                                    }
                                };
                                let _ = done.send((job, ran));
                            });
                        }
                        Err(reason) => warn!(topic = %p.topic, bytes = p.payload.len(), "rejected: {reason}"),
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(broker = %address, "connection: {e}; retrying in {} ms", delay.as_millis());
                    // A cluster: the next try goes to the next broker.
                    if failover.advance() {
                        address = config.broker.address_at(failover.current());
                        match options_for(failover.current()) {
                            Ok(o) => events.mqtt_options = o,
                            Err(e) => error!(broker = %address, "cannot use this broker: {e}"),
                        }
                    }
                    tokio::time::sleep(delay).await;
                }
            },
            Some((job, ran)) = done_rx.recv() => {
                if let Some(reason) = &job.refuse {
                    error!(command = %job.name, "{reason}");
                }
                let name = job.name.clone();
                match agent.finish(job, &ran, now(), &mut rng()) {
                    Ok((out, save_error)) => {
                        if let Some(e) = save_error {
                            error!("response sent but not saved: {e}");
                        }
                        info!(command = %name, status = ?ran.status, code = ran.code, "answered");
                        publish(&client, out);
                    }
                    Err(e) => error!(command = %name, "cannot build the response: {e}"),
                }
            }
            () = &mut shutdown => {
                info!("shutting down");
                let _ = client.try_publish(&status_topic, QoS::AtLeastOnce, true, OFFLINE);
                let _ = client.try_disconnect();
                // Let the event loop flush the status and the DISCONNECT.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, events.poll()).await {
                    if matches!(ev, Event::Outgoing(mqseal_client::rumqttc::Outgoing::Disconnect)) {
                        break;
                    }
                }
                return Ok(());
            }
        }
    }
}

fn publish(client: &AsyncClient, out: Outgoing) {
    if let Err(e) = client.try_publish(&out.topic, QoS::AtLeastOnce, false, out.payload) {
        warn!(topic = %out.topic, "publish: {e}");
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
