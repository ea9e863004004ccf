"""The child processes lbagent runs and keeps running (ExaBGP, HAProxy): started, watched, logged, restarted with
backoff, stopped with escalating signals. One supervisor for every daemon, so each behaves the same way when it
crashes, prints or is stopped; what is particular to one (ExaBGP's API connection, HAProxy's master and workers)
stays with its owner.

A `Supervisor` keeps one instance of a program running. Its owner gives it `launch`, which starts an instance
(with `spawn`: the command line, the files it needs, when it counts as started) and returns it; the supervisor
calls it again after every exit, waiting a capped exponential backoff after a crash and none after a restart its
owner asked for. An owner that must see a start fail (HAProxy refusing a config) starts the first instance itself
and hands it over with `watch`; a process left by a previous agent is taken over with `adopt` and `watch`.

Events, all on the owner's logger and named after the program (`exabgp_exited`, `haproxy_output`, ...):
`<name>_output pid line` for every line it prints (the owner picks the level), `<name>_exited pid status planned`,
`<name>_restart pid reason planned` when its owner asks for a new instance, `<name>_restarting delay` before a
backoff, `<name>_start_failed error`, `<name>_stop_escalated pid signal` when a stop needs its next signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lbagent.logfmt import event

Step = tuple[signal.Signals, float]
"""One step of a stop: the signal, then how long to wait (seconds) for the process to exit before the next step."""

_PR_SET_PDEATHSIG = 1
# Resolved in the parent: the child between fork and exec should do as little as possible.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_LINE_MAX = 65536  # longer output lines are logged in pieces


def terminate_steps(timeout: float) -> list[Step]:
    """SIGTERM, then SIGKILL after `timeout` seconds (and as long again for the kill to take effect)."""
    return [(signal.SIGTERM, timeout), (signal.SIGKILL, timeout)]


@dataclass(eq=False)
class Child:
    """A running process: one lbagent spawned (it has `proc` and may have an output pump), or one it adopted (a
    process it did not start, watched through a pidfd). Signals go through a pidfd: never to a reused pid."""

    pid: int
    started: float  # the event loop's clock
    exited: asyncio.Future[None]
    proc: asyncio.subprocess.Process | None = None
    output: asyncio.Task[None] | None = None
    dies_with_parent: bool = False
    _pidfd: int | None = field(default=None, repr=False)
    _waiter: asyncio.Task[int] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def signal(self, signum: int) -> None:
        if self._pidfd is not None and self.running:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    async def status(self, timeout: float = 5.0) -> int | None:
        """The exit status once it has exited (negative: the signal that ended it); None for an adopted process,
        or one still running after `timeout` seconds."""
        if self.proc is None:
            await wait_for_done(self.exited, timeout)
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        return None

    async def terminate(self, steps: Sequence[Step], logger: logging.Logger, name: str) -> bool:
        """Send each step's signal in turn until it exits, logging `<name>_stop_escalated` for each step after the
        first; whether it exited."""
        for i, (signum, wait) in enumerate(steps):
            if not self.running:
                break
            if i > 0:
                event(logger, logging.WARNING, f"{name}_stop_escalated", pid=self.pid, signal=signum.name)
            self.signal(signum)
            await wait_for_done(self.exited, wait)
        return not self.running

    async def end(self, steps: Sequence[Step], logger: logging.Logger, name: str,
                  output_grace: float = 1.0) -> int | None:
        """terminate(), then its status (None if it outlived every step) once its output is read to the end (for
        at most `output_grace` seconds: a grandchild may hold the pipe)."""
        exited = await self.terminate(steps, logger, name)
        return await self.reap(output_grace) if exited else None

    async def reap(self, output_grace: float = 1.0) -> int | None:
        """For a process that has exited: its status, its output read to the end (for at most `output_grace`
        seconds), its pidfd closed."""
        status = await self.status()
        await self.drain(output_grace)
        self.close()
        return status

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the output pump to read everything, then stop it."""
        if self.output is not None and not await wait_for_done(self.output, timeout):
            self.output.cancel()
            await asyncio.wait({self.output})

    def close(self) -> None:
        """Release the pidfd (signals are no-ops from now on)."""
        if self._pidfd is not None:
            if self.proc is None:
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


async def wait_for_done(future: asyncio.Future[Any], timeout: float) -> bool:
    """Wait for `future` for up to `timeout` seconds without cancelling it; True when it is done."""
    if not future.done() and timeout > 0:
        await asyncio.wait({future}, timeout=timeout)
    return future.done()


