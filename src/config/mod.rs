//! Typed configuration: one TOML file plus `SWITCHBOARD_<SECTION>__<KEY>` environment overrides.
//!
//! One file per section (`homeserver.rs`, `appservice.rs`, …), each holding the section's struct,
//! its named defaults, its validation and the commented text `switchboard config example` writes
//! for it. A test checks that text against the structs: the example sets every key, to its default.
//! Every secret has a `*_file` alternative, and [`Config::load`] validates the whole thing so errors
//! name the key at fault.

mod appservice;
mod calls;
mod client;
mod cluster;
mod database;
mod directory;
mod homeserver;
mod log;
mod ops;
mod signalling;
mod turn;

use std::fmt;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};
use url::Url;

pub use appservice::AppserviceConfig;
pub use calls::CallsConfig;
pub use client::ClientConfig;
pub use cluster::ClusterConfig;
pub use database::{DEFAULT_DATABASE_URL, DatabaseConfig};
pub use directory::DirectoryConfig;
pub use homeserver::HomeserverConfig;
pub use log::{LogConfig, LogFormat};
pub use ops::OpsConfig;
pub use signalling::SignallingConfig;
pub use turn::{TurnConfig, TurnMode};

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

/// A secret string: never printed by `Debug`. It has no `==`: compare it with
/// [`Secret::matches`], which takes the same time wherever the inputs differ.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is this secret, in constant time (for equal lengths).
    pub fn matches(&self, candidate: &[u8]) -> bool {
        bool::from(subtle::ConstantTimeEq::ct_eq(self.0.as_bytes(), candidate))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Serialised as `"[redacted]"`: a serialised configuration shows which secrets are set, not them.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    pub signalling: SignallingConfig,
    #[serde(default)]
    pub calls: CallsConfig,
    #[serde(default)]
    pub turn: TurnConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub log: LogConfig,
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
        read_secret_file("database.url", &mut self.database.url, self.database.url_file.as_deref())?;
        read_secret_file(
            "cluster.redis_url",
            &mut self.cluster.redis_url,
            self.cluster.redis_url_file.as_deref(),
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
        self.homeserver.validate()?;
        self.appservice.validate(&self.homeserver)?;
        self.client.validate()?;
        self.ops.validate()?;
        self.database.validate()?;
        self.signalling.validate()?;
        self.calls.validate()?;
        self.turn.validate()?;
        self.cluster.validate()?;
        self.log.validate()?;
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

    /// `[database] url` (from the file, or the default when unset). It may hold a password: never
    /// log it; [`Config::database_url_redacted`] is what logs and errors show.
    pub fn database_url(&self) -> &str {
        self.database.url()
    }

    /// [`Config::database_url`] without its password (nor any query, which may carry one).
    pub fn database_url_redacted(&self) -> String {
        redact_url(self.database_url())
    }

    /// What [`crate::store::Store::prune`] keeps.
    pub fn inbox_retention(&self) -> crate::store::Retention {
        let ms = |secs: u64| i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        crate::store::Retention {
            items_after_ms: ms(self.database.inbox_retention_secs),
            consumer_timeout_ms: ms(self.database.inbox_consumer_timeout_secs),
        }
    }

    pub fn whoami_cache_ttl(&self) -> Duration {
        Duration::from_secs(self.homeserver.whoami_cache_secs)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.homeserver.request_timeout_secs)
    }
}

/// Header-read timeout of the client and ops listeners (seconds).
fn default_header_read_timeout_secs() -> u64 {
    10
}

/// Request timeout of the client and ops listeners (seconds).
fn default_listener_request_timeout_secs() -> u64 {
    60
}

/// A listener's limits (`max_connections`, `header_read_timeout_secs`, `request_timeout_secs`
/// under `section`): none of them may be 0. `keys` are their full names, for errors.
fn check_listener(keys: [&'static str; 3], values: [u64; 3]) -> Result<(), ConfigError> {
    match keys.into_iter().zip(values).find(|(_, value)| *value == 0) {
        Some((key, _)) => Err(invalid(key, "must be at least 1")),
        None => Ok(()),
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

/// `url` with its password replaced and its query left out; something that does not parse as a
/// URL is shown only by its scheme.
pub fn redact_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("redacted"));
            }
            parsed.set_query(None);
            parsed.set_fragment(None);
            parsed.to_string()
        }
        Err(_) => format!("{}:[redacted]", url.split(':').next().unwrap_or("")),
    }
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

/// The file's opening comment.
const PREAMBLE: &str = r#"# Switchboard configuration.
# Every key below may be overridden from the environment as SWITCHBOARD_<SECTION>__<KEY>,
# for example SWITCHBOARD_DATABASE__URL=postgres://... . Each secret may instead be read
# from a file with the `<key>_file` variant (e.g. hs_token_file = "/run/secrets/hs_token").
"#;

