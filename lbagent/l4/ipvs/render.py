"""Render the L4 data plane for IPVS: virtual services and real servers as data, the ops between two states, and nft.

Pure: nothing here talks to the kernel. `desired()` turns frontends into IPVS services, `diff()` says which netlink
operations bring the kernel's services (as read back, with their connection counts) there, `after()` predicts the
result, and the `Companion*` functions render the small nftables table IPVS needs beside it.

Ownership: lbagent touches an IPVS service only when its address is one of the VIPs it is configured for (a VIP
belongs to the services behind it, whatever port another tool may have put there), or when the service is listed in
the `owned_v4`/`owned_v6` sets of its companion nftables table. lbagent writes a service into those sets before it
creates it and removes it after deleting it, so the record outlives the process: a restart after a VIP left the
config, or `lbagent cleanup` after the VIPs were unbound, still finds exactly what lbagent created.

Graceful removal (kube-proxy's GracefulDeleteRS): a TCP real server that leaves is first set to weight 0 (no new
connections; established ones go on), and deleted on a later diff once its active and inactive connection counts
are both 0. A UDP one is deleted at once: UDP has no end of connection, and every packet renews the IPVS entry, so
a client that keeps sending would stay on the leaving node for ever; with `expire_nodest_conn=1` the kernel expires
such an entry on its next packet and schedules the flow anew. A frontend left without backends keeps its service
while the weight-0 servers drain (IPVS refuses new connections with ICMP port unreachable meanwhile) and loses it
once they have; a frontend that is gone (not among the frontends at all) loses its service at once.

Direct server return (`forwardingMode: dsr`) is IPVS's direct routing: the real servers are the nodes at the
frontend's own port (direct routing cannot change the port; the node's kube-proxy takes VIP:port), and IPVS sends
the packet unchanged to the node's MAC address. So only nodes on one of the LB's segments can be real servers:
`on_link_only()` leaves the others out, as if unhealthy. The node answers the client directly; IPVS sees only the
client's packets, and with `sloppy_tcp` schedules a flow it has no connection for by any packet, so a flow moved
here from another LB reaches the node `mh` picks, the same one on every LB.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from ipaddress import ip_address
from typing import Any, NamedTuple

from lbagent import model
from lbagent.l4 import nftscript
from lbagent.l4.ipvs import mh
from lbagent.plan.services import Backend, Frontend

IPPROTO = {model.Protocol.TCP: 6, model.Protocol.UDP: 17}
PROTOCOL_BY_NUMBER = {number: protocol for protocol, number in IPPROTO.items()}
FWD_MASQ = 0  # IP_VS_CONN_F_MASQ: IPVS "NAT", the only forwarding method that reaches a nodePort
FWD_ROUTE = 3  # IP_VS_CONN_F_DROUTE: direct routing, for dsr frontends (the packet unchanged, sent to the node's MAC)

# Service flags (include/uapi/linux/ip_vs.h).
F_PERSISTENT = 0x0001
F_HASHED = 0x0002  # set by the kernel on every service it holds: never ours to compare or send
F_SCHED1 = 0x0008  # sh/mh: fallback to another server when the chosen one has weight 0 (or is overloaded)
F_SCHED2 = 0x0010  # sh/mh: hash the source port too, not only the source address
FLAGS_MASK = 0xFFFF & ~F_HASHED

# Persistence granularity, one client address. IPVS reads IPVS_SVC_ATTR_NETMASK as a prefix length for IPv6, and
# pyroute2 encodes the attribute as an IPv4 address: "128.0.0.0" is the bytes the kernel reads as 128 (x86).
NETMASK = {4: "255.255.255.255", 6: "128.0.0.0"}
HASHING = frozenset({"sh", "mh"})


class ServiceKey(NamedTuple):
    """An IPVS virtual service's identity in the kernel."""

    family: int  # 4 or 6
    protocol: model.Protocol
    vip: model.IPAddress
    port: int


class DestKey(NamedTuple):
    """A real server's identity within its service: a node address and the nodePort (dsr: the frontend's port)."""

    address: model.IPAddress
    port: int


@dataclass(frozen=True)
class Attributes:
    """A service's settings that `set-service` can change in place."""

    scheduler: str
    flags: int = 0
    timeout: int = 0  # persistence seconds, 0 when not persistent
    netmask: str = NETMASK[4]


