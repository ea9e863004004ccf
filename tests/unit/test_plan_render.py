"""Planning decisions and their reasons, and the nftables rendering (golden files checked by the real nft)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyroute2.netns import popns, pushns

from lbagent import model
from lbagent.l3.vips import VipError, apply_sysctls
from lbagent.l4.change import FrontendChange
from lbagent.l4.nftables import netlink
from lbagent.l4.nftables import render as nftables
from lbagent.plan.services import Reason, all_healthy, changed_services, plan, replan
from lbagent.sources.file import config
from tests import golden
from tests.netns import nft, throwaway_netns
from tests.unit.test_config import MINIMAL

THREE_NODES = yaml.safe_load(MINIMAL) | {
    "nodes": [
        {"name": "node1", "addresses": ["203.0.113.11", "2001:db8:1::11"]},
        {"name": "node2", "addresses": ["203.0.113.12", "2001:db8:1::12"]},
        {"name": "node3", "addresses": ["203.0.113.13"]},
    ],
    "services": [
        {"name": "web", "vip": "192.0.2.10", "bgp": {"med": 10, "communities": ["64512:100"]},
         "ports": [{"name": "http", "port": 80, "nodePort": 30080}, {"name": "https", "port": 443, "nodePort": 30443}]},
        {"name": "dns", "namespace": "kube-system", "vip": "192.0.2.11",
         "ports": [{"name": "dns", "protocol": "UDP", "port": 53, "nodePort": 30053}]},
        {"name": "web6", "vip": "2001:db8::10", "ports": [{"port": 80, "nodePort": 30081}],
         "forwardingMode": "nat", "sessionAffinity": "ClientIP",
         "loadBalancerSourceRanges": ["2001:db8:c::/64"]},
        {"name": "admin", "vip": "192.0.2.12", "ports": [{"port": 22, "nodePort": 30022}],
         "loadBalancerSourceRanges": ["198.51.100.0/24", "192.0.2.128/25"]},
    ],
}


def three_nodes() -> model.Model:
    return config.parse(yaml.safe_dump(THREE_NODES))


def test_all_healthy_plan_spreads_over_every_node_of_the_vip_family() -> None:
    m = three_nodes()
    p = plan(m, all_healthy(m))
    by_port = {(f.service, f.port): f for f in p.frontends}
    assert [b.node for b in by_port[("default/web", 80)].backends] == ["node1", "node2", "node3"]
    https = by_port[("default/web", 443)]
    assert (str(https.backends[0].address), https.node_port) == ("203.0.113.11", 30443)
    # one tuple of backends for both ports of the service (and for every service on the same nodes)
    assert https.backends is by_port[("default/web", 80)].backends
    # IPv6 VIP: only the nodes with an IPv6 address
    assert [b.node for b in by_port[("default/web6", 80)].backends] == ["node1", "node2"]
    assert set(p.announcements) == {"192.0.2.10/32", "192.0.2.11/32", "2001:db8::10/128", "192.0.2.12/32"}
    assert p.announcements["192.0.2.10/32"].med == 10
    assert p.announcements["192.0.2.10/32"].communities == ("64512:100",)
    assert all(d.reason is Reason.ANNOUNCED for d in p.decisions)


def test_unhealthy_node_leaves_rotation_and_vip_stays() -> None:
    m = three_nodes()
    health = all_healthy(m) | {("default/web", "node2"): False}
    p = plan(m, health)
    web80 = next(f for f in p.frontends if f.service == "default/web" and f.port == 80)
    assert [b.node for b in web80.backends] == ["node1", "node3"]
    decision = next(d for d in p.decisions if d.service == "default/web")
    assert decision.announce and decision.unhealthy_nodes == ("node2",)


def test_no_healthy_node_withdraws_with_reason_and_unknown_counts_as_unhealthy() -> None:
    m = three_nodes()
    health = {k: v for k, v in all_healthy(m).items() if k[0] != "kube-system/dns"}  # dns never probed yet
    health |= {("default/web", n): False for n in ("node1", "node2", "node3")}
    p = plan(m, health)
    reasons = {d.service: d.reason for d in p.decisions}
    assert reasons == {"default/web": Reason.NO_HEALTHY_NODES, "kube-system/dns": Reason.NO_HEALTHY_NODES,
                       "default/web6": Reason.ANNOUNCED, "default/admin": Reason.ANNOUNCED}
    assert set(p.announcements) == {"2001:db8::10/128", "192.0.2.12/32"}
    # the VIPs stay bound: a withdrawn VIP still answers (with a refusal) until routers have moved away
    assert ip_address("192.0.2.10") in p.vips


def test_draining_withdraws_everything() -> None:
    m = three_nodes()
    p = plan(m, all_healthy(m), draining=True)
    assert p.announcements == {}
    assert {d.reason for d in p.decisions} == {Reason.DRAINING}
    assert all(f.backends for f in p.frontends)  # forwarding continues while draining


def test_weights_and_draining_nodes() -> None:
    doc = yaml.safe_load(yaml.safe_dump(THREE_NODES))
    doc["nodes"][0]["weight"] = 3
    doc["nodes"][1]["draining"] = True
    m = config.parse(yaml.safe_dump(doc))
    p = plan(m, all_healthy(m))
    web80 = next(f for f in p.frontends if f.service == "default/web" and f.port == 80)
    assert [(b.node, b.weight) for b in web80.backends] == [("node1", 3), ("node2", 0), ("node3", 1)]
    assert [b.node for b in web80.active] == ["node1", "node3"]
    decision = next(d for d in p.decisions if d.service == "default/web")
    assert decision.draining_nodes == ("node2",) and decision.announce
    table = nftables.lookup_table(web80, m.dataplane.maglev_table_size)
    assert table.slots.count("203.0.113.11") == 3 * table.slots.count("203.0.113.13") + 1 or \
        abs(table.slots.count("203.0.113.11") / table.slots.count("203.0.113.13") - 3) < 0.05
    assert "203.0.113.12" not in table.slots


def test_local_service_without_ready_endpoints_says_so() -> None:
    doc = yaml.safe_load(yaml.safe_dump(THREE_NODES))
    doc["services"][0] |= {"externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}
    m = config.parse(yaml.safe_dump(doc))
    p = plan(m, {k: k[0] != "default/web" for k in all_healthy(m)})
    decision = next(d for d in p.decisions if d.service == "default/web")
    assert (decision.announce, decision.reason) == (False, Reason.NO_LOCAL_ENDPOINTS)


def test_sysctls() -> None:
    m = three_nodes()
    p = plan(m, {})
    assert p.sysctls == {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/arp_ignore": "1",
                         "net/ipv4/conf/all/arp_announce": "2", "net/ipv6/conf/all/forwarding": "1",
                         "net/netfilter/nf_conntrack_tcp_be_liberal": "1"}


def test_conntrack_sysctl_waits_for_its_module(tmp_path: Path) -> None:
    """The conntrack key is skipped while nf_conntrack is not loaded (its directory missing) and written once it is;
    any other key that cannot be written is an error."""
    (tmp_path / "net/ipv4").mkdir(parents=True)
    (tmp_path / "net/ipv4/ip_forward").write_text("0\n")
    settings = {"net/ipv4/ip_forward": "1", "net/netfilter/nf_conntrack_tcp_be_liberal": "1"}
    apply_sysctls(settings, tmp_path)
    assert (tmp_path / "net/ipv4/ip_forward").read_text() == "1"
    assert not (tmp_path / "net/netfilter").exists()
    (tmp_path / "net/netfilter").mkdir()
    (tmp_path / "net/netfilter/nf_conntrack_tcp_be_liberal").write_text("0\n")
    apply_sysctls(settings, tmp_path)
    assert (tmp_path / "net/netfilter/nf_conntrack_tcp_be_liberal").read_text() == "1"
    with pytest.raises(VipError, match=r"net\.ipv6\.conf\.all\.forwarding"):
        apply_sysctls({"net/ipv6/conf/all/forwarding": "1"}, tmp_path)


def _nft_check(text: str) -> None:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    if not os.path.exists(nft):
        pytest.fail("nft is not installed: `make test` installs it (apt package nftables)")
    result = subprocess.run([nft, "-c", "-f", "-"], input=text, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("name", "unhealthy"),
    [
        ("all-healthy.nft", set()),
        ("web-node2-down.nft", {("default/web", "node2")}),
        ("web-all-down.nft", {("default/web", "node1"), ("default/web", "node2"), ("default/web", "node3")}),
    ],
)
def test_nftables_golden_and_valid(name: str, unhealthy: set[tuple[str, str]]) -> None:
    m = three_nodes()
    health = {k: k not in unhealthy for k in all_healthy(m)}
    p = plan(m, health)
    text = nftables.render(p.frontends, p.vips, m.dataplane)
    golden.check("nftables", name, text)
    _nft_check(text)


def test_render_is_deterministic_whatever_the_input_order() -> None:
    m = three_nodes()
    p = plan(m, all_healthy(m))
    forward = nftables.render(p.frontends, p.vips, m.dataplane)
    backward = nftables.render(tuple(reversed(p.frontends)), tuple(reversed(p.vips)), m.dataplane)
    assert forward == backward


def test_empty_config_renders_a_valid_empty_table() -> None:
    m = config.parse(yaml.safe_dump(yaml.safe_load(MINIMAL) | {"services": []}))
    p = plan(m, {})
    text = nftables.render(p.frontends, p.vips, m.dataplane)
    golden.check("nftables", "no-services.nft", text)
    _nft_check(text)
    _nft_check(nftables.render_delete(m.dataplane))


def test_shared_lookup_tables_and_features_in_the_ruleset() -> None:
    m = three_nodes()
    rs = nftables.build(plan(m, all_healthy(m)).frontends, plan(m, {}).vips, m.dataplane)
    # web:80, web:443, dns, admin share one IPv4 table (same nodes); web6 has its own, hashed by client only
    assert len([t for t in rs.tables.values() if t.version == 4]) == 1
    # (table, by client only, masquerade): web6 is in nat mode (client address kept), the IPv4 ones masquerade
    assert set(rs.chains.values()) == {(n, False, True) for n in rs.tables if n.startswith("mg4")} | {
        (n, True, False) for n in rs.tables if n.startswith("mg6")}
    assert rs.dispatch[4][("192.0.2.10", "tcp", 80)].endswith("_m")
    admin = ("192.0.2.12", "tcp", 22)
    assert rs.allowed[4] == {(admin, "198.51.100.0/24"), (admin, "192.0.2.128/25")}


def test_predict_matches_the_table_and_ignores_the_port_with_affinity() -> None:
    m = three_nodes()
    p = plan(m, all_healthy(m))
    web = next(f for f in p.frontends if f.service == "default/web" and f.port == 80)
    web6 = next(f for f in p.frontends if f.service == "default/web6")
    size = m.dataplane.maglev_table_size
    chosen = {nftables.predict(web, ip_address("192.0.2.130"), sport, size) for sport in range(40000, 40300)}
    assert {b.node for b in chosen if b} == {"node1", "node2", "node3"}
    sticky = {nftables.predict(web6, ip_address("2001:db8:c::130"), sport, size) for sport in range(40000, 40100)}
    assert len(sticky) == 1


def _canonical(listing: str) -> Any:
    """`nft -j list table` with handles dropped and element lists sorted, to compare two kernels' content."""
    doc = json.loads(listing)["nftables"]
    out = []
    for item in doc:
        for kind, body in item.items():
            if kind == "metainfo":
                continue
            kept = {k: v for k, v in body.items() if k != "handle"}
            if "elem" in kept:
                kept["elem"] = sorted(json.dumps(e, sort_keys=True) for e in kept["elem"])
            out.append(json.dumps({kind: kept}, sort_keys=True))
    return sorted(out)


