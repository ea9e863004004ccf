"""HAProxy as lbagent's HTTP layer: the only code that runs haproxy or talks to it.

One master-worker HAProxy (`haproxy -W`) per agent, run and supervised here. A structural change of the rendered
config is checked with `haproxy -c` and then reloaded seamlessly through the master CLI; server weights and
states go through the admin socket's runtime API and never need a reload.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lbagent.files import private_dir, write_private
from lbagent.logfmt import event
from lbagent.plan.http import ServerState

log = logging.getLogger("lbagent.haproxy")

RuntimeState = Mapping[tuple[str, str], tuple[int, ServerState]]

_SUN_PATH_MAX = 107  # sockaddr_un.sun_path, less the terminating NUL
_TMP_SUFFIX = 24  # HAProxy binds a unix socket as "<path>.<pid>.tmp" and renames it into place

# srv_admin_state bits (management guide, "show servers state")
_FMAINT = 0x01
_FDRAIN = 0x08

_SAFE_NAME = re.compile(r"[^\s;#\\]+")
_PID_LINE = re.compile(r"^Pid:\s*(\d+)\s*$", re.MULTILINE)
_FAILED = re.compile(r"\[failed:\s*(\d+)\]")
_PREFIX = re.compile(r"^\[(?P<level>[A-Z]+)\]\s+\(\d+\)\s*:\s*")
# HAProxy warnings that are the expected result of what lbagent did (a reload, a runtime command): logged as info.
_ROUTINE = re.compile(
    r"Proxy \S+ stopped|Former worker \(\d+\) exited with code 0|Exiting Master process"
    r"|All workers exited\. Exiting\.\.\. \(0\)"
    r"|Server \S+ (is going DOWN for maintenance|enters drain state|is UP/READY|is leaving drain)"
)


class ProxyError(Exception):
    """HAProxy refused or did not do what was asked; the message carries its own words where it gave some."""


class _Unavailable(ProxyError):
    """A CLI socket did not answer (not there, refused, closed early, or too slow)."""


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
    """The HTTP layer as the agent sees it: HaproxyProcess, or FakeProxy in the agent's unit tests."""

    restarts: int  # masters started again after one died
    reloads: dict[str, int]  # successful reloads by reason
    runtime_updates: int  # runtime API commands that changed something, in total

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


# ---- pure helpers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerRuntime:
    """One line of `show servers state`, the parts lbagent looks at."""

    weight: int  # srv_uweight
    state: ServerState  # from the forced bits of srv_admin_state: FMAINT -> maint, FDRAIN -> drain
    admin_state: int  # srv_admin_state, every bit
    op_state: int  # srv_op_state: 0 stopped, 1 starting, 2 running, 3 stopping


