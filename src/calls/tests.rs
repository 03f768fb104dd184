//! The broker in stepped time: `now_ms` is a plain number each test advances.

use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

const ALICE: &str = "@alice:example.org";
const BOB: &str = "@bob:example.org";
const CAROL: &str = "@carol:example.org";

fn content(value: Value) -> serde_json::Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

fn signal(from: &str, to: &str, call_id: &str, event_type: EventType, body: Value) -> Signal {
    let mut content = content(body);
    content.insert("call_id".into(), json!(call_id));
    content.insert("version".into(), json!("1"));
    Signal {
        from_user: from.into(),
        from_device: Some("DEVICE".into()),
        to_user: to.into(),
        call_id: call_id.into(),
        event_type,
        content,
    }
}

fn invite(from: &str, to: &str, call_id: &str) -> Signal {
    signal(
        from,
        to,
        call_id,
        EventType::Invite,
        json!({
            "party_id": "p1", "lifetime": 60_000, "offer": {"type": "offer", "sdp": "v=0"},
        }),
    )
}

fn answer(from: &str, to: &str, call_id: &str, party: &str) -> Signal {
    signal(
        from,
        to,
        call_id,
        EventType::Answer,
        json!({
            "party_id": party, "answer": {"type": "answer", "sdp": "v=0"},
        }),
    )
}

fn candidates(from: &str, to: &str, call_id: &str, n: usize) -> Signal {
    signal(
        from,
        to,
        call_id,
        EventType::Candidates,
        json!({
            "party_id": "p1",
            "candidates": [{"candidate": format!("candidate:{n}"), "sdpMid": "0", "sdpMLineIndex": 0}],
        }),
    )
}

fn hangup(from: &str, to: &str, call_id: &str, reason: &str) -> Signal {
    signal(from, to, call_id, EventType::Hangup, json!({"party_id": "p1", "reason": reason}))
}

fn reject(from: &str, to: &str, call_id: &str) -> Signal {
    signal(from, to, call_id, EventType::Reject, json!({"party_id": "p1"}))
}

fn events(calls: &mut Calls) -> Vec<(String, EventKind)> {
    std::iter::from_fn(|| calls.poll_event()).map(|event| (event.call_id, event.kind)).collect()
}

fn ended(call_id: &str, outcome: Outcome) -> (String, EventKind) {
    (call_id.into(), EventKind::Ended { outcome })
}

fn started(call_id: &str) -> (String, EventKind) {
    (call_id.into(), EventKind::Started)
}

#[test]
fn full_call_completes_with_upgrade_time() {
    let mut calls = Calls::new(Settings::default());
    assert_eq!(calls.signal(1_000, &invite(ALICE, BOB, "c1")), Verdict::Forward);
    assert_eq!(events(&mut calls), [started("c1")]);
    assert_eq!(calls.live_calls(), 1);
    assert!(calls.invite_delivered(1_001, "c1").is_empty());
    assert_eq!(calls.signal(1_500, &answer(BOB, ALICE, "c1", "bob1")), Verdict::Forward);
    assert_eq!(calls.signal(1_510, &candidates(ALICE, BOB, "c1", 1)), Verdict::Forward);
    assert_eq!(calls.signal(1_520, &candidates(BOB, ALICE, "c1", 1)), Verdict::Forward);
    calls.connected(1_700, ALICE, "c1");
    assert_eq!(events(&mut calls), []);
    assert_eq!(calls.live_calls(), 1);
    calls.connected(1_850, BOB, "c1");
    assert_eq!(events(&mut calls), [("c1".into(), EventKind::Connected { upgrade_ms: 850 })]);
    assert_eq!((calls.live_calls(), calls.established_calls()), (0, 1));
    // A second report changes nothing.
    calls.connected(1_900, BOB, "c1");
    assert_eq!(events(&mut calls), []);
    assert_eq!(calls.signal(9_000, &hangup(BOB, ALICE, "c1", "user_hangup")), Verdict::Forward);
    assert_eq!(events(&mut calls), [ended("c1", Outcome::Completed)]);
    assert_eq!(calls.signal(9_001, &hangup(ALICE, BOB, "c1", "user_hangup")), Verdict::Ignore(Ignored::Late));
    assert_eq!((calls.live_calls(), calls.established_calls()), (0, 0));
    calls.check_consistency();
}

