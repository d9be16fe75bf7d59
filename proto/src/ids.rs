//! Identifiers: device ids and message ids.

use core::fmt;

use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};

use crate::limits::{MAX_ID_LEN, MSG_ID_LEN};
use crate::{Error, Result};

/// Checks that `id` can be a device id.
///
/// Device ids become MQTT client ids and topic levels
/// (`mqseal/v1/dev/{id}/cmd`), so `+`, `#`, `/` and NUL would let one device
/// subscribe to or publish on another's topics. Rather than forbid those four
/// we allow a short, conservative set (the one AWS IoT uses for thing names,
/// plus `.`): `A-Z a-z 0-9 - _ . :`, 1 to 64 bytes. A leading `$` (reserved
/// topics) is excluded by the same rule.
///
/// # Errors
/// [`Error::InvalidId`] when the id breaks the rule.
pub fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(Error::InvalidId);
    }
    for b in id.bytes() {
        if !matches!(b, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':') {
            return Err(Error::InvalidId);
        }
    }
    Ok(())
}

/// 16 random bytes naming one message.
///
/// Sealed-mode devices remember `(sender key, message id)` to refuse replays;
/// responses name the id of the command they answer. 128 random bits make a
/// collision between two honest senders negligible, so ids need no
/// coordination.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MsgId(pub [u8; MSG_ID_LEN]);

impl MsgId {
    /// Draws a fresh id from the caller's random number generator.
    pub fn random<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut id = [0u8; MSG_ID_LEN];
        rng.fill_bytes(&mut id);
        MsgId(id)
    }
}

impl fmt::Debug for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MsgId({self})")
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_documented_rule() {
        for good in ["a", "dev-1", "gw_2.site:3", "A".repeat(64).as_str()] {
            assert_eq!(validate_id(good), Ok(()), "{good}");
        }
        let long = "a".repeat(65);
        for bad in ["", "a/b", "a+b", "a#b", "a\0b", "$SYS", "a b", "é", &long] {
            assert_eq!(validate_id(bad), Err(Error::InvalidId), "{bad:?}");
        }
    }

    #[test]
    fn msg_id_displays_as_lowercase_hex() {
        let id = MsgId([0xab; 16]);
        let mut s = heapless::String::<40>::new();
        fmt::write(&mut s, format_args!("{id}")).unwrap();
        assert_eq!(s.as_str(), "abababababababababababababababab");
    }
}
