"""BGP announcements through ExaBGP, run by lbagent.supervisor: diffing, acknowledged commands, neighbor state.

What is ExaBGP's own stays here: its config and environment rendered before every start, the API connection from
its bridge process (only the current instance's), commands that must be acknowledged in time (an instance that
does not answer, or whose bridge went away, is restarted), neighbor states and End-of-RIB."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
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
from lbagent.logfmt import event
from lbagent.plan.services import Announcement
from lbagent.supervisor import Child, Supervisor, spawn, terminate_steps
from lbagent.watched import WatchedTimer

LOG = logging.getLogger("lbagent.bgp")

SOCKET_NAME = "exabgp-api.sock"
CONFIG_NAME = "exabgp.conf"


class BgpError(Exception):
    """ExaBGP did not do what was asked."""


class BgpNotConnected(BgpError):
    """No ExaBGP instance is connected to take commands."""


class BgpCommandError(BgpError):
    """ExaBGP answered `error` to at least one command."""


class BgpSpeaker(Protocol):
    """Announces VIP prefixes to the configured BGP peers."""

    @property
    def restarts(self) -> int:
        """Speaker processes started after the first."""

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
    # the same object most of the time (the plan keeps an untouched VIP's announcement): compared only when not
    announce = sorted((a for prefix, a in desired.items() if (was := announced.get(prefix)) is not a and was != a),
                      key=lambda a: a.prefix)
    return withdraw, announce


async def sync(
    announced: dict[str, Announcement],
    desired: Mapping[str, Announcement],
    peers: Sequence[model.IPAddress],
    send: Callable[[str], Awaitable[None]],
    log: logging.Logger = LOG,
) -> None:
    """Bring `announced` to `desired` through `send` (which raises unless the command was acknowledged).

    The commands are pipelined: all of them are sent, in order (withdrawals first), before the first answer is
    awaited, so a sync costs one round trip to ExaBGP rather than one per prefix (`send` must put its command on
    the wire before its first await). `announced` is updated at every acknowledgement, so it stays true whatever
    fails. Refused commands are reported together at the end; a lost connection is raised once all have ended.
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

    async def send_withdrawal(a: Announcement, command: str) -> None:
        try:
            await send(command)
        except BgpCommandError as error:
            failures.append(str(error))
            return
        announced.pop(a.prefix, None)

    async def send_announcement(a: Announcement, command: str) -> None:
        try:
            await send(command)
        except BgpCommandError as error:
            failures.append(str(error))
            # ExaBGP may have taken the route for some neighbors before failing on another one:
            # withdraw it everywhere so that its RIB matches `announced`.
            event(log, logging.WARNING, "bgp_withdraw", prefix=a.prefix, reason="announcement refused")
            with contextlib.suppress(BgpCommandError):
                await send(render.withdraw_command(a, neighbors(a)))
                announced.pop(a.prefix, None)
            return
        announced[a.prefix] = a

    commands: list[Awaitable[None]] = []
    for a, command in withdraws:
        event(log, logging.INFO, "bgp_withdraw", prefix=a.prefix)
        commands.append(send_withdrawal(a, command))
    for a, command in announces:
        if not neighbors(a):
            family = f"IPv{ip_network(a.prefix).version}"
            event(log, logging.ERROR, "bgp_announce_impossible", prefix=a.prefix, error=f"no {family} peer")
            failures.append(f"no {family} peer for {a.prefix}")
            continue
        event(log, logging.INFO, "bgp_announce", prefix=a.prefix, med=a.med, local_pref=a.local_pref,
              communities=a.communities or "-")
        commands.append(send_announcement(a, command))
    # gather starts them in order, each sending before it awaits; every one ends (a lost connection fails them all)
    outcomes = await asyncio.gather(*commands, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    if failures:
        raise BgpCommandError("; ".join(failures))


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class ExaBgpSpeaker:
    """Runs `exabgp server` under a Supervisor, talking to it through the exabgp_bridge API process."""

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
        # ExaBGP's bridge shares its stderr and may hold it a moment after ExaBGP exits.
        self._supervisor = Supervisor("exabgp", self._launch, logger, on_exit=self._exited,
                                      stop_steps=terminate_steps(stop_timeout), backoff=backoff, output_grace=2.0)
        self._announced: dict[str, Announcement] = {}
        self._desired: dict[str, Announcement] = {}
        self._eor_due: set[str] = set()  # neighbors whose session came up and that await End-of-RIB from us
        self._complete = False  # whether `_desired` is all the agent will announce (End-of-RIB may follow it)
        self._peers: dict[str, str] = {str(peer.address): "unknown" for peer in bgp.peers}
        self._conn: _Connection | None = None
        self._connections = 0
        # the commands sent and not answered yet, oldest first: ExaBGP answers them in order
        self._pending: collections.deque[tuple[str, asyncio.Future[str]]] = collections.deque()
        # runs while commands wait; expires when ExaBGP answered nothing for ack_timeout (made at first use)
        self._ack_timer: WatchedTimer | None = None
        self._server: asyncio.Server | None = None
        self._started = False
        self._watchdog: asyncio.Task[None] | None = None  # the current instance's API must connect in time
        self._clients: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._pulse = asyncio.Event()
        self._stopping = False
        self._restart_now = False  # a restart for new settings is under way: its session losses are expected

    @property
    def restarts(self) -> int:
        """ExaBGP instances started after the first (crashes, lost API bridges, hung commands, new settings)."""
        return self._supervisor.restarts

    @property
    def socket_path(self) -> str:
        return os.path.join(self._runtime_dir, SOCKET_NAME)

    @property
    def config_path(self) -> str:
        return os.path.join(self._runtime_dir, CONFIG_NAME)

    @property
    def exabgp_pid(self) -> int | None:
        """The running ExaBGP's pid, if any."""
        child = self._supervisor.child
        return child.pid if child is not None else None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def announced(self) -> Mapping[str, Announcement]:
        return dict(self._announced)

    def peers(self) -> Mapping[str, str]:
        return dict(self._peers)

    async def start(self) -> None:
        """Listen for the bridge, start ExaBGP and wait (up to connect_timeout) for it to connect."""
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        prepare_runtime_dir(self._runtime_dir)
        write_private(
            os.path.join(self._runtime_dir, render.ENV_FILE),
            "# written by lbagent: ExaBGP's settings come from its environment\n",
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._server = await asyncio.start_unix_server(self._on_client, path=self.socket_path, limit=1 << 20)
        os.chmod(self.socket_path, 0o600)
        self._supervisor.run()
        if not await self.wait_connected(self._connect_timeout):
            event(self._log, logging.ERROR, "exabgp_not_connected", timeout=self._connect_timeout,
                  detail="still trying")

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
            if bgp.without_bfd() == self._bgp.without_bfd():
                self._bgp = bgp  # BFD is bfdd's (lbagent.l3.bfd): ExaBGP's sessions stay as they are
                return
            render.render_config(bgp, self._api_run)
            self._bgp = bgp
            if not self._started or self._stopping:
                self._peers = {str(peer.address): "unknown" for peer in bgp.peers}
                return
            before = self._connections
            self._restart_now = True
            self._supervisor.restart("BGP settings changed", planned=True)
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
        await self._supervisor.stop()
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
                event(self._log, logging.WARNING, "bgp_eor_refused", peer=address, error=str(error),
                      detail="tried again on the next sync")
                continue
            self._eor_due.discard(address)
            event(self._log, logging.INFO, "bgp_eor_sent", peer=address)

    async def _command(self, line: str) -> None:
        """Send one command and wait for its answer. Commands may be pipelined (sync sends them all before it
        waits): the line is written before the first await, and answers are matched to commands in order. ExaBGP
        is given ack_timeout (of the agent watching) to answer the oldest command, counted again at each answer."""
        conn = self._conn
        if conn is None:
            raise BgpNotConnected("ExaBGP is not connected")
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if not self._pending:
            self._timer().start()  # the oldest command's wait begins
        self._pending.append((line, answer))
        try:
            conn.writer.write(line.encode("ascii") + b"\n")
            await conn.writer.drain()
        except OSError as error:
            self._drop_connection(f"lost while sending: {error}")
            raise BgpNotConnected(f"lost ExaBGP while sending: {error}") from error
        result = await answer  # BgpNotConnected when the connection is dropped first
        if result != "done":
            raise BgpCommandError(f"ExaBGP answered {result} to: {line}")

    def _timer(self) -> WatchedTimer:
        if self._ack_timer is None:
            self._ack_timer = WatchedTimer(self._ack_timeout, self._no_answer)
        return self._ack_timer

    def _no_answer(self) -> None:
        line = self._pending[0][0] if self._pending else "-"
        event(self._log, logging.ERROR, "exabgp_no_answer", timeout=self._ack_timeout, command=line,
              waiting=len(self._pending))
        # A late answer would be taken for the next command's: this instance cannot be trusted.
        self._drop_connection("no answer", BgpNotConnected(f"no answer from ExaBGP to: {line}"))
        self._supervisor.restart(f"no answer within {self._ack_timeout:g} s", planned=False)

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
        # The supervisor holds the instance from the moment _launch returns, long before its bridge can connect.
        child = self._supervisor.child
        pid = _peer_pid(writer.get_extra_info("socket"))
        # Only the bridge of the ExaBGP we are running now: not a leftover of a killed instance.
        if child is None or self._stopping or pid is None or _parent_pid(pid) != child.pid:
            event(self._log, logging.WARNING, "exabgp_api_refused", pid=pid, detail="not the current ExaBGP's")
            writer.close()
            return
        if self._conn is not None:
            self._drop_connection("replaced")
        conn = _Connection(reader, writer)
        self._conn = conn
        self._connections += 1
        self._announced.clear()
        event(self._log, logging.INFO, "exabgp_connected", pid=child.pid)
        self._changed()
        try:
            while line := await reader.readline():
                self._handle(line.decode("utf-8", "replace").strip())
        except (OSError, ValueError) as error:
            event(self._log, logging.WARNING, "exabgp_api_read_failed", error=str(error))
        finally:
            if self._conn is conn:
                self._drop_connection("API connection closed")
                if not self._stopping and not self._restart_now:
                    self._supervisor.restart("its API process went away", planned=False, of=child)
                self._changed()

    def _drop_connection(self, reason: str, error: BgpNotConnected | None = None) -> None:
        conn, self._conn = self._conn, None
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        pending, self._pending = self._pending, collections.deque()
        for _, answer in pending:
            if not answer.done():
                answer.set_exception(error or BgpNotConnected(f"ExaBGP went away ({reason})"))
        if conn is None:
            return
        conn.writer.close()
        self._announced.clear()
        self._signal()

    def _handle(self, line: str) -> None:
        if line in ("done", "error"):
            if self._pending:
                _, answer = self._pending.popleft()
                if not answer.done():  # (a waiter cancelled: its answer is still this one)
                    answer.set_result(line)
                if self._pending:
                    self._timer().start()  # progress: the next command gets a whole ack_timeout
                else:
                    self._timer().cancel()
            else:
                event(self._log, logging.WARNING, "exabgp_unexpected_answer", answer=line)
            return
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            event(self._log, logging.WARNING, "exabgp_unexpected_line", line=line[:200])
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
            event(self._log, logging.INFO, "exabgp_shutting_down")
        elif message.get("type") == "notification":
            event(self._log, logging.WARNING, "bgp_notification", peer=address, direction=neighbor.get("direction"),
                  notification=json.dumps(neighbor.get("notification")))
        else:
            event(self._log, logging.DEBUG, "exabgp_message", line=line)

    def _neighbor_state(self, address: str, state: str, reason: object) -> None:
        with contextlib.suppress(ValueError):
            address = str(ip_address(address))
        if address not in self._peers:
            event(self._log, logging.WARNING, "bgp_unknown_neighbor", peer=address, state=state)
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
        fields = {"reason": str(reason)} if reason else {}
        event(self._log, level, "bgp_neighbor", peer=address, state=state, was=previous, **fields)
        self._changed()

    # -- the ExaBGP process (started, watched, restarted and stopped by the supervisor)

    async def _launch(self) -> Child:
        """Render the config with the peers' current source addresses, start ExaBGP, and expect its API in time."""
        self._restart_now = False
        bgp = self._bgp
        local = local_addresses(bgp)
        for peer in bgp.peers:
            if peer.local_address is not None:
                continue
            if peer.address in local:
                event(self._log, logging.INFO, "bgp_local_address", peer=peer.address, address=local[peer.address],
                      source="routing table")
            else:
                event(self._log, logging.WARNING, "bgp_no_route_to_peer", peer=peer.address,
                      detail="ExaBGP refuses announcements to it until its session has been up")
        config = render.render_config(bgp, self._api_run, local)
        write_private(self.config_path, config)
        # An operator's exabgp.* variables must not override what the agent relies on.
        env = {k: v for k, v in os.environ.items() if not k.lower().startswith("exabgp")}
        env.update(render.environment(self._runtime_dir))
        self._peers = {str(peer.address): self._peers.get(str(peer.address), "unknown") for peer in bgp.peers}
        argv = [resolve(bgp.exabgp), "server", self.config_path]
        # It dies with the agent: a dead agent cannot health-check, so it must not keep attracting traffic.
        child = await spawn("exabgp", argv, self._log, env=env, die_with_parent=True)
        event(self._log, logging.INFO, "exabgp_started", pid=child.pid, command=" ".join(argv))
        self._watchdog = asyncio.create_task(self._expect_connection(child), name="exabgp-connect")
        return child

    async def _expect_connection(self, child: Child) -> None:
        if await self._wait_until(lambda: self._conn is not None or not child.running, self._connect_timeout):
            return
        event(self._log, logging.ERROR, "exabgp_api_timeout", pid=child.pid, timeout=self._connect_timeout)
        self._supervisor.restart(f"its API process did not connect within {self._connect_timeout:g} s",
                                 planned=False, of=child)

    def _exited(self, child: Child, status: int | None, planned: bool) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
        self._drop_connection("ExaBGP exited")
        for address in self._peers:
            self._peers[address] = "down"
        self._signal()
        self._changed()

    # -- small helpers

    def _changed(self) -> None:
        self._signal()
        try:
            self._on_change()
        except Exception:
            self._log.exception("on_change_failed")  # event=on_change_failed error=<the traceback>

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
