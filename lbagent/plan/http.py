"""Pure planning of the HTTP layer: each listener's routes in Gateway API precedence, backends and server weights."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from enum import StrEnum

from lbagent import model


class ServerState(StrEnum):
    """A server's administrative state in HAProxy, set over the runtime API without a reload."""

    READY = "ready"  # takes new requests
    DRAIN = "drain"  # finishes what it has, takes nothing new (a draining node)
    MAINT = "maint"  # out (unhealthy)


MAX_WEIGHT = 256  # HAProxy's largest server weight
DEFAULT_RETRIES = 3  # HAProxy's retries of a rule without `retry`: connection failures only, each on another server


# HAProxy refuses (400) a request whose line and headers do not fit its buffer less `tune.maxrewrite` bytes, which
# stay free for what its rules add; a rule that finds no room fails the request with 500. The base reserve holds the
# frontend's own additions: X-Forwarded-For, X-Real-IP, X-Forwarded-Proto and -Port, and X-Forwarded-Host, a copy
# of a Host header of at most MAX_HOST_BYTES (a longer one is refused with 400): at most 725 bytes as HAProxy stores
# them. A rule's filters need their own room on top (rewrite_growth).
REWRITE_RESERVE = 1024
MAX_HOST_BYTES = 512
HEADER_OVERHEAD = 8  # what HAProxy stores with each header besides its name and value (an HTX block's head)


def rewrite_growth(request_headers: model.HeaderModifier, response_headers: model.HeaderModifier,
                   rewrite: model.URLRewrite | None) -> int:
    """The most a rule's filters add to a request's or a response's headers as HAProxy stores them, in bytes."""
    def added(modifier: model.HeaderModifier) -> int:
        return sum(len(name) + len(value) + HEADER_OVERHEAD for name, value in (*modifier.set, *modifier.add))

    request = added(request_headers)
    if rewrite is not None:
        request += len("Host") + len(rewrite.hostname) + HEADER_OVERHEAD if rewrite.hostname is not None else 0
        request += len(rewrite.path.value) if rewrite.path is not None else 0
    return max(request, added(response_headers))


@dataclass(frozen=True)
class AttemptTimeouts:
    """What bounds a rule's requests in HAProxy 2.6, which has no deadline for a whole request: each attempt's
    `timeout connect` and `timeout server` (None: the proxy's), chosen so that every attempt together stays within
    `budget` (the rule's `timeouts.request`; None: no such bound). HAProxy makes at most `retries` + 1 attempts:
    with `response_retries` (a rule's `retry`) any attempt may wait for an answer; without, only connection
    failures are tried again."""

    connect: float | None = None
    server: float | None = None
    retries: int = DEFAULT_RETRIES
    response_retries: bool = False
    budget: float | None = None

    def longest(self, proxy_connect: float) -> float:
        """The longest a request can take in HAProxy with these timeouts, from when it has the request to its
        answer's headers (or its own 503/504), in seconds (whole milliseconds, as HAProxy counts).

        A failed connection takes at most 2 * connect: its timeout, or a refusal within it followed by HAProxy's
        turn-around of min(connect, 1 s) before it tries the same server again (backend.c). An attempt that
        connects takes at most connect + server (the answer's headers; `timeout server` is the longest silence)."""
        connect = _ms(self.connect if self.connect is not None else proxy_connect)
        server = _ms(self.server) if self.server is not None else None
        if server is None:
            raise ValueError("no bound: the attempts use the proxy's own `timeout server`")
        full = connect + max(server, connect)
        # with response retries every attempt may be a full one; else all but the last are failed connections
        total = (self.retries + 1) * full if self.response_retries else self.retries * 2 * connect + full
        return total / 1000


def milliseconds(seconds: float, rounding: str = ROUND_CEILING) -> int:
    """A duration in HAProxy's resolution: whole milliseconds, rounded up (as timeouts are written) or `rounding`."""
    return int((Decimal(str(seconds)) * 1000).to_integral_value(rounding))


def _ms(seconds: float) -> int:
    return max(1, milliseconds(seconds))


