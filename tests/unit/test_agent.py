"""The agent's sequencing with every side effect faked: health -> plan -> VIPs, nftables, BGP; reload; stop.

The real counterparts: tests/lab/test_skeleton.py runs the same behaviours with BIRD, ExaBGP and nft.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import shutil
import socket
import tempfile
import weakref
from collections.abc import Callable, Iterable
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbagent import model
from lbagent.agent import status
from lbagent.agent.agent import Agent, load_off_the_loop
from lbagent.agent.dataplane import DRIFT_DELAY_MAX, DRIFT_PROMPT_REPAIRS, drift_repair_delay
from lbagent.agent.sdnotify import Notifier
from lbagent.health import Target
from lbagent.l3.vips import VipBinder, VipError
from lbagent.l4.drift import NftChange
from lbagent.plan.http import ServerState
from lbagent.plan.services import StaleFlows, plan
from lbagent.sources import SourceError
from lbagent.sources.file import config
from lbagent.sources.file.source import FileSource
from tests.fake_forwarder import FakeForwarder
from tests.fakes import FakeBgpSpeaker, FakeProxy

CONFIG = {
    "node": {"name": "lb1"},
    "agent": {"drain": 0, "resync": "60s", "minSyncInterval": 0, "retry": "50ms", "runtimeDir": "set-per-test"},
    "bgp": {"localAS": 64512, "routerID": "198.51.100.11", "peers": [{"address": "198.51.100.1", "peerAS": 64500}]},
    "healthCheckDefaults": {"interval": "20ms", "timeout": "20ms", "rise": 1, "fall": 2},
    "nodes": [{"name": f"node{i}", "addresses": [f"203.0.113.1{i}"]} for i in (1, 2, 3)],
    "services": [{"name": "web", "vip": "192.0.2.10", "ports": [{"port": 80, "nodePort": 30080}]}],
}


class FakeBinder(VipBinder):
    def __init__(self) -> None:
        super().__init__("lo")
        self.vips: set[model.IPAddress] = set()
        self.broken = False
        self.syncs = 0

    async def bound(self) -> set[model.IPAddress]:
        return set(self.vips)

    async def sync(
        self, desired: Iterable[model.IPAddress], keep: Iterable[model.IPAddress] = ()
    ) -> set[model.IPAddress]:
        self.syncs += 1
        if self.broken:
            raise VipError("cannot bind VIP: netlink said no")
        self.vips = (self.vips & (set(desired) | set(keep))) | set(desired)
        return set(self.vips)


def _no_proxy(proxy: model.Proxy, runtime_dir: str, on_change: Callable[[], None]) -> FakeProxy:
    raise AssertionError("this test configures no listener: the agent must not make a proxy")


class Harness:
    def __init__(self, tmp_path: Path, proxy_factory: Callable[[model.Proxy, str, Callable[[], None]], FakeProxy]
                 | None = None, extra: dict[str, object] | None = None) -> None:
        self.path = tmp_path / "lbagent.yaml"
        config_ = yaml.safe_load(yaml.safe_dump({**CONFIG, **(extra or {})}))
        # Short, as a real one is (/run/lbagent): HAProxy's socket paths leave a runtime dir 63 characters, and
        # pytest's tmp_path is longer than that. Removed with the harness.
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="lba", dir="/tmp"))
        weakref.finalize(self, shutil.rmtree, self.runtime_dir, True)
        config_["agent"]["runtimeDir"] = str(self.runtime_dir)
        self.path.write_text(yaml.safe_dump(config_))
        self.sysctls = tmp_path / "sys"
        for key in ("net/ipv4/ip_forward", "net/ipv4/conf/all/arp_ignore", "net/ipv4/conf/all/arp_announce"):
            (self.sysctls / key).parent.mkdir(parents=True, exist_ok=True)
            (self.sysctls / key).write_text("0")
        self.down: set[str] = set()
        self.speaker: FakeBgpSpeaker | None = None
        self.forwarder = FakeForwarder()
        self.binder = FakeBinder()

        async def prober(target: Target) -> str | None:
            return "connection refused" if str(target.address) in self.down else None

        def speaker(bgp: model.Bgp, runtime_dir: str, on_change: Callable[[], None]) -> FakeBgpSpeaker:
            self.speaker = FakeBgpSpeaker(bgp, on_change)
            return self.speaker

        self.agent = Agent(FileSource(self.path), config.load(self.path), speaker_factory=speaker,
                           forwarder=self.forwarder, binder=self.binder, prober=prober, sysctl_root=self.sysctls,
                           proxy_factory=proxy_factory or _no_proxy, watch_drift=False)

    def rotation(self) -> set[str]:
        """Node addresses in the lookup tables the dispatch map points at."""
        rs = self.forwarder.applied
        if rs is None:
            return set()
        tables = {rs.chains[c][0] for d in rs.dispatch.values() for c in d.values()}
        return {a for t in tables for a in rs.tables[t].slots}

    def announced(self) -> set[str]:
        assert self.speaker is not None
        return set(self.speaker.announced())


async def until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polling fakes that offer no event
            await asyncio.sleep(0.005)


def test_announces_after_binding_and_programming_and_follows_health(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path)
    caplog.set_level(logging.INFO)

    async def scenario() -> int:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        # once started, the agent tells the speaker its set is complete (End-of-RIB may follow, with GR)
        await until(lambda: h.speaker is not None and h.speaker.complete)
        assert {str(v) for v in h.binder.vips} == {"192.0.2.10"}
        assert h.rotation() == {"203.0.113.11", "203.0.113.12", "203.0.113.13"}
        assert (h.sysctls / "net/ipv4/ip_forward").read_text() == "1"

        h.down.add("203.0.113.12")
        await until(lambda: h.rotation() == {"203.0.113.11", "203.0.113.13"})
        # `lbagent status` over the agent's socket (root-only) sees the same
        sock = h.runtime_dir / "status.sock"
        assert sock.stat().st_mode & 0o777 == 0o600
        doc = await asyncio.to_thread(status.query, sock)
        web = doc["services"][0]
        assert (web["service"], web["announce"], web["reason"]) == ("default/web", True, "announced")
        assert {n["node"]: n["healthy"] for n in web["nodes"]} == {"node1": True, "node2": False, "node3": True}
        assert "connection refused" in next(n["reason"] for n in web["nodes"] if n["node"] == "node2")
        assert doc["vips"] == [{"prefix": "192.0.2.10/32", "announced": True, "bound": True}]
        assert "node2" in status.render(doc) and "unhealthy" in status.render(doc)
        assert h.announced() == {"192.0.2.10/32"}
        # one node's health changed: only that service's elements went to the kernel, not the whole table
        assert "delete table" not in h.forwarder.scripts[-1]
        assert "add element inet lbagent dispatch_v4" in h.forwarder.scripts[-1]

        h.down.update({"203.0.113.11", "203.0.113.13"})
        await until(lambda: h.announced() == set())
        assert "192.0.2.10 . tcp . 80" not in h.forwarder.text  # no frontend: refused at the LB

        h.down.clear()
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        h.agent.stop("test")
        return await run

    assert asyncio.run(scenario()) == 0
    assert h.speaker is not None and h.speaker.stopped
    assert "withdraw route 192.0.2.10/32" in h.speaker.commands[-1]
    messages = [r.getMessage() for r in caplog.records]
    assert messages.index("withdrew_all") < messages.index("agent_stopped")
    withdrawn = [r for r in caplog.records if r.getMessage() == "vip_withdrawn"]
    assert [r.lbagent_fields["reason"] for r in withdrawn] == ["noHealthyNodes", "draining"]  # type: ignore[attr-defined]


def test_reload_adds_the_http_layer_to_a_running_l4_agent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A running L4-only agent takes a SIGHUP that adds proxy settings, a listener and a route: HAProxy is started
    then, and its listener VIP announced. Once it runs, its executable is restart-only.
    Real counterpart: tests/lab/test_l7.py (and bench/l7.py adds the HTTP layer by SIGHUP)."""
    proxies: list[tuple[str, FakeProxy]] = []

    def proxy_factory(proxy: model.Proxy, runtime_dir: str, on_change: Callable[[], None]) -> FakeProxy:
        proxies.append((proxy.haproxy, FakeProxy(on_change)))
        return proxies[-1][1]

    h = Harness(tmp_path, proxy_factory)
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        assert proxies == []  # no listener: no HAProxy
        with_http = yaml.safe_load(h.path.read_text())
        with_http["services"].append({"name": "shop", "ports": [{"port": 80, "nodePort": 30081}]})
        with_http["proxy"] = {"haproxy": "/usr/sbin/haproxy"}
        with_http["listeners"] = [{"name": "web", "vip": "192.0.2.20", "port": 80}]
        with_http["routes"] = [{"name": "shop", "listeners": ["web"], "hostnames": ["shop.example.com"],
                                "rules": [{"backendRefs": [{"name": "shop", "port": 80}]}]}]
        h.path.write_text(yaml.safe_dump(with_http))
        assert await h.agent.reload() is True
        await until(lambda: h.announced() == {"192.0.2.10/32", "192.0.2.20/32"})
        assert [path for path, _ in proxies] == ["/usr/sbin/haproxy"]
        config_ = proxies[0][1].config
        assert config_ is not None and "192.0.2.20:80" in config_ and "shop.example.com" in config_

        with_http["proxy"]["haproxy"] = "/opt/haproxy/sbin/haproxy"
        h.path.write_text(yaml.safe_dump(with_http))
        assert await h.agent.reload() is False  # HAProxy runs: its executable is fixed until a restart
        assert h.announced() == {"192.0.2.10/32", "192.0.2.20/32"}
        # the last listener removed: HAProxy stops, and the next listener may come with another executable
        without = {k: v for k, v in with_http.items() if k not in ("listeners", "routes")}
        without["proxy"] = {"haproxy": "/usr/sbin/haproxy"}
        h.path.write_text(yaml.safe_dump(without))
        assert await h.agent.reload() is True
        await until(lambda: bool(proxies[0][1].stopped) and h.announced() == {"192.0.2.10/32"})
        h.path.write_text(yaml.safe_dump(with_http))
        assert await h.agent.reload() is True
        await until(lambda: h.announced() == {"192.0.2.10/32", "192.0.2.20/32"})
        assert [path for path, _ in proxies] == ["/usr/sbin/haproxy", "/opt/haproxy/sbin/haproxy"]
        h.agent.stop("test")
        await run

    asyncio.run(scenario())
    rejected = [r for r in caplog.records if r.getMessage() == "config_rejected"]
    assert [r.lbagent_fields["field"] for r in rejected] == ["proxy.haproxy"]  # type: ignore[attr-defined]


