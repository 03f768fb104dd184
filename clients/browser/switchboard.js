// Switchboard's browser client: WebRTC data channels between two Raiden addresses when they work,
// Matrix to-device messages when they don't, and every message delivered to the application
// exactly once and in order either way. The wire format is docs/protocol.md ("Signalling
// WebSocket" and "Messages between clients"); it interoperates with the Rust client
// (`switchboard::client`) byte for byte.
//
// An ES module with no build step and no dependency beyond the browser's RTCPeerConnection,
// WebSocket, fetch and TextEncoder. Two layers:
// - the delivery layer (`ReliablePeer`, `encodeFrame`, `decodeFrame`, `encodeBatch`,
//   `decodeContent`): sans-IO, it never reads the clock (every call takes `now` in milliseconds)
//   and does no IO; the tests drive it directly;
// - `connect()` / `SwitchboardClient`: the `/sync` loop, to-device sends, Switchboard's signalling
//   WebSocket and the peer connections around it. Events are DOM events on the client (an
//   EventTarget): `presence`, `channelup`, `channeldown`, `message`, `switchboard`, `syncstopped`,
//   each a CustomEvent whose `detail` is described in switchboard.d.ts.
//
// Access tokens never go into URLs (except the homeserver's own API, as Authorization headers
// only) nor into console output.

// ---------------------------------------------------------------------------------------------
// Codec

/** The largest payload of one fragment: 16 KiB, what every browser's data channel takes. */
export const FRAGMENT_SIZE = 16 * 1024;
/** The largest data channel message a sender joins frames into. */
export const BATCH_LIMIT = 16 * 1024;
export const EVENT_MESSAGE = 'm.room.message';
export const EVENT_ACK = 'org.switchboard.ack';
export const STREAM_FIELD = 'org.switchboard.stream';
export const CHANNEL_LABEL = 'switchboard';

const DATA = 0x01;
const ACK = 0x02;
const PING = 0x03;
const PONG = 0x04;
const HELLO = 0x05;
const BATCH = 0x06;
const HELLO_LEN = 49;
const HELD_OVERHEAD = 64;
const MAX_U64 = (1n << 64n) - 1n;

const utf8 = new TextEncoder();
const strictUtf8 = new TextDecoder('utf-8', { fatal: true });
const looseUtf8 = new TextDecoder('utf-8');

/** A malformed frame or content: dropped by the caller. */
export class ProtocolError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ProtocolError';
  }
}

/** 16 lower-case hex digits of a BigInt stream id (0n: "unknown"). */
export function streamHex(id) {
  return id.toString(16).padStart(16, '0');
}

/** Parses 16 hex digits (either case); 0n for 16 × `0`. Throws on anything else. */
export function parseStreamHex(text) {
  if (typeof text !== 'string' || !/^[0-9a-fA-F]{16}$/.test(text)) {
    throw new ProtocolError('a stream id is 16 hex digits');
  }
  return BigInt('0x' + text);
}

/** A random non-zero 64-bit stream id (crypto.getRandomValues exists on every origin). */
export function randomStreamId() {
  const words = new Uint32Array(2);
  for (;;) {
    crypto.getRandomValues(words);
    const id = (BigInt(words[0]) << 32n) | BigInt(words[1]);
    if (id !== 0n) return id;
  }
}

/**
 * Encodes one data channel frame:
 * `{type:'data', more, seq, payload}`, `{type:'ack', seq}`, `{type:'ping'|'pong', nonce}`,
 * `{type:'hello', stream, firstUnacked, peerStream, delivered}` (BigInts; peerStream 0n: none).
 */
export function encodeFrame(frame) {
  switch (frame.type) {
    case 'data': {
      const out = new Uint8Array(10 + frame.payload.length);
      const view = new DataView(out.buffer);
      out[0] = DATA;
      out[1] = frame.more ? 1 : 0;
      view.setBigUint64(2, frame.seq);
      out.set(frame.payload, 10);
      return out;
    }
    case 'ack':
    case 'ping':
    case 'pong': {
      const out = new Uint8Array(9);
      out[0] = frame.type === 'ack' ? ACK : frame.type === 'ping' ? PING : PONG;
      new DataView(out.buffer).setBigUint64(1, frame.type === 'ack' ? frame.seq : frame.nonce);
      return out;
    }
    case 'hello': {
      const out = new Uint8Array(HELLO_LEN);
      const view = new DataView(out.buffer);
      out[0] = HELLO;
      out.set(utf8.encode(streamHex(frame.stream)), 1);
      view.setBigUint64(17, frame.firstUnacked);
      out.set(utf8.encode(streamHex(frame.peerStream)), 25);
      view.setBigUint64(41, frame.delivered);
      return out;
    }
    default:
      throw new TypeError(`unknown frame type ${frame.type}`);
  }
}

/**
 * Decodes one frame (not a BATCH). Returns `null` for an unknown type (ignored, a later version
 * may add types); throws ProtocolError for a malformed frame.
 */
export function decodeFrame(bytes) {
  if (bytes.length === 0) throw new ProtocolError('empty frame');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const type = bytes[0];
  switch (type) {
    case DATA: {
      if (bytes.length < 10) throw new ProtocolError('DATA shorter than 10 bytes');
      if (bytes.length - 10 > FRAGMENT_SIZE) throw new ProtocolError('DATA payload over 16 KiB');
      const seq = view.getBigUint64(2);
      if (seq === 0n) throw new ProtocolError('seq 0');
      return { type: 'data', more: (bytes[1] & 1) === 1, seq, payload: bytes.slice(10) };
    }
    case ACK:
    case PING:
    case PONG: {
      if (bytes.length !== 9) throw new ProtocolError('wrong length');
      const n = view.getBigUint64(1);
      if (type === ACK) return { type: 'ack', seq: n };
      return { type: type === PING ? 'ping' : 'pong', nonce: n };
    }
    case HELLO: {
      if (bytes.length !== HELLO_LEN) throw new ProtocolError('HELLO of wrong length');
      const ascii = (from) => String.fromCharCode(...bytes.subarray(from, from + 16));
      const stream = parseStreamHex(ascii(1));
      if (stream === 0n) throw new ProtocolError('HELLO with stream 0');
      const firstUnacked = view.getBigUint64(17);
      if (firstUnacked === 0n) throw new ProtocolError('first unacked 0');
      return {
        type: 'hello',
        stream,
        firstUnacked,
        peerStream: parseStreamHex(ascii(25)),
        delivered: view.getBigUint64(41),
      };
    }
    default:
      return null;
  }
}

/** Joins encoded frames into one BATCH message (a single frame goes as it is). */
export function joinFrames(frames) {
  if (frames.length === 1) return frames[0];
  const size = 1 + frames.reduce((sum, frame) => sum + 2 + frame.length, 0);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  out[0] = BATCH;
  let at = 1;
  for (const frame of frames) {
    view.setUint16(at, frame.length);
    out.set(frame, at + 2);
    at += 2 + frame.length;
  }
  return out;
}

/** Splits a data channel message into its frames (one, or those of a BATCH). Throws if malformed. */
export function splitFrames(bytes) {
  if (bytes[0] !== BATCH) return [bytes];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const frames = [];
  let at = 1;
  while (at < bytes.length) {
    if (at + 2 > bytes.length) throw new ProtocolError('truncated BATCH length');
    const len = view.getUint16(at);
    at += 2;
    if (len === 0 || at + len > bytes.length) throw new ProtocolError('empty or truncated frame in BATCH');
    if (bytes[at] === BATCH) throw new ProtocolError('BATCH inside BATCH');
    frames.push(bytes.subarray(at, at + len));
    at += len;
  }
  return frames;
}

