//! Who may publish and subscribe where.
//!
//! Every PUBLISH, SUBSCRIBE and will is checked here, by the per-packet
//! policy, before the router sees it. Rules are topic
//! patterns per role in which `{username}`, `{clientid}` and `{grant}` fill
//! whole levels (`{grant}` stands for each device a controller is granted,
//! and for `+` when the grant is `*`). Because usernames and client ids are
//! validated to contain no `/ + # $` or NUL, a placeholder can never widen a
//! rule. Admins pass every check.

use mqseal_router::topic;
pub use mqseal_router::topic::{valid_filter, valid_topic_name};
use mqseal_store::Role;
use serde::Deserialize;

/// The authenticated party behind one connection.
#[derive(Clone, Debug)]
pub struct Principal {
    /// Login name.
    pub username: String,
    /// MQTT client id (for devices, equal to the username).
    pub client_id: String,
    /// Decides which rules apply.
    pub role: Role,
    /// Devices a controller may reach; `*` for all.
    pub grants: Vec<String>,
}

impl Principal {
    /// The client id the router knows this connection by.
    ///
    /// A device's is its username, which it must also use as MQTT client id.
    /// Everyone else's client id lives in a namespace of its own username,
    /// `{username}!{client_id}`: in plain MQTT any client can take over any
    /// session by reusing its client id, and here that would let a
    /// controller (or a leaked credential of one) disconnect a device by
    /// connecting as "dev-a". Usernames cannot contain `!`, device ids
    /// neither, so no namespaced id can equal a device's or another user's.
    /// The same user reconnecting with the same client id gets its
    /// persistent session back, as MQTT expects.
    pub fn router_id(&self) -> String {
        if self.role == Role::Device { self.username.clone() } else { format!("{}!{}", self.username, self.client_id) }
    }
}

/// A rule as written in the config file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Which role the rule is for.
    pub role: Role,
    /// Topic patterns the role may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic patterns the role may subscribe to (a filter is allowed when
    /// every topic it can match is inside one of these).
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// The default rules (README, "Who may do what"): a device subscribes to its own `cmd` and `chal/req`
/// and publishes to its own `resp`, `chal` and `status`; a controller does
/// the mirror image for every device it is granted.
pub fn default_rules() -> Vec<RuleSpec> {
    let own = |suffixes: &[&str], who: &str| -> Vec<String> {
        suffixes.iter().map(|s| format!("mqseal/v1/dev/{{{who}}}/{s}")).collect()
    };
    vec![
        RuleSpec { role: Role::Device, publish: own(&FROM_DEVICE, "username"), subscribe: own(&TO_DEVICE, "username") },
        RuleSpec { role: Role::Controller, publish: own(&TO_DEVICE, "grant"), subscribe: own(&FROM_DEVICE, "grant") },
    ]
}

/// The channels (topic levels after the device id) controllers send
/// devices: commands and challenge requests. The broker knows topics, not
/// envelopes, so these are spelt here rather than taken from `proto`.
pub const TO_DEVICE: [&str; 2] = ["cmd", "chal/req"];

/// The channels devices publish: responses, challenges, status.
pub const FROM_DEVICE: [&str; 3] = ["resp", "chal", "status"];

#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Literal(String),
    Plus,
    Hash,
    Username,
    ClientId,
    Grant,
}

#[derive(Clone, Debug)]
struct Rule {
    role: Role,
    publish: bool,
    levels: Vec<Level>,
}

/// A pattern in a rule that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("ACL pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pattern: String,
    reason: &'static str,
}

fn parse_pattern(pattern: &str) -> Result<Vec<Level>, PatternError> {
    let err = |reason| PatternError { pattern: pattern.to_owned(), reason };
    if pattern.is_empty() {
        return Err(err("empty"));
    }
    let parts: Vec<&str> = pattern.split('/').collect();
    let mut levels = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        levels.push(match *part {
            "+" => Level::Plus,
            "#" if i + 1 == parts.len() => Level::Hash,
            "#" => return Err(err("`#` must be the last level")),
            "{username}" => Level::Username,
            "{clientid}" => Level::ClientId,
            "{grant}" => Level::Grant,
            p if p.contains(['+', '#', '{', '}', '\0']) => {
                return Err(err("placeholders and wildcards must fill a whole level"));
            }
            p => Level::Literal(p.to_owned()),
        });
    }
    Ok(levels)
}

