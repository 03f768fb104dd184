"""Switchboard's signalling WebSocket (docs/protocol.md, "Signalling WebSocket"): authenticates with
the ``Authorization`` header, waits for ``ready``, sends ``signal``/``watch``/``connected`` frames
with ids and waits for their answer; pushes what the server sends (peer signals, presence, glare,
call_ended, fresh TURN credentials) into a bounded queue."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yarl

log = logging.getLogger("switchboard_client.signal")

MAX_INCOMING_BYTES = 256 * 1024
ANSWER_TIMEOUT = 20.0
READY_TIMEOUT = 15.0
EVENTS_CAPACITY = 1024


class SignalError(Exception):
    """The signalling connection failed or a frame was refused."""


class Unauthorized(SignalError):
    """The token was refused (401 or close 4001): get a new one."""


class FrameRefused(SignalError):
    """The server answered a frame with ``error``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class IceServers:
    uris: list[str]
    username: str
    password: str
    ttl: int

    @classmethod
    def parse(cls, value: Any) -> IceServers | None:
        if not isinstance(value, dict):
            return None
        uris = value.get("uris")
        if not isinstance(uris, list):
            return None
        return cls(
            [u for u in uris if isinstance(u, str)],
            str(value.get("username", "")),
            str(value.get("password", "")),
            int(value.get("ttl", 0) or 0),
        )

    def __repr__(self) -> str:
        return f"IceServers(uris={self.uris!r}, ttl={self.ttl})"


@dataclass
class Ready:
    user_id: str
    device_id: str | None
    address: str | None
    ice_servers: IceServers | None
    limits: dict[str, Any] = field(default_factory=dict)


@dataclass
class IncomingSignal:
    sender: str
    from_address: str | None
    from_device: str | None
    call_id: str
    event_type: str
    content: dict[str, Any]
    via: str


def connect_url(base: str) -> str:
    url = yarl.URL(base)
    scheme = {"http": "ws", "https": "wss"}.get(url.scheme, url.scheme)
    return str(url.with_scheme(scheme).with_query(None)).rstrip("/") + "/_switchboard/client/v1/connect"


class SignalConnection:
    """One authenticated socket. ``events`` yields IncomingSignal, presence dicts (``type`` kept),
    glare and call_ended dicts; it ends with ``None`` when the socket closes."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, ready: Ready) -> None:
        self._ws = ws
        self.ready = ready
        self.ice_servers = ready.ice_servers
        self.events: asyncio.Queue[IncomingSignal | dict[str, Any] | None] = asyncio.Queue(EVENTS_CAPACITY)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._send_lock = asyncio.Lock()
        self.close_code: int | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, base_url: str, access_token: str) -> SignalConnection:
        try:
            ws = await asyncio.wait_for(
                session.ws_connect(
                    connect_url(base_url),
                    headers={"Authorization": f"Bearer {access_token}"},
                    max_msg_size=MAX_INCOMING_BYTES,
                    heartbeat=None,
                    autoping=True,
                ),
                READY_TIMEOUT,
            )
        except aiohttp.WSServerHandshakeError as error:
            if error.status == 401:
                raise Unauthorized(f"refused: {error.status}") from error
            raise SignalError(f"refused: {error.status}") from error
        except (TimeoutError, aiohttp.ClientError) as error:
            raise SignalError(f"connect: {type(error).__name__}") from error
        try:
            message = await asyncio.wait_for(ws.receive(), READY_TIMEOUT)
            frame = json.loads(message.data) if message.type == aiohttp.WSMsgType.TEXT else None
        except (TimeoutError, ValueError) as error:
            await ws.close()
            raise SignalError("no ready frame") from error
        if not isinstance(frame, dict) or frame.get("type") != "ready":
            await ws.close()
            if ws.close_code == 4001:
                raise Unauthorized("closed 4001")
            raise SignalError(f"expected ready, got {str(frame)[:80]}")
        ready = Ready(
            user_id=str(frame.get("user_id")),
            device_id=frame.get("device_id"),
            address=frame.get("address"),
            ice_servers=IceServers.parse(frame.get("ice_servers")),
            limits=frame.get("limits") or {},
        )
        return cls(ws, ready)

    @property
    def closed(self) -> bool:
        return self._reader.done()

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    frame = json.loads(message.data)
                except ValueError:
                    continue
                if isinstance(frame, dict):
                    await self._dispatch(frame)
        except (TimeoutError, aiohttp.ClientError) as error:
            log.info("signal.read: %s", type(error).__name__)
        finally:
            self.close_code = self._ws.close_code
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(SignalError("the connection closed"))
            self._waiting.clear()
            with contextlib.suppress(asyncio.QueueFull):
                self.events.put_nowait(None)

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        ref = frame.get("ref")
        if kind in ("delivered", "ok", "pong", "error") and isinstance(ref, int) and ref in self._waiting:
            future = self._waiting.pop(ref)
            if not future.done():
                future.set_result(frame)
            return
        if kind == "signal":
            content = frame.get("content")
            if not isinstance(content, dict):
                return
            signal = IncomingSignal(
                sender=str(frame.get("from")),
                from_address=frame.get("from_address"),
                from_device=frame.get("from_device"),
                call_id=str(frame.get("call_id")),
                event_type=str(frame.get("event_type")),
                content=content,
                via=str(frame.get("via")),
            )
            await self.events.put(signal)
        elif kind == "ice_servers":
            self.ice_servers = IceServers.parse(frame) or self.ice_servers
        elif kind in ("presence", "glare", "call_ended"):
            await self.events.put(frame)
        elif kind == "error":
            log.debug("signal.error: %s", frame.get("code"))

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Sends ``frame`` with a fresh id and waits for its answer (raises FrameRefused on error)."""
        if self.closed:
            raise SignalError("the connection closed")
        frame_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[frame_id] = future
        try:
            async with self._send_lock:
                await self._ws.send_str(json.dumps({**frame, "id": frame_id}))
            answer = await asyncio.wait_for(future, ANSWER_TIMEOUT)
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as error:
            raise SignalError(f"{frame.get('type')}: {type(error).__name__}") from error
        finally:
            self._waiting.pop(frame_id, None)
        if answer.get("type") == "error":
            raise FrameRefused(str(answer.get("code")), str(answer.get("message", "")))
        return answer

    async def send_signal(self, to: str, call_id: str, event_type: str, content: dict[str, Any]) -> str:
        """Sends a signal; returns ``via`` of its ``delivered``."""
        answer = await self.request(
            {"type": "signal", "to": to, "call_id": call_id, "event_type": event_type, "content": content}
        )
        return str(answer.get("via"))

    async def watch(self, addresses: list[str]) -> None:
        await self.request({"type": "watch", "addresses": addresses})

    async def connected(self, call_id: str) -> None:
        await self.request({"type": "connected", "call_id": call_id})

    async def close(self) -> None:
        await self._ws.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._reader, 2.0)
