//! EMQX 5: the MongoDB authenticators and authorizer for mqseal's own
//! collection (docs/SCALING.md §3), and the ACL documents the authorizer
//! reads — so that an EMQX cluster logs in mqseal's users and devices from
//! the same MongoDB and keeps each device to its own topics.
//!
//! The configuration is written as JSON, which is valid HOCON (EMQX's
//! format is a superset of it), so a program can check it as easily as
//! EMQX reads it. Its keys are those of EMQX's schemas
//! (`emqx_authn_mongodb_schema.erl`, `emqx_authz_mongodb_schema.erl`):
//!
//! * two password authenticators over one collection, because one
//!   authenticator has one hash algorithm: devices (`sha256`, the salt as
//!   a **suffix**; EMQX's default is prefix) whose user name must equal
//!   their client id, and people (`pbkdf2`, `mac_fun = sha256`, the
//!   controller's `pbkdf2_iterations` — EMQX reads the count from its
//!   configuration, not from the document). Both filters require
//!   `disabled = false`, so `mqseal user disable` and `device remove` take
//!   effect in EMQX too.
//! * one MongoDB authorizer on the ACL collection (`mqtt_acl` by default),
//!   filtered by user name, with `no_match = deny`: a device may subscribe
//!   to its own `cmd` and `chal/req` and publish its own `resp`, `chal` and
//!   `status` (EMQX fills `${username}` in the topics); a controller the
//!   mirror image for the devices it is granted; an admin is a superuser
//!   (`is_superuser`) and needs no document.

use mqseal_proto::topic::{Channel, ROOT};
use mqseal_store::{Role, UserRecord};
use serde_json::{Value, json};

/// What EMQX needs of a `mongodb://` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MongoUri {
    /// `host:port` of each server in the URI.
    pub servers: Vec<String>,
    /// The URI's `replicaSet`, if any.
    pub replica_set: Option<String>,
    /// MongoDB login, if the URI has one.
    pub username: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// `tls=true` (or `ssl=true`) in the URI.
    pub tls: bool,
    /// The URI's `authSource`, if any.
    pub auth_source: Option<String>,
}

/// Where EMQX finds MongoDB and mqseal's collections.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server(s) and login.
    pub mongo: MongoUri,
    /// The database.
    pub database: String,
    /// mqseal's users collection.
    pub users: String,
    /// The ACL collection this export writes.
    pub acl: String,
    /// The PBKDF2 iteration count people's hashes use.
    pub pbkdf2_iterations: u32,
}

/// The field that marks ACL documents as written by this export (its
/// value: which export), so that a new export replaces them and nothing
/// else.
pub const MARKER: &str = "mqseal_export";

