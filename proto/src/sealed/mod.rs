//! Sealed mode: RSA hybrid encryption plus an RSA signature.
//!
//! This is the paper's design (seed 000) with its gaps closed. A command
//! envelope is built as:
//!
//! 1. a fresh 256-bit content key (CEK) is drawn;
//! 2. the CEK is wrapped for the device with RSA-OAEP (SHA-256, MGF1-SHA-256,
//!    label [`OAEP_LABEL`]);
//! 3. `version ‖ kind ‖ sender key id ‖ recipient key id ‖ header ‖
//!    wrapped key` is written: these bytes are the AEAD's associated data
//!    (a receipt has `in_reply_to` in place of the wrapped key, and is
//!    encrypted under the receipt key derived from the command's CEK);
//! 4. the command is encrypted with ChaCha20-Poly1305 under the CEK (a
//!    single-use key, so the nonce is all zeros) and appended;
//! 5. the sender signs [`SIGNATURE_LABEL`] ‖ everything so far with
//!    RSA-PSS (SHA-256, MGF1-SHA-256, 32-byte salt) and appends the signature.
//!
//! Responses (execution receipts, kind 7) go the other way with one
//! private-key operation instead of two: the device encrypts the outcome
//! under a **receipt key** derived from the command's CEK, which both ends
//! already hold —
//! `HKDF-SHA256(ikm = CEK, salt = none, info = RECEIPT_KEY_LABEL ‖ command msg_id)`
//! — with the receipt's own message id as the nonce, and signs the receipt
//! as before: the signature is the device's non-repudiable statement that
//! it ran the command. A round trip holds three private-key operations
//! (controller signs; device unwraps; device signs), not four. The first
//! form of receipts (kind 2, its key RSA-wrapped to the controller) is
//! refused with [`Error::RetiredKind`].
//!
//! Opening follows a fixed order: parse → header checks (device, topic,
//! recipient, times, replay lookup) → signer lookup → **signature check →
//! only then** CEK unwrap and decryption → decode → record as seen. No
//! private-key operation ever runs on unauthenticated input: the `rsa`
//! crate's decryption has a timing side channel (RUSTSEC-2023-0071, the
//! Marvin attack) that needs exactly such an oracle, and the order costs
//! nothing with the constant-time `backend::AwsLc` either. Decryption is
//! additionally blinded (with the caller's RNG, on the `rsa` crate).
//!
//! The RSA arithmetic itself is behind [`backend`]: the checks above are
//! written once, here, whichever library signs and unwraps.
//!
//! Why sign the ciphertext (encrypt-then-sign) rather than the plaintext:
//! the device can reject forgeries with one public-key operation before
//! touching its private key. The usual weakness of encrypt-then-sign — a
//! second trusted controller stripping the signature and re-signing as
//! itself — fails here because the sender's key id is in the associated
//! data, which only the holder of the CEK can re-encrypt under.

pub mod backend;
mod keys;
mod receipt;
mod replay;

use crate::Text;
use alloc::string::String;
use alloc::vec::Vec;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand_core::CryptoRng;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

pub use keys::{KeyId, Keyring, PrivateKey, PublicKey};
pub use receipt::{RECEIPT_KEY_LABEL, ReceiptKey};
pub use replay::ReplayCache;

use crate::topic::{Channel, topic};
use crate::wire::{self, Call, Decode, Encode, Kind, Outcome, Reader, Sink, Status, VERSION};
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
struct CommandPrefix<'a> {
    sender: KeyId,
    recipient: KeyId,
    header: Header<'a>,
    wrapped_key: &'a [u8],
}

impl<'a> Decode<'a> for CommandPrefix<'a> {
    fn read(r: &mut Reader<'a>) -> Self {
        CommandPrefix {
            sender: KeyId(r.array()),
            recipient: KeyId(r.array()),
            header: Header::read(r),
            wrapped_key: r.bytes(),
        }
    }
}

/// Everything of a sealed response before the ciphertext. Its key comes
/// from the command (see [`ReceiptKey`]), so nothing is wrapped.
struct ResponsePrefix<'a> {
    sender: KeyId,
    recipient: KeyId,
    header: Header<'a>,
    in_reply_to: MsgId,
}

impl Encode for CommandPrefix<'_> {
    fn write<S: Sink + ?Sized>(&self, s: &mut S) {
        s.put(&self.sender.0);
        s.put(&self.recipient.0);
        self.header.write(s);
        s.bytes(self.wrapped_key);
    }
}

impl Encode for ResponsePrefix<'_> {
    fn write<S: Sink + ?Sized>(&self, s: &mut S) {
        s.put(&self.sender.0);
        s.put(&self.recipient.0);
        self.header.write(s);
        s.put(&self.in_reply_to.0);
    }
}

