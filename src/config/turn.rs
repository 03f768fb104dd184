//! `[turn]`: the embedded TURN/STUN relay, or the credentials for an external one.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, check_secret, invalid};

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// Open TCP and TLS connections in all (0: no limit); more are closed at once.
    #[serde(default = "default_turn_max_connections")]
    pub max_connections: usize,
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

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TurnMode {
    #[default]
    Embedded,
    External,
    Off,
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
fn default_turn_max_connections() -> usize {
    10_000
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
            max_connections: default_turn_max_connections(),
            permissions_per_allocation: default_turn_permissions_per_allocation(),
            channels_per_allocation: default_turn_channels_per_allocation(),
            threads: 0,
            uris: Vec::new(),
            user_lifetime_secs: default_turn_user_lifetime_secs(),
        }
    }
}

impl TurnConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.mode != TurnMode::Off && self.shared_secret.is_none() {
            return Err(invalid(
                "turn.shared_secret",
                "missing (set turn.shared_secret or turn.shared_secret_file, or turn.mode = \"off\")",
            ));
        }
        if self.shared_secret.is_some() || self.shared_secret_file.is_some() {
            check_secret("turn.shared_secret", self.shared_secret.as_ref())?;
        }
        for secret in &self.old_shared_secrets {
            check_secret("turn.old_shared_secrets", Some(secret))?;
        }
        let relay_ip = self.relay_address.unwrap_or(self.listen.ip());
        if self.mode == TurnMode::Embedded && relay_ip.is_unspecified() && self.external_address.is_none() {
            return Err(invalid(
                "turn.external_address",
                "required when relay sockets bind to an unspecified address (0.0.0.0 or ::): the address clients reach",
            ));
        }
        if self.tls_listen.is_some() && (self.tls_certificate.is_none() || self.tls_key.is_none()) {
            return Err(invalid("turn.tls_listen", "needs turn.tls_certificate and turn.tls_key"));
        }
        if self.relay_port_min > self.relay_port_max {
            return Err(invalid("turn.relay_port_min", "must not exceed turn.relay_port_max"));
        }
        if self.nonce_lifetime_secs == 0 {
            return Err(invalid("turn.nonce_lifetime_secs", "must be at least 1"));
        }
        if self.allocate_timeout_secs == 0 {
            return Err(invalid("turn.allocate_timeout_secs", "must be at least 1"));
        }
        if self.permissions_per_allocation == 0 {
            return Err(invalid("turn.permissions_per_allocation", "must be at least 1"));
        }
        if self.channels_per_allocation == 0 {
            return Err(invalid("turn.channels_per_allocation", "must be at least 1"));
        }
        if self.threads > 256 {
            return Err(invalid("turn.threads", "must be at most 256 (0: one per core)"));
        }
        if self.max_lifetime_secs < 600 {
            return Err(invalid("turn.max_lifetime_secs", "must be at least 600 (the default lifetime)"));
        }
        Ok(())
    }
}

/// The section as `switchboard config example` writes it.
pub(super) const EXAMPLE: &str = r#"[turn]
# "embedded": Switchboard runs the TURN/STUN relay; "external": it only hands out credentials for
# relays that share the secret (a coturn fleet with use-auth-secret); "off".
mode = "embedded"
# TURN REST shared secret: Synapse's turn_shared_secret and coturn's static-auth-secret.
shared_secret = {turn_shared_secret}
# Earlier secrets whose credentials the relay still accepts while clients move to the new one.
old_shared_secrets = []
# UDP listener of the embedded relay. Loopback by default: to serve the internet, listen on a public
# address (or on 0.0.0.0 with external_address set).
listen = "127.0.0.1:3478"
# TURN over TLS (turns:), e.g. on 5349 or 443: listener, PEM certificate chain and private key.
# tls_listen = "0.0.0.0:5349"
# tls_certificate = "/etc/switchboard/turn.crt"
# tls_key = "/etc/switchboard/turn.key"
# Relay sockets: the address they bind to (default: the listen address's IP), an IPv6 address for
# IPv6 relays (default: none), and their inclusive port range.
# relay_address = "203.0.113.10"
# relay_address_v6 = "2001:db8::10"
relay_port_min = 49152
relay_port_max = 65535
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
user_quota = 10
total_quota = 10000
max_lifetime_secs = 3600
bandwidth_bytes_per_sec = 1048576
unauthenticated_per_sec = 50
# How long a nonce stays fresh (seconds; coturn's stale-nonce) before 438 hands out a new one.
nonce_lifetime_secs = 600
# Seconds a TCP or TLS client may stay connected without an allocation (coturn's
# max-allocate-timeout), from connecting or from the end of its allocation.
allocate_timeout_secs = 60
# Open TCP and TLS connections per source (0: no limit); more are closed at once. For this and
# unauthenticated_per_sec a source is an IPv4 address or an IPv6 /64.
connections_per_source = 256
# Open TCP and TLS connections in all (0: no limit); more are closed at once. Each holds two small
# buffers and a task; keep it below the process's file descriptor limit.
max_connections = 10000
# Permissions (peer IP addresses) and channel bindings one allocation may hold; a CreatePermission
# or ChannelBind past them is refused with 508 (Insufficient Capacity).
permissions_per_allocation = 128
channels_per_allocation = 128
# Relay threads, each with its own sockets on the listen addresses (SO_REUSEPORT); 0: one per core.
threads = 0
# TURN URIs handed to clients, e.g. ["turn:turn.example.org:3478?transport=udp"]. Empty: the embedded
# relay's own listeners (at external_address when set); set them when clients know the relay by name.
uris = []
# Lifetime of minted TURN credentials, in seconds.
user_lifetime_secs = 86400
"#;
