//! The Matrix base layer of the thin client: its own `/sync`, its own to-device sends and the
//! discovery of Switchboard, all with the client's own access token against the homeserver's
//! client-server API. Nothing here depends on Switchboard: with Switchboard down or absent, the
//! client still reaches every peer through the homeserver.
//!
//! Endpoints (Matrix client-server API v1.x):
//! - `GET /_matrix/client/v3/account/whoami` ([`MatrixClient::whoami`]),
//! - `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}` ([`MatrixClient::send_to_device`],
//!   spec section "Send-to-Device messaging"),
//! - `GET /_matrix/client/v3/sync` ([`MatrixClient::spawn_sync`], in [`sync`]),
//! - `POST /_matrix/client/v3/join/{roomIdOrAlias}` (auto-join of invites from peers, in [`sync`]),
//! - `GET /.well-known/matrix/client` ([`discover_switchboard`], spec section "Server Discovery").
//!
//! Invariants:
//! - Every request is bounded in time (`request_timeout`, or the long-poll timeout plus
//!   `request_timeout` for `/sync`) and its answer in bytes (`max_response_bytes`).
//! - Retries are bounded in attempts and in total time ([`Retry`]); a send is retried with the same
//!   transaction id, so the homeserver stores it once however often it was sent. Only transport
//!   failures, `429` and `5xx` are retried; any other error answer (such as `401 M_UNKNOWN_TOKEN`)
//!   is returned at once as a typed [`MatrixError::Homeserver`].
//! - Waiting (backoff, `retry_after_ms`) is on the client's [`Clock`], so tests step it.
//! - The access token never appears in `Debug` output or logs.

pub mod sync;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ruma::to_device::DeviceIdOrAllDevices;
use ruma::{OwnedDeviceId, OwnedUserId, TransactionId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};
use url::Url;

use crate::clock::Clock;
use crate::homeserver::describe;

pub use sync::{SyncEvent, SyncHandle, SyncSettings};

/// The key of the client well-known file under which a homeserver names its Switchboard:
/// `{"org.switchboard.client": {"base_url": "https://…"}}`.
pub const WELL_KNOWN_KEY: &str = "org.switchboard.client";

/// Largest well-known file read (the spec sets no limit; real ones are a few hundred bytes).
const MAX_WELL_KNOWN_BYTES: usize = 64 * 1024;

/// A Matrix error code (`errcode` of the homeserver's error JSON). The codes the client acts on
/// have their own variant; any other is kept as [`Errcode::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Errcode {
    /// `M_UNKNOWN_TOKEN`: the access token is not (or no longer) valid. Not retried.
    UnknownToken,
    /// `M_MISSING_TOKEN`.
    MissingToken,
    /// `M_FORBIDDEN`.
    Forbidden,
    /// `M_LIMIT_EXCEEDED`: rate limited (HTTP 429); retried after `retry_after_ms`.
    LimitExceeded,
    /// `M_NOT_FOUND`.
    NotFound,
    /// `M_UNRECOGNIZED`: the homeserver does not know the endpoint.
    Unrecognized,
    /// `M_BAD_JSON`.
    BadJson,
    /// `M_INVALID_PARAM`.
    InvalidParam,
    /// `M_TOO_LARGE`: the request body is over the homeserver's limit.
    TooLarge,
    /// `M_UNKNOWN`, also used when an error answer carried no Matrix error JSON.
    Unknown,
    /// Any other code, as sent.
    Other(String),
}