async def spawn(
    name: str,
    argv: Sequence[str],
    logger: logging.Logger,
    *,
    env: Mapping[str, str] | None = None,
    die_with_parent: bool = True,
    on_line: Callable[[str], int] | None = None,
) -> Child:
    """Start `argv` in its own session (a ^C meant for the agent must not reach it), stdin from /dev/null, stdout
    and stderr logged line by line as `<name>_output` events: at info, or at the level `on_line` returns (it sees
    every line first). With `die_with_parent` the kernel sends it SIGTERM when the agent dies (PR_SET_PDEATHSIG):
    a dead agent must not leave a daemon working for it. OSError when it cannot be started."""
    loop = asyncio.get_running_loop()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        start_new_session=True,
        preexec_fn=_die_with(os.getpid()) if die_with_parent else None,
    )
    exited: asyncio.Future[None] = loop.create_future()
    pidfd: int | None = None
    with contextlib.suppress(ProcessLookupError):  # already gone: nothing left to signal
        pidfd = os.pidfd_open(proc.pid)
    # The exit as asyncio's child watcher reaps it: the status comes with it, and no other waiter can race it.
    waiter = asyncio.create_task(proc.wait(), name=f"{name}-wait")

    def reaped(_: asyncio.Task[int]) -> None:
        if not exited.done():
            exited.set_result(None)

    waiter.add_done_callback(reaped)
    child = Child(proc.pid, loop.time(), exited, proc, dies_with_parent=die_with_parent, _pidfd=pidfd,
                  _waiter=waiter)
    assert proc.stdout is not None
    child.output = asyncio.create_task(_pump(proc.stdout, proc.pid, name, logger, on_line), name=f"{name}-output")
    return child


