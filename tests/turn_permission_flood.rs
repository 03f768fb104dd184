//! One allocation asking for 200,000 permissions: past `permissions_per_allocation` every request is
//! refused with 508 and nothing of it is installed, so the relay's memory stays flat. (Before the
//! cap each permission stayed for its 5 minutes: ~9 MB for this flood, and as much again for each
//! allocation a user could make.)

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, Getter, METHOD_ALLOCATE, METHOD_CREATE_PERMISSION, Message,
    MessageType, Method, Setter,
};
use stun::textattrs::TextAttribute;
use tokio::net::UdpSocket;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::reqtrans::RequestedTransport;

/// Peers per CreatePermission request, and requests in the flood.
const PER_REQUEST: u32 = 100;
const REQUESTS: u32 = 2_000;
/// The default `permissions_per_allocation`.
const CAP: u64 = 128;

struct Client {
    socket: UdpSocket,
    server: SocketAddr,
    username: String,
    password: String,
    /// REALM and NONCE from the challenge.
    challenge: Option<(String, String)>,
}

impl Client {
    fn build(&self, method: Method, attributes: Vec<Box<dyn Setter>>) -> Vec<u8> {
        let mut all: Vec<Box<dyn Setter>> = vec![
            Box::new(stun::agent::TransactionId::new()),
            Box::new(MessageType::new(method, CLASS_REQUEST)),
        ];
        all.extend(attributes);
        if let Some((realm, nonce)) = &self.challenge {
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

    /// Sends a request and waits (at most 2 s) for the answer with its transaction id.
    async fn request(&self, method: Method, attributes: Vec<Box<dyn Setter>>) -> Message {
        let request = self.build(method, attributes);
        self.socket.send_to(&request, self.server).await.unwrap();
        let mut buffer = vec![0u8; 65_536];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let (length, _) = tokio::time::timeout_at(deadline, self.socket.recv_from(&mut buffer))
                .await
                .expect("an answer within 2 s")
                .unwrap();
            let mut message = Message::new();
            message.raw = buffer[..length].to_vec();
            if message.decode().is_ok() && message.raw[8..20] == request[8..20] {
                return message;
            }
        }
    }

    /// CreatePermission for peers `from..from + PER_REQUEST` (on loopback, which the test allows).
    async fn permit(&self, from: u32) -> Message {
        let peers = (from..from + PER_REQUEST)
            .map(|n| {
                let ip = Ipv4Addr::from_bits(0x7F00_0000 + n);
                Box::new(PeerAddress { ip: ip.into(), port: 9 }) as Box<dyn Setter>
            })
            .collect();
        self.request(METHOD_CREATE_PERMISSION, peers).await
    }
}

fn code(message: &Message) -> Option<u16> {
    let mut attribute = ErrorCodeAttribute::default();
    attribute.get_from(message).ok().map(|()| attribute.code.0)
}

#[tokio::test]
async fn an_allocation_asking_for_200000_permissions_is_refused_past_the_cap_and_memory_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    let toml = common::config_toml(&common::sqlite_url(dir.path()), "http://127.0.0.1:9", common::ANY_PORTS);
    let mut process = common::Process::start(dir.path(), &toml, common::ANY_PORTS);
    process.wait_for("/health").await;
    let (ports, turn_port) = (process.ports, process.turn_port.expect("the relay's port in the log"));
    let metrics_url = format!("http://127.0.0.1:{}/metrics", ports[2]);

    let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let username = format!("{expiry}:@alice:localhost");
    let password = switchboard::turn::credentials::password(common::TURN_SECRET.as_bytes(), &username);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server: SocketAddr = format!("127.0.0.1:{turn_port}").parse().unwrap();
    let mut client = Client { socket, server, username, password, challenge: None };
    let transport = || -> Vec<Box<dyn Setter>> {
        vec![Box::new(RequestedTransport { protocol: turn::proto::PROTO_UDP })]
    };
    let challenge = client.request(METHOD_ALLOCATE, transport()).await;
    assert_eq!(code(&challenge), Some(401));
    let realm = TextAttribute::get_from_as(&challenge, ATTR_REALM).unwrap().text;
    let nonce = TextAttribute::get_from_as(&challenge, ATTR_NONCE).unwrap().text;
    client.challenge = Some((realm, nonce));
    let allocated = client.request(METHOD_ALLOCATE, transport()).await;
    assert_eq!(allocated.typ.class, CLASS_SUCCESS_RESPONSE, "{allocated}");

    // Within the cap: installed. Warm up (allocator arenas) by refreshing them, then measure.
    assert_eq!(client.permit(1).await.typ.class, CLASS_SUCCESS_RESPONSE);
    for _ in 0..50 {
        assert_eq!(client.permit(1).await.typ.class, CLASS_SUCCESS_RESPONSE);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = common::rss_bytes(process.pid()) / 1024;

    let mut refused = 0;
    for request in 1..=REQUESTS {
        let answer = client.permit(1 + request * PER_REQUEST).await;
        if code(&answer) == Some(508) {
            refused += 1;
        }
    }
    let after = common::rss_bytes(process.pid()) / 1024;
    eprintln!("RSS before {before} KiB, after {} permissions asked for {after} KiB", REQUESTS * PER_REQUEST);
    assert_eq!(refused, REQUESTS, "every request past the cap is refused with 508");
    assert!(after < before + 2048, "RSS grew by {} KiB", after.saturating_sub(before));

    // The metrics (published each second) show the refusals and only what fits.
    let udp = |name: &str| format!("switchboard_turn_{name}{{transport=\"udp\"}}");
    let text = common::eventually(Duration::from_secs(10), "the refusals in the metrics", || async {
        let text = reqwest::get(&metrics_url).await.ok()?.text().await.ok()?;
        (common::metric(&text, &udp("permission_refusals_total")) == u64::from(REQUESTS)).then_some(text)
    })
    .await;
    assert_eq!(common::metric(&text, &udp("permissions")), u64::from(PER_REQUEST));
    assert!(u64::from(PER_REQUEST) <= CAP);
    // What was installed is still there to refresh.
    assert_eq!(client.permit(1).await.typ.class, CLASS_SUCCESS_RESPONSE);
    assert_eq!(process.terminate().await.code(), Some(0));
}
