"""Health of each (service, node) pair: TCP probes of the node's nodePorts with rise/fall hysteresis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lbagent import model
from lbagent.logfmt import event

log = logging.getLogger("lbagent.health")

# Returns None when the probe passed, else a short reason ("connection refused", "timeout").
Prober = Callable[[model.IPAddress, int, float], Awaitable[str | None]]
HealthKey = tuple[str, str]  # (service key, node name)


@dataclass
class ProbeState:
    """Rise/fall hysteresis. The first result decides at once so a fresh agent starts in seconds, not rise*interval."""

    rise: int
    fall: int
    healthy: bool | None = None
    streak: int = 0
    reason: str = "notProbedYet"

    def observe(self, error: str | None) -> bool:
        """Record one probe result; True when the healthy/unhealthy verdict flipped."""
        ok = error is None
        self.reason = "probeSucceeded" if ok else error or "probeFailed"
        if self.healthy is None:
            self.healthy, self.streak = ok, 0
            return True
        if ok == self.healthy:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak >= (self.rise if ok else self.fall):
            self.healthy, self.streak = ok, 0
            return True
        return False


@dataclass(frozen=True)
class Target:
    """What is probed for one (service, node): the node's address of the VIP's family and the TCP nodePorts."""

    service: str
    node: str
    address: model.IPAddress
    ports: tuple[int, ...]
    check: model.HealthCheck

    @property
    def key(self) -> HealthKey:
        return (self.service, self.node)


def targets(m: model.Model) -> dict[HealthKey, Target]:
    """Every probe the model calls for. UDP cannot be connect-probed: a UDP-only service probes nothing."""
    out: dict[HealthKey, Target] = {}
    for service in m.services:
        tcp_ports = tuple(p.node_port for p in service.ports if p.protocol is model.Protocol.TCP)
        for node in m.nodes:
            address = node.address_for(service.vip)
            if address is not None:
                out[(service.key, node.name)] = Target(service.key, node.name, address, tcp_ports, service.health_check)
    return out


async def tcp_probe(address: model.IPAddress, port: int, timeout: float) -> str | None:
    """Open and close a TCP connection to address:port."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(str(address), port)
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__).lower()
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


@dataclass
class _Probe:
    target: Target
    state: ProbeState
    task: asyncio.Task[None] | None = field(default=None)


class HealthChecker:
    """Runs one probe loop per target and tells `on_change` whenever a verdict flips."""

    def __init__(self, on_change: Callable[[], None], prober: Prober = tcp_probe) -> None:
        self._on_change = on_change
        self._prober = prober
        self._probes: dict[HealthKey, _Probe] = {}
        self._running = False
        self._complete = asyncio.Event()

    def update(self, m: model.Model) -> None:
        """Reconcile the probes with a new model; a pair whose target is unchanged keeps its state."""
        wanted = targets(m)
        for key in list(self._probes):
            if key not in wanted or wanted[key] != self._probes[key].target:
                self._cancel(key)
        for key, target in wanted.items():
            if key not in self._probes:
                self._probes[key] = _Probe(target, ProbeState(target.check.rise, target.check.fall))
                if self._running:
                    self._start(key)

    def start(self) -> None:
        self._running = True
        for key in self._probes:
            self._start(key)

    async def stop(self) -> None:
        self._running = False
        tasks = [p.task for p in self._probes.values() if p.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def snapshot(self) -> dict[HealthKey, bool]:
        """The verdicts known so far; a pair not probed yet is absent."""
        return {k: p.state.healthy for k, p in self._probes.items() if p.state.healthy is not None}

    def reasons(self) -> dict[HealthKey, str]:
        return {k: p.state.reason for k, p in self._probes.items()}

    def complete(self) -> bool:
        """True once every pair has a verdict: nothing is programmed before that (a full first snapshot)."""
        return all(p.state.healthy is not None for p in self._probes.values())

    async def wait_complete(self) -> None:
        await self._complete.wait()

    async def probe_once(self, key: HealthKey) -> None:
        """One probe round for a pair: every TCP nodePort must answer."""
        probe = self._probes[key]
        target = probe.target
        error: str | None = None
        for port in target.ports:
            error = await self._prober(target.address, port, target.check.timeout)
            if error is not None:
                error = f"{target.address}:{port} {error}"
                break
        was = probe.state.healthy
        flipped = probe.state.observe(error)
        if self.complete():
            self._complete.set()
        if flipped and self._probes.get(key) is probe:
            event(
                log, logging.INFO if probe.state.healthy else logging.WARNING, "health_changed",
                service=target.service, node=target.node,
                healthy=probe.state.healthy, was=was, reason=probe.state.reason,
            )
            self._on_change()

    def _start(self, key: HealthKey) -> None:
        probe = self._probes[key]
        probe.task = asyncio.get_running_loop().create_task(self._loop(key), name=f"health {key}")

    def _cancel(self, key: HealthKey) -> None:
        probe = self._probes.pop(key)
        if probe.task is not None:
            probe.task.cancel()

    async def _loop(self, key: HealthKey) -> None:
        interval = self._probes[key].target.check.interval
        while True:
            started = asyncio.get_running_loop().time()
            await self.probe_once(key)
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, interval - elapsed))

