//! One client WebSocket: authentication (a header checked before the upgrade, or an `auth` frame),
//! then a reader that handles the client's frames one at a time, in order, and a writer that drains
//! the socket's queue and pings.
//!
//! The two halves are separate tasks so that a reader waiting for its signal to be delivered to a
//! peer never stops this socket from receiving what peers send it.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;

use super::Signal;
use super::hub::{self, Full, Outbound, Outbox};
use super::protocol::{self, ClientFrame, ErrorCode, Limits, ServerFrame, close};
use super::service::{Signalling, Submitted};
use crate::directory::identity::Address;
use crate::homeserver::Whoami;
use crate::telemetry::CodeLabel;

/// Error frames in a row after which the socket is closed as abusive.
const MAX_STRIKES: u32 = 32;

/// Unknown addresses of one `watch` frame that are looked up on the homeserver.
const WATCH_LOOKUPS: usize = 16;

/// How long the writer tries to send the close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Serves one upgraded socket until it closes. `authenticated`: the caller and token when the
/// upgrade request carried one (checked before upgrading); otherwise the first frame must be `auth`.
/// `upgraded_at`: when the upgrade was answered (the `auth_timeout_secs` count from it).
pub async fn run(
    service: Arc<Signalling>,
    socket: WebSocket,
    authenticated: Option<(Whoami, String)>,
    source: Option<IpAddr>,
    upgraded_at: Instant,
) {
    let (mut sink, mut stream) = socket.split();
    let (whoami, token) = match authenticated {
        Some(authenticated) => authenticated,
        None => match authenticate(&service, &mut stream, source, upgraded_at).await {
            Ok(authenticated) => authenticated,
            Err(refusal) => {
                refuse(&service, &mut sink, refusal).await;
                return;
            }
        },
    };
    let user_id: Arc<str> = whoami.user_id.as_str().into();
    let device_id: Option<Arc<str>> = whoami.device_id.as_ref().map(|d| d.as_str().into());
    let limits = &service.settings.limits;
    let (outbox, queue) =
        hub::outbox(service.hub.next_id(), device_id.clone(), limits.send_queue, &service.shutdown);
    if let Err(full) = service.hub.join(&user_id, outbox.clone()) {
        let (code, message) = match full {
            Full::Instance => (close::SERVICE_RESTART, "this instance is full; try another"),
            Full::User => (close::TOO_MANY_CONNECTIONS, "too many connections for this user"),
        };
        let frame = ServerFrame::error(ErrorCode::Refused, message, None);
        refuse(&service, &mut sink, Refusal { code, frame: Some(frame) }).await;
        return;
    }
    let metrics = &service.metrics.signalling;
    metrics.connections.inc();
    tracing::debug!(user_id = %user_id, "signalling.connect: socket open");
    let online = service.directory.connected(&user_id);
    service.user_joined(&user_id).await;
    // The keepalive, revalidation and ICE timers count from here, before the client can see `ready`.
    let started = service.clock.now();
    let writer = service.tasks.spawn(write(sink, queue, outbox.clone(), service.clone(), started));

    let ready = ServerFrame::Ready {
        protocol: protocol::VERSION,
        user_id: user_id.to_string(),
        device_id: device_id.as_deref().map(str::to_owned),
        address: service.verified_address(&user_id),
        ice_servers: service.ice_servers(&user_id),
        limits: Limits {
            max_frame_bytes: protocol::MAX_FRAME_BYTES,
            frames_per_sec: limits.frames_per_sec,
            max_watched: limits.max_watched,
            keepalive_secs: limits.keepalive_secs,
        },
    };
    outbox.push(ready.to_text().into(), None);

    let mut session = Session {
        service: service.clone(),
        user_id: user_id.clone(),
        device_id,
        token,
        source,
        outbox: outbox.clone(),
        watched: HashSet::new(),
        tokens: f64::from(limits.frames_per_sec) * 2.0,
        refilled: started,
        strikes: 0,
    };
    session.read(&mut stream, started).await;

    // The socket is done: close it (unless the service's shutdown or an earlier reason closed it),
    // forget it, and keep the user online for the grace period, so that a reconnect does not flap.
    if !outbox.closing.is_cancelled() {
        outbox.close(close::NORMAL);
    }
    let _ = writer.await;
    // The closing handshake: read what the client still sends until its close frame, so that the
    // kernel does not reset the connection (which would discard our last frames at the client).
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    for address in service.hub.leave(&user_id, outbox.id, &session.watched) {
        service.directory.release(&address);
    }
    service.user_left(&user_id);
    metrics.watched_addresses.set(i64::try_from(service.hub.watched_addresses()).unwrap_or(i64::MAX));
    metrics.connections.dec();
    let code = outbox.close_code().unwrap_or(close::SERVICE_RESTART);
    metrics.closed.get_or_create(&CodeLabel { code: code_label(code) }).inc();
    tracing::debug!(user_id = %user_id, code, "signalling.disconnect: socket closed");
    if let Some(online) = online {
        let grace = Duration::from_secs(limits.offline_grace_secs);
        let (clock, shutdown) = (service.clock.clone(), service.shutdown.clone());
        service.tasks.spawn(async move {
            tokio::select! {
                () = clock.sleep(grace) => {}
                () = shutdown.cancelled() => {}
            }
            drop(online);
        });
    }
}

