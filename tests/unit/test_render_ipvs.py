"""The IPVS rendering: desired services, the diff with graceful removal, ownership, and the companion nft table."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections import Counter
from dataclasses import replace
from ipaddress import ip_address, ip_network

import pytest

from lbagent import model
from lbagent.l4.ipvs import apply as ipvs_apply
from lbagent.l4.ipvs import mh
from lbagent.l4.ipvs import render as ipvs
from lbagent.l4.ipvs.render import Attributes, Dest, DestKey, Op, OpKind, Service, ServiceKey
from lbagent.plan.services import Backend, Frontend

VIP = ip_address("198.51.100.80")
VIP6 = ip_address("2001:db8::80")
NODES = {"node1": "203.0.113.11", "node2": "203.0.113.12", "node3": "203.0.113.13"}
TCP, UDP = model.Protocol.TCP, model.Protocol.UDP


def frontend(
    port: int = 80, nodes: tuple[str, ...] = tuple(NODES), protocol: model.Protocol = TCP, scheduler: str = "rr",
    mode: model.ForwardingMode = model.ForwardingMode.NAT, affinity_timeout: int | None = None,
    source_ranges: tuple[model.IPNetwork, ...] = (), backends: tuple[Backend, ...] | None = None,
) -> Frontend:
    """A frontend on VIP:port whose nodes serve nodePort 30000 + port."""
    if backends is None:
        backends = tuple(Backend(n, ip_address(NODES[n])) for n in nodes)
    return Frontend(f"default/svc{port}", "http", VIP, protocol, port, backends, 30000 + port, mode=mode,
                    affinity_timeout=affinity_timeout, source_ranges=source_ranges, scheduler=scheduler)


def key(port: int = 80, protocol: model.Protocol = TCP, vip: model.IPAddress = VIP) -> ServiceKey:
    return ServiceKey(vip.version, protocol, vip, port)


def dest(node: str, port: int = 30080) -> DestKey:
    return DestKey(ip_address(NODES[node]), port)


def with_conns(
    state: ipvs.State, k: ServiceKey, node: str, active: int, inactive: int = 0
) -> dict[ServiceKey, Service]:
    """The state as the kernel would report it with these connection counts on one real server."""
    service = state[k]
    dests = dict(service.dests)
    dests[dest(node, k.port + 30000)] = replace(dests[dest(node, k.port + 30000)], active=active, inactive=inactive)
    return {**state, k: replace(service, dests=dests)}


def converge(actual: ipvs.State, want: ipvs.State) -> dict[ServiceKey, Service]:
    return ipvs.after(actual, ipvs.diff(actual, want))


# -- desired state ---------------------------------------------------------------------------------------------

def test_one_service_per_frontend_with_the_backends_taking_new_flows() -> None:
    draining = frontend(backends=(Backend("node1", ip_address(NODES["node1"]), 2),
                                  Backend("node2", ip_address(NODES["node2"]), 0)))
    want = ipvs.desired([draining, frontend(81, nodes=())])
    assert want[key()].dests == {dest("node1"): Dest(2)}
    assert want[key(81)].dests == {}  # no backend: the service drains and goes (see the diff tests)


@pytest.mark.parametrize(("scheduler", "affinity", "flags", "timeout"), [
    ("rr", None, 0, 0),
    ("wrr", 10800, ipvs.F_PERSISTENT, 10800),
    # mh: fallback past weight-0 nodes, and the source port hashed too unless there is affinity.
    ("mh", None, ipvs.F_SCHED1 | ipvs.F_SCHED2, 0),
    ("mh", 60, ipvs.F_PERSISTENT | ipvs.F_SCHED1, 60),
    ("sh", None, ipvs.F_SCHED1, 0),
    ("lc", 0, ipvs.F_PERSISTENT, 1),
])
def test_attributes_from_scheduler_and_affinity(scheduler: str, affinity: int | None, flags: int, timeout: int) -> None:
    attrs = ipvs.attributes(frontend(scheduler=scheduler, affinity_timeout=affinity))
    assert (attrs.scheduler, attrs.flags, attrs.timeout) == (scheduler, flags, timeout)
    assert attrs.netmask == "255.255.255.255"


def test_ipv6_service_key_and_netmask() -> None:
    f = Frontend("default/v6", "http", VIP6, TCP, 443, (Backend("node1", ip_address("2001:db8:1::11")),), 30443,
                 scheduler="rr")
    assert ipvs.key_of(f) == ServiceKey(6, TCP, VIP6, 443)
    # IPVS reads the IPv6 "netmask" as a prefix length; these bytes are 128 to the kernel.
    assert ipvs.attributes(f).netmask == "128.0.0.0"
    [op, add] = ipvs.diff({}, ipvs.desired([f]))
    assert str(op) == "add-service tcp/[2001:db8::80]:443 rr"
    assert str(add) == "add-dest tcp/[2001:db8::80]:443 [2001:db8:1::11]:30443 weight 1"


# -- diff ------------------------------------------------------------------------------------------------------

def test_from_nothing_services_then_their_real_servers_and_nothing_for_a_frontend_without_backends() -> None:
    ops = ipvs.diff({}, ipvs.desired([frontend(81), frontend(80), frontend(82, nodes=())]))
    assert [str(op) for op in ops] == [
        "add-service tcp/198.51.100.80:80 rr",
        *(f"add-dest tcp/198.51.100.80:80 {a}:30080 weight 1" for a in NODES.values()),
        "add-service tcp/198.51.100.80:81 rr",
        *(f"add-dest tcp/198.51.100.80:81 {a}:30081 weight 1" for a in NODES.values()),
    ]


def test_applying_the_ops_converges_and_a_second_diff_is_empty() -> None:
    want = ipvs.desired([frontend(80), frontend(53, protocol=UDP, scheduler="mh"), frontend(82, nodes=("node1",))])
    state = converge({}, want)
    assert state == want
    assert ipvs.diff(state, want) == []


def test_graceful_removal_weight_zero_then_deleted_once_connections_end() -> None:
    state = converge({}, ipvs.desired([frontend()]))
    state = with_conns(state, key(), "node2", active=2)
    want = ipvs.desired([frontend(nodes=("node1", "node3"))])

    ops = ipvs.diff(state, want)
    assert ops == [Op(OpKind.SET_DEST, key(), dest=dest("node2"), weight=0)]
    state = ipvs.after(state, ops)
    assert state[key()].dests[dest("node2")] == Dest(0, active=2)
    assert ipvs.draining(state, want) == {key()}
    assert ipvs.diff(state, want) == []  # established connections: nothing to do yet
    state = with_conns(state, key(), "node2", active=0, inactive=1)  # FIN_WAIT, TIME_WAIT, CLOSE count too
    assert ipvs.diff(state, want) == []
    state = with_conns(state, key(), "node2", active=0)

    ops = ipvs.diff(state, want)
    assert ops == [Op(OpKind.DEL_DEST, key(), dest=dest("node2"))]
    state = ipvs.after(state, ops)
    assert ipvs.diff(state, want) == []
    assert ipvs.draining(state, want) == set()


def test_a_leaving_server_goes_to_weight_zero_first_even_without_connections() -> None:
    """A connection could be scheduled to it between the dump and the deletion: weight 0 closes that window."""
    state = converge({}, ipvs.desired([frontend()]))
    want = ipvs.desired([frontend(nodes=("node1",))])
    first = ipvs.diff(state, want)
    assert {(op.kind, op.weight) for op in first} == {(OpKind.SET_DEST, 0)}
    second = ipvs.diff(ipvs.after(state, first), want)
    assert [op.kind for op in second] == [OpKind.DEL_DEST, OpKind.DEL_DEST]


def test_udp_real_servers_and_services_go_at_once() -> None:
    """UDP never ends a connection: waiting would keep a client that keeps sending on the leaving node."""
    state = converge({}, ipvs.desired([frontend(53, protocol=UDP)]))
    state = with_conns(state, key(53, UDP), "node2", active=0, inactive=5)
    assert ipvs.diff(state, ipvs.desired([frontend(53, protocol=UDP, nodes=("node1", "node3"))])) == [
        Op(OpKind.DEL_DEST, key(53, UDP), dest=dest("node2", 30053))
    ]
    assert ipvs.diff(state, ipvs.desired([frontend(53, protocol=UDP, nodes=())])) == [
        Op(OpKind.DEL_SERVICE, key(53, UDP))
    ]


def test_a_node_back_while_draining_gets_its_weight_back_and_new_ones_come_before_removals() -> None:
    state = converge({}, ipvs.desired([frontend(nodes=("node1", "node2"))]))
    state = ipvs.after(state, ipvs.diff(state, ipvs.desired([frontend(nodes=("node1",))])))
    state = with_conns(state, key(), "node2", active=1)
    ops = ipvs.diff(state, ipvs.desired([frontend(nodes=("node2", "node3"))]))
    assert [str(op) for op in ops] == [
        "add-dest tcp/198.51.100.80:80 203.0.113.13:30080 weight 1",
        "set-dest tcp/198.51.100.80:80 203.0.113.12:30080 weight 1",
        "set-dest tcp/198.51.100.80:80 203.0.113.11:30080 weight 0",
    ]


def test_weight_change_is_one_set_dest() -> None:
    state = converge({}, ipvs.desired([frontend(scheduler="wrr")]))
    heavier = frontend(scheduler="wrr")
    heavier = replace(heavier, backends=tuple(b._replace(weight=5) if b.node == "node3" else b
                                              for b in heavier.backends))
    assert ipvs.diff(state, ipvs.desired([heavier])) == [Op(OpKind.SET_DEST, key(), dest=dest("node3"), weight=5)]


def test_a_changed_real_server_forwarding_method_is_set_back_to_masquerading() -> None:
    state = converge({}, ipvs.desired([frontend()]))
    service = state[key()]
    tampered = {**service.dests, dest("node1"): Dest(1, fwd_method=3)}  # someone made it direct routing
    ops = ipvs.diff({key(): replace(service, dests=tampered)}, state)
    assert ops == [Op(OpKind.SET_DEST, key(), dest=dest("node1"), weight=1)]


def test_scheduler_and_persistence_change_in_place_without_touching_real_servers() -> None:
    state = converge({}, ipvs.desired([frontend(scheduler="rr")]))
    for changed in (frontend(scheduler="mh"), frontend(scheduler="rr", affinity_timeout=300)):
        ops = ipvs.diff(state, ipvs.desired([changed]))
        assert ops == [Op(OpKind.SET_SERVICE, key(), ipvs.attributes(changed))]
        assert ipvs.diff(ipvs.after(state, ops), ipvs.desired([changed])) == []


def test_a_frontend_that_is_gone_loses_its_service_at_once_even_with_connections() -> None:
    state = with_conns(converge({}, ipvs.desired([frontend(80), frontend(81)])), key(81), "node1", active=3)
    assert ipvs.diff(state, ipvs.desired([frontend(80)])) == [Op(OpKind.DEL_SERVICE, key(81))]


def test_a_frontend_left_without_backends_drains_then_loses_its_service() -> None:
    state = converge({}, ipvs.desired([frontend()]))
    state = with_conns(state, key(), "node3", active=1)
    want = ipvs.desired([frontend(nodes=())])
    ops = ipvs.diff(state, want)
    assert [(op.kind, op.weight) for op in ops] == [(OpKind.SET_DEST, 0)] * 3
    state = ipvs.after(state, ops)
    assert not state[key()].taking and ipvs.programmed(state) == set()
    ops = ipvs.diff(state, want)
    assert [str(op) for op in ops] == [
        "del-dest tcp/198.51.100.80:80 203.0.113.11:30080", "del-dest tcp/198.51.100.80:80 203.0.113.12:30080",
    ]
    state = with_conns(ipvs.after(state, ops), key(), "node3", active=0)
    assert ipvs.diff(state, want) == [Op(OpKind.DEL_SERVICE, key())]


def test_a_service_with_no_real_server_left_and_none_wanted_is_deleted() -> None:
    assert ipvs.diff({key(): Service(ipvs.attributes(frontend()))}, ipvs.desired([frontend(nodes=())])) == [
        Op(OpKind.DEL_SERVICE, key())
    ]


def test_ownership_configured_vips_and_the_record_only() -> None:
    foreign = ServiceKey(4, TCP, ip_address("198.51.100.99"), 80)
    stray = key(9999)
    old_vip = ServiceKey(4, UDP, ip_address("198.51.100.81"), 53)
    attrs = Attributes("rr")
    actual = {k: Service(attrs) for k in (foreign, stray, old_vip)} | converge({}, ipvs.desired([frontend()]))
    owned = ipvs.owns({VIP, VIP6}, {old_vip})
    assert not owned(foreign) and owned(stray) and owned(old_vip)
    ops = ipvs.diff(actual, ipvs.desired([frontend()]), owned)
    assert ops == [Op(OpKind.DEL_SERVICE, stray), Op(OpKind.DEL_SERVICE, old_vip)]


def test_draining_and_programmed() -> None:
    want = ipvs.desired([frontend(80), frontend(81, nodes=())])
    state = converge({}, ipvs.desired([frontend(80), frontend(81)]))
    state = ipvs.after(state, ipvs.diff(state, want))
    assert ipvs.draining(state, want) == {key(81)}
    assert ipvs.programmed(state) == {VIP}
    assert ipvs.programmed({}) == set()


# -- reading the kernel's answers ----------------------------------------------------------------------------------

class _Flags(dict[str, int]):
    """Like pyroute2's flags NLA: indexable by "flags"."""


