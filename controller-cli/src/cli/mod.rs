//! The command line: its flags, the configuration they override, and the
//! subcommands, one module each (as `mini-redis`'s `cmd/`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use mqseal_client::{BrokerEndpoint, rng};
use mqseal_controller::config::ControllerConfig;
use mqseal_controller::registry::Registry;
use mqseal_controller::session::Mode;
use mqseal_proto::sealed::PrivateKey;
use mqseal_store::{AnyStore, AuditLog};
use mqseal_tomlfile::ConfigError;
use zeroize::Zeroizing;

mod audit;
mod device;
mod exit;
mod export;
mod job;
mod keygen;
mod send;
mod user;

pub use exit::{Exit, Failure};

/// What `--help` ends with: the exit codes and the environment.
fn after_help() -> String {
    format!(
        "{}\n\nEnvironment: MQSEAL_CONFIG, MQSEAL_BROKER (host:port), MQSEAL_USERNAME,\n\
         MQSEAL_PASSWORD_FILE, MQSEAL_KEY, MQSEAL_DATA_DIR, MQSEAL_BROKER_CONFIG.",
        exit::EXIT_CODES_HELP
    )
}

/// Send verified commands to mqseal devices, and manage users and devices.
#[derive(Parser)]
#[command(name = "mqseal", version, about, after_help = after_help())]
pub struct Cli {
    /// Controller config file (default: ./mqseal.toml if it exists).
    #[arg(long, global = true, env = "MQSEAL_CONFIG")]
    config: Option<PathBuf>,
    /// Machine-readable output: one JSON document on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Broker as host:port (overrides the config's broker section).
    #[arg(long, global = true, env = "MQSEAL_BROKER")]
    broker: Option<String>,
    /// Broker username (overrides the config's broker section).
    #[arg(long, global = true, env = "MQSEAL_USERNAME")]
    username: Option<String>,
    /// File holding the broker password (overrides the config's broker section).
    #[arg(long, global = true, env = "MQSEAL_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// This controller's private key.
    #[arg(long, global = true, env = "MQSEAL_KEY")]
    key: Option<PathBuf>,
    /// Device registry folder.
    #[arg(long, global = true, env = "MQSEAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Broker config whose store section user and device commands use.
    #[arg(long, global = true, env = "MQSEAL_BROKER_CONFIG")]
    broker_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an RSA key pair (private key written 0600, public next to it).
    Keygen {
        /// Modulus size, 2048 to 4096.
        #[arg(long, default_value_t = 3072)]
        bits: usize,
        /// Private key path (default: the configured key); `.pub` is added for the public key.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Broker users (people and scripts).
    #[command(subcommand)]
    User(user::UserCmd),
    /// Devices: credentials, keys and agent bundles.
    #[command(subcommand)]
    Device(device::DeviceCmd),
    /// Send one command and wait for the device's authenticated answer.
    Send {
        /// Target device.
        device: String,
        #[command(flatten)]
        cmd: send::CommandArgs,
    },
    /// The audit log: every command sent and the device's answer.
    Audit(audit::AuditArgs),
    /// Jobs: a command rolled out to many devices over time.
    #[command(subcommand)]
    Job(job::JobCmd),
    /// Another broker's access configuration from mqseal's users and devices.
    #[command(subcommand)]
    Export(export::ExportCmd),
    /// Send one command to many devices at once.
    Broadcast {
        /// Comma-separated device ids.
        #[arg(long, value_delimiter = ',', conflicts_with = "all", required_unless_present = "all")]
        devices: Vec<String>,
        /// Every device in the registry.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        cmd: send::CommandArgs,
    },
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected a number and a unit (500ms, 10s, 2m, 24h, 7d)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        _ => return Err(format!("{s:?}: unit must be ms, s, m, h or d")),
    };
    // Added to clocks later: a bound keeps that arithmetic in range.
    if d > Duration::from_secs(3650 * 86_400) {
        return Err(format!("{s:?}: at most 3650d"));
    }
    Ok(d)
}