def attempt_timeouts(request: float | None, backend_request: float | None, connect: float,
                     retry: model.Retry | None) -> AttemptTimeouts:
    """The timeouts of a rule's attempts. `request` (the whole request) is shared out so that the worst case of
    AttemptTimeouts.longest() stays within it; `backend_request` (one attempt) caps what an attempt waits for its
    answer; `connect` is the proxy's connect timeout, an attempt's connection never gets longer.

    With `retry`, each of the 1 + retries attempts gets an equal share, a quarter of it at most to connect. Without,
    only failed connections are retried: they get a quarter of the budget between them (2 * connect each, see
    longest()), the one attempt that connects the rest. ValueError when the budget is too small to share out."""
    retries = retry.attempts if retry is not None else DEFAULT_RETRIES
    if request is None:
        return AttemptTimeouts(None, backend_request, retries, retry is not None)
    budget = milliseconds(request, ROUND_FLOOR)
    if retry is not None:
        share = budget // (retries + 1)
        connect_ms = min(_ms(connect), share // 4)
        server_ms = share - connect_ms
    else:
        connect_ms = min(_ms(connect), budget // (4 * (2 * retries + 1)))
        server_ms = budget - (2 * retries + 1) * connect_ms
    if backend_request is not None:
        server_ms = min(server_ms, _ms(backend_request))
    if connect_ms < 1 or server_ms < 1:
        if retry is not None:
            raise ValueError(f"too short to share out over {retries + 1} attempts (the first and retry.attempts "
                             f"{retries}): give at least {4 * (retries + 1)} ms")
        raise ValueError(f"too short for up to {retries + 1} connection attempts (HAProxy tries a failed connection "
                         f"{retries} more times) and the answer: give at least {4 * (2 * retries + 1)} ms")
    out = AttemptTimeouts(connect_ms / 1000, server_ms / 1000, retries, retry is not None, request)
    assert out.longest(connect) <= budget / 1000
    return out


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

    @property
    def usable(self) -> bool:
        """A request sent here gets an answer other than 503: a redirect, or a server ready to take it."""
        return self.redirect is not None or any(
            s.state is ServerState.READY and s.weight > 0 for s in self.servers
        )


@dataclass(frozen=True)
class RouteEntry:
    """One line of a listener's routing table: a hostname (None: any) and a match, to a backend."""

    backend: str
    hostname: str | None
    match: model.RouteMatch
    where: str  # the match's field path in the config file


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


@dataclass(frozen=True)
class ProxyPlan:
    """Everything HAProxy must look like now. Server weights and states are its runtime part: a change of only
    those goes through the runtime API; any other difference is structural and needs a reload."""

    frontends: tuple[HttpFrontend, ...] = ()
    backends: tuple[HttpBackend, ...] = ()

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


def _segments_prefix(prefix: str) -> str:
    """A PathPrefix value as it matches: whole segments, a trailing slash ignored ("/" stays "/")."""
    return prefix.rstrip("/") or "/"


def path_has_prefix(path: str, prefix: str) -> bool:
    """Gateway API PathPrefix: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, never `/foobar`."""
    p = _segments_prefix(prefix)
    return p in ("/", path) or path.startswith(p + "/")


def _host_rank(hostname: str | None) -> tuple[int, int]:
    if hostname is None:
        return (2, 0)
    return (1 if hostname.startswith("*.") else 0, -len(hostname))


def _match_rank(match: model.RouteMatch) -> tuple[int, int, int, int, int]:
    """Gateway API precedence, most specific first: Exact path, then (our choice, documented) regular
    expressions, then the longest PathPrefix; then a method; then more headers; then more query params."""
    path = match.path
    kind = {model.PathMatchType.EXACT: 0, model.PathMatchType.REGULAR_EXPRESSION: 1,
            model.PathMatchType.PATH_PREFIX: 2}[path.type]
    length = len(_segments_prefix(path.value)) if path.type is model.PathMatchType.PATH_PREFIX else len(path.value)
    if path.type is model.PathMatchType.PATH_PREFIX and _segments_prefix(path.value) == "/":
        length = 0
    return (kind, -length, 0 if match.method else 1, -len(match.headers), -len(match.query_params))


def backend_name(route: model.Route, index: int) -> str:
    return f"{route.namespace}_{route.name}_{index}"


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
                              ref.proxy_protocol, f"{ref.name} port {ref.port} on {node.name}"))
    else:
        backend = m.static_backend(ref.name)
        for j, endpoint in enumerate(backend.endpoints):
            healthy = health.get((backend.key, str(endpoint)), False)
            out.append(Server(f"{ref_index}_ep{j}", endpoint.address, endpoint.port, 1,
                              ServerState.READY if healthy else ServerState.MAINT, ref.proxy_protocol,
                              f"backend {ref.name} endpoint {endpoint}"))
    return out


