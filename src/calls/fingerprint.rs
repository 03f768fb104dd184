//! A signal's fingerprint for duplicate detection, and its approximate size for the held-bytes
//! bound, in one walk over the content.

use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::{Map, Value};

use crate::signalling::Signal;

/// Bytes counted per JSON value on top of its strings (a rough `Value` footprint).
const VALUE_OVERHEAD: usize = 32;

/// The hash of (sender, event type, content) and the approximate size of the content in bytes.
/// Object keys are hashed in sorted order, so an echo that reorders them is still equal. The walk
/// is iterative: no depth of nesting can overflow the stack.
pub(super) fn fingerprint(signal: &Signal) -> (u64, usize) {
    enum Item<'a> {
        Key(&'a str),
        Value(&'a Value),
    }
    fn push_object<'a>(stack: &mut Vec<Item<'a>>, object: &'a Map<String, Value>) {
        let mut entries: Vec<(&String, &Value)> = object.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (key, value) in entries.into_iter().rev() {
            stack.push(Item::Value(value));
            stack.push(Item::Key(key));
        }
    }

    let mut hasher = DefaultHasher::new();
    signal.from_user.hash(&mut hasher);
    signal.event_type.hash(&mut hasher);
    signal.content.len().hash(&mut hasher);
    let mut bytes = VALUE_OVERHEAD;
    let mut stack = Vec::new();
    push_object(&mut stack, &signal.content);
    while let Some(item) = stack.pop() {
        match item {
            Item::Key(key) => {
                0u8.hash(&mut hasher);
                key.hash(&mut hasher);
                bytes = bytes.saturating_add(key.len());
            }
            Item::Value(value) => {
                bytes = bytes.saturating_add(VALUE_OVERHEAD);
                match value {
                    Value::Null => 1u8.hash(&mut hasher),
                    Value::Bool(b) => {
                        2u8.hash(&mut hasher);
                        b.hash(&mut hasher);
                    }
                    Value::Number(n) => {
                        3u8.hash(&mut hasher);
                        if let Some(u) = n.as_u64() {
                            u.hash(&mut hasher);
                        } else if let Some(i) = n.as_i64() {
                            i.hash(&mut hasher);
                        } else {
                            n.as_f64().map(f64::to_bits).hash(&mut hasher);
                        }
                    }
                    Value::String(s) => {
                        4u8.hash(&mut hasher);
                        s.hash(&mut hasher);
                        bytes = bytes.saturating_add(s.len());
                    }
                    Value::Array(items) => {
                        5u8.hash(&mut hasher);
                        items.len().hash(&mut hasher);
                        stack.extend(items.iter().rev().map(Item::Value));
                    }
                    Value::Object(object) => {
                        6u8.hash(&mut hasher);
                        object.len().hash(&mut hasher);
                        push_object(&mut stack, object);
                    }
                }
            }
        }
    }
    (hasher.finish(), bytes)
}
