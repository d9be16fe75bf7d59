//! The microcontroller agent's decisions, without the network.
//!
//! [`Agent::handle`] takes one publish (its topic and bytes), the device's
//! clock and its RNG, and either writes the one envelope to publish in
//! answer into the caller's buffer, or says why it did nothing. Every check
//! is `mqseal-proto`'s; this module decides only the order: answer a
//! challenge request, or verify a command, run its handler, and tag the
//! response. The same code runs under the MQTT loop ([`crate::net`]), on the
//! host in the end-to-end test, and in the QEMU images.

use mqseal_proto::challenge::{ChallengeDevice, ChallengeTable, Clock, Form, HmacKey, Registered, Verified};
use mqseal_proto::limits::{MSG_ID_LEN, TAG_LEN};
use mqseal_proto::topic::{Channel, ROOT, Topic, topic};
use mqseal_proto::{Call, Error, Kind, MsgId, Outcome, Policy, Status, peek};
use rand_core::CryptoRng;

/// Longest output a handler may return, in bytes. Its buffer lives on the
/// stack for the duration of one command.
pub const OUTPUT_LEN: usize = 64;

/// An `out` buffer for [`Agent::handle`] that fits every envelope for any
/// device: [`envelope_len`] of the longest id (307 bytes).
pub const ENVELOPE_LEN: usize = envelope_len(mqseal_proto::limits::MAX_ID_LEN);

/// The largest challenge-mode envelope the agent writes for a device whose
/// id is `id_len` bytes long: a response with [`OUTPUT_LEN`] bytes of
/// output, the widest code and the widest times. An `out` buffer of this
/// size always holds the answer, so a firmware that knows its id at build
/// time (it comes with the device's bundle) can size the buffer for it —
/// 193 bytes for a 7-byte id instead of 307, which on a small part is RAM
/// that matters. A smaller buffer makes answers fail with
/// `buffer_too_small` after the command ran.
#[must_use]
pub const fn envelope_len(id_len: usize) -> usize {
    let topic = ROOT.len() + id_len + 1 + Channel::Response.suffix().len();
    let outcome = 1 + 5 + varint_len(OUTPUT_LEN) + OUTPUT_LEN;
    2 + varint_len(id_len)
        + id_len
        + varint_len(topic)
        + topic
        + MSG_ID_LEN
        + 10
        + 10
        + MSG_ID_LEN
        + 1
        + outcome
        + TAG_LEN
}

/// Bytes of the LEB128 varint of `n`.
const fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// What follows the id in this device's command and challenge-request
/// topics (`topic`'s layout; checked against it when this compiles).
const COMMAND: &[u8] = b"/cmd";
const CHALLENGE_REQUEST: &[u8] = b"/chal/req";
const _: () = assert!(is_suffix(COMMAND, Channel::Command) && is_suffix(CHALLENGE_REQUEST, Channel::ChallengeRequest));

/// Whether `pattern` is `/` and `channel`'s suffix.
const fn is_suffix(pattern: &[u8], channel: Channel) -> bool {
    let [b'/', rest @ ..] = pattern else { return false };
    let (mut rest, mut suffix): (&[u8], &[u8]) = (rest, channel.suffix().as_bytes());
    while let ([a, more @ ..], [b, others @ ..]) = (rest, suffix) {
        if *a != *b {
            return false;
        }
        rest = more;
        suffix = others;
    }
    rest.is_empty() && suffix.is_empty()
}

/// What a handler reports about one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// How it ended.
    pub status: Status,
    /// The handler's own code (0 when it has none).
    pub code: i32,
    /// How many bytes of the output buffer it filled.
    pub len: usize,
}

impl Done {
    /// Success with `len` bytes of output.
    #[must_use]
    pub const fn ok(len: usize) -> Done {
        Done { status: Status::Ok, code: 0, len }
    }

    /// Failure with the handler's `code` and no output.
    #[must_use]
    pub const fn failed(code: i32) -> Done {
        Done { status: Status::Failed, code, len: 0 }
    }

    /// The command name is not one this firmware has.
    #[must_use]
    pub const fn unknown() -> Done {
        Done { status: Status::UnknownCommand, code: 0, len: 0 }
    }

    /// The arguments are not what the command takes.
    #[must_use]
    pub const fn bad_arguments() -> Done {
        Done { status: Status::BadArguments, code: 0, len: 0 }
    }
}

