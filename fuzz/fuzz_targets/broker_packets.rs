//! The broker on arbitrary client bytes, through the code a connection
//! runs: framing (`next_frame`, with the size limit), the first packet
//! through `login::parse_connect` (level, flags, body) and the login's
//! synchronous checks (client id, user name, will topic against the ACL),
//! then every later packet decoded and handed to the per-packet policy
//! (`policy::Client::on_packet`) with a real router core behind it, and the
//! router's deliveries written back (`Client::pull`). A second session
//! subscribed to everything makes publishes route and queue. The router
//! journals for persistence, as the broker's does, and every change it
//! hands out goes through the store's record encoding and back
//! (`persist::records`), which must give back what went in. The first
//! byte picks the principal's role and how the stream is cut into reads.
//!
//! Nothing in that path may panic, and nothing here catches one.
#![no_main]

use std::net::SocketAddr;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqseal_broker::acl::{Acl, Principal, default_rules};
use mqseal_broker::codec::{self, decode};
use mqseal_broker::login::{self, valid_client_id};
use mqseal_broker::metrics::Metrics;
use mqseal_broker::persist::records;
use mqseal_broker::policy::{Client, Context};
use mqseal_router::{ConnectRequest, Limits, QoS, Router, SubOptions};
use mqseal_store::{Role, validate_username};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else { return };
    let (username, role, grants) = match selector % 3 {
        0 => ("dev-1", Role::Device, vec![]),
        1 => ("ops", Role::Controller, vec!["dev-1".to_owned(), "dev-2".to_owned()]),
        _ => ("fleet", Role::Controller, vec!["*".to_owned()]),
    };
    let who = Principal { username: username.into(), client_id: username.into(), role, grants };
    let Ok(acl) = Acl::new(&default_rules()) else { return };
    let metrics = Metrics::default();
    let ctx = Context { acl: &acl, metrics: &metrics };
    // Small bounds, so that queues fill and the drop paths run.
    let limits = Limits {
        max_queued_messages: 8,
        max_queued_bytes: 4096,
        max_inflight: 4,
        max_incoming_qos2: 4,
        ..Limits::default()
    };
    let mut router = Router::new(limits.clone());
    router.enable_journal();
    let watcher = router
        .connect(
            ConnectRequest {
                client_id: "watcher".into(),
                clean_start: false,
                session_expiry_secs: 60,
                receive_maximum: 2,
                will: None,
            },
            0,
        )
        .conn;
    for f in ["#", "$share/g/#"] {
        let _ = router.subscribe(watcher, f, SubOptions::qos(QoS::ExactlyOnce), 0);
    }
    let peer = SocketAddr::from(([127, 0, 0, 1], 1));
    // Reads of 1..=31 bytes, or everything at once.
    let cut = match usize::from(selector >> 3) {
        0 => stream.len().max(1),
        n => n,
    };
    let mut now = 1_000;
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut client: Option<Client> = None;
    for piece in stream.chunks(cut) {
        buf.extend_from_slice(piece);
        loop {
            let frame = match codec::next_frame(&mut buf, 64 * 1024) {
                Err(_) | Ok(None) => break,
                Ok(Some(frame)) => frame,
            };
            now += 250;
            let Some(c) = client.as_mut() else {
                let Ok(connect) = login::parse_connect(&frame) else { return };
                if !valid_client_id(&connect.client_id)
                    || connect.username.as_deref().is_some_and(|u| validate_username(u).is_err())
                {
                    return;
                }
                if let Some(w) = &connect.will
                    && !(mqseal_router::topic::valid_topic_name(&w.topic) && acl.can_publish(&who, &w.topic))
                {
                    return;
                }
                let (request, _) = login::router_request(&connect, &who, &limits);
                let conn = router.connect(request, now).conn;
                client = Some(Client::new(connect.version, peer, who.clone(), conn));
                continue;
            };
            let ended = match decode::packet(&frame, c.version) {
                Err(_) => true,
                Ok(packet) => c.on_packet(&ctx, &mut router, now, packet, &mut out).is_some(),
            };
            c.pull(&ctx, &mut router, now, &mut out);
            let _ = router.poll_transmit(watcher, now);
            router.tick(now);
            round_trip(&mut router);
            out.clear();
            if ended {
                let _ = router.disconnect(c.conn, mqseal_broker::policy::End::Lost.disconnect(), now);
                router.tick(now + 3_600_000);
                round_trip(&mut router);
                return;
            }
        }
    }
});

/// Every record the journal hands out decodes to what was encoded.
fn round_trip(router: &mut Router) {
    let Some(changes) = router.take_changes() else { return };
    for state in &changes.sessions {
        let back = records::decode_session(&state.client_id, &records::encode_session(state));
        assert_eq!(back.ok().as_ref(), Some(state));
    }
    for item in changes.items.iter().filter_map(|(_, _, i)| i.as_ref()) {
        assert_eq!(records::decode_item(&records::encode_item(item)).ok().as_ref(), Some(item));
    }
    for m in changes.retained.iter().filter_map(|(_, m)| m.as_deref()) {
        assert_eq!(records::decode_message(&records::encode_message(m)).ok().as_ref(), Some(m));
    }
}
