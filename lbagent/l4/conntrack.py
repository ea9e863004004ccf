"""Delete conntrack entries that would keep UDP clients on a node that left rotation (the `conntrack` tool)."""

from __future__ import annotations

import asyncio
import logging
import shutil

from lbagent.logfmt import event
from lbagent.plan.services import StaleFlows

log = logging.getLogger("lbagent.dataplane")


async def clear_udp(stale: StaleFlows) -> int:
    """Delete the entries from clients to VIP:port that were NATed to node:nodePort; how many went."""
    tool = shutil.which("conntrack") or "/usr/sbin/conntrack"
    family = "ipv6" if stale.vip.version == 6 else "ipv4"
    proc = await asyncio.create_subprocess_exec(
        tool, "-D", "-f", family, "-p", "udp", "--orig-dst", str(stale.vip), "--orig-port-dst", str(stale.port),
        "--reply-src", str(stale.node_address), "--reply-port-src", str(stale.node_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    text = err.decode(errors="replace")
    # conntrack exits 1 when nothing matched ("0 flow entries have been deleted"): not an error here.
    deleted = int(text.split(" flow entr")[0].rsplit(None, 1)[-1]) if " flow entr" in text else 0
    if proc.returncode not in (0, 1) or "flow entr" not in text:
        raise RuntimeError(f"conntrack -D for {stale} failed ({proc.returncode}): {text.strip()}")
    if deleted:
        event(log, logging.INFO, "udp_flows_cleared", vip=stale.vip, port=stale.port,
              node=f"{stale.node_address}:{stale.node_port}", entries=deleted)
    return deleted
