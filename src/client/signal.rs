//! The signalling WebSocket client (protocol v1, docs/protocol.md "Signalling WebSocket").
//!
//! [`SignalConnection::connect`] opens `GET /_switchboard/client/v1/connect` with
//! `Authorization: Bearer <token>` and waits for the server's `ready` frame. After that one task owns
//! the socket: it writes the application's frames (within the server's `frames_per_sec`), matches
//! every answer (`delivered`, `ok`, `pong`, `error`) to the frame it answers by `id`/`ref`, answers
//! the server's WebSocket pings, sends its own `ping` frames every `keepalive_secs` and gives up on
//! a connection that stays silent for `pong_timeout` after one, and hands everything else (signals
//! from peers, presence, glare, calls the broker ended, fresh TURN credentials) to a bounded
//! [`SignalEvents`] stream.
//!
//! A connection that ends, for whatever reason, says why: [`SignalEvent::Closed`] is the stream's
//! last item, [`SignalConnection::closed`] resolves, and every request in flight or made later fails
//! with [`SignalError::Closed`]. Reconnecting is the integrator's policy; [`CloseReason`] carries
//! what it needs (the server's close code). Time comes from a [`Clock`].

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use ruma::{OwnedDeviceId, OwnedUserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::clock::Clock;
use crate::signalling::EventType;

/// The path of the WebSocket under Switchboard's base URL.
pub const CONNECT_PATH: &str = "_switchboard/client/v1/connect";

/// The largest message read from the server (its frames are far smaller; a `presence` frame of an
/// address with many users is the largest).
const MAX_INCOMING_BYTES: usize = 1024 * 1024;

/// How long [`SignalConnection::close`] waits for the server's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Requests waiting for their answer, at most; past it a request fails with
/// [`SignalError::TooManyPending`] (the server answers in order, so this many means it is stuck).
const MAX_PENDING: usize = 1024;

/// Tunables of a connection, each with a documented default.
#[derive(Debug, Clone)]
pub struct SignalOptions {
    /// Where time comes from (keepalive, timeouts, the frame rate).
    pub clock: Clock,
    /// How long the handshake may take, and then how long to wait for `ready`. Default 10 s.
    pub ready_timeout: Duration,
    /// How long a request waits for its answer. Default 30 s (a `signal` may wait up to 5 s for
    /// the peer's socket, then as long as the homeserver takes).
    pub request_timeout: Duration,
    /// How often to send a `ping` frame; `None`: the server's `keepalive_secs`. Default `None`.
    pub keepalive: Option<Duration>,
    /// How long the server may stay silent after one of our pings before the connection counts as
    /// dead ([`CloseReason::KeepaliveTimeout`]). Default 10 s.
    pub pong_timeout: Duration,
    /// Events the stream holds before the application must read them. When it is full the
    /// connection is closed ([`CloseReason::EventsNotRead`]) rather than dropping a signal or
    /// stalling the answers to the application's own requests. Default 1,024 (a `watch` of 1,000
    /// addresses answers 1,000 presence frames at once).
    pub events_capacity: usize,
}

impl Default for SignalOptions {
    fn default() -> Self {
        Self {
            clock: Clock::system(),
            ready_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            keepalive: None,
            pong_timeout: Duration::from_secs(10),
            events_capacity: 1024,
        }
    }
}

/// The server's `ready` frame: who this socket is, and what it may do.
#[derive(Debug, Clone, Deserialize)]
pub struct Ready {
    pub protocol: u32,
    pub user_id: OwnedUserId,
    pub device_id: Option<OwnedDeviceId>,
    /// The address the user provably holds (checksummed), `None` until Switchboard verified it.
    pub address: Option<String>,
    /// TURN URIs and credentials; `None` when the server has no TURN configured.
    pub ice_servers: Option<IceServers>,
    pub limits: Limits,
}

/// TURN URIs and credentials (`ready.ice_servers` and the `ice_servers` frame).
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct IceServers {
    pub uris: Vec<String>,
    pub username: String,
    pub password: String,
    /// Seconds the credentials stay valid; fresh ones come at about half of it.
    pub ttl: u64,
}

impl fmt::Debug for IceServers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IceServers")
            .field("uris", &self.uris)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// What the server enforces on this socket.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub frames_per_sec: u32,
    pub max_watched: usize,
    pub keepalive_secs: u64,
}

/// How a signal reached its recipient (or came to us).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// The peer's WebSocket.
    Relay,
    /// The homeserver (a to-device message).
    Matrix,
}

/// A signal from a peer.
#[derive(Debug, Clone)]
pub struct IncomingSignal {
    /// The sender, as its access token (or its homeserver) vouches for it.
    pub from: OwnedUserId,
    /// The address the sender provably holds (checksummed), when verified.
    pub from_address: Option<String>,
    pub from_device: Option<OwnedDeviceId>,
    pub call_id: String,
    pub event_type: EventType,
    /// Matrix VoIP v1 content.
    pub content: Map<String, Value>,
    pub via: Via,
}

