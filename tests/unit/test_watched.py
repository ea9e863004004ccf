"""lbagent.watched.WatchedTimer on the event loop's clock, moved by hand: expiry counted from the last start (ExaBGP's
answer timeout: from its last answer), and a timer that fires late is a stall of the agent, not an expiry."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from lbagent.watched import STALL, STALL_EXTENSIONS, WatchedTimer


def on_a_hand_clock(body: Callable[[WatchedTimer, list[float], Callable[[float], Awaitable[None]]], Awaitable[None]],
                    seconds: float = 10.0) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        now = [start]
        loop.time = lambda: now[0]  # type: ignore[method-assign]
        fired: list[float] = []
        timer = WatchedTimer(seconds, lambda: fired.append(now[0] - start))

        async def at(t: float) -> None:
            now[0] = start + t
            for _ in range(3):  # the loop's turns, for due timers to run
                await asyncio.sleep(0)

        timer.start()
        try:
            await body(timer, fired, at)
        finally:
            timer.cancel()

    asyncio.run(main())


def test_a_timer_started_again_counts_from_then() -> None:
    async def body(timer: WatchedTimer, fired: list[float], at: Callable[[float], Awaitable[None]]) -> None:
        await at(9.9)
        assert not fired
        timer.start()  # an answer came: a whole period again
        await at(19.8)
        assert not fired, "10 s from the first start, 9.9 from the second"
        await at(19.9 + STALL / 2)
        assert fired == [pytest.approx(19.9 + STALL / 2)]

    on_a_hand_clock(body)


def test_a_timer_that_fires_late_waits_a_whole_period_again_a_few_times() -> None:
    async def body(timer: WatchedTimer, fired: list[float], at: Callable[[float], Awaitable[None]]) -> None:
        t = 0.0
        for _ in range(STALL_EXTENSIONS):
            t += 10.0 + 0.5  # the agent stalled past the deadline: what happened meanwhile is unknown
            await at(t)
            assert not fired
        t += 10.0 + 0.5
        await at(t)
        assert fired == [pytest.approx(t)], "after STALL_EXTENSIONS stalls it expires all the same"

    on_a_hand_clock(body)


def test_a_cancelled_timer_never_fires() -> None:
    async def body(timer: WatchedTimer, fired: list[float], at: Callable[[float], Awaitable[None]]) -> None:
        timer.cancel()
        await at(100.0)
        assert not fired

    on_a_hand_clock(body)
