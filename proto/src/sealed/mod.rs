//! Sealed mode: RSA hybrid encryption plus an RSA signature.
//!
//! This is the paper's design (seed 000) with its gaps closed. A command
//! envelope is built as:
//!
//! 1. a fresh 256-bit content key (CEK) is drawn;
//! 2. the CEK is wrapped for the device with RSA-OAEP (SHA-256, MGF1-SHA-256,
//!    label [`OAEP_LABEL`]);
//! 3. `version ‖ kind ‖ sender key id ‖ recipient key id ‖ header ‖
//!    [in_reply_to] ‖ wrapped key` is written: these bytes are the AEAD's
//!    associated data;
//! 4. the command is encrypted with ChaCha20-Poly1305 under the CEK (a
//!    single-use key, so the nonce is all zeros) and appended;
//! 5. the sender signs [`SIGNATURE_LABEL`] ‖ everything so far with
//!    RSA-PSS (SHA-256, MGF1-SHA-256, 32-byte salt) and appends the signature.
//!
//! Responses (execution receipts) are built the same way in the other
//! direction — encrypted to the controller, signed by the device — and name
//! the command they answer.
//!
//! Opening follows a fixed order: parse → header checks (device, topic,
//! recipient, times, replay lookup) → signer lookup → **signature check →
//! only then** CEK unwrap and decryption → decode → record as seen. No
//! private-key operation ever runs on unauthenticated input: the `rsa`
//! crate's decryption has a timing side channel (RUSTSEC-2023-0071, the
//! Marvin attack) that needs exactly such an oracle. Decryption is
//! additionally blinded with the caller's RNG.
//!
//! Why sign the ciphertext (encrypt-then-sign) rather than the plaintext:
//! the device can reject forgeries with one public-key operation before
//! touching its private key. The usual weakness of encrypt-then-sign — a
//! second trusted controller stripping the signature and re-signing as
//! itself — fails here because the sender's key id is in the associated
//! data, which only the holder of the CEK can re-encrypt under.

mod keys;
mod replay;

use alloc::string::String;
use alloc::vec::Vec;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand_core::CryptoRng;
use rsa::Oaep;
use rsa::signature::SignatureEncoding;
use rsa::signature::hazmat::{PrehashVerifier, RandomizedPrehashSigner};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

pub use keys::{KeyId, Keyring, PrivateKey, PublicKey};
pub use replay::ReplayCache;

use crate::topic::{Channel, topic};
use crate::wire::{self, Call, Decode, Kind, Outcome, Reader, Status, VERSION};
use crate::{Error, Header, MsgId, Policy, Result, validate_id};

/// OAEP label under which content keys are wrapped.
pub const OAEP_LABEL: &[u8] = b"mqseal/v1 content-key";

/// Prefix of the message every sealed-mode signature covers. It keeps an
/// mqseal signature from ever being valid in another protocol that uses the
/// same key, and vice versa.
pub const SIGNATURE_LABEL: &[u8] = b"mqseal/v1 sealed-envelope\0";

/// Content key length (ChaCha20-Poly1305).
const CEK_LEN: usize = 32;

/// Everything of a sealed command before the ciphertext: the AEAD's
/// associated data.
#[derive(Serialize)]
struct CommandPrefix<'a> {
    sender: KeyId,
    recipient: KeyId,
    header: Header<'a>,
    wrapped_key: &'a [u8],
}

impl<'a> Decode<'a> for CommandPrefix<'a> {
    fn read(r: &mut Reader<'a>) -> Result<Self> {
        Ok(CommandPrefix {
            sender: KeyId(r.array()?),
            recipient: KeyId(r.array()?),
            header: Header::read(r)?,
            wrapped_key: r.bytes()?,
        })
    }
}

/// Everything of a sealed response before the ciphertext.
#[derive(Serialize)]
struct ResponsePrefix<'a> {
    sender: KeyId,
    recipient: KeyId,
    header: Header<'a>,
    in_reply_to: MsgId,
    wrapped_key: &'a [u8],
}

impl<'a> Decode<'a> for ResponsePrefix<'a> {
    fn read(r: &mut Reader<'a>) -> Result<Self> {
        Ok(ResponsePrefix {
            sender: KeyId(r.array()?),
            recipient: KeyId(r.array()?),
            header: Header::read(r)?,
            in_reply_to: MsgId(r.array()?),
            wrapped_key: r.bytes()?,
        })
    }
}

