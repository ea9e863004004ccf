"""lbagent.supervisor with real, short-lived child processes (the virtualenv's Python): restarts with backoff after a
crash, output as key=value events, stops that escalate from SIGTERM to SIGKILL at their deadline, children that die
with their parent, and no restart after a stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from lbagent import supervisor
from lbagent.logfmt import LogfmtFormatter
from lbagent.supervisor import Child, Supervisor

PYTHON = sys.executable
LOG = logging.getLogger("lbagent.test.supervisor")


def python(code: str) -> list[str]:
    return [PYTHON, "-c", code]


CRASH = python("print('up', flush=True); raise SystemExit(3)")
# Says it is ready once SIGTERM is ignored: a stop must then escalate to SIGKILL.
STUBBORN = python("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
                  "time.sleep(60)")
SLEEPER = python("import time; print('ready', flush=True); time.sleep(60)")


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


async def until(what: str, predicate: Callable[[], object], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class Launcher:
    """The owner's launch: spawns `argv` each time, and remembers when and what."""

    def __init__(self, argv: list[str], name: str = "demo", on_line: Callable[[str], int] | None = None) -> None:
        self.argv = argv
        self.name = name
        self.on_line = on_line
        self.times: list[float] = []
        self.children: list[Child] = []

    async def __call__(self) -> Child:
        self.times.append(asyncio.get_running_loop().time())
        child = await supervisor.spawn(self.name, self.argv, LOG, on_line=self.on_line)
        self.children.append(child)
        return child


