"""Render the whole L4 data plane as one nft script that replaces lbagent's own table in one transaction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address

from lbagent import model
from lbagent.plan import Frontend

# Every LB node must pick the same backend for the same flow, so an ECMP change at the router that moves
# a flow to another LB keeps it on its node: the hash seed is a constant, not random per boot.
HASH_SEED = 0x6C626167


def chain_name(frontend: Frontend) -> str:
    """`svc/<namespace>/<name>/<proto>/<port>`: unique, since names never contain a slash."""
    return f"svc/{frontend.service}/{frontend.protocol.value.lower()}/{frontend.port}"


def _family(address: model.IPAddress) -> str:
    return "ip" if isinstance(address, IPv4Address) else "ip6"


def _elements(items: Sequence[str], indent: str) -> str:
    if not items:
        return ""
    return f"{indent}elements = {{ " + f",\n{indent}             ".join(items) + " }\n"


def _frontend_chain(frontend: Frontend, mark: int) -> str:
    family = _family(frontend.vip)
    proto = frontend.protocol.value.lower()
    targets = ", ".join(f"{i} : {b.address} . {b.port}" for i, b in enumerate(frontend.backends))
    return (
        f"\tchain {chain_name(frontend)} {{\n"
        f"\t\tmeta mark set meta mark | {mark:#010x}\n"
        f"\t\tmeta l4proto {proto} dnat {family} to jhash {family} saddr . {proto} sport"
        f" mod {len(frontend.backends)} seed {HASH_SEED:#x} map {{ {targets} }}\n"
        "\t}\n"
    )


def render(frontends: Iterable[Frontend], vips: Iterable[model.IPAddress], dataplane: model.Dataplane) -> str:
    """The nft script: declare, delete and redefine the table, so the kernel swaps old for new atomically.

    A frontend with no healthy backend is left out of the dispatch map: its packets then reach the
    `input` chain as local traffic to a VIP and are refused there (TCP reset, ICMP port unreachable),
    which is what a client of a service without endpoints should see, and not a silent black hole.
    """
    table = dataplane.table
    mark = dataplane.masquerade_mark
    live = sorted(
        (f for f in frontends if f.backends), key=lambda f: (f.vip.version, int(f.vip), f.protocol.value, f.port)
    )
    all_vips = sorted(vips, key=lambda a: (a.version, int(a)))
    out = [f"table inet {table}\n", f"delete table inet {table}\n", f"table inet {table} {{\n"]
    for _family, addr_type, version in (("ip", "ipv4_addr", 4), ("ip6", "ipv6_addr", 6)):
        suffix = f"v{version}"
        family_vips = [str(v) for v in all_vips if v.version == version]
        out.append(f"\tset vips_{suffix} {{\n\t\ttype {addr_type}\n{_elements(family_vips, chr(9) * 2)}\t}}\n")
        entries = [
            f"{f.vip} . {f.protocol.value.lower()} . {f.port} : goto {chain_name(f)}"
            for f in live
            if f.vip.version == version
        ]
        out.append(
            f"\tmap frontends_{suffix} {{\n\t\ttype {addr_type} . inet_proto . inet_service : verdict\n"
            f"{_elements(entries, chr(9) * 2)}\t}}\n"
        )
    dispatch = (
        "\t\tip daddr . meta l4proto . th dport vmap @frontends_v4\n"
        "\t\tip6 daddr . meta l4proto . th dport vmap @frontends_v6\n"
    )
    out.append(f"\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n{dispatch}\t}}\n")
    # Connections a process on the LB node itself opens to a VIP take the same path as the clients'.
    out.append(f"\tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n{dispatch}\t}}\n")
    # Only what lbagent forwarded carries the mark, so nothing else on this host is masqueraded.
    out.append(
        "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        f"\t\tmeta mark & {mark:#010x} == {mark:#010x}"
        f" meta mark set meta mark & {~mark & 0xFFFFFFFF:#010x} masquerade\n"
        "\t}\n"
    )
    # A VIP belongs to the services behind it, not to the LB host: nothing else on this host answers on it.
    out.append(
        "\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n"
        "\t\tip daddr @vips_v4 meta l4proto tcp reject with tcp reset\n"
        "\t\tip daddr @vips_v4 meta l4proto != icmp reject with icmp port-unreachable\n"
        "\t\tip6 daddr @vips_v6 meta l4proto tcp reject with tcp reset\n"
        "\t\tip6 daddr @vips_v6 meta l4proto != ipv6-icmp reject with icmpv6 port-unreachable\n"
        "\t}\n"
    )
    out.extend(_frontend_chain(f, mark) for f in live)
    out.append("}\n")
    return "".join(out)


def render_delete(dataplane: model.Dataplane) -> str:
    """Remove lbagent's table and with it everything lbagent programmed (`lbagent cleanup`)."""
    return f"table inet {dataplane.table}\ndelete table inet {dataplane.table}\n"
