"""Apply rendered iptables-restore input with --noflush: the only code that runs iptables for the L4 data plane."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from collections.abc import Sequence

from lbagent import model
from lbagent.l4.change import FrontendChange
from lbagent.l4.drift import remember_own
from lbagent.l4.iptables.render import (
    ChainChanges,
    Existing,
    Ruleset,
    build,
    diff,
    parse_save,
    render_changes,
    render_cleanup,
    render_full,
    update,
)
from lbagent.logfmt import event
from lbagent.plan.services import Frontend

log = logging.getLogger("lbagent.dataplane")

FAMILIES = (4, 6)


class IptablesError(RuntimeError):
    """iptables-restore (or -save) failed. With the nft variant the whole input was refused; the legacy one
    commits table by table, so tables before the failing one may have changed: the next full apply repairs."""


def tool(family: int, variant: str, what: str) -> str:
    """The variant's own binary (`iptables-nft-restore`, `ip6tables-legacy-save`, ...): never the
    alternatives-managed `iptables-restore`, which may point at the other variant."""
    name = f"{'ip' if family == 4 else 'ip6'}tables-{variant}-{what}"
    return shutil.which(name) or f"/usr/sbin/{name}"


async def run_tool(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run an iptables tool with `stdin` as its input; its output, or IptablesError with stderr."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise IptablesError(f"{argv[0]} is not installed (apt package iptables): {exc}") from exc
    remember_own(proc.pid)
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip()
        raise IptablesError(f"{' '.join(argv)} exited {proc.returncode}: {message}{_context(message, stdin)}")
    return out.decode()


def _context(message: str, stdin: str | None) -> str:
    """The input line a restore error points at (`Error occurred at line: N` or `line N: ...`)."""
    found = re.findall(r"\bline:? (\d+)", message)
    lines = (stdin or "").splitlines()
    if found and 0 < int(found[-1]) <= len(lines):
        return f"\n  input line {found[-1]}: {lines[int(found[-1]) - 1]}"
    return ""


class IptablesForwarder:
    """Owns the LBAGENT-* chains of both families: sends only the chains that changed, everything on a resync.

    Kernel state is read only for a full apply (`iptables-save`: which lbagent chains and jumps exist), so
    one left behind by an earlier run is deleted and a jump someone flushed is put back by the next resync.
    """

    kind = model.DataplaneKind.IPTABLES

    def __init__(self, dataplane: model.Dataplane) -> None:
        if dataplane.iptables_variant not in ("nft", "legacy"):
            raise ValueError(f"unknown iptables variant {dataplane.iptables_variant!r}")
        self.dataplane = dataplane
        self.variant = dataplane.iptables_variant
        self.applied: Ruleset | None = None
        self._families: set[int] = set()  # the families whose chains are in the kernel

    async def apply(
        self, frontends: Sequence[Frontend], vips: Sequence[model.IPAddress], force: bool = False,
        change: FrontendChange | None = None,
    ) -> str:
        """`change`: the only services whose health changed, before and after: only their chains are re-rendered
        and sent. Otherwise the whole ruleset is rebuilt and the chains that differ are sent."""
        how = None
        if change is not None and not force and self.applied is not None:
            how = await self._update(change)
        if how is None:
            how = await self.apply_ruleset(build(frontends, vips, self.dataplane), force)
        return how

    def programmed(self) -> set[model.IPAddress]:
        return set() if self.applied is None else self.applied.programmed()

    def nft_tables(self) -> set[tuple[str, str]]:
        # lbagent's chains live in the shared nat and filter tables, which kube-proxy, Docker and firewalls commit
        # to all the time: a change there is not a sign of drift. The periodic resync repairs these chains.
        return set()

    async def cleanup(self) -> None:
        """Remove lbagent's jumps and chains in both families. A family that cannot even be listed (a kernel
        without IPv6) holds none of them, unless this forwarder put them there: then it is an error."""
        errors: list[IptablesError] = []
        for family in FAMILIES:
            try:
                existing = await self._existing(family)
            except IptablesError as exc:
                if family in self._families:
                    errors.append(exc)
                else:
                    event(log, logging.WARNING, "dataplane_cleanup_skipped", kind="iptables", family=family,
                          error=str(exc))
                continue
            script = render_cleanup(existing)
            try:
                if script:
                    await self._restore(family, script)
            except IptablesError as exc:
                errors.append(exc)
        self.applied = None
        self._families = set()
        if errors:
            raise errors[0]

    async def apply_ruleset(self, ruleset: Ruleset, force: bool = False) -> str:
        """Bring the kernel to `ruleset` (a fresh object this forwarder keeps): "full", "delta" or "unchanged"."""
        old = self.applied
        changes = None if force or old is None or ruleset.families() != self._families else diff(old, ruleset)
        how = "full"
        if changes is not None:
            if not any(changes.values()):
                self.applied = ruleset
                return "unchanged"
            try:
                await self._send(changes)
                how = "delta"
            except IptablesError as exc:
                event(log, logging.WARNING, "dataplane_delta_refused", kind="iptables", error=str(exc))
        if how == "full":
            await self._full(ruleset)
        self.applied = ruleset
        event(log, logging.INFO, "dataplane_applied", kind="iptables", variant=self.variant, how=how,
              frontends=len(ruleset.entries), rules_v4=ruleset.rule_count(4), rules_v6=ruleset.rule_count(6))
        return how

    # -- internals --------------------------------------------------------------------------------------

    async def _update(self, change: FrontendChange) -> str | None:
        """The in-place path: None when it does not apply (the set of frontends changed)."""
        assert self.applied is not None
        changes = update(self.applied, change.old(), change.new())
        if changes is None:
            return None
        if not any(changes.values()):
            return "unchanged"
        try:
            await self._send(changes)
        except IptablesError as exc:
            # The ruleset in memory is ahead of the kernel now: the caller rebuilds it and applies everything.
            event(log, logging.WARNING, "dataplane_delta_refused", kind="iptables", error=str(exc))
            self.applied = None
            return None
        event(log, logging.INFO, "dataplane_applied", kind="iptables", variant=self.variant, how="update",
              services=len(change.services), chains=sum(len(t) for f in changes.values() for t in f.values()))
        return "delta"

    async def _send(self, changes: ChainChanges) -> None:
        for family in FAMILIES:
            script = render_changes(changes.get(family, {}))
            if script:
                await self._restore(family, script)

    async def _full(self, ruleset: Ruleset) -> None:
        """Every chain of every family with something to forward; a family with nothing loses lbagent's chains.
        A family whose tools fail (a kernel without IPv6) is an error only when it has something to forward."""
        wanted = ruleset.families()
        for family in FAMILIES:
            try:
                existing = await self._existing(family)
            except IptablesError:
                if family in wanted:
                    raise
                self._families.discard(family)
                continue
            if family in wanted:
                await self._restore(family, render_full(ruleset, family, existing))
                self._families.add(family)
            else:
                script = render_cleanup(existing)
                if script:
                    await self._restore(family, script)
                self._families.discard(family)

    async def _existing(self, family: int) -> Existing:
        return parse_save(await run_tool([tool(family, self.variant, "save")]))

    async def _restore(self, family: int, script: str) -> None:
        # --wait: the legacy variant takes the xtables lock, shared by every network namespace on the host.
        await run_tool([tool(family, self.variant, "restore"), "--wait", "10", "--noflush"], script)
