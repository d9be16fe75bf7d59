//! Packet bodies from clients, parsed into the front's own types.
//!
//! **Why our own parser.** The front must answer a bad filter in a
//! SUBSCRIBE with a per-filter 0x8F and keep the connection (the interop
//! suite checks it), carry every Subscription Identifier of a delivery,
//! and never panic. rumqttd's codec panicked on client input (audit cases
//! (a)–(c), wrapped in `catch_unwind`); `mqtt-proto` 0.4, the fuzzed
//! candidate, refuses a whole SUBSCRIBE for one invalid filter and keeps
//! one Subscription Identifier per PUBLISH. What a server must parse is
//! eleven packet bodies; it is written here with a bounds-checked reader
//! (no indexing anywhere, enforced by clippy) and fuzzed by
//! `fuzz/fuzz_targets/broker_packets.rs` through the same entry points the
//! session uses.
//!
//! Errors say which rule broke, for the log line, and carry the v5 reason
//! code: 0x81 for a malformed packet, 0x82 for a protocol error (§4.13).

use bytes::Bytes;
use mqseal_router::Properties;
use zeroize::Zeroizing;

use super::{Frame, Version, kind};

/// Why a packet body cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// It does not parse (v5 reason 0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// It parses but breaks a protocol rule (v5 reason 0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

impl DecodeError {
    /// The v5 DISCONNECT reason code.
    #[must_use]
    pub fn reason_code(self) -> u8 {
        match self {
            Self::Malformed(_) => 0x81,
            Self::Protocol(_) => 0x82,
        }
    }

    /// The rule, for the log line.
    #[must_use]
    pub fn rule(self) -> &'static str {
        match self {
            Self::Malformed(s) | Self::Protocol(s) => s,
        }
    }
}

type Result<T> = std::result::Result<T, DecodeError>;

const fn malformed<T>(why: &'static str) -> Result<T> {
    Err(DecodeError::Malformed(why))
}

