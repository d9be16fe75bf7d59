//! The whole challenge-mode agent on the Cortex-M: `mqseal-mcu-agent`'s
//! `net::serve` with minimq, over a transport that replays a broker session
//! (CONNACK, SUBACK, then a controller's challenge requests and commands —
//! hidden `open 25`, explicit `level 7`, and a replay of the first).
//!
//! It checks what a broker would have received (the status, two challenges,
//! two responses that `proto`'s controller side verifies), that the handlers
//! ran exactly twice, and that the replay was rejected; and it measures the
//! peak stack of (a) the verification core alone (`Agent::handle`, no MQTT)
//! and (b) the whole agent with its MQTT client and buffers. Result: one
//! line, and QEMU's exit code.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use mqseal_mcu_agent::net::{self, Device, Event};
use mqseal_mcu_agent::{Agent, Call, Clock, Done, Registered, Rejected, Reply, envelope_len};
use mqseal_mcu_firmware::{Script, ScriptIo, VectorRng, block_on, stack};
use mqseal_proto::challenge::{Answer, ChallengeController, ChallengeDevice, ChallengeTable, Form, HmacKey, Pending};
use mqseal_proto::topic::{Channel, topic};
use mqseal_proto::{Error, Header, MsgId, Outcome, Policy, Status};
use panic_semihosting as _;

const ID: &str = "valve-3";
/// The envelope buffer, sized for this device's id.
const ENVELOPE_LEN: usize = envelope_len(ID.len());
const KEY: [u8; 32] = [0x5a; 32];
const SEED: &[u8] = b"mqseal mcu agent image";
const NOW: u64 = 1_800_000_000;
static HIDDEN: [Registered<'static>; 3] = [
    Registered { name: "open", args: &["25"] },
    Registered { name: "open", args: &["50"] },
    Registered { name: "close", args: &[] },
];

