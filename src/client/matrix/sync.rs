//! The client's own `/sync` loop (`GET /_matrix/client/v3/sync`, spec section "Syncing"): to-device
//! events, and optionally `m.room.message` events of joined rooms (the `fallback = room` option),
//! handed to the application through a bounded channel.
//!
//! Invariants:
//! - **One sync loop per device.** The homeserver keeps a device's to-device events until that
//!   device syncs with a `since` token past them; two loops on one access token would each receive
//!   them (duplicates) and race to release them. Run one [`SyncHandle`] per access token.
//! - **Nothing is dropped.** The events of one `/sync` answer are all pushed into the channel
//!   (waiting while it is full: backpressure) before the next `/sync` is made with the new `since`
//!   token; only that request lets the homeserver delete the to-device events. A failed request is
//!   repeated with the same `since`, so its events come again, never twice.
//! - **Persistable position.** After the events of an answer, a [`SyncEvent::Checkpoint`] carries
//!   its `next_batch`: an application that stores it once it has handled the events before it, and
//!   gives it back as [`SyncSettings::since`] after a restart, receives every to-device event
//!   exactly once across restarts. [`SyncHandle::since`] tells the position the loop has reached.
//! - **Bounded retries on a cancellable wait.** Transport failures, `429` and `5xx` are retried
//!   forever with capped exponential backoff on the client's clock (the loop is the client's
//!   lifeline; the application sees the failures in the logs); any other error ends the loop
//!   with that error (such as `M_UNKNOWN_TOKEN`: a new token is needed). Cancelling the token ends
//!   the loop within one poll.

use std::collections::BTreeMap;
use std::time::Duration;

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{MatrixClient, MatrixError};

/// Settings of a sync loop; every field has a documented default ([`SyncSettings::default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSettings {
    /// How long the homeserver may hold a `/sync` open when it has nothing new (long poll).
    /// Default 30 s.
    pub timeout: Duration,
    /// Where to resume: a `next_batch` from an earlier [`SyncEvent::Checkpoint`]. Default `None`:
    /// an initial sync, which delivers every to-device event still stored for this device (and,
    /// with `room_messages`, up to `timeline_limit` recent messages of each joined room).
    pub since: Option<String>,
    /// Also deliver `m.room.message` events of joined rooms, sent by others ([`SyncEvent::RoomMessage`]),
    /// for the `fallback = room` option. Default `false`: to-device events only.
    pub room_messages: bool,
    /// With `room_messages`, most timeline events per room in one answer. A room with more new
    /// messages than this between two syncs loses the oldest ones here (the homeserver marks its
    /// timeline "limited"; they are logged); the delivery layer resends what is unacknowledged.
    /// Default 100.
    pub timeline_limit: u32,
    /// With `room_messages`, join the rooms these users invite us to (the peers). Default empty.
    /// Ignored without `room_messages`.
    pub auto_join_from: Vec<OwnedUserId>,
    /// With `room_messages`, also join the rooms that any Raiden user (a localpart that is an
    /// Ethereum address) invites us to. Default `false`.
    pub auto_join_raiden_users: bool,
    /// Rooms joined on invite at most over the loop's life: any Raiden user can invite us, so this
    /// bounds the rooms (and their timelines in every `/sync`) one account can make us hold.
    /// Invites past it are logged and left. Default 1,000.
    pub max_auto_joins: usize,
    /// Capacity of the event channel, in events (at least 1). Default 256.
    pub channel_capacity: usize,
    /// Wait after the first failed `/sync`; doubles up to `max_backoff`. Default 500 ms.
    pub initial_backoff: Duration,
    /// Longest wait between failed `/sync`s (a longer `retry_after_ms` is honoured). Default 30 s.
    pub max_backoff: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            since: None,
            room_messages: false,
            timeline_limit: 100,
            auto_join_from: Vec::new(),
            auto_join_raiden_users: false,
            max_auto_joins: 1000,
            channel_capacity: 256,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// What the sync loop hands to the application, in the order the homeserver gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncEvent {
    /// A to-device event (delivered once per device by the homeserver).
    ToDevice {
        /// Who sent it.
        sender: OwnedUserId,
        /// Its event type (`m.room.message` for Raiden's messages).
        event_type: String,
        /// Its content (a JSON object).
        content: Value,
    },
    /// An `m.room.message` of a joined room, sent by another user (only with
    /// [`SyncSettings::room_messages`]).
    RoomMessage {
        /// The room.
        room_id: OwnedRoomId,
        /// The event's id (for the application's own de-duplication, if it wants one).
        event_id: Option<OwnedEventId>,
        /// Who sent it.
        sender: OwnedUserId,
        /// Its content (a JSON object).
        content: Value,
    },
    /// Every event of one `/sync` answer has been handed over before this; `next_batch` is where
    /// to resume ([`SyncSettings::since`]) once they are handled. Sent only after answers that
    /// carried events.
    Checkpoint {
        /// The answer's `next_batch` token.
        next_batch: String,
    },
}

