//! Attacks on real envelopes, through the same API the agents use.
//!
//! Each test plays an attacker with a precise capability — flipping bytes on
//! the wire, replaying, re-signing as another trusted controller, converting
//! between forms — and asserts that the receiver refuses, with the reason
//! that proves the refusal happened at the right stage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{Keys, Script, VectorRng, enc, resign};
use mqseal_proto::challenge::{
    Answer, ChallengeController, ChallengeDevice, ChallengeTable, Clock, Form, Pending, Registered,
};
use mqseal_proto::sealed::backend::{self, Backend, RustCrypto};
use mqseal_proto::sealed::{Keyring, ReplayCache, SealedCommand, SealedController, SealedDevice, verify_receipt};
use mqseal_proto::topic::{Channel, Topic, topic};
use mqseal_proto::{Call, Error, Header, MsgId, Outcome, Policy, Status};

const NOW: u64 = 1_800_000_000;
const DEV: &str = "dev-1";
const REGISTRY: &[Registered<'static>] = &[
    Registered { name: "led-on", args: &[] },
    Registered { name: "led-off", args: &[] },
    Registered { name: "reboot", args: &["now"] },
];

fn t(ch: Channel) -> Topic {
    topic(DEV, ch).unwrap()
}

fn header(topic: &str, msg: u8) -> Header<'_> {
    Header { device: DEV, topic, msg_id: MsgId([msg; 16]), issued_at: NOW, expires_at: NOW + 60 }
}

struct Sealed {
    keys: Keys,
    ring: Keyring,
}

impl Sealed {
    fn new() -> Self {
        Sealed::on(&RustCrypto)
    }
    fn on(backend: &'static dyn Backend) -> Self {
        let keys = Keys::load_with(backend);
        let ring =
            [keys.public("controller-2048").clone(), keys.public("controller-3072").clone()].into_iter().collect();
        Sealed { keys, ring }
    }
    fn device(&self) -> SealedDevice<'_> {
        SealedDevice::new(DEV, self.keys.private("device-2048"), &self.ring, Policy::default()).unwrap()
    }
    fn command(&self, signer: &str, msg: u8) -> Vec<u8> {
        self.sealed_command(signer, msg).frame
    }
    fn sealed_command(&self, signer: &str, msg: u8) -> SealedCommand {
        let cmd = t(Channel::Command);
        SealedController::new(self.keys.private(signer))
            .seal_command(
                &mut VectorRng::new(&[msg]),
                self.keys.public("device-2048"),
                &header(&cmd, msg),
                &Call::new("set-interval", &["30"]).unwrap(),
            )
            .unwrap()
    }
    fn open(&self, frame: &[u8], cache: &mut ReplayCache) -> Result<String, Error> {
        self.device()
            .open_command(&mut VectorRng::new(b"b"), frame, &t(Channel::Command), NOW + 1, cache)
            .map(|c| c.name.clone())
    }
}

/// Every byte of a sealed command, changed three ways (low bit, high bit,
/// all bits), is refused — and refused *before* any private-key operation:
/// `DecryptFailed` is only reachable after the signature has verified, so
/// never seeing it proves the device never decrypted unauthenticated input.
/// Nothing is recorded either: the genuine envelope still opens afterwards.
#[test]
fn every_byte_flip_of_a_sealed_command_is_refused_before_decryption() {
    backend::ALL.iter().for_each(|b| byte_flips_of_a_command(*b));
}

fn byte_flips_of_a_command(b: &'static dyn Backend) {
    let s = Sealed::on(b);
    let frame = s.command("controller-2048", 1);
    let mut cache = ReplayCache::new(64, Policy::default());
    for i in 0..frame.len() {
        for mask in [0x01, 0x80, 0xff] {
            let mut f = frame.clone();
            f[i] ^= mask;
            match s.open(&f, &mut cache) {
                Ok(_) => panic!("byte {i} ^ {mask:#x} accepted"),
                Err(Error::DecryptFailed) => panic!("byte {i} ^ {mask:#x} reached decryption"),
                Err(_) => {}
            }
        }
    }
    assert!(cache.is_empty(), "a rejected envelope was recorded");
    assert_eq!(s.open(&frame, &mut cache).unwrap(), "set-interval");
}

/// The receipt direction: every byte of a sealed response, flipped, is refused.
#[test]
fn every_byte_flip_of_a_sealed_response_is_refused() {
    backend::ALL.iter().for_each(|b| byte_flips_of_a_response(*b));
}

