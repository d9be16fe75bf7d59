//! Sending commands and waiting for their authenticated answers.
//!
//! One [`Session`] is one MQTT connection. [`Session::run`] takes a command
//! and any number of target devices and drives every target's exchange at
//! once, on that connection, in one task: no lock, no thread per device.
//! That is what makes a broadcast to ten thousand devices a matter of
//! seconds — the controller's work per device is one HMAC to build the
//! command and one to check the answer (challenge mode), and the publishes
//! are pipelined.
//!
//! Sealed mode costs one RSA signature per device (and one signature check
//! per answer; the receipt's key comes from the command's, so no RSA
//! decryption); the signatures are spread over the machine's cores, but
//! remain the bill for confidentiality and non-repudiation.
//! docs/BENCHMARKS.md has the numbers for both.
//!
//! A 3.1.1 broker acknowledges even publishes it drops, so nothing the
//! broker says counts as an answer: a target is done only when its device's
//! response verifies, and otherwise times out. Until then its exchange
//! sends its last envelope again from time to time (the same bytes:
//! [`crate::exchange`] has the rule), which gets a command through a broker
//! that dropped it or its answer.
//!
//! What happens per target — which challenge answers which command, copies
//! over other challenges, re-sends, when to give up, what verifies — is
//! [`crate::exchange`]'s, without I/O; which targets start when, and what
//! is done with each answer, is a [`Driver`]'s: [`Session::run`] starts
//! every target at once, a job (`crate::job`) at a rate, as devices come
//! online. This module has the one loop that reads the connection while
//! commands are out ([`Session::drive`]): it moves envelopes, keeps the
//! timers, and hands every publish to the exchange it belongs to — a
//! publish that arrives while it waits for a SUBACK is kept for it, not
//! dropped.
//!
//! # When the connection drops
//!
//! A broker restart loses every in-flight message and every subscription.
//! [`Session::run`] reconnects (with backoff, within its deadline),
//! subscribes again, and re-sends each unanswered target's last envelope at
//! once and then on its usual back-off, because the devices come back on
//! their own schedule. Identical bytes are what make this safe: a device
//! that already ran the command answers the copy with its stored receipt
//! (docs/PROTOCOL.md §9.1), so nothing runs twice and nothing is lost while
//! the command is valid. A challenge-mode command that stays unanswered
//! also falls back to fresh challenges ([`crate::exchange`]), which the
//! device's memory of message ids makes safe too.
//!
//! The first connection is no different: a broker that is restarting when
//! the controller connects (refusing TCP, or resetting the connection
//! before its CONNACK) is tried again with the same back-off until the
//! caller's deadline. Only a refused login ends it at once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::time::Duration;

use mqseal_client::rumqttc::{
    self, AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Outgoing, Packet, QoS, SubscribeFilter,
    SubscribeReasonCode,
};
use mqseal_client::{BrokerEndpoint, rng, unix_ms, unix_now};
use mqseal_proto::challenge::{ChallengeController, HmacKey, Offer};
use mqseal_proto::sealed::PrivateKey;
use mqseal_proto::topic::{Channel, parse, topic};
use mqseal_proto::{Call, MsgId};
use tokio::time::Instant;

pub use crate::exchange::{DeviceResult, Evidence, Mode, Reply, Request};
use crate::exchange::{Exchange, Out, SealedOut, Snapshot, challenge_request, seal};
use crate::registry::DeviceKeys;

/// Why a session cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The broker refused the login.
    #[error("broker {address} refused the connection: {code}")]
    Refused {
        /// Where.
        address: String,
        /// Its reason.
        code: String,
    },
    /// The broker could not be reached or dropped the connection.
    #[error("broker {address}: {error}")]
    Unreachable {
        /// Where.
        address: String,
        /// What happened.
        error: String,
    },
    /// Local setup (credentials, TLS files).
    #[error(transparent)]
    Client(#[from] mqseal_client::ClientError),
    /// The command itself breaks a protocol limit (name or argument length,
    /// argument count): nothing was sent.
    #[error("command: {0}")]
    InvalidCommand(mqseal_proto::Error),
    /// The driver could not store what it must before envelopes go out (a
    /// job's journal or its audit records): nothing more was sent. The
    /// message names what failed.
    #[error("{0}")]
    Journal(String),
}

/// A [`Session::run`] that stopped before every target had ended.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Stopped {
    /// Why it stopped.
    pub error: SessionError,
    /// A result per target, in their order: what was heard before it
    /// stopped, [`DeviceResult::TimedOut`] for the rest (a command may
    /// have reached a device whose answer was not heard).
    pub results: Vec<Finished>,
}

impl SessionError {
    /// Whether the broker refused the credentials (vs. being unreachable).
    pub fn is_auth(&self) -> bool {
        matches!(self, SessionError::Refused { .. })
    }
}

