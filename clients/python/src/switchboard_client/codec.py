"""Wire format between clients (docs/protocol.md, "Messages between clients"): the data channel's
binary frames and the content of the Matrix to-device events. Decoding never raises anything but
:class:`FrameError` / :class:`ContentError` on malformed input."""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field
from typing import Any

FRAGMENT_SIZE = 16 * 1024
"""The largest payload of one fragment (one DATA frame, one Matrix line before base64)."""
EVENT_MESSAGE = "m.room.message"
EVENT_ACK = "org.switchboard.ack"
STREAM_FIELD = "org.switchboard.stream"

DATA = 0x01
ACK = 0x02
PING = 0x03
PONG = 0x04
HELLO = 0x05
BATCH = 0x06
BATCH_LIMIT = 16 * 1024
HELLO_LEN = 1 + 16 + 8 + 16 + 8
DATA_HEADER = 1 + 1 + 8
U64_MAX = (1 << 64) - 1


class FrameError(ValueError):
    """A data channel message that is not a valid frame."""


class UnknownFrameType(FrameError):
    """A frame type this version does not know: ignore it (a later version may send it)."""

    def __init__(self, kind: int) -> None:
        super().__init__(f"unknown frame type {kind:#04x}")
        self.kind = kind


class ContentError(ValueError):
    """A to-device content that is not a valid message of this protocol."""


class NotText(ContentError):
    """msgtype is not m.text: not for this layer."""


def stream_hex(stream: int) -> str:
    """A stream id as 16 lower-case hex digits."""
    return f"{stream:016x}"


