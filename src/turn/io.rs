//! The relay's IO, spread over the cores in shards. Each shard is a thread with its own
//! current-thread tokio runtime, its own [`Relay`] state and its own client-facing sockets (UDP,
//! TCP and, when configured, TLS), bound to the same addresses as the other shards' with
//! SO_REUSEPORT. The kernel hashes each client's 5-tuple to one shard's socket, so a client's packets
//! always reach the shard that holds its allocation, and the relay socket of that allocation is read
//! by the same shard: a packet never crosses threads, and a shard's lock is never contended (it only
//! satisfies `Send`). What shards must share, the quotas and the unauthenticated budget, is in
//! [`Limits`](super::limits::Limits).
//!
//! A relay socket is read by a small task of its shard, into the shard's one buffer: an idle
//! allocation costs a socket and a few hundred bytes, not a buffer of its own.
//!
//! Sends never wait: a full socket buffer (or a stream client's full backlog) drops the packet, as
//! the network would. Closing a TCP or TLS connection deletes its allocation (RFC 8656 §3.1); a
//! connection that goes `allocate_timeout` without one is closed (the state machine keeps that
//! timer and says when). Stream clients are told apart by their whole 5-tuple.
//!
//! Time comes from the [`Clock`] handed to [`serve`]: the shards read it once per batch of
//! datagrams, and their expiry tick sleeps on it.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Embedded;
use super::server::{Action, FiveTuple, Relay, RelayPorts, Transport};
use crate::clock::Clock;
use crate::telemetry::{ShardLabel, TransportLabel};

/// Largest datagram read (a TURN message carrying a full-size UDP payload fits).
const MAX_DATAGRAM: usize = 65_536;
/// Datagrams read from one socket before its task lets the shard's other tasks run.
const READ_BATCH: usize = 64;
/// Random ports tried in the range before an Allocate is refused with 508.
const PORT_ATTEMPTS: usize = 64;
/// Bytes waiting for one stream client before more packets towards it are dropped.
const STREAM_BACKLOG: usize = 256 * 1024;
/// Time a TLS client has to finish its handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// A stream client that sends nothing for this long is disconnected (its allocation, if any, had to
/// be refreshed within its lifetime anyway).
const STREAM_IDLE: Duration = Duration::from_secs(3600);
/// Receive and send buffer asked for the client-facing UDP sockets.
const CLIENT_SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Receive buffer of each allocation's relay socket (capped by the kernel's `net.core.rmem_max`).
const RELAY_SOCKET_BUFFER: usize = 1024 * 1024;
/// Pending connections per listener socket.
const LISTEN_BACKLOG: i32 = 1024;

/// Where relay sockets are bound.
#[derive(Debug, Clone, Copy)]
pub struct RelaySockets {
    /// The address relay sockets bind to (IPv4); IPv6 relays bind to `ipv6` when set.
    pub ipv4: IpAddr,
    pub ipv6: Option<IpAddr>,
    /// Inclusive port range.
    pub ports: (u16, u16),
}

/// The client-facing sockets of the relay: one set per shard, all bound to the same addresses.
pub struct Listeners {
    shards: Vec<ShardListeners>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

struct ShardListeners {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    tls: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Binds UDP and TCP on `listen` (port 0: the same free port for both) and TLS on `tls`, once
    /// per shard.
    pub fn bind(
        listen: SocketAddr,
        tls: Option<(SocketAddr, tokio_rustls::TlsAcceptor)>,
        shards: usize,
    ) -> std::io::Result<Self> {
        let context = |address: SocketAddr| {
            move |e: std::io::Error| {
                std::io::Error::new(e.kind(), format!("cannot listen on {address} (TURN): {e}"))
            }
        };
        // Port 0: UDP picks a free port, which TCP may find taken; try another a few times.
        let mut attempts = if listen.port() == 0 { 10 } else { 1 };
        let (udp, tcp) = loop {
            attempts -= 1;
            let udp = bind_udp(listen).map_err(context(listen))?;
            let bound = udp.local_addr()?;
            match bind_tcp(bound) {
                Ok(tcp) => break (udp, tcp),
                Err(error) if attempts == 0 => return Err(context(bound)(error)),
                Err(_) => {}
            }
        };
        let (tls_listener, acceptor) = match tls {
            Some((address, acceptor)) => (Some(bind_tcp(address).map_err(context(address))?), Some(acceptor)),
            None => (None, None),
        };
        let mut all = vec![ShardListeners { udp, tcp, tls: tls_listener }];
        for _ in 1..shards.max(1) {
            let first = &all[0];
            let (udp, tcp) = (first.udp.local_addr()?, first.tcp.local_addr()?);
            let tls = first.tls.as_ref().map(std::net::TcpListener::local_addr).transpose()?;
            all.push(ShardListeners {
                udp: bind_udp(udp).map_err(context(udp))?,
                tcp: bind_tcp(tcp).map_err(context(tcp))?,
                tls: tls.map(|address| bind_tcp(address).map_err(context(address))).transpose()?,
            });
        }
        Ok(Self { shards: all, tls: acceptor })
    }

