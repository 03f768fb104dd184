//! `[ops]`: the listener of `/health`, `/ready` and `/metrics`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// Where `/health`, `/ready` and `/metrics` listen.
    #[serde(default = "default_ops_listen")]
    pub listen: SocketAddr,
    /// Open connections to this listener, at most; more are closed at once.
    #[serde(default = "default_ops_max_connections")]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers (and an idle one is kept).
    #[serde(default = "super::default_header_read_timeout_secs")]
    pub header_read_timeout_secs: u64,
    /// Seconds a request may take before it is answered 408.
    #[serde(default = "super::default_listener_request_timeout_secs")]
    pub request_timeout_secs: u64,
}

fn default_ops_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9332))
}

fn default_ops_max_connections() -> usize {
    64
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            listen: default_ops_listen(),
            max_connections: default_ops_max_connections(),
            header_read_timeout_secs: super::default_header_read_timeout_secs(),
            request_timeout_secs: super::default_listener_request_timeout_secs(),
        }
    }
}

impl OpsConfig {
    pub(super) fn validate(&self) -> Result<(), super::ConfigError> {
        super::check_listener(
            ["ops.max_connections", "ops.header_read_timeout_secs", "ops.request_timeout_secs"],
            [self.max_connections as u64, self.header_read_timeout_secs, self.request_timeout_secs],
        )
    }
}

/// The section as `switchboard config example` writes it.
pub(super) const EXAMPLE: &str = r#"[ops]
# Listener of /health, /ready and /metrics. Keep it private.
listen = "127.0.0.1:9332"
# Open connections, header-read and request timeouts, as for [appservice].
max_connections = 64
header_read_timeout_secs = 10
request_timeout_secs = 60
"#;
