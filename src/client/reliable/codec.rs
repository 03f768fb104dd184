//! Wire format between clients (docs/protocol.md, "Messages between clients"): the data channel's
//! binary frames and the content of the Matrix to-device events. Decoding never panics; malformed
//! input is a typed error.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The largest payload of one fragment (one DATA frame, one Matrix line before base64): 16 KiB, the
/// message size every browser's data channel takes.
pub const FRAGMENT_SIZE: usize = 16 * 1024;

/// Event type of the to-device messages that carry data (Raiden 3.x's).
pub const EVENT_MESSAGE: &str = "m.room.message";
/// Event type of a to-device acknowledgement sent alone.
pub const EVENT_ACK: &str = "org.switchboard.ack";
/// The field of an `m.room.message` content that numbers its lines.
pub const STREAM_FIELD: &str = "org.switchboard.stream";

const DATA: u8 = 0x01;
const ACK: u8 = 0x02;
const PING: u8 = 0x03;
const PONG: u8 = 0x04;
const HELLO: u8 = 0x05;
/// Several frames in one data channel message ([`join_frames`], [`split_frames`]).
pub const BATCH: u8 = 0x06;
/// The largest data channel message a sender joins frames into: the safe message size.
pub const BATCH_LIMIT: usize = 16 * 1024;
const HELLO_LEN: usize = 1 + 16 + 8 + 16 + 8;
const DATA_HEADER: usize = 1 + 1 + 8;

/// A sender's stream id: a random non-zero 64-bit number, written as 16 lower-case hex digits
/// (16 × `0` means "unknown" in a HELLO, so zero is not an id).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(u64);

impl StreamId {
    /// A fresh random id from `rng` (randomness comes from the caller).
    pub fn generate<R: rand::RngCore + ?Sized>(rng: &mut R) -> Self {
        loop {
            if let Some(id) = Self::from_u64(rng.next_u64()) {
                return id;
            }
        }
    }

    /// The id `n`, or `None` for 0 (reserved for "unknown").
    pub fn from_u64(n: u64) -> Option<Self> {
        (n != 0).then_some(Self(n))
    }

    /// The id as a number.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Parses 16 ASCII hex digits (either case). 16 × `0` is `Ok(None)`.
    pub fn parse_hex(text: &[u8]) -> Result<Option<Self>, InvalidStreamId> {
        if text.len() != 16 {
            return Err(InvalidStreamId);
        }
        let mut n = 0u64;
        for &c in text {
            let digit = char::from(c).to_digit(16).ok_or(InvalidStreamId)?;
            n = (n << 4) | u64::from(digit);
        }
        Ok(Self::from_u64(n))
    }

    fn write_hex(id: Option<Self>, out: &mut BytesMut) {
        out.put_slice(format!("{:016x}", id.map_or(0, Self::as_u64)).as_bytes());
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({self})")
    }
}

impl Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        Self::parse_hex(text.as_bytes())
            .ok()
            .flatten()
            .ok_or_else(|| serde::de::Error::custom("a stream id is 16 hex digits, not all 0"))
    }
}

/// Not a stream id: not 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a stream id is 16 ASCII hex digits")]
pub struct InvalidStreamId;

/// A cumulative acknowledgement: the receiver has handed every message of `stream` up to and
/// including the one that ends with fragment `seq` to its application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    #[serde(rename = "id")]
    pub stream: StreamId,
    pub seq: u64,
}

/// What one side tells the other when a data channel opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The sender's own stream.
    pub stream: StreamId,
    /// The lowest seq the sender still holds (a receiver without state for `stream` starts there).
    pub first_unacked: u64,
    /// The stream of the other side that the sender has received from most recently, if any.
    pub peer_stream: Option<StreamId>,
    /// The last seq of `peer_stream` handed to the application (0 when `peer_stream` is `None`).
    pub delivered: u64,
}