    /// The UDP (and TCP) address clients reach.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shards[0].udp.local_addr()
    }

    /// The TLS listener's address, when there is one.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.shards[0].tls.as_ref().and_then(|listener| listener.local_addr().ok())
    }
}

/// A non-blocking socket with SO_REUSEPORT (so that every shard binds the same address).
fn reuse_port_socket(address: SocketAddr, kind: Type, protocol: Protocol) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(address), kind, Some(protocol))?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    Ok(socket)
}

fn bind_udp(address: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = reuse_port_socket(address, Type::DGRAM, Protocol::UDP)?;
    // Room for bursts from many clients (the kernel caps it at net.core.rmem_max/wmem_max).
    socket.set_recv_buffer_size(CLIENT_SOCKET_BUFFER)?;
    socket.set_send_buffer_size(CLIENT_SOCKET_BUFFER)?;
    Ok(socket.into())
}

fn bind_tcp(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = reuse_port_socket(address, Type::STREAM, Protocol::TCP)?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Runs the relay on `listeners`, one shard per listener set, until `shutdown`. A shard that fails
/// cancels `shutdown` (the process stops rather than serve some of its clients).
pub async fn serve(
    embedded: Embedded,
    listeners: Listeners,
    metrics: Arc<crate::telemetry::Metrics>,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let Embedded { settings, limits, sockets } = embedded;
    let waiting = TaskTracker::new();
    for (index, shard) in listeners.shards.into_iter().enumerate() {
        let (finished, outcome) = oneshot::channel();
        let relay = Relay::new(settings.clone(), limits.clone());
        let (tls, metrics, stop, clock) =
            (listeners.tls.clone(), metrics.clone(), shutdown.clone(), clock.clone());
        let spawned = std::thread::Builder::new().name(format!("turn-shard-{index}")).spawn(move || {
            let _ = finished.send(run_shard(index, relay, shard, tls, sockets, &clock, &metrics, &stop));
        });
        if let Err(error) = spawned {
            tracing::error!(%error, "turn.shard could not start; shutting down");
            shutdown.cancel();
            break;
        }
        let shutdown = shutdown.clone();
        waiting.spawn(async move {
            let error = match outcome.await {
                Ok(Ok(())) => return,
                Ok(Err(error)) => error.to_string(),
                Err(_) => "the shard's thread panicked".to_owned(),
            };
            tracing::error!(shard = index, %error, "turn.shard failed; shutting down");
            shutdown.cancel();
        });
    }
    waiting.close();
    waiting.wait().await;
}

/// Runs one shard on this thread until `shutdown`.
#[expect(clippy::too_many_arguments, reason = "one call site, which names each")]
fn run_shard(
    index: usize,
    relay: Relay,
    listeners: ShardListeners,
    tls: Option<tokio_rustls::TlsAcceptor>,
    sockets: RelaySockets,
    clock: &Clock,
    metrics: &crate::telemetry::Metrics,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let udp = Arc::new(UdpSocket::from_std(listeners.udp)?);
        let tcp = TcpListener::from_std(listeners.tcp)?;
        let tls = match (listeners.tls, tls) {
            (Some(listener), Some(acceptor)) => Some((TcpListener::from_std(listener)?, acceptor)),
            _ => None,
        };
        let shard = Shard::new(relay, sockets, udp.clone(), clock.clone());
        // Tasks end with the runtime, when this block returns.
        tokio::spawn(serve_udp(udp, shard.clone()));
        let counters = |transport: &'static str| {
            let label = TransportLabel { transport };
            StreamCounters {
                open: metrics.turn.connections.get_or_create(&label).clone(),
                refused: metrics.turn.connections_refused.get_or_create(&label).clone(),
            }
        };
        tokio::spawn(accept_streams(tcp, None, shard.clone(), clock.clone(), counters("tcp")));
        if let Some((listener, acceptor)) = tls {
            tokio::spawn(accept_streams(
                listener,
                Some(acceptor),
                shard.clone(),
                clock.clone(),
                counters("tls"),
            ));
        }
        let shard_label = ShardLabel { shard: u32::try_from(index).unwrap_or(u32::MAX) };
        let ticks = metrics.turn.shard_ticks.get_or_create(&shard_label).clone();
        expire_until(&shard, clock, metrics, &ticks, shutdown).await;
        Ok(())
    })
}