class Lines:
    """An on_line that keeps what the child printed."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, line: str) -> int:
        self.seen.append(line)
        return logging.ERROR if "ALERT" in line else logging.INFO


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [dict(r.__dict__["lbagent_fields"]) for r in caplog.records if r.getMessage() == name]


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_crashed_child_is_restarted_with_a_doubling_backoff(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    launch = Launcher(CRASH)
    exits: list[tuple[int, int | None, bool]] = []
    sup = Supervisor("demo", launch, LOG, backoff=(0.1, 0.8),
                     on_exit=lambda child, status, planned: exits.append((child.pid, status, planned)))

    async def scenario() -> None:
        sup.run()
        try:
            await until("three restarts", lambda: sup.restarts >= 3)
        finally:
            await sup.stop()
        gaps = [b - a for a, b in zip(launch.times, launch.times[1:4], strict=False)]
        assert [round(d["delay"], 3) for d in events(caplog, "demo_restarting")][:3] == [0.1, 0.2, 0.4]
        for gap, delay in zip(gaps, (0.1, 0.2, 0.4), strict=True):
            assert gap >= delay, gaps
        assert sup.restarts >= 3
        assert exits[:3] == [(c.pid, 3, False) for c in launch.children[:3]], "every exit reported, with its status"
        crashed = events(caplog, "demo_exited")[:3]
        assert [(e["status"], e["planned"]) for e in crashed] == [(3, False)] * 3
        assert all(not alive(c.pid) for c in launch.children)

    run(scenario)


def test_backoff_starts_again_low_after_a_long_enough_run(caplog: pytest.LogCaptureFixture) -> None:
    """An instance that ran `high` seconds was healthy: its crash waits the low delay again, not a doubled one."""
    caplog.set_level(logging.INFO, LOG.name)
    launch = Launcher(python("import time; time.sleep(0.3); raise SystemExit(1)"))
    sup = Supervisor("demo", launch, LOG, backoff=(0.05, 0.25))

    async def scenario() -> None:
        sup.run()
        try:
            await until("three starts", lambda: len(launch.times) >= 3)
        finally:
            await sup.stop()
        assert [d["delay"] for d in events(caplog, "demo_restarting")][:2] == [0.05, 0.05]

    run(scenario)


def test_output_lines_are_key_value_events(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    lines = Lines()
    code = "print('hello world'); print('[ALERT] x=\"1\" broken'); print(); print('no newline at the end', end='')"
    launch = Launcher(python(code), on_line=lines)
    sup = Supervisor("demo", launch, LOG, backoff=(30.0, 30.0))

    async def scenario() -> None:
        sup.run()
        try:
            await until("the exit", lambda: events(caplog, "demo_exited"))
        finally:
            await sup.stop()

    run(scenario)
    pid = launch.children[0].pid
    output = [r for r in caplog.records if r.getMessage() == "demo_output"]
    assert lines.seen == ["hello world", '[ALERT] x="1" broken', "no newline at the end"]
    assert [r.levelno for r in output] == [logging.INFO, logging.ERROR, logging.INFO], "on_line picks the level"
    formatted = [LogfmtFormatter(with_time=False).format(r) for r in output]
    assert formatted == [
        f'level=info logger={LOG.name} event=demo_output pid={pid} line="hello world"',
        f'level=error logger={LOG.name} event=demo_output pid={pid} line="[ALERT] x=\\"1\\" broken"',
        f'level=info logger={LOG.name} event=demo_output pid={pid} line="no newline at the end"',
    ]
    exited = LogfmtFormatter(with_time=False).format(next(r for r in caplog.records if r.getMessage() == "demo_exited"))
    assert exited == f"level=error logger={LOG.name} event=demo_exited pid={pid} status=0 planned=false"


def test_long_output_lines_are_logged_in_pieces(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    launch = Launcher(python("import sys; sys.stdout.write('x' * 200000 + '\\nend\\n')"))
    sup = Supervisor("demo", launch, LOG, backoff=(30.0, 30.0))

    async def scenario() -> None:
        sup.run()
        try:
            await until("the exit", lambda: events(caplog, "demo_exited"))
        finally:
            await sup.stop()

    run(scenario)
    lines = [e["line"] for e in events(caplog, "demo_output")]
    assert "".join(lines[:-1]) == "x" * 200000 and lines[-1] == "end"
    assert max(len(line) for line in lines) <= 65536


def test_stop_escalates_to_sigkill_after_the_deadline(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    lines = Lines()
    launch = Launcher(STUBBORN, on_line=lines)
    exits: list[tuple[int | None, bool]] = []
    sup = Supervisor("demo", launch, LOG, on_exit=lambda child, status, planned: exits.append((status, planned)))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        sup.run()
        await until("SIGTERM ignored", lambda: lines.seen == ["ready"])
        child = sup.child
        assert child is not None
        begun = loop.time()
        status = await sup.stop([(signal.SIGTERM, 0.5), (signal.SIGKILL, 5.0)])
        took = loop.time() - begun
        assert 0.5 <= took < 5.0, took
        assert status == -signal.SIGKILL and not alive(child.pid)
        assert exits == [(-signal.SIGKILL, True)]
        assert events(caplog, "demo_stop_escalated") == [{"pid": child.pid, "signal": "SIGKILL"}]
        assert sup.child is None and not sup.supervising

    run(scenario)


def test_stop_of_a_child_that_obeys_sigterm_does_not_escalate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    lines = Lines()
    launch = Launcher(SLEEPER, on_line=lines)
    sup = Supervisor("demo", launch, LOG)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        sup.run()
        await until("the child", lambda: lines.seen == ["ready"])
        begun = loop.time()
        assert await sup.stop([(signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)]) == -signal.SIGTERM
        assert loop.time() - begun < 2.0
        assert events(caplog, "demo_stop_escalated") == []
        assert [(e["status"], e["planned"]) for e in events(caplog, "demo_exited")] == [(-signal.SIGTERM, True)]

    run(scenario)


def test_no_restart_after_stop() -> None:
    """A crash-looping child stopped in its backoff, and a running one stopped: nothing is started afterwards."""
    crashing = Launcher(CRASH)
    sup = Supervisor("demo", crashing, LOG, backoff=(0.05, 0.05))
    lines = Lines()
    running = Launcher(SLEEPER, on_line=lines)
    other = Supervisor("other", running, LOG, backoff=(0.05, 0.05))

    async def scenario() -> None:
        sup.run()
        await until("a restart", lambda: len(crashing.times) >= 2)
        await sup.stop()
        started = len(crashing.times)
        other.run()
        await until("the child", lambda: lines.seen == ["ready"])
        await other.stop()
        # Ten times the backoff: a supervisor still at work would have started something by then.
        with pytest.raises(AssertionError):
            await until("another start", lambda: len(crashing.times) > started or len(running.times) > 1, 0.5)
        assert not sup.supervising and not other.supervising
        assert all(not alive(c.pid) for c in crashing.children + running.children)

    run(scenario)


def test_planned_restart_is_immediate_and_an_unplanned_one_waits_the_backoff(
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    launch = Launcher(SLEEPER)
    sup = Supervisor("demo", launch, LOG, backoff=(1.0, 10.0))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        sup.run()
        await until("the first", lambda: sup.child is not None)
        first = sup.child
        assert first is not None
        sup.restart("new settings", planned=True)
        await until("the second", lambda: sup.child not in (None, first))
        assert launch.times[1] - launch.times[0] < 1.0, "no backoff for a planned restart"
        assert not alive(first.pid)
        second = sup.child
        assert second is not None
        sup.restart("stale request", planned=False, of=first)
        with pytest.raises(AssertionError):
            await until("the stale request to end the second", lambda: sup.child is not second, 0.3)
        sup.restart("its API went away", planned=False)
        asked = loop.time()
        await until("the third", lambda: sup.child not in (None, second))
        assert launch.times[2] - asked >= 1.0, "an unplanned restart waits the backoff"
        assert sup.restarts == 2
        await sup.stop()
        assert [(e["reason"], e["planned"]) for e in events(caplog, "demo_restart")] == [
            ("new settings", True), ("its API went away", False)], "the stale request was dropped"

    run(scenario)


def test_restart_grace_lets_the_child_exit_by_itself(caplog: pytest.LogCaptureFixture) -> None:
    """HAProxy's master leaves by itself when its worker dies: the grace gives it the time before any signal."""
    caplog.set_level(logging.INFO, LOG.name)
    launch = Launcher(python("import time; print('ready', flush=True); time.sleep(0.3); raise SystemExit(7)"))
    sup = Supervisor("demo", launch, LOG, backoff=(0.05, 1.0))

    async def scenario() -> None:
        sup.run()
        await until("the first", lambda: sup.child is not None)
        sup.restart("worker gone", planned=False, grace=5.0)
        await until("the second", lambda: len(launch.times) >= 2)
        await sup.stop()

    run(scenario)
    assert events(caplog, "demo_exited")[0]["status"] == 7, "not signalled: it exited by itself within the grace"


