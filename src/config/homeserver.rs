//! `[homeserver]`: which homeserver Switchboard serves, and how it talks to it.

use serde::{Deserialize, Serialize};
use url::Url;

use super::{ConfigError, check_http_url, invalid};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HomeserverConfig {
    /// The homeserver's `server_name` (the part after `:` in user ids).
    pub server_name: String,
    /// Where Switchboard reaches the homeserver's client-server API.
    pub url: Url,
    /// How long a successful `whoami` of a client's access token is trusted: a token revoked on the
    /// homeserver (logout) keeps working here at most this long.
    #[serde(default = "default_whoami_cache_secs")]
    pub whoami_cache_secs: u64,
    /// How long a token the homeserver does not know is answered 401 without asking it again.
    #[serde(default = "default_whoami_negative_cache_secs")]
    pub whoami_negative_cache_secs: u64,
    /// Tokens kept in each of the two `whoami` caches (known, unknown); the oldest are evicted.
    #[serde(default = "default_whoami_cache_entries")]
    pub whoami_cache_entries: usize,
    /// Per-request timeout towards the homeserver.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
}

pub(super) fn default_whoami_cache_secs() -> u64 {
    60
}
fn default_whoami_negative_cache_secs() -> u64 {
    60
}
fn default_whoami_cache_entries() -> usize {
    100_000
}
pub(super) fn default_request_timeout_secs() -> u64 {
    30
}

impl HomeserverConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        ruma::ServerName::parse(&self.server_name)
            .map_err(|e| invalid("homeserver.server_name", format!("not a Matrix server name: {e}")))?;
        check_http_url("homeserver.url", &self.url)?;
        if self.request_timeout_secs == 0 {
            return Err(invalid("homeserver.request_timeout_secs", "must be at least 1"));
        }
        if self.whoami_cache_entries == 0 {
            return Err(invalid("homeserver.whoami_cache_entries", "must be at least 1"));
        }
        Ok(())
    }
}

/// The section as `switchboard config example` writes it.
pub(super) const EXAMPLE: &str = r"[homeserver]
# The homeserver's server_name: the part after ':' in user ids.
server_name = {server_name}
# Where Switchboard reaches the homeserver's client-server API.
url = {homeserver_url}
# Seconds a client's access token, once checked with /whoami, is trusted: a token revoked on the
# homeserver (logout) keeps working with Switchboard at most this long.
whoami_cache_secs = 60
# Seconds a token the homeserver does not know is answered 401 without asking the homeserver again.
whoami_negative_cache_secs = 60
# Tokens remembered in each of the two caches (known, unknown); past it the oldest are forgotten.
whoami_cache_entries = 100000
# Timeout of one request to the homeserver, in seconds.
request_timeout_secs = 30
";
