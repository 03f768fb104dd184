//! `[client]`: the client API's listener.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Where the client API (HTTP and WebSocket) listens; put a TLS proxy in front.
    #[serde(default = "default_client_listen")]
    pub listen: SocketAddr,
}

fn default_client_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9331))
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self { listen: default_client_listen() }
    }
}

/// The section as `switchboard config example` writes it.
pub(super) const EXAMPLE: &str = r#"[client]
# Listener of the client API (HTTP and WebSocket). Put a TLS-terminating proxy in front of it.
listen = "127.0.0.1:9331"
"#;
