//! The agent core against real envelopes from `proto`'s controller side:
//! exactly-once across redelivery and restarts, replay-cache persistence,
//! and the reset path for a damaged state file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use mqseal_agent::agent::{Action, Agent, Now, Restore};
use mqseal_agent::config::{AgentConfig, Keys};
use mqseal_agent::exec::Ran;
use mqseal_agent::state::StateFile;
use mqseal_client::rng;
use mqseal_proto::challenge::HmacKey;
use mqseal_proto::sealed::{Keyring, PrivateKey, SealedCommand, SealedController};
use mqseal_proto::topic::{Channel, topic};
use mqseal_proto::{Call, Header, MsgId, Policy, Status};
use zeroize::Zeroizing;

struct World {
    controller: PrivateKey,
    device_pem: Zeroizing<String>,
    hmac: [u8; 32],
}

impl World {
    fn new() -> World {
        let controller = PrivateKey::generate(&mut rng(), 2048).unwrap();
        let device = PrivateKey::generate(&mut rng(), 2048).unwrap();
        World { controller, device_pem: device.to_pkcs8_pem().unwrap(), hmac: [7; 32] }
    }

    fn keys(&self) -> Keys {
        let controllers: Keyring = [self.controller.public().clone()].into_iter().collect();
        Keys {
            hmac: HmacKey::new(self.hmac),
            private: std::sync::Arc::new(PrivateKey::from_pkcs8_pem(&self.device_pem).unwrap()),
            controllers,
        }
    }

    fn agent(&self, state: &std::path::Path, restore: Restore, now: u64) -> Agent {
        Agent::new(
            "dev-1",
            self.keys(),
            Policy::default(),
            30_000,
            64,
            AgentConfig::default_commands().into_iter().collect::<BTreeMap<_, _>>(),
            Some(StateFile::open(state).unwrap()),
            restore,
            Now { unix: now, mono_ms: 0 },
        )
        .unwrap()
    }

    fn command(&self, now: u64) -> Vec<u8> {
        self.command_with_id(now, MsgId::random(&mut rng())).frame
    }

    fn command_with_id(&self, now: u64, msg_id: MsgId) -> SealedCommand {
        let device_key = PrivateKey::from_pkcs8_pem(&self.device_pem).unwrap();
        let t = topic("dev-1", Channel::Command).unwrap();
        let header = Header { device: "dev-1", topic: &t, msg_id, issued_at: now, expires_at: now + 60 };
        SealedController::new(&self.controller)
            .seal_command(&mut rng(), device_key.public(), &header, &Call::new("ping", &[]).unwrap())
            .unwrap()
    }
}

const CMD: &str = "mqseal/v1/dev/dev-1/cmd";
const T0: u64 = 1_800_000_000;

fn ok() -> Ran {
    Ran { status: Status::Ok, code: 0, output: Zeroizing::new(b"pong".to_vec()) }
}

#[test]
fn each_command_runs_once_across_redelivery_and_restart() {
    let w = World::new();
    let dir = tempfile::tempdir().unwrap();
    let now = Now { unix: T0, mono_ms: 0 };
    let frame = w.command(T0);

    let mut agent = w.agent(dir.path(), Restore::Load, T0);
    let Ok(Action::Execute(job)) = agent.handle(CMD, &frame, now, &mut rng()) else { panic!("not executed") };
    let (response, save_error) = agent.finish(job, &ok(), now, &mut rng()).unwrap();
    assert!(save_error.is_none());
    // QoS 1 redelivery: the stored response, byte for byte, and no execution.
    match agent.handle(CMD, &frame, now, &mut rng()) {
        Ok(Action::Resend(again)) => assert_eq!(again, response),
        other => panic!("redelivery: {other:?}"),
    }
    drop(agent);

    // Restart: still answered from the journal, not executed.
    let mut agent = w.agent(dir.path(), Restore::Load, T0 + 1);
    assert!(matches!(agent.handle(CMD, &frame, now, &mut rng()), Ok(Action::Resend(p)) if p == response));
    assert_eq!(agent.replay_len(), 1, "the replay cache came back from disk");

    // A tampered copy is rejected with a reason, and nothing is journaled.
    let mut t = frame.clone();
    let last = t.len() - 1;
    t[last] ^= 1;
    let err = agent.handle(CMD, &t, now, &mut rng()).unwrap_err();
    assert!(err.0.contains("signature") || err.0.contains("replay"), "{err}");
}

