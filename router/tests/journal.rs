//! The router's journal: what a store built from its changes holds, and
//! what a router restored from that store does.
//!
//! `Store` below is a model of the broker's writer (a map per table,
//! applying [`Changes`] in the documented order); the broker's real redb
//! writer is tested against a real file in `broker/tests/persistence.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;

use mqseal_router::{
    Changes, Conn, ConnectRequest, Disconnect, Limits, Message, Outgoing, QoS, Received, Router, SessionState,
    StoredItem, SubOptions,
};
use proptest::prelude::*;

#[derive(Debug, Default)]
struct Store {
    sessions: BTreeMap<String, SessionState>,
    items: BTreeMap<(String, u64), StoredItem>,
    retained: BTreeMap<String, Arc<Message>>,
    version: u64,
}

impl Store {
    fn apply(&mut self, changes: Changes) {
        for (client, bound) in changes.ended {
            self.sessions.remove(&*client);
            self.items.retain(|(c, seq), _| !(**c == *client && *seq < bound));
        }
        for state in changes.sessions {
            self.sessions.insert(state.client_id.to_string(), state);
        }
        for (client, seq, item) in changes.items {
            match item {
                Some(item) => self.items.insert((client.to_string(), seq), item),
                None => self.items.remove(&(client.to_string(), seq)),
            };
        }
        for (topic, message) in changes.retained {
            match message {
                Some(m) => self.retained.insert(topic.to_string(), m),
                None => self.retained.remove(&*topic),
            };
        }
        self.version = changes.version;
    }

    fn commit(&mut self, r: &mut Router) {
        self.apply(r.take_changes().unwrap());
    }

    /// A router as the broker builds one at start.
    fn restore(&self, now: u64) -> Router {
        self.restore_with(Limits::default(), now)
    }

    /// The same, with other limits than the store was written under.
    fn restore_with(&self, limits: Limits, now: u64) -> Router {
        let mut r = Router::new(limits);
        r.enable_journal();
        for (client, state) in &self.sessions {
            let items: Vec<(u64, StoredItem)> = self
                .items
                .iter()
                .filter(|((c, _), _)| c == client)
                .map(|((_, seq), item)| (*seq, item.clone()))
                .collect();
            r.restore_session(state.clone(), items, now);
        }
        for m in self.retained.values() {
            r.restore_retained((**m).clone(), now);
        }
        r
    }

    /// Whether it holds exactly what the router says it must.
    fn assert_matches(&self, r: &Router) {
        let all = r.snapshot_all();
        let mut sessions: BTreeMap<String, SessionState> =
            all.sessions.into_iter().map(|s| (s.client_id.to_string(), s)).collect();
        let mut mine = self.sessions.clone();
        for s in sessions.values_mut().chain(mine.values_mut()) {
            s.subscriptions.sort_by(|a, b| a.0.cmp(&b.0));
        }
        assert_eq!(mine, sessions, "session records");
        let items: BTreeMap<(String, u64), StoredItem> =
            all.items.into_iter().map(|(c, seq, i)| ((c.to_string(), seq), i.unwrap())).collect();
        assert_eq!(self.items, items, "queued and inflight copies");
        let retained: BTreeMap<String, Arc<Message>> =
            all.retained.into_iter().map(|(t, m)| (t.to_string(), m.unwrap())).collect();
        assert_eq!(self.retained, retained, "retained messages");
    }
}

fn journaled() -> Router {
    let mut r = Router::new(Limits::default());
    r.enable_journal();
    r
}

fn connect(r: &mut Router, id: &str, clean: bool, expiry: u32) -> mqseal_router::Connected {
    let req = ConnectRequest {
        client_id: Arc::from(id),
        clean_start: clean,
        session_expiry_secs: expiry,
        receive_maximum: 10,
        will: None,
    };
    r.connect(req, 0)
}