impl<'a> Decode<'a> for ResponsePrefix<'a> {
    fn read(r: &mut Reader<'a>) -> Self {
        ResponsePrefix {
            sender: KeyId(r.array()),
            recipient: KeyId(r.array()),
            header: Header::read(r),
            in_reply_to: MsgId(r.array()),
        }
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

/// Checks the signature's length, which the signer's key fixes, then the
/// signature.
fn verify_signature<P>(view: &View<'_, P>, signer: &PublicKey) -> Result<()> {
    if view.signature.len() != signer.size() {
        return Err(Error::Malformed(Text(&"signature length differs from the signer's modulus")));
    }
    signer.ops().verify_pss_sha256(&signed_digest(view.signed), view.signature)
}

/// A command's signature, after the wrapped key's length, which the
/// recipient's key fixes (checking it costs nothing).
fn verify_command(view: &View<'_, CommandPrefix<'_>>, signer: &PublicKey, me: &PrivateKey) -> Result<()> {
    if view.prefix.wrapped_key.len() != me.public().size() {
        return Err(Error::Malformed(Text(&"wrapped key length differs from the recipient's modulus")));
    }
    verify_signature(view, signer)
}

/// Checks the signature, then (and only then) unwraps the CEK.
fn verify_then_unwrap<R: CryptoRng + ?Sized>(
    view: &View<'_, CommandPrefix<'_>>,
    signer: &PublicKey,
    me: &PrivateKey,
    mut rng: &mut R,
) -> Result<Zeroizing<[u8; CEK_LEN]>> {
    verify_command(view, signer, me)?;

    // Authenticated from here on.
    let cek = me.ops().decrypt_oaep_sha256(&mut rng, OAEP_LABEL, view.prefix.wrapped_key)?;
    let cek: [u8; CEK_LEN] = cek.as_slice().try_into().map_err(|_| Error::DecryptFailed)?;
    Ok(Zeroizing::new(cek))
}

/// Opens an envelope's ciphertext with `key` and `nonce`.
fn decrypt<P>(view: &View<'_, P>, key: &[u8; 32], nonce: &[u8; 12]) -> Result<Zeroizing<Vec<u8>>> {
    let aead = ChaCha20Poly1305::new(&Key::from(*key));
    let plaintext = aead
        .decrypt(&Nonce::from(*nonce), Payload { msg: view.ciphertext, aad: view.aad })
        .map_err(|_| Error::DecryptFailed)?;
    Ok(Zeroizing::new(plaintext))
}

/// A command's single-use CEK encrypts one message: its nonce is all zeros.
const COMMAND_NONCE: [u8; 12] = [0; 12];

/// The nonce of a receipt: the first 12 bytes of its own message id, so
/// that two receipts for one command (one key) never share a nonce.
fn receipt_nonce(msg_id: &MsgId) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce.iter_mut().zip(msg_id.0).for_each(|(n, m)| *n = m);
    nonce
}

/// Finishes a sealed envelope whose prefix (the associated data) is
/// `frame`: encrypts, then signs everything.
fn encrypt_and_sign<R: CryptoRng + ?Sized>(
    mut rng: &mut R,
    signer: &PrivateKey,
    frame: Vec<u8>,
    key: &[u8; 32],
    nonce: &[u8; 12],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let aead = ChaCha20Poly1305::new(&Key::from(*key));
    let ciphertext = aead
        .encrypt(&Nonce::from(*nonce), Payload { msg: plaintext, aad: &frame })
        .map_err(|_| Error::Crypto(Text(&"AEAD encryption failed")))?;
    let frame = wire::append(frame, &ciphertext.as_slice());
    let signature = signer.ops().sign_pss_sha256(&mut rng, &signed_digest(&frame))?;
    let frame = wire::append(frame, &signature.as_slice());
    wire::check_frame_len(frame.len())?;
    Ok(frame)
}

/// The first two bytes of every envelope, with room for the rest.
fn start_frame(kind: Kind, capacity: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(capacity);
    frame.extend_from_slice(&[VERSION, kind as u8]);
    frame
}

/// Encodes a value into memory that is wiped when dropped.
///
/// Sized first, so the vector never grows (a grown vector would leave an
/// unwiped copy in the memory it let go of).
fn encode_secret<T: Encode>(value: &T) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(wire::encoded_len(value)));
    value.write(&mut *out);
    out
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
/// (the receipt names that controller as its recipient), its message id,
/// its expiry, and the key the receipt is encrypted under.
///
/// Free of the command's content, so an agent can keep it on disk beside
/// the command's journal entry and still answer — after a crash in the
/// middle of running it — with a receipt saying so. The receipt key is a
/// secret (it reads that one receipt): keep it as the agent keeps its
/// state, 0600.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedReplyTo {
    /// Key id of the controller that signed the command.
    pub sender: KeyId,
    /// The command's message id: the receipt's `in_reply_to`.
    pub msg_id: MsgId,
    /// The command's expiry, repeated in the receipt's header.
    pub expires_at: u64,
    /// Derived from the command's content key.
    pub receipt_key: ReceiptKey,
}

