//! What the broker's end-to-end tests share: starting the real binary,
//! putting users into its real store, and running the real third-party
//! clients against it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use mqseal_store::{CredentialStore, FileStore, Role, UserRecord};
use mqseal_tests::broker::{BrokerConfig, BrokerProc};
use mqseal_tests::mqtt::{Conn, Connect, Version};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mqseal-broker");

/// Long enough for anything on a loaded 2-core CI machine.
pub const T: Duration = Duration::from_secs(10);

/// A broker in its own temporary directory.
pub struct Site {
    pub broker: BrokerProc,
    pub dir: tempfile::TempDir,
}

impl Site {
    /// Starts the broker; panics with its log when it does not come up.
    pub async fn start(config: BrokerConfig) -> Site {
        let dir = tempfile::tempdir().unwrap();
        Site::start_in(dir, config).await
    }

    /// Starts the broker in an existing directory (to restart on the same data).
    pub async fn start_in(dir: tempfile::TempDir, config: BrokerConfig) -> Site {
        match BrokerProc::start(Path::new(BIN), dir.path(), config).await {
            Ok(broker) => Site { broker, dir },
            Err(f) => panic!("broker did not start: {:?}\nstdout:\n{}\nlog:\n{}", f.status, f.stdout, f.stderr),
        }
    }

    pub fn port(&self) -> u16 {
        self.broker.port()
    }

    /// The broker's file store, opened the way the CLI will open it.
    pub fn users(&self) -> FileStore {
        FileStore::open(self.broker.users_file()).unwrap()
    }

    /// Registers a device with a fresh 256-bit secret; returns the secret.
    pub async fn device(&self, name: &str) -> String {
        add_device(&self.users(), name).await
    }

    /// Registers a person with a password.
    pub async fn human(&self, name: &str, password: &str, role: Role, grants: &[&str]) {
        add_human(&self.users(), name, password, role, grants).await;
    }
}

pub async fn add_device(store: &impl CredentialStore, name: &str) -> String {
    let secret = mqseal_store::hash::new_secret().unwrap();
    store.put(&UserRecord::device(name, secret.as_bytes()).unwrap(), false).await.unwrap();
    secret.to_string()
}

pub async fn add_human(store: &impl CredentialStore, name: &str, password: &str, role: Role, grants: &[&str]) {
    let mut r = UserRecord::human(name, password.as_bytes(), role, 1000).unwrap();
    r.grants = grants.iter().map(|g| (*g).to_owned()).collect();
    store.put(&r, false).await.unwrap();
}

/// A CONNECT for `user`, using the username as client id.
pub fn login(version: Version, user: &str, password: &str) -> Connect {
    Connect::new(version, user, user, password)
}

/// CONNACK code for a login attempt (`None`: closed without CONNACK).
pub async fn connack(port: u16, c: &Connect) -> Option<u8> {
    Conn::connect(port, c).await.ok().map(|(_, code)| code)
}

/// The exit code and stderr of a third-party client run.
pub async fn tool(program: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(program).args(args).kill_on_drop(true).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?} hung"))
    .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `mosquitto_pub` one QoS 1 message; returns its exit code and stderr.
pub async fn mosquitto_pub(port: u16, version: &str, user: &str, password: &str, topic: &str) -> (i32, String) {
    let port = port.to_string();
    let (code, _, err) = tool(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            version,
            "-i",
            user,
            "-u",
            user,
            "-P",
            password,
            "-t",
            topic,
            "-m",
            "x",
            "-q",
            "1",
        ],
    )
    .await;
    (code, err)
}

/// Polls `check` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[allow(unused_imports)] // not every test binary scrapes metrics
pub use mqseal_tests::metric;

/// A round trip through the broker: `sub` (already subscribed to `topic`)
/// receives what `publisher` sends there.
pub async fn round_trip(publisher: &mut Conn, sub: &mut Conn, topic: &str, payload: &[u8]) {
    publisher.publish(topic, payload, 1, false).await.unwrap();
    let m = sub.next_message(T).await.unwrap_or_else(|e| panic!("nothing on {topic}: {e:?}"));
    assert_eq!((m.topic.as_str(), m.payload.as_slice()), (topic, payload));
}

/// The five topics of a device.
pub fn topic(device: &str, channel: &str) -> String {
    format!("mqseal/v1/dev/{device}/{channel}")
}

/// The next PUBLISH, unacknowledged, as raw (qos, payload, properties,
/// pkid, dup).
pub async fn next_publish(
    conn: &mut Conn,
    timeout: Duration,
) -> Result<(u8, Vec<u8>, Vec<u8>, u16, bool), mqseal_tests::mqtt::RecvError> {
    loop {
        let p = conn.recv(timeout).await?;
        if p.kind() != 3 {
            continue;
        }
        let qos = (p.header >> 1) & 3;
        let tlen = usize::from(u16::from_be_bytes([p.body[0], p.body[1]]));
        let mut at = 2 + tlen;
        let mut pkid = 0;
        if qos > 0 {
            pkid = u16::from_be_bytes([p.body[at], p.body[at + 1]]);
            at += 2;
        }
        let mut props = Vec::new();
        if conn.version == Version::V5 {
            let (len, used) = mqseal_tests::mqtt::read_varint(&p.body[at..]).unwrap();
            props = p.body[at + used..at + used + len].to_vec();
            at += used + len;
        }
        return Ok((qos, p.body[at..].to_vec(), props, pkid, p.header & 0x08 != 0));
    }
}

/// [`next_publish`] without the DUP flag: (qos, payload, properties, pkid).
pub async fn raw_publish(
    conn: &mut Conn,
    timeout: Duration,
) -> Result<(u8, Vec<u8>, Vec<u8>, u16), mqseal_tests::mqtt::RecvError> {
    next_publish(conn, timeout).await.map(|(q, payload, props, pkid, _)| (q, payload, props, pkid))
}
