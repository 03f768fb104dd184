//! The directory as a running service: the model behind a lock, fed by the inbox, saved to the store,
//! and a broadcast of what changed.
//!
//! Inbox items it reads:
//! - `m.room.member` events with `membership: join`: the user's (`state_key`) displayname and
//!   avatar_url, as of joining or changing profile;
//! - `m.presence` ephemeral items: the sender's presence and `last_active_ago`;
//! - any other event a Raiden user sends: its `origin_server_ts` as last activity.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::model::{Change, Directory, Presence};
use super::{restore, to_row};
use crate::appservice::inbox::{Input, ItemKind, Subscription};
use crate::store::{Store, StoreError};

/// Name of the directory's inbox subscription.
pub const CONSUMER: &str = "directory";
/// Changes buffered for slow feed subscribers before they start missing some.
const FEED_CAPACITY: usize = 4096;

pub struct DirectoryService {
    model: RwLock<Directory>,
    changes: broadcast::Sender<Change>,
    store: Arc<Store>,
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

impl DirectoryService {
    /// Loads the stored directory; presence learnt more than `stale_after_ms` ago counts as offline.
    pub async fn load(store: Arc<Store>, now_ms: i64, stale_after_ms: i64) -> Result<Arc<Self>, StoreError> {
        let rows = store.directory_users().await?;
        let model = RwLock::new(restore(&rows, now_ms, stale_after_ms));
        Ok(Arc::new(Self { model, changes: broadcast::Sender::new(FEED_CAPACITY), store }))
    }

    /// The directory, for reading.
    pub fn read(&self) -> RwLockReadGuard<'_, Directory> {
        self.model.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes as they happen (per address: profile/verification or presence).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Applies a batch of inbox items at `now_ms` and saves the users it touched.
    pub async fn apply(&self, items: &[Input], now_ms: i64) -> Result<(), StoreError> {
        let (changes, touched) = {
            let mut model = self.model.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut changes = Vec::new();
            let mut touched = Vec::new();
            for item in items {
                if let Some(user_id) = apply_item(&mut model, item, now_ms, &mut changes) {
                    touched.push(user_id);
                }
            }
            touched.sort();
            touched.dedup();
            let rows: Vec<_> = touched.iter().filter_map(|id| model.user(id)).map(to_row).collect();
            (changes, rows)
        };
        if !touched.is_empty() {
            self.store.save_directory_users(&touched).await?;
        }
        for change in changes {
            // No subscriber is fine.
            let _ = self.changes.send(change);
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
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        }
    }
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
            ));
            model.user(user_id).map(|user| user.user_id.clone())
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
        _ => None,
    }
}