/// One shard's state: its allocations, their relay sockets, and its stream clients' backlogs.
struct Shard {
    relay: Relay,
    ports: Ports,
    /// Bytes waiting to be written to each stream (TCP, TLS) client, by its 5-tuple.
    streams: HashMap<FiveTuple, Backlog>,
    /// Where the shard reads the time.
    clock: Clock,
    /// What datagrams are read into, for every socket of the shard.
    buffer: Box<[u8]>,
    /// A peer's datagram framed for its client.
    framed: Vec<u8>,
}

/// Bytes for a stream client, and the writer task to wake.
struct Backlog {
    bytes: Vec<u8>,
    wake: Arc<Notify>,
}

impl Backlog {
    fn push(&mut self, frame: &[u8]) {
        if self.bytes.len() + frame.len() <= STREAM_BACKLOG {
            self.bytes.extend_from_slice(frame);
            self.wake.notify_one();
        }
    }
}

/// The relay sockets of one shard.
struct Ports {
    config: RelaySockets,
    sockets: HashMap<SocketAddr, (Arc<UdpSocket>, AbortHandle)>,
    /// The shard, for the reader tasks of new relay sockets.
    shard: Weak<Mutex<Shard>>,
    /// The shard's client-facing UDP socket (the address UDP clients reached).
    udp: Arc<UdpSocket>,
}

