//! The signalling service: routes clients' signals to their peers (a socket on this instance, else
//! Matrix), hands signals that arrive through Matrix to connected clients, and pushes presence to
//! the sockets that watch an address.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hashlink::LruCache;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Signal;
use super::dialect::{self, Dialect};
use super::hub::Hub;
use super::protocol::{ErrorCode, IceServers, ServerFrame, Via};
use crate::appservice::inbox::Subscription;
use crate::clock::Clock;
use crate::config::{Config, Secret, SignallingConfig};
use crate::directory::identity::Address;
use crate::directory::service::DirectoryService;
use crate::homeserver::HomeserverClient;
use crate::http::Auth;
use crate::telemetry::{Metrics, ViaLabel};

/// The consumer name of the signalling service in the inbox.
pub const CONSUMER: &str = "signalling";

/// How long a signal waits for the peer's socket to write it before Matrix carries it instead.
const RELAY_WAIT: Duration = Duration::from_secs(5);

/// Signals that arrived through Matrix longer ago than this are not handed to sockets (a client
/// connecting after an outage does not get stale invites; its own `/sync` has them anyway).
const MATRIX_MAX_AGE_MS: i64 = 120_000;

/// The dialect each Matrix-only peer last used, remembered for this many users.
const DIALECTS_REMEMBERED: usize = 100_000;

/// The content key that marks Switchboard's own to-device sends, so that their echo in the
/// appservice stream is recognised; its value is the server name.
pub const ORIGIN_KEY: &str = "org.switchboard.origin";

/// What the service is configured with.
pub struct Settings {
    pub limits: SignallingConfig,
    pub server_name: String,
    /// TURN: the secret credentials are minted with, the URIs, the credentials' lifetime.
    pub turn: Option<(Secret, Vec<String>, u64)>,
}

impl Settings {
    pub fn from_config(config: &Config, turn_uris: Vec<String>) -> Self {
        let turn = config
            .turn
            .shared_secret
            .clone()
            .filter(|_| config.turn.mode != crate::config::TurnMode::Off && !turn_uris.is_empty())
            .map(|secret| (secret, turn_uris, config.turn.user_lifetime_secs));
        Self { limits: config.signalling.clone(), server_name: config.homeserver.server_name.clone(), turn }
    }
}

pub struct Signalling {
    pub hub: Hub,
    pub directory: Arc<DirectoryService>,
    pub homeserver: Arc<HomeserverClient>,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    pub settings: Settings,
    /// Socket tasks and offline grace periods; waited for at shutdown.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    dialects: Mutex<LruCache<Box<str>, Dialect>>,
}

/// Why a signal was not delivered, for the `error` frame.
pub struct Undelivered {
    pub code: ErrorCode,
    pub message: String,
}

