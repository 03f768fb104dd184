//! The relay's state machine, without IO: STUN Binding and TURN (RFC 8656) allocations,
//! permissions and channels, long-term authentication with TURN REST credentials and stateless
//! nonces, the peer policy, quotas and a per-allocation bandwidth cap.
//!
//! The IO layer hands in packets with the time (unix milliseconds) and carries out the returned
//! [`Action`]; relay sockets are opened and closed through [`RelayPorts`]. Tests step time by hand.
//!
//! Messages are decoded and encoded with the webrtc-rs `stun` crate and `turn::proto` attributes;
//! ChannelData (4-byte header) is framed here.
//!
//! The module is split by concern: [`codec`] (STUN encoding helpers and attribute parsing),
//! [`auth`] (long-term credentials, nonces and the unauthenticated budget), [`allocations`]
//! (allocations, permissions and channels, and their expiry) and [`dispatch`] (routing a client's
//! or a peer's packet to the right handler, and the data path).

mod allocations;
mod auth;
mod codec;
mod dispatch;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use super::limits::Limits;
use super::nonce::Nonces;
use super::policy::PeerPolicy;
use allocations::Allocation;

/// How long a permission lasts (RFC 8656 §9).
pub(crate) const PERMISSION_LIFETIME_MS: u64 = 300_000;
/// How long a channel binding lasts (RFC 8656 §12).
pub(crate) const CHANNEL_LIFETIME_MS: u64 = 600_000;
/// UDP, the only relayed transport (REQUESTED-TRANSPORT).
const PROTO_UDP: u8 = 17;
const MAGIC_COOKIE: u32 = 0x2112_A442;

/// How a client reached the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// Stream transports pad ChannelData to a multiple of 4 bytes.
    fn is_stream(self) -> bool {
        self != Transport::Udp
    }
}

/// A client's connection: its address, the address it reached, and how. Stream (TCP, TLS) clients
/// are told apart by all of it: one client port may reach the TCP and the TLS listener, or two
/// local addresses of a wildcard listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FiveTuple {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub transport: Transport,
}

/// The relay's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub realm: String,
    /// Shared secrets whose credentials are accepted (the first one mints; the others are kept
    /// during a rotation).
    pub secrets: Vec<Vec<u8>>,
    pub policy: PeerPolicy,
    /// Key of the stateless nonces (random per process).
    pub nonce_key: [u8; 32],
    pub nonce_lifetime_secs: u64,
    pub default_lifetime_secs: u64,
    /// Requested lifetimes are clamped to this (RFC 8656 recommends 3600 s).
    pub max_lifetime_secs: u64,
    /// Bytes per second each allocation may relay, both directions together; 0: no cap.
    pub bandwidth_bytes_per_sec: u64,
    /// The address to advertise in XOR-RELAYED-ADDRESS instead of the relay socket's (NAT).
    pub external_ip: Option<IpAddr>,
    /// Permissions (peer IP addresses) one allocation may hold; more are refused with 508.
    pub max_permissions: usize,
    /// Channel bindings one allocation may hold; more are refused with 508.
    pub max_channels: usize,
    /// How long a stream (TCP, TLS) client may stay connected without an allocation, from its
    /// connection or from the end of its allocation (coturn's max-allocate-timeout).
    pub allocate_timeout_ms: u64,
}

/// Opens and closes relay sockets for the state machine (the IO layer binds them).
pub trait RelayPorts {
    /// A new relay socket, IPv6 when `ipv6`, on an even port when `even`; its local address.
    fn open(&mut self, ipv6: bool, even: bool) -> std::io::Result<SocketAddr>;
    fn close(&mut self, relay: SocketAddr);
}

/// What the IO layer should do with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<'a> {
    None,
    /// Send these bytes back to the client, on the same five-tuple.
    Reply(Vec<u8>),
    /// Send `data` from the relay socket `relay` to `peer`.
    Relay {
        relay: SocketAddr,
        peer: SocketAddr,
        data: Cow<'a, [u8]>,
    },
}

