//! TLS: loading the configured certificate at startup, and `gen-cert`.
//!
//! The certificate and key are read and checked when the broker starts, so a
//! wrong path or a key that does not match the certificate stops the start
//! with a message, instead of failing the first client (which is what
//! rumqttd's listeners do: they re-read the files per connection).
//!
//! rustls 0.23 ignores an IP address sent as SNI (mosquitto clients do that
//! for `-h 127.0.0.1`); rustls 0.22 inside rumqttd refused the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    File {
        /// Which file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the pair (e.g. the key does not match).
    #[error("certificate {cert} with key {key}: {message}")]
    Config {
        /// Certificate path.
        cert: String,
        /// Key path.
        key: String,
        /// rustls's message.
        message: String,
    },
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Generate(String),
    /// Writing generated files failed.
    #[error("{path}: {source}")]
    Write {
        /// Which file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Loads and checks the server certificate chain and key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let file_err = |path: &Path, message: String| TlsError::File { path: path.display().to_string(), message };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(cert, "no CERTIFICATE block".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config_err = |message: String| TlsError::Config {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        message,
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| config_err(e.to_string()))?;
    Ok(Arc::new(config))
}

/// Paths written by [`generate`].
pub struct Generated {
    /// CA certificate, for clients' `--cafile`.
    pub ca_cert: PathBuf,
    /// Server certificate (leaf), for `tls.cert`.
    pub server_cert: PathBuf,
    /// Server key (0600), for `tls.key`.
    pub server_key: PathBuf,
}

/// A self-signed CA and a server certificate it signs, for `names` (DNS
/// names or IP addresses; `localhost` and `127.0.0.1` are always included).
/// The CA key is not kept: the CA exists only to be trusted by clients.
pub fn generate(dir: &Path, names: &[String]) -> Result<Generated, TlsError> {
    let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.distinguished_name.push(DnType::CommonName, "mqseal local CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen_err)?;

    let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    for n in names {
        if !sans.contains(n) {
            sans.push(n.clone());
        }
    }
    let mut params = CertificateParams::new(sans).map_err(gen_err)?;
    params.distinguished_name.push(DnType::CommonName, "mqseal-broker");
    let key = KeyPair::generate().map_err(gen_err)?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;

    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.display().to_string(), source })?;
    let out = Generated {
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    };
    let write = |path: &Path, text: &str, private: bool| -> Result<(), TlsError> {
        let err = |source| TlsError::Write { path: path.display().to_string(), source };
        if private {
            mqseal_store::write_private(path, text.as_bytes()).map_err(err)
        } else {
            std::fs::write(path, text).map_err(err)
        }
    };
    write(&out.ca_cert, &ca_cert.pem(), false)?;
    write(&out.server_cert, &cert.pem(), false)?;
    write(&out.server_key, &key.serialize_pem(), true)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pair_loads_and_bad_paths_fail_early() {
        let dir = tempfile::tempdir().unwrap();
        let g = generate(dir.path(), &["broker.example".into()]).unwrap();
        server_config(&g.server_cert, &g.server_key).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&g.server_key).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let err = server_config(&dir.path().join("missing.pem"), &g.server_key).unwrap_err().to_string();
        assert!(err.contains("missing.pem"), "{err}");
        // A key that does not belong to the certificate.
        let other = tempfile::tempdir().unwrap();
        let g2 = generate(other.path(), &[]).unwrap();
        assert!(server_config(&g.server_cert, &g2.server_key).is_err());
    }
}
