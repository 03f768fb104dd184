//! The point of the whole service, measured: a Raiden message and a Raiden payment over a data
//! channel against the same over Matrix, side by side in one run.
//!
//! - One real Synapse (WARNING logs) and `switchboard serve` (release build, SQLite, its embedded
//!   TURN relay on loopback with `allowed_peers = ["127.0.0.0/8"]`, as in deploy/local/up). Every
//!   client is a [`switchboard::client::Client`] in this process with its own Raiden identity,
//!   `/sync` and Matrix sends.
//! - **Paths**: (i) Matrix room messages: two `Client`s with no Switchboard and `fallback = room`
//!   (a private room per pair, as Raiden 2.x did: `PUT /rooms/{id}/send/m.room.message`, the
//!   receiver's `/sync`); (ii) Matrix to-device: two `Client`s with no Switchboard (the client's
//!   Raiden-format to-device batches, its acks); (iii) a data channel through the TURN
//!   relay (`relay_only`); (iv) a data channel direct: the two clients in network namespaces of
//!   the bench's own behind a router namespace (host candidates, a routed path; tests/common/netns.rs),
//!   reaching Synapse and Switchboard through TCP forwarders. (iv) is skipped with a line when the
//!   bench cannot make namespaces (not root, no `ip`).
//! - **Reference**: the same latency and throughput runs over the `webrtc` crate alone: two
//!   [`PeerLink`]s in this process joined on loopback host candidates, messages written to one and
//!   read from the other's events, with no delivery layer, driver or Matrix around them. It is the
//!   ceiling a client on this crate can reach on this machine.
//! - **One-way latency**: from before `send` to the receiving client's `Message` event, one message
//!   at a time, for 1,000- and 3,200-byte Raiden-shaped JSON; `SWITCHBOARD_BENCH_DC_MESSAGES`
//!   (default 1,000) over data channels, `SWITCHBOARD_BENCH_MATRIX_MESSAGES` (default 100) over
//!   Matrix, after a warm-up of a tenth.
//! - **Throughput**: `SWITCHBOARD_BENCH_DC_BURST` (default 20,000) messages over a data channel,
//!   `SWITCHBOARD_BENCH_MATRIX_BURST` (default 500) over Matrix, sent as fast as `send` takes them
//!   (the client batches what waits: up to 50 lines per Matrix send), counted until the last arrived.
//! - **Upgrade**: `open` → the opener's `ChannelUp` (the channel open and acknowledged alive),
//!   then `close` and both sides' `ChannelDown` before the next; `SWITCHBOARD_BENCH_UPGRADES`
//!   (default 20) per path.
//! - **Payment**: a 1-mediator payment's messages between three clients I, M, T: 8 one-way hops
//!   (LockedTransfer I→M, M→T; SecretRequest T→I; RevealSecret I→T, T→M, M→I; Unlock I→M, M→T),
//!   each sent when the previous hop arrived, every hop answered at once with its Delivered (226 B)
//!   and, for the balance proofs, a Processed (216 B): 20 messages, Raiden's sizes (LockedTransfer
//!   3.2 kB). Timed from the first send to the last of the 20 arriving; `SWITCHBOARD_BENCH_PAYMENTS`
//!   (default 50) over each data channel path, `SWITCHBOARD_BENCH_MATRIX_PAYMENTS` (default 20) over
//!   to-device. Around each run, the CPU seconds (user + system, /proc/PID/stat) of the Synapse
//!   and Switchboard processes, per payment.
//! - The chart (the CDFs of one-way latency at 3.2 kB and of payment time, per path) is written to
//!   `SWITCHBOARD_BENCH_CHART` (default docs/client-latency.png).
//! - `SWITCHBOARD_BENCH_LOG` (a `tracing` filter such as `bench=info,webrtc_ice=trace`): logs on
//!   stderr, each upgrade's start and end among them (to trace a slow one; slows every path).
//!
//! Run: `cargo bench --bench client` (after tests/run, which installs Synapse's venv, iproute2 and
//! the font).

// Counts, sizes and milliseconds far below 2^52.
#![allow(clippy::cast_precision_loss)]

