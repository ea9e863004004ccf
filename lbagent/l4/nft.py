"""The one runner of `nft` for the L4 data planes (the nftables table, IPVS's companion table): a script applied in
one transaction, its commits remembered as lbagent's own so the drift watcher does not report them."""

from __future__ import annotations

import asyncio
import shutil

from lbagent.l4.drift import remember_own


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
    remember_own(proc.pid)  # its commits are lbagent's own, not drift
    out, err = await proc.communicate(script.encode() if script is not None else None)
    if proc.returncode != 0:
        raise NftError(f"nft {' '.join(args)} exited {proc.returncode}: {err.decode(errors='replace').strip()}")
    return out.decode()
