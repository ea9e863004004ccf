"""The BGP reconciler: the plan's announcements of the VIPs this node can serve, through the speaker (ExaBGP)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from lbagent import model
from lbagent.agent.metrics import Metrics
from lbagent.agent.reconciler import Desired, Reconciler
from lbagent.l3.speaker import BgpSpeaker
from lbagent.logfmt import event
from lbagent.plan.overlay import changed_keys
from lbagent.plan.services import Announcement, Plan, ServiceDecision

log = logging.getLogger("lbagent.agent")

SpeakerFactory = Callable[[model.Bgp, str, Callable[[], None]], BgpSpeaker]


class BgpReconciler(Reconciler):
    """Owns the speaker (made here, told to sync again whenever it reports a change) and what it announces, the
    services' last logged decisions, and whether the set it announces is complete (`complete`: the agent's first
    syncs are done; with graceful restart the speaker then ends the routers' wait with End-of-RIB).

    `servable` says which VIPs may be announced now (the Agent's rule: bound, and forwarded by the kernel or served
    by HAProxy). After a withdrawal its readers (the VIPs reconciler) follow: an address is unbound only once it is
    withdrawn."""

    def __init__(self, desired: Desired, settings: model.Agent, metrics: Metrics, speaker_factory: SpeakerFactory,
                 servable: Callable[[], set[model.IPAddress]]) -> None:
        super().__init__("bgp", desired, settings, metrics)
        m = desired.model
        self.speaker = speaker_factory(m.bgp, m.agent.runtime_dir, self.mark_dirty)
        self._servable = servable
        self.complete = False
        self._restarts = 0
        self._decisions: Mapping[str, ServiceDecision] = {}

    async def reconcile(self, resync: bool) -> None:
        p = self.desired.current_plan()
        # Never attract traffic this node cannot serve yet: the VIP must be bound and its forwarding programmed.
        # (the VIPs that are not servable, found by set operations on the hashes the sets already hold: hashing
        # 10,000 address objects again is 7 ms of slow Python per pass, and most passes find none)
        unservable = set(self.desired.model.services_by_vip) - self._servable()
        if unservable:
            gone = {model.host_prefix(vip) for vip in unservable}
            wanted: Mapping[str, Announcement] = {prefix: a for prefix, a in p.announcements.items()
                                                  if prefix not in gone}
        else:
            wanted = p.announcements
        before = set(self.speaker.announced())
        await self.speaker.apply(wanted, complete=self.complete)
        self.log_decisions(p)
        self.metrics.bgp(self.speaker.peers(), len(self.speaker.announced()))
        if self.speaker.restarts > self._restarts:
            self.metrics.process_restarts.labels("exabgp").inc(self.speaker.restarts - self._restarts)
            self._restarts = self.speaker.restarts
        if before - set(self.speaker.announced()):
            self._changed()

    def started(self) -> None:
        """Everything this node serves is bound and programmed now: the next pass announces all of it, complete."""
        self.complete = True
        self.mark_dirty()

    async def withdraw_all(self) -> None:
        """Withdraw every route (the agent stops: the routers move traffic to the other LB nodes)."""
        await self.speaker.withdraw_all()
        self.log_decisions(self.desired.current_plan())

    async def stop(self) -> None:
        await self.speaker.stop()

    def log_decisions(self, p: Plan) -> None:
        """Log and export the services whose announce decision changed since the last call, and only those."""
        current = p.decision_by_service
        keys = changed_keys(self._decisions, current)  # two overlays of one plan: only the keys replaced since
        changed = []
        for key, decision in current.items() if keys is None else ((k, current[k]) for k in sorted(keys)):
            previous = self._decisions.get(key)
            if previous is decision:  # replan keeps the decisions of services it did not touch
                continue
            if previous is not None and (previous.announce, previous.reason) == (decision.announce, decision.reason):
                continue
            changed.append(decision)
            event(
                log, logging.INFO if decision.announce else logging.WARNING,
                ("vip_announced" if decision.announce else "vip_withdrawn") if decision.vips
                else ("backend_ready" if decision.announce else "backend_unavailable"),
                service=key, vips=decision.vips, reason=decision.reason.value,
                healthy_nodes=decision.healthy_nodes or "-", unhealthy_nodes=decision.unhealthy_nodes or "-",
                draining_nodes=decision.draining_nodes or "-",
            )
        self.metrics.decisions(changed, set() if keys is not None else self._decisions.keys() - current.keys())
        self._decisions = current
