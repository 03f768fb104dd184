//! The relay's state machine, without IO: STUN Binding and TURN (RFC 8656) allocations,
//! permissions and channels, long-term authentication with TURN REST credentials and stateless
//! nonces, the peer policy, quotas and a per-allocation bandwidth cap.
//!
//! The IO layer hands in packets with the time (unix milliseconds) and carries out the returned
//! [`Action`]; relay sockets are opened and closed through [`RelayPorts`]. Tests step time by hand.
//!
//! Messages are decoded and encoded with the webrtc-rs `stun` crate and `turn::proto` attributes;
//! ChannelData (4-byte header) is framed here.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use stun::attributes::{
    ATTR_CHANNEL_NUMBER, ATTR_DATA, ATTR_DONT_FRAGMENT, ATTR_EVEN_PORT, ATTR_FINGERPRINT, ATTR_LIFETIME,
    ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_REQUESTED_ADDRESS_FAMILY, ATTR_REQUESTED_TRANSPORT,
    ATTR_RESERVATION_TOKEN, ATTR_SOFTWARE, ATTR_UNKNOWN_ATTRIBUTES, ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS,
    AttrType,
};
use stun::error_code::{
    CODE_ALLOC_MISMATCH, CODE_ALLOC_QUOTA_REACHED, CODE_BAD_REQUEST, CODE_FORBIDDEN,
    CODE_INSUFFICIENT_CAPACITY, CODE_PEER_ADDR_FAMILY_MISMATCH, CODE_STALE_NONCE, CODE_UNAUTHORIZED,
    CODE_UNKNOWN_ATTRIBUTE, CODE_UNSUPPORTED_TRANS_PROTO, CODE_WRONG_CREDENTIALS, ErrorCode,
    ErrorCodeAttribute,
};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE,
    METHOD_BINDING, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_DATA, METHOD_REFRESH, METHOD_SEND,
    Message, MessageType, Setter,
};
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use turn::proto::channum::{MAX_CHANNEL_NUMBER, MIN_CHANNEL_NUMBER};
use turn::proto::lifetime::Lifetime;
use turn::proto::relayaddr::RelayedAddress;

use super::credentials;
use super::limits::{Limits, Refusal};
use super::nonce::{NonceCheck, Nonces};
use super::policy::PeerPolicy;

/// How long a permission lasts (RFC 8656 §9).
pub const PERMISSION_LIFETIME_MS: u64 = 300_000;
/// How long a channel binding lasts (RFC 8656 §12).
pub const CHANNEL_LIFETIME_MS: u64 = 600_000;
/// UDP, the only relayed transport (REQUESTED-TRANSPORT).
const PROTO_UDP: u8 = 17;
const MAGIC_COOKIE: u32 = 0x2112_A442;

/// How a client reached the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// A client's connection: its address, the address it reached, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// Packets and bytes relayed, client → peer and peer → client.
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

struct Allocation {
    relay: SocketAddr,
    /// Later requests on the allocation must use the same username (441 otherwise).
    username: Box<str>,
    expires_ms: u64,
    /// The transaction that created it, to answer a retransmitted Allocate.
    allocate_txn: [u8; 12],
    allocate_response: Box<[u8]>,
    permissions: HashMap<IpAddr, u64>,
    channels: HashMap<u16, (SocketAddr, u64)>,
    channel_of_peer: HashMap<SocketAddr, u16>,
    /// Token bucket of the bandwidth cap: bytes available, and when it was last filled.
    budget: (u64, u64),
}

impl Allocation {
    fn permitted(&self, peer: IpAddr, now_ms: u64) -> bool {
        self.permissions.get(&peer).is_some_and(|expires| *expires > now_ms)
    }

    /// Takes `bytes` from the bandwidth budget; false when over the cap.
    fn spend(&mut self, bytes: usize, now_ms: u64, rate: u64) -> bool {
        if rate == 0 {
            return true;
        }
        let (available, at) = self.budget;
        let refill = now_ms.saturating_sub(at).saturating_mul(rate) / 1000;
        let available = available.saturating_add(refill).min(rate);
        let bytes = bytes as u64;
        if available < bytes {
            self.budget = (available, now_ms);
            return false;
        }
        self.budget = (available - bytes, now_ms);
        true
    }
}

/// A request that passed authentication.
struct Authenticated {
    username: String,
    key: Vec<u8>,
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
    /// Counters, by the transport of the client concerned.
    stats: [Stats; 3],
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
    /// counted in one pass.
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

