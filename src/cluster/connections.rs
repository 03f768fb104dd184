//! Users connected to any instance count as online on every instance.
//!
//! Each instance publishes on the channel `connections` (JSON, one [`Announcement`] a message):
//! - `delta`: users whose first signalling connection to it opened, or whose last one closed;
//! - `snapshot`: every user connected to it, at start, every `snapshot_interval_secs`, after
//!   Redis comes back, and when another instance says `hello`;
//! - `hello`: "I (re)started or missed messages": the others send their snapshots;
//! - `gone`: it is shutting down: its users are dropped at once.
//!
//! An instance is one connection of each user it names ([`DirectoryService::remote_connection`]).
//! A snapshot replaces what was held for its instance, so a lost delta is mended within one period;
//! an instance heard from neither for [`SILENT_PERIODS`] periods has its users dropped (it
//! crashed, or this instance cannot hear it). What another instance can make this one hold is
//! bounded: `max_instances`, `max_users_per_instance` (more are refused and counted), messages of
//! at most [`MAX_MESSAGE_BYTES`].
//!
//! [`Remote`] is the bookkeeping, without IO; [`share`] is the task around it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Cluster, Message};
use crate::clock::Clock;
use crate::directory::service::DirectoryService;
use crate::telemetry::Metrics;

/// The channel (after the prefix).
pub const CHANNEL: &str = "connections";
/// An instance heard from neither by snapshot nor delta for this many periods is dropped.
pub const SILENT_PERIODS: i64 = 3;
/// Longer messages are ignored (a snapshot of 100,000 users is ~5 MB).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Bounds and period, from `[cluster]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub snapshot_interval: Duration,
    pub max_instances: usize,
    pub max_users_per_instance: usize,
}

impl Settings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            snapshot_interval: Duration::from_secs(config.cluster.snapshot_interval_secs),
            max_instances: config.cluster.max_instances,
            max_users_per_instance: config.cluster.max_users_per_instance,
        }
    }
}

/// One message on [`CHANNEL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Announcement {
    Snapshot { instance: String, users: Vec<Box<str>> },
    Delta { instance: String, online: Vec<Box<str>>, offline: Vec<Box<str>> },
    Hello { instance: String },
    Gone { instance: String },
}

impl Announcement {
    fn instance(&self) -> &str {
        match self {
            Self::Snapshot { instance, .. }
            | Self::Delta { instance, .. }
            | Self::Hello { instance }
            | Self::Gone { instance } => instance,
        }
    }
}

/// The users connected to other instances, as they announced them.
pub struct Remote {
    instances: HashMap<String, Instance>,
    settings: Settings,
    metrics: Arc<Metrics>,
}

struct Instance {
    users: HashSet<Box<str>>,
    heard_ms: i64,
}

/// A user to count (`true`) or no longer count (`false`) as connected elsewhere.
pub type Update = (Box<str>, bool);

impl Remote {
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Self {
        Self { instances: HashMap::new(), settings, metrics }
    }

    /// Applies another instance's announcement at `now_ms`; returns the directory updates.
    pub fn handle(&mut self, announcement: Announcement, now_ms: i64) -> Vec<Update> {
        let mut updates = Vec::new();
        let name = announcement.instance().to_owned();
        match announcement {
            Announcement::Gone { .. } => {
                if let Some(instance) = self.instances.remove(&name) {
                    updates.extend(instance.users.into_iter().map(|user| (user, false)));
                }
            }
            Announcement::Hello { .. } => {
                if let Some(instance) = self.instances.get_mut(&name) {
                    instance.heard_ms = now_ms;
                }
            }
            Announcement::Snapshot { users, .. } => {
                let max = self.settings.max_users_per_instance;
                let Some(instance) = self.instance(&name, now_ms) else { return updates };
                let mut fresh: HashSet<Box<str>> = HashSet::with_capacity(users.len().min(max));
                let mut refused = 0u64;
                for user in users {
                    if fresh.len() < max {
                        fresh.insert(user);
                    } else if !fresh.contains(&user) {
                        refused += 1;
                    }
                }
                updates.extend(instance.users.difference(&fresh).map(|user| (user.clone(), false)));
                updates.extend(fresh.difference(&instance.users).map(|user| (user.clone(), true)));
                instance.users = fresh;
                self.metrics.cluster.remote_refused.inc_by(refused);
            }
            Announcement::Delta { online, offline, .. } => {
                let max = self.settings.max_users_per_instance;
                let metrics = self.metrics.clone();
                let Some(instance) = self.instance(&name, now_ms) else { return updates };
                for user in offline {
                    if instance.users.remove(&user) {
                        updates.push((user, false));
                    }
                }
                for user in online {
                    if instance.users.len() >= max && !instance.users.contains(&user) {
                        metrics.cluster.remote_refused.inc();
                    } else if instance.users.insert(user.clone()) {
                        updates.push((user, true));
                    }
                }
            }
        }
        self.count();
        updates
    }

