"""The allocator: addresses from the pools, imported from status first, shared only by key and without a port
clash, dual stack by ipFamilies / ipFamilyPolicy, and a reason for every Service it cannot serve."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest

from lbagent.sources.kubernetes.allocator import (
    IPS_ANNOTATION,
    POOL_ANNOTATION,
    SHARING_ANNOTATION,
    Allocator,
    Pool,
    Request,
)

POOLS = [
    Pool.parse("public", ["192.0.2.64/30", "2001:db8:64::10-2001:db8:64::11"]),
    Pool.parse("reserved", ["198.51.100.10-198.51.100.11"], auto_assign=False),
]


def svc(name: str, *, ports: tuple[tuple[str, int], ...] = (("TCP", 80),), status: tuple[str, ...] = (),
        annotations: dict[str, str] | None = None, created: str = "2026-01-01T00:00:00Z",
        **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "default", "name": name, "annotations": annotations or {},
                     "creationTimestamp": created},
        "spec": {"type": "LoadBalancer", "ports": [{"protocol": p, "port": n, "nodePort": 30000 + n}
                                                     for p, n in ports], **spec},
        "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in status]}},
    }


def allocate(*services: dict[str, Any], pools: list[Pool] = POOLS) -> Any:
    requests = []
    for s in services:
        request, problems = Request.of(s)
        assert request is not None, problems
        requests.append(request)
    return Allocator(pools).allocate(requests)


def ips(result: Any, name: str) -> list[str]:
    return [str(a) for a in result.addresses[f"default/{name}"]]


def test_next_free_addresses_in_pool_order_and_none_twice() -> None:
    r = allocate(svc("a"), svc("b"), svc("c"), svc("d"), svc("e"))
    assert [ips(r, n) for n in "abcd"] == [["192.0.2.64"], ["192.0.2.65"], ["192.0.2.66"], ["192.0.2.67"]]
    assert ips(r, "e") == []  # the reserved pool is not auto-assigned
    (problem,) = r.problems["default/e"]
    assert "no free IPv4 address left" in str(problem) and "spec.ipFamilies" in str(problem)


def test_status_is_imported_before_anything_is_given() -> None:
    """A restarted writer: b holds .64 in status and keeps it, although a (older, without status) would get it
    in a fresh allocation."""
    r = allocate(svc("a", created="2026-01-01T00:00:00Z"), svc("b", status=("192.0.2.64",), created="2026-02-01"))
    assert ips(r, "b") == ["192.0.2.64"] and ips(r, "a") == ["192.0.2.65"]


def test_an_address_claimed_twice_in_status_stays_with_the_older_service() -> None:
    r = allocate(svc("new", status=("192.0.2.64",), created="2026-03-01"),
                 svc("old", status=("192.0.2.64",), created="2026-01-01"))
    assert ips(r, "old") == ["192.0.2.64"] and ips(r, "new") == ["192.0.2.65"]


def test_allocation_is_stable_whatever_the_order_and_a_second_pass_changes_nothing() -> None:
    services = [svc(f"s{i}", created=f"2026-01-{i + 1:02d}") for i in range(4)]
    first = allocate(*services)
    again = allocate(*reversed([svc(f"s{i}", status=tuple(ips(first, f"s{i}")), created=f"2026-01-{i + 1:02d}")
                                for i in range(4)]))
    assert first.addresses == again.addresses


def test_requested_address_by_annotation_or_field() -> None:
    r = allocate(svc("a", annotations={IPS_ANNOTATION: "198.51.100.11"}), svc("b", loadBalancerIP="192.0.2.66"))
    assert ips(r, "a") == ["198.51.100.11"] and ips(r, "b") == ["192.0.2.66"]


def test_out_of_pool_and_taken_requests_are_refused_naming_the_field() -> None:
    r = allocate(svc("a", status=("192.0.2.64",)), svc("b", annotations={IPS_ANNOTATION: "192.0.2.64"}),
                 svc("c", loadBalancerIP="203.0.113.9"))
    assert ips(r, "a") == ["192.0.2.64"] and ips(r, "b") == [] and ips(r, "c") == []
    (taken,) = r.problems["default/b"]
    assert f"metadata.annotations[{IPS_ANNOTATION}]" in str(taken) and "already given to default/a" in str(taken)
    (outside,) = r.problems["default/c"]
    assert "spec.loadBalancerIP" in str(outside) and "203.0.113.9" in str(outside) and "none of lbagent's pools" \
        in str(outside)


def test_sharing_needs_the_same_key_and_no_common_port() -> None:
    key = {SHARING_ANNOTATION: "dns"}
    r = allocate(svc("tcp", ports=(("TCP", 53),), annotations=key, created="1"),
                 svc("udp", ports=(("UDP", 53),), annotations=key, created="2"),
                 svc("clash", ports=(("UDP", 53),), annotations={**key, IPS_ANNOTATION: "192.0.2.64"}, created="3"),
                 svc("other", annotations={IPS_ANNOTATION: "192.0.2.64"}, created="4"))
    assert ips(r, "tcp") == ips(r, "udp") == ["192.0.2.64"]  # auto-assigned together by the key
    assert ips(r, "clash") == [] and "UDP 53 too" in str(r.problems["default/clash"][0])
    assert ips(r, "other") == [] and SHARING_ANNOTATION in str(r.problems["default/other"][0])


def test_dual_stack_by_ip_families_and_policy() -> None:
    both: dict[str, Any] = {"ipFamilies": ["IPv6", "IPv4"]}
    r = allocate(svc("req", ipFamilyPolicy="RequireDualStack", created="1", **both),
                 svc("pref", ipFamilyPolicy="PreferDualStack", created="2", **both),
                 svc("single", ipFamilyPolicy="SingleStack", ipFamilies=["IPv6"], created="3"),
                 svc("pref2", ipFamilyPolicy="PreferDualStack", created="4", **both),
                 svc("req2", ipFamilyPolicy="RequireDualStack", created="5", **both),
                 svc("after", created="6"))
    assert ips(r, "req") == ["192.0.2.64", "2001:db8:64::10"]
    assert ips(r, "pref") == ["192.0.2.65", "2001:db8:64::11"]
    assert ips(r, "single") == []  # the pool's two IPv6 addresses are gone
    assert ips(r, "pref2") == ["192.0.2.66"]  # prefer: what there is
    assert ips(r, "req2") == []  # require: both or nothing, and the IPv4 address it could have had stays free
    assert "no free IPv6 address left" in str(r.problems["default/req2"][0])
    assert ips(r, "after") == ["192.0.2.67"]  # the IPv4 address req2 took for a moment was handed back


def test_a_named_pool_and_an_unknown_one() -> None:
    r = allocate(svc("a", annotations={POOL_ANNOTATION: "reserved"}), svc("b", annotations={POOL_ANNOTATION: "nope"}))
    assert ips(r, "a") == ["198.51.100.10"]
    assert ips(r, "b") == [] and "no such pool" in str(r.problems["default/b"][0])


def test_a_pool_shrunk_away_from_an_address_takes_nothing_back_and_says_so() -> None:
    r = allocate(svc("a", status=("203.0.113.5",)))
    assert ips(r, "a") == ["203.0.113.5"]
    assert "none of lbagent's pools now" in str(r.warnings["default/a"][0])


def test_asking_for_another_address_moves_the_service() -> None:
    r = allocate(svc("a", status=("192.0.2.64",), annotations={IPS_ANNOTATION: "192.0.2.66"}))
    assert ips(r, "a") == ["192.0.2.66"]


@pytest.mark.parametrize("text, message", [("192.0.2.300", "not an IP address"),
                                            ("192.0.2.64,192.0.2.65", "at most one address per family")])
def test_malformed_annotation_names_it(text: str, message: str) -> None:
    request, problems = Request.of(svc("a", annotations={IPS_ANNOTATION: text}))
    assert request is None and IPS_ANNOTATION in str(problems[0]) and message in str(problems[0])


@pytest.mark.parametrize("entry", ["192.0.2.10-192.0.2.1", "192.0.2.1-2001:db8::1", "192.0.2.1/24", "nonsense"])
def test_bad_pool_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        Pool.parse("p", [entry])


def test_ten_thousand_services_get_ten_thousand_addresses() -> None:
    """At scale, across ranges of both families (a quadratic scan would run into the suite's timeout)."""
    pool = Pool.parse("big", ["192.0.2.0/24", "198.51.100.0/24", "2001:db8::/112"])
    requests = [Request(f"default/s{i}", (4,) if i < 500 else (6,), True, (), None, None,
                        frozenset({("TCP", 80)}), ()) for i in range(10_000)]
    result = Allocator([pool]).allocate(requests)
    given = [a for v in result.addresses.values() for a in v]
    assert len(given) == len(set(given)) == 10_000 and not result.problems
    assert given[0] == ip_address("192.0.2.0") and given[-1] == ip_address("2001:db8::251b")


def test_addresses_the_file_serves_are_never_given() -> None:
    request, _ = Request.of(svc("a", status=("192.0.2.64",)))
    assert request is not None
    r = Allocator(POOLS).allocate([request], reserved={ip_address("192.0.2.64"): "file services[0] (default/web)",
                                                       ip_address("192.0.2.65"): "file listeners[0] (web)"})
    assert [str(a) for a in r.addresses["default/a"]] == ["192.0.2.66"]
