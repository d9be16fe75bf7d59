//! The audit log: who sent which command to which device, and the device's
//! authenticated answer itself, kept so that it can be checked again.
//!
//! Every `send`, `broadcast` and `job` appends one [`Record`] per target
//! (storage: `mqseal_store::AuditLog`, a 0600 JSON Lines file in the
//! controller's `data_dir`, or a collection next to the users when the
//! store is MongoDB). A record holds the response frame byte for byte, so
//! [`verify`] can re-run the checks the controller ran when it arrived:
//!
//! * **sealed mode**: the receipt's RSA-PSS signature, with the device's
//!   public key from the registry, and what it binds — device, response
//!   topic, the controller key it is addressed to, the command's message
//!   id ([`mqseal_proto::sealed::verify_receipt`], the same code that opened
//!   it). Only public keys are needed: anyone holding the registry's public
//!   keys can audit. The outcome inside stays encrypted under the receipt
//!   key, which is not kept; the record's `status` and `code` are the
//!   controller's reading of it.
//! * **challenge mode**: the response's HMAC tag over the challenge it was
//!   tagged over, with the device's key, and that the outcome it
//!   authenticates is the one recorded ([`ChallengeController::read_response`],
//!   again the same code). A tag proves the answer to the holder of the
//!   key, not to a third party: the controller could compute it too.
//!
//! SECURITY.md ("The audit log") says what a verified record proves and
//! what it does not.

use mqseal_proto::challenge::{Answer, ChallengeController, Pending};
use mqseal_proto::sealed::{KeyId, verify_receipt};
use mqseal_proto::topic::{Channel, topic};
use mqseal_proto::{MsgId, Status};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::exchange::{DeviceResult, Mode, Request, hidden_candidates, status_name};
use crate::registry::{DeviceKeys, Registry};
use crate::session::Finished;

/// How a target ended, as the log spells it (and `--json` output does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The device answered `ok`.
    Ok,
    /// The device answered with another status.
    Failed,
    /// No authenticated answer in time.
    TimedOut,
    /// Could not be sent (not granted, bad keys).
    Error,
}

/// One command to one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When the record was written (Unix ms).
    pub at: u64,
    /// Which CLI command sent it: `send`, `broadcast` or `job`.
    pub via: String,
    /// The broker user the controller logged in as.
    pub operator: String,
    /// The controller's key id (hex): what sealed commands were signed
    /// with, and what sealed receipts are addressed to.
    pub controller_key: String,
    /// The target.
    pub device: String,
    /// The device's public key id (hex) when the command was sent; a
    /// later rotation gives the registry another key, and the record can
    /// no longer be checked.
    pub device_key: String,
    /// Command name.
    pub command: String,
    /// SHA-256 (hex) of the arguments, each as a 4-byte big-endian length
    /// and its UTF-8 bytes: the record shows which arguments were sent
    /// without keeping them.
    pub args_sha256: String,
    /// Envelope mode.
    pub mode: Mode,
    /// Challenge mode's hidden form.
    pub hidden: bool,
    /// The command's message id (hex), if one was built.
    pub msg_id: Option<String>,
    /// When the command was sent (Unix ms).
    pub sent_at: u64,
    /// When its answer verified (Unix ms).
    pub answered_at: Option<u64>,
    /// How it ended.
    pub outcome: Outcome,
    /// The device's status, if it answered.
    pub status: Option<String>,
    /// The device's exit code, if it answered.
    pub code: Option<i32>,
    /// Why it could not be sent.
    pub error: Option<String>,
    /// The device's answer (hex): the sealed receipt, or the tagged
    /// challenge-mode response, exactly as it arrived.
    pub response: Option<String>,
    /// Challenge mode: the challenge (hex) the response's tag covers.
    pub challenge: Option<String>,
}

/// What a batch of records has in common.
#[derive(Debug, Clone)]
pub struct Sending<'a> {
    /// `send`, `broadcast` or `job`.
    pub via: &'a str,
    /// The broker user.
    pub operator: &'a str,
    /// The controller's key id.
    pub controller_key: KeyId,
    /// What was sent.
    pub request: &'a Request,
    /// When (Unix ms).
    pub sent_at: u64,
}