/// Why a socket is closed before it joins, and the frame that says so.
struct Refusal {
    code: u16,
    frame: Option<ServerFrame>,
}

async fn refuse(service: &Signalling, sink: &mut SplitSink<WebSocket, Message>, refusal: Refusal) {
    let metrics = &service.metrics.signalling;
    metrics.connections_refused.get_or_create(&CodeLabel { code: code_label(refusal.code) }).inc();
    let sending = async {
        if let Some(frame) = refusal.frame {
            if let ServerFrame::Error { code, .. } = &frame {
                metrics.errors.get_or_create(&CodeLabel { code: error_label(*code) }).inc();
            }
            sink.send(Message::Text(frame.to_text().into())).await?;
        }
        let frame = CloseFrame { code: refusal.code, reason: close::reason(refusal.code).into() };
        sink.send(Message::Close(Some(frame))).await
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, sending).await;
}

/// Waits for the `auth` frame (within `auth_timeout_secs`) and checks its token.
async fn authenticate(
    service: &Signalling,
    stream: &mut SplitStream<WebSocket>,
    source: Option<IpAddr>,
    upgraded_at: Instant,
) -> Result<(Whoami, String), Refusal> {
    let timeout = Duration::from_secs(service.settings.limits.auth_timeout_secs);
    let deadline = upgraded_at + timeout;
    let unauthorized = |message: &'static str, reference: Option<Value>| Refusal {
        code: close::UNAUTHORIZED,
        frame: Some(ServerFrame::error(ErrorCode::NotAuthenticated, message, reference)),
    };
    loop {
        let message = tokio::select! {
            message = stream.next() => message,
            () = service.clock.sleep_until(deadline) => {
                let frame = ServerFrame::error(ErrorCode::NotAuthenticated, "no auth frame in time", None);
                return Err(Refusal { code: close::AUTH_TIMEOUT, frame: Some(frame) });
            }
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Binary(_))) => return Err(unauthorized("the first frame must be auth", None)),
            Some(Ok(Message::Close(_)) | Err(_)) | None => {
                return Err(Refusal { code: close::NORMAL, frame: None });
            }
        };
        return match protocol::parse(text.as_str()) {
            Ok((id, ClientFrame::Auth { token })) => match service.auth.check(&token, source).await {
                Ok(whoami) => Ok((whoami, token)),
                Err(error) => {
                    // Only an unknown token is the client's problem; otherwise try again later.
                    let (close_code, code) = match error.errcode {
                        "M_UNKNOWN_TOKEN" | "M_MISSING_TOKEN" => {
                            (close::UNAUTHORIZED, ErrorCode::NotAuthenticated)
                        }
                        "M_LIMIT_EXCEEDED" => (close::TRY_AGAIN_LATER, ErrorCode::RateLimited),
                        _ => (close::TRY_AGAIN_LATER, ErrorCode::Internal),
                    };
                    let retry_after_ms =
                        error.retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                    let frame = ServerFrame::Error {
                        code,
                        message: error.error.clone(),
                        reference: id,
                        retry_after_ms,
                    };
                    Err(Refusal { code: close_code, frame: Some(frame) })
                }
            },
            Ok((id, _)) => Err(unauthorized("the first frame must be auth", id)),
            Err(error) => Err(unauthorized("the first frame must be auth", error.id)),
        };
    }
}

