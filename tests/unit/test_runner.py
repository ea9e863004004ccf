"""The bounded-frequency runner: coalescing, retry after failure, periodic resync."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from lbagent.agent.runner import BoundedFrequencyRunner


async def _until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll with a deadline: the runner under test offers no event for 'ran N times'."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def test_burst_of_marks_coalesces_into_few_runs() -> None:
    runs: list[bool] = []

    async def sync(resync: bool) -> None:
        runs.append(resync)

    async def scenario() -> None:
        runner = BoundedFrequencyRunner("t", sync, min_interval=0.05, resync=60, retry=1)
        task = asyncio.create_task(runner.run_forever())
        await _until(lambda: len(runs) == 1)  # the first run happens at once
        for _ in range(100):
            runner.mark_dirty()
        await _until(lambda: len(runs) >= 2)
        await runner.wait_synced()
        task.cancel()

    asyncio.run(scenario())
    assert 2 <= len(runs) <= 3
    assert runs[1] is False  # a dirty run is not a resync


def test_failure_is_retried_and_recorded() -> None:
    attempts: list[int] = []

    async def sync(resync: bool) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("nft said no")

    async def scenario() -> BoundedFrequencyRunner:
        runner = BoundedFrequencyRunner("t", sync, min_interval=0, resync=60, retry=0.01)
        task = asyncio.create_task(runner.run_forever())
        await _until(lambda: runner.last_success is not None)
        task.cancel()
        return runner

    runner = asyncio.run(scenario())
    assert runner.failures == 2
    assert runner.last_error is None
    assert len(attempts) == 3


def test_periodic_resync_runs_without_marks() -> None:
    runs: list[bool] = []

    async def sync(resync: bool) -> None:
        runs.append(resync)

    async def scenario() -> None:
        runner = BoundedFrequencyRunner("t", sync, min_interval=0, resync=0.02, retry=1)
        task = asyncio.create_task(runner.run_forever())
        await _until(lambda: len(runs) >= 3)
        task.cancel()

    asyncio.run(scenario())
    assert runs[1] is True and runs[2] is True


def test_a_sync_longer_than_the_resync_interval_never_overlaps_and_the_next_waits_a_full_interval() -> None:
    """An iptables-nft full apply at 10,000 services takes longer than the default 30 s resync: the runner must
    neither start a second one beside it nor start the next one the moment it ends."""
    running, most, spans = 0, 0, []

    async def sync(resync: bool) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        start = asyncio.get_running_loop().time()
        await asyncio.sleep(0.06)  # three resync intervals
        running -= 1
        spans.append((start, asyncio.get_running_loop().time()))

    async def scenario() -> None:
        runner = BoundedFrequencyRunner("t", sync, min_interval=0, resync=0.02, retry=1)
        task = asyncio.create_task(runner.run_forever())
        await _until(lambda: len(spans) >= 3)
        task.cancel()

    asyncio.run(scenario())
    assert most == 1
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start - end >= 0.02 - 0.002  # a full interval after the previous one ended (loop clock slack)
