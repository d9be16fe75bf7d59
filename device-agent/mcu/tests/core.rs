//! The microcontroller agent's core on the host, against `proto`'s
//! controller side: both forms run their handler once and are answered with
//! a response the controller verifies; replays, tampering, wrong devices and
//! wrong topics run nothing and answer nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use mqseal_mcu_agent::{
    Agent, Call, Clock, Done, ENVELOPE_LEN, HmacKey, Policy, Registered, Rejected, Reply, Status, envelope_len,
};
use mqseal_proto::challenge::{Answer, ChallengeController, Form, Pending};
use mqseal_proto::topic::{Channel, topic};
use mqseal_proto::{Error, Header, MsgId, Outcome};
use sha2::{Digest, Sha256};

const ID: &str = "valve-3";
const NOW: u64 = 1_800_000_000;

/// SHA-256 in counter mode: deterministic, and distinct per seed.
struct TestRng(u64);
impl rand_core::TryRng for TestRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(32) {
            self.0 += 1;
            let block: [u8; 32] = Sha256::digest(self.0.to_be_bytes()).into();
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
        Ok(())
    }
}
impl rand_core::TryCryptoRng for TestRng {}

static HIDDEN: [Registered<'static>; 2] =
    [Registered { name: "open", args: &["25"] }, Registered { name: "close", args: &[] }];

/// The firmware under test: records every call it runs.
#[derive(Default)]
struct Valve {
    ran: Vec<(String, Vec<String>)>,
}

impl mqseal_mcu_agent::Commands for Valve {
    fn run(&mut self, call: &Call<'_>, output: &mut [u8]) -> Done {
        self.ran.push((call.name.to_owned(), call.args.iter().map(str::to_owned).collect()));
        match call.name {
            "open" | "close" => Done::ok(0),
            "read" => {
                output[..4].copy_from_slice(b"21.5");
                Done::ok(4)
            }
            _ => Done::unknown(),
        }
    }
}

struct Bench {
    key: &'static HmacKey,
    agent: Agent<'static, 4>,
    valve: Valve,
    rng: TestRng,
    clock: Clock,
}

fn key() -> &'static HmacKey {
    Box::leak(Box::new(HmacKey::new([7; 32])))
}

fn bench() -> Bench {
    let key = key();
    let agent = Agent::new(ID, key, Policy::default(), 30_000, &HIDDEN).unwrap();
    Bench { key, agent, valve: Valve::default(), rng: TestRng(0), clock: Clock { monotonic_ms: 1000, unix_secs: None } }
}

impl Bench {
    fn handle(&mut self, channel: Channel, payload: &[u8]) -> Result<Vec<u8>, Rejected> {
        let mut out = [0u8; ENVELOPE_LEN];
        let t = topic(ID, channel).unwrap();
        let reply = self.agent.handle(&t, payload, self.clock, &mut self.rng, &mut self.valve, &mut out)?;
        let expected = match channel {
            Channel::ChallengeRequest => Channel::Challenge,
            _ => Channel::Response,
        };
        assert_eq!(reply.channel(), expected);
        assert!(matches!(reply, Reply::Written { .. }));
        Ok(reply.bytes(&out).to_vec())
    }

    /// Asks for a challenge the way `mqseal` does.
    fn challenge(&mut self) -> [u8; 16] {
        let controller = ChallengeController::new(ID, self.key).unwrap();
        let mut buf = [0u8; 64];
        let n = controller.request(MsgId([1; 16]), &mut buf).unwrap();
        let frame = self.handle(Channel::ChallengeRequest, &buf[..n]).unwrap();
        controller.read_challenge(&frame, MsgId([1; 16])).unwrap().challenge
    }

    fn command(&self, challenge: &[u8; 16], call: &Call<'_>, form: Form, msg: u8) -> Vec<u8> {
        self.command_issued(challenge, call, form, msg, NOW)
    }

    /// A command issued at `issued_at`, valid 60 s.
    fn command_issued(&self, challenge: &[u8; 16], call: &Call<'_>, form: Form, msg: u8, issued_at: u64) -> Vec<u8> {
        let controller = ChallengeController::new(ID, self.key).unwrap();
        let cmd_topic = topic(ID, Channel::Command).unwrap();
        let header =
            Header { device: ID, topic: &cmd_topic, msg_id: MsgId([msg; 16]), issued_at, expires_at: issued_at + 60 };
        let mut buf = [0u8; 512];
        let n = controller.command(&header, challenge, call, form, &mut buf).unwrap();
        buf[..n].to_vec()
    }
}

fn read_response<'a>(
    key: &HmacKey,
    frame: &'a [u8],
    challenge: [u8; 16],
    msg: u8,
    candidates: &[Outcome<'_>],
) -> Answer<'a> {
    let controller = ChallengeController::new(ID, key).unwrap();
    let resp_topic = topic(ID, Channel::Response).unwrap();
    controller.read_response(frame, &resp_topic, &Pending { challenge, msg_id: MsgId([msg; 16]) }, candidates).unwrap()
}

