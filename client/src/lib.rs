//! What the agent and the controller share to reach a broker.
//!
//! Both are MQTT clients of the same broker with the same needs: a
//! `[broker]` section naming the endpoint, TLS and credentials (read from a
//! file, never from a command line), reconnecting without hammering a broker
//! that is down, and — because `proto` is sans-IO — a clock and a random
//! number generator to hand to it. Keeping these here means one answer to
//! "how does mqseal connect" for every binary.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand_core::{Rng, UnwrapErr};
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use rumqttc;

/// Largest MQTT packet either side sends or accepts: a 64 KiB envelope plus
/// the topic and packet header, with room to spare.
pub const MAX_PACKET: usize = 80 * 1024;

/// Why a client cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A file named in the configuration could not be read.
    #[error("{what} {path}: {source}")]
    Read {
        /// What the file was for.
        what: &'static str,
        /// Its path.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The `[broker]` section is unusable.
    #[error("broker config: {0}")]
    Invalid(String),
}

/// `[broker]`: where the broker is and how to log in to it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerEndpoint {
    /// Host name or address.
    #[serde(default = "default_host")]
    pub host: String,
    /// Port (1883 plain, 8883 TLS by convention).
    #[serde(default = "default_port")]
    pub port: u16,
    /// CA certificate (PEM) to verify the broker with; TLS is on when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// Name the broker's certificate must carry, if not `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// Login name.
    pub username: String,
    /// The password itself. Only for files that are themselves secrets
    /// (an agent bundle, written 0600); otherwise use `password_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Zeroizing<String>>,
    /// A file whose first line is the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// MQTT keep-alive in seconds (at least 5).
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    /// TCP connect plus TLS handshake deadline.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Further brokers of the same cluster, `host:port` each: a connection
    /// that cannot be made or is lost moves on to the next one (after
    /// `host`:`port`, in this order, then round again), keeping its
    /// session. TLS settings apply to all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<String>,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1883
}
fn default_keepalive() -> u64 {
    30
}
fn default_connect_timeout() -> u64 {
    10
}

impl BrokerEndpoint {
    /// An endpoint on `host:port` logging in as `username`.
    pub fn new(host: &str, port: u16, username: &str) -> Self {
        BrokerEndpoint {
            host: host.into(),
            port,
            tls_ca: None,
            tls_server_name: None,
            username: username.into(),
            password: None,
            password_file: None,
            keepalive_secs: default_keepalive(),
            connect_timeout_secs: default_connect_timeout(),
            failover: Vec::new(),
        }
    }

