//! Sans-IO exactly-once, in-order delivery of messages to one peer across two transports: a WebRTC
//! data channel and Matrix to-device messages (docs/protocol.md, "Messages between clients").
//!
//! No IO, no clock, no randomness: every input that depends on time takes `now`, and the caller
//! asks [`Peer::poll_timeout`] when to come back. The tokio task around a [`Peer`] owns the data
//! channel and the Matrix sends and does this:
//!
//! ```text
//! application send               ──▶ push(now, message)   (Err(Full): wait; has_room(len) tells when)
//! data channel opened            ──▶ on_channel_open(now)
//! data channel binary message    ──▶ receive_dc(now, bytes)          ──▶ messages for the application
//! data channel closed / Dead     ──▶ on_channel_lost()
//! m.room.message to-device       ──▶ receive_matrix(now, content)    ──▶ messages
//! org.switchboard.ack to-device  ──▶ receive_matrix_ack(now, content)
//! a channel is open              ──▶ poll_dc(now, room): HELLO, PONG, ACK, PING, and DATA when Alive
//! dc_state(now) != Alive         ──▶ poll_matrix(now): to-device sends for the peer's devices `*`
//! homeserver answered 200        ──▶ on_homeserver_accepted(first_seq, lines)   (ToDevice::lines)
//! send given up after retries    ──▶ on_matrix_failed(now, &send)
//! sleep until poll_timeout(now)  ──▶ handle_timeout(now), then poll again
//! ```
//!
//! Every call that changes state may make something new to send: poll after each.
//!
//! Guarantee: each message pushed reaches the peer's application once and in push order, whichever
//! transport carried which fragment, as long as neither side loses its state (see the protocol
//! document for what a restart without a store can lose or repeat). Everything is bounded: the
//! replay buffer (default 1 MiB), the out-of-order buffer (4 MiB), streams per peer (4), a
//! reassembled message (4 MiB), a Matrix batch (50 lines, 48 KiB of body).
//!
//! A peer that never shows it speaks this protocol (a plain Raiden node: no HELLO, ack or stream
//! field from it) reads our Matrix batches as Raiden 3.x messages; it never acks, so fragments the
//! homeserver accepted for it are released when the replay buffer needs room.

mod codec;
mod incoming;
mod outgoing;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use codec::{
    Ack, BATCH, BATCH_LIMIT, Batch, Content, ContentError, EVENT_ACK, EVENT_MESSAGE, FRAGMENT_SIZE, Frame,
    FrameError, Hello, InvalidStreamId, Line, STREAM_FIELD, StreamId, batch_size, decode_ack, decode_content,
    encode_ack, encode_batch, join_frames, split_frames,
};
pub use incoming::{Incoming, IncomingCounters};
pub use outgoing::{Outgoing, OutgoingCounters, PushError};

/// Bounds and timings. The defaults are the documented ones (docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Payload bytes the sender holds until acked (per peer); `push` fails with `Full` past it.
    /// Default 1 MiB.
    pub replay_buffer_bytes: usize,
    /// Bytes the receiver holds out of order (per peer, payload + 64 per fragment); fragments past
    /// it are dropped and resent later. Default 4 MiB.
    pub reorder_buffer_bytes: usize,
    /// Largest message the receiver reassembles; a larger one is dropped. Default 4 MiB.
    pub max_message_bytes: usize,
    /// Streams the receiver keeps per peer (oldest forgotten first). Default 4.
    pub streams_per_peer: usize,
    /// Lines per Matrix batch. Default 50.
    pub batch_lines: usize,
    /// JSON-escaped body bytes per Matrix batch (one line may pass it alone). Default 48 KiB.
    pub batch_body_bytes: usize,
    /// Delay of an ack on the data channel after the first delivery it covers. Default 20 ms.
    pub ack_delay: Duration,
    /// Delay of an ack sent alone through Matrix (a batch going out sooner carries it). Default 1 s.
    pub matrix_ack_delay: Duration,
    /// An ack covering this many fragments goes at once. Default 32.
    pub ack_after_fragments: u64,
    /// No ack this long after a send: everything held is resent. Default 10 s.
    pub resend_timeout: Duration,
    /// The resend timeout doubles up to this while nothing is acked. Default 5 min.
    pub max_resend_timeout: Duration,
    /// A PING this often on a data channel. Default 5 s.
    pub ping_interval: Duration,
    /// A PING unanswered this long: the channel is `Stalled` (send through Matrix). Default 2 s.
    pub ping_timeout: Duration,
    /// No HELLO this long after opening, or no PONG this long: the channel is `Dead`. Default 15 s.
    pub dead_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            replay_buffer_bytes: 1024 * 1024,
            reorder_buffer_bytes: 4 * 1024 * 1024,
            max_message_bytes: 4 * 1024 * 1024,
            streams_per_peer: 4,
            batch_lines: 50,
            batch_body_bytes: 48 * 1024,
            ack_delay: Duration::from_millis(20),
            matrix_ack_delay: Duration::from_secs(1),
            ack_after_fragments: 32,
            resend_timeout: Duration::from_secs(10),
            max_resend_timeout: Duration::from_secs(300),
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(2),
            dead_after: Duration::from_secs(15),
        }
    }
}

