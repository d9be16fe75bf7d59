//! Nothing is lost silently: under random publishes, acks, disconnects and
//! reconnects, every copy the router accepted is either received by its
//! subscriber or counted as a drop, the gauges match the sessions, and the
//! bounds hold at every step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use mqseal_router::{
    Conn, ConnectRequest, Disconnect, Limits, Message, NEVER_EXPIRES, Outgoing, QoS, Router, SubOptions,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Publish(u8),
    Poll(usize),
    Ack(usize, usize),
    Drop(usize),
    Reconnect(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3).prop_map(Op::Publish),
        3 => (0usize..3).prop_map(Op::Poll),
        3 => (0usize..3, 0usize..4).prop_map(|(s, n)| Op::Ack(s, n)),
        1 => (0usize..3).prop_map(Op::Drop),
        1 => (0usize..3).prop_map(Op::Reconnect),
    ]
}

struct Sub {
    conn: Option<Conn>,
    /// (pkid, qos) sent and not acknowledged on this connection.
    unacked: Vec<(u16, QoS)>,
    received: BTreeSet<u64>,
}

fn connect(r: &mut Router, i: usize) -> Conn {
    let req = ConnectRequest {
        client_id: Arc::from(format!("s{i}")),
        clean_start: false,
        session_expiry_secs: NEVER_EXPIRES,
        receive_maximum: 3,
        will: None,
    };
    r.connect(req, 0).conn
}

fn take(r: &mut Router, s: &mut Sub) {
    let Some(c) = s.conn else { return };
    while let Some(out) = r.poll_transmit(c, 0) {
        match out {
            Outgoing::Publish(d) => {
                let id = u64::from_be_bytes(d.message.payload[..8].try_into().unwrap());
                let fresh = s.received.insert(id);
                assert!(fresh || d.dup || d.qos == QoS::AtMostOnce, "message {id} delivered twice without DUP");
                if d.qos != QoS::AtMostOnce && !s.unacked.iter().any(|(p, _)| *p == d.pkid) {
                    s.unacked.push((d.pkid, d.qos));
                }
            }
            Outgoing::PubRel(pkid) => {
                // A QoS 2 delivery past PUBREC: only PUBCOMP is owed.
                r.pubcomp(c, pkid).unwrap();
            }
        }
    }
}

fn ack(r: &mut Router, s: &mut Sub, n: usize) {
    let Some(c) = s.conn else { return };
    if s.unacked.is_empty() {
        return;
    }
    let (pkid, qos) = s.unacked.remove(n % s.unacked.len());
    match qos {
        QoS::AtLeastOnce => assert_eq!(r.puback(c, pkid).unwrap(), mqseal_router::Ack::Done),
        _ => {
            assert_eq!(r.pubrec(c, pkid, true).unwrap(), mqseal_router::Ack::Done);
            assert_eq!(r.pubcomp(c, pkid).unwrap(), mqseal_router::Ack::Done);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_copy_is_received_or_counted(ops in prop::collection::vec(op(), 1..300)) {
        let limits = Limits { max_queued_messages: 4, max_inflight: 3, ..Limits::default() };
        let mut r = Router::new(limits);
        let mut subs: Vec<Sub> = (0..3).map(|i| {
            let conn = connect(&mut r, i);
            let qos = QoS::from_u8((i % 3) as u8).unwrap();
            r.subscribe(conn, "t", SubOptions::qos(qos), 0).unwrap();
            Sub { conn: Some(conn), unacked: Vec::new(), received: BTreeSet::new() }
        }).collect();
        let mut copies = 0u64;
        let mut next_id = 0u64;
        for op in ops {
            match op {
                Op::Publish(q) => {
                    let payload = next_id.to_be_bytes().to_vec();
                    next_id += 1;
                    copies += r.publish(None, Message::new("t", payload, QoS::from_u8(q).unwrap(), false), 0).unwrap() as u64;
                }
                Op::Poll(i) => take(&mut r, &mut subs[i]),
                Op::Ack(i, n) => ack(&mut r, &mut subs[i], n),
                Op::Drop(i) => {
                    if let Some(c) = subs[i].conn.take() {
                        r.disconnect(c, Disconnect { publish_will: true, session_expiry_secs: None }, 0).unwrap();
                        subs[i].unacked.clear();
                    }
                }
                Op::Reconnect(i) => {
                    if subs[i].conn.is_none() {
                        subs[i].conn = Some(connect(&mut r, i));
                    }
                }
            }
            let mut queued = 0;
            let mut inflight = 0;
            for i in 0..3 {
                let (n, _) = r.queued(&format!("s{i}")).unwrap();
                let f = r.inflight(&format!("s{i}")).unwrap();
                prop_assert!(n <= 4 && f <= 3);
                queued += n as u64;
                inflight += f as u64;
            }
            prop_assert_eq!(r.stats().queued_messages, queued);
            prop_assert_eq!(r.stats().inflight_messages, inflight);
        }
        // Everyone comes back and reads to the end.
        for (i, s) in subs.iter_mut().enumerate() {
            if s.conn.is_none() {
                s.conn = Some(connect(&mut r, i));
                s.unacked.clear();
            }
            for _ in 0..100 {
                take(&mut r, s);
                while !s.unacked.is_empty() {
                    ack(&mut r, s, 0);
                }
            }
            prop_assert_eq!(r.queued(&format!("s{i}")), Some((0, 0)));
            prop_assert_eq!(r.inflight(&format!("s{i}")), Some(0));
        }
        let received: u64 = subs.iter().map(|s| s.received.len() as u64).sum();
        let drops = r.stats().total_drops();
        let by_reason: HashMap<_, _> = mqseal_router::DropReason::ALL.iter().map(|d| (d.as_str(), r.stats().drops(*d))).collect();
        prop_assert_eq!(received + drops, copies, "received {} + dropped {:?} != copies {}", received, by_reason, copies);
    }
}
