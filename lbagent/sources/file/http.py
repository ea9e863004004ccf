"""The config file's HTTP layer: listeners, routes (Gateway API HTTPRoute) and static backends, with their checks."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BeforeValidator, Field, model_validator

from lbagent import model, routing, tls
from lbagent.sources import Problem
from lbagent.sources.file import pcre2
from lbagent.sources.file.base import (
    _NAME,
    CIDR,
    Duration,
    EndpointText,
    IPAddress,
    ListenAddress,
    Port,
    Strict,
    short,
)

# Gateway API hostnames: RFC 1123 names, optionally with one leading `*.` label; never an IP address.
_HOSTNAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
_HEADER_NAME = r"^[A-Za-z0-9!#$%&*+.^_`|~-]{1,256}$"  # an RFC 7230 token
# Values end up inside HAProxy's quoting: printable ASCII, never a single quote (HAProxy's strong quote).
_TEXT = r"^[\x20-\x26\x28-\x7e]{0,4096}$"
_PATH = r"^/[A-Za-z0-9._~!$&()*+,;=:@%/-]{0,1023}$"
_METHODS = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]

PathText = Annotated[str, Field(pattern=_PATH)]
Text = Annotated[str, Field(pattern=_TEXT)]
HeaderName = Annotated[str, Field(pattern=_HEADER_NAME)]
Hostname = Annotated[str, BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v), Field(pattern=_HOSTNAME,
                                                                                                  max_length=253)]


# ---- file models -------------------------------------------------------------------------------------------


class TimeoutsSection(Strict):
    connect: Duration = 5.0
    client: Duration = 60.0
    server: Duration = 60.0


class ProxySection(Strict):
    haproxy: str = Field("haproxy", description="the haproxy executable: a path, or a name looked up in PATH")
    metrics_address: ListenAddress | None = Field("127.0.0.1:9470", alias="metricsAddress")
    timeouts: TimeoutsSection = Field(default_factory=TimeoutsSection)
    max_connections: int = Field(8000, alias="maxConnections", ge=1, le=1_000_000)
    certificate_check_interval: Duration = Field(5.0, alias="certificateCheckInterval")
    server_connection_reuse: Literal["safe", "aggressive", "always"] = Field("safe", alias="serverConnectionReuse")
    trusted_proxies: list[CIDR] = Field([], alias="trustedProxies", max_length=64)
    max_request_header_bytes: int = Field(15360, alias="maxRequestHeaderBytes", ge=1024, le=1_048_576)
    max_request_headers: int = Field(100, alias="maxRequestHeaders", ge=1, le=32766)


class CertificateRef(Strict):
    cert_file: str = Field(alias="certFile", min_length=1)
    key_file: str | None = Field(None, alias="keyFile", min_length=1)


class HstsSection(Strict):
    """Strict-Transport-Security on every answer of an HTTPS listener (browsers then use HTTPS only)."""

    max_age: int = Field(31536000, alias="maxAge", ge=0, le=2 * 365 * 86400)  # seconds, as the header says them
    include_subdomains: bool = Field(False, alias="includeSubDomains")
    preload: bool = False

    def header(self) -> str:
        return f"max-age={self.max_age}" + ("; includeSubDomains" if self.include_subdomains else "") + (
            "; preload" if self.preload else "")


class TlsSection(Strict):
    default_certificate: CertificateRef | None = Field(None, alias="defaultCertificate")
    certificates: list[CertificateRef] = []
    hsts: HstsSection | None = None


class BackendRefEntry(Strict):
    kind: Literal["Service", "Backend"] = "Service"
    name: str = Field(pattern=_NAME)
    namespace: str | None = Field(None, pattern=_NAME)
    port: Port | None = None
    weight: int = Field(1, ge=0, le=1_000_000)
    proxy_protocol: bool = Field(False, alias="proxyProtocol")

    @model_validator(mode="after")
    def _port_for_services(self) -> BackendRefEntry:
        if self.kind == "Service" and self.port is None:
            raise ValueError("a Service backendRef needs the Service `port` (its nodePort is what HAProxy dials)")
        if self.kind == "Backend" and (self.port is not None or self.namespace is not None):
            raise ValueError("a Backend backendRef names a `backends` entry: no port or namespace")
        return self


class ListenerEntry(Strict):
    name: str = Field(pattern=_NAME)
    vip: IPAddress | None = None
    vips: list[IPAddress] | None = Field(None, min_length=1, max_length=2)
    port: Port
    protocol: Literal["HTTP", "HTTPS"] = "HTTP"
    tls: TlsSection | None = None
    redirect_to_https: int | bool | None = Field(None, alias="redirectToHTTPS")
    default_backend: BackendRefEntry | None = Field(None, alias="defaultBackend")
    proxy_protocol: bool = Field(False, alias="proxyProtocol")

    @model_validator(mode="after")
    def _shape(self) -> ListenerEntry:
        if (self.vip is None) == (self.vips is None):
            raise ValueError("give either `vip` (one address) or `vips` (one per family for dual stack)")
        if self.protocol == "HTTPS" and (self.tls is None or (self.tls.default_certificate is None
                                                               and not self.tls.certificates)):
            raise ValueError("an HTTPS listener needs tls.defaultCertificate or tls.certificates")
        if self.protocol == "HTTP" and self.tls is not None:
            raise ValueError("tls is for HTTPS listeners")
        if self.redirect_to_https is not None and self.protocol != "HTTP":
            raise ValueError("redirectToHTTPS is for HTTP listeners")
        if isinstance(self.redirect_to_https, int) and not isinstance(self.redirect_to_https, bool) \
                and not 1 <= self.redirect_to_https <= 65535:
            raise ValueError(f"redirectToHTTPS is true or an HTTPS port (got {self.redirect_to_https})")
        return self

    @property
    def all_vips(self) -> list[model.IPAddress]:
        return [self.vip] if self.vip is not None else list(self.vips or [])

    def certificate_refs(self) -> list[tuple[str, CertificateRef]]:
        """(field path below the listener, certificate), the default one first: the order HAProxy serves them."""
        if self.tls is None:
            return []
        first = [("tls.defaultCertificate", self.tls.default_certificate)] if self.tls.default_certificate else []
        return first + [(f"tls.certificates[{j}]", c) for j, c in enumerate(self.tls.certificates)]


class PathMatchEntry(Strict):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = Field("/", min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _value(self) -> PathMatchEntry:
        if self.type == "RegularExpression":
            if not re.fullmatch(_TEXT, self.value):
                raise ValueError("a regular expression of printable characters without a single quote")
        elif not re.fullmatch(_PATH, self.value):
            raise ValueError(f"a path starts with / and holds only URL path characters (got {self.value!r})")
        return self


class ValueMatchEntry(Strict):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: HeaderName
    value: Text


class MatchEntry(Strict):
    path: PathMatchEntry = Field(default_factory=PathMatchEntry)
    # at most 16 each, as in the Gateway API (and a routing line stays within HAProxy's 64 words)
    headers: list[ValueMatchEntry] = Field([], max_length=16)
    query_params: list[ValueMatchEntry] = Field([], alias="queryParams", max_length=16)
    method: _METHODS | None = None


class HeaderValue(Strict):
    name: HeaderName
    value: Text


class HeaderModifierEntry(Strict):
    set: list[HeaderValue] = []
    add: list[HeaderValue] = []
    remove: list[HeaderName] = []


class PathModifierEntry(Strict):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: PathText | None = Field(None, alias="replaceFullPath")
    replace_prefix_match: PathText | None = Field(None, alias="replacePrefixMatch")

    @model_validator(mode="after")
    def _one(self) -> PathModifierEntry:
        given = self.replace_full_path if self.type == "ReplaceFullPath" else self.replace_prefix_match
        other = self.replace_prefix_match if self.type == "ReplaceFullPath" else self.replace_full_path
        if given is None or other is not None:
            want = "replaceFullPath" if self.type == "ReplaceFullPath" else "replacePrefixMatch"
            raise ValueError(f"type {self.type} takes `{want}` and nothing else")
        return self

    def to_model(self) -> model.PathModifier:
        value = self.replace_full_path if self.type == "ReplaceFullPath" else self.replace_prefix_match
        return model.PathModifier(model.PathModifierType(self.type), value or "/")


class URLRewriteEntry(Strict):
    hostname: Hostname | None = None
    path: PathModifierEntry | None = None


class RedirectEntry(Strict):
    scheme: Literal["http", "https"] | None = None
    hostname: Hostname | None = None
    port: Port | None = None
    path: PathModifierEntry | None = None
    status_code: Literal[301, 302, 303, 307, 308] = Field(302, alias="statusCode")


_FILTER_FIELDS = {
    "RequestHeaderModifier": "request_header_modifier",
    "ResponseHeaderModifier": "response_header_modifier",
    "URLRewrite": "url_rewrite",
    "RequestRedirect": "request_redirect",
}


class FilterEntry(Strict):
    type: Literal["RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite", "RequestRedirect"]
    request_header_modifier: HeaderModifierEntry | None = Field(None, alias="requestHeaderModifier")
    response_header_modifier: HeaderModifierEntry | None = Field(None, alias="responseHeaderModifier")
    url_rewrite: URLRewriteEntry | None = Field(None, alias="urlRewrite")
    request_redirect: RedirectEntry | None = Field(None, alias="requestRedirect")

    @model_validator(mode="after")
    def _matching_body(self) -> FilterEntry:
        wanted = _FILTER_FIELDS[self.type]
        given = [f for f in _FILTER_FIELDS.values() if getattr(self, f) is not None]
        if given != [wanted]:
            alias = FilterEntry.model_fields[wanted].alias
            raise ValueError(f"a filter of type {self.type} carries `{alias}` and no other filter body")
        return self


class RuleTimeouts(Strict):
    request: Duration | None = None
    backend_request: Duration | None = Field(None, alias="backendRequest")


class RetryEntry(Strict):
    attempts: int = Field(3, ge=1, le=10)
    codes: list[Literal[401, 403, 404, 408, 425, 500, 501, 502, 503, 504]] = [502, 503, 504]


def _annotation_number(value: Any) -> Any:
    """Kubernetes annotations are strings: "10" is the number 10 there (ASCII digits only), and so is 10."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit() and len(value) <= 9):
            raise ValueError("expected a whole number (annotations write it as a string of digits, e.g. \"10\")")
        return int(value)
    return value


