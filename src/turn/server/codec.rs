//! STUN message building and attribute parsing shared by the handlers.

use std::net::{IpAddr, SocketAddr};

use stun::attributes::{
    ATTR_CHANNEL_NUMBER, ATTR_DATA, ATTR_DONT_FRAGMENT, ATTR_EVEN_PORT, ATTR_FINGERPRINT, ATTR_LIFETIME,
    ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_REQUESTED_ADDRESS_FAMILY, ATTR_REQUESTED_TRANSPORT,
    ATTR_RESERVATION_TOKEN, ATTR_SOFTWARE, ATTR_UNKNOWN_ATTRIBUTES, ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS,
    AttrType,
};
use stun::error_code::{ErrorCode, ErrorCodeAttribute};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{CLASS_ERROR_RESPONSE, CLASS_SUCCESS_RESPONSE, Message, MessageType, Setter};
use stun::xoraddr::XorMappedAddress;

use super::MAGIC_COOKIE;

/// Copies a transaction id into a message being built.
pub(super) struct TransactionIdFrom(pub(super) [u8; 12]);

impl Setter for TransactionIdFrom {
    fn add_to(&self, message: &mut Message) -> Result<(), stun::Error> {
        message.transaction_id = stun::agent::TransactionId(self.0);
        message.write_transaction_id();
        Ok(())
    }
}

/// An XOR address attribute of type `.0`.
pub(super) struct XorAddress(pub(super) AttrType, pub(super) SocketAddr);

impl Setter for XorAddress {
    fn add_to(&self, message: &mut Message) -> Result<(), stun::Error> {
        XorMappedAddress { ip: self.1.ip(), port: self.1.port() }.add_to_as(message, self.0)
    }
}

pub(super) fn random_transaction_id() -> [u8; 12] {
    rand::random()
}

/// A success response to `request` with `attributes`, signed with `key` when given, fingerprinted.
pub(super) fn response(request: &Message, attributes: &[Box<dyn Setter>], key: Option<&[u8]>) -> Vec<u8> {
    build(request, CLASS_SUCCESS_RESPONSE, attributes, key)
}

/// An error response with `code` (and its standard reason).
pub(super) fn error(
    request: &Message,
    code: ErrorCode,
    mut attributes: Vec<Box<dyn Setter>>,
    key: Option<&[u8]>,
) -> Vec<u8> {
    let reason = match code.0 {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached",
        508 => "Insufficient Capacity",
        _ => "",
    };
    attributes.insert(0, Box::new(ErrorCodeAttribute { code, reason: reason.as_bytes().to_vec() }));
    build(request, CLASS_ERROR_RESPONSE, &attributes, key)
}

pub(super) fn build(
    request: &Message,
    class: stun::message::MessageClass,
    attributes: &[Box<dyn Setter>],
    key: Option<&[u8]>,
) -> Vec<u8> {
    let mut message = Message::new();
    message.reset();
    message.write_header();
    let mut result = TransactionIdFrom(request.transaction_id.0).add_to(&mut message);
    message.set_type(MessageType::new(request.typ.method, class));
    for attribute in attributes {
        result = result.and_then(|()| attribute.add_to(&mut message));
    }
    if let Some(key) = key {
        result = result.and_then(|()| MessageIntegrity(key.to_vec()).add_to(&mut message));
    }
    if request.contains(ATTR_FINGERPRINT) || key.is_some() {
        result = result.and_then(|()| FINGERPRINT.add_to(&mut message));
    }
    // Our attributes are well-formed by construction; a failure would be a bug, answered by
    // sending the header alone rather than a half-built message.
    if result.is_err() {
        message.reset();
        message.write_header();
    }
    message.raw
}

/// The first comprehension-required attribute (type < 0x8000) this relay does not understand.
pub(super) fn unknown_required(request: &Message) -> Option<UnknownAttribute> {
    const KNOWN: &[AttrType] = &[
        ATTR_USERNAME,
        ATTR_MESSAGE_INTEGRITY,
        stun::attributes::ATTR_ERROR_CODE,
        ATTR_REALM,
        ATTR_NONCE,
        stun::attributes::ATTR_XORMAPPED_ADDRESS,
        ATTR_CHANNEL_NUMBER,
        ATTR_LIFETIME,
        ATTR_XOR_PEER_ADDRESS,
        ATTR_DATA,
        stun::attributes::ATTR_XOR_RELAYED_ADDRESS,
        ATTR_EVEN_PORT,
        ATTR_REQUESTED_TRANSPORT,
        ATTR_DONT_FRAGMENT,
        ATTR_RESERVATION_TOKEN,
        ATTR_REQUESTED_ADDRESS_FAMILY,
        stun::attributes::ATTR_PRIORITY,
        stun::attributes::ATTR_USE_CANDIDATE,
        ATTR_SOFTWARE,
        ATTR_FINGERPRINT,
    ];
    request
        .attributes
        .0
        .iter()
        .find(|attribute| attribute.typ.value() < 0x8000 && !KNOWN.contains(&attribute.typ))
        .map(|attribute| UnknownAttribute(attribute.typ))
}

/// UNKNOWN-ATTRIBUTES with one type.
pub(super) struct UnknownAttribute(pub(super) AttrType);

impl Setter for UnknownAttribute {
    fn add_to(&self, message: &mut Message) -> Result<(), stun::Error> {
        message.add(ATTR_UNKNOWN_ATTRIBUTES, &self.0.value().to_be_bytes());
        Ok(())
    }
}

/// Decodes an XOR-PEER-ADDRESS (or any XOR address) value.
pub(super) fn decode_xor_address(value: &[u8], transaction_id: &[u8; 12]) -> Option<SocketAddr> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let family = *value.get(1)?;
    let port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]) ^ (MAGIC_COOKIE >> 16) as u16;
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&cookie);
    mask[4..].copy_from_slice(transaction_id);
    let length = match family {
        0x01 => 4,
        0x02 => 16,
        _ => return None,
    };
    let mut octets = [0u8; 16];
    for (i, byte) in value.get(4..4 + length)?.iter().enumerate() {
        octets[i] = byte ^ mask[i];
    }
    let ip = if length == 4 {
        IpAddr::from([octets[0], octets[1], octets[2], octets[3]])
    } else {
        IpAddr::from(octets)
    };
    Some(SocketAddr::new(ip, port))
}
