//! The directory as a running service: the model behind a lock, fed by the inbox and by the
//! homeserver, saved to the store, and a broadcast of what changed.
//!
//! Inbox items it reads:
//! - `m.room.member` events with `membership: join`: the user's (`state_key`) displayname and
//!   avatar_url, as of joining or changing profile;
//! - `m.presence` ephemeral items: the sender's presence and `last_active_ago`;
//! - any other event a Raiden user sends: its `origin_server_ts` as last activity; a to-device
//!   message: the time it arrived.
//!
//! What it asks the homeserver, one request at a time and at most `[directory] lookups_per_sec`:
//! - the profile of a Raiden user it sees for the first time without one (a presence push, a
//!   to-device message, an event), and of the user an unknown address would have on this
//!   homeserver when a client asks for it ([`DirectoryService::discover`]);
//! - the presence of local users that are online or watched (asked for recently), each at most once
//!   per `reconcile_interval_secs`, because Synapse never retries presence pushes.
//!
//! Signalling connections are a third source: [`DirectoryService::connected`] makes the user online
//! until the returned guard is dropped.
//!
//! Changes are published to every [`DirectoryService::subscribe`]r, and per address through
//! [`DirectoryService::feed`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::identity::{Address, claimed_address};
use super::model::{Change, Directory, Presence};
use super::{restore_row, to_row};
use crate::appservice::inbox::{Input, ItemKind, Subscription};
use crate::homeserver::HomeserverClient;
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;

/// Name of the directory's inbox subscription.
pub const CONSUMER: &str = "directory";
/// Changes buffered for slow feed subscribers before they start missing some.
const FEED_CAPACITY: usize = 4096;
/// Look-ups waiting for their turn; more are dropped (and counted).
const QUEUE_CAPACITY: usize = 1024;
/// How long a client's request waits for the look-up of an unknown address.
const DISCOVER_WAIT: Duration = Duration::from_secs(2);
/// Entries kept in the look-up and watch tables before expired ones are swept.
const TABLE_MAX: usize = 100_000;
/// An address asked for is watched (its presence reconciled) this long.
const WATCH_MS: i64 = 10 * 60 * 1000;

/// How the directory behaves; from `[directory]` and `[homeserver]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The homeserver's server name: users on it are the ones whose presence can be asked.
    pub server_name: String,
    /// Presence learnt longer ago than this counts as offline after a restart.
    pub stale_after_ms: i64,
    /// Homeserver requests per second, at most; 0: none.
    pub lookups_per_sec: u32,
    /// Each user's presence is asked at most this often.
    pub reconcile_interval_ms: i64,
    /// A looked-up profile (or its absence) is trusted this long.
    pub profile_cache_ms: i64,
}

impl Settings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        let ms = |secs: u64| i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let directory = &config.directory;
        Self {
            server_name: config.homeserver.server_name.clone(),
            stale_after_ms: ms(directory.presence_stale_secs),
            lookups_per_sec: directory.lookups_per_sec,
            reconcile_interval_ms: ms(directory.reconcile_interval_secs),
            profile_cache_ms: ms(directory.profile_cache_secs),
        }
    }
}

/// Work for the homeserver.
#[derive(Debug)]
enum Job {
    /// Look up a user's profile, then (for a local user) its presence; `done` is told when finished.
    Profile { user_id: String, done: Option<oneshot::Sender<()>> },
    /// Ask a local user's presence again.
    Presence { user_id: String },
}

pub struct DirectoryService {
    model: RwLock<Directory>,
    changes: broadcast::Sender<Change>,
    store: Arc<Store>,
    homeserver: Arc<HomeserverClient>,
    metrics: Arc<Metrics>,
    settings: Settings,
    jobs: mpsc::Sender<Job>,
    /// Taken by [`Self::refresh`].
    queued: Mutex<Option<mpsc::Receiver<Job>>>,
    /// When each user's profile was last queued for look-up (unix ms), found or not.
    looked_up: Mutex<HashMap<Box<str>, i64>>,
    /// Addresses clients asked for, and when (unix ms).
    watched: Mutex<HashMap<Address, i64>>,
    /// Addresses with live [`AddressFeed`]s, and how many.
    feeds: Mutex<HashMap<Address, usize>>,
}