/// A running sync loop: its events, its position, and how it ended.
#[derive(Debug)]
pub struct SyncHandle {
    events: mpsc::Receiver<SyncEvent>,
    since: watch::Receiver<Option<String>>,
    task: JoinHandle<Result<(), MatrixError>>,
}

impl SyncHandle {
    /// The next event; `None` once the loop has ended (cancelled, or an error: see
    /// [`SyncHandle::finish`]) and every event before that was received.
    pub async fn recv(&mut self) -> Option<SyncEvent> {
        self.events.recv().await
    }

    /// The `since` token of the next `/sync`: every event before it has been put into the channel
    /// (not necessarily received yet; persist [`SyncEvent::Checkpoint`]s for exactly-once
    /// across restarts). It moves before the answer's checkpoint is sent, so once a checkpoint has
    /// been received it is at least that checkpoint's `next_batch`. `None` before the first answer when started without one.
    pub fn since(&self) -> Option<String> {
        self.since.borrow().clone()
    }

    /// Whether the loop has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the loop to end and returns why: `Ok(())` after cancellation (or when the events
    /// were no longer wanted), the error that stopped it otherwise. Cancel first to stop a loop
    /// that is still running.
    pub async fn finish(self) -> Result<(), MatrixError> {
        drop(self.events);
        match self.task.await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Ok(()),
        }
    }
}

impl MatrixClient {
    /// Starts the sync loop on the current Tokio runtime; it runs until `cancel` is cancelled, the
    /// [`SyncHandle`] is dropped (its channel closed) or an error that retrying cannot fix. Run at
    /// most one per device (see the [module docs](crate::client::matrix::sync)).
    pub fn spawn_sync(&self, settings: SyncSettings, cancel: CancellationToken) -> SyncHandle {
        let (events_tx, events) = mpsc::channel(settings.channel_capacity.max(1));
        let (since_tx, since) = watch::channel(settings.since.clone());
        let client = self.clone();
        let span = tracing::info_span!("client.matrix.sync", room_messages = settings.room_messages);
        let task = tokio::spawn(
            async move { client.run_sync(settings, &events_tx, &since_tx, &cancel).await }.instrument(span),
        );
        SyncHandle { events, since, task }
    }

