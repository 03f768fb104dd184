//! Typed configuration: one TOML file plus `SWITCHBOARD_<SECTION>__<KEY>` environment overrides.
//!
//! Every section has named defaults (the `default_*` functions below are the single source of truth,
//! also used to render the commented example), every secret has a `*_file` alternative, and
//! [`Config::load`] validates the whole thing so errors name the key at fault.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use url::Url;

/// Prefix of environment overrides; `__` separates section and key: `SWITCHBOARD_DATABASE__URL`.
pub const ENV_PREFIX: &str = "SWITCHBOARD_";

/// Shortest accepted token or shared secret, in characters (`switchboard init` makes 64).
const MIN_SECRET_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("{key}: cannot read secret file {path}: {source}")]
    SecretFile { key: String, path: PathBuf, source: std::io::Error },
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

/// A secret string: never printed by `Debug`, compared by its users in constant time.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub homeserver: HomeserverConfig,
    pub appservice: AppserviceConfig,
    #[serde(default)]
    pub client: ClientConfig,
    #[serde(default)]
    pub ops: OpsConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub directory: DirectoryConfig,
    #[serde(default)]
    pub turn: TurnConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeserverConfig {
    /// The homeserver's `server_name` (the part after `:` in user ids).
    pub server_name: String,
    /// Where Switchboard reaches the homeserver's client-server API.
    pub url: Url,
    /// How long a successful `whoami` of a client's access token is trusted.
    #[serde(default = "default_whoami_cache_secs")]
    pub whoami_cache_secs: u64,
    /// Per-request timeout towards the homeserver.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppserviceConfig {
    /// The registration's `id`.
    #[serde(default = "default_appservice_id")]
    pub id: String,
    /// Where the appservice API listens (for the homeserver only).
    #[serde(default = "default_appservice_listen")]
    pub listen: SocketAddr,
    /// The URL the homeserver uses to reach `listen` (the registration's `url`).
    #[serde(default = "default_appservice_url")]
    pub url: Url,
    /// Token Switchboard presents to the homeserver.
    pub as_token: Option<Secret>,
    pub as_token_file: Option<PathBuf>,
    /// Token the homeserver presents to Switchboard.
    pub hs_token: Option<Secret>,
    pub hs_token_file: Option<PathBuf>,
    /// Localpart of the appservice's own user.
    #[serde(default = "default_sender_localpart")]
    pub sender_localpart: String,
    /// Largest accepted transaction body, in bytes.
    #[serde(default = "default_max_transaction_bytes")]
    pub max_transaction_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Where the client API (HTTP and WebSocket) listens; put a TLS proxy in front.
    #[serde(default = "default_client_listen")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// Where `/health`, `/ready` and `/metrics` listen.
    #[serde(default = "default_ops_listen")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (created if missing, WAL) or `postgres://…`.
    #[serde(default = "default_database_url")]
    pub url: String,
    /// Connections in the pool.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Apply pending migrations when `serve` starts.
    #[serde(default = "default_true")]
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Deserialize)]
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnConfig {
    /// `embedded` (Switchboard runs the relay), `external` (only mints credentials for relays such
    /// as coturn that share the secret) or `off`.
    #[serde(default)]
    pub mode: TurnMode,
    /// TURN REST shared secret (Synapse `turn_shared_secret`, coturn `static-auth-secret`).
    pub shared_secret: Option<Secret>,
    pub shared_secret_file: Option<PathBuf>,
    /// Earlier secrets whose credentials the embedded relay still accepts (rotation).
    #[serde(default)]
    pub old_shared_secrets: Vec<Secret>,
    /// UDP listener of the embedded relay.
    #[serde(default = "default_turn_listen")]
    pub listen: SocketAddr,
    /// TURN over TLS (`turns:`): listener, and the PEM certificate chain and private key.
    pub tls_listen: Option<SocketAddr>,
    pub tls_certificate: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// REALM of the embedded relay; the homeserver's server name by default.
    pub realm: Option<String>,
    /// Address relay sockets bind to; the listen address's IP by default.
    pub relay_address: Option<IpAddr>,
    /// IPv6 address for IPv6 relays (REQUESTED-ADDRESS-FAMILY); none by default.
    pub relay_address_v6: Option<IpAddr>,
    /// Inclusive range of relay ports.
    #[serde(default = "default_relay_port_min")]
    pub relay_port_min: u16,
    #[serde(default = "default_relay_port_max")]
    pub relay_port_max: u16,
    /// Address advertised as the relayed address (behind NAT); the relay socket's by default.
    pub external_address: Option<IpAddr>,
    /// Peer ranges the relay may reach even though the built-in deny list covers them.
    #[serde(default)]
    pub allowed_peers: Vec<ipnet::IpNet>,
    /// Peer ranges denied in addition to the built-in list.
    #[serde(default)]
    pub denied_peers: Vec<ipnet::IpNet>,
    /// Allocations per user (the user part of `<expiry>:<user>`: fresh credentials add none).
    #[serde(default = "default_turn_user_quota")]
    pub user_quota: usize,
    /// Allocations in all.
    #[serde(default = "default_turn_total_quota")]
    pub total_quota: usize,
    /// Longest allocation lifetime granted, in seconds.
    #[serde(default = "default_turn_max_lifetime_secs")]
    pub max_lifetime_secs: u64,
    /// Bytes per second each allocation may relay (0: no cap).
    #[serde(default = "default_turn_bandwidth")]
    pub bandwidth_bytes_per_sec: u64,
    /// Unauthenticated requests per second per source (an IPv4 address or IPv6 /64; 0: no limit).
    #[serde(default = "default_turn_unauthenticated_per_sec")]
    pub unauthenticated_per_sec: u32,
    /// How long a nonce stays fresh (seconds) before a request with it gets 438 and a new one.
    #[serde(default = "default_turn_nonce_lifetime_secs")]
    pub nonce_lifetime_secs: u64,
    /// Seconds a TCP or TLS client may stay connected without an allocation (coturn's
    /// max-allocate-timeout): from connecting, or from the end of its allocation.
    #[serde(default = "default_turn_allocate_timeout_secs")]
    pub allocate_timeout_secs: u64,
    /// Open TCP and TLS connections per source (an IPv4 address or IPv6 /64; 0: no limit).
    #[serde(default = "default_turn_connections_per_source")]
    pub connections_per_source: usize,
    /// Permissions (peer IP addresses) one allocation may hold; a CreatePermission or ChannelBind
    /// that would install more is refused with 508 (Insufficient Capacity).
    #[serde(default = "default_turn_permissions_per_allocation")]
    pub permissions_per_allocation: usize,
    /// Channel bindings one allocation may hold; a ChannelBind for one more gets 508.
    #[serde(default = "default_turn_channels_per_allocation")]
    pub channels_per_allocation: usize,
    /// Relay threads (shards, each with its own sockets on the listen addresses); 0: one per core.
    #[serde(default)]
    pub threads: usize,
    /// TURN URIs handed to clients; by default, the embedded relay's own listeners.
    #[serde(default)]
    pub uris: Vec<String>,
    /// Lifetime of minted credentials, in seconds.
    #[serde(default = "default_turn_user_lifetime_secs")]
    pub user_lifetime_secs: u64,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TurnMode {
    #[default]
    Embedded,
    External,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `switchboard=debug,info`; `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn default_whoami_cache_secs() -> u64 {
    300
}
fn default_request_timeout_secs() -> u64 {
    30
}
fn default_appservice_id() -> String {
    "switchboard".to_owned()
}
fn default_appservice_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9330))
}
fn default_appservice_url() -> Url {
    Url::parse("http://127.0.0.1:9330").expect("static URL")
}
fn default_sender_localpart() -> String {
    "switchboard".to_owned()
}
fn default_max_transaction_bytes() -> usize {
    // 100 events of at most 64 KiB each, plus ephemeral data and to-device messages.
    32 * 1024 * 1024
}
fn default_client_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9331))
}
fn default_ops_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9332))
}
fn default_database_url() -> String {
    "sqlite://switchboard.db".to_owned()
}
fn default_max_connections() -> u32 {
    8
}
fn default_true() -> bool {
    true
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
fn default_presence_stale_secs() -> u64 {
    300
}
fn default_turn_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3478))
}
fn default_relay_port_min() -> u16 {
    49152
}
fn default_relay_port_max() -> u16 {
    65535
}
fn default_turn_user_quota() -> usize {
    10
}
fn default_turn_total_quota() -> usize {
    10_000
}
fn default_turn_max_lifetime_secs() -> u64 {
    3600
}
fn default_turn_bandwidth() -> u64 {
    1_048_576
}
fn default_turn_unauthenticated_per_sec() -> u32 {
    50
}
fn default_turn_nonce_lifetime_secs() -> u64 {
    600
}
fn default_turn_allocate_timeout_secs() -> u64 {
    60
}
fn default_turn_connections_per_source() -> usize {
    256
}
fn default_turn_permissions_per_allocation() -> usize {
    128
}
fn default_turn_channels_per_allocation() -> usize {
    128
}
fn default_turn_user_lifetime_secs() -> u64 {
    86_400
}
fn default_log_level() -> String {
    "info".to_owned()
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self { listen: default_client_listen() }
    }
}
impl Default for OpsConfig {
    fn default() -> Self {
        Self { listen: default_ops_listen() }
    }
}
impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: default_database_url(),
            max_connections: default_max_connections(),
            migrate_on_start: true,
        }
    }
}
impl Default for DirectoryConfig {
    fn default() -> Self {
        Self {
            presence_stale_secs: default_presence_stale_secs(),
            anonymous_read: false,
            lookups_per_sec: default_lookups_per_sec(),
            reconcile_interval_secs: default_reconcile_interval_secs(),
            profile_cache_secs: default_profile_cache_secs(),
        }
    }
}
impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            mode: TurnMode::default(),
            shared_secret: None,
            shared_secret_file: None,
            old_shared_secrets: Vec::new(),
            listen: default_turn_listen(),
            tls_listen: None,
            tls_certificate: None,
            tls_key: None,
            realm: None,
            relay_address: None,
            relay_address_v6: None,
            relay_port_min: default_relay_port_min(),
            relay_port_max: default_relay_port_max(),
            external_address: None,
            allowed_peers: Vec::new(),
            denied_peers: Vec::new(),
            user_quota: default_turn_user_quota(),
            total_quota: default_turn_total_quota(),
            max_lifetime_secs: default_turn_max_lifetime_secs(),
            bandwidth_bytes_per_sec: default_turn_bandwidth(),
            unauthenticated_per_sec: default_turn_unauthenticated_per_sec(),
            nonce_lifetime_secs: default_turn_nonce_lifetime_secs(),
            allocate_timeout_secs: default_turn_allocate_timeout_secs(),
            connections_per_source: default_turn_connections_per_source(),
            permissions_per_allocation: default_turn_permissions_per_allocation(),
            channels_per_allocation: default_turn_channels_per_allocation(),
            threads: 0,
            uris: Vec::new(),
            user_lifetime_secs: default_turn_user_lifetime_secs(),
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        Self { level: default_log_level(), format: LogFormat::Text }
    }
}

impl Config {
    /// Reads `path`, applies environment overrides, loads `*_file` secrets and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::file_exact(path)))
    }

    /// Parses a TOML document (with environment overrides), as [`Config::load`] does for a file.
    pub fn from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(toml)))
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        // Only `SECTION__KEY` variables are configuration; other SWITCHBOARD_* names are left alone.
        let env = Env::prefixed(ENV_PREFIX).filter(|key| key.as_str().contains("__")).split("__");
        let mut config: Config = figment.merge(env).extract().map_err(Box::new)?;
        config.read_secret_files()?;
        config.validate()?;
        Ok(config)
    }

    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        read_secret_file(
            "appservice.as_token",
            &mut self.appservice.as_token,
            self.appservice.as_token_file.as_deref(),
        )?;
        read_secret_file(
            "appservice.hs_token",
            &mut self.appservice.hs_token,
            self.appservice.hs_token_file.as_deref(),
        )?;
        read_secret_file(
            "turn.shared_secret",
            &mut self.turn.shared_secret,
            self.turn.shared_secret_file.as_deref(),
        )?;
        Ok(())
    }

    /// Checks every value a running service depends on; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        ruma::ServerName::parse(&self.homeserver.server_name)
            .map_err(|e| invalid("homeserver.server_name", format!("not a Matrix server name: {e}")))?;
        check_http_url("homeserver.url", &self.homeserver.url)?;
        check_http_url("appservice.url", &self.appservice.url)?;
        if self.homeserver.request_timeout_secs == 0 {
            return Err(invalid("homeserver.request_timeout_secs", "must be at least 1"));
        }
        if self.appservice.id.is_empty() {
            return Err(invalid("appservice.id", "must not be empty"));
        }
        ruma::UserId::parse_with_server_name(
            self.appservice.sender_localpart.as_str(),
            <&ruma::ServerName>::try_from(self.homeserver.server_name.as_str())
                .map_err(|e| invalid("homeserver.server_name", e.to_string()))?,
        )
        .map_err(|e| invalid("appservice.sender_localpart", format!("not a valid localpart: {e}")))?;
        let as_token = check_secret("appservice.as_token", self.appservice.as_token.as_ref())?;
        let hs_token = check_secret("appservice.hs_token", self.appservice.hs_token.as_ref())?;
        if as_token == hs_token {
            return Err(invalid("appservice.hs_token", "must differ from appservice.as_token"));
        }
        if self.appservice.max_transaction_bytes < 64 * 1024 {
            return Err(invalid("appservice.max_transaction_bytes", "must be at least 65536 (one event)"));
        }
        if !(self.database.url.starts_with("sqlite:")
            || self.database.url.starts_with("postgres://")
            || self.database.url.starts_with("postgresql://"))
        {
            return Err(invalid("database.url", "must start with sqlite:, postgres:// or postgresql://"));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if self.turn.mode != TurnMode::Off && self.turn.shared_secret.is_none() {
            return Err(invalid(
                "turn.shared_secret",
                "missing (set turn.shared_secret or turn.shared_secret_file, or turn.mode = \"off\")",
            ));
        }
        if self.turn.shared_secret.is_some() || self.turn.shared_secret_file.is_some() {
            check_secret("turn.shared_secret", self.turn.shared_secret.as_ref())?;
        }
        for secret in &self.turn.old_shared_secrets {
            check_secret("turn.old_shared_secrets", Some(secret))?;
        }
        let relay_ip = self.turn.relay_address.unwrap_or(self.turn.listen.ip());
        if self.turn.mode == TurnMode::Embedded
            && relay_ip.is_unspecified()
            && self.turn.external_address.is_none()
        {
            return Err(invalid(
                "turn.external_address",
                "required when relay sockets bind to an unspecified address (0.0.0.0 or ::): the address clients reach",
            ));
        }
        if self.turn.tls_listen.is_some()
            && (self.turn.tls_certificate.is_none() || self.turn.tls_key.is_none())
        {
            return Err(invalid("turn.tls_listen", "needs turn.tls_certificate and turn.tls_key"));
        }
        if self.turn.relay_port_min > self.turn.relay_port_max {
            return Err(invalid("turn.relay_port_min", "must not exceed turn.relay_port_max"));
        }
        if self.turn.nonce_lifetime_secs == 0 {
            return Err(invalid("turn.nonce_lifetime_secs", "must be at least 1"));
        }
        if self.turn.allocate_timeout_secs == 0 {
            return Err(invalid("turn.allocate_timeout_secs", "must be at least 1"));
        }
        if self.turn.permissions_per_allocation == 0 {
            return Err(invalid("turn.permissions_per_allocation", "must be at least 1"));
        }
        if self.turn.channels_per_allocation == 0 {
            return Err(invalid("turn.channels_per_allocation", "must be at least 1"));
        }
        if self.turn.threads > 256 {
            return Err(invalid("turn.threads", "must be at most 256 (0: one per core)"));
        }
        if self.turn.max_lifetime_secs < 600 {
            return Err(invalid("turn.max_lifetime_secs", "must be at least 600 (the default lifetime)"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", format!("not a tracing filter: {e}")))?;
        Ok(())
    }

    /// The validated `as_token`.
    pub fn as_token(&self) -> &Secret {
        self.appservice.as_token.as_ref().expect("validated: appservice.as_token is set")
    }

    /// The validated `hs_token`.
    pub fn hs_token(&self) -> &Secret {
        self.appservice.hs_token.as_ref().expect("validated: appservice.hs_token is set")
    }

    pub fn whoami_cache_ttl(&self) -> Duration {
        Duration::from_secs(self.homeserver.whoami_cache_secs)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.homeserver.request_timeout_secs)
    }
}

fn read_secret_file(key: &str, value: &mut Option<Secret>, file: Option<&Path>) -> Result<(), ConfigError> {
    let Some(path) = file else { return Ok(()) };
    if value.is_some() {
        return Err(ConfigError::Invalid {
            key: "secrets",
            reason: format!("{key} and {key}_file are both set; keep one"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        key: format!("{key}_file"),
        path: path.to_owned(),
        source,
    })?;
    *value = Some(Secret::new(text.trim()));
    Ok(())
}

fn check_secret<'a>(key: &'static str, value: Option<&'a Secret>) -> Result<&'a str, ConfigError> {
    let Some(secret) = value else {
        return Err(invalid(key, format!("missing (set {key} or {key}_file)")));
    };
    let secret = secret.expose();
    if secret.chars().count() < MIN_SECRET_LEN {
        return Err(invalid(key, format!("too short: use at least {MIN_SECRET_LEN} random characters")));
    }
    if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(key, "must not contain whitespace"));
    }
    Ok(secret)
}

fn check_http_url(key: &'static str, url: &Url) -> Result<(), ConfigError> {
    match url.scheme() {
        "http" | "https" if url.host().is_some() => Ok(()),
        _ => Err(invalid(key, format!("{url} is not an http(s) URL with a host"))),
    }
}

/// Values that differ between deployments; everything else in the rendered file is a default.
pub struct Rendered<'a> {
    pub server_name: &'a str,
    pub homeserver_url: &'a str,
    pub as_token: &'a str,
    pub hs_token: &'a str,
    pub turn_shared_secret: &'a str,
}

impl Rendered<'_> {
    /// The placeholders of `switchboard config example` (valid, but never to be deployed).
    pub const EXAMPLE: Rendered<'static> = Rendered {
        server_name: "example.org",
        homeserver_url: "http://127.0.0.1:8008",
        as_token: "CHANGE-ME-as-token-generate-with-switchboard-init",
        hs_token: "CHANGE-ME-hs-token-generate-with-switchboard-init",
        turn_shared_secret: "CHANGE-ME-turn-secret-generate-with-switchboard-init",
    };
}

/// Renders a fully commented configuration file; `switchboard init` and `config example` share it.
// Reason: one template, read top to bottom like the file it writes.
#[allow(clippy::too_many_lines)]
pub fn render(v: &Rendered<'_>) -> String {
    let toml_str = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let db = DatabaseConfig::default();
    format!(
        r#"# Switchboard configuration.
# Every key below may be overridden from the environment as SWITCHBOARD_<SECTION>__<KEY>,
# for example SWITCHBOARD_DATABASE__URL=postgres://... . Each secret may instead be read
# from a file with the `<key>_file` variant (e.g. hs_token_file = "/run/secrets/hs_token").

[homeserver]
# The homeserver's server_name: the part after ':' in user ids.
server_name = {server_name}
# Where Switchboard reaches the homeserver's client-server API.
url = {homeserver_url}
# Seconds a client's access token, once checked with /whoami, is trusted.
whoami_cache_secs = {whoami}
# Timeout of one request to the homeserver, in seconds.
request_timeout_secs = {timeout}

[appservice]
# The registration's id (see `switchboard registration`).
id = {id}
# Listener of the appservice API. Only the homeserver talks to it: keep it private.
listen = "{as_listen}"
# The URL the homeserver uses to reach that listener (the registration's url).
url = {as_url}
# Token Switchboard presents to the homeserver, and the one the homeserver presents to us.
as_token = {as_token}
hs_token = {hs_token}
# Localpart of Switchboard's own Matrix user.
sender_localpart = {sender}
# Largest transaction body accepted, in bytes.
max_transaction_bytes = {max_txn}

[client]
# Listener of the client API (HTTP and WebSocket). Put a TLS-terminating proxy in front of it.
listen = "{client_listen}"

[ops]
# Listener of /health, /ready and /metrics. Keep it private.
listen = "{ops_listen}"

[database]
# sqlite://PATH (created if missing, WAL journal) or postgres://USER:PASSWORD@HOST/DB.
url = {db_url}
max_connections = {db_max}
# Apply pending migrations when `switchboard serve` starts (`serve --no-migrate` turns this off).
migrate_on_start = {db_migrate}

[directory]
# Presence learnt longer ago than this (seconds) counts as offline after a restart, until confirmed.
presence_stale_secs = {presence_stale}
# Let clients without an access token read the directory (lookups of addresses and their users).
anonymous_read = false
# Requests per second, at most, that the directory makes to the homeserver: profile look-ups of
# users it has not seen yet, and presence reconciliation. 0 turns both off.
lookups_per_sec = {lookups_per_sec}
# How often (seconds), at most, the presence of each online or watched local user is asked of the
# homeserver: presence pushes are lost while Switchboard is down, and never retried.
reconcile_interval_secs = {reconcile_interval}
# How long (seconds) a profile looked up on the homeserver, or its absence, is trusted.
profile_cache_secs = {profile_cache}

[turn]
# "embedded": Switchboard runs the TURN/STUN relay; "external": it only hands out credentials for
# relays that share the secret (a coturn fleet with use-auth-secret); "off".
mode = "embedded"
# TURN REST shared secret: Synapse's turn_shared_secret and coturn's static-auth-secret.
shared_secret = {turn_secret}
# Earlier secrets whose credentials the relay still accepts while clients move to the new one.
old_shared_secrets = []
# UDP listener of the embedded relay. Loopback by default: to serve the internet, listen on a public
# address (or on 0.0.0.0 with external_address set).
listen = "{turn_listen}"
# TURN over TLS (turns:), e.g. on 5349 or 443: listener, PEM certificate chain and private key.
# tls_listen = "0.0.0.0:5349"
# tls_certificate = "/etc/switchboard/turn.crt"
# tls_key = "/etc/switchboard/turn.key"
# Relay sockets: the address they bind to (default: the listen address's IP), an IPv6 address for
# IPv6 relays (default: none), and their inclusive port range.
# relay_address = "203.0.113.10"
# relay_address_v6 = "2001:db8::10"
relay_port_min = {relay_min}
relay_port_max = {relay_max}
# Address advertised to clients as their relayed address, when the relay is behind NAT.
# external_address = "203.0.113.10"
# REALM (default: the server name).
# realm = "example.org"
# Peers are refused (403) on loopback, private, CGNAT, link-local, multicast, reserved, IPv4-mapped,
# NAT64, unique-local and documentation ranges. allowed_peers lifts that for the ranges given;
# denied_peers adds ranges. CIDR notation, e.g. ["10.8.0.0/16"].
allowed_peers = []
denied_peers = []
# Allocations per user (whatever the credentials' expiry) and in all; the longest lifetime granted
# (seconds); bytes per second each allocation may relay (0: no cap); unauthenticated requests per
# second per source address.
user_quota = {user_quota}
total_quota = {total_quota}
max_lifetime_secs = {max_lifetime}
bandwidth_bytes_per_sec = {bandwidth}
unauthenticated_per_sec = {unauth_rate}
# How long a nonce stays fresh (seconds; coturn's stale-nonce) before 438 hands out a new one.
nonce_lifetime_secs = {nonce_lifetime}
# Seconds a TCP or TLS client may stay connected without an allocation (coturn's
# max-allocate-timeout), from connecting or from the end of its allocation.
allocate_timeout_secs = {allocate_timeout}
# Open TCP and TLS connections per source (0: no limit); more are closed at once. For this and
# unauthenticated_per_sec a source is an IPv4 address or an IPv6 /64.
connections_per_source = {connections_per_source}
# Permissions (peer IP addresses) and channel bindings one allocation may hold; a CreatePermission
# or ChannelBind past them is refused with 508 (Insufficient Capacity).
permissions_per_allocation = {permissions_per_allocation}
channels_per_allocation = {channels_per_allocation}
# Relay threads, each with its own sockets on the listen addresses (SO_REUSEPORT); 0: one per core.
threads = 0
# TURN URIs handed to clients, e.g. ["turn:turn.example.org:3478?transport=udp"]. Empty: the embedded
# relay's own listeners (at external_address when set); set them when clients know the relay by name.
uris = []
# Lifetime of minted TURN credentials, in seconds.
user_lifetime_secs = {turn_lifetime}

[log]
# A tracing filter, e.g. "info" or "switchboard=debug,info". RUST_LOG takes precedence.
level = {log_level}
# "text" or "json".
format = "text"
"#,
        server_name = toml_str(v.server_name),
        homeserver_url = toml_str(v.homeserver_url),
        whoami = default_whoami_cache_secs(),
        timeout = default_request_timeout_secs(),
        id = toml_str(&default_appservice_id()),
        as_listen = default_appservice_listen(),
        as_url = toml_str(default_appservice_url().as_str().trim_end_matches('/')),
        as_token = toml_str(v.as_token),
        hs_token = toml_str(v.hs_token),
        sender = toml_str(&default_sender_localpart()),
        max_txn = default_max_transaction_bytes(),
        client_listen = default_client_listen(),
        ops_listen = default_ops_listen(),
        db_url = toml_str(&db.url),
        db_max = db.max_connections,
        db_migrate = db.migrate_on_start,
        presence_stale = default_presence_stale_secs(),
        lookups_per_sec = default_lookups_per_sec(),
        reconcile_interval = default_reconcile_interval_secs(),
        profile_cache = default_profile_cache_secs(),
        turn_secret = toml_str(v.turn_shared_secret),
        turn_listen = default_turn_listen(),
        relay_min = default_relay_port_min(),
        relay_max = default_relay_port_max(),
        user_quota = default_turn_user_quota(),
        total_quota = default_turn_total_quota(),
        max_lifetime = default_turn_max_lifetime_secs(),
        bandwidth = default_turn_bandwidth(),
        unauth_rate = default_turn_unauthenticated_per_sec(),
        nonce_lifetime = default_turn_nonce_lifetime_secs(),
        allocate_timeout = default_turn_allocate_timeout_secs(),
        connections_per_source = default_turn_connections_per_source(),
        permissions_per_allocation = default_turn_permissions_per_allocation(),
        channels_per_allocation = default_turn_channels_per_allocation(),
        turn_lifetime = default_turn_user_lifetime_secs(),
        log_level = toml_str(&default_log_level()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_to_the_defaults() {
        let config = Config::from_toml_str(&render(&Rendered::EXAMPLE)).expect("example is valid");
        assert_eq!(config.homeserver.server_name, "example.org");
        assert_eq!(config.appservice.listen, default_appservice_listen());
        assert_eq!(config.database.url, default_database_url());
        assert_eq!(config.turn.user_lifetime_secs, default_turn_user_lifetime_secs());
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn committed_example_matches_config_example() {
        let committed = include_str!("../switchboard.example.toml");
        assert_eq!(
            committed,
            render(&Rendered::EXAMPLE),
            "regenerate with: switchboard config example > switchboard.example.toml"
        );
    }

    fn minimal(extra: &str) -> String {
        format!(
            "[homeserver]\nserver_name = \"example.org\"\nurl = \"http://127.0.0.1:8008\"\n\
             [appservice]\nas_token = \"{a}\"\nhs_token = \"{h}\"\n{extra}",
            a = "a".repeat(40),
            h = "h".repeat(40),
        ) + if extra.contains("[turn]") { "" } else { "[turn]\nmode = \"off\"\n" }
    }

    fn error_of(toml: &str) -> String {
        Config::from_toml_str(toml).expect_err("must be rejected").to_string()
    }

    #[test]
    fn minimal_config_fills_defaults() {
        let config = Config::from_toml_str(&minimal("")).unwrap();
        assert_eq!(config.database.url, "sqlite://switchboard.db");
        assert_eq!(config.client.listen, default_client_listen());
        assert!(config.turn.shared_secret.is_none());
        assert_eq!(config.turn.mode, TurnMode::Off);
        assert_eq!(config.turn.listen, default_turn_listen());
    }

    #[test]
    fn the_embedded_relay_needs_a_secret() {
        let without = minimal("[turn]\n");
        assert!(error_of(&without).contains("turn.shared_secret"), "{}", error_of(&without));
        let with = minimal(&format!("[turn]\nshared_secret = \"{}\"\n", "t".repeat(40)));
        assert_eq!(Config::from_toml_str(&with).unwrap().turn.mode, TurnMode::Embedded);
        let bad_range = minimal("[turn]\nmode = \"off\"\nrelay_port_min = 60000\nrelay_port_max = 50000\n");
        assert!(error_of(&bad_range).contains("turn.relay_port_min"));
    }

    #[test]
    fn missing_token_names_the_key() {
        let toml =
            "[homeserver]\nserver_name = \"example.org\"\nurl = \"http://x\"\n[appservice]\nas_token = \""
                .to_owned()
                + &"a".repeat(40)
                + "\"\n";
        assert!(error_of(&toml).contains("appservice.hs_token"), "{}", error_of(&toml));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = error_of(&minimal("[database]\nurll = \"sqlite://x.db\"\n"));
        assert!(err.contains("urll"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = error_of(&minimal("[database]\nmax_connections = \"many\"\n"));
        assert!(err.contains("max_connections"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        assert!(error_of(&minimal("[database]\nurl = \"mysql://x\"\n")).contains("database.url"));
        assert!(error_of(&minimal("[log]\nlevel = \"[[[\"\n")).contains("log.level"));
        assert!(error_of(&minimal("[turn]\nshared_secret = \"short\"\n")).contains("turn.shared_secret"));
        let same = minimal("").replace(&"h".repeat(40), &"a".repeat(40));
        assert!(error_of(&same).contains("appservice.hs_token"));
        let bad_server = minimal("").replace("example.org", "not a server");
        assert!(error_of(&bad_server).contains("homeserver.server_name"));
    }

    #[test]
    fn secret_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hs_token");
        std::fs::write(&path, format!("{}\n", "f".repeat(40))).unwrap();
        let toml = minimal("")
            .replace(&format!("hs_token = \"{}\"", "h".repeat(40)), &format!("hs_token_file = {path:?}"));
        let config = Config::from_toml_str(&toml).unwrap();
        assert_eq!(config.hs_token().expose(), "f".repeat(40));
    }

    #[test]
    fn missing_secret_file_names_the_key() {
        let toml = minimal("")
            .replace(&format!("hs_token = \"{}\"", "h".repeat(40)), "hs_token_file = \"/nonexistent/x\"");
        assert!(error_of(&toml).contains("appservice.hs_token_file"));
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let config = Config::from_toml_str(&minimal("")).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains(&"a".repeat(40)) && !debug.contains(&"h".repeat(40)));
    }
}
