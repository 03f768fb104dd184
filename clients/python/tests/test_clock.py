"""The manual clock that tests step instead of sleeping."""

from __future__ import annotations

import asyncio

from switchboard_client import ManualClock


async def test_sleeps_end_in_deadline_order_only_when_the_clock_is_advanced() -> None:
    clock = ManualClock(start=100.0)
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(f"{name}@{clock.monotonic():g}")

    tasks = [asyncio.create_task(sleeper(name, s)) for name, s in (("late", 5.0), ("soon", 1.0), ("mid", 2.0))]
    await asyncio.sleep(0)
    assert clock.pending() == [1.0, 2.0, 5.0]
    await clock.sleep(0)  # a sleep of nothing only yields
    assert woke == []

    clock.advance(0.5)
    await asyncio.sleep(0)
    assert woke == [] and clock.pending() == [0.5, 1.5, 4.5]
    clock.advance(1.5)
    await asyncio.sleep(0)
    assert woke == ["soon@102", "mid@102"]
    clock.advance(10.0)
    await asyncio.gather(*tasks)
    assert woke == ["soon@102", "mid@102", "late@112"]
    assert clock.pending() == []


async def test_wait_ends_on_the_event_or_when_the_clock_passes_the_timeout() -> None:
    clock = ManualClock()
    event = asyncio.Event()

    waiting = asyncio.create_task(clock.wait(event, 3.0))
    await asyncio.sleep(0)
    event.set()
    await asyncio.wait_for(waiting, 1.0)
    assert clock.monotonic() == 0.0

    event.clear()
    waiting = asyncio.create_task(clock.wait(event, 3.0))
    await asyncio.sleep(0)
    clock.advance(2.9)
    await asyncio.sleep(0)
    assert not waiting.done()
    clock.advance(0.1)
    await asyncio.wait_for(waiting, 1.0)
    assert not event.is_set()
