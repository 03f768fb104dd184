//! Protocol v1 of the client WebSocket: JSON text frames, each an object whose `type` names it
//! (docs/protocol.md is the reference; this module is its schema). No IO here: frames are parsed
//! from text and rendered to text.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::EventType;

/// The protocol version this server speaks (`ready.protocol`).
pub const VERSION: u32 = 1;

/// The largest frame a client may send, in bytes of JSON text. A larger one (up to
/// [`HARD_FRAME_BYTES`]) is answered `error` `too_large`; beyond that the socket is closed.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// The largest message the WebSocket layer reads at all; past it the socket is closed with 1009.
pub const HARD_FRAME_BYTES: usize = 2 * MAX_FRAME_BYTES;

/// Addresses in one `watch` or `unwatch` frame, at most.
pub const MAX_ADDRESSES_PER_FRAME: usize = 1_000;

/// The longest `id` a client may put on a frame (its JSON text).
const MAX_ID_BYTES: usize = 128;

/// Close codes (RFC 6455 §7.4; 4000–4999 are ours).
pub mod close {
    /// The connection ended normally (the client left, or its connection dropped).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down or restarting: reconnect (to another instance) at once.
    pub const SERVICE_RESTART: u16 = 1012;
    /// A message larger than [`super::HARD_FRAME_BYTES`].
    pub const TOO_BIG: u16 = 1009;
    /// The homeserver could not check the token (unreachable, or too many unknown tokens from this
    /// address): try again later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The access token is missing, unknown, or was revoked on the homeserver.
    pub const UNAUTHORIZED: u16 = 4001;
    /// No `auth` frame within `auth_timeout_secs`.
    pub const AUTH_TIMEOUT: u16 = 4002;
    /// Persistent abuse: too many error frames (malformed, over the rate) in a row.
    pub const ABUSE: u16 = 4003;
    /// Nothing received for two keepalive periods: the socket is presumed dead.
    pub const KEEPALIVE_TIMEOUT: u16 = 4004;
    /// The user already has `max_connections_per_user` sockets open.
    pub const TOO_MANY_CONNECTIONS: u16 = 4005;
    /// The client stopped reading: `send_queue` frames were waiting for it.
    pub const SLOW_CONSUMER: u16 = 4006;

    /// The reason sent with `code`.
    pub fn reason(code: u16) -> &'static str {
        match code {
            SERVICE_RESTART => "server restarting; reconnect",
            TRY_AGAIN_LATER => "try again later",
            TOO_BIG => "frame too large",
            UNAUTHORIZED => "unauthorized",
            AUTH_TIMEOUT => "no auth frame in time",
            ABUSE => "too many bad frames",
            KEEPALIVE_TIMEOUT => "keepalive timeout",
            TOO_MANY_CONNECTIONS => "too many connections for this user",
            SLOW_CONSUMER => "client not reading",
            _ => "",
        }
    }
}

/// The code of an `error` frame (also what the thin client reads back, `client::signal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, or no string `type`.
    BadFrame,
    /// A `type` this server does not know.
    UnknownType,
    /// A known frame with a missing or malformed field.
    Invalid,
    /// Over [`MAX_FRAME_BYTES`].
    TooLarge,
    /// Over `frames_per_sec`; `retry_after_ms` says when to try again.
    RateLimited,
    /// An `auth` frame on a connection that is already authenticated, or another frame before it.
    NotAuthenticated,
    /// `watch` past `max_watched`.
    TooManyWatched,
    /// `signal`: no user is known to hold the address (none whose displayname proves it).
    UnknownPeer,
    /// `signal`: neither the peer's socket nor the homeserver took it.
    Undeliverable,
    /// `signal`: the call broker refused it; `message` starts with the reason (`too_many_calls`,
    /// `too_many_held`, `not_in_call`, `overloaded`, `malformed`).
    Refused,
    /// `signal`: the same signal was already delivered in this call; not delivered again.
    Duplicate,
    /// `signal`: its call has ended (hangup, reject, expiry, glare); not delivered.
    Late,
    /// `signal`: an invite that lost glare (a `glare` frame names the call that goes on); not
    /// delivered.
    Glare,
    /// Something failed on our side; the message says nothing more.
    Internal,
}