AnnotationNumber = Annotated[int, BeforeValidator(_annotation_number)]


class CanaryEntry(Strict):
    """ingress-nginx's canary annotations, under their own names or camelCase: a second backend that takes
    `weight` of `weightTotal` requests, and every request whose header says so."""

    backend_ref: BackendRefEntry = Field(alias="backendRef")
    weight: AnnotationNumber | None = Field(None, ge=0, validation_alias=AliasChoices(
        "weight", "canary-weight", "nginx.ingress.kubernetes.io/canary-weight"))
    weight_total: AnnotationNumber = Field(100, ge=1, le=1_000_000, validation_alias=AliasChoices(
        "weightTotal", "canary-weight-total", "nginx.ingress.kubernetes.io/canary-weight-total"))
    by_header: HeaderName | None = Field(None, validation_alias=AliasChoices(
        "byHeader", "canary-by-header", "nginx.ingress.kubernetes.io/canary-by-header"))
    by_header_value: Text | None = Field(None, validation_alias=AliasChoices(
        "byHeaderValue", "canary-by-header-value", "nginx.ingress.kubernetes.io/canary-by-header-value"))

    @model_validator(mode="after")
    def _sense(self) -> CanaryEntry:
        if self.weight is None and self.by_header is None:
            raise ValueError("a canary needs a weight, a header, or both")
        if self.weight is not None and self.weight > self.weight_total:
            raise ValueError(f"canary weight {self.weight} is more than weightTotal {self.weight_total}")
        if self.by_header_value is not None and self.by_header is None:
            raise ValueError("byHeaderValue needs byHeader")
        return self