def test_a_static_backend_endpoint_going_down_reaches_haproxy_only(tmp_path: Path) -> None:
    """A `backends` endpoint failing its check sets its HAProxy server to maintenance; the L4 layers, which do
    not know it, carry on. Real counterpart: tests/lab/test_l7.py."""
    fakes: list[FakeProxy] = []

    def proxy_factory(proxy: model.Proxy, runtime_dir: str, on_change: Callable[[], None]) -> FakeProxy:
        fakes.append(FakeProxy(on_change))
        return fakes[-1]

    h = Harness(tmp_path, proxy_factory, extra={
        "backends": [{"name": "ext", "endpoints": ["198.51.100.50:8080", "198.51.100.51:8080"],
                      "healthCheck": {"interval": "20ms", "timeout": "20ms", "rise": 1, "fall": 2}}],
        "listeners": [{"name": "web", "vip": "192.0.2.20", "port": 80}],
        "routes": [{"name": "ext", "listeners": ["web"],
                    "rules": [{"backendRefs": [{"kind": "Backend", "name": "ext"}]}]}],
    })

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.announced() == {"192.0.2.10/32", "192.0.2.20/32"})
        (fake,) = fakes
        assert {state for _, state in fake.state.values()} == {ServerState.READY}
        h.down.add("198.51.100.51")
        await until(lambda: sorted(state for _, state in fake.state.values()) == [ServerState.MAINT,
                                                                                ServerState.READY])
        h.down.add("203.0.113.12")  # and the L4 layers still follow their own health
        await until(lambda: h.rotation() == {"203.0.113.11", "203.0.113.13"})
        assert all(r.failures == 0 for r in h.agent.runners.values()), {
            n: r.last_error for n, r in h.agent.runners.items()}
        h.agent.stop("test")
        await run

    asyncio.run(scenario())


