//! Criterion benchmarks of the envelope core.
//!
//! `cargo bench -p mqseal-proto --bench envelopes`; results and the
//! OpenSSL reference measured in the same sitting are in docs/BENCHMARKS.md.
//!
//! * `sealed/seal/{bits}` — a controller sealing a command (CEK, OAEP wrap,
//!   AEAD, PSS signature).
//! * `sealed/open/{bits}` — a device opening it: every check, signature
//!   verification, blinded OAEP unwrap, AEAD, decode, replay record. The
//!   issue's target compares this with OpenSSL's private-key operation.
//! * `challenge/tag` — a controller building an explicit challenge command.
//! * `challenge/verify` — a device verifying one (decode, header, table
//!   lookup, one HMAC, consume). Target: under 2 µs.
//! * `challenge/hidden/{16,256}` — hidden-form search over that many
//!   registered commands (every candidate is always tried).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use mqseal_proto::challenge::{ChallengeController, ChallengeDevice, ChallengeTable, Clock, Form, HmacKey, Registered};
use mqseal_proto::sealed::{Keyring, PrivateKey, PublicKey, ReplayCache, SealedController, SealedDevice};
use mqseal_proto::topic::{Channel, topic};
use mqseal_proto::{Call, Header, MsgId, Policy};

const NOW: u64 = 1_800_000_000;
const DEV: &str = "bench-dev";

/// A fast, seedable RNG for benchmarks (ChaCha-free: SHA-256 in counter mode,
/// as the test vectors use). Its cost is part of what is measured, as a real
/// RNG's would be.
struct Rng {
    counter: u64,
}
impl rand_core::TryRng for Rng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        use sha2::Digest;
        for chunk in dst.chunks_mut(32) {
            self.counter += 1;
            let block = sha2::Sha256::digest(self.counter.to_le_bytes());
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
        Ok(())
    }
}
impl rand_core::TryCryptoRng for Rng {}

fn test_key(name: &str) -> (PrivateKey, PublicKey) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/keys.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let private = PrivateKey::from_pkcs8_pem(v["rsa"][name]["private_pkcs8_pem"].as_str().unwrap()).unwrap();
    let public = private.public().clone();
    (private, public)
}

fn sealed(c: &mut Criterion) {
    let cmd_topic = topic(DEV, Channel::Command).unwrap();
    let call = Call::new("set-interval", &["30", "valve-3"]).unwrap();
    let mut g = c.benchmark_group("sealed");
    g.sample_size(30);
    for bits in [2048, 3072, 4096] {
        let (controller, controller_pub) = test_key(&format!("controller-{bits}"));
        let (device, device_pub) = test_key(&format!("device-{bits}"));
        let ring: Keyring = [controller_pub].into_iter().collect();
        let sealer = SealedController::new(&controller);
        let opener = SealedDevice::new(DEV, &device, &ring, Policy::default()).unwrap();
        let mut rng = Rng { counter: 0 };
        let mut n = 0u128;
        let mut next = |rng: &mut Rng| {
            n += 1;
            let hd = Header {
                device: DEV,
                topic: &cmd_topic,
                msg_id: MsgId(n.to_le_bytes()),
                issued_at: NOW,
                expires_at: NOW + 60,
            };
            sealer.seal_command(rng, &device_pub, &hd, &call).unwrap()
        };
        g.bench_function(format!("seal/{bits}"), |b| b.iter(|| black_box(next(&mut rng))));
        let mut open_rng = Rng { counter: 1 << 40 };
        g.bench_function(format!("open/{bits}"), |b| {
            b.iter_batched(
                || (next(&mut rng), ReplayCache::new(4, Policy::default())),
                |(frame, mut cache)| {
                    black_box(opener.open_command(&mut open_rng, &frame, &cmd_topic, NOW + 1, &mut cache).unwrap())
                },
                BatchSize::SmallInput,
            )
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
        let mut rng = Rng { counter: 0 };
        for _ in 0..7 {
            t.issue(&mut rng, 0);
        }
        t.issue(&mut FixedRng(challenge), 0);
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

/// Yields one fixed challenge: places a known challenge in the table.
struct FixedRng([u8; 16]);
impl rand_core::TryRng for FixedRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(0)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(0)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        dst.copy_from_slice(&self.0[..dst.len()]);
        Ok(())
    }
}
impl rand_core::TryCryptoRng for FixedRng {}

criterion_group!(benches, sealed, challenge);
criterion_main!(benches);
