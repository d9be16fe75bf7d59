//! Property tests: no input makes a receiver panic, and no mutation of a
//! genuine envelope is accepted.
//!
//! The exhaustive single-byte tests live in `attacks.rs`; here proptest
//! throws arbitrary bytes, bytes behind a valid version and kind (to get past
//! the first check), and random edit sequences (insert, delete, overwrite,
//! truncate) at every opener the agents and controllers call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::sync::LazyLock;

use common::{Keys, Script, VectorRng};
use mqseal_proto::challenge::{
    ChallengeController, ChallengeDevice, ChallengeTable, Clock, Form, HmacKey, Pending, Registered,
};
use mqseal_proto::sealed::{Keyring, ReceiptKey, ReplayCache, SealedController, SealedDevice};
use mqseal_proto::topic::{Channel, topic};
use mqseal_proto::{Call, Header, MsgId, Outcome, Policy, Status, peek};
use proptest::prelude::*;

const NOW: u64 = 1_800_000_000;
const DEV: &str = "dev-1";
const CHALLENGE: [u8; 16] = [0x33; 16];
const REGISTRY: &[Registered<'static>] =
    &[Registered { name: "led-on", args: &[] }, Registered { name: "reboot", args: &["now"] }];

struct World {
    keys: Keys,
    ring: Keyring,
    hmac: HmacKey,
    sealed: Vec<u8>,
    receipt_key: ReceiptKey,
    explicit: Vec<u8>,
    hidden: Vec<u8>,
    response: Vec<u8>,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let keys = Keys::load();
    let ring: Keyring = [keys.public("controller-2048").clone()].into_iter().collect();
    let hmac = keys.hmac("dev-chal").clone();
    let cmd = topic(DEV, Channel::Command).unwrap();
    let hd = Header { device: DEV, topic: &cmd, msg_id: MsgId([1; 16]), issued_at: NOW, expires_at: NOW + 60 };
    let call = Call::new("led-on", &[]).unwrap();
    let sealed = SealedController::new(keys.private("controller-2048"))
        .seal_command(&mut VectorRng::new(b"p"), keys.public("device-2048"), &hd, &call)
        .unwrap();
    let receipt_key = sealed.receipt_key;
    let sealed = sealed.frame;
    let ctl = ChallengeController::new(DEV, &hmac).unwrap();
    let mut buf = [0u8; 1024];
    let n = ctl.command(&hd, &CHALLENGE, &call, Form::Explicit, &mut buf).unwrap();
    let explicit = buf[..n].to_vec();
    let n = ctl.command(&hd, &CHALLENGE, &call, Form::Hidden, &mut buf).unwrap();
    let hidden = buf[..n].to_vec();
    let dev = ChallengeDevice::new(DEV, &hmac, Policy::default()).unwrap();
    let mut table = ChallengeTable::<2>::new(1000);
    table.issue(&mut Script::new(&CHALLENGE), 0);
    let response = {
        let v = dev.verify_command(&explicit, &cmd, Clock::default(), &mut table, REGISTRY).unwrap();
        let outcome = Outcome { status: Status::Ok, code: 0, output: b"x" };
        let n = dev.respond(&v.reply_to(), Form::Explicit, &outcome, MsgId([2; 16]), None, &mut buf).unwrap();
        buf[..n].to_vec()
    };
    World { keys, ring, hmac, sealed, receipt_key, explicit, hidden, response }
});

/// Every opener, fed `frame`. Returns how many accepted it. Panics are what
/// proptest catches.
fn accepted_by_any(frame: &[u8]) -> usize {
    let w = &*WORLD;
    let cmd = topic(DEV, Channel::Command).unwrap();
    let resp = topic(DEV, Channel::Response).unwrap();
    let _ = peek(frame);
    let sdev = SealedDevice::new(DEV, w.keys.private("device-2048"), &w.ring, Policy::default()).unwrap();
    let mut cache = ReplayCache::new(8, Policy::default());
    let a = sdev.open_command(&mut VectorRng::new(b"b"), frame, &cmd, NOW, &mut cache).is_ok();
    let b = SealedController::new(w.keys.private("controller-2048"))
        .open_response(frame, &resp, DEV, w.keys.public("device-2048"), MsgId([1; 16]), &w.receipt_key)
        .is_ok();
    let cdev = ChallengeDevice::new(DEV, &w.hmac, Policy::default()).unwrap();
    let mut table = ChallengeTable::<2>::new(1000);
    table.issue(&mut Script::new(&CHALLENGE), 0);
    let clock = Clock { monotonic_ms: 1, unix_secs: Some(NOW) };
    let c = cdev.verify_command(frame, &cmd, clock, &mut table, REGISTRY).is_ok();
    let mut out = [0u8; 512];
    let _ = cdev.answer_request(frame, &mut table, &mut VectorRng::new(b"c"), 1, &mut out);
    let ctl = ChallengeController::new(DEV, &w.hmac).unwrap();
    let pending = Pending { challenge: CHALLENGE, msg_id: MsgId([1; 16]) };
    let d = ctl.read_response(frame, &resp, &pending, &[]).is_ok();
    let _ = ctl.read_challenge(frame, MsgId([1; 16]));
    let _ = ReplayCache::restore(frame, 8, Policy::default(), NOW);
    [a, b, c, d].into_iter().filter(|x| *x).count()
}

#[derive(Debug, Clone)]
enum Edit {
    Overwrite(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn apply(frame: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut f = frame.to_vec();
    for e in edits {
        let len = f.len();
        match *e {
            Edit::Overwrite(i, v) if len > 0 => f[i % len] = v,
            Edit::Insert(i, v) => f.insert(i % (len + 1), v),
            Edit::Delete(i) if len > 0 => {
                f.remove(i % len);
            }
            Edit::Truncate(i) => f.truncate(i % (len + 1)),
            _ => {}
        }
    }
    f
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Edit::Overwrite(i, v)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Edit::Insert(i, v)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert_eq!(accepted_by_any(&bytes), 0);
    }

    #[test]
    fn random_bodies_behind_a_valid_prefix_are_refused(kind in 1u8..=6, body in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let mut frame = vec![1, kind];
        frame.extend(body);
        prop_assert_eq!(accepted_by_any(&frame), 0);
    }

    #[test]
    fn edited_envelopes_are_refused_unless_unchanged(which in 0usize..4, edits in proptest::collection::vec(edit(), 1..6)) {
        let w = &*WORLD;
        let original = [&w.sealed, &w.explicit, &w.hidden, &w.response][which];
        let edited = apply(original, &edits);
        let accepted = accepted_by_any(&edited);
        if edited == *original {
            prop_assert_eq!(accepted, 1);
        } else {
            prop_assert_eq!(accepted, 0, "edited envelope accepted: {:?}", edits);
        }
    }
}

#[test]
fn the_genuine_envelopes_are_each_accepted_exactly_once() {
    let w = &*WORLD;
    for f in [&w.sealed, &w.explicit, &w.hidden, &w.response] {
        assert_eq!(accepted_by_any(f), 1);
    }
}
