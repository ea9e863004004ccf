"""Bind and unbind VIPs on the VIP interface with pyroute2, and set the kernel's sysctls: netlink and /proc only. Also
the VIPs' drift: an address removed from the VIP interface by someone else, from rtnetlink events
(RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR) as it happens; the agent owns the reaction."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable, Mapping
from ipaddress import ip_address
from pathlib import Path

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lbagent import model
from lbagent.logfmt import event

log = logging.getLogger("lbagent.vips")

# Addresses lbagent binds carry this IFA_PROTO tag, so it only ever removes what it added itself,
# also across restarts, and never an address an operator put on the same interface.
ADDRESS_PROTO = 0x6C
IFA_F_NODAD = 0x02


class VipError(RuntimeError):
    pass


class VipBinder:
    """Makes the interface hold exactly the desired VIPs among the addresses tagged as lbagent's."""

    def __init__(self, interface: str) -> None:
        self.interface = interface

    def _ipr(self) -> AsyncIPRoute:
        # The asyncio flavour: pyroute2 0.9's synchronous IPRoute runs an event loop of its own,
        # which cannot nest inside the agent's. The agent runs inside its network namespace, so no
        # netns= here (pyroute2 may fork to reach another namespace).
        return AsyncIPRoute()

    async def _index(self, ipr: AsyncIPRoute) -> int:
        links = await ipr.link_lookup(ifname=self.interface)
        if not links:
            raise VipError(f"vipInterface {self.interface!r} does not exist on this host")
        return int(links[0])

    async def bound(self) -> set[model.IPAddress]:
        """The VIPs lbagent holds on the interface now (tagged addresses only)."""
        async with self._ipr() as ipr:
            index = await self._index(ipr)
            return {
                ip_address(msg.get_attr("IFA_ADDRESS"))
                async for msg in await ipr.get_addr(index=index)
                if msg.get_attr("IFA_PROTO") == ADDRESS_PROTO
            }

    async def sync(
        self, desired: Iterable[model.IPAddress], keep: Iterable[model.IPAddress] = ()
    ) -> set[model.IPAddress]:
        """Add missing VIPs, remove tagged ones no longer desired unless in `keep` (still announced).

        Returns what is bound afterwards.
        """
        want = set(desired)
        hold = want | set(keep)
        async with self._ipr() as ipr:
            index = await self._index(ipr)
            link = (await ipr.link("get", index=index))[0]
            if not link["flags"] & 1:  # IFF_UP
                await ipr.link("set", index=index, state="up")
            present: dict[model.IPAddress, int] = {}
            foreign: set[model.IPAddress] = set()
            async for msg in await ipr.get_addr(index=index):
                address = ip_address(msg.get_attr("IFA_ADDRESS"))
                if msg.get_attr("IFA_PROTO") == ADDRESS_PROTO:
                    present[address] = msg["prefixlen"]
                else:
                    foreign.add(address)
            for vip in sorted(want - set(present) - foreign, key=str):
                prefixlen = 32 if vip.version == 4 else 128
                try:
                    await ipr.addr(
                        "add", index=index, address=str(vip), prefixlen=prefixlen,
                        IFA_PROTO=ADDRESS_PROTO, flags=IFA_F_NODAD if vip.version == 6 else 0,
                    )
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise VipError(f"cannot bind VIP {vip} on {self.interface}: {exc}") from exc
                event(log, logging.INFO, "vip_bound", vip=vip, interface=self.interface)
                present[vip] = prefixlen
            for vip, prefixlen in sorted(present.items(), key=lambda kv: str(kv[0])):
                if vip in hold:
                    continue
                try:
                    await ipr.addr("del", index=index, address=str(vip), prefixlen=prefixlen)
                except NetlinkError as exc:
                    if exc.code != errno.EADDRNOTAVAIL:
                        raise VipError(f"cannot unbind VIP {vip} from {self.interface}: {exc}") from exc
                event(log, logging.INFO, "vip_unbound", vip=vip, interface=self.interface)
                del present[vip]
            return set(present) | (want & foreign)


def apply_sysctls(settings: Mapping[str, str], root: Path = Path("/proc/sys")) -> None:
    """Write each `net/ipv4/ip_forward`-style key whose value differs. A `net/netfilter/` key whose module is not
    loaded yet is left for a later call: nothing is tracked before the data plane's first apply loads it."""
    for key, value in settings.items():
        path = root / key
        if key.startswith("net/netfilter/") and not path.parent.is_dir():
            continue
        try:
            if path.read_text().strip() != value:
                path.write_text(value)
                event(log, logging.INFO, "sysctl_set", key=key.replace("/", "."), value=value)
        except OSError as exc:
            raise VipError(f"cannot set sysctl {key.replace('/', '.')}={value}: {exc}") from exc


RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100


async def watch_removed_addresses(interface: str, on_removed: Callable[[model.IPAddress], None]) -> None:
    """Calls `on_removed` for every address deleted from `interface` (RTM_DELADDR), whoever deleted it."""
    async with AsyncIPRoute() as ipr:
        await ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        links = await ipr.link_lookup(ifname=interface)
        index = int(links[0]) if links else None
        while True:
            async for msg in ipr.get():
                if msg.get("event") != "RTM_DELADDR":
                    continue
                if index is not None and msg.get("index") != index:
                    continue
                address = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
                if address:
                    on_removed(ip_address(address))