impl Errcode {
    /// The code as the homeserver writes it.
    pub fn parse(code: &str) -> Self {
        match code {
            "M_UNKNOWN_TOKEN" => Self::UnknownToken,
            "M_MISSING_TOKEN" => Self::MissingToken,
            "M_FORBIDDEN" => Self::Forbidden,
            "M_LIMIT_EXCEEDED" => Self::LimitExceeded,
            "M_NOT_FOUND" => Self::NotFound,
            "M_UNRECOGNIZED" => Self::Unrecognized,
            "M_BAD_JSON" => Self::BadJson,
            "M_INVALID_PARAM" => Self::InvalidParam,
            "M_TOO_LARGE" => Self::TooLarge,
            "M_UNKNOWN" => Self::Unknown,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The code as the homeserver writes it (`M_UNKNOWN_TOKEN`, …).
    pub fn as_str(&self) -> &str {
        match self {
            Self::UnknownToken => "M_UNKNOWN_TOKEN",
            Self::MissingToken => "M_MISSING_TOKEN",
            Self::Forbidden => "M_FORBIDDEN",
            Self::LimitExceeded => "M_LIMIT_EXCEEDED",
            Self::NotFound => "M_NOT_FOUND",
            Self::Unrecognized => "M_UNRECOGNIZED",
            Self::BadJson => "M_BAD_JSON",
            Self::InvalidParam => "M_INVALID_PARAM",
            Self::TooLarge => "M_TOO_LARGE",
            Self::Unknown => "M_UNKNOWN",
            Self::Other(code) => code,
        }
    }
}

impl fmt::Display for Errcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong talking to the homeserver.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    /// The homeserver URL given to [`MatrixClient::new`] cannot be used (not http(s), no host…).
    #[error("invalid homeserver URL: {0}")]
    InvalidUrl(String),
    /// No (complete) answer: connection refused, timeout, TLS failure, body cut off… The message
    /// carries the causes, without the URL. Retried.
    #[error("homeserver unreachable: {0}")]
    Transport(String),
    /// The homeserver answered with an error status. `errcode` comes from its error JSON
    /// (`M_UNKNOWN` when it sent none); `retry_after` from `retry_after_ms` or `Retry-After`.
    #[error("homeserver answered {status} {errcode}: {message}")]
    Homeserver {
        /// The HTTP status code.
        status: u16,
        /// The Matrix error code.
        errcode: Errcode,
        /// The human-readable `error` of the answer (at most 200 characters of a non-JSON body).
        message: String,
        /// How long the homeserver asked us to wait before retrying (rate limiting).
        retry_after: Option<Duration>,
        /// `soft_logout` of an `M_UNKNOWN_TOKEN` answer: the device may log in again and keep its
        /// data.
        soft_logout: bool,
    },
    /// A success answer that is not what the endpoint documents (not JSON, fields missing…).
    #[error("unexpected answer from the homeserver: {0}")]
    InvalidResponse(String),
    /// The answer's body is larger than `Settings::max_response_bytes`.
    #[error("answer larger than {limit} bytes")]
    ResponseTooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The well-known file has an `org.switchboard.client` entry that is not
    /// `{"base_url": "<http(s) URL>"}`: the operator's configuration is wrong.
    #[error("invalid org.switchboard.client in the well-known file: {0}")]
    InvalidWellKnown(String),
    /// Every attempt of a retried request failed; `last` is the last failure.
    #[error("gave up after {attempts} attempts in {elapsed:?}: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Time from the first attempt until giving up (on the client's clock).
        elapsed: Duration,
        /// The last attempt's error.
        #[source]
        last: Box<MatrixError>,
    },
}

impl MatrixError {
    /// The Matrix error code of the homeserver's answer (also of the last attempt of
    /// [`MatrixError::GaveUp`]), if there was one.
    pub fn errcode(&self) -> Option<&Errcode> {
        match self {
            Self::Homeserver { errcode, .. } => Some(errcode),
            Self::GaveUp { last, .. } => last.errcode(),
            _ => None,
        }
    }

    /// The HTTP status of the homeserver's error answer (also through [`MatrixError::GaveUp`]).
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Homeserver { status, .. } => Some(*status),
            Self::GaveUp { last, .. } => last.status(),
            _ => None,
        }
    }

    /// Whether the access token is invalid (`M_UNKNOWN_TOKEN` or `M_MISSING_TOKEN`): the client
    /// must get a new one; nothing will succeed until then.
    pub fn is_unknown_token(&self) -> bool {
        matches!(self.errcode(), Some(Errcode::UnknownToken | Errcode::MissingToken))
    }

    /// Whether trying again later may succeed: transport failures, `429` and `5xx` (and `408`).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport(_) => true,
            Self::Homeserver { status, .. } => *status == 429 || *status == 408 || *status >= 500,
            _ => false,
        }
    }

    /// How long the homeserver asked us to wait, for a rate-limited answer.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Homeserver { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// How a failing request is retried: backoff `initial_backoff`, doubling up to `max_backoff`
