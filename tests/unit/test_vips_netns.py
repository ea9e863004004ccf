"""VipBinder against the real kernel, in a network namespace the test makes: lbagent touches only its own VIPs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from lbagent.apply.vips import VipBinder, VipError, apply_sysctls


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces): run it as root, as `make test` does")
    name = f"vipt{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _addresses(ns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", ns, "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[3] for line in out.splitlines()}


def test_bind_adopt_and_unbind_only_own_vips(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "addr", "add", "192.0.2.99/32", "dev", "lo"], check=True)  # the operator's
    binder = VipBinder("lo", netns=netns)
    v4, v6, other = ip_address("192.0.2.10"), ip_address("2001:db8::10"), ip_address("192.0.2.11")
    assert asyncio.run(binder.sync([v4, v6, other])) == {v4, v6, other}
    assert {"192.0.2.10/32", "2001:db8::10/128", "192.0.2.11/32", "192.0.2.99/32"} <= _addresses(netns)
    # a second agent (a restart) sees the same VIPs as its own and changes nothing
    assert asyncio.run(VipBinder("lo", netns=netns).bound()) == {v4, v6, other}
    # `other` is no longer desired but still announced: kept until withdrawn
    assert asyncio.run(binder.sync([v4, v6], keep=[other])) == {v4, v6, other}
    assert asyncio.run(binder.sync([v4])) == {v4}
    assert "2001:db8::10/128" not in _addresses(netns) and "192.0.2.11/32" not in _addresses(netns)
    asyncio.run(binder.sync([]))
    assert "192.0.2.99/32" in _addresses(netns)  # never removes what it did not add
    assert "192.0.2.10/32" not in _addresses(netns)


def test_vip_already_bound_by_the_operator_counts_as_bound_and_stays(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "addr", "add", "192.0.2.10/32", "dev", "lo"], check=True)
    binder = VipBinder("lo", netns=netns)
    assert asyncio.run(binder.sync([ip_address("192.0.2.10")])) == {ip_address("192.0.2.10")}
    asyncio.run(binder.sync([]))
    assert "192.0.2.10/32" in _addresses(netns)


def test_missing_interface_is_a_clear_error(netns: str) -> None:
    with pytest.raises(VipError, match="vipInterface 'vip0' does not exist"):
        asyncio.run(VipBinder("vip0", netns=netns).sync([ip_address("192.0.2.10")]))


def test_sysctls_written_only_when_different(tmp_path: Path) -> None:
    (tmp_path / "net/ipv4").mkdir(parents=True)
    key = tmp_path / "net/ipv4/ip_forward"
    key.write_text("0\n")
    apply_sysctls({"net/ipv4/ip_forward": "1"}, tmp_path)
    assert key.read_text() == "1"
    with pytest.raises(VipError, match=r"net\.ipv4\.conf\.all\.arp_ignore"):
        apply_sysctls({"net/ipv4/conf/all/arp_ignore": "1"}, tmp_path)
