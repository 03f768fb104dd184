//! `[calls]`: the call broker's limits and timeouts (see docs/protocol.md, "Calls").

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallsConfig {
    /// Pending calls (invited or answered, not yet connected) one user may take part in.
    #[serde(default = "default_max_live_calls_per_user")]
    pub max_live_calls_per_user: usize,
    /// Calls kept in memory (pending, established and recently ended); ~1 KiB each.
    #[serde(default = "default_max_calls")]
    pub max_calls: usize,
    /// The lifetime of an invite that names none, in seconds.
    #[serde(default = "default_invite_lifetime_secs")]
    pub default_invite_lifetime_secs: u64,
    /// Invite lifetimes are clamped to this, in seconds.
    #[serde(default = "default_max_invite_lifetime_secs")]
    pub max_invite_lifetime_secs: u64,
    /// Seconds an answered call has for both sides to report `connected` before it fails.
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
}

fn default_max_live_calls_per_user() -> usize {
    16
}
fn default_max_calls() -> usize {
    100_000
}
fn default_invite_lifetime_secs() -> u64 {
    60
}
fn default_max_invite_lifetime_secs() -> u64 {
    120
}
fn default_connect_timeout_secs() -> u64 {
    60
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            max_live_calls_per_user: default_max_live_calls_per_user(),
            max_calls: default_max_calls(),
            default_invite_lifetime_secs: default_invite_lifetime_secs(),
            max_invite_lifetime_secs: default_max_invite_lifetime_secs(),
            connect_timeout_secs: default_connect_timeout_secs(),
        }
    }
}

impl CallsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("calls.max_live_calls_per_user", self.max_live_calls_per_user as u64),
            ("calls.max_calls", self.max_calls as u64),
            ("calls.default_invite_lifetime_secs", self.default_invite_lifetime_secs),
            ("calls.max_invite_lifetime_secs", self.max_invite_lifetime_secs),
            ("calls.connect_timeout_secs", self.connect_timeout_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.default_invite_lifetime_secs > self.max_invite_lifetime_secs {
            return Err(invalid(
                "calls.default_invite_lifetime_secs",
                "must not exceed max_invite_lifetime_secs",
            ));
        }
        Ok(())
    }

    /// The broker's settings: these keys, and fixed values for the rest.
    pub fn broker(&self) -> crate::calls::Settings {
        crate::calls::Settings {
            max_live_calls_per_user: self.max_live_calls_per_user,
            max_calls: self.max_calls,
            default_invite_lifetime_ms: self.default_invite_lifetime_secs.saturating_mul(1000),
            max_invite_lifetime_ms: self.max_invite_lifetime_secs.saturating_mul(1000),
            connect_timeout_ms: self.connect_timeout_secs.saturating_mul(1000),
            ..crate::calls::Settings::default()
        }
    }
}

/// The section as `switchboard config example` writes it.
pub(super) const EXAMPLE: &str = r"[calls]
# Pending calls (invited or answered, not yet connected) one user may take part in, as caller or
# callee; past it, invites are refused (too_many_calls).
max_live_calls_per_user = 16
# Calls kept in memory (pending, established and recently ended; about 1 KiB each). The oldest
# ended, then the longest idle established ones make room; when all are pending, invites are
# refused (overloaded).
max_calls = 100000
# Seconds an invite lives when it names no lifetime, and the most it may name.
default_invite_lifetime_secs = 60
max_invite_lifetime_secs = 120
# Seconds an answered call has for both sides to report their data channel open (else: failed).
connect_timeout_secs = 60
";