/// A parsed (not yet verified) sealed envelope.
struct View<'a, P> {
    prefix: P,
    /// Bytes from the start of the frame to the ciphertext field.
    aad: &'a [u8],
    /// Bytes from the start of the frame to the signature field.
    signed: &'a [u8],
    ciphertext: &'a [u8],
    signature: &'a [u8],
}

fn parse<'a, P: Decode<'a>>(frame: &'a [u8], kind: Kind) -> Result<View<'a, P>> {
    let (prefix, rest) = wire::take::<P>(wire::body(frame, kind)?)?;
    let aad = frame.get(..frame.len() - rest.len()).ok_or(Error::Truncated)?;
    let (ciphertext, rest) = wire::take::<&[u8]>(rest)?;
    let signed = frame.get(..frame.len() - rest.len()).ok_or(Error::Truncated)?;
    let (signature, rest) = wire::take::<&[u8]>(rest)?;
    wire::end(rest)?;
    Ok(View { prefix, aad, signed, ciphertext, signature })
}

/// The signer's key id and the message id of a sealed command, read
/// without checking anything else: what identifies the command whatever
/// its bytes, for an agent's duplicate detection. Never a reason to act on
/// the envelope.
///
/// # Errors
/// Framing and decoding errors.
pub fn command_id(frame: &[u8]) -> Result<(KeyId, MsgId)> {
    let view = parse::<CommandPrefix<'_>>(frame, Kind::SealedCommand)?;
    Ok((view.prefix.sender, view.prefix.header.msg_id))
}

/// SHA-256 of what a signature covers.
fn signed_digest(signed: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(SIGNATURE_LABEL);
    h.update(signed);
    h.finalize().into()
}

/// Checks the lengths the keys fix, then the signature.
fn verify_signature<P>(view: &View<'_, P>, wrapped_key: &[u8], signer: &PublicKey, me: &PrivateKey) -> Result<()> {
    // Lengths first: both are fixed by the keys, and checking them costs nothing.
    if view.signature.len() != signer.size() {
        return Err(Error::Malformed("signature length differs from the signer's modulus"));
    }
    if wrapped_key.len() != me.public().size() {
        return Err(Error::Malformed("wrapped key length differs from the recipient's modulus"));
    }
    let signature = rsa::pss::Signature::try_from(view.signature).map_err(|_| Error::BadSignature)?;
    signer.verifying().verify_prehash(&signed_digest(view.signed), &signature).map_err(|_| Error::BadSignature)
}

/// Checks the signature, then (and only then) unwraps the CEK and decrypts.
fn verify_then_decrypt<P, R: CryptoRng + ?Sized>(
    view: &View<'_, P>,
    wrapped_key: &[u8],
    signer: &PublicKey,
    me: &PrivateKey,
    rng: &mut R,
) -> Result<Zeroizing<Vec<u8>>> {
    verify_signature(view, wrapped_key, signer, me)?;

    // Authenticated from here on.
    let cek = Zeroizing::new(
        me.rsa()
            .decrypt_blinded(rng, Oaep::<Sha256>::new_with_label(OAEP_LABEL), wrapped_key)
            .map_err(|_| Error::DecryptFailed)?,
    );
    let cek: &[u8; CEK_LEN] = cek.as_slice().try_into().map_err(|_| Error::DecryptFailed)?;
    let aead = ChaCha20Poly1305::new(&Key::from(*cek));
    let plaintext = aead
        .decrypt(&Nonce::default(), Payload { msg: view.ciphertext, aad: view.aad })
        .map_err(|_| Error::DecryptFailed)?;
    Ok(Zeroizing::new(plaintext))
}

/// Builds a sealed envelope. `write_prefix(wrapped_key, frame)` appends the
/// kind's prefix, which becomes the associated data.
fn seal<R, F>(
    rng: &mut R,
    kind: Kind,
    signer: &PrivateKey,
    recipient: &PublicKey,
    write_prefix: F,
    plaintext: &[u8],
) -> Result<Vec<u8>>
where
    R: CryptoRng + ?Sized,
    F: FnOnce(&[u8], Vec<u8>) -> Result<Vec<u8>>,
{
    let mut cek = Zeroizing::new([0u8; CEK_LEN]);
    rng.fill_bytes(cek.as_mut());
    let wrapped = recipient
        .rsa()
        .encrypt(rng, Oaep::<Sha256>::new_with_label(OAEP_LABEL), cek.as_ref())
        .map_err(|_| Error::Crypto("RSA-OAEP encryption failed"))?;

    let mut frame = Vec::with_capacity(256 + plaintext.len() + 2 * recipient.size().max(signer.public().size()));
    frame.extend_from_slice(&[VERSION, kind as u8]);
    let mut frame = write_prefix(&wrapped, frame)?;

    let aead = ChaCha20Poly1305::new(&Key::from(*cek));
    let ciphertext = aead
        .encrypt(&Nonce::default(), Payload { msg: plaintext, aad: &frame })
        .map_err(|_| Error::Crypto("AEAD encryption failed"))?;
    frame = wire::append(frame, &ciphertext.as_slice())?;

    let signature = signer
        .signing()
        .sign_prehash_with_rng(rng, &signed_digest(&frame))
        .map_err(|_| Error::Crypto("RSA-PSS signing failed"))?;
    frame = wire::append(frame, &&*signature.to_bytes())?;
    wire::check_frame_len(frame.len())?;
    Ok(frame)
}

/// Encodes a value into memory that is wiped when dropped.
fn encode_secret<T: Serialize>(value: &T) -> Result<Zeroizing<Vec<u8>>> {
    Ok(Zeroizing::new(postcard::to_allocvec(value)?))
}

/// A header whose strings are owned, for verified envelopes that outlive
/// the frame they came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedHeader {
    /// See [`Header::device`].
    pub device: String,
    /// See [`Header::topic`].
    pub topic: String,
    /// See [`Header::msg_id`].
    pub msg_id: MsgId,
    /// See [`Header::issued_at`].
    pub issued_at: u64,
    /// See [`Header::expires_at`].
    pub expires_at: u64,
}

