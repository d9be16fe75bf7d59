//! Packets the broker writes, for either protocol version.
//!
//! A 3.1.1 client never receives a property or a reason code it cannot
//! parse: each writer takes the version and leaves out what 3.1.1 lacks.

use bytes::{BufMut, BytesMut};
use mqseal_router::{Delivery, Millis, QoS};

use super::decode::id::{
    CONTENT_TYPE, CORRELATION_DATA, MESSAGE_EXPIRY, PAYLOAD_FORMAT, REASON_STRING, RESPONSE_TOPIC, SESSION_EXPIRY,
    SUBSCRIPTION_ID, USER_PROPERTY,
};
use super::{Version, kind};

/// Property ids only the broker sends (MQTT 5 §2.2.2.2).
const ASSIGNED_CLIENT_ID: u8 = 0x12;
const RECEIVE_MAXIMUM: u8 = 0x21;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const MAX_PACKET_SIZE: u8 = 0x27;

fn varint_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

/// A string field; callers pass strings the broker validated (≤ 65,535
/// bytes), and a longer one is cut at the limit rather than mis-framed.
fn put_str(out: &mut BytesMut, s: &str) {
    put_bin(out, s.as_bytes());
}

fn put_bin(out: &mut BytesMut, b: &[u8]) {
    let b = b.get(..usize::from(u16::MAX)).unwrap_or(b);
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

fn put_str_prop(props: &mut BytesMut, id: u8, value: &str) {
    props.put_u8(id);
    put_str(props, value);
}

/// Writes a fixed header, a property block and the rest.
fn put_packet(out: &mut BytesMut, header: u8, head: &[u8], props: Option<&[u8]>, tail: &[u8]) {
    let props_len = props.map_or(0, |p| varint_len(p.len()) + p.len());
    out.put_u8(header);
    put_varint(out, head.len() + props_len + tail.len());
    out.put_slice(head);
    if let Some(p) = props {
        put_varint(out, p.len());
        out.put_slice(p);
    }
    out.put_slice(tail);
}

/// What the broker tells a v5 client about itself in CONNACK.
#[derive(Debug, Default)]
pub struct ConnAckInfo {
    /// Largest packet the broker accepts.
    pub max_packet_size: u32,
    /// Unreleased QoS 2 publishes the client may have (Receive Maximum).
    pub receive_maximum: u16,
    /// The Session Expiry Interval in force, when it differs from what the
    /// client asked for (MQTT-3.2.2-?: the server says what it uses).
    pub session_expiry_secs: Option<u32>,
    /// Id assigned to a client that sent an empty one.
    pub assigned_client_id: Option<String>,
    /// Human-readable reason for a refusal.
    pub reason: Option<&'static str>,
}

/// CONNACK. `code` is the v5 reason code or the 3.1.1 return code, already
/// chosen for `version` by the caller.
pub fn connack(version: Version, session_present: bool, code: u8, info: &ConnAckInfo, out: &mut BytesMut) {
    let head = [u8::from(session_present && code == 0), code];
    if version == Version::V4 {
        put_packet(out, 0x20, &head, None, &[]);
        return;
    }
    let mut props = BytesMut::new();
    if code == 0 {
        // Maximum Packet Size: a client must not send more.
        props.put_u8(MAX_PACKET_SIZE);
        props.put_u32(info.max_packet_size);
        // Topic Alias Maximum 0: the ACL needs the real topic name of
        // every PUBLISH, so client aliases are not accepted.
        props.put_u8(TOPIC_ALIAS_MAXIMUM);
        props.put_u16(0);
        if info.receive_maximum > 0 {
            props.put_u8(RECEIVE_MAXIMUM);
            props.put_u16(info.receive_maximum);
        }
        if let Some(secs) = info.session_expiry_secs {
            props.put_u8(SESSION_EXPIRY);
            props.put_u32(secs);
        }
        if let Some(id) = &info.assigned_client_id {
            put_str_prop(&mut props, ASSIGNED_CLIENT_ID, id);
        }
    }
    if let Some(reason) = info.reason {
        put_str_prop(&mut props, REASON_STRING, reason);
    }
    put_packet(out, 0x20, &head, Some(&props), &[]);
}

/// A server DISCONNECT (v5 only; a 3.1.1 connection is simply closed).
pub fn disconnect(reason: u8, out: &mut BytesMut) {
    out.put_slice(&[0xe0, 2, reason, 0]);
}

/// SUBACK with one code per filter. For 3.1.1 every refusal code becomes
/// 0x80, the only failure code it has.
pub fn suback(version: Version, pkid: u16, codes: &[u8], out: &mut BytesMut) {
    let codes: Vec<u8> = codes.iter().map(|&c| if version == Version::V4 && c >= 0x80 { 0x80 } else { c }).collect();
    let props: Option<&[u8]> = (version == Version::V5).then_some(&[]);
    put_packet(out, 0x90, &pkid.to_be_bytes(), props, &codes);
}

/// UNSUBACK: 3.1.1 has no codes; v5 gets one per filter (0x00 removed,
/// 0x11 no subscription existed, 0x8F invalid filter).
pub fn unsuback(version: Version, pkid: u16, codes: &[u8], out: &mut BytesMut) {
    if version == Version::V4 {
        put_packet(out, 0xb0, &pkid.to_be_bytes(), None, &[]);
        return;
    }
    put_packet(out, 0xb0, &pkid.to_be_bytes(), Some(&[]), codes);
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP (by `kind`). 3.1.1 acks have no
/// reason code, so a refusal looks like success there: MQTT 3.1.1 has no
/// way to say "not authorized" for a PUBLISH. v5 success is the short form.
pub fn ack(version: Version, kind: u8, pkid: u16, reason: u8, out: &mut BytesMut) {
    let flags = if kind == kind::PUBREL { 0b0010 } else { 0 };
    out.put_u8((kind << 4) | flags);
    if version == Version::V4 || reason == 0 {
        out.put_u8(2);
        out.put_u16(pkid);
    } else {
        out.put_u8(3);
        out.put_u16(pkid);
        out.put_u8(reason);
    }
}

/// PINGRESP.
pub fn pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xd0, 0]);
}