/// A frame from the client. Every frame may carry an `id` (a string or a number), echoed as `ref`.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    Auth { token: String },
    Watch { addresses: Vec<String> },
    Unwatch { addresses: Vec<String> },
    Signal { to: String, call_id: String, event_type: EventType, content: Map<String, Value> },
    Connected { call_id: String },
    Ping,
}

/// A client frame that could not be parsed, with what the `error` frame says.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    /// The frame's `id`, when it could be read.
    pub id: Option<Value>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    id: Option<Value>,
}

#[derive(Deserialize)]
struct AuthFields {
    token: String,
}

#[derive(Deserialize)]
struct AddressesFields {
    addresses: Vec<String>,
}

#[derive(Deserialize)]
struct SignalFields {
    to: String,
    call_id: String,
    event_type: String,
    content: Map<String, Value>,
}

#[derive(Deserialize)]
struct ConnectedFields {
    call_id: String,
}

/// Parses one text frame: its `id` (to echo) and the frame, or the error to answer.
pub fn parse(text: &str) -> Result<(Option<Value>, ClientFrame), FrameError> {
    let bad = |code, message: &'static str, id| FrameError { code, message: Cow::Borrowed(message), id };
    if text.len() > MAX_FRAME_BYTES {
        return Err(bad(ErrorCode::TooLarge, "frames are at most 65536 bytes", None));
    }
    let envelope: Envelope<'_> = serde_json::from_str(text)
        .map_err(|_| bad(ErrorCode::BadFrame, "a frame is a JSON object with a string \"type\"", None))?;
    let id = envelope.id.filter(|id| match id {
        Value::String(text) => text.len() <= MAX_ID_BYTES,
        Value::Number(_) => true,
        _ => false,
    });
    let Some(kind) = envelope.kind else {
        return Err(bad(ErrorCode::BadFrame, "a frame is a JSON object with a string \"type\"", id));
    };
    let invalid = |error: serde_json::Error, id: Option<Value>| FrameError {
        code: ErrorCode::Invalid,
        message: Cow::Owned(format!("{kind}: {error}")),
        id,
    };
    let frame = match kind.as_ref() {
        "auth" => {
            let fields: AuthFields = serde_json::from_str(text).map_err(|e| invalid(e, id.clone()))?;
            ClientFrame::Auth { token: fields.token }
        }
        "watch" | "unwatch" => {
            let fields: AddressesFields = serde_json::from_str(text).map_err(|e| invalid(e, id.clone()))?;
            if fields.addresses.len() > MAX_ADDRESSES_PER_FRAME {
                return Err(bad(ErrorCode::Invalid, "at most 1000 addresses per frame", id));
            }
            if kind == "watch" {
                ClientFrame::Watch { addresses: fields.addresses }
            } else {
                ClientFrame::Unwatch { addresses: fields.addresses }
            }
        }
        "signal" => {
            let fields: SignalFields = serde_json::from_str(text).map_err(|e| invalid(e, id.clone()))?;
            let Some(event_type) = EventType::parse(&fields.event_type) else {
                return Err(bad(
                    ErrorCode::Invalid,
                    "signal: event_type is not an m.call.* type we relay",
                    id,
                ));
            };
            if !valid_call_id(&fields.call_id) {
                return Err(bad(
                    ErrorCode::Invalid,
                    "signal: call_id is 1-255 characters of [0-9a-zA-Z._~|-]",
                    id,
                ));
            }
            // The content's call_id is the frame's.
            let mut content = fields.content;
            content.insert("call_id".to_owned(), Value::String(fields.call_id.clone()));
            ClientFrame::Signal { to: fields.to, call_id: fields.call_id, event_type, content }
        }
        "connected" => {
            let fields: ConnectedFields = serde_json::from_str(text).map_err(|e| invalid(e, id.clone()))?;
            if !valid_call_id(&fields.call_id) {
                return Err(bad(
                    ErrorCode::Invalid,
                    "connected: call_id is 1-255 characters of [0-9a-zA-Z._~|-]",
                    id,
                ));
            }
            ClientFrame::Connected { call_id: fields.call_id }
        }
        "ping" => ClientFrame::Ping,
        _ => return Err(bad(ErrorCode::UnknownType, "unknown frame type", id)),
    };
    Ok((id, frame))
}

