//! The subscription index: which sessions a topic name reaches.
//!
//! **Why two structures.** A fleet is one topic set per device: ten
//! thousand devices are ten thousand exact filters (`mqseal/v1/dev/d-1/cmd`,
//! …) and a handful of wildcard ones (a controller's `mqseal/v1/dev/+/resp`).
//! Exact filters live in a hash map, so routing to one device costs one
//! lookup whatever the fleet's size (EMQX keeps the same split). Wildcard
//! filters live in a trie with one node per level (Mosquitto's `subs.c`):
//! a publish walks the topic's levels, trying the literal child, `+` and
//! `#` at each, so its cost grows with the topic's depth and the wildcard
//! branches that match it, never with the number of subscriptions.
//! rumqttd, by contrast, scanned every filter on the first publish to each
//! topic (docs/ROUTER.md).
//!
//! Shared subscriptions sit in the same places, as groups: a publish
//! reaches one member of each matching group, chosen by the caller.

use std::collections::HashMap;

use crate::message::SubOptions;
use crate::topic;

/// A session as the index knows it: its slot in the router.
pub type Slot = u32;

/// Who holds one filter: plain subscribers and shared-subscription groups.
///
/// **Why not two hash maps.** In a fleet almost every filter has exactly
/// one holder (a device and its own topics), and the exact index holds one
/// of these per filter: two inline hash maps were 96 bytes and an
/// allocation per filter, most of the index's memory (massif, 2,000
/// agents: docs/BENCHMARKS.md "Where the bytes go"). One holder is kept
/// inline, more in a boxed map, groups only when there are any.
#[derive(Debug, Default)]
pub struct Holders {
    direct: Direct,
    /// By group name: a client may make up any number of group names.
    /// Boxed on purpose: 8 bytes inline instead of a map's 48.
    #[allow(clippy::box_collection)]
    groups: Option<Box<HashMap<Box<str>, Group>>>,
}

#[derive(Debug, Default)]
enum Direct {
    #[default]
    None,
    One(Slot, SubOptions),
    /// Boxed on purpose, as `groups`.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<Slot, SubOptions>>),
}

impl Direct {
    fn len(&self) -> usize {
        match self {
            Direct::None => 0,
            Direct::One(..) => 1,
            Direct::Many(m) => m.len(),
        }
    }

    /// Adds or replaces `slot`'s options; whether it is new.
    fn insert(&mut self, slot: Slot, opts: SubOptions) -> bool {
        match self {
            Direct::None => {
                *self = Direct::One(slot, opts);
                true
            }
            Direct::One(s, o) if *s == slot => {
                *o = opts;
                false
            }
            Direct::One(s, o) => {
                let mut m = HashMap::with_capacity(2);
                m.insert(*s, *o);
                m.insert(slot, opts);
                *self = Direct::Many(Box::new(m));
                true
            }
            Direct::Many(m) => m.insert(slot, opts).is_none(),
        }
    }

    fn remove(&mut self, slot: Slot) -> bool {
        match self {
            Direct::One(s, _) if *s == slot => {
                *self = Direct::None;
                true
            }
            Direct::None | Direct::One(..) => false,
            Direct::Many(m) => {
                let removed = m.remove(&slot).is_some();
                if m.is_empty() {
                    *self = Direct::None;
                }
                removed
            }
        }
    }

    fn visit(&self, f: &mut dyn FnMut(Hit<'_>)) {
        match self {
            Direct::None => {}
            Direct::One(slot, opts) => f(Hit::Direct(*slot, opts)),
            Direct::Many(m) => {
                for (slot, opts) in m.iter() {
                    f(Hit::Direct(*slot, opts));
                }
            }
        }
    }
}

impl Holders {
    fn is_empty(&self) -> bool {
        self.direct.len() == 0 && self.groups.is_none()
    }

    fn len(&self) -> usize {
        let grouped = self.groups.iter().flat_map(|g| g.values()).map(|g| g.members.len()).sum::<usize>();
        self.direct.len() + grouped
    }

    fn insert(&mut self, group: Option<&str>, slot: Slot, opts: SubOptions) -> bool {
        let Some(name) = group else { return self.direct.insert(slot, opts) };
        let groups = self.groups.get_or_insert_with(Box::default);
        let group =
            groups.entry(name.into()).or_insert_with(|| Group { name: name.into(), members: Vec::new(), next: 0 });
        match group.members.iter_mut().find(|(s, _)| *s == slot) {
            Some(member) => {
                member.1 = opts;
                false
            }
            None => {
                group.members.push((slot, opts));
                true
            }
        }
    }

    fn remove(&mut self, group: Option<&str>, slot: Slot) -> bool {
        let Some(name) = group else { return self.direct.remove(slot) };
        let Some(groups) = self.groups.as_mut() else { return false };
        let Some(group) = groups.get_mut(name) else { return false };
        let Some(mi) = group.members.iter().position(|(s, _)| *s == slot) else { return false };
        group.members.remove(mi);
        if group.members.is_empty() {
            groups.remove(name);
        }
        if groups.is_empty() {
            self.groups = None;
        }
        true
    }

