"""A health change's element changes sent to the kernel over netlink, without libnftables.

A health change rewrites a few elements of a shard's dispatch map (and a reload, a few of its nodePort map). Through
libnftables each such transaction first builds the library's cache of every table in the network namespace: about
0.06 ms a table, so with the dispatch in shards a change cost more the more shards there were (docs/benchmarks.md).
Here the same transaction goes to the kernel as one nf_tables batch of set-element messages, all or nothing as from
nft, so that what a change costs is the kernel's own work: the check of the one shard it adds jumps to. The messages
are packed here: pyroute2's generic encoder took 0.3 ms for a health change's four messages, as long as the kernel's
work; tests/unit/test_nft_netlink.py holds the packing byte for byte to pyroute2's message definitions.

Only transactions made of nothing but dispatch and nodePort element changes, as lbagent.l4.nftables.render writes
them, go this way (`parse`); anything else (source ranges, a chain's rules) goes through libnftables. A change that
needs a new lookup table declares it empty, with its chain, through libnftables, and sends its 1,021 slots here, with
the element changes that jump to it and the deletion of the chains and lookup tables nothing uses any more, in one
batch (`LookupElements`, `Deletion`): through libnftables the slots alone took 2-3 ms.

The names of the kernel's tables are asked here too (`table_names`): nft reads every set's elements to list tables.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from lbagent.l4.drift import netfilter_socket, remember_own
from lbagent.l4.nft import NftError
from lbagent.netlinkmsg import (
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HDR,
    attribute,
    attribute_text,
    attributes,
    error_code,
    messages,
    refusal,
)

# uapi/linux/netlink.h, netfilter/nfnetlink.h and netfilter/nf_tables.h: what a batch of element changes is made of
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_CREATE = 0x1, 0x4, 0x300, 0x400
NFT_MSG_GETTABLE, NFTA_TABLE_NAME = 1, 1
NFT_MSG_DELCHAIN, NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 5, 1, 3
NFT_MSG_DELSET, NFTA_SET_TABLE, NFTA_SET_NAME = 11, 1, 2
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFT_GOTO = -4
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
RECEIVE_BUFFER = 1 << 20

_LINE = re.compile(r"(add|delete) element inet (\S+) ((dispatch|node_ports)_v[46]) \{ (.+) \}")


@dataclass(frozen=True)
class ElementChange:
    """One `add element` or `delete element` line: a map of a table and its elements, as key and value (the chain a
    dispatch element goes to, or a nodePort)."""

    add: bool
    table: str
    map: str
    elements: tuple[tuple[bytes, str | int], ...]


@dataclass(frozen=True)
class LookupElements:
    """A lookup table's slots added to its (empty) map: slot number -> node address."""

    table: str
    map: str
    slots: tuple[str, ...]


@dataclass(frozen=True)
class Deletion:
    """A chain or a map (lookup table) deleted."""

    table: str
    name: str
    chain: bool


Change = ElementChange | LookupElements | Deletion


# A health change's transaction is a few hundred bytes; a whole table (megabytes) is never read line by line here.
PARSE_LIMIT = 64 * 1024


def parse(script: str) -> list[ElementChange] | None:
    """The script's element changes, or None when it holds anything else, or nothing (then libnftables applies it)."""
    if len(script) > PARSE_LIMIT or not script.startswith(("add element ", "delete element ")):
        return None
    changes = []
    for line in script.splitlines():
        match = _LINE.fullmatch(line)
        if match is None:
            return None
        verb, table, name, kind, listed = match.groups()
        elements = []
        for element in listed.split(", "):
            key, _, value = element.rpartition(" : ")  # " : " with its spaces: an IPv6 address has colons
            if kind == "dispatch":
                if not value.startswith("goto "):
                    return None
                elements.append((_key(key), value.removeprefix("goto ")))
            else:
                elements.append((_key(key), int(value)))
        changes.append(ElementChange(verb == "add", table, name, tuple(elements)))
    return changes or None


def _key(text: str) -> bytes:
    """`VIP . protocol . port` as the kernel keeps a concatenation: each part in 4-byte registers, zero-padded."""
    address, protocol, port = text.split(" . ")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return socket.inet_pton(family, address) + struct.pack("=B3x", PROTOCOLS[protocol]) + struct.pack(">H2x", int(port))


