"""The namespace lab itself: topology, router, backends, process control, side-by-side labs, clean teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lbagent.sources.file import config as lbconfig
from tests.lab.lab import (
    BACKEND,
    HOSTS,
    LBS,
    NODES,
    REPO,
    REQUIRED_TOOLS,
    CommandError,
    Lab,
    LabError,
    LabTimeout,
    address,
    address6,
    check_requirements,
    link_local,
    pids_in_netns,
    process_state,
    wait_for,
)

pytestmark = pytest.mark.lab

EXPECTED_ADDRESSES = {
    "sw": [],
    "client": ["192.0.2.130"],
    "router": ["192.0.2.129", "198.51.100.1", "203.0.113.1"],
    "lb1": ["198.51.100.11", "203.0.113.2"],
    "lb2": ["198.51.100.12", "203.0.113.3"],
    "node1": ["203.0.113.11"],
    "node2": ["203.0.113.12"],
    "node3": ["203.0.113.13"],
}


def _netns_names() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def _netns_id(name: str) -> tuple[int, int]:
    st = os.stat(Path("/run/netns", name))
    return (st.st_dev, st.st_ino)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.lab", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_requirements_are_met() -> None:
    """Root and every tool: missing ones fail here, loudly, never skip."""
    assert check_requirements() == [], check_requirements()
    assert set(REQUIRED_TOOLS) >= {"ip", "bird", "birdc", "curl", "ping", "nft"}


def test_topology_lists_every_host_with_its_addresses(bare_lab: Lab) -> None:
    topo = bare_lab.topology()
    assert set(topo["hosts"]) == set(HOSTS)
    for host, addresses in EXPECTED_ADDRESSES.items():
        info = topo["hosts"][host]
        assert info["namespace"] == f"{bare_lab.prefix}-{host}"
        assert info["addresses"] == addresses
        assert info["namespace"] in _netns_names()
    assert {h: topo["hosts"][h]["role"] for h in ("client", "router", "lb1", "node3", "sw")} == {
        "client": "client", "router": "router", "lb1": "lb", "node3": "node", "sw": "switch",
    }
    state = json.loads((bare_lab.state_dir / "state.json").read_text())
    assert state["topology"] == json.loads(json.dumps(topo))
    assert set(state["pids"]) == {"router/bird", *(f"{n}/backend" for n in NODES)}


def test_addresses_are_configured_in_the_namespaces(bare_lab: Lab) -> None:
    for host, addresses in EXPECTED_ADDRESSES.items():
        out = json.loads(bare_lab.exec(host, ["ip", "-j", "-4", "addr", "show"]).stdout)
        configured = {a["local"] for link in out for a in link["addr_info"] if a["local"] != "127.0.0.1"}
        assert configured == set(addresses), host
    lb1_routes = json.loads(bare_lab.exec("lb1", ["ip", "-j", "route", "show", "default"]).stdout)
    assert [r["gateway"] for r in lb1_routes] == ["198.51.100.1"]
    node_routes = json.loads(bare_lab.exec("node1", ["ip", "-j", "route", "show", "default"]).stdout)
    assert [r["gateway"] for r in node_routes] == ["203.0.113.1"]
    sysctl = bare_lab.exec("router", ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv4.fib_multipath_hash_policy",
                                      "net.ipv4.fib_multipath_hash_fields"])
    assert sysctl.stdout.split() == ["1", "3", "55"]  # 0x37: addresses, protocol, ports


def test_bird_runs_and_lists_both_lb_peers(bare_lab: Lab) -> None:
    out = bare_lab.birdc("show", "protocols")
    assert "lb1" in out and "lb2" in out, out
    sessions = bare_lab.bgp_sessions()
    assert set(sessions) == {"lb1", "lb2"}
    assert all(not state.startswith("Established") for state in sessions.values()), sessions
    detail = bare_lab.birdc("show", "protocols", "all", "lb1")
    assert "198.51.100.11" in detail and "64512" in detail, detail
    assert bare_lab.router_nexthops("192.0.2.10") == set()


def test_lbs_reach_every_node_and_nodes_see_the_lbs_cluster_address(bare_lab: Lab) -> None:
    for lb in LBS:
        for node in NODES:
            body = bare_lab.request(f"http://{address(node)}:30080/probe", host=lb)
            assert body is not None, (lb, node)
            assert body["node"] == node
            assert body["port"] == 30080
            assert body["path"] == "/probe"
            assert body["client"].rsplit(":", 1)[0] == address(lb, "cluster")


def test_stopped_backend_refuses_and_starts_again(bare_lab: Lab) -> None:
    url = f"http://{address('node2')}:30080/"
    try:
        bare_lab.stop_backend("node2")
        assert not bare_lab.backend_running("node2")
        curl = bare_lab.exec("lb1", ["curl", "-sS", "--max-time", "2", url], check=False)
        assert curl.returncode == 7, curl  # 7: connection refused
        assert bare_lab.request(url, host="lb1") is None
        assert bare_lab.request(f"http://{address('node1')}:30080/", host="lb1") is not None
    finally:
        if not bare_lab.backend_running("node2"):
            bare_lab.start_backend("node2")
    body = bare_lab.request(url, host="lb1")
    assert body is not None and body["node"] == "node2"


def test_client_pings_the_router_and_the_lbs(bare_lab: Lab) -> None:
    assert bare_lab.ping("client", "192.0.2.129")
    assert bare_lab.ping("client", "198.51.100.1")
    assert bare_lab.ping("client", "198.51.100.11")
    assert not bare_lab.ping("client", "192.0.2.10", timeout=0.3)  # nothing announces the VIP yet


def test_generated_agent_configs_are_valid(bare_lab: Lab) -> None:
    for lb in LBS:
        path = bare_lab.agent_config_path(lb)
        model = lbconfig.parse(path.read_text(), str(path))
        assert model.node_name == lb
        assert str(model.bgp.router_id) == address(lb, "uplink")
        assert model.bgp.local_as == 64512
        assert [(str(p.address), p.peer_as, p.hold_time) for p in model.bgp.peers] == [("198.51.100.1", 64500, 3)]
        assert [n.name for n in model.nodes] == list(NODES)
        assert model.agent.drain_seconds == 1.0
        assert model.agent.runtime_dir == str(bare_lab.state_dir / lb / "run")
        assert [str(v) for s in model.services for v in s.vips] == ["192.0.2.10"]
        assert model.services[0].health_check.interval == 0.5
        assert bare_lab.agent_config(lb) == bare_lab.default_agent_config(lb)


def test_agent_config_can_be_rewritten(bare_lab: Lab) -> None:
    config = bare_lab.agent_config("lb2")
    try:
        config["services"][0]["ports"][0]["port"] = 8080
        bare_lab.write_agent_config("lb2", config)
        assert bare_lab.agent_config("lb2")["services"][0]["ports"][0]["port"] == 8080
        bare_lab.write_agent_config("lb2", "not: [valid\n")
        assert bare_lab.agent_config_path("lb2").read_text() == "not: [valid\n"
    finally:
        bare_lab.write_agent_config("lb2", bare_lab.default_agent_config("lb2"))


def test_custom_services_and_peers(lab_factory: Callable[..., Lab]) -> None:
    services = [
        {"name": "web", "vip": "192.0.2.10", "ports": [{"port": 80, "nodePort": 30080}]},
        {"name": "dns", "namespace": "kube-system", "vip": "192.0.2.53",
         "ports": [{"name": "dns", "protocol": "UDP", "port": 53, "nodePort": 30053},
                   {"name": "dns-tcp", "protocol": "TCP", "port": 53, "nodePort": 30054}]},
    ]
    lab = lab_factory(start_agents=False, services=services, return_path=False,
                      bgp_peers={"198.51.100.11": 64512, "198.51.100.12": 64513, "198.51.100.99": 64999})
    assert set(lab.bgp_sessions()) == {"lb1", "lb2", "peer_198_51_100_99"}
    assert lab.default_agent_config("lb2")["bgp"]["localAS"] == 64513
    for lb in LBS:
        lbconfig.parse(lab.agent_config_path(lb).read_text())
    assert lab.node_ports("TCP") == [30054, 30080] and lab.node_ports("UDP") == [30053]
    body = lab.request(f"http://{address('node3')}:30054/", host="lb2")
    assert body is not None and body["node"] == "node3" and body["port"] == 30054
    udp = lab.exec("lb1", [sys.executable, "-c", textwrap.dedent("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(b"hello", ("203.0.113.12", 30053))
        print(s.recvfrom(4096)[0].decode())
    """)])
    answer = json.loads(udp.stdout)
    assert answer["node"] == "node2" and answer["protocol"] == "UDP"
    assert answer["client"].startswith("203.0.113.2:")
    answer2 = lab.request_udp(address("node1"), 30053, "ping", host="lb2")
    assert answer2 is not None and answer2["node"] == "node1" and answer2["payload"] == "ping"
    # return_path=False: the nodes have no mark rules or extra tables (masquerade needs none)
    assert lab.exec("node1", ["nft", "list", "tables"]).stdout.split() == ["table", "inet", "lab_lbip"]
    assert "fwmark" not in lab.exec("node1", ["ip", "rule"]).stdout
    assert lab.topology()["returnPath"] is False and Lab.attach(lab.prefix).return_path is False


