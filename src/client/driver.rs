//! The driver: the one task that owns every peer's state ([`reliable::Peer`], its data channel, its
//! Matrix sends) and the connection to Switchboard.
//!
//! Everything that waits (HTTP requests, WebRTC set-up, signals awaiting `delivered`, data channel
//! writes) runs in small tasks of its own that report back through one bounded queue
//! ([`Internal`]); the driver itself never awaits anything but its `select!`, so no lock or borrow
//! is held across an await. Per data channel there are three such tasks: a *reader* (the link's
//! events in, the peer's signals to `handle_signal`), a *signaller* (our signals out, in order: the
//! invite or answer first) and a *writer* (frames onto the channel, with the channel's own
//! buffered-amount backpressure).
//!
//! Bounds: commands (64), the internal queue (1,024), events for the application
//! (`events_capacity`; past it the driver stops reading its transports until the application
//! catches up), frames queued per channel (64 plus one poll of at most 64 KiB), signals per link
//! (64 each way), waiting sends per peer (`max_waiting_sends`), peers (`max_peers`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ruma::to_device::DeviceIdOrAllDevices;
use ruma::{OwnedRoomId, OwnedTransactionId, OwnedUserId, UserId};
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use url::Url;

use super::matrix::{MatrixClient, MatrixError, SyncEvent, SyncHandle, SyncSettings, WhoAmI};
use super::reliable::{self, DcState, Peer, PushError, StreamId, ToDevice};
use super::rtc::{Invite, LinkEvent, LinkEvents, OutgoingSignal, Path, PeerLink, RtcConfig, RtcError};
use super::signal::Via;
use super::signal::{
    IncomingSignal, SignalConnection, SignalError, SignalEvent, SignalEvents, SignalOptions,
};
use super::{AcceptCalls, ClientConfig, ClientError, ClientEvent, Fallback, PeerStats};
use crate::clock::Clock;
use crate::directory::identity::{Address, claimed_address};
use crate::signalling::EventType;

/// Reports of the driver's tasks waiting to be handled, at most.
const INTERNAL_QUEUE: usize = 1024;
/// Frames queued for one channel's writer, at most.
const FRAME_QUEUE: usize = 64;
/// DATA bytes taken from the delivery layer per poll of a channel.
const DC_POLL_BYTES: usize = 64 * 1024;
/// Signals queued per link and direction, at most (a call has a handful).
const SIGNAL_QUEUE: usize = 64;
/// Signals of a call kept while its link is being set up, at most.
const EARLY_SIGNALS: usize = 64;
/// A call whose channel is not open this long after it started is given up (and retried).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Signals held while Switchboard is not connected are answered if they are younger than this.
const HELD_SIGNALS_FOR: Duration = Duration::from_secs(30);
/// A channel whose writer takes no frame for this long is given up: its PINGs cannot get through
/// either (a relay that vanished leaves the channel's buffer full until ICE times out, ~30 s).
const WRITE_STALL: Duration = Duration::from_secs(5);
/// Addresses watched at most (Switchboard's default `max_watched`).
const MAX_WATCHED: usize = 1000;
/// How often the driver looks whether the first `/sync` has been handled.
const SYNC_CHECK: Duration = Duration::from_millis(20);
/// Frames of at most this many bytes that wait together are joined into BATCH messages (of at
/// most [`reliable::BATCH_LIMIT`], 16 KiB); larger ones go alone. Each data channel message costs
/// the webrtc crate the same task hand-offs whatever its size, so small frames (1 kB messages,
/// acks, pings) gain from being joined; joining 3.2 kB frames into 16 KiB messages measured 20 %
/// slower in one run (a large message is many SCTP chunks). On this noisy 2-core machine the gain
/// for 1 kB messages is within the noise of three runs (docs/benchmarks.md).
const SMALL_FRAME: usize = 2 * 1024;

/// The shortest sleep of the driver's loop (a timer due now whose work must wait for a report).
const MIN_SLEEP: Duration = Duration::from_millis(5);

/// What a [`super::Client`] asks the driver.
#[derive(Debug)]
pub(super) enum Command {
    Watch { address: Address, reply: oneshot::Sender<Result<(), ClientError>> },
    Open { address: Address },
    Send { address: Address, bytes: Bytes, reply: oneshot::Sender<Result<(), ClientError>> },
    Close { address: Address },
    Reset { address: Address },
    Stats { address: Address, reply: oneshot::Sender<Option<PeerStats>> },
}

/// What the driver's tasks report.
enum Internal {
    SignalUp {
        generation: u64,
        url: Url,
        conn: SignalConnection,
        events: SignalEvents,
    },
    SignalFailed {
        generation: u64,
        error: String,
        fatal: bool,
    },
    /// Discovery found no Switchboard.
    SignalAbsent {
        generation: u64,
    },
    Signal {
        generation: u64,
        event: SignalEvent,
    },
    LinkCreated {
        address: Address,
        token: u64,
        result: Result<(PeerLink, LinkEvents, OutgoingSignal), RtcError>,
    },
    Link {
        address: Address,
        token: u64,
        event: LinkEvent,
    },
    MatrixSent {
        address: Address,
        send: ToDevice,
        /// The pair's room it went into (`fallback = room`), which the peer learns if new.
        room: Option<OwnedRoomId>,
        result: Result<(), MatrixError>,
    },
}

enum SignalState {
    /// No Switchboard (none named, none discovered, or the token refused): Matrix only.
    Absent,
    /// Waiting for the first `/sync` before connecting.
    NotYet,
    Connecting,
    Up(SignalConnection),
    Down {
        retry_at: Instant,
    },
}

/// A running link's handles.
struct LinkHandle {
    link: PeerLink,
    frames: mpsc::Sender<Bytes>,
    signals_in: mpsc::Sender<(EventType, Map<String, Value>)>,
    /// Frames polled but not yet queued for the writer.
    outbox: VecDeque<Bytes>,
    /// When the writer last took a frame (or had nothing waiting).
    progress: Instant,
}

/// One call to a peer, from its start to its end.
struct Link {
    token: u64,
    caller: bool,
    /// Known once the call is created (caller) or from the invite (callee).
    call_id: Option<String>,
    /// `None` while the peer connection is being set up.
    handle: Option<LinkHandle>,
    /// The peer's signals that came while it was being set up.
    early: Vec<(EventType, Map<String, Value>)>,
    started: Instant,
    open: bool,
    path: Option<Path>,
    /// `ChannelUp` was emitted, at this time.
    announced: Option<Instant>,
}

