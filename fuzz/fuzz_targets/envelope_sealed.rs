//! Sealed mode, both ends, on arbitrary bytes: the device opening a
//! command (parse, header, times, replay cache, signer, signature, and only
//! then decryption) and the controller opening a receipt, with the
//! published 2048-bit test keys on the default (aws-lc) backend.
//!
//! Oracle beyond "no panic": only the vectors' own command and receipt are
//! signed by these keys, so anything opened with other content is a
//! forgery, and a crash.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use mqseal_fuzz::{Counter, KEYS, SEALED, hex, vector};
use mqseal_proto::sealed::{Keyring, PrivateKey, ReceiptKey, ReplayCache, SealedController, SealedDevice};
use mqseal_proto::{MsgId, Policy};

const CMD: &str = "mqseal/v1/dev/dev-sealed/cmd";
const RESP: &str = "mqseal/v1/dev/dev-sealed/resp";
const NOW: u64 = 1_790_000_005;

struct Keys {
    device: PrivateKey,
    controller: PrivateKey,
    trusted: Keyring,
}

static K: LazyLock<Option<Keys>> = LazyLock::new(|| {
    let pem = |name: &str| KEYS["rsa"][name]["private_pkcs8_pem"].as_str().map(str::to_owned);
    let device = PrivateKey::from_pkcs8_pem(&pem("device-2048")?).ok()?;
    let controller = PrivateKey::from_pkcs8_pem(&pem("controller-2048")?).ok()?;
    let trusted = [controller.public().clone()].into_iter().collect();
    Some(Keys { device, controller, trusted })
});

fuzz_target!(|data: &[u8]| {
    let Some(k) = K.as_ref() else { return };
    let command = vector(&SEALED, "command-2048");
    let response = vector(&SEALED, "response-2048");
    let policy = Policy::default();
    let Ok(device) = SealedDevice::new("dev-sealed", &k.device, &k.trusted, policy) else { return };
    let mut replay = ReplayCache::new(8, policy);
    if let Ok(opened) = device.open_command(&mut Counter(1), data, CMD, NOW, &mut replay) {
        let genuine = opened.header.msg_id.0.to_vec() == hex(&command["header"]["msg_id"])
            && opened.name == "set-interval"
            && opened.args == ["30", "valve-3"]
            && opened.sender == k.controller.id();
        assert!(genuine, "forged sealed command opened: {opened:?}");
        assert!(device.open_command(&mut Counter(2), data, CMD, NOW, &mut replay).is_err(), "replay accepted");
    }
    let in_reply_to = MsgId(hex(&response["in_reply_to"]).try_into().unwrap_or([0; 16]));
    let receipt_key = ReceiptKey::from_bytes(hex(&response["receipt_key"]).try_into().unwrap_or([0; 32]));
    let controller = SealedController::new(&k.controller);
    if let Ok(r) = controller.open_response(data, RESP, "dev-sealed", k.device.public(), in_reply_to, &receipt_key) {
        assert!(r.output == b"interval=30\n" && r.sender == k.device.id(), "forged receipt opened: {r:?}");
    }
});
