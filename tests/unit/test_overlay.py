"""lbagent.plan.overlay: an Overlay reads as the dict it stands for, whatever changes made it; changed_keys never
misses a key that differs."""

from __future__ import annotations

import random

from lbagent.plan.overlay import Overlay, changed_keys


def _same(o: Overlay[str, int], d: dict[str, int]) -> None:
    assert list(o) == list(d) and list(o.keys()) == list(d.keys())
    assert list(o.values()) == list(d.values()) and list(o.items()) == list(d.items())
    assert len(o) == len(d) and o == d and dict(o) == d
    for k, value in d.items():
        assert k in o and o[k] == value and o.get(k) == value
    assert "absent" not in o and o.get("absent") is None and o.get("absent", -1) == -1


def test_random_changes_read_as_the_dict_in_its_order_and_changed_keys_covers_every_difference() -> None:
    rng = random.Random(7)
    d = {f"k{i}": i for i in range(1000)}
    o: Overlay[str, int] = Overlay.of(dict(d))
    bases = set()
    for step in range(2000):
        changes = {f"k{rng.randrange(1000)}": rng.randrange(10**6) for _ in range(rng.randrange(1, 4))}
        before, snapshot = o, dict(d)
        o = o.replaced(changes)
        d.update(changes)
        bases.add(id(o._base))
        if step % 97 == 0:
            _same(o, d)
        keys = changed_keys(before, o)
        differ = {k for k in d if snapshot[k] != d[k]}
        assert keys is None or differ <= keys, (differ, keys)
        assert keys is None or keys <= set(changes) | set(before._top) | set(o._top)
        assert before == snapshot  # the overlay it was made from is unchanged
    _same(o, d)
    assert 1 < len(bases) < 100  # the replaced values are folded into a new base now and then, not each time


def test_a_new_key_makes_a_new_base_with_it_last_and_changed_keys_then_says_unknown() -> None:
    o: Overlay[str, int] = Overlay({"a": 1, "b": 2})
    grown = o.replaced({"c": 3, "a": 5})
    _same(grown, {"a": 5, "b": 2, "c": 3})
    assert changed_keys(o, grown) is None
    assert changed_keys(grown, grown) == set()
    assert changed_keys({"a": 1}, {"a": 1}) is None  # plain dicts: only a full comparison can tell
    assert o.replaced({}) is o


def test_overlays_of_one_base_name_only_their_replaced_keys() -> None:
    base = {f"k{i}": i for i in range(100)}
    o: Overlay[str, int] = Overlay(base)
    one, two = o.replaced({"k1": -1}), o.replaced({"k2": -2})
    assert changed_keys(one, two) == {"k1", "k2"}
    assert changed_keys(o, one) == {"k1"}
    assert one["k2"] == 2 and two["k2"] == -2 and base["k1"] == 1