def _weighted(refs: tuple[model.BackendRef, ...], servers: list[list[Server]]) -> tuple[Server, ...]:
    """Server weights that split the rule's requests by its backendRefs' weights, and within a backendRef by
    node weight. A backendRef with nothing ready gives its share to the others (better than failing that
    share of requests). Scaled so the largest weight is MAX_WEIGHT, for the finest split HAProxy can do."""
    ready = [[s for s in group if s.state is ServerState.READY] for group in servers]
    total = sum(r.weight for r, group in zip(refs, ready, strict=True) if group)
    shares: dict[tuple[int, str], float] = {}
    for i, (ref, group) in enumerate(zip(refs, ready, strict=True)):
        node_total = sum(s.weight for s in group)
        for s in group:
            shares[(i, s.name)] = (ref.weight / total) * (s.weight / node_total) if total and node_total else 0.0
    top = max(shares.values(), default=0.0)
    out = []
    for i, group in enumerate(servers):
        for s in group:
            share = shares.get((i, s.name), 0.0)
            weight = max(1, round(share / top * MAX_WEIGHT)) if share > 0 and top > 0 else 0
            out.append(Server(s.name, s.address, s.port, weight, s.state, s.proxy_protocol, s.source))
    return tuple(out)


def _backend(m: model.Model, name: str, rule: model.RouteRule, health: HealthSnapshot) -> HttpBackend:
    """The rule's backend. Its timeouts were checked with the config (attempt_timeouts raises no ValueError here)."""
    groups = [_servers(m, i, ref, health) for i, ref in enumerate(rule.backend_refs)]
    by_prefix: dict[str, list[model.RouteMatch]] = {}
    for x in rule.matches:
        if x.path.type is model.PathMatchType.PATH_PREFIX:
            by_prefix.setdefault(_segments_prefix(x.path.value), []).append(x)
    prefixes = sorted(by_prefix, key=lambda p: (-len(p), p))
    conditional = tuple((p, tuple(by_prefix[p])) for p in prefixes[:-1]
                        if all(x.headers or x.query_params or x.method for x in by_prefix[p]))
    return HttpBackend(
        name=name, where=rule.where, servers=_weighted(rule.backend_refs, groups),
        request_headers=rule.request_headers, response_headers=rule.response_headers, rewrite=rule.rewrite,
        redirect=rule.redirect, prefixes=tuple(prefixes), prefix_conditions=conditional,
        timeouts=attempt_timeouts(rule.request_timeout, rule.backend_request_timeout, m.proxy.connect_timeout,
                                  rule.retry),
        retry=rule.retry,
    )


def _entries(m: model.Model, listener: model.Listener) -> list[tuple[tuple[object, ...], RouteEntry]]:
    """The listener's routing table with its sort keys (precedence, then config order)."""
    ranked: list[tuple[tuple[object, ...], RouteEntry]] = []
    for ri, route in enumerate(m.routes):
        if listener.name not in route.listeners:
            continue
        for k, rule in enumerate(route.rules):
            for mi, match in enumerate(rule.matches):
                for hostname in route.hostnames or (None,):
                    where = f"{rule.where}.matches[{mi}]"
                    ranked.append(((_host_rank(hostname), _match_rank(match), ri, k, mi),
                                   RouteEntry(backend_name(route, k), hostname, match, where)))
    ranked.sort(key=lambda item: item[0])
    return ranked


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
            default = f"listener_{listener.name}_default"
            rule = model.RouteRule(f"listeners[{listener.name}].defaultBackend",
                                   backend_refs=(listener.default_backend,))
            backends[default] = _backend(m, default, rule, health)
        frontends.append(HttpFrontend(
            listener=listener.name, vips=listener.vips, port=listener.port, protocol=listener.protocol,
            certificates=certificates.get(listener.name, ()),
            entries=() if listener.redirect_to_https else tuple(e for _, e in _entries(m, listener)),
            default_backend=default, redirect_to_https=listener.redirect_to_https,
            accept_proxy=listener.proxy_protocol,
        ))
    used = {e.backend for f in frontends for e in f.entries} | {f.default_backend for f in frontends}
    return ProxyPlan(tuple(frontends), tuple(b for name, b in backends.items() if name in used))


