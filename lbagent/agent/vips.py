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

    async def reconcile(self, resync: bool) -> None:
        p = self.desired.current_plan()
        # A VIP is unbound only once it is no longer announced: withdraw first, then let go of the address.
        announced = {model.prefix_address(prefix) for prefix in self._announced()}
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
        if bound != self.bound:
            self.bound = bound
            self._changed()

    def address_removed(self, address: model.IPAddress) -> None:
        """An address left the VIP interface: if it is a VIP this node should hold, someone else removed it."""
        if address not in self.bound or address not in self.desired.current_plan().vips:
            return  # not ours, or lbagent's own unbind
        self.metrics.drift.labels("vip").inc()
        event(log, logging.WARNING, "vip_drift", vip=address, interface=self.desired.model.vip_interface,
              action="bind again now")
        self.mark_dirty()

    async def watch_addresses(self) -> None:
        """Report addresses removed from the VIP interface (by netlink, as it happens) to `address_removed`."""
        await watch_removed_addresses(self.desired.model.vip_interface, self.address_removed)
