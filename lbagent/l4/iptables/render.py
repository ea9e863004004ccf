"""Render the L4 data plane for iptables: lbagent's own LBAGENT-* chains as iptables-restore --noflush input."""

# How a new connection to a frontend (VIP:port/protocol) is forwarded, in the nat table:
#
#   PREROUTING, OUTPUT -> LBAGENT-DISPATCH: a trie over the VIPs' addresses (LBAGENT-D<id> chains testing
#                                  `-d prefix/len`) down to leaves of a few VIPs, one rule per frontend there
#                                  (`-d VIP -p tcp -m tcp --dport 80 -j LBAGENT-F<id>`)
#   LBAGENT-F<id> (one backend):   set or clear the masquerade bit, DNAT
#   LBAGENT-F<id> (more):          stash the packet mark in the conntrack mark, HMARK (the Maglev slot into the
#                                  packet mark), jump into the lookup table's trie (it writes the node's index
#                                  into the conntrack mark), put the packet mark back, set or clear the
#                                  masquerade bit, then one DNAT rule per node matching its index
#   LBAGENT-F<id> (none active):   empty: the packet goes on to INPUT, where LBAGENT-INPUT refuses it
#   POSTROUTING -> LBAGENT-POSTROUTING: masquerade what carries the masquerade bit
# and mangle PREROUTING -> LBAGENT-SOURCES -> LBAGENT-S<id> drops clients outside a frontend's source ranges
# before NAT sees them. Chains are per frontend, so a health change refills a frontend's chain in place and
# leaves LBAGENT-DISPATCH alone.
#
# Mark layout. HMARK writes the whole packet mark (skb->mark = slot + offset), so lbagent owns two parts:
#   F = bits 0 .. w-1, w = bit length of (maglevTableSize - 1) (0x3ff for 1021 slots): in the packet mark the
#       slot during the trie walk, cleared afterwards; in the conntrack mark the index of the chosen node in
#       the frontend's active backends, for the life of the connection (`conntrack -L` shows it);
#   Q = dataplane.masquerade_mark (one bit above F): set on the first packet iff the frontend masquerades.
# Every other bit of the packet mark leaves lbagent's chains as it came in (a mangle rule's routing mark
# survives): it is stashed in the conntrack mark before HMARK and restored from there, which also leaves
# the conntrack mark's bits outside F equal to the packet mark's (a no-op when nobody marks connections,
# or when marks are kept in step with CONNMARK --save-mark/--restore-mark, the usual pattern).
#
# The Maglev table (slot -> node) is a trie of chains over the slot bits, most significant first: each chain
# tests the next two bits (`-m mark --mark V/M`, up to four rules) and goes (-g) to the chain of that part,
# or, when every slot of the part maps to one node, writes that node's index (a leaf, inlined as a CONNMARK
# rule: it does not change the packet mark, so the next rule's test still sees the slot). The bottom chains
# cover 8 slots each, as up to 8 leaf rules. For 1021 slots that is at most 22 rules and 5 chains deep per
# new connection instead of a scan of up to 1021 rules, in about 170 chains. Tries are named by the node
# names and weights only (the index mapping does not depend on addresses), so every frontend with the same
# active nodes shares one, in each family. nf_tables refuses chains nested deeper than 15 (iptables-nft runs
# on it), which is why the tries are shallow and the dispatch trie gets only the depth left.
#
# Session affinity (ClientIP): HMARK hashes the client address only (`--hmark-tuple src`), the same on every
# LB node and without expiry, as the nftables data plane does; the timeout is not used. `-m recent` could
# expire it but keeps per-LB state (LBs would disagree after an ECMP change), and xt_recent keeps at most
# ip_list_tot (100 by default, fixed at module load) addresses per list, so most clients would silently fall
# back to the hash anyway.
#
# The jumps from built-in chains are inserted first (`-I PREROUTING 1 -j LBAGENT-DISPATCH`) only when the
# applier's `iptables-save` of a full apply shows them missing, and duplicates are deleted:
# iptables-restore has no "add if missing", and one listing per family is cheaper than an `iptables -C`
# process per jump.

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address

from lbagent import model
from lbagent.l4 import maglev
from lbagent.l4.jhash import HASH_SEED, jhash
from lbagent.plan.services import Backend, Frontend

