"""The frontends' change record: some services' frontends as last applied and as planned now, computed once by the
agent's data-plane reconciler (which owns what it last applied) and handed down to the forwarder and the renderer.

kube-proxy does the same with its `endpointsChange{previous, current}`: nothing below the one place that computes
a change keeps its own copy of the previous state to work it out again. Pure (the renderers read it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lbagent.plan.services import Frontend

ByService = Mapping[str, tuple[Frontend, ...]]


@dataclass(frozen=True)
class FrontendChange:
    """Services' frontends before (`previous`, as last applied) and after (`current`, as planned now). The record
    covers exactly the services of both mappings; the VIPs are those of the last apply (a change of the VIPs is a
    full apply, never a change record)."""

    previous: ByService
    current: ByService

    @classmethod
    def of(cls, previous: ByService, current: ByService, services: Iterable[str]) -> FrontendChange:
        """The change of these services only, from mappings that hold every service (what was applied, the
        plan's `by_service`)."""
        before: dict[str, tuple[Frontend, ...]] = {}
        after: dict[str, tuple[Frontend, ...]] = {}
        for key in services:
            if (old := previous.get(key)) is not None:
                before[key] = old
            if (new := current.get(key)) is not None:
                after[key] = new
        return cls(before, after)

    @property
    def services(self) -> set[str]:
        """Every service the record covers: added (in `current` only), removed (in `previous` only), changed or
        not (in both)."""
        return self.previous.keys() | self.current.keys()

    def before(self, service: str) -> tuple[Frontend, ...]:
        return self.previous.get(service, ())

    def after(self, service: str) -> tuple[Frontend, ...]:
        return self.current.get(service, ())

    def old(self) -> list[Frontend]:
        """Every previous frontend of the covered services: what leaves the kernel."""
        return [f for fs in self.previous.values() for f in fs]

    def new(self) -> list[Frontend]:
        """Every current frontend of the covered services: what takes their place."""
        return [f for fs in self.current.values() for f in fs]
