"""A change's transaction sent to the kernel over netlink, without libnftables.

A health change rewrites a few elements of a shard's dispatch map (and a reload, a few of its nodePort map). Through
libnftables each such transaction first builds the library's cache of every table in the network namespace: about
0.06 ms a table, so with the dispatch in shards a change cost more the more shards there were (docs/benchmarks.md).
Here the same transaction goes to the kernel as one nf_tables batch, all or nothing as from nft, so that what a
change costs is the kernel's own work: the check of the one shard it adds jumps to. The messages are packed here:
pyroute2's generic encoder took 0.3 ms for a health change's four messages, as long as the kernel's work;
tests/unit/test_nft_netlink.py holds the packing byte for byte to pyroute2's message definitions.

Transactions made of dispatch and nodePort element changes (`parse`, from the text lbagent.l4.nftables.render
writes), new lookup tables with their slots (`NewLookupTable`), new chains with their one rule (`NewChain`) and
deletions of chains and lookup tables (`Deletion`) go this way; anything else (source ranges, whole tables) goes
through libnftables. A new lookup table and its chain used to be declared through libnftables, before a batch of the
rest: that paid the kernel's check of the whole shard twice (the rule's `dnat`, and the jumps to the new chain, each
make the commit walk the shard) and libnftables' cache rebuild once, 2.5-5 ms at 10,000 services. They are packed
as nft 1.0.6 packs them: tests/unit/test_nft_declarations.py holds what the kernel then lists, rule expression
by expression, to what it lists after nft's own.

The names of the kernel's tables are asked here too (`table_names`): nft reads every set's elements to list tables.
"""

from __future__ import annotations

import itertools
import re
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from lbagent.l4.drift import netfilter_socket, remember_own
from lbagent.l4.jhash import HASH_SEED
from lbagent.l4.nft import NftError
from lbagent.l4.nftables.render import LookupRule
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
NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWSET = 3, 6, 9
NLM_F_APPEND = 0x800
NLA_F_NESTED = 0x8000
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
class NewLookupTable:
    """A lookup table declared (`typeof numgen inc mod 2 : ip daddr`, or ip6) with its slots: slot -> node address."""

    table: str
    map: str
    version: int
    slots: tuple[str, ...]


@dataclass(frozen=True)
class NewChain:
    """A lookup table's chain declared, with its one rule (lbagent.l4.nftables.render.LookupRule)."""

    table: str
    name: str
    rule: LookupRule


@dataclass(frozen=True)
class Deletion:
    """A chain or a map (lookup table) deleted."""

    table: str
    name: str
    chain: bool


Change = ElementChange | NewLookupTable | NewChain | Deletion


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

        set_ids = itertools.count(1)  # an anonymous set is named by its id within the batch
        for change in changes:
            if isinstance(change, Deletion):
                kind, table, name = ((NFT_MSG_DELCHAIN, NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME) if change.chain
                                     else (NFT_MSG_DELSET, NFTA_SET_TABLE, NFTA_SET_NAME))
                add(kind, 0, attribute(table, _string(change.table)) + attribute(name, _string(change.name)))
            elif isinstance(change, NewChain):
                add(NFT_MSG_NEWCHAIN, NLM_F_CREATE, attribute(NFTA_CHAIN_TABLE, _string(change.table))
                    + attribute(NFTA_CHAIN_NAME, _string(change.name)))
                set_id = next(set_ids)
                protocols, elements = _protocol_set(change.table, set_id)
                add(NFT_MSG_NEWSET, NLM_F_CREATE, protocols)
                add(NFT_MSG_NEWSETELEM, NLM_F_CREATE, elements)
                add(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, _rule(change.table, change.name, change.rule, set_id))
            elif isinstance(change, NewLookupTable):
                add(NFT_MSG_NEWSET, NLM_F_CREATE, _lookup_set(change.table, change.map, change.version, next(set_ids)))
                head = (attribute(NFTA_SET_ELEM_LIST_TABLE, _string(change.table))
                        + attribute(NFTA_SET_ELEM_LIST_SET, _string(change.map)))
                for elements in _slot_elements(change.slots):
                    add(NFT_MSG_NEWSETELEM, NLM_F_CREATE, head + attribute(NFTA_SET_ELEM_LIST_ELEMENTS, elements))
            else:
                head = (attribute(NFTA_SET_ELEM_LIST_TABLE, _string(change.table))
                        + attribute(NFTA_SET_ELEM_LIST_SET, _string(change.map)))
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


# -- declarations: a lookup table, and a chain with its rule, as nft 1.0.6 sends them -----------------------------
# tests/unit/test_nft_declarations.py holds what the kernel then lists to what it lists after nft's own.

