use std::collections::HashSet;

use stun::message::Getter;
use stun::textattrs::TextAttribute;

use super::codec::{
    TransactionIdFrom, UnknownAttribute, XorAddress, decode_xor_address, random_transaction_id,
};
use std::borrow::Cow;
use std::net::SocketAddr;

use stun::attributes::{
    ATTR_DATA, ATTR_NONCE, ATTR_REALM, ATTR_SOFTWARE, ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS, AttrType,
};
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_INDICATION, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, METHOD_BINDING,
    METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_DATA, METHOD_REFRESH, METHOD_SEND, Message,
    MessageType, Setter,
};
use stun::xoraddr::XorMappedAddress;
use turn::proto::lifetime::Lifetime;

use crate::turn::credentials;
use crate::turn::limits::Limits;
use crate::turn::policy::PeerPolicy;

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

/// The UDP gauges, after checking the relay's bookkeeping: there is one timer per allocation,
/// permission, channel and stream waiting for an allocation.
fn udp(relay: &Relay) -> Gauges {
    check_bookkeeping(relay);
    relay.gauges()[Transport::Udp as usize]
}

fn check_bookkeeping(relay: &Relay) {
    let installed: usize =
        relay.gauges().iter().map(|gauge| gauge.allocations + gauge.permissions + gauge.channels).sum();
    assert_eq!(relay.deadlines.len(), installed + relay.unallocated.len(), "one timer each");
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
        max_permissions: 128,
        max_channels: 128,
        allocate_timeout_ms: 60_000,
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
    let answer =
        reply(relay.handle_client(T0, other, &wrong.request(METHOD_ALLOCATE, vec![transport()]), &mut ports));
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

    relay.expire(T0 + 3_599_000, &mut ports, &mut Vec::new());
    assert_eq!(udp(&relay).allocations, 1);
    relay.expire(T0 + 3_600_000, &mut ports, &mut Vec::new());
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
        let request = client
            .request(METHOD_CREATE_PERMISSION, vec![peer_attr(public_a), peer_attr(denied.parse().unwrap())]);
        assert_eq!(
            code(&reply(relay.handle_client(T0, tuple0(), &request, &mut ports))),
            Some(403),
            "{denied}"
        );
    }
    assert_eq!(udp(&relay).permissions, 0, "nothing installed when one peer is denied");
    let request = client.request(METHOD_CREATE_PERMISSION, vec![peer_attr(public_a), peer_attr(public_b)]);
    assert_eq!(
        reply(relay.handle_client(T0, tuple0(), &request, &mut ports)).typ.class,
        CLASS_SUCCESS_RESPONSE
    );
    assert_eq!(udp(&relay).permissions, 2, "every XOR-PEER-ADDRESS is installed");

    let relay_addr = *ports.open.iter().next().unwrap();
    let mut out = Vec::new();
    assert!(relay.handle_peer(T0 + 1, relay_addr, public_b, b"hi", &mut out).is_some());
    assert!(relay.handle_peer(T0 + 1, relay_addr, "9.9.9.9:1".parse().unwrap(), b"hi", &mut out).is_none());
    relay.expire(T0 + PERMISSION_LIFETIME_MS, &mut ports, &mut Vec::new());
    assert_eq!(udp(&relay).permissions, 0);
    assert!(relay.handle_peer(T0 + PERMISSION_LIFETIME_MS, relay_addr, public_b, b"hi", &mut out).is_none());
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
    assert_eq!(code(&reply(relay.handle_client(T0, tuple0(), &bind(0x3FFF, peer()), &mut ports))), Some(400));
    assert_eq!(
        reply(relay.handle_client(T0, tuple0(), &bind(0x4000, peer()), &mut ports)).typ.class,
        CLASS_SUCCESS_RESPONSE
    );
    let other: SocketAddr = "127.0.0.2:1".parse().unwrap();
    assert_eq!(code(&reply(relay.handle_client(T0, tuple0(), &bind(0x4000, other), &mut ports))), Some(400));
    assert_eq!(code(&reply(relay.handle_client(T0, tuple0(), &bind(0x4001, peer()), &mut ports))), Some(400));

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
    relay.expire(T0 + CHANNEL_LIFETIME_MS, &mut ports, &mut Vec::new());
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
    let mut out = Vec::new();
    assert_eq!(relay.handle_peer(T0, relay_addr, peer(), b"early", &mut out), None, "nor from the peer");
    assert_eq!(relay.stats(Transport::Udp).unpermitted_dropped, 2);
    let request = client.request(METHOD_CREATE_PERMISSION, vec![peer_attr(peer())]);
    reply(relay.handle_client(T0, tuple0(), &request, &mut ports));
    assert_eq!(
        relay.handle_client(T0, tuple0(), &send, &mut ports),
        Action::Relay { relay: relay_addr, peer: peer(), data: Cow::Owned(b"hello".to_vec()) }
    );
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
    let answered =
        (0..20).filter(|_| relay.handle_client(T0, tuple0(), &request, &mut ports) != Action::None).count();
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