#[test]
fn explicit_command_runs_once_and_is_answered() {
    let mut b = bench();
    let challenge = b.challenge();
    let cmd = b.command(&challenge, &Call::new("read", &["t1"]).unwrap(), Form::Explicit, 9);
    let resp = b.handle(Channel::Command, &cmd).unwrap();
    assert_eq!(b.valve.ran, vec![("read".to_owned(), vec!["t1".to_owned()])]);
    match read_response(b.key, &resp, challenge, 9, &[]) {
        Answer::Explicit(o) => assert_eq!((o.status, o.code, o.output), (Status::Ok, 0, &b"21.5"[..])),
        Answer::Hidden(_) => panic!("an explicit command gets an explicit answer"),
    }
    // The same bytes again: the challenge is used up.
    assert_eq!(b.handle(Channel::Command, &cmd), Err(Rejected::Envelope(Error::UnknownChallenge)));
    assert_eq!(b.valve.ran.len(), 1, "a replay runs nothing");
}

/// A controller's copies of one command over other challenges
/// (docs/PROTOCOL.md §6.5) run once: the agent remembers the message ids
/// of its last `SLOTS` commands. The copy over an outstanding challenge is
/// refused as `replayed`, without using that challenge up; a new command
/// over it then runs.
#[test]
fn copies_over_other_challenges_run_once() {
    let mut b = bench();
    let (first, second) = (b.challenge(), b.challenge());
    let open = Call::new("open", &["25"]).unwrap();
    b.handle(Channel::Command, &b.command(&first, &open, Form::Hidden, 8)).unwrap();
    let copy = b.command(&second, &open, Form::Hidden, 8);
    assert_eq!(b.handle(Channel::Command, &copy), Err(Rejected::Envelope(Error::Replayed)));
    assert_eq!(b.valve.ran.len(), 1, "the copy ran nothing");
    b.handle(Channel::Command, &b.command(&second, &open, Form::Hidden, 9)).unwrap();
    assert_eq!(b.valve.ran.len(), 2, "the challenge was still good for another command");
}

/// The review's case: a malicious broker holds a copy back, over a
/// challenge that stays outstanding, while newer commands push the
/// original's message id out of the agent's memory (4 entries). Forgetting
/// raised the floor to the original's expiry, so the copy is still refused;
/// later commands run.
#[test]
fn a_copy_held_back_until_its_id_is_forgotten_still_runs_nothing() {
    let mut b = bench();
    let (first, held) = (b.challenge(), b.challenge());
    let open = Call::new("open", &["25"]).unwrap();
    b.handle(Channel::Command, &b.command_issued(&first, &open, Form::Hidden, 8, NOW)).unwrap();
    let copy = b.command_issued(&held, &open, Form::Hidden, 8, NOW);
    for n in 0..4u8 {
        let c = b.challenge();
        let cmd = b.command_issued(&c, &open, Form::Hidden, 20 + n, NOW + 1 + u64::from(n));
        b.handle(Channel::Command, &cmd).unwrap();
    }
    assert_eq!(b.valve.ran.len(), 5);
    assert!(b.agent.outstanding(b.clock.monotonic_ms) >= 1, "the held challenge is still outstanding");
    assert_eq!(b.handle(Channel::Command, &copy), Err(Rejected::Envelope(Error::BeyondReplayWindow)));
    assert_eq!(b.valve.ran.len(), 5, "the copy ran nothing");
    let later = b.command_issued(&held, &open, Form::Hidden, 30, NOW + 10);
    b.handle(Channel::Command, &later).unwrap();
    assert_eq!(b.valve.ran.len(), 6, "a newer command over the same challenge runs");
}

#[test]
fn hidden_command_is_identified_and_answered_with_its_status() {
    let mut b = bench();
    let challenge = b.challenge();
    let cmd = b.command(&challenge, &Call::new("open", &["25"]).unwrap(), Form::Hidden, 4);
    assert!(!cmd.windows(4).any(|w| w == b"open"), "hidden form does not carry the name");
    let resp = b.handle(Channel::Command, &cmd).unwrap();
    assert_eq!(b.valve.ran, vec![("open".to_owned(), vec!["25".to_owned()])]);
    let candidates = [
        Outcome { status: Status::Failed, code: 0, output: &[] },
        Outcome { status: Status::Ok, code: 0, output: &[] },
    ];
    assert_eq!(read_response(b.key, &resp, challenge, 4, &candidates), Answer::Hidden(1));
}

#[test]
fn unregistered_hidden_command_and_unknown_explicit_name() {
    let mut b = bench();
    let challenge = b.challenge();
    let cmd = b.command(&challenge, &Call::new("open", &["26"]).unwrap(), Form::Hidden, 5);
    assert_eq!(b.handle(Channel::Command, &cmd), Err(Rejected::Envelope(Error::BadTag)));
    assert!(b.valve.ran.is_empty());
    // The failed attempt did not use the challenge up; a genuine command can.
    let cmd = b.command(&challenge, &Call::new("reboot", &[]).unwrap(), Form::Explicit, 6);
    let resp = b.handle(Channel::Command, &cmd).unwrap();
    match read_response(b.key, &resp, challenge, 6, &[]) {
        Answer::Explicit(o) => assert_eq!(o.status, Status::UnknownCommand),
        Answer::Hidden(_) => panic!("explicit expected"),
    }
}