@dataclass(frozen=True)
class Dest:
    """A real server: desired (weight only) or as read back from the kernel (with its connection counts)."""

    weight: int
    fwd_method: int = FWD_MASQ
    active: int = 0
    inactive: int = 0

    @property
    def connections(self) -> int:
        return self.active + self.inactive


@dataclass(frozen=True)
class Service:
    attributes: Attributes
    dests: Mapping[DestKey, Dest] = field(default_factory=dict)

    @property
    def taking(self) -> bool:
        """Whether the service takes new connections (a real server with weight > 0)."""
        return any(d.weight > 0 for d in self.dests.values())


State = Mapping[ServiceKey, Service]


class OpKind(StrEnum):
    ADD_SERVICE = "add-service"
    SET_SERVICE = "set-service"
    DEL_SERVICE = "del-service"
    ADD_DEST = "add-dest"
    SET_DEST = "set-dest"
    DEL_DEST = "del-dest"


@dataclass(frozen=True)
class Op:
    """One netlink request: `attributes` for add/set-service, `dest` and `weight` for the dest operations."""

    kind: OpKind
    key: ServiceKey
    attributes: Attributes | None = None
    dest: DestKey | None = None
    weight: int = 0
    fwd_method: int = FWD_MASQ

    def __str__(self) -> str:
        service = f"{self.key.protocol.value.lower()}/{_host_port(self.key.vip, self.key.port)}"
        if self.dest is None:
            return f"{self.kind} {service}" + (f" {self.attributes.scheduler}" if self.attributes else "")
        target = _host_port(self.dest.address, self.dest.port)
        if self.kind == OpKind.DEL_DEST:
            return f"{self.kind} {service} {target}"
        return f"{self.kind} {service} {target} weight {self.weight}" + (
            " route" if self.fwd_method == FWD_ROUTE else "")


