//! A raw STUN/TURN client (messages built byte by byte with the `stun` crate, sent over real UDP
//! sockets) against the embedded relay: every error code a client can meet, the data paths, the
//! closed peer policy, quotas across shards, the lifetime clamp, stale nonces, the per-source limit
//! of unauthenticated requests, the bandwidth cap and IPv6 relays; and over TCP, how long a
//! connection may go without an allocation, and how many one source may open.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::turn_client::{Client, WAIT, code, peer_attribute, relayed, success, udp};
use stun::attributes::{ATTR_DATA, ATTR_SOFTWARE, ATTR_UNKNOWN_ATTRIBUTES, AttrType};
use stun::message::{
    CLASS_REQUEST, Getter, METHOD_ALLOCATE, METHOD_BINDING, METHOD_CHANNEL_BIND, METHOD_REFRESH, Message,
    MessageType, Setter,
};
use stun::xoraddr::XorMappedAddress;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use turn::proto::channum::ChannelNumber;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::reqfamily::REQUESTED_FAMILY_IPV6;
use turn::proto::reqtrans::RequestedTransport;

/// Every attribute's padding is zero (CVE-2020-4067: a relay that leaked memory through padding).
fn padding_is_zero(raw: &[u8]) -> bool {
    let mut at = 20;
    while at + 4 <= raw.len() {
        let length = usize::from(u16::from_be_bytes([raw[at + 2], raw[at + 3]]));
        let padded = length.next_multiple_of(4);
        if raw.get(at + 4 + length..at + 4 + padded).is_none_or(|padding| padding.iter().any(|b| *b != 0)) {
            return false;
        }
        at += 4 + padded;
    }
    at == raw.len()
}

/// The relay metric `switchboard_turn_<name>` of UDP clients.
fn udp_metric(metrics: &str, name: &str) -> u64 {
    common::metric(metrics, &format!("switchboard_turn_{name}{{transport=\"udp\"}}"))
}

/// How many more a budget refilling at `per_sec` may have let through since `started` (rounded up,
/// plus one for the clock's granularity).
fn refilled_during(started: std::time::Instant, per_sec: f64) -> usize {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a few seconds at most
    let refilled = (started.elapsed().as_secs_f64() * per_sec).ceil() as usize;
    refilled + 1
}

/// Switchboard with the relay configured by `turn` (TOML lines added to the test `[turn]`).
async fn relay(dir: &std::path::Path, turn: &str) -> (common::Running, SocketAddr) {
    relay_on(dir, turn, switchboard::clock::Clock::system()).await
}

/// [`relay`] on `clock`.
async fn relay_on(
    dir: &std::path::Path,
    turn: &str,
    clock: switchboard::clock::Clock,
) -> (common::Running, SocketAddr) {
    let toml = common::config_toml(&common::sqlite_url(dir), "http://127.0.0.1:9", [0, 0, 0])
        .replace("allowed_peers = [\"127.0.0.0/8\"]\n", turn);
    let config = switchboard::config::Config::from_toml_str(&toml).expect("valid config");
    let running = common::start_with_clock(config, clock).await;
    let address = running.turn.expect("the embedded relay listens");
    (running, address)
}

