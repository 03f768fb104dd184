//! A client that has only its Matrix access token gets working TURN credentials for the embedded
//! relay from either place: Synapse's own `/voip/turnServer` (configured with the relay's URI and
//! shared secret, as deploy/local/up does) or Switchboard's `/_switchboard/client/v1/turn` (which
//! hands out the relay's own URIs). The `turn` crate's client allocates with each and relays to a
//! peer and back.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::net::UdpSocket;
use webrtc::util::Conn;

/// The UDP relay address of the first `turn:…?transport=udp` URI in a `/turnServer` answer.
fn udp_uri(answer: &Value) -> SocketAddr {
    let uri = answer["uris"]
        .as_array()
        .and_then(|uris| uris.iter().filter_map(Value::as_str).find(|uri| uri.ends_with("?transport=udp")))
        .unwrap_or_else(|| panic!("a UDP TURN URI: {answer}"));
    let address = uri.trim_start_matches("turn:").trim_end_matches("?transport=udp");
    address.parse().unwrap_or_else(|e| panic!("{uri}: {e}"))
}

/// Allocates on `server` with the credentials of `answer`, and relays a datagram to an echoing peer.
async fn relay_round_trip(server: SocketAddr, answer: &Value, who: &str) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let client = turn::client::Client::new(turn::client::ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: answer["username"].as_str().unwrap().to_owned(),
        password: answer["password"].as_str().unwrap().to_owned(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(socket),
        vnet: None,
    })
    .await
    .unwrap();
    client.listen().await.unwrap();
    let relayed = tokio::time::timeout(Duration::from_secs(10), client.allocate())
        .await
        .unwrap_or_else(|_| panic!("{who}: no allocation within 10 s"))
        .unwrap_or_else(|e| panic!("{who}: allocation refused: {e}"));
    let relayed_address = relayed.local_addr().unwrap();

    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_address = peer.local_addr().unwrap();
    let message = format!("payment via {who}");
    relayed.send_to(message.as_bytes(), peer_address).await.unwrap();
    let mut buffer = [0u8; 1500];
    let (length, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buffer))
        .await
        .unwrap_or_else(|_| panic!("{who}: the peer got nothing"))
        .unwrap();
    assert_eq!((&buffer[..length], from), (message.as_bytes(), relayed_address), "{who}");
    peer.send_to(b"ack", from).await.unwrap();
    let (length, from) = tokio::time::timeout(Duration::from_secs(5), relayed.recv_from(&mut buffer))
        .await
        .unwrap_or_else(|_| panic!("{who}: the answer did not come back"))
        .unwrap();
    assert_eq!((&buffer[..length], from), (&b"ack"[..], peer_address), "{who}");
    relayed.close().await.unwrap();
    client.close().await.unwrap();
}

#[tokio::test]
async fn credentials_from_synapse_and_from_switchboard_both_open_the_embedded_relay() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9");
    let listeners = common::bind(&config).await;
    let relay = listeners.turn.as_ref().unwrap().local_addr().unwrap();
    let uri = format!("turn:{relay}?transport=udp");
    let args =
        ["--turn-shared-secret", common::TURN_SECRET, "--turn-uri", &uri, "--turn-user-lifetime", "1h"];
    let Some(synapse) = common::Synapse::start_with(&[], common::free_port(), &args).await else { return };
    config.homeserver.url = synapse.base_url.parse().unwrap();
    let running = common::start_on(config, listeners);
    running.wait_listening().await;
    let user = synapse.register("alice").await;

    let from_synapse =
        synapse.call(&user, reqwest::Method::GET, "/_matrix/client/v3/voip/turnServer", &Value::Null).await;
    let from_switchboard: Value = reqwest::Client::new()
        .get(format!("http://{}/_switchboard/client/v1/turn", running.client))
        .bearer_auth(&user.access_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Without `[turn] uris`, Switchboard hands out the embedded relay's own listeners.
    assert_eq!(
        from_switchboard["uris"],
        serde_json::json!([format!("turn:{relay}?transport=udp"), format!("turn:{relay}?transport=tcp")])
    );
    for (who, answer) in [("synapse", &from_synapse), ("switchboard", &from_switchboard)] {
        let server = udp_uri(answer);
        assert_eq!(server, relay, "{who}: {answer}");
        relay_round_trip(server, answer, who).await;
    }
    running.stop().await.unwrap();
}