class RuleEntry(Strict):
    matches: list[MatchEntry] = Field(default_factory=lambda: [MatchEntry()], min_length=1, max_length=64)
    filters: list[FilterEntry] = []
    backend_refs: list[BackendRefEntry] = Field([], alias="backendRefs")
    timeouts: RuleTimeouts = Field(default_factory=RuleTimeouts)
    retry: RetryEntry | None = None
    canary: CanaryEntry | None = None

    @model_validator(mode="after")
    def _filters(self) -> RuleEntry:
        kinds = [f.type for f in self.filters]
        for kind in set(kinds):
            if kinds.count(kind) > 1:
                raise ValueError(f"at most one {kind} filter per rule")
        redirect = "RequestRedirect" in kinds
        if redirect and "URLRewrite" in kinds:
            raise ValueError("a rule either redirects (RequestRedirect) or rewrites (URLRewrite), not both")
        if redirect and (self.backend_refs or self.canary):
            raise ValueError("a rule with RequestRedirect answers itself: it takes no backendRefs or canary")
        if not redirect and not self.backend_refs:
            raise ValueError("a rule needs backendRefs (or a RequestRedirect filter)")
        if self.canary is not None and len(self.backend_refs) != 1:
            raise ValueError("a canary splits one backendRef: give exactly one in backendRefs")
        if self._replaces_prefix():
            for k, match in enumerate(self.matches):
                if match.path.type != "PathPrefix":
                    raise ValueError(f"ReplacePrefixMatch replaces the PathPrefix that matched: every match of the "
                                     f"rule must be PathPrefix (matches[{k}].path.type is {match.path.type})")
        return self

    def _replaces_prefix(self) -> bool:
        for f in self.filters:
            body = f.url_rewrite or f.request_redirect
            if body is not None and body.path is not None and body.path.type == "ReplacePrefixMatch":
                return True
        return False


