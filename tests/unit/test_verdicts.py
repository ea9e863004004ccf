"""lbagent.verdicts: the agent's verdicts read as the dict of pairs they stand for, by pair and by service,
whatever changes made them; a plan from them is the plan from that dict."""

from __future__ import annotations

import random
from dataclasses import replace

from lbagent.plan.services import plan
from lbagent.verdicts import Verdicts
from tests.unit.test_plan_render import three_nodes


def _same(v: Verdicts, d: dict[tuple[str, str], bool]) -> None:
    assert v == d and dict(v) == d and len(v) == len(d) and set(v.items()) == set(d.items())
    assert all(p in v and v[p] == h and v.get(p) == h for p, h in d.items())
    assert ('default/s0', 'node9') not in v and v.get(('absent/service', 'node1')) is None
    by_service: dict[str, dict[str, bool]] = {}
    for (service, node), healthy in d.items():
        by_service.setdefault(service, {})[node] = healthy
    for service, nodes in by_service.items():
        assert dict(v.of(service)) == nodes
    assert v._by_service.keys() == by_service.keys()  # a service with no verdict left is forgotten
    assert v.of("absent/service") == {}


def test_random_changes_keep_pairs_and_services_in_step() -> None:
    rng = random.Random(3)
    pairs = [(f"default/s{i}", f"node{j}") for i in range(20) for j in range(5)]
    v, d = Verdicts(), {}
    for step in range(3000):
        pair, op = rng.choice(pairs), rng.random()
        if op < 0.5:
            v[pair] = d[pair] = rng.random() < 0.7
        elif op < 0.8:
            assert v.pop(pair, None) == d.pop(pair, None)
        elif op < 0.81:
            v.clear()
            d.clear()
        else:
            batch = {p: rng.random() < 0.5 for p in rng.sample(pairs, 7)}
            v.update(batch)
            d.update(batch)
        if step % 50 == 0:
            _same(v, d)
    _same(v, d)


def test_a_plan_from_verdicts_is_the_plan_from_the_same_pairs() -> None:
    m = three_nodes()
    # and every other service with its endpoints on some nodes only (Local: the EndpointSlices name them)
    m = replace(m, services=tuple(replace(s, endpoint_nodes=("node1", "node3")) if i % 2 else s
                                  for i, s in enumerate(m.services)))
    assert any(s.endpoint_nodes for s in m.services)
    rng = random.Random(5)
    pairs = [(s.key, n.name) for s in m.services for n in m.nodes]
    for _ in range(20):
        d = {p: rng.random() < 0.6 for p in pairs if rng.random() < 0.9}  # some pairs not probed yet
        a, b = plan(m, d), plan(m, Verdicts(d))
        assert (a.frontends, a.decisions, dict(a.announcements)) == (b.frontends, b.decisions, dict(b.announcements))