/// A sealed command ready to publish, and the key its receipt will be
/// encrypted under: the controller keeps the key until the receipt comes.
#[derive(Debug)]
pub struct SealedCommand {
    /// The envelope.
    pub frame: Vec<u8>,
    /// For [`SealedController::open_response`].
    pub receipt_key: ReceiptKey,
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
    /// What its receipt is encrypted under.
    receipt_key: ReceiptKey,
}

impl OpenedCommand {
    /// What its receipt is bound to.
    #[must_use]
    pub fn reply_to(&self) -> SealedReplyTo {
        SealedReplyTo {
            sender: self.sender,
            msg_id: self.header.msg_id,
            expires_at: self.header.expires_at,
            receipt_key: self.receipt_key.clone(),
        }
    }
}

impl Drop for OpenedCommand {
    fn drop(&mut self) {
        self.name.zeroize();
        self.args.zeroize();
    }
}

/// What a receipt's signature proves without its key: who signed it, for
/// which controller, in answer to which command, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptFacts {
    /// Key id of the device that signed it.
    pub sender: KeyId,
    /// Key id of the controller it is addressed to.
    pub recipient: KeyId,
    /// The signed header (device, topic, message id, times).
    pub header: OwnedHeader,
    /// The command it answers.
    pub in_reply_to: MsgId,
}

/// Checks a stored receipt's signature and bindings again, long after its
/// command: that `device` (whose key is `device_key`) signed it, addressed
/// to the controller key `recipient`, on its response topic, in answer to
/// the command `in_reply_to`. The same checks, in the same order, as
/// [`SealedController::open_response`] makes before decrypting — it needs
/// neither the controller's private key nor the receipt key, so an auditor
/// holding only public keys can run it (`mqseal audit verify`).
///
/// The outcome inside stays encrypted: the signature binds the device to
/// the ciphertext, and only the holder of the receipt key can read it.
///
/// # Errors
/// As for [`SealedController::open_response`], except decryption.
pub fn verify_receipt(
    frame: &[u8],
    device: &str,
    device_key: &PublicKey,
    recipient: KeyId,
    in_reply_to: MsgId,
) -> Result<ReceiptFacts> {
    let arrived_on = topic(device, Channel::Response)?;
    let view = authenticate_receipt(frame, arrived_on.as_str(), device, device_key, recipient, in_reply_to)?;
    let p = &view.prefix;
    Ok(ReceiptFacts {
        sender: p.sender,
        recipient: p.recipient,
        header: OwnedHeader::from_header(&p.header),
        in_reply_to: p.in_reply_to,
    })
}