/// (or the homeserver's `retry_after_ms` when it gives one), at most `max_attempts` attempts, and no
/// new attempt that would start more than `max_total` after the first. A request in flight may add
/// up to `Settings::request_timeout` to that. No jitter: one client's sends are few and serial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Wait after the first failure. Default 250 ms.
    pub initial_backoff: Duration,
    /// Longest wait between attempts (a longer `retry_after_ms` is honoured). Default 8 s.
    pub max_backoff: Duration,
    /// Attempts in all, the first included; at least 1. Default 8.
    pub max_attempts: u32,
    /// Time budget from the first attempt. Default 60 s.
    pub max_total: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
            max_attempts: 8,
            max_total: Duration::from_secs(60),
        }
    }
}

impl Retry {
    /// The wait after the `failures`-th failed attempt (1-based) when the homeserver gave no
    /// `retry_after`: `initial_backoff · 2^(failures-1)`, at most `max_backoff`.
    pub fn backoff(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        self.initial_backoff.saturating_mul(1 << exponent).min(self.max_backoff)
    }
}

/// Settings of a [`MatrixClient`]; every field has a documented default ([`Settings::default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Time limit of one request (not of `/sync`'s long poll, which gets its timeout plus this).
    /// Default 10 s.
    pub request_timeout: Duration,
    /// Time limit for establishing a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Retries of sends, `whoami` and joins.
    pub retry: Retry,
    /// Largest answer body read, in bytes (a `/sync` answer included). Default 8 MiB.
    pub max_response_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            retry: Retry::default(),
            max_response_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Who the access token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoAmI {
    /// The user.
    pub user_id: OwnedUserId,
    /// The device the token was issued for (absent for appservice users).
    pub device_id: Option<OwnedDeviceId>,
}

/// Messages of one to-device send: recipient user → device (or `*`, all the user's devices) →
/// event content. A `BTreeMap`, so the request body is stable.
pub type ToDeviceMessages = BTreeMap<OwnedUserId, BTreeMap<DeviceIdOrAllDevices, Value>>;

/// The client's own connection to its homeserver, with its own access token. Cheap to clone;
/// clones share the HTTP connection pool.
#[derive(Clone)]
pub struct MatrixClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// The homeserver's base URL, its path ending in `/`.
    base: Url,
    access_token: String,
    settings: Settings,
    clock: Clock,
}

impl fmt::Debug for MatrixClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatrixClient")
            .field("homeserver", &self.inner.base.as_str())
            .field("access_token", &"[redacted]")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    errcode: Option<String>,
    error: Option<String>,
    retry_after_ms: Option<u64>,
    #[serde(default)]
    soft_logout: bool,
}

#[derive(Deserialize)]
struct WhoAmIBody {
    user_id: OwnedUserId,
    device_id: Option<OwnedDeviceId>,
}

impl MatrixClient {
    /// A client of the homeserver at `homeserver_url` (its client-server API base, such as
    /// `https://matrix.example.org`) with `access_token`, on the system clock. Makes no request.
    pub fn new(
        homeserver_url: &Url,
        access_token: impl Into<String>,
        settings: Settings,
    ) -> Result<Self, MatrixError> {
        Self::with_clock(homeserver_url, access_token, settings, Clock::system())
    }

    /// As [`MatrixClient::new`], waiting (backoff, rate limits) on `clock`.
    pub fn with_clock(
        homeserver_url: &Url,
        access_token: impl Into<String>,
        settings: Settings,
        clock: Clock,
    ) -> Result<Self, MatrixError> {
        let base = base_url(homeserver_url)?;
        let http = http_client(&settings)?;
        Ok(Self { inner: Arc::new(Inner { http, base, access_token: access_token.into(), settings, clock }) })
    }

    /// The homeserver's base URL.
    pub fn homeserver(&self) -> &Url {
        &self.inner.base
    }