PREFIX = "LBAGENT-"
TABLES = ("mangle", "nat", "filter")  # restored in this order: source filtering before dispatch
SOURCES, DISPATCH, POSTROUTING, INPUT = "LBAGENT-SOURCES", "LBAGENT-DISPATCH", "LBAGENT-POSTROUTING", "LBAGENT-INPUT"
FIXED_CHAINS = {"mangle": (SOURCES,), "nat": (DISPATCH, POSTROUTING), "filter": (INPUT,)}
# The only rules lbagent puts in built-in chains: (table, built-in chain, lbagent chain), each inserted first.
JUMPS = (
    ("mangle", "PREROUTING", SOURCES),  # loadBalancerSourceRanges: dropped before NAT
    ("nat", "PREROUTING", DISPATCH),
    ("nat", "OUTPUT", DISPATCH),  # connections a process on the LB itself opens to a VIP
    ("nat", "POSTROUTING", POSTROUTING),
    ("filter", "INPUT", INPUT),
)
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
FULL_MASK = 0xFFFFFFFF
MAX_CHAIN_NAME = 28  # iptables' limit (XT_EXTENSION_MAXNAMELEN - 1)

FrontendKey = tuple[str, str, int]  # (vip, "tcp"/"udp", port)
Rules = tuple[str, ...]  # a chain's rules, each the text after "-A <chain> "
ChainChanges = dict[int, dict[str, dict[str, Rules | None]]]  # family -> table -> chain -> rules (None: delete)


class RenderError(ValueError):
    """The configuration cannot be expressed in iptables (for example a mark layout that overlaps)."""


@dataclass(frozen=True)
class Layout:
    """The mark bits lbagent owns: the slot/index field (bits 0 .. width-1) and the masquerade bit."""

    size: int
    masquerade: int

    @property
    def width(self) -> int:
        return (self.size - 1).bit_length()

    @property
    def field(self) -> int:
        return (1 << self.width) - 1

    @property
    def keep(self) -> int:
        """The packet mark bits that leave lbagent's chains as they came in."""
        return FULL_MASK & ~(self.field | self.masquerade)


def layout(dataplane: model.Dataplane) -> Layout:
    lay = Layout(dataplane.maglev_table_size, dataplane.masquerade_mark)
    if lay.masquerade & lay.field:
        raise RenderError(
            f"masqueradeMark {lay.masquerade:#x} overlaps the Maglev slot field {lay.field:#x} that iptables' HMARK "
            f"writes (maglevTableSize {lay.size}): pick a bit above it"
        )
    return lay


# -- Maglev tries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trie:
    """A lookup table as chains: jump to `root`; it leaves the node's index in the conntrack mark's field."""

    root: str
    chains: tuple[tuple[str, Rules], ...]


def _nodes(active: Sequence[Backend]) -> tuple[tuple[str, int], ...]:
    return tuple((b.node, b.weight) for b in active)


