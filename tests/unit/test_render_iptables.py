"""iptables rendering: golden files both restore variants accept, Maglev tries, deltas, and HMARK against the kernel."""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
import yaml

from lbagent import model
from lbagent.l4 import maglev
from lbagent.l4.iptables import render as iptables
from lbagent.l4.iptables.apply import IptablesError, run_tool, tool
from lbagent.l4.jhash import HASH_SEED
from lbagent.plan.services import Backend, Frontend, all_healthy, plan
from lbagent.sources.file import config
from tests import golden
from tests.dataplane.kernel import (
    ForwarderProcess,
    Netns,
    iptables_listing,
    lbagent_chains,
    parse_conntrack,
    require_root_and_tools,
)
from tests.unit.test_config import MINIMAL

VARIANTS = ("nft", "legacy")
SMALL = 31  # maglevTableSize of the golden files: tries short enough to read

NODES = [
    {"name": "node1", "addresses": ["203.0.113.11", "2001:db8:2::11"]},
    {"name": "node2", "addresses": ["203.0.113.12", "2001:db8:2::12"]},
    {"name": "node3", "addresses": ["203.0.113.13", "2001:db8:2::13"]},
]
WEB: dict[str, Any] = {"name": "web", "vip": "192.0.2.10",
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                                 {"name": "https", "port": 443, "nodePort": 30443}]}
DNS: dict[str, Any] = {"name": "dns", "namespace": "kube-system", "vip": "192.0.2.11",
                       "ports": [{"name": "dns", "protocol": "UDP", "port": 53, "nodePort": 30053}]}
WEB_DOWN = {("default/web", n) for n in ("node1", "node2", "node3")}

# name -> (changes to the web service, unhealthy (service, node) pairs)
SCENARIOS: dict[str, tuple[dict[str, Any], set[tuple[str, str]]]] = {
    "all-healthy": ({}, set()),
    "node-down": ({}, {("default/web", "node2")}),
    "all-down": ({}, WEB_DOWN),
    "nat-mode": ({"forwardingMode": "nat"}, set()),
    "affinity": ({"sessionAffinity": "ClientIP"}, set()),
    "source-ranges": ({"loadBalancerSourceRanges": ["198.51.100.0/24", "192.0.2.128/25", "2001:db8:c::/64"]}, set()),
    "dual-stack": ({"vips": ["192.0.2.10", "2001:db8::10"], "vip": None}, {("default/web", "node3")}),
}


def make_model(web: dict[str, Any] | None = None, size: int = SMALL, services: list[dict[str, Any]] | None = None,
               **dataplane: Any) -> model.Model:
    doc = yaml.safe_load(MINIMAL)
    service = {k: v for k, v in (WEB | (web or {})).items() if v is not None}
    doc |= {"nodes": NODES, "services": services if services is not None else [service, DNS],
            "dataplane": {"kind": "iptables", "maglevTableSize": size, **dataplane}}
    return config.parse(yaml.safe_dump(doc))


def scenario(name: str) -> tuple[model.Model, dict[tuple[str, str], bool]]:
    web, unhealthy = SCENARIOS[name]
    m = make_model(web)
    return m, {k: k not in unhealthy for k in all_healthy(m)}


def rendered(name: str) -> dict[int, str]:
    m, health = scenario(name)
    p = plan(m, health)
    rs = iptables.build(p.frontends, p.vips, m.dataplane)
    return {v: iptables.render_full(rs, v) for v in sorted(rs.families())}


