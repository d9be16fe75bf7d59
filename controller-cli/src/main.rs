//! `mqseal`: the controller command line.
//!
//! Exit codes (also in `mqseal --help` and the README):
//! 0 success · 1 local error (config, files, store) · 2 usage ·
//! 3 the device answered with a failure (or refused the command) ·
//! 4 timeout: no authenticated answer · 5 broker unreachable or login refused.

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mqseal_client::{BrokerEndpoint, rng};
use mqseal_controller::config::ControllerConfig;
use mqseal_controller::provision::{self, DeviceSpec};
use mqseal_controller::registry::{DeviceKeys, Registry};
use mqseal_controller::session::{DeviceResult, Mode, Request, Session, SessionError};
use mqseal_proto::Status;
use mqseal_proto::sealed::{PrivateKey, PublicKey};
use mqseal_store::{AnyStore, CredentialStore, Role, UserRecord, write_private};
use serde_json::json;
use zeroize::Zeroizing;

const AFTER_HELP: &str = "\
Exit codes: 0 success, 1 local error (config, files, store), 2 usage,
3 the device answered with a failure, 4 timeout (no authenticated answer),
5 broker unreachable or login refused.

Environment: MQSEAL_CONFIG, MQSEAL_BROKER (host:port), MQSEAL_USERNAME,
MQSEAL_PASSWORD_FILE, MQSEAL_KEY, MQSEAL_DATA_DIR, MQSEAL_BROKER_CONFIG.";

/// Send verified commands to mqseal devices, and manage users and devices.
#[derive(Parser)]
#[command(name = "mqseal", version, about, after_help = AFTER_HELP)]
struct Cli {
    /// Controller config file (default: ./mqseal.toml if it exists).
    #[arg(long, global = true, env = "MQSEAL_CONFIG")]
    config: Option<PathBuf>,
    /// Machine-readable output: one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
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
    User(UserCmd),
    /// Devices: credentials, keys and agent bundles.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Send one command and wait for the device's authenticated answer.
    Send {
        /// Target device.
        device: String,
        #[command(flatten)]
        cmd: CommandArgs,
    },
    /// Send one command to many devices at once.
    Broadcast {
        /// Comma-separated device ids.
        #[arg(long, value_delimiter = ',', conflicts_with = "all", required_unless_present = "all")]
        devices: Vec<String>,
        /// Every device in the registry.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        cmd: CommandArgs,
    },
}

