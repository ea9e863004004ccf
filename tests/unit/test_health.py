"""Rise/fall hysteresis, the probe round over every TCP nodePort, and the real TCP probe on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable
from ipaddress import ip_address
from typing import Any

import yaml

from lbagent import health, model
from lbagent.health import HealthChecker, ProbeState, Target, probe, targets, tcp_probe
from lbagent.plan.services import changed_services
from lbagent.sources.file import config
from tests.unit.test_config import MINIMAL


def test_first_result_decides_then_hysteresis() -> None:
    state = ProbeState(rise=2, fall=3)
    assert state.observe(None) is True and state.healthy is True
    assert state.observe("refused") is False and state.healthy is True
    assert state.observe("refused") is False and state.healthy is True
    assert state.observe("refused") is True and state.healthy is False  # third failure: fall=3
    assert state.reason == "refused"
    assert state.observe(None) is False and state.healthy is False
    assert state.observe("refused") is False  # a failure resets the rise streak
    assert state.observe(None) is False
    assert state.observe(None) is True and state.healthy is True  # two in a row: rise=2


def test_first_failure_decides_unhealthy() -> None:
    state = ProbeState(rise=2, fall=2)
    assert state.observe("timeout") is True and state.healthy is False


def _model(extra_services: list[dict[str, object]] | None = None) -> model.Model:
    doc = yaml.safe_load(MINIMAL)
    doc["nodes"].append({"name": "node2", "addresses": ["203.0.113.12"]})
    doc["services"][0]["ports"] = [{"name": "a", "port": 80, "nodePort": 30080},
                                   {"name": "b", "port": 443, "nodePort": 30443},
                                   {"name": "c", "protocol": "UDP", "port": 53, "nodePort": 30053}]
    doc["services"] += extra_services or []
    return config.parse(yaml.safe_dump(doc))


def test_targets_probe_only_tcp_node_ports() -> None:
    t = targets(_model([{"name": "dns", "vip": "192.0.2.11",
                         "ports": [{"protocol": "UDP", "port": 53, "nodePort": 30054}]}]))
    assert t[("default/web", "node1")].ports == (30080, 30443)
    assert t[("default/dns", "node2")].ports == ()


def test_probe_round_needs_every_port_and_reports_changes() -> None:
    answers: dict[tuple[str, int], str | None] = {}
    calls: list[tuple[str, int]] = []
    changes: list[int] = []

    async def prober(target: Target) -> str | None:
        for port in target.ports:
            calls.append((str(target.address), port))
            if (str(target.address), port) in answers:
                return f"{target.address}:{port} {answers[(str(target.address), port)]}"
        return None

    async def scenario() -> None:
        checker = HealthChecker(lambda key: changes.append(1), prober)
        checker.update(_model())
        assert not checker.complete()
        await checker.probe_once(("default/web", "node1"))
        await checker.probe_once(("default/web", "node2"))
        assert checker.complete()
        assert checker.snapshot() == {("default/web", "node1"): True, ("default/web", "node2"): True}
        assert len(changes) == 2
        answers[("203.0.113.12", 30443)] = "connection refused"
        for _ in range(3):  # fall defaults to 3
            await checker.probe_once(("default/web", "node2"))
        assert checker.snapshot()[("default/web", "node2")] is False
        assert checker.reasons()[("default/web", "node2")] == "203.0.113.12:30443 connection refused"
        assert len(changes) == 3

    asyncio.run(scenario())
    assert ("203.0.113.11", 30443) in calls


def test_update_keeps_state_of_unchanged_pairs_and_drops_removed() -> None:
    async def ok(target: Target) -> str | None:
        return None

    async def scenario() -> None:
        checker = HealthChecker(lambda key: None, ok)
        checker.update(_model())
        await checker.probe_once(("default/web", "node1"))
        checker.update(_model([{"name": "api", "vip": "192.0.2.12", "ports": [{"port": 80, "nodePort": 30090}]}]))
        assert checker.snapshot() == {("default/web", "node1"): True}
        assert not checker.complete()
        m = _model()
        m2 = model.Model(**{**m.__dict__, "nodes": m.nodes[:1]})
        checker.update(m2)
        assert ("default/web", "node2") not in checker.reasons()

    asyncio.run(scenario())


def test_real_tcp_probe_on_loopback() -> None:
    async def scenario() -> None:
        held: list[asyncio.StreamWriter] = []  # the server keeps its end open: the probe is the one that closes
        server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        assert await tcp_probe(ip_address("127.0.0.1"), port, 1.0) is None
        await asyncio.sleep(0)
        # closed with a reset: nothing left behind per probe (no FIN_WAIT, no TIME_WAIT: thousands per second)
        waiting = (await asyncio.to_thread(subprocess.run, ["ss", "-Htan", "dport", "=", f":{port}"],
                                           capture_output=True, text=True, check=True)).stdout
        assert waiting.strip() == ""
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
        with socket.socket() as s:  # a port nothing listens on: bind, never listen
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
            error = await tcp_probe(ip_address("127.0.0.1"), closed, 1.0)
        assert error == "connection refused"

    asyncio.run(scenario())


def _target(kind: model.ProbeKind, port: int) -> Target:
    check = model.HealthCheck(interval=1, timeout=1, rise=1, fall=1)
    return Target("default/web", "node1", kind, ip_address("127.0.0.1"), (port,), check)


def test_http_probes_against_kube_proxy_like_answers() -> None:
    answers: dict[str, tuple[int, bytes]] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        path = request.split(b" ")[1].decode()
        status, body = answers[path]
        writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n\r\n%s" % (status, body))
        await writer.drain()
        writer.close()

    async def scenario() -> list[str | None]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        results = []
        local = _target(model.ProbeKind.HEALTH_CHECK_NODE_PORT, port)
        answers["/"] = (200, b'{"service": {"namespace": "default", "name": "web"}, "localEndpoints": 2}')
        results.append(await probe(local))
        answers["/"] = (503, b'{"service": {"namespace": "default", "name": "web"}, "localEndpoints": 0}')
        results.append(await probe(local))
        kube_proxy = _target(model.ProbeKind.KUBE_PROXY, port)
        answers["/healthz"] = (200, b'{"nodeEligible": true}')
        results.append(await probe(kube_proxy))
        answers["/healthz"] = (503, b'{"nodeEligible": false}')
        results.append(await probe(kube_proxy))
        server.close()
        await server.wait_closed()
        results.append(await probe(local))  # nothing listens any more
        return results

    ok, no_endpoints, healthz_ok, healthz_draining, gone = asyncio.run(scenario())
    assert ok is None and healthz_ok is None
    assert no_endpoints is not None and "noLocalEndpoints (HTTP 503, localEndpoints 0)" in no_endpoints
    assert healthz_draining is not None and healthz_draining.endswith("/healthz HTTP 503")
    assert gone is not None and "connection refused" in gone


class _ThreadServer:
    """An HTTP server on loopback in its own thread: it answers (or, silent, only reads) while the event loop of
    the test is stalled."""

    def __init__(self, silent: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.silent = silent
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            data = b""
            with contextlib.suppress(OSError):  # a probe that timed out resets its connection
                while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                    data += chunk
                if not self.silent:
                    conn.sendall(b'HTTP/1.1 200 OK\r\n\r\n{"localEndpoints": 1}')

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


async def _stalled(coroutine: Awaitable[Any], stall: float) -> tuple[Any, float]:
    """Run `coroutine`, the event loop stalling for `stall` seconds at its first wait (as a throttled or paused agent
    does); its result and how long it took."""
    loop = asyncio.get_running_loop()
    loop.call_soon(time.sleep, stall)
    started = loop.time()
    result = await coroutine
    return result, loop.time() - started


def test_a_probe_answered_while_the_agent_stalled_is_answered() -> None:
    """The answer came during the agent's own stall (longer than the timeout): the probe passes, it does not time
    out the moment the agent looks again. A target that never answers still times out."""
    answering, silent = _ThreadServer(), _ThreadServer(silent=True)

    async def scenario() -> list[tuple[Any, float]]:
        local = dataclasses.replace(_target(model.ProbeKind.HEALTH_CHECK_NODE_PORT, answering.port),
                                    check=model.HealthCheck(interval=1, timeout=0.2, rise=1, fall=1))
        return [await _stalled(probe(local), 0.5),
                await _stalled(probe(dataclasses.replace(local, ports=(silent.port,))), 0.5),
                await _stalled(probe(dataclasses.replace(local, ports=(silent.port,))), 0.0)]

    try:
        (http, _), (stalled_silent, waited), (silent_result, silent_waited) = asyncio.run(scenario())
    finally:
        answering.close()
        silent.close()
    assert http is None
    assert stalled_silent is not None and stalled_silent.endswith(" timeout")
    assert waited >= 0.5 + 0.2  # the stall, then the timeout again, watched
    assert silent_result is not None and silent_result.endswith(" timeout") and silent_waited >= 0.2


def test_a_prober_that_raises_counts_as_a_failed_probe() -> None:
    async def broken(target: Target) -> str | None:
        raise RuntimeError("bug")

    async def scenario() -> dict[tuple[str, str], bool]:
        checker = HealthChecker(lambda key: None, broken)
        checker.update(_model())
        await checker.probe_once(("default/web", "node1"))
        return checker.snapshot()

    assert asyncio.run(scenario())[("default/web", "node1")] is False


def test_a_refused_connection_probes_its_pairs_at_once_and_rise_fall_still_decides() -> None:
    """The interval is 60 s: every probe after the first is one a refusal asked for."""
    refusing: set[str] = set()
    started: dict[tuple[str, str], list[float]] = {}
    changes: list[tuple[str, str]] = []

    async def prober(target: Target) -> str | None:
        started.setdefault(target.key, []).append(asyncio.get_running_loop().time())
        return "connection refused" if str(target.address) in refusing else None

    async def scenario() -> None:
        checker = HealthChecker(changes.append, prober)
        m = _model()
        slow = dataclasses.replace(m.services[0].health_check, interval=60.0)
        checker.update(dataclasses.replace(m, services=(dataclasses.replace(m.services[0], health_check=slow),)))
        checker.start()
        await checker.wait_complete()
        refusing.add("203.0.113.12")
        async with asyncio.timeout(30):  # a deadline for a hang: on schedule alone this would take 2 minutes
            while checker.verdicts[("default/web", "node2")]:
                checker.refused(ip_address("203.0.113.12"), 30080)  # every client connection refused meanwhile
                await asyncio.sleep(0.01)
        checker.refused(ip_address("203.0.113.99"), 30080)  # no such node: nothing to wake
        await checker.stop()

    asyncio.run(scenario())
    node2, node1 = started[("default/web", "node2")], started[("default/web", "node1")]
    # fall (3) probes after the first refusal, each woken, none sooner than WAKE_GAP after the one before
    assert len(node2) == 4
    assert all(b - a >= health.WAKE_GAP - 0.005 for a, b in itertools.pairwise(node2[1:]))
    assert len(node1) == 1  # node1 was not refused: probed on its own schedule only
    assert changes == [("default/web", "node1"), ("default/web", "node2"), ("default/web", "node2")]


def test_probe_on_refusal_off_leaves_the_schedule_alone() -> None:
    started: list[float] = []

    async def prober(target: Target) -> str | None:
        started.append(asyncio.get_running_loop().time())
        return None

    async def scenario() -> None:
        checker = HealthChecker(lambda key: None, prober)
        m = config.parse(yaml.safe_dump({**yaml.safe_load(MINIMAL),
                                         "healthCheckDefaults": {"interval": "60s", "probeOnRefusal": False}}))
        checker.update(m)
        checker.start()
        await checker.wait_complete()
        for _ in range(5):
            checker.refused(ip_address("203.0.113.11"), 30080)
            await asyncio.sleep(health.WAKE_GAP)
        await checker.stop()

    asyncio.run(scenario())
    assert len(started) == 1  # the first probe only: the refusals asked for nothing


def test_pairs_that_probe_the_same_share_one_probe_and_its_verdict() -> None:
    """Cluster services that probe kube-proxy's /healthz ask each node the same question: one probe per node, not
    one per service and node, and a flip is every such service's. A service with other settings has its own."""
    asked: list[tuple[str, int]] = []
    down: set[str] = set()
    changes: list[tuple[str, str]] = []

    async def prober(target: Target) -> str | None:
        asked.append((str(target.address), target.ports[0]))
        return "HTTP 503" if str(target.address) in down else None

    def services(n: int, extra: list[dict[str, object]] | None = None) -> model.Model:
        cluster: list[dict[str, object]] = [
            {"name": f"s{i}", "vip": f"192.0.2.{20 + i}", "healthCheck": {"kubeProxyHealthz": True},
             "ports": [{"port": 80, "nodePort": 31000 + i}]} for i in range(n)]
        return _model(cluster + (extra or []))

    async def scenario() -> None:
        checker = HealthChecker(changes.append, prober)
        checker.update(services(3))
        assert checker.probes() == 2 + 2  # web's own nodePort probe on each node, and kube-proxy's on each node
        for node in ("node1", "node2"):
            await checker.probe_once(("default/s0", node))
            await checker.probe_once(("default/web", node))
        assert checker.complete() and all(checker.verdicts.values()) and len(checker.verdicts) == 8
        assert sorted(asked).count(("203.0.113.12", 10256)) == 1
        down.add("203.0.113.12")
        changes.clear()
        for _ in range(3):  # fall 3: one probe's three failures
            await checker.probe_once(("default/s1", "node2"))
        assert changes == [("default/s0", "node2"), ("default/s1", "node2"), ("default/s2", "node2")]
        assert sorted(k for k, ok in checker.verdicts.items() if not ok) == changes
        assert checker.reasons()[("default/s2", "node2")] == "HTTP 503"
        # a fourth such service joins the running probes with their verdicts; other settings: a probe of its own
        checker.update(services(4, [{"name": "slow", "vip": "192.0.2.40", "ports": [{"port": 80, "nodePort": 31100}],
                                     "healthCheck": {"kubeProxyHealthz": True, "interval": "30s"}}]))
        assert checker.verdicts[("default/s3", "node2")] is False and checker.verdicts[("default/s3", "node1")]
        assert checker.probes() == 2 + 2 + 2 and ("default/slow", "node1") not in checker.verdicts
        checker.update(services(0))
        assert checker.probes() == 2 and set(checker.verdicts) == {("default/web", "node1"), ("default/web", "node2")}

    asyncio.run(scenario())


