"""BFD for the BGP sessions: FRR's bfdd, run and supervised by lbagent (lbagent.supervisor) like ExaBGP.

ExaBGP has no BFD, so a router notices a dead LB node only when the BGP hold time runs out (seconds). With BFD on
the session (BIRD `bfd on`, FRR `neighbor X bfd`, the big vendors' equivalents) it notices within the detection
time (3 x 300 ms by default) and drops the node's paths at once.

Why FRR's bfdd (Debian's `frr` package, /usr/lib/frr/bfdd) and not BIRD 2 as a pure BFD speaker, nor our own:
- it is the BFD of the field's most used open routing suite (MetalLB's FRR mode runs the same daemon), interop-tested
  with BIRD, FRR and vendors' routers; writing a BFD state machine with timers precise to a few ms in the agent's
  Python event loop would be a new, unproven implementation on the one path that must never lie;
- it runs standalone: without zebra it logs nothing alarming and keeps single-hop and multihop sessions (tried in
  network namespaces: zebra only adds VRF and interface events lbagent does not need), so lbagent runs one process;
- its peers, intervals and multiplier change at run time through its vty socket (`vtysh -c 'configure terminal' -c
  'bfd' -c 'peer A local-address B' -c 'receive-interval N'`), which negotiates the new timers with a Poll
  sequence: a SIGHUP that changes them flaps no session. BIRD could do that only by `birdc configure`, and BIRD as
  a BFD speaker needs a dummy protocol to request each session (BFD sessions in BIRD exist only for a client:
  BGP, OSPF, static routes);
- its state is there to read, as JSON: `show bfd peers json` (state, uptime or downtime, both sides' intervals)
  and `show bfd peers counters json` (how many times each session went up and down: a flap between two polls is
  counted all the same).

Each agent runs its own bfdd on files under `<runtimeDir>/bfd/`: config, pid file, vty socket (`--vty_socket`),
control socket (`--bfdctl`) and a zebra socket path nothing listens on (`-z`): never /var/run/frr, so two agents in
two network namespaces of one machine, or the distribution's own FRR service, do not collide. It runs as root in
FRR's vty group `frrvty` (FRR requires its user to be a member of that group; `-g frrvty` makes root one for this
process only). It dies with the agent (PR_SET_PDEATHSIG). A crash restarts it with backoff; its sessions then start
again from Down (the router sees them go down and up: a BFD speaker that dies is a failure BFD exists to report)."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from lbagent import model
from lbagent.files import private_dir, write_private
from lbagent.l3.speaker import local_addresses
from lbagent.logfmt import event
from lbagent.supervisor import Child, Supervisor, spawn, terminate_steps

LOG = logging.getLogger("lbagent.bfd")

PACKAGE = "frr"  # the Debian package of bfdd and vtysh
FRR_DAEMONS = "/usr/lib/frr"  # where Debian installs FRR's daemons (off PATH)
VTY_GROUP = "frrvty"  # FRR's vty group (the package creates it)
DIRECTORY = "bfd"  # under the runtime dir
CONFIG_NAME = "bfdd.conf"
PID_NAME = "bfdd.pid"
VTY_SOCKET = "bfdd.vty"  # bfdd names it <daemon>.vty in the --vty_socket directory
CONTROL_SOCKET = "bfdd.ctl"
ZEBRA_SOCKET = "zserv.api"  # nothing listens there: bfdd runs without zebra
STATES = {"up": "up", "down": "down", "init": "init", "shutdown": "admin-down"}  # bfdd's words -> lbagent's


class BfdError(Exception):
    """bfdd did not do what was asked."""


class BfdUnavailable(BfdError):
    """BFD is asked for but bfdd (or vtysh, or FRR's vty group) is not on this machine."""


@dataclass(frozen=True)
class Programs:
    bfdd: str
    vtysh: str


def find_programs() -> Programs:
    """bfdd and vtysh as installed by Debian's frr package; BfdUnavailable naming what is missing and its package."""
    bfdd = shutil.which("bfdd", path=FRR_DAEMONS)
    vtysh = shutil.which("vtysh") or shutil.which("vtysh", path="/usr/bin:/bin")
    missing = [name for name, found in (("bfdd", bfdd), ("vtysh", vtysh)) if found is None]
    if missing:
        raise BfdUnavailable(f"BFD is enabled for a BGP peer but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not installed (looked in {FRR_DAEMONS} and "
                             f"PATH): install the Debian package {PACKAGE} (apt-get install --no-install-recommends "
                             f"{PACKAGE})")
    try:
        grp.getgrnam(VTY_GROUP)
    except KeyError:
        raise BfdUnavailable(f"BFD is enabled for a BGP peer but the group {VTY_GROUP} that bfdd runs in does not "
                             f"exist: reinstall the Debian package {PACKAGE}") from None
    assert bfdd is not None and vtysh is not None
    return Programs(bfdd, vtysh)


# -- what bfdd is told


@dataclass(frozen=True)
class BfdPeer:
    """One session as bfdd keys it (peer, multihop, local address) and its timers."""

    address: model.IPAddress
    local: model.IPAddress | None
    multihop: bool
    settings: model.Bfd

    @property
    def key(self) -> str:
        """bfdd's `peer` line (its words, without the leading space)."""
        return (f"peer {self.address}{' multihop' if self.multihop else ''}"
                f"{f' local-address {self.local}' if self.local is not None else ''}")

    def lines(self) -> list[str]:
        b = self.settings
        return [f"receive-interval {b.receive_interval}", f"transmit-interval {b.transmit_interval}",
                f"detect-multiplier {b.detect_multiplier}"]


def bfd_peers(bgp: model.Bgp, local: Mapping[model.IPAddress, model.IPAddress] | None = None,
              log: logging.Logger = LOG) -> dict[str, BfdPeer]:
    """The sessions for the BGP peers with BFD, keyed by peer address: each from the peer's localAddress, else the
    source address the routing table gives now (`local`), as ExaBGP's session has it. A multihop session needs a
    local address: without one it is left out (and said)."""
    local = local if local is not None else {}
    peers: dict[str, BfdPeer] = {}
    for peer in bgp.bfd_peers:
        assert peer.bfd is not None
        source = peer.local_address or local.get(peer.address)
        multihop = peer.multihop is not None and peer.multihop > 1
        if source is None and multihop:
            event(log, logging.WARNING, "bfd_no_local_address", peer=peer.address,
                  detail="a multihop session needs one: set localAddress or a route to the peer")
            continue
        peers[str(peer.address)] = BfdPeer(peer.address, source, multihop, peer.bfd)
    return peers


def render_config(peers: Iterable[BfdPeer]) -> str:
    """bfdd's config file: what an instance starts with."""
    lines = ["! written by lbagent: bfdd's sessions for the BGP peers with BFD", "bfd"]
    for peer in sorted(peers, key=lambda p: p.key):
        lines += [f" {peer.key}", *(f"  {line}" for line in peer.lines()), " exit", " !"]
    lines.append("exit")
    return "\n".join(lines) + "\n"


def commands(old: Mapping[str, BfdPeer], new: Mapping[str, BfdPeer]) -> list[str]:
    """vtysh commands that turn a running bfdd's `old` sessions into `new` (empty when nothing changes): a session
    whose key (local address, multihop) changed is removed and made anew, one whose timers changed is only given
    them (bfdd negotiates them with the peer without taking the session down)."""
    removed = [peer for address, peer in sorted(old.items()) if address not in new or new[address].key != peer.key]
    changed = [peer for address, peer in sorted(new.items()) if old.get(address) != peer]
    if not removed and not changed:
        return []
    out = ["configure terminal", "bfd"]
    out += [f"no {peer.key}" for peer in removed]
    for peer in changed:
        out += [peer.key, *peer.lines(), "exit"]
    return [*out, "end"]


# -- what bfdd says


@dataclass(frozen=True)
class Session:
    """A session's state as bfdd reports it. Intervals in ms, as negotiated: what this node sends at (the slower of
    its transmit interval and the peer's receive interval), what it expects from the peer, and the time without a
    packet after which it declares the session down (0 while the peer's values are unknown)."""

    peer: str
    local: str | None
    state: str  # up, down, init, admin-down
    since: float | None  # unix time of the last change, if bfdd says
    transmit_interval: int
    receive_interval: int
    detect_time: int
    ups: int  # times this bfdd instance saw the session come up
    downs: int  # ... and go down

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "since": self.since, "local": self.local,
                "transmitInterval": self.transmit_interval, "receiveInterval": self.receive_interval,
                "detectTime": self.detect_time}


