"""A Python client driven line by line, for the Rust interop tests (tests/client_python.rs).

Usage: python driven_peer.py HOMESERVER SWITCHBOARD TOKEN_FILE [--relay-only]
stdin:  ``open ADDR`` | ``send ADDR START COUNT`` (messages ``py-<i>``) | ``sendbin ADDR SIZE``
        | ``reset ADDR`` | ``stats ADDR`` | ``quit``
stdout: one JSON object a line: {"event": "up"|"down"|"message"|"switchboard"|"ready", ...}
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

from switchboard_client import ChannelDown, ChannelUp, Client, ClientConfig, Message, SwitchboardConnection


def out(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def pump_events(client: Client) -> None:
    async for event in client.events():
        if isinstance(event, ChannelUp):
            out(event="up", address=event.address, path=event.path)
        elif isinstance(event, ChannelDown):
            out(event="down", address=event.address, reason=event.reason)
        elif isinstance(event, Message):
            out(event="message", address=event.address, b64=base64.b64encode(event.data).decode())
        elif isinstance(event, SwitchboardConnection):
            out(event="switchboard", connected=event.connected)


async def main() -> None:
    homeserver, switchboard, token_file = sys.argv[1:4]
    with open(token_file, encoding="utf-8") as file:
        token = file.read().strip()
    config = ClientConfig(homeserver, token, switchboard=switchboard, relay_only="--relay-only" in sys.argv)
    client = await Client.connect(config)
    events = asyncio.create_task(pump_events(client))
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
        elif words[0] == "quit":
            break
        out(event="done", command=words[0])
    await client.shutdown()
    events.cancel()


if __name__ == "__main__":
    asyncio.run(main())
