//! The controller's side of challenge mode.

use super::mac::{Form, HmacKey, MacInput, Tag};
use super::{ChallengeBody, CommandBody, RequestBody, ResponseBody};
use crate::limits::{CHALLENGE_LEN, TAG_LEN};
use crate::wire::{self, Call, Kind, Outcome};
use crate::{Error, Header, MsgId, Result, validate_id};

/// A challenge the device offered in answer to our request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// The challenge to tag the command over.
    pub challenge: [u8; CHALLENGE_LEN],
    /// How long the device keeps it, in milliseconds.
    pub ttl_ms: u32,
}

/// What the controller remembers about a command it sent, to recognise the
/// one response that answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The challenge the command was tagged over.
    pub challenge: [u8; CHALLENGE_LEN],
    /// The command's message id.
    pub msg_id: MsgId,
}

/// A verified response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer<'a> {
    /// The outcome travelled with the response.
    Explicit(Outcome<'a>),
    /// Hidden form: the index of the candidate outcome the tag matched.
    Hidden(usize),
}

/// A controller talking to one challenge-mode device.
#[derive(Debug, Clone)]
pub struct ChallengeController<'k> {
    device: &'k str,
    key: &'k HmacKey,
}

impl<'k> ChallengeController<'k> {
    /// A controller for `device`, which holds `key`.
    ///
    /// # Errors
    /// [`Error::InvalidId`] when `device` is not a valid device id.
    pub fn new(device: &'k str, key: &'k HmacKey) -> Result<Self> {
        validate_id(device)?;
        Ok(ChallengeController { device, key })
    }

    /// Writes a challenge request with id `msg_id` into `out`.
    ///
    /// # Errors
    /// [`Error::BufferTooSmall`].
    pub fn request(&self, msg_id: MsgId, out: &mut [u8]) -> Result<usize> {
        wire::encode_into(Kind::ChallengeRequest, &RequestBody { device: self.device, msg_id }, out)
    }

    /// Reads a challenge, accepting it only if it answers `request`.
    ///
    /// Challenges are not authenticated: a forged one only makes the command
    /// fail at the device, which the controller sees as a timeout.
    ///
    /// # Errors
    /// Decoding errors, [`Error::WrongDevice`], [`Error::UnexpectedReply`].
    pub fn read_challenge(&self, frame: &[u8], request: MsgId) -> Result<Offer> {
        let body: ChallengeBody<'_> = wire::decode(wire::body(frame, Kind::Challenge)?)?;
        if body.device != self.device {
            return Err(Error::WrongDevice);
        }
        if body.in_reply_to != request {
            return Err(Error::UnexpectedReply);
        }
        Ok(Offer { challenge: body.challenge, ttl_ms: body.ttl_ms })
    }

    /// Writes a tagged command into `out`, returning its length.
    ///
    /// The header is the caller's so that it controls the message id and the
    /// validity window; build its topic with
    /// [`topic(device, Channel::Command)`](crate::topic::topic). In hidden
    /// form the call is tagged but not sent.
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::LimitExceeded`], [`Error::BufferTooSmall`].
    pub fn command(
        &self,
        header: &Header<'_>,
        challenge: &[u8; CHALLENGE_LEN],
        call: &Call<'_>,
        form: Form,
        out: &mut [u8],
    ) -> Result<usize> {
        header.validate()?;
        call.validate()?;
        let mut tag = [0u8; TAG_LEN];
        MacInput::command_tag(self.key, form, challenge, header, call, Tag::Write(&mut tag))?;
        let body = CommandBody {
            header: *header,
            challenge,
            call: match form {
                Form::Explicit => Some(*call),
                Form::Hidden => None,
            },
            tag: &tag,
        };
        wire::encode_into(Kind::ChallengeCommand, &body, out)
    }

    /// Verifies the response to `pending` that arrived on `arrived_on`.
    ///
    /// In hidden form the tag is matched against `candidates` (the outcomes
    /// the controller knows the command can have), every one of them, in
    /// constant time per candidate.
    ///
    /// # Errors
    /// Decoding errors, [`Error::WrongDevice`], [`Error::WrongTopic`],
    /// [`Error::UnexpectedReply`], [`Error::BadTag`].
    pub fn read_response<'a>(
        &self,
        frame: &'a [u8],
        arrived_on: &str,
        pending: &Pending,
        candidates: &[Outcome<'_>],
    ) -> Result<Answer<'a>> {
        let ResponseBody { header, in_reply_to, outcome, tag } =
            wire::decode(wire::body(frame, Kind::ChallengeResponse)?)?;
        header.check_response(self.device, arrived_on)?;
        if let Some(o) = &outcome {
            o.validate()?;
        }
        if in_reply_to != pending.msg_id {
            return Err(Error::UnexpectedReply);
        }
        let tag_matches = |form, o: &Outcome<'_>| {
            MacInput::response_tag(
                self.key,
                form,
                &pending.challenge,
                &header.out(),
                &in_reply_to,
                o,
                Tag::Compare(&tag),
            )
            .map(bool::from)
        };
        match outcome {
            Some(o) => {
                if tag_matches(Form::Explicit, &o)? {
                    Ok(Answer::Explicit(o))
                } else {
                    Err(Error::BadTag)
                }
            }
            None => {
                let mut found = None;
                for (i, c) in candidates.iter().enumerate() {
                    // Candidates are the controller's own list, not secrets;
                    // the comparison itself is still constant time.
                    if tag_matches(Form::Hidden, c)? && found.is_none() {
                        found = Some(i);
                    }
                }
                found.map(Answer::Hidden).ok_or(Error::BadTag)
            }
        }
    }
}