#[test]
fn invite_expires_after_its_lifetime() {
    let mut calls = Calls::new(Settings::default());
    let mut short = invite(ALICE, BOB, "short");
    short.content.insert("lifetime".into(), json!(30_000));
    let mut long = invite(ALICE, CAROL, "long");
    long.content.insert("lifetime".into(), json!(10_000_000));
    let mut none = invite(BOB, CAROL, "none");
    none.content.remove("lifetime");
    for invite in [&short, &long, &none] {
        assert_eq!(calls.signal(0, invite), Verdict::Forward);
    }
    events(&mut calls);
    assert_eq!(calls.poll_timeout(), Some(30_000));
    calls.handle_timeout(29_999);
    assert_eq!(events(&mut calls), []);
    calls.handle_timeout(30_000);
    assert_eq!(events(&mut calls), [ended("short", Outcome::Expired)]);
    assert_eq!(calls.signal(30_001, &answer(BOB, ALICE, "short", "b")), Verdict::Ignore(Ignored::Late));
    // No lifetime: the default (60 s); a long one: clamped to 120 s.
    assert_eq!(calls.poll_timeout(), Some(60_000));
    calls.handle_timeout(60_000);
    assert_eq!(events(&mut calls), [ended("none", Outcome::Expired)]);
    assert_eq!(calls.poll_timeout(), Some(120_000));
    calls.handle_timeout(120_000);
    assert_eq!(events(&mut calls), [ended("long", Outcome::Expired)]);
    assert_eq!(calls.live_calls(), 0);
    calls.check_consistency();
}

#[test]
fn answered_call_fails_when_not_connected_in_time() {
    let mut calls = Calls::new(Settings::default());
    calls.signal(0, &invite(ALICE, BOB, "c1"));
    calls.signal(5_000, &answer(BOB, ALICE, "c1", "b"));
    calls.connected(6_000, ALICE, "c1");
    events(&mut calls);
    // The invite's lifetime no longer applies once answered; the connect timeout does.
    assert_eq!(calls.poll_timeout(), Some(65_000));
    calls.handle_timeout(64_999);
    assert_eq!(events(&mut calls), []);
    calls.handle_timeout(65_000);
    assert_eq!(events(&mut calls), [ended("c1", Outcome::Failed)]);
    calls.connected(65_001, BOB, "c1");
    assert_eq!(events(&mut calls), []);
    assert_eq!(calls.live_calls(), 0);
    calls.check_consistency();
}

#[test]
fn glare_lower_incoming_call_id_wins() {
    let mut calls = Calls::new(Settings::default());
    assert_eq!(calls.signal(0, &invite(ALICE, BOB, "b-call")), Verdict::Forward);
    calls.signal(1, &candidates(ALICE, BOB, "b-call", 1));
    events(&mut calls);
    assert_eq!(
        calls.signal(10, &invite(BOB, ALICE, "a-call")),
        Verdict::Glare(Glare {
            won_call_id: "a-call".into(),
            lost_call_ids: vec!["b-call".into()],
            forward: true,
        })
    );
    assert_eq!(events(&mut calls), [ended("b-call", Outcome::GlareLost), started("a-call")]);
    assert_eq!(calls.live_calls(), 1);
    // The loser's held candidates are gone, its later signals late.
    assert!(calls.invite_delivered(11, "b-call").is_empty());
    assert_eq!(calls.signal(12, &candidates(ALICE, BOB, "b-call", 2)), Verdict::Ignore(Ignored::Late));
    assert_eq!(calls.signal(13, &answer(ALICE, BOB, "a-call", "a")), Verdict::Forward);
    calls.check_consistency();
}