def _digest(text: str, size: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


Block = tuple[int, int, int]  # (prefix, free bits, node index): slots prefix << bits .. all map to the node
FLAT = 8  # a subtree covered by at most this many uniform blocks is one chain of leaf rules, not more levels
FLAT_BITS = 3  # FLAT slots
STRIDE = 2  # slot bits tested per trie chain: up to 4 rules, as many per bit as a binary trie, half as deep
# nf_tables refuses a ruleset whose chains jump (or go) deeper than 15 below a built-in chain (the kernel's
# NFT_JUMP_STACK_SIZE is 16); legacy iptables has no such limit, but both variants get the same rules.
MAX_DEPTH = 15


def trie_depth_bound(size: int) -> int:
    """The most chains a packet goes through in a Maglev trie of `size` slots: one per STRIDE bits until at
    most FLAT slots are left (they always fit one chain of leaf rules)."""
    bits, depth = (size - 1).bit_length(), 1
    while bits > FLAT_BITS:
        bits -= _step(bits)
        depth += 1
    return depth


def _step(bits: int) -> int:
    """The slot bits a trie chain over `bits` free bits tests: STRIDE, or fewer at the top, so that the chains
    at the bottom cover exactly FLAT slots."""
    return (bits - FLAT_BITS) % STRIDE or STRIDE


@functools.lru_cache(maxsize=64)  # a miss costs a few ms; a trie of 1021 slots holds about 1000 rules
def trie(nodes: tuple[tuple[str, int], ...], size: int) -> Trie:
    """The chains of the Maglev table of these (node, weight) pairs (cached: frontends share them).

    Each chain covers the slots with one prefix. It tests the next STRIDE bits and goes to the chain of each
    part, or writes the index right away where a part maps to one node; a subtree that falls into at most
    FLAT uniform aligned blocks is one chain with a rule per block instead (at most FLAT rules tried, about
    as many as the levels it replaces, in far fewer chains).
    """
    slots = maglev.table(list(nodes), size)
    lay = Layout(size, 0)
    name = f"{PREFIX}M{_digest(repr((size, nodes)), 5)}"
    covers: dict[tuple[int, int], list[Block] | None] = {}

    def cover(prefix: int, bits: int) -> list[Block] | None:
        """The uniform blocks tiling the existing slots of a subtree (one when it all maps to one node, none
        above the last slot), or None when there are more than FLAT."""
        low = prefix << bits
        if low >= size:
            found: list[Block] | None = []
        elif bits == 0:
            found = [(prefix, 0, slots[prefix])]
        else:
            one, zero = cover(prefix * 2 + 1, bits - 1), cover(prefix * 2, bits - 1)
            both = None if one is None or zero is None else one + zero
            if both is not None and len({index for _, _, index in both}) == 1:
                found = [(prefix, bits, both[0][2])]
            else:
                found = both if both is not None and len(both) <= FLAT else None
        covers[(prefix, bits)] = found
        return found

    chains: list[tuple[str, Rules]] = []

    def set_index(test: str, index: int) -> str:
        return f"{test}-j CONNMARK --set-xmark {index:#x}/{lay.field:#x}"

    def emit(prefix: int, bits: int) -> int | str | None:
        """A node index (the subtree maps to one node), the chain of the subtree, or None (no slot there)."""
        blocks = covers[(prefix, bits)]
        if blocks == []:
            return None
        if blocks is not None and len(blocks) == 1:
            return blocks[0][2]
        chain = f"{name}-{(1 << (lay.width - bits)) | prefix:x}"
        if blocks is not None:
            rules = []
            for p, b, index in sorted(blocks, key=lambda blk: blk[0] << blk[1]):
                mask = ((1 << bits) - 1) & ~((1 << b) - 1)
                rules.append(set_index(f"-m mark --mark {(p << b) & mask:#x}/{mask:#x} ", index))
            chains.append((chain, tuple(rules)))
            return chain
        step = _step(bits)
        mask = ((1 << bits) - 1) & ~((1 << (bits - step)) - 1)
        branches = []
        for sub in range(1 << step):
            target = emit(prefix << step | sub, bits - step)
            if target is not None:  # None: above the last slot
                test = f"-m mark --mark {sub << (bits - step):#x}/{mask:#x} "
                branches.append((target, set_index(test, target) if isinstance(target, int) else f"{test}-g {target}"))
        if len(branches) == 1 and isinstance(branches[0][0], str):  # only one part has slots: nothing to test
            return branches[0][0]
        chains.append((chain, tuple(rule for _, rule in branches)))
        return chain

    cover(0, lay.width)
    top = emit(0, lay.width)
    if not isinstance(top, str):  # one node takes every slot
        return Trie(f"{name}-1", ((f"{name}-1", (set_index("", top or 0),)),))
    return Trie(top, tuple(reversed(chains)))


# -- the ruleset as data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """What one frontend put in the ruleset."""

    family: int
    chain: str  # LBAGENT-F<id> in nat
    sources: str | None  # LBAGENT-S<id> in mangle, when the frontend has source ranges
    trie: str | None  # the trie's root chain, when it has more than one active backend
    dispatched: bool  # has an active backend
    dispatch_rule: str
    source_rule: str | None


@dataclass
class Ruleset:
    """Everything in lbagent's chains, as data: what the full, delta and update renderings are made of."""

    layout: Layout
    chains: dict[int, dict[str, dict[str, Rules]]] = field(
        default_factory=lambda: {v: {t: {} for t in TABLES} for v in (4, 6)})
    vips: dict[int, set[str]] = field(default_factory=lambda: {4: set(), 6: set()})
    entries: dict[FrontendKey, _Entry] = field(default_factory=dict)
    trie_users: Counter[tuple[int, str]] = field(default_factory=Counter)
    tries: dict[tuple[int, str], tuple[tuple[tuple[str, int], ...], tuple[str, ...]]] = field(
        default_factory=dict)  # (family, root) -> (its nodes, its chains)
    journal: dict[tuple[int, str, str], Rules | None] | None = None  # old contents, while an update records

    def families(self) -> set[int]:
        """The families with anything to forward or refuse."""
        return {v for v in (4, 6) if self.vips[v] or any(e.family == v for e in self.entries.values())}

    def programmed(self) -> set[model.IPAddress]:
        return {ip_address(key[0]) for key, e in self.entries.items() if e.dispatched}

    def rule_count(self, family: int) -> int:
        return sum(len(rules) for table in self.chains[family].values() for rules in table.values())

    def chain_count(self, family: int) -> int:
        return sum(len(table) for table in self.chains[family].values())

    def _put(self, family: int, table: str, chain: str, rules: Rules | None) -> None:
        if len(chain) > MAX_CHAIN_NAME:
            raise RenderError(f"chain name {chain!r} is longer than iptables allows")
        chains = self.chains[family][table]
        if self.journal is not None:
            self.journal.setdefault((family, table, chain), chains.get(chain))
        if rules is None:
            chains.pop(chain, None)
        else:
            chains[chain] = rules


def _key(f: Frontend) -> FrontendKey:
    return (str(f.vip), f.protocol.value.lower(), f.port)


def _sort_key(key: FrontendKey) -> tuple[int, int, str, int]:
    address = ip_address(key[0])
    return (address.version, int(address), key[1], key[2])


def _host(vip: str) -> str:
    return f"{vip}/{32 if isinstance(ip_address(vip), IPv4Address) else 128}"


def _destination(b: Backend, port: int) -> str:
    return f"{b.address}:{port}" if b.address.version == 4 else f"[{b.address}]:{port}"


def frontend_chain_rules(f: Frontend, lay: Layout, trie_root: str | None) -> Rules:
    """The rules of a frontend's chain in nat (see the top of this module)."""
    active = f.active
    if not active:
        return ()
    proto = f.protocol.value.lower()
    q = lay.masquerade
    masquerade = f"-j MARK --set-xmark {q if f.mode is model.ForwardingMode.MASQUERADE else 0:#x}/{q:#x}"
    if len(active) == 1:
        return (masquerade, f"-p {proto} -j DNAT --to-destination {_destination(active[0], f.node_port)}")
    tuple_ = "src" if f.affinity_timeout is not None else "src,sport"
    stash = FULL_MASK & ~lay.field
    return (
        f"-j CONNMARK --save-mark --nfmask {stash:#x} --ctmask {stash:#x}",
        f"-j HMARK --hmark-tuple {tuple_} --hmark-mod {lay.size} --hmark-rnd {HASH_SEED:#x}",
        f"-j {trie_root}",
        f"-j CONNMARK --restore-mark --nfmask {FULL_MASK:#x} --ctmask {lay.keep:#x}",
        masquerade,
        *(f"-p {proto} -m connmark --mark {i:#x}/{lay.field:#x} -j DNAT --to-destination {_destination(b, f.node_port)}"
          for i, b in enumerate(active)),
    )


def _source_rules(f: Frontend) -> Rules:
    if not f.active:  # not dispatched: refused in INPUT like every other packet to the VIP (as nftables does)
        return ()
    v = f.vip.version
    return (*(f"-s {net} -j RETURN" for net in f.source_ranges if net.version == v), "-j DROP")


def _insert(rs: Ruleset, f: Frontend) -> None:
    key, v = _key(f), f.vip.version
    ident = _digest(f"{key[0]}|{key[1]}|{key[2]}", 6)
    chain = f"{PREFIX}F{ident}"
    match = f"-d {_host(key[0])} -p {key[1]} -m {key[1]} --dport {key[2]}"
    sources = f"{PREFIX}S{ident}" if f.source_ranges else None
    if chain in rs.chains[v]["nat"]:  # 48 bits of a hash: never seen, but never silently shared either
        raise RenderError(f"chain name collision at {chain} ({key})")
    root = None
    if len(f.active) > 1:
        nodes = _nodes(f.active)
        t = trie(nodes, rs.layout.size)
        root = t.root
        if (v, root) not in rs.tries:
            rs.tries[(v, root)] = (nodes, tuple(name for name, _ in t.chains))
            for name, rules in t.chains:
                rs._put(v, "nat", name, rules)
        elif rs.tries[(v, root)][0] != nodes:
            raise RenderError(f"trie name collision at {root}")
        rs.trie_users[(v, root)] += 1
    rs.entries[key] = _Entry(v, chain, sources, root, bool(f.active), f"{match} -j {chain}",
                             f"{match} -j {sources}" if sources else None)
    rs._put(v, "nat", chain, frontend_chain_rules(f, rs.layout, root))
    if sources is not None:
        rs._put(v, "mangle", sources, _source_rules(f))


def _remove(rs: Ruleset, key: FrontendKey) -> None:
    e = rs.entries.pop(key)
    if e.trie is not None:
        rs.trie_users[(e.family, e.trie)] -= 1
        if rs.trie_users[(e.family, e.trie)] <= 0:
            del rs.trie_users[(e.family, e.trie)]
            for name in rs.tries.pop((e.family, e.trie))[1]:
                rs._put(e.family, "nat", name, None)
    rs._put(e.family, "nat", e.chain, None)
    if e.sources is not None:
        rs._put(e.family, "mangle", e.sources, None)


def _dispatch(v: int, by_vip: list[tuple[int, list[str]]], budget: int) -> dict[str, Rules]:
    """LBAGENT-DISPATCH and the chains under it: a trie over the VIPs' addresses, so a new connection tries a
    few rules per level instead of one per frontend. Each chain splits its VIPs on the next `stride` bits after
    the prefix they share (`-d prefix/len -g part`); at most FLAT VIPs make a leaf, which holds their
    frontends' rules (`-d VIP -p tcp -m tcp --dport 80 -j LBAGENT-F<id>`). Two bits per level cost as many
    rules per bit as one; wider strides only when the trie must fit in `budget` chains deep. Only the set
    of frontends shapes it, so health changes never touch it."""
    width = 32 if v == 4 else 128

    def network(address: int, length: int) -> str:
        return f"{ip_address(address) if v == 4 else ip_address(address.to_bytes(16, 'big'))}/{length}"

    def emit(chains: dict[str, Rules], name: str, vips: list[tuple[int, list[str]]], stride: int) -> int:
        """Fill `chains` with the subtree of `vips` rooted at chain `name`; its depth in chains."""
        if len(vips) <= FLAT:
            chains[name] = tuple(rule for _, rules in vips for rule in rules)
            return 1
        common = width - (vips[0][0] ^ vips[-1][0]).bit_length()  # sorted: the first and last differ most
        length = min(common + stride, width)
        parts: dict[int, list[tuple[int, list[str]]]] = {}
        for vip in vips:
            parts.setdefault(vip[0] >> (width - length), []).append(vip)
        rules, depth = [], 0
        for key in sorted(parts):
            prefix = network(key << (width - length), length)
            child = f"{PREFIX}D{_digest(prefix, 5)}"
            depth = max(depth, emit(chains, child, parts[key], stride))
            rules.append(f"-d {prefix} -g {child}")
        chains[name] = tuple(rules)
        return depth + 1

    for stride in range(STRIDE, 9):
        chains: dict[str, Rules] = {}
        if emit(chains, DISPATCH, by_vip, stride) <= budget:
            return chains
    # Not expected (it takes millions of VIPs): one rule per frontend, as kube-proxy's iptables mode does.
    return {DISPATCH: tuple(rule for _, rules in by_vip for rule in rules)}


def _fixed(rs: Ruleset) -> None:
    """The chains every frontend or VIP has a rule in: rebuilt whole, only when the set of frontends changes."""
    q = rs.layout.masquerade
    for v in (4, 6):
        keys = sorted((k for k, e in rs.entries.items() if e.family == v), key=_sort_key)
        by_vip: dict[int, list[str]] = {}
        for k in keys:
            by_vip.setdefault(int(ip_address(k[0])), []).append(rs.entries[k].dispatch_rule)
        # The deepest path: the dispatch trie, the frontend's chain, its Maglev trie.
        budget = MAX_DEPTH - 1 - trie_depth_bound(rs.layout.size)
        for chain, rules in _dispatch(v, sorted(by_vip.items()), budget).items():
            rs._put(v, "nat", chain, rules)
        rs._put(v, "mangle", SOURCES, tuple(r for k in keys if (r := rs.entries[k].source_rule) is not None))
        rs._put(v, "nat", POSTROUTING, (
            # Only what lbagent forwarded in masquerade mode carries the bit: nothing else here is SNATed.
            f"-m mark ! --mark {q:#x}/{q:#x} -j RETURN",
            f"-j MARK --set-xmark 0x0/{q:#x}",
            "-j MASQUERADE",
        ))
        # A VIP belongs to the services behind it, not to the LB host: nothing else here answers on it. A packet
        # conntrack calls INVALID was not NATed (it belongs to a flow it cannot place): dropped, never answered with
        # a reset that would end a client's connection the node still serves.
        icmp, unreachable = ("icmp", "icmp-port-unreachable") if v == 4 else ("ipv6-icmp", "icmp6-port-unreachable")
        vips = sorted(rs.vips[v], key=lambda a: int(ip_address(a)))
        rs._put(v, "filter", INPUT, tuple(
            rule for vip in vips for rule in (
                f"-d {_host(vip)} -m conntrack --ctstate INVALID -j DROP",
                f"-d {_host(vip)} -p tcp -j REJECT --reject-with tcp-reset",
                f"-d {_host(vip)} ! -p {icmp} -j REJECT --reject-with {unreachable}",
            )
        ))


def build(frontends: Iterable[Frontend], vips: Iterable[model.IPAddress], dataplane: model.Dataplane) -> Ruleset:
    """Decide the content of every lbagent chain (pure)."""
    rs = Ruleset(layout(dataplane))
    for vip in vips:
        rs.vips[vip.version].add(str(vip))
    for f in frontends:
        if _key(f) in rs.entries:
            _remove(rs, _key(f))
        _insert(rs, f)
    _fixed(rs)
    return rs


def update(rs: Ruleset, old: Sequence[Frontend], new: Sequence[Frontend]) -> ChainChanges | None:
    """Replace some frontends (those of the services whose health changed) in `rs`, in place, and return the
    chains that changed; None when the set of frontends differs (then build and render_delta). Costs what
    changed, whatever the size of `rs`: the per-frontend chain stays in place and only its content moves."""
    if {_key(f) for f in old} != {_key(f) for f in new} or any(_key(f) not in rs.entries for f in old):
        return None
    rs.journal = {}
    try:
        for f in old:
            _remove(rs, _key(f))
        for f in new:
            _insert(rs, f)
        journal = rs.journal
    finally:
        rs.journal = None
    changes: ChainChanges = {}
    for (v, table, chain), before in journal.items():
        after = rs.chains[v][table].get(chain)
        if after != before:
            changes.setdefault(v, {}).setdefault(table, {})[chain] = after
    return changes


def diff(old: Ruleset, new: Ruleset) -> ChainChanges | None:
    """The chains that differ between two rulesets, or None when the mark layout changed (render_full then)."""
    if old.layout != new.layout:
        return None
    changes: ChainChanges = {}
    for v in (4, 6):
        for table in TABLES:
            before, after = old.chains[v][table], new.chains[v][table]
            for chain in before.keys() | after.keys():
                if before.get(chain) != after.get(chain):
                    changes.setdefault(v, {}).setdefault(table, {})[chain] = after.get(chain)
    return changes


# -- text ---------------------------------------------------------------------------------------------


def _ordered(chains: Iterable[str]) -> list[str]:
    """Fixed chains first, then the rest by name: stable output for golden files and readable listings."""
    fixed = [c for t in TABLES for c in FIXED_CHAINS[t]]
    return sorted(chains, key=lambda c: (fixed.index(c) if c in fixed else len(fixed), c))


def render_changes(changes: Mapping[str, Mapping[str, Rules | None]]) -> str:
    """One family's changed chains as restore input: each is declared (which flushes it) and refilled, or
    deleted. New chains are declared before any rule refers to them, deletions come after every referring
    chain was refilled without them."""
    out: list[str] = []
    for table in TABLES:
        chains = changes.get(table, {})
        if not chains:
            continue
        names = _ordered(chains)
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in names]
        out += [f"-A {c} {rule}" for c in names for rule in chains[c] or ()]
        out += [f"-X {c}" for c in names if chains[c] is None]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