def json_documents(text: str) -> list[Any]:
    """The JSON documents vtysh prints one after another (one per -c)."""
    decoder = json.JSONDecoder()
    documents: list[Any] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return documents
        document, index = decoder.raw_decode(text, index)
        documents.append(document)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def parse_sessions(peers: object, counters: object, now: float | None = None) -> dict[str, Session]:
    """Sessions by peer address from `show bfd peers json` and `show bfd peers counters json`."""
    now = time.time() if now is None else now
    counts: dict[tuple[str, str | None], tuple[int, int]] = {}
    for entry in counters if isinstance(counters, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("peer"), str):
            counts[(entry["peer"], entry.get("local"))] = (_int(entry.get("session-up")),
                                                          _int(entry.get("session-down")))
    sessions: dict[str, Session] = {}
    for entry in peers if isinstance(peers, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("peer"), str):
            continue
        with contextlib.suppress(ValueError):
            address = str(ip_address(entry["peer"]))
        local = entry.get("local") if isinstance(entry.get("local"), str) else None
        state = STATES.get(str(entry.get("status")), str(entry.get("status")))
        seconds = entry.get("uptime") if state == "up" else entry.get("downtime")
        since = now - seconds if isinstance(seconds, int | float) and not isinstance(seconds, bool) else None
        remote_rx, remote_tx = _int(entry.get("remote-receive-interval")), _int(entry.get("remote-transmit-interval"))
        rx, tx = _int(entry.get("receive-interval")), _int(entry.get("transmit-interval"))
        known = state == "up"
        receive = max(rx, remote_tx) if known else 0
        ups, downs = counts.get((entry["peer"], local), (0, 0))
        sessions[address] = Session(
            peer=address, local=local, state=state, since=since,
            transmit_interval=max(tx, remote_rx) if known else 0, receive_interval=receive,
            detect_time=_int(entry.get("remote-detect-multiplier")) * receive if known else 0,
            ups=ups, downs=downs)
    return sessions


