//! Challenge mode, both ends, on arbitrary bytes: the device verifying a
//! command (both forms, with and without a real-time clock) and answering a
//! challenge request, the controller reading a challenge and a response
//! (both forms), and the microcontroller agent handling the bytes on its
//! command and challenge-request topics.
//!
//! Oracle beyond "no panic": the device holds exactly the challenges of the
//! published vectors, so the only commands that can verify are those
//! vectors' — anything accepted with other content is a forgery, and a
//! crash. (Other *encodings* of the same content may verify: fields are
//! authenticated by value, PROTOCOL.md §3.2.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqseal_fuzz::{CHALLENGE, KEYS, Script, hex, vector};
use mqseal_mcu_agent::{Agent, Done};
use mqseal_proto::challenge::{
    Answer, ChallengeController, ChallengeDevice, ChallengeTable, Clock, HmacKey, Pending, Registered,
};
use mqseal_proto::{Call, MsgId, Outcome, Policy, Status};

const CMD: &str = "mqseal/v1/dev/dev-chal/cmd";
const RESP: &str = "mqseal/v1/dev/dev-chal/resp";
const REQ: &str = "mqseal/v1/dev/dev-chal/chal/req";
static REGISTERED: [Registered<'static>; 4] = [
    Registered { name: "led-on", args: &[] },
    Registered { name: "led-off", args: &[] },
    Registered { name: "reboot", args: &[] },
    Registered { name: "set-interval", args: &["60"] },
];

fn array16(v: &serde_json::Value) -> [u8; 16] {
    hex(v).try_into().unwrap_or([0; 16])
}

fuzz_target!(|data: &[u8]| {
    let Ok(key) = HmacKey::from_slice(&hex(&KEYS["hmac"]["dev-chal"])) else { return };
    let explicit = vector(&CHALLENGE, "explicit-command");
    let hidden = vector(&CHALLENGE, "hidden-command");
    let genuine: Vec<([u8; 16], [u8; 16], Call<'static>)> = vec![
        (
            array16(&explicit["challenge"]),
            array16(&explicit["header"]["msg_id"]),
            Call::new("set-interval", &["30", "valve-3"]).unwrap(),
        ),
        (array16(&hidden["challenge"]), array16(&hidden["header"]["msg_id"]), Call::new("reboot", &[]).unwrap()),
    ];
    let policy = Policy::default();
    let Ok(device) = ChallengeDevice::new("dev-chal", &key, policy) else { return };
    for unix_secs in [None, Some(1_790_000_010)] {
        let mut table: ChallengeTable<4> = ChallengeTable::new(30_000);
        for (challenge, _, _) in &genuine {
            table.issue(&mut Script(challenge), 0);
        }
        let clock = Clock { monotonic_ms: 10, unix_secs };
        if let Ok(v) = device.verify_command(data, CMD, clock, &mut table, &REGISTERED) {
            let known =
                genuine.iter().any(|(c, id, call)| *c == v.challenge && *id == v.header.msg_id.0 && *call == v.call);
            assert!(known && v.header.device == "dev-chal" && v.header.topic == CMD, "forged command accepted: {v:?}");
        }
        let mut out = [0u8; 512];
        let _ = device.answer_request(data, &mut table, &mut Script(&[7; 16]), 20, &mut out);
    }

    let Ok(controller) = ChallengeController::new("dev-chal", &key) else { return };
    let _ = controller.read_challenge(data, MsgId(array16(&vector(&CHALLENGE, "challenge")["request_msg_id"])));
    let candidates = [Status::Ok, Status::Failed].map(|status| Outcome { status, code: 0, output: b"off" });
    for (name, output) in [("explicit-response", &b"interval=30\n"[..]), ("hidden-response", &b"off"[..])] {
        let v = vector(&CHALLENGE, name);
        let pending = Pending { challenge: array16(&v["challenge"]), msg_id: MsgId(array16(&v["in_reply_to"])) };
        match controller.read_response(data, RESP, &pending, &candidates) {
            Ok(Answer::Explicit(o)) => assert!(o.status == Status::Ok && o.output == output, "forged response: {o:?}"),
            Ok(Answer::Hidden(i)) => assert_eq!(i, 0, "hidden response matched a candidate it does not carry"),
            Err(_) => {}
        }
    }

    // The no_std agent on the same bytes: no challenge of its own is
    // outstanding, so nothing may run.
    if let Ok(mut agent) = Agent::<'_, 4>::new("dev-chal", &key, policy, 30_000, &REGISTERED) {
        let mut ran = false;
        let mut handler = |_: &Call<'_>, _: &mut [u8]| {
            ran = true;
            Done::ok(0)
        };
        let mut out = [0u8; mqseal_mcu_agent::ENVELOPE_LEN];
        for topic in [REQ, CMD] {
            let clock = Clock { monotonic_ms: 1, unix_secs: None };
            let _ = agent.handle(topic, data, clock, &mut Script(&[9; 16]), &mut handler, &mut out);
        }
        assert!(!ran, "the microcontroller agent ran a command over a challenge it never issued");
    }
});