def _state(checker: HealthChecker) -> tuple[dict[Any, Any], dict[Any, Any], dict[Any, Any], dict[Any, Any]]:
    """What a checker knows, comparable between two checkers: probes by id with their pairs and verdicts, the pairs'
    probes, the verdicts, who is served where."""
    probes = {pid: (frozenset(p.pairs), p.state.healthy) for pid, p in checker._probes.items()}
    by = checker._served_by
    served = {"nodes": by.nodes_at, "services": {port: sorted(keys) for port, keys in by.services_on.items()}}
    return probes, dict(checker._probe_of), dict(checker.verdicts), served


def test_an_update_of_changed_services_is_the_same_as_a_whole_update_and_keeps_running_probes() -> None:
    """A reload that changed a few services updates only theirs: the checker ends as a whole update would leave
    it; a probe that a changed service still asks for (shared kube-proxy /healthz) keeps its state and its loop."""
    async def ok(target: Target) -> str | None:
        return None

    def services(specs: dict[str, dict[str, object]]) -> model.Model:
        return _model([{"name": name, **spec} for name, spec in specs.items()])

    async def scenario() -> None:
        specs: dict[str, dict[str, object]] = {
            f"s{i}": {"vip": f"192.0.2.{20 + i}", "ports": [{"port": 80, "nodePort": 31000 + i}],
                      "healthCheck": {"kubeProxyHealthz": i % 2 == 0}} for i in range(6)}
        old = services(specs)
        checker = HealthChecker(lambda key: None, ok)
        checker.update(old)
        checker.start()
        await asyncio.wait_for(checker.wait_complete(), 5)
        shared = {pid: p for pid, p in checker._probes.items() if pid[1] is model.ProbeKind.KUBE_PROXY}
        specs["s0"] = {**specs["s0"], "ports": [{"port": 81, "nodePort": 31050}]}  # still on kube-proxy's probe
        specs["s1"]["ports"] = [{"port": 80, "nodePort": 31051}]  # a nodePort probe of its own, anew
        del specs["s2"]
        specs["s9"] = {"vip": "192.0.2.40", "ports": [{"port": 80, "nodePort": 31090}],
                       "healthCheck": {"kubeProxyHealthz": True}}
        new = services(specs)
        keys = changed_services(old, new)
        assert keys == {"default/s0", "default/s1", "default/s2", "default/s9"}
        checker.update_services(old, new, keys)
        whole = HealthChecker(lambda key: None, ok)
        whole.update(new)
        probes, probe_of, verdicts, served = _state(checker)
        w_probes, w_probe_of, _, w_served = _state(whole)
        assert {pid: pairs for pid, (pairs, _) in probes.items()} == {
            pid: pairs for pid, (pairs, _) in w_probes.items()}
        assert (probe_of, served) == (w_probe_of, w_served)
        # what has a probe that kept running has its verdict at once; only s1's new nodePort probe has none yet
        assert set(verdicts) == set(probe_of) - {("default/s1", "node1"), ("default/s1", "node2")}
        for pid, kept in shared.items():
            assert checker._probes[pid] is kept and kept.task is not None and not kept.task.done()
        await checker.stop()

    asyncio.run(scenario())