impl RelayPorts for Ports {
    fn open(&mut self, ipv6: bool, even: bool) -> std::io::Result<SocketAddr> {
        let ip = if ipv6 {
            self.config.ipv6.ok_or_else(|| std::io::Error::other("no IPv6 relay address configured"))?
        } else {
            self.config.ipv4
        };
        let (low, high) = self.config.ports;
        let mut last_error = std::io::Error::other("empty relay port range");
        for _ in 0..PORT_ATTEMPTS {
            let mut port = rand::random_range(low.max(1)..=high.max(1));
            if even && port % 2 == 1 {
                port = if port > low { port - 1 } else { port + 1 };
            }
            match std::net::UdpSocket::bind((ip, port)) {
                Ok(socket) => {
                    socket.set_nonblocking(true)?;
                    // A burst from the peer (a data channel's window, ≈ 100 packets) overflowed
                    // the kernel's default 208 KiB while the shard was busy: dropped packets make
                    // SCTP back off. The size is a cap, not memory held while idle.
                    socket2::SockRef::from(&socket).set_recv_buffer_size(RELAY_SOCKET_BUFFER)?;
                    // Runs on the shard's runtime: the Relay is only driven from the shard's tasks.
                    let socket = Arc::new(UdpSocket::from_std(socket)?);
                    let local = socket.local_addr()?;
                    let reader =
                        tokio::spawn(read_peers(socket.clone(), self.shard.clone(), self.udp.clone()));
                    self.sockets.insert(local, (socket, reader.abort_handle()));
                    return Ok(local);
                }
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    fn close(&mut self, relay: SocketAddr) {
        if let Some((_, reader)) = self.sockets.remove(&relay) {
            reader.abort();
        }
    }
}

impl Shard {
    fn new(relay: Relay, sockets: RelaySockets, udp: Arc<UdpSocket>, clock: Clock) -> Arc<Mutex<Shard>> {
        Arc::new_cyclic(|weak| {
            Mutex::new(Shard {
                relay,
                ports: Ports { config: sockets, sockets: HashMap::new(), shard: weak.clone(), udp },
                streams: HashMap::new(),
                clock,
                buffer: vec![0; MAX_DATAGRAM].into_boxed_slice(),
                framed: Vec::with_capacity(MAX_DATAGRAM),
            })
        })
    }

    /// Hands a client's packet to the state machine and carries out the answer: relayed data is
    /// sent here, a reply is returned for the caller to send on the client's transport.
    fn client_packet(
        relay: &mut Relay,
        ports: &mut Ports,
        now_ms: u64,
        tuple: FiveTuple,
        packet: &[u8],
    ) -> Option<Vec<u8>> {
        match relay.handle_client(now_ms, tuple, packet, ports) {
            Action::None => None,
            Action::Reply(bytes) => Some(bytes),
            Action::Relay { relay, peer, data } => {
                if let Some((socket, _)) = ports.sockets.get(&relay) {
                    send_to(socket, &data, peer);
                }
                None
            }
        }
    }
}

/// Reads the shard's client-facing UDP socket.
async fn serve_udp(udp: Arc<UdpSocket>, shard: Arc<Mutex<Shard>>) {
    let Ok(server) = udp.local_addr() else { return };
    loop {
        if udp.readable().await.is_err() {
            return;
        }
        let mut guard = lock(&shard);
        let Shard { relay, ports, buffer, clock, .. } = &mut *guard;
        for _ in 0..READ_BATCH {
            let (length, client) = match udp.try_recv_from(buffer) {
                Ok(received) => received,
                Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                // ICMP errors surface on the next read (e.g. ECONNREFUSED on Linux): keep going.
                Err(_) => continue,
            };
            // Read per datagram (a vDSO call): a batch can outlast a step of the clock, and a
            // request sent after the step must be judged at the new time.
            let now = clock.unix_millis_u64();
            let tuple = FiveTuple { client, server, transport: Transport::Udp };
            if let Some(reply) = Shard::client_packet(relay, ports, now, tuple, &buffer[..length]) {
                send_to(&udp, &reply, client);
            }
        }
    }
}

/// Reads what peers send to one relay socket and forwards it to the client.
async fn read_peers(socket: Arc<UdpSocket>, shard: Weak<Mutex<Shard>>, udp: Arc<UdpSocket>) {
    let Ok(relay_addr) = socket.local_addr() else { return };
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let Some(shard) = shard.upgrade() else { return };
        let mut guard = lock(&shard);
        let Shard { relay, streams, buffer, framed, clock, .. } = &mut *guard;
        let now = clock.unix_millis_u64();
        for _ in 0..READ_BATCH {
            let (length, peer) = match socket.try_recv_from(buffer) {
                Ok(received) => received,
                Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                Err(_) => continue,
            };
            let Some(tuple) = relay.handle_peer(now, relay_addr, peer, &buffer[..length], framed) else {
                continue;
            };
            match tuple.transport {
                Transport::Udp => {
                    send_to(&udp, framed, tuple.client);
                }
                Transport::Tcp | Transport::Tls => {
                    if let Some(backlog) = streams.get_mut(&tuple) {
                        backlog.push(framed);
                    }
                }
            }
        }
    }
}

/// The metrics of one shard's stream listener.
struct StreamCounters {
    /// Open connections, kept live (not published once a second like the relay's gauges).
    open: Gauge,
    /// Connections closed at once by [`Limits::open_connection`](super::limits::Limits::open_connection).
    refused: Counter,
}

/// Accepts TCP clients (TLS ones when `tls` is given).
async fn accept_streams(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shard: Arc<Mutex<Shard>>,
    clock: Clock,
    counters: StreamCounters,
) {
    let Ok(listening) = listener.local_addr() else { return };
    let limits = lock(&shard).relay.limits().clone();
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: pause rather than spin.
                tracing::warn!(%error, "turn.accept failed");
                clock.sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !limits.open_connection(client.ip()) {
            // Dropping the stream closes it.
            counters.refused.inc();
            continue;
        }
        counters.open.inc();
        let counted = Counted { limits: limits.clone(), source: client.ip(), open: counters.open.clone() };
        let _ = stream.set_nodelay(true);
        // The address the client reached (a wildcard listener has several).
        let server = stream.local_addr().unwrap_or(listening);
        let (shard, clock) = (shard.clone(), clock.clone());
        match &tls {
            None => {
                let tuple = FiveTuple { client, server, transport: Transport::Tcp };
                tokio::spawn(async move {
                    let _counted = counted;
                    serve_stream(stream, tuple, shard, clock).await;
                });
            }
            Some(acceptor) => {
                let handshake = acceptor.accept(stream);
                tokio::spawn(async move {
                    let _counted = counted;
                    let stream = tokio::select! {
                        handshake = handshake => handshake,
                        () = clock.sleep(TLS_HANDSHAKE) => return,
                    };
                    if let Ok(stream) = stream {
                        let tuple = FiveTuple { client, server, transport: Transport::Tls };
                        serve_stream(stream, tuple, shard, clock).await;
                    }
                });
            }
        }
    }
}

/// A stream connection counted in [`Limits`](super::limits::Limits) and the open-connections gauge
/// until it is dropped.
struct Counted {
    limits: Arc<super::limits::Limits>,
    source: IpAddr,
    open: Gauge,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.limits.close_connection(self.source);
        self.open.dec();
    }
}

