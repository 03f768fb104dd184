// Unit tests of the browser client's delivery layer (sans-IO): the byte examples of
// docs/protocol.md, the Matrix content rules, and two peers over a simulated network that
// reorders, delays, fails and cuts, in stepped time, over many seeds. Run: node --test (Node 20+);
// tests/client_browser.rs runs it too.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  ReliablePeer, encodeFrame, decodeFrame, joinFrames, splitFrames, encodeBatch, decodeContent,
  ProtocolError, FRAGMENT_SIZE, BATCH_LIMIT, lineText, discoverSwitchboard, connect, SwitchboardClient,
  SwitchboardError, DEFAULT_LIMITS,
} from './switchboard.js';

const hex = (bytes) => Buffer.from(bytes).toString('hex');
const text = (s) => new TextEncoder().encode(s);

test('frames are the bytes of docs/protocol.md', () => {
  assert.equal(hex(encodeFrame({ type: 'data', more: false, seq: 5n, payload: text('hi') })), '010000000000000000056869');
  const hello = encodeFrame({ type: 'hello', stream: 0xa1n, firstUnacked: 1n, peerStream: 0n, delivered: 0n });
  assert.equal(hex(hello), '05' + hex(text('00000000000000a1')) + '0000000000000001' + hex(text('0000000000000000')) + '0000000000000000');
  assert.deepEqual(decodeFrame(hello), { type: 'hello', stream: 0xa1n, firstUnacked: 1n, peerStream: 0n, delivered: 0n });
  const big = (1n << 64n) - 1n;
  assert.deepEqual(decodeFrame(encodeFrame({ type: 'ping', nonce: big })), { type: 'ping', nonce: big });
  assert.equal(decodeFrame(Uint8Array.of(0x7f, 1, 2)), null, 'an unknown type is ignored');
});

test('malformed frames are errors', () => {
  for (const bad of [
    new Uint8Array(0),
    Uint8Array.of(0x02, 0, 0),
    Uint8Array.of(0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0), // seq 0
    new Uint8Array(10 + FRAGMENT_SIZE + 1).fill(1, 0, 1),
    Uint8Array.of(0x06, 0, 5, 1), // truncated BATCH
    Uint8Array.of(0x06, 0, 0), // empty frame in BATCH
  ]) {
    assert.throws(() => splitFrames(bad).forEach(decodeFrame), ProtocolError, hex(bad));
  }
  const hello = encodeFrame({ type: 'hello', stream: 1n, firstUnacked: 1n, peerStream: 0n, delivered: 0n });
  hello[1] = 0x7a; // 'z'
  assert.throws(() => decodeFrame(hello), ProtocolError);
});

test('BATCH joins and splits frames', () => {
  const frames = [encodeFrame({ type: 'ack', seq: 3n }), encodeFrame({ type: 'pong', nonce: 9n })];
  const joined = joinFrames(frames);
  assert.equal(joined[0], 0x06);
  assert.deepEqual(splitFrames(joined).map(hex), frames.map(hex));
  assert.equal(joinFrames([frames[0]]), frames[0], 'a frame alone goes as it is');
});

test('Matrix content: the example of docs/protocol.md, base64 lines, bad contents', () => {
  const content = encodeBatch({
    stream: 0xa1n, seq: 7n, base: 4n,
    lines: [{ more: false, payload: text('{"type":"Processed"}') }, { more: false, payload: text('{"type":"Delivered"}') }, { more: true, payload: Uint8Array.of(0x80, 0x80, 0x80, 0x80) }],
    ack: { stream: 0xb2n, seq: 12n },
  });
  assert.deepEqual(content, {
    msgtype: 'm.text',
    body: '{"type":"Processed"}\n{"type":"Delivered"}\ngICAgA==',
    'org.switchboard.stream': { id: '00000000000000a1', seq: 7, base: 4, more: [2], b64: [2], ack: { id: '00000000000000b2', seq: 12 } },
  });
  const { batch } = decodeContent(content);
  assert.equal(batch.seq, 7n);
  assert.deepEqual([...batch.lines[2].payload], [0x80, 0x80, 0x80, 0x80]);
  assert.deepEqual(decodeContent({ msgtype: 'm.text', body: 'a\n\nb' }).plain.map((l) => new TextDecoder().decode(l)), ['a', 'b']);
  assert.equal(decodeContent({ msgtype: 'm.notice', body: '{}' }), null);
  const field = content['org.switchboard.stream'];
  for (const bad of [{ ...field, base: 8 }, { ...field, seq: 0 }, { ...field, more: [3] }, { ...field, id: 'xyz' }]) {
    assert.throws(() => decodeContent({ ...content, 'org.switchboard.stream': bad }), ProtocolError);
  }
  assert.throws(() => decodeContent({ ...content, body: 'a\nb\n!!!' }), ProtocolError, 'bad base64');
});

