//! The end-to-end test harness: real servers on 127.0.0.1, started and
//! stopped by the tests or by the test command (`scripts/test.sh`).
//!
//! Nothing here mocks anything. A test that needs MongoDB reads the URI of
//! the SecantusDB instance the test command started; one that needs
//! Mosquitto starts its own broker on a free port. When a component is
//! missing the test *fails* and says how to get it — it never skips, because
//! a suite that quietly skips its integration tests proves nothing.
// Test-support code: failing loudly (a panic inside the calling test) is
// exactly what it is for.
#![allow(clippy::panic)]

pub mod broker;
pub mod mqtt;
pub mod rabbitmq;
pub mod site;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Environment variable holding the MongoDB URI (set by `scripts/test.sh`).
pub const MONGODB_ENV: &str = "MQSEAL_TEST_MONGODB_URI";
/// Environment variable holding the Python interpreter of the test venv.
pub const PYTHON_ENV: &str = "MQSEAL_TEST_PYTHON";

/// Every wait in the harness is bounded by this.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

pub(crate) fn missing(what: &str) -> ! {
    panic!(
        "{what}\nThe end-to-end tests need real components. Run them through the README's \
         test command (`./scripts/test.sh`), which installs and starts everything they need."
    )
}

/// The URI of the MongoDB-protocol server (SecantusDB) for this test run.
#[must_use]
pub fn mongodb_uri() -> String {
    std::env::var(MONGODB_ENV)
        .unwrap_or_else(|_| missing(&format!("{MONGODB_ENV} is not set: no MongoDB server for this test.")))
}

/// The Python interpreter that has `paho-mqtt` (and SecantusDB) installed.
#[must_use]
pub fn python() -> PathBuf {
    let p = PathBuf::from(
        std::env::var(PYTHON_ENV)
            .unwrap_or_else(|_| missing(&format!("{PYTHON_ENV} is not set: no Python venv for this test."))),
    );
    if !p.exists() {
        missing(&format!("{PYTHON_ENV}={} does not exist.", p.display()));
    }
    p
}

/// The full path of `program`, which must be installed.
#[must_use]
pub fn require_program(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| missing(&format!("`{program}` is not installed.")))
}

/// The MQTT topic of `device`'s `channel` (`cmd`, `resp`, `chal`, `chal/req`,
/// `status`), spelled out as a third-party client would.
#[must_use]
pub fn topic(device: &str, channel: &str) -> String {
    format!("{}{device}/{channel}", mqseal_proto::topic::ROOT)
}

/// A TCP port that was free a moment ago on 127.0.0.1, and that no other
/// test in this process has been given.
///
/// The port is released before the caller binds it, so two tests running in
/// parallel could otherwise be handed the same one: the second server then
/// fails to bind while `wait_for_port` happily finds the first, and the test
/// talks to someone else's broker until that one goes away.
///
/// # Panics
/// If the OS has no free port.
#[must_use]
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("no free port: {e}"));
        let port = l.local_addr().unwrap_or_else(|e| panic!("no local address: {e}")).port();
        let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// Waits until something accepts connections on `127.0.0.1:port`.
