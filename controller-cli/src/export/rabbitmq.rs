//! RabbitMQ (3.x, MQTT plugin): a definitions file for `rabbitmqctl
//! import_definitions` with mqseal's users, their passwords in RabbitMQ's
//! own hash, and permissions equal to mqseal-broker's default rules
//! (`broker/src/acl.rs`).
//!
//! RabbitMQ's MQTT plugin publishes to the `amq.topic` exchange with the
//! MQTT topic as routing key, `/` and `.` swapped (`mqseal/v1/dev/a.b/cmd`
//! → `mqseal.v1.dev.a/b.cmd`), and authorises each publish and subscribe
//! with the user's *topic permissions* on that exchange: a regular
//! expression over the routing key, in which `{username}`, `{vhost}` and
//! `{client_id}` are replaced before matching. A denied publish or
//! subscribe closes the connection.
//!
//! * A device may publish `resp`, `chal` and `status` and subscribe to
//!   `cmd` and `chal/req` of its own id, and only under its own client id:
//!   the patterns name the device literally, escaped — never with
//!   `{username}` or `{client_id}`, which RabbitMQ puts into the regex
//!   unescaped (a device id may contain `.`, and a client picks its own
//!   client id: `x\.)|(?=` would open every device's topics).
//! * A controller gets the mirror image for the devices it is granted
//!   (every id, for `*`); an admin everything.
//! * Resource permissions keep each user to its own session queues
//!   (`mqtt-subscription-<client id>qos0|1`): a device to its id, a
//!   controller to `USER-` and 12 hex digits (how `mqseal` names its
//!   connections), so a client under another's client id can subscribe to
//!   nothing and never takes over that session's queue.
//! * A disabled user is written without a password and with no
//!   permission (an import only adds and updates). A user deleted from
//!   mqseal must be deleted from RabbitMQ (`rabbitmqctl delete_user`).
//!
//! RabbitMQ cannot use mqseal's password hashes (PBKDF2 or EMQX's SHA-256
//! with a suffix salt): its own is base64(salt ‖ SHA-256(salt ‖ password))
//! with a 4-byte salt, so the export needs the passwords themselves — a
//! device's is in its agent bundle; other users' are given to the export
//! (`--password USER=FILE`), and a user without one is written without a
//! password (it cannot log in) and named in the warnings.

use std::collections::HashMap;

