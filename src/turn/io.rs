//! The relay's IO: a UDP socket and a TCP listener for clients (same port), a TLS listener when
//! configured, one UDP socket per
//! allocation towards peers, and the [`Relay`] state machine between them behind a mutex (held
//! for microseconds, never across an await).
//!
//! Sends never wait: a full socket buffer (or a TCP client's full queue) drops the packet, as the
//! network would. Closing a TCP connection deletes its allocation (RFC 8656 §3.1).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::server::{Action, FiveTuple, Relay, RelayPorts, Transport};

/// Largest datagram read (a TURN message carrying a full-size UDP payload fits).
const MAX_DATAGRAM: usize = 65_536;
/// Random ports tried in the range before an Allocate is refused with 508.
const PORT_ATTEMPTS: usize = 64;
/// Packets queued towards one TCP client before more are dropped.
const TCP_QUEUE: usize = 1024;
/// Time a TLS client has to finish its handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// A TCP client that sends nothing for this long is disconnected (its allocation, if any, had to be
/// refreshed within its lifetime anyway).
const TCP_IDLE: Duration = Duration::from_secs(3600);

/// Where relay sockets are bound.
#[derive(Debug, Clone, Copy)]
pub struct RelaySockets {
    /// The address relay sockets bind to (IPv4); IPv6 relays bind to `ipv6` when set.
    pub ipv4: IpAddr,
    pub ipv6: Option<IpAddr>,
    /// Inclusive port range.
    pub ports: (u16, u16),
}

/// The client-facing sockets of the relay.
pub struct Listeners {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
    pub tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
}

struct Shared {
    relay: Relay,
    ports: Ports,
    /// Queues towards connected TCP clients, by their address.
    stream_clients: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
}

struct Ports {
    config: RelaySockets,
    sockets: HashMap<SocketAddr, (Arc<UdpSocket>, JoinHandle<()>)>,
    /// The shared state, for the reader tasks of new relay sockets.
    state: Weak<Mutex<Shared>>,
    udp: Arc<UdpSocket>,
    shutdown: CancellationToken,
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
                    let socket = Arc::new(UdpSocket::from_std(socket)?);
                    let local = socket.local_addr()?;
                    let reader = tokio::spawn(read_peers(
                        socket.clone(),
                        self.state.clone(),
                        self.udp.clone(),
                        self.shutdown.clone(),
                    ));
                    self.sockets.insert(local, (socket, reader));
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

impl Shared {
    /// Hands a client's packet to the state machine and carries out the answer: a reply is
    /// returned (for the caller to send on the client's transport), relayed data is sent here.
    fn client_packet(&mut self, tuple: FiveTuple, packet: &[u8]) -> Option<Vec<u8>> {
        let Shared { relay, ports, .. } = self;
        match relay.handle_client(crate::unix_millis_u64(), tuple, packet, ports) {
            Action::None => None,
            Action::Reply(bytes) => Some(bytes),
            Action::Relay { relay, peer, data } => {
                if let Some((socket, _)) = ports.sockets.get(&relay) {
                    let _ = socket.try_send_to(&data, peer);
                }
                None
            }
        }
    }
}

/// Runs the relay on `listeners` until `shutdown`.
pub async fn serve(
    relay: Relay,
    listeners: Listeners,
    sockets: RelaySockets,
    metrics: Arc<crate::telemetry::Metrics>,
    shutdown: CancellationToken,
) {
    let udp = Arc::new(listeners.udp);
    let state = Arc::new_cyclic(|weak| {
        Mutex::new(Shared {
            relay,
            ports: Ports {
                config: sockets,
                sockets: HashMap::new(),
                state: weak.clone(),
                udp: udp.clone(),
                shutdown: shutdown.clone(),
            },
            stream_clients: HashMap::new(),
        })
    });
    let tasks = TaskTracker::new();
    tasks.spawn(expire(state.clone(), metrics, shutdown.clone()));
    tasks.spawn(accept_streams(listeners.tcp, None, state.clone(), tasks.clone(), shutdown.clone()));
    if let Some((listener, acceptor)) = listeners.tls {
        tasks.spawn(accept_streams(listener, Some(acceptor), state.clone(), tasks.clone(), shutdown.clone()));
    }
    serve_udp(&udp, &state, &shutdown).await;
    tasks.close();
    tasks.wait().await;
    let mut shared = lock(&state);
    let Shared { relay, ports, .. } = &mut *shared;
    relay.close_all(ports);
}

async fn serve_udp(udp: &UdpSocket, state: &Mutex<Shared>, shutdown: &CancellationToken) {
    let Ok(server) = udp.local_addr() else { return };
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let (length, client) = tokio::select! {
            () = shutdown.cancelled() => return,
            received = udp.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                // ICMP errors surface on the next read (e.g. ECONNREFUSED on Linux): keep going.
                Err(_) => continue,
            },
        };
        let tuple = FiveTuple { client, server, transport: Transport::Udp };
        let reply = lock(state).client_packet(tuple, &buffer[..length]);
        if let Some(reply) = reply {
            let _ = udp.try_send_to(&reply, client);
        }
    }
}

