//! Raiden identities for tests: a fresh secp256k1 key, its address, and the displayname that proves
//! it (Ethereum `personal_sign` of the user id), as Raiden nodes set it, published through the
//! client library (`switchboard::client::identity::publish`).

use switchboard::client::identity::{RaidenKey, publish};
use switchboard::client::matrix::{MatrixClient, Settings};

use super::{Synapse, User};

/// A Raiden user on `synapse`: registered under its address, its displayname a signature of its
/// user id, its avatar the capabilities `caps` (e.g. `webRTC=1&toDevice=1`).
pub struct Raiden {
    pub user: User,
    /// The checksummed address.
    pub address: String,
}

impl Synapse {
    /// Registers a Raiden user with a valid displayname and the capabilities `caps`.
    pub async fn register_raiden(&self, caps: &str) -> Raiden {
        let key = RaidenKey::generate();
        let user = self.register(&key.localpart()).await;
        // The library's own path: whoami, then displayname and avatar URL with the user's token.
        let homeserver = url::Url::parse(&self.base_url).unwrap();
        let matrix = MatrixClient::new(&homeserver, user.access_token.clone(), Settings::default()).unwrap();
        let user_id = publish(&matrix, &key, caps).await.expect("the Raiden profile is published");
        assert_eq!(user_id, user.user_id);
        Raiden { user, address: key.address().to_checksum() }
    }
}