/// The two transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Transport {
    DataChannel,
    Matrix,
}

/// A to-device message to send to all the peer's devices (`*`), with this txn id (retries reuse
/// it, so the homeserver sends it once).
#[derive(Debug, Clone, PartialEq)]
pub struct ToDevice {
    /// `m.room.message` or `org.switchboard.ack`.
    pub event_type: &'static str,
    pub txn_id: String,
    pub content: Value,
    /// For a batch: its first seq and line count, for [`Peer::on_homeserver_accepted`].
    pub lines: Option<(u64, usize)>,
    /// The ack it carries (piggybacked or alone), owed again if the send fails.
    pub ack: Option<Ack>,
}

/// Where the data channel stands, for the integrator's choice of transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DcState {
    /// No channel open.
    Closed,
    /// Open, waiting for the peer's HELLO and the answer to the first PING: send through Matrix.
    Handshake,
    /// HELLO received and the last PING answered in time: send on the channel.
    Alive,
    /// A PING is unanswered past `ping_timeout`: send through Matrix meanwhile.
    Stalled,
    /// No HELLO or PONG for `dead_after`: close the channel and call [`Peer::on_channel_lost`].
    Dead,
}

/// Counters an integrator can expose (gauges and totals of both halves).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub replay_buffered_bytes: usize,
    pub replay_buffered_fragments: usize,
    pub reorder_held_bytes: usize,
    pub outgoing: OutgoingCounters,
    pub incoming: IncomingCounters,
}

/// Transient state of the open data channel.
#[derive(Debug, Clone)]
struct Channel {
    opened: Instant,
    hello_sent: bool,
    peer_hello: bool,
    pongs: Vec<u64>,
    ping_out: Option<(u64, Instant)>,
    last_pong: Option<Instant>,
    next_ping: Option<Instant>,
    rtt: Option<Duration>,
    nonce: u64,
    /// What the channel carried unacked was handed to Matrix in this stall already.
    stall_resent: bool,
}

/// Both halves for one peer plus the data channel's handshake and liveness. Serialise it (between
/// events) to persist the delivery state; the channel part is not kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Peer {
    outgoing: Outgoing,
    incoming: Incoming,
    #[serde(skip)]
    channel: Option<Channel>,
}

impl Peer {
    /// A new peer; `stream` is this run's random stream id ([`StreamId::generate`]).
    pub fn new(stream: StreamId, limits: Limits) -> Self {
        Self {
            outgoing: Outgoing::new(stream, limits.clone()),
            incoming: Incoming::new(limits),
            channel: None,
        }
    }

    pub fn outgoing(&self) -> &Outgoing {
        &self.outgoing
    }

    pub fn incoming(&self) -> &Incoming {
        &self.incoming
    }

    /// Replaces the limits of both halves (e.g. after restoring a stored state).
    pub fn set_limits(&mut self, limits: &Limits) {
        self.outgoing.set_limits(limits.clone());
        self.incoming.set_limits(limits.clone());
    }

    /// Bytes held for this peer's incoming messages ([`Incoming::retained_bytes`]).
    pub fn retained_bytes(&self) -> usize {
        self.incoming.retained_bytes()
    }

    /// Lets go of every incoming fragment not yet delivered ([`Incoming::shed`]).
    pub fn shed_incoming(&mut self) {
        self.incoming.shed();
    }

    pub fn counters(&self) -> Counters {
        Counters {
            replay_buffered_bytes: self.outgoing.buffered_bytes(),
            replay_buffered_fragments: self.outgoing.buffered_fragments(),
            reorder_held_bytes: self.incoming.held_bytes(),
            outgoing: self.outgoing.counters(),
            incoming: self.incoming.counters(),
        }
    }

    /// Queues a message for the peer ([`Outgoing::push`]).
    pub fn push(&mut self, now: Instant, message: Bytes) -> Result<(), PushError> {
        self.outgoing.push(now, message)
    }

    /// Whether a message of `len` bytes fits in the replay buffer now.
    pub fn has_room(&self, len: usize) -> bool {
        self.outgoing.has_room(len)
    }

    /// The last measured round trip on the data channel.
    pub fn rtt(&self) -> Option<Duration> {
        self.channel.as_ref()?.rtt
    }

