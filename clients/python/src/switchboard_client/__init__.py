"""Switchboard's Python client: WebRTC data channels between Raiden nodes when they work, Matrix
when they don't, every message delivered exactly once and in order (docs/protocol.md)."""

from .client import (
    Backoff,
    Busy,
    ChannelDown,
    ChannelUp,
    Client,
    ClientConfig,
    ClientError,
    ClientEvent,
    ClientStopped,
    ConfigError,
    Message,
    MessageTooLarge,
    PeerStats,
    Presence,
    SwitchboardConnection,
    SyncStopped,
)
from .clock import Clock, ManualClock, SystemClock
from .reliable import DcState, Limits

__all__ = [
    "Backoff",
    "Busy",
    "ChannelDown",
    "ChannelUp",
    "Client",
    "ClientConfig",
    "ClientError",
    "ClientEvent",
    "ClientStopped",
    "Clock",
    "ConfigError",
    "DcState",
    "Limits",
    "ManualClock",
    "Message",
    "MessageTooLarge",
    "PeerStats",
    "Presence",
    "SwitchboardConnection",
    "SystemClock",
    "SyncStopped",
]
