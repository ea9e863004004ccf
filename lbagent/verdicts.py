"""The health verdicts: kept by the health checker, read by the planner (kernel: both rooms use them)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping

Pair = tuple[str, str]  # (service or `backend:NAME`, node or endpoint)

_NONE: Mapping[str, bool] = {}


class Verdicts(MutableMapping[Pair, bool]):
    """Verdicts of (service, node) pairs, kept as each service's verdicts by node (`of`): a whole plan reads a
    service's nodes from its own small dict instead of looking each pair up among all of them (200,000 at 10,000
    services x 20 nodes: 0.1 s of a 0.2 s plan, mostly cache misses), and no dict of every pair is kept beside."""

    __slots__ = ("_by_service", "_count")

    def __init__(self, pairs: Mapping[Pair, bool] | None = None) -> None:
        self._by_service: dict[str, dict[str, bool]] = {}
        self._count = 0
        if pairs:
            self.update(pairs)

    def of(self, service: str) -> Mapping[str, bool]:
        """The service's verdicts by node (or endpoint); empty when none is known."""
        return self._by_service.get(service, _NONE)

    def __setitem__(self, pair: Pair, healthy: bool) -> None:
        nodes = self._by_service.get(pair[0])
        if nodes is None:
            nodes = self._by_service[pair[0]] = {}
        if pair[1] not in nodes:
            self._count += 1
        nodes[pair[1]] = healthy

    def __delitem__(self, pair: Pair) -> None:
        nodes = self._by_service[pair[0]]
        del nodes[pair[1]]
        self._count -= 1
        if not nodes:
            del self._by_service[pair[0]]

    def clear(self) -> None:
        self._by_service.clear()
        self._count = 0

    def __getitem__(self, pair: Pair) -> bool:
        return self._by_service[pair[0]][pair[1]]

    def get(self, pair: Pair, default: bool | None = None) -> bool | None:  # type: ignore[override]
        return self._by_service.get(pair[0], _NONE).get(pair[1], default)

    def __contains__(self, pair: object) -> bool:
        if not isinstance(pair, tuple) or len(pair) != 2:
            return False
        return pair[1] in self._by_service.get(pair[0], _NONE)

    def __iter__(self) -> Iterator[Pair]:
        return ((service, node) for service, nodes in self._by_service.items() for node in nodes)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"Verdicts({dict(self.items())!r})"