fn config(cli: &Cli) -> Result<ControllerConfig, Failure> {
    let default = Path::new("mqseal.toml");
    let path = cli.config.clone().or_else(|| default.exists().then(|| default.to_path_buf()));
    let mut c = ControllerConfig::load(path.as_deref()).map_err(Failure::local)?;
    if let Some(addr) = &cli.broker {
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| Failure::usage(format!("--broker {addr:?}: expected host:port")))?;
        let b = c.broker.get_or_insert_with(|| BrokerEndpoint::new(&host, port, ""));
        b.host = host;
        b.port = port;
    }
    if let Some(u) = &cli.username {
        c.broker.get_or_insert_with(|| BrokerEndpoint::new("127.0.0.1", 1883, "")).username = u.clone();
    }
    if let Some(p) = &cli.password_file {
        let b = c.broker.get_or_insert_with(|| BrokerEndpoint::new("127.0.0.1", 1883, ""));
        b.password_file = Some(p.clone());
        b.password = None;
    }
    if let Some(k) = &cli.key {
        c.key = k.clone();
    }
    if let Some(d) = &cli.data_dir {
        c.data_dir = d.clone();
    }
    if let Some(b) = &cli.broker_config {
        c.broker_config = Some(b.clone());
        c.store = None;
    }
    Ok(c)
}

/// Runs the subcommand: how the process should end.
///
/// # Errors
/// A [`Failure`] that ends it early, with its exit code.
pub async fn run(cli: Cli) -> Result<Exit, Failure> {
    let c = config(&cli)?;
    let json = cli.json;
    match cli.command {
        Command::Keygen { bits, out, force } => keygen::run(&c, bits, out, force, json),
        Command::User(cmd) => user::run(&c, cmd, json).await,
        Command::Device(cmd) => device::run(&c, cmd, json).await,
        Command::Audit(args) => audit::run(&c, args, json).await,
        Command::Job(cmd) => job::run(&c, cmd, json).await,
        Command::Export(cmd) => export::run(&c, cmd, json).await,
        Command::Send { device, cmd } => send::run(&c, vec![device], cmd, Mode::Sealed, json, false).await,
        Command::Broadcast { devices, all, cmd } => {
            let targets = if all { registry(&c)?.devices.keys().cloned().collect() } else { devices };
            if targets.is_empty() {
                return Err(Failure::usage("no devices to send to"));
            }
            send::run(&c, targets, cmd, Mode::Challenge, json, true).await
        }
    }
}

pub(crate) async fn store(c: &ControllerConfig) -> Result<AnyStore, Failure> {
    let (sc, data_dir) = c.store().map_err(Failure::local)?;
    sc.open(&data_dir).await.map_err(|e| Failure::local(format!("credential store: {e}")))
}

pub(crate) fn registry(c: &ControllerConfig) -> Result<Registry, Failure> {
    Registry::open(&c.resolve(&c.data_dir)).map_err(Failure::local)
}

/// The deployment's audit log: the store's MongoDB collection when the
/// store is MongoDB, else `data_dir/audit.jsonl` — also on a machine that
/// has no broker config to read the store from (an operator's laptop).
pub(crate) async fn audit_log(c: &ControllerConfig) -> Result<AuditLog, Failure> {
    let file = c.resolve(&c.data_dir).join("audit.jsonl");
    match c.store() {
        Ok((sc, _)) => sc.open_audit(file).await.map_err(|e| Failure::local(format!("audit log: {e}"))),
        Err(ConfigError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(AuditLog::File(file))
        }
        Err(e) => Err(Failure::local(e)),
    }
}

pub(crate) fn load_key(c: &ControllerConfig) -> Result<PrivateKey, Failure> {
    let path = c.resolve(&c.key);
    let pem = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
        Failure::local(format!("controller key {}: {e} (create one with `mqseal keygen`)", path.display()))
    })?);
    PrivateKey::from_pkcs8_pem(&pem).map_err(|e| Failure::local(format!("controller key {}: {e}", path.display())))
}

/// The first line of `path`: how every password file is read.
pub(crate) fn first_line_of(path: &Path) -> Result<Zeroizing<String>, Failure> {
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Failure::local(format!("{}: {e}", path.display())))?);
    Ok(Zeroizing::new(text.lines().next().unwrap_or("").to_owned()))
}

/// A client id unique to this run: two controllers (or two runs of one)
/// never take over each other's session.
/// (RabbitMQ's exported permissions expect this form:
/// `mqseal_controller::export::rabbitmq::CONTROLLER_CLIENT_IDS`.)
pub(crate) fn client_id(username: &str) -> String {
    let mut r = [0u8; 6];
    rand_core::Rng::fill_bytes(&mut rng(), &mut r);
    format!("{username}-{}", hex::encode(r))
}

/// User + system CPU time of this process, from /proc/self/stat (fields 14
/// and 15, in USER_HZ ticks, which Linux fixes at 100 per second).
pub(crate) fn process_cpu_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some((ticks(11)? + ticks(12)?) * 10)
}
