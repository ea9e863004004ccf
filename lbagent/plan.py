"""Pure planning: what every subsystem must look like now, and why, from the model and the health snapshot."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Announcement:
    """One route lbagent announces: a VIP host prefix with this node as next hop, and its attributes."""

    prefix: str
    med: int | None = None
    local_pref: int | None = None
    communities: tuple[str, ...] = ()