def _host_port(address: model.IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def key_of(frontend: Frontend) -> ServiceKey:
    return ServiceKey(frontend.vip.version, frontend.protocol, frontend.vip, frontend.port)


def attributes(frontend: Frontend) -> Attributes:
    """The IPVS settings of a frontend.

    ClientIP affinity is IPVS persistence with the affinity timeout. sh and mh get the fallback flag, so a node
    set to weight 0 (draining, or leaving gracefully) passes its share to the others instead of having it refused.
    mh also hashes the source port (like the nftables data plane's Maglev over address and port), so one client's
    connections spread over the nodes, unless there is affinity: then the choice depends on the client address
    alone, and every LB node picks the same node for a client even before a persistence template exists. sh is
    what its name says, source-address hashing, without the port.
    """
    flags, timeout = 0, 0
    if frontend.affinity_timeout is not None:
        flags |= F_PERSISTENT
        timeout = max(1, frontend.affinity_timeout)
    if frontend.scheduler in HASHING:
        flags |= F_SCHED1
        if frontend.scheduler == "mh" and frontend.affinity_timeout is None:
            flags |= F_SCHED2
    return Attributes(frontend.scheduler, flags, timeout, NETMASK[frontend.vip.version])


def real_servers(frontend: Frontend) -> dict[DestKey, Dest]:
    """The backends that take new flows, as real servers: NAT to the nodePort, or for dsr direct routing to the
    node at the frontend's own port (the packet keeps its destination, VIP:port)."""
    if frontend.mode is model.ForwardingMode.DSR:
        return {DestKey(b.address, frontend.port): Dest(b.weight, FWD_ROUTE) for b in frontend.active}
    return {DestKey(b.address, frontend.node_port): Dest(b.weight) for b in frontend.active}


def desired(frontends: Iterable[Frontend]) -> dict[ServiceKey, Service]:
    """One service per frontend, with the backends that take new flows as real servers (none: drain, then go)."""
    return {key_of(f): Service(attributes(f), real_servers(f)) for f in frontends}


def on_link_only(frontends: Iterable[Frontend], on_link: Collection[str]) -> tuple[list[Frontend], dict[str, str]]:
    """The frontends with each dsr frontend's backends limited to the addresses in `on_link` (those the LB reaches
    without a gateway: direct routing sends to the node's MAC address), and the backends left out (address ->
    node name). Other modes are returned as they are."""
    out: list[Frontend] = []
    left_out: dict[str, str] = {}
    for f in frontends:
        if f.mode is not model.ForwardingMode.DSR:
            out.append(f)
            continue
        kept = tuple(b for b in f.backends if str(b.address) in on_link)
        left_out |= {str(b.address): b.node for b in f.active if str(b.address) not in on_link}
        out.append(f if len(kept) == len(f.backends) else replace(f, backends=kept))
    return out, left_out


def dsr_addresses(frontends: Iterable[Frontend]) -> set[str]:
    """The node addresses dsr frontends would send to (whose on-link paths the forwarder asks the kernel for)."""
    return {str(b.address) for f in frontends if f.mode is model.ForwardingMode.DSR for b in f.backends}


def owns(vips: Collection[model.IPAddress], recorded: Collection[ServiceKey]) -> Callable[[ServiceKey], bool]:
    """The ownership rule (see the module docstring): a configured VIP, or recorded as created by lbagent."""
    return lambda key: key.vip in vips or key in recorded


def _graceful(key: ServiceKey) -> bool:
    return key.protocol is model.Protocol.TCP


def order(key: ServiceKey) -> tuple[int, int, str, int]:
    return (key.family, int(key.vip), key.protocol.value, key.port)


def diff(actual: State, want: State, owned: Callable[[ServiceKey], bool] = lambda key: True) -> list[Op]:
    """The operations that bring the kernel from `actual` toward `want`, in the order to send them.

    Services in `actual` that are not owned are never touched (a desired one is always owned: it is a frontend's).
    Per service: its settings and new real servers first, weight changes next, removals last, so it never runs
    short of servers on the way. Draining takes several calls: a diff of the state it leads to is empty, or holds
    only the deletions whose connections have ended since.
    """
    ops: list[Op] = []
    for key in sorted(set(want) | {k for k in actual if owned(k)}, key=order):
        have, target = actual.get(key), want.get(key)
        if target is None:
            if have is not None:
                ops.append(Op(OpKind.DEL_SERVICE, key))
        elif have is None:
            if target.dests:
                ops.append(Op(OpKind.ADD_SERVICE, key, target.attributes))
                ops += [Op(OpKind.ADD_DEST, key, dest=d, weight=t.weight, fwd_method=t.fwd_method)
                        for d, t in sorted(target.dests.items())]
        else:
            ops += _diff_service(key, have, target)
    return ops


def _diff_service(key: ServiceKey, have: Service, target: Service) -> list[Op]:
    graceful = _graceful(key)
    leaving = sorted(set(have.dests) - set(target.dests))
    if not target.dests and all(
        not graceful or (have.dests[d].weight == 0 and have.dests[d].connections == 0) for d in leaving
    ):
        return [Op(OpKind.DEL_SERVICE, key)]
    ops: list[Op] = []
    if target.dests and have.attributes != target.attributes:
        ops.append(Op(OpKind.SET_SERVICE, key, target.attributes))
    ops += [Op(OpKind.ADD_DEST, key, dest=d, weight=t.weight, fwd_method=t.fwd_method)
            for d, t in sorted(target.dests.items()) if d not in have.dests]
    ops += [Op(OpKind.SET_DEST, key, dest=d, weight=t.weight, fwd_method=t.fwd_method)
            for d, t in sorted(target.dests.items())
            if d in have.dests and (have.dests[d].weight, have.dests[d].fwd_method) != (t.weight, t.fwd_method)]
    for d in leaving:
        h = have.dests[d]
        if h.weight > 0 and graceful:
            # Even with no connection now: one could be scheduled between our dump and a deletion. It keeps its
            # forwarding method: its established connections go on as they began.
            method = h.fwd_method if h.fwd_method in (FWD_MASQ, FWD_ROUTE) else FWD_MASQ
            ops.append(Op(OpKind.SET_DEST, key, dest=d, weight=0, fwd_method=method))
        elif not graceful or h.connections == 0:
            ops.append(Op(OpKind.DEL_DEST, key, dest=d))
    return ops


def after(actual: State, ops: Iterable[Op]) -> dict[ServiceKey, Service]:
    """The state `ops` lead to from `actual` (connection counts carried over): what the kernel holds if they
    all succeed, without reading it back."""
    out = dict(actual)
    for op in ops:
        if op.kind is OpKind.ADD_SERVICE:
            assert op.attributes is not None
            out[op.key] = Service(op.attributes, {})
        elif op.kind is OpKind.SET_SERVICE:
            assert op.attributes is not None
            out[op.key] = replace(out[op.key], attributes=op.attributes)
        elif op.kind is OpKind.DEL_SERVICE:
            out.pop(op.key, None)
        else:
            assert op.dest is not None
            service = out[op.key]
            dests = dict(service.dests)
            if op.kind is OpKind.DEL_DEST:
                dests.pop(op.dest, None)
            else:
                old = dests.get(op.dest, Dest(0))
                dests[op.dest] = replace(old, weight=op.weight, fwd_method=op.fwd_method)
            out[op.key] = replace(service, dests=dests)
    return out


def draining(state: State, want: State) -> set[ServiceKey]:
    """Services with work left for a later diff: real servers at weight 0 waiting for their connections to end."""
    return {
        key for key, service in state.items()
        if key in want and (set(service.dests) - set(want[key].dests) or not want[key].dests)
    }


def programmed(state: State) -> set[model.IPAddress]:
    """VIPs with a service that takes new connections."""
    return {key.vip for key, service in state.items() if service.taking}


def mh_servers(frontend: Frontend) -> list[mh.RealServer]:
    """The real servers of the service lbagent creates for `frontend`, in the order the kernel lists them: diff()
    adds them in DestKey order, and the kernel puts each one it adds first."""
    dests = desired([frontend])[key_of(frontend)].dests
    return [mh.RealServer(d.address, d.port, dest.weight, dest.weight)
            for d, dest in sorted(dests.items(), reverse=True)]


def predict(frontend: Frontend, source: model.IPAddress, source_port: int,
            table_index: int = mh.DEFAULT_TABLE_INDEX) -> Backend | None:
    """The backend IPVS `mh` sends a new flow to, in the service as lbagent creates it with the frontend's active
    backends, and as long as none of them was removed and added back since (lbagent.l4.ipvs.mh says why that
    matters); None when it refuses the flow. `table_index` is the kernel's CONFIG_IP_VS_MH_TAB_INDEX. Only `mh`:
    the other schedulers choose by state no config shows (ValueError)."""
    if frontend.scheduler != "mh":
        raise ValueError(f"IPVS scheduler {frontend.scheduler!r} cannot be predicted from the config, only 'mh'")
    servers = mh_servers(frontend)
    flags = attributes(frontend).flags
    chosen = mh.schedule(servers, mh.lookup_table(tuple(servers), table_index), source,
                         source_port if flags & F_SCHED2 else None, bool(flags & F_SCHED1))
    if chosen is None:
        return None
    server = servers[chosen]
    return next(b for b in frontend.active if b.address == server.address)  # one real server per node address


# -- reading the kernel's answers ------------------------------------------------------------------

def service_from_attrs(attrs: Mapping[str, Any]) -> tuple[ServiceKey, Attributes] | None:
    """A dumped IPVS_CMD_ATTR_SERVICE's attributes (name -> value): None for what lbagent never makes
    (fwmark services, other protocols)."""
    protocol = PROTOCOL_BY_NUMBER.get(attrs.get("IPVS_SVC_ATTR_PROTOCOL", -1))
    if protocol is None or "IPVS_SVC_ATTR_ADDR" not in attrs or attrs.get("IPVS_SVC_ATTR_FWMARK"):
        return None
    vip = ip_address(attrs["IPVS_SVC_ATTR_ADDR"])
    flags = attrs.get("IPVS_SVC_ATTR_FLAGS")
    value = int(flags["flags"]) if flags is not None else 0
    key = ServiceKey(vip.version, protocol, vip, int(attrs["IPVS_SVC_ATTR_PORT"]))
    return key, Attributes(
        str(attrs.get("IPVS_SVC_ATTR_SCHED_NAME", "")), value & FLAGS_MASK, int(attrs.get("IPVS_SVC_ATTR_TIMEOUT", 0)),
        str(attrs.get("IPVS_SVC_ATTR_NETMASK", NETMASK[vip.version])),
    )


def dest_from_attrs(attrs: Mapping[str, Any]) -> tuple[DestKey, Dest]:
    """A dumped IPVS_CMD_ATTR_DEST's attributes: the kernel's real values, not pyroute2's class defaults."""
    return DestKey(ip_address(attrs["IPVS_DEST_ATTR_ADDR"]), int(attrs["IPVS_DEST_ATTR_PORT"])), Dest(
        int(attrs["IPVS_DEST_ATTR_WEIGHT"]), int(attrs["IPVS_DEST_ATTR_FWD_METHOD"]),
        int(attrs.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0)), int(attrs.get("IPVS_DEST_ATTR_INACT_CONNS", 0)),
    )


