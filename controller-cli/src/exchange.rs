//! One target's exchange with its device, without the network.
//!
//! An [`Exchange`] is what the controller knows about one device while a
//! command is out: what it has sent, what would answer it, and when to try
//! again. Messages from the device and the passing of time go in
//! ([`Exchange::on_challenge`], [`Exchange::on_response`],
//! [`Exchange::on_timer`]), envelopes to publish come out — the same shape
//! as `proto` and the agent's core, so the rules below are unit-tested
//! here and the I/O loop in [`crate::session`] only moves bytes.
//!
//! # Challenge mode: copies
//!
//! A challenge is not authenticated and a device's table is shared by every
//! controller that may ask, so the challenge a command is tagged over can
//! be forged (a malicious broker answers the request first) or gone (another
//! controller's flood of requests evicted it). The command over it is then
//! refused, silently. Instead of failing, the exchange sends *copies* of the
//! command — the same header, message id and call, tagged over another
//! challenge (docs/PROTOCOL.md §6.5):
//!
//! * over every further challenge that answers one of its requests, as it
//!   arrives: the genuine challenge that came after a forged one;
//! * over the answer to a fresh request, when no response came within
//!   [`FALLBACK_AFTER`] (then twice that, and so on): the challenge that was
//!   evicted, or a request or challenge the broker lost.
//!
//! Copies are safe because the device refuses a message id it has run, and
//! one it has forgotten through a floor on `expires_at` (§6.1): at most one
//! copy executes. Its response is tagged over that
//! copy's challenge, so a response is checked against every challenge
//! used. At most [`MAX_COPIES`] copies and as many requests per command.
//!
//! # Both modes: re-sends
//!
//! A broker may drop a message and still acknowledge it (a 3.1.1 PUBACK
//! says nothing of delivery; Mosquitto drops past `max_queued_messages`,
//! mqseal's router past its queue bound) — the command, or the device's
//! answer. So the last envelope of an unanswered exchange is sent again,
//! *the same bytes*, [`RESEND_EVERY`] after it was sent, then at doubling
//! intervals up to [`RESEND_MAX`]; after the connection was lost and
//! re-established, at once ([`Exchange::on_reconnect`]). Identical bytes
//! are what make this safe: a device that already ran the command answers
//! the copy with its stored receipt, and one still running it refuses the
//! copy (docs/PROTOCOL.md §9.1) — nothing runs twice.

use std::time::Duration;

use mqseal_proto::challenge::{Answer, ChallengeController, Form, Offer, Pending};
use mqseal_proto::sealed::{PrivateKey, ReceiptKey, SealedController};
use mqseal_proto::topic::{Channel, Topic, topic};
use mqseal_proto::{Call, Header, MsgId, Outcome, Status};
use rand_core::CryptoRng;
use tokio::time::Instant;

use crate::registry::DeviceKeys;

/// Which envelope mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// RSA: encrypted, signed both ways (the paper's design).
    Sealed,
    /// HMAC challenge-response (the Arduino design).
    Challenge,
}

/// What to send.
#[derive(Debug, Clone)]
pub struct Request {
    /// Command name.
    pub name: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Envelope mode.
    pub mode: Mode,
    /// Challenge mode only: send the tag alone; the device recognises the
    /// command among those it knows.
    pub hidden: bool,
    /// How long the command stays valid.
    pub ttl: Duration,
}

impl Request {
    /// Checks the command against the protocol's limits, so a caller can
    /// refuse it before connecting ([`crate::session::Session::run`]
    /// refuses it too).
    ///
    /// # Errors
    /// The limit it breaks.
    pub fn validate(&self) -> Result<(), mqseal_proto::Error> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Call::new(&self.name, &args).map(|_| ())
    }
}

/// A status as the CLI and the audit log spell it.
pub fn status_name(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Failed => "failed",
        Status::TimedOut => "timed_out",
        Status::UnknownCommand => "unknown_command",
        Status::BadArguments => "bad_arguments",
    }
}

/// A device's authenticated answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// How the command ended.
    pub status: Status,
    /// Exit code (0 in hidden form).
    pub code: i32,
    /// Output (empty in hidden form).
    pub output: Vec<u8>,
    /// What the device sent, kept so that the answer can be checked again
    /// later (the audit log).
    pub evidence: Evidence,
}

/// A device's answer as it arrived: the bytes its signature or tag covers,
/// and what else checking them again needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The response frame, byte for byte.
    pub frame: Vec<u8>,
    /// Challenge mode: the challenge the response's tag was computed over
    /// (one of the command's copies').
    pub challenge: Option<[u8; 16]>,
    /// When it verified (Unix ms).
    pub at_ms: u64,
}

/// How one target ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceResult {
    /// The device answered, authenticated.
    Answered(Reply),
    /// No authenticated answer in time.
    TimedOut,
    /// Could not be sent (not granted, bad keys).
    Error(String),
}

/// An envelope to publish (QoS 1): topic and bytes.
pub type Out = (String, Vec<u8>);

/// Copies of one command (and challenge requests for it) at most.
pub const MAX_COPIES: usize = 8;

/// No response this long after the last copy was sent (or the first
/// request, if no challenge came): ask for another challenge. Doubles each
/// time. Long enough that a device answering normally (milliseconds) never
/// sees a copy; short enough that an operator's 10 s wait survives one lost
/// or evicted challenge.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(3);

