"""In-memory stand-ins for the layers that run daemons, for the agent's unit tests: FakeBgpSpeaker (a BgpSpeaker,
ExaBGP simulated) and FakeProxy (a ProxyLayer, HAProxy simulated). Each keeps the promises its real counterpart
keeps: tests/contracts holds them, run against the fake in tests/unit and against the real one (ExaBGP with BIRD,
HAProxy) in tests/integration."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from ipaddress import ip_address

from lbagent import model
from lbagent.l3 import render
from lbagent.l3.speaker import BgpCommandError, BgpNotConnected, sync
from lbagent.l7.process import ApplyResult, ConfigRefused
from lbagent.l7.runtime import ProxyError, RuntimeState, ServerRuntime, runtime_commands
from lbagent.plan.http import ServerState
from lbagent.plan.services import Announcement


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
        self._peers = dict.fromkeys(self._peers, "down")  # ExaBGP stopped: its sessions closed

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



class FakeProxy:
    """In-memory ProxyLayer for the agent's unit tests: the same start/reload/runtime decisions, no HAProxy."""

    def __init__(self, on_change: Callable[[], None] = lambda: None,
                 runtime_socket: str = "/run/lbagent/haproxy/api.sock") -> None:
        self.on_change = on_change
        self._runtime_socket = runtime_socket
        self.restarts = 0
        self.reloads: dict[str, int] = {}
        self.runtime_updates = 0
        self.configs: list[str] = []
        """Every config HAProxy took (started or reloaded with), in order."""
        self.config: str | None = None  # the latest applied text, runtime-only changes included
        self.structure: str | None = None
        self.state: dict[tuple[str, str], tuple[int, ServerState]] = {}
        """(backend, server) -> (weight, state) as 'HAProxy' has it now."""
        self.commands: list[str] = []
        """Every runtime API command 'sent', in order."""
        self.certificates: dict[str, str] = {}
        self.reject: str | None = None
        """Configs containing this text fail validation."""
        self.refuse_start = False
        """Starting fails (a port taken, say) while set."""
        self.stopped: list[float] = []  # the grace of each stop()
        self.running = False
        self._died = False

    @property
    def runtime_socket(self) -> str:
        return self._runtime_socket

    def up(self) -> bool:
        return self.running

    async def validate(self, config: str) -> None:
        if self.reject is not None and self.reject in config:
            raise ConfigRefused(f"HAProxy refused the config: config : parsing : {self.reject!r}")

    async def apply(self, config: str, structure: str, runtime: RuntimeState, reason: str) -> ApplyResult:
        started = reloaded = False
        if not self.running:
            await self.validate(config)
            if self.refuse_start:
                raise ProxyError("HAProxy exited (status 1): cannot bind socket")
            self.running = started = True
            if self._died:
                self._died = False
                self.restarts += 1
        elif structure != self.structure:
            await self.validate(config)
            self.reloads[reason] = self.reloads.get(reason, 0) + 1
            reloaded = True
        if started or reloaded:
            self.configs.append(config)
            self.structure = structure
            # What the rendered config carries (lbagent.l7.render): each server's weight, a drained one at weight 0
            # (and ready), one in maintenance disabled. The runtime API sets the rest, as below.
            self.state = {key: (0 if state is ServerState.DRAIN else weight,
                                ServerState.MAINT if state is ServerState.MAINT else ServerState.READY)
                          for key, (weight, state) in runtime.items()}
        current = {key: ServerRuntime(w, s, 0, 2) for key, (w, s) in self.state.items()}
        commands = runtime_commands(current, runtime)
        self.commands += commands
        self.runtime_updates += len(commands)
        self.state.update({key: value for key, value in runtime.items() if key in self.state})
        self.config = config
        return ApplyResult(reloaded, len(commands), started)

    async def set_certificate(self, path: str, pem: str) -> None:
        self.certificates[path] = pem

    async def stop(self, grace: float) -> None:
        self.stopped.append(grace)
        self.running = self._died = False
        self.structure = None
        self.state = {}

    def kill(self) -> None:
        """Simulate HAProxy dying: down until restart() (the supervisor) or the next apply()."""
        self.running = False
        self._died = True
        self.on_change()

    def restart(self) -> None:
        """Simulate the supervisor starting HAProxy again on the last config and runtime state."""
        self.running = True
        self._died = False
        self.restarts += 1
        self.on_change()
