"""``python -m switchboard_client peer``: the Python twin of ``switchboard peer``, a command-line peer
an operator runs twice to check a deployment end to end.

- ``--listen`` echoes every message it receives, until ``--count`` messages were echoed (when given)
  or ``--timeout`` passes (0: until interrupted).
- ``--to ADDRESS`` opens a data channel and, once it is up, sends ``--count`` Raiden-shaped JSON
  messages padded to ``--size`` bytes, one at a time; each is acknowledged by its echo, and its
  round-trip time is the time to that echo.

With ``--json`` both end with one JSON line: ``{"path", "upgrade_ms", "rtt_ms": {"p50", "p99"},
"sent", "acknowledged", "received"}``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .client import (
    ChannelDown,
    ChannelUp,
    Client,
    ClientConfig,
    ClientEvent,
    Message,
    SwitchboardConnection,
    SyncStopped,
)

DRAIN = 3.0


class PeerError(Exception):
    """The run failed; the report so far is kept."""


@dataclass
class Report:
    path: str = "matrix"
    upgrade_ms: float | None = None
    rtt_ms: dict[str, float | None] = field(default_factory=lambda: {"p50": None, "p99": None})
    sent: int = 0
    acknowledged: int = 0
    received: int = 0

    def json(self) -> str:
        return json.dumps(
            {
                "path": self.path,
                "upgrade_ms": self.upgrade_ms,
                "rtt_ms": self.rtt_ms,
                "sent": self.sent,
                "acknowledged": self.acknowledged,
                "received": self.received,
            }
        )


def message(index: int, size: int) -> bytes:
    """A Raiden-shaped message padded to ``size`` bytes, as the Rust peer makes it."""
    head = json.dumps(
        {
            "type": "LockedTransfer",
            "message_identifier": str(index),
            "chain_id": "1",
            "nonce": "1",
            "transferred_amount": "0",
            "locked_amount": "1000000000000000",
        },
        separators=(",", ":"),
        sort_keys=True,  # serde_json's order: the Rust peer's messages, byte for byte
    )
    fixed = len(head) - 1 + len(',"padding":""}')
    padding = "x" * max(size - fixed, 0)
    return f'{head[:-1]},"padding":"{padding}"}}'.encode()


def index_of(data: bytes) -> int | None:
    try:
        return int(json.loads(data)["message_identifier"])
    except (ValueError, KeyError, TypeError):
        return None


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    return sorted(values)[round((len(values) - 1) * p / 100)]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def _next(client: Client, deadline: float | None) -> ClientEvent | None:
    timeout = None if deadline is None else deadline - time.monotonic()
    if timeout is not None and timeout <= 0:
        return None
    try:
        return await client.next_event(timeout)
    except TimeoutError:
        return None


async def listen(client: Client, count: int, deadline: float | None, report: Report) -> None:
    peers: set[str] = set()
    say("listening; every message is echoed to its sender")
    while count == 0 or report.sent < count:
        event = await _next(client, deadline)
        if event is None:
            break
        if isinstance(event, ChannelUp):
            report.path = event.path
            say(f"channel up with {event.address}: {event.path}")
        elif isinstance(event, ChannelDown):
            report.path = "matrix"
            say(f"channel down with {event.address}: {event.reason}")
        elif isinstance(event, Message):
            report.received += 1
            await client.send(event.address, event.data)
            report.sent += 1
            peers.add(event.address)
        elif isinstance(event, SyncStopped):
            raise PeerError(f"the client stopped: {event.reason}")
        elif isinstance(event, SwitchboardConnection):
            say("Switchboard connected" if event.connected else "Switchboard not connected")
    say(f"echoed {report.sent} messages")
    drained = time.monotonic() + DRAIN
    for address in peers:  # let the peers acknowledge the last echoes before stopping
        while time.monotonic() < drained and client.buffered_fragments(address) > 0:
            await asyncio.sleep(0.02)


async def send_to(client: Client, address: str, count: int, size: int, deadline: float | None, report: Report) -> None:
    called = time.monotonic()
    await client.open(address)
    say(f"calling {address}")
    path = None
    while path is None:
        event = await _next(client, deadline)
        if event is None:
            raise PeerError(
                f"no data channel to {address} within {time.monotonic() - called:.1f} s: check that the peer "
                "runs a listening peer, that Switchboard is reachable, and that TURN works"
            )
        if isinstance(event, ChannelUp):
            path = event.path
        elif isinstance(event, SyncStopped):
            raise PeerError(f"the client stopped: {event.reason}")
        elif isinstance(event, SwitchboardConnection):
            if event.connected:
                called = time.monotonic()  # the call starts once Switchboard is connected
            say("Switchboard connected" if event.connected else "Switchboard not connected")
    report.path = path
    report.upgrade_ms = (time.monotonic() - called) * 1000
    say(f"channel up: {path} in {report.upgrade_ms:.1f} ms")
    rtts: list[float] = []
    for index in range(count):
        started = time.monotonic()
        await client.send(address, message(index, size))
        report.sent += 1
        while True:
            event = await _next(client, deadline)
            if event is None:
                break
            if isinstance(event, Message):
                report.received += 1
                if index_of(event.data) == index:
                    report.acknowledged += 1
                    rtts.append((time.monotonic() - started) * 1000)
                    break
            elif isinstance(event, ChannelDown):
                report.path = "matrix"
                say(f"channel down: {event.reason}; the rest goes through Matrix")
            elif isinstance(event, ChannelUp):
                report.path = event.path
            elif isinstance(event, SyncStopped):
                raise PeerError(f"the client stopped: {event.reason}")
        if event is None:
            break
    report.rtt_ms = {"p50": percentile(rtts, 50), "p99": percentile(rtts, 99)}
    if rtts:
        say(
            f"{report.acknowledged} messages of {size} bytes: round trip p50 {report.rtt_ms['p50']:.2f} ms, "
            f"p99 {report.rtt_ms['p99']:.2f} ms ({report.path})"
        )
    if report.acknowledged < count:
        raise PeerError(f"{report.acknowledged} of {count} messages acknowledged (echoed) within the timeout")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m switchboard_client peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--homeserver", required=True, help="the homeserver's client API, e.g. http://127.0.0.1:8008")
    p.add_argument("--access-token-file", help="a file holding the access token (else SWITCHBOARD_PEER_TOKEN)")
    p.add_argument("--switchboard", help="Switchboard's client API (default: from the homeserver's well-known)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--listen", action="store_true", help="wait for peers and echo what they send")
    mode.add_argument("--to", metavar="ADDRESS", help="open a data channel to this address and send to it")
    p.add_argument("--count", type=int, help="messages to send (--to; default 100) or to echo (--listen; 0: no limit)")
    p.add_argument("--size", type=int, default=3200, help="bytes per message (default 3200)")
    p.add_argument("--timeout", type=float, default=60, help="seconds the run may take (0 with --listen: no limit)")
    p.add_argument("--relay-only", action="store_true", help="relay-only ICE: every channel through TURN")
    p.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    return p


def access_token(path: str | None) -> str:
    if path is not None:
        with open(path, encoding="utf-8") as file:
            token = file.readline().strip()
    else:
        token = os.environ.get("SWITCHBOARD_PEER_TOKEN", "").strip()
    if not token:
        raise PeerError("no access token (--access-token-file or SWITCHBOARD_PEER_TOKEN)")
    return token


async def run(args: Any) -> int:
    report = Report()
    error: PeerError | None = None
    count = args.count if args.count is not None else (100 if args.to else 0)
    deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
    client = None
    try:
        config = ClientConfig(
            args.homeserver,
            access_token(args.access_token_file),
            switchboard=args.switchboard,
            relay_only=args.relay_only,
        )
        client = await Client.connect(config)
        say(f"connected as {client.user_id}")
        if args.to:
            await send_to(client, args.to, count, args.size, deadline, report)
        else:
            await listen(client, count, deadline, report)
    except PeerError as failure:
        error = failure
    except Exception as failure:  # noqa: BLE001 - reported as the run's error
        error = PeerError(f"{type(failure).__name__}: {failure}")
    finally:
        if client is not None:
            await client.shutdown()
    if args.json:
        print(report.json(), flush=True)
    if error is not None:
        say(f"error: {error}")
        return 1
    return 0


def main(argv: list[str]) -> int:
    return asyncio.run(run(parser().parse_args(argv)))