@pytest.fixture(params=["one-table", "sharded"])
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The dispatch in lbagent's one table, or spread over shard tables as at scale (two frontends a shard)."""
    if request.param == "sharded":
        monkeypatch.setattr(nftables, "SHARD_FRONTENDS", 2)
    return str(request.param)


def _ruleset(ns: str) -> Any:
    """Every table in the namespace (lbagent's and its shards'), canonical."""
    return _canonical(nft(ns, "-j", "list", "ruleset"))


def test_delta_brings_the_kernel_to_the_same_state_as_a_full_apply(layout: str) -> None:
    m = three_nodes()
    health = all_healthy(m)
    steps = [
        health,
        health | {("default/web", "node2"): False},  # one service's node set changes: a new lookup table
        {k: False for k in health},  # nothing healthy: every frontend leaves dispatch, tables go
        health,
    ]
    doc = yaml.safe_load(yaml.safe_dump(THREE_NODES))
    doc["services"][0]["ports"][0]["nodePort"] = 31080  # a changed nodePort element
    doc["services"][3]["loadBalancerSourceRanges"] = ["203.0.113.0/24"]
    changed = config.parse(yaml.safe_dump(doc))
    with throwaway_netns("nftd", 2) as names:
        listing = _ruleset
        previous = None
        for model_, snapshot in [(m, s) for s in steps] + [(changed, health)]:
            p = plan(model_, snapshot)
            rs = nftables.build(p.frontends, p.vips, model_.dataplane)
            if previous is None:
                nft(names[0], "-f", "-", script=nftables.render_full(rs))
            else:
                delta = nftables.render_delta(previous, rs)
                assert delta is not None
                if delta:
                    nft(names[0], "-f", "-", script=delta.script())
            nft(names[1], "-f", "-", script=nftables.render_full(rs))
            assert listing(names[0]) == listing(names[1])
            assert (layout == "sharded") == (rs.shards > 1)
            previous = rs