/// No answer this long after an envelope was sent: send it again. Long
/// enough that a device answering normally (milliseconds) is not sent a
/// copy; short enough that a dropped message costs an operator seconds.
pub const RESEND_EVERY: Duration = Duration::from_secs(2);

/// The longest wait between re-sends of one envelope: the interval doubles
/// up to this, so a device that is offline for the whole of a long
/// deadline collects a handful of copies in its queue, not hundreds.
pub const RESEND_MAX: Duration = Duration::from_secs(16);

/// When the last envelope is due to be sent again, and the wait after that.
#[derive(Debug, Clone, Copy)]
struct Resend {
    at: Instant,
    every: Duration,
}

/// Where one target stands.
enum State {
    /// Nothing sent yet.
    Pending,
    /// Challenge mode: the command waits for a challenge, or is out over
    /// one or more.
    Challenge(Box<Copies>),
    /// Sealed mode: the command is out; its receipt will come encrypted
    /// under `receipt_key`.
    Sealed { msg_id: MsgId, receipt_key: ReceiptKey },
    /// Answered, or given up.
    Done(DeviceResult),
}

/// A challenge-mode command and its copies.
struct Copies {
    /// The command's fixed fields: every copy carries them.
    fresh: Fresh,
    /// Challenge requests sent for it; a challenge answering any of them
    /// gets a copy.
    requests: Vec<MsgId>,
    /// Challenges a copy was tagged over; a response may be tagged over any.
    used: Vec<[u8; 16]>,
    /// When to ask for another challenge if nothing answered, and the wait
    /// after that.
    fallback_at: Instant,
    fallback_every: Duration,
}

/// What resuming an exchange needs after the controller stopped while it
/// was out: the command's identity, its last envelope (to send again, the
/// same bytes) and whatever verifies its answer — the receipt key (sealed)
/// or every challenge a copy was tagged over and every request a
/// challenge may answer (challenge mode). A job's journal keeps one per
/// device, written before the envelope is published (`crate::job`). Byte
/// strings are hex, for a JSON journal; the receipt key is a secret, and
/// the journal is 0600 like the registry that holds the HMAC keys.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The command's message id.
    pub msg_id: String,
    /// Its validity window (Unix seconds).
    pub issued_at: u64,
    /// See `issued_at`.
    pub expires_at: u64,
    /// The last envelope's topic.
    pub topic: String,
    /// The last envelope.
    pub frame: String,
    /// Sealed mode: the key the receipt comes encrypted under.
    pub receipt_key: Option<String>,
    /// Challenge mode: the requests sent for the command.
    pub requests: Vec<String>,
    /// Challenge mode: the challenges a copy was tagged over.
    pub challenges: Vec<String>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("msg_id", &self.msg_id)
            .field("topic", &self.topic)
            .field("receipt_key", &self.receipt_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(k) = &mut self.receipt_key {
            zeroize::Zeroize::zeroize(k);
        }
    }
}

fn unhex<const N: usize>(text: &str, what: &str) -> Result<[u8; N], String> {
    // Straight into the array: no heap copy of a receipt key left behind.
    let mut out = [0u8; N];
    if text.len() != 2 * N {
        return Err(format!("{what} is not {N} bytes"));
    }
    hex::decode_to_slice(text, &mut out).map_err(|_| format!("{what} is not hex"))?;
    Ok(out)
}

/// Why a device that answered only in the retired receipt form failed.
const RETIRED_RECEIPT: &str = "no answer verified: the device answered with a receipt in the retired first form \
                               (kind 2, docs/PROTOCOL.md §5.4); upgrade its agent";

/// One target's exchange.
pub struct Exchange<'k> {
    device: String,
    keys: &'k DeviceKeys,
    state: State,
    /// The last envelope sent, for re-sending while it goes unanswered.
    last: Option<Out>,
    /// When to send `last` again.
    resend: Option<Resend>,
    /// The command's message id, once it is built.
    msg_id: Option<MsgId>,
    /// A new envelope was built since the last [`Exchange::take_snapshot`].
    changed: bool,
    /// When to stop waiting and end as [`DeviceResult::TimedOut`].
    give_up_at: Option<Instant>,
    /// A receipt in the retired first form (kind 2) arrived: an agent too
    /// old to answer in a form this controller reads. It is not
    /// authenticated, so it ends nothing early; it turns the timeout into
    /// an error that says what to do.
    retired_receipt: bool,
}