#[test]
fn glare_lower_pending_call_id_wins() {
    let mut calls = Calls::new(Settings::default());
    assert_eq!(calls.signal(0, &invite(ALICE, BOB, "a-call")), Verdict::Forward);
    events(&mut calls);
    assert_eq!(
        calls.signal(10, &invite(BOB, ALICE, "b-call")),
        Verdict::Glare(Glare {
            won_call_id: "a-call".into(),
            lost_call_ids: vec!["b-call".into()],
            forward: false,
        })
    );
    assert_eq!(events(&mut calls), [ended("b-call", Outcome::GlareLost)]);
    assert_eq!(calls.live_calls(), 1);
    assert_eq!(calls.signal(11, &candidates(BOB, ALICE, "b-call", 1)), Verdict::Ignore(Ignored::Late));
    // The winner goes on.
    assert_eq!(calls.signal(12, &answer(BOB, ALICE, "a-call", "b")), Verdict::Forward);
    calls.check_consistency();
}

#[test]
fn glare_not_when_pending_invite_answered() {
    let mut calls = Calls::new(Settings::default());
    calls.signal(0, &invite(ALICE, BOB, "b-call"));
    calls.signal(5, &answer(BOB, ALICE, "b-call", "b"));
    events(&mut calls);
    assert_eq!(calls.signal(10, &invite(BOB, ALICE, "a-call")), Verdict::Forward);
    assert_eq!(events(&mut calls), [started("a-call")]);
    assert_eq!(calls.live_calls(), 2);
    calls.check_consistency();
}

#[test]
fn glare_only_between_the_two_users() {
    let mut calls = Calls::new(Settings::default());
    calls.signal(0, &invite(ALICE, BOB, "b-call"));
    // Carol inviting Alice, or Bob inviting Carol, is no glare.
    assert_eq!(calls.signal(1, &invite(CAROL, ALICE, "a-call")), Verdict::Forward);
    assert_eq!(calls.signal(2, &invite(BOB, CAROL, "a-other")), Verdict::Forward);
    assert_eq!(calls.live_calls(), 3);
}

#[test]
fn held_candidates_released_in_order_on_delivery() {
    let mut calls = Calls::new(Settings::default());
    calls.signal(0, &invite(ALICE, BOB, "c1"));
    let held: Vec<Signal> = (0..3).map(|n| candidates(ALICE, BOB, "c1", n)).collect();
    for signal in &held {
        assert_eq!(calls.signal(1, signal), Verdict::Hold);
    }
    // The callee's candidates are not held.
    assert_eq!(calls.signal(2, &candidates(BOB, ALICE, "c1", 9)), Verdict::Forward);
    assert!(calls.held_bytes() > 0);
    assert_eq!(calls.invite_delivered(3, "c1"), held);
    assert_eq!(calls.held_bytes(), 0);
    assert!(calls.invite_delivered(4, "c1").is_empty());
    assert_eq!(calls.signal(5, &candidates(ALICE, BOB, "c1", 3)), Verdict::Forward);
    calls.check_consistency();
}

#[test]
fn held_candidates_refused_past_the_per_call_bound() {
    let mut calls = Calls::new(Settings { max_held_candidates: 4, ..Settings::default() });
    calls.signal(0, &invite(ALICE, BOB, "c1"));
    for n in 0..4 {
        assert_eq!(calls.signal(1, &candidates(ALICE, BOB, "c1", n)), Verdict::Hold);
    }
    let fifth = candidates(ALICE, BOB, "c1", 4);
    assert_eq!(calls.signal(2, &fifth), Verdict::Refused(Refused::TooManyHeld));
    assert_eq!(calls.invite_delivered(3, "c1").len(), 4);
    // The refused one was not remembered: its retry goes through.
    assert_eq!(calls.signal(4, &fifth), Verdict::Forward);
    calls.check_consistency();
}

