"""A read-only mapping made again for a few keys without copying the rest: the plan's per-service mappings.

An `Overlay` is a base mapping, shared and never changed, and the values that replace some of its keys. Making one
for a few changed keys (`replaced`) costs those keys, not the size of the base, until the replaced values are many:
then they are folded into a new base (a copy every ~2*sqrt(n) changes, so a change costs O(sqrt n) amortized, a few
microseconds at 10,000 keys). The keys, and their order, are always the base's: a key that is new or gone makes a
new base (the planner then orders it as the model does).

Two overlays of one base know which keys they may differ in (`changed_keys`): a consumer that compares the plan it
saw last with the new one (the BGP speaker's decision log) reads those, not every service.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, Mapping, ValuesView
from math import isqrt
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

_MISSING = object()


class Overlay(Mapping[K, V]):
    __slots__ = ("_base", "_top")

    def __init__(self, base: Mapping[K, V], top: Mapping[K, V] | None = None) -> None:
        """`base` becomes the overlay's own: nobody may change it afterwards. `top` holds keys of `base` only."""
        self._base = base
        self._top: Mapping[K, V] = top if top is not None else {}

    @classmethod
    def of(cls, mapping: Mapping[K, V]) -> Overlay[K, V]:
        return mapping if isinstance(mapping, Overlay) else cls(mapping)

    def replaced(self, changes: Mapping[K, V]) -> Overlay[K, V]:
        """This mapping with `changes` set: a new overlay of the same base while every key of `changes` is one of
        its keys and the replaced values are few; a new base otherwise (a new key goes last, as in a dict)."""
        if not changes:
            return self
        top = {**self._top, **changes}
        base = self._base
        if len(top) <= max(64, 2 * isqrt(len(base))) and all(k in base for k in changes):
            return Overlay(base, top)
        flat = dict(base)
        flat.update(top)
        return Overlay(flat)

    def __getitem__(self, key: K) -> V:
        value = self._top.get(key, _MISSING)
        return self._base[key] if value is _MISSING else value  # type: ignore[return-value]

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        value = self._top.get(key, _MISSING)
        return self._base.get(key, default) if value is _MISSING else value  # type: ignore[return-value]

    def __contains__(self, key: object) -> bool:
        return key in self._base

    def __iter__(self) -> Iterator[K]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)

    def values(self) -> ValuesView[V]:
        return _Values(self)

    def items(self) -> ItemsView[K, V]:
        return _Items(self)

    def _pairs(self) -> Iterator[tuple[K, V]]:
        top = self._top
        if not top:
            yield from self._base.items()
            return
        for key, value in self._base.items():
            yield key, top.get(key, value)

    def __repr__(self) -> str:
        return f"Overlay({dict(self._pairs())!r})"


class _Values(ValuesView[V]):
    _mapping: Overlay[object, V]

    def __iter__(self) -> Iterator[V]:
        return (value for _, value in self._mapping._pairs())


class _Items(ItemsView[K, V]):
    _mapping: Overlay[K, V]

    def __iter__(self) -> Iterator[tuple[K, V]]:
        return self._mapping._pairs()


def changed_keys(old: Mapping[K, V], new: Mapping[K, V]) -> set[K] | None:
    """The keys whose values may differ between two mappings, when that is known without reading them all (two
    overlays of one base: the keys either replaced); None otherwise. Both then have the same keys."""
    if old is new:
        return set()
    if isinstance(old, Overlay) and isinstance(new, Overlay) and old._base is new._base:
        return set(old._top) | set(new._top)
    return None
