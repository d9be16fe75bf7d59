//! Footprint image (b): the whole challenge-mode agent — `net::serve`
//! with minimq, the verification core, the time driver and the executor —
//! with its buffers, no semihosting and panic-halt. The transport is the
//! scripted stream of the QEMU image, standing in for a network stack's TCP
//! socket (whose size depends on the board and is not counted here).
#![no_std]
#![no_main]

use core::hint::black_box;

use cortex_m_rt::entry;
use mqseal_mcu_agent::net::{self, Device};
use mqseal_mcu_agent::{Agent, Call, Clock, Done, HmacKey, Policy, Registered, envelope_len};
use mqseal_mcu_firmware::trng::RegisterRng;
use mqseal_mcu_firmware::{ScriptIo, block_on};
use mqseal_proto::topic::Channel;
use panic_halt as _;

/// The device id, known when the firmware is built (it comes with the
/// device's bundle): the envelope buffer is sized for it.
const ID: &str = "valve-3";

static HIDDEN: [Registered<'static>; 2] =
    [Registered { name: "open", args: &["25"] }, Registered { name: "close", args: &[] }];

#[entry]
fn main() -> ! {
    let key = HmacKey::new(black_box([0x5a; 32]));
    let id: &str = black_box(ID);
    let Ok(mut agent) = Agent::<'_, 4>::new(id, &key, Policy::default(), 30_000, &HIDDEN) else {
        mqseal_mcu_firmware::halt()
    };
    let Ok(status) = agent.topic(Channel::Status) else { mqseal_mcu_firmware::halt() };
    let (mut rx, mut tx, mut out) = ([0u8; net::RX_LEN], [0u8; net::TX_LEN], [0u8; envelope_len(ID.len())]);
    let Ok(mut session) = net::session(&mut rx, &mut tx, id, black_box(b"password"), &status, 60) else {
        mqseal_mcu_firmware::halt()
    };
    let mut rng = RegisterRng;
    let mut ran = 0u32;
    let mut handler = |call: &Call<'_>, _: &mut [u8]| {
        ran += call.args.len() as u32 + 1;
        Done::ok(0)
    };
    let mut device = Device {
        rng: &mut rng,
        commands: &mut handler,
        clock: || Clock { monotonic_ms: black_box(0), unix_secs: None },
        log: |e| {
            black_box(e);
        },
    };
    let mut sent = [0u8; 64];
    loop {
        let io = ScriptIo::new(black_box(&[]), &mut sent);
        let ended = block_on(net::serve(&mut session, io, &mut agent, &mut device, &mut out));
        black_box(&ended);
    }
}
