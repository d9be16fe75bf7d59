//! What the router carries: messages, subscription options, wills.

use std::sync::Arc;

use bytes::Bytes;

/// Wall-clock time in milliseconds since the Unix epoch, passed in by the
/// caller. Wall time rather than a monotonic instant because expiry
/// deadlines (message expiry, session expiry, will delay) are persisted
/// and must mean the same thing after a restart.
pub type Millis = u64;

/// The time `secs` seconds after `now`, for the expiry intervals MQTT
/// gives in seconds (message expiry, session expiry, will delay).
#[must_use]
pub fn secs_after(now: Millis, secs: u32) -> Millis {
    now.saturating_add(u64::from(secs) * 1000)
}

/// MQTT quality of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// At most once.
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a wire value, `None` for 3.
    #[must_use]
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }
}

/// MQTT 5 properties a message carries from publisher to subscriber
/// unchanged (§3.3.2.3). Boxed inside [`Message`]: most of mqseal's traffic
/// has none, and an absent box costs one pointer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    /// Payload Format Indicator.
    pub payload_format_indicator: Option<u8>,
    /// Content Type.
    pub content_type: Option<String>,
    /// Response Topic.
    pub response_topic: Option<String>,
    /// Correlation Data.
    pub correlation_data: Option<Bytes>,
    /// User Properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// One published message, shared by every subscriber it goes to: the
/// router holds it in one `Arc`, and its payload is a `Bytes` of its own
/// (the front copies it out of the read buffer, so a queued message never
/// pins the buffer it arrived in — rumqttd issue #1001).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: Arc<str>,
    /// Payload.
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
    /// The publisher's RETAIN flag.
    pub retain: bool,
    /// When it expires (MQTT 5 Message Expiry Interval, made absolute).
    pub expires_at: Option<Millis>,
    /// MQTT 5 properties forwarded to subscribers.
    pub properties: Option<Box<Properties>>,
}

impl Message {
    /// A message without expiry or properties.
    #[must_use]
    pub fn new(topic: &str, payload: impl Into<Bytes>, qos: QoS, retain: bool) -> Self {
        Self { topic: topic.into(), payload: payload.into(), qos, retain, expires_at: None, properties: None }
    }

    /// What the message costs a queue: its topic and payload bytes. The
    /// `Arc` and the queue entry are counted in messages, not bytes.
    #[must_use]
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }

    /// Whether it has expired at `now`.
    #[must_use]
    pub fn expired(&self, now: Millis) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Seconds of life left, rounded up, for the Message Expiry Interval a
    /// v5 subscriber receives (MQTT-3.3.2-6).
    #[must_use]
    pub fn expiry_left_secs(&self, now: Millis) -> Option<u32> {
        self.expires_at.map(|at| u32::try_from(at.saturating_sub(now).div_ceil(1000)).unwrap_or(u32::MAX))
    }
}

/// MQTT 5 Retain Handling (§3.8.3.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetainHandling {
    /// Send retained messages on every subscribe.
    #[default]
    OnSubscribe,
    /// Only when the subscription did not exist before.
    OnNewSubscription,
    /// Never.
    Never,
}

/// A subscription's options (MQTT 5 §3.8.3.1; a 3.1.1 client gets the
/// defaults with its QoS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubOptions {
    /// The maximum QoS it receives at.
    pub qos: QoS,
    /// Do not deliver the subscriber's own publishes.
    pub no_local: bool,
    /// Keep the publisher's RETAIN flag on live deliveries.
    pub retain_as_published: bool,
    /// Whether subscribing sends retained messages.
    pub retain_handling: RetainHandling,
    /// Subscription Identifier, sent back with each matching message.
    pub id: Option<u32>,
}

impl SubOptions {
    /// Plain options at `qos`.
    #[must_use]
    pub fn qos(qos: QoS) -> Self {
        Self {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::OnSubscribe,
            id: None,
        }
    }
}

/// A client's will, held by the router for the life of its session so that
/// a delay can outlive the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    /// What to publish.
    pub message: Message,
    /// MQTT 5 Will Delay Interval in seconds (0 for 3.1.1).
    pub delay_secs: u32,
    /// MQTT 5 Message Expiry Interval of the will, which starts when the
    /// will is published.
    pub expiry_secs: Option<u32>,
}