def test_service_and_dest_from_dumped_attributes() -> None:
    svc = {
        "IPVS_SVC_ATTR_AF": 10, "IPVS_SVC_ATTR_PROTOCOL": 17, "IPVS_SVC_ATTR_ADDR": "2001:db8::80",
        "IPVS_SVC_ATTR_PORT": 53, "IPVS_SVC_ATTR_SCHED_NAME": "mh",
        "IPVS_SVC_ATTR_FLAGS": _Flags(flags=ipvs.F_SCHED1 | ipvs.F_HASHED, mask=0xFFFFFFFF),
        "IPVS_SVC_ATTR_TIMEOUT": 0, "IPVS_SVC_ATTR_NETMASK": "128.0.0.0",
    }
    assert ipvs.service_from_attrs(svc) == (
        ServiceKey(6, UDP, VIP6, 53), Attributes("mh", ipvs.F_SCHED1, 0, "128.0.0.0"))
    assert ipvs.service_from_attrs({**svc, "IPVS_SVC_ATTR_PROTOCOL": 132}) is None  # SCTP: never lbagent's
    assert ipvs.service_from_attrs({"IPVS_SVC_ATTR_AF": 2, "IPVS_SVC_ATTR_PROTOCOL": 6, "IPVS_SVC_ATTR_FWMARK": 7,
                                    "IPVS_SVC_ATTR_PORT": 0}) is None
    d = {
        "IPVS_DEST_ATTR_ADDR": "203.0.113.11", "IPVS_DEST_ATTR_PORT": 30080, "IPVS_DEST_ATTR_FWD_METHOD": 0,
        "IPVS_DEST_ATTR_WEIGHT": 0, "IPVS_DEST_ATTR_ACTIVE_CONNS": 2, "IPVS_DEST_ATTR_INACT_CONNS": 7,
    }
    assert ipvs.dest_from_attrs(d) == (dest("node1"), Dest(0, 0, 2, 7))
    assert Dest(0, 0, 2, 7).connections == 9


