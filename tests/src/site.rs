//! A whole mqseal site for end-to-end tests: the broker, the `mqseal`
//! controller CLI with its own key and user, and device agents — all the
//! compiled binaries, run as processes exactly as an operator runs them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

pub use crate::Output;
use crate::STARTUP_TIMEOUT;
use crate::broker::{BrokerConfig, BrokerProc, Store};

/// A workspace binary (`mqseal`, `mqseal-agent`, `mqseal-broker`), from the
/// target directory this test was built into.
///
/// # Panics
/// When it has not been built (`cargo build --workspace --bins`, which the
/// test command runs first).
#[must_use]
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).unwrap_or_else(|| panic!("no target dir above {}", exe.display()));
    let bin = dir.join(name);
    if !bin.exists() {
        panic!(
            "{} is missing: build it first with `cargo build --workspace --bins` (scripts/test.sh does)",
            bin.display()
        );
    }
    bin
}

/// Broker + controller configuration + helpers. The controller's side
/// ([`Operator`]: `mqseal.toml`, keys, bundles, agents) is reached through
/// `Deref`, so `site.mqseal(…)` and `site.dir` work as they read.
pub struct Site {
    /// The controller's side, in the site folder.
    pub op: Operator,
    /// The broker process.
    pub broker: BrokerProc,
    /// The admin password the broker printed on first start.
    pub admin_password: String,
}

impl std::ops::Deref for Site {
    type Target = Operator;
    fn deref(&self) -> &Operator {
        &self.op
    }
}