fn byte_flips_of_a_response(b: &'static dyn Backend) {
    let s = Sealed::on(b);
    let sealed = s.sealed_command("controller-2048", 2);
    let frame = sealed.frame;
    let mut cache = ReplayCache::new(64, Policy::default());
    let dev = s.device();
    let opened = dev.open_command(&mut VectorRng::new(b"b"), &frame, &t(Channel::Command), NOW, &mut cache).unwrap();
    let outcome = Outcome { status: Status::Ok, code: 0, output: b"ok" };
    let resp = dev.seal_response(&mut VectorRng::new(b"r"), &opened, &outcome, MsgId([9; 16]), NOW).unwrap();
    let ctl = SealedController::new(s.keys.private("controller-2048"));
    let open = |f: &[u8]| {
        ctl.open_response(
            f,
            &t(Channel::Response),
            DEV,
            s.keys.public("device-2048"),
            MsgId([2; 16]),
            &sealed.receipt_key,
        )
    };
    let ok = open(&resp).unwrap();
    assert_eq!((ok.status, ok.code, ok.output.as_slice()), (Status::Ok, 0, &b"ok"[..]));
    for i in 0..resp.len() {
        for mask in [0x01, 0x80, 0xff] {
            let mut f = resp.clone();
            f[i] ^= mask;
            match open(&f) {
                Ok(_) => panic!("byte {i} ^ {mask:#x} accepted"),
                Err(Error::DecryptFailed) => panic!("byte {i} ^ {mask:#x} reached decryption"),
                Err(_) => {}
            }
        }
    }
}

/// An audit log keeps receipts long after their commands: one is checked
/// again with public keys alone (no controller key, no receipt key), and
/// every byte flip of it, another command's id, another recipient or
/// another device's key is refused.
#[test]
fn a_stored_receipt_verifies_with_public_keys_alone_and_not_once_changed() {
    backend::ALL.iter().for_each(|b| stored_receipt(*b));
}

fn stored_receipt(b: &'static dyn Backend) {
    let s = Sealed::on(b);
    let sealed = s.sealed_command("controller-2048", 3);
    let mut cache = ReplayCache::new(64, Policy::default());
    let dev = s.device();
    let opened =
        dev.open_command(&mut VectorRng::new(b"b"), &sealed.frame, &t(Channel::Command), NOW, &mut cache).unwrap();
    let outcome = Outcome { status: Status::Failed, code: 7, output: b"disk full" };
    let resp = dev.seal_response(&mut VectorRng::new(b"r"), &opened, &outcome, MsgId([8; 16]), NOW).unwrap();
    let (device_key, controller) = (s.keys.public("device-2048"), s.keys.public("controller-2048").id());
    let facts = verify_receipt(&resp, DEV, device_key, controller, MsgId([3; 16])).unwrap();
    assert_eq!((facts.sender, facts.recipient, facts.in_reply_to), (device_key.id(), controller, MsgId([3; 16])));
    assert_eq!((facts.header.device.as_str(), facts.header.msg_id), (DEV, MsgId([8; 16])));
    for i in 0..resp.len() {
        let mut f = resp.clone();
        f[i] ^= 0x01;
        assert!(verify_receipt(&f, DEV, device_key, controller, MsgId([3; 16])).is_err(), "byte {i} flipped");
    }
    assert_eq!(verify_receipt(&resp, DEV, device_key, controller, MsgId([4; 16])), Err(Error::UnexpectedReply));
    let other = s.keys.public("controller-3072").id();
    assert_eq!(verify_receipt(&resp, DEV, device_key, other, MsgId([3; 16])), Err(Error::WrongRecipient));
    let impostor = s.keys.public("device-3072");
    assert_eq!(verify_receipt(&resp, DEV, impostor, controller, MsgId([3; 16])), Err(Error::UnknownSigner));
    assert_eq!(verify_receipt(&resp, "dev-2", device_key, controller, MsgId([3; 16])), Err(Error::WrongDevice));
}

/// Replays are refused immediately and after a restart (export/restore).
#[test]
fn replay_is_refused_also_after_a_restart() {
    let s = Sealed::new();
    let frame = s.command("controller-2048", 3);
    let mut cache = ReplayCache::new(64, Policy::default());
    assert_eq!(s.open(&frame, &mut cache).unwrap(), "set-interval");
    assert_eq!(s.open(&frame, &mut cache), Err(Error::Replayed));
    let saved = cache.export().unwrap();
    let mut restored = ReplayCache::restore(&saved, 64, Policy::default(), NOW + 2).unwrap();
    assert_eq!(s.open(&frame, &mut restored), Err(Error::Replayed));
    // A different message from the same controller still goes through.
    assert_eq!(s.open(&s.command("controller-2048", 4), &mut restored).unwrap(), "set-interval");
}

