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