#[test]
fn held_candidates_refused_past_the_total_bytes() {
    let mut calls = Calls::new(Settings { max_held_bytes: 2_500, ..Settings::default() });
    calls.signal(0, &invite(ALICE, BOB, "c1"));
    calls.signal(0, &invite(ALICE, CAROL, "c2"));
    let big = |to: &str, call: &str, n: usize| {
        let mut signal = candidates(ALICE, to, call, n);
        signal.content.insert("pad".into(), json!("x".repeat(700)));
        signal
    };
    assert_eq!(calls.signal(1, &big(BOB, "c1", 0)), Verdict::Hold);
    assert_eq!(calls.signal(1, &big(CAROL, "c2", 0)), Verdict::Hold);
    assert_eq!(calls.signal(1, &big(CAROL, "c2", 1)), Verdict::Refused(Refused::TooManyHeld));
    // Ending a call frees its share.
    calls.signal(2, &hangup(ALICE, BOB, "c1", "user_hangup"));
    assert_eq!(calls.signal(3, &big(CAROL, "c2", 1)), Verdict::Hold);
    assert!(calls.held_bytes() <= 2_500);
    calls.check_consistency();
}

#[test]
fn invite_failed_ends_the_call_and_returns_held() {
    let mut calls = Calls::new(Settings::default());
    calls.signal(0, &invite(ALICE, BOB, "c1"));
    calls.signal(1, &candidates(ALICE, BOB, "c1", 0));
    events(&mut calls);
    assert_eq!(calls.invite_failed(2, "c1"), [candidates(ALICE, BOB, "c1", 0)]);
    assert_eq!(events(&mut calls), [ended("c1", Outcome::Failed)]);
    assert_eq!((calls.live_calls(), calls.held_bytes()), (0, 0));
    calls.check_consistency();
}

#[test]
fn duplicates_ignored_whatever_the_path() {
    let mut calls = Calls::new(Settings::default());
    let invite = invite(ALICE, BOB, "c1");
    assert_eq!(calls.signal(0, &invite), Verdict::Forward);
    // The Matrix echo of our own send: no device, keys in another order.
    let mut echo = invite.clone();
    echo.from_device = None;
    echo.content = invite.content.iter().rev().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(calls.signal(1, &echo), Verdict::Ignore(Ignored::Duplicate));
    calls.invite_delivered(1, "c1");
    let first = candidates(ALICE, BOB, "c1", 1);
    assert_eq!(calls.signal(2, &first), Verdict::Forward);
    assert_eq!(calls.signal(3, &first), Verdict::Ignore(Ignored::Duplicate));
    // Same content from the other user, or other content: not duplicates.
    let mut mirrored = first.clone();
    (mirrored.from_user, mirrored.to_user) = (BOB.into(), ALICE.into());
    assert_eq!(calls.signal(4, &mirrored), Verdict::Forward);
    assert_eq!(calls.signal(5, &answer(BOB, ALICE, "c1", "bob1")), Verdict::Forward);
    assert_eq!(calls.signal(6, &answer(BOB, ALICE, "c1", "bob2")), Verdict::Forward);
    assert_eq!(calls.signal(7, &answer(BOB, ALICE, "c1", "bob2")), Verdict::Ignore(Ignored::Duplicate));
    assert_eq!(events(&mut calls), [started("c1")]);
    calls.check_consistency();
}

#[test]
fn duplicates_remembered_per_call_up_to_the_bound() {
    let mut calls = Calls::new(Settings::default());
    calls.signal(0, &invite(ALICE, BOB, "c1"));
    calls.invite_delivered(0, "c1");
    for n in 0..REMEMBERED_SIGNALS + 10 {
        assert_eq!(calls.signal(1, &candidates(ALICE, BOB, "c1", n)), Verdict::Forward);
    }
    assert_eq!(calls.by_id["c1"].seen.len(), REMEMBERED_SIGNALS);
    let last = candidates(ALICE, BOB, "c1", REMEMBERED_SIGNALS + 9);
    assert_eq!(calls.signal(2, &last), Verdict::Ignore(Ignored::Duplicate));
    calls.check_consistency();
}

