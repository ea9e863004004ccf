"""Render the L4 data plane for nftables: lbagent's own table, whole or as a delta, always one transaction.

The per-service state lives in map and set elements, not in rules: a frontend (VIP . protocol . port) is one
element of a verdict map that jumps to the chain of a Maglev lookup table, one element giving its nodePort,
and optional elements restricting its sources. Maglev tables are shared by every frontend with the same nodes
and weights, their chains (which also mark masquerade flows) by every frontend with the same table, affinity and
mode. So a change of one service's endpoints is a handful of element changes whatever the number of services,
and a resync can still replace the whole table atomically.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from lbagent import model
from lbagent.l4 import maglev, nftscript
from lbagent.l4.change import FrontendChange
from lbagent.l4.jhash import HASH_SEED, flow_fields, nft_jhash
from lbagent.plan.services import Backend, Frontend

FrontendKey = tuple[str, str, int]  # (vip, "tcp"/"udp", port)
# The sets and maps of the table, in the order element changes are written.
_CONTAINERS = tuple(f"{name}_v{v}" for v in (4, 6)
                    for name in ("vips", "dispatch", "node_ports", "ranged", "allowed"))


@dataclass(frozen=True)
class LookupTable:
    """A Maglev table for one family: slot -> node address."""

    name: str
    version: int
    slots: tuple[str, ...]


class Chain(NamedTuple):
    """What a lookup table's chain does: shared by every frontend with the same table, affinity and mode."""

    table: str
    by_client: bool  # hash the client's address only (sessionAffinity: ClientIP)
    masquerade: bool  # mark the flow for masquerade first


@dataclass
class Ruleset:
    """Everything in lbagent's nftables table, as data: what both the full and the delta renderings are made of."""

    table: str
    mark: int
    size: int
    vips: dict[int, set[str]] = field(default_factory=lambda: {4: set(), 6: set()})
    dispatch: dict[int, dict[FrontendKey, str]] = field(default_factory=lambda: {4: {}, 6: {}})
    node_ports: dict[int, dict[FrontendKey, int]] = field(default_factory=lambda: {4: {}, 6: {}})
    ranged: dict[int, set[FrontendKey]] = field(default_factory=lambda: {4: set(), 6: set()})
    allowed: dict[int, set[tuple[FrontendKey, str]]] = field(default_factory=lambda: {4: set(), 6: set()})
    tables: dict[str, LookupTable] = field(default_factory=dict)
    chains: dict[str, Chain] = field(default_factory=dict)
    users: Counter[str] = field(default_factory=Counter)  # dispatch entries per chain and per lookup table
    dispatched: Counter[model.IPAddress] = field(default_factory=Counter)  # dispatch entries per VIP

    def programmed(self) -> set[model.IPAddress]:
        """The VIPs with at least one frontend dispatched (what the kernel forwards): O(VIPs), not O(frontends)."""
        return {vip for vip, count in self.dispatched.items() if count > 0}


def _key(f: Frontend) -> FrontendKey:
    return (_text(f.vip), f.protocol.value.lower(), f.port)


@functools.lru_cache(maxsize=1 << 16)
def _text(address: model.IPAddress) -> str:
    """An address as nft writes it: many frontends share a VIP, and str() of an address is slow Python."""
    return str(address)


def lookup_table(frontend: Frontend, size: int) -> LookupTable:
    """The Maglev table of a frontend's active backends, named by its content so equal tables are shared."""
    return maglev_table(frontend.active, frontend.vip.version, size)


def maglev_table(active: tuple[Backend, ...], version: int, size: int,
                 known: Mapping[str, LookupTable] | None = None) -> LookupTable:
    """The table, or the one in `known` with its name (the name says the content: computing it is cheap, the
    Maglev permutation is not)."""
    name = table_name(active, version, size)
    if known is not None and (table := known.get(name)) is not None:
        return table
    order = maglev.table([(b.node, b.weight) for b in active], size)
    slots = tuple(str(active[i].address) for i in order)
    return LookupTable(name, version, slots)


def table_name(active: tuple[Backend, ...], version: int, size: int) -> str:
    digest = hashlib.blake2b(repr((size, [(b.node, str(b.address), b.weight) for b in active])).encode(),
                             digest_size=6).hexdigest()
    return f"mg{version}_{digest}"


