//! The receiving half for one peer: per stream the next expected seq, de-duplication, a bounded
//! out-of-order buffer, reassembly of fragments and delayed cumulative acks.

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::codec::{Ack, Batch, Content, Hello, Line, StreamId};
use super::{Limits, Transport};

/// Bytes counted for a held fragment beside its payload, so empty fragments are bounded too.
const HELD_OVERHEAD: usize = 64;

/// Counters of the receiving half.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingCounters {
    /// Messages handed to the application (numbered and plain).
    pub messages_delivered: u64,
    /// Fragments received again (either transport) and dropped.
    pub duplicates_dropped: u64,
    /// Fragments dropped because the out-of-order buffer was full (the sender resends them).
    pub out_of_order_dropped: u64,
    /// Messages dropped because they reassembled past `max_message_bytes`.
    pub oversized_dropped: u64,
    /// Streams forgotten because the peer had more than `streams_per_peer`.
    pub streams_forgotten: u64,
    /// Times everything undelivered was let go of ([`Incoming::shed`]: the client's memory
    /// budget across peers was exceeded).
    #[serde(default)]
    pub sheds: u64,
}

/// One stream as received so far. All of it is kept in a stored state, the out-of-order buffer
/// and a half-reassembled message included: the sender may have released those fragments unacked
/// (a peer it did not know to speak the protocol), so they may never come again.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InStream {
    id: StreamId,
    /// The next seq to consume.
    next: u64,
    /// Last seq of the last whole message handed to the application (what acks say).
    delivered: u64,
    /// What the last ack sent said.
    acked_sent: u64,
    /// A duplicate arrived: the sender may have missed our ack, send it again.
    #[serde(default)]
    ack_forced: bool,
    /// Since when an ack is owed (transient: after a restore an owed ack is due at once).
    #[serde(skip)]
    ack_since: Option<Instant>,
    #[serde(default)]
    reorder: BTreeMap<u64, Line>,
    #[serde(default, with = "super::serde_b64_vec")]
    partial: Vec<u8>,
    /// Skipping the rest of a message that grew past `max_message_bytes`.
    #[serde(default)]
    discarding: bool,
}

impl InStream {
    fn new(id: StreamId, start: u64) -> Self {
        let start = start.max(1);
        Self {
            id,
            next: start,
            delivered: start - 1,
            acked_sent: start - 1,
            ack_forced: false,
            ack_since: None,
            reorder: BTreeMap::new(),
            partial: Vec::new(),
            discarding: false,
        }
    }

    fn ack_pending(&self) -> bool {
        self.delivered > 0 && (self.delivered > self.acked_sent || self.ack_forced)
    }

    fn owe_ack(&mut self, now: Instant) {
        self.ack_since.get_or_insert(now);
    }
}

/// The receiver's state for one peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub struct Incoming {
    /// Oldest first; at most `limits.streams_per_peer`.
    streams: Vec<InStream>,
    /// The peer's stream on the current data channel (from its HELLO).
    #[serde(skip)]
    dc_stream: Option<StreamId>,
    /// DATA that arrived on the channel before its HELLO (the channel may be unordered).
    #[serde(skip)]
    early: Vec<(u64, Line)>,
    /// Payload (+ overhead) held out of order and early.
    #[serde(skip)]
    held_bytes: usize,
    limits: Limits,
    counters: IncomingCounters,
}

/// The stored form of [`Incoming`] (its serialised fields).
#[derive(Deserialize)]
struct Stored {
    streams: Vec<InStream>,
    limits: Limits,
    counters: IncomingCounters,
}

impl From<Stored> for Incoming {
    fn from(s: Stored) -> Self {
        let held_bytes = s.streams.iter().flat_map(|st| st.reorder.values()).map(held_cost).sum();
        Self {
            streams: s.streams,
            dc_stream: None,
            early: Vec::new(),
            held_bytes,
            limits: s.limits,
            counters: s.counters,
        }
    }
}

impl Incoming {
    pub fn new(limits: Limits) -> Self {
        Self {
            streams: Vec::new(),
            dc_stream: None,
            early: Vec::new(),
            held_bytes: 0,
            limits,
            counters: IncomingCounters::default(),
        }
    }

    pub fn counters(&self) -> IncomingCounters {
        self.counters
    }

    /// Bytes held in the out-of-order buffer (payload plus 64 per fragment).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Bytes this half holds for the peer: the out-of-order buffer and the messages being
    /// reassembled.
    pub fn retained_bytes(&self) -> usize {
        self.held_bytes + self.streams.iter().map(|s| s.partial.len()).sum::<usize>()
    }

