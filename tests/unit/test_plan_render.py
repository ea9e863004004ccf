"""Planning decisions and their reasons, and the nftables rendering (golden files checked by the real nft)."""

from __future__ import annotations

import os
import shutil
import subprocess
from ipaddress import ip_address
from pathlib import Path

import pytest
import yaml

from lbagent import config, model
from lbagent.plan import Reason, all_healthy, plan
from lbagent.render import nftables
from tests.unit.test_config import MINIMAL

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "nftables"

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
        {"name": "web6", "vip": "2001:db8::10", "ports": [{"port": 80, "nodePort": 30081}]},
    ],
}


def three_nodes() -> model.Model:
    return config.parse(yaml.safe_dump(THREE_NODES))


def test_all_healthy_plan_spreads_over_every_node_of_the_vip_family() -> None:
    m = three_nodes()
    p = plan(m, all_healthy(m))
    by_port = {(f.service, f.port): f for f in p.frontends}
    assert [b.node for b in by_port[("default/web", 80)].backends] == ["node1", "node2", "node3"]
    first = by_port[("default/web", 443)].backends[0]
    assert (str(first.address), first.port) == ("203.0.113.11", 30443)
    # IPv6 VIP: only the nodes with an IPv6 address
    assert [b.node for b in by_port[("default/web6", 80)].backends] == ["node1", "node2"]
    assert set(p.announcements) == {"192.0.2.10/32", "192.0.2.11/32", "2001:db8::10/128"}
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
                       "default/web6": Reason.ANNOUNCED}
    assert set(p.announcements) == {"2001:db8::10/128"}
    # the VIPs stay bound: a withdrawn VIP still answers (with a refusal) until routers have moved away
    assert ip_address("192.0.2.10") in p.vips


def test_draining_withdraws_everything() -> None:
    m = three_nodes()
    p = plan(m, all_healthy(m), draining=True)
    assert p.announcements == {}
    assert {d.reason for d in p.decisions} == {Reason.DRAINING}
    assert all(f.backends for f in p.frontends)  # forwarding continues while draining


def test_sysctls() -> None:
    m = three_nodes()
    p = plan(m, {})
    assert p.sysctls == {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/arp_ignore": "1",
                         "net/ipv4/conf/all/arp_announce": "2", "net/ipv6/conf/all/forwarding": "1"}


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; rerun with UPDATE_GOLDEN=1 after checking the change"


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
    _golden(name, text)
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
    _golden("no-services.nft", text)
    _nft_check(text)
    _nft_check(nftables.render_delete(m.dataplane))
