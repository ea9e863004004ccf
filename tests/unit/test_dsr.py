"""Direct server return: what the config accepts, the netdev table (checked by the real nft), the node each flow
goes to (the inet table's choice), and the ipMode the Kubernetes source writes."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest
import yaml

from lbagent import model
from lbagent.l4.nftables import apply, dsr
from lbagent.l4.nftables import render as nftables
from lbagent.plan.services import Backend, Frontend
from lbagent.sources.file import config
from lbagent.sources.kubernetes.writer import ip_mode, status_body
from tests.netns import throwaway_netns
from tests.unit.test_config import MINIMAL, problems

REPO = Path(__file__).resolve().parents[2]
NODES = {"node1": "203.0.113.11", "node2": "203.0.113.12", "node3": "203.0.113.13"}


def _frontend(mode: model.ForwardingMode = model.ForwardingMode.DSR, **extra: object) -> Frontend:
    backends = tuple(Backend(n, ip_address(a)) for n, a in NODES.items())
    return Frontend("default/web", "http", ip_address("192.0.2.10"), model.Protocol.TCP, 80, backends, 30080, mode,
                    **extra)  # type: ignore[arg-type]


def _doc(**dataplane: object) -> str:
    doc = yaml.safe_load(MINIMAL)
    doc["dataplane"] = dataplane
    return yaml.safe_dump(doc)


def test_config_takes_dsr_on_nftables_with_its_interfaces() -> None:
    m = config.parse(_doc(forwardingMode="dsr", dsrInterfaces=["eth0"]))
    assert m.service("default/web").forwarding_mode is model.ForwardingMode.DSR
    assert m.dataplane.dsr_interfaces == ("eth0",)


def test_config_takes_dsr_on_ipvs_without_interfaces() -> None:
    """IPVS direct routing takes the VIP's packets wherever they come in: no dsrInterfaces needed."""
    m = config.parse(_doc(kind="ipvs", forwardingMode="dsr"))
    assert m.service("default/web").forwarding_mode is model.ForwardingMode.DSR
    assert m.dataplane.kind is model.DataplaneKind.IPVS


@pytest.mark.parametrize(("dataplane", "field", "message"), [
    ({"forwardingMode": "dsr"}, "dataplane.dsrInterfaces", "name the interfaces the routers send"),
    ({"forwardingMode": "dsr", "dsrInterfaces": ["eth0"], "kind": "iptables"}, "dataplane.forwardingMode",
     "needs dataplane.kind nftables or ipvs (here iptables: iptables cannot send a packet to another host's MAC"),
    ({"forwardingMode": "dsr", "kind": "iptables"}, "dataplane.forwardingMode", "needs dataplane.kind nftables or"),
])
def test_config_refuses_dsr_where_it_cannot_work(dataplane: dict[str, object], field: str, message: str) -> None:
    found = problems(_doc(**dataplane))
    assert any(p.path == field and message in p.message for p in found), found


