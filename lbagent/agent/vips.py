"""The VIPs reconciler: the plan's VIPs bound on the VIP interface, and bound again when someone removes one."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

from lbagent import model
from lbagent.agent.metrics import Metrics
from lbagent.agent.reconciler import Desired, Reconciler
from lbagent.l3.vips import VipBinder, watch_removed_addresses
from lbagent.logfmt import event

log = logging.getLogger("lbagent.agent")


class VipReconciler(Reconciler):
    """Owns which VIPs are bound (`bound`, read by the BGP reconciler: only a bound VIP is announced). A VIP leaves
    the interface only once it is no longer announced (`announced`: the speaker's prefixes)."""

    def __init__(self, desired: Desired, settings: model.Agent, metrics: Metrics, binder: VipBinder,
                 announced: Callable[[], Iterable[str]]) -> None:
        super().__init__("vips", desired, settings, metrics)
        self.binder = binder
        self._announced = announced
        self.bound: set[model.IPAddress] = set()
        # What the last sync that succeeded was asked: the plan's VIPs and the announced prefixes. None: sync.
        self._synced: tuple[tuple[model.IPAddress, ...], frozenset[str]] | None = None

    async def reconcile(self, resync: bool) -> None:
        p = self.desired.current_plan()
        prefixes = frozenset(self._announced())
        if not resync and self._synced is not None and self._synced[1] == prefixes and (
                self._synced[0] is p.vips or self._synced[0] == p.vips):
            # The same question as last time, and nobody took an address since (`address_removed`): the interface
            # holds the answer. Reading it back costs a dump of every address on the interface (0.7 s of Python at
            # 10,000 VIPs); a change of a Service's endpoints marks every reconciler dirty, and asked that each time.
            return
        self._synced = None
        # A VIP is unbound only once it is no longer announced: withdraw first, then let go of the address.
        announced = {model.prefix_address(prefix) for prefix in prefixes}
        try:
            bound = await self.binder.sync(p.vips, keep=announced)
        except BaseException:
            # What is bound is unknown now (a VIP taken away that cannot be bound again): announce only what is
            # there, so no router sends this node traffic for an address it does not hold.
            with contextlib.suppress(Exception):
                actual = await self.binder.bound()
                if actual != self.bound:
                    self.bound = actual
                    self._changed()
            raise
        self._synced = (p.vips, prefixes)
        if bound != self.bound:
            self.bound = bound
            self._changed()

    def address_removed(self, address: model.IPAddress) -> None:
        """An address left the VIP interface: if it is a VIP this node should hold, someone else removed it."""
        if address not in self.bound or address not in self.desired.current_plan().vips:
            return  # not ours, or lbagent's own unbind
        self._synced = None  # bind it again even though the plan did not change
        self.metrics.drift.labels("vip").inc()
        event(log, logging.WARNING, "vip_drift", vip=address, interface=self.desired.model.vip_interface,
              action="bind again now")
        self.mark_dirty()

    async def watch_addresses(self) -> None:
        """Report addresses removed from the VIP interface (by netlink, as it happens) to `address_removed`."""
        await watch_removed_addresses(self.desired.model.vip_interface, self.address_removed)
