"""The wire format, byte for byte as docs/protocol.md gives it."""

import json

import pytest

from switchboard_client import codec
from switchboard_client.codec import Ack, AckFrame, Batch, Data, Hello, Line, Ping, Pong


def test_documented_examples_encode_byte_for_byte() -> None:
    data = codec.encode_frame(Data(False, 5, b"hi"))
    assert data == bytes.fromhex("01 00 0000000000000005 6869")
    hello = codec.encode_frame(Hello(0xA1, 1, None, 0))
    assert hello == b"\x05" + b"00000000000000a1" + (1).to_bytes(8, "big") + b"0" * 16 + bytes(8)
    assert len(hello) == codec.HELLO_LEN


def test_frames_round_trip() -> None:
    frames = [
        Data(True, 7, b"\x00\xff" * 10),
        Data(False, 2**64 - 1, b""),
        AckFrame(12),
        Ping(3),
        Pong(3),
        Hello(0xB2, 4, 0xA1, 9),
        Hello(0xB2, 4, None, 0),
    ]
    for frame in frames:
        assert codec.decode_frame(codec.encode_frame(frame)) == frame
    joined = codec.join_frames([codec.encode_frame(f) for f in frames])
    assert [codec.decode_frame(f) for f in codec.split_frames(joined)] == frames


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01\x00\x00",
        b"\x01\x00" + bytes(8),  # seq 0
        b"\x01\x00" + (1).to_bytes(8, "big") + bytes(codec.FRAGMENT_SIZE + 1),
        b"\x02" + bytes(7),
        b"\x03" + bytes(9),
        b"\x05" + b"0" * 16 + (1).to_bytes(8, "big") + b"0" * 16 + bytes(8),  # own id 0
        b"\x05" + b"zz00000000000001" + (1).to_bytes(8, "big") + b"0" * 16 + bytes(8),
        b"\x05" + b"0000000000000001" + bytes(8) + b"0" * 16 + bytes(8),  # first unacked 0
    ],
)
def test_malformed_frames_are_errors(raw: bytes) -> None:
    with pytest.raises(codec.FrameError):
        codec.decode_frame(raw)


def test_unknown_type_is_its_own_error_and_batches_are_checked() -> None:
    with pytest.raises(codec.UnknownFrameType):
        codec.decode_frame(b"\x7f")
    for bad in [b"\x06\x00", b"\x06\x00\x05\x01", b"\x06\x00\x00", b"\x06\x00\x01\x06"]:
        with pytest.raises(codec.FrameError):
            codec.split_frames(bad)


def test_documented_matrix_example_decodes() -> None:
    content = {
        "msgtype": "m.text",
        "body": '{"type":"Processed"}\n{"type":"Delivered"}\ngICAgA==',
        "org.switchboard.stream": {
            "id": "00000000000000a1",
            "seq": 7,
            "base": 4,
            "more": [2],
            "b64": [2],
            "ack": {"id": "00000000000000b2", "seq": 12},
        },
    }
    batch = codec.decode_content(content)
    assert batch == Batch(
        0xA1,
        7,
        4,
        [Line(False, b'{"type":"Processed"}'), Line(False, b'{"type":"Delivered"}'), Line(True, b"\x80" * 4)],
        Ack(0xB2, 12),
    )
    assert codec.encode_batch(batch) == content


def test_line_text_follows_the_rust_rule() -> None:
    assert codec.line_text(b"plain") == ("plain", False, 5)
    assert codec.line_text(b'a"b') == ('a"b', False, 4)
    assert codec.line_text(b"a\nb")[1]
    assert codec.line_text(b"\x01\x02")[1]  # escaping would more than double it
    assert codec.line_text(b"\xff")[1]
    # The length is as serde_json writes it, UTF-8 bytes.
    assert codec.line_text("é".encode())[2] == len(json.dumps("é", ensure_ascii=False)) - 1


def test_plain_raiden_content_and_bad_contents() -> None:
    assert codec.decode_content({"msgtype": "m.text", "body": "a\n\nb"}) == codec.Plain([b"a", b"b"])
    with pytest.raises(codec.NotText):
        codec.decode_content({"msgtype": "m.notice", "body": "x"})
    bad_fields = [
        {"id": "00000000000000a1", "seq": 0, "base": 0},
        {"id": "00000000000000a1", "seq": 3, "base": 4},
        {"id": "0000000000000000", "seq": 1, "base": 1},
        {"id": "00000000000000a1", "seq": 1, "base": 1, "more": [1]},
        {"id": "00000000000000a1", "seq": 1, "base": 1, "b64": [0]},
        {"id": "00000000000000a1", "seq": "1", "base": 1},
    ]
    for field in bad_fields:
        with pytest.raises(codec.ContentError):
            codec.decode_content({"msgtype": "m.text", "body": "!!", codec.STREAM_FIELD: field})
    with pytest.raises(codec.ContentError):
        codec.decode_ack({"id": "xyz", "seq": 1})
    assert codec.decode_ack({"id": "00000000000000B2", "seq": 3}) == Ack(0xB2, 3)


def test_the_writer_joins_small_frames_into_batches_of_at_most_16_kib() -> None:
    from switchboard_client.client import _join

    small = [codec.encode_frame(Data(False, i + 1, b"x" * 500)) for i in range(100)]
    big = codec.encode_frame(Data(False, 200, b"y" * 10_000))
    messages = _join([*small[:50], big, *small[50:]])
    assert big in messages
    assert all(len(m) <= codec.BATCH_LIMIT for m in messages)
    frames: list[bytes] = []
    for m in messages:
        frames.extend(codec.split_frames(m) if m[0] == codec.BATCH else [m])
    assert frames == [*small[:50], big, *small[50:]]
    assert _join([small[0]]) == [small[0]]  # a frame alone goes as it is
