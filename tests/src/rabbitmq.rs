//! A real RabbitMQ cluster on loopback for the scale-out tests: Debian's
//! `rabbitmq-server` (3.10, with its MQTT plugin), two nodes with their
//! own names, ports, data folders and Erlang cookie, joined with
//! `rabbitmqctl join_cluster` — what an operator does, on one machine.
//!
//! Starting a node takes seconds, so one cluster serves every test of a
//! test binary ([`shared`]). Each node runs in its own process group; a
//! small watchdog kills the group when the test process is gone, so no
//! node outlives the test run (a `static` is never dropped).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::free_port;

/// Where Debian puts the server's own scripts (the `/usr/sbin` wrappers
/// switch to the `rabbitmq` user and its home, which holds another cookie).
const SBIN: &str = "/usr/lib/rabbitmq/bin";

/// How long a node may take to start or stop.
const NODE_TIMEOUT: Duration = Duration::from_secs(120);

/// One node of the cluster.
pub struct Node {
    /// Its Erlang node name (`mqseal-PID-N@localhost`).
    pub name: String,
    /// Its MQTT listener on 127.0.0.1.
    pub mqtt_port: u16,
    amqp_port: u16,
    dist_port: u16,
    dir: PathBuf,
    /// The running node (the leader of its process group), if it runs.
    process: Mutex<Option<Child>>,
}

/// The cluster: its nodes, and what they share (the cookie, epmd's port).
pub struct Cluster {
    /// Node 0 is the one the others joined.
    pub nodes: Vec<Node>,
    home: PathBuf,
    epmd_port: u16,
    epmd: Mutex<Option<Child>>,
    _tmp: tempfile::TempDir,
}

/// The cluster of this test binary, started (two nodes, joined) on first
/// use.
///
/// # Panics
/// When RabbitMQ is not installed (the README's test command installs it)
/// or the cluster cannot be formed; the message says which step failed.
pub fn shared() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| Cluster::start(2))
}

