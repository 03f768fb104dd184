//! Two peers over a simulated data channel and Matrix, in stepped time: what an application on
//! either side would notice (what it receives, in which order, how often), not internals.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

fn stream(n: u64) -> StreamId {
    StreamId::from_u64(n).expect("non-zero")
}

fn msg(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

/// A Raiden-like JSON message.
fn raiden(i: usize) -> Bytes {
    msg(&format!(r#"{{"type":"Processed","message_identifier":"{i}","signature":"0x{i:0130x}"}}"#))
}

/// Two peers, what is in flight between them, and what each application received.
struct Sim {
    now: Instant,
    a: Peer,
    b: Peer,
    /// Data channel frames in flight towards a / towards b.
    dc_to_a: VecDeque<Bytes>,
    dc_to_b: VecDeque<Bytes>,
    /// To-device messages accepted by the homeserver, towards a / b, in order.
    mx_to_a: VecDeque<ToDevice>,
    mx_to_b: VecDeque<ToDevice>,
    got_a: Vec<Bytes>,
    got_b: Vec<Bytes>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    A,
    B,
}

impl Sim {
    fn new(limits: &Limits) -> Self {
        Self {
            now: Instant::now(),
            a: Peer::new(stream(0xa1), limits.clone()),
            b: Peer::new(stream(0xb1), limits.clone()),
            dc_to_a: VecDeque::new(),
            dc_to_b: VecDeque::new(),
            mx_to_a: VecDeque::new(),
            mx_to_b: VecDeque::new(),
            got_a: Vec::new(),
            got_b: Vec::new(),
        }
    }

    fn peer(&mut self, side: Side) -> &mut Peer {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    fn step(&mut self, by: Duration) {
        self.now += by;
        let now = self.now;
        self.a.handle_timeout(now);
        self.b.handle_timeout(now);
    }

    fn open(&mut self) {
        let now = self.now;
        self.a.on_channel_open(now);
        self.b.on_channel_open(now);
    }

    fn kill(&mut self) {
        self.dc_to_a.clear();
        self.dc_to_b.clear();
        self.a.on_channel_lost();
        self.b.on_channel_lost();
    }

    /// `side` writes what it has for the channel.
    fn poll_dc(&mut self, side: Side) {
        let now = self.now;
        let frames = self.peer(side).poll_dc(now, usize::MAX);
        match side {
            Side::A => self.dc_to_b.extend(frames),
            Side::B => self.dc_to_a.extend(frames),
        }
    }

    /// One frame in flight towards `to` (the `index`-th, modulo) arrives; with `dup` a copy stays.
    fn deliver_dc(&mut self, to: Side, index: usize, dup: bool) {
        let now = self.now;
        let queue = match to {
            Side::A => &mut self.dc_to_a,
            Side::B => &mut self.dc_to_b,
        };
        if queue.is_empty() {
            return;
        }
        let i = index % queue.len();
        let frame = if dup { queue[i].clone() } else { queue.remove(i).expect("in range") };
        let got = self.peer(to).receive_dc(now, &frame).expect("valid frame");
        match to {
            Side::A => self.got_a.extend(got),
            Side::B => self.got_b.extend(got),
        }
    }

    /// `side` makes one to-device send if it has one; the homeserver accepts it or not.
    fn poll_matrix(&mut self, side: Side, accepted: bool) -> bool {
        let now = self.now;
        let Some(send) = self.peer(side).poll_matrix(now) else { return false };
        if !accepted {
            self.peer(side).on_matrix_failed(now, &send);
            return true;
        }
        if let Some((first, n)) = send.lines {
            self.peer(side).on_homeserver_accepted(first, n);
        }
        match side {
            Side::A => self.mx_to_b.push_back(send),
            Side::B => self.mx_to_a.push_back(send),
        }
        true
    }

    /// The oldest to-device message towards `to` arrives (`dup`: it stays in the inbox too).
    fn deliver_matrix(&mut self, to: Side, dup: bool) {
        let now = self.now;
        let queue = match to {
            Side::A => &mut self.mx_to_a,
            Side::B => &mut self.mx_to_b,
        };
        let Some(send) = (if dup { queue.front().cloned() } else { queue.pop_front() }) else { return };
        let peer = self.peer(to);
        if send.event_type == EVENT_ACK {
            peer.receive_matrix_ack(now, &send.content).expect("valid ack");
        } else {
            let got = peer.receive_matrix(now, &send.content).expect("valid content");
            match to {
                Side::A => self.got_a.extend(got),
                Side::B => self.got_b.extend(got),
            }
        }
    }

    /// Everything flows until quiet: the channel if alive, else Matrix.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut busy = false;
            for side in [Side::A, Side::B] {
                let now = self.now;
                let state = self.peer(side).dc_state(now);
                if state != DcState::Closed {
                    let before = self.dc_to_a.len() + self.dc_to_b.len();
                    self.poll_dc(side);
                    busy |= self.dc_to_a.len() + self.dc_to_b.len() > before;
                }
                if state != DcState::Alive {
                    while self.poll_matrix(side, true) {
                        busy = true;
                    }
                }
            }
            while !self.dc_to_a.is_empty() || !self.dc_to_b.is_empty() {
                busy = true;
                self.deliver_dc(Side::A, 0, false);
                self.deliver_dc(Side::B, 0, false);
            }
            while !self.mx_to_a.is_empty() || !self.mx_to_b.is_empty() {
                busy = true;
                self.deliver_matrix(Side::A, false);
                self.deliver_matrix(Side::B, false);
            }
            if !busy {
                let done = self.a.outgoing().buffered_fragments() == 0
                    && self.b.outgoing().buffered_fragments() == 0;
                if done {
                    return;
                }
                // Let acks and the resend timer fall due.
                let next = [self.a.poll_timeout(self.now), self.b.poll_timeout(self.now)]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(self.now + Duration::from_secs(1));
                let by = next.saturating_duration_since(self.now).max(Duration::from_millis(1));
                self.step(by);
            }
        }
        panic!("did not settle");
    }

    /// Opens the channel and exchanges HELLO, PING and PONG until both sides are alive.
    fn handshake(&mut self) {
        self.open();
        for _ in 0..4 {
            self.poll_dc(Side::A);
            self.poll_dc(Side::B);
            while !self.dc_to_a.is_empty() || !self.dc_to_b.is_empty() {
                self.deliver_dc(Side::A, 0, false);
                self.deliver_dc(Side::B, 0, false);
            }
        }
        assert_eq!(self.a.dc_state(self.now), DcState::Alive);
        assert_eq!(self.b.dc_state(self.now), DcState::Alive);
    }
}

#[test]
fn delivery_in_order_once_when_channel_dies_after_a_prefix() {
    let mut sim = Sim::new(&Limits::default());
    sim.handshake();
    let sent: Vec<Bytes> = (0..20).map(raiden).collect();
    for m in &sent[..15] {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    sim.poll_dc(Side::A);
    assert_eq!(sim.dc_to_b.len(), 15, "15 DATA frames on the channel");
    // The channel carries 7 of them (out of order), then dies with the rest in flight.
    for i in [3, 0, 1, 2, 0, 0, 0] {
        sim.deliver_dc(Side::B, i, false);
    }
    assert_eq!(sim.got_b, sent[..7], "the prefix, in order");
    sim.kill();
    for m in &sent[15..] {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    // Over Matrix: the unacked ones first, then the new ones.
    assert!(sim.poll_matrix(Side::A, true));
    let first = sim.mx_to_b.front().expect("a batch").clone();
    assert_eq!(first.content[STREAM_FIELD]["seq"], json!(1), "resend starts at the lowest unacked seq");
    sim.settle();
    assert_eq!(sim.got_b, sent, "every message once, in order");
    assert_eq!(sim.a.counters().replay_buffered_bytes, 0, "all acked");
    assert!(sim.a.counters().outgoing.fragments_resent >= 8);
}

#[test]
fn duplicates_on_both_transports_are_dropped() {
    let mut sim = Sim::new(&Limits::default());
    sim.handshake();
    let sent: Vec<Bytes> = (0..10).map(raiden).collect();
    for m in &sent {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    sim.poll_dc(Side::A);
    for _ in 0..10 {
        sim.deliver_dc(Side::B, 0, true);
        sim.deliver_dc(Side::B, 0, false);
    }
    assert_eq!(sim.got_b, sent);
    // B's ack is lost with the channel: A resends all of it through Matrix, twice over.
    sim.kill();
    while sim.poll_matrix(Side::A, true) {}
    sim.deliver_matrix(Side::B, true);
    sim.deliver_matrix(Side::B, false);
    assert_eq!(sim.got_b, sent, "nothing twice");
    assert_eq!(sim.b.counters().incoming.duplicates_dropped, 30);
    // The duplicates make B ack again, which releases A's buffer.
    sim.settle();
    assert_eq!(sim.got_b, sent);
    assert_eq!(sim.a.counters().replay_buffered_fragments, 0);
}

fn non_utf8(len: usize) -> Bytes {
    (0..len).map(|i| u8::try_from((i * 7 + 0x80) % 256).expect("byte")).collect::<Vec<u8>>().into()
}

fn utf8_text(len: usize) -> Bytes {
    // Multi-byte characters, so 16 KiB cuts fall inside characters; and a newline.
    let mut text = String::new();
    while text.len() < len {
        text.push_str("ünïcödé → 支付\n");
    }
    Bytes::from(text)
}

#[test]
fn large_and_binary_messages_are_reassembled_over_both_transports() {
    let messages = [utf8_text(100 * 1024), non_utf8(100 * 1024), msg(r#"{"type":"Delivered"}"#)];
    // Over the data channel.
    let mut sim = Sim::new(&Limits::default());
    sim.handshake();
    for m in &messages {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    sim.poll_dc(Side::A);
    assert!(sim.dc_to_b.iter().all(|f| f.len() <= FRAGMENT_SIZE + 10), "frames at most 16 KiB of payload");
    // An unordered channel: deliver the frames back to front.
    while !sim.dc_to_b.is_empty() {
        let last = sim.dc_to_b.len() - 1;
        sim.deliver_dc(Side::B, last, false);
    }
    assert_eq!(sim.got_b, messages);

    // Over Matrix.
    let mut sim = Sim::new(&Limits::default());
    for m in &messages {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    while sim.poll_matrix(Side::A, true) {}
    for send in &sim.mx_to_b {
        let body = send.content["body"].as_str().expect("body");
        assert!(serde_json::to_string(body).expect("json").len() <= 48 * 1024 + 2, "batch body bounded");
        let field = &send.content[STREAM_FIELD];
        let lines: Vec<&str> = body.split('\n').collect();
        let b64: Vec<u64> =
            field["b64"].as_array().map_or(Vec::new(), |a| a.iter().filter_map(Value::as_u64).collect());
        for (i, line) in lines.iter().enumerate() {
            // The UTF-8 text is cut at character boundaries; only its newlines force base64.
            if !b64.contains(&(i as u64)) {
                assert!(!line.contains('\n'));
            }
        }
    }
    sim.settle();
    assert_eq!(sim.got_b, messages);
}

#[test]
fn push_is_refused_while_the_buffer_is_full_and_taken_after_an_ack() {
    let limits = Limits { replay_buffer_bytes: 64 * 1024, ..Limits::default() };
    let mut sim = Sim::new(&limits);
    sim.handshake();
    let big = non_utf8(20 * 1024);
    for _ in 0..3 {
        sim.a.push(sim.now, big.clone()).expect("room");
    }
    assert!(!sim.a.has_room(big.len()));
    assert!(matches!(sim.a.push(sim.now, big.clone()), Err(PushError::Full { .. })));
    assert!(matches!(sim.a.push(sim.now, non_utf8(65 * 1024)), Err(PushError::TooLarge { .. })));
    sim.poll_dc(Side::A);
    while !sim.dc_to_b.is_empty() {
        sim.deliver_dc(Side::B, 0, false);
    }
    assert!(!sim.a.has_room(big.len()), "sent is not acked");
    // B acks once a few fragments are delivered (or after 20 ms).
    sim.step(Duration::from_millis(20));
    sim.poll_dc(Side::B);
    while !sim.dc_to_a.is_empty() {
        sim.deliver_dc(Side::A, 0, false);
    }
    assert!(sim.a.has_room(big.len()));
    sim.a.push(sim.now, big.clone()).expect("room after the ack");
    sim.settle();
    assert_eq!(sim.got_b, vec![big; 4]);
}

#[test]
fn plain_raiden_peer_reads_our_messages_and_we_read_its_messages() {
    let mut me = Peer::new(stream(7), Limits::default());
    let now = Instant::now();
    let sent: Vec<Bytes> = (0..60).map(raiden).collect();
    for m in &sent {
        me.push(now, m.clone()).expect("room");
    }
    // What a Raiden 3.x node gets: m.text, one message per line, as is.
    let mut lines = Vec::new();
    while let Some(send) = me.poll_matrix(now) {
        assert_eq!(send.event_type, "m.room.message");
        assert_eq!(send.content["msgtype"], "m.text");
        let (first, n) = send.lines.expect("a batch");
        assert!(n <= 50);
        assert_eq!(send.txn_id, format!("sb.0000000000000007.{first}.{n}"));
        lines.extend(send.content["body"].as_str().expect("body").split('\n').map(msg));
        me.on_homeserver_accepted(first, n);
    }
    assert_eq!(lines, sent);
    assert_eq!(me.poll_timeout(now), None, "no resend timer for a peer that never acks");
    // It never acks: what the homeserver took makes room for more (2 MiB through a 1 MiB buffer).
    let big = non_utf8(100 * 1024);
    for _ in 0..20 {
        assert!(me.has_room(big.len()));
        me.push(now, big.clone()).expect("room made by the homeserver's acceptance");
        while let Some(send) = me.poll_matrix(now) {
            let (first, n) = send.lines.expect("a batch");
            me.on_homeserver_accepted(first, n);
        }
    }
    assert!(me.counters().outgoing.released_unacked > 0);
    assert!(me.counters().replay_buffered_bytes <= 1024 * 1024);

    // What we get from it: its lines, one by one; its signalling (m.notice) is not for us.
    let content =
        json!({"msgtype": "m.text", "body": "{\"type\":\"Processed\"}\n\n{\"type\":\"Delivered\"}"});
    let got = me.receive_matrix(now, &content).expect("valid");
    assert_eq!(got, vec![msg(r#"{"type":"Processed"}"#), msg(r#"{"type":"Delivered"}"#)]);
    let notice = json!({"msgtype": "m.notice", "body": "{\"type\":\"offer\"}"});
    assert_eq!(me.receive_matrix(now, &notice), Err(ContentError::NotText));
    assert!(!me.outgoing().peer_speaks_protocol());
    assert_eq!(me.poll_matrix(now), None, "no acks for a plain peer");
}

#[test]
fn receiver_without_state_starts_at_base() {
    let mut sim = Sim::new(&Limits::default());
    let sent: Vec<Bytes> = (0..10).map(raiden).collect();
    for m in &sent[..5] {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    sim.settle();
    assert_eq!(sim.got_b, sent[..5]);
    // B restarts without a store; A keeps its stream.
    sim.b = Peer::new(stream(0xb2), Limits::default());
    sim.got_b.clear();
    for m in &sent[5..] {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    assert!(sim.poll_matrix(Side::A, true));
    assert_eq!(sim.mx_to_b[0].content[STREAM_FIELD]["base"], json!(6));
    sim.settle();
    assert_eq!(sim.got_b, sent[5..], "starts at base, nothing acked is repeated");

    // The same over a data channel: the HELLO's first unacked seq.
    sim.b = Peer::new(stream(0xb3), Limits::default());
    sim.got_b.clear();
    sim.a.push(sim.now, raiden(10)).expect("room");
    sim.handshake();
    sim.settle();
    assert_eq!(sim.got_b, vec![raiden(10)]);
}

#[test]
fn frames_joined_in_a_batch_arrive_as_if_sent_one_by_one() {
    let mut sim = Sim::new(&Limits::default());
    sim.handshake();
    let sent: Vec<Bytes> = (0..12).map(raiden).collect();
    for m in &sent {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    sim.poll_dc(Side::A);
    let frames: Vec<Bytes> = sim.dc_to_b.drain(..).collect();
    assert_eq!(frames.len(), 12);
    // Two BATCH messages as a writer joins them (each within the limit); an unknown frame type
    // inside one is skipped, the rest delivered.
    let mut first: Vec<Bytes> = frames[..5].to_vec();
    first.insert(2, Bytes::from_static(b"\x7fa future frame"));
    for batch in [join_frames(&first), join_frames(&frames[5..])] {
        assert!(batch.len() <= BATCH_LIMIT && batch[0] == BATCH);
        sim.dc_to_b.push_back(batch);
    }
    sim.deliver_dc(Side::B, 1, false);
    assert!(sim.got_b.is_empty(), "the second batch waits for the first");
    sim.deliver_dc(Side::B, 0, false);
    assert_eq!(sim.got_b, sent, "every message once, in order");

    // Malformed batches are refused whole.
    let cases: [&[u8]; 4] = [b"\x06\x00", b"\x06\x00\x05\x03\x00", b"\x06\x00\x00", b"\x06\x00\x01\x06"];
    for bytes in cases {
        assert!(split_frames(&Bytes::from_static(bytes)).is_err(), "{bytes:?}");
        let before = sim.b.counters();
        assert!(sim.b.receive_dc(sim.now, &Bytes::from_static(bytes)).is_err(), "{bytes:?}");
        assert_eq!(sim.b.counters(), before, "nothing taken from {bytes:?}");
    }
}

#[test]
fn malformed_frames_and_contents_are_typed_errors() {
    let cases: [(&[u8], FrameError); 8] = [
        (b"", FrameError::Empty),
        (b"\x09abc", FrameError::UnknownType(9)),
        (b"\x01\x00\x00\x00", FrameError::WrongLength { kind: 1, len: 4 }),
        (b"\x02\x00\x00\x00\x00\x00\x00\x00\x01\x00", FrameError::WrongLength { kind: 2, len: 10 }),
        (b"\x03\x00", FrameError::WrongLength { kind: 3, len: 2 }),
        (b"\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00", FrameError::ZeroSeq),
        (b"\x05zzzzzzzzzzzzzzzz\x00\x00\x00\x00\x00\x00\x00\x010000000000000000\x00\x00\x00\x00\x00\x00\x00\x00",
            FrameError::StreamId(InvalidStreamId)),
        (b"\x05", FrameError::WrongLength { kind: 5, len: 1 }),
    ];
    for (bytes, error) in cases {
        assert_eq!(Frame::decode(&Bytes::from_static(bytes)), Err(error), "{bytes:?}");
    }
    let mut big = vec![1u8, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    big.resize(10 + FRAGMENT_SIZE + 1, b'x');
    assert_eq!(Frame::decode(&Bytes::from(big)), Err(FrameError::PayloadTooLarge(FRAGMENT_SIZE + 1)));

    let id = "00000000000000a1";
    let bad_contents = [
        json!({"msgtype": "m.text"}),
        json!({"msgtype": "m.text", "body": "x", STREAM_FIELD: {"id": "xyz", "seq": 1, "base": 1}}),
        json!({"msgtype": "m.text", "body": "x", STREAM_FIELD: {"id": id, "seq": 0, "base": 0}}),
        json!({"msgtype": "m.text", "body": "x", STREAM_FIELD: {"id": id, "seq": 2, "base": 3}}),
        json!({"msgtype": "m.text", "body": "x", STREAM_FIELD: {"id": id, "seq": 1, "base": 1, "more": [1]}}),
        json!({"msgtype": "m.text", "body": "!!", STREAM_FIELD: {"id": id, "seq": 1, "base": 1, "b64": [0]}}),
        json!({"msgtype": "m.text", "body": "x", STREAM_FIELD: {"id": id, "seq": u64::MAX, "base": 1}}),
        json!({"msgtype": "m.text", "body": "x", STREAM_FIELD: "nope"}),
    ];
    let mut peer = Peer::new(stream(1), Limits::default());
    let now = Instant::now();
    for content in bad_contents {
        assert!(peer.receive_matrix(now, &content).is_err(), "{content}");
    }
    assert!(peer.receive_matrix_ack(now, &json!({"id": id})).is_err());
    assert!(peer.receive_matrix_ack(now, &json!({"id": id, "seq": -1})).is_err());
    assert_eq!(peer.counters().incoming.messages_delivered, 0);
}

#[test]
fn out_of_order_buffer_is_bounded_and_recovers_by_resend() {
    let limits = Limits { reorder_buffer_bytes: 64 * 1024, ..Limits::default() };
    let mut sim = Sim::new(&limits);
    sim.handshake();
    let sent: Vec<Bytes> = (0..40).map(|i| non_utf8(4096 + i)).collect();
    for m in &sent {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    sim.poll_dc(Side::A);
    // The first frame is held back; the others overflow B's out-of-order buffer.
    let first = sim.dc_to_b.pop_front().expect("frame");
    while !sim.dc_to_b.is_empty() {
        sim.deliver_dc(Side::B, 0, false);
        assert!(sim.b.counters().reorder_held_bytes <= 64 * 1024);
    }
    assert!(sim.b.counters().incoming.out_of_order_dropped > 0);
    sim.dc_to_b.push_back(first);
    sim.deliver_dc(Side::B, 0, false);
    assert!(sim.got_b.len() < sent.len(), "some were dropped");
    assert_eq!(sim.got_b, sent[..sim.got_b.len()], "what came is in order");
    // The resend timer brings the rest.
    sim.settle();
    assert_eq!(sim.got_b, sent);
    assert!(sim.a.counters().outgoing.resend_timeouts >= 1);
}

#[test]
fn shedding_what_is_held_undelivered_loses_nothing_the_sender_still_holds() {
    let mut sim = Sim::new(&Limits::default());
    sim.handshake();
    // A large message (7 fragments) between two small ones.
    let sent = vec![raiden(0), non_utf8(100 * 1024), raiden(2)];
    for m in &sent {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    sim.poll_dc(Side::A);
    // B takes the first message, half of the large one, and the last one out of order.
    let last = sim.dc_to_b.pop_back().expect("frame");
    for _ in 0..4 {
        sim.deliver_dc(Side::B, 0, false);
    }
    sim.dc_to_b.push_front(last);
    sim.deliver_dc(Side::B, 0, false);
    assert_eq!(sim.got_b, sent[..1]);
    assert!(sim.b.retained_bytes() > 3 * FRAGMENT_SIZE, "{}", sim.b.retained_bytes());

    sim.b.shed_incoming();
    assert_eq!((sim.b.retained_bytes(), sim.b.counters().incoming.sheds), (0, 1));
    // What is still in flight arrives, then the sender's resend timer brings the rest: every
    // message once, in order, the large one intact.
    sim.settle();
    assert_eq!(sim.got_b, sent);
    assert!(sim.a.counters().outgoing.resend_timeouts >= 1);
}

#[test]
fn stored_state_continues_delivery_after_a_restart() {
    let mut sim = Sim::new(&Limits::default());
    sim.handshake();
    let sent: Vec<Bytes> = (0..30).map(raiden).collect();
    for m in &sent[..20] {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    // Part goes over the channel, nothing is acked yet; then both restart from their stores and
    // the channel is gone with what it carried.
    sim.poll_dc(Side::A);
    for _ in 0..5 {
        sim.deliver_dc(Side::B, 0, false);
    }
    assert_eq!(sim.got_b, sent[..5]);
    let a: Peer = serde_json::from_str(&serde_json::to_string(&sim.a).expect("ser")).expect("de");
    let b: Peer = serde_json::from_str(&serde_json::to_string(&sim.b).expect("ser")).expect("de");
    sim.a = a;
    sim.b = b;
    sim.dc_to_a.clear();
    sim.dc_to_b.clear();
    assert_eq!(sim.a.dc_state(sim.now), DcState::Closed);
    sim.settle();
    assert_eq!(sim.got_b, sent[..20], "what was held is sent again, through Matrix");
    for m in &sent[20..] {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    sim.settle();
    assert_eq!(sim.got_b, sent, "once each, in order, across the restart");
    assert_eq!(sim.b.counters().incoming.duplicates_dropped, 5);
}

#[test]
fn unanswered_ping_stalls_then_kills_the_channel() {
    let mut sim = Sim::new(&Limits::default());
    sim.handshake();
    sim.a.push(sim.now, raiden(1)).expect("room");
    sim.step(Duration::from_secs(5));
    sim.poll_dc(Side::A);
    assert_eq!(sim.a.dc_state(sim.now), DcState::Alive);
    // The PING (and DATA) vanish: the channel is dead but nobody said so.
    sim.dc_to_b.clear();
    sim.step(Duration::from_secs(2));
    assert_eq!(sim.a.dc_state(sim.now), DcState::Stalled);
    // Meanwhile A sends through Matrix; B gets the message there.
    while sim.poll_matrix(Side::A, true) {}
    sim.deliver_matrix(Side::B, false);
    assert_eq!(sim.got_b, vec![raiden(1)]);
    sim.step(Duration::from_secs(13));
    assert_eq!(sim.a.dc_state(sim.now), DcState::Dead);
    assert_eq!(sim.a.poll_timeout(sim.now).filter(|&t| t <= sim.now), None, "no busy loop");
}

/// One step of the random schedule.
#[derive(Debug, Clone)]
enum Op {
    Push(bool, usize),
    Open,
    /// Both sides write and read everything on the channel (HELLO, PING, PONG, DATA) a few times.
    Flush,
    Kill,
    /// Both restart from their stores (the channel dies with them).
    Restore,
    PollDc(bool),
    DeliverDc(bool, usize, bool),
    PollMatrix(bool, bool),
    DeliverMatrix(bool, bool),
    Step(u64),
}

fn side(a: bool) -> Side {
    if a { Side::A } else { Side::B }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), 0usize..6).prop_map(|(a, kind)| Op::Push(a, kind)),
        2 => Just(Op::Open),
        2 => Just(Op::Flush),
        1 => Just(Op::Kill),
        1 => Just(Op::Restore),
        3 => any::<bool>().prop_map(Op::PollDc),
        6 => (any::<bool>(), any::<usize>(), proptest::bool::weighted(0.2)).prop_map(|(a, i, d)| Op::DeliverDc(a, i, d)),
        3 => (any::<bool>(), proptest::bool::weighted(0.8)).prop_map(|(a, ok)| Op::PollMatrix(a, ok)),
        4 => (any::<bool>(), proptest::bool::weighted(0.2)).prop_map(|(a, d)| Op::DeliverMatrix(a, d)),
        2 => (0u64..600).prop_map(Op::Step),
        1 => (0u64..20_000).prop_map(Op::Step),
    ]
}

/// The `n`-th message from `a`: sizes from a few bytes to over two fragments, text and binary.
fn generated(from_a: bool, n: usize, kind: usize) -> Bytes {
    let tag = format!("{}{n}:", if from_a { 'a' } else { 'b' });
    let mut bytes = tag.into_bytes();
    match kind {
        0 | 1 => bytes.extend_from_slice(br#"{"type":"LockedTransfer"}"#),
        2 => bytes.extend(non_utf8(3000)),
        3 => bytes.extend_from_slice(&utf8_text(FRAGMENT_SIZE * 2 + 100)),
        4 => bytes.push(b'\n'),
        _ => {}
    }
    Bytes::from(bytes)
}

fn run(ops: &[Op], small: bool) -> Result<(), TestCaseError> {
    let limits = if small {
        Limits {
            reorder_buffer_bytes: 40 * 1024,
            replay_buffer_bytes: 128 * 1024,
            batch_lines: 3,
            ..Limits::default()
        }
    } else {
        Limits::default()
    };
    let mut sim = Sim::new(&limits);
    let mut sent_a = Vec::new();
    let mut sent_b = Vec::new();
    let mut open = false;
    for op in ops {
        match *op {
            Op::Push(a, kind) => {
                let sent = if a { &mut sent_a } else { &mut sent_b };
                let m = generated(a, sent.len(), kind);
                let now = sim.now;
                if sim.peer(side(a)).push(now, m.clone()).is_ok() {
                    sent.push(m);
                }
            }
            // A client handles the to-device messages of its first sync before it opens a data
            // channel (docs/protocol.md): here, before a stream is known, its inbox is empty.
            Op::Open => {
                let a_knows = sim.a.incoming().delivered(sim.b.outgoing().stream()).is_some();
                let b_knows = sim.b.incoming().delivered(sim.a.outgoing().stream()).is_some();
                if !open && (a_knows || sim.mx_to_a.is_empty()) && (b_knows || sim.mx_to_b.is_empty()) {
                    sim.open();
                    open = true;
                }
            }
            Op::Flush => {
                for _ in 0..3 {
                    if open {
                        sim.poll_dc(Side::A);
                        sim.poll_dc(Side::B);
                    }
                    while !sim.dc_to_a.is_empty() || !sim.dc_to_b.is_empty() {
                        sim.deliver_dc(Side::A, 0, false);
                        sim.deliver_dc(Side::B, 0, false);
                    }
                }
            }
            Op::Kill => {
                sim.kill();
                open = false;
            }
            Op::Restore => {
                sim.kill();
                open = false;
                let a = serde_json::to_string(&sim.a).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let b = serde_json::to_string(&sim.b).map_err(|e| TestCaseError::fail(e.to_string()))?;
                sim.a = serde_json::from_str(&a).map_err(|e| TestCaseError::fail(e.to_string()))?;
                sim.b = serde_json::from_str(&b).map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            Op::PollDc(a) => {
                if open {
                    sim.poll_dc(side(a));
                }
            }
            Op::DeliverDc(a, i, dup) => sim.deliver_dc(side(a), i, dup),
            Op::PollMatrix(a, ok) => {
                sim.poll_matrix(side(a), ok);
            }
            Op::DeliverMatrix(a, dup) => sim.deliver_matrix(side(a), dup),
            Op::Step(ms) => sim.step(Duration::from_millis(ms)),
        }
        prop_assert!(sent_b.starts_with(&sim.got_a), "a got {:?}", sim.got_a);
        prop_assert!(sent_a.starts_with(&sim.got_b), "b got {:?}", sim.got_b);
    }
    sim.settle();
    prop_assert_eq!(&sim.got_b, &sent_a);
    prop_assert_eq!(&sim.got_a, &sent_b);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random interleavings of both transports in both directions, an unordered channel that
    /// duplicates and dies with frames in flight, failed and duplicated to-device sends, restarts
    /// from stored state, time passing: every message arrives exactly once and in order.
    #[test]
    fn every_message_arrives_once_in_order(ops in proptest::collection::vec(op(), 1..200), small in any::<bool>()) {
        run(&ops, small)?;
    }

    /// Decoding arbitrary bytes and contents never panics.
    #[test]
    fn decoding_arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), body in ".{0,40}", seq in any::<u64>(), base in any::<u64>(), idx in proptest::collection::vec(any::<usize>(), 0..3)) {
        let _ = Frame::decode(&Bytes::from(bytes));
        let content = json!({"msgtype": "m.text", "body": body, STREAM_FIELD: {"id": "00000000000000a1", "seq": seq, "base": base, "more": idx.clone(), "b64": idx}});
        let _ = decode_content(&content);
    }
}

#[test]
fn frames_round_trip() {
    let frames = [
        Frame::Data { more: true, seq: 7, payload: msg("x") },
        Frame::Ack { seq: u64::MAX },
        Frame::Ping { nonce: 1 },
        Frame::Pong { nonce: 2 },
        Frame::Hello(Hello { stream: stream(0xab), first_unacked: 3, peer_stream: None, delivered: 0 }),
        Frame::Hello(Hello {
            stream: stream(0xab),
            first_unacked: 3,
            peer_stream: Some(stream(5)),
            delivered: 9,
        }),
    ];
    for frame in frames {
        assert_eq!(Frame::decode(&frame.encode()), Ok(frame));
    }
    let hello =
        Frame::Hello(Hello { stream: stream(0xab), first_unacked: 1, peer_stream: None, delivered: 0 })
            .encode();
    assert_eq!(&hello[..17], b"\x0500000000000000ab");
    assert_eq!(&hello[25..41], b"0000000000000000");
}

#[test]
fn hello_before_to_device_backlog_loses_nothing() {
    // A writes to B before B ever answered; the homeserver takes it; a data channel opens and its
    // HELLOs arrive before B's /sync hands over the to-device message.
    let mut sim = Sim::new(&Limits::default());
    let sent: Vec<Bytes> = (0..3).map(raiden).collect();
    for m in &sent {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    assert!(sim.poll_matrix(Side::A, true));
    sim.handshake();
    assert_eq!(sim.got_b, sent, "A still held them: replayed on the channel");
    sim.deliver_matrix(Side::B, false);
    sim.settle();
    assert_eq!(sim.got_b, sent, "the late to-device copy is a duplicate");
}

#[test]
fn receiver_restored_from_an_old_state_catches_up_on_hello() {
    let mut sim = Sim::new(&Limits::default());
    let sent: Vec<Bytes> = (0..11).map(raiden).collect();
    for m in &sent[..5] {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    sim.settle();
    let old_b = serde_json::to_string(&sim.b).expect("ser");
    for m in &sent[5..10] {
        sim.a.push(sim.now, m.clone()).expect("room");
    }
    sim.settle();
    assert_eq!(sim.got_b, sent[..10]);
    // B restarts from the state saved after the first five (all ten were acked since).
    sim.b = serde_json::from_str(&old_b).expect("de");
    sim.got_b.clear();
    sim.a.push(sim.now, sent[10].clone()).expect("room");
    sim.handshake();
    sim.settle();
    assert_eq!(sim.got_b, sent[10..], "no wait for what A released long ago, nothing twice");
}