#[tokio::test]
async fn unauthenticated_and_refused_requests_get_their_error_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (running, server) = relay(dir.path(), "unauthenticated_per_sec = 0\n").await;
    let mut alice = Client::new(server, "@alice:localhost").await;

    // Binding: the mapped address, no SOFTWARE, no amplification.
    let binding = alice.build(METHOD_BINDING, vec![], false);
    let (raw, answer) = alice.exchange(&binding).await.expect("a Binding answer");
    let mut mapped = XorMappedAddress::default();
    mapped.get_from(&answer).unwrap();
    assert_eq!(SocketAddr::new(mapped.ip, mapped.port), alice.local());
    assert!(!answer.contains(ATTR_SOFTWARE));
    assert!(raw.len() <= 3 * binding.len());

    // 420 names the unknown comprehension-required attribute.
    let mut odd = Message::new();
    odd.build(&[
        Box::new(stun::agent::TransactionId::new()),
        Box::new(MessageType::new(METHOD_BINDING, CLASS_REQUEST)),
    ])
    .unwrap();
    odd.add(AttrType(0x0042), &[1, 2, 3, 4]);
    odd.write_length();
    let (_, answer) = alice.exchange(&odd.raw).await.expect("an answer");
    assert_eq!(code(&answer), Some(420));
    assert_eq!(answer.get(ATTR_UNKNOWN_ATTRIBUTES).unwrap(), [0x00, 0x42]);

    // 400: an Allocate without REQUESTED-TRANSPORT; a method this relay does not offer (RFC 6062).
    let (_, answer) = alice.exchange(&alice.build(METHOD_ALLOCATE, vec![], false)).await.unwrap();
    assert_eq!(code(&answer), Some(400));
    let (_, answer) =
        alice.exchange(&alice.build(stun::message::METHOD_CONNECT, vec![], false)).await.unwrap();
    assert_eq!(code(&answer), Some(400));

    // 401: the challenge is small, padded with zeros and carries no SOFTWARE.
    let minimal = alice.build(METHOD_ALLOCATE, vec![udp()], false);
    let (raw, challenge) = alice.exchange(&minimal).await.unwrap();
    assert_eq!(code(&challenge), Some(401));
    assert!(raw.len() <= 3 * minimal.len(), "{} bytes for a {}-byte request", raw.len(), minimal.len());
    assert!(padding_is_zero(&raw), "{raw:?}");
    assert!(!challenge.contains(ATTR_SOFTWARE));
    alice.learn(&challenge);
    // 401: wrong secret, expired username.
    let mut mallory = Client::with_secret(server, "@mallory:localhost", b"not-the-secret", 600).await;
    let nonce_for = mallory.exchange(&mallory.build(METHOD_ALLOCATE, vec![udp()], false)).await.unwrap().1;
    mallory.learn(&nonce_for);
    assert_eq!(code(&mallory.request(METHOD_ALLOCATE, vec![udp()]).await), Some(401), "wrong secret");
    let mut late = Client::with_secret(server, "@late:localhost", common::TURN_SECRET.as_bytes(), -60).await;
    let nonce_for = late.exchange(&late.build(METHOD_ALLOCATE, vec![udp()], false)).await.unwrap().1;
    late.learn(&nonce_for);
    assert_eq!(code(&late.request(METHOD_ALLOCATE, vec![udp()]).await), Some(401), "expired username");
    // 442: only UDP relays.
    let tcp: Box<dyn Setter> = Box::new(RequestedTransport { protocol: turn::proto::PROTO_TCP });
    assert_eq!(code(&alice.request(METHOD_ALLOCATE, vec![tcp]).await), Some(442));

    let metrics = running.turn_metrics().await;
    assert_eq!(udp_metric(&metrics, "auth_failures_total"), 2);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn an_allocation_relays_both_ways_to_permitted_peers_only() {
    let dir = tempfile::tempdir().unwrap();
    let (running, server) = relay(dir.path(), "allowed_peers = [\"127.0.0.0/8\"]\n").await;
    let mut alice = Client::new(server, "@alice:localhost").await;
    // A lifetime above the maximum is clamped to 3600 s.
    let long: Box<dyn Setter> = Box::new(Lifetime(Duration::from_secs(100_000)));
    let allocated = alice.allocate(vec![long]).await;
    assert!(success(&allocated), "{allocated}");
    let mut lifetime = Lifetime::default();
    lifetime.get_from(&allocated).unwrap();
    assert_eq!(lifetime.0, Duration::from_secs(3600));
    let relay_address = relayed(&allocated);
    assert_eq!(relay_address.ip(), IpAddr::from([127, 0, 0, 1]));
    // 437: another Allocate on the same 5-tuple.
    assert_eq!(code(&alice.request(METHOD_ALLOCATE, vec![udp()]).await), Some(437));
    // 441: a request on alice's allocation with bob's credentials.
    let mut bob_here = Client::new(server, "@bob:localhost").await;
    bob_here.challenge.clone_from(&alice.challenge);
    let refresh = bob_here.build(METHOD_REFRESH, vec![], true);
    let (_, answer) = alice.exchange(&refresh).await.unwrap();
    assert_eq!(code(&answer), Some(441));

    // 403 for any denied peer, all or nothing; 443 for the other family; 400 for a bad channel.
    let peer_a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = (peer_a.local_addr().unwrap(), peer_b.local_addr().unwrap());
    for denied in ["10.0.0.1:5000", "169.254.169.254:80", "192.168.1.1:1", "224.0.0.1:5", "0.0.0.0:9"] {
        assert_eq!(code(&alice.permit(&[a, denied.parse().unwrap()]).await), Some(403), "{denied}");
    }
    assert_eq!(code(&alice.permit(&["[2001:4860::1]:5000".parse().unwrap()]).await), Some(443));
    let bind = |number: u16, peer: SocketAddr| -> Vec<Box<dyn Setter>> {
        vec![Box::new(ChannelNumber(number)), peer_attribute(peer)]
    };
    assert_eq!(code(&alice.request(METHOD_CHANNEL_BIND, bind(0x3FFF, a)).await), Some(400));
    assert_eq!(
        code(&alice.request(METHOD_CHANNEL_BIND, bind(0x4000, "10.1.1.1:1".parse().unwrap())).await),
        Some(403)
    );

    // Both XOR-PEER-ADDRESSes of one CreatePermission are installed: each peer gets data.
    assert!(success(&alice.permit(&[a, b]).await));
    alice.send_indication(a, b"to a").await;
    alice.send_indication(b, b"to b").await;
    let mut buffer = [0u8; 1500];
    for (peer, expected) in [(&peer_a, &b"to a"[..]), (&peer_b, &b"to b"[..])] {
        let (length, from) = tokio::time::timeout(WAIT, peer.recv_from(&mut buffer)).await.unwrap().unwrap();
        assert_eq!((&buffer[..length], from), (expected, relay_address));
    }
    // The peer's answer comes back as a Data indication naming it.
    peer_b.send_to(b"from b", relay_address).await.unwrap();
    let data = alice.receive().await.expect("a Data indication");
    let mut message = Message::new();
    message.raw = data;
    message.decode().unwrap();
    assert_eq!(message.get(ATTR_DATA).unwrap(), b"from b");
    let mut from = PeerAddress::default();
    from.get_from(&message).unwrap();
    assert_eq!(SocketAddr::new(from.ip, from.port), b);
    // Over a channel, both ways.
    assert!(success(&alice.request(METHOD_CHANNEL_BIND, bind(0x4001, a)).await));
    let mut frame = vec![0x40, 0x01, 0x00, 0x05];
    frame.extend_from_slice(b"hello");
    alice.socket.send_to(&frame, server).await.unwrap();
    let (length, _) = tokio::time::timeout(WAIT, peer_a.recv_from(&mut buffer)).await.unwrap().unwrap();
    assert_eq!(&buffer[..length], b"hello");
    peer_a.send_to(b"back", relay_address).await.unwrap();
    assert_eq!(alice.receive().await.expect("ChannelData"), [0x40, 0x01, 0x00, 0x04, b'b', b'a', b'c', b'k']);
    // A peer without a permission reaches nobody.
    let stranger = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    stranger.send_to(b"let me in", relay_address).await.unwrap();
    assert_eq!(alice.receive().await, None);

    let metrics = running.turn_metrics().await;
    assert_eq!(udp_metric(&metrics, "denied_peers_total"), 6, "{metrics}");
    assert_eq!(
        (
            udp_metric(&metrics, "allocations"),
            udp_metric(&metrics, "permissions"),
            udp_metric(&metrics, "channels")
        ),
        (1, 1, 1),
        "{metrics}"
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn quotas_hold_across_shards_and_stale_nonces_are_renewed() {
    let dir = tempfile::tempdir().unwrap();
    // A nonce lifetime of 1 s: a nonce is stale once its second is 2 s old.
    let turn = "user_quota = 2\ntotal_quota = 3\nnonce_lifetime_secs = 1\nunauthenticated_per_sec = 0\nthreads = 2\n";
    let clock = common::stepped_clock();
    let (running, server) = relay_on(dir.path(), turn, clock.clone()).await;
    let mut alice = Client::new(server, "@alice:localhost").await;
    assert!(success(&alice.allocate(vec![]).await));
    // 486 and 508: quotas count allocations on every shard (clients spread over both).
    let mut alice_2 = Client::new(server, "@alice:localhost").await;
    assert!(success(&alice_2.allocate(vec![]).await));
    let mut bob = Client::new(server, "@bob:localhost").await;
    assert!(success(&bob.allocate(vec![]).await));
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(code(&Client::new(server, "@alice:localhost").await.allocate(vec![]).await));
        answers.push(code(&Client::new(server, "@carol:localhost").await.allocate(vec![]).await));
    }
    assert_eq!(answers, [Some(486), Some(508)].repeat(4), "alice has 2, the relay 3");

    // 438 once the nonce is older than its lifetime, with a fresh one that works.
    clock.advance(Duration::from_millis(2100));
    let stale = alice.request(METHOD_REFRESH, vec![]).await;
    assert_eq!(code(&stale), Some(438));
    let before = alice.challenge.clone();
    alice.learn(&stale);
    assert_ne!(alice.challenge, before);
    assert!(success(&alice.request(METHOD_REFRESH, vec![]).await));

    // 437 once the allocation is deleted (Refresh with lifetime 0); its place is given back.
    let zero: Box<dyn Setter> = Box::new(Lifetime(Duration::ZERO));
    assert!(success(&alice.request(METHOD_REFRESH, vec![zero]).await));
    assert_eq!(code(&alice.permit(&["8.8.8.8:53".parse().unwrap()]).await), Some(437));
    assert_eq!(code(&alice.request(METHOD_REFRESH, vec![]).await), Some(437));
    let mut carol = Client::new(server, "@carol:localhost").await;
    assert!(success(&carol.allocate(vec![]).await), "room for one more");

    let metrics = running.turn_metrics().await;
    assert_eq!(udp_metric(&metrics, "allocations"), 3, "{metrics}");
    assert_eq!(udp_metric(&metrics, "quota_refusals_total"), 8, "{metrics}");
    assert_eq!(udp_metric(&metrics, "auth_failures_total"), 1, "the stale nonce: {metrics}");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn peers_on_loopback_and_private_networks_are_refused_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let (running, server) = relay(dir.path(), "relay_address_v6 = \"::1\"\n").await;
    let mut client = Client::new(server, "@alice:localhost").await;
    assert!(success(&client.allocate(vec![]).await));
    for denied in
        ["127.0.0.1:5000", "127.1.2.3:1", "10.0.0.1:1", "172.16.0.1:1", "100.64.0.1:1", "255.255.255.255:1"]
    {
        assert_eq!(code(&client.permit(&[denied.parse().unwrap()]).await), Some(403), "{denied}");
    }
    let mut v6 = Client::new(server, "@alice:localhost").await;
    let family: Box<dyn Setter> = Box::new(REQUESTED_FAMILY_IPV6);
    let allocated = v6.allocate(vec![family]).await;
    assert!(success(&allocated), "{allocated}");
    assert!(relayed(&allocated).is_ipv6());
    // IPv4 peers smuggled in IPv6 forms, and IPv6 ranges of the deny list.
    for denied in
        ["[::1]:1", "[::ffff:127.0.0.1]:1", "[::ffff:10.0.0.1]:1", "[::127.0.0.1]:1", "[64:ff9b::a00:1]:1"]
            .into_iter()
            .chain(["[fc00::1]:1", "[fe80::1]:1", "[ff02::1]:1", "[2001:db8::1]:1", "[::]:1"])
    {
        assert_eq!(code(&v6.permit(&[denied.parse().unwrap()]).await), Some(403), "{denied}");
    }
    // A public peer is allowed (nothing is sent to it).
    assert!(success(&client.permit(&["8.8.8.8:53".parse().unwrap()]).await));
    running.stop().await.unwrap();
}

#[tokio::test]
async fn an_ipv6_relay_carries_data_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let (running, server) =
        relay(dir.path(), "allowed_peers = [\"127.0.0.0/8\", \"::1/128\"]\nrelay_address_v6 = \"::1\"\n")
            .await;
    let mut client = Client::new(server, "@alice:localhost").await;
    let family: Box<dyn Setter> = Box::new(REQUESTED_FAMILY_IPV6);
    let allocated = client.allocate(vec![family]).await;
    let relay_address = relayed(&allocated);
    assert_eq!(relay_address.ip(), "::1".parse::<IpAddr>().unwrap());
    let peer = UdpSocket::bind("[::1]:0").await.unwrap();
    let peer_address = peer.local_addr().unwrap();
    assert_eq!(code(&client.permit(&["127.0.0.1:1".parse().unwrap()]).await), Some(443), "family mismatch");
    assert!(success(&client.permit(&[peer_address]).await));
    client.send_indication(peer_address, b"over IPv6").await;
    let mut buffer = [0u8; 1500];
    let (length, from) = tokio::time::timeout(WAIT, peer.recv_from(&mut buffer)).await.unwrap().unwrap();
    assert_eq!((&buffer[..length], from), (&b"over IPv6"[..], relay_address));
    running.stop().await.unwrap();
}

