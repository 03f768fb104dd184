//! Allocations, their permissions and channels: created, refreshed, expired and closed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use stun::attributes::{
    ATTR_CHANNEL_NUMBER, ATTR_EVEN_PORT, ATTR_REQUESTED_ADDRESS_FAMILY, ATTR_REQUESTED_TRANSPORT,
    ATTR_RESERVATION_TOKEN, ATTR_XOR_PEER_ADDRESS,
};
use stun::error_code::{
    CODE_ALLOC_MISMATCH, CODE_ALLOC_QUOTA_REACHED, CODE_BAD_REQUEST, CODE_FORBIDDEN,
    CODE_INSUFFICIENT_CAPACITY, CODE_PEER_ADDR_FAMILY_MISMATCH, CODE_UNSUPPORTED_TRANS_PROTO,
};
use stun::message::Message;
use turn::proto::channum::{MAX_CHANNEL_NUMBER, MIN_CHANNEL_NUMBER};
use turn::proto::lifetime::Lifetime;
use turn::proto::relayaddr::RelayedAddress;

use super::auth::Authenticated;
use super::codec::{XorAddress, decode_xor_address, error, response};
use super::{CHANNEL_LIFETIME_MS, FiveTuple, PERMISSION_LIFETIME_MS, PROTO_UDP, Relay, RelayPorts, Timer};
use crate::turn::credentials;
use crate::turn::limits::Refusal;

pub(super) struct Allocation {
    pub(super) relay: SocketAddr,
    /// Later requests on the allocation must use the same username (441 otherwise).
    pub(super) username: Box<str>,
    pub(super) expires_ms: u64,
    /// The transaction that created it, to answer a retransmitted Allocate.
    pub(super) allocate_txn: [u8; 12],
    pub(super) allocate_response: Box<[u8]>,
    pub(super) permissions: HashMap<IpAddr, u64>,
    pub(super) channels: HashMap<u16, (SocketAddr, u64)>,
    pub(super) channel_of_peer: HashMap<SocketAddr, u16>,
    /// Token bucket of the bandwidth cap: bytes available, and when it was last filled.
    pub(super) budget: (u64, u64),
}

impl Allocation {
    pub(super) fn permitted(&self, peer: IpAddr, now_ms: u64) -> bool {
        self.permissions.get(&peer).is_some_and(|expires| *expires > now_ms)
    }