function toBase64(bytes) {
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function fromBase64(text) {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 !== 0) {
    throw new ProtocolError('not standard base64');
  }
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

/**
 * How a line is written: `{text, b64, size}` (size: its length inside the JSON string). Base64
 * when the payload is not UTF-8, contains `\n`, or would more than double when JSON-escaped.
 */
export function lineText(payload) {
  const b64Len = Math.ceil(payload.length / 3) * 4;
  let text = null;
  try {
    text = strictUtf8.decode(payload);
  } catch {
    text = null;
  }
  if (text !== null && !text.includes('\n')) {
    const escaped = escapedLen(payload);
    if (escaped <= 2 * payload.length) return { text, b64: false, size: escaped };
  }
  return { text: toBase64(payload), b64: true, size: b64Len };
}

/** Bytes of UTF-8 `payload` inside a JSON string (as the Rust client counts them). */
function escapedLen(payload) {
  let len = 0;
  for (const b of payload) {
    if (b === 0x22 || b === 0x5c || b === 0x0a || b === 0x0d || b === 0x09 || b === 0x08 || b === 0x0c) len += 2;
    else if (b < 0x20) len += 6;
    else len += 1;
  }
  return len;
}

/** The `m.room.message` content of a batch `{stream, seq, base, lines: [{more, payload}], ack?}`. */
export function encodeBatch(batch) {
  const texts = [];
  const more = [];
  const b64 = [];
  batch.lines.forEach((line, i) => {
    const written = lineText(line.payload);
    texts.push(written.text);
    if (line.more) more.push(i);
    if (written.b64) b64.push(i);
  });
  const field = { id: streamHex(batch.stream), seq: Number(batch.seq), base: Number(batch.base) };
  if (more.length) field.more = more;
  if (b64.length) field.b64 = b64;
  if (batch.ack) field.ack = { id: streamHex(batch.ack.stream), seq: Number(batch.ack.seq) };
  return { msgtype: 'm.text', body: texts.join('\n'), [STREAM_FIELD]: field };
}

function seqOf(value, what) {
  if (!Number.isSafeInteger(value) || value < 0) throw new ProtocolError(`${what} is not a count`);
  return BigInt(value);
}

function indexes(value, count) {
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value) || !value.every((i) => Number.isInteger(i) && i >= 0 && i < count)) {
    throw new ProtocolError('line index out of range');
  }
  return value;
}

function decodeAckField(value) {
  if (typeof value !== 'object' || value === null) throw new ProtocolError('ack is not an object');
  const stream = parseStreamHex(value.id);
  if (stream === 0n) throw new ProtocolError('ack of stream 0');
  return { stream, seq: seqOf(value.seq, 'ack seq') };
}

/**
 * Decodes an `m.room.message` to-device content: `null` when it is not `m.text` (not for this
 * layer), `{plain: [Uint8Array…]}` for a plain Raiden node's lines, or `{batch}`. Throws
 * ProtocolError when malformed (dropped whole).
 */
export function decodeContent(content) {
  if (!content || content.msgtype !== 'm.text') return null;
  if (typeof content.body !== 'string') throw new ProtocolError('no body');
  const field = content[STREAM_FIELD];
  if (field === undefined) {
    return { plain: content.body.split('\n').filter((line) => line.length > 0).map((line) => utf8.encode(line)) };
  }
  if (typeof field !== 'object' || field === null) throw new ProtocolError('stream field not an object');
  const stream = parseStreamHex(field.id);
  if (stream === 0n) throw new ProtocolError('stream 0');
  const seq = seqOf(field.seq, 'seq');
  const base = seqOf(field.base, 'base');
  if (seq === 0n || base === 0n || base > seq) throw new ProtocolError('seq and base start at 1, base ≤ seq');
  const texts = content.body.split('\n');
  const more = new Set(indexes(field.more, texts.length));
  const b64 = new Set(indexes(field.b64, texts.length));
  const lines = texts.map((text, i) => {
    const payload = b64.has(i) ? fromBase64(text) : utf8.encode(text);
    if (payload.length > FRAGMENT_SIZE) throw new ProtocolError('line over 16 KiB');
    return { more: more.has(i), payload };
  });
  const ack = field.ack === undefined || field.ack === null ? null : decodeAckField(field.ack);
  return { batch: { stream, seq, base, lines, ack } };
}

/** Decodes an `org.switchboard.ack` content. */
export function decodeAck(content) {
  return decodeAckField(content);
}

// ---------------------------------------------------------------------------------------------
// Delivery layer (sans-IO)

/** Defaults as docs/protocol.md's "Limits and defaults" (times in ms). */
export const DEFAULT_LIMITS = Object.freeze({
  replayBufferBytes: 1024 * 1024,
  reorderBufferBytes: 4 * 1024 * 1024,
  maxMessageBytes: 4 * 1024 * 1024,
  streamsPerPeer: 4,
  batchLines: 50,
  batchBodyBytes: 48 * 1024,
  ackDelay: 20,
  matrixAckDelay: 1000,
  ackAfterFragments: 32n,
  resendTimeout: 10_000,
  maxResendTimeout: 300_000,
  pingInterval: 5000,
  pingTimeout: 2000,
  deadAfter: 15_000,
});

/** The sender's half: stream, seqs, the bounded replay buffer, the resend timer. */
class Outgoing {
  constructor(stream, limits) {
    this.stream = stream;
    this.limits = limits;
    this.nextSeq = 1n;
    /** seq (BigInt) → {more, payload, sent, accepted}, in seq order (Map keeps insertion order). */
    this.buffer = new Map();
    this.bufferedBytes = 0;
    /** Seqs to send on the current transport. */
    this.pending = new Set();
    this.acked = 0n;
    this.peerSpeaks = false;
    this.round = 0;
    /** The lowest and highest seqs released without an ack and not acked since (null: none): a
     * HELLO names the lowest, not the base, so that the peer does not skip them. */
    this.releasedUnackedFrom = null;
    this.releasedUnackedUpto = 0n;
    this.timer = null;
    this.rto = null;
  }

  base() {
    for (const seq of this.buffer.keys()) return seq;
    return this.nextSeq;
  }

  /** What a HELLO says: the base, or lower when fragments below it were released without an ack. */
  helloFirstUnacked() {
    const base = this.base();
    return this.releasedUnackedFrom !== null && this.releasedUnackedFrom < base ? this.releasedUnackedFrom : base;
  }

  sortedPending() {
    return [...this.pending].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  }

  releasable() {
    if (this.peerSpeaks) return null;
    let upto = null;
    let bytes = 0;
    for (const [seq, fragment] of this.buffer) {
      if (!fragment.accepted) break;
      bytes += fragment.payload.length;
      if (!fragment.more) upto = { seq, bytes };
    }
    return upto;
  }

  fits(len) {
    return this.bufferedBytes + len <= this.limits.replayBufferBytes;
  }

  hasRoom(len) {
    const releasable = this.fits(len) ? 0 : (this.releasable()?.bytes ?? 0);
    return this.bufferedBytes - releasable + len <= this.limits.replayBufferBytes;
  }

  /** Queues a message; returns false when the buffer is full (throws when it can never fit). */
  push(now, message) {
    const len = message.length;
    if (len > this.limits.replayBufferBytes) {
      throw new RangeError(`message of ${len} bytes is larger than the replay buffer (${this.limits.replayBufferBytes} bytes)`);
    }
    if (!this.fits(len)) {
      const releasable = this.releasable();
      if (releasable) {
        this.releasedUnackedFrom ??= this.base();
        if (releasable.seq > this.releasedUnackedUpto) this.releasedUnackedUpto = releasable.seq;
        this.release(now, releasable.seq);
      }
      if (!this.fits(len)) return false;
    }
    this.bufferedBytes += len;
    if (len <= FRAGMENT_SIZE) {
      this.insert(false, message);
      return true;
    }
    let text = true;
    try {
      strictUtf8.decode(message);
    } catch {
      text = false;
    }
    let start = 0;
    while (start < len) {
      let end = Math.min(start + FRAGMENT_SIZE, len);
      // Cut UTF-8 at a character boundary (not before a continuation byte 10xxxxxx).
      if (text) while (end < len && end > start + 1 && (message[end] & 0xc0) === 0x80) end--;
      this.insert(end < len, message.subarray(start, end));
      start = end;
    }
    return true;
  }

  insert(more, payload) {
    const seq = this.nextSeq;
    this.nextSeq += 1n;
    this.buffer.set(seq, { more, payload, sent: false, accepted: false });
    this.pending.add(seq);
  }

  handOut(now, seq) {
    this.pending.delete(seq);
    const fragment = this.buffer.get(seq);
    if (!fragment) return null;
    fragment.sent = true;
    if (this.timer === null) this.timer = now;
    return fragment;
  }

  takeDcFrames(now, maxBytes) {
    const frames = [];
    let total = 0;
    for (const seq of this.sortedPending()) {
      const fragment = this.buffer.get(seq);
      if (!fragment) {
        this.pending.delete(seq);
        continue;
      }
      const size = fragment.payload.length + 10;
      if (frames.length && total + size > maxBytes) break;
      this.handOut(now, seq);
      frames.push(encodeFrame({ type: 'data', more: fragment.more, seq, payload: fragment.payload }));
      total += size;
    }
    return frames;
  }