/// The state of a watched address (the shape of `GET …/v1/peers/{address}`).
#[derive(Debug, Clone)]
pub struct Presence {
    /// Checksummed, whatever form was watched: compare case-insensitively.
    pub address: String,
    pub reachable: bool,
    /// The whole frame, for the fields not modelled here (`users`: ids, presence, capabilities).
    pub frame: Value,
}

/// What the server pushes, in the order it came.
#[derive(Debug, Clone)]
pub enum SignalEvent {
    Signal(IncomingSignal),
    Presence(Presence),
    /// Two users invited each other at once: `call_id` lost and is over, `winner` goes on.
    Glare {
        call_id: String,
        winner: String,
    },
    /// The broker ended a call by itself (`expired`, `failed`, …): tear it down.
    CallEnded {
        call_id: String,
        outcome: String,
    },
    /// Fresh TURN credentials, for new peer connections and ICE restarts.
    IceServers(IceServers),
    /// An `error` frame that answers none of our requests (one without a `ref`: `rate_limited`,
    /// or the explanation sent before a close).
    Error(ServerError),
    /// The connection ended; always the last event.
    Closed(CloseReason),
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The server closed it with this code (docs/protocol.md "Close codes": 1012 reconnect at
    /// once, 4001 get a new token, …).
    Server { code: u16, reason: String },
    /// The connection ended without a close frame (or failed).
    Dropped(String),
    /// The server stayed silent for `pong_timeout` after our ping.
    KeepaliveTimeout,
    /// The application let [`SignalOptions::events_capacity`] events pile up.
    EventsNotRead,
    /// [`SignalConnection::close`], or every handle dropped.
    Local,
}

impl CloseReason {
    /// The server's close code, when it sent one.
    pub fn code(&self) -> Option<u16> {
        match self {
            CloseReason::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Server { code, reason } => write!(f, "closed by the server: {code} {reason}"),
            CloseReason::Dropped(why) => write!(f, "connection dropped: {why}"),
            CloseReason::KeepaliveTimeout => f.write_str("no answer to our keepalive"),
            CloseReason::EventsNotRead => f.write_str("the application did not read its events"),
            CloseReason::Local => f.write_str("closed by us"),
        }
    }
}

/// The `code` of a server `error` frame (docs/protocol.md, `error`): one the server's protocol
/// module defines, or one this client does not know (the server may add some within v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    Known(crate::signalling::protocol::ErrorCode),
    Other(String),
}

impl ErrorCode {
    fn parse(code: &str) -> Self {
        serde_json::from_value(Value::String(code.to_owned()))
            .map_or_else(|_| Self::Other(code.to_owned()), Self::Known)
    }
}

/// A server `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: ErrorCode,
    /// A sentence for people; may change.
    pub message: String,
    /// `rate_limited` only: when to send again.
    pub retry_after_ms: Option<u64>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Everything that can go wrong with the signalling connection.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("invalid Switchboard base URL: {0}")]
    InvalidUrl(String),
    /// HTTP 401: the homeserver does not know the access token (`M_UNKNOWN_TOKEN`). Get a new one.
    #[error("access token refused ({errcode}): {message}")]
    Unauthorized { errcode: String, message: String },
    /// Another HTTP answer instead of the upgrade (429 and 503 carry `retry_after_ms`).
    #[error("upgrade refused with HTTP {status} ({errcode}): {message}")]
    Refused { status: u16, errcode: String, message: String, retry_after_ms: Option<u64> },
    /// The WebSocket could not be opened (connection refused, TLS, a bad handshake).
    #[error("WebSocket: {0}")]
    Connect(#[source] Box<tungstenite::Error>),
    /// The handshake, or then the `ready` frame, took longer than [`SignalOptions::ready_timeout`].
    #[error("no ready frame in time")]
    NoReady,
    /// The server sent something this client cannot read where it needed to (a malformed `ready`).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server answered the request with an `error` frame.
    #[error("server error {0}")]
    Server(ServerError),
    /// No answer within [`SignalOptions::request_timeout`].
    #[error("no answer in time")]
    Timeout,
    /// 1,024 requests are waiting for their answers (the server answers in order: it is stuck).
    #[error("too many requests waiting for an answer")]
    TooManyPending,
    /// A frame over the server's `max_frame_bytes`.
    #[error("frame of {0} bytes is over the server's limit")]
    TooLarge(usize),
    /// The connection has ended.
    #[error("{0}")]
    Closed(CloseReason),
}

impl SignalError {
    /// The server's error code, when the server answered with an `error` frame.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            SignalError::Server(error) => Some(&error.code),
            _ => None,
        }
    }
}

/// A request's answer.
#[derive(Debug)]
enum Answer {
    Delivered(Via),
    Ok,
    Pong,
}

type Reply = oneshot::Sender<Result<Answer, SignalError>>;

/// What the handles ask the connection's task to do.
enum Command {
    /// Send this frame (it gets the `id` here) and answer `reply` when the server answers it.
    Request {
        frame: Map<String, Value>,
        reply: Reply,
    },
    Close,
}

struct Shared {
    ready: Ready,
    options: SignalOptions,
    /// The latest TURN credentials (`ready`, then every `ice_servers` frame).
    ice_servers: watch::Receiver<Option<IceServers>>,
    /// Set once, when the connection ends.
    closed: watch::Receiver<Option<CloseReason>>,
}

