"""Two IPVS LB nodes in the guest's kernel and connections moved between them mid-stream: nat keeps them, dsr (IPVS
direct routing) keeps them and its answers bypass the LBs, and without sloppy_tcp the moved ones are reset
(ipvs_failover_check.py builds the namespaces and sends the packets)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.guest.ipvs_failover_check import (
    AGENT_SYSCTLS,
    CLIENT,
    DSR_PORT,
    FAR_NODE,
    NAT_NODE_PORT,
    NAT_PORT,
    NODES,
)
from tests.guest.vm import Guest

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
PER_PORT = 3  # long-lived connections to each frontend
ANSWERS = 5  # answers each connection must get through each LB in turn


@pytest.fixture(scope="module")
def report(guest: Guest) -> dict[str, Any]:
    argv = [sys.executable, "-m", "tests.guest.ipvs_failover_check", "--per-port", str(PER_PORT),
            "--answers", str(ANSWERS)]
    result = guest.run(argv, cwd=REPO, timeout=300)
    assert result.returncode == 0, f"ipvs_failover_check failed:\n{result.stdout}\n{result.stderr}"
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def test_both_lbs_get_the_agents_sysctls(report: dict[str, Any]) -> None:
    for lb, values in report["sysctls"].items():
        assert values == AGENT_SYSCTLS, lb
    assert report["strict_sysctls"] == {"lbA": "0", "lbB": "0"}


def test_dsr_real_servers_are_routed_to_the_frontends_port_and_nodes_off_link_are_left_out(
        report: dict[str, Any]) -> None:
    assert report["ops"]["lbA"] == report["ops"]["lbB"]
    for lb, listing in report["ipvsadm"].items():
        lines = [line.split() for line in listing.splitlines() if line.strip().startswith("->")][1:]
        assert sorted((fields[1], fields[2]) for fields in lines) == sorted(
            [(f"{a}:{NAT_NODE_PORT}", "Masq") for a in NODES.values()]
            + [(f"{a}:{DSR_PORT}", "Route") for a in NODES.values()]), lb
        assert FAR_NODE[1] not in listing
    assert [(e["event"], e["nodes"]) for e in report["events"]] == [
        ("dsr_node_not_on_link", f"{FAR_NODE[0]} {FAR_NODE[1]}")] * 2  # once by each LB's forwarder


def test_new_flows_through_either_lb_spread_over_the_nodes_and_keep_the_client_address(
        report: dict[str, Any]) -> None:
    for lb, by_port in report["fresh"].items():
        for port in (NAT_PORT, DSR_PORT):
            spread = by_port[str(port)]
            assert len(spread["backends"]) >= 2 and set(spread["backends"]) <= set(NODES), (lb, port, spread)
            assert spread["clients"] == [CLIENT], (lb, port, spread)


def test_dsr_answers_go_through_the_router_never_an_lb(report: dict[str, Any]) -> None:
    for key in ("counters", "counters_after_moves"):
        counters = report[key]
        for lb in ("lbA", "lbB"):
            assert counters[lb]["answers_from_vip"] == 0, (key, counters)
            # The probe does see the nodes' nat answers, which do come back through the LB.
            assert counters[lb]["nat_answers"] > 0, (key, counters)
        # At least one answer packet per dsr request of the fresh flows (12 through each LB).
        assert counters["router"]["answers_from_vip"] >= 24, (key, counters)


def _moved_through_lbb(run: dict[str, Any]) -> None:
    """The route really moved: lbB saw nothing while the route went to lbA, and both frontends' packets after."""
    phases = run["lb_packets_by_phase"]
    assert phases[0]["lbB"] == {"to_nat": 0, "to_dsr": 0}, phases
    assert phases[1]["lbB"]["to_nat"] > 0 and phases[1]["lbB"]["to_dsr"] > 0, phases


def test_with_sloppy_tcp_every_connection_survives_moving_to_the_other_lb_and_back(report: dict[str, Any]) -> None:
    run = report["sloppy"]
    assert run["route"] == ["lbA", "lbB", "lbA"] and "timeouts" not in run, run.get("timeouts")
    _moved_through_lbb(run)
    connections = run["connections"]
    assert sorted(c["port"] for c in connections) == [NAT_PORT] * 3 + [DSR_PORT] * 3
    for c in connections:
        assert c["error"] is None, c
        assert len(c["nodes"]) == 1 and c["nodes"][0] in NODES, c
        assert c["clients"] == [CLIENT], c
        assert min(c["answers_by_phase"]) >= ANSWERS, c
        # Both LBs' IPVS hold the flow, lbB's made from a mid-stream packet, with the same real server.
        node = NODES[c["nodes"][0]]
        server = f"{node}:{NAT_NODE_PORT if c['port'] == NAT_PORT else DSR_PORT}"
        for lb in ("lbA", "lbB"):
            assert run["ipvs_connections"][lb][str(c["source_port"])] == ["ESTABLISHED", server], (lb, c)


def test_without_sloppy_tcp_the_moved_connections_are_reset(report: dict[str, Any]) -> None:
    run = report["strict"]
    assert run["route"] == ["lbA", "lbB"] and "timeouts" not in run, run.get("timeouts")
    _moved_through_lbb(run)
    for c in run["connections"]:
        assert c["answers_by_phase"][0] >= ANSWERS, c
        assert c["error"] == [1, "ConnectionResetError"], c
        assert c["answers_by_phase"][1:] == [0, 0], c
        # lbB never scheduled the flow (no SYN): its IPVS has no connection for it.
        assert str(c["source_port"]) not in run["ipvs_connections"]["lbB"], c