_FORWARD = {"Masq": FWD_MASQ, "Local": 1, "Tunnel": 2, "Route": 3}
_PROC_PROTOCOLS = {"TCP": model.Protocol.TCP, "UDP": model.Protocol.UDP}


def _proc_endpoint(text: str) -> tuple[model.IPAddress, int]:
    """"C6336450:0050" or "[2001:0db8:...:0080]:01BB"."""
    address, _, port = text.rpartition(":")
    if address.startswith("["):
        return ip_address(address[1:-1]), int(port, 16)
    return ip_address(int(address, 16)), int(port, 16)


def parse_proc(text: str) -> dict[ServiceKey, dict[DestKey, Dest]]:
    """Every TCP/UDP service's real servers with weight, forwarding method and connection counts from
    /proc/net/ip_vs: one read for all, where netlink needs a request per service. (The service lines lack the
    scheduler flags, so the services themselves come from netlink.)"""
    out: dict[ServiceKey, dict[DestKey, Dest]] = {}
    current: dict[DestKey, Dest] | None = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or line.startswith(("IP Virtual Server", "Prot ")) or fields[1] == "RemoteAddress:Port":
            continue
        if fields[0] == "->":
            if current is not None and len(fields) >= 6:
                address, port = _proc_endpoint(fields[1])
                current[DestKey(address, port)] = Dest(
                    int(fields[3]), _FORWARD.get(fields[2], -1), int(fields[4]), int(fields[5])
                )
            continue
        protocol = _PROC_PROTOCOLS.get(fields[0])
        if protocol is None:  # FWM, SCTP: never lbagent's
            current = None
            continue
        vip, port = _proc_endpoint(fields[1])
        current = out.setdefault(ServiceKey(vip.version, protocol, vip, port), {})
    return out