    /// Lets go of everything not yet delivered: each stream goes back to the first fragment after
    /// its last delivered message, dropping its out-of-order buffer and the message being
    /// reassembled (and DATA held before a HELLO). Nothing is acked that was not delivered, so a
    /// sender that speaks the protocol sends it all again (its resend timer); fragments it released
    /// unacked (towards a peer it did not know to speak the protocol) are lost. For a client over
    /// its memory budget across peers.
    pub fn shed(&mut self) {
        for stream in &mut self.streams {
            stream.reorder.clear();
            stream.partial = Vec::new();
            stream.discarding = false;
            stream.next = stream.delivered + 1;
        }
        self.early.clear();
        self.held_bytes = 0;
        self.counters.sheds += 1;
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Replaces the limits (e.g. after restoring a stored state).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The last seq delivered of `stream`, if it is known.
    pub fn delivered(&self, stream: StreamId) -> Option<u64> {
        self.streams.iter().find(|s| s.id == stream).map(|s| s.delivered)
    }

    /// The peer's stream on the current data channel, once its HELLO arrived.
    pub fn channel_stream(&self) -> Option<StreamId> {
        self.dc_stream
    }

    /// What our HELLO says of the peer: its newest stream and what we delivered of it. An ack owed
    /// stays owed (the HELLO may be lost with the channel); the peer takes the repeat as a no-op.
    pub fn hello_fields(&self) -> (Option<StreamId>, u64) {
        self.streams.last().map_or((None, 0), |s| (Some(s.id), s.delivered))
    }

    fn index(&mut self, id: StreamId, start: u64) -> usize {
        if let Some(i) = self.streams.iter().position(|s| s.id == id) {
            return i;
        }
        self.streams.push(InStream::new(id, start));
        while self.streams.len() > self.limits.streams_per_peer.max(1) {
            let old = self.streams.remove(0);
            self.held_bytes -= old.reorder.values().map(held_cost).sum::<usize>();
            self.counters.streams_forgotten += 1;
        }
        self.streams.len() - 1
    }

    /// A decoded `m.room.message` content: the messages now deliverable, in order.
    pub fn receive_content(&mut self, now: Instant, content: Content) -> Vec<Bytes> {
        match content {
            Content::Plain(lines) => {
                self.counters.messages_delivered += lines.len() as u64;
                lines
            }
            Content::Numbered(batch) => self.receive_batch(now, batch),
        }
    }

    /// The numbered lines of a Matrix batch. A stream without state starts at `base`; a known
    /// stream whose next expected seq is below `base` moves up to it (the sender no longer holds
    /// anything below, and what it released unacked was sent through Matrix before this batch, so
    /// it has already arrived: to-device messages from one device arrive in order).
    pub fn receive_batch(&mut self, now: Instant, batch: Batch) -> Vec<Bytes> {
        let i = self.index(batch.stream, batch.base);
        let mut out = Vec::new();
        self.move_up(now, i, batch.base, &mut out);
        for (seq, line) in (batch.seq..).zip(batch.lines) {
            self.accept(now, i, seq, line, &mut out);
        }
        out
    }

    /// Moves stream `i` up to `base` if it is behind (the sender holds nothing below).
    fn move_up(&mut self, now: Instant, i: usize, base: u64, out: &mut Vec<Bytes>) {
        let stream = &mut self.streams[i];
        if stream.next >= base {
            return;
        }
        let kept = stream.reorder.split_off(&base);
        let dropped = std::mem::replace(&mut stream.reorder, kept);
        self.held_bytes -= dropped.values().map(held_cost).sum::<usize>();
        stream.partial.clear();
        stream.discarding = false;
        stream.next = base;
        stream.delivered = base - 1;
        stream.acked_sent = stream.acked_sent.min(stream.delivered);
        self.drain_reorder(now, i, out);
    }

    /// The peer's HELLO on a new data channel: its stream is the channel's from now on; a stream
    /// without state starts at the HELLO's first unacked seq, a known one behind it moves up to it
    /// (e.g. restored from a state saved a while ago). DATA that came before it is taken now.
    pub fn on_hello(&mut self, now: Instant, hello: &Hello) -> Vec<Bytes> {
        self.dc_stream = Some(hello.stream);
        let i = self.index(hello.stream, hello.first_unacked);
        let mut out = Vec::new();
        self.move_up(now, i, hello.first_unacked, &mut out);
        for (seq, line) in std::mem::take(&mut self.early) {
            self.held_bytes -= held_cost(&line);
            self.accept(now, i, seq, line, &mut out);
        }
        out
    }

    /// A DATA frame of the data channel.
    pub fn receive_dc_data(&mut self, now: Instant, seq: u64, line: Line) -> Vec<Bytes> {
        let mut out = Vec::new();
        let Some(id) = self.dc_stream else {
            let cost = held_cost(&line);
            if self.held_bytes + cost > self.limits.reorder_buffer_bytes {
                self.counters.out_of_order_dropped += 1;
            } else {
                self.held_bytes += cost;
                self.early.push((seq, line));
            }
            return out;
        };
        let i = self.index(id, seq);
        self.accept(now, i, seq, line, &mut out);
        out
    }

    /// The data channel is gone: its stream and early DATA are forgotten (streams are kept).
    pub fn on_channel_lost(&mut self) {
        self.dc_stream = None;
        for (_, line) in std::mem::take(&mut self.early) {
            self.held_bytes -= held_cost(&line);
        }
    }

    fn accept(&mut self, now: Instant, i: usize, seq: u64, line: Line, out: &mut Vec<Bytes>) {
        let stream = &mut self.streams[i];
        if seq < stream.next || stream.reorder.contains_key(&seq) {
            self.counters.duplicates_dropped += 1;
            stream.ack_forced = true;
            stream.owe_ack(now);
            return;
        }
        if seq > stream.next {
            let cost = held_cost(&line);
            if self.held_bytes + cost > self.limits.reorder_buffer_bytes {
                self.counters.out_of_order_dropped += 1;
            } else {
                self.held_bytes += cost;
                stream.reorder.insert(seq, line);
            }
            return;
        }
        self.consume(now, i, line, out);
        self.drain_reorder(now, i, out);
    }

    fn drain_reorder(&mut self, now: Instant, i: usize, out: &mut Vec<Bytes>) {
        loop {
            let stream = &mut self.streams[i];
            let Some(line) = stream.reorder.remove(&stream.next) else { return };
            self.held_bytes -= held_cost(&line);
            self.consume(now, i, line, out);
        }
    }

    /// Takes the fragment `stream.next`.
    fn consume(&mut self, now: Instant, i: usize, line: Line, out: &mut Vec<Bytes>) {
        let max = self.limits.max_message_bytes;
        let stream = &mut self.streams[i];
        let seq = stream.next;
        stream.next += 1;
        if !stream.discarding && stream.partial.len() + line.payload.len() > max {
            stream.discarding = true;
            stream.partial = Vec::new();
            self.counters.oversized_dropped += 1;
        }
        if stream.discarding {
            if !line.more {
                stream.discarding = false;
                stream.delivered = seq;
                stream.owe_ack(now);
            }
            return;
        }
        if line.more {
            stream.partial.extend_from_slice(&line.payload);
            return;
        }
        let message = if stream.partial.is_empty() {
            line.payload
        } else {
            let mut whole = std::mem::take(&mut stream.partial);
            whole.extend_from_slice(&line.payload);
            Bytes::from(whole)
        };
        out.push(message);
        self.counters.messages_delivered += 1;
        stream.delivered = seq;
        stream.owe_ack(now);
    }

    fn ack_delay(&self, via: Transport) -> std::time::Duration {
        match via {
            Transport::DataChannel => self.limits.ack_delay,
            Transport::Matrix => self.limits.matrix_ack_delay,
        }
    }

    fn ack_due(&self, stream: &InStream, now: Instant, via: Transport) -> bool {
        stream.ack_pending()
            && (stream.delivered - stream.acked_sent.min(stream.delivered) >= self.limits.ack_after_fragments
                || stream.ack_since.is_none_or(|since| now >= since + self.ack_delay(via)))
    }

    /// The acks due now for `via`: on the data channel only the channel's stream (an ACK frame
    /// names no stream), on Matrix every stream that owes one. An ack is due `ack_delay`
    /// (`matrix_ack_delay`) after the first delivery it covers, or at once when it covers
    /// `ack_after_fragments` fragments or more.
    pub fn poll_acks(&mut self, now: Instant, via: Transport) -> Vec<Ack> {
        let mut acks = Vec::new();
        for i in 0..self.streams.len() {
            let stream = &self.streams[i];
            if via == Transport::DataChannel && Some(stream.id) != self.dc_stream {
                // An earlier run of the peer: it holds nothing of that stream any more.
                if stream.ack_pending() {
                    Self::mark_acked(&mut self.streams[i]);
                }
                continue;
            }
            if self.ack_due(stream, now, via) {
                acks.push(Self::mark_acked(&mut self.streams[i]));
            }
        }
        acks
    }

    /// An ack owed for the newest stream, due or not (to piggyback on a Matrix batch).
    pub fn take_ack(&mut self) -> Option<Ack> {
        let stream = self.streams.iter_mut().rev().find(|s| s.ack_pending())?;
        Some(Self::mark_acked(stream))
    }

    /// A send carrying `ack` failed: the ack is owed again.
    pub fn ack_lost(&mut self, now: Instant, ack: Ack) {
        if let Some(stream) = self.streams.iter_mut().find(|s| s.id == ack.stream) {
            // Owed in the stored state too (a forced ack is not kept).
            stream.acked_sent = stream.acked_sent.min(ack.seq.saturating_sub(1));
            stream.ack_forced = true;
            stream.owe_ack(now);
        }
    }

    fn mark_acked(stream: &mut InStream) -> Ack {
        stream.acked_sent = stream.delivered;
        stream.ack_forced = false;
        stream.ack_since = None;
        Ack { stream: stream.id, seq: stream.delivered }
    }

    /// When the next ack owed becomes due for `via`.
    pub fn next_ack_deadline(&self, via: Transport) -> Option<Instant> {
        self.streams
            .iter()
            .filter(|s| s.ack_pending() && (via == Transport::Matrix || Some(s.id) == self.dc_stream))
            .filter_map(|s| s.ack_since.map(|since| since + self.ack_delay(via)))
            .min()
    }
}

fn held_cost(line: &Line) -> usize {
    line.payload.len() + HELD_OVERHEAD
}
