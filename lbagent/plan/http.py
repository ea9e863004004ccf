"""Pure planning of the HTTP layer: each listener's routes in Gateway API precedence (lbagent.routing), backends and
server weights."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from fractions import Fraction

from lbagent import model
from lbagent.routing import (
    AttemptTimeouts,
    RouteEntry,
    attempt_timeouts,
    backend_name,
    proxy_name,
    ranked_entries,
    segments_prefix,
)


class ServerState(StrEnum):
    """A server's administrative state in HAProxy, set over the runtime API without a reload."""

    READY = "ready"  # takes new requests
    DRAIN = "drain"  # finishes what it has, takes nothing new (a draining node)
    MAINT = "maint"  # out (unhealthy)


MAX_WEIGHT = 256  # HAProxy's largest server weight


@dataclass(frozen=True)
class Server:
    """One HAProxy server: a node's nodePort for a Service backendRef, or one endpoint of a static backend.

    `name` is stable across plans (the backendRef's index and the node's name or the endpoint's index), so
    a change of health or weight is a runtime update of the same server, never a new one."""

    name: str
    address: model.IPAddress
    port: int
    weight: int  # 0..MAX_WEIGHT: the rule's canary split times the node's weight; 0: no new requests
    state: ServerState
    proxy_protocol: bool = False
    source: str = ""  # what it stands for, for people: "default/shop-v1 port 80 on node1"
    target: str = ""  # the backendRef it serves: a Service key, or a static backend's name (metrics are by it)
    tls: bool = False  # HTTPS to the server


@dataclass(frozen=True)
class HttpBackend:
    """One HAProxy backend per route rule: its servers (every backendRef's, weighted for the split), and the
    rule's filters, applied only to the requests the rule took."""

    name: str
    where: str  # the rule's field path in the config file
    servers: tuple[Server, ...] = ()
    request_headers: model.HeaderModifier = field(default_factory=model.HeaderModifier)
    response_headers: model.HeaderModifier = field(default_factory=model.HeaderModifier)
    rewrite: model.URLRewrite | None = None
    redirect: model.Redirect | None = None
    prefixes: tuple[str, ...] = ()  # the rule's PathPrefix values, longest first (for ReplacePrefixMatch)
    prefix_conditions: tuple[tuple[str, tuple[model.RouteMatch, ...]], ...] = ()
    """Prefixes (of `prefixes`, never the shortest) whose every match also tests headers, query parameters or the
    method, with those matches: a request under such a prefix came by it only when one of them holds. Under any
    other prefix, the longest one the path is under is the one that matched (Gateway API precedence)."""
    timeouts: AttemptTimeouts = field(default_factory=AttemptTimeouts)
    retry: model.Retry | None = None
    source_ranges: tuple[model.IPNetwork, ...] = ()  # only these clients (403 to the others)
    session_cookie: model.SessionCookie | None = None
    max_body_bytes: int | None = None
    # the share of the rule's requests whose backendRefs are invalid: answered 500 (with why), before any server
    error_share: Fraction = Fraction(0)
    error_reason: str = ""

    @property
    def usable(self) -> bool:
        """A request sent here gets an answer other than 503: a redirect, or a server ready to take it."""
        return self.redirect is not None or any(
            s.state is ServerState.READY and s.weight > 0 for s in self.servers
        )


@dataclass(frozen=True)
class HttpFrontend:
    """One listener: where HAProxy binds, its TLS certificates, and its routing table in precedence order."""

    listener: str
    vips: tuple[model.IPAddress, ...]
    port: int
    protocol: model.ListenerProtocol
    certificates: tuple[str, ...] = ()  # combined PEM files HAProxy reads; the first is the default
    entries: tuple[RouteEntry, ...] = ()  # first match wins
    default_backend: str | None = None  # where unmatched requests go; None: 404
    redirect_to_https: int | None = None  # redirect everything to https on this port
    accept_proxy: bool = False  # expect a PROXY protocol header from the client side
    hsts: str | None = None  # HTTPS: Strict-Transport-Security on every answer