def test_replan_of_changed_services_equals_a_fresh_plan() -> None:
    m = three_nodes()
    health = all_healthy(m)
    p = plan(m, health)
    rng = random.Random(7)
    keys = sorted(health)
    for _ in range(30):
        changed_keys = rng.sample(keys, 3)
        for k in changed_keys:
            health[k] = not health[k]
        p = replan(p, m, health, {k[0] for k in changed_keys})
        fresh = plan(m, health)
        assert (p.frontends, p.decisions, dict(p.announcements)) == (
            fresh.frontends, fresh.decisions, dict(fresh.announcements))


def test_incremental_updates_bring_the_kernel_to_the_same_state_as_a_full_apply(layout: str) -> None:
    m = three_nodes()
    health = all_healthy(m)
    p = plan(m, health)
    rs = nftables.build(p.frontends, p.vips, m.dataplane)
    rng = random.Random(11)
    with throwaway_netns("nftu", 2) as names:
        listing = _ruleset
        nft(names[0], "-f", "-", script=nftables.render_full(rs))
        keys = sorted(health)
        for _ in range(12):
            changed_keys = rng.sample(keys, 2)
            for k in changed_keys:
                health[k] = not health[k]
            services = {k[0] for k in changed_keys}
            p2 = replan(p, m, health, services)
            script = nftables.update(rs, FrontendChange.of(p.by_service, p2.by_service, services)).script()
            if script:
                nft(names[0], "-f", "-", script=script)
            nft(names[1], "-f", "-", script=nftables.render_full(nftables.build(p2.frontends, p2.vips, m.dataplane)))
            assert listing(names[0]) == listing(names[1])
            assert rs == nftables.build(p2.frontends, p2.vips, m.dataplane)
            if layout == "sharded":  # the kernel checks only the tables a change adds jumps to: its shard's
                shards = {rs.shard_table(nftables.shard_of_service(s, rs.shards)) for s in services}
                for line in script.splitlines():
                    table, container = re.match(r"\w+ \w+ inet (\S+) (\S+)", line).groups()  # type: ignore[union-attr]
                    assert table in shards or (table == "lbagent" and container.startswith(("ranged", "allowed"))), line
            p = p2


