//! The signalling service: routes clients' signals to their peers (a socket on this instance, else
//! Matrix), hands signals that arrive through Matrix to connected clients, and pushes presence to
//! the sockets that watch an address.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hashlink::LruCache;
use serde_json::Value;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dialect::{self, Dialect};
use super::hub::{Hub, Outbox};
use super::protocol::{ErrorCode, IceServers, ServerFrame, Via};
use super::{EventType, Signal};
use crate::appservice::inbox::Subscription;
use crate::calls::{Calls, Counted, EventKind, Glare, Ignored, Verdict};
use crate::clock::Clock;
use crate::cluster::{Cluster, Message};
use crate::config::{Config, Secret, SignallingConfig};
use crate::directory::identity::Address;
use crate::directory::service::DirectoryService;
use crate::homeserver::HomeserverClient;
use crate::http::Auth;
use crate::telemetry::{CodeLabel, Metrics, OutcomeLabel, TableLabel, ViaLabel};

/// The consumer name of the signalling service in the inbox.
pub const CONSUMER: &str = "signalling";

/// How long a signal waits for the peer's socket to write it before Matrix carries it instead.
const RELAY_WAIT: Duration = Duration::from_secs(5);

/// Signals that arrived through Matrix longer ago than this are not handed to sockets (a client
/// connecting after an outage does not get stale invites; its own `/sync` has them anyway).
const MATRIX_MAX_AGE_MS: i64 = 120_000;

/// The dialect each Matrix-only peer last used, remembered for this many users.
const DIALECTS_REMEMBERED: usize = 100_000;

/// The content key that marks Switchboard's own to-device sends, so that their echo in the
/// appservice stream is recognised; its value is `<server name>/<instance name>`, so that another
/// instance (which did not relay it) still hands it to a socket of its own.
pub const ORIGIN_KEY: &str = "org.switchboard.origin";

/// What the service is configured with.
pub struct Settings {
    pub limits: SignallingConfig,
    /// The call broker's.
    pub calls: crate::calls::Settings,
    /// `<server name>/<instance name>`: the value of [`ORIGIN_KEY`] on this instance's sends.
    pub origin: String,
    /// TURN: the secret credentials are minted with, the URIs, the credentials' lifetime.
    pub turn: Option<(Secret, Vec<String>, u64)>,
}

impl Settings {
    pub fn from_config(config: &Config, turn_uris: Vec<String>) -> Self {
        let turn = config
            .turn
            .shared_secret
            .clone()
            .filter(|_| config.turn.mode != crate::config::TurnMode::Off && !turn_uris.is_empty())
            .map(|secret| (secret, turn_uris, config.turn.user_lifetime_secs));
        Self {
            limits: config.signalling.clone(),
            calls: config.calls.broker(),
            origin: format!("{}/{}", config.homeserver.server_name, config.database.instance_name),
            turn,
        }
    }
}

pub struct Signalling {
    pub hub: Hub,
    pub directory: Arc<DirectoryService>,
    pub homeserver: Arc<HomeserverClient>,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    pub settings: Settings,
    /// Socket tasks and offline grace periods; waited for at shutdown.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    dialects: Mutex<LruCache<Box<str>, Dialect>>,
    /// The call broker; locked before `held` when both are.
    calls: Mutex<Calls>,
    /// Woken when the broker's next timeout may have moved.
    calls_changed: Notify,
    /// Who waits for each held candidates signal, per call, in the broker's order: the socket and
    /// the frame's `id` (`None`: it came through Matrix, nobody waits).
    held: Mutex<HashMap<String, VecDeque<Waiting>>>,
    pub cluster: Cluster,
    /// A forwarding task per user with a socket here, subscribed to the user's channel: signals
    /// that other instances route to this user.
    routes: Mutex<HashMap<Arc<str>, tokio::task::AbortHandle>>,
    /// Signals sent to another instance, waiting for its answer, by id.
    crossing: Mutex<HashMap<u64, oneshot::Sender<bool>>>,
    next_crossing: AtomicU64,
    /// Transaction ids of signals recently handed over from Matrix: a to-device message sent to
    /// every device of a user reaches the appservice once per device, and is delivered once.
    from_matrix_seen: Mutex<LruCache<String, ()>>,
    /// The other member of two-member rooms that carried call events, by room and sender.
    room_peers: Mutex<LruCache<String, Option<String>>>,
}

