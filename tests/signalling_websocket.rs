//! The client WebSocket against a real Synapse: two connected clients complete a call over the
//! relay; a peer without a socket gets the signal through its own `/sync`; a Matrix-only peer's
//! to-device signal reaches a connected client once; bad tokens, bad frames, oversize frames and
//! floods get clear errors; a revoked token, a silent socket and a missing auth frame are closed in
//! stepped time; shutdown tells every socket to reconnect.

mod common;

use std::time::Duration;

use common::ws::{Ended, Socket};
use reqwest::Method;
use serde_json::{Value, json};

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";

fn invite(id: u64, to: &str, call_id: &str, sdp: &str) -> Value {
    json!({
        "type": "signal", "id": id, "to": to, "call_id": call_id, "event_type": "m.call.invite",
        "content": {
            "party_id": "p1", "version": "1", "lifetime": 60000,
            "offer": { "type": "offer", "sdp": sdp },
        },
    })
}

/// The to-device events `user` receives through its own `/sync`, until `found` holds (10 s at most).
async fn sync_until(
    synapse: &common::Synapse,
    user: &common::User,
    found: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let client = reqwest::Client::new();
    let mut since: Option<String> = None;
    let mut events = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let since_param = since.as_ref().map(|since| format!("&since={since}")).unwrap_or_default();
        let url = format!("{}/_matrix/client/v3/sync?timeout=1000{since_param}", synapse.base_url);
        let answer: Value =
            client.get(&url).bearer_auth(&user.access_token).send().await.unwrap().json().await.unwrap();
        since = answer["next_batch"].as_str().map(str::to_owned);
        events.extend(answer["to_device"]["events"].as_array().cloned().unwrap_or_default());
        if found(&events) {
            return events;
        }
    }
    panic!("not found through /sync: {events:?}");
}

