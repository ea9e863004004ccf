"""IpvsForwarder in the guest's kernel: ipvs_forwarder_check.py drives it with real frontends and real packets."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from lbagent.l4.ipvs.render import F_PERSISTENT, F_SCHED1, F_SCHED2
from tests.guest.ipvs_forwarder_check import (
    CLIENT,
    CLIENT6,
    FOREIGN_VIP,
    LB_BACKEND_SIDE,
    NODES,
    OTHER_CLIENT,
    VIP,
    VIP6,
)
from tests.guest.vm import Guest

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
REQUESTS = 30
TCP_SERVICES = {f"tcp {VIP}:{port}" for port in (80, 81, 82, 83)} | {f"tcp [{VIP6}]:80"}
UDP_SERVICE = f"udp {VIP}:53"


@pytest.fixture(scope="module")
def report(guest: Guest) -> dict[str, Any]:
    """One run of the check for the whole module: building the lab and the graceful drain take most of a minute."""
    argv = [sys.executable, "-m", "tests.guest.ipvs_forwarder_check", "--requests", str(REQUESTS)]
    result = guest.run(argv, cwd=REPO, timeout=420)
    assert result.returncode == 0, f"ipvs_forwarder_check failed:\n{result.stdout}\n{result.stderr}"
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def _spread_over(spread: dict[str, Any], nodes: set[str], clients: list[str]) -> None:
    assert set(spread["backends"]) == nodes, spread
    assert spread["clients"] == clients, spread


def test_first_apply_makes_a_service_per_frontend_with_backends_and_owns_its_vips_only(report: dict[str, Any]) -> None:
    ops = report["first"]["ops"]
    assert report["first"]["how"] == "full"
    created = {op.removeprefix("add-service ").rsplit(" ", 1)[0] for op in ops if op.startswith("add-service")}
    assert created == {
        f"tcp/{VIP}:80", f"tcp/{VIP}:81", f"tcp/{VIP}:82", f"tcp/{VIP}:83", f"udp/{VIP}:53", f"tcp/[{VIP6}]:80",
    }
    # The stray service on lbagent's VIP goes; the one on someone else's address stays untouched.
    assert f"del-service tcp/{VIP}:9999" in ops
    assert not [op for op in ops if FOREIGN_VIP in op]
    assert len([op for op in ops if op.startswith("add-dest")]) == 6 * len(NODES)
    services = report["services"]
    assert set(services) == TCP_SERVICES | {UDP_SERVICE, f"tcp {FOREIGN_VIP}:80"}
    for key in TCP_SERVICES | {UDP_SERVICE}:
        assert {(d["fwd_method"], d["weight"]) for d in services[key]["dests"].values()} == {(0, 1)}, key
        assert set(services[key]["dests"]) == set(NODES), key


def test_second_apply_does_nothing_and_a_forced_one_only_rewrites_the_nft_table(report: dict[str, Any]) -> None:
    assert report["second"] == {"how": "unchanged", "ops": []}
    assert report["forced"] == {"how": "full", "ops": []}


def test_service_settings_scheduler_flags_persistence_and_ipv6_netmask(report: dict[str, Any]) -> None:
    services = report["services"]
    assert (services[f"tcp {VIP}:80"]["scheduler"], services[f"tcp {VIP}:80"]["flags"]) == ("rr", 0)
    assert (services[f"tcp {VIP}:81"]["scheduler"], services[f"tcp {VIP}:81"]["flags"]) == ("mh", F_SCHED1 | F_SCHED2)
    assert "mh (mh-fallback,mh-port)" in report["ipvsadm"]
    affinity = services[f"tcp {VIP}:83"]
    assert (affinity["flags"], affinity["timeout"]) == (F_PERSISTENT, 60)
    assert services[f"tcp [{VIP6}]:80"]["netmask"] == "128.0.0.0"
    assert report["programmed"] == [VIP, VIP6]


def test_round_robin_spreads_evenly_and_nat_mode_keeps_the_client_address(report: dict[str, Any]) -> None:
    _spread_over(report["rr"], set(NODES), [CLIENT])
    assert set(report["rr"]["backends"].values()) == {REQUESTS // len(NODES)}


def test_maglev_hashing_spreads_and_masquerade_shows_the_lb_address(report: dict[str, Any]) -> None:
    _spread_over(report["mh"], set(NODES), [LB_BACKEND_SIDE])
    assert f"{VIP} . tcp . 30081" in report["nft"]


def test_udp_is_forwarded_and_masqueraded(report: dict[str, Any]) -> None:
    _spread_over(report["udp"], set(NODES), [LB_BACKEND_SIDE])


def test_ipv6_vip_is_forwarded_in_nat_mode(report: dict[str, Any]) -> None:
    _spread_over(report["v6"], set(NODES), [CLIENT6])


def test_source_ranges_drop_other_clients_only_on_their_frontend(report: dict[str, Any]) -> None:
    assert report["ranged"] == {
        "allowed": "answered", "other_client": "timeout", "other_client_unranged_frontend": "answered",
    }


def test_a_process_on_the_lb_node_reaches_the_vips_too(report: dict[str, Any]) -> None:
    assert report["local"] == {"nat": "answered", "masquerade": "answered", "v6": "answered"}


def test_affinity_keeps_each_client_on_one_node(report: dict[str, Any]) -> None:
    for client in (CLIENT, OTHER_CLIENT):
        assert len(report["affinity"][client]["backends"]) == 1, report["affinity"]


def test_a_frontend_without_backends_is_refused_even_with_a_listener_on_the_lb(report: dict[str, Any]) -> None:
    assert report["empty"] == {"vip": "refused", "lb_own_address": "connected", "vip_unconfigured_port": "refused"}


def test_graceful_removal_drains_tcp_and_drops_udp_at_once(report: dict[str, Any]) -> None:
    removal = report["removal"]
    victim = removal["victim"]
    rest = set(NODES) - {victim}
    first = removal["applies"][0]["ops"]
    assert len([op for op in first if op.startswith("set-dest") and op.endswith("weight 0")]) == len(TCP_SERVICES)
    assert [op for op in first if op.startswith("del-dest")] == [
        f"del-dest udp/{VIP}:53 {NODES[victim][0]}:30053"
    ]
    # No new flow reaches the leaving node; the connections already there keep working.
    _spread_over(removal["new_flows"]["rr"], rest, [CLIENT])
    _spread_over(removal["new_flows"]["mh"], rest, [LB_BACKEND_SIDE])
    assert removal["kept_alive"] == [victim] * 3
    for key in (f"tcp {VIP}:80", f"tcp {VIP}:81"):
        held = removal["services_while_kept"][key]["dests"][victim]
        assert (held["weight"], held["active"] >= 1) == (0, True), key
    assert victim not in removal["services_while_kept"][UDP_SERVICE]["dests"]
    # Deleted once its connections have ended (a reset connection stays 10 s in IPVS's CLOSE state).
    assert removal["deleted_after_close_s"] is not None
    deletions = [op for a in removal["applies"][1:] for op in a["ops"]]
    assert sorted(deletions) == sorted(op.replace("set-dest", "del-dest").removesuffix(" weight 0")
                                       for op in first if op.startswith("set-dest"))
    assert removal["applies"][-1] == {"how": "unchanged", "ops": []}
    assert all(victim not in s["dests"] for s in removal["services_after"].values())


def test_settings_change_in_place_and_a_returning_node_is_added_back(report: dict[str, Any]) -> None:
    changes = report["changes"]
    assert [op.split()[0] for op in changes["back"]["ops"]] == ["add-dest"] * 6
    assert changes["settings"] == {"how": "delta", "ops": [f"set-service tcp/{VIP}:80 wrr"]}
    after = changes["rr_after"]
    assert (after["scheduler"], after["flags"], after["timeout"], len(after["dests"])) == ("wrr", F_PERSISTENT, 30, 3)
    assert changes["settings_again"] == {"how": "unchanged", "ops": []}


def test_changed_services_only_are_diffed(report: dict[str, Any]) -> None:
    assert report["delta"] == {"how": "delta", "ops": [f"set-dest tcp/{VIP}:81 {NODES['be1'][0]}:30081 weight 3"]}
    assert report["delta_weights"] == {"be1": 3, "be2": 1, "be3": 1}


def test_a_frontend_that_is_gone_loses_its_service_at_once(report: dict[str, Any]) -> None:
    assert report["gone"] == {"how": "delta", "ops": [f"del-service tcp/{VIP}:83"]}
    assert f"tcp {VIP}:83" not in report["gone_services"]


def test_a_frontend_left_without_backends_drains_then_loses_its_service(report: dict[str, Any]) -> None:
    drain = report["drain"]
    assert drain["first"]["ops"] == [f"set-dest tcp/[{VIP6}]:80 [{NODES[be][1]}]:30085 weight 0" for be in NODES]
    assert drain["programmed"] == [VIP]
    assert {d["weight"] for d in drain["service"]["dests"].values()} == {0}
    assert drain["connect_while_draining"] == "refused"  # IPVS: ICMP port unreachable
    assert drain["second"] == {"how": "delta", "ops": [f"del-service tcp/[{VIP6}]:80"]}
    assert drain["service_after"] is None
    assert drain["connect_after"] == "refused"  # the nft input chain: TCP reset


def test_restart_adopts_and_cleanup_from_a_fresh_process_removes_only_lbagents(report: dict[str, Any]) -> None:
    assert report["restart"] == {"how": "full", "ops": []}
    assert report["after_cleanup"] == {"services": [f"tcp {FOREIGN_VIP}:80"], "nft_tables": ""}