/// A handle on one signalling connection; cheap to clone. The connection closes when
/// [`SignalConnection::close`] is called or every handle is dropped.
#[derive(Clone)]
pub struct SignalConnection {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl fmt::Debug for SignalConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignalConnection")
            .field("user_id", &self.shared.ready.user_id)
            .finish_non_exhaustive()
    }
}

/// The events of a connection, in the order the server sent them; ends after
/// [`SignalEvent::Closed`].
#[derive(Debug)]
pub struct SignalEvents {
    events: mpsc::Receiver<SignalEvent>,
}

impl SignalEvents {
    /// The next event; `None` once the connection has ended and [`SignalEvent::Closed`] was read.
    pub async fn next(&mut self) -> Option<SignalEvent> {
        self.events.recv().await
    }
}

impl Stream for SignalEvents {
    type Item = SignalEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<SignalEvent>> {
        self.events.poll_recv(cx)
    }
}

impl SignalConnection {
    /// Connects to the Switchboard at `base_url` (`https://…`, `http://…`, or directly `wss://…`;
    /// the WebSocket is at [`CONNECT_PATH`] under it) with a Matrix access token, and waits for
    /// `ready`.
    pub async fn connect(base_url: &str, access_token: &str) -> Result<(Self, SignalEvents), SignalError> {
        Self::connect_with(base_url, access_token, SignalOptions::default()).await
    }

    /// [`SignalConnection::connect`] with explicit options.
    #[tracing::instrument(name = "signal.connect", skip_all)]
    pub async fn connect_with(
        base_url: &str,
        access_token: &str,
        options: SignalOptions,
    ) -> Result<(Self, SignalEvents), SignalError> {
        let url = connect_url(base_url)?;
        let mut request =
            url.as_str().into_client_request().map_err(|error| SignalError::InvalidUrl(error.to_string()))?;
        let bearer: http::HeaderValue = format!("Bearer {access_token}")
            .parse()
            .map_err(|_| SignalError::Protocol("the access token is not a valid header value".to_owned()))?;
        request.headers_mut().insert(http::header::AUTHORIZATION, bearer);
        let config = tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(MAX_INCOMING_BYTES))
            .max_frame_size(Some(MAX_INCOMING_BYTES));
        // Boxed: the handshake's future (TLS included) is large.
        let connecting = Box::pin(tokio_tungstenite::connect_async_with_config(request, Some(config), true));
        let outcome = tokio::select! {
            outcome = connecting => outcome,
            () = options.clock.sleep(options.ready_timeout) => return Err(SignalError::NoReady),
        };
        match outcome {
            Ok((socket, _)) => start(socket, options).await,
            Err(tungstenite::Error::Http(response)) => Err(refusal(&response)),
            Err(error) => Err(SignalError::Connect(Box::new(error))),
        }
    }

    /// The server's `ready` frame.
    pub fn ready(&self) -> &Ready {
        &self.shared.ready
    }

    /// The freshest TURN credentials (`ready`'s, or a later `ice_servers` frame's).
    pub fn ice_servers(&self) -> Option<IceServers> {
        self.shared.ice_servers.borrow().clone()
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.closed.borrow().clone()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.borrow().is_some()
    }

    /// Resolves when the connection ends, with why.
    pub async fn closed(&self) -> CloseReason {
        let mut closed = self.shared.closed.clone();
        match closed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or(CloseReason::Local),
            // The task is gone without saying why: it can only have been dropped with the runtime.
            Err(_) => CloseReason::Dropped("the connection task ended".to_owned()),
        }
    }

    /// Watches `addresses`: one [`SignalEvent::Presence`] per address comes before this returns,
    /// and another at every change.
    pub async fn watch<S: AsRef<str>>(&self, addresses: &[S]) -> Result<(), SignalError> {
        let addresses: Vec<&str> = addresses.iter().map(AsRef::as_ref).collect();
        self.request(frame(json!({ "type": "watch", "addresses": addresses }))).await.map(drop)
    }

    /// Stops the presence pushes of `addresses`.
    pub async fn unwatch<S: AsRef<str>>(&self, addresses: &[S]) -> Result<(), SignalError> {
        let addresses: Vec<&str> = addresses.iter().map(AsRef::as_ref).collect();
        self.request(frame(json!({ "type": "unwatch", "addresses": addresses }))).await.map(drop)
    }

    /// Sends a Matrix VoIP signal to `to` (an address or a user id) and waits until the server has
    /// delivered it (to the peer's socket, or to the homeserver) or refused it.
    #[tracing::instrument(name = "signal.send", skip_all, fields(call_id = %call_id, event_type = event_type.as_str()))]
    pub async fn send_signal(
        &self,
        to: &str,
        call_id: &str,
        event_type: EventType,
        content: Map<String, Value>,
    ) -> Result<Via, SignalError> {
        let frame = frame(json!({
            "type": "signal", "to": to, "call_id": call_id, "event_type": event_type.as_str(),
            "content": content,
        }));
        match self.request(frame).await? {
            Answer::Delivered(via) => Ok(via),
            other => Err(SignalError::Protocol(format!("a signal answered with {other:?}"))),
        }
    }

    /// Tells the broker that this side's data channel of `call_id` is open.
    pub async fn connected(&self, call_id: &str) -> Result<(), SignalError> {
        self.request(frame(json!({ "type": "connected", "call_id": call_id }))).await.map(drop)
    }

    /// An application-level ping; the round-trip time.
    pub async fn ping(&self) -> Result<Duration, SignalError> {
        let started = self.shared.options.clock.now();
        self.request(frame(json!({ "type": "ping" }))).await?;
        Ok(self.shared.options.clock.now().saturating_duration_since(started))
    }

    /// Closes the connection (close code 1000) and waits until it has ended.
    pub async fn close(&self) -> CloseReason {
        let _ = self.commands.send(Command::Close).await;
        self.closed().await
    }

    async fn request(&self, frame: Map<String, Value>) -> Result<Answer, SignalError> {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Request { frame, reply }).await.is_err() {
            return Err(self.closed_error());
        }
        let clock = &self.shared.options.clock;
        tokio::select! {
            answer = answer => answer.unwrap_or_else(|_| Err(self.closed_error())),
            () = clock.sleep(self.shared.options.request_timeout) => Err(SignalError::Timeout),
        }
    }

    fn closed_error(&self) -> SignalError {
        SignalError::Closed(self.close_reason().unwrap_or(CloseReason::Local))
    }
}