/// An operator's side of a site, whatever broker it talks to: the folder
/// with `mqseal.toml` for an `operator` controller (its key, its user in
/// the store), the devices' bundles and registry, and the agents' logs.
pub struct Operator {
    /// Everything of this test lives here.
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Site {
    /// Starts a broker on `store`, writes `mqseal.toml` for an `operator`
    /// controller using the same store, creates its key (2048-bit, for
    /// speed) and its user.
    ///
    /// # Panics
    /// When any step fails.
    pub async fn start(store: Store) -> Site {
        Site::start_with(BrokerConfig { store, ..BrokerConfig::default() }, None).await
    }

    /// Like [`Site::start`], with a TLS listener too (certificates from the
    /// broker's own `gen-cert`, in `tls/`): returns the site, the TLS port
    /// and the CA file.
    ///
    /// # Panics
    /// When any step fails.
    pub async fn start_tls() -> (Site, u16, PathBuf) {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let tls = tmp.path().join("tls");
        let out = std::process::Command::new(workspace_bin("mqseal-broker"))
            .args(["gen-cert", "--dir"])
            .arg(&tls)
            .args(["--name", "broker.example"])
            .output()
            .unwrap_or_else(|e| panic!("gen-cert: {e}"));
        assert!(out.status.success(), "gen-cert: {}", String::from_utf8_lossy(&out.stderr));
        let port = crate::free_port();
        let config = BrokerConfig {
            tls: Some((port, tls.join("server.pem"), tls.join("server.key"))),
            ..BrokerConfig::default()
        };
        (Site::start_with(config, Some(tmp)).await, port, tls.join("ca.pem"))
    }

    /// Like [`Site::start`] with a broker configured as `config` says
    /// (metrics, limits, another store).
    ///
    /// # Panics
    /// When any step fails.
    pub async fn start_config(config: BrokerConfig) -> Site {
        Site::start_with(config, None).await
    }

    async fn start_with(config: BrokerConfig, tmp: Option<tempfile::TempDir>) -> Site {
        let tmp = match tmp {
            Some(t) => t,
            None => tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
        };
        let dir = tmp.path().to_owned();
        let store = config.store.clone();
        let broker = BrokerProc::start(&workspace_bin("mqseal-broker"), &dir, config)
            .await
            .unwrap_or_else(|e| panic!("broker did not start: {e:?}"));
        let admin_password = broker.first_admin_password().unwrap_or_else(|| panic!("no admin password printed"));
        let store_section = match &store {
            Store::File => format!("[store]\nkind = \"file\"\npath = \"{}\"\n", dir.join("data/users.json").display()),
            Store::Mongo { uri, database, .. } => {
                format!("[store]\nkind = \"mongodb\"\nmongodb_uri = \"{uri}\"\ndatabase = \"{database}\"\n")
            }
        };
        let broker_section = format!("[broker]\nhost = \"127.0.0.1\"\nport = {}\n", broker.port());
        let op = Operator::set_up(tmp, "operator", &broker_section, &store_section).await;
        Site { op, broker, admin_password }
    }

    /// Kills the broker with SIGKILL, waits `down_for`, and starts it again
    /// on the same ports, configuration and data: its file store survives,
    /// and so do persistent sessions and retained messages (its default
    /// durable persistence). The old log is kept as `broker.log.1`.
    ///
    /// # Panics
    /// When it does not come back.
    pub async fn crash_and_restart_broker(&mut self, down_for: Duration) {
        self.kill_broker().await;
        tokio::time::sleep(down_for).await;
        self.restart_broker().await;
    }

    /// The first half of [`Site::crash_and_restart_broker`]: SIGKILL, the
    /// log kept as `broker.log.1`. Nothing listens on the port until
    /// [`Site::restart_broker`].
    pub async fn kill_broker(&mut self) {
        self.broker.kill().await;
        let dir = &self.broker.dir;
        let _ = std::fs::rename(dir.join("broker.log"), dir.join("broker.log.1"));
    }

    /// The second half: the broker again, on the same ports, configuration
    /// and data.
    ///
    /// # Panics
    /// When it does not come back.
    pub async fn restart_broker(&mut self) {
        let dir = self.broker.dir.clone();
        self.broker = BrokerProc::start(&workspace_bin("mqseal-broker"), &dir, self.broker.config.clone())
            .await
            .unwrap_or_else(|e| panic!("broker did not come back: {e:?}"));
    }

    /// Publishes `payload` to `topic` as the admin, with mosquitto_pub
    /// (a third-party client: what an attacker replaying traffic would use).
    ///
    /// # Panics
    /// When mosquitto_pub fails.
    pub async fn publish_raw(&self, topic: &str, payload: &[u8]) {
        let file = self.dir.join(format!("raw-{}.bin", crate::free_port()));
        std::fs::write(&file, payload).unwrap_or_else(|e| panic!("{e}"));
        let port = self.broker.port().to_string();
        let file_s = file.display().to_string();
        let args = [
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            "admin",
            "-P",
            &self.admin_password,
            "-q",
            "1",
            "-t",
            topic,
            "-f",
            &file_s,
        ];
        crate::run(&crate::require_program("mosquitto_pub").display().to_string(), &args, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts capturing the next message on `topic` (as the admin, with
    /// mosquitto_sub); [`Capture::bytes`] returns it.
    ///
    /// # Panics
    /// When mosquitto_sub cannot start.
    pub async fn capture(&self, topic: &str) -> Capture {
        let out = self.dir.join(format!("capture-{}.bin", crate::free_port()));
        let file = std::fs::File::create(&out).unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(crate::require_program("mosquitto_sub"))
            .args(["-h", "127.0.0.1", "-p", &self.broker.port().to_string(), "-u", "admin", "-P"])
            .arg(&self.admin_password)
            .args(["-t", topic, "-C", "1", "-N", "-W", "30", "-q", "1"])
            .stdout(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("mosquitto_sub: {e}"));
        // SUBACK before the caller publishes: give the subscription a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Capture { child, out }
    }

    /// Sends `args` with the real CLI while capturing the command envelope
    /// it published to `device`'s `cmd` topic, as an attacker on the
    /// broker sees it.
    ///
    /// # Panics
    /// When the send fails or nothing is captured.
    pub async fn send_and_capture(&self, device: &str, args: &[&str]) -> Vec<u8> {
        let capture = self.capture(&crate::topic(device, "cmd")).await;
        let out = self.mqseal(args).await;
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
        capture.bytes().await
    }
}

impl Operator {
    /// Writes `mqseal.toml` in `tmp` for a controller logging in as `user`
    /// (password in `operator.pw`) to the broker `broker_section` names
    /// (`[broker]` with host, port, and whatever else) with
    /// `store_section` (and any sections after it), creates its key
    /// (2048-bit, for speed) and its user.
    ///
    /// # Panics
    /// When any step fails.
    pub async fn set_up(tmp: tempfile::TempDir, user: &str, broker_section: &str, store_section: &str) -> Operator {
        let dir = tmp.path().to_owned();
        std::fs::write(dir.join("operator.pw"), "operator-password-1\n").unwrap_or_else(|e| panic!("pw: {e}"));
        let toml = format!(
            "data_dir = \"ctl\"\nkey = \"controller.key.pem\"\npbkdf2_iterations = 1000\n\n\
             {broker_section}username = \"{user}\"\npassword_file = \"operator.pw\"\n\n{store_section}"
        );
        std::fs::write(dir.join("mqseal.toml"), toml).unwrap_or_else(|e| panic!("mqseal.toml: {e}"));
        let op = Operator { dir, _tmp: tmp };
        op.ok(&["keygen", "--bits", "2048"]).await;
        op.ok(&["user", "add", user, "--password-file", "operator.pw"]).await;
        op
    }

    /// `mqseal ARGS` as a background process (its own task), for tests that
    /// act while a command is in flight.
    #[must_use]
    pub fn spawn_mqseal(&self, args: &[&str]) -> tokio::task::JoinHandle<Output> {
        let (dir, config) = (self.dir.clone(), self.dir.join("mqseal.toml"));
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            mqseal_in(&dir, &config, &args).await
        })
    }

    /// Runs `mqseal --config mqseal.toml ARGS` (in the site folder) within
    /// a minute.
    ///
    /// # Panics
    /// When it cannot run or hangs.
    pub async fn mqseal(&self, args: &[&str]) -> Output {
        self.mqseal_with(&self.dir.join("mqseal.toml"), args).await
    }

    /// Like [`Operator::mqseal`] with another config file.
    ///
    /// # Panics
    /// When it cannot run or hangs.
    pub async fn mqseal_with(&self, config: &Path, args: &[&str]) -> Output {
        mqseal_in(&self.dir, config, args).await
    }

    /// Runs `mqseal ARGS` and requires exit 0; returns stdout.
    ///
    /// # Panics
    /// When it fails.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.mqseal(args).await;
        assert_eq!(out.code, 0, "mqseal {args:?} failed: {out:?}");
        out.stdout
    }

    /// `mqseal device add ID --bits 2048`; returns the bundle path.
    ///
    /// # Panics
    /// When it fails.
    pub async fn add_device(&self, id: &str, extra: &[&str]) -> PathBuf {
        let mut args = vec!["device", "add", id, "--bits", "2048"];
        args.extend_from_slice(extra);
        self.ok(&args).await;
        self.bundle(id)
    }

    /// Where `device add` wrote `id`'s bundle.
    #[must_use]
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir.join("ctl/agents").join(format!("{id}.toml"))
    }