impl<'k> Exchange<'k> {
    /// An exchange with `device` that has sent nothing yet.
    pub fn new(device: &str, keys: &'k DeviceKeys) -> Exchange<'k> {
        Exchange {
            device: device.to_owned(),
            keys,
            state: State::Pending,
            last: None,
            resend: None,
            msg_id: None,
            changed: false,
            give_up_at: None,
            retired_receipt: false,
        }
    }

    /// An exchange taken up again from `snapshot` (see [`Snapshot`]) at
    /// `now`: its last envelope is due at once, then at the usual
    /// intervals, and a challenge-mode command falls back to fresh
    /// challenges as any does.
    ///
    /// # Errors
    /// A snapshot that does not parse, or names another device's topics.
    pub fn resume(
        device: &str,
        keys: &'k DeviceKeys,
        snapshot: &Snapshot,
        now: Instant,
    ) -> Result<Exchange<'k>, String> {
        let mut x = Exchange::new(device, keys);
        let msg_id = MsgId(unhex(&snapshot.msg_id, "msg_id")?);
        let frame = hex::decode(&snapshot.frame).map_err(|_| "frame is not hex".to_owned())?;
        match mqseal_proto::topic::parse(&snapshot.topic) {
            Some((d, _)) if d == device => {}
            _ => return Err(format!("topic {:?} is not one of {device}'s", snapshot.topic)),
        }
        x.state = match &snapshot.receipt_key {
            Some(k) => {
                let bytes = zeroize::Zeroizing::new(unhex::<32>(k, "receipt_key")?);
                State::Sealed { msg_id, receipt_key: ReceiptKey::from_bytes(*bytes) }
            }
            None => {
                let fresh = Fresh {
                    topic: topic(device, Channel::Command).map_err(|e| e.to_string())?,
                    msg_id,
                    issued_at: snapshot.issued_at,
                    expires_at: snapshot.expires_at,
                };
                let requests =
                    snapshot.requests.iter().map(|r| unhex(r, "request").map(MsgId)).collect::<Result<_, _>>()?;
                let used = snapshot.challenges.iter().map(|c| unhex(c, "challenge")).collect::<Result<_, _>>()?;
                State::Challenge(Box::new(Copies {
                    fresh,
                    requests,
                    used,
                    fallback_at: now + FALLBACK_AFTER,
                    fallback_every: FALLBACK_AFTER,
                }))
            }
        };
        x.msg_id = Some(msg_id);
        x.last = Some((snapshot.topic.clone(), frame));
        x.on_reconnect(now);
        Ok(x)
    }

