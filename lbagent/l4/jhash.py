"""The Linux kernel's jhash() and nft's `jhash ... mod N seed S`, bit for bit, to predict the kernel's choice."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

# The seed of the hash that picks a flow's Maglev slot, in both data planes that hash (nft's `jhash ... seed`,
# iptables' `HMARK --hmark-rnd`). Every LB node must pick the same backend for the same flow, so an ECMP change
# at the router that moves a flow to another LB keeps it on its node: a constant, not random per boot.
HASH_SEED = 0x6C626167

_M = 0xFFFFFFFF
_INITVAL = 0xDEADBEEF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _M; a ^= _rol(c, 4); c = (c + b) & _M  # noqa: E702
    b = (b - a) & _M; b ^= _rol(a, 6); a = (a + c) & _M  # noqa: E702
    c = (c - b) & _M; c ^= _rol(b, 8); b = (b + a) & _M  # noqa: E702
    a = (a - c) & _M; a ^= _rol(c, 16); c = (c + b) & _M  # noqa: E702
    b = (b - a) & _M; b ^= _rol(a, 19); a = (a + c) & _M  # noqa: E702
    c = (c - b) & _M; c ^= _rol(b, 4); b = (b + a) & _M  # noqa: E702
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b; c = (c - _rol(b, 14)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 11)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & _M  # noqa: E702
    return c


def jhash(key: bytes, seed: int) -> int:
    """include/linux/jhash.h jhash(), with the key read as little-endian words as on x86 and arm64."""
    length = len(key)
    a = b = c = (_INITVAL + length + seed) & _M
    k = key
    while len(k) > 12:
        a = (a + int.from_bytes(k[0:4], "little")) & _M
        b = (b + int.from_bytes(k[4:8], "little")) & _M
        c = (c + int.from_bytes(k[8:12], "little")) & _M
        a, b, c = _mix(a, b, c)
        k = k[12:]
    if not k:
        return c
    tail = k + bytes(12 - len(k))
    a = (a + int.from_bytes(tail[0:4], "little")) & _M
    b = (b + int.from_bytes(tail[4:8], "little")) & _M
    c = (c + int.from_bytes(tail[8:12], "little")) & _M
    return _final(a, b, c)


def nft_jhash(fields: list[bytes], modulus: int, seed: int) -> int:
    """nft's `jhash a . b mod N seed S`: each field padded to 32-bit registers, scaled with reciprocal_scale."""
    key = b"".join(f + bytes(-len(f) % 4) for f in fields)
    return (jhash(key, seed) * modulus) >> 32


def flow_fields(source: IPv4Address | IPv6Address, source_port: int | None) -> list[bytes]:
    """The hashed fields of a flow as lbagent's ruleset concatenates them: `saddr . sport` (or `saddr`)."""
    fields = [source.packed]
    if source_port is not None:
        fields.append(source_port.to_bytes(2, "big"))
    return fields