#[tokio::test]
async fn two_clients_complete_a_call_over_the_relay_and_a_peer_without_a_socket_gets_it_through_sync() {
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let carol = synapse.register_raiden(CAPS).await;

    let (mut a, ready) = Socket::ready(running.client, &alice.user.access_token).await;
    assert_eq!(ready["protocol"], 1);
    assert_eq!(ready["user_id"], alice.user.user_id.as_str());
    assert_eq!(ready["device_id"], alice.user.device_id.as_str());
    let ice = &ready["ice_servers"];
    assert!(ice["uris"][0].as_str().unwrap().starts_with("turn:"), "{ready}");
    assert!(ice["username"].as_str().unwrap().ends_with(&format!(":{}", alice.user.user_id)), "{ready}");
    assert!(ice["ttl"].as_u64().unwrap() > 0 && ice["password"].is_string(), "{ready}");
    assert_eq!(ready["limits"]["max_frame_bytes"], 65536);
    let (mut b, _) = Socket::ready(running.client, &bob.user.access_token).await;
    common::ws::watch_verified(&mut a, &[&alice.address, &bob.address, &carol.address]).await;

    // Invite, by address; a `from` the client puts in its content does not change who sent it.
    let mut offer = invite(1, &bob.address, "call-1", "v=0 alice");
    offer["from"] = json!("@mallory:localhost");
    a.send(&offer).await;
    let got = b.next_of("signal").await;
    assert_eq!(got["from"], alice.user.user_id.as_str());
    assert_eq!(got["from_address"], alice.address.as_str());
    assert_eq!(got["from_device"], alice.user.device_id.as_str());
    assert_eq!(got["event_type"], "m.call.invite");
    assert_eq!(got["call_id"], "call-1");
    assert_eq!(got["content"]["offer"]["sdp"], "v=0 alice");
    assert_eq!(got["content"]["call_id"], "call-1");
    assert_eq!(got["via"], "relay");
    assert_eq!(a.next_of("delivered").await, json!({ "type": "delivered", "ref": 1, "via": "relay" }));

    // Answer and candidates, by user id; then both report their channel open, and hang up.
    let signal = |id: u64, to: &str, event_type: &str, content: Value| json!({ "type": "signal", "id": id, "to": to, "call_id": "call-1", "event_type": event_type, "content": content });
    let answer =
        json!({ "party_id": "p2", "version": "1", "answer": { "type": "answer", "sdp": "v=0 bob" } });
    b.send(&signal(2, &alice.user.user_id, "m.call.answer", answer)).await;
    assert_eq!(a.next_of("signal").await["content"]["answer"]["sdp"], "v=0 bob");
    assert_eq!(b.next_of("delivered").await["ref"], 2);
    let candidates = json!({ "party_id": "p1", "version": "1", "candidates": [
        { "candidate": "candidate:1 1 udp 2122260223 127.0.0.1 5000 typ host", "sdpMid": "0", "sdpMLineIndex": 0 },
        { "candidate": "", "sdpMid": "0", "sdpMLineIndex": 0 },
    ] });
    a.send(&signal(3, &bob.address, "m.call.candidates", candidates.clone())).await;
    assert_eq!(b.next_of("signal").await["content"]["candidates"], candidates["candidates"]);
    assert_eq!(a.next_of("delivered").await["ref"], 3);
    for (socket, id) in [(&mut a, 4), (&mut b, 5)] {
        socket.send(&json!({ "type": "connected", "id": id, "call_id": "call-1" })).await;
        assert_eq!(socket.next_of("ok").await["ref"], id);
    }
    let hangup = json!({ "party_id": "p1", "version": "1", "reason": "user_hangup" });
    a.send(&signal(6, &bob.address, "m.call.hangup", hangup)).await;
    assert_eq!(b.next_of("signal").await["event_type"], "m.call.hangup");
    assert_eq!(a.next_of("delivered").await["ref"], 6);

    // Carol has no socket: the invite goes to her devices as a to-device message from alice.
    a.send(&invite(7, &carol.address, "call-2", "v=0 to carol")).await;
    assert_eq!(a.next_of("delivered").await, json!({ "type": "delivered", "ref": 7, "via": "matrix" }));
    let events =
        sync_until(&synapse, &carol.user, |events| events.iter().any(|e| e["type"] == "m.call.invite")).await;
    let event = events.iter().find(|e| e["type"] == "m.call.invite").unwrap();
    assert_eq!(event["sender"], alice.user.user_id.as_str());
    assert_eq!(event["content"]["call_id"], "call-2");
    assert_eq!(event["content"]["offer"]["sdp"], "v=0 to carol");
    // Its echo in the appservice stream is recognised as Switchboard's own send.
    common::eventually(Duration::from_secs(10), "the echo recognised", || async {
        let metrics = running.metrics().await;
        (common::metric(&metrics, "switchboard_signalling_echoes_dropped_total") >= 1).then_some(())
    })
    .await;
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_signalling_signals_sent_total{via=\"relay\"}"), 4);
    assert_eq!(common::metric(&metrics, "switchboard_signalling_signals_sent_total{via=\"matrix\"}"), 1);
    assert_eq!(common::metric(&metrics, "switchboard_signalling_connections "), 2);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_matrix_only_peers_signal_reaches_a_connected_client_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await;
    let carol = synapse.register_raiden(CAPS).await;
    let (mut a, _) = Socket::ready(running.client, &alice.user.access_token).await;

    // Carol uses Matrix only: a to-device answer through her homeserver.
    let content = json!({
        "call_id": "call-9", "party_id": "c1", "version": "1",
        "answer": { "type": "answer", "sdp": "v=0 carol" },
    });
    let body = json!({ "messages": { &alice.user.user_id: { "*": content } } });
    synapse.call(&carol.user, Method::PUT, "/_matrix/client/v3/sendToDevice/m.call.answer/t1", &body).await;
    let got = a.next_of("signal").await;
    assert_eq!(got["from"], carol.user.user_id.as_str());
    assert_eq!(got["via"], "matrix");
    assert_eq!(got["event_type"], "m.call.answer");
    assert_eq!(got["content"]["answer"]["sdp"], "v=0 carol");
    // Only once: the next frame is the answer to a ping.
    a.send(&json!({ "type": "ping", "id": "p" })).await;
    assert_eq!(a.next().await.unwrap(), json!({ "type": "pong", "ref": "p" }));
    running.stop().await.unwrap();
}

