"""HAProxy as lbagent's HTTP layer: the only code that runs haproxy (its CLI sockets: lbagent.l7.runtime).

One master-worker HAProxy (`haproxy -W`) per agent, started, restarted and stopped through lbagent.supervisor;
what is HAProxy's own stays here: the worker behind the master, adopting a master a previous agent left, reloads.
A structural change of the rendered config is checked with `haproxy -c` and then reloaded seamlessly through the
master CLI; server weights and states go through the admin socket's runtime API and never need a reload.

HAProxy 2.6 facts this relies on (Debian 12's 2.6.12, checked against its management guide and by hand):

- In master-worker mode the master hands the listening sockets to the new worker itself on a reload (it starts
  the worker with `-x sockpair@<fd>`): no `-x` on our command line, and `expose-fd listeners` is not needed for
  that (it is harmless, the rendered config carries it).
- `reload` on the master CLI re-executes the master and answers nothing; the master keeps its pid. It succeeded
  when `show proc` shows the master's reload counter moved on and a new pid under `# workers`; it failed when
  the `[failed: N]` counter moved on: the master then keeps the previous worker, which goes on serving.
- When the current worker dies, the master kills the others and exits (exit-on-failure is the default); when
  the master dies, its workers exit. SIGUSR1 to the master is a soft stop of everything; SIGTERM a hard one.
- HAProxy ignores SIGPIPE, so a master whose output pipe lost its reader (the agent died) keeps working.

A master left running by a previous agent (its pid file names a live haproxy whose command line carries our
config path) is adopted: reloaded with the new config rather than replaced, so its connections survive the
agent's restart. For the same reason HAProxy does not die with the agent (no parent-death signal): an agent
that stops in order stops HAProxy; one that crashes leaves it serving for the next one to adopt.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lbagent.files import private_dir, write_private
from lbagent.l7.runtime import (
    PREFIX,
    Procs,
    ProxyError,
    RuntimeClient,
    RuntimeState,
    Unavailable,
    check_name,
    haproxy_words,
    sanitized_pem,
)
from lbagent.logfmt import event
from lbagent.plan.http import ServerState
from lbagent.supervisor import Child, Step, Supervisor, adopt, spawn, terminate_steps, wait_for_done

log = logging.getLogger("lbagent.haproxy")

_SUN_PATH_MAX = 107  # sockaddr_un.sun_path, less the terminating NUL
_TMP_SUFFIX = 24  # HAProxy binds a unix socket as "<path>.<pid>.tmp" and renames it into place

# HAProxy warnings that are the expected result of what lbagent did (a reload, a runtime command): logged as info.
_ROUTINE = re.compile(
    r"Proxy \S+ stopped|Former worker \(\d+\) exited with code 0|Exiting Master process"
    r"|All workers exited\. Exiting\.\.\. \(0\)"
    r"|Server \S+ (is going DOWN for maintenance|enters drain state|is UP/READY|is leaving drain)"
)


class ConfigRefused(ProxyError):
    """HAProxy will not take this config (validation, or a reload that fell back): trying again changes nothing
    until the config does. Any other ProxyError is about HAProxy's state and worth retrying."""


class _ReloadRefused(ConfigRefused):
    """The master tried the new config and went back to the previous worker."""


@dataclass
class ApplyResult:
    reloaded: bool  # a new worker took over (a structural change, or an adopted master taking our config)
    runtime_updates: int  # runtime API commands that changed something
    started: bool  # HAProxy was not running and has been started


class ProxyLayer(Protocol):
    """The HTTP layer as the agent sees it: HaproxyProcess, or tests.fakes.FakeProxy in the agent's unit tests."""

    reloads: dict[str, int]  # successful reloads by reason
    runtime_updates: int  # runtime API commands that changed something, in total

    @property
    def restarts(self) -> int:
        """Masters started again after one died."""

    @property
    def runtime_socket(self) -> str:
        """The admin socket the rendered config must declare (`stats socket <it> ... level admin`)."""

    def up(self) -> bool:
        """A master runs and its worker answered on the admin socket (and has not gone away since)."""

    async def validate(self, config: str) -> None:
        """Raise ProxyError (with HAProxy's complaint) unless `haproxy -c` accepts the config."""

    async def apply(self, config: str, structure: str, runtime: RuntimeState, reason: str) -> ApplyResult:
        """Make HAProxy run `config`: start it, or reload it when `structure` changed, then set what differs
        of `runtime` ((backend, server) -> (weight, state)) over the runtime API."""

    async def set_certificate(self, path: str, pem: str) -> None:
        """Replace a certificate file HAProxy serves, without a reload."""

    async def stop(self, grace: float) -> None:
        """Soft stop (established connections finish) for up to `grace` seconds, then a hard one."""