///
/// A connection whose local address is its peer's does not count: the ports
/// `free_port` hands out lie in the ephemeral range, and a connect to one
/// nobody listens on yet can be given that very port as its source and
/// "connect" to itself (TCP simultaneous open). CI saw exactly that: the wait
/// returned before Mosquitto listened and `mosquitto_pub` was refused.
///
/// # Errors
/// When nothing does within `timeout`.
pub async fn wait_for_port(port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await
            && !is_self_connected(&stream)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("nothing listening on 127.0.0.1:{port} after {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until an MQTT broker on `127.0.0.1:port` answers a CONNECT with a
/// CONNACK (whatever its return code), while `child` — the broker — still
/// runs. An open port alone was not enough on CI: `mosquitto_pub` was
/// refused right after the port had accepted a connection.
///
/// # Errors
/// When the broker exits, or no CONNACK comes within `timeout`.
pub async fn wait_for_mqtt(port: u16, child: &mut Child, timeout: Duration) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // MQTT 3.1.1 CONNECT: clean session, keep-alive 60 s, client id "probe".
    const CONNECT: [u8; 19] = [0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 5, b'p', b'r', b'o', b'b', b'e'];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the broker exited ({status}) before it answered MQTT on port {port}"));
        }
        let probe = async {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
            if is_self_connected(&s) {
                return None;
            }
            s.write_all(&CONNECT).await.ok()?;
            let mut ack = [0u8; 4];
            s.read_exact(&mut ack).await.ok()?;
            (ack[0] == 0x20).then_some(())
        };
        if tokio::time::timeout(Duration::from_secs(1), probe).await.ok().flatten().is_some() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("no CONNACK on 127.0.0.1:{port} after {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `stream` is connected to itself rather than to a listener.
fn is_self_connected(stream: &TcpStream) -> bool {
    matches!((stream.local_addr(), stream.peer_addr()), (Ok(local), Ok(peer)) if local == peer)
}

/// A Mosquitto broker of our own on a free loopback port, stopped on drop.
pub struct Mosquitto {
    child: Child,
    port: u16,
    /// Holds the config (and any password/ACL files) until the broker stops.
    pub dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts `mosquitto` with `extra` appended to a minimal config
    /// (one loopback listener, no persistence).
    ///
    /// # Panics
    /// If mosquitto is not installed or does not come up in time; the
    /// message includes what it printed.
    pub async fn start(extra: &str) -> Mosquitto {
        let binary = require_program("mosquitto");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let text = format!("listener {port} 127.0.0.1\npersistence false\nlog_dest stderr\n{extra}\n");
        std::fs::write(&conf, text).unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
        let mut child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start mosquitto: {e}"));
        if let Err(e) = wait_for_mqtt(port, &mut child, STARTUP_TIMEOUT).await {
            let _ = child.start_kill();
            let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output()).await;
            let stderr = match out {
                Ok(Ok(o)) => String::from_utf8_lossy(&o.stderr).into_owned(),
                _ => String::from("(no output)"),
            };
            panic!("mosquitto did not start: {e}\n{stderr}");
        }
        Mosquitto { child, port, dir }
    }

    /// The port it listens on.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the broker process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGHUP: Mosquitto then re-reads its password and ACL files.
    ///
    /// # Panics
    /// When the broker has exited.
    pub async fn reload(&self) {
        let pid = self.child.id().unwrap_or_else(|| panic!("mosquitto has exited"));
        if let Err(e) = run("kill", &["-HUP", &pid.to_string()], Duration::from_secs(5)).await {
            panic!("{e}");
        }
        // It logs the reload; there is nothing to wait on but a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Runs a program to completion within `timeout`, returning its stdout.
///
/// # Errors
/// When it cannot start, times out, or exits non-zero (with its stderr).
pub async fn run(program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let fut = Command::new(program).args(args).kill_on_drop(true).output();
    let out = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("{program} {args:?} timed out after {timeout:?}"))?
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{program} {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

/// What a finished process produced.
#[derive(Debug)]
pub struct Output {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `cmd` to completion (stdin closed) within `timeout` and returns what
/// it produced, whatever its exit code: tests assert on the code.
///
/// # Panics
/// When it cannot start or does not finish in time.
pub async fn exec(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{:?}", cmd.as_std());
    let fut = cmd.stdin(Stdio::null()).kill_on_drop(true).output();
    let out = tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {timeout:?}"))
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A small tmpfs mounted on a folder for one test (a state directory that
/// can fill up or turn read-only for real), unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"64k"`) on `path`, which is created.
    ///
    /// # Panics
    /// When it cannot be mounted: this needs root (CI runs as root), and
    /// the test fails rather than pretending.
    #[must_use]
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Tmpfs::mount_cmd(&["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"], path);
        Tmpfs { path: path.to_owned() }
    }

    /// Remounts it read-only (`true`) or read-write.
    ///
    /// # Panics
    /// When `mount` fails.
    pub fn set_read_only(&self, read_only: bool) {
        Tmpfs::mount_cmd(&["-o", if read_only { "remount,ro" } else { "remount,rw" }], &self.path);
    }

    fn mount_cmd(args: &[&str], path: &Path) {
        let out = std::process::Command::new("mount")
            .args(args)
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "mount {args:?} {} failed (this test needs root): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process still holding a file there (a killed agent's
        // orphan) must not keep the mount alive after the test.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// One sample of the broker's Prometheus endpoint on `127.0.0.1:port`.
///
/// # Panics
/// When the endpoint does not answer 200 within 10 s or lacks `name`.
pub async fn metric(port: u16, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let text = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(text)
    })
    .await
    .unwrap_or_else(|_| panic!("metrics on {port}: no answer in 10 s"))
    .unwrap_or_else(|e| panic!("metrics on {port}: {e}"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// A process started by [`spawn_until`], past its readiness line.
pub struct Started {
    child: Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// What it printed up to and including the readiness line.
    pub seen: Vec<String>,
}

/// Starts `cmd` and returns once it printed a line equal to `marker` on
/// stdout — for tools that announce when they are subscribed, so a test
/// never publishes before anyone listens.
///
/// # Panics
/// When it cannot start, or exits or stays silent for `timeout` first.
pub async fn spawn_until(cmd: &mut Command, marker: &str, timeout: Duration) -> Started {
    use tokio::io::AsyncBufReadExt;
    let what = format!("{:?}", cmd.as_std());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let Some(out) = child.stdout.take() else { panic!("no stdout pipe") };
    let mut lines = tokio::io::BufReader::new(out).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(timeout, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let done = line.trim().trim_matches('"') == marker || line.contains(&format!("\"{marker}\""));
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    if found != Ok(true) {
        panic!("{what} did not print {marker:?} within {timeout:?}; it printed: {seen:?}");
    }
    Started { child, lines, seen }
}

impl Started {
    /// Waits for it to exit (within `timeout`) and returns everything it
    /// printed on stdout, the readiness line included.
    ///
    /// # Panics
    /// When it does not exit in time.
    pub async fn finish(mut self, timeout: Duration) -> Output {
        let rest = tokio::time::timeout(timeout, async {
            let mut rest = Vec::new();
            while let Ok(Some(line)) = self.lines.next_line().await {
                rest.push(line);
            }
            (rest, self.child.wait().await)
        })
        .await
        .unwrap_or_else(|_| panic!("process did not exit within {timeout:?}; printed {:?}", self.seen));
        self.seen.extend(rest.0);
        Output {
            code: rest.1.ok().and_then(|s| s.code()).unwrap_or(-1),
            stdout: self.seen.iter().map(|l| format!("{l}\n")).collect(),
            stderr: String::new(),
        }
    }
}

/// `tests/interop/python/`: the second implementation of the protocol and
/// the Python tools the interoperability tests run.
#[must_use]
pub fn interop_python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop").join("python")
}

/// `python SCRIPT` from [`interop_python_dir`], with the test venv's
/// interpreter (paho-mqtt, cryptography, pymongo, prometheus-client), run
/// in that folder.
#[must_use]
pub fn python_script(script: &str) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(script).current_dir(interop_python_dir()).env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// A SecantusDB server of a test's own, for tests that stop and restart
/// MongoDB (the shared one of the test command must stay up for the rest).
/// Its data lives in a directory, so a restart keeps it, as `mongod` would.
pub struct Secantus {
    child: Option<Child>,
    port: u16,
    data: PathBuf,
}

impl Secantus {
    /// Starts one on a free port with its data in `data`.
    ///
    /// # Panics
    /// When the venv's `secantusd-py` is missing or does not listen in time.
    pub async fn start(data: &Path) -> Secantus {
        let mut s = Secantus { child: None, port: free_port(), data: data.to_owned() };
        s.restart().await;
        s
    }

    /// The `mongodb://` URI, with short driver timeouts.
    #[must_use]
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?serverSelectionTimeoutMS=1000&connectTimeoutMS=1000", self.port)
    }

    /// Stops the server (SIGKILL: as abrupt as a crash or a cut cable).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    /// Starts it again on the same port and data.
    ///
    /// # Panics
    /// When it does not come up.
    pub async fn restart(&mut self) {
        let python = python();
        let daemon = python.with_file_name("secantusd-py");
        let child = Command::new(&daemon)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--log-level",
                "WARNING",
                "--sync-on-commit",
                "--storage-path",
            ])
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", daemon.display()));
        self.child = Some(child);
        // WiredTiger recovery after a kill can take a few seconds.
        if let Err(e) = wait_for_port(self.port, Duration::from_secs(30)).await {
            panic!("SecantusDB did not come up: {e}");
        }
    }
}