/// One data channel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A fragment of the sender's current stream.
    Data {
        more: bool,
        seq: u64,
        payload: Bytes,
    },
    /// Cumulative ack of the receiver's peer's stream announced on this channel.
    Ack {
        seq: u64,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Hello(Hello),
}

/// A data channel message that is not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty frame")]
    Empty,
    /// A type this version does not know: ignore the frame (a later version may send it).
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("frame type {kind:#04x} of {len} bytes: wrong length")]
    WrongLength { kind: u8, len: usize },
    #[error("DATA payload of {0} bytes is over the 16 KiB fragment size")]
    PayloadTooLarge(usize),
    #[error("seq 0 (seqs start at 1)")]
    ZeroSeq,
    #[error(transparent)]
    StreamId(#[from] InvalidStreamId),
}

impl Frame {
    /// The frame's bytes.
    pub fn encode(&self) -> Bytes {
        match self {
            Self::Data { more, seq, payload } => {
                let mut out = BytesMut::with_capacity(DATA_HEADER + payload.len());
                out.put_u8(DATA);
                out.put_u8(u8::from(*more));
                out.put_u64(*seq);
                out.put_slice(payload);
                out.freeze()
            }
            Self::Ack { seq } => Self::fixed(ACK, *seq),
            Self::Ping { nonce } => Self::fixed(PING, *nonce),
            Self::Pong { nonce } => Self::fixed(PONG, *nonce),
            Self::Hello(hello) => {
                let mut out = BytesMut::with_capacity(HELLO_LEN);
                out.put_u8(HELLO);
                StreamId::write_hex(Some(hello.stream), &mut out);
                out.put_u64(hello.first_unacked);
                StreamId::write_hex(hello.peer_stream, &mut out);
                out.put_u64(hello.delivered);
                out.freeze()
            }
        }
    }

    fn fixed(kind: u8, n: u64) -> Bytes {
        let mut out = BytesMut::with_capacity(9);
        out.put_u8(kind);
        out.put_u64(n);
        out.freeze()
    }

    /// Parses one data channel message. The payload of a DATA frame shares `frame`'s memory.
    pub fn decode(frame: &Bytes) -> Result<Self, FrameError> {
        let (&kind, rest) = frame.split_first().ok_or(FrameError::Empty)?;
        let wrong = || FrameError::WrongLength { kind, len: frame.len() };
        match kind {
            DATA => {
                if frame.len() < DATA_HEADER {
                    return Err(wrong());
                }
                let more = rest[0] & 1 == 1;
                let seq = read_u64(&rest[1..9]);
                if seq == 0 {
                    return Err(FrameError::ZeroSeq);
                }
                let payload = frame.slice(DATA_HEADER..);
                if payload.len() > FRAGMENT_SIZE {
                    return Err(FrameError::PayloadTooLarge(payload.len()));
                }
                Ok(Self::Data { more, seq, payload })
            }
            ACK | PING | PONG => {
                if rest.len() != 8 {
                    return Err(wrong());
                }
                let n = read_u64(rest);
                Ok(match kind {
                    ACK => Self::Ack { seq: n },
                    PING => Self::Ping { nonce: n },
                    _ => Self::Pong { nonce: n },
                })
            }
            HELLO => {
                if frame.len() != HELLO_LEN {
                    return Err(wrong());
                }
                let stream = StreamId::parse_hex(&rest[0..16])?.ok_or(InvalidStreamId)?;
                let first_unacked = read_u64(&rest[16..24]);
                if first_unacked == 0 {
                    return Err(FrameError::ZeroSeq);
                }
                let peer_stream = StreamId::parse_hex(&rest[24..40])?;
                let delivered = if peer_stream.is_some() { read_u64(&rest[40..48]) } else { 0 };
                Ok(Self::Hello(Hello { stream, first_unacked, peer_stream, delivered }))
            }
            other => Err(FrameError::UnknownType(other)),
        }
    }
}

/// The size of a BATCH message holding frames of `frame_bytes` bytes in all, `count` of them.
pub fn batch_size(frame_bytes: usize, count: usize) -> usize {
    1 + 2 * count + frame_bytes
}