    /// What [`Exchange::resume`] needs, if a new envelope was built since
    /// the last call (a re-send of the same bytes changes nothing): a
    /// caller that must survive its own crash stores it before
    /// publishing.
    pub fn take_snapshot(&mut self) -> Option<Snapshot> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        let (topic, frame) = self.last.as_ref()?;
        let msg_id = hex::encode(self.msg_id?.0);
        let mut snap = Snapshot {
            msg_id,
            issued_at: 0,
            expires_at: 0,
            topic: topic.clone(),
            frame: hex::encode(frame),
            receipt_key: None,
            requests: Vec::new(),
            challenges: Vec::new(),
        };
        match &self.state {
            State::Sealed { receipt_key, .. } => {
                let bytes = zeroize::Zeroizing::new(receipt_key.to_bytes());
                snap.receipt_key = Some(hex::encode(bytes.as_slice()));
            }
            State::Challenge(c) => {
                snap.issued_at = c.fresh.issued_at;
                snap.expires_at = c.fresh.expires_at;
                snap.requests = c.requests.iter().map(|r| hex::encode(r.0)).collect();
                snap.challenges = c.used.iter().map(hex::encode).collect();
            }
            State::Pending | State::Done(_) => return None,
        }
        Some(snap)
    }

    /// Ends the exchange as [`DeviceResult::TimedOut`] at `at` if it has
    /// not ended by then ([`Exchange::on_timer`] does it).
    pub fn give_up_at(&mut self, at: Instant) {
        self.give_up_at = Some(at);
    }

    /// The device.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The device's keys.
    pub fn keys(&self) -> &'k DeviceKeys {
        self.keys
    }

    /// The command's message id (every copy and re-send carries it), once
    /// it is built: what the device's receipt answers, and what the audit
    /// log names the command by.
    pub fn msg_id(&self) -> Option<MsgId> {
        self.msg_id
    }

    /// Whether nothing has been sent yet.
    pub fn is_pending(&self) -> bool {
        matches!(self.state, State::Pending)
    }

    /// Whether it has ended.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done(_))
    }

    /// How it ended, if it has.
    pub fn result(&self) -> Option<&DeviceResult> {
        match &self.state {
            State::Done(r) => Some(r),
            _ => None,
        }
    }

    /// Ends it with `result`.
    pub fn finish(&mut self, result: DeviceResult) {
        self.state = State::Done(result);
    }

    /// When [`on_timer`](Self::on_timer) has something to do.
    pub fn next_timer(&self) -> Option<Instant> {
        if self.is_done() {
            return None;
        }
        let fallback = match &self.state {
            State::Challenge(c) if c.may_ask_again() => Some(c.fallback_at),
            _ => None,
        };
        let resend = self.resend.filter(|_| self.last.is_some()).map(|r| r.at);
        fallback.into_iter().chain(resend).chain(self.give_up_at).min()
    }

    /// The connection was lost and is back: whatever the broker held for
    /// this exchange may be gone, so the last envelope is due again now,
    /// and then at the usual intervals.
    pub fn on_reconnect(&mut self, now: Instant) {
        if !self.is_done() && self.last.is_some() {
            self.resend = Some(Resend { at: now, every: RESEND_EVERY });
        }
    }

    /// Starts a challenge-mode command: over `offer` (a challenge already
    /// in hand, with the request it answered: a second answer to that
    /// request — the genuine one, if the offer was forged — gets a copy) if
    /// there is one, else with a request for a challenge — unless
    /// `requested` names one already on its way.
    #[allow(clippy::too_many_arguments)]
    pub fn start_challenge<R: CryptoRng + ?Sized>(
        &mut self,
        request: &Request,
        call: &Call<'_>,
        offer: Option<(Offer, MsgId)>,
        requested: Option<MsgId>,
        now: Instant,
        unix: u64,
        rng: &mut R,
    ) -> Option<Out> {
        let fresh = match Fresh::new(&self.device, request.ttl, unix, rng) {
            Ok(f) => f,
            Err(e) => return self.fail(format!("building the command: {e}")),
        };
        self.msg_id = Some(fresh.msg_id);
        let mut copies = Copies {
            fresh,
            requests: Vec::new(),
            used: Vec::new(),
            fallback_at: now + FALLBACK_AFTER,
            fallback_every: FALLBACK_AFTER,
        };
        let out = match (offer, requested) {
            (Some((offer, answered)), _) => {
                copies.requests.push(answered);
                copies.copy_over(&self.device, self.keys, &offer.challenge, request, call).map(Some)
            }
            (None, Some(id)) => {
                copies.requests.push(id);
                Ok(None)
            }
            (None, None) => copies.request(&self.device, self.keys, rng).map(Some),
        };
        self.state = State::Challenge(Box::new(copies));
        self.sent(out, now)
    }

    /// Starts a sealed-mode command with the envelope `sealed` built for
    /// it (by [`seal`], on a worker thread).
    pub fn start_sealed(&mut self, sealed: Result<SealedOut, String>, now: Instant) -> Option<Out> {
        let out = sealed.map(|SealedOut { msg_id, receipt_key, out }| {
            self.msg_id = Some(msg_id);
            self.state = State::Sealed { msg_id, receipt_key };
            Some(out)
        });
        self.sent(out, now)
    }

    /// A challenge from the device: a copy over it, if it answers one of
    /// this command's requests and is new.
    pub fn on_challenge(&mut self, payload: &[u8], request: &Request, call: &Call<'_>, now: Instant) -> Option<Out> {
        let State::Challenge(copies) = &mut self.state else { return None };
        if copies.used.len() >= MAX_COPIES {
            return None;
        }
        let controller = ChallengeController::new(&self.device, &self.keys.hmac).ok()?;
        let offer = copies.requests.iter().find_map(|id| controller.read_challenge(payload, *id).ok())?;
        if copies.used.contains(&offer.challenge) {
            return None;
        }
        let out = copies.copy_over(&self.device, self.keys, &offer.challenge, request, call);
        copies.fallback_at = now + copies.fallback_every;
        self.sent(out.map(Some), now)
    }

    /// A response from the device, published on `arrived_on` and read at
    /// `unix_ms`: ends the exchange if it verifies. Anything that does not
    /// verify is ignored — another controller's, or forged; neither ends
    /// the wait for the genuine answer.
    pub fn on_response(&mut self, arrived_on: &str, payload: &[u8], controller_key: &PrivateKey, unix_ms: u64) -> bool {
        let evidence = |challenge| Evidence { frame: payload.to_vec(), challenge, at_ms: unix_ms };
        let reply = match &self.state {
            State::Challenge(copies) => copies.read_response(&self.device, self.keys, arrived_on, payload).map(
                |(status, code, output, challenge)| Reply { status, code, output, evidence: evidence(Some(challenge)) },
            ),
            State::Sealed { msg_id, receipt_key } => SealedController::new(controller_key)
                .open_response(payload, arrived_on, &self.device, &self.keys.public, *msg_id, receipt_key)
                .inspect_err(|e| self.retired_receipt |= matches!(e, mqseal_proto::Error::RetiredKind(_)))
                .ok()
                .map(|opened| Reply {
                    status: opened.status,
                    code: opened.code,
                    output: opened.output.clone(),
                    evidence: evidence(None),
                }),
            State::Pending | State::Done(_) => None,
        };
        match reply {
            Some(reply) => {
                self.state = State::Done(DeviceResult::Answered(reply));
                true
            }
            None => false,
        }
    }

    /// Time has passed: with no response by the fallback time, ask for
    /// another challenge (whose answer gets a copy); otherwise, when a
    /// re-send is due, the last envelope again.
    pub fn on_timer<R: CryptoRng + ?Sized>(&mut self, now: Instant, rng: &mut R) -> Option<Out> {
        if self.give_up_at.is_some_and(|at| now >= at) && !self.is_done() {
            self.state = State::Done(if self.retired_receipt {
                DeviceResult::Error(RETIRED_RECEIPT.into())
            } else {
                DeviceResult::TimedOut
            });
            return None;
        }
        if let State::Challenge(copies) = &mut self.state
            && now >= copies.fallback_at
            && copies.may_ask_again()
        {
            let out = copies.request(&self.device, self.keys, rng);
            copies.fallback_every = copies.fallback_every.saturating_mul(2);
            copies.fallback_at = now + copies.fallback_every;
            // The request is now the last envelope; its re-sends start over.
            return self.sent(out.map(Some), now);
        }
        let due = self.resend.filter(|r| now >= r.at && !self.is_done())?;
        let last = self.last.clone()?;
        self.resend = Some(Resend { at: now + due.every, every: due.every.saturating_mul(2).min(RESEND_MAX) });
        Some(last)
    }

    fn fail(&mut self, why: String) -> Option<Out> {
        self.state = State::Done(DeviceResult::Error(why));
        None
    }

    /// Remembers what is sent, to send again if it goes unanswered; an
    /// envelope that could not be built ends the exchange with the reason.
    fn sent(&mut self, out: Result<Option<Out>, String>, now: Instant) -> Option<Out> {
        match out {
            Ok(Some(o)) => {
                self.changed = true;
                self.last = Some(o.clone());
                self.resend = Some(Resend { at: now + RESEND_EVERY, every: RESEND_EVERY });
                Some(o)
            }
            Ok(None) => None,
            Err(why) => self.fail(why),
        }
    }
}

