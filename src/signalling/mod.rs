//! Signalling: WebRTC offer, answer, candidates and hangup between two users, carried over the
//! client WebSocket (`GET /_switchboard/client/v1/connect`, docs/protocol.md) when the peer has one,
//! and over Matrix (to-device, sent as the calling user) when it has not.
//!
//! [`Signal`] is what the modules share: the WebSocket protocol produces and consumes it, the
//! dialects ([`dialect`]) translate it to and from what Matrix clients and Raiden nodes send, and
//! the call broker ([`crate::calls`]) judges it.

pub mod api;
pub mod dialect;
pub mod hub;
pub mod protocol;
pub mod service;
mod socket;

use std::fmt;

use serde_json::{Map, Value};

/// The Matrix VoIP (v1) event types a signal can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    Invite,
    Answer,
    Candidates,
    SelectAnswer,
    Negotiate,
    Hangup,
    Reject,
}

impl EventType {
    pub const ALL: [EventType; 7] = [
        EventType::Invite,
        EventType::Answer,
        EventType::Candidates,
        EventType::SelectAnswer,
        EventType::Negotiate,
        EventType::Hangup,
        EventType::Reject,
    ];

    /// The Matrix event type, e.g. `m.call.invite`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Invite => "m.call.invite",
            EventType::Answer => "m.call.answer",
            EventType::Candidates => "m.call.candidates",
            EventType::SelectAnswer => "m.call.select_answer",
            EventType::Negotiate => "m.call.negotiate",
            EventType::Hangup => "m.call.hangup",
            EventType::Reject => "m.call.reject",
        }
    }

    /// The event type named `name` (`m.call.invite`, …), if it is one of ours.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|event_type| event_type.as_str() == name)
    }

    /// Whether this signal ends a call (hangup, reject).
    pub fn ends_call(self) -> bool {
        matches!(self, EventType::Hangup | EventType::Reject)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One signal from one user to another, whichever way it came and goes. `content` is Matrix VoIP v1
/// content (`call_id`, `party_id`, `version`, `lifetime`, `offer`/`answer`, `candidates`, …), with
/// `call_id` equal to [`Signal::call_id`].
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    /// The sender, as the homeserver or the sender's access token vouched for it (never as a client
    /// claimed it).
    pub from_user: String,
    /// The sender's device, when known.
    pub from_device: Option<String>,
    /// The recipient user.
    pub to_user: String,
    pub call_id: String,
    pub event_type: EventType,
    pub content: Map<String, Value>,
}