def test_a_services_own_dsr_is_checked_too() -> None:
    doc = yaml.safe_load(MINIMAL)
    doc["services"][0]["forwardingMode"] = "dsr"
    found = problems(yaml.safe_dump(doc))
    assert [(p.path, p.value) for p in found] == [("dataplane.dsrInterfaces", "[]")], found
    doc["dataplane"] = {"kind": "iptables"}
    found = problems(yaml.safe_dump(doc))
    assert [(p.path, p.value) for p in found] == [("services[0].forwardingMode", "dsr")], found


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace (its `lo` is the one interface the table can hook)."""
    if shutil.which("ip") is None or shutil.which("nft") is None:
        pytest.fail("ip and nft are needed: `make test` installs them (iproute2, nftables)")
    with throwaway_netns("lbagent-dsr-") as (name,):
        yield name


def test_the_netdev_table_is_accepted_by_nft(netns: str) -> None:
    six = tuple(Backend(n, ip_address(f"2001:db8:2::{i + 11}")) for i, n in enumerate(NODES))
    frontends = [_frontend(), replace(_frontend(affinity_timeout=60, source_ranges=(ip_network("198.51.100.0/24"),)),
                                      port=443),
                 replace(_frontend(), vip=ip_address("2001:db8::10"), backends=six)]
    paths = {str(b.address): "lo" for f in frontends for b in f.backends}
    plan = dsr.build("lbagent", frontends, 1021, ["lo"], paths)
    assert plan.frontends == 3 and not plan.unreachable
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=plan.text, text=True, check=True)
    listed = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "table", "netdev", "lbagent"],
                            capture_output=True, text=True, check=True).stdout
    assert "meta pkttype != host accept" in listed and "fwd ip to jhash ip saddr . tcp sport mod 1021" in listed
    assert "192.0.2.10 . tcp . 443 . 198.51.100.0/24" in listed
    assert "fwd ip6 to jhash ip6 saddr . tcp sport mod 1021" in listed
    # replaced whole, and removed
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=plan.text, text=True, check=True)
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=dsr.render_delete("lbagent"), text=True,
                   check=True)


def test_every_lb_picks_the_node_nat_would_pick() -> None:
    """The dsr lookup table is the inet table's for the same nodes: a flow's node does not depend on the mode or
    on which LB the router sends it to."""
    f = _frontend()
    plan = dsr.build("lbagent", [f], 1021, ["eth1"], {a: "eth1" for a in NODES.values()})
    table = nftables.lookup_table(f, 1021)
    assert f"map {table.name} {{" in plan.text
    assert ", ".join(f"{i} : {a}" for i, a in enumerate(table.slots)) in plan.text


def test_nodes_not_on_link_are_left_out_and_named() -> None:
    paths = {NODES["node1"]: "eth1", NODES["node2"]: "eth1"}
    plan = dsr.build("lbagent", [_frontend()], 1021, ["eth1"], paths)
    assert plan.unreachable == {NODES["node3"]: "node3"}
    assert NODES["node3"] not in plan.text and NODES["node1"] in plan.text
    # none reachable, or no interface to hook: nothing programmed (the VIP's packets stay with the inet table)
    assert dsr.build("lbagent", [_frontend()], 1021, ["eth1"], {}).text == ""
    assert dsr.build("lbagent", [_frontend()], 1021, [], paths).text == ""


def test_other_modes_are_not_in_the_netdev_table() -> None:
    assert dsr.dsr_frontends([_frontend(model.ForwardingMode.NAT), _frontend()]) == [_frontend()]


def test_kubernetes_status_says_vip_for_dsr() -> None:
    assert ip_mode(model.ForwardingMode.DSR) == "VIP"
    assert ip_mode(model.ForwardingMode.NAT) == ip_mode(model.ForwardingMode.MASQUERADE) == "Proxy"
    body = status_body("default", "web", ("192.0.2.10",), "VIP")
    assert body["status"]["loadBalancer"]["ingress"] == [{"ip": "192.0.2.10", "ipMode": "VIP"}]


def test_check_judges_the_netdev_table_as_this_host_would_write_it(netns: str, tmp_path: Path) -> None:
    """`lbagent check` on the LB node: its interfaces and on-link nodes give the table, nft judges it; elsewhere
    (an interface missing, a node behind a gateway) it says why not, and the rest is still judged."""
    doc = yaml.safe_load(MINIMAL)
    doc["dataplane"] = {"forwardingMode": "dsr", "dsrInterfaces": ["up0"]}
    doc["nodes"].append({"name": "node9", "addresses": ["198.51.100.99"]})
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(doc))
    script = ("link add up0 type veth peer name up1\nlink set up0 up\nlink set up1 up\nlink set lo up\n"
              "addr add 203.0.113.2/24 dev up0\nroute add 198.51.100.0/24 via 203.0.113.1\n")
    subprocess.run(["ip", "-n", netns, "-batch", "-"], input=script, text=True, check=True)

    def check(*prefix: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, sys.executable, "-m", "lbagent.ops.cli", "check", "-c", str(path)],
                              capture_output=True, text=True, check=False, cwd=REPO, timeout=60)

    here = check("ip", "netns", "exec", netns)
    assert here.returncode == 0, here.stderr
    assert ("accepted     nft -c -f lbagent-dsr.nft: not on-link from this host, left out of dsr frontends: "
            "node9 198.51.100.99") in here.stdout
    elsewhere = check()  # this machine has no up0
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "not checked  nft -c -f lbagent-dsr.nft: dataplane.dsrInterfaces up0: not on this host" in elsewhere.stdout
    assert "accepted     nft -c -f lbagent.nft" in elsewhere.stdout


def test_the_kernel_is_asked_for_on_link_paths_when_the_nodes_change_and_on_every_resync(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not on every change of a dsr frontend: the same nodes have the same paths until a resync asks again."""
    asked: list[frozenset[str]] = []

    def paths(addresses: frozenset[str], interfaces: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
        asked.append(frozenset(addresses))
        return {a: "eth1" for a in addresses}, list(interfaces)

    async def no_kernel(script: str) -> None:
        return None

    monkeypatch.setattr(apply, "on_link_paths", paths)
    forwarder = apply.NftForwarder(model.Dataplane(dsr_interfaces=("eth1",)))
    monkeypatch.setattr(forwarder, "_run", no_kernel)
    vips = [ip_address("192.0.2.10")]
    web, fewer = _frontend(), replace(_frontend(), backends=_frontend().backends[:2])

    async def scenario() -> None:
        await forwarder.apply([web], vips)
        await forwarder.apply([replace(web, affinity_timeout=60)], vips)  # a change, the same nodes
        assert asked == [frozenset(NODES.values())]
        await forwarder.apply([fewer], vips)  # other nodes: asked for them
        assert asked[-1] == frozenset(list(NODES.values())[:2]) and len(asked) == 2
        await forwarder.apply([fewer], vips, force=True)  # a resync asks again (a route may have changed)
        assert len(asked) == 3
        assert "203.0.113.12" in (forwarder.dsr_applied or "")

    asyncio.run(scenario())