#[test]
fn late_signals_ignored_until_the_call_is_forgotten() {
    let mut calls = Calls::new(Settings::default());
    calls.signal(0, &invite(ALICE, BOB, "c1"));
    assert_eq!(calls.signal(10, &reject(BOB, ALICE, "c1")), Verdict::Forward);
    assert_eq!(events(&mut calls), [started("c1"), ended("c1", Outcome::Rejected)]);
    for late in [
        answer(BOB, ALICE, "c1", "b"),
        candidates(ALICE, BOB, "c1", 1),
        hangup(ALICE, BOB, "c1", "user_hangup"),
        signal(ALICE, BOB, "c1", EventType::Invite, json!({"party_id": "p2"})),
    ] {
        assert_eq!(calls.signal(20, &late), Verdict::Ignore(Ignored::Late), "{late:?}");
    }
    assert_eq!(calls.poll_timeout(), Some(120_010));
    calls.handle_timeout(120_010);
    assert_eq!(calls.remembered_calls(), 0);
    assert_eq!(calls.poll_timeout(), None);
    // Forgotten: unknown again, so forwarded.
    assert_eq!(calls.signal(120_011, &candidates(ALICE, BOB, "c1", 1)), Verdict::Forward);
    assert_eq!(events(&mut calls), []);
}

#[test]
fn unknown_call_signals_forwarded() {
    let mut calls = Calls::new(Settings::default());
    for event_type in EventType::ALL.into_iter().filter(|t| *t != EventType::Invite) {
        let signal = signal(BOB, ALICE, "never-seen", event_type, json!({"party_id": "b"}));
        assert_eq!(calls.signal(0, &signal), Verdict::Forward, "{event_type}");
    }
    calls.connected(1, ALICE, "never-seen");
    assert!(calls.invite_delivered(1, "never-seen").is_empty());
    assert_eq!(events(&mut calls), []);
    assert_eq!(calls.remembered_calls(), 0);
}

#[test]
fn signals_refused_from_users_outside_the_call() {
    let mut calls = Calls::new(Settings::default());
    calls.signal(0, &invite(ALICE, BOB, "c1"));
    for intruder in [
        answer(CAROL, ALICE, "c1", "c"),
        hangup(CAROL, BOB, "c1", "user_hangup"),
        candidates(ALICE, CAROL, "c1", 1),
        invite(CAROL, BOB, "c1"),
    ] {
        assert_eq!(calls.signal(1, &intruder), Verdict::Refused(Refused::NotInCall));
    }
    calls.connected(2, CAROL, "c1");
    assert_eq!(calls.live_calls(), 1);
    assert_eq!(events(&mut calls), [started("c1")]);
}

#[test]
fn hangup_outcome_depends_on_who_and_when() {
    let cases = [
        (hangup(ALICE, BOB, "c", "user_hangup"), Outcome::Failed),
        (hangup(ALICE, BOB, "c", "invite_timeout"), Outcome::Expired),
        (hangup(BOB, ALICE, "c", "user_busy"), Outcome::Rejected),
        (reject(BOB, ALICE, "c"), Outcome::Rejected),
    ];
    for (end, outcome) in cases {
        let mut calls = Calls::new(Settings::default());
        calls.signal(0, &invite(ALICE, BOB, "c"));
        assert_eq!(calls.signal(1, &end), Verdict::Forward);
        assert_eq!(events(&mut calls), [started("c"), ended("c", outcome)], "{end:?}");
    }
    // Answered, not connected: any hangup fails the call, a reject rejects it.
    for (end, outcome) in [
        (hangup(BOB, ALICE, "c", "ice_failed"), Outcome::Failed),
        (reject(BOB, ALICE, "c"), Outcome::Rejected),
    ] {
        let mut calls = Calls::new(Settings::default());
        calls.signal(0, &invite(ALICE, BOB, "c"));
        calls.signal(1, &answer(BOB, ALICE, "c", "b"));
        assert_eq!(calls.signal(2, &end), Verdict::Forward);
        assert_eq!(events(&mut calls), [started("c"), ended("c", outcome)], "{end:?}");
    }
}

