//! `mqseal-broker` as a real process, configured by the test.
//!
//! Each test gets its own broker on free ports with its own data directory
//! (and, for MongoDB, its own database), so tests run in parallel without
//! seeing each other's users, sessions or throttling state. The broker is
//! the compiled binary, started exactly as an operator would start it, with
//! a `broker.toml` the harness writes.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{STARTUP_TIMEOUT, free_port};

/// Where the broker keeps its credentials.
#[derive(Clone, Debug)]
pub enum Store {
    /// The embedded file store in the data directory.
    File,
    /// MongoDB at `uri`, in `database`.
    Mongo {
        /// Connection string.
        uri: String,
        /// Database name (one per test).
        database: String,
        /// Also read the seed's legacy `IOT.login_info` layout.
        legacy: bool,
    },
}

/// The settings a test may change; everything else is the broker's default.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Plain listener address (`127.0.0.1:<free>` by default).
    pub bind: String,
    /// TLS listener: (port, certificate, key).
    pub tls: Option<(u16, PathBuf, PathBuf)>,
    /// WebSocket listener: (port, over TLS).
    pub websocket: Option<(u16, bool)>,
    /// Prometheus endpoint port.
    pub metrics_port: Option<u16>,
    /// `limits.max_connections`.
    pub max_connections: usize,
    /// `limits.max_packet_size`.
    pub max_packet_size: usize,
    /// `limits.connect_timeout_ms`.
    pub connect_timeout_ms: u64,
    /// `limits.login_timeout_ms`.
    pub login_timeout_ms: u64,
    /// Credential store.
    pub store: Store,
    /// `auth.refusal_delay_ms` (short in tests unless a test is about it).
    pub refusal_delay_ms: u64,
    /// `auth.revalidate_secs`.
    pub revalidate_secs: u64,
    /// `auth.cache_ttl_secs`.
    pub cache_ttl_secs: u64,
    /// `auth.pbkdf2_iterations` (the store's minimum, to keep tests fast).
    pub pbkdf2_iterations: u32,
    /// `throttle.user_free_failures`.
    pub user_free_failures: u32,
    /// `throttle.address_free_failures` (high: every test client is 127.0.0.1).
    pub address_free_failures: u32,
    /// `throttle.base_delay_ms`.
    pub base_delay_ms: u64,
    /// `listener.allow_insecure_password_logins`.
    pub allow_insecure_password_logins: bool,
    /// Extra TOML appended verbatim (e.g. `[[acl.rules]]`).
    pub extra: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            bind: format!("127.0.0.1:{}", free_port()),
            tls: None,
            websocket: None,
            metrics_port: None,
            max_connections: 1000,
            max_packet_size: 64 * 1024,
            connect_timeout_ms: 3000,
            login_timeout_ms: 10_000,
            store: Store::File,
            refusal_delay_ms: 50,
            revalidate_secs: 1,
            cache_ttl_secs: 5,
            pbkdf2_iterations: 1000,
            user_free_failures: 3,
            address_free_failures: 1000,
            base_delay_ms: 1000,
            allow_insecure_password_logins: false,
            extra: String::new(),
        }
    }
}

impl BrokerConfig {
    /// The `broker.toml` text.
    #[must_use]
    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        t.push_str("data_dir = \"data\"\n\n[listener]\n");
        t.push_str(&format!("bind = \"{}\"\n", self.bind));
        t.push_str(&format!("allow_insecure_password_logins = {}\n\n", self.allow_insecure_password_logins));
        if let Some((port, cert, key)) = &self.tls {
            t.push_str(&format!(
                "[tls]\nbind = \"127.0.0.1:{port}\"\ncert = \"{}\"\nkey = \"{}\"\n\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some((port, tls)) = self.websocket {
            t.push_str(&format!("[websocket]\nbind = \"127.0.0.1:{port}\"\ntls = {tls}\n\n"));
        }
        t.push_str(&format!(
            "[limits]\nmax_connections = {}\nmax_packet_size = {}\nconnect_timeout_ms = {}\nlogin_timeout_ms = {}\n\n",
            self.max_connections, self.max_packet_size, self.connect_timeout_ms, self.login_timeout_ms
        ));
        match &self.store {
            Store::File => t.push_str("[store]\nkind = \"file\"\ntimeout_ms = 1000\n\n"),
            Store::Mongo { uri, database, legacy } => t.push_str(&format!(
                "[store]\nkind = \"mongodb\"\nmongodb_uri = \"{uri}\"\ndatabase = \"{database}\"\n\
                 legacy_login_info = {legacy}\nlegacy_database = \"{database}_IOT\"\ntimeout_ms = 1000\n\n"
            )),
        }
        t.push_str(&format!(
            "[auth]\ncache_ttl_secs = {}\nrevalidate_secs = {}\npbkdf2_iterations = {}\nrefusal_delay_ms = {}\n\n",
            self.cache_ttl_secs, self.revalidate_secs, self.pbkdf2_iterations, self.refusal_delay_ms
        ));
        t.push_str(&format!(
            "[throttle]\nuser_free_failures = {}\naddress_free_failures = {}\nbase_delay_ms = {}\n\n",
            self.user_free_failures, self.address_free_failures, self.base_delay_ms
        ));
        if let Some(port) = self.metrics_port {
            t.push_str(&format!("[metrics]\nbind = \"127.0.0.1:{port}\"\n\n"));
        }
        t.push_str(&self.extra);
        t
    }

    /// The plain listener's port.
    ///
    /// # Panics
    /// If `bind` has no port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.bind.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {}", self.bind))
    }
}