/// The firmware's handlers: record what ran.
struct Valve {
    ran: [(&'static str, u8); 4],
    count: usize,
}

impl mqseal_mcu_agent::Commands for Valve {
    fn run(&mut self, call: &Call<'_>, output: &mut [u8]) -> Done {
        let mut args = call.args.iter();
        let one = match (args.next(), args.next()) {
            (Some(a), None) => Some(a),
            _ => None,
        };
        let (name, done) = match (call.name, one) {
            ("open", Some(pct)) => ("open", (Done::ok(0), pct.parse::<u8>().unwrap_or(0))),
            ("level", Some(n)) => {
                let len = b"level=".len() + n.len();
                match output.get_mut(..len) {
                    Some(o) => {
                        let (a, b) = o.split_at_mut(6);
                        a.copy_from_slice(b"level=");
                        b.copy_from_slice(n.as_bytes());
                        ("level", (Done::ok(len), n.parse::<u8>().unwrap_or(0)))
                    }
                    None => ("level", (Done::failed(1), 0)),
                }
            }
            _ => ("?", (Done::unknown(), 0)),
        };
        if let Some(slot) = self.ran.get_mut(self.count) {
            *slot = (name, done.1);
        }
        self.count += 1;
        done.0
    }
}

/// What the controller sends, computed before anything is measured: the
/// agent's RNG is the vector RNG, so its challenges are known in advance.
struct Controller {
    request: [u8; 64],
    request_len: usize,
    hidden: [u8; 256],
    hidden_len: usize,
    explicit: [u8; 256],
    explicit_len: usize,
    challenges: [[u8; 16]; 2],
}

fn controller(key: &HmacKey) -> Result<Controller, Error> {
    let ctl = ChallengeController::new(ID, key)?;
    // The agent draws: challenge 1, response msg id, challenge 2, msg id.
    let mut rng = VectorRng::new(SEED);
    let mut draws = [[0u8; 16]; 4];
    for d in &mut draws {
        rand_core::Rng::fill_bytes(&mut rng, d);
    }
    let challenges = [draws[0], draws[2]];
    let mut c = Controller {
        request: [0; 64],
        request_len: 0,
        hidden: [0; 256],
        hidden_len: 0,
        explicit: [0; 256],
        explicit_len: 0,
        challenges,
    };
    c.request_len = ctl.request(MsgId([1; 16]), &mut c.request)?;
    let cmd_topic = topic(ID, Channel::Command)?;
    let header =
        |m: u8| Header { device: ID, topic: &cmd_topic, msg_id: MsgId([m; 16]), issued_at: NOW, expires_at: NOW + 60 };
    c.hidden_len =
        ctl.command(&header(10), &challenges[0], &Call::new("open", &["25"])?, Form::Hidden, &mut c.hidden)?;
    c.explicit_len =
        ctl.command(&header(11), &challenges[1], &Call::new("level", &["7"])?, Form::Explicit, &mut c.explicit)?;
    Ok(c)
}

#[entry]
fn main() -> ! {
    let ok = match run() {
        Ok(()) => true,
        Err(why) => {
            hprintln!("FAIL: {}", why);
            false
        }
    };
    debug::exit(if ok { debug::EXIT_SUCCESS } else { debug::EXIT_FAILURE });
    mqseal_mcu_firmware::halt()
}

fn run() -> Result<(), &'static str> {
    let key = HmacKey::new(KEY);
    let c = controller(&key).map_err(|_| "building the controller's messages")?;
    let hidden = c.hidden.get(..c.hidden_len).ok_or("len")?;
    let explicit = c.explicit.get(..c.explicit_len).ok_or("len")?;
    let request = c.request.get(..c.request_len).ok_or("len")?;

    // (a) The verification core alone.
    let mut valve = Valve { ran: [("", 0); 4], count: 0 };
    let mut replies = [[0u8; ENVELOPE_LEN]; 2];
    let (core_peak, steps) = core_run(&key, request, hidden, explicit, &mut valve, &mut replies);
    let (lens, replay) = steps.map_err(|_| "core: a step failed")?;
    let [r0, r1] = &replies;
    check_responses(&key, &c, [r0.get(..lens[0]).ok_or("len")?, r1.get(..lens[1]).ok_or("len")?], &valve)?;
    if replay != Err(Rejected::Envelope(Error::UnknownChallenge)) {
        return Err("core: the replay was not rejected as an unknown challenge");
    }

    let verify_only = verify_peak(&key, c.challenges[0], hidden)?;

    // (b) The whole agent with minimq, over the scripted broker.
    let mut script = [0u8; 1024];
    let mut n = 0;
    for packet in [&CONNACK[..], &SUBACK[..]] {
        n = put(&mut script, n, packet)?;
    }
    for (t, payload) in [
        (Channel::ChallengeRequest, request),
        (Channel::Command, hidden),
        (Channel::ChallengeRequest, request),
        (Channel::Command, explicit),
        (Channel::Command, hidden),
    ] {
        n = publish(&mut script, n, &topic(ID, t).map_err(|_| "topic")?, payload)?;
    }
    let mut sent = [0u8; 2048];
    let mut valve = Valve { ran: [("", 0); 4], count: 0 };
    let mut events = [0usize; 3];
    let (agent_peak, sent_len) = mqtt_run(&key, script.get(..n).ok_or("len")?, &mut sent, &mut valve, &mut events);
    let sent = sent.get(..sent_len).ok_or("len")?;

    // What the broker received: status, challenge, response, challenge, response.
    let mut publishes = [(&[][..], &[][..]); 6];
    let count = parse_publishes(sent, &mut publishes)?;
    let expect = [Channel::Status, Channel::Challenge, Channel::Response, Channel::Challenge, Channel::Response];
    if count != expect.len() {
        return Err("the agent did not publish status + 2 challenges + 2 responses");
    }
    for ((t, _), ch) in publishes.iter().zip(expect) {
        if *t != topic(ID, ch).map_err(|_| "topic")?.as_bytes() {
            return Err("a publish went to the wrong topic");
        }
    }
    check_responses(&key, &c, [publishes[2].1, publishes[4].1], &valve)?;
    if events != [1, 4, 1] {
        return Err("events: expected 1 connect, 4 answers, 1 rejected replay");
    }
    hprintln!(
        "{}: agent OK (hidden open 25, explicit level 7, replay rejected); peak stack: verify_command {} B, core {} B per Agent::handle (+ Agent {} B and envelope {} B held by the caller), agent with minimq {} B (rx {} + tx {} + envelope {} B buffers included)",
        env!("MQSEAL_BOARD"),
        verify_only,
        core_peak,
        core::mem::size_of::<Agent<'static, 4>>(),
        ENVELOPE_LEN,
        agent_peak,
        net::RX_LEN,
        net::TX_LEN,
        ENVELOPE_LEN
    );
    Ok(())
}

/// Runs the core over request, hidden command, request, explicit command,
/// replay. Returns the deepest stack any one `Agent::handle` call used
/// below its caller (the agent and the buffers are the caller's, counted
/// apart), the two responses' lengths and the replay's result.
#[inline(never)]
fn core_run(
    key: &HmacKey,
    request: &[u8],
    hidden: &[u8],
    explicit: &[u8],
    valve: &mut Valve,
    replies: &mut [[u8; ENVELOPE_LEN]; 2],
) -> (usize, Result<CoreSteps, Rejected>) {
    let mut peak = 0;
    let result = core_steps(key, request, hidden, explicit, valve, replies, &mut peak);
    (peak, result)
}

/// The two responses' lengths, and what became of the replay.
type CoreSteps = ([usize; 2], Result<(), Rejected>);

/// One measured `Agent::handle`: paint below the current frame, call, read
/// how deep the call went.
macro_rules! measured {
    ($peak:expr, $call:expr) => {{
        let base = stack::sp();
        stack::paint();
        let result = $call;
        $peak = $peak.max(stack::peak_below(base));
        result
    }};
}

#[inline(never)]
fn core_steps(
    key: &HmacKey,
    request: &[u8],
    hidden: &[u8],
    explicit: &[u8],
    valve: &mut Valve,
    replies: &mut [[u8; ENVELOPE_LEN]; 2],
    peak: &mut usize,
) -> Result<CoreSteps, Rejected> {
    let mut agent: Agent<'_, 4> = Agent::new(ID, key, Policy::default(), 30_000, &HIDDEN)?;
    let mut rng = VectorRng::new(SEED);
    let clock = Clock { monotonic_ms: 5, unix_secs: None };
    let req_topic = topic(ID, Channel::ChallengeRequest)?;
    let cmd_topic = topic(ID, Channel::Command)?;
    let mut scratch = [0u8; ENVELOPE_LEN];
    let [r0, r1] = replies;
    measured!(*peak, handle(&mut agent, &req_topic, request, clock, &mut rng, valve, &mut scratch))?;
    let first = measured!(*peak, handle(&mut agent, &cmd_topic, hidden, clock, &mut rng, valve, r0))?.bytes(r0).len();
    measured!(*peak, handle(&mut agent, &req_topic, request, clock, &mut rng, valve, &mut scratch))?;
    let second =
        measured!(*peak, handle(&mut agent, &cmd_topic, explicit, clock, &mut rng, valve, r1))?.bytes(r1).len();
    let replay = measured!(*peak, handle(&mut agent, &cmd_topic, hidden, clock, &mut rng, valve, &mut scratch));
    Ok(([first, second], replay.map(|_: Reply| ())))
}

/// `Agent::handle` behind a call the optimiser may not inline, so that all
/// of its frame lies below the measuring caller's stack pointer.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn handle(
    agent: &mut Agent<'_, 4>,
    topic: &str,
    payload: &[u8],
    clock: Clock,
    rng: &mut VectorRng,
    valve: &mut Valve,
    out: &mut [u8],
) -> Result<Reply, Rejected> {
    agent.handle(topic, payload, clock, rng, valve, out)
}

