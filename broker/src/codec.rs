//! MQTT framing and encoding at the front.
//!
//! The packet *bodies* are parsed and written by rumqttd's own codec
//! (`rumqttd::protocol::{v4::V4, v5::V5}`), because its packet types are
//! what the router's links take. That codec was written for rumqttd's own
//! listeners and has traps that a client can reach (the audit in
//! docs/RUMQTTD.md): `unreachable!()` for a client
//! that sends a server-only packet type, a v4 writer that panics on any
//! property, no parser for the short v5 DISCONNECT. So this module stands in
//! front of it:
//!
//! * [`next_frame`] reads the fixed header itself, enforces the maximum packet
//!   size *before* the body is buffered, and refuses packet types and flag
//!   bits a client may not send;
//! * PINGREQ and DISCONNECT are decoded here, never by rumqttd;
//! * everything written to a 3.1.1 client is stripped of properties first
//!   (the audit's crash case (a)), and CONNACK, SUBACK, DISCONNECT and the
//!   acks for refused publishes are encoded here;
//! * what remains goes through rumqttd inside `catch_unwind`, so a parser
//!   bug we have not found costs one connection, not the process.

use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::{BufMut, BytesMut};
use rumqttd::protocol::{self, Packet, Protocol};

/// MQTT protocol level of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.
    V5,
}

/// Why a byte stream cannot go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The remaining length says more than the configured maximum.
    #[error("packet of {size} bytes is larger than the maximum of {max}")]
    TooLarge {
        /// Announced total size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Bad remaining-length encoding, a server-only packet type, or
    /// reserved flag bits set.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
}

/// Control packet types (the high nibble of the first byte).
pub mod kind {
    /// CONNECT
    pub const CONNECT: u8 = 1;
    /// PUBLISH
    pub const PUBLISH: u8 = 3;
    /// PUBACK
    pub const PUBACK: u8 = 4;
    /// PUBREC
    pub const PUBREC: u8 = 5;
    /// PUBREL
    pub const PUBREL: u8 = 6;
    /// PUBCOMP
    pub const PUBCOMP: u8 = 7;
    /// SUBSCRIBE
    pub const SUBSCRIBE: u8 = 8;
    /// UNSUBSCRIBE
    pub const UNSUBSCRIBE: u8 = 10;
    /// PINGREQ
    pub const PINGREQ: u8 = 12;
    /// DISCONNECT
    pub const DISCONNECT: u8 = 14;
    /// AUTH (v5 only)
    pub const AUTH: u8 = 15;
}

/// One complete packet cut from the stream.
#[derive(Debug)]
pub struct Frame {
    /// The first byte: type in the high nibble, flags in the low one.
    pub header: u8,
    /// Size of the fixed header (1 + length bytes).
    pub header_len: usize,
    /// The whole packet, fixed header included.
    pub bytes: BytesMut,
}

impl Frame {
    /// The packet type.
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }

    /// The variable header and payload.
    pub fn body(&self) -> &[u8] {
        self.bytes.get(self.header_len..).unwrap_or_default()
    }
}

/// Cuts the next complete packet off `buf`, or says how it is wrong.
///
/// `Ok(None)` means "read more". The size check happens as soon as the fixed
/// header is in, so an oversized packet is refused without buffering it.
pub fn next_frame(buf: &mut BytesMut, max_packet: usize) -> Result<Option<Frame>, FrameError> {
    let Some(&header) = buf.first() else { return Ok(None) };
    let mut remaining: usize = 0;
    let mut header_len = 1;
    loop {
        let Some(&byte) = buf.get(header_len) else { return Ok(None) };
        remaining |= usize::from(byte & 0x7f) << (7 * (header_len - 1));
        header_len += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if header_len > 4 {
            return Err(FrameError::Malformed("remaining length longer than 4 bytes"));
        }
    }
    check_client_header(header)?;
    let size = header_len + remaining;
    if size > max_packet {
        return Err(FrameError::TooLarge { size, max: max_packet });
    }
    if buf.len() < size {
        buf.reserve(size - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame { header, header_len, bytes: buf.split_to(size) }))
}