    /// A data channel to the peer opened: the next [`Peer::poll_dc`] starts with our HELLO.
    pub fn on_channel_open(&mut self, now: Instant) {
        if self.channel.is_some() {
            self.on_channel_lost();
        }
        self.incoming.on_channel_lost();
        self.channel = Some(Channel {
            opened: now,
            hello_sent: false,
            peer_hello: false,
            pongs: Vec::new(),
            ping_out: None,
            last_pong: None,
            next_ping: None,
            rtt: None,
            nonce: 0,
            stall_resent: false,
        });
    }

    /// The data channel closed or was given up: what it carried unacked goes through Matrix first.
    pub fn on_channel_lost(&mut self) {
        self.channel = None;
        self.incoming.on_channel_lost();
        self.outgoing.on_channel_lost();
    }

    pub fn dc_state(&self, now: Instant) -> DcState {
        let Some(ch) = &self.channel else { return DcState::Closed };
        let limits = self.outgoing.limits();
        if !ch.peer_hello {
            return if now >= ch.opened + limits.dead_after { DcState::Dead } else { DcState::Handshake };
        }
        if let Some((_, sent)) = ch.ping_out {
            let since = ch.last_pong.map_or(sent, |pong| pong.max(sent));
            if now >= since + limits.dead_after {
                return DcState::Dead;
            }
            if now >= sent + limits.ping_timeout {
                return DcState::Stalled;
            }
        }
        if ch.last_pong.is_some() { DcState::Alive } else { DcState::Handshake }
    }