/// `count` peers on loopback (the test policy allows 127.0.0.0/8), from `from` on.
fn loopback_peers(from: u32, count: u32) -> Vec<Box<dyn Setter>> {
    (from..from + count)
        .map(|n| peer_attr(SocketAddr::new(std::net::Ipv4Addr::from_bits(0x7F00_0000 + n).into(), 9)))
        .collect()
}

fn bind_request(client: &Client, number: u16, peer: SocketAddr) -> Vec<u8> {
    client.request(
        METHOD_CHANNEL_BIND,
        vec![Box::new(turn::proto::channum::ChannelNumber(number)), peer_attr(peer)],
    )
}

#[test]
fn permissions_past_the_cap_get_508_and_none_of_the_request_is_installed() {
    let mut ports = Ports::default();
    let mut relay = relay(Settings { max_permissions: 4, ..settings() });
    let client = allocate(&mut relay, &mut ports, T0);
    let ask = |relay: &mut Relay, ports: &mut Ports, peers| {
        let request = client.request(METHOD_CREATE_PERMISSION, peers);
        let answer = reply(relay.handle_client(T0, tuple0(), &request, ports));
        code(&answer).unwrap_or(200)
    };
    assert_eq!(ask(&mut relay, &mut ports, loopback_peers(1, 3)), 200);
    // Refreshing what is installed, with one duplicate: still 4 distinct addresses.
    let mut again = loopback_peers(1, 3);
    again.extend(loopback_peers(4, 1));
    again.extend(loopback_peers(4, 1));
    assert_eq!(ask(&mut relay, &mut ports, again), 200);
    assert_eq!(udp(&relay).permissions, 4);
    // One more address, alone or among installed ones: refused, nothing added.
    assert_eq!(ask(&mut relay, &mut ports, loopback_peers(3, 3)), 508);
    assert_eq!(ask(&mut relay, &mut ports, loopback_peers(100, 1)), 508);
    assert_eq!(udp(&relay).permissions, 4);
    // A ChannelBind to a new address would install a permission too.
    let fifth: SocketAddr = "127.0.0.5:9".parse().unwrap();
    assert_eq!(
        code(&reply(relay.handle_client(T0, tuple0(), &bind_request(&client, 0x4000, fifth), &mut ports))),
        Some(508)
    );
    assert_eq!(udp(&relay).channels, 0);
    assert_eq!(relay.stats(Transport::Udp).permission_refusals, 3);
    // Once they expire there is room again.
    relay.expire(T0 + PERMISSION_LIFETIME_MS, &mut ports, &mut Vec::new());
    assert_eq!(udp(&relay).permissions, 0);
    let request = client.request(METHOD_CREATE_PERMISSION, loopback_peers(100, 4));
    let answer = reply(relay.handle_client(T0 + PERMISSION_LIFETIME_MS, tuple0(), &request, &mut ports));
    assert_eq!(answer.typ.class, CLASS_SUCCESS_RESPONSE);
}

