//! The router's rules, one scenario each: QoS, retain, sessions, windows,
//! bounds, expiry, wills, shared subscriptions, takeover, acks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::sync::Arc;

use mqseal_router::{
    Ack, Conn, ConnectRequest, Delivery, Disconnect, DropReason, Event, Limits, Message, NEVER_EXPIRES, Outgoing, QoS,
    Received, RetainHandling, Router, Stale, SubOptions, Subscribed, Will,
};

fn connect(r: &mut Router, id: &str, clean: bool, expiry: u32) -> Conn {
    connect_with(r, id, clean, expiry, u16::MAX, None).conn
}

fn connect_with(
    r: &mut Router,
    id: &str,
    clean: bool,
    expiry: u32,
    receive_maximum: u16,
    will: Option<Will>,
) -> mqseal_router::Connected {
    r.connect(
        ConnectRequest {
            client_id: Arc::from(id),
            clean_start: clean,
            session_expiry_secs: expiry,
            receive_maximum,
            will,
        },
        0,
    )
}

fn msg(topic: &str, payload: &str, qos: QoS) -> Message {
    Message::new(topic, payload.as_bytes().to_vec(), qos, false)
}

fn drain(r: &mut Router, c: Conn, now: u64) -> Vec<Outgoing> {
    std::iter::from_fn(|| r.poll_transmit(c, now)).collect()
}

fn publishes(out: &[Outgoing]) -> Vec<&Delivery> {
    out.iter()
        .filter_map(|o| match o {
            Outgoing::Publish(d) => Some(d),
            Outgoing::PubRel(_) => None,
        })
        .collect()
}

const DROP: Disconnect = Disconnect { publish_will: true, session_expiry_secs: None };
const CLEAN: Disconnect = Disconnect { publish_will: false, session_expiry_secs: None };

#[test]
fn delivered_qos_is_the_lower_of_publish_and_subscription() {
    let mut r = Router::new(Limits::default());
    let sub = connect(&mut r, "sub", true, 0);
    let publ = connect(&mut r, "pub", true, 0);
    r.subscribe(sub, "t", SubOptions::qos(QoS::ExactlyOnce), 0).unwrap();
    for q in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        r.publish(Some(publ), msg("t", "x", q), 0).unwrap();
    }
    let out = drain(&mut r, sub, 0);
    let qos: Vec<QoS> = publishes(&out).iter().map(|d| d.qos).collect();
    assert_eq!(qos, [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]);
    // And a QoS 0 subscription downgrades a QoS 2 publish.
    let low = connect(&mut r, "low", true, 0);
    r.subscribe(low, "t", SubOptions::qos(QoS::AtMostOnce), 0).unwrap();
    r.publish(Some(publ), msg("t", "y", QoS::ExactlyOnce), 0).unwrap();
    let out = drain(&mut r, low, 0);
    assert_eq!(publishes(&out)[0].qos, QoS::AtMostOnce);
    assert_eq!(publishes(&out)[0].pkid, 0);
}

