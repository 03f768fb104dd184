//! The public `Client` end to end, against a real Synapse and Switchboard with its embedded TURN
//! relay: two Raiden users upgrade to a relay-only data channel and exchange 1,000 Raiden-shaped
//! messages of 3,200 bytes exactly once and in order, with the relay's counters confirming the
//! path; a channel cut mid-stream hands the rest to Matrix (none lost, none repeated) and the
//! clients upgrade again; and with no Switchboard at all, messages go through Matrix to-device.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard::client::{Client, ClientConfig, ClientEvent, ClientEvents, Path};
use tokio::sync::watch;

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";
const MESSAGE_BYTES: usize = 3_200;
/// Messages of the data channel cases.
const COUNT: usize = 1_000;
/// Messages each way of the Matrix-only case.
const MATRIX_COUNT: usize = 50;

/// How long any one step of these tests may take.
const STEP: Duration = Duration::from_secs(60);

/// A Raiden-shaped message (a LockedTransfer's JSON) of exactly `MESSAGE_BYTES` bytes, numbered by
/// `message_identifier`.
fn message(index: usize) -> Bytes {
    let head = format!(
        concat!(
            r#"{{"type":"LockedTransfer","chain_id":"337","message_identifier":"{}","#,
            r#""payment_identifier":"{}","nonce":{},"token_network_address":"0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed","#,
            r#""token":"0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359","channel_identifier":"7","#,
            r#""transferred_amount":"0","locked_amount":"1000000000000000","#,
            r#""recipient":"0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB","#,
            r#""lock":{{"amount":"1000000000000000","expiration":"1234567","secrethash":"0x{:064x}"}},"#,
            r#""initiator":"0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed","#,
            r#""target":"0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB","metadata":{{"routes":[]}},"padding":""#
        ),
        index,
        index * 7 + 1,
        index + 1,
        index * 31 + 5,
    );
    let mut text = head.into_bytes();
    let fill = MESSAGE_BYTES - text.len() - 2;
    text.extend((0..fill).map(|at| b"0123456789abcdef"[(at + index) % 16]));
    text.extend_from_slice(b"\"}");
    assert_eq!(text.len(), MESSAGE_BYTES);
    Bytes::from(text)
}

fn index_of(bytes: &Bytes) -> usize {
    let value: serde_json::Value = serde_json::from_slice(bytes).expect("a JSON message");
    value["message_identifier"].as_str().and_then(|id| id.parse().ok()).expect("a message_identifier")
}

/// What one client's event stream brought so far.
#[derive(Default)]
struct Seen {
    messages: Vec<(String, Bytes)>,
    ups: Vec<(Instant, Path)>,
    downs: Vec<String>,
    switchboard: Vec<bool>,
}

/// Reads a client's events into a `Seen` that the test waits on.
fn log(mut events: ClientEvents) -> watch::Receiver<Seen> {
    let (tx, rx) = watch::channel(Seen::default());
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            tx.send_modify(|seen| match event {
                ClientEvent::Message { address, bytes } => seen.messages.push((address, bytes)),
                ClientEvent::ChannelUp { path, .. } => seen.ups.push((Instant::now(), path)),
                ClientEvent::ChannelDown { reason, .. } => seen.downs.push(reason),
                ClientEvent::Switchboard { connected } => seen.switchboard.push(connected),
                _ => {}
            });
        }
    });
    rx
}

async fn wait(seen: &mut watch::Receiver<Seen>, what: &str, mut done: impl FnMut(&Seen) -> bool) {
    tokio::time::timeout(STEP, seen.wait_for(|seen| done(seen)))
        .await
        .unwrap_or_else(|_| panic!("{what} within {STEP:?}"))
        .expect("the event log ended");
}

/// Every message from `from` arrived once, in order: indexes 0, 1, 2…, each intact.
fn assert_in_order(seen: &Seen, from: &str, count: usize) {
    let got: Vec<&Bytes> = seen
        .messages
        .iter()
        .filter(|(address, _)| address.eq_ignore_ascii_case(from))
        .map(|(_, b)| b)
        .collect();
    assert_eq!(got.len(), count, "messages from {from}");
    for (expected, bytes) in got.iter().enumerate() {
        let index = index_of(bytes);
        assert_eq!(index, expected, "message {expected} in order (got {index})");
        assert_eq!(**bytes, message(index), "message {index} intact");
    }
}

