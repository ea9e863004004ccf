"""BGP announcements through a supervised ExaBGP child: diffing, acknowledged commands, neighbor state."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from typing import Protocol

from lbagent import model
from lbagent.files import prepare_runtime_dir, write_private
from lbagent.l3 import render
from lbagent.plan.services import Announcement

LOG = logging.getLogger("lbagent.bgp")

SOCKET_NAME = "exabgp-api.sock"
CONFIG_NAME = "exabgp.conf"

_PR_SET_PDEATHSIG = 1
# Resolved in the parent: the child between fork and exec should do as little as possible.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


class BgpError(Exception):
    """ExaBGP did not do what was asked."""


class BgpNotConnected(BgpError):
    """No ExaBGP instance is connected to take commands."""


class BgpCommandError(BgpError):
    """ExaBGP answered `error` to at least one command."""


class BgpSpeaker(Protocol):
    """Announces VIP prefixes to the configured BGP peers."""

    restarts: int  # speaker processes started after the first
    async def start(self) -> None: ...

    async def apply(self, desired: Mapping[str, Announcement], complete: bool = True) -> None:
        """Announce what is new or changed, withdraw what is gone; raise if that did not fully work.

        `complete`: `desired` is all the agent will announce now (False while it is still starting): with
        graceful restart, End-of-RIB goes to a peer only after a complete set."""

    def announced(self) -> Mapping[str, Announcement]:
        """What the current ExaBGP instance has acknowledged, keyed by prefix."""

    def peers(self) -> Mapping[str, str]:
        """Peer address -> last neighbor state seen ("unknown", "connected", "up", "down")."""

    async def withdraw_all(self) -> None: ...

    async def reconfigure(self, bgp: model.Bgp) -> None:
        """Adopt new BGP settings: restart ExaBGP and re-announce if they changed, nothing otherwise."""

    async def stop(self) -> None: ...


def diff(
    announced: Mapping[str, Announcement], desired: Mapping[str, Announcement]
) -> tuple[list[Announcement], list[Announcement]]:
    """(to withdraw, to announce): gone prefixes, and new ones or ones whose attributes changed."""
    for prefix, announcement in desired.items():
        if prefix != announcement.prefix:
            raise ValueError(f"desired announcement keyed {prefix!r} is for {announcement.prefix!r}")
    withdraw = [announced[prefix] for prefix in sorted(announced.keys() - desired.keys())]
    announce = [a for prefix, a in sorted(desired.items()) if announced.get(prefix) != a]
    return withdraw, announce


async def sync(
    announced: dict[str, Announcement],
    desired: Mapping[str, Announcement],
    peers: Sequence[model.IPAddress],
    send: Callable[[str], Awaitable[None]],
    log: logging.Logger = LOG,
) -> None:
    """Bring `announced` to `desired` through `send` (which raises unless the command was acknowledged).

    `announced` is updated after every acknowledgement, so it stays true whatever fails. Refused commands
    are reported together at the end; losing the connection aborts at once.
    """
    withdraw, announce = diff(announced, desired)

    def neighbors(a: Announcement) -> list[model.IPAddress]:
        # `next-hop self` only has a meaning on a session of the prefix's own family.
        version = ip_network(a.prefix).version
        return [peer for peer in peers if peer.version == version]

    # Render everything first: a bad value is refused before anything is sent.
    withdraws = [(a, render.withdraw_command(a, neighbors(a))) for a in withdraw if neighbors(a)]
    announces = [(a, render.announce_command(a, neighbors(a))) for a in announce]
    failures: list[str] = []
    for a in withdraw:
        if not neighbors(a):
            announced.pop(a.prefix, None)
    for a, command in withdraws:
        log.info("withdraw %s", a.prefix)
        try:
            await send(command)
        except BgpCommandError as error:
            failures.append(str(error))
            continue
        announced.pop(a.prefix, None)
    for a, command in announces:
        if not neighbors(a):
            log.error("cannot announce %s: no IPv%d peer", a.prefix, ip_network(a.prefix).version)
            failures.append(f"no IPv{ip_network(a.prefix).version} peer for {a.prefix}")
            continue
        log.info(
            "announce %s med=%s local-pref=%s communities=%s",
            a.prefix,
            a.med,
            a.local_pref,
            ",".join(a.communities) or "-",
        )
        try:
            await send(command)
        except BgpCommandError as error:
            failures.append(str(error))
            # ExaBGP may have taken the route for some neighbors before failing on another one:
            # withdraw it everywhere so that its RIB matches `announced`.
            log.warning("withdraw %s after a refused announcement", a.prefix)
            with contextlib.suppress(BgpCommandError):
                await send(render.withdraw_command(a, neighbors(a)))
                announced.pop(a.prefix, None)
            continue
        announced[a.prefix] = a
    if failures:
        raise BgpCommandError("; ".join(failures))


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class ExaBgpSpeaker:
    """Runs and supervises `exabgp server`, talking to it through the exabgp_bridge API process."""

    def __init__(
        self,
        bgp: model.Bgp,
        runtime_dir: str,
        on_change: Callable[[], None],
        python: str = sys.executable,
        logger: logging.Logger = LOG,
        *,
        ack_timeout: float = 10.0,
        connect_timeout: float = 15.0,
        stop_timeout: float = 5.0,
        backoff: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        self._bgp = bgp
        self._runtime_dir = os.path.abspath(runtime_dir)
        self._on_change = on_change
        self._api_run = api_run(self._runtime_dir, python)
        render.render_config(bgp, self._api_run)  # refuse bad settings here, not in the supervisor
        self._log = logger
        self._ack_timeout = ack_timeout
        self._connect_timeout = connect_timeout
        self._stop_timeout = stop_timeout
        self._backoff = backoff
        self._announced: dict[str, Announcement] = {}
        self._desired: dict[str, Announcement] = {}
        self._eor_due: set[str] = set()  # neighbors whose session came up and that await End-of-RIB from us
        self._complete = False  # whether `_desired` is all the agent will announce (End-of-RIB may follow it)
        self._peers: dict[str, str] = {str(peer.address): "unknown" for peer in bgp.peers}
        self._proc: asyncio.subprocess.Process | None = None
        self._conn: _Connection | None = None
        self._connections = 0
        self._pending: asyncio.Future[str] | None = None
        self._server: asyncio.Server | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._pulse = asyncio.Event()
        self._stopping = False
        self._restart_now = False
        self.restarts = 0
        """ExaBGP instances started after the first (crashes, lost API bridges, hung commands, new settings)."""

    @property
    def socket_path(self) -> str:
        return os.path.join(self._runtime_dir, SOCKET_NAME)

    @property
    def config_path(self) -> str:
        return os.path.join(self._runtime_dir, CONFIG_NAME)

    @property
    def exabgp_pid(self) -> int | None:
        """The running ExaBGP's pid, if any."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def announced(self) -> Mapping[str, Announcement]:
        return dict(self._announced)

    def peers(self) -> Mapping[str, str]:
        return dict(self._peers)

    async def start(self) -> None:
        """Listen for the bridge, start ExaBGP and wait (up to connect_timeout) for it to connect."""
        if self._supervisor is not None:
            raise RuntimeError("already started")
        prepare_runtime_dir(self._runtime_dir)
        write_private(
            os.path.join(self._runtime_dir, render.ENV_FILE),
            "# written by lbagent: ExaBGP's settings come from its environment\n",
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._server = await asyncio.start_unix_server(self._on_client, path=self.socket_path, limit=1 << 20)
        os.chmod(self.socket_path, 0o600)
        self._supervisor = asyncio.create_task(self._supervise(), name="exabgp-supervisor")
        if not await self.wait_connected(self._connect_timeout):
            self._log.error("ExaBGP has not connected within %g s; still trying", self._connect_timeout)

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until an ExaBGP instance is connected; False on timeout."""
        return await self._wait_until(lambda: self._conn is not None, timeout)

    async def apply(self, desired: Mapping[str, Announcement], complete: bool = True) -> None:
        async with self._lock:
            self._desired = dict(desired)
            self._complete = complete
            await self._sync()

    async def withdraw_all(self) -> None:
        await self.apply({})

    async def reconfigure(self, bgp: model.Bgp) -> None:
        async with self._lock:
            if bgp == self._bgp:
                return
            render.render_config(bgp, self._api_run)
            self._bgp = bgp
            if self._supervisor is None or self._stopping:
                self._peers = {str(peer.address): "unknown" for peer in bgp.peers}
                return
            self._log.info("BGP settings changed: restarting ExaBGP")
            before = self._connections
            self._restart_now = True
            self._kick.set()
            timeout = self._stop_timeout + self._connect_timeout
            back = await self._wait_until(
                lambda: self._stopping or (self._connections > before and self._conn is not None), timeout
            )
            if not back or self._stopping:
                raise BgpNotConnected("ExaBGP did not come back after the reconfiguration")
            await self._sync()

    async def stop(self) -> None:
        """Stop ExaBGP (its peers see the sessions close) and stop listening."""
        self._stopping = True
        self._kick.set()
        if self._supervisor is not None:
            await self._supervisor
        if self._server is not None:
            self._server.close()
        self._drop_connection("stopping")
        for client in list(self._clients):
            client.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    # -- commands

    async def _sync(self) -> None:
        if self._conn is None:
            raise BgpNotConnected("ExaBGP is not connected")
        peers = [peer.address for peer in self._bgp.peers]
        try:
            await sync(self._announced, self._desired, peers, self._command, self._log)
        except BgpCommandError:
            # some announcements refused: what could be announced is, and the router must not hold stale routes
            # of a previous session until its restart timer runs out. Any other failure sent nothing: no EOR.
            await self._send_eors()
            raise
        await self._send_eors()

    async def _send_eors(self) -> None:
        """End-of-RIB to each neighbor whose session came up since, now that everything desired is announced
        (with graceful restart: the router then drops what it kept from before and not announced again).
        ExaBGP sends it after the routes still queued for that neighbor."""
        if self._conn is None or not self._complete:
            return
        for address in sorted(self._eor_due):
            if self._peers.get(address) != "up":
                self._eor_due.discard(address)
                continue
            try:
                await self._command(render.eor_command(ip_address(address)))
            except BgpCommandError as error:
                self._log.warning("End-of-RIB to %s refused (tried again on the next sync): %s", address, error)
                continue
            self._eor_due.discard(address)
            self._log.info("End-of-RIB sent to %s", address)

    async def _command(self, line: str) -> None:
        conn = self._conn
        if conn is None:
            raise BgpNotConnected("ExaBGP is not connected")
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending = answer
        try:
            conn.writer.write(line.encode("ascii") + b"\n")
            await conn.writer.drain()
            # asyncio.timeout rather than wait_for, which in Python 3.11 can swallow a racing cancellation.
            async with asyncio.timeout(self._ack_timeout):
                result = await answer
        except TimeoutError:
            self._log.error("ExaBGP did not answer within %g s: restarting it", self._ack_timeout)
            # A late answer would be taken for the next command's: this instance cannot be trusted.
            self._drop_connection("no answer")
            self._kick.set()
            raise BgpNotConnected(f"no answer from ExaBGP to: {line}") from None
        except OSError as error:
            raise BgpNotConnected(f"lost ExaBGP while sending: {error}") from error
        finally:
            self._pending = None
        if self._conn is not conn:
            raise BgpNotConnected("ExaBGP went away")
        if result != "done":
            raise BgpCommandError(f"ExaBGP answered {result} to: {line}")

    # -- the API connection

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._clients.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proc = self._proc
        pid = _peer_pid(writer.get_extra_info("socket"))
        # Only the bridge of the ExaBGP we are running now: not a leftover of a killed instance.
        if proc is None or self._stopping or pid is None or _parent_pid(pid) != proc.pid:
            self._log.warning("refusing an API connection from pid %s: not the current ExaBGP's", pid)
            writer.close()
            return
        if self._conn is not None:
            self._drop_connection("replaced")
        conn = _Connection(reader, writer)
        self._conn = conn
        self._connections += 1
        self._announced.clear()
        self._log.info("ExaBGP (pid %d) connected", proc.pid)
        self._changed()
        try:
            while line := await reader.readline():
                self._handle(line.decode("utf-8", "replace").strip())
        except (OSError, ValueError) as error:
            self._log.warning("reading from ExaBGP failed: %s", error)
        finally:
            if self._conn is conn:
                self._drop_connection("API connection closed")
                if not self._stopping and not self._restart_now:
                    self._log.warning("ExaBGP's API process went away: restarting ExaBGP")
                    self._kick.set()
                self._changed()

    def _drop_connection(self, reason: str) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.writer.close()
        self._announced.clear()
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(BgpNotConnected(f"ExaBGP went away ({reason})"))
        self._signal()

    def _handle(self, line: str) -> None:
        if line in ("done", "error"):
            if self._pending is not None and not self._pending.done():
                self._pending.set_result(line)
            else:
                self._log.warning("unexpected answer from ExaBGP: %s", line)
            return
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self._log.warning("unexpected line from ExaBGP: %r", line[:200])
            return
        neighbor = message.get("neighbor")
        if not isinstance(neighbor, dict):
            neighbor = {}
        address = (
            neighbor.get("address", {}).get("peer") if isinstance(neighbor.get("address"), dict) else None
        )
        if message.get("type") == "state":
            self._neighbor_state(str(address), str(neighbor.get("state")), neighbor.get("reason"))
        elif message.get("type") == "notification" and message.get("notification") == "shutdown":
            self._log.info("ExaBGP is shutting down")
        elif message.get("type") == "notification":
            self._log.warning(
                "BGP notification %s neighbor %s: %s",
                neighbor.get("direction"),
                address,
                json.dumps(neighbor.get("notification")),
            )
        else:
            self._log.debug("ExaBGP: %s", line)

    def _neighbor_state(self, address: str, state: str, reason: object) -> None:
        with contextlib.suppress(ValueError):
            address = str(ip_address(address))
        if address not in self._peers:
            self._log.warning("state %s for unknown neighbor %s", state, address)
            return
        previous, self._peers[address] = self._peers[address], state
        if previous == state:
            return
        if state == "up" and self._bgp.graceful_restart is not None:
            self._eor_due.add(address)
        elif state != "up":
            self._eor_due.discard(address)
        planned = self._stopping or self._restart_now
        level = logging.WARNING if state == "down" and not planned else logging.INFO
        self._log.log(
            level, "BGP neighbor %s %s -> %s%s", address, previous, state, f" ({reason})" if reason else ""
        )
        self._changed()

    # -- the ExaBGP process

    async def _supervise(self) -> None:
        low, high = self._backoff
        delay = low
        loop = asyncio.get_running_loop()
        first = True
        while not self._stopping:
            if not first:
                self.restarts += 1
            first = False
            self._kick.clear()
            self._restart_now = False
            started = loop.time()
            proc = None
            try:
                proc = self._proc = await self._spawn()
                await self._run(proc)
            except (OSError, ValueError) as error:
                self._log.error("cannot start ExaBGP: %s", error)
            except Exception:
                self._log.exception("cannot run ExaBGP")
            finally:
                self._proc = None
                if proc is not None:
                    self._lost_instance()
            if self._stopping:
                break
            if self._restart_now:
                delay = low
                continue
            if loop.time() - started >= high:
                delay = low
            self._log.warning("restarting ExaBGP in %.1f s", delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._kick.wait()
            delay = min(delay * 2, high)

    async def _spawn(self) -> asyncio.subprocess.Process:
        bgp = self._bgp
        local = local_addresses(bgp)
        for peer in bgp.peers:
            if peer.local_address is not None:
                continue
            if peer.address in local:
                self._log.info(
                    "local address for peer %s: %s (routing table)", peer.address, local[peer.address]
                )
            else:
                self._log.warning(
                    "no route to peer %s: ExaBGP refuses announcements to it until its session has been up",
                    peer.address,
                )
        config = render.render_config(bgp, self._api_run, local)
        write_private(self.config_path, config)
        # An operator's exabgp.* variables must not override what the agent relies on.
        env = {k: v for k, v in os.environ.items() if not k.lower().startswith("exabgp")}
        env.update(render.environment(self._runtime_dir))
        self._peers = {str(peer.address): self._peers.get(str(peer.address), "unknown") for peer in bgp.peers}
        executable = resolve(bgp.exabgp)
        proc = await asyncio.create_subprocess_exec(
            executable,
            "server",
            self.config_path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            # its own session: a ^C meant for the agent must not skip the agent's orderly shutdown
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()),
        )
        self._log.info("started ExaBGP (pid %d): %s server %s", proc.pid, executable, self.config_path)
        return proc

    async def _run(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        output = asyncio.create_task(self._pump(proc.stdout))
        exited = asyncio.create_task(proc.wait())
        kicked = asyncio.create_task(self._kick.wait())
        try:
            done, _ = await asyncio.wait(
                {exited, kicked}, timeout=self._connect_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done and self._conn is None:
                self._log.error("ExaBGP's API process did not connect within %g s", self._connect_timeout)
            elif not done:
                await asyncio.wait({exited, kicked}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                _signal_child(proc, signal.SIGTERM)
                if not (await asyncio.wait({exited}, timeout=self._stop_timeout))[0]:
                    self._log.warning("ExaBGP (pid %d) did not exit on SIGTERM: killing it", proc.pid)
                    _signal_child(proc, signal.SIGKILL)
            returncode = await exited
        finally:
            kicked.cancel()
            if not exited.done():
                # Cancelled while it runs (the agent is going away): do not leave it behind.
                _signal_child(proc, signal.SIGKILL)
            # The bridge shares ExaBGP's stderr and may hold it a moment longer.
            await asyncio.wait({output}, timeout=2)
            output.cancel()
        planned = self._stopping or self._restart_now
        self._log.log(
            logging.INFO if planned else logging.WARNING,
            "ExaBGP (pid %d) exited with status %s",
            proc.pid,
            returncode,
        )

    def _lost_instance(self) -> None:
        self._drop_connection("ExaBGP exited")
        for address in self._peers:
            self._peers[address] = "down"
        self._signal()
        self._changed()

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        pending = b""
        while chunk := await stream.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > 65536:
                lines.append(pending)
                pending = b""
            for line in lines:
                if text := line.decode("utf-8", "replace").rstrip():
                    self._log.info("exabgp: %s", text)
        if pending.strip():
            self._log.info("exabgp: %s", pending.decode("utf-8", "replace").rstrip())

    # -- small helpers

    def _changed(self) -> None:
        self._signal()
        try:
            self._on_change()
        except Exception:
            self._log.exception("on_change callback failed")

    def _signal(self) -> None:
        self._pulse.set()
        self._pulse = asyncio.Event()

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._pulse.wait()
        return True


class FakeBgpSpeaker:
    """In-memory BgpSpeaker for tests: same diffing and command rendering, ExaBGP simulated."""

    def __init__(self, bgp: model.Bgp | None = None, on_change: Callable[[], None] | None = None) -> None:
        """Without `bgp`, one IPv4 peer (192.0.2.1) is assumed."""
        self.bgp = bgp
        self.on_change = on_change or (lambda: None)
        self.started = False
        self.stopped = False
        self.complete = False  # the last apply's `complete`
        self.connected = True
        self.refuse: set[str] = set()
        """Prefixes whose announcements 'ExaBGP' answers with `error`."""
        self.commands: list[str] = []
        """Every API line 'sent', in order."""
        self.restarts = 0
        self._announced: dict[str, Announcement] = {}
        self._desired: dict[str, Announcement] = {}
        self._peers = {str(peer.address): "unknown" for peer in (bgp.peers if bgp else ())}

    async def start(self) -> None:
        self.started = True

    async def apply(self, desired: Mapping[str, Announcement], complete: bool = True) -> None:
        self._desired = dict(desired)
        self.complete = complete
        await self._sync()

    def announced(self) -> Mapping[str, Announcement]:
        return dict(self._announced)

    def peers(self) -> Mapping[str, str]:
        return dict(self._peers)

    async def withdraw_all(self) -> None:
        await self.apply({})

    async def reconfigure(self, bgp: model.Bgp) -> None:
        if bgp == self.bgp:
            return
        render.render_config(bgp, "/bin/true")  # the same refusals as the real speaker
        self.bgp = bgp
        self._peers = {str(peer.address): "unknown" for peer in bgp.peers}
        self.restart()
        await self._sync()

    async def stop(self) -> None:
        self.stopped = True
        self.connected = False
        self._announced.clear()

    def restart(self) -> None:
        """Simulate a new ExaBGP instance connecting: nothing announced any more."""
        self.restarts += 1
        self.connected = True
        self._announced.clear()
        self.on_change()

    def disconnect(self) -> None:
        """Simulate ExaBGP dying: nothing announced, commands fail until `restart()`."""
        self.connected = False
        self._announced.clear()
        self._peers = dict.fromkeys(self._peers, "down")
        self.on_change()

    def set_peer_state(self, address: str, state: str) -> None:
        self._peers[str(ip_address(address))] = state
        self.on_change()

    async def _sync(self) -> None:
        if not self.connected:
            raise BgpNotConnected("ExaBGP is not connected")
        peers = [peer.address for peer in self.bgp.peers] if self.bgp else [ip_address("192.0.2.1")]
        await sync(self._announced, self._desired, peers, self._send)

    async def _send(self, line: str) -> None:
        if not self.connected:
            raise BgpNotConnected("ExaBGP is not connected")
        self.commands.append(line)
        words = line.split()
        prefix = words[words.index("route") + 1]
        if "announce" in words and prefix in self.refuse:
            raise BgpCommandError(f"ExaBGP answered error to: {line}")


def api_run(runtime_dir: str, python: str = sys.executable) -> str:
    """The command ExaBGP runs as its API process: the bridge to the agent's socket in `runtime_dir`."""
    return f"{python} -m lbagent.l3.exabgp_bridge {os.path.join(os.path.abspath(runtime_dir), SOCKET_NAME)}"


def local_addresses(bgp: model.Bgp) -> dict[model.IPAddress, model.IPAddress]:
    """Each peer's source address as the routing table has it now (peers without a route are left out)."""
    return {peer.address: source for peer in bgp.peers if (source := _source_address(peer.address))}


def resolve(exabgp: str) -> str:
    """The ExaBGP executable (FileNotFoundError when there is none). A bare name is looked for next to the running
    interpreter (a venv's bin) first, then on PATH."""
    if "/" in exabgp:
        return exabgp
    beside = os.path.join(os.path.dirname(sys.executable), exabgp)
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which(exabgp)
    if found is None:
        raise FileNotFoundError(f"{exabgp!r} is neither next to {sys.executable} nor on PATH")
    return found


def _source_address(peer: model.IPAddress) -> model.IPAddress | None:
    """The address the kernel would send from to reach `peer` (no packet is sent), if it has a route."""
    family = socket.AF_INET6 if peer.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((str(peer), 179))
        except OSError:
            return None
        return ip_address(probe.getsockname()[0])


def _signal_child(proc: asyncio.subprocess.Process, signum: int) -> None:
    # Not proc.terminate(): Popen.send_signal() polls first, reaping a dead child behind the back of
    # asyncio's child watcher, which then reports status 255 instead of how it really ended.
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)


def _die_with(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the agent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _peer_pid(sock: socket.socket | None) -> int | None:
    if sock is None:
        return None
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return None
    return int(pid)


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name in parentheses may itself contain spaces and parentheses
    return int(stat.rpartition(")")[2].split()[1])
