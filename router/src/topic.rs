//! Topic names and filters: what is valid, and what matches what.
//!
//! These are the only implementations of MQTT's topic rules in mqseal: the
//! broker's front validates with them before anything reaches the router,
//! the ACL builds on them, and the subscription index is tested against
//! [`matches()`], the plain reading of the rules, which stays here as the
//! oracle (it is also what the retained store falls back on).

/// Longest topic name or filter (a UTF-8 string in one MQTT field).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// The prefix of a shared subscription (MQTT 5 §4.8.2).
pub const SHARE_PREFIX: &str = "$share/";

/// A topic name a client may publish to: non-empty, no wildcards, no NUL
/// (MQTT-3.3.2-2, MQTT-4.7.3-1), and short enough for one field.
#[must_use]
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && !topic.contains(['+', '#', '\0'])
}

/// `$share/{group}/{filter}` split into group and filter; `None` for a
/// filter that is not a shared subscription or whose group is empty or
/// holds a wildcard (MQTT-4.8.2-1/2).
#[must_use]
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    let (group, inner) = filter.strip_prefix(SHARE_PREFIX)?.split_once('/')?;
    if group.is_empty() || group.contains(['+', '#']) {
        return None;
    }
    Some((group, inner))
}

/// A topic filter a client may subscribe to: `#` only as a whole last
/// level, `+` only as a whole level (MQTT-4.7.1-1/2), no NUL, and no `$`
/// filters other than shared subscriptions — the broker publishes nothing
/// on `$SYS`, and a filter that names a `$` topic is refused rather than
/// silently matching nothing.
#[must_use]
pub fn valid_filter(filter: &str) -> bool {
    let inner = if filter.starts_with(SHARE_PREFIX) {
        match parse_shared(filter) {
            Some((_, inner)) => inner,
            None => return false,
        }
    } else {
        filter
    };
    if inner.is_empty() || inner.len() > MAX_TOPIC_LEN || inner.contains('\0') || inner.starts_with('$') {
        return false;
    }
    let mut levels = inner.split('/').peekable();
    while let Some(level) = levels.next() {
        let ok = match level {
            "#" => levels.peek().is_none(),
            "+" => true,
            l => !l.contains(['+', '#']),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Whether `filter` (already valid, not a `$share` one) matches the topic
/// name `topic`, read straight from MQTT §4.7: levels are split on `/`
/// (empty levels are levels), `+` matches exactly one level, `#` matches
/// the rest including the parent level itself (`a/#` matches `a`), and a
/// filter starting with a wildcard never matches a topic starting with `$`
/// (MQTT-4.7.2-1).
#[must_use]
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a filter holds a wildcard level (decides exact map or trie).
#[must_use]
pub fn has_wildcard(filter: &str) -> bool {
    filter.split('/').any(|l| l == "+" || l == "#")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_matching_rules() {
        let yes = [
            ("a/b", "a/b"),
            ("a/+", "a/b"),
            ("a/#", "a"),
            ("a/#", "a/b/c"),
            ("#", "a/b"),
            ("+/+", "/x"),
            ("a//b", "a//b"),
            ("a/+/b", "a//b"),
            ("+", ""),
            ("$SYS/#", "$SYS/x"),
            ("$SYS/+", "$SYS/x"),
        ];
        for (f, t) in yes {
            assert!(matches(f, t), "{f} should match {t}");
        }
        let no = [
            ("a/b", "a"),
            ("a/+", "a"),
            ("a/+", "a/b/c"),
            ("+", "a/b"),
            ("#", "$SYS/x"),
            ("+/x", "$SYS/x"),
            ("a/b", "a/b/"),
            ("a", "A"),
        ];
        for (f, t) in no {
            assert!(!matches(f, t), "{f} should not match {t}");
        }
    }

    #[test]
    fn filters_and_names_are_validated() {
        for good in ["a", "a/+/b", "#", "a/#", "$share/g/a/+", "/", "a//b", "+/+"] {
            assert!(valid_filter(good), "{good}");
        }
        for bad in
            ["", "a/#/b", "a#", "a/b+", "$SYS/#", "$share/g/$SYS/x", "a\0", "$share//a", "$share/g+/a", "$share/g"]
        {
            assert!(!valid_filter(bad), "{bad}");
        }
        assert!(valid_topic_name("a/b") && valid_topic_name("/"));
        assert!(
            !valid_topic_name("a/#") && !valid_topic_name("a/+") && !valid_topic_name("") && !valid_topic_name("a\0")
        );
        assert_eq!(parse_shared("$share/g/a/+"), Some(("g", "a/+")));
        assert_eq!(parse_shared("a/b"), None);
    }
}