def build(frontends: Iterable[Frontend], vips: Iterable[model.IPAddress], dataplane: model.Dataplane) -> Ruleset:
    """Decide the content of the table (pure). A frontend with no active backend is left out of dispatch: its
    packets reach the `input` chain as local traffic to a VIP and are refused there (TCP reset, ICMP port
    unreachable), which is what a client of a service without endpoints should see, not a black hole."""
    rs = Ruleset(dataplane.table, dataplane.masquerade_mark, dataplane.maglev_table_size)
    for vip in vips:
        rs.vips[vip.version].add(str(vip))
    tables = _TableCache()
    for f in frontends:
        _insert(rs, f, tables)
    return rs


class _TableCache:
    """Lookup tables made in one pass, found by the backends tuple's identity first (the planner shares one tuple
    between all frontends on the same nodes, so 20,000 frontends cost a few lookups, and their active backends are
    picked out once per tuple) and by the active backends' content second."""

    def __init__(self) -> None:
        self._by_id: dict[tuple[int, int], tuple[tuple[Backend, ...], LookupTable | None]] = {}
        self._by_content: dict[tuple[Backend, ...], LookupTable] = {}

    def get(self, f: Frontend, size: int, known: Mapping[str, LookupTable]) -> LookupTable | None:
        """The frontend's lookup table; None when it has no active backend."""
        backends, version = f.backends, f.vip.version
        hit = self._by_id.get((id(backends), version))
        if hit is not None and hit[0] is backends:
            return hit[1]
        active = f.active
        table = None
        if active:
            table = self._by_content.get(active)
            if table is None:
                table = self._by_content[active] = maglev_table(active, version, size, known)
        self._by_id[(id(backends), version)] = (backends, table)  # holds `backends`: its id is not reused meanwhile
        return table


def _insert(rs: Ruleset, f: Frontend, tables: _TableCache) -> None:
    table = tables.get(f, rs.size, rs.tables)
    if table is None:
        return
    v, key = f.vip.version, _key(f)
    rs.tables.setdefault(table.name, table)
    by_client = f.affinity_timeout is not None
    masquerade = f.mode is model.ForwardingMode.MASQUERADE
    chain = table.name + ("_c" if by_client else "") + ("_m" if masquerade else "")
    rs.chains[chain] = Chain(table.name, by_client, masquerade)
    rs.users[chain] += 1
    rs.users[table.name] += 1
    if rs.dispatch[v].get(key) is None:
        rs.dispatched[f.vip] += 1
    rs.dispatch[v][key] = chain
    rs.node_ports[v][key] = f.node_port
    if f.source_ranges:
        rs.ranged[v].add(key)
        rs.allowed[v].update((key, str(net)) for net in f.source_ranges if net.version == v)


def _remove(rs: Ruleset, f: Frontend) -> None:
    v, key = f.vip.version, _key(f)
    chain = rs.dispatch[v].pop(key, None)
    if chain is None:
        return
    rs.dispatched[f.vip] -= 1
    rs.users[chain] -= 1
    rs.users[rs.chains[chain].table] -= 1
    rs.node_ports[v].pop(key, None)
    rs.ranged[v].discard(key)
    rs.allowed[v] -= {(key, str(net)) for net in f.source_ranges}


def _elements_of(rs: Ruleset, frontends: Iterable[Frontend]) -> dict[str, set[str]]:
    """The elements the given frontends hold in the ruleset now, by set or map."""
    out: dict[str, set[str]] = {name: set() for name in _CONTAINERS}
    for f in frontends:
        v, key = f.vip.version, _key(f)
        chain = rs.dispatch[v].get(key)
        if chain is None:
            continue
        k = _frontend(key)
        out[f"dispatch_v{v}"].add(f"{k} : goto {chain}")
        out[f"node_ports_v{v}"].add(f"{k} : {rs.node_ports[v][key]}")
        if key in rs.ranged[v]:
            out[f"ranged_v{v}"].add(k)
            out[f"allowed_v{v}"].update(f"{k} . {net}" for kk, net in rs.allowed[v] if kk == key)
    return out