/// Serves one stream client: frames STUN messages and ChannelData out of the byte stream, and
/// writes what the shard queues for it (replies and relayed data, in order).
async fn serve_stream<S>(stream: S, tuple: FiveTuple, shard: Arc<Mutex<Shard>>, clock: Clock)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let wake = Arc::new(Notify::new());
    {
        let mut guard = lock(&shard);
        let Shard { relay, streams, clock, .. } = &mut *guard;
        relay.stream_opened(clock.unix_millis_u64(), tuple);
        streams.insert(tuple, Backlog { bytes: Vec::new(), wake: wake.clone() });
    }
    let writing = async {
        let mut pending = Vec::new();
        loop {
            wake.notified().await;
            match lock(&shard).streams.get_mut(&tuple) {
                Some(backlog) => std::mem::swap(&mut backlog.bytes, &mut pending),
                None => return,
            }
            let written = match tuple.transport {
                Transport::Tls => write_frame_by_frame(&mut writer, &pending).await,
                _ => writer.write_all(&pending).await,
            };
            if written.is_err() || writer.flush().await.is_err() {
                return;
            }
            pending.clear();
        }
    };
    let reading = async {
        let mut inbound: Vec<u8> = Vec::with_capacity(4096);
        loop {
            inbound.reserve(4096);
            let read = tokio::select! {
                read = reader.read_buf(&mut inbound) => read,
                () = clock.sleep(STREAM_IDLE) => return,
            };
            if !matches!(read, Ok(n) if n > 0) {
                return;
            }
            let Some(consumed) = stream_frames(&shard, tuple, &inbound) else { return };
            inbound.drain(..consumed);
        }
    };
    tokio::select! {
        () = reading => {}
        () = writing => {}
    }
    let mut guard = lock(&shard);
    let Shard { relay, ports, streams, .. } = &mut *guard;
    streams.remove(&tuple);
    relay.close(tuple, ports);
}

/// Writes each queued frame with a write of its own, which rustls seals in a TLS record of its own.
/// The stream is still a byte stream, but coturn's `turnutils_uclient` (and clients built like it)
/// take what one `SSL_read` returns for one message and drop the rest of the record; coturn writes
/// one record per message too. Plain TCP writes the whole backlog at once.
async fn write_frame_by_frame<W>(writer: &mut W, mut frames: &[u8]) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    while let Some(length) = frame_length(frames) {
        let (frame, rest) = frames.split_at(length.min(frames.len()));
        writer.write_all(frame).await?;
        frames = rest;
    }
    Ok(())
}