impl OwnedHeader {
    fn from_header(h: &Header<'_>) -> Self {
        OwnedHeader {
            device: h.device.into(),
            topic: h.topic.into(),
            msg_id: h.msg_id,
            issued_at: h.issued_at,
            expires_at: h.expires_at,
        }
    }
}

/// The parts of an opened command its receipt is bound to: who signed it
/// (the receipt is encrypted to that controller), its message id and its
/// expiry.
///
/// Small, `Copy` and free of the command's content, so an agent can keep it
/// on disk beside the command's journal entry and still answer — after a
/// crash in the middle of running it — with a receipt saying so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedReplyTo {
    /// Key id of the controller that signed the command.
    pub sender: KeyId,
    /// The command's message id: the receipt's `in_reply_to`.
    pub msg_id: MsgId,
    /// The command's expiry, repeated in the receipt's header.
    pub expires_at: u64,
}

/// A command that passed every check and has been recorded as seen.
///
/// Its name and arguments are wiped from memory when it is dropped: commands
/// may carry secrets (a Wi-Fi passphrase, a token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedCommand {
    /// Key id of the controller that signed it.
    pub sender: KeyId,
    /// The authenticated header.
    pub header: OwnedHeader,
    /// Command name.
    pub name: String,
    /// Arguments.
    pub args: Vec<String>,
}

impl OpenedCommand {
    /// What its receipt is bound to.
    #[must_use]
    pub fn reply_to(&self) -> SealedReplyTo {
        SealedReplyTo { sender: self.sender, msg_id: self.header.msg_id, expires_at: self.header.expires_at }
    }
}

impl Drop for OpenedCommand {
    fn drop(&mut self) {
        self.name.zeroize();
        self.args.zeroize();
    }
}

/// A verified response: the device's signed execution receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedResponse {
    /// Key id of the device that signed it.
    pub sender: KeyId,
    /// The authenticated header.
    pub header: OwnedHeader,
    /// The command it answers.
    pub in_reply_to: MsgId,
    /// How the command ended.
    pub status: Status,
    /// Exit code, or 0.
    pub code: i32,
    /// Captured output.
    pub output: Vec<u8>,
}

