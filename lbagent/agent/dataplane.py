"""The data-plane reconciler: the plan's L4 frontends in the kernel through the configured forwarder, the frontends'
change record computed here (and only here), drift in the forwarder's nftables table repaired, with backoff."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from lbagent import model
from lbagent.agent.metrics import Metrics
from lbagent.agent.reconciler import Desired, Reconciler
from lbagent.l4.conntrack import clear_udp
from lbagent.l4.drift import NftChange, NftWatcher
from lbagent.l4.forwarder import Forwarder, FrontendChange
from lbagent.l4.refusals import RefusalWatcher, Refused
from lbagent.logfmt import event
from lbagent.plan.services import Frontend, StaleFlows, stale_udp_flows

log = logging.getLogger("lbagent.agent")

# Drift repairs: the first few at once; when drift keeps coming with less than DRIFT_QUIET seconds between reports,
# each further repair waits twice as long as the one before, up to DRIFT_DELAY_MAX.
DRIFT_QUIET = 10.0
DRIFT_PROMPT_REPAIRS = 3
DRIFT_DELAY_MAX = 30.0


def drift_repair_delay(streak: int) -> float:
    """Seconds to wait before repairing the `streak`-th drift report in a row."""
    if streak <= DRIFT_PROMPT_REPAIRS:
        return 0.0
    return min(DRIFT_DELAY_MAX, 0.5 * 2.0 ** (streak - DRIFT_PROMPT_REPAIRS - 1))


class DataplaneReconciler(Reconciler):
    """Owns what the kernel forwards: the frontends it last applied (`applied`, by service, and their VIPs), the
    services changed since (`_dirty`), the VIPs whose forwarding is in the kernel (`programmed`, read by the BGP
    reconciler: only a forwarded VIP is announced), and the drift state.

    Between two health changes it hands the forwarder a `FrontendChange` made from what it applied: the forwarder
    sends only those services' elements and keeps no copy of the frontends. After a reload, a failure or drift it
    applies everything."""

    def __init__(self, desired: Desired, settings: model.Agent, metrics: Metrics, forwarder: Forwarder) -> None:
        super().__init__("dataplane", desired, settings, metrics)
        self.forwarder = forwarder
        self.clear_udp: Callable[[StaleFlows], Awaitable[int]] = clear_udp
        self.applied: Mapping[str, tuple[Frontend, ...]] = {}
        self.applied_vips: tuple[model.IPAddress, ...] = ()
        self.programmed: set[model.IPAddress] = set()
        self._dirty: set[str] | None = None  # services changed since the last apply; None: all
        self._drift_pending = False  # the kernel lost what the data plane applied: unknown until the next apply
        self._drift_streak = 0  # drift reports with less than DRIFT_QUIET seconds between them
        self._drift_last = -DRIFT_QUIET
        self._drift_repair: asyncio.TimerHandle | None = None  # a repair put off because the drift keeps coming

    def service_changed(self, service: str) -> None:
        """A service's frontends may have changed (its health): the next sync sends only the changed ones."""
        if self._dirty is not None:
            self._dirty.add(service)
        self.mark_dirty()

    def invalidate(self) -> None:
        """Everything may have changed (a reload): the next sync applies the whole plan."""
        self._dirty = None

    async def reconcile(self, resync: bool) -> None:
        p = self.desired.current_plan()
        dirty, self._dirty = self._dirty, set()
        # The change since the last apply, made once here; none when only a whole apply will do (a resync, a
        # reload, the VIPs changed).
        change = None
        if not resync and dirty is not None and p.l4_vips == self.applied_vips:
            change = FrontendChange.of(self.applied, p.by_service, dirty)
        try:
            how = await self.forwarder.apply(p.frontends, p.l4_vips, force=resync, change=change)
        except BaseException:
            self._dirty = None  # whatever happened, the next sync applies everything
            if self._drift_pending and self.programmed:
                # Someone else changed the table and it could not be put back: nothing is known to forward.
                self.programmed = set()
                self._changed()
            raise
        self._drift_pending = False
        self.metrics.dataplane_applies.labels(how).inc()
        record = change or FrontendChange(self.applied, p.by_service)  # after a whole apply: every service
        for key in record.services:
            for stale in stale_udp_flows(record.before(key), record.after(key)):
                await self.clear_udp(stale)
        self.applied, self.applied_vips = p.by_service, p.l4_vips
        programmed = self.forwarder.programmed()
        if programmed != self.programmed:
            self.programmed = programmed
            self._changed()

    async def stop(self) -> None:
        if self._drift_repair is not None:
            self._drift_repair.cancel()
            self._drift_repair = None

    # -- drift ----------------------------------------------------------------------------------------

    def drift(self, change: NftChange) -> None:
        """Another process changed the data plane's nftables table: the next sync, at once, rewrites it whole.
        When the drift keeps coming (a firewall manager fighting over the table, or lbagent's own commits not
        recognised), repairs back off so that the two never spin each other."""
        self.metrics.drift.labels("dataplane").inc()
        now = time.monotonic()
        if now - self._drift_last > DRIFT_QUIET:
            self._drift_streak = 0
        self._drift_last = now
        self._drift_streak += 1
        delay = drift_repair_delay(self._drift_streak)
        event(log, logging.WARNING, "dataplane_drift", change=change.what, pid=change.pid, process=change.process,
              generation=change.generation, action="full apply now" if not delay else f"full apply in {delay:g}s",
              **({"repeated": self._drift_streak} if delay else {}))
        self._drift_pending = True
        self._dirty = None
        if not delay:
            self.runner.request_resync()
        elif self._drift_repair is None:
            self._drift_repair = asyncio.get_running_loop().call_later(delay, self._repair_drift)

    def _repair_drift(self) -> None:
        self._drift_repair = None
        self._dirty = None
        self.runner.request_resync()

    def events_lost(self) -> None:
        event(log, logging.WARNING, "dataplane_events_lost", action="full apply now")
        self._dirty = None
        self.runner.request_resync()

    async def watch_refusals(self, on_refused: Refused) -> None:
        """Report the connections nodes refuse as the data plane forwards them (nftables logs them; the other
        data planes do not: their nodes are found by the probes alone)."""
        if self.forwarder.kind is not model.DataplaneKind.NFTABLES:
            return
        await RefusalWatcher(on_refused).run()

    async def watch_drift(self) -> None:
        """Report commits of other processes to the forwarder's nftables tables (none: nothing to watch)."""
        tables = self.forwarder.nft_tables
        if not tables():
            return
        await NftWatcher(tables, self.drift, self.events_lost).run()