test('lines are base64 when not UTF-8, with a newline, or more than doubled by escaping', () => {
  assert.deepEqual(lineText(text('{"a":"é"}')), { text: '{"a":"é"}', b64: false, size: 14 });
  assert.equal(lineText(text('a\nb')).b64, true);
  assert.equal(lineText(Uint8Array.of(0xff)).b64, true);
  assert.equal(lineText(Uint8Array.of(1, 2, 3)).b64, true, 'control characters: 6 bytes each escaped');
  assert.deepEqual(lineText(new Uint8Array(0)), { text: '', b64: false, size: 0 });
});

test('the well-known names Switchboard, or nothing; a malformed key is an error', async () => {
  const answer = (status, body) => async () => ({ ok: status === 200, json: async () => body });
  const key = 'org.switchboard.client';
  assert.equal(await discoverSwitchboard('https://hs', answer(200, { [key]: { base_url: 'https://sb/' } })), 'https://sb');
  assert.equal(await discoverSwitchboard('https://hs', answer(200, { 'm.homeserver': {} })), null);
  assert.equal(await discoverSwitchboard('https://hs', answer(404, {})), null);
  assert.equal(await discoverSwitchboard('https://hs', async () => { throw new TypeError('down'); }), null);
  await assert.rejects(discoverSwitchboard('https://hs', answer(200, { [key]: { base_url: 7 } })));
});

test('a full replay buffer refuses (backpressure) until an ack releases', () => {
  const a = new ReliablePeer(1n, { replayBufferBytes: 100 });
  assert.equal(a.push(0, new Uint8Array(60)), true);
  assert.equal(a.push(0, new Uint8Array(60)), false);
  assert.throws(() => a.push(0, new Uint8Array(101)), RangeError);
  const send = a.pollMatrix(0);
  assert.equal(send.txnId, 'sb.0000000000000001.1.1');
  a.receiveMatrixAck(1, { id: '0000000000000001', seq: 1 });
  assert.equal(a.push(1, new Uint8Array(60)), true);
});

/** Writes each side's frames to the other at once, `steps` times 10 ms; returns the time reached. */
function exchange(a, b, t, steps, gotB, until = () => false) {
  for (let i = 0; i < steps && !until(); i++) {
    t += 10;
    for (const [from, to] of [[a, b], [b, a]]) {
      from.handleTimeout(t);
      for (const frame of from.pollDc(t)) {
        const got = to.receiveDc(t, frame);
        if (to === b) gotB.push(...got);
      }
    }
  }
  return t;
}

test('shedding what is held undelivered loses nothing the sender still holds', () => {
  const a = new ReliablePeer(1n);
  const b = new ReliablePeer(2n);
  const gotB = [];
  a.onChannelOpen(0);
  b.onChannelOpen(0);
  let t = exchange(a, b, 0, 20, gotB);
  assert.equal(a.dcState(t), 'alive');
  // A large message (7 fragments) between two small ones.
  const big = Uint8Array.from({ length: 100 * 1024 }, (_, i) => (i * 7 + 0x80) & 0xff);
  const sent = [text('first'), big, text('last')];
  for (const m of sent) assert.equal(a.push(t, m), true);
  const data = a.pollDc(t, 1 << 20).filter((frame) => decodeFrame(frame).type === 'data');
  assert.equal(data.length, 9);
  // B takes the first message, half of the large one, and the last one out of order.
  for (const frame of [...data.slice(0, 4), data[8]]) gotB.push(...b.receiveDc(t, frame));
  assert.deepEqual(gotB, sent.slice(0, 1));
  assert.ok(b.retainedBytes() > 3 * FRAGMENT_SIZE, String(b.retainedBytes()));

  b.shedIncoming();
  assert.deepEqual([b.retainedBytes(), b.incoming.sheds], [0, 1]);
  // What is still in flight arrives, then the sender's resend timer brings the rest: every
  // message once, in order, the large one intact.
  for (const frame of data.slice(4, 8)) gotB.push(...b.receiveDc(t, frame));
  t = exchange(a, b, t, 6000, gotB, () => gotB.length === 3 && a.outgoing.bufferedBytes === 0);
  assert.deepEqual(gotB, sent);
  assert.equal(a.outgoing.bufferedBytes, 0);
  assert.ok(a.outgoing.round >= 1, 'the sender resent on its timer');
  assert.equal(b.retainedBytes(), 0);
});