    async fn run_sync(
        &self,
        settings: SyncSettings,
        events: &mpsc::Sender<SyncEvent>,
        since: &watch::Sender<Option<String>>,
        cancel: &CancellationToken,
    ) -> Result<(), MatrixError> {
        let clock = self.clock().clone();
        let mut failures = 0u32;
        // With room messages, our own user id: the filter leaves out our own messages and invites
        // are addressed to it. Asked (again) until known.
        let mut me: Option<OwnedUserId> = None;
        // Rooms joined on invite so far (bounded by `max_auto_joins`).
        let mut auto_joined = 0usize;
        loop {
            let answer = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                answer = self.sync_step(&settings, since.borrow().clone(), &mut me) => answer,
            };
            let answer = match answer {
                Ok(answer) => {
                    failures = 0;
                    answer
                }
                Err(error) if error.is_retryable() => {
                    failures += 1;
                    let delay = error.retry_after().unwrap_or_else(|| {
                        let exponent = (failures - 1).min(20);
                        settings.initial_backoff.saturating_mul(1 << exponent).min(settings.max_backoff)
                    });
                    tracing::warn!(failures, ?delay, %error, "retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        () = clock.sleep(delay) => continue,
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "stopped");
                    return Err(error);
                }
            };
            if let Some(me) = &me {
                self.auto_join(&settings, me, &answer.invites, &mut auto_joined, cancel).await;
            }
            let carried_events = !answer.events.is_empty();
            for event in answer.events {
                if !push(events, event, cancel).await {
                    return Ok(());
                }
            }
            since.send_replace(Some(answer.next_batch.clone()));
            let checkpoint = SyncEvent::Checkpoint { next_batch: answer.next_batch };
            if carried_events && !push(events, checkpoint, cancel).await {
                return Ok(());
            }
        }
    }

    /// One `/sync` (after `whoami` when our user id is needed and not yet known).
    async fn sync_step(
        &self,
        settings: &SyncSettings,
        since: Option<String>,
        me: &mut Option<OwnedUserId>,
    ) -> Result<Answer, MatrixError> {
        if settings.room_messages && me.is_none() {
            *me = Some(self.whoami_once().await?.user_id);
        }
        let filter = filter(settings, me.as_ref());
        let mut url = self.url(&["_matrix", "client", "v3", "sync"]);
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("filter", &filter.to_string());
            query.append_pair("timeout", &settings.timeout.as_millis().to_string());
            if let Some(since) = &since {
                query.append_pair("since", since);
            }
        }
        let timeout = settings.timeout + self.settings().request_timeout;
        let bytes = self.request_bytes(reqwest::Method::GET, url, None, timeout).await?;
        let response: SyncResponse =
            serde_json::from_slice(&bytes).map_err(|e| MatrixError::InvalidResponse(format!("sync: {e}")))?;
        let me = if settings.room_messages { me.as_ref() } else { None };
        Ok(Answer::from_response(response, me))
    }

    /// Joins the rooms in `invites` whose inviter is one of `settings.auto_join_from` (or any Raiden
    /// user, with `auto_join_raiden_users`), while `joined` is below `settings.max_auto_joins`;
    /// failures are logged (the invite is not offered again by later incremental syncs).
    async fn auto_join(
        &self,
        settings: &SyncSettings,
        me: &OwnedUserId,
        invites: &[(OwnedRoomId, OwnedUserId)],
        joined: &mut usize,
        cancel: &CancellationToken,
    ) {
        for (room_id, inviter) in invites {
            let raiden = settings.auto_join_raiden_users
                && crate::directory::identity::claimed_address(inviter.as_str()).is_some();
            if inviter == me || !(raiden || settings.auto_join_from.contains(inviter)) {
                continue;
            }
            if *joined >= settings.max_auto_joins {
                tracing::warn!(%room_id, %inviter, limit = settings.max_auto_joins, "invite left: rooms joined on invite at the limit");
                continue;
            }
            let outcome = tokio::select! {
                () = cancel.cancelled() => return,
                outcome = self.join_room(room_id) => outcome,
            };
            match outcome {
                Ok(()) => {
                    *joined += 1;
                    tracing::debug!(%room_id, %inviter, "joined on invite");
                }
                Err(error) => tracing::warn!(%room_id, %inviter, %error, "join failed"),
            }
        }
    }
}

/// Puts `event` into the channel, waiting while it is full; `false` when the loop must end (cancelled,
/// or the receiver is gone).
async fn push(events: &mpsc::Sender<SyncEvent>, event: SyncEvent, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        sent = events.send(event) => {
            if sent.is_err() {
                tracing::debug!("the events are no longer wanted");
            }
            sent.is_ok()
        }
    }
}

