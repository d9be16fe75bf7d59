//! Creating, rotating and removing device credentials.
//!
//! A device has three secrets, all made here and never reused: its broker
//! password (256 random bits; only a salted SHA-256 of it goes to the
//! store), its HMAC key (challenge mode) and its RSA key pair (sealed mode).
//! The controller keeps the public key and the HMAC key in its registry; the
//! device gets everything in one 0600 agent bundle, ready for
//! `mqseal-agent --config`.

use std::path::{Path, PathBuf};

use mqseal_agent::config::{AgentConfig, KeysConfig, LimitsConfig, PolicyConfig};
use mqseal_client::{BrokerEndpoint, rng, unix_now};
use mqseal_proto::challenge::HmacKey;
use mqseal_proto::sealed::{PrivateKey, PublicKey};
use mqseal_store::{AnyStore, CredentialStore, Role, StoreError, UserRecord, write_private};
use zeroize::Zeroizing;

use crate::registry::{DeviceEntry, Registry, RegistryError};

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The credential store.
    #[error("credential store: {0}")]
    Store(#[from] StoreError),
    /// The registry.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Key generation or encoding.
    #[error("keys: {0}")]
    Keys(#[from] mqseal_proto::Error),
    /// Writing the bundle.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Something the caller asked for that cannot be done.
    #[error("{0}")]
    Refused(String),
}

/// What a new or rotated device got.
#[derive(Debug, serde::Serialize)]
pub struct Provisioned {
    /// Its id.
    pub device: String,
    /// Where its agent bundle was written.
    pub bundle: PathBuf,
    /// The key id of its RSA key (SHA-256 of the SPKI), hex.
    pub key_id: String,
    /// Whether the controller user was granted the device now.
    pub granted_to: Option<String>,
}

/// Inputs to [`add_or_rotate`].
pub struct DeviceSpec<'a> {
    /// Device id.
    pub id: &'a str,
    /// RSA modulus size.
    pub bits: usize,
    /// Replace an existing device's credentials (rotate) instead of refusing.
    pub rotate: bool,
    /// How the agent reaches the broker (username and password are filled in).
    pub broker: BrokerEndpoint,
    /// Controllers the device trusts.
    pub controllers: Vec<PublicKey>,
    /// Controller user to grant the device to (if it is a controller).
    pub grant_to: Option<&'a str>,
    /// Where to write the bundle.
    pub bundle: PathBuf,
}

/// Creates (or, with `rotate`, replaces) a device's credentials.
///
/// Order matters for rotation: the new broker password is stored first
/// (the broker closes sessions opened with the old one within its
/// revalidation interval), then the registry, then the bundle — so a crash
/// half-way leaves a device that cannot log in, never one whose old
/// credentials still work.
///
/// # Errors
/// [`ProvisionError`] naming what failed.
pub async fn add_or_rotate(
    store: &AnyStore,
    registry: &mut Registry,
    spec: DeviceSpec<'_>,
) -> Result<Provisioned, ProvisionError> {
    mqseal_proto::validate_id(spec.id).map_err(|e| ProvisionError::Refused(format!("device id {:?}: {e}", spec.id)))?;
    let existing = store.get(spec.id).await?;
    if !spec.rotate && (existing.is_some() || registry.devices.contains_key(spec.id)) {
        return Err(ProvisionError::Refused(format!(
            "device {} already exists (use `mqseal device rotate {}` to replace its credentials)",
            spec.id, spec.id
        )));
    }
    if spec.rotate && existing.is_none() && !registry.devices.contains_key(spec.id) {
        return Err(ProvisionError::Refused(format!("no device {} to rotate", spec.id)));
    }
    if let Some(r) = &existing
        && r.role != Role::Device
    {
        return Err(ProvisionError::Refused(format!("{} is a {} user, not a device", spec.id, r.role.as_str())));
    }
    let secret = mqseal_store::hash::new_secret().map_err(StoreError::Random)?;
    let hmac = HmacKey::generate(&mut rng());
    let key = PrivateKey::generate(&mut rng(), spec.bits)?;

    store.put(&UserRecord::device(spec.id, secret.as_bytes())?, spec.rotate).await?;
    let granted_to = match spec.grant_to {
        Some(user) => grant(store, user, spec.id).await?,
        None => None,
    };
    registry.devices.insert(
        spec.id.to_owned(),
        DeviceEntry {
            public_key: key.public().to_pem()?,
            hmac_key: Zeroizing::new(hex::encode(hmac.as_bytes())),
            since: unix_now(),
        },
    );
    registry.save()?;

    let mut broker = spec.broker;
    broker.username = spec.id.to_owned();
    broker.password = Some(secret);
    broker.password_file = None;
    let controllers = spec.controllers.iter().map(PublicKey::to_pem).collect::<Result<Vec<_>, _>>()?;
    let config = AgentConfig {
        device_id: spec.id.to_owned(),
        state_dir: PathBuf::from(format!("{}-state", spec.id)),
        broker,
        keys: KeysConfig {
            hmac_key: Zeroizing::new(hex::encode(hmac.as_bytes())),
            private_key: key.to_pkcs8_pem()?,
            controllers,
        },
        policy: PolicyConfig::default(),
        limits: LimitsConfig::default(),
        commands: AgentConfig::default_commands(),
    };
    write_bundle(&spec.bundle, &config)?;
    Ok(Provisioned { device: spec.id.to_owned(), bundle: spec.bundle, key_id: hex::encode(key.id().0), granted_to })
}

/// Writes an agent bundle, 0600 (it holds the device's secrets).
///
/// # Errors
/// [`ProvisionError::Io`].
pub fn write_bundle(path: &Path, config: &AgentConfig) -> Result<(), ProvisionError> {
    let io = |source| ProvisionError::Io { path: path.display().to_string(), source };
    let body = Zeroizing::new(
        toml::to_string_pretty(config).map_err(|e| ProvisionError::Refused(format!("encoding the bundle: {e}")))?,
    );
    let text = Zeroizing::new(format!(
        "# mqseal agent bundle for device {id}: run `mqseal-agent --config {file}`.\n\
         # It holds the device's secrets: keep it 0600 and copy it only to the device.\n\
         # Edit [commands] to change what the device may run (see README).\n\n{body}",
        id = config.device_id,
        file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        body = body.as_str(),
    ));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    write_private(path, text.as_bytes()).map_err(io)
}

/// Adds `device` to a controller user's grants (nothing for admins or a
/// `*` grant). Returns the user if it was changed.
async fn grant(store: &AnyStore, user: &str, device: &str) -> Result<Option<String>, ProvisionError> {
    let Some(mut record) = store.get(user).await? else { return Ok(None) };
    if record.role != Role::Controller || record.grants.iter().any(|g| g == "*" || g == device) {
        return Ok(None);
    }
    record.grants.push(device.to_owned());
    store.put(&record, true).await?;
    Ok(Some(user.to_owned()))
}

/// Removes a device: its broker login (the broker closes its session), its
/// keys from the registry and its grants.
///
/// # Errors
/// [`ProvisionError`].
pub async fn remove(store: &AnyStore, registry: &mut Registry, id: &str) -> Result<bool, ProvisionError> {
    let in_store = store.delete(id).await?;
    let in_registry = registry.devices.remove(id).is_some();
    registry.save()?;
    for mut user in store.list().await? {
        if user.grants.iter().any(|g| g == id) {
            user.grants.retain(|g| g != id);
            store.put(&user, true).await?;
        }
    }
    Ok(in_store || in_registry)
}
