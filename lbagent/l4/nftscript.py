"""The nft script text both nftables tables of lbagent share (the nftables data plane's, IPVS's companion): a table
replaced whole in one transaction, a set's or map's elements, element changes between two contents, the table
deleted. Pure text: the renderers (lbagent.l4.nftables.render, lbagent.l4.ipvs.render) write with it, lbagent.l4.nft
runs what they write."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set

# The NFLOG group lbagent's nftables table logs refused connections to ("lb"), read by lbagent.l4.refusals.
REFUSED_LOG_GROUP = 27746

# Set or map name -> its elements, each as nft writes it ("192.0.2.10 . tcp . 80 : goto mg4_ab12").
Contents = Mapping[str, Set[str]]


def replace_table(table: str, family: str = "inet") -> list[str]:
    """The opening of a whole-table script: declared first so that the delete cannot fail on a node without it,
    deleted, and defined again by the lines that follow (up to the closing brace): one transaction, so the kernel
    swaps the old table for the new one with nothing in between."""
    return [f"table {family} {table}", f"delete table {family} {table}", f"table {family} {table} {{"]


def elements(items: Iterable[str]) -> str:
    """A set or map declaration's elements clause, sorted (stable output); nothing for none (nft refuses an empty
    `elements = { }`)."""
    listed = sorted(items)
    return f" elements = {{ {', '.join(listed)} }};" if listed else ""


def element_changes(table: str, before: Contents, after: Contents, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The `delete element` and the `add element` lines, at most one of each per set or map and in the order of
    `names`, that turn `before` into `after` (a name missing on one side is empty there). The caller sends all the
    deletions before any addition: a map element whose value changed is deleted and added again, and nft refuses
    to add a key that is still there."""
    deletions, additions = [], []
    empty: Set[str] = frozenset()
    for name in names:
        old, new = before.get(name, empty), after.get(name, empty)
        if gone := sorted(old - new):
            deletions.append(f"delete element inet {table} {name} {{ {', '.join(gone)} }}")
        if came := sorted(new - old):
            additions.append(f"add element inet {table} {name} {{ {', '.join(came)} }}")
    return deletions, additions


def delete_table(table: str, family: str = "inet") -> str:
    """Remove the table and everything in it; declared first, so that it succeeds when there is none."""
    return script([f"table {family} {table}", f"delete table {family} {table}"])


def script(lines: Iterable[str]) -> str:
    """Lines as one `nft -f` input (one transaction); "" when there are none: nothing to send."""
    text = "\n".join(lines)
    return text + "\n" if text else ""
