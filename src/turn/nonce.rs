//! Stateless nonces: `<issue time, 8 hex>` ‖ `<HMAC-SHA256(key, time ‖ client IP), first 8 bytes,
//! 16 hex>`. Checking one needs only the key and the clock, so unauthenticated traffic costs no
//! memory, and a nonce is bound to the client address that received it. 24 characters keep the
//! 401 answer to a minimal Allocate within 3× its size (no amplification).

use std::net::IpAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What a presented nonce is worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    Valid,
    /// Issued by us for this client, but too long ago: answer 438 with a fresh one.
    Stale,
    /// Not one of ours, or issued to another address.
    Invalid,
}

pub struct Nonces {
    key: [u8; 32],
    lifetime_secs: u64,
}

const LENGTH: usize = 24;

impl Nonces {
    pub fn new(key: [u8; 32], lifetime_secs: u64) -> Self {
        Self { key, lifetime_secs }
    }

    /// A nonce for `client`, issued at `now_secs` (unix seconds).
    pub fn issue(&self, client: IpAddr, now_secs: u64) -> String {
        // Truncation to 32 bits: the time wraps in 2106, and the check compares wrapping.
        #[allow(clippy::cast_possible_truncation)]
        let time = now_secs as u32;
        format!("{time:08x}{}", hex::encode(self.mac(time, client)))
    }

    pub fn check(&self, nonce: &str, client: IpAddr, now_secs: u64) -> NonceCheck {
        if nonce.len() != LENGTH || !nonce.is_ascii() {
            return NonceCheck::Invalid;
        }
        let (time, mac) = nonce.split_at(8);
        let Ok(time) = u32::from_str_radix(time, 16) else { return NonceCheck::Invalid };
        let mut presented = [0u8; 8];
        if hex::decode_to_slice(mac, &mut presented).is_err() {
            return NonceCheck::Invalid;
        }
        let expected = self.mac(time, client);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&presented[..], &expected[..])) {
            return NonceCheck::Invalid;
        }
        #[allow(clippy::cast_possible_truncation)]
        let age = (now_secs as u32).wrapping_sub(time);
        if u64::from(age) <= self.lifetime_secs { NonceCheck::Valid } else { NonceCheck::Stale }
    }

    fn mac(&self, time: u32, client: IpAddr) -> [u8; 8] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&time.to_be_bytes());
        match client {
            IpAddr::V4(ip) => mac.update(&ip.octets()),
            IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        let digest = mac.finalize().into_bytes();
        let mut short = [0; 8];
        short.copy_from_slice(&digest[..8]);
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_bound_to_the_client_and_expire() {
        let nonces = Nonces::new([7; 32], 600);
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        let nonce = nonces.issue(client, 1_000);
        assert_eq!(nonce.len(), LENGTH);
        assert_eq!(nonces.check(&nonce, client, 1_000), NonceCheck::Valid);
        assert_eq!(nonces.check(&nonce, client, 1_600), NonceCheck::Valid);
        assert_eq!(nonces.check(&nonce, client, 1_601), NonceCheck::Stale);
        assert_eq!(nonces.check(&nonce, "192.0.2.2".parse().unwrap(), 1_000), NonceCheck::Invalid);
        assert_eq!(Nonces::new([8; 32], 600).check(&nonce, client, 1_000), NonceCheck::Invalid, "other key");
        let mut forged = nonce.clone();
        forged.replace_range(0..8, "000003e9"); // a later time with the old MAC
        assert_eq!(nonces.check(&forged, client, 1_000), NonceCheck::Invalid);
        for garbage in ["", "x", "zzzzzzzzzzzzzzzzzzzzzzzz", "ééééééééééééé"] {
            assert_eq!(nonces.check(garbage, client, 1_000), NonceCheck::Invalid, "{garbage}");
        }
    }
}
