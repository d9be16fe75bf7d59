//! Runs `mqseal-proto`'s challenge core over every challenge-mode test
//! vector — positive and negative, device and controller side — on the
//! Cortex-M, and reports through semihosting: one line per failure, a
//! summary, and QEMU's exit code (0 only if every vector behaved).
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use mqseal_mcu_firmware::vectors::{Frame, NEGATIVE, Negative, POSITIVE, Positive};
use mqseal_mcu_firmware::{Script, VectorRng, stack};
use mqseal_proto::challenge::{
    Answer, ChallengeController, ChallengeDevice, ChallengeTable, Clock, Form, HmacKey, Pending, ReplyTo,
};
use mqseal_proto::{Error, MsgId, Outcome, Policy, Status};
use panic_semihosting as _;

/// Vectors run on one table of this many slots, like the Linux tests'.
const SLOTS: usize = 8;

#[entry]
fn main() -> ! {
    stack::paint();
    let mut failed = 0usize;
    for v in POSITIVE {
        if let Err(why) = positive(v) {
            hprintln!("FAIL {}: {}", v.name, why);
            failed += 1;
        }
    }
    for v in NEGATIVE {
        if let Err(why) = negative(v) {
            hprintln!("FAIL {}: {}", v.name, why);
            failed += 1;
        }
    }
    // The checker must be able to fail: a command vector with one bit of
    // its tag flipped has to be refused.
    if let Err(why) = flipped_tag_is_refused() {
        hprintln!("FAIL self-check: {}", why);
        failed += 1;
    }
    let peak = stack::peak();
    hprintln!(
        "{}: {} positive and {} negative challenge-mode vectors, {} failed; peak stack {} bytes",
        env!("MQSEAL_BOARD"),
        POSITIVE.len(),
        NEGATIVE.len(),
        failed,
        peak
    );
    debug::exit(if failed == 0 && !POSITIVE.is_empty() && !NEGATIVE.is_empty() {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    mqseal_mcu_firmware::halt()
}

fn arr<const N: usize>(b: &[u8]) -> Result<[u8; N], &'static str> {
    b.try_into().map_err(|_| "a field has the wrong length")
}

fn key(b: &[u8]) -> Result<HmacKey, &'static str> {
    HmacKey::from_slice(b).map_err(|_| "bad key")
}

fn outcome(o: &(u8, i32, &'static [u8])) -> Result<Outcome<'static>, &'static str> {
    Ok(Outcome { status: Status::from_byte(o.0).ok_or("bad status")?, code: o.1, output: o.2 })
}

/// Candidate outcomes without an allocator: at most four in the vectors.
fn candidates(list: &[(u8, i32, &'static [u8])], out: &mut [Outcome<'static>; 4]) -> Result<usize, &'static str> {
    if list.len() > out.len() {
        return Err("more candidates than the image holds");
    }
    for (slot, c) in out.iter_mut().zip(list) {
        *slot = outcome(c)?;
    }
    Ok(list.len())
}

fn same(got: &[u8], want: &[u8]) -> Result<(), &'static str> {
    if got == want { Ok(()) } else { Err("bytes differ from the vector") }
}