/// The verification alone (`ChallengeDevice::verify_command`, no handler,
/// no response), measured the same way.
#[inline(never)]
fn verify_peak(key: &HmacKey, challenge: [u8; 16], frame: &[u8]) -> Result<usize, &'static str> {
    let device = ChallengeDevice::new(ID, key, Policy::default()).map_err(|_| "device")?;
    let mut table = ChallengeTable::<4>::new(30_000);
    table.issue(&mut Script(&challenge), 0);
    let cmd_topic = topic(ID, Channel::Command).map_err(|_| "topic")?;
    let mut peak = 0;
    let ok = measured!(peak, verify(&device, frame, &cmd_topic, &mut table));
    if ok { Ok(peak) } else { Err("verify_command refused the hidden command") }
}

#[inline(never)]
fn verify(device: &ChallengeDevice<'_>, frame: &[u8], topic: &str, table: &mut ChallengeTable<4>) -> bool {
    let clock = Clock { monotonic_ms: 1, unix_secs: None };
    device.verify_command(frame, topic, clock, table, &HIDDEN).is_ok()
}

/// Runs `net::serve` over the script; returns the peak stack below this
/// call (the agent, minimq's session, all three buffers) and bytes sent.
#[inline(never)]
fn mqtt_run(
    key: &HmacKey,
    script: &[u8],
    sent: &mut [u8],
    valve: &mut Valve,
    events: &mut [usize; 3],
) -> (usize, usize) {
    let base = stack::sp();
    stack::paint();
    let n = mqtt_steps(key, script, sent, valve, events);
    (stack::peak_below(base), n)
}