#[path = "shared/cdf.rs"]
mod cdf;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "shared/coturn.rs"]
mod coturn;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdf::{percentile, sorted};
use plotters::style::RGBColor;
use serde_json::{Map, Value, json};
use switchboard::client::rtc::{Invite, LinkEvent, LinkEvents, PeerLink, RtcConfig, retain_candidates};
use switchboard::client::signal::IceServers;
use switchboard::client::{Client, ClientConfig, ClientEvent, Fallback, Path};
use switchboard::signalling::EventType;
use tokio::sync::mpsc;

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";
/// Longest wait for one message, one channel or one payment.
const WAIT: Duration = Duration::from_secs(30);
const SIZES: [usize; 2] = [1_000, 3_200];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}

/// A Raiden-shaped JSON message of exactly `size` bytes: `type`, the payment and hop it belongs
/// to, a message identifier, padding.
fn message(kind: &str, payment: usize, hop: usize, id: usize, size: usize) -> Bytes {
    let head = format!(
        r#"{{"type":"{kind}","payment":{payment},"hop":{hop},"message_identifier":"{id}","signature":"0x{:064x}","padding":""#,
        id * 7 + 3
    );
    let mut text = head.into_bytes();
    let fill = size.checked_sub(text.len() + 2).expect("size holds the head");
    text.extend((0..fill).map(|at| b"0123456789abcdef"[(at + id) % 16]));
    text.extend_from_slice(b"\"}");
    Bytes::from(text)
}

fn field(bytes: &[u8], name: &str) -> Value {
    let value: Value = serde_json::from_slice(bytes).expect("a JSON message");
    value[name].clone()
}

/// How a client reaches its peers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Way {
    /// Matrix only (no Switchboard), `fallback = room`: a private room per pair.
    Room,
    /// Matrix only: no Switchboard.
    ToDevice,
    /// Switchboard, relay-only ICE.
    Relay,
    /// Switchboard, host candidates, in a namespace of the LAN.
    Direct,
}

impl Way {
    /// Through Switchboard to a data channel (else Matrix only).
    fn upgrades(self) -> bool {
        matches!(self, Way::Relay | Way::Direct)
    }

    fn name(self) -> &'static str {
        match self {
            Way::Room => ROOM,
            Way::ToDevice => "Matrix to-device (Client)",
            Way::Relay => "data channel via TURN relay",
            Way::Direct => "data channel direct",
        }
    }
}

const ROOM: &str = "Matrix room message (Client)";
/// The reference: the `webrtc` crate alone, two `PeerLink`s on loopback, no client around them.
const BARE: &str = "webrtc crate alone (loopback)";
/// The same through Switchboard's TURN relay (relay-only ICE), and through coturn.
const BARE_SWITCHBOARD: &str = "webrtc crate alone via Switchboard's relay";
const BARE_COTURN: &str = "webrtc crate alone via coturn";

/// One client: its address, its handle, and its events stamped on arrival.
struct Peer {
    address: String,
    client: Client,
    events: mpsc::UnboundedReceiver<(Instant, ClientEvent)>,
}

impl Peer {
    async fn next(&mut self, what: &str) -> (Instant, ClientEvent) {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("{what} within {WAIT:?}"))
            .expect("the client's events ended")
    }

    async fn message(&mut self) -> (Instant, Bytes) {
        loop {
            if let (at, ClientEvent::Message { bytes, .. }) = self.next("a message").await {
                return (at, bytes);
            }
        }
    }

    async fn up(&mut self) -> (Instant, Path) {
        loop {
            if let (at, ClientEvent::ChannelUp { path, .. }) = self.next("a channel up").await {
                return (at, path);
            }
        }
    }

    async fn down(&mut self) {
        loop {
            if let (_, ClientEvent::ChannelDown { .. }) = self.next("a channel down").await {
                return;
            }
        }
    }

    async fn on_switchboard(&mut self) {
        loop {
            if let (_, ClientEvent::Switchboard { connected: true }) = self.next("Switchboard").await {
                return;
            }
        }
    }
}

struct Stack {
    synapse: common::Synapse,
    switchboard: common::Process,
    /// Switchboard's client URL.
    client_url: String,
    lan: Option<common::netns::Lan>,
    /// One runtime per LAN host (the clients placed there run on it).
    runtimes: Vec<tokio::runtime::Runtime>,
}

