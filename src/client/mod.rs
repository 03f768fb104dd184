//! The thin client: WebRTC data channels between two peers when they work, Matrix when they don't,
//! and every message delivered to the application exactly once and in order either way.
//!
//! Matrix is the base layer: the client runs its own `/sync` and sends its own to-device messages
//! with its own access token ([`matrix`]), so it keeps working with Switchboard down or absent.
//! Switchboard's signalling WebSocket ([`signal`]) brokers the upgrade to a data channel ([`rtc`]).
//! [`reliable`] numbers, acknowledges, replays and reorders messages across both transports; it is
//! sans-IO, so its rules are tested without a network. The wire format between clients is in
//! docs/protocol.md ("Messages between clients").
//!
//! [`Client`] ties them together. One task (the *driver*, in `driver.rs`) owns every peer's state; the
//! [`Client`] handles talk to it through a bounded command queue, and it talks back through the
//! bounded [`ClientEvents`] stream:
//!
//! ```text
//! Client::send ──▶ driver ──▶ reliable::Peer ──▶ data channel (while alive) │ Matrix to-device (otherwise, at once)
//! /sync, data channel, signalling WebSocket ──▶ driver ──▶ ClientEvents (Presence, ChannelUp/Down, Message)
//! ```
//!
//! Policies (each documented on [`ClientConfig`]):
//! - **Which side calls.** [`Client::open`] makes this side the caller towards that peer: it calls
//!   as soon as Switchboard is connected (and the first `/sync` has been handled), and calls again
//!   after the channel dies, with capped backoff. The other side answers invites by itself
//!   ([`AcceptCalls`]). Both sides may `open`: the broker's glare rule picks one call.
//! - **Switchboard down or absent.** Everything goes through Matrix; the signalling connection is
//!   retried with capped backoff, and wanted upgrades resume once it is back. A homeserver whose
//!   well-known names no Switchboard leaves the client on Matrix alone for its lifetime.
//! - **Signals** travel only through Switchboard's WebSocket. `m.call.*` to-device events that
//!   reach our own `/sync` are ignored (Switchboard hands connected clients the signals that
//!   reach it through Matrix; a peer without Switchboard cannot offer a data channel anyway).

mod driver;
pub mod identity;
pub mod matrix;
pub mod peer;
pub mod reliable;
pub mod rtc;
pub mod signal;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ruma::OwnedUserId;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::clock::Clock;
use crate::directory::identity::Address;

pub use reliable::{Counters, DcState, Limits};
pub use rtc::{ChannelOptions, Path};
pub use signal::Presence;

/// Capped exponential backoff: `initial`, doubling up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after `previous` (`None`: the first wait).
    pub fn next(&self, previous: Option<Duration>) -> Duration {
        previous.map_or(self.initial, |previous| previous.saturating_mul(2)).max(self.initial).min(self.max)
    }
}

impl Default for Backoff {
    /// 1 s doubling to 30 s.
    fn default() -> Self {
        Self { initial: Duration::from_secs(1), max: Duration::from_secs(30) }
    }
}

/// Whose invites the client answers by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcceptCalls {
    /// Any peer's (a Raiden address); the default: a payment node wants every channel it can get.
    #[default]
    Any,
    /// Only peers this client already knows: watched, opened, sent to or received from.
    Known,
    /// None: this client only calls ([`Client::open`]).
    None,
}

/// Where messages go through Matrix when no data channel carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// To-device `m.room.message` to the peer's devices, as Raiden 3.x sends them. The default.
    #[default]
    ToDevice,
    /// A private room per pair (the seed ADR's example, Raiden 2.x's transport): the first
    /// message to a peer creates a room (`trusted_private_chat`, `is_direct`) with the peer
    /// invited; a peer's invite from a Raiden user is joined (1,000 rooms at most, see
    /// [`matrix::SyncSettings::max_auto_joins`]); messages go into the pair's room as
    /// `m.room.message` with the same content as to-device (acks alone stay to-device). A race of
    /// both sides creating a room leaves two rooms, each read by both: nothing is lost or repeated.
    Room,
}

