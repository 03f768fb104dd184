//! Raiden identities: user ids `@0x<40 hex>[.<8 hex>]:<server>`, and the displayname that proves the
//! user holds the address — an Ethereum `personal_sign` signature of the full user id.
//!
//! `personal_sign(message)` signs keccak256("\x19Ethereum Signed Message:\n" ‖ decimal length ‖
//! message) with secp256k1; the signature is r ‖ s ‖ v (65 bytes, v = 27 or 28) written as `0x` and
//! 130 hex digits. Recovering the public key from it and hashing that key gives the signer's address.
//! A user is bound to an address only when the recovered address equals its localpart's.

use std::fmt;

use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};
use sha3::{Digest, Keccak256};

/// A 20-byte Ethereum address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address([u8; 20]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("an address is 0x followed by 40 hex digits")]
    Malformed,
    #[error("the mixed-case address fails its EIP-55 checksum")]
    BadChecksum,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("a signature is 0x followed by 130 hex digits")]
    Malformed,
    #[error("the signature's v is {0}, not 27 or 28")]
    BadV(u8),
    #[error("no public key recovers from this signature")]
    Unrecoverable,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("not a Raiden user id (@0x<40 hex>[.<8 hex>]:<server>)")]
    NotRaidenUser,
    #[error("displayname is not a signature: {0}")]
    Signature(#[from] SignatureError),
    #[error("the displayname was signed by {recovered}, not by {claimed}")]
    Mismatch { claimed: Address, recovered: Address },
}

impl Address {
    /// Parses `0x` and 40 hex digits: all lower case, all upper case, or EIP-55 checksummed.
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        let digits = text.strip_prefix("0x").ok_or(AddressError::Malformed)?;
        if digits.len() != 40 {
            return Err(AddressError::Malformed);
        }
        let mut bytes = [0; 20];
        hex::decode_to_slice(digits, &mut bytes).map_err(|_| AddressError::Malformed)?;
        let address = Address(bytes);
        let mixed_case =
            digits.bytes().any(|b| b.is_ascii_lowercase()) && digits.bytes().any(|b| b.is_ascii_uppercase());
        if mixed_case && address.to_checksum()[2..] != *digits {
            return Err(AddressError::BadChecksum);
        }
        Ok(address)
    }

    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// `0x` and 40 lower-case hex digits, as in Raiden user ids.
    pub fn to_lower_hex(&self) -> String {
        format!("0x{}", hex::encode(self.0))
    }

    /// The EIP-55 checksummed form (`0x5aAeb6…`): a hex digit is upper case when the matching nibble
    /// of keccak256(lower-case hex) is 8 or more.
    pub fn to_checksum(&self) -> String {
        let lower = hex::encode(self.0);
        let hash = Keccak256::digest(lower.as_bytes());
        let mut out = String::with_capacity(42);
        out.push_str("0x");
        for (i, c) in lower.chars().enumerate() {
            let nibble = if i % 2 == 0 { hash[i / 2] >> 4 } else { hash[i / 2] & 0x0f };
            out.push(if nibble >= 8 { c.to_ascii_uppercase() } else { c });
        }
        out
    }

    /// The address of an uncompressed secp256k1 public key: the last 20 bytes of its keccak256.
    pub fn of_key(key: &VerifyingKey) -> Self {
        let point = key.to_encoded_point(false);
        let hash = Keccak256::digest(&point.as_bytes()[1..]);
        let mut bytes = [0; 20];
        bytes.copy_from_slice(&hash[12..]);
        Address(bytes)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_checksum())
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.to_checksum())
    }
}

