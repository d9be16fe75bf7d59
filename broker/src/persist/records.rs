//! How router state is written down: one postcard record per key.
//!
//! The records mirror the router's types field by field rather than
//! deriving serde on them: the router stays free of a storage format, and
//! a change to a router type cannot change the file format unnoticed —
//! it has to come through here, where [`super::FORMAT`] is bumped with it.
//! Payloads and strings are borrowed from the stored bytes on decode.

use std::sync::Arc;

use bytes::Bytes;
use mqseal_router::{Message, Properties, QoS, RetainHandling, SessionState, StoredItem, SubOptions};
use serde::{Deserialize, Serialize};

/// A record that does not decode: the store is damaged (or was written
/// by something else).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRecord(pub String);

#[derive(Serialize, Deserialize)]
struct PropsRec<'a> {
    payload_format_indicator: Option<u8>,
    #[serde(borrow)]
    content_type: Option<&'a str>,
    #[serde(borrow)]
    response_topic: Option<&'a str>,
    #[serde(borrow)]
    correlation_data: Option<&'a [u8]>,
    #[serde(borrow)]
    user_properties: Vec<(&'a str, &'a str)>,
}

#[derive(Serialize, Deserialize)]
struct MessageRec<'a> {
    topic: &'a str,
    payload: &'a [u8],
    qos: u8,
    retain: bool,
    expires_at: Option<u64>,
    #[serde(borrow)]
    properties: Option<PropsRec<'a>>,
}

#[derive(Serialize, Deserialize)]
enum ItemRec<'a> {
    Publish {
        #[serde(borrow)]
        message: MessageRec<'a>,
        qos: u8,
        retain: bool,
        subscription_ids: Vec<u32>,
        pkid: Option<u16>,
    },
    Released(u16),
}

#[derive(Serialize, Deserialize)]
struct SubRec<'a> {
    filter: &'a str,
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: u8,
    id: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct SessionRec<'a> {
    expiry_secs: u32,
    #[serde(borrow)]
    subscriptions: Vec<SubRec<'a>>,
    incoming_qos2: Vec<u16>,
}

fn qos(v: u8) -> Result<QoS, BadRecord> {
    QoS::from_u8(v).ok_or_else(|| BadRecord(format!("QoS {v}")))
}

fn message_rec(m: &Message) -> MessageRec<'_> {
    MessageRec {
        topic: &m.topic,
        payload: &m.payload,
        qos: m.qos as u8,
        retain: m.retain,
        expires_at: m.expires_at,
        properties: m.properties.as_deref().map(|p| PropsRec {
            payload_format_indicator: p.payload_format_indicator,
            content_type: p.content_type.as_deref(),
            response_topic: p.response_topic.as_deref(),
            correlation_data: p.correlation_data.as_deref(),
            user_properties: p.user_properties.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
        }),
    }
}

fn message(r: MessageRec<'_>) -> Result<Message, BadRecord> {
    if !mqseal_router::topic::valid_topic_name(r.topic) {
        return Err(BadRecord(format!("topic {:?}", r.topic)));
    }
    Ok(Message {
        topic: r.topic.into(),
        payload: Bytes::copy_from_slice(r.payload),
        qos: qos(r.qos)?,
        retain: r.retain,
        expires_at: r.expires_at,
        properties: r.properties.map(|p| {
            Box::new(Properties {
                payload_format_indicator: p.payload_format_indicator,
                content_type: p.content_type.map(str::to_owned),
                response_topic: p.response_topic.map(str::to_owned),
                correlation_data: p.correlation_data.map(Bytes::copy_from_slice),
                user_properties: p.user_properties.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            })
        }),
    })
}

