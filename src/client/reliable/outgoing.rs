//! The sending half for one peer: numbering, fragmentation, the replay buffer and what is pending
//! on which transport.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::codec::{self, Ack, Batch, EVENT_MESSAGE, FRAGMENT_SIZE, Frame, Hello, Line, StreamId};
use super::{Limits, ToDevice};

/// Why [`Outgoing::push`] did not take a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The replay buffer has no room for it now: wait until acks (or the homeserver, for a plain
    /// Raiden peer) release some (backpressure); [`Outgoing::has_room`] tells when.
    #[error("replay buffer full ({buffered} of {limit} bytes, message of {len})")]
    Full { buffered: usize, limit: usize, len: usize },
    /// Larger than the whole replay buffer: it can never be sent.
    #[error("message of {len} bytes is larger than the replay buffer ({limit} bytes)")]
    TooLarge { len: usize, limit: usize },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Fragment {
    more: bool,
    #[serde(with = "super::serde_b64")]
    payload: Bytes,
    /// Handed out for sending at least once (so a later send is a resend).
    #[serde(default)]
    sent: bool,
    /// The homeserver accepted a to-device send of it: it will reach the peer's devices.
    #[serde(default)]
    accepted: bool,
}

/// Counters of the sending half.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingCounters {
    pub messages_pushed: u64,
    pub fragments_sent: u64,
    /// Fragments sent again (channel lost, peer's HELLO, resend timer).
    pub fragments_resent: u64,
    /// Times the resend timer fired.
    pub resend_timeouts: u64,
    /// Fragments released without an ack (peer never showed it speaks the protocol; the
    /// homeserver had accepted them), to make room.
    pub released_unacked: u64,
}

/// The sender's state for one peer: one stream, seqs 1, 2, 3… per fragment.
///
/// Invariants: `buffer` holds every fragment not yet released, and its lowest seq (the *base*) is
/// always the first fragment of a message (releases stop at message ends); `pending` ⊆ keys of
/// `buffer` is what the next drain hands out, lowest seq first.
///
/// Restored from a store, every held fragment the homeserver has not accepted is pending again
/// (what was in flight on a channel when the state was saved may be lost).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub struct Outgoing {
    stream: StreamId,
    next_seq: u64,
    buffer: BTreeMap<u64, Fragment>,
    #[serde(skip)]
    buffered_bytes: usize,
    #[serde(skip)]
    pending: BTreeSet<u64>,
    /// Highest cumulative ack received.
    acked: u64,
    /// The peer showed it speaks this protocol (HELLO, ack or stream field): only acks release.
    peer_speaks: bool,
    /// Resend rounds so far: part of the txn id of a resent batch, so the homeserver does not
    /// take it for a retry of the first send.
    round: u32,
    /// The lowest seq released without an ack and not acked since (fragments the homeserver took
    /// that may still be in the peer's to-device inbox): a HELLO names it, not the base, so that
    /// the peer does not skip them (docs/protocol.md, HELLO).
    #[serde(default)]
    released_unacked_from: Option<u64>,
    /// The highest seq released without an ack (meaningful with `released_unacked_from`).
    #[serde(default)]
    released_unacked_upto: u64,
    limits: Limits,
    counters: OutgoingCounters,
    /// Start of the current wait for an ack (transient).
    #[serde(skip)]
    timer: Option<Instant>,
    /// Current resend timeout (transient; `None` = `limits.resend_timeout`).
    #[serde(skip)]
    rto: Option<Duration>,
}

/// The stored form of [`Outgoing`] (its serialised fields).
#[derive(Deserialize)]
struct Stored {
    stream: StreamId,
    next_seq: u64,
    buffer: BTreeMap<u64, Fragment>,
    acked: u64,
    peer_speaks: bool,
    round: u32,
    #[serde(default)]
    released_unacked_from: Option<u64>,
    #[serde(default)]
    released_unacked_upto: u64,
    limits: Limits,
    counters: OutgoingCounters,
}