/// Drains the socket's queue into the socket and pings every `keepalive_secs`, until the socket is
/// closed; then sends what is still queued and the close frame.
async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Outbound>,
    outbox: Outbox,
    service: Arc<Signalling>,
    started: Instant,
) {
    let clock = &service.clock;
    let keepalive = Duration::from_secs(service.settings.limits.keepalive_secs);
    let mut ping_at = started + keepalive;
    loop {
        tokio::select! {
            biased;
            () = outbox.closing.cancelled() => break,
            item = queue.recv() => {
                let Some(Outbound { text, written }) = item else { break };
                if sink.send(Message::Text(Utf8Bytes::from(&*text))).await.is_err() {
                    outbox.close(close::NORMAL);
                    return;
                }
                if let Some(written) = written {
                    let _ = written.send(());
                }
            }
            () = clock.sleep_until(ping_at) => {
                ping_at = clock.now() + keepalive;
                if sink.send(Message::Ping(axum::body::Bytes::new())).await.is_err() {
                    outbox.close(close::NORMAL);
                    return;
                }
            }
        }
    }
    let code = outbox.close_code().unwrap_or(close::SERVICE_RESTART);
    let closing = async {
        // What was queued before the close (the error frame that explains it, say) goes first.
        while let Ok(Outbound { text, .. }) = queue.try_recv() {
            sink.send(Message::Text(Utf8Bytes::from(&*text))).await?;
        }
        let frame = CloseFrame { code, reason: close::reason(code).into() };
        sink.send(Message::Close(Some(frame))).await?;
        sink.close().await
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, closing).await;
}

/// The reader's state for one authenticated socket.
struct Session {
    service: Arc<Signalling>,
    user_id: Arc<str>,
    device_id: Option<Arc<str>>,
    token: String,
    source: Option<IpAddr>,
    outbox: Outbox,
    watched: HashSet<Address>,
    /// The frame budget (a token bucket of `frames_per_sec`, burst twice that).
    tokens: f64,
    refilled: Instant,
    /// Error frames sent in a row.
    strikes: u32,
}

