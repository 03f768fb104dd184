//! Switchboard → homeserver, with the `as_token`: token checks (`whoami`), masquerading as users in
//! the namespace, registering our own sender user, and pinging the homeserver.
//!
//! The homeserver may be down when Switchboard starts: [`HomeserverClient::watch_health`] keeps
//! trying with backoff and publishes what it saw, which `/ready` reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ruma::{OwnedDeviceId, OwnedUserId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::config::{Config, Secret};
use crate::telemetry::Metrics;

/// Backoff while the homeserver is unreachable: 1 s doubling to this, so that `/ready` turns green
/// within about 10 s of the homeserver (or its route back to us) coming back.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Re-check interval while the homeserver is healthy.
const HEALTHY_RECHECK: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HomeserverError {
    /// No answer: connection refused, timeout, TLS failure… (the message carries the causes).
    #[error("homeserver unreachable: {0}")]
    Unreachable(String),
    #[error("homeserver answered {status} {errcode}: {error}")]
    Matrix { status: u16, errcode: String, error: String },
    #[error("unexpected answer from the homeserver: {0}")]
    InvalidResponse(String),
}

impl HomeserverError {
    /// The Matrix error code, when the homeserver answered with one.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            HomeserverError::Matrix { errcode, .. } => Some(errcode),
            _ => None,
        }
    }
}

/// Who an access token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Whoami {
    pub user_id: OwnedUserId,
    pub device_id: Option<OwnedDeviceId>,
}

/// A user's profile as the homeserver has it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Profile {
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

/// A user's presence as the homeserver has it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PresenceStatus {
    /// `online`, `unavailable` or `offline`.
    pub presence: String,
    /// Milliseconds since the user was last active, when known.
    pub last_active_ago: Option<i64>,
}

/// What the last health check saw; served by `/ready`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HomeserverStatus {
    /// The homeserver answered our last request.
    pub reachable: bool,
    /// The homeserver could reach our appservice listener (its ping round-trip), in milliseconds.
    pub appservice_ping_ms: Option<u64>,
    /// Why the last check failed.
    pub last_error: Option<String>,
}

pub struct HomeserverClient {
    http: reqwest::Client,
    base: Url,
    as_token: Secret,
    appservice_id: String,
    sender_localpart: String,
    status: watch::Sender<HomeserverStatus>,
    sender_registered: AtomicBool,
    metrics: Arc<Metrics>,
}

#[derive(Deserialize)]
struct MatrixErrorBody {
    errcode: String,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize)]
struct WhoamiBody {
    user_id: OwnedUserId,
    device_id: Option<OwnedDeviceId>,
}

impl HomeserverStatus {
    /// Both directions work: the homeserver answered, and could reach our appservice listener.
    pub fn healthy(&self) -> bool {
        self.reachable && self.appservice_ping_ms.is_some() && self.last_error.is_none()
    }
}

