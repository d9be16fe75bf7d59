//! The two RSA backends agree: same key ids, same key checks, and
//! envelopes sealed with one open with the other, in both directions.
//!
//! The vectors (tests/vectors.rs) hold both to the published bytes; this
//! file holds them to each other, on fresh envelopes and fresh keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{Keys, VectorRng};
use mqseal_proto::Text;
use mqseal_proto::sealed::backend::{self, AwsLc, Backend, RustCrypto};
use mqseal_proto::sealed::{Keyring, PrivateKey, PublicKey, ReplayCache, SealedController, SealedDevice};
use mqseal_proto::topic::{Channel, topic};
use mqseal_proto::{Call, Error, Header, MsgId, Outcome, Policy, Status};

const NOW: u64 = 1_790_000_000;
const DEV: &str = "dev-sealed";

/// One round trip: the controller's keys on `ctl`, the device's on `dev`.
fn round_trip(ctl: &'static dyn Backend, dev: &'static dyn Backend, bits: usize, msg: u8) {
    let (ck, dk) = (Keys::load_with(ctl), Keys::load_with(dev));
    let (controller, device) = (format!("controller-{bits}"), format!("device-{bits}"));
    let cmd = topic(DEV, Channel::Command).unwrap();
    let resp = topic(DEV, Channel::Response).unwrap();
    let header = Header { device: DEV, topic: &cmd, msg_id: MsgId([msg; 16]), issued_at: NOW, expires_at: NOW + 60 };
    let call = Call::new("set-interval", &["30"]).unwrap();
    let sealed = SealedController::new(ck.private(&controller))
        .seal_command(&mut VectorRng::new(&[msg]), ck.public(&device), &header, &call)
        .unwrap();

    let ring: Keyring = [dk.public(&controller).clone()].into_iter().collect();
    let d = SealedDevice::new(DEV, dk.private(&device), &ring, Policy::default()).unwrap();
    let mut cache = ReplayCache::new(8, Policy::default());
    let opened = d.open_command(&mut VectorRng::new(b"b"), &sealed.frame, &cmd, NOW + 1, &mut cache).unwrap();
    assert_eq!((opened.name.as_str(), opened.args.as_slice()), ("set-interval", &["30".to_owned()][..]));
    assert_eq!(opened.reply_to().receipt_key, sealed.receipt_key, "{}→{}: one receipt key", ctl.name(), dev.name());
    // And it is recorded: the same bytes again are a replay, on either backend.
    let again = d.open_command(&mut VectorRng::new(b"b"), &sealed.frame, &cmd, NOW + 1, &mut cache);
    assert_eq!(again.unwrap_err(), Error::Replayed);

    let outcome = Outcome { status: Status::Ok, code: 0, output: b"interval=30\n" };
    let receipt =
        d.seal_response(&mut VectorRng::new(b"r"), &opened, &outcome, MsgId([msg ^ 0xff; 16]), NOW + 1).unwrap();
    let r = SealedController::new(ck.private(&controller))
        .open_response(&receipt, &resp, DEV, ck.public(&device), MsgId([msg; 16]), &sealed.receipt_key)
        .unwrap();
    assert_eq!((r.status, r.code, r.output.as_slice()), (Status::Ok, 0, &b"interval=30\n"[..]));

    // A flipped signature bit is refused by the other side's backend too.
    let mut bad = receipt.clone();
    *bad.last_mut().unwrap() ^= 1;
    let err = SealedController::new(ck.private(&controller))
        .open_response(&bad, &resp, DEV, ck.public(&device), MsgId([msg; 16]), &sealed.receipt_key)
        .unwrap_err();
    assert_eq!(err, Error::BadSignature);
}

#[test]
fn envelopes_cross_between_backends_in_both_directions() {
    for (i, (ctl, dev)) in
        [(&AwsLc as &'static dyn Backend, &RustCrypto as &'static dyn Backend), (&RustCrypto, &AwsLc), (&AwsLc, &AwsLc)]
            .into_iter()
            .enumerate()
    {
        round_trip(ctl, dev, 2048, i as u8 + 1);
    }
    // The larger sizes once each way (the rsa crate is slow at 4096).
    round_trip(&AwsLc, &RustCrypto, 3072, 10);
    round_trip(&RustCrypto, &AwsLc, 4096, 11);
}

