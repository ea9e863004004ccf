"""Pure planning: what every subsystem must look like now, and why, from the model and the health snapshot."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from ipaddress import IPv4Address
from typing import NamedTuple, overload

from lbagent import model
from lbagent.plan.overlay import Overlay
from lbagent.verdicts import Verdicts

HealthSnapshot = Mapping[tuple[str, str], bool]


class Reason(StrEnum):
    """Why a VIP is or is not announced (shown in logs, `lbagent plan` and, later, metrics labels)."""

    ANNOUNCED = "announced"
    NO_HEALTHY_NODES = "noHealthyNodes"
    NO_LOCAL_ENDPOINTS = "noLocalEndpoints"
    DRAINING = "draining"
    PROXY_DOWN = "proxyDown"  # a listener's HAProxy is not running (or not configured yet)
    NO_HEALTHY_BACKENDS = "noHealthyBackends"  # a listener whose every route backend would answer 503


@dataclass(frozen=True)
class Announcement:
    """One route lbagent announces: a VIP host prefix with this node as next hop, and its attributes."""

    prefix: str
    med: int | None = None
    local_pref: int | None = None
    communities: tuple[str, ...] = ()


class Backend(NamedTuple):
    """Where forwarded traffic lands: a node and its address (the port is the frontend's `node_port`).

    Weight 0 means draining: no new flows, but flows already there continue (IPVS keeps the real server
    with weight 0; nftables and iptables leave it out of the lookup table while conntrack keeps the flows).
    The planner shares one tuple of backends between every frontend with the same nodes, so 10,000 services
    x 2 ports x 20 nodes hold a few tuples, not 400,000 backends.
    """

    node: str
    address: model.IPAddress
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Frontend:
    """One VIP:port/protocol and the backends it spreads over (none with weight > 0: nothing healthy)."""

    service: str
    port_name: str
    vip: model.IPAddress
    protocol: model.Protocol
    port: int
    backends: tuple[Backend, ...]
    node_port: int  # the port every backend takes this frontend's traffic on (the service port's nodePort)
    mode: model.ForwardingMode = model.ForwardingMode.MASQUERADE
    affinity_timeout: int | None = None
    source_ranges: tuple[model.IPNetwork, ...] = ()
    scheduler: str = "mh"

    @property
    def active(self) -> tuple[Backend, ...]:
        """The backends that take new flows."""
        if all(b.weight > 0 for b in self.backends):
            return self.backends
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


class Frontends(Sequence[Frontend]):
    """Every service's frontends as one sequence, read through the plan's `by_service` each time it is iterated: a
    plan made again for one service (`replan`) does not copy 20,000 frontends, and a data plane that applies only the
    change never reads them. Nothing of the whole is kept either: a plan that kept its frontends in one tuple after a
    full apply made the next change pay for freeing it (0.4 ms at 10,000 services, every frontend touched)."""

    __slots__ = ("_by_service", "_len")

    def __init__(self, by_service: Mapping[str, tuple[Frontend, ...]]) -> None:
        self._by_service = by_service
        self._len: int | None = None

    def __iter__(self) -> Iterator[Frontend]:
        return itertools.chain.from_iterable(self._by_service.values())

    def __len__(self) -> int:
        if self._len is None:
            self._len = sum(map(len, self._by_service.values()))
        return self._len

    @overload
    def __getitem__(self, index: int) -> Frontend: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Frontend, ...]: ...

    def __getitem__(self, index: int | slice) -> Frontend | tuple[Frontend, ...]:
        return tuple(self)[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Frontends | tuple):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Frontends({tuple(self)!r})"


@dataclass(frozen=True)
class Plan:
    vips: tuple[model.IPAddress, ...]
    frontends: Sequence[Frontend]
    announcements: Mapping[str, Announcement]
    sysctls: Mapping[str, str]
    by_service: Mapping[str, tuple[Frontend, ...]] = field(default_factory=dict)
    decision_by_service: Mapping[str, ServiceDecision] = field(default_factory=dict)
    l4_vips: tuple[model.IPAddress, ...] = ()  # the VIPs the kernel forwards (the others are HAProxy's)

    @property
    def decisions(self) -> tuple[ServiceDecision, ...]:
        """Every service's and listener's decision, in model order: made when asked (status, plan output), so
        a plan made again for one service copies none of them."""
        return tuple(self.decision_by_service.values())


def all_healthy(m: model.Model) -> dict[tuple[str, str], bool]:
    """A snapshot in which every node is healthy for every service: what `lbagent plan` shows without probing."""
    healthy = {(s.key, n.name): True for s in m.services for n in m.nodes}
    return healthy | {(b.key, str(e)): True for b in m.backends for e in b.endpoints}


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
    # A flow that comes back to this LB (the routers' ECMP moved it away and back: an LB or a BGP session
    # that went and returned) meets the conntrack entry it left here, whose TCP window is long out of date.
    # Strict window tracking calls its packets INVALID: no NAT, and the VIP's own reject rule would answer RST.
    # Liberal tracking (kube-proxy's --conntrack-tcp-be-liberal) keeps such a flow on its entry, and its node.
    # The path exists once nf_conntrack is loaded (the data plane's first apply loads it).
    out[CONNTRACK_LIBERAL] = "1"
    if m.dataplane.kind is model.DataplaneKind.IPVS:
        out |= IPVS_SYSCTLS
    return out


CONNTRACK_LIBERAL = "net/netfilter/nf_conntrack_tcp_be_liberal"


# kube-proxy's IPVS settings: connections to a removed real server are expired instead of black-holed,
# persistence templates of a weight-0 server do not keep new connections on it, and IPVS keeps conntrack
# entries (the masquerade rule matches the connection's original VIP).
IPVS_SYSCTLS = {
    "net/ipv4/vs/expire_nodest_conn": "1",
    "net/ipv4/vs/expire_quiescent_template": "1",
    "net/ipv4/vs/conntrack": "1",
    # A flow IPVS has no connection for (moved here from another LB mid-stream) is scheduled by its first packet,
    # not only by a SYN: with the same Maglev (mh) table on every LB it reaches the same node as before.
    "net/ipv4/vs/sloppy_tcp": "1",
    "net/ipv4/vs/sloppy_sctp": "1",
}


# Equal backend tuples, shared: frontends with the same nodes hold the same tuple (less memory, and the data planes
# find a lookup table they already made by the tuple's identity before comparing contents).
# Keyed by the VIP's family and the healthy nodes' names and weights (within one model they decide the addresses).
BackendCache = dict[tuple[int, tuple[tuple[str, int], ...]], tuple[Backend, ...]]


class _Row(NamedTuple):
    """What a service's health row (which nodes serve it) decides, whatever the service: worked out once per row in
    a plan, as most services share a handful of rows (all nodes healthy, one node down...)."""

    healthy: tuple[model.Node, ...]
    weights: tuple[tuple[str, int], ...]
    taking: tuple[str, ...]
    unhealthy: tuple[str, ...]
    draining: tuple[str, ...]

    @classmethod
    def of(cls, nodes: Sequence[model.Node], serving: tuple[bool, ...]) -> _Row:
        healthy = tuple(n for n, ok in zip(nodes, serving, strict=True) if ok)
        return cls(healthy, tuple((n.name, 0 if n.draining else n.weight) for n in healthy),
                   tuple(n.name for n in healthy if not n.draining),
                   tuple(n.name for n, ok in zip(nodes, serving, strict=True) if not ok),
                   tuple(n.name for n in healthy if n.draining))


RowCache = dict[tuple[bool, ...], _Row]


def plan_service(
    service: model.Service, nodes: Sequence[model.Node], health: HealthSnapshot, draining: bool,
    shared: BackendCache | None = None, rows: RowCache | None = None,
) -> tuple[tuple[Frontend, ...], ServiceDecision]:
    """One service's frontends and announce decision: services are planned independently of each other. `shared`
    and `rows`: caches kept across the services of one plan (of the same nodes)."""
    key = service.key
    endpoints = service.endpoint_nodes
    if isinstance(health, Verdicts):  # the agent's: this service's verdicts by node, in a dict of its own
        mine = health.of(key)
        serving = tuple([mine.get(n.name, False) for n in nodes])
    else:
        serving = tuple([health.get((key, n.name), False) for n in nodes])
    if endpoints is not None:
        serving = tuple([ok and n.name in endpoints for n, ok in zip(nodes, serving, strict=True)])
    row = rows.get(serving) if rows is not None else None
    if row is None:
        row = _Row.of(nodes, serving)
        if rows is not None:
            rows[serving] = row
    frontends = []
    cache: BackendCache = {} if shared is None else shared
    healthy, weights = row.healthy, row.weights
    for vip in service.vips:
        backends = cache.get((vip.version, weights))
        if backends is None:
            backends = cache[(vip.version, weights)] = tuple(
                Backend(n.name, a, w) for n, (_, w) in zip(healthy, weights, strict=True)
                if (a := n.address_for(vip)) is not None)
        for port in service.ports:
            frontends.append(
                Frontend(
                    service=key, port_name=port.name, vip=vip, protocol=port.protocol, port=port.port,
                    backends=backends, node_port=port.node_port,
                    mode=service.forwarding_mode, affinity_timeout=service.session_affinity_timeout,
                    source_ranges=service.source_ranges, scheduler=service.ipvs_scheduler,
                )
            )
    if draining:
        reason = Reason.DRAINING
    elif not row.taking:
        local = service.external_traffic_policy is model.TrafficPolicy.LOCAL
        reason = Reason.NO_LOCAL_ENDPOINTS if local else Reason.NO_HEALTHY_NODES
    else:
        reason = Reason.ANNOUNCED
    decision = ServiceDecision(key, service.vips, reason is Reason.ANNOUNCED, reason, row.taking, row.unhealthy,
                               row.draining)
    return tuple(frontends), decision


def _announcement(
    m: model.Model, vip: model.IPAddress, decisions: Mapping[str, ServiceDecision]
) -> Announcement | None:
    """A VIP is announced while any service on it is. Services sharing a VIP carry the same attributes
    (the config checks it), so the first of them speaks for it."""
    keys = m.services_by_vip.get(vip, [])
    if not any(k in decisions and decisions[k].announce for k in keys):
        return None
    bgp = m.service(keys[0]).bgp if m.has_service(keys[0]) else model.BgpAttributes()
    return Announcement(model.host_prefix(vip), bgp.med, bgp.local_pref, bgp.communities)


def _reannounce(m: model.Model, announcements: Mapping[str, Announcement], decisions: Mapping[str, ServiceDecision],
                touched: Iterable[model.IPAddress]) -> dict[str, Announcement]:
    """The announcements with those of the `touched` VIPs decided again from `decisions`."""
    out = dict(announcements)
    for vip in touched:
        out.pop(model.host_prefix(vip), None)
        if (a := _announcement(m, vip, decisions)) is not None:
            out[a.prefix] = a
    return out


def plan(m: model.Model, health: HealthSnapshot, draining: bool = False) -> Plan:
    """Decide everything. A pair missing from `health` counts as unhealthy."""
    by_service: dict[str, tuple[Frontend, ...]] = {}
    decisions: dict[str, ServiceDecision] = {}
    shared: BackendCache = {}
    rows: RowCache = {}
    for service in m.services:
        by_service[service.key], decisions[service.key] = plan_service(service, m.nodes, health, draining, shared,
                                                                       rows)
    announcements = {}
    for vip in m.services_by_vip:
        if (a := _announcement(m, vip, decisions)) is not None:
            announcements[a.prefix] = a
    return Plan(
        vips=tuple(sorted(m.services_by_vip, key=lambda a: (a.version, int(a)))),
        l4_vips=tuple(sorted(m.l4_vips, key=lambda a: (a.version, int(a)))),
        frontends=Frontends(by_service),
        announcements=announcements,
        sysctls=sysctls(m),
        by_service=by_service,
        decision_by_service=decisions,
    )


def replan(prev: Plan, m: model.Model, health: HealthSnapshot, services: Iterable[str], draining: bool = False) -> Plan:
    """`plan()` again for a few services, reusing everything else from `prev`: the cost grows with the services
    named, not with how many there are. `prev` is a plan of the same nodes, dataplane settings and listeners; the
    services named may have changed their health, their spec, or come or gone in `m` (a source's change:
    `changed_services`)."""
    prev_by, prev_decisions = prev.by_service, prev.decision_by_service
    planned: dict[str, tuple[Frontend, ...]] = {}
    decided: dict[str, ServiceDecision] = {}
    touched: set[model.IPAddress] = set()
    members_changed = vips_changed = False
    for key in services:
        if (before := prev_decisions.get(key)) is not None:
            touched.update(before.vips)
        if not m.has_service(key):
            members_changed |= key in prev_by
            continue
        service = m.service(key)
        members_changed |= key not in prev_by
        vips_changed |= before is None or before.vips != service.vips
        planned[key], decided[key] = plan_service(service, m.nodes, health, draining)
        touched.update(service.vips)
    by_service: Mapping[str, tuple[Frontend, ...]]
    decisions: Mapping[str, ServiceDecision]
    if members_changed:  # model order, as plan() makes it (the listeners' decisions are placed again after this)
        by_service = Overlay({s.key: planned[s.key] if s.key in planned else prev_by[s.key] for s in m.services})
        decisions = Overlay({s.key: decided[s.key] if s.key in decided else prev_decisions[s.key]
                             for s in m.services})
    else:  # the same services: the others' plans are shared with `prev`, not copied
        by_service, decisions = Overlay.of(prev_by).replaced(planned), Overlay.of(prev_decisions).replaced(decided)
    announcements = _reannounce(m, prev.announcements, decisions, touched)
    if members_changed or vips_changed:
        vips = tuple(sorted(m.services_by_vip, key=lambda a: (a.version, int(a))))
        l4_vips = tuple(sorted(m.l4_vips, key=lambda a: (a.version, int(a))))
        settings: Mapping[str, str] = sysctls(m)
    else:
        vips, l4_vips, settings = prev.vips, prev.l4_vips, prev.sysctls
    return Plan(
        vips=vips,
        l4_vips=l4_vips,
        frontends=Frontends(by_service),
        announcements=announcements,
        sysctls=settings,
        by_service=by_service,
        decision_by_service=decisions,
    )


# What a service's plan may read besides the service itself and the health snapshot: every other part of the model
# but the routes and static backends (HAProxy's). When these are equal in two models, only the services that differ
# need planning again (`replan`).
_PLAN_READS = tuple(f.name for f in fields(model.Model) if f.name not in {"services", "routes", "backends"})


def changed_services(old: model.Model, new: model.Model) -> set[str] | None:
    """The keys of the services added, removed or changed from `old` to `new`; None when something every service's
    plan reads changed too (the nodes, the data plane's settings...): then only a whole plan will do."""
    if any(getattr(old, name) != getattr(new, name) for name in _PLAN_READS):
        return None
    before, after = old.service_index, new.service_index
    # the identity first: a source that kept a service that did not change (the Kubernetes source) is not compared
    changed = {key for key, service in after.items() if (was := before.get(key)) is not service and was != service}
    changed.update(before.keys() - after.keys())
    return changed


def listener_decision(listener: model.Listener, usable: Sequence[str], unusable: Sequence[str], proxy_up: bool,
                      draining: bool) -> ServiceDecision:
    """A listener's VIPs are announced while HAProxy runs and something behind the listener can answer."""
    if draining:
        reason = Reason.DRAINING
    elif not proxy_up:
        reason = Reason.PROXY_DOWN
    elif not usable and not listener.redirect_to_https:
        reason = Reason.NO_HEALTHY_BACKENDS
    else:
        reason = Reason.ANNOUNCED
    return ServiceDecision(listener.key, listener.vips, reason is Reason.ANNOUNCED, reason, tuple(usable),
                           tuple(unusable))


def with_listeners(p: Plan, m: model.Model, listener_decisions: Iterable[ServiceDecision]) -> Plan:
    """The plan with the listeners' decisions (re)placed and the announcements of their VIPs recomputed."""
    current = p.decision_by_service
    changed: dict[str, ServiceDecision] = {}
    touched: set[model.IPAddress] = set()
    for d in listener_decisions:
        if current.get(d.service) != d:
            changed[d.service] = d
            touched.update(d.vips)
    if not changed:
        return p
    decisions = Overlay.of(current).replaced(changed)
    announcements = _reannounce(m, p.announcements, decisions, touched)
    return replace(p, decision_by_service=decisions, announcements=announcements)


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
    now = {(f.vip, f.port): {(b.address, f.node_port) for b in f.active} for f in after
           if f.protocol is model.Protocol.UDP}
    out = []
    for f in before:
        if f.protocol is not model.Protocol.UDP:
            continue
        kept = now.get((f.vip, f.port), set())
        out += [StaleFlows(f.vip, f.port, b.address, f.node_port) for b in f.active
                if (b.address, f.node_port) not in kept]
    return out