impl Drop for OpenedResponse {
    fn drop(&mut self) {
        self.output.zeroize();
    }
}

/// A device in sealed mode: its id, its private key, the controllers it
/// trusts, and its time policy.
#[derive(Debug, Clone, Copy)]
pub struct SealedDevice<'a> {
    id: &'a str,
    key: &'a PrivateKey,
    controllers: &'a Keyring,
    policy: Policy,
}

impl<'a> SealedDevice<'a> {
    /// A device named `id`.
    ///
    /// # Errors
    /// [`Error::InvalidId`].
    pub fn new(id: &'a str, key: &'a PrivateKey, controllers: &'a Keyring, policy: Policy) -> Result<Self> {
        validate_id(id)?;
        Ok(SealedDevice { id, key, controllers, policy })
    }

    /// Opens a command that arrived on `arrived_on` at `now` (seconds since
    /// the Unix epoch), in the fixed order described in the module docs, and
    /// records it in `replay`.
    ///
    /// # Errors
    /// Every rejection reason has its own [`Error`] variant.
    pub fn open_command<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        frame: &[u8],
        arrived_on: &str,
        now: u64,
        replay: &mut ReplayCache,
    ) -> Result<OpenedCommand> {
        let view = parse::<CommandPrefix<'_>>(frame, Kind::SealedCommand)?;
        let p = &view.prefix;
        self.check_prefix(p, arrived_on, now)?;
        replay.check(&p.sender, &p.header.msg_id, p.header.issued_at, p.header.expires_at)?;
        let signer = self.controllers.get(&p.sender).ok_or(Error::UnknownSigner)?;

        let plaintext = verify_then_decrypt(&view, p.wrapped_key, signer, self.key, rng)?;
        let call: Call<'_> = wire::decode(&plaintext)?;
        call.validate()?;

        replay.record(p.sender, p.header.msg_id, p.header.expires_at, now);
        Ok(OpenedCommand {
            sender: p.sender,
            header: OwnedHeader::from_header(&p.header),
            name: call.name.into(),
            args: call.args.iter().map(String::from).collect(),
        })
    }

    /// Checks that `frame` is a genuine command of a trusted controller —
    /// every check of [`open_command`](Self::open_command) up to and
    /// including the signature, but neither the replay cache (the command
    /// may have been accepted already) nor decryption.
    ///
    /// For an agent that has already accepted a command with this sender
    /// and message id and must tell an authentic copy from a tampered one
    /// before it re-sends the stored receipt. A copy is never a reason to
    /// execute anything.
    ///
    /// # Errors
    /// As [`open_command`](Self::open_command), without the replay and
    /// decryption errors.
    pub fn authenticate_copy(&self, frame: &[u8], arrived_on: &str, now: u64) -> Result<SealedReplyTo> {
        let view = parse::<CommandPrefix<'_>>(frame, Kind::SealedCommand)?;
        let p = &view.prefix;
        self.check_prefix(p, arrived_on, now)?;
        let signer = self.controllers.get(&p.sender).ok_or(Error::UnknownSigner)?;
        verify_signature(&view, p.wrapped_key, signer, self.key)?;
        Ok(SealedReplyTo { sender: p.sender, msg_id: p.header.msg_id, expires_at: p.header.expires_at })
    }

    /// Steps 2 and 3 of opening (docs/PROTOCOL.md §5.3): header, recipient, times.
    fn check_prefix(&self, p: &CommandPrefix<'_>, arrived_on: &str, now: u64) -> Result<()> {
        p.header.check_received(self.id, arrived_on)?;
        if p.recipient != self.key.id() {
            return Err(Error::WrongRecipient);
        }
        self.policy.check_times(p.header.issued_at, p.header.expires_at, now)
    }

    /// Seals the receipt for `to`: encrypted to the controller that signed
    /// the command, signed by this device, naming `to`'s message id.
    ///
    /// # Errors
    /// [`Error::UnknownSigner`] if that controller has since been removed
    /// from the keyring; [`Error::LimitExceeded`] for oversized output.
    pub fn seal_response<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        to: &OpenedCommand,
        outcome: &Outcome<'_>,
        msg_id: MsgId,
        now: u64,
    ) -> Result<Vec<u8>> {
        self.seal_response_to(rng, &to.reply_to(), outcome, msg_id, now)
    }

    /// [`seal_response`](Self::seal_response) for a command known only by
    /// its [`SealedReplyTo`] (kept since the command was opened).
    ///
    /// # Errors
    /// As [`seal_response`](Self::seal_response).
    pub fn seal_response_to<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        to: &SealedReplyTo,
        outcome: &Outcome<'_>,
        msg_id: MsgId,
        now: u64,
    ) -> Result<Vec<u8>> {
        outcome.validate()?;
        let controller = self.controllers.get(&to.sender).ok_or(Error::UnknownSigner)?;
        let resp_topic = topic(self.id, Channel::Response)?;
        let header =
            Header { device: self.id, topic: &resp_topic, msg_id, issued_at: now, expires_at: to.expires_at.max(now) };
        let plaintext = encode_secret(outcome)?;
        let (sender, recipient) = (self.key.id(), controller.id());
        seal(
            rng,
            Kind::SealedResponse,
            self.key,
            controller,
            |wrapped_key, frame| {
                let in_reply_to = to.msg_id;
                wire::append(frame, &ResponsePrefix { sender, recipient, header, in_reply_to, wrapped_key })
            },
            &plaintext,
        )
    }
}

