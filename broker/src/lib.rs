//! `mqseal-broker`: a hardened MQTT broker for fleets of devices.
//!
//! The front ([`listener`], [`connection`]) terminates TCP, TLS and
//! WebSockets and parses every packet ([`codec`]); [`login`] authenticates
//! against a credential store ([`auth`], `mqseal-store`); [`policy`]
//! applies per-topic rules ([`acl`]) and limits to each packet and hands
//! what passes to the router core (`mqseal-router`, behind [`hub`]);
//! [`delivery`] writes what the router has for each client; [`persist`]
//! keeps persistent sessions and retained messages on disk. Everything is
//! counted ([`metrics`]).

#![forbid(unsafe_code)]

pub mod acl;
pub mod auth;
pub mod bridge;
pub mod codec;
pub mod config;
pub mod connection;
pub mod delivery;
pub mod hub;
pub mod listener;
pub mod login;
pub mod metrics;
pub mod pending;
pub mod persist;
pub mod policy;
pub mod throttle;
pub mod tls;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mqseal_store::{AnyStore, CredentialStore, Role, UserRecord};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::acl::Acl;
use crate::auth::{Authenticator, KickReason};
use crate::config::{Config, PersistenceMode};
use crate::connection::{ListenerKind, Shared};
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// Which directory.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The credential store could not be opened.
    #[error(transparent)]
    Store(#[from] mqseal_store::StoreError),
    /// An ACL rule in the config is unusable.
    #[error(transparent)]
    Acl(#[from] acl::PatternError),
    /// The TLS certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The persistence store is damaged, newer, or cannot be opened.
    #[error(transparent)]
    Persist(#[from] persist::PersistError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// What the caller of [`start`] gets back: addresses actually bound (useful
/// with port 0) and a handle to stop the broker.
pub struct Running {
    /// Plain MQTT address, if enabled.
    pub tcp: Option<SocketAddr>,
    /// MQTT over TLS address, if enabled.
    pub tls: Option<SocketAddr>,
    /// MQTT over WebSockets address, if enabled.
    pub websocket: Option<SocketAddr>,
    /// Prometheus endpoint, if enabled.
    pub metrics: Option<SocketAddr>,
    /// The admin credential created on this start, if any (shown once).
    pub first_admin: Option<(String, zeroize::Zeroizing<String>)>,
    shared: Arc<Shared>,
    store: Option<Arc<persist::Store>>,
    /// The persistence writer and what tells it to stop.
    writer: Option<(tokio::task::JoinHandle<()>, tokio::sync::watch::Sender<bool>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, closes every session (v5 clients get DISCONNECT
    /// 0x8B) and waits up to `grace` for them to finish.
    ///
    /// The persistence writer keeps running while the sessions end (their
    /// held acknowledgements still get their commits), then stops between
    /// two commits, and the last commit is made after it.
    pub async fn shutdown(self, grace: Duration) {
        for task in &self.tasks {
            task.abort();
        }
        let kicked = self.shared.hub.kick_all(KickReason::Shutdown);
        let deadline = tokio::time::Instant::now() + grace;
        while self.shared.metrics.sessions_active.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some((writer, stop)) = self.writer {
            let _ = stop.send(true);
            if tokio::time::timeout(Duration::from_secs(30), writer).await.is_err() {
                warn!("the persistence writer did not finish its commit within 30 s");
            }
        }
        // What the sessions' ends changed (offline, deletes after acks)
        // goes to disk before the process does.
        if let Some(store) = &self.store {
            let failures = metrics::LogEvery::default();
            let ok = persist::commit(&self.shared.hub, store, &self.shared.metrics, &failures).await;
            info!(file = %store.path().display(), committed = ok, "persistence store flushed");
        }
        info!(sessions = kicked, "broker stopped");
    }
}

/// On the very first start (an empty store) an admin is created with a
/// random 256-bit password, returned to the caller to show once. It is never
/// logged: only its hash is stored.
async fn first_admin(store: &AnyStore, iterations: u32) -> Option<(String, zeroize::Zeroizing<String>)> {
    match store.list().await {
        Ok(users) if users.is_empty() => {}
        Ok(_) => return None,
        Err(e) => {
            warn!(error = %e, "cannot check for an admin user; none created");
            return None;
        }
    }
    let password = mqseal_store::hash::new_secret().ok()?;
    let pw = password.clone();
    let record =
        tokio::task::spawn_blocking(move || UserRecord::human("admin", pw.as_bytes(), Role::Admin, iterations))
            .await
            .ok()?
            .ok()?;
    match store.put(&record, false).await {
        Ok(()) => Some(("admin".to_owned(), password)),
        Err(e) => {
            warn!(error = %e, "could not create the first admin user");
            None
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })
}

/// Starts everything on the current tokio runtime and returns once all
/// listeners are bound.
pub async fn start(config: Config) -> Result<Running, StartError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| StartError::DataDir { path: config.data_dir.display().to_string(), source })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700));
    }
    // TLS material first: a bad path must fail the start, not the first client.
    let tls = match &config.tls {
        Some(t) => Some((t.bind, tls::server_config(&t.cert, &t.key)?)),
        None => None,
    };
    let mut rules = if config.acl.defaults { acl::default_rules() } else { Vec::new() };
    rules.extend(config.acl.rules.iter().cloned());
    let acl = Acl::new(&rules)?;

    let store = Arc::new(config.store.open(&config.data_dir).await?);
    let first_admin = first_admin(&store, config.auth.pbkdf2_iterations).await;
    info!(store = %store.describe(), "credential store ready");

    let metrics = Arc::new(Metrics::default());
    let (hub, state) = match config.persistence_path() {
        Some(path) => {
            let mut router = mqseal_router::Router::new(config.router_limits());
            router.enable_journal();
            let cache = config.persistence.cache_mib << 20;
            let store = persist::open_and_load(&path, cache, &mut router, hub::now())?;
            let durable = config.persistence.mode == PersistenceMode::Durable;
            (Arc::new(Hub::persistent(router, metrics.clone(), durable)), Some(Arc::new(store)))
        }
        None => (Arc::new(Hub::new(config.router_limits(), metrics.clone())), None),
    };
    let auth = Authenticator::new(store, config.auth.clone(), &config.throttle, metrics.clone());
    let gates = listener::Gates::new(&config.limits, metrics.clone());
    let revalidate = Duration::from_secs(config.auth.revalidate_secs);

    let mut listeners = Vec::new();
    let mut running_tcp = None;
    let mut running_tls = None;
    if let Some(addr) = config.listener.bind {
        let socket = bind(addr).await?;
        running_tcp = socket.local_addr().ok();
        let passwords_allowed = addr.ip().is_loopback() || config.listener.allow_insecure_password_logins;
        if !passwords_allowed {
            warn!(%addr, "plain-TCP listener on a non-loopback address: password logins will be refused (use TLS, or set listener.allow_insecure_password_logins)");
        }
        listeners.push(listener::Listener {
            socket,
            kind: ListenerKind { name: "tcp", passwords_allowed },
            tls: None,
            websocket: false,
        });
    }
    let acceptor = tls.as_ref().map(|(_, server_config)| tokio_rustls::TlsAcceptor::from(server_config.clone()));
    if let (Some((addr, _)), Some(acceptor)) = (&tls, &acceptor) {
        let socket = bind(*addr).await?;
        running_tls = socket.local_addr().ok();
        listeners.push(listener::Listener {
            socket,
            kind: ListenerKind { name: "tls", passwords_allowed: true },
            tls: Some(acceptor.clone()),
            websocket: false,
        });
    }
    let mut running_ws = None;
    if let Some(ws) = &config.websocket {
        let socket = bind(ws.bind).await?;
        running_ws = socket.local_addr().ok();
        let tls = if ws.tls { acceptor.clone() } else { None };
        let passwords_allowed =
            tls.is_some() || ws.bind.ip().is_loopback() || config.listener.allow_insecure_password_logins;
        let name = if tls.is_some() { "wss" } else { "ws" };
        listeners.push(listener::Listener {
            socket,
            kind: ListenerKind { name, passwords_allowed },
            tls,
            websocket: true,
        });
    }
    let metrics_socket = match config.metrics.bind {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let running_metrics = metrics_socket.as_ref().and_then(|s| s.local_addr().ok());

    let shared = Arc::new(Shared { config, auth, acl, metrics: metrics.clone(), hub: hub.clone() });
    let mut tasks = vec![tokio::spawn(hub.clone().run_timers())];
    let mut writer = None;
    if let Some(store) = &state {
        let mode = if shared.config.persistence.mode == PersistenceMode::Durable {
            persist::Mode::Durable
        } else {
            persist::Mode::Periodic
        };
        let interval = Duration::from_millis(shared.config.persistence.commit_interval_ms);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task =
            tokio::spawn(persist::run_writer(hub.clone(), store.clone(), mode, interval, metrics.clone(), stopped));
        writer = Some((task, stop));
    }
    for l in listeners {
        info!(addr = ?l.socket.local_addr().ok(), listener = l.kind.name, "listening");
        tasks.push(tokio::spawn(listener::run(l, shared.clone(), gates.clone())));
    }
    for b in &shared.config.bridges {
        info!(bridge = %b.name, upstream = %b.remote.address(), "bridge starting");
        let max_packet = shared.config.limits.max_packet_size;
        tasks.push(tokio::spawn(bridge::run(b.clone(), hub.clone(), metrics.clone(), max_packet)));
    }
    if let Some(socket) = metrics_socket {
        info!(addr = ?running_metrics, "metrics at /metrics");
        tasks.push(tokio::spawn(metrics::serve(socket, metrics, hub.clone())));
    }
    let sweeper = shared.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(revalidate);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let live = sweeper.hub.live_usernames();
            for (user, reason) in sweeper.auth.revalidate(&live).await {
                sweeper.hub.kick(&user, reason);
            }
        }
    }));
    Ok(Running {
        tcp: running_tcp,
        tls: running_tls,
        websocket: running_ws,
        metrics: running_metrics,
        first_admin,
        shared,
        store: state,
        writer,
        tasks,
    })
}
