"""What every data plane must do, with real packets from the client namespace through lb1 to the nodes."""

from __future__ import annotations

from collections import Counter

import pytest

from lbagent import model
from lbagent.plan.services import Frontend
from tests.dataplane.harness import ALT, CLIENT, DNS, LB1_CLUSTER, VIP4, VIP6, Plane, frontend, url
from tests.lab.lab import NODES, address

pytestmark = pytest.mark.lab

PORTS = range(40100, 40130)  # client source ports: each one a flow the data plane must place consistently


def _spread(plane: Plane, f: Frontend, ports: range = PORTS, predicted: bool = False) -> dict[int, str]:
    """GET f's VIP:port from each source port: the node that answered each flow, which must be the one
    predict() names for it. `predicted`: every flow must have a prediction (if the kind has them)."""
    family = f.vip.version
    nodes = {}
    for port in ports:
        r = plane.dl.curl(url(family, f.port), local_port=port)
        assert r.node is not None, f"port {port}: curl exit {r.code}"
        want = plane.predict(f, CLIENT[family], port)
        assert want is not None or not (predicted and plane.predictable), f"port {port}: no prediction"
        assert want is None or r.node == want.node, f"port {port}: {r.node}, predicted {want.node}"
        nodes[port] = r.node
    return nodes


def test_a_every_node_answers_and_a_flow_stays_where_predict_says(plane: Plane) -> None:
    f = frontend()
    plane.apply(f)
    first = _spread(plane, f, predicted=True)
    assert set(first.values()) == set(NODES), first
    assert _spread(plane, f) == first


def test_b_an_unhealthy_node_gets_no_new_flows_and_no_backend_is_refused_at_once(plane: Plane) -> None:
    plane.apply(frontend(), frontend(protocol="UDP", port=53, node_port=DNS, service="kube-system/dns"))
    # node2 turns unhealthy: only web changes (the agent's in-place path)
    answer = plane.apply(frontend(nodes=("node1", "node3")), frontend(protocol="UDP", port=53, node_port=DNS,
                                                                       service="kube-system/dns"),
                         changed=["default/web"])
    assert VIP4 in answer["programmed"]
    seen = set(_spread(plane, frontend(nodes=("node1", "node3"))).values())
    assert seen == {"node1", "node3"}, seen
    # nothing healthy behind web and dns: refused by the LB right away (TCP reset, ICMP port unreachable)
    answer = plane.apply(frontend(nodes=()), frontend(protocol="UDP", port=53, node_port=DNS, nodes=(),
                                                      service="kube-system/dns"),
                         changed=["default/web", "kube-system/dns"])
    assert answer["programmed"] == []
    r = plane.dl.curl(url(4))
    assert r.code == 7, r  # curl's "could not connect": refused (a dropped SYN would end in a timeout, 28)
    assert plane.dl.udp(VIP4, 53) == ("refused", None)
    # a port no frontend has is refused too, and so is everything on a VIP whose frontends are healthy
    plane.apply(frontend())
    assert plane.dl.curl(url(4, 8081)).code == 7
    assert plane.dl.curl(url(4)).node in NODES


@pytest.mark.parametrize("mode", [model.ForwardingMode.MASQUERADE, model.ForwardingMode.NAT])
def test_c_the_node_sees_the_lb_or_the_client(plane: Plane, mode: model.ForwardingMode) -> None:
    plane.apply(frontend(mode=mode), frontend(protocol="UDP", port=53, node_port=DNS, mode=mode))
    expected = LB1_CLUSTER[4] if mode is model.ForwardingMode.MASQUERADE else CLIENT[4]
    for port in list(PORTS)[:6]:
        r = plane.dl.curl(url(4), local_port=port)
        assert r.client_address == expected, r
    result, body = plane.dl.udp(VIP4, 53)
    assert result == "answer" and body is not None and body["client"].rsplit(":", 1)[0] == expected, body


def test_d_source_ranges_drop_other_clients_before_nat(plane: Plane) -> None:
    plane.apply(frontend(ranges=["198.51.100.0/24"]))
    r = plane.dl.curl(url(4), timeout=1.5)
    assert r.code == 28, r  # dropped, not refused: the client learns nothing
    assert plane.dl.curl(url(4), host="router").node in NODES  # the router's 198.51.100.1 is in range
    plane.apply(frontend(ranges=["198.51.100.0/24", "192.0.2.128/25"]))
    assert plane.dl.curl(url(4)).node in NODES
    # ranges of the other family do not let anyone in
    plane.apply(frontend(ranges=["2001:db8:c::/64"]))
    assert plane.dl.curl(url(4), timeout=1.5).code == 28


def test_e_affinity_keeps_a_client_on_one_node(plane: Plane) -> None:
    f = frontend(affinity=10800)
    plane.apply(f)
    seen = set(_spread(plane, f, range(40200, 40220)).values())
    assert len(seen) == 1, seen


