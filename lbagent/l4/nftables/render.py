"""Render the L4 data plane for nftables: lbagent's own table, whole or as a delta, always one transaction.

The per-service state lives in map and set elements, not in rules: a frontend (VIP . protocol . port) is one
element of a verdict map that jumps to the chain of a Maglev lookup table, one element giving its nodePort,
and optional elements marking it for masquerade or restricting its sources. Maglev tables are shared by every
frontend with the same nodes and weights. So a change of one service's endpoints is a handful of element
changes whatever the number of services, and a resync can still replace the whole table atomically.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lbagent import model
from lbagent.l4 import maglev
from lbagent.l4.jhash import HASH_SEED, flow_fields, nft_jhash
from lbagent.plan.services import Backend, Frontend

FrontendKey = tuple[str, str, int]  # (vip, "tcp"/"udp", port)


@dataclass(frozen=True)
class LookupTable:
    """A Maglev table for one family: slot -> node address."""

    name: str
    version: int
    slots: tuple[str, ...]


@dataclass
class Ruleset:
    """Everything in lbagent's nftables table, as data: what both the full and the delta renderings are made of."""

    table: str
    mark: int
    size: int
    vips: dict[int, set[str]] = field(default_factory=lambda: {4: set(), 6: set()})
    dispatch: dict[int, dict[FrontendKey, str]] = field(default_factory=lambda: {4: {}, 6: {}})
    node_ports: dict[int, dict[FrontendKey, int]] = field(default_factory=lambda: {4: {}, 6: {}})
    masquerade: dict[int, set[FrontendKey]] = field(default_factory=lambda: {4: set(), 6: set()})
    ranged: dict[int, set[FrontendKey]] = field(default_factory=lambda: {4: set(), 6: set()})
    allowed: dict[int, set[tuple[FrontendKey, str]]] = field(default_factory=lambda: {4: set(), 6: set()})
    tables: dict[str, LookupTable] = field(default_factory=dict)
    chains: dict[str, tuple[str, bool]] = field(default_factory=dict)  # chain -> (lookup table, by client only)
    users: Counter[str] = field(default_factory=Counter)  # dispatch entries per chain and per lookup table


def _key(f: Frontend) -> FrontendKey:
    return (str(f.vip), f.protocol.value.lower(), f.port)


def lookup_table(frontend: Frontend, size: int) -> LookupTable:
    """The Maglev table of a frontend's active backends, named by its content so equal tables are shared."""
    return _lookup_table(frontend.active, frontend.vip.version, size)


def _lookup_table(active: tuple[Backend, ...], version: int, size: int) -> LookupTable:
    order = maglev.table([(b.node, b.weight) for b in active], size)
    slots = tuple(str(active[i].address) for i in order)
    digest = hashlib.blake2b(repr((size, [(b.node, str(b.address), b.weight) for b in active])).encode(),
                             digest_size=6).hexdigest()
    return LookupTable(f"mg{version}_{digest}", version, slots)


def build(frontends: Iterable[Frontend], vips: Iterable[model.IPAddress], dataplane: model.Dataplane) -> Ruleset:
    """Decide the content of the table (pure). A frontend with no active backend is left out of dispatch: its
    packets reach the `input` chain as local traffic to a VIP and are refused there (TCP reset, ICMP port
    unreachable), which is what a client of a service without endpoints should see, not a black hole."""
    rs = Ruleset(dataplane.table, dataplane.masquerade_mark, dataplane.maglev_table_size)
    for vip in vips:
        rs.vips[vip.version].add(str(vip))
    tables: _TableCache = {}
    for f in frontends:
        _insert(rs, f, tables)
    return rs


_TableCache = dict[tuple[tuple[str, model.IPAddress, int], ...], LookupTable]


def _insert(rs: Ruleset, f: Frontend, tables: _TableCache) -> None:
    active = f.active
    if not active:
        return
    v, key = f.vip.version, _key(f)
    identity = tuple((b.node, b.address, b.weight) for b in active)
    table = tables.get(identity)
    if table is None:
        table = tables[identity] = _lookup_table(active, v, rs.size)
    rs.tables.setdefault(table.name, table)
    by_client = f.affinity_timeout is not None
    chain = table.name + ("_c" if by_client else "")
    rs.chains[chain] = (table.name, by_client)
    rs.users[chain] += 1
    rs.users[table.name] += 1
    rs.dispatch[v][key] = chain
    rs.node_ports[v][key] = active[0].port
    if f.mode is model.ForwardingMode.MASQUERADE:
        rs.masquerade[v].add(key)
    if f.source_ranges:
        rs.ranged[v].add(key)
        rs.allowed[v].update((key, str(net)) for net in f.source_ranges if net.version == v)