#[test]
fn channels_past_the_cap_get_508_and_bound_ones_still_refresh() {
    let mut ports = Ports::default();
    let mut relay = relay(Settings { max_channels: 2, ..settings() });
    let client = allocate(&mut relay, &mut ports, T0);
    let bind = |relay: &mut Relay, ports: &mut Ports, number: u16, peer: &str| {
        let request = bind_request(&client, number, peer.parse().unwrap());
        code(&reply(relay.handle_client(T0, tuple0(), &request, ports))).unwrap_or(200)
    };
    assert_eq!(bind(&mut relay, &mut ports, 0x4000, "127.0.0.1:1"), 200);
    assert_eq!(bind(&mut relay, &mut ports, 0x4001, "127.0.0.1:2"), 200);
    assert_eq!(bind(&mut relay, &mut ports, 0x4002, "127.0.0.1:3"), 508);
    assert_eq!(bind(&mut relay, &mut ports, 0x4001, "127.0.0.1:2"), 200, "a refresh");
    assert_eq!(udp(&relay).channels, 2);
    assert_eq!(relay.stats(Transport::Udp).channel_refusals, 1);
}

#[test]
fn a_refreshed_permission_or_channel_expires_at_its_new_deadline_not_its_first() {
    let mut ports = Ports::default();
    let mut relay = relay(settings());
    let client = allocate(&mut relay, &mut ports, T0);
    let relay_addr = *ports.open.iter().next().unwrap();
    let later = T0 + 100_000;
    for now in [T0, later] {
        let request = bind_request(&client, 0x4000, peer());
        assert_eq!(
            reply(relay.handle_client(now, tuple0(), &request, &mut ports)).typ.class,
            CLASS_SUCCESS_RESPONSE
        );
    }
    let mut out = Vec::new();
    relay.expire(T0 + PERMISSION_LIFETIME_MS, &mut ports, &mut Vec::new());
    assert_eq!(udp(&relay).permissions, 1);
    assert!(relay.handle_peer(T0 + PERMISSION_LIFETIME_MS, relay_addr, peer(), b"x", &mut out).is_some());
    relay.expire(later + PERMISSION_LIFETIME_MS, &mut ports, &mut Vec::new());
    assert_eq!((udp(&relay).permissions, udp(&relay).channels), (0, 1));
    // The allocation (600 s from T0) is due before the channel (600 s from `later`), and its end
    // takes the channel's timer with it.
    assert_eq!(relay.next_deadline(), Some(T0 + 600_000));
    relay.expire(T0 + 600_000, &mut ports, &mut Vec::new());
    assert_eq!(relay.next_deadline(), None);
    assert_eq!(udp(&relay), Gauges::default());
}

#[test]
fn an_allocation_with_many_permissions_ends_with_all_its_timers() {
    let mut ports = Ports::default();
    let mut relay = relay(Settings { max_permissions: 1000, ..settings() });
    let client = allocate(&mut relay, &mut ports, T0);
    let request = client.request(METHOD_CREATE_PERMISSION, loopback_peers(1, 1000));
    assert_eq!(
        reply(relay.handle_client(T0, tuple0(), &request, &mut ports)).typ.class,
        CLASS_SUCCESS_RESPONSE
    );
    assert_eq!(udp(&relay).permissions, 1000);
    let refresh = client.request(METHOD_REFRESH, vec![Box::new(Lifetime(std::time::Duration::ZERO))]);
    reply(relay.handle_client(T0 + 1, tuple0(), &refresh, &mut ports));
    assert_eq!(udp(&relay), Gauges::default());
    assert_eq!(relay.next_deadline(), None, "no timer left behind");
}

fn tcp_tuple() -> FiveTuple {
    FiveTuple { transport: Transport::Tcp, ..tuple0() }
}

#[test]
fn a_stream_client_without_an_allocation_is_hung_up_on_after_the_allocate_timeout() {
    let mut ports = Ports::default();
    let mut relay = relay(settings());
    let mut hang_up = Vec::new();
    relay.stream_opened(T0, tcp_tuple());
    relay.expire(T0 + 59_999, &mut ports, &mut hang_up);
    assert!(hang_up.is_empty());
    relay.expire(T0 + 60_000, &mut ports, &mut hang_up);
    assert_eq!(hang_up, [tcp_tuple()]);
    assert_eq!(relay.stats(Transport::Tcp).unallocated_hang_ups, 1);
    check_bookkeeping(&relay);

    // A client that closes first leaves no timer behind.
    relay.stream_opened(T0, tcp_tuple());
    relay.close(tcp_tuple(), &mut ports);
    assert_eq!(relay.next_deadline(), None);
}

