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
//! until the returned guard is dropped. With several instances, those of the others count too
//! ([`DirectoryService::remote_connection`], fed by [`crate::cluster::connections`]).
//!
//! Changes are published to every [`DirectoryService::subscribe`]r, and per address through
//! [`DirectoryService::feed`].
//!
//! Writes do not race and do not stall readers:
//! - inbox items are parsed, and the signatures of new or changed displaynames recovered, before the
//!   model's write lock is taken; under it, updates are only applied;
//! - each update carries the time it was observed (when its transaction was received; when a
//!   request to the homeserver was sent), and the model ignores one older than what it holds, so a
//!   stale push replayed from the inbox cannot overwrite a fresher reconciliation;
//! - saves are monotonic in the store (see [`Store::save_directory_users`]): one that lands after a
//!   newer one changes nothing;
//! - concurrent discovery of one unknown address waits for the one look-up in flight;
//! - the tables of watched addresses and recent look-ups, and the users of other homeservers, are
//!   bounded, evicting the oldest entries.
//!
//! Time comes from the [`Clock`] given to [`DirectoryService::load`]: the loops sleep on it, so tests
//! step it.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use hashlink::LinkedHashMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::identity::{Address, claimed_address};
use super::model::{Change, Directory, Presence, verify};
use super::{restore_row, to_row};
use crate::appservice::inbox::{Input, ItemKind, Subscription};
use crate::clock::Clock;
use crate::homeserver::HomeserverClient;
use crate::store::{Store, StoreError};
use crate::telemetry::{Metrics, TableLabel};

/// Name of the directory's inbox subscription.
pub const CONSUMER: &str = "directory";
/// Changes buffered for slow feed subscribers before they start missing some.
const FEED_CAPACITY: usize = 4096;
/// Look-ups waiting for their turn; more are dropped (and counted).
const QUEUE_CAPACITY: usize = 1024;
/// How long a client's request waits for the look-up of an unknown address.
const DISCOVER_WAIT: Duration = Duration::from_secs(2);
/// Entries kept in each of the look-up and watch tables by default; a full table evicts its oldest.
pub const TABLE_MAX: usize = 100_000;
/// An address asked for is watched (its presence reconciled) this long.
const WATCH_MS: i64 = 10 * 60 * 1000;
/// Past `max_remote_users`, this fraction of it is evicted beyond the excess, so that the scan for
/// the oldest (under a read lock) runs once per that many new remote users, not for each.
const EVICT_SLACK_DIVISOR: usize = 64;

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
    /// Most users of other servers held; past it, those seen longest ago are evicted.
    pub max_remote_users: usize,
    /// Entries of the look-up and watch tables, each ([`TABLE_MAX`]).
    pub table_max: usize,
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
            max_remote_users: directory.max_remote_users,
            table_max: TABLE_MAX,
        }
    }
}

/// Keys and the time (unix ms) each was last inserted, in that order, at most `max` of them: a full
/// table evicts its oldest entry (counted), and expired entries are dropped from the front.
struct Table<K> {
    entries: LinkedHashMap<K, i64>,
    max: usize,
    /// `switchboard_directory_table_entries` and `_table_evicted_total` of this table.
    gauge: Gauge,
    evicted: Counter,
}

impl<K: Hash + Eq> Table<K> {
    fn new(name: &'static str, max: usize, metrics: &Metrics) -> Self {
        let label = TableLabel { table: name };
        let gauge = metrics.directory.table_entries.get_or_create(&label).clone();
        let evicted = metrics.directory.table_evicted.get_or_create(&label).clone();
        Self { entries: LinkedHashMap::new(), max, gauge, evicted }
    }