    /// The settings this client was made with.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The clock the client waits on.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// Who the access token belongs to (`GET /_matrix/client/v3/account/whoami`), retried on
    /// transport failures, `429` and `5xx`. An invalid token gives
    /// [`MatrixError::Homeserver`] with [`Errcode::UnknownToken`] at once.
    #[tracing::instrument(name = "client.matrix.whoami", skip_all)]
    pub async fn whoami(&self) -> Result<WhoAmI, MatrixError> {
        self.with_retry(|| self.whoami_once()).await
    }

    /// One `whoami` request, not retried (the sync loop retries it its own way).
    async fn whoami_once(&self) -> Result<WhoAmI, MatrixError> {
        let url = self.url(&["_matrix", "client", "v3", "account", "whoami"]);
        let body = self.request_json(reqwest::Method::GET, url, None).await?;
        let body: WhoAmIBody =
            serde_json::from_value(body).map_err(|e| MatrixError::InvalidResponse(format!("whoami: {e}")))?;
        Ok(WhoAmI { user_id: body.user_id, device_id: body.device_id })
    }

    /// Sends one to-device event of `event_type` with `content` to `device` of `user_id`
    /// (`DeviceIdOrAllDevices::AllDevices` for `*`). See [`MatrixClient::send_to_device_batch`].
    pub async fn send_to_device(
        &self,
        event_type: &str,
        user_id: &UserId,
        device: &DeviceIdOrAllDevices,
        content: &Value,
        txn_id: &TransactionId,
    ) -> Result<(), MatrixError> {
        let mut messages = ToDeviceMessages::new();
        messages.entry(user_id.to_owned()).or_default().insert(device.clone(), content.clone());
        self.send_to_device_batch(event_type, &messages, txn_id).await
    }