    /// The instance `name`, heard from at `now_ms`: added if there is room, else refused (counted).
    fn instance(&mut self, name: &str, now_ms: i64) -> Option<&mut Instance> {
        if !self.instances.contains_key(name) {
            if self.instances.len() >= self.settings.max_instances {
                self.metrics.cluster.remote_refused.inc();
                return None;
            }
            self.instances.insert(name.to_owned(), Instance { users: HashSet::new(), heard_ms: now_ms });
        }
        let instance = self.instances.get_mut(name)?;
        instance.heard_ms = now_ms;
        Some(instance)
    }

    /// Drops the instances not heard from for [`SILENT_PERIODS`] periods before `now_ms`.
    pub fn expire(&mut self, now_ms: i64) -> Vec<Update> {
        let period_ms = i64::try_from(self.settings.snapshot_interval.as_millis()).unwrap_or(i64::MAX);
        let silent_ms = period_ms.saturating_mul(SILENT_PERIODS);
        let mut updates = Vec::new();
        self.instances.retain(|name, instance| {
            let alive = now_ms.saturating_sub(instance.heard_ms) < silent_ms;
            if !alive {
                tracing::info!(instance = %name, users = instance.users.len(), "cluster.connections: instance silent; its users dropped");
                updates.extend(instance.users.drain().map(|user| (user, false)));
            }
            alive
        });
        self.count();
        updates
    }

    /// Drops everything (at shutdown).
    pub fn clear(&mut self) -> Vec<Update> {
        let updates = self
            .instances
            .drain()
            .flat_map(|(_, instance)| instance.users)
            .map(|user| (user, false))
            .collect();
        self.count();
        updates
    }

    fn count(&self) {
        let users: usize = self.instances.values().map(|instance| instance.users.len()).sum();
        self.metrics.cluster.remote_users.set(i64::try_from(users).unwrap_or(i64::MAX));
        self.metrics.cluster.remote_instances.set(i64::try_from(self.instances.len()).unwrap_or(i64::MAX));
    }
}