# As the guest's 6.1 kernel writes it (ipvsadm: an mh, a persistent UDP, an IPv6 with a direct-routing server, an
# SCTP and a fwmark service).
PROC_IP_VS = """\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  C6336450:0050 mh
  -> CB00710C:7580      Masq    0      4          17
  -> CB00710B:7580      Masq    1      0          0
UDP  C6336450:0035 rr  persistent 15000 FFFFFFFF
  -> CB00710D:7565      Masq    3      0          0
TCP  [2001:0db8:0000:0000:0000:0000:0000:0080]:01BB wrr
  -> [2001:0db8:0001:0000:0000:0000:0000:0012]:01BB      Route   1      0          0
  -> [2001:0db8:0001:0000:0000:0000:0000:0011]:76EB      Masq    2      0          0
SCTP  C6336450:0009 rr
FWM  00000007 rr
  -> CB00710E:0000      Route   1      0          0
TCP  C6336451:0050 rr
"""


def test_real_servers_and_connection_counts_from_proc() -> None:
    six = ServiceKey(6, TCP, VIP6, 443)
    assert ipvs.parse_proc(PROC_IP_VS) == {
        key(): {dest("node2"): Dest(0, 0, 4, 17), dest("node1"): Dest(1, 0, 0, 0)},
        key(53, UDP): {dest("node3", 30053): Dest(3)},
        six: {
            DestKey(ip_address("2001:db8:1::12"), 443): Dest(1, 3),
            DestKey(ip_address("2001:db8:1::11"), 30443): Dest(2),
        },
        ServiceKey(4, TCP, ip_address("198.51.100.81"), 80): {},
    }