/// Handles the complete frames at the start of `inbound`; the bytes they took, or `None` when the
/// stream is not TURN (hang up).
fn stream_frames(shard: &Mutex<Shard>, tuple: FiveTuple, inbound: &[u8]) -> Option<usize> {
    let mut guard = lock(shard);
    let Shard { relay, ports, streams, clock, .. } = &mut *guard;
    let now = clock.unix_millis_u64();
    let mut start = 0;
    while let Some(length) = frame_length(&inbound[start..]) {
        if length > MAX_DATAGRAM {
            return None;
        }
        if inbound.len() - start < length {
            break;
        }
        let frame = &inbound[start..start + length];
        if let Some(reply) = Shard::client_packet(relay, ports, now, tuple, frame)
            && let Some(backlog) = streams.get_mut(&tuple)
        {
            backlog.push(&reply);
        }
        start += length;
    }
    Some(start)
}

/// The length of the frame at the start of `bytes` (header known), padding included: a STUN
/// message (20-byte header + length) or ChannelData (4 + length, padded to 4 on streams).
fn frame_length(bytes: &[u8]) -> Option<usize> {
    let [first, _, high, low, ..] = *bytes else { return None };
    let length = usize::from(u16::from_be_bytes([high, low]));
    match first >> 6 {
        0 => Some(20 + length),
        1 => Some((4 + length).next_multiple_of(4)),
        // Neither: a length that closes the connection.
        _ => Some(usize::MAX),
    }
}

/// Drops expired allocations, permissions and channels, hangs up on the stream clients the relay
/// says went `allocate_timeout` without an allocation, and publishes the shard's metrics, every
/// second of `clock` until `shutdown`, counting each pass in `ticks`.
async fn expire_until(
    shard: &Mutex<Shard>,
    clock: &Clock,
    metrics: &crate::telemetry::Metrics,
    ticks: &Counter,
    shutdown: &CancellationToken,
) {
    let mut published = super::Published::default();
    let mut hang_up = Vec::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = clock.sleep(Duration::from_secs(1)) => {}
        }
        let mut guard = lock(shard);
        let Shard { relay, ports, streams, .. } = &mut *guard;
        relay.expire(clock.unix_millis_u64(), ports, &mut hang_up);
        for tuple in hang_up.drain(..) {
            if let Some(backlog) = streams.remove(&tuple) {
                tracing::debug!("turn.stream: no allocation within allocate_timeout_secs; hanging up");
                // The writer finds its entry gone and ends the connection.
                backlog.wake.notify_one();
            }
        }
        super::publish(&metrics.turn, relay, &mut published);
        // Under the lock: a reader that sees this pass knows it saw every packet handled before.
        ticks.inc();
    }
    // What this shard counted leaves the gauges with it.
    let mut guard = lock(shard);
    let Shard { relay, ports, .. } = &mut *guard;
    relay.close_all(ports);
    super::publish(&metrics.turn, relay, &mut published);
}

