//! A WebRTC data channel (the `webrtc` crate, as Raiden's Python and light clients would open one)
//! between two peers whose ICE may only use relay candidates: every byte goes through the embedded
//! TURN relay, with credentials from Switchboard's credentials scheme.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use webrtc::api::APIBuilder;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::data_channel::data_channel_message::DataChannelMessage;
use webrtc::ice_transport::ice_server::RTCIceServer;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::policy::ice_transport_policy::RTCIceTransportPolicy;

async fn peer(relay: std::net::SocketAddr, user: &str) -> Arc<RTCPeerConnection> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let credentials = switchboard::turn::credentials::mint(common::TURN_SECRET.as_bytes(), user, now, 600);
    let mut settings = SettingEngine::default();
    settings.set_include_loopback_candidate(true);
    let api = APIBuilder::new().with_setting_engine(settings).build();
    let config = RTCConfiguration {
        ice_servers: vec![RTCIceServer {
            urls: vec![format!("turn:{relay}?transport=udp")],
            username: credentials.username,
            credential: credentials.password,
        }],
        ice_transport_policy: RTCIceTransportPolicy::Relay,
        ..Default::default()
    };
    Arc::new(api.new_peer_connection(config).await.unwrap())
}

/// Local description with every candidate gathered (no trickle).
async fn gathered(
    pc: &RTCPeerConnection,
) -> webrtc::peer_connection::sdp::session_description::RTCSessionDescription {
    let mut done = pc.gathering_complete_promise().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), done.recv()).await;
    pc.local_description().await.expect("a local description")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_channel_with_relay_only_ice_goes_through_the_embedded_relay() {
    let dir = tempfile::tempdir().unwrap();
    let running = common::start(common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9")).await;
    let relay = running.turn.expect("the embedded relay listens");

    let alice = peer(relay, "@alice:localhost").await;
    let bob = peer(relay, "@bob:localhost").await;
    let (received_tx, mut received) = mpsc::unbounded_channel::<String>();
    bob.on_data_channel(Box::new(move |channel| {
        let received_tx = received_tx.clone();
        Box::pin(async move {
            let echo = channel.clone();
            channel.on_message(Box::new(move |message: DataChannelMessage| {
                let text = String::from_utf8_lossy(&message.data).into_owned();
                let _ = received_tx.send(text.clone());
                let echo = echo.clone();
                Box::pin(async move {
                    let _ = echo.send_text(format!("echo: {text}")).await;
                })
            }));
        })
    }));
    let channel = alice.create_data_channel("raiden", None).await.unwrap();
    let (echoed_tx, mut echoed) = mpsc::unbounded_channel::<String>();
    channel.on_message(Box::new(move |message: DataChannelMessage| {
        let _ = echoed_tx.send(String::from_utf8_lossy(&message.data).into_owned());
        Box::pin(async {})
    }));
    let (open_tx, mut open) = mpsc::unbounded_channel::<()>();
    channel.on_open(Box::new(move || {
        let _ = open_tx.send(());
        Box::pin(async {})
    }));

    let offer = alice.create_offer(None).await.unwrap();
    alice.set_local_description(offer).await.unwrap();
    let offer = gathered(&alice).await;
    assert!(offer.sdp.contains("typ relay"), "only relay candidates: {}", offer.sdp);
    assert!(!offer.sdp.contains("typ host"), "no host candidates: {}", offer.sdp);
    bob.set_remote_description(offer).await.unwrap();
    let answer = bob.create_answer(None).await.unwrap();
    bob.set_local_description(answer).await.unwrap();
    let answer = gathered(&bob).await;
    alice.set_remote_description(answer).await.unwrap();

    tokio::time::timeout(Duration::from_secs(20), open.recv()).await.expect("the channel opens within 20 s");
    channel.send_text("payment 1".to_owned()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), received.recv()).await.expect("bob gets it");
    assert_eq!(got.as_deref(), Some("payment 1"));
    let back =
        tokio::time::timeout(Duration::from_secs(10), echoed.recv()).await.expect("alice gets the echo");
    assert_eq!(back.as_deref(), Some("echo: payment 1"));

    // The relay's counters are published every second: wait for the traffic to show.
    common::eventually(Duration::from_secs(10), "the traffic counted by the relay", || async {
        let metrics = running.metrics().await;
        let relayed = common::metric(
            &metrics,
            r#"switchboard_turn_relayed_packets_total{transport="udp",direction="to_peer"}"#,
        );
        (relayed > 0).then_some(())
    })
    .await;
    // Closing can race the other side's teardown inside the webrtc crate ("sending reset packet in
    // non-Established state"); what the test proves was asserted above.
    let _ = alice.close().await;
    let _ = bob.close().await;
    running.stop().await.unwrap();
}