#[derive(Default, Clone, Copy)]
struct Figures {
    channels_up: u64,
    calls: u64,
    dc_data_frames: u64,
    matrix_batches: u64,
    matrix_lines: u64,
    matrix_acks: u64,
}

struct PeerState {
    address: Address,
    user_id: OwnedUserId,
    reliable: Peer,
    link: Option<Link>,
    /// [`super::Client::open`]ed: this side calls, and calls again.
    wanted: bool,
    retry_at: Option<Instant>,
    backoff: Option<Duration>,
    matrix_busy: bool,
    /// `fallback = room`: the pair's room (ours, or the first the peer's messages came from).
    room: Option<OwnedRoomId>,
    matrix_retry_at: Option<Instant>,
    matrix_backoff: Option<Duration>,
    waiting: VecDeque<(Bytes, oneshot::Sender<Result<(), ClientError>>)>,
    /// The peer's latest call (its invite and what followed) that came while Switchboard was not
    /// connected: answered once it is (at most `EARLY_SIGNALS`).
    held: Vec<(Instant, IncomingSignal)>,
    /// The peer's signals of a call we have no invite of (yet): the broker may hand us the
    /// caller's candidates over the socket before its invite arrives through `/sync`. At most
    /// `EARLY_SIGNALS`, oldest dropped first.
    orphans: VecDeque<IncomingSignal>,
    figures: Figures,
    /// This peer's share of `Ctx::held_bytes`, as last accounted.
    held_bytes: usize,
}

/// Everything of the driver but the peers and the queues it selects on.
struct Ctx {
    config: ClientConfig,
    clock: Clock,
    matrix: MatrixClient,
    server_name: String,
    party_id: String,
    internal: mpsc::Sender<Internal>,
    outbox: VecDeque<ClientEvent>,
    events_closed: bool,
    signal: SignalState,
    generation: u64,
    reconnect_backoff: Option<Duration>,
    switchboard_url: Option<Url>,
    watched: BTreeSet<Address>,
    synced: bool,
    room: Arc<Notify>,
    next_token: u64,
    /// Bytes held for undelivered incoming messages across peers (bounded by `max_held_bytes`).
    held_bytes: usize,
}

struct Driver {
    peers: BTreeMap<Address, PeerState>,
    ctx: Ctx,
    commands: mpsc::Receiver<Command>,
    internal: mpsc::Receiver<Internal>,
    events: mpsc::Sender<ClientEvent>,
    sync: Option<SyncHandle>,
    cancel: CancellationToken,
}

/// Starts the driver (and the `/sync` loop) on the current runtime.
pub(super) fn spawn(
    config: ClientConfig,
    matrix: MatrixClient,
    whoami: WhoAmI,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<ClientEvent>,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    let (internal_tx, internal) = mpsc::channel(INTERNAL_QUEUE);
    let rooms = config.fallback == Fallback::Room;
    let sync_settings = SyncSettings {
        timeout: config.sync_timeout,
        room_messages: rooms,
        auto_join_raiden_users: rooms,
        ..SyncSettings::default()
    };
    let sync = matrix.spawn_sync(sync_settings, cancel.child_token());
    let signal = SignalState::NotYet;
    let ctx = Ctx {
        clock: config.clock.clone(),
        switchboard_url: config.switchboard.clone(),
        config,
        matrix,
        server_name: whoami.user_id.server_name().to_string(),
        party_id: whoami.device_id.map_or_else(|| "switchboard".to_owned(), |device| device.to_string()),
        internal: internal_tx,
        outbox: VecDeque::new(),
        events_closed: false,
        signal,
        generation: 0,
        reconnect_backoff: None,
        watched: BTreeSet::new(),
        synced: false,
        room: Arc::new(Notify::new()),
        next_token: 0,
        held_bytes: 0,
    };
    let driver = Driver { peers: BTreeMap::new(), ctx, commands, internal, events, sync: Some(sync), cancel };
    let span = tracing::info_span!("client.driver", user_id = %whoami.user_id);
    tokio::spawn(driver.run().instrument(span))
}

/// What one turn of the loop brought.
enum Step {
    Nothing,
    Stop,
    Command(Command),
    Internal(Internal),
    Sync(Option<SyncEvent>),
}

impl Driver {
    async fn run(mut self) {
        // Bounded by the client's life: it ends on cancellation or when every handle is dropped.
        loop {
            let now = self.ctx.clock.now();
            let deadline = self.deadline(now).max(now + MIN_SLEEP);
            let clock = self.ctx.clock.clone();
            let room = self.ctx.room.clone();
            let ingest = self.ctx.outbox.len() < self.ctx.config.events_capacity.max(1);
            let has_events = !self.ctx.outbox.is_empty() && !self.ctx.events_closed;
            let sync = &mut self.sync;
            let step = tokio::select! {
                biased;
                () = self.cancel.cancelled() => Step::Stop,
                permit = self.events.reserve(), if has_events => {
                    if let Ok(permit) = permit {
                        if let Some(event) = self.ctx.outbox.pop_front() {
                            permit.send(event);
                        }
                    } else {
                        self.ctx.events_closed = true;
                        self.ctx.outbox.clear();
                    }
                    Step::Nothing
                }
                command = self.commands.recv() => command.map_or(Step::Stop, Step::Command),
                report = self.internal.recv(), if ingest => report.map_or(Step::Nothing, Step::Internal),
                event = async { match sync { Some(sync) => sync.recv().await, None => std::future::pending().await } }, if ingest => Step::Sync(event),
                () = room.notified() => Step::Nothing,
                () = clock.sleep_until(deadline) => Step::Nothing,
            };
            let now = self.ctx.clock.now();
            match step {
                Step::Stop => break,
                Step::Nothing => {}
                Step::Command(command) => self.command(now, command),
                Step::Internal(report) => self.report(now, report),
                Step::Sync(Some(event)) => self.sync_event(now, event),
                Step::Sync(None) => {
                    if let Some(sync) = self.sync.take() {
                        let reason = match sync.finish().await {
                            Ok(()) => "the sync loop ended".to_owned(),
                            Err(error) => error.to_string(),
                        };
                        tracing::warn!(%reason, "client.sync: stopped");
                        self.ctx.emit(ClientEvent::SyncStopped { reason });
                    }
                }
            }
            self.tick();
        }
        self.stop().await;
    }