def test_element_changes_over_netlink_bring_the_kernel_where_nft_does(layout: str) -> None:
    """The forwarder sends a transaction of dispatch and nodePort elements only over netlink: node2 failing for
    one service after the other and coming back (after the first, most services find their lookup table there),
    random health changes, then a nodePort edit; each applied that way (when it is one) in one kernel and by nft
    in another."""
    doc = yaml.safe_load(yaml.safe_dump(THREE_NODES))
    doc["services"] += [{"name": f"more{i}", "vip": f"192.0.2.{20 + i}", "ports": [{"port": 80, "nodePort": 31100 + i}]}
                        for i in range(10)]
    m = config.parse(yaml.safe_dump(doc))
    health = all_healthy(m)
    p = plan(m, health)
    rs = nftables.build(p.frontends, p.vips, m.dataplane)
    rng = random.Random(13)
    over_netlink = 0
    with throwaway_netns("nftn", 2) as names:
        for ns in names:
            nft(ns, "-f", "-", script=nftables.render_full(rs))
        pushns(names[0])
        try:
            sock = netlink.ElementSocket()
        finally:
            popns()

        def both(script: str) -> None:
            nonlocal over_netlink
            changes = netlink.parse(script)
            if changes is not None:
                sock.apply(changes)
                over_netlink += 1
            elif script:
                nft(names[0], "-f", "-", script=script)
            if script:
                nft(names[1], "-f", "-", script=script)
            assert _ruleset(names[0]) == _ruleset(names[1])

        try:
            keys = sorted(health)
            steps = [[(s.key, "node2")] for s in m.services] * 2 + [rng.sample(keys, 2) for _ in range(16)]
            for changed_keys in steps:
                for k in changed_keys:
                    health[k] = not health[k]
                services = {k[0] for k in changed_keys}
                p2 = replan(p, m, health, services)
                both(nftables.update(rs, FrontendChange.of(p.by_service, p2.by_service, services)).script())
                p = p2
            doc["services"][0]["ports"][0]["nodePort"] = 31080
            edited = config.parse(yaml.safe_dump(doc))
            p2 = plan(edited, health)
            rs2 = nftables.build(p2.frontends, p2.vips, edited.dataplane, rs.shards)
            delta = nftables.render_delta(rs, rs2)
            assert delta is not None and netlink.parse(delta.script()) is not None, delta
            both(delta.script())
        finally:
            sock.close()
    assert over_netlink >= {"one-table": 20, "sharded": 4}[layout], over_netlink  # shards of 2: fewer tables shared