@dataclass
class Existing:
    """What `iptables-save` shows of lbagent in one family: its chains, and its rules in built-in chains."""

    chains: dict[str, set[str]] = field(default_factory=lambda: {t: set() for t in TABLES})
    jumps: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: {t: [] for t in TABLES})

    def empty(self) -> bool:
        return not any(self.chains.values()) and not any(self.jumps.values())


def parse_save(text: str) -> Existing:
    """Read `iptables-save` output: lbagent's chains, and every rule of a built-in chain that is a bare jump to
    one of them (`-A PREROUTING -j LBAGENT-DISPATCH`): those are lbagent's, anything else is left alone."""
    found = Existing()
    table = None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif table not in found.chains:
            continue
        elif line.startswith(":" + PREFIX):
            found.chains[table].add(line[1:].split()[0])
        elif line.startswith("-A "):
            parts = line.split()
            if (len(parts) == 4 and parts[1] in BUILTIN_CHAINS and parts[2] in ("-j", "-g")
                    and parts[3].startswith(PREFIX)):
                found.jumps[table].append((parts[1], parts[3]))
    return found


def _jump_lines(table: str, existing: Existing, wanted: bool) -> list[str]:
    """Exactly one of each wanted jump (inserted first when missing), none of any other lbagent jump."""
    out = []
    have = Counter(existing.jumps[table])
    for (builtin, target), count in sorted(have.items()):
        keep = 1 if wanted and (table, builtin, target) in JUMPS else 0
        out += [f"-D {builtin} -j {target}"] * (count - keep)
    if wanted:
        out += [f"-I {builtin} 1 -j {target}" for t, builtin, target in JUMPS
                if t == table and not have[(builtin, target)]]
    return out


