//! The v1 topic layout, in one place.
//!
//! ```text
//! mqseal/v1/dev/{device}/cmd        controller -> device   commands (both modes)
//! mqseal/v1/dev/{device}/resp       device -> controller   responses / receipts
//! mqseal/v1/dev/{device}/chal/req   controller -> device   challenge requests
//! mqseal/v1/dev/{device}/chal       device -> controller   challenges
//! mqseal/v1/dev/{device}/status     device (retained)      "online" / last will "offline"
//! ```
//!
//! Headers carry the topic an envelope was published on, and receivers
//! compare it with the topic it arrived on, so a broker (or anyone who can
//! publish) cannot move an envelope from one channel or device to another.
//! These names are released: they stay stable within `v1`.

use crate::limits::MAX_TOPIC_LEN;
use crate::{Error, Result, validate_id};

/// The common prefix of every mqseal topic.
pub const ROOT: &str = "mqseal/v1/dev/";

/// A topic name with a fixed capacity, so building one needs no allocator.
pub type Topic = heapless::String<MAX_TOPIC_LEN>;

/// The five channels of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Controller to device: commands.
    Command,
    /// Device to controller: responses (execution receipts).
    Response,
    /// Device to controller: challenges.
    Challenge,
    /// Controller to device: requests for a challenge.
    ChallengeRequest,
    /// Device, retained: `online`, or the last will `offline`.
    Status,
}

impl Channel {
    /// All channels, in documentation order.
    pub const ALL: [Channel; 5] =
        [Channel::Command, Channel::Response, Channel::ChallengeRequest, Channel::Challenge, Channel::Status];

    /// What controllers publish and a device subscribes to.
    pub const TO_DEVICE: [Channel; 2] = [Channel::Command, Channel::ChallengeRequest];

    /// What a device publishes and controllers subscribe to.
    pub const FROM_DEVICE: [Channel; 3] = [Channel::Response, Channel::Challenge, Channel::Status];

    /// The topic levels after the device id.
    #[must_use]
    pub const fn suffix(self) -> &'static str {
        match self {
            Channel::Command => "cmd",
            Channel::Response => "resp",
            Channel::Challenge => "chal",
            Channel::ChallengeRequest => "chal/req",
            Channel::Status => "status",
        }
    }
}

/// The topic of `channel` for `device`.
///
/// # Errors
/// [`Error::InvalidId`] when `device` is not a valid device id — which is also
/// what keeps wildcards and `/` out of the topic.
pub fn topic(device: &str, channel: Channel) -> Result<Topic> {
    validate_id(device)?;
    let mut t = Topic::new();
    // Cannot overflow: ROOT (14) + id (<= 64) + "/" + suffix (<= 8) < 128.
    // Pushed piece by piece rather than with `write!`, which would link
    // core::fmt (about 1 KiB) into a microcontroller's image.
    pieces(device, channel)
        .iter()
        .try_for_each(|part| t.push_str(part))
        .map_err(|_| Error::limit_exceeded(&"topic", MAX_TOPIC_LEN))?;
    Ok(t)
}

/// The topic of `channel` for `device` as the pieces it is made of, for a
/// writer that need not join them (a device's response header). `device`
/// must be a valid id, as a device's own is.
pub(crate) fn pieces(device: &str, channel: Channel) -> [&str; 4] {
    [ROOT, device, "/", channel.suffix()]
}

/// Splits an mqseal topic into its device id and channel.
///
/// Returns `None` for anything that is not exactly one of the five topics of
/// a valid device id: the broker uses this for its access rules, so it is
/// strict rather than forgiving.
#[must_use]
pub fn parse(topic: &str) -> Option<(&str, Channel)> {
    let rest = topic.strip_prefix(ROOT)?;
    // A plain search rather than `split_once('/')`, whose pattern search
    // links memchr (about 170 B on a microcontroller).
    let slash = rest.bytes().position(|b| b == b'/')?;
    let (device, suffix) = (rest.get(..slash)?, rest.get(slash + 1..)?);
    validate_id(device).ok()?;
    let channel = Channel::ALL.into_iter().find(|c| c.suffix() == suffix)?;
    Some((device, channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        for ch in Channel::ALL {
            let t = topic("dev-1", ch).unwrap();
            assert_eq!(parse(&t), Some(("dev-1", ch)));
        }
        assert_eq!(topic("dev-1", Channel::ChallengeRequest).unwrap(), "mqseal/v1/dev/dev-1/chal/req");
    }

    #[test]
    fn longest_id_fits() {
        let id = "x".repeat(64);
        assert!(topic(&id, Channel::ChallengeRequest).is_ok());
    }

    #[test]
    fn wildcards_and_strangers_are_refused() {
        assert_eq!(topic("+", Channel::Command), Err(Error::InvalidId));
        assert_eq!(topic("a/b", Channel::Command), Err(Error::InvalidId));
        for t in [
            "mqseal/v1/dev/+/cmd",
            "mqseal/v1/dev/#",
            "mqseal/v1/dev/a/cmd/x",
            "mqseal/v1/dev/a/chal/req/",
            "mqseal/v1/dev//cmd",
            "mqseal/v2/dev/a/cmd",
            "other",
        ] {
            assert_eq!(parse(t), None, "{t}");
        }
    }
}
