//! The broker's front on arbitrary client bytes, packet by packet as its
//! session does: framing (`next_frame`, with the size limit), the first
//! packet as CONNECT (protocol level, rumqttd's decoder, client id, user
//! name, will topic against the ACL), then PUBLISH (QoS and packet id from
//! the raw bytes, topic validity, the ACL), SUBSCRIBE (every filter's
//! validity and the ACL), acks and DISCONNECT. The first byte picks the
//! protocol version, the principal's role and how the stream is cut into
//! reads.
//!
//! The front runs rumqttd's decoder under `catch_unwind` and closes the
//! connection when it panics (rumqttd has client-reachable panics:
//! docs/RUMQTTD.md); this target does the same, so only a
//! panic in mqseal's own code is a crash.
#![no_main]

use std::cell::Cell;
use std::sync::Once;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqseal_broker::acl::{Acl, Principal, default_rules, shared_inner, valid_filter, valid_topic_name};
use mqseal_broker::codec::{self, Frame, Version, kind};
use mqseal_broker::session::valid_client_id;
use mqseal_store::{Role, validate_username};
use rumqttd::protocol::Packet;

thread_local! {
    static IN_CODEC: Cell<bool> = const { Cell::new(false) };
}

/// libfuzzer-sys aborts on every panic from its hook; panics inside
/// rumqttd's decoder must instead unwind to the front's `catch_unwind`.
fn contain_codec_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_CODEC.with(Cell::get) {
                abort(info);
            }
        }));
    });
}

fn decode(version: Version, frame: Frame) -> Option<Packet> {
    IN_CODEC.with(|c| c.set(true));
    let packet = codec::decode(version, frame);
    IN_CODEC.with(|c| c.set(false));
    packet.ok()
}

/// One frame through the checks the session makes; `false` ends the
/// connection.
fn handle(frame: Frame, version: Version, connected: &mut bool, who: &Principal, acl: &Acl) -> bool {
    let k = frame.kind();
    if !*connected {
        *connected = true;
        if k != kind::CONNECT || codec::connect_level(&frame).is_none() {
            return false;
        }
        let Some(Packet::Connect(connect, _, will, _, login)) = decode(version, frame) else { return false };
        let _ = valid_client_id(&connect.client_id);
        if let Some(login) = login {
            let _ = validate_username(&login.username);
        }
        if let Some(will) = will
            && let Ok(t) = std::str::from_utf8(&will.topic)
            && valid_topic_name(t)
        {
            let _ = acl.can_publish(who, t);
        }
        return true;
    }
    match k {
        kind::PUBLISH => {
            if codec::publish_qos_pkid(&frame).is_none() {
                return false;
            }
            let Some(Packet::Publish(p, _)) = decode(version, frame) else { return false };
            let Ok(t) = std::str::from_utf8(&p.topic) else { return false };
            valid_topic_name(t) && {
                let _ = acl.can_publish(who, t);
                true
            }
        }
        kind::SUBSCRIBE | kind::UNSUBSCRIBE => match decode(version, frame) {
            Some(Packet::Subscribe(s, _)) => {
                for f in &s.filters {
                    let _ = shared_inner(&f.path);
                    if valid_filter(&f.path) {
                        let _ = acl.can_subscribe(who, &f.path);
                    }
                }
                true
            }
            Some(_) => true,
            None => false,
        },
        kind::PUBACK | kind::PUBREC | kind::PUBREL | kind::PUBCOMP => codec::ack_pkid(&frame).is_some(),
        kind::DISCONNECT => {
            let _ = codec::disconnect_reason(&frame);
            false
        }
        _ => decode(version, frame).is_some(),
    }
}

fuzz_target!(|data: &[u8]| {
    contain_codec_panics();
    let Some((&selector, stream)) = data.split_first() else { return };
    let version = if selector & 1 == 0 { Version::V4 } else { Version::V5 };
    let (username, role, grants) = match (selector >> 1) % 3 {
        0 => ("dev-1", Role::Device, vec![]),
        1 => ("ops", Role::Controller, vec!["dev-1".to_owned(), "dev-2".to_owned()]),
        _ => ("fleet", Role::Controller, vec!["*".to_owned()]),
    };
    let who = Principal { username: username.into(), client_id: username.into(), role, grants };
    let Ok(acl) = Acl::new(&default_rules()) else { return };
    // Reads of 1..=31 bytes, or everything at once.
    let cut = match usize::from(selector >> 3) {
        0 => stream.len().max(1),
        n => n,
    };
    let mut buf = BytesMut::new();
    let mut connected = false;
    for piece in stream.chunks(cut) {
        buf.extend_from_slice(piece);
        loop {
            match codec::next_frame(&mut buf, 64 * 1024) {
                Err(_) => return,
                Ok(None) => break,
                Ok(Some(frame)) => {
                    if !handle(frame, version, &mut connected, &who, &acl) {
                        return;
                    }
                }
            }
        }
    }
});
