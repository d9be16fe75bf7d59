//! `agent.toml`: who the device is, how it reaches the broker, what it
//! trusts, and the allow-list of what it may run.
//!
//! `mqseal device add` writes a complete file (mode 0600, because it holds
//! the device's secrets inline); operators then edit the `[commands]` table.
//! Everything is checked at load time — keys parse, argument types make
//! sense, programs are absolute paths — so a bad file stops the agent at
//! start with the file, line and field, never at the first command.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mqseal_client::BrokerEndpoint;
use mqseal_proto::challenge::HmacKey;
use mqseal_proto::sealed::{Keyring, PrivateKey, PublicKey};
use mqseal_proto::{Policy, validate_id};
use mqseal_tomlfile::ConfigError;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::commands::{ArgSpec, CommandSpec};

/// The whole file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The device id: its broker username, MQTT client id and topic level.
    pub device_id: String,
    /// Where replay state and stored responses are kept (relative to this
    /// file's folder). Must be writable, or the agent refuses to execute.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The broker.
    pub broker: BrokerEndpoint,
    /// The device's keys and the controllers it trusts.
    pub keys: KeysConfig,
    /// Time and challenge policy.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Bounds on execution.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The allow-list: command name → what it runs.
    #[serde(default)]
    pub commands: BTreeMap<String, CommandSpec>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}

/// `[keys]`. PEM and hex inline, because the bundle is one 0600 file that
/// can be copied to a device as is.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// The device's 256-bit HMAC key, hex (challenge mode).
    pub hmac_key: Zeroizing<String>,
    /// The device's RSA private key, PKCS#8 PEM (sealed mode).
    pub private_key: Zeroizing<String>,
    /// Public keys (SPKI PEM) of the controllers whose commands it accepts.
    pub controllers: Vec<String>,
}

/// `[policy]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Tolerated clock difference with controllers.
    pub max_skew_secs: u64,
    /// Longest validity window a command may claim.
    pub max_lifetime_secs: u64,
    /// How long a handed-out challenge stays usable.
    pub challenge_lifetime_ms: u64,
    /// Sealed commands remembered for replay protection; beyond this the
    /// soonest-expiring are forgotten behind a floor (never accepted again).
    pub replay_capacity: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        let p = Policy::default();
        PolicyConfig {
            max_skew_secs: p.max_skew_secs,
            max_lifetime_secs: p.max_lifetime_secs,
            challenge_lifetime_ms: 30_000,
            replay_capacity: mqseal_proto::sealed::ReplayCache::DEFAULT_CAPACITY,
        }
    }
}

impl PolicyConfig {
    /// As `proto` takes it.
    pub fn policy(&self) -> Policy {
        Policy { max_skew_secs: self.max_skew_secs, max_lifetime_secs: self.max_lifetime_secs }
    }
}

/// `[limits]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Output captured from a program beyond this is cut (and says so).
    pub max_output_bytes: usize,
    /// A command without its own `timeout_ms` is stopped after this.
    pub default_timeout_ms: u64,
    /// Commands running at once; more wait their turn.
    pub max_concurrent: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig { max_output_bytes: 16 * 1024, default_timeout_ms: 10_000, max_concurrent: 4 }
    }
}

/// The parsed keys.
pub struct Keys {
    /// HMAC key.
    pub hmac: HmacKey,
    /// RSA private key (shared, so a simulated fleet need not hold ten
    /// thousand copies of one test key).
    pub private: std::sync::Arc<PrivateKey>,
    /// Trusted controllers.
    pub controllers: Keyring,
}

impl AgentConfig {
    /// Reads, parses and checks `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, and the line or field.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig = mqseal_tomlfile::load(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Cross-field checks.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the field.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::invalid(path, m));
        if validate_id(&self.device_id).is_err() {
            return bad(format!("device_id {:?}: 1-64 characters from A-Z a-z 0-9 - _ . :", self.device_id));
        }
        if self.broker.username != self.device_id {
            return bad(format!(
                "broker.username {:?} must equal device_id {:?}: the broker only lets a device in under its own id",
                self.broker.username, self.device_id
            ));
        }
        if self.policy.max_lifetime_secs == 0 || self.policy.challenge_lifetime_ms == 0 {
            return bad("policy.max_lifetime_secs and policy.challenge_lifetime_ms must be positive".into());
        }
        if self.limits.max_concurrent == 0 {
            return bad("limits.max_concurrent must be at least 1".into());
        }
        if self.limits.max_output_bytes > mqseal_proto::limits::MAX_OUTPUT_LEN {
            return bad(format!(
                "limits.max_output_bytes = {}: at most {} (the protocol's limit)",
                self.limits.max_output_bytes,
                mqseal_proto::limits::MAX_OUTPUT_LEN
            ));
        }
        for (name, spec) in &self.commands {
            if let Err(m) = spec.check(name) {
                return bad(format!("commands.{name}: {m}"));
            }
        }
        self.keys(path).map(|_| ())
    }

    /// Parses the keys.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key that does not parse.
    pub fn keys(&self, path: &Path) -> Result<Keys, ConfigError> {
        let bad = |m: &str| ConfigError::invalid(path, m.to_owned());
        let bytes =
            Zeroizing::new(hex::decode(self.keys.hmac_key.trim()).map_err(|_| bad("keys.hmac_key is not hex"))?);
        let hmac = HmacKey::from_slice(&bytes).map_err(|_| bad("keys.hmac_key must be 32 bytes (64 hex digits)"))?;
        let private = PrivateKey::from_pkcs8_pem(&self.keys.private_key)
            .map_err(|_| bad("keys.private_key is not a PKCS#8 PEM RSA key of 2048-4096 bits"))?;
        let mut controllers = Keyring::new();
        for (i, pem) in self.keys.controllers.iter().enumerate() {
            let key = PublicKey::from_pem(pem).map_err(|_| {
                ConfigError::invalid(path, format!("keys.controllers[{i}] is not an SPKI PEM RSA public key"))
            })?;
            controllers.add(key);
        }
        if controllers.is_empty() {
            return Err(bad("keys.controllers is empty: the agent would trust no one"));
        }
        Ok(Keys { hmac, private: std::sync::Arc::new(private), controllers })
    }

    /// The state directory, resolved against the config file's folder.
    pub fn state_path(&self, config_path: &Path) -> PathBuf {
        config_path.parent().unwrap_or(Path::new(".")).join(&self.state_dir)
    }

    /// The allow-list every new device starts with: built-ins only, nothing
    /// that touches the system. Operators add programs by editing the file.
    pub fn default_commands() -> BTreeMap<String, CommandSpec> {
        let builtin = |b: &str, args: Vec<ArgSpec>| CommandSpec::builtin(b, args);
        BTreeMap::from([
            ("ping".to_owned(), builtin("ping", vec![])),
            ("noop".to_owned(), builtin("noop", vec![])),
            ("info".to_owned(), builtin("info", vec![])),
            ("echo".to_owned(), builtin("echo", vec![ArgSpec::string("text", 256)])),
        ])
    }
}