def parse_servers_state(text: str) -> dict[tuple[str, str], ServerRuntime]:
    """Parse `show servers state` (format version 1: a version line, a `# be_id be_name ...` header, data)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0].strip() != "1":
        raise ProxyError(f"unexpected `show servers state` answer: {text.strip()[:200]!r}")
    columns: list[str] = []
    out: dict[tuple[str, str], ServerRuntime] = {}
    for line in lines[1:]:
        if line.startswith("#"):
            if not columns:
                columns = line[1:].split()
            continue
        row = dict(zip(columns, line.split(), strict=False))
        try:
            admin = int(row["srv_admin_state"])
            state = ServerState.MAINT if admin & _FMAINT else ServerState.READY
            if state is ServerState.READY and admin & _FDRAIN:
                state = ServerState.DRAIN
            out[(row["be_name"], row["srv_name"])] = ServerRuntime(
                int(row["srv_uweight"]), state, admin, int(row["srv_op_state"])
            )
        except (KeyError, ValueError) as error:
            raise ProxyError(f"unexpected `show servers state` line {line!r}: {error}") from None
    return out


def runtime_commands(current: Mapping[tuple[str, str], ServerRuntime], desired: RuntimeState) -> list[str]:
    """The runtime API commands that bring `current` to `desired`, only for what differs. A server coming back
    gets its weight before it takes requests; one leaving stops taking them before its weight changes."""
    commands: list[str] = []
    for (backend, server), (weight, state) in sorted(desired.items()):
        now = current.get((backend, server))
        if now is None:
            continue
        target = f"{backend}/{server}"
        set_weight = [f"set server {target} weight {weight}"] if now.weight != weight else []
        set_state = [f"set server {target} state {state.value}"] if now.state is not state else []
        commands += set_weight + set_state if state is ServerState.READY else set_state + set_weight
    return commands


@dataclass(frozen=True)
class _Procs:
    """`show proc` from the master CLI."""

    master: int
    reloads: int
    failed: int
    workers: tuple[int, ...]  # current
    old_workers: tuple[int, ...]  # finishing their connections after a reload

    @property
    def worker(self) -> int | None:
        return self.workers[0] if self.workers else None


def _parse_show_proc(text: str) -> _Procs:
    section = "master"
    master: tuple[int, int, int] | None = None
    workers: list[int] = []
    old: list[int] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#<"):
            continue
        if line.startswith("#"):
            section = {"# workers": "workers", "# old workers": "old"}.get(line.strip(), "other")
            continue
        fields = line.split()
        if len(fields) < 3 or not fields[0].isdigit():
            continue
        if section == "master" and fields[1] == "master":
            failed = _FAILED.search(line)
            master = (int(fields[0]), int(fields[2]) if fields[2].isdigit() else 0, int(failed[1]) if failed else 0)
        elif section == "workers":
            workers.append(int(fields[0]))
        elif section == "old":
            old.append(int(fields[0]))
    if master is None:
        raise ProxyError(f"unexpected `show proc` answer: {text.strip()[:200]!r}")
    return _Procs(master[0], master[1], master[2], tuple(workers), tuple(old))


def resolve(executable: str) -> str:
    """The HAProxy executable `proxy.haproxy` names: a path, or a name looked up in PATH (then /usr/sbin)."""
    found = executable
    if "/" not in found:
        found = shutil.which(found) or shutil.which(found, path="/usr/sbin:/usr/local/sbin") or ""
    if not found or not os.access(found, os.X_OK):
        raise ProxyError(f"cannot run HAProxy: {executable!r} is not an executable (nor found in PATH)")
    return found


def haproxy_words(output: str | list[str]) -> str:
    """HAProxy's own complaint from its output: the ALERT lines (every line when there is none), without the
    `[ALERT]    (1234) : ` prefix."""
    lines = [line.strip() for line in (output.splitlines() if isinstance(output, str) else output) if line.strip()]
    picked = [line for line in lines if (m := _PREFIX.match(line)) and m["level"] == "ALERT"] or lines
    return " | ".join(_PREFIX.sub("", line) for line in picked)


def _check_name(what: str, value: str) -> None:
    if not _SAFE_NAME.fullmatch(value):
        raise ProxyError(f"{what} {value!r} cannot be sent over the runtime API")


def _sanitized_pem(pem: str) -> str:
    """Only the PEM sections, without empty lines: an empty line ends a runtime API payload."""
    out: list[str] = []
    inside = False
    for raw in pem.splitlines():
        line = raw.strip()
        if line.startswith("-----BEGIN "):
            inside = True
        if inside and line:
            out.append(line)
        if line.startswith("-----END "):
            inside = False
    if not out:
        raise ProxyError("no PEM section in the certificate given")
    return "\n".join(out)


class _PidWatch:
    """A process, child or not, through a pidfd: `exited` is done when it ends; signals never reach a reused pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = self._loop.create_future()
        self._fd: int | None = None
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.exited.set_result(None)
            return
        self._loop.add_reader(self._fd, self._fire)

    def _fire(self) -> None:
        self.close()
        if not self.exited.done():
            self.exited.set_result(None)

    def signal(self, signum: int) -> None:
        if self._fd is not None and not self.exited.done():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, signum)

    def close(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


@dataclass
class _Master:
    pid: int
    watch: _PidWatch
    proc: asyncio.subprocess.Process | None  # None: adopted from a previous agent
    started: float
    output: asyncio.Task[None] | None = None


async def _wait(future: asyncio.Future[None], timeout: float) -> bool:
    """Wait for `future` for up to `timeout` seconds without cancelling it; True when it is done."""
    if not future.done() and timeout > 0:
        await asyncio.wait({future}, timeout=timeout)
    return future.done()


# ---- the real one ---------------------------------------------------------------------------------------------


class HaproxyProcess:
    """Runs and supervises one master-worker HAProxy on files under `<runtime_dir>/haproxy/`."""

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
        self.directory = Path(os.path.abspath(runtime_dir)) / "haproxy"
        for sock in (self.master_socket, self.runtime_socket):
            if len(sock) + _TMP_SUFFIX > _SUN_PATH_MAX:
                raise ValueError(f"runtime directory too deep for a unix socket path: {sock}")
        self._on_change = on_change
        self._command_timeout = command_timeout
        self._start_timeout = start_timeout
        self._reload_timeout = reload_timeout
        self._check_timeout = check_timeout
        self._kill_timeout = kill_timeout
        self._backoff = backoff
        self.restarts = 0
        self.reloads: dict[str, int] = {}
        self.runtime_updates = 0
        self.last_commands: list[str] = []
        """The runtime API commands the last apply() sent."""
        self._master: _Master | None = None
        self._worker: int | None = None  # the worker that answered on the admin socket
        self._worker_watch: _PidWatch | None = None
        self._structure: str | None = None  # what the running worker was started or reloaded with
        self._config: str | None = None  # the text of haproxy.cfg as the running worker read it
        self._desired: dict[tuple[str, str], tuple[int, ServerState]] = {}
        self._died = False  # a master died and none has been started since
        self._reloading = False
        self._stopping = False
        self._reported_up = False  # what on_change last told (the agent sees for itself after apply and stop)
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
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
        return str(self.directory / "api.sock")

    @property
    def pid_path(self) -> str:
        return str(self.directory / "haproxy.pid")

    # -- state

    @property
    def master_pid(self) -> int | None:
        master = self._master
        return master.pid if master is not None and not master.watch.exited.done() else None

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
            _check_name("backend", backend)
            _check_name("server", server)
        async with self._lock:
            try:
                return await self._apply(config, structure, runtime, reason)
            finally:
                self._reported_up = self.up()

    async def _apply(self, config: str, structure: str, runtime: RuntimeState, reason: str) -> ApplyResult:
        self._desired = dict(runtime)
        started = reloaded = False
        if self._master is not None and self._master.watch.exited.done():
            raise ProxyError("HAProxy has exited; it is being restarted")
        if self._master is None:
            await self._adopt()
        if self._master is None:
            candidate = await self._checked(config)
            os.replace(candidate, self.config_path)
            self._config, self._structure = config, None
            await self._launch()
            self._structure = structure
            started = True
            if self._died:
                self._died = False
                self.restarts += 1
            self._ensure_supervisor()
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
        _check_name("certificate path", path)
        payload = _sanitized_pem(pem)
        async with self._lock:
            # The file first: whatever happens next, a reload or a restart reads this certificate.
            write_private(Path(path), payload + "\n")
            if not self.up():
                return
            answer = await self._cli(self.runtime_socket, f"set ssl cert {path} <<\n{payload}\n")
            if "Transaction created" not in answer and "Transaction updated" not in answer:
                raise ProxyError(f"HAProxy refused the certificate {path}: {haproxy_words(answer)}")
            answer = await self._cli(self.runtime_socket, f"commit ssl cert {path}")
            if "Success!" not in answer:
                with contextlib.suppress(ProxyError):
                    await self._cli(self.runtime_socket, f"abort ssl cert {path}")
                raise ProxyError(f"HAProxy could not commit the certificate {path}: {haproxy_words(answer)}")
            event(log, logging.INFO, "haproxy_certificate_set", file=path)

    async def stop(self, grace: float) -> None:
        self._stopping = True
        self._kick.set()
        try:
            async with self._lock:
                master = self._master
                if master is not None:
                    await self._end(master, True, grace)
                    event(log, logging.INFO, "haproxy_stopped", pid=master.pid)
                self._forget_master()
                self._structure = self._config = None
                self._died = False
                self._remove_files()
                self._reported_up = False
            supervisor, self._supervisor = self._supervisor, None
            if supervisor is not None:
                await supervisor
        finally:
            self._stopping = False
            self._kick.clear()

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

    # -- the CLI: one connection per command

    async def _cli(self, path: str, command: str, timeout: float | None = None) -> str:
        what = command.split("\n", 1)[0][:80]
        try:
            async with asyncio.timeout(timeout or self._command_timeout):
                reader, writer = await asyncio.open_unix_connection(path)
                try:
                    writer.write(command.encode() + b"\n")
                    await writer.drain()
                    writer.write_eof()
                    data = await reader.read()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except TimeoutError:
            raise _Unavailable(f"no answer on {path} to `{what}`") from None
        except OSError as error:
            raise _Unavailable(f"{path} (`{what}`): {error}") from None
        return data.decode("utf-8", "replace")

    async def _show_proc(self) -> _Procs:
        return _parse_show_proc(await self._cli(self.master_socket, "show proc"))

    async def _answering_pid(self) -> int | None:
        match = _PID_LINE.search(await self._cli(self.runtime_socket, "show info"))
        return int(match[1]) if match else None

    # -- starting, adopting, reloading

    async def _launch(self) -> None:
        """Start a master on haproxy.cfg and wait until its worker answers on the admin socket."""
        executable = self._resolve()
        private_dir(self.directory)
        mark = self._last_line
        try:
            proc = await asyncio.create_subprocess_exec(
                executable, "-W", "-S", f"{self.master_socket},mode,600", "-f", self.config_path, "-p", self.pid_path,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                # Its own session: a ^C meant for the agent must not reach it.
                start_new_session=True,
            )
        except OSError as error:
            raise ProxyError(f"cannot run {executable}: {error}") from error
        assert proc.stdout is not None
        master = _Master(proc.pid, _PidWatch(proc.pid), proc, asyncio.get_running_loop().time())
        master.output = asyncio.create_task(self._pump(proc.stdout, proc.pid), name="haproxy-output")
        self._master = master
        try:
            procs = await self._wait_worker(master, None, self._start_timeout, mark)
        except BaseException:
            await self._end(master, False, 0)
            self._forget_master()
            raise
        self._set_worker(procs.worker)
        event(log, logging.INFO, "haproxy_started", pid=master.pid, worker=procs.worker)

    async def _adopt(self) -> None:
        """Take over a master a previous agent left running on our files, if there is one."""
        pid = self._stale_master()
        if pid is None:
            return
        master = _Master(pid, _PidWatch(pid), None, asyncio.get_running_loop().time())
        self._master = master
        try:
            procs = await self._wait_worker(master, None, self._command_timeout, self._last_line)
        except ProxyError as error:
            event(log, logging.WARNING, "haproxy_stale_master_stopped", pid=pid, error=str(error))
            await self._end(master, False, 0)
            self._forget_master()
            return
        self._set_worker(procs.worker)
        self._structure = None  # what it runs is not known: the caller reloads it with its config
        self._config = self._read_config()
        event(log, logging.WARNING, "haproxy_adopted", pid=pid, worker=procs.worker)
        self._ensure_supervisor()

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
        before = await self._show_proc()
        mark = self._last_line
        self._reloading = True
        try:
            with contextlib.suppress(_Unavailable):  # the master closes the connection as it re-executes
                await self._cli(self.master_socket, "reload")
            procs = await self._wait_worker(master, before, self._reload_timeout, mark)
            self._set_worker(procs.worker)
        finally:
            self._reloading = False
            watch = self._worker_watch
            if watch is not None and watch.exited.done():
                self._lost_worker(watch.pid)
        return before.worker, procs.worker

    async def _wait_worker(self, master: _Master, before: _Procs | None, timeout: float, mark: int) -> _Procs:
        """Poll until the master shows a current worker (a new one when `before` is given) and that worker is the
        one answering on the admin socket. Raise ProxyError if the master exits, refuses a reload or is late."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = 0.01
        last_error = "no answer yet"
        while True:
            if master.watch.exited.done():
                status = await self._status(master)
                words = await self._words_since(mark, None)
                raise ProxyError(f"HAProxy exited (status {status}): {words or 'see its log'}")
            try:
                procs = await self._show_proc()
                if before is not None and procs.failed > before.failed:
                    words = await self._words_since(mark, "Loading failure")
                    raise _ReloadRefused(
                        f"HAProxy could not load the new config and kept the running one: {words or 'see its log'}"
                    )
                fresh = before is None or (procs.reloads > before.reloads and procs.worker != before.worker)
                if fresh and procs.worker is not None:
                    answering = await self._answering_pid()
                    if answering == procs.worker:
                        return procs
                    last_error = f"the admin socket is answered by pid {answering}, not worker {procs.worker}"
            except _Unavailable as error:
                last_error = str(error)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ProxyError(f"HAProxy's worker did not answer within {timeout:g} s: {last_error}")
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 2, 0.1)

    # -- runtime state

    async def _sync_runtime(self) -> int:
        current = parse_servers_state(await self._cli(self.runtime_socket, "show servers state"))
        commands = runtime_commands(current, self._desired)
        self.last_commands = commands
        missing = sorted(f"{b}/{s}" for b, s in self._desired if (b, s) not in current)
        done = 0
        refused: list[str] = []
        for command in commands:
            answer = (await self._cli(self.runtime_socket, command)).strip()
            if answer:
                refused.append(f"{command}: {answer}")
            else:
                done += 1
            log.debug("runtime api: %s%s", command, f" -> {answer}" if answer else "")
        self.runtime_updates += done
        if done:
            event(log, logging.INFO, "haproxy_runtime_updated", commands=done)
        if missing:
            self._structure = None  # the running config is not the one we think: reload next time
            refused.append(f"not in the running config: {', '.join(missing)}")
        if refused:
            raise ProxyError("HAProxy refused runtime updates: " + "; ".join(refused))
        return done

    # -- supervision

    def _ensure_supervisor(self) -> None:
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.create_task(self._supervise(), name="haproxy-supervisor")

    async def _supervise(self) -> None:
        try:
            await self._supervision()
        except Exception:
            log.exception("HAProxy supervisor failed")

    async def _supervision(self) -> None:
        low, high = self._backoff
        delay = low
        loop = asyncio.get_running_loop()
        while not self._stopping:
            master = self._master
            if master is None:
                return
            kicked = asyncio.create_task(self._kicked())
            try:
                await asyncio.wait({master.watch.exited, kicked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                kicked.cancel()
            self._kick.clear()
            if self._stopping or self._master is not master:
                continue
            if not master.watch.exited.done():
                if self._worker is not None:
                    continue
                # The worker is gone. The master normally leaves with it (exit-on-failure); if not, make it.
                if not await _wait(master.watch.exited, self._kill_timeout):
                    event(log, logging.WARNING, "haproxy_master_without_worker", pid=master.pid)
                    await self._end(master, False, 0)
                if self._stopping or self._master is not master:
                    continue
            status = await self._status(master)
            self._forget_master()
            self._died = True
            event(log, logging.ERROR, "haproxy_exited", pid=master.pid, status=status)
            self._changed()
            if loop.time() - master.started >= high:
                delay = low
            while not self._stopping and self._master is None:
                event(log, logging.WARNING, "haproxy_restarting", delay=delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._kick.wait()
                delay = min(delay * 2, high)
                if self._stopping:
                    return
                async with self._lock:
                    if self._stopping or self._master is not None:
                        break
                    try:
                        await self._launch()
                        self._died = False
                        self.restarts += 1
                        await self._sync_runtime()
                    except (ProxyError, OSError) as error:
                        event(log, logging.ERROR, "haproxy_restart_failed", error=str(error))
                        if self._master is None:
                            continue
                self._changed()

    async def _kicked(self) -> None:
        await self._kick.wait()

    def _set_worker(self, pid: int | None) -> None:
        if self._worker_watch is not None:
            self._worker_watch.close()
            self._worker_watch = None
        self._worker = pid
        if pid is not None:
            watch = _PidWatch(pid)
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
        self._kick.set()
        self._changed()

    def _forget_master(self) -> None:
        master, self._master = self._master, None
        if master is not None:
            master.watch.close()
        self._set_worker(None)

    async def _end(self, master: _Master, soft: bool, grace: float) -> None:
        """Stop a master and every worker it had: with `soft`, SIGUSR1 (workers finish their connections) for up
        to `grace` seconds; then SIGTERM (connections are closed), then SIGKILL."""
        workers: list[_PidWatch] = []
        if not master.watch.exited.done():
            with contextlib.suppress(ProxyError):
                procs = await self._show_proc()
                workers += [_PidWatch(pid) for pid in (*procs.workers, *procs.old_workers)]
            if self._worker is not None and all(w.pid != self._worker for w in workers):
                workers.append(_PidWatch(self._worker))
        steps = [(signal.SIGUSR1, grace)] if soft else []
        steps += [(signal.SIGTERM, self._kill_timeout), (signal.SIGKILL, self._kill_timeout)]
        try:
            for i, (signum, wait) in enumerate(steps):
                if master.watch.exited.done():
                    break
                if i > 0:
                    event(log, logging.WARNING, "haproxy_stop_escalated", pid=master.pid, signal=signum.name)
                master.watch.signal(signum)
                await _wait(master.watch.exited, wait)
            # Workers leave when their master does; one that does not is killed.
            for watch in workers:
                if not await _wait(watch.exited, self._kill_timeout):
                    event(log, logging.WARNING, "haproxy_worker_killed", pid=watch.pid)
                    watch.signal(signal.SIGKILL)
                    await _wait(watch.exited, self._kill_timeout)
        finally:
            for watch in workers:
                watch.close()
        await self._status(master)
        if master.output is not None and not await _wait(master.output, 1.0):
            master.output.cancel()  # the pipe closes when the last process holding it is gone

    async def _status(self, master: _Master) -> int | None:
        if master.proc is None:
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._kill_timeout):
                return await master.proc.wait()
        return None

    # -- HAProxy's output

    async def _pump(self, stream: asyncio.StreamReader, pid: int) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # longer than the stream's limit
                line = await stream.read(65536)
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if not text:
                continue
            self._last_line = next(self._lines)
            self._output.append((self._last_line, text))
            match = _PREFIX.match(text)
            level = {"ALERT": logging.ERROR, "WARNING": logging.WARNING}.get(match["level"] if match else "",
                                                                            logging.INFO)
            if level == logging.WARNING and _ROUTINE.search(text):
                level = logging.INFO
            event(log, level, "haproxy_output", master=pid, line=text)

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
            await _wait(master.output, 1.0)
        return haproxy_words([text for n, text in self._output if n > mark])

    def _changed(self) -> None:
        """Call on_change if up() is not what it was when last reported (or when apply() or stop() returned)."""
        if self.up() == self._reported_up:
            return
        self._reported_up = self.up()
        try:
            self._on_change()
        except Exception:
            log.exception("on_change callback failed")