  takeMatrixBatch(now, ack) {
    const sorted = this.sortedPending().filter((seq) => {
      if (this.buffer.has(seq)) return true;
      this.pending.delete(seq);
      return false;
    });
    if (!sorted.length) return null;
    const first = sorted[0];
    const lines = [];
    let body = 0;
    let seq = first;
    while (lines.length < this.limits.batchLines && this.pending.has(seq)) {
      const fragment = this.buffer.get(seq);
      if (!fragment) break;
      const size = lineText(fragment.payload).size + (lines.length ? 2 : 0);
      if (lines.length && body + size > this.limits.batchBodyBytes) break;
      body += size;
      lines.push({ more: fragment.more, payload: fragment.payload });
      seq += 1n;
    }
    for (let s = first; s < seq; s++) this.handOut(now, s);
    const count = lines.length;
    const content = encodeBatch({ stream: this.stream, seq: first, base: this.base(), lines, ack });
    let txnId = `sb.${streamHex(this.stream)}.${first}.${count}`;
    if (this.round > 0) txnId += `.${this.round}`;
    return { eventType: EVENT_MESSAGE, txnId, content, lines: { first, count }, ack };
  }

  onHomeserverAccepted(first, count) {
    for (let s = first; s < first + BigInt(count); s++) {
      const fragment = this.buffer.get(s);
      if (fragment) fragment.accepted = true;
    }
  }

  onMatrixFailed(first, count) {
    for (let s = first; s < first + BigInt(count); s++) if (this.buffer.has(s)) this.pending.add(s);
  }

  onAck(now, ack) {
    this.peerSpeaks = true;
    if (ack.stream !== this.stream || ack.seq <= this.acked) return false;
    this.acked = ack.seq < this.nextSeq - 1n ? ack.seq : this.nextSeq - 1n;
    // The peer has every fragment released without an ack once an ack covers the highest.
    if (this.releasedUnackedFrom !== null && this.releasedUnackedUpto <= this.acked) this.releasedUnackedFrom = null;
    return this.release(now, this.acked);
  }

  /** Releases whole messages up to `upto` (stopping at the end of a message). */
  release(now, upto) {
    let end = null;
    for (const [seq, fragment] of this.buffer) {
      if (seq > upto) break;
      if (!fragment.more) end = seq;
    }
    if (end === null) return false;
    for (const [seq, fragment] of this.buffer) {
      if (seq > end) break;
      this.bufferedBytes -= fragment.payload.length;
      this.buffer.delete(seq);
      this.pending.delete(seq);
    }
    this.rto = null;
    this.timer = [...this.buffer.values()].some((f) => f.sent) ? now : null;
    return true;
  }

  onPeerHello(now, hello) {
    this.peerSpeaks = true;
    if (hello.peerStream === this.stream) this.onAck(now, { stream: this.stream, seq: hello.delivered });
    this.pending = new Set(this.buffer.keys());
  }

  onChannelLost() {
    for (const [seq, fragment] of this.buffer) if (!fragment.accepted) this.pending.add(seq);
  }

  pollTimeout(now) {
    if (!this.peerSpeaks) return null;
    if (this.timer !== null) return this.timer + (this.rto ?? this.limits.resendTimeout);
    return [...this.buffer.values()].some((f) => f.sent) ? now : null;
  }

  handleTimeout(now) {
    if (this.buffer.size === 0) {
      this.timer = null;
      return;
    }
    if (!this.peerSpeaks) return;
    if (this.timer === null) {
      if ([...this.buffer.values()].some((f) => f.sent)) this.timer = now;
      return;
    }
    const rto = this.rto ?? this.limits.resendTimeout;
    if (now < this.timer + rto) return;
    this.round += 1;
    this.pending = new Set(this.buffer.keys());
    this.rto = Math.min(rto * 2, this.limits.maxResendTimeout);
    this.timer = now;
  }
}