def test_recorded_services_from_nft_json() -> None:
    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "inet", "name": "lbagent_ipvs"}},
        {"set": {"family": "inet", "name": "owned_v4", "table": "lbagent_ipvs",
                 "elem": [{"concat": ["198.51.100.80", "udp", 53]}, {"concat": ["198.51.100.80", "tcp", 80]}]}},
        {"set": {"family": "inet", "name": "owned_v6", "table": "lbagent_ipvs",
                 "elem": [{"concat": ["2001:db8::80", "tcp", 443]}]}},
        {"set": {"family": "inet", "name": "ranged_v4", "table": "lbagent_ipvs",
                 "elem": [{"concat": ["198.51.100.80", "tcp", 22]}]}},
        {"set": {"family": "inet", "name": "owned_v4", "table": "other",
                 "elem": [{"concat": ["192.0.2.1", "tcp", 1]}]}},
        {"set": {"family": "inet", "name": "owned_v6", "table": "lbagent_ipvs"}},
    ]}
    assert ipvs.recorded(json.dumps(listing), "lbagent_ipvs") == {
        key(53, UDP), key(80), ServiceKey(6, TCP, VIP6, 443)}


# -- the companion nftables table ----------------------------------------------------------------------------

def _companion() -> ipvs.Companion:
    fronts = [
        frontend(80, mode=model.ForwardingMode.MASQUERADE),
        frontend(22, source_ranges=(ip_network("192.0.2.0/25"), ip_network("2001:db8:c::/64"))),
        frontend(23, source_ranges=(ip_network("2001:db8:c::/64"),)),  # nobody of the VIP's family allowed
        frontend(53, protocol=UDP, nodes=(), mode=model.ForwardingMode.MASQUERADE),
    ]
    return ipvs.companion("lbagent_ipvs", fronts, [VIP, VIP6], [key(80), key(22), ServiceKey(6, TCP, VIP6, 443)])


