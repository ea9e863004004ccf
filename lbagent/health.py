"""Health of each (service, node) pair: TCP probes of the node's nodePorts with rise/fall hysteresis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

from lbagent import model
from lbagent.logfmt import event
from lbagent.verdicts import Verdicts
from lbagent.watched import watched_timeout

log = logging.getLogger("lbagent.health")

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
    """What is probed for one (service, node): how, at which node address, on which ports."""

    service: str
    node: str
    kind: model.ProbeKind
    address: model.IPAddress
    ports: tuple[int, ...]  # TCP nodePorts, or the one HTTP port (healthCheckNodePort, kube-proxy's healthz)
    check: model.HealthCheck

    @property
    def key(self) -> HealthKey:
        return (self.service, self.node)


def targets(m: model.Model) -> dict[HealthKey, Target]:
    """Every probe the model calls for. A UDP-only Cluster service has nothing to connect to: it probes
    nothing unless kube-proxy's healthz is enabled (recommended for UDP)."""
    out: dict[HealthKey, Target] = {}
    for service in m.services:
        out.update(service_targets(service, m.nodes))
    for backend in m.backends:
        for endpoint in backend.endpoints:
            out[(backend.key, str(endpoint))] = Target(backend.key, str(endpoint), model.ProbeKind.NODE_PORT,
                                                       endpoint.address, (endpoint.port,), backend.health_check)
    return out


def probed_on(service: model.Service, node: str) -> bool:
    """Whether a service is probed on a node: everywhere, unless the source names the nodes with its endpoints (a
    Local service's EndpointSlices): then only there."""
    return service.endpoint_nodes is None or node in service.endpoint_nodes


def not_probed_reason(service: model.Service | None, node: str) -> str:
    """The status reason of a pair without a probe."""
    return "noEndpointsOnNode" if service is not None and not probed_on(service, node) else "notProbed"


def service_targets(service: model.Service, nodes: Iterable[model.Node]) -> dict[HealthKey, Target]:
    """One service's probes: one per node; for a Local service whose EndpointSlices are known (the Kubernetes
    source), one per node that has an endpoint: the others take no flows whatever a probe would say, and probing
    them all costs a probe loop per Service and node (200,000 at 10,000 Services and 20 nodes). A node that gains
    an endpoint is probed at once, and its first answer decides."""
    nodes = [n for n in nodes if probed_on(service, n.name)]
    kind = service.probe
    if kind is model.ProbeKind.HEALTH_CHECK_NODE_PORT:
        ports: tuple[int, ...] = (service.health_check_node_port or 0,)
    elif kind is model.ProbeKind.KUBE_PROXY:
        ports = (service.health_check.kube_proxy_port,)
    else:
        ports = tuple(p.node_port for p in service.ports if p.protocol is model.Protocol.TCP)
    out: dict[HealthKey, Target] = {}
    for node in nodes:
        # Node health does not depend on the family: probe the address of the service's first VIP family
        # (a service only HAProxy reaches has no VIP: its node's first address, the one HAProxy dials).
        address = next((a for v in service.vips if (a := node.address_for(v)) is not None),
                       None if service.vips else node.addresses[0])
        if address is not None:
            out[(service.key, node.name)] = Target(service.key, node.name, kind, address, ports, service.health_check)
    return out


# A probe connection is closed with a reset (SO_LINGER 0), as HAProxy closes its checks: a prober that closed
# politely would hold a TIME_WAIT socket for a minute for each of its thousands of connections per second.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


async def tcp_probe(address: model.IPAddress, port: int, timeout: float) -> str | None:
    """Open a TCP connection to address:port and reset it: a bare socket, no streams (a probe is all overhead)."""
    sock = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        async with watched_timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (str(address), port))
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__).lower()
    finally:
        sock.close()
    return None


async def http_probe(address: model.IPAddress, port: int, path: str, timeout: float) -> tuple[int, bytes] | str:
    """GET http://address:port/path; the status and body, or a short reason it failed."""
    host = f"[{address}]" if address.version == 6 else str(address)
    try:
        async with watched_timeout(timeout):
            reader, writer = await asyncio.open_connection(str(address), port)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: lbagent\r\n\r\n".encode())
                await writer.drain()
                response = await reader.read(65536)
            finally:
                writer.close()
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__).lower()
    head, _, body = response.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return "not an HTTP answer"
    return int(parts[1]), body


