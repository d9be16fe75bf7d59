//! `mqseal device`: credentials, keys and agent bundles.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use mqseal_client::BrokerEndpoint;
use mqseal_controller::config::ControllerConfig;
use mqseal_controller::provision::{self, DeviceSpec};
use mqseal_controller::session::Session;
use mqseal_proto::sealed::PublicKey;
use serde_json::json;

use super::{Exit, Failure, client_id, load_key, parse_duration, registry, store};

#[derive(Subcommand)]
pub enum DeviceCmd {
    /// Create a device: broker secret, HMAC key, RSA key pair, grant, agent bundle.
    Add(DeviceAddArgs),
    /// Show registered devices, with their online/offline status.
    List {
        /// How long to wait for status messages.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Replace all of a device's credentials and write a new bundle.
    Rotate(DeviceAddArgs),
    /// Revoke a device: its login, its keys and its grants.
    Remove {
        /// Device id.
        id: String,
    },
}

#[derive(Args)]
pub struct DeviceAddArgs {
    /// Device id (1-64 of A-Z a-z 0-9 - _ . :).
    id: String,
    /// Where to write the agent bundle (default: DATA_DIR/agents/ID.toml).
    #[arg(long)]
    out: Option<PathBuf>,
    /// RSA modulus size for the device key.
    #[arg(long, default_value_t = 3072)]
    bits: usize,
    /// Another controller public key (PEM) the device should trust (repeatable).
    #[arg(long)]
    trust: Vec<PathBuf>,
}

/// Adds, rotates, removes or lists devices.
pub(super) async fn run(c: &ControllerConfig, cmd: DeviceCmd, json: bool) -> Result<Exit, Failure> {
    match cmd {
        DeviceCmd::Add(a) => provision_device(c, a, false, json).await,
        DeviceCmd::Rotate(a) => provision_device(c, a, true, json).await,
        DeviceCmd::Remove { id } => {
            let s = store(c).await?;
            let mut reg = registry(c)?;
            if !provision::remove(&s, &mut reg, &id).await.map_err(Failure::local)? {
                return Err(Failure::local(format!("no device {id}")));
            }
            if json {
                println!("{}", json!({ "device": id, "result": "removed" }));
            } else {
                println!("{id}: removed (login deleted, keys forgotten, grants revoked)");
            }
            Ok(Exit::Ok)
        }
        DeviceCmd::List { wait } => {
            let reg = registry(c)?;
            let ids: Vec<String> = reg.devices.keys().cloned().collect();
            let status = device_status(c, &ids, wait).await;
            let (status, note) = match status {
                Ok(s) => (s, None),
                Err(f) => (Default::default(), Some(f.message)),
            };
            if json {
                let rows: Vec<_> = ids
                    .iter()
                    .map(|id| {
                        json!({ "device": id, "status": status.get(id).map_or("unknown", String::as_str),
                                      "since": reg.devices.get(id).map(|d| d.since) })
                    })
                    .collect();
                println!("{}", json!({ "devices": rows, "status_error": note }));
            } else {
                if let Some(n) = &note {
                    eprintln!("mqseal: status unavailable: {n}");
                }
                println!("{:<40} status", "device");
                for id in &ids {
                    println!("{:<40} {}", id, status.get(id).map_or("unknown", String::as_str));
                }
            }
            Ok(Exit::Ok)
        }
    }
}

/// Online/offline per device, from the retained status topics.
async fn device_status(
    c: &ControllerConfig,
    ids: &[String],
    wait: Duration,
) -> Result<std::collections::HashMap<String, String>, Failure> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let endpoint = c.broker().map_err(Failure::local)?;
    let key = load_key(c)?;
    let mut session = Session::connect(endpoint, &c.base, &client_id(&endpoint.username), key, wait).await?;
    let topics: Vec<String> = ids
        .iter()
        .filter_map(|id| mqseal_proto::topic::topic(id, mqseal_proto::topic::Channel::Status).ok())
        .map(|t| t.to_string())
        .collect();
    let seen = session.collect_retained(topics, ids.len(), wait).await?;
    session.close().await;
    Ok(seen
        .into_iter()
        .filter_map(|(t, p)| {
            let (id, _) = mqseal_proto::topic::parse(&t)?;
            Some((id.to_owned(), String::from_utf8_lossy(&p).into_owned()))
        })
        .collect())
}

async fn provision_device(c: &ControllerConfig, a: DeviceAddArgs, rotate: bool, json: bool) -> Result<Exit, Failure> {
    // A bad id is a bad argument (exit 2), found before anything is touched.
    mqseal_proto::validate_id(&a.id).map_err(|e| Failure::usage(format!("device id {:?}: {e}", a.id)))?;
    let key = load_key(c)?;
    let mut controllers = vec![key.public().clone()];
    for t in &a.trust {
        let pem = std::fs::read_to_string(t).map_err(|e| Failure::local(format!("{}: {e}", t.display())))?;
        controllers.push(PublicKey::from_pem(&pem).map_err(|e| Failure::local(format!("{}: {e}", t.display())))?);
    }
    let mut broker = match (&c.agent_broker, &c.broker) {
        (Some(ab), _) => {
            let mut b = BrokerEndpoint::new(&ab.host, ab.port, &a.id);
            b.tls_ca = ab.tls_ca.clone();
            b.failover = ab.failover.clone();
            b
        }
        (None, Some(b)) => b.clone(),
        (None, None) => BrokerEndpoint::new("127.0.0.1", 1883, &a.id),
    };
    // The controller's CA path is relative to its config; the bundle's is
    // the device's business (agent_broker sets it explicitly).
    if c.agent_broker.is_none() {
        broker.tls_ca = broker.tls_ca.map(|p| c.resolve(&p));
    }
    let s = store(c).await?;
    let mut reg = registry(c)?;
    let bundle = a.out.unwrap_or_else(|| c.resolve(&c.data_dir).join("agents").join(format!("{}.toml", a.id)));
    let grant_to = c.broker.as_ref().map(|b| b.username.clone());
    let spec =
        DeviceSpec { id: &a.id, bits: a.bits, rotate, broker, controllers, grant_to: grant_to.as_deref(), bundle };
    let p = provision::add_or_rotate(&s, &mut reg, spec).await.map_err(Failure::local)?;
    if json {
        println!("{}", serde_json::to_string(&p).map_err(Failure::local)?);
    } else {
        println!(
            "{}: {} — agent bundle {} (0600), key id {}{}",
            p.device,
            if rotate { "credentials rotated" } else { "added" },
            p.bundle.display(),
            p.key_id,
            p.granted_to.as_ref().map(|u| format!(", granted to {u}")).unwrap_or_default()
        );
    }
    Ok(Exit::Ok)
}