def listener_serves(frontend: HttpFrontend, plan: ProxyPlan) -> tuple[list[str], list[str]]:
    """The listener's backends that can answer and those that cannot (all down: 503)."""
    names = dict.fromkeys([e.backend for e in frontend.entries] +
                          ([frontend.default_backend] if frontend.default_backend else []))
    usable = plan.usable_backends()
    return [n for n in names if usable.get(n)], [n for n in names if not usable.get(n)]


# ---- checks: rules that can never match ---------------------------------------------------------------------


def _host_covers(first: str | None, then: str | None) -> bool:
    if first is None:
        return True
    if then is None:
        return False
    if first.startswith("*."):
        return then.removeprefix("*.").endswith(first[1:]) or (then.startswith("*.") and then == first)
    return first == then


def _path_covers(first: model.PathMatch, then: model.PathMatch) -> bool:
    if first.type is model.PathMatchType.PATH_PREFIX:
        if then.type is model.PathMatchType.REGULAR_EXPRESSION:
            return _segments_prefix(first.value) == "/"
        return path_has_prefix(_segments_prefix(then.value), first.value)
    return first == then


def _conditions(values: tuple[model.ValueMatch, ...]) -> set[tuple[str, str, str]]:
    return {(v.name.lower(), v.value, v.type.value) for v in values}


def covers(first: RouteEntry, then: RouteEntry) -> bool:
    """Every request `then` matches, `first` matches too (so `then`, coming after, never gets one)."""
    a, b = first.match, then.match
    return (_host_covers(first.hostname, then.hostname) and _path_covers(a.path, b.path)
            and (a.method is None or a.method == b.method)
            and _conditions(a.headers) <= _conditions(b.headers)
            and _conditions(a.query_params) <= _conditions(b.query_params))


def _index_key(entry: RouteEntry) -> tuple[str | None, str, str]:
    """Where an entry is filed for unreachable(): its hostname and the path it can cover."""
    path = entry.match.path
    if path.type is model.PathMatchType.PATH_PREFIX:
        return entry.hostname, "prefix", _segments_prefix(path.value)
    return entry.hostname, path.type.value, path.value


def _covering_keys(entry: RouteEntry) -> Iterator[tuple[str | None, str, str]]:
    """Every index key under which an entry that covers this one can be filed (what covers() can accept)."""
    hostnames: list[str | None] = [None]
    if entry.hostname is not None:
        hostnames.append(entry.hostname)
        labels = entry.hostname.removeprefix("*.").split(".")
        hostnames += ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]
    path = entry.match.path
    if path.type is model.PathMatchType.REGULAR_EXPRESSION:
        prefixes = ["/"]
    else:
        segments = _segments_prefix(path.value).split("/")
        prefixes = ["/"] + ["/".join(segments[:i]) for i in range(2, len(segments) + 1)]
    for hostname in hostnames:
        yield hostname, path.type.value, path.value
        for prefix in prefixes:
            yield hostname, "prefix", prefix


def unreachable(m: model.Model) -> list[tuple[str, str, str]]:
    """(where, listener, shadowed by where) for each route match that another always takes first.

    Each entry is compared only with the earlier ones filed under a key that could cover it (its hostname or a
    wildcard or none; its path, a prefix of it, or "/"), so a thousand routes take milliseconds, not minutes."""
    out: dict[str, tuple[str, str, str]] = {}
    for listener in m.listeners:
        if listener.redirect_to_https:
            continue
        index: dict[tuple[str | None, str, str], list[tuple[int, RouteEntry]]] = {}
        for position, (_, entry) in enumerate(_entries(m, listener)):
            first: tuple[int, RouteEntry] | None = None
            for key in set(_covering_keys(entry)):
                for earlier_position, earlier in index.get(key, ()):
                    if first is not None and earlier_position > first[0]:
                        break
                    if earlier.where != entry.where and covers(earlier, entry):
                        first = (earlier_position, earlier)
                        break
            if first is not None:
                out.setdefault(entry.where, (entry.where, listener.name, first[1].where))
            index.setdefault(_index_key(entry), []).append((position, entry))
    return list(out.values())


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
