"""Netlink messages as bytes, for the few places lbagent reads and writes them itself (nf_tables notifications and
element batches, NFLOG refusals, the VIPs' addresses): the header and attribute layouts, the messages in a buffer
read from a socket, a message's attributes. Pure: the sockets are their callers'."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from typing import NamedTuple

NLMSG_HDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port
NLA_HDR = struct.Struct("=HH")  # length, type
NLA_TYPE_MASK = 0x3FFF
NLMSG_ERROR, NLMSG_DONE = 2, 3


class Message(NamedTuple):
    """One message of a buffer: its type, sequence number and sender's port, and where its payload is."""

    kind: int
    seq: int
    port: int
    start: int  # the payload's first byte in the buffer
    end: int


def messages(data: bytes) -> Iterator[Message]:
    """Every whole message in a buffer read from a netlink socket, in order (a truncated one ends it)."""
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, kind, _flags, seq, port = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            return
        yield Message(kind, seq, port, offset + NLMSG_HDR.size, offset + length)
        offset += (length + 3) & ~3


def error_code(data: bytes, message: Message) -> int:
    """An NLMSG_ERROR's code: 0 for an acknowledgement, a negative errno for a refusal."""
    code: int = struct.unpack_from("=i", data, message.start)[0]
    return code


def refusal(code: int) -> str:
    """An errno (positive) as the kernel's refusal reads: `ENOENT (No such file or directory)`."""
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


def attributes(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    """A message's attributes by type, from `offset` to `end` (the first of each type)."""
    found: dict[int, bytes] = {}
    while offset + NLA_HDR.size <= end:
        length, kind = NLA_HDR.unpack_from(data, offset)
        if length < NLA_HDR.size:
            break
        found.setdefault(kind & NLA_TYPE_MASK, data[offset + NLA_HDR.size:offset + length])
        offset += (length + 3) & ~3
    return found


def attribute_text(value: bytes) -> str:
    """A string attribute's text (NUL-terminated)."""
    return value.split(b"\0", 1)[0].decode(errors="replace")


def attribute(kind: int, payload: bytes) -> bytes:
    """An attribute, padded to 4 bytes (a nested one is an attribute of attributes)."""
    return NLA_HDR.pack(NLA_HDR.size + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)
