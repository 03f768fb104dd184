//! TURN/STUN for peers that cannot reach each other directly.
//!
//! - [`credentials`]: the TURN REST scheme shared with Synapse and coturn; [`api`] hands them out.
//! - [`server`]: the relay's state machine without IO (its codec, authentication, allocations and
//!   dispatch, one file each), with [`policy`] (which peers may be reached), [`nonce`] (stateless
//!   nonces) and [`limits`] (the quotas and unauthenticated budget its shards share).
//! - [`io`]: the relay over UDP, TCP and TLS, one shard per core.

pub mod api;
pub mod credentials;
pub mod io;
pub mod limits;
pub mod nonce;
pub mod policy;
pub mod server;

use std::path::Path;
use std::sync::Arc;

use crate::config::Config;

/// The TLS acceptor of `turns:` connections, from PEM files.
pub fn tls_acceptor(certificate: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let chain = CertificateDer::pem_file_iter(certificate)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("turn.tls_certificate {}: {e}", certificate.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("turn.tls_key {}: {e}", key.display()))?;
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
            .map_err(|e| format!("turn TLS: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The embedded relay's settings, from `[turn]`.
pub struct Embedded {
    pub settings: server::Settings,
    pub limits: Arc<limits::Limits>,
    pub sockets: io::RelaySockets,
}

/// The embedded relay's settings, from `[turn]`; a fresh nonce key.
pub fn embedded(config: &Config) -> Embedded {
    let turn = &config.turn;
    let mut secrets: Vec<Vec<u8>> =
        turn.shared_secret.iter().map(|s| s.expose().as_bytes().to_vec()).collect();
    secrets.extend(turn.old_shared_secrets.iter().map(|s| s.expose().as_bytes().to_vec()));
    let settings = server::Settings {
        realm: turn.realm.clone().unwrap_or_else(|| config.homeserver.server_name.clone()),
        secrets,
        policy: policy::PeerPolicy::new(turn.allowed_peers.clone(), turn.denied_peers.clone()),
        nonce_key: rand::random(),
        nonce_lifetime_secs: turn.nonce_lifetime_secs,
        default_lifetime_secs: DEFAULT_LIFETIME_SECS,
        max_lifetime_secs: turn.max_lifetime_secs,
        bandwidth_bytes_per_sec: turn.bandwidth_bytes_per_sec,
        external_ip: turn.external_address,
        max_permissions: turn.permissions_per_allocation,
        max_channels: turn.channels_per_allocation,
        allocate_timeout_ms: turn.allocate_timeout_secs.saturating_mul(1000),
    };
    let limits = limits::Limits::new(turn.user_quota, turn.total_quota, turn.unauthenticated_per_sec)
        .with_connections(turn.connections_per_source, turn.max_connections);
    let sockets = io::RelaySockets {
        ipv4: turn.relay_address.unwrap_or(turn.listen.ip()),
        ipv6: turn.relay_address_v6,
        ports: (turn.relay_port_min, turn.relay_port_max),
    };
    Embedded { settings, limits: Arc::new(limits), sockets }
}

/// The TURN URIs handed to clients: `[turn] uris`, or, for the embedded relay when there are none,
/// its own listeners (UDP, TCP, and TLS when configured), at `external_address` when set.
pub fn client_uris(config: &Config, embedded: Option<&io::Listeners>) -> Vec<String> {
    let turn = &config.turn;
    let Some(listeners) = embedded.filter(|_| turn.uris.is_empty()) else { return turn.uris.clone() };
    let public = |address: std::net::SocketAddr| {
        std::net::SocketAddr::new(turn.external_address.unwrap_or(address.ip()), address.port())
    };
    let mut uris = Vec::new();
    if let Ok(address) = listeners.local_addr() {
        let address = public(address);
        uris.push(format!("turn:{address}?transport=udp"));
        uris.push(format!("turn:{address}?transport=tcp"));
    }
    if let Some(address) = listeners.tls_local_addr() {
        uris.push(format!("turns:{}?transport=tcp", public(address)));
    }
    uris
}

/// The number of relay shards for `[turn] threads` (0: one per core).
pub fn shards(config: &Config) -> usize {
    match config.turn.threads {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    }
}
/// Lifetime of an allocation when the client asks for none or less (RFC 8656).
const DEFAULT_LIFETIME_SECS: u64 = 600;

/// What one shard last added to the metrics, by transport.
#[derive(Default)]
pub struct Published {
    stats: [server::Stats; 3],
    gauges: [server::Gauges; 3],
}

/// Adds what changed in one shard's counters and gauges since `published` to the Prometheus
/// metrics (shards add up: each publishes its own differences).
pub fn publish(metrics: &crate::telemetry::TurnMetrics, relay: &server::Relay, published: &mut Published) {
    use crate::telemetry::{RelayedLabel, TransportLabel};
    use server::Transport;
    let gauges = relay.gauges();
    for transport in [Transport::Udp, Transport::Tcp, Transport::Tls] {
        let name = transport.as_str();
        let label = TransportLabel { transport: name };
        let (live, shown) = (gauges[transport as usize], &mut published.gauges[transport as usize]);
        let change = |now: usize, before: usize| {
            i64::try_from(now).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(i64::MAX)
        };
        metrics.allocations.get_or_create(&label).inc_by(change(live.allocations, shown.allocations));
        metrics.permissions.get_or_create(&label).inc_by(change(live.permissions, shown.permissions));
        metrics.channels.get_or_create(&label).inc_by(change(live.channels, shown.channels));
        *shown = live;
        let now = relay.stats(transport);
        let before = &mut published.stats[transport as usize];
        let to_peer = RelayedLabel { transport: name, direction: "to_peer" };
        let to_client = RelayedLabel { transport: name, direction: "to_client" };
        for (family, label, now, before) in [
            (&metrics.relayed_packets, &to_peer, now.to_peer_packets, before.to_peer_packets),
            (&metrics.relayed_bytes, &to_peer, now.to_peer_bytes, before.to_peer_bytes),
            (&metrics.relayed_packets, &to_client, now.to_client_packets, before.to_client_packets),
            (&metrics.relayed_bytes, &to_client, now.to_client_bytes, before.to_client_bytes),
        ] {
            family.get_or_create(label).inc_by(now - before);
        }
        for (family, now, before) in [
            (&metrics.auth_failures, now.auth_failures, before.auth_failures),
            (&metrics.denied_peers, now.denied_peers, before.denied_peers),
            (&metrics.quota_refusals, now.quota_refusals, before.quota_refusals),
            (&metrics.rate_limited, now.rate_limited, before.rate_limited),
            (&metrics.amplification_dropped, now.amplification_dropped, before.amplification_dropped),
            (&metrics.over_bandwidth_dropped, now.over_bandwidth_dropped, before.over_bandwidth_dropped),
            (&metrics.unpermitted_dropped, now.unpermitted_dropped, before.unpermitted_dropped),
            (&metrics.permission_refusals, now.permission_refusals, before.permission_refusals),
            (&metrics.channel_refusals, now.channel_refusals, before.channel_refusals),
            (&metrics.allocate_timeouts, now.unallocated_hang_ups, before.unallocated_hang_ups),
        ] {
            family.get_or_create(&label).inc_by(now - before);
        }
        *before = now.clone();
    }
}