impl Copies {
    /// Whether another request (and the copy its answer gets) is allowed.
    fn may_ask_again(&self) -> bool {
        self.requests.len() < MAX_COPIES && self.used.len() < MAX_COPIES
    }

    /// A challenge request for this command, remembered.
    fn request<R: CryptoRng + ?Sized>(&mut self, device: &str, keys: &DeviceKeys, rng: &mut R) -> Result<Out, String> {
        let (msg_id, out) = challenge_request(device, keys, rng)?;
        self.requests.push(msg_id);
        Ok(out)
    }

    /// The command's copy over `challenge`, remembered.
    fn copy_over(
        &mut self,
        device: &str,
        keys: &DeviceKeys,
        challenge: &[u8; 16],
        request: &Request,
        call: &Call<'_>,
    ) -> Result<Out, String> {
        let controller = ChallengeController::new(device, &keys.hmac).map_err(|e| e.to_string())?;
        let form = if request.hidden { Form::Hidden } else { Form::Explicit };
        // Name, arguments and header fit in 8 KiB by the protocol's limits;
        // on the stack, not a fresh heap block per copy.
        let mut buf = [0u8; 8192];
        let n = controller
            .command(&self.fresh.header(device), challenge, call, form, &mut buf)
            .map_err(|e| format!("building the command: {e}"))?;
        let frame = buf.get(..n).ok_or("command longer than its buffer")?.to_vec();
        self.used.push(*challenge);
        Ok((self.fresh.topic.to_string(), frame))
    }

    /// The outcome in `payload` (status, code, output) and the challenge
    /// it verified over, if it verifies over one of the challenges used.
    fn read_response(
        &self,
        device: &str,
        keys: &DeviceKeys,
        arrived_on: &str,
        payload: &[u8],
    ) -> Option<(Status, i32, Vec<u8>, [u8; 16])> {
        let controller = ChallengeController::new(device, &keys.hmac).ok()?;
        let candidates = hidden_candidates();
        self.used.iter().find_map(|challenge| {
            let pending = Pending { challenge: *challenge, msg_id: self.fresh.msg_id };
            match controller.read_response(payload, arrived_on, &pending, &candidates).ok()? {
                Answer::Explicit(o) => Some((o.status, o.code, o.output.to_vec(), *challenge)),
                Answer::Hidden(i) => Some((candidates.get(i)?.status, 0, vec![], *challenge)),
            }
        })
    }
}

/// The outcomes a hidden-form answer can confirm: a status, nothing else.
pub fn hidden_candidates() -> [Outcome<'static>; 5] {
    [Status::Ok, Status::Failed, Status::TimedOut, Status::UnknownCommand, Status::BadArguments].map(|status| Outcome {
        status,
        code: 0,
        output: &[],
    })
}

/// A challenge request to `device`: its id and the envelope.
///
/// # Errors
/// When `device` cannot name topics.
pub fn challenge_request<R: CryptoRng + ?Sized>(
    device: &str,
    keys: &DeviceKeys,
    rng: &mut R,
) -> Result<(MsgId, Out), String> {
    let controller = ChallengeController::new(device, &keys.hmac).map_err(|e| e.to_string())?;
    let msg_id = MsgId::random(rng);
    let mut out = [0u8; 128];
    let n = controller.request(msg_id, &mut out).map_err(|e| e.to_string())?;
    let frame = out.get(..n).ok_or("challenge request too long")?.to_vec();
    let t = topic(device, Channel::ChallengeRequest).map_err(|e| e.to_string())?;
    Ok((msg_id, (t.to_string(), frame)))
}

/// A sealed command built for one target, ready for
/// [`Exchange::start_sealed`].
#[derive(Debug)]
pub struct SealedOut {
    msg_id: MsgId,
    receipt_key: ReceiptKey,
    out: Out,
}

/// The sealed command for `device`: its message id, the key its receipt
/// will be encrypted under, and the envelope. One RSA signature and one
/// encryption: callers spread these over the cores.
///
/// # Errors
/// When the command cannot be sealed (a bad key, a limit).
pub fn seal(
    key: &PrivateKey,
    device: &str,
    keys: &DeviceKeys,
    request: &Request,
    call: &Call<'_>,
    unix: u64,
) -> Result<SealedOut, String> {
    let mut rng = mqseal_client::rng();
    let fresh = Fresh::new(device, request.ttl, unix, &mut rng).map_err(|e| e.to_string())?;
    let sealed = SealedController::new(key)
        .seal_command(&mut rng, &keys.public, &fresh.header(device), call)
        .map_err(|e| format!("sealing: {e}"))?;
    Ok(SealedOut {
        msg_id: fresh.msg_id,
        receipt_key: sealed.receipt_key,
        out: (fresh.topic.to_string(), sealed.frame),
    })
}

/// What every new command carries: a fresh message id, a validity window
/// starting now, and the device's command topic.
struct Fresh {
    topic: Topic,
    msg_id: MsgId,
    issued_at: u64,
    expires_at: u64,
}

impl Fresh {
    fn new<R: CryptoRng + ?Sized>(device: &str, ttl: Duration, unix: u64, rng: &mut R) -> mqseal_proto::Result<Fresh> {
        Ok(Fresh {
            topic: topic(device, Channel::Command)?,
            msg_id: MsgId::random(rng),
            issued_at: unix,
            expires_at: unix.saturating_add(ttl.as_secs()),
        })
    }

