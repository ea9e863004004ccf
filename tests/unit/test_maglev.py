"""The Maglev lookup table is the same on every LB node, whatever lbagent version it runs: a flow moved between two
LBs mid-upgrade must land on the same node. So the table is pinned (digests of its slots for a few node sets, as
every version since the first computed them) and held, over random node sets and weights, to the algorithm written
the plain way (the paper's: each backend's next preferred slot computed from its count of tries)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import pytest

from lbagent.l4 import maglev


def _plain(backends: Sequence[tuple[str, int]], size: int) -> list[int]:
    if not backends or all(weight <= 0 for _, weight in backends):
        return []
    offsets = [maglev._hash(name, b"maglev-offset") % size for name, _ in backends]
    skips = [maglev._hash(name, b"maglev-skip") % (size - 1) + 1 for name, _ in backends]
    heaviest = max(weight for _, weight in backends)
    credit, tries, slots, filled = [0] * len(backends), [0] * len(backends), [-1] * size, 0
    while True:
        for i, (_, weight) in enumerate(backends):
            credit[i] += weight
            while credit[i] >= heaviest:
                credit[i] -= heaviest
                while True:
                    slot = (offsets[i] + tries[i] * skips[i]) % size
                    tries[i] += 1
                    if slots[slot] < 0:
                        break
                slots[slot] = i
                filled += 1
                if filled == size:
                    return slots


@pytest.mark.parametrize(("backends", "size", "digest"), [
    ([(f"node{i}", 1) for i in range(1, 21)], 1021, "4b998bfec3fa8920"),
    ([("node1", 1), ("node2", 0), ("node3", 3)], 101, "0e8d1f8207d9a8ee"),
    ([(f"node{i}", 1) for i in range(1, 4)], 65521, "3550b648f0bbb473"),
])
def test_the_table_is_the_one_every_version_computes(backends: list[tuple[str, int]], size: int, digest: str) -> None:
    assert hashlib.sha256(repr(maglev.table(backends, size)).encode()).hexdigest()[:16] == digest


def test_the_table_is_the_plain_algorithms_over_random_node_sets_and_weights() -> None:
    rng = random.Random(1)
    for _ in range(300):
        size = rng.choice([7, 13, 101, 1021, 4099])
        backends = [(f"node{rng.randrange(1000)}-{i}", rng.choice([0, 1, 1, 2, 3]) if rng.random() < 0.5 else 1)
                    for i in range(rng.randint(1, 25))]
        assert maglev.table(backends, size) == _plain(backends, size), (backends, size)
