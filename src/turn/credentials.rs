//! TURN REST credentials (draft-uberti-behave-turn-rest), the scheme Synapse's
//! `turn_shared_secret` and coturn's `use-auth-secret` share:
//! - username: `<expiry unix seconds>:<user>`;
//! - password: standard padded base64 of HMAC-SHA1(shared secret, username).
//!
//! So credentials minted here, by Synapse's `/voip/turnServer` or by anything else holding the
//! secret are interchangeable, and a relay checks them without any shared state.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha1::Sha1;

/// Credentials for one user, in the shape of Matrix's `/voip/turnServer` answer (without `uris`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// Seconds the credentials stay valid.
    pub ttl: u64,
}

/// Credentials for `user`, valid for `lifetime_secs` from `now_unix_secs`.
pub fn mint(secret: &[u8], user: &str, now_unix_secs: u64, lifetime_secs: u64) -> Credentials {
    let username = format!("{}:{user}", now_unix_secs.saturating_add(lifetime_secs));
    Credentials { password: password(secret, &username), username, ttl: lifetime_secs }
}

/// The password that goes with `username` under `secret`.
pub fn password(secret: &[u8], username: &str) -> String {
    // HMAC accepts keys of any length.
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The expiry (unix seconds) a username carries: the digits before the first `:` (or the whole
/// username, as coturn also accepts). `None` when it is not a REST username.
pub fn expiry(username: &str) -> Option<u64> {
    let digits = username.split_once(':').map_or(username, |(expiry, _)| expiry);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The user a username is for: what follows the expiry (the whole username when it has none).
/// Quotas count this, so minting fresh credentials does not buy more allocations.
pub fn user(username: &str) -> &str {
    username.split_once(':').map_or(username, |(_, user)| user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_base64_hmac_sha1_of_the_username() {
        // RFC 2202 test case 2: HMAC-SHA1("Jefe", "what do ya want for nothing?").
        let expected = base64::engine::general_purpose::STANDARD
            .encode(hex::decode("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79").unwrap());
        assert_eq!(password(b"Jefe", "what do ya want for nothing?"), expected);
    }

    #[test]
    fn minted_username_carries_the_expiry_and_the_user() {
        let credentials = mint(b"secret", "@0xabc:example.org", 1_700_000_000, 86_400);
        assert_eq!(credentials.username, "1700086400:@0xabc:example.org");
        assert_eq!(credentials.password, password(b"secret", &credentials.username));
        assert_eq!(credentials.ttl, 86_400);
        assert_eq!(expiry(&credentials.username), Some(1_700_086_400));
        assert_eq!(user(&credentials.username), "@0xabc:example.org");
        assert_eq!(user("alice"), "alice");
    }

    #[test]
    fn expiry_of_odd_usernames() {
        assert_eq!(expiry("1700000000"), Some(1_700_000_000));
        assert_eq!(expiry("alice"), None);
        assert_eq!(expiry(":alice"), None);
        assert_eq!(expiry("-5:alice"), None);
        assert_eq!(expiry("99999999999999999999999:alice"), None, "overflow");
    }
}