def parse_stream_id(text: bytes | str) -> int:
    """16 ASCII hex digits (either case) as a number; 0 means unknown. Raises ValueError."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError as error:
            raise ValueError("a stream id is 16 ASCII hex digits") from error
    if len(text) != 16 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ValueError("a stream id is 16 ASCII hex digits")
    return int(text, 16)


@dataclass(frozen=True)
class Ack:
    """Cumulative: every message of ``stream`` ending at or before ``seq`` was delivered."""

    stream: int
    seq: int


@dataclass(frozen=True)
class Hello:
    stream: int
    first_unacked: int
    peer_stream: int | None
    delivered: int


@dataclass(frozen=True)
class Data:
    more: bool
    seq: int
    payload: bytes


@dataclass(frozen=True)
class AckFrame:
    seq: int


@dataclass(frozen=True)
class Ping:
    nonce: int


@dataclass(frozen=True)
class Pong:
    nonce: int


Frame = Data | AckFrame | Ping | Pong | Hello


def encode_frame(frame: Frame) -> bytes:
    """The bytes of one frame."""
    if isinstance(frame, Data):
        return struct.pack(">BBQ", DATA, 1 if frame.more else 0, frame.seq) + frame.payload
    if isinstance(frame, AckFrame):
        return struct.pack(">BQ", ACK, frame.seq)
    if isinstance(frame, Ping):
        return struct.pack(">BQ", PING, frame.nonce)
    if isinstance(frame, Pong):
        return struct.pack(">BQ", PONG, frame.nonce)
    peer = stream_hex(frame.peer_stream or 0)
    return (
        bytes([HELLO])
        + stream_hex(frame.stream).encode()
        + struct.pack(">Q", frame.first_unacked)
        + peer.encode()
        + struct.pack(">Q", frame.delivered)
    )


def decode_frame(frame: bytes) -> Frame:
    """Parses one (non-BATCH) data channel frame."""
    if not frame:
        raise FrameError("empty frame")
    kind = frame[0]
    if kind == DATA:
        if len(frame) < DATA_HEADER:
            raise FrameError(f"DATA of {len(frame)} bytes: wrong length")
        (seq,) = struct.unpack(">Q", frame[2:10])
        if seq == 0:
            raise FrameError("seq 0 (seqs start at 1)")
        payload = bytes(frame[DATA_HEADER:])
        if len(payload) > FRAGMENT_SIZE:
            raise FrameError(f"DATA payload of {len(payload)} bytes is over the fragment size")
        return Data(more=frame[1] & 1 == 1, seq=seq, payload=payload)
    if kind in (ACK, PING, PONG):
        if len(frame) != 9:
            raise FrameError(f"frame type {kind:#04x} of {len(frame)} bytes: wrong length")
        (n,) = struct.unpack(">Q", frame[1:9])
        return AckFrame(n) if kind == ACK else Ping(n) if kind == PING else Pong(n)
    if kind == HELLO:
        if len(frame) != HELLO_LEN:
            raise FrameError(f"HELLO of {len(frame)} bytes: wrong length")
        try:
            stream = parse_stream_id(frame[1:17])
            peer = parse_stream_id(frame[25:41])
        except ValueError as error:
            raise FrameError(str(error)) from error
        if stream == 0:
            raise FrameError("own stream id 0")
        (first_unacked,) = struct.unpack(">Q", frame[17:25])
        if first_unacked == 0:
            raise FrameError("first unacked 0")
        delivered = struct.unpack(">Q", frame[41:49])[0] if peer else 0
        return Hello(stream, first_unacked, peer or None, delivered)
    raise UnknownFrameType(kind)


def batch_size(frame_bytes: int, count: int) -> int:
    """Size of a BATCH message holding ``count`` frames of ``frame_bytes`` bytes in all."""
    return 1 + 2 * count + frame_bytes


def join_frames(frames: list[bytes]) -> bytes:
    """Frames joined into one BATCH message."""
    out = bytearray([BATCH])
    for frame in frames:
        if len(frame) > 0xFFFF or not frame or frame[0] == BATCH:
            raise ValueError("a frame in a BATCH is 1..65535 bytes and not a BATCH")
        out += struct.pack(">H", len(frame))
        out += frame
    return bytes(out)


def split_frames(message: bytes) -> list[bytes]:
    """The frames of a BATCH message; a truncated or empty frame or a nested BATCH is an error."""
    if not message or message[0] != BATCH:
        raise FrameError("not a BATCH")
    frames = []
    at = 1
    while at < len(message):
        if at + 2 > len(message):
            raise FrameError("BATCH: truncated length")
        (length,) = struct.unpack(">H", message[at : at + 2])
        start = at + 2
        if start + length > len(message):
            raise FrameError("BATCH: truncated frame")
        frame = message[start : start + length]
        if not frame:
            raise FrameError("BATCH: empty frame")
        if frame[0] == BATCH:
            raise FrameError("BATCH inside a BATCH")
        frames.append(bytes(frame))
        at = start + length
    return frames


@dataclass(frozen=True)
class Line:
    """One fragment: a line of a Matrix batch or the payload of a DATA frame."""

    more: bool
    payload: bytes


@dataclass
class Batch:
    stream: int
    seq: int
    base: int
    lines: list[Line]
    ack: Ack | None = None


@dataclass
class Plain:
    """From a plain Raiden node (no stream field): its non-empty lines, as they are."""

    lines: list[bytes] = field(default_factory=list)


Content = Batch | Plain


def _u64(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise ContentError(f"malformed {STREAM_FIELD}: {name} is not an unsigned 64-bit integer")
    return value


def _indexes(value: Any, name: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ContentError(f"malformed {STREAM_FIELD}: {name} is not a list")
    return [_u64(i, name) for i in value]


def decode_ack(content: Any) -> Ack:
    """An ``org.switchboard.ack`` content (or the ``ack`` field of a batch)."""
    if not isinstance(content, dict):
        raise ContentError("malformed ack: not an object")
    try:
        stream = parse_stream_id(content.get("id"))  # type: ignore[arg-type]
    except (ValueError, TypeError) as error:
        raise ContentError("malformed ack: id is not a stream id") from error
    if stream == 0:
        raise ContentError("malformed ack: id 0")
    seq = content.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= U64_MAX:
        raise ContentError("malformed ack: seq")
    return Ack(stream, seq)


def encode_ack(ack: Ack) -> dict[str, Any]:
    return {"id": stream_hex(ack.stream), "seq": ack.seq}


def decode_content(content: Any) -> Content:
    """Decodes an ``m.room.message`` content; raises :class:`NotText` for another msgtype."""
    if not isinstance(content, dict) or content.get("msgtype") != "m.text":
        raise NotText("msgtype is not m.text")
    body = content.get("body")
    if not isinstance(body, str):
        raise ContentError("no string body")
    raw = content.get(STREAM_FIELD)
    if raw is None:
        return Plain([line.encode() for line in body.split("\n") if line])
    if not isinstance(raw, dict):
        raise ContentError(f"malformed {STREAM_FIELD}: not an object")
    try:
        stream = parse_stream_id(raw.get("id"))  # type: ignore[arg-type]
    except (ValueError, TypeError) as error:
        raise ContentError(f"malformed {STREAM_FIELD}: id") from error
    if stream == 0:
        raise ContentError(f"malformed {STREAM_FIELD}: id 0")
    seq = _u64(raw.get("seq"), "seq")
    base = _u64(raw.get("base"), "base")
    more = _indexes(raw.get("more"), "more")
    b64 = _indexes(raw.get("b64"), "b64")
    ack = decode_ack(raw["ack"]) if raw.get("ack") is not None else None
    texts = body.split("\n")
    if seq == 0 or base == 0 or base > seq:
        raise ContentError(f"malformed {STREAM_FIELD}: seq and base start at 1, base <= seq")
    if seq + len(texts) > U64_MAX:
        raise ContentError(f"malformed {STREAM_FIELD}: seq overflows")
    if any(i >= len(texts) for i in more + b64):
        raise ContentError(f"malformed {STREAM_FIELD}: line index out of range")
    payloads = [text.encode() for text in texts]
    for i in b64:
        try:
            payloads[i] = base64.b64decode(texts[i], validate=True)
        except (binascii.Error, ValueError) as error:
            raise ContentError(f"line {i} is not valid base64") from error
    more_set = set(more)
    lines = [Line(i in more_set, payload) for i, payload in enumerate(payloads)]
    for i, line in enumerate(lines):
        if len(line.payload) > FRAGMENT_SIZE:
            raise ContentError(f"line {i} of {len(line.payload)} bytes is over the fragment size")
    return Batch(stream, seq, base, lines, ack)


def _escaped_len(text: str) -> int:
    """Length of ``text`` inside a JSON string as serde_json writes it (UTF-8 bytes)."""
    total = 0
    for b in text.encode():
        if b in (0x22, 0x5C, 0x0A, 0x0D, 0x09, 0x08, 0x0C):
            total += 2
        elif b < 0x20:
            total += 6
        else:
            total += 1
    return total


def line_text(payload: bytes) -> tuple[str, bool, int]:
    """How a line is written in a body: the text, whether it is base64, and its escaped length.
    Base64 when the payload is not UTF-8, contains a newline, or would more than double in length
    when JSON-escaped (exactly the Rust client's rule)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\n" not in text:
        escaped = _escaped_len(text)
        if escaped <= 2 * len(payload):
            return text, False, escaped
    return base64.b64encode(payload).decode("ascii"), True, (len(payload) + 2) // 3 * 4


def encode_batch(batch: Batch) -> dict[str, Any]:
    """The ``m.room.message`` content carrying ``batch``."""
    texts = []
    more = []
    b64 = []
    for i, line in enumerate(batch.lines):
        text, is_b64, _ = line_text(line.payload)
        texts.append(text)
        if line.more:
            more.append(i)
        if is_b64:
            b64.append(i)
    stream: dict[str, Any] = {"id": stream_hex(batch.stream), "seq": batch.seq, "base": batch.base}
    if more:
        stream["more"] = more
    if b64:
        stream["b64"] = b64
    if batch.ack is not None:
        stream["ack"] = encode_ack(batch.ack)
    return {"msgtype": "m.text", "body": "\n".join(texts), STREAM_FIELD: stream}
