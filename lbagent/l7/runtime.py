"""HAProxy's two CLI sockets as lbagent uses them, and the parsers of what they answer.

The master CLI (`haproxy -S`) lists the processes (`show proc`) and reloads; the admin socket of the worker
(`stats socket ... level admin`) is the runtime API: server weights and states (`show servers state`, `set server`)
and certificates (`set ssl cert`, `commit ssl cert`). One connection per command: HAProxy answers and closes.
What to run and when to reload is decided in lbagent.l7.process; nothing here starts or signals a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from lbagent.logfmt import event
from lbagent.plan.http import ServerState

log = logging.getLogger("lbagent.haproxy")

RuntimeState = Mapping[tuple[str, str], tuple[int, ServerState]]
"""(backend, server) -> (weight, state), as the plan wants them."""

# srv_admin_state bits (management guide, "show servers state")
_FMAINT = 0x01
_FDRAIN = 0x08

_SAFE_NAME = re.compile(r"[^\s;#\\]+")
_PID_LINE = re.compile(r"^Pid:\s*(\d+)\s*$", re.MULTILINE)
_FAILED = re.compile(r"\[failed:\s*(\d+)\]")
PREFIX = re.compile(r"^\[(?P<level>[A-Z]+)\]\s+\(\d+\)\s*:\s*")
"""The `[ALERT]    (1234) : ` HAProxy puts before what it prints."""


class ProxyError(Exception):
    """HAProxy refused or did not do what was asked; the message carries its own words where it gave some."""


class Unavailable(ProxyError):
    """A CLI socket did not answer (not there, refused, closed early, or too slow)."""


# ---- what the sockets answer ------------------------------------------------------------------------------------


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
class Procs:
    """`show proc` from the master CLI."""

    master: int
    reloads: int
    failed: int
    workers: tuple[int, ...]  # current
    old_workers: tuple[int, ...]  # finishing their connections after a reload

    @property
    def worker(self) -> int | None:
        return self.workers[0] if self.workers else None


def parse_show_proc(text: str) -> Procs:
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
    return Procs(master[0], master[1], master[2], tuple(workers), tuple(old))


def haproxy_words(output: str | list[str]) -> str:
    """HAProxy's own complaint from its output: the ALERT lines (every line when there is none), without the
    `[ALERT]    (1234) : ` prefix."""
    lines = [line.strip() for line in (output.splitlines() if isinstance(output, str) else output) if line.strip()]
    picked = [line for line in lines if (m := PREFIX.match(line)) and m["level"] == "ALERT"] or lines
    return " | ".join(PREFIX.sub("", line) for line in picked)


def check_name(what: str, value: str) -> None:
    """Refuse a backend, server or file name that would end or split a runtime API command."""
    if not _SAFE_NAME.fullmatch(value):
        raise ProxyError(f"{what} {value!r} cannot be sent over the runtime API")


def sanitized_pem(pem: str) -> str:
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


# ---- the sockets -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServersUpdate:
    """What one sync of server weights and states did."""

    commands: list[str]  # sent, in order
    done: int  # those HAProxy took (it answers nothing when it does)
    refused: list[str]  # `command: its answer` for the others
    missing: list[str]  # `backend/server` wanted but not in the running config


class RuntimeClient:
    """The master CLI and the admin socket, each command on its own connection, bounded by `timeout` seconds."""

    def __init__(self, master_socket: str, admin_socket: str, timeout: float) -> None:
        self.master_socket = master_socket
        self.admin_socket = admin_socket
        self.timeout = timeout

    async def command(self, path: str, command: str, timeout: float | None = None) -> str:
        """Send one command (with its payload, if any) and read the whole answer; Unavailable if none comes."""
        what = command.split("\n", 1)[0][:80]
        try:
            async with asyncio.timeout(timeout or self.timeout):
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
            raise Unavailable(f"no answer on {path} to `{what}`") from None
        except OSError as error:
            raise Unavailable(f"{path} (`{what}`): {error}") from None
        return data.decode("utf-8", "replace")

    async def show_proc(self) -> Procs:
        return parse_show_proc(await self.command(self.master_socket, "show proc"))

    async def reload(self) -> None:
        """Ask the master to reload; it re-executes and answers nothing (see show_proc for how it went)."""
        with contextlib.suppress(Unavailable):  # the master closes the connection as it re-executes
            await self.command(self.master_socket, "reload")

    async def answering_pid(self) -> int | None:
        """The pid of the worker that answers on the admin socket."""
        match = _PID_LINE.search(await self.command(self.admin_socket, "show info"))
        return int(match[1]) if match else None

    async def set_servers(self, desired: RuntimeState) -> ServersUpdate:
        """Send what differs of `desired` from `show servers state`."""
        current = parse_servers_state(await self.command(self.admin_socket, "show servers state"))
        commands = runtime_commands(current, desired)
        missing = sorted(f"{b}/{s}" for b, s in desired if (b, s) not in current)
        done = 0
        refused: list[str] = []
        for command in commands:
            answer = (await self.command(self.admin_socket, command)).strip()
            if answer:
                refused.append(f"{command}: {answer}")
            else:
                done += 1
            event(log, logging.DEBUG, "haproxy_runtime_command", command=command, answer=answer or "-")
        return ServersUpdate(commands, done, refused, missing)

    async def set_certificate(self, path: str, payload: str) -> None:
        """Replace the certificate HAProxy loaded from `path` with `payload` (sanitized_pem), in one transaction."""
        answer = await self.command(self.admin_socket, f"set ssl cert {path} <<\n{payload}\n")
        if "Transaction created" not in answer and "Transaction updated" not in answer:
            raise ProxyError(f"HAProxy refused the certificate {path}: {haproxy_words(answer)}")
        answer = await self.command(self.admin_socket, f"commit ssl cert {path}")
        if "Success!" not in answer:
            with contextlib.suppress(ProxyError):
                await self.command(self.admin_socket, f"abort ssl cert {path}")
            raise ProxyError(f"HAProxy could not commit the certificate {path}: {haproxy_words(answer)}")