#[tokio::test]
async fn bad_tokens_bad_frames_and_floods_get_clear_errors_and_abuse_closes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let adjust = |config: &mut switchboard::config::Config| config.signalling.frames_per_sec = 20;
    let clock = switchboard::clock::Clock::system();
    let Some((synapse, running)) =
        common::with_synapse_on(&common::sqlite_url(dir.path()), None, adjust, clock).await
    else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await;
    let client = running.client;

    // Upgrades refused with Matrix error JSON.
    let (status, body) = Socket::connect(client, Some("not-a-token")).await.err().unwrap();
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
    let in_url =
        format!("http://{client}/_switchboard/client/v1/connect?access_token={}", alice.user.access_token);
    let response = reqwest::get(&in_url).await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(response.json::<Value>().await.unwrap()["errcode"], "M_INVALID_PARAM");
    let response = reqwest::get(format!("http://{client}/_switchboard/client/v1/connect")).await.unwrap();
    assert_eq!(response.status(), 400, "not a WebSocket upgrade");

    // Browsers: the token in an auth frame; a wrong one, or another first frame, closes with 4001.
    let mut browser = Socket::connect(client, None).await.unwrap();
    browser.send(&json!({ "type": "auth", "token": alice.user.access_token })).await;
    assert_eq!(browser.next_of("ready").await["user_id"], alice.user.user_id.as_str());
    let mut wrong = Socket::connect(client, None).await.unwrap();
    wrong.send(&json!({ "type": "auth", "id": 1, "token": "nope" })).await;
    let (frames, ended) = wrong.until_closed().await;
    assert_eq!(frames[0]["code"], "not_authenticated");
    assert_eq!(frames[0]["ref"], 1);
    assert_eq!(ended, Ended::Closed(4001));
    let mut rude = Socket::connect(client, None).await.unwrap();
    rude.send(&json!({ "type": "ping" })).await;
    assert_eq!(rude.until_closed().await.1, Ended::Closed(4001));

    // Bad frames on a live socket: each gets an error with its code (and its id as ref).
    let (mut a, _) = Socket::ready(client, &alice.user.access_token).await;
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "bad_frame"),
        (json!({ "id": 5 }).to_string(), "bad_frame"),
        (json!({ "type": "dance", "id": 6 }).to_string(), "unknown_type"),
        (json!({ "type": "signal", "id": 7, "to": "x", "call_id": "c", "event_type": "m.room.message", "content": {} }).to_string(), "invalid"),
        (json!({ "type": "signal", "id": 8, "to": "0x1234", "call_id": "c", "event_type": "m.call.invite", "content": {} }).to_string(), "invalid"),
        (invite(9, "0x00000000000000000000000000000000000000aa", "c", "v=0").to_string(), "unknown_peer"),
        (json!({ "type": "auth", "id": 10, "token": "again" }).to_string(), "not_authenticated"),
        (json!({ "type": "ping", "pad": "x".repeat(70_000) }).to_string(), "too_large"),
    ];
    for (text, code) in &cases {
        a.send_text(text.clone()).await;
        let error = a.next_of("error").await;
        assert_eq!(error["code"], *code, "{}: {error}", &text[..text.len().min(80)]);
    }
    a.send(&json!({ "type": "ping", "id": "still" })).await;
    assert_eq!(a.next_of("pong").await["ref"], "still", "the socket survives bad frames");

    // Watching up to max_watched (1,000) addresses in one frame: the current state of each (more
    // frames than the socket's queue holds: the server waits for the client, it does not drop it),
    // then `ok`; one more address is too many.
    let many: Vec<String> = (1..=1000u32).map(|n| format!("0x{n:040x}")).collect();
    a.send(&json!({ "type": "watch", "id": "many", "addresses": many })).await;
    let mut presence = 0;
    loop {
        let frame = a.next().await.expect("the socket stays open");
        if frame["type"] == "presence" {
            presence += 1;
        } else if frame["type"] == "ok" {
            assert_eq!(frame["ref"], "many");
            break;
        }
    }
    assert_eq!(presence, 1000);
    a.send(&json!({ "type": "watch", "id": "one-more", "addresses": [format!("0x{:040x}", 1001)] })).await;
    let error = a.next_of("error").await;
    assert_eq!((error["code"].as_str(), error["ref"].as_str()), (Some("too_many_watched"), Some("one-more")));

    // A frame past the hard limit closes the socket with 1009.
    a.send_text(json!({ "type": "ping", "pad": "x".repeat(200_000) }).to_string()).await;
    assert_eq!(a.until_closed().await.1, Ended::Closed(1009));

    // A flood: past the burst, rate_limited with retry_after_ms; kept up, the socket is closed (4003).
    let (mut flooder, _) = Socket::ready(client, &alice.user.access_token).await;
    for n in 0..200 {
        flooder.send(&json!({ "type": "ping", "id": n })).await;
    }
    let (frames, ended) = flooder.until_closed().await;
    let pongs = frames.iter().filter(|f| f["type"] == "pong").count();
    let limited: Vec<&Value> = frames.iter().filter(|f| f["code"] == "rate_limited").collect();
    assert!((40..=45).contains(&pongs), "the burst (2 × 20) is served: {pongs}");
    assert!(limited[0]["retry_after_ms"].as_u64().unwrap() > 0, "{:?}", limited[0]);
    assert_eq!(limited.len(), 32, "closed after 32 errors in a row");
    assert_eq!(ended, Ended::Closed(4003));
    // Counted once the server has finished with the socket.
    let metrics = common::eventually(Duration::from_secs(10), "the abusive socket counted", || async {
        let metrics = running.metrics().await;
        (common::metric(&metrics, "switchboard_signalling_closed_total{code=\"abuse\"}") == 1)
            .then_some(metrics)
    })
    .await;
    assert!(common::metric(&metrics, "switchboard_signalling_errors_total{code=\"rate_limited\"}") >= 32);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_missing_auth_frame_a_silent_socket_and_a_revoked_token_are_closed_in_stepped_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = common::stepped_clock();
    let adjust = |config: &mut switchboard::config::Config| {
        config.signalling.keepalive_secs = 20;
        config.signalling.revalidate_secs = 60;
        config.homeserver.whoami_cache_secs = 30;
    };
    let Some((synapse, running)) =
        common::with_synapse_on(&common::sqlite_url(dir.path()), None, adjust, clock.clone()).await
    else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;

    // No auth frame within auth_timeout_secs (10): closed with 4002.
    let mut browser = Socket::connect(running.client, None).await.unwrap();
    clock.advance(Duration::from_secs(9));
    browser.send(&json!({ "type": "auth", "token": alice.user.access_token })).await;
    assert_eq!(browser.next_of("ready").await["user_id"], alice.user.user_id.as_str(), "in time");
    let mut late = Socket::connect(running.client, None).await.unwrap();
    clock.advance(Duration::from_secs(10));
    assert_eq!(late.until_closed().await.1, Ended::Closed(4002));

    // A socket that says nothing for two keepalive periods is closed with 4004; one that answers
    // pings stays.
    let (mut silent, _) = Socket::ready(running.client, &bob.user.access_token).await;
    for _ in 0..4 {
        clock.advance(Duration::from_secs(10));
        browser.send(&json!({ "type": "ping", "id": "alive" })).await;
        assert_eq!(browser.next_of("pong").await["ref"], "alive");
    }
    assert_eq!(silent.until_closed().await.1, Ended::Closed(4004));

    // Logged out on the homeserver: closed with 4001 within revalidate_secs + whoami_cache_secs
    // (stepped 10 s at a time, the client answering pings all along).
    synapse.call(&alice.user, Method::POST, "/_matrix/client/v3/logout", &json!({})).await;
    let mut closed = None;
    for step in 1..=9 {
        clock.advance(Duration::from_secs(10));
        browser.send(&json!({ "type": "ping", "id": step })).await;
        let (frames, ended) = match browser.next().await {
            Ok(frame) if frame["type"] == "pong" => (Vec::new(), None),
            Ok(frame) => {
                let (mut rest, ended) = browser.until_closed().await;
                rest.insert(0, frame);
                (rest, Some(ended))
            }
            Err(ended) => (Vec::new(), Some(ended)),
        };
        if let Some(ended) = ended {
            assert!(frames.iter().any(|f| f["code"] == "not_authenticated"), "{frames:?}");
            closed = Some((step * 10, ended));
            break;
        }
    }
    let (after_secs, ended) = closed.expect("closed within revalidate_secs + whoami_cache_secs");
    assert_eq!(ended, Ended::Closed(4001));
    eprintln!("closed {after_secs} s (stepped) after the logout");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_tells_every_socket_to_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let (mut a, _) = Socket::ready(running.client, &alice.user.access_token).await;
    let (mut b, _) = Socket::ready(running.client, &bob.user.access_token).await;
    let stopping = tokio::spawn(running.stop());
    assert_eq!(a.until_closed().await.1, Ended::Closed(1012));
    assert_eq!(b.until_closed().await.1, Ended::Closed(1012));
    stopping.await.unwrap().expect("a clean stop with sockets open");
}