def test_failed_launch_is_retried_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    attempts: list[float] = []

    async def launch() -> Child:
        attempts.append(asyncio.get_running_loop().time())
        return await supervisor.spawn("demo", ["/nonexistent/program"], LOG)

    sup = Supervisor("demo", launch, LOG, backoff=(0.05, 0.1))

    async def scenario() -> None:
        sup.run()
        try:
            await until("three attempts", lambda: len(attempts) >= 3)
        finally:
            await sup.stop()

    run(scenario)
    failures = events(caplog, "demo_start_failed")
    assert len(failures) >= 3 and "/nonexistent/program" in failures[0]["error"]


def test_watch_supervises_a_child_started_by_its_owner_and_counts_restarts() -> None:
    """HAProxy starts its first master itself (to see the start fail) and hands it over."""
    launch = Launcher(SLEEPER)
    sup = Supervisor("demo", launch, LOG, backoff=(0.05, 1.0))

    async def scenario() -> None:
        mine = await supervisor.spawn("demo", CRASH, LOG)
        sup.watch(mine)
        await until("a launch after it crashed", lambda: sup.child is not None and sup.child is not mine)
        assert sup.restarts == 1 and launch.times
        await sup.stop()
        again = await supervisor.spawn("demo", SLEEPER, LOG)
        sup.watch(again)
        assert sup.restarts == 1, "a start after a stop is no restart"
        assert sup.child is again
        await sup.stop()
        assert not alive(again.pid)

    run(scenario)


def test_adopted_process_is_watched_and_signalled_through_a_pidfd() -> None:
    """A process lbagent did not start (a master left by a previous agent): its exit noticed, its stop escalated."""
    stranger = subprocess.Popen(STUBBORN, stdout=subprocess.PIPE, text=True)
    try:
        assert stranger.stdout is not None and stranger.stdout.readline() == "ready\n"

        async def scenario() -> None:
            child = supervisor.adopt(stranger.pid)
            assert child.running and child.proc is None
            reaper = asyncio.create_task(asyncio.to_thread(stranger.wait))
            assert await child.end([(signal.SIGTERM, 0.2), (signal.SIGKILL, 5.0)], LOG, "demo") is None
            assert not child.running
            assert await reaper == -signal.SIGKILL
            assert not supervisor.adopt(stranger.pid).running, "a pid that is gone gives an exited child"

        run(scenario)
    finally:
        if stranger.poll() is None:
            stranger.kill()
            stranger.wait()
        if stranger.stdout is not None:
            stranger.stdout.close()


ORPHANED = """
import asyncio, logging, sys
from lbagent import supervisor

async def main():
    child = await supervisor.spawn("demo", [sys.executable, "-c", "import time; time.sleep(60)"],
                                   logging.getLogger("demo"), die_with_parent=sys.argv[1] == "yes")
    print(child.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.parametrize("dies", [True, False])
def test_child_dies_with_its_parent_when_asked(dies: bool) -> None:
    """ExaBGP must not outlive a killed agent (it would keep announcing); HAProxy must (the next agent adopts it)."""
    parent = subprocess.Popen([PYTHON, "-c", ORPHANED, "yes" if dies else "no"], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
        parent.wait()

        async def gone() -> None:
            await until("the orphan to die", lambda: not alive(child), 5.0)

        if dies:
            run(gone)
        else:
            with pytest.raises(AssertionError, match="timed out"):
                run(lambda: until("the orphan to die", lambda: not alive(child), 1.0))
            assert alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)


def test_cancelled_supervision_kills_a_child_that_dies_with_its_parent() -> None:
    """The agent going away without stop() (its tasks cancelled) still leaves no ExaBGP behind."""
    lines = Lines()
    launch = Launcher(SLEEPER, on_line=lines)
    pids: list[int] = []

    async def scenario() -> None:
        sup = Supervisor("demo", launch, LOG)
        sup.run()
        await until("the child", lambda: lines.seen == ["ready"])
        assert sup.child is not None
        pids.append(sup.child.pid)
        # asyncio.run cancels the supervisor's task on the way out

    run(scenario)
    assert pids
    run(lambda: until("the child killed", lambda: not alive(pids[0]), 5.0))