/// What the signalling service is built from.
pub struct Parts {
    pub directory: Arc<DirectoryService>,
    pub homeserver: Arc<HomeserverClient>,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    pub cluster: Cluster,
    pub shutdown: CancellationToken,
}

/// A signal on its way to the instance where its recipient has a socket (Redis pub/sub, channel
/// [`user_channel`]); that instance answers on the sender instance's [`instance_channel`].
#[derive(serde::Serialize, serde::Deserialize)]
struct Crossing {
    id: u64,
    reply_to: String,
    from_user: String,
    from_device: Option<String>,
    to_user: String,
    call_id: String,
    event_type: String,
    content: serde_json::Map<String, Value>,
}

/// What other instances send on a user's channel ([`user_channel`]).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToUser {
    /// A signal for the user's sockets, to be answered with [`Crossed`].
    Signal(Crossing),
    /// The user's peer in `call_id` reported its data channel open on another instance: the
    /// brokers of both instances follow the call and need both reports.
    PeerConnected { user_id: String, call_id: String },
}

/// The answer to a [`Crossing`]: whether a socket of the recipient wrote it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Crossed {
    id: u64,
    written: bool,
}

fn user_channel(user_id: &str) -> String {
    format!("signal.user.{user_id}")
}

fn instance_channel(instance: &str) -> String {
    format!("signal.instance.{instance}")
}

/// Who waits for a held signal: its socket and the frame's `id` (`None`: it came through Matrix).
type Waiting = Option<(Outbox, Option<Value>)>;

/// `GET /rooms/{roomId}/joined_members`, as far as we read it.
#[derive(serde::Deserialize)]
struct JoinedMembers {
    joined: serde_json::Map<String, Value>,
}

/// Rooms whose other member is remembered (call events in rooms: Raiden's light client of 2020).
const ROOMS_REMEMBERED: usize = 1_000;

/// Matrix-borne signals remembered to drop their copies (one per recipient device).
const MATRIX_SEEN_REMEMBERED: usize = 10_000;

/// What became of a client's signal.
pub enum Submitted {
    Delivered(Via),
    /// Held by the broker until its call's invite is delivered; `delivered` (or an error) follows.
    Held,
}

/// Why a signal was not delivered, for the `error` frame.
pub struct Undelivered {
    pub code: ErrorCode,
    pub message: String,
}

impl Signalling {
    pub fn new(settings: Settings, parts: Parts) -> Arc<Self> {
        let Parts { directory, homeserver, auth, metrics, clock, cluster, shutdown } = parts;
        let calls = settings.calls.clone();
        Arc::new(Self {
            hub: Hub::new(settings.limits.max_connections, settings.limits.max_connections_per_user),
            directory,
            homeserver,
            auth,
            metrics,
            clock,
            settings,
            tasks: TaskTracker::new(),
            shutdown,
            dialects: Mutex::new(LruCache::new(DIALECTS_REMEMBERED)),
            calls: Mutex::new(Calls::new(calls)),
            calls_changed: Notify::new(),
            held: Mutex::new(HashMap::new()),
            from_matrix_seen: Mutex::new(LruCache::new(MATRIX_SEEN_REMEMBERED)),
            room_peers: Mutex::new(LruCache::new(ROOMS_REMEMBERED)),
            cluster,
            routes: Mutex::new(HashMap::new()),
            crossing: Mutex::new(HashMap::new()),
            next_crossing: AtomicU64::new(1),
        })
    }

    /// A user has its first socket here: signals other instances route to it are taken from its
    /// channel (subscribed before this returns, or after 1 s without Redis' confirmation).
    pub async fn user_joined(self: &Arc<Self>, user_id: &Arc<str>) {
        let channel = user_channel(user_id);
        {
            let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
            if routes.contains_key(user_id) {
                return;
            }
            let mut subscription = self.cluster.subscribe(&channel);
            let service = self.clone();
            let task = self.tasks.spawn(async move {
                while let Some(message) = subscription.next().await {
                    if let Message::Payload(bytes) = message {
                        service.accept_from_channel(&bytes).await;
                    }
                }
            });
            routes.insert(user_id.clone(), task.abort_handle());
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.cluster.subscribed(&channel)).await;
    }

    /// A socket of `user_id` closed: when it was the last one here, its channel is left.
    pub fn user_left(&self, user_id: &str) {
        if self.hub.is_connected(user_id) {
            return;
        }
        if let Some(task) = self.routes.lock().unwrap_or_else(PoisonError::into_inner).remove(user_id) {
            task.abort();
        }
    }

