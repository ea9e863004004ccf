"""Apply a rendered nft script in one transaction: the only code that runs `nft` for the L4 data plane."""

from __future__ import annotations

import asyncio
import copy
import logging
import shutil
from collections.abc import Sequence
from ipaddress import ip_address

from lbagent import model
from lbagent.logfmt import event
from lbagent.plan import Frontend
from lbagent.render.nftables import Ruleset, build, render_delete, render_delta, render_full

log = logging.getLogger("lbagent.dataplane")


class NftError(RuntimeError):
    """nft refused the script; the kernel kept the previous ruleset (the transaction is all or nothing)."""


async def run_nft(args: list[str], script: str | None = None) -> str:
    """Run nft with the script on stdin and return its output."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    proc = await asyncio.create_subprocess_exec(
        nft, *args,
        stdin=asyncio.subprocess.PIPE if script is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(script.encode() if script is not None else None)
    if proc.returncode != 0:
        raise NftError(f"nft {' '.join(args)} exited {proc.returncode}: {err.decode(errors='replace').strip()}")
    return out.decode()


class NftForwarder:
    """Owns one `table inet <name>`: sends only what changed, and the whole table on a resync or a refusal."""

    kind = model.DataplaneKind.NFTABLES

    def __init__(self, dataplane: model.Dataplane) -> None:
        self.dataplane = dataplane
        self.applied: Ruleset | None = None

    async def apply(self, frontends: Sequence[Frontend], vips: Sequence[model.IPAddress], force: bool = False) -> str:
        return await self.apply_ruleset(build(frontends, vips, self.dataplane), force)

    def programmed(self) -> set[model.IPAddress]:
        if self.applied is None:
            return set()
        return {ip_address(key[0]) for by_family in self.applied.dispatch.values() for key in by_family}

    async def cleanup(self) -> None:
        await run_nft(["-f", "-"], render_delete(self.dataplane))
        self.applied = None

    async def apply_ruleset(self, ruleset: Ruleset, force: bool = False) -> str:
        """Bring the kernel to `ruleset`; returns what was done: "full", "delta" or "unchanged"."""
        delta = None if force or self.applied is None else render_delta(self.applied, ruleset)
        if delta == "":
            return "unchanged"
        how = "full"
        if delta is not None:
            try:
                await run_nft(["-f", "-"], delta)
                how = "delta"
            except NftError as exc:
                # The kernel kept the old state (all or nothing): repair by replacing the whole table.
                event(log, logging.WARNING, "dataplane_delta_refused", error=str(exc))
        if how == "full":
            await run_nft(["-f", "-"], render_full(ruleset))
        changed = self.applied != ruleset
        self.applied = copy.deepcopy(ruleset)
        if changed:
            event(log, logging.INFO, "dataplane_applied", kind="nftables", how=how,
                  frontends=sum(len(d) for d in ruleset.dispatch.values()), lookup_tables=len(ruleset.tables))
        return how

    async def listing(self, table: str) -> str:
        return await run_nft(["list", "table", "inet", table])