impl Cluster {
    /// Starts `n` nodes and joins nodes 1.. to node 0.
    ///
    /// # Panics
    /// As [`shared`].
    pub fn start(n: usize) -> Cluster {
        let server = Path::new(SBIN).join("rabbitmq-server");
        if !server.exists() {
            crate::missing(&format!("RabbitMQ ({}) is not installed.", server.display()));
        }
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let home = tmp.path().join("home");
        std::fs::create_dir_all(&home).unwrap_or_else(|e| panic!("{e}"));
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("MQSEALTEST{}", std::process::id())).unwrap_or_else(|e| panic!("{e}"));
        set_mode(&cookie, 0o400);
        let nodes = (0..n)
            .map(|i| {
                let dir = tmp.path().join(format!("node{i}"));
                std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
                Node {
                    name: format!("mqseal-{}-{i}@localhost", std::process::id()),
                    mqtt_port: free_port(),
                    amqp_port: free_port(),
                    dist_port: free_port(),
                    dir,
                    process: Mutex::new(None),
                }
            })
            .collect();
        let cluster = Cluster { nodes, home, epmd_port: free_port(), epmd: Mutex::new(None), _tmp: tmp };
        cluster.spawn_epmd();
        for i in 0..n {
            cluster.write_config(i);
            cluster.spawn_node(i);
        }
        for i in 0..n {
            cluster.await_node(i);
        }
        let first = cluster.nodes.first().map(|n| n.name.clone()).unwrap_or_default();
        for i in 1..n {
            cluster.ctl(i, &["stop_app"]);
            cluster.ctl(i, &["join_cluster", &first]);
            cluster.ctl(i, &["start_app"]);
        }
        // Only mqseal's users: the packaged `guest` goes.
        cluster.ctl(0, &["delete_user", "guest"]);
        // MQTT sessions (one queue each) are mirrored to every node, so a
        // device whose node stops finds its session on the other one —
        // RabbitMQ 3.10's way; its MQTT plugin has no quorum queues.
        let mirrored = r#"{"ha-mode":"all","ha-sync-mode":"automatic"}"#;
        cluster.ctl(0, &["set_policy", "--apply-to", "queues", "mqtt-sessions", "^mqtt-subscription-", mirrored]);
        cluster
    }

    /// The MQTT port of node `i`.
    ///
    /// # Panics
    /// When there is no such node.
    #[must_use]
    pub fn mqtt_port(&self, i: usize) -> u16 {
        self.node(i).mqtt_port
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes.get(i).unwrap_or_else(|| panic!("no node {i}"))
    }

    /// Runs `rabbitmqctl ARGS` against node `i` and returns its output.
    ///
    /// # Panics
    /// When it fails (with its output).
    pub fn ctl(&self, i: usize, args: &[&str]) -> String {
        let out = self
            .env(Command::new(Path::new(SBIN).join("rabbitmqctl")), i)
            .args(["-n", &self.node(i).name, "--timeout", "60"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("rabbitmqctl: {e}"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "rabbitmqctl {args:?} on {}: {text}", self.node(i).name);
        text
    }

    /// Stops node `i` the hard way (SIGKILL to its whole process group): a
    /// machine that goes away.
    pub fn kill_node(&self, i: usize) {
        let process = self.node(i).process.lock().ok().and_then(|mut p| p.take());
        if let Some(mut p) = process {
            let _ = Command::new("/bin/kill").args(["-9", "--", &format!("-{}", p.id())]).status();
            let _ = p.wait();
            let deadline = Instant::now() + NODE_TIMEOUT;
            while std::net::TcpStream::connect(("127.0.0.1", self.node(i).mqtt_port)).is_ok() {
                assert!(Instant::now() < deadline, "node {i} still listens after SIGKILL");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Imports a definitions file (`rabbitmqctl import_definitions`): users,
    /// permissions and topic permissions, cluster-wide.
    pub fn import_definitions(&self, file: &Path) {
        self.ctl(0, &["import_definitions", &file.display().to_string()]);
    }

    fn env(&self, mut cmd: Command, i: usize) -> Command {
        let n = self.node(i);
        cmd.env("HOME", &self.home)
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODENAME", &n.name)
            .env("RABBITMQ_NODE_PORT", n.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", n.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", n.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", n.dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", n.dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", n.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", n.dir.join("log"))
            .env("RABBITMQ_PID_FILE", n.dir.join("pid"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", n.dir.join("plugins-expand"))
            .env("RABBITMQ_CONF_ENV_FILE", n.dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-kernel inet_dist_use_interface {127,0,0,1}");
        cmd
    }

    fn write_config(&self, i: usize) {
        let n = self.node(i);
        let conf = format!(
            "listeners.tcp.default = 127.0.0.1:{amqp}\n\
             mqtt.listeners.tcp.default = 127.0.0.1:{mqtt}\n\
             mqtt.allow_anonymous = false\n\
             mqtt.vhost = /\n\
             mqtt.exchange = amq.topic\n\
             loopback_users = none\n\
             log.file.level = info\n",
            amqp = n.amqp_port,
            mqtt = n.mqtt_port
        );
        for (name, text) in [
            ("rabbitmq.conf", conf.as_str()),
            ("enabled_plugins", "[rabbitmq_mqtt].\n"),
            ("advanced.config", "[].\n"),
            ("rabbitmq-env.conf", ""),
        ] {
            std::fs::write(n.dir.join(name), text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// epmd in the foreground under the watchdog, on this cluster's own
    /// port: the nodes would otherwise start a daemon that outlives them.
    fn spawn_epmd(&self) {
        let mut cmd = Command::new("epmd");
        cmd.args(["-port", &self.epmd_port.to_string(), "-address", "127.0.0.1"]);
        // Its group dies with the test process, through the watchdog.
        let epmd = spawn_watched(cmd, &self.home.join("epmd.log"));
        *self.epmd.lock().unwrap_or_else(PoisonError::into_inner) = Some(epmd);
        let deadline = Instant::now() + NODE_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", self.epmd_port)).is_err() {
            assert!(Instant::now() < deadline, "epmd did not listen on {}", self.epmd_port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn_node(&self, i: usize) {
        let n = self.node(i);
        let cmd = self.env(Command::new(Path::new(SBIN).join("rabbitmq-server")), i);
        let process = spawn_watched(cmd, &n.dir.join("server.out"));
        *n.process.lock().unwrap_or_else(PoisonError::into_inner) = Some(process);
    }

    fn await_node(&self, i: usize) {
        let n = self.node(i);
        let deadline = Instant::now() + NODE_TIMEOUT;
        loop {
            let ok = self
                .env(Command::new(Path::new(SBIN).join("rabbitmqctl")), i)
                .args(["-n", &n.name, "await_startup", "--timeout", "10"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok && std::net::TcpStream::connect(("127.0.0.1", n.mqtt_port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "RabbitMQ node {} did not start:\n{}",
                n.name,
                std::fs::read_to_string(n.dir.join("server.out")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Spawns `cmd` in a process group of its own, output to `log`, with a
/// watchdog that kills the group once this test process has exited.
/// Returns the group's leader.
fn spawn_watched(mut cmd: Command, log: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let err = out.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("{:?}: {e}", cmd.get_program()));
    let group = child.id();
    let watchdog = format!(
        "while kill -0 {parent} 2>/dev/null && /bin/kill -0 -- -{group} 2>/dev/null; do sleep 1; done; /bin/kill -9 -- -{group} 2>/dev/null",
        parent = std::process::id()
    );
    #[expect(clippy::zombie_processes, reason = "the watchdog outlives this process on purpose")]
    Command::new("sh")
        .args(["-c", &watchdog])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("watchdog: {e}"));
    child
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap_or_else(|e| panic!("{e}"));
}

/// An operator whose `mqseal.toml` points at node 1 and whose agent
/// bundles point at node 0 (each with the other node as its failover, if
/// asked), with devices `prefix-0..n` (each with a `mark` command) loaded
/// into the cluster by `mqseal export rabbitmq` — the way an operator sets
/// up a cluster deployment.
pub struct ClusterSite {
    /// The operator's side.
    pub op: crate::site::Operator,
    /// The cluster.
    pub cluster: &'static Cluster,
    /// The devices, in order.
    pub devices: Vec<String>,
}

impl ClusterSite {
    /// Sets it up on [`shared`].
    ///
    /// # Panics
    /// When any step fails.
    pub async fn start(prefix: &str, n: usize, failover: bool) -> ClusterSite {
        let cluster = shared();
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let (agents_to, controller_to) = (cluster.mqtt_port(0), cluster.mqtt_port(1));
        let (agents_also, controller_also) = if failover {
            (
                format!("failover = [\"127.0.0.1:{controller_to}\"]\n"),
                format!("failover = [\"127.0.0.1:{agents_to}\"]\n"),
            )
        } else {
            (String::new(), String::new())
        };
        let store = format!(
            "[store]\nkind = \"file\"\npath = \"{}\"\n\n[agent_broker]\nhost = \"127.0.0.1\"\nport = {agents_to}\n{agents_also}",
            tmp.path().join("data/users.json").display(),
        );
        let broker = format!("[broker]\nhost = \"127.0.0.1\"\nport = {controller_to}\n{controller_also}");
        let op = crate::site::Operator::set_up(tmp, &format!("{prefix}-operator"), &broker, &store).await;
        let devices: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
        for d in &devices {
            op.ok(&["device", "add", d, "--bits", "2048"]).await;
            op.add_mark_command(d);
        }
        let site = ClusterSite { op, cluster, devices };
        site.export();
        site
    }

    /// `mqseal export rabbitmq` (0600), imported into the cluster.
    ///
    /// # Panics
    /// When the export fails or is not 0600.
    pub fn export(&self) {
        let out = Command::new(crate::site::workspace_bin("mqseal"))
            .arg("--config")
            .arg(self.op.dir.join("mqseal.toml"))
            .args(["export", "rabbitmq", "--out", "rabbitmq.json"])
            .current_dir(&self.op.dir)
            .output()
            .unwrap_or_else(|e| panic!("mqseal export: {e}"));
        assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
        let file = self.op.dir.join("rabbitmq.json");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
        assert_eq!(mode, 0o600, "the definitions hold password hashes");
        self.cluster.import_definitions(&file);
    }

    /// Starts every device's agent (each waits until connected).
    pub async fn agents(&self) -> Vec<crate::site::AgentProc> {
        let mut out = Vec::new();
        for d in &self.devices {
            out.push(self.op.agent(d).await);
        }
        out
    }

    /// A device's broker password, from its bundle.
    ///
    /// # Panics
    /// When the bundle has none.
    #[must_use]
    pub fn password(&self, device: &str) -> String {
        let text = std::fs::read_to_string(self.op.bundle(device)).unwrap_or_else(|e| panic!("{e}"));
        let line = text.lines().find(|l| l.starts_with("password = ")).unwrap_or_else(|| panic!("no password"));
        line.trim_start_matches("password = ").trim_matches('"').to_owned()
    }

    /// A raw MQTT 3.1.1 connection to node `node` as `user` under `client_id`.
    ///
    /// # Errors
    /// As [`crate::mqtt::Conn::connect`].
    pub async fn connect(
        &self,
        node: usize,
        client_id: &str,
        user: &str,
        password: &str,
    ) -> Result<(crate::mqtt::Conn, u8), crate::mqtt::RecvError> {
        let c = crate::mqtt::Connect::new(crate::mqtt::Version::V4, client_id, user, password);
        crate::mqtt::Conn::connect(self.cluster.mqtt_port(node), &c).await
    }
}
