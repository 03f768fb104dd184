//! `[client]`: the client API's listener.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Where the client API (HTTP and WebSocket) listens; put a TLS proxy in front.
    #[serde(default = "default_client_listen")]
    pub listen: SocketAddr,
    /// Open connections to this listener, at most; more are closed at once.
    #[serde(default = "default_client_max_connections")]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers, counted from connecting or from
    /// the end of the previous response (so also how long an idle keep-alive connection is kept).
    #[serde(default = "super::default_header_read_timeout_secs")]
    pub header_read_timeout_secs: u64,
    /// Seconds a request may take, body included, before it is answered 408.
    #[serde(default = "super::default_listener_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Largest accepted request body, in bytes.
    #[serde(default = "default_client_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Requests per second, per source (an IPv4 address or IPv6 /64), whose access token is not
    /// known to be valid; past it they are answered 429 `M_LIMIT_EXCEEDED`. 0: no limit.
    #[serde(default = "default_unknown_token_per_sec")]
    pub unknown_token_per_sec: u32,
    /// How many such requests a source may make at once before the rate applies.
    #[serde(default = "default_unknown_token_burst")]
    pub unknown_token_burst: u32,
    /// Origins whose browser pages may call the client API (CORS), e.g. `https://app.example.org`;
    /// `["*"]`: any. Empty: no CORS headers (same-origin pages and non-browser clients only).
    #[serde(default)]
    pub cors_allowed_origins: Vec<String>,
}

fn default_client_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9331))
}

fn default_client_max_connections() -> usize {
    10_000
}
fn default_client_max_body_bytes() -> usize {
    // A discovery query of 1,000 addresses is about 45 KiB.
    256 * 1024
}
fn default_unknown_token_per_sec() -> u32 {
    2
}
fn default_unknown_token_burst() -> u32 {
    20
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            listen: default_client_listen(),
            max_connections: default_client_max_connections(),
            header_read_timeout_secs: super::default_header_read_timeout_secs(),
            request_timeout_secs: super::default_listener_request_timeout_secs(),
            max_body_bytes: default_client_max_body_bytes(),
            unknown_token_per_sec: default_unknown_token_per_sec(),
            unknown_token_burst: default_unknown_token_burst(),
            cors_allowed_origins: Vec::new(),
        }
    }
}

impl ClientConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        super::check_listener(
            ["client.max_connections", "client.header_read_timeout_secs", "client.request_timeout_secs"],
            [self.max_connections as u64, self.header_read_timeout_secs, self.request_timeout_secs],
        )?;
        if self.max_body_bytes < 1024 {
            return Err(invalid("client.max_body_bytes", "must be at least 1024"));
        }
        if self.unknown_token_per_sec > 0 && self.unknown_token_burst == 0 {
            return Err(invalid(
                "client.unknown_token_burst",
                "must be at least 1 when unknown_token_per_sec is set",
            ));
        }
        for origin in &self.cors_allowed_origins {
            let valid = origin == "*"
                || (url::Url::parse(origin).is_ok_and(|url| url.origin().ascii_serialization() == *origin));
            if !valid {
                return Err(invalid(
                    "client.cors_allowed_origins",
                    format!("{origin:?} is not an origin (scheme://host[:port]) or \"*\""),
                ));
            }
        }
        Ok(())
    }
}

/// The section as `switchboard config example` writes it.
pub(super) const EXAMPLE: &str = r#"[client]
# Listener of the client API (HTTP and WebSocket). Put a TLS-terminating proxy in front of it.
listen = "127.0.0.1:9331"
# Open connections, header-read and request timeouts, as for [appservice]; largest request body.
max_connections = 10000
header_read_timeout_secs = 10
request_timeout_secs = 60
max_body_bytes = 262144
# Requests per second per source (an IPv4 address or IPv6 /64; behind a proxy, the proxy) whose
# access token is not known to be valid, and the burst allowed before that rate applies; past them,
# 429 M_LIMIT_EXCEEDED. 0 turns the limit off.
unknown_token_per_sec = 2
unknown_token_burst = 20
# Origins whose browser pages may call the client API (CORS), e.g. ["https://app.example.org"];
# ["*"] allows any. Tokens travel in headers, never cookies. Empty: no CORS headers.
cors_allowed_origins = []
"#;