/// Why a broker did not come up.
#[derive(Debug)]
pub struct StartFailure {
    /// Exit status, if it exited.
    pub status: Option<ExitStatus>,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it logged.
    pub stderr: String,
}

/// A running `mqseal-broker`, killed on drop.
pub struct BrokerProc {
    child: Child,
    /// The configuration it was started with.
    pub config: BrokerConfig,
    /// Its working directory (holds `broker.toml`, `data/`, `broker.log`).
    pub dir: PathBuf,
    /// Lines it printed on stdout up to "ready".
    pub stdout: Vec<String>,
}

impl BrokerProc {
    /// Writes `config` into `dir` and starts `binary` there.
    ///
    /// # Errors
    /// When the broker exits or does not report ready within the startup timeout.
    pub async fn start(binary: &Path, dir: &Path, config: BrokerConfig) -> Result<BrokerProc, StartFailure> {
        Self::start_with_args(binary, dir, config, &[]).await
    }

    /// [`BrokerProc::start`] with extra command-line arguments.
    ///
    /// # Errors
    /// When the broker exits or does not report ready within the startup timeout.
    ///
    /// # Panics
    /// When the config or log file cannot be written, or the binary cannot be spawned.
    pub async fn start_with_args(
        binary: &Path,
        dir: &Path,
        config: BrokerConfig,
        args: &[&str],
    ) -> Result<BrokerProc, StartFailure> {
        let conf = dir.join("broker.toml");
        std::fs::write(&conf, config.to_toml()).unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
        let log = std::fs::File::create(dir.join("broker.log")).unwrap_or_else(|e| panic!("broker.log: {e}"));
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(&conf)
            .args(args)
            .current_dir(dir)
            .env("MQSEAL_LOG", "info,mqseal_broker=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let Some(out) = child.stdout.take() else { panic!("no stdout pipe") };
        let mut lines = BufReader::new(out).lines();
        let mut stdout = Vec::new();
        let ready = tokio::time::timeout(STARTUP_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let done = line.starts_with("mqseal-broker ready");
                stdout.push(line);
                if done {
                    return true;
                }
            }
            false
        })
        .await;
        if ready != Ok(true) {
            let _ = child.start_kill();
            let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await.ok().and_then(Result::ok);
            let stderr = std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default();
            return Err(StartFailure { status, stdout: stdout.join("\n"), stderr });
        }
        // Keep draining stdout so the broker never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(BrokerProc { child, config, dir: dir.to_owned(), stdout })
    }

    /// The plain listener's port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.config.port()
    }

    /// The admin password printed on first start, if one was.
    #[must_use]
    pub fn first_admin_password(&self) -> Option<String> {
        self.stdout.iter().find_map(|l| l.trim().strip_prefix("password: ").map(str::to_owned))
    }

    /// Everything logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }

    /// The file store's path.
    #[must_use]
    pub fn users_file(&self) -> PathBuf {
        self.dir.join("data").join("users.json")
    }

    /// The broker's process id, while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills it with SIGKILL (a crash: no goodbye to anyone, nothing
    /// flushed) and waits for it to be gone.
    ///
    /// # Panics
    /// When it does not die within 10 s.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            panic!("broker did not die on SIGKILL");
        }
    }

    /// Sends SIGTERM and waits for the exit.
    ///
    /// # Errors
    /// When it does not exit within `timeout`.
    pub async fn terminate(mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let pid = self.child.id().ok_or("already exited")?;
        crate::run("kill", &["-TERM", &pid.to_string()], Duration::from_secs(5)).await?;
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| format!("broker did not exit within {timeout:?} of SIGTERM"))?
            .map_err(|e| e.to_string())
    }
}

/// A database name no other test uses.
#[must_use]
pub fn unique_database(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}