    /// Hangs up every channel and closes the signalling connection.
    async fn stop(&mut self) {
        let now = self.ctx.clock.now();
        let addresses: Vec<Address> = self.peers.keys().copied().collect();
        for address in addresses {
            if let Some(peer) = self.peers.get_mut(&address) {
                self.ctx.drop_link(peer, now, "client stopped", true);
            }
        }
        if let SignalState::Up(conn) = std::mem::replace(&mut self.ctx.signal, SignalState::Absent) {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
        }
        self.cancel.cancel();
        if let Some(sync) = self.sync.take() {
            let _ = sync.finish().await;
        }
    }

    /// When the loop must wake up at the latest.
    fn deadline(&self, now: Instant) -> Instant {
        let mut deadline = now + Duration::from_secs(3600);
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                deadline = deadline.min(at);
            }
        };
        if !self.ctx.synced {
            consider(Some(now + SYNC_CHECK));
        }
        if let SignalState::Down { retry_at } = self.ctx.signal {
            consider(Some(retry_at));
        }
        let signal_up = matches!(self.ctx.signal, SignalState::Up(_));
        for peer in self.peers.values() {
            consider(peer.reliable.poll_timeout(now));
            if peer.wanted && peer.link.is_none() && signal_up {
                consider(Some(peer.retry_at.unwrap_or(now)));
            }
            if peer.matrix_retry_at.is_some() && !peer.matrix_busy {
                consider(peer.matrix_retry_at);
            }
            if let Some(link) = &peer.link {
                if !link.open {
                    consider(Some(link.started + CALL_TIMEOUT));
                }
                if let Some(handle) = &link.handle
                    && !handle.outbox.is_empty()
                {
                    consider(Some(handle.progress + WRITE_STALL));
                }
            }
        }
        deadline
    }

    /// After every turn: the first `/sync`, reconnecting, and every peer's timers and transports.
    fn tick(&mut self) {
        let now = self.ctx.clock.now();
        if !self.ctx.synced && self.sync.as_ref().is_some_and(|sync| sync.since().is_some()) {
            self.ctx.synced = true;
        }
        if self.ctx.synced && matches!(self.ctx.signal, SignalState::NotYet) {
            self.ctx.connect();
        }
        if let SignalState::Down { retry_at } = self.ctx.signal
            && now >= retry_at
        {
            self.ctx.connect();
        }
        for peer in self.peers.values_mut() {
            // Cheap, and it checks what is due itself (a deadline computed earlier may have moved:
            // a PING timing out changes the state, and with it `poll_timeout`).
            peer.reliable.handle_timeout(now);
            self.ctx.pump(peer, now);
        }
    }

    fn peer(&mut self, address: Address) -> Option<&mut PeerState> {
        peer_entry(&mut self.peers, &self.ctx, address)
    }

    fn command(&mut self, now: Instant, command: Command) {
        match command {
            Command::Watch { address, reply } => {
                if !self.ctx.watched.contains(&address) && self.ctx.watched.len() >= MAX_WATCHED {
                    let _ = reply.send(Err(ClientError::Busy("watched addresses")));
                    return;
                }
                self.ctx.watched.insert(address);
                let _ = self.peer(address);
                match &self.ctx.signal {
                    SignalState::Up(conn) => {
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            let result = conn.watch(&[address.to_checksum()]).await;
                            let _ = reply.send(result.map_err(ClientError::from));
                        });
                    }
                    _ => {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
            Command::Open { address } => {
                if let Some(peer) = self.peer(address) {
                    peer.wanted = true;
                    peer.retry_at = None;
                }
            }
            Command::Send { address, bytes, reply } => {
                let max_waiting = self.ctx.config.max_waiting_sends;
                let limit = self.ctx.config.limits.replay_buffer_bytes;
                let Some(peer) = self.peer(address) else {
                    let _ = reply.send(Err(ClientError::Busy("peers")));
                    return;
                };
                if bytes.len() > limit {
                    let _ = reply.send(Err(ClientError::TooLarge { len: bytes.len(), limit }));
                } else if peer.waiting.is_empty() && peer.reliable.has_room(bytes.len()) {
                    let _ = reply.send(push(peer, now, bytes));
                } else if peer.waiting.len() >= max_waiting {
                    let _ = reply.send(Err(ClientError::Busy("sends waiting for room")));
                } else {
                    peer.waiting.push_back((bytes, reply));
                }
            }
            Command::Close { address } => {
                if let Some(peer) = self.peers.get_mut(&address) {
                    peer.wanted = false;
                    peer.retry_at = None;
                    peer.backoff = None;
                    self.ctx.drop_link(peer, now, "closed", true);
                }
            }
            Command::Reset { address } => {
                if let Some(peer) = self.peers.get_mut(&address) {
                    self.ctx.drop_link(peer, now, "reset", false);
                    self.ctx.schedule_retry(peer, now);
                }
            }
            Command::Stats { address, reply } => {
                let stats = self.peers.get(&address).map(|peer| PeerStats {
                    dc_state: peer.reliable.dc_state(now),
                    path: peer.link.as_ref().and_then(|link| link.path),
                    channels_up: peer.figures.channels_up,
                    calls: peer.figures.calls,
                    dc_data_frames: peer.figures.dc_data_frames,
                    matrix_batches: peer.figures.matrix_batches,
                    matrix_lines: peer.figures.matrix_lines,
                    matrix_acks: peer.figures.matrix_acks,
                    waiting_sends: peer.waiting.len(),
                    counters: peer.reliable.counters(),
                });
                let _ = reply.send(stats);
            }
        }
    }

    fn sync_event(&mut self, now: Instant, event: SyncEvent) {
        match event {
            SyncEvent::ToDevice { sender, event_type, content } => {
                if let Some(signal_type) = EventType::parse(&event_type) {
                    // A signal that came through Matrix (the peer's Switchboard found no socket of
                    // ours); the same one may also come over the socket: repeats are ignored.
                    let Value::Object(content) = content else { return };
                    let Some(call_id) = content.get("call_id").and_then(Value::as_str).map(str::to_owned)
                    else {
                        return;
                    };
                    let signal = IncomingSignal {
                        from: sender,
                        from_address: None,
                        from_device: None,
                        call_id,
                        event_type: signal_type,
                        content,
                        via: Via::Matrix,
                    };
                    self.incoming_signal(now, signal);
                    return;
                }
                if event_type != reliable::EVENT_MESSAGE && event_type != reliable::EVENT_ACK {
                    return;
                }
                if event_type == reliable::EVENT_ACK {
                    let Some(address) = claimed_address(sender.as_str()) else { return };
                    let Some(peer) = self.peer(address) else { return };
                    sender.clone_into(&mut peer.user_id);
                    if let Err(error) = peer.reliable.receive_matrix_ack(now, &content) {
                        tracing::debug!(%error, "client.matrix: an ack dropped");
                    }
                    return;
                }
                self.matrix_message(now, &sender, None, &content);
            }
            // Only with `fallback = room`: a message in a room shared with the peer.
            SyncEvent::RoomMessage { room_id, sender, content, .. } => {
                self.matrix_message(now, &sender, Some(room_id), &content);
            }
            SyncEvent::Checkpoint { .. } => self.ctx.synced = true,
        }
    }

    /// An `m.room.message` from `sender`, to-device or in `room` (which becomes the pair's room if
    /// it has none yet).
    fn matrix_message(&mut self, now: Instant, sender: &UserId, room: Option<OwnedRoomId>, content: &Value) {
        let Some(address) = claimed_address(sender.as_str()) else { return };
        let Some(peer) = peer_entry(&mut self.peers, &self.ctx, address) else { return };
        sender.clone_into(&mut peer.user_id);
        if peer.room.is_none() {
            peer.room = room;
        }
        match peer.reliable.receive_matrix(now, content) {
            Ok(messages) => {
                let address = peer.address.to_checksum();
                for bytes in messages {
                    self.ctx.emit(ClientEvent::Message { address: address.clone(), bytes });
                }
            }
            Err(error) => tracing::debug!(%error, "client.matrix: a message not for this layer"),
        }
        self.ctx.account_held(peer);
        self.keep_held_bytes_bounded();
    }

    /// Past `max_held_bytes` across peers, the peers holding the most let go of what they hold
    /// undelivered (their senders send it again), largest first, until the total is within it.
    fn keep_held_bytes_bounded(&mut self) {
        // Bounded: each pass empties one peer's share.
        for _ in 0..self.peers.len() {
            if self.ctx.held_bytes <= self.ctx.config.max_held_bytes {
                return;
            }
            let Some(peer) = self.peers.values_mut().max_by_key(|peer| peer.held_bytes) else { return };
            tracing::warn!(
                peer = %peer.address.to_checksum(),
                held = peer.held_bytes,
                total = self.ctx.held_bytes,
                "client.memory: max_held_bytes reached; the peer's undelivered fragments are let go"
            );
            peer.reliable.shed_incoming();
            self.ctx.account_held(peer);
        }
    }

    fn report(&mut self, now: Instant, report: Internal) {
        match report {
            Internal::SignalUp { generation, url, conn, events } => {
                self.signal_up(now, generation, url, conn, events);
            }
            Internal::SignalFailed { generation, error, fatal } => {
                if generation != self.ctx.generation {
                    return;
                }
                if fatal {
                    tracing::warn!(%error, "client.signal: refused; Matrix only from now on");
                    self.ctx.signal = SignalState::Absent;
                } else {
                    tracing::info!(%error, "client.signal: not connected; retrying");
                    self.ctx.signal_down(now, false);
                }
            }
            Internal::SignalAbsent { generation } => {
                if generation == self.ctx.generation {
                    tracing::info!("client.signal: the homeserver names no Switchboard; Matrix only");
                    self.ctx.signal = SignalState::Absent;
                }
            }
            Internal::Signal { generation, event } => {
                if generation == self.ctx.generation {
                    self.signal_event(now, event);
                }
            }
            Internal::LinkCreated { address, token, result } => {
                self.link_created(now, address, token, result);
            }
            Internal::Link { address, token, event } => self.link_event(now, address, token, event),
            Internal::MatrixSent { address, send, room, result } => {
                let lines = send.lines;
                let Some(peer) = self.peers.get_mut(&address) else { return };
                peer.matrix_busy = false;
                if peer.room.is_none() {
                    peer.room = room;
                }
                match result {
                    Ok(()) => {
                        peer.matrix_backoff = None;
                        peer.matrix_retry_at = None;
                        if let Some((first, count)) = lines {
                            peer.reliable.on_homeserver_accepted(first, count);
                            peer.figures.matrix_batches += 1;
                            peer.figures.matrix_lines += count as u64;
                        } else {
                            peer.figures.matrix_acks += 1;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "client.matrix: a to-device send failed; retrying later");
                        peer.reliable.on_matrix_failed(now, &send);
                        let wait = self.ctx.config.matrix_backoff.next(peer.matrix_backoff);
                        peer.matrix_backoff = Some(wait);
                        peer.matrix_retry_at = Some(now + wait);
                    }
                }
            }
        }
    }

    fn signal_up(
        &mut self,
        now: Instant,
        generation: u64,
        url: Url,
        conn: SignalConnection,
        mut events: SignalEvents,
    ) {
        if generation != self.ctx.generation {
            return;
        }
        tracing::info!(user_id = %conn.ready().user_id, "client.signal: connected");
        self.ctx.switchboard_url = Some(url);
        self.ctx.reconnect_backoff = None;
        self.ctx.signal = SignalState::Up(conn.clone());
        self.ctx.emit(ClientEvent::Switchboard { connected: true });
        let internal = self.ctx.internal.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if internal.send(Internal::Signal { generation, event }).await.is_err() {
                    return;
                }
            }
        });
        let watched: Vec<String> = self.ctx.watched.iter().map(Address::to_checksum).collect();
        if !watched.is_empty() {
            tokio::spawn(async move {
                if let Err(error) = conn.watch(&watched).await {
                    tracing::warn!(%error, "client.signal: watching again failed");
                }
            });
        }
        // A call that waited for Switchboard starts now; one the peer started meanwhile is answered.
        let mut held = Vec::new();
        for peer in self.peers.values_mut() {
            if peer.link.is_none() {
                peer.retry_at = peer.retry_at.map(|at| at.min(now));
            }
            held.append(&mut peer.held);
        }
        for (at, signal) in held {
            if now.saturating_duration_since(at) < HELD_SIGNALS_FOR {
                self.incoming_signal(now, signal);
            }
        }
    }

    fn signal_event(&mut self, now: Instant, event: SignalEvent) {
        match event {
            SignalEvent::Signal(signal) => self.incoming_signal(now, signal),
            SignalEvent::Presence(presence) => {
                if let Ok(address) = Address::parse(&presence.address)
                    && let Some(peer) = self.peers.get_mut(&address)
                    && let Some(users) = presence.frame.get("users").and_then(Value::as_array)
                    && let Some(user) = users
                        .iter()
                        .filter(|user| user.get("verified") == Some(&Value::Bool(true)))
                        .find_map(|user| user.get("user_id").and_then(Value::as_str))
                    && let Ok(user_id) = UserId::parse(user)
                {
                    peer.user_id = user_id;
                }
                self.ctx.emit(ClientEvent::Presence(presence));
            }
            SignalEvent::Glare { call_id, .. } | SignalEvent::CallEnded { call_id, .. } => {
                for peer in self.peers.values_mut() {
                    let ended = peer
                        .link
                        .as_ref()
                        .is_some_and(|link| !link.open && link.call_id.as_deref() == Some(call_id.as_str()));
                    if ended {
                        self.ctx.drop_link(peer, now, "the call ended", false);
                        self.ctx.schedule_retry(peer, now);
                    }
                }
            }
            SignalEvent::Closed(reason) => {
                tracing::info!(%reason, "client.signal: closed");
                let at_once = reason.code() == Some(1012);
                if reason.code() == Some(4001) {
                    self.ctx.signal = SignalState::Absent;
                } else {
                    self.ctx.signal_down(now, at_once);
                }
                self.ctx.emit(ClientEvent::Switchboard { connected: false });
                // Calls still being set up cannot finish without signals.
                for peer in self.peers.values_mut() {
                    if peer.link.as_ref().is_some_and(|link| !link.open) {
                        self.ctx.drop_link(peer, now, "Switchboard went away", false);
                        self.ctx.schedule_retry(peer, now);
                    }
                }
            }
            SignalEvent::IceServers(_) | SignalEvent::Error(_) => {}
        }
    }

    fn incoming_signal(&mut self, now: Instant, signal: IncomingSignal) {
        tracing::debug!(call_id = %signal.call_id, event_type = %signal.event_type, via = ?signal.via, "client.call: signal in");
        let address = signal
            .from_address
            .as_deref()
            .and_then(|address| Address::parse(address).ok())
            .or_else(|| claimed_address(signal.from.as_str()));
        let Some(address) = address else { return };
        if !matches!(self.ctx.signal, SignalState::Up(_)) {
            // Kept until Switchboard is connected (a peer calls before our socket is up).
            if signal.event_type == EventType::Invite {
                if let Some(peer) = peer_entry(&mut self.peers, &self.ctx, address) {
                    peer.held.clear();
                    peer.held.push((now, signal));
                }
            } else if let Some(peer) = self.peers.get_mut(&address)
                && peer.held.first().is_some_and(|(_, invite)| invite.call_id == signal.call_id)
                && peer.held.len() < EARLY_SIGNALS
            {
                peer.held.push((now, signal));
            }
            return;
        }
        if signal.event_type == EventType::Invite {
            let known = self.peers.contains_key(&address);
            let accept = match self.ctx.config.accept_calls {
                AcceptCalls::Any => true,
                AcceptCalls::Known => known,
                AcceptCalls::None => false,
            };
            if !accept {
                tracing::debug!("client.call: an invite not accepted");
                return;
            }
            let Some(peer) = peer_entry(&mut self.peers, &self.ctx, address) else { return };
            peer.user_id = signal.from.clone();
            self.ctx.invite(peer, now, &signal);
            return;
        }
        let Some(peer) = self.peers.get_mut(&address) else { return };
        let Some(link) =
            peer.link.as_mut().filter(|link| link.call_id.as_deref() == Some(signal.call_id.as_str()))
        else {
            if peer.orphans.len() >= EARLY_SIGNALS {
                peer.orphans.pop_front();
            }
            peer.orphans.push_back(signal);
            return;
        };
        match &link.handle {
            Some(handle) => {
                if handle.signals_in.try_send((signal.event_type, signal.content)).is_err() {
                    tracing::warn!("client.call: too many signals queued; one dropped");
                }
            }
            None if link.early.len() < EARLY_SIGNALS => link.early.push((signal.event_type, signal.content)),
            None => tracing::warn!("client.call: too many early signals; one dropped"),
        }
    }

    fn link_created(
        &mut self,
        now: Instant,
        address: Address,
        token: u64,
        result: Result<(PeerLink, LinkEvents, OutgoingSignal), RtcError>,
    ) {
        let current = self
            .peers
            .get(&address)
            .and_then(|peer| peer.link.as_ref())
            .is_some_and(|link| link.token == token);
        let conn = match &self.ctx.signal {
            SignalState::Up(conn) => Some(conn.clone()),
            _ => None,
        };
        let Some(peer) = self.peers.get_mut(&address) else { return };
        let (link, events, first) = match result {
            Ok(created) => created,
            Err(error) => {
                if current {
                    tracing::warn!(%error, "client.call: no peer connection");
                    peer.link = None;
                    self.ctx.schedule_retry(peer, now);
                }
                return;
            }
        };
        let (true, Some(conn)) = (current, conn) else {
            tokio::spawn(async move { link.close().await });
            if current {
                peer.link = None;
                self.ctx.schedule_retry(peer, now);
            }
            return;
        };
        let to = peer.user_id.to_string();
        let handle = start_link_tasks(&self.ctx, address, token, &link, events, first, conn, to);
        let Some(state) = peer.link.as_mut() else { return };
        state.call_id = Some(link.call_id().to_owned());
        for signal in state.early.drain(..) {
            let _ = handle.signals_in.try_send(signal);
        }
        state.handle = Some(handle);
    }

    fn link_event(&mut self, now: Instant, address: Address, token: u64, event: LinkEvent) {
        let Some(peer) = peer_entry(&mut self.peers, &self.ctx, address) else { return };
        let Some(link) = peer.link.as_mut().filter(|link| link.token == token) else { return };
        if !matches!(event, LinkEvent::Message(_)) {
            tracing::debug!(call_id = ?link.call_id, ?event, "client.call: link event");
        }
        match event {
            LinkEvent::Open { path } => {
                link.open = true;
                link.path = Some(path);
                peer.reliable.on_channel_open(now);
                if let (SignalState::Up(conn), Some(call_id)) = (&self.ctx.signal, link.call_id.clone()) {
                    let conn = conn.clone();
                    tokio::spawn(async move {
                        if let Err(error) = conn.connected(&call_id).await {
                            tracing::debug!(%error, "client.call: connected not reported");
                        }
                    });
                }
            }
            LinkEvent::Message(bytes) => {
                if !link.open {
                    return;
                }
                match peer.reliable.receive_dc(now, &bytes) {
                    Ok(messages) => {
                        let address = peer.address.to_checksum();
                        for bytes in messages {
                            self.ctx.emit(ClientEvent::Message { address: address.clone(), bytes });
                        }
                    }
                    Err(error) => tracing::debug!(%error, "client.channel: a frame dropped"),
                }
                self.ctx.account_held(peer);
                self.keep_held_bytes_bounded();
            }
            LinkEvent::Closed => {
                self.ctx.drop_link(peer, now, "the data channel closed", false);
                self.ctx.schedule_retry(peer, now);
            }
            LinkEvent::Failed(reason) => {
                self.ctx.drop_link(peer, now, &format!("the data channel failed: {reason}"), false);
                self.ctx.schedule_retry(peer, now);
            }
            LinkEvent::Signal(_) => {}
        }
    }
}