impl Signalling {
    pub fn new(
        settings: Settings,
        directory: Arc<DirectoryService>,
        homeserver: Arc<HomeserverClient>,
        auth: Auth,
        metrics: Arc<Metrics>,
        clock: Clock,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            hub: Hub::new(settings.limits.max_connections, settings.limits.max_connections_per_user),
            directory,
            homeserver,
            auth,
            metrics,
            clock,
            settings,
            tasks: TaskTracker::new(),
            shutdown,
            dialects: Mutex::new(LruCache::new(DIALECTS_REMEMBERED)),
        })
    }

    /// Fresh TURN credentials for `user_id`, when TURN is configured.
    pub fn ice_servers(&self, user_id: &str) -> Option<IceServers> {
        let (secret, uris, lifetime) = self.settings.turn.as_ref()?;
        let minted = crate::turn::credentials::mint(
            secret.expose().as_bytes(),
            user_id,
            self.clock.unix_secs(),
            *lifetime,
        );
        Some(IceServers {
            uris: uris.clone(),
            username: minted.username,
            password: minted.password,
            ttl: minted.ttl,
        })
    }

    /// The checksummed address `user_id` provably holds, if the directory has verified it.
    pub fn verified_address(&self, user_id: &str) -> Option<String> {
        let directory = self.directory.read();
        let user = directory.user(user_id)?;
        user.verified.then(|| user.address.to_checksum())
    }

    /// The users a signal for `to` (an address or a user id) goes to: for an address, its users
    /// whose displayname proves they hold it (connected ones here first, else the best reachable).
    pub async fn recipient(&self, to: &str) -> Result<String, Undelivered> {
        if to.starts_with('@') {
            return match ruma::UserId::parse(to) {
                Ok(user_id) => Ok(user_id.to_string()),
                Err(_) => {
                    Err(Undelivered { code: ErrorCode::Invalid, message: "to: not a valid user id".into() })
                }
            };
        }
        let address = Address::parse(to).map_err(|e| Undelivered {
            code: ErrorCode::Invalid,
            message: format!("to: neither a user id nor an address ({e})"),
        })?;
        if let Some(user_id) = self.pick(&address) {
            return Ok(user_id);
        }
        self.directory.discover(&address).await;
        self.pick(&address).ok_or_else(|| Undelivered {
            code: ErrorCode::UnknownPeer,
            message: "no user is known to hold this address".into(),
        })
    }

    fn pick(&self, address: &Address) -> Option<String> {
        let directory = self.directory.read();
        let verified: Vec<&str> =
            directory.users_of(address).into_iter().filter(|u| u.verified).map(|u| &*u.user_id).collect();
        if let Some(connected) = verified.iter().find(|user_id| self.hub.is_connected(user_id)) {
            return Some((*connected).to_owned());
        }
        directory
            .best(address)
            .map(|user| user.user_id.to_string())
            .or_else(|| verified.first().map(|u| (*u).to_owned()))
    }

    /// Delivers `signal` (from a client of this instance) to its recipient: its socket when it has
    /// one here, else through Matrix. Returns the path once the peer's socket has written it or the
    /// homeserver has accepted it.
    pub async fn deliver(&self, signal: &Signal) -> Result<Via, Undelivered> {
        let started = self.clock.now();
        let via = if self.relay(signal, Via::Relay).await {
            Via::Relay
        } else {
            self.send_matrix(signal).await?;
            Via::Matrix
        };
        let label = ViaLabel { via: if via == Via::Relay { "relay" } else { "matrix" } };
        self.metrics.signalling.signals_sent.get_or_create(&label).inc();
        let elapsed = self.clock.now().saturating_duration_since(started);
        self.metrics.signalling.delivery_seconds.get_or_create(&label).observe(elapsed.as_secs_f64());
        Ok(via)
    }

    /// Hands `signal` to every socket of its recipient on this instance; true once one has written
    /// it (within [`RELAY_WAIT`]).
    async fn relay(&self, signal: &Signal, via: Via) -> bool {
        let sockets = self.hub.sockets_of(&signal.to_user);
        if sockets.is_empty() {
            return false;
        }
        let frame: Arc<str> = ServerFrame::Signal {
            from: signal.from_user.clone(),
            from_address: self.verified_address(&signal.from_user),
            from_device: signal.from_device.clone(),
            call_id: signal.call_id.clone(),
            event_type: signal.event_type,
            content: signal.content.clone(),
            via,
        }
        .to_text()
        .into();
        let mut written = Vec::with_capacity(sockets.len());
        for socket in &sockets {
            let (done, wait) = oneshot::channel();
            if socket.push(frame.clone(), Some(done)) {
                written.push(wait);
            }
        }
        if written.is_empty() {
            return false;
        }
        let any_written = async {
            let mut pending = written;
            while !pending.is_empty() {
                let (result, _, rest) = futures_util::future::select_all(pending).await;
                if result.is_ok() {
                    return true;
                }
                pending = rest;
            }
            false
        };
        tokio::select! {
            written = any_written => written,
            () = self.clock.sleep(RELAY_WAIT) => false,
        }
    }

    /// Sends `signal` as a to-device message from its sender, in the dialect its recipient speaks.
    async fn send_matrix(&self, signal: &Signal) -> Result<(), Undelivered> {
        let undeliverable = |message: String| Undelivered { code: ErrorCode::Undeliverable, message };
        let dialect = self.dialect_of(&signal.to_user);
        let Some(mut message) = dialect::to_device(signal, dialect) else {
            return Err(undeliverable(format!(
                "the peer's client cannot receive {} over Matrix",
                signal.event_type
            )));
        };
        if let Value::Object(content) = &mut message.content {
            content.insert(ORIGIN_KEY.to_owned(), Value::String(self.settings.server_name.clone()));
        }
        let (Ok(from), Ok(device)) = (
            ruma::UserId::parse(&signal.from_user),
            signal.from_device.as_deref().map(ruma::OwnedDeviceId::from).ok_or(()),
        ) else {
            return Err(undeliverable("the sender has no device to send from".into()));
        };
        let body = serde_json::json!({ "messages": { &signal.to_user: { "*": message.content } } });
        let request = self
            .homeserver
            .request_as(
                reqwest::Method::PUT,
                &["_matrix", "client", "v3", "sendToDevice", message.event_type, &message.txn_id],
                &from,
                Some(&device),
            )
            .json(&body);
        match self.homeserver.send::<Value>(request).await {
            Ok(_) => Ok(()),
            Err(error) => {
                tracing::warn!(%error, "signalling.matrix: to-device send failed");
                self.metrics.signalling.signals_sent.get_or_create(&ViaLabel { via: "failed" }).inc();
                Err(undeliverable("the homeserver did not take the signal".into()))
            }
        }
    }

    /// The dialect to use towards `user_id`: the one it last used towards us, else what its
    /// capabilities say.
    fn dialect_of(&self, user_id: &str) -> Dialect {
        let last_seen = self.dialects.lock().unwrap_or_else(PoisonError::into_inner).get(user_id).copied();
        let directory = self.directory.read();
        let capabilities = directory.user(user_id).and_then(|user| user.capabilities());
        dialect::dialect_for(last_seen, capabilities)
    }

    /// Hands signals that arrive through Matrix (to-device, in either dialect) to their recipients'
    /// sockets on this instance, until `shutdown`. Switchboard's own sends, seen again, are skipped.
    pub async fn consume(self: Arc<Self>, mut inbox: Subscription, shutdown: CancellationToken) {
        loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => return,
                batch = inbox.next() => batch,
            };
            let items = match batch {
                Ok(items) if items.is_empty() => return,
                Ok(items) => items,
                Err(error) => {
                    tracing::warn!(%error, "signalling.inbox: reading the inbox failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = self.clock.sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let now_ms = self.clock.unix_millis();
            for item in &items {
                if item.stored_at != 0 && now_ms - item.stored_at > MATRIX_MAX_AGE_MS {
                    continue;
                }
                let Some(incoming) = dialect::from_item(item) else { continue };
                if incoming.signal.content.get(ORIGIN_KEY).and_then(Value::as_str)
                    == Some(self.settings.server_name.as_str())
                {
                    self.metrics.signalling.echoes_dropped.inc();
                    continue;
                }
                self.dialects
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(incoming.signal.from_user.clone().into_boxed_str(), incoming.dialect);
                if self.relay(&incoming.signal, Via::Matrix).await {
                    self.metrics.signalling.signals_from_matrix.inc();
                }
            }
            if let Some(last) = items.last()
                && let Err(error) = inbox.ack(last.id).await
            {
                tracing::warn!(%error, "signalling.inbox: acknowledging failed");
            }
        }
    }

    /// Pushes each change of a watched address to the sockets watching it, until `shutdown`. The
    /// cost of a change is one look-up plus one frame per watcher.
    pub async fn push_presence(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.directory.subscribe();
        loop {
            let change = tokio::select! {
                () = shutdown.cancelled() => return,
                change = changes.recv() => change,
            };
            match change {
                Ok(change) => {
                    let watchers = self.hub.watchers(&change.address);
                    if watchers.is_empty() {
                        continue;
                    }
                    let frame = self.presence_frame(&change.address);
                    for watcher in watchers {
                        watcher.push(frame.clone(), None);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    // Changes were lost: send every watched address's state again.
                    tracing::warn!(missed, "signalling.presence: fell behind the directory; resending");
                    self.resend_all_presence();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn resend_all_presence(&self) {
        for (address, watchers) in self.hub.all_watchers() {
            let frame = self.presence_frame(&address);
            for watcher in watchers {
                watcher.push(frame.clone(), None);
            }
        }
    }

    /// The `presence` frame of `address`, as text.
    pub fn presence_frame(&self, address: &Address) -> Arc<str> {
        let value =
            crate::directory::api::peer_json(&self.directory.read(), address, self.clock.unix_millis());
        ServerFrame::Presence(value).to_text().into()
    }
}
