//! The connections of this instance: which sockets each user has, which addresses each socket
//! watches, and the queue of frames waiting for each socket's writer.
//!
//! Everything here is bounded: sockets by `max_connections` and `max_connections_per_user`, watched
//! addresses by `max_watched` per socket, and each socket's queue by `send_queue` (a socket that
//! does not drain it is closed rather than buffered without end).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::directory::identity::Address;

/// A frame for a socket's writer, and who waits until it is written.
pub struct Outbound {
    pub text: Arc<str>,
    pub written: Option<oneshot::Sender<()>>,
}

/// One socket as the rest of the instance reaches it.
#[derive(Clone)]
pub struct Outbox {
    pub id: u64,
    pub device_id: Option<Arc<str>>,
    queue: mpsc::Sender<Outbound>,
    /// Cancelled to close the socket; `close_code` says with which code.
    pub closing: CancellationToken,
    close_code: Arc<OnceLock<u16>>,
}

impl Outbox {
    /// Queues `text`; `written` is told once the writer has sent it. A full queue closes the socket
    /// (the client stopped reading) and returns false.
    pub fn push(&self, text: Arc<str>, written: Option<oneshot::Sender<()>>) -> bool {
        match self.queue.try_send(Outbound { text, written }) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(super::protocol::close::SLOW_CONSUMER);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues `text` as the socket's answer to its own client, waiting for room: a client that asks
    /// for much (a `watch` of many addresses) is slowed down, not closed. False once the socket is
    /// closing.
    pub async fn reply(&self, text: Arc<str>) -> bool {
        tokio::select! {
            sent = self.queue.send(Outbound { text, written: None }) => sent.is_ok(),
            () = self.closing.cancelled() => false,
        }
    }

    /// Closes the socket with `code` (the first code asked for wins).
    pub fn close(&self, code: u16) {
        let _ = self.close_code.set(code);
        self.closing.cancel();
    }

    /// The code the socket was closed with; `None`: by the service's shutdown.
    pub fn close_code(&self) -> Option<u16> {
        self.close_code.get().copied()
    }
}

/// A new socket's outbox and the receiving end of its queue (for its writer).
pub fn outbox(
    id: u64,
    device_id: Option<Arc<str>>,
    capacity: usize,
    shutdown: &CancellationToken,
) -> (Outbox, mpsc::Receiver<Outbound>) {
    let (queue, receiver) = mpsc::channel(capacity);
    let outbox = Outbox {
        id,
        device_id,
        queue,
        closing: shutdown.child_token(),
        close_code: Arc::new(OnceLock::new()),
    };
    (outbox, receiver)
}

/// Why a socket could not join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `max_connections` sockets are open on this instance.
    Instance,
    /// The user has `max_connections_per_user` sockets open.
    User,
}

#[derive(Default)]
struct State {
    /// Open sockets by user.
    users: HashMap<Arc<str>, Vec<Outbox>>,
    open: usize,
    /// Sockets watching each address.
    watchers: HashMap<Address, HashMap<u64, Outbox>>,
}

pub struct Hub {
    max_connections: usize,
    max_per_user: usize,
    next_id: AtomicU64,
    state: Mutex<State>,
}