fn encode(value: &impl Serialize) -> Vec<u8> {
    // Serialising into a Vec cannot fail for these types (no maps with
    // non-string keys, no unsized sequences).
    postcard::to_allocvec(value).unwrap_or_default()
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, BadRecord> {
    postcard::from_bytes(bytes).map_err(|e| BadRecord(e.to_string()))
}

/// A retained message's record.
pub fn encode_message(m: &Message) -> Vec<u8> {
    encode(&message_rec(m))
}

/// Reads a retained message's record.
pub fn decode_message(bytes: &[u8]) -> Result<Message, BadRecord> {
    message(decode(bytes)?)
}

/// A session entry's record.
pub fn encode_item(item: &StoredItem) -> Vec<u8> {
    encode(&match item {
        StoredItem::Publish { message, qos, retain, subscription_ids, pkid } => ItemRec::Publish {
            message: message_rec(message),
            qos: *qos as u8,
            retain: *retain,
            subscription_ids: subscription_ids.to_vec(),
            pkid: *pkid,
        },
        StoredItem::Released(pkid) => ItemRec::Released(*pkid),
    })
}

/// Reads a session entry's record.
pub fn decode_item(bytes: &[u8]) -> Result<StoredItem, BadRecord> {
    Ok(match decode(bytes)? {
        ItemRec::Publish { message: m, qos: q, retain, subscription_ids, pkid } => {
            let qos = qos(q)?;
            // The router never stores QoS 0 (its counters would not know
            // such an entry), and packet id 0 does not exist.
            if qos == QoS::AtMostOnce {
                return Err(BadRecord("a QoS 0 copy".into()));
            }
            if pkid == Some(0) {
                return Err(BadRecord("packet id 0".into()));
            }
            StoredItem::Publish {
                message: Arc::new(message(m)?),
                qos,
                retain,
                subscription_ids: subscription_ids.into_boxed_slice(),
                pkid,
            }
        }
        ItemRec::Released(0) => return Err(BadRecord("packet id 0".into())),
        ItemRec::Released(pkid) => StoredItem::Released(pkid),
    })
}

fn retain_handling(v: u8) -> Result<RetainHandling, BadRecord> {
    match v {
        0 => Ok(RetainHandling::OnSubscribe),
        1 => Ok(RetainHandling::OnNewSubscription),
        2 => Ok(RetainHandling::Never),
        _ => Err(BadRecord(format!("retain handling {v}"))),
    }
}

/// A session's record (the client id is its key).
pub fn encode_session(s: &SessionState) -> Vec<u8> {
    encode(&SessionRec {
        expiry_secs: s.expiry_secs,
        subscriptions: s
            .subscriptions
            .iter()
            .map(|(filter, o)| SubRec {
                filter,
                qos: o.qos as u8,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                retain_handling: match o.retain_handling {
                    RetainHandling::OnSubscribe => 0,
                    RetainHandling::OnNewSubscription => 1,
                    RetainHandling::Never => 2,
                },
                id: o.id,
            })
            .collect(),
        incoming_qos2: s.incoming_qos2.clone(),
    })
}

/// A packet id that occurs more than once, if any: two live entries with
/// one id cannot both be acknowledged.
pub fn repeated_id(ids: impl IntoIterator<Item = u16>) -> Option<u16> {
    let mut ids: Vec<u16> = ids.into_iter().collect();
    ids.sort_unstable();
    ids.windows(2).find_map(|w| match w {
        [a, b] if a == b => Some(*a),
        _ => None,
    })
}

/// Reads a session's record.
pub fn decode_session(client_id: &str, bytes: &[u8]) -> Result<SessionState, BadRecord> {
    let r: SessionRec<'_> = decode(bytes)?;
    let mut subscriptions = Vec::with_capacity(r.subscriptions.len());
    for s in r.subscriptions {
        if !mqseal_router::topic::valid_filter(s.filter) {
            return Err(BadRecord(format!("filter {:?}", s.filter)));
        }
        let opts = SubOptions {
            qos: qos(s.qos)?,
            no_local: s.no_local,
            retain_as_published: s.retain_as_published,
            retain_handling: retain_handling(s.retain_handling)?,
            id: s.id,
        };
        subscriptions.push((Box::from(s.filter), opts));
    }
    if r.incoming_qos2.contains(&0) {
        return Err(BadRecord("incoming QoS 2 packet id 0".into()));
    }
    if let Some(id) = repeated_id(r.incoming_qos2.iter().copied()) {
        return Err(BadRecord(format!("incoming QoS 2 packet id {id} twice")));
    }
    Ok(SessionState {
        client_id: client_id.into(),
        expiry_secs: r.expiry_secs,
        subscriptions,
        incoming_qos2: r.incoming_qos2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_record_with_a_repeated_or_zero_incoming_id_is_refused() {
        assert_eq!(repeated_id([3, 1, 2]), None);
        assert_eq!(repeated_id([3, 1, 3]), Some(3));
        let state = |ids: Vec<u16>| SessionState {
            client_id: "dev".into(),
            expiry_secs: 60,
            subscriptions: Vec::new(),
            incoming_qos2: ids,
        };
        assert!(decode_session("dev", &encode_session(&state(vec![4, 5]))).is_ok());
        assert!(decode_session("dev", &encode_session(&state(vec![4, 5, 4]))).is_err());
        assert!(decode_session("dev", &encode_session(&state(vec![0]))).is_err());
    }

    #[test]
    fn records_round_trip() {
        let mut m = Message::new("cmd/dev-1", &b"\x00\xffpayload"[..], QoS::ExactlyOnce, true);
        m.expires_at = Some(1_234);
        m.properties = Some(Box::new(Properties {
            payload_format_indicator: Some(1),
            content_type: Some("application/cbor".into()),
            response_topic: Some("reply".into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            user_properties: vec![("k".into(), "v".into())],
        }));
        assert_eq!(decode_message(&encode_message(&m)).unwrap(), m);
        let item = StoredItem::Publish {
            message: Arc::new(m),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![3, 9].into_boxed_slice(),
            pkid: Some(7),
        };
        assert_eq!(decode_item(&encode_item(&item)).unwrap(), item);
        assert_eq!(decode_item(&encode_item(&StoredItem::Released(5))).unwrap(), StoredItem::Released(5));
        let opts = SubOptions { no_local: true, id: Some(4), ..SubOptions::qos(QoS::AtLeastOnce) };
        let s = SessionState {
            client_id: "dev-1".into(),
            expiry_secs: 60,
            subscriptions: vec![("cmd/dev-1".into(), opts)],
            incoming_qos2: vec![1, 2],
        };
        assert_eq!(decode_session("dev-1", &encode_session(&s)).unwrap(), s);
    }

    #[test]
    fn a_bad_record_is_an_error_not_a_panic() {
        for bytes in [&b""[..], b"\xff\xff\xff", b"\x00\x05ab"] {
            assert!(decode_item(bytes).is_err());
            assert!(decode_message(bytes).is_err());
            assert!(decode_session("x", bytes).is_err());
        }
        let mut ok = encode_item(&StoredItem::Released(5));
        ok.insert(0, 9);
        assert!(decode_item(&ok).is_err(), "an unknown variant");
    }
}