/// Frames joined into one data channel message: `0x06`, then for each frame its length (u16,
/// big-endian) and its bytes. Each frame must be shorter than 64 KiB and not a BATCH itself.
pub fn join_frames(frames: &[Bytes]) -> Bytes {
    let mut out = BytesMut::with_capacity(batch_size(frames.iter().map(Bytes::len).sum(), frames.len()));
    out.put_u8(BATCH);
    for frame in frames {
        debug_assert!(u16::try_from(frame.len()).is_ok() && frame.first() != Some(&BATCH));
        out.put_u16(u16::try_from(frame.len()).unwrap_or(u16::MAX));
        out.put_slice(frame);
    }
    out.freeze()
}

/// The frames of a BATCH message (sharing its memory). A truncated length or frame, an empty
/// frame or a BATCH inside is an error for the whole message.
pub fn split_frames(message: &Bytes) -> Result<Vec<Bytes>, FrameError> {
    let wrong = || FrameError::WrongLength { kind: BATCH, len: message.len() };
    if message.first() != Some(&BATCH) {
        return Err(wrong());
    }
    let mut frames = Vec::new();
    let mut at = 1;
    while at < message.len() {
        let header = message.get(at..at + 2).ok_or_else(wrong)?;
        let len = usize::from(u16::from_be_bytes([header[0], header[1]]));
        let start = at + 2;
        let frame = message.get(start..start + len).ok_or_else(wrong)?;
        match frame.first() {
            None => return Err(FrameError::Empty),
            Some(&BATCH) => return Err(wrong()),
            Some(_) => frames.push(message.slice(start..start + len)),
        }
        at = start + len;
    }
    Ok(frames)
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(n)
}

/// One line of a Matrix batch: one fragment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub more: bool,
    #[serde(with = "super::serde_b64")]
    pub payload: Bytes,
}

/// The numbered lines of one `m.room.message` with `org.switchboard.stream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub stream: StreamId,
    /// Seq of the first line; the others follow one by one.
    pub seq: u64,
    /// The lowest seq the sender still held when it built the batch.
    pub base: u64,
    pub lines: Vec<Line>,
    /// A piggybacked acknowledgement of the receiver's own stream.
    pub ack: Option<Ack>,
}

/// A decoded `m.room.message` content of msgtype `m.text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// From a plain Raiden node (no stream field): its non-empty lines, as they are.
    Plain(Vec<Bytes>),
    Numbered(Batch),
}

/// A to-device content that is not a valid message of this protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    /// Not `msgtype` `m.text` (Raiden's WebRTC signalling is `m.notice`): not for this layer.
    #[error("msgtype is not m.text")]
    NotText,
    #[error("no string body")]
    NoBody,
    #[error("malformed {STREAM_FIELD}: {0}")]
    Stream(String),
    #[error("line {0} is not valid base64")]
    Base64(usize),
    #[error("line {index} of {len} bytes is over the 16 KiB fragment size")]
    LineTooLarge { index: usize, len: usize },
    #[error("malformed ack: {0}")]
    Ack(String),
}

#[derive(Deserialize)]
struct StreamFieldIn {
    id: StreamId,
    seq: u64,
    base: u64,
    #[serde(default)]
    more: Vec<usize>,
    #[serde(default)]
    b64: Vec<usize>,
    #[serde(default)]
    ack: Option<Ack>,
}