impl Stack {
    /// A client of a fresh Raiden user, connected; on the LAN's host `host` for [`Way::Direct`].
    async fn peer(&self, way: Way, host: usize) -> Peer {
        let raiden = self.synapse.register_raiden(CAPS).await;
        let mut config = ClientConfig::new(self.synapse.base_url.parse().unwrap(), &raiden.user.access_token);
        config.switchboard = way.upgrades().then(|| self.client_url.parse().unwrap());
        config.relay_only = way == Way::Relay;
        if way == Way::Room {
            config.fallback = Fallback::Room;
        }
        let connect = Client::connect(config);
        let (client, mut events) = if way == Way::Direct {
            self.runtimes[host].spawn(connect).await.unwrap()
        } else {
            connect.await
        }
        .expect("the client connects");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if tx.send((Instant::now(), event)).is_err() {
                    break;
                }
            }
        });
        let mut peer = Peer { address: raiden.address, client, events: rx };
        if way.upgrades() {
            peer.on_switchboard().await;
        }
        peer
    }

    /// Two clients with a channel from the first to the second (none over to-device).
    async fn pair(&self, way: Way) -> (Peer, Peer) {
        let mut a = self.peer(way, 0).await;
        let mut b = self.peer(way, 1).await;
        if way.upgrades() {
            a.client.open(&b.address).await.unwrap();
            let (_, path) = a.up().await;
            b.up().await;
            assert_eq!(path, if way == Way::Relay { Path::Relay } else { Path::Direct }, "{way:?}");
        }
        (a, b)
    }

    fn cpu_seconds(&self) -> (f64, f64) {
        (common::cpu_seconds(self.synapse.pid()), common::cpu_seconds(self.switchboard.pid()))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One-way latencies (ms, sorted) of `n` messages of `size` bytes from `a` to `b`, one at a time,
/// after `n / 10` unmeasured.
async fn latency(a: &Peer, b: &mut Peer, size: usize, n: usize) -> Vec<f64> {
    let warmup = n / 10;
    let mut out = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let bytes = message("LockedTransfer", 0, 0, i, size);
        let sent = Instant::now();
        a.client.send(&b.address, bytes.clone()).await.unwrap();
        let (at, got) = b.message().await;
        assert_eq!(got, bytes, "message {i} intact and in order");
        if i >= warmup {
            out.push(ms(at - sent));
        }
    }
    sorted(out)
}

/// UDP datagrams dropped so far: on the whole machine for want of receive-buffer room
/// (`RcvbufErrors` of /proc/net/snmp), and on this process's own sockets, the clients' (`drops` of
/// /proc/net/udp and udp6, for the sockets among /proc/self/fd).
fn udp_drops() -> (u64, u64) {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let machine = match (udp.next(), udp.next()) {
        (Some(names), Some(values)) => names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "RcvbufErrors")
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0),
        _ => 0,
    };
    let own_inodes: HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut own = 0;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let (Some(inode), Some(drops)) = (fields.get(9), fields.get(12))
                && own_inodes.contains(*inode)
            {
                own += drops.parse::<u64>().unwrap_or(0);
            }
        }
    }
    (machine, own)
}

/// Prints the datagrams dropped since `before` ([`udp_drops`]), if any.
fn report_drops(n: usize, size: usize, before: (u64, u64)) {
    let (machine, own) = udp_drops();
    let (machine, own) = (machine.saturating_sub(before.0), own.saturating_sub(before.1));
    if machine > 0 || own > 0 {
        println!(
            "  {n} × {size} B: the kernel dropped {machine} UDP datagrams (receive buffers full); \
             {own} at the clients' own sockets"
        );
    }
}

/// Messages per second of `n` messages of `size` bytes from `a` to `b`, sent as fast as `send`
/// takes them, until the last arrived (each checked in order).
async fn throughput(a: &Peer, b: &mut Peer, size: usize, n: usize) -> f64 {
    let client = a.client.clone();
    let to = b.address.clone();
    let drops = udp_drops();
    let started = Instant::now();
    let sending = tokio::spawn(async move {
        for i in 0..n {
            client.send(&to, message("LockedTransfer", 0, 0, i, size)).await.unwrap();
        }
    });
    for i in 0..n {
        let (_, got) = b.message().await;
        let id: usize = field(&got, "message_identifier").as_str().unwrap().parse().unwrap();
        assert_eq!(id, i, "message {i} in order");
    }
    let elapsed = started.elapsed();
    sending.await.unwrap();
    report_drops(n, size, drops);
    n as f64 / elapsed.as_secs_f64()
}

