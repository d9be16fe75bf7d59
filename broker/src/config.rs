//! `broker.toml`: every setting, its default, and errors that point at the
//! line.
//!
//! Unknown keys are errors (`deny_unknown_fields`): a misspelt `max_conections`
//! silently falling back to a default is how limits end up not being limits.
//! Flags and environment variables (see `main.rs`) override the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::acl::RuleSpec;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the broker keeps its state (the file store by default).
    pub data_dir: PathBuf,
    /// Plain MQTT over TCP.
    pub listener: ListenerConfig,
    /// MQTT over TLS; off unless configured.
    pub tls: Option<TlsConfig>,
    /// MQTT over WebSockets; off unless configured.
    pub websocket: Option<WebSocketConfig>,
    /// Connection and packet limits.
    pub limits: Limits,
    /// Where credentials live.
    pub store: StoreConfig,
    /// Caching and hashing of logins.
    pub auth: AuthConfig,
    /// Failed-login lockouts.
    pub throttle: ThrottleConfig,
    /// Topic rules.
    pub acl: AclConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Per-session bounds of the router: queues, inflight window, expiry.
    pub sessions: SessionsConfig,
    /// Bounds of the retained-message store.
    pub retained: RetainedConfig,
    /// Persistent sessions and retained messages on disk.
    pub persistence: PersistenceConfig,
    /// Bridges to upstream brokers (`[[bridge]]`, none by default).
    #[serde(rename = "bridge")]
    pub bridges: Vec<crate::bridge::BridgeConfig>,
    /// rumqttd's commit-log tuning, from before mqseal's own router: kept
    /// only to refuse it with a pointer to what replaced it.
    #[serde(rename = "router")]
    pub old_router: Option<toml::Value>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            listener: ListenerConfig::default(),
            tls: None,
            websocket: None,
            limits: Limits::default(),
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            throttle: ThrottleConfig::default(),
            acl: AclConfig::default(),
            metrics: MetricsConfig::default(),
            sessions: SessionsConfig::default(),
            retained: RetainedConfig::default(),
            persistence: PersistenceConfig::default(),
            bridges: Vec::new(),
            old_router: None,
        }
    }
}

/// `[listener]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Address for plain MQTT; empty string turns it off.
    pub bind: Option<SocketAddr>,
    /// Accept password logins over plain TCP on a non-loopback address.
    /// Off by default: passwords would cross the network in clear.
    pub allow_insecure_password_logins: bool,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig { bind: Some(SocketAddr::from(([127, 0, 0, 1], 1883))), allow_insecure_password_logins: false }
    }
}

/// `[tls]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address for MQTT over TLS.
    pub bind: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[websocket]`: MQTT over WebSockets (browsers, MQTT Explorer), any
/// path, subprotocol `mqtt`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Address for MQTT over WebSockets.
    pub bind: SocketAddr,
    /// `wss://` with the `[tls]` certificate (required for browsers on
    /// https pages). Without it, password logins follow the plain
    /// listener's rule: loopback only unless explicitly allowed.
    #[serde(default)]
    pub tls: bool,
}

/// `[limits]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections at the front, all listeners together.
    pub max_connections: usize,
    /// Largest MQTT packet accepted, fixed header included.
    pub max_packet_size: usize,
    /// Time from TCP accept to a complete CONNECT (TLS handshake included).
    pub connect_timeout_ms: u64,
    /// A write to a client that takes longer than this closes the connection.
    pub write_timeout_ms: u64,
    /// Longest a login may take once CONNECT is in (store lookups, password
    /// hashing, opening the router link); past it the client is told
    /// "server unavailable".
    pub login_timeout_ms: u64,
    /// Share of `max_connections`, in percent, that connections still
    /// logging in (TLS handshake, CONNECT, authentication, the refusal
    /// delay) may hold together. The rest is kept for logged-in sessions:
    /// sockets that never log in cannot crowd out the fleet.
    pub max_pending_logins_percent: u32,
    /// Once half of that share is in use, a source address (an IPv6 one by
    /// its /64) already holding this many logins in progress (or half the
    /// share, if that is less) gets no more until some finish: one address
    /// cannot keep every other client from logging in. Raise it when many
    /// devices share one public address (carrier-grade NAT); values above
    /// half the share change nothing.
    pub max_pending_logins_per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            max_packet_size: 256 * 1024,
            connect_timeout_ms: 5_000,
            write_timeout_ms: 30_000,
            login_timeout_ms: 10_000,
            max_pending_logins_percent: 25,
            max_pending_logins_per_address: 16,
        }
    }
}

