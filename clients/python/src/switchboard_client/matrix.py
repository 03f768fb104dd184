"""The Matrix base layer: ``/sync`` for to-device events, to-device sends, ``whoami`` and the discovery
of Switchboard (``/.well-known/matrix/client``, key ``org.switchboard.client``), with the client's
own access token. Nothing here depends on Switchboard. Every request is bounded in time and in
answer size; sends are retried (transport errors, 429, 5xx) with the same txn id. The token is never
logged."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import yarl

from .clock import Clock, SystemClock

log = logging.getLogger("switchboard_client.matrix")

WELL_KNOWN_KEY = "org.switchboard.client"
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
# Only what this layer reads: to-device events (rooms, presence and account data left out).
SYNC_FILTER = json.dumps(
    {
        "room": {"rooms": []},
        "presence": {"types": []},
        "account_data": {"types": []},
    },
    separators=(",", ":"),
)


class MatrixError(Exception):
    """A Matrix request failed."""


class HomeserverError(MatrixError):
    """The homeserver answered with an error (Matrix error JSON)."""

    def __init__(self, status: int, errcode: str, error: str) -> None:
        super().__init__(f"{status} {errcode}: {error}")
        self.status = status
        self.errcode = errcode


class InvalidWellKnown(MatrixError):
    """The well-known document names Switchboard in a malformed way."""


@dataclass(frozen=True)
class ToDeviceEvent:
    sender: str
    type: str
    content: dict[str, Any]


def base_url(url: str) -> str:
    parsed = yarl.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise MatrixError(f"not an http(s) URL with a host: {url!r}")
    return str(parsed.with_query(None).with_fragment(None)).rstrip("/")


class MatrixClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        homeserver: str,
        access_token: str,
        request_timeout: float = 30.0,
        attempts: int = 5,
        clock: Clock | None = None,
    ) -> None:
        self._clock: Clock = clock or SystemClock()
        self._session = session
        self.homeserver = base_url(homeserver)
        self._token = access_token
        self._timeout = request_timeout
        self._attempts = attempts

    def __repr__(self) -> str:  # the token stays out of logs
        return f"MatrixClient({self.homeserver!r}, access_token=<redacted>)"

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        headers = {"Authorization": f"Bearer {self._token}"}
        client_timeout = aiohttp.ClientTimeout(total=timeout or self._timeout)
        async with self._session.request(
            method, self.homeserver + path, json=body, params=params, headers=headers, timeout=client_timeout
        ) as response:
            raw = await response.content.read(MAX_RESPONSE_BYTES + 1)
            if len(raw) > MAX_RESPONSE_BYTES:
                raise MatrixError(f"answer over {MAX_RESPONSE_BYTES} bytes")
            try:
                answer = json.loads(raw) if raw else {}
            except ValueError as error:
                raise MatrixError(f"{method} {path.split('?')[0]}: not JSON ({response.status})") from error
            if response.status >= 400:
                errcode = answer.get("errcode", "M_UNKNOWN") if isinstance(answer, dict) else "M_UNKNOWN"
                message = answer.get("error", "") if isinstance(answer, dict) else ""
                raise HomeserverError(response.status, str(errcode), str(message))
            return answer

    async def _with_retry(self, method: str, path: str, body: Any = None) -> Any:
        delay = 0.5
        for attempt in range(self._attempts):
            try:
                return await self._request(method, path, body)
            except HomeserverError as error:
                if error.status != 429 and error.status < 500 or attempt + 1 == self._attempts:
                    raise
            except (TimeoutError, aiohttp.ClientError) as error:
                if attempt + 1 == self._attempts:
                    raise MatrixError(f"{method}: {type(error).__name__}") from error
            await self._clock.sleep(delay)
            delay = min(delay * 2, 8.0)
        raise MatrixError("unreachable")

    async def whoami(self) -> str:
        answer = await self._with_retry("GET", "/_matrix/client/v3/account/whoami")
        user_id = answer.get("user_id") if isinstance(answer, dict) else None
        if not isinstance(user_id, str):
            raise MatrixError("whoami: no user_id")
        return user_id

    async def send_to_device(self, event_type: str, user_id: str, content: dict[str, Any], txn_id: str) -> None:
        """Sends ``content`` to all the user's devices (``*``); retries reuse ``txn_id``."""
        path = f"/_matrix/client/v3/sendToDevice/{quote(event_type, safe='')}/{quote(txn_id, safe='')}"
        await self._with_retry("PUT", path, {"messages": {user_id: {"*": content}}})

    async def discover_switchboard(self) -> str | None:
        """Switchboard's client base URL from the well-known document, or None when it names none."""
        try:
            async with self._session.get(
                self.homeserver + "/.well-known/matrix/client", timeout=aiohttp.ClientTimeout(total=self._timeout)
            ) as response:
                if response.status != 200:
                    return None
                raw = await response.content.read(MAX_RESPONSE_BYTES)
        except (TimeoutError, aiohttp.ClientError) as error:
            raise MatrixError(f"well-known: {type(error).__name__}") from error
        try:
            document = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(document, dict) or WELL_KNOWN_KEY not in document:
            return None
        entry = document[WELL_KNOWN_KEY]
        url = entry.get("base_url") if isinstance(entry, dict) else None
        if not isinstance(url, str):
            raise InvalidWellKnown("no base_url string")
        parsed = yarl.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise InvalidWellKnown("base_url is not an http(s) URL")
        return url

    async def sync_once(self, since: str | None, timeout_ms: int) -> tuple[str, list[ToDeviceEvent]]:
        params = {"timeout": str(timeout_ms), "filter": SYNC_FILTER}
        if since is not None:
            params["since"] = since
        answer = await self._request(
            "GET", "/_matrix/client/v3/sync", params=params, timeout=timeout_ms / 1000 + self._timeout
        )
        if not isinstance(answer, dict) or not isinstance(answer.get("next_batch"), str):
            raise MatrixError("sync: no next_batch")
        events = []
        for raw in (answer.get("to_device") or {}).get("events") or []:
            if not isinstance(raw, dict):
                continue
            sender, kind, content = raw.get("sender"), raw.get("type"), raw.get("content")
            if isinstance(sender, str) and isinstance(kind, str) and isinstance(content, dict):
                events.append(ToDeviceEvent(sender, kind, content))
        return answer["next_batch"], events

    async def sync_forever(self, timeout_ms: int) -> AsyncIterator[list[ToDeviceEvent]]:
        """Batches of to-device events, the first from an initial sync; transient errors are retried
        with backoff; an unknown token (401) ends the loop with HomeserverError."""
        since: str | None = None
        delay = 1.0
        while True:
            try:
                since, events = await self.sync_once(since, 0 if since is None else timeout_ms)
                delay = 1.0
            except HomeserverError as error:
                if error.status in (401, 403):
                    raise
                log.warning("matrix.sync: %s; retrying in %.0f s", error, delay)
                await self._clock.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            except (TimeoutError, aiohttp.ClientError, MatrixError) as error:
                log.warning("matrix.sync: %s; retrying in %.0f s", type(error).__name__, delay)
                await self._clock.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            yield events
