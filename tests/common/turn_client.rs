//! A raw STUN/TURN client for the relay's tests: messages built with the `stun` crate and sent
//! from its own UDP socket, long-term credentials minted with the test secret.

use std::net::SocketAddr;
use std::time::Duration;

use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_INDICATION, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, Getter, METHOD_ALLOCATE,
    METHOD_CREATE_PERMISSION, METHOD_SEND, Message, MessageType, Method, Setter,
};
use stun::textattrs::TextAttribute;
use tokio::net::UdpSocket;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;

pub const WAIT: Duration = Duration::from_secs(2);

/// A TURN client speaking raw messages from its own UDP socket.
pub struct Client {
    pub socket: UdpSocket,
    pub server: SocketAddr,
    pub username: String,
    pub password: String,
    /// REALM and NONCE from the last challenge.
    pub challenge: Option<(String, String)>,
}

impl Client {
    pub async fn new(server: SocketAddr, user: &str) -> Self {
        Self::with_secret(server, user, super::TURN_SECRET.as_bytes(), 600).await
    }

    pub async fn with_secret(server: SocketAddr, user: &str, secret: &[u8], lifetime_secs: i64) -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let now = now.checked_add_signed(lifetime_secs).unwrap();
        let username = format!("{now}:{user}");
        let password = switchboard::turn::credentials::password(secret, &username);
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Self { socket, server, username, password, challenge: None }
    }

    pub fn local(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    /// A message of `method`/`class` with `attributes`, signed when a challenge was answered.
    pub fn build(&self, method: Method, attributes: Vec<Box<dyn Setter>>, sign: bool) -> Vec<u8> {
        let mut all: Vec<Box<dyn Setter>> = vec![
            Box::new(stun::agent::TransactionId::new()),
            Box::new(MessageType::new(method, CLASS_REQUEST)),
        ];
        all.extend(attributes);
        if let (true, Some((realm, nonce))) = (sign, &self.challenge) {
            all.push(Box::new(TextAttribute::new(ATTR_USERNAME, self.username.clone())));
            all.push(Box::new(TextAttribute::new(ATTR_REALM, realm.clone())));
            all.push(Box::new(TextAttribute::new(ATTR_NONCE, nonce.clone())));
            all.push(Box::new(MessageIntegrity::new_long_term_integrity(
                self.username.clone(),
                realm.clone(),
                self.password.clone(),
            )));
        }
        let mut message = Message::new();
        message.build(&all).unwrap();
        message.raw
    }

    /// Sends `bytes` and waits for the answer with the same transaction id (`None` after 2 s).
    pub async fn exchange(&self, bytes: &[u8]) -> Option<(Vec<u8>, Message)> {
        self.socket.send_to(bytes, self.server).await.unwrap();
        let mut buffer = vec![0u8; 65_536];
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (length, _) =
                tokio::time::timeout_at(deadline, self.socket.recv_from(&mut buffer)).await.ok()?.unwrap();
            let raw = buffer[..length].to_vec();
            let mut message = Message::new();
            message.raw.clone_from(&raw);
            if message.decode().is_ok() && raw[8..20] == bytes[8..20] {
                return Some((raw, message));
            }
        }
    }

    /// A signed request; the answer.
    pub async fn request(&self, method: Method, attributes: Vec<Box<dyn Setter>>) -> Message {
        self.exchange(&self.build(method, attributes, true)).await.expect("an answer").1
    }

    /// The 401 dance and an Allocate of a UDP relay; the answer.
    pub async fn allocate(&mut self, mut attributes: Vec<Box<dyn Setter>>) -> Message {
        let (_, challenge) =
            self.exchange(&self.build(METHOD_ALLOCATE, vec![udp()], false)).await.expect("a challenge");
        assert_eq!(code(&challenge), Some(401));
        self.learn(&challenge);
        attributes.insert(0, udp());
        self.request(METHOD_ALLOCATE, attributes).await
    }

    /// Takes REALM and NONCE from a 401 or 438.
    pub fn learn(&mut self, challenge: &Message) {
        let realm = TextAttribute::get_from_as(challenge, ATTR_REALM).unwrap().text;
        let nonce = TextAttribute::get_from_as(challenge, ATTR_NONCE).unwrap().text;
        self.challenge = Some((realm, nonce));
    }

    pub async fn permit(&self, peers: &[SocketAddr]) -> Message {
        let attributes = peers.iter().map(|peer| peer_attribute(*peer)).collect();
        self.request(METHOD_CREATE_PERMISSION, attributes).await
    }

    /// A Send indication of `data` to `peer` (no answer).
    pub async fn send_indication(&self, peer: SocketAddr, data: &[u8]) {
        let mut message = Message::new();
        message
            .build(&[
                Box::new(stun::agent::TransactionId::new()),
                Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
                peer_attribute(peer),
                Box::new(turn::proto::data::Data(data.to_vec())),
            ])
            .unwrap();
        self.socket.send_to(&message.raw, self.server).await.unwrap();
    }

    /// The next datagram from the relay (`None` after 2 s).
    pub async fn receive(&self) -> Option<Vec<u8>> {
        let mut buffer = vec![0u8; 65_536];
        let (length, _) = tokio::time::timeout(WAIT, self.socket.recv_from(&mut buffer)).await.ok()?.unwrap();
        Some(buffer[..length].to_vec())
    }
}

pub fn udp() -> Box<dyn Setter> {
    Box::new(RequestedTransport { protocol: turn::proto::PROTO_UDP })
}

pub fn peer_attribute(peer: SocketAddr) -> Box<dyn Setter> {
    Box::new(PeerAddress { ip: peer.ip(), port: peer.port() })
}

pub fn code(message: &Message) -> Option<u16> {
    let mut attribute = ErrorCodeAttribute::default();
    attribute.get_from(message).ok().map(|()| attribute.code.0)
}

pub fn relayed(message: &Message) -> SocketAddr {
    let mut address = RelayedAddress::default();
    address.get_from(message).unwrap_or_else(|e| panic!("no XOR-RELAYED-ADDRESS ({e}): {message}"));
    SocketAddr::new(address.ip, address.port)
}

pub fn success(message: &Message) -> bool {
    message.typ.class == CLASS_SUCCESS_RESPONSE
}
