"""L4 through the running agents with real packets: Local policy, client address modes, flow prediction,
dual stack, UDP. The per-data-plane packet behaviour is in tests/dataplane/."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.lab.lab import Lab, address, address6, wait_for

pytestmark = pytest.mark.lab

LBS = ("lb1", "lb2")
UPLINKS = {address("lb1", "uplink"), address("lb2", "uplink")}
CLIENT = address("client")


def _service(name: str, vip: str, node_port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "vip": vip, "ports": [{"port": 80, "nodePort": node_port}], **extra}


def _announced(lab: Lab, prefix: str, by: set[str] = UPLINKS, timeout: float = 20) -> None:
    wait_for(lambda: lab.router_nexthops(prefix) == by, timeout=timeout, message=f"{prefix} via {sorted(by)}")


def _out_of_rotation(lab: Lab, node: str) -> bool:
    """True once no LB node has the node in any lookup table any more."""
    return all(address(node) not in lab.nft_ruleset(lb) for lb in LBS)


def _nodes(lab: Lab, url: str, count: int = 30) -> Counter[str]:
    answers = [lab.request(url) for _ in range(count)]
    assert all(a is not None for a in answers), "every request is answered"
    return Counter(a["node"] for a in answers if a is not None)


@pytest.mark.parametrize("mode", ["nat", "dsr"])
def test_local_policy_sends_only_to_nodes_with_local_endpoints(lab_factory: Callable[..., Lab], mode: str) -> None:
    lab = lab_factory(services=[_service("web", "192.0.2.10", 30080, externalTrafficPolicy="Local",
                                         healthCheckNodePort=32000, forwardingMode=mode)])
    _announced(lab, "192.0.2.10/32")
    lab.set_local_endpoints("node2", "default/web", 0)
    wait_for(lambda: _out_of_rotation(lab, "node2"), timeout=10, message="node2 to leave rotation")
    answers = [lab.request("http://192.0.2.10/") for _ in range(30)]
    assert {a["node"] for a in answers if a} == {"node1", "node3"} and all(answers)
    # Local keeps the client's address (nat and dsr modes): the node saw the client itself
    assert {a["client"].rsplit(":", 1)[0] for a in answers if a} == {CLIENT}

    for node in ("node1", "node3"):
        lab.set_local_endpoints(node, "default/web", 0)
    _announced(lab, "192.0.2.10/32", by=set())
    log = lab.agent_log("lb1")
    assert "event=vip_withdrawn service=default/web vips=192.0.2.10 reason=noLocalEndpoints" in log
    assert "noLocalEndpoints (HTTP 503, localEndpoints 0)" in log

    lab.set_local_endpoints("node3", "default/web", 1)
    _announced(lab, "192.0.2.10/32")
    assert set(_nodes(lab, "http://192.0.2.10/", 10)) == {"node3"}


def test_kube_proxy_healthz_takes_a_draining_node_out(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(services=[_service("web", "192.0.2.10", 30080, healthCheck={"kubeProxyHealthz": True})])
    _announced(lab, "192.0.2.10/32")
    assert set(_nodes(lab, "http://192.0.2.10/", 40)) == {"node1", "node2", "node3"}
    lab.set_kube_proxy_healthy("node3", False)
    wait_for(lambda: _out_of_rotation(lab, "node3"), timeout=10, message="node3 to leave rotation")
    assert set(_nodes(lab, "http://192.0.2.10/")) == {"node1", "node2"}
    assert "node=node3 healthy=false" in lab.agent_log("lb1") and "/healthz HTTP 503" in lab.agent_log("lb1")


def test_client_address_masquerade_versus_nat(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(services=[_service("masq", "192.0.2.10", 30080),
                                _service("keep", "192.0.2.11", 30081, forwardingMode="nat")])
    _announced(lab, "192.0.2.10/32")
    _announced(lab, "192.0.2.11/32")
    masq = [lab.request("http://192.0.2.10/") for _ in range(30)]
    kept = [lab.request("http://192.0.2.11/") for _ in range(30)]
    assert all(masq) and all(kept), "both modes answer every request, through both LBs"
    lb_cluster = {address("lb1", "cluster"), address("lb2", "cluster")}
    assert {a["client"].rsplit(":", 1)[0] for a in masq if a} == lb_cluster
    assert {a["client"].rsplit(":", 1)[0] for a in kept if a} == {CLIENT}


@pytest.mark.parametrize("kind", ["nftables", "iptables"])
def test_plan_flow_names_the_node_a_real_flow_reaches(lab_factory: Callable[..., Lab], kind: str) -> None:
    """`lbagent plan --flow` predicts with the configured data plane's own hash (nft's jhash, HMARK's): each one
    names the node the running agents' kernels send the flow to."""
    lab = lab_factory(start_agents=False)
    for lb in LBS:
        settings = lab.default_agent_config(lb)
        settings["dataplane"]["kind"] = kind
        lab.write_agent_config(lb, settings)
        lab.start_agent(lb)
    _announced(lab, "192.0.2.10/32")
    config = str(lab.agent_config_path("lb1"))
    seen_lbs = set()
    for sport in range(41000, 41024):
        said = subprocess.run([str(lab.repo / ".venv/bin/lbagent"), "plan", "-c", config, "--flow",
                               f"{CLIENT}:{sport},192.0.2.10:80"], capture_output=True, text=True, check=True).stdout
        predicted = said.split(" goes to ")[1].split()[0]
        answer = lab.request("http://192.0.2.10/", local_port=sport)
        assert answer is not None
        assert answer["node"] == predicted, f"client port {sport}: plan said {predicted}, {answer['node']} answered"
        seen_lbs.add(answer["client"].rsplit(":", 1)[0])
    # the router spread these flows over both LBs, and each LB chose the predicted node: they agree
    assert seen_lbs == {address("lb1", "cluster"), address("lb2", "cluster")}