#[test]
fn no_local_keeps_a_clients_own_publishes_from_it() {
    let mut r = Router::new(Limits::default());
    let a = connect(&mut r, "a", true, 0);
    let b = connect(&mut r, "b", true, 0);
    let mut opts = SubOptions::qos(QoS::AtLeastOnce);
    opts.no_local = true;
    r.subscribe(a, "chat", opts, 0).unwrap();
    r.subscribe(b, "chat", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    assert_eq!(r.publish(Some(a), msg("chat", "from a", QoS::AtLeastOnce), 0).unwrap(), 1);
    assert!(drain(&mut r, a, 0).is_empty());
    assert_eq!(publishes(&drain(&mut r, b, 0)).len(), 1);
    assert_eq!(r.publish(Some(b), msg("chat", "from b", QoS::AtLeastOnce), 0).unwrap(), 2);
    assert_eq!(publishes(&drain(&mut r, a, 0)).len(), 1);
}

#[test]
fn retained_messages_follow_retain_handling_and_the_retain_flag() {
    let mut r = Router::new(Limits::default());
    let p = connect(&mut r, "p", true, 0);
    let mut status = msg("dev/1/status", "online", QoS::AtLeastOnce);
    status.retain = true;
    r.publish(Some(p), status, 0).unwrap();
    assert_eq!(r.stats().retained_messages, 1);

    let s = connect(&mut r, "s", true, 0);
    // Retain handling 0: on every subscribe, with RETAIN set, at the subscription's QoS.
    r.subscribe(s, "dev/+/status", SubOptions::qos(QoS::AtMostOnce), 0).unwrap();
    let out = drain(&mut r, s, 0);
    let d = publishes(&out);
    assert_eq!(d.len(), 1);
    assert!(d[0].retain && d[0].qos == QoS::AtMostOnce && &*d[0].message.payload == b"online");
    r.subscribe(s, "dev/+/status", SubOptions::qos(QoS::AtMostOnce), 0).unwrap();
    assert_eq!(publishes(&drain(&mut r, s, 0)).len(), 1);

    // Retain handling 1: only for a new subscription.
    let mut once = SubOptions::qos(QoS::AtLeastOnce);
    once.retain_handling = RetainHandling::OnNewSubscription;
    let s1 = connect(&mut r, "s1", true, 0);
    r.subscribe(s1, "dev/1/status", once, 0).unwrap();
    r.subscribe(s1, "dev/1/status", once, 0).unwrap();
    assert_eq!(publishes(&drain(&mut r, s1, 0)).len(), 1);

    // Retain handling 2: never.
    let mut never = SubOptions::qos(QoS::AtLeastOnce);
    never.retain_handling = RetainHandling::Never;
    let s2 = connect(&mut r, "s2", true, 0);
    r.subscribe(s2, "dev/#", never, 0).unwrap();
    assert!(drain(&mut r, s2, 0).is_empty());

    // Live: RETAIN is cleared unless retain-as-published.
    let mut rap = SubOptions::qos(QoS::AtLeastOnce);
    rap.retain_as_published = true;
    rap.retain_handling = RetainHandling::Never;
    let s3 = connect(&mut r, "s3", true, 0);
    r.subscribe(s3, "dev/#", rap, 0).unwrap();
    let mut again = msg("dev/1/status", "offline", QoS::AtLeastOnce);
    again.retain = true;
    r.publish(Some(p), again, 0).unwrap();
    assert!(!publishes(&drain(&mut r, s2, 0))[0].retain);
    assert!(publishes(&drain(&mut r, s3, 0))[0].retain);
    // An empty retained payload clears the topic.
    let mut clear = msg("dev/1/status", "", QoS::AtMostOnce);
    clear.retain = true;
    r.publish(Some(p), clear, 0).unwrap();
    assert_eq!(r.stats().retained_messages, 0);
}

#[test]
fn a_persistent_session_keeps_its_queue_while_offline() {
    let mut r = Router::new(Limits::default());
    let dev = connect(&mut r, "dev", false, NEVER_EXPIRES);
    r.subscribe(dev, "cmd", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.disconnect(dev, DROP, 0).unwrap();
    assert_eq!(r.stats().sessions_offline, 1);
    let ctl = connect(&mut r, "ctl", true, 0);
    r.publish(Some(ctl), msg("cmd", "qos1", QoS::AtLeastOnce), 0).unwrap();
    r.publish(Some(ctl), msg("cmd", "qos0", QoS::AtMostOnce), 0).unwrap();
    assert_eq!(r.queued("dev"), Some((1, 7)));
    assert_eq!(r.stats().drops(DropReason::OfflineQos0), 1);
    assert_eq!(r.poll_transmit(dev, 0), None, "the old connection is stale");

    let back = connect_with(&mut r, "dev", false, NEVER_EXPIRES, 10, None);
    assert!(back.session_present);
    assert!(r.take_ready().contains(&back.conn));
    let out = drain(&mut r, back.conn, 0);
    assert_eq!(publishes(&out).len(), 1);
    assert_eq!(&*publishes(&out)[0].message.payload, b"qos1");
    // Its subscriptions came back with it.
    r.publish(Some(ctl), msg("cmd", "live", QoS::AtLeastOnce), 0).unwrap();
    assert_eq!(publishes(&drain(&mut r, back.conn, 0)).len(), 1);
}

#[test]
fn clean_start_discards_the_old_session_and_counts_what_it_held() {
    let mut r = Router::new(Limits::default());
    let dev = connect(&mut r, "dev", false, NEVER_EXPIRES);
    r.subscribe(dev, "cmd", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.disconnect(dev, CLEAN, 0).unwrap();
    r.publish(None, msg("cmd", "x", QoS::AtLeastOnce), 0).unwrap();
    let fresh = connect_with(&mut r, "dev", true, 0, 10, None);
    assert!(!fresh.session_present);
    assert_eq!(r.stats().drops(DropReason::SessionEnded), 1);
    assert_eq!(r.publish(None, msg("cmd", "y", QoS::AtLeastOnce), 0).unwrap(), 0, "no subscription survives");
    assert_eq!(r.stats().subscriptions, 0);
}

#[test]
fn unacknowledged_deliveries_are_resent_with_dup_after_reconnect() {
    let mut r = Router::new(Limits::default());
    let dev = connect(&mut r, "dev", false, NEVER_EXPIRES);
    r.subscribe(dev, "a", SubOptions::qos(QoS::ExactlyOnce), 0).unwrap();
    r.publish(None, msg("a", "one", QoS::AtLeastOnce), 0).unwrap();
    r.publish(None, msg("a", "two", QoS::ExactlyOnce), 0).unwrap();
    r.publish(None, msg("a", "three", QoS::ExactlyOnce), 0).unwrap();
    let first = drain(&mut r, dev, 0);
    let ids: Vec<u16> = publishes(&first).iter().map(|d| d.pkid).collect();
    assert!(publishes(&first).iter().all(|d| !d.dup));
    // "two" reaches PUBREC (so its PUBREL is what is owed), the rest nothing.
    assert_eq!(r.pubrec(dev, ids[1], true).unwrap(), Ack::Done);
    r.disconnect(dev, DROP, 0).unwrap();

    let back = connect(&mut r, "dev", false, NEVER_EXPIRES);
    let again = drain(&mut r, back, 0);
    assert_eq!(
        again,
        vec![
            Outgoing::Publish(Delivery { dup: true, ..publishes(&first)[0].clone() }),
            Outgoing::PubRel(ids[1]),
            Outgoing::Publish(Delivery { dup: true, ..publishes(&first)[2].clone() }),
        ]
    );
    assert_eq!(r.puback(back, ids[0]).unwrap(), Ack::Done);
    assert_eq!(r.pubcomp(back, ids[1]).unwrap(), Ack::Done);
    assert_eq!(r.pubrec(back, ids[2], true).unwrap(), Ack::Done);
    assert_eq!(r.pubcomp(back, ids[2]).unwrap(), Ack::Done);
    assert_eq!(r.inflight("dev"), Some(0));
    assert_eq!(r.stats().inflight_messages, 0);
}

#[test]
fn acknowledgements_for_unknown_packet_ids_are_reported_not_fatal() {
    let mut r = Router::new(Limits::default());
    let c = connect(&mut r, "c", true, 0);
    r.subscribe(c, "a", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.publish(None, msg("a", "x", QoS::AtLeastOnce), 0).unwrap();
    let pkid = publishes(&drain(&mut r, c, 0))[0].pkid;
    assert_eq!(r.puback(c, 999).unwrap(), Ack::Unknown);
    assert_eq!(r.pubrec(c, pkid, true).unwrap(), Ack::Unknown, "PUBREC for a QoS 1 delivery");
    assert_eq!(r.pubcomp(c, pkid).unwrap(), Ack::Unknown);
    assert!(!r.release_qos2(c, 5).unwrap(), "PUBREL nobody sent a PUBLISH for");
    assert_eq!(r.puback(c, pkid).unwrap(), Ack::Done);
    assert_eq!(r.puback(c, pkid).unwrap(), Ack::Unknown, "a second PUBACK");
    assert!(r.is_current(c));
}

#[test]
fn the_inflight_window_is_the_clients_receive_maximum() {
    let mut r = Router::new(Limits { max_inflight: 50, ..Limits::default() });
    let c = connect_with(&mut r, "c", true, 0, 2, None).conn;
    r.subscribe(c, "a", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    for i in 0..5 {
        r.publish(None, msg("a", &i.to_string(), QoS::AtLeastOnce), 0).unwrap();
    }
    let out = drain(&mut r, c, 0);
    assert_eq!(publishes(&out).len(), 2);
    assert_eq!(r.queued("c"), Some((3, 6)));
    r.take_ready();
    r.puback(c, publishes(&out)[0].pkid).unwrap();
    assert_eq!(r.take_ready(), vec![c], "an ack that frees the window wakes the connection");
    assert_eq!(publishes(&drain(&mut r, c, 0)).len(), 1);
    // The configured cap bounds a client that asks for more.
    let big = connect_with(&mut r, "big", true, 0, u16::MAX, None).conn;
    r.subscribe(big, "b", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    for _ in 0..60 {
        r.publish(None, msg("b", "x", QoS::AtLeastOnce), 0).unwrap();
    }
    assert_eq!(publishes(&drain(&mut r, big, 0)).len(), 50);
}

#[test]
fn packet_ids_are_never_reused_while_in_flight() {
    let mut r = Router::new(Limits { max_inflight: 10, ..Limits::default() });
    let c = connect(&mut r, "c", true, 0);
    r.subscribe(c, "a", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    let mut held = Vec::new();
    for round in 0..20_000u32 {
        r.publish(None, msg("a", "x", QoS::AtLeastOnce), 0).unwrap();
        for d in publishes(&drain(&mut r, c, 0)) {
            assert!(d.pkid != 0 && !held.contains(&d.pkid), "pkid {} reused", d.pkid);
            held.push(d.pkid);
        }
        // Keep one id held for ever and ack the rest as they come.
        while held.len() > 1 + (round as usize % 5) {
            let pkid = held.remove(1);
            assert_eq!(r.puback(c, pkid).unwrap(), Ack::Done);
        }
    }
}

#[test]
fn a_full_queue_drops_qos0_first_then_the_oldest_and_counts_every_drop() {
    let limits = Limits { max_queued_messages: 3, max_inflight: 1, drop_log_interval_ms: 1000, ..Limits::default() };
    let mut r = Router::new(limits);
    let dev = connect(&mut r, "dev", true, 0);
    r.subscribe(dev, "cmd", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.publish(None, msg("cmd", "genuine", QoS::AtLeastOnce), 0).unwrap();
    let first = drain(&mut r, dev, 0);
    assert_eq!(publishes(&first).len(), 1, "one in flight, unacknowledged: the device lags");
    r.publish(None, msg("cmd", "q0-a", QoS::AtMostOnce), 0).unwrap();
    r.publish(None, msg("cmd", "old", QoS::AtLeastOnce), 0).unwrap();
    r.publish(None, msg("cmd", "q0-b", QoS::AtMostOnce), 0).unwrap();
    // Full (3). A QoS 1 arrival pushes out the oldest QoS 0 first…
    r.publish(None, msg("cmd", "n1", QoS::AtLeastOnce), 0).unwrap();
    assert_eq!(r.stats().drops(DropReason::QueueFullQos0), 1);
    // …a QoS 0 arrival is itself dropped…
    r.publish(None, msg("cmd", "q0-c", QoS::AtMostOnce), 0).unwrap();
    assert_eq!(r.stats().drops(DropReason::QueueFullQos0), 2);
    // …and with only QoS 1 left, the oldest goes, counted.
    r.publish(None, msg("cmd", "n2", QoS::AtLeastOnce), 0).unwrap();
    r.publish(None, msg("cmd", "n3", QoS::AtLeastOnce), 0).unwrap();
    assert_eq!(r.stats().drops(DropReason::QueueFullQos0), 3);
    assert_eq!(r.stats().drops(DropReason::QueueFullOldest), 1);
    assert_eq!(r.stats().queued_messages, 3);
    // One log line for the burst, then at most one per interval.
    let events = r.take_events();
    assert_eq!(events, vec![Event::Dropped { client_id: "dev".into(), reason: DropReason::QueueFullQos0, count: 1 }]);
    assert_eq!(r.tick(500), Some(1000));
    assert!(r.take_events().is_empty());
    r.tick(1000);
    assert_eq!(
        r.take_events(),
        vec![Event::Dropped { client_id: "dev".into(), reason: DropReason::QueueFullOldest, count: 3 }]
    );
    // What is left is what was not counted: in order, nothing skipped.
    r.puback(dev, publishes(&first)[0].pkid).unwrap();
    let mut got = Vec::new();
    loop {
        let out = drain(&mut r, dev, 0);
        let Some(d) = publishes(&out).first().map(|d| (*d).clone()) else { break };
        got.push(String::from_utf8(d.message.payload.to_vec()).unwrap());
        r.puback(dev, d.pkid).unwrap();
    }
    assert_eq!(got, ["n1", "n2", "n3"]);
}

#[test]
fn the_byte_bound_holds_and_an_oversized_message_is_counted() {
    let limits = Limits { max_queued_bytes: 100, max_inflight: 1, ..Limits::default() };
    let mut r = Router::new(limits);
    let c = connect(&mut r, "c", true, 0);
    r.subscribe(c, "t", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.publish(None, msg("t", &"x".repeat(200), QoS::AtLeastOnce), 0).unwrap();
    assert_eq!(r.stats().drops(DropReason::TooLargeForQueue), 1);
    for _ in 0..10 {
        r.publish(None, msg("t", &"y".repeat(39), QoS::AtLeastOnce), 0).unwrap();
    }
    let (n, bytes) = r.queued("c").unwrap();
    assert!(bytes <= 100 && n == 2, "{n} messages, {bytes} bytes");
    assert_eq!(r.stats().drops(DropReason::QueueFullOldest), 8);
}

#[test]
fn a_subscriber_that_never_reads_is_bounded_and_others_are_unaffected() {
    let limits = Limits { max_queued_messages: 1000, max_queued_bytes: 1 << 20, ..Limits::default() };
    let mut r = Router::new(limits);
    let stuck = connect(&mut r, "stuck", true, 0);
    let fine = connect(&mut r, "fine", true, 0);
    r.subscribe(stuck, "load", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.subscribe(fine, "load", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    let mut received = 0;
    for i in 0..100_000u32 {
        r.publish(None, msg("load", &format!("{i:0>256}"), QoS::AtLeastOnce), 0).unwrap();
        for d in publishes(&drain(&mut r, fine, 0)) {
            r.puback(fine, d.pkid).unwrap();
            received += 1;
        }
    }
    assert_eq!(received, 100_000);
    let (n, bytes) = r.queued("stuck").unwrap();
    assert!(n <= 1000 && bytes <= 1 << 20);
    let drops = r.stats().drops(DropReason::QueueFullOldest);
    assert_eq!(drops + n as u64 + r.inflight("stuck").unwrap() as u64, 100_000);
}

#[test]
fn expired_messages_are_not_delivered_and_the_rest_carry_their_remaining_time() {
    let mut r = Router::new(Limits::default());
    let c = connect(&mut r, "c", false, NEVER_EXPIRES);
    r.subscribe(c, "t", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.disconnect(c, DROP, 0).unwrap();
    let mut short = msg("t", "short", QoS::AtLeastOnce);
    short.expires_at = Some(5_000);
    let mut long = msg("t", "long", QoS::AtLeastOnce);
    long.expires_at = Some(60_000);
    r.publish(None, short, 0).unwrap();
    r.publish(None, long, 0).unwrap();
    let c = connect(&mut r, "c", false, NEVER_EXPIRES);
    let out = drain(&mut r, c, 10_000);
    let d = publishes(&out);
    assert_eq!(d.len(), 1);
    assert_eq!(&*d[0].message.payload, b"long");
    assert_eq!(d[0].message.expiry_left_secs(10_000), Some(50));
    assert_eq!(r.stats().drops(DropReason::Expired), 1);
    // Already expired on arrival: not routed, counted.
    let mut dead = msg("t", "dead", QoS::AtLeastOnce);
    dead.expires_at = Some(1);
    assert_eq!(r.publish(None, dead, 2).unwrap(), 0);
    assert_eq!(r.stats().drops(DropReason::Expired), 2);
}

#[test]
fn sessions_expire_and_take_their_subscriptions_with_them() {
    let mut r = Router::new(Limits::default());
    let c = connect(&mut r, "c", false, 10);
    r.subscribe(c, "t", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.disconnect(c, DROP, 1_000).unwrap();
    r.publish(None, msg("t", "x", QoS::AtLeastOnce), 2_000).unwrap();
    assert_eq!(r.tick(5_000), Some(11_000));
    assert!(r.has_session("c"));
    assert_eq!(r.tick(11_000), None);
    assert!(!r.has_session("c"));
    assert_eq!(r.take_events(), vec![Event::SessionExpired { client_id: "c".into(), lost: 1 }]);
    assert_eq!(r.stats().drops(DropReason::SessionEnded), 1);
    assert_eq!((r.stats().sessions_offline, r.stats().subscriptions), (0, 0));
    // Reconnecting in time keeps it.
    let c = connect(&mut r, "c", false, 10);
    r.disconnect(c, DROP, 0).unwrap();
    let back = connect_with(&mut r, "c", false, 10, 10, None);
    assert!(back.session_present);
    r.tick(20_000);
    assert!(r.has_session("c"));
    // A v5 DISCONNECT can shorten it to 0: the session ends at once.
    r.disconnect(back.conn, Disconnect { publish_will: false, session_expiry_secs: Some(0) }, 0).unwrap();
    assert!(!r.has_session("c"));
}

fn will(topic: &str, delay: u32) -> Option<Will> {
    Some(Will {
        message: Message::new(topic, &b"gone"[..], QoS::ExactlyOnce, false),
        delay_secs: delay,
        expiry_secs: None,
    })
}

#[test]
fn wills_at_every_qos_on_a_lost_connection_but_not_a_clean_disconnect() {
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let mut r = Router::new(Limits::default());
        let watcher = connect(&mut r, "w", true, 0);
        r.subscribe(watcher, "lwt", SubOptions::qos(QoS::ExactlyOnce), 0).unwrap();
        let mut w = will("lwt", 0);
        if let Some(w) = w.as_mut() {
            w.message.qos = qos;
        }
        let dev = connect_with(&mut r, "dev", true, 0, 10, w).conn;
        r.disconnect(dev, DROP, 0).unwrap();
        let out = drain(&mut r, watcher, 0);
        assert_eq!(publishes(&out).len(), 1);
        assert_eq!(publishes(&out)[0].qos, qos);
        let dev = connect_with(&mut r, "dev", true, 0, 10, will("lwt", 0)).conn;
        r.disconnect(dev, CLEAN, 0).unwrap();
        assert!(drain(&mut r, watcher, 0).is_empty());
    }
}

#[test]
fn will_delay_waits_and_a_reconnect_cancels_it() {
    let mut r = Router::new(Limits::default());
    let watcher = connect(&mut r, "w", true, 0);
    r.subscribe(watcher, "lwt", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    let dev = connect_with(&mut r, "dev", false, 3600, 10, will("lwt", 5)).conn;
    r.disconnect(dev, DROP, 0).unwrap();
    assert_eq!(r.tick(4_999), Some(5_000));
    assert!(drain(&mut r, watcher, 4_999).is_empty());
    r.tick(5_000);
    assert_eq!(publishes(&drain(&mut r, watcher, 5_000)).len(), 1);
    // Back within the delay: no will.
    let dev = connect_with(&mut r, "dev", false, 3600, 10, will("lwt", 5)).conn;
    r.disconnect(dev, DROP, 10_000).unwrap();
    connect_with(&mut r, "dev", false, 3600, 10, None);
    r.tick(20_000);
    assert!(drain(&mut r, watcher, 20_000).is_empty());
    // A session that ends before the delay publishes its will then.
    let dev2 = connect_with(&mut r, "dev2", false, 2, 10, will("lwt", 60)).conn;
    r.disconnect(dev2, DROP, 0).unwrap();
    assert_eq!(r.tick(1_000), Some(2_000));
    r.tick(2_000);
    assert_eq!(publishes(&drain(&mut r, watcher, 2_000)).len(), 1);
    assert!(!r.has_session("dev2"));
}

#[test]
fn shared_subscriptions_spread_over_online_members() {
    let mut r = Router::new(Limits::default());
    let workers: Vec<Conn> = (0..3).map(|i| connect(&mut r, &format!("w{i}"), false, NEVER_EXPIRES)).collect();
    for w in &workers {
        r.subscribe(*w, "$share/g/jobs/+", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    }
    r.disconnect(workers[1], DROP, 0).unwrap();
    for i in 0..10 {
        assert_eq!(r.publish(None, msg(&format!("jobs/{i}"), "j", QoS::AtLeastOnce), 0).unwrap(), 1);
    }
    let a = publishes(&drain(&mut r, workers[0], 0)).len();
    let c = publishes(&drain(&mut r, workers[2], 0)).len();
    assert_eq!((a, c), (5, 5));
    assert_eq!(r.queued("w1"), Some((0, 0)), "the offline member got nothing while others were online");
    // Retained messages are not sent to shared subscriptions.
    let mut keep = msg("jobs/r", "r", QoS::AtLeastOnce);
    keep.retain = true;
    r.publish(None, keep, 0).unwrap();
    drain(&mut r, workers[0], 0);
    drain(&mut r, workers[2], 0);
    let late = connect(&mut r, "late", true, 0);
    r.subscribe(late, "$share/g/jobs/+", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    assert!(drain(&mut r, late, 0).is_empty());
}

#[test]
fn a_takeover_makes_the_old_connection_stale() {
    let mut r = Router::new(Limits::default());
    let old = connect(&mut r, "dev", false, NEVER_EXPIRES);
    r.subscribe(old, "cmd", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    let new = connect_with(&mut r, "dev", false, NEVER_EXPIRES, 10, None);
    assert_eq!(new.taken_over, Some(old));
    assert!(new.session_present);
    assert_eq!(r.subscribe(old, "x", SubOptions::qos(QoS::AtMostOnce), 0), Err(Stale));
    assert_eq!(r.disconnect(old, DROP, 0), Err(Stale));
    assert!(r.is_current(new.conn));
    assert_eq!(r.stats().sessions_online, 1);
    assert_eq!(r.publish(None, msg("cmd", "x", QoS::AtLeastOnce), 0).unwrap(), 1);
}

#[test]
fn qos2_from_a_client_is_routed_once() {
    let mut r = Router::new(Limits { max_incoming_qos2: 2, ..Limits::default() });
    let c = connect(&mut r, "c", true, 0);
    assert_eq!(r.receive_qos2(c, 1).unwrap(), Received::Fresh);
    assert_eq!(r.receive_qos2(c, 1).unwrap(), Received::Duplicate);
    assert_eq!(r.receive_qos2(c, 2).unwrap(), Received::Fresh);
    assert_eq!(r.receive_qos2(c, 3).unwrap(), Received::TooMany);
    assert!(r.release_qos2(c, 1).unwrap());
    assert!(!r.release_qos2(c, 1).unwrap());
    assert_eq!(r.receive_qos2(c, 1).unwrap(), Received::Fresh, "the id may be reused after PUBREL");
}

#[test]
fn routing_to_one_device_among_many_touches_one_session() {
    let mut r = Router::new(Limits::default());
    let devices: Vec<Conn> = (0..10_000).map(|i| connect(&mut r, &format!("d{i}"), true, 0)).collect();
    for (i, d) in devices.iter().enumerate() {
        r.subscribe(*d, &format!("mqseal/v1/dev/d{i}/cmd"), SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    }
    let ctl = connect(&mut r, "ctl", true, 0);
    r.subscribe(ctl, "mqseal/v1/dev/+/resp", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.take_ready();
    assert_eq!(r.publish(None, msg("mqseal/v1/dev/d7777/cmd", "c", QoS::AtLeastOnce), 0).unwrap(), 1);
    assert_eq!(r.take_ready(), vec![devices[7777]]);
    assert_eq!(r.publish(Some(devices[5]), msg("mqseal/v1/dev/d5/resp", "r", QoS::AtLeastOnce), 0).unwrap(), 1);
    assert_eq!(r.take_ready(), vec![ctl]);
    assert_eq!(r.stats().subscriptions, 10_001);
}

#[test]
fn a_reconnect_with_a_smaller_receive_maximum_resends_no_more_than_it_allows() {
    let mut r = Router::new(Limits::default());
    let c = connect_with(&mut r, "c", false, 3600, 10, None).conn;
    r.subscribe(c, "t", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    for i in 0..6 {
        r.publish(None, msg("t", &i.to_string(), QoS::AtLeastOnce), 0).unwrap();
    }
    assert_eq!(publishes(&drain(&mut r, c, 0)).len(), 6);
    r.disconnect(c, DROP, 0).unwrap();
    let back = connect_with(&mut r, "c", false, 3600, 2, None).conn;
    let again = drain(&mut r, back, 0);
    assert_eq!(publishes(&again).len(), 2, "two of six resent under Receive Maximum 2");
    r.puback(back, publishes(&again)[0].pkid).unwrap();
    let next = drain(&mut r, back, 0);
    assert_eq!(publishes(&next).len(), 1);
    assert!(publishes(&next)[0].dup);
}

#[test]
fn a_session_resumed_after_a_lost_connection_is_woken_for_what_it_holds() {
    let mut r = Router::new(Limits::default());
    let c = connect(&mut r, "c", false, 3600);
    r.subscribe(c, "t", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap();
    r.publish(None, msg("t", "x", QoS::AtLeastOnce), 0).unwrap();
    // Marked ready, never pulled: the connection went first.
    assert_eq!(r.take_ready(), vec![c]);
    r.disconnect(c, DROP, 0).unwrap();
    let back = connect(&mut r, "c", false, 3600);
    assert_eq!(r.take_ready(), vec![back], "the new connection is told, whatever the old one was");
    r.publish(None, msg("t", "y", QoS::AtLeastOnce), 0).unwrap();
    assert_eq!(publishes(&drain(&mut r, back, 0)).len(), 2);
}

#[test]
fn timers_of_a_resumed_or_ended_session_do_not_pile_up() {
    let mut r = Router::new(Limits::default());
    for _ in 0..100 {
        let c = connect_with(&mut r, "c", false, 3600, 10, will("lwt", 600)).conn;
        r.disconnect(c, DROP, 0).unwrap();
    }
    assert_eq!(r.timers_pending(), 2, "one will and one expiry timer, not one pair per disconnect");
    let c = connect(&mut r, "c", true, 0);
    r.disconnect(c, CLEAN, 0).unwrap();
    assert_eq!(r.timers_pending(), 0);
}

#[test]
fn a_pubrec_before_the_resend_owes_one_pubrel_not_two() {
    let mut r = Router::new(Limits::default());
    let c = connect(&mut r, "c", false, 3600);
    r.subscribe(c, "t", SubOptions::qos(QoS::ExactlyOnce), 0).unwrap();
    r.publish(None, msg("t", "x", QoS::ExactlyOnce), 0).unwrap();
    let pkid = publishes(&drain(&mut r, c, 0))[0].pkid;
    r.disconnect(c, DROP, 0).unwrap();
    let back = connect(&mut r, "c", false, 3600);
    // The client answers the old delivery before the resend goes out; the
    // caller writes that PUBREL, so nothing more is owed.
    assert_eq!(r.pubrec(back, pkid, true).unwrap(), Ack::Done);
    assert!(drain(&mut r, back, 0).is_empty());
    assert_eq!(r.pubcomp(back, pkid).unwrap(), Ack::Done);
}

#[test]
fn a_session_holds_at_most_its_subscription_quota() {
    let mut r = Router::new(Limits { max_subscriptions: 3, ..Limits::default() });
    let c = connect(&mut r, "c", true, 0);
    for g in 0..3 {
        assert_eq!(
            r.subscribe(c, &format!("$share/{g}/t"), SubOptions::qos(QoS::AtMostOnce), 0).unwrap(),
            Subscribed::New
        );
    }
    assert_eq!(r.subscribe(c, "$share/3/t", SubOptions::qos(QoS::AtMostOnce), 0).unwrap(), Subscribed::QuotaExceeded);
    assert_eq!(r.subscribe(c, "$share/0/t", SubOptions::qos(QoS::AtLeastOnce), 0).unwrap(), Subscribed::Replaced);
    assert_eq!(r.stats().subscriptions, 3);
}
