//! The MQTT loop (feature `mqtt`): [`minimq`] over any byte stream that
//! implements `embedded-io-async`'s `Read + Write` — a smoltcp or
//! embassy-net TCP socket on a board, a TLS stream over one, or a tokio
//! `TcpStream` through `embedded-io-adapters` on the host.
//!
//! Opening the stream and deciding when to reconnect stay with the firmware
//! (it owns the network stack and knows its power budget); [`serve`] runs
//! one connection from CONNECT to its end and returns why it ended.
//!
//! # Quality of service
//!
//! The agent subscribes and publishes at QoS 0, and its sessions are clean.
//! Without a persistent session QoS 1 would add acknowledgements but no
//! delivery guarantee (nothing is redelivered across a reconnect), and it
//! would cost in-flight space in the transmit buffer. A command lost with a
//! connection simply gets no answer, and the controller's timeout reports
//! it; nothing can run twice, because the challenge it answered is used up
//! only by a command that runs.
//!
//! # Buffers
//!
//! The firmware owns two buffers (minimq's `Buffers`):
//!
//! * receive: the largest inbound packet. minimq tells the broker this size
//!   as MQTT 5's Maximum Packet Size, and a broker that honours it (as
//!   `mqseal-broker` does) discards larger messages for this client. If one
//!   arrives anyway, minimq drops the connection
//!   ([`minimq::PeerError::InvalidPacket`]); a message is never truncated.
//!   [`RX_LEN`] holds any challenge-mode command with [`COMMAND_LEN`] bytes
//!   of name and arguments for the longest device ids.
//! * transmit: CONNECT (client id, user name, password, will) and one
//!   outbound publish. [`TX_LEN`] is enough for the longest ids.
//!
//! Plus the agent's envelope buffer of [`ENVELOPE_LEN`](crate::ENVELOPE_LEN).

use embassy_time::{Duration, with_timeout};
use minimq::{Buffers, ConfigBuilder, ConfigError, Io, Publication, QoS, Session, TopicFilter, Will};
use mqseal_proto::challenge::Clock;
use mqseal_proto::topic::Channel;
use rand_core::CryptoRng;

use crate::agent::{Agent, Commands, Rejected};

/// Payload of the retained status while connected (as the Linux agent's).
pub const ONLINE: &[u8] = b"online";
/// Payload of the retained status after the device left: the last will.
pub const OFFLINE: &[u8] = b"offline";

/// Receive buffer that fits every challenge-mode command whose call (name
/// and arguments, as encoded) is at most [`COMMAND_LEN`] bytes.
pub const RX_LEN: usize = 512;

/// The call size [`RX_LEN`] is computed for: a header with a 64-byte id
/// and its topic (~190 bytes), challenge and tag (48), MQTT overhead (~100).
pub const COMMAND_LEN: usize = 160;

/// Transmit buffer for CONNECT with the longest ids plus one response.
pub const TX_LEN: usize = 640;

/// How long CONNECT may take before the connection is given up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the loop reports to the firmware's log, if it keeps one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Connected, subscribed, status published.
    Connected,
    /// A challenge or a response was published.
    Answered(Channel),
    /// A publish was not acted on.
    Rejected(Rejected),
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum NetError<E: core::fmt::Debug> {
    /// The MQTT session (transport, broker refusal, buffer limits).
    #[error("mqtt: {0}")]
    Mqtt(#[from] minimq::Error<E>),
    /// Publishing an answer failed.
    #[error("mqtt publish: {0}")]
    Publish(#[from] minimq::PubError<(), E>),
    /// CONNECT got no CONNACK within [`CONNECT_TIMEOUT`].
    #[error("no CONNACK within {} s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout,
    /// The agent's topics could not be named (cannot happen for a built agent).
    #[error("{0}")]
    Topic(#[from] mqseal_proto::Error),
}

/// A minimq session for device `id`: its credential, keepalive, and the
/// retained `offline` will on `status_topic`.
///
/// The device's broker user name is its id, as `mqseal device add` creates it.
///
/// # Errors
/// [`ConfigError`] when an id or topic exceeds minimq's fixed storage.
pub fn session<'a>(
    rx: &'a mut [u8],
    tx: &'a mut [u8],
    id: &'a str,
    password: &'a [u8],
    status_topic: &str,
    keepalive_secs: u16,
) -> Result<Session<'a>, ConfigError> {
    let will = Will::new(status_topic, OFFLINE, &[])?.retained().qos(QoS::AtLeastOnce);
    let config = ConfigBuilder::new(Buffers::new(rx, tx))
        .client_id(id)?
        .auth(id, password)?
        .keepalive_interval(keepalive_secs)
        .will(will)?;
    Ok(Session::new(config))
}

/// The firmware's side of a connection: its RNG, its commands, its clock
/// (called once per publish) and its log (which may do nothing).
pub struct Device<'d, R: ?Sized, C: ?Sized, F, L> {
    /// The hardware RNG, or a DRBG seeded from it.
    pub rng: &'d mut R,
    /// The command handlers.
    pub commands: &'d mut C,
    /// The device's clock.
    pub clock: F,
    /// Receives every [`Event`].
    pub log: L,
}

/// Runs one connection over `io` until it ends, and returns why.
///
/// Connects (within [`CONNECT_TIMEOUT`]), subscribes to the command and
/// challenge-request topics, publishes the retained `online` status, then
/// hands every publish to [`Agent::handle`] and publishes its answer.
/// Liveness after that is MQTT's keepalive: minimq pings the broker and
/// drops a connection whose ping goes unanswered. `out` is the agent's
/// envelope buffer.
pub async fn serve<IO, R, C, F, L, const SLOTS: usize>(
    session: &mut Session<'_>,
    io: IO,
    agent: &mut Agent<'_, SLOTS>,
    device: &mut Device<'_, R, C, F, L>,
    out: &mut [u8],
) -> NetError<IO::Error>
where
    IO: Io,
    IO::Error: core::fmt::Debug,
    R: CryptoRng + ?Sized,
    C: Commands + ?Sized,
    F: FnMut() -> Clock,
    L: FnMut(Event),
{
    let mut conn = match with_timeout(CONNECT_TIMEOUT, session.connect(io)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return e.into(),
        Err(_) => return NetError::ConnectTimeout,
    };
    // Every step below ends the connection on error; the loop never ends
    // otherwise, hence `Infallible`.
    let ended: Result<core::convert::Infallible, NetError<IO::Error>> = async {
        let cmd = agent.topic(Channel::Command)?;
        let chal_req = agent.topic(Channel::ChallengeRequest)?;
        let status = agent.topic(Channel::Status)?;
        conn.subscribe(&[TopicFilter::new(&cmd), TopicFilter::new(&chal_req)], &[]).await?;
        conn.publish(Publication::new(&status, ONLINE).retain()).await?;
        (device.log)(Event::Connected);
        loop {
            let reply = {
                let publish = conn.recv().await?;
                let clock = (device.clock)();
                agent.handle(publish.topic(), publish.payload(), clock, device.rng, device.commands, out)
            };
            match reply {
                Ok(reply) => {
                    let channel = reply.channel();
                    let topic = agent.topic(channel)?;
                    conn.publish(Publication::new(&topic, reply.bytes(out))).await?;
                    (device.log)(Event::Answered(channel));
                }
                Err(why) => (device.log)(Event::Rejected(why)),
            }
        }
    }
    .await;
    match ended {
        Ok(never) => match never {},
        Err(e) => e,
    }
}