/// Packet types and flag bits a client may send (MQTT-2.2.2-1/2).
fn check_client_header(header: u8) -> Result<(), FrameError> {
    let flags = header & 0x0f;
    let ok = match header >> 4 {
        kind::PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            if qos == 0 && flags & 0b1000 != 0 {
                // MQTT-3.3.1-2: a QoS 0 message is never a redelivery.
                return Err(FrameError::Malformed("DUP flag set on a QoS 0 PUBLISH"));
            }
            qos != 0b11
        }
        kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE => flags == 0b0010,
        kind::CONNECT | kind::PUBACK | kind::PUBREC | kind::PUBCOMP | kind::PINGREQ | kind::DISCONNECT | kind::AUTH => {
            flags == 0
        }
        _ => return Err(FrameError::Malformed("packet type a client may not send")),
    };
    if ok { Ok(()) } else { Err(FrameError::Malformed("reserved flag bits set")) }
}

/// The protocol level named in a CONNECT frame: `Some(4)` for 3.1.1,
/// `Some(5)`, `Some(3)` for MQTT 3.1 (which we do not speak), `None` when the
/// protocol name is not MQTT at all.
pub fn connect_level(frame: &Frame) -> Option<u8> {
    let body = frame.body();
    match body {
        [0, 4, b'M', b'Q', b'T', b'T', level, ..] => Some(*level),
        [0, 6, b'M', b'Q', b'I', b's', b'd', b'p', level, ..] => Some(*level),
        _ => None,
    }
}

/// Checks the CONNECT flags byte (MQTT 3.1.1 §3.1.2.3, MQTT 5 §3.1.2.3):
/// the reserved bit is zero (MQTT-3.1.2-3), a will QoS is 0-2
/// (MQTT-3.1.2-14), will QoS and will retain are zero without a will
/// (MQTT-3.1.2-13/15), and — 3.1.1 only — there is no password without a
/// user name (MQTT-3.1.2-22). rumqttd's parser ignores all of these, so a
/// client setting them would otherwise be served as if it had not.
///
/// # Errors
/// The rule the flags break, for the log line.
pub fn check_connect_flags(frame: &Frame, version: Version) -> Result<(), &'static str> {
    // Protocol name (6 bytes), level, then the flags.
    let flags = *frame.body().get(7).ok_or("CONNECT ends before its flags")?;
    let will = flags & 0b0000_0100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b0010_0000 != 0;
    if flags & 0b0000_0001 != 0 {
        return Err("reserved CONNECT flag set");
    }
    if will_qos == 3 {
        return Err("will QoS 3");
    }
    if !will && (will_qos != 0 || will_retain) {
        return Err("will QoS or will retain set without a will");
    }
    if version == Version::V4 && flags & 0b0100_0000 != 0 && flags & 0b1000_0000 == 0 {
        return Err("password flag set without a user name");
    }
    Ok(())
}

/// The QoS and packet id of a PUBLISH frame, read from the raw bytes
/// because rumqttd keeps those fields private.
pub fn publish_qos_pkid(frame: &Frame) -> Option<(u8, u16)> {
    let qos = (frame.header >> 1) & 0b11;
    if qos == 0 {
        return Some((0, 0));
    }
    let body = frame.body();
    let topic_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let at = 2 + topic_len;
    Some((qos, u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?])))
}

/// The packet id at the start of an ack frame (PUBACK/PUBREC/PUBREL/PUBCOMP).
pub fn ack_pkid(frame: &Frame) -> Option<u16> {
    let body = frame.body();
    Some(u16::from_be_bytes([*body.first()?, *body.get(1)?]))
}

/// Reason code of a DISCONNECT (0 when absent, as MQTT 5 §3.14.2.1 says).
pub fn disconnect_reason(frame: &Frame) -> u8 {
    frame.body().first().copied().unwrap_or(0)
}

/// Why rumqttd's codec could not decode a frame.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The codec returned an error.
    #[error("malformed {0}")]
    Malformed(String),
    /// The codec panicked (a bug in it): the connection is closed and the
    /// `codec_panics` counter says so.
    #[error("codec panicked on this packet")]
    Panicked,
}