#[tokio::test]
async fn unauthenticated_requests_are_limited_per_source_address() {
    let dir = tempfile::tempdir().unwrap();
    let (running, server) = relay(dir.path(), "unauthenticated_per_sec = 5\n").await;
    let client = Client::new(server, "@alice:localhost").await;
    let started = std::time::Instant::now();
    for _ in 0..30 {
        client.socket.send_to(&client.build(METHOD_BINDING, vec![], false), server).await.unwrap();
    }
    let refilled = refilled_during(started, 5.0);
    let mut answered = 0;
    while client.receive().await.is_some() {
        answered += 1;
    }
    assert!((10..=10 + refilled).contains(&answered), "a burst of twice the rate, not {answered} of 30");
    // Another source address is not held back by the first one's flood.
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    other.send_to(&client.build(METHOD_BINDING, vec![], false), server).await.unwrap();
    let mut buffer = [0u8; 1500];
    assert!(
        tokio::time::timeout(WAIT, other.recv_from(&mut buffer)).await.is_ok(),
        "another source is answered"
    );
    // The first is answered again once its budget refills.
    assert!(client.exchange(&client.build(METHOD_BINDING, vec![], false)).await.is_some());
    let metrics = running.metrics().await;
    assert!(udp_metric(&metrics, "rate_limited_total") >= 18);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn each_allocation_is_held_to_its_bandwidth() {
    let dir = tempfile::tempdir().unwrap();
    let turn = "allowed_peers = [\"127.0.0.0/8\"]\nbandwidth_bytes_per_sec = 20000\n";
    let (running, server) = relay(dir.path(), turn).await;
    let mut client = Client::new(server, "@alice:localhost").await;
    assert!(success(&client.allocate(vec![]).await));
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_address = peer.local_addr().unwrap();
    let bind: Vec<Box<dyn Setter>> = vec![Box::new(ChannelNumber(0x4000)), peer_attribute(peer_address)];
    assert!(success(&client.request(METHOD_CHANNEL_BIND, bind).await));
    let mut frame = vec![0x40, 0x00, 0x03, 0xE8]; // 1000 bytes
    frame.resize(1004, 0xAB);
    let started = std::time::Instant::now();
    for _ in 0..100 {
        client.socket.send_to(&frame, server).await.unwrap();
    }
    let refilled = refilled_during(started, 20.0);
    let mut received = 0;
    let mut buffer = [0u8; 1500];
    while tokio::time::timeout(Duration::from_millis(500), peer.recv_from(&mut buffer)).await.is_ok() {
        received += 1;
    }
    // 20,000 bytes of budget, plus what refills while the burst is sent.
    assert!((20..=20 + refilled).contains(&received), "{received} of 100 packets of 1000 bytes relayed");
    let metrics = running.turn_metrics().await;
    let dropped = udp_metric(&metrics, "over_bandwidth_dropped_total");
    let relayed = common::metric(
        &metrics,
        r#"switchboard_turn_relayed_packets_total{transport="udp",direction="to_peer"}"#,
    );
    assert_eq!(relayed, received as u64, "what the relay sent arrived: {metrics}");
    // A loaded machine may lose some of the burst on its way in (a full socket buffer); what reached
    // the relay beyond the budget was dropped and counted.
    assert!((50..=100).contains(&(relayed + dropped)), "{relayed} relayed, {dropped} dropped: {metrics}");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn relayed_addresses_follow_the_port_range_and_the_external_address_and_old_secrets_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let old_secret = "an-old-turn-secret-ooooooooooooooooooooooooooooooooooooo";
    let turn = format!(
        "allowed_peers = [\"127.0.0.0/8\"]\nrelay_port_min = 50100\nrelay_port_max = 50139\n\
         external_address = \"198.51.100.7\"\nold_shared_secrets = [\"{old_secret}\"]\n"
    );
    let (running, server) = relay(dir.path(), &turn).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_address = peer.local_addr().unwrap();
    for secret in [common::TURN_SECRET, old_secret] {
        let mut client = Client::with_secret(server, "@alice:localhost", secret.as_bytes(), 600).await;
        let allocated = client.allocate(vec![]).await;
        assert!(success(&allocated), "credentials of {secret}: {allocated}");
        let advertised = relayed(&allocated);
        assert_eq!(advertised.ip(), IpAddr::from([198, 51, 100, 7]), "the external address");
        assert!((50100..=50139).contains(&advertised.port()), "{advertised}");
        // The relay socket itself is on the relay address, at the advertised port.
        assert!(success(&client.permit(&[peer_address]).await));
        client.send_indication(peer_address, b"via the range").await;
        let mut buffer = [0u8; 1500];
        let (length, from) = tokio::time::timeout(WAIT, peer.recv_from(&mut buffer)).await.unwrap().unwrap();
        assert_eq!((&buffer[..length], from.port()), (&b"via the range"[..], advertised.port()));
    }
    running.stop().await.unwrap();
}

/// Sends `bytes` on a TCP connection and reads the STUN message that answers.
async fn stream_exchange(stream: &mut TcpStream, bytes: &[u8]) -> Message {
    stream.write_all(bytes).await.unwrap();
    let mut raw = vec![0u8; 20];
    tokio::time::timeout(WAIT, stream.read_exact(&mut raw)).await.expect("a header in time").unwrap();
    let length = usize::from(u16::from_be_bytes([raw[2], raw[3]]));
    raw.resize(20 + length, 0);
    tokio::time::timeout(WAIT, stream.read_exact(&mut raw[20..])).await.expect("a body in time").unwrap();
    let mut message = Message::new();
    message.raw = raw;
    message.decode().expect("a STUN message");
    message
}

/// Whether the relay closes `stream` within `within` (nothing else arrives on it here).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 512];
    matches!(tokio::time::timeout(within, stream.read(&mut buffer)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn tcp_clients_are_hung_up_after_the_allocate_timeout_without_an_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let toml = common::config_toml(&common::sqlite_url(dir.path()), "http://127.0.0.1:9", [0, 0, 0]).replace(
        "allowed_peers = [\"127.0.0.0/8\"]\n",
        "allowed_peers = [\"127.0.0.0/8\"]\nallocate_timeout_secs = 300\n",
    );
    let config = switchboard::config::Config::from_toml_str(&toml).expect("valid config");
    // Stepped time: the relay's expiry tick and allocate timeout run on this clock.
    let clock = common::stepped_clock();
    let running = common::start_with_clock(config, clock.clone()).await;
    let server = running.turn.expect("the embedded relay listens");
    let mut unallocated = TcpStream::connect(server).await.unwrap();
    let mut allocating = TcpStream::connect(server).await.unwrap();
    // The client's messages and credentials; its UDP socket stays unused.
    let mut client = Client::new(server, "@alice:localhost").await;
    // Both connections are served (so both are registered) before the clock moves.
    let binding = stream_exchange(&mut unallocated, &client.build(METHOD_BINDING, vec![], false)).await;
    assert!(success(&binding), "{binding}");
    let challenge =
        stream_exchange(&mut allocating, &client.build(METHOD_ALLOCATE, vec![udp()], false)).await;
    assert_eq!(code(&challenge), Some(401));
    client.learn(&challenge);
    let allocated = stream_exchange(&mut allocating, &client.build(METHOD_ALLOCATE, vec![udp()], true)).await;
    assert!(success(&allocated), "{allocated}");

    // A wall clock would take 300 s; this one is stepped. Just before the timeout: still served.
    // (The relay looks once per second of its clock, hence the second steps of 1 s.)
    clock.advance(Duration::from_millis(299_999));
    let binding = stream_exchange(&mut unallocated, &client.build(METHOD_BINDING, vec![], false)).await;
    assert!(success(&binding), "still served before the timeout: {binding}");
    clock.advance(Duration::from_secs(1));
    assert!(closed_within(&mut unallocated, WAIT).await, "hung up once the timeout passed");
    // The allocated connection outlives the timeout and is still served.
    let binding = stream_exchange(&mut allocating, &client.build(METHOD_BINDING, vec![], false)).await;
    assert!(success(&binding), "{binding}");
    // Deleting the allocation starts the timeout again.
    let zero: Box<dyn Setter> = Box::new(Lifetime(Duration::ZERO));
    let deleted = stream_exchange(&mut allocating, &client.build(METHOD_REFRESH, vec![zero], true)).await;
    assert!(success(&deleted), "{deleted}");
    clock.advance(Duration::from_millis(299_999));
    let binding = stream_exchange(&mut allocating, &client.build(METHOD_BINDING, vec![], false)).await;
    assert!(success(&binding), "still served before the timeout: {binding}");
    clock.advance(Duration::from_secs(1));
    assert!(closed_within(&mut allocating, WAIT).await, "hung up once unallocated for the timeout");
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_turn_allocate_timeouts_total{transport=\"tcp\"}"), 2);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn tcp_connections_are_limited_per_source_address_and_in_all() {
    let dir = tempfile::tempdir().unwrap();
    let turn = "allowed_peers = [\"127.0.0.0/8\"]\nconnections_per_source = 3\nmax_connections = 4\n";
    let (running, server) = relay(dir.path(), turn).await;
    let metrics_url = running.ops_url("/metrics");
    // The open-connections gauge is kept live: it shows when the relay has counted a connection.
    let open_connections = |wanted: u64| {
        let metrics_url = metrics_url.clone();
        common::eventually(WAIT, "the open TCP connections gauge", move || {
            let metrics_url = metrics_url.clone();
            async move {
                let text = reqwest::get(&metrics_url).await.ok()?.text().await.ok()?;
                (common::metric(&text, r#"switchboard_turn_connections{transport="tcp"}"#) == wanted)
                    .then_some(())
            }
        })
    };
    let from = |source: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        socket.connect(server).await.unwrap()
    };
    let (first, second) = ([127, 0, 0, 1], [127, 0, 0, 2]);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(from(first).await);
    }
    open_connections(3).await;
    let mut fourth = from(first).await;
    assert!(closed_within(&mut fourth, WAIT).await, "a fourth connection from one source is closed");
    // Another source has its own count, up to max_connections in all.
    open.push(from(second).await);
    open_connections(4).await;
    let mut fifth = from(second).await;
    assert!(closed_within(&mut fifth, WAIT).await, "a fifth connection in all is closed");
    for stream in &mut open {
        assert!(!closed_within(stream, Duration::from_millis(100)).await, "the first four stay open");
    }
    // Closing one makes room for another, once the relay has seen it close.
    drop(open.remove(0));
    open_connections(3).await;
    let mut again = from(second).await;
    open_connections(4).await;
    assert!(!closed_within(&mut again, Duration::from_millis(100)).await, "admitted after one closed");
    let metrics = running.metrics().await;
    let refused = common::metric(&metrics, r#"switchboard_turn_connections_refused_total{transport="tcp"}"#);
    assert_eq!(refused, 2, "{metrics}");
    drop((open, again));
    open_connections(0).await;
    running.stop().await.unwrap();
}