    /// Sends to-device events of `event_type` to several users and devices in one request
    /// (`PUT /_matrix/client/v3/sendToDevice/{event_type}/{txn_id}`). Returns once the homeserver has
    /// accepted them (it then stores each until the recipient device syncs).
    ///
    /// Retried on transport failures, `429` (after its `retry_after_ms`) and `5xx`, with backoff
    /// and bounds from [`Settings::retry`], always with the same `txn_id`: the homeserver delivers
    /// a transaction id it has already accepted from this device once, however often it is sent.
    /// So a caller retrying after an error must reuse `txn_id` too, and must not reuse it for
    /// different content. Transaction ids are scoped to the access token (its device): after a new
    /// login, a resend with an old transaction id is a new message.
    #[tracing::instrument(
        name = "client.matrix.send_to_device",
        skip_all,
        fields(event_type, txn_id = txn_id.as_str(), users = messages.len())
    )]
    pub async fn send_to_device_batch(
        &self,
        event_type: &str,
        messages: &ToDeviceMessages,
        txn_id: &TransactionId,
    ) -> Result<(), MatrixError> {
        let url = self.url(&["_matrix", "client", "v3", "sendToDevice", event_type, txn_id.as_str()]);
        let body = json!({ "messages": messages });
        self.with_retry(|| self.request_json(reqwest::Method::PUT, url.clone(), Some(&body))).await?;
        Ok(())
    }

    /// Switchboard's base URL from this homeserver's well-known file; see [`discover_switchboard`].
    #[tracing::instrument(name = "client.matrix.discover", skip_all)]
    pub async fn discover_switchboard(&self) -> Result<Option<Url>, MatrixError> {
        discover_with(&self.inner.http, &self.inner.base).await
    }

    /// Sets one field of `user_id`'s profile (`PUT /_matrix/client/v3/profile/{userId}/{field}`
    /// with `{field: value}`), retried like a send.
    pub async fn set_profile_field(
        &self,
        user_id: &ruma::UserId,
        field: &str,
        value: &Value,
    ) -> Result<(), MatrixError> {
        let url = self.url(&["_matrix", "client", "v3", "profile", user_id.as_str(), field]);
        let body = json!({ field: value });
        self.with_retry(|| self.request_json(reqwest::Method::PUT, url.clone(), Some(&body))).await?;
        Ok(())
    }

    /// Joins a room (`POST /_matrix/client/v3/join/{room_id}`), retried like a send.
    pub async fn join_room(&self, room_id: &ruma::RoomId) -> Result<(), MatrixError> {
        let url = self.url(&["_matrix", "client", "v3", "join", room_id.as_str()]);
        let body = json!({});
        self.with_retry(|| self.request_json(reqwest::Method::POST, url.clone(), Some(&body))).await?;
        Ok(())
    }

    /// Creates a private room with `peer` invited (`POST /_matrix/client/v3/createRoom`, preset
    /// `trusted_private_chat`, `is_direct`), the room per pair of the `fallback = room` option.
    /// Not retried: a retry after a lost answer would make a second room.
    pub async fn create_private_room(&self, peer: &UserId) -> Result<ruma::OwnedRoomId, MatrixError> {
        let url = self.url(&["_matrix", "client", "v3", "createRoom"]);
        let body = json!({ "preset": "trusted_private_chat", "is_direct": true, "invite": [peer] });
        let answer = self.request_json(reqwest::Method::POST, url, Some(&body)).await?;
        answer["room_id"]
            .as_str()
            .and_then(|id| ruma::RoomId::parse(id).ok())
            .ok_or_else(|| MatrixError::InvalidResponse(format!("createRoom: no room_id in {answer}")))
    }

    /// Sends an event of `event_type` into a room (`PUT
    /// /_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}`), retried like a to-device
    /// send and with the same rule: one transaction id, one event, however often it is sent.
    pub async fn send_room_event(
        &self,
        room_id: &ruma::RoomId,
        event_type: &str,
        content: &Value,
        txn_id: &TransactionId,
    ) -> Result<(), MatrixError> {
        let url = self.url(&[
            "_matrix",
            "client",
            "v3",
            "rooms",
            room_id.as_str(),
            "send",
            event_type,
            txn_id.as_str(),
        ]);
        self.with_retry(|| self.request_json(reqwest::Method::PUT, url.clone(), Some(content))).await?;
        Ok(())
    }

    /// The URL of a client-server API path; each segment is percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// One request with the access token and the request timeout; a JSON answer or a typed error.
    async fn request_json(
        &self,
        method: reqwest::Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<Value, MatrixError> {
        let bytes = self.request_bytes(method, url, body, self.inner.settings.request_timeout).await?;
        serde_json::from_slice(&bytes).map_err(|e| MatrixError::InvalidResponse(e.to_string()))
    }

    /// One request; the body of a success answer (at most `max_response_bytes`) or a typed error.
    async fn request_bytes(
        &self,
        method: reqwest::Method,
        url: Url,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Vec<u8>, MatrixError> {
        let mut request =
            self.inner.http.request(method, url).bearer_auth(&self.inner.access_token).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| MatrixError::Transport(describe(&e)))?;
        let status = response.status();
        let retry_after_header = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = read_limited(response, self.inner.settings.max_response_bytes).await?;
        if status.is_success() {
            return Ok(bytes);
        }
        Err(error_from_answer(status.as_u16(), &bytes, retry_after_header))
    }

    /// Runs `attempt` until it succeeds, fails with an error that is not retryable, or the bounds
    /// of [`Settings::retry`] are reached ([`MatrixError::GaveUp`]).
    async fn with_retry<T, F, Fut>(&self, mut attempt: F) -> Result<T, MatrixError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, MatrixError>>,
    {
        let retry = self.inner.settings.retry;
        let clock = &self.inner.clock;
        let start = clock.now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let error = match attempt().await {
                Ok(value) => return Ok(value),
                Err(error) if !error.is_retryable() => return Err(error),
                Err(error) => error,
            };
            let delay = error.retry_after().unwrap_or_else(|| retry.backoff(attempts));
            let elapsed = clock.now().saturating_duration_since(start);
            if attempts >= retry.max_attempts.max(1) || elapsed + delay > retry.max_total {
                return Err(MatrixError::GaveUp { attempts, elapsed, last: Box::new(error) });
            }
            tracing::debug!(attempts, ?delay, %error, "retrying");
            clock.sleep(delay).await;
        }
    }
}