    /// When `key` was last inserted, if it is there.
    fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<i64>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.entries.get(key).copied()
    }

    /// Drops the entries inserted `ttl_ms` or longer before `now_ms` (the oldest are at the front).
    fn expire(&mut self, now_ms: i64, ttl_ms: i64) {
        while self.entries.front().is_some_and(|(_, at)| now_ms.saturating_sub(*at) >= ttl_ms) {
            self.entries.pop_front();
        }
        self.count();
    }

    /// Inserts `key` (or moves it to the back) at `now_ms`, evicting the oldest entries past `max`.
    fn insert(&mut self, key: K, now_ms: i64) {
        self.entries.insert(key, now_ms);
        while self.entries.len() > self.max {
            self.entries.pop_front();
            self.evicted.inc();
        }
        self.count();
    }

    fn count(&self) {
        self.gauge.set(i64::try_from(self.entries.len()).unwrap_or(i64::MAX));
    }
}

/// Work for the homeserver.
#[derive(Debug)]
enum Job {
    /// Look up a user's profile, then (for a local user) its presence; those waiting for it in
    /// `inflight` are told when finished.
    Profile { user_id: String },
    /// Ask a local user's presence again.
    Presence { user_id: String },
}

pub struct DirectoryService {
    model: RwLock<Directory>,
    clock: Clock,
    changes: broadcast::Sender<Change>,
    store: Arc<Store>,
    homeserver: Arc<HomeserverClient>,
    metrics: Arc<Metrics>,
    settings: Settings,
    jobs: mpsc::Sender<Job>,
    /// Taken by [`Self::refresh`].
    queued: Mutex<Option<mpsc::Receiver<Job>>>,
    /// When each user's profile was last queued for look-up (unix ms), found or not.
    looked_up: Mutex<Table<Box<str>>>,
    /// Profile look-ups queued or running, and the flag those waiting for one watch (set when it
    /// is done). At most the queue's capacity and the one running.
    inflight: Mutex<HashMap<Box<str>, watch::Sender<bool>>>,
    /// Addresses clients asked for, and when (unix ms).
    watched: Mutex<Table<Address>>,
    /// Held while remote users are evicted (one eviction at a time).
    evicting: tokio::sync::Mutex<()>,
    /// Addresses with live [`AddressFeed`]s, and how many.
    feeds: Mutex<HashMap<Address, usize>>,
    /// This instance's own signalling connections, for the other instances.
    local: Mutex<LocalConnections>,
    local_changed: tokio::sync::Notify,
}

/// Users connected to this instance, and those whose first connection opened or last one closed
/// since the cluster was last told (only recorded while connections are shared: bounded by the
/// users with a socket here and those that closed since the last round).
#[derive(Default)]
struct LocalConnections {
    counts: HashMap<Box<str>, u32>,
    changed: std::collections::HashSet<Box<str>>,
    shared: bool,
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
        self.service.release(&self.address);
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
        let now_ms = self.service.clock.unix_millis();
        let change = self.service.write().apply_connection(&self.user_id, false, now_ms);
        self.service.publish(change);
        self.service.count_local(&self.user_id, false);
        // What the homeserver says counts again: ask it.
        self.service.queue(Job::Presence { user_id: std::mem::take(&mut self.user_id) });
    }
}

impl DirectoryService {
    /// Loads the stored directory; presence learnt more than `settings.stale_after_ms` before now
    /// (on `clock`) counts as offline. Remote users past `settings.max_remote_users` (a lowered
    /// bound) are evicted, those seen longest ago first.
    pub async fn load(
        store: Arc<Store>,
        homeserver: Arc<HomeserverClient>,
        metrics: Arc<Metrics>,
        settings: Settings,
        clock: Clock,
    ) -> Result<Arc<Self>, StoreError> {
        let now_ms = clock.unix_millis();
        let mut model = Directory::for_server(&settings.server_name);
        store
            .each_directory_user(|row| restore_row(&mut model, &row, now_ms, settings.stale_after_ms))
            .await?;
        let excess = model.remote_len().saturating_sub(settings.max_remote_users);
        if excess > 0 {
            let evicted = model.evict(model.oldest_remote(excess));
            metrics.directory.remote_evicted.inc_by(evicted.len() as u64);
            tracing::info!(
                evicted = evicted.len(),
                "directory.load: remote users past max_remote_users evicted"
            );
            store.delete_directory_users(&evicted).await?;
        }
        count_users(&metrics, &model);
        let (jobs, queued) = mpsc::channel(QUEUE_CAPACITY);
        let looked_up = Table::new("looked_up", settings.table_max, &metrics);
        let watched = Table::new("watched", settings.table_max, &metrics);
        Ok(Arc::new(Self {
            model: RwLock::new(model),
            clock,
            changes: broadcast::Sender::new(FEED_CAPACITY),
            store,
            homeserver,
            metrics,
            settings,
            jobs,
            queued: Mutex::new(Some(queued)),
            looked_up: Mutex::new(looked_up),
            inflight: Mutex::new(HashMap::new()),
            watched: Mutex::new(watched),
            evicting: tokio::sync::Mutex::new(()),
            feeds: Mutex::new(HashMap::new()),
            local: Mutex::new(LocalConnections::default()),
            local_changed: tokio::sync::Notify::new(),
        }))
    }