#[derive(Args)]
struct CommandArgs {
    /// Command name (on the device's allow-list).
    command: String,
    /// Its arguments.
    args: Vec<String>,
    /// sealed (RSA, default for send) or challenge (HMAC, default for broadcast).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Challenge mode: send only the tag; the device recognises the command.
    #[arg(long)]
    hidden: bool,
    /// How long to wait for the answer (e.g. 10s, 500ms, 2m); a broker that
    /// cannot be reached is tried again for as long before giving up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// How long the command stays valid.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    ttl: Duration,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user; the password comes from a prompt, --password-file or --password-stdin.
    Add {
        /// Username.
        name: String,
        /// controller (default) or admin.
        #[arg(long, default_value = "controller")]
        role: String,
        /// Devices a controller may reach (repeatable; `*` for all).
        #[arg(long = "grant")]
        grants: Vec<String>,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Change a user's password.
    Passwd {
        /// Username.
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Stop a user from logging in (live sessions are closed).
    Disable {
        /// Username.
        name: String,
    },
    /// Let a disabled user log in again.
    Enable {
        /// Username.
        name: String,
    },
    /// Delete a user.
    Del {
        /// Username.
        name: String,
    },
    /// List users and devices in the store.
    List,
}

#[derive(Args)]
struct PasswordArgs {
    /// Read the password from the first line of this file.
    #[arg(long, conflicts_with = "password_stdin")]
    password_file: Option<PathBuf>,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    password_stdin: bool,
}

#[derive(Subcommand)]
enum DeviceCmd {
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
struct DeviceAddArgs {
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

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn local(message: impl std::fmt::Display) -> Failure {
        Failure { code: 1, message: message.to_string() }
    }
    fn usage(message: impl std::fmt::Display) -> Failure {
        Failure { code: 2, message: message.to_string() }
    }
}

impl From<SessionError> for Failure {
    fn from(e: SessionError) -> Failure {
        match e {
            SessionError::Client(c) => Failure::local(c),
            e @ SessionError::InvalidCommand(_) => Failure::usage(e),
            other => Failure { code: 5, message: other.to_string() },
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected a number and a unit (500ms, 10s, 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            if json {
                println!("{}", json!({ "error": f.message, "exit_code": f.code }));
            } else {
                eprintln!("mqseal: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

/// The configuration with flags and environment applied.
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

async fn run(cli: Cli) -> Result<u8, Failure> {
    let c = config(&cli)?;
    let json = cli.json;
    match cli.command {
        Command::Keygen { bits, out, force } => keygen(&c, bits, out, force, json),
        Command::User(cmd) => user(&c, cmd, json).await,
        Command::Device(cmd) => device(&c, cmd, json).await,
        Command::Send { device, cmd } => send(&c, vec![device], cmd, Mode::Sealed, json, false).await,
        Command::Broadcast { devices, all, cmd } => {
            let targets = if all { registry(&c)?.devices.keys().cloned().collect() } else { devices };
            if targets.is_empty() {
                return Err(Failure::usage("no devices to send to"));
            }
            send(&c, targets, cmd, Mode::Challenge, json, true).await
        }
    }
}

fn keygen(c: &ControllerConfig, bits: usize, out: Option<PathBuf>, force: bool, json: bool) -> Result<u8, Failure> {
    let path = out.unwrap_or_else(|| c.resolve(&c.key));
    if path.exists() && !force {
        return Err(Failure::local(format!("{} exists (use --force to replace it)", path.display())));
    }
    let key = PrivateKey::generate(&mut rng(), bits).map_err(Failure::usage)?;
    let pem = key.to_pkcs8_pem().map_err(Failure::local)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Failure::local(format!("{}: {e}", dir.display())))?;
    }
    write_private(&path, pem.as_bytes()).map_err(|e| Failure::local(format!("{}: {e}", path.display())))?;
    let pub_path = public_path(&path);
    let public = key.public().to_pem().map_err(Failure::local)?;
    std::fs::write(&pub_path, public).map_err(|e| Failure::local(format!("{}: {e}", pub_path.display())))?;
    let id = hex::encode(key.id().0);
    if json {
        println!("{}", json!({ "private_key": path, "public_key": pub_path, "bits": bits, "key_id": id }));
    } else {
        println!("wrote {} (0600) and {}\nkey id {id}", path.display(), pub_path.display());
    }
    Ok(0)
}

fn public_path(private: &Path) -> PathBuf {
    let mut s = private.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

async fn store(c: &ControllerConfig) -> Result<AnyStore, Failure> {
    let (sc, data_dir) = c.store().map_err(Failure::local)?;
    sc.open(&data_dir).await.map_err(|e| Failure::local(format!("credential store: {e}")))
}

fn registry(c: &ControllerConfig) -> Result<Registry, Failure> {
    Registry::open(&c.resolve(&c.data_dir)).map_err(Failure::local)
}

/// Reads a password from a file, stdin, or (on a terminal) a prompt —
/// never from the command line, where `ps` and shell history would show it.
fn read_password(args: &PasswordArgs, name: &str) -> Result<Zeroizing<String>, Failure> {
    let first_line = |s: &str| Zeroizing::new(s.lines().next().unwrap_or("").to_owned());
    let password = if let Some(f) = &args.password_file {
        let text =
            Zeroizing::new(std::fs::read_to_string(f).map_err(|e| Failure::local(format!("{}: {e}", f.display())))?);
        first_line(&text)
    } else if args.password_stdin {
        let mut text = Zeroizing::new(String::new());
        std::io::stdin().read_to_string(&mut text).map_err(|e| Failure::local(format!("stdin: {e}")))?;
        first_line(&text)
    } else if std::io::stdin().is_terminal() {
        let a = Zeroizing::new(rpassword::prompt_password(format!("password for {name}: ")).map_err(Failure::local)?);
        let b = Zeroizing::new(rpassword::prompt_password("again: ").map_err(Failure::local)?);
        if a != b {
            return Err(Failure::usage("the passwords differ"));
        }
        a
    } else {
        return Err(Failure::usage("stdin is not a terminal: use --password-file or --password-stdin"));
    };
    if password.len() < 8 {
        return Err(Failure::usage("passwords must be at least 8 characters"));
    }
    Ok(password)
}

async fn user(c: &ControllerConfig, cmd: UserCmd, json: bool) -> Result<u8, Failure> {
    let s = store(c).await?;
    let store_err = |e: mqseal_store::StoreError| Failure::local(format!("credential store: {e}"));
    let existing = |name: String| {
        let s = &s;
        async move { s.get(&name).await.map_err(store_err)?.ok_or_else(|| Failure::local(format!("no user {name}"))) }
    };
    let (action, name) = match cmd {
        UserCmd::Add { name, role, grants, password } => {
            let role: Role = role.parse().map_err(Failure::usage)?;
            if role == Role::Device {
                return Err(Failure::usage("devices are added with `mqseal device add`"));
            }
            let pw = read_password(&password, &name)?;
            let mut record =
                UserRecord::human(&name, pw.as_bytes(), role, c.pbkdf2_iterations).map_err(Failure::usage)?;
            record.grants = grants;
            record.validate().map_err(Failure::usage)?;
            s.put(&record, false).await.map_err(store_err)?;
            ("added", name)
        }
        UserCmd::Passwd { name, password } => {
            let old = existing(name.clone()).await?;
            let pw = read_password(&password, &name)?;
            let mut record =
                UserRecord::human(&name, pw.as_bytes(), old.role, c.pbkdf2_iterations).map_err(Failure::usage)?;
            record.grants = old.grants;
            record.disabled = old.disabled;
            s.put(&record, true).await.map_err(store_err)?;
            ("password changed", name)
        }
        UserCmd::Disable { name } => {
            let mut r = existing(name.clone()).await?;
            r.disabled = true;
            s.put(&r, true).await.map_err(store_err)?;
            ("disabled", name)
        }
        UserCmd::Enable { name } => {
            let mut r = existing(name.clone()).await?;
            r.disabled = false;
            s.put(&r, true).await.map_err(store_err)?;
            ("enabled", name)
        }
        UserCmd::Del { name } => {
            if !s.delete(&name).await.map_err(store_err)? {
                return Err(Failure::local(format!("no user {name}")));
            }
            ("deleted", name)
        }
        UserCmd::List => {
            let mut users = s.list().await.map_err(store_err)?;
            users.sort_by(|a, b| a.username.cmp(&b.username));
            if json {
                let rows: Vec<_> = users
                    .iter()
                    .map(|u| {
                        json!({ "username": u.username, "role": u.role.as_str(), "disabled": u.disabled,
                                "grants": u.grants, "algorithm": u.algorithm })
                    })
                    .collect();
                println!("{}", json!({ "users": rows }));
            } else {
                println!("{:<32} {:<10} {:<8} grants", "username", "role", "state");
                for u in &users {
                    let state = if u.disabled { "disabled" } else { "active" };
                    println!("{:<32} {:<10} {:<8} {}", u.username, u.role.as_str(), state, u.grants.join(","));
                }
            }
            return Ok(0);
        }
    };
    if json {
        println!("{}", json!({ "user": name, "result": action }));
    } else {
        println!("{name}: {action}");
    }
    Ok(0)
}

async fn device(c: &ControllerConfig, cmd: DeviceCmd, json: bool) -> Result<u8, Failure> {
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
            Ok(0)
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
            Ok(0)
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

async fn provision_device(c: &ControllerConfig, a: DeviceAddArgs, rotate: bool, json: bool) -> Result<u8, Failure> {
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
    Ok(0)
}

fn load_key(c: &ControllerConfig) -> Result<PrivateKey, Failure> {
    let path = c.resolve(&c.key);
    let pem = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
        Failure::local(format!("controller key {}: {e} (create one with `mqseal keygen`)", path.display()))
    })?);
    PrivateKey::from_pkcs8_pem(&pem).map_err(|e| Failure::local(format!("controller key {}: {e}", path.display())))
}

/// A client id unique to this run: two controllers (or two runs of one)
/// never take over each other's session.
fn client_id(username: &str) -> String {
    let mut r = [0u8; 6];
    rand_core::Rng::fill_bytes(&mut rng(), &mut r);
    format!("{username}-{}", hex::encode(r))
}

async fn send(
    c: &ControllerConfig,
    devices: Vec<String>,
    cmd: CommandArgs,
    default_mode: Mode,
    json: bool,
    broadcast: bool,
) -> Result<u8, Failure> {
    let mode = cmd.mode.unwrap_or(default_mode);
    if cmd.hidden && mode != Mode::Challenge {
        return Err(Failure::usage("--hidden needs --mode challenge"));
    }
    let reg = registry(c)?;
    let mut keys: Vec<(String, DeviceKeys)> = Vec::with_capacity(devices.len());
    for d in &devices {
        keys.push((d.clone(), reg.keys(d).map_err(Failure::usage)?));
    }
    let targets: Vec<(String, &DeviceKeys)> = keys.iter().map(|(d, k)| (d.clone(), k)).collect();
    let endpoint = c.broker().map_err(Failure::local)?;
    let key = load_key(c)?;
    let request = Request { name: cmd.command.clone(), args: cmd.args.clone(), mode, hidden: cmd.hidden, ttl: cmd.ttl };
    request.validate().map_err(|e| Failure::usage(format!("command: {e}")))?;

    let started = std::time::Instant::now();
    // A broker that is restarting is waited for as long as the answers
    // would be: the connect is retried within --timeout, then the wait for
    // answers gets its own --timeout.
    let mut session = Session::connect(endpoint, &c.base, &client_id(&endpoint.username), key, cmd.timeout).await?;
    let bar = (broadcast && !json && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(targets.len() as u64);
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} answered {elapsed}") {
            b.set_style(style);
        }
        b
    });
    let mut progress = |done: usize, _total: usize| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    };
    let results = session.run(&targets, &request, cmd.timeout, &mut progress).await?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    session.close().await;
    let timing = Timing { wall_ms: started.elapsed().as_millis(), cpu_ms: process_cpu_ms() };
    report(&devices, &results, mode, json, broadcast, &timing)
}

/// How long a send or broadcast took, from connecting to the last answer.
struct Timing {
    wall_ms: u128,
    /// This process's CPU time (user + system), if /proc tells.
    cpu_ms: Option<u64>,
}

/// User + system CPU time of this process, from /proc/self/stat (fields 14
/// and 15, in USER_HZ ticks, which Linux fixes at 100 per second).
fn process_cpu_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some((ticks(11)? + ticks(12)?) * 10)
}

/// Prints the results and picks the exit code: the worst outcome wins
/// (timeout over failure over success).
fn report(
    devices: &[String],
    results: &[DeviceResult],
    mode: Mode,
    json: bool,
    broadcast: bool,
    timing: &Timing,
) -> Result<u8, Failure> {
    let mut code = 0u8;
    let mut rows = Vec::new();
    let (mut ok, mut failed, mut timed_out) = (0usize, 0usize, 0usize);
    for (d, r) in devices.iter().zip(results) {
        let (outcome, row_code) = match r {
            DeviceResult::Answered(reply) if reply.status == Status::Ok => {
                ok += 1;
                ("ok", 0)
            }
            DeviceResult::Answered(_) | DeviceResult::Error(_) => {
                failed += 1;
                ("failed", 3)
            }
            DeviceResult::TimedOut => {
                timed_out += 1;
                ("timed_out", 4)
            }
        };
        code = code.max(row_code);
        let (status, exit, output, error) = match r {
            DeviceResult::Answered(reply) => (
                Some(status_name(reply.status)),
                Some(reply.code),
                Some(String::from_utf8_lossy(&reply.output).into_owned()),
                None,
            ),
            DeviceResult::Error(e) => (None, None, None, Some(e.clone())),
            DeviceResult::TimedOut => (None, None, None, None),
        };
        rows.push(json!({ "device": d, "outcome": outcome, "status": status, "code": exit,
                          "output": output, "error": error }));
        if !json {
            match r {
                DeviceResult::Answered(reply) if !broadcast => {
                    let out = String::from_utf8_lossy(&reply.output);
                    print!("{out}");
                    if !out.is_empty() && !out.ends_with('\n') {
                        println!();
                    }
                    if reply.status != Status::Ok {
                        eprintln!("mqseal: {d}: {} (code {})", status_name(reply.status), reply.code);
                    }
                }
                DeviceResult::Answered(reply) => {
                    println!("{d}: {} (code {})", status_name(reply.status), reply.code);
                }
                DeviceResult::TimedOut => eprintln!("mqseal: {d}: no authenticated answer in time"),
                DeviceResult::Error(e) => eprintln!("mqseal: {d}: {e}"),
            }
        }
    }
    if json {
        let doc = if broadcast {
            json!({ "mode": mode, "results": rows,
                    "summary": { "ok": ok, "failed": failed, "timed_out": timed_out },
                    "timing": { "wall_ms": timing.wall_ms, "cpu_ms": timing.cpu_ms } })
        } else {
            rows.into_iter().next().unwrap_or(serde_json::Value::Null)
        };
        println!("{doc}");
    } else if broadcast {
        println!("{ok} ok, {failed} failed, {timed_out} timed out ({} ms)", timing.wall_ms);
    }
    Ok(code)
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Failed => "failed",
        Status::TimedOut => "timed_out",
        Status::UnknownCommand => "unknown_command",
        Status::BadArguments => "bad_arguments",
    }
}