/// The firmware's commands.
///
/// `run` is called only for a command that passed every check, with a
/// buffer of [`OUTPUT_LEN`] bytes for its output. Handlers run to
/// completion before the next publish is read, so they should be short
/// (toggle a pin, read a sensor); a long job should be started and
/// reported on later.
pub trait Commands {
    /// Runs `call`, writing any output to `output`.
    fn run(&mut self, call: &Call<'_>, output: &mut [u8]) -> Done;
}

impl<F: FnMut(&Call<'_>, &mut [u8]) -> Done> Commands for F {
    fn run(&mut self, call: &Call<'_>, output: &mut [u8]) -> Done {
        self(call, output)
    }
}

/// Why a publish was not acted on. Nothing about it goes back over the
/// network; the firmware may log it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    /// The envelope failed one of `proto`'s checks (or could not be
    /// answered, if the error names a buffer).
    #[error("{0}")]
    Envelope(#[from] Error),
    /// Not this device's command or challenge-request topic.
    #[error("publish on a topic that is not this device's command or challenge-request topic")]
    Topic,
    /// An envelope kind that does not belong on the command topic.
    #[error("a {0} envelope on the command topic")]
    Kind(Kind),
    /// A sealed command, and this build has no sealed mode.
    #[error("a sealed command, but this agent was built without sealed mode")]
    NoSealedMode,
    /// A sealed command, and the firmware passed no real-time clock: sealed
    /// envelopes are only fresh by their times.
    #[error("a sealed command, but the device has no real-time clock to check its times")]
    NoClock,
}

/// The envelope to publish in answer, and where.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// `len` bytes at the start of the caller's `out`, for `channel`.
    Written {
        /// [`Channel::Challenge`] or [`Channel::Response`].
        channel: Channel,
        /// Envelope length.
        len: usize,
    },
    /// A sealed receipt for the response channel (too large for `out`).
    #[cfg(feature = "sealed")]
    Sealed(alloc::vec::Vec<u8>),
}

impl Reply {
    /// The channel to publish on.
    #[must_use]
    pub fn channel(&self) -> Channel {
        match self {
            Reply::Written { channel, .. } => *channel,
            #[cfg(feature = "sealed")]
            Reply::Sealed(_) => Channel::Response,
        }
    }

    /// The envelope, given the `out` buffer passed to [`Agent::handle`].
    #[must_use]
    pub fn bytes<'a>(&'a self, out: &'a [u8]) -> &'a [u8] {
        match self {
            Reply::Written { len, .. } => out.get(..*len).unwrap_or(&[]),
            #[cfg(feature = "sealed")]
            Reply::Sealed(v) => v,
        }
    }
}

/// One device's verification state: its id, key, outstanding challenges,
/// and the commands it accepts in hidden form.
///
/// `SLOTS` is how many challenges may be outstanding at once (several
/// controllers, or retries); a flood of requests only evicts the oldest.
/// It is also how many message ids of verified commands the agent
/// remembers, so that a controller's copies of one command over other
/// challenges run once (docs/PROTOCOL.md §6.5). Each slot is 25 + 25 bytes.
pub struct Agent<'k, const SLOTS: usize = 4> {
    device: ChallengeDevice<'k>,
    challenges: ChallengeTable<SLOTS>,
    hidden: &'k [Registered<'k>],
    #[cfg(feature = "sealed")]
    sealed: Option<crate::sealed::SealedMode<'k>>,
}