    fn visit(&mut self, f: &mut dyn FnMut(Hit<'_>)) {
        self.direct.visit(f);
        for group in self.groups.iter_mut().flat_map(|g| g.values_mut()) {
            f(Hit::Group(group));
        }
    }
}

/// A shared-subscription group on one filter.
#[derive(Debug)]
pub struct Group {
    name: Box<str>,
    members: Vec<(Slot, SubOptions)>,
    next: usize,
}

impl Group {
    /// The group's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next member in turn for which `online` holds, or, when none is
    /// online, the next member in turn (its session queues the message).
    /// Round robin: a group spreads messages evenly over its consumers.
    pub fn pick(&mut self, online: impl Fn(Slot) -> bool) -> Option<(Slot, SubOptions)> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next % n;
        let chosen = (0..n).map(|i| (start + i) % n).find(|&i| self.members.get(i).is_some_and(|(s, _)| online(*s)));
        let i = chosen.unwrap_or(start);
        self.next = (i + 1) % n;
        self.members.get(i).copied()
    }
}

/// One holder of a filter that matched a topic.
pub enum Hit<'a> {
    /// A plain subscription.
    Direct(Slot, &'a SubOptions),
    /// A shared-subscription group: the caller picks one member.
    Group(&'a mut Group),
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Filters ending in `#` at this level.
    hash: Holders,
    /// Filters ending exactly here.
    here: Holders,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.hash.is_empty() && self.here.is_empty()
    }

    /// The holders for the rest of a filter's levels, creating nodes.
    fn holders_mut<'l>(&mut self, mut levels: impl Iterator<Item = &'l str>) -> &mut Holders {
        match levels.next() {
            None => &mut self.here,
            Some("#") => &mut self.hash,
            Some("+") => self.plus.get_or_insert_with(Box::default).holders_mut(levels),
            Some(level) => self.children.entry(level.into()).or_default().holders_mut(levels),
        }
    }

    /// Removes a holder and prunes nodes left empty; `true` if it was there.
    fn remove<'l>(&mut self, mut levels: impl Iterator<Item = &'l str>, group: Option<&str>, slot: Slot) -> bool {
        match levels.next() {
            None => self.here.remove(group, slot),
            Some("#") => self.hash.remove(group, slot),
            Some("+") => {
                let Some(plus) = self.plus.as_mut() else { return false };
                let removed = plus.remove(levels, group, slot);
                if plus.is_empty() {
                    self.plus = None;
                }
                removed
            }
            Some(level) => {
                let Some(child) = self.children.get_mut(level) else { return false };
                let removed = child.remove(levels, group, slot);
                if child.is_empty() {
                    self.children.remove(level);
                }
                removed
            }
        }
    }

    /// Visits the holders of every filter matching `levels[depth..]`.
    /// `dollar` is whether the topic starts with `$`: then the wildcards of
    /// the first level do not apply (MQTT-4.7.2-1).
    fn visit(&mut self, levels: &[&str], depth: usize, dollar: bool, f: &mut dyn FnMut(Hit<'_>)) {
        let wild_ok = !(dollar && depth == 0);
        if wild_ok {
            // `#` matches the parent level too: `a/#` matches `a`.
            self.hash.visit(f);
        }
        let Some(level) = levels.get(depth) else {
            self.here.visit(f);
            return;
        };
        if let Some(child) = self.children.get_mut(*level) {
            child.visit(levels, depth + 1, dollar, f);
        }
        if wild_ok && let Some(plus) = self.plus.as_mut() {
            plus.visit(levels, depth + 1, dollar, f);
        }
    }
}

/// Every subscription of every session, by filter.
#[derive(Debug, Default)]
pub struct Index {
    exact: HashMap<Box<str>, Holders>,
    wild: Node,
    count: usize,
}

/// A filter split into where it lives: its shared group, if any, and the
/// filter proper.
fn split(filter: &str) -> (Option<&str>, &str) {
    match topic::parse_shared(filter) {
        Some((group, inner)) => (Some(group), inner),
        None => (None, filter),
    }
}

impl Index {
    /// Adds or updates `slot`'s subscription to `filter` (valid, possibly
    /// `$share/…`). `true` if it is new.
    pub fn insert(&mut self, filter: &str, slot: Slot, opts: SubOptions) -> bool {
        let (group, inner) = split(filter);
        let holders = if topic::has_wildcard(inner) {
            self.wild.holders_mut(inner.split('/'))
        } else {
            self.exact.entry(inner.into()).or_default()
        };
        let new = holders.insert(group, slot, opts);
        if new {
            self.count += 1;
        }
        new
    }

