//! `mqseal keygen`: the controller's RSA key pair.

use std::path::{Path, PathBuf};

use mqseal_client::rng;
use mqseal_controller::config::ControllerConfig;
use mqseal_proto::sealed::PrivateKey;
use mqseal_store::write_private;
use serde_json::json;

use super::{Exit, Failure};

/// Generates the key pair (private 0600, public beside it as `.pub`).
pub(super) fn run(
    c: &ControllerConfig,
    bits: usize,
    out: Option<PathBuf>,
    force: bool,
    json: bool,
) -> Result<Exit, Failure> {
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
    Ok(Exit::Ok)
}

fn public_path(private: &Path) -> PathBuf {
    let mut s = private.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}
