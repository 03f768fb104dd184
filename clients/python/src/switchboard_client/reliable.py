"""Sans-IO exactly-once, in-order delivery of messages to one peer across two transports: a WebRTC
data channel and Matrix to-device messages (docs/protocol.md, "Messages between clients").

A port of the Rust client's ``src/client/reliable``: no IO, no clock, no randomness. Every input
that depends on time takes ``now`` (seconds, any monotonic origin) and the caller asks
:meth:`Peer.poll_timeout` when to come back::

    application send            -> push(now, message)   (raises Full: wait; has_room(len) tells when)
    data channel opened         -> on_channel_open(now)
    data channel binary message -> receive_dc(now, bytes)        -> messages for the application
    data channel closed / Dead  -> on_channel_lost()
    m.room.message to-device    -> receive_matrix(now, content)  -> messages
    org.switchboard.ack         -> receive_matrix_ack(now, content)
    a channel is open           -> poll_dc(now, room): HELLO, PONG, ACK, PING, and DATA when Alive
    dc_state(now) != Alive      -> poll_matrix(now): to-device sends for the peer's devices "*"
    homeserver answered 200     -> on_homeserver_accepted(first_seq, lines)
    send given up after retries -> on_matrix_failed(now, send)
    sleep until poll_timeout    -> handle_timeout(now), then poll again
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import Any

from . import codec
from .codec import Ack, AckFrame, Batch, Data, Hello, Line, Ping, Pong

HELD_OVERHEAD = 64


@dataclass
class Limits:
    """Bounds and timings; the defaults are the documented ones."""

    replay_buffer_bytes: int = 1024 * 1024
    reorder_buffer_bytes: int = 4 * 1024 * 1024
    max_message_bytes: int = 4 * 1024 * 1024
    streams_per_peer: int = 4
    batch_lines: int = 50
    batch_body_bytes: int = 48 * 1024
    ack_delay: float = 0.020
    matrix_ack_delay: float = 1.0
    ack_after_fragments: int = 32
    resend_timeout: float = 10.0
    max_resend_timeout: float = 300.0
    ping_interval: float = 5.0
    ping_timeout: float = 2.0
    dead_after: float = 15.0


class Transport(enum.Enum):
    DATA_CHANNEL = "data_channel"
    MATRIX = "matrix"


class DcState(enum.Enum):
    CLOSED = "closed"
    HANDSHAKE = "handshake"
    ALIVE = "alive"
    STALLED = "stalled"
    DEAD = "dead"


class PushError(Exception):
    """Why :meth:`Outgoing.push` did not take a message."""


class Full(PushError):
    """The replay buffer has no room now: wait until acks release some (backpressure)."""


class TooLarge(PushError):
    """Larger than the whole replay buffer: it can never be sent."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"message of {length} bytes is larger than the replay buffer ({limit} bytes)")
        self.length = length
        self.limit = limit


@dataclass
class ToDevice:
    """A to-device message for all the peer's devices, with this txn id (retries reuse it)."""

    event_type: str
    txn_id: str
    content: dict[str, Any]
    lines: tuple[int, int] | None = None
    ack: Ack | None = None


def generate_stream_id() -> int:
    """A random non-zero 64-bit stream id."""
    while True:
        n = secrets.randbits(64)
        if n:
            return n


@dataclass
class _Fragment:
    more: bool
    payload: bytes
    sent: bool = False
    accepted: bool = False


@dataclass
class OutgoingCounters:
    messages_pushed: int = 0
    fragments_sent: int = 0
    fragments_resent: int = 0
    resend_timeouts: int = 0
    released_unacked: int = 0


