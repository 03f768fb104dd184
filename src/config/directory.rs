//! `[directory]`: presence and discovery.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// Presence learnt longer ago than this counts as offline after a restart, until confirmed.
    #[serde(default = "default_presence_stale_secs")]
    pub presence_stale_secs: u64,
    /// Let clients without an access token read the directory.
    #[serde(default)]
    pub anonymous_read: bool,
    /// Requests per second, at most, that the directory makes to the homeserver for profiles and
    /// presence (look-ups and reconciliation). 0 turns them off.
    #[serde(default = "default_lookups_per_sec")]
    pub lookups_per_sec: u32,
    /// Each online or watched local user's presence is asked of the homeserver at most this often
    /// (seconds), because presence pushes are lost when the appservice is down.
    #[serde(default = "default_reconcile_interval_secs")]
    pub reconcile_interval_secs: u64,
    /// A profile looked up on the homeserver (or its absence) is trusted this long (seconds)
    /// before a look-up asks again.
    #[serde(default = "default_profile_cache_secs")]
    pub profile_cache_secs: u64,
    /// Most users of other homeservers (remote users) the directory holds; past it, those seen
    /// longest ago are evicted (from memory and the store). ~500 bytes each.
    #[serde(default = "default_max_remote_users")]
    pub max_remote_users: usize,
}

fn default_lookups_per_sec() -> u32 {
    20
}
fn default_reconcile_interval_secs() -> u64 {
    60
}
fn default_profile_cache_secs() -> u64 {
    600
}
fn default_max_remote_users() -> usize {
    1_000_000
}
fn default_presence_stale_secs() -> u64 {
    300
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        Self {
            presence_stale_secs: default_presence_stale_secs(),
            anonymous_read: false,
            lookups_per_sec: default_lookups_per_sec(),
            reconcile_interval_secs: default_reconcile_interval_secs(),
            profile_cache_secs: default_profile_cache_secs(),
            max_remote_users: default_max_remote_users(),
        }
    }
}

/// The section as `switchboard config example` writes it.
pub(super) const EXAMPLE: &str = r"[directory]
# Presence learnt longer ago than this (seconds) counts as offline after a restart, until confirmed.
presence_stale_secs = 300
# Let clients without an access token read the directory (lookups of addresses and their users).
anonymous_read = false
# Requests per second, at most, that the directory makes to the homeserver: profile look-ups of
# users it has not seen yet, and presence reconciliation. 0 turns both off.
lookups_per_sec = 20
# How often (seconds), at most, the presence of each online or watched local user is asked of the
# homeserver: presence pushes are lost while Switchboard is down, and never retried.
reconcile_interval_secs = 60
# How long (seconds) a profile looked up on the homeserver, or its absence, is trusted.
profile_cache_secs = 600
# Most users of other homeservers the directory holds (about 500 bytes each); past it, those seen
# longest ago are evicted, from memory and from the database.
max_remote_users = 1000000
";
