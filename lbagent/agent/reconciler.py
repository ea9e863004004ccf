"""What every reconciler is: one subsystem (VIPs, data plane, BGP, HTTP proxy) brought to what the plan wants.

Cilium's BGP control plane does the same with one small reconciler per concern (Name, Init, Reconcile): each
reconciler owns its subsystem's state (what it last applied, what the kernel or the daemon holds now), its runner
(the dirty flag, the rate limit, the periodic resync, the retries) and its sync metrics, and nothing else keeps a
copy of that state. The Agent decides when they run (events mark them dirty) and wires who reads whom: a
reconciler whose state changed marks its readers dirty, which is how a VIP gets announced only after it is bound
and forwarded, and unbound only after it is withdrawn.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Protocol

from lbagent import model
from lbagent.agent.metrics import Metrics
from lbagent.agent.runner import BoundedFrequencyRunner
from lbagent.plan.services import Plan


class Desired(Protocol):
    """Where the reconcilers read what is wanted now (the Agent: it reloads the model and recomputes the plan only
    as far as reloads and health changes require)."""

    @property
    def model(self) -> model.Model: ...

    def current_plan(self) -> Plan: ...


class Reconciler(ABC):
    """One subsystem's reconciler: `reconcile(resync)` brings it to what is wanted, run by its own bounded-frequency
    runner (coalesced, rate-limited, resynced every `agent.resync`, retried after `agent.retry`). `stop()` lets go of
    what it runs when the agent stops."""

    def __init__(self, name: str, desired: Desired, settings: model.Agent, metrics: Metrics) -> None:
        self.name = name
        self.desired = desired
        self.metrics = metrics
        self.runner = BoundedFrequencyRunner(name, self._measured, settings.min_sync_interval,
                                             settings.resync_seconds, settings.retry_seconds)
        self.readers: list[Reconciler] = []  # the reconcilers that read this one's state (wired by the Agent)

    def mark_dirty(self) -> None:
        self.runner.mark_dirty()

    def _changed(self) -> None:
        """This subsystem's state that others read changed: they follow."""
        for reader in self.readers:
            reader.mark_dirty()

    @abstractmethod
    async def reconcile(self, resync: bool) -> None:
        """Bring the subsystem to what is wanted now; `resync`: the periodic full pass (re-apply even if nothing
        changed). Raises on failure: the runner retries."""

    async def stop(self) -> None:  # noqa: B027 - not abstract: most reconcilers run nothing of their own
        """The agent stops (after every runner has): let go of what this subsystem runs, if anything."""

    async def _measured(self, resync: bool) -> None:
        started = time.monotonic()
        try:
            await self.reconcile(resync)
        except Exception:
            self.metrics.sync_errors.labels(self.name).inc()
            raise
        finally:
            self.metrics.sync_duration.labels(self.name).observe(time.monotonic() - started)
        self.metrics.last_sync.labels(self.name).set(time.time())