#[test]
fn a_stream_client_has_the_allocate_timeout_again_once_its_allocation_ends() {
    let mut ports = Ports::default();
    let mut relay = relay(settings());
    let mut hang_up = Vec::new();
    relay.stream_opened(T0, tcp_tuple());
    let mut client = Client::new(SECRET, "@alice:example.org", T0, 3600);
    client.nonce = Some(relay.nonces.issue(tcp_tuple().client.ip(), T0 / 1000));
    let at = T0 + 10_000;
    let allocate = client.request(METHOD_ALLOCATE, vec![transport()]);
    assert_eq!(
        reply(relay.handle_client(at, tcp_tuple(), &allocate, &mut ports)).typ.class,
        CLASS_SUCCESS_RESPONSE
    );
    relay.expire(T0 + 60_000, &mut ports, &mut hang_up);
    assert!(hang_up.is_empty(), "it allocated in time");
    // The allocation ends (refreshed to 0): the clock starts again from there.
    let end = T0 + 100_000;
    let refresh = client.request(METHOD_REFRESH, vec![Box::new(Lifetime(std::time::Duration::ZERO))]);
    reply(relay.handle_client(end, tcp_tuple(), &refresh, &mut ports));
    relay.expire(end + 59_999, &mut ports, &mut hang_up);
    assert!(hang_up.is_empty());
    relay.expire(end + 60_000, &mut ports, &mut hang_up);
    assert_eq!(hang_up, [tcp_tuple()]);
    // And the same when it expires rather than being refreshed away.
    let mut relay = relay_with_stream_allocation(&mut ports, &client);
    hang_up.clear();
    relay.expire(T0 + 600_000, &mut ports, &mut hang_up);
    assert!(hang_up.is_empty());
    relay.expire(T0 + 660_000, &mut ports, &mut hang_up);
    assert_eq!(hang_up, [tcp_tuple()]);
}

fn relay_with_stream_allocation(ports: &mut Ports, client: &Client) -> Relay {
    let mut relay = relay(settings());
    relay.stream_opened(T0, tcp_tuple());
    let allocate = client.request(METHOD_ALLOCATE, vec![transport()]);
    assert_eq!(
        reply(relay.handle_client(T0, tcp_tuple(), &allocate, ports)).typ.class,
        CLASS_SUCCESS_RESPONSE
    );
    relay
}

/// The attribute types the relay understands in requests.
const FUZZED_TYPES: [AttrType; 9] = [
    ATTR_XOR_PEER_ADDRESS,
    stun::attributes::ATTR_CHANNEL_NUMBER,
    stun::attributes::ATTR_LIFETIME,
    stun::attributes::ATTR_REQUESTED_TRANSPORT,
    stun::attributes::ATTR_EVEN_PORT,
    stun::attributes::ATTR_REQUESTED_ADDRESS_FAMILY,
    stun::attributes::ATTR_RESERVATION_TOKEN,
    stun::attributes::ATTR_DONT_FRAGMENT,
    ATTR_DATA,
];

/// A request of `method` with `attributes` as they are, then the client's credentials and a valid
/// MESSAGE-INTEGRITY over all of it.
fn signed(client: &Client, method: Method, attributes: &[(AttrType, Vec<u8>)]) -> Vec<u8> {
    let mut message = Message::new();
    message
        .build(&[
            Box::new(TransactionIdFrom(random_transaction_id())),
            Box::new(MessageType::new(method, CLASS_REQUEST)),
        ])
        .unwrap();
    for (typ, value) in attributes {
        message.add(*typ, value);
    }
    let credentials: [Box<dyn Setter>; 4] = [
        Box::new(TextAttribute::new(ATTR_USERNAME, client.username.clone())),
        Box::new(TextAttribute::new(ATTR_REALM, REALM.to_owned())),
        Box::new(TextAttribute::new(ATTR_NONCE, client.nonce.clone().unwrap())),
        Box::new(MessageIntegrity::new_long_term_integrity(
            client.username.clone(),
            REALM.to_owned(),
            client.password.clone(),
        )),
    ];
    for setter in credentials {
        setter.add_to(&mut message).unwrap();
    }
    message.raw
}

