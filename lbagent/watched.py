"""Timers that count only the time the agent was watching.

When the agent itself stalls (a CPU quota's throttling, a paused VM, a long step on its event loop), a timer fires
late, and whatever answer came during the stall sits unread in a socket: a plain timeout would blame the other side
(a health probe's node, ExaBGP) for the agent's own pause. A timer here that fires more than STALL late starts its
whole period again, at most STALL_EXTENSIONS times: what happened while the agent was not looking is unknown, not a
failure. The answer already there is read at once; a side that does not answer still expires after the period of the
agent watching.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

# How late a timer may fire before it counts as a stall of the agent rather than of the other side.
STALL = 0.05
STALL_EXTENSIONS = 3


class WatchedTimer:
    """Calls `expired()` once `seconds` of the agent watching have passed since the last `start()`. A class with
    slots (and watched_timeout a subclass, not a holder): thousands are armed at once, one per probe in flight."""

    __slots__ = ("_deadline", "_expired", "_extensions", "_handle", "_loop", "_seconds")

    def __init__(self, seconds: float, expired: Callable[[], None] | None = None) -> None:
        self._seconds = seconds
        self._expired = expired
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """A full period from now (again, when progress was made), and the whole stall allowance."""
        self.cancel()
        self._extensions = 0
        self._deadline = self._loop.time() + self._seconds
        self._handle = self._loop.call_at(self._deadline, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        now = self._loop.time()
        if now - self._deadline > STALL and self._extensions < STALL_EXTENSIONS:
            self._extensions += 1
            self._deadline = now + self._seconds
            self._handle = self._loop.call_at(self._deadline, self._check)
        else:
            self._handle = None
            self._fire()

    def _fire(self) -> None:
        if self._expired is not None:
            self._expired()


class watched_timeout(WatchedTimer):  # lower case: used as `async with watched_timeout(s)`, like asyncio.timeout
    """`asyncio.timeout(seconds)` that counts only the agent's watching: TimeoutError after `seconds` of it."""

    __slots__ = ("_timeout",)

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self._timeout = asyncio.Timeout(None)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        self.start()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        self.cancel()
        await self._timeout.__aexit__(kind, error, trace)  # raises TimeoutError when it fired

    def _fire(self) -> None:
        self._timeout.reschedule(self._loop.time())  # now: the task is cancelled into TimeoutError
