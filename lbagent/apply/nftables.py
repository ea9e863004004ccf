"""Apply a rendered nft script in one transaction: the only code that runs `nft` for the L4 data plane."""

from __future__ import annotations

import asyncio
import logging
import shutil

from lbagent.logfmt import event

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
    """Owns one `table inet <name>`; skips a script identical to the last one applied, except on a resync."""

    def __init__(self) -> None:
        self.applied: str | None = None

    async def apply(self, script: str, force: bool = False) -> bool:
        """Apply the script; True when nft was run."""
        if script == self.applied and not force:
            return False
        await run_nft(["-f", "-"], script)
        changed = script != self.applied
        self.applied = script
        if changed:
            event(log, logging.INFO, "dataplane_applied", kind="nftables", bytes=len(script))
        return True

    async def listing(self, table: str) -> str:
        return await run_nft(["list", "table", "inet", table])