impl Hub {
    pub fn new(max_connections: usize, max_per_user: usize) -> Self {
        Self { max_connections, max_per_user, next_id: AtomicU64::new(1), state: Mutex::default() }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh socket id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether another socket may open on this instance (checked before the upgrade; [`Hub::join`]
    /// checks again).
    pub fn has_room(&self) -> bool {
        self.state().open < self.max_connections
    }

    /// Registers `outbox` as a socket of `user_id`.
    pub fn join(&self, user_id: &Arc<str>, outbox: Outbox) -> Result<(), Full> {
        let mut state = self.state();
        if state.open >= self.max_connections {
            return Err(Full::Instance);
        }
        let sockets = state.users.entry(user_id.clone()).or_default();
        if sockets.len() >= self.max_per_user {
            if sockets.is_empty() {
                state.users.remove(user_id);
            }
            return Err(Full::User);
        }
        sockets.push(outbox);
        state.open += 1;
        Ok(())
    }

    /// Forgets socket `id` of `user_id` and every address it watched; returns the addresses that
    /// lost their last watcher.
    pub fn leave(&self, user_id: &str, id: u64, watched: &HashSet<Address>) -> Vec<Address> {
        let mut state = self.state();
        if let Some(sockets) = state.users.get_mut(user_id) {
            let before = sockets.len();
            sockets.retain(|outbox| outbox.id != id);
            let removed = before - sockets.len();
            if sockets.is_empty() {
                state.users.remove(user_id);
            }
            state.open -= removed;
        }
        watched.iter().filter(|address| unwatch_locked(&mut state, address, id)).copied().collect()
    }

    /// The open sockets of `user_id`.
    pub fn sockets_of(&self, user_id: &str) -> Vec<Outbox> {
        self.state().users.get(user_id).cloned().unwrap_or_default()
    }

    /// Whether `user_id` has a socket here.
    pub fn is_connected(&self, user_id: &str) -> bool {
        self.state().users.contains_key(user_id)
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.state().open
    }

    /// Adds `outbox` to the watchers of `address`; true when it is the address's first watcher.
    pub fn watch(&self, address: Address, outbox: &Outbox) -> bool {
        let mut state = self.state();
        let watchers = state.watchers.entry(address).or_default();
        let first = watchers.is_empty();
        watchers.insert(outbox.id, outbox.clone());
        first
    }

    /// Removes socket `id` from the watchers of `address`; true when that was the last watcher.
    pub fn unwatch(&self, address: &Address, id: u64) -> bool {
        unwatch_locked(&mut self.state(), address, id)
    }

    /// The sockets watching `address`.
    pub fn watchers(&self, address: &Address) -> Vec<Outbox> {
        self.state().watchers.get(address).map(|w| w.values().cloned().collect()).unwrap_or_default()
    }

    /// Every watched address with its watchers.
    pub fn all_watchers(&self) -> Vec<(Address, Vec<Outbox>)> {
        let state = self.state();
        state.watchers.iter().map(|(address, w)| (*address, w.values().cloned().collect())).collect()
    }

    /// Addresses with at least one watcher.
    pub fn watched_addresses(&self) -> usize {
        self.state().watchers.len()
    }
}

fn unwatch_locked(state: &mut State, address: &Address, id: u64) -> bool {
    let Some(watchers) = state.watchers.get_mut(address) else { return false };
    if watchers.remove(&id).is_none() {
        return false;
    }
    if watchers.is_empty() {
        state.watchers.remove(address);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(byte: u8) -> Address {
        Address::parse(&format!("0x{}", hex::encode([byte; 20]))).unwrap()
    }

    #[test]
    fn sockets_are_bounded_per_instance_and_per_user_and_released() {
        let hub = Hub::new(3, 2);
        let shutdown = CancellationToken::new();
        let (alice, bob): (Arc<str>, Arc<str>) = ("@a:x".into(), "@b:x".into());
        let socket = |id| outbox(id, None, 4, &shutdown).0;
        assert_eq!(hub.join(&alice, socket(1)), Ok(()));
        assert_eq!(hub.join(&alice, socket(2)), Ok(()));
        assert_eq!(hub.join(&alice, socket(3)), Err(Full::User));
        assert_eq!(hub.join(&bob, socket(4)), Ok(()));
        assert_eq!(hub.join(&bob, socket(5)), Err(Full::Instance));
        assert_eq!(hub.sockets_of("@a:x").len(), 2);
        hub.leave("@a:x", 1, &HashSet::new());
        assert_eq!(hub.open(), 2);
        assert_eq!(hub.join(&bob, socket(5)), Ok(()), "room again");
        hub.leave("@a:x", 2, &HashSet::new());
        assert!(!hub.is_connected("@a:x"));
    }

    #[test]
    fn watchers_are_per_address_and_forgotten_with_their_socket() {
        let hub = Hub::new(10, 10);
        let shutdown = CancellationToken::new();
        let (one, _) = outbox(1, None, 4, &shutdown);
        let (two, _) = outbox(2, None, 4, &shutdown);
        assert!(hub.watch(address(1), &one), "first watcher");
        assert!(!hub.watch(address(1), &two));
        assert!(hub.watch(address(2), &one));
        assert_eq!(hub.watchers(&address(1)).len(), 2);
        assert!(!hub.unwatch(&address(1), 2));
        let lost = hub.leave("@a:x", 1, &[address(1), address(2)].into_iter().collect());
        assert_eq!(lost.len(), 2, "both addresses lost their last watcher");
        assert_eq!(hub.watched_addresses(), 0);
    }

    #[test]
    fn a_full_queue_closes_the_socket_as_a_slow_consumer() {
        let shutdown = CancellationToken::new();
        let (socket, _receiver) = outbox(1, None, 2, &shutdown);
        assert!(socket.push("a".into(), None));
        assert!(socket.push("b".into(), None));
        assert!(!socket.push("c".into(), None));
        assert!(socket.closing.is_cancelled());
        assert_eq!(socket.close_code(), Some(super::super::protocol::close::SLOW_CONSUMER));
    }
}
