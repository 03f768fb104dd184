//! The thin client's Matrix base layer (`switchboard::client::matrix`) against a real Synapse, with no
//! Switchboard at all: whoami, to-device messages from one client's send to the other's `/sync`
//! exactly once and in order, a send retried after a lost answer and a rate limit (same transaction
//! id, delivered once), discovery through the well-known file, a bad token as a typed error, and the
//! room fallback (`m.room.message` of joined rooms, auto-join on a peer's invite).
//!
//! Two tests, one Synapse each (nextest runs each test in its own process, so they cannot share
//! one); each covers several behaviours to keep the file's time small.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Synapse, User};
use ruma::to_device::DeviceIdOrAllDevices;
use ruma::{OwnedTransactionId, OwnedUserId};
use serde_json::{Value, json};
use switchboard::client::matrix::{
    self, Errcode, MatrixClient, MatrixError, Retry, Settings, SyncEvent, SyncHandle, SyncSettings,
};
use switchboard::clock::Clock;
use tokio_util::sync::CancellationToken;
use url::Url;

const SWITCHBOARD_URL: &str = "http://127.0.0.1:8009/";

fn client(base: &str, user: &User) -> MatrixClient {
    MatrixClient::new(&Url::parse(base).unwrap(), &user.access_token, Settings::default()).unwrap()
}

fn user_id(user: &User) -> OwnedUserId {
    OwnedUserId::try_from(user.user_id.as_str()).unwrap()
}

fn txn(id: &str) -> OwnedTransactionId {
    OwnedTransactionId::from(id)
}

/// A Raiden protocol message as Raiden 3.x sends it to device `*`.
fn text(body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body })
}

async fn send_text(from: &MatrixClient, to: &User, body: &str, txn_id: &str) {
    from.send_to_device(
        "m.room.message",
        &user_id(to),
        &DeviceIdOrAllDevices::AllDevices,
        &text(body),
        &txn(txn_id),
    )
    .await
    .unwrap_or_else(|e| panic!("send {body:?}: {e}"));
}

/// The next event that is not a checkpoint, within 10 s.
async fn next_message(sync: &mut SyncHandle) -> SyncEvent {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), sync.recv())
            .await
            .expect("an event within 10 s")
            .expect("the sync loop is running");
        if !matches!(event, SyncEvent::Checkpoint { .. }) {
            return event;
        }
    }
}

fn to_device_text(from: &User, body: &str) -> SyncEvent {
    SyncEvent::ToDevice { sender: user_id(from), event_type: "m.room.message".into(), content: text(body) }
}

