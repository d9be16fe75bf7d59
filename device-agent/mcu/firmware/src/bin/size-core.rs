//! Footprint image (a): the verification core alone — `Agent::handle`
//! answering challenge requests, verifying commands in both forms and
//! tagging responses — with no MQTT client, no semihosting and panic-halt,
//! as a product build would link it. Inputs come through `black_box` so the
//! optimiser cannot fold them away; the result goes to a sink.
#![no_std]
#![no_main]

use core::hint::black_box;

use cortex_m_rt::entry;
use mqseal_mcu_agent::{Agent, Call, Clock, Done, HmacKey, Policy, Registered, envelope_len};
use mqseal_mcu_firmware::trng::RegisterRng;
use panic_halt as _;

/// The device id, known when the firmware is built (it comes with the
/// device's bundle): the envelope buffer is sized for it.
const ID: &str = "valve-3";

static HIDDEN: [Registered<'static>; 2] =
    [Registered { name: "open", args: &["25"] }, Registered { name: "close", args: &[] }];

#[entry]
fn main() -> ! {
    let key = HmacKey::new(black_box([0x5a; 32]));
    let Ok(mut agent) = Agent::<'_, 4>::new(black_box(ID), &key, Policy::default(), 30_000, &HIDDEN) else {
        mqseal_mcu_firmware::halt()
    };
    let mut rng = RegisterRng;
    let mut out = [0u8; envelope_len(ID.len())];
    let mut ran = 0u32;
    let mut handler = |call: &Call<'_>, _: &mut [u8]| {
        ran += call.args.len() as u32 + 1;
        Done::ok(0)
    };
    loop {
        let frame: &[u8] = black_box(&[]);
        let topic: &str = black_box("");
        let clock = Clock { monotonic_ms: black_box(0), unix_secs: black_box(None) };
        let reply = agent.handle(topic, frame, clock, &mut rng, &mut handler, &mut out);
        let _ = black_box((reply.map(|r| r.bytes(&out).len()), &out));
    }
}