def _contents(rs: Ruleset) -> dict[str, Iterator[str]]:
    """Every element of every set and map of the table, by set or map (each read once: a whole table's worth)."""
    out: dict[str, Iterator[str]] = {}
    for v in (4, 6):
        out[f"vips_v{v}"] = iter(rs.vips[v])
        out[f"dispatch_v{v}"] = (f"{_frontend(k)} : goto {c}" for k, c in rs.dispatch[v].items())
        out[f"node_ports_v{v}"] = (f"{_frontend(k)} : {p}" for k, p in rs.node_ports[v].items())
        out[f"ranged_v{v}"] = (_frontend(k) for k in rs.ranged[v])
        out[f"allowed_v{v}"] = (f"{_frontend(k)} . {net}" for k, net in rs.allowed[v])
    return out


def _content_sets(rs: Ruleset) -> dict[str, set[str]]:
    """`_contents` as sets, to compare two whole rulesets."""
    return {name: set(elements) for name, elements in _contents(rs).items()}


def update(rs: Ruleset, change: FrontendChange) -> str:
    """Replace the changed services' frontends (`change.previous` by `change.current`) in `rs`, in place, and
    return the nft transaction that does the same in the kernel. Costs what changed, whatever the size of `rs`."""
    old, new = change.old(), change.new()
    before = _elements_of(rs, old)
    tables_before, chains_before = set(rs.tables), set(rs.chains)
    for f in old:
        _remove(rs, f)
    cache = _TableCache()
    for f in new:
        _insert(rs, f, cache)
    after = _elements_of(rs, new)
    dead_chains = sorted(c for c in rs.chains if rs.users[c] <= 0)
    dead_tables = sorted(t for t in rs.tables if rs.users[t] <= 0)
    for name in dead_chains:
        del rs.chains[name], rs.users[name]
    for name in dead_tables:
        del rs.tables[name], rs.users[name]
    return _transaction(rs, set(rs.tables) - tables_before, set(rs.chains) - chains_before, before, after,
                        chains_before.intersection(dead_chains), tables_before.intersection(dead_tables))


def _transaction(rs: Ruleset, tables_added: set[str], chains_added: set[str], before: nftscript.Contents,
                 after: nftscript.Contents, chains_gone: set[str], tables_gone: set[str]) -> str:
    """One nft transaction from the table as it is to `rs`, whichever way the difference was found (a change
    record, or two whole rulesets). Order matters inside it: new lookup tables and chains first, then element
    changes (deletions first), then the chains and tables nothing points at any more."""
    t = rs.table
    head = [f"add {_table_declaration(rs.tables[n]).strip().replace('map ', f'map inet {t} ', 1)}"
            for n in sorted(tables_added)]
    for name in sorted(chains_added):
        head.append(f"add chain inet {t} {name}")
        head += [f"add rule inet {t} {name} {rule}" for rule in _chain_body(rs, name)]
    deletions, additions = nftscript.element_changes(t, before, after, _CONTAINERS)
    tail = [f"delete chain inet {t} {name}" for name in sorted(chains_gone)]
    tail += [f"delete map inet {t} {name}" for name in sorted(tables_gone)]
    return nftscript.script([*head, *deletions, *additions, *tail])


# -- text ---------------------------------------------------------------------------------------------

_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
_L3 = {4: "ip", 6: "ip6"}


def _frontend(key: FrontendKey) -> str:
    return f"{key[0]} . {key[1]} . {key[2]}"


def _chain_body(rs: Ruleset, name: str) -> list[str]:
    table_name, by_client, masquerade = rs.chains[name]
    v = rs.tables[table_name].version
    l3 = _L3[v]
    # One rule, so that the kernel's check of the table (it walks every dispatch element's chain whenever a jump is
    # added) reads as little as possible. `th sport` is TCP's and UDP's source port alike (the same two bytes as
    # `tcp sport`, so the same hash); the l4proto match is what nft asks before a port mapping. Only what lbagent
    # forwards in masquerade mode carries the mark (postrouting masquerades it): marked here, where the flow is
    # dispatched, so that no per-frontend set has to say which frontends masquerade.
    mark = f" meta mark set meta mark | {rs.mark:#010x}" if masquerade else ""
    hashed = f"{l3} saddr" if by_client else f"{l3} saddr . th sport"
    return [f"meta l4proto {{ tcp, udp }}{mark} dnat {l3} to jhash {hashed} mod {rs.size} seed {HASH_SEED:#x}"
            f" map @{table_name} : {l3} daddr . meta l4proto . th dport map @node_ports_v{v}"]


