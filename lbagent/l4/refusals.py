"""Refused connections the data plane forwards: a node that answers a client's connection with a TCP reset, seen on
the LB as it passes back, reported to the agent so that it probes that node at once instead of at its next interval.

The nftables data plane logs such a reset to NFLOG group `REFUSED_LOG_GROUP` (lbagent.l4.nftables.render: a reset
in the reply direction of a flow to one of lbagent's VIPs, rate-limited in the kernel). This module reads that
group: one netlink socket, the packets' first bytes only, handed over one by one (a queue threshold of 1: the
kernel otherwise holds log messages up to a second). A report is only a reason to probe: the probes and their
rise/fall decide, so a reset that means nothing (a client's connection aborted by the application) costs one
probe that succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from lbagent import model
from lbagent.l4.drift import netfilter_socket
from lbagent.l4.nftscript import REFUSED_LOG_GROUP
from lbagent.logfmt import event
from lbagent.netlinkmsg import NLMSG_HDR, attribute, attributes, messages

log = logging.getLogger("lbagent.dataplane")

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH = 1, 2, 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
COPY_RANGE = 64  # an IPv6 header (40 bytes) and the TCP ports
IPPROTO_TCP = 6
RECEIVE_BUFFER = 1 << 20

Refused = Callable[[model.IPAddress, int], None]


def config_message(group: int, attributes: list[tuple[int, bytes]], seq: int) -> bytes:
    """An NFULNL_MSG_CONFIG request for `group` (nfgenmsg: AF_UNSPEC, version 0, the group in res_id)."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group))
    body += b"".join(attribute(kind, value) for kind, value in attributes)
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def bind_messages(group: int) -> list[bytes]:
    """Bind the group, copy the first COPY_RANGE bytes of each packet, and send each packet at once."""
    return [
        config_message(group, [(NFULA_CFG_CMD, struct.pack("=B", NFULNL_CFG_CMD_BIND))], 1),
        config_message(group, [(NFULA_CFG_MODE, struct.pack(">IBB", COPY_RANGE, NFULNL_COPY_PACKET, 0)),
                               (NFULA_CFG_QTHRESH, struct.pack(">I", 1))], 2),
    ]


def refusals(data: bytes) -> list[tuple[model.IPAddress, int]]:
    """The (source address, source port) of each logged TCP packet in a datagram of NFLOG messages: the node and
    the nodePort that refused."""
    out: list[tuple[model.IPAddress, int]] = []
    for m in messages(data):
        if m.kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            payload = attributes(data, m.start + 4, m.end).get(NFULA_PAYLOAD)  # after struct nfgenmsg
            if payload is not None and (found := _source(payload)) is not None:
                out.append(found)
    return out


def _source(packet: bytes) -> tuple[model.IPAddress, int] | None:
    """The source address and TCP source port of an IPv4 or IPv6 packet (no IPv6 extension headers: a reset
    from a node has none); None for anything else."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        header = (packet[0] & 0x0F) * 4
        if packet[9] != IPPROTO_TCP or len(packet) < header + 2:
            return None
        return IPv4Address(packet[12:16]), struct.unpack_from(">H", packet, header)[0]
    if len(packet) >= 42 and packet[0] >> 4 == 6:
        if packet[6] != IPPROTO_TCP:
            return None
        return IPv6Address(packet[8:24]), struct.unpack_from(">H", packet, 40)[0]
    return None


class RefusalWatcher:
    """Calls `on_refused(node address, nodePort)` for every reset the data plane logged."""

    def __init__(self, on_refused: Refused, group: int = REFUSED_LOG_GROUP) -> None:
        self._on_refused = on_refused
        self._group = group

    def open(self) -> socket.socket:
        def bind_group(sock: socket.socket) -> None:
            for message in bind_messages(self._group):
                sock.send(message)
                _check_ack(sock.recv(4096), self._group)

        return netfilter_socket(RECEIVE_BUFFER, bind_group)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.open()
        event(log, logging.INFO, "refusal_watch_started", group=self._group)
        try:
            while True:
                try:
                    data = await loop.sock_recv(sock, 1 << 16)
                except OSError as exc:
                    event(log, logging.WARNING, "refusal_watch_lost", error=str(exc))  # overflow: the next ones
                    continue
                for address, port in refusals(data):
                    self._on_refused(address, port)
        finally:
            sock.close()


def _check_ack(data: bytes, group: int) -> None:
    """The kernel's answer to a config request: an NLMSG_ERROR with error 0, or OSError with its errno (EBUSY:
    another process has the group)."""
    if len(data) >= NLMSG_HDR.size + 4:
        _length, kind, *_ = NLMSG_HDR.unpack_from(data, 0)
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", data, NLMSG_HDR.size)
            if error < 0:
                raise OSError(-error, f"binding NFLOG group {group}: {os.strerror(-error)}")