NFTA_SET_FLAGS, NFTA_SET_KEY_TYPE, NFTA_SET_KEY_LEN, NFTA_SET_DATA_TYPE, NFTA_SET_DATA_LEN = 3, 4, 5, 6, 7
NFTA_SET_DESC, NFTA_SET_ID, NFTA_SET_USERDATA, NFTA_SET_DESC_SIZE = 9, 10, 13, 1
NFT_SET_ANONYMOUS, NFT_SET_CONSTANT, NFT_SET_MAP = 0x1, 0x2, 0x8
NFTA_SET_ELEM_LIST_SET_ID = 4
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 1, 2
# nft's data types (the set's key and data), and its registers: a 16-byte one (1-4) or a 32-bit one (8 + n)
TYPE_INTEGER, TYPE_IPADDR, TYPE_IP6ADDR, TYPE_INET_PROTOCOL = 4, 7, 8, 12
REG_1, REG_2, REG_3 = 1, 2, 3
REG32 = [8 + n for n in range(16)]
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFT_META_MARK, NFT_META_NFPROTO, NFT_META_L4PROTO = 3, 15, 16
NFT_CMP_EQ, NFT_BITWISE_BOOL, NFT_HASH_JENKINS, NFT_NAT_DNAT = 0, 0, 0, 1
NF_NAT_RANGE_PROTO_SPECIFIED = 0x2


def _udata(*items: tuple[int, bytes]) -> bytes:
    """libnftnl's user data: type (1 byte), length (1 byte), value; nft lists a set's types from it."""
    return b"".join(bytes((kind, len(value))) + value for kind, value in items)


def _host(value: int) -> bytes:
    return struct.pack("=I", value)


# What nft writes in a set's user data: the key's and the data's byte order (host: 1, big endian: 2), their
# `typeof` expressions (nft's expression id, then that expression's own fields), whether to merge elements.
_BYTEORDER_HOST, _BYTEORDER_BIG = _host(1), _host(2)
_TYPEOF_NUMGEN_INC_MOD_2 = _udata((0, _host(23)), (1, _udata((0, _host(0)), (1, _host(2)), (2, _host(0)))))
_TYPEOF_DADDR = {v: _udata((0, _host(7)), (1, _udata((0, _host(proto)), (1, _host(field)))))
                 for v, proto, field in ((4, 12, 12), (6, 13, 9))}  # payload: protocol ip/ip6, field daddr
_TYPEOF_L4PROTO = _udata((0, _host(9)), (1, _udata((0, _host(NFT_META_L4PROTO)))))  # meta l4proto
_LOOKUP_SET_UDATA = {v: _udata((0, _BYTEORDER_HOST), (1, _BYTEORDER_BIG), (3, _TYPEOF_NUMGEN_INC_MOD_2),
                               (4, _TYPEOF_DADDR[v]), (6, _host(0))) for v in (4, 6)}
_PROTOCOL_SET_UDATA = _udata((0, _BYTEORDER_HOST), (3, _TYPEOF_L4PROTO))
_ANONYMOUS = _string("__set%d")  # the kernel names it


def _u32(kind: int, value: int) -> bytes:
    return attribute(kind, struct.pack(">I", value))


def _nested(kind: int, payload: bytes) -> bytes:
    return attribute(NLA_F_NESTED | kind, payload)


def _lookup_set(table: str, name: str, version: int, set_id: int) -> bytes:
    """`map NAME { typeof numgen inc mod 2 : ip daddr; }` (or ip6), empty."""
    return (attribute(NFTA_SET_TABLE, _string(table)) + attribute(NFTA_SET_NAME, _string(name))
            + _u32(NFTA_SET_FLAGS, NFT_SET_MAP) + _u32(NFTA_SET_KEY_TYPE, TYPE_INTEGER) + _u32(NFTA_SET_KEY_LEN, 4)
            + _u32(NFTA_SET_DATA_TYPE, TYPE_IPADDR if version == 4 else TYPE_IP6ADDR)
            + _u32(NFTA_SET_DATA_LEN, 4 if version == 4 else 16) + _u32(NFTA_SET_ID, set_id)
            + attribute(NFTA_SET_USERDATA, _LOOKUP_SET_UDATA[version]))