def _declarations(rs: Ruleset) -> list[str]:
    """Sets and maps, each on one line: `nft -f` reads a whole table definition in one transaction."""
    out = []
    c = _contents(rs)
    for v in (4, 6):
        a = _ADDR[v]
        out += [
            f"\tset vips_v{v} {{ type {a};{nftscript.elements(c[f'vips_v{v}'])} }}",
            f"\tmap dispatch_v{v} {{ type {a} . inet_proto . inet_service : verdict;"
            + nftscript.elements(c[f"dispatch_v{v}"]) + " }",
            f"\tmap node_ports_v{v} {{ type {a} . inet_proto . inet_service : inet_service;"
            + nftscript.elements(c[f"node_ports_v{v}"]) + " }",
            f"\tset ranged_v{v} {{ type {a} . inet_proto . inet_service;"
            + nftscript.elements(c[f"ranged_v{v}"]) + " }",
            f"\tset allowed_v{v} {{ type {a} . inet_proto . inet_service . {a}; flags interval;"
            + nftscript.elements(c[f"allowed_v{v}"]) + " }",
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
    dispatch = [f"\t\t{frontend[v]} vmap @dispatch_v{v}" for v in (4, 6)]
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
        # A VIP belongs to the services behind it, not to the LB host: nothing else here answers on it. A packet
        # conntrack calls INVALID was not NATed (it belongs to a flow conntrack cannot place): dropped, never
        # answered with a reset that would end a client's connection a node still serves.
        # A node's reset of a flow lbagent forwarded to it (a refusal: nothing listens on the nodePort any more), seen
        # as it passes back: logged for the agent (lbagent.l4.refusals), which probes that node at once.
        "\tchain refused {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        *(f"\t\tct direction reply ct original {_L3[v]} daddr @vips_v{v} tcp flags & rst == rst"
          f" limit rate 200/second log group {nftscript.REFUSED_LOG_GROUP}" for v in (4, 6)),
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        "\t\tip daddr @vips_v4 ct state invalid drop",
        "\t\tip6 daddr @vips_v6 ct state invalid drop",
        "\t\tip daddr @vips_v4 meta l4proto tcp reject with tcp reset",
        "\t\tip daddr @vips_v4 meta l4proto != icmp reject with icmp port-unreachable",
        "\t\tip6 daddr @vips_v6 meta l4proto tcp reject with tcp reset",
        "\t\tip6 daddr @vips_v6 meta l4proto != ipv6-icmp reject with icmpv6 port-unreachable",
        "\t}",
    ]


def render_full(rs: Ruleset) -> str:
    """Declare, delete and redefine the table: the kernel swaps old for new in one transaction."""
    lines = nftscript.replace_table(rs.table)
    lines += _declarations(rs)
    lines += _fixed_chains(rs)
    for name in sorted(rs.chains):
        lines += [f"\tchain {name} {{", *(f"\t\t{r}" for r in _chain_body(rs, name)), "\t}"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(frontends: Iterable[Frontend], vips: Iterable[model.IPAddress], dataplane: model.Dataplane) -> str:
    return render_full(build(frontends, vips, dataplane))


def render_delta(old: Ruleset, new: Ruleset) -> str | None:
    """Only what changed between two whole rulesets (a new model: no change record says what moved), as one nft
    transaction, or None when the fixed part changed (render_full then)."""
    if (old.table, old.mark, old.size) != (new.table, new.mark, new.size):
        return None
    return _transaction(new, new.tables.keys() - old.tables.keys(), new.chains.keys() - old.chains.keys(),
                        _content_sets(old), _content_sets(new), old.chains.keys() - new.chains.keys(),
                        old.tables.keys() - new.tables.keys())


def render_delete(dataplane: model.Dataplane) -> str:
    """Remove lbagent's table and with it everything lbagent programmed (`lbagent cleanup`)."""
    return nftscript.delete_table(dataplane.table)


def predict(frontend: Frontend, source: model.IPAddress, source_port: int, size: int) -> Backend | None:
    """The backend nftables sends a new flow to: the same jhash over the same fields, the same Maglev table."""
    if not frontend.active:
        return None
    table = lookup_table(frontend, size)
    port = None if frontend.affinity_timeout is not None else source_port
    slot = nft_jhash(flow_fields(source, port), size, HASH_SEED)
    address = table.slots[slot]
    return next(b for b in frontend.active if str(b.address) == address)