def render_full(rs: Ruleset, family: int, existing: Existing | None = None) -> str:
    """Every lbagent chain of a family, declared (flushed) and refilled, the jumps put right and chains lbagent
    no longer uses deleted, as `existing` (from iptables-save; None: nothing yet) shows them."""
    existing = existing or Existing()
    out: list[str] = []
    for table in TABLES:
        chains = rs.chains[family][table]
        stale = existing.chains[table] - chains.keys()
        names = _ordered(chains)
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in _ordered(chains.keys() | stale)]
        out += [f"-A {c} {rule}" for c in names for rule in chains[c]]
        out += _jump_lines(table, existing, wanted=True)
        out += [f"-X {c}" for c in _ordered(stale)]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_cleanup(existing: Existing) -> str:
    """Remove lbagent's jumps and chains from one family ("" when there are none)."""
    out: list[str] = []
    for table in TABLES:
        if not existing.chains[table] and not existing.jumps[table]:
            continue
        names = _ordered(existing.chains[table])
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in names]
        out += _jump_lines(table, existing, wanted=False)
        out += [f"-X {c}" for c in names]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def render(frontends: Iterable[Frontend], vips: Iterable[model.IPAddress], dataplane: model.Dataplane,
           family: int) -> str:
    return render_full(build(frontends, vips, dataplane), family)