use base64::Engine;
use mqseal_proto::topic::Channel;
use mqseal_store::{Role, UserRecord};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The RabbitMQ release the file is written for (Debian 12's).
pub const RABBIT_VERSION: &str = "3.10.8";

/// The client ids `mqseal` connects with, after the user name (the CLI's
/// `client_id`: `-` and 6 random bytes in hex).
pub const CONTROLLER_CLIENT_IDS: &str = "-[0-9a-f]{12}";

/// RabbitMQ's name for its salted SHA-256 password hash.
pub const HASHING_ALGORITHM: &str = "rabbit_password_hashing_sha256";

/// A pattern no name or routing key matches.
const NOTHING: &str = "^$";

/// The exchange the MQTT plugin publishes to.
pub const EXCHANGE: &str = "amq.topic";

/// A definitions file: what `rabbitmqctl import_definitions` reads.
#[derive(Debug, Serialize)]
pub struct Definitions {
    /// The release it is written for.
    pub rabbit_version: &'static str,
    /// Users with their password hashes.
    pub users: Vec<User>,
    /// The virtual host, so that importing into a fresh cluster works.
    pub vhosts: Vec<Vhost>,
    /// Resource permissions: the session queues.
    pub permissions: Vec<Permission>,
    /// Topic permissions on `amq.topic`: the MQTT topics.
    pub topic_permissions: Vec<TopicPermission>,
}

/// A user.
#[derive(Debug, Serialize)]
pub struct User {
    /// Login name.
    pub name: String,
    /// base64(salt ‖ SHA-256(salt ‖ password)); empty: no password login.
    pub password_hash: String,
    /// [`HASHING_ALGORITHM`].
    pub hashing_algorithm: &'static str,
    /// Management tags: none (MQTT users need none).
    pub tags: Vec<String>,
}

/// A virtual host.
#[derive(Debug, Serialize)]
pub struct Vhost {
    /// Its name.
    pub name: String,
}

/// Resource permissions of one user in one virtual host.
#[derive(Debug, Serialize)]
pub struct Permission {
    /// The user.
    pub user: String,
    /// The virtual host.
    pub vhost: String,
    /// Resources the user may declare and delete.
    pub configure: String,
    /// Resources the user may publish to (or bind a queue of).
    pub write: String,
    /// Resources the user may consume from (or bind from).
    pub read: String,
}

/// Topic permissions of one user on one exchange.
#[derive(Debug, Serialize)]
pub struct TopicPermission {
    /// The user.
    pub user: String,
    /// The virtual host.
    pub vhost: String,
    /// [`EXCHANGE`].
    pub exchange: &'static str,
    /// Routing keys the user may publish with.
    pub write: String,
    /// Routing keys the user may subscribe to.
    pub read: String,
}

/// The definitions for `users` in `vhost`, with the passwords known in
/// `passwords` (each hashed with a fresh salt from `rng`), and a warning
/// for each user written without a password.
pub fn definitions<R: rand_core::CryptoRng + ?Sized>(
    users: &[UserRecord],
    passwords: &HashMap<String, Zeroizing<String>>,
    vhost: &str,
    rng: &mut R,
) -> (Definitions, Vec<String>) {
    let mut salt = || {
        let mut salt = [0u8; 4];
        rng.fill_bytes(&mut salt);
        salt
    };
    let mut d = Definitions {
        rabbit_version: RABBIT_VERSION,
        users: Vec::new(),
        vhosts: vec![Vhost { name: vhost.to_owned() }],
        permissions: Vec::new(),
        topic_permissions: Vec::new(),
    };
    let mut warnings = Vec::new();
    for u in users {
        // A disabled user is written without a password and with no
        // permission at all: importing only adds and updates, so leaving
        // it out would leave its old access in place.
        let password_hash = match passwords.get(&u.username) {
            _ if u.disabled => {
                warnings.push(format!("{}: disabled: written without a password or any permission", u.username));
                String::new()
            }
            Some(p) => password_hash(p, salt()),
            None => {
                warnings.push(format!(
                    "{}: no password known (give --password {}=FILE, or set it with `rabbitmqctl change_password`): \
                     written without one, it cannot log in",
                    u.username, u.username
                ));
                String::new()
            }
        };
        d.users.push(User {
            name: u.username.clone(),
            password_hash,
            hashing_algorithm: HASHING_ALGORITHM,
            tags: Vec::new(),
        });
        // The session queues a user may use are named after its client
        // ids: a device's is its id; `mqseal` connects as `USER-` and 12
        // hex digits (CONTROLLER_CLIENT_IDS), so that no controller can
        // resume a device's session, or another controller's.
        let client_ids = match u.role {
            Role::Device => Some(regex_escape(&u.username)),
            Role::Controller => Some(format!("{}{CONTROLLER_CLIENT_IDS}", regex_escape(&u.username))),
            Role::Admin => None,
        };
        let queues = client_ids.map_or_else(|| ".*".to_owned(), |c| format!("mqtt-subscription-{c}qos[01]"));
        let (resources, topics) = if u.disabled {
            ([NOTHING; 3].map(str::to_owned), (NOTHING.to_owned(), NOTHING.to_owned()))
        } else {
            let used = format!("^(amq\\.topic|{queues})$");
            ([format!("^{queues}$"), used.clone(), used], topic_patterns(u))
        };
        let [configure, write, read] = resources;
        d.permissions.push(Permission { user: u.username.clone(), vhost: vhost.to_owned(), configure, write, read });
        let (write, read) = topics;
        d.topic_permissions.push(TopicPermission {
            user: u.username.clone(),
            vhost: vhost.to_owned(),
            exchange: EXCHANGE,
            write,
            read,
        });
    }
    (d, warnings)
}

/// mqseal-broker's default rules as RabbitMQ topic permissions (write,
/// read) for `u`.
fn topic_patterns(u: &UserRecord) -> (String, String) {
    // `(cmd|chal\.req)` and `(resp|chal|status)`, as routing-key levels.
    let alternatives = |channels: &[Channel]| {
        let levels: Vec<String> = channels.iter().map(|c| regex_escape(&c.suffix().replace('/', "."))).collect();
        format!("({})", levels.join("|"))
    };
    let (to_device, from_device) = (alternatives(&Channel::TO_DEVICE), alternatives(&Channel::FROM_DEVICE));
    match u.role {
        Role::Device => {
            // The id itself, escaped, never `{username}` or `{client_id}`:
            // RabbitMQ puts those into the regex unescaped, and a client
            // chooses its own client id (`x\.)|(?=` would open every
            // device's topics). The client id is held to the device by the
            // session-queue permissions instead.
            let me = routing_key_level(&u.username);
            let own = r"^mqseal\.v1\.dev\.";
            (format!("{own}{me}\\.{from_device}$"), format!("{own}{me}\\.{to_device}$"))
        }
        Role::Controller => {
            let devices = if u.grants.iter().any(|g| g == "*") {
                // One level, whatever it is (and the `*` a `+` filter becomes).
                r"[^.]+".to_owned()
            } else if u.grants.is_empty() {
                // A controller granted nothing.
                return (NOTHING.to_owned(), NOTHING.to_owned());
            } else {
                let ids: Vec<String> = u.grants.iter().map(|g| routing_key_level(g)).collect();
                format!("({})", ids.join("|"))
            };
            let at = format!(r"^mqseal\.v1\.dev\.{devices}\.");
            (format!("{at}{to_device}$"), format!("{at}{from_device}$"))
        }
        Role::Admin => (".*".to_owned(), ".*".to_owned()),
    }
}

/// A device id as one level of a routing key, escaped for a regex: the
/// MQTT plugin turns `.` in a topic into `/`.
pub fn routing_key_level(id: &str) -> String {
    regex_escape(&id.replace('.', "/"))
}

/// `s` matched literally by an Erlang (PCRE) regex.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if r"\^$.|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt ‖
/// SHA-256(salt ‖ password)).
pub fn password_hash(password: &str, salt: [u8; 4]) -> String {
    let digest = Sha256::new().chain_update(salt).chain_update(password.as_bytes()).finalize();
    let mut bytes = Vec::with_capacity(36);
    bytes.extend_from_slice(&salt);
    bytes.extend_from_slice(&digest);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (The hash itself is checked against `rabbitmqctl hash_password` and
    /// by logging in, in `tests/e2e/cluster.rs`.)
    #[test]
    fn the_patterns_are_the_default_rules() {
        let mut u = UserRecord::device("lamp-1", b"secret").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            topic_patterns(&u),
            (
                r"^mqseal\.v1\.dev\.lamp-1\.(resp|chal|status)$".to_owned(),
                r"^mqseal\.v1\.dev\.lamp-1\.(cmd|chal\.req)$".to_owned()
            )
        );
        u.role = Role::Controller;
        u.grants = vec!["a.b".into(), "c".into()];
        assert_eq!(topic_patterns(&u).0, r"^mqseal\.v1\.dev\.(a/b|c)\.(cmd|chal\.req)$");
    }

    #[test]
    fn device_ids_are_literal_in_the_patterns() {
        assert_eq!(routing_key_level("lamp-1"), "lamp-1");
        assert_eq!(routing_key_level("a.b:c"), "a/b:c");
        assert_eq!(regex_escape("x.y+z"), r"x\.y\+z");
    }
}
