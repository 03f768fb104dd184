"""A Python client driven line by line, for the Rust interop tests (tests/client_python.rs) and the
client pair benchmark (benches/client_pairs.rs).

Usage: python driven_peer.py HOMESERVER SWITCHBOARD TOKEN_FILE [--relay-only]
stdin:  ``open ADDR`` | ``send ADDR START COUNT`` (messages ``py-<i>``) | ``sendbin ADDR SIZE``
        | ``reset ADDR`` | ``stats ADDR`` | ``quit``
        and for the benchmark (bench messages are JSON with a ``sent_ms`` wall-clock stamp, see
        ``bench_message``; once a bench mode is on, messages are no longer printed):
        ``stamp`` (from then on: record each message's one-way latency, and echo it)
        | ``oneway`` (prints the recorded latencies, then forgets them)
        | ``pingpong ADDR COUNT SIZE`` (opens a channel to ADDR, then sends COUNT messages one at a
        time, each timed until its echo)
        | ``payer ROLE I M T`` (plays ROLE, one of I, M, T, of a 1-mediator payment between the
        three addresses: see ``Payer``)
stdout: one JSON object a line: {"event": "up"|"down"|"message"|"switchboard"|"ready"|"stats"
        |"oneway"|"pingpong"|"paid"|"done", ...}
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from collections.abc import Awaitable, Callable

from switchboard_client import ChannelDown, ChannelUp, Client, ClientConfig, Message, SwitchboardConnection

# The 8 hops of a 1-mediator payment (benches/client.rs, HOPS): sender, receiver, type, size, and
# whether the receiver answers a Processed besides its Delivered.
HOPS = [
    ("I", "M", "LockedTransfer", 3200, True),
    ("M", "T", "LockedTransfer", 3200, True),
    ("T", "I", "SecretRequest", 536, False),
    ("I", "T", "RevealSecret", 297, False),
    ("T", "M", "RevealSecret", 297, False),
    ("M", "I", "RevealSecret", 297, False),
    ("I", "M", "Unlock", 568, True),
    ("M", "T", "Unlock", 568, True),
]


def out(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def now_ms() -> float:
    """Wall-clock milliseconds: the clocks of processes on one machine agree."""
    return time.time_ns() / 1e6


def bench_message(kind: str, payment: int, hop: int, ident: int, size: int) -> bytes:
    """A Raiden-shaped JSON message of `size` bytes (at least its fields), stamped with the time."""
    head = json.dumps(
        {"type": kind, "payment": payment, "hop": hop, "message_identifier": str(ident), "sent_ms": now_ms()},
        separators=(",", ":"),
    )
    fixed = len(head) - 1 + len(',"padding":""}')
    return (head[:-1] + ',"padding":"' + "x" * max(0, size - fixed) + '"}').encode()


class Payer:
    """One node of a 1-mediator payment: answers each hop it receives with a Delivered (and a
    Processed for a balance proof), sends the next hop when it is its own, and reports the time of
    the last of its messages of each payment."""

    def __init__(self, client: Client, role: str, addresses: dict[str, str]) -> None:
        self.client = client
        self.role = role
        self.address = addresses
        self.role_of = {address.lower(): role for role, address in addresses.items()}
        self.expected = sum(1 for hop in HOPS if hop[1] == role) + sum(
            1 + int(hop[4]) for hop in HOPS if hop[0] == role
        )
        self.arrived: dict[int, int] = {}
        self.ident = 0

    async def send(self, to: str, kind: str, payment: int, hop: int, size: int) -> None:
        self.ident += 1
        await self.client.send(self.address[to], bench_message(kind, payment, hop, self.ident, size))

    async def on_message(self, data: bytes) -> None:
        arrived_ms = now_ms()
        message = json.loads(data)
        payment, hop = int(message["payment"]), int(message["hop"])
        if message["type"] not in ("Processed", "Delivered"):
            sender, receiver, _, _, processed = HOPS[hop]
            assert receiver == self.role, f"hop {hop} reached {self.role}"
            if processed:
                await self.send(sender, "Processed", payment, hop, 216)
            await self.send(sender, "Delivered", payment, hop, 226)
            if hop + 1 < len(HOPS) and HOPS[hop + 1][0] == self.role:
                _, to, kind, size, _ = HOPS[hop + 1]
                await self.send(to, kind, payment, hop + 1, size)
        self.arrived[payment] = self.arrived.get(payment, 0) + 1
        if self.arrived[payment] == self.expected:
            del self.arrived[payment]
            out(event="paid", payment=payment, last_ms=arrived_ms)


class Driven:
    """The client and what the bench modes need: the echo and one-way record, and the waits of a
    ping-pong."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.on_message: Callable[[Message], Awaitable[None]] | None = None
        self.oneway: list[float] = []
        self.up: dict[str, asyncio.Event] = {}
        self.echo: tuple[bytes, asyncio.Event] | None = None

    async def pump_events(self) -> None:
        async for event in self.client.events():
            if isinstance(event, ChannelUp):
                self.up.setdefault(event.address.lower(), asyncio.Event()).set()
                out(event="up", address=event.address, path=event.path)
            elif isinstance(event, ChannelDown):
                out(event="down", address=event.address, reason=event.reason)
            elif isinstance(event, Message):
                if self.echo is not None and event.data == self.echo[0]:
                    self.echo[1].set()
                elif self.on_message is not None:
                    await self.on_message(event)
                else:
                    out(event="message", address=event.address, b64=base64.b64encode(event.data).decode())
            elif isinstance(event, SwitchboardConnection):
                out(event="switchboard", connected=event.connected)

    async def stamp_and_echo(self, event: Message) -> None:
        self.oneway.append(now_ms() - float(json.loads(event.data)["sent_ms"]))
        await self.client.send(event.address, event.data)

    async def pingpong(self, address: str, count: int, size: int) -> None:
        up = self.up.setdefault(address.lower(), asyncio.Event())
        called = time.perf_counter()
        await self.client.open(address)
        await asyncio.wait_for(up.wait(), 75)
        upgrade_ms = (time.perf_counter() - called) * 1000
        rtts = []
        for i in range(count):
            message = bench_message("LockedTransfer", 0, 0, i, size)
            self.echo = (message, asyncio.Event())
            started = time.perf_counter()
            await self.client.send(address, message)
            await asyncio.wait_for(self.echo[1].wait(), 10)
            rtts.append((time.perf_counter() - started) * 1000)
        self.echo = None
        stats = self.client.stats(address)
        out(event="pingpong", upgrade_ms=upgrade_ms, rtt_ms=rtts, path=stats.path if stats else None)