    fn header<'a>(&'a self, device: &'a str) -> Header<'a> {
        Header {
            device,
            topic: &self.topic,
            msg_id: self.msg_id,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use mqseal_proto::Policy;
    use mqseal_proto::challenge::{ChallengeDevice, ChallengeTable, Clock, HmacKey};
    use mqseal_proto::sealed::PublicKey;

    use super::*;

    /// The device under test: `proto`'s own challenge device and table.
    struct Device {
        key: HmacKey,
        table: ChallengeTable<16>,
        ran: usize,
    }

    impl Device {
        fn new() -> Device {
            Device { key: HmacKey::new([7; 32]), table: ChallengeTable::new(30_000), ran: 0 }
        }

        /// Answers a challenge request (the genuine challenge).
        fn challenge(&mut self, request: &Out) -> Vec<u8> {
            let d = ChallengeDevice::new("dev-1", &self.key, Policy::default()).unwrap();
            let mut out = [0u8; 256];
            let n = d.answer_request(&request.1, &mut self.table, &mut mqseal_client::rng(), 0, &mut out).unwrap();
            out[..n].to_vec()
        }

        /// Verifies a command; runs it and answers if it verifies.
        fn command(&mut self, cmd: &Out) -> Result<Vec<u8>, mqseal_proto::Error> {
            let d = ChallengeDevice::new("dev-1", &self.key, Policy::default())?;
            let clock = Clock { monotonic_ms: 0, unix_secs: None };
            let v = d.verify_command(&cmd.1, &cmd.0, clock, &mut self.table, &[])?;
            self.ran += 1;
            let outcome = Outcome { status: Status::Ok, code: 0, output: b"done" };
            let mut out = vec![0u8; 1024];
            let n = d.respond(&v.reply_to(), v.form, &outcome, MsgId([0xee; 16]), None, &mut out)?;
            out.truncate(n);
            Ok(out)
        }
    }

    /// A challenge nobody issued, answering `request` as if it were the
    /// device's: what a malicious broker can publish.
    /// The message id of a challenge request to dev-1.
    fn request_id(request: &Out) -> MsgId {
        MsgId(request.1[2 + 1 + 5..2 + 1 + 5 + 16].try_into().unwrap())
    }

    fn forged(request: &Out, challenge: u8) -> Vec<u8> {
        let id = request_id(request);
        let mut out = vec![1u8, 4, 5];
        out.extend(b"dev-1");
        out.extend(id.0);
        out.extend([challenge; 16]);
        out.extend([0xb0, 0xea, 0x01]); // ttl_ms 30000
        out
    }

    fn keys() -> DeviceKeys {
        static KEY: std::sync::OnceLock<PublicKey> = std::sync::OnceLock::new();
        let public =
            KEY.get_or_init(|| PrivateKey::generate(&mut mqseal_client::rng(), 2048).unwrap().public().clone()).clone();
        DeviceKeys { public, hmac: HmacKey::new([7; 32]) }
    }

    fn request() -> Request {
        Request { name: "go".into(), args: vec![], mode: Mode::Challenge, hidden: false, ttl: Duration::from_secs(60) }
    }

    const RESP: &str = "mqseal/v1/dev/dev-1/resp";

    /// A challenge-mode exchange just started: it and its challenge request.
    fn start<'k>(keys: &'k DeviceKeys, req: &Request, call: &Call<'_>, now: Instant) -> (Exchange<'k>, Out) {
        let mut x = Exchange::new("dev-1", keys);
        let chal_req = x.start_challenge(req, call, None, None, now, 1_800_000_000, &mut mqseal_client::rng()).unwrap();
        (x, chal_req)
    }

    /// The outside attack's I4, first half: a forged challenge answering
    /// the request arrived before the genuine one and was taken; the
    /// command failed. Now the genuine one gets a copy too, the device runs
    /// that one, and its response — tagged over the genuine challenge —
    /// ends the exchange.
    #[test]
    fn a_forged_challenge_first_costs_one_copy_not_the_command() {
        let (keys, req, call) = (keys(), request(), Call::new("go", &[]).unwrap());
        let (mut dev, now, rng) = (Device::new(), Instant::now(), &mut mqseal_client::rng());
        let (mut x, chal_req) = start(&keys, &req, &call, now);
        let over_forged = x.on_challenge(&forged(&chal_req, 0x66), &req, &call, now).unwrap();
        let genuine = dev.challenge(&chal_req);
        let over_genuine = x.on_challenge(&genuine, &req, &call, now).unwrap();
        assert_eq!(x.on_challenge(&genuine, &req, &call, now), None, "one copy per challenge");
        assert_eq!(over_forged.0, over_genuine.0);
        assert_eq!(dev.command(&over_forged).unwrap_err(), mqseal_proto::Error::UnknownChallenge);
        let response = dev.command(&over_genuine).unwrap();
        assert!(x.on_response(RESP, &response, &PrivateKey::generate(rng, 2048).unwrap(), 7));
        let genuine_challenge = ChallengeController::new("dev-1", &keys.hmac)
            .unwrap()
            .read_challenge(&genuine, request_id(&chal_req))
            .unwrap()
            .challenge;
        assert!(
            matches!(x.result(), Some(DeviceResult::Answered(r)) if r.output == b"done"
                && r.evidence == Evidence { frame: response.clone(), challenge: Some(genuine_challenge), at_ms: 7 }),
            "the response verified over the second challenge, and that is what is kept"
        );
        assert_eq!(dev.ran, 1);
    }

    /// The second half: another controller's requests pushed the challenge
    /// out of the device's table before the command arrived. With no
    /// response after `FALLBACK_AFTER` the exchange asks again and sends a
    /// copy over the new challenge; nothing earlier than that.
    #[test]
    fn an_evicted_challenge_falls_back_to_a_fresh_one() {
        let (keys, req, call) = (keys(), request(), Call::new("go", &[]).unwrap());
        let (mut dev, now, rng) = (Device::new(), Instant::now(), &mut mqseal_client::rng());
        let (mut x, chal_req) = start(&keys, &req, &call, now);
        let first = x.on_challenge(&dev.challenge(&chal_req), &req, &call, now).unwrap();
        for _ in 0..16 {
            let (_, flood) = challenge_request("dev-1", &keys, rng).unwrap();
            dev.challenge(&flood);
        }
        assert_eq!(dev.command(&first).unwrap_err(), mqseal_proto::Error::UnknownChallenge, "evicted");
        assert_eq!(x.on_timer(now + RESEND_EVERY / 2, rng), None, "too early for anything");
        // First the copy again, the same bytes (had the broker dropped it,
        // this would be enough) — refused again: its challenge is gone.
        assert_eq!(x.next_timer(), Some(now + RESEND_EVERY));
        assert_eq!(x.on_timer(now + RESEND_EVERY, rng).as_ref(), Some(&first), "a re-send is the same envelope");
        assert_eq!(dev.command(&first).unwrap_err(), mqseal_proto::Error::UnknownChallenge);
        assert_eq!(x.next_timer(), Some(now + FALLBACK_AFTER));
        let again = x.on_timer(now + FALLBACK_AFTER, rng).unwrap();
        assert!(again.0.ends_with("/chal/req"));
        let later = now + FALLBACK_AFTER;
        let copy = x.on_challenge(&dev.challenge(&again), &req, &call, later).unwrap();
        let response = dev.command(&copy).unwrap();
        assert!(x.on_response(RESP, &response, &PrivateKey::generate(rng, 2048).unwrap(), 0));
        assert_eq!(dev.ran, 1);
    }

    /// Copies never run twice: a request answered twice (a QoS 1
    /// redelivery of it) gives two genuine challenges and two copies; the
    /// device runs the first and refuses the second by its message id. And
    /// however many challenges come, at most `MAX_COPIES` copies go out;
    /// fallbacks back off and stop there too.
    #[test]
    fn copies_run_once_and_are_bounded() {
        let (keys, req, call) = (keys(), request(), Call::new("go", &[]).unwrap());
        let (mut dev, now, rng) = (Device::new(), Instant::now(), &mut mqseal_client::rng());
        let (mut x, chal_req) = start(&keys, &req, &call, now);
        let a = x.on_challenge(&dev.challenge(&chal_req), &req, &call, now).unwrap();
        let b = x.on_challenge(&dev.challenge(&chal_req), &req, &call, now).unwrap();
        assert!(dev.command(&a).is_ok());
        assert_eq!(dev.command(&b).unwrap_err(), mqseal_proto::Error::Replayed);
        assert_eq!(dev.ran, 1);
        let more: Vec<Out> =
            (0..20u8).filter_map(|i| x.on_challenge(&forged(&chal_req, i), &req, &call, now)).collect();
        assert_eq!(more.len(), MAX_COPIES - 2);
        assert_eq!(x.next_timer(), Some(now + RESEND_EVERY), "no fallback once the copies are spent");
        assert_eq!(x.on_timer(now + RESEND_EVERY, rng).as_ref(), more.last(), "only re-sends of the last copy");
        // Fallbacks on their own: 3 s, then 6, 12 … later, at most
        // MAX_COPIES requests; between them, re-sends of the last request.
        let (mut y, first) = start(&keys, &req, &call, now);
        let (mut last, mut fallbacks, mut resends) = (first, vec![Duration::ZERO], Vec::new());
        for _ in 0..100 {
            let at = y.next_timer().expect("an unanswered exchange always has a timer");
            let out = y.on_timer(at, rng).expect("something is due at its timer");
            if out == last {
                resends.push(at - now);
            } else {
                assert!(out.0.ends_with("/chal/req"), "{out:?}");
                fallbacks.push(at - now);
            }
            last = out;
        }
        let backing_off: Vec<Duration> =
            (0..u32::try_from(MAX_COPIES).unwrap()).map(|k| FALLBACK_AFTER * (2u32.pow(k) - 1)).collect();
        assert_eq!(fallbacks, backing_off);
        assert_eq!(resends.first(), Some(&RESEND_EVERY));
        let gaps: Vec<Duration> = resends.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps.last(), Some(&RESEND_MAX), "re-sends back off to RESEND_MAX and keep going");
    }