/// The changes of one address (presence, verification, capabilities), from
/// [`DirectoryService::feed`]. While it lives, the address's local users' presence is reconciled.
pub struct AddressFeed {
    service: Arc<DirectoryService>,
    address: Address,
    changes: broadcast::Receiver<Change>,
}

/// Why an [`AddressFeed`] has no next change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    /// The subscriber fell behind and this many changes (of any address) were dropped: read the
    /// address again.
    #[error("missed {0} changes")]
    Lagged(u64),
    /// The directory is gone (shutdown).
    #[error("the directory stopped")]
    Closed,
}

impl AddressFeed {
    pub fn address(&self) -> Address {
        self.address
    }

    /// The next change of the address.
    pub async fn next(&mut self) -> Result<Change, FeedError> {
        loop {
            match self.changes.recv().await {
                Ok(change) if change.address == self.address => return Ok(change),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => return Err(FeedError::Lagged(missed)),
                Err(broadcast::error::RecvError::Closed) => return Err(FeedError::Closed),
            }
        }
    }
}

impl Drop for AddressFeed {
    fn drop(&mut self) {
        let mut feeds = self.service.feeds.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = feeds.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                feeds.remove(&self.address);
            }
        }
    }
}

#[derive(Deserialize)]
struct Member<'a> {
    #[serde(borrow)]
    state_key: Option<&'a str>,
    content: MemberContent,
}

#[derive(Deserialize)]
struct MemberContent {
    membership: Option<String>,
    displayname: Option<String>,
    avatar_url: Option<String>,
}

#[derive(Deserialize)]
struct PresenceEdu {
    sender: Option<String>,
    content: PresenceContent,
}

#[derive(Deserialize)]
struct PresenceContent {
    presence: String,
    user_id: Option<String>,
    last_active_ago: Option<i64>,
}

#[derive(Deserialize)]
struct Timeline {
    origin_server_ts: Option<i64>,
}

/// A live signalling connection of a user; the user is online until every one is dropped.
pub struct Connection {
    service: Arc<DirectoryService>,
    user_id: String,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let change = self.service.write().apply_connection(&self.user_id, false, crate::unix_millis());
        self.service.publish(change);
        // What the homeserver says counts again: ask it.
        self.service.queue(Job::Presence { user_id: std::mem::take(&mut self.user_id) });
    }
}

impl DirectoryService {
    /// Loads the stored directory; presence learnt more than `settings.stale_after_ms` before
    /// `now_ms` counts as offline.
    pub async fn load(
        store: Arc<Store>,
        homeserver: Arc<HomeserverClient>,
        metrics: Arc<Metrics>,
        settings: Settings,
        now_ms: i64,
    ) -> Result<Arc<Self>, StoreError> {
        let mut model = Directory::new();
        store
            .each_directory_user(|row| restore_row(&mut model, &row, now_ms, settings.stale_after_ms))
            .await?;
        count_users(&metrics, &model);
        let (jobs, queued) = mpsc::channel(QUEUE_CAPACITY);
        Ok(Arc::new(Self {
            model: RwLock::new(model),
            changes: broadcast::Sender::new(FEED_CAPACITY),
            store,
            homeserver,
            metrics,
            settings,
            jobs,
            queued: Mutex::new(Some(queued)),
            looked_up: Mutex::new(HashMap::new()),
            watched: Mutex::new(HashMap::new()),
            feeds: Mutex::new(HashMap::new()),
        }))
    }