impl Session {
    /// Handles the client's frames until the socket closes, keeping it alive and its token valid.
    async fn read(&mut self, stream: &mut SplitStream<WebSocket>, started: Instant) {
        let service = self.service.clone();
        let clock = &service.clock;
        let limits = &service.settings.limits;
        let keepalive = Duration::from_secs(limits.keepalive_secs);
        let revalidate = Duration::from_secs(limits.revalidate_secs);
        let ice_ttl =
            service.settings.turn.as_ref().map(|(_, _, lifetime)| Duration::from_secs((lifetime / 2).max(1)));
        let mut last_heard = started;
        let mut revalidate_at = started + revalidate;
        let mut ice_at = ice_ttl.map(|ttl| started + ttl);
        loop {
            let ice_due = async {
                match ice_at {
                    Some(at) => clock.sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.outbox.closing.cancelled() => return,
                message = stream.next() => {
                    last_heard = clock.now();
                    match message {
                        Some(Ok(Message::Text(text))) => self.frame(text.as_str()).await,
                        Some(Ok(Message::Binary(_))) => {
                            self.error(ErrorCode::BadFrame, "frames are JSON text, not binary", None, None).await;
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) | None => return,
                        Some(Err(error)) => {
                            // A message over the hard limit, or a broken connection.
                            let too_big = error
                                .into_inner()
                                .downcast_ref::<tungstenite::Error>()
                                .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)));
                            self.outbox.close(if too_big { close::TOO_BIG } else { close::NORMAL });
                            return;
                        }
                    }
                }
                () = clock.sleep_until(last_heard + 2 * keepalive) => {
                    self.outbox.close(close::KEEPALIVE_TIMEOUT);
                    return;
                }
                () = clock.sleep_until(revalidate_at) => {
                    revalidate_at = clock.now() + revalidate;
                    if !self.token_still_valid().await {
                        self.error(ErrorCode::NotAuthenticated, "the access token is no longer valid", None, None).await;
                        self.outbox.close(close::UNAUTHORIZED);
                        return;
                    }
                }
                () = ice_due => {
                    ice_at = ice_ttl.map(|ttl| clock.now() + ttl);
                    if let Some(ice_servers) = service.ice_servers(&self.user_id) {
                        self.send(&ServerFrame::IceServers(ice_servers)).await;
                    }
                }
            }
            if self.strikes >= MAX_STRIKES {
                self.outbox.close(close::ABUSE);
                return;
            }
        }
    }

    /// Whether the homeserver still knows the socket's token (a failure to ask keeps it).
    async fn token_still_valid(&self) -> bool {
        match self.service.auth.check(&self.token, self.source).await {
            Ok(whoami) => *whoami.user_id == *self.user_id,
            Err(error) => error.errcode != "M_UNKNOWN_TOKEN",
        }
    }

    /// Answers the client (waiting for room in its queue).
    async fn send(&self, frame: &ServerFrame) {
        self.outbox.reply(frame.to_text().into()).await;
    }

    async fn error(
        &mut self,
        code: ErrorCode,
        message: impl Into<std::borrow::Cow<'static, str>>,
        reference: Option<Value>,
        retry_after_ms: Option<u64>,
    ) {
        if code.is_clients_fault() {
            self.strikes += 1;
        }
        self.service.metrics.signalling.errors.get_or_create(&CodeLabel { code: error_label(code) }).inc();
        self.send(&ServerFrame::Error { code, message: message.into(), reference, retry_after_ms }).await;
    }

    /// Spends one frame of the budget; `Err(ms)`: over the rate, try again after `ms`.
    fn spend(&mut self) -> Result<(), u64> {
        let rate = f64::from(self.service.settings.limits.frames_per_sec);
        let now = self.service.clock.now();
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * rate).min(rate * 2.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64(((1.0 - self.tokens) / rate).clamp(0.001, 1.0));
        Err(u64::try_from(wait.as_millis()).unwrap_or(1000).max(1))
    }

    async fn frame(&mut self, text: &str) {
        self.service.metrics.signalling.frames_received.inc();
        if let Err(retry_after_ms) = self.spend() {
            self.error(ErrorCode::RateLimited, "too many frames", None, Some(retry_after_ms)).await;
            return;
        }
        let (id, frame) = match protocol::parse(text) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.error(error.code, error.message, error.id, None).await;
                return;
            }
        };
        match frame {
            ClientFrame::Auth { .. } => {
                self.error(ErrorCode::NotAuthenticated, "already authenticated", id, None).await;
            }
            ClientFrame::Ping => {
                self.strikes = 0;
                self.send(&ServerFrame::Pong { reference: id }).await;
            }
            ClientFrame::Watch { addresses } => self.watch(&addresses, id).await,
            ClientFrame::Unwatch { addresses } => self.unwatch(&addresses, id).await,
            ClientFrame::Connected { call_id } => {
                self.strikes = 0;
                self.service.connected(&self.user_id, &call_id).await;
                if let Some(reference) = id {
                    self.send(&ServerFrame::Ok { reference }).await;
                }
            }
            ClientFrame::Signal { to, call_id, event_type, content } => {
                let service = self.service.clone();
                let to_user = match service.recipient(&to).await {
                    Ok(to_user) => to_user,
                    Err(undelivered) => {
                        self.error(undelivered.code, undelivered.message, id, None).await;
                        return;
                    }
                };
                let signal = Signal {
                    from_user: self.user_id.to_string(),
                    from_device: self.device_id.as_deref().map(str::to_owned),
                    to_user,
                    call_id,
                    event_type,
                    content,
                };
                match service.submit(&signal, (self.outbox.clone(), id.clone())).await {
                    Ok(Submitted::Delivered(via)) => {
                        self.strikes = 0;
                        self.send(&ServerFrame::Delivered { reference: id, via }).await;
                    }
                    // `delivered` follows when the call's invite is.
                    Ok(Submitted::Held) => self.strikes = 0,
                    Err(undelivered) => self.error(undelivered.code, undelivered.message, id, None).await,
                }
            }
        }
    }

    async fn parse_addresses(&mut self, texts: &[String], id: Option<&Value>) -> Option<Vec<Address>> {
        match texts.iter().map(|text| Address::parse(text).map_err(|e| format!("{text}: {e}"))).collect() {
            Ok(addresses) => Some(addresses),
            Err(message) => {
                self.error(ErrorCode::Invalid, message, id.cloned(), None).await;
                None
            }
        }
    }

    async fn watch(&mut self, texts: &[String], id: Option<Value>) {
        let Some(addresses) = self.parse_addresses(texts, id.as_ref()).await else { return };
        let new: HashSet<Address> = addresses.iter().filter(|a| !self.watched.contains(a)).copied().collect();
        let max = self.service.settings.limits.max_watched;
        if self.watched.len() + new.len() > max {
            self.error(ErrorCode::TooManyWatched, format!("at most {max} watched addresses"), id, None).await;
            return;
        }
        self.strikes = 0;
        let service = &self.service;
        let now_ms = service.clock.unix_millis();
        let mut lookups = 0;
        for address in &new {
            self.watched.insert(*address);
            if service.hub.watch(*address, &self.outbox) {
                service.directory.hold(*address);
            }
            service.directory.watch(address, now_ms);
            if lookups < WATCH_LOOKUPS && !service.directory.read().knows(address) {
                // Found or not, the answer arrives as a presence frame through the change feed.
                lookups += 1;
                let (directory, address) = (service.directory.clone(), *address);
                service.tasks.spawn(async move { directory.discover(&address).await });
            }
        }
        service
            .metrics
            .signalling
            .watched_addresses
            .set(i64::try_from(service.hub.watched_addresses()).unwrap_or(i64::MAX));
        // The current state first (also for addresses already watched: the client asked).
        for address in &addresses {
            self.outbox.reply(service.presence_frame(address)).await;
        }
        if let Some(reference) = id {
            self.send(&ServerFrame::Ok { reference }).await;
        }
    }

    async fn unwatch(&mut self, texts: &[String], id: Option<Value>) {
        let Some(addresses) = self.parse_addresses(texts, id.as_ref()).await else { return };
        self.strikes = 0;
        for address in &addresses {
            if self.watched.remove(address) && self.service.hub.unwatch(address, self.outbox.id) {
                self.service.directory.release(address);
            }
        }
        if let Some(reference) = id {
            self.send(&ServerFrame::Ok { reference }).await;
        }
    }
}