# -- the companion nftables table ------------------------------------------------------------------
#
# IPVS NAT rewrites only the destination, has no source filter, and answers nothing itself for a VIP:port it has no
# service for. So beside it, `table inet <dataplane.table>_ipvs`:
# - `sources` (prerouting, priority raw): loadBalancerSourceRanges. IPVS schedules at LOCAL_IN, after every
#   prerouting chain; at raw priority a refused packet does not even get a conntrack entry.
# - `postrouting` (nat): masquerade for masquerade-mode frontends. IPVS with net.ipv4.vs.conntrack=1 keeps the
#   connection's conntrack entry and sends its packets on through LOCAL_OUT and POSTROUTING, where this nat chain
#   sees the first one. The entry's original destination is still the VIP (IPVS changes only the reply tuple) and
#   the packet's destination port is now the nodePort: that pair is only ever an IPVS-forwarded connection of that
#   frontend. (nft cannot match IPVS itself, and cannot put `ct original proto-dst` in a concatenation; a packet
#   mark set in prerouting would work too but needs a mark bit.)
# - `input` (filter, priority 110, after IPVS's LOCAL_IN hook at 99): whatever IPVS did not take, for a VIP, is
#   refused (TCP reset, ICMP port unreachable), as in the other data planes, even where a process listens on the
#   wildcard address of the LB node. Except replies: a process on the LB node that connects to a VIP does so from
#   the VIP (the route to a local address), and the nodes' answers come back to the VIP, un-NATed by IPVS at
#   LOCAL_IN on their way to that process.
# - `owned_v4`/`owned_v6`: the ownership record, no rule uses it.

_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
_L3 = {4: "ip", 6: "ip6"}
_ICMP = {4: ("icmp", "icmp port-unreachable"), 6: ("ipv6-icmp", "icmpv6 port-unreachable")}
SET_NAMES = tuple(f"{name}_v{v}" for name in ("vips", "owned", "masquerade", "ranged", "allowed") for v in (4, 6))


@dataclass(frozen=True)
class Companion:
    """The companion table's content: each set's elements, as nft writes them."""

    table: str
    elements: Mapping[str, frozenset[str]]


def companion_table(dataplane: model.Dataplane) -> str:
    """The companion table's name: `<dataplane.table>_ipvs` (`table inet lbagent_ipvs`)."""
    return f"{dataplane.table}_ipvs"


def _triple(address: model.IPAddress, protocol: model.Protocol, port: int) -> str:
    return f"{address} . {protocol.value.lower()} . {port}"