/// Two Raiden users, each with a [`Client`] connected to Switchboard at `client` (both on it
/// before anything else, so that an invite takes the relay: see the client's known issues, an
/// invite that reaches the callee through Matrix may cost a retry).
struct Pair {
    alice: common::raiden::Raiden,
    bob: common::raiden::Raiden,
    a: Client,
    a_seen: watch::Receiver<Seen>,
    b: Client,
    b_seen: watch::Receiver<Seen>,
}

async fn pair_on_switchboard(synapse: &common::Synapse, client: std::net::SocketAddr) -> Pair {
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let switchboard = format!("http://{client}");
    let (a, mut a_seen) =
        connect(&synapse.base_url, &alice.user.access_token, Some(switchboard.clone())).await;
    let (b, mut b_seen) = connect(&synapse.base_url, &bob.user.access_token, Some(switchboard)).await;
    wait(&mut a_seen, "alice on Switchboard", |seen| seen.switchboard == [true]).await;
    wait(&mut b_seen, "bob on Switchboard", |seen| seen.switchboard == [true]).await;
    Pair { alice, bob, a, a_seen, b, b_seen }
}

async fn connect(
    homeserver: &str,
    token: &str,
    switchboard: Option<String>,
) -> (Client, watch::Receiver<Seen>) {
    let mut config = ClientConfig::new(homeserver.parse().unwrap(), token);
    config.switchboard = switchboard.map(|url| url.parse().unwrap());
    config.relay_only = true;
    // Back on Switchboard within 2 s of its restart.
    config.reconnect_backoff.max = Duration::from_secs(2);
    let (client, events) =
        tokio::time::timeout(STEP, Client::connect(config)).await.expect("connect in time").unwrap();
    (client, log(events))
}