class Outgoing:
    """The sender's state for one peer: one stream, seqs 1, 2, 3... per fragment. ``buffer`` holds
    every fragment not released (its lowest seq, the base, always starts a message); ``pending`` is
    what the next drain hands out, lowest seq first."""

    def __init__(self, stream: int, limits: Limits) -> None:
        self.stream = stream
        self.next_seq = 1
        self.buffer: dict[int, _Fragment] = {}  # insertion order = seq order
        self.buffered_bytes = 0
        self.pending: set[int] = set()
        self.acked = 0
        self.peer_speaks = False
        self.round = 0
        # The lowest and highest seqs released without an ack and not acked since: a HELLO names
        # the lowest, not the base, so that the peer does not skip them (docs/protocol.md, HELLO).
        self.released_unacked_from: int | None = None
        self.released_unacked_upto = 0
        self.limits = limits
        self.counters = OutgoingCounters()
        self._timer: float | None = None
        self._rto: float | None = None

    def base(self) -> int:
        return next(iter(self.buffer), self.next_seq)

    def hello_first_unacked(self) -> int:
        """The base, or lower when fragments below it were released without an ack."""
        base = self.base()
        return base if self.released_unacked_from is None else min(self.released_unacked_from, base)

    def has_pending(self) -> bool:
        return bool(self.pending)

    def _fits(self, length: int) -> bool:
        return self.buffered_bytes + length <= self.limits.replay_buffer_bytes

    def has_room(self, length: int) -> bool:
        releasable = 0
        if not self._fits(length):
            found = self._releasable()
            releasable = found[1] if found else 0
        return self.buffered_bytes - releasable + length <= self.limits.replay_buffer_bytes

    def push(self, now: float, message: bytes) -> None:
        length = len(message)
        limit = self.limits.replay_buffer_bytes
        if length > limit:
            raise TooLarge(length, limit)
        if not self._fits(length):
            found = self._releasable()
            if found is not None:
                upto = found[0]
                self.counters.released_unacked += sum(1 for s in self.buffer if s <= upto)
                if self.released_unacked_from is None:
                    self.released_unacked_from = self.base()
                self.released_unacked_upto = max(self.released_unacked_upto, upto)
                self._release(now, upto)
            if not self._fits(length):
                raise Full(f"replay buffer full ({self.buffered_bytes} of {limit} bytes, message of {length})")
        self.buffered_bytes += length
        if length <= codec.FRAGMENT_SIZE:
            self._insert(False, bytes(message))
        else:
            for more, piece in _split(bytes(message)):
                self._insert(more, piece)
        self.counters.messages_pushed += 1

    def _insert(self, more: bool, payload: bytes) -> None:
        seq = self.next_seq
        self.next_seq += 1
        self.buffer[seq] = _Fragment(more, payload)
        self.pending.add(seq)

    def _hand_out(self, now: float, seq: int) -> _Fragment | None:
        self.pending.discard(seq)
        fragment = self.buffer.get(seq)
        if fragment is None:
            return None
        self.counters.fragments_sent += 1
        if fragment.sent:
            self.counters.fragments_resent += 1
        fragment.sent = True
        if self._timer is None:
            self._timer = now
        return fragment

    def take_dc_frames(self, now: float, max_bytes: int) -> list[bytes]:
        """DATA frames of the pending fragments, lowest seq first, up to about ``max_bytes``."""
        frames: list[bytes] = []
        total = 0
        for seq in sorted(self.pending):
            fragment = self.buffer.get(seq)
            if fragment is None:
                self.pending.discard(seq)
                continue
            size = len(fragment.payload) + codec.DATA_HEADER
            if frames and total + size > max_bytes:
                break
            self._hand_out(now, seq)
            frames.append(codec.encode_frame(Data(fragment.more, seq, fragment.payload)))
            total += size
        return frames

    def take_matrix_batch(self, now: float, ack: Ack | None) -> ToDevice | None:
        """The next Matrix batch of consecutive pending fragments from the lowest, with ``ack``."""
        for seq in sorted(self.pending):
            if seq in self.buffer:
                break
            self.pending.discard(seq)
        if not self.pending:
            return None
        first = min(self.pending)
        lines: list[Line] = []
        body = 0
        seq = first
        while (not lines or len(lines) < self.limits.batch_lines) and seq in self.pending:
            fragment = self.buffer.get(seq)
            if fragment is None:
                break
            size = codec.line_text(fragment.payload)[2] + (2 if lines else 0)
            if lines and body + size > self.limits.batch_body_bytes:
                break
            body += size
            lines.append(Line(fragment.more, fragment.payload))
            seq += 1
        for s in range(first, seq):
            self._hand_out(now, s)
        count = len(lines)
        batch = Batch(self.stream, first, self.base(), lines, ack)
        txn_id = f"sb.{codec.stream_hex(self.stream)}.{first}.{count}"
        if self.round > 0:
            txn_id += f".{self.round}"
        return ToDevice(codec.EVENT_MESSAGE, txn_id, codec.encode_batch(batch), (first, count), ack)

    def on_homeserver_accepted(self, first_seq: int, count: int) -> None:
        for seq in range(first_seq, first_seq + count):
            fragment = self.buffer.get(seq)
            if fragment is not None:
                fragment.accepted = True

    def _releasable(self) -> tuple[int, int] | None:
        if self.peer_speaks:
            return None
        upto = None
        total = 0
        for seq, fragment in self.buffer.items():
            if not fragment.accepted:
                break
            total += len(fragment.payload)
            if not fragment.more:
                upto = (seq, total)
        return upto

    def on_matrix_failed(self, first_seq: int, count: int) -> None:
        self.pending.update(s for s in range(first_seq, first_seq + count) if s in self.buffer)

    def on_ack(self, now: float, ack: Ack) -> bool:
        self.peer_speaks = True
        if ack.stream != self.stream or ack.seq <= self.acked:
            return False
        self.acked = min(ack.seq, self.next_seq - 1)
        if self.released_unacked_from is not None and self.released_unacked_upto <= self.acked:
            self.released_unacked_from = None  # the peer has them all
        return self._release(now, self.acked)

    def _release(self, now: float, upto: int) -> bool:
        end = None
        for seq, fragment in self.buffer.items():
            if seq > upto:
                break
            if not fragment.more:
                end = seq
        if end is None:
            return False
        released = [seq for seq in self.buffer if seq <= end]
        if not released:
            return False
        for seq in released:
            self.buffered_bytes -= len(self.buffer.pop(seq).payload)
            self.pending.discard(seq)
        self._rto = None
        self._timer = now if any(f.sent for f in self.buffer.values()) else None
        return True

    def on_peer_speaks(self) -> None:
        self.peer_speaks = True

    def on_peer_hello(self, now: float, hello: Hello) -> None:
        self.peer_speaks = True
        if hello.peer_stream == self.stream:
            self.on_ack(now, Ack(self.stream, hello.delivered))
        self.pending = set(self.buffer)

    def on_channel_lost(self) -> None:
        self.pending.update(seq for seq, f in self.buffer.items() if not f.accepted)

    def poll_timeout(self, now: float) -> float | None:
        if not self.peer_speaks:
            return None
        if self._timer is not None:
            return self._timer + (self._rto or self.limits.resend_timeout)
        return now if any(f.sent for f in self.buffer.values()) else None

    def handle_timeout(self, now: float) -> None:
        if not self.buffer:
            self._timer = None
            return
        if not self.peer_speaks:
            return
        if self._timer is None:
            if any(f.sent for f in self.buffer.values()):
                self._timer = now
            return
        rto = self._rto or self.limits.resend_timeout
        if now < self._timer + rto:
            return
        self.counters.resend_timeouts += 1
        self.round += 1
        self.pending = set(self.buffer)
        self._rto = min(rto * 2, self.limits.max_resend_timeout)
        self._timer = now