    /// Takes what another instance sent on a user's channel: a signal for its sockets, or a peer's
    /// `connected` report.
    async fn accept_from_channel(&self, bytes: &[u8]) {
        match serde_json::from_slice::<ToUser>(bytes) {
            Ok(ToUser::Signal(crossing)) => self.accept_crossing(crossing).await,
            Ok(ToUser::PeerConnected { user_id, call_id }) => self.record_connected(&user_id, &call_id),
            Err(error) => tracing::warn!(%error, "signalling.cluster: unreadable message on a user channel"),
        }
    }

    /// Hands a signal that another instance routed here to the recipient's sockets, and answers.
    /// The sender's instance judged it and counts its call; the broker here follows the call too
    /// (the callee's answer and `connected` report are judged here), so it sees the signal first.
    async fn accept_crossing(&self, crossing: Crossing) {
        let Some(event_type) = EventType::parse(&crossing.event_type) else { return };
        let signal = Signal {
            from_user: crossing.from_user,
            from_device: crossing.from_device,
            to_user: crossing.to_user,
            call_id: crossing.call_id,
            event_type,
            content: crossing.content,
        };
        let verdict = {
            let mut calls = self.calls();
            let verdict = calls.signal_counted(self.now_ms(), &signal, Counted::Elsewhere);
            self.drain_events(&mut calls, false);
            verdict
        };
        self.calls_changed.notify_one();
        if let Verdict::Glare(glare) = &verdict {
            self.tell_glare(&signal, glare);
        }
        // Held candidates would be routed once their invite is delivered, which already happened
        // on the sender's side: deliver them now, as every other verdict (the sender's broker,
        // which saw the whole call, let the signal through).
        let written = self.relay(&signal, Via::Relay).await;
        // Not written: the sender's instance sends it through Matrix, and the copy that comes back
        // through the inbox settles the invite here.
        if signal.event_type == EventType::Invite && written {
            self.settle_invite(&signal.call_id, true).await;
        }
        let answer = serde_json::to_vec(&Crossed { id: crossing.id, written }).unwrap_or_default();
        if let Err(error) = self.cluster.publish(&instance_channel(&crossing.reply_to), answer.into()).await {
            tracing::warn!(%error, "signalling.cluster: could not answer a relayed signal");
        }
    }