/// Matrix's call id grammar (`[0-9a-zA-Z._~-]{1,255}`), plus `|`, which Raiden 3.x call ids
/// (`<address>|<address>|<timestamp>`) contain.
pub fn valid_call_id(call_id: &str) -> bool {
    (1..=255).contains(&call_id.len())
        && call_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~-|".contains(&b))
}

/// How a signal reached its recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// The recipient's WebSocket (on this or another instance).
    Relay,
    /// The homeserver, as a to-device message sent as the caller.
    Matrix,
}

/// TURN servers and credentials for the connection's user (`ready.ice_servers`, `ice_servers`).
#[derive(Debug, Clone, Serialize)]
pub struct IceServers {
    pub uris: Vec<String>,
    pub username: String,
    pub password: String,
    /// Seconds the credentials stay valid; fresh ones are pushed at about half of it.
    pub ttl: u64,
}

/// What the server enforces, so a client can stay within it.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub frames_per_sec: u32,
    pub max_watched: usize,
    pub keepalive_secs: u64,
}

/// A frame to the client.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Ready {
        protocol: u32,
        user_id: String,
        device_id: Option<String>,
        /// The Ethereum address the user provably holds (its displayname is a signature of its user
        /// id), checksummed; `null` until verified.
        address: Option<String>,
        ice_servers: Option<IceServers>,
        limits: Limits,
    },
    IceServers(IceServers),
    /// An address's users and presence: the current state on `watch`, then at every change.
    Presence(Value),
    Signal {
        /// The sender's user id, as its access token (or the homeserver) vouched for it.
        from: String,
        /// The address the sender provably holds, when verified.
        from_address: Option<String>,
        from_device: Option<String>,
        call_id: String,
        event_type: EventType,
        content: Map<String, Value>,
        via: Via,
    },
    Delivered {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Value>,
        via: Via,
    },
    Glare {
        /// The call that lost and is over.
        call_id: String,
        /// The call that goes on.
        winner: String,
    },
    /// A call the broker ended by itself: an invite nobody answered within its lifetime
    /// (`expired`), or an answered call whose sides did not both report `connected` in time
    /// (`failed`).
    CallEnded {
        call_id: String,
        outcome: &'static str,
    },
    Pong {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Value>,
    },
    /// The answer to a `watch`, `unwatch` or `connected` frame that carried an `id`.
    Ok {
        #[serde(rename = "ref")]
        reference: Value,
    },
    Error {
        code: ErrorCode,
        message: Cow<'static, str>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl ErrorCode {
    /// Whether the error is the client's doing (a strike towards closing the socket as abusive),
    /// rather than news about a peer, a call or the server.
    pub fn is_clients_fault(self) -> bool {
        matches!(
            self,
            ErrorCode::BadFrame
                | ErrorCode::UnknownType
                | ErrorCode::Invalid
                | ErrorCode::TooLarge
                | ErrorCode::RateLimited
                | ErrorCode::NotAuthenticated
                | ErrorCode::TooManyWatched
        )
    }
}

impl ServerFrame {
    pub fn error(code: ErrorCode, message: impl Into<Cow<'static, str>>, reference: Option<Value>) -> Self {
        ServerFrame::Error { code, message: message.into(), reference, retry_after_ms: None }
    }

    /// The frame as JSON text.
    pub fn to_text(&self) -> String {
        // Serialising these types cannot fail: string keys, no non-finite floats.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse(text).unwrap_err().code
    }