def _split(message: bytes) -> list[tuple[bool, bytes]]:
    """Fragments of at most 16 KiB, cut at character boundaries when ``message`` is UTF-8."""
    try:
        message.decode("utf-8")
        text = True
    except UnicodeDecodeError:
        text = False
    pieces = []
    start = 0
    while start < len(message):
        end = min(start + codec.FRAGMENT_SIZE, len(message))
        if text:
            # A UTF-8 continuation byte is 0b10xxxxxx: not a character boundary.
            while end > start + 1 and end < len(message) and message[end] & 0xC0 == 0x80:
                end -= 1
        pieces.append((end < len(message), message[start:end]))
        start = end
    return pieces


@dataclass
class IncomingCounters:
    messages_delivered: int = 0
    duplicates_dropped: int = 0
    out_of_order_dropped: int = 0
    oversized_dropped: int = 0
    streams_forgotten: int = 0
    sheds: int = 0
    """Times everything undelivered was let go of (:meth:`Incoming.shed`: the client's memory
    budget across peers, ``ClientConfig.max_held_bytes``, was exceeded)."""


def _held_cost(line: Line) -> int:
    return len(line.payload) + HELD_OVERHEAD


@dataclass
class _InStream:
    id: int
    next: int
    delivered: int
    acked_sent: int
    ack_forced: bool = False
    ack_since: float | None = None
    reorder: dict[int, Line] = field(default_factory=dict)
    partial: bytearray = field(default_factory=bytearray)
    discarding: bool = False

    @classmethod
    def new(cls, stream: int, start: int) -> _InStream:
        start = max(start, 1)
        return cls(stream, start, start - 1, start - 1)

    def ack_pending(self) -> bool:
        return self.delivered > 0 and (self.delivered > self.acked_sent or self.ack_forced)

    def owe_ack(self, now: float) -> None:
        if self.ack_since is None:
            self.ack_since = now