/// Only the loopback candidates of a signal: ICE then sends nothing beyond 127.0.0.1.
fn loopback_only(content: &Map<String, Value>) -> Map<String, Value> {
    let mut content = content.clone();
    retain_candidates(&mut content, |candidate| candidate.contains(" 127.0.0.1 "));
    content
}

/// Relay-only ICE through the TURN server on 127.0.0.1:`port`, with credentials under the test
/// secret (Switchboard's and coturn's REST scheme).
fn bare_relay_config(port: u16) -> RtcConfig {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let credentials =
        switchboard::turn::credentials::mint(common::TURN_SECRET.as_bytes(), "bench", now, 3600);
    let ice = IceServers {
        uris: vec![format!("turn:127.0.0.1:{port}?transport=udp")],
        username: credentials.username,
        password: credentials.password,
        ttl: credentials.ttl,
    };
    RtcConfig { ice_servers: Some(ice), relay_only: true, include_loopback: true, ..RtcConfig::default() }
}

/// Two bare [`PeerLink`]s with `config` joined on loopback, the signals handed across by hand,
/// once both channels are open: the caller, the answerer and the answerer's events (its messages).
async fn bare_pair(config: RtcConfig) -> (PeerLink, PeerLink, LinkEvents) {
    let (a, mut a_events, invite) = PeerLink::call(config.clone(), "A").await.unwrap();
    let invite = Invite::parse(&invite.call_id, &loopback_only(&invite.content)).unwrap();
    let (b, mut b_events, answer) = PeerLink::answer(config, "B", &invite).await.unwrap();
    let (mut a_open, mut b_open, mut answered) = (false, false, false);
    // The answerer's candidates, then its answer, go to the caller; the caller's candidates to
    // the answerer. Bounded: a pair opens within a few dozen events.
    for _ in 0..512 {
        if a_open && b_open {
            break;
        }
        let event = tokio::time::timeout(WAIT, async {
            tokio::select! {
                event = a_events.next() => (true, event),
                event = b_events.next() => (false, event),
            }
        })
        .await
        .expect("the bare pair opens");
        match event {
            (true, Some(LinkEvent::Signal(signal))) => {
                b.handle_signal(signal.event_type, &loopback_only(&signal.content)).await.unwrap();
            }
            (false, Some(LinkEvent::Signal(signal))) => {
                a.handle_signal(signal.event_type, &loopback_only(&signal.content)).await.unwrap();
                if !answered {
                    a.handle_signal(EventType::Answer, &loopback_only(&answer.content)).await.unwrap();
                    answered = true;
                }
            }
            (true, Some(LinkEvent::Open { .. })) => a_open = true,
            (false, Some(LinkEvent::Open { .. })) => b_open = true,
            other => panic!("bare pair: {other:?}"),
        }
    }
    assert!(a_open && b_open, "the bare pair opened");
    (a, b, b_events)
}

async fn bare_message(events: &mut LinkEvents) -> (Instant, Bytes) {
    match tokio::time::timeout(WAIT, events.next()).await.expect("a bare message") {
        Some(LinkEvent::Message(bytes)) => (Instant::now(), bytes),
        other => panic!("bare pair: {other:?}"),
    }
}

/// [`latency`] over the bare pair.
async fn bare_latency(a: &PeerLink, b: &mut LinkEvents, size: usize, n: usize) -> Vec<f64> {
    let warmup = n / 10;
    let mut out = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let bytes = message("LockedTransfer", 0, 0, i, size);
        let sent = Instant::now();
        a.send(bytes.clone()).await.unwrap();
        let (at, got) = bare_message(b).await;
        assert_eq!(got, bytes, "bare message {i} intact");
        if i >= warmup {
            out.push(ms(at - sent));
        }
    }
    sorted(out)
}

/// [`throughput`] over the bare pair (unordered channel: counted, not checked in order).
async fn bare_throughput(a: &PeerLink, b: &mut LinkEvents, size: usize, n: usize) -> f64 {
    let link = a.clone();
    let drops = udp_drops();
    let started = Instant::now();
    let sending = tokio::spawn(async move {
        for i in 0..n {
            link.send(message("LockedTransfer", 0, 0, i, size)).await.unwrap();
        }
    });
    for _ in 0..n {
        let (_, got) = bare_message(b).await;
        assert!(got.len() >= size, "a whole message");
    }
    let elapsed = started.elapsed();
    sending.await.unwrap();
    report_drops(n, size, drops);
    n as f64 / elapsed.as_secs_f64()
}