# -- prediction ---------------------------------------------------------------------------------------


def hmark_slot(source: model.IPAddress, source_port: int | None, modulus: int, seed: int = HASH_SEED,
               offset: int = 0) -> int:
    """The mark xt_HMARK gives a TCP/UDP packet with `--hmark-tuple src,sport` (or `src` when source_port is
    None): jhash_3words over the address (IPv6: its four words xored) with the other address masked to 0,
    and the ports sorted with the masked destination port, reciprocal_scale'd, plus the offset."""
    if source.version == 4:
        src = int(source)
    else:
        packed = source.packed
        src = 0
        for i in range(0, 16, 4):
            src ^= int.from_bytes(packed[i:i + 4], "big")
    # The kernel sorts the two addresses (and the two ports) so both directions hash alike; the masked
    # destination is 0, so it comes first.
    low, high = sorted((src, 0))
    ports = (source_port << 16) if source_port else 0
    # jhash_3words(a, b, c, seed) is jhash() over the three words as a 12-byte key read in host (little) order.
    words = b"".join(x.to_bytes(4, "little") for x in (low, high, ports))
    return ((jhash(words, seed) * modulus) >> 32) + offset


def predict(frontend: Frontend, source: model.IPAddress, source_port: int, size: int) -> Backend | None:
    """The backend iptables sends a new flow to: HMARK's slot in the same Maglev table."""
    active = frontend.active
    if not active:
        return None
    if len(active) == 1:
        return active[0]
    slot = hmark_slot(source, None if frontend.affinity_timeout is not None else source_port, size)
    return active[maglev.table(list(_nodes(active)), size)[slot]]