async def main() -> None:
    homeserver, switchboard, token_file = sys.argv[1:4]
    with open(token_file, encoding="utf-8") as file:
        token = file.read().strip()
    config = ClientConfig(homeserver, token, switchboard=switchboard, relay_only="--relay-only" in sys.argv)
    client = await Client.connect(config)
    driven = Driven(client)
    events = asyncio.create_task(driven.pump_events())
    out(event="ready", user_id=client.user_id)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        words = line.split()
        if words[0] == "open":
            await client.open(words[1])
        elif words[0] == "send":
            start, count = int(words[2]), int(words[3])
            for i in range(start, start + count):
                await client.send(words[1], f"py-{i}".encode())
        elif words[0] == "sendbin":
            await client.send(words[1], bytes((i * 7 + 3) % 256 for i in range(int(words[2]))))
        elif words[0] == "reset":
            await client.reset_channel(words[1])
        elif words[0] == "stats":
            stats = client.stats(words[1])
            out(event="stats", matrix_lines=stats.matrix_lines if stats else 0,
                dc_data_frames=stats.dc_data_frames if stats else 0)
        elif words[0] == "stamp":
            driven.on_message = driven.stamp_and_echo
        elif words[0] == "oneway":
            out(event="oneway", ms=driven.oneway)
            driven.oneway = []
        elif words[0] == "pingpong":
            await driven.pingpong(words[1], int(words[2]), int(words[3]))
        elif words[0] == "payer":
            payer = Payer(client, words[1], dict(zip("IMT", words[2:5], strict=True)))
            driven.on_message = lambda event: payer.on_message(event.data)
        elif words[0] == "quit":
            break
        out(event="done", command=words[0])
    await client.shutdown()
    events.cancel()


if __name__ == "__main__":
    asyncio.run(main())