def _restore_test(text: str, family: int) -> None:
    """Both restore variants parse the input (--test commits nothing; the legacy one also resolves jumps)."""
    require_root_and_tools()
    for variant in VARIANTS:
        result = subprocess.run([tool(family, variant, "restore"), "--test", "--noflush"], input=text,
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{variant}: {result.stderr}"


@pytest.fixture
def netns() -> Iterator[Netns]:
    require_root_and_tools()
    with Netns("ipt") as ns:
        yield ns


# -- golden files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden_files_are_accepted_by_both_variants_and_the_kernel(name: str, netns: Netns) -> None:
    texts = rendered(name)
    assert set(texts) == ({4, 6} if name == "dual-stack" else {4})
    for family, text in texts.items():
        golden.check("iptables", f"{name}.v{family}.rules", text)
        _restore_test(text, family)
        # --test stops before the kernel: apply for real, list, and clean up again, with both variants
        for variant in VARIANTS:
            netns.exec([tool(family, variant, "restore"), "--noflush"], text)
            chains = lbagent_chains(iptables_listing(netns, family, variant))
            assert "nat LBAGENT-DISPATCH" in chains and "filter LBAGENT-INPUT" in chains, chains
            assert chains["nat PREROUTING"] == ["-j LBAGENT-DISPATCH"]
            existing = iptables.parse_save(netns.exec([tool(family, variant, "save")]).stdout)
            netns.exec([tool(family, variant, "restore"), "--noflush"], iptables.render_cleanup(existing))
            assert lbagent_chains(iptables_listing(netns, family, variant)) == {}


def test_golden_scenarios_show_what_they_are_named_for() -> None:
    healthy, down, all_down = rendered("all-healthy")[4], rendered("node-down")[4], rendered("all-down")[4]
    assert "203.0.113.12:30080" in healthy and "203.0.113.12:30080" not in down
    assert "30080" not in all_down and "30443" not in all_down and "203.0.113.12:30053" in all_down
    assert "--set-xmark 0x0/0x200000" in rendered("nat-mode")[4]
    assert "--hmark-tuple src " in rendered("affinity")[4] and "--hmark-tuple src,sport" in rendered("affinity")[4]
    ranges = rendered("source-ranges")[4]
    assert "-s 198.51.100.0/24 -j RETURN" in ranges and "2001:db8:c::/64" not in ranges
    dual = rendered("dual-stack")
    assert "[2001:db8:2::11]:30080" in dual[6] and "[2001:db8:2::13]" not in dual[6]
    assert "--reject-with icmp6-port-unreachable" in dual[6]


def test_render_is_deterministic_whatever_the_input_order() -> None:
    m, health = scenario("dual-stack")
    p = plan(m, health)
    forward = iptables.build(p.frontends, p.vips, m.dataplane)
    backward = iptables.build(tuple(reversed(p.frontends)), tuple(reversed(p.vips)), m.dataplane)
    assert all(iptables.render_full(forward, v) == iptables.render_full(backward, v) for v in (4, 6))


def test_full_size_tables_are_accepted_and_counted(netns: Netns) -> None:
    counts = {}
    for n in (3, 20):
        backends = tuple(Backend(f"node{i}", ip_address(f"203.0.113.{100 + i}")) for i in range(n))
        web = Frontend("default/web", "http", ip_address("192.0.2.10"), model.Protocol.TCP, 80, backends, 30080)
        rs = iptables.build([web], [web.vip], model.Dataplane(kind=model.DataplaneKind.IPTABLES))
        trie = iptables.trie(tuple((b.node, b.weight) for b in backends), 1021)
        counts[n] = (len(trie.chains), sum(len(r) for _, r in trie.chains), rs.rule_count(4), rs.chain_count(4))
        text = iptables.render_full(rs, 4)
        _restore_test(text, 4)
        for variant in VARIANTS:
            netns.exec([tool(4, variant, "restore"), "--noflush"], text)
    print(f"\ntrie chains, trie rules, all rules, all chains for one frontend of 1021 slots: {counts}")
    for trie_chains, trie_rules, _, _ in counts.values():
        assert trie_chains <= 256 and trie_rules <= 1300


# -- tries and prediction (pure) ----------------------------------------------------------------------

_TRIE_RULE = re.compile(r"^(?:-m mark --mark (0x[0-9a-f]+)/(0x[0-9a-f]+) )?(?:-g (\S+)|-j CONNMARK --set-xmark "
                        r"(0x[0-9a-f]+)/(0x[0-9a-f]+))$")


Parsed = dict[str, list[tuple[int, int, str | None, int]]]  # chain -> (value, mask, goto, index) per rule


def parse_trie(t: iptables.Trie, field: int) -> Parsed:
    parsed: Parsed = {}
    for chain, rules in t.chains:
        parsed[chain] = []
        for rule in rules:
            m = _TRIE_RULE.match(rule)
            assert m, rule
            value, mask, goto, index, written_field = m.groups()
            assert goto or int(written_field, 16) == field, rule
            parsed[chain].append((int(value or "0", 16), int(mask or "0", 16), goto, int(index or "0", 16)))
    return parsed


def walk(chains: Parsed, root: str, slot: int) -> tuple[list[int], int]:
    """Run the trie's rules on a packet mark like the kernel would: the indices written and the rules tried."""
    chain, written, tried = root, [], 0
    while True:
        for value, mask, goto, index in chains[chain]:
            tried += 1
            if slot & mask != value:
                continue
            if goto:
                chain = goto
                break
            written.append(index)
        else:
            return written, tried


@pytest.mark.parametrize(("nodes", "size"), [
    (3, 1021), (20, 1021), (2, 7), (4, 31), (1, 1021), (5, 65521),
])
def test_trie_walk_gives_the_maglev_table_for_every_slot(nodes: int, size: int) -> None:
    weights = tuple((f"node{i}", 3 if i == 1 else 1) for i in range(1, nodes + 1))
    t = iptables.trie(weights, size)
    table = maglev.table(list(weights), size)
    worst = 0
    parsed = parse_trie(t, (1 << (size - 1).bit_length()) - 1)
    for slot in range(size):
        written, tried = walk(parsed, t.root, slot)
        assert written == [table[slot]], slot
        worst = max(worst, tried)
    width = (size - 1).bit_length()
    assert worst <= 2 * width + iptables.FLAT  # bounded work per new connection, whatever the table


@pytest.mark.parametrize("family", [4, 6])
def test_dispatch_is_a_trie_over_the_vips(family: int) -> None:
    """Every frontend is reached from LBAGENT-DISPATCH by its VIP in a bounded number of rules, and an address
    that is no VIP reaches no frontend rule."""
    rng = random.Random(7)
    if family == 4:
        vips = [ip_address(f"{net}.{i}") for net in ("192.0.2", "198.51.100", "203.0.113") for i in range(1, 255)]
    else:
        vips = sorted({ip_address(0x20010DB8 << 96 | rng.getrandbits(64)) for _ in range(1000)})
    backends = (Backend("node1", ip_address("203.0.113.11" if family == 4 else "2001:db8:2::11")),)
    frontends = [Frontend(f"ns/s{i}", "p", vip, model.Protocol.TCP, port, backends, 30080)
                 for i, vip in enumerate(vips) for port in (80, 443)]
    rs = iptables.build(frontends, vips, model.Dataplane())
    chains = rs.chains[family]["nat"]
    levels = (len(vips) - 1).bit_length()

    def reach(address: model.IPAddress) -> tuple[list[str], int]:
        chain, tried, hits = iptables.DISPATCH, 0, []
        while True:
            for rule in chains[chain]:
                tried += 1
                net = ip_network(rule.split()[1])
                if address not in net:
                    continue
                if " -g " in rule:
                    chain = rule.split(" -g ")[1]
                    break
                hits.append(rule)
            else:
                return hits, tried

    for vip in vips:
        hits, tried = reach(vip)
        assert [h.split("--dport ")[1].split()[0] for h in hits] == ["80", "443"], (vip, hits)
        assert tried <= 2 * levels + 2 * iptables.FLAT, (vip, tried)
    outside = ip_address("192.0.2.0" if family == 4 else "2001:db8:ffff::1")
    assert reach(outside)[0] == []
    assert sum(1 for c in chains if c.startswith("LBAGENT-D")) < len(vips) / 2


def longest_path(chains: dict[str, iptables.Rules], start: str) -> int:
    """How many chains deep a packet can go from `start` (counted as 1), following -j and -g."""
    memo: dict[str, int] = {}

    def depth(chain: str) -> int:
        if chain not in memo:
            targets = [r.split()[r.split().index(flag) + 1] for r in chains[chain] for flag in ("-j", "-g")
                       if flag in r.split() and r.split()[r.split().index(flag) + 1] in chains]
            memo[chain] = 1 + max((depth(t) for t in targets), default=0)
        return memo[chain]

    return depth(start)


@pytest.mark.parametrize(("family", "vips", "size"), [
    (4, 762, 1021), (4, 762, 65521), (6, 20000, 1021), (6, 20000, 65521), (6, 3, 65521),
])
def test_no_path_goes_deeper_than_nf_tables_allows(family: int, vips: int, size: int) -> None:
    rng = random.Random(vips)
    if family == 4:
        addresses = [ip_address(f"{net}.{i}") for net in ("192.0.2", "198.51.100", "203.0.113") for i in range(1, 255)]
    else:
        addresses = sorted({ip_address(0x20010DB8 << 96 | rng.getrandbits(80)) for _ in range(vips)})
    nodes = [Backend(f"node{i}", ip_address(f"203.0.113.{10 + i}" if family == 4 else f"2001:db8:2::{10 + i}"))
             for i in range(3)]
    frontends = [Frontend(f"ns/s{i}", "p", a, model.Protocol.TCP, 80, tuple(nodes), 30080)
                 for i, a in enumerate(addresses)]
    rs = iptables.build(frontends, addresses, model.Dataplane(maglev_table_size=size))
    nat = rs.chains[family]["nat"]
    assert longest_path(nat, iptables.DISPATCH) <= iptables.MAX_DEPTH
    trie_root = next(iter(rs.tries))[1]
    assert longest_path(nat, trie_root) <= iptables.trie_depth_bound(size)
    assert len(nat[iptables.DISPATCH]) <= 256  # a trie, not one rule per frontend


@pytest.mark.parametrize(("chains", "accepted"), [(iptables.MAX_DEPTH, True), (iptables.MAX_DEPTH + 1, False)])
def test_nf_tables_jump_depth_limit_is_what_the_renderer_assumes(chains: int, accepted: bool, netns: Netns) -> None:
    """The kernel refuses chains that jump or go deeper than MAX_DEPTH below a built-in chain (EMLINK)."""
    lines = ["*nat", *(f":LBAGENT-Z{i} - [0:0]" for i in range(1, chains + 1)), "-A PREROUTING -j LBAGENT-Z1"]
    lines += [f"-A LBAGENT-Z{i} -g LBAGENT-Z{i + 1}" for i in range(1, chains)]
    lines += [f"-A LBAGENT-Z{chains} -p tcp -j DNAT --to-destination 203.0.113.1:80", "COMMIT", ""]
    result = netns.exec([tool(4, "nft", "restore")], "\n".join(lines), check=False)
    assert (result.returncode == 0) == accepted, result.stderr
    if not accepted:
        assert "Too many links" in result.stderr


def test_layout_refuses_a_masquerade_bit_inside_the_slot_field() -> None:
    with pytest.raises(iptables.RenderError, match="overlaps"):
        iptables.layout(model.Dataplane(masquerade_mark=0x200, maglev_table_size=1021))
    lay = iptables.layout(model.Dataplane(masquerade_mark=0x400, maglev_table_size=1021))
    assert (lay.field, lay.keep) == (0x3FF, 0xFFFFF800)


def test_predict_follows_the_table_and_ignores_the_port_with_affinity() -> None:
    m, health = scenario("affinity")
    p = plan(m, health)
    web = next(f for f in p.frontends if f.port == 80)
    sticky = {iptables.predict(web, ip_address("192.0.2.130"), sport, SMALL) for sport in range(40000, 40100)}
    assert len(sticky) == 1
    m, health = scenario("all-healthy")
    web = next(f for f in plan(m, health).frontends if f.port == 80)
    spread = Counter(b.node for s in range(40000, 40300) if (b := iptables.predict(web, ip_address("192.0.2.130"),
                                                                                      s, SMALL)))
    assert set(spread) == {"node1", "node2", "node3"}
    single = Frontend("x", "p", web.vip, web.protocol, 80, web.backends[:1], web.node_port)
    assert iptables.predict(single, ip_address("192.0.2.130"), 1, SMALL) == web.backends[0]
    assert iptables.predict(Frontend("x", "p", web.vip, web.protocol, 80, (), 0), ip_address("192.0.2.130"), 1,
                            SMALL) is None


# -- save parsing, jumps, deltas (pure) ---------------------------------------------------------------

SAVED = """# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:LBAGENT-DISPATCH - [0:0]
:LBAGENT-F000000000000 - [0:0]
:OTHER - [0:0]
-A PREROUTING -j LBAGENT-DISPATCH
-A PREROUTING -j LBAGENT-DISPATCH
-A PREROUTING -j LBAGENT-OLD
-A PREROUTING -s 198.51.100.7/32 -j LBAGENT-DISPATCH
-A OTHER -j LBAGENT-DISPATCH
COMMIT
*filter
:INPUT ACCEPT [0:0]
COMMIT
"""


def test_parse_save_and_full_render_put_jumps_and_stale_chains_right() -> None:
    existing = iptables.parse_save(SAVED)
    assert existing.chains["nat"] == {"LBAGENT-DISPATCH", "LBAGENT-F000000000000"}
    # only bare jumps in built-in chains are lbagent's: a rule with a match, or in another chain, is not
    assert Counter(existing.jumps["nat"]) == {("PREROUTING", "LBAGENT-DISPATCH"): 2, ("PREROUTING", "LBAGENT-OLD"): 1}
    rs = iptables.build([], [ip_address("192.0.2.10")], model.Dataplane(kind=model.DataplaneKind.IPTABLES))
    text = iptables.render_full(rs, 4, existing)
    nat = text.split("*nat\n")[1].split("COMMIT")[0].splitlines()
    assert ":LBAGENT-F000000000000 - [0:0]" in nat and nat[-1] == "-X LBAGENT-F000000000000"
    assert nat.count("-D PREROUTING -j LBAGENT-DISPATCH") == 1 and "-D PREROUTING -j LBAGENT-OLD" in nat
    assert "-I OUTPUT 1 -j LBAGENT-DISPATCH" in nat and "-I PREROUTING 1 -j LBAGENT-DISPATCH" not in nat
    assert "-I INPUT 1 -j LBAGENT-INPUT" in text and "-I PREROUTING 1 -j LBAGENT-SOURCES" in text
    cleanup = iptables.render_cleanup(existing)
    assert "-D PREROUTING -j LBAGENT-DISPATCH\n-D PREROUTING -j LBAGENT-DISPATCH\n" in cleanup
    assert "*filter" not in cleanup and "-X LBAGENT-DISPATCH" in cleanup
    assert iptables.render_cleanup(iptables.Existing()) == ""


def test_update_in_place_matches_a_fresh_build_and_touches_only_what_changed() -> None:
    m = make_model(size=1021)
    healthy = all_healthy(m)
    first = plan(m, healthy)
    rs = iptables.build(first.frontends, first.vips, m.dataplane)
    down = plan(m, healthy | {("default/web", "node2"): False})
    changes = iptables.update(rs, first.by_service["default/web"], down.by_service["default/web"])
    assert changes is not None and set(changes) == {4}
    fresh = iptables.build(down.frontends, down.vips, m.dataplane)
    assert rs.chains == fresh.chains and iptables.diff(rs, fresh) == {}
    nat = changes[4]["nat"]
    # web's two chains are refilled; the new two-node trie arrives; the old trie stays for dns
    frontend_chains = {c for c in nat if c.startswith("LBAGENT-F")}
    assert len(frontend_chains) == 2 and all(nat[c] for c in frontend_chains)
    assert set(changes[4]) == {"nat"} and "LBAGENT-DISPATCH" not in nat
    assert all(rules is not None for rules in nat.values())
    # a changed set of frontends is not an update: the caller rebuilds
    assert iptables.update(rs, down.by_service["default/web"], down.by_service["default/web"][:1]) is None


# -- against the kernel -------------------------------------------------------------------------------

HMARK_PROBE = r"""
import socket, sys
sources, count = sys.argv[1].split(","), int(sys.argv[2])
listeners = []
for vip, family in (("192.0.2.201", socket.AF_INET), ("2001:db8::201", socket.AF_INET6)):
    s = socket.socket(family)
    s.bind((vip, 80))
    s.listen(1024)
    listeners.append(s)
keep = []
for source in sources:
    six = ":" in source
    for sport in range(40000, 40000 + count):
        c = socket.socket(socket.AF_INET6 if six else socket.AF_INET)
        c.bind((source, sport))
        c.connect(("2001:db8::201" if six else "192.0.2.201", 80))
        keep.append(c)
        u = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM)
        u.bind((source, sport))
        u.sendto(b"x", ("2001:db8::201" if six else "192.0.2.201", 53))
        u.close()
print(len(keep))
"""
SOURCES = ("192.0.2.200", "192.0.2.77", "2001:db8:c::200", "2001:db8:c::7:1")


def _add_local(ns: Netns, addresses: tuple[str, ...]) -> None:
    for a in addresses:
        ns.exec(["ip", "addr", "add", f"{a}/{128 if ':' in a else 32}", "dev", "lo", *(["nodad"] if ":" in a else [])])


@pytest.mark.parametrize("variant", VARIANTS)
def test_hmark_slot_is_the_kernels_mark(variant: str, netns: Netns) -> None:
    """HMARK with lbagent's parameters sets the mark, CONNMARK keeps it on the connection; conntrack -L shows
    it for TCP connections to a listener (hash of address and port) and UDP datagrams (address only, with an
    offset), both families."""
    _add_local(netns, ("192.0.2.201", "2001:db8::201", *SOURCES))
    for family, vip in ((4, "192.0.2.201/32"), (6, "2001:db8::201/128")):
        rules = "\n".join([
            "*mangle",
            f"-A OUTPUT -d {vip} -p tcp --dport 80 -j HMARK --hmark-tuple src,sport --hmark-mod 1021 "
            f"--hmark-rnd {HASH_SEED:#x}",
            f"-A OUTPUT -d {vip} -p udp --dport 53 -j HMARK --hmark-tuple src --hmark-mod 1021 "
            f"--hmark-rnd {HASH_SEED:#x} --hmark-offset 7",
            f"-A OUTPUT -d {vip} -j CONNMARK --save-mark",
            "COMMIT", ""])
        netns.exec([tool(family, variant, "restore")], rules)
    count = 150
    netns.exec(["python3", "-c", HMARK_PROBE, ",".join(SOURCES), str(count)])
    flows = [f for f in parse_conntrack(netns.exec(["conntrack", "-L"]).stdout)
             if f.destination in ("192.0.2.201", "2001:db8::201")]
    assert len(flows) == 2 * count * len(SOURCES)
    wrong = []
    for f in flows:
        source = ip_address(f.source)
        want = iptables.hmark_slot(source, f.source_port, 1021) if f.protocol == "tcp" else \
            iptables.hmark_slot(source, None, 1021, offset=7)
        if f.mark != want:
            wrong.append((f, want))
    assert wrong == []
    assert len({f.mark for f in flows if f.protocol == "tcp"}) > 200  # the marks really spread


E2E_CLIENT = r"""
import socket, sys
keep = []
for spec in sys.argv[1:]:
    source, sport, vip, port, proto = spec.split(",")
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # one source port, several frontends
    s.bind((source, int(sport)))
    keep.append(s)
    if proto == "tcp":
        s.connect((vip, int(port)))
    else:
        s.sendto(b"x", (vip, int(port)))
print("ok")
"""


@pytest.mark.parametrize("kind", ["iptables", "iptables-legacy", "nftables"])
def test_the_kernel_sends_each_flow_where_predict_says(kind: str, netns: Netns) -> None:
    """The whole ruleset in a namespace: connections a local process opens to the VIPs are DNATed in nat
    OUTPUT; the backend each conntrack entry was sent to is predict()'s, flow by flow; the conntrack mark's
    field holds the node's index (iptables)."""
    m = make_model({"vips": ["192.0.2.10", "2001:db8::10"], "vip": None}, size=1021)
    m_aff = make_model({"vips": ["192.0.2.10", "2001:db8::10"], "vip": None, "sessionAffinity": "ClientIP"},
                       size=1021)
    p, p_aff = plan(m, all_healthy(m)), plan(m_aff, all_healthy(m_aff))
    frontends = [f for f in p.frontends if f.port == 80 or f.protocol is model.Protocol.UDP]
    frontends += [Frontend(f.service + "-sticky", f.port_name, f.vip, f.protocol, 81, f.backends, f.node_port,
                           affinity_timeout=f.affinity_timeout) for f in p_aff.frontends if f.port == 80]
    _add_local(netns, ("192.0.2.10", "192.0.2.11", "2001:db8::10", *SOURCES,
                       *(a for n in NODES for a in n["addresses"])))
    listener = ["python3", "-c", "import socket,time\ns=socket.socket(socket.AF_INET6)\n"
                "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\ns.bind(('::', 30080))\n"
                "s.listen(4096)\nprint('ready', flush=True)\ntime.sleep(3600)"]
    server = subprocess.Popen(["ip", "netns", "exec", netns.name, *listener], stdout=subprocess.PIPE, text=True)
    fwd = ForwarderProcess(netns.name, kind)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        answer = fwd.apply(frontends, p.vips)
        assert answer["how"] == "full" and set(answer["programmed"]) == {"192.0.2.10", "192.0.2.11", "2001:db8::10"}
        specs = []
        for f in frontends:
            for source in SOURCES:
                if (":" in source) == (f.vip.version == 6):
                    specs += [f"{source},{sport},{f.vip},{f.port},{f.protocol.value.lower()}"
                              for sport in range(41000, 41060)]
        netns.exec(["python3", "-c", E2E_CLIENT, *specs])
        flows = {(f.protocol, f.source, f.source_port, f.destination, f.destination_port): f
                 for f in parse_conntrack(netns.exec(["conntrack", "-L"]).stdout)}
        wrong: list[tuple[str, str, object]] = []
        chosen = Counter[tuple[str, int]]()
        for f in frontends:
            for spec in specs:
                source, sport, vip, port, proto = spec.split(",")
                if (vip, int(port), proto) != (str(f.vip), f.port, f.protocol.value.lower()):
                    continue
                flow = flows[(proto, source, int(sport), vip, int(port))]
                want = iptables.predict(f, ip_address(source), int(sport), 1021) if kind != "nftables" else \
                    _nft_predict(f, source, int(sport))
                assert want is not None
                chosen[(str(f.vip), f.port)] += 1
                if flow.reply_source != str(want.address) or flow.reply_source_port != f.node_port:
                    wrong.append((spec, flow.reply_source, str(want.address)))
                elif kind != "nftables" and flow.mark & 0x3FF != f.active.index(want):
                    wrong.append((spec, "mark", flow.mark))
        assert wrong == []
        assert sum(chosen.values()) == len(specs)
    finally:
        fwd.close()
        server.kill()
        server.wait()


def _nft_predict(f: Frontend, source: str, sport: int) -> Backend | None:
    from lbagent.l4.nftables import render as nftables  # noqa: PLC0415 - only this comparison needs it

    return nftables.predict(f, ip_address(source), sport, 1021)


@pytest.mark.parametrize("variant", VARIANTS)
def test_deltas_and_updates_leave_the_kernel_as_a_full_apply_would(variant: str, netns: Netns) -> None:
    """One forwarder goes through health changes (in-place updates), a config change (a delta), a resync and a
    family going away; another applies each state whole in a second namespace: the listings are equal."""
    kind = "iptables" if variant == "nft" else "iptables-legacy"
    m = make_model({"vips": ["192.0.2.10", "2001:db8::10"], "vip": None}, size=1021)
    healthy = all_healthy(m)
    changed_model = make_model({"vips": ["192.0.2.10", "2001:db8::10"], "vip": None,
                                "loadBalancerSourceRanges": ["192.0.2.128/25"],
                                "ports": [{"name": "http", "port": 80, "nodePort": 31080}]}, size=1021)
    v4_only = make_model({}, size=1021)
    steps: list[tuple[model.Model, dict[tuple[str, str], bool], list[str] | None, bool, str]] = [
        (m, healthy, None, False, "full"),
        (m, healthy | {("default/web", "node2"): False}, ["default/web"], False, "delta"),
        (m, {k: False for k in healthy}, ["default/web", "kube-system/dns"], False, "delta"),
        (m, {k: False for k in healthy}, ["default/web"], False, "unchanged"),
        (m, healthy, ["default/web", "kube-system/dns"], False, "delta"),
        (changed_model, healthy, None, False, "delta"),
        (changed_model, healthy, None, True, "full"),
        (v4_only, healthy, None, False, "full"),
    ]
    with Netns("ipu") as fresh_ns:
        grown, fresh = ForwarderProcess(netns.name, kind), ForwarderProcess(fresh_ns.name, kind)
        try:
            for i, (model_, health, changed, force, how) in enumerate(steps):
                p = plan(model_, health)
                answer = grown.apply(p.frontends, p.vips, force=force, changed=changed)
                assert answer["how"] == how, (i, answer)
                fresh.apply(p.frontends, p.vips, force=True)
                for family in (4, 6):
                    assert lbagent_chains(iptables_listing(netns, family, variant)) == \
                        lbagent_chains(iptables_listing(fresh_ns, family, variant)), (i, family)
                assert set(answer["programmed"]) == {str(v) for v in p.vips if any(
                    f.vip == v and f.active for f in p.frontends)}
            assert lbagent_chains(iptables_listing(netns, 6, variant)) == {}  # the IPv6 VIP went away
            grown.cleanup()
            for family in (4, 6):
                assert lbagent_chains(iptables_listing(netns, family, variant)) == {}
        finally:
            grown.close()
            fresh.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_apply_repairs_jumps_and_removes_chains_left_behind(variant: str, netns: Netns) -> None:
    kind = "iptables" if variant == "nft" else "iptables-legacy"
    netns.exec([tool(4, variant, "restore"), "--noflush"], "\n".join([
        "*nat", ":LBAGENT-OLD - [0:0]", ":LBAGENT-DISPATCH - [0:0]", "-A LBAGENT-OLD -j RETURN",
        "-A PREROUTING -s 198.51.100.99/32 -j RETURN", "-A PREROUTING -j LBAGENT-OLD",
        "-A PREROUTING -j LBAGENT-DISPATCH", "-A PREROUTING -j LBAGENT-DISPATCH", "COMMIT",
        "*filter", "-A INPUT -s 198.51.100.99/32 -j ACCEPT", "COMMIT", ""]))
    m = make_model(size=1021)
    p = plan(m, all_healthy(m))
    fwd = ForwarderProcess(netns.name, kind)
    try:
        assert fwd.apply(p.frontends, p.vips)["how"] == "full"
        listing = iptables_listing(netns, 4, variant)
        assert "LBAGENT-OLD" not in listing["nat"]
        assert listing["nat"]["PREROUTING"] == ["-s 198.51.100.99/32 -j RETURN", "-j LBAGENT-DISPATCH"]
        assert listing["filter"]["INPUT"] == ["-j LBAGENT-INPUT", "-s 198.51.100.99/32 -j ACCEPT"]
        assert listing["mangle"]["PREROUTING"] == ["-j LBAGENT-SOURCES"]
        # someone flushes the built-in chain: the next resync puts the jump back, first
        netns.exec(["iptables-" + variant, "-t", "nat", "-F", "OUTPUT"])
        netns.exec(["iptables-" + variant, "-t", "nat", "-A", "OUTPUT", "-o", "lo", "-j", "RETURN"])
        assert fwd.apply(p.frontends, p.vips)["how"] == "unchanged"
        assert fwd.apply(p.frontends, p.vips, force=True)["how"] == "full"
        assert iptables_listing(netns, 4, variant)["nat"]["OUTPUT"] == ["-j LBAGENT-DISPATCH", "-o lo -j RETURN"]
        fwd.cleanup()
        listing = iptables_listing(netns, 4, variant)
        assert lbagent_chains(listing) == {}
        assert listing["filter"]["INPUT"] == ["-s 198.51.100.99/32 -j ACCEPT"]
    finally:
        fwd.close()


def test_a_refused_restore_raises_with_the_tools_message_and_the_line() -> None:
    require_root_and_tools()
    bad = "*nat\n:LBAGENT-X - [0:0]\n-A LBAGENT-X -j HMARK --hmark-tuple src --hmark-mod 0 --hmark-rnd 0x1\nCOMMIT\n"
    for variant in VARIANTS:
        with pytest.raises(IptablesError) as info:
            asyncio.run(run_tool([tool(4, variant, "restore"), "--test", "--noflush"], bad))
        message = str(info.value)
        assert "--hmark-mod" in message and "input line 3: -A LBAGENT-X -j HMARK" in message, message
