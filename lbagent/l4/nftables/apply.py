"""Apply the nftables data plane's rendered scripts, each in one transaction (through lbagent.l4.nft)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence

from lbagent import model
from lbagent.l4 import nftscript
from lbagent.l4.change import FrontendChange
from lbagent.l4.nft import NftError, apply_script, prepare, run_nft
from lbagent.l4.nftables import dsr, netlink, render
from lbagent.l4.nftables.render import (
    MAX_SHARDS,
    Ruleset,
    Transaction,
    build,
    render_delete,
    render_delta,
    render_full,
    render_tables,
    shard_tables,
    update,
)
from lbagent.l4.routes import on_link_paths
from lbagent.logfmt import event
from lbagent.plan.services import Frontend

log = logging.getLogger("lbagent.dataplane")

# nft processes that replace the tables side by side (`_replace`): one per core, at most 4.
WHOLE_APPLY_PROCESSES = max(1, min(4, os.cpu_count() or 1))


class NftForwarder:
    """Owns `table inet <name>` (sends only what changed, and the whole table on a resync or a refusal) and, for
    direct server return, `table netdev <name>` (lbagent.l4.nftables.dsr: small, replaced whole when it changes)."""

    kind = model.DataplaneKind.NFTABLES

    def __init__(self, dataplane: model.Dataplane) -> None:
        self.dataplane = dataplane
        prepare()  # libnftables' socket must get a low descriptor: before the probes open thousands
        self.applied: Ruleset | None = None  # what the kernel's table holds; None: unknown, write it whole
        self.dsr_applied: str | None = None  # the netdev table's text in the kernel ("": none); None: unknown
        self._dsr_reported: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        # the kernel's on-link answer for the dsr nodes' addresses: (addresses, paths, interfaces that exist)
        self._paths: tuple[frozenset[str], dict[str, str], list[str]] | None = None
        self._elements: netlink.ElementSocket | None = None  # made on the first element-only change
        self._elements_failed = False

    async def apply(
        self, frontends: Sequence[Frontend], vips: Sequence[model.IPAddress], force: bool = False,
        change: FrontendChange | None = None,
    ) -> str:
        """`change`: the only services that changed since the last apply (their health), before and after: then
        the ruleset is updated in place and only their elements go to the kernel."""
        how = await self._apply_inet(frontends, vips, force, change)
        dsr_untouched = change is not None and not any(f.mode is model.ForwardingMode.DSR
                                                       for f in (*change.old(), *change.new()))
        if force or self.dsr_applied is None or not dsr_untouched:
            await self._apply_dsr(frontends, force)  # O(frontends): not for a change that has no dsr frontend
        return how

    async def _apply_dsr(self, frontends: Sequence[Frontend], force: bool) -> None:
        wanted = dsr.dsr_frontends(frontends)
        if not wanted and self.dsr_applied == "":
            return  # none wanted, none there (the first apply removed any a previous run left)
        addresses = frozenset(str(b.address) for f in wanted for b in f.active)
        if force or self._paths is None or self._paths[0] != addresses:
            # asked again on every resync: a route that changed (a node no longer on-link) is seen there
            self._paths = (addresses, *await asyncio.to_thread(on_link_paths, addresses,
                                                                 self.dataplane.dsr_interfaces))
        _, paths, interfaces = self._paths
        plan = dsr.build(self.dataplane.table, wanted, self.dataplane.maglev_table_size, interfaces, paths)
        missing = frozenset(self.dataplane.dsr_interfaces) - set(interfaces) if wanted else frozenset()
        unreachable = frozenset(f"{node} {address}" for address, node in plan.unreachable.items())
        if (missing, unreachable) != self._dsr_reported:
            self._dsr_reported = (missing, unreachable)
            if missing:
                event(log, logging.ERROR, "dsr_interface_missing", interfaces=",".join(sorted(missing)),
                      error="dataplane.dsrInterfaces names interfaces this host does not have: dsr traffic that "
                            "comes in there is NATed instead")
            if unreachable:
                event(log, logging.ERROR, "dsr_node_not_on_link", nodes=",".join(sorted(unreachable)),
                      error="direct server return reaches only nodes on this host's segments: left out of dsr "
                            "frontends (route them without a gateway, or use nat)")
        if plan.text == self.dsr_applied and not force:
            return
        await self._run(plan.text or dsr.render_delete(self.dataplane.table))
        self.dsr_applied = plan.text
        event(log, logging.INFO, "dataplane_applied", kind="nftables", how="dsr", frontends=plan.frontends)

    async def _apply_inet(
        self, frontends: Sequence[Frontend], vips: Sequence[model.IPAddress], force: bool,
        change: FrontendChange | None,
    ) -> str:
        if change is not None and not force and self.applied is not None:
            transaction = update(self.applied, change)
            if not transaction:
                return "unchanged"
            try:
                via = await self._run_change(transaction)
            except NftError as exc:
                # The ruleset in memory is ahead of the kernel now: forget it and replace the whole table.
                event(log, logging.WARNING, "dataplane_delta_refused", error=str(exc))
                self.applied = None
            else:
                event(log, logging.INFO, "dataplane_applied", kind="nftables", how="update",
                      services=len(change.services), via=via, lookup_tables=len(transaction.tables))
                return "delta"
        shards = render.shard_count(len(frontends), None if self.applied is None else self.applied.shards)
        return await self.apply_ruleset(build(frontends, vips, self.dataplane, shards), force)

    def nft_tables(self) -> set[tuple[str, str]]:
        return {("inet", t) for t in shard_tables(self.dataplane.table)} | {("netdev", self.dataplane.table)}

    def programmed(self) -> set[model.IPAddress]:
        return set() if self.applied is None else self.applied.programmed()

    async def cleanup(self) -> None:
        await self._run(render_delete(self.dataplane) + dsr.render_delete(self.dataplane.table))
        self.applied = None
        self.dsr_applied = None

    async def _run(self, script: str) -> None:
        """Where this forwarder touches the kernel, with `_run_change`, `_run_side_by_side` and `_tables_present`: a
        whole script (tables, the dsr table, their removal) through libnftables."""
        await apply_script(script)

    async def _run_change(self, transaction: Transaction) -> str:
        """A change's transaction, and how it went to the kernel: "netlink" (one nf_tables batch packed here: new
        lookup tables with their slots, new chains with their rule, element changes, deletions) or "nft" (through
        libnftables: a change to source ranges, or netlink unusable or refused)."""
        elements = netlink.parse(nftscript.script(transaction.elements)) if transaction.elements else []
        sock = self._element_socket() if elements is not None else None
        if elements is None or sock is None:
            await apply_script(transaction.script())
            return "nft"
        batch: list[netlink.Change] = [
            *(netlink.NewLookupTable(t, table.name, table.version, table.slots) for t, table in transaction.tables),
            *(netlink.NewChain(t, name, rule) for t, name, rule in transaction.chains),
            *elements,
            *(netlink.Deletion(t, name, chain=True) for t, name in transaction.chains_gone),
            *(netlink.Deletion(t, name, chain=False) for t, name in transaction.tables_gone),
        ]
        try:
            await asyncio.to_thread(sock.apply, batch)
        except (NftError, OSError) as exc:
            # Nothing of the batch was applied (one transaction): the same through libnftables, whose error says more.
            event(log, logging.WARNING, "dataplane_netlink_refused", error=str(exc),
                  consequence="the same change sent through libnftables")
            await apply_script(transaction.script())
            return "nft"
        return "netlink"

    async def _replace(self, ruleset: Ruleset) -> None:
        """Replace every table by the ruleset's. Every shard table the ruleset does not have goes: the kernel's count
        may be another one's (a previous run's, or before the number of frontends changed).

        In one transaction when the kernel's shards are not the ruleset's (a service's frontends may move from one
        table to another: they must leave one and enter the other at once). Otherwise each table holds the same
        services before and after, and the tables are replaced in groups, one `nft` process each, side by side:
        nft's parsing of 40,000 elements is most of a whole apply, and it uses one core."""
        stale = range(ruleset.shards, MAX_SHARDS)
        groups = min(ruleset.shards, WHOLE_APPLY_PROCESSES)
        if groups < 2 or not await self._same_shards(ruleset.shards):
            await self._run(render_full(ruleset, stale=stale))
            return
        parts = render_tables(ruleset, stale)
        self.applied = None  # until every group is in, the kernel holds some old tables and some new
        await self._run_side_by_side(["".join(parts[i::groups]) for i in range(groups)])

    async def _run_side_by_side(self, scripts: list[str]) -> None:
        """Whole-table scripts, each in an `nft` process of its own, all at once; the first failure is raised once
        all have ended (each is its own transaction: the others may be in)."""
        results = await asyncio.gather(*(run_nft(["-f", "-"], script) for script in scripts), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _same_shards(self, shards: int) -> bool:
        """Whether the kernel's tables are this many shards' (or none of lbagent's is there)."""
        if self.applied is not None:
            return self.applied.shards == shards
        present = await self._tables_present()
        return not present or present == {render.shard_table(self.dataplane.table, s) for s in range(shards)}

    async def _tables_present(self) -> set[str]:
        """lbagent's inet tables (its own and its shards') in the kernel now (asked over netlink: `nft list tables`
        took 0.25 s with 10,000 services' tables there, as long as the whole apply's Python)."""
        return set(shard_tables(self.dataplane.table)) & await asyncio.to_thread(netlink.table_names)

    def _element_socket(self) -> netlink.ElementSocket | None:
        """The netlink socket for element changes, opened on first use; None when it cannot be (then libnftables)."""
        if self._elements is None and not self._elements_failed:
            try:
                self._elements = netlink.ElementSocket()
            except OSError as exc:
                self._elements_failed = True
                event(log, logging.WARNING, "dataplane_netlink_unused", error=str(exc),
                      consequence="every nftables change goes through libnftables")
        return self._elements

    async def apply_ruleset(self, ruleset: Ruleset, force: bool = False) -> str:
        """Bring the kernel to `ruleset` (a fresh object this forwarder keeps): "full", "delta" or "unchanged"."""
        delta = None if force or self.applied is None else render_delta(self.applied, ruleset)
        if delta is not None and not delta:
            return "unchanged"
        how = "full"
        if delta is not None:
            try:
                await self._run_change(delta)
                how = "delta"
            except NftError as exc:
                # The kernel kept the old state (all or nothing): repair by replacing the whole table.
                event(log, logging.WARNING, "dataplane_delta_refused", error=str(exc))
        if how == "full":
            await self._replace(ruleset)
        changed = self.applied != ruleset
        self.applied = ruleset
        if changed:
            event(log, logging.INFO, "dataplane_applied", kind="nftables", how=how,
                  frontends=sum(len(d) for d in ruleset.dispatch.values()), lookup_tables=len(ruleset.tables),
                  shards=ruleset.shards)
        return how