    /// A packet from a client.
    pub fn handle_client<'a>(
        &mut self,
        now_ms: u64,
        tuple: FiveTuple,
        packet: &'a [u8],
        ports: &mut dyn RelayPorts,
    ) -> Action<'a> {
        match packet.first() {
            Some(0x40..=0x7F) => self.channel_data(now_ms, tuple, packet),
            Some(0x00..=0x03) => self.stun(now_ms, tuple, packet, ports),
            _ => Action::None,
        }
    }

    /// A packet from `peer` to the relay socket `relay`: framed into `out` for the client, whose
    /// five-tuple is returned; `None` when it is dropped (no allocation, no permission, over the cap).
    pub fn handle_peer(
        &mut self,
        now_ms: u64,
        relay: SocketAddr,
        peer: SocketAddr,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<FiveTuple> {
        let tuple = *self.allocation_of_socket.get(&relay)?;
        let allocation = self.allocations.get_mut(&tuple)?;
        if allocation.expires_ms <= now_ms || !allocation.permitted(peer.ip(), now_ms) {
            return None;
        }
        if !allocation.spend(data.len(), now_ms, self.settings.bandwidth_bytes_per_sec) {
            self.stats[tuple.transport as usize].over_bandwidth_dropped += 1;
            return None;
        }
        out.clear();
        let channel =
            allocation.channel_of_peer.get(&peer).copied().filter(|number| {
                allocation.channels.get(number).is_some_and(|(_, expires)| *expires > now_ms)
            });
        if let Some(number) = channel {
            let length = u16::try_from(data.len()).ok()?;
            out.extend_from_slice(&number.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(data);
            if tuple.transport.is_stream() {
                out.resize(out.len().next_multiple_of(4), 0);
            }
        } else {
            let mut message = Message::new();
            let built = message.build(&[
                Box::new(TransactionIdFrom(random_transaction_id())),
                Box::new(MessageType::new(METHOD_DATA, CLASS_INDICATION)),
                Box::new(XorAddress(stun::attributes::ATTR_XOR_PEER_ADDRESS, peer)),
                Box::new(turn::proto::data::Data(data.to_vec())),
            ]);
            built.ok()?;
            out.extend_from_slice(&message.raw);
        }
        self.stats[tuple.transport as usize].to_client_packets += 1;
        self.stats[tuple.transport as usize].to_client_bytes += data.len() as u64;
        Some(tuple)
    }

    /// The limits this relay shares with the other shards.
    pub fn limits(&self) -> &std::sync::Arc<Limits> {
        &self.limits
    }

    /// Whether `tuple` holds an allocation.
    pub fn has_allocation(&self, tuple: FiveTuple) -> bool {
        self.allocations.contains_key(&tuple)
    }

    /// Drops expired allocations (closing their relay sockets), permissions and channels.
    pub fn expire(&mut self, now_ms: u64, ports: &mut dyn RelayPorts) {
        let expired: Vec<FiveTuple> = self
            .allocations
            .iter()
            .filter(|(_, a)| a.expires_ms <= now_ms)
            .map(|(tuple, _)| *tuple)
            .collect();
        for tuple in expired {
            self.close(tuple, ports);
        }
        for allocation in self.allocations.values_mut() {
            allocation.permissions.retain(|_, expires| *expires > now_ms);
            allocation.channels.retain(|_, (_, expires)| *expires > now_ms);
            let channels = &allocation.channels;
            allocation.channel_of_peer.retain(|_, number| channels.contains_key(number));
        }
        self.limits.forget_idle_sources(now_ms);
    }

    /// Closes every allocation (at shutdown).
    pub fn close_all(&mut self, ports: &mut dyn RelayPorts) {
        let all: Vec<FiveTuple> = self.allocations.keys().copied().collect();
        for tuple in all {
            self.close(tuple, ports);
        }
    }

    /// Deletes the allocation of `tuple`, if any (its TCP connection closed, or it expired).
    pub fn close(&mut self, tuple: FiveTuple, ports: &mut dyn RelayPorts) {
        if let Some(allocation) = self.allocations.remove(&tuple) {
            self.allocation_of_socket.remove(&allocation.relay);
            ports.close(allocation.relay);
            self.limits.release(credentials::user(&allocation.username));
        }
    }

    fn channel_data<'a>(&mut self, now_ms: u64, tuple: FiveTuple, packet: &'a [u8]) -> Action<'a> {
        let [a, b, c, d, ..] = *packet else { return Action::None };
        let number = u16::from_be_bytes([a, b]);
        let length = usize::from(u16::from_be_bytes([c, d]));
        let Some(data) = packet.get(4..4 + length) else { return Action::None };
        let rate = self.settings.bandwidth_bytes_per_sec;
        let Some(allocation) = self.allocations.get_mut(&tuple) else { return Action::None };
        let Some(&(peer, expires)) = allocation.channels.get(&number) else { return Action::None };
        if expires <= now_ms || allocation.expires_ms <= now_ms || !allocation.permitted(peer.ip(), now_ms) {
            return Action::None;
        }
        if !allocation.spend(length, now_ms, rate) {
            self.stats[tuple.transport as usize].over_bandwidth_dropped += 1;
            return Action::None;
        }
        self.stats[tuple.transport as usize].to_peer_packets += 1;
        self.stats[tuple.transport as usize].to_peer_bytes += length as u64;
        Action::Relay { relay: allocation.relay, peer, data: Cow::Borrowed(data) }
    }

    fn stun<'a>(
        &mut self,
        now_ms: u64,
        tuple: FiveTuple,
        packet: &[u8],
        ports: &mut dyn RelayPorts,
    ) -> Action<'a> {
        let mut request = Message::new();
        request.raw.clear();
        request.raw.extend_from_slice(packet);
        if request.decode().is_err() {
            return Action::None;
        }
        match (request.typ.class, request.typ.method) {
            (CLASS_INDICATION, METHOD_SEND) => self.send_indication(now_ms, tuple, &request),
            (CLASS_REQUEST, method) => {
                if let Some(unknown) = unknown_required(&request) {
                    let reply = error(&request, CODE_UNKNOWN_ATTRIBUTE, vec![Box::new(unknown)], None);
                    return self.unauthenticated_reply(now_ms, tuple, packet.len(), reply);
                }
                match method {
                    METHOD_BINDING => {
                        let reply = response(
                            &request,
                            &[Box::new(XorAddress(stun::attributes::ATTR_XORMAPPED_ADDRESS, tuple.client))],
                            None,
                        );
                        self.unauthenticated_reply(now_ms, tuple, packet.len(), reply)
                    }
                    METHOD_ALLOCATE | METHOD_REFRESH | METHOD_CREATE_PERMISSION | METHOD_CHANNEL_BIND => {
                        self.turn_request(now_ms, tuple, &mut request, packet.len(), ports)
                    }
                    _ => {
                        let reply = error(&request, CODE_BAD_REQUEST, vec![], None);
                        self.unauthenticated_reply(now_ms, tuple, packet.len(), reply)
                    }
                }
            }
            _ => Action::None,
        }
    }

    /// A reply to a request that was not authenticated: rate-limited per source, and never more
    /// than 3× the request's size (no amplification).
    fn unauthenticated_reply<'a>(
        &mut self,
        now_ms: u64,
        tuple: FiveTuple,
        request_len: usize,
        reply: Vec<u8>,
    ) -> Action<'a> {
        if !self.limits.allow_unauthenticated(tuple.client.ip(), now_ms) {
            self.stats[tuple.transport as usize].rate_limited += 1;
            return Action::None;
        }
        if reply.len() > 3 * request_len {
            self.stats[tuple.transport as usize].amplification_dropped += 1;
            return Action::None;
        }
        Action::Reply(reply)
    }

    /// Checks the long-term credentials of a TURN request; on failure, the reply to send.
    fn authenticate(
        &mut self,
        now_ms: u64,
        tuple: FiveTuple,
        request: &mut Message,
        request_len: usize,
    ) -> Result<Authenticated, Action<'static>> {
        let now_secs = now_ms / 1000;
        let realm = self.settings.realm.clone();
        if !request.contains(ATTR_MESSAGE_INTEGRITY) {
            let reply = self.challenge(request, tuple, now_secs, CODE_UNAUTHORIZED);
            return Err(self.unauthenticated_reply(now_ms, tuple, request_len, reply));
        }
        let (Ok(username), Ok(nonce)) = (
            TextAttribute::get_from_as(request, ATTR_USERNAME),
            TextAttribute::get_from_as(request, ATTR_NONCE),
        ) else {
            let reply = error(request, CODE_BAD_REQUEST, vec![], None);
            return Err(self.unauthenticated_reply(now_ms, tuple, request_len, reply));
        };
        let fail = |relay: &mut Self, request: &Message, code: ErrorCode| {
            relay.stats_mut(tuple.transport).auth_failures += 1;
            let reply = relay.challenge(request, tuple, now_secs, code);
            Err(relay.unauthenticated_reply(now_ms, tuple, request_len, reply))
        };
        match self.nonces.check(&nonce.text, tuple.client.ip(), now_secs) {
            NonceCheck::Valid => {}
            NonceCheck::Stale => return fail(self, request, CODE_STALE_NONCE),
            NonceCheck::Invalid => return fail(self, request, CODE_UNAUTHORIZED),
        }
        let username = username.text;
        if credentials::expiry(&username).is_none_or(|expiry| expiry < now_secs) {
            return fail(self, request, CODE_UNAUTHORIZED);
        }
        for secret in &self.settings.secrets {
            let password = credentials::password(secret, &username);
            let integrity =
                MessageIntegrity::new_long_term_integrity(username.clone(), realm.clone(), password);
            if integrity.check(request).is_ok() {
                return Ok(Authenticated { username, key: integrity.0 });
            }
        }
        fail(self, request, CODE_UNAUTHORIZED)
    }

    /// A 401 or 438 with our realm and a fresh nonce for the client.
    fn challenge(&self, request: &Message, tuple: FiveTuple, now_secs: u64, code: ErrorCode) -> Vec<u8> {
        let nonce = self.nonces.issue(tuple.client.ip(), now_secs);
        let attributes: Vec<Box<dyn Setter>> = vec![
            Box::new(TextAttribute::new(ATTR_REALM, self.settings.realm.clone())),
            Box::new(TextAttribute::new(ATTR_NONCE, nonce)),
        ];
        error(request, code, attributes, None)
    }

    fn turn_request<'a>(
        &mut self,
        now_ms: u64,
        tuple: FiveTuple,
        request: &mut Message,
        request_len: usize,
        ports: &mut dyn RelayPorts,
    ) -> Action<'a> {
        let method = request.typ.method;
        // Malformed Allocates are refused before authentication, with a reply smaller than them.
        if method == METHOD_ALLOCATE && !request.contains(ATTR_REQUESTED_TRANSPORT) {
            let reply = error(request, CODE_BAD_REQUEST, vec![], None);
            return self.unauthenticated_reply(now_ms, tuple, request_len, reply);
        }
        let caller = match self.authenticate(now_ms, tuple, request, request_len) {
            Ok(caller) => caller,
            Err(action) => return action,
        };
        let key = caller.key.clone();
        // Other requests on an allocation must come from its user (441); an Allocate on a 5-tuple
        // in use is an allocation mismatch (437, below), whoever sends it.
        if method != METHOD_ALLOCATE
            && let Some(allocation) = self.allocations.get(&tuple)
            && *allocation.username != caller.username
        {
            return Action::Reply(error(request, CODE_WRONG_CREDENTIALS, vec![], Some(&key)));
        }
        let reply = match method {
            METHOD_ALLOCATE => self.allocate(now_ms, tuple, request, caller, ports),
            METHOD_REFRESH => self.refresh(now_ms, tuple, request, &key, ports),
            METHOD_CREATE_PERMISSION => self.create_permission(now_ms, tuple, request, &key),
            _ => self.channel_bind(now_ms, tuple, request, &key),
        };
        Action::Reply(reply)
    }

    fn lifetime_ms(&self, request: &Message) -> u64 {
        let mut requested = Lifetime::default();
        let secs = if stun::message::Getter::get_from(&mut requested, request).is_ok() {
            requested.0.as_secs().clamp(self.settings.default_lifetime_secs, self.settings.max_lifetime_secs)
        } else {
            self.settings.default_lifetime_secs
        };
        secs * 1000
    }

    fn allocate(
        &mut self,
        now_ms: u64,
        tuple: FiveTuple,
        request: &Message,
        caller: Authenticated,
        ports: &mut dyn RelayPorts,
    ) -> Vec<u8> {
        let key = caller.key;
        if let Some(allocation) = self.allocations.get(&tuple) {
            // A retransmission gets the same answer; another Allocate on the tuple is a mismatch.
            if allocation.allocate_txn == request.transaction_id.0 {
                return allocation.allocate_response.to_vec();
            }
            return error(request, CODE_ALLOC_MISMATCH, vec![], Some(&key));
        }
        let transport = request.get(ATTR_REQUESTED_TRANSPORT).ok();
        if transport.as_deref().and_then(|value| value.first()) != Some(&PROTO_UDP) {
            return error(request, CODE_UNSUPPORTED_TRANS_PROTO, vec![], Some(&key));
        }
        // EVEN-PORT is honoured; reserving the next port too (its R bit, then RESERVATION-TOKEN) is
        // not offered.
        let even = request.get(ATTR_EVEN_PORT).ok();
        let even_port = even.is_some();
        if request.contains(ATTR_RESERVATION_TOKEN)
            || even.is_some_and(|v| v.first().is_some_and(|b| b & 0x80 != 0))
        {
            return error(request, CODE_INSUFFICIENT_CAPACITY, vec![], Some(&key));
        }
        if let Err(refusal) = self.limits.take(credentials::user(&caller.username)) {
            self.stats[tuple.transport as usize].quota_refusals += 1;
            let code = match refusal {
                Refusal::UserQuota => CODE_ALLOC_QUOTA_REACHED,
                Refusal::TotalQuota => CODE_INSUFFICIENT_CAPACITY,
            };
            return error(request, code, vec![], Some(&key));
        }
        let ipv6 =
            request.get(ATTR_REQUESTED_ADDRESS_FAMILY).ok().and_then(|v| v.first().copied()) == Some(0x02);
        let Ok(relay) = ports.open(ipv6, even_port) else {
            self.limits.release(credentials::user(&caller.username));
            return error(request, CODE_INSUFFICIENT_CAPACITY, vec![], Some(&key));
        };
        let lifetime_ms = self.lifetime_ms(request);
        let advertised = SocketAddr::new(self.settings.external_ip.unwrap_or(relay.ip()), relay.port());
        let reply = response(
            request,
            &[
                Box::new(RelayedAddress { ip: advertised.ip(), port: advertised.port() }),
                Box::new(Lifetime(std::time::Duration::from_millis(lifetime_ms))),
                Box::new(XorAddress(stun::attributes::ATTR_XORMAPPED_ADDRESS, tuple.client)),
            ],
            Some(&key),
        );
        let username: Box<str> = caller.username.into();
        self.allocation_of_socket.insert(relay, tuple);
        self.allocations.insert(
            tuple,
            Box::new(Allocation {
                relay,
                username,
                expires_ms: now_ms + lifetime_ms,
                allocate_txn: request.transaction_id.0,
                allocate_response: reply.clone().into_boxed_slice(),
                permissions: HashMap::new(),
                channels: HashMap::new(),
                channel_of_peer: HashMap::new(),
                budget: (self.settings.bandwidth_bytes_per_sec, now_ms),
            }),
        );
        reply
    }

    fn refresh(
        &mut self,
        now_ms: u64,
        tuple: FiveTuple,
        request: &Message,
        key: &[u8],
        ports: &mut dyn RelayPorts,
    ) -> Vec<u8> {
        let requested_zero = {
            let mut requested = Lifetime::default();
            stun::message::Getter::get_from(&mut requested, request).is_ok() && requested.0.is_zero()
        };
        let lifetime_ms = self.lifetime_ms(request);
        let Some(allocation) = self.allocations.get_mut(&tuple).filter(|a| a.expires_ms > now_ms) else {
            return error(request, CODE_ALLOC_MISMATCH, vec![], Some(key));
        };
        let lifetime_ms = if requested_zero {
            self.close(tuple, ports);
            0
        } else {
            allocation.expires_ms = now_ms + lifetime_ms;
            lifetime_ms
        };
        response(request, &[Box::new(Lifetime(std::time::Duration::from_millis(lifetime_ms)))], Some(key))
    }

    fn create_permission(&mut self, now_ms: u64, tuple: FiveTuple, request: &Message, key: &[u8]) -> Vec<u8> {
        let Some(allocation) = self.allocations.get_mut(&tuple).filter(|a| a.expires_ms > now_ms) else {
            return error(request, CODE_ALLOC_MISMATCH, vec![], Some(key));
        };
        let peers: Option<Vec<SocketAddr>> = request
            .attributes
            .0
            .iter()
            .filter(|attribute| attribute.typ == ATTR_XOR_PEER_ADDRESS)
            .map(|attribute| decode_xor_address(&attribute.value, &request.transaction_id.0))
            .collect();
        let Some(peers) = peers.filter(|peers| !peers.is_empty()) else {
            return error(request, CODE_BAD_REQUEST, vec![], Some(key));
        };
        if peers.iter().any(|peer| peer.is_ipv4() != allocation.relay.is_ipv4()) {
            return error(request, CODE_PEER_ADDR_FAMILY_MISMATCH, vec![], Some(key));
        }
        // All or nothing: one denied peer refuses the whole request.
        if peers.iter().any(|peer| !self.settings.policy.permits(peer.ip())) {
            self.stats[tuple.transport as usize].denied_peers += 1;
            return error(request, CODE_FORBIDDEN, vec![], Some(key));
        }
        for peer in peers {
            allocation.permissions.insert(peer.ip(), now_ms + PERMISSION_LIFETIME_MS);
        }
        response(request, &[], Some(key))
    }

    fn channel_bind(&mut self, now_ms: u64, tuple: FiveTuple, request: &Message, key: &[u8]) -> Vec<u8> {
        let Some(allocation) = self.allocations.get_mut(&tuple).filter(|a| a.expires_ms > now_ms) else {
            return error(request, CODE_ALLOC_MISMATCH, vec![], Some(key));
        };
        let number = request
            .get(ATTR_CHANNEL_NUMBER)
            .ok()
            .and_then(|value| Some(u16::from_be_bytes([*value.first()?, *value.get(1)?])))
            .filter(|number| (MIN_CHANNEL_NUMBER..=MAX_CHANNEL_NUMBER).contains(number));
        let peer = request
            .get(ATTR_XOR_PEER_ADDRESS)
            .ok()
            .and_then(|value| decode_xor_address(&value, &request.transaction_id.0));
        let (Some(number), Some(peer)) = (number, peer) else {
            return error(request, CODE_BAD_REQUEST, vec![], Some(key));
        };
        if peer.is_ipv4() != allocation.relay.is_ipv4() {
            return error(request, CODE_PEER_ADDR_FAMILY_MISMATCH, vec![], Some(key));
        }
        if !self.settings.policy.permits(peer.ip()) {
            self.stats[tuple.transport as usize].denied_peers += 1;
            return error(request, CODE_FORBIDDEN, vec![], Some(key));
        }
        let bound_elsewhere = allocation.channels.get(&number).is_some_and(|(bound, _)| *bound != peer)
            || allocation.channel_of_peer.get(&peer).is_some_and(|bound| *bound != number);
        if bound_elsewhere {
            return error(request, CODE_BAD_REQUEST, vec![], Some(key));
        }
        allocation.channels.insert(number, (peer, now_ms + CHANNEL_LIFETIME_MS));
        allocation.channel_of_peer.insert(peer, number);
        allocation.permissions.insert(peer.ip(), now_ms + PERMISSION_LIFETIME_MS);
        response(request, &[], Some(key))
    }

    fn send_indication<'a>(&mut self, now_ms: u64, tuple: FiveTuple, request: &Message) -> Action<'a> {
        let rate = self.settings.bandwidth_bytes_per_sec;
        let Some(allocation) = self.allocations.get_mut(&tuple) else { return Action::None };
        let peer = request
            .get(ATTR_XOR_PEER_ADDRESS)
            .ok()
            .and_then(|value| decode_xor_address(&value, &request.transaction_id.0));
        let (Some(peer), Ok(data)) = (peer, request.get(ATTR_DATA)) else { return Action::None };
        if allocation.expires_ms <= now_ms || !allocation.permitted(peer.ip(), now_ms) {
            return Action::None;
        }
        if !allocation.spend(data.len(), now_ms, rate) {
            self.stats[tuple.transport as usize].over_bandwidth_dropped += 1;
            return Action::None;
        }
        self.stats[tuple.transport as usize].to_peer_packets += 1;
        self.stats[tuple.transport as usize].to_peer_bytes += data.len() as u64;
        Action::Relay { relay: allocation.relay, peer, data: Cow::Owned(data) }
    }
}