def _line_level(line: str) -> int:
    """bfdd's own lines: its harmless complaints at debug (it cannot chown its vty socket to FRR's group: it runs
    as root and the socket is root's; no zebra to talk to), errors as warnings, the rest at info."""
    if "could chown socket" in line or "zclient" in line:
        return logging.DEBUG
    return logging.WARNING if "[EC " in line else logging.INFO


class BfdSpeaker:
    """Runs bfdd under a Supervisor for the BGP peers that have BFD; changes its sessions at run time through vtysh;
    reads their state (poll()), counting transitions across bfdd instances."""

    def __init__(
        self,
        bgp: model.Bgp,
        runtime_dir: str,
        logger: logging.Logger = LOG,
        *,
        poll_interval: float = 1.0,
        command_timeout: float = 5.0,
        stop_timeout: float = 3.0,
        backoff: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        self._bgp = bgp
        self._directory = os.path.join(os.path.abspath(runtime_dir), DIRECTORY)
        self._log = logger
        self.poll_interval = poll_interval
        self._command_timeout = command_timeout
        self._supervisor = Supervisor("bfdd", self._launch, logger, on_exit=self._exited,
                                      stop_steps=terminate_steps(stop_timeout), backoff=backoff)
        self._programs: Programs | None = None
        self._running: dict[str, BfdPeer] = {}  # what the current instance has (its config file, then vtysh)
        self._sessions: dict[str, Session] = {}
        self._counted: dict[str, tuple[int, int]] = {}  # peer -> (ups, downs) of the current instance counted
        self.transitions: dict[tuple[str, str], int] = {}  # (peer, "up" | "down") -> count since the agent started
        self._started = False
        self._stopping = False

    @property
    def restarts(self) -> int:
        return self._supervisor.restarts

    @property
    def pid(self) -> int | None:
        child = self._supervisor.child
        return child.pid if child is not None else None

    @property
    def vty_directory(self) -> str:
        return self._directory

    @property
    def config_path(self) -> str:
        return os.path.join(self._directory, CONFIG_NAME)

    def sessions(self) -> Mapping[str, Session]:
        """The sessions of the BGP peers with BFD (a peer bfdd does not report yet: state down)."""
        out = {}
        for peer in self._bgp.bfd_peers:
            address = str(peer.address)
            out[address] = self._sessions.get(address) or Session(address, None, "down", None, 0, 0, 0, 0, 0)
        return out

    def check(self, bgp: model.Bgp) -> None:
        """Raise BfdUnavailable when `bgp` asks for BFD and this machine cannot give it."""
        if bgp.bfd_peers:
            self._programs = find_programs()

    async def start(self) -> None:
        """Start bfdd when a peer has BFD (BfdUnavailable when it is not installed)."""
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        if self._bgp.bfd_peers:
            self.check(self._bgp)
            private_dir(self._directory)
            self._supervisor.run()

    async def reconfigure(self, bgp: model.Bgp) -> None:
        """Adopt new peers and timers: through vtysh into the running bfdd (no session flaps), starting or stopping
        it when BFD comes to or leaves the config. A bfdd that refuses the change is restarted on the new config."""
        self.check(bgp)
        old, self._bgp = self._bgp, bgp
        if not self._started or self._stopping:
            return
        if not bgp.bfd_peers:
            if old.bfd_peers:
                await self._supervisor.stop()
                self._sessions.clear()
            return
        if self._supervisor.child is None and not self._supervisor.supervising:
            private_dir(self._directory)
            self._supervisor.run()
            return
        new = bfd_peers(bgp, local_addresses(bgp), self._log)
        write_private(self.config_path, render_config(new.values()))  # what the next instance starts with
        todo = commands(self._running, new)
        if not todo or self._supervisor.child is None:  # nothing to change, or the next instance reads the file
            return
        try:
            await self._vtysh(todo)
        except BfdError as error:
            event(self._log, logging.ERROR, "bfdd_reconfigure_failed", error=str(error), detail="restarting bfdd")
            self._supervisor.restart("its sessions could not be changed at run time", planned=True)
            return
        self._running = new
        event(self._log, logging.INFO, "bfd_reconfigured", peers=",".join(sorted(new)) or "-")

    async def stop(self) -> None:
        self._stopping = True
        await self._supervisor.stop()

    async def poll(self) -> None:
        """Read the sessions' state from bfdd; log changes, count transitions."""
        child = self._supervisor.child
        if child is None or not self._bgp.bfd_peers:
            return
        try:
            text = await self._vtysh(["show bfd peers json", "show bfd peers counters json"], configure=False)
            peers, counters = json_documents(text)[:2]
        except (BfdError, ValueError) as error:
            if self._supervisor.child is child:
                event(self._log, logging.DEBUG, "bfd_poll_failed", error=str(error))
            return
        if self._supervisor.child is not child:
            return
        self._update(parse_sessions(peers, counters))

    def _update(self, sessions: dict[str, Session]) -> None:
        for address, session in sessions.items():
            before = self._sessions.get(address)
            counted = self._counted.get(address, (0, 0))
            ups, downs = max(session.ups - counted[0], 0), max(session.downs - counted[1], 0)
            if ups:
                self.transitions[(address, "up")] = self.transitions.get((address, "up"), 0) + ups
            if downs:
                self.transitions[(address, "down")] = self.transitions.get((address, "down"), 0) + downs
            self._counted[address] = (max(session.ups, counted[0]), max(session.downs, counted[1]))
            if before is None or before.state != session.state:
                event(self._log, logging.WARNING if session.state == "down" and before is not None else logging.INFO,
                      "bfd_session", peer=address, state=session.state,
                      was=before.state if before is not None else "-", local=session.local or "-",
                      detect_time_ms=session.detect_time)
        self._sessions = sessions

    async def _vtysh(self, lines: Sequence[str], configure: bool = True) -> str:
        programs = self._programs or find_programs()
        argv = [programs.vtysh, "--vty_socket", self._directory, "-d", "bfdd"]
        for line in lines:
            argv += ["-c", line]
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
        except OSError as error:
            raise BfdError(f"cannot run vtysh: {error}") from error
        try:
            async with asyncio.timeout(self._command_timeout):
                out, _ = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise BfdError(f"vtysh took more than {self._command_timeout:g} s") from None
        text = out.decode("utf-8", "replace")
        if proc.returncode != 0 or (configure and "%" in text):
            raise BfdError(f"vtysh exited with {proc.returncode}: {text.strip()[:500]}")
        return text

    # -- the bfdd process (started, watched, restarted and stopped by the supervisor)

    async def _launch(self) -> Child:
        programs = self._programs or find_programs()
        bgp = self._bgp
        peers = bfd_peers(bgp, local_addresses(bgp), self._log)
        write_private(self.config_path, render_config(peers.values()))
        for name in (VTY_SOCKET, CONTROL_SOCKET):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._directory, name))
        d = self._directory
        argv = [programs.bfdd, "-f", self.config_path, "--vty_socket", d, "-i", os.path.join(d, PID_NAME),
                "--bfdctl", os.path.join(d, CONTROL_SOCKET), "-z", os.path.join(d, ZEBRA_SOCKET),
                "-u", "root", "-g", VTY_GROUP, "-P", "0", "--log", "stdout", "--log-level", "info"]
        child = await spawn("bfdd", argv, self._log, die_with_parent=True, on_line=_line_level)
        self._running = peers
        self._counted = {}
        event(self._log, logging.INFO, "bfdd_started", pid=child.pid, peers=",".join(sorted(peers)) or "-",
              command=" ".join(argv))
        return child

    def _exited(self, child: Child, status: int | None, planned: bool) -> None:
        self._running = {}
        self._counted = {}
        for address, session in list(self._sessions.items()):
            if session.state != "down":
                self._sessions[address] = Session(address, session.local, "down", time.time(), 0, 0, 0, 0, 0)