EXABGP_CONFIG = """\
neighbor 198.51.100.1 {{
    router-id {me};
    local-address {me};
    local-as 64512;
    peer-as 64500;
    hold-time 3;
    family {{ ipv4 unicast; }}
    static {{ route 192.0.2.10/32 next-hop self; }}
}}
"""


def test_router_spreads_flows_over_both_lbs_and_fails_over(bare_lab: Lab) -> None:
    """The router side, without lbagent: plain ExaBGP announces the VIP from each LB, which answers itself."""
    lab = bare_lab
    vip = "192.0.2.10"
    try:
        for lb in LBS:
            conf = lab.state_dir / lb / "exabgp-test.conf"
            conf.write_text(EXABGP_CONFIG.format(me=address(lb, "uplink")))
            lab.exec(lb, ["ip", "addr", "add", f"{vip}/32", "dev", "lo"])
            env = {"exabgp.daemon.user": "root", "exabgp.daemon.daemonize": "false", "exabgp.tcp.bind": "",
                   "exabgp.log.destination": "stderr", "EXABGP_ENVFILE": str(conf.with_suffix(".env"))}
            lab.spawn(lb, "exabgp", [str(REPO / ".venv" / "bin" / "exabgp"), "server", str(conf)], env=env)
            lab.spawn(lb, "web", [sys.executable, str(BACKEND), "--name", lb, "--tcp", "80"])
        lbs = {address(lb, "uplink") for lb in LBS}
        wait_for(lambda: lab.router_nexthops(vip) == lbs, 20, 0.1, "both LBs as next hops",
                 ignore=(CommandError,))
        assert set(lab.bgp_sessions().values()) == {"Established"}
        route = lab.router_route(vip)
        assert "nexthop via 198.51.100.11" in route and "nexthop via 198.51.100.12" in route, route
        for lb in LBS:
            wait_for(lambda: lab.request(f"http://{vip}/", host=lb), 10, message=f"the web server on {lb}")  # noqa: B023
        answers = Counter(str((lab.request(f"http://{vip}/") or {}).get("node")) for _ in range(30))
        assert set(answers) == set(LBS), answers  # L4 hashing: one client's flows reach both LBs

        lab.stop_process("lb1", "exabgp", signal.SIGKILL)  # the kernel closes the session at once
        wait_for(lambda: lab.router_nexthops(vip) == {address("lb2", "uplink")}, 10, 0.05, "lb1 withdrawn")
        answers = Counter(str((lab.request(f"http://{vip}/") or {}).get("node")) for _ in range(10))
        assert answers == {"lb2": 10}, answers
    finally:
        for lb in LBS:
            lab.stop_process(lb, "exabgp")
            lab.stop_process(lb, "web")
            lab.exec(lb, ["ip", "addr", "del", f"{vip}/32", "dev", "lo"], check=False)
    wait_for(lambda: lab.router_nexthops(vip) == set(), 10, 0.05, "the VIP withdrawn from the router")


