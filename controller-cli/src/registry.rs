//! The controller's device registry: what it must know to talk to each
//! device — its RSA public key (to seal commands to it and check its
//! receipts) and its HMAC key (challenge mode).
//!
//! HMAC keys are shared secrets, so `devices.json` is written 0600,
//! atomically (the store's [`write_private`]). It is kept apart from the
//! broker's credential store on purpose: the broker never needs these keys,
//! and a broker that holds them could forge challenge-mode commands.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mqseal_proto::challenge::HmacKey;
use mqseal_proto::sealed::PublicKey;
use mqseal_store::write_private;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// One device.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// The device's RSA public key, SPKI PEM.
    pub public_key: String,
    /// The device's HMAC key, hex.
    pub hmac_key: Zeroizing<String>,
    /// Unix time of creation or last rotation.
    pub since: u64,
}

/// Keys of one device, parsed.
pub struct DeviceKeys {
    /// RSA public key.
    pub public: PublicKey,
    /// HMAC key.
    pub hmac: HmacKey,
}

impl DeviceEntry {
    /// Parses the keys.
    ///
    /// # Errors
    /// A message naming the key that does not parse.
    pub fn keys(&self, id: &str) -> Result<DeviceKeys, RegistryError> {
        let bad = |what: &str| RegistryError::Invalid(format!("device {id}: {what}"));
        let public = PublicKey::from_pem(&self.public_key).map_err(|_| bad("public_key does not parse"))?;
        let bytes = Zeroizing::new(hex::decode(self.hmac_key.as_str()).map_err(|_| bad("hmac_key is not hex"))?);
        let hmac = HmacKey::from_slice(&bytes).map_err(|_| bad("hmac_key is not 32 bytes"))?;
        Ok(DeviceKeys { public, hmac })
    }
}

/// Why the registry cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Reading or writing.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Content.
    #[error("{0}")]
    Invalid(String),
}

/// `devices.json`.
#[derive(Debug, Default)]
pub struct Registry {
    path: PathBuf,
    /// Devices by id.
    pub devices: BTreeMap<String, DeviceEntry>,
}

impl Registry {
    /// The registry in `dir` (empty if the file does not exist yet).
    ///
    /// # Errors
    /// [`RegistryError`] for an unreadable or damaged file.
    pub fn open(dir: &Path) -> Result<Registry, RegistryError> {
        let path = dir.join("devices.json");
        let devices = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| RegistryError::Invalid(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(RegistryError::Io { path: path.display().to_string(), source }),
        };
        Ok(Registry { path, devices })
    }

    /// Writes it back, 0600, atomically.
    ///
    /// # Errors
    /// [`RegistryError::Io`].
    pub fn save(&self) -> Result<(), RegistryError> {
        let io = |source| RegistryError::Io { path: self.path.display().to_string(), source };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let bytes = Zeroizing::new(
            serde_json::to_vec_pretty(&self.devices).map_err(|e| RegistryError::Invalid(e.to_string()))?,
        );
        write_private(&self.path, &bytes).map_err(io)
    }

    /// A device's keys.
    ///
    /// # Errors
    /// [`RegistryError::Invalid`] for an unknown device.
    pub fn keys(&self, id: &str) -> Result<DeviceKeys, RegistryError> {
        self.devices
            .get(id)
            .ok_or_else(|| RegistryError::Invalid(format!("unknown device {id} (see mqseal device list)")))?
            .keys(id)
    }
}
