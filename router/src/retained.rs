//! Retained messages, by topic, in a trie of their own.
//!
//! A subscribe looks retained messages up by *filter*, the other way round
//! from routing: `a/+/c` must find every retained topic of that shape. A
//! level trie answers it by walking only the branches the filter allows;
//! an exact filter is a straight path. The store is bounded in messages
//! and bytes like every queue, and what it refuses is counted by the
//! caller.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::message::{Message, Millis};

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.message.is_none()
    }

    fn take<'l>(&mut self, mut levels: impl Iterator<Item = &'l str>) -> Option<Arc<Message>> {
        match levels.next() {
            None => self.message.take(),
            Some(level) => {
                let child = self.children.get_mut(level)?;
                let taken = child.take(levels);
                if child.is_empty() {
                    self.children.remove(level);
                }
                taken
            }
        }
    }

    fn slot<'l>(&mut self, mut levels: impl Iterator<Item = &'l str>) -> &mut Option<Arc<Message>> {
        match levels.next() {
            None => &mut self.message,
            Some(level) => self.children.entry(level.into()).or_default().slot(levels),
        }
    }

    fn all(&self, top: bool, f: &mut dyn FnMut(&Arc<Message>)) {
        if let Some(m) = &self.message {
            f(m);
        }
        for (name, child) in &self.children {
            // A leading wildcard never reaches a `$` topic (MQTT-4.7.2-1).
            if !(top && name.starts_with('$')) {
                child.all(false, f);
            }
        }
    }

    fn visit(&self, filter: &[&str], depth: usize, f: &mut dyn FnMut(&Arc<Message>)) {
        let top = depth == 0;
        match filter.get(depth) {
            None => {
                if let Some(m) = &self.message {
                    f(m);
                }
            }
            Some(&"#") => self.all(top, f),
            Some(&"+") => {
                for (name, child) in &self.children {
                    if !(top && name.starts_with('$')) {
                        child.visit(filter, depth + 1, f);
                    }
                }
            }
            Some(level) => {
                if let Some(child) = self.children.get(*level) {
                    child.visit(filter, depth + 1, f);
                }
            }
        }
    }
}

/// Why a retained message was not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetainRefused {
    /// The store holds its maximum number of messages.
    Full,
    /// The message alone, or the store with it, is over the byte bound.
    TooLarge,
}

/// The retained messages of the broker.
#[derive(Debug)]
pub struct Retained {
    root: Node,
    /// Messages with an expiry, by deadline: expiring them visits only
    /// those due, not the store.
    expiring: BTreeSet<(Millis, Arc<str>)>,
    count: usize,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl Retained {
    /// An empty store with these bounds.
    #[must_use]
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self { root: Node::default(), expiring: BTreeSet::new(), count: 0, bytes: 0, max_messages, max_bytes }
    }

    /// Applies a retained publish: an empty payload clears the topic
    /// (MQTT-3.3.1-6), anything else replaces what it held.
    ///
    /// # Errors
    /// When the bounds leave no room; the previous message stays.
    pub fn apply(&mut self, message: Arc<Message>) -> Result<(), RetainRefused> {
        if message.payload.is_empty() {
            self.remove(&message.topic);
            return Ok(());
        }
        let size = message.size();
        let topic = Arc::clone(&message.topic);
        let slot = self.root.slot(topic.split('/'));
        let old = slot.as_ref().map_or(0, |m| m.size());
        let adds = usize::from(slot.is_none());
        let bytes = self.bytes - old + size;
        let refused = if self.count + adds > self.max_messages {
            Some(RetainRefused::Full)
        } else if bytes > self.max_bytes {
            Some(RetainRefused::TooLarge)
        } else {
            None
        };
        if let Some(why) = refused {
            if slot.is_none() {
                // Undo the path the lookup created.
                self.root.take(topic.split('/'));
            }
            return Err(why);
        }
        let deadline = message.expires_at;
        if let Some(old) = slot.replace(message)
            && let Some(at) = old.expires_at
        {
            self.expiring.remove(&(at, Arc::clone(&topic)));
        }
        if let Some(at) = deadline {
            self.expiring.insert((at, topic));
        }
        self.count += adds;
        self.bytes = bytes;
        Ok(())
    }