/// How a [`Client`] is set up. [`ClientConfig::new`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The homeserver's client-server API base URL.
    pub homeserver: Url,
    /// The Matrix access token of this client's device (used for `/sync`, to-device sends and
    /// Switchboard's WebSocket).
    pub access_token: String,
    /// Switchboard's client base URL. `None` (default): discovered from the homeserver's
    /// `/.well-known/matrix/client` (`org.switchboard.client`); nothing found → Matrix only.
    pub switchboard: Option<Url>,
    /// Relay-only ICE (every data channel through TURN; no local address revealed). Default false.
    pub relay_only: bool,
    /// Data channel reliability. Default: unordered, reliable.
    pub channel: ChannelOptions,
    /// The Matrix path of messages: to-device (default) or a room per pair.
    pub fallback: Fallback,
    /// Bounds of the delivery layer (replay buffer 1 MiB per peer, …).
    pub limits: Limits,
    /// Where time comes from. Default the system clock.
    pub clock: Clock,
    /// The Matrix layer's timeouts and retries.
    pub matrix: matrix::Settings,
    /// `/sync` long-poll timeout. Default 30 s.
    pub sync_timeout: Duration,
    /// Whose invites are answered. Default [`AcceptCalls::Any`].
    pub accept_calls: AcceptCalls,
    /// Events held for the application before the client stops reading its transports (the
    /// stream's capacity). Default 1,024.
    pub events_capacity: usize,
    /// Peers with state at most; messages from further peers are dropped (logged) and sends to
    /// them refused. Default 10,000.
    pub max_peers: usize,
    /// Sends waiting for room in one peer's replay buffer, at most (further ones are refused with
    /// [`ClientError::Busy`]). Default 1,024.
    pub max_waiting_sends: usize,
    /// Bytes held for incoming messages not yet delivered (out-of-order fragments, messages being
    /// reassembled), across all peers, at most. Each peer is bounded by [`Limits`] (4 MiB out of
    /// order, 4 MiB per message); this bounds their sum. Past it, the peers holding the most let
    /// go of everything they held undelivered, largest first (`IncomingCounters::sheds`; their
    /// senders send it again). Default 64 MiB.
    pub max_held_bytes: usize,
    /// Wait before calling again after a channel died or a call failed: 1 s doubling to 30 s
    /// (back to 1 s once a channel stayed up for the maximum).
    pub upgrade_backoff: Backoff,
    /// Wait before reconnecting to Switchboard: 1 s doubling to 30 s (at once after close 1012).
    pub reconnect_backoff: Backoff,
    /// Wait before resending through Matrix after a failed to-device send: 1 s doubling to 30 s.
    pub matrix_backoff: Backoff,
}

impl ClientConfig {
    /// The defaults, for this homeserver and token.
    pub fn new(homeserver: Url, access_token: impl Into<String>) -> Self {
        Self {
            homeserver,
            access_token: access_token.into(),
            switchboard: None,
            relay_only: false,
            channel: ChannelOptions::default(),
            fallback: Fallback::ToDevice,
            limits: Limits::default(),
            clock: Clock::system(),
            matrix: matrix::Settings::default(),
            sync_timeout: Duration::from_secs(30),
            accept_calls: AcceptCalls::Any,
            events_capacity: 1024,
            max_peers: 10_000,
            max_waiting_sends: 1024,
            max_held_bytes: 64 * 1024 * 1024,
            upgrade_backoff: Backoff::default(),
            reconnect_backoff: Backoff::default(),
            matrix_backoff: Backoff::default(),
        }
    }
}

