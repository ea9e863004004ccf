"""Render the L4 data plane for nftables: lbagent's own table, whole or as a delta, always one transaction.

The per-service state lives in map and set elements, not in rules: a frontend (VIP . protocol . port) is one
element of a verdict map that jumps to the chain of a Maglev lookup table, one element giving its nodePort,
and optional elements restricting its sources. Maglev tables are shared by every frontend with the same nodes
and weights, their chains (which also mark masquerade flows) by every frontend with the same table, affinity and
mode. So a change of one service's endpoints is a handful of element changes whatever the number of services,
and a resync can still replace the whole table atomically.

Beyond `SHARD_FRONTENDS` frontends, the dispatch is spread over more nft tables (shards: `<table>_shard1`,
`<table>_shard2`, ...; shard 0 is the table itself), each with its own dispatch and nodePort maps, the lookup tables
and chains its frontends use, and two NAT base chains. A service's frontends are all in one shard. Every transaction
that adds a jump makes the kernel check the whole table it touches, element by element of its dispatch maps: with
shards, the kernel checks one shard's, whatever the total. The price: a lookup table used in several shards is in
each of them, and a connection's first packet looks up one dispatch map per shard until one takes it. The VIPs, the
source ranges and the chains that are not per frontend stay in the table itself.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
# Frontends per shard, and the most shards (beyond MAX_SHARDS x SHARD_FRONTENDS frontends the shards grow instead).
# A shard bounds the kernel's check of a change (about 0.1 ms per 1,000 frontends): 2,048, the size of one table at
# 1,000 services x 2 ports. A health change's elements go over netlink (lbagent.l4.nftables.netlink), so more tables
# cost a change nothing; they cost a full sync their copies of the lookup tables (docs/benchmarks.md).
SHARD_FRONTENDS = 2048
MAX_SHARDS = 64


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
    shards: int = 1
    vips: dict[int, set[str]] = field(default_factory=lambda: {4: set(), 6: set()})
    dispatch: dict[int, dict[FrontendKey, str]] = field(default_factory=lambda: {4: {}, 6: {}})
    node_ports: dict[int, dict[FrontendKey, int]] = field(default_factory=lambda: {4: {}, 6: {}})
    ranged: dict[int, set[FrontendKey]] = field(default_factory=lambda: {4: set(), 6: set()})
    allowed: dict[int, set[tuple[FrontendKey, str]]] = field(default_factory=lambda: {4: set(), 6: set()})
    tables: dict[str, LookupTable] = field(default_factory=dict)  # by name, while a shard uses them
    chains: dict[str, Chain] = field(default_factory=dict)  # by name, while a shard uses them
    # dispatch entries per (shard, chain) and per (shard, lookup table): what each shard's table holds
    chain_users: Counter[tuple[int, str]] = field(default_factory=Counter)
    table_users: Counter[tuple[int, str]] = field(default_factory=Counter)
    shard_of: dict[FrontendKey, int] = field(default_factory=dict)  # dispatched frontends not in shard 0
    dispatched: Counter[str] = field(default_factory=Counter)  # dispatch entries per VIP (as nft writes it)
    live: set[model.IPAddress] = field(default_factory=set)  # the VIPs with an entry in `dispatched`

    def programmed(self) -> set[model.IPAddress]:
        """The VIPs with at least one frontend dispatched (what the kernel forwards): kept as the dispatch changes,
        so asking after every change costs a copy of a set, not a pass over the VIPs."""
        return set(self.live)

    def shard_table(self, shard: int) -> str:
        return shard_table(self.table, shard)

    def present(self) -> tuple[set[tuple[int, str]], set[tuple[int, str]]]:
        """The (shard, name) of every lookup table and of every chain in the kernel's tables."""
        return ({k for k, n in self.table_users.items() if n > 0}, {k for k, n in self.chain_users.items() if n > 0})


def shard_table(table: str, shard: int) -> str:
    """The nft table of a shard: the table itself for shard 0."""
    return table if shard == 0 else f"{table}_shard{shard}"