#[test]
fn a_damaged_state_file_stops_the_agent_and_reset_closes_the_window() {
    let w = World::new();
    let dir = tempfile::tempdir().unwrap();
    let frame = w.command(T0);
    {
        let mut agent = w.agent(dir.path(), Restore::Load, T0);
        assert!(matches!(agent.handle(CMD, &frame, Now { unix: T0, mono_ms: 0 }, &mut rng()), Ok(Action::Execute(_))));
    }
    std::fs::write(dir.path().join("state.bin"), b"\x01\xff\xff").unwrap();
    let err = Agent::new(
        "dev-1",
        w.keys(),
        Policy::default(),
        30_000,
        64,
        BTreeMap::new(),
        Some(StateFile::open(dir.path()).unwrap()),
        Restore::Load,
        Now { unix: T0, mono_ms: 0 },
    )
    .err()
    .expect("a damaged state file must not be ignored");
    assert!(err.to_string().contains("--reset-state"), "{err}");

    // --reset-state at R: the old command (and anything issued before the
    // reset, by a controller clock up to the 60 s skew ahead) is refused,
    // even though its record is gone — and so it stays, also after a restart.
    let reset = T0 + 1;
    let mut agent = w.agent(dir.path(), Restore::Reset, reset);
    let at = |t| Now { unix: t, mono_ms: 0 };
    let err = agent.handle(CMD, &frame, at(reset), &mut rng()).unwrap_err();
    assert!(err.0.contains("replay window"), "{err}");
    let ahead = w.command(reset + 59);
    assert!(agent.handle(CMD, &ahead, at(reset + 2), &mut rng()).is_err(), "issued within the skew: could predate it");
    // Issued once the skew has passed: accepted, whatever its lifetime (the
    // outside attack's D3: refused for ~11 minutes before).
    let fresh = w.command(reset + 60);
    assert!(matches!(agent.handle(CMD, &fresh, at(reset + 60), &mut rng()), Ok(Action::Execute(_))));
    drop(agent);
    let mut agent = w.agent(dir.path(), Restore::Load, reset + 61);
    let err = agent.handle(CMD, &w.command(reset + 30), at(reset + 61), &mut rng()).unwrap_err();
    assert!(err.0.contains("replay window"), "the reset floor was saved: {err}");
}

/// A controller may send copies of a challenge-mode command — the same
/// header and message id — over other challenges, when it cannot tell
/// whether its first challenge was genuine (docs/PROTOCOL.md §6.5). The
/// agent recognises the command by its identity, not its bytes: a copy is
/// answered with the stored receipt and never runs, a copy while it runs
/// gets nothing, and a copy that is not authentic is refused like any
/// forgery. A copy re-spelt with a non-shortest varint never decodes.
#[test]
fn copies_of_a_command_over_other_challenges_run_nothing() {
    use mqseal_proto::challenge::{ChallengeController, Form};
    let w = World::new();
    let dir = tempfile::tempdir().unwrap();
    let now = Now { unix: T0, mono_ms: 0 };
    let key = HmacKey::new(w.hmac);
    let chal = ChallengeController::new("dev-1", &key).unwrap();
    let mut agent = w.agent(dir.path(), Restore::Load, T0);
    let challenge = |agent: &mut Agent, n: u8| {
        let mut req = [0u8; 128];
        let len = chal.request(MsgId([n; 16]), &mut req).unwrap();
        let Ok(Action::Challenge(c)) = agent.handle("mqseal/v1/dev/dev-1/chal/req", &req[..len], now, &mut rng())
        else {
            panic!("no challenge")
        };
        chal.read_challenge(&c.payload, MsgId([n; 16])).unwrap().challenge
    };
    let t = topic("dev-1", Channel::Command).unwrap();
    let header = Header { device: "dev-1", topic: &t, msg_id: MsgId([9; 16]), issued_at: T0, expires_at: T0 + 60 };
    let over = |challenge: &[u8; 16], call: &Call<'_>| {
        let mut out = vec![0u8; 1024];
        let n = chal.command(&header, challenge, call, Form::Explicit, &mut out).unwrap();
        out.truncate(n);
        out
    };
    let ping = Call::new("ping", &[]).unwrap();
    let (a, b, c) = (challenge(&mut agent, 1), challenge(&mut agent, 2), challenge(&mut agent, 3));
    let Ok(Action::Execute(job)) = agent.handle(CMD, &over(&a, &ping), now, &mut rng()) else { panic!("not run") };
    let err = agent.handle(CMD, &over(&b, &ping), now, &mut rng()).unwrap_err();
    assert!(err.0.contains("still running"), "a copy while it runs: {err}");
    let (receipt, _) = agent.finish(job, &ok(), now, &mut rng()).unwrap();
    match agent.handle(CMD, &over(&b, &ping), now, &mut rng()) {
        Ok(Action::Resend(again)) => assert_eq!(again, receipt, "the copy gets the stored receipt"),
        other => panic!("copy over another challenge: {other:?}"),
    }
    // The same message id with other content, tagged with the wrong key:
    // refused, not answered.
    let other_key = HmacKey::new([8; 32]);
    let mut forged = vec![0u8; 1024];
    let n = ChallengeController::new("dev-1", &other_key)
        .unwrap()
        .command(&header, &c, &Call::new("echo", &["x"]).unwrap(), Form::Explicit, &mut forged)
        .unwrap();
    let err = agent.handle(CMD, &forged[..n], now, &mut rng()).unwrap_err();
    assert!(err.0.contains("tag"), "{err}");
    // And a genuine copy survives a restart (the journal is on disk).
    drop(agent);
    let mut agent = w.agent(dir.path(), Restore::Load, T0 + 1);
    assert!(matches!(agent.handle(CMD, &over(&c, &ping), now, &mut rng()), Ok(Action::Resend(r)) if r == receipt));
    // A re-spelt copy: expires_at (5 bytes) with a redundant `80 … 00` tail.
    let mut long = over(&c, &ping);
    let at = 2 + 1 + "dev-1".len() + 1 + t.len() + 16 + 5 + 4;
    long[at] |= 0x80;
    long.insert(at + 1, 0);
    let err = agent.handle(CMD, &long, now, &mut rng()).unwrap_err();
    assert!(err.0.contains("shortest"), "{err}");
}