def test_companion_content() -> None:
    c = _companion().elements
    assert c["vips_v4"] == {"198.51.100.80"} and c["vips_v6"] == {"2001:db8::80"}
    assert c["owned_v4"] == {"198.51.100.80 . tcp . 80", "198.51.100.80 . tcp . 22"}
    assert c["owned_v6"] == {"2001:db8::80 . tcp . 443"}
    # Masquerade is matched after IPVS: original destination the VIP, destination port now the nodePort.
    assert c["masquerade_v4"] == {"198.51.100.80 . tcp . 30080"}
    assert c["ranged_v4"] == {"198.51.100.80 . tcp . 22", "198.51.100.80 . tcp . 23"}
    assert c["allowed_v4"] == {"198.51.100.80 . tcp . 22 . 192.0.2.0/25"}
    assert c["ranged_v6"] == c["allowed_v6"] == frozenset()


def test_companion_delta_and_merge() -> None:
    old = _companion()
    new = ipvs.companion("lbagent_ipvs", [frontend(80)], [VIP], [key(80)])
    assert ipvs.render_companion_delta(old, old) == ""
    delta = ipvs.render_companion_delta(old, new)
    assert delta.splitlines() == [
        "delete element inet lbagent_ipvs vips_v6 { 2001:db8::80 }",
        "delete element inet lbagent_ipvs owned_v4 { 198.51.100.80 . tcp . 22 }",
        "delete element inet lbagent_ipvs owned_v6 { 2001:db8::80 . tcp . 443 }",
        "delete element inet lbagent_ipvs masquerade_v4 { 198.51.100.80 . tcp . 30080 }",
        "delete element inet lbagent_ipvs ranged_v4 { 198.51.100.80 . tcp . 22, 198.51.100.80 . tcp . 23 }",
        "delete element inet lbagent_ipvs allowed_v4 { 198.51.100.80 . tcp . 22 . 192.0.2.0/25 }",
    ]
    both = ipvs.merge(old, new)
    assert ipvs.render_companion_delta(old, both) == ""
    assert ipvs.render_companion_delta(new, both).count("add element") == 6