    /// The directory, for reading.
    pub fn read(&self) -> RwLockReadGuard<'_, Directory> {
        self.model.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Directory> {
        self.model.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The clock the directory reads and sleeps on.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Changes as they happen, of every address.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Changes of one address (what the WebSocket relay's `watch` serves).
    pub fn feed(self: &Arc<Self>, address: Address) -> AddressFeed {
        self.hold(address);
        AddressFeed { service: self.clone(), address, changes: self.changes.subscribe() }
    }

    /// Counts a live watcher of `address` (a feed, or a signalling socket that watches it): while
    /// one is counted, the presence of the address's local users is reconciled. Undone by
    /// [`Self::release`].
    pub fn hold(&self, address: Address) {
        *self.feeds.lock().unwrap_or_else(PoisonError::into_inner).entry(address).or_default() += 1;
    }

    /// Forgets a watcher counted by [`Self::hold`].
    pub fn release(&self, address: &Address) {
        let mut feeds = self.feeds.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = feeds.get_mut(address) {
            *count -= 1;
            if *count == 0 {
                feeds.remove(address);
            }
        }
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
        let now_ms = self.clock.unix_millis();
        let (change, unknown_profile) = {
            let mut model = self.write();
            let change = model.apply_connection(user_id, true, now_ms);
            let user = model.user(user_id)?;
            (change, user.displayname.is_none() && user.profile_at_ms == 0)
        };
        self.publish(change);
        if unknown_profile {
            self.look_up_profile(user_id, now_ms);
        }
        self.count_local(user_id, true);
        Some(Connection { service: self.clone(), user_id: user_id.to_owned() })
    }

    /// Counts a local connection of `user_id` opening or closing; the first and the last are
    /// changes for the other instances.
    fn count_local(&self, user_id: &str, opened: bool) {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        let crossed = if opened {
            let count = local.counts.entry(user_id.into()).or_default();
            *count += 1;
            *count == 1
        } else {
            match local.counts.get_mut(user_id) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    false
                }
                Some(_) => {
                    local.counts.remove(user_id);
                    true
                }
                None => false,
            }
        };
        if crossed && local.shared {
            local.changed.insert(user_id.into());
            drop(local);
            self.local_changed.notify_one();
        }
    }

    /// The users connected to this instance now, and from now on records who connects or
    /// disconnects for [`Self::local_changes`].
    pub fn local_connections(&self) -> Vec<Box<str>> {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        local.shared = true;
        local.counts.keys().cloned().collect()
    }

    /// Waits until a user's first connection to this instance opens or its last one closes.
    pub async fn local_changed(&self) {
        self.local_changed.notified().await;
    }

    /// Users whose first connection to this instance opened (`online`) or last one closed
    /// (`offline`) since the last call.
    pub fn local_changes(&self) -> (Vec<Box<str>>, Vec<Box<str>>) {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = std::mem::take(&mut local.changed);
        changed.into_iter().partition(|user_id| local.counts.contains_key(user_id))
    }