#[tokio::test]
async fn to_device_messages_reach_the_peers_sync_exactly_once_in_order_and_bad_tokens_are_typed_errors() {
    let well_known = json!({ matrix::WELL_KNOWN_KEY: { "base_url": SWITCHBOARD_URL } }).to_string();
    let args = ["--extra-well-known-client", well_known.as_str()];
    let Some(synapse) = Synapse::start_with(&[], common::free_port(), &args).await else { return };
    let alice = synapse.register(&common::raiden_localpart()).await;
    let bob = synapse.register(&common::raiden_localpart()).await;
    let (alice_client, bob_client) = (client(&synapse.base_url, &alice), client(&synapse.base_url, &bob));

    let whoami = alice_client.whoami().await.unwrap();
    assert_eq!(whoami.user_id.as_str(), alice.user_id);
    assert_eq!(whoami.device_id.as_ref().map(|d| d.as_str()), Some(alice.device_id.as_str()));

    let homeserver = Url::parse(&synapse.base_url).unwrap();
    let discovered = matrix::discover_switchboard(&homeserver).await.unwrap();
    assert_eq!(discovered.as_ref().map(Url::as_str), Some(SWITCHBOARD_URL));
    assert_eq!(alice_client.discover_switchboard().await.unwrap(), discovered);

    let cancel = CancellationToken::new();
    // A channel of one event: the loop waits for the test to take each (backpressure), drops none.
    let mut sync = bob_client
        .spawn_sync(SyncSettings { channel_capacity: 1, ..SyncSettings::default() }, cancel.clone());

    // One message: received once, with its sender, type and content, then a checkpoint.
    send_text(&alice_client, &bob, "{\"type\":\"Processed\"}", "t-1").await;
    assert_eq!(next_message(&mut sync).await, to_device_text(&alice, "{\"type\":\"Processed\"}"));
    let checkpoint = tokio::time::timeout(Duration::from_secs(10), sync.recv()).await.unwrap().unwrap();
    let SyncEvent::Checkpoint { next_batch } = checkpoint else {
        panic!("{checkpoint:?} is not a checkpoint")
    };

    // The same transaction id again (a client's retry): the homeserver delivers it once. Then ten
    // more messages, which arrive in order with nothing before them: no duplicate of the first.
    send_text(&alice_client, &bob, "{\"type\":\"Processed\"}", "t-1").await;
    for n in 0..10 {
        send_text(&alice_client, &bob, &format!("message {n}"), &format!("t-msg-{n}")).await;
    }
    for n in 0..10 {
        assert_eq!(next_message(&mut sync).await, to_device_text(&alice, &format!("message {n}")));
    }
    let checkpoint = tokio::time::timeout(Duration::from_secs(10), sync.recv()).await.unwrap().unwrap();
    let SyncEvent::Checkpoint { next_batch: last } = checkpoint else {
        panic!("{checkpoint:?} is not a checkpoint")
    };
    assert_ne!(last, next_batch, "the position moved on");
    assert!(sync.since().is_some_and(|since| since != next_batch), "the loop's position moved on too");

    // Several users in one send.
    let carol = synapse.register(&common::raiden_localpart()).await;
    let carol_client = client(&synapse.base_url, &carol);
    let mut carol_sync = carol_client.spawn_sync(SyncSettings::default(), cancel.clone());
    let mut messages = matrix::ToDeviceMessages::new();
    for (to, body) in [(&bob, "to bob"), (&carol, "to carol")] {
        messages.entry(user_id(to)).or_default().insert(DeviceIdOrAllDevices::AllDevices, text(body));
    }
    alice_client.send_to_device_batch("m.room.message", &messages, &txn("t-both")).await.unwrap();
    assert_eq!(next_message(&mut sync).await, to_device_text(&alice, "to bob"));
    assert_eq!(next_message(&mut carol_sync).await, to_device_text(&alice, "to carol"));

    // Cancelling ends both loops cleanly, within one poll.
    cancel.cancel();
    let stopped = Instant::now();
    sync.finish().await.unwrap();
    carol_sync.finish().await.unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(5), "took {:?}", stopped.elapsed());

    // A bad token: a typed M_UNKNOWN_TOKEN at once, from every call, with no retries.
    let impostor = User { access_token: "syt_not_a_token".into(), ..alice.clone() };
    let bad = client(&synapse.base_url, &impostor);
    let started = Instant::now();
    let error = bad.whoami().await.unwrap_err();
    assert!(
        matches!(&error, MatrixError::Homeserver { status: 401, errcode: Errcode::UnknownToken, .. }),
        "{error:?}"
    );
    assert!(error.is_unknown_token() && !error.is_retryable());
    let error = bad
        .send_to_device(
            "m.room.message",
            &user_id(&bob),
            &DeviceIdOrAllDevices::AllDevices,
            &text("x"),
            &txn("t-bad"),
        )
        .await
        .unwrap_err();
    assert_eq!(error.errcode(), Some(&Errcode::UnknownToken), "{error:?}");
    let mut bad_sync = bad.spawn_sync(SyncSettings::default(), CancellationToken::new());
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), bad_sync.recv()).await.unwrap(), None);
    let error = bad_sync.finish().await.unwrap_err();
    assert_eq!(error.errcode(), Some(&Errcode::UnknownToken), "{error:?}");
    assert_eq!(error.status(), Some(401));
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

/// What the proxy does to a `sendToDevice` request instead of just forwarding it.
enum Fault {
    /// Forward it (Synapse stores the messages), then answer 502: the client cannot know.
    LoseAnswer,
    /// Answer `429 M_LIMIT_EXCEEDED` with this `retry_after_ms`, without forwarding.
    RateLimit(u64),
}

/// A reverse proxy in front of Synapse that applies scripted faults to `sendToDevice` requests,
/// answers the first `failing_syncs` `/sync` requests with `503`, records the path of each such
/// request with the (stepped) clock's time, and serves no well-known file.
struct Proxy {
    url: String,
    state: Arc<ProxyState>,
}

struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    clock: Clock,
    faults: Mutex<VecDeque<Fault>>,
    sends: Mutex<Vec<(String, Instant)>>,
    failing_syncs: Mutex<u32>,
    syncs: Mutex<Vec<(String, Instant)>>,
}