/// `kill -9` in the middle of a command: after the restart the agent
/// answers it with an authenticated `failed` saying so — in the command's
/// own mode and form, verified here by `proto`'s controller side — and a
/// redelivery of the command gets that same receipt, never an execution.
#[test]
fn a_command_interrupted_by_a_crash_is_answered_after_the_restart_not_rerun() {
    use mqseal_proto::challenge::{Answer, ChallengeController, Form, Pending};
    let w = World::new();
    let dir = tempfile::tempdir().unwrap();
    let now = Now { unix: T0, mono_ms: 0 };
    let SealedCommand { frame: sealed, receipt_key } = w.command_with_id(T0, MsgId([5; 16]));
    let controller = SealedController::new(&w.controller);

    // A challenge-mode command in hidden form too.
    let key = HmacKey::new(w.hmac);
    let chal = ChallengeController::new("dev-1", &key).unwrap();
    let mut req = [0u8; 128];
    let n = chal.request(MsgId([1; 16]), &mut req).unwrap();
    let mut agent = w.agent(dir.path(), Restore::Load, T0);
    let Ok(Action::Challenge(offer)) = agent.handle("mqseal/v1/dev/dev-1/chal/req", &req[..n], now, &mut rng()) else {
        panic!("no challenge")
    };
    let offer = chal.read_challenge(&offer.payload, MsgId([1; 16])).unwrap();
    let t = topic("dev-1", Channel::Command).unwrap();
    let header = Header { device: "dev-1", topic: &t, msg_id: MsgId([2; 16]), issued_at: T0, expires_at: T0 + 60 };
    let mut hidden = vec![0u8; 1024];
    let n =
        chal.command(&header, &offer.challenge, &Call::new("ping", &[]).unwrap(), Form::Hidden, &mut hidden).unwrap();
    hidden.truncate(n);

    // Both accepted and journaled; the process dies before either finishes.
    assert!(matches!(agent.handle(CMD, &sealed, now, &mut rng()), Ok(Action::Execute(_))));
    assert!(matches!(agent.handle(CMD, &hidden, now, &mut rng()), Ok(Action::Execute(_))));
    drop(agent);

    let later = Now { unix: T0 + 5, mono_ms: 0 };
    let mut agent = w.agent(dir.path(), Restore::Load, T0 + 5);
    let receipts: Vec<_> = agent.interrupted(later, &mut rng()).into_iter().map(Result::unwrap).collect();
    assert_eq!(receipts.len(), 2);
    let resp = topic("dev-1", Channel::Response).unwrap();
    let mut seen = (false, false);
    for r in &receipts {
        assert_eq!(r.topic, resp.as_str());
        let device_key = PrivateKey::from_pkcs8_pem(&w.device_pem).unwrap();
        if let Ok(opened) =
            controller.open_response(&r.payload, &resp, "dev-1", device_key.public(), MsgId([5; 16]), &receipt_key)
        {
            assert_eq!(opened.status, Status::Failed);
            assert!(String::from_utf8_lossy(&opened.output).contains("not run again"));
            seen.0 = true;
        }
        let pending = Pending { challenge: offer.challenge, msg_id: MsgId([2; 16]) };
        let failed = [mqseal_proto::Outcome { status: Status::Failed, code: 0, output: &[] }];
        if let Ok(Answer::Hidden(0)) = chal.read_response(&r.payload, &resp, &pending, &failed) {
            seen.1 = true;
        }
    }
    assert_eq!(seen, (true, true), "a sealed and a hidden-form receipt, each verifying");
    // Redeliveries get those receipts; nothing runs; nothing is answered twice.
    for frame in [&sealed, &hidden] {
        match agent.handle(CMD, frame, later, &mut rng()) {
            Ok(Action::Resend(again)) => assert!(receipts.contains(&again)),
            other => panic!("redelivery after the crash: {other:?}"),
        }
    }
    assert!(agent.interrupted(later, &mut rng()).is_empty(), "answered once");
    drop(agent);
    let mut agent = w.agent(dir.path(), Restore::Load, T0 + 6);
    assert!(agent.interrupted(later, &mut rng()).is_empty(), "the receipts were saved");
}
