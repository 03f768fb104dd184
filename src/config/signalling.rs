//! `[signalling]`: the client WebSocket (`GET /_switchboard/client/v1/connect`) and what one
//! connection may hold and send.

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SignallingConfig {
    /// Open WebSockets on this instance, at most; past it an upgrade is answered 503.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open WebSockets of one user, at most; past it an upgrade is answered 429.
    #[serde(default = "default_max_connections_per_user")]
    pub max_connections_per_user: usize,
    /// Seconds a browser has to send its `auth` frame after connecting without a token header.
    #[serde(default = "default_auth_timeout_secs")]
    pub auth_timeout_secs: u64,
    /// Seconds between the server's pings; a socket that sends nothing (not even a pong) for two of
    /// them is closed.
    #[serde(default = "default_keepalive_secs")]
    pub keepalive_secs: u64,
    /// Seconds between checks that a connection's access token is still valid (answers are cached
    /// for `[homeserver] whoami_cache_secs`, so a revoked token closes the socket within the sum).
    #[serde(default = "default_revalidate_secs")]
    pub revalidate_secs: u64,
    /// Frames per second one connection may send (burst: twice as many); past it, `rate_limited`.
    #[serde(default = "default_frames_per_sec")]
    pub frames_per_sec: u32,
    /// Addresses one connection may watch at once.
    #[serde(default = "default_max_watched")]
    pub max_watched: usize,
    /// Frames queued for one connection, at most; a client that does not read them is closed.
    #[serde(default = "default_send_queue")]
    pub send_queue: usize,
    /// How long the grace after the last socket of a user closes lasts before the user counts as
    /// offline again (seconds): a reconnecting client does not flap.
    #[serde(default = "default_offline_grace_secs")]
    pub offline_grace_secs: u64,
}

fn default_max_connections() -> usize {
    10_000
}
fn default_max_connections_per_user() -> usize {
    8
}
fn default_auth_timeout_secs() -> u64 {
    10
}
fn default_keepalive_secs() -> u64 {
    20
}
fn default_revalidate_secs() -> u64 {
    60
}
fn default_frames_per_sec() -> u32 {
    100
}
fn default_max_watched() -> usize {
    1_000
}
fn default_send_queue() -> usize {
    256
}
fn default_offline_grace_secs() -> u64 {
    10
}

impl Default for SignallingConfig {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_connections_per_user: default_max_connections_per_user(),
            auth_timeout_secs: default_auth_timeout_secs(),
            keepalive_secs: default_keepalive_secs(),
            revalidate_secs: default_revalidate_secs(),
            frames_per_sec: default_frames_per_sec(),
            max_watched: default_max_watched(),
            send_queue: default_send_queue(),
            offline_grace_secs: default_offline_grace_secs(),
        }
    }
}

impl SignallingConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("signalling.max_connections", self.max_connections as u64),
            ("signalling.max_connections_per_user", self.max_connections_per_user as u64),
            ("signalling.auth_timeout_secs", self.auth_timeout_secs),
            ("signalling.keepalive_secs", self.keepalive_secs),
            ("signalling.revalidate_secs", self.revalidate_secs),
            ("signalling.frames_per_sec", u64::from(self.frames_per_sec)),
            ("signalling.send_queue", self.send_queue as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// The section as `switchboard config example` writes it.
pub(super) const EXAMPLE: &str = r"[signalling]
# Open client WebSockets on this instance (about 10 KiB each when idle); past it, 503.
max_connections = 10000
# Open WebSockets of one user (one per device, say); past it, 429.
max_connections_per_user = 8
# Seconds a browser has to send its auth frame (browsers cannot set headers on a WebSocket).
auth_timeout_secs = 10
# Seconds between the server's pings; a socket silent for two of them is closed (code 4004).
keepalive_secs = 20
# Seconds between checks that a connection's token is still valid. A token revoked on the
# homeserver closes the socket (code 4001) within this plus [homeserver] whoami_cache_secs.
revalidate_secs = 60
# Frames per second one connection may send (burst: twice as many); past it, rate_limited errors,
# and a connection that keeps sending past it is closed (code 4003).
frames_per_sec = 100
# Addresses one connection may watch at once.
max_watched = 1000
# Frames queued for one connection; a client that stops reading is closed (code 4006).
send_queue = 256
# Seconds a user stays online after its last socket closes (a reconnect does not flap).
offline_grace_secs = 10
";