#[test]
fn per_user_limit_refuses_then_frees() {
    let mut calls = Calls::new(Settings { max_live_calls_per_user: 3, ..Settings::default() });
    let callee = |n: usize| format!("@callee{n}:example.org");
    for n in 0..3 {
        assert_eq!(calls.signal(0, &invite(ALICE, &callee(n), &format!("c{n}"))), Verdict::Forward);
    }
    assert_eq!(calls.signal(1, &invite(ALICE, &callee(3), "c3")), Verdict::Refused(Refused::TooManyCalls));
    // The callee's side counts too.
    for n in 0..3 {
        let other = format!("@caller{n}:example.org");
        assert_eq!(calls.signal(1, &invite(&other, BOB, &format!("b{n}"))), Verdict::Forward);
    }
    assert_eq!(calls.signal(1, &invite(CAROL, BOB, "b3")), Verdict::Refused(Refused::TooManyCalls));
    // A hangup frees a slot, and so does an established call.
    calls.signal(2, &hangup(ALICE, &callee(0), "c0", "user_hangup"));
    assert_eq!(calls.signal(3, &invite(ALICE, &callee(3), "c3")), Verdict::Forward);
    assert_eq!(calls.signal(4, &invite(ALICE, &callee(4), "c4")), Verdict::Refused(Refused::TooManyCalls));
    calls.signal(5, &answer(&callee(1), ALICE, "c1", "x"));
    calls.connected(6, ALICE, "c1");
    calls.connected(6, &callee(1), "c1");
    assert_eq!(calls.signal(7, &invite(ALICE, &callee(4), "c4")), Verdict::Forward);
    // And so does expiry.
    calls.handle_timeout(60_001);
    assert_eq!(calls.signal(60_002, &invite(CAROL, BOB, "b3")), Verdict::Forward);
    calls.check_consistency();
}

#[test]
fn memory_bounded_under_many_calls() {
    let settings = Settings::default();
    let max_calls = settings.max_calls;
    let mut calls = Calls::new(settings);
    for n in 0..200_000_u64 {
        let (from, to, id) = (format!("@a{n}:x"), format!("@b{n}:x"), format!("call-{n}"));
        assert_eq!(calls.signal(n, &invite(&from, &to, &id)), Verdict::Forward);
        assert_eq!(calls.signal(n, &hangup(&from, &to, &id, "user_hangup")), Verdict::Forward);
        assert!(calls.remembered_calls() <= max_calls);
    }
    assert_eq!(calls.remembered_calls(), max_calls);
    // The oldest ended calls went first: the newest are still remembered.
    assert_eq!(
        calls.signal(200_000, &hangup("@a199999:x", "@b199999:x", "call-199999", "x")),
        Verdict::Ignore(Ignored::Late)
    );
    assert_eq!(calls.signal(200_000, &hangup("@a0:x", "@b0:x", "call-0", "x")), Verdict::Forward);
    assert_eq!(events(&mut calls).len(), 400_000);
    calls.check_consistency();
}

#[test]
fn new_calls_refused_when_every_kept_call_is_pending() {
    let mut calls = Calls::new(Settings { max_calls: 100, ..Settings::default() });
    let ids = |n: usize| (format!("@a{n}:x"), format!("@b{n}:x"), format!("call-{n}"));
    // Established ones make room, the least recently active first.
    for n in 0..50 {
        let (from, to, id) = ids(n);
        calls.signal(0, &invite(&from, &to, &id));
        calls.connected(1, &from, &id);
        calls.connected(1, &to, &id);
    }
    let (from, to, id) = ids(0);
    calls.signal(2, &candidates(&from, &to, &id, 1));
    for n in 50..160 {
        let (from, to, id) = ids(n);
        let verdict = calls.signal(3, &invite(&from, &to, &id));
        let expected = if n < 150 { Verdict::Forward } else { Verdict::Refused(Refused::Overloaded) };
        assert_eq!(verdict, expected, "call {n}");
        assert!(calls.remembered_calls() <= 100);
        // call-0 was the most recently active established call: pushed out last.
        assert_eq!(calls.by_id.contains_key("call-0"), n < 149, "call {n}");
    }
    assert_eq!((calls.live_calls(), calls.established_calls()), (100, 0));
    calls.check_consistency();
}

