//! Raiden capabilities, carried in the user's `avatar_url`:
//! `mxc://raiden.network/cap?Receive=1&Mediate=1&Delivery=1&webRTC=1&toDevice=1&immutableMetadata=1`.
//!
//! Parsed into a map by name (order-insensitive, unknown names kept); `1`/`0` (and `true`/`false`)
//! are flags, anything else is kept as text. Rendering writes names in sorted order, flags as `1`/`0`.

use std::collections::BTreeMap;

use serde::Serialize;

/// The prefix of a capabilities `avatar_url`.
pub const PREFIX: &str = "mxc://raiden.network/cap";

/// One capability value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Flag(bool),
    Text(String),
}

/// Capabilities by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Capabilities(BTreeMap<String, Value>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Raiden capabilities URL ({PREFIX}?name=value&…)")]
pub struct NotCapabilities;

impl Capabilities {
    /// Parses an `avatar_url`; anything that is not a capabilities URL is an error.
    pub fn parse(avatar_url: &str) -> Result<Self, NotCapabilities> {
        let rest = avatar_url.strip_prefix(PREFIX).ok_or(NotCapabilities)?;
        let query = match rest {
            "" => "",
            rest => rest.strip_prefix('?').ok_or(NotCapabilities)?,
        };
        let map = url::form_urlencoded::parse(query.as_bytes())
            .filter(|(name, _)| !name.is_empty())
            .map(|(name, value)| {
                let value = match value.as_ref() {
                    "1" | "true" => Value::Flag(true),
                    "0" | "false" => Value::Flag(false),
                    _ => Value::Text(value.into_owned()),
                };
                (name.into_owned(), value)
            })
            .collect();
        Ok(Self(map))
    }

    /// A flag's value; `None` when absent or not a flag.
    pub fn flag(&self, name: &str) -> Option<bool> {
        match self.0.get(name) {
            Some(Value::Flag(flag)) => Some(*flag),
            _ => None,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    /// Whether the peer can upgrade to a WebRTC data channel (`webRTC=1`).
    pub fn webrtc(&self) -> bool {
        self.flag("webRTC") == Some(true)
    }

    /// The `avatar_url` form, names in sorted order.
    pub fn render(&self) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in &self.0 {
            let value = match value {
                Value::Flag(true) => "1",
                Value::Flag(false) => "0",
                Value::Text(text) => text,
            };
            query.append_pair(name, value);
        }
        let query = query.finish();
        if query.is_empty() { PREFIX.to_owned() } else { format!("{PREFIX}?{query}") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAIDEN: &str =
        "mxc://raiden.network/cap?Receive=1&Mediate=1&Delivery=1&webRTC=1&toDevice=1&immutableMetadata=1";

    #[test]
    fn raiden_capabilities_parse_into_flags() {
        let caps = Capabilities::parse(RAIDEN).unwrap();
        for name in ["Receive", "Mediate", "Delivery", "webRTC", "toDevice", "immutableMetadata"] {
            assert_eq!(caps.flag(name), Some(true), "{name}");
        }
        assert!(caps.webrtc());
        assert_eq!(caps.flag("Missing"), None);
    }

    #[test]
    fn order_does_not_matter_and_unknown_names_are_kept() {
        let a =
            Capabilities::parse("mxc://raiden.network/cap?webRTC=0&Receive=1&future=v2&note=a%20b").unwrap();
        let b = Capabilities::parse("mxc://raiden.network/cap?note=a+b&Receive=true&future=v2&webRTC=false")
            .unwrap();
        assert_eq!(a, b);
        assert!(!a.webrtc());
        assert_eq!(a.get("future"), Some(&Value::Text("v2".to_owned())));
        assert_eq!(a.get("note"), Some(&Value::Text("a b".to_owned())));
    }

    #[test]
    fn rendering_round_trips() {
        let caps = Capabilities::parse(RAIDEN).unwrap();
        let rendered = caps.render();
        assert_eq!(
            rendered,
            "mxc://raiden.network/cap?Delivery=1&Mediate=1&Receive=1&immutableMetadata=1&toDevice=1&webRTC=1"
        );
        assert_eq!(Capabilities::parse(&rendered).unwrap(), caps);
        let odd = Capabilities::parse("mxc://raiden.network/cap?x=a%26b%3Dc").unwrap();
        assert_eq!(Capabilities::parse(&odd.render()).unwrap(), odd);
        assert_eq!(Capabilities::parse(PREFIX).unwrap().render(), PREFIX);
    }

    #[test]
    fn other_urls_are_not_capabilities() {
        for url in [
            "",
            "mxc://example.org/avatar",
            "mxc://raiden.network/capx?a=1",
            "https://raiden.network/cap?a=1",
        ] {
            assert_eq!(Capabilities::parse(url), Err(NotCapabilities), "{url}");
        }
    }

    #[test]
    fn serialises_as_a_json_map() {
        let caps = Capabilities::parse("mxc://raiden.network/cap?webRTC=1&v=2.0").unwrap();
        assert_eq!(serde_json::to_string(&caps).unwrap(), r#"{"v":"2.0","webRTC":true}"#);
    }
}