fn positive(v: &Positive) -> Result<(), &'static str> {
    let key = key(v.key)?;
    let ctl = ChallengeController::new(v.device, &key).map_err(|_| "controller")?;
    let dev = ChallengeDevice::new(v.device, &key, Policy::default()).map_err(|_| "device")?;
    let mut buf = [0u8; 512];
    let form = if v.hidden { Form::Hidden } else { Form::Explicit };
    match v.kind {
        "challenge-request" => {
            let n = ctl.request(MsgId(arr(v.request_msg_id)?), &mut buf).map_err(|_| "request")?;
            same(buf.get(..n).ok_or("len")?, v.frame)
        }
        "challenge" => {
            // The device answers the request with the first 16 bytes of the
            // vector RNG: the frame must come out byte for byte.
            let mut req = [0u8; 128];
            let r = ctl.request(MsgId(arr(v.request_msg_id)?), &mut req).map_err(|_| "request")?;
            let mut table = ChallengeTable::<SLOTS>::new(30_000);
            let mut rng = VectorRng::new(v.rng_seed);
            let n = dev
                .answer_request(req.get(..r).ok_or("len")?, &mut table, &mut rng, 0, &mut buf)
                .map_err(|_| "answer_request")?;
            same(buf.get(..n).ok_or("len")?, v.frame)?;
            let offer = ctl.read_challenge(v.frame, MsgId(arr(v.request_msg_id)?)).map_err(|_| "read_challenge")?;
            same(&offer.challenge, v.challenge)
        }
        "challenge-command" => {
            let mut table = ChallengeTable::<SLOTS>::new(30_000);
            table.issue(&mut Script(v.challenge), 0);
            let clock = Clock { monotonic_ms: 1, unix_secs: Some(v.issued_at + 1) };
            let verified =
                dev.verify_command(v.frame, v.topic, clock, &mut table, v.registered).map_err(|_| "verify_command")?;
            let args_ok = verified.call.args.len() == v.call_args.len()
                && verified.call.args.iter().zip(v.call_args).all(|(a, b)| a == *b);
            let header_ok = verified.header.msg_id.0 == arr::<16>(v.msg_id)?
                && verified.header.expires_at == v.expires_at
                && verified.header.topic == v.topic;
            let matches_ok = verified.registered.map(|i| i as u64) == v.matches && verified.form == form;
            if verified.call.name != v.call_name || !args_ok || !header_ok || !matches_ok {
                return Err("verified command differs from the vector");
            }
            if table.is_outstanding(&arr(v.challenge)?, 1) {
                return Err("challenge not used up");
            }
            Ok(())
        }
        "challenge-response" => {
            // The device rebuilds the response byte for byte ...
            let to = ReplyTo {
                msg_id: MsgId(arr(v.in_reply_to)?),
                challenge: arr(v.challenge)?,
                expires_at: v.expires_at,
                form,
            };
            let unix = if v.issued_at == 0 { None } else { Some(v.issued_at) };
            let n = dev
                .respond(&to, form, &outcome(&v.outcome)?, MsgId(arr(v.msg_id)?), unix, &mut buf)
                .map_err(|_| "respond")?;
            same(buf.get(..n).ok_or("len")?, v.frame)?;
            // ... and the controller side verifies it.
            let mut cands = [Outcome { status: Status::Ok, code: 0, output: &[] }; 4];
            let k = candidates(v.candidates, &mut cands)?;
            let pending = Pending { challenge: arr(v.challenge)?, msg_id: MsgId(arr(v.in_reply_to)?) };
            match ctl.read_response(v.frame, v.topic, &pending, cands.get(..k).ok_or("len")?) {
                Ok(Answer::Explicit(o)) if o == outcome(&v.outcome)? => Ok(()),
                Ok(Answer::Hidden(i)) if Some(i as u64) == v.matches => Ok(()),
                _ => Err("read_response"),
            }
        }
        _ => Err("unknown kind"),
    }
}

fn flipped_tag_is_refused() -> Result<(), &'static str> {
    let v = POSITIVE.iter().find(|v| v.kind == "challenge-command").ok_or("no command vector")?;
    let mut frame = [0u8; 512];
    let copy = frame.get_mut(..v.frame.len()).ok_or("vector too long")?;
    copy.copy_from_slice(v.frame);
    if let Some(last) = copy.last_mut() {
        *last ^= 1;
    }
    let key = key(v.key)?;
    let dev = ChallengeDevice::new(v.device, &key, Policy::default()).map_err(|_| "device")?;
    let mut table = ChallengeTable::<SLOTS>::new(30_000);
    table.issue(&mut Script(v.challenge), 0);
    let clock = Clock { monotonic_ms: 1, unix_secs: Some(v.issued_at + 1) };
    match dev.verify_command(copy, v.topic, clock, &mut table, v.registered) {
        Err(Error::BadTag) => Ok(()),
        _ => Err("a flipped tag was not refused with bad_tag"),
    }
}

fn negative(v: &Negative) -> Result<(), &'static str> {
    let Frame::Bytes(frame) = v.frame else {
        return Err("filled frames are not held in this image");
    };
    let key = key(v.key)?;
    let result: Result<(), Error> = if v.controller {
        let mut cands = [Outcome { status: Status::Ok, code: 0, output: &[] }; 4];
        let k = candidates(v.candidates, &mut cands)?;
        let pending = Pending { challenge: arr(v.challenge)?, msg_id: MsgId(arr(v.in_reply_to)?) };
        ChallengeController::new(v.device, &key)
            .and_then(|c| c.read_response(frame, v.arrived_on, &pending, cands.get(..k).unwrap_or(&[])).map(drop))
    } else {
        let mut table = ChallengeTable::<SLOTS>::new(v.lifetime_ms);
        for (challenge, issued_ms) in v.outstanding {
            table.issue(&mut Script(challenge), *issued_ms);
        }
        for (id, expires_at) in v.executed {
            table.record_executed(MsgId(arr(id)?), *expires_at, |_| false);
        }
        table.raise_floor(v.executed_floor);
        let clock = Clock { monotonic_ms: v.monotonic_ms, unix_secs: v.unix_secs };
        ChallengeDevice::new(v.device, &key, Policy::default())
            .and_then(|d| d.verify_command(frame, v.arrived_on, clock, &mut table, v.registered).map(drop))
    };
    match result {
        Err(e) if e.code() == v.expected => Ok(()),
        Err(_) => Err("rejected, but with another error than the vector names"),
        Ok(()) => Err("accepted"),
    }
}
