"""Pure rendering of ExaBGP 5's configuration, API command lines and environment from the model."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from lbagent import model
from lbagent.plan.services import Announcement

PROCESS_NAME = "lbagent"
ENV_FILE = "exabgp.env"

_U32_MAX = 2**32 - 1
_COMMUNITY = re.compile(r"(\d+):(\d+)")
# ExaBGP's configuration tokeniser gives these a meaning even inside a `run` line.
_UNSAFE_RUN_CHARS = frozenset(";{}[],#\"'\\")
# RFC 2385 keys: the kernel holds at most 80 bytes.
_MAX_MD5_KEY = 80


def render_config(
    bgp: model.Bgp,
    api_run: str,
    local_addresses: Mapping[model.IPAddress, model.IPAddress] | None = None,
) -> str:
    """The ExaBGP configuration: the API process running `api_run` and one neighbor block per peer.

    `local_addresses` supplies a source address for peers whose `local_address` is unset (the agent
    looks them up in the routing table); a peer with neither gets `local-address auto`.
    """
    _check_run(api_run)
    _check_asn(bgp.local_as, "local-as")
    if not isinstance(bgp.router_id, IPv4Address):
        raise ValueError(f"router-id must be an IPv4 address: {bgp.router_id!r}")
    if bgp.graceful_restart is not None and not 0 <= bgp.graceful_restart <= 4095:
        raise ValueError(f"graceful-restart must be 0..4095 seconds: {bgp.graceful_restart}")
    seen: set[model.IPAddress] = set()
    blocks = [f"process {PROCESS_NAME} {{\n    run {api_run};\n    encoder json;\n}}\n"]
    for peer in bgp.peers:
        if peer.address in seen:
            raise ValueError(f"duplicate peer {peer.address}")
        seen.add(peer.address)
        local = peer.local_address or (local_addresses or {}).get(peer.address)
        blocks.append(_neighbor(bgp, peer, local))
    return "\n".join(blocks)


def _neighbor(bgp: model.Bgp, peer: model.Peer, local: model.IPAddress | None) -> str:
    address = _checked_ip(peer.address, "peer address")
    _check_asn(peer.peer_as, "peer-as")
    if not (peer.hold_time == 0 or 3 <= peer.hold_time <= 65535):
        raise ValueError(f"hold-time must be 0 or 3..65535: {peer.hold_time}")
    lines = [
        f"neighbor {address} {{",
        f"    router-id {bgp.router_id};",
    ]
    if local is None:
        # ExaBGP then learns the address from the first TCP session; until that exists it
        # cannot resolve `next-hop self` and answers every announcement with an error.
        lines.append("    local-address auto;")
    else:
        local = _checked_ip(local, "local address")
        if local.version != address.version:
            raise ValueError(f"local address {local} and peer {address} are of different families")
        lines.append(f"    local-address {local};")
    lines += [
        f"    local-as {bgp.local_as};",
        f"    peer-as {peer.peer_as};",
        f"    hold-time {peer.hold_time};",
        # keep what was announced so that it is sent again after the session flaps
        "    adj-rib-out true;",
    ]
    if peer.port != 179:
        _check_int(peer.port, 1, 65535, "peer port")
        lines.append(f"    connect {peer.port};")
    if peer.password is not None:
        lines += _md5(peer.password)
    if peer.multihop is not None:
        _check_int(peer.multihop, 1, 255, "multihop")
        lines.append(f"    outgoing-ttl {peer.multihop};")
    if bgp.graceful_restart is not None:
        lines.append(f"    capability {{ graceful-restart {bgp.graceful_restart}; }}")
        # End-of-RIB only once lbagent has announced everything (eor_command): a new ExaBGP's own EOR would
        # come before lbagent's routes and end the router's graceful restart with none of them.
        lines.append("    manual-eor true;")
    lines += [
        "    family { ipv4 unicast; ipv6 unicast; }",
        f"    api {{ processes [ {PROCESS_NAME} ]; neighbor-changes; }}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _md5(password: str) -> list[str]:
    # Base64 is the one spelling ExaBGP's tokeniser cannot misread: it unescapes backslashes,
    # splits on quotes and comments before it ever sees the value.
    key = password.encode()
    if not key or len(key) > _MAX_MD5_KEY:
        raise ValueError(f"the MD5 password must be 1..{_MAX_MD5_KEY} bytes")
    return [f'    md5-password "{base64.b64encode(key).decode()}";', "    md5-base64 true;"]


def eor_command(neighbor: model.IPAddress) -> str:
    """The API line sending End-of-RIB to `neighbor` for the unicast family of its address (the only family
    lbagent announces on that session: `next-hop self` needs the session's own family)."""
    address = _checked_ip(neighbor, "neighbor")
    return f"neighbor {address} announce eor ipv{address.version} unicast"


def announce_command(a: Announcement, neighbors: Iterable[model.IPAddress] = ()) -> str:
    """The API line announcing `a` with this speaker as next hop, to `neighbors` (all when empty)."""
    words = [_selector(neighbors) + "announce route", _checked_prefix(a.prefix), "next-hop self"]
    if a.med is not None:
        words.append(f"med {_check_int(a.med, 0, _U32_MAX, 'med')}")
    if a.local_pref is not None:
        words.append(f"local-preference {_check_int(a.local_pref, 0, _U32_MAX, 'local-preference')}")
    if a.communities:
        words.append(f"community [{' '.join(_checked_community(c) for c in a.communities)}]")
    return " ".join(words)


def withdraw_command(a: Announcement, neighbors: Iterable[model.IPAddress] = ()) -> str:
    """The API line withdrawing `a`'s prefix from `neighbors` (all when empty)."""
    return f"{_selector(neighbors)}withdraw route {_checked_prefix(a.prefix)}"


def environment(runtime_dir: str) -> dict[str, str]:
    """The environment ExaBGP runs with; dotted names because ExaBGP prefers them over underscored ones."""
    if not runtime_dir.startswith("/") or any(not ch.isprintable() for ch in runtime_dir):
        raise ValueError(f"runtime_dir must be an absolute path: {runtime_dir!r}")
    return {
        # Our own (empty) settings file: no stray /etc or venv exabgp.env changes behaviour.
        "EXABGP_ENVFILE": f"{runtime_dir.rstrip('/')}/{ENV_FILE}",
        # The API process must stay root to reach the agent's 0600 socket.
        "exabgp.daemon.user": "root",
        "exabgp.daemon.drop": "false",
        "exabgp.daemon.daemonize": "false",
        "exabgp.daemon.pid": "",
        "exabgp.api.ack": "true",
        "exabgp.api.encoder": "json",
        "exabgp.api.cli": "false",
        # A dead bridge means a dead agent link: the agent restarts all of ExaBGP instead.
        "exabgp.api.respawn": "false",
        "exabgp.log.enable": "true",
        "exabgp.log.destination": "stderr",
        "exabgp.log.level": "INFO",
        "exabgp.log.short": "true",
        "exabgp.log.statistics": "false",
        "exabgp.log.packets": "false",
        "exabgp.log.routes": "false",
        # Only outgoing sessions: nothing listens on port 179.
        "exabgp.tcp.bind": "",
        "exabgp.tcp.attempts": "0",
        "exabgp.bgp.passive": "false",
    }


def _selector(neighbors: Iterable[model.IPAddress]) -> str:
    return "".join(f"neighbor {_checked_ip(n, 'neighbor')} , " for n in neighbors).removesuffix(", ")


def _checked_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix.isascii() or not prefix.isprintable() or " " in prefix:
        raise ValueError(f"invalid prefix {prefix!r}")
    try:
        return str(ip_network(prefix, strict=True))
    except ValueError as error:
        raise ValueError(f"invalid prefix {prefix!r}: {error}") from None


def _checked_ip(value: object, what: str) -> IPv4Address | IPv6Address:
    if isinstance(value, IPv4Address | IPv6Address):
        return value
    if isinstance(value, str) and value.isascii() and value.isprintable():
        try:
            return ip_address(value)
        except ValueError:
            pass
    raise ValueError(f"invalid {what} {value!r}")


def _checked_community(community: str) -> str:
    match = _COMMUNITY.fullmatch(community) if isinstance(community, str) else None
    if match is None or not community.isascii():
        raise ValueError(f"invalid community {community!r}: expected ASN:VALUE")
    for part in match.groups():
        _check_int(int(part), 0, 65535, f"community {community}")
    return community


def _check_asn(value: int, what: str) -> None:
    _check_int(value, 1, _U32_MAX, what)


def _check_int(value: int, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in {low}..{high}: {value!r}")
    return value


def _check_run(api_run: str) -> None:
    if not api_run.strip() or not api_run.startswith("/") or not api_run.isprintable():
        raise ValueError(f"the API process command must be an absolute path and arguments: {api_run!r}")
    if _UNSAFE_RUN_CHARS.intersection(api_run):
        raise ValueError(f"the API process command contains a character ExaBGP would misparse: {api_run!r}")