class Incoming:
    """The receiver's state for one peer."""

    def __init__(self, limits: Limits) -> None:
        self.streams: list[_InStream] = []
        self.dc_stream: int | None = None
        self.early: list[tuple[int, Line]] = []
        self.held_bytes = 0
        self.limits = limits
        self.counters = IncomingCounters()

    def retained_bytes(self) -> int:
        """Bytes this half holds for the peer: the out-of-order buffer (and DATA held before a
        HELLO; payload plus 64 per fragment) and the messages being reassembled."""
        return self.held_bytes + sum(len(s.partial) for s in self.streams)

    def shed(self) -> None:
        """Lets go of everything not yet delivered: each stream goes back to the first fragment
        after its last delivered message, dropping its out-of-order buffer and the message being
        reassembled (and DATA held before a HELLO). Nothing is acked that was not delivered, so a
        sender that speaks the protocol sends it all again (its resend timer); fragments it
        released unacked (towards a peer it did not know to speak the protocol) are lost. For a
        client over its memory budget across peers (``ClientConfig.max_held_bytes``)."""
        for stream in self.streams:
            stream.reorder.clear()
            stream.partial = bytearray()
            stream.discarding = False
            stream.next = stream.delivered + 1
        self.early = []
        self.held_bytes = 0
        self.counters.sheds += 1

    def delivered(self, stream: int) -> int | None:
        return next((s.delivered for s in self.streams if s.id == stream), None)

    def hello_fields(self) -> tuple[int | None, int]:
        if not self.streams:
            return None, 0
        return self.streams[-1].id, self.streams[-1].delivered

    def _index(self, stream: int, start: int) -> int:
        for i, s in enumerate(self.streams):
            if s.id == stream:
                return i
        self.streams.append(_InStream.new(stream, start))
        while len(self.streams) > max(self.limits.streams_per_peer, 1):
            old = self.streams.pop(0)
            self.held_bytes -= sum(_held_cost(line) for line in old.reorder.values())
            self.counters.streams_forgotten += 1
        return len(self.streams) - 1

    def receive_content(self, now: float, content: codec.Content) -> list[bytes]:
        if isinstance(content, codec.Plain):
            self.counters.messages_delivered += len(content.lines)
            return list(content.lines)
        return self.receive_batch(now, content)

    def receive_batch(self, now: float, batch: Batch) -> list[bytes]:
        i = self._index(batch.stream, batch.base)
        out: list[bytes] = []
        self._move_up(now, i, batch.base, out)
        for offset, line in enumerate(batch.lines):
            self._accept(now, i, batch.seq + offset, line, out)
        return out

    def _move_up(self, now: float, i: int, base: int, out: list[bytes]) -> None:
        stream = self.streams[i]
        if stream.next >= base:
            return
        for seq in [s for s in stream.reorder if s < base]:
            self.held_bytes -= _held_cost(stream.reorder.pop(seq))
        stream.partial = bytearray()
        stream.discarding = False
        stream.next = base
        stream.delivered = base - 1
        stream.acked_sent = min(stream.acked_sent, stream.delivered)
        self._drain_reorder(now, i, out)

    def on_hello(self, now: float, hello: Hello) -> list[bytes]:
        self.dc_stream = hello.stream
        i = self._index(hello.stream, hello.first_unacked)
        out: list[bytes] = []
        self._move_up(now, i, hello.first_unacked, out)
        early, self.early = self.early, []
        for seq, line in early:
            self.held_bytes -= _held_cost(line)
            self._accept(now, i, seq, line, out)
        return out

    def receive_dc_data(self, now: float, seq: int, line: Line) -> list[bytes]:
        out: list[bytes] = []
        if self.dc_stream is None:
            cost = _held_cost(line)
            if self.held_bytes + cost > self.limits.reorder_buffer_bytes:
                self.counters.out_of_order_dropped += 1
            else:
                self.held_bytes += cost
                self.early.append((seq, line))
            return out
        i = self._index(self.dc_stream, seq)
        self._accept(now, i, seq, line, out)
        return out

    def on_channel_lost(self) -> None:
        self.dc_stream = None
        for _, line in self.early:
            self.held_bytes -= _held_cost(line)
        self.early = []

    def _accept(self, now: float, i: int, seq: int, line: Line, out: list[bytes]) -> None:
        stream = self.streams[i]
        if seq < stream.next or seq in stream.reorder:
            self.counters.duplicates_dropped += 1
            stream.ack_forced = True
            stream.owe_ack(now)
            return
        if seq > stream.next:
            cost = _held_cost(line)
            if self.held_bytes + cost > self.limits.reorder_buffer_bytes:
                self.counters.out_of_order_dropped += 1
            else:
                self.held_bytes += cost
                stream.reorder[seq] = line
            return
        self._consume(now, i, line, out)
        self._drain_reorder(now, i, out)

    def _drain_reorder(self, now: float, i: int, out: list[bytes]) -> None:
        stream = self.streams[i]
        while stream.next in stream.reorder:
            line = stream.reorder.pop(stream.next)
            self.held_bytes -= _held_cost(line)
            self._consume(now, i, line, out)

    def _consume(self, now: float, i: int, line: Line, out: list[bytes]) -> None:
        stream = self.streams[i]
        seq = stream.next
        stream.next += 1
        if not stream.discarding and len(stream.partial) + len(line.payload) > self.limits.max_message_bytes:
            stream.discarding = True
            stream.partial = bytearray()
            self.counters.oversized_dropped += 1
        if stream.discarding:
            if not line.more:
                stream.discarding = False
                stream.delivered = seq
                stream.owe_ack(now)
            return
        if line.more:
            stream.partial += line.payload
            return
        if stream.partial:
            message = bytes(stream.partial) + line.payload
            stream.partial = bytearray()
        else:
            message = line.payload
        out.append(message)
        self.counters.messages_delivered += 1
        stream.delivered = seq
        stream.owe_ack(now)

    def _ack_delay(self, via: Transport) -> float:
        return self.limits.ack_delay if via is Transport.DATA_CHANNEL else self.limits.matrix_ack_delay

    def _ack_due(self, stream: _InStream, now: float, via: Transport) -> bool:
        if not stream.ack_pending():
            return False
        if stream.delivered - min(stream.acked_sent, stream.delivered) >= self.limits.ack_after_fragments:
            return True
        return stream.ack_since is None or now >= stream.ack_since + self._ack_delay(via)

    def poll_acks(self, now: float, via: Transport) -> list[Ack]:
        acks = []
        for stream in self.streams:
            if via is Transport.DATA_CHANNEL and stream.id != self.dc_stream:
                if stream.ack_pending():
                    _mark_acked(stream)
                continue
            if self._ack_due(stream, now, via):
                acks.append(_mark_acked(stream))
        return acks

    def take_ack(self) -> Ack | None:
        for stream in reversed(self.streams):
            if stream.ack_pending():
                return _mark_acked(stream)
        return None

    def ack_lost(self, now: float, ack: Ack) -> None:
        for stream in self.streams:
            if stream.id == ack.stream:
                stream.acked_sent = min(stream.acked_sent, max(ack.seq - 1, 0))
                stream.ack_forced = True
                stream.owe_ack(now)

    def next_ack_deadline(self, via: Transport) -> float | None:
        deadlines = [
            s.ack_since + self._ack_delay(via)
            for s in self.streams
            if s.ack_pending() and s.ack_since is not None and (via is Transport.MATRIX or s.id == self.dc_stream)
        ]
        return min(deadlines, default=None)


