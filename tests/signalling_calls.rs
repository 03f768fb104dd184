//! The call broker behind the WebSocket, against a real Synapse: glare between two clients leaves
//! the call with the lower call id and tells both; duplicate and late signals are refused; an
//! unanswered invite expires in stepped time and both sides hear of it; a Raiden 3.x node that uses
//! Matrix only is spoken to in its own dialect.

mod common;

use std::time::Duration;

use common::ws::Socket;
use reqwest::Method;
use serde_json::{Value, json};

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";

#[expect(clippy::needless_pass_by_value, reason = "callers build the content in place")]
fn signal(id: u64, to: &str, call_id: &str, event_type: &str, content: Value) -> Value {
    json!({ "type": "signal", "id": id, "to": to, "call_id": call_id, "event_type": event_type, "content": content })
}

fn offer(sdp: &str, lifetime: u64) -> Value {
    json!({ "party_id": "p", "version": "1", "lifetime": lifetime, "offer": { "type": "offer", "sdp": sdp } })
}

#[tokio::test]
async fn glare_leaves_the_lower_call_id_and_duplicate_and_late_signals_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let (mut a, _) = Socket::ready(running.client, &alice.user.access_token).await;
    let (mut b, _) = Socket::ready(running.client, &bob.user.access_token).await;
    common::ws::watch_verified(&mut a, &[&alice.address, &bob.address]).await;

    // Both invite each other; bob's call id is lower, so his call goes on whichever came second.
    a.send(&signal(1, &bob.address, "b-call", "m.call.invite", offer("v=0 a", 60_000))).await;
    assert_eq!(a.next_of("delivered").await["ref"], 1);
    assert_eq!(b.next_of("signal").await["call_id"], "b-call");
    b.send(&signal(2, &alice.address, "a-call", "m.call.invite", offer("v=0 b", 60_000))).await;
    let expected = json!({ "type": "glare", "call_id": "b-call", "winner": "a-call" });
    assert_eq!(a.next_of("glare").await, expected);
    assert_eq!(b.next_of("glare").await, expected);
    assert_eq!(b.next_of("delivered").await["ref"], 2);
    assert_eq!(a.next_of("signal").await["call_id"], "a-call");

    // The lost call is over: its signals are late. The winner's duplicate is not delivered again.
    let candidates =
        json!({ "party_id": "p", "version": "1", "candidates": [{ "candidate": "", "sdpMid": "0" }] });
    a.send(&signal(3, &bob.address, "b-call", "m.call.candidates", candidates.clone())).await;
    assert_eq!(a.next_of("error").await["code"], "late");
    b.send(&signal(4, &alice.address, "a-call", "m.call.invite", offer("v=0 b", 60_000))).await;
    let error = b.next_of("error").await;
    assert_eq!((error["code"].as_str(), error["ref"].as_u64()), (Some("duplicate"), Some(4)));

    // The other order: a higher call id arriving second loses at once and is never delivered.
    let answer = json!({ "party_id": "p", "version": "1", "answer": { "type": "answer", "sdp": "v=0" } });
    a.send(&signal(5, &bob.address, "a-call", "m.call.answer", answer)).await;
    assert_eq!(a.next_of("delivered").await["ref"], 5);
    b.next_of("signal").await;
    b.send(&signal(6, &alice.address, "c-call", "m.call.invite", offer("v=0 c", 60_000))).await;
    assert_eq!(b.next_of("delivered").await["ref"], 6);
    a.next_of("signal").await;
    a.send(&signal(7, &bob.address, "d-call", "m.call.invite", offer("v=0 d", 60_000))).await;
    let expected = json!({ "type": "glare", "call_id": "d-call", "winner": "c-call" });
    assert_eq!(a.next_of("glare").await, expected);
    let error = a.next_of("error").await;
    assert_eq!((error["code"].as_str(), error["ref"].as_u64()), (Some("glare"), Some(7)));
    assert_eq!(b.next_of("glare").await, expected);

    // Both report the winner's channel open: the upgrade is counted.
    for socket in [&mut a, &mut b] {
        socket.send(&json!({ "type": "connected", "call_id": "a-call" })).await;
    }
    a.send(&json!({ "type": "ping", "id": "sync" })).await;
    a.next_of("pong").await;
    b.send(&json!({ "type": "ping", "id": "sync" })).await;
    b.next_of("pong").await;
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_calls_connected_total"), 1, "{metrics}");
    assert_eq!(common::metric(&metrics, "switchboard_calls_upgrade_seconds_count"), 1);
    assert_eq!(common::metric(&metrics, "switchboard_calls_ended_total{outcome=\"glare_lost\"}"), 2);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn an_unanswered_invite_expires_at_the_configured_clamp_and_both_sides_hear_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = common::stepped_clock();
    // The operator's clamp: invites live 20 s at most, whatever they ask for.
    let clamp = |config: &mut switchboard::config::Config| {
        config.calls.default_invite_lifetime_secs = 20;
        config.calls.max_invite_lifetime_secs = 20;
    };
    let Some((synapse, running)) =
        common::with_synapse_on(&common::sqlite_url(dir.path()), None, clamp, clock.clone()).await
    else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let (mut a, _) = Socket::ready(running.client, &alice.user.access_token).await;
    let (mut b, _) = Socket::ready(running.client, &bob.user.access_token).await;

    a.send(&signal(1, &bob.user.user_id, "x-call", "m.call.invite", offer("v=0", 30_000))).await;
    assert_eq!(a.next_of("delivered").await["ref"], 1);
    b.next_of("signal").await;
    clock.advance(Duration::from_secs(19));
    a.send(&json!({ "type": "ping", "id": 1 })).await;
    assert_eq!(a.next().await.unwrap()["type"], "pong", "not yet expired");
    clock.advance(Duration::from_secs(1));
    let ended = json!({ "type": "call_ended", "call_id": "x-call", "outcome": "expired" });
    assert_eq!(a.next_of("call_ended").await, ended);
    assert_eq!(b.next_of("call_ended").await, ended);
    let answer = json!({ "party_id": "p", "version": "1", "answer": { "type": "answer", "sdp": "v=0" } });
    b.send(&signal(2, &alice.user.user_id, "x-call", "m.call.answer", answer)).await;
    assert_eq!(b.next_of("error").await["code"], "late");
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_calls_ended_total{outcome=\"expired\"}"), 1);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_matrix_only_raiden_node_is_answered_in_its_own_dialect() {
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await;
    // A Raiden 3.x node: WebRTC, but no Switchboard.
    let raiden = synapse.register_raiden("webRTC=1&toDevice=1&Receive=1").await;
    let (mut a, _) = Socket::ready(running.client, &alice.user.access_token).await;
    common::ws::watch_verified(&mut a, &[&alice.address, &raiden.address]).await;

    // Its offer, as Raiden's Python node sends it: to-device m.room.message, m.notice, JSON body.
    let call_id = format!("{}|{}|1700000000000", raiden.address, alice.address);
    let body = json!({ "type": "offer", "sdp": "v=0 raiden", "call_id": call_id }).to_string();
    let messages =
        json!({ "messages": { &alice.user.user_id: { "*": { "msgtype": "m.notice", "body": body } } } });
    synapse
        .call(&raiden.user, Method::PUT, "/_matrix/client/v3/sendToDevice/m.room.message/r1", &messages)
        .await;
    let got = a.next_of("signal").await;
    assert_eq!(got["event_type"], "m.call.invite");
    assert_eq!(got["call_id"], call_id.as_str());
    assert_eq!(got["from"], raiden.user.user_id.as_str());
    assert_eq!(got["content"]["offer"]["sdp"], "v=0 raiden");
    assert_eq!(got["via"], "matrix");

    // The answer goes back in Raiden's dialect, to its devices.
    let answer =
        json!({ "party_id": "p", "version": "1", "answer": { "type": "answer", "sdp": "v=0 alice" } });
    a.send(&signal(1, &raiden.address, &call_id, "m.call.answer", answer)).await;
    assert_eq!(a.next_of("delivered").await, json!({ "type": "delivered", "ref": 1, "via": "matrix" }));
    let client = reqwest::Client::new();
    let found =
        common::eventually(Duration::from_secs(10), "the answer in the Raiden node's /sync", || async {
            let url = format!("{}/_matrix/client/v3/sync?timeout=500", synapse.base_url);
            let sync: Value = client
                .get(&url)
                .bearer_auth(&raiden.user.access_token)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let events = sync["to_device"]["events"].as_array()?.clone();
            events.into_iter().find(|e| e["type"] == "m.room.message")
        })
        .await;
    assert_eq!(found["sender"], alice.user.user_id.as_str());
    assert_eq!(found["content"]["msgtype"], "m.notice");
    let body: Value = serde_json::from_str(found["content"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["type"], "answer");
    assert_eq!(body["sdp"], "v=0 alice");
    assert_eq!(body["call_id"], call_id.as_str());
    // The bounded memories that made it so are visible: the node's dialect, the offer's copy.
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_signalling_remembered{table=\"dialects\"}"), 1);
    assert_eq!(common::metric(&metrics, "switchboard_signalling_remembered{table=\"matrix_copies\"}"), 1);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_room_call_invite_reaches_the_connected_callee() {
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await;
    let carol = synapse.register_raiden(CAPS).await;
    let (mut a, _) = Socket::ready(running.client, &alice.user.access_token).await;
    let room_id = synapse.shared_room(&carol.user, &[&alice.user]).await;

    // As Raiden's light client did in 2020: a version-0 room invite naming no invitee.
    let content = json!({
        "call_id": "room-call", "version": 0, "lifetime": 60000,
        "offer": { "type": "offer", "sdp": "v=0 room" },
    });
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.call.invite/t1", common::urlencode(&room_id));
    synapse.call(&carol.user, Method::PUT, &path, &content).await;
    let got = a.next_of("signal").await;
    assert_eq!(got["event_type"], "m.call.invite");
    assert_eq!(got["call_id"], "room-call");
    assert_eq!(got["from"], carol.user.user_id.as_str());
    assert_eq!(got["via"], "matrix");
    assert_eq!(got["content"]["version"], "1");
    assert_eq!(got["content"]["offer"]["sdp"], "v=0 room");
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_signalling_remembered{table=\"room_peers\"}"), 1);
    running.stop().await.unwrap();
}
