"""One bounded-frequency runner per subsystem: events mark it dirty, it syncs at most every min_interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from lbagent import memory
from lbagent.logfmt import event

log = logging.getLogger("lbagent.runner")

# The sync function is told whether this run is a periodic full resync (re-apply even if nothing changed).
SyncFn = Callable[[bool], Awaitable[None]]


class BoundedFrequencyRunner:
    """Coalesces bursts of `mark_dirty()` into one sync, resyncs every `resync` seconds to repair drift,
    and retries a failed sync after `retry` seconds (or sooner when marked dirty again).

    kube-proxy's BoundedFrequencyRunner and MetalLB's debouncer do the same job.
    """

    def __init__(
        self, name: str, sync: SyncFn, min_interval: float, resync: float, retry: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._sync = sync
        self._min_interval = min_interval
        self._resync = resync
        self._retry = retry
        self._clock = clock
        self._dirty = asyncio.Event()
        self._force = False
        self._last_start: float | None = None
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.runs = 0
        self.failures = 0
        self._synced = asyncio.Event()

    def mark_dirty(self) -> None:
        self._dirty.set()

    def request_resync(self) -> None:
        """The next sync (at once) is a full one: the kernel's state is no longer what was applied."""
        self._force = True
        self._dirty.set()

    async def wait_synced(self) -> None:
        """Until a sync has succeeded since the last call to mark_dirty() that preceded this call."""
        await self._synced.wait()

    async def run_forever(self) -> None:
        next_deadline = self._clock()  # the first run happens at once
        while True:
            timeout = max(0.0, next_deadline - self._clock())
            if not self._dirty.is_set():
                # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a cancellation that
                # races with the event being set, and the agent would then never finish stopping.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._dirty.wait()
            resync = not self._dirty.is_set() or self._force
            if self._last_start is not None:
                gap = self._min_interval - (self._clock() - self._last_start)
                if gap > 0:
                    await asyncio.sleep(gap)
            self._dirty.clear()
            self._force = False
            self._synced.clear()
            self._last_start = self._clock()
            self.runs += 1
            try:
                await self._sync(resync)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                event(log, logging.ERROR, "sync_failed", subsystem=self.name, error=self.last_error,
                      retry_in=self._retry)
                next_deadline = self._clock() + self._retry
                continue
            finally:
                memory.release()  # what the sync built and freed: out of the agent's RSS (lbagent.memory)
            self.last_error = None
            self.last_success = self._clock()
            if not self._dirty.is_set():
                self._synced.set()
            next_deadline = self._clock() + self._resync
