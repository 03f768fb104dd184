"""PeerLink's events: a channel's ``open`` comes before any of its messages, even when the peer's
first messages overtake the DATA_CHANNEL_ACK that opens it."""

from __future__ import annotations

from typing import Any

from pyee import EventEmitter

from switchboard_client.rtc import MAX_EARLY_MESSAGES, PeerLink


class FakeChannel(EventEmitter):
    """What PeerLink uses of aiortc's RTCDataChannel: its label and its events."""

    label = "switchboard"
    readyState = "connecting"


async def test_messages_before_the_open_are_delivered_after_it_in_order() -> None:
    events: list[tuple[str, Any]] = []
    link = PeerLink(None, False, "call", "party", True, lambda kind, value: events.append((kind, value)))
    channel = FakeChannel()
    link._adopt(channel)
    # The peer's HELLO and PING came before its DATA_CHANNEL_ACK (an unordered channel).
    channel.emit("message", b"hello")
    channel.emit("message", b"ping")
    assert events == []
    channel.emit("open")
    channel.emit("message", b"data")
    assert [kind for kind, _ in events] == ["open", "message", "message", "message"]
    assert [value for kind, value in events if kind == "message"] == [b"hello", b"ping", b"data"]
    await link.close()


async def test_messages_before_the_open_are_bounded() -> None:
    events: list[tuple[str, Any]] = []
    link = PeerLink(None, False, "call", "party", True, lambda kind, value: events.append((kind, value)))
    channel = FakeChannel()
    link._adopt(channel)
    for i in range(MAX_EARLY_MESSAGES + 10):
        channel.emit("message", i.to_bytes(2, "big"))
    channel.emit("open")
    held = [value for kind, value in events if kind == "message"]
    assert held == [i.to_bytes(2, "big") for i in range(MAX_EARLY_MESSAGES)]
    await link.close()