    /// Another instance says `user_id` has a connection to it (`opened`) or no longer has one:
    /// each instance counts as one connection while it says so.
    pub fn remote_connection(&self, user_id: &str, opened: bool) {
        let now_ms = self.clock.unix_millis();
        let (change, unknown_profile) = {
            let mut model = self.write();
            let change = model.apply_connection(user_id, opened, now_ms);
            let unknown =
                model.user(user_id).is_some_and(|user| user.displayname.is_none() && user.profile_at_ms == 0);
            (change, unknown)
        };
        self.publish(change);
        if opened && unknown_profile {
            self.look_up_profile(user_id, now_ms);
        } else if !opened {
            self.queue(Job::Presence { user_id: user_id.to_owned() });
        }
    }

    /// Called when a client asks for `address`: the address is watched (its local users' presence is
    /// reconciled for a while), and when no user of it is known, the profile of the user it would
    /// have on this homeserver is looked up, waiting up to 2 s (of the clock); concurrent calls for
    /// one address wait for the same look-up. Known users whose profile was not confirmed within
    /// `profile_cache_secs` are looked up again in the background.
    #[tracing::instrument(name = "directory.discover", level = "debug", skip_all, fields(%address))]
    pub async fn discover(&self, address: &Address) {
        if self.settings.lookups_per_sec == 0 {
            return;
        }
        let now_ms = self.clock.unix_millis();
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
                self.look_up_profile(&user_id, now_ms);
            }
            return;
        }
        let user_id = format!("@{}:{}", address.to_lower_hex(), self.settings.server_name);
        if let Some(mut done) = self.look_up_profile(&user_id, now_ms) {
            let finished = async move {
                while !*done.borrow_and_update() {
                    if done.changed().await.is_err() {
                        return; // the look-up was dropped (shutdown)
                    }
                }
            };
            tokio::select! {
                () = finished => {}
                () = self.clock.sleep(DISCOVER_WAIT) => {}
            }
        }
    }

    /// Marks `address` as watched: its local users' presence is reconciled for the next 10 minutes.
    /// The table holds `table_max` addresses; a full one forgets the one asked for longest ago.
    pub fn watch(&self, address: &Address, now_ms: i64) {
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        watched.insert(*address, now_ms);
    }

    /// Queues a profile look-up unless one is in flight (then waits for that one) or one was queued
    /// within `profile_cache_ms`. `Some` with what tells when the look-up is done, when one is queued
    /// or in flight.
    fn look_up_profile(&self, user_id: &str, now_ms: i64) -> Option<watch::Receiver<bool>> {
        if self.settings.lookups_per_sec == 0 {
            return None;
        }
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(done) = inflight.get(user_id) {
            return Some(done.subscribe());
        }
        {
            let ttl = self.settings.profile_cache_ms;
            let mut looked_up = self.looked_up.lock().unwrap_or_else(PoisonError::into_inner);
            looked_up.expire(now_ms, ttl);
            if looked_up.get(user_id).is_some_and(|at| now_ms.saturating_sub(at) < ttl) {
                return None;
            }
            if self.jobs.capacity() == 0 {
                // Full: remember nothing, so that the user is looked up when there is room again.
                self.metrics.directory_lookups_dropped.inc();
                return None;
            }
            looked_up.insert(user_id.into(), now_ms);
        }
        if !self.queue(Job::Profile { user_id: user_id.to_owned() }) {
            return None;
        }
        let (done, waiting) = watch::channel(false);
        inflight.insert(user_id.into(), done);
        Some(waiting)
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

    /// When `item` was observed: when its transaction was received (stored with it), else `now_ms`;
    /// never later than `now_ms`.
    fn observed_at(item: &Input, now_ms: i64) -> i64 {
        if item.stored_at > 0 { item.stored_at.min(now_ms) } else { now_ms }
    }

    /// Applies a batch of inbox items at `now_ms`, saves the users it touched, and queues profile
    /// look-ups for Raiden users seen without a profile. Items are parsed and new signatures
    /// recovered before the write lock is taken; each update counts as observed when its
    /// transaction was received, and one older than what the directory holds is ignored.
    #[tracing::instrument(name = "directory.apply", level = "debug", skip_all, fields(items = items.len()))]
    pub async fn apply(&self, items: &[Input], now_ms: i64) -> Result<(), StoreError> {
        let updates: Vec<Update> = items
            .iter()
            .filter_map(|item| parse_item(item, Self::observed_at(item, now_ms), now_ms))
            .collect();
        let mut verified: Vec<Option<bool>> = {
            let model = self.read();
            updates
                .iter()
                .map(|update| match update {
                    Update::Profile { user_id, displayname, .. } => {
                        model.verification(user_id, displayname.as_deref())
                    }
                    _ => None,
                })
                .collect()
        };
        for (update, verified) in updates.iter().zip(&mut verified) {
            if let Update::Profile { user_id, displayname, .. } = update
                && verified.is_none()
            {
                self.metrics.directory.signature_checks.inc();
                *verified = Some(verify(user_id, displayname.as_deref()));
            }
        }
        let (changes, rows, unknown, over) = {
            let mut model = self.write();
            let mut changes = Vec::new();
            let mut touched = Vec::new();
            for (update, verified) in updates.iter().zip(verified) {
                if let Some(user_id) = apply_update(&mut model, update, verified, &mut changes) {
                    touched.push(user_id);
                }
            }
            touched.sort_unstable();
            touched.dedup();
            let rows: Vec<_> = touched.iter().filter_map(|id| model.user(id)).map(to_row).collect();
            let unknown: Vec<&str> = items
                .iter()
                .filter_map(|item| item.sender.as_deref())
                .filter(|id| claimed_address(id).is_some())
                .filter(|id| model.user(id).is_none_or(|u| u.displayname.is_none() && u.profile_at_ms == 0))
                .collect();
            count_users(&self.metrics, &model);
            (changes, rows, unknown, self.over_remote_bound(&model))
        };
        if !rows.is_empty() {
            self.store.save_directory_users(&rows).await?;
        }
        self.publish(changes);
        for user_id in unknown {
            self.look_up_profile(user_id, now_ms);
        }
        if over {
            self.evict_remote().await;
        }
        Ok(())
    }

    fn over_remote_bound(&self, model: &Directory) -> bool {
        model.remote_len() > self.settings.max_remote_users
    }

    /// Evicts the remote users seen longest ago past `max_remote_users` (and a slack, so that the
    /// scan runs once per many new users), from the model and the store. The scan runs under the
    /// read lock; the write lock is held only to remove the users found (unless seen since).
    #[tracing::instrument(name = "directory.evict", level = "debug", skip_all)]
    async fn evict_remote(&self) {
        let Ok(_evicting) = self.evicting.try_lock() else { return };
        let victims = {
            let model = self.read();
            let excess = model.remote_len().saturating_sub(self.settings.max_remote_users);
            if excess == 0 {
                return;
            }
            model.oldest_remote(excess + self.settings.max_remote_users / EVICT_SLACK_DIVISOR)
        };
        let evicted = {
            let mut model = self.write();
            let evicted = model.evict(victims);
            count_users(&self.metrics, &model);
            evicted
        };
        self.metrics.directory.remote_evicted.inc_by(evicted.len() as u64);
        tracing::info!(
            evicted = evicted.len(),
            "directory.evict: remote users past max_remote_users evicted"
        );
        if let Err(error) = self.store.delete_directory_users(&evicted).await {
            // They are gone from the model; the next start evicts them again.
            tracing::warn!(%error, "directory.evict: deleting evicted users failed");
        }
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
                Ok(items) => match self.apply(&items, self.clock.unix_millis()).await {
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
                    () = self.clock.sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    /// Asks the homeserver, one request at a time and at most `lookups_per_sec` (of the clock),
    /// until `shutdown`: queued look-ups first, then presence reconciliation of local users that are
    /// online or watched, in rounds at most one `reconcile_interval` apart.
    pub async fn refresh(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut queued) = self.queued.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            return;
        };
        if self.settings.lookups_per_sec == 0 {
            return;
        }
        let period = Duration::from_secs(1) / self.settings.lookups_per_sec;
        let mut next = self.clock.now();
        // The first round confirms every online user, however recently its presence was learnt:
        // pushes sent while Switchboard was down are lost.
        let mut round_started_ms = self.clock.unix_millis();
        let mut round = self.reconcile_candidates(round_started_ms, true);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.clock.sleep_until(next) => {}
            }
            let job = if let Ok(job) = queued.try_recv() {
                job
            } else if let Some(user_id) = self.next_candidate(&mut round, &mut round_started_ms) {
                Job::Presence { user_id }
            } else {
                // Nothing to do until a look-up is queued or the next round is due.
                let since = self.clock.unix_millis().saturating_sub(round_started_ms);
                let wait = self.settings.reconcile_interval_ms.saturating_sub(since);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    job = queued.recv() => match job {
                        Some(job) => job,
                        None => return,
                    },
                    () = self.clock.sleep(Duration::from_millis(u64::try_from(wait).unwrap_or(0))) => continue,
                }
            };
            next = self.clock.now() + period;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.run(job) => {}
            }
        }
    }

    /// The next user of the reconciliation round; a new round starts when the last one is done and
    /// began at least one interval ago.
    fn next_candidate(&self, round: &mut VecDeque<String>, round_started_ms: &mut i64) -> Option<String> {
        let now_ms = self.clock.unix_millis();
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
            watched.expire(now_ms, WATCH_MS);
            watched.entries.keys().copied().collect()
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
            Job::Profile { user_id } => {
                if self.fetch_profile(&user_id).await {
                    self.fetch_presence(&user_id).await;
                }
                let done = self.inflight.lock().unwrap_or_else(PoisonError::into_inner).remove(&*user_id);
                if let Some(done) = done {
                    done.send_replace(true);
                }
            }
            Job::Presence { user_id } => self.fetch_presence(&user_id).await,
        }
    }

    /// Looks up a profile; true when the homeserver has the user. The profile counts as observed
    /// when the request was sent; its signature is recovered (when new) before the write lock.
    #[tracing::instrument(name = "directory.lookup_profile", level = "debug", skip_all, fields(user_id = %user_id))]
    async fn fetch_profile(&self, user_id: &str) -> bool {
        let observed_ms = self.clock.unix_millis();
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
        let displayname = profile.displayname.as_deref();
        let known = self.read().verification(user_id, displayname);
        let verified = known.unwrap_or_else(|| {
            self.metrics.directory.signature_checks.inc();
            verify(user_id, displayname)
        });
        let avatar_url = profile.avatar_url.as_deref();
        self.save_after(
            |model| model.apply_verified_profile(user_id, displayname, avatar_url, verified, observed_ms),
            user_id,
        )
        .await;
        true
    }

    /// Asks a local user's presence (remote users' presence can only arrive by push). It counts as
    /// observed when the request was sent: a push received while it was under way wins.
    #[tracing::instrument(name = "directory.lookup_presence", level = "debug", skip_all, fields(user_id = %user_id))]
    async fn fetch_presence(&self, user_id: &str) {
        let Ok(parsed) = ruma::UserId::parse(user_id) else { return };
        if parsed.server_name().as_str() != self.settings.server_name {
            return;
        }
        let observed_ms = self.clock.unix_millis();
        let status = match self.homeserver.presence(&parsed).await {
            Ok(status) => status,
            Err(error) => {
                self.metrics.lookup("presence", "failed");
                tracing::debug!(%error, "directory.lookup: presence request failed");
                return;
            }
        };
        self.metrics.lookup("presence", "found");
        let last_active = status.last_active_ago.map(|ago| observed_ms.saturating_sub(ago));
        let presence = Presence::from_matrix(&status.presence);
        self.save_after(|model| model.apply_presence(user_id, presence, last_active, observed_ms), user_id)
            .await;
    }

    /// Applies `update` to the model, saves the user and publishes the change.
    async fn save_after(&self, update: impl FnOnce(&mut Directory) -> Option<Change>, user_id: &str) {
        let (change, row, over) = {
            let mut model = self.write();
            let change = update(&mut model);
            count_users(&self.metrics, &model);
            (change, model.user(user_id).map(to_row), self.over_remote_bound(&model))
        };
        if let Some(row) = row
            && let Err(error) = self.store.save_directory_users(&[row]).await
        {
            // The model has it; the next update of this user saves it again.
            tracing::warn!(%error, "directory.save failed");
        }
        self.publish(change);
        if over {
            self.evict_remote().await;
        }
    }
}