    /// Clears `topic`; returns what it held.
    pub fn remove(&mut self, topic: &str) -> Option<Arc<Message>> {
        let taken = self.root.take(topic.split('/'))?;
        if let Some(at) = taken.expires_at {
            self.expiring.remove(&(at, Arc::clone(&taken.topic)));
        }
        self.count -= 1;
        self.bytes -= taken.size();
        Some(taken)
    }

    /// Every retained message matching `filter` that has not expired.
    #[must_use]
    pub fn matching(&self, filter: &str, now: Millis) -> Vec<Arc<Message>> {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = Vec::new();
        self.root.visit(&levels, 0, &mut |m| {
            if !m.expired(now) {
                out.push(Arc::clone(m));
            }
        });
        out
    }

    /// Drops every expired message; returns their topics.
    pub fn expire(&mut self, now: Millis) -> Vec<Arc<str>> {
        let mut gone = Vec::new();
        while let Some((at, topic)) = self.expiring.first().cloned() {
            if at > now {
                break;
            }
            self.expiring.pop_first();
            if self.remove(&topic).is_some() {
                gone.push(topic);
            }
        }
        gone
    }

    /// The message retained on `topic`, if any.
    #[must_use]
    pub fn get(&self, topic: &str) -> Option<Arc<Message>> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.clone()
    }

    /// Every retained message (for persistence and tests).
    #[must_use]
    pub fn all(&self) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        self.root.all(false, &mut |m| out.push(Arc::clone(m)));
        out
    }

    /// How many messages are held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether none is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Topic and payload bytes held.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::QoS;

    fn msg(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message::new(topic, payload, QoS::AtLeastOnce, true))
    }

    fn topics(r: &Retained, filter: &str) -> Vec<String> {
        let mut t: Vec<String> = r.matching(filter, 0).iter().map(|m| m.topic.to_string()).collect();
        t.sort();
        t
    }

    #[test]
    fn filters_find_retained_topics() {
        let mut r = Retained::new(100, 1 << 20);
        for t in ["a", "a/b", "a/c", "a/b/c", "$SYS/x", "x/b"] {
            r.apply(msg(t, b"1")).unwrap();
        }
        assert_eq!(topics(&r, "a/#"), ["a", "a/b", "a/b/c", "a/c"]);
        assert_eq!(topics(&r, "+/b"), ["a/b", "x/b"]);
        assert_eq!(topics(&r, "#").len(), 5);
        assert_eq!(topics(&r, "$SYS/#"), ["$SYS/x"]);
        assert_eq!(topics(&r, "a/b"), ["a/b"]);
        r.apply(msg("a/b", b"")).unwrap();
        assert_eq!(topics(&r, "+/b"), ["x/b"]);
        assert_eq!(r.len(), 5);
    }

    #[test]
    fn bounds_refuse_and_keep_the_old_message() {
        let mut r = Retained::new(2, 10);
        r.apply(msg("a", b"12345")).unwrap();
        r.apply(msg("b", b"1")).unwrap();
        assert_eq!(r.apply(msg("c", b"1")), Err(RetainRefused::Full));
        assert_eq!(r.apply(msg("a", b"123456789")), Err(RetainRefused::TooLarge));
        assert_eq!(r.matching("a", 0).first().map(|m| m.payload.len()), Some(5));
        // Replacing within the bounds is fine, and the refused path left no node.
        r.apply(msg("a", b"1234")).unwrap();
        assert_eq!((r.len(), r.bytes()), (2, 7));
        assert!(!r.root.children.contains_key("c"));
    }

    #[test]
    fn expired_messages_are_not_delivered_and_are_swept() {
        let mut r = Retained::new(10, 1000);
        let mut m = Message::new("a", &b"x"[..], QoS::AtMostOnce, true);
        m.expires_at = Some(100);
        r.apply(Arc::new(m)).unwrap();
        assert_eq!(r.matching("a", 99).len(), 1);
        assert!(r.matching("a", 100).is_empty());
        assert_eq!(r.expire(100).len(), 1);
        assert!(r.is_empty() && r.bytes() == 0);
    }
}