    /// A binary message from the data channel (one frame, or a BATCH of frames): the messages
    /// now deliverable, in order. An unknown frame type is `Err(UnknownType)`: ignore it (inside a
    /// BATCH it is skipped). Without an open channel ([`Peer::on_channel_open`]) frames are ignored.
    pub fn receive_dc(&mut self, now: Instant, message: &Bytes) -> Result<Vec<Bytes>, FrameError> {
        if message.first() != Some(&BATCH) {
            return self.receive_dc_frame(now, message);
        }
        let mut delivered = Vec::new();
        for frame in split_frames(message)? {
            match self.receive_dc_frame(now, &frame) {
                Ok(messages) => delivered.extend(messages),
                Err(FrameError::UnknownType(_)) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(delivered)
    }

    fn receive_dc_frame(&mut self, now: Instant, frame: &Bytes) -> Result<Vec<Bytes>, FrameError> {
        let frame = Frame::decode(frame)?;
        let Some(ch) = self.channel.as_mut() else { return Ok(Vec::new()) };
        Ok(match frame {
            Frame::Data { more, seq, payload } => {
                self.incoming.receive_dc_data(now, seq, Line { more, payload })
            }
            Frame::Ack { seq } => {
                // Always of our current stream (a channel does not outlive a run of ours); it may
                // overtake the peer's HELLO on an unordered channel.
                let stream = self.outgoing.stream();
                self.outgoing.on_ack(now, Ack { stream, seq });
                Vec::new()
            }
            Frame::Ping { nonce } => {
                ch.pongs.push(nonce);
                // Bounded: a peer flooding PINGs gets answers to the latest 16.
                if ch.pongs.len() > 16 {
                    ch.pongs.remove(0);
                }
                Vec::new()
            }
            Frame::Pong { nonce } => {
                if let Some((out, sent)) = ch.ping_out
                    && out == nonce
                {
                    ch.ping_out = None;
                    ch.stall_resent = false;
                    ch.last_pong = Some(now);
                    ch.rtt = Some(now.saturating_duration_since(sent));
                    ch.next_ping = Some(now + self.outgoing.limits().ping_interval);
                }
                Vec::new()
            }
            Frame::Hello(hello) => {
                ch.peer_hello = true;
                self.outgoing.on_peer_hello(now, &hello);
                self.incoming.on_hello(now, &hello)
            }
        })
    }

    /// Frames to write on the data channel now: our HELLO first, PONGs, a due ACK, a due PING,
    /// then (only while [`DcState::Alive`]) DATA up to about `max_bytes`.
    pub fn poll_dc(&mut self, now: Instant, max_bytes: usize) -> Vec<Bytes> {
        let alive = self.dc_state(now) == DcState::Alive;
        let Some(ch) = self.channel.as_mut() else { return Vec::new() };
        let mut frames = Vec::new();
        if !ch.hello_sent {
            ch.hello_sent = true;
            let (peer_stream, delivered) = self.incoming.hello_fields();
            let hello = Hello {
                stream: self.outgoing.stream(),
                first_unacked: self.outgoing.hello_first_unacked(),
                peer_stream,
                delivered,
            };
            frames.push(Frame::Hello(hello).encode());
        }
        for nonce in ch.pongs.drain(..) {
            frames.push(Frame::Pong { nonce }.encode());
        }
        if !ch.peer_hello {
            return frames;
        }
        for ack in self.incoming.poll_acks(now, Transport::DataChannel) {
            frames.push(Frame::Ack { seq: ack.seq }.encode());
        }
        if ch.ping_out.is_none() && ch.next_ping.is_none_or(|at| now >= at) {
            ch.nonce += 1;
            ch.ping_out = Some((ch.nonce, now));
            frames.push(Frame::Ping { nonce: ch.nonce }.encode());
        }
        if alive {
            let used: usize = frames.iter().map(Bytes::len).sum();
            frames.extend(self.outgoing.take_dc_frames(now, max_bytes.saturating_sub(used)));
        }
        frames
    }

    /// The next to-device send through Matrix, when the channel is not alive: a batch of pending
    /// fragments (carrying an owed ack), else an ack alone once it is due.
    pub fn poll_matrix(&mut self, now: Instant) -> Option<ToDevice> {
        if self.outgoing.has_pending() {
            let ack = self.incoming.take_ack();
            return self.outgoing.take_matrix_batch(now, ack);
        }
        let ack = self.incoming.poll_acks(now, Transport::Matrix).into_iter().next()?;
        Some(ToDevice {
            event_type: EVENT_ACK,
            txn_id: format!("sb-ack.{}.{}", ack.stream, ack.seq),
            content: encode_ack(ack),
            lines: None,
            ack: Some(ack),
        })
    }

    /// The homeserver accepted the batch of `lines` lines from `first_seq` ([`ToDevice::lines`]).
    pub fn on_homeserver_accepted(&mut self, first_seq: u64, lines: usize) {
        self.outgoing.on_homeserver_accepted(first_seq, lines);
    }

    /// A to-device send was given up (after its retries): its lines are pending again and its ack
    /// is owed again.
    pub fn on_matrix_failed(&mut self, now: Instant, send: &ToDevice) {
        if let Some((first_seq, lines)) = send.lines {
            self.outgoing.on_matrix_failed(first_seq, lines);
        }
        if let Some(ack) = send.ack {
            self.incoming.ack_lost(now, ack);
        }
    }

    /// An `m.room.message` to-device content from the peer: the messages now deliverable, in
    /// order (a plain Raiden node's lines as they arrive). `Err(NotText)`: not for this layer.
    pub fn receive_matrix(&mut self, now: Instant, content: &Value) -> Result<Vec<Bytes>, ContentError> {
        let content = decode_content(content)?;
        if let Content::Numbered(batch) = &content {
            self.outgoing.on_peer_speaks();
            if let Some(ack) = batch.ack {
                self.outgoing.on_ack(now, ack);
            }
        }
        Ok(self.incoming.receive_content(now, content))
    }

    /// An `org.switchboard.ack` to-device content from the peer.
    pub fn receive_matrix_ack(&mut self, now: Instant, content: &Value) -> Result<(), ContentError> {
        let ack = decode_ack(content)?;
        self.outgoing.on_ack(now, ack);
        Ok(())
    }

    /// When to call [`Peer::handle_timeout`] and poll again, as things stand at `now`: the resend
    /// timer, an ack falling due (on the channel while it is alive, else through Matrix), the next
    /// PING, a PING or HELLO timing out.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let limits = self.outgoing.limits();
        let state = self.dc_state(now);
        let channel = self.channel.as_ref().and_then(|ch| match state {
            DcState::Closed | DcState::Dead => None,
            _ if !ch.peer_hello => Some(ch.opened + limits.dead_after),
            DcState::Stalled => ch.ping_out.map(|(_, sent)| sent + limits.dead_after),
            _ => match ch.ping_out {
                Some((_, sent)) => Some(sent + limits.ping_timeout),
                None => Some(ch.next_ping.unwrap_or(now)),
            },
        });
        let acks = if self.channel.as_ref().is_some_and(|ch| ch.peer_hello) && state != DcState::Dead {
            self.incoming.next_ack_deadline(Transport::DataChannel)
        } else {
            self.incoming.next_ack_deadline(Transport::Matrix)
        };
        [self.outgoing.poll_timeout(now), acks, channel].into_iter().flatten().min()
    }

    /// Runs the timers due at `now`: the resend timer, and a channel turning `Stalled` (what it
    /// carried unacked is pending again, for Matrix). Acks and pings come out of the next polls.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.outgoing.handle_timeout(now);
        if self.dc_state(now) == DcState::Stalled
            && let Some(ch) = self.channel.as_mut()
            && !ch.stall_resent
        {
            ch.stall_resent = true;
            self.outgoing.on_channel_lost();
        }
    }
}

/// `Bytes` in a stored state as base64 text (compact in JSON stores).
mod serde_b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        STANDARD.decode(text.as_bytes()).map(Bytes::from).map_err(serde::de::Error::custom)
    }
}

/// `Vec<u8>` in a stored state as base64 text.
mod serde_b64_vec {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}
