"""Python <-> Python against the real stack (Synapse, Switchboard, its TURN relay on loopback), named
by the Rust harness (tests/client_python.rs) in SWITCHBOARD_PY_HOMESERVER, SWITCHBOARD_PY_SWITCHBOARD
and SWITCHBOARD_PY_USERS (JSON list of {address, user_id, access_token}); skipped without them."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from switchboard_client import (
    Backoff,
    ChannelDown,
    ChannelUp,
    Client,
    ClientConfig,
    ManualClock,
    Message,
    Presence,
    SwitchboardConnection,
)

HOMESERVER = os.environ.get("SWITCHBOARD_PY_HOMESERVER")
SWITCHBOARD = os.environ.get("SWITCHBOARD_PY_SWITCHBOARD")
USERS = json.loads(os.environ.get("SWITCHBOARD_PY_USERS", "[]"))
STEP = 60.0
COUNT = 200

pytestmark = pytest.mark.skipif(
    not (HOMESERVER and SWITCHBOARD and len(USERS) >= 5), reason="no stack (run through tests/client_python.rs)"
)


@dataclass
class Seen:
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    ups: list[str] = field(default_factory=list)
    downs: list[str] = field(default_factory=list)
    switchboard: list[bool] = field(default_factory=list)
    presence: list[Presence] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, what: str, done: Callable[[Seen], bool]) -> None:
        deadline = time.monotonic() + STEP
        while not done(self):
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{what} within {STEP} s")
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass


async def record(client: Client, seen: Seen) -> None:
    async for event in client.events():
        if isinstance(event, Message):
            seen.messages.append((event.address, event.data))
        elif isinstance(event, ChannelUp):
            seen.ups.append(event.path)
        elif isinstance(event, ChannelDown):
            seen.downs.append(event.reason)
        elif isinstance(event, SwitchboardConnection):
            seen.switchboard.append(event.connected)
        elif isinstance(event, Presence):
            seen.presence.append(event)
        seen.changed.set()


def message(prefix: str, i: int) -> bytes:
    if i % 50 == 49:  # now and then a binary message of two fragments
        return bytes([i % 256]) * 20_000
    return f'{{"type":"Processed","from":"{prefix}","message_identifier":"{i}"}}'.encode()


def in_order(seen: Seen, prefix: str, count: int) -> None:
    got = [data for _, data in seen.messages]
    assert got == [message(prefix, i) for i in range(count)], f"{len(got)} messages, once and in order"


async def start(user: dict[str, str], switchboard: str | None, seen: Seen) -> tuple[Client, asyncio.Task[None]]:
    assert HOMESERVER is not None
    config = ClientConfig(HOMESERVER, user["access_token"], switchboard=switchboard, relay_only=True)
    client = await asyncio.wait_for(Client.connect(config), STEP)
    return client, asyncio.create_task(record(client, seen))


async def send_range(client: Client, to: str, prefix: str, start_at: int, end: int) -> None:
    for i in range(start_at, end):
        await client.send(to, message(prefix, i))


async def test_two_python_clients_upgrade_through_the_relay_survive_a_cut_and_upgrade_again() -> None:
    alice, bob = USERS[0], USERS[1]
    a_seen, b_seen = Seen(), Seen()
    a, a_task = await start(alice, SWITCHBOARD, a_seen)
    b, b_task = await start(bob, SWITCHBOARD, b_seen)
    try:
        await a_seen.wait("alice on Switchboard", lambda s: s.switchboard == [True])
        await b_seen.wait("bob on Switchboard", lambda s: s.switchboard == [True])
        await a.watch(bob["address"])
        await a_seen.wait(
            "bob's presence", lambda s: any(p.address.lower() == bob["address"].lower() for p in s.presence)
        )
        started = time.monotonic()
        await a.open(bob["address"])
        await a_seen.wait("alice's channel up", lambda s: bool(s.ups))
        await b_seen.wait("bob's channel up", lambda s: bool(s.ups))
        print(f"channel up in {time.monotonic() - started:.3f} s")
        assert a_seen.ups == ["relay"] and b_seen.ups == ["relay"]

        await send_range(a, bob["address"], "a", 0, COUNT)
        await send_range(b, alice["address"], "b", 0, COUNT)
        await b_seen.wait("bob's messages", lambda s: len(s.messages) >= COUNT)
        await a_seen.wait("alice's messages", lambda s: len(s.messages) >= COUNT)
        stats = a.stats(bob["address"])
        assert stats is not None and stats.dc_data_frames >= COUNT and stats.matrix_lines == 0, stats
        print(f"over the channel: rtt {stats.rtt}")

        # Bob's peer connection is closed under it, as a failure would: the rest goes through Matrix.
        link = b._peers[b._address(alice["address"])].link
        assert link is not None and link.rtc is not None
        await link.rtc.pc.close()
        sending = asyncio.create_task(send_range(a, bob["address"], "a", COUNT, 2 * COUNT))
        await send_range(b, alice["address"], "b", COUNT, 2 * COUNT)
        await sending
        await b_seen.wait("bob's messages after the cut", lambda s: len(s.messages) >= 2 * COUNT)
        await a_seen.wait("alice's messages after the cut", lambda s: len(s.messages) >= 2 * COUNT)
        b_stats = b.stats(alice["address"])
        assert b_stats is not None and b_stats.matrix_lines > 0, b_stats

        # Alice calls again; both upgrade; the streams continue over the new channel.
        await a_seen.wait("alice's second channel", lambda s: len(s.ups) >= 2)
        await b_seen.wait("bob's second channel", lambda s: len(s.ups) >= 2)
        assert a_seen.downs and b_seen.downs
        frames = a.stats(bob["address"]).dc_data_frames  # type: ignore[union-attr]
        await send_range(a, bob["address"], "a", 2 * COUNT, 3 * COUNT)
        await send_range(b, alice["address"], "b", 2 * COUNT, 3 * COUNT)
        await b_seen.wait("bob's last messages", lambda s: len(s.messages) >= 3 * COUNT)
        await a_seen.wait("alice's last messages", lambda s: len(s.messages) >= 3 * COUNT)
        # The new channel carried them (all unless it stalled for 2 s under load: then Matrix did).
        assert a.stats(bob["address"]).dc_data_frames > frames  # type: ignore[union-attr]
        in_order(b_seen, "a", 3 * COUNT)
        in_order(a_seen, "b", 3 * COUNT)
        assert all(address.lower() == alice["address"].lower() for address, _ in b_seen.messages)
    finally:
        await a.shutdown()
        await b.shutdown()
        a_task.cancel()
        b_task.cancel()


async def test_without_switchboard_two_python_clients_exchange_over_to_device_once_in_order() -> None:
    alice, bob = USERS[2], USERS[3]  # fresh users: no to-device backlog of the other test
    a_seen, b_seen = Seen(), Seen()
    # The homeserver's well-known names no Switchboard here: Matrix only.
    a, a_task = await start(alice, None, a_seen)
    b, b_task = await start(bob, None, b_seen)
    try:
        await a.open(bob["address"])
        sending = asyncio.create_task(send_range(a, bob["address"], "a", 0, 60))
        await send_range(b, alice["address"], "b", 0, 60)
        await sending
        await b_seen.wait("bob's messages", lambda s: len(s.messages) >= 60)
        await a_seen.wait("alice's messages", lambda s: len(s.messages) >= 60)
        in_order(b_seen, "a", 60)
        in_order(a_seen, "b", 60)
        assert not a_seen.ups and not a_seen.switchboard
    finally:
        await a.shutdown()
        await b.shutdown()
        a_task.cancel()
        b_task.cancel()


async def test_reconnecting_to_switchboard_backs_off_on_the_clients_clock() -> None:
    """The reconnect backoff (here 3 s, doubling) runs on the clock the application passes in: with a
    :class:`ManualClock`, the client tries again exactly when the test steps the clock past it."""
    attempts = 0
    tried = asyncio.Event()

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        tried.set()
        writer.close()  # no WebSocket handshake: the connection attempt fails

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clock = ManualClock()
    assert HOMESERVER is not None
    config = ClientConfig(
        HOMESERVER,
        USERS[4]["access_token"],
        switchboard=f"http://127.0.0.1:{port}",
        reconnect_backoff=Backoff(initial=3.0, maximum=20.0),
        clock=clock,
    )
    client = await asyncio.wait_for(Client.connect(config), STEP)

    async def until(what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + STEP
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} within {STEP} s")
            tried.clear()
            try:
                await asyncio.wait_for(tried.wait(), 0.05)
            except TimeoutError:
                pass

    try:
        await until("a first attempt", lambda: attempts >= 1)
        for backoff in (3.0, 6.0, 12.0):
            # The driver's own waits on the clock are 1 s at most: the backoff is the longer one.
            await until(f"a backoff of {backoff} s", lambda b=backoff: b in clock.pending())
            before = attempts
            clock.advance(backoff)
            await until("the next attempt", lambda n=before + 1: attempts >= n)
            assert attempts == before + 1, "one attempt per backoff"
    finally:
        await client.shutdown()
        server.close()