impl HomeserverClient {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Self, HomeserverError> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout())
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HomeserverError::Unreachable(describe(&e)))?;
        Ok(Self {
            http,
            base: config.homeserver.url.clone(),
            as_token: config.as_token().clone(),
            appservice_id: config.appservice.id.clone(),
            sender_localpart: config.appservice.sender_localpart.clone(),
            status: watch::Sender::new(HomeserverStatus::default()),
            sender_registered: AtomicBool::new(false),
            metrics,
        })
    }

    /// The URL of a client-server API path (segments are percent-encoded by the caller's `segments`).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// A request with the `as_token`.
    fn request(&self, method: reqwest::Method, segments: &[&str]) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(segments)).bearer_auth(self.as_token.expose())
    }

    /// A request made as `user_id` (and `device_id`), a user in our namespace (masquerading).
    pub fn request_as(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        user_id: &ruma::UserId,
        device_id: Option<&ruma::DeviceId>,
    ) -> reqwest::RequestBuilder {
        let mut url = self.url(segments);
        url.query_pairs_mut().append_pair("user_id", user_id.as_str());
        if let Some(device_id) = device_id {
            url.query_pairs_mut().append_pair("device_id", device_id.as_str());
        }
        self.http.request(method, url).bearer_auth(self.as_token.expose())
    }

    /// Sends a request and decodes a JSON answer, turning Matrix errors into [`HomeserverError::Matrix`].
    /// Failures are counted in `switchboard_homeserver_errors_total`.
    pub async fn send<T: for<'de> Deserialize<'de>>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, HomeserverError> {
        let result = self.send_uncounted(request).await;
        if result.is_err() {
            self.metrics.homeserver_errors.inc();
        }
        result
    }

    /// As [`Self::send`], for callers that expect some Matrix errors and count the others themselves.
    async fn send_uncounted<T: for<'de> Deserialize<'de>>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, HomeserverError> {
        let response = request.send().await.map_err(|e| HomeserverError::Unreachable(describe(&e)))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| HomeserverError::Unreachable(describe(&e)))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| HomeserverError::InvalidResponse(e.to_string()));
        }
        let body: MatrixErrorBody = serde_json::from_slice(&bytes).unwrap_or(MatrixErrorBody {
            errcode: "M_UNKNOWN".to_owned(),
            error: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
        });
        Err(HomeserverError::Matrix { status: status.as_u16(), errcode: body.errcode, error: body.error })
    }

    /// Who `access_token` belongs to (`GET /_matrix/client/v3/account/whoami`), asked every time:
    /// [`crate::http::Auth`] remembers the answers and shares one call among concurrent checks.
    pub async fn whoami(&self, access_token: &str) -> Result<Whoami, HomeserverError> {
        let request = self
            .http
            .get(self.url(&["_matrix", "client", "v3", "account", "whoami"]))
            .bearer_auth(access_token);
        // An unknown token is the client's mistake, not a homeserver failure: count only the latter.
        let body: WhoamiBody = self.send_uncounted(request).await.inspect_err(|e| {
            if !matches!(e, HomeserverError::Matrix { .. }) {
                self.metrics.homeserver_errors.inc();
            }
        })?;
        Ok(Whoami { user_id: body.user_id, device_id: body.device_id })
    }

    /// A user's profile (`GET /_matrix/client/v3/profile/{userId}`); `None` when the homeserver has
    /// no such user (any 404: Synapse 1.163 answers `M_NOT_FOUND` for a user without a profile but
    /// `M_UNKNOWN` "No row found" for one that does not exist).
    #[tracing::instrument(name = "homeserver.profile", level = "debug", skip_all, fields(user_id = %user_id))]
    pub async fn profile(&self, user_id: &str) -> Result<Option<Profile>, HomeserverError> {
        let request = self.request(reqwest::Method::GET, &["_matrix", "client", "v3", "profile", user_id]);
        match self.send_uncounted(request).await {
            Ok(profile) => Ok(Some(profile)),
            Err(HomeserverError::Matrix { status: 404, .. }) => Ok(None),
            Err(e) => {
                self.metrics.homeserver_errors.inc();
                Err(e)
            }
        }
    }

    /// A local user's presence (`GET /_matrix/client/v3/presence/{userId}/status`), asked as the
    /// user itself: Synapse shows presence only to users sharing a room, or to the user.
    #[tracing::instrument(name = "homeserver.presence", level = "debug", skip_all, fields(user_id = %user_id))]
    pub async fn presence(&self, user_id: &ruma::UserId) -> Result<PresenceStatus, HomeserverError> {
        let request = self.request_as(
            reqwest::Method::GET,
            &["_matrix", "client", "v3", "presence", user_id.as_str(), "status"],
            user_id,
            None,
        );
        self.send(request).await
    }

    /// Asks the homeserver to ping our appservice listener
    /// (`POST /_matrix/client/v1/appservice/{id}/ping`); returns the round-trip it measured.
    /// This also makes Synapse retry transactions it was holding back.
    #[tracing::instrument(name = "homeserver.ping", level = "debug", skip_all)]
    pub async fn ping(&self) -> Result<Duration, HomeserverError> {
        #[derive(Deserialize)]
        struct Pong {
            duration_ms: u64,
        }
        let request = self
            .request(
                reqwest::Method::POST,
                &["_matrix", "client", "v1", "appservice", &self.appservice_id, "ping"],
            )
            .json(&json!({ "transaction_id": format!("switchboard-{}", std::process::id()) }));
        let pong: Pong = self.send(request).await?;
        Ok(Duration::from_millis(pong.duration_ms))
    }

    /// Registers our sender user if the homeserver does not have it yet (once per process).
    #[tracing::instrument(name = "homeserver.register", level = "debug", skip_all)]
    pub async fn ensure_sender_registered(&self) -> Result<(), HomeserverError> {
        if self.sender_registered.load(Ordering::Relaxed) {
            return Ok(());
        }
        let request =
            self.request(reqwest::Method::POST, &["_matrix", "client", "v3", "register"]).json(&json!({
                "type": "m.login.application_service",
                "username": self.sender_localpart,
                "inhibit_login": true,
            }));
        match self.send_uncounted::<serde_json::Value>(request).await {
            Ok(_) => {
                tracing::info!(localpart = %self.sender_localpart, "homeserver.register: sender user created");
            }
            Err(e) if e.errcode() == Some("M_USER_IN_USE") => {}
            Err(e) => {
                self.metrics.homeserver_errors.inc();
                return Err(e);
            }
        }
        self.sender_registered.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// What the last health check saw.
    pub fn status(&self) -> HomeserverStatus {
        self.status.borrow().clone()
    }

    /// Checks the homeserver now: ping (both directions) and our sender user.
    #[tracing::instrument(name = "homeserver.health", level = "debug", skip_all)]
    pub async fn check(&self) -> HomeserverStatus {
        let status = match self.ping().await {
            Ok(rtt) => match self.ensure_sender_registered().await {
                Ok(()) => HomeserverStatus {
                    reachable: true,
                    appservice_ping_ms: Some(u64::try_from(rtt.as_millis()).unwrap_or(u64::MAX)),
                    last_error: None,
                },
                Err(e) => HomeserverStatus {
                    reachable: true,
                    appservice_ping_ms: None,
                    last_error: Some(e.to_string()),
                },
            },
            // The homeserver answered, but could not reach us (or refused our token).
            Err(e @ HomeserverError::Matrix { .. }) => HomeserverStatus {
                reachable: true,
                appservice_ping_ms: None,
                last_error: Some(e.to_string()),
            },
            Err(e) => HomeserverStatus {
                reachable: false,
                appservice_ping_ms: None,
                last_error: Some(e.to_string()),
            },
        };
        self.status.send_replace(status.clone());
        status
    }

    /// Checks the homeserver at start and then periodically, with backoff while it is unreachable,
    /// until `shutdown`.
    pub async fn watch_health(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_secs(1);
        let mut was_healthy = None;
        loop {
            // A hanging homeserver must not hold up shutdown.
            let status = tokio::select! {
                () = shutdown.cancelled() => return,
                status = self.check() => status,
            };
            let healthy = status.healthy();
            if was_healthy != Some(healthy) {
                match (&status.last_error, status.appservice_ping_ms) {
                    (None, Some(ms)) => tracing::info!(
                        appservice_ping_ms = ms,
                        "homeserver.health: reachable, ping round-trip ok"
                    ),
                    (Some(error), _) => {
                        tracing::warn!(%error, retry_in_s = backoff.as_secs(), "homeserver.health: not ready");
                    }
                    (None, None) => {}
                }
                was_healthy = Some(healthy);
            }
            let wait = if healthy {
                backoff = Duration::from_secs(1);
                HEALTHY_RECHECK
            } else {
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// An HTTP client error with its causes ("error sending request: … Connection refused"), without
/// the URL (it may carry a user id or token in its query). The thin client's Matrix layer uses it too.
pub(crate) fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "<url>");
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