#[test]
fn tampered_wrong_device_wrong_topic_and_expired_run_nothing() {
    let mut b = bench();
    let challenge = b.challenge();
    let cmd = b.command(&challenge, &Call::new("read", &[]).unwrap(), Form::Explicit, 7);
    for i in 0..cmd.len() {
        let mut t = cmd.clone();
        t[i] ^= 0x01;
        assert!(b.handle(Channel::Command, &t).is_err(), "byte {i} flipped was accepted");
    }
    // Published on the challenge-request topic, or on another device's topic.
    assert!(b.handle(Channel::ChallengeRequest, &cmd).is_err());
    let other = topic("valve-4", Channel::Command).unwrap();
    let mut out = [0u8; ENVELOPE_LEN];
    let r = b.agent.handle(&other, &cmd, b.clock, &mut b.rng, &mut b.valve, &mut out);
    assert_eq!(r, Err(Rejected::Topic));
    // A device with a clock checks header times.
    b.clock.unix_secs = Some(NOW + 3600);
    assert_eq!(b.handle(Channel::Command, &cmd), Err(Rejected::Envelope(Error::Expired)));
    // The challenge itself expires by the monotonic clock.
    b.clock = Clock { monotonic_ms: 1000 + 30_000, unix_secs: None };
    assert_eq!(b.handle(Channel::Command, &cmd), Err(Rejected::Envelope(Error::UnknownChallenge)));
    assert!(b.valve.ran.is_empty());
}

#[test]
fn malformed_and_oversized_input_is_rejected() {
    let mut b = bench();
    for junk in [&[][..], &[1][..], &[1, 5][..], &[9, 9, 9][..], &[1, 5, 0xff, 0xff, 0xff, 0xff, 0xff][..]] {
        assert!(b.handle(Channel::Command, junk).is_err(), "{junk:?}");
        assert!(b.handle(Channel::ChallengeRequest, junk).is_err(), "{junk:?}");
    }
    let big = vec![1u8; 70_000];
    assert!(matches!(b.handle(Channel::Command, &big), Err(Rejected::Envelope(Error::TooLarge { .. }))));
    // A sealed envelope on a build without sealed mode.
    assert_eq!(b.handle(Channel::Command, &[1, 1, 0]), Err(Rejected::NoSealedMode));
    assert!(b.valve.ran.is_empty());
}

#[test]
fn the_envelope_buffer_holds_the_largest_response() {
    for len in [1, 7, 64] {
        let largest = largest_response(len);
        assert!(largest <= envelope_len(len), "{largest} > envelope_len({len})");
        // Times near u64::MAX / 2 are nine bytes, not ten: the bound is
        // within two bytes of what is written.
        assert!(largest + 2 >= envelope_len(len), "envelope_len({len}) is loose: {largest}");
    }
    assert_eq!(ENVELOPE_LEN, envelope_len(64));
}

/// The length of the largest response an agent whose id has `len` bytes
/// writes: full output, the widest code, big times.
fn largest_response(len: usize) -> usize {
    let id: &'static str = Box::leak("d".repeat(len).into_boxed_str());
    let key = key();
    let mut agent: Agent<'static, 1> = Agent::new(id, key, Policy::default(), 30_000, &[]).unwrap();
    let controller = ChallengeController::new(id, key).unwrap();
    let mut rng = TestRng(9);
    let mut out = vec![0u8; envelope_len(len)];
    let clock = Clock { monotonic_ms: 0, unix_secs: Some(u64::MAX / 2) };
    let mut buf = [0u8; 128];
    let n = controller.request(MsgId([1; 16]), &mut buf).unwrap();
    let mut full = |_: &Call<'_>, o: &mut [u8]| {
        o.fill(b'x');
        Done { status: Status::Failed, code: i32::MIN, len: o.len() }
    };
    let req_topic = topic(id, Channel::ChallengeRequest).unwrap();
    let r = agent.handle(&req_topic, &buf[..n], clock, &mut rng, &mut full, &mut out).unwrap();
    let challenge = controller.read_challenge(r.bytes(&out), MsgId([1; 16])).unwrap().challenge;
    let cmd_topic = topic(id, Channel::Command).unwrap();
    let header = Header {
        device: id,
        topic: &cmd_topic,
        msg_id: MsgId([2; 16]),
        issued_at: u64::MAX / 2,
        expires_at: u64::MAX / 2 + 60,
    };
    let mut cmd = [0u8; 512];
    let n = controller.command(&header, &challenge, &Call::new("x", &[]).unwrap(), Form::Explicit, &mut cmd).unwrap();
    let r = agent.handle(&cmd_topic, &cmd[..n], clock, &mut rng, &mut full, &mut out).unwrap();
    r.bytes(&out).len()
}