def test_two_labs_side_by_side(bare_lab: Lab, lab_factory: Callable[..., Lab]) -> None:
    other = lab_factory(start_agents=False)
    assert other.prefix != bare_lab.prefix
    for lab in (bare_lab, other):
        assert set(lab.bgp_sessions()) == {"lb1", "lb2"}
        body = lab.request(f"http://{address('node1')}:30080/", host="lb1")
        assert body is not None and body["node"] == "node1"
        assert lab.ping("client", "198.51.100.12")
    assert _netns_id(other.ns("router")) != _netns_id(bare_lab.ns("router"))


def test_down_leaves_no_namespace_process_or_state(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(start_agents=False)
    ids = {_netns_id(ns) for ns in lab.namespaces()}
    pids = list(json.loads((lab.state_dir / "state.json").read_text())["pids"].values())
    assert len(pids_in_netns(ids)) >= 4  # BIRD and three backends
    lab.exec("node1", ["sh", "-c", "sleep 300 >/dev/null 2>&1 &"])  # something the lab did not start itself
    started = time.monotonic()
    lab.down()
    took = time.monotonic() - started
    assert not any(name.startswith(f"{lab.prefix}-") for name in _netns_names())
    assert pids_in_netns(ids) == {}
    assert all(process_state(pid) in (None, "Z") for pid in pids)
    assert not lab.state_dir.exists()
    lab.down()  # again: nothing left, nothing raised
    assert took < 5, took


def test_failed_up_tears_down_what_it_built(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab(start_agents=False)

    def broken(node: str) -> None:
        raise LabError(f"injected failure while starting {node}")

    monkeypatch.setattr(lab, "_wait_backend", broken)
    with pytest.raises(LabError, match="injected failure"):
        lab.up()
    assert not lab.exists()
    assert not any(name.startswith(f"{lab.prefix}-") for name in _netns_names())


def test_up_refuses_an_existing_prefix(bare_lab: Lab) -> None:
    with pytest.raises(LabError, match="already exists"):
        Lab(prefix=bare_lab.prefix, start_agents=False).up()
    assert bare_lab.ping("client", "198.51.100.1")  # the refusal did not tear the existing lab down


def test_wait_for_returns_the_value_or_times_out() -> None:
    values = iter([0, None, "", "done"])
    assert wait_for(lambda: next(values), 1, 0.001) == "done"
    started = time.monotonic()
    with pytest.raises(LabTimeout, match="never"):
        wait_for(lambda: False, 0.1, 0.01, "never")
    assert time.monotonic() - started < 1


FAKE_AGENT = """\
import os, signal, sys
print("fake agent", os.getpid(), sys.argv[1:], flush=True)
signal.signal(signal.SIGHUP, lambda *_: print("reloaded", flush=True))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
while True:
    signal.pause()
"""


def test_agent_process_control(tmp_path: Path, lab_factory: Callable[..., Lab]) -> None:
    """Start, signal, wait, restart: with a stand-in for lbagent, so the lab is tested without the daemon."""
    exe = tmp_path / ".venv" / "bin" / "lbagent"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!{sys.executable}\n{FAKE_AGENT}")
    exe.chmod(0o755)
    lab = lab_factory(start_agents=True, repo=tmp_path)
    for lb in LBS:
        wait_for(lambda: "fake agent" in lab.agent_log(lb), 10, message=f"{lb}'s agent to start")  # noqa: B023
        assert lab.agent_running(lb)
        assert f"run -c {lab.agent_config_path(lb)}" in lab.agent_log(lb)
    pid = lab.agent_pid("lb1")
    assert pid is not None
    assert _netns_id(lab.ns("lb1")) == (os.stat(f"/proc/{pid}/ns/net").st_dev, os.stat(f"/proc/{pid}/ns/net").st_ino)

    lab.signal_agent("lb1", signal.SIGHUP)
    wait_for(lambda: "reloaded" in lab.agent_log("lb1"), 5, message="the agent to log its reload")
    with pytest.raises(LabError, match="already running"):
        lab.start_agent("lb1")

    lab.signal_agent("lb1", signal.SIGTERM)
    assert lab.wait_agent_exit("lb1", 5) == 3
    assert not lab.agent_running("lb1") and lab.agent_pid("lb1") is None
    with pytest.raises(LabError, match="not running"):
        lab.signal_agent("lb1", signal.SIGHUP)

    lab.start_agent("lb1")
    wait_for(lambda: "fake agent" in lab.agent_log("lb1", since_start=True), 10, message="the restarted agent")
    assert lab.agent_log("lb1").count("fake agent") == 2
    assert lab.agent_pid("lb1") not in (None, pid)

    # Another process's view (state.json) sees the same agents and can stop one.
    attached = Lab.attach(lab.prefix)
    assert attached.agent_pid("lb1") == lab.agent_pid("lb1")
    os.kill(lab.agent_pid("lb2") or 0, signal.SIGKILL)
    assert lab.wait_agent_exit("lb2", 5) == -signal.SIGKILL
    assert not attached.agent_running("lb2")
    assert attached.stop_agent("lb1") is None  # not our child: exit code unknown
    assert not lab.agent_running("lb1")


def test_cli_up_exec_topology_down() -> None:
    prefix = f"labcli{os.getpid() % 10000}"
    try:
        up = _cli("up", "--prefix", prefix, "--no-agents")
        assert up.returncode == 0, up.stderr
        assert json.loads(up.stdout)["hosts"]["lb1"]["addresses"] == ["198.51.100.11", "203.0.113.2"]
        topo = _cli("topology", "--prefix", prefix)
        assert topo.returncode == 0 and json.loads(topo.stdout)["prefix"] == prefix
        listed = _cli("list")
        assert prefix in listed.stdout.split()
        ok = _cli("exec", "--prefix", prefix, "lb2", "--", "curl", "-sS", f"http://{address('node2')}:30080/")
        assert ok.returncode == 0 and json.loads(ok.stdout)["client"].startswith("203.0.113.3:"), ok.stderr
        failing = _cli("exec", "--prefix", prefix, "client", "--", "sh", "-c", "exit 7")
        assert failing.returncode == 7
        lab = Lab.attach(prefix)
        lab.stop_backend("node3")  # another process built it; this one can still drive it
        assert lab.request(f"http://{address('node3')}:30080/", host="lb1") is None
        lab.start_backend("node3")
        assert lab.request(f"http://{address('node3')}:30080/", host="lb1") is not None
        down = _cli("down", "--prefix", prefix)
        assert down.returncode == 0, down.stderr
        assert not any(name.startswith(f"{prefix}-") for name in _netns_names())
        assert _cli("topology", "--prefix", prefix).returncode == 1
    finally:
        _cli("down", "--prefix", prefix)


@pytest.mark.parametrize("how", ["sigterm", "exception"])
def test_a_dying_process_tears_its_lab_down(how: str) -> None:
    """SIGTERM (through the CLI's handler) and an uncaught exception (through atexit) both clean up."""
    prefix = f"labdie{os.getpid() % 1000}{'t' if how == 'sigterm' else 'x'}"
    script = textwrap.dedent(f"""
        import sys, threading
        from tests.lab.__main__ import _install_signal_handlers
        from tests.lab.lab import Lab
        _install_signal_handlers()
        lab = Lab(prefix={prefix!r}, start_agents=False)
        lab.up()
        print("up", flush=True)
        if {how!r} == "exception":
            raise RuntimeError("the test process failed")
        threading.Event().wait()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "up"
        assert f"{prefix}-router" in _netns_names()
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert not any(name.startswith(f"{prefix}-") for name in _netns_names())
        assert not Path("/run/lbagent-lab", prefix).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        Lab(prefix=prefix, start_agents=False).down()


# ----- kube-proxy's health endpoints, the nat return path, dual stack ---------------------------------------

DUAL_SERVICES = [
    {"name": "web", "vips": ["192.0.2.10", "2001:db8::10"], "healthCheckNodePort": 32000,
     "ports": [{"name": "http", "protocol": "TCP", "port": 80, "nodePort": 30080}]},
    {"name": "dns", "namespace": "kube-system", "vip": "192.0.2.53", "healthCheckNodePort": 32001,
     "ports": [{"name": "dns", "protocol": "UDP", "port": 53, "nodePort": 30053}]},
]


@pytest.fixture(scope="module")
def dual_lab() -> Iterator[Lab]:
    """A dual-stack lab without agents, with healthCheckNodePorts and a UDP service: leave it as you found it."""
    with Lab(start_agents=False, ipv6=True, services=DUAL_SERVICES) as lab:
        yield lab


def _get(lab: Lab, url: str, host: str = "lb1") -> tuple[int, Any]:
    """Status and body (JSON when it parses, else text) of a GET with curl from `host`."""
    proc = lab.exec(host, ["curl", "-sS", "-g", "--max-time", "2", "-o", "-", "-w", "\n%{http_code}", url])
    text, _, status = proc.stdout.rpartition("\n")
    try:
        return int(status), json.loads(text)
    except ValueError:
        return int(status), text


def _url(ip: str, port: int, path: str = "/") -> str:
    return f"http://[{ip}]:{port}{path}" if ":" in ip else f"http://{ip}:{port}{path}"


def test_health_check_node_ports_answer_like_kube_proxy_and_flip(dual_lab: Lab) -> None:
    lab = dual_lab
    assert lab.health_check_node_ports() == {"default/web": 32000, "kube-system/dns": 32001}
    web = {"namespace": "default", "name": "web"}
    for node in NODES:
        for ip in (address(node), address6(node)):
            status, body = _get(lab, _url(ip, 32000, "/any/path?x=1"))
            assert (status, body) == (200, {"service": web, "localEndpoints": 1, "serviceProxyHealthy": True})
        status, body = _get(lab, _url(address(node), 32001), host="lb2")
        assert status == 200 and body["service"] == {"namespace": "kube-system", "name": "dns"}
    try:
        lab.set_local_endpoints("node2", "default/web", 0)  # no sleep: the very next request sees it
        assert _get(lab, _url(address("node2"), 32000)) == (
            503, {"service": web, "localEndpoints": 0, "serviceProxyHealthy": True})
        assert _get(lab, _url(address6("node2"), 32000))[0] == 503
        assert _get(lab, _url(address("node1"), 32000))[0] == 200  # other nodes and services keep theirs
        assert _get(lab, _url(address("node2"), 32001))[0] == 200
        lab.set_local_endpoints("node2", "web", 3)  # a bare name means namespace "default"
        assert _get(lab, _url(address("node2"), 32000)) == (
            200, {"service": web, "localEndpoints": 3, "serviceProxyHealthy": True})
        assert lab.local_endpoints("node2", "default/web") == 3
        lab.set_local_endpoints("node3", "kube-system/dns", 0)
        lab.stop_backend("node3")  # the state outlives a backend restart
        lab.start_backend("node3")
        assert _get(lab, _url(address("node3"), 32001))[0] == 503
    finally:
        for node in NODES:
            lab.set_local_endpoints(node, "default/web", 1)
            lab.set_local_endpoints(node, "kube-system/dns", 1)
    with pytest.raises(LabError, match="no service 'default/nope'"):
        lab.set_local_endpoints("node1", "nope", 0)
    with pytest.raises(LabError, match="not a node"):
        lab.set_local_endpoints("lb1", "web", 0)


def test_kube_proxy_healthz_answers_and_flips(dual_lab: Lab) -> None:
    lab = dual_lab
    for node in NODES:
        status, body = _get(lab, _url(address(node), 10256, "/healthz"))
        assert status == 200 and body["nodeEligible"] is True, body
        assert set(body) == {"lastUpdated", "currentTime", "nodeEligible"}
        assert _get(lab, _url(address6(node), 10256, "/healthz"), host="lb2")[0] == 200
    assert _get(lab, _url(address("node1"), 10256, "/other"))[0] == 404
    try:
        lab.set_kube_proxy_healthy("node1", False)
        status, body = _get(lab, _url(address("node1"), 10256, "/healthz"))
        assert status == 503 and body["nodeEligible"] is False
        assert _get(lab, _url(address6("node1"), 10256, "/healthz"))[0] == 503
        assert _get(lab, _url(address("node2"), 10256, "/healthz"))[0] == 200
        assert not lab.kube_proxy_healthy("node1") and lab.kube_proxy_healthy("node2")
        lab.set_kube_proxy_healthy("node1", True)
        assert _get(lab, _url(address("node1"), 10256, "/healthz"))[0] == 200
    finally:
        lab.set_kube_proxy_healthy("node1", True)


def test_health_ports_must_not_collide() -> None:
    web = {"name": "web", "vip": "192.0.2.10", "ports": [{"port": 80, "nodePort": 30080}]}
    with pytest.raises(LabError, match="healthCheckNodePort 30080 of default/web is also a TCP nodePort"):
        Lab(start_agents=False, services=[{**web, "healthCheckNodePort": 30080}])
    with pytest.raises(LabError, match="kube-proxy"):
        Lab(start_agents=False, services=[{**web, "healthCheckNodePort": 10256}])


def test_nodes_carry_the_return_path_rules(bare_lab: Lab) -> None:
    lab = bare_lab
    for node in NODES:
        ruleset = lab.exec(node, ["nft", "list", "table", "inet", "lab_return"]).stdout
        assert "ether saddr 02:00:cb:00:71:02 fib daddr type local ct mark set 0x00000001" in ruleset, ruleset
        assert "ether saddr 02:00:cb:00:71:03 fib daddr type local ct mark set 0x00000002" in ruleset, ruleset
        rules = lab.exec(node, ["ip", "rule"]).stdout
        assert "fwmark 0x1 lookup 101" in rules and "fwmark 0x2 lookup 102" in rules, rules
        routes = {t: lab.exec(node, ["ip", "route", "show", "table", t]).stdout.split()[:3] for t in ("101", "102")}
        assert routes == {"101": ["default", "via", "203.0.113.2"], "102": ["default", "via", "203.0.113.3"]}
        sysctl = lab.exec(node, ["sysctl", "-n", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.eth0.rp_filter",
                                 "net.ipv4.conf.all.src_valid_mark", "net.ipv4.tcp_fwmark_accept"])
        assert sysctl.stdout.split() == ["0", "0", "1", "1"]
    assert [lab.topology()["hosts"][lb]["macs"]["cluster"] for lb in LBS] == ["02:00:cb:00:71:02", "02:00:cb:00:71:03"]


TEST_VIPS = {"lb1": ("192.0.2.99", "2001:db8::99"), "lb2": ("192.0.2.98", "2001:db8::98")}


def _manual_dnat_ruleset(vip: str, vip6: str) -> str:
    """On an LB: DNAT a test VIP (TCP 80, UDP 53) to node1 without masquerade, and count the answers."""
    node, node6 = address("node1"), address6("node1")
    return textwrap.dedent(f"""\
        table inet labtest {{
            counter answers {{ }}
            chain prerouting {{
                type nat hook prerouting priority dstnat; policy accept;
                ip daddr {vip} tcp dport 80 dnat ip to {node}:30080
                ip daddr {vip} udp dport 53 dnat ip to {node}:30053
                ip6 daddr {vip6} tcp dport 80 dnat ip6 to [{node6}]:30080
                ip6 daddr {vip6} udp dport 53 dnat ip6 to [{node6}]:30053
            }}
            chain forward {{
                type filter hook forward priority filter; policy accept;
                ct direction reply ip saddr {node} counter name answers
                ct direction reply ip6 saddr {node6} counter name answers
            }}
        }}
    """)


def _answers_counted(lab: Lab, lb: str) -> int:
    out = json.loads(lab.exec(lb, ["nft", "-j", "list", "counter", "inet", "labtest", "answers"]).stdout)
    return sum(int(item["counter"]["packets"]) for item in out["nftables"] if "counter" in item)


@pytest.mark.parametrize("family", [4, 6])
def test_nat_answers_return_through_the_lb_that_forwarded(dual_lab: Lab, family: int) -> None:
    """Without lbagent: each LB DNATs its own test VIP to node1 and keeps the client's address; node1 sees
    192.0.2.130 and its answers go back through the LB that forwarded the request (counted there)."""
    lab = dual_lab
    client = address("client") if family == 4 else address6("client")
    try:
        for lb, (vip, vip6) in TEST_VIPS.items():
            route = ["ip", "route", "replace", f"{vip}/32", "via", address(lb, "uplink")]
            route6 = ["ip", "-6", "route", "replace", f"{vip6}/128", "via", address6(lb, "uplink")]
            lab.exec("router", route)
            lab.exec("router", route6)
            lab.exec(lb, ["nft", "-f", "-"], stdin=_manual_dnat_ruleset(vip, vip6))
        for lb, vips in TEST_VIPS.items():
            other = next(x for x in LBS if x != lb)
            vip = vips[0] if family == 4 else vips[1]
            before = {x: _answers_counted(lab, x) for x in LBS}
            body = lab.request(_url(vip, 80))
            assert body is not None, f"no answer through {lb}"
            assert body["node"] == "node1" and body["client"].rsplit(":", 1)[0] == client, body
            udp = lab.request_udp(vip, 53, f"via {lb}")
            assert udp is not None and udp["client"].rsplit(":", 1)[0] == client and udp["payload"] == f"via {lb}"
            after = {x: _answers_counted(lab, x) for x in LBS}
            assert after[lb] > before[lb] and after[other] == before[other], (lb, before, after)
            # a chosen source port, twice in a row (the client keeps no TIME_WAIT)
            for _ in range(2):
                body = lab.request(_url(vip, 80), local_port=40123)
                assert body is not None and body["client"] == f"{client}:40123", body
            udp = lab.request_udp(vip, 53, "port", local_port=40124)
            assert udp is not None and udp["client"] == f"{client}:40124", udp
    finally:
        for lb, (vip, vip6) in TEST_VIPS.items():
            lab.exec("router", ["ip", "route", "del", f"{vip}/32"], check=False)
            lab.exec("router", ["ip", "-6", "route", "del", f"{vip6}/128"], check=False)
            lab.exec(lb, ["nft", "delete", "table", "inet", "labtest"], check=False)
    assert lab.router_nexthops(TEST_VIPS["lb1"][0]) == set()
    assert "labtest" not in lab.nft_ruleset("lb1")


def test_dual_stack_addresses_routes_and_reachability(dual_lab: Lab) -> None:
    lab = dual_lab
    for host, info in lab.topology()["hosts"].items():
        want = set(HOSTS[host].addresses6) | {link_local(host, i) for i in HOSTS[host].interfaces}
        out = json.loads(lab.exec(host, ["ip", "-j", "-6", "addr", "show"]).stdout)
        configured = {a["local"]: a for link in out for a in link["addr_info"] if a["local"] != "::1"}
        assert set(configured) == want, host
        assert not any(a.get("tentative") or a.get("dadfailed") for a in configured.values()), configured
        assert info["addresses"] == HOSTS[host].addresses + HOSTS[host].addresses6
    assert lab.topology()["hosts"]["lb2"]["addresses"] == ["198.51.100.12", "203.0.113.3", "2001:db8:1::12",
                                                            "2001:db8:2::3"]
    for host, gateway in (("client", "2001:db8:c::129"), ("lb1", "2001:db8:1::1"), ("lb2", "2001:db8:1::1")):
        routes = json.loads(lab.exec(host, ["ip", "-j", "-6", "route", "show", "default"]).stdout)
        assert [r["gateway"] for r in routes] == [gateway], host
    forwarding = ["sysctl", "-n", "net.ipv6.conf.all.forwarding"]
    assert [lab.exec(h, forwarding).stdout.strip() for h in ("router", "lb1", "lb2", "node1")] == ["1", "1", "1", "0"]
    assert lab.ping("client", "2001:db8:c::129")
    assert lab.ping("client", "2001:db8:1::1")
    assert lab.ping("client", address6("lb2", "uplink"))  # through the router
    for lb in LBS:
        for node in NODES:
            assert lab.ping(lb, address6(node)), (lb, node)
            body = lab.request(_url(address6(node), 30080, "/v6"), host=lb)
            assert body is not None and body["node"] == node and body["path"] == "/v6", (lb, node)
            assert body["client"].rsplit(":", 1)[0] == address6(lb, "cluster")
        # IPv4 still works on the same dual-stack sockets, with the plain IPv4 address as the client
        body = lab.request(_url(address("node1"), 30080), host=lb)
        assert body is not None and body["client"].rsplit(":", 1)[0] == address(lb, "cluster")
        udp = lab.request_udp(address6("node2"), 30053, "six", host=lb)
        assert udp is not None and udp["client"].rsplit(":", 1)[0] == address6(lb, "cluster")
    assert lab.ping("client", address6("node1"))  # the router has a leg on the cluster segment: the nodes' gateway


def test_bird_has_ipv6_kernel_and_bgp_protocols(dual_lab: Lab) -> None:
    lab = dual_lab
    assert set(lab.bgp_sessions()) == {"lb1", "lb2", "lb1v6", "lb2v6"}
    assert "kernel6" in lab.birdc("show", "protocols")
    detail = lab.birdc("show", "protocols", "all", "lb2v6")
    assert "2001:db8:1::12" in detail and "64512" in detail and "ipv6" in detail, detail
    config = (lab.state_dir / "router" / "bird.conf").read_text()
    assert "local 2001:db8:1::1 as 64500;" in config and "ipv6 { export where source = RTS_BGP; };" in config
    assert lab.router_nexthops("2001:db8::10") == set() == lab.router_nexthops("2001:db8::10/128")
    peers = lab.topology()["router"]["peers"]
    assert peers["2001:db8:1::11"] == {"as": 64512, "protocol": "lb1v6"}


def test_dual_stack_agent_config(dual_lab: Lab) -> None:
    config = dual_lab.default_agent_config("lb1")
    assert config["bgp"]["peers"] == [
        {"address": "198.51.100.1", "peerAS": 64500, "holdTime": 3},
        {"address": "2001:db8:1::1", "peerAS": 64500, "holdTime": 3},
    ]
    assert config["nodes"][0] == {"name": "node1", "addresses": ["203.0.113.11", "2001:db8:2::11"]}
    model = lbconfig.parse(dual_lab.agent_config_path("lb1").read_text())
    assert [str(p.address) for p in model.bgp.peers] == ["198.51.100.1", "2001:db8:1::1"]
    assert [[str(a) for a in n.addresses] for n in model.nodes][2] == ["203.0.113.13", "2001:db8:2::13"]
    with pytest.raises(LabError, match="Lab\\(ipv6=True\\)"):
        Lab(start_agents=False, bgp_peers={"2001:db8:1::11": 64512})
    with pytest.raises(LabError, match="no IPv6"):
        Lab(start_agents=False).address6("lb1")


EXABGP6_CONFIG = """\
neighbor 2001:db8:1::1 {{
    router-id {router_id};
    local-address {me};
    local-as 64512;
    peer-as 64500;
    hold-time 3;
    family {{ ipv6 unicast; }}
    static {{ route 2001:db8::10/128 next-hop self; }}
}}
"""


def test_router_learns_an_ipv6_vip_from_both_lbs_and_spreads_flows(dual_lab: Lab) -> None:
    """The IPv6 BGP sessions with plain ExaBGP: ECMP over both LBs, which answer on the VIP themselves."""
    lab = dual_lab
    vip = "2001:db8::10"
    try:
        for lb in LBS:
            conf = lab.state_dir / lb / "exabgp6-test.conf"
            conf.write_text(EXABGP6_CONFIG.format(router_id=address(lb, "uplink"), me=address6(lb, "uplink")))
            lab.exec(lb, ["ip", "addr", "add", f"{vip}/128", "dev", "lo"])
            env = {"exabgp.daemon.user": "root", "exabgp.daemon.daemonize": "false", "exabgp.tcp.bind": "",
                   "exabgp.log.destination": "stderr", "EXABGP_ENVFILE": str(conf.with_suffix(".env"))}
            lab.spawn(lb, "exabgp6", [str(REPO / ".venv" / "bin" / "exabgp"), "server", str(conf)], env=env)
            lab.spawn(lb, "web6", [sys.executable, str(BACKEND), "--name", lb, "--tcp", "80", "--dual-stack"])
        lbs = {address6(lb, "uplink") for lb in LBS}
        wait_for(lambda: lab.router_nexthops(vip) == lbs, 20, 0.1, "both LBs as IPv6 next hops",
                 ignore=(CommandError,))
        sessions = lab.bgp_sessions()
        assert sessions["lb1v6"] == sessions["lb2v6"] == "Established", sessions
        route = lab.router_route(vip)
        assert "nexthop via 2001:db8:1::11" in route and "nexthop via 2001:db8:1::12" in route, route
        for lb in LBS:
            wait_for(lambda: lab.request(f"http://[{vip}]/", host=lb), 10, message=f"the web server on {lb}")  # noqa: B023
        answers = Counter(str((lab.request(f"http://[{vip}]/") or {}).get("node")) for _ in range(30))
        assert set(answers) == set(LBS), answers
    finally:
        for lb in LBS:
            lab.stop_process(lb, "exabgp6")
            lab.stop_process(lb, "web6")
            lab.exec(lb, ["ip", "addr", "del", f"{vip}/128", "dev", "lo"], check=False)
    wait_for(lambda: lab.router_nexthops(vip) == set(), 10, 0.05, "the IPv6 VIP withdrawn from the router")