def test_dual_stack_vip_is_announced_and_served_in_both_families(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(ipv6=True, services=[{"name": "web", "vips": ["192.0.2.10", "2001:db8::10"],
                                            "ports": [{"port": 80, "nodePort": 30080}]}])
    _announced(lab, "192.0.2.10/32")
    _announced(lab, "2001:db8::10/128", by={address6("lb1", "uplink"), address6("lb2", "uplink")})
    assert set(_nodes(lab, "http://[2001:db8::10]/", 40)) == {"node1", "node2", "node3"}
    answer = lab.request("http://[2001:db8::10]/")
    assert answer is not None and answer["client"].rsplit(":", 1)[0] in {address6("lb1", "cluster"),
                                                                        address6("lb2", "cluster")}


def test_udp_flows_move_off_a_node_that_left(lab_factory: Callable[..., Lab]) -> None:
    dns = {"name": "dns", "vip": "192.0.2.12", "healthCheck": {"kubeProxyHealthz": True},
           "ports": [{"protocol": "UDP", "port": 53, "nodePort": 30053}]}
    lab = lab_factory(services=[dns])
    _announced(lab, "192.0.2.12/32")
    first = lab.request_udp("192.0.2.12", 53, b"q", local_port=45000)
    assert first is not None
    node = first["node"]
    for _ in range(5):  # the flow is sticky while nothing changes
        again = lab.request_udp("192.0.2.12", 53, b"q", local_port=45000)
        assert again is not None and again["node"] == node
    lab.set_kube_proxy_healthy(node, False)  # the node's backend still answers: only the LB's choice changes
    wait_for(lambda: _out_of_rotation(lab, node), timeout=10, message=f"{node} to leave rotation")

    def moved() -> bool:
        answer = lab.request_udp("192.0.2.12", 53, b"q", local_port=45000)
        return answer is not None and answer["node"] != node

    wait_for(moved, timeout=5, message="the client's UDP flow to move to a node in rotation")
    assert "event=udp_flows_cleared" in lab.agent_log("lb1") + lab.agent_log("lb2")


def _rx_bytes(lab: Lab, host: str, ifname: str) -> int:
    out = json.loads(lab.exec(host, ["ip", "-j", "-s", "link", "show", "dev", ifname]).stdout)
    return int(out[0]["stats64"]["rx"]["bytes"])


def test_dsr_keeps_the_client_address_and_the_answers_bypass_the_lbs(lab_factory: Callable[..., Lab]) -> None:
    """forwardingMode dsr: the node sees the client itself, answers it through the router (not through an LB), and
    the LBs keep no connection state for it; in both families."""
    # the lab's agents take the routers' traffic for dsr on their uplink (dataplane.dsrInterfaces)
    lab = lab_factory(ipv6=True, services=[{"name": "web", "vips": ["192.0.2.10", "2001:db8::10"],
                                            "forwardingMode": "dsr", "ports": [{"port": 80, "nodePort": 30080}]}])
    _announced(lab, "192.0.2.10/32")
    _announced(lab, "2001:db8::10/128", by={address6("lb1", "uplink"), address6("lb2", "uplink")})
    six = [lab.request("http://[2001:db8::10]/", local_port=43000 + i) for i in range(10)]
    assert all(a is not None for a in six)
    assert {a["client"].rsplit(":", 1)[0] for a in six if a} == {address6("client")}
    path = "/" + "x" * 20000  # echoed in each answer: 20 KB that the answers carry
    counters = [(h, i) for h in (*LBS, "router") for i in ("cluster",)]
    before = {c: _rx_bytes(lab, *c) for c in counters}
    answers = [lab.request(f"http://192.0.2.10{path}", local_port=42000 + i) for i in range(20)]
    after = {c: _rx_bytes(lab, *c) for c in counters}
    assert all(a is not None and a["path"] == path for a in answers)
    assert {a["client"].rsplit(":", 1)[0] for a in answers if a} == {CLIENT}
    assert len({a["node"] for a in answers if a}) >= 2
    answered = 20 * len(path)
    # every answer came in at the router's leg on the nodes' segment; next to nothing reached an LB's
    assert after[("router", "cluster")] - before[("router", "cluster")] >= answered
    for lb in LBS:
        assert after[(lb, "cluster")] - before[(lb, "cluster")] < answered // 20, lb
        assert lab.exec(lb, ["conntrack", "-L", "-d", "192.0.2.10"], check=False).stdout.strip() == "", lb
        netdev = lab.exec(lb, ["nft", "list", "table", "netdev", "lbagent"]).stdout
        assert "fwd ip to" in netdev and "fwd ip6 to" in netdev
    # drift: the netdev table deleted by hand is put back at once (nftables' own notifications), dsr again
    lab.exec("lb1", ["nft", "delete", "table", "netdev", "lbagent"])
    wait_for(lambda: lab.exec("lb1", ["nft", "list", "table", "netdev", "lbagent"], check=False).returncode == 0,
             timeout=10, message="lb1's netdev table back")
    assert "event=dataplane_drift" in lab.agent_log("lb1")
    assert "fwd ip to" in lab.exec("lb1", ["nft", "list", "table", "netdev", "lbagent"]).stdout