def _remove(rs: Ruleset, f: Frontend) -> None:
    v, key = f.vip.version, _key(f)
    chain = rs.dispatch[v].pop(key, None)
    if chain is None:
        return
    rs.users[chain] -= 1
    rs.users[rs.chains[chain][0]] -= 1
    rs.node_ports[v].pop(key, None)
    rs.masquerade[v].discard(key)
    rs.ranged[v].discard(key)
    rs.allowed[v] -= {(key, str(net)) for net in f.source_ranges}


def _elements_of(rs: Ruleset, frontends: Iterable[Frontend]) -> set[tuple[str, str]]:
    """(container, element) pairs the given frontends hold in the ruleset now."""
    out: set[tuple[str, str]] = set()
    for f in frontends:
        v, key = f.vip.version, _key(f)
        chain = rs.dispatch[v].get(key)
        if chain is None:
            continue
        k = _frontend(key)
        out.add((f"dispatch_v{v}", f"{k} : goto {chain}"))
        out.add((f"node_ports_v{v}", f"{k} : {rs.node_ports[v][key]}"))
        if key in rs.masquerade[v]:
            out.add((f"masquerade_v{v}", k))
        if key in rs.ranged[v]:
            out.add((f"ranged_v{v}", k))
            out.update((f"allowed_v{v}", f"{k} . {net}") for kk, net in rs.allowed[v] if kk == key)
    return out


def update(rs: Ruleset, old: Sequence[Frontend], new: Sequence[Frontend]) -> str:
    """Replace some frontends (those of the services that changed) in `rs`, in place, and return the nft
    transaction that does the same in the kernel. Costs what changed, whatever the size of `rs`."""
    before = _elements_of(rs, old)
    tables_before, chains_before = set(rs.tables), set(rs.chains)
    for f in old:
        _remove(rs, f)
    cache: _TableCache = {}
    for f in new:
        _insert(rs, f, cache)
    after = _elements_of(rs, new)
    dead_chains = sorted(c for c in rs.chains if rs.users[c] <= 0)
    dead_tables = sorted(t for t in rs.tables if rs.users[t] <= 0)
    for name in dead_chains:
        del rs.chains[name], rs.users[name]
    for name in dead_tables:
        del rs.tables[name], rs.users[name]
    t = rs.table
    lines = [f"add {_table_declaration(rs.tables[n]).strip().replace('map ', f'map inet {t} ', 1)}"
             for n in sorted(set(rs.tables) - tables_before)]
    for name in sorted(set(rs.chains) - chains_before):
        lines.append(f"add chain inet {t} {name}")
        lines += [f"add rule inet {t} {name} {rule}" for rule in _chain_body(rs, name)]
    lines += _element_lines("delete", t, before - after)
    lines += _element_lines("add", t, after - before)
    lines += [f"delete chain inet {t} {name}" for name in dead_chains if name in chains_before]
    lines += [f"delete map inet {t} {name}" for name in dead_tables if name in tables_before]
    return "\n".join(lines) + "\n" if lines else ""


def _element_lines(verb: str, table: str, pairs: set[tuple[str, str]]) -> list[str]:
    by_container: dict[str, list[str]] = {}
    for container, element in pairs:
        by_container.setdefault(container, []).append(element)
    return [f"{verb} element inet {table} {c} {{ {', '.join(sorted(e))} }}" for c, e in sorted(by_container.items())]


# -- text ---------------------------------------------------------------------------------------------

_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
_L3 = {4: "ip", 6: "ip6"}


def _frontend(key: FrontendKey) -> str:
    return f"{key[0]} . {key[1]} . {key[2]}"