/// The compiled rule set.
#[derive(Clone, Debug)]
pub struct Acl {
    rules: Vec<Rule>,
}

/// A pattern level after placeholders are filled in.
#[derive(Clone, Copy)]
enum Concrete<'a> {
    Literal(&'a str),
    Plus,
    Hash,
}

impl Acl {
    /// Compiles `specs`, refusing patterns that would not do what they say.
    pub fn new(specs: &[RuleSpec]) -> Result<Self, PatternError> {
        let mut rules = Vec::new();
        for spec in specs {
            for (publish, patterns) in [(true, &spec.publish), (false, &spec.subscribe)] {
                for p in patterns {
                    rules.push(Rule { role: spec.role, publish, levels: parse_pattern(p)? });
                }
            }
        }
        Ok(Acl { rules })
    }

    /// Whether `who` may publish to `topic` (a valid topic name: no
    /// wildcards). A topic name is the narrowest filter there is, so the
    /// same test as for subscriptions decides it.
    pub fn can_publish(&self, who: &Principal, topic: &str) -> bool {
        who.role == Role::Admin || self.any_rule(who, true, |pattern| covers(pattern, topic))
    }

    /// Whether `who` may subscribe to `filter` (a valid filter; a shared
    /// subscription `$share/{group}/{filter}` is judged by its inner filter).
    pub fn can_subscribe(&self, who: &Principal, filter: &str) -> bool {
        let inner = shared_inner(filter).unwrap_or(filter);
        who.role == Role::Admin || self.any_rule(who, false, |pattern| covers(pattern, inner))
    }

