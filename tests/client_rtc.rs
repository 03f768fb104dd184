//! The thin client's signalling connection and peer link against the real stack (Synapse and
//! Switchboard with its embedded TURN relay): two Raiden users each open a `SignalConnection`, one
//! calls the other through the signalling relay with relay-only ICE, the data channel opens on both
//! sides through the TURN relay, and binary messages cross both ways intact. A bad access token is
//! refused with a typed error, and a connection the server closes says so with the close code.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use switchboard::client::rtc::{Invite, LinkEvent, LinkEvents, Path, PeerLink, RtcConfig};
use switchboard::client::signal::{
    CloseReason, SignalConnection, SignalError, SignalEvent, SignalEvents, Via,
};
use switchboard::clock::Clock;
use switchboard::signalling::EventType;
use tokio::sync::mpsc;

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";

/// Messages each side sends, and their size.
const MESSAGES: usize = 100;
const MESSAGE_BYTES: usize = 3_200;

/// How long any one step of these tests may take.
const STEP: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future).await.unwrap_or_else(|_| panic!("{what} within {STEP:?}"))
}

/// Message `index` from `side`: its index, then bytes that depend on both.
fn message(side: u8, index: usize) -> Bytes {
    let mut bytes = vec![0; MESSAGE_BYTES];
    bytes[..2].copy_from_slice(&u16::try_from(index).unwrap().to_be_bytes());
    for (at, byte) in bytes.iter_mut().enumerate().skip(2) {
        *byte = u8::try_from((at * 31 + index * 7 + usize::from(side)) % 251).unwrap();
    }
    Bytes::from(bytes)
}

/// The next signal event, skipping presence and the like.
async fn next_signal(events: &mut SignalEvents) -> switchboard::client::signal::IncomingSignal {
    for _ in 0..1000 {
        match within("a signal", events.next()).await {
            Some(SignalEvent::Signal(signal)) => return signal,
            Some(SignalEvent::Closed(reason)) => panic!("the connection closed: {reason}"),
            Some(_) => {}
            None => panic!("the connection ended"),
        }
    }
    panic!("no signal among 1,000 events");
}

/// Carries one side's call: the link's signals go to the peer through `connection`, the peer's
/// signals of this call go to the link, and every other link event comes out of the returned
/// channel. Ends when either side ends.
fn drive(
    connection: SignalConnection,
    mut signals: SignalEvents,
    link: PeerLink,
    mut link_events: LinkEvents,
    to: String,
) -> mpsc::UnboundedReceiver<LinkEvent> {
    let (out, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for _ in 0..100_000 {
            tokio::select! {
                event = signals.next() => match event {
                    Some(SignalEvent::Signal(signal)) if signal.call_id == link.call_id() => {
                        if let Err(error) = link.handle_signal(signal.event_type, &signal.content).await {
                            let _ = out.send(LinkEvent::Failed(format!("the peer's {:?}: {error}", signal.event_type)));
                            return;
                        }
                    }
                    Some(SignalEvent::Closed(_)) | None => return,
                    Some(_) => {}
                },
                event = link_events.next() => match event {
                    Some(LinkEvent::Signal(signal)) => {
                        let sent = connection.send_signal(&to, &signal.call_id, signal.event_type, signal.content).await;
                        if let Err(error) = sent {
                            let _ = out.send(LinkEvent::Failed(format!("{:?} to the peer: {error}", signal.event_type)));
                            return;
                        }
                    }
                    Some(event) => {
                        let last = matches!(event, LinkEvent::Closed | LinkEvent::Failed(_));
                        let _ = out.send(event);
                        if last {
                            return;
                        }
                    }
                    None => return,
                },
            }
        }
    });
    events
}

/// Sends every message of `side` over `link`; the most the channel buffered after a send.
async fn send_all(link: PeerLink, side: u8) -> usize {
    let mut most = 0;
    for index in 0..MESSAGES {
        link.send(message(side, index)).await.unwrap_or_else(|error| panic!("send {index}: {error}"));
        most = most.max(link.buffered_amount().await);
    }
    most
}

