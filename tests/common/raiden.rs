//! Raiden identities for tests: a fresh secp256k1 key, its address, and the displayname that proves
//! it (Ethereum `personal_sign` of the user id), as Raiden nodes set it.

use k256::ecdsa::SigningKey;
use serde_json::json;
use sha3::{Digest, Keccak256};

use super::{Synapse, User, urlencode};

/// A Raiden user on `synapse`: registered under its address, its displayname a signature of its
/// user id, its avatar the capabilities `caps` (e.g. `webRTC=1&toDevice=1`).
pub struct Raiden {
    pub user: User,
    /// The checksummed address.
    pub address: String,
}

/// A fresh key and its lower-case `0x` address.
pub fn key() -> (SigningKey, String) {
    loop {
        if let Ok(key) = SigningKey::from_slice(&rand::random::<[u8; 32]>()) {
            let public = key.verifying_key().to_encoded_point(false);
            let hash = Keccak256::digest(&public.as_bytes()[1..]);
            return (key, format!("0x{}", hex::encode(&hash[12..])));
        }
    }
}

/// `personal_sign(message)`: `0x` + r ‖ s ‖ v (v = 27 or 28).
pub fn personal_sign(key: &SigningKey, message: &str) -> String {
    let prefixed = format!("\x19Ethereum Signed Message:\n{}{message}", message.len());
    let digest = Keccak256::digest(prefixed.as_bytes());
    let (signature, recovery) = key.sign_prehash_recoverable(&digest).expect("sign");
    let mut bytes = signature.to_bytes().to_vec();
    bytes.push(27 + recovery.to_byte());
    format!("0x{}", hex::encode(bytes))
}

impl Synapse {
    /// Registers a Raiden user with a valid displayname and the capabilities `caps`.
    pub async fn register_raiden(&self, caps: &str) -> Raiden {
        let (key, address) = key();
        let user = self.register(&address).await;
        let profile =
            |field: &str| format!("/_matrix/client/v3/profile/{}/{field}", urlencode(&user.user_id));
        let displayname = personal_sign(&key, &user.user_id);
        self.call(
            &user,
            reqwest::Method::PUT,
            &profile("displayname"),
            &json!({ "displayname": displayname }),
        )
        .await;
        let avatar = format!("mxc://raiden.network/cap?{caps}");
        self.call(&user, reqwest::Method::PUT, &profile("avatar_url"), &json!({ "avatar_url": avatar }))
            .await;
        let address = switchboard::directory::identity::Address::parse(&address).unwrap().to_checksum();
        Raiden { user, address }
    }
}