/// A receipt parsed and authenticated, in the fixed order: header, recipient,
/// signer, the command it answers, signature.
fn authenticate_receipt<'a>(
    frame: &'a [u8],
    arrived_on: &str,
    device: &str,
    device_key: &PublicKey,
    recipient: KeyId,
    in_reply_to: MsgId,
) -> Result<View<'a, ResponsePrefix<'a>>> {
    let view = parse::<ResponsePrefix<'_>>(frame, Kind::SealedResponse)?;
    let p = &view.prefix;
    p.header.check_response(device, arrived_on)?;
    if p.recipient != recipient {
        return Err(Error::WrongRecipient);
    }
    if p.sender != device_key.id() {
        return Err(Error::UnknownSigner);
    }
    if p.in_reply_to != in_reply_to {
        return Err(Error::UnexpectedReply);
    }
    verify_signature(&view, device_key)?;
    Ok(view)
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

        let cek = verify_then_unwrap(&view, signer, self.key, rng)?;
        let plaintext = decrypt(&view, &cek, &COMMAND_NONCE)?;
        let call: Call<'_> = wire::decode(&plaintext)?;
        call.validate()?;

        replay.record(p.sender, p.header.msg_id, p.header.expires_at, now);
        Ok(OpenedCommand {
            sender: p.sender,
            header: OwnedHeader::from_header(&p.header),
            name: call.name.into(),
            args: call.args.iter().map(String::from).collect(),
            receipt_key: ReceiptKey::derive(&cek, &p.header.msg_id),
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
    /// Returns the command's identity, as [`command_id`] does.
    ///
    /// # Errors
    /// As [`open_command`](Self::open_command), without the replay and
    /// decryption errors.
    pub fn authenticate_copy(&self, frame: &[u8], arrived_on: &str, now: u64) -> Result<(KeyId, MsgId)> {
        let view = parse::<CommandPrefix<'_>>(frame, Kind::SealedCommand)?;
        let p = &view.prefix;
        self.check_prefix(p, arrived_on, now)?;
        let signer = self.controllers.get(&p.sender).ok_or(Error::UnknownSigner)?;
        verify_command(&view, signer, self.key)?;
        Ok((p.sender, p.header.msg_id))
    }

    /// Steps 2 and 3 of opening (docs/PROTOCOL.md §5.3): header, recipient, times.
    fn check_prefix(&self, p: &CommandPrefix<'_>, arrived_on: &str, now: u64) -> Result<()> {
        p.header.check_received(self.id, arrived_on)?;
        if p.recipient != self.key.id() {
            return Err(Error::WrongRecipient);
        }
        self.policy.check_times(p.header.issued_at, p.header.expires_at, now)
    }

    /// Seals the receipt for `to`: encrypted under the receipt key the
    /// command's CEK gave (only that command's controller and this device
    /// hold it), signed by this device, naming `to`'s message id. `msg_id`
    /// must be freshly random: its first 12 bytes are the AEAD nonce, and
    /// every receipt to one command shares the key.
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
        // The receipt names its recipient, which must still be trusted.
        let controller = self.controllers.get(&to.sender).ok_or(Error::UnknownSigner)?;
        let resp_topic = topic(self.id, Channel::Response)?;
        let header =
            Header { device: self.id, topic: &resp_topic, msg_id, issued_at: now, expires_at: to.expires_at.max(now) };
        let plaintext = encode_secret(outcome);
        let prefix =
            ResponsePrefix { sender: self.key.id(), recipient: controller.id(), header, in_reply_to: to.msg_id };
        let frame =
            wire::append(start_frame(Kind::SealedResponse, 256 + plaintext.len() + self.key.public().size()), &prefix);
        encrypt_and_sign(rng, self.key, frame, to.receipt_key.as_key(), &receipt_nonce(&msg_id), &plaintext)
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
    /// (32 bytes) and the PSS salt (32 bytes), then blinding values — the
    /// last three only on a backend that takes the caller's RNG
    /// (`backend::RustCrypto`).
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::LimitExceeded`], [`Error::Crypto`].
    pub fn seal_command<R: CryptoRng + ?Sized>(
        &self,
        mut rng: &mut R,
        device_key: &PublicKey,
        header: &Header<'_>,
        call: &Call<'_>,
    ) -> Result<SealedCommand> {
        header.validate()?;
        call.validate()?;
        let plaintext = encode_secret(call);
        let mut cek = Zeroizing::new([0u8; CEK_LEN]);
        rng.fill_bytes(cek.as_mut());
        let wrapped_key = device_key.ops().encrypt_oaep_sha256(&mut rng, OAEP_LABEL, cek.as_ref())?;
        let prefix = CommandPrefix {
            sender: self.key.id(),
            recipient: device_key.id(),
            header: *header,
            wrapped_key: &wrapped_key,
        };
        let capacity = 256 + plaintext.len() + device_key.size() + self.key.public().size();
        let frame = wire::append(start_frame(Kind::SealedCommand, capacity), &prefix);
        let frame = encrypt_and_sign(rng, self.key, frame, &cek, &COMMAND_NONCE, &plaintext)?;
        Ok(SealedCommand { frame, receipt_key: ReceiptKey::derive(&cek, &header.msg_id) })
    }

    /// Opens the response of `device` (whose key is `device_key`) to the
    /// command `in_reply_to`, which arrived on `arrived_on`; `receipt_key`
    /// is what [`seal_command`](Self::seal_command) returned for that
    /// command. No private-key operation: the receipt's signature is
    /// checked with the device's public key, its content decrypted with
    /// the receipt key.
    ///
    /// # Errors
    /// [`Error::WrongDevice`], [`Error::WrongTopic`],
    /// [`Error::WrongRecipient`], [`Error::UnknownSigner`] (signed by another
    /// key than the device's), [`Error::UnexpectedReply`],
    /// [`Error::BadSignature`], [`Error::DecryptFailed`], decoding errors;
    /// [`Error::RetiredKind`] for a receipt in the first form (kind 2).
    pub fn open_response(
        &self,
        frame: &[u8],
        arrived_on: &str,
        device: &str,
        device_key: &PublicKey,
        in_reply_to: MsgId,
        receipt_key: &ReceiptKey,
    ) -> Result<OpenedResponse> {
        let view = authenticate_receipt(frame, arrived_on, device, device_key, self.key.id(), in_reply_to)?;
        let p = &view.prefix;
        let plaintext = decrypt(&view, receipt_key.as_key(), &receipt_nonce(&p.header.msg_id))?;
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
