"""A new lookup table and its chain, packed by lbagent (lbagent.l4.nftables.netlink: `NewLookupTable`, `NewChain`)
and sent over netlink, leave the kernel holding what nft's own declarations of the same text leave, for every kind
of chain (IPv4 and IPv6, hashed on the client's address and port or on its address alone, masqueraded or not):
- the same listing, with each rule expression by expression and register by register (`nft --debug=netlink`);
- byte for byte, what the kernel dumps of each set (its types, flags and the user data nft lists its types from)
  and of each rule (its expressions).
In a network namespace this test makes."""

from __future__ import annotations

import difflib
import json
import socket
import subprocess

from lbagent.l4.nftables import netlink
from lbagent.l4.nftables.render import LookupRule, LookupTable, Transaction
from lbagent.netlinkmsg import NLMSG_DONE, NLMSG_ERROR, attribute, attribute_text, attributes, messages
from tests.netns import run_python, throwaway_netns

INSIDE = "from tests.unit.test_nft_declarations import inside; inside()"
MARK = 0x00200000
NETLINK_NETFILTER = 12
KINDS = [(v, by_client, mark) for v in (4, 6) for by_client in (False, True) for mark in (None, MARK)]


def _slots(v: int) -> tuple[str, ...]:
    nodes = ["192.0.2.11", "192.0.2.12", "192.0.2.13"] if v == 4 else ["2001:db8::11", "2001:db8::12"]
    return tuple(nodes[i % len(nodes)] for i in range(1021))


def _listing(table: str) -> str:
    """The table as nft lists it and as the kernel holds it, its name left out; each set's elements in order (a
    hash set lists them as they fell in its buckets)."""
    out = subprocess.run(["nft", "--debug=netlink", "list", "table", "inet", table], capture_output=True, text=True,
                         check=True).stdout
    lines: list[str] = []
    elements: list[str] = []
    for line in out.replace(f"inet {table} ", "inet T ").replace(f"table inet {table} ", "table inet T ").split("\n"):
        if line.startswith("\telement "):
            elements.append(line)
            continue
        lines += sorted(elements)
        elements.clear()
        lines.append(line)
    return "\n".join(lines)


def inside() -> None:
    """In the namespace: the same declarations in table `by_nft` through nft and in `by_netlink` over netlink."""
    maps = "".join(f" map node_ports_v{v} {{ type {a} . inet_proto . inet_service : inet_service; }}\n"
                   for v, a in ((4, "ipv4_addr"), (6, "ipv6_addr")))
    subprocess.run(["nft", "-f", "-"], text=True, check=True,
                   input="".join(f"table inet {t} {{\n{maps}}}\n" for t in ("by_nft", "by_netlink")))
    sock = netlink.ElementSocket()
    try:
        for i, (v, by_client, mark) in enumerate(KINDS):
            table = LookupTable(f"mg{v}_{i}", v, _slots(v))
            rule = LookupRule(table.name, v, by_client, mark, 1021)
            chain = f"{table.name}_chain"
            script = Transaction(tables=(("by_nft", table),), chains=(("by_nft", chain, rule),)).script()
            subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)
            sock.apply([netlink.NewLookupTable("by_netlink", table.name, v, table.slots),
                        netlink.NewChain("by_netlink", chain, rule)])
    finally:
        sock.close()
    print(json.dumps({"nft": _listing("by_nft"), "netlink": _listing("by_netlink"),
                      "nft_dump": _dump("by_nft"), "netlink_dump": _dump("by_netlink")}))


NFT_MSG_GETRULE, NFT_MSG_GETSET = 7, 10
NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_SET_NAME = 2, 4, 2
# a set's attributes that say what it is (not its table, handle or id)
SET_ATTRIBUTES = {3: "flags", 4: "key type", 5: "key length", 6: "data type", 7: "data length", 8: "policy",
                  9: "description", 13: "user data"}


def _dump(table: str) -> dict[str, dict[str, str]]:
    """What the kernel dumps of the table's sets (by name) and rules (by chain), as hex."""
    out: dict[str, dict[str, str]] = {}
    for kind, name_attribute in ((NFT_MSG_GETSET, NFTA_SET_NAME), (NFT_MSG_GETRULE, NFTA_RULE_CHAIN)):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            sock.sendall(netlink.message((netlink.NFNL_SUBSYS_NFTABLES << 8) | kind,
                                         netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP, 1, netlink.NFPROTO_INET, 0,
                                         attribute(1, table.encode() + b"\0")))  # the table (set's and rule's: 1)
            done = False
            while not done:
                data = sock.recv(1 << 20)
                for m in messages(data):
                    if m.kind in (NLMSG_DONE, NLMSG_ERROR):
                        done = True
                        continue
                    attrs = attributes(data, m.start + 4, m.end)
                    name = attribute_text(attrs[name_attribute])
                    if kind == NFT_MSG_GETSET:
                        out[f"set {name}"] = {what: attrs[a].hex() for a, what in SET_ATTRIBUTES.items() if a in attrs}
                    else:
                        out[f"rule of {name}"] = {"expressions": attrs[NFTA_RULE_EXPRESSIONS].hex()}
        finally:
            sock.close()
    return out


def test_declarations_over_netlink_leave_what_nfts_leave_rule_by_rule() -> None:
    with throwaway_netns("nfdc") as (name,):
        got = run_python(name, INSIDE)
    # every kind of chain is there, with its rule's expressions (not an empty chain on both sides)
    assert got["nft"].count("[ nat dnat ") == len(KINDS), got["nft"]
    assert got["nft"].count("[ hash reg 1 = jhash(") == len(KINDS)
    assert got["nft"].count("[ bitwise ") == sum(mark is not None for _, _, mark in KINDS)
    # the same sets and rules, byte for byte (anonymous sets are named by the kernel in each table alike)
    # each kind: a lookup table, { tcp, udp } and a rule; and the two nodePort maps
    assert len(got["nft_dump"]) == 3 * len(KINDS) + 2, got["nft_dump"].keys()
    assert all("user data" in d for n, d in got["nft_dump"].items() if n.startswith("set ")), got["nft_dump"]
    assert got["netlink_dump"] == got["nft_dump"]
    assert got["netlink"] == got["nft"], "\n".join(
        difflib.unified_diff(got["nft"].splitlines(), got["netlink"].splitlines(), "nft", "netlink", lineterm=""))