impl From<Stored> for Outgoing {
    fn from(s: Stored) -> Self {
        let pending = s.buffer.iter().filter(|(_, f)| !f.accepted).map(|(&seq, _)| seq).collect();
        Self {
            stream: s.stream,
            next_seq: s.next_seq,
            buffered_bytes: s.buffer.values().map(|f| f.payload.len()).sum(),
            buffer: s.buffer,
            pending,
            acked: s.acked,
            peer_speaks: s.peer_speaks,
            round: s.round,
            released_unacked_from: s.released_unacked_from,
            released_unacked_upto: s.released_unacked_upto,
            limits: s.limits,
            counters: s.counters,
            timer: None,
            rto: None,
        }
    }
}

impl Outgoing {
    /// A new stream `stream` (random, from [`StreamId::generate`]), starting at seq 1.
    pub fn new(stream: StreamId, limits: Limits) -> Self {
        Self {
            stream,
            next_seq: 1,
            buffer: BTreeMap::new(),
            buffered_bytes: 0,
            pending: BTreeSet::new(),
            acked: 0,
            peer_speaks: false,
            round: 0,
            released_unacked_from: None,
            released_unacked_upto: 0,
            limits,
            counters: OutgoingCounters::default(),
            timer: None,
            rto: None,
        }
    }

    pub fn stream(&self) -> StreamId {
        self.stream
    }

    /// The lowest seq still held (what HELLO's first-unacked and a batch's `base` say).
    pub fn base(&self) -> u64 {
        self.buffer.keys().next().copied().unwrap_or(self.next_seq)
    }

    /// What a HELLO says is the first unacked seq: the base, or lower when fragments below it were
    /// released without an ack (they went through Matrix and may not have reached the peer yet).
    pub fn hello_first_unacked(&self) -> u64 {
        self.released_unacked_from.map_or(self.base(), |from| from.min(self.base()))
    }

    /// The seq the next fragment will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Payload bytes held in the replay buffer.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// Fragments held in the replay buffer (sent or not, not yet released).
    pub fn buffered_fragments(&self) -> usize {
        self.buffer.len()
    }

    /// Fragments waiting to be handed to a transport.
    pub fn pending_fragments(&self) -> usize {
        self.pending.len()
    }

    /// Whether anything waits to be handed to a transport.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether the peer has shown it speaks this protocol.
    pub fn peer_speaks_protocol(&self) -> bool {
        self.peer_speaks
    }

    /// Whether a message of `len` bytes would be taken by [`Outgoing::push`] now.
    pub fn has_room(&self, len: usize) -> bool {
        let releasable = if self.fits(len) { 0 } else { self.releasable().map_or(0, |(_, bytes)| bytes) };
        self.buffered_bytes - releasable + len <= self.limits.replay_buffer_bytes
    }

    fn fits(&self, len: usize) -> bool {
        self.buffered_bytes + len <= self.limits.replay_buffer_bytes
    }