    /// The brokers to use, in turn: `host:port`, then `failover`.
    ///
    /// # Errors
    /// [`ClientError::Invalid`] naming a `failover` entry that is not
    /// `host:port`.
    pub fn brokers(&self) -> Result<Vec<(String, u16)>, ClientError> {
        let mut out = vec![(self.host.clone(), self.port)];
        for a in &self.failover {
            let parsed = a.trim().rsplit_once(':').and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)));
            // An IPv6 address goes in brackets: `[::1]:1883`.
            let host = |h: &str| match h.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                Some(v6) if !v6.is_empty() => Some(v6.to_owned()),
                Some(_) => None,
                None => (!h.is_empty() && !h.contains(':')).then(|| h.to_owned()),
            };
            match parsed.and_then(|(h, p)| Some((host(h)?, p))) {
                Some((h, p)) if p != 0 => out.push((h, p)),
                _ => return Err(ClientError::Invalid(format!("broker.failover entry {a:?}: expected host:port"))),
            }
        }
        Ok(out)
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> String {
        self.address_at(0)
    }

    /// `host:port` of broker `i` of [`BrokerEndpoint::brokers`] (counted
    /// round), for messages.
    pub fn address_at(&self, i: usize) -> String {
        match self.brokers() {
            Ok(b) => b.get(i % b.len()).map_or_else(String::new, |(h, p)| format!("{h}:{p}")),
            Err(_) => format!("{}:{}", self.host, self.port),
        }
    }

    /// The password: inline, or the first line of `password_file`
    /// (relative paths resolve against `base`, the config file's folder).
    ///
    /// # Errors
    /// [`ClientError`] when neither is set or the file cannot be read.
    pub fn password(&self, base: &Path) -> Result<Zeroizing<String>, ClientError> {
        if let Some(p) = &self.password {
            return Ok(p.clone());
        }
        let Some(file) = &self.password_file else {
            return Err(ClientError::Invalid("set broker.password_file (or broker.password in a 0600 bundle)".into()));
        };
        let path = base.join(file);
        let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|source| ClientError::Read {
            what: "password file",
            path: path.display().to_string(),
            source,
        })?);
        Ok(Zeroizing::new(text.lines().next().unwrap_or("").to_owned()))
    }

    /// rumqttc options for this endpoint's first broker, as `client_id`.
    ///
    /// # Errors
    /// [`ClientError`] for an unreadable password or CA file, or bad values.
    pub fn mqtt_options(&self, client_id: &str, base: &Path) -> Result<MqttOptions, ClientError> {
        self.mqtt_options_at(0, client_id, base)
    }

    /// rumqttc options for broker `i` of [`BrokerEndpoint::brokers`]
    /// (counted round), as `client_id`: what an event loop is given to
    /// reconnect elsewhere.
    ///
    /// # Errors
    /// As [`BrokerEndpoint::mqtt_options`], and for a bad `failover` entry.
    pub fn mqtt_options_at(&self, i: usize, client_id: &str, base: &Path) -> Result<MqttOptions, ClientError> {
        let brokers = self.brokers()?;
        let (host, port) = brokers.get(i % brokers.len()).cloned().unwrap_or((self.host.clone(), self.port));
        if client_id.is_empty() || client_id.starts_with(' ') {
            return Err(ClientError::Invalid(format!("client id {client_id:?} is not usable")));
        }
        if self.keepalive_secs < 5 || self.keepalive_secs > 65_535 {
            return Err(ClientError::Invalid(format!(
                "broker.keepalive_secs = {}: must be 5 to 65535",
                self.keepalive_secs
            )));
        }
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_credentials(self.username.clone(), self.password(base)?.as_str())
            .set_keep_alive(Duration::from_secs(self.keepalive_secs))
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        if let Some(ca) = &self.tls_ca {
            options.set_transport(Transport::tls_with_config(self.tls(&base.join(ca))?));
        }
        Ok(options)
    }

    fn tls(&self, ca_path: &Path) -> Result<TlsConfiguration, ClientError> {
        let pem = std::fs::read(ca_path).map_err(|source| ClientError::Read {
            what: "CA certificate",
            path: ca_path.display().to_string(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        let mut found = 0;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| ClientError::Invalid(format!("CA certificate {}: {e}", ca_path.display())))?;
            roots.add(cert).map_err(|e| ClientError::Invalid(format!("CA certificate {}: {e}", ca_path.display())))?;
            found += 1;
        }
        if found == 0 {
            return Err(ClientError::Invalid(format!("CA certificate {}: no certificate in it", ca_path.display())));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Invalid(format!("TLS: {e}")))?;
        let config = match &self.tls_server_name {
            None => builder.with_root_certificates(roots).with_no_client_auth(),
            Some(name) => {
                let name = rustls_pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| ClientError::Invalid(format!("broker.tls_server_name {name:?}: {e}")))?;
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| ClientError::Invalid(format!("TLS: {e}")))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NamedVerifier { inner, name }))
                    .with_no_client_auth()
            }
        };
        Ok(TlsConfiguration::Rustls(Arc::new(config)))
    }

    /// The network options: the connect deadline, and Nagle off — every
    /// mqseal exchange is a small request waiting for a small answer, which
    /// Nagle's algorithm would hold back for up to a delayed-ACK timeout.
    pub fn network_options(&self) -> rumqttc::NetworkOptions {
        let mut n = rumqttc::NetworkOptions::new();
        n.set_connection_timeout(self.connect_timeout_secs.max(1));
        n.set_tcp_nodelay(true);
        n
    }
}

/// Which of an endpoint's brokers a connection uses: the first, then —
/// each time a connection cannot be made or is lost — the next, round
/// again after the last. One per connection (agent, controller session,
/// bridge), so that all of them fail over the same way.
#[derive(Debug, Clone, Copy)]
pub struct Failover {
    count: usize,
    current: usize,
}