/// Decodes one frame with rumqttd's codec for `version`.
pub fn decode(version: Version, frame: Frame) -> Result<Packet, DecodeError> {
    let mut bytes = frame.bytes;
    let max = bytes.len();
    let result = catch_unwind(AssertUnwindSafe(|| match version {
        Version::V4 => protocol::v4::V4.read_mut(&mut bytes, max),
        Version::V5 => protocol::v5::V5.read_mut(&mut bytes, max),
    }));
    match result {
        Ok(Ok(packet)) => Ok(packet),
        Ok(Err(e)) => Err(DecodeError::Malformed(format!("{e:?}"))),
        Err(_) => Err(DecodeError::Panicked),
    }
}

/// Makes a router packet safe for `version`: 3.1.1 has no properties, and
/// rumqttd's v4 writer panics on any (the audit's crash (a)). Returns `None`
/// for packets 3.1.1 cannot carry (a server DISCONNECT).
pub fn for_version(version: Version, packet: Packet) -> Option<Packet> {
    if version == Version::V5 {
        return Some(packet);
    }
    Some(match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::PingResp(p) => Packet::PingResp(p),
        Packet::Disconnect(..) | Packet::ConnAck(..) => return None,
        other => other,
    })
}

/// Encodes a router packet (after [`for_version`]) with rumqttd's writer.
pub fn encode(version: Version, packet: Packet, out: &mut BytesMut) -> Result<usize, DecodeError> {
    let result = catch_unwind(AssertUnwindSafe(|| match version {
        Version::V4 => protocol::v4::V4.write(packet, out),
        Version::V5 => protocol::v5::V5.write(packet, out),
    }));
    match result {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(DecodeError::Malformed(format!("{e:?}"))),
        Err(_) => Err(DecodeError::Panicked),
    }
}

fn put_remaining_length(out: &mut BytesMut, mut len: usize) {
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

fn put_string_property(props: &mut BytesMut, id: u8, value: &str) {
    props.put_u8(id);
    props.put_u16(value.len().min(u16::MAX as usize) as u16);
    props.put_slice(value.as_bytes().get(..usize::from(u16::MAX)).unwrap_or(value.as_bytes()));
}

/// What the front tells a v5 client about itself in CONNACK.
#[derive(Debug, Default)]
pub struct ConnAckInfo {
    /// Largest packet the broker accepts.
    pub max_packet_size: u32,
    /// Id assigned to a client that sent an empty one.
    pub assigned_client_id: Option<String>,
    /// Human-readable reason for a refusal.
    pub reason: Option<&'static str>,
}

/// CONNACK. `code` is the v5 reason code or the 3.1.1 return code, already
/// chosen for `version` by the caller.
pub fn connack(version: Version, session_present: bool, code: u8, info: &ConnAckInfo, out: &mut BytesMut) {
    out.put_u8(0x20);
    match version {
        Version::V4 => {
            out.put_u8(2);
            out.put_u8(u8::from(session_present && code == 0));
            out.put_u8(code);
        }
        Version::V5 => {
            let mut props = BytesMut::new();
            if code == 0 {
                // Maximum Packet Size: a client must not send more.
                props.put_u8(0x27);
                props.put_u32(info.max_packet_size);
                // Topic Alias Maximum 0: the ACL needs the real topic name of
                // every PUBLISH, so client aliases are not accepted.
                props.put_u8(0x22);
                props.put_u16(0);
                // Retain is available; shared subscriptions are too.
                if let Some(id) = &info.assigned_client_id {
                    put_string_property(&mut props, 0x12, id);
                }
            }
            if let Some(reason) = info.reason {
                put_string_property(&mut props, 0x1f, reason);
            }
            let mut len_bytes = BytesMut::new();
            put_remaining_length(&mut len_bytes, props.len());
            put_remaining_length(out, 2 + len_bytes.len() + props.len());
            out.put_u8(u8::from(session_present && code == 0));
            out.put_u8(code);
            out.put_slice(&len_bytes);
            out.put_slice(&props);
        }
    }
}

/// A server DISCONNECT (v5 only; a 3.1.1 connection is simply closed).
pub fn disconnect(reason: u8, out: &mut BytesMut) {
    out.put_slice(&[0xe0, 2, reason, 0]);
}

/// SUBACK with one code per filter. For 3.1.1 every refusal code becomes
/// 0x80, the only failure code it has.
pub fn suback(version: Version, pkid: u16, codes: &[u8], out: &mut BytesMut) {
    out.put_u8(0x90);
    let props = usize::from(version == Version::V5);
    put_remaining_length(out, 2 + props + codes.len());
    out.put_u16(pkid);
    if version == Version::V5 {
        out.put_u8(0);
    }
    for &code in codes {
        out.put_u8(if version == Version::V4 && code >= 0x80 { 0x80 } else { code });
    }
}

/// PUBACK, PUBREC or PUBCOMP (by `kind`) for a packet the front answers
/// itself. 3.1.1 acks have no reason code, so a refusal looks like success
/// there: MQTT 3.1.1 has no way to say "not authorized" for a PUBLISH.
pub fn ack(version: Version, kind: u8, pkid: u16, reason: u8, out: &mut BytesMut) {
    out.put_u8(kind << 4);
    match version {
        Version::V4 => {
            out.put_u8(2);
            out.put_u16(pkid);
        }
        Version::V5 => {
            out.put_u8(3);
            out.put_u16(pkid);
            out.put_u8(reason);
        }
    }
}

/// PINGRESP.
pub fn pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xd0, 0]);
}

