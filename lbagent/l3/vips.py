"""Bind and unbind VIPs on the VIP interface, and set the kernel's sysctls: netlink and /proc only. The interface's
addresses are listed, and the missing VIPs bound, by rtnetlink messages packed and read here (`interface_addresses`,
`bind_addresses`: pyroute2's generic decoding and one round trip per address took seconds at 10,000 VIPs); the
link and the unbinding go through pyroute2. Also the VIPs' drift: an address removed from the VIP interface by
someone else, from rtnetlink events (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR) as it happens; the agent owns the
reaction."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lbagent import model
from lbagent.logfmt import event
from lbagent.netlinkmsg import NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR, attribute, attributes, error_code, messages

log = logging.getLogger("lbagent.vips")

# Addresses lbagent binds carry this IFA_PROTO tag, so it only ever removes what it added itself,
# also across restarts, and never an address an operator put on the same interface.
ADDRESS_PROTO = 0x6C
IFA_F_NODAD = 0x02


class VipError(RuntimeError):
    pass


# uapi/linux/netlink.h, rtnetlink.h and if_addr.h: what an address dump is made of
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x300, 0x200, 0x400
_IFA_ADDRESS, _IFA_LOCAL, _IFA_PROTO = 1, 2, 11
_BIND_BATCH = 512  # requests sent before their answers are read (about 40 KB each way)
_ADDRESS_TYPES: dict[int, Callable[[bytes], model.IPAddress]] = {4: IPv4Address, 16: IPv6Address}


@contextlib.contextmanager
def _rtnetlink(doing: str) -> Iterator[socket.socket]:
    """A blocking rtnetlink socket of this process (a 10 s timeout), closed after; VipError saying what it was
    `doing` when the socket fails."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.settimeout(10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        yield sock
    except OSError as exc:
        raise VipError(f"{doing}: {exc}") from exc
    finally:
        sock.close()


def interface_addresses(index: int) -> list[tuple[model.IPAddress, int, int]]:
    """Every address on the interface as (address, prefix length, IFA_PROTO tag), from one rtnetlink dump read
    here: pyroute2 decodes each message's attributes in generic Python, 0.7 s for 10,000 addresses; this reads the
    three it needs (tests/unit/test_vips_netns.py holds the two to the same answer). Blocking: run it in a thread."""
    with _rtnetlink(f"listing the addresses of interface {index}") as sock:
        request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.sendall(NLMSG_HDR.pack(NLMSG_HDR.size + len(request), _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
                     + request)
        out: list[tuple[model.IPAddress, int, int]] = []
        while True:
            data = sock.recv(1 << 20)
            for m in messages(data):
                if m.kind == NLMSG_DONE:
                    return out
                if m.kind == NLMSG_ERROR:
                    raise VipError(f"listing the addresses of interface {index}: {os.strerror(-error_code(data, m))}")
                if m.kind == _RTM_NEWADDR:
                    _, prefixlen, _, _, where = _IFADDRMSG.unpack_from(data, m.start)
                    if where == index:
                        attrs = attributes(data, m.start + _IFADDRMSG.size, m.end)
                        # IFA_ADDRESS, or IFA_LOCAL when it has none; the IFA_PROTO tag, 0 when none
                        value = attrs.get(_IFA_ADDRESS) or attrs.get(_IFA_LOCAL, b"")
                        proto = attrs.get(_IFA_PROTO, b"\0")
                        if len(value) in _ADDRESS_TYPES:
                            out.append((_ADDRESS_TYPES[len(value)](value), prefixlen, proto[0] if proto else 0))


def bind_addresses(index: int, vips: list[model.IPAddress], proto: int) -> dict[model.IPAddress, int]:
    """Add each VIP to the interface as a host address tagged `proto`, as pyroute2's `addr("add")` does (IFA_LOCAL
    and IFA_ADDRESS for IPv4, IFA_ADDRESS and no duplicate address detection for IPv6), in batches sent without
    waiting for each answer: pyroute2 waits for each, 5.3 s for 10,000. The errno of each one the kernel refused
    (EEXIST among them). Blocking: run it in a thread."""
    refused: dict[model.IPAddress, int] = {}
    with _rtnetlink(f"binding VIPs on interface {index}") as sock:
        for first in range(0, len(vips), _BIND_BATCH):
            batch = vips[first:first + _BIND_BATCH]
            requests = []
            for seq, vip in enumerate(batch, first + 1):
                v4 = vip.version == 4
                body = _IFADDRMSG.pack(socket.AF_INET if v4 else socket.AF_INET6, 32 if v4 else 128,
                                       0 if v4 else IFA_F_NODAD, 0, index)
                body += ((attribute(_IFA_LOCAL, vip.packed) if v4 else b"") + attribute(_IFA_ADDRESS, vip.packed)
                         + attribute(_IFA_PROTO, bytes([proto])))
                flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_EXCL
                requests.append(NLMSG_HDR.pack(NLMSG_HDR.size + len(body), _RTM_NEWADDR, flags, seq, 0) + body)
            sock.sendall(b"".join(requests))
            answered: set[int] = set()
            while len(answered) < len(batch):
                data = sock.recv(1 << 20)
                for m in messages(data):
                    if m.kind == NLMSG_ERROR and first < m.seq <= first + len(batch):
                        answered.add(m.seq)
                        if code := -error_code(data, m):
                            refused[batch[m.seq - first - 1]] = code
    return refused


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
        listed = await asyncio.to_thread(interface_addresses, index)
        return {address for address, _, proto in listed if proto == ADDRESS_PROTO}

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
            for address, prefixlen, proto in await asyncio.to_thread(interface_addresses, index):
                if proto == ADDRESS_PROTO:
                    present[address] = prefixlen
                else:
                    foreign.add(address)
            missing = sorted(want - set(present) - foreign, key=str)
            refused = await asyncio.to_thread(bind_addresses, index, missing, ADDRESS_PROTO) if missing else {}
            failed: list[str] = []
            for vip in missing:
                code = refused.get(vip, 0)
                if code not in (0, errno.EEXIST):
                    failed.append(f"{vip} ({errno.errorcode.get(code, str(code))}: {os.strerror(code)})")
                    continue
                event(log, logging.INFO, "vip_bound", vip=vip, interface=self.interface)
                present[vip] = 32 if vip.version == 4 else 128
            if failed:
                raise VipError(f"cannot bind VIP {', '.join(failed)} on {self.interface}")
            gone = sorted(((v, n) for v, n in present.items() if v not in hold), key=lambda kv: str(kv[0]))
            for vip, prefixlen in gone:
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
