"""Maglev with crafted packets: both LBs place thousands of flows alike, and losing a node moves only its flows."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tests.dataplane.harness import Plane, frontend, require_scapy
from tests.lab.lab import address

pytestmark = pytest.mark.lab

FLOWS = 3000


def _flows() -> list[tuple[str, int]]:
    """Distinct (source, port) pairs from the client's /25: answers to them die unanswered at the router."""
    rng = random.Random(20240611)
    flows: set[tuple[str, int]] = set()
    while len(flows) < FLOWS:
        flows.add((f"192.0.2.{rng.randrange(131, 255)}", rng.randrange(1024, 65536)))
    return sorted(flows)


def test_i_lbs_agree_flow_by_flow_and_a_lost_node_moves_only_its_flows(plane: Plane) -> None:
    require_scapy()
    flows = _flows()
    f = frontend()
    plane.apply(f, lb="lb1")
    plane.apply(f, lb="lb2")
    first = plane.dl.destinations("lb1", flows)
    assert plane.dl.destinations("lb2", flows) == first  # an ECMP change between LBs keeps every flow's node
    names = {address(n): n for n in ("node1", "node2", "node3")}
    predicted = {flow: p.node for flow in flows if (p := plane.predict(f, *flow)) is not None}
    if plane.predictable:  # every flow where the data plane's own prediction (`lbagent plan --flow`) says
        assert predicted == {flow: names[a] for flow, a in first.items()}
    share = Counter(names[a] for a in first.values())
    assert all(0.25 < share[n] / FLOWS < 0.42 for n in names.values()), share

    plane.apply(frontend(nodes=("node1", "node3")), lb="lb1", changed=["default/web"])
    plane.dl.flush_conntrack("lb1")
    after = plane.dl.destinations("lb1", flows)
    lost = [flow for flow in flows if names[first[flow]] == "node2"]
    kept = [flow for flow in flows if names[first[flow]] != "node2"]
    assert all(names[after[flow]] in ("node1", "node3") for flow in lost)
    moved = [flow for flow in kept if after[flow] != first[flow]]
    assert len(moved) < 0.03 * len(kept), f"{len(moved)} of {len(kept)} flows of the remaining nodes moved"
    print(f"\n{plane.kind}: node2 had {len(lost)} of {FLOWS} flows; of the other {len(kept)}, {len(moved)} moved")
