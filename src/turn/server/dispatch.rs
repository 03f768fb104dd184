//! Routes a client's packet (STUN or ChannelData) or a peer's datagram to its handler; the data
//! path (ChannelData, Send and Data indications).

use std::borrow::Cow;
use std::net::SocketAddr;

use stun::attributes::{ATTR_DATA, ATTR_REQUESTED_TRANSPORT, ATTR_XOR_PEER_ADDRESS};
use stun::error_code::{CODE_BAD_REQUEST, CODE_UNKNOWN_ATTRIBUTE, CODE_WRONG_CREDENTIALS};
use stun::message::{
    CLASS_INDICATION, CLASS_REQUEST, METHOD_ALLOCATE, METHOD_BINDING, METHOD_CHANNEL_BIND,
    METHOD_CREATE_PERMISSION, METHOD_DATA, METHOD_REFRESH, METHOD_SEND, Message, MessageType,
};

use super::codec::{
    TransactionIdFrom, XorAddress, decode_xor_address, error, random_transaction_id, response,
    unknown_required,
};
use super::{Action, FiveTuple, Relay, RelayPorts};

impl Relay {
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
        if allocation.expires_ms <= now_ms {
            return None;
        }
        if !allocation.permitted(peer.ip(), now_ms) {
            self.stats[tuple.transport as usize].unpermitted_dropped += 1;
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

    pub(super) fn channel_data<'a>(&mut self, now_ms: u64, tuple: FiveTuple, packet: &'a [u8]) -> Action<'a> {
        let [a, b, c, d, ..] = *packet else { return Action::None };
        let number = u16::from_be_bytes([a, b]);
        let length = usize::from(u16::from_be_bytes([c, d]));
        let Some(data) = packet.get(4..4 + length) else { return Action::None };
        let rate = self.settings.bandwidth_bytes_per_sec;
        let Some(allocation) = self.allocations.get_mut(&tuple) else { return Action::None };
        let Some(&(peer, expires)) = allocation.channels.get(&number) else { return Action::None };
        if expires <= now_ms || allocation.expires_ms <= now_ms {
            return Action::None;
        }
        if !allocation.permitted(peer.ip(), now_ms) {
            self.stats[tuple.transport as usize].unpermitted_dropped += 1;
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

    pub(super) fn stun<'a>(
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

    pub(super) fn turn_request<'a>(
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

    pub(super) fn send_indication<'a>(
        &mut self,
        now_ms: u64,
        tuple: FiveTuple,
        request: &Message,
    ) -> Action<'a> {
        let rate = self.settings.bandwidth_bytes_per_sec;
        let Some(allocation) = self.allocations.get_mut(&tuple) else { return Action::None };
        let peer = request
            .get(ATTR_XOR_PEER_ADDRESS)
            .ok()
            .and_then(|value| decode_xor_address(&value, &request.transaction_id.0));
        let (Some(peer), Ok(data)) = (peer, request.get(ATTR_DATA)) else { return Action::None };
        if allocation.expires_ms <= now_ms {
            return Action::None;
        }
        if !allocation.permitted(peer.ip(), now_ms) {
            self.stats[tuple.transport as usize].unpermitted_dropped += 1;
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