def test_a_local_service_whose_endpoints_are_known_probes_only_their_nodes() -> None:
    """The Kubernetes source knows from the EndpointSlices which nodes have an endpoint: the others are out whatever
    a probe says, so they are not probed; a node that gains one gets its probe, and its first answer decides."""
    async def ok(target: Target) -> str | None:
        return None

    async def scenario() -> None:
        m = _model()
        web = dataclasses.replace(m.services[0], external_traffic_policy=model.TrafficPolicy.LOCAL,
                                  health_check_node_port=32000, endpoint_nodes=("node1",))
        old = dataclasses.replace(m, services=(web,))
        assert set(targets(old)) == {("default/web", "node1")}
        checker = HealthChecker(lambda key: None, ok)
        checker.update(old)
        await checker.probe_once(("default/web", "node1"))
        moved = dataclasses.replace(old, services=(dataclasses.replace(web, endpoint_nodes=("node2",)),))
        checker.update_services(old, moved, changed_services(old, moved) or ())
        assert set(checker.reasons()) == {("default/web", "node2")} and checker.verdicts == {}
        await checker.probe_once(("default/web", "node2"))
        assert checker.verdicts == {("default/web", "node2"): True}

    asyncio.run(scenario())


def _two_nodes(interval: float = 60.0) -> model.Model:
    m = _model()
    check = dataclasses.replace(m.services[0].health_check, interval=interval, timeout=interval, rise=2, fall=2)
    return dataclasses.replace(m, services=(dataclasses.replace(m.services[0], health_check=check),))