/// A controller in sealed mode: its signing key.
#[derive(Debug, Clone, Copy)]
pub struct SealedController<'a> {
    key: &'a PrivateKey,
}

impl<'a> SealedController<'a> {
    /// A controller signing with `key`.
    #[must_use]
    pub fn new(key: &'a PrivateKey) -> Self {
        SealedController { key }
    }

    /// Seals `call` for the device whose key is `device_key`.
    ///
    /// The header is the caller's: it chooses the message id and validity
    /// window; its topic should be
    /// [`topic(device, Channel::Command)`](crate::topic::topic). The RNG
    /// supplies, in this order, the content key (32 bytes), the OAEP seed
    /// (32 bytes) and the PSS salt (32 bytes), then blinding values.
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::LimitExceeded`], [`Error::Crypto`].
    pub fn seal_command<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        device_key: &PublicKey,
        header: &Header<'_>,
        call: &Call<'_>,
    ) -> Result<Vec<u8>> {
        header.validate()?;
        call.validate()?;
        let plaintext = encode_secret(call)?;
        let (sender, recipient) = (self.key.id(), device_key.id());
        seal(
            rng,
            Kind::SealedCommand,
            self.key,
            device_key,
            |wrapped_key, frame| {
                wire::append(frame, &CommandPrefix { sender, recipient, header: *header, wrapped_key })
            },
            &plaintext,
        )
    }

    /// Opens the response of `device` (whose key is `device_key`) to the
    /// command `in_reply_to`, which arrived on `arrived_on`.
    ///
    /// # Errors
    /// [`Error::WrongDevice`], [`Error::WrongTopic`],
    /// [`Error::WrongRecipient`], [`Error::UnknownSigner`] (signed by another
    /// key than the device's), [`Error::UnexpectedReply`],
    /// [`Error::BadSignature`], [`Error::DecryptFailed`], decoding errors.
    pub fn open_response<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        frame: &[u8],
        arrived_on: &str,
        device: &str,
        device_key: &PublicKey,
        in_reply_to: MsgId,
    ) -> Result<OpenedResponse> {
        let view = parse::<ResponsePrefix<'_>>(frame, Kind::SealedResponse)?;
        let p = &view.prefix;
        p.header.check_response(device, arrived_on)?;
        if p.recipient != self.key.id() {
            return Err(Error::WrongRecipient);
        }
        if p.sender != device_key.id() {
            return Err(Error::UnknownSigner);
        }
        if p.in_reply_to != in_reply_to {
            return Err(Error::UnexpectedReply);
        }
        let plaintext = verify_then_decrypt(&view, p.wrapped_key, device_key, self.key, rng)?;
        let outcome: Outcome<'_> = wire::decode(&plaintext)?;
        outcome.validate()?;
        Ok(OpenedResponse {
            sender: p.sender,
            header: OwnedHeader::from_header(&p.header),
            in_reply_to: p.in_reply_to,
            status: outcome.status,
            code: outcome.code,
            output: outcome.output.into(),
        })
    }
}