@dataclass(frozen=True)
class ProxyPlan:
    """Everything HAProxy must look like now. Server weights and states are its runtime part: a change of only
    those goes through the runtime API; any other difference is structural and needs a reload."""

    frontends: tuple[HttpFrontend, ...] = ()
    backends: tuple[HttpBackend, ...] = ()

    def targets(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> the backendRef the server serves (a Service key or a static backend's name)."""
        return {(b.name, s.name): s.target for b in self.backends for s in b.servers}

    def runtime(self) -> dict[tuple[str, str], tuple[int, ServerState]]:
        """(backend, server) -> (weight, state): what the runtime API sets."""
        return {(b.name, s.name): (s.weight, s.state) for b in self.backends for s in b.servers}

    def backend(self, name: str) -> HttpBackend:
        return next(b for b in self.backends if b.name == name)

    def usable_backends(self) -> Mapping[str, bool]:
        return {b.name: b.usable for b in self.backends}


def structural(plan: ProxyPlan) -> ProxyPlan:
    """The plan with every server's runtime part set alike: two plans that differ only at runtime give equal
    structures (and equal rendered text), so comparing renders of this tells a reload from runtime updates."""
    return replace(plan, backends=tuple(
        replace(b, servers=tuple(replace(s, weight=1, state=ServerState.READY) for s in b.servers))
        for b in plan.backends))


# ---- planning ------------------------------------------------------------------------------------------------

HealthSnapshot = Mapping[tuple[str, str], bool]


def _servers(m: model.Model, ref_index: int, ref: model.BackendRef, health: HealthSnapshot) -> list[Server]:
    """A backendRef's servers with their state; weights are filled in by the rule's split."""
    out = []
    if ref.kind is model.BackendKind.SERVICE:
        service = m.service(ref.name)
        node_port = next(p.node_port for p in service.ports
                         if p.port == ref.port and p.protocol is model.Protocol.TCP)
        for node in m.nodes:
            healthy = health.get((ref.name, node.name), False)
            state = ServerState.MAINT if not healthy else ServerState.DRAIN if node.draining else ServerState.READY
            out.append(Server(f"{ref_index}_{node.name}", node.addresses[0], node_port, node.weight, state,
                              ref.proxy_protocol, f"{ref.name} port {ref.port} on {node.name}", ref.name,
                              ref.tls))
    else:
        backend = m.static_backend(ref.name)
        for j, endpoint in enumerate(backend.endpoints):
            healthy = health.get((backend.key, str(endpoint)), False) and endpoint not in backend.down
            out.append(Server(f"{ref_index}_ep{j}", endpoint.address, endpoint.port, 1,
                              ServerState.READY if healthy else ServerState.MAINT, ref.proxy_protocol,
                              f"backend {ref.name} endpoint {endpoint}", ref.name, ref.tls))
    return out


def _weighted(refs: tuple[model.BackendRef, ...], servers: list[list[Server]]) -> tuple[Server, ...]:
    """Server weights that split the rule's requests by its backendRefs' weights, and within a backendRef by
    node weight. A backendRef with nothing ready gives its share to the others (better than failing that
    share of requests). The exact split in whole numbers when HAProxy can take it (every weight at most
    MAX_WEIGHT: 90/10 over three servers each is 9 and 1, exactly 10%); else scaled so the largest weight is
    MAX_WEIGHT, for the finest split HAProxy can do (a 1/1000 canary over three servers each gets 1/257)."""
    ready = [[s for s in group if s.state is ServerState.READY] for group in servers]
    total = sum(r.weight for r, group in zip(refs, ready, strict=True) if group)
    shares: dict[tuple[int, str], Fraction] = {}
    for i, (ref, group) in enumerate(zip(refs, ready, strict=True)):
        node_total = sum(s.weight for s in group)
        for s in group:
            if total and node_total:
                shares[(i, s.name)] = Fraction(ref.weight, total) * Fraction(s.weight, node_total)
    positive = [v for v in shares.values() if v > 0]
    exact: dict[tuple[int, str], int] = {}
    if positive:
        scale = math.lcm(*(v.denominator for v in positive))
        whole = {k: int(v * scale) for k, v in shares.items() if v > 0}
        divisor = math.gcd(*whole.values())
        if max(whole.values()) // divisor <= MAX_WEIGHT:
            exact = {k: v // divisor for k, v in whole.items()}
    top = max(positive, default=Fraction(0))
    out = []
    for i, group in enumerate(servers):
        for s in group:
            share = shares.get((i, s.name), Fraction(0))
            if share <= 0:
                weight = 0
            elif exact:
                weight = exact[(i, s.name)]
            else:
                weight = max(1, round(share / top * MAX_WEIGHT))
            out.append(replace(s, weight=weight))
    return tuple(out)


def _backend(m: model.Model, name: str, rule: model.RouteRule, health: HealthSnapshot) -> HttpBackend:
    """The rule's backend. Its timeouts were checked with the config (attempt_timeouts raises no ValueError here)."""
    groups = [[] if ref.invalid else _servers(m, i, ref, health) for i, ref in enumerate(rule.backend_refs)]
    total = sum(ref.weight for ref in rule.backend_refs)
    invalid = [ref for ref in rule.backend_refs if ref.invalid]
    valid = tuple(ref for ref in rule.backend_refs if not ref.invalid)
    by_prefix: dict[str, list[model.RouteMatch]] = {}
    for x in rule.matches:
        if x.path.type is model.PathMatchType.PATH_PREFIX:
            by_prefix.setdefault(segments_prefix(x.path.value), []).append(x)
    prefixes = sorted(by_prefix, key=lambda p: (-len(p), p))
    conditional = tuple((p, tuple(by_prefix[p])) for p in prefixes[:-1]
                        if all(x.headers or x.query_params or x.method for x in by_prefix[p]))
    return HttpBackend(
        name=name, where=rule.where,
        servers=_weighted(valid, [g for g, ref in zip(groups, rule.backend_refs, strict=True) if not ref.invalid]),
        error_share=Fraction(sum(ref.weight for ref in invalid), total) if invalid and total else Fraction(0),
        error_reason="; ".join(dict.fromkeys(str(ref.invalid) for ref in invalid)),
        request_headers=rule.request_headers, response_headers=rule.response_headers, rewrite=rule.rewrite,
        redirect=rule.redirect, prefixes=tuple(prefixes), prefix_conditions=conditional,
        timeouts=attempt_timeouts(rule.request_timeout, rule.backend_request_timeout, m.proxy.connect_timeout,
                                  rule.retry),
        retry=rule.retry, source_ranges=rule.source_ranges, session_cookie=rule.session_cookie,
        max_body_bytes=rule.max_body_bytes,
    )


def plan_proxy(m: model.Model, health: HealthSnapshot, certificates: Mapping[str, tuple[str, ...]]) -> ProxyPlan:
    """What HAProxy must serve. `certificates`: listener name -> the combined PEM files HAProxy reads."""
    backends: dict[str, HttpBackend] = {}
    for route in m.routes:
        for k, rule in enumerate(route.rules):
            name = backend_name(route, k)
            backends[name] = _backend(m, name, rule, health)
    frontends = []
    for listener in m.listeners:
        default = None
        if listener.default_backend is not None:
            default = proxy_name(f"listener_{listener.name}_default")
            rule = model.RouteRule(f"listeners[{listener.name}].defaultBackend",
                                   backend_refs=(listener.default_backend,))
            backends[default] = _backend(m, default, rule, health)
        frontends.append(HttpFrontend(
            listener=listener.name, vips=listener.vips, port=listener.port, protocol=listener.protocol,
            certificates=certificates.get(listener.name, ()),
            entries=() if listener.redirect_to_https else tuple(e for _, e in ranked_entries(m, listener)),
            default_backend=default, redirect_to_https=listener.redirect_to_https,
            accept_proxy=listener.proxy_protocol, hsts=listener.hsts,
        ))
    used = {e.backend for f in frontends for e in f.entries} | {f.default_backend for f in frontends}
    return ProxyPlan(tuple(frontends), tuple(b for name, b in backends.items() if name in used))


def listener_serves(frontend: HttpFrontend, plan: ProxyPlan) -> tuple[list[str], list[str]]:
    """The listener's backends that can answer and those that cannot (all down: 503)."""
    names = dict.fromkeys([e.backend for e in frontend.entries] +
                          ([frontend.default_backend] if frontend.default_backend else []))
    usable = plan.usable_backends()
    return [n for n in names if usable.get(n)], [n for n in names if not usable.get(n)]


def changes(old: ProxyPlan | None, new: ProxyPlan) -> tuple[str, str]:
    """Why a reload: a short kind for the metric label (`start`, `listeners`, `routes`, `settings`) and the
    names of what changed, for the log."""
    if old is None:
        return "start", "HAProxy not running"
    old_s, new_s = structural(old), structural(new)
    fronts_old = {f.listener: f for f in old_s.frontends}
    fronts_new = {f.listener: f for f in new_s.frontends}
    backs_old = {b.name: b for b in old_s.backends}
    backs_new = {b.name: b for b in new_s.backends}
    listener_changes = sorted(n for n in fronts_old.keys() | fronts_new.keys()
                              if fronts_old.get(n) != fronts_new.get(n))
    backend_changes = sorted(n for n in backs_old.keys() | backs_new.keys() if backs_old.get(n) != backs_new.get(n))
    detail = "; ".join(filter(None, [
        f"listeners {', '.join(listener_changes)}" if listener_changes else "",
        f"backends {', '.join(backend_changes)}" if backend_changes else "",
    ])) or "global settings"
    routing_only = all(
        fronts_old.get(n) is not None and fronts_new.get(n) is not None
        and _same_binds(fronts_old[n], fronts_new[n]) for n in listener_changes
    )
    if listener_changes and not routing_only:
        return "listeners", detail
    if listener_changes or backend_changes:
        return "routes", detail
    return "settings", detail


def _same_binds(a: HttpFrontend, b: HttpFrontend) -> bool:
    return (a.vips, a.port, a.protocol, a.certificates, a.accept_proxy) == (b.vips, b.port, b.protocol,
                                                                           b.certificates, b.accept_proxy)