pub use mqseal_store::{StoreConfig, StoreKind};

/// `[auth]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How long a fetched record is reused for new logins.
    pub cache_ttl_secs: u64,
    /// While the store is unreachable, cached records this old still serve.
    pub stale_ttl_secs: u64,
    /// How often live sessions (and cached records) are re-checked against
    /// the store; a disabled or deleted user is disconnected at the next check.
    pub revalidate_secs: u64,
    /// PBKDF2 rounds for new human passwords, for legacy upgrades, and for
    /// the decoy check of unknown usernames.
    pub pbkdf2_iterations: u32,
    /// A refused password is answered this long after the CONNECT arrived,
    /// never sooner. Checking a device secret (one SHA-256) takes
    /// microseconds, a human password (PBKDF2) hundreds of milliseconds, an
    /// unknown name whatever the decoy costs: without a common floor the
    /// answer time would tell which names exist and what they are.
    pub refusal_delay_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            cache_ttl_secs: 5,
            stale_ttl_secs: 600,
            revalidate_secs: 2,
            pbkdf2_iterations: mqseal_store::hash::DEFAULT_PBKDF2_ITERATIONS,
            refusal_delay_ms: 1_000,
        }
    }
}

/// `[throttle]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleConfig {
    /// Failures per username before the first lockout.
    pub user_free_failures: u32,
    /// Failures per source address before the first lockout.
    pub address_free_failures: u32,
    /// First lockout; doubles with each further failure.
    pub base_delay_ms: u64,
    /// Longest lockout.
    pub max_delay_secs: u64,
    /// Failure counts are forgotten after this long without failures.
    pub forget_after_secs: u64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            user_free_failures: 3,
            address_free_failures: 20,
            base_delay_ms: 1_000,
            max_delay_secs: 300,
            forget_after_secs: 900,
        }
    }
}

/// `[acl]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    /// Keep the default device/controller rules (README, "Who may do
    /// what"); `rules` add to them.
    pub defaults: bool,
    /// Extra rules.
    pub rules: Vec<RuleSpec>,
}

impl Default for AclConfig {
    fn default() -> Self {
        AclConfig { defaults: true, rules: Vec::new() }
    }
}

/// `[metrics]`
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint (`GET /metrics`); off when absent.
    pub bind: Option<SocketAddr>,
}

/// `[sessions]`: what the router holds for each client session.
///
/// Every session has its own queue, bounded in messages and bytes; when a
/// message does not fit, QoS 0 goes first (the new one, else the oldest
/// queued QoS 0) and then the oldest QoS 1/2 message, and every drop is
/// counted in `mqseal_messages_dropped_total{reason=…}` and logged once per
/// `drop_log_interval_secs` per client (docs/ROUTER.md). The defaults let a
/// subscriber fall 1,000,000 messages or 256 MiB behind before anything is
/// dropped — a QoS 1 burst of 4 publishers × 100,000 messages to a
/// subscriber that reads as fast as it can fits — and a subscriber that
/// never reads costs at most that.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Messages queued per session beyond its inflight window.
    pub max_queued_messages: usize,
    /// Topic and payload bytes queued per session.
    pub max_queued_bytes: usize,
    /// QoS 1/2 deliveries in flight per session, when the client's Receive
    /// Maximum is larger (3.1.1 clients always get this).
    pub max_inflight: u16,
    /// Unreleased QoS 2 publishes a client may have: the Receive Maximum
    /// the broker announces to MQTT 5 clients.
    pub receive_maximum: u16,
    /// Longest session expiry a client may ask for, in seconds (MQTT 5
    /// clients are told when theirs is cut; 3.1.1 persistent sessions get
    /// this one).
    pub max_session_expiry_secs: u32,
    /// Subscriptions one session may hold; past it SUBACK says 0x97
    /// (3.1.1: 0x80) for the filter.
    pub max_subscriptions: usize,
    /// At most one "messages dropped" log line per client per this many seconds.
    pub drop_log_interval_secs: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        let d = mqseal_router::Limits::default();
        SessionsConfig {
            max_queued_messages: d.max_queued_messages,
            max_queued_bytes: d.max_queued_bytes,
            max_inflight: d.max_inflight,
            receive_maximum: d.max_incoming_qos2,
            max_session_expiry_secs: d.max_session_expiry_secs,
            max_subscriptions: d.max_subscriptions,
            drop_log_interval_secs: d.drop_log_interval_ms / 1000,
        }
    }
}