def test_udp_flows_to_a_node_that_left_rotation_are_cleared(tmp_path: Path) -> None:
    """UDP has no connection end: when a node leaves a UDP frontend's rotation, by its health (a change record) or
    by a reload (everything applied afresh), the conntrack entries NATed to it are deleted, for that frontend and
    that node only. Real counterpart: tests/lab/test_l4.py."""
    dns = {"name": "dns", "vip": "192.0.2.11", "ports": [{"protocol": "UDP", "port": 53, "nodePort": 30053}]}
    web = {"name": "web", "vip": "192.0.2.10", "ports": [{"port": 80, "nodePort": 30080}]}
    h = Harness(tmp_path, extra={"services": [web, dns]})
    cleared: list[StaleFlows] = []

    async def clear(stale: StaleFlows) -> int:
        cleared.append(stale)
        return 1

    h.agent.dataplane.clear_udp = clear
    node = {f"node{i}": ip_address(f"203.0.113.1{i}") for i in (1, 2, 3)}

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.announced() == {"192.0.2.10/32", "192.0.2.11/32"})
        assert cleared == []
        h.down.add("203.0.113.12")  # node2 fails web (TCP) and dns (UDP)
        await until(lambda: bool(cleared))
        assert cleared == [StaleFlows(ip_address("192.0.2.11"), 53, node["node2"], 30053)]
        h.down.clear()  # back in rotation: it only gains flows
        await until(lambda: "203.0.113.12" in h.rotation())
        assert len(cleared) == 1
        without_node3 = yaml.safe_load(h.path.read_text())
        without_node3["nodes"] = without_node3["nodes"][:2]
        h.path.write_text(yaml.safe_dump(without_node3))
        assert await h.agent.reload() is True
        await until(lambda: len(cleared) == 2)
        assert cleared[1] == StaleFlows(ip_address("192.0.2.11"), 53, node["node3"], 30053)
        h.agent.stop("test")
        await run

    asyncio.run(scenario())