test('retainedBytes counts out-of-order, early and half-reassembled fragments', () => {
  const b = new ReliablePeer(2n);
  const batch = (seq, lines) => encodeBatch({ stream: 5n, seq, base: 1n, lines, ack: null });
  const bytes = (n) => new Uint8Array(n).fill(0x61);
  assert.equal(b.retainedBytes(), 0);
  // Out of order: payload plus 64 per fragment.
  assert.deepEqual(b.receiveMatrix(0, batch(3n, [{ more: false, payload: bytes(10) }])), []);
  assert.equal(b.retainedBytes(), 10 + 64);
  // Being reassembled: the payload.
  assert.deepEqual(b.receiveMatrix(0, batch(1n, [{ more: true, payload: bytes(20) }])), []);
  assert.equal(b.retainedBytes(), 10 + 64 + 20);
  // Delivered: nothing held.
  const out = b.receiveMatrix(0, batch(2n, [{ more: false, payload: bytes(5) }]));
  assert.deepEqual(out.map((m) => m.length), [25, 10]);
  assert.equal(b.retainedBytes(), 0);
  // DATA on a channel before its HELLO is held too, and shed.
  b.onChannelOpen(0);
  b.receiveDc(0, encodeFrame({ type: 'data', more: false, seq: 1n, payload: bytes(7) }));
  assert.equal(b.retainedBytes(), 7 + 64);
  b.shedIncoming();
  assert.equal(b.retainedBytes(), 0);
  assert.equal(b.incoming.sheds, 1);
});

test('the client sheds the peers holding the most past maxHeldBytes; connect refuses a budget below one peer', async () => {
  const warn = console.warn;
  console.warn = () => {};
  try {
    const client = new SwitchboardClient({ homeserver: 'https://hs', accessToken: 't', maxHeldBytes: 300 }, { user_id: '@me:hs' }, null);
    client.pump = () => {};
    const bytes = (n) => new Uint8Array(n).fill(0x62);
    const event = (address, seq, n) => ({
      sender: `@${address}:hs`,
      type: 'm.room.message',
      content: encodeBatch({ stream: 9n, seq, base: 1n, lines: [{ more: false, payload: bytes(n) }], ack: null }),
    });
    const small = '0x' + '1'.repeat(40);
    const large = '0x' + '2'.repeat(40);
    client.handleToDevice(event(small, 2n, 36)); // 100 held
    client.handleToDevice(event(large, 2n, 136)); // 200 held: 300 in all, within
    assert.equal(client.heldBytes, 300);
    client.handleToDevice(event(large, 3n, 36)); // 400 in all: the larger peer lets go
    assert.equal(client.heldBytes, 100);
    assert.equal(client.peer(large).reliable.retainedBytes(), 0);
    assert.equal(client.peer(large).reliable.incoming.sheds, 1);
    assert.equal(client.peer(small).reliable.retainedBytes(), 100);
    assert.equal(client.peer(small).heldBytes, 100);
  } finally {
    console.warn = warn;
  }
  const below = DEFAULT_LIMITS.maxMessageBytes + DEFAULT_LIMITS.reorderBufferBytes - 1;
  await assert.rejects(connect({ homeserver: 'https://hs.invalid', accessToken: 't', maxHeldBytes: below }), (error) => {
    assert.ok(error instanceof SwitchboardError);
    assert.equal(error.code, 'config');
    assert.match(error.message, /maxHeldBytes/);
    return true;
  });
});

function prng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function message(rand, side, i) {
  const kind = rand();
  const head = `${side}${i}:`;
  if (kind < 0.05) return text(head + 'é'.repeat(Math.floor(rand() * 30000)));
  if (kind < 0.1) return concatBytes(text(head), Uint8Array.from({ length: Math.floor(rand() * 40000) }, () => Math.floor(rand() * 256)));
  if (kind < 0.15) return text(head + 'line\nbreak');
  return text(head + 'x'.repeat(Math.floor(rand() * 200)));
}