/// Encrypt-then-sign's classic weakness: controller B (also trusted) strips
/// A's signature, puts its own key id in, and re-signs, to pass A's command
/// off as its own (and get the receipt). The sender id is in the AEAD's
/// associated data, so the signature verifies but decryption fails.
#[test]
fn a_second_trusted_controller_cannot_re_sign_anothers_command() {
    let s = Sealed::new();
    let frame = s.command("controller-3072", 5);
    let mut stolen = frame.clone();
    // Sender key id: bytes 2..34. Swap in controller-2048's, re-sign as it.
    stolen[2..34].copy_from_slice(&s.keys.public("controller-2048").id().0);
    // The 3072-bit signature is 384 bytes; cut it and sign with the 2048-bit key.
    let signed_len = stolen.len() - 384 - 2;
    let mut with_2048_sig_slot = stolen[..signed_len].to_vec();
    with_2048_sig_slot.extend([0x80, 0x02]);
    with_2048_sig_slot.extend([0u8; 256]);
    let forged = resign(&with_2048_sig_slot, "controller-2048");
    let mut cache = ReplayCache::new(64, Policy::default());
    assert_eq!(s.open(&forged, &mut cache), Err(Error::DecryptFailed));
    assert_eq!(s.open(&frame, &mut cache).unwrap(), "set-interval", "the original is untouched");
}

/// An envelope for one device, re-addressed to another that trusts the same
/// controller, is refused: the header is signed.
#[test]
fn re_addressing_to_another_device_is_refused() {
    let s = Sealed::new();
    let other = SealedDevice::new("dev-2", s.keys.private("device-2048"), &s.ring, Policy::default()).unwrap();
    let frame = s.command("controller-2048", 6);
    let mut cache = ReplayCache::new(64, Policy::default());
    let dev2_cmd = topic("dev-2", Channel::Command).unwrap();
    assert_eq!(
        other.open_command(&mut VectorRng::new(b"b"), &frame, &dev2_cmd, NOW, &mut cache).unwrap_err(),
        Error::WrongDevice
    );
}

struct Chal {
    keys: Keys,
}

impl Chal {
    fn device(&self) -> ChallengeDevice<'_> {
        ChallengeDevice::new(DEV, self.keys.hmac("dev-chal"), Policy::default()).unwrap()
    }
    fn controller(&self) -> ChallengeController<'_> {
        ChallengeController::new(DEV, self.keys.hmac("dev-chal")).unwrap()
    }
    fn table(challenge: &[u8; 16]) -> ChallengeTable<4> {
        let mut table = ChallengeTable::new(30_000);
        table.issue(&mut Script::new(challenge), 0);
        table
    }
    fn verify(&self, frame: &[u8], challenge: &[u8; 16]) -> Result<String, Error> {
        let mut table = Chal::table(challenge);
        let clock = Clock { monotonic_ms: 1, unix_secs: Some(NOW + 1) };
        self.device()
            .verify_command(frame, &t(Channel::Command), clock, &mut table, REGISTRY)
            .map(|v| v.call.name.into())
    }
    fn command(&self, challenge: &[u8; 16], call: &Call<'_>, form: Form) -> Vec<u8> {
        let cmd = t(Channel::Command);
        enc(|b| self.controller().command(&header(&cmd, 7), challenge, call, form, b))
    }
}

/// Every byte of both command forms, set to every other value, is refused.
#[test]
fn every_single_byte_change_of_a_challenge_command_is_refused() {
    let c = Chal { keys: Keys::load() };
    let challenge = [0x42; 16];
    for (form, call) in [
        (Form::Explicit, Call::new("set-interval", &["30", "valve-3"]).unwrap()),
        (Form::Hidden, Call::new("reboot", &["now"]).unwrap()),
    ] {
        let frame = c.command(&challenge, &call, form);
        assert_eq!(c.verify(&frame, &challenge).unwrap(), call.name);
        for i in 0..frame.len() {
            for v in 0..=255u8 {
                if v == frame[i] {
                    continue;
                }
                let mut f = frame.clone();
                f[i] = v;
                assert!(c.verify(&f, &challenge).is_err(), "{form:?}: byte {i} = {v:#x} accepted");
            }
        }
    }
}