def _local_endpoints(body: bytes) -> int | None:
    try:
        doc = json.loads(body)
        return int(doc["localEndpoints"])
    except (ValueError, KeyError, TypeError):
        return None


async def probe(target: Target) -> str | None:
    """One probe round for a (service, node) pair: None when it passed, else the reason it failed."""
    timeout = target.check.timeout
    if target.kind is model.ProbeKind.NODE_PORT:
        for port in target.ports:
            error = await tcp_probe(target.address, port, timeout)
            if error is not None:
                return f"{target.address}:{port} {error}"
        return None
    path = "/healthz" if target.kind is model.ProbeKind.KUBE_PROXY else "/"
    result = await http_probe(target.address, target.ports[0], path, timeout)
    where = f"{target.address}:{target.ports[0]}{path}"
    if isinstance(result, str):
        return f"{where} {result}"
    status, body = result
    if target.kind is model.ProbeKind.HEALTH_CHECK_NODE_PORT:
        # kube-proxy: 200 with localEndpoints > 0 when the node has a ready endpoint of the service, else 503.
        count = _local_endpoints(body)
        if status == 200 and (count is None or count > 0):
            return None
        return f"{where} noLocalEndpoints (HTTP {status}, localEndpoints {count})"
    return None if status == 200 else f"{where} HTTP {status}"


Prober = Callable[[Target], Awaitable[str | None]]


# How a failed probe ends when nothing answered at all (the way to the node is gone, or the node with it), as opposed
# to an answer that says no (a refused connection, an HTTP status).
UNANSWERED = ("timeout", "network is unreachable", "no route to host", "network is down", "host is down")


def answered(error: str | None) -> bool:
    """Whether a probe result came from the node: a success, or a failure the node itself answered."""
    return error is None or not error.endswith(UNANSWERED)


# A refused connection (lbagent.l4.refusals) wakes its pair's probe loop: the next probe starts at once, but never
# sooner than this after the previous one started, however many clients are refused meanwhile.
WAKE_GAP = 0.1


# What one probe loop checks: the same node, kind, address, ports and settings give the same answer, whichever
# service asks (kube-proxy's /healthz is one per node for every Cluster service that probes it).
ProbeId = tuple[str, model.ProbeKind, model.IPAddress, tuple[int, ...], model.HealthCheck]


def probe_id(target: Target) -> ProbeId:
    return (target.node, target.kind, target.address, target.ports, target.check)


@dataclass
class _Probe:
    target: Target  # the first pair's: what is probed, for every pair in `pairs`
    state: ProbeState
    pairs: set[HealthKey] = field(default_factory=set)
    shown: bool | None = None  # the verdict its pairs have in `verdicts` (the state's, unless held: `_CutOff`)
    task: asyncio.Task[None] | None = field(default=None)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class ServedBy:
    """Whom a refusal from a node's address and a nodePort concerns: the pairs of the services with that nodePort and
    the nodes with that address. Kept as two indexes, by address and by nodePort, not as every combination of them
    (10,000 services x 2 ports x 20 nodes x 2 addresses made 800,000 lists, about 90 MiB)."""

    def __init__(self, nodes: Iterable[model.Node] = (), services: Iterable[model.Service] = ()) -> None:
        self.nodes_at: dict[model.IPAddress, list[str]] = {}
        for node in nodes:
            for address in node.addresses:
                self.nodes_at.setdefault(address, []).append(node.name)
        self.services_on: dict[int, list[str]] = {}
        for service in services:
            self.add(service)

    def add(self, service: model.Service) -> None:
        for port in service.ports:
            self.services_on.setdefault(port.node_port, []).append(service.key)

    def remove(self, service: model.Service) -> None:
        for port in service.ports:
            keys = self.services_on.get(port.node_port, [])
            with contextlib.suppress(ValueError):
                keys.remove(service.key)
            if not keys:
                self.services_on.pop(port.node_port, None)

    def pairs(self, address: model.IPAddress, port: int) -> Iterator[HealthKey]:
        for node in self.nodes_at.get(address, ()):
            for key in self.services_on.get(port, ()):
                yield key, node