def companion(
    table: str, frontends: Iterable[Frontend], vips: Iterable[model.IPAddress], owned: Iterable[ServiceKey]
) -> Companion:
    """The content for these frontends (all of them, also those without backends: a refused source stays refused
    whether or not the service has nodes), VIPs and owned services."""
    sets: dict[str, set[str]] = {name: set() for name in SET_NAMES}
    for vip in vips:
        sets[f"vips_v{vip.version}"].add(str(vip))
    for key in owned:
        sets[f"owned_v{key.family}"].add(_triple(key.vip, key.protocol, key.port))
    for f in frontends:
        v = f.vip.version
        if f.mode is model.ForwardingMode.MASQUERADE and f.backends:
            sets[f"masquerade_v{v}"].add(_triple(f.vip, f.protocol, f.node_port))
        ranges = [net for net in f.source_ranges if net.version == v]
        if f.source_ranges:
            # A frontend whose ranges are all of the other family admits nobody of its own: ranged, none allowed.
            sets[f"ranged_v{v}"].add(_triple(f.vip, f.protocol, f.port))
            sets[f"allowed_v{v}"].update(f"{_triple(f.vip, f.protocol, f.port)} . {net}" for net in ranges)
    return Companion(table, {name: frozenset(elements) for name, elements in sets.items()})


def merge(a: Companion, b: Companion) -> Companion:
    """Both contents at once: what is in place while services come and go, so none is ever unfiltered."""
    return Companion(b.table, {name: a.elements.get(name, frozenset()) | b.elements[name] for name in SET_NAMES})


def render_companion(c: Companion) -> str:
    """The whole table, replacing any previous one in the same transaction."""
    t = c.table
    lines = nftscript.replace_table(t)
    e = {name: nftscript.elements(items) for name, items in c.elements.items()}  # each set's elements clause
    for v in (4, 6):
        a, triple = _ADDR[v], f"{_ADDR[v]} . inet_proto . inet_service"
        lines += [
            f"\tset vips_v{v} {{ type {a};{e[f'vips_v{v}']} }}",
            f"\tset owned_v{v} {{ type {triple};{e[f'owned_v{v}']} }}",
            f"\tset masquerade_v{v} {{ type {triple};{e[f'masquerade_v{v}']} }}",
            f"\tset ranged_v{v} {{ type {triple};{e[f'ranged_v{v}']} }}",
            f"\tset allowed_v{v} {{ type {triple} . {a}; flags interval;{e[f'allowed_v{v}']} }}",
        ]
    frontend = {v: f"{_L3[v]} daddr . meta l4proto . th dport" for v in (4, 6)}
    lines += [
        "\tchain sources {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        *(f"\t\t{frontend[v]} @ranged_v{v} {frontend[v]} . {_L3[v]} saddr != @allowed_v{v} drop" for v in (4, 6)),
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        *(f"\t\tct original {_L3[v]} daddr . meta l4proto . th dport @masquerade_v{v} masquerade" for v in (4, 6)),
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority 110; policy accept;",
        "\t\tct direction reply accept",
    ]
    for v in (4, 6):
        icmp, reject = _ICMP[v]
        lines += [
            f"\t\t{_L3[v]} daddr @vips_v{v} ct state invalid drop",
            f"\t\t{_L3[v]} daddr @vips_v{v} meta l4proto tcp reject with tcp reset",
            f"\t\t{_L3[v]} daddr @vips_v{v} meta l4proto != {icmp} reject with {reject}",
        ]
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def render_companion_delta(old: Companion, new: Companion) -> str:
    """Element changes only, one transaction (deletions first): "" when nothing changed."""
    if old.table != new.table:
        return render_companion(new)
    deletions, additions = nftscript.element_changes(new.table, old.elements, new.elements, SET_NAMES)
    return nftscript.script([*deletions, *additions])


def render_companion_delete(table: str) -> str:
    return nftscript.delete_table(table)


def recorded(nft_json: str, table: str) -> set[ServiceKey]:
    """The owned services listed in `nft -j list table inet <table>` output."""
    out: set[ServiceKey] = set()
    for item in json.loads(nft_json).get("nftables", []):
        s = item.get("set")
        if not s or s.get("table") != table or s.get("name") not in ("owned_v4", "owned_v6"):
            continue
        for element in s.get("elem", []):
            address, protocol, port = element["concat"]
            vip = ip_address(address)
            out.add(ServiceKey(vip.version, model.Protocol(str(protocol).upper()), vip, int(port)))
    return out
