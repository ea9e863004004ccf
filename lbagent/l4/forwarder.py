"""The L4 forwarder interface every data plane implements (nftables, iptables, IPVS), and how one is chosen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from lbagent import model
from lbagent.l4.change import FrontendChange
from lbagent.plan.services import Frontend

__all__ = ["Forwarder", "FrontendChange", "make_forwarder"]


class Forwarder(Protocol):
    """Brings the kernel's forwarding to the given frontends. Implementations own their kernel objects only
    (a table, chains, IPVS services they created) and are the only code with side effects for them."""

    kind: model.DataplaneKind

    async def apply(
        self, frontends: Sequence[Frontend], vips: Sequence[model.IPAddress], force: bool = False,
        change: FrontendChange | None = None,
    ) -> str:
        """Make the kernel match; `force` re-applies everything (periodic resync). `change`, when given, is the
        change since the last successful call (the caller's record of what it applied; the VIPs are the same):
        the only services whose frontends differ, before and after. An implementation may use it to do less, and
        keeps no copy of the frontends to work it out itself. After a call that raised, the caller passes no
        change. Returns "full", "delta" or "unchanged". Raises on failure, leaving the kernel as it was or
        repaired on the next call."""

    def programmed(self) -> set[model.IPAddress]:
        """VIPs whose forwarding is in the kernel now (with at least one backend taking new flows)."""

    def nft_tables(self) -> set[tuple[str, str]]:
        """The nftables tables this forwarder owns, as (family, name): a change to one of them committed by any
        other process is drift, and the next apply after it is a full one."""

    async def cleanup(self) -> None:
        """Remove everything this forwarder programmed (`lbagent cleanup`)."""


def make_forwarder(dataplane: model.Dataplane) -> Forwarder:
    """The forwarder for the configured data plane kind."""
    from lbagent.l4.nftables.apply import NftForwarder  # noqa: PLC0415 - each data plane loads only its own tools

    if dataplane.kind is model.DataplaneKind.NFTABLES:
        return NftForwarder(dataplane)
    if dataplane.kind is model.DataplaneKind.IPTABLES:
        from lbagent.l4.iptables.apply import IptablesForwarder  # noqa: PLC0415

        return IptablesForwarder(dataplane)
    if dataplane.kind is model.DataplaneKind.IPVS:
        from lbagent.l4.ipvs.apply import IpvsForwarder, load_ipvs  # noqa: PLC0415

        # The agent writes the net.ipv4.vs.* sysctls before the first apply; they exist once ip_vs is loaded.
        load_ipvs()
        return IpvsForwarder(dataplane)
    raise NotImplementedError(f"dataplane.kind {dataplane.kind.value!r} is not built yet")