def _mark_acked(stream: _InStream) -> Ack:
    stream.acked_sent = stream.delivered
    stream.ack_forced = False
    stream.ack_since = None
    return Ack(stream.id, stream.delivered)


@dataclass
class _Channel:
    opened: float
    hello_sent: bool = False
    peer_hello: bool = False
    pongs: list[int] = field(default_factory=list)
    ping_out: tuple[int, float] | None = None
    last_pong: float | None = None
    next_ping: float | None = None
    rtt: float | None = None
    nonce: int = 0
    stall_resent: bool = False


class Peer:
    """Both halves for one peer plus the data channel's handshake and liveness."""

    def __init__(self, stream: int, limits: Limits | None = None) -> None:
        limits = limits or Limits()
        self.outgoing = Outgoing(stream, limits)
        self.incoming = Incoming(limits)
        self.channel: _Channel | None = None

    @property
    def limits(self) -> Limits:
        return self.outgoing.limits

    def push(self, now: float, message: bytes) -> None:
        self.outgoing.push(now, message)

    def has_room(self, length: int) -> bool:
        return self.outgoing.has_room(length)

    def retained_bytes(self) -> int:
        """Bytes held for this peer's incoming messages (:meth:`Incoming.retained_bytes`)."""
        return self.incoming.retained_bytes()

    def shed_incoming(self) -> None:
        """Lets go of every incoming fragment not yet delivered (:meth:`Incoming.shed`)."""
        self.incoming.shed()

    def rtt(self) -> float | None:
        return self.channel.rtt if self.channel else None

    def on_channel_open(self, now: float) -> None:
        if self.channel is not None:
            self.on_channel_lost()
        self.incoming.on_channel_lost()
        self.channel = _Channel(opened=now)

    def on_channel_lost(self) -> None:
        self.channel = None
        self.incoming.on_channel_lost()
        self.outgoing.on_channel_lost()

    def dc_state(self, now: float) -> DcState:
        ch = self.channel
        if ch is None:
            return DcState.CLOSED
        limits = self.limits
        if not ch.peer_hello:
            return DcState.DEAD if now >= ch.opened + limits.dead_after else DcState.HANDSHAKE
        if ch.ping_out is not None:
            sent = ch.ping_out[1]
            since = max(ch.last_pong, sent) if ch.last_pong is not None else sent
            if now >= since + limits.dead_after:
                return DcState.DEAD
            if now >= sent + limits.ping_timeout:
                return DcState.STALLED
        return DcState.ALIVE if ch.last_pong is not None else DcState.HANDSHAKE

    def receive_dc(self, now: float, message: bytes) -> list[bytes]:
        """A binary data channel message (a frame or a BATCH): the messages now deliverable.
        Raises :class:`codec.FrameError` (UnknownFrameType for a lone unknown frame: ignore it)."""
        if not message or message[0] != codec.BATCH:
            return self._receive_frame(now, message)
        delivered: list[bytes] = []
        for frame in codec.split_frames(message):
            try:
                delivered.extend(self._receive_frame(now, frame))
            except codec.UnknownFrameType:
                pass
        return delivered

    def _receive_frame(self, now: float, raw: bytes) -> list[bytes]:
        frame = codec.decode_frame(raw)
        ch = self.channel
        if ch is None:
            return []
        if isinstance(frame, Data):
            return self.incoming.receive_dc_data(now, frame.seq, Line(frame.more, frame.payload))
        if isinstance(frame, AckFrame):
            self.outgoing.on_ack(now, Ack(self.outgoing.stream, frame.seq))
        elif isinstance(frame, Ping):
            ch.pongs.append(frame.nonce)
            if len(ch.pongs) > 16:
                ch.pongs.pop(0)
        elif isinstance(frame, Pong):
            if ch.ping_out is not None and ch.ping_out[0] == frame.nonce:
                sent = ch.ping_out[1]
                ch.ping_out = None
                ch.stall_resent = False
                ch.last_pong = now
                ch.rtt = max(now - sent, 0.0)
                ch.next_ping = now + self.limits.ping_interval
        else:
            ch.peer_hello = True
            self.outgoing.on_peer_hello(now, frame)
            return self.incoming.on_hello(now, frame)
        return []

    def poll_dc(self, now: float, max_bytes: int) -> list[bytes]:
        """Frames to write on the data channel now: HELLO first, PONGs, a due ACK, a due PING, then
        (only while Alive) DATA up to about ``max_bytes``."""
        alive = self.dc_state(now) is DcState.ALIVE
        ch = self.channel
        if ch is None:
            return []
        frames: list[bytes] = []
        if not ch.hello_sent:
            ch.hello_sent = True
            peer_stream, delivered = self.incoming.hello_fields()
            hello = Hello(self.outgoing.stream, self.outgoing.hello_first_unacked(), peer_stream, delivered)
            frames.append(codec.encode_frame(hello))
        frames.extend(codec.encode_frame(Pong(n)) for n in ch.pongs)
        ch.pongs = []
        if not ch.peer_hello:
            return frames
        for ack in self.incoming.poll_acks(now, Transport.DATA_CHANNEL):
            frames.append(codec.encode_frame(AckFrame(ack.seq)))
        if ch.ping_out is None and (ch.next_ping is None or now >= ch.next_ping):
            ch.nonce += 1
            ch.ping_out = (ch.nonce, now)
            frames.append(codec.encode_frame(Ping(ch.nonce)))
        if alive:
            used = sum(len(f) for f in frames)
            frames.extend(self.outgoing.take_dc_frames(now, max(max_bytes - used, 0)))
        return frames

    def poll_matrix(self, now: float) -> ToDevice | None:
        """The next to-device send while the channel is not alive: a batch (carrying an owed ack),
        else an ack alone once it is due."""
        if self.outgoing.has_pending():
            return self.outgoing.take_matrix_batch(now, self.incoming.take_ack())
        acks = self.incoming.poll_acks(now, Transport.MATRIX)
        if not acks:
            return None
        ack = acks[0]
        txn_id = f"sb-ack.{codec.stream_hex(ack.stream)}.{ack.seq}"
        return ToDevice(codec.EVENT_ACK, txn_id, codec.encode_ack(ack), None, ack)

    def on_homeserver_accepted(self, first_seq: int, lines: int) -> None:
        self.outgoing.on_homeserver_accepted(first_seq, lines)

    def on_matrix_failed(self, now: float, send: ToDevice) -> None:
        if send.lines is not None:
            self.outgoing.on_matrix_failed(*send.lines)
        if send.ack is not None:
            self.incoming.ack_lost(now, send.ack)

    def receive_matrix(self, now: float, content: Any) -> list[bytes]:
        """An ``m.room.message`` content from the peer: the messages now deliverable. Raises
        :class:`codec.NotText` when it is not for this layer, ContentError when malformed."""
        decoded = codec.decode_content(content)
        if isinstance(decoded, Batch):
            self.outgoing.on_peer_speaks()
            if decoded.ack is not None:
                self.outgoing.on_ack(now, decoded.ack)
        return self.incoming.receive_content(now, decoded)

    def receive_matrix_ack(self, now: float, content: Any) -> None:
        self.outgoing.on_ack(now, codec.decode_ack(content))

    def poll_timeout(self, now: float) -> float | None:
        limits = self.limits
        state = self.dc_state(now)
        ch = self.channel
        channel: float | None = None
        if ch is not None and state not in (DcState.CLOSED, DcState.DEAD):
            if not ch.peer_hello:
                channel = ch.opened + limits.dead_after
            elif state is DcState.STALLED:
                channel = ch.ping_out[1] + limits.dead_after if ch.ping_out else None
            elif ch.ping_out is not None:
                channel = ch.ping_out[1] + limits.ping_timeout
            else:
                channel = ch.next_ping if ch.next_ping is not None else now
        if ch is not None and ch.peer_hello and state is not DcState.DEAD:
            acks = self.incoming.next_ack_deadline(Transport.DATA_CHANNEL)
        else:
            acks = self.incoming.next_ack_deadline(Transport.MATRIX)
        times = [t for t in (self.outgoing.poll_timeout(now), acks, channel) if t is not None]
        return min(times, default=None)

    def handle_timeout(self, now: float) -> None:
        self.outgoing.handle_timeout(now)
        ch = self.channel
        if self.dc_state(now) is DcState.STALLED and ch is not None and not ch.stall_resent:
            ch.stall_resent = True
            self.outgoing.on_channel_lost()