def adopt(pid: int) -> Child:
    """Watch a process lbagent did not start (not its child: no status, no output); `exited` is done when it ends.
    A pid that is gone already gives a Child that has exited."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        exited.set_result(None)
        return Child(pid, loop.time(), exited)
    child = Child(pid, loop.time(), exited, _pidfd=pidfd)

    def fire() -> None:
        child.close()
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, fire)
    return child


async def _pump(stream: asyncio.StreamReader, pid: int, name: str, logger: logging.Logger,
                on_line: Callable[[str], int] | None) -> None:
    def emit(raw: bytes) -> None:
        for start in range(0, len(raw), _LINE_MAX):
            text = raw[start:start + _LINE_MAX].decode("utf-8", "replace").rstrip()
            if text:
                level = on_line(text) if on_line is not None else logging.INFO
                event(logger, level, f"{name}_output", pid=pid, line=text)

    pending = b""
    while chunk := await stream.read(_LINE_MAX):
        *lines, pending = (pending + chunk).split(b"\n")
        if len(pending) >= _LINE_MAX:
            lines.append(pending)
            pending = b""
        for line in lines:
            emit(line)
    emit(pending)


def _die_with(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the agent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


@dataclass(frozen=True)
class _Request:
    reason: str
    planned: bool
    grace: float
    of: Child | None


class Supervisor:
    """Keeps one instance of a program running (see the module's docstring)."""

    def __init__(
        self,
        name: str,
        launch: Callable[[], Awaitable[Child]],
        logger: logging.Logger,
        *,
        on_exit: Callable[[Child, int | None, bool], None] = lambda child, status, planned: None,
        stop_steps: Sequence[Step] = terminate_steps(5.0),
        backoff: tuple[float, float] = (0.5, 10.0),
        output_grace: float = 1.0,
    ) -> None:
        """`launch` starts an instance and returns it (raising if it could not); `on_exit(child, status,
        planned)` is called once for every instance that ended, before any new one is started; `stop_steps` end an
        instance for a restart (and for stop() unless it is given others); `backoff` (low, high): the first delay
        after a crash, doubled at each further one up to high, back to low once an instance ran for high seconds;
        `output_grace`: how long an ended instance's output may go on (a grandchild holding the pipe)."""
        self.name = name
        self._launch = launch
        self._log = logger
        self._on_exit = on_exit
        self._stop_steps = list(stop_steps)
        self._backoff = backoff
        self._output_grace = output_grace
        self._child: Child | None = None
        self._task: asyncio.Task[None] | None = None
        self._request: _Request | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._ended = False  # an instance ended other than by stop() and none has been started since
        self.restarts = 0
        """Instances started after one ended other than by stop(): crashes, and restarts the owner asked for."""

    @property
    def child(self) -> Child | None:
        """The current instance while it runs."""
        child = self._child
        return child if child is not None and child.running else None

    @property
    def supervising(self) -> bool:
        return self._task is not None and not self._task.done()

    def run(self) -> None:
        """Start supervising: the first instance is launched at once, and again (with backoff) whenever it fails."""
        if self.supervising:
            raise RuntimeError(f"{self.name} is already supervised")
        self._stopping = False
        self._task = asyncio.create_task(self._supervise(), name=f"{self.name}-supervisor")

    def watch(self, child: Child) -> None:
        """Supervise an instance started (or adopted) by the owner: when it exits, launch another one."""
        current = self.child
        if current is not None and current is not child:
            raise RuntimeError(f"{self.name} pid {current.pid} is running: cannot watch pid {child.pid} too")
        self._take(child)
        self._wake.set()
        if not self.supervising:
            self._stopping = False
            self._task = asyncio.create_task(self._supervise(), name=f"{self.name}-supervisor")

    def restart(self, reason: str, *, planned: bool, grace: float = 0.0, of: Child | None = None) -> None:
        """End the current instance (after `grace` seconds, if it has not exited by itself) and start another: at
        once when `planned`, else after the backoff like a crash. `of`: the instance meant; the request is dropped
        if another one is current by then."""
        self._request = _Request(reason, planned, grace, of)
        self._wake.set()

    async def stop(self, steps: Sequence[Step] | None = None) -> int | None:
        """End the current instance with `steps` (default: those given at construction) and supervise no more;
        its status. Calling run() or watch() again supervises anew."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()  # wherever it is (watching, in a backoff, launching): the launch cleans up after itself
            await asyncio.wait({task})
        child, status = self._child, None
        if child is not None:
            status = await child.end(steps if steps is not None else self._stop_steps, self._log, self.name,
                                     self._output_grace)
            self._finish(child, status, True)
        self._request = None
        self._ended = False
        return status

    # -- the loop

    def _take(self, child: Child) -> None:
        if child is self._child:
            return
        self._child = child
        if self._ended:
            self._ended = False
            self.restarts += 1

    def _finish(self, child: Child, status: int | None, planned: bool) -> None:
        if self._child is child:
            self._child = None
        if not self._stopping:
            self._ended = True
        event(self._log, logging.INFO if planned else logging.ERROR, f"{self.name}_exited", pid=child.pid,
              status=status, planned=planned)
        try:
            self._on_exit(child, status, planned)
        except Exception:
            self._log.exception(f"{self.name}_on_exit_failed")  # event=..._on_exit_failed error=<the traceback>

    async def _supervise(self) -> None:
        low, high = self._backoff
        delay = low
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                child = self._child
                if child is None:
                    self._request = None  # meant for an instance that is gone
                    try:
                        child = await self._launch()
                    except Exception as error:
                        event(self._log, logging.ERROR, f"{self.name}_start_failed", error=str(error) or repr(error))
                    else:
                        self._take(child)
                        continue
                else:
                    planned = await self._watch(child)
                    if self._stopping:
                        return
                    if planned:
                        delay = low
                        continue
                    if loop.time() - child.started >= high:
                        delay = low
                event(self._log, logging.WARNING, f"{self.name}_restarting", delay=delay)
                await self._backoff_wait(delay)
                delay = min(delay * 2, high)
        except asyncio.CancelledError:
            child = self._child
            if not self._stopping and child is not None and child.dies_with_parent:
                # The agent is going away without stop() (its tasks cancelled): not without its children.
                child.signal(signal.SIGKILL)
                await child.status()
            raise

    async def _backoff_wait(self, delay: float) -> None:
        """Wait `delay` seconds, less if a planned restart is asked for or an instance is handed over (watch())."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while self._child is None and not (self._request is not None and self._request.planned):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    async def _watch(self, child: Child) -> bool:
        """Until `child` exits (on its own, or ended for a restart); whether the restart was planned."""
        while True:
            request = self._request
            if request is not None and request.of not in (None, child):
                self._request = request = None
            if request is not None:
                break
            self._wake.clear()
            waker = asyncio.create_task(self._wake.wait())
            either: set[asyncio.Future[Any]] = {child.exited, waker}
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()
            if not child.running:
                break
        self._request = None
        planned = request is not None and request.planned
        if request is not None and child.running:
            event(self._log, logging.INFO if planned else logging.WARNING, f"{self.name}_restart", pid=child.pid,
                  reason=request.reason, planned=planned)
            if not await wait_for_done(child.exited, request.grace):
                await child.terminate(self._stop_steps, self._log, self.name)
        status = await child.reap(self._output_grace) if not child.running else None
        self._finish(child, status, planned)
        return planned
