//! `[cluster]`: several instances sharing one Redis for fan-out (see docs/operations.md, "Several
//! instances"). Without `redis_url` one instance runs alone, with no Redis at all.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, invalid, redact_url};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://[USER:PASSWORD@]HOST[:PORT][/DB]` (or `redis+unix:///PATH`): the Redis that the
    /// instances publish to. A secret: it may hold a password. Unset: this instance runs alone.
    #[serde(default)]
    pub redis_url: Option<Secret>,
    /// A file holding `redis_url`.
    #[serde(default)]
    pub redis_url_file: Option<PathBuf>,
    /// Prefix of every channel name, so that a Redis shared with Synapse's workers (or another
    /// Switchboard) is safe. Unset: `switchboard.<server_name>.`.
    #[serde(default)]
    pub channel_prefix: Option<String>,
    /// How often (seconds) this instance tells the others which users are connected to it; an
    /// instance that has sent nothing for three periods has its users dropped.
    #[serde(default = "default_snapshot_interval_secs")]
    pub snapshot_interval_secs: u64,
    /// Most other instances whose connected users this one holds; more are ignored (and counted).
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
    /// Most connected users held for each other instance; more are ignored (and counted).
    #[serde(default = "default_max_users_per_instance")]
    pub max_users_per_instance: usize,
}

fn default_snapshot_interval_secs() -> u64 {
    10
}
fn default_max_instances() -> usize {
    64
}
fn default_max_users_per_instance() -> usize {
    100_000
}

impl ClusterConfig {
    /// The channel prefix: as configured, else `switchboard.<server_name>.`.
    pub fn channel_prefix(&self, server_name: &str) -> String {
        self.channel_prefix.clone().unwrap_or_else(|| format!("switchboard.{server_name}."))
    }

    /// `redis_url` without its password, for logs.
    pub fn redis_url_redacted(&self) -> Option<String> {
        self.redis_url.as_ref().map(|url| redact_url(url.expose()))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.redis_url {
            // The URL itself is not repeated: it may hold a password.
            let scheme = url.expose().split(':').next().unwrap_or("");
            if !matches!(scheme, "redis" | "redis+unix" | "unix") || url::Url::parse(url.expose()).is_err() {
                return Err(invalid("cluster.redis_url", "must be a redis:// or redis+unix:// URL"));
            }
        }
        if let Some(prefix) = &self.channel_prefix
            && (prefix.len() > 128 || prefix.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(invalid("cluster.channel_prefix", "at most 128 characters, no whitespace"));
        }
        if self.snapshot_interval_secs == 0 {
            return Err(invalid("cluster.snapshot_interval_secs", "must be at least 1"));
        }
        if self.max_instances == 0 {
            return Err(invalid("cluster.max_instances", "must be at least 1"));
        }
        Ok(())
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_url_file: None,
            channel_prefix: None,
            snapshot_interval_secs: default_snapshot_interval_secs(),
            max_instances: default_max_instances(),
            max_users_per_instance: default_max_users_per_instance(),
        }
    }
}

/// The section as `switchboard config example` writes it.
pub(super) const EXAMPLE: &str = r#"[cluster]
# Several instances behind one load balancer share the database and one Redis (the one Synapse's
# workers use is fine). Without redis_url this instance runs alone, with no Redis at all. Each
# instance needs its own [database] instance_name. Treated as a secret (logs show it without the
# password); redis_url_file = "/run/secrets/redis_url" reads it from a file.
# redis_url = "redis://127.0.0.1:6379"
# Prefix of the channels' names; unset: "switchboard.<server_name>.".
# channel_prefix = "switchboard.example.org."
# How often (seconds) each instance tells the others which users are connected to it; an instance
# silent for three periods has its users dropped.
snapshot_interval_secs = 10
# Bounds on what other instances can make this one hold.
max_instances = 64
max_users_per_instance = 100000
"#;