def _protocol_set(table: str, set_id: int) -> tuple[bytes, bytes]:
    """The rule's anonymous `{ tcp, udp }`: the set, and its elements."""
    head = attribute(NFTA_SET_TABLE, _string(table)) + attribute(NFTA_SET_NAME, _ANONYMOUS)
    declared = (head + _u32(NFTA_SET_FLAGS, NFT_SET_ANONYMOUS | NFT_SET_CONSTANT)
                + _u32(NFTA_SET_KEY_TYPE, TYPE_INET_PROTOCOL) + _u32(NFTA_SET_KEY_LEN, 1) + _u32(NFTA_SET_ID, set_id)
                + _nested(NFTA_SET_DESC, _u32(NFTA_SET_DESC_SIZE, 2))
                + attribute(NFTA_SET_USERDATA, _PROTOCOL_SET_UDATA))
    elements = b"".join(_nested(i, _nested(NFTA_SET_ELEM_KEY, attribute(NFTA_DATA_VALUE, bytes((protocol,)))))
                        for i, protocol in enumerate((socket.IPPROTO_TCP, socket.IPPROTO_UDP), 1))
    filled = head + _u32(NFTA_SET_ELEM_LIST_SET_ID, set_id) + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, elements)
    return declared, filled


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nested(NFTA_LIST_ELEM, attribute(NFTA_EXPR_NAME, _string(name)) + _nested(NFTA_EXPR_DATA, b"".join(attrs)))


def _meta(key: int, dreg: int) -> bytes:
    return _expr("meta", _u32(2, key), _u32(1, dreg))  # NFTA_META_KEY, NFTA_META_DREG


def _payload(dreg: int, base: int, offset: int, length: int) -> bytes:
    return _expr("payload", _u32(1, dreg), _u32(2, base), _u32(3, offset), _u32(4, length))


def _lookup(sreg: int, name: bytes, dreg: int | None = None, set_id: int | None = None) -> bytes:
    """NFTA_LOOKUP_SREG, _DREG (a map), _SET and, for a set of this batch (anonymous), _SET_ID."""
    return _expr("lookup", _u32(2, sreg), b"" if dreg is None else _u32(3, dreg), attribute(1, name),
                 b"" if set_id is None else _u32(4, set_id))


def _rule(table: str, chain: str, rule: LookupRule, protocols: int) -> bytes:
    """`rule.text()` as nft compiles it, expression by expression (`protocols`: the id of its `{ tcp, udp }`)."""
    v4 = rule.version == 4
    address = 4 if v4 else 16
    # where nft puts the concatenations' parts: the address in the 16-byte register 2, then each 4-byte part
    after = REG32[5] if v4 else REG_3
    exprs = [_meta(NFT_META_L4PROTO, REG_1), _lookup(REG_1, _ANONYMOUS, set_id=protocols)]
    if rule.mark is not None:
        exprs += [_meta(NFT_META_MARK, REG_1),
                  _expr("bitwise", _u32(1, REG_1), _u32(2, REG_1), _u32(6, NFT_BITWISE_BOOL), _u32(3, 4),
                        _nested(4, attribute(NFTA_DATA_VALUE, _host(~rule.mark & 0xFFFFFFFF))),
                        _nested(5, attribute(NFTA_DATA_VALUE, _host(rule.mark)))),
                  _expr("meta", _u32(2, NFT_META_MARK), _u32(3, REG_1))]  # meta set: NFTA_META_KEY, _SREG
    exprs += [_meta(NFT_META_NFPROTO, REG_1),
              _expr("cmp", _u32(1, REG_1), _u32(2, NFT_CMP_EQ),
                    _nested(3, attribute(NFTA_DATA_VALUE, bytes((socket.AF_INET if v4 else socket.AF_INET6,))))),
              _payload(REG_2, NFT_PAYLOAD_NETWORK_HEADER, 12 if v4 else 8, address)]
    hashed = address
    if not rule.by_client:
        exprs.append(_payload(after, NFT_PAYLOAD_TRANSPORT_HEADER, 0, 2))  # th sport
        hashed += 4
    exprs += [_expr("hash", _u32(1, REG_2), _u32(2, REG_1), _u32(3, hashed), _u32(4, rule.size), _u32(5, HASH_SEED),
                    _u32(6, 0), _u32(7, NFT_HASH_JENKINS)),
              _lookup(REG_1, _string(rule.lookup), dreg=REG_1),
              _payload(REG_2, NFT_PAYLOAD_NETWORK_HEADER, 16 if v4 else 24, address),  # daddr
              _meta(NFT_META_L4PROTO, after),
              _payload(REG32[6] if v4 else REG32[9], NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2),  # th dport
              _lookup(REG_2, _string(f"node_ports_v{rule.version}"), dreg=REG_2),
              _expr("nat", _u32(1, NFT_NAT_DNAT), _u32(2, socket.AF_INET if v4 else socket.AF_INET6), _u32(3, REG_1),
                    _u32(5, REG_2), _u32(7, NF_NAT_RANGE_PROTO_SPECIFIED))]
    return (attribute(NFTA_RULE_TABLE, _string(table)) + attribute(NFTA_RULE_CHAIN, _string(chain))
            + _nested(NFTA_RULE_EXPRESSIONS, b"".join(exprs)))
