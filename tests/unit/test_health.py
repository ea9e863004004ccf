"""Rise/fall hysteresis, the probe round over every TCP nodePort, and the real TCP probe on loopback."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_address

import yaml

from lbagent import config, model
from lbagent.health import HealthChecker, ProbeState, targets, tcp_probe
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

    async def prober(address: model.IPAddress, port: int, timeout: float) -> str | None:
        calls.append((str(address), port))
        return answers.get((str(address), port))

    async def scenario() -> None:
        checker = HealthChecker(lambda: changes.append(1), prober)
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
    async def ok(address: model.IPAddress, port: int, timeout: float) -> str | None:
        return None

    async def scenario() -> None:
        checker = HealthChecker(lambda: None, ok)
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
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        assert await tcp_probe(ip_address("127.0.0.1"), port, 1.0) is None
        server.close()
        await server.wait_closed()
        with socket.socket() as s:  # a port nothing listens on: bind, never listen
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
            error = await tcp_probe(ip_address("127.0.0.1"), closed, 1.0)
        assert error == "connection refused"

    asyncio.run(scenario())