/// A PUBLISH for the router at `qos` (a will, which the front publishes
/// itself). rumqttd keeps `qos` and `pkid` crate-private and its only public
/// constructor makes QoS 0, so the packet is built as wire bytes and read
/// back through rumqttd's own v4 reader: a QoS 1 will then reaches QoS 1
/// subscribers (and their offline queues) as one.
pub fn router_publish(topic: &[u8], payload: &[u8], qos: u8, retain: bool) -> Option<protocol::Publish> {
    let qos = qos.min(2);
    let topic_len = u16::try_from(topic.len()).ok()?;
    let mut body = BytesMut::with_capacity(topic.len() + payload.len() + 4);
    body.put_u16(topic_len);
    body.put_slice(topic);
    if qos > 0 {
        // Any id: the router acks it on a link that is about to close.
        body.put_u16(1);
    }
    body.put_slice(payload);
    let mut frame = BytesMut::with_capacity(body.len() + 5);
    frame.put_u8(0x30 | (qos << 1) | u8::from(retain));
    put_remaining_length(&mut frame, body.len());
    frame.put_slice(&body);
    let header_len = frame.len() - body.len();
    match decode(Version::V4, Frame { header: 0x30 | (qos << 1) | u8::from(retain), header_len, bytes: frame }) {
        Ok(Packet::Publish(publish, _)) => Some(publish),
        _ => None,
    }
}