/// Live state, for gauges.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    pub allocations: usize,
    pub permissions: usize,
    pub channels: usize,
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub auth_failures: u64,
    pub denied_peers: u64,
    pub quota_refusals: u64,
    pub rate_limited: u64,
    /// Responses not sent because they would be more than 3× the unauthenticated request.
    pub amplification_dropped: u64,
    pub over_bandwidth_dropped: u64,
    /// Packets dropped for want of a permission: sent by a client to a peer it has not permitted,
    /// or arriving from a peer the allocation has not permitted (RFC 8656 §9: silently).
    pub unpermitted_dropped: u64,
    /// CreatePermission and ChannelBind requests refused (508) because the allocation holds
    /// `max_permissions` permissions or `max_channels` channels.
    pub permission_refusals: u64,
    pub channel_refusals: u64,
    /// Stream clients hung up on after `allocate_timeout_ms` without an allocation.
    pub unallocated_hang_ups: u64,
    /// Packets and bytes relayed, client → peer and peer → client.
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

/// The allocations of one shard of the relay (all of them when there is one shard), with the
/// quotas and the unauthenticated budget shared with the other shards through [`Limits`].
pub struct Relay {
    settings: Settings,
    limits: std::sync::Arc<Limits>,
    nonces: Nonces,
    /// Boxed: the map's spare capacity then costs a pointer per slot, not a whole allocation.
    allocations: HashMap<FiveTuple, Box<Allocation>>,
    allocation_of_socket: HashMap<SocketAddr, FiveTuple>,
    /// When each allocation, permission and channel expires, and when each stream client without
    /// an allocation is hung up on, in deadline order: [`Relay::expire`] takes what is due from the
    /// front, so its work is proportional to what expires, not to what is installed. Each timer is
    /// in the set once, at the deadline stored with what it times.
    deadlines: BTreeSet<(u64, Timer)>,
    /// Stream clients connected without an allocation, and when they are hung up on.
    unallocated: HashMap<FiveTuple, u64>,
    /// Counters, by the transport of the client concerned.
    stats: [Stats; 3],
}

/// What a deadline in [`Relay::deadlines`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Allocation(FiveTuple),
    Permission(FiveTuple, IpAddr),
    Channel(FiveTuple, u16),
    /// A stream client without an allocation.
    Unallocated(FiveTuple),
}

impl Relay {
    pub fn new(settings: Settings, limits: std::sync::Arc<Limits>) -> Self {
        let nonces = Nonces::new(settings.nonce_key, settings.nonce_lifetime_secs);
        Self {
            settings,
            limits,
            nonces,
            allocations: HashMap::new(),
            allocation_of_socket: HashMap::new(),
            deadlines: BTreeSet::new(),
            unallocated: HashMap::new(),
            stats: Default::default(),
        }
    }

    /// The counters of clients on `transport`.
    pub fn stats(&self, transport: Transport) -> &Stats {
        &self.stats[transport as usize]
    }

    fn stats_mut(&mut self, transport: Transport) -> &mut Stats {
        &mut self.stats[transport as usize]
    }

    /// Live allocations, permissions and channels, by client transport (index: `Transport as usize`),
    /// counted (one pass over the allocations; the tables' lengths are O(1)).
    pub fn gauges(&self) -> [Gauges; 3] {
        let mut gauges = [Gauges::default(); 3];
        for (tuple, allocation) in &self.allocations {
            let gauge = &mut gauges[tuple.transport as usize];
            gauge.allocations += 1;
            gauge.permissions += allocation.permissions.len();
            gauge.channels += allocation.channels.len();
        }
        gauges
    }

    /// The limits this relay shares with the other shards.
    pub fn limits(&self) -> &std::sync::Arc<Limits> {
        &self.limits
    }
}
