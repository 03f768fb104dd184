//! `[appservice]`: the registration with the homeserver and the listener it calls.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use url::Url;

use super::{ConfigError, HomeserverConfig, Secret, check_http_url, check_secret, invalid};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppserviceConfig {
    /// The registration's `id`.
    #[serde(default = "default_appservice_id")]
    pub id: String,
    /// Where the appservice API listens (for the homeserver only).
    #[serde(default = "default_appservice_listen")]
    pub listen: SocketAddr,
    /// The URL the homeserver uses to reach `listen` (the registration's `url`).
    #[serde(default = "default_appservice_url")]
    pub url: Url,
    /// Token Switchboard presents to the homeserver.
    pub as_token: Option<Secret>,
    pub as_token_file: Option<PathBuf>,
    /// Token the homeserver presents to Switchboard.
    pub hs_token: Option<Secret>,
    pub hs_token_file: Option<PathBuf>,
    /// Localpart of the appservice's own user.
    #[serde(default = "default_sender_localpart")]
    pub sender_localpart: String,
    /// Largest accepted transaction body, in bytes.
    #[serde(default = "default_max_transaction_bytes")]
    pub max_transaction_bytes: usize,
    /// Open connections to this listener, at most; more are closed at once.
    #[serde(default = "default_appservice_max_connections")]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers, counted from connecting or from
    /// the end of the previous response (so also how long an idle keep-alive connection is kept).
    /// Longer than Synapse keeps idle connections (120 s), so that Synapse closes them, never us
    /// while it sends a transaction on one (it would not retry it, and would back off).
    #[serde(default = "default_appservice_header_read_timeout_secs")]
    pub header_read_timeout_secs: u64,
    /// Seconds a request may take, body included, before it is answered 408.
    #[serde(default = "default_appservice_request_timeout_secs")]
    pub request_timeout_secs: u64,
}

fn default_appservice_id() -> String {
    "switchboard".to_owned()
}
fn default_appservice_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9330))
}
fn default_appservice_url() -> Url {
    Url::parse("http://127.0.0.1:9330").expect("static URL")
}
fn default_sender_localpart() -> String {
    "switchboard".to_owned()
}
fn default_appservice_max_connections() -> usize {
    256
}
fn default_appservice_header_read_timeout_secs() -> u64 {
    180
}
fn default_appservice_request_timeout_secs() -> u64 {
    // A full transaction (max_transaction_bytes) and its durable store.
    120
}
fn default_max_transaction_bytes() -> usize {
    // 100 events of at most 64 KiB each, plus ephemeral data and to-device messages.
    32 * 1024 * 1024
}

impl AppserviceConfig {
    pub(super) fn validate(&self, homeserver: &HomeserverConfig) -> Result<(), ConfigError> {
        check_http_url("appservice.url", &self.url)?;
        if self.id.is_empty() {
            return Err(invalid("appservice.id", "must not be empty"));
        }
        ruma::UserId::parse_with_server_name(
            self.sender_localpart.as_str(),
            <&ruma::ServerName>::try_from(homeserver.server_name.as_str())
                .map_err(|e| invalid("homeserver.server_name", e.to_string()))?,
        )
        .map_err(|e| invalid("appservice.sender_localpart", format!("not a valid localpart: {e}")))?;
        let as_token = check_secret("appservice.as_token", self.as_token.as_ref())?;
        let hs_token = check_secret("appservice.hs_token", self.hs_token.as_ref())?;
        if as_token == hs_token {
            return Err(invalid("appservice.hs_token", "must differ from appservice.as_token"));
        }
        if self.max_transaction_bytes < 64 * 1024 {
            return Err(invalid("appservice.max_transaction_bytes", "must be at least 65536 (one event)"));
        }
        super::check_listener(
            [
                "appservice.max_connections",
                "appservice.header_read_timeout_secs",
                "appservice.request_timeout_secs",
            ],
            [self.max_connections as u64, self.header_read_timeout_secs, self.request_timeout_secs],
        )?;
        Ok(())
    }
}

/// The section as `switchboard config example` writes it.
pub(super) const EXAMPLE: &str = r#"[appservice]
# The registration's id (see `switchboard registration`).
id = "switchboard"
# Listener of the appservice API. Only the homeserver talks to it: keep it private.
listen = "127.0.0.1:9330"
# The URL the homeserver uses to reach that listener (the registration's url).
url = "http://127.0.0.1:9330"
# Token Switchboard presents to the homeserver, and the one the homeserver presents to us.
as_token = {as_token}
hs_token = {hs_token}
# Localpart of Switchboard's own Matrix user.
sender_localpart = "switchboard"
# Largest transaction body accepted, in bytes.
max_transaction_bytes = 33554432
# Open connections at most (more are closed at once); seconds a connection may take to send a
# request's headers, counted from connecting or from the previous response (so also how long an idle
# keep-alive connection is kept: longer than Synapse's 120 s, so that Synapse closes idle connections
# rather than see one closed under a transaction); seconds a whole request may take before 408.
max_connections = 256
header_read_timeout_secs = 180
request_timeout_secs = 120
"#;