fn frame(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// `base_url` with [`CONNECT_PATH`] appended and a WebSocket scheme.
fn connect_url(base_url: &str) -> Result<url::Url, SignalError> {
    let mut base = url::Url::parse(base_url).map_err(|error| SignalError::InvalidUrl(error.to_string()))?;
    let scheme = match base.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => return Err(SignalError::InvalidUrl(format!("unsupported scheme {other}"))),
    };
    base.set_scheme(scheme).map_err(|()| SignalError::InvalidUrl("cannot set the scheme".to_owned()))?;
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    base.set_query(None);
    base.join(CONNECT_PATH).map_err(|error| SignalError::InvalidUrl(error.to_string()))
}

/// The typed error of an HTTP answer instead of an upgrade (Matrix error JSON).
fn refusal(response: &http::Response<Option<Vec<u8>>>) -> SignalError {
    #[derive(Deserialize, Default)]
    struct MatrixError {
        #[serde(default)]
        errcode: String,
        #[serde(default)]
        error: String,
        retry_after_ms: Option<u64>,
    }
    let status = response.status().as_u16();
    let body: MatrixError =
        response.body().as_deref().and_then(|body| serde_json::from_slice(body).ok()).unwrap_or_default();
    if status == 401 {
        SignalError::Unauthorized { errcode: body.errcode, message: body.error }
    } else {
        SignalError::Refused {
            status,
            errcode: body.errcode,
            message: body.error,
            retry_after_ms: body.retry_after_ms,
        }
    }
}