    /// Removes `slot`'s subscription to `filter`; `true` if there was one.
    pub fn remove(&mut self, filter: &str, slot: Slot) -> bool {
        let (group, inner) = split(filter);
        let removed = if topic::has_wildcard(inner) {
            self.wild.remove(inner.split('/'), group, slot)
        } else {
            match self.exact.get_mut(inner) {
                Some(holders) => {
                    let removed = holders.remove(group, slot);
                    if holders.is_empty() {
                        self.exact.remove(inner);
                    }
                    removed
                }
                None => false,
            }
        };
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Calls `f` for every holder of a filter that matches `topic` (a
    /// valid topic name).
    pub fn for_each_match(&mut self, topic: &str, f: &mut dyn FnMut(Hit<'_>)) {
        if let Some(holders) = self.exact.get_mut(topic) {
            holders.visit(f);
        }
        if self.wild.is_empty() {
            return;
        }
        let levels: Vec<&str> = topic.split('/').collect();
        self.wild.visit(&levels, 0, topic.starts_with('$'), f);
    }

    /// How many subscriptions are held (each group member counts).
    #[must_use]
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no subscription is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// How many sessions hold exactly `filter` (for tests and metrics).
    #[must_use]
    pub fn holders_of(&mut self, filter: &str) -> usize {
        let (_, inner) = split(filter);
        if topic::has_wildcard(inner) {
            let mut node = &mut self.wild;
            let mut levels = inner.split('/');
            loop {
                match levels.next() {
                    None => return node.here.len(),
                    Some("#") => return node.hash.len(),
                    Some("+") => match node.plus.as_mut() {
                        Some(p) => node = p,
                        None => return 0,
                    },
                    Some(l) => match node.children.get_mut(l) {
                        Some(c) => node = c,
                        None => return 0,
                    },
                }
            }
        }
        self.exact.get(inner).map_or(0, Holders::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::QoS;

    fn hits(index: &mut Index, topic: &str) -> Vec<Slot> {
        let mut out = Vec::new();
        index.for_each_match(topic, &mut |hit| match hit {
            Hit::Direct(slot, _) => out.push(slot),
            Hit::Group(g) => out.extend(g.pick(|_| true).map(|(s, _)| s)),
        });
        out.sort_unstable();
        out
    }

    #[test]
    fn exact_and_wildcard_filters_route() {
        let mut index = Index::default();
        let q = SubOptions::qos(QoS::AtLeastOnce);
        index.insert("mqseal/v1/dev/d1/cmd", 1, q);
        index.insert("mqseal/v1/dev/d2/cmd", 2, q);
        index.insert("mqseal/v1/dev/+/cmd", 3, q);
        index.insert("mqseal/#", 4, q);
        index.insert("#", 5, q);
        assert_eq!(hits(&mut index, "mqseal/v1/dev/d1/cmd"), vec![1, 3, 4, 5]);
        assert_eq!(hits(&mut index, "mqseal"), vec![4, 5]);
        assert_eq!(hits(&mut index, "$SYS/x"), Vec::<Slot>::new());
        assert_eq!(index.len(), 5);
        assert!(index.remove("mqseal/v1/dev/+/cmd", 3));
        assert!(!index.remove("mqseal/v1/dev/+/cmd", 3));
        assert!(index.remove("mqseal/v1/dev/d1/cmd", 1));
        assert_eq!(hits(&mut index, "mqseal/v1/dev/d1/cmd"), vec![4, 5]);
        assert_eq!(index.len(), 3);
    }

    #[test]
    fn emptied_nodes_are_pruned() {
        let mut index = Index::default();
        let q = SubOptions::qos(QoS::AtMostOnce);
        index.insert("a/+/b/#", 1, q);
        index.insert("$share/g/a/+/b/#", 2, q);
        assert!(index.remove("a/+/b/#", 1));
        assert!(index.remove("$share/g/a/+/b/#", 2));
        assert!(index.wild.is_empty());
        index.insert("x/y", 1, q);
        assert!(index.remove("x/y", 1));
        assert!(index.exact.is_empty() && index.is_empty());
    }

    #[test]
    fn groups_take_turns_and_prefer_online_members() {
        let mut index = Index::default();
        let q = SubOptions::qos(QoS::AtLeastOnce);
        for slot in 1..=3 {
            index.insert("$share/workers/jobs/+", slot, q);
        }
        let mut picked = Vec::new();
        for _ in 0..6 {
            index.for_each_match("jobs/1", &mut |hit| {
                if let Hit::Group(g) = hit {
                    picked.extend(g.pick(|s| s != 2).map(|(s, _)| s));
                }
            });
        }
        assert_eq!(picked, vec![1, 3, 1, 3, 1, 3]);
        assert_eq!(index.holders_of("$share/workers/jobs/+"), 3);
        // Re-subscribing updates, it does not add.
        assert!(!index.insert("$share/workers/jobs/+", 1, SubOptions::qos(QoS::ExactlyOnce)));
        assert_eq!(index.len(), 3);
    }
}