/// Upgrade times (ms, sorted): `open` → `ChannelUp` at the opener, `n` times.
async fn upgrades(a: &mut Peer, b: &mut Peer, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        // Each round starts with no channel: close, and both sides saw it go.
        a.client.close(&b.address).await.unwrap();
        a.down().await;
        b.down().await;
        let started = Instant::now();
        tracing::info!(target: "bench", "upgrade: open");
        a.client.open(&b.address).await.unwrap();
        let (at, _) = a.up().await;
        tracing::info!(target: "bench", ms = ms(at - started), "upgrade: channel up");
        b.up().await;
        out.push(ms(at - started));
    }
    sorted(out)
}

/// Who sends which hop of a payment.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Node {
    I,
    M,
    T,
}

/// The 8 hops of a 1-mediator payment: sender, receiver, type, size, and whether the receiver
/// answers with a Processed (balance proofs) besides its Delivered.
const HOPS: [(Node, Node, &str, usize, bool); 8] = [
    (Node::I, Node::M, "LockedTransfer", 3_200, true),
    (Node::M, Node::T, "LockedTransfer", 3_200, true),
    (Node::T, Node::I, "SecretRequest", 536, false),
    (Node::I, Node::T, "RevealSecret", 297, false),
    (Node::T, Node::M, "RevealSecret", 297, false),
    (Node::M, Node::I, "RevealSecret", 297, false),
    (Node::I, Node::M, "Unlock", 568, true),
    (Node::M, Node::T, "Unlock", 568, true),
];
const PAYMENT_MESSAGES: usize = 20;

/// The three nodes of a payment: their clients, their addresses, and all their messages in one
/// queue, each with the node that received it.
struct Payers {
    client: HashMap<Node, Client>,
    address: HashMap<Node, String>,
    arrivals: mpsc::UnboundedReceiver<(Node, Bytes)>,
}

impl Payers {
    fn new(nodes: HashMap<Node, Peer>) -> Payers {
        let (tx, arrivals) = mpsc::unbounded_channel();
        let mut client = HashMap::new();
        let mut address = HashMap::new();
        for (node, peer) in nodes {
            let Peer { address: peer_address, client: peer_client, mut events } = peer;
            client.insert(node, peer_client);
            address.insert(node, peer_address);
            let tx = tx.clone();
            // Ends when the client stops (its events end).
            tokio::spawn(async move {
                while let Some((_, event)) = events.recv().await {
                    if let ClientEvent::Message { bytes, .. } = event
                        && tx.send((node, bytes)).is_err()
                    {
                        break;
                    }
                }
            });
        }
        Payers { client, address, arrivals }
    }

    /// `n` payments one after the other, numbered from `first`; each one's time (ms, sorted).
    async fn pay(&mut self, n: usize, first: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(n);
        let mut id = 0;
        for payment in first..first + n {
            let started = Instant::now();
            let (from, to, kind, size, _) = HOPS[0];
            id += 1;
            self.client[&from].send(&self.address[&to], message(kind, payment, 0, id, size)).await.unwrap();
            let mut arrived = 0;
            while arrived < PAYMENT_MESSAGES {
                let (receiver, bytes) = tokio::time::timeout(WAIT, self.arrivals.recv())
                    .await
                    .unwrap_or_else(|_| panic!("payment {payment}: {arrived} of 20 messages within {WAIT:?}"))
                    .unwrap();
                arrived += 1;
                assert_eq!(field(&bytes, "payment"), json!(payment), "a message of this payment");
                let hop = usize::try_from(field(&bytes, "hop").as_u64().unwrap()).unwrap();
                let kind = field(&bytes, "type");
                if kind == "Processed" || kind == "Delivered" {
                    continue;
                }
                let (from, to, _, _, processed) = HOPS[hop];
                assert_eq!(to, receiver, "hop {hop} reached its receiver");
                // The receiver acknowledges, then sends the next hop.
                let (me, back) = (&self.client[&to], &self.address[&from]);
                if processed {
                    id += 1;
                    me.send(back, message("Processed", payment, hop, id, 216)).await.unwrap();
                }
                id += 1;
                me.send(back, message("Delivered", payment, hop, id, 226)).await.unwrap();
                if let Some(&(next_from, next_to, kind, size, _)) = HOPS.get(hop + 1) {
                    assert_eq!(next_from, to, "each hop leaves from where the last arrived");
                    id += 1;
                    me.send(&self.address[&next_to], message(kind, payment, hop + 1, id, size))
                        .await
                        .unwrap();
                }
            }
            out.push(ms(started.elapsed()));
        }
        sorted(out)
    }
}

