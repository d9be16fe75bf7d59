//! `mqseal-broker`: run the broker, or make a TLS certificate for it.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

// jemalloc (feature `jemalloc`, on by default): see main().
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use mqseal_broker::config::{Config, StoreKind, TlsConfig};

/// Secure MQTT broker for mqseal command channels.
///
/// Settings come from the TOML file (default: config/broker.toml when it
/// exists), then environment variables, then flags (strongest).
#[derive(Parser, Debug)]
#[command(name = "mqseal-broker", version)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, env = "MQSEAL_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Plain-MQTT listen address (overrides listener.bind).
    #[arg(long, env = "MQSEAL_BROKER_BIND")]
    bind: Option<SocketAddr>,
    /// Data directory (overrides data_dir).
    #[arg(long, env = "MQSEAL_BROKER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Credential store: file or mongodb (overrides store.kind).
    #[arg(long, env = "MQSEAL_BROKER_STORE", value_parser = ["file", "mongodb"])]
    store: Option<String>,
    /// MongoDB URI (overrides store.mongodb_uri).
    #[arg(long, env = "MQSEAL_BROKER_MONGODB_URI", hide_env_values = true)]
    mongodb_uri: Option<String>,
    /// Accept the seed design's legacy IOT.login_info users (upgraded on login).
    #[arg(long, env = "MQSEAL_BROKER_LEGACY_LOGIN_INFO")]
    legacy_login_info: bool,
    /// TLS listen address; needs --tls-cert and --tls-key (or [tls] in the file).
    #[arg(long, env = "MQSEAL_BROKER_TLS_BIND")]
    tls_bind: Option<SocketAddr>,
    /// TLS certificate chain (PEM).
    #[arg(long, env = "MQSEAL_BROKER_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "MQSEAL_BROKER_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Prometheus endpoint address (overrides metrics.bind).
    #[arg(long, env = "MQSEAL_BROKER_METRICS_BIND")]
    metrics_bind: Option<SocketAddr>,
    /// Maximum packet size in bytes (overrides limits.max_packet_size).
    #[arg(long, env = "MQSEAL_BROKER_MAX_PACKET_SIZE")]
    max_packet_size: Option<usize>,
    /// Maximum concurrent connections (overrides limits.max_connections).
    #[arg(long, env = "MQSEAL_BROKER_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the broker (the default).
    Run,
    /// Write a self-signed CA (ca.pem) and a server certificate (server.pem,
    /// server.key 0600) for localhost, 127.0.0.1 and any --name.
    GenCert {
        /// Output directory.
        #[arg(long, default_value = "data/tls")]
        dir: PathBuf,
        /// Extra DNS name or IP address for the certificate.
        #[arg(long = "name")]
        names: Vec<String>,
    },
}

fn load_config(cli: &Cli) -> Result<(Config, String), String> {
    let default = Path::new("config/broker.toml");
    let (mut config, origin) = match &cli.config {
        Some(path) => (Config::load(path).map_err(|e| e.to_string())?, path.display().to_string()),
        None if default.exists() => (Config::load(default).map_err(|e| e.to_string())?, default.display().to_string()),
        None => (Config::default(), "built-in defaults".to_owned()),
    };
    if let Some(bind) = cli.bind {
        config.listener.bind = Some(bind);
    }
    if let Some(dir) = &cli.data_dir {
        config.data_dir = dir.clone();
    }
    match cli.store.as_deref() {
        Some("mongodb") => config.store.kind = StoreKind::Mongodb,
        Some(_) => config.store.kind = StoreKind::File,
        None => {}
    }
    if let Some(uri) = &cli.mongodb_uri {
        config.store.mongodb_uri = Some(uri.clone());
    }
    if cli.legacy_login_info {
        config.store.legacy_login_info = true;
    }
    if let Some(addr) = cli.metrics_bind {
        config.metrics.bind = Some(addr);
    }
    if let Some(n) = cli.max_packet_size {
        config.limits.max_packet_size = n;
    }
    if let Some(n) = cli.max_connections {
        config.limits.max_connections = n;
    }
    match (cli.tls_bind, &cli.tls_cert, &cli.tls_key) {
        (None, None, None) => {}
        (Some(bind), Some(cert), Some(key)) => {
            config.tls = Some(TlsConfig { bind, cert: cert.clone(), key: key.clone() });
        }
        (bind, cert, key) => {
            let mut tls = config.tls.clone().ok_or("--tls-bind, --tls-cert and --tls-key go together")?;
            if let Some(b) = bind {
                tls.bind = b;
            }
            if let Some(c) = cert {
                tls.cert = c.clone();
            }
            if let Some(k) = key {
                tls.key = k.clone();
            }
            config.tls = Some(tls);
        }
    }
    config.validate(&origin).map_err(|e| e.to_string())?;
    Ok((config, origin))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // jemalloc rather than glibc's malloc, measured (docs/BENCHMARKS.md):
    // memory freed after a connection storm goes back to the OS. The background thread does that purging while
    // the broker is idle; without it RSS stays at the storm's peak.
    #[cfg(feature = "jemalloc")]
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
    let filter = tracing_subscriber::EnvFilter::try_from_env("MQSEAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: a log file or journald gets
    // plain text that grep and alerting rules can match.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();

    if let Some(Command::GenCert { dir, names }) = &cli.command {
        return match mqseal_broker::tls::generate(dir, names) {
            Ok(g) => {
                println!("CA certificate (give to clients): {}", g.ca_cert.display());
                println!("server certificate:              {}", g.server_cert.display());
                println!("server key (0600):               {}", g.server_key.display());
                println!(
                    "Use them: [tls] bind = \"127.0.0.1:8883\", cert = \"{}\", key = \"{}\"",
                    g.server_cert.display(),
                    g.server_key.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mqseal-broker gen-cert: {e}");
                ExitCode::FAILURE
            }
        };
    }

    let (config, origin) = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mqseal-broker: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mqseal-broker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config_ws_tls = config.websocket.as_ref().is_some_and(|w| w.tls);
    runtime.block_on(async move {
        tracing::info!(config = %origin, "starting");
        let running = match mqseal_broker::start(config).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("mqseal-broker: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some((user, password)) = &running.first_admin {
            let port = running.tcp.map(|a| a.port()).unwrap_or(1883);
            // stdout, not the log: shown this once and never again.
            println!("First start: created the admin credential (shown only now, store it safely):");
            println!("  username: {user}");
            println!("  password: {}", password.as_str());
            println!(
                "Try it:  mosquitto_sub -h 127.0.0.1 -p {port} -u {user} -P '{}' -t 'mqseal/#' -v",
                password.as_str()
            );
        }
        // One line, last: scripts wait for it, and it names every endpoint.
        let mut endpoints: Vec<String> = Vec::new();
        endpoints.extend(running.tcp.map(|a| format!("mqtt://{a}")));
        endpoints.extend(running.tls.map(|a| format!("mqtts://{a}")));
        let ws_scheme = if config_ws_tls { "wss" } else { "ws" };
        endpoints.extend(running.websocket.map(|a| format!("{ws_scheme}://{a}")));
        endpoints.extend(running.metrics.map(|a| format!("metrics http://{a}/metrics")));
        println!("mqseal-broker ready: {}", endpoints.join(", "));
        wait_for_signal().await;
        tracing::info!("shutting down");
        running.shutdown(Duration::from_secs(3)).await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