# The reason of a pair whose probe passes again while its verdict is held back after a cut-off (`_CutOff`).
HELD = "probeSucceededHeldAfterCutOff"


@dataclass
class _CutOff:
    """Every probe went unanswered in its latest round: this LB looks cut off from the nodes (its links are down),
    not the nodes from it. Once a probe is answered again (`since`), nodes that turn healthy are held back until
    every probe has settled (`unsettled`: at least rise rounds since, and not halfway through a flip), or until
    `deadline`, then shown together. Shown one at a time, as the probes happen to finish, each would be a plan of its
    own: this LB would announce its VIPs again with some of its nodes, and its lookup tables would send the flows the
    routers bring back to other nodes than the other LBs do (`dsr` keeps no state to save them)."""

    began: float
    since: float | None = None
    unsettled: set[ProbeId] = field(default_factory=set)
    rounds: dict[ProbeId, int] = field(default_factory=dict)
    deadline: asyncio.TimerHandle | None = None


class HealthChecker:
    """Runs one probe loop per distinct probe (pairs that would probe the same thing share one: its verdict is
    theirs) and tells `on_change` of every pair whose verdict flips. When every probe goes unanswered at once, this
    LB is the one cut off: the nodes that come back are shown together once the probes settle (`_CutOff`)."""

    def __init__(self, on_change: Callable[[HealthKey], None], prober: Prober = probe,
                 on_cut_off: Callable[[bool], None] = lambda cut_off: None,
                 jitter: Callable[[], float] = random.random) -> None:
        """`on_cut_off(True)` when every probe went unanswered at once, `on_cut_off(False)` when the nodes held since
        then are shown again. `jitter()`, in [0, 1), is where in its interval a probe's second round falls."""
        self._on_change = on_change
        self._on_cut_off = on_cut_off
        self._prober = prober
        self._jitter = jitter
        self._probes: dict[ProbeId, _Probe] = {}
        self._probe_of: dict[HealthKey, ProbeId] = {}
        self._served_by = ServedBy()
        self.verdicts = Verdicts()
        """Live verdicts, kept current as probes flip: what the planner reads (never copied per sync)."""
        self._running = False
        self._complete = asyncio.Event()
        self._unanswered: set[ProbeId] = set()  # probes whose latest round got no answer at all
        self._cut_off: _CutOff | None = None

    def update(self, m: model.Model) -> None:
        """Reconcile the probes with a new model; a probe whose target is unchanged keeps its state, and a pair
        that joins a probe already running has its verdict at once."""
        wanted: dict[ProbeId, tuple[Target, set[HealthKey]]] = {}
        for key, target in targets(m).items():
            wanted.setdefault(probe_id(target), (target, set()))[1].add(key)
        self._served_by = ServedBy(m.nodes, m.services)
        for pid in [pid for pid in self._probes if pid not in wanted]:
            self._drop(pid)
        for pid, (target, pairs) in wanted.items():
            self._probe_for(pid, target).pairs = pairs
        self._probe_of = {key: pid for pid, (_, pairs) in wanted.items() for key in pairs}
        self.verdicts.clear()
        self.verdicts.update({key: p.shown for p in self._probes.values() if p.shown is not None
                              for key in p.pairs})
        self._note_complete()

    def update_services(self, old: model.Model, new: model.Model, keys: Iterable[str]) -> bool:
        """`update(new)` for a reload that changed these services only (`changed_services(old, new)`): costs what
        changed, and a probe a changed service still asks for keeps its state. False, having done nothing, when the
        nodes or the static backends changed too: then only `update(new)` will do."""
        if old.nodes != new.nodes or old.backends != new.backends:
            return False
        emptied: set[ProbeId] = set()
        for key in keys:
            if old.has_service(key):
                service = old.service(key)
                for node in old.nodes:
                    pair = (key, node.name)
                    self.verdicts.pop(pair, None)
                    if (pid := self._probe_of.pop(pair, None)) is not None:
                        self._probes[pid].pairs.discard(pair)
                        emptied.add(pid)
                self._served_by.remove(service)
            if new.has_service(key):
                service = new.service(key)
                for pair, target in service_targets(service, new.nodes).items():
                    pid = probe_id(target)
                    known = self._probe_for(pid, target)
                    known.pairs.add(pair)
                    self._probe_of[pair] = pid
                    if known.shown is not None:
                        self.verdicts[pair] = known.shown
                self._served_by.add(service)
        for pid in emptied:
            if not self._probes[pid].pairs:
                self._drop(pid)
        self._note_complete()
        return True

    def _probe_for(self, pid: ProbeId, target: Target) -> _Probe:
        """The probe of this id, made (and started, if probes run) when there is none yet."""
        known = self._probes.get(pid)
        if known is None:
            known = self._probes[pid] = _Probe(target, ProbeState(target.check.rise, target.check.fall))
            if self._running:
                self._start(pid)
        return known

    def _drop(self, pid: ProbeId) -> None:
        probe = self._probes.pop(pid)
        if probe.task is not None:
            probe.task.cancel()
        self._unanswered.discard(pid)
        if self._cut_off is not None:
            self._settled(pid)

    def _note_complete(self) -> None:
        if not self._complete.is_set() and self.complete():
            self._complete.set()

    def start(self) -> None:
        self._running = True
        for pid in self._probes:
            self._start(pid)

    async def stop(self) -> None:
        self._running = False
        if self._cut_off is not None and self._cut_off.deadline is not None:
            self._cut_off.deadline.cancel()
        tasks = [p.task for p in self._probes.values() if p.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def probes(self) -> int:
        """How many probe loops run (pairs that probe the same thing share one)."""
        return len(self._probes)

    def snapshot(self) -> dict[HealthKey, bool]:
        """A copy of the verdicts known so far; a pair not probed yet is absent."""
        return dict(self.verdicts)

    def reasons(self) -> dict[HealthKey, str]:
        """Why each pair has its verdict: the latest probe's result, or HELD while a cut-off holds it back."""
        return {key: HELD if (p := self._probes[pid]).shown is False and p.state.healthy else p.state.reason
                for key, pid in self._probe_of.items()}

    def complete(self) -> bool:
        """True once every pair has a verdict: nothing is programmed before that (a full first snapshot)."""
        return all(p.state.healthy is not None for p in self._probes.values())

    async def wait_complete(self) -> None:
        await self._complete.wait()

    def refused(self, address: model.IPAddress, port: int) -> None:
        """A node refused a connection the data plane forwarded to address:port: probe its pairs now (their
        rise/fall still decides: a refusal is a reason to look, not a verdict)."""
        for key in self._served_by.pairs(address, port):
            pid = self._probe_of.get(key)
            if pid is not None and (probe := self._probes[pid]).target.check.probe_on_refusal:
                probe.wake.set()

    async def probe_once(self, key: HealthKey, woken: bool = False) -> None:
        """One probe round for the probe of a pair (shared with the pairs that probe the same), then the
        hysteresis for all of them."""
        await self._round(self._probe_of[key], woken)

    async def _round(self, pid: ProbeId, woken: bool) -> None:
        probe = self._probes[pid]
        target = probe.target
        try:
            error = await self._prober(target)
        except Exception as exc:  # a probe that breaks is a failed probe, never a dead probe loop
            error = f"probe error: {type(exc).__name__}: {exc}"
        probe.state.observe(error)
        if self._probes.get(pid) is not probe:
            return  # the probe was removed by a reload while it was in flight
        self._note_answer(pid, answered(error))
        held = self._cut_off is not None and probe.state.healthy is True and probe.shown is False
        if not held:
            self._show(probe, **({"woken": "refused"} if woken else {}))
        self._note_complete()
        if self._cut_off is not None and self._cut_off.since is not None:
            self._cut_off.rounds[pid] = rounds = self._cut_off.rounds.get(pid, 0) + 1
            if rounds >= probe.target.check.rise and probe.state.streak == 0:
                self._settled(pid)

    def _show(self, probe: _Probe, **why: object) -> None:
        """Give the probe's pairs its verdict, and log and tell of those that flip."""
        was, probe.shown = probe.shown, probe.state.healthy
        if probe.shown is None:
            return
        for pair in probe.pairs:
            self.verdicts[pair] = probe.shown
        if probe.shown == was:
            return
        for service, node in sorted(probe.pairs):
            event(log, logging.INFO if probe.shown else logging.WARNING, "health_changed", service=service, node=node,
                  healthy=probe.shown, was=was, reason=probe.state.reason, **why)
        for pair in sorted(probe.pairs):
            self._on_change(pair)

    def _note_answer(self, pid: ProbeId, answer: bool) -> None:
        """Keep count of the probes nothing answered; all of them at once is a cut-off, and the first answer after
        it starts the wait for the probes to settle."""
        if not answer:
            self._unanswered.add(pid)
            if self._cut_off is None and len(self._unanswered) == len(self._probes) and self.complete():
                self._cut_off = _CutOff(began=asyncio.get_running_loop().time())
                event(log, logging.WARNING, "health_cut_off", probes=len(self._probes),
                      note="every probe went unanswered: nodes that come back are shown together once probes settle")
                self._on_cut_off(True)
            return
        self._unanswered.discard(pid)
        cut = self._cut_off
        if cut is None or cut.since is not None:
            return
        loop = asyncio.get_running_loop()
        cut.since = loop.time()
        cut.unsettled = set(self._probes)
        # the longest a probe can take to settle: a failure, then rise successes (or fall failures), one round more
        wait = max(((max(c.rise, c.fall) + 1) * c.interval + c.timeout
                    for c in (p.target.check for p in self._probes.values())), default=0.0)
        cut.deadline = loop.call_later(wait, self._reconnected)

    def _settled(self, pid: ProbeId) -> None:
        cut = self._cut_off
        if cut is None or cut.since is None:
            return
        cut.unsettled.discard(pid)
        if not cut.unsettled:
            self._reconnected()

    def _reconnected(self) -> None:
        """Show every verdict held since the cut-off, together."""
        cut, self._cut_off = self._cut_off, None
        if cut is None:
            return
        if cut.deadline is not None:
            cut.deadline.cancel()
        held = [p for p in self._probes.values() if p.state.healthy is not None and p.shown != p.state.healthy]
        now = asyncio.get_running_loop().time()
        event(log, logging.INFO, "health_reconnected", shown=len(held), settled=not cut.unsettled,
              cut_off=f"{now - cut.began:.1f}s", settling=f"{now - (cut.since or now):.1f}s")
        for probe in held:
            self._show(probe, held="cutOff")
        self._on_cut_off(False)

    def _start(self, pid: ProbeId) -> None:
        probe = self._probes[pid]
        probe.task = asyncio.get_running_loop().create_task(self._loop(pid), name=f"health {pid[:4]}")

    async def _loop(self, pid: ProbeId) -> None:
        probe = self._probes[pid]
        interval = probe.target.check.interval
        loop = asyncio.get_running_loop()
        woken = False
        # A fresh agent's probes (or a large reload's) all go out together, for a quick first snapshot. After that
        # first round each waits a random part of its interval, once, and keeps that phase: thousands of probes no
        # longer go out in one burst every interval (3,000 services' nodePort probes in one burst timed out on the
        # nodes and the agent alike). Spreading was taken out once, when an LB whose node links came back had its
        # nodes turn healthy one by one and moved flows (the failover demo lost 2 of 16 connections); `_CutOff` now
        # holds the nodes that come back and shows them together, whatever phase each probe has.
        spread = True
        while True:
            started = loop.time()
            probe.wake.clear()  # a refusal from now on asks for one more probe after this one
            await self._round(pid, woken)
            wait = interval * self._jitter() if spread else interval - (loop.time() - started)
            spread = False
            try:
                async with asyncio.timeout(max(0.0, wait)):
                    await probe.wake.wait()
            except TimeoutError:
                woken = False
                continue
            woken = True
            await asyncio.sleep(max(0.0, WAKE_GAP - (loop.time() - started)))