    /// A sealed exchange with `dev-1` that has sent its command.
    fn start_sealed<'k>(keys: &'k DeviceKeys, controller: &PrivateKey, now: Instant) -> (Exchange<'k>, Out) {
        let req = Request { mode: Mode::Sealed, ..request() };
        let call = Call::new("go", &[]).unwrap();
        let mut x = Exchange::new("dev-1", keys);
        let sent = x.start_sealed(seal(controller, "dev-1", keys, &req, &call, 1_800_000_000), now).unwrap();
        (x, sent)
    }

    /// A broker that drops a sealed command (or its receipt) and still
    /// acknowledges it: the exchange sends the same bytes again at 2, 4,
    /// 8, 16 s … after, every 16 s at most, until the receipt verifies.
    /// After a reconnect the envelope is due at once. Nothing new is ever
    /// built: a copy of one envelope cannot run twice on the device.
    #[test]
    fn a_sealed_command_is_sent_again_the_same_bytes_until_answered() {
        let (keys, rng) = (keys(), &mut mqseal_client::rng());
        let (controller, now) = (PrivateKey::generate(rng, 2048).unwrap(), Instant::now());
        let (mut x, sent) = start_sealed(&keys, &controller, now);
        let mut at = Vec::new();
        for _ in 0..8 {
            let t = x.next_timer().unwrap();
            assert_eq!(x.on_timer(t, rng).as_ref(), Some(&sent), "the same envelope");
            at.push((t - now).as_secs());
        }
        assert_eq!(at, [2, 4, 8, 16, 32, 48, 64, 80]);
        let later = now + Duration::from_secs(81);
        x.on_reconnect(later);
        assert_eq!(x.next_timer(), Some(later), "due at once after a reconnect");
        assert_eq!(x.on_timer(later, rng).as_ref(), Some(&sent));
        assert_eq!(x.next_timer(), Some(later + RESEND_EVERY), "then from the start of the back-off");
        x.finish(DeviceResult::TimedOut);
        assert_eq!(x.next_timer(), None, "an exchange that has ended sends nothing");
        assert_eq!(x.on_timer(later + RESEND_MAX, rng), None);
    }

    /// A controller that stopped mid-command (a job killed) takes the
    /// exchange up from its snapshot: the same bytes go out again at once,
    /// and the device's answer to the *earlier* copy — tagged over the
    /// challenge recorded in the snapshot — ends it. Re-sends change no
    /// snapshot; a copy over a new challenge does.
    #[test]
    fn a_resumed_exchange_sends_the_same_envelope_and_accepts_the_answer_to_it() {
        let (keys, req, call) = (keys(), request(), Call::new("go", &[]).unwrap());
        let (mut dev, now, rng) = (Device::new(), Instant::now(), &mut mqseal_client::rng());
        let (mut x, chal_req) = start(&keys, &req, &call, now);
        assert!(x.take_snapshot().is_some_and(|s| s.challenges.is_empty() && s.requests.len() == 1));
        assert!(x.take_snapshot().is_none(), "nothing new");
        let copy = x.on_challenge(&dev.challenge(&chal_req), &req, &call, now).unwrap();
        let snap = x.take_snapshot().unwrap();
        assert_eq!((snap.challenges.len(), snap.frame.clone()), (1, hex::encode(&copy.1)));
        assert_eq!(x.on_timer(now + RESEND_EVERY, rng).as_ref(), Some(&copy));
        assert!(x.take_snapshot().is_none(), "a re-send is not a new envelope");
        let response = dev.command(&copy).unwrap();
        drop(x);

        let later = now + Duration::from_secs(30);
        let mut y = Exchange::resume("dev-1", &keys, &snap, later).unwrap();
        assert_eq!(y.msg_id(), Some(request_id_of(&snap)));
        assert_eq!(y.next_timer(), Some(later));
        assert_eq!(y.on_timer(later, rng).as_ref(), Some(&copy), "the same bytes");
        assert!(y.on_response(RESP, &response, &PrivateKey::generate(rng, 2048).unwrap(), 1));
        assert_eq!(dev.ran, 1);
        let mut other = snap.clone();
        other.topic = "mqseal/v1/dev/dev-2/cmd".into();
        assert!(Exchange::resume("dev-1", &keys, &other, later).is_err(), "another device's envelope");
    }

    fn request_id_of(snap: &Snapshot) -> MsgId {
        MsgId(hex::decode(&snap.msg_id).unwrap().try_into().unwrap())
    }

    /// A receipt in the retired first form (kind 2) does not end the
    /// wait — it is not authenticated — but the target that never answers
    /// otherwise ends with an error that says to upgrade the agent, not a
    /// bare timeout.
    #[test]
    fn a_retired_receipt_turns_the_timeout_into_an_error_that_says_why() {
        let (keys, rng) = (keys(), &mut mqseal_client::rng());
        let (controller, now) = (PrivateKey::generate(rng, 2048).unwrap(), Instant::now());
        let (mut x, _) = start_sealed(&keys, &controller, now);
        x.give_up_at(now + Duration::from_secs(1));
        let mut retired = vec![mqseal_proto::VERSION, 2];
        retired.extend_from_slice(&[0; 64]);
        assert!(!x.on_response(RESP, &retired, &controller, 0));
        assert!(!x.is_done(), "an unauthenticated frame ends nothing");
        assert_eq!(x.on_timer(now + Duration::from_secs(1), rng), None);
        match x.result() {
            Some(DeviceResult::Error(e)) => assert!(e.contains("kind 2") && e.contains("upgrade"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    /// An exchange given a time to give up at ends there as timed out.
    #[test]
    fn an_exchange_gives_up_at_its_time() {
        let (keys, req, call) = (keys(), request(), Call::new("go", &[]).unwrap());
        let (now, rng) = (Instant::now(), &mut mqseal_client::rng());
        let (mut x, _) = start(&keys, &req, &call, now);
        x.give_up_at(now + Duration::from_secs(1));
        assert_eq!(x.next_timer(), Some(now + Duration::from_secs(1)));
        assert_eq!(x.on_timer(now + Duration::from_secs(1), rng), None);
        assert!(x.is_done());
        assert_eq!(x.result(), Some(&DeviceResult::TimedOut));
    }
}
