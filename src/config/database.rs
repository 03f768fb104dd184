//! `[database]`: the store (SQLite or PostgreSQL), this instance's name in it, and inbox retention.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, invalid};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (created if missing, WAL) or `postgres://…`. A secret: a PostgreSQL URL
    /// may hold a password. Unset: [`DEFAULT_DATABASE_URL`]; see [`Config::database_url`].
    #[serde(default)]
    pub url: Option<Secret>,
    /// A file holding `url` (for a URL with a password).
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// This instance's name among the instances sharing the database: each keeps its own inbox
    /// positions. Every instance needs a name of its own.
    #[serde(default = "default_instance_name")]
    pub instance_name: String,
    /// Inbox items every consumer has handled are deleted once stored this long ago (seconds); so
    /// are transaction ids, but for the newest 100.
    #[serde(default = "default_inbox_retention_secs")]
    pub inbox_retention_secs: u64,
    /// An inbox consumer (of any instance) that has acknowledged nothing for this long (seconds)
    /// is taken for gone and no longer holds items back from deletion.
    #[serde(default = "default_inbox_consumer_timeout_secs")]
    pub inbox_consumer_timeout_secs: u64,
    /// Connections in the pool.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Apply pending migrations when `serve` starts.
    #[serde(default = "default_true")]
    pub migrate_on_start: bool,
}

/// The database used when `[database] url` is not set.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://switchboard.db";
fn default_instance_name() -> String {
    "main".to_owned()
}
fn default_inbox_retention_secs() -> u64 {
    600
}
fn default_inbox_consumer_timeout_secs() -> u64 {
    7 * 24 * 3600
}
fn default_max_connections() -> u32 {
    8
}
fn default_true() -> bool {
    true
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            instance_name: default_instance_name(),
            inbox_retention_secs: default_inbox_retention_secs(),
            inbox_consumer_timeout_secs: default_inbox_consumer_timeout_secs(),
            max_connections: default_max_connections(),
            migrate_on_start: true,
        }
    }
}

impl DatabaseConfig {
    /// `url`, or the default when unset (what [`super::Config::database_url`] answers).
    pub(super) fn url(&self) -> &str {
        self.url.as_ref().map_or(DEFAULT_DATABASE_URL, Secret::expose)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url();
        if !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            // The URL itself is not repeated: it may hold a password.
            return Err(invalid("database.url", "must start with sqlite:, postgres:// or postgresql://"));
        }
        if self.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        let name = &self.instance_name;
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                "database.instance_name",
                "1-64 characters of A-Z, a-z, 0-9, '-', '_' and '.'",
            ));
        }
        if self.inbox_retention_secs == 0 {
            return Err(invalid("database.inbox_retention_secs", "must be at least 1"));
        }
        if self.inbox_consumer_timeout_secs < 3600 {
            return Err(invalid("database.inbox_consumer_timeout_secs", "must be at least 3600"));
        }
        Ok(())
    }
}

/// The section as `switchboard config example` writes it.
pub(super) const EXAMPLE: &str = r#"[database]
# sqlite://PATH (created if missing, WAL journal) or postgres://USER:PASSWORD@HOST/DB. Treated as a
# secret (logs show it without password or query); url_file = "/run/secrets/db_url" reads it from a file.
url = "sqlite://switchboard.db"
max_connections = 8
# Apply pending migrations when `switchboard serve` starts (`serve --no-migrate` turns this off).
migrate_on_start = true
# This instance's name among instances sharing one database (each keeps its own inbox positions).
instance_name = "main"
# Inbox items every consumer has handled are deleted once stored this long ago (seconds); so are
# transaction ids, but for the newest 100 (the homeserver may retry the latest).
inbox_retention_secs = 600
# A consumer that has acknowledged nothing for this long (seconds) no longer holds items back.
inbox_consumer_timeout_secs = 604800
"#;