    /// Takes the answers of other instances to the signals this one sent them, until `shutdown`.
    pub async fn take_answers(self: Arc<Self>, shutdown: CancellationToken) {
        let mut answers = self.cluster.subscribe(&instance_channel(self.cluster.instance()));
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
                message = answers.next() => message,
            };
            match message {
                Some(Message::Payload(bytes)) => {
                    if let Ok(crossed) = serde_json::from_slice::<Crossed>(&bytes)
                        && let Some(waiting) =
                            self.crossing.lock().unwrap_or_else(PoisonError::into_inner).remove(&crossed.id)
                    {
                        let _ = waiting.send(crossed.written);
                    }
                }
                Some(Message::Lost) => {}
                None => return,
            }
        }
    }

    /// Routes `signal` to a socket of its recipient on another instance (through Redis); true once
    /// that instance says a socket wrote it. False when no instance has the recipient, Redis is
    /// down, or no answer came within [`RELAY_WAIT`].
    async fn relay_elsewhere(&self, signal: &Signal) -> bool {
        if !self.cluster.is_up() {
            self.metrics.signalling.cluster_fallbacks.inc();
            return false;
        }
        let id = self.next_crossing.fetch_add(1, Ordering::Relaxed);
        let crossing = Crossing {
            id,
            reply_to: self.cluster.instance().to_owned(),
            from_user: signal.from_user.clone(),
            from_device: signal.from_device.clone(),
            to_user: signal.to_user.clone(),
            call_id: signal.call_id.clone(),
            event_type: signal.event_type.as_str().to_owned(),
            content: signal.content.clone(),
        };
        let (answered, answer) = oneshot::channel();
        self.crossing.lock().unwrap_or_else(PoisonError::into_inner).insert(id, answered);
        let forget = || self.crossing.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
        let payload = serde_json::to_vec(&ToUser::Signal(crossing)).unwrap_or_default();
        match self.cluster.publish(&user_channel(&signal.to_user), payload.into()).await {
            Ok(0) => {
                forget();
                return false;
            }
            Ok(_) => {}
            Err(error) => {
                forget();
                tracing::warn!(%error, "signalling.cluster: Redis unavailable; the signal goes through Matrix");
                self.metrics.signalling.cluster_fallbacks.inc();
                return false;
            }
        }
        let written = tokio::select! {
            answer = answer => answer.unwrap_or(false),
            () = self.clock.sleep(RELAY_WAIT) => false,
        };
        forget();
        written
    }

    fn calls(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, VecDeque<Waiting>>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        self.clock.unix_millis_u64()
    }

    /// A client's signal: judged by the call broker, then routed. `waiting` is the socket that sent
    /// it and the frame's `id`, told later when the signal is held.
    pub async fn submit(
        &self,
        signal: &Signal,
        waiting: (Outbox, Option<Value>),
    ) -> Result<Submitted, Undelivered> {
        let verdict = {
            let mut calls = self.calls();
            let verdict = calls.signal(self.now_ms(), signal);
            if verdict == Verdict::Hold {
                self.held().entry(signal.call_id.clone()).or_default().push_back(Some(waiting));
            }
            self.drain_events(&mut calls, false);
            verdict
        };
        self.calls_changed.notify_one();
        let stopped = |code: &'static str| {
            self.metrics.calls.stopped.get_or_create(&CodeLabel { code }).inc();
        };
        match verdict {
            Verdict::Forward => self.forward(signal).await.map(Submitted::Delivered),
            Verdict::Hold => Ok(Submitted::Held),
            Verdict::Ignore(ignored) => {
                stopped(ignored.as_str());
                let (code, message) = match ignored {
                    Ignored::Duplicate => {
                        (ErrorCode::Duplicate, "this signal was already delivered in this call")
                    }
                    Ignored::Late => (ErrorCode::Late, "this call has ended"),
                };
                Err(Undelivered { code, message: message.into() })
            }
            Verdict::Refused(refused) => {
                stopped(refused.code());
                Err(Undelivered {
                    code: ErrorCode::Refused,
                    message: format!("{}: {}", refused.code(), refused.message()),
                })
            }
            Verdict::Glare(glare) => {
                self.tell_glare(signal, &glare);
                if glare.forward {
                    self.forward(signal).await.map(Submitted::Delivered)
                } else {
                    stopped("glare");
                    Err(Undelivered {
                        code: ErrorCode::Glare,
                        message: format!("glare: call {} goes on instead", glare.won_call_id),
                    })
                }
            }
        }
    }

    /// Routes a signal the broker let through; for an invite, then routes (or refuses) the
    /// candidates held for its call and tells their senders.
    async fn forward(&self, signal: &Signal) -> Result<Via, Undelivered> {
        let result = self.deliver(signal).await;
        if signal.event_type == EventType::Invite {
            self.settle_invite(&signal.call_id, result.is_ok()).await;
        }
        result
    }

    /// Tells the broker whether an invite reached its callee, and routes what it held.
    async fn settle_invite(&self, call_id: &str, delivered: bool) {
        let (released, waiting) = {
            let mut calls = self.calls();
            let now_ms = self.now_ms();
            let released = if delivered {
                calls.invite_delivered(now_ms, call_id)
            } else {
                calls.invite_failed(now_ms, call_id)
            };
            let waiting = self.held().remove(call_id).unwrap_or_default();
            self.drain_events(&mut calls, false);
            (released, waiting)
        };
        self.calls_changed.notify_one();
        for (signal, waiting) in released.into_iter().zip(waiting) {
            let answer = if delivered {
                match self.deliver(&signal).await {
                    Ok(via) => ServerFrame::Delivered { reference: None, via },
                    Err(undelivered) => ServerFrame::error(undelivered.code, undelivered.message, None),
                }
            } else {
                ServerFrame::error(ErrorCode::Undeliverable, "the call's invite could not be delivered", None)
            };
            if let Some((outbox, reference)) = waiting {
                outbox.push(with_reference(answer, reference).to_text().into(), None);
            }
        }
    }

    /// A client reports its data channel for `call_id` open. When the other user of the call has
    /// no socket here, its instance (if another has it) hears of the report too.
    pub async fn connected(&self, user_id: &str, call_id: &str) {
        let other = self.calls().other_user(call_id, user_id);
        self.record_connected(user_id, call_id);
        let Some(other) = other else { return };
        if self.hub.is_connected(&other) || !self.cluster.is_up() {
            return;
        }
        let report = ToUser::PeerConnected { user_id: user_id.to_owned(), call_id: call_id.to_owned() };
        let payload = serde_json::to_vec(&report).unwrap_or_default();
        if let Err(error) = self.cluster.publish(&user_channel(&other), payload.into()).await {
            tracing::warn!(%error, "signalling.cluster: could not pass a connected report on");
        }
    }

    fn record_connected(&self, user_id: &str, call_id: &str) {
        let mut calls = self.calls();
        calls.connected(self.now_ms(), user_id, call_id);
        self.drain_events(&mut calls, false);
        drop(calls);
        self.calls_changed.notify_one();
    }

    /// Tells both users of a glare which call lost and which goes on.
    fn tell_glare(&self, signal: &Signal, glare: &Glare) {
        for lost in &glare.lost_call_ids {
            let frame: Arc<str> =
                ServerFrame::Glare { call_id: lost.clone(), winner: glare.won_call_id.clone() }
                    .to_text()
                    .into();
            for user in [&signal.from_user, &signal.to_user] {
                for socket in self.hub.sockets_of(user) {
                    socket.push(frame.clone(), None);
                }
            }
        }
    }

    /// Records the broker's events in the metrics; calls that end drop what they held (their
    /// senders are told); with `notify` (the broker's own timeouts), both users hear of the end.
    fn drain_events(&self, calls: &mut Calls, notify: bool) {
        let metrics = &self.metrics.calls;
        while let Some(event) = calls.poll_event() {
            match event.kind {
                EventKind::Started => {
                    if event.counted {
                        metrics.started.inc();
                    }
                }
                EventKind::Connected { upgrade_ms } => {
                    if event.counted {
                        metrics.connected.inc();
                        metrics.upgrade_seconds.observe(Duration::from_millis(upgrade_ms).as_secs_f64());
                    }
                }
                EventKind::Ended { outcome } => {
                    if event.counted {
                        metrics.ended.get_or_create(&OutcomeLabel { outcome: outcome.as_str() }).inc();
                    }
                    for (outbox, reference) in
                        self.held().remove(&event.call_id).into_iter().flatten().flatten()
                    {
                        let error = ServerFrame::error(
                            ErrorCode::Late,
                            "the call ended before its invite was delivered",
                            reference,
                        );
                        outbox.push(error.to_text().into(), None);
                    }
                    if notify {
                        let frame: Arc<str> = ServerFrame::CallEnded {
                            call_id: event.call_id.clone(),
                            outcome: outcome.as_str(),
                        }
                        .to_text()
                        .into();
                        for user in [&event.caller, &event.callee] {
                            for socket in self.hub.sockets_of(user) {
                                socket.push(frame.clone(), None);
                            }
                        }
                    }
                }
            }
        }
        metrics.live.set(i64::try_from(calls.live_calls()).unwrap_or(i64::MAX));
        metrics.established.set(i64::try_from(calls.established_calls()).unwrap_or(i64::MAX));
    }

    /// Runs the broker's timeouts (invite expiry, connect timeout, forgetting) on the clock, until
    /// `shutdown`.
    pub async fn run_calls(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = self.calls().poll_timeout();
            let due = async {
                match next {
                    Some(at_ms) => {
                        self.clock.sleep(Duration::from_millis(at_ms.saturating_sub(self.now_ms()))).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.calls_changed.notified() => {}
                () = due => {
                    let mut calls = self.calls();
                    calls.handle_timeout(self.now_ms());
                    self.drain_events(&mut calls, true);
                }
            }
        }
    }

    /// Fresh TURN credentials for `user_id`, when TURN is configured.
    pub fn ice_servers(&self, user_id: &str) -> Option<IceServers> {
        let (secret, uris, lifetime) = self.settings.turn.as_ref()?;
        let minted = crate::turn::credentials::mint(
            secret.expose().as_bytes(),
            user_id,
            self.clock.unix_secs(),
            *lifetime,
        );
        Some(IceServers {
            uris: uris.clone(),
            username: minted.username,
            password: minted.password,
            ttl: minted.ttl,
        })
    }

    /// The checksummed address `user_id` provably holds, if the directory has verified it.
    pub fn verified_address(&self, user_id: &str) -> Option<String> {
        let directory = self.directory.read();
        let user = directory.user(user_id)?;
        user.verified.then(|| user.address.to_checksum())
    }

    /// The users a signal for `to` (an address or a user id) goes to: for an address, its users
    /// whose displayname proves they hold it (connected ones here first, else the best reachable).
    pub async fn recipient(&self, to: &str) -> Result<String, Undelivered> {
        if to.starts_with('@') {
            return match ruma::UserId::parse(to) {
                Ok(user_id) => Ok(user_id.to_string()),
                Err(_) => {
                    Err(Undelivered { code: ErrorCode::Invalid, message: "to: not a valid user id".into() })
                }
            };
        }
        let address = Address::parse(to).map_err(|e| Undelivered {
            code: ErrorCode::Invalid,
            message: format!("to: neither a user id nor an address ({e})"),
        })?;
        if let Some(user_id) = self.pick(&address) {
            return Ok(user_id);
        }
        self.directory.discover(&address).await;
        self.pick(&address).ok_or_else(|| Undelivered {
            code: ErrorCode::UnknownPeer,
            message: "no user is known to hold this address".into(),
        })
    }

    fn pick(&self, address: &Address) -> Option<String> {
        let directory = self.directory.read();
        let verified: Vec<&str> =
            directory.users_of(address).into_iter().filter(|u| u.verified).map(|u| &*u.user_id).collect();
        if let Some(connected) = verified.iter().find(|user_id| self.hub.is_connected(user_id)) {
            return Some((*connected).to_owned());
        }
        directory
            .best(address)
            .map(|user| user.user_id.to_string())
            .or_else(|| verified.first().map(|u| (*u).to_owned()))
    }

    /// Delivers `signal` (from a client of this instance) to its recipient: its socket when it has
    /// one here, else through Matrix. Returns the path once the peer's socket has written it or the
    /// homeserver has accepted it.
    pub async fn deliver(&self, signal: &Signal) -> Result<Via, Undelivered> {
        let started = self.clock.now();
        let via = if self.relay(signal, Via::Relay).await || self.relay_elsewhere(signal).await {
            Via::Relay
        } else {
            self.send_matrix(signal).await?;
            Via::Matrix
        };
        let label = ViaLabel { via: if via == Via::Relay { "relay" } else { "matrix" } };
        self.metrics.signalling.signals_sent.get_or_create(&label).inc();
        let elapsed = self.clock.now().saturating_duration_since(started);
        self.metrics.signalling.delivery_seconds.get_or_create(&label).observe(elapsed.as_secs_f64());
        Ok(via)
    }

    /// Hands `signal` to every socket of its recipient on this instance; true once one has written
    /// it (within [`RELAY_WAIT`]), or, for a signal from Matrix, once one has queued it.
    async fn relay(&self, signal: &Signal, via: Via) -> bool {
        let sockets = self.hub.sockets_of(&signal.to_user);
        if sockets.is_empty() {
            return false;
        }
        let frame: Arc<str> = ServerFrame::Signal {
            from: signal.from_user.clone(),
            from_address: self.verified_address(&signal.from_user),
            from_device: signal.from_device.clone(),
            call_id: signal.call_id.clone(),
            event_type: signal.event_type,
            content: signal.content.clone(),
            via,
        }
        .to_text()
        .into();
        if via == Via::Matrix {
            // Nobody waits for a signal from Matrix (its sender's client runs its own), and the
            // inbox must not stall on a recipient that stopped reading: queue it and go on.
            let queued = sockets.iter().filter(|socket| socket.push(frame.clone(), None)).count();
            return queued > 0;
        }
        let mut written = Vec::with_capacity(sockets.len());
        for socket in &sockets {
            let (done, wait) = oneshot::channel();
            if socket.push(frame.clone(), Some(done)) {
                written.push(wait);
            }
        }
        if written.is_empty() {
            return false;
        }
        let any_written = async {
            let mut pending = written;
            while !pending.is_empty() {
                let (result, _, rest) = futures_util::future::select_all(pending).await;
                if result.is_ok() {
                    return true;
                }
                pending = rest;
            }
            false
        };
        tokio::select! {
            written = any_written => written,
            () = self.clock.sleep(RELAY_WAIT) => false,
        }
    }

    /// Sends `signal` as a to-device message from its sender, in the dialect its recipient speaks.
    async fn send_matrix(&self, signal: &Signal) -> Result<(), Undelivered> {
        let undeliverable = |message: String| Undelivered { code: ErrorCode::Undeliverable, message };
        let dialect = self.dialect_of(&signal.to_user);
        let Some(mut message) = dialect::to_device(signal, dialect) else {
            return Err(undeliverable(format!(
                "the peer's client cannot receive {} over Matrix",
                signal.event_type
            )));
        };
        if let Value::Object(content) = &mut message.content {
            content.insert(ORIGIN_KEY.to_owned(), Value::String(self.settings.origin.clone()));
        }
        let (Ok(from), Ok(device)) = (
            ruma::UserId::parse(&signal.from_user),
            signal.from_device.as_deref().map(ruma::OwnedDeviceId::from).ok_or(()),
        ) else {
            return Err(undeliverable("the sender has no device to send from".into()));
        };
        let body = serde_json::json!({ "messages": { &signal.to_user: { "*": message.content } } });
        let request = self
            .homeserver
            .request_as(
                reqwest::Method::PUT,
                &["_matrix", "client", "v3", "sendToDevice", message.event_type, &message.txn_id],
                &from,
                Some(&device),
            )
            .json(&body);
        match self.homeserver.send::<Value>(request).await {
            Ok(_) => Ok(()),
            Err(error) => {
                tracing::warn!(%error, "signalling.matrix: to-device send failed");
                self.metrics.signalling.signals_sent.get_or_create(&ViaLabel { via: "failed" }).inc();
                Err(undeliverable("the homeserver did not take the signal".into()))
            }
        }
    }

    /// The dialect to use towards `user_id`: the one it last used towards us, else what its
    /// capabilities say.
    fn dialect_of(&self, user_id: &str) -> Dialect {
        let last_seen = self.dialects.lock().unwrap_or_else(PoisonError::into_inner).get(user_id).copied();
        let directory = self.directory.read();
        let capabilities = directory.user(user_id).and_then(|user| user.capabilities());
        dialect::dialect_for(last_seen, capabilities)
    }

    /// Hands signals that arrive through Matrix (to-device, in either dialect) to their recipients'
    /// sockets on this instance, until `shutdown`. Switchboard's own sends, seen again, are skipped.
    pub async fn consume(self: Arc<Self>, mut inbox: Subscription, shutdown: CancellationToken) {
        loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => return,
                batch = inbox.next() => batch,
            };
            let items = match batch {
                Ok(items) if items.is_empty() => return,
                Ok(items) => items,
                Err(error) => {
                    tracing::warn!(%error, "signalling.inbox: reading the inbox failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = self.clock.sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let now_ms = self.clock.unix_millis();
            for item in &items {
                if item.stored_at != 0 && now_ms - item.stored_at > MATRIX_MAX_AGE_MS {
                    continue;
                }
                let Some(mut incoming) = dialect::from_item(item) else { continue };
                if incoming.signal.to_user.is_empty() {
                    // A room call event that names no invitee: its callee is the room's other member.
                    let dialect::Route::Room { room_id } = &incoming.route else { continue };
                    let Some(peer) = self.room_peer(&incoming.signal.from_user, room_id).await else {
                        continue;
                    };
                    incoming.signal.to_user = peer;
                }
                if incoming.origin.as_deref() == Some(self.settings.origin.as_str()) {
                    self.metrics.signalling.echoes_dropped.inc();
                    continue;
                }
                {
                    let mut dialects = self.dialects.lock().unwrap_or_else(PoisonError::into_inner);
                    dialects.insert(incoming.signal.from_user.clone().into_boxed_str(), incoming.dialect);
                    self.remembered("dialects", dialects.len());
                }
                let first_copy = {
                    let mut seen = self.from_matrix_seen.lock().unwrap_or_else(PoisonError::into_inner);
                    let first = seen.insert(incoming.txn_id.clone(), ()).is_none();
                    self.remembered("matrix_copies", seen.len());
                    first
                };
                if first_copy {
                    self.handle_matrix_signal(&incoming.signal).await;
                }
            }
            if let Some(last) = items.last()
                && let Err(error) = inbox.ack(last.id).await
            {
                tracing::warn!(%error, "signalling.inbox: acknowledging failed");
            }
        }
    }

    /// The other member of a two-member room, asked of the homeserver as `sender` (a member) and
    /// remembered; `None` for a room of another size or when the homeserver cannot say.
    async fn room_peer(&self, sender: &str, room_id: &str) -> Option<String> {
        let key = format!("{room_id}\u{0}{sender}");
        if let Some(peer) = self.room_peers.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
            return peer.clone();
        }
        let as_user = ruma::UserId::parse(sender).ok()?;
        let request = self.homeserver.request_as(
            reqwest::Method::GET,
            &["_matrix", "client", "v3", "rooms", room_id, "joined_members"],
            &as_user,
            None,
        );
        let joined = match self.homeserver.send::<JoinedMembers>(request).await {
            Ok(joined) => joined.joined,
            Err(error) => {
                tracing::debug!(%error, "signalling.room: members unknown; the call event is not relayed");
                return None;
            }
        };
        let others: Vec<&String> = joined.keys().filter(|member| *member != sender).collect();
        let peer = match others.as_slice() {
            [peer] => Some((*peer).clone()),
            _ => None,
        };
        let mut room_peers = self.room_peers.lock().unwrap_or_else(PoisonError::into_inner);
        room_peers.insert(key, peer.clone());
        self.remembered("room_peers", room_peers.len());
        peer
    }

    /// Publishes the size of one of the bounded memories.
    fn remembered(&self, table: &'static str, len: usize) {
        let gauge = self.metrics.signalling.remembered.get_or_create(&TableLabel { table });
        gauge.set(i64::try_from(len).unwrap_or(i64::MAX));
    }

    /// A signal that arrived through Matrix: judged by the broker, then handed to the recipient's
    /// sockets here (if any). An invite that came through Matrix has reached its callee.
    async fn handle_matrix_signal(&self, signal: &Signal) {
        // Every instance reads the inbox; the one where the callee is connected counts the call.
        let counted = if self.hub.is_connected(&signal.to_user) { Counted::Here } else { Counted::Elsewhere };
        let verdict = {
            let mut calls = self.calls();
            let verdict = calls.signal_counted(self.now_ms(), signal, counted);
            if verdict == Verdict::Hold {
                self.held().entry(signal.call_id.clone()).or_default().push_back(None);
            }
            self.drain_events(&mut calls, false);
            verdict
        };
        self.calls_changed.notify_one();
        let forward = match &verdict {
            Verdict::Forward => true,
            Verdict::Glare(glare) => {
                self.tell_glare(signal, glare);
                glare.forward
            }
            Verdict::Hold | Verdict::Ignore(_) | Verdict::Refused(_) => false,
        };
        if !forward {
            return;
        }
        if self.relay(signal, Via::Matrix).await {
            self.metrics.signalling.signals_from_matrix.inc();
        }
        if signal.event_type == EventType::Invite {
            self.settle_invite(&signal.call_id, true).await;
        }
    }

    /// Pushes each change of a watched address to the sockets watching it, until `shutdown`. The
    /// cost of a change is one look-up plus one frame per watcher.
    pub async fn push_presence(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.directory.subscribe();
        loop {
            let change = tokio::select! {
                () = shutdown.cancelled() => return,
                change = changes.recv() => change,
            };
            match change {
                Ok(change) => {
                    let watchers = self.hub.watchers(&change.address);
                    if watchers.is_empty() {
                        continue;
                    }
                    let frame = self.presence_frame(&change.address);
                    for watcher in watchers {
                        watcher.push(frame.clone(), None);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    // Changes were lost: send every watched address's state again.
                    tracing::warn!(missed, "signalling.presence: fell behind the directory; resending");
                    self.resend_all_presence();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn resend_all_presence(&self) {
        for (address, watchers) in self.hub.all_watchers() {
            let frame = self.presence_frame(&address);
            for watcher in watchers {
                watcher.push(frame.clone(), None);
            }
        }
    }

    /// The `presence` frame of `address`, as text.
    pub fn presence_frame(&self, address: &Address) -> Arc<str> {
        let value =
            crate::directory::api::peer_json(&self.directory.read(), address, self.clock.unix_millis());
        ServerFrame::Presence(value).to_text().into()
    }
}

/// `frame` answering the client frame with `id` `reference`.
fn with_reference(frame: ServerFrame, reference: Option<Value>) -> ServerFrame {
    match frame {
        ServerFrame::Delivered { via, .. } => ServerFrame::Delivered { reference, via },
        ServerFrame::Error { code, message, retry_after_ms, .. } => {
            ServerFrame::Error { code, message, reference, retry_after_ms }
        }
        other => other,
    }
}
