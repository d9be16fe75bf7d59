//! `mqseal.toml`: the controller's configuration.
//!
//! ```toml
//! data_dir = "controller"          # device registry (devices.json) and bundles
//! key = "controller.key.pem"       # this controller's RSA key (mqseal keygen)
//! broker_config = "config/broker.toml"   # use the broker's [store] section
//!
//! [broker]
//! host = "127.0.0.1"
//! port = 1883
//! username = "operator"
//! password_file = "operator.password"
//! ```
//!
//! Relative paths resolve against the file's folder. Every key also has an
//! environment variable (`MQSEAL_*`, see `mqseal --help`), which wins.

use std::path::{Path, PathBuf};

use mqseal_client::BrokerEndpoint;
use mqseal_store::StoreConfig;
use mqseal_tomlfile::ConfigError;
use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Where the device registry and agent bundles live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// This controller's private key (PKCS#8 PEM).
    #[serde(default = "default_key")]
    pub key: PathBuf,
    /// The broker to send through.
    pub broker: Option<BrokerEndpoint>,
    /// The credential store `user` and `device` commands write to: either
    /// this section, or the `[store]` of the broker's own config file.
    pub store: Option<StoreConfig>,
    /// A broker config whose `data_dir` and `[store]` to use.
    pub broker_config: Option<PathBuf>,
    /// PBKDF2 rounds for human passwords set with `user add`/`passwd`.
    #[serde(default = "default_iterations")]
    pub pbkdf2_iterations: u32,
    /// The broker address written into new agent bundles, if not `broker`'s.
    pub agent_broker: Option<AgentBroker>,
    /// Where this file was read from (for relative paths).
    #[serde(skip)]
    pub base: PathBuf,
}

/// `[agent_broker]`: how devices reach the broker, when that differs from
/// how the controller does (another host name, TLS with a CA file).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentBroker {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// CA file path as the device will see it.
    pub tls_ca: Option<PathBuf>,
    /// Further brokers of the same cluster (`host:port`), written into
    /// the bundle's `[broker] failover`.
    #[serde(default)]
    pub failover: Vec<String>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("controller")
}
fn default_key() -> PathBuf {
    PathBuf::from("controller.key.pem")
}
fn default_iterations() -> u32 {
    mqseal_store::hash::DEFAULT_PBKDF2_ITERATIONS
}

/// The parts of a broker config the controller reads.
#[derive(Deserialize)]
struct BrokerFile {
    #[serde(default = "broker_data_dir")]
    data_dir: PathBuf,
    #[serde(default)]
    store: StoreConfig,
}

fn broker_data_dir() -> PathBuf {
    PathBuf::from("data")
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            data_dir: default_data_dir(),
            key: default_key(),
            broker: None,
            store: None,
            broker_config: None,
            pbkdf2_iterations: default_iterations(),
            agent_broker: None,
            base: PathBuf::from("."),
        }
    }
}

impl ControllerConfig {
    /// Reads `path`, or the defaults when it is `None`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and line.
    pub fn load(path: Option<&Path>) -> Result<ControllerConfig, ConfigError> {
        let Some(path) = path else { return Ok(ControllerConfig::default()) };
        let mut config: ControllerConfig = mqseal_tomlfile::load(path)?;
        config.base = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        Ok(config)
    }

    /// A path from the file, resolved against its folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        self.base.join(p)
    }

    /// The broker endpoint, or an error saying how to set one.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when there is no `[broker]`.
    pub fn broker(&self) -> Result<&BrokerEndpoint, ConfigError> {
        self.broker.as_ref().ok_or_else(|| {
            ConfigError::invalid(Path::new("config"), "no [broker] section (or MQSEAL_BROKER / MQSEAL_USERNAME)")
        })
    }

    /// The store section and the folder a file store lives in.
    ///
    /// # Errors
    /// [`ConfigError`] reading the broker config.
    pub fn store(&self) -> Result<(StoreConfig, PathBuf), ConfigError> {
        if let Some(store) = &self.store {
            return Ok((store.clone(), self.base.clone()));
        }
        let broker_path = self.resolve(self.broker_config.as_deref().unwrap_or(Path::new("config/broker.toml")));
        let text = std::fs::read_to_string(&broker_path)
            .map_err(|source| ConfigError::Read { path: broker_path.display().to_string(), source })?;
        // The broker file has many sections the controller does not need;
        // read only `data_dir` and `[store]` (toml ignores the rest here).
        let parsed: BrokerFile = mqseal_tomlfile::parse(&text, &broker_path)?;
        // The broker resolves a relative data_dir against its working
        // directory; so does this, so run both from the same place (the
        // README runs both from the repository root).
        Ok((parsed.store, parsed.data_dir))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_documented_example_parses_and_reads_the_brokers_store() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mqseal.toml");
        let c = ControllerConfig::load(Some(&path)).unwrap();
        assert_eq!(c.broker().unwrap().username, "operator");
        let (store, data_dir) = c.store().unwrap();
        assert_eq!((store.kind, data_dir), (mqseal_store::StoreKind::File, PathBuf::from("data")));
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        std::fs::write(&p, "data_dir = \"x\"\n[broker]\nusername = 5\n").unwrap();
        let err = ControllerConfig::load(Some(&p)).unwrap_err().to_string();
        assert!(err.contains("m.toml:3:"), "{err}");
    }
}