impl Proxy {
    async fn start(upstream: &str, clock: Clock, faults: Vec<Fault>, failing_syncs: u32) -> Proxy {
        let state = Arc::new(ProxyState {
            upstream: upstream.to_owned(),
            http: reqwest::Client::new(),
            clock,
            faults: Mutex::new(faults.into()),
            sends: Mutex::new(Vec::new()),
            failing_syncs: Mutex::new(failing_syncs),
            syncs: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new().fallback(forward).with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Proxy { url, state }
    }

    fn sends(&self) -> Vec<(String, Instant)> {
        self.state.sends.lock().unwrap().clone()
    }

    fn syncs(&self) -> Vec<(String, Instant)> {
        self.state.syncs.lock().unwrap().clone()
    }
}

async fn forward(
    axum::extract::State(state): axum::extract::State<Arc<ProxyState>>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use http::header::{AUTHORIZATION, CONTENT_TYPE};
    let method = request.method().clone();
    let path = request.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    if path.starts_with("/.well-known/") {
        return http::StatusCode::NOT_FOUND.into_response();
    }
    if path.starts_with("/_matrix/client/v3/sync") {
        state.syncs.lock().unwrap().push((path.clone(), state.clock.now()));
        let mut failing = state.failing_syncs.lock().unwrap();
        if *failing > 0 {
            *failing -= 1;
            return (http::StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
        }
    }
    let headers = request.headers().clone();
    let body = axum::body::to_bytes(request.into_body(), 1 << 20).await.unwrap();
    let fault = if method == http::Method::PUT && path.contains("/sendToDevice/") {
        state.sends.lock().unwrap().push((path.clone(), state.clock.now()));
        state.faults.lock().unwrap().pop_front()
    } else {
        None
    };
    if let Some(Fault::RateLimit(ms)) = fault {
        let body =
            json!({ "errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests", "retry_after_ms": ms });
        return (http::StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
    }
    let mut upstream = state.http.request(method, format!("{}{path}", state.upstream)).body(body);
    for name in [AUTHORIZATION, CONTENT_TYPE] {
        if let Some(value) = headers.get(&name) {
            upstream = upstream.header(name, value);
        }
    }
    let answer = upstream.send().await.unwrap();
    let status = answer.status();
    let bytes = answer.bytes().await.unwrap();
    if let Some(Fault::LoseAnswer) = fault {
        return (http::StatusCode::BAD_GATEWAY, "upstream answer lost").into_response();
    }
    (status, [(CONTENT_TYPE, "application/json")], bytes).into_response()
}

#[tokio::test]
async fn a_send_retried_after_a_lost_answer_and_a_rate_limit_is_delivered_once_room_messages_come_after_auto_join()
 {
    let Some(synapse) = Synapse::start(&[]).await else { return };
    let alice = synapse.register(&common::raiden_localpart()).await;
    let bob = synapse.register(&common::raiden_localpart()).await;

    // Discovery: Synapse serves a well-known file without our key; the proxy serves none (404); a
    // closed port is a transport error the caller sees.
    let homeserver = Url::parse(&synapse.base_url).unwrap();
    assert_eq!(matrix::discover_switchboard(&homeserver).await.unwrap(), None);
    let clock = common::stepped_clock();
    let faults = vec![Fault::LoseAnswer, Fault::RateLimit(5000)];
    let proxy = Proxy::start(&synapse.base_url, clock.clone(), faults, 2).await;
    assert_eq!(matrix::discover_switchboard(&Url::parse(&proxy.url).unwrap()).await.unwrap(), None);
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let error =
        matrix::discover_switchboard(&Url::parse(&format!("http://{closed}")).unwrap()).await.unwrap_err();
    assert!(matches!(error, MatrixError::Transport(_)), "{error:?}");

    // Alice sends, and Bob syncs, through the proxy, on the stepped clock.
    let settings = Settings {
        retry: Retry { initial_backoff: Duration::from_secs(1), ..Retry::default() },
        ..Settings::default()
    };
    let alice_client = MatrixClient::with_clock(
        &Url::parse(&proxy.url).unwrap(),
        &alice.access_token,
        settings,
        clock.clone(),
    )
    .unwrap();
    let bob_client = MatrixClient::with_clock(
        &Url::parse(&proxy.url).unwrap(),
        &bob.access_token,
        Settings::default(),
        clock.clone(),
    )
    .unwrap();
    let cancel = CancellationToken::new();
    let mut sync = bob_client.spawn_sync(SyncSettings::default(), cancel.clone());

    let send = tokio::spawn({
        let (alice_client, bob) = (alice_client.clone(), bob.clone());
        async move { send_text(&alice_client, &bob, "exactly once", "t-retried").await }
    });
    // Step the clock 100 ms every 10 ms of real time, for the rest of the test (at most 60 s).
    let stepper = tokio::spawn({
        let clock = clock.clone();
        async move {
            for _ in 0..6000 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                clock.advance(Duration::from_millis(100));
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), send).await.expect("the send ends").unwrap();

    let sends = proxy.sends();
    assert_eq!(sends.len(), 3, "lost answer, rate limited, accepted: {sends:?}");
    assert!(sends.iter().all(|(path, _)| path == &sends[0].0), "one transaction id throughout: {sends:?}");
    assert!(sends[0].0.ends_with("/sendToDevice/m.room.message/t-retried"), "{}", sends[0].0);
    let backoff = sends[1].1 - sends[0].1;
    let rate_limited = sends[2].1 - sends[1].1;
    assert!(backoff >= Duration::from_secs(1), "backoff {backoff:?}");
    assert!(rate_limited >= Duration::from_secs(5), "retry_after_ms honoured: {rate_limited:?}");

    // Delivered once: the next message after it is the one sent after it.
    assert_eq!(next_message(&mut sync).await, to_device_text(&alice, "exactly once"));
    send_text(&client(&synapse.base_url, &alice), &bob, "after", "t-after").await;
    assert_eq!(next_message(&mut sync).await, to_device_text(&alice, "after"));
    // Bob's loop came through two failed `/sync`s, backing off 500 ms, then 1 s, with no `since` yet.
    let syncs = proxy.syncs();
    assert!(syncs.len() >= 3, "{syncs:?}");
    assert!(syncs[..3].iter().all(|(path, _)| !path.contains("since=")), "{syncs:?}");
    assert!(syncs[1].1 - syncs[0].1 >= Duration::from_millis(500), "{syncs:?}");
    assert!(syncs[2].1 - syncs[1].1 >= Duration::from_secs(1), "{syncs:?}");

    let dave_sync = room_fallback(&synapse, &alice, &cancel).await;

    cancel.cancel();
    sync.finish().await.unwrap();
    dave_sync.finish().await.unwrap();
    stepper.abort();
}

/// The room fallback: Dave's loop also delivers the `m.room.message`s of others in joined rooms,
/// and joins the rooms Alice (a peer) invites it to, one at most here. Returns Dave's loop.
async fn room_fallback(
    synapse: &common::Synapse,
    alice: &common::User,
    cancel: &CancellationToken,
) -> SyncHandle {
    let dave = synapse.register(&common::raiden_localpart()).await;
    let room_settings = SyncSettings {
        room_messages: true,
        auto_join_from: vec![user_id(alice)],
        max_auto_joins: 1,
        ..SyncSettings::default()
    };
    let mut dave_sync = client(&synapse.base_url, &dave).spawn_sync(room_settings, cancel.clone());
    let created = synapse
        .call(
            alice,
            http::Method::POST,
            "/_matrix/client/v3/createRoom",
            &json!({ "invite": [dave.user_id] }),
        )
        .await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    let members = format!("/_matrix/client/v3/rooms/{}/joined_members", common::urlencode(&room));
    common::eventually(Duration::from_secs(10), "Dave to join on Alice's invite", || async {
        let joined = synapse.call(alice, http::Method::GET, &members, &json!({})).await;
        joined["joined"].get(&dave.user_id).map(|_| ())
    })
    .await;
    let room_message = |event_id: String, body: &str| SyncEvent::RoomMessage {
        room_id: ruma::OwnedRoomId::try_from(room.as_str()).unwrap(),
        event_id: Some(ruma::OwnedEventId::try_from(event_id).unwrap()),
        sender: user_id(alice),
        content: text(body),
    };
    let event_id = synapse.send_text(alice, &room, "r-1", "over the room").await;
    assert_eq!(next_message(&mut dave_sync).await, room_message(event_id, "over the room"));
    // Dave's own message is not handed back to him.
    synapse.send_text(&dave, &room, "r-2", "mine").await;
    let event_id = synapse.send_text(alice, &room, "r-3", "reply").await;
    assert_eq!(next_message(&mut dave_sync).await, room_message(event_id, "reply"));

    // A second room from Alice is past Dave's bound of one: the invite is left. Dave's loop has
    // seen it once a message Alice sent after it has come through.
    let second = synapse
        .call(
            alice,
            http::Method::POST,
            "/_matrix/client/v3/createRoom",
            &json!({ "invite": [dave.user_id] }),
        )
        .await;
    let second = second["room_id"].as_str().unwrap().to_owned();
    let event_id = synapse.send_text(alice, &room, "r-4", "after the second invite").await;
    assert_eq!(next_message(&mut dave_sync).await, room_message(event_id, "after the second invite"));
    let path = format!("/_matrix/client/v3/rooms/{}/joined_members", common::urlencode(&second));
    let joined = synapse.call(alice, http::Method::GET, &path, &json!({})).await;
    assert!(joined["joined"].get(&dave.user_id).is_none(), "Dave stays out of the second room: {joined}");

    dave_sync
}
