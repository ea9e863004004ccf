"""VipBinder against the real kernel, in a network namespace the test makes: lbagent touches only its own VIPs.

Each step runs in its own process inside the namespace (`ip netns exec`), as the agent does, so adopting
the VIPs a previous process bound is exercised for real.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from lbagent.l3.vips import VipError, apply_sysctls
from tests.netns import run_python, throwaway_netns

STEP = """
import asyncio, json, sys
from ipaddress import ip_address
from lbagent.l3.vips import VipBinder, VipError
op, interface, desired, keep = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
binder = VipBinder(interface)
try:
    if op == "bound":
        result = asyncio.run(binder.bound())
    else:
        result = asyncio.run(binder.sync([ip_address(a) for a in desired], keep=[ip_address(a) for a in keep]))
except VipError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"vips": sorted(map(str, result))}))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    with throwaway_netns("vipt") as (name,):
        yield name


def step(
    ns: str, op: str, desired: Sequence[str] = (), keep: Sequence[str] = (), interface: str = "lo"
) -> dict[str, object]:
    result: dict[str, object] = run_python(ns, STEP, op, interface, json.dumps(list(desired)),
                                           json.dumps(list(keep)), timeout=60)
    return result


def _addresses(ns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", ns, "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[3] for line in out.splitlines()}


def test_bind_adopt_and_unbind_only_own_vips(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "addr", "add", "192.0.2.99/32", "dev", "lo"], check=True)  # the operator's
    v4, v6, other = "192.0.2.10", "2001:db8::10", "192.0.2.11"
    assert step(netns, "sync", [v4, v6, other]) == {"vips": sorted([v4, v6, other])}
    assert {"192.0.2.10/32", "2001:db8::10/128", "192.0.2.11/32", "192.0.2.99/32"} <= _addresses(netns)
    # a new process (an agent restart) recognises the VIPs as its own, and not the operator's address
    assert step(netns, "bound") == {"vips": sorted([v4, v6, other])}
    # `other` is no longer desired but still announced: kept until withdrawn
    assert step(netns, "sync", [v4, v6], keep=[other]) == {"vips": sorted([v4, v6, other])}
    assert step(netns, "sync", [v4]) == {"vips": [v4]}
    assert "2001:db8::10/128" not in _addresses(netns) and "192.0.2.11/32" not in _addresses(netns)
    assert step(netns, "sync", []) == {"vips": []}
    assert "192.0.2.99/32" in _addresses(netns)  # never removes what it did not add
    assert "192.0.2.10/32" not in _addresses(netns)


def test_vip_already_bound_by_the_operator_counts_as_bound_and_stays(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "addr", "add", "192.0.2.10/32", "dev", "lo"], check=True)
    assert step(netns, "sync", ["192.0.2.10"]) == {"vips": ["192.0.2.10"]}
    step(netns, "sync", [])
    assert "192.0.2.10/32" in _addresses(netns)


def test_missing_interface_is_a_clear_error(netns: str) -> None:
    result = step(netns, "sync", ["192.0.2.10"], interface="vip0")
    assert "vipInterface 'vip0' does not exist" in str(result["error"])


def test_sysctls_written_only_when_different(tmp_path: Path) -> None:
    (tmp_path / "net/ipv4").mkdir(parents=True)
    key = tmp_path / "net/ipv4/ip_forward"
    key.write_text("0\n")
    apply_sysctls({"net/ipv4/ip_forward": "1"}, tmp_path)
    assert key.read_text() == "1"
    with pytest.raises(VipError, match=r"net\.ipv4\.conf\.all\.arp_ignore"):
        apply_sysctls({"net/ipv4/conf/all/arp_ignore": "1"}, tmp_path)


LISTING = """
import json, socket, sys
from pyroute2 import IPRoute
from lbagent.l3.vips import interface_addresses
with IPRoute() as ipr:
    answers = {}
    for name in ("lo", "d0"):
        index = ipr.link_lookup(ifname=name)[0]
        theirs = sorted([m.get_attr("IFA_ADDRESS") or m.get_attr("IFA_LOCAL"), m["prefixlen"],
                         m.get_attr("IFA_PROTO") or 0] for m in ipr.get_addr(index=index))
        ours = sorted([str(a), n, proto] for a, n, proto in interface_addresses(index))
        answers[name] = {"pyroute2": theirs, "ours": ours}
print(json.dumps(answers))
"""


def test_the_address_listing_reads_what_pyroute2_reads(netns: str) -> None:
    """`interface_addresses` (the VIP sync's own rtnetlink dump) against pyroute2's decoding of the same dump: two
    interfaces, IPv4 and IPv6, tagged and untagged, enough addresses for the dump to take several reads."""
    batch = ["link add d0 type veth peer name d1", "link set d0 up", "addr add 198.51.100.1/24 dev d0",
             "addr add 2001:db8:1::1/64 dev d0 nodad"]
    batch += [f"addr add 203.0.113.{i}/32 dev lo" for i in range(1, 200)]  # untagged: an operator's
    subprocess.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(batch) + "\n", text=True, check=True)
    tagged = [f"2001:db8::{i:x}" for i in range(1, 2500)] + [f"192.0.2.{i}" for i in range(1, 255)]
    assert step(netns, "sync", tagged)["vips"] == sorted(tagged)
    answers = run_python(netns, LISTING)
    for name, got in answers.items():
        assert got["ours"] == got["pyroute2"], name
    assert len(answers["lo"]["ours"]) == 2 + 199 + len(tagged)  # the loopback's own two, and nothing of d0's
    assert sum(proto == 0x6C for _, _, proto in answers["lo"]["ours"]) == len(tagged)
    assert {a for a, _, _ in answers["d0"]["ours"]} >= {"198.51.100.1", "2001:db8:1::1"}


def test_a_vip_the_kernel_refuses_is_named_and_the_others_are_bound(netns: str) -> None:
    """The VIPs missing go to the kernel in one batch: one it refuses (IPv6 on an interface without IPv6) fails the
    sync with its address and the kernel's reason, and every other one of the batch is bound."""
    subprocess.run(["ip", "-n", netns, "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv6.conf.d0.disable_ipv6=1"], check=True)
    result = step(netns, "sync", ["192.0.2.7", "2001:db8::7", "192.0.2.8"], interface="d0")
    assert result == {"error": "cannot bind VIP 2001:db8::7 (EACCES: Permission denied) on d0"}
    assert step(netns, "bound", interface="d0") == {"vips": ["192.0.2.7", "192.0.2.8"]}