/// The state of `address`, created when new (unless `max_peers` are known).
fn peer_entry<'a>(
    peers: &'a mut BTreeMap<Address, PeerState>,
    ctx: &Ctx,
    address: Address,
) -> Option<&'a mut PeerState> {
    if !peers.contains_key(&address) {
        if peers.len() >= ctx.config.max_peers {
            tracing::warn!("client.peers: max_peers reached; a new peer is refused");
            return None;
        }
        let user_id = UserId::parse(format!("@{}:{}", address.to_lower_hex(), ctx.server_name)).ok()?;
        let stream = StreamId::generate(&mut rand::rng());
        let peer = PeerState {
            address,
            user_id,
            reliable: Peer::new(stream, ctx.config.limits.clone()),
            link: None,
            wanted: false,
            retry_at: None,
            backoff: None,
            matrix_busy: false,
            room: None,
            matrix_retry_at: None,
            matrix_backoff: None,
            waiting: VecDeque::new(),
            held: Vec::new(),
            orphans: VecDeque::new(),
            figures: Figures::default(),
            held_bytes: 0,
        };
        peers.insert(address, peer);
    }
    peers.get_mut(&address)
}

/// Pushes a message into the peer's replay buffer (room was checked).
fn push(peer: &mut PeerState, now: Instant, bytes: Bytes) -> Result<(), ClientError> {
    peer.reliable.push(now, bytes).map_err(|error| match error {
        PushError::TooLarge { len, limit } | PushError::Full { len, limit, .. } => {
            ClientError::TooLarge { len, limit }
        }
    })
}