/// Copies a transaction id into a message being built.
struct TransactionIdFrom([u8; 12]);

impl Setter for TransactionIdFrom {
    fn add_to(&self, message: &mut Message) -> Result<(), stun::Error> {
        message.transaction_id = stun::agent::TransactionId(self.0);
        message.write_transaction_id();
        Ok(())
    }
}

/// An XOR address attribute of type `.0`.
struct XorAddress(AttrType, SocketAddr);

impl Setter for XorAddress {
    fn add_to(&self, message: &mut Message) -> Result<(), stun::Error> {
        XorMappedAddress { ip: self.1.ip(), port: self.1.port() }.add_to_as(message, self.0)
    }
}

fn random_transaction_id() -> [u8; 12] {
    rand::random()
}

/// A success response to `request` with `attributes`, signed with `key` when given, fingerprinted.
fn response(request: &Message, attributes: &[Box<dyn Setter>], key: Option<&[u8]>) -> Vec<u8> {
    build(request, CLASS_SUCCESS_RESPONSE, attributes, key)
}

/// An error response with `code` (and its standard reason).
fn error(
    request: &Message,
    code: ErrorCode,
    mut attributes: Vec<Box<dyn Setter>>,
    key: Option<&[u8]>,
) -> Vec<u8> {
    let reason = match code.0 {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached",
        508 => "Insufficient Capacity",
        _ => "",
    };
    attributes.insert(0, Box::new(ErrorCodeAttribute { code, reason: reason.as_bytes().to_vec() }));
    build(request, CLASS_ERROR_RESPONSE, &attributes, key)
}