WEB1, WEB2 = ("default/web", "node1"), ("default/web", "node2")


def _answering(answer: dict[str, str | None]) -> health.Prober:
    """A prober that fails a node with its error in `answer` (read at each probe), and passes it with none."""
    async def prober(target: Target) -> str | None:
        error = answer.get(target.node)
        return None if error is None else f"{target.address}:30080 {error}"

    return prober


def test_an_lb_cut_off_from_every_node_shows_the_nodes_that_come_back_together() -> None:
    """lb1's links go down: every probe goes unanswered and every node turns unhealthy. When the links are back, one
    node answers at once and the other's first probe times out: shown one at a time, lb1 would announce again with
    node1 alone and send the flows the routers bring back to node1. Both are shown in the same change."""
    answer: dict[str, str | None] = {}
    changes: list[tuple[str, str]] = []

    prober = _answering(answer)

    async def rounds(*keys: tuple[str, str]) -> None:
        for key in keys:
            await checker.probe_once(key)

    async def scenario() -> None:
        checker.update(_two_nodes())
        await rounds(WEB1, WEB2)
        assert checker.snapshot() == {WEB1: True, WEB2: True}
        changes.clear()
        answer.update(node1="network is unreachable", node2="network is unreachable")  # links down
        await rounds(WEB1, WEB2, WEB1, WEB2)
        assert checker.snapshot() == {WEB1: False, WEB2: False} and changes == [WEB1, WEB2]  # downs: shown at once
        assert cut_offs == [True]
        changes.clear()
        answer.update(node1=None, node2="timeout")  # links up: node2's first probe is lost on the way
        await rounds(WEB1, WEB2, WEB1)
        answer.update(node2=None)
        await rounds(WEB2)
        # node1 is healthy by rise (2), and held: node2 has not settled (one failure, one success since the links)
        assert checker.snapshot() == {WEB1: False, WEB2: False} and changes == []
        assert checker.reasons()[WEB1] == health.HELD and cut_offs == [True]
        await rounds(WEB2)
        assert checker.snapshot() == {WEB1: True, WEB2: True} and sorted(changes) == [WEB1, WEB2]
        assert checker.reasons()[WEB1] == "probeSucceeded"
        assert cut_offs == [True, False]  # over once the held nodes are shown

    cut_offs: list[bool] = []
    checker = HealthChecker(changes.append, prober, cut_offs.append)
    asyncio.run(scenario())