/// A delivery as a PUBLISH. For v5 it carries the message's properties,
/// its remaining expiry (MQTT-3.3.2-6) and the subscription identifiers;
/// for 3.1.1 none of them.
pub fn publish(version: Version, d: &Delivery, now: Millis, out: &mut BytesMut) {
    let m = &d.message;
    let header = 0x30 | (u8::from(d.dup) << 3) | ((d.qos as u8) << 1) | u8::from(d.retain);
    let mut head = BytesMut::with_capacity(m.topic.len() + 4);
    put_str(&mut head, &m.topic);
    if d.qos != QoS::AtMostOnce {
        head.put_u16(d.pkid);
    }
    if version == Version::V4 {
        put_packet(out, header, &head, None, &m.payload);
        return;
    }
    let mut props = BytesMut::new();
    if let Some(p) = &m.properties {
        if let Some(f) = p.payload_format_indicator {
            props.put_u8(PAYLOAD_FORMAT);
            props.put_u8(f);
        }
        if let Some(ct) = &p.content_type {
            put_str_prop(&mut props, CONTENT_TYPE, ct);
        }
        if let Some(rt) = &p.response_topic {
            put_str_prop(&mut props, RESPONSE_TOPIC, rt);
        }
        if let Some(cd) = &p.correlation_data {
            props.put_u8(CORRELATION_DATA);
            put_bin(&mut props, cd);
        }
        for (k, v) in &p.user_properties {
            props.put_u8(USER_PROPERTY);
            put_str(&mut props, k);
            put_str(&mut props, v);
        }
    }
    if let Some(left) = m.expiry_left_secs(now) {
        props.put_u8(MESSAGE_EXPIRY);
        props.put_u32(left);
    }
    for &id in d.subscription_ids.iter() {
        props.put_u8(SUBSCRIPTION_ID);
        put_varint(&mut props, id as usize);
    }
    put_packet(out, header, &head, Some(&props), &m.payload);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use std::sync::Arc;

    use mqseal_router::{Message, Properties};

    use super::*;

    #[test]
    fn own_encoders_match_the_spec() {
        let mut out = BytesMut::new();
        connack(Version::V4, true, 5, &ConnAckInfo::default(), &mut out);
        assert_eq!(&out[..], &[0x20, 2, 0, 5]);
        out.clear();
        connack(Version::V5, false, 0x86, &ConnAckInfo::default(), &mut out);
        assert_eq!(&out[..], &[0x20, 3, 0, 0x86, 0]);
        out.clear();
        suback(Version::V4, 7, &[1, 0x87], &mut out);
        assert_eq!(&out[..], &[0x90, 4, 0, 7, 1, 0x80]);
        out.clear();
        suback(Version::V5, 7, &[1, 0x87], &mut out);
        assert_eq!(&out[..], &[0x90, 5, 0, 7, 0, 1, 0x87]);
        out.clear();
        ack(Version::V5, kind::PUBACK, 9, 0x87, &mut out);
        assert_eq!(&out[..], &[0x40, 3, 0, 9, 0x87]);
        out.clear();
        ack(Version::V5, kind::PUBREL, 9, 0, &mut out);
        assert_eq!(&out[..], &[0x62, 2, 0, 9]);
        out.clear();
        unsuback(Version::V5, 3, &[0x00, 0x11], &mut out);
        assert_eq!(&out[..], &[0xb0, 5, 0, 3, 0, 0x00, 0x11]);
        out.clear();
        unsuback(Version::V4, 3, &[0x00], &mut out);
        assert_eq!(&out[..], &[0xb0, 2, 0, 3]);
    }

    #[test]
    fn publishes_carry_v5_properties_and_never_give_them_to_3_1_1() {
        let mut m = Message::new("a/b", &b"hi"[..], QoS::AtLeastOnce, false);
        m.expires_at = Some(10_500);
        m.properties =
            Some(Box::new(Properties { user_properties: vec![("k".into(), "v".into())], ..Properties::default() }));
        let d = Delivery {
            pkid: 7,
            qos: QoS::AtLeastOnce,
            dup: true,
            retain: true,
            message: Arc::new(m),
            subscription_ids: vec![1, 200].into_boxed_slice(),
        };
        let mut out = BytesMut::new();
        publish(Version::V4, &d, 0, &mut out);
        assert_eq!(&out[..], &[0x3b, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i']);
        out.clear();
        publish(Version::V5, &d, 10_000, &mut out);
        let props: &[u8] = &[0x26, 0, 1, b'k', 0, 1, b'v', 0x02, 0, 0, 0, 1, 0x0b, 1, 0x0b, 0xc8, 0x01];
        let mut want = vec![0x3b, (7 + 1 + props.len() + 2) as u8, 0, 3, b'a', b'/', b'b', 0, 7, props.len() as u8];
        want.extend_from_slice(props);
        want.extend_from_slice(b"hi");
        assert_eq!(&out[..], &want[..]);
    }
}