fn build(
    request: &Message,
    class: stun::message::MessageClass,
    attributes: &[Box<dyn Setter>],
    key: Option<&[u8]>,
) -> Vec<u8> {
    let mut message = Message::new();
    message.reset();
    message.write_header();
    let mut result = TransactionIdFrom(request.transaction_id.0).add_to(&mut message);
    message.set_type(MessageType::new(request.typ.method, class));
    for attribute in attributes {
        result = result.and_then(|()| attribute.add_to(&mut message));
    }
    if let Some(key) = key {
        result = result.and_then(|()| MessageIntegrity(key.to_vec()).add_to(&mut message));
    }
    if request.contains(ATTR_FINGERPRINT) || key.is_some() {
        result = result.and_then(|()| FINGERPRINT.add_to(&mut message));
    }
    // Our attributes are well-formed by construction; a failure would be a bug, answered by
    // sending the header alone rather than a half-built message.
    if result.is_err() {
        message.reset();
        message.write_header();
    }
    message.raw
}

/// The first comprehension-required attribute (type < 0x8000) this relay does not understand.
fn unknown_required(request: &Message) -> Option<UnknownAttribute> {
    const KNOWN: &[AttrType] = &[
        ATTR_USERNAME,
        ATTR_MESSAGE_INTEGRITY,
        stun::attributes::ATTR_ERROR_CODE,
        ATTR_REALM,
        ATTR_NONCE,
        stun::attributes::ATTR_XORMAPPED_ADDRESS,
        ATTR_CHANNEL_NUMBER,
        ATTR_LIFETIME,
        ATTR_XOR_PEER_ADDRESS,
        ATTR_DATA,
        stun::attributes::ATTR_XOR_RELAYED_ADDRESS,
        ATTR_EVEN_PORT,
        ATTR_REQUESTED_TRANSPORT,
        ATTR_DONT_FRAGMENT,
        ATTR_RESERVATION_TOKEN,
        ATTR_REQUESTED_ADDRESS_FAMILY,
        stun::attributes::ATTR_PRIORITY,
        stun::attributes::ATTR_USE_CANDIDATE,
        ATTR_SOFTWARE,
        ATTR_FINGERPRINT,
    ];
    request
        .attributes
        .0
        .iter()
        .find(|attribute| attribute.typ.value() < 0x8000 && !KNOWN.contains(&attribute.typ))
        .map(|attribute| UnknownAttribute(attribute.typ))
}

