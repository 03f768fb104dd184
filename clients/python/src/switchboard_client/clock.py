"""Where the client reads the time and waits: a :class:`Clock` passed in through
:class:`~switchboard_client.ClientConfig`, as the Rust client's ``Clock``.

:class:`SystemClock` is the default. :class:`ManualClock` moves only when a test calls
:meth:`ManualClock.advance`, so a test steps through backoffs and timeouts instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Returns once ``seconds`` have passed on this clock."""
        ...

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        """Returns once ``event`` is set or ``seconds`` have passed on this clock."""
        ...


class SystemClock:
    """The process's monotonic clock and asyncio's timers."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)


class ManualClock:
    """A clock that stands still until :meth:`advance` moves it. Sleepers wake in deadline order
    when the clock reaches their deadline; a sleep of zero or less only yields."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def _alarm(self, seconds: float) -> asyncio.Future[None]:
        """A future done once the clock reaches now + ``seconds`` (the deadline is fixed here)."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), woken))
        return woken

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        await self._alarm(seconds)

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        alarm = self._alarm(seconds)
        waiting = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({waiting, alarm}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            alarm.cancel()

    def pending(self) -> list[float]:
        """The sleeps under way, as the seconds each has left, soonest first."""
        return sorted(deadline - self._now for deadline, _, woken in self._sleepers if not woken.done())

    def advance(self, seconds: float) -> None:
        """Moves the clock on by ``seconds`` and wakes every sleep whose deadline it reached."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, woken = heapq.heappop(self._sleepers)
            if not woken.done():
                woken.set_result(None)