class RouteEntry(Strict):
    name: str = Field(pattern=_NAME)
    namespace: str = Field("default", pattern=_NAME)
    listeners: list[str] = Field(min_length=1)
    hostnames: list[Hostname] = []
    rules: list[RuleEntry] = Field(min_length=1, max_length=256)


class StaticBackendEntry(Strict):
    name: str = Field(pattern=_NAME)
    endpoints: list[EndpointText] = Field(min_length=1)
    health_check: Any = Field(None, alias="healthCheck")  # replaced by config.py with its HealthCheckSection


# ---- cross checks --------------------------------------------------------------------------------------------


def cross_checks(listeners: list[ListenerEntry], routes: list[RouteEntry], backends: list[StaticBackendEntry],
                 services: Mapping[str, tuple[int, set[int]]], l4_vips: set[str],
                 proxy: ProxySection | None = None) -> Iterator[Problem]:
    """Checks across listeners, routes and backends, and with the `proxy` section. `services`: key -> (index, its
    TCP ports)."""
    proxy = proxy if proxy is not None else ProxySection()
    seen: dict[str, int] = {}
    binds: dict[tuple[str, int], str] = {}
    for i, listener in enumerate(listeners):
        if listener.name in seen:
            yield Problem(f"listeners[{i}].name", short(listener.name),
                          f"duplicate listener name (also listeners[{seen[listener.name]}])")
        seen.setdefault(listener.name, i)
        field = "vip" if listener.vip is not None else "vips"
        for vip in listener.all_vips:
            if str(vip) in l4_vips:
                yield Problem(f"listeners[{i}].{field}", short(str(vip)),
                              "this VIP is a service's (forwarded in the kernel); a listener needs a VIP of its own")
            if vip.is_loopback or vip.is_multicast or vip.is_unspecified or vip.is_link_local:
                yield Problem(f"listeners[{i}].{field}", short(str(vip)), "a VIP must be a unicast, routable address")
            bind = (str(vip), listener.port)
            if bind in binds:
                yield Problem(f"listeners[{i}].port", str(listener.port),
                              f"{vip} port {listener.port} is already used by {binds[bind]}")
            binds.setdefault(bind, f"listener {listener.name}")
        if listener.default_backend is not None:
            yield from _check_ref(f"listeners[{i}].defaultBackend", listener.default_backend, "default",
                                  services, backends)
    backend_names: dict[str, int] = {}
    for i, backend in enumerate(backends):
        if backend.name in backend_names:
            yield Problem(f"backends[{i}].name", short(backend.name),
                          f"duplicate backend name (also backends[{backend_names[backend.name]}])")
        backend_names.setdefault(backend.name, i)
    route_keys: dict[str, int] = {}
    for i, route in enumerate(routes):
        key = f"{route.namespace}/{route.name}"
        if key in route_keys:
            yield Problem(f"routes[{i}].name", short(route.name),
                          f"duplicate route {key} (also routes[{route_keys[key]}])")
        route_keys.setdefault(key, i)
        for j, name in enumerate(route.listeners):
            if name not in seen:
                yield Problem(f"routes[{i}].listeners[{j}]", short(name),
                              f"no listener named {name!r} (have: {', '.join(seen) or 'none'})")
        for j, rule in enumerate(route.rules):
            where = f"routes[{i}].rules[{j}]"
            for k, ref in enumerate(rule.backend_refs):
                yield from _check_ref(f"{where}.backendRefs[{k}]", ref, route.namespace, services, backends)
            if rule.canary is not None:
                yield from _check_ref(f"{where}.canary.backendRef", rule.canary.backend_ref, route.namespace,
                                      services, backends)
            for k, match in enumerate(rule.matches):
                yield from _check_regexes(f"{where}.matches[{k}]", match)
            yield from _check_timeouts(where, rule, proxy.timeouts.connect)
            growth = routing.rewrite_growth(*_filter_models(rule)[:3])
            if routing.REWRITE_RESERVE + growth > proxy.max_request_header_bytes:
                yield Problem(f"{where}.filters", f"{growth} bytes added",
                              f"HAProxy keeps room in its buffer for what the filters add to headers, beside "
                              f"proxy.maxRequestHeaderBytes ({proxy.max_request_header_bytes}): it must be at least "
                              f"{routing.REWRITE_RESERVE + growth} for this rule")