/// Waits for `ready` on a fresh socket, then hands it to its task.
async fn start<S>(
    mut socket: S,
    options: SignalOptions,
) -> Result<(SignalConnection, SignalEvents), SignalError>
where
    S: Stream<Item = Result<Message, tungstenite::Error>>
        + Sink<Message, Error = tungstenite::Error>
        + Unpin
        + Send
        + 'static,
{
    let deadline = options.clock.now() + options.ready_timeout;
    // Frames before `ready` can only be an `error` explaining a close; bounded like every loop.
    let mut error = None;
    let ready = 'ready: {
        for _ in 0..16 {
            let message = tokio::select! {
                message = socket.next() => message,
                () = options.clock.sleep_until(deadline) => return Err(SignalError::NoReady),
            };
            match message {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(&text)
                        .map_err(|_| SignalError::Protocol("a frame that is not JSON".to_owned()))?;
                    match value.get("type").and_then(Value::as_str) {
                        Some("ready") => {
                            break 'ready serde_json::from_value::<Ready>(value)
                                .map_err(|e| SignalError::Protocol(format!("ready: {e}")))?;
                        }
                        Some("error") => error = server_error(&value),
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let reason = close_reason(frame);
                    return Err(match error {
                        Some(error) => SignalError::Server(error),
                        None => SignalError::Closed(reason),
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(SignalError::Closed(CloseReason::Dropped(error.to_string()))),
                None => {
                    return Err(SignalError::Closed(CloseReason::Dropped("ended before ready".to_owned())));
                }
            }
        }
        return Err(SignalError::Protocol("no ready among the first frames".to_owned()));
    };
    tracing::debug!(user_id = %ready.user_id, protocol = ready.protocol, "signal.connect: ready");
    let (commands_tx, commands) = mpsc::channel(64);
    let (events_tx, events) = mpsc::channel(options.events_capacity.max(2));
    let (ice_tx, ice_servers) = watch::channel(ready.ice_servers.clone());
    let (closed_tx, closed) = watch::channel(None);
    let keepalive = options.keepalive.unwrap_or(Duration::from_secs(ready.limits.keepalive_secs.max(1)));
    let task = Task {
        clock: options.clock.clone(),
        bucket: Bucket::new(ready.limits.frames_per_sec, options.clock.now()),
        max_frame_bytes: ready.limits.max_frame_bytes,
        keepalive,
        // Counted from `ready`, not from the task's first turn.
        first_ping: options.clock.now() + keepalive,
        pong_timeout: options.pong_timeout,
        events: events_tx,
        ice: ice_tx,
        closed: closed_tx,
        pending: HashMap::new(),
        next_id: 1,
    };
    tokio::spawn(task.run(socket, commands));
    let shared = Arc::new(Shared { ready, options, ice_servers, closed });
    Ok((SignalConnection { commands: commands_tx, shared }, SignalEvents { events }))
}

fn server_error(value: &Value) -> Option<ServerError> {
    Some(ServerError {
        code: ErrorCode::parse(value.get("code")?.as_str()?),
        message: value.get("message").and_then(Value::as_str).unwrap_or_default().to_owned(),
        retry_after_ms: value.get("retry_after_ms").and_then(Value::as_u64),
    })
}

fn close_reason(frame: Option<CloseFrame>) -> CloseReason {
    match frame {
        Some(frame) => CloseReason::Server { code: frame.code.into(), reason: frame.reason.to_string() },
        None => CloseReason::Dropped("closed without a code".to_owned()),
    }
}

/// The server's frame rate (`frames_per_sec`, bursts of twice that), kept on our side so that our
/// frames are never refused as `rate_limited` (whose error carries no `ref`).
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn new(frames_per_sec: u32, now: Instant) -> Self {
        let rate = f64::from(frames_per_sec.max(1));
        Self { tokens: 2.0 * rate, rate, burst: 2.0 * rate, at: now }
    }

    /// Takes a token if there is one; otherwise how long until there is.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// The task that owns the socket.
struct Task {
    clock: Clock,
    bucket: Bucket,
    max_frame_bytes: usize,
    keepalive: Duration,
    first_ping: Instant,
    pong_timeout: Duration,
    events: mpsc::Sender<SignalEvent>,
    ice: watch::Sender<Option<IceServers>>,
    closed: watch::Sender<Option<CloseReason>>,
    /// Requests waiting for their answer, by `id`.
    pending: HashMap<u64, Reply>,
    next_id: u64,
}

/// What one turn of the task's loop ends with.
enum Step {
    Continue,
    End(CloseReason),
}

impl Task {
    async fn run<S>(mut self, mut socket: S, mut commands: mpsc::Receiver<Command>)
    where
        S: Stream<Item = Result<Message, tungstenite::Error>>
            + Sink<Message, Error = tungstenite::Error>
            + Unpin,
    {
        let mut next_ping = self.first_ping;
        // Set when we pinged and have heard nothing since.
        let mut pong_deadline: Option<Instant> = None;
        let reason = loop {
            let wake = pong_deadline.map_or(next_ping, |deadline| deadline.min(next_ping));
            // Biased: what the server sent is handled before a timer that may have fired meanwhile
            // (a pong read late must not count as missing).
            let step = tokio::select! {
                biased;
                message = socket.next() => {
                    pong_deadline = None;
                    self.incoming(message)
                }
                command = commands.recv() => match command {
                    Some(Command::Request { frame, reply }) => self.send(&mut socket, frame, reply).await,
                    Some(Command::Close) | None => {
                        self.close(&mut socket).await;
                        Step::End(CloseReason::Local)
                    }
                },
                () = self.clock.sleep_until(wake) => {
                    let now = self.clock.now();
                    if pong_deadline.is_some_and(|deadline| now >= deadline) {
                        Step::End(CloseReason::KeepaliveTimeout)
                    } else if now >= next_ping {
                        next_ping = now + self.keepalive;
                        pong_deadline.get_or_insert(now + self.pong_timeout);
                        let ping = Message::Text(json!({ "type": "ping", "id": "keepalive" }).to_string().into());
                        match socket.send(ping).await {
                            Ok(()) => Step::Continue,
                            Err(error) => Step::End(CloseReason::Dropped(error.to_string())),
                        }
                    } else {
                        Step::Continue
                    }
                }
            };
            if let Step::End(reason) = step {
                break reason;
            }
        };
        self.end(reason);
    }

    /// Sends a request frame with a fresh `id`, within the frame rate.
    async fn send<S>(&mut self, socket: &mut S, mut frame: Map<String, Value>, reply: Reply) -> Step
    where
        S: Sink<Message, Error = tungstenite::Error> + Unpin,
    {
        if self.pending.len() >= MAX_PENDING {
            // Requests whose caller gave up (timed out) no longer count.
            self.pending.retain(|_, reply| !reply.is_closed());
            if self.pending.len() >= MAX_PENDING {
                let _ = reply.send(Err(SignalError::TooManyPending));
                return Step::Continue;
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        frame.insert("id".to_owned(), Value::from(id));
        let text = Value::Object(frame).to_string();
        if text.len() > self.max_frame_bytes {
            let _ = reply.send(Err(SignalError::TooLarge(text.len())));
            return Step::Continue;
        }
        // A bounded wait: at most one token's time (1 / frames_per_sec).
        if let Err(wait) = self.bucket.take(self.clock.now()) {
            self.clock.sleep(wait).await;
            let _ = self.bucket.take(self.clock.now());
        }
        self.pending.insert(id, reply);
        match socket.send(Message::Text(text.into())).await {
            Ok(()) => Step::Continue,
            Err(error) => Step::End(CloseReason::Dropped(error.to_string())),
        }
    }

    async fn close<S>(&mut self, socket: &mut S)
    where
        S: Stream<Item = Result<Message, tungstenite::Error>>
            + Sink<Message, Error = tungstenite::Error>
            + Unpin,
    {
        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        // Read until the server's close frame (or the end), for at most CLOSE_WAIT and 1,000 frames.
        let until = self.clock.sleep(CLOSE_WAIT);
        tokio::pin!(until);
        for _ in 0..1000 {
            tokio::select! {
                message = socket.next() => match message {
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
                () = &mut until => return,
            }
        }
    }

    fn incoming(&mut self, message: Option<Result<Message, tungstenite::Error>>) -> Step {
        match message {
            Some(Ok(Message::Text(text))) => self.frame(&text),
            Some(Ok(Message::Close(frame))) => Step::End(close_reason(frame)),
            // Pings are answered by tungstenite as it reads; binary is not in the protocol.
            Some(Ok(_)) => Step::Continue,
            Some(Err(error)) => Step::End(CloseReason::Dropped(error.to_string())),
            None => Step::End(CloseReason::Dropped("the connection ended".to_owned())),
        }
    }

    /// Handles one server frame. Frames this client cannot read are logged and skipped (unknown
    /// types are allowed within v1).
    fn frame(&mut self, text: &str) -> Step {
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            tracing::warn!("signal.frame: a frame that is not JSON");
            return Step::Continue;
        };
        let reference = value.get("ref").and_then(Value::as_u64);
        let event = match value.get("type").and_then(Value::as_str) {
            Some("delivered") => {
                let via = value.get("via").cloned().and_then(|via| serde_json::from_value(via).ok());
                let answer = via
                    .map(Answer::Delivered)
                    .ok_or_else(|| SignalError::Protocol("a delivered frame without a known via".to_owned()));
                self.answer(reference, answer);
                return Step::Continue;
            }
            Some("ok") => {
                self.answer(reference, Ok(Answer::Ok));
                return Step::Continue;
            }
            Some("pong") => {
                self.answer(reference, Ok(Answer::Pong));
                return Step::Continue;
            }
            Some("error") => {
                let Some(error) = server_error(&value) else {
                    tracing::warn!("signal.frame: an error frame without a code");
                    return Step::Continue;
                };
                match reference.and_then(|id| self.pending.remove(&id)) {
                    Some(reply) => {
                        let _ = reply.send(Err(SignalError::Server(error)));
                        return Step::Continue;
                    }
                    None => SignalEvent::Error(error),
                }
            }
            Some("signal") => match parse_signal(value) {
                Ok(signal) => SignalEvent::Signal(signal),
                Err(error) => {
                    tracing::warn!(%error, "signal.frame: a signal frame this client cannot read");
                    return Step::Continue;
                }
            },
            Some("presence") => {
                let address = value.get("address").and_then(Value::as_str).unwrap_or_default().to_owned();
                let reachable = value.get("reachable").and_then(Value::as_bool).unwrap_or(false);
                SignalEvent::Presence(Presence { address, reachable, frame: value })
            }
            Some("glare") => SignalEvent::Glare {
                call_id: string_field(&value, "call_id"),
                winner: string_field(&value, "winner"),
            },
            Some("call_ended") => SignalEvent::CallEnded {
                call_id: string_field(&value, "call_id"),
                outcome: string_field(&value, "outcome"),
            },
            Some("ice_servers") => match serde_json::from_value::<IceServers>(value) {
                Ok(ice) => {
                    self.ice.send_replace(Some(ice.clone()));
                    SignalEvent::IceServers(ice)
                }
                Err(error) => {
                    tracing::warn!(%error, "signal.frame: an ice_servers frame this client cannot read");
                    return Step::Continue;
                }
            },
            _ => return Step::Continue,
        };
        self.emit(event)
    }

    fn answer(&mut self, reference: Option<u64>, answer: Result<Answer, SignalError>) {
        if let Some(reply) = reference.and_then(|id| self.pending.remove(&id)) {
            let _ = reply.send(answer);
        }
    }

    /// Queues an event, keeping the last slot for [`SignalEvent::Closed`].
    fn emit(&mut self, event: SignalEvent) -> Step {
        if self.events.is_closed() {
            return Step::Continue;
        }
        if self.events.capacity() <= 1 {
            return Step::End(CloseReason::EventsNotRead);
        }
        let _ = self.events.try_send(event);
        Step::Continue
    }

    fn end(mut self, reason: CloseReason) {
        tracing::debug!(%reason, "signal.closed");
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(SignalError::Closed(reason.clone())));
        }
        self.closed.send_replace(Some(reason.clone()));
        let _ = self.events.try_send(SignalEvent::Closed(reason));
    }
}

fn string_field(value: &Value, key: &str) -> String {
    value.get(key).and_then(Value::as_str).unwrap_or_default().to_owned()
}

fn parse_signal(value: Value) -> Result<IncomingSignal, String> {
    #[derive(Deserialize)]
    struct Fields {
        from: OwnedUserId,
        from_address: Option<String>,
        from_device: Option<OwnedDeviceId>,
        call_id: String,
        event_type: String,
        content: Map<String, Value>,
        via: Via,
    }
    let fields: Fields = serde_json::from_value(value).map_err(|error| error.to_string())?;
    let event_type = EventType::parse(&fields.event_type)
        .ok_or_else(|| format!("unknown event type {}", fields.event_type))?;
    Ok(IncomingSignal {
        from: fields.from,
        from_address: fields.from_address,
        from_device: fields.from_device,
        call_id: fields.call_id,
        event_type,
        content: fields.content,
        via: fields.via,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signalling::protocol::ErrorCode as Code;

    /// The server's side of a socket, as channels: what the test pushes is what the client reads.
    struct FakeSocket {
        incoming: mpsc::UnboundedReceiver<Result<Message, tungstenite::Error>>,
        outgoing: mpsc::UnboundedSender<Message>,
    }

    impl Stream for FakeSocket {
        type Item = Result<Message, tungstenite::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.incoming.poll_recv(cx)
        }
    }

    impl Sink<Message> for FakeSocket {
        type Error = tungstenite::Error;

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Self::Error> {
            self.outgoing.send(message).map_err(|_| tungstenite::Error::ConnectionClosed)
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    struct Server {
        to_client: mpsc::UnboundedSender<Result<Message, tungstenite::Error>>,
        from_client: mpsc::UnboundedReceiver<Message>,
    }

    impl Server {
        fn push(&self, frame: &Value) {
            self.to_client.send(Ok(Message::Text(frame.to_string().into()))).unwrap();
        }

        /// The next text frame the client sent.
        async fn frame(&mut self) -> Value {
            for _ in 0..100 {
                if let Message::Text(text) = self.from_client.recv().await.expect("the client is connected") {
                    return serde_json::from_str(&text).unwrap();
                }
            }
            panic!("no text frame among 100 messages");
        }
    }

    fn ready() -> Value {
        json!({
            "type": "ready", "protocol": 1, "user_id": "@0xab:localhost", "device_id": "DEV",
            "address": null,
            "ice_servers": { "uris": ["turn:127.0.0.1:3478?transport=udp"], "username": "u",
                             "password": "p", "ttl": 600 },
            "limits": { "max_frame_bytes": 65536, "frames_per_sec": 100, "max_watched": 1000,
                        "keepalive_secs": 20 },
        })
    }

    async fn connected(options: SignalOptions) -> (SignalConnection, SignalEvents, Server) {
        let (to_client, incoming) = mpsc::unbounded_channel();
        let (outgoing, from_client) = mpsc::unbounded_channel();
        let server = Server { to_client, from_client };
        server.push(&ready());
        let (connection, events) = start(FakeSocket { incoming, outgoing }, options).await.unwrap();
        (connection, events, server)
    }

    fn manual() -> SignalOptions {
        SignalOptions { clock: Clock::manual(1_700_000_000_000), ..SignalOptions::default() }
    }

    #[tokio::test]
    async fn a_signal_resolves_on_its_delivered_frame_and_fails_with_the_servers_code() {
        let (connection, _events, mut server) = connected(SignalOptions::default()).await;
        assert_eq!(connection.ready().device_id.as_deref().map(ruma::DeviceId::as_str), Some("DEV"));
        assert_eq!(connection.ice_servers().unwrap().username, "u");

        let sending = connection.send_signal("0xab", "c1", EventType::Invite, Map::new());
        let answering = async {
            let frame = server.frame().await;
            assert_eq!(frame["type"], "signal");
            assert_eq!(frame["event_type"], "m.call.invite");
            // An answer to another id first: it must not resolve this one.
            server.push(&json!({ "type": "delivered", "ref": 999, "via": "matrix" }));
            server.push(&json!({ "type": "delivered", "ref": frame["id"], "via": "relay" }));
        };
        let (via, ()) = tokio::join!(sending, answering);
        assert_eq!(via.unwrap(), Via::Relay);

        let sending = connection.send_signal("0xcd", "c2", EventType::Invite, Map::new());
        let answering = async {
            let frame = server.frame().await;
            server.push(
                &json!({ "type": "error", "code": "unknown_peer", "message": "nobody", "ref": frame["id"] }),
            );
        };
        let (error, ()) = tokio::join!(sending, answering);
        let error = error.unwrap_err();
        assert_eq!(error.code(), Some(&ErrorCode::Known(Code::UnknownPeer)), "{error:?}");
    }

    #[tokio::test]
    async fn pushed_frames_become_events_and_a_close_code_ends_the_stream() {
        let (connection, mut events, server) = connected(SignalOptions::default()).await;
        server.push(&json!({ "type": "something_new", "x": 1 }));
        server.push(&json!({
            "type": "signal", "from": "@0xcd:localhost", "from_address": "0xCd", "from_device": "B",
            "call_id": "c1", "event_type": "m.call.hangup", "content": { "call_id": "c1" }, "via": "relay",
        }));
        server.push(&json!({ "type": "glare", "call_id": "c2", "winner": "c1" }));
        server.push(
            &json!({ "type": "ice_servers", "uris": [], "username": "u2", "password": "p2", "ttl": 60 }),
        );
        server.push(&json!({ "type": "error", "code": "brand_new", "message": "?" }));
        let close = CloseFrame { code: CloseCode::from(1012), reason: "server restarting; reconnect".into() };
        server.to_client.send(Ok(Message::Close(Some(close)))).unwrap();

        let Some(SignalEvent::Signal(signal)) = events.next().await else { panic!("a signal first") };
        assert_eq!(
            (signal.call_id.as_str(), signal.event_type, signal.via),
            ("c1", EventType::Hangup, Via::Relay)
        );
        assert!(
            matches!(events.next().await, Some(SignalEvent::Glare { call_id, winner }) if call_id == "c2" && winner == "c1")
        );
        assert!(matches!(events.next().await, Some(SignalEvent::IceServers(ice)) if ice.username == "u2"));
        let Some(SignalEvent::Error(error)) = events.next().await else { panic!("the unsolicited error") };
        assert_eq!(error.code, ErrorCode::Other("brand_new".to_owned()));
        let Some(SignalEvent::Closed(reason)) = events.next().await else { panic!("closed last") };
        assert_eq!(reason.code(), Some(1012));
        assert!(events.next().await.is_none());
        assert_eq!(connection.closed().await.code(), Some(1012));
        assert_eq!(connection.ice_servers().unwrap().username, "u2");
        let error = connection.ping().await.unwrap_err();
        assert!(matches!(error, SignalError::Closed(CloseReason::Server { code: 1012, .. })), "{error:?}");
    }

    #[tokio::test]
    async fn a_silent_server_is_given_up_after_the_pong_timeout() {
        let options = manual();
        let clock = options.clock.clone();
        let (connection, mut events, mut server) = connected(options).await;
        clock.advance(Duration::from_secs(20));
        let ping = server.frame().await;
        assert_eq!(ping["type"], "ping");
        // Any frame proves the connection alive.
        server.push(&json!({ "type": "pong", "ref": ping["id"] }));
        clock.advance(Duration::from_secs(20));
        assert_eq!(server.frame().await["type"], "ping");
        assert!(!connection.is_closed());
        clock.advance(Duration::from_secs(10));
        let Some(SignalEvent::Closed(reason)) = events.next().await else { panic!("closed") };
        assert_eq!(reason, CloseReason::KeepaliveTimeout);
    }

    #[tokio::test]
    async fn an_application_that_does_not_read_its_events_is_disconnected_not_dropped_from() {
        let options = SignalOptions { events_capacity: 3, ..SignalOptions::default() };
        let (connection, mut events, server) = connected(options).await;
        for n in 0..5 {
            server.push(&json!({ "type": "presence", "address": format!("0x{n}"), "reachable": true }));
        }
        assert_eq!(connection.closed().await, CloseReason::EventsNotRead);
        let mut seen = Vec::new();
        while let Some(event) = events.next().await {
            seen.push(event);
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(matches!(seen[2], SignalEvent::Closed(CloseReason::EventsNotRead)));
    }

    #[tokio::test]
    async fn a_request_without_an_answer_times_out_and_a_local_close_says_so() {
        let options = manual();
        let clock = options.clock.clone();
        let (connection, _events, mut server) = connected(options).await;
        let watching = connection.watch(&["0xab"]);
        let stepping = async {
            assert_eq!(server.frame().await["type"], "watch");
            clock.advance(Duration::from_secs(30));
        };
        let (watched, ()) = tokio::join!(watching, stepping);
        assert!(matches!(watched, Err(SignalError::Timeout)), "{watched:?}");
        let closing = connection.close();
        let answering = async {
            let Some(Message::Close(Some(frame))) = server.from_client.recv().await else {
                panic!("a close")
            };
            assert_eq!(u16::from(frame.code), 1000);
            server.to_client.send(Ok(Message::Close(Some(frame)))).unwrap();
        };
        let (reason, ()) = tokio::join!(closing, answering);
        assert_eq!(reason, CloseReason::Local);
    }

    #[test]
    fn the_frame_rate_allows_twice_the_rate_in_a_burst_then_one_frame_per_interval() {
        let start = Instant::now();
        let mut bucket = Bucket::new(2, start);
        for _ in 0..4 {
            assert_eq!(bucket.take(start), Ok(()));
        }
        assert_eq!(bucket.take(start), Err(Duration::from_millis(500)));
        assert_eq!(bucket.take(start + Duration::from_millis(500)), Ok(()));
        assert!(bucket.take(start + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn the_connect_url_is_under_the_base_url_with_a_websocket_scheme() {
        let url = |base: &str| connect_url(base).map(|url| url.to_string());
        assert_eq!(
            url("http://127.0.0.1:8008").unwrap(),
            "ws://127.0.0.1:8008/_switchboard/client/v1/connect"
        );
        assert_eq!(
            url("https://sb.example.org/prefix").unwrap(),
            "wss://sb.example.org/prefix/_switchboard/client/v1/connect"
        );
        assert!(matches!(url("ftp://x"), Err(SignalError::InvalidUrl(_))));
        assert!(matches!(url("not a url"), Err(SignalError::InvalidUrl(_))));
    }
}