#[tokio::test]
async fn presence_follows_sockets_and_ice_servers_are_refreshed_at_half_their_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let clock = common::stepped_clock();
    let adjust = |config: &mut switchboard::config::Config| {
        config.signalling.keepalive_secs = 10_000;
        config.signalling.revalidate_secs = 10_000;
        config.signalling.offline_grace_secs = 10;
        config.turn.user_lifetime_secs = 600;
    };
    let Some((synapse, running)) =
        common::with_synapse_on(&common::sqlite_url(dir.path()), None, adjust, clock.clone()).await
    else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let (mut a, ready) = Socket::ready(running.client, &alice.user.access_token).await;
    let expiry = |ice: &Value| -> u64 {
        ice["username"].as_str().unwrap().split(':').next().unwrap().parse().unwrap()
    };
    let first_expiry = expiry(&ready["ice_servers"]);

    // Bob is offline until his socket opens; his presence is pushed to Alice, who watches him. (The
    // directory paces its look-ups on the clock: step it while waiting for Bob's profile.)
    a.send(&json!({ "type": "watch", "addresses": [&bob.address] })).await;
    let mut verified = false;
    for _ in 0..100 {
        clock.advance(Duration::from_millis(100));
        if let Some(Ok(frame)) = a.next_within(Duration::from_millis(100)).await
            && frame["type"] == "presence"
            && frame["users"][0]["verified"] == true
        {
            assert_eq!(frame["reachable"], false);
            verified = true;
            break;
        }
    }
    assert!(verified, "Bob's profile looked up and verified");
    let (b, _) = Socket::ready(running.client, &bob.user.access_token).await;
    let online = a.next_of("presence").await;
    assert_eq!(
        (online["address"].as_str(), online["reachable"].as_bool()),
        (Some(bob.address.as_str()), Some(true))
    );

    // Fresh TURN credentials at half their lifetime (300 s of 600).
    clock.advance(Duration::from_secs(300));
    let ice = a.next_of("ice_servers").await;
    // 300 s later, plus the up to 10 s stepped while waiting for Bob's profile.
    let later = expiry(&ice) - first_expiry;
    assert!((300..=311).contains(&later), "{later} s later: {ice}");

    // Bob's socket closes: he stays online for the grace period (10 s), then is offline again.
    drop(b);
    let mut offline_after = None;
    for second in 1..=30 {
        clock.advance(Duration::from_secs(1));
        if let Some(Ok(frame)) = a.next_within(Duration::from_millis(300)).await
            && frame["type"] == "presence"
            && frame["reachable"] == false
        {
            offline_after = Some(second);
            break;
        }
    }
    let offline_after = offline_after.expect("offline within 30 s (stepped) of the socket closing");
    assert!(offline_after >= 10, "not before the grace period: {offline_after} s");
    running.stop().await.unwrap();
}