    #[test]
    fn a_signal_frame_is_parsed_and_its_content_carries_the_call_id() {
        let text = json!({
            "type": "signal", "id": 7, "to": "0xab", "call_id": "c1", "event_type": "m.call.invite",
            "content": {"call_id": "forged", "offer": {"type": "offer", "sdp": "v=0"}, "lifetime": 30000}
        })
        .to_string();
        let (id, frame) = parse(&text).unwrap();
        assert_eq!(id, Some(json!(7)));
        let ClientFrame::Signal { to, call_id, event_type, content } = frame else { panic!("{frame:?}") };
        assert_eq!((to.as_str(), call_id.as_str(), event_type), ("0xab", "c1", EventType::Invite));
        assert_eq!(content["call_id"], "c1");
        assert_eq!(content["lifetime"], 30000);
    }

    #[test]
    fn malformed_frames_get_the_code_that_says_why() {
        assert_eq!(code("not json"), ErrorCode::BadFrame);
        assert_eq!(code("[1, 2]"), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"id": 1}"#), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"type": 5}"#), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"type": "dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type": "watch", "addresses": "0xab"}"#), ErrorCode::Invalid);
        assert_eq!(code(r#"{"type": "auth"}"#), ErrorCode::Invalid);
        let signal = |event_type: &str, call_id: &str| {
            json!({"type": "signal", "to": "0xab", "call_id": call_id, "event_type": event_type, "content": {}})
                .to_string()
        };
        assert_eq!(code(&signal("m.room.message", "c1")), ErrorCode::Invalid);
        assert_eq!(code(&signal("m.call.invite", "")), ErrorCode::Invalid);
        assert_eq!(code(&signal("m.call.invite", "a b")), ErrorCode::Invalid);
        assert_eq!(code(&signal("m.call.invite", &"c".repeat(256))), ErrorCode::Invalid);
        assert!(parse(&signal("m.call.invite", "0xAb|0xCd|1700000000000")).is_ok(), "Raiden call ids pass");
        let huge = json!({"type": "ping", "pad": "x".repeat(MAX_FRAME_BYTES)}).to_string();
        assert_eq!(code(&huge), ErrorCode::TooLarge);
        let many =
            json!({"type": "watch", "addresses": vec!["0xab"; MAX_ADDRESSES_PER_FRAME + 1]}).to_string();
        assert_eq!(code(&many), ErrorCode::Invalid);
    }

    #[test]
    fn the_id_of_a_bad_frame_is_echoed_when_it_can_be_read() {
        let error = parse(r#"{"type": "dance", "id": "a1"}"#).unwrap_err();
        assert_eq!(error.id, Some(json!("a1")));
        let long_id = json!({"type": "dance", "id": "x".repeat(200)}).to_string();
        assert_eq!(parse(&long_id).unwrap_err().id, None, "an overlong id is not echoed");
        assert_eq!(parse(r#"{"type": "dance", "id": {"a": 1}}"#).unwrap_err().id, None);
    }

    #[test]
    fn server_frames_render_with_their_type_and_ref() {
        let delivered = ServerFrame::Delivered { reference: Some(json!(7)), via: Via::Matrix }.to_text();
        assert_eq!(
            serde_json::from_str::<Value>(&delivered).unwrap(),
            json!({"type": "delivered", "ref": 7, "via": "matrix"})
        );
        let error = ServerFrame::error(ErrorCode::UnknownPeer, "no user", None).to_text();
        assert_eq!(
            serde_json::from_str::<Value>(&error).unwrap(),
            json!({"type": "error", "code": "unknown_peer", "message": "no user"})
        );
        let presence = ServerFrame::Presence(json!({"address": "0xAb", "reachable": true})).to_text();
        assert_eq!(
            serde_json::from_str::<Value>(&presence).unwrap(),
            json!({"type": "presence", "address": "0xAb", "reachable": true})
        );
    }
}