/// The v5 reason code of a router SUBACK entry, for merging with the
/// front's own refusals.
pub fn suback_code(code: &protocol::SubscribeReasonCode) -> u8 {
    use protocol::{QoS, SubscribeReasonCode as C};
    match code {
        C::QoS0 | C::Success(QoS::AtMostOnce) => 0,
        C::QoS1 | C::Success(QoS::AtLeastOnce) => 1,
        C::QoS2 | C::Success(QoS::ExactlyOnce) => 2,
        C::NotAuthorized => 0x87,
        C::TopicFilterInvalid => 0x8f,
        C::QuotaExceeded => 0x97,
        _ => 0x80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(bytes: &[u8], max: usize) -> Result<Option<Frame>, FrameError> {
        let mut buf = BytesMut::from(bytes);
        next_frame(&mut buf, max)
    }

    #[test]
    fn frames_wait_for_bytes_and_refuse_oversize_early() {
        assert!(frame_of(&[0x30], 100).unwrap().is_none());
        // 0x30, remaining length 16384: refused from the header alone.
        assert_eq!(
            frame_of(&[0x30, 0x80, 0x80, 0x01], 1000).unwrap_err(),
            FrameError::TooLarge { size: 16388, max: 1000 }
        );
        assert!(matches!(frame_of(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX), Err(FrameError::Malformed(_))));
        let f = frame_of(&[0xc0, 0x00, 0xc0], 10).unwrap().unwrap();
        assert_eq!((f.kind(), f.bytes.len()), (kind::PINGREQ, 2));
    }

    #[test]
    fn server_only_types_and_bad_flags_never_reach_rumqttd() {
        // CONNACK, SUBACK, UNSUBACK, PINGRESP from a client: rumqttd's v5
        // reader would hit `unreachable!()` on some of these.
        for header in [0x20, 0x90, 0xb0, 0xd0, 0x00] {
            assert!(matches!(frame_of(&[header, 0], 10), Err(FrameError::Malformed(_))), "{header:#x}");
        }
        assert!(frame_of(&[0x36, 0], 10).is_err()); // QoS 3
        assert!(frame_of(&[0x80, 0], 10).is_err()); // SUBSCRIBE without 0b0010
        assert!(frame_of(&[0xc1, 0], 10).is_err());
        // MQTT-3.3.1-2: DUP on QoS 0; DUP on QoS 1 is a redelivery, allowed.
        assert_eq!(frame_of(&[0x38, 0], 10).unwrap_err(), FrameError::Malformed("DUP flag set on a QoS 0 PUBLISH"));
        assert!(frame_of(&[0x3a, 0], 10).unwrap().is_some());
    }

    #[test]
    fn connect_flags_follow_the_spec() {
        let connect = |flags: u8| {
            let body = [0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60];
            let mut bytes = vec![0x10, body.len() as u8];
            bytes.extend_from_slice(&body);
            frame_of(&bytes, 100).unwrap().unwrap()
        };
        let check = |flags, version| check_connect_flags(&connect(flags), version);
        for ok in [0b0000_0010, 0b1100_0010, 0b0010_1110, 0b0001_0110] {
            assert_eq!(check(ok, Version::V4), Ok(()), "{ok:#010b}");
        }
        assert_eq!(check(0b0000_0011, Version::V4), Err("reserved CONNECT flag set"));
        assert_eq!(check(0b0000_0001, Version::V5), Err("reserved CONNECT flag set"));
        assert_eq!(check(0b0001_1110, Version::V5), Err("will QoS 3"));
        assert_eq!(check(0b0000_1010, Version::V4), Err("will QoS or will retain set without a will"));
        assert_eq!(check(0b0010_0010, Version::V5), Err("will QoS or will retain set without a will"));
        assert_eq!(check(0b0100_0010, Version::V4), Err("password flag set without a user name"));
        assert_eq!(check(0b0100_0010, Version::V5), Ok(()), "MQTT 5 allows a password alone");
    }

    #[test]
    fn decoding_garbage_never_panics_out() {
        // Every two-byte-header body of up to 3 bytes for every client type.
        for header in [0x10u8, 0x30, 0x32, 0x34, 0x40, 0x50, 0x62, 0x70, 0x82, 0xa2] {
            for len in 0..4usize {
                for fill in [0u8, 0xff, 0x05] {
                    let mut bytes = vec![header, len as u8];
                    bytes.extend(std::iter::repeat_n(fill, len));
                    for version in [Version::V4, Version::V5] {
                        if let Ok(Some(f)) = frame_of(&bytes, 100) {
                            let _ = decode(version, f);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn v4_never_sees_properties() {
        let publish = router_publish(b"t", b"p", 0, false).unwrap();
        let props =
            protocol::PublishProperties { user_properties: vec![("k".into(), "v".into())], ..Default::default() };
        let packet = for_version(Version::V4, Packet::Publish(publish, Some(props))).unwrap();
        let mut out = BytesMut::new();
        encode(Version::V4, packet, &mut out).unwrap();
        assert_eq!(&out[..], &[0x30, 4, 0, 1, b't', b'p']);
    }

    #[test]
    fn wills_keep_their_qos_through_rumqttd_types() {
        let publish = router_publish(b"w/t", b"gone", 1, true).unwrap();
        let mut out = BytesMut::new();
        encode(Version::V4, Packet::Publish(publish, None), &mut out).unwrap();
        // QoS 1, retain, topic "w/t", packet id 1, payload "gone".
        assert_eq!(&out[..], &[0x33, 11, 0, 3, b'w', b'/', b't', 0, 1, b'g', b'o', b'n', b'e']);
        assert!(router_publish(&[b'x'; 70_000], b"", 0, false).is_none());
    }

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
    }
}