fn count_users(metrics: &Metrics, model: &Directory) {
    metrics.directory_users.set(i64::try_from(model.len()).unwrap_or(i64::MAX));
    metrics.directory.remote_users.set(i64::try_from(model.remote_len()).unwrap_or(i64::MAX));
}

/// What one inbox item tells the directory, parsed before the write lock is taken.
enum Update {
    /// A member event: the user's profile, observed at `observed_ms`.
    Profile { user_id: String, displayname: Option<String>, avatar_url: Option<String>, observed_ms: i64 },
    /// A presence push, observed at `observed_ms`.
    Presence { user_id: String, presence: Presence, last_active_ms: Option<i64>, observed_ms: i64 },
    /// An event or to-device message of the sender, at `at_ms`.
    Activity { user_id: String, at_ms: i64 },
}

/// What `item`, observed (received) at `observed_ms` and handled at `now_ms`, tells the directory.
fn parse_item(item: &Input, observed_ms: i64, now_ms: i64) -> Option<Update> {
    match (item.kind, item.event_type.as_str()) {
        (ItemKind::Event, "m.room.member") => {
            let member: Member<'_> = item.parse().ok()?;
            let user_id = member.state_key?;
            if member.content.membership.as_deref() != Some("join") || claimed_address(user_id).is_none() {
                return None;
            }
            let MemberContent { displayname, avatar_url, .. } = member.content;
            Some(Update::Profile { user_id: user_id.to_owned(), displayname, avatar_url, observed_ms })
        }
        (ItemKind::Ephemeral, "m.presence") => {
            let edu: PresenceEdu = item.parse().ok()?;
            let user_id = edu.sender.or(edu.content.user_id)?;
            let last_active_ms = edu.content.last_active_ago.map(|ago| observed_ms.saturating_sub(ago));
            let presence = Presence::from_matrix(&edu.content.presence);
            Some(Update::Presence { user_id, presence, last_active_ms, observed_ms })
        }
        (ItemKind::Event, _) => {
            let sender = item.sender.as_deref()?;
            let at_ms = item.parse::<Timeline>().ok()?.origin_server_ts?;
            Some(Update::Activity { user_id: sender.to_owned(), at_ms })
        }
        // To-device messages carry no timestamp: they are pushed as they are sent.
        (ItemKind::ToDevice, _) => {
            Some(Update::Activity { user_id: item.sender.as_deref()?.to_owned(), at_ms: now_ms })
        }
        (ItemKind::Ephemeral, _) => None,
    }
}

/// Applies one update (a profile with its verification, computed before); returns the user it
/// concerned, if the model knows that user.
fn apply_update(
    model: &mut Directory,
    update: &Update,
    verified: Option<bool>,
    changes: &mut Vec<Change>,
) -> Option<String> {
    match update {
        Update::Profile { user_id, displayname, avatar_url, observed_ms } => {
            let verified = verified.unwrap_or(false);
            let (displayname, avatar_url) = (displayname.as_deref(), avatar_url.as_deref());
            changes.extend(model.apply_verified_profile(
                user_id,
                displayname,
                avatar_url,
                verified,
                *observed_ms,
            ));
            model.user(user_id).map(|user| user.user_id.to_string())
        }
        Update::Presence { user_id, presence, last_active_ms, observed_ms } => {
            changes.extend(model.apply_presence(user_id, *presence, *last_active_ms, *observed_ms));
            model.user(user_id).map(|_| user_id.clone())
        }
        Update::Activity { user_id, at_ms } => model.apply_activity(user_id, *at_ms).then(|| user_id.clone()),
    }
}