/// How one target ended, and the message id of the command it was sent
/// (none if none was built): what the audit log names it by.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The command's message id.
    pub msg_id: Option<MsgId>,
    /// How it ended.
    pub result: DeviceResult,
}

/// A target to start.
#[derive(Debug, Clone)]
pub struct Start {
    /// The device.
    pub device: String,
    /// Take up the exchange from here (a job resumed after its controller
    /// stopped) instead of building a new command.
    pub resume: Option<Snapshot>,
    /// How long to wait for its answer.
    pub give_up_after: Duration,
}

/// What decides which targets [`Session::drive`] starts and when, and hears
/// how each ends — the policy around the loop, without I/O of its own
/// except [`Driver::flush`].
pub trait Driver {
    /// Every device this run may send to: subscribed to before anything is
    /// sent (and again after a reconnect), so that no answer goes unheard.
    fn devices(&self) -> Vec<String>;
    /// Whether to subscribe to the devices' retained status too (and hear
    /// it in [`Driver::status`]).
    fn wants_status(&self) -> bool {
        false
    }
    /// Whether [`Driver::sending`] is wanted (it costs a snapshot per new
    /// envelope).
    fn wants_snapshots(&self) -> bool {
        false
    }
    /// The targets to start at `now`, and when to be asked again (it is
    /// also asked after every answer and status).
    fn due(&mut self, now: Instant) -> (Vec<Start>, Option<Instant>);
    /// A new envelope for `device` is about to be published.
    fn sending(&mut self, _device: &str, _snapshot: Snapshot) {}
    /// A target ended.
    fn finished(&mut self, device: &str, finished: Finished);
    /// A retained status from `device`.
    fn status(&mut self, _device: &str, _payload: &[u8]) {}
    /// Until when the envelopes built so far may wait, so that the next
    /// ones share their [`Driver::flush`] (a group commit); `None`: flush
    /// and publish now.
    fn hold_until(&self) -> Option<Instant> {
        None
    }
    /// Makes what `sending` and `finished` were told durable: called before
    /// every batch of envelopes is published.
    ///
    /// # Errors
    /// What could not be stored; the run stops before sending more.
    fn flush(&mut self) -> impl Future<Output = Result<(), String>> + Send {
        std::future::ready(Ok(()))
    }
    /// Whether the run is over.
    fn is_done(&self) -> bool;
    /// The latest the run may go on: reconnects give up then, and whatever
    /// has not answered has timed out.
    fn deadline(&self) -> Instant;
}

/// [`Session::run`]'s policy: every target at once, one deadline.
struct AllAtOnce<'p> {
    devices: Vec<String>,
    results: HashMap<String, Finished>,
    started: bool,
    timeout: Duration,
    deadline: Instant,
    progress: &'p mut (dyn FnMut(usize, usize) + Send),
}

impl<'p> AllAtOnce<'p> {
    fn new(devices: Vec<String>, timeout: Duration, progress: &'p mut (dyn FnMut(usize, usize) + Send)) -> Self {
        progress(0, devices.len());
        let deadline = Instant::now() + timeout;
        AllAtOnce { devices, results: HashMap::new(), started: false, timeout, deadline, progress }
    }

    /// In the order of the targets; one that never ended timed out.
    fn results(mut self) -> Vec<Finished> {
        let devices = std::mem::take(&mut self.devices);
        devices
            .iter()
            .map(|d| self.results.remove(d).unwrap_or(Finished { msg_id: None, result: DeviceResult::TimedOut }))
            .collect()
    }
}

impl Driver for AllAtOnce<'_> {
    fn devices(&self) -> Vec<String> {
        self.devices.clone()
    }
    fn due(&mut self, _now: Instant) -> (Vec<Start>, Option<Instant>) {
        if std::mem::replace(&mut self.started, true) {
            return (Vec::new(), None);
        }
        let give_up_after = self.deadline.saturating_duration_since(Instant::now()).min(self.timeout);
        let starts = self.devices.iter().map(|d| Start { device: d.clone(), resume: None, give_up_after }).collect();
        (starts, None)
    }
    fn finished(&mut self, device: &str, finished: Finished) {
        self.results.insert(device.to_owned(), finished);
        (self.progress)(self.results.len(), self.devices.len());
    }
    fn is_done(&self) -> bool {
        self.started && self.results.len() >= self.devices.len()
    }
    fn deadline(&self) -> Instant {
        self.deadline
    }
}

/// The topics a run listens on: its devices' responses (and challenges,
/// in challenge mode, and retained status, if asked).
#[derive(Clone, Copy)]
struct Wanted<'a> {
    devices: &'a [String],
    mode: Mode,
    status: bool,
}