/// Reads `MESSAGES` messages from the peer `side` and checks each arrived once and intact (the
/// channel is unordered, so in any order).
async fn receive_all(events: &mut mpsc::UnboundedReceiver<LinkEvent>, side: u8) {
    let mut seen = BTreeSet::new();
    while seen.len() < MESSAGES {
        match within("the peer's messages", events.recv()).await {
            Some(LinkEvent::Message(bytes)) => {
                assert_eq!(bytes.len(), MESSAGE_BYTES);
                let index = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
                assert!(index < MESSAGES && seen.insert(index), "message {index} twice or out of range");
                assert_eq!(bytes, message(side, index), "message {index} intact");
            }
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

async fn open(events: &mut mpsc::UnboundedReceiver<LinkEvent>, side: &str) -> Path {
    match within("the channel to open", events.recv()).await {
        Some(LinkEvent::Open { path }) => path,
        other => panic!("{side}: expected the channel to open, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_data_channel_opens_through_the_signalling_relay_and_carries_messages_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let base_url = format!("http://{}", running.client);
    let (a, mut a_events) =
        within("alice's ready", SignalConnection::connect(&base_url, &alice.user.access_token))
            .await
            .unwrap();
    let (b, mut b_events) =
        within("bob's ready", SignalConnection::connect(&base_url, &bob.user.access_token)).await.unwrap();
    assert_eq!(a.ready().user_id.as_str(), alice.user.user_id);
    assert!(a.ice_servers().is_some_and(|ice| ice.uris.iter().any(|uri| uri.starts_with("turn:"))));

    // Alice waits until Switchboard has verified that bob holds his address.
    within("bob's presence", a.watch(&[&bob.address])).await.unwrap();
    let mut verified = false;
    for _ in 0..200 {
        match within("bob verified", a_events.next()).await {
            Some(SignalEvent::Presence(presence))
                if presence.address.eq_ignore_ascii_case(&bob.address)
                    && presence.frame["users"][0]["verified"] == true =>
            {
                verified = true;
                break;
            }
            Some(SignalEvent::Closed(reason)) => panic!("{reason}"),
            None => panic!("the connection ended"),
            _ => {}
        }
    }
    assert!(verified, "bob's address verified among 200 events");

    // Alice's sends wait while her channel buffers more than 8 KiB (bob's: the default 1 MiB).
    let high = 8 * 1024;
    let config = |connection: &SignalConnection| RtcConfig {
        ice_servers: connection.ice_servers(),
        relay_only: true,
        ..RtcConfig::default()
    };
    let a_config = RtcConfig { buffered_high: high, buffered_low: 4 * 1024, ..config(&a) };
    let clock = Clock::system();
    let started = clock.now();
    let a_party = a.ready().device_id.as_ref().unwrap().to_string();
    let (a_link, a_link_events, invite) = PeerLink::call(a_config, &a_party).await.unwrap();
    let via = a.send_signal(&bob.address, &invite.call_id, invite.event_type, invite.content.clone()).await;
    assert_eq!(via.unwrap(), Via::Relay);

    let got = next_signal(&mut b_events).await;
    assert_eq!((got.event_type, got.call_id.as_str()), (EventType::Invite, a_link.call_id()));
    assert_eq!(got.from_address.as_deref(), Some(alice.address.as_str()));
    let b_party = b.ready().device_id.as_ref().unwrap().to_string();
    let invite = Invite::parse(&got.call_id, &got.content).unwrap();
    let (b_link, b_link_events, answer) = PeerLink::answer(config(&b), &b_party, &invite).await.unwrap();
    let via = b.send_signal(&alice.address, &answer.call_id, answer.event_type, answer.content.clone()).await;
    assert_eq!(via.unwrap(), Via::Relay);

    let mut a_out = drive(a.clone(), a_events, a_link.clone(), a_link_events, bob.address.clone());
    let mut b_out = drive(b.clone(), b_events, b_link.clone(), b_link_events, alice.address.clone());
    let (a_path, b_path) = tokio::join!(
        async {
            let path = open(&mut a_out, "alice").await;
            (path, clock.now() - started)
        },
        async {
            let path = open(&mut b_out, "bob").await;
            (path, clock.now() - started)
        },
    );
    println!("invite to channel open: alice {:?}, bob {:?}", a_path.1, b_path.1);
    assert_eq!((a_path.0, b_path.0), (Path::Relay, Path::Relay));
    within("alice's connected", a.connected(a_link.call_id())).await.unwrap();
    within("bob's connected", b.connected(b_link.call_id())).await.unwrap();

    let sending = tokio::spawn(send_all(a_link.clone(), 1));
    let answering = tokio::spawn(send_all(b_link.clone(), 2));
    tokio::join!(receive_all(&mut b_out, 1), receive_all(&mut a_out, 2));
    let a_most = sending.await.unwrap();
    let b_most = answering.await.unwrap();
    println!("most buffered after a send: alice {a_most} bytes (bound {high}), bob {b_most} bytes");
    assert!(a_most <= high + MESSAGE_BYTES, "alice's sends waited for the buffer to drain: {a_most}");

    // The broker saw the call established; the relay carried every message.
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_calls_connected_total"), 1, "{metrics}");
    let metrics = running.turn_metrics().await;
    let relayed = common::metric(
        &metrics,
        r#"switchboard_turn_relayed_bytes_total{transport="udp",direction="to_peer"}"#,
    );
    let payload = u64::try_from(2 * MESSAGES * MESSAGE_BYTES).unwrap();
    println!("relayed to peers: {relayed} bytes for {payload} bytes of messages");
    assert!(relayed >= payload, "the relay carried {relayed} bytes to peers, the messages are {payload}");

    // Alice hangs up: bob's link closes.
    let hangup = a_link.hangup("user_hangup").await;
    a.send_signal(&bob.address, &hangup.call_id, hangup.event_type, hangup.content).await.unwrap();
    assert!(matches!(within("bob's link to close", b_out.recv()).await, Some(LinkEvent::Closed)));
    assert!(!b_link.is_open());
    assert!(matches!(b_link.send(message(2, 0)).await, Err(switchboard::client::rtc::RtcError::NotOpen)));
    a.close().await;
    b.close().await;
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_token_is_refused_and_a_server_shutdown_closes_with_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let base_url = format!("http://{}", running.client);
    let refused = SignalConnection::connect(&base_url, "syt_not_a_token").await;
    let Err(SignalError::Unauthorized { errcode, .. }) = refused else { panic!("{refused:?}") };
    assert_eq!(errcode, "M_UNKNOWN_TOKEN");

    let alice = synapse.register_raiden(CAPS).await;
    let (a, mut events) = SignalConnection::connect(&base_url, &alice.user.access_token).await.unwrap();
    within("a ping", a.ping()).await.unwrap();
    running.stop().await.unwrap();
    let mut last = None;
    for _ in 0..100 {
        match within("the close", events.next()).await {
            Some(event) => last = Some(event),
            None => break,
        }
    }
    let Some(SignalEvent::Closed(reason)) = last else { panic!("closed last: {last:?}") };
    assert_eq!(reason.code(), Some(1012), "{reason}");
    assert_eq!(a.close_reason(), Some(reason));
    let after = a.send_signal(&alice.address, "c1", EventType::Hangup, serde_json::Map::new()).await;
    assert!(matches!(after, Err(SignalError::Closed(CloseReason::Server { code: 1012, .. }))), "{after:?}");
}
