//! Challenge mode: HMAC-SHA256 challenge-response, for microcontrollers.
//!
//! This is the Arduino design (seed 003) made safe to put on a network:
//!
//! 1. the controller publishes a [`Kind::ChallengeRequest`] on `…/chal/req`;
//! 2. the device answers with a fresh random challenge on `…/chal`
//!    ([`Kind::Challenge`]), remembering it in its [`ChallengeTable`];
//! 3. the controller publishes a [`Kind::ChallengeCommand`] on `…/cmd`: a
//!    [`Header`], the challenge, and a tag over both and the command
//!    ([`mac`] has the exact bytes). In *hidden* form only the tag travels and
//!    the device finds which of its registered commands it matches; in
//!    *explicit* form the command and its arguments travel too;
//! 4. the device executes and answers with a [`Kind::ChallengeResponse`] on
//!    `…/resp`, tagged the same way; a hidden response is identified by the
//!    controller among the responses it knows.
//!
//! Freshness comes from the challenge, which is single use and short-lived,
//! so the device needs no clock. If it has one, it also checks the header's
//! times. Keys are per device and 256 bits.
//!
//! What this mode does *not* give: confidentiality of explicit commands and
//! outcomes (they travel in clear), and non-repudiation (the key is shared
//! with the controller). docs/SECURITY.md has the full account.
//!
//! [`Kind::ChallengeRequest`]: crate::Kind::ChallengeRequest
//! [`Kind::Challenge`]: crate::Kind::Challenge
//! [`Kind::ChallengeCommand`]: crate::Kind::ChallengeCommand
//! [`Kind::ChallengeResponse`]: crate::Kind::ChallengeResponse
//! [`Header`]: crate::Header

mod controller;
mod device;
pub mod mac;
mod table;

pub use controller::{Answer, ChallengeController, Offer, Pending};
pub use device::{ChallengeDevice, Clock, Registered, ReplyTo, Verified, command_msg_id};
pub use mac::{Form, HmacKey};
pub use table::ChallengeTable;

use crate::limits::{CHALLENGE_LEN, TAG_LEN};
use crate::wire::{Call, Decode, Encode, Outcome, Reader, Sink};
use crate::{Header, MsgId};

/// Body of a challenge request (`…/chal/req`). Unauthenticated on purpose:
/// answering costs the device one table slot, and a forged request gains
/// nothing — a challenge is useless without the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestBody<'a> {
    device: &'a str,
    msg_id: MsgId,
}

/// Body of a challenge (`…/chal`). `in_reply_to` lets several controllers
/// share the topic and each pick its own challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChallengeBody<'a> {
    device: &'a str,
    in_reply_to: MsgId,
    challenge: [u8; CHALLENGE_LEN],
    ttl_ms: u32,
}

/// Body of a challenge-mode command (`…/cmd`). `call` is absent in hidden form.
#[derive(Debug, Clone, PartialEq, Eq)]
///
/// The challenge and the tag are borrowed from the frame, not copied: the
/// decoded body is the largest value on a device's deepest path.
struct CommandBody<'a> {
    header: Header<'a>,
    challenge: &'a [u8; CHALLENGE_LEN],
    call: Option<Call<'a>>,
    tag: &'a [u8; TAG_LEN],
}

/// Body of a challenge-mode response (`…/resp`). `outcome` is absent in hidden form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResponseBody<'a> {
    header: Header<'a>,
    in_reply_to: MsgId,
    outcome: Option<Outcome<'a>>,
    tag: [u8; TAG_LEN],
}

// Decoders and encoders, field by field in declaration order (postcard
// lays a struct out as its fields one after another).

impl<'a> Decode<'a> for RequestBody<'a> {
    fn read(r: &mut Reader<'a>) -> Self {
        RequestBody { device: r.str(), msg_id: MsgId(r.array()) }
    }
}

impl<'a> Decode<'a> for ChallengeBody<'a> {
    fn read(r: &mut Reader<'a>) -> Self {
        ChallengeBody { device: r.str(), in_reply_to: MsgId(r.array()), challenge: r.array(), ttl_ms: r.u32() }
    }
}

impl<'a> Decode<'a> for CommandBody<'a> {
    fn read(r: &mut Reader<'a>) -> Self {
        CommandBody { header: Header::read(r), challenge: r.array_ref(), call: r.maybe(), tag: r.array_ref() }
    }
}

impl<'a> Decode<'a> for ResponseBody<'a> {
    fn read(r: &mut Reader<'a>) -> Self {
        ResponseBody { header: Header::read(r), in_reply_to: MsgId(r.array()), outcome: r.maybe(), tag: r.array() }
    }
}

impl Encode for RequestBody<'_> {
    fn write<S: Sink + ?Sized>(&self, s: &mut S) {
        s.bytes(self.device.as_bytes());
        s.put(&self.msg_id.0);
    }
}

impl Encode for ChallengeBody<'_> {
    fn write<S: Sink + ?Sized>(&self, s: &mut S) {
        s.bytes(self.device.as_bytes());
        s.put(&self.in_reply_to.0);
        s.put(&self.challenge);
        s.varint(u64::from(self.ttl_ms));
    }
}

impl Encode for CommandBody<'_> {
    fn write<S: Sink + ?Sized>(&self, s: &mut S) {
        self.header.write(s);
        s.put(self.challenge);
        self.call.write(s);
        s.put(self.tag);
    }
}
