//! MQTT on the wire at the front: framing here, packet bodies in
//! [`decode`] (from clients) and [`encode`] (to clients).
//!
//! [`next_frame`] reads the fixed header itself, enforces the maximum
//! packet size *before* the body is buffered, and refuses packet types and
//! flag bits a client may not send; the CONNECT checks that must run before
//! anything else ([`connect_level`], [`check_connect_flags`]) read the raw
//! bytes. Nothing here panics on input: there is no indexing (clippy denies
//! it), and `fuzz/fuzz_targets/broker_packets.rs` drives these functions
//! with arbitrary bytes.

pub mod decode;
pub mod encode;

pub use encode::{ConnAckInfo, ack, connack, disconnect, pingresp, publish, suback, unsuback};

use bytes::BytesMut;

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
/// user name (MQTT-3.1.2-22).
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
    fn server_only_types_and_bad_flags_are_refused_at_the_frame() {
        // CONNACK, SUBACK, UNSUBACK, PINGRESP from a client.
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
    fn decoding_garbage_never_panics() {
        // Every short body for every client type, both versions.
        for header in [0x10u8, 0x30, 0x32, 0x34, 0x40, 0x50, 0x62, 0x70, 0x82, 0xa2, 0xc0, 0xe0] {
            for len in 0..6usize {
                for fill in [0u8, 0xff, 0x05, 0x80] {
                    let mut bytes = vec![header, len as u8];
                    bytes.extend(std::iter::repeat_n(fill, len));
                    for version in [Version::V4, Version::V5] {
                        if let Ok(Some(f)) = frame_of(&bytes, 100) {
                            let _ = decode::packet(&f, version);
                            let _ = decode::connect(&f);
                        }
                    }
                }
            }
        }
    }
}