    /// Takes `bytes` from the bandwidth budget; false when over the cap.
    pub(super) fn spend(&mut self, bytes: usize, now_ms: u64, rate: u64) -> bool {
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

impl Relay {
    /// A stream (TCP, TLS) client connected: it is hung up on (see [`Relay::expire`]) unless it
    /// allocates within `allocate_timeout_ms`.
    pub fn stream_opened(&mut self, now_ms: u64, tuple: FiveTuple) {
        self.await_allocation(now_ms, tuple);
    }

    /// Arms the allocate timeout of a stream client that has no allocation.
    fn await_allocation(&mut self, now_ms: u64, tuple: FiveTuple) {
        let deadline = now_ms.saturating_add(self.settings.allocate_timeout_ms);
        let old = self.unallocated.insert(tuple, deadline);
        reschedule(&mut self.deadlines, old, Some(deadline), Timer::Unallocated(tuple));
    }

    /// Ends what is due by `now_ms`: allocations (closing their relay sockets), permissions and
    /// channels; the stream clients that went `allocate_timeout_ms` without an allocation are
    /// added to `hang_up` for the IO layer to disconnect. Work is proportional to what is due.
    pub fn expire(&mut self, now_ms: u64, ports: &mut dyn RelayPorts, hang_up: &mut Vec<FiveTuple>) {
        while let Some(&(deadline, timer)) = self.deadlines.first() {
            if deadline > now_ms {
                break;
            }
            self.deadlines.pop_first();
            match timer {
                Timer::Allocation(tuple) => self.end_allocation(now_ms, tuple, ports),
                Timer::Permission(tuple, peer) => {
                    if let Some(allocation) = self.allocations.get_mut(&tuple) {
                        allocation.permissions.remove(&peer);
                    }
                }
                Timer::Channel(tuple, number) => {
                    if let Some(allocation) = self.allocations.get_mut(&tuple)
                        && let Some((peer, _)) = allocation.channels.remove(&number)
                    {
                        allocation.channel_of_peer.remove(&peer);
                    }
                }
                Timer::Unallocated(tuple) => {
                    self.unallocated.remove(&tuple);
                    self.stats_mut(tuple.transport).unallocated_hang_ups += 1;
                    hang_up.push(tuple);
                }
            }
        }
        self.limits.forget_idle_sources(now_ms);
    }

    /// The earliest deadline [`Relay::expire`] has to act on, if any.
    #[cfg(test)]
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// Closes every allocation (at shutdown).
    pub fn close_all(&mut self, ports: &mut dyn RelayPorts) {
        let all: Vec<FiveTuple> = self.allocations.keys().copied().collect();
        for tuple in all {
            self.close(tuple, ports);
        }
    }

    /// Forgets `tuple`: its allocation, if any, is deleted (its TCP or TLS connection closed, or
    /// at shutdown), and so is its allocate timeout.
    pub fn close(&mut self, tuple: FiveTuple, ports: &mut dyn RelayPorts) {
        self.remove_allocation(tuple, ports);
        if let Some(deadline) = self.unallocated.remove(&tuple) {
            self.deadlines.remove(&(deadline, Timer::Unallocated(tuple)));
        }
    }

    /// Deletes the allocation of `tuple` while its client stays (it expired, or was refreshed to
    /// 0): a stream client then has `allocate_timeout_ms` to allocate again.
    pub(super) fn end_allocation(&mut self, now_ms: u64, tuple: FiveTuple, ports: &mut dyn RelayPorts) {
        if self.remove_allocation(tuple, ports) && tuple.transport.is_stream() {
            self.await_allocation(now_ms, tuple);
        }
    }

    /// Deletes the allocation of `tuple` and its timers; whether there was one.
    fn remove_allocation(&mut self, tuple: FiveTuple, ports: &mut dyn RelayPorts) -> bool {
        let Some(allocation) = self.allocations.remove(&tuple) else { return false };
        self.allocation_of_socket.remove(&allocation.relay);
        ports.close(allocation.relay);
        self.limits.release(credentials::user(&allocation.username));
        let deadlines = &mut self.deadlines;
        deadlines.remove(&(allocation.expires_ms, Timer::Allocation(tuple)));
        for (peer, expires) in &allocation.permissions {
            deadlines.remove(&(*expires, Timer::Permission(tuple, *peer)));
        }
        for (number, (_, expires)) in &allocation.channels {
            deadlines.remove(&(*expires, Timer::Channel(tuple, *number)));
        }
        true
    }

    pub(super) fn lifetime_ms(&self, request: &Message) -> u64 {
        let mut requested = Lifetime::default();
        let secs = if stun::message::Getter::get_from(&mut requested, request).is_ok() {
            requested.0.as_secs().clamp(self.settings.default_lifetime_secs, self.settings.max_lifetime_secs)
        } else {
            self.settings.default_lifetime_secs
        };
        secs * 1000
    }

    pub(super) fn allocate(
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
        let expires_ms = now_ms + lifetime_ms;
        if let Some(deadline) = self.unallocated.remove(&tuple) {
            self.deadlines.remove(&(deadline, Timer::Unallocated(tuple)));
        }
        self.deadlines.insert((expires_ms, Timer::Allocation(tuple)));
        self.allocation_of_socket.insert(relay, tuple);
        self.allocations.insert(
            tuple,
            Box::new(Allocation {
                relay,
                username,
                expires_ms,
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

    pub(super) fn refresh(
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
            self.end_allocation(now_ms, tuple, ports);
            0
        } else {
            let expires_ms = now_ms + lifetime_ms;
            let old = std::mem::replace(&mut allocation.expires_ms, expires_ms);
            reschedule(&mut self.deadlines, Some(old), Some(expires_ms), Timer::Allocation(tuple));
            lifetime_ms
        };
        response(request, &[Box::new(Lifetime(std::time::Duration::from_millis(lifetime_ms)))], Some(key))
    }

    pub(super) fn create_permission(
        &mut self,
        now_ms: u64,
        tuple: FiveTuple,
        request: &Message,
        key: &[u8],
    ) -> Vec<u8> {
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
        // All or nothing too: past `max_permissions`, none of them is installed.
        if new_permissions(&allocation.permissions, &peers) > self.settings.max_permissions {
            self.stats[tuple.transport as usize].permission_refusals += 1;
            return error(request, CODE_INSUFFICIENT_CAPACITY, vec![], Some(key));
        }
        let expires_ms = now_ms + PERMISSION_LIFETIME_MS;
        for peer in peers {
            let old = allocation.permissions.insert(peer.ip(), expires_ms);
            reschedule(&mut self.deadlines, old, Some(expires_ms), Timer::Permission(tuple, peer.ip()));
        }
        response(request, &[], Some(key))
    }

    pub(super) fn channel_bind(
        &mut self,
        now_ms: u64,
        tuple: FiveTuple,
        request: &Message,
        key: &[u8],
    ) -> Vec<u8> {
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
        let new_channel = !allocation.channels.contains_key(&number);
        if new_channel && allocation.channels.len() >= self.settings.max_channels {
            self.stats[tuple.transport as usize].channel_refusals += 1;
            return error(request, CODE_INSUFFICIENT_CAPACITY, vec![], Some(key));
        }
        let new_permission = !allocation.permissions.contains_key(&peer.ip());
        if new_permission && allocation.permissions.len() >= self.settings.max_permissions {
            self.stats[tuple.transport as usize].permission_refusals += 1;
            return error(request, CODE_INSUFFICIENT_CAPACITY, vec![], Some(key));
        }
        let channel_expires = now_ms + CHANNEL_LIFETIME_MS;
        let old = allocation.channels.insert(number, (peer, channel_expires)).map(|(_, expires)| expires);
        reschedule(&mut self.deadlines, old, Some(channel_expires), Timer::Channel(tuple, number));
        allocation.channel_of_peer.insert(peer, number);
        let permission_expires = now_ms + PERMISSION_LIFETIME_MS;
        let old = allocation.permissions.insert(peer.ip(), permission_expires);
        reschedule(&mut self.deadlines, old, Some(permission_expires), Timer::Permission(tuple, peer.ip()));
        response(request, &[], Some(key))
    }
}

/// Moves `timer` from its `old` deadline to its `new` one in `deadlines`.
fn reschedule(deadlines: &mut BTreeSet<(u64, Timer)>, old: Option<u64>, new: Option<u64>, timer: Timer) {
    if let Some(old) = old {
        deadlines.remove(&(old, timer));
    }
    if let Some(new) = new {
        deadlines.insert((new, timer));
    }
}

/// How many permissions an allocation holding `installed` would hold with `peers` added.
fn new_permissions(installed: &HashMap<IpAddr, u64>, peers: &[SocketAddr]) -> usize {
    let added: HashSet<IpAddr> =
        peers.iter().map(SocketAddr::ip).filter(|peer| !installed.contains_key(peer)).collect();
    installed.len() + added.len()
}