/// UNKNOWN-ATTRIBUTES with one type.
struct UnknownAttribute(AttrType);

impl Setter for UnknownAttribute {
    fn add_to(&self, message: &mut Message) -> Result<(), stun::Error> {
        message.add(ATTR_UNKNOWN_ATTRIBUTES, &self.0.value().to_be_bytes());
        Ok(())
    }
}

/// Decodes an XOR-PEER-ADDRESS (or any XOR address) value.
fn decode_xor_address(value: &[u8], transaction_id: &[u8; 12]) -> Option<SocketAddr> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let family = *value.get(1)?;
    let port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]) ^ (MAGIC_COOKIE >> 16) as u16;
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&cookie);
    mask[4..].copy_from_slice(transaction_id);
    let length = match family {
        0x01 => 4,
        0x02 => 16,
        _ => return None,
    };
    let mut octets = [0u8; 16];
    for (i, byte) in value.get(4..4 + length)?.iter().enumerate() {
        octets[i] = byte ^ mask[i];
    }
    let ip = if length == 4 {
        IpAddr::from([octets[0], octets[1], octets[2], octets[3]])
    } else {
        IpAddr::from(octets)
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use stun::message::Getter;
    use stun::textattrs::TextAttribute;

    use super::*;

    const SECRET: &[u8] = b"turn-secret";
    const REALM: &str = "example.org";
    const T0: u64 = 1_700_000_000_000;

    fn tuple0() -> FiveTuple {
        FiveTuple {
            client: "127.0.0.1:50000".parse().unwrap(),
            server: "127.0.0.1:3478".parse().unwrap(),
            transport: Transport::Udp,
        }
    }

    fn udp(relay: &Relay) -> Gauges {
        relay.gauges()[Transport::Udp as usize]
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:40000".parse().unwrap()
    }

    #[derive(Default)]
    struct Ports {
        next: u16,
        open: HashSet<SocketAddr>,
    }

    impl RelayPorts for Ports {
        fn open(&mut self, _ipv6: bool, _even: bool) -> std::io::Result<SocketAddr> {
            self.next += 1;
            let relay: SocketAddr = format!("127.0.0.1:{}", 49152 + self.next).parse().unwrap();
            self.open.insert(relay);
            Ok(relay)
        }
        fn close(&mut self, relay: SocketAddr) {
            assert!(self.open.remove(&relay), "closed twice: {relay}");
        }
    }

    /// A relay with room for 10 allocations per user and 100 in all, and no unauthenticated limit.
    fn relay(settings: Settings) -> Relay {
        Relay::new(settings, std::sync::Arc::new(Limits::new(10, 100, 0)))
    }

    fn settings() -> Settings {
        Settings {
            realm: REALM.to_owned(),
            secrets: vec![SECRET.to_vec()],
            policy: PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]),
            nonce_key: [3; 32],
            nonce_lifetime_secs: 600,
            default_lifetime_secs: 600,
            max_lifetime_secs: 3600,
            bandwidth_bytes_per_sec: 0,
            external_ip: None,
        }
    }

    /// A TURN client's view: credentials and the nonce it was last given.
    struct Client {
        username: String,
        password: String,
        nonce: Option<String>,
    }

    impl Client {
        fn new(secret: &[u8], user: &str, now_ms: u64, lifetime_secs: u64) -> Self {
            let credentials = credentials::mint(secret, user, now_ms / 1000, lifetime_secs);
            Self { username: credentials.username, password: credentials.password, nonce: None }
        }

        fn request(&self, method: Method, attributes: Vec<Box<dyn Setter>>) -> Vec<u8> {
            let mut all: Vec<Box<dyn Setter>> = vec![
                Box::new(TransactionIdFrom(random_transaction_id())),
                Box::new(MessageType::new(method, CLASS_REQUEST)),
            ];
            all.extend(attributes);
            if let Some(nonce) = &self.nonce {
                all.push(Box::new(TextAttribute::new(ATTR_USERNAME, self.username.clone())));
                all.push(Box::new(TextAttribute::new(ATTR_REALM, REALM.to_owned())));
                all.push(Box::new(TextAttribute::new(ATTR_NONCE, nonce.clone())));
                all.push(Box::new(MessageIntegrity::new_long_term_integrity(
                    self.username.clone(),
                    REALM.to_owned(),
                    self.password.clone(),
                )));
            }
            let mut message = Message::new();
            message.build(&all).unwrap();
            message.raw
        }
    }

    use stun::message::Method;

    fn decode(bytes: &[u8]) -> Message {
        let mut message = Message::new();
        message.raw = bytes.to_vec();
        message.decode().unwrap();
        message
    }

    fn reply(action: Action<'_>) -> Message {
        match action {
            Action::Reply(bytes) => decode(&bytes),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn code(message: &Message) -> Option<u16> {
        let mut attribute = ErrorCodeAttribute::default();
        attribute.get_from(message).ok().map(|()| attribute.code.0)
    }

    fn transport() -> Box<dyn Setter> {
        Box::new(turn::proto::reqtrans::RequestedTransport { protocol: turn::proto::PROTO_UDP })
    }

    fn peer_attr(peer: SocketAddr) -> Box<dyn Setter> {
        Box::new(XorAddress(ATTR_XOR_PEER_ADDRESS, peer))
    }

    /// Runs the 401 dance and allocates; returns the client with its nonce.
    fn allocate(relay: &mut Relay, ports: &mut Ports, now_ms: u64) -> Client {
        let mut client = Client::new(SECRET, "@alice:example.org", now_ms, 3600);
        let challenge = reply(relay.handle_client(
            now_ms,
            tuple0(),
            &client.request(METHOD_ALLOCATE, vec![transport()]),
            ports,
        ));
        assert_eq!(code(&challenge), Some(401));
        client.nonce = Some(TextAttribute::get_from_as(&challenge, ATTR_NONCE).unwrap().text);
        let ok = reply(relay.handle_client(
            now_ms,
            tuple0(),
            &client.request(METHOD_ALLOCATE, vec![transport()]),
            ports,
        ));
        assert_eq!(ok.typ.class, CLASS_SUCCESS_RESPONSE, "{:?}", code(&ok));
        client
    }

    #[test]
    fn xor_addresses_decode_as_the_stun_crate_encodes_them() {
        for address in ["192.0.2.7:5000", "[2001:db8::1234:5678]:443"] {
            let address: SocketAddr = address.parse().unwrap();
            let mut message = Message::new();
            message
                .build(&[
                    Box::new(TransactionIdFrom([9; 12])),
                    Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
                    peer_attr(address),
                ])
                .unwrap();
            let value = message.get(ATTR_XOR_PEER_ADDRESS).unwrap();
            assert_eq!(decode_xor_address(&value, &[9; 12]), Some(address));
        }
        assert_eq!(decode_xor_address(&[0, 3, 0, 0, 1, 2, 3, 4], &[0; 12]), None, "unknown family");
        assert_eq!(decode_xor_address(&[0, 1, 0, 0, 1, 2], &[0; 12]), None, "truncated");
    }

    #[test]
    fn binding_answers_the_mapped_address_small_and_without_software() {
        let mut relay = relay(settings());
        let request = Client::new(SECRET, "x", T0, 60).request(METHOD_BINDING, vec![]);
        let Action::Reply(bytes) = relay.handle_client(T0, tuple0(), &request, &mut Ports::default()) else {
            panic!("no reply")
        };
        assert!(bytes.len() <= 3 * request.len());
        let answer = decode(&bytes);
        let mut mapped = XorMappedAddress::default();
        mapped.get_from(&answer).unwrap();
        assert_eq!(SocketAddr::new(mapped.ip, mapped.port), tuple0().client);
        assert!(!answer.contains(ATTR_SOFTWARE));
    }

    #[test]
    fn the_challenge_is_no_bigger_than_three_times_a_minimal_allocate() {
        let mut relay = relay(settings());
        let request = Client::new(SECRET, "x", T0, 60).request(METHOD_ALLOCATE, vec![transport()]);
        assert_eq!(request.len(), 28);
        let Action::Reply(bytes) = relay.handle_client(T0, tuple0(), &request, &mut Ports::default()) else {
            panic!("no reply")
        };
        assert!(bytes.len() <= 3 * request.len(), "{} bytes", bytes.len());
        assert_eq!(code(&decode(&bytes)), Some(401));
        // Without REQUESTED-TRANSPORT: 400, before authentication.
        let bare = Client::new(SECRET, "x", T0, 60).request(METHOD_ALLOCATE, vec![]);
        assert_eq!(code(&reply(relay.handle_client(T0, tuple0(), &bare, &mut Ports::default()))), Some(400));
    }

    #[test]
    fn credentials_are_checked() {
        let mut ports = Ports::default();
        let mut relay = relay(Settings { secrets: vec![b"new".to_vec(), SECRET.to_vec()], ..settings() });
        // The old secret still works during a rotation.
        let client = allocate(&mut relay, &mut ports, T0);
        assert_eq!(udp(&relay).allocations, 1);

        let nonce = client.nonce.clone();
        let other = FiveTuple { client: "127.0.0.2:50000".parse().unwrap(), ..tuple0() };
        let mut wrong = Client::new(b"not-the-secret", "@mallory:x", T0, 3600);
        wrong.nonce = Some(relay.nonces.issue(other.client.ip(), T0 / 1000));
        let answer = reply(relay.handle_client(
            T0,
            other,
            &wrong.request(METHOD_ALLOCATE, vec![transport()]),
            &mut ports,
        ));
        assert_eq!(code(&answer), Some(401));
        let mut expired = Client::new(SECRET, "@alice:x", T0 - 7_200_000, 3600);
        expired.nonce = wrong.nonce.clone();
        let answer = reply(relay.handle_client(
            T0,
            other,
            &expired.request(METHOD_ALLOCATE, vec![transport()]),
            &mut ports,
        ));
        assert_eq!(code(&answer), Some(401), "expired username");
        // A nonce issued to another address is not accepted.
        let mut stolen = Client::new(SECRET, "@alice:x", T0, 3600);
        stolen.nonce = nonce;
        let answer = reply(relay.handle_client(
            T0,
            other,
            &stolen.request(METHOD_ALLOCATE, vec![transport()]),
            &mut ports,
        ));
        assert_eq!(code(&answer), Some(401));
        assert_eq!(relay.stats(Transport::Udp).auth_failures, 3);
        assert_eq!(udp(&relay).allocations, 1);
    }

    #[test]
    fn stale_nonce_gets_438_with_a_fresh_one_and_other_usernames_get_441() {
        let mut ports = Ports::default();
        let mut relay = relay(Settings { nonce_lifetime_secs: 60, ..settings() });
        let mut client = allocate(&mut relay, &mut ports, T0);
        let later = T0 + 61_000;
        let answer =
            reply(relay.handle_client(later, tuple0(), &client.request(METHOD_REFRESH, vec![]), &mut ports));
        assert_eq!(code(&answer), Some(438));
        let fresh = TextAttribute::get_from_as(&answer, ATTR_NONCE).unwrap().text;
        assert_ne!(Some(&fresh), client.nonce.as_ref());
        client.nonce = Some(fresh);
        let answer =
            reply(relay.handle_client(later, tuple0(), &client.request(METHOD_REFRESH, vec![]), &mut ports));
        assert_eq!(answer.typ.class, CLASS_SUCCESS_RESPONSE);

        let mut bob = Client::new(SECRET, "@bob:example.org", later, 3600);
        bob.nonce = client.nonce.clone();
        let answer =
            reply(relay.handle_client(later, tuple0(), &bob.request(METHOD_REFRESH, vec![]), &mut ports));
        assert_eq!(code(&answer), Some(441));
        // An Allocate on a 5-tuple in use is a mismatch, whoever asks (clients retry from another port).
        let allocate = bob.request(METHOD_ALLOCATE, vec![transport()]);
        assert_eq!(code(&reply(relay.handle_client(later, tuple0(), &allocate, &mut ports))), Some(437));
    }

    #[test]
    fn lifetimes_are_clamped_refreshed_and_expire() {
        let mut ports = Ports::default();
        let mut relay = relay(settings());
        let client = allocate(&mut relay, &mut ports, T0);
        let long = Box::new(Lifetime(std::time::Duration::from_secs(100_000)));
        let answer =
            reply(relay.handle_client(T0, tuple0(), &client.request(METHOD_REFRESH, vec![long]), &mut ports));
        let mut lifetime = Lifetime::default();
        lifetime.get_from(&answer).unwrap();
        assert_eq!(lifetime.0.as_secs(), 3600, "clamped to the maximum");

        relay.expire(T0 + 3_599_000, &mut ports);
        assert_eq!(udp(&relay).allocations, 1);
        relay.expire(T0 + 3_600_000, &mut ports);
        assert_eq!(udp(&relay).allocations, 0);
        assert!(ports.open.is_empty(), "the relay socket is closed");
        let mut client = client;
        client.nonce = Some(relay.nonces.issue(tuple0().client.ip(), (T0 + 3_600_000) / 1000));
        let answer = reply(relay.handle_client(
            T0 + 3_600_000,
            tuple0(),
            &client.request(METHOD_REFRESH, vec![]),
            &mut ports,
        ));
        assert_eq!(code(&answer), Some(437), "no allocation any more");

        // Refresh with lifetime 0 deletes at once.
        let client = allocate(&mut relay, &mut ports, T0 + 3_700_000);
        let zero = Box::new(Lifetime(std::time::Duration::ZERO));
        let answer = reply(relay.handle_client(
            T0 + 3_700_000,
            tuple0(),
            &client.request(METHOD_REFRESH, vec![zero]),
            &mut ports,
        ));
        assert_eq!(answer.typ.class, CLASS_SUCCESS_RESPONSE);
        assert_eq!(udp(&relay).allocations, 0);
        assert!(ports.open.is_empty());
    }

    #[test]
    fn permissions_are_all_or_nothing_and_expire() {
        let mut ports = Ports::default();
        let mut relay = relay(Settings { policy: PeerPolicy::new(vec![], vec![]), ..settings() });
        let client = allocate(&mut relay, &mut ports, T0);
        let public_a: SocketAddr = "8.8.8.8:5000".parse().unwrap();
        let public_b: SocketAddr = "1.1.1.1:5000".parse().unwrap();
        for denied in ["127.0.0.1:5000", "169.254.169.254:80", "10.0.0.1:1", "0.0.0.0:9", "224.0.0.1:5"] {
            let request = client.request(
                METHOD_CREATE_PERMISSION,
                vec![peer_attr(public_a), peer_attr(denied.parse().unwrap())],
            );
            assert_eq!(
                code(&reply(relay.handle_client(T0, tuple0(), &request, &mut ports))),
                Some(403),
                "{denied}"
            );
        }
        assert_eq!(udp(&relay).permissions, 0, "nothing installed when one peer is denied");
        let request =
            client.request(METHOD_CREATE_PERMISSION, vec![peer_attr(public_a), peer_attr(public_b)]);
        assert_eq!(
            reply(relay.handle_client(T0, tuple0(), &request, &mut ports)).typ.class,
            CLASS_SUCCESS_RESPONSE
        );
        assert_eq!(udp(&relay).permissions, 2, "every XOR-PEER-ADDRESS is installed");

        let relay_addr = *ports.open.iter().next().unwrap();
        let mut out = Vec::new();
        assert!(relay.handle_peer(T0 + 1, relay_addr, public_b, b"hi", &mut out).is_some());
        assert!(
            relay.handle_peer(T0 + 1, relay_addr, "9.9.9.9:1".parse().unwrap(), b"hi", &mut out).is_none()
        );
        relay.expire(T0 + PERMISSION_LIFETIME_MS, &mut ports);
        assert_eq!(udp(&relay).permissions, 0);
        assert!(
            relay.handle_peer(T0 + PERMISSION_LIFETIME_MS, relay_addr, public_b, b"hi", &mut out).is_none()
        );
        assert_eq!(relay.stats(Transport::Udp).denied_peers, 5);
    }

    #[test]
    fn channels_relay_both_ways_and_follow_the_rules() {
        let mut ports = Ports::default();
        let mut relay = relay(settings());
        let client = allocate(&mut relay, &mut ports, T0);
        let relay_addr = *ports.open.iter().next().unwrap();
        let bind = |number: u16, peer: SocketAddr| {
            client.request(
                METHOD_CHANNEL_BIND,
                vec![Box::new(turn::proto::channum::ChannelNumber(number)), peer_attr(peer)],
            )
        };
        assert_eq!(
            code(&reply(relay.handle_client(T0, tuple0(), &bind(0x3FFF, peer()), &mut ports))),
            Some(400)
        );
        assert_eq!(
            reply(relay.handle_client(T0, tuple0(), &bind(0x4000, peer()), &mut ports)).typ.class,
            CLASS_SUCCESS_RESPONSE
        );
        let other: SocketAddr = "127.0.0.2:1".parse().unwrap();
        assert_eq!(
            code(&reply(relay.handle_client(T0, tuple0(), &bind(0x4000, other), &mut ports))),
            Some(400)
        );
        assert_eq!(
            code(&reply(relay.handle_client(T0, tuple0(), &bind(0x4001, peer()), &mut ports))),
            Some(400)
        );

        // Client → peer.
        let mut frame = vec![0x40, 0x00, 0x00, 0x03];
        frame.extend_from_slice(b"abc");
        assert_eq!(
            relay.handle_client(T0, tuple0(), &frame, &mut ports),
            Action::Relay { relay: relay_addr, peer: peer(), data: Cow::Borrowed(b"abc") }
        );
        assert_eq!(relay.handle_client(T0, tuple0(), &frame[..5], &mut ports), Action::None, "truncated");
        // Peer → client, as ChannelData.
        let mut out = Vec::new();
        assert_eq!(relay.handle_peer(T0, relay_addr, peer(), b"xyz", &mut out), Some(tuple0()));
        assert_eq!(out, [0x40, 0x00, 0x00, 0x03, b'x', b'y', b'z']);
        relay.expire(T0 + CHANNEL_LIFETIME_MS, &mut ports);
        assert_eq!(udp(&relay).channels, 0);
        assert_eq!(relay.handle_client(T0 + CHANNEL_LIFETIME_MS, tuple0(), &frame, &mut ports), Action::None);
    }

    #[test]
    fn send_and_data_indications_need_a_permission() {
        let mut ports = Ports::default();
        let mut relay = relay(settings());
        let client = allocate(&mut relay, &mut ports, T0);
        let relay_addr = *ports.open.iter().next().unwrap();
        let send = {
            let mut message = Message::new();
            message
                .build(&[
                    Box::new(TransactionIdFrom(random_transaction_id())),
                    Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
                    peer_attr(peer()),
                    Box::new(turn::proto::data::Data(b"hello".to_vec())),
                ])
                .unwrap();
            message.raw
        };
        assert_eq!(relay.handle_client(T0, tuple0(), &send, &mut ports), Action::None, "no permission yet");
        let request = client.request(METHOD_CREATE_PERMISSION, vec![peer_attr(peer())]);
        reply(relay.handle_client(T0, tuple0(), &request, &mut ports));
        assert_eq!(
            relay.handle_client(T0, tuple0(), &send, &mut ports),
            Action::Relay { relay: relay_addr, peer: peer(), data: Cow::Owned(b"hello".to_vec()) }
        );
        let mut out = Vec::new();
        assert_eq!(relay.handle_peer(T0, relay_addr, peer(), b"back", &mut out), Some(tuple0()));
        let data = decode(&out);
        assert_eq!((data.typ.method, data.typ.class), (METHOD_DATA, CLASS_INDICATION));
        assert_eq!(data.get(ATTR_DATA).unwrap(), b"back");
        assert_eq!(
            decode_xor_address(&data.get(ATTR_XOR_PEER_ADDRESS).unwrap(), &data.transaction_id.0),
            Some(peer())
        );
    }

    #[test]
    fn quotas_refuse_with_486_and_508() {
        let mut ports = Ports::default();
        let limits = std::sync::Arc::new(Limits::new(2, 3, 0));
        // Two shards of one relay: the quotas hold across them.
        let mut shard_a = Relay::new(settings(), limits.clone());
        let mut shard_b = Relay::new(settings(), limits);
        let tuple = |port: u16| FiveTuple { client: SocketAddr::new(tuple0().client.ip(), port), ..tuple0() };
        let mut alice = Client::new(SECRET, "@alice:x", T0, 3600);
        alice.nonce = Some(shard_a.nonces.issue(tuple0().client.ip(), T0 / 1000));
        let mut bob = Client::new(SECRET, "@bob:x", T0, 3600);
        bob.nonce = alice.nonce.clone();
        let allocate = |relay: &mut Relay, ports: &mut Ports, who: &Client, port: u16| {
            code(&reply(relay.handle_client(
                T0,
                tuple(port),
                &who.request(METHOD_ALLOCATE, vec![transport()]),
                ports,
            )))
        };
        assert_eq!(allocate(&mut shard_a, &mut ports, &alice, 1), None);
        assert_eq!(allocate(&mut shard_b, &mut ports, &alice, 2), None);
        assert_eq!(allocate(&mut shard_a, &mut ports, &alice, 3), Some(486));
        assert_eq!(allocate(&mut shard_b, &mut ports, &alice, 3), Some(486));
        assert_eq!(allocate(&mut shard_b, &mut ports, &bob, 4), None);
        assert_eq!(allocate(&mut shard_a, &mut ports, &bob, 5), Some(508));
        assert_eq!(shard_a.stats(Transport::Udp).quota_refusals, 2);
        // A closed allocation gives its place back.
        shard_a.close(tuple(1), &mut ports);
        assert_eq!(allocate(&mut shard_a, &mut ports, &bob, 5), None);
    }

    #[test]
    fn bandwidth_is_capped_per_allocation() {
        let mut ports = Ports::default();
        let mut relay = relay(Settings { bandwidth_bytes_per_sec: 1000, ..settings() });
        let client = allocate(&mut relay, &mut ports, T0);
        let bind = client.request(
            METHOD_CHANNEL_BIND,
            vec![Box::new(turn::proto::channum::ChannelNumber(0x4000)), peer_attr(peer())],
        );
        reply(relay.handle_client(T0, tuple0(), &bind, &mut ports));
        let mut frame = vec![0x40, 0x00, 0x01, 0xF4]; // 500 bytes
        frame.resize(504, 7);
        let sent =
            (0..3).filter(|_| relay.handle_client(T0, tuple0(), &frame, &mut ports) != Action::None).count();
        assert_eq!(sent, 2, "1000 bytes in the first second");
        assert_ne!(relay.handle_client(T0 + 500, tuple0(), &frame, &mut ports), Action::None, "refilled");
        assert_eq!(relay.stats(Transport::Udp).over_bandwidth_dropped, 1);
    }

    #[test]
    fn unauthenticated_requests_are_rate_limited_per_source() {
        let mut ports = Ports::default();
        let mut relay = Relay::new(settings(), std::sync::Arc::new(Limits::new(10, 100, 5)));
        let request = Client::new(SECRET, "x", T0, 60).request(METHOD_BINDING, vec![]);
        let answered = (0..20)
            .filter(|_| relay.handle_client(T0, tuple0(), &request, &mut ports) != Action::None)
            .count();
        assert_eq!(answered, 10, "a burst of twice the rate");
        let other = FiveTuple { client: "127.0.0.9:1".parse().unwrap(), ..tuple0() };
        assert_ne!(relay.handle_client(T0, other, &request, &mut ports), Action::None, "another source");
        assert_ne!(relay.handle_client(T0 + 1000, tuple0(), &request, &mut ports), Action::None, "refilled");
    }

    #[test]
    fn mangled_packets_never_panic_and_leave_the_relay_serving() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x7475_726e);
        let mut ports = Ports::default();
        let mut relay = relay(settings());
        let client = allocate(&mut relay, &mut ports, T0);
        let relay_addr = *ports.open.iter().next().unwrap();
        let mut send = Message::new();
        send.build(&[
            Box::new(TransactionIdFrom([5; 12])),
            Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
            peer_attr(peer()),
            Box::new(turn::proto::data::Data(b"payload".to_vec())),
        ])
        .unwrap();
        let samples = [
            client.request(METHOD_ALLOCATE, vec![transport()]),
            client.request(METHOD_REFRESH, vec![Box::new(Lifetime(std::time::Duration::from_secs(900)))]),
            client.request(
                METHOD_CREATE_PERMISSION,
                vec![peer_attr(peer()), peer_attr("[::1]:9".parse().unwrap())],
            ),
            client.request(
                METHOD_CHANNEL_BIND,
                vec![Box::new(turn::proto::channum::ChannelNumber(0x4000)), peer_attr(peer())],
            ),
            client.request(METHOD_BINDING, vec![]),
            send.raw.clone(),
            vec![0x40, 0x00, 0x00, 0x03, b'a', b'b', b'c'],
        ];
        let mut out = Vec::new();
        for round in 0..20_000_u64 {
            let mut packet = samples[usize::try_from(round).unwrap() % samples.len()].clone();
            match rng.random_range(0..4) {
                0 => {
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(0..packet.len());
                        packet[at] ^= rng.random_range(1..=u8::MAX);
                    }
                }
                1 => packet.truncate(rng.random_range(0..packet.len())),
                2 if packet.len() >= 4 => {
                    packet[2] = rng.random();
                    packet[3] = rng.random();
                }
                _ => packet.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
            }
            let now = T0 + round;
            let _ = relay.handle_client(now, tuple0(), &packet, &mut ports);
            let _ = relay.handle_peer(now, relay_addr, peer(), &packet, &mut out);
        }
        let binding = Client::new(SECRET, "x", T0, 60).request(METHOD_BINDING, vec![]);
        let answer = reply(relay.handle_client(T0 + 20_000, tuple0(), &binding, &mut ports));
        assert_eq!(answer.typ.class, CLASS_SUCCESS_RESPONSE);
    }

    #[test]
    fn unknown_required_attributes_get_420_and_garbage_gets_nothing() {
        let mut ports = Ports::default();
        let mut relay = relay(settings());
        let client = Client::new(SECRET, "x", T0, 60);
        let odd: Box<dyn Setter> = Box::new(UnknownAttribute(AttrType(0x0042)));
        let mut message = Message::new();
        message
            .build(&[
                Box::new(TransactionIdFrom([1; 12])),
                Box::new(MessageType::new(METHOD_BINDING, CLASS_REQUEST)),
            ])
            .unwrap();
        odd.add_to(&mut message).unwrap();
        let answer = reply(relay.handle_client(T0, tuple0(), &message.raw, &mut ports));
        assert_eq!(code(&answer), Some(420));
        let _ = client;
        for garbage in
            [&b""[..], b"\x00", b"\x00\x01\x00\x08\x21\x12\xa4\x42", &[0xff; 100], &[0x40, 0, 0xff, 0xff]]
        {
            assert_eq!(relay.handle_client(T0, tuple0(), garbage, &mut ports), Action::None);
        }
    }
}
