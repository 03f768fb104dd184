//! The typed stream of stored appservice input that the rest of Switchboard subscribes to.
//!
//! A consumer (the directory, the call broker, …) opens a [`Subscription`] under a stable name, takes
//! batches with [`Subscription::next`] and acknowledges what it has handled with
//! [`Subscription::ack`]. Acknowledgements are persisted, so after a crash or restart everything stored
//! but not yet acknowledged is handed to the consumer again: handling must be idempotent.

use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::watch;

use crate::store::{Store, StoreError, StoredItem};

pub use crate::store::ItemKind;

/// One stored item: a room event, an ephemeral item (EDU) or a to-device message.
pub type Input = StoredItem;

impl StoredItem {
    /// Deserialises the item's JSON (as the homeserver sent it) into a consumer's own type.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> serde_json::Result<T> {
        serde_json::from_str(self.body.get())
    }
}

/// Most items handed out in one batch.
const BATCH: i64 = 500;
/// How often a waiting subscription looks for items committed by another Switchboard instance.
const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A consumer's position in the inbox.
pub struct Subscription {
    consumer: String,
    store: Arc<Store>,
    /// The last id handed out by `next`.
    handed: i64,
    latest: watch::Receiver<i64>,
}

impl Subscription {
    /// Opens the subscription of `consumer` at its last acknowledged item.
    pub async fn open(store: Arc<Store>, consumer: &str) -> Result<Self, StoreError> {
        let latest = store.watch_latest();
        let handed = store.cursor(consumer).await?;
        Ok(Self { consumer: consumer.to_owned(), store, handed, latest })
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
            // database are picked up by the poll.
            tokio::select! {
                changed = self.latest.changed() => {
                    if changed.is_err() {
                        // The store is gone; nothing more will come.
                        return Ok(Vec::new());
                    }
                }
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
    }

    /// Records that every item up to and including `id` has been handled.
    pub async fn ack(&mut self, id: i64) -> Result<(), StoreError> {
        self.store.set_cursor(&self.consumer, id).await
    }
}
