//! The typed stream of stored appservice input that the rest of Switchboard subscribes to.
//!
//! A consumer (the directory, the call broker, …) opens a [`Subscription`] under a stable name and
//! the name of its instance, takes batches with [`Subscription::next`] and acknowledges what it has
//! handled with [`Subscription::ack`]. Acknowledgements are persisted per consumer and per instance
//! and only move forward, so after a crash or restart everything stored but not yet acknowledged is
//! handed to the consumer again: handling must be idempotent.
//!
//! [`prune`] keeps the inbox bounded: items every consumer has acknowledged are deleted once older
//! than the retention (see [`crate::store::Store::prune`]).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::store::{Retention, Store, StoreError, StoredItem};
use crate::telemetry::Metrics;

pub use crate::store::ItemKind;

/// One stored item: a room event, an ephemeral item (EDU) or a to-device message.
pub type Input = StoredItem;

impl StoredItem {
    /// Deserialises the item's JSON (as the homeserver sent it) into a consumer's own type.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> serde_json::Result<T> {
        serde_json::from_str(self.body.get())
    }
}

/// The cluster channel on which the instance that stores a transaction wakes the others'
/// subscriptions ([`Subscription::woken_by`]).
pub const WAKE_CHANNEL: &str = "inbox";

/// Most items handed out in one batch.
const BATCH: i64 = 500;
/// How often a waiting subscription looks for items committed by another Switchboard instance
/// without being woken (the safety net while the cluster's Redis is down).
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often, at most, the inbox is pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// A consumer's position in the inbox.
pub struct Subscription {
    consumer: String,
    instance: String,
    store: Arc<Store>,
    clock: Clock,
    /// The last id handed out by `next`.
    handed: i64,
    latest: watch::Receiver<i64>,
    /// Wakes from the other instances, see [`Self::woken_by`].
    wake: Option<crate::cluster::Subscription>,
}

impl Subscription {
    /// Opens the subscription of `consumer` on `instance` (`[database] instance_name`) at its last
    /// acknowledged item.
    pub async fn open(
        store: Arc<Store>,
        consumer: &str,
        instance: &str,
        clock: Clock,
    ) -> Result<Self, StoreError> {
        let latest = store.watch_latest();
        let handed = store.cursor(consumer, instance).await?;
        // Registered at once, so that pruning waits for this consumer before its first ack.
        store.set_cursor(consumer, instance, handed, clock.unix_millis()).await?;
        Ok(Self {
            consumer: consumer.to_owned(),
            instance: instance.to_owned(),
            store,
            clock,
            handed,
            latest,
            wake: None,
        })
    }

    /// Wakes this subscription when another instance stores a transaction: `wake` is the cluster's
    /// subscription to [`WAKE_CHANNEL`]. The poll stays, for when the cluster is down.
    #[must_use]
    pub fn woken_by(mut self, wake: crate::cluster::Subscription) -> Self {
        self.wake = Some(wake);
        self
    }

    /// The next batch of items, in the order they were stored; waits while there is none.
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<Vec<Input>, StoreError> {
        loop {
            // Mark the current version seen before reading, so a commit after the read wakes us.
            self.latest.borrow_and_update();
            let items = self.store.items_after(self.handed, BATCH).await?;
            if let Some(last) = items.last() {
                self.handed = last.id;
                return Ok(items);
            }
            // Commits of this process wake us at once; those of other instances sharing the
            // database through the cluster, or else the poll.
            let wake = &mut self.wake;
            let woken = async {
                match wake {
                    Some(subscription) => subscription.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.latest.changed() => {
                    if changed.is_err() {
                        // The store is gone; nothing more will come.
                        return Ok(Vec::new());
                    }
                }
                // A wake or `Lost` (something may have been missed): look. The end of the
                // cluster (at shutdown) leaves the poll.
                message = woken => {
                    if message.is_none() {
                        self.wake = None;
                    }
                }
                () = self.clock.sleep(POLL_INTERVAL) => {}
            }
        }
    }

    /// Records that every item up to and including `id` has been handled.
    pub async fn ack(&mut self, id: i64) -> Result<(), StoreError> {
        self.store.set_cursor(&self.consumer, &self.instance, id, self.clock.unix_millis()).await
    }
}

/// Prunes the inbox every [`PRUNE_INTERVAL`] (or half the retention, if shorter) until `shutdown`,
/// and counts what it deleted and what remains in [`crate::telemetry::InboxMetrics`].
pub async fn prune(
    store: Arc<Store>,
    retention: Retention,
    metrics: Arc<Metrics>,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let retention_ms = u64::try_from(retention.items_after_ms).unwrap_or(0);
    let interval = PRUNE_INTERVAL.min(Duration::from_millis(retention_ms / 2)).max(Duration::from_secs(1));
    loop {
        prune_once(&store, &retention, &metrics, &clock).await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = clock.sleep(interval) => {}
        }
    }
}

/// One prune, with its metrics.
#[tracing::instrument(name = "inbox.prune", level = "debug", skip_all)]
async fn prune_once(store: &Store, retention: &Retention, metrics: &Metrics, clock: &Clock) {
    match store.prune(clock.unix_millis(), retention).await {
        Ok(pruned) => {
            metrics.inbox.pruned_items.inc_by(pruned.items);
            metrics.inbox.pruned_transactions.inc_by(pruned.transactions);
            if pruned.items > 0 || pruned.transactions > 0 {
                tracing::debug!(
                    items = pruned.items,
                    transactions = pruned.transactions,
                    "inbox.prune: deleted"
                );
            }
        }
        Err(error) => {
            metrics.inbox.prune_errors.inc();
            tracing::warn!(%error, "inbox.prune failed; retrying at the next interval");
            return;
        }
    }
    match store.inbox_len().await {
        Ok(items) => {
            metrics.inbox.items.set(items);
        }
        Err(error) => tracing::warn!(%error, "inbox.prune cannot count the inbox"),
    }
}
