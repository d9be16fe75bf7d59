//! Criterion benchmarks of the envelope core.
//!
//! `cargo bench -p mqseal-proto --bench envelopes`; results and the
//! OpenSSL reference measured in the same sitting are in docs/BENCHMARKS.md.
//!
//! Each sealed benchmark runs on every RSA backend built in
//! (`{backend}` = `aws-lc`, `rustcrypto`):
//!
//! * `sealed/{backend}/seal/{bits}` — a controller sealing a command (CEK,
//!   OAEP wrap, AEAD, PSS signature).
//! * `sealed/{backend}/open/{bits}` — a device opening it: every check,
//!   signature verification, OAEP unwrap (blinded), AEAD, decode, replay
//!   record, receipt-key derivation. The issue's target compares this with
//!   OpenSSL's private-key operation.
//! * `sealed/{backend}/receipt-seal/{bits}` — the device's receipt: HKDF'd
//!   key, AEAD, PSS signature.
//! * `sealed/{backend}/receipt-open/{bits}` — the controller checking it:
//!   signature verification and AEAD, no private-key operation.
//! * `challenge/tag` — a controller building an explicit challenge command.
//! * `challenge/verify` — a device verifying one (decode, header, table
//!   lookup, one HMAC, consume). Target: under 2 µs.
//! * `challenge/hidden/{16,256}` — hidden-form search over that many
//!   registered commands (every candidate is always tried).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

// The fixtures of the integration tests: the published test keys and the
// vector RNG (SHA-256 in counter mode), so benches and tests share one copy.
#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use common::{Keys, Script, VectorRng};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use mqseal_proto::challenge::{ChallengeController, ChallengeDevice, ChallengeTable, Clock, Form, HmacKey, Registered};
use mqseal_proto::sealed::backend::{self, Backend};
use mqseal_proto::sealed::{Keyring, ReplayCache, SealedController, SealedDevice};
use mqseal_proto::topic::{Channel, topic};
use mqseal_proto::{Call, Header, MsgId, Outcome, Policy, Status};

const NOW: u64 = 1_800_000_000;
const DEV: &str = "bench-dev";

fn sealed(c: &mut Criterion) {
    for b in backend::ALL {
        sealed_on(c, *b);
    }
}

/// `sealed/{backend}/…`: sealing and opening a command, and the receipt's
/// two ends, on one RSA backend.
fn sealed_on(c: &mut Criterion, backend: &'static dyn Backend) {
    let cmd_topic = topic(DEV, Channel::Command).unwrap();
    let resp_topic = topic(DEV, Channel::Response).unwrap();
    let call = Call::new("set-interval", &["30", "valve-3"]).unwrap();
    let keys = Keys::load_with(backend);
    let mut g = c.benchmark_group(format!("sealed/{}", backend.name()));
    g.sample_size(30);
    for bits in [2048, 3072, 4096] {
        let ring: Keyring = [keys.public(&format!("controller-{bits}")).clone()].into_iter().collect();
        let sealer = SealedController::new(keys.private(&format!("controller-{bits}")));
        let device_pub = keys.public(&format!("device-{bits}"));
        let opener = SealedDevice::new(DEV, keys.private(&format!("device-{bits}")), &ring, Policy::default()).unwrap();
        let mut rng = VectorRng::new(b"seal");
        let mut n = 0u128;
        let mut next = |rng: &mut VectorRng| {
            n += 1;
            let hd = Header {
                device: DEV,
                topic: &cmd_topic,
                msg_id: MsgId(n.to_le_bytes()),
                issued_at: NOW,
                expires_at: NOW + 60,
            };
            sealer.seal_command(rng, device_pub, &hd, &call).unwrap()
        };
        g.bench_function(format!("seal/{bits}"), |b| b.iter(|| black_box(next(&mut rng))));
        let mut open_rng = VectorRng::new(b"open");
        g.bench_function(format!("open/{bits}"), |b| {
            b.iter_batched(
                || (next(&mut rng).frame, ReplayCache::new(4, Policy::default())),
                |(frame, mut cache)| {
                    black_box(opener.open_command(&mut open_rng, &frame, &cmd_topic, NOW + 1, &mut cache).unwrap())
                },
                BatchSize::SmallInput,
            )
        });
        // The receipt: one signature on the device, one verification on
        // the controller (no unwrap on either side any more).
        let sealed = next(&mut rng);
        let mut cache = ReplayCache::new(4, Policy::default());
        let opened = opener.open_command(&mut open_rng, &sealed.frame, &cmd_topic, NOW + 1, &mut cache).unwrap();
        let outcome = Outcome { status: Status::Ok, code: 0, output: b"interval=30\n" };
        let receipt =
            |rng: &mut VectorRng| opener.seal_response(rng, &opened, &outcome, MsgId([9; 16]), NOW + 1).unwrap();
        g.bench_function(format!("receipt-seal/{bits}"), |b| b.iter(|| black_box(receipt(&mut rng))));
        let frame = receipt(&mut rng);
        let device_pub = keys.public(&format!("device-{bits}"));
        g.bench_function(format!("receipt-open/{bits}"), |b| {
            b.iter(|| {
                black_box(
                    sealer
                        .open_response(&frame, &resp_topic, DEV, device_pub, opened.header.msg_id, &sealed.receipt_key)
                        .unwrap(),
                )
            })
        });
    }
    g.finish();
}