    /// The directory, for reading.
    pub fn read(&self) -> RwLockReadGuard<'_, Directory> {
        self.model.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Directory> {
        self.model.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes as they happen, of every address.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Changes of one address (what the WebSocket relay's `watch` serves).
    pub fn feed(self: &Arc<Self>, address: Address) -> AddressFeed {
        *self.feeds.lock().unwrap_or_else(PoisonError::into_inner).entry(address).or_default() += 1;
        AddressFeed { service: self.clone(), address, changes: self.changes.subscribe() }
    }

    fn publish(&self, changes: impl IntoIterator<Item = Change>) {
        for change in changes {
            // No subscriber is fine.
            let _ = self.changes.send(change);
        }
    }

    /// The hook for signalling: `user_id` has a live connection, so it is online until the
    /// returned guard is dropped (then the homeserver's presence counts again). `None` for a user id
    /// that is not a Raiden one.
    pub fn connected(self: &Arc<Self>, user_id: &str) -> Option<Connection> {
        let now_ms = crate::unix_millis();
        let (change, unknown_profile) = {
            let mut model = self.write();
            let change = model.apply_connection(user_id, true, now_ms);
            let user = model.user(user_id)?;
            (change, user.displayname.is_none() && user.profile_at_ms == 0)
        };
        self.publish(change);
        if unknown_profile {
            self.look_up_profile(user_id, now_ms, None);
        }
        Some(Connection { service: self.clone(), user_id: user_id.to_owned() })
    }

    /// Called when a client asks for `address`: the address is watched (its local users' presence is
    /// reconciled for a while), and when no user of it is known, the profile of the user it would
    /// have on this homeserver is looked up, waiting up to 2 s. Known users whose profile was not
    /// confirmed within `profile_cache_secs` are looked up again in the background.
    pub async fn discover(&self, address: &Address) {
        if self.settings.lookups_per_sec == 0 {
            return;
        }
        let now_ms = crate::unix_millis();
        self.watch(address, now_ms);
        // This runs on every lookup: nothing is allocated unless a look-up can be queued.
        let room = self.jobs.capacity() > 0;
        let (known, stale): (bool, Vec<String>) = {
            let model = self.read();
            let users = model.claimants(address);
            let stale = users
                .iter()
                .filter(|user| {
                    room && now_ms.saturating_sub(user.profile_at_ms) > self.settings.profile_cache_ms
                })
                .map(|user| user.user_id.to_string())
                .collect();
            (!users.is_empty(), stale)
        };
        if known {
            for user_id in stale {
                self.look_up_profile(&user_id, now_ms, None);
            }
            return;
        }
        let user_id = format!("@{}:{}", address.to_lower_hex(), self.settings.server_name);
        let (done, finished) = oneshot::channel();
        if self.look_up_profile(&user_id, now_ms, Some(done)) {
            let _ = tokio::time::timeout(DISCOVER_WAIT, finished).await;
        }
    }

    /// Marks `address` as watched: its local users' presence is reconciled for the next 10 minutes.
    pub fn watch(&self, address: &Address, now_ms: i64) {
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        if watched.len() >= TABLE_MAX {
            watched.retain(|_, at| now_ms.saturating_sub(*at) < WATCH_MS);
            if watched.len() >= TABLE_MAX {
                watched.clear();
            }
        }
        watched.insert(*address, now_ms);
    }

    /// Queues a profile look-up unless one was queued within `profile_cache_ms`; true when queued.
    fn look_up_profile(&self, user_id: &str, now_ms: i64, done: Option<oneshot::Sender<()>>) -> bool {
        if self.settings.lookups_per_sec == 0 {
            return false;
        }
        if self.jobs.capacity() == 0 {
            // Full: remember nothing, so that the user is looked up when there is room again.
            self.metrics.directory_lookups_dropped.inc();
            return false;
        }
        {
            let mut looked_up = self.looked_up.lock().unwrap_or_else(PoisonError::into_inner);
            if looked_up
                .get(user_id)
                .is_some_and(|at| now_ms.saturating_sub(*at) < self.settings.profile_cache_ms)
            {
                return false;
            }
            if looked_up.len() >= TABLE_MAX {
                let ttl = self.settings.profile_cache_ms;
                looked_up.retain(|_, at| now_ms.saturating_sub(*at) < ttl);
                if looked_up.len() >= TABLE_MAX {
                    looked_up.clear();
                }
            }
            looked_up.insert(user_id.into(), now_ms);
        }
        self.queue(Job::Profile { user_id: user_id.to_owned(), done })
    }

    fn queue(&self, job: Job) -> bool {
        if self.settings.lookups_per_sec == 0 {
            return false;
        }
        let queued = self.jobs.try_send(job).is_ok();
        if !queued {
            self.metrics.directory_lookups_dropped.inc();
        }
        queued
    }

    /// Applies a batch of inbox items at `now_ms`, saves the users it touched, and queues profile
    /// look-ups for Raiden users seen without a profile.
    pub async fn apply(&self, items: &[Input], now_ms: i64) -> Result<(), StoreError> {
        let (changes, rows, unknown) = {
            let mut model = self.write();
            let mut changes = Vec::new();
            let mut touched = Vec::new();
            let mut seen = Vec::new();
            for item in items {
                if let Some(user_id) = apply_item(&mut model, item, now_ms, &mut changes) {
                    touched.push(user_id);
                }
                seen.extend(item.sender.as_deref().filter(|id| claimed_address(id).is_some()));
            }
            touched.sort_unstable();
            touched.dedup();
            let rows: Vec<_> = touched.iter().filter_map(|id| model.user(id)).map(to_row).collect();
            let unknown: Vec<String> = seen
                .into_iter()
                .filter(|id| model.user(id).is_none_or(|u| u.displayname.is_none() && u.profile_at_ms == 0))
                .map(str::to_owned)
                .collect();
            count_users(&self.metrics, &model);
            (changes, rows, unknown)
        };
        if !rows.is_empty() {
            self.store.save_directory_users(&rows).await?;
        }
        self.publish(changes);
        for user_id in unknown {
            self.look_up_profile(&user_id, now_ms, None);
        }
        Ok(())
    }

    /// Reads the inbox until `shutdown`, acknowledging each batch once it is saved.
    pub async fn consume(self: Arc<Self>, mut inbox: Subscription, shutdown: CancellationToken) {
        loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => return,
                batch = inbox.next() => batch,
            };
            let result = match batch {
                Ok(items) if items.is_empty() => return,
                Ok(items) => match self.apply(&items, crate::unix_millis()).await {
                    Ok(()) => inbox.ack(items.last().map_or(0, |i| i.id)).await,
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                // Not acknowledged: the batch comes again after a pause.
                tracing::warn!(%error, "directory.consume failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    /// Asks the homeserver, one request at a time and at most `lookups_per_sec`, until `shutdown`:
    /// queued look-ups first, then presence reconciliation of local users that are online or
    /// watched, in rounds at most one `reconcile_interval` apart.
    pub async fn refresh(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut queued) = self.queued.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            return;
        };
        if self.settings.lookups_per_sec == 0 {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1) / self.settings.lookups_per_sec);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first round confirms every online user, however recently its presence was learnt:
        // pushes sent while Switchboard was down are lost.
        let mut round_started_ms = crate::unix_millis();
        let mut round = self.reconcile_candidates(round_started_ms, true);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let job = if let Ok(job) = queued.try_recv() {
                job
            } else if let Some(user_id) = self.next_candidate(&mut round, &mut round_started_ms) {
                Job::Presence { user_id }
            } else {
                // Nothing to do until a look-up is queued or the next round is due.
                let since = crate::unix_millis().saturating_sub(round_started_ms);
                let wait = self.settings.reconcile_interval_ms.saturating_sub(since);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    job = queued.recv() => match job {
                        Some(job) => job,
                        None => return,
                    },
                    () = tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap_or(0))) => continue,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.run(job) => {}
            }
        }
    }

    /// The next user of the reconciliation round; a new round starts when the last one is done and
    /// began at least one interval ago.
    fn next_candidate(&self, round: &mut VecDeque<String>, round_started_ms: &mut i64) -> Option<String> {
        let now_ms = crate::unix_millis();
        if round.is_empty() && now_ms.saturating_sub(*round_started_ms) >= self.settings.reconcile_interval_ms
        {
            *round = self.reconcile_candidates(now_ms, false);
            *round_started_ms = now_ms;
        }
        round.pop_front()
    }

    /// Local users whose presence is due for a check: online or unavailable ones, and those of
    /// watched addresses; unless `all`, not those whose presence arrived within the interval.
    fn reconcile_candidates(&self, now_ms: i64, all: bool) -> VecDeque<String> {
        let mut watched: Vec<Address> = {
            let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
            watched.retain(|_, at| now_ms.saturating_sub(*at) < WATCH_MS);
            watched.keys().copied().collect()
        };
        watched.extend(self.feeds.lock().unwrap_or_else(PoisonError::into_inner).keys());
        let model = self.read();
        let due = |user: &&super::model::User| {
            user.server_name() == self.settings.server_name
                && (all || now_ms.saturating_sub(user.presence_at_ms) >= self.settings.reconcile_interval_ms)
        };
        let mut candidates: Vec<String> = model
            .users()
            .filter(|user| user.homeserver_presence.reachable())
            .chain(watched.iter().flat_map(|address| model.users_of(address)))
            .filter(due)
            .map(|user| user.user_id.to_string())
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        candidates.into()
    }

    /// Runs one job against the homeserver and records what it learnt.
    async fn run(&self, job: Job) {
        match job {
            Job::Profile { user_id, done } => {
                if self.fetch_profile(&user_id).await {
                    self.fetch_presence(&user_id).await;
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Job::Presence { user_id } => self.fetch_presence(&user_id).await,
        }
    }

    /// Looks up a profile; true when the homeserver has the user.
    async fn fetch_profile(&self, user_id: &str) -> bool {
        let profile = match self.homeserver.profile(user_id).await {
            Ok(Some(profile)) => profile,
            Ok(None) => {
                self.metrics.lookup("profile", "absent");
                return false;
            }
            Err(error) => {
                self.metrics.lookup("profile", "failed");
                tracing::debug!(%error, "directory.lookup: profile request failed");
                return false;
            }
        };
        self.metrics.lookup("profile", "found");
        let now_ms = crate::unix_millis();
        self.save_after(
            |model| {
                model.apply_profile(
                    user_id,
                    profile.displayname.as_deref(),
                    profile.avatar_url.as_deref(),
                    now_ms,
                )
            },
            user_id,
        )
        .await;
        true
    }

    /// Asks a local user's presence (remote users' presence can only arrive by push).
    async fn fetch_presence(&self, user_id: &str) {
        let Ok(parsed) = ruma::UserId::parse(user_id) else { return };
        if parsed.server_name().as_str() != self.settings.server_name {
            return;
        }
        let status = match self.homeserver.presence(&parsed).await {
            Ok(status) => status,
            Err(error) => {
                self.metrics.lookup("presence", "failed");
                tracing::debug!(%error, "directory.lookup: presence request failed");
                return;
            }
        };
        self.metrics.lookup("presence", "found");
        let now_ms = crate::unix_millis();
        let last_active = status.last_active_ago.map(|ago| now_ms.saturating_sub(ago));
        let presence = Presence::from_matrix(&status.presence);
        self.save_after(|model| model.apply_presence(user_id, presence, last_active, now_ms), user_id).await;
    }

    /// Applies `update` to the model, saves the user and publishes the change.
    async fn save_after(&self, update: impl FnOnce(&mut Directory) -> Option<Change>, user_id: &str) {
        let (change, row) = {
            let mut model = self.write();
            let change = update(&mut model);
            count_users(&self.metrics, &model);
            (change, model.user(user_id).map(to_row))
        };
        if let Some(row) = row
            && let Err(error) = self.store.save_directory_users(&[row]).await
        {
            // The model has it; the next update of this user saves it again.
            tracing::warn!(%error, "directory.save failed");
        }
        self.publish(change);
    }
}

fn count_users(metrics: &Metrics, model: &Directory) {
    metrics.directory_users.set(i64::try_from(model.len()).unwrap_or(i64::MAX));
}

/// Applies one inbox item; returns the user it concerned, if the model knows that user.
fn apply_item(model: &mut Directory, item: &Input, now_ms: i64, changes: &mut Vec<Change>) -> Option<String> {
    match (item.kind, item.event_type.as_str()) {
        (ItemKind::Event, "m.room.member") => {
            let member: Member<'_> = item.parse().ok()?;
            let user_id = member.state_key?;
            if member.content.membership.as_deref() != Some("join") {
                return None;
            }
            let content = &member.content;
            changes.extend(model.apply_profile(
                user_id,
                content.displayname.as_deref(),
                content.avatar_url.as_deref(),
                now_ms,
            ));
            model.user(user_id).map(|user| user.user_id.to_string())
        }
        (ItemKind::Ephemeral, "m.presence") => {
            let edu: PresenceEdu = item.parse().ok()?;
            let user_id = edu.sender.or(edu.content.user_id)?;
            let last_active = edu.content.last_active_ago.map(|ago| now_ms.saturating_sub(ago));
            let presence = Presence::from_matrix(&edu.content.presence);
            changes.extend(model.apply_presence(&user_id, presence, last_active, now_ms));
            model.user(&user_id).map(|_| user_id)
        }
        (ItemKind::Event, _) => {
            let sender = item.sender.as_deref()?;
            let at = item.parse::<Timeline>().ok()?.origin_server_ts?;
            model.apply_activity(sender, at).then(|| sender.to_owned())
        }
        // To-device messages carry no timestamp: they are pushed as they are sent.
        (ItemKind::ToDevice, _) => {
            let sender = item.sender.as_deref()?;
            model.apply_activity(sender, now_ms).then(|| sender.to_owned())
        }
        (ItemKind::Ephemeral, _) => None,
    }
}
