"""Pure planning: what every subsystem must look like now, and why, from the model and the health snapshot."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address

from lbagent import model

HealthSnapshot = Mapping[tuple[str, str], bool]


class Reason(StrEnum):
    """Why a VIP is or is not announced (shown in logs, `lbagent plan` and, later, metrics labels)."""

    ANNOUNCED = "announced"
    NO_HEALTHY_NODES = "noHealthyNodes"
    NO_LOCAL_ENDPOINTS = "noLocalEndpoints"
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
    """Where forwarded traffic lands: a node's address and the service port's nodePort.

    Weight 0 means draining: no new flows, but flows already there continue (IPVS keeps the real server
    with weight 0; nftables and iptables leave it out of the lookup table while conntrack keeps the flows).
    """

    node: str
    address: model.IPAddress
    port: int
    weight: int = 1


@dataclass(frozen=True)
class Frontend:
    """One VIP:port/protocol and the backends it spreads over (none with weight > 0: nothing healthy)."""

    service: str
    port_name: str
    vip: model.IPAddress
    protocol: model.Protocol
    port: int
    backends: tuple[Backend, ...]
    mode: model.ForwardingMode = model.ForwardingMode.MASQUERADE
    affinity_timeout: int | None = None
    source_ranges: tuple[model.IPNetwork, ...] = ()
    scheduler: str = "mh"

    @property
    def active(self) -> tuple[Backend, ...]:
        """The backends that take new flows."""
        return tuple(b for b in self.backends if b.weight > 0)


@dataclass(frozen=True)
class ServiceDecision:
    service: str
    vips: tuple[model.IPAddress, ...]
    announce: bool
    reason: Reason
    healthy_nodes: tuple[str, ...]
    unhealthy_nodes: tuple[str, ...]
    draining_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    vips: tuple[model.IPAddress, ...]
    frontends: tuple[Frontend, ...]
    announcements: Mapping[str, Announcement]
    decisions: tuple[ServiceDecision, ...]
    sysctls: Mapping[str, str]


def all_healthy(m: model.Model) -> dict[tuple[str, str], bool]:
    """A snapshot in which every node is healthy for every service: what `lbagent plan` shows without probing."""
    return {(s.key, n.name): True for s in m.services for n in m.nodes}


def sysctls(m: model.Model) -> dict[str, str]:
    """Kernel settings an LB node needs: forwarding, VIPs on `lo` never answered for on the wire, IPVS expiry."""
    if not m.dataplane.manage_sysctls:
        return {}
    vips = [v for s in m.services for v in s.vips]
    out = {"net/ipv4/ip_forward": "1"}
    if any(isinstance(v, IPv4Address) for v in vips) and m.vip_interface == "lo":
        # A VIP on lo would otherwise be answered for in ARP on every interface (arp_ignore=1), and
        # used as the source of our own ARP requests (arp_announce=2): the classic LVS-DR settings.
        out["net/ipv4/conf/all/arp_ignore"] = "1"
        out["net/ipv4/conf/all/arp_announce"] = "2"
    if any(not isinstance(v, IPv4Address) for v in vips):
        out["net/ipv6/conf/all/forwarding"] = "1"
    if m.dataplane.kind is model.DataplaneKind.IPVS:
        # kube-proxy's settings: connections to a removed real server are expired instead of black-holed,
        # and persistence templates of a weight-0 server do not keep new connections on it.
        out["net/ipv4/vs/expire_nodest_conn"] = "1"
        out["net/ipv4/vs/expire_quiescent_template"] = "1"
        out["net/ipv4/vs/conntrack"] = "1"
    return out


def plan(m: model.Model, health: HealthSnapshot, draining: bool = False) -> Plan:
    """Decide everything. A pair missing from `health` counts as unhealthy."""
    frontends: list[Frontend] = []
    decisions: list[ServiceDecision] = []
    announce_by_vip: dict[model.IPAddress, Announcement] = {}
    for service in m.services:
        healthy = [n for n in m.nodes if health.get((service.key, n.name), False)]
        unhealthy = tuple(n.name for n in m.nodes if not health.get((service.key, n.name), False))
        taking = [n for n in healthy if not n.draining]
        for vip in service.vips:
            for port in service.ports:
                backends = tuple(
                    Backend(n.name, address, port.node_port, 0 if n.draining else n.weight)
                    for n in healthy
                    if (address := n.address_for(vip)) is not None
                )
                frontends.append(
                    Frontend(
                        service=service.key, port_name=port.name, vip=vip, protocol=port.protocol,
                        port=port.port, backends=backends, mode=service.forwarding_mode,
                        affinity_timeout=service.session_affinity_timeout, source_ranges=service.source_ranges,
                        scheduler=service.ipvs_scheduler,
                    )
                )
        if draining:
            reason = Reason.DRAINING
        elif not taking:
            local = service.external_traffic_policy is model.TrafficPolicy.LOCAL
            reason = Reason.NO_LOCAL_ENDPOINTS if local else Reason.NO_HEALTHY_NODES
        else:
            reason = Reason.ANNOUNCED
        decisions.append(
            ServiceDecision(
                service.key, service.vips, reason is Reason.ANNOUNCED, reason,
                tuple(n.name for n in taking), unhealthy, tuple(n.name for n in healthy if n.draining),
            )
        )
        if reason is Reason.ANNOUNCED:
            for vip in service.vips:
                # Services sharing a VIP carry the same attributes (checked), so any one of them speaks for it.
                announce_by_vip.setdefault(
                    vip,
                    Announcement(
                        model.host_prefix(vip), service.bgp.med, service.bgp.local_pref, service.bgp.communities
                    ),
                )
    vips = tuple(sorted({v for s in m.services for v in s.vips}, key=lambda a: (a.version, int(a))))
    return Plan(
        vips=vips,
        frontends=tuple(frontends),
        announcements={a.prefix: a for a in announce_by_vip.values()},
        decisions=tuple(decisions),
        sysctls=sysctls(m),
    )


@dataclass(frozen=True)
class StaleFlows:
    """UDP conntrack entries to delete: toward a node that no longer takes a frontend's flows. UDP has no
    connection end, so without this a client that keeps sending stays NATed to the dead node forever."""

    vip: model.IPAddress
    port: int
    node_address: model.IPAddress
    node_port: int


def stale_udp_flows(before: Iterable[Frontend], after: Iterable[Frontend]) -> list[StaleFlows]:
    """What left each UDP frontend's active backends between two plans (a node removed or drained)."""
    now = {(f.vip, f.port): {(b.address, b.port) for b in f.active} for f in after
           if f.protocol is model.Protocol.UDP}
    out = []
    for f in before:
        if f.protocol is not model.Protocol.UDP:
            continue
        kept = now.get((f.vip, f.port), set())
        out += [StaleFlows(f.vip, f.port, b.address, b.port) for b in f.active if (b.address, b.port) not in kept]
    return out