impl Failover {
    /// Starts at `endpoint`'s first broker.
    ///
    /// # Errors
    /// As [`BrokerEndpoint::brokers`].
    pub fn new(endpoint: &BrokerEndpoint) -> Result<Self, ClientError> {
        Ok(Failover { count: endpoint.brokers()?.len(), current: 0 })
    }

    /// The index (for [`BrokerEndpoint::mqtt_options_at`] and
    /// [`BrokerEndpoint::address_at`]) of the broker in use.
    #[must_use]
    pub fn current(&self) -> usize {
        self.current
    }

    /// Moves on to the next broker; false when there is only one (nothing
    /// to change).
    pub fn advance(&mut self) -> bool {
        if self.count < 2 {
            return false;
        }
        self.current = (self.current + 1) % self.count;
        true
    }
}

/// `tls_server_name`: the broker's certificate is verified — fully, by
/// webpki against the configured CA — for this name instead of the host
/// connected to (a broker reached by address, or through a tunnel, whose
/// certificate names it otherwise). Only the name changes; nothing is
/// skipped.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: rustls_pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _connected_to: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Reconnect delays: exponential with full jitter (AWS's "full jitter"), so
/// that a fleet cut off by a broker restart does not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starting at `base`, doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max, attempt: 0 }
    }

    /// The delay before the next attempt: uniform in `[0, min(max, base·2^n)]`,
    /// but never under a tenth of `base`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX).max(1);
        let jittered = rng().next_u64() % ms;
        Duration::from_millis(jittered.max(u64::try_from(self.base.as_millis() / 10).unwrap_or(0)))
    }

    /// Back to `base` after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The operating system's RNG in the shape `proto` takes.
///
/// `UnwrapErr` turns a failing OS RNG into a panic: there is no secure way to
/// go on without randomness, and on Linux `getrandom` does not fail once the
/// pool is initialised.
pub fn rng() -> UnwrapErr<getrandom::SysRng> {
    UnwrapErr(getrandom::SysRng)
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970): for
/// records people read back (the audit log), where seconds are too coarse.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..50 {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(10) && d <= Duration::from_secs(2), "{d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn failover_brokers_come_after_the_first_and_bad_entries_are_named() {
        let mut e = BrokerEndpoint::new("a.example", 1883, "alice");
        e.password = Some(Zeroizing::new("x".into()));
        e.failover = vec!["b.example:1884".into(), "[::1]:1885".into()];
        let brokers = e.brokers().unwrap();
        assert_eq!(brokers, [("a.example".into(), 1883), ("b.example".into(), 1884), ("::1".into(), 1885)]);
        assert_eq!(e.mqtt_options_at(1, "c", Path::new(".")).unwrap().broker_address(), ("b.example".into(), 1884));
        assert_eq!(e.mqtt_options_at(3, "c", Path::new(".")).unwrap().broker_address(), ("a.example".into(), 1883));
        let mut f = Failover::new(&e).unwrap();
        let order: Vec<usize> = (0..4).map(|_| if f.advance() { f.current() } else { usize::MAX }).collect();
        assert_eq!(order, [1, 2, 0, 1], "round the list");
        for bad in ["b.example", "::1", "b.example:0", "[]:1883", ":1883"] {
            e.failover = vec![bad.into()];
            assert!(e.brokers().unwrap_err().to_string().contains(&format!("{bad:?}")), "{bad}");
        }
    }

    #[test]
    fn passwords_come_from_a_file_or_the_bundle_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("mqseal-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "s3cret\nignored\n").unwrap();
        let mut e = BrokerEndpoint::new("127.0.0.1", 1883, "alice");
        assert!(e.password(&dir).unwrap_err().to_string().contains("password_file"));
        e.password_file = Some("pw".into());
        assert_eq!(e.password(&dir).unwrap().as_str(), "s3cret");
        e.password_file = Some("missing".into());
        assert!(e.password(&dir).unwrap_err().to_string().contains("missing"));
        e.tls_ca = Some("pw".into());
        e.password = Some(Zeroizing::new("x".into()));
        let err = e.mqtt_options("c", &dir).unwrap_err().to_string();
        assert!(err.contains("no certificate"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