/// Accepts TCP clients (TLS ones when `tls` is given) until `shutdown`.
async fn accept_streams(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<Mutex<Shared>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let Ok(server) = listener.local_addr() else { return };
    loop {
        let (stream, client) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "turn.accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (state, shutdown) = (state.clone(), shutdown.clone());
        match &tls {
            None => {
                let tuple = FiveTuple { client, server, transport: Transport::Tcp };
                tasks.spawn(serve_stream(stream, tuple, state, shutdown));
            }
            Some(acceptor) => {
                let handshake = acceptor.accept(stream);
                tasks.spawn(async move {
                    if let Ok(Ok(stream)) = tokio::time::timeout(TLS_HANDSHAKE, handshake).await {
                        let tuple = FiveTuple { client, server, transport: Transport::Tls };
                        serve_stream(stream, tuple, state, shutdown).await;
                    }
                });
            }
        }
    }
}

/// Serves one stream client: frames STUN messages and ChannelData out of the byte stream.
async fn serve_stream<S>(stream: S, tuple: FiveTuple, state: Arc<Mutex<Shared>>, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (queue, mut queued) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
    lock(&state).stream_clients.insert(tuple.client, queue.clone());
    let writing = tokio::spawn(async move {
        while let Some(bytes) = queued.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut buffer: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; MAX_DATAGRAM];
    'connection: loop {
        let read = tokio::select! {
            () = shutdown.cancelled() => break,
            read = tokio::time::timeout(TCP_IDLE, reader.read(&mut chunk)) => read,
        };
        match read {
            Ok(Ok(0) | Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buffer.extend_from_slice(&chunk[..n]),
        }
        let mut start = 0;
        while let Some(length) = frame_length(&buffer[start..]) {
            if length > MAX_DATAGRAM {
                break 'connection; // not TURN: hang up
            }
            if buffer.len() - start < length {
                break;
            }
            let reply = lock(&state).client_packet(tuple, &buffer[start..start + length]);
            if let Some(reply) = reply {
                let _ = queue.try_send(reply);
            }
            start += length;
        }
        buffer.drain(..start);
    }
    let mut shared = lock(&state);
    shared.stream_clients.remove(&tuple.client);
    let Shared { relay, ports, .. } = &mut *shared;
    relay.close(tuple, ports);
    drop(shared);
    writing.abort();
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

/// Reads what peers send to one relay socket and forwards it to the client.
async fn read_peers(
    socket: Arc<UdpSocket>,
    state: Weak<Mutex<Shared>>,
    udp: Arc<UdpSocket>,
    shutdown: CancellationToken,
) {
    let Ok(relay_addr) = socket.local_addr() else { return };
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut framed = Vec::with_capacity(MAX_DATAGRAM);
    loop {
        let (length, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(_) => continue,
            },
        };
        let Some(state) = state.upgrade() else { return };
        let mut shared = lock(&state);
        let Some(tuple) = shared.relay.handle_peer(
            crate::unix_millis_u64(),
            relay_addr,
            peer,
            &buffer[..length],
            &mut framed,
        ) else {
            continue;
        };
        match tuple.transport {
            Transport::Udp => {
                drop(shared);
                let _ = udp.try_send_to(&framed, tuple.client);
            }
            Transport::Tcp | Transport::Tls => {
                if let Some(queue) = shared.stream_clients.get(&tuple.client) {
                    let _ = queue.try_send(framed.clone());
                }
            }
        }
    }
}

/// Drops expired allocations, permissions and channels, and publishes the metrics, every second.
async fn expire(
    state: Arc<Mutex<Shared>>,
    metrics: Arc<crate::telemetry::Metrics>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut published = Default::default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut shared = lock(&state);
        let Shared { relay, ports, .. } = &mut *shared;
        relay.expire(crate::unix_millis_u64(), ports);
        super::publish(&metrics.turn, relay, &mut published);
    }
}

fn lock(state: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::frame_length;

    #[test]
    fn stream_frames_are_stun_messages_or_padded_channel_data() {
        assert_eq!(frame_length(&[0x00, 0x01, 0x00, 0x08]), Some(28));
        assert_eq!(frame_length(&[0x40, 0x00, 0x00, 0x05]), Some(12), "4 + 5, padded to 8 + 4");
        assert_eq!(frame_length(&[0x40, 0x00, 0x00, 0x04]), Some(8));
        assert_eq!(frame_length(&[0xC0, 0, 0, 0]), Some(usize::MAX), "garbage");
        assert_eq!(frame_length(&[0x00, 0x01]), None, "header incomplete");
    }
}
