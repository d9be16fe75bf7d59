//! The header every authenticated envelope carries, and the checks on it.
//!
//! The lesson of COSE and OSCORE: nothing that steers the receiver may travel
//! unauthenticated. So the target device, the topic the sender published on,
//! the message id and the validity window are all in the header, and the
//! header is inside what the signature or tag covers.

use crate::limits::MAX_TOPIC_LEN;
use crate::topic::{Channel, topic};
use crate::wire::{Encode, Sink, limit};
use crate::{Error, MsgId, Result, validate_id};

/// Addressing and freshness, covered by the signature or tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// The device the envelope is for (commands) or from (responses).
    pub device: &'a str,
    /// The MQTT topic the sender published the envelope on.
    pub topic: &'a str,
    /// Unique per sender; see [`MsgId`].
    pub msg_id: MsgId,
    /// Seconds since the Unix epoch when the sender built the envelope;
    /// 0 from a device without a clock.
    pub issued_at: u64,
    /// Seconds since the Unix epoch after which the envelope is void;
    /// 0 from a device without a clock.
    pub expires_at: u64,
}

impl<'a> crate::wire::Decode<'a> for Header<'a> {
    fn read(r: &mut crate::wire::Reader<'a>) -> Self {
        Header { device: r.str(), topic: r.str(), msg_id: MsgId(r.array()), issued_at: r.u64(), expires_at: r.u64() }
    }
}

/// A header as it is written (encoded, or fed to a MAC), with its topic as
/// pieces to be joined: how a device writes its response header without
/// building the topic in memory (128 B of a microcontroller's stack).
pub(crate) struct HeaderOut<'a> {
    pub(crate) device: &'a str,
    /// The topic is these, concatenated.
    pub(crate) topic: &'a [&'a str],
    pub(crate) msg_id: &'a MsgId,
    pub(crate) issued_at: u64,
    pub(crate) expires_at: u64,
}

impl Encode for HeaderOut<'_> {
    fn write<S: Sink + ?Sized>(&self, s: &mut S) {
        s.bytes(self.device.as_bytes());
        s.varint(self.topic.iter().map(|p| p.len() as u64).sum());
        self.topic.iter().for_each(|p| s.put(p.as_bytes()));
        s.put(&self.msg_id.0);
        s.varint(self.issued_at);
        s.varint(self.expires_at);
    }
}

impl Encode for Header<'_> {
    fn write<S: Sink + ?Sized>(&self, s: &mut S) {
        self.out().write(s);
    }
}

impl<'a> Header<'a> {
    /// This header, to be written.
    pub(crate) fn out(&self) -> HeaderOut<'_> {
        HeaderOut {
            device: self.device,
            topic: core::slice::from_ref(&self.topic),
            msg_id: &self.msg_id,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
        }
    }
}

impl Header<'_> {
    /// Checks field shapes: a valid device id, a topic within its limit.
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::LimitExceeded`].
    pub fn validate(&self) -> Result<()> {
        validate_id(self.device)?;
        limit(&"topic", self.topic.len(), MAX_TOPIC_LEN)
    }

    /// A device's checks on a received command: the header is well formed,
    /// the envelope is for `me`, and it names the topic it actually arrived on.
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::LimitExceeded`], [`Error::WrongDevice`],
    /// [`Error::WrongTopic`].
    pub fn check_received(&self, me: &str, arrived_on: &str) -> Result<()> {
        self.validate()?;
        if self.device != me {
            return Err(Error::WrongDevice);
        }
        if self.topic != arrived_on {
            return Err(Error::WrongTopic);
        }
        Ok(())
    }

    /// A controller's checks on a received response: well formed, from
    /// `device`, naming the topic it arrived on, and that topic is the
    /// device's response topic — a response published anywhere else is not
    /// one, whatever its tag or signature says.
    ///
    /// # Errors
    /// As [`Header::check_received`].
    pub fn check_response(&self, device: &str, arrived_on: &str) -> Result<()> {
        self.check_received(device, arrived_on)?;
        if self.topic != topic(device, Channel::Response)?.as_str() {
            return Err(Error::WrongTopic);
        }
        Ok(())
    }
}

