"""The kernel's IPVS Maglev scheduler (`mh`, net/netfilter/ipvs/ip_vs_mh.c), reproduced to say where it sends a new
flow: `lbagent plan --flow` with `dataplane.kind: ipvs`, and the behaviour suite's check of real IPVS.

The kernel's choice depends on more than lbagent's own Maglev table (lbagent.l4.maglev) does:
- The table has a prime number of slots fixed when the kernel is built (CONFIG_IP_VS_MH_TAB_INDEX: 4093 by
  default), not `maglevTableSize`.
- Each real server's preferred slots come from hsiphash of its address and port under keys the kernel source fixes
  (the same on every machine and boot), but the servers take turns filling the table in the order of the service's
  real-server list, which is the order they were added, newest first. So two LB nodes agree on every slot only when
  they added the same servers in the same order: a node that left (deleted) and came back is first in the list of
  the LB nodes that saw it leave, and moves some of the other nodes' slots there.
- A server at weight 0 (draining, or leaving gracefully) keeps its slots, filled by its last weight above 0; with
  the fallback flag lbagent sets, a flow that lands on it is hashed again with growing offsets until it lands on a
  server that takes new flows.
- hsiphash is SipHash-1-3 truncated to 32 bits on 64-bit kernels; 32-bit kernels use HalfSipHash-1-3, which this
  does not reproduce.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from lbagent import model

# primes[CONFIG_IP_VS_MH_TAB_INDEX - 8]: the table sizes the kernel can be built with.
PRIMES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
DEFAULT_TABLE_INDEX = 12  # the kernel's default (Kconfig), which Debian, Ubuntu and Fedora keep
# generate_hash_secret(): constants, not random per boot.
_KEY1 = (2654435761, 2654435761)  # slot of a flow, and each server's first preferred slot
_KEY2 = (2654446892, 2654446892)  # each server's skip between its preferred slots

_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1


@dataclass(frozen=True)
class RealServer:
    """A real server as the scheduler sees it: `weight` now, and `last_weight`, the last weight above 0 it was
    given (what the kernel fills the table by; equal to `weight` unless the server is at weight 0)."""

    address: model.IPAddress
    port: int
    weight: int
    last_weight: int


def table_size(index: int = DEFAULT_TABLE_INDEX) -> int:
    if not 8 <= index <= 17:
        raise ValueError(f"CONFIG_IP_VS_MH_TAB_INDEX must be 8-17 (got {index})")
    return PRIMES[index - 8]


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & _M64


def _round(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _M64; v1 = _rotl(v1, 13); v1 ^= v0; v0 = _rotl(v0, 32)  # noqa: E702
    v2 = (v2 + v3) & _M64; v3 = _rotl(v3, 16); v3 ^= v2  # noqa: E702
    v0 = (v0 + v3) & _M64; v3 = _rotl(v3, 21); v3 ^= v0  # noqa: E702
    v2 = (v2 + v1) & _M64; v1 = _rotl(v1, 17); v1 ^= v2; v2 = _rotl(v2, 32)  # noqa: E702
    return v0, v1, v2, v3


def hsiphash(data: bytes, key: tuple[int, int]) -> int:
    """lib/siphash.c hsiphash() on a 64-bit kernel: SipHash-1-3 of `data` under the two 64-bit key words, the low
    32 bits of the result. Little-endian words, as the kernel reads them."""
    k0, k1 = key
    v0, v1 = 0x736F6D6570736575 ^ k0, 0x646F72616E646F6D ^ k1
    v2, v3 = 0x6C7967656E657261 ^ k0, 0x7465646279746573 ^ k1
    whole = len(data) - len(data) % 8
    for i in range(0, whole, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v3 ^= m
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0 ^= m
    b = ((len(data) << 56) | int.from_bytes(data[whole:], "little")) & _M64
    v3 ^= b
    v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    return (v0 ^ v1 ^ v2 ^ v3) & _M32


def _hashkey(address: model.IPAddress, port: int, key: tuple[int, int], offset: int = 0) -> int:
    """ip_vs_mh_hashkey(): hsiphash of offset + port + the address (IPv6: its four 32-bit words xored), as one
    native 32-bit word."""
    if address.version == 4:
        folded = int(address)
    else:
        packed = address.packed
        folded = 0
        for i in range(0, 16, 4):
            folded ^= int.from_bytes(packed[i:i + 4], "big")
    return hsiphash(((offset + port + folded) & _M32).to_bytes(4, "little"), key)


@functools.lru_cache(maxsize=64)  # a few ms each (4093 slots), and every flow of a service asks for the same one
def lookup_table(servers: tuple[RealServer, ...], index: int = DEFAULT_TABLE_INDEX) -> tuple[int | None, ...]:
    """ip_vs_mh_reassign(): slot -> index into `servers`, given in the kernel's list order (the most recently added
    first); every slot None when no server has a weight."""
    size = table_size(index)
    if len(servers) > size:
        raise ValueError(f"IPVS mh takes at most {size} real servers per service (got {len(servers)})")
    weights = [s.last_weight for s in servers]
    gcd = math.gcd(*(w for w in weights if w > 0)) if any(w > 0 for w in weights) else 0
    if gcd < 1:
        return (None,) * size
    # Weights are scaled down so the heaviest takes at most 2^(index/2) turns per round.
    shift = max((max(weights) // gcd).bit_length() - index // 2, 0)
    turns = [(w // gcd) >> shift or (1 if w != 0 else 0) for w in weights]
    preferred = [_hashkey(s.address, s.port, _KEY1) % size for s in servers]
    skips = [_hashkey(s.address, s.port, _KEY2) % (size - 1) + 1 for s in servers]
    slots: list[int | None] = [None] * size
    filled = 0
    while True:  # rounds: each server in list order claims its next free preferred slot, `turns` times
        for i, claims in enumerate(turns):
            for _ in range(claims):
                while slots[preferred[i]] is not None:
                    preferred[i] = (preferred[i] + skips[i]) % size
                slots[preferred[i]] = i
                filled += 1
                if filled == size:
                    return tuple(slots)


def schedule(servers: Sequence[RealServer], table: Sequence[int | None], source: model.IPAddress,
             source_port: int | None, fallback: bool) -> int | None:
    """ip_vs_mh_schedule(): the index of the server a new flow from `source` goes to, None when IPVS refuses it.
    `source_port` is hashed only with the mh-port flag (None without); `fallback` is the mh-fallback flag."""
    size = len(table)
    port = source_port or 0
    first = _hashkey(source, port, _KEY1) % size
    chosen = table[first]
    if chosen is None or servers[chosen].weight > 0:
        return chosen
    if not fallback:
        return None
    for offset in range(size):  # ip_vs_mh_get_fallback(): hash again with an offset
        chosen = table[_hashkey(source, port, _KEY1, (first + offset) % size) % size]
        if chosen is None:
            return None
        if servers[chosen].weight > 0:
            return chosen
    return None