def _edited(base: dict[str, Any], rng: random.Random, step: int) -> dict[str, Any]:
    """The config with its services edited as a source's change would: one added (on a VIP of its own or on a
    shared one), removed, re-ported, moved to another VIP, or given other BGP attributes."""
    doc: dict[str, Any] = yaml.safe_load(yaml.safe_dump(base))
    services = doc["services"]
    kind = rng.choice(["add", "add-shared", "remove", "port", "vip", "med"])
    if kind.startswith("add") or len(services) < 2:
        added = {"name": f"new{step}", "vip": f"192.0.2.{100 + step}",
                 "ports": [{"port": 8000 + step, "nodePort": 31000 + step}]}
        if kind == "add-shared":  # services on one VIP announce it alike (the config checks it)
            shared = rng.choice(services)
            added |= {"vip": shared["vip"]} | ({"bgp": shared["bgp"]} if "bgp" in shared else {})
        services.append(added)
    elif kind == "remove":
        services.pop(rng.randrange(len(services)))
    else:
        s = rng.choice(services)
        if kind == "port":
            s["ports"][0]["nodePort"] = 32000 + step
        elif kind == "vip" and ":" not in s["vip"]:
            s["vip"] = f"198.51.100.{step + 1}"
        else:
            for other in services:
                if other["vip"] == s["vip"]:
                    other["bgp"] = {"med": step}
    return doc


