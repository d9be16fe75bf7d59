//! The device's side of challenge mode.

use rand_core::CryptoRng;
use subtle::{Choice, ConditionallySelectable};

use super::mac::{Form, HmacKey, MacInput, Tag};
use super::{ChallengeBody, ChallengeTable, CommandBody, RequestBody};
use crate::header::HeaderOut;
use crate::limits::{CHALLENGE_LEN, TAG_LEN};
use crate::topic::{self, Channel};
use crate::wire::{self, Args, Call, Cursor, Encode, Kind, Outcome, Sink};
use crate::{Error, Header, MsgId, Policy, Result, validate_id};

/// A command the device accepts in hidden form: its name and fixed arguments.
///
/// In hidden form the command never crosses the network, so the device can
/// only recognise commands it knows in full, arguments included. Keep them
/// within the protocol's limits ([`limits`](crate::limits)): a controller
/// builds no command beyond them, so one that breaks them never matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered<'a> {
    /// Command name.
    pub name: &'a str,
    /// Its fixed arguments.
    pub args: &'a [&'a str],
}

/// The device's notion of time, passed in by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Clock {
    /// Monotonic milliseconds (uptime or a tick count) for challenge expiry.
    pub monotonic_ms: u64,
    /// Seconds since the Unix epoch, if the device has a real-time clock.
    /// When present, header times are checked too; when absent, freshness
    /// rests on the challenge alone.
    pub unix_secs: Option<u64>,
}

/// A command that passed every check; the challenge has been used up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<'a> {
    /// The authenticated header.
    pub header: Header<'a>,
    /// The challenge it answered; responses are tagged over it.
    pub challenge: [u8; CHALLENGE_LEN],
    /// The form it arrived in; the response uses the same by default.
    pub form: Form,
    /// What to execute.
    pub call: Call<'a>,
    /// In hidden form, the index of the matching registered command.
    pub registered: Option<usize>,
}

impl Verified<'_> {
    /// What the response must repeat, owned: a device can let go of the
    /// frame (and its receive buffer) before it answers.
    #[must_use]
    pub fn reply_to(&self) -> ReplyTo {
        ReplyTo {
            msg_id: self.header.msg_id,
            challenge: self.challenge,
            expires_at: self.header.expires_at,
            form: self.form,
        }
    }
}

/// The parts of a verified command its response is bound to.
///
/// Small and `Copy`, so an agent that has to free its receive buffer (a
/// microcontroller's MQTT client has one) or run the command elsewhere (the
/// Linux agent's task) can keep it without keeping the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// The command's message id: the response's `in_reply_to`.
    pub msg_id: MsgId,
    /// The challenge the command answered; the response is tagged over it.
    pub challenge: [u8; CHALLENGE_LEN],
    /// The command's expiry, repeated in the response header.
    pub expires_at: u64,
    /// The form the command arrived in.
    pub form: Form,
}

/// A device in challenge mode: its id, its key and its time policy.
#[derive(Debug, Clone)]
pub struct ChallengeDevice<'k> {
    id: &'k str,
    key: &'k HmacKey,
    policy: Policy,
}

impl<'k> ChallengeDevice<'k> {
    /// A device named `id` holding `key`.
    ///
    /// # Errors
    /// [`Error::InvalidId`] when `id` is not a valid device id.
    pub fn new(id: &'k str, key: &'k HmacKey, policy: Policy) -> Result<Self> {
        validate_id(id)?;
        Ok(ChallengeDevice { id, key, policy })
    }