def test_nodes_that_answer_no_are_not_a_cut_off() -> None:
    """Every node refuses (the service's pods are gone, this LB's links are fine): a node that comes back is shown at
    once, without waiting for the others."""
    answer: dict[str, str | None] = {"node1": "connection refused", "node2": "connection refused"}
    changes: list[tuple[str, str]] = []

    prober = _answering(answer)

    async def scenario() -> None:
        cut_offs: list[bool] = []
        checker = HealthChecker(changes.append, prober, cut_offs.append)
        checker.update(_two_nodes())
        for key in (WEB1, WEB2):
            await checker.probe_once(key)
        assert checker.snapshot() == {WEB1: False, WEB2: False} and cut_offs == []
        answer["node1"] = None
        for _ in range(2):
            await checker.probe_once(WEB1)
        assert checker.snapshot() == {WEB1: True, WEB2: False} and changes == [WEB1, WEB2, WEB1]

    asyncio.run(scenario())


def test_a_probe_that_never_settles_holds_the_others_back_no_longer_than_its_rounds_would() -> None:
    """After a cut-off, a flapping node would never settle: the nodes that did are shown by a deadline, (the larger
    of rise and fall, plus one) rounds and a timeout after the first answer."""
    answer: dict[str, str | None] = {"node1": "timeout", "node2": "timeout"}
    changes: list[tuple[str, str]] = []

    prober = _answering(answer)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        shown = asyncio.Event()

        def changed(key: tuple[str, str]) -> None:
            changes.append(key)
            shown.set()

        checker = HealthChecker(changed, prober)
        checker.update(_two_nodes(interval=0.05))
        for key in (WEB1, WEB2):
            await checker.probe_once(key)
        assert checker.snapshot() == {WEB1: False, WEB2: False}
        answer["node1"] = None
        started = loop.time()
        shown.clear()
        for _ in range(2):
            await checker.probe_once(WEB1)
        assert checker.snapshot()[WEB1] is False  # held: node2 has not settled, and never will (no rounds at all)
        async with asyncio.timeout(30):
            await shown.wait()
        assert checker.snapshot()[WEB1] is True
        return loop.time() - started

    waited = asyncio.run(scenario())
    assert waited >= (2 + 1) * 0.05 + 0.05 - 0.01  # the deadline, not an early release
    assert changes == [WEB1, WEB2, WEB1]