def resolve(executable: str) -> str:
    """The HAProxy executable `proxy.haproxy` names: a path, or a name looked up in PATH (then /usr/sbin)."""
    found = executable
    if "/" not in found:
        found = shutil.which(found) or shutil.which(found, path="/usr/sbin:/usr/local/sbin") or ""
    if not found or not os.access(found, os.X_OK):
        raise ProxyError(f"cannot run HAProxy: {executable!r} is not an executable (nor found in PATH)")
    return found


def haproxy_directory(runtime_dir: str | Path) -> Path:
    """Where HAProxy's config, sockets and pid file live: `<runtimeDir>/haproxy` (absolute: HAProxy runs elsewhere)."""
    return Path(os.path.abspath(runtime_dir)) / "haproxy"


def runtime_socket(runtime_dir: str | Path) -> str:
    """The runtime API socket haproxy.cfg names and the agent talks to."""
    return str(haproxy_directory(runtime_dir) / "api.sock")


class HaproxyProcess:
    """Runs one master-worker HAProxy on files under `<runtime_dir>/haproxy/`, supervised by lbagent.supervisor."""

    def __init__(
        self,
        executable: str,
        runtime_dir: str | Path,
        on_change: Callable[[], None] = lambda: None,
        *,
        command_timeout: float = 5.0,
        start_timeout: float = 15.0,
        reload_timeout: float = 15.0,
        check_timeout: float = 60.0,
        kill_timeout: float = 3.0,
        backoff: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        self._executable = executable
        self.directory = haproxy_directory(runtime_dir)
        for sock in (self.master_socket, self.runtime_socket):
            if len(sock) + _TMP_SUFFIX > _SUN_PATH_MAX:
                raise ValueError(f"runtime directory too deep for a unix socket path: {sock}")
        self._on_change = on_change
        self._command_timeout = command_timeout
        self._start_timeout = start_timeout
        self._reload_timeout = reload_timeout
        self._check_timeout = check_timeout
        self._kill_timeout = kill_timeout
        self.reloads: dict[str, int] = {}
        self.runtime_updates = 0
        self.last_commands: list[str] = []
        """The runtime API commands the last apply() sent."""
        self._runtime = RuntimeClient(self.master_socket, self.runtime_socket, command_timeout)
        self._supervisor = Supervisor("haproxy", self._relaunch, log, on_exit=self._exited,
                                      stop_steps=terminate_steps(kill_timeout), backoff=backoff)
        self._master: Child | None = None
        self._worker: int | None = None  # the worker that answered on the admin socket
        self._worker_watch: Child | None = None
        self._structure: str | None = None  # what the running worker was started or reloaded with
        self._config: str | None = None  # the text of haproxy.cfg as the running worker read it
        self._desired: dict[tuple[str, str], tuple[int, ServerState]] = {}
        self._reloading = False
        self._stopping = False
        self._reported_up = False  # what on_change last told (the agent sees for itself after apply and stop)
        self._lock = asyncio.Lock()
        self._output: deque[tuple[int, str]] = deque(maxlen=400)
        self._lines = itertools.count(1)
        self._last_line = 0
        self._candidates = itertools.count(1)

    # -- paths

    @property
    def config_path(self) -> str:
        return str(self.directory / "haproxy.cfg")

    @property
    def master_socket(self) -> str:
        return str(self.directory / "master.sock")

    @property
    def runtime_socket(self) -> str:
        return runtime_socket(self.directory.parent)

    @property
    def pid_path(self) -> str:
        return str(self.directory / "haproxy.pid")

    # -- state

    @property
    def restarts(self) -> int:
        """Masters started again after one died (by the supervisor, or by apply() during its backoff)."""
        return self._supervisor.restarts

    @property
    def master_pid(self) -> int | None:
        master = self._master
        return master.pid if master is not None and master.running else None

    @property
    def worker_pid(self) -> int | None:
        return self._worker if self.up() else None

    def up(self) -> bool:
        return self.master_pid is not None and self._worker is not None

    # -- the interface

    async def validate(self, config: str) -> None:
        candidate = await self._checked(config)
        candidate.unlink(missing_ok=True)

    async def apply(self, config: str, structure: str, runtime: RuntimeState, reason: str) -> ApplyResult:
        for backend, server in runtime:
            check_name("backend", backend)
            check_name("server", server)
        async with self._lock:
            try:
                return await self._apply(config, structure, runtime, reason)
            finally:
                self._reported_up = self.up()

    async def _apply(self, config: str, structure: str, runtime: RuntimeState, reason: str) -> ApplyResult:
        self._desired = dict(runtime)
        started = reloaded = False
        if self._master is not None and not self._master.running:
            raise ProxyError("HAProxy has exited; it is being restarted")
        if self._master is None:
            await self._adopt()
        if self._master is None:
            candidate = await self._checked(config)
            os.replace(candidate, self.config_path)
            self._config, self._structure = config, None
            # Started here rather than by the supervisor: a config HAProxy refuses is the caller's to hear about.
            self._supervisor.watch(await self._launch())
            self._structure = structure
            started = True
        elif self._worker is None:
            raise ProxyError("HAProxy's worker is gone; it is being restarted")
        elif structure != self._structure:
            candidate = await self._checked(config)
            previous = self._config if self._config is not None else self._read_config()
            os.replace(candidate, self.config_path)
            try:
                old, new = await self._reload()
            except ProxyError as error:
                # The running worker keeps the old config: so does the file a restart would read.
                if previous is not None:
                    write_private(Path(self.config_path), previous)
                if not isinstance(error, _ReloadRefused):
                    self._structure = None  # not known: reload again next time
                raise
            self._config, self._structure = config, structure
            self.reloads[reason] = self.reloads.get(reason, 0) + 1
            reloaded = True
            event(log, logging.INFO, "haproxy_reloaded", reason=reason, worker=new, previous_worker=old)
        updates = await self._sync_runtime()
        if config != self._config:
            # Only runtime values differ, and HAProxy has just taken them: a restart should start with them.
            write_private(Path(self.config_path), config)
            self._config = config
        return ApplyResult(reloaded, updates, started)

    async def set_certificate(self, path: str, pem: str) -> None:
        check_name("certificate path", path)
        payload = sanitized_pem(pem)
        async with self._lock:
            # The file first: whatever happens next, a reload or a restart reads this certificate.
            write_private(Path(path), payload + "\n")
            if not self.up():
                return
            await self._runtime.set_certificate(path, payload)
            event(log, logging.INFO, "haproxy_certificate_set", file=path)

    async def stop(self, grace: float) -> None:
        self._stopping = True
        try:
            async with self._lock:
                master = self._master
                workers = await self._workers_of(master) if master is not None else []
                # SIGUSR1 first: a soft stop, the workers finish their connections (for up to `grace` seconds).
                await self._supervisor.stop([(signal.SIGUSR1, grace), *self._hard_stop()])
                await self._reap_workers(workers)
                if master is not None:
                    event(log, logging.INFO, "haproxy_stopped", pid=master.pid)
                self._forget_master()
                self._structure = self._config = None
                self._remove_files()
                self._reported_up = False
        finally:
            self._stopping = False

    # -- config files

    async def _checked(self, config: str) -> Path:
        """The config written to a fresh 0600 candidate file that `haproxy -c` accepted."""
        declared = [line.split() for line in config.splitlines() if line.split()[:2] == ["stats", "socket"]]
        if not any(words[2:3] == [self.runtime_socket] and "admin" in words for words in declared):
            raise ConfigRefused(f"the config does not declare `stats socket {self.runtime_socket} ... level admin`")
        private_dir(self.directory)
        candidate = self.directory / f"haproxy.cfg.{os.getpid()}-{next(self._candidates)}.candidate"
        write_private(candidate, config)
        try:
            executable = self._resolve()
            proc = await asyncio.create_subprocess_exec(
                executable, "-c", "-f", str(candidate),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            try:
                async with asyncio.timeout(self._check_timeout):
                    output, _ = await proc.communicate()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                raise ProxyError(f"`haproxy -c` did not finish within {self._check_timeout:g} s") from None
            if proc.returncode != 0:
                raise ConfigRefused(f"HAProxy refused the config: {haproxy_words(output.decode(errors='replace'))}")
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
        return candidate

    def _remove_files(self) -> None:
        for name in (self.pid_path, self.master_socket, self.runtime_socket):
            Path(name).unlink(missing_ok=True)

    def _read_config(self) -> str | None:
        try:
            return Path(self.config_path).read_text()
        except OSError:
            return None

    def _resolve(self) -> str:
        return resolve(self._executable)

    # -- starting, adopting, reloading

    def _hard_stop(self) -> list[Step]:
        """SIGTERM (the connections are closed), then SIGKILL."""
        return terminate_steps(self._kill_timeout)

    async def _launch(self) -> Child:
        """Start a master on haproxy.cfg and wait until its worker answers on the admin socket."""
        executable = self._resolve()
        private_dir(self.directory)
        mark = self._last_line
        argv = [executable, "-W", "-S", f"{self.master_socket},mode,600", "-f", self.config_path, "-p", self.pid_path]
        try:
            # Not dying with the agent: a master left by an agent that crashed goes on serving until the next one
            # adopts it. An agent that stops in order stops it.
            master = await spawn("haproxy", argv, log, die_with_parent=False, on_line=self._output_line)
        except OSError as error:
            raise ProxyError(f"cannot run {executable}: {error}") from error
        self._master = master
        try:
            procs = await self._wait_worker(master, None, self._start_timeout, mark)
        except BaseException:
            await self._end(master)
            self._forget_master()
            raise
        self._set_worker(procs.worker)
        event(log, logging.INFO, "haproxy_started", pid=master.pid, worker=procs.worker)
        return master

    async def _relaunch(self) -> Child:
        """The supervisor's launch after a master died: a new one on the config the last worker ran, with the
        runtime state set again."""
        async with self._lock:
            if self._master is not None:  # apply() started (or adopted) one meanwhile
                return self._master
            master = await self._launch()
            try:
                await self._sync_runtime()
            except ProxyError as error:
                event(log, logging.ERROR, "haproxy_runtime_sync_failed", error=str(error))
        self._changed()
        return master

    async def _adopt(self) -> None:
        """Take over a master a previous agent left running on our files, if there is one."""
        pid = self._stale_master()
        if pid is None:
            return
        master = adopt(pid)
        self._master = master
        try:
            procs = await self._wait_worker(master, None, self._command_timeout, self._last_line)
        except ProxyError as error:
            event(log, logging.WARNING, "haproxy_stale_master_stopped", pid=pid, error=str(error))
            await self._end(master)
            self._forget_master()
            return
        self._set_worker(procs.worker)
        self._structure = None  # what it runs is not known: the caller reloads it with its config
        self._config = self._read_config()
        event(log, logging.WARNING, "haproxy_adopted", pid=pid, worker=procs.worker)
        self._supervisor.watch(master)

    def _stale_master(self) -> int | None:
        try:
            pid = int(Path(self.pid_path).read_text().split()[0])
            args = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        except (OSError, ValueError, IndexError):
            return None
        ours = any(a == "-f" and b == self.config_path for a, b in itertools.pairwise(args))
        if not ours or "haproxy" not in os.path.basename(args[0]) or pid == os.getpid():
            return None
        return pid

    async def _reload(self) -> tuple[int | None, int | None]:
        """Reload through the master CLI; (previous worker, new worker) once the new one answers."""
        master = self._master
        assert master is not None
        before = await self._runtime.show_proc()
        mark = self._last_line
        self._reloading = True
        try:
            await self._runtime.reload()
            procs = await self._wait_worker(master, before, self._reload_timeout, mark)
            self._set_worker(procs.worker)
        finally:
            self._reloading = False
            watch = self._worker_watch
            if watch is not None and not watch.running:
                self._lost_worker(watch.pid)
        return before.worker, procs.worker

    async def _wait_worker(self, master: Child, before: Procs | None, timeout: float, mark: int) -> Procs:
        """Poll until the master shows a current worker (a new one when `before` is given) and that worker is the
        one answering on the admin socket. Raise ProxyError if the master exits, refuses a reload or is late."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = 0.01
        last_error = "no answer yet"
        while True:
            if not master.running:
                status = await master.status(self._kill_timeout)
                words = await self._words_since(mark, None)
                raise ProxyError(f"HAProxy exited (status {status}): {words or 'see its log'}")
            try:
                procs = await self._runtime.show_proc()
                if before is not None and procs.failed > before.failed:
                    words = await self._words_since(mark, "Loading failure")
                    raise _ReloadRefused(
                        f"HAProxy could not load the new config and kept the running one: {words or 'see its log'}"
                    )
                fresh = before is None or (procs.reloads > before.reloads and procs.worker != before.worker)
                if fresh and procs.worker is not None:
                    answering = await self._runtime.answering_pid()
                    if answering == procs.worker:
                        return procs
                    last_error = f"the admin socket is answered by pid {answering}, not worker {procs.worker}"
            except Unavailable as error:
                last_error = str(error)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ProxyError(f"HAProxy's worker did not answer within {timeout:g} s: {last_error}")
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 2, 0.1)

    # -- runtime state

    async def _sync_runtime(self) -> int:
        update = await self._runtime.set_servers(self._desired)
        self.last_commands = update.commands
        self.runtime_updates += update.done
        if update.done:
            event(log, logging.INFO, "haproxy_runtime_updated", commands=update.done)
        refused = list(update.refused)
        if update.missing:
            self._structure = None  # the running config is not the one we think: reload next time
            refused.append(f"not in the running config: {', '.join(update.missing)}")
        if refused:
            raise ProxyError("HAProxy refused runtime updates: " + "; ".join(refused))
        return update.done

    # -- the master and its worker

    def _exited(self, master: Child, status: int | None, planned: bool) -> None:
        """The supervisor saw a master end (it logged haproxy_exited); it starts the next one."""
        if master is not self._master:
            return
        self._forget_master()
        if not self._stopping:
            self._changed()

    def _set_worker(self, pid: int | None) -> None:
        if self._worker_watch is not None:
            self._worker_watch.close()
            self._worker_watch = None
        self._worker = pid
        if pid is not None:
            watch = adopt(pid)
            watch.exited.add_done_callback(lambda _: self._lost_worker(pid))
            self._worker_watch = watch

    def _lost_worker(self, pid: int) -> None:
        if self._worker != pid or self._reloading or self._stopping:
            return
        self._worker = None
        if self._worker_watch is not None:
            self._worker_watch.close()
            self._worker_watch = None
        event(log, logging.ERROR, "haproxy_worker_exited", pid=pid)
        # The master normally leaves with its worker (exit-on-failure); one that does not is ended, then replaced.
        self._supervisor.restart("its worker exited", planned=False, grace=self._kill_timeout, of=self._master)
        self._changed()

    def _forget_master(self) -> None:
        self._master = None
        self._set_worker(None)

    async def _end(self, master: Child) -> None:
        """Stop a master the supervisor does not watch (it failed to start, or to be adopted), and its workers."""
        workers = await self._workers_of(master)
        await master.end(self._hard_stop(), log, "haproxy")
        await self._reap_workers(workers)

    async def _workers_of(self, master: Child) -> list[Child]:
        """Every worker of a running master, current and old, watched: they should leave with it."""
        workers: list[Child] = []
        if master.running:
            with contextlib.suppress(ProxyError):
                procs = await self._runtime.show_proc()
                workers += [adopt(pid) for pid in (*procs.workers, *procs.old_workers)]
            if self._worker is not None and all(w.pid != self._worker for w in workers):
                workers.append(adopt(self._worker))
        return workers

    async def _reap_workers(self, workers: list[Child]) -> None:
        """Workers leave when their master does; one that does not is killed."""
        try:
            for watch in workers:
                if not await wait_for_done(watch.exited, self._kill_timeout):
                    event(log, logging.WARNING, "haproxy_worker_killed", pid=watch.pid)
                    watch.signal(signal.SIGKILL)
                    await wait_for_done(watch.exited, self._kill_timeout)
        finally:
            for watch in workers:
                watch.close()

    # -- HAProxy's output

    def _output_line(self, text: str) -> int:
        """Every line HAProxy prints: kept for the complaints of a failed start or reload; its log level."""
        self._last_line = next(self._lines)
        self._output.append((self._last_line, text))
        match = PREFIX.match(text)
        level = {"ALERT": logging.ERROR, "WARNING": logging.WARNING}.get(match["level"] if match else "", logging.INFO)
        if level == logging.WARNING and _ROUTINE.search(text):
            level = logging.INFO
        return level

    async def _words_since(self, mark: int, until: str | None) -> str:
        """HAProxy's complaint in what it printed after line `mark`; with `until`, first wait (briefly) for a
        line containing it, which HAProxy prints after its complaint."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        master = self._master
        while until is not None and loop.time() < deadline:
            if any(until in text for n, text in self._output if n > mark):
                break
            await asyncio.sleep(0.02)
        if until is None and master is not None and master.output is not None:
            await wait_for_done(master.output, 1.0)
        return haproxy_words([text for n, text in self._output if n > mark])

    def _changed(self) -> None:
        """Call on_change if up() is not what it was when last reported (or when apply() or stop() returned)."""
        if self.up() == self._reported_up:
            return
        self._reported_up = self.up()
        try:
            self._on_change()
        except Exception:
            log.exception("on_change_failed")  # event=on_change_failed error=<the traceback>
