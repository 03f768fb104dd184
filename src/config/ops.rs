//! `[ops]`: the listener of `/health`, `/ready` and `/metrics`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// Where `/health`, `/ready` and `/metrics` listen.
    #[serde(default = "default_ops_listen")]
    pub listen: SocketAddr,
}

fn default_ops_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9332))
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self { listen: default_ops_listen() }
    }
}

/// The section as `switchboard config example` writes it.
pub(super) const EXAMPLE: &str = r#"[ops]
# Listener of /health, /ready and /metrics. Keep it private.
listen = "127.0.0.1:9332"
"#;