/// What the client tells the application, in order.
#[derive(Debug, Clone)]
pub enum ClientEvent {
    /// A watched address's state, as Switchboard pushes it ([`Client::watch`]).
    Presence(Presence),
    /// A data channel to `address` is open and acknowledged alive (the peer's HELLO came and our
    /// first PING was answered): sends to it now go over the channel.
    ChannelUp { address: String, path: Path },
    /// The data channel to `address` is gone (closed, failed, silent, replaced, reset): sends go
    /// through Matrix, and what the channel carried unacknowledged is resent there first.
    ChannelDown { address: String, reason: String },
    /// A message from `address`, exactly once and in the order it was sent.
    Message { address: String, bytes: Bytes },
    /// The signalling connection to Switchboard came up (`true`) or went down (`false`).
    Switchboard { connected: bool },
    /// The `/sync` loop ended for good (an error retrying cannot fix, such as an unknown token):
    /// nothing more arrives through Matrix.
    SyncStopped { reason: String },
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("matrix: {0}")]
    Matrix(#[from] matrix::MatrixError),
    #[error("not an address: {0}")]
    InvalidAddress(String),
    /// A message larger than the whole replay buffer.
    #[error("message of {len} bytes is larger than the replay buffer ({limit} bytes)")]
    TooLarge { len: usize, limit: usize },
    /// Too many sends are waiting for room to this peer, or too many peers.
    #[error("too many waiting: {0}")]
    Busy(&'static str),
    #[error("signalling: {0}")]
    Signal(#[from] signal::SignalError),
    /// The client has stopped.
    #[error("the client has stopped")]
    Stopped,
    /// A setting that cannot work (named in the text).
    #[error("invalid client config: {0}")]
    Config(String),
}

/// Per-peer figures ([`Client::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStats {
    /// The data channel's state in the delivery layer.
    pub dc_state: DcState,
    /// The open channel's path.
    pub path: Option<Path>,
    /// Channels that came up ([`ClientEvent::ChannelUp`]) so far.
    pub channels_up: u64,
    /// Calls started by this side.
    pub calls: u64,
    /// DATA frames written to data channels.
    pub dc_data_frames: u64,
    /// To-device batches of messages the homeserver accepted, and their lines (fragments).
    pub matrix_batches: u64,
    pub matrix_lines: u64,
    /// To-device acks alone the homeserver accepted.
    pub matrix_acks: u64,
    /// Sends waiting for room in the replay buffer (at most `max_waiting_sends`).
    pub waiting_sends: usize,
    /// The delivery layer's counters.
    pub counters: Counters,
}

/// The events of a [`Client`]; ends when the client has stopped.
#[derive(Debug)]
pub struct ClientEvents {
    events: mpsc::Receiver<ClientEvent>,
}

impl ClientEvents {
    pub async fn next(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }
}

impl futures_util::Stream for ClientEvents {
    type Item = ClientEvent;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<ClientEvent>> {
        self.events.poll_recv(cx)
    }
}

/// A handle on a running client; cheap to clone. The client stops at [`Client::shutdown`] or when
/// every handle is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<driver::Command>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    user_id: OwnedUserId,
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Commands queued for the driver at most (callers wait for room).
const COMMAND_QUEUE: usize = 64;

impl Client {
    /// Checks the token (`whoami`), starts the `/sync` loop and the driver, and (in the background)
    /// connects to Switchboard: `config.switchboard`, or the one the homeserver's well-known names.
    pub async fn connect(config: ClientConfig) -> Result<(Client, ClientEvents), ClientError> {
        let needed = config.limits.max_message_bytes + config.limits.reorder_buffer_bytes;
        if config.max_held_bytes < needed {
            // One peer may rightly hold this much; below it, a large message could never complete.
            return Err(ClientError::Config(format!(
                "max_held_bytes ({}) is below one peer's max_message_bytes + reorder_buffer_bytes ({needed})",
                config.max_held_bytes
            )));
        }
        let matrix = matrix::MatrixClient::with_clock(
            &config.homeserver,
            config.access_token.clone(),
            config.matrix.clone(),
            config.clock.clone(),
        )?;
        let whoami = matrix.whoami().await?;
        let (commands, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let (events_tx, events) = mpsc::channel(config.events_capacity.max(1));
        let cancel = CancellationToken::new();
        let user_id = whoami.user_id.clone();
        let task = driver::spawn(config, matrix, whoami, commands_rx, events_tx, cancel.clone());
        let shared = Arc::new(Shared { user_id, cancel, task: Mutex::new(Some(task)) });
        Ok((Client { commands, shared }, ClientEvents { events }))
    }

    /// This client's Matrix user.
    pub fn user_id(&self) -> &OwnedUserId {
        &self.shared.user_id
    }

    /// Watches `address`: its presence comes as [`ClientEvent::Presence`] while Switchboard is
    /// connected (watched again after every reconnect). Without Switchboard this only records it.
    pub async fn watch(&self, address: &str) -> Result<(), ClientError> {
        let address = parse(address)?;
        let (reply, answer) = oneshot::channel();
        self.command(driver::Command::Watch { address, reply }).await?;
        answer.await.unwrap_or(Err(ClientError::Stopped))
    }

    /// Wants a data channel to `address`: this side calls (now, or once Switchboard is connected),
    /// and calls again with capped backoff whenever the channel dies, until [`Client::close`].
    /// [`ClientEvent::ChannelUp`] tells when it is up; messages flow through Matrix meanwhile.
    pub async fn open(&self, address: &str) -> Result<(), ClientError> {
        let address = parse(address)?;
        self.command(driver::Command::Open { address }).await
    }

    /// Sends `bytes` to `address`: returns once the message is in the replay buffer (waiting while
    /// it is full: backpressure). It goes over the data channel when one is alive, otherwise
    /// through Matrix at once, and reaches the peer's application exactly once, in order.
    pub async fn send(&self, address: &str, bytes: impl Into<Bytes>) -> Result<(), ClientError> {
        let address = parse(address)?;
        let (reply, answer) = oneshot::channel();
        self.command(driver::Command::Send { address, bytes: bytes.into(), reply }).await?;
        answer.await.unwrap_or(Err(ClientError::Stopped))
    }

    /// Hangs up the data channel to `address` and stops calling it again. Messages still flow
    /// through Matrix; the peer may call again (answered per [`AcceptCalls`]).
    pub async fn close(&self, address: &str) -> Result<(), ClientError> {
        let address = parse(address)?;
        self.command(driver::Command::Close { address }).await
    }

    /// Drops the data channel to `address` as a failure would (the peer connection is closed, no
    /// hangup is sent): what it carried unacknowledged goes through Matrix, and a side that
    /// [`Client::open`]ed calls again after its backoff. For tests and for checking the fallback.
    pub async fn reset_channel(&self, address: &str) -> Result<(), ClientError> {
        let address = parse(address)?;
        self.command(driver::Command::Reset { address }).await
    }

    /// The figures of `address`, `None` when the client has no state for it.
    pub async fn stats(&self, address: &str) -> Result<Option<PeerStats>, ClientError> {
        let address = parse(address)?;
        let (reply, answer) = oneshot::channel();
        self.command(driver::Command::Stats { address, reply }).await?;
        answer.await.map_err(|_| ClientError::Stopped)
    }

    /// Stops the client: hangs up its channels, closes the signalling connection, ends `/sync`.
    /// Messages still in replay buffers are lost (see docs/protocol.md, "Restarts").
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        let task = self.shared.task.lock().await.take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    async fn command(&self, command: driver::Command) -> Result<(), ClientError> {
        self.commands.send(command).await.map_err(|_| ClientError::Stopped)
    }
}

fn parse(address: &str) -> Result<Address, ClientError> {
    Address::parse(address).map_err(|_| ClientError::InvalidAddress(address.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_memory_budget_below_one_peers_bounds_is_refused_before_any_request() {
        // Nothing listens on port 9 of loopback: the check comes before the homeserver is asked.
        let mut config = ClientConfig::new("http://127.0.0.1:9".parse().unwrap(), "token");
        config.max_held_bytes = config.limits.max_message_bytes;
        let error = Client::connect(config).await.map(|_| ()).unwrap_err();
        assert!(matches!(error, ClientError::Config(_)), "{error:?}");
        assert!(error.to_string().contains("max_held_bytes"), "{error}");
    }
}