def _check_ref(where: str, ref: BackendRefEntry, namespace: str, services: Mapping[str, tuple[int, set[int]]],
               backends: list[StaticBackendEntry]) -> Iterator[Problem]:
    if ref.kind == "Backend":
        names = [b.name for b in backends]
        if ref.name not in names:
            yield Problem(f"{where}.name", short(ref.name),
                          f"no backend named {ref.name!r} in `backends` (have: {', '.join(names) or 'none'})")
        return
    key = f"{ref.namespace or namespace}/{ref.name}"
    if key not in services:
        near = _nearest(key, services)
        hint = f"; did you mean {near}?" if near else ""
        yield Problem(f"{where}.name", short(ref.name), f"no service {key} in `services`{hint}")
        return
    index, ports = services[key]
    if ref.port not in ports:
        yield Problem(f"{where}.port", str(ref.port), f"service {key} (services[{index}]) has no TCP port {ref.port} "
                                                      f"(has: {', '.join(map(str, sorted(ports))) or 'none'})")


def _nearest(key: str, services: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(key, list(services), n=1, cutoff=0.75)
    return found[0] if found else None


def _check_regexes(where: str, match: MatchEntry) -> Iterator[Problem]:
    """Each regular expression as HAProxy will compile it (pcre2.py). lbagent itself never evaluates them: the
    reachability check compares them as text (a regex covers only the same regex), so no other dialect is involved."""
    regexes: list[tuple[str, str]] = []
    if match.path.type == "RegularExpression":
        regexes.append((f"{where}.path.value", match.path.value))
    for kind, values in (("headers", match.headers), ("queryParams", match.query_params)):
        regexes += [(f"{where}.{kind}[{n}].value", v.value) for n, v in enumerate(values)
                    if v.type == "RegularExpression"]
    for path, pattern in regexes:
        if (missing := pcre2.available()) is not None:
            yield Problem(path, short(pattern), f"cannot check this regular expression: {missing}")
            return
        try:
            pcre2.check(pattern)
        except pcre2.Pcre2Error as exc:
            yield Problem(path, short(pattern), f"invalid regular expression for HAProxy (PCRE2): {exc}")


def _check_timeouts(where: str, rule: RuleEntry, connect_timeout: float) -> Iterator[Problem]:
    """`backendRequest` (one attempt) within `request` (the whole request), and a `request` HAProxy's attempts
    can share (routing.attempt_timeouts)."""
    request, backend_request = rule.timeouts.request, rule.timeouts.backend_request
    if request is None:
        return
    if backend_request is not None and backend_request > request:
        yield Problem(f"{where}.timeouts.backendRequest", f"{backend_request:g}s",
                      f"one attempt cannot take longer than the whole request (timeouts.request is {request:g}s)")
        return
    retry = None if rule.retry is None else model.Retry(rule.retry.attempts, tuple(rule.retry.codes))
    try:
        routing.attempt_timeouts(request, backend_request, connect_timeout, retry)
    except ValueError as exc:
        yield Problem(f"{where}.timeouts.request", f"{request:g}s", str(exc))


def certificate_problems(where: str, cert: CertificateRef) -> Iterator[Problem]:
    """A certificate that cannot be served: missing, unreadable, not a certificate, a key that does not match it,
    or a private key readable by anyone but its owner root."""
    for problem in tls.check_pair(cert.cert_file, cert.key_file or cert.cert_file):
        yield Problem(f"{where}.{'keyFile' if problem.key and cert.key_file else 'certFile'}",
                      short(problem.path), problem.message)


def hostname_coverage(where: str, hostnames: Iterable[tuple[str, str]],
                      certs: list[CertificateRef]) -> Iterator[Problem]:
    """Every hostname a route serves on an HTTPS listener must be in one of its certificates."""
    names: list[str] = []
    for cert in certs:
        if Path(cert.cert_file).is_file():
            names += tls.certificate_names(cert.cert_file)
    if not names:
        return
    for path, hostname in hostnames:
        if not any(tls.name_covers(n, hostname) for n in names):
            yield Problem(path, short(hostname), f"no certificate of listener {where} covers this hostname "
                                                 f"(they cover: {', '.join(sorted(set(names)))})")


# ---- into the model ------------------------------------------------------------------------------------------


def proxy_model(section: ProxySection) -> model.Proxy:
    return model.Proxy(
        haproxy=section.haproxy, metrics_address=section.metrics_address,
        connect_timeout=section.timeouts.connect, client_timeout=section.timeouts.client,
        server_timeout=section.timeouts.server, max_connections=section.max_connections,
        certificate_check_interval=section.certificate_check_interval,
        server_connection_reuse=section.server_connection_reuse,
        trusted_proxies=tuple(section.trusted_proxies),
        max_request_header_bytes=section.max_request_header_bytes,
        max_request_headers=section.max_request_headers,
    )


def _ref(ref: BackendRefEntry, namespace: str, weight: int | None = None) -> model.BackendRef:
    if ref.kind == "Backend":
        return model.BackendRef(model.BackendKind.BACKEND, ref.name, None, ref.weight if weight is None else weight,
                                ref.proxy_protocol)
    return model.BackendRef(model.BackendKind.SERVICE, f"{ref.namespace or namespace}/{ref.name}", ref.port,
                            ref.weight if weight is None else weight, ref.proxy_protocol)


def _modifier(entry: HeaderModifierEntry | None) -> model.HeaderModifier:
    if entry is None:
        return model.HeaderModifier()
    return model.HeaderModifier(tuple((h.name, h.value) for h in entry.set),
                                tuple((h.name, h.value) for h in entry.add), tuple(entry.remove))


def _match(entry: MatchEntry) -> model.RouteMatch:
    return model.RouteMatch(
        path=model.PathMatch(model.PathMatchType(entry.path.type), entry.path.value),
        headers=tuple(model.ValueMatch(h.name, h.value, model.ValueMatchType(h.type)) for h in entry.headers),
        query_params=tuple(model.ValueMatch(q.name, q.value, model.ValueMatchType(q.type)) for q in entry.query_params),
        method=entry.method,
    )


def _filter_models(rule: RuleEntry) -> tuple[model.HeaderModifier, model.HeaderModifier, model.URLRewrite | None,
                                             model.Redirect | None]:
    """The rule's filters as the model has them: request and response header modifiers, rewrite, redirect."""
    filters = {f.type: f for f in rule.filters}
    rewrite = filters.get("URLRewrite")
    redirect = filters.get("RequestRedirect")
    r = redirect.request_redirect if redirect is not None else None
    return (
        _modifier(filters["RequestHeaderModifier"].request_header_modifier
                  if "RequestHeaderModifier" in filters else None),
        _modifier(filters["ResponseHeaderModifier"].response_header_modifier
                  if "ResponseHeaderModifier" in filters else None),
        None if rewrite is None or rewrite.url_rewrite is None else model.URLRewrite(
            rewrite.url_rewrite.hostname, rewrite.url_rewrite.path.to_model() if rewrite.url_rewrite.path else None),
        None if r is None else model.Redirect(
            r.scheme, r.hostname, r.port, r.path.to_model() if r.path else None, r.status_code),
    )


def _rules(where: str, rule: RuleEntry, namespace: str) -> list[model.RouteRule]:
    """One config rule as model rules: a canary adds the header rules ingress-nginx's annotations mean, and
    splits the main rule's traffic by weight."""
    request_headers, response_headers, rewrite, redirect = _filter_models(rule)
    common: dict[str, Any] = {
        "request_headers": request_headers,
        "response_headers": response_headers,
        "rewrite": rewrite,
        "redirect": redirect,
        "request_timeout": rule.timeouts.request,
        "backend_request_timeout": rule.timeouts.backend_request,
        "retry": None if rule.retry is None else model.Retry(rule.retry.attempts, tuple(rule.retry.codes)),
    }
    matches = tuple(_match(m) for m in rule.matches)
    canary = rule.canary
    if canary is None:
        return [model.RouteRule(where, matches, tuple(_ref(b, namespace) for b in rule.backend_refs), **common)]
    primary, second = rule.backend_refs[0], canary.backend_ref
    out = []

    def on_header(value: str, ref: BackendRefEntry, suffix: str) -> model.RouteRule:
        header = model.ValueMatch(canary.by_header or "", value)
        with_header = tuple(model.RouteMatch(m.path, (*m.headers, header), m.query_params, m.method) for m in matches)
        return model.RouteRule(f"{where}.canary.{suffix}", with_header, (_ref(ref, namespace, 1),), **common)

    if canary.by_header is not None and canary.by_header_value is not None:
        out.append(on_header(canary.by_header_value, second, "byHeaderValue"))
    elif canary.by_header is not None:
        out += [on_header("always", second, "byHeader"), on_header("never", primary, "byHeader")]
    if canary.weight is None:
        refs: tuple[model.BackendRef, ...] = (_ref(primary, namespace),)
    else:
        refs = (_ref(primary, namespace, canary.weight_total - canary.weight), _ref(second, namespace, canary.weight))
    out.append(model.RouteRule(where, matches, refs, **common))
    return out


def listeners_model(listeners: list[ListenerEntry]) -> tuple[model.Listener, ...]:
    out = []
    for listener in listeners:
        certs = [c for _, c in listener.certificate_refs()]
        redirect = listener.redirect_to_https
        out.append(model.Listener(
            name=listener.name, vips=tuple(listener.all_vips), port=listener.port,
            protocol=model.ListenerProtocol(listener.protocol),
            certificates=tuple(model.Certificate(c.cert_file, c.key_file or c.cert_file) for c in certs),
            redirect_to_https=(None if redirect is None or redirect is False
                               else 443 if redirect is True else redirect),
            default_backend=None if listener.default_backend is None else _ref(listener.default_backend, "default"),
            proxy_protocol=listener.proxy_protocol,
            hsts=listener.tls.hsts.header() if listener.tls is not None and listener.tls.hsts is not None else None,
        ))
    return tuple(out)


def routes_model(routes: list[RouteEntry]) -> tuple[model.Route, ...]:
    return tuple(
        model.Route(
            namespace=route.namespace, name=route.name, listeners=tuple(route.listeners),
            hostnames=tuple(route.hostnames),
            rules=tuple(r for j, rule in enumerate(route.rules)
                        for r in _rules(f"routes[{i}].rules[{j}]", rule, route.namespace)),
        )
        for i, route in enumerate(routes)
    )
