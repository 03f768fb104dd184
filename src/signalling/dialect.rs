//! Translation between [`super::Signal`] and what Matrix clients send (provisional: Matrix VoIP
//! to-device only; the full module, with Raiden's dialect and room events, replaces it).

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{EventType, Signal};
use crate::directory::capabilities::Capabilities;
use crate::store::{ItemKind, StoredItem};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Voip,
    Raiden,
}

pub struct ToDevice {
    pub event_type: &'static str,
    pub txn_id: String,
    pub content: Value,
}

pub fn to_device(signal: &Signal, dialect: Dialect) -> Option<ToDevice> {
    match dialect {
        Dialect::Voip => Some(ToDevice {
            event_type: signal.event_type.as_str(),
            txn_id: txn_id(signal, dialect),
            content: Value::Object(signal.content.clone()),
        }),
        Dialect::Raiden => None,
    }
}

pub fn txn_id(signal: &Signal, dialect: Dialect) -> String {
    let mut hash = Sha256::new();
    for part in [
        signal.from_user.as_str(),
        signal.from_device.as_deref().unwrap_or(""),
        signal.to_user.as_str(),
        signal.event_type.as_str(),
        if dialect == Dialect::Voip { "voip" } else { "raiden" },
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hash.update(Value::Object(signal.content.clone()).to_string().as_bytes());
    format!("sbs{}", hex::encode(&hash.finalize()[..16]))
}

pub struct Incoming {
    pub signal: Signal,
    pub dialect: Dialect,
    pub route: Route,
}

pub enum Route {
    ToDevice,
    Room { room_id: String },
}

pub fn from_item(item: &StoredItem) -> Option<Incoming> {
    #[derive(serde::Deserialize)]
    struct ToDeviceItem {
        sender: String,
        to_user_id: String,
        content: serde_json::Map<String, Value>,
    }
    if item.kind != ItemKind::ToDevice {
        return None;
    }
    let event_type = EventType::parse(&item.event_type)?;
    let parsed: ToDeviceItem = item.parse().ok()?;
    let call_id = parsed.content.get("call_id")?.as_str()?.to_owned();
    Some(Incoming {
        signal: Signal {
            from_user: parsed.sender,
            from_device: parsed.content.get("party_id").and_then(Value::as_str).map(str::to_owned),
            to_user: parsed.to_user_id,
            call_id,
            event_type,
            content: parsed.content,
        },
        dialect: Dialect::Voip,
        route: Route::ToDevice,
    })
}

pub fn dialect_for(last_seen: Option<Dialect>, capabilities: Option<&Capabilities>) -> Dialect {
    let _ = capabilities;
    last_seen.unwrap_or(Dialect::Voip)
}