impl Ctx {
    fn emit(&mut self, event: ClientEvent) {
        if !self.events_closed {
            self.outbox.push_back(event);
        }
    }

    /// Brings `peer`'s share of the bytes held for undelivered incoming messages up to date.
    fn account_held(&mut self, peer: &mut PeerState) {
        let held = peer.reliable.retained_bytes();
        self.held_bytes = self.held_bytes - peer.held_bytes + held;
        peer.held_bytes = held;
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn rtc_config(&self, conn: &SignalConnection) -> RtcConfig {
        RtcConfig {
            ice_servers: conn.ice_servers(),
            relay_only: self.config.relay_only,
            channel: self.config.channel,
            clock: self.clock.clone(),
            ..RtcConfig::default()
        }
    }

    /// Starts (or restarts) the connection to Switchboard, discovering it first when needed.
    fn connect(&mut self) {
        self.generation += 1;
        let generation = self.generation;
        self.signal = SignalState::Connecting;
        let url = self.switchboard_url.clone();
        let matrix = self.matrix.clone();
        let token = self.config.access_token.clone();
        let options = SignalOptions { clock: self.clock.clone(), ..SignalOptions::default() };
        let internal = self.internal.clone();
        tokio::spawn(async move {
            let url = match url {
                Some(url) => url,
                None => match matrix.discover_switchboard().await {
                    Ok(Some(url)) => url,
                    Ok(None) => {
                        let _ = internal.send(Internal::SignalAbsent { generation }).await;
                        return;
                    }
                    Err(error) => {
                        let error = format!("discovery: {error}");
                        let _ =
                            internal.send(Internal::SignalFailed { generation, error, fatal: false }).await;
                        return;
                    }
                },
            };
            let report = match SignalConnection::connect_with(url.as_str(), &token, options).await {
                Ok((conn, events)) => Internal::SignalUp { generation, url, conn, events },
                Err(error) => {
                    let fatal = matches!(error, SignalError::Unauthorized { .. });
                    Internal::SignalFailed { generation, error: error.to_string(), fatal }
                }
            };
            let _ = internal.send(report).await;
        });
    }

    fn signal_down(&mut self, now: Instant, at_once: bool) {
        let wait = if at_once {
            Duration::ZERO
        } else {
            let wait = self.config.reconnect_backoff.next(self.reconnect_backoff);
            self.reconnect_backoff = Some(wait);
            wait
        };
        self.signal = SignalState::Down { retry_at: now + wait };
    }

    /// After a call ended or a channel died: a side that wants the channel calls again after its
    /// backoff (back to the first step once a channel stayed up for the longest step).
    fn schedule_retry(&self, peer: &mut PeerState, now: Instant) {
        if !peer.wanted {
            return;
        }
        let wait = self.config.upgrade_backoff.next(peer.backoff);
        peer.backoff = Some(wait);
        peer.retry_at = Some(now + wait);
    }

    /// Ends the peer's link, if any: with a hangup to the peer, or silently (a failure, a lost
    /// glare, a reset). What the channel carried unacknowledged goes through Matrix.
    fn drop_link(&mut self, peer: &mut PeerState, now: Instant, reason: &str, hangup: bool) {
        let Some(link) = peer.link.take() else { return };
        if let Some(handle) = link.handle {
            let conn = match &self.signal {
                SignalState::Up(conn) if hangup => Some(conn.clone()),
                _ => None,
            };
            let to = peer.user_id.to_string();
            let peer_link = handle.link;
            tokio::spawn(async move {
                match conn {
                    Some(conn) => {
                        let signal = peer_link.hangup("user_hangup").await;
                        let _ =
                            conn.send_signal(&to, &signal.call_id, signal.event_type, signal.content).await;
                    }
                    None => peer_link.close().await,
                }
            });
        }
        if link.open {
            peer.reliable.on_channel_lost();
            self.account_held(peer);
        }
        if let Some(up_since) = link.announced {
            if now.saturating_duration_since(up_since) >= self.config.upgrade_backoff.max {
                peer.backoff = None;
            }
            let address = peer.address.to_checksum();
            self.emit(ClientEvent::ChannelDown { address, reason: reason.to_owned() });
        }
    }

    /// An invite from the peer: answered, unless our own pending call to it wins the glare rule
    /// (the lower call id), which the broker applies too.
    fn invite(&mut self, peer: &mut PeerState, now: Instant, signal: &IncomingSignal) {
        let SignalState::Up(conn) = &self.signal else { return };
        let conn = conn.clone();
        if let Some(link) = &peer.link {
            match link.call_id.as_deref() {
                Some(ours) if ours == signal.call_id => return,
                // A call through Matrix may be an old one (a first `/sync` brings what was stored):
                // it does not replace an open channel.
                _ if link.open && signal.via == Via::Matrix => return,
                Some(ours) if link.caller && !link.open && ours < signal.call_id.as_str() => return,
                _ => {}
            }
            self.drop_link(peer, now, "replaced by the peer's new call", false);
        }
        let invite = match Invite::parse(&signal.call_id, &signal.content) {
            Ok(invite) => invite,
            Err(error) => {
                tracing::debug!(%error, "client.call: an invite dropped");
                return;
            }
        };
        let token = self.token();
        let early = peer
            .orphans
            .drain(..)
            .filter(|orphan| orphan.call_id == signal.call_id)
            .map(|orphan| (orphan.event_type, orphan.content))
            .collect();
        peer.link = Some(Link {
            token,
            caller: false,
            call_id: Some(signal.call_id.clone()),
            handle: None,
            early,
            started: now,
            open: false,
            path: None,
            announced: None,
        });
        let config = self.rtc_config(&conn);
        let party = self.party_id.clone();
        let internal = self.internal.clone();
        let address = peer.address;
        tokio::spawn(async move {
            let result = PeerLink::answer(config, &party, &invite).await;
            let _ = internal.send(Internal::LinkCreated { address, token, result }).await;
        });
    }

    /// Starts a call to the peer.
    fn call(&mut self, peer: &mut PeerState, now: Instant) {
        let SignalState::Up(conn) = &self.signal else { return };
        let config = self.rtc_config(conn);
        let token = self.token();
        peer.link = Some(Link {
            token,
            caller: true,
            call_id: None,
            handle: None,
            early: Vec::new(),
            started: now,
            open: false,
            path: None,
            announced: None,
        });
        peer.retry_at = None;
        peer.figures.calls += 1;
        tracing::debug!("client.call: calling");
        let party = self.party_id.clone();
        let internal = self.internal.clone();
        let address = peer.address;
        tokio::spawn(async move {
            let result = PeerLink::call(config, &party).await;
            let _ = internal.send(Internal::LinkCreated { address, token, result }).await;
        });
    }

    /// Moves the peer's messages: waiting sends into the replay buffer, frames onto an alive
    /// channel, batches and acks through Matrix otherwise; gives up a dead channel or a call that
    /// takes too long; starts a wanted call.
    fn pump(&mut self, peer: &mut PeerState, now: Instant) {
        while let Some((bytes, _)) = peer.waiting.front() {
            if !peer.reliable.has_room(bytes.len()) {
                break;
            }
            let Some((bytes, reply)) = peer.waiting.pop_front() else { break };
            let _ = reply.send(push(peer, now, bytes));
        }
        if let Some(link) = &peer.link {
            // Stuck only with frames waiting: an idle channel's `progress` is as old as its last
            // pump, and its own PING timer (as long as WRITE_STALL) must not read as a stall.
            let stuck = link
                .handle
                .as_ref()
                .is_some_and(|handle| !handle.outbox.is_empty() && now >= handle.progress + WRITE_STALL);
            if link.open && stuck {
                self.drop_link(peer, now, "the data channel stopped draining", true);
                self.schedule_retry(peer, now);
            } else if link.open && peer.reliable.dc_state(now) == DcState::Dead {
                self.drop_link(peer, now, "the data channel went silent", true);
                self.schedule_retry(peer, now);
            } else if !link.open && now >= link.started + CALL_TIMEOUT {
                self.drop_link(peer, now, "the call did not connect in time", true);
                self.schedule_retry(peer, now);
            }
        }
        let state = peer.reliable.dc_state(now);
        if let Some(link) = peer.link.as_mut()
            && link.open
        {
            if link.announced.is_none() && state == DcState::Alive {
                link.announced = Some(now);
                peer.figures.channels_up += 1;
                let path = link.path.unwrap_or(Path::Direct);
                self.outbox.push_back(ClientEvent::ChannelUp { address: peer.address.to_checksum(), path });
            }
            if let Some(handle) = link.handle.as_mut() {
                flush(handle, now);
                // While Stalled nothing more is written to the channel: our acks (and PONGs) go no
                // further than its full buffer, so the delivery layer sends acks through Matrix
                // instead. A PONG still arriving makes it Alive again; otherwise it goes Dead.
                if handle.outbox.is_empty() && state != DcState::Stalled {
                    for frame in peer.reliable.poll_dc(now, DC_POLL_BYTES) {
                        if frame.first() == Some(&0x01) {
                            peer.figures.dc_data_frames += 1;
                        }
                        handle.outbox.push_back(frame);
                    }
                    flush(handle, now);
                }
            }
        }
        let matrix_due = peer.matrix_retry_at.is_none_or(|at| now >= at);
        if !peer.matrix_busy
            && matrix_due
            && (state != DcState::Alive || !peer.reliable.outgoing().has_pending())
            && let Some(send) = peer.reliable.poll_matrix(now)
        {
            peer.matrix_busy = true;
            self.send_matrix(peer, send);
        }
        if peer.wanted
            && peer.link.is_none()
            && peer.retry_at.is_none_or(|at| now >= at)
            && matches!(self.signal, SignalState::Up(_))
        {
            self.call(peer, now);
        }
    }

    fn send_matrix(&self, peer: &PeerState, send: ToDevice) {
        let matrix = self.matrix.clone();
        let internal = self.internal.clone();
        let address = peer.address;
        let user_id = peer.user_id.clone();
        // Messages go into the pair's room with `fallback = room` (made on the first); acks alone
        // stay to-device.
        let into_room = self.config.fallback == Fallback::Room && send.event_type == reliable::EVENT_MESSAGE;
        let known_room = peer.room.clone();
        tokio::spawn(async move {
            let txn_id: OwnedTransactionId = send.txn_id.clone().into();
            let (room, result) = if into_room {
                let room = match known_room {
                    Some(room) => Ok(room),
                    None => matrix.create_private_room(&user_id).await,
                };
                match room {
                    Ok(room) => {
                        let outcome =
                            matrix.send_room_event(&room, send.event_type, &send.content, &txn_id).await;
                        (Some(room), outcome)
                    }
                    Err(error) => (None, Err(error)),
                }
            } else {
                let outcome = matrix
                    .send_to_device(
                        send.event_type,
                        &user_id,
                        &DeviceIdOrAllDevices::AllDevices,
                        &send.content,
                        &txn_id,
                    )
                    .await;
                (None, outcome)
            };
            let _ = internal.send(Internal::MatrixSent { address, send, room, result }).await;
        });
    }
}

/// Moves polled frames to the writer while it has room.
fn flush(handle: &mut LinkHandle, now: Instant) {
    if handle.outbox.is_empty() {
        handle.progress = now;
    }
    while let Some(frame) = handle.outbox.pop_front() {
        match handle.frames.try_send(frame) {
            Ok(()) => handle.progress = now,
            Err(mpsc::error::TrySendError::Full(frame)) => {
                handle.outbox.push_front(frame);
                break;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                handle.outbox.clear();
                break;
            }
        }
    }
}

/// The reader, signaller and writer of a new link (see the module docs); `first` (the invite or
/// answer) goes out before any other signal.
#[allow(clippy::too_many_arguments)]
fn start_link_tasks(
    ctx: &Ctx,
    address: Address,
    token: u64,
    link: &PeerLink,
    mut events: LinkEvents,
    first: OutgoingSignal,
    conn: SignalConnection,
    to: String,
) -> LinkHandle {
    let (signals_out, mut signals_out_rx) = mpsc::channel::<OutgoingSignal>(SIGNAL_QUEUE);
    let internal = ctx.internal.clone();
    tokio::spawn(async move {
        let mut next = Some(first);
        while let Some(signal) = next.take() {
            let opening = matches!(signal.event_type, EventType::Invite | EventType::Answer);
            let event_type = signal.event_type;
            if let Err(error) =
                conn.send_signal(&to, &signal.call_id, signal.event_type, signal.content).await
            {
                if opening {
                    let event = LinkEvent::Failed(format!("{event_type} not delivered: {error}"));
                    let _ = internal.send(Internal::Link { address, token, event }).await;
                    return;
                }
                tracing::debug!(%error, %event_type, "client.call: a signal not delivered");
            }
            next = signals_out_rx.recv().await;
        }
    });
    let (signals_in, mut signals_in_rx) = mpsc::channel::<(EventType, Map<String, Value>)>(SIGNAL_QUEUE);
    let internal = ctx.internal.clone();
    let reader_link = link.clone();
    tokio::spawn(async move {
        let mut signals_open = true;
        // Ends with the link's last event (Closed or Failed always comes; `close` ensures it).
        loop {
            tokio::select! {
                event = events.next() => {
                    let Some(event) = event else { return };
                    match event {
                        LinkEvent::Signal(signal) => {
                            let _ = signals_out.send(signal).await;
                        }
                        event => {
                            let last = matches!(event, LinkEvent::Closed | LinkEvent::Failed(_));
                            if internal.send(Internal::Link { address, token, event }).await.is_err() || last {
                                return;
                            }
                        }
                    }
                }
                signal = signals_in_rx.recv(), if signals_open => match signal {
                    Some((event_type, content)) => {
                        if let Err(error) = reader_link.handle_signal(event_type, &content).await {
                            let event = LinkEvent::Failed(format!("the peer's {event_type}: {error}"));
                            let _ = internal.send(Internal::Link { address, token, event }).await;
                            reader_link.close().await;
                        }
                    }
                    None => signals_open = false,
                },
            }
        }
    });
    let (frames, mut frames_rx) = mpsc::channel::<Bytes>(FRAME_QUEUE);
    let writer_link = link.clone();
    let room = ctx.room.clone();
    tokio::spawn(async move {
        // Frames waiting together go out as one BATCH message of at most 16 KiB: a data channel
        // message costs the same handling in SCTP, DTLS and between tasks whatever its size, so
        // under load this multiplies what the channel carries; a frame alone goes as it is.
        let mut carried: Option<Bytes> = None;
        loop {
            let first = match carried.take() {
                Some(frame) => frame,
                None => match frames_rx.recv().await {
                    Some(frame) => frame,
                    None => break,
                },
            };
            let mut bytes = first.len();
            let mut frames = vec![first];
            while bytes <= SMALL_FRAME
                && let Ok(next) = frames_rx.try_recv()
            {
                if next.len() > SMALL_FRAME
                    || reliable::batch_size(bytes + next.len(), frames.len() + 1) > reliable::BATCH_LIMIT
                {
                    carried = Some(next);
                    break;
                }
                bytes += next.len();
                frames.push(next);
            }
            let message =
                if frames.len() == 1 { frames.swap_remove(0) } else { reliable::join_frames(&frames) };
            if let Err(error) = writer_link.send(message).await {
                tracing::debug!(%error, "client.channel: write failed");
                break;
            }
            room.notify_one();
        }
    });
    LinkHandle { link: link.clone(), frames, signals_in, outbox: VecDeque::new(), progress: ctx.clock.now() }
}
