//! `broker.toml`: every setting, its default, and errors that point at the
//! line.
//!
//! Unknown keys are errors (`deny_unknown_fields`): a misspelt `max_conections`
//! silently falling back to a default is how limits end up not being limits.
//! Flags and environment variables (see `main.rs`) override the file.

use std::collections::BTreeMap;
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
    /// The embedded rumqttd router's memory bounds.
    pub router: RouterTuning,
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
            router: RouterTuning::default(),
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

/// `[router]`: rumqttd keeps an in-memory commit log per subscription
/// filter, never removes one, and drops the oldest messages of a log once it
/// is full (a subscriber that lags further behind than the log holds loses
/// them, QoS 1 or not). These bound it.
///
/// The defaults follow mqseal's traffic. Every device subscribes to two
/// filters of its own (`cmd`, `chal/req`) that see a few small commands: a
/// small log each, because ten thousand devices have twenty thousand of
/// them — and a log, once traffic has filled it, stays full, its entries
/// costing far more RAM than the topic and payload bytes the cap counts
/// (10,000 devices plateau at ~2.4 GiB: docs/BENCHMARKS.md#soak). 2 × 2 KiB
/// still queues ~25 small commands for a device that is briefly offline;
/// commands live at most 600 s and controllers wait 10 s, so a longer
/// backlog buys little. Controllers subscribe to the response, challenge and status topics
/// of many devices at once: those logs get room for bursts (a broadcast's
/// answers). `filters` keys are MQTT filters matched against each
/// subscription filter, so `mqseal/v1/dev/+/resp` also covers a controller
/// subscribing to one device's responses.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RouterTuning {
    /// Bytes per log segment, for filters not listed in `filters`.
    pub max_segment_size: usize,
    /// Segments kept per filter (the log holds up to size × count).
    pub max_segment_count: usize,
    /// Packets queued towards one client before the router pauses it.
    pub max_outgoing_packet_count: u64,
    /// Larger (or smaller) logs for the filters that match these patterns.
    pub filters: BTreeMap<String, SegmentTuning>,
}

/// One `[router.filters."pattern"]` entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SegmentTuning {
    /// Bytes per segment (at least 1024).
    pub max_segment_size: usize,
    /// Segments kept (at least 1).
    pub max_segment_count: usize,
}

impl Default for RouterTuning {
    fn default() -> Self {
        let wide = |count| SegmentTuning { max_segment_size: 1024 * 1024, max_segment_count: count };
        RouterTuning {
            max_segment_size: 2 * 1024,
            max_segment_count: 2,
            max_outgoing_packet_count: 200,
            filters: BTreeMap::from([
                ("mqseal/v1/dev/+/resp".to_owned(), wide(16)),
                ("mqseal/v1/dev/+/chal".to_owned(), wide(4)),
                ("mqseal/v1/dev/+/status".to_owned(), wide(4)),
            ]),
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
        if self.listener.bind.is_none() && self.tls.is_none() && self.websocket.is_none() {
            return bad("no listener: set listener.bind, [tls] or [websocket]".into());
        }
        if self.websocket.as_ref().is_some_and(|w| w.tls) && self.tls.is_none() {
            return bad("websocket.tls = true needs the [tls] certificate (cert, key)".into());
        }
        let segments = std::iter::once((
            "router".to_owned(),
            SegmentTuning {
                max_segment_size: self.router.max_segment_size,
                max_segment_count: self.router.max_segment_count,
            },
        ))
        .chain(self.router.filters.iter().map(|(f, t)| (format!("router.filters.\"{f}\""), t.clone())));
        for (name, t) in segments {
            // rumqttd panics below these, in its router thread.
            if t.max_segment_size < 1024 || t.max_segment_count == 0 {
                return bad(format!("{name}: max_segment_size must be at least 1024 and max_segment_count at least 1"));
            }
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
        assert_eq!(config.router, RouterTuning::default());
        let (limits, defaults) = (&config.limits, Limits::default());
        assert_eq!(
            (limits.max_connections, limits.max_pending_logins_percent, limits.max_pending_logins_per_address),
            (defaults.max_connections, defaults.max_pending_logins_percent, defaults.max_pending_logins_per_address)
        );
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

        let text = "[router]\nmax_segment_size = 100\n";
        let err = Config::parse(text, Path::new("b.toml")).unwrap().validate("b.toml").unwrap_err().to_string();
        assert!(err.contains("router: max_segment_size"), "{err}");
        let text = "[router.filters.\"a/#\"]\nmax_segment_size = 4096\nmax_segment_count = 0\n";
        let err = Config::parse(text, Path::new("b.toml")).unwrap().validate("b.toml").unwrap_err().to_string();
        assert!(err.contains("router.filters.\"a/#\""), "{err}");
    }
}