    fn any_rule(&self, who: &Principal, publish: bool, mut test: impl FnMut(&[Concrete<'_>]) -> bool) -> bool {
        let mut buf: Vec<Concrete<'_>> = Vec::new();
        for rule in self.rules.iter().filter(|r| r.role == who.role && r.publish == publish) {
            // A rule with `{grant}` stands for one pattern per granted device.
            if rule.levels.contains(&Level::Grant) {
                for grant in &who.grants {
                    fill(&mut buf, rule, who, grant);
                    if test(&buf) {
                        return true;
                    }
                }
            } else {
                fill(&mut buf, rule, who, "");
                if test(&buf) {
                    return true;
                }
            }
        }
        false
    }
}

/// `rule`'s pattern with the placeholders of `who` (and `grant`) filled in.
fn fill<'a>(buf: &mut Vec<Concrete<'a>>, rule: &'a Rule, who: &'a Principal, grant: &'a str) {
    buf.clear();
    buf.extend(rule.levels.iter().map(|level| match level {
        Level::Literal(s) => Concrete::Literal(s),
        Level::Plus => Concrete::Plus,
        Level::Hash => Concrete::Hash,
        Level::Username => Concrete::Literal(&who.username),
        Level::ClientId => Concrete::Literal(&who.client_id),
        Level::Grant if grant == "*" => Concrete::Plus,
        Level::Grant => Concrete::Literal(grant),
    }));
}

/// `$share/group/filter` → `filter`.
pub fn shared_inner(filter: &str) -> Option<&str> {
    topic::parse_shared(filter).map(|(_, inner)| inner)
}

/// Whether every topic `filter` can match is also matched by `pattern`; for
/// a topic name (no wildcards) that is plain MQTT matching. A wildcard in
/// the first level never matches a topic that starts with `$` (MQTT-4.7.2-1).
fn covers(pattern: &[Concrete<'_>], filter: &str) -> bool {
    let mut levels = filter.split('/');
    for (i, p) in pattern.iter().enumerate() {
        let level = levels.next();
        let dollar = i == 0 && filter.starts_with('$');
        match (p, level) {
            (Concrete::Hash, _) => return !dollar,
            // `+` in the pattern covers a literal or a `+`, never a `#`.
            (Concrete::Plus, Some(f)) if f != "#" && !dollar => {}
            (Concrete::Literal(l), Some(f)) if *l == f => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(username: &str, role: Role, grants: &[&str]) -> Principal {
        Principal {
            username: username.into(),
            client_id: username.into(),
            role,
            grants: grants.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn devices_reach_only_their_own_topics() {
        let acl = Acl::new(&default_rules()).unwrap();
        let a = who("dev-a", Role::Device, &[]);
        assert!(acl.can_subscribe(&a, "mqseal/v1/dev/dev-a/cmd"));
        assert!(acl.can_subscribe(&a, "mqseal/v1/dev/dev-a/chal/req"));
        assert!(!acl.can_subscribe(&a, "mqseal/v1/dev/dev-b/cmd"));
        assert!(!acl.can_subscribe(&a, "mqseal/v1/dev/+/cmd"));
        assert!(!acl.can_subscribe(&a, "mqseal/v1/dev/dev-a/#"));
        assert!(!acl.can_subscribe(&a, "#"));
        assert!(!acl.can_subscribe(&a, "$share/g/mqseal/v1/dev/dev-b/cmd"));
        assert!(acl.can_subscribe(&a, "$share/g/mqseal/v1/dev/dev-a/cmd"));
        assert!(acl.can_publish(&a, "mqseal/v1/dev/dev-a/resp"));
        assert!(acl.can_publish(&a, "mqseal/v1/dev/dev-a/status"));
        assert!(!acl.can_publish(&a, "mqseal/v1/dev/dev-a/cmd"));
        assert!(!acl.can_publish(&a, "mqseal/v1/dev/dev-b/resp"));
        assert!(!acl.can_publish(&a, "mqseal/v1/dev/dev-a/resp/extra"));
    }

    #[test]
    fn only_devices_own_their_bare_client_id() {
        let device = who("dev-a", Role::Device, &[]);
        assert_eq!(device.router_id(), "dev-a");
        let mut sneaky = who("ops", Role::Controller, &["dev-a"]);
        sneaky.client_id = "dev-a".into();
        assert_eq!(sneaky.router_id(), "ops!dev-a");
        let mut admin = who("admin", Role::Admin, &[]);
        admin.client_id = "dev-a".into();
        assert_ne!(admin.router_id(), device.router_id());
    }

    #[test]
    fn controllers_reach_granted_devices() {
        let acl = Acl::new(&default_rules()).unwrap();
        let c = who("ops", Role::Controller, &["dev-a"]);
        assert!(acl.can_publish(&c, "mqseal/v1/dev/dev-a/cmd"));
        assert!(!acl.can_publish(&c, "mqseal/v1/dev/dev-b/cmd"));
        assert!(acl.can_subscribe(&c, "mqseal/v1/dev/dev-a/resp"));
        assert!(!acl.can_subscribe(&c, "mqseal/v1/dev/+/resp"));
        let all = who("ops", Role::Controller, &["*"]);
        assert!(acl.can_subscribe(&all, "mqseal/v1/dev/+/resp"));
        assert!(acl.can_subscribe(&all, "mqseal/v1/dev/x/status"));
        assert!(!acl.can_subscribe(&all, "mqseal/v1/dev/#"));
        assert!(acl.can_publish(&all, "mqseal/v1/dev/anything/cmd"));
        let none = who("ops", Role::Controller, &[]);
        assert!(!acl.can_publish(&none, "mqseal/v1/dev//cmd"));
        let admin = who("root", Role::Admin, &[]);
        assert!(acl.can_subscribe(&admin, "#") && acl.can_publish(&admin, "any/thing"));
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        let acl =
            Acl::new(&[RuleSpec { role: Role::Device, publish: vec!["#".into()], subscribe: vec!["+/x".into()] }])
                .unwrap();
        let d = who("d", Role::Device, &[]);
        assert!(acl.can_publish(&d, "a/b"));
        assert!(!acl.can_publish(&d, "$SYS/x"));
        assert!(acl.can_subscribe(&d, "a/x") && acl.can_subscribe(&d, "+/x"));
        assert!(!acl.can_subscribe(&d, "#"));
    }

    #[test]
    fn patterns_and_filters_are_validated() {
        assert!(
            Acl::new(&[RuleSpec { role: Role::Device, publish: vec!["a/#/b".into()], subscribe: vec![] }]).is_err()
        );
        assert!(
            Acl::new(&[RuleSpec { role: Role::Device, publish: vec!["a/x{username}".into()], subscribe: vec![] }])
                .is_err()
        );
        for good in ["a", "a/+/b", "#", "a/#", "$share/g/a/+"] {
            assert!(valid_filter(good), "{good}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "$SYS/#", "$share/g/$SYS/x", "a\0"] {
            assert!(!valid_filter(bad), "{bad}");
        }
        assert!(
            valid_topic_name("a/b") && !valid_topic_name("a/#") && !valid_topic_name("a/+") && !valid_topic_name("")
        );
    }
}