function heldCost(line) {
  return line.payload.length + HELD_OVERHEAD;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** The receiver's half: per stream the next seq, the out-of-order buffer, reassembly, acks. */
class Incoming {
  constructor(limits) {
    this.limits = limits;
    /** Oldest first. */
    this.streams = [];
    this.dcStream = null;
    this.early = [];
    this.heldBytes = 0;
    /** Times everything undelivered was let go of (shed(): the client's memory budget across peers was exceeded). */
    this.sheds = 0;
  }

  /** Bytes held for the peer: the out-of-order buffer (and early DATA) and the messages being reassembled. */
  retainedBytes() {
    return this.heldBytes + this.streams.reduce((sum, s) => sum + s.partialBytes, 0);
  }

  /**
   * Lets go of everything not yet delivered: each stream goes back to the first fragment after its
   * last delivered message (and DATA held before a HELLO is dropped). Nothing undelivered was acked,
   * so a sender that speaks the protocol sends it all again (its resend timer); fragments it released
   * unacked (to a peer it did not know to speak the protocol) are lost. For a client over its memory
   * budget across peers.
   */
  shed() {
    for (const stream of this.streams) {
      stream.reorder.clear();
      stream.partial = [];
      stream.partialBytes = 0;
      stream.discarding = false;
      stream.next = stream.delivered + 1n;
    }
    this.early = [];
    this.heldBytes = 0;
    this.sheds += 1;
  }

  stream(id, start) {
    let found = this.streams.find((s) => s.id === id);
    if (found) return found;
    const first = start > 0n ? start : 1n;
    found = {
      id,
      next: first,
      delivered: first - 1n,
      ackedSent: first - 1n,
      ackForced: false,
      ackSince: null,
      reorder: new Map(),
      partial: [],
      partialBytes: 0,
      discarding: false,
    };
    this.streams.push(found);
    while (this.streams.length > Math.max(1, this.limits.streamsPerPeer)) {
      const old = this.streams.shift();
      for (const line of old.reorder.values()) this.heldBytes -= heldCost(line);
    }
    return found;
  }

  helloFields() {
    const last = this.streams[this.streams.length - 1];
    return last ? { peerStream: last.id, delivered: last.delivered } : { peerStream: 0n, delivered: 0n };
  }

  receiveBatch(now, batch, out) {
    const stream = this.stream(batch.stream, batch.base);
    this.moveUp(now, stream, batch.base, out);
    batch.lines.forEach((line, i) => this.accept(now, stream, batch.seq + BigInt(i), line, out));
  }

  moveUp(now, stream, base, out) {
    if (stream.next >= base) return;
    for (const [seq, line] of stream.reorder) {
      if (seq < base) {
        stream.reorder.delete(seq);
        this.heldBytes -= heldCost(line);
      }
    }
    stream.partial = [];
    stream.partialBytes = 0;
    stream.discarding = false;
    stream.next = base;
    stream.delivered = base - 1n;
    if (stream.ackedSent > stream.delivered) stream.ackedSent = stream.delivered;
    this.drain(now, stream, out);
  }

  onHello(now, hello, out) {
    this.dcStream = hello.stream;
    const stream = this.stream(hello.stream, hello.firstUnacked);
    this.moveUp(now, stream, hello.firstUnacked, out);
    const early = this.early;
    this.early = [];
    for (const { seq, line } of early) {
      this.heldBytes -= heldCost(line);
      this.accept(now, stream, seq, line, out);
    }
  }

  receiveDcData(now, seq, line, out) {
    if (this.dcStream === null) {
      const cost = heldCost(line);
      if (this.heldBytes + cost <= this.limits.reorderBufferBytes) {
        this.heldBytes += cost;
        this.early.push({ seq, line });
      }
      return;
    }
    this.accept(now, this.stream(this.dcStream, seq), seq, line, out);
  }

  onChannelLost() {
    this.dcStream = null;
    for (const { line } of this.early) this.heldBytes -= heldCost(line);
    this.early = [];
  }

  accept(now, stream, seq, line, out) {
    if (seq < stream.next || stream.reorder.has(seq)) {
      stream.ackForced = true;
      stream.ackSince ??= now;
      return;
    }
    if (seq > stream.next) {
      const cost = heldCost(line);
      if (this.heldBytes + cost <= this.limits.reorderBufferBytes) {
        this.heldBytes += cost;
        stream.reorder.set(seq, line);
      }
      return;
    }
    this.consume(now, stream, line, out);
    this.drain(now, stream, out);
  }

  drain(now, stream, out) {
    for (;;) {
      const line = stream.reorder.get(stream.next);
      if (!line) return;
      stream.reorder.delete(stream.next);
      this.heldBytes -= heldCost(line);
      this.consume(now, stream, line, out);
    }
  }

  consume(now, stream, line, out) {
    const seq = stream.next;
    stream.next += 1n;
    if (!stream.discarding && stream.partialBytes + line.payload.length > this.limits.maxMessageBytes) {
      stream.discarding = true;
      stream.partial = [];
      stream.partialBytes = 0;
    }
    if (stream.discarding) {
      if (!line.more) {
        stream.discarding = false;
        stream.delivered = seq;
        stream.ackSince ??= now;
      }
      return;
    }
    if (line.more) {
      stream.partial.push(line.payload);
      stream.partialBytes += line.payload.length;
      return;
    }
    const message = stream.partial.length ? concat([...stream.partial, line.payload]) : line.payload;
    stream.partial = [];
    stream.partialBytes = 0;
    out.push(message);
    stream.delivered = seq;
    stream.ackSince ??= now;
  }

  static ackPending(stream) {
    return stream.delivered > 0n && (stream.delivered > stream.ackedSent || stream.ackForced);
  }

  ackDue(stream, now, delay) {
    return (
      Incoming.ackPending(stream) &&
      (stream.delivered - (stream.ackedSent < stream.delivered ? stream.ackedSent : stream.delivered) >=
        this.limits.ackAfterFragments ||
        stream.ackSince === null ||
        now >= stream.ackSince + delay)
    );
  }

  static markAcked(stream) {
    stream.ackedSent = stream.delivered;
    stream.ackForced = false;
    stream.ackSince = null;
    return { stream: stream.id, seq: stream.delivered };
  }

  pollAcks(now, viaDc) {
    const acks = [];
    for (const stream of this.streams) {
      if (viaDc && stream.id !== this.dcStream) {
        // Not the channel's stream: a previous run of the peer, which holds nothing of it.
        if (Incoming.ackPending(stream)) Incoming.markAcked(stream);
        continue;
      }
      if (this.ackDue(stream, now, viaDc ? this.limits.ackDelay : this.limits.matrixAckDelay)) {
        acks.push(Incoming.markAcked(stream));
      }
    }
    return acks;
  }

  takeAck() {
    for (let i = this.streams.length - 1; i >= 0; i--) {
      if (Incoming.ackPending(this.streams[i])) return Incoming.markAcked(this.streams[i]);
    }
    return null;
  }

  ackLost(now, ack) {
    const stream = this.streams.find((s) => s.id === ack.stream);
    if (!stream) return;
    const before = ack.seq > 0n ? ack.seq - 1n : 0n;
    if (stream.ackedSent > before) stream.ackedSent = before;
    stream.ackForced = true;
    stream.ackSince ??= now;
  }

  nextAckDeadline(viaDc) {
    let next = null;
    const delay = viaDc ? this.limits.ackDelay : this.limits.matrixAckDelay;
    for (const stream of this.streams) {
      if (!Incoming.ackPending(stream) || (viaDc && stream.id !== this.dcStream)) continue;
      if (stream.ackSince === null) continue;
      const at = stream.ackSince + delay;
      if (next === null || at < next) next = at;
    }
    return next;
  }
}

/**
 * One peer's delivery state (sans-IO), the same rules as the Rust client's `reliable::Peer`.
 * Times are milliseconds on any monotonic clock, passed in as `now`.
 *
 *   push(now, bytes) → false when the replay buffer is full (retry after acks: backpressure)
 *   onChannelOpen(now) / onChannelLost() / dcState(now)
 *   receiveDc(now, Uint8Array) → messages now deliverable
 *   receiveMatrix(now, content) / receiveMatrixAck(now, content) → messages / nothing
 *   pollDc(now, maxBytes) → frames to write on the channel
 *   pollMatrix(now) → the next to-device send {eventType, txnId, content, lines, ack} or null
 *   onHomeserverAccepted(send) / onMatrixFailed(now, send)
 *   pollTimeout(now) / handleTimeout(now)
 */
export class ReliablePeer {
  constructor(stream, limits = DEFAULT_LIMITS) {
    if (typeof stream !== 'bigint' || stream <= 0n || stream > MAX_U64) throw new RangeError('stream id');
    this.limits = { ...DEFAULT_LIMITS, ...limits };
    this.outgoing = new Outgoing(stream, this.limits);
    this.incoming = new Incoming(this.limits);
    this.channel = null;
  }

  get stream() {
    return this.outgoing.stream;
  }

  push(now, message) {
    return this.outgoing.push(now, message);
  }

  hasRoom(len) {
    return this.outgoing.hasRoom(len);
  }

  /** The last round trip measured on the data channel (ms), or null. */
  rtt() {
    return this.channel?.rtt ?? null;
  }

  /** Bytes held for undelivered incoming messages (out of order, early, being reassembled). */
  retainedBytes() {
    return this.incoming.retainedBytes();
  }

  /** Lets go of all incoming fragments not yet delivered; the sender's resends bring them again. */
  shedIncoming() {
    this.incoming.shed();
  }

  onChannelOpen(now) {
    if (this.channel) this.onChannelLost();
    this.incoming.onChannelLost();
    this.channel = {
      opened: now,
      helloSent: false,
      peerHello: false,
      pongs: [],
      pingOut: null,
      lastPong: null,
      nextPing: null,
      rtt: null,
      nonce: 0n,
      stallResent: false,
    };
  }

  onChannelLost() {
    this.channel = null;
    this.incoming.onChannelLost();
    this.outgoing.onChannelLost();
  }

  /** 'closed' | 'handshake' | 'alive' | 'stalled' | 'dead'. */
  dcState(now) {
    const ch = this.channel;
    if (!ch) return 'closed';
    if (!ch.peerHello) return now >= ch.opened + this.limits.deadAfter ? 'dead' : 'handshake';
    if (ch.pingOut) {
      const since = ch.lastPong === null ? ch.pingOut.sent : Math.max(ch.lastPong, ch.pingOut.sent);
      if (now >= since + this.limits.deadAfter) return 'dead';
      if (now >= ch.pingOut.sent + this.limits.pingTimeout) return 'stalled';
    }
    return ch.lastPong === null ? 'handshake' : 'alive';
  }

  receiveDc(now, message) {
    const out = [];
    for (const bytes of splitFrames(message)) {
      const frame = decodeFrame(bytes);
      if (frame === null || !this.channel) continue;
      this.receiveFrame(now, frame, out);
    }
    return out;
  }

  receiveFrame(now, frame, out) {
    const ch = this.channel;
    switch (frame.type) {
      case 'data':
        this.incoming.receiveDcData(now, frame.seq, { more: frame.more, payload: frame.payload }, out);
        break;
      case 'ack':
        this.outgoing.onAck(now, { stream: this.outgoing.stream, seq: frame.seq });
        break;
      case 'ping':
        ch.pongs.push(frame.nonce);
        if (ch.pongs.length > 16) ch.pongs.shift();
        break;
      case 'pong':
        if (ch.pingOut && ch.pingOut.nonce === frame.nonce) {
          ch.rtt = now - ch.pingOut.sent;
          ch.pingOut = null;
          ch.stallResent = false;
          ch.lastPong = now;
          ch.nextPing = now + this.limits.pingInterval;
        }
        break;
      case 'hello':
        ch.peerHello = true;
        this.outgoing.onPeerHello(now, frame);
        this.incoming.onHello(now, frame, out);
        break;
      default:
        break;
    }
  }

  pollDc(now, maxBytes = BATCH_LIMIT) {
    const alive = this.dcState(now) === 'alive';
    const ch = this.channel;
    if (!ch) return [];
    const frames = [];
    if (!ch.helloSent) {
      ch.helloSent = true;
      const { peerStream, delivered } = this.incoming.helloFields();
      frames.push(
        encodeFrame({ type: 'hello', stream: this.outgoing.stream, firstUnacked: this.outgoing.helloFirstUnacked(), peerStream, delivered }),
      );
    }
    for (const nonce of ch.pongs) frames.push(encodeFrame({ type: 'pong', nonce }));
    ch.pongs = [];
    if (!ch.peerHello) return frames;
    for (const ack of this.incoming.pollAcks(now, true)) frames.push(encodeFrame({ type: 'ack', seq: ack.seq }));
    if (!ch.pingOut && (ch.nextPing === null || now >= ch.nextPing)) {
      ch.nonce += 1n;
      ch.pingOut = { nonce: ch.nonce, sent: now };
      frames.push(encodeFrame({ type: 'ping', nonce: ch.nonce }));
    }
    if (alive) {
      const used = frames.reduce((sum, f) => sum + f.length, 0);
      frames.push(...this.outgoing.takeDcFrames(now, Math.max(0, maxBytes - used)));
    }
    return frames;
  }

  pollMatrix(now) {
    if (this.outgoing.pending.size) {
      return this.outgoing.takeMatrixBatch(now, this.incoming.takeAck());
    }
    const [ack] = this.incoming.pollAcks(now, false);
    if (!ack) return null;
    return {
      eventType: EVENT_ACK,
      txnId: `sb-ack.${streamHex(ack.stream)}.${ack.seq}`,
      content: { id: streamHex(ack.stream), seq: Number(ack.seq) },
      lines: null,
      ack,
    };
  }

  onHomeserverAccepted(send) {
    if (send.lines) this.outgoing.onHomeserverAccepted(send.lines.first, send.lines.count);
  }

  onMatrixFailed(now, send) {
    if (send.lines) this.outgoing.onMatrixFailed(send.lines.first, send.lines.count);
    if (send.ack) this.incoming.ackLost(now, send.ack);
  }

  receiveMatrix(now, content) {
    const decoded = decodeContent(content);
    if (decoded === null) return [];
    if (decoded.plain) return decoded.plain;
    this.outgoing.peerSpeaks = true;
    if (decoded.batch.ack) this.outgoing.onAck(now, decoded.batch.ack);
    const out = [];
    this.incoming.receiveBatch(now, decoded.batch, out);
    return out;
  }

  receiveMatrixAck(now, content) {
    this.outgoing.onAck(now, decodeAck(content));
  }

  pollTimeout(now) {
    const state = this.dcState(now);
    const ch = this.channel;
    let channel = null;
    if (ch && state !== 'closed' && state !== 'dead') {
      if (!ch.peerHello) channel = ch.opened + this.limits.deadAfter;
      else if (state === 'stalled') channel = ch.pingOut ? ch.pingOut.sent + this.limits.deadAfter : null;
      else if (ch.pingOut) channel = ch.pingOut.sent + this.limits.pingTimeout;
      else channel = ch.nextPing ?? now;
    }
    const viaDc = Boolean(ch?.peerHello) && state !== 'dead';
    const acks = this.incoming.nextAckDeadline(viaDc);
    const times = [this.outgoing.pollTimeout(now), acks, channel].filter((t) => t !== null);
    return times.length ? Math.min(...times) : null;
  }

  handleTimeout(now) {
    this.outgoing.handleTimeout(now);
    if (this.dcState(now) === 'stalled' && this.channel && !this.channel.stallResent) {
      this.channel.stallResent = true;
      this.outgoing.onChannelLost();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The client (IO): Matrix /sync and to-device sends, Switchboard's WebSocket, peer connections

const ADDRESS = /^0x[0-9a-fA-F]{40}$/;
const RAIDEN_LOCALPART = /^@(0x[0-9a-f]{40}):/;
const API_VERSION = '1';
const RAIDEN_PARTY = 'raiden';
const SEEN_SIGNALS = 1024;
const CANDIDATES_PER_SIGNAL = 8;
/** A call whose channel is not open this long after it started is given up (and retried), as the Rust client does. */
const CALL_TIMEOUT = 30_000;
/** Answers to an invite that end its call (`glare` and `duplicate` do not: the broker's glare frame and the first invite decide). */
const INVITE_FAILURES = new Set(['unknown_peer', 'undeliverable', 'refused', 'late', 'invalid']);
/** Frames taken from the delivery layer per pump, at most (bytes). */
const DC_POLL_BYTES = 256 * 1024;
/** Bytes queued in the data channel above which the pump leaves frames in the delivery layer. */
const DC_BUFFERED_LIMIT = 1024 * 1024;

/** Bytes held for undelivered incoming messages across all peers, at most, by default (as the Rust client's `max_held_bytes`). */
const DEFAULT_MAX_HELD_BYTES = 64 * 1024 * 1024;

/** What went wrong, with a stable `code`: 'matrix', 'invalid_address', 'too_large', 'busy', 'stopped', 'switchboard', 'config'. */
export class SwitchboardError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'SwitchboardError';
    this.code = code;
  }
}

function isAddress(address) {
  return typeof address === 'string' && ADDRESS.test(address);
}

function trimSlash(url) {
  return String(url).replace(/\/+$/, '');
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function backoff(previous, { initial, max }) {
  return Math.min(max, previous === null ? initial : Math.max(initial, previous * 2));
}

function randomId(length = 24) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
  const bytes = new Uint8Array(length);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => alphabet[b % alphabet.length]).join('');
}

/** Reads the homeserver's well-known `org.switchboard.client.base_url`: null when there is none. */
export async function discoverSwitchboard(homeserver, fetchImpl = fetch) {
  let response;
  try {
    response = await fetchImpl(`${trimSlash(homeserver)}/.well-known/matrix/client`);
  } catch {
    return null;
  }
  if (!response.ok) return null;
  let document;
  try {
    document = await response.json();
  } catch {
    return null;
  }
  const key = document?.['org.switchboard.client'];
  if (key === undefined) return null;
  if (typeof key?.base_url !== 'string' || !/^https?:\/\//.test(key.base_url)) {
    throw new SwitchboardError('switchboard', 'org.switchboard.client in the well-known is malformed');
  }
  return trimSlash(key.base_url);
}

/**
 * Checks the token (whoami), starts the /sync loop and (in the background) connects to Switchboard:
 * `options.switchboard`, or the one the homeserver's well-known names (none: Matrix only).
 */
export async function connect(options) {
  const limits = { ...DEFAULT_LIMITS, ...options.limits };
  const needed = limits.maxMessageBytes + limits.reorderBufferBytes;
  const maxHeldBytes = options.maxHeldBytes ?? DEFAULT_MAX_HELD_BYTES;
  if (!(maxHeldBytes >= needed)) {
    // One peer may rightly hold this much; below it, a large message could never complete.
    throw new SwitchboardError(
      'config',
      `maxHeldBytes (${maxHeldBytes}) is below one peer's maxMessageBytes + reorderBufferBytes (${needed})`,
    );
  }
  const homeserver = trimSlash(options.homeserver);
  const whoami = await matrixRequest(homeserver, options.accessToken, 'GET', '/_matrix/client/v3/account/whoami');
  const switchboard =
    options.switchboard === undefined || options.switchboard === null
      ? await discoverSwitchboard(homeserver)
      : trimSlash(options.switchboard);
  const client = new SwitchboardClient({ ...options, homeserver }, whoami, switchboard);
  client.start();
  return client;
}

async function matrixRequest(homeserver, token, method, path, body, signal) {
  let response;
  try {
    response = await fetch(homeserver + path, {
      method,
      headers: { Authorization: `Bearer ${token}`, ...(body === undefined ? {} : { 'Content-Type': 'application/json' }) },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (error) {
    if (error?.name === 'AbortError') throw error;
    throw new SwitchboardError('matrix', `homeserver unreachable: ${error?.message ?? error}`);
  }
  const json = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new SwitchboardError('matrix', `${method} ${path.split('?')[0]}: ${response.status} ${json.errcode ?? ''}`);
    error.status = response.status;
    error.errcode = json.errcode;
    throw error;
  }
  return json;
}

/** A running client; see switchboard.d.ts for its events. */
export class SwitchboardClient extends EventTarget {
  constructor(options, whoami, switchboard) {
    super();
    this.options = {
      relayOnly: false,
      ordered: false,
      syncTimeout: 30_000,
      maxPeers: 10_000,
      maxWaitingSends: 1024,
      maxHeldBytes: DEFAULT_MAX_HELD_BYTES,
      upgradeBackoff: { initial: 1000, max: 30_000 },
      reconnectBackoff: { initial: 1000, max: 30_000 },
      matrixBackoff: { initial: 1000, max: 30_000 },
      limits: {},
      ...options,
    };
    this.options.maxHeldBytes ??= DEFAULT_MAX_HELD_BYTES;
    this.userId = whoami.user_id;
    this.deviceId = whoami.device_id ?? null;
    this.partyId = this.deviceId ?? 'switchboard';
    this.serverName = this.userId.slice(this.userId.indexOf(':') + 1);
    this.switchboardUrl = switchboard;
    this.peers = new Map();
    /** Bytes held for undelivered incoming messages across peers (bounded by maxHeldBytes). */
    this.heldBytes = 0;
    this.watched = new Map();
    this.seenSignals = new Set();
    /** Frame id of an invite of ours → its call, until Switchboard answers the frame. */
    this.invites = new Map();
    this.firstSyncDone = false;
    this.heldInvites = [];
    this.ws = null;
    this.ready = null;
    this.iceServers = null;
    this.frameId = 0;
    this.stopped = false;
    this.abort = new AbortController();
    this.timers = new Set();
  }

  /** The address this user provably holds, as Switchboard's `ready` said (null before). */
  get address() {
    return this.ready?.address ?? null;
  }

  start() {
    this.syncLoop();
    if (this.switchboardUrl) this.connectSwitchboard(null);
    this.ticker = setInterval(() => this.pumpAll(), 10);
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  later(ms, fn) {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      if (!this.stopped) fn();
    }, ms);
    this.timers.add(timer);
  }

  peer(address, create = true) {
    if (!isAddress(address)) throw new SwitchboardError('invalid_address', `not an address: ${address}`);
    const key = address.toLowerCase();
    let peer = this.peers.get(key);
    if (!peer && create) {
      if (this.peers.size >= this.options.maxPeers) throw new SwitchboardError('busy', 'too many peers');
      peer = {
        key,
        address,
        userId: `@${key}:${this.serverName}`,
        // A stream of its own per peer (docs/protocol.md): txn ids are `sb.<stream>.<seq>.<lines>`, and
        // the homeserver takes a txn id once per device, so a stream shared by two peers would have
        // the second peer's batches taken as retries of the first's, and never delivered.
        reliable: new ReliablePeer(randomStreamId(), this.options.limits),
        want: false,
        link: null,
        inflight: null,
        matrixRetryAt: 0,
        matrixWait: null,
        waiters: [],
        upgradeWait: null,
        callAt: null,
        channelsUp: 0,
        dcDataFrames: 0,
        matrixLines: 0,
        calls: 0,
        // This peer's share of this.heldBytes, as last accounted.
        heldBytes: 0,
      };
      this.peers.set(key, peer);
    }
    return peer ?? null;
  }

  // --- API ---------------------------------------------------------------------------------

  /** Watches `address`: its presence comes as `presence` events while Switchboard is connected. */
  async watch(address) {
    this.checkRunning();
    if (!isAddress(address)) throw new SwitchboardError('invalid_address', `not an address: ${address}`);
    this.watched.set(address.toLowerCase(), address);
    if (this.ready) this.sendFrame({ type: 'watch', addresses: [address] });
  }

  /** Wants a data channel to `address`: this side calls, and calls again whenever it dies, until close(). */
  async open(address) {
    this.checkRunning();
    const peer = this.peer(address);
    peer.want = true;
    peer.callAt ??= 0;
    this.pump(peer);
  }

  /** Sends bytes (or a string, as UTF-8) to `address`; resolves once it is in the replay buffer. */
  async send(address, data) {
    this.checkRunning();
    const bytes = typeof data === 'string' ? utf8.encode(data) : new Uint8Array(data);
    const peer = this.peer(address);
    const limit = peer.reliable.limits.replayBufferBytes;
    if (bytes.length > limit) {
      throw new SwitchboardError('too_large', `message of ${bytes.length} bytes is larger than the replay buffer (${limit} bytes)`);
    }
    if (!peer.waiters.length && peer.reliable.push(performance.now(), bytes)) {
      this.pump(peer);
      return;
    }
    if (peer.waiters.length >= this.options.maxWaitingSends) {
      throw new SwitchboardError('busy', 'too many sends waiting for room to this peer');
    }
    await new Promise((resolve, reject) => peer.waiters.push({ bytes, resolve, reject }));
  }

  /** Hangs up the channel to `address` and stops calling it; messages still flow through Matrix. */
  async close(address) {
    const peer = this.peer(address, false);
    if (!peer) return;
    peer.want = false;
    peer.callAt = null;
    const link = peer.link;
    if (link) {
      this.signal(peer, link, 'm.call.hangup', { reason: 'user_hangup' });
      this.linkLost(peer, link, 'closed by the application');
    }
  }

  /** Drops the channel to `address` as a failure would (no hangup); for tests. */
  async resetChannel(address) {
    const peer = this.peer(address, false);
    if (peer?.link) this.linkLost(peer, peer.link, 'reset');
  }

  /** The figures of `address`, or null. */
  stats(address) {
    const peer = this.peer(address, false);
    if (!peer) return null;
    const now = performance.now();
    return {
      dcState: peer.reliable.dcState(now),
      path: peer.link?.up ? peer.link.path : null,
      rttMs: peer.link?.up ? peer.reliable.rtt() : null,
      channelsUp: peer.channelsUp,
      calls: peer.calls,
      dcDataFrames: peer.dcDataFrames,
      matrixLines: peer.matrixLines,
      replayBufferedBytes: peer.reliable.outgoing.bufferedBytes,
    };
  }

  /** Stops: hangs up channels, closes the WebSocket, ends /sync. Waiting sends are rejected. */
  async shutdown() {
    if (this.stopped) return;
    for (const peer of this.peers.values()) {
      if (peer.link) {
        this.signal(peer, peer.link, 'm.call.hangup', { reason: 'user_hangup' });
        this.linkLost(peer, peer.link, 'client stopped');
      }
      for (const waiter of peer.waiters) waiter.reject(new SwitchboardError('stopped', 'the client has stopped'));
      peer.waiters = [];
    }
    this.stopped = true;
    clearInterval(this.ticker);
    for (const timer of this.timers) clearTimeout(timer);
    this.abort.abort();
    this.ws?.close(1000);
  }

  checkRunning() {
    if (this.stopped) throw new SwitchboardError('stopped', 'the client has stopped');
  }

  // --- Matrix --------------------------------------------------------------------------------

  async syncLoop() {
    const filter = encodeURIComponent(
      JSON.stringify({ room: { rooms: [] }, presence: { not_types: ['*'] }, account_data: { not_types: ['*'] } }),
    );
    let since = null;
    let wait = null;
    while (!this.stopped) {
      const timeout = since === null ? 0 : this.options.syncTimeout;
      const query = `?timeout=${timeout}&filter=${filter}${since === null ? '' : `&since=${encodeURIComponent(since)}`}`;
      let answer;
      try {
        answer = await matrixRequest(this.options.homeserver, this.options.accessToken, 'GET', `/_matrix/client/v3/sync${query}`, undefined, this.abort.signal);
      } catch (error) {
        if (this.stopped) return;
        if (error.status === 401) {
          this.emit('syncstopped', { reason: error.message });
          return;
        }
        wait = backoff(wait, this.options.matrixBackoff);
        await sleep(wait);
        continue;
      }
      wait = null;
      since = answer.next_batch;
      for (const event of answer.to_device?.events ?? []) this.handleToDevice(event);
      if (!this.firstSyncDone) {
        this.firstSyncDone = true;
        const held = this.heldInvites;
        this.heldInvites = [];
        this.replaying = true;
        for (const frame of held) this.handleSignal(frame);
        this.replaying = false;
      }
    }
  }

  handleToDevice(event) {
    const match = RAIDEN_LOCALPART.exec(event.sender ?? '');
    if (!match || (event.type !== EVENT_MESSAGE && event.type !== EVENT_ACK)) return;
    let peer;
    try {
      peer = this.peer(match[1]);
    } catch {
      return;
    }
    const now = performance.now();
    try {
      if (event.type === EVENT_ACK) {
        peer.reliable.receiveMatrixAck(now, event.content);
      } else {
        this.deliver(peer, peer.reliable.receiveMatrix(now, event.content));
      }
    } catch (error) {
      console.debug('switchboard: a to-device message dropped:', error.message);
    }
    this.accountHeld(peer);
    this.keepHeldBytesBounded();
    this.pump(peer);
  }

  deliver(peer, messages) {
    for (const bytes of messages) this.emit('message', { address: peer.address, bytes });
  }

  /** Brings `peer`'s share of the bytes held for undelivered incoming messages up to date. */
  accountHeld(peer) {
    const held = peer.reliable.retainedBytes();
    this.heldBytes += held - peer.heldBytes;
    peer.heldBytes = held;
  }

  /**
   * Past maxHeldBytes across peers, the peers holding the most let go of what they hold undelivered
   * (their senders send it again), largest first, until the total is within it.
   */
  keepHeldBytesBounded() {
    // Bounded: each pass empties one peer's share.
    for (let pass = 0; pass < this.peers.size; pass++) {
      if (this.heldBytes <= this.options.maxHeldBytes) return;
      let peer = null;
      for (const candidate of this.peers.values()) if (!peer || candidate.heldBytes > peer.heldBytes) peer = candidate;
      if (!peer) return;
      console.warn(
        `switchboard: maxHeldBytes reached (${this.heldBytes} bytes held); ${peer.address}'s undelivered fragments (${peer.heldBytes} bytes) are let go`,
      );
      peer.reliable.shedIncoming();
      this.accountHeld(peer);
    }
  }

  sendMatrix(peer, send) {
    peer.inflight = send;
    const path = `/_matrix/client/v3/sendToDevice/${encodeURIComponent(send.eventType)}/${encodeURIComponent(send.txnId)}`;
    const body = { messages: { [peer.userId]: { '*': send.content } } };
    matrixRequest(this.options.homeserver, this.options.accessToken, 'PUT', path, body, this.abort.signal).then(
      () => {
        peer.inflight = null;
        peer.matrixWait = null;
        peer.reliable.onHomeserverAccepted(send);
        if (send.lines) peer.matrixLines += send.lines.count;
        this.pump(peer);
      },
      () => {
        if (this.stopped) return;
        // Retried with the same txn id: the homeserver takes it once.
        peer.matrixWait = backoff(peer.matrixWait, this.options.matrixBackoff);
        this.later(peer.matrixWait, () => this.sendMatrix(peer, send));
      },
    );
  }

  // --- the pump: timers, frames, Matrix sends, waiting senders -----------------------------

  pumpAll() {
    for (const peer of this.peers.values()) this.pump(peer);
  }

  pump(peer) {
    if (this.stopped) return;
    const now = performance.now();
    const reliable = peer.reliable;
    reliable.handleTimeout(now);
    while (peer.waiters.length && reliable.hasRoom(peer.waiters[0].bytes.length)) {
      const waiter = peer.waiters.shift();
      reliable.push(now, waiter.bytes);
      waiter.resolve();
    }
    const link = peer.link;
    if (link && !link.open && now >= link.createdAt + CALL_TIMEOUT) {
      this.linkLost(peer, link, 'no channel in time');
      return;
    }
    const state = reliable.dcState(now);
    if (link?.open) {
      if (state === 'dead') {
        this.linkLost(peer, link, 'data channel silent');
      } else {
        if (state === 'alive' && !link.up) this.channelUp(peer, link);
        // The channel's own buffer is bounded too; a stalled channel's acks go through Matrix.
        if (state !== 'stalled' && link.dc.bufferedAmount < DC_BUFFERED_LIMIT) {
          this.writeFrames(peer, link, reliable.pollDc(now, DC_POLL_BYTES));
        }
      }
    }
    const alive = reliable.dcState(now) === 'alive';
    if (!peer.inflight && (!alive || reliable.outgoing.pending.size === 0)) {
      const send = reliable.pollMatrix(now);
      if (send) this.sendMatrix(peer, send);
    }
    if (peer.want && !peer.link && peer.callAt !== null && now >= peer.callAt) this.call(peer);
  }

  writeFrames(peer, link, frames) {
    let batch = [];
    let size = 1;
    const flush = () => {
      if (!batch.length) return;
      try {
        link.dc.send(joinFrames(batch));
      } catch {
        this.linkLost(peer, link, 'data channel send failed');
      }
      batch = [];
      size = 1;
    };
    for (const frame of frames) {
      if (frame[0] === DATA) peer.dcDataFrames += 1;
      if (batch.length && size + 2 + frame.length > BATCH_LIMIT) flush();
      batch.push(frame);
      size += 2 + frame.length;
    }
    flush();
  }

  async channelUp(peer, link) {
    link.up = true;
    peer.channelsUp += 1;
    peer.upgradeWait = null;
    // Unknown only if the stats have no selected pair yet; relay-only ICE has no other path.
    link.path = (await pathOf(link.pc)) ?? (this.options.relayOnly ? 'relay' : 'direct');
    if (peer.link !== link) return;
    link.announced = true;
    this.emit('channelup', { address: peer.address, path: link.path });
  }

  // --- Switchboard's WebSocket -------------------------------------------------------------

  connectSwitchboard(previousWait) {
    if (this.stopped) return;
    const url = `${this.switchboardUrl.replace(/^http/, 'ws')}/_switchboard/client/v1/connect`;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch {
      this.reconnect(previousWait, 1000);
      return;
    }
    this.ws = ws;
    const pending = { lastPong: performance.now(), keepalive: null };
    ws.onopen = () => ws.send(JSON.stringify({ type: 'auth', token: this.options.accessToken }));
    ws.onmessage = (message) => {
      pending.lastPong = performance.now();
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      if (frame.type === 'ready') {
        previousWait = null;
        this.onReady(frame, ws, pending);
      } else {
        this.onFrame(frame);
      }
    };
    ws.onclose = (close) => {
      clearInterval(pending.keepalive);
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.ready) {
        this.ready = null;
        this.emit('switchboard', { connected: false });
      }
      if (close.code === 4001) {
        console.warn('switchboard: the token was refused; not reconnecting');
        return;
      }
      this.reconnect(previousWait, close.code);
    };
  }

  reconnect(previousWait, code) {
    const wait = code === 1012 ? 0 : backoff(previousWait, this.options.reconnectBackoff);
    this.later(wait + Math.random() * Math.min(wait / 4, 250), () => this.connectSwitchboard(wait || null));
  }

  onReady(frame, ws, pending) {
    this.ready = frame;
    this.iceServers = frame.ice_servers;
    const every = Math.max(5, frame.limits?.keepalive_secs ?? 20) * 1000;
    pending.keepalive = setInterval(() => {
      if (performance.now() - pending.lastPong > every + 10_000) {
        ws.close(4000, 'no pong');
        return;
      }
      this.sendFrame({ type: 'ping' });
    }, every);
    this.emit('switchboard', { connected: true });
    if (this.watched.size) this.sendFrame({ type: 'watch', addresses: [...this.watched.values()] });
    for (const peer of this.peers.values()) if (peer.want) peer.callAt ??= 0;
  }

  sendFrame(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return null;
    this.frameId += 1;
    this.ws.send(JSON.stringify({ id: this.frameId, ...frame }));
    return this.frameId;
  }

  onFrame(frame) {
    switch (frame.type) {
      case 'ice_servers':
        this.iceServers = frame;
        break;
      case 'presence': {
        const { type, ...presence } = frame;
        this.emit('presence', presence);
        break;
      }
      case 'signal':
        this.handleSignal(frame);
        break;
      case 'glare':
      case 'call_ended':
        for (const peer of this.peers.values()) {
          if (peer.link && !peer.link.open && peer.link.callId === frame.call_id) {
            this.linkLost(peer, peer.link, frame.type === 'glare' ? 'glare' : `call ${frame.outcome}`);
          }
        }
        break;
      case 'error':
        console.debug('switchboard: error frame', frame.code, frame.message);
        this.onInviteAnswer(frame);
        break;
      case 'delivered':
        this.onInviteAnswer(frame);
        break;
      default:
        break;
    }
  }

  // --- calls ---------------------------------------------------------------------------------

  signal(peer, link, eventType, fields) {
    const content = { call_id: link.callId, party_id: this.partyId, version: API_VERSION, ...fields };
    const id = this.sendFrame({ type: 'signal', to: link.to, call_id: link.callId, event_type: eventType, content });
    if (id !== null && eventType === 'm.call.invite') {
      // Its answer (`delivered` or `error`) tells whether the call can go on.
      this.invites.set(id, { peer, link });
      if (this.invites.size > 256) this.invites.delete(this.invites.keys().next().value);
    }
  }

  /** An invite of ours that Switchboard could not deliver ends its call at once (retried after the backoff). */
  onInviteAnswer(frame) {
    const invite = this.invites.get(frame.ref);
    if (!invite) return;
    this.invites.delete(frame.ref);
    if (frame.type === 'error' && INVITE_FAILURES.has(frame.code)) {
      this.linkLost(invite.peer, invite.link, `invite not delivered: ${frame.code}`);
    }
  }

  newLink(peer, callId, caller, to) {
    const ice = this.iceServers;
    const servers = ice ? [{ urls: ice.uris, username: ice.username, credential: ice.password }] : [];
    const pc = new RTCPeerConnection({
      iceServers: servers,
      iceTransportPolicy: this.options.relayOnly ? 'relay' : 'all',
    });
    const link = { pc, dc: null, callId, caller, to, createdAt: performance.now(), open: false, up: false, announced: false, path: null, described: false, early: [], candidates: [], started: false, flushing: false, remoteParty: null };
    pc.onicecandidate = (event) => {
      link.candidates.push(event.candidate);
      this.flushCandidates(peer, link);
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === 'failed' || pc.connectionState === 'closed') this.linkLost(peer, link, `peer connection ${pc.connectionState}`);
    };
    peer.link = link;
    return link;
  }

  flushCandidates(peer, link) {
    if (!link.started || link.flushing || peer.link !== link) return;
    link.flushing = true;
    queueMicrotask(() => {
      link.flushing = false;
      while (link.candidates.length && peer.link === link) {
        const batch = link.candidates.splice(0, CANDIDATES_PER_SIGNAL);
        const list = batch.map((candidate) =>
          candidate
            ? { candidate: candidate.candidate, sdpMid: candidate.sdpMid ?? '0', sdpMLineIndex: candidate.sdpMLineIndex ?? 0 }
            : { candidate: '', sdpMid: '0', sdpMLineIndex: 0 },
        );
        this.signal(peer, link, 'm.call.candidates', { candidates: list });
      }
    });
  }

  attachChannel(peer, link, dc) {
    link.dc = dc;
    dc.binaryType = 'arraybuffer';
    dc.onopen = () => {
      if (peer.link !== link) return;
      link.open = true;
      peer.reliable.onChannelOpen(performance.now());
      this.sendFrame({ type: 'connected', call_id: link.callId });
      this.pump(peer);
    };
    dc.onmessage = (event) => {
      if (peer.link !== link || !(event.data instanceof ArrayBuffer)) return;
      try {
        this.deliver(peer, peer.reliable.receiveDc(performance.now(), new Uint8Array(event.data)));
      } catch (error) {
        console.debug('switchboard: a data channel message dropped:', error.message);
      }
      this.accountHeld(peer);
      this.keepHeldBytesBounded();
      this.pump(peer);
    };
    dc.onclose = () => this.linkLost(peer, link, 'data channel closed');
  }

  async call(peer) {
    if (!this.ready || !this.firstSyncDone || (this.options.relayOnly && !this.iceServers)) return;
    peer.callAt = null;
    peer.calls += 1;
    const link = this.newLink(peer, randomId(), true, peer.address);
    try {
      const dc = link.pc.createDataChannel(CHANNEL_LABEL, { ordered: this.options.ordered });
      this.attachChannel(peer, link, dc);
      const offer = await link.pc.createOffer();
      await link.pc.setLocalDescription(offer);
      if (peer.link !== link) return;
      this.signal(peer, link, 'm.call.invite', { lifetime: 60_000, offer: { type: 'offer', sdp: offer.sdp } });
      link.started = true;
      this.flushCandidates(peer, link);
    } catch (error) {
      console.debug('switchboard: call failed', error.message);
      this.linkLost(peer, link, 'call failed');
    }
  }

  handleSignal(frame) {
    // The address Switchboard verified; until it has (a user that has just published its
    // profile), the one its user id claims, as for Matrix messages (the Rust and Python clients do
    // the same). Dropping the signal instead lost a fresh peer's first call for 30 s.
    const address = isAddress(frame.from_address)
      ? frame.from_address
      : RAIDEN_LOCALPART.exec(frame.from ?? '')?.[1];
    if (!isAddress(address)) return;
    const { 'org.switchboard.origin': _origin, ...content } = frame.content ?? {};
    const key = `${frame.from}|${frame.call_id}|${frame.event_type}|${JSON.stringify(content)}`;
    if (this.seenSignals.has(key) && !this.replaying) return;
    this.seenSignals.add(key);
    if (this.seenSignals.size > SEEN_SIGNALS) this.seenSignals.delete(this.seenSignals.values().next().value);
    let peer;
    try {
      peer = this.peer(address);
    } catch {
      return;
    }
    if (peer.address !== address && peer.address.toLowerCase() === peer.address) peer.address = address;
    // Until the first /sync is handled, an invite waits, and so do the signals of its call that
    // follow it (its candidates): all are handled in order afterwards.
    if (!this.firstSyncDone && (frame.event_type === 'm.call.invite' || this.heldInvites.some((held) => held.call_id === frame.call_id))) {
      if (this.heldInvites.length < 64) this.heldInvites.push(frame);
      return;
    }
    const link = peer.link?.callId === frame.call_id ? peer.link : null;
    switch (frame.event_type) {
      case 'm.call.invite':
        this.answer(peer, frame, content);
        break;
      case 'm.call.answer':
        if (link?.caller && !link.described) this.onAnswer(peer, link, content);
        break;
      case 'm.call.candidates':
        if (link) this.onCandidates(link, content.candidates);
        break;
      case 'm.call.select_answer':
        if (link && !link.caller && content.selected_party_id !== this.partyId) this.linkLost(peer, link, 'another device answered');
        break;
      case 'm.call.hangup':
      case 'm.call.reject':
        if (link) this.linkLost(peer, link, 'peer hung up');
        break;
      default:
        break;
    }
  }

  async onAnswer(peer, link, content) {
    const sdp = content.answer?.sdp;
    if (typeof sdp !== 'string') return;
    try {
      await link.pc.setRemoteDescription({ type: 'answer', sdp });
      link.described = true;
      link.remoteParty = content.party_id ?? 'legacy';
      for (const candidate of link.early.splice(0)) await link.pc.addIceCandidate(candidate).catch(() => {});
      if (link.remoteParty !== RAIDEN_PARTY) this.signal(peer, link, 'm.call.select_answer', { selected_party_id: link.remoteParty });
    } catch (error) {
      console.debug('switchboard: answer not usable', error.message);
      this.linkLost(peer, link, 'answer not usable');
    }
  }

  onCandidates(link, candidates) {
    if (!Array.isArray(candidates)) return;
    for (const c of candidates) {
      if (typeof c?.candidate !== 'string' || c.candidate === '') continue;
      const init = { candidate: c.candidate, sdpMid: typeof c.sdpMid === 'string' ? c.sdpMid : '0', sdpMLineIndex: Number.isInteger(c.sdpMLineIndex) ? c.sdpMLineIndex : 0 };
      if (link.described) link.pc.addIceCandidate(init).catch(() => {});
      else if (link.early.length < 256) link.early.push(init);
    }
  }

  async answer(peer, frame, content) {
    const sdp = content.offer?.sdp;
    if (typeof sdp !== 'string' || (this.options.relayOnly && !this.iceServers)) return;
    const ours = peer.link;
    if (ours) {
      if (ours.callId === frame.call_id) return;
      // Glare: the broker keeps the lower call id; a newer invite replaces an open channel.
      if (ours.caller && !ours.open && ours.callId < frame.call_id) return;
      this.linkLost(peer, ours, 'replaced by a new call');
    }
    const link = this.newLink(peer, frame.call_id, false, frame.from);
    link.pc.ondatachannel = (event) => {
      if (event.channel.label === CHANNEL_LABEL && !link.dc) this.attachChannel(peer, link, event.channel);
    };
    try {
      await link.pc.setRemoteDescription({ type: 'offer', sdp });
      link.described = true;
      link.remoteParty = content.party_id ?? 'legacy';
      const answer = await link.pc.createAnswer();
      await link.pc.setLocalDescription(answer);
      if (peer.link !== link) return;
      this.signal(peer, link, 'm.call.answer', { answer: { type: 'answer', sdp: answer.sdp } });
      link.started = true;
      for (const candidate of link.early.splice(0)) await link.pc.addIceCandidate(candidate).catch(() => {});
      this.flushCandidates(peer, link);
    } catch (error) {
      console.debug('switchboard: invite not answered', error.message);
      this.linkLost(peer, link, 'invite not usable');
    }
  }

  linkLost(peer, link, reason) {
    if (peer.link !== link) return;
    peer.link = null;
    console.debug(`switchboard: call ${link.callId} to ${peer.address} ended: ${reason}`);
    try {
      link.dc?.close();
      link.pc.close();
    } catch {
      // already closed
    }
    if (link.open) peer.reliable.onChannelLost();
    if (link.announced) this.emit('channeldown', { address: peer.address, reason });
    if (peer.want && !this.stopped) {
      peer.upgradeWait = backoff(link.up ? null : peer.upgradeWait, this.options.upgradeBackoff);
      peer.callAt = performance.now() + peer.upgradeWait;
    }
    this.pump(peer);
  }
}

/** "relay" when the selected candidate pair goes through TURN on either side, else "direct". */
async function pathOf(pc) {
  try {
    const stats = await pc.getStats();
    let pairId = null;
    stats.forEach((report) => {
      if (report.type === 'transport' && report.selectedCandidatePairId) pairId = report.selectedCandidatePairId;
    });
    let pair = pairId ? stats.get(pairId) : null;
    if (!pair) {
      stats.forEach((report) => {
        if (report.type === 'candidate-pair' && report.state === 'succeeded' && report.nominated) pair = report;
      });
    }
    if (!pair) return null;
    const local = stats.get(pair.localCandidateId);
    const remote = stats.get(pair.remoteCandidateId);
    return local?.candidateType === 'relay' || remote?.candidateType === 'relay' ? 'relay' : 'direct';
  } catch {
    return null;
  }
}