/// A persistent session "dev" subscribed to "d" at QoS 1, gone, with
/// `payloads` queued for it.
fn offline_dev(r: &mut Router, payloads: &[&str]) {
    let dev = connect(r, "dev", false, 60).conn;
    r.subscribe(dev, "d", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.disconnect(dev, LOST, 0).unwrap();
    for p in payloads {
        r.publish(None, msg("d", p, QoS::AtLeastOnce), 0).unwrap();
    }
}

fn msg(topic: &str, payload: &str, qos: QoS) -> Message {
    Message::new(topic, payload.as_bytes().to_vec(), qos, false)
}

const LOST: Disconnect = Disconnect { publish_will: true, session_expiry_secs: None };

fn payloads(out: &[Outgoing]) -> Vec<(String, u16, bool)> {
    out.iter()
        .filter_map(|o| match o {
            Outgoing::Publish(d) => Some((String::from_utf8_lossy(&d.message.payload).into_owned(), d.pkid, d.dup)),
            Outgoing::PubRel(_) => None,
        })
        .collect()
}

fn drain(r: &mut Router, c: Conn) -> Vec<Outgoing> {
    std::iter::from_fn(|| r.poll_transmit(c, 0)).collect()
}

#[test]
fn an_offline_sessions_queue_survives_a_restart_and_is_deleted_once_acknowledged() {
    let mut r = journaled();
    let mut store = Store::default();
    let dev = connect(&mut r, "dev", false, 3600).conn;
    r.subscribe(dev, "cmd/dev", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.disconnect(dev, LOST, 0).unwrap();
    let ctl = connect(&mut r, "ctl", true, 0).conn;
    for p in ["one", "two", "three"] {
        r.publish(Some(ctl), msg("cmd/dev", p, QoS::AtLeastOnce), 0).unwrap();
    }
    // QoS 0 is not queued for an offline session, so not persisted either.
    r.publish(Some(ctl), msg("cmd/dev", "zero", QoS::AtMostOnce), 0).unwrap();
    store.commit(&mut r);
    assert_eq!(store.items.len(), 3);
    store.assert_matches(&r);

    let mut back = store.restore(0);
    let c = connect(&mut back, "dev", false, 3600);
    assert!(c.session_present);
    let out = drain(&mut back, c.conn);
    let got: Vec<String> = payloads(&out).into_iter().map(|(p, ..)| p).collect();
    assert_eq!(got, ["one", "two", "three"]);
    for (_, pkid, _) in payloads(&out) {
        back.puback(c.conn, pkid).unwrap();
    }
    store.commit(&mut back);
    assert!(store.items.is_empty(), "{:?}", store.items);
    assert!(store.sessions.contains_key("dev"));
}

#[test]
fn what_was_in_flight_is_resent_with_its_packet_id_and_dup_after_a_restart() {
    let mut r = journaled();
    let mut store = Store::default();
    let dev = connect(&mut r, "dev", false, 3600).conn;
    r.subscribe(dev, "t", SubOptions::qos(QoS::ExactlyOnce), 0).unwrap();
    r.publish(None, msg("t", "a", QoS::AtLeastOnce), 0).unwrap();
    r.publish(None, msg("t", "b", QoS::ExactlyOnce), 0).unwrap();
    r.publish(None, msg("t", "c", QoS::ExactlyOnce), 0).unwrap();
    let out = payloads(&drain(&mut r, dev));
    assert_eq!(out.iter().map(|(_, id, _)| *id).collect::<Vec<_>>(), [1, 2, 3]);
    store.commit(&mut r);
    // "c" is PUBREC'd (PUBREL owed), "a" and "b" await their acks.
    assert_eq!(r.pubrec(dev, 3, true).unwrap(), mqseal_router::Ack::Done);
    store.commit(&mut r);
    store.assert_matches(&r);

    let mut back = store.restore(0);
    let c = connect(&mut back, "dev", false, 3600).conn;
    let out = drain(&mut back, c);
    assert_eq!(payloads(&out), [("a".to_string(), 1, true), ("b".to_string(), 2, true)]);
    assert!(out.contains(&Outgoing::PubRel(3)), "{out:?}");
}

#[test]
fn only_promises_move_the_version() {
    let mut r = journaled();
    let v0 = r.journal_version();
    let clean = connect(&mut r, "clean", true, 0).conn;
    r.subscribe(clean, "t", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.publish(None, msg("t", "x", QoS::AtLeastOnce), 0).unwrap();
    assert_eq!(r.journal_version(), v0, "a clean session persists nothing");
    assert!(r.take_changes().unwrap().is_empty());

    let dev = connect(&mut r, "dev", false, 60).conn;
    let v1 = r.journal_version();
    assert!(v1 > v0, "a new persistent session is a promise (CONNACK)");
    r.subscribe(dev, "d", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    let v2 = r.journal_version();
    assert!(v2 > v1, "SUBACK");
    r.publish(None, msg("d", "x", QoS::AtLeastOnce), 0).unwrap();
    let v3 = r.journal_version();
    assert!(v3 > v2, "a copy queued for it is (the publisher's PUBACK)");
    r.publish(None, msg("d", "y", QoS::AtMostOnce), 0).unwrap();
    assert_eq!(r.journal_version(), v3, "QoS 0 is not persisted");
    let out = payloads(&drain(&mut r, dev));
    r.puback(dev, out[0].1).unwrap();
    assert_eq!(r.journal_version(), v3, "acks from the subscriber are not promises");
    assert_eq!(r.take_changes().unwrap().version, v3);
}

#[test]
fn a_message_sent_and_acknowledged_between_commits_is_one_delete() {
    let mut r = journaled();
    let mut store = Store::default();
    let dev = connect(&mut r, "dev", false, 60).conn;
    r.subscribe(dev, "d", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    store.commit(&mut r);
    r.publish(None, msg("d", "x", QoS::AtLeastOnce), 0).unwrap();
    let out = payloads(&drain(&mut r, dev));
    r.puback(dev, out[0].1).unwrap();
    let changes = r.take_changes().unwrap();
    assert_eq!(changes.items.len(), 1);
    assert!(changes.items[0].2.is_none());
    assert!(changes.sessions.is_empty());
}

#[test]
fn a_session_ended_and_begun_again_before_a_commit_keeps_only_the_new_ones_messages() {
    let mut r = journaled();
    let mut store = Store::default();
    let dev = connect(&mut r, "dev", false, 60).conn;
    r.subscribe(dev, "d", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.disconnect(dev, LOST, 0).unwrap();
    r.publish(None, msg("d", "old", QoS::AtLeastOnce), 0).unwrap();
    store.commit(&mut r);
    assert_eq!(store.items.len(), 1);
    let again = connect(&mut r, "dev", true, 60).conn;
    r.subscribe(again, "d", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.disconnect(again, LOST, 0).unwrap();
    r.publish(None, msg("d", "new", QoS::AtLeastOnce), 0).unwrap();
    store.commit(&mut r);
    store.assert_matches(&r);
    let mut back = store.restore(0);
    let c = connect(&mut back, "dev", false, 60).conn;
    let got: Vec<String> = payloads(&drain(&mut back, c)).into_iter().map(|(p, ..)| p).collect();
    assert_eq!(got, ["new"]);
}

#[test]
fn an_expired_or_clean_session_leaves_the_store() {
    let mut r = journaled();
    let mut store = Store::default();
    let dev = connect(&mut r, "dev", false, 1).conn;
    r.subscribe(dev, "d", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.disconnect(dev, LOST, 0).unwrap();
    r.publish(None, msg("d", "x", QoS::AtLeastOnce), 0).unwrap();
    store.commit(&mut r);
    assert_eq!((store.sessions.len(), store.items.len()), (1, 1));
    r.tick(2_000);
    store.commit(&mut r);
    assert!(store.sessions.is_empty() && store.items.is_empty(), "{store:?}");
}

#[test]
fn subscriptions_with_their_options_and_incoming_qos2_ids_survive() {
    let mut r = journaled();
    let mut store = Store::default();
    let dev = connect(&mut r, "dev", false, 60).conn;
    let opts = SubOptions { no_local: true, id: Some(7), ..SubOptions::qos(QoS::ExactlyOnce) };
    r.subscribe(dev, "a/+", opts, 0).unwrap();
    r.subscribe(dev, "b", SubOptions::qos(QoS::AtMostOnce), 0).unwrap();
    r.unsubscribe(dev, "b").unwrap();
    assert_eq!(r.receive_qos2(dev, 42).unwrap(), Received::Fresh);
    store.commit(&mut r);
    store.assert_matches(&r);
    let state = &store.sessions["dev"];
    assert_eq!(state.subscriptions, [(Box::from("a/+"), opts)]);
    assert_eq!(state.incoming_qos2, [42]);

    let mut back = store.restore(0);
    let c = connect(&mut back, "dev", false, 60).conn;
    assert_eq!(back.receive_qos2(c, 42).unwrap(), Received::Duplicate, "not routed twice after a restart");
    back.publish(None, msg("a/x", "m", QoS::ExactlyOnce), 0).unwrap();
    let out = drain(&mut back, c);
    let Outgoing::Publish(d) = &out[0] else { panic!("{out:?}") };
    assert_eq!((d.qos, &*d.subscription_ids), (QoS::ExactlyOnce, &[7][..]));
}

#[test]
fn retained_messages_are_journaled_when_set_cleared_and_expired() {
    let mut r = journaled();
    let mut store = Store::default();
    let mut m = msg("s/a", "on", QoS::AtLeastOnce);
    m.retain = true;
    r.publish(None, m.clone(), 0).unwrap();
    let mut short = msg("s/b", "soon", QoS::AtMostOnce);
    short.retain = true;
    short.expires_at = Some(1_000);
    r.publish(None, short, 0).unwrap();
    store.commit(&mut r);
    assert_eq!(store.retained.len(), 2);
    let mut back = store.restore(0);
    let sub = connect(&mut back, "s", true, 0).conn;
    back.subscribe(sub, "s/a", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    assert_eq!(payloads(&drain(&mut back, sub))[0].0, "on");

    r.tick(1_000);
    let mut clear = m;
    clear.payload = bytes::Bytes::new();
    r.publish(None, clear, 0).unwrap();
    store.commit(&mut r);
    assert!(store.retained.is_empty(), "{:?}", store.retained);
}

#[derive(Clone, Debug)]
enum Op {
    Connect(usize, bool),
    Drop(usize),
    Subscribe(usize, u8),
    Publish(u8, u8),
    Pull(usize),
    Ack(usize),
    Commit,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize, any::<bool>()).prop_map(|(c, clean)| Op::Connect(c, clean)),
        (0..3usize).prop_map(Op::Drop),
        (0..3usize, 0..3u8).prop_map(|(c, q)| Op::Subscribe(c, q)),
        (0..3u8, 0..3u8).prop_map(|(t, q)| Op::Publish(t, q)),
        (0..3usize).prop_map(Op::Pull),
        (0..3usize).prop_map(Op::Ack),
        Just(Op::Commit),
    ]
}

proptest! {
    /// Whatever happens between commits, a store that applied every
    /// snapshot holds exactly the persisted state, and a router restored
    /// from it holds the same.
    #[test]
    fn the_store_always_holds_exactly_the_persisted_state(ops in proptest::collection::vec(op(), 1..80)) {
        let mut r = Router::new(Limits { max_queued_messages: 4, max_inflight: 2, ..Limits::default() });
        r.enable_journal();
        let mut store = Store::default();
        let mut conns: [Option<Conn>; 3] = [None; 3];
        let mut sent: [Vec<(u16, bool)>; 3] = Default::default();
        for op in ops {
            match op {
                Op::Connect(c, clean) => {
                    let id = format!("c{c}");
                    let expiry = if clean { 0 } else { 600 };
                    conns[c] = Some(connect(&mut r, &id, clean, expiry).conn);
                    sent[c].clear();
                }
                Op::Drop(c) => {
                    if let Some(conn) = conns[c].take() {
                        let _ = r.disconnect(conn, LOST, 0);
                    }
                }
                Op::Subscribe(c, q) => {
                    if let Some(conn) = conns[c] {
                        let _ = r.subscribe(conn, &format!("t/{c}"), SubOptions::qos(QoS::from_u8(q).unwrap()), 0);
                        let _ = r.subscribe(conn, "all/#", SubOptions::qos(QoS::AtLeastOnce), 0);
                    }
                }
                Op::Publish(t, q) => {
                    let topic = if t == 0 { "all/x".to_string() } else { format!("t/{t}") };
                    let _ = r.publish(None, msg(&topic, "p", QoS::from_u8(q).unwrap()), 0);
                }
                Op::Pull(c) => {
                    if let Some(conn) = conns[c] {
                        for o in drain(&mut r, conn) {
                            match o {
                                Outgoing::Publish(d) if d.qos != QoS::AtMostOnce => {
                                    sent[c].push((d.pkid, d.qos == QoS::ExactlyOnce));
                                }
                                Outgoing::PubRel(id) => sent[c].push((id, false)),
                                Outgoing::Publish(_) => {}
                            }
                        }
                    }
                }
                Op::Ack(c) => {
                    if let (Some(conn), Some((pkid, qos2))) = (conns[c], sent[c].pop()) {
                        if qos2 {
                            let _ = r.pubrec(conn, pkid, true);
                        } else {
                            let _ = r.puback(conn, pkid);
                            let _ = r.pubcomp(conn, pkid);
                        }
                    }
                }
                Op::Commit => store.commit(&mut r),
            }
        }
        store.commit(&mut r);
        store.assert_matches(&r);
        store.assert_matches(&store.restore(0));
    }
}

#[test]
fn changes_a_store_failed_to_commit_come_back_in_the_next_snapshot() {
    let mut r = journaled();
    let mut store = Store::default();
    let dev = connect(&mut r, "dev", false, 60).conn;
    r.subscribe(dev, "d", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.publish(None, msg("d", "x", QoS::AtLeastOnce), 0).unwrap();
    let failed = r.take_changes().unwrap();
    assert!(!failed.is_empty());
    r.requeue(&failed);
    store.commit(&mut r);
    store.assert_matches(&r);
    assert_eq!(store.items.len(), 1);
}

#[test]
fn every_qos2_step_a_client_sees_waits_for_the_store() {
    let mut r = journaled();
    let dev = connect(&mut r, "dev", false, 60).conn;
    r.subscribe(dev, "t", SubOptions::qos(QoS::ExactlyOnce), 0).unwrap();
    let _ = r.take_changes();
    let _ = r.take_journal_depends();

    // Incoming: the PUBREC of a fresh id and the PUBCOMP are promises; the
    // PUBREC of a duplicate answers from the first one's record.
    let v = r.journal_version();
    assert_eq!(r.receive_qos2(dev, 1).unwrap(), Received::Fresh);
    assert!(r.journal_version() > v, "PUBREC of a fresh id");
    let v = r.journal_version();
    assert_eq!(r.receive_qos2(dev, 1).unwrap(), Received::Duplicate);
    assert_eq!(r.journal_version(), v);
    assert!(r.take_journal_depends(), "PUBREC of a duplicate");
    assert!(!r.take_journal_depends(), "taken");
    assert!(r.release_qos2(dev, 1).unwrap());
    assert!(r.journal_version() > v, "PUBCOMP frees the id");

    // Outgoing: the packet id a copy leaves with, and its PUBREC (PUBREL).
    r.publish(None, msg("t", "m", QoS::ExactlyOnce), 0).unwrap();
    let v = r.journal_version();
    let out = payloads(&drain(&mut r, dev));
    assert!(r.journal_version() > v, "a QoS 2 copy's packet id");
    let v = r.journal_version();
    assert_eq!(r.pubrec(dev, out[0].1, true).unwrap(), mqseal_router::Ack::Done);
    assert!(r.journal_version() > v, "PUBREC → PUBREL");

    // A resumed session: CONNACK "session present", and the PUBREL resent.
    r.disconnect(dev, LOST, 0).unwrap();
    let _ = r.take_journal_depends();
    let v = r.journal_version();
    let c = connect(&mut r, "dev", false, 60);
    assert!(c.session_present);
    assert!(r.take_journal_depends(), "CONNACK with session present");
    assert_eq!(drain(&mut r, c.conn), [Outgoing::PubRel(out[0].1)]);
    assert!(r.take_journal_depends(), "a resent PUBREL");
    assert_eq!(r.journal_version(), v, "nothing new was promised");

    // QoS 1 deliveries and clean sessions promise nothing and depend on nothing.
    r.subscribe(c.conn, "one", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.publish(None, msg("one", "x", QoS::AtLeastOnce), 0).unwrap();
    let v = r.journal_version();
    let _ = r.take_journal_depends();
    drain(&mut r, c.conn);
    assert_eq!((r.journal_version(), r.take_journal_depends()), (v, false));
    let clean = connect(&mut r, "clean", true, 0).conn;
    assert_eq!(r.receive_qos2(clean, 5).unwrap(), Received::Fresh);
    assert_eq!(r.receive_qos2(clean, 5).unwrap(), Received::Duplicate);
    assert!(r.release_qos2(clean, 5).unwrap());
    assert_eq!((r.journal_version(), r.take_journal_depends()), (v, false));
}

#[test]
fn a_stored_session_whose_expiry_is_now_0_is_deleted_not_restored() {
    // Resumed without an expiry while the broker died: its record says 0.
    let mut r = journaled();
    let mut store = Store::default();
    offline_dev(&mut r, &["x"]);
    let _resumed = connect(&mut r, "dev", false, 0).conn;
    store.commit(&mut r);
    assert_eq!(store.sessions["dev"].expiry_secs, 0);
    let mut back = store.restore(0);
    assert_eq!(back.stats().sessions_offline, 0, "not restored");
    store.commit(&mut back);
    assert!(store.sessions.is_empty() && store.items.is_empty(), "{store:?}");

    // An operator who lowers max_session_expiry_secs to 0 flushes them.
    let mut r = journaled();
    let mut store = Store::default();
    offline_dev(&mut r, &["x"]);
    store.commit(&mut r);
    let mut back = store.restore_with(Limits { max_session_expiry_secs: 0, ..Limits::default() }, 0);
    assert_eq!(back.stats().sessions_offline, 0, "not restored");
    store.commit(&mut back);
    assert!(store.sessions.is_empty() && store.items.is_empty(), "{store:?}");
}

#[test]
fn a_resumed_session_keeps_nothing_the_rules_now_deny() {
    let mut r = journaled();
    let mut store = Store::default();
    let ctl = connect(&mut r, "ctl", false, 60).conn;
    r.subscribe(ctl, "resp/a/#", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.subscribe(ctl, "resp/b/#", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.disconnect(ctl, LOST, 0).unwrap();
    for t in ["resp/a/1", "resp/b/1", "resp/b/2", "resp/a/2"] {
        r.publish(None, msg(t, t, QoS::AtLeastOnce), 0).unwrap();
    }
    store.commit(&mut r);

    // Restarted with rules that no longer grant device b.
    let mut back = store.restore(0);
    let c = connect(&mut back, "ctl", false, 60).conn;
    let (refused, dropped) = back.revoke(c, |f| !f.starts_with("resp/b/"), 0).unwrap();
    assert_eq!((refused, dropped), (vec![Box::from("resp/b/#")], 2));
    assert_eq!(back.stats().drops(mqseal_router::DropReason::NotAllowed), 2);
    let got: Vec<String> = payloads(&drain(&mut back, c)).into_iter().map(|(p, ..)| p).collect();
    assert_eq!(got, ["resp/a/1", "resp/a/2"]);
    back.publish(None, msg("resp/b/3", "late", QoS::AtLeastOnce), 0).unwrap();
    assert!(drain(&mut back, c).is_empty(), "no longer routed");
    store.commit(&mut back);
    assert_eq!(store.sessions["ctl"].subscriptions.len(), 1, "and not in the store either");
}

#[test]
fn a_queue_stored_under_higher_bounds_is_cut_to_todays_counting_the_drops() {
    let mut r = journaled();
    let mut store = Store::default();
    offline_dev(&mut r, &["1", "2", "3", "4", "5"]);
    store.commit(&mut r);
    let mut back = store.restore_with(Limits { max_queued_messages: 2, ..Limits::default() }, 0);
    assert_eq!(back.stats().queued_messages, 2);
    assert_eq!(back.stats().drops(mqseal_router::DropReason::QueueFullOldest), 3);
    store.commit(&mut back);
    assert_eq!(store.items.len(), 2, "the dropped ones leave the store");
    let c = connect(&mut back, "dev", false, 60).conn;
    let got: Vec<String> = payloads(&drain(&mut back, c)).into_iter().map(|(p, ..)| p).collect();
    assert_eq!(got, ["4", "5"], "the newest kept, as the queue's policy says");
}

#[test]
fn copies_in_flight_on_a_denied_topic_are_not_resent_either() {
    // Pulled for the socket is not received: a copy in flight when the
    // link died may never have reached the client.
    let mut r = journaled();
    let ctl = connect(&mut r, "ctl", false, 60).conn;
    r.subscribe(ctl, "resp/b/#", SubOptions::qos(QoS::ExactlyOnce), 0).unwrap();
    r.publish(None, msg("resp/b/1", "one", QoS::AtLeastOnce), 0).unwrap();
    r.publish(None, msg("resp/b/2", "two", QoS::ExactlyOnce), 0).unwrap();
    let sent = payloads(&drain(&mut r, ctl));
    assert_eq!(sent.len(), 2, "both in flight, never acknowledged");
    r.disconnect(ctl, LOST, 0).unwrap();
    let c = connect(&mut r, "ctl", false, 60).conn;
    let (_, withheld) = r.revoke(c, |f| !f.starts_with("resp/b/"), 0).unwrap();
    assert_eq!(withheld, 2);
    assert_eq!(drain(&mut r, c), [Outgoing::PubRel(sent[1].1)], "QoS 2 released without its payload, QoS 1 gone");
    assert_eq!(r.stats().inflight_messages, 1, "the PUBREL's");
    assert_eq!(r.stats().drops(mqseal_router::DropReason::NotAllowed), 2);
}