def test_replan_of_a_sources_changed_services_equals_a_fresh_plan_and_the_kernel_follows(layout: str) -> None:
    """A reload that changed only services (added, removed, edited; VIPs shared or not) is planned for those and
    applied as their elements: the same plan and the same table as planning and writing the new config whole."""
    rng = random.Random(5)
    doc = THREE_NODES
    m = three_nodes()
    health = all_healthy(m)
    health[("default/web", "node2")] = False  # a verdict that is not the default, kept across the edits
    p = plan(m, health)
    rs = nftables.build(p.frontends, p.l4_vips, m.dataplane)
    kinds_seen = set()
    with throwaway_netns("nftr", 2) as names:
        nft(names[0], "-f", "-", script=nftables.render_full(rs))
        for step in range(24):
            doc = _edited(doc, rng, step)
            new = config.parse(yaml.safe_dump(doc))
            changed = changed_services(m, new)
            assert changed is not None and changed
            health |= {k: True for k in all_healthy(new) if k not in health}
            p2 = replan(p, new, health, changed)
            fresh = plan(new, health)
            assert p2 == fresh
            assert p2.decisions == fresh.decisions  # model order too
            if p2.l4_vips == p.l4_vips:  # the data plane's change path (a VIP added or gone is a whole apply)
                kinds_seen.add("update")
                script = nftables.update(rs, FrontendChange.of(p.by_service, p2.by_service, changed)).script()
                if script:
                    nft(names[0], "-f", "-", script=script)
            else:
                kinds_seen.add("whole")  # the shard count follows the number of frontends here
                rs = nftables.build(p2.frontends, p2.l4_vips, new.dataplane)
                nft(names[0], "-f", "-", script=nftables.render_full(rs, stale=range(nftables.MAX_SHARDS)))
            whole = nftables.build(fresh.frontends, fresh.l4_vips, new.dataplane, rs.shards)
            nft(names[1], "-f", "-", script=nftables.render_full(whole, stale=range(nftables.MAX_SHARDS)))
            assert _ruleset(names[0]) == _ruleset(names[1])
            m, p = new, p2
    assert kinds_seen == {"update", "whole"}


def test_shard_count_follows_the_frontends_and_keeps_its_count_near_a_boundary() -> None:
    n = nftables.SHARD_FRONTENDS
    assert [nftables.shard_count(k) for k in (0, 1, n, n + 1, 10 * n)] == [1, 1, 1, 2, 10]
    assert nftables.shard_count(10**9) == nftables.MAX_SHARDS
    assert nftables.shard_count(n - 1, previous=2) == 2  # shards of half size or more: kept
    assert nftables.shard_count(n // 2 - 1, previous=2) == 1
    assert nftables.shard_count(3 * n, previous=2) == 3  # shards over size: never kept
    assert nftables.shard_count(10 * n, previous=16) == 16 and nftables.shard_count(10 * n, previous=21) == 10


def test_shards_keep_a_service_together_and_a_kernel_with_more_shards_is_brought_to_fewer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    m = three_nodes()
    p = plan(m, all_healthy(m))
    one = nftables.build(p.frontends, p.vips, m.dataplane)
    monkeypatch.setattr(nftables, "SHARD_FRONTENDS", 1)
    sharded = nftables.build(p.frontends, p.vips, m.dataplane)
    assert one.shards == 1 and sharded.shards == len(p.frontends)
    for service, frontends in p.by_service.items():
        shard = nftables.shard_of_service(service, sharded.shards)
        assert {sharded.shard_of.get(nftables._key(f), 0) for f in frontends} == {shard}
    assert one.dispatch == sharded.dispatch and one.programmed() == sharded.programmed()
    with throwaway_netns("nfts", 2) as names:
        nft(names[0], "-f", "-", script=nftables.render_full(sharded))
        tables = {t["table"]["name"] for t in json.loads(nft(names[0], "-j", "list", "tables"))["nftables"]
                  if "table" in t}
        assert tables == {sharded.shard_table(s) for s in range(sharded.shards)}
        nft(names[0], "-f", "-", script=nftables.render_full(one, stale=range(nftables.MAX_SHARDS)))
        nft(names[1], "-f", "-", script=nftables.render_full(one))
        assert _ruleset(names[0]) == _ruleset(names[1])
        nft(names[0], "-f", "-", script=nftables.render_delete(m.dataplane))
        assert _ruleset(names[0]) == []


def test_a_change_beyond_the_services_asks_for_a_whole_plan() -> None:
    m = three_nodes()
    assert changed_services(m, m) == set()
    for key, value in (("nodes", THREE_NODES["nodes"][:2]), ("dataplane", {"kind": "iptables"})):
        other = config.parse(yaml.safe_dump(THREE_NODES | {key: value}))
        assert changed_services(m, other) is None, key
    renamed = yaml.safe_load(yaml.safe_dump(THREE_NODES))
    renamed["services"][1]["name"] = "dns2"
    assert changed_services(m, config.parse(yaml.safe_dump(renamed))) == {"kube-system/dns", "kube-system/dns2"}