def test_probes_that_start_together_spread_over_their_interval_after_the_first_round() -> None:
    """Every probe of a fresh agent goes out at once (a quick first snapshot); the second round of each falls where
    its jitter puts it in the interval, so that they no longer go out in one burst every interval."""
    starts: dict[str, list[float]] = {}
    fractions = iter([i / 10 for i in range(10)])

    async def prober(target: Target) -> str | None:
        starts.setdefault(target.service, []).append(asyncio.get_running_loop().time())
        return None

    async def scenario() -> None:
        services: list[dict[str, object]] = [
            {"name": f"s{i}", "vip": f"192.0.2.{20 + i}", "ports": [{"port": 80, "nodePort": 31000 + i}],
             "healthCheck": {"interval": "1s"}} for i in range(10)]
        m = _model(services)
        m = dataclasses.replace(m, nodes=m.nodes[:1], services=m.services[1:])
        checker = HealthChecker(lambda key: None, prober, jitter=lambda: next(fractions))
        checker.update(m)
        checker.start()
        async with asyncio.timeout(10):
            while len(starts) < 10 or any(len(s) < 3 for s in starts.values()):  # noqa: ASYNC110 - polls a fake
                await asyncio.sleep(0.01)
        await checker.stop()
        first = {name: times[0] for name, times in starts.items()}
        second = sorted((times[1] - first[name], times[2] - times[1]) for name, times in starts.items())
        assert max(first.values()) - min(first.values()) < 0.5  # together (on any machine: far under 1 s)
        # each second round at its own fraction of the interval, not all at 1 s: no earlier than asked, however busy;
        # the third a whole interval after the second (the phase is kept)
        assert [round(gap, 1) >= i / 10 for i, (gap, _) in enumerate(second)] == [True] * 10
        assert second[-1][0] - second[0][0] > 0.45  # asked 0.9 apart: spread, not in one burst (a busy machine
        # delays the probe asked to wait nothing far less than 0.45 s)
        assert all(round(then, 1) >= 1.0 for _, then in second)

    asyncio.run(scenario())