def test_nothing_is_announced_while_the_vip_cannot_be_bound_or_programmed(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.binder.broken = True
    h.forwarder.fail = True

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.agent.runners["dataplane"].failures >= 2)
        assert h.announced() == set()
        h.binder.broken = False
        await until(lambda: bool(h.binder.vips))
        failed = h.agent.runners["dataplane"].failures
        await until(lambda: h.agent.runners["dataplane"].failures >= failed + 2)  # retries, still failing
        assert h.announced() == set()
        h.forwarder.fail = False
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        h.agent.stop("test")
        await run

    asyncio.run(scenario())


def test_reload_refuses_a_bad_file_and_applies_a_good_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path)
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        before = (h.agent.model.digest(), h.forwarder.text)

        good = h.path.read_text()
        h.path.write_text(good.replace("nodePort: 30080", "nodePort: 0"))
        assert await h.agent.reload() is False
        assert (h.agent.model.digest(), h.forwarder.text) == before
        assert h.announced() == {"192.0.2.10/32"}

        loaded = good
        restart_only = yaml.safe_load(loaded)
        restart_only["node"]["vipInterface"] = "eth9"
        h.path.write_text(yaml.safe_dump(restart_only))
        assert await h.agent.reload() is False

        bigger = yaml.safe_load(loaded)
        bigger["services"].append({"name": "api", "vip": "192.0.2.20", "ports": [{"port": 443, "nodePort": 30443}]})
        h.path.write_text(yaml.safe_dump(bigger))
        assert await h.agent.reload() is True
        await until(lambda: h.announced() == {"192.0.2.10/32", "192.0.2.20/32"})
        assert h.speaker is not None and h.speaker.restarts == 0  # BGP settings unchanged: no session reset
        h.agent.stop("test")
        await run

    asyncio.run(scenario())
    problems = [r for r in caplog.records if r.getMessage() == "config_problem"]
    assert problems[0].lbagent_fields["field"] == "services[0].ports[0].nodePort"  # type: ignore[attr-defined]
    assert problems[0].lbagent_fields["value"] == "0"  # type: ignore[attr-defined]
    rejected = [r for r in caplog.records if r.getMessage() == "config_rejected"]
    assert rejected[1].lbagent_fields["field"] == "node.vipInterface"  # type: ignore[attr-defined]