/// The address a Raiden user id claims: `@0x<40 hex>[.<8 lower-case hex>]:<server>`.
pub fn claimed_address(user_id: &str) -> Option<Address> {
    let rest = user_id.strip_prefix('@')?;
    let (localpart, server) = rest.split_once(':')?;
    if server.is_empty() {
        return None;
    }
    let (address, suffix) = match localpart.split_once('.') {
        Some((address, suffix)) => (address, Some(suffix)),
        None => (localpart, None),
    };
    if let Some(suffix) = suffix
        && (suffix.len() != 8 || !suffix.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    {
        return None;
    }
    // Matrix localparts are lower case; the registration namespace also admits upper-case hex.
    let digits = address.strip_prefix("0x")?;
    if digits.len() != 40 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Address::parse(&format!("0x{}", digits.to_ascii_lowercase())).ok()
}

/// The hash that `personal_sign` signs.
fn personal_message_hash(message: &[u8]) -> [u8; 32] {
    let mut hash = Keccak256::new();
    hash.update(b"\x19Ethereum Signed Message:\n");
    hash.update(message.len().to_string().as_bytes());
    hash.update(message);
    hash.finalize().into()
}

/// The address that produced `signature` (`0x` + 130 hex) over `message` with `personal_sign`.
pub fn recover_signer(message: &[u8], signature: &str) -> Result<Address, SignatureError> {
    let digits = signature.strip_prefix("0x").ok_or(SignatureError::Malformed)?;
    if digits.len() != 130 {
        return Err(SignatureError::Malformed);
    }
    let mut bytes = [0; 65];
    hex::decode_to_slice(digits, &mut bytes).map_err(|_| SignatureError::Malformed)?;
    let v = bytes[64];
    let mut parity = match v {
        27 | 28 => v - 27,
        other => return Err(SignatureError::BadV(other)),
    };
    let mut signature = Signature::from_slice(&bytes[..64]).map_err(|_| SignatureError::Unrecoverable)?;
    // Ethereum's ecrecover accepts a high s; the same signature with s' = n - s has the other parity.
    if let Some(normalized) = signature.normalize_s() {
        signature = normalized;
        parity ^= 1;
    }
    let recovery_id = RecoveryId::from_byte(parity).ok_or(SignatureError::BadV(v))?;
    let key = VerifyingKey::recover_from_prehash(&personal_message_hash(message), &signature, recovery_id)
        .map_err(|_| SignatureError::Unrecoverable)?;
    Ok(Address::of_key(&key))
}

/// Ethereum's `personal_sign` of `message` with `key`: `0x` + r ‖ s ‖ v (v = 27 or 28), as Raiden
/// signs its displayname; [`recover_signer`] reads it back.
pub fn personal_sign(key: &k256::ecdsa::SigningKey, message: &[u8]) -> String {
    // A 32-byte digest is always a valid prehash for secp256k1; signing it cannot fail.
    let (signature, recovery) =
        key.sign_prehash_recoverable(&personal_message_hash(message)).expect("a 32-byte prehash signs");
    let mut bytes = signature.to_bytes().to_vec();
    bytes.push(27 + recovery.to_byte());
    format!("0x{}", hex::encode(bytes))
}

/// Checks that `displayname` is a signature of `user_id` by the address `user_id` claims.
pub fn verify_displayname(user_id: &str, displayname: &str) -> Result<Address, IdentityError> {
    let claimed = claimed_address(user_id).ok_or(IdentityError::NotRaidenUser)?;
    let recovered = recover_signer(user_id.as_bytes(), displayname.trim())?;
    if recovered == claimed { Ok(claimed) } else { Err(IdentityError::Mismatch { claimed, recovered }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eip55_checksums_match_the_eip_examples() {
        // The test vectors of EIP-55.
        for checksummed in [
            "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
            "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
            "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
            "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        ] {
            let address = Address::parse(checksummed).unwrap();
            assert_eq!(address.to_checksum(), checksummed);
            assert_eq!(Address::parse(&checksummed.to_lowercase()).unwrap(), address);
            assert_eq!(Address::parse(&format!("0x{}", checksummed[2..].to_uppercase())).unwrap(), address);
        }
        assert_eq!(
            Address::parse("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD"),
            Err(AddressError::BadChecksum)
        );
        for bad in [
            "",
            "0x",
            "5aaeb6053f3e94c9b9a09f33669435e7ef1beaed",
            "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beae",
            "0xzzaeb6053f3e94c9b9a09f33669435e7ef1beaed",
        ] {
            assert_eq!(Address::parse(bad), Err(AddressError::Malformed), "{bad}");
        }
    }

    #[test]
    fn raiden_user_ids_claim_their_localpart_address() {
        let address = "0x6e46b62a245d9ee7758b8dd4b3f7e6f8fe4fec40";
        let expected = Address::parse(address).unwrap();
        assert_eq!(claimed_address(&format!("@{address}:example.org")), Some(expected));
        assert_eq!(claimed_address(&format!("@{address}.0a1b2c3d:example.org")), Some(expected));
        assert_eq!(
            claimed_address(&format!("@{}:example.org", address.to_uppercase().replace("0X", "0x"))),
            Some(expected)
        );
        for bad in [
            format!("{address}:example.org"),
            format!("@{address}"),
            format!("@{address}:"),
            format!("@{address}.0A1B2C3D:example.org"),
            format!("@{address}.0a1b2c:example.org"),
            format!("@{}:example.org", &address[..41]),
            "@alice:example.org".to_owned(),
        ] {
            assert_eq!(claimed_address(&bad), None, "{bad}");
        }
    }

    #[test]
    fn displayname_signed_by_the_user_address_verifies() {
        // Signed with eth-account's `Account.sign_message(encode_defunct(text=user_id))` using the
        // well-known example key 0x4c0883a6…f362318 (address 0x2c7536E3…a65c23).
        let user = "@0x2c7536e3605d9c16a7a3d7b1898e529396a65c23:example.org";
        let signature = "0x465cfd0e1acba2f1142a1e5c1c0aa539a23871410ae2cfcfbea5f058c610c626\
                         702365fe24a5978f29c219626059474727eb1a9967497a989805c0217fc68c8a1b";
        let address = verify_displayname(user, signature).unwrap();
        assert_eq!(address.to_checksum(), "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23");
        // The same signature does not prove another user id (an impostor copying a displayname).
        let other = "@0x2c7536e3605d9c16a7a3d7b1898e529396a65c23:evil.example";
        assert!(matches!(verify_displayname(other, signature), Err(IdentityError::Mismatch { .. })));
        // Flipping v recovers some other key: not the user.
        let flipped = format!("{}1c", &signature[..130]);
        assert!(matches!(verify_displayname(user, &flipped), Err(IdentityError::Mismatch { .. })));
    }

    #[test]
    fn bad_signatures_are_typed_errors() {
        let user = "@0x6e46b62a245d9ee7758b8dd4b3f7e6f8fe4fec40:example.org";
        let zeros = format!("0x{}", "0".repeat(130));
        assert_eq!(recover_signer(user.as_bytes(), &zeros), Err(SignatureError::BadV(0)));
        assert_eq!(recover_signer(user.as_bytes(), "0x1234"), Err(SignatureError::Malformed));
        assert_eq!(recover_signer(user.as_bytes(), &"1".repeat(132)), Err(SignatureError::Malformed));
        assert_eq!(
            recover_signer(user.as_bytes(), &format!("0x{}", "g".repeat(130))),
            Err(SignatureError::Malformed)
        );
        let r_zero = format!("0x{}{}", "0".repeat(128), "1b");
        assert_eq!(recover_signer(user.as_bytes(), &r_zero), Err(SignatureError::Unrecoverable));
        assert_eq!(verify_displayname("@alice:example.org", &zeros), Err(IdentityError::NotRaidenUser));
    }
}
