"""Drift in the data plane: nftables state lbagent owns, changed by someone else, noticed from netlink events as it
happens (the VIPs' own drift, an address removed from the VIP interface, is watched in lbagent.l3.vips).

nftables sends every committed change to a table, chain, rule or set to the multicast group NFNLGRP_NFTABLES, then
one NEWGEN message naming the generation and the process that committed it. A change to one of lbagent's tables
committed by a process lbagent did not start (`remember_own`) is drift. Set-element messages are dropped in the
kernel by a socket filter: a full apply at 10,000 services adds 400,000 elements, and reading them would cost more
than the apply. A deleted element is repaired by the periodic resync; a deleted table, chain, rule or set at once.

The agent owns the reaction (re-apply at once; withdraw what it cannot serve when the repair fails).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from lbagent.netlinkmsg import attribute_text, attributes, messages

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_ATTACH_FILTER = 26

# nf_tables message types (uapi/linux/netfilter/nf_tables.h): what changed, by kind of object.
NFT_MESSAGES = {
    0: "add table", 2: "delete table", 3: "add chain", 5: "delete chain", 6: "add rule", 8: "delete rule",
    9: "add set", 11: "delete set", 18: "add object", 20: "delete object", 22: "add flowtable",
    24: "delete flowtable",
}
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWGEN = 12, 14, 15
NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 2, 3
# Every object message above carries its table's name as attribute 1 (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, ...).
NFTA_TABLE = 1
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
RECEIVE_BUFFER = 4 << 20

# Processes lbagent started that commit to nftables (nft, iptables-restore), by pid, with when they were
# started: their changes are lbagent's own. A pid is forgotten after a while (pids are reused).
_OWN: dict[int, float] = {}
_OWN_MEMORY = 120.0


def remember_own(pid: int) -> None:
    """Called by whatever starts a process that changes lbagent's nftables tables."""
    now = time.monotonic()
    for old in [p for p, at in _OWN.items() if now - at > _OWN_MEMORY]:
        del _OWN[old]
    _OWN[pid] = now


def is_own(pid: int) -> bool:
    return pid in _OWN


@dataclass(frozen=True)
class NftChange:
    """A generation that changed one of the watched tables: what changed first, and who committed it."""

    generation: int
    pid: int  # the committer's pid in the initial pid namespace (the kernel's view)
    process: str
    what: str  # e.g. "delete chain inet lbagent, delete table inet lbagent"
    port: int = 0  # the committing netlink socket's port id: the committer's pid in its own pid namespace

    @property
    def own(self) -> bool:
        """Committed by a process lbagent started. The kernel names the committer by its pid in the initial pid
        namespace; under a pid namespace (a container, systemd's PrivatePIDs) that is not the pid lbagent saw,
        but the socket's port id is: netlink gives an unbound socket its process's pid as seen from inside."""
        return is_own(self.pid) or (self.port > 0 and is_own(self.port))


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


# Held while lbagent opens a netfilter netlink socket of its own and binds it, and while libnftables makes its
# context (lbagent.l4.nft): the one new netfilter socket then is the context's, whatever other threads do.
NETFILTER_SOCKETS = threading.Lock()


def netfilter_socket(receive_buffer: int, configure: Callable[[socket.socket], None]) -> socket.socket:
    """A netfilter netlink socket with its receive buffer, bound, then configured by `configure` (subscriptions,
    filters, requests answered at once), then non-blocking; closed again if any of it fails."""
    with NETFILTER_SOCKETS:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        configure(sock)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _drop_element_messages(sock: socket.socket) -> None:
    """A classic BPF filter on the socket: set-element messages never reach user space."""
    type_byte = 4 if sys.byteorder == "little" else 5  # the low byte of nlmsg_type: the nf_tables message
    program = (_SockFilter * 5)(
        _SockFilter(0x30, 0, 0, type_byte),          # ldb [type_byte]
        _SockFilter(0x15, 2, 0, NFT_MSG_NEWSETELEM),  # jeq #12 -> drop
        _SockFilter(0x15, 1, 0, NFT_MSG_DELSETELEM),  # jeq #14 -> drop
        _SockFilter(0x06, 0, 0, 0xFFFFFFFF),          # ret accept
        _SockFilter(0x06, 0, 0, 0),                   # ret drop
    )
    fprog = _SockFprog(len(program), program)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


class NftChangeParser:
    """Turns nf_tables notifications into changes of the watched tables, one per committed generation."""

    def __init__(self, tables: Callable[[], Collection[tuple[str, str]]]) -> None:
        self._tables = tables
        self._pending: list[str] = []  # the changes to watched tables in the open generation (the first few)

    def reset(self) -> None:
        self._pending = []

    def feed(self, data: bytes) -> list[NftChange]:
        changes = []
        for m in messages(data):
            if m.kind >> 8 == NFNL_SUBSYS_NFTABLES:
                change = self._message(m.kind & 0xFF, data, m.start, m.end, m.port)
                if change is not None:
                    changes.append(change)
        return changes

    def _message(self, kind: int, data: bytes, start: int, end: int, port: int) -> NftChange | None:
        if start + 4 > end:
            return None
        family = FAMILIES.get(data[start], str(data[start]))
        attrs = attributes(data, start + 4, end)  # after struct nfgenmsg
        if kind == NFT_MSG_NEWGEN:
            what, self._pending = self._pending, []
            if not what:
                return None
            generation = struct.unpack(">I", attrs[1])[0] if len(attrs.get(1, b"")) == 4 else 0
            pid_raw = attrs.get(NFTA_GEN_PROC_PID, b"")
            pid = struct.unpack(">I", pid_raw)[0] if len(pid_raw) == 4 else 0
            name = attribute_text(attrs.get(NFTA_GEN_PROC_NAME, b""))
            return NftChange(generation, pid, name, ", ".join(what), port)
        action = NFT_MESSAGES.get(kind)
        table = attribute_text(attrs.get(NFTA_TABLE, b""))
        if action is not None and len(self._pending) < 4 and (family, table) in set(self._tables()):
            change = f"{action} {family} {table}"
            if change not in self._pending:
                self._pending.append(change)
        return None


class NftWatcher:
    """Calls `on_drift` for every generation that changed a watched table and was committed by a process
    lbagent did not start. `on_lost` when the kernel dropped notifications (the socket overflowed): what
    happened then is unknown."""

    def __init__(self, tables: Callable[[], Collection[tuple[str, str]]], on_drift: Callable[[NftChange], None],
                 on_lost: Callable[[], None]) -> None:
        self.parser = NftChangeParser(tables)
        self._on_drift = on_drift
        self._on_lost = on_lost

    def open(self) -> socket.socket:
        def subscribe(sock: socket.socket) -> None:
            _drop_element_messages(sock)  # before the membership: no element message is ever queued
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)

        return netfilter_socket(RECEIVE_BUFFER, subscribe)

    def handle(self, data: bytes) -> None:
        for change in self.parser.feed(data):
            if not change.own:
                self._on_drift(change)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.open()
        try:
            while True:
                try:
                    data = await loop.sock_recv(sock, 1 << 16)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    self.parser.reset()  # the open generation lost some of its messages
                    self._on_lost()
                    continue
                self.handle(data)
        finally:
            sock.close()