impl<'k, const SLOTS: usize> Agent<'k, SLOTS> {
    /// An agent for device `id` holding `key`, whose challenges live
    /// `challenge_lifetime_ms`, accepting the `hidden` commands in hidden
    /// form (explicit commands go to the handler by name).
    ///
    /// # Errors
    /// [`Error::InvalidId`] when `id` is not a valid device id.
    pub fn new(
        id: &'k str,
        key: &'k HmacKey,
        policy: Policy,
        challenge_lifetime_ms: u64,
        hidden: &'k [Registered<'k>],
    ) -> Result<Self, Error> {
        Ok(Agent {
            device: ChallengeDevice::new(id, key, policy)?,
            challenges: ChallengeTable::new(challenge_lifetime_ms),
            hidden,
            #[cfg(feature = "sealed")]
            sealed: None,
        })
    }

    /// Also accepts sealed commands, signed by one of `controllers` and
    /// encrypted to `key`.
    #[cfg(feature = "sealed")]
    #[must_use]
    pub fn with_sealed(mut self, sealed: crate::sealed::SealedMode<'k>) -> Self {
        self.sealed = Some(sealed);
        self
    }

    /// The device id.
    #[must_use]
    pub fn id(&self) -> &'k str {
        self.device.id()
    }

    /// This device's topic for `channel`.
    ///
    /// # Errors
    /// Never for an agent that was built (its id is valid); the type is
    /// `proto`'s.
    pub fn topic(&self, channel: Channel) -> Result<Topic, Error> {
        topic(self.id(), channel)
    }

    /// How many challenges are outstanding at `now_ms`.
    #[must_use]
    pub fn outstanding(&self, now_ms: u64) -> usize {
        self.challenges.outstanding(now_ms)
    }

    /// Decides what to do with a publish that arrived on `arrived_on`:
    /// answer a challenge request, or verify a command, run it through
    /// `commands` and answer with the tagged response. The envelope to
    /// publish is written to `out`: [`ENVELOPE_LEN`] bytes, or
    /// [`envelope_len`] of this device's id, always hold it.
    ///
    /// A command consumes its challenge only when it passes every check,
    /// so nothing runs twice: a replay, a QoS 1 redelivery or a copy sent to
    /// another device finds its challenge gone (or never issued), and a
    /// controller's copy over another challenge finds its message id
    /// remembered (`replayed`).
    ///
    /// # Errors
    /// [`Rejected`] with the reason; nothing ran and nothing is to be sent —
    /// except when `out` is too small for the answer (`buffer_too_small`,
    /// after the command ran), which a buffer of the size above rules out.
    pub fn handle<R: CryptoRng + ?Sized, C: Commands + ?Sized>(
        &mut self,
        arrived_on: &str,
        payload: &[u8],
        clock: Clock,
        rng: &mut R,
        commands: &mut C,
        out: &mut [u8],
    ) -> Result<Reply, Rejected> {
        // This device's own topics only: `ROOT ‖ id ‖ "/" ‖ suffix`. Its id
        // is valid, so matching it here is what `topic::parse` would check.
        // Bytes, not `str` patterns: a third of the size on a Cortex-M.
        let suffix =
            arrived_on.as_bytes().strip_prefix(ROOT.as_bytes()).and_then(|t| t.strip_prefix(self.id().as_bytes()));
        match suffix {
            Some(CHALLENGE_REQUEST) => {
                let len = self.device.answer_request(payload, &mut self.challenges, rng, clock.monotonic_ms, out)?;
                Ok(Reply::Written { channel: Channel::Challenge, len })
            }
            Some(COMMAND) => match peek(payload)? {
                Kind::ChallengeCommand => self.challenge_command(payload, arrived_on, clock, rng, commands, out),
                Kind::SealedCommand => self.sealed_command(payload, arrived_on, clock, rng, commands),
                other => Err(Rejected::Kind(other)),
            },
            _ => Err(Rejected::Topic),
        }
    }

    fn challenge_command<R: CryptoRng + ?Sized, C: Commands + ?Sized>(
        &mut self,
        frame: &[u8],
        arrived_on: &str,
        clock: Clock,
        rng: &mut R,
        commands: &mut C,
        out: &mut [u8],
    ) -> Result<Reply, Rejected> {
        // Kept in the result it came in (`?` would copy it out), and the
        // handler and the response in a frame of their own: on a
        // microcontroller this frame is above the deepest path, the tag
        // check (docs/BENCHMARKS.md, "Microcontroller agent").
        let result = self.device.verify_command(frame, arrived_on, clock, &mut self.challenges, self.hidden);
        let verified = match &result {
            Ok(verified) => verified,
            Err(e) => return Err(Rejected::Envelope(*e)),
        };
        let len = self.run_and_respond(verified, clock, rng, commands, out)?;
        Ok(Reply::Written { channel: Channel::Response, len })
    }

    /// Runs a verified command and writes its tagged response into `out`.
    #[inline(never)]
    fn run_and_respond<R: CryptoRng + ?Sized, C: Commands + ?Sized>(
        &self,
        verified: &Verified<'_>,
        clock: Clock,
        rng: &mut R,
        commands: &mut C,
        out: &mut [u8],
    ) -> Result<usize, Error> {
        let mut output = [0u8; OUTPUT_LEN];
        let outcome = run(commands, &verified.call, &mut output, verified.form);
        self.device.respond(&verified.reply_to(), verified.form, &outcome, MsgId::random(rng), clock.unix_secs, out)
    }

    /// Sealed commands, when the build has sealed mode and the firmware
    /// enabled it; otherwise a rejection like any other.
    #[cfg_attr(not(feature = "sealed"), allow(clippy::unused_self, unused_variables))]
    fn sealed_command<R: CryptoRng + ?Sized, C: Commands + ?Sized>(
        &mut self,
        frame: &[u8],
        arrived_on: &str,
        clock: Clock,
        rng: &mut R,
        commands: &mut C,
    ) -> Result<Reply, Rejected> {
        #[cfg(feature = "sealed")]
        {
            let id = self.id();
            let sealed = self.sealed.as_mut().ok_or(Rejected::NoSealedMode)?;
            let now = clock.unix_secs.ok_or(Rejected::NoClock)?;
            sealed.open_and_run(id, frame, arrived_on, now, rng, commands).map(Reply::Sealed)
        }
        #[cfg(not(feature = "sealed"))]
        Err(Rejected::NoSealedMode)
    }
}

/// Runs a verified call and shapes its outcome for the response.
///
/// A handler claiming more output than its buffer holds is a firmware bug;
/// it is reported as a failure rather than cut short. A hidden response
/// carries the status alone: the controller identifies it among the
/// outcomes it can guess, and it cannot guess output.
pub(crate) fn run<'o, C: Commands + ?Sized>(
    commands: &mut C,
    call: &Call<'_>,
    output: &'o mut [u8; OUTPUT_LEN],
    form: Form,
) -> Outcome<'o> {
    let done = commands.run(call, output);
    let (status, code, bytes): (Status, i32, &'o [u8]) = match output.get(..done.len) {
        Some(bytes) => (done.status, done.code, bytes),
        None => (Status::Failed, 0, &[]),
    };
    match form {
        Form::Explicit => Outcome { status, code, output: bytes },
        Form::Hidden => Outcome { status, code: 0, output: &[] },
    }
}