/// `[retained]`: the retained-message store.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetainedConfig {
    /// Retained messages held in all; a new topic past it is refused (counted).
    pub max_messages: usize,
    /// Their topic and payload bytes.
    pub max_bytes: usize,
}

impl Default for RetainedConfig {
    fn default() -> Self {
        let d = mqseal_router::Limits::default();
        RetainedConfig { max_messages: d.max_retained_messages, max_bytes: d.max_retained_bytes }
    }
}

/// How `[persistence]` keeps the router's state across restarts.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PersistenceMode {
    /// Every acknowledgement a persistent session is given (the
    /// publisher's PUBACK/PUBREC for a message queued for it, SUBACK,
    /// CONNACK) waits until it is committed: nothing acknowledged is lost
    /// by a crash. Commits are grouped: all that arrives while one runs
    /// goes in the next.
    Durable,
    /// A commit every `commit_interval_ms`, nobody waits: a crash loses up
    /// to that interval, a clean stop nothing.
    Periodic,
    /// Memory only: a restart loses sessions and retained messages.
    Off,
}

/// `[persistence]`: retained messages and persistent sessions
/// (subscriptions, queued and inflight QoS 1/2 messages) in a redb file
/// under `data_dir` (docs/ROUTER.md, "Persistence").
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PersistenceConfig {
    /// `durable` (the default), `periodic` or `off`.
    pub mode: PersistenceMode,
    /// The file, relative to `data_dir`.
    pub file: PathBuf,
    /// Periodic mode: how often it commits. Durable mode: how long
    /// changes nobody waits for (deletes after acknowledgements, packet
    /// ids) may stay unwritten.
    pub commit_interval_ms: u64,
    /// Memory redb may keep for pages, in MiB. The store is read once at
    /// start and then only written, so a small cache costs little speed
    /// (docs/BENCHMARKS.md) and redb's own default of 1 GiB would be most
    /// of the broker's memory.
    pub cache_mib: usize,
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        PersistenceConfig {
            mode: PersistenceMode::Durable,
            file: PathBuf::from("router.redb"),
            commit_interval_ms: 1000,
            cache_mib: 16,
        }
    }
}

pub use mqseal_tomlfile::ConfigError;