/// How much clock disagreement and how long a validity window a receiver
/// tolerates.
///
/// The skew applies at both ends of the window (as JWT's leeway does): a
/// device whose clock is slightly behind still accepts a fresh command, one
/// slightly ahead still accepts one about to expire. The lifetime cap keeps a
/// careless or compromised controller from issuing commands that stay valid
/// for years — and keeps the replay cache's memory bounded, since entries can
/// be forgotten once their envelope could no longer pass the time check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Tolerated clock difference, in seconds.
    pub max_skew_secs: u64,
    /// Longest accepted `expires_at - issued_at`, in seconds.
    pub max_lifetime_secs: u64,
}

impl Default for Policy {
    /// 60 s of skew (NTP-synchronised hosts are far closer; devices that
    /// sync at boot drift) and a 10-minute window, which leaves room for a
    /// controller to retry a command across a broker restart.
    fn default() -> Self {
        Policy { max_skew_secs: 60, max_lifetime_secs: 600 }
    }
}

impl Policy {
    /// Checks a validity window against `now` (seconds since the Unix epoch).
    ///
    /// Accepted when `issued_at <= expires_at`, the window is at most
    /// `max_lifetime_secs`, `issued_at <= now + skew` and
    /// `now < expires_at + skew`.
    ///
    /// # Errors
    /// [`Error::InvalidTimes`], [`Error::LifetimeTooLong`],
    /// [`Error::NotYetValid`], [`Error::Expired`].
    pub fn check_times(&self, issued_at: u64, expires_at: u64, now: u64) -> Result<()> {
        let lifetime = expires_at.checked_sub(issued_at).ok_or(Error::InvalidTimes)?;
        if lifetime > self.max_lifetime_secs {
            return Err(Error::LifetimeTooLong);
        }
        if issued_at > now.saturating_add(self.max_skew_secs) {
            return Err(Error::NotYetValid);
        }
        if !self.still_valid(expires_at, now) {
            return Err(Error::Expired);
        }
        Ok(())
    }

    /// Whether an envelope expiring at `expires_at` can still pass
    /// [`Policy::check_times`] at `now`. The replay cache uses the same rule
    /// to decide what it may forget.
    #[must_use]
    pub fn still_valid(&self, expires_at: u64, now: u64) -> bool {
        now < expires_at.saturating_add(self.max_skew_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy { max_skew_secs: 60, max_lifetime_secs: 600 };

    #[test]
    fn window_edges() {
        let t = 1_000_000;
        assert_eq!(P.check_times(t, t + 600, t), Ok(()));
        assert_eq!(P.check_times(t, t + 601, t), Err(Error::LifetimeTooLong));
        assert_eq!(P.check_times(t + 1, t, t), Err(Error::InvalidTimes));
        assert_eq!(P.check_times(t + 60, t + 100, t), Ok(()));
        assert_eq!(P.check_times(t + 61, t + 100, t), Err(Error::NotYetValid));
        assert_eq!(P.check_times(t - 100, t - 60, t), Err(Error::Expired));
        assert_eq!(P.check_times(t - 100, t - 59, t), Ok(()));
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        assert_eq!(P.check_times(u64::MAX, u64::MAX, 0), Err(Error::NotYetValid));
        assert_eq!(P.check_times(0, 0, u64::MAX), Err(Error::Expired));
        assert_eq!(P.check_times(0, u64::MAX, 0), Err(Error::LifetimeTooLong));
    }

    #[test]
    fn address_checks() {
        let h = Header { device: "a", topic: "t", msg_id: MsgId([0; 16]), issued_at: 0, expires_at: 0 };
        assert_eq!(h.check_received("a", "t"), Ok(()));
        assert_eq!(h.check_received("b", "t"), Err(Error::WrongDevice));
        assert_eq!(h.check_received("a", "u"), Err(Error::WrongTopic));
        let bad = Header { device: "a/b", ..h };
        assert_eq!(bad.check_received("a/b", "t"), Err(Error::InvalidId));
    }

    #[test]
    fn responses_must_be_on_the_devices_response_topic() {
        let resp = topic("a", Channel::Response).unwrap();
        let h = Header { device: "a", topic: &resp, msg_id: MsgId([0; 16]), issued_at: 0, expires_at: 0 };
        assert_eq!(h.check_response("a", &resp), Ok(()));
        let cmd = topic("a", Channel::Command).unwrap();
        let on_cmd = Header { topic: &cmd, ..h };
        assert_eq!(
            on_cmd.check_response("a", &cmd),
            Err(Error::WrongTopic),
            "arrived where it says, but not a response topic"
        );
        assert_eq!(h.check_response("a", &cmd), Err(Error::WrongTopic));
        assert_eq!(h.check_response("b", &resp), Err(Error::WrongDevice));
    }
}
