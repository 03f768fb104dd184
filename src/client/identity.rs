//! A Raiden identity for the thin client: a secp256k1 key, the Ethereum address it holds, and the
//! Matrix profile that proves it, as Raiden 3.x nodes set it (reference/raiden-transport.md): the
//! user `@0x<lower-case address>:<server>`, its displayname the `personal_sign` signature of its
//! user id, its avatar URL the capabilities (`mxc://raiden.network/cap?webRTC=1&…`).
//!
//! Switchboard's directory verifies the displayname (`directory::identity::verify_displayname`); a
//! client that publishes its profile with [`publish`] becomes discoverable under its address.
//!
//! Key files hold `0x` and 64 hex digits (one line); [`RaidenKey::create`] writes them readable by
//! the owner only and never over an existing file. The key is never logged or printed.

use std::fmt;
use std::io::Write;
use std::path::Path;

use k256::ecdsa::SigningKey;
use serde_json::json;

use super::matrix::{MatrixClient, MatrixError};
use crate::directory::identity::{Address, personal_sign};

/// The capabilities a Switchboard client announces by default: WebRTC data channels, to-device
/// messages, and Switchboard itself (so that Switchboard bridges signals to it in Matrix VoIP form).
pub const DEFAULT_CAPABILITIES: &str = "Receive=1&Mediate=0&Delivery=1&webRTC=1&toDevice=1&switchboard=1";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("key file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("key file {path}: not a secp256k1 private key (expected 0x and 64 hex digits)")]
    BadKey { path: String },
    #[error("the access token is for {user_id}, not for the key's address {address}")]
    NotTheKeysUser { user_id: String, address: String },
    #[error(transparent)]
    Matrix(#[from] MatrixError),
}

/// A secp256k1 private key and its address.
pub struct RaidenKey {
    key: SigningKey,
    address: Address,
}

impl fmt::Debug for RaidenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaidenKey").field("address", &self.address).finish_non_exhaustive()
    }
}

impl RaidenKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        loop {
            // Fails only for zero or a value above the curve order: about 2^-128 of draws.
            if let Ok(key) = SigningKey::from_slice(&rand::random::<[u8; 32]>()) {
                return Self::from_signing_key(key);
            }
        }
    }

    fn from_signing_key(key: SigningKey) -> Self {
        let address = Address::of_key(key.verifying_key());
        Self { key, address }
    }

    /// The key in `text`: `0x` (optional) and 64 hex digits, surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Option<Self> {
        let digits = text.trim();
        let digits = digits.strip_prefix("0x").unwrap_or(digits);
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(digits, &mut bytes).ok()?;
        SigningKey::from_slice(&bytes).ok().map(Self::from_signing_key)
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| IdentityError::Io { path: path.display().to_string(), source })?;
        Self::from_hex(&text).ok_or_else(|| IdentityError::BadKey { path: path.display().to_string() })
    }

    /// Generates a key and writes it to `path`, which must not exist (mode 0600 on Unix).
    pub fn create(path: &Path) -> Result<Self, IdentityError> {
        let key = Self::generate();
        let io = |source| IdentityError::Io { path: path.display().to_string(), source };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(io)?;
        writeln!(file, "0x{}", hex::encode(key.key.to_bytes())).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(key)
    }

    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The Matrix localpart a Raiden node registers under: `0x` and the lower-case address.
    pub fn localpart(&self) -> String {
        self.address.to_lower_hex()
    }

    /// The displayname that proves `user_id` holds this key's address.
    pub fn displayname(&self, user_id: &str) -> String {
        personal_sign(&self.key, user_id.as_bytes())
    }
}

/// The avatar URL that carries `capabilities` (`Name=value&…`), as Raiden publishes them.
pub fn capabilities_avatar_url(capabilities: &str) -> String {
    format!("mxc://raiden.network/cap?{capabilities}")
}

/// Publishes `key`'s Raiden profile for the user of `matrix`'s access token: its displayname (the
/// signature of its user id) and its capabilities. The user must be the key's (`@0x<address>` on
/// any server, optionally with Raiden's `.xxxxxxxx` suffix); returns its user id.
pub async fn publish(
    matrix: &MatrixClient,
    key: &RaidenKey,
    capabilities: &str,
) -> Result<String, IdentityError> {
    let whoami = matrix.whoami().await?;
    let user_id = whoami.user_id.to_string();
    if crate::directory::identity::claimed_address(&user_id).as_ref() != Some(key.address()) {
        return Err(IdentityError::NotTheKeysUser { user_id, address: key.address().to_checksum() });
    }
    matrix.set_profile_field(&whoami.user_id, "displayname", &json!(key.displayname(&user_id))).await?;
    matrix
        .set_profile_field(&whoami.user_id, "avatar_url", &json!(capabilities_avatar_url(capabilities)))
        .await?;
    Ok(user_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::identity::verify_displayname;

    #[test]
    fn the_displayname_proves_the_address_to_the_directory() {
        let key = RaidenKey::generate();
        let user_id = format!("@{}:example.org", key.localpart());
        assert_eq!(verify_displayname(&user_id, &key.displayname(&user_id)).unwrap(), *key.address());
        let other = RaidenKey::generate();
        assert!(verify_displayname(&user_id, &other.displayname(&user_id)).is_err());
    }

    #[test]
    fn a_created_key_file_loads_back_is_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let created = RaidenKey::create(&path).unwrap();
        assert_eq!(RaidenKey::load(&path).unwrap().address(), created.address());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(matches!(RaidenKey::create(&path), Err(IdentityError::Io { .. })));
        assert_eq!(RaidenKey::load(&path).unwrap().address(), created.address(), "not overwritten");
        assert!(!format!("{created:?}").contains(&std::fs::read_to_string(&path).unwrap().trim()[2..]));
    }

    #[test]
    fn bad_key_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in
            [("short", "0x1234"), ("zero", &format!("0x{}", "0".repeat(64))), ("text", "hello")]
        {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            assert!(matches!(RaidenKey::load(&path), Err(IdentityError::BadKey { .. })), "{name}");
        }
        assert!(matches!(RaidenKey::load(&dir.path().join("missing")), Err(IdentityError::Io { .. })));
    }

    #[test]
    fn a_known_key_has_its_known_address() {
        // The private key 1's address (the generator point's), a well-known Ethereum test vector.
        let key = RaidenKey::from_hex(&format!("0x{:064x}", 1)).unwrap();
        assert_eq!(key.address().to_checksum(), "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf");
    }
}
