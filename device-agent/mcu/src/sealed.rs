//! Sealed mode on a microcontroller (feature `sealed`).
//!
//! The same envelopes as the Linux agent's default mode: RSA-PSS signed by a
//! trusted controller, the command encrypted to the device. It needs what
//! challenge mode does not: a global allocator (RSA's big integers; about
//! 12 KiB of heap at 2048 bits), a real-time clock (a sealed envelope is
//! fresh by its times, not by a challenge), and a replay cache in RAM. A
//! reboot empties the cache, so a device without persistent storage must
//! also keep its clock honest across reboots: everything it accepted before
//! expires within `max_lifetime_secs`.

use alloc::vec::Vec;

use mqseal_proto::challenge::Form;
use mqseal_proto::sealed::{Keyring, PrivateKey, ReplayCache, SealedDevice};
use mqseal_proto::{Call, MsgId, Policy};
use rand_core::CryptoRng;

use crate::agent::{Commands, OUTPUT_LEN, Rejected, run};

/// The keys and replay memory of sealed mode.
pub struct SealedMode<'k> {
    key: &'k PrivateKey,
    controllers: &'k Keyring,
    policy: Policy,
    replay: ReplayCache,
}

impl<'k> SealedMode<'k> {
    /// Sealed mode with the device's `key`, trusting `controllers`,
    /// remembering up to `replay_capacity` accepted commands.
    #[must_use]
    pub fn new(key: &'k PrivateKey, controllers: &'k Keyring, policy: Policy, replay_capacity: usize) -> Self {
        SealedMode { key, controllers, policy, replay: ReplayCache::new(replay_capacity, policy) }
    }

    pub(crate) fn open_and_run<R: CryptoRng + ?Sized, C: Commands + ?Sized>(
        &mut self,
        id: &str,
        frame: &[u8],
        arrived_on: &str,
        now: u64,
        rng: &mut R,
        commands: &mut C,
    ) -> Result<Vec<u8>, Rejected> {
        let device = SealedDevice::new(id, self.key, self.controllers, self.policy)?;
        let opened = device.open_command(rng, frame, arrived_on, now, &mut self.replay)?;
        let args: Vec<&str> = opened.args.iter().map(alloc::string::String::as_str).collect();
        let call = Call::new(&opened.name, &args)?;
        let mut output = [0u8; OUTPUT_LEN];
        let outcome = run(commands, &call, &mut output, Form::Explicit);
        let msg_id = MsgId::random(rng);
        Ok(device.seal_response(rng, &opened, &outcome, msg_id, now)?)
    }
}