fn challenge(c: &mut Criterion) {
    let key = HmacKey::new([7; 32]);
    let cmd_topic = topic(DEV, Channel::Command).unwrap();
    let hd = Header { device: DEV, topic: &cmd_topic, msg_id: MsgId([1; 16]), issued_at: NOW, expires_at: NOW + 60 };
    let ctl = ChallengeController::new(DEV, &key).unwrap();
    let dev = ChallengeDevice::new(DEV, &key, Policy::default()).unwrap();
    let call = Call::new("set-interval", &["30", "valve-3"]).unwrap();
    let challenge = [0x5a; 16];
    let mut g = c.benchmark_group("challenge");

    let mut buf = [0u8; 512];
    g.bench_function("tag", |b| b.iter(|| black_box(ctl.command(&hd, &challenge, &call, Form::Explicit, &mut buf))));

    let n = ctl.command(&hd, &challenge, &call, Form::Explicit, &mut buf).unwrap();
    let explicit = buf[..n].to_vec();
    let table_with_challenge = || {
        let mut t = ChallengeTable::<8>::new(30_000);
        // Fill the table as a busy device's would be, then issue ours.
        let mut rng = VectorRng::new(b"fill");
        for _ in 0..7 {
            t.issue(&mut rng, 0);
        }
        t.issue(&mut Script::new(&challenge), 0);
        t
    };
    let clock = Clock { monotonic_ms: 1, unix_secs: Some(NOW) };
    g.bench_function("verify", |b| {
        b.iter_batched(
            table_with_challenge,
            |mut t| black_box(dev.verify_command(&explicit, &cmd_topic, clock, &mut t, &[]).unwrap().call.name.len()),
            BatchSize::SmallInput,
        )
    });

    for count in [16usize, 256] {
        let names: Vec<String> = (0..count).map(|i| format!("command-{i}")).collect();
        let registry: Vec<Registered<'_>> = names.iter().map(|n| Registered { name: n, args: &[] }).collect();
        let target = Call::new(&names[count / 2], &[]).unwrap();
        let n = ctl.command(&hd, &challenge, &target, Form::Hidden, &mut buf).unwrap();
        let hidden = buf[..n].to_vec();
        g.bench_function(format!("hidden/{count}"), |b| {
            b.iter_batched(
                table_with_challenge,
                |mut t| {
                    black_box(dev.verify_command(&hidden, &cmd_topic, clock, &mut t, &registry).unwrap().registered)
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, sealed, challenge);
criterion_main!(benches);