/// Sends a datagram without waiting: a full socket buffer drops it, as the network would. This goes
/// straight to the socket, past tokio's write readiness, which a new socket only learns at the
/// reactor's next turn (`try_send_to` would drop the first packets of a fresh allocation).
fn send_to(socket: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    let _ = socket2::SockRef::from(socket).send_to(bytes, &to.into());
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::AsyncWrite;

    use super::*;
    use super::{frame_length, write_frame_by_frame};
    use crate::turn::limits::Limits;
    use crate::turn::policy::PeerPolicy;
    use crate::turn::server::Settings;

    /// A Binding request (no attributes) with transaction id `id`.
    fn binding(id: u8) -> Vec<u8> {
        [&[0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42][..], &[id; 12]].concat()
    }

    /// Reads one STUN message from `stream`, within 5 s.
    async fn read_message(stream: &mut tokio::io::DuplexStream) -> Option<Vec<u8>> {
        let mut header = [0u8; 20];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut header)).await.ok()?.ok()?;
        let mut body = vec![0; usize::from(u16::from_be_bytes([header[2], header[3]]))];
        stream.read_exact(&mut body).await.ok()?;
        Some([&header[..], &body].concat())
    }

    #[tokio::test]
    async fn stream_clients_from_one_address_are_told_apart_by_their_whole_five_tuple() {
        let settings = Settings {
            realm: "example.org".to_owned(),
            secrets: vec![b"secret".to_vec()],
            policy: PeerPolicy::default(),
            nonce_key: [0; 32],
            nonce_lifetime_secs: 600,
            default_lifetime_secs: 600,
            max_lifetime_secs: 3600,
            bandwidth_bytes_per_sec: 0,
            external_ip: None,
            max_permissions: 1,
            max_channels: 1,
            allocate_timeout_ms: 60_000,
        };
        let relay = Relay::new(settings, Arc::new(Limits::new(1, 1, 0)));
        let udp = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let loopback = IpAddr::from([127, 0, 0, 1]);
        let sockets = RelaySockets { ipv4: loopback, ipv6: None, ports: (0, 0) };
        let clock = Clock::manual(1_700_000_000_000);
        let shard = Shard::new(relay, sockets, udp, clock.clone());
        // One client port on the TCP and on the TLS listener: two 5-tuples that share the client.
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let tcp = FiveTuple { client, server: "127.0.0.1:3478".parse().unwrap(), transport: Transport::Tcp };
        let tls = FiveTuple { server: "127.0.0.1:5349".parse().unwrap(), transport: Transport::Tls, ..tcp };
        let (mut over_tcp, tcp_end) = tokio::io::duplex(4096);
        let (mut over_tls, tls_end) = tokio::io::duplex(4096);
        tokio::spawn(serve_stream(tcp_end, tcp, shard.clone(), clock.clone()));
        let tls_served = tokio::spawn(serve_stream(tls_end, tls, shard.clone(), clock.clone()));
        tokio::task::yield_now().await;

        over_tcp.write_all(&binding(1)).await.unwrap();
        let answer =
            read_message(&mut over_tcp).await.expect("the TCP client's answer, on its own connection");
        assert_eq!((&answer[..2], &answer[8..20]), (&[0x01, 0x01][..], &[1; 12][..]));
        over_tls.write_all(&binding(2)).await.unwrap();
        let answer = read_message(&mut over_tls).await.expect("the TLS client's answer");
        assert_eq!(&answer[8..20], &[2; 12]);

        // One of them leaving does not take the other's connection state with it.
        drop(over_tls);
        tls_served.await.unwrap();
        over_tcp.write_all(&binding(3)).await.unwrap();
        let answer = read_message(&mut over_tcp).await.expect("the TCP client still answered");
        assert_eq!(&answer[8..20], &[3; 12]);
    }

    /// Keeps what each `poll_write` was given.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bytes: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.push(bytes.to_vec());
            Poll::Ready(Ok(bytes.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn tls_clients_get_each_frame_in_a_write_of_its_own() {
        let binding_success = [&[0x01, 0x01, 0x00, 0x04, 0x21, 0x12, 0xA4, 0x42][..], &[7; 16]].concat();
        let channel_data = [0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
        let second_channel_data = [0x40, 0x01, 0x00, 0x04, 9, 9, 9, 9];
        let backlog = [&binding_success[..], &channel_data, &second_channel_data].concat();
        let mut writes = Writes::default();
        write_frame_by_frame(&mut writes, &backlog).await.unwrap();
        assert_eq!(writes.0, [binding_success, channel_data.to_vec(), second_channel_data.to_vec()]);
    }

    #[test]
    fn stream_frames_are_stun_messages_or_padded_channel_data() {
        assert_eq!(frame_length(&[0x00, 0x01, 0x00, 0x08]), Some(28));
        assert_eq!(frame_length(&[0x40, 0x00, 0x00, 0x05]), Some(12), "4 + 5, padded to 8 + 4");
        assert_eq!(frame_length(&[0x40, 0x00, 0x00, 0x04]), Some(8));
        assert_eq!(frame_length(&[0xC0, 0, 0, 0]), Some(usize::MAX), "garbage");
        assert_eq!(frame_length(&[0x00, 0x01]), None, "header incomplete");
    }
}