/// SHA-256 of `args` in the record's encoding (see [`Record::args_sha256`]).
pub fn args_digest(args: &[String]) -> String {
    let mut h = Sha256::new();
    for a in args {
        h.update(u32::try_from(a.len()).unwrap_or(u32::MAX).to_be_bytes());
        h.update(a.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The record of one target's exchange, written at `now_ms`.
pub fn record(s: &Sending<'_>, device: &str, keys: &DeviceKeys, finished: &Finished, now_ms: u64) -> Record {
    let mut r = Record {
        at: now_ms,
        via: s.via.to_owned(),
        operator: s.operator.to_owned(),
        controller_key: hex::encode(s.controller_key.0),
        device: device.to_owned(),
        device_key: hex::encode(keys.public.id().0),
        command: s.request.name.clone(),
        args_sha256: args_digest(&s.request.args),
        mode: s.request.mode,
        hidden: s.request.hidden,
        msg_id: finished.msg_id.map(|m| hex::encode(m.0)),
        sent_at: s.sent_at,
        answered_at: None,
        outcome: Outcome::TimedOut,
        status: None,
        code: None,
        error: None,
        response: None,
        challenge: None,
    };
    match &finished.result {
        DeviceResult::Answered(reply) => {
            r.outcome = if reply.status == Status::Ok { Outcome::Ok } else { Outcome::Failed };
            r.status = Some(status_name(reply.status).to_owned());
            r.code = Some(reply.code);
            r.answered_at = Some(reply.evidence.at_ms);
            r.response = Some(hex::encode(&reply.evidence.frame));
            r.challenge = reply.evidence.challenge.map(hex::encode);
        }
        DeviceResult::TimedOut => {}
        DeviceResult::Error(e) => {
            r.outcome = Outcome::Error;
            r.error = Some(e.clone());
        }
    }
    r
}

/// What checking a record again found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The answer verifies: the receipt's signature (sealed) or the tag and
    /// the recorded outcome (challenge).
    Verified,
    /// No answer was recorded (timed out, or never sent): nothing to check.
    NoAnswer,
    /// Cannot be checked here: the device is gone from the registry or its
    /// keys were rotated since.
    Unverifiable(String),
    /// Does not verify: the record or its answer was changed, or was never
    /// genuine.
    Failed(String),
}

/// Checks `record` again with the keys in `registry`.
pub fn verify(record: &Record, registry: &Registry) -> Verdict {
    let Some(response) = &record.response else {
        let says_answered = matches!(record.outcome, Outcome::Ok | Outcome::Failed) && record.error.is_none();
        return if record.status.is_some() || says_answered {
            Verdict::Failed("an answer is recorded but not the response it came in".into())
        } else {
            Verdict::NoAnswer
        };
    };
    let keys = match registry.keys(&record.device) {
        Ok(k) => k,
        Err(_) => return Verdict::Unverifiable(format!("device {} is not in the registry", record.device)),
    };
    if hex::encode(keys.public.id().0) != record.device_key {
        return Verdict::Unverifiable(format!("device {}'s keys were rotated since", record.device));
    }
    match check(record, &keys, response) {
        Ok(()) => Verdict::Verified,
        Err(why) => Verdict::Failed(why),
    }
}

fn check(record: &Record, keys: &DeviceKeys, response: &str) -> Result<(), String> {
    let frame = hex::decode(response).map_err(|_| "response is not hex".to_owned())?;
    let msg_id = MsgId(hex_array(record.msg_id.as_deref(), "msg_id")?);
    let device = record.device.as_str();
    match record.mode {
        Mode::Sealed => {
            let recipient = KeyId(hex_array(Some(&record.controller_key), "controller_key")?);
            verify_receipt(&frame, device, &keys.public, recipient, msg_id)
                .map(|_| ())
                .map_err(|e| format!("receipt: {e}"))
        }
        Mode::Challenge => {
            let challenge = hex_array(record.challenge.as_deref(), "challenge")?;
            let controller = ChallengeController::new(device, &keys.hmac).map_err(|e| e.to_string())?;
            let arrived_on = topic(device, Channel::Response).map_err(|e| e.to_string())?;
            let candidates = hidden_candidates();
            let answer = controller
                .read_response(&frame, arrived_on.as_str(), &Pending { challenge, msg_id }, &candidates)
                .map_err(|e| format!("response: {e}"))?;
            let (status, code) = match answer {
                Answer::Explicit(o) => (o.status, o.code),
                Answer::Hidden(i) => (candidates.get(i).map_or(Status::Failed, |c| c.status), 0),
            };
            let answered = (Some(status_name(status)), Some(code));
            if answered != (record.status.as_deref(), record.code) {
                return Err(format!(
                    "the record says {} (code {}), the device's answer says {} (code {code})",
                    record.status.as_deref().unwrap_or("nothing"),
                    record.code.map_or_else(|| "none".to_owned(), |c| c.to_string()),
                    status_name(status),
                ));
            }
            Ok(())
        }
    }
}

fn hex_array<const N: usize>(field: Option<&str>, name: &str) -> Result<[u8; N], String> {
    let text = field.ok_or_else(|| format!("{name} is missing"))?;
    let bytes = hex::decode(text).map_err(|_| format!("{name} is not hex"))?;
    bytes.try_into().map_err(|_| format!("{name} is not {N} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest frames each argument: moving a character from one
    /// argument to the next changes it.
    #[test]
    fn the_argument_digest_keeps_arguments_apart() {
        let d = |a: &[&str]| args_digest(&a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_ne!(d(&["ab", "c"]), d(&["a", "bc"]));
        assert_ne!(d(&[]), d(&[""]));
        // SHA-256 of 00000001 61 ("a" framed), as `printf '\0\0\0\1a' | sha256sum` gives.
        assert_eq!(d(&["a"]), hex::encode(Sha256::digest([0, 0, 0, 1, b'a'])));
    }
}