/// Decodes an `m.room.message` to-device content.
pub fn decode_content(content: &Value) -> Result<Content, ContentError> {
    if content.get("msgtype").and_then(Value::as_str) != Some("m.text") {
        return Err(ContentError::NotText);
    }
    let body = content.get("body").and_then(Value::as_str).ok_or(ContentError::NoBody)?;
    let Some(field) = content.get(STREAM_FIELD) else {
        let lines = body
            .split('\n')
            .filter(|line| !line.is_empty())
            .map(|line| Bytes::copy_from_slice(line.as_bytes()))
            .collect();
        return Ok(Content::Plain(lines));
    };
    let field = StreamFieldIn::deserialize(field).map_err(|e| ContentError::Stream(e.to_string()))?;
    let texts: Vec<&str> = body.split('\n').collect();
    let count = texts.len();
    let bad = |why: &str| ContentError::Stream(why.to_owned());
    if field.seq == 0 || field.base == 0 || field.base > field.seq {
        return Err(bad("seq and base start at 1, base ≤ seq"));
    }
    if field.seq.checked_add(count as u64).is_none() {
        return Err(bad("seq overflows"));
    }
    if field.more.iter().chain(&field.b64).any(|&i| i >= count) {
        return Err(bad("line index out of range"));
    }
    let mut lines: Vec<Line> = texts
        .iter()
        .map(|text| Line { more: false, payload: Bytes::copy_from_slice(text.as_bytes()) })
        .collect();
    for &i in &field.more {
        lines[i].more = true;
    }
    for &i in &field.b64 {
        let decoded = BASE64.decode(texts[i]).map_err(|_| ContentError::Base64(i))?;
        lines[i].payload = Bytes::from(decoded);
    }
    if let Some((index, line)) = lines.iter().enumerate().find(|(_, l)| l.payload.len() > FRAGMENT_SIZE) {
        return Err(ContentError::LineTooLarge { index, len: line.payload.len() });
    }
    Ok(Content::Numbered(Batch { stream: field.id, seq: field.seq, base: field.base, lines, ack: field.ack }))
}

/// Decodes an `org.switchboard.ack` to-device content.
pub fn decode_ack(content: &Value) -> Result<Ack, ContentError> {
    Ack::deserialize(content).map_err(|e| ContentError::Ack(e.to_string()))
}

/// The content of an `org.switchboard.ack` event.
pub fn encode_ack(ack: Ack) -> Value {
    json!({"id": ack.stream.to_string(), "seq": ack.seq})
}

/// How a line is written in the body: as is, or base64 when the payload is not UTF-8, contains
/// `\n`, or would more than double in length when JSON-escaped (control characters; never a Raiden
/// message, whose lines must stay as they are). Returns the text, whether it is base64, and its
/// length inside the JSON string.
pub(crate) fn line_text(payload: &[u8]) -> (std::borrow::Cow<'_, str>, bool, usize) {
    let b64_len = payload.len().div_ceil(3) * 4;
    if let Ok(text) = std::str::from_utf8(payload)
        && !text.contains('\n')
    {
        let escaped = escaped_len(text);
        if escaped <= 2 * payload.len() {
            return (std::borrow::Cow::Borrowed(text), false, escaped);
        }
    }
    (std::borrow::Cow::Owned(BASE64.encode(payload)), true, b64_len)
}

/// Length of `text` inside a JSON string as serde_json writes it.
fn escaped_len(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum()
}

/// The content of an `m.room.message` carrying `batch` (a valid Raiden 3.x `m.text` message).
pub fn encode_batch(batch: &Batch) -> Value {
    let mut body = String::new();
    let mut more = Vec::new();
    let mut b64 = Vec::new();
    for (i, line) in batch.lines.iter().enumerate() {
        if i > 0 {
            body.push('\n');
        }
        let (text, is_b64, _) = line_text(&line.payload);
        body.push_str(&text);
        if line.more {
            more.push(i);
        }
        if is_b64 {
            b64.push(i);
        }
    }
    let mut field = Map::new();
    field.insert("id".into(), json!(batch.stream.to_string()));
    field.insert("seq".into(), json!(batch.seq));
    field.insert("base".into(), json!(batch.base));
    if !more.is_empty() {
        field.insert("more".into(), json!(more));
    }
    if !b64.is_empty() {
        field.insert("b64".into(), json!(b64));
    }
    if let Some(ack) = batch.ack {
        field.insert("ack".into(), encode_ack(ack));
    }
    json!({"msgtype": "m.text", "body": body, STREAM_FIELD: Value::Object(field)})
}