/// Key ids are SHA-256 of the SPKI each backend encodes afresh: equal for
/// every published test key, so a keyring means the same on both.
#[test]
fn both_backends_give_every_key_the_same_id_and_encoding() {
    let (a, r) = (Keys::load_with(&AwsLc), Keys::load_with(&RustCrypto));
    for name in ["controller-2048", "controller-3072", "controller-4096", "device-2048", "device-4096", "intruder-2048"]
    {
        assert_eq!(a.public(name).id(), r.public(name).id(), "{name}");
        assert_eq!(a.public(name).to_der(), r.public(name).to_der(), "{name}");
        assert_eq!(a.public(name).to_pem().unwrap(), r.public(name).to_pem().unwrap(), "{name}");
        assert_eq!(a.public(name).bits(), r.public(name).bits(), "{name}");
        assert_eq!(*a.private(name).to_pkcs8_pem().unwrap(), *r.private(name).to_pkcs8_pem().unwrap(), "{name}");
    }
}

/// A key made by either backend is read by the other, through PEM.
#[test]
fn generated_keys_are_read_by_the_other_backend() {
    for (maker, reader) in
        [(&AwsLc as &'static dyn Backend, &RustCrypto as &'static dyn Backend), (&RustCrypto, &AwsLc)]
    {
        let key = PrivateKey::generate_with(maker, &mut VectorRng::new(maker.name().as_bytes()), 2048).unwrap();
        assert_eq!(key.public().bits(), 2048);
        let pem = key.to_pkcs8_pem().unwrap();
        let back = PrivateKey::from_pkcs8_pem(&pem).unwrap().with_backend(reader).unwrap();
        assert_eq!(back.id(), key.id(), "{} → {}", maker.name(), reader.name());
        let public = PublicKey::from_pem(&key.public().to_pem().unwrap()).unwrap().with_backend(reader).unwrap();
        assert_eq!(public.id(), key.id());
    }
    // aws-lc makes the three standard sizes only, and says so.
    assert!(matches!(
        PrivateKey::generate_with(&AwsLc, &mut VectorRng::new(b"x"), 2560),
        Err(Error::InvalidKey(Text(&_)))
    ));
}

/// The range and exponent checks are proto's, so both backends refuse the
/// same keys with the same error (aws-lc's parser refuses the small key
/// first, in the same words).
#[test]
fn both_backends_refuse_the_same_keys() {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
    let mut rng = VectorRng::new(b"odd keys");
    let small = rsa::RsaPrivateKey::new(&mut rng, 1024).unwrap();
    let e3 = rsa::RsaPrivateKey::new_with_exp(&mut rng, 2048, rsa::BoxedUint::from(3u32)).unwrap();
    for b in backend::ALL {
        for (key, why) in [
            (&small, Text(&"RSA modulus must be 2048 to 4096 bits")),
            (&e3, Text(&"RSA public exponent must be 65537")),
        ] {
            let der = key.to_pkcs8_der().unwrap();
            let refused = PrivateKey::from_pkcs8_der_with(*b, der.as_bytes()).unwrap_err();
            assert_eq!(refused, Error::InvalidKey(why), "{}", b.name());
            let spki = key.to_public_key().to_public_key_der().unwrap();
            assert_eq!(
                PublicKey::from_der_with(*b, spki.as_bytes()).unwrap_err(),
                Error::InvalidKey(why),
                "{}",
                b.name()
            );
        }
        let junk = b"not a key";
        assert!(matches!(PublicKey::from_der_with(*b, junk), Err(Error::InvalidKey(Text(&_)))), "{}", b.name());
        assert!(matches!(PrivateKey::from_pkcs8_der_with(*b, junk), Err(Error::InvalidKey(Text(&_)))), "{}", b.name());
    }
    // A PEM of the wrong kind is refused before any backend sees it.
    let public_pem = Keys::load().public("device-2048").to_pem().unwrap();
    assert!(matches!(PrivateKey::from_pkcs8_pem(&public_pem), Err(Error::InvalidKey(Text(&_)))));
}

/// The default on std is the fast backend.
#[test]
fn the_default_backend_is_aws_lc() {
    assert_eq!(backend::DEFAULT.name(), AwsLc.name());
    assert_eq!(backend::ALL[0].name(), AwsLc.name());
}