#[test]
fn fuzzed_attributes_of_authenticated_requests_reach_the_handlers_and_never_panic() {
    const ROUNDS: u64 = 20_000;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6175_7468);
    let mut ports = Ports::default();
    let mut relay = relay(Settings { max_permissions: 8, max_channels: 4, ..settings() });
    let client = allocate(&mut relay, &mut ports, T0);
    let attributes = |setters: Vec<Box<dyn Setter>>| -> Vec<(AttrType, Vec<u8>)> {
        let mut message = Message::new();
        for setter in setters {
            setter.add_to(&mut message).unwrap();
        }
        message.attributes.0.iter().map(|attribute| (attribute.typ, attribute.value.clone())).collect()
    };
    let samples = [
        (METHOD_CREATE_PERMISSION, attributes(loopback_peers(1, 3))),
        (
            METHOD_CHANNEL_BIND,
            attributes(vec![Box::new(turn::proto::channum::ChannelNumber(0x4000)), peer_attr(peer())]),
        ),
        (METHOD_REFRESH, attributes(vec![Box::new(Lifetime(std::time::Duration::from_secs(900)))])),
        (METHOD_ALLOCATE, attributes(vec![transport()])),
    ];
    let (mut answered_after_auth, mut successes, mut codes) = (0, 0, HashSet::new());
    for round in 0..ROUNDS {
        let (mut method, mut attributes) = samples[usize::try_from(round).unwrap() % samples.len()].clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..attributes.len().max(1));
            match rng.random_range(0..7) {
                0 if !attributes.is_empty() => {
                    let value = &mut attributes[at].1;
                    if !value.is_empty() {
                        let byte = rng.random_range(0..value.len());
                        value[byte] ^= rng.random_range(1..=u8::MAX);
                    }
                }
                1 if !attributes.is_empty() => {
                    let length = rng.random_range(0..=attributes[at].1.len());
                    attributes[at].1.truncate(length);
                }
                2 if !attributes.is_empty() => {
                    attributes[at].1.extend((0..rng.random_range(1..24)).map(|_| rng.random::<u8>()));
                }
                3 if !attributes.is_empty() => attributes[at].0 = FUZZED_TYPES[rng.random_range(0..9)],
                4 if !attributes.is_empty() => attributes.push(attributes[at].clone()),
                5 if !attributes.is_empty() => {
                    attributes.remove(at);
                }
                _ => {
                    method = [METHOD_CREATE_PERMISSION, METHOD_CHANNEL_BIND, METHOD_REFRESH, METHOD_ALLOCATE]
                        [rng.random_range(0..4)];
                }
            }
        }
        let now = T0 + round;
        let Action::Reply(bytes) =
            relay.handle_client(now, tuple0(), &signed(&client, method, &attributes), &mut ports)
        else {
            continue;
        };
        let answer = decode(&bytes);
        if answer.contains(stun::attributes::ATTR_MESSAGE_INTEGRITY) {
            answered_after_auth += 1;
        }
        match code(&answer) {
            None => successes += 1,
            Some(code) => {
                codes.insert(code);
            }
        }
        relay.expire(now, &mut ports, &mut Vec::new());
        check_bookkeeping(&relay);
    }
    // Past authentication (answers are signed), into every handler's parsing.
    assert!(
        answered_after_auth > ROUNDS * 3 / 4,
        "{answered_after_auth} of {ROUNDS} got past authentication"
    );
    assert!(successes > ROUNDS / 10, "{successes} successes");
    for expected in [400, 403, 437, 508] {
        assert!(codes.contains(&expected), "no {expected} among {codes:?}");
    }
    assert!(udp(&relay).permissions <= 8 && udp(&relay).channels <= 4);
    let binding = Client::new(SECRET, "x", T0, 60).request(METHOD_BINDING, vec![]);
    let answer = reply(relay.handle_client(T0 + ROUNDS, tuple0(), &binding, &mut ports));
    assert_eq!(answer.typ.class, CLASS_SUCCESS_RESPONSE);
}