/// Sends messages `range` from `client` to `to`, in order, each awaited (backpressure).
fn send_range(client: &Client, to: &str, range: std::ops::Range<usize>) -> tokio::task::JoinHandle<()> {
    let client = client.clone();
    let to = to.to_owned();
    tokio::spawn(async move {
        for index in range {
            client.send(&to, message(index)).await.unwrap_or_else(|error| panic!("send {index}: {error}"));
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_upgrade_through_the_relay_and_exchange_a_thousand_messages_in_order() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let Pair { alice, bob, a, mut a_seen, b, mut b_seen } =
        pair_on_switchboard(&synapse, running.client).await;
    let started = Instant::now();
    a.open(&bob.address).await.unwrap();
    wait(&mut a_seen, "alice's channel up", |seen| !seen.ups.is_empty()).await;
    wait(&mut b_seen, "bob's channel up", |seen| !seen.ups.is_empty()).await;
    let a_up = a_seen.borrow().ups[0];
    let b_up = b_seen.borrow().ups[0];
    println!("open to channel up: alice {:?}, bob {:?}", a_up.0 - started, b_up.0 - started);
    assert_eq!((a_up.1, b_up.1), (Path::Relay, Path::Relay));

    let sending_started = Instant::now();
    let sending = send_range(&a, &bob.address, 0..COUNT);
    wait(&mut b_seen, "bob's 1,000 messages", |seen| seen.messages.len() >= COUNT).await;
    let elapsed = sending_started.elapsed();
    sending.await.unwrap();
    println!("1,000 messages of {MESSAGE_BYTES} bytes in {elapsed:?}");
    assert_in_order(&b_seen.borrow(), &alice.address, COUNT);

    // Bob answers a few over the same channel.
    b.send(&alice.address, message(0)).await.unwrap();
    wait(&mut a_seen, "bob's reply", |seen| seen.messages.len() == 1).await;
    assert_in_order(&a_seen.borrow(), &bob.address, 1);

    // Everything went over the channel, nothing through Matrix, and the channel never went down.
    let stats = a.stats(&bob.address).await.unwrap().expect("alice knows bob");
    println!("alice's figures: {stats:?}");
    assert!(stats.dc_data_frames >= COUNT as u64, "{stats:?}");
    assert_eq!(stats.matrix_lines, 0, "{stats:?}");
    assert_eq!(stats.channels_up, 1, "{stats:?}");
    assert!(a_seen.borrow().downs.is_empty() && b_seen.borrow().downs.is_empty());

    // The relay carried the messages.
    let metrics = running.turn_metrics().await;
    let relayed = common::metric(
        &metrics,
        r#"switchboard_turn_relayed_bytes_total{transport="udp",direction="to_peer"}"#,
    );
    let payload = u64::try_from(COUNT * MESSAGE_BYTES).unwrap();
    println!("relayed to peers: {relayed} bytes for {payload} bytes of messages");
    assert!(relayed >= payload, "the relay carried {relayed} bytes, the messages are {payload}");
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_calls_connected_total"), 1, "{metrics}");

    a.shutdown().await;
    b.shutdown().await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_cut_mid_stream_falls_back_to_matrix_without_loss_and_upgrades_again() {
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let Pair { alice, bob, a, mut a_seen, b, mut b_seen } =
        pair_on_switchboard(&synapse, running.client).await;
    a.open(&bob.address).await.unwrap();
    wait(&mut a_seen, "alice's channel up", |seen| !seen.ups.is_empty()).await;
    wait(&mut b_seen, "bob's channel up", |seen| !seen.ups.is_empty()).await;

    let sending = send_range(&a, &bob.address, 0..COUNT);
    wait(&mut b_seen, "bob's first 300 messages", |seen| seen.messages.len() >= 300).await;
    // Bob's side drops its peer connection, as a failure would.
    let cut = Instant::now();
    b.reset_channel(&alice.address).await.unwrap();
    wait(&mut b_seen, "bob's 1,000 messages", |seen| seen.messages.len() >= COUNT).await;
    println!("the rest arrived {:?} after the cut", cut.elapsed());
    sending.await.unwrap();
    assert_in_order(&b_seen.borrow(), &alice.address, COUNT);
    let stats = a.stats(&bob.address).await.unwrap().expect("alice knows bob");
    println!("alice's figures after the cut: {stats:?}");
    assert!(stats.matrix_lines > 0, "some messages went through Matrix: {stats:?}");

    // Alice calls again and both sides upgrade.
    wait(&mut a_seen, "alice's second channel", |seen| seen.ups.len() >= 2).await;
    wait(&mut b_seen, "bob's second channel", |seen| seen.ups.len() >= 2).await;
    println!("upgraded again {:?} after the cut", cut.elapsed());
    assert!(!a_seen.borrow().downs.is_empty() && !b_seen.borrow().downs.is_empty());

    // Bob's stream to alice flows over the new channel; alice's continues where it was.
    let frames_before = a.stats(&bob.address).await.unwrap().unwrap().dc_data_frames;
    let sending = send_range(&a, &bob.address, COUNT..COUNT + 100);
    wait(&mut b_seen, "100 more messages", |seen| seen.messages.len() >= COUNT + 100).await;
    sending.await.unwrap();
    assert_in_order(&b_seen.borrow(), &alice.address, COUNT + 100);
    let stats = a.stats(&bob.address).await.unwrap().unwrap();
    assert!(stats.dc_data_frames >= frames_before + 100, "the new channel carried them: {stats:?}");

    a.shutdown().await;
    b.shutdown().await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_switchboard_two_clients_exchange_messages_over_to_device_once_in_order() {
    let Some(synapse) = common::Synapse::start(&[]).await else { return };
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    // No Switchboard URL, and the homeserver's well-known names none.
    let (a, mut a_seen) = connect(&synapse.base_url, &alice.user.access_token, None).await;
    let (b, mut b_seen) = connect(&synapse.base_url, &bob.user.access_token, None).await;
    a.open(&bob.address).await.unwrap();

    let started = Instant::now();
    let a_sending = send_range(&a, &bob.address, 0..MATRIX_COUNT);
    let b_sending = send_range(&b, &alice.address, 0..MATRIX_COUNT);
    wait(&mut b_seen, "bob's 50 messages", |seen| seen.messages.len() >= MATRIX_COUNT).await;
    wait(&mut a_seen, "alice's 50 messages", |seen| seen.messages.len() >= MATRIX_COUNT).await;
    println!("50 messages each way over to-device in {:?}", started.elapsed());
    a_sending.await.unwrap();
    b_sending.await.unwrap();
    assert_in_order(&b_seen.borrow(), &alice.address, MATRIX_COUNT);
    assert_in_order(&a_seen.borrow(), &bob.address, MATRIX_COUNT);

    let stats = a.stats(&bob.address).await.unwrap().unwrap();
    println!("alice's figures: {stats:?}");
    assert_eq!((stats.calls, stats.dc_data_frames), (0, 0), "no call without Switchboard: {stats:?}");
    assert!(stats.matrix_lines >= MATRIX_COUNT as u64, "{stats:?}");
    // Acks flow back through Matrix: alice's replay buffer empties.
    for _ in 0..100 {
        let stats = a.stats(&bob.address).await.unwrap().unwrap();
        if stats.counters.replay_buffered_fragments == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = a.stats(&bob.address).await.unwrap().unwrap();
    assert_eq!(stats.counters.replay_buffered_fragments, 0, "bob acked everything: {stats:?}");
    assert!(a_seen.borrow().ups.is_empty() && a_seen.borrow().switchboard.is_empty());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchboard_stopped_mid_stream_leaves_matrix_carrying_on_and_a_restart_upgrades_again() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
    let dir = tempfile::tempdir().unwrap();
    let database = common::sqlite_url(dir.path());
    let Some((synapse, running)) = common::with_synapse(&database, None).await else {
        return;
    };
    let Pair { alice, bob, a, mut a_seen, b, mut b_seen } =
        pair_on_switchboard(&synapse, running.client).await;
    a.open(&bob.address).await.unwrap();
    wait(&mut a_seen, "alice's channel up", |seen| !seen.ups.is_empty()).await;

    let sending = send_range(&a, &bob.address, 0..COUNT);
    wait(&mut b_seen, "bob's first 300 messages", |seen| seen.messages.len() >= 300).await;
    // Switchboard (and its TURN relay) stops: the channel stalls (a PING unanswered for 2 s), and
    // Matrix carries the rest, acks included.
    let ports = [running.appservice.port(), running.client.port(), running.ops.port()];
    let stopped = Instant::now();
    running.stop().await.unwrap();
    println!("Switchboard stopped in {:?}", stopped.elapsed());
    wait(&mut b_seen, "bob's 1,000 messages", |seen| seen.messages.len() >= COUNT).await;
    println!("the rest arrived {:?} after Switchboard stopped", stopped.elapsed());
    sending.await.unwrap();
    assert_in_order(&b_seen.borrow(), &alice.address, COUNT);
    let stats = a.stats(&bob.address).await.unwrap().unwrap();
    assert!(stats.matrix_lines > 0, "Matrix carried messages: {stats:?}");
    assert!(a_seen.borrow().switchboard.ends_with(&[false]), "alice saw Switchboard go");

    // Switchboard comes back on the same ports: both reconnect and alice calls again.
    let toml = common::config_toml(&database, &synapse.base_url, ports);
    let config = switchboard::config::Config::from_toml_str(&toml).unwrap();
    let restarted = Instant::now();
    let running = common::start(config).await;
    wait(&mut a_seen, "alice's second channel", |seen| seen.ups.len() >= 2).await;
    wait(&mut b_seen, "bob's second channel", |seen| seen.ups.len() >= 2).await;
    println!("upgraded again {:?} after the restart", restarted.elapsed());
    let sending = send_range(&a, &bob.address, COUNT..COUNT + 100);
    wait(&mut b_seen, "100 more messages", |seen| seen.messages.len() >= COUNT + 100).await;
    sending.await.unwrap();
    assert_in_order(&b_seen.borrow(), &alice.address, COUNT + 100);

    a.shutdown().await;
    b.shutdown().await;
    running.stop().await.unwrap();
}