#[test]
fn idle_established_call_forgotten_without_event() {
    let mut calls = Calls::new(Settings::default());
    calls.signal(0, &invite(ALICE, BOB, "c1"));
    calls.signal(1, &answer(BOB, ALICE, "c1", "b"));
    calls.connected(2, ALICE, "c1");
    calls.connected(3, BOB, "c1");
    events(&mut calls);
    // A signal an hour minus one later keeps it.
    calls.signal(3_600_002, &signal(ALICE, BOB, "c1", EventType::Negotiate, json!({"x": 1})));
    calls.handle_timeout(3_600_003);
    assert_eq!(calls.established_calls(), 1);
    calls.handle_timeout(7_200_002);
    assert_eq!((calls.established_calls(), calls.remembered_calls()), (0, 0));
    assert_eq!(events(&mut calls), []);
    assert_eq!(calls.signal(7_200_003, &hangup(ALICE, BOB, "c1", "user_hangup")), Verdict::Forward);
}

#[test]
fn malformed_ids_refused_and_odd_content_tolerated() {
    let mut calls = Calls::new(Settings::default());
    let long = "x".repeat(MAX_ID_BYTES + 1);
    for bad in [
        invite(ALICE, BOB, ""),
        invite(ALICE, BOB, &long),
        invite(ALICE, &long, "c1"),
        invite("", BOB, "c1"),
        invite(ALICE, ALICE, "c1"),
    ] {
        assert!(matches!(calls.signal(0, &bad), Verdict::Refused(Refused::Malformed(_))), "{bad:?}");
    }
    assert_eq!(calls.remembered_calls(), 0);
    // Raiden's ids are not Matrix's grammar but are accepted.
    assert_eq!(calls.signal(0, &invite(ALICE, BOB, "0xab|0xcd|1700000000")), Verdict::Forward);
    // Odd content: a lifetime of the wrong type, a huge string, deep nesting, no fields at all.
    let mut odd = invite(ALICE, CAROL, "odd");
    odd.content.insert("lifetime".into(), json!("soon"));
    let mut deep = json!(1);
    for _ in 0..1_000 {
        deep = json!([deep]);
    }
    odd.content.insert("deep".into(), deep);
    odd.content.insert("huge".into(), json!("y".repeat(1 << 20)));
    assert_eq!(calls.signal(0, &odd), Verdict::Forward);
    assert_eq!(calls.poll_timeout(), Some(60_000));
    let bare = Signal { content: serde_json::Map::new(), ..hangup(ALICE, CAROL, "odd", "") };
    assert_eq!(calls.signal(1, &bare), Verdict::Forward);
    let negative = signal(BOB, CAROL, "neg", EventType::Invite, json!({"lifetime": -5}));
    assert_eq!(calls.signal(2, &negative), Verdict::Forward);
    calls.check_consistency();
}

// ---- random sequences -------------------------------------------------------------------------

const USERS: [&str; 4] = ["@u0:x", "@u1:x", "@u2:x", "@u3:x"];
const CALL_IDS: [&str; 5] = ["a", "b", "c", "d", "e"];

#[derive(Debug, Clone)]
enum Op {
    Signal { from: usize, to: usize, call: usize, kind: usize, variant: u8 },
    Connected { user: usize, call: usize },
    Delivered { call: usize },
    Failed { call: usize },
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..USERS.len(), 0..USERS.len(), 0..CALL_IDS.len(), 0..EventType::ALL.len(), 0..3u8)
            .prop_map(|(from, to, call, kind, variant)| Op::Signal { from, to, call, kind, variant }),
        2 => (0..USERS.len(), 0..CALL_IDS.len()).prop_map(|(user, call)| Op::Connected { user, call }),
        1 => (0..CALL_IDS.len()).prop_map(|call| Op::Delivered { call }),
        1 => (0..CALL_IDS.len()).prop_map(|call| Op::Failed { call }),
        2 => (0..90_000u64).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn random_signal(from: usize, to: usize, call: usize, kind: usize, variant: u8) -> Signal {
    let event_type = EventType::ALL[kind];
    let body = match variant {
        0 => json!({"party_id": "p0", "lifetime": 30_000, "reason": "user_hangup"}),
        1 => json!({"party_id": "p1", "lifetime": "x", "reason": "invite_timeout"}),
        _ => json!({"party_id": format!("p{from}"), "candidates": [{"candidate": ""}]}),
    };
    signal(USERS[from], USERS[to], CALL_IDS[call], event_type, body)
}