def shard_tables(table: str) -> list[str]:
    """Every nft table the dispatch may be spread over (what `lbagent cleanup` removes and drift watches)."""
    return [shard_table(table, s) for s in range(MAX_SHARDS)]


def shard_count(frontends: int, previous: int | None = None) -> int:
    """How many shards for this many frontends: at most SHARD_FRONTENDS each. The previous count is kept while
    it gives shards of half that size or more, so that a count near a boundary does not reshard on every resync
    (resharding replaces every table)."""
    wanted = max(1, min(MAX_SHARDS, -(-frontends // SHARD_FRONTENDS)))
    if previous is not None and wanted <= previous <= max(1, min(MAX_SHARDS, -(-2 * frontends // SHARD_FRONTENDS))):
        return previous
    return wanted


def shard_of_service(service: str, shards: int) -> int:
    """The shard of every frontend of a service (its key): stable across runs and processes."""
    return _service_hash(service) % shards if shards > 1 else 0


@functools.lru_cache(maxsize=1 << 16)
def _service_hash(service: str) -> int:
    return zlib.crc32(service.encode())


def _key(f: Frontend) -> FrontendKey:
    return (_text(f.vip), f.protocol.lower(), f.port)


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
    addresses = [str(b.address) for b in active]  # once per backend, not once per slot (ipaddress's str is slow)
    return LookupTable(name, version, tuple(map(addresses.__getitem__, order)))


def table_name(active: tuple[Backend, ...], version: int, size: int) -> str:
    digest = hashlib.blake2b(repr((size, [(b.node, str(b.address), b.weight) for b in active])).encode(),
                             digest_size=6).hexdigest()
    return f"mg{version}_{digest}"


def build(frontends: Iterable[Frontend], vips: Iterable[model.IPAddress], dataplane: model.Dataplane,
          shards: int | None = None) -> Ruleset:
    """Decide the content of the table (pure). A frontend with no active backend is left out of dispatch: its
    packets reach the `input` chain as local traffic to a VIP and are refused there (TCP reset, ICMP port
    unreachable), which is what a client of a service without endpoints should see, not a black hole.
    `shards`: how many (shard_count's when None)."""
    if shards is None:
        frontends = frontends if isinstance(frontends, Sequence) else tuple(frontends)
        shards = shard_count(len(frontends))
    rs = Ruleset(dataplane.table, dataplane.masquerade_mark, dataplane.maglev_table_size, shards)
    for vip in vips:
        rs.vips[vip.version].add(str(vip))
    tables = _TableCache()
    where, last = _NOWHERE, None
    for f in frontends:
        # A service's frontends come one after another, most on one VIP and backends: where one goes is worked out
        # once for them (a full build at 10,000 services: 0.08 to 0.05 s).
        if (last is None or f.service is not last.service or f.vip is not last.vip or f.backends is not last.backends
                or f.mode is not last.mode or f.affinity_timeout != last.affinity_timeout):
            where = _where(rs, f, tables)
        _place(rs, f, where)
        last = f
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


class _Where(NamedTuple):
    """Where a frontend's elements go, the same for each frontend of a service on one VIP: its family, the VIP as nft
    writes it, its shard and the chain it jumps to (None: no active backend, not dispatched), with the keys of the
    shard's chain and lookup-table counts."""

    version: int
    vip: str
    shard: int
    chain: str | None
    chain_user: tuple[int, str]
    table_user: tuple[int, str]


_NOWHERE = _Where(4, "", 0, None, (0, ""), (0, ""))


def _where(rs: Ruleset, f: Frontend, tables: _TableCache) -> _Where:
    """Where `f` goes, with its lookup table and chain made part of `rs`."""
    table = tables.get(f, rs.size, rs.tables)
    if table is None:
        return _NOWHERE
    rs.tables.setdefault(table.name, table)
    by_client = f.affinity_timeout is not None
    masquerade = f.mode is model.ForwardingMode.MASQUERADE
    chain = table.name + ("_c" if by_client else "") + ("_m" if masquerade else "")
    if chain not in rs.chains:
        rs.chains[chain] = Chain(table.name, by_client, masquerade)
    shard = shard_of_service(f.service, rs.shards)
    return _Where(table.version, _text(f.vip), shard, chain, (shard, chain), (shard, table.name))


def _insert(rs: Ruleset, f: Frontend, tables: _TableCache) -> None:
    _place(rs, f, _where(rs, f, tables))


def _place(rs: Ruleset, f: Frontend, where: _Where) -> None:
    """Put the frontend in `rs` where `_where` says."""
    chain = where.chain
    if chain is None:
        return
    v, key = where.version, (where.vip, f.protocol.lower(), f.port)
    rs.chain_users[where.chain_user] += 1
    rs.table_users[where.table_user] += 1
    if where.shard:
        rs.shard_of[key] = where.shard
    dispatch = rs.dispatch[v]
    if key not in dispatch:
        if not rs.dispatched[where.vip]:  # (by its text: hashing an address object is slow Python)
            rs.live.add(f.vip)
        rs.dispatched[where.vip] += 1
    dispatch[key] = chain
    rs.node_ports[v][key] = f.node_port
    if f.source_ranges:
        rs.ranged[v].add(key)
        rs.allowed[v].update((key, str(net)) for net in f.source_ranges if net.version == v)


def _remove(rs: Ruleset, f: Frontend) -> None:
    v, key = f.vip.version, _key(f)
    chain = rs.dispatch[v].pop(key, None)
    if chain is None:
        return
    rs.dispatched[key[0]] -= 1
    if rs.dispatched[key[0]] <= 0:
        del rs.dispatched[key[0]]
        rs.live.discard(f.vip)
    shard = rs.shard_of.pop(key, 0)
    rs.chain_users[(shard, chain)] -= 1
    rs.table_users[(shard, rs.chains[chain].table)] -= 1
    rs.node_ports[v].pop(key, None)
    rs.ranged[v].discard(key)
    rs.allowed[v] -= {(key, str(net)) for net in f.source_ranges}


# Shard -> set or map name -> its elements.
ShardContents = dict[int, dict[str, set[str]]]


def _elements_of(rs: Ruleset, frontends: Iterable[Frontend]) -> ShardContents:
    """The elements the given frontends hold in the ruleset now, by shard and by set or map."""
    out: ShardContents = {}
    for f in frontends:
        v, key = f.vip.version, _key(f)
        chain = rs.dispatch[v].get(key)
        if chain is None:
            continue
        k = _frontend(key)
        shard = out.setdefault(rs.shard_of.get(key, 0), {})
        shard.setdefault(f"dispatch_v{v}", set()).add(f"{k} : goto {chain}")
        shard.setdefault(f"node_ports_v{v}", set()).add(f"{k} : {rs.node_ports[v][key]}")
        if key in rs.ranged[v]:
            main = out.setdefault(0, {})
            main.setdefault(f"ranged_v{v}", set()).add(k)
            main.setdefault(f"allowed_v{v}", set()).update(f"{k} . {net}" for kk, net in rs.allowed[v] if kk == key)
    return out


def _contents(rs: Ruleset) -> dict[int, dict[str, Iterator[str]]]:
    """Every element of every set and map of every shard's table, by shard and by set or map (each read once: a
    whole table's worth)."""
    out: dict[int, dict[str, Iterator[str]]] = {s: {} for s in range(rs.shards)}
    main = out[0]
    for v in (4, 6):
        main[f"vips_v{v}"] = iter(rs.vips[v])
        if rs.shards == 1:
            main[f"dispatch_v{v}"] = (f"{_frontend(k)} : goto {c}" for k, c in rs.dispatch[v].items())
            main[f"node_ports_v{v}"] = (f"{_frontend(k)} : {p}" for k, p in rs.node_ports[v].items())
        else:  # the keys by shard, their text made as each map is written (as with one table)
            keys: dict[int, list[FrontendKey]] = {s: [] for s in range(rs.shards)}
            for k in rs.dispatch[v]:
                keys[rs.shard_of.get(k, 0)].append(k)
            for s in range(rs.shards):
                out[s][f"dispatch_v{v}"] = _written(keys[s], rs.dispatch[v], "goto ")
                out[s][f"node_ports_v{v}"] = _written(keys[s], rs.node_ports[v], "")
        main[f"ranged_v{v}"] = (_frontend(k) for k in rs.ranged[v])
        main[f"allowed_v{v}"] = (f"{_frontend(k)} . {net}" for k, net in rs.allowed[v])
    return out


def _written(keys: list[FrontendKey], values: Mapping[FrontendKey, object], verb: str) -> Iterator[str]:
    return (f"{_frontend(k)} : {verb}{values[k]}" for k in keys)


def _content_sets(rs: Ruleset) -> ShardContents:
    """`_contents` as sets, to compare two whole rulesets."""
    return {s: {name: set(elements) for name, elements in c.items()} for s, c in _contents(rs).items()}


def update(rs: Ruleset, change: FrontendChange) -> Transaction:
    """Replace the changed services' frontends (`change.previous` by `change.current`) in `rs`, in place, and
    return the nft transaction that does the same in the kernel. Costs what changed, whatever the size of `rs`."""
    old, new = change.old(), change.new()
    before = _elements_of(rs, old)
    tables_before, chains_before = rs.present()
    for f in old:
        _remove(rs, f)
    cache = _TableCache()
    for f in new:
        _insert(rs, f, cache)
    after = _elements_of(rs, new)
    tables_after, chains_after = rs.present()
    for users in (rs.chain_users, rs.table_users):
        for k in [k for k, n in users.items() if n <= 0]:
            del users[k]
    for name in {c for _, c in chains_before - chains_after} - {c for _, c in rs.chain_users}:
        del rs.chains[name]
    for name in {t for _, t in tables_before - tables_after} - {t for _, t in rs.table_users}:
        del rs.tables[name]
    return _transaction(rs, tables_after - tables_before, chains_after - chains_before, before, after,
                        chains_before - chains_after, tables_before - tables_after)


@dataclass(frozen=True)
class Transaction:
    """What one change does to the kernel's tables, in the order it must happen: new lookup tables (nft table,
    lookup table) and chains (nft table, chain, its rule) first, then element changes (deletions first), then the
    chains and lookup tables nothing points at any more. `script()` is all of it as one nft transaction; the
    forwarder sends the same over netlink when it can (lbagent.l4.nftables.netlink)."""

    tables: tuple[tuple[str, LookupTable], ...] = ()
    chains: tuple[tuple[str, str, LookupRule], ...] = ()
    elements: tuple[str, ...] = ()
    chains_gone: tuple[tuple[str, str], ...] = ()
    tables_gone: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.tables or self.chains or self.elements or self.chains_gone or self.tables_gone)

    def script(self) -> str:
        head = [f"add {_table_declaration(table).strip().replace('map ', f'map inet {t} ', 1)}"
                for t, table in self.tables]
        for t, name, rule in self.chains:
            head += [f"add chain inet {t} {name}", f"add rule inet {t} {name} {rule.text()}"]
        tail = ([f"delete chain inet {t} {name}" for t, name in self.chains_gone]
                + [f"delete map inet {t} {name}" for t, name in self.tables_gone])
        return nftscript.script([*head, *self.elements, *tail])


def _transaction(rs: Ruleset, tables_added: set[tuple[int, str]], chains_added: set[tuple[int, str]],
                 before: ShardContents, after: ShardContents, chains_gone: set[tuple[int, str]],
                 tables_gone: set[tuple[int, str]]) -> Transaction:
    """One transaction from the tables as they are to `rs`, whichever way the difference was found (a change
    record, or two whole rulesets)."""
    elements: list[str] = []
    additions: list[str] = []
    for s in sorted(before.keys() | after.keys()):
        d, a = nftscript.element_changes(rs.shard_table(s), before.get(s, {}), after.get(s, {}), _CONTAINERS)
        elements += d
        additions += a
    return Transaction(
        tables=tuple((rs.shard_table(s), rs.tables[n]) for s, n in sorted(tables_added)),
        chains=tuple((rs.shard_table(s), n, _rule(rs, n)) for s, n in sorted(chains_added)),
        elements=(*elements, *additions),
        chains_gone=tuple((rs.shard_table(s), n) for s, n in sorted(chains_gone)),
        tables_gone=tuple((rs.shard_table(s), n) for s, n in sorted(tables_gone)),
    )


# -- text ---------------------------------------------------------------------------------------------

_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
_L3 = {4: "ip", 6: "ip6"}


def _frontend(key: FrontendKey) -> str:
    return f"{key[0]} . {key[1]} . {key[2]}"


@dataclass(frozen=True)
class LookupRule:
    """The one rule of a lookup table's chain: hash the flow to a slot of the lookup table (`lookup`), DNAT to that
    slot's node, on the frontend's nodePort; `mark`: the masquerade mark it sets first (None: not masqueraded).
    `text()` is the rule as nft takes it; lbagent.l4.nftables.netlink packs the same rule for the kernel."""

    lookup: str
    version: int
    by_client: bool  # the client's address only (sessionAffinity: ClientIP), not its port too
    mark: int | None
    size: int

    def text(self) -> str:
        # One rule, so that the kernel's check of the table (it walks every dispatch element's chain whenever a jump
        # is added) reads as little as possible. `th sport` is TCP's and UDP's source port alike (the same two bytes
        # as `tcp sport`, so the same hash); the l4proto match is what nft asks before a port mapping. Only what
        # lbagent forwards in masquerade mode carries the mark (postrouting masquerades it): marked here, where the
        # flow is dispatched, so that no per-frontend set has to say which frontends masquerade.
        l3 = _L3[self.version]
        mark = "" if self.mark is None else f" meta mark set meta mark | {self.mark:#010x}"
        hashed = f"{l3} saddr" if self.by_client else f"{l3} saddr . th sport"
        return (f"meta l4proto {{ tcp, udp }}{mark} dnat {l3} to jhash {hashed} mod {self.size} seed {HASH_SEED:#x}"
                f" map @{self.lookup} : {l3} daddr . meta l4proto . th dport map @node_ports_v{self.version}")


def _rule(rs: Ruleset, name: str) -> LookupRule:
    table_name, by_client, masquerade = rs.chains[name]
    return LookupRule(table_name, rs.tables[table_name].version, by_client, rs.mark if masquerade else None, rs.size)


def _declarations(rs: Ruleset, shard: int, c: dict[str, Iterator[str]]) -> list[str]:
    """A shard's sets and maps (`c`: their elements), each on one line: `nft -f` reads a whole table definition in
    one transaction. Only shard 0 holds the VIPs and the source ranges."""
    out = []
    for v in (4, 6):
        a = _ADDR[v]
        if shard == 0:
            out.append(f"\tset vips_v{v} {{ type {a};{nftscript.elements(c[f'vips_v{v}'])} }}")
        out += [
            f"\tmap dispatch_v{v} {{ type {a} . inet_proto . inet_service : verdict;"
            + nftscript.elements(c[f"dispatch_v{v}"]) + " }",
            f"\tmap node_ports_v{v} {{ type {a} . inet_proto . inet_service : inet_service;"
            + nftscript.elements(c[f"node_ports_v{v}"]) + " }",
        ]
        if shard == 0:
            out += [
                f"\tset ranged_v{v} {{ type {a} . inet_proto . inet_service;"
                + nftscript.elements(c[f"ranged_v{v}"]) + " }",
                f"\tset allowed_v{v} {{ type {a} . inet_proto . inet_service . {a}; flags interval;"
                + nftscript.elements(c[f"allowed_v{v}"]) + " }",
            ]
    for name in sorted(n for (s, n), users in rs.table_users.items() if s == shard and users > 0):
        out.append(_table_declaration(rs.tables[name]))
    return out


def _table_declaration(table: LookupTable) -> str:
    return (f"\tmap {table.name} {{ typeof numgen inc mod 2 : {_L3[table.version]} daddr;"
            f" elements = {{ {_slots(table)} }} }}")


def _slots(table: LookupTable) -> str:
    return ", ".join(f"{i} : {a}" for i, a in enumerate(table.slots))


_FRONTEND = {v: f"{_L3[v]} daddr . meta l4proto . th dport" for v in (4, 6)}


def _dispatch_chains() -> list[str]:
    """The NAT base chains every shard has: its dispatch map, for clients and for the LB node's own processes."""
    dispatch = [f"\t\t{_FRONTEND[v]} vmap @dispatch_v{v}" for v in (4, 6)]
    return [
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        *dispatch,
        "\t}",
        # Connections a process on the LB node itself opens to a VIP take the same path as the clients'.
        "\tchain output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        *dispatch,
        "\t}",
    ]


def _fixed_chains(rs: Ruleset) -> list[str]:
    mark, keep = f"{rs.mark:#010x}", f"{~rs.mark & 0xFFFFFFFF:#010x}"
    frontend = _FRONTEND
    return [
        # loadBalancerSourceRanges: before NAT, so a refused client never gets a conntrack NAT binding.
        "\tchain sources {",
        "\t\ttype filter hook prerouting priority -110; policy accept;",
        *(f"\t\t{frontend[v]} @ranged_v{v} {frontend[v]} . {_L3[v]} saddr != @allowed_v{v} drop" for v in (4, 6)),
        "\t}",
        *_dispatch_chains(),
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


def render_full(rs: Ruleset, stale: Iterable[int] = ()) -> str:
    """Declare, delete and redefine the table and every other shard's: the kernel swaps old for new in one
    transaction. `stale`: shards the kernel may hold that `rs` has not (declared and deleted)."""
    return "".join(render_tables(rs, stale))


def render_tables(rs: Ruleset, stale: Iterable[int] = ()) -> list[str]:
    """`render_full` table by table: shard 0's (with the deletion of the `stale` shards' tables), then each other
    shard's. Each is a whole transaction of its own, and any of them joined are one too."""
    contents = _contents(rs)
    out = []
    for shard in range(rs.shards):
        lines = nftscript.replace_table(rs.shard_table(shard))
        lines += _declarations(rs, shard, contents[shard])
        lines += _fixed_chains(rs) if shard == 0 else _dispatch_chains()
        for name in sorted(n for (s, n), users in rs.chain_users.items() if s == shard and users > 0):
            lines += [f"\tchain {name} {{", f"\t\t{_rule(rs, name).text()}", "\t}"]
        lines.append("}")
        out.append("\n".join(lines) + "\n")
    out[0] += "".join(nftscript.delete_table(rs.shard_table(shard)) for shard in stale if shard >= rs.shards)
    return out


def render(frontends: Iterable[Frontend], vips: Iterable[model.IPAddress], dataplane: model.Dataplane) -> str:
    return render_full(build(frontends, vips, dataplane))


def render_delta(old: Ruleset, new: Ruleset) -> Transaction | None:
    """Only what changed between two whole rulesets (a new model: no change record says what moved), as one
    transaction, or None when the fixed part changed (render_full then)."""
    if (old.table, old.mark, old.size, old.shards) != (new.table, new.mark, new.size, new.shards):
        return None
    (old_tables, old_chains), (new_tables, new_chains) = old.present(), new.present()
    return _transaction(new, new_tables - old_tables, new_chains - old_chains, _content_sets(old),
                        _content_sets(new), old_chains - new_chains, old_tables - new_tables)


def render_delete(dataplane: model.Dataplane) -> str:
    """Remove lbagent's table and every shard's, and with them everything lbagent programmed (`lbagent cleanup`)."""
    return "".join(nftscript.delete_table(t) for t in shard_tables(dataplane.table))


def predict(frontend: Frontend, source: model.IPAddress, source_port: int, size: int) -> Backend | None:
    """The backend nftables sends a new flow to: the same jhash over the same fields, the same Maglev table."""
    if not frontend.active:
        return None
    table = lookup_table(frontend, size)
    port = None if frontend.affinity_timeout is not None else source_port
    slot = nft_jhash(flow_fields(source, port), size, HASH_SEED)
    address = table.slots[slot]
    return next(b for b in frontend.active if str(b.address) == address)