function concatBytes(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

/** Two peers over a simulated network, in stepped time; returns what each delivered. */
function simulate(seed) {
  const rand = prng(seed);
  const limits = { replayBufferBytes: 256 * 1024, resendTimeout: 2000 };
  const side = (name, stream) => ({ name, peer: new ReliablePeer(stream, limits), sent: [], got: [], queue: [], txns: new Set() });
  const a = side('a', BigInt(seed) * 2n + 1n);
  const b = side('b', BigInt(seed) * 2n + 2n);
  const toOther = (s) => (s === a ? b : a);
  let channel = null; // {id, open}
  let nextChannelAt = 200;
  let flight = []; // {at, to, bytes, channel} data channel messages, reordered by delay
  const matrix = { a: [], b: [] }; // FIFO per recipient: {at, content, type}
  const total = 60;
  let t = 0;
  const step = 5;
  const quietAfter = 40_000;
  while (t < quietAfter + 60_000) {
    t += step;
    const sending = t < quietAfter;
    for (const s of [a, b]) {
      if (sending && s.sent.length < total && rand() < 0.05) s.queue.push(message(rand, s.name, s.sent.length + s.queue.length));
      while (s.queue.length && s.peer.hasRoom(s.queue[0].length)) {
        const m = s.queue.shift();
        assert.equal(s.peer.push(t, m), true);
        s.sent.push(m);
      }
    }
    // The channel comes and goes while sending; it stays up at the end.
    if (!channel && t >= nextChannelAt) {
      channel = { id: t };
      a.peer.onChannelOpen(t);
      b.peer.onChannelOpen(t);
    } else if (channel && sending && rand() < 0.002) {
      channel = null;
      a.peer.onChannelLost();
      b.peer.onChannelLost();
      nextChannelAt = t + 100 + rand() * 3000;
    }
    // Deliveries due.
    const due = flight.filter((f) => f.at <= t);
    flight = flight.filter((f) => f.at > t);
    for (const f of due) {
      if (!channel || f.channel !== channel.id) continue; // lost with its channel
      f.to.got.push(...f.to.peer.receiveDc(t, f.bytes));
    }
    for (const s of [a, b]) {
      const q = matrix[s.name];
      while (q.length && q[0].at <= t) {
        const m = q.shift();
        if (m.type === 'org.switchboard.ack') s.peer.receiveMatrixAck(t, m.content);
        else s.got.push(...s.peer.receiveMatrix(t, m.content));
      }
    }
    for (const s of [a, b]) {
      const p = s.peer;
      p.handleTimeout(t);
      if (channel && p.dcState(t) === 'dead') {
        channel = null;
        a.peer.onChannelLost();
        b.peer.onChannelLost();
        nextChannelAt = t + 500;
      }
      if (channel) {
        const frames = p.pollDc(t, BATCH_LIMIT);
        // Stalls: sometimes a channel holds its messages for seconds.
        const stall = rand() < 0.01 ? 2500 : 0;
        for (let i = 0; i < frames.length; ) {
          const batch = [];
          let size = 1;
          while (i < frames.length && (!batch.length || size + 2 + frames[i].length <= BATCH_LIMIT)) {
            size += 2 + frames[i].length;
            batch.push(frames[i++]);
          }
          flight.push({ at: t + 1 + rand() * 20 + stall, to: toOther(s), bytes: joinFrames(batch), channel: channel.id });
        }
      }
      const send = p.dcState(t) !== 'alive' || p.outgoing.pending.size === 0 ? p.pollMatrix(t) : null;
      if (send) {
        const r = rand();
        if (r < 0.1) {
          p.onMatrixFailed(t, send); // refused
        } else {
          if (!s.txns.has(send.txnId)) {
            s.txns.add(send.txnId);
            const q = matrix[toOther(s).name];
            const last = q.length ? q[q.length - 1].at : t;
            q.push({ at: Math.max(last, t + 20 + rand() * 300), content: structuredClone(send.content), type: send.eventType });
          }
          if (r < 0.15) p.onMatrixFailed(t, send); // accepted, but the answer was lost: retried
          else p.onHomeserverAccepted(send);
        }
      }
    }
    if (t > quietAfter && a.got.length === total && b.got.length === total && a.peer.outgoing.bufferedBytes === 0 && b.peer.outgoing.bufferedBytes === 0) break;
  }
  return { a, b };
}

test('exactly once and in order over a network that reorders, fails and cuts (200 seeds)', () => {
  for (let seed = 1; seed <= 200; seed++) {
    const { a, b } = simulate(seed);
    for (const [from, to] of [[a, b], [b, a]]) {
      assert.equal(to.got.length, from.sent.length, `seed ${seed}: ${from.name} → ${to.name} count`);
      from.sent.forEach((m, i) => assert.deepEqual(to.got[i], m, `seed ${seed}: ${from.name} → ${to.name} message ${i}`));
    }
  }
});