/// Renders a fully commented configuration file, section by section; `switchboard init` and
/// `config example` share it.
pub fn render(v: &Rendered<'_>) -> String {
    let toml_str = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let sections = [
        homeserver::EXAMPLE,
        appservice::EXAMPLE,
        client::EXAMPLE,
        ops::EXAMPLE,
        database::EXAMPLE,
        directory::EXAMPLE,
        signalling::EXAMPLE,
        calls::EXAMPLE,
        turn::EXAMPLE,
        cluster::EXAMPLE,
        log::EXAMPLE,
    ];
    let mut text = String::from(PREAMBLE);
    for section in sections {
        text.push('\n');
        text.push_str(section);
    }
    text.replace("{server_name}", &toml_str(v.server_name))
        .replace("{homeserver_url}", &toml_str(v.homeserver_url))
        .replace("{as_token}", &toml_str(v.as_token))
        .replace("{hs_token}", &toml_str(v.hs_token))
        .replace("{turn_shared_secret}", &toml_str(v.turn_shared_secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example and the structs cannot drift apart: the example sets every key a default
    /// configuration has (secrets and deployment values aside), each to its default, and nothing
    /// else (`deny_unknown_fields` refuses unknown keys).
    #[test]
    fn the_example_sets_every_key_to_its_default() {
        let example = render(&Rendered::EXAMPLE);
        let parsed = Config::from_toml_str(&example).expect("the example is valid");
        // The same deployment values, and nothing else: every other key takes its default.
        let minimal = format!(
            "[homeserver]\nserver_name = \"example.org\"\nurl = \"http://127.0.0.1:8008\"\n\
             [appservice]\nas_token = \"{}\"\nhs_token = \"{}\"\n[turn]\nshared_secret = \"{}\"\n",
            Rendered::EXAMPLE.as_token,
            Rendered::EXAMPLE.hs_token,
            Rendered::EXAMPLE.turn_shared_secret,
        );
        let defaults = Config::from_toml_str(&minimal).unwrap();
        let as_table = |config: &Config| toml::Table::try_from(config).expect("a config serialises");
        let (parsed, defaults) = (as_table(&parsed), as_table(&defaults));
        let written: toml::Table = example.parse().unwrap();
        for (section, keys) in &defaults {
            for key in keys.as_table().unwrap().keys() {
                // `database.url` is left unset by default and written out as the default URL.
                let present = written.get(section).and_then(|keys| keys.get(key)).is_some();
                assert!(present, "switchboard config example does not set {section}.{key}");
            }
        }
        let mut parsed = parsed;
        if let Some(database) = parsed.get_mut("database").and_then(toml::Value::as_table_mut) {
            database.remove("url");
        }
        assert_eq!(parsed, defaults, "the example's values differ from the defaults");
    }

    #[test]
    fn listener_limits_of_zero_are_refused_by_name() {
        assert!(error_of(&minimal("[client]\nmax_connections = 0\n")).contains("client.max_connections"));
        assert!(
            error_of(&minimal("[ops]\nheader_read_timeout_secs = 0\n"))
                .contains("ops.header_read_timeout_secs")
        );
        let toml = minimal("").replace("[appservice]\n", "[appservice]\nrequest_timeout_secs = 0\n");
        assert!(error_of(&toml).contains("appservice.request_timeout_secs"));
    }

    #[test]
    fn committed_example_matches_config_example() {
        let committed = include_str!("../../switchboard.example.toml");
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
    fn a_database_password_is_never_shown() {
        let url = "postgres://switchboard:hunter2-database-password@db.internal:5432/sb?password=also-secret";
        let config = Config::from_toml_str(&minimal(&format!("[database]\nurl = \"{url}\"\n"))).unwrap();
        assert_eq!(config.database_url(), url, "the store gets the URL whole");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("also-secret"), "{shown}");
        assert_eq!(config.database_url_redacted(), "postgres://switchboard:redacted@db.internal:5432/sb");
        assert_eq!(redact_url("sqlite://switchboard.db"), "sqlite://switchboard.db");
        assert_eq!(redact_url("not a url:hunter2"), "not a url:[redacted]");
        // A bad URL is refused without being repeated.
        let error = error_of(&minimal("[database]\nurl = \"mysql://root:hunter2@db/sb\"\n"));
        assert!(error.contains("database.url") && !error.contains("hunter2"), "{error}");
    }

    #[test]
    fn the_database_url_can_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db_url");
        std::fs::write(&file, "postgres://sb:hunter2@db/sb\n").unwrap();
        let toml = minimal(&format!("[database]\nurl_file = \"{}\"\n", file.display()));
        assert_eq!(Config::from_toml_str(&toml).unwrap().database_url(), "postgres://sb:hunter2@db/sb");
        let both = toml.replace("url_file", "url = \"sqlite://x.db\"\nurl_file");
        assert!(error_of(&both).contains("database.url and database.url_file are both set"));
    }

    #[test]
    fn a_redis_password_is_never_shown() {
        let url = "redis://:hunter2-redis-password@redis.internal:6379/0";
        let config = Config::from_toml_str(&minimal(&format!("[cluster]\nredis_url = \"{url}\"\n"))).unwrap();
        assert_eq!(config.cluster.redis_url.as_ref().map(Secret::expose), Some(url));
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(config.cluster.redis_url_redacted().unwrap(), "redis://:redacted@redis.internal:6379/0");
        assert_eq!(config.cluster.channel_prefix("example.org"), "switchboard.example.org.");
        let error = error_of(&minimal("[cluster]\nredis_url = \"http://:hunter2@redis/\"\n"));
        assert!(error.contains("cluster.redis_url") && !error.contains("hunter2"), "{error}");
    }

    #[test]
    fn secrets_match_only_themselves() {
        let secret = Secret::new("correct horse battery staple");
        assert!(secret.matches(b"correct horse battery staple"));
        assert!(!secret.matches(b"correct horse battery stapl"));
        assert!(!secret.matches(b"correct horse battery staplf"));
        assert!(!secret.matches(b""));
    }

    #[test]
    fn minimal_config_fills_defaults() {
        let config = Config::from_toml_str(&minimal("")).unwrap();
        assert_eq!(config.database_url(), "sqlite://switchboard.db");
        assert_eq!(config.client.listen, ClientConfig::default().listen);
        assert!(config.turn.shared_secret.is_none());
        assert_eq!(config.turn.mode, TurnMode::Off);
        assert_eq!(config.turn.listen, TurnConfig::default().listen);
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