/// The filter of every `/sync` (sent inline): no presence, account data, ephemeral or state events;
/// to-device events always come (filters do not apply to them). Without room messages no room at
/// all (`rooms: []`); with them the `m.room.message` timeline of joined rooms, without our own.
fn filter(settings: &SyncSettings, me: Option<&OwnedUserId>) -> Value {
    let nothing = json!({ "not_types": ["*"] });
    let room = if settings.room_messages {
        let not_senders: Vec<&str> = me.iter().map(|me| me.as_str()).collect();
        json!({
            "include_leave": false,
            "account_data": nothing,
            "ephemeral": nothing,
            "state": nothing,
            "timeline": {
                "types": ["m.room.message"],
                "not_senders": not_senders,
                "limit": settings.timeline_limit.max(1),
            },
        })
    } else {
        json!({ "rooms": [] })
    };
    json!({ "presence": nothing, "account_data": nothing, "room": room })
}

#[derive(Deserialize)]
struct SyncResponse {
    next_batch: String,
    #[serde(default)]
    to_device: EventList,
    #[serde(default)]
    rooms: Rooms,
}

#[derive(Deserialize, Default)]
struct EventList {
    #[serde(default)]
    events: Vec<Value>,
}

#[derive(Deserialize, Default)]
struct Rooms {
    #[serde(default)]
    join: BTreeMap<String, JoinedRoom>,
    #[serde(default)]
    invite: BTreeMap<String, InvitedRoom>,
}

#[derive(Deserialize)]
struct JoinedRoom {
    #[serde(default)]
    timeline: Timeline,
}

#[derive(Deserialize, Default)]
struct Timeline {
    #[serde(default)]
    events: Vec<Value>,
    #[serde(default)]
    limited: bool,
}

#[derive(Deserialize)]
struct InvitedRoom {
    #[serde(default)]
    invite_state: EventList,
}

/// An event as the homeserver sends it; fields we do not use are ignored.
#[derive(Deserialize)]
struct RawEvent {
    sender: OwnedUserId,
    #[serde(rename = "type")]
    event_type: String,
    content: Value,
    event_id: Option<OwnedEventId>,
    state_key: Option<String>,
}

/// What one `/sync` answer carries for us.
struct Answer {
    next_batch: String,
    events: Vec<SyncEvent>,
    /// Rooms we are invited to, and by whom.
    invites: Vec<(OwnedRoomId, OwnedUserId)>,
}