def test_rendered_companion_is_accepted_by_nft() -> None:
    """The full table and a delta on top of it, checked by the real nft (needs root: `make test` runs as root)."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    if not os.path.exists(nft):
        pytest.fail("nft is not installed: `make test` installs it (apt package nftables)")
    if os.geteuid() != 0:
        pytest.fail("nft -c needs root")
    old = _companion()
    new = ipvs.companion("lbagent_ipvs", [frontend(80)], [VIP], [key(80)])
    script = ipvs.render_companion(old) + ipvs.render_companion_delta(old, new)
    script += ipvs.render_companion_delta(new, old) + ipvs.render_companion_delete("lbagent_ipvs")
    result = subprocess.run([nft, "-c", "-f", "-"], input=script, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{result.stderr}\n{script}"


def test_op_text() -> None:
    assert str(Op(OpKind.DEL_SERVICE, key(53, UDP))) == "del-service udp/198.51.100.80:53"
    assert str(Op(OpKind.DEL_DEST, key(), dest=dest("node1"))) == "del-dest tcp/198.51.100.80:80 203.0.113.11:30080"


# -- the mh scheduler, reproduced (real IPVS checks it: tests/dataplane with DATAPLANE_KINDS=ipvs) ---------------

# lib/siphash_kunit.c, 64-bit kernels: hsiphash of bytes 0, 1, ..., i-1 under the key bytes 0..15.
HSIPHASH_KEY = (0x0706050403020100, 0x0F0E0D0C0B0A0908)
HSIPHASH_VECTORS = (0x050FC4DC, 0x7D57CA93, 0x4DC7D44D, 0xE7DDF7FB, 0x88D38328, 0x49533B67, 0xC59F22A7, 0x9BB11140,
                    0x8D299A8E, 0x6C063DE4, 0x92FF097F, 0xF94DC352, 0x57B4D9A2, 0x1229FFA7, 0xC0F95D34, 0x2A519956,
                    0x7D908B66, 0x63DBD80C)


def servers(*weights: int, last: tuple[int, ...] | None = None) -> tuple[mh.RealServer, ...]:
    return tuple(mh.RealServer(ip_address(f"203.0.113.{11 + i}"), 30080, w, (last or weights)[i])
                 for i, w in enumerate(weights))


def test_hsiphash_is_the_kernels() -> None:
    assert [mh.hsiphash(bytes(range(n)), HSIPHASH_KEY) for n in range(len(HSIPHASH_VECTORS))] == list(HSIPHASH_VECTORS)


def test_mh_table_fills_every_slot_in_proportion_to_the_weights() -> None:
    table = mh.lookup_table(servers(1, 1, 2))
    assert len(table) == 4093 and None not in table
    assert sorted(Counter(table).values()) == [1023, 1024, 2046]
    assert len(mh.lookup_table(servers(1, 1), 8)) == 251
    # The kernel scales weights down to at most 2^(index/2) turns per round (64 for the default 12): 100, 1, 50 take
    # 50, 1, 25 turns, and the weight-1 server gets twice its share.
    assert sorted(Counter(mh.lookup_table(servers(100, 1, 50))).values()) == [54, 1339, 2700]
    assert mh.lookup_table(servers(0, 0)) == (None,) * 4093
    with pytest.raises(ValueError, match="CONFIG_IP_VS_MH_TAB_INDEX must be 8-17"):
        mh.table_size(18)


def test_mh_table_depends_on_the_order_servers_were_added_in_a_few_slots() -> None:
    """Why `lbagent plan --flow` says its IPVS answer holds for a service as lbagent created it."""
    three = servers(1, 1, 1)
    first = [three[i] if i is not None else None for i in mh.lookup_table(three)]
    turned = three[1:] + three[:1]
    second = [turned[i] if i is not None else None for i in mh.lookup_table(turned)]
    moved = sum(a != b for a, b in zip(first, second, strict=True))
    assert 0 < moved < 20


def test_mh_a_draining_server_keeps_its_slots_and_fallback_hashes_its_flows_elsewhere() -> None:
    live, draining = servers(1, 1, 1), servers(1, 0, 1, last=(1, 1, 1))
    table = mh.lookup_table(draining)
    assert table == mh.lookup_table(live)  # filled by the last weight: nothing moves while it drains
    sources = [ip_address(f"192.0.2.{i}") for i in range(130, 250)]
    on_it = [s for s in sources if mh.schedule(live, table, s, None, fallback=False) == 1]
    assert on_it
    assert all(mh.schedule(draining, table, s, None, fallback=False) is None for s in on_it)
    assert {mh.schedule(draining, table, s, None, fallback=True) for s in on_it} <= {0, 2}
    others = [s for s in sources if s not in on_it]
    assert all(mh.schedule(draining, table, s, None, True) == mh.schedule(live, table, s, None, True) for s in others)


def test_mh_real_servers_are_listed_as_the_kernel_keeps_them_newest_first() -> None:
    f = replace(frontend(scheduler="mh"), backends=(
        Backend("node2", ip_address(NODES["node2"])), Backend("node1", ip_address(NODES["node1"]), 3),
        Backend("node3", ip_address(NODES["node3"]))))
    added = [op.dest for op in ipvs.diff({}, ipvs.desired([f])) if op.kind is OpKind.ADD_DEST]
    listed = ipvs.mh_servers(f)
    assert [DestKey(s.address, s.port) for s in listed] == list(reversed(added))
    assert [s.weight for s in listed] == [1, 1, 3]


def test_predict_hashes_the_port_unless_there_is_affinity() -> None:
    client = ip_address("192.0.2.130")
    f = frontend(scheduler="mh")
    spread = Counter(b.node for port in range(40000, 40300) if (b := ipvs.predict(f, client, port)) is not None)
    assert set(spread) == set(NODES) and min(spread.values()) > 60
    sticky = replace(f, affinity_timeout=10800)
    assert len({ipvs.predict(sticky, client, port) for port in range(40000, 40100)}) == 1
    six = replace(f, vip=VIP6, backends=tuple(Backend(n, ip_address(f"2001:db8:1::{i}"))
                                              for i, n in enumerate(NODES, 11)))
    chosen = [ipvs.predict(six, ip_address("2001:db8:c::5"), port) for port in range(40000, 40050)]
    assert {b.node for b in chosen if b is not None} == set(NODES)
    assert ipvs.predict(frontend(scheduler="mh", nodes=()), client, 1) is None
    with pytest.raises(ValueError, match="'rr' cannot be predicted"):
        ipvs.predict(frontend(scheduler="rr"), client, 40000)


# -- dsr: direct routing -----------------------------------------------------------------------------------------

DSR = model.ForwardingMode.DSR


def test_dsr_real_servers_are_the_nodes_at_the_frontends_port_by_direct_routing() -> None:
    f = frontend(81, scheduler="mh", mode=DSR, affinity_timeout=60)
    service = ipvs.desired([f])[key(81)]
    assert service.dests == {DestKey(ip_address(a), 81): Dest(1, ipvs.FWD_ROUTE) for a in NODES.values()}
    # The service itself is as in the other modes: scheduler, flags, persistence.
    assert service.attributes == ipvs.attributes(replace(f, mode=model.ForwardingMode.NAT))
    ops = ipvs.diff({}, ipvs.desired([f]))
    assert [str(op) for op in ops][:2] == [
        "add-service tcp/198.51.100.80:81 mh", "add-dest tcp/198.51.100.80:81 203.0.113.11:81 weight 1 route",
    ]
    assert {op.fwd_method for op in ops if op.kind is OpKind.ADD_DEST} == {ipvs.FWD_ROUTE}
    state = ipvs.after({}, ops)
    assert state == ipvs.desired([f]) and ipvs.diff(state, ipvs.desired([f])) == []


def test_dsr_weights_and_draining_keep_direct_routing() -> None:
    f = frontend(81, scheduler="mh", mode=DSR)
    state = converge({}, ipvs.desired([f]))
    heavier = replace(f, backends=tuple(b._replace(weight=4) if b.node == "node2" else b for b in f.backends))
    assert ipvs.diff(state, ipvs.desired([heavier])) == [
        Op(OpKind.SET_DEST, key(81), dest=DestKey(ip_address(NODES["node2"]), 81), weight=4,
           fwd_method=ipvs.FWD_ROUTE)]
    # A leaving node goes to weight 0 and keeps routing its established flows directly.
    without = replace(f, backends=f.backends[:2])
    assert ipvs.diff(state, ipvs.desired([without])) == [
        Op(OpKind.SET_DEST, key(81), dest=DestKey(ip_address(NODES["node3"]), 81), weight=0,
           fwd_method=ipvs.FWD_ROUTE)]


def test_switching_a_frontend_between_nat_and_dsr_replaces_its_real_servers_gracefully() -> None:
    nat = frontend(81, scheduler="mh")
    state = converge({}, ipvs.desired([nat]))
    ops = ipvs.diff(state, ipvs.desired([replace(nat, mode=DSR)]))
    assert [(op.kind, op.dest.port if op.dest else None, op.weight, op.fwd_method) for op in ops] == [
        *((OpKind.ADD_DEST, 81, 1, ipvs.FWD_ROUTE) for _ in NODES),
        *((OpKind.SET_DEST, 30081, 0, ipvs.FWD_MASQ) for _ in NODES),
    ]


def test_a_real_server_made_masquerading_behind_lbagents_back_is_set_back_to_direct_routing() -> None:
    f = frontend(81, mode=DSR)
    state = converge({}, ipvs.desired([f]))
    tampered = {**state[key(81)].dests, DestKey(ip_address(NODES["node1"]), 81): Dest(1, ipvs.FWD_MASQ)}
    assert ipvs.diff({key(81): replace(state[key(81)], dests=tampered)}, state) == [
        Op(OpKind.SET_DEST, key(81), dest=DestKey(ip_address(NODES["node1"]), 81), weight=1,
           fwd_method=ipvs.FWD_ROUTE)]


def test_dsr_nodes_not_on_link_are_left_out_and_named_other_modes_untouched() -> None:
    dsr, nat = frontend(81, mode=DSR), frontend(80)
    assert ipvs.dsr_addresses([dsr, nat]) == set(NODES.values())
    assert ipvs.dsr_addresses([nat]) == set()
    on_link = {NODES["node1"], NODES["node2"]}
    kept, left_out = ipvs.on_link_only([dsr, nat], on_link)
    assert left_out == {NODES["node3"]: "node3"}
    assert [b.node for b in kept[0].backends] == ["node1", "node2"] and kept[1] == nat
    assert set(ipvs.desired(kept)[key(81)].dests) == {DestKey(ip_address(a), 81) for a in on_link}
    assert ipvs.on_link_only([dsr], set(NODES.values())) == ([dsr], {})
    none, named = ipvs.on_link_only([dsr], set())
    assert none[0].backends == () and set(named.values()) == set(NODES)


def test_dsr_is_never_masqueraded_and_keeps_its_source_ranges() -> None:
    f = frontend(81, mode=DSR, source_ranges=(ip_network("192.0.2.0/25"),))
    c = ipvs.companion("lbagent_ipvs", [f], [VIP], [key(81)]).elements
    assert c["masquerade_v4"] == frozenset()
    assert c["ranged_v4"] == {"198.51.100.80 . tcp . 81"}
    assert c["allowed_v4"] == {"198.51.100.80 . tcp . 81 . 192.0.2.0/25"}


def test_predict_for_dsr_hashes_the_real_servers_at_the_frontends_port() -> None:
    """The kernel's mh hashes each real server's address and port: a dsr service (port 81) fills its table
    otherwise than a nat one (nodePort 30081), and predict follows the real servers lbagent creates."""
    dsr, nat = frontend(81, scheduler="mh", mode=DSR), frontend(81, scheduler="mh")
    assert {(s.address, s.port) for s in ipvs.mh_servers(dsr)} == {(ip_address(a), 81) for a in NODES.values()}
    client = ip_address("192.0.2.130")
    chosen = [ipvs.predict(dsr, client, port) for port in range(40000, 40200)]
    assert all(b is not None and b in dsr.backends for b in chosen)  # the frontend's own Backend is returned
    assert {b.node for b in chosen if b is not None} == set(NODES)
    differs = sum(ipvs.predict(nat, client, port) != b for port, b in zip(range(40000, 40200), chosen, strict=True))
    assert differs > 0


def test_the_forwarder_leaves_dsr_nodes_off_link_out_and_logs_them_when_that_changes(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """IpvsForwarder asks the kernel (on_link_paths, here a stand-in) only for dsr frontends' nodes, and logs
    `dsr_node_not_on_link` once per change of the set left out, not on every apply."""
    asked: list[set[str]] = []
    on_link = {NODES["node1"], NODES["node2"]}

    def paths(addresses: set[str], interfaces: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
        asked.append(set(addresses))
        return {a: "eth1" for a in addresses if a in on_link}, []

    monkeypatch.setattr(ipvs_apply, "on_link_paths", paths)
    forwarder = ipvs_apply.IpvsForwarder(model.Dataplane(kind=model.DataplaneKind.IPVS))
    dsr, nat = frontend(81, mode=DSR), frontend(80)
    caplog.set_level("INFO", logger="lbagent.dataplane")

    def events() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage() == "dsr_node_not_on_link"]

    assert asyncio.run(forwarder._on_link([nat])) == [nat] and asked == []
    kept = asyncio.run(forwarder._on_link([dsr, nat]))
    assert [b.node for b in kept[0].backends] == ["node1", "node2"] and kept[1] == nat
    assert asked == [set(NODES.values())] and len(events()) == 1
    assert vars(caplog.records[-1])["lbagent_fields"]["nodes"] == f"node3 {NODES['node3']}"
    asyncio.run(forwarder._on_link([dsr, nat]))
    assert len(events()) == 1  # the same set: not logged again
    on_link.add(NODES["node3"])
    assert asyncio.run(forwarder._on_link([dsr])) == [dsr] and len(events()) == 1