    /// The keys the controller holds for device `id` (its public key and
    /// HMAC key), from the CLI's registry: what a test playing the
    /// controller signs and tags with.
    ///
    /// # Panics
    /// When the registry or the device is missing.
    #[must_use]
    pub fn device_keys(&self, id: &str) -> mqseal_controller::registry::DeviceKeys {
        let registry = mqseal_controller::registry::Registry::open(&self.dir.join("ctl"))
            .unwrap_or_else(|e| panic!("registry: {e}"));
        registry.keys(id).unwrap_or_else(|e| panic!("{id}: {e}"))
    }

    /// The controller's private key (`controller.key.pem`, made by `keygen`).
    ///
    /// # Panics
    /// When it is missing or does not parse.
    #[must_use]
    pub fn controller_key(&self) -> mqseal_proto::sealed::PrivateKey {
        let pem = std::fs::read_to_string(self.dir.join("controller.key.pem")).unwrap_or_else(|e| panic!("{e}"));
        mqseal_proto::sealed::PrivateKey::from_pkcs8_pem(&pem).unwrap_or_else(|e| panic!("controller.key.pem: {e}"))
    }

    /// Appends TOML to a device's bundle (extra `[commands.*]` tables).
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn append_to_bundle(&self, id: &str, text: &str) {
        let path = self.bundle(id);
        let mut s = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        s.push('\n');
        s.push_str(text);
        std::fs::write(&path, s).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// Adds a `mark` command to `id`'s allow-list that appends a line to
    /// `marks-ID` each time it runs: the tests' execution counter.
    pub fn add_mark_command(&self, id: &str) {
        let marks = self.dir.join(format!("marks-{id}"));
        self.append_to_bundle(
            id,
            &format!("[commands.mark]\nprogram = [\"/bin/sh\", \"-c\", \"echo x >> '{}'\"]\n", marks.display()),
        );
    }

    /// Adds a command `name` to `id`'s allow-list that appends a line to
    /// `start` when it begins, sleeps `secs`, then appends to `done`: a
    /// command that is observably in flight, for crash tests.
    pub fn add_slow_command(&self, id: &str, name: &str, secs: f32, start: &Path, done: &Path) {
        self.append_to_bundle(
            id,
            &format!(
                "[commands.{name}]\nprogram = [\"/bin/sh\", \"-c\", \"echo x >> '{}'; sleep {secs}; echo x >> '{}'\"]\n",
                start.display(),
                done.display()
            ),
        );
    }

    /// How many times `mark` ran on `id`.
    #[must_use]
    pub fn marks(&self, id: &str) -> usize {
        std::fs::read_to_string(self.dir.join(format!("marks-{id}"))).map(|s| s.lines().count()).unwrap_or(0)
    }

    /// Starts `id`'s agent and waits until it is connected.
    ///
    /// # Panics
    /// When it exits or does not connect in time.
    pub async fn agent(&self, id: &str) -> AgentProc {
        self.agent_with(id, &[]).await
    }

    /// Starts the agent of `id` with extra arguments (`--reset-state`).
    pub async fn agent_with(&self, id: &str, args: &[&str]) -> AgentProc {
        start_agent_with(&self.bundle(id), &self.dir.join(format!("agent-{id}.log")), args).await
    }
}

/// Runs `mqseal --config CONFIG ARGS` in `dir` within a minute: the CLI
/// exactly as a script runs it, against whatever broker the config names.
///
/// # Panics
/// When it cannot run or hangs.
pub async fn mqseal_in(dir: &Path, config: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(workspace_bin("mqseal"));
    cmd.arg("--config").arg(config).args(args).current_dir(dir);
    crate::exec(&mut cmd, Duration::from_secs(60)).await
}

/// Starts `mqseal-agent --config BUNDLE`, logging to `log`, and waits until
/// it is connected to whatever broker the bundle names.
///
/// # Panics
/// When it exits or does not connect in time.
pub async fn start_agent(bundle: &Path, log: &Path) -> AgentProc {
    start_agent_with(bundle, log, &[]).await
}

/// [`start_agent`] with extra arguments.
///
/// # Panics
/// When it exits or does not connect in time.
pub async fn start_agent_with(bundle: &Path, log: &Path, args: &[&str]) -> AgentProc {
    // Counted before the start: a fast agent logs "connected" before
    // this function could look.
    let before =
        std::fs::read_to_string(log).map(|t| t.lines().filter(|l| l.contains("connected")).count()).unwrap_or(0);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let child = Command::new(workspace_bin("mqseal-agent"))
        .arg("--config")
        .arg(bundle)
        .args(args)
        .env("MQSEAL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("mqseal-agent: {e}"));
    let agent = AgentProc { child, log: log.to_owned() };
    assert!(
        agent.wait_for("connected", before + 1, STARTUP_TIMEOUT).await,
        "agent {} did not connect:\n{}",
        bundle.display(),
        agent.text()
    );
    agent
}

/// A mosquitto_sub waiting for one message.
pub struct Capture {
    child: Child,
    out: PathBuf,
}

impl Capture {
    /// The captured payload (waits up to 30 s for it).
    ///
    /// # Panics
    /// When nothing arrives.
    pub async fn bytes(mut self) -> Vec<u8> {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        assert!(matches!(status, Ok(Ok(s)) if s.success()), "mosquitto_sub captured nothing: {status:?}");
        std::fs::read(&self.out).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A running `mqseal-agent`.
pub struct AgentProc {
    child: Child,
    log: PathBuf,
}

impl AgentProc {
    /// Its log so far.
    #[must_use]
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many log lines contain `needle`.
    #[must_use]
    pub fn count(&self, needle: &str) -> usize {
        self.text().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until at least `n` log lines contain `needle`.
    pub async fn wait_for(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.count(needle) >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Stops it with SIGTERM and waits for it to exit.
    ///
    /// # Panics
    /// When it does not exit within 10 s.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("agent did not stop on SIGTERM"))
            .unwrap_or_else(|e| panic!("wait: {e}"))
    }

    /// Kills it with SIGKILL (a crash or a power cut: no goodbye, so the
    /// broker publishes its last will) and waits for it to exit.
    ///
    /// # Panics
    /// When it does not exit within 10 s.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("agent did not die on SIGKILL"))
            .unwrap_or_else(|e| panic!("wait: {e}"));
    }

    /// Freezes it (SIGSTOP): what it is sent queues up at the broker, in
    /// order, and it handles all of it on [`resume`](Self::resume). How a
    /// test puts messages in front of the device's own answer.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets it run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap_or_else(|| panic!("agent already exited"));
        let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