/// A bounds-checked cursor over one packet body.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return malformed(what);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        let (&b, rest) = self.buf.split_first().ok_or(DecodeError::Malformed(what))?;
        self.buf = rest;
        Ok(b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b.first().copied().unwrap_or(0), b.get(1).copied().unwrap_or(0)]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        let b = self.take(4, what)?;
        let mut v = [0u8; 4];
        v.copy_from_slice(b);
        Ok(u32::from_be_bytes(v))
    }

    /// A Variable Byte Integer (§1.5.5): at most four bytes.
    fn varint(&mut self, what: &'static str) -> Result<u32> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8(what)?;
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        malformed("variable byte integer longer than 4 bytes")
    }

    fn binary(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    /// A UTF-8 string (§1.5.4): well-formed, and without U+0000
    /// (MQTT-1.5.4-1/2).
    fn string(&mut self, what: &'static str) -> Result<&'a str> {
        let s = self.name(what)?;
        if s.contains('\0') {
            return malformed("string contains U+0000");
        }
        Ok(s)
    }

    /// A UTF-8 string that names something — a client id, topic or
    /// filter — whose own validator refuses U+0000 with a precise answer
    /// (CONNACK 0x85, PUBLISH 0x90, SUBACK 0x8F) rather than a bare close.
    fn name(&mut self, what: &'static str) -> Result<&'a str> {
        let raw = self.binary(what)?;
        std::str::from_utf8(raw).map_err(|_| DecodeError::Malformed("string is not UTF-8"))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// Every v5 property a client may send, parsed; each packet type says
/// which it allows.
#[derive(Debug, Default)]
struct Props {
    payload_format: Option<u8>,
    message_expiry: Option<u32>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation_data: Option<Bytes>,
    subscription_id: Option<u32>,
    session_expiry: Option<u32>,
    auth_method: Option<String>,
    auth_data: bool,
    request_problem_info: Option<u8>,
    will_delay: Option<u32>,
    request_response_info: Option<u8>,
    reason_string: bool,
    receive_maximum: Option<u16>,
    topic_alias_maximum: Option<u16>,
    topic_alias: Option<u16>,
    max_packet_size: Option<u32>,
    server_reference: bool,
    user: Vec<(String, String)>,
}

/// Property identifiers (MQTT 5 §2.2.2.2).
pub(crate) mod id {
    pub const PAYLOAD_FORMAT: u8 = 0x01;
    pub const MESSAGE_EXPIRY: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_ID: u8 = 0x0b;
    pub const SESSION_EXPIRY: u8 = 0x11;
    pub const AUTH_METHOD: u8 = 0x15;
    pub const AUTH_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFO: u8 = 0x17;
    pub const WILL_DELAY: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFO: u8 = 0x19;
    pub const SERVER_REFERENCE: u8 = 0x1c;
    pub const REASON_STRING: u8 = 0x1f;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAX_PACKET_SIZE: u8 = 0x27;
}

const CONNECT_PROPS: &[u8] = &[
    id::SESSION_EXPIRY,
    id::RECEIVE_MAXIMUM,
    id::MAX_PACKET_SIZE,
    id::TOPIC_ALIAS_MAXIMUM,
    id::REQUEST_RESPONSE_INFO,
    id::REQUEST_PROBLEM_INFO,
    id::USER_PROPERTY,
    id::AUTH_METHOD,
    id::AUTH_DATA,
];
const WILL_PROPS: &[u8] = &[
    id::WILL_DELAY,
    id::PAYLOAD_FORMAT,
    id::MESSAGE_EXPIRY,
    id::CONTENT_TYPE,
    id::RESPONSE_TOPIC,
    id::CORRELATION_DATA,
    id::USER_PROPERTY,
];
const PUBLISH_PROPS: &[u8] = &[
    id::PAYLOAD_FORMAT,
    id::MESSAGE_EXPIRY,
    id::TOPIC_ALIAS,
    id::RESPONSE_TOPIC,
    id::CORRELATION_DATA,
    id::USER_PROPERTY,
    id::CONTENT_TYPE,
];
const ACK_PROPS: &[u8] = &[id::REASON_STRING, id::USER_PROPERTY];
const SUBSCRIBE_PROPS: &[u8] = &[id::SUBSCRIPTION_ID, id::USER_PROPERTY];
const UNSUBSCRIBE_PROPS: &[u8] = &[id::USER_PROPERTY];
const DISCONNECT_PROPS: &[u8] = &[id::SESSION_EXPIRY, id::REASON_STRING, id::USER_PROPERTY, id::SERVER_REFERENCE];

fn once<T>(slot: &mut Option<T>, value: T) -> Result<()> {
    if slot.replace(value).is_some() {
        return Err(DecodeError::Protocol("property given twice"));
    }
    Ok(())
}

fn flag(slot: &mut bool) -> Result<()> {
    if std::mem::replace(slot, true) {
        return Err(DecodeError::Protocol("property given twice"));
    }
    Ok(())
}

fn zero_or_one(v: u8) -> Result<u8> {
    if v > 1 {
        return Err(DecodeError::Protocol("property value must be 0 or 1"));
    }
    Ok(v)
}

/// A v5 property block (length, then properties), checked against the
/// packet's allowed set.
fn props(r: &mut Reader<'_>, allowed: &[u8]) -> Result<Props> {
    let len = r.varint("property length")?;
    let mut block = Reader::new(r.take(usize::try_from(len).unwrap_or(usize::MAX), "properties")?);
    let mut p = Props::default();
    while !block.is_empty() {
        let pid = block.u8("property id")?;
        if !allowed.contains(&pid) {
            return Err(DecodeError::Protocol("property not allowed in this packet"));
        }
        match pid {
            id::PAYLOAD_FORMAT => once(&mut p.payload_format, zero_or_one(block.u8("payload format")?)?)?,
            id::MESSAGE_EXPIRY => once(&mut p.message_expiry, block.u32("message expiry")?)?,
            id::CONTENT_TYPE => once(&mut p.content_type, block.string("content type")?.to_owned())?,
            id::RESPONSE_TOPIC => {
                let topic = block.string("response topic")?;
                if !mqseal_router::topic::valid_topic_name(topic) {
                    return Err(DecodeError::Protocol("response topic is not a valid topic name"));
                }
                once(&mut p.response_topic, topic.to_owned())?;
            }
            id::CORRELATION_DATA => {
                once(&mut p.correlation_data, Bytes::copy_from_slice(block.binary("correlation data")?))?;
            }
            id::SUBSCRIPTION_ID => {
                let v = block.varint("subscription identifier")?;
                if v == 0 {
                    return Err(DecodeError::Protocol("subscription identifier 0"));
                }
                once(&mut p.subscription_id, v)?;
            }
            id::SESSION_EXPIRY => once(&mut p.session_expiry, block.u32("session expiry")?)?,
            id::AUTH_METHOD => once(&mut p.auth_method, block.string("authentication method")?.to_owned())?,
            id::AUTH_DATA => {
                block.binary("authentication data")?;
                flag(&mut p.auth_data)?;
            }
            id::REQUEST_PROBLEM_INFO => {
                once(&mut p.request_problem_info, zero_or_one(block.u8("request problem information")?)?)?;
            }
            id::WILL_DELAY => once(&mut p.will_delay, block.u32("will delay")?)?,
            id::REQUEST_RESPONSE_INFO => {
                once(&mut p.request_response_info, zero_or_one(block.u8("request response information")?)?)?;
            }
            id::SERVER_REFERENCE => {
                block.string("server reference")?;
                flag(&mut p.server_reference)?;
            }
            id::REASON_STRING => {
                block.string("reason string")?;
                flag(&mut p.reason_string)?;
            }
            id::RECEIVE_MAXIMUM => {
                let v = block.u16("receive maximum")?;
                if v == 0 {
                    return Err(DecodeError::Protocol("receive maximum 0"));
                }
                once(&mut p.receive_maximum, v)?;
            }
            id::TOPIC_ALIAS_MAXIMUM => once(&mut p.topic_alias_maximum, block.u16("topic alias maximum")?)?,
            id::TOPIC_ALIAS => once(&mut p.topic_alias, block.u16("topic alias")?)?,
            id::USER_PROPERTY => {
                let k = block.string("user property")?.to_owned();
                let v = block.string("user property")?.to_owned();
                p.user.push((k, v));
            }
            id::MAX_PACKET_SIZE => {
                let v = block.u32("maximum packet size")?;
                if v == 0 {
                    return Err(DecodeError::Protocol("maximum packet size 0"));
                }
                once(&mut p.max_packet_size, v)?;
            }
            _ => return Err(DecodeError::Protocol("unknown property")),
        }
    }
    Ok(p)
}

impl Props {
    /// The properties a message carries to its subscribers, boxed only
    /// when there are any.
    fn forwarded(&mut self) -> Option<Box<Properties>> {
        let p = Properties {
            payload_format_indicator: self.payload_format,
            content_type: self.content_type.take(),
            response_topic: self.response_topic.take(),
            correlation_data: self.correlation_data.take(),
            user_properties: std::mem::take(&mut self.user),
        };
        (p != Properties::default()).then(|| Box::new(p))
    }
}

/// A will, as CONNECT gives it.
#[derive(Debug)]
pub struct WillSpec {
    /// Topic name (checked against the rules and the ACL by the login).
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS 0–2.
    pub qos: u8,
    /// RETAIN.
    pub retain: bool,
    /// Will Delay Interval (v5), seconds.
    pub delay_secs: u32,
    /// Message Expiry Interval (v5), seconds.
    pub expiry_secs: Option<u32>,
    /// Properties forwarded with it.
    pub properties: Option<Box<Properties>>,
}

/// A CONNECT.
#[derive(Debug)]
pub struct Connect {
    /// Protocol version.
    pub version: Version,
    /// Clean Start / Clean Session.
    pub clean_start: bool,
    /// Keep Alive, seconds.
    pub keep_alive: u16,
    /// Client identifier (may be empty).
    pub client_id: String,
    /// The will.
    pub will: Option<WillSpec>,
    /// User Name.
    pub username: Option<String>,
    /// Password, wiped when dropped.
    pub password: Option<Zeroizing<Vec<u8>>>,
    /// Session Expiry Interval (v5).
    pub session_expiry_secs: Option<u32>,
    /// Receive Maximum (v5).
    pub receive_maximum: Option<u16>,
    /// Maximum Packet Size (v5).
    pub max_packet_size: Option<u32>,
    /// Authentication Method (v5): enhanced authentication is refused.
    pub auth_method: Option<String>,
}

/// A PUBLISH from a client.
#[derive(Debug)]
pub struct Publish {
    /// DUP.
    pub dup: bool,
    /// QoS 0–2.
    pub qos: u8,
    /// RETAIN.
    pub retain: bool,
    /// Topic name as sent (validated by the session, which answers 0x90).
    pub topic: String,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// The payload, copied out of the read buffer.
    pub payload: Bytes,
    /// Message Expiry Interval (v5), seconds.
    pub expiry_secs: Option<u32>,
    /// Topic Alias (v5): the broker announces a maximum of 0.
    pub topic_alias: Option<u16>,
    /// Properties forwarded to subscribers.
    pub properties: Option<Box<Properties>>,
}

/// Options of one filter in a SUBSCRIBE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterOptions {
    /// Maximum QoS.
    pub qos: u8,
    /// No Local (v5).
    pub no_local: bool,
    /// Retain As Published (v5).
    pub retain_as_published: bool,
    /// Retain Handling 0–2 (v5).
    pub retain_handling: u8,
}

/// A SUBSCRIBE.
#[derive(Debug)]
pub struct Subscribe {
    /// Packet id.
    pub pkid: u16,
    /// Subscription Identifier (v5).
    pub id: Option<u32>,
    /// Filters as sent (validated one by one by the session: a bad one
    /// gets 0x8F, the rest go on).
    pub filters: Vec<(String, FilterOptions)>,
}

/// An UNSUBSCRIBE.
#[derive(Debug)]
pub struct Unsubscribe {
    /// Packet id.
    pub pkid: u16,
    /// Filters as sent.
    pub filters: Vec<String>,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Packet id.
    pub pkid: u16,
    /// Reason code (v5; 0 for 3.1.1).
    pub reason: u8,
}

/// A DISCONNECT from a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disconnect {
    /// Reason code (0 when absent).
    pub reason: u8,
    /// A new Session Expiry Interval (v5).
    pub session_expiry_secs: Option<u32>,
}

/// A packet from a client, after CONNECT.
#[derive(Debug)]
pub enum Packet {
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK.
    PubAck(Ack),
    /// PUBREC.
    PubRec(Ack),
    /// PUBREL.
    PubRel(Ack),
    /// PUBCOMP.
    PubComp(Ack),
    /// SUBSCRIBE.
    Subscribe(Subscribe),
    /// UNSUBSCRIBE.
    Unsubscribe(Unsubscribe),
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect(Disconnect),
    /// A second CONNECT (a protocol error the session reports).
    Connect,
    /// AUTH (refused: no enhanced authentication).
    Auth,
}

/// Parses a CONNECT frame of 3.1.1 or 5.
///
/// # Errors
/// What is wrong with it.
pub fn connect(frame: &Frame) -> Result<Connect> {
    let mut r = Reader::new(frame.body());
    let name = r.binary("protocol name")?;
    if name != b"MQTT" {
        return malformed("protocol name is not MQTT");
    }
    let version = match r.u8("protocol level")? {
        4 => Version::V4,
        5 => Version::V5,
        _ => return malformed("protocol level is neither 4 nor 5"),
    };
    let flags = r.u8("connect flags")?;
    let keep_alive = r.u16("keep alive")?;
    let mut p = if version == Version::V5 { props(&mut r, CONNECT_PROPS)? } else { Props::default() };
    let client_id = r.name("client identifier")?.to_owned();
    let will = if flags & 0b0000_0100 != 0 {
        let mut wp = if version == Version::V5 { props(&mut r, WILL_PROPS)? } else { Props::default() };
        let topic = r.name("will topic")?.to_owned();
        let payload = Bytes::copy_from_slice(r.binary("will payload")?);
        Some(WillSpec {
            topic,
            payload,
            qos: (flags >> 3) & 0b11,
            retain: flags & 0b0010_0000 != 0,
            delay_secs: wp.will_delay.unwrap_or(0),
            expiry_secs: wp.message_expiry,
            properties: wp.forwarded(),
        })
    } else {
        None
    };
    let username = if flags & 0b1000_0000 != 0 { Some(r.string("user name")?.to_owned()) } else { None };
    let password = if flags & 0b0100_0000 != 0 { Some(Zeroizing::new(r.binary("password")?.to_vec())) } else { None };
    if !r.is_empty() {
        return malformed("bytes after the CONNECT payload");
    }
    Ok(Connect {
        version,
        clean_start: flags & 0b0000_0010 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        session_expiry_secs: p.session_expiry.take(),
        receive_maximum: p.receive_maximum,
        max_packet_size: p.max_packet_size,
        auth_method: p.auth_method.take(),
    })
}

/// A packet identifier, which is never 0 (MQTT-2.2.1-3).
fn packet_id(r: &mut Reader<'_>) -> Result<u16> {
    match r.u16("packet id")? {
        0 => Err(DecodeError::Protocol("packet id 0")),
        id => Ok(id),
    }
}

fn ack(r: &mut Reader<'_>, version: Version) -> Result<Ack> {
    let pkid = packet_id(r)?;
    let mut reason = 0;
    if version == Version::V5 && !r.is_empty() {
        reason = r.u8("reason code")?;
        if !r.is_empty() {
            props(r, ACK_PROPS)?;
        }
    }
    if !r.is_empty() {
        return malformed("bytes after the acknowledgement");
    }
    Ok(Ack { pkid, reason })
}

fn publish(frame: &Frame, version: Version) -> Result<Publish> {
    let mut r = Reader::new(frame.body());
    let qos = (frame.header >> 1) & 0b11;
    let topic = r.name("topic name")?.to_owned();
    let pkid = if qos > 0 { packet_id(&mut r)? } else { 0 };
    let mut p = if version == Version::V5 { props(&mut r, PUBLISH_PROPS)? } else { Props::default() };
    let payload = Bytes::copy_from_slice(r.rest());
    Ok(Publish {
        dup: frame.header & 0b1000 != 0,
        qos,
        retain: frame.header & 1 != 0,
        topic,
        pkid,
        payload,
        expiry_secs: p.message_expiry,
        topic_alias: p.topic_alias,
        properties: p.forwarded(),
    })
}

fn subscribe(r: &mut Reader<'_>, version: Version) -> Result<Subscribe> {
    let pkid = packet_id(r)?;
    let id = if version == Version::V5 { props(r, SUBSCRIBE_PROPS)?.subscription_id } else { None };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.name("topic filter")?.to_owned();
        let o = r.u8("subscription options")?;
        let reserved = if version == Version::V5 { o & 0b1100_0000 } else { o & 0b1111_1100 };
        if reserved != 0 {
            return malformed("reserved subscription option bits set");
        }
        let qos = o & 0b11;
        if qos == 3 {
            return malformed("subscription QoS 3");
        }
        let retain_handling = (o >> 4) & 0b11;
        if retain_handling == 3 {
            return Err(DecodeError::Protocol("retain handling 3"));
        }
        let options =
            FilterOptions { qos, no_local: o & 0b0100 != 0, retain_as_published: o & 0b1000 != 0, retain_handling };
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without a filter"));
    }
    Ok(Subscribe { pkid, id, filters })
}

fn unsubscribe(r: &mut Reader<'_>, version: Version) -> Result<Unsubscribe> {
    let pkid = packet_id(r)?;
    if version == Version::V5 {
        props(r, UNSUBSCRIBE_PROPS)?;
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.name("topic filter")?.to_owned());
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without a filter"));
    }
    Ok(Unsubscribe { pkid, filters })
}