/// Every byte of both response forms, set to every other value, is refused
/// by the controller.
#[test]
fn every_single_byte_change_of_a_challenge_response_is_refused() {
    let c = Chal { keys: Keys::load() };
    let challenge = [0x43; 16];
    let candidates = [
        Outcome { status: Status::Ok, code: 0, output: b"on" },
        Outcome { status: Status::Ok, code: 0, output: b"off" },
    ];
    for (form, call) in
        [(Form::Explicit, Call::new("led-on", &[]).unwrap()), (Form::Hidden, Call::new("led-off", &[]).unwrap())]
    {
        let frame = c.command(&challenge, &call, form);
        let mut table = Chal::table(&challenge);
        let dev = c.device();
        let v = dev.verify_command(&frame, &t(Channel::Command), Clock::default(), &mut table, REGISTRY).unwrap();
        let resp = enc(|b| dev.respond(&v.reply_to(), form, &candidates[1], MsgId([8; 16]), None, b));
        let pending = Pending { challenge, msg_id: MsgId([7; 16]) };
        let ctl = c.controller();
        let read = |f: &[u8]| {
            ctl.read_response(f, &t(Channel::Response), &pending, &candidates).map(|a| match a {
                Answer::Explicit(o) => o.output.to_vec(),
                Answer::Hidden(i) => candidates[i].output.to_vec(),
            })
        };
        assert_eq!(read(&resp).unwrap(), b"off");
        for i in 0..resp.len() {
            for val in 0..=255u8 {
                if val == resp[i] {
                    continue;
                }
                let mut f = resp.clone();
                f[i] = val;
                assert!(read(&f).is_err(), "{form:?}: byte {i} = {val:#x} accepted");
            }
        }
    }
}

/// A challenge is single use, and a refused attempt does not use it up (so
/// junk published against it cannot cancel the genuine command).
#[test]
fn challenges_are_single_use_and_survive_junk() {
    let c = Chal { keys: Keys::load() };
    let challenge = [0x44; 16];
    let frame = c.command(&challenge, &Call::new("led-on", &[]).unwrap(), Form::Explicit);
    let mut table = Chal::table(&challenge);
    let dev = c.device();
    let cmd = t(Channel::Command);
    let mut junk = frame.clone();
    *junk.last_mut().unwrap() ^= 1;
    assert_eq!(dev.verify_command(&junk, &cmd, Clock::default(), &mut table, REGISTRY).unwrap_err(), Error::BadTag);
    assert!(dev.verify_command(&frame, &cmd, Clock::default(), &mut table, REGISTRY).is_ok());
    assert_eq!(
        dev.verify_command(&frame, &cmd, Clock::default(), &mut table, REGISTRY).unwrap_err(),
        Error::UnknownChallenge
    );
}

/// Turning an explicit command into a hidden one (dropping the command and
/// keeping the tag), or the reverse, fails: the form is inside the tag.
#[test]
fn forms_are_not_interchangeable() {
    let c = Chal { keys: Keys::load() };
    let challenge = [0x45; 16];
    let call = Call::new("led-on", &[]).unwrap();
    let explicit = c.command(&challenge, &call, Form::Explicit);
    let hidden = c.command(&challenge, &call, Form::Hidden);
    let call_len = common::postcard_of::call(&call).len();
    // explicit = … ‖ 0x01 ‖ call ‖ tag; hidden = … ‖ 0x00 ‖ tag.
    let body_end = explicit.len() - 32 - call_len - 1;
    let tag_of = |f: &[u8]| f[f.len() - 32..].to_vec();
    let explicit_as_hidden = [&explicit[..body_end], &[0], &tag_of(&explicit)].concat();
    let hidden_as_explicit =
        [&hidden[..body_end], &[1], &explicit[body_end + 1..explicit.len() - 32], &tag_of(&hidden)].concat();
    assert_eq!(c.verify(&explicit_as_hidden, &challenge), Err(Error::BadTag));
    assert_eq!(c.verify(&hidden_as_explicit, &challenge), Err(Error::BadTag));
    assert_eq!(c.verify(&explicit, &challenge).unwrap(), "led-on");
    assert_eq!(c.verify(&hidden, &challenge).unwrap(), "led-on");
}

/// One device's key cannot command another device, even with that device's
/// id in the header and one of its own outstanding challenges.
#[test]
fn another_devices_key_is_useless() {
    let keys = Keys::load();
    let challenge = [0x46; 16];
    let cmd = t(Channel::Command);
    let thief = ChallengeController::new(DEV, keys.hmac("dev-other")).unwrap();
    let frame =
        enc(|b| thief.command(&header(&cmd, 1), &challenge, &Call::new("led-on", &[]).unwrap(), Form::Hidden, b));
    let c = Chal { keys };
    assert_eq!(c.verify(&frame, &challenge), Err(Error::BadTag));
}