impl Config {
    /// Parses `text` (read from `path`, used in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        mqseal_tomlfile::parse(text, path)
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        mqseal_tomlfile::load(path)
    }

    /// Cross-field checks, after flags are applied.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |message: String| Err(ConfigError::Invalid { path: origin.to_owned(), message });
        if self.limits.max_packet_size < 64 || self.limits.max_packet_size > 256 * 1024 * 1024 {
            return bad(format!("limits.max_packet_size = {}: must be 64 B to 256 MiB", self.limits.max_packet_size));
        }
        if self.limits.max_connections == 0 {
            return bad("limits.max_connections must be at least 1".into());
        }
        if !(1..=100).contains(&self.limits.max_pending_logins_percent) {
            return bad(format!(
                "limits.max_pending_logins_percent = {}: must be 1 to 100",
                self.limits.max_pending_logins_percent
            ));
        }
        if self.limits.max_pending_logins_per_address == 0 {
            return bad("limits.max_pending_logins_per_address must be at least 1".into());
        }
        if self.store.kind == StoreKind::Mongodb && self.store.mongodb_uri.is_none() {
            return bad("store.kind = \"mongodb\" needs store.mongodb_uri".into());
        }
        if self.auth.pbkdf2_iterations < mqseal_store::hash::MIN_PBKDF2_ITERATIONS {
            return bad(format!(
                "auth.pbkdf2_iterations = {}: at least {}",
                self.auth.pbkdf2_iterations,
                mqseal_store::hash::MIN_PBKDF2_ITERATIONS
            ));
        }
        for b in &self.bridges {
            if let Err(message) = b.validate() {
                return bad(message);
            }
        }
        if self.bridges.iter().enumerate().any(|(i, b)| self.bridges.iter().skip(i + 1).any(|o| o.name == b.name)) {
            return bad("two [[bridge]]s with the same name".into());
        }
        if self.listener.bind.is_none() && self.tls.is_none() && self.websocket.is_none() {
            return bad("no listener: set listener.bind, [tls] or [websocket]".into());
        }
        if self.websocket.as_ref().is_some_and(|w| w.tls) && self.tls.is_none() {
            return bad("websocket.tls = true needs the [tls] certificate (cert, key)".into());
        }
        if self.old_router.is_some() {
            return bad("[router] tuned rumqttd's commit logs, which mqseal's own router replaced: \
                        bound queues with [sessions] (max_queued_messages, max_queued_bytes, max_inflight) \
                        and retained messages with [retained] (max_messages, max_bytes); see config/broker.toml"
                .into());
        }
        let s = &self.sessions;
        if s.max_queued_messages == 0 || s.max_queued_bytes == 0 || s.max_inflight == 0 || s.receive_maximum == 0 {
            return bad(
                "sessions: max_queued_messages, max_queued_bytes, max_inflight and receive_maximum must be at least 1"
                    .into(),
            );
        }
        if self.persistence.commit_interval_ms == 0 || self.persistence.commit_interval_ms > 3_600_000 {
            return bad(format!(
                "persistence.commit_interval_ms = {}: must be 1 ms to one hour",
                self.persistence.commit_interval_ms
            ));
        }
        if self.persistence.cache_mib == 0 || self.persistence.cache_mib > 1 << 20 {
            return bad(format!("persistence.cache_mib = {}: must be 1 MiB to 1 TiB", self.persistence.cache_mib));
        }
        if self.auth.revalidate_secs == 0 {
            return bad("auth.revalidate_secs must be at least 1".into());
        }
        // A refusal held back past the login deadline would be answered
        // "server unavailable" instead — a different answer for a wrong
        // password than for a lockout, which the floor exists to prevent.
        if self.auth.refusal_delay_ms >= self.limits.login_timeout_ms {
            return bad(format!(
                "auth.refusal_delay_ms = {} must be below limits.login_timeout_ms = {}",
                self.auth.refusal_delay_ms, self.limits.login_timeout_ms
            ));
        }
        let week = 7 * 24 * 3600;
        if self.throttle.max_delay_secs > week || self.throttle.base_delay_ms > self.throttle.max_delay_secs * 1000 {
            return bad(format!(
                "throttle: base_delay_ms = {} and max_delay_secs = {}: need base_delay_ms <= max_delay_secs * 1000 <= one week",
                self.throttle.base_delay_ms, self.throttle.max_delay_secs
            ));
        }
        Ok(())
    }

    /// The router's bounds.
    pub fn router_limits(&self) -> mqseal_router::Limits {
        let s = &self.sessions;
        mqseal_router::Limits {
            max_queued_messages: s.max_queued_messages,
            max_queued_bytes: s.max_queued_bytes,
            max_inflight: s.max_inflight,
            max_incoming_qos2: s.receive_maximum,
            max_retained_messages: self.retained.max_messages,
            max_retained_bytes: self.retained.max_bytes,
            max_session_expiry_secs: s.max_session_expiry_secs,
            max_subscriptions: s.max_subscriptions,
            drop_log_interval_ms: s.drop_log_interval_secs.saturating_mul(1000),
        }
    }

    /// The persistence store's file, or `None` when persistence is off.
    pub fn persistence_path(&self) -> Option<PathBuf> {
        (self.persistence.mode != PersistenceMode::Off).then(|| self.data_dir.join(&self.persistence.file))
    }

    /// The file store's path.
    pub fn store_path(&self) -> PathBuf {
        self.store.file_path(&self.data_dir)
    }

    /// `limits.connect_timeout_ms` as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.connect_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/broker.toml");
        let config = Config::load(&path).unwrap();
        config.validate("config/broker.toml").unwrap();
        assert_eq!(config.listener.bind, Some(SocketAddr::from(([127, 0, 0, 1], 1883))));
        // The example spells out the defaults; they must not drift.
        assert_eq!(config.sessions, SessionsConfig::default());
        assert_eq!(config.retained, RetainedConfig::default());
        assert_eq!(config.persistence, PersistenceConfig::default());
        let (limits, defaults) = (&config.limits, Limits::default());
        assert_eq!(
            (limits.max_connections, limits.max_pending_logins_percent, limits.max_pending_logins_per_address),
            (defaults.max_connections, defaults.max_pending_logins_percent, defaults.max_pending_logins_per_address)
        );
    }

    #[test]
    fn persistence_modes_parse_and_bad_values_are_refused() {
        let c = Config::parse("[persistence]\nmode = \"periodic\"\ncommit_interval_ms = 50\n", Path::new("b.toml"))
            .unwrap();
        assert_eq!(c.persistence.mode, PersistenceMode::Periodic);
        assert_eq!(c.persistence_path(), Some(PathBuf::from("data/router.redb")));
        let off = Config::parse("[persistence]\nmode = \"off\"\n", Path::new("b.toml")).unwrap();
        assert_eq!(off.persistence_path(), None);
        let err = Config::parse("[persistence]\nmode = \"sometimes\"\n", Path::new("b.toml")).unwrap_err().to_string();
        assert!(err.contains("sometimes") && err.contains("durable"), "{err}");
        let zero = Config::parse("[persistence]\ncommit_interval_ms = 0\n", Path::new("b.toml")).unwrap();
        assert!(zero.validate("b.toml").unwrap_err().to_string().contains("persistence.commit_interval_ms"));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "[limits]\nmax_connections = 10\nmax_conections = 5\n";
        let err = Config::parse(text, Path::new("b.toml")).unwrap_err().to_string();
        assert!(err.starts_with("b.toml:3:1:") && err.contains("max_conections"), "{err}");

        let text = "[limits]\nmax_packet_size = \"big\"\n";
        let err = Config::parse(text, Path::new("b.toml")).unwrap_err().to_string();
        assert!(
            err.starts_with("b.toml:2:") && err.contains("invalid type") && err.contains("max_packet_size"),
            "{err}"
        );

        let text = "[store]\nkind = \"mongodb\"\n";
        let config = Config::parse(text, Path::new("b.toml")).unwrap();
        let err = config.validate("b.toml").unwrap_err().to_string();
        assert!(err.contains("store.mongodb_uri"), "{err}");

        let text = "[auth]\nrefusal_delay_ms = 20000\n";
        let err = Config::parse(text, Path::new("b.toml")).unwrap().validate("b.toml").unwrap_err().to_string();
        assert!(err.contains("refusal_delay_ms = 20000 must be below limits.login_timeout_ms"), "{err}");
        let text = "[throttle]\nmax_delay_secs = 99999999\n";
        let err = Config::parse(text, Path::new("b.toml")).unwrap().validate("b.toml").unwrap_err().to_string();
        assert!(err.contains("one week"), "{err}");

        // The old rumqttd tuning is refused, naming what replaced it.
        let text = "[router]\nmax_segment_size = 2048\n";
        let err = Config::parse(text, Path::new("b.toml")).unwrap().validate("b.toml").unwrap_err().to_string();
        assert!(err.contains("[router]") && err.contains("[sessions]") && err.contains("max_queued_messages"), "{err}");
        let text = "[sessions]\nmax_queued_messages = 0\n";
        let err = Config::parse(text, Path::new("b.toml")).unwrap().validate("b.toml").unwrap_err().to_string();
        assert!(err.contains("sessions: max_queued_messages"), "{err}");
    }
}
