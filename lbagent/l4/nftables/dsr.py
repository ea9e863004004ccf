"""Direct server return on nftables: `table netdev <name>`, a stateless forwarder at the ingress hook.

A packet for a dsr frontend (VIP . protocol . port) that comes in on one of `dataplane.dsrInterfaces` is sent out
unchanged except for its Ethernet header: `fwd ip to <node> device <interface>` resolves the node's MAC address as
a neighbour and transmits the packet there, before conntrack, routing or the local stack ever see it. The node is
chosen by the same jhash over the same fields and the same Maglev table as the inet table's DNAT (lookup_table,
HASH_SEED), so every LB node picks the same node for a flow and needs no state to keep picking it: an LB that
leaves or comes back moves no connection. The node's kube-proxy takes VIP:port (the Kubernetes source writes
`ipMode: VIP` for these Services) and answers the client directly with the VIP as the source.

Only nodes on the LB's own segments can be reached this way (a node behind a router has no MAC address here): the
forwarder gives `paths` (node address -> the interface it is on-link through) and leaves the others out, as if
unhealthy, and says so. The same frontends stay in the inet table too, where packets that arrive elsewhere (a
process on the LB itself, another interface) are NATed as in nat mode.

The table is small (one element per dsr frontend and one Maglev map pair per node set) and replaced whole in one
transaction whenever it changes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lbagent import model
from lbagent.l4 import nftscript
from lbagent.l4.jhash import HASH_SEED
from lbagent.l4.nftables.render import LookupTable, maglev_table
from lbagent.plan.services import Backend, Frontend

_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
_L3 = {4: "ip", 6: "ip6"}


@dataclass(frozen=True)
class DsrPlan:
    """What the netdev table holds: its text ("" when no dsr frontend is programmed), and the backends left out
    because no interface reaches them on-link (address -> node name)."""

    text: str
    unreachable: Mapping[str, str]
    frontends: int


def dsr_frontends(frontends: Iterable[Frontend]) -> list[Frontend]:
    return [f for f in frontends if f.mode is model.ForwardingMode.DSR]


def build(table: str, frontends: Sequence[Frontend], size: int, interfaces: Sequence[str],
          paths: Mapping[str, str]) -> DsrPlan:
    """The netdev table for the dsr frontends, their backends limited to those in `paths` (pure)."""
    unreachable: dict[str, str] = {}
    dispatch: dict[int, list[str]] = {4: [], 6: []}
    ranged: dict[int, list[str]] = {4: [], 6: []}
    allowed: dict[int, list[str]] = {4: [], 6: []}
    tables: dict[str, LookupTable] = {}
    chains: dict[str, tuple[str, bool]] = {}
    for f in frontends:
        usable: list[Backend] = []
        for b in f.active:
            if str(b.address) in paths:
                usable.append(b)
            else:
                unreachable[str(b.address)] = b.node
        v = f.vip.version
        key = f"{f.vip} . {f.protocol.value.lower()} . {f.port}"
        if f.source_ranges:
            ranged[v].append(key)
            allowed[v] += [f"{key} . {net}" for net in f.source_ranges if net.version == v]
        if not usable or not interfaces:
            continue
        lookup = maglev_table(tuple(usable), v, size)
        tables[lookup.name] = lookup
        by_client = f.affinity_timeout is not None
        chain = lookup.name + ("_c" if by_client else "")
        chains[chain] = (lookup.name, by_client)
        dispatch[v].append(f"{key} : goto {chain}")
    if not any(dispatch.values()):
        return DsrPlan("", unreachable, 0)
    return DsrPlan(_text(table, interfaces, dispatch, ranged, allowed, tables, chains, paths, size), unreachable,
                   sum(len(d) for d in dispatch.values()))


def _text(table: str, interfaces: Sequence[str], dispatch: Mapping[int, list[str]], ranged: Mapping[int, list[str]],
          allowed: Mapping[int, list[str]], tables: Mapping[str, LookupTable], chains: Mapping[str, tuple[str, bool]],
          paths: Mapping[str, str], size: int) -> str:
    lines = nftscript.replace_table(table, "netdev")
    for v in (4, 6):
        a, triple = _ADDR[v], f"{_ADDR[v]} . inet_proto . inet_service"
        lines += [
            f"\tmap dispatch_v{v} {{ type {triple} : verdict;{nftscript.elements(dispatch[v])} }}",
            f"\tset ranged_v{v} {{ type {triple};{nftscript.elements(ranged[v])} }}",
            f"\tset allowed_v{v} {{ type {triple} . {a}; flags interval;{nftscript.elements(allowed[v])} }}",
        ]
    for lookup in sorted(tables.values(), key=lambda t: t.name):
        l3 = _L3[lookup.version]
        slots = ", ".join(f"{i} : {a}" for i, a in enumerate(lookup.slots))
        devices = ", ".join(f'{i} : "{paths[a]}"' for i, a in enumerate(lookup.slots))
        lines += [
            f"\tmap {lookup.name} {{ typeof numgen inc mod 2 : {l3} daddr; elements = {{ {slots} }} }}",
            f"\tmap {lookup.name}_dev {{ typeof numgen inc mod 2 : meta oif; elements = {{ {devices} }} }}",
        ]
    for name, (lookup_name, by_client) in sorted(chains.items()):
        v = tables[lookup_name].version
        l3 = _L3[v]
        lines.append(f"\tchain {name} {{")
        for proto in ("tcp", "udp"):
            hashed = f"{l3} saddr" if by_client else f"{l3} saddr . {proto} sport"
            slot = f"jhash {hashed} mod {size} seed {HASH_SEED:#x}"
            lines.append(f"\t\tmeta l4proto {proto} fwd {l3} to {slot} map @{lookup_name}"
                         f" device {slot} map @{lookup_name}_dev")
        lines.append("\t}")
    devices = ", ".join(f'"{i}"' for i in interfaces)
    frontend = {v: f"{_L3[v]} daddr . meta l4proto . th dport" for v in (4, 6)}
    lines += [
        "\tchain ingress {",
        f"\t\ttype filter hook ingress devices = {{ {devices} }} priority -500; policy accept;",
        # Only frames sent to this host: a switch floods a frame for a MAC address it has not learned (another LB's,
        # gone) to every port, and forwarding those too would duplicate packets or keep a dead LB's flows alive.
        "\t\tmeta pkttype != host accept",
        # loadBalancerSourceRanges, as in the inet table: a refused client's packet goes no further
        *(f"\t\t{frontend[v]} @ranged_v{v} {frontend[v]} . {_L3[v]} saddr != @allowed_v{v} drop" for v in (4, 6)),
        *(f"\t\t{frontend[v]} vmap @dispatch_v{v}" for v in (4, 6)),
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_delete(table: str) -> str:
    return nftscript.delete_table(table, "netdev")