/// Runs `ops`, checking after each: the internal indexes agree, the bounds hold, no two opposite
/// unanswered invites both survive (glare), and each call starts, connects and ends at most once,
/// in that order (a call id may start again once its call is forgotten).
fn run(settings: Settings, ops: &[Op]) {
    let limit = settings.max_live_calls_per_user;
    let max_calls = settings.max_calls;
    let mut calls = Calls::new(settings);
    let mut now = 0;
    let mut history: HashMap<String, Vec<EventKind>> = HashMap::new();
    for op in ops {
        match *op {
            Op::Signal { from, to, call, kind, variant } => {
                let signal = random_signal(from, to, call, kind, variant);
                let verdict = calls.signal(now, &signal);
                if let Verdict::Glare(glare) = &verdict {
                    assert_eq!(glare.forward, glare.won_call_id == signal.call_id);
                    assert!(glare.lost_call_ids.iter().all(|lost| *lost > glare.won_call_id));
                }
            }
            Op::Connected { user, call } => calls.connected(now, USERS[user], CALL_IDS[call]),
            Op::Delivered { call } => {
                calls.invite_delivered(now, CALL_IDS[call]);
            }
            Op::Failed { call } => {
                calls.invite_failed(now, CALL_IDS[call]);
            }
            Op::Advance { ms } => {
                now += ms;
                calls.handle_timeout(now);
                assert!(calls.poll_timeout().is_none_or(|next| next > now));
            }
        }
        calls.check_consistency();
        assert!(calls.live_calls() <= USERS.len() * limit);
        assert!(calls.remembered_calls() <= max_calls);
        for a in &calls.by_id {
            for b in &calls.by_id {
                let glaring = a.1.phase == Phase::Invited
                    && b.1.phase == Phase::Invited
                    && a.1.caller == b.1.callee
                    && a.1.callee == b.1.caller;
                assert!(!glaring, "both {} and {} survive glare", a.0, b.0);
            }
        }
        while let Some(event) = calls.poll_event() {
            let seen = history.entry(event.call_id.clone()).or_default();
            assert!(!seen.iter().any(|kind| matches!(kind, EventKind::Ended { .. })), "{seen:?}");
            match event.kind {
                EventKind::Started => assert!(seen.is_empty(), "{seen:?}"),
                EventKind::Connected { .. } => {
                    assert_eq!(seen.as_slice(), [EventKind::Started]);
                }
                EventKind::Ended { outcome } => {
                    assert!(!seen.is_empty() || outcome == Outcome::GlareLost, "ended without starting");
                }
            }
            seen.push(event.kind);
        }
        // A forgotten call's id may start a new call.
        history.retain(|call_id, _| calls.by_id.contains_key(call_id.as_str()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        let settings = Settings {
            max_live_calls_per_user: 2,
            remember_ended_ms: u64::MAX / 4,
            idle_established_ms: u64::MAX / 4,
            max_held_candidates: 2,
            ..Settings::default()
        };
        run(settings, &ops);
    }

    #[test]
    fn random_sequences_keep_bounds_when_tight(ops in proptest::collection::vec(op(), 1..120)) {
        let settings = Settings {
            max_live_calls_per_user: 1,
            connect_timeout_ms: 20_000,
            idle_established_ms: 50_000,
            remember_ended_ms: 40_000,
            max_held_candidates: 1,
            max_held_bytes: 300,
            max_calls: 3,
            ..Settings::default()
        };
        run(settings, &ops);
    }
}