    /// The device id.
    #[must_use]
    pub fn id(&self) -> &'k str {
        self.id
    }

    /// Answers a challenge request: issues a challenge into `table` and
    /// writes the [`Kind::Challenge`] envelope into `out`, returning its length.
    ///
    /// # Errors
    /// Decoding errors, [`Error::WrongDevice`], [`Error::BufferTooSmall`].
    // Out of line, like `respond` and the steps of `verify_command`: on a
    // microcontroller a caller's frame then holds one of these paths at a
    // time, not the sum of all three.
    #[inline(never)]
    pub fn answer_request<const N: usize, const M: usize, R: CryptoRng + ?Sized>(
        &self,
        request: &[u8],
        table: &mut ChallengeTable<N, M>,
        rng: &mut R,
        now_ms: u64,
        out: &mut [u8],
    ) -> Result<usize> {
        let req: RequestBody<'_> = wire::decode(wire::body(request, Kind::ChallengeRequest)?)?;
        if req.device != self.id {
            return Err(Error::WrongDevice);
        }
        let challenge = table.issue(rng, now_ms);
        let body = ChallengeBody {
            device: self.id,
            in_reply_to: req.msg_id,
            challenge,
            ttl_ms: u32::try_from(table.lifetime_ms()).unwrap_or(u32::MAX),
        };
        wire::encode_into(Kind::Challenge, &body, out)
    }

    /// Verifies a challenge-mode command that arrived on `arrived_on`.
    ///
    /// Order: decode → header (device, topic, times if a clock is given) →
    /// challenge outstanding → message id not among the commands verified,
    /// expiry above the table's floor (a copy of one over another
    /// challenge, §6.5) → tag
    /// (explicit: one comparison; hidden: every registered command is
    /// tried, in constant time per candidate and without stopping at a
    /// match) → the challenge is used up and the message id remembered.
    /// Only a command that passes everything consumes its challenge, so
    /// junk published against a challenge cannot cancel the genuine
    /// command.
    ///
    /// # Errors
    /// Any decoding or header error, [`Error::UnknownChallenge`],
    /// [`Error::Replayed`], [`Error::BeyondReplayWindow`], [`Error::BadTag`].
    pub fn verify_command<'a, const N: usize, const M: usize>(
        &self,
        frame: &'a [u8],
        arrived_on: &str,
        clock: Clock,
        table: &mut ChallengeTable<N, M>,
        registry: &'a [Registered<'a>],
    ) -> Result<Verified<'a>> {
        let policy = self.policy;
        self.check(frame, arrived_on, clock, registry, |challenge, header| {
            let slot = table.position(challenge, clock.monotonic_ms).ok_or(Error::UnknownChallenge)?;
            table.check_executed(&header.msg_id, header.expires_at)?;
            let (msg_id, expires_at) = (header.msg_id, header.expires_at);
            // Run once every check has passed.
            Ok(move || {
                table.consume(slot);
                let expired = |exp| clock.unix_secs.is_some_and(|now| !policy.still_valid(exp, now));
                table.record_executed(msg_id, expires_at, expired);
            })
        })
    }

    /// Checks that `frame` is a genuine command from a holder of the key —
    /// every check of [`verify_command`](Self::verify_command) but the
    /// single-use ones: the challenge need not be outstanding and nothing is
    /// consumed or remembered.
    ///
    /// For an agent that has already run a command with this message id
    /// and must tell an authentic copy (a QoS 1 redelivery, a controller's
    /// copy over another challenge) from a tampered one before it re-sends
    /// the stored receipt. A copy is never a reason to execute anything.
    ///
    /// # Errors
    /// As [`verify_command`](Self::verify_command), without
    /// [`Error::UnknownChallenge`], [`Error::Replayed`] and
    /// [`Error::BeyondReplayWindow`].
    pub fn authenticate_copy<'a>(
        &self,
        frame: &'a [u8],
        arrived_on: &str,
        clock: Clock,
        registry: &'a [Registered<'a>],
    ) -> Result<Verified<'a>> {
        self.check(frame, arrived_on, clock, registry, |_, _| Ok(|| ()))
    }

    /// The checks both share, with the single-use ones (`single_use`)
    /// between the header and the tag, as §6.3 orders them; what
    /// `single_use` returns runs once everything has passed (it uses the
    /// challenge up).
    ///
    /// On a microcontroller this is the deepest frame of all, so it holds
    /// the decoded body and little else: the checks before the tag and the
    /// tag itself run in frames of their own (docs/BENCHMARKS.md,
    /// "Microcontroller agent").
    fn check<'a, C: FnOnce()>(
        &self,
        frame: &'a [u8],
        arrived_on: &str,
        clock: Clock,
        registry: &'a [Registered<'a>],
        single_use: impl FnOnce(&[u8; CHALLENGE_LEN], &Header<'a>) -> Result<C>,
    ) -> Result<Verified<'a>> {
        // Used where it was decoded: `let body = decode_command(frame)?`
        // would copy it out of the result, 124 B more of a device's stack.
        let decoded = decode_command(frame);
        let body = match &decoded {
            Ok(body) => body,
            Err(e) => return Err(*e),
        };
        self.screen(body, arrived_on, clock)?;
        let commit = single_use(body.challenge, &body.header)?;
        let registered = self.check_tag(body, registry)?;
        let (form, call) = match (body.call, registered.and_then(|i| registry.get(i))) {
            (Some(call), _) => (Form::Explicit, call),
            // A registered command is the device's own. Its tag was computed
            // over it (which bounds its arguments to MAX_ARGS), and no
            // controller builds a command beyond the other limits
            // (`ChallengeController::command` validates), so checking them
            // again here would guard against nothing a tag can reach — and
            // cost a microcontroller 100 B.
            (None, Some(reg)) => (Form::Hidden, Call { name: reg.name, args: Args::unchecked(reg.args) }),
            (None, None) => return Err(Error::BadTag),
        };
        commit();
        Ok(Verified { header: body.header, challenge: *body.challenge, form, call, registered })
    }

    /// Everything about a command that can be checked without the key:
    /// the header is for this device and the topic it arrived on, the call
    /// keeps the protocol's limits, and — with a clock — the times.
    #[inline(never)]
    fn screen(&self, body: &CommandBody<'_>, arrived_on: &str, clock: Clock) -> Result<()> {
        body.header.check_received(self.id, arrived_on)?;
        if let Some(call) = &body.call {
            call.validate()?;
        }
        match clock.unix_secs {
            Some(now) => self.policy.check_times(body.header.issued_at, body.header.expires_at, now),
            None => Ok(()),
        }
    }

    /// The tag: explicit form compares one, hidden form tries every
    /// registered command — each computed and compared, the index selected
    /// with constant-time operations, so the time taken does not depend on
    /// which command (if any) matched, only on the registry, which is not
    /// secret. Returns the index in hidden form.
    #[inline(never)]
    fn check_tag(&self, body: &CommandBody<'_>, registry: &[Registered<'_>]) -> Result<Option<usize>> {
        // One loop for both forms: the explicit call is the only candidate.
        let (form, candidates) = match body.call {
            Some(_) => (Form::Explicit, 1),
            None => (Form::Hidden, registry.len()),
        };
        let mut found = Choice::from(0);
        // 32 bits: a registry is a handful of commands, and 64-bit selects
        // are twice the code on a Cortex-M.
        let mut index = 0u32;
        for i in 0..candidates {
            // `command_tag` refuses more than MAX_ARGS arguments.
            let call = match (body.call, registry.get(i)) {
                (Some(call), _) => call,
                (None, Some(reg)) => Call { name: reg.name, args: Args::unchecked(reg.args) },
                (None, None) => break,
            };
            let hit =
                MacInput::command_tag(self.key, form, body.challenge, &body.header, &call, Tag::Compare(body.tag))?;
            index.conditional_assign(&u32::try_from(i).unwrap_or(u32::MAX), hit);
            found |= hit;
        }
        match (form, usize::try_from(index)) {
            (Form::Explicit, _) if bool::from(found) => Ok(None),
            (Form::Hidden, Ok(index)) if bool::from(found) => Ok(Some(index)),
            _ => Err(Error::BadTag),
        }
    }

    /// Writes the tagged response to `to` into `out`, returning its length.
    ///
    /// `to` is [`Verified::reply_to`] of the command. `form` is usually
    /// `to.form`: a hidden command gets a hidden answer.
    /// `unix_secs` is the device's time if it has a clock; the response's
    /// `expires_at` repeats the command's (controllers judge a response's
    /// freshness by what it answers, not by its times).
    ///
    /// # Errors
    /// [`Error::LimitExceeded`] for oversized output, [`Error::BufferTooSmall`].
    #[inline(never)]
    pub fn respond(
        &self,
        to: &ReplyTo,
        form: Form,
        outcome: &Outcome<'_>,
        msg_id: MsgId,
        unix_secs: Option<u64>,
        out: &mut [u8],
    ) -> Result<usize> {
        outcome.validate()?;
        let topic = topic::pieces(self.id, Channel::Response);
        let header = HeaderOut {
            device: self.id,
            topic: &topic,
            msg_id: &msg_id,
            issued_at: unix_secs.unwrap_or(0),
            expires_at: to.expires_at,
        };
        // The fields of a `ResponseBody`, written as they are rather than
        // gathered into one first, and the tag last, straight into its
        // place in `out`.
        let mut w = Cursor::new(out);
        w.put(&[wire::VERSION, Kind::ChallengeResponse as u8]);
        header.write(&mut w);
        w.put(&to.msg_id.0);
        match form {
            Form::Explicit => Some(*outcome),
            Form::Hidden => None,
        }
        .write(&mut w);
        let body = w.finish()?;
        let len = body + TAG_LEN;
        let tag = out.get_mut(body..len).and_then(|t| <&mut [u8; TAG_LEN]>::try_from(t).ok());
        let tag = tag.ok_or(Error::BufferTooSmall)?;
        wire::check_frame_len(len)?;
        MacInput::response_tag(self.key, form, &to.challenge, &header, &to.msg_id, outcome, Tag::Write(tag))?;
        Ok(len)
    }
}

/// Decodes a challenge-mode command, out of line: its frame is not on the
/// tag check's path.
#[inline(never)]
fn decode_command(frame: &[u8]) -> Result<CommandBody<'_>> {
    wire::decode(wire::body(frame, Kind::ChallengeCommand)?)
}

/// The message id of a challenge-mode command, read without checking
/// anything else: what identifies the command whatever its bytes, for an
/// agent's duplicate detection. Never a reason to act on the envelope.
///
/// # Errors
/// Framing and decoding errors.
pub fn command_msg_id(frame: &[u8]) -> Result<MsgId> {
    decode_command(frame).map(|body| body.header.msg_id)
}