/// Switchboard's client base URL from the homeserver's client well-known file
/// (`GET <homeserver_url>/.well-known/matrix/client`, key `org.switchboard.client`, field
/// `base_url`). Pass the URL that serves the well-known file: normally `https://<server_name>`.
///
/// - `Ok(Some(url))`: the key is there with an http(s) `base_url`.
/// - `Ok(None)`: the key is absent, or there is no usable well-known file (a `4xx` answer, or a body
///   that is not a JSON object): the homeserver names no Switchboard, and the client works over
///   Matrix alone.
/// - `Err(MatrixError::Transport)` / `Err(MatrixError::Homeserver)` with a `5xx`: the question could
///   not be asked; the caller may try again later.
/// - `Err(MatrixError::InvalidWellKnown)`: the key is there but malformed (an operator's mistake
///   worth reporting).
///
/// One attempt, with the default request timeout; redirects are followed (at most 10).
#[tracing::instrument(name = "client.matrix.discover", skip_all)]
pub async fn discover_switchboard(homeserver_url: &Url) -> Result<Option<Url>, MatrixError> {
    let base = base_url(homeserver_url)?;
    let http = http_client(&Settings::default())?;
    discover_with(&http, &base).await
}

async fn discover_with(http: &reqwest::Client, base: &Url) -> Result<Option<Url>, MatrixError> {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.clear().extend([".well-known", "matrix", "client"]);
    }
    let response = http.get(url).send().await.map_err(|e| MatrixError::Transport(describe(&e)))?;
    let status = response.status();
    let bytes = read_limited(response, MAX_WELL_KNOWN_BYTES).await?;
    if status.is_server_error() {
        return Err(error_from_answer(status.as_u16(), &bytes, None));
    }
    if !status.is_success() {
        tracing::debug!(status = status.as_u16(), "no well-known file");
        return Ok(None);
    }
    let Ok(Value::Object(file)) = serde_json::from_slice::<Value>(&bytes) else {
        tracing::warn!("the well-known file is not a JSON object");
        return Ok(None);
    };
    let Some(entry) = file.get(WELL_KNOWN_KEY) else {
        return Ok(None);
    };
    let base_url = entry
        .get("base_url")
        .and_then(Value::as_str)
        .ok_or_else(|| MatrixError::InvalidWellKnown("no base_url string".to_owned()))?;
    let parsed = Url::parse(base_url).map_err(|e| MatrixError::InvalidWellKnown(format!("base_url: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(MatrixError::InvalidWellKnown("base_url is not an http(s) URL".to_owned()));
    }
    Ok(Some(parsed))
}

/// `homeserver_url` checked (http or https, a host) with its path ending in `/`.
fn base_url(homeserver_url: &Url) -> Result<Url, MatrixError> {
    if !matches!(homeserver_url.scheme(), "http" | "https") || homeserver_url.host().is_none() {
        return Err(MatrixError::InvalidUrl("not an http(s) URL with a host".to_owned()));
    }
    let mut base = homeserver_url.clone();
    base.set_query(None);
    base.set_fragment(None);
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    Ok(base)
}

fn http_client(settings: &Settings) -> Result<reqwest::Client, MatrixError> {
    reqwest::Client::builder()
        .timeout(settings.request_timeout)
        .connect_timeout(settings.connect_timeout)
        .tcp_nodelay(true)
        .user_agent(concat!("switchboard-client/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| MatrixError::Transport(describe(&e)))
}

/// The body of `response`, or [`MatrixError::ResponseTooLarge`] once it passes `limit` bytes.
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, MatrixError> {
    if response.content_length().is_some_and(|length| length > limit as u64) {
        return Err(MatrixError::ResponseTooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| MatrixError::Transport(describe(&e)))? {
        if body.len() + chunk.len() > limit {
            return Err(MatrixError::ResponseTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The typed error of an error answer: Matrix error JSON when there is some, else `M_UNKNOWN` with
/// the start of the body.
fn error_from_answer(status: u16, body: &[u8], retry_after_header: Option<Duration>) -> MatrixError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let (errcode, message, retry_after_ms, soft_logout) = match parsed {
        Some(ErrorBody { errcode, error, retry_after_ms, soft_logout }) => (
            errcode.as_deref().map_or(Errcode::Unknown, Errcode::parse),
            error.unwrap_or_default(),
            retry_after_ms,
            soft_logout,
        ),
        None => (Errcode::Unknown, String::from_utf8_lossy(body).chars().take(200).collect(), None, false),
    };
    MatrixError::Homeserver {
        status,
        errcode,
        message,
        retry_after: retry_after_ms.map(Duration::from_millis).or(retry_after_header),
        soft_logout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_initial_wait_up_to_the_cap() {
        let retry = Retry {
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(2),
            ..Retry::default()
        };
        let waits: Vec<u64> = (1..=6).map(|n| u64::try_from(retry.backoff(n).as_millis()).unwrap()).collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 2000, 2000]);
        assert_eq!(retry.backoff(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn an_error_answer_keeps_errcode_status_and_retry_after() {
        let body = br#"{"errcode":"M_LIMIT_EXCEEDED","error":"Too many requests","retry_after_ms":1500}"#;
        let error = error_from_answer(429, body, Some(Duration::from_secs(9)));
        assert_eq!(error.errcode(), Some(&Errcode::LimitExceeded));
        assert_eq!(error.status(), Some(429));
        assert_eq!(error.retry_after(), Some(Duration::from_millis(1500)), "the body's value wins");
        assert!(error.is_retryable());

        let error =
            error_from_answer(401, br#"{"errcode":"M_UNKNOWN_TOKEN","error":"x","soft_logout":true}"#, None);
        assert!(error.is_unknown_token());
        assert!(!error.is_retryable());
        assert!(matches!(error, MatrixError::Homeserver { soft_logout: true, .. }));

        let error = error_from_answer(502, b"<html>Bad Gateway</html>", Some(Duration::from_secs(3)));
        assert_eq!(error.errcode(), Some(&Errcode::Unknown));
        assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
        assert!(error.is_retryable());
        assert!(error.to_string().contains("Bad Gateway"));

        let error = error_from_answer(400, br#"{"errcode":"ORG_EXAMPLE_X"}"#, None);
        assert_eq!(error.errcode().map(Errcode::as_str), Some("ORG_EXAMPLE_X"));
    }

    #[test]
    fn errcodes_round_trip_through_their_text() {
        for code in [
            "M_UNKNOWN_TOKEN",
            "M_MISSING_TOKEN",
            "M_FORBIDDEN",
            "M_LIMIT_EXCEEDED",
            "M_NOT_FOUND",
            "M_UNRECOGNIZED",
            "M_BAD_JSON",
            "M_INVALID_PARAM",
            "M_TOO_LARGE",
            "M_UNKNOWN",
            "M_OTHER",
        ] {
            assert_eq!(Errcode::parse(code).as_str(), code);
        }
    }

    #[test]
    fn gave_up_exposes_the_last_attempts_errcode() {
        let last = error_from_answer(503, br#"{"errcode":"M_UNKNOWN"}"#, None);
        let error =
            MatrixError::GaveUp { attempts: 3, elapsed: Duration::from_secs(1), last: Box::new(last) };
        assert_eq!(error.status(), Some(503));
        assert_eq!(error.errcode(), Some(&Errcode::Unknown));
        assert!(!error.is_retryable(), "the retries are spent");
    }

    #[test]
    fn the_base_url_gets_a_trailing_slash_and_paths_are_percent_encoded() {
        let client = MatrixClient::new(
            &Url::parse("https://example.org/matrix?x=1").unwrap(),
            "secret-token",
            Settings::default(),
        )
        .unwrap();
        assert_eq!(client.homeserver().as_str(), "https://example.org/matrix/");
        let url = client.url(&["_matrix", "client", "v3", "sendToDevice", "m.room.message", "sb.a/b.1"]);
        assert_eq!(
            url.as_str(),
            "https://example.org/matrix/_matrix/client/v3/sendToDevice/m.room.message/sb.a%2Fb.1"
        );
        assert!(!format!("{client:?}").contains("secret-token"), "the token is redacted");
        assert!(matches!(
            MatrixClient::new(&Url::parse("ftp://example.org").unwrap(), "t", Settings::default()),
            Err(MatrixError::InvalidUrl(_))
        ));
    }
}