    pub fn counters(&self) -> OutgoingCounters {
        self.counters
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Replaces the limits (e.g. after restoring a stored state).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Queues `message`, split into fragments of at most 16 KiB (at character boundaries when it is
    /// UTF-8, so each line of a Matrix batch stays text).
    pub fn push(&mut self, now: Instant, message: Bytes) -> Result<(), PushError> {
        let len = message.len();
        let limit = self.limits.replay_buffer_bytes;
        if len > limit {
            return Err(PushError::TooLarge { len, limit });
        }
        if !self.fits(len) {
            // A peer that never acks: what the homeserver took makes room, oldest first.
            if let Some((upto, _)) = self.releasable() {
                let released = self.buffer.range(..=upto).count();
                self.counters.released_unacked += released as u64;
                self.released_unacked_from = self.released_unacked_from.or(Some(self.base()));
                self.released_unacked_upto = self.released_unacked_upto.max(upto);
                self.release(now, upto);
            }
            if !self.fits(len) {
                return Err(PushError::Full { buffered: self.buffered_bytes, limit, len });
            }
        }
        self.buffered_bytes += len;
        if len <= FRAGMENT_SIZE {
            self.insert(false, message);
        } else {
            let text = std::str::from_utf8(&message).ok();
            let mut start = 0;
            while start < len {
                let mut end = (start + FRAGMENT_SIZE).min(len);
                if let Some(text) = text {
                    while end > start + 1 && !text.is_char_boundary(end) {
                        end -= 1;
                    }
                }
                self.insert(end < len, message.slice(start..end));
                start = end;
            }
        }
        self.counters.messages_pushed += 1;
        Ok(())
    }

    fn insert(&mut self, more: bool, payload: Bytes) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.buffer.insert(seq, Fragment { more, payload, sent: false, accepted: false });
        self.pending.insert(seq);
    }

    fn hand_out(&mut self, now: Instant, seq: u64) -> Option<&Fragment> {
        self.pending.remove(&seq);
        let fragment = self.buffer.get_mut(&seq)?;
        self.counters.fragments_sent += 1;
        if fragment.sent {
            self.counters.fragments_resent += 1;
        }
        fragment.sent = true;
        if self.timer.is_none() {
            self.timer = Some(now);
        }
        Some(fragment)
    }

    /// DATA frames of the pending fragments, lowest seq first, until their total size would pass
    /// `max_bytes` (the first one always, so a frame larger than the room still goes).
    pub fn take_dc_frames(&mut self, now: Instant, max_bytes: usize) -> Vec<Bytes> {
        let mut frames = Vec::new();
        let mut total = 0;
        while let Some(&seq) = self.pending.first() {
            let Some(fragment) = self.buffer.get(&seq) else {
                self.pending.remove(&seq);
                continue;
            };
            let size = fragment.payload.len() + 10;
            if !frames.is_empty() && total + size > max_bytes {
                break;
            }
            let Some(fragment) = self.hand_out(now, seq) else { continue };
            let frame = Frame::Data { more: fragment.more, seq, payload: fragment.payload.clone() };
            frames.push(frame.encode());
            total += size;
        }
        frames
    }

    /// The next Matrix batch: consecutive pending fragments from the lowest, at most
    /// `limits.batch_lines` lines and `limits.batch_body_bytes` of (JSON-escaped) body, with `ack`
    /// piggybacked. Its txn id is `sb.<stream>.<first seq>.<lines>` (`.<round>` appended for
    /// rounds of the resend timer). Send it to the peer's devices `*`, retrying with the same txn id,
    /// then call [`Outgoing::on_homeserver_accepted`] (or [`Outgoing::on_matrix_failed`]).
    pub fn take_matrix_batch(&mut self, now: Instant, ack: Option<Ack>) -> Option<ToDevice> {
        // `pending` only ever holds buffered seqs; skip any that is not, defensively.
        while let Some(&first) = self.pending.first() {
            if self.buffer.contains_key(&first) {
                break;
            }
            self.pending.remove(&first);
        }
        let first = *self.pending.first()?;
        let mut lines = Vec::new();
        let mut body = 0;
        let mut seq = first;
        while (lines.is_empty() || lines.len() < self.limits.batch_lines) && self.pending.contains(&seq) {
            let Some(fragment) = self.buffer.get(&seq) else { break };
            let (_, _, size) = codec::line_text(&fragment.payload);
            let size = size + usize::from(!lines.is_empty()) * 2;
            if !lines.is_empty() && body + size > self.limits.batch_body_bytes {
                break;
            }
            body += size;
            lines.push(Line { more: fragment.more, payload: fragment.payload.clone() });
            seq += 1;
        }
        for s in first..seq {
            self.hand_out(now, s);
        }
        let count = lines.len();
        let batch = Batch { stream: self.stream, seq: first, base: self.base(), lines, ack };
        let mut txn_id = format!("sb.{}.{first}.{count}", self.stream);
        if self.round > 0 {
            let _ = write!(txn_id, ".{}", self.round);
        }
        Some(ToDevice {
            event_type: EVENT_MESSAGE,
            txn_id,
            content: codec::encode_batch(&batch),
            lines: Some((first, count)),
            ack,
        })
    }

    /// The homeserver accepted the send of `count` lines from `first_seq`: they will reach the
    /// peer's devices. For a peer not known to speak this protocol (it never acks) such fragments
    /// may be released when [`Outgoing::push`] needs room.
    pub fn on_homeserver_accepted(&mut self, first_seq: u64, count: usize) {
        let end = first_seq.saturating_add(count as u64);
        for (_, fragment) in self.buffer.range_mut(first_seq..end) {
            fragment.accepted = true;
        }
    }

    /// The end of the accepted prefix that may be released without an ack (stopping at a message
    /// end), and its payload bytes: only while the peer has not shown it speaks this protocol.
    fn releasable(&self) -> Option<(u64, usize)> {
        if self.peer_speaks {
            return None;
        }
        let mut upto = None;
        let mut bytes = 0;
        for (&seq, fragment) in &self.buffer {
            if !fragment.accepted {
                break;
            }
            bytes += fragment.payload.len();
            if !fragment.more {
                upto = Some((seq, bytes));
            }
        }
        upto
    }

    /// A send of `count` lines from `first_seq` was given up: they are pending again.
    pub fn on_matrix_failed(&mut self, first_seq: u64, count: usize) {
        let end = first_seq.saturating_add(count as u64);
        let seqs: Vec<u64> = self.buffer.range(first_seq..end).map(|(&s, _)| s).collect();
        self.pending.extend(seqs);
    }

    /// An ack from the peer. Acks of other streams (an earlier run of ours) are ignored. Returns
    /// whether it released anything.
    pub fn on_ack(&mut self, now: Instant, ack: Ack) -> bool {
        self.peer_speaks = true;
        if ack.stream != self.stream || ack.seq <= self.acked {
            return false;
        }
        self.acked = ack.seq.min(self.next_seq - 1);
        if self.released_unacked_from.is_some() && self.released_unacked_upto <= self.acked {
            // The peer has them all (an ack covers a whole prefix of the stream).
            self.released_unacked_from = None;
        }
        self.release(now, self.acked)
    }

    /// Releases every fragment ≤ `upto` that belongs to a message ending ≤ `upto`.
    fn release(&mut self, now: Instant, upto: u64) -> bool {
        let Some(end) = self.buffer.range(..=upto).rev().find(|(_, f)| !f.more).map(|(&s, _)| s) else {
            return false;
        };
        let kept = self.buffer.split_off(&(end + 1));
        let released = std::mem::replace(&mut self.buffer, kept);
        if released.is_empty() {
            return false;
        }
        for (seq, fragment) in released {
            self.buffered_bytes -= fragment.payload.len();
            self.pending.remove(&seq);
        }
        self.rto = None;
        self.timer = if self.buffer.values().any(|f| f.sent) { Some(now) } else { None };
        true
    }

    /// The peer shows it speaks this protocol (a stream field from it).
    pub fn on_peer_speaks(&mut self) {
        self.peer_speaks = true;
    }

    /// The peer's HELLO on a new data channel: what it delivered of this stream is released, and
    /// every other held fragment is pending again (to be sent over the channel).
    pub fn on_peer_hello(&mut self, now: Instant, hello: &Hello) {
        self.peer_speaks = true;
        if hello.peer_stream == Some(self.stream) {
            self.on_ack(now, Ack { stream: self.stream, seq: hello.delivered });
        }
        self.pending = self.buffer.keys().copied().collect();
    }

    /// The data channel died: what the homeserver has not accepted is pending again, so the next
    /// Matrix batches resend it, lowest seq first, before anything newer.
    pub fn on_channel_lost(&mut self) {
        let seqs: Vec<u64> = self.buffer.iter().filter(|(_, f)| !f.accepted).map(|(&s, _)| s).collect();
        self.pending.extend(seqs);
    }

    /// When the resend timer fires, if it runs: the peer speaks this protocol and fragments were
    /// sent without an ack for the resend timeout (doubling up to `max_resend_timeout` while
    /// nothing is acked). `now` when the timer is to be started (after a restore: sent fragments
    /// held, no timer yet), so that [`Outgoing::handle_timeout`] starts it.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        if !self.peer_speaks {
            return None;
        }
        match self.timer {
            Some(start) => Some(start + self.rto.unwrap_or(self.limits.resend_timeout)),
            None => self.buffer.values().any(|f| f.sent).then_some(now),
        }
    }

    /// Fires the resend timer if it is due: every held fragment is pending again (sent on the
    /// channel if alive, else over Matrix in a new round).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.buffer.is_empty() {
            self.timer = None;
            return;
        }
        if !self.peer_speaks {
            return;
        }
        let Some(start) = self.timer else {
            if self.buffer.values().any(|f| f.sent) {
                self.timer = Some(now);
            }
            return;
        };
        let rto = self.rto.unwrap_or(self.limits.resend_timeout);
        if now < start + rto {
            return;
        }
        self.counters.resend_timeouts += 1;
        self.round += 1;
        self.pending = self.buffer.keys().copied().collect();
        self.rto = Some((rto * 2).min(self.limits.max_resend_timeout));
        self.timer = Some(now);
    }
}