def test_f_a_draining_node_keeps_its_connections_and_gets_no_new_ones(plane: Plane) -> None:
    plane.apply(frontend())
    conn = plane.dl.keepalive(VIP4)
    try:
        node = conn.get()["node"]
        plane.apply(frontend(weights={node: 0}), changed=["default/web"])
        for _ in range(3):
            assert conn.get()["node"] == node  # the established connection goes on
        seen = set(_spread(plane, frontend(weights={node: 0})).values())
        assert node not in seen and len(seen) == 2, seen
        assert conn.get()["node"] == node
    finally:
        conn.close()


def test_g_udp_datagrams_are_forwarded_and_answered(plane: Plane) -> None:
    f = frontend(protocol="UDP", port=53, node_port=DNS, service="kube-system/dns")
    plane.apply(f)
    seen: Counter[str] = Counter()
    for port in range(40300, 40324):
        result, body = plane.dl.udp(VIP4, 53, local_port=port)
        assert result == "answer" and body is not None and body["payload"] == "lab", (result, body)
        want = plane.predict(f, CLIENT[4], port)
        assert want is not None or not plane.predictable
        assert want is None or body["node"] == want.node
        seen[body["node"]] += 1
        again = plane.dl.udp(VIP4, 53, local_port=port)[1]
        assert again is not None and again["node"] == body["node"]
    assert len(seen) >= 2, seen


def test_h_ipv6_vip_to_ipv6_nodes(plane: Plane) -> None:
    plane.apply(frontend(family=6), frontend(family=6, port=8080, node_port=ALT, mode=model.ForwardingMode.NAT),
                frontend(family=6, protocol="UDP", port=53, node_port=DNS, nodes=()))
    seen = set(_spread(plane, frontend(family=6)).values())
    assert seen == set(NODES), seen
    r = plane.dl.curl(url(6))
    assert r.client_address == LB1_CLUSTER[6] and r.body is not None and r.body["port"] == 30080, r
    nat = plane.dl.curl(url(6, 8080))
    assert nat.client_address == CLIENT[6] and nat.body is not None and nat.body["port"] == ALT, nat
    assert plane.dl.udp(VIP6, 53) == ("refused", None)
    refused = plane.dl.curl(url(6, 8081))
    assert refused.code == 7, refused  # refused, not dropped (that would be curl's timeout, 28)


MARKER = """table inet labmark {
    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        ip saddr 192.0.2.130 ct state new meta mark set meta mark | 0x100000
    }
}
"""


def test_j_a_routing_mark_set_before_the_data_plane_survives_it(plane: Plane) -> None:
    """Someone else's mangle rule marks the first packet of the client's connections, and marked packets are routed
    by a table where node3 is unreachable: exactly the flows the data plane sends to node3 fail, so the mark
    went through the data plane's chains to the routing decision."""
    lab = plane.lab
    ratelimit = lab.exec("lb1", ["sysctl", "-n", "net.ipv4.icmp_ratelimit"]).stdout.strip()
    lab.exec("lb1", ["sysctl", "-q", "-w", "net.ipv4.icmp_ratelimit=0"])  # every refused flow fails at once
    lab.exec("lb1", ["nft", "-f", "-"], stdin=MARKER)
    lab.exec("lb1", ["ip", "rule", "add", "fwmark", "0x100000/0x100000", "table", "200", "priority", "100"])
    lab.exec("lb1", ["ip", "route", "add", "prohibit", f"{address('node3')}/32", "table", "200"])
    lab.exec("lb1", ["ip", "route", "add", "203.0.113.0/24", "dev", "cluster", "table", "200"])
    try:
        f = frontend()
        plane.apply(f)
        outcome = {}
        for port in PORTS:
            want = plane.predict(f, CLIENT[4], port)
            r = plane.dl.curl(url(4), local_port=port, timeout=1)
            outcome[port] = (r.node, want.node if want else None)
        failed = {port for port, (node, _) in outcome.items() if node is None}
        assert failed, outcome  # node3 took some flows, and they hit the marked route
        assert all(node in ("node1", "node2") for node, _ in outcome.values() if node is not None), outcome
        assert all(want == "node3" for port, (_, want) in outcome.items() if port in failed and want), outcome
        assert all(want != "node3" for port, (_, want) in outcome.items() if port not in failed), outcome
    finally:
        lab.exec("lb1", ["nft", "delete", "table", "inet", "labmark"], check=False)
        lab.exec("lb1", ["ip", "rule", "del", "priority", "100"], check=False)
        lab.exec("lb1", ["ip", "route", "flush", "table", "200"], check=False)
        lab.exec("lb1", ["sysctl", "-q", "-w", f"net.ipv4.icmp_ratelimit={ratelimit}"], check=False)