/// Reads what EMQX needs from a `mongodb://` URI.
///
/// # Errors
/// A message saying what the URI lacks.
pub fn parse_uri(uri: &str) -> Result<MongoUri, String> {
    let rest = uri.strip_prefix("mongodb://").ok_or_else(|| {
        "EMQX connects with a mongodb:// URI (mongodb+srv is not supported by this export)".to_owned()
    })?;
    let (authority, query) = match rest.split_once('/') {
        Some((a, q)) => (a, q.split_once('?').map(|(_, q)| q).unwrap_or_default()),
        None => match rest.split_once('?') {
            Some((a, q)) => (a, q),
            None => (rest, ""),
        },
    };
    let (credentials, hosts) = match authority.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, authority),
    };
    let servers: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| if h.contains(':') { h.to_owned() } else { format!("{h}:27017") })
        .collect();
    if servers.is_empty() {
        return Err("the MongoDB URI names no server".into());
    }
    let (username, password) = match credentials.map(|c| c.split_once(':').unwrap_or((c, ""))) {
        Some((u, p)) => (Some(percent_decode(u)), Some(percent_decode(p)).filter(|p| !p.is_empty())),
        None => (None, None),
    };
    let option = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.split_once('=').filter(|(k, _)| k.eq_ignore_ascii_case(name)))
            .map(|(_, v)| percent_decode(v))
    };
    let tls = [option("tls"), option("ssl")].iter().flatten().any(|v| v == "true");
    Ok(MongoUri {
        servers,
        replica_set: option("replicaSet"),
        username,
        password,
        tls,
        auth_source: option("authSource"),
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes.get(i), hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (Some(b'%'), Some(b)) => {
                out.push(b);
                i += 3;
            }
            (Some(&b), _) => {
                out.push(b);
                i += 1;
            }
            (None, _) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `authentication` and `authorization` sections for EMQX 5.
pub fn config(t: &Target) -> Value {
    let m = &t.mongo;
    let mut c = serde_json::Map::new();
    c.insert("database".into(), json!(t.database));
    match (&m.replica_set, m.servers.as_slice()) {
        (Some(rs), servers) => {
            c.insert("mongo_type".into(), json!("rs"));
            c.insert("servers".into(), json!(servers.join(",")));
            c.insert("replica_set_name".into(), json!(rs));
        }
        (None, [one]) => {
            c.insert("mongo_type".into(), json!("single"));
            c.insert("server".into(), json!(one));
        }
        (None, servers) => {
            // Several servers without a replica set: mongos routers.
            c.insert("mongo_type".into(), json!("sharded"));
            c.insert("servers".into(), json!(servers.join(",")));
        }
    }
    if let Some(u) = &m.username {
        c.insert("username".into(), json!(u));
    }
    if let Some(p) = &m.password {
        c.insert("password".into(), json!(p));
    }
    if let Some(a) = &m.auth_source {
        c.insert("auth_source".into(), json!(a));
    }
    if m.tls {
        c.insert("ssl".into(), json!({ "enable": true }));
    }
    let connection = Value::Object(c);
    let authenticator = |filter: Value, algorithm: Value| {
        let mut a = json!({
            "mechanism": "password_based",
            "backend": "mongodb",
            "enable": true,
            "collection": t.users,
            "filter": filter,
            "password_hash_field": "password_hash",
            "salt_field": "salt",
            "is_superuser_field": "is_superuser",
            "password_hash_algorithm": algorithm,
        });
        merge(&mut a, &connection);
        a
    };
    let devices = authenticator(
        json!({ "$and": [ { "username": "${username}" }, { "username": "${clientid}" } ],
                "algorithm": "sha256", "disabled": false }),
        json!({ "name": "sha256", "salt_position": "suffix" }),
    );
    let people = authenticator(
        json!({ "username": "${username}", "algorithm": "pbkdf2_sha256", "disabled": false }),
        json!({ "name": "pbkdf2", "mac_fun": "sha256", "iterations": t.pbkdf2_iterations, "dk_length": 32 }),
    );
    let mut source = json!({
        "type": "mongodb",
        "enable": true,
        "collection": t.acl,
        "filter": { "username": "${username}" },
    });
    merge(&mut source, &connection);
    json!({
        "authentication": [devices, people],
        "authorization": { "no_match": "deny", "deny_action": "disconnect", "sources": [source] },
    })
}

fn merge(into: &mut Value, from: &Value) {
    if let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) {
        for (k, v) in from {
            into.insert(k.clone(), v.clone());
        }
    }
}

/// The ACL documents for `users`: mqseal-broker's default rules.
pub fn acl_documents(users: &[UserRecord]) -> Vec<Value> {
    let own = |channels: &[Channel]| -> Vec<String> {
        channels.iter().map(|c| format!("{ROOT}${{username}}/{}", c.suffix())).collect()
    };
    let granted = |grants: &[String], channels: &[Channel]| -> Vec<String> {
        let devices: Vec<&str> =
            if grants.iter().any(|g| g == "*") { vec!["+"] } else { grants.iter().map(String::as_str).collect() };
        devices.iter().flat_map(|d| channels.iter().map(move |c| format!("{ROOT}{d}/{}", c.suffix()))).collect()
    };
    let doc = |user: &str, action: &str, topics: Vec<String>| json!({ "username": user, "permission": "allow", "action": action, "topics": topics });
    let mut docs = Vec::new();
    for u in users.iter().filter(|u| !u.disabled) {
        match u.role {
            Role::Device => {
                docs.push(doc(&u.username, "subscribe", own(&Channel::TO_DEVICE)));
                docs.push(doc(&u.username, "publish", own(&Channel::FROM_DEVICE)));
            }
            Role::Controller if !u.grants.is_empty() => {
                docs.push(doc(&u.username, "publish", granted(&u.grants, &Channel::TO_DEVICE)));
                docs.push(doc(&u.username, "subscribe", granted(&u.grants, &Channel::FROM_DEVICE)));
            }
            // A controller granted nothing gets nothing (no_match = deny);
            // an admin is a superuser.
            Role::Controller | Role::Admin => {}
        }
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_give_servers_replica_sets_and_logins() {
        assert_eq!(
            parse_uri("mongodb://emqx:s%40cret@db1:27017,db2/?replicaSet=rs0&w=majority"),
            Ok(MongoUri {
                servers: vec!["db1:27017".into(), "db2:27017".into()],
                replica_set: Some("rs0".into()),
                username: Some("emqx".into()),
                password: Some("s@cret".into()),
                tls: false,
                auth_source: None,
            })
        );
        let m = parse_uri("mongodb://db1/?tls=true&authSource=admin").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((m.tls, m.auth_source.as_deref()), (true, Some("admin")));
        assert_eq!(percent_decode("a%+1b%41"), "a%+1bA", "only two hex digits are an escape");
        let m = parse_uri("mongodb://127.0.0.1:28002/?serverSelectionTimeoutMS=5000").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((m.servers, m.replica_set, m.username), (vec!["127.0.0.1:28002".into()], None, None));
        assert!(parse_uri("mongodb+srv://cluster.example").is_err());
    }
}