def _chain_body(rs: Ruleset, name: str) -> list[str]:
    table_name, by_client = rs.chains[name]
    v = rs.tables[table_name].version
    l3 = _L3[v]
    rules = []
    for proto in ("tcp", "udp"):
        hashed = f"{l3} saddr" if by_client else f"{l3} saddr . {proto} sport"
        rules.append(
            f"meta l4proto {proto} dnat {l3} to jhash {hashed} mod {rs.size} seed {HASH_SEED:#x} map @{table_name}"
            f" : {l3} daddr . meta l4proto . th dport map @node_ports_v{v}"
        )
    return rules


def _elements(items: Iterable[str]) -> str:
    listed = sorted(items)
    return f" elements = {{ {', '.join(listed)} }};" if listed else ""


def _declarations(rs: Ruleset) -> list[str]:
    """Sets and maps, each on one line: `nft -f` reads a whole table definition in one transaction."""
    out = []
    for v in (4, 6):
        a = _ADDR[v]
        out += [
            f"\tset vips_v{v} {{ type {a};{_elements(rs.vips[v])} }}",
            f"\tmap dispatch_v{v} {{ type {a} . inet_proto . inet_service : verdict;"
            + _elements(f"{_frontend(k)} : goto {c}" for k, c in rs.dispatch[v].items()) + " }",
            f"\tmap node_ports_v{v} {{ type {a} . inet_proto . inet_service : inet_service;"
            + _elements(f"{_frontend(k)} : {p}" for k, p in rs.node_ports[v].items()) + " }",
            f"\tset masquerade_v{v} {{ type {a} . inet_proto . inet_service;"
            + _elements(_frontend(k) for k in rs.masquerade[v]) + " }",
            f"\tset ranged_v{v} {{ type {a} . inet_proto . inet_service;"
            + _elements(_frontend(k) for k in rs.ranged[v]) + " }",
            f"\tset allowed_v{v} {{ type {a} . inet_proto . inet_service . {a}; flags interval;"
            + _elements(f"{_frontend(k)} . {net}" for k, net in rs.allowed[v]) + " }",
        ]
    for table in sorted(rs.tables.values(), key=lambda t: t.name):
        out.append(_table_declaration(table))
    return out


def _table_declaration(table: LookupTable) -> str:
    l3 = _L3[table.version]
    slots = ", ".join(f"{i} : {a}" for i, a in enumerate(table.slots))
    return f"\tmap {table.name} {{ typeof numgen inc mod 2 : {l3} daddr; elements = {{ {slots} }} }}"


def _fixed_chains(rs: Ruleset) -> list[str]:
    mark, keep = f"{rs.mark:#010x}", f"{~rs.mark & 0xFFFFFFFF:#010x}"
    frontend = {v: f"{_L3[v]} daddr . meta l4proto . th dport" for v in (4, 6)}
    dispatch = [
        *(f"\t\t{frontend[v]} @masquerade_v{v} meta mark set meta mark | {mark}" for v in (4, 6)),
        *(f"\t\t{frontend[v]} vmap @dispatch_v{v}" for v in (4, 6)),
    ]
    return [
        # loadBalancerSourceRanges: before NAT, so a refused client never gets a conntrack NAT binding.
        "\tchain sources {",
        "\t\ttype filter hook prerouting priority -110; policy accept;",
        *(f"\t\t{frontend[v]} @ranged_v{v} {frontend[v]} . {_L3[v]} saddr != @allowed_v{v} drop" for v in (4, 6)),
        "\t}",
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        *dispatch,
        "\t}",
        # Connections a process on the LB node itself opens to a VIP take the same path as the clients'.
        "\tchain output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        *dispatch,
        "\t}",
        # Only what lbagent forwarded in masquerade mode carries the mark: nothing else on the host is SNATed.
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        f"\t\tmeta mark & {mark} == {mark} meta mark set meta mark & {keep} masquerade",
        "\t}",
        # A VIP belongs to the services behind it, not to the LB host: nothing else here answers on it.
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        "\t\tip daddr @vips_v4 meta l4proto tcp reject with tcp reset",
        "\t\tip daddr @vips_v4 meta l4proto != icmp reject with icmp port-unreachable",
        "\t\tip6 daddr @vips_v6 meta l4proto tcp reject with tcp reset",
        "\t\tip6 daddr @vips_v6 meta l4proto != ipv6-icmp reject with icmpv6 port-unreachable",
        "\t}",
    ]