fn disconnect(r: &mut Reader<'_>, version: Version) -> Result<Disconnect> {
    let mut d = Disconnect { reason: 0, session_expiry_secs: None };
    if version == Version::V5 && !r.is_empty() {
        d.reason = r.u8("reason code")?;
        if !r.is_empty() {
            d.session_expiry_secs = props(r, DISCONNECT_PROPS)?.session_expiry;
        }
    }
    if !r.is_empty() {
        return malformed("bytes after the DISCONNECT");
    }
    Ok(d)
}

/// Parses a frame (already checked by [`super::next_frame`]) from a
/// logged-in client.
///
/// # Errors
/// What is wrong with it.
pub fn packet(frame: &Frame, version: Version) -> Result<Packet> {
    let mut r = Reader::new(frame.body());
    let packet = match frame.kind() {
        kind::PUBLISH => Packet::Publish(publish(frame, version)?),
        kind::PUBACK => Packet::PubAck(ack(&mut r, version)?),
        kind::PUBREC => Packet::PubRec(ack(&mut r, version)?),
        kind::PUBREL => Packet::PubRel(ack(&mut r, version)?),
        kind::PUBCOMP => Packet::PubComp(ack(&mut r, version)?),
        kind::SUBSCRIBE => Packet::Subscribe(subscribe(&mut r, version)?),
        kind::UNSUBSCRIBE => Packet::Unsubscribe(unsubscribe(&mut r, version)?),
        kind::PINGREQ => {
            if !r.is_empty() {
                return malformed("PINGREQ with a body");
            }
            Packet::PingReq
        }
        kind::DISCONNECT => Packet::Disconnect(disconnect(&mut r, version)?),
        kind::CONNECT => Packet::Connect,
        kind::AUTH => Packet::Auth,
        _ => return malformed("packet type a client may not send"),
    };
    Ok(packet)
}