class ElementSocket:
    """A netfilter netlink socket of this process, for element changes (one thread at a time)."""

    def __init__(self) -> None:
        self._sock = netfilter_socket(RECEIVE_BUFFER, lambda sock: None)
        self._sock.setblocking(True)
        self._port: int = self._sock.getsockname()[0]
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def apply(self, changes: Sequence[Change]) -> None:
        """Send the changes as one transaction; NftError when the kernel refused it (it then changed nothing)."""
        with self._lock:
            batch, sent = self._batch(changes)
            remember_own(threading.get_native_id())  # the committer, as the drift watcher will see it
            remember_own(self._port)
            self._sock.sendall(batch)
            # The kernel handles a batch while it is sent: every answer is queued when sendall returns.
            errors, acked = self._answers(sent)
        if errors:
            raise NftError(f"the kernel refused the element changes: {'; '.join(errors)}")
        if acked != sent:
            raise NftError(f"the kernel answered {len(acked)} of {len(sent)} element changes")

    def _next(self) -> int:
        self._seq = self._seq % 0x7FFFFFFF + 1
        return self._seq

    def _batch(self, changes: Sequence[Change]) -> tuple[bytes, set[int]]:
        """The batch: begin, one message per change (each acknowledged; a lookup table's slots in as many as their
        attribute's 16-bit length needs), end."""
        parts, sent = [message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, self._next(), 0, NFNL_SUBSYS_NFTABLES, b"")], set()

        def add(kind: int, flags: int, attrs: bytes) -> None:
            seq = self._next()
            parts.append(message((NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq,
                                 NFPROTO_INET, 0, attrs))
            sent.add(seq)

        for change in changes:
            if isinstance(change, Deletion):
                kind, table, name = ((NFT_MSG_DELCHAIN, NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME) if change.chain
                                     else (NFT_MSG_DELSET, NFTA_SET_TABLE, NFTA_SET_NAME))
                add(kind, 0, attribute(table, _string(change.table)) + attribute(name, _string(change.name)))
                continue
            head = (attribute(NFTA_SET_ELEM_LIST_TABLE, _string(change.table))
                    + attribute(NFTA_SET_ELEM_LIST_SET, _string(change.map)))
            if isinstance(change, LookupElements):
                for elements in _slot_elements(change.slots):
                    add(NFT_MSG_NEWSETELEM, NLM_F_CREATE, head + attribute(NFTA_SET_ELEM_LIST_ELEMENTS, elements))
                continue
            # the elements of the list numbered from 1, as libnftnl does (the kernel reads them in order)
            elements = b"".join(attribute(i, _element(key, value, change.add))
                                for i, (key, value) in enumerate(change.elements, 1))
            add(NFT_MSG_NEWSETELEM if change.add else NFT_MSG_DELSETELEM, NLM_F_CREATE if change.add else 0,
                head + attribute(NFTA_SET_ELEM_LIST_ELEMENTS, elements))
        parts.append(message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, self._next(), 0, NFNL_SUBSYS_NFTABLES, b""))
        return b"".join(parts), sent

    def _answers(self, sent: set[int]) -> tuple[list[str], set[int]]:
        """Read every queued answer: the errors (any message of this batch, or the batch as a whole when its commit
        failed) and the sequence numbers acknowledged."""
        errors: list[str] = []
        acked: set[int] = set()
        while True:
            try:
                data = self._sock.recv(RECEIVE_BUFFER, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return errors, acked
            for m in messages(data):
                if m.kind == NLMSG_ERROR:
                    code = -error_code(data, m)
                    if code == 0:
                        acked.add(m.seq)
                    else:
                        errors.append(refusal(code))


def table_names(family: int = NFPROTO_INET, timeout: float = 10.0) -> set[str]:
    """The names of the kernel's nf_tables tables of a family, from a netlink dump of the tables alone. (`nft list
    tables` reads every set's elements first: 0.25 s with 10,000 services' tables in the kernel.)"""
    sock = netfilter_socket(RECEIVE_BUFFER, lambda sock: None)
    try:
        sock.settimeout(timeout)
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE
        sock.sendall(message(kind, NLM_F_REQUEST | NLM_F_DUMP, 1, family, 0, b""))
        names: set[str] = set()
        while True:
            data = sock.recv(RECEIVE_BUFFER)
            for m in messages(data):
                if m.kind == NLMSG_DONE:
                    return names
                if m.kind == NLMSG_ERROR:
                    raise NftError(f"the kernel refused to list its tables: {refusal(-error_code(data, m))}")
                name = attributes(data, m.start + 4, m.end).get(NFTA_TABLE_NAME)  # after struct nfgenmsg
                if name is not None:
                    names.add(attribute_text(name))
    except (OSError, TimeoutError) as exc:
        raise NftError(f"listing the kernel's nf_tables tables: {exc}") from exc
    finally:
        sock.close()


def message(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    """A netlink message with its nfgenmsg header (version 0, resource id big-endian) and attributes."""
    body = struct.pack(">BBH", family, 0, res_id) + attrs
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), kind, flags, seq, 0) + body


def _string(text: str) -> bytes:
    return text.encode() + b"\0"


def _element(key: bytes, value: str | int, add: bool) -> bytes:
    """One element: its key and, when added, its data: a goto to a chain, or a nodePort."""
    out = attribute(NFTA_SET_ELEM_KEY, attribute(NFTA_DATA_VALUE, key))
    if add:
        data = (attribute(NFTA_DATA_VERDICT, attribute(NFTA_VERDICT_CODE, struct.pack(">i", NFT_GOTO))
                      + attribute(NFTA_VERDICT_CHAIN, _string(value)))
                if isinstance(value, str) else attribute(NFTA_DATA_VALUE, struct.pack(">H", value)))
        out += attribute(NFTA_SET_ELEM_DATA, data)
    return out


# One lookup table slot as an element, in one pack: the element (numbered), its key (the slot: `numgen`'s 32-bit
# integer, in host order) and its data (the node's address), each attribute a value in an attribute.
_SLOT = {4: struct.Struct("=HHHHHHIHHHH4s"), 6: struct.Struct("=HHHHHHIHHHH16s")}
# The most bytes of elements one message's list attribute holds (its length is 16 bits).
_LIST_BYTES = 60000


def _slot_elements(slots: tuple[str, ...]) -> list[bytes]:
    """A lookup table's slots as element list payloads, each under `_LIST_BYTES`."""
    if not slots:
        return []
    v = 6 if ":" in slots[0] else 4
    packed = {a: socket.inet_pton(socket.AF_INET6 if v == 6 else socket.AF_INET, a) for a in set(slots)}
    slot = _SLOT[v]
    size, per = slot.size, _LIST_BYTES // slot.size
    data = 4 + len(next(iter(packed.values())))
    # each message's elements numbered from 1, as libnftnl does
    elements = [slot.pack(size, i % per + 1, 12, NFTA_SET_ELEM_KEY, 8, NFTA_DATA_VALUE, i,
                          4 + data, NFTA_SET_ELEM_DATA, data, NFTA_DATA_VALUE, packed[a])
                for i, a in enumerate(slots)]
    return [b"".join(elements[k:k + per]) for k in range(0, len(elements), per)]