#[inline(never)]
fn mqtt_steps(key: &HmacKey, script: &[u8], sent: &mut [u8], valve: &mut Valve, events: &mut [usize; 3]) -> usize {
    let Ok(mut agent) = Agent::<'_, 4>::new(ID, key, Policy::default(), 30_000, &HIDDEN) else { return 0 };
    let Ok(status) = agent.topic(Channel::Status) else { return 0 };
    let (mut rx, mut tx, mut out) = ([0u8; net::RX_LEN], [0u8; net::TX_LEN], [0u8; ENVELOPE_LEN]);
    let Ok(mut session) = net::session(&mut rx, &mut tx, ID, b"device-password", &status, 60) else { return 0 };
    let mut rng = VectorRng::new(SEED);
    let mut device = Device {
        rng: &mut rng,
        commands: valve,
        clock: || Clock { monotonic_ms: 5, unix_secs: None },
        log: |e: Event| match e {
            Event::Connected => events[0] += 1,
            Event::Answered(_) => events[1] += 1,
            Event::Rejected(_) => events[2] += 1,
        },
    };
    let mut io = ScriptIo::new(script, sent);
    let _ended = block_on(net::serve(&mut session, &mut io, &mut agent, &mut device, &mut out));
    io.sent_len
}

fn check_responses(key: &HmacKey, c: &Controller, responses: [&[u8]; 2], valve: &Valve) -> Result<(), &'static str> {
    if valve.count != 2 || valve.ran[0] != ("open", 25) || valve.ran[1] != ("level", 7) {
        return Err("the handlers did not run exactly open 25, then level 7");
    }
    let ctl = ChallengeController::new(ID, key).map_err(|_| "controller")?;
    let resp = topic(ID, Channel::Response).map_err(|_| "topic")?;
    let ok = Outcome { status: Status::Ok, code: 0, output: &[] };
    let failed = Outcome { status: Status::Failed, code: 0, output: &[] };
    let first = ctl.read_response(
        responses[0],
        &resp,
        &Pending { challenge: c.challenges[0], msg_id: MsgId([10; 16]) },
        &[failed, ok],
    );
    let second =
        ctl.read_response(responses[1], &resp, &Pending { challenge: c.challenges[1], msg_id: MsgId([11; 16]) }, &[]);
    match (first, second) {
        (Ok(Answer::Hidden(1)), Ok(Answer::Explicit(o))) if o.status == Status::Ok && o.output == b"level=7" => Ok(()),
        _ => Err("a response did not verify on the controller side"),
    }
}

/// MQTT 5 CONNACK: session not present, success, no properties.
const CONNACK: [u8; 5] = [0x20, 0x03, 0x00, 0x00, 0x00];
/// MQTT 5 SUBACK for packet id 1: no properties, two filters granted QoS 0.
const SUBACK: [u8; 7] = [0x90, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00];

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) -> Result<usize, &'static str> {
    buf.get_mut(at..at + bytes.len()).ok_or("script buffer too small")?.copy_from_slice(bytes);
    Ok(at + bytes.len())
}

/// An MQTT 5 QoS 0 PUBLISH from the broker.
fn publish(buf: &mut [u8], mut at: usize, topic: &str, payload: &[u8]) -> Result<usize, &'static str> {
    let remaining = 2 + topic.len() + 1 + payload.len();
    at = put(buf, at, &[0x30])?;
    let mut len = remaining;
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        at = put(buf, at, &[byte])?;
        if len == 0 {
            break;
        }
    }
    at = put(buf, at, &(topic.len() as u16).to_be_bytes())?;
    at = put(buf, at, topic.as_bytes())?;
    at = put(buf, at, &[0])?;
    put(buf, at, payload)
}

/// Splits the client's byte stream into packets and returns the PUBLISHes
/// (topic, payload) in order.
fn parse_publishes<'a>(mut s: &'a [u8], out: &mut [(&'a [u8], &'a [u8]); 6]) -> Result<usize, &'static str> {
    let mut count = 0;
    while let Some((&first, rest)) = s.split_first() {
        let (mut len, mut shift, mut used) = (0usize, 0, 0);
        for b in rest {
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            used += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let body = rest.get(used..used + len).ok_or("truncated packet")?;
        s = rest.get(used + len..).ok_or("truncated packet")?;
        if first >> 4 != 3 {
            continue;
        }
        let tlen = usize::from(u16::from_be_bytes([*body.first().ok_or("t")?, *body.get(1).ok_or("t")?]));
        let topic = body.get(2..2 + tlen).ok_or("topic")?;
        let mut p = 2 + tlen;
        if first & 0x06 != 0 {
            p += 2; // packet id
        }
        let props = usize::from(*body.get(p).ok_or("props")?); // < 128 here
        let payload = body.get(p + 1 + props..).ok_or("payload")?;
        *out.get_mut(count).ok_or("too many publishes")? = (topic, payload);
        count += 1;
    }
    Ok(count)
}