def render_full(rs: Ruleset) -> str:
    """Declare, delete and redefine the table: the kernel swaps old for new in one transaction."""
    lines = [f"table inet {rs.table}", f"delete table inet {rs.table}", f"table inet {rs.table} {{"]
    lines += _declarations(rs)
    lines += _fixed_chains(rs)
    for name in sorted(rs.chains):
        lines += [f"\tchain {name} {{", *(f"\t\t{r}" for r in _chain_body(rs, name)), "\t}"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(frontends: Iterable[Frontend], vips: Iterable[model.IPAddress], dataplane: model.Dataplane) -> str:
    return render_full(build(frontends, vips, dataplane))


def _set_delta(name: str, old: set[str], new: set[str], table: str, out: list[str], adds: list[str]) -> None:
    gone, came = sorted(old - new), sorted(new - old)
    if gone:
        out.append(f"delete element inet {table} {name} {{ {', '.join(gone)} }}")
    if came:
        adds.append(f"add element inet {table} {name} {{ {', '.join(came)} }}")


def _map_elements(items: Mapping[FrontendKey, object]) -> set[str]:
    return {f"{_frontend(k)} : {v}" for k, v in items.items()}


def render_delta(old: Ruleset, new: Ruleset) -> str | None:
    """Only what changed, as one nft transaction, or None when the fixed part changed (render_full then).

    Order matters inside the transaction: new lookup tables and chains first, then element changes, then
    the chains and tables nothing points at any more.
    """
    if (old.table, old.mark, old.size) != (new.table, new.mark, new.size):
        return None
    t = new.table
    head: list[str] = []
    removals: list[str] = []
    additions: list[str] = []
    for name in sorted(new.tables.keys() - old.tables.keys()):
        head.append(f"add {_table_declaration(new.tables[name]).strip().replace('map ', f'map inet {t} ', 1)}")
    for name in sorted(new.chains.keys() - old.chains.keys()):
        head.append(f"add chain inet {t} {name}")
        head += [f"add rule inet {t} {name} {rule}" for rule in _chain_body(new, name)]
    for v in (4, 6):
        _set_delta(f"vips_v{v}", old.vips[v], new.vips[v], t, removals, additions)
        _set_delta(f"dispatch_v{v}", {f"{_frontend(k)} : goto {c}" for k, c in old.dispatch[v].items()},
                   {f"{_frontend(k)} : goto {c}" for k, c in new.dispatch[v].items()}, t, removals, additions)
        _set_delta(f"node_ports_v{v}", _map_elements(old.node_ports[v]), _map_elements(new.node_ports[v]), t,
                   removals, additions)
        for name in ("masquerade", "ranged"):
            _set_delta(f"{name}_v{v}", {_frontend(k) for k in getattr(old, name)[v]},
                       {_frontend(k) for k in getattr(new, name)[v]}, t, removals, additions)
        _set_delta(f"allowed_v{v}", {f"{_frontend(k)} . {n}" for k, n in old.allowed[v]},
                   {f"{_frontend(k)} . {n}" for k, n in new.allowed[v]}, t, removals, additions)
    tail = [f"delete chain inet {t} {name}" for name in sorted(old.chains.keys() - new.chains.keys())]
    tail += [f"delete map inet {t} {name}" for name in sorted(old.tables.keys() - new.tables.keys())]
    return "\n".join([*head, *removals, *additions, *tail]) + "\n" if head or removals or additions or tail else ""


def render_delete(dataplane: model.Dataplane) -> str:
    """Remove lbagent's table and with it everything lbagent programmed (`lbagent cleanup`)."""
    return f"table inet {dataplane.table}\ndelete table inet {dataplane.table}\n"


def predict(frontend: Frontend, source: model.IPAddress, source_port: int, size: int) -> Backend | None:
    """The backend nftables sends a new flow to: the same jhash over the same fields, the same Maglev table."""
    if not frontend.active:
        return None
    table = lookup_table(frontend, size)
    port = None if frontend.affinity_timeout is not None else source_port
    slot = nft_jhash(flow_fields(source, port), size, HASH_SEED)
    address = table.slots[slot]
    return next(b for b in frontend.active if str(b.address) == address)
