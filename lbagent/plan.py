"""Pure planning: what every subsystem must look like now, and why, from the model and the health snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address

from lbagent import model

HealthSnapshot = Mapping[tuple[str, str], bool]


class Reason(StrEnum):
    """Why a VIP is or is not announced (shown in logs, `lbagent plan` and, later, metrics labels)."""

    ANNOUNCED = "announced"
    NO_HEALTHY_NODES = "noHealthyNodes"
    DRAINING = "draining"


@dataclass(frozen=True)
class Announcement:
    """One route lbagent announces: a VIP host prefix with this node as next hop, and its attributes."""

    prefix: str
    med: int | None = None
    local_pref: int | None = None
    communities: tuple[str, ...] = ()


@dataclass(frozen=True)
class Backend:
    """Where forwarded traffic lands: a node's address and the service port's nodePort."""

    node: str
    address: model.IPAddress
    port: int


@dataclass(frozen=True)
class Frontend:
    """One VIP:port/protocol and the backends it spreads over (empty: the service has no healthy node)."""

    service: str
    port_name: str
    vip: model.IPAddress
    protocol: model.Protocol
    port: int
    backends: tuple[Backend, ...]


@dataclass(frozen=True)
class ServiceDecision:
    service: str
    vip: model.IPAddress
    announce: bool
    reason: Reason
    healthy_nodes: tuple[str, ...]
    unhealthy_nodes: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    vips: tuple[model.IPAddress, ...]
    frontends: tuple[Frontend, ...]
    announcements: Mapping[str, Announcement]
    decisions: tuple[ServiceDecision, ...]
    sysctls: Mapping[str, str]


def all_healthy(m: model.Model) -> dict[tuple[str, str], bool]:
    """A snapshot in which every node is healthy for every service: what `lbagent plan` shows without probing."""
    return {(s.key, n.name): True for s in m.services for n in m.nodes if n.address_for(s.vip) is not None}


def sysctls(m: model.Model) -> dict[str, str]:
    """Kernel settings an LB node needs: forwarding, and VIPs on `lo` never answered for on the wire."""
    if not m.dataplane.manage_sysctls:
        return {}
    out = {"net/ipv4/ip_forward": "1"}
    if any(isinstance(s.vip, IPv4Address) for s in m.services) and m.vip_interface == "lo":
        # A VIP on lo would otherwise be answered for in ARP on every interface (arp_ignore=1), and
        # used as the source of our own ARP requests (arp_announce=2): the classic LVS-DR settings.
        out["net/ipv4/conf/all/arp_ignore"] = "1"
        out["net/ipv4/conf/all/arp_announce"] = "2"
    if any(not isinstance(s.vip, IPv4Address) for s in m.services):
        out["net/ipv6/conf/all/forwarding"] = "1"
    return out


def plan(m: model.Model, health: HealthSnapshot, draining: bool = False) -> Plan:
    """Decide everything. A pair missing from `health` counts as unhealthy."""
    frontends: list[Frontend] = []
    decisions: list[ServiceDecision] = []
    announce_by_vip: dict[model.IPAddress, Announcement] = {}
    for service in m.services:
        healthy: list[tuple[model.Node, model.IPAddress]] = []
        unhealthy: list[str] = []
        for node in m.nodes:
            address = node.address_for(service.vip)
            if address is None:
                continue
            if health.get((service.key, node.name), False):
                healthy.append((node, address))
            else:
                unhealthy.append(node.name)
        for port in service.ports:
            frontends.append(
                Frontend(
                    service=service.key,
                    port_name=port.name,
                    vip=service.vip,
                    protocol=port.protocol,
                    port=port.port,
                    backends=tuple(Backend(node.name, address, port.node_port) for node, address in healthy),
                )
            )
        if draining:
            reason = Reason.DRAINING
        elif not healthy:
            reason = Reason.NO_HEALTHY_NODES
        else:
            reason = Reason.ANNOUNCED
        decisions.append(
            ServiceDecision(
                service.key, service.vip, reason is Reason.ANNOUNCED, reason,
                tuple(n.name for n, _ in healthy), tuple(unhealthy),
            )
        )
        if reason is Reason.ANNOUNCED:
            # Services sharing a VIP are checked to carry the same attributes, so any one of them speaks for it.
            announce_by_vip.setdefault(
                service.vip,
                Announcement(service.prefix, service.bgp.med, service.bgp.local_pref, service.bgp.communities),
            )
    vips = tuple(sorted({s.vip for s in m.services}, key=lambda a: (a.version, int(a))))
    return Plan(
        vips=vips,
        frontends=tuple(frontends),
        announcements={a.prefix: a for a in announce_by_vip.values()},
        decisions=tuple(decisions),
        sysctls=sysctls(m),
    )