/// Tells the driver about target `i` once, when it has ended.
fn report<D: Driver>(ts: &[Exchange<'_>], reported: &mut [bool], i: usize, driver: &mut D) {
    let (Some(t), Some(r)) = (ts.get(i), reported.get_mut(i)) else { return };
    if *r || !t.is_done() {
        return;
    }
    *r = true;
    let result = t.result().cloned().unwrap_or(DeviceResult::TimedOut);
    driver.finished(t.device(), Finished { msg_id: t.msg_id(), result });
}

/// Targets above this are subscribed to with one wildcard filter, if the
/// broker allows it (a controller granted `*`).
const WILDCARD_ABOVE: usize = 16;
/// Filters per SUBSCRIBE packet.
const FILTERS_PER_SUBSCRIBE: usize = 100;

/// Where a session connects: the endpoint's brokers (several for a
/// cluster), and which one it uses now.
struct Brokers {
    endpoint: BrokerEndpoint,
    base: std::path::PathBuf,
    client_id: String,
    failover: mqseal_client::Failover,
}

impl Brokers {
    fn options(&self) -> Result<rumqttc::MqttOptions, mqseal_client::ClientError> {
        let mut options = self.endpoint.mqtt_options_at(self.failover.current(), &self.client_id, &self.base)?;
        options.set_clean_session(true).set_request_channel_capacity(4096).set_inflight(1000);
        Ok(options)
    }
}

/// One connection to the broker.
pub struct Session {
    client: AsyncClient,
    events: EventLoop,
    key: PrivateKey,
    address: String,
    brokers: Brokers,
    /// Filters already granted on this connection.
    subscribed: HashSet<String>,
    /// Challenge mode: keep one challenge per device in hand.
    prefetch: bool,
    /// Challenge requests sent ahead of need: device → (request id, key,
    /// when it was sent).
    prefetching: HashMap<String, (MsgId, HmacKey, Instant)>,
    /// Challenges in hand: device → (offer, the request it answered, when
    /// that was sent).
    offers: HashMap<String, (Offer, MsgId, Instant)>,
    /// Publishes that arrived while waiting for something else (a SUBACK:
    /// retained statuses follow each granted SUBSCRIBE at once), kept for
    /// the loop that reads them instead of dropped; at most [`HELD_MAX`].
    held: VecDeque<rumqttc::Publish>,
    /// Publishes not kept because `held` was full.
    held_dropped: u64,
}

/// Events handled between two flushes of the driver at most.
const EVENT_BURST: usize = 256;

/// Publishes kept while waiting for SUBACKs: enough for every retained
/// status and challenge of a large fleet, not unbounded.
const HELD_MAX: usize = 100_000;

/// Whether a prefetched challenge requested `since_request` ago, with a
/// lifetime of `ttl_ms`, may still carry a command: only in the first half
/// of its lifetime, counted from the request (which the device answered
/// later), however late the answer was read.
fn offer_usable(since_request: Duration, ttl_ms: u32) -> bool {
    since_request < Duration::from_millis(u64::from(ttl_ms)) / 2
}

/// How long a prefetch request may be waited on before asking afresh: an
/// answer older than this may have been read too late to be usable.
const PREFETCH_WAIT: Duration = Duration::from_secs(2);

/// Targets' timers, earliest first; an entry whose target has moved its
/// timer since is skipped when it comes up.
type Timers = BinaryHeap<Reverse<(Instant, usize)>>;

fn schedule(timers: &mut Timers, t: &Exchange<'_>, i: usize) {
    if let Some(at) = t.next_timer() {
        timers.push(Reverse((at, i)));
    }
}

impl Session {
    /// Connects as `client_id` and waits for the broker's CONNACK, trying
    /// again with back-off for up to `within` (at least the endpoint's
    /// connect timeout and 5 s) while the broker is unreachable or drops the
    /// connection: the same rule as for a connection lost later.
    ///
    /// # Errors
    /// [`SessionError`] saying whether the broker refused (at once) or was
    /// unreachable (the last error, once `within` has passed).
    pub async fn connect(
        endpoint: &BrokerEndpoint,
        base: &Path,
        client_id: &str,
        key: PrivateKey,
        within: Duration,
    ) -> Result<Session, SessionError> {
        let brokers = Brokers {
            endpoint: endpoint.clone(),
            base: base.to_owned(),
            client_id: client_id.to_owned(),
            failover: mqseal_client::Failover::new(endpoint)?,
        };
        let (client, mut events) = AsyncClient::new(brokers.options()?, 4096);
        events.set_network_options(endpoint.network_options());
        let address = endpoint.address();
        let deadline = Instant::now() + within.max(Duration::from_secs(endpoint.connect_timeout_secs.max(1) + 5));
        let first = match tokio::time::timeout_at(deadline, first_connack(&mut events)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(connection_error(&address, e)),
            Err(_) => Err(SessionError::Unreachable { address: address.clone(), error: "no CONNACK in time".into() }),
        };
        let mut session = Session {
            client,
            events,
            key,
            address,
            brokers,
            subscribed: HashSet::new(),
            prefetch: false,
            prefetching: HashMap::new(),
            held: VecDeque::new(),
            held_dropped: 0,
            offers: HashMap::new(),
        };
        match first {
            Ok(()) => Ok(session),
            Err(e) if e.is_auth() => Err(e),
            Err(e) => session.reconnect(deadline, e).await.map(|()| session),
        }
    }

    /// Keeps a challenge per device in hand after each challenge-mode
    /// command, so the next command to that device costs one round trip
    /// instead of two. For controllers that stay connected (a service, the
    /// benchmark); `mqseal send` is one-shot and does not.
    pub fn set_prefetch(&mut self, on: bool) {
        self.prefetch = on;
    }

    /// Services the connection for `wait` (keep-alives, prefetched
    /// challenges arriving) while the caller has nothing to send.
    ///
    /// # Errors
    /// [`SessionError`] if the connection is lost.
    pub async fn idle(&mut self, wait: Duration) -> Result<(), SessionError> {
        let deadline = Instant::now() + wait;
        loop {
            // Nothing is out while idle: a publish that is not a
            // prefetched challenge answers nothing and is let go.
            match self.next_event(deadline).await {
                Ok(None) => return Ok(()),
                Err(e) => return Err(connection_error(&self.address, e)),
                Ok(Some(Event::Incoming(Packet::Publish(p)))) => {
                    if let Some((device, Channel::Challenge)) = parse(&p.topic) {
                        self.take_prefetched(device, &p.payload);
                    }
                }
                Ok(Some(_)) => {}
            }
        }
    }

    /// Stores a challenge that answers a prefetch request; whether it did.
    fn take_prefetched(&mut self, device: &str, payload: &[u8]) -> bool {
        let Some((req, key, requested)) = self.prefetching.get(device) else { return false };
        let Ok(controller) = ChallengeController::new(device, key) else { return false };
        let Ok(offer) = controller.read_challenge(payload, *req) else { return false };
        let (req, requested) = (*req, *requested);
        self.prefetching.remove(device);
        self.offers.insert(device.to_owned(), (offer, req, requested));
        true
    }

    /// A prefetched challenge for `device` that is still safely usable.
    ///
    /// Its age is counted from when it was *requested*: the device issued
    /// it later than that, so this over-estimates, never under-estimates —
    /// a challenge read late (a connection busy elsewhere, a session idle
    /// between runs) is not mistaken for a fresh one. A command over an
    /// expired challenge is refused by the device and never runs, so the
    /// offer is used only in the first half of its lifetime.
    fn take_offer(&mut self, device: &str) -> Option<(Offer, MsgId)> {
        let (offer, req, requested) = self.offers.remove(device)?;
        offer_usable(requested.elapsed(), offer.ttl_ms).then_some((offer, req))
    }

    /// Sends `request` to every target and waits until each has answered or
    /// `timeout` has passed. `progress(done, total)` is called as targets
    /// finish. Results are in the order of `targets`.
    ///
    /// # Errors
    /// [`Stopped`] if the connection is lost for good: with the answers
    /// heard until then, which must still be reported and audited.
    pub async fn run(
        &mut self,
        targets: &[(String, &DeviceKeys)],
        request: &Request,
        timeout: Duration,
        progress: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<Vec<Finished>, Stopped> {
        let keys: HashMap<String, &DeviceKeys> = targets.iter().map(|(d, k)| (d.clone(), *k)).collect();
        let mut all = AllAtOnce::new(targets.iter().map(|(d, _)| d.clone()).collect(), timeout, progress);
        match self.drive(&mut all, &keys, request).await {
            Ok(()) => Ok(all.results()),
            Err(error) => Err(Stopped { error, results: all.results() }),
        }
    }

    /// The one loop that moves a command's envelopes while it is out:
    /// `driver` says which targets start when and hears how each ends;
    /// [`Exchange`] decides, per target, what to send and what verifies;
    /// this loop only reads the connection, keeps the timers and publishes.
    /// `run` drives it with every target at once, a job
    /// (`crate::job`) at a rate, as devices come online.
    ///
    /// # Errors
    /// [`SessionError`] if the connection is lost for good (past the
    /// driver's deadline, or the login is refused), or the driver could not
    /// store what it must before envelopes go out
    /// ([`SessionError::Journal`]).
    pub async fn drive<'k, D: Driver>(
        &mut self,
        driver: &mut D,
        keys: &HashMap<String, &'k DeviceKeys>,
        request: &Request,
    ) -> Result<(), SessionError> {
        let deadline = driver.deadline();
        let call_args: Vec<&str> = request.args.iter().map(String::as_str).collect();
        let call = Call::new(&request.name, &call_args).map_err(SessionError::InvalidCommand)?;
        let devices = driver.devices();
        let wanted = Wanted { devices: &devices, mode: request.mode, status: driver.wants_status() };
        let mut refused = self.subscribe_through(wanted, deadline).await?;

        let mut ts: Vec<Exchange<'k>> = Vec::new();
        let mut reported: Vec<bool> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut queue = VecDeque::new();
        let mut timers = Timers::new();
        let mut touched: Vec<usize> = Vec::new();
        let mut rng = rng();
        let mut next_due = Some(Instant::now());

        'run: loop {
            let now = Instant::now();
            if next_due.is_some_and(|at| at <= now) {
                let (starts, next) = driver.due(now);
                next_due = next;
                for start in starts {
                    let built = match keys.get(&start.device) {
                        None => Err(format!("no keys for {}", start.device)),
                        Some(keys) => match &start.resume {
                            Some(snap) => Exchange::resume(&start.device, keys, snap, now)
                                .map_err(|e| format!("cannot resume: {e}")),
                            None => Ok(Exchange::new(&start.device, keys)),
                        },
                    };
                    let mut x = match built {
                        Ok(x) => x,
                        Err(e) => {
                            driver.finished(&start.device, Finished { msg_id: None, result: DeviceResult::Error(e) });
                            continue;
                        }
                    };
                    x.give_up_at(now + start.give_up_after);
                    if refused.contains(&start.device) {
                        x.finish(DeviceResult::Error("the broker refused the subscription: not granted".into()));
                    }
                    // A device started again (a retry) takes its old slot.
                    let i = match index.get(&start.device) {
                        Some(&i) => {
                            if let (Some(slot), Some(r)) = (ts.get_mut(i), reported.get_mut(i)) {
                                *slot = x;
                                *r = false;
                            }
                            i
                        }
                        None => {
                            index.insert(start.device.clone(), ts.len());
                            ts.push(x);
                            reported.push(false);
                            ts.len() - 1
                        }
                    };
                    touched.push(i);
                }
                self.start_pending(&mut ts, &touched, request, &call, &mut queue, &mut rng);
                for &i in &touched {
                    if let Some(t) = ts.get(i) {
                        schedule(&mut timers, t, i);
                    }
                }
            }
            while let Some(&Reverse((at, i))) = timers.peek()
                && at <= now
            {
                timers.pop();
                if let Some(t) = ts.get_mut(i)
                    && t.next_timer() == Some(at)
                {
                    queue.extend(t.on_timer(now, &mut rng));
                    schedule(&mut timers, t, i);
                    touched.push(i);
                }
            }
            for i in touched.drain(..) {
                let Some(t) = ts.get_mut(i) else { continue };
                if driver.wants_snapshots()
                    && let Some(snap) = t.take_snapshot()
                {
                    driver.sending(t.device(), snap);
                }
                report(&ts, &mut reported, i, driver);
            }
            // What resuming needs is stored before the envelopes it
            // describes leave — a few milliseconds later if the driver
            // gathers several into one write.
            let hold = driver.hold_until().filter(|at| *at > Instant::now() && !driver.is_done());
            if hold.is_none() {
                driver.flush().await.map_err(SessionError::Journal)?;
                self.drain(&mut queue);
            }
            if driver.is_done() {
                break;
            }
            let mut wake = timers.peek().map_or(deadline, |Reverse((at, _))| (*at).min(deadline));
            for at in next_due.into_iter().chain(hold) {
                wake = wake.min(at);
            }
            for burst in 0..EVENT_BURST {
                // The first event is waited for; whatever else is ready
                // is taken at once, so that one flush of the driver's
                // journal covers a burst of answers, not one each.
                let until = if burst == 0 { wake } else { Instant::now() };
                let event = match self.next_event(until).await {
                    Ok(None) if Instant::now() >= deadline => break 'run,
                    Ok(None) => break,
                    Err(e) => {
                        let lost = connection_error(&self.address, e);
                        if lost.is_auth() {
                            return Err(lost);
                        }
                        self.reconnect(deadline, lost).await?;
                        self.subscribed.clear();
                        refused = self.subscribe_through(wanted, deadline).await?;
                        let now = Instant::now();
                        for (i, t) in ts.iter_mut().enumerate() {
                            t.on_reconnect(now);
                            schedule(&mut timers, t, i);
                        }
                        break;
                    }
                    Ok(Some(ev)) => ev,
                };
                let Event::Incoming(Packet::Publish(p)) = event else { continue };
                let Some((device, channel)) = parse(&p.topic) else { continue };
                // A challenge answering a prefetch is kept for the next command
                // to that device, whether or not it is a target of this run.
                if channel == Channel::Challenge && self.take_prefetched(device, &p.payload) {
                    continue;
                }
                if channel == Channel::Status {
                    driver.status(device, &p.payload);
                    next_due = Some(Instant::now());
                    continue;
                }
                let Some(&i) = index.get(device) else { continue };
                let Some(t) = ts.get_mut(i) else { continue };
                if t.is_done() {
                    continue;
                }
                match channel {
                    Channel::Challenge => {
                        if let Some(out) = t.on_challenge(&p.payload, request, &call, Instant::now()) {
                            queue.push_back(out);
                        }
                        schedule(&mut timers, t, i);
                        touched.push(i);
                    }
                    Channel::Response => {
                        if !t.on_response(&p.topic, &p.payload, &self.key, unix_ms()) {
                            continue;
                        }
                        touched.push(i);
                        // A finished target may free a place for the next.
                        next_due = Some(Instant::now());
                        if self.prefetch
                            && request.mode == Mode::Challenge
                            && let Ok((req, out)) = challenge_request(t.device(), t.keys(), &mut rng)
                        {
                            self.prefetching
                                .insert(t.device().to_owned(), (req, t.keys().hmac.clone(), Instant::now()));
                            queue.push_back(out);
                        }
                    }
                    _ => {}
                }
            }
        }
        // Past the deadline: whatever has not answered has timed out, and
        // envelopes still held for a group commit are not sent: their
        // targets are reported timed out, so they must not run.
        queue.clear();
        for i in 0..ts.len() {
            if let Some(t) = ts.get_mut(i)
                && !t.is_done()
            {
                t.finish(DeviceResult::TimedOut);
            }
            report(&ts, &mut reported, i, driver);
        }
        driver.flush().await.map_err(SessionError::Journal)
    }

    /// Builds the first envelope of every target in `which` that has sent
    /// nothing yet: challenge mode over a challenge in hand or with a
    /// request; sealed mode sealed on all cores at once.
    fn start_pending(
        &mut self,
        ts: &mut [Exchange<'_>],
        which: &[usize],
        request: &Request,
        call: &Call<'_>,
        queue: &mut VecDeque<Out>,
        rng: &mut impl rand_core::CryptoRng,
    ) {
        let pending: Vec<usize> =
            which.iter().copied().filter(|&i| ts.get(i).is_some_and(Exchange::is_pending)).collect();
        match request.mode {
            Mode::Challenge => {
                let (now, unix) = (Instant::now(), unix_now());
                for &i in &pending {
                    let Some(t) = ts.get_mut(i) else { continue };
                    let offer = self.take_offer(t.device());
                    // Requested ahead and still on its way: wait for it.
                    let requested = offer
                        .is_none()
                        .then(|| self.prefetching.remove(t.device()))
                        .flatten()
                        .filter(|(_, _, requested)| requested.elapsed() < PREFETCH_WAIT)
                        .map(|(id, _, _)| id);
                    queue.extend(t.start_challenge(request, call, offer, requested, now, unix, rng));
                }
            }
            Mode::Sealed => {
                for (i, sealed) in self.seal_all(ts, &pending, request, call) {
                    if let Some(t) = ts.get_mut(i) {
                        queue.extend(t.start_sealed(sealed, Instant::now()));
                    }
                }
                // A sealing worker that died leaves its targets unsent.
                for &i in &pending {
                    if let Some(t) = ts.get_mut(i).filter(|t| t.is_pending()) {
                        t.finish(DeviceResult::Error("sealing did not complete".into()));
                    }
                }
            }
        }
    }

    /// After the connection dropped: reconnects with backoff until the
    /// broker accepts or `deadline` passes.
    ///
    /// # Errors
    /// The last connection error when the deadline passes; a refused login
    /// at once.
    async fn reconnect(&mut self, deadline: Instant, lost: SessionError) -> Result<(), SessionError> {
        let mut backoff = mqseal_client::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let mut last = lost;
        loop {
            let delay = backoff.next_delay();
            if Instant::now() + delay >= deadline {
                return Err(last);
            }
            tokio::time::sleep(delay).await;
            self.next_broker();
            match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Err(_) => return Err(last),
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    last = connection_error(&self.address, e);
                    if last.is_auth() {
                        return Err(last);
                    }
                }
            }
        }
    }

    /// A cluster: the next connection attempt goes to the next broker of
    /// the endpoint's list (the one in use could not be reached or went
    /// away).
    fn next_broker(&mut self) {
        if !self.brokers.failover.advance() {
            return;
        }
        if let Ok(options) = self.brokers.options() {
            self.events.mqtt_options = options;
            self.address = self.brokers.endpoint.address_at(self.brokers.failover.current());
        }
    }

    /// Seals the command for the targets `which`, spread over the cores
    /// (one RSA signature each).
    #[allow(clippy::type_complexity)]
    fn seal_all(
        &self,
        ts: &[Exchange<'_>],
        which: &[usize],
        request: &Request,
        call: &Call<'_>,
    ) -> Vec<(usize, Result<SealedOut, String>)> {
        let pending: Vec<(usize, &Exchange<'_>)> = which.iter().filter_map(|&i| Some((i, ts.get(i)?))).collect();
        let unix = unix_now();
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(pending.len().max(1));
        let chunk = pending.len().div_ceil(workers).max(1);
        let key = &self.key;
        std::thread::scope(|s| {
            let handles: Vec<_> = pending
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|(i, t)| (*i, seal(key, t.device(), t.keys(), request, call, unix)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        })
    }

    /// [`subscribe`](Self::subscribe), reconnecting (within `deadline`)
    /// and starting over when the connection drops on the way: a clean
    /// session loses its subscriptions with the connection. Returns the
    /// devices the broker refused.
    async fn subscribe_through(&mut self, w: Wanted<'_>, deadline: Instant) -> Result<HashSet<String>, SessionError> {
        loop {
            match self.subscribe(w, deadline).await {
                Err(lost @ SessionError::Unreachable { .. }) if Instant::now() < deadline => {
                    self.reconnect(deadline, lost).await?;
                    self.subscribed.clear();
                }
                other => return other,
            }
        }
    }

    /// Subscribes to the response (and challenge, and if asked status)
    /// topics of every device not yet covered on this connection; returns
    /// the devices whose filters the broker refused (the controller is not
    /// granted them).
    async fn subscribe(&mut self, w: Wanted<'_>, deadline: Instant) -> Result<HashSet<String>, SessionError> {
        let Wanted { devices, mode, status } = w;
        let mut channels: Vec<Channel> = match mode {
            Mode::Sealed => vec![Channel::Response],
            Mode::Challenge => vec![Channel::Response, Channel::Challenge],
        };
        if status {
            channels.push(Channel::Status);
        }
        let wildcard = |c: &Channel| format!("{}+/{}", mqseal_proto::topic::ROOT, c.suffix());
        if channels.iter().all(|c| self.subscribed.contains(&wildcard(c))) {
            return Ok(HashSet::new());
        }
        if devices.len() > WILDCARD_ABOVE {
            let filters: Vec<SubscribeFilter> =
                channels.iter().map(|c| SubscribeFilter::new(wildcard(c), QoS::AtLeastOnce)).collect();
            if self.subscribe_batches(vec![filters], deadline).await?.first().is_some_and(|ok| *ok) {
                self.subscribed.extend(channels.iter().map(wildcard));
                return Ok(HashSet::new());
            }
        }
        let mut wanted: Vec<(String, String)> = Vec::new();
        for d in devices {
            for c in &channels {
                if let Ok(f) = topic(d, *c)
                    && !self.subscribed.contains(f.as_str())
                {
                    wanted.push((d.clone(), f.to_string()));
                }
            }
        }
        let mut refused = HashSet::new();
        if wanted.is_empty() {
            return Ok(refused);
        }
        let groups: Vec<Vec<(String, String)>> = wanted.chunks(FILTERS_PER_SUBSCRIBE).map(<[_]>::to_vec).collect();
        let batches = groups
            .iter()
            .map(|g| g.iter().map(|(_, f)| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)).collect())
            .collect();
        let results = self.subscribe_batches(batches, deadline).await?;
        for (group, ok) in groups.into_iter().zip(results) {
            for (device, filter) in group {
                if ok {
                    self.subscribed.insert(filter);
                } else {
                    refused.insert(device);
                }
            }
        }
        Ok(refused)
    }

    /// Sends each batch as one SUBSCRIBE; returns per batch whether every
    /// filter in it was granted.
    async fn subscribe_batches(
        &mut self,
        batches: Vec<Vec<SubscribeFilter>>,
        deadline: Instant,
    ) -> Result<Vec<bool>, SessionError> {
        let n = batches.len();
        let mut results = vec![false; n];
        let mut pkids: VecDeque<usize> = VecDeque::new();
        let mut by_pkid: HashMap<u16, usize> = HashMap::new();
        let mut queue: VecDeque<(usize, Vec<SubscribeFilter>)> = batches.into_iter().enumerate().collect();
        let mut acked = 0;
        while acked < n {
            while let Some((i, filters)) = queue.pop_front() {
                match self.client.try_subscribe_many(filters.clone()) {
                    Ok(()) => pkids.push_back(i),
                    Err(_) => {
                        queue.push_front((i, filters));
                        break;
                    }
                }
            }
            let event = match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Err(_) => {
                    return Err(SessionError::Unreachable {
                        address: self.address.clone(),
                        error: "no SUBACK in time".into(),
                    });
                }
                Ok(Err(e)) => return Err(connection_error(&self.address, e)),
                Ok(Ok(ev)) => ev,
            };
            match event {
                Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                    if let Some(i) = pkids.pop_front() {
                        by_pkid.insert(pkid, i);
                    }
                }
                Event::Incoming(Packet::SubAck(ack)) => {
                    if let Some(i) = by_pkid.remove(&ack.pkid)
                        && let Some(r) = results.get_mut(i)
                    {
                        *r = ack.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                        acked += 1;
                    }
                }
                Event::Incoming(Packet::Publish(p)) => self.hold(p),
                _ => {}
            }
        }
        Ok(results)
    }

    fn hold(&mut self, p: rumqttc::Publish) {
        if self.held.len() < HELD_MAX {
            self.held.push_back(p);
        } else {
            self.held_dropped += 1;
        }
    }

    /// The next event: a held publish first, else the connection's, until
    /// `until` (`None` then).
    ///
    /// # Errors
    /// The connection's error.
    async fn next_event(&mut self, until: Instant) -> Result<Option<Event>, ConnectionError> {
        if let Some(p) = self.held.pop_front() {
            return Ok(Some(Event::Incoming(Packet::Publish(p))));
        }
        match tokio::time::timeout_at(until, self.events.poll()).await {
            Err(_) => Ok(None),
            Ok(r) => r.map(Some),
        }
    }

    /// Publishes lost because too many arrived while waiting for SUBACKs.
    pub fn held_dropped(&self) -> u64 {
        self.held_dropped
    }

    /// Hands queued publishes to the client until its channel is full.
    fn drain(&self, queue: &mut VecDeque<(String, Vec<u8>)>) {
        while let Some((topic, payload)) = queue.pop_front() {
            if let Err(rumqttc::ClientError::TryRequest(rumqttc::Request::Publish(p))) =
                self.client.try_publish(&topic, QoS::AtLeastOnce, false, payload)
            {
                queue.push_front((topic, p.payload.to_vec()));
                return;
            }
        }
    }

    /// Subscribes to `filters` and collects retained messages for up to
    /// `wait` or until `expected` have arrived (for `device list`).
    ///
    /// # Errors
    /// [`SessionError`] if the connection is lost.
    pub async fn collect_retained(
        &mut self,
        filters: Vec<String>,
        expected: usize,
        wait: Duration,
    ) -> Result<HashMap<String, Vec<u8>>, SessionError> {
        let deadline = Instant::now() + wait;
        let batches: Vec<Vec<SubscribeFilter>> = filters
            .chunks(FILTERS_PER_SUBSCRIBE)
            .map(|c| c.iter().map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)).collect())
            .collect();
        self.subscribe_batches(batches, deadline).await?;
        let mut seen = HashMap::new();
        while seen.len() < expected {
            match self.next_event(deadline).await {
                Ok(None) => break,
                Err(e) => return Err(connection_error(&self.address, e)),
                Ok(Some(Event::Incoming(Packet::Publish(p)))) => {
                    seen.insert(p.topic.clone(), p.payload.to_vec());
                }
                Ok(Some(_)) => {}
            }
        }
        Ok(seen)
    }

    /// Disconnects cleanly (best effort, bounded).
    pub async fn close(mut self) {
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(ev) = self.events.poll().await {
                if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Polls until the broker's CONNACK.
async fn first_connack(events: &mut EventLoop) -> Result<(), ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await? {
            return Ok(());
        }
    }
}