def test_a_reload_that_changes_only_services_applies_only_theirs(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A source's usual change (a Service's spec, one added beside another on its VIP, one gone) is planned and
    applied for those services alone; a change to the nodes is planned and applied whole. Either way the table ends
    as a fresh agent would write it."""
    services: list[object] = list(CONFIG["services"])  # type: ignore[call-overload]
    extra: dict[str, object] = {"services": [
        *services, {"name": "api", "vip": "192.0.2.10", "ports": [{"port": 443, "nodePort": 30443}]}]}
    h = Harness(tmp_path, extra=extra)
    caplog.set_level(logging.INFO)

    def how_applied() -> list[str]:
        return [r.lbagent_fields.get("how", "") for r in caplog.records  # type: ignore[attr-defined]
                if r.getMessage() == "dataplane_applied"]

    async def reload_to(doc: dict[str, Any]) -> list[str]:
        applied = len(how_applied())
        h.path.write_text(yaml.safe_dump(doc))
        assert await h.agent.reload() is True
        await until(lambda: len(how_applied()) > applied)
        hows = how_applied()[applied:]
        fresh = FakeForwarder()
        await fresh.apply(*_whole_plan(h.agent))
        assert h.forwarder.text == fresh.text
        return hows

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        doc = yaml.safe_load(h.path.read_text())
        doc["services"][0]["ports"][0]["nodePort"] = 30081
        doc["services"][1:] = [{"name": "admin", "vip": "192.0.2.10", "ports": [{"port": 22, "nodePort": 30022}]}]
        assert await reload_to(doc) == ["update"]
        assert "192.0.2.10 . tcp . 22 : 30022, 192.0.2.10 . tcp . 80 : 30081 }" in h.forwarder.scripts[-1]
        assert "192.0.2.10 . tcp . 443" in h.forwarder.scripts[-1]  # api's elements deleted

        doc["nodes"] = doc["nodes"][:2]
        assert "update" not in await reload_to(doc)
        await until(lambda: h.rotation() == {"203.0.113.11", "203.0.113.12"})
        h.agent.stop("test")
        await run

    asyncio.run(scenario())


def test_the_vips_are_synced_again_only_when_what_is_asked_changed(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Every reload marks the VIP reconciler dirty. The interface is read back (a dump of every address on it) only
    when the plan's VIPs or the announced prefixes changed, on the periodic resync, and after someone removed a VIP;
    a change of a Service's ports or endpoints leaves it alone."""
    h = Harness(tmp_path)
    caplog.set_level(logging.INFO)

    def applies() -> int:
        return sum(r.getMessage() == "dataplane_applied" for r in caplog.records)

    async def reload_to(doc: dict[str, Any]) -> None:
        before = applies()
        h.path.write_text(yaml.safe_dump(doc))
        assert await h.agent.reload() is True
        await until(lambda: applies() > before)

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        await h.agent.vips.reconcile(resync=False)  # asked with the announced prefix (kept bound while announced)
        syncs = h.binder.syncs
        doc = yaml.safe_load(h.path.read_text())
        doc["services"][0]["ports"][0]["nodePort"] = 30081  # the same VIPs
        await reload_to(doc)
        await h.agent.vips.reconcile(resync=False)  # however often it is asked
        assert h.binder.syncs == syncs

        doc["services"].append({"name": "api", "vip": "192.0.2.20", "ports": [{"port": 443, "nodePort": 30443}]})
        await reload_to(doc)
        await until(lambda: ip_address("192.0.2.20") in h.binder.vips)
        await until(lambda: h.announced() == {"192.0.2.10/32", "192.0.2.20/32"})
        syncs = h.binder.syncs

        await h.agent.vips.reconcile(resync=True)  # the periodic resync reads it back whatever changed
        assert h.binder.syncs == syncs + 1
        h.binder.vips.discard(ip_address("192.0.2.20"))  # someone took it away
        h.agent.vips.address_removed(ip_address("192.0.2.20"))
        await until(lambda: ip_address("192.0.2.20") in h.binder.vips)
        h.agent.stop("test")
        await run

    asyncio.run(scenario())


def _whole_plan(agent: Agent) -> tuple[Any, Any]:
    fresh = plan(agent.model, agent.health.verdicts)
    return fresh.frontends, fresh.l4_vips


def test_bgp_restart_is_reannounced(tmp_path: Path) -> None:
    h = Harness(tmp_path)

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        assert h.speaker is not None
        h.speaker.restart()  # a new ExaBGP instance: it knows nothing
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        registry = h.agent.metrics.registry
        assert registry.get_sample_value("lbagent_process_restarts_total", {"process": "exabgp"}) == 1
        h.agent.stop("test")
        await run

    asyncio.run(scenario())


