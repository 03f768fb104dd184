//! The relay over UDP: one listener socket for clients, one socket per allocation towards peers,
//! and the [`Relay`] state machine between them behind a mutex (held for microseconds, never
//! across an await).
//!
//! Sends never wait: a full socket buffer drops the datagram, as the network would.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::server::{Action, FiveTuple, Relay, RelayPorts, Transport};

/// Largest datagram read (a TURN message carrying a full-size UDP payload fits).
const MAX_DATAGRAM: usize = 65_536;
/// Random ports tried in the range before an Allocate is refused with 508.
const PORT_ATTEMPTS: usize = 64;

/// Where relay sockets are bound.
#[derive(Debug, Clone, Copy)]
pub struct RelaySockets {
    /// The address relay sockets bind to (IPv4); IPv6 relays bind to `ipv6` when set.
    pub ipv4: IpAddr,
    pub ipv6: Option<IpAddr>,
    /// Inclusive port range.
    pub ports: (u16, u16),
}

struct Shared {
    relay: Relay,
    ports: Ports,
}

struct Ports {
    config: RelaySockets,
    sockets: HashMap<SocketAddr, (Arc<UdpSocket>, JoinHandle<()>)>,
    /// Set once the state is shared, for the reader tasks of new relay sockets.
    state: std::sync::Weak<Mutex<Shared>>,
    listener: Arc<UdpSocket>,
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
                        self.listener.clone(),
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

/// Runs the UDP relay on `listener` until `shutdown`.
pub async fn serve(
    relay: Relay,
    listener: UdpSocket,
    sockets: RelaySockets,
    metrics: Arc<crate::telemetry::Metrics>,
    shutdown: CancellationToken,
) {
    let listener = Arc::new(listener);
    let Ok(server) = listener.local_addr() else { return };
    let state = Arc::new_cyclic(|weak| {
        Mutex::new(Shared {
            relay,
            ports: Ports {
                config: sockets,
                sockets: HashMap::new(),
                state: weak.clone(),
                listener: listener.clone(),
                shutdown: shutdown.clone(),
            },
        })
    });
    let expiry = tokio::spawn(expire(state.clone(), metrics, shutdown.clone()));
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let (length, client) = tokio::select! {
            () = shutdown.cancelled() => break,
            received = listener.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                // ICMP errors surface on the next read (e.g. ECONNREFUSED on Linux): keep going.
                Err(_) => continue,
            },
        };
        let tuple = FiveTuple { client, server, transport: Transport::Udp };
        let mut shared = lock(&state);
        let Shared { relay, ports } = &mut *shared;
        match relay.handle_client(crate::unix_millis_u64(), tuple, &buffer[..length], ports) {
            Action::None => {}
            Action::Reply(bytes) => {
                let _ = listener.try_send_to(&bytes, client);
            }
            Action::Relay { relay, peer, data } => {
                if let Some((socket, _)) = ports.sockets.get(&relay) {
                    let _ = socket.try_send_to(&data, peer);
                }
            }
        }
    }
    expiry.abort();
    let mut shared = lock(&state);
    let Shared { relay, ports } = &mut *shared;
    relay.close_all(ports);
}

/// Reads what peers send to one relay socket and forwards it to the client.
async fn read_peers(
    socket: Arc<UdpSocket>,
    state: std::sync::Weak<Mutex<Shared>>,
    listener: Arc<UdpSocket>,
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
        let client = {
            let mut shared = lock(&state);
            shared.relay.handle_peer(
                crate::unix_millis_u64(),
                relay_addr,
                peer,
                &buffer[..length],
                &mut framed,
            )
        };
        if let Some(tuple) = client {
            let _ = listener.try_send_to(&framed, tuple.client);
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
        let Shared { relay, ports } = &mut *shared;
        relay.expire(crate::unix_millis_u64(), ports);
        super::publish(&metrics.turn, relay, &mut published);
    }
}

fn lock(state: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}
