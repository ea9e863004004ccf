"""Load-balancer IP addresses for Services, from lbagent's pools. Pure: the writer feeds it the Services it listed
and writes what it decides into their status.

The state is the Services' status and nothing else: every decision starts by importing the addresses already in
status (the IP-given-twice-after-a-restart bugs of MetalLB and Cilium came from allocating before importing), so a
restarted writer, or a new one after a hand-over, gives every Service the address it had. An address stays with its
Service while the Service asks for nothing else; a pool that shrinks away from a held address does not take it back
(the Service keeps serving; the problem is reported), so no IP ever changes under a running Service unless its owner
asks for another.

Sharing: two Services may hold the same address only when both carry the same sharing key annotation and no
protocol and port is used by both.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lbagent import model
from lbagent.sources import Problem
from lbagent.sources.kubernetes.translate import key_of, status_ips

IPS_ANNOTATION = "lbagent.io/loadBalancerIPs"
SHARING_ANNOTATION = "lbagent.io/allow-shared-ip"
POOL_ANNOTATION = "lbagent.io/address-pool"


@dataclass(frozen=True)
class Pool:
    """Addresses lbagent may give: CIDRs and first-last ranges; `auto_assign` False: only when asked for."""

    name: str
    ranges: tuple[tuple[model.IPAddress, model.IPAddress], ...]
    auto_assign: bool = True

    @staticmethod
    def parse(name: str, entries: Iterable[str], auto_assign: bool = True) -> Pool:
        """`192.0.2.0/28`, `2001:db8::/120` or `198.51.100.10-198.51.100.20`; ValueError naming the entry."""
        ranges = []
        for entry in entries:
            text = entry.strip()
            if "-" in text:
                first_text, last_text = (part.strip() for part in text.split("-", 1))
                first, last = ipaddress.ip_address(first_text), ipaddress.ip_address(last_text)
                if first.version != last.version or int(first) > int(last):
                    raise ValueError(f"{entry!r}: a range is first-last of one family, first not after last")
                ranges.append((first, last))
            else:
                network = ipaddress.ip_network(text, strict=True)
                ranges.append((network[0], network[-1]))
        return Pool(name, tuple(ranges), auto_assign)

    def __contains__(self, address: object) -> bool:
        return isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and any(
            first.version == address.version and int(first) <= int(address) <= int(last)
            for first, last in self.ranges)

    def addresses(self, version: int) -> Iterator[model.IPAddress]:
        """Every address of the family, in order."""
        for first, last in self.ranges:
            if first.version != version:
                continue
            cls = type(first)
            for value in range(int(first), int(last) + 1):
                yield cls(value)

    def families(self) -> set[int]:
        return {first.version for first, _ in self.ranges}


@dataclass(frozen=True)
class Request:
    """What one Service asks of the allocator, read from the object."""

    key: str
    families: tuple[int, ...]  # in order of preference; both for dual stack
    require_all: bool  # RequireDualStack (or single stack): every family or nothing
    requested: tuple[model.IPAddress, ...]  # spec.loadBalancerIP or the annotation
    pool: str | None
    sharing_key: str | None
    ports: frozenset[tuple[str, int]]
    current: tuple[model.IPAddress, ...]  # in status now
    created: str = ""  # creationTimestamp: older Services allocate first
    requested_field: str = ""  # where `requested` was written

    @staticmethod
    def of(service: Mapping[str, Any]) -> tuple[Request | None, list[Problem]]:
        meta = service.get("metadata") or {}
        spec = service.get("spec") or {}
        annotations = meta.get("annotations") or {}
        problems: list[Problem] = []
        key = key_of(service)

        def bad(path: str, value: Any, message: str) -> None:
            problems.append(Problem(f"Service {key}: {path}", str(value), message))

        families = []
        for i, family in enumerate(spec.get("ipFamilies") or ["IPv4"]):
            if family not in ("IPv4", "IPv6"):
                bad(f"spec.ipFamilies[{i}]", family, "must be IPv4 or IPv6")
                continue
            families.append(4 if family == "IPv4" else 6)
        policy = spec.get("ipFamilyPolicy") or "SingleStack"
        if policy == "SingleStack":
            families = families[:1]
        requested: list[model.IPAddress] = []
        text = annotations.get(IPS_ANNOTATION)
        path = f"metadata.annotations[{IPS_ANNOTATION}]"
        if text is None and spec.get("loadBalancerIP"):
            text, path = spec["loadBalancerIP"], "spec.loadBalancerIP"
        if text is not None:
            for part in str(text).split(","):
                try:
                    address = ipaddress.ip_address(part.strip())
                except ValueError:
                    bad(path, text, f"{part.strip()!r} is not an IP address")
                    continue
                if any(r.version == address.version for r in requested):
                    bad(path, text, "at most one address per family")
                    continue
                requested.append(address)
            if requested and not problems:
                families = [a.version for a in requested]
        current = []
        for text_ip in status_ips(service):
            try:
                current.append(ipaddress.ip_address(text_ip))
            except ValueError:
                continue
        ports = frozenset((str(p.get("protocol", "TCP")), int(p["port"])) for p in spec.get("ports") or []
                          if isinstance(p.get("port"), int))
        if problems:
            return None, problems
        return Request(key, tuple(families), policy != "PreferDualStack", tuple(requested),
                       annotations.get(POOL_ANNOTATION), annotations.get(SHARING_ANNOTATION), ports,
                       tuple(current), str(meta.get("creationTimestamp") or ""), path), []


@dataclass
class Result:
    """The allocator's answer: each Service's addresses (what its status must say), why some got none (each an
    Event and a log line), and warnings about addresses kept although lbagent would not give them now."""

    addresses: dict[str, tuple[model.IPAddress, ...]] = field(default_factory=dict)
    problems: dict[str, list[Problem]] = field(default_factory=dict)
    warnings: dict[str, list[Problem]] = field(default_factory=dict)

    def refuse(self, request: Request, path: str, value: str, message: str) -> None:
        self.problems.setdefault(request.key, []).append(Problem(f"Service {request.key}: {path}", value, message))

    def warn(self, request: Request, path: str, value: str, message: str) -> None:
        self.warnings.setdefault(request.key, []).append(Problem(f"Service {request.key}: {path}", value, message))


@dataclass
class _Holder:
    keys: list[str]
    sharing_key: str | None
    ports: set[tuple[str, int]]


class Allocator:
    """One allocation pass over every Service (the writer runs one after each change it sees; 10,000 Services
    take well under a second: free addresses are found with a cursor per pool and family, not by scanning)."""

    def __init__(self, pools: Sequence[Pool]) -> None:
        self.pools = tuple(pools)
        self._held: dict[model.IPAddress, _Holder] = {}
        self._shared: dict[str, list[model.IPAddress]] = {}  # sharing key -> addresses held under it
        self._cursors: dict[tuple[str, int], Iterator[model.IPAddress]] = {}
        self._handed_back: list[model.IPAddress] = []  # passed by a cursor, then released: free again

    def _pool_of(self, address: model.IPAddress) -> Pool | None:
        return next((p for p in self.pools if address in p), None)

    def _clash(self, request: Request, address: model.IPAddress) -> str | None:
        """Why `request` may not hold `address`, or None."""
        holder = self._held.get(address)
        if holder is None:
            return None
        if request.sharing_key is None or holder.sharing_key != request.sharing_key:
            return (f"already given to {', '.join(holder.keys)}; Services share an address only when both carry the "
                    f"annotation {SHARING_ANNOTATION} with the same value")
        both = sorted(request.ports & holder.ports)
        if both:
            return (f"shared with {', '.join(holder.keys)} (sharing key {request.sharing_key!r}), which uses "
                    + ", ".join(f"{proto} {port}" for proto, port in both) + " too")
        return None

    def _hold(self, request: Request, address: model.IPAddress) -> None:
        holder = self._held.get(address)
        if holder is None:
            holder = self._held[address] = _Holder([], request.sharing_key, set())
            if request.sharing_key is not None:
                self._shared.setdefault(request.sharing_key, []).append(address)
        holder.keys.append(request.key)
        holder.ports |= request.ports

    def _next_free(self, request: Request, version: int) -> model.IPAddress | None:
        """An address already shared under the request's sharing key that it fits beside, else the first address
        nobody holds, from the pool it names or the auto-assigned pools in their order."""
        for address in self._shared.get(request.sharing_key or "", []):
            if address.version == version and self._clash(request, address) is None \
                    and (request.pool is None or address in self._pool_named(request.pool)):
                return address
        for pool in self.pools:
            if (pool.name != request.pool) if request.pool else not pool.auto_assign:
                continue
            for address in self._handed_back:
                if address.version == version and address in pool and address not in self._held:
                    self._handed_back.remove(address)
                    return address
            cursor = self._cursors.setdefault((pool.name, version), pool.addresses(version))
            for address in cursor:
                if address not in self._held:
                    return address
        return None

    def _pool_named(self, name: str) -> Pool:
        return next((p for p in self.pools if p.name == name), Pool(name, ()))

    def allocate(self, requests: Iterable[Request], reserved: Mapping[model.IPAddress, str] | None = None) -> Result:
        """Every Service's addresses: first what status already holds (oldest Service first, so of two Services
        claiming one address in status the older keeps it), then the rest. `reserved`: addresses lbagent serves
        from elsewhere (the file's services and listeners), never given, each with what holds it."""
        self._held.clear()
        for address, owner in (reserved or {}).items():
            self._held[address] = _Holder([owner], None, set())
        self._shared.clear()
        self._cursors.clear()
        self._handed_back.clear()
        result = Result()
        ordered = sorted(requests, key=lambda r: (r.created, r.key))
        pending = []
        for request in ordered:
            wanted = set(request.requested)
            kept = []
            for address in request.current:
                if wanted and address not in wanted:
                    continue  # the Service asks for another address now
                if address.version not in request.families:
                    continue
                if self._clash(request, address) is not None:
                    continue
                if self._pool_of(address) is None:
                    result.warn(request, "status.loadBalancer.ingress", str(address),
                                "is in none of lbagent's pools now; the Service keeps it (an address never changes "
                                "under a running Service): to move it, ask for another address")
                kept.append(address)
                self._hold(request, address)
            pending.append((request, kept))
        for request, kept in pending:
            addresses = list(kept)
            for version in request.families:
                if any(a.version == version for a in addresses):
                    continue
                asked = next((a for a in request.requested if a.version == version), None)
                if asked is not None:
                    where = request.requested_field
                    if self._pool_of(asked) is None:
                        result.refuse(request, where, str(asked),
                                      "is in none of lbagent's pools (" + ", ".join(p.name for p in self.pools) + ")")
                        continue
                    why = self._clash(request, asked)
                    if why is not None:
                        result.refuse(request, where, str(asked), why)
                        continue
                    addresses.append(asked)
                    self._hold(request, asked)
                    continue
                if request.pool is not None and not any(p.name == request.pool for p in self.pools):
                    result.refuse(request, f"metadata.annotations[{POOL_ANNOTATION}]", request.pool,
                                  "no such pool in lbagent's configuration")
                    break
                free = self._next_free(request, version)
                if free is None:
                    result.refuse(request, "spec.ipFamilies", f"IPv{version}",
                                  f"no free IPv{version} address left in "
                                  + (f"pool {request.pool}" if request.pool else "the auto-assigned pools"))
                    continue
                addresses.append(free)
                self._hold(request, free)
            if request.require_all and len(addresses) < len(request.families):
                # RequireDualStack or a single requested family not met: give nothing rather than half
                if request.key not in result.problems:
                    result.refuse(request, "spec.ipFamilyPolicy", "RequireDualStack",
                                  "not every family could be given an address")
                for address in addresses:
                    if address not in kept:
                        self._release(request, address)
                addresses = [a for a in addresses if a in kept]
            result.addresses[request.key] = tuple(sorted(addresses, key=lambda a: a.version))
        return result

    def _release(self, request: Request, address: model.IPAddress) -> None:
        holder = self._held.get(address)
        if holder is None:
            return
        holder.keys.remove(request.key)
        if not holder.keys:
            del self._held[address]
            self._handed_back.append(address)
            if holder.sharing_key is not None:
                self._shared[holder.sharing_key].remove(address)