/// Shares this instance's connections with the others and applies theirs to `directory`, until
/// `shutdown` (then says `gone`). Time (the snapshot period, silence) is read from `clock`.
pub async fn share(
    directory: Arc<DirectoryService>,
    cluster: Cluster,
    settings: Settings,
    metrics: Arc<Metrics>,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let instance = cluster.instance().to_owned();
    let mut subscription = cluster.subscribe(CHANNEL);
    let mut remote = Remote::new(settings.clone(), metrics);
    let apply = |updates: Vec<Update>| {
        for (user_id, opened) in updates {
            directory.remote_connection(&user_id, opened);
        }
    };
    let announce = |announcement: Announcement| {
        let cluster = cluster.clone();
        async move {
            let payload = serde_json::to_vec(&announcement).expect("an announcement serialises");
            // Down: the snapshot after Redis comes back mends it.
            let _ = cluster.publish(CHANNEL, Bytes::from(payload)).await;
        }
    };
    let snapshot =
        || Announcement::Snapshot { instance: instance.clone(), users: directory.local_connections() };
    // Say hello once subscribed, so the others' snapshots reach us.
    let mut greeted = false;
    let mut snapshot_due = true;
    let mut next_snapshot_ms = clock.unix_millis();
    loop {
        if !greeted && cluster.is_up() && cluster.is_subscribed(CHANNEL) {
            announce(Announcement::Hello { instance: instance.clone() }).await;
            greeted = true;
            snapshot_due = true;
        }
        let now_ms = clock.unix_millis();
        if snapshot_due || now_ms >= next_snapshot_ms {
            announce(snapshot()).await;
            apply(remote.expire(now_ms));
            snapshot_due = false;
            let period_ms = i64::try_from(settings.snapshot_interval.as_millis()).unwrap_or(i64::MAX);
            next_snapshot_ms = now_ms.saturating_add(period_ms);
        }
        let wait = Duration::from_millis(u64::try_from(next_snapshot_ms.saturating_sub(now_ms)).unwrap_or(0));
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = clock.sleep(wait) => {}
            () = cluster.subscribed(CHANNEL), if !greeted => {}
            () = directory.local_changed() => {
                let (online, offline) = directory.local_changes();
                if !online.is_empty() || !offline.is_empty() {
                    announce(Announcement::Delta { instance: instance.clone(), online, offline }).await;
                }
            }
            message = subscription.next() => match message {
                None => break,
                Some(Message::Lost) => {
                    // Redis came back, or we fell behind: ask every instance for its snapshot and
                    // send ours.
                    greeted = false;
                }
                Some(Message::Payload(payload)) => {
                    if payload.len() > MAX_MESSAGE_BYTES {
                        continue;
                    }
                    match serde_json::from_slice::<Announcement>(&payload) {
                        Ok(announcement) if announcement.instance() == instance => {}
                        Ok(announcement) => {
                            snapshot_due |= matches!(announcement, Announcement::Hello { .. });
                            apply(remote.handle(announcement, clock.unix_millis()));
                        }
                        Err(error) => tracing::debug!(%error, "cluster.connections: unreadable announcement ignored"),
                    }
                }
            },
        }
    }
    announce(Announcement::Gone { instance: instance.clone() }).await;
    apply(remote.clear());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(max_instances: usize, max_users: usize) -> Remote {
        let settings = Settings {
            snapshot_interval: Duration::from_secs(10),
            max_instances,
            max_users_per_instance: max_users,
        };
        Remote::new(settings, Arc::new(Metrics::new()))
    }

    fn users(names: &[&str]) -> Vec<Box<str>> {
        names.iter().map(|name| Box::from(*name)).collect()
    }

    fn sorted(mut updates: Vec<Update>) -> Vec<Update> {
        updates.sort();
        updates
    }

    #[test]
    fn a_snapshot_replaces_what_its_instance_said_before() {
        let mut remote = remote(8, 100);
        let delta =
            Announcement::Delta { instance: "a".into(), online: users(&["@x", "@y"]), offline: vec![] };
        assert_eq!(sorted(remote.handle(delta, 0)), vec![("@x".into(), true), ("@y".into(), true)]);
        let snapshot = Announcement::Snapshot { instance: "a".into(), users: users(&["@y", "@z"]) };
        assert_eq!(sorted(remote.handle(snapshot, 1)), vec![("@x".into(), false), ("@z".into(), true)]);
        let gone = Announcement::Gone { instance: "a".into() };
        assert_eq!(sorted(remote.handle(gone, 2)), vec![("@y".into(), false), ("@z".into(), false)]);
    }

    #[test]
    fn an_instance_silent_for_three_periods_has_its_users_dropped() {
        let mut remote = remote(8, 100);
        remote.handle(Announcement::Snapshot { instance: "a".into(), users: users(&["@x"]) }, 0);
        remote.handle(Announcement::Snapshot { instance: "b".into(), users: users(&["@y"]) }, 20_000);
        assert!(remote.expire(29_999).is_empty());
        assert_eq!(remote.expire(30_000), vec![("@x".into(), false)]);
        assert_eq!(remote.metrics.cluster.remote_instances.get(), 1);
    }

    #[test]
    fn instances_and_users_past_the_bounds_are_refused_and_counted() {
        let mut remote = remote(1, 2);
        let snapshot =
            Announcement::Snapshot { instance: "a".into(), users: users(&["@1", "@2", "@3", "@2"]) };
        assert_eq!(remote.handle(snapshot, 0).len(), 2);
        let delta = Announcement::Delta { instance: "a".into(), online: users(&["@4"]), offline: vec![] };
        assert!(remote.handle(delta, 0).is_empty());
        let other = Announcement::Snapshot { instance: "b".into(), users: users(&["@5"]) };
        assert!(remote.handle(other, 0).is_empty());
        assert_eq!(remote.metrics.cluster.remote_refused.get(), 3);
        assert_eq!(remote.metrics.cluster.remote_users.get(), 2);
    }
}