fn connection_error(address: &str, e: ConnectionError) -> SessionError {
    match e {
        ConnectionError::ConnectionRefused(code) => SessionError::Refused {
            address: address.to_owned(),
            code: match code {
                ConnectReturnCode::BadUserNamePassword => "bad user name or password".into(),
                ConnectReturnCode::NotAuthorized => "not authorized".into(),
                ConnectReturnCode::ServiceUnavailable => "server unavailable".into(),
                other => format!("{other:?}"),
            },
        },
        other => SessionError::Unreachable { address: address.to_owned(), error: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The soak lost a batch of commands to challenges that had expired on
    /// the devices: the controller dated each from when it *read* it, after
    /// an idle gap, and kept only 1 s of margin. Dated from the request and
    /// kept for half the lifetime, a challenge read 29 s after it was
    /// requested (30 s lifetime) is not used.
    #[test]
    fn a_prefetched_challenge_is_used_only_early_in_its_life() {
        assert!(offer_usable(Duration::from_secs(10), 30_000));
        assert!(!offer_usable(Duration::from_secs(15), 30_000));
        assert!(!offer_usable(Duration::from_secs(29), 30_000), "the old rule (ttl - 1 s from reading) took this");
        assert!(!offer_usable(Duration::from_millis(800), 1_500));
    }
}