struct PaymentRun {
    way: Way,
    times: Vec<f64>,
    synapse_cpu_ms: f64,
    switchboard_cpu_ms: f64,
}

async fn payment_run(stack: &Stack, way: Way, n: usize) -> PaymentRun {
    assert_eq!(HOPS.len() + HOPS.iter().map(|hop| 1 + usize::from(hop.4)).sum::<usize>(), PAYMENT_MESSAGES);
    let mut nodes = HashMap::new();
    for (host, node) in [Node::I, Node::M, Node::T].into_iter().enumerate() {
        nodes.insert(node, stack.peer(way, host).await);
    }
    if way.upgrades() {
        for (from, to) in [(Node::I, Node::M), (Node::M, Node::T), (Node::I, Node::T)] {
            let to_address = nodes[&to].address.clone();
            nodes[&from].client.open(&to_address).await.unwrap();
            nodes.get_mut(&from).unwrap().up().await;
            nodes.get_mut(&to).unwrap().up().await;
        }
    }
    let mut payers = Payers::new(nodes);
    // Warm-up: a tenth, unmeasured.
    payers.pay((n / 10).max(1), 0).await;
    let (synapse_before, switchboard_before) = stack.cpu_seconds();
    let times = payers.pay(n, 1_000).await;
    let (synapse_after, switchboard_after) = stack.cpu_seconds();
    for client in payers.client.values() {
        client.shutdown().await;
    }
    let per = |before: f64, after: f64| (after - before) * 1000.0 / n as f64;
    PaymentRun {
        way,
        times,
        synapse_cpu_ms: per(synapse_before, synapse_after),
        switchboard_cpu_ms: per(switchboard_before, switchboard_after),
    }
}

fn row(name: &str, values: &[f64]) -> String {
    format!(
        "| {name} | {:.3} | {:.3} | {:.3} | {} |",
        percentile(values, 50.0),
        percentile(values, 90.0),
        percentile(values, 99.0),
        values.len()
    )
}