/// The metric label of a close code.
fn code_label(code: u16) -> &'static str {
    match code {
        close::NORMAL => "normal",
        close::SERVICE_RESTART => "service_restart",
        close::TRY_AGAIN_LATER => "try_again_later",
        close::TOO_BIG => "too_big",
        close::UNAUTHORIZED => "unauthorized",
        close::AUTH_TIMEOUT => "auth_timeout",
        close::ABUSE => "abuse",
        close::KEEPALIVE_TIMEOUT => "keepalive_timeout",
        close::TOO_MANY_CONNECTIONS => "too_many_connections",
        close::SLOW_CONSUMER => "slow_consumer",
        _ => "other",
    }
}

/// The metric label of an error code (its wire name).
fn error_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadFrame => "bad_frame",
        ErrorCode::UnknownType => "unknown_type",
        ErrorCode::Invalid => "invalid",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::NotAuthenticated => "not_authenticated",
        ErrorCode::TooManyWatched => "too_many_watched",
        ErrorCode::UnknownPeer => "unknown_peer",
        ErrorCode::Undeliverable => "undeliverable",
        ErrorCode::Refused => "refused",
        ErrorCode::Duplicate => "duplicate",
        ErrorCode::Late => "late",
        ErrorCode::Glare => "glare",
        ErrorCode::Internal => "internal",
    }
}