def test_systemd_notify_ready_watchdog_reload_and_stopping(tmp_path: Path) -> None:
    """The agent under a supervisor speaking systemd's notify protocol (a real datagram socket)."""
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "40000"})  # keep-alive every 20 ms
    h = Harness(tmp_path)
    h.agent.notifier = notifier
    messages: list[str] = []

    def drain() -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(listener.recv(4096).decode())
        return messages

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: any(m.startswith("READY=1") for m in drain()))
        ready_at = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
        assert h.binder.vips and h.forwarder.applied is not None  # ready only once VIPs and forwarding are in
        await until(lambda: sum(m == "WATCHDOG=1" for m in drain()) >= 3)
        reload = asyncio.create_task(h.agent.reload())  # the file is parsed in a child process: a while
        await until(lambda: bool(drain()) and reload.done(), timeout=30)  # read as systemd would meanwhile
        assert reload.result() is True
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in messages[ready_at:])
        h.agent.stop("test")
        await run
        assert drain()[-1] in ("STOPPING=1", "WATCHDOG=1") and "STOPPING=1" in messages

    try:
        asyncio.run(scenario())
    finally:
        listener.close()


def test_a_supervisor_that_does_not_read_never_blocks_the_agent(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    notifier = Notifier({"NOTIFY_SOCKET": str(sock_path)})
    try:
        for _ in range(1000):  # far more than any queue holds (net.unix.max_dgram_qlen)
            notifier.notify("WATCHDOG=1")
        notifier.ready("serving")
    finally:
        listener.close()
    assert [r.getMessage() for r in caplog.records] == ["notify_dropped"]
    assert "READY=1" in str(caplog.records[0].lbagent_fields["fields"])  # type: ignore[attr-defined]


def test_notifier_is_silent_without_a_supervisor() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")  # no socket: nothing happens
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_a_reload_whose_apply_fails_keeps_the_running_config_and_the_agent(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path)
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        assert h.speaker is not None
        before = h.agent.model

        async def refuse(bgp: model.Bgp) -> None:
            raise ValueError("the speaker refused the new settings")

        h.speaker.reconfigure = refuse  # type: ignore[method-assign]
        changed = yaml.safe_load(h.path.read_text())
        changed["bgp"]["peers"][0]["holdTime"] = 30
        h.path.write_text(yaml.safe_dump(changed))
        assert await h.agent.reload() is False
        assert h.agent.model == before and not run.done()
        assert h.announced() == {"192.0.2.10/32"}
        h.agent.stop("test")
        assert await run == 0

    asyncio.run(scenario())
    [failed] = [r for r in caplog.records if r.getMessage() == "config_apply_failed"]
    assert "the speaker refused" in failed.lbagent_fields["error"]  # type: ignore[attr-defined]


def test_a_failing_task_is_restarted_and_an_unexpected_crash_exits_non_zero(tmp_path: Path) -> None:
    h = Harness(tmp_path)

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        calls = 0

        async def flaky() -> None:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise RuntimeError("internal error")

        h.agent._spawn(h.agent._supervise("flaky", flaky), "flaky")
        await until(lambda: calls == 3)
        assert not run.done()
        registry = h.agent.metrics.registry
        assert registry.get_sample_value("lbagent_task_restarts_total", {"task": "flaky"}) == 2

        async def crash() -> None:
            raise RuntimeError("a bug outside supervision")

        h.agent._spawn(crash(), "crash")
        assert await asyncio.wait_for(run, 5) == 1  # systemd's Restart=on-failure brings the node back

    asyncio.run(scenario())


def test_drift_is_repaired_at_once_and_what_cannot_be_repaired_is_withdrawn(tmp_path: Path) -> None:
    """The watchers' reports (tests/unit/test_drift_netns.py proves them against the kernel): another process
    changed the table -> the whole table is written again at once; it cannot be -> the VIP is withdrawn until
    it can. A VIP taken off the interface -> bound again; it cannot be -> withdrawn until it is.
    Real counterpart: tests/lab/test_drift.py."""
    h = Harness(tmp_path)
    vip = ip_address("192.0.2.10")
    deleted = NftChange(generation=7, pid=4242, process="nft", what="delete table inet lbagent")

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        applied = len(h.forwarder.scripts)
        h.agent.dataplane.drift(deleted)
        await until(lambda: len(h.forwarder.scripts) > applied)
        assert "delete table inet lbagent" in h.forwarder.scripts[-1]  # the whole table, not a delta
        assert h.announced() == {"192.0.2.10/32"}

        h.forwarder.fail = True
        h.agent.dataplane.drift(deleted)
        await until(lambda: h.announced() == set())  # nothing known to forward: not attracting traffic
        h.forwarder.fail = False
        await until(lambda: h.announced() == {"192.0.2.10/32"})  # the runner's retry repaired it

        h.binder.vips.discard(vip)
        h.agent.vips.address_removed(vip)
        await until(lambda: vip in h.binder.vips)
        assert h.announced() == {"192.0.2.10/32"}

        h.binder.broken = True
        h.binder.vips.discard(vip)
        h.agent.vips.address_removed(vip)
        await until(lambda: h.announced() == set())
        h.binder.broken = False
        await until(lambda: vip in h.binder.vips and h.announced() == {"192.0.2.10/32"})

        before = len(h.forwarder.scripts)
        h.agent.vips.address_removed(ip_address("192.0.2.99"))  # not a VIP of this node: not drift
        await asyncio.sleep(0)
        assert len(h.forwarder.scripts) == before
        h.agent.stop("test")
        await run

    asyncio.run(scenario())
    metric = h.agent.metrics.drift
    assert metric.labels("dataplane")._value.get() == 2
    assert metric.labels("vip")._value.get() == 2


def test_drift_that_keeps_coming_is_repaired_with_backoff_not_in_a_spin() -> None:
    """A firewall manager that rewrites the table after every repair (or lbagent's own commits not recognised
    as its own) must not make the agent re-apply in a tight loop: three prompt repairs, then each waits twice
    as long as the one before, up to a ceiling; a quiet spell starts over."""
    assert [drift_repair_delay(n) for n in range(1, 8)] == [0, 0, 0, 0.5, 1, 2, 4]
    assert drift_repair_delay(40) == DRIFT_DELAY_MAX


def test_repeated_drift_puts_the_repair_off(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    deleted = NftChange(generation=7, pid=4242, process="nft", what="delete table inet lbagent")

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: h.announced() == {"192.0.2.10/32"})
        for _ in range(DRIFT_PROMPT_REPAIRS):
            before = len(h.forwarder.scripts)
            h.agent.dataplane.drift(deleted)
            await until(lambda before=before: len(h.forwarder.scripts) > before)  # type: ignore[misc]
        applied = len(h.forwarder.scripts)
        loop = asyncio.get_running_loop()
        reported = loop.time()
        h.agent.dataplane.drift(deleted)
        h.agent.dataplane.drift(deleted)  # reports while a repair is put off share that repair
        await until(lambda: len(h.forwarder.scripts) > applied)
        assert loop.time() - reported >= drift_repair_delay(DRIFT_PROMPT_REPAIRS + 1)
        assert len(h.forwarder.scripts) == applied + 1
        h.agent.stop("test")
        await run

    asyncio.run(scenario())


def test_a_reload_load_leaves_the_collector_on_freezes_only_a_large_model_and_hashes_once(tmp_path: Path) -> None:
    """load_off_the_loop (what SIGHUP runs in a worker thread; bench/config_load.py measures the event loop's
    stalls with it and without): the same model as config.load, the collector on again afterwards whatever
    happened, a large model frozen out of collections, a small one and a refused file not."""
    small = tmp_path / "small.yaml"
    base: dict[str, Any] = yaml.safe_load(yaml.safe_dump(CONFIG))
    base["agent"]["runtimeDir"] = str(tmp_path / "run")
    small.write_text(yaml.safe_dump(base))
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    m = load_off_the_loop(FileSource(small))
    assert m == config.load(small) and gc.isenabled() and gc.get_freeze_count() == frozen
    assert m.__dict__["_digest"] == m.digest()  # worked out in the thread, not on the loop
    (tmp_path / "bad.yaml").write_text("services: [\n")
    with pytest.raises(SourceError, match="invalid YAML"):
        load_off_the_loop(FileSource(tmp_path / "bad.yaml"))
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    doc = dict(base)
    service = base["services"][0]
    doc["services"] = [{**service, "name": f"svc{i}", "ports": [{**service["ports"][0], "port": 1000 + i,
                                                                 "nodePort": 20000 + i}]} for i in range(3000)]
    large = tmp_path / "large.yaml"
    large.write_text(yaml.safe_dump(doc))
    try:
        assert len(load_off_the_loop(FileSource(large)).services) == 3000
        assert gc.isenabled() and gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