fn main() {
    // `SWITCHBOARD_BENCH_LOG=webrtc_ice=trace`, say: the crates' logs on stderr (slows every path).
    if let Ok(filter) = std::env::var("SWITCHBOARD_BENCH_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run());
    // The namespaces' runtimes were shut down in `run`.
}

async fn run() {
    let dc_messages = env_usize("SWITCHBOARD_BENCH_DC_MESSAGES", 1_000);
    let matrix_messages = env_usize("SWITCHBOARD_BENCH_MATRIX_MESSAGES", 100);
    let dc_burst = env_usize("SWITCHBOARD_BENCH_DC_BURST", 20_000);
    let matrix_burst = env_usize("SWITCHBOARD_BENCH_MATRIX_BURST", 500);
    let upgrade_count = env_usize("SWITCHBOARD_BENCH_UPGRADES", 20);
    let dc_payments = env_usize("SWITCHBOARD_BENCH_PAYMENTS", 50);
    let matrix_payments = env_usize("SWITCHBOARD_BENCH_MATRIX_PAYMENTS", 20);
    let chart = std::env::var_os("SWITCHBOARD_BENCH_CHART")
        .map_or_else(|| common::repo_root().join("docs/client-latency.png"), PathBuf::from);

    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let Some((synapse, switchboard)) =
        common::synapse_and_process(dir.path(), &db, |toml| common::client_bench_toml(&toml)).await
    else {
        eprintln!("no Synapse venv: run deploy/synapse/install");
        return;
    };
    let client_url = format!("http://127.0.0.1:{}", switchboard.ports[1]);
    let mut lan = common::netns::Lan::create(3);
    if let Some(lan) = &mut lan {
        let synapse_port: u16 = synapse.base_url.rsplit(':').next().unwrap().parse().unwrap();
        lan.forward_tcp(synapse_port);
        lan.forward_tcp(switchboard.ports[1]);
    } else {
        eprintln!("direct data channel: skipped (no network namespaces: not root, or no `ip`)");
    }
    let runtimes =
        lan.as_ref().map_or_else(Vec::new, |lan| (0..lan.hosts()).map(|h| lan.runtime(h)).collect());
    let stack = Stack { synapse, switchboard, client_url, lan, runtimes };
    let mut ways = vec![Way::ToDevice, Way::Relay];
    if stack.lan.is_some() {
        ways.push(Way::Direct);
    }

    let mut lat: Vec<(String, usize, Vec<f64>)> = Vec::new();
    let mut thr: Vec<(String, usize, f64)> = Vec::new();
    let mut ups: Vec<(String, Vec<f64>)> = Vec::new();

    for way in std::iter::once(&Way::Room).chain(&ways) {
        let name = way.name();
        println!("{name}…");
        let (mut a, mut b) = stack.pair(*way).await;
        let (n, burst) =
            if way.upgrades() { (dc_messages, dc_burst) } else { (matrix_messages, matrix_burst) };
        for size in SIZES {
            lat.push((name.into(), size, latency(&a, &mut b, size, n).await));
            thr.push((name.into(), size, throughput(&a, &mut b, size, burst).await));
        }
        if way.upgrades() {
            ups.push((name.into(), upgrades(&mut a, &mut b, upgrade_count).await));
        }
        a.client.shutdown().await;
        b.client.shutdown().await;
    }

    // The references: the crate alone on loopback host candidates, and through each relay with
    // relay-only ICE, Switchboard's (the one the clients above used) and coturn, in this run.
    let coturn_port = common::free_port();
    let _coturn = coturn::start(coturn_port, common::TURN_SECRET, common::SERVER_NAME, &[]);
    let references = [
        (BARE, RtcConfig { include_loopback: true, ..RtcConfig::default() }),
        (BARE_SWITCHBOARD, bare_relay_config(stack.switchboard.turn_port.expect("the relay's port"))),
        (BARE_COTURN, bare_relay_config(coturn_port)),
    ];
    for (name, config) in references {
        println!("{name}…");
        let (a, b, mut b_events) = bare_pair(config).await;
        for size in SIZES {
            lat.push((name.into(), size, bare_latency(&a, &mut b_events, size, dc_messages).await));
            thr.push((name.into(), size, bare_throughput(&a, &mut b_events, size, dc_burst).await));
        }
        a.close().await;
        b.close().await;
    }

    let mut pays = Vec::new();
    for way in &ways {
        println!("payments {way:?}…");
        let n = if way.upgrades() { dc_payments } else { matrix_payments };
        pays.push(payment_run(&stack, *way, n).await);
    }

    report(&lat, &thr, &ups, &pays);

    let series: Vec<(String, Vec<f64>)> = lat
        .iter()
        .filter(|(_, size, _)| *size == 3_200)
        .map(|(name, _, v)| (name.clone(), v.clone()))
        .collect();
    let payment_series: Vec<(String, Vec<f64>)> =
        pays.iter().map(|r| (r.way.name().to_owned(), r.times.clone())).collect();
    match draw_chart(&chart, &series, &payment_series) {
        Ok(()) => println!("\nchart: {}", chart.display()),
        Err(error) => println!("\nchart not drawn: {error}"),
    }

    let Stack { synapse, switchboard, lan, runtimes, .. } = stack;
    for runtime in runtimes {
        runtime.shutdown_background();
    }
    drop((synapse, switchboard, lan));
}

/// The tables (Markdown, as in docs/benchmarks.md) and the ratios.
fn report(
    lat: &[(String, usize, Vec<f64>)],
    thr: &[(String, usize, f64)],
    ups: &[(String, Vec<f64>)],
    pays: &[PaymentRun],
) {
    println!("\n## One-way latency (ms), one message at a time\n");
    println!("| path | bytes | p50 | p90 | p99 | n |\n|---|---:|---:|---:|---:|---:|");
    for (name, size, values) in lat {
        println!("{}", row(&format!("{name} | {size}"), values));
    }
    println!("\n## Throughput (messages/s, one sender, one receiver)\n");
    println!("| path | bytes | messages/s | MB/s |\n|---|---:|---:|---:|");
    for (name, size, per_sec) in thr {
        println!("| {name} | {size} | {per_sec:.0} | {:.2} |", per_sec * *size as f64 / 1e6);
    }
    println!("\n## Ratios of p50 one-way latency\n");
    let p50 = |name: &str, size: usize| {
        lat.iter().find(|(n, s, _)| n == name && *s == size).map(|(_, _, v)| percentile(v, 50.0))
    };
    for size in SIZES {
        for dc in ["data channel via TURN relay", "data channel direct"] {
            let Some(dc_p50) = p50(dc, size) else { continue };
            for matrix in [Way::ToDevice.name(), ROOM] {
                if let Some(m) = p50(matrix, size) {
                    println!("{size} B: {matrix} / {dc} = {:.0}×", m / dc_p50);
                }
            }
        }
    }
    let per_sec =
        |name: &str, size: usize| thr.iter().find(|(n, s, _)| n == name && *s == size).map(|(_, _, v)| *v);
    // Each client path against the crate alone on the nearest path: through the same relay, and
    // (for direct) on loopback; then Switchboard's relay against coturn's, the crate alone on both.
    let pairs = [
        ("data channel via TURN relay", BARE_SWITCHBOARD),
        ("data channel direct", BARE),
        (BARE_SWITCHBOARD, BARE_COTURN),
        (BARE_COTURN, BARE),
    ];
    for size in SIZES {
        for (path, reference) in pairs {
            if let (Some(p), Some(rate), Some(ref_p50), Some(ref_rate)) =
                (p50(path, size), per_sec(path, size), p50(reference, size), per_sec(reference, size))
            {
                println!(
                    "{size} B: {path}: p50 {:.2}× that of the {reference}, throughput {:.0} % of it",
                    p / ref_p50,
                    100.0 * rate / ref_rate
                );
            }
        }
    }
    println!("\n## Upgrade: open → channel up (ms)\n");
    println!("| path | p50 | p90 | p99 | n |\n|---|---:|---:|---:|---:|");
    for (name, values) in ups {
        println!("{}", row(name, values));
    }
    println!("\n## Payment: 1 mediator, 8 hops, 20 messages, end to end (ms)\n");
    println!(
        "| path | p50 | p90 | p99 | n | Synapse CPU ms / payment | Switchboard CPU ms / payment |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for run in pays {
        println!(
            "{} {:.2} | {:.2} |",
            row(run.way.name(), &run.times),
            run.synapse_cpu_ms,
            run.switchboard_cpu_ms
        );
    }
    if let Some(matrix) = pays.iter().find(|r| r.way == Way::ToDevice) {
        for dc in pays.iter().filter(|r| r.way.upgrades()) {
            println!(
                "\npayment p50: to-device / {} = {:.0}×",
                dc.way.name(),
                percentile(&matrix.times, 50.0) / percentile(&dc.times, 50.0)
            );
        }
    }
}

/// Two panels of CDFs: one-way latency at 3.2 kB per path, payment time per path.
fn draw_chart(
    path: &std::path::Path,
    latency: &[(String, Vec<f64>)],
    payments: &[(String, Vec<f64>)],
) -> Result<(), Box<dyn std::error::Error>> {
    // One color per path in both panels.
    let color_of = |name: &str| match name {
        ROOM => RGBColor(200, 60, 40),
        "Matrix to-device (Client)" => RGBColor(230, 150, 30),
        "data channel via TURN relay" => RGBColor(40, 110, 200),
        BARE => RGBColor(120, 120, 120),
        BARE_SWITCHBOARD => RGBColor(110, 170, 230),
        BARE_COTURN => RGBColor(150, 90, 180),
        _ => RGBColor(30, 160, 90),
    };
    let latency: Vec<cdf::Series> =
        latency.iter().map(|(name, values)| (name.clone(), color_of(name), values.as_slice())).collect();
    let payments: Vec<cdf::Series> =
        payments.iter().map(|(name, values)| (name.clone(), color_of(name), values.as_slice())).collect();
    cdf::draw(
        path,
        (1400, 560),
        [
            ("One-way latency, 3.2 kB message (CDF)", latency),
            ("1-mediator payment, 20 messages (CDF)", payments),
        ],
    )
}