impl Answer {
    /// Picks the events out of `response`; room messages and invites only when `me` is given.
    /// Events that are not well-formed (no sender, content not an object…) are skipped.
    fn from_response(response: SyncResponse, me: Option<&OwnedUserId>) -> Self {
        let mut events = Vec::new();
        for raw in response.to_device.events {
            match serde_json::from_value::<RawEvent>(raw) {
                Ok(event) if event.content.is_object() => events.push(SyncEvent::ToDevice {
                    sender: event.sender,
                    event_type: event.event_type,
                    content: event.content,
                }),
                _ => tracing::debug!("a malformed to-device event skipped"),
            }
        }
        let mut invites = Vec::new();
        if let Some(me) = me {
            for (room_id, room) in response.rooms.join {
                let Ok(room_id) = RoomId::parse(&room_id) else { continue };
                if room.timeline.limited {
                    tracing::debug!(%room_id, "timeline limited; older messages not fetched");
                }
                for raw in room.timeline.events {
                    let Ok(event) = serde_json::from_value::<RawEvent>(raw) else { continue };
                    if event.event_type != "m.room.message"
                        || !event.content.is_object()
                        || &event.sender == me
                    {
                        continue;
                    }
                    events.push(SyncEvent::RoomMessage {
                        room_id: room_id.clone(),
                        event_id: event.event_id,
                        sender: event.sender,
                        content: event.content,
                    });
                }
            }
            for (room_id, room) in response.rooms.invite {
                let Ok(room_id) = RoomId::parse(&room_id) else { continue };
                let invited_by = room.invite_state.events.into_iter().find_map(|raw| {
                    let event = serde_json::from_value::<RawEvent>(raw).ok()?;
                    let invite = event.event_type == "m.room.member"
                        && event.state_key.as_deref() == Some(me.as_str())
                        && event.content.get("membership").and_then(Value::as_str) == Some("invite");
                    invite.then_some(event.sender)
                });
                if let Some(inviter) = invited_by {
                    invites.push((room_id, inviter));
                }
            }
        }
        Self { next_batch: response.next_batch, events, invites }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> OwnedUserId {
        OwnedUserId::try_from(id).unwrap()
    }

    #[test]
    fn an_answer_yields_to_device_events_in_order_and_skips_malformed_ones() {
        let response: SyncResponse = serde_json::from_value(json!({
            "next_batch": "s2",
            "to_device": { "events": [
                { "sender": "@a:x", "type": "m.room.message", "content": { "body": "1" } },
                { "sender": "not a user", "type": "m.room.message", "content": {} },
                { "sender": "@a:x", "type": "m.room.message", "content": "not an object" },
                { "type": "m.room.message", "content": {} },
                { "sender": "@b:x", "type": "org.switchboard.ack", "content": { "seq": 2 } },
            ]},
            "rooms": { "join": { "!r:x": { "timeline": { "events": [
                { "sender": "@a:x", "type": "m.room.message", "event_id": "$1", "content": { "body": "room" } },
            ]}}}},
        }))
        .unwrap();
        let answer = Answer::from_response(response, None);
        assert_eq!(answer.next_batch, "s2");
        assert_eq!(
            answer.events,
            [
                SyncEvent::ToDevice {
                    sender: user("@a:x"),
                    event_type: "m.room.message".into(),
                    content: json!({ "body": "1" })
                },
                SyncEvent::ToDevice {
                    sender: user("@b:x"),
                    event_type: "org.switchboard.ack".into(),
                    content: json!({ "seq": 2 })
                },
            ],
            "room messages only when asked for"
        );
    }

    #[test]
    fn with_room_messages_others_messages_and_invites_are_picked() {
        let me = user("@me:x");
        let response: SyncResponse = serde_json::from_value(json!({
            "next_batch": "s3",
            "rooms": {
                "join": { "!r:x": { "timeline": { "limited": true, "events": [
                    { "sender": "@a:x", "type": "m.room.message", "event_id": "$1", "content": { "body": "hi" } },
                    { "sender": "@me:x", "type": "m.room.message", "event_id": "$2", "content": { "body": "mine" } },
                    { "sender": "@a:x", "type": "m.room.topic", "event_id": "$3", "content": { "topic": "t" } },
                ]}}},
                "invite": { "!i:x": { "invite_state": { "events": [
                    { "sender": "@a:x", "type": "m.room.name", "state_key": "", "content": { "name": "n" } },
                    { "sender": "@peer:x", "type": "m.room.member", "state_key": "@me:x",
                      "content": { "membership": "invite" } },
                ]}}},
            },
        }))
        .unwrap();
        let answer = Answer::from_response(response, Some(&me));
        assert_eq!(
            answer.events,
            [SyncEvent::RoomMessage {
                room_id: OwnedRoomId::try_from("!r:x").unwrap(),
                event_id: Some(OwnedEventId::try_from("$1").unwrap()),
                sender: user("@a:x"),
                content: json!({ "body": "hi" }),
            }]
        );
        assert_eq!(answer.invites, [(OwnedRoomId::try_from("!i:x").unwrap(), user("@peer:x"))]);
    }

    #[test]
    fn the_filter_asks_for_no_rooms_unless_room_messages_are_wanted() {
        let to_device_only = filter(&SyncSettings::default(), None);
        assert_eq!(to_device_only["room"], json!({ "rooms": [] }));
        assert_eq!(to_device_only["presence"], json!({ "not_types": ["*"] }));
        let settings = SyncSettings { room_messages: true, timeline_limit: 7, ..SyncSettings::default() };
        let with_rooms = filter(&settings, Some(&user("@me:x")));
        assert_eq!(with_rooms["room"]["timeline"]["types"], json!(["m.room.message"]));
        assert_eq!(with_rooms["room"]["timeline"]["not_senders"], json!(["@me:x"]));
        assert_eq!(with_rooms["room"]["timeline"]["limit"], json!(7));
        assert!(with_rooms["room"].get("rooms").is_none(), "all joined rooms");
    }
}
