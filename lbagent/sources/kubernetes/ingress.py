"""Ingress objects (networking.k8s.io/v1) into lbagent's HTTP model: listeners, routes, backends. Pure but for the
certificate files it is handed to write (the caller writes them). ingress-nginx's behaviour is the reference, as
its users rely on it:

- An Ingress is lbagent's when its `spec.ingressClassName` (or the older annotation `kubernetes.io/ingress.class`)
  names an IngressClass whose `spec.controller` is lbagent's; with `watchIngressWithoutClass`, also one that names
  none.
- Every Ingress is served on the same addresses (`kubernetes.ingress.addresses`): an HTTP listener, and an HTTPS one
  when some Ingress has a usable TLS Secret. Paths of all Ingresses for one host are merged, Gateway API precedence
  deciding (Exact before the longest Prefix; a host before the host-less rules). Prefix matches whole path
  segments, as the Ingress API says; ImplementationSpecific is a Prefix, or a regular expression with `use-regex`
  or `rewrite-target` (ingress-nginx's rule).
- A host in an Ingress's `tls` is redirected from HTTP to HTTPS (308) unless `ssl-redirect: "false"`;
  `force-ssl-redirect: "true"` redirects without TLS too.
- A canary Ingress (`canary: "true"`) serves nothing of its own: its backend takes a share of the main Ingress's
  rule with the same host and path. Header first (`canary-by-header`: "always" or "never", or the value of
  `canary-by-header-value`, or a match of `canary-by-header-pattern`), then the cookie (`canary-by-cookie`:
  "always" or "never"), then the weight (`canary-weight` of `canary-weight-total`, default 100).
- `rewrite-target` replaces the whole path by the target, `$1`... taken from the path's capture groups, as nginx's
  `rewrite` does (a path of `/something(/|$)(.*)` and a target `/$2` strip the prefix).
- A backend's port names the Service's port by number or name, or (as ingress-nginx also accepts, and the seeds'
  manifests use) its targetPort. A backend Service with a nodePort for the port is reached through the nodes, as
  lbagent's own Services; a ClusterIP Service at its EndpointSlices' ready addresses when `kubernetes.podsRoutable`
  says the LB nodes route to the pod network. A backend lbagent cannot reach (no such Service or port, a ClusterIP
  Service without routable pods) answers 503 for its share, as ingress-nginx does, and the Ingress gets an Event
  saying why.
- An annotation of ingress-nginx that lbagent does not implement keeps the whole Ingress from being served (an
  Event names it): ignoring, say, an authentication annotation would expose what it protects.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lbagent import model, tls
from lbagent.sources import Problem
from lbagent.sources.kubernetes.httpcheck import rule_problems
from lbagent.sources.kubernetes.translate import endpoint_nodes, key_of

Obj = Mapping[str, Any]

CLASS_ANNOTATION = "kubernetes.io/ingress.class"
NGINX = "nginx.ingress.kubernetes.io/"
HTTP_LISTENER = "ingress-http"
HTTPS_LISTENER = "ingress-https"
TLS_SECRET_TYPE = "kubernetes.io/tls"
# ingress-nginx's default on HTTPS (its ConfigMap's hsts, hsts-max-age 15724800, hsts-include-subdomains)
INGRESS_HSTS = "max-age=15724800; includeSubDomains"

# ingress-nginx annotations lbagent implements (without the prefix)
SUPPORTED = frozenset({
    "canary", "canary-weight", "canary-weight-total", "canary-by-header", "canary-by-header-value",
    "canary-by-header-pattern", "canary-by-cookie", "rewrite-target", "use-regex", "ssl-redirect",
    "force-ssl-redirect", "whitelist-source-range", "allowlist-source-range", "affinity", "session-cookie-name",
    "session-cookie-max-age", "session-cookie-expires", "backend-protocol", "proxy-body-size",
})
# ... and those it does not, with why the Ingress is not served (others: "not implemented by lbagent")
NOT_YET: dict[str, str] = {
    "session-cookie-path": "the affinity cookie's path is not implemented by lbagent (HAProxy sets Path=/)",
}


@dataclass(frozen=True)
class Inputs:
    """The API's objects the translation reads (stores keyed `namespace/name`, classes by name)."""

    ingresses: Mapping[str, Obj]
    classes: Mapping[str, Obj]
    services: Mapping[str, Obj]
    slices: Mapping[str, Sequence[Obj]]  # by Service key
    secrets: Mapping[str, Obj]


@dataclass
class IngressBuilt:
    listeners: list[model.Listener] = field(default_factory=list)
    routes: list[model.Route] = field(default_factory=list)
    backends: list[model.StaticBackend] = field(default_factory=list)
    services: list[model.Service] = field(default_factory=list)  # backends reached through the nodes
    certificates: dict[str, bytes] = field(default_factory=dict)  # file path -> PEM (certificate chain, then key)
    problems: dict[str, list[Problem]] = field(default_factory=dict)  # "Ingress ns/name" -> problems
    served: list[str] = field(default_factory=list)  # Ingress keys served (their status gets the addresses)


def _problem(ingress: Obj, path: str, value: Any, message: str) -> Problem:
    return Problem(f"Ingress {key_of(ingress)}: {path}", value if isinstance(value, str) else repr(value), message)


def ingress_classes(classes: Mapping[str, Obj], controller: str) -> set[str]:
    return {name for name, c in classes.items() if (c.get("spec") or {}).get("controller") == controller}


def is_ours(ingress: Obj, ours: set[str], settings: model.IngressSettings) -> bool:
    meta = ingress.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    name = (ingress.get("spec") or {}).get("ingressClassName") or (meta.get("annotations") or {}).get(
        CLASS_ANNOTATION)
    return name in ours if name else settings.watch_without_class


def _annotations(ingress: Obj) -> dict[str, str]:
    annotations = (ingress.get("metadata") or {}).get("annotations") or {}
    return {k[len(NGINX):]: str(v) for k, v in annotations.items() if k.startswith(NGINX)}


def _bool(value: str | None) -> bool | None:
    return None if value is None else value.strip().lower() == "true"


@dataclass(frozen=True)
class _Canary:
    key: str
    backend: Obj  # the Ingress backend (service name, port)
    header: str | None
    header_value: str | None
    header_pattern: str | None
    cookie: str | None
    weight: int | None
    weight_total: int


@dataclass(frozen=True)
class _Path:
    """One path of an Ingress rule: where it is, how it matches, where it goes."""

    where: str
    host: str | None
    match: model.PathMatch
    backend: Obj
    rewrite: model.PathModifier | None
    source_ranges: tuple[model.IPNetwork, ...] = ()
    session_cookie: model.SessionCookie | None = None
    backend_tls: bool = False  # backend-protocol HTTPS
    max_body_bytes: int | None = None  # proxy-body-size


def _annotation_problems(ingress: Obj, annotations: Mapping[str, str]) -> list[Problem]:
    problems = []
    for name, value in sorted(annotations.items()):
        if name in SUPPORTED:
            continue
        problems.append(_problem(ingress, f"metadata.annotations[{NGINX}{name}]", value,
                                 NOT_YET.get(name, "not implemented by lbagent") + ": the Ingress is not served"))
    return problems


def _number(ingress: Obj, annotations: Mapping[str, str], name: str, problems: list[Problem],
            low: int, high: int) -> int | None:
    text = annotations.get(name)
    if text is None:
        return None
    if not (text.strip().isascii() and text.strip().isdigit()) or not low <= int(text) <= high:
        problems.append(_problem(ingress, f"metadata.annotations[{NGINX}{name}]", text,
                                 f"not a whole number from {low} to {high}"))
        return None
    return int(text)


def _canary(ingress: Obj, annotations: Mapping[str, str], problems: list[Problem]) -> _Canary | None:
    """The canary's settings; the backend is filled per path."""
    total = _number(ingress, annotations, "canary-weight-total", problems, 1, 1_000_000) or 100
    weight = _number(ingress, annotations, "canary-weight", problems, 0, 1_000_000)
    if weight is not None and weight > total:
        problems.append(_problem(ingress, f"metadata.annotations[{NGINX}canary-weight]", str(weight),
                                 f"more than canary-weight-total ({total})"))
    pattern = annotations.get("canary-by-header-pattern")
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(_problem(ingress, f"metadata.annotations[{NGINX}canary-by-header-pattern]", pattern,
                                     f"not a regular expression: {exc}"))
    return _Canary(key_of(ingress), {}, annotations.get("canary-by-header"), annotations.get("canary-by-header-value"),
                   pattern, annotations.get("canary-by-cookie"), weight, total)


def _source_ranges(ingress: Obj, annotations: Mapping[str, str], problems: list[Problem]
                   ) -> tuple[model.IPNetwork, ...] | None:
    """whitelist-source-range (or its newer name allowlist-source-range): CIDRs or addresses, comma-separated;
    None when one is malformed (the Ingress is then not served at all: never open what was meant to be closed)."""
    name = "allowlist-source-range" if "allowlist-source-range" in annotations else "whitelist-source-range"
    text = annotations.get(name)
    if text is None:
        return ()
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            problems.append(_problem(ingress, f"metadata.annotations[{NGINX}{name}]", text,
                                     f"{part!r} is not a CIDR or an address: the Ingress is not served"))
            return None
    return tuple(out)


def _session_cookie(ingress: Obj, annotations: Mapping[str, str], problems: list[Problem]
                    ) -> model.SessionCookie | bool | None:
    """`affinity: cookie` with its cookie's name and lifetime; False when the annotations cannot be met."""
    affinity = annotations.get("affinity")
    if affinity is None:
        return None
    if affinity != "cookie":
        problems.append(_problem(ingress, f"metadata.annotations[{NGINX}affinity]", affinity,
                                 "lbagent implements affinity `cookie` only: the Ingress is not served"))
        return False
    name = annotations.get("session-cookie-name", "INGRESSCOOKIE")
    if not re.fullmatch(r"[A-Za-z0-9!#$%&*+.^_`|~-]{1,64}", name):
        problems.append(_problem(ingress, f"metadata.annotations[{NGINX}session-cookie-name]", name,
                                 "not a cookie name: the Ingress is not served"))
        return False
    lifetime = annotations.get("session-cookie-max-age", annotations.get("session-cookie-expires"))
    if lifetime is not None and not (lifetime.isascii() and lifetime.isdigit()):
        problems.append(_problem(ingress, f"metadata.annotations[{NGINX}session-cookie-max-age]", lifetime,
                                 "not a number of seconds: the Ingress is not served"))
        return False
    return model.SessionCookie(name, int(lifetime) if lifetime else None)


def _paths(ingress: Obj, annotations: Mapping[str, str], problems: list[Problem]) -> list[_Path]:
    ranges = _source_ranges(ingress, annotations, problems)
    cookie = _session_cookie(ingress, annotations, problems)
    body = annotations.get("proxy-body-size")
    max_body: int | None = None
    if body is not None:
        size = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)\s*", body)
        if size is None:
            problems.append(_problem(ingress, f"metadata.annotations[{NGINX}proxy-body-size]", body,
                                     "not a size such as 8m, 512k or 0 (no limit): the Ingress is not served"))
            return []
        max_body = int(size.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[size.group(2).lower()] or None
    protocol = annotations.get("backend-protocol", "HTTP").upper()
    if protocol not in ("HTTP", "HTTPS"):
        problems.append(_problem(ingress, f"metadata.annotations[{NGINX}backend-protocol]", protocol,
                                 "lbagent speaks HTTP and HTTPS to backends: the Ingress is not served"))
    if ranges is None or cookie is False or protocol not in ("HTTP", "HTTPS"):
        return []
    session_cookie = cookie if isinstance(cookie, model.SessionCookie) else None
    regex = _bool(annotations.get("use-regex")) is True or "rewrite-target" in annotations
    target = annotations.get("rewrite-target")
    out = []
    for i, rule in enumerate((ingress.get("spec") or {}).get("rules") or []):
        host = rule.get("host") or None
        if host is not None and "*" in (host[2:] if host.startswith("*.") else host):
            problems.append(_problem(ingress, f"spec.rules[{i}].host", host, "a wildcard is allowed only as *.domain"))
            continue
        for j, entry in enumerate((rule.get("http") or {}).get("paths") or []):
            where = f"spec.rules[{i}].http.paths[{j}]"
            value = entry.get("path") or "/"
            kind = entry.get("pathType") or "ImplementationSpecific"
            if kind == "Exact" and not regex:
                match = model.PathMatch(model.PathMatchType.EXACT, value)
            elif kind in ("Prefix", "ImplementationSpecific", "Exact") and not regex:
                match = model.PathMatch(model.PathMatchType.PATH_PREFIX, value)
            elif kind in ("Prefix", "ImplementationSpecific", "Exact"):
                # ingress-nginx: a case-insensitive regular expression that must match from the start
                try:
                    re.compile(value)
                except re.error as exc:
                    problems.append(_problem(ingress, f"{where}.path", value, f"not a regular expression: {exc}"))
                    continue
                match = model.PathMatch(model.PathMatchType.REGULAR_EXPRESSION, f"(?i){value}.*")
            else:
                problems.append(_problem(ingress, f"{where}.pathType", kind,
                                         "must be Exact, Prefix or ImplementationSpecific"))
                continue
            if not value.startswith("/"):
                problems.append(_problem(ingress, f"{where}.path", value, "must start with /"))
                continue
            rewrite = None
            if target is not None:
                rewrite = model.PathModifier(model.PathModifierType.REGEX_REPLACE,
                                             re.sub(r"\$(\d)", r"\\\1", target), pattern=f"(?i){value}")
            out.append(_Path(where, host, match, entry.get("backend") or {}, rewrite, ranges, session_cookie,
                             protocol == "HTTPS", max_body))
    return out


@dataclass
class _Backends:
    """Resolves Ingress backends into model backend references, once per Service port."""

    inputs: Inputs
    settings: model.Kubernetes
    known: Mapping[str, model.Service]  # the model's Services already (lbagent's own, the file's)
    built: IngressBuilt
    target_port: bool = True  # a backend's port may name the targetPort (ingress-nginx's rule; not the Gateway API's)
    # the Gateway API's rule: a reference to what does not exist is invalid and its share answered 500 (ingress-nginx
    # answers 503 for it, as for a Service without endpoints)
    invalid_is_500: bool = False
    _refs: dict[tuple[str, str], tuple[model.BackendRef, str | None]] = field(default_factory=dict)
    _services: dict[str, model.Service] = field(default_factory=dict)

    def ref(self, namespace: str, backend: Obj, weight: int = 1, tls: bool = False
            ) -> tuple[model.BackendRef, str | None]:
        """The reference, and why its share will be answered 503 (None: it is served)."""
        service = backend.get("service") or {}
        name = str(service.get("name") or "")
        port = service.get("port") or {}
        wanted = str(port.get("number") if port.get("number") is not None else port.get("name") or "")
        if backend.get("resource"):
            found = self._empty(f"{namespace}/resource", "a resource backend is not implemented by lbagent")
        else:
            found = self._refs.get((f"{namespace}/{name}", wanted)) or self._resolve(namespace, name, wanted)
            self._refs[(f"{namespace}/{name}", wanted)] = found
        ref, why = found
        return model.BackendRef(ref.kind, ref.name, ref.port, weight, invalid=ref.invalid,
                                tls=tls and not ref.invalid), why

    def _empty(self, name: str, why: str, invalid: bool = True) -> tuple[model.BackendRef, str | None]:
        """A backend with no server (503), or with `invalid` under the Gateway API's rule a reference answered 500."""
        backend = f"ingress-unavailable:{name}"
        if all(b.name != backend for b in self.built.backends):
            self.built.backends.append(model.StaticBackend(backend, (), self.settings.health_check))
        return model.BackendRef(model.BackendKind.BACKEND, backend,
                                invalid=why if invalid and self.invalid_is_500 else None), why

    def _resolve(self, namespace: str, name: str, wanted: str) -> tuple[model.BackendRef, str | None]:
        key = f"{namespace}/{name}"
        obj = self.inputs.services.get(key)
        if obj is None:
            return self._empty(f"{key}:{wanted}", f"no Service {key}")
        spec = obj.get("spec") or {}
        ports = spec.get("ports") or []
        # ingress-nginx's rule, which users' manifests rely on: the Service's port, its name, or its targetPort
        port = next((p for p in ports if str(p.get("port")) == wanted or (p.get("name") or "") == wanted), None)
        if port is None and self.target_port:
            port = next((p for p in ports if str(p.get("targetPort")) == wanted), None)
        if port is None or port.get("protocol", "TCP") != "TCP":
            return self._empty(f"{key}:{wanted}", f"Service {key} has no TCP port {wanted}")
        if spec.get("type") == "ExternalName":
            return self._empty(f"{key}:{wanted}", f"Service {key} is ExternalName: not implemented by lbagent")
        if isinstance(port.get("nodePort"), int):
            service = self.known.get(key) or self._services.get(key) or next(
                (s for s in self.built.services if s.key == key), None) or self._via_nodes(obj)
            if service is not None:
                return model.BackendRef(model.BackendKind.SERVICE, key, int(port["port"])), None
        if not self.settings.pods_routable:
            return self._empty(f"{key}:{wanted}", invalid=False, why=f"Service {key} has no nodePort and "
                               "kubernetes.podsRoutable is false: the LB nodes cannot reach its pods")
        return self._via_pods(key, port)

    def _via_nodes(self, obj: Obj) -> model.Service | None:
        spec = obj.get("spec") or {}
        meta = obj.get("metadata") or {}
        local = spec.get("externalTrafficPolicy") == "Local"
        hc_port = spec.get("healthCheckNodePort")
        if local and not isinstance(hc_port, int):
            return None  # a NodePort Service with Local: which node serves is kube-proxy's secret; use its pods
        ports = tuple(model.ServicePort(str(p.get("name") or ""), model.Protocol.TCP, int(p["port"]),
                                        int(p["nodePort"]))
                      for p in spec.get("ports") or [] if p.get("protocol", "TCP") == "TCP"
                      and isinstance(p.get("nodePort"), int))
        key = key_of(obj)
        service = model.Service(
            namespace=str(meta.get("namespace")), name=str(meta.get("name")), vips=(), ports=ports,
            external_traffic_policy=model.TrafficPolicy.LOCAL if local else model.TrafficPolicy.CLUSTER,
            health_check=self.settings.health_check, health_check_node_port=hc_port if local else None,
            forwarding_mode=self.settings.forwarding_mode,
            endpoint_nodes=endpoint_nodes(self.inputs.slices.get(key, ())) if local else None)
        self._services[key] = service
        self.built.services.append(service)
        return service

    def _via_pods(self, key: str, port: Obj) -> tuple[model.BackendRef, str | None]:
        """The ready endpoints (else the serving ones) at the slice port of the same name."""
        name = port.get("name") or ""
        ready: list[model.Endpoint] = []
        serving: list[model.Endpoint] = []
        every: list[model.Endpoint] = []
        for eps in self.inputs.slices.get(key, ()):
            if eps.get("addressType") not in ("IPv4", "IPv6"):
                continue
            number = next((p.get("port") for p in eps.get("ports") or [] if (p.get("name") or "") == name
                           and p.get("protocol", "TCP") == "TCP"), None)
            if not isinstance(number, int):
                continue
            for endpoint in eps.get("endpoints") or []:
                conditions = endpoint.get("conditions") or {}
                for text in endpoint.get("addresses") or []:
                    try:
                        address = model.Endpoint(ipaddress.ip_address(text), number)
                    except ValueError:
                        continue
                    every.append(address)
                    if conditions.get("ready") is not False:
                        ready.append(address)
                    if conditions.get("serving", conditions.get("ready")) is not False:
                        serving.append(address)
        backend = f"{key}:{port.get('port')}"
        usable = set(ready or serving)
        # every endpoint is a server; those that may not take requests are down (a readiness change is then a
        # runtime update of HAProxy, not a reload)
        endpoints = tuple(sorted(usable | set(every), key=str))
        if all(b.name != backend for b in self.built.backends):  # the Ingresses' and the Gateways' share it
            self.built.backends.append(model.StaticBackend(backend, endpoints, self.settings.health_check,
                                                           frozenset(endpoints) - usable))
        why = None if usable else f"Service {key} has no ready endpoint"
        return model.BackendRef(model.BackendKind.BACKEND, backend), why


def _rules_for(path: _Path, namespace: str, backends: _Backends, canary: _Canary | None,
               problems: list[Problem], ingress: Obj) -> list[model.RouteRule]:
    """A path as model rules: the canary's header and cookie rules first (a route's rules keep their order when
    they tie), then the weighted split or the plain backend."""
    primary, why = backends.ref(namespace, path.backend, tls=path.backend_tls)
    if why is not None:
        problems.append(_problem(ingress, f"{path.where}.backend", why, "its requests are answered 503"))
    plain = model.RouteMatch(path=path.match)
    # what every rule of the path carries: the main Ingress's filters and limits
    common: dict[str, Any] = {
        "rewrite": model.URLRewrite(path=path.rewrite) if path.rewrite is not None else None,
        "source_ranges": path.source_ranges, "session_cookie": path.session_cookie,
        "max_body_bytes": path.max_body_bytes}
    if canary is None:
        return [model.RouteRule(path.where, (plain,), (primary,), **common)]
    second, why2 = backends.ref(canary.key.split("/", 1)[0], canary.backend, tls=path.backend_tls)
    if why2 is not None:
        problems.append(_problem(ingress, f"{path.where}.backend", why2,
                                 f"the canary Ingress {canary.key}'s backend: its share is answered 503"))
    rules: list[model.RouteRule] = []

    def on(header: model.ValueMatch, ref: model.BackendRef, suffix: str) -> None:
        rules.append(model.RouteRule(f"{path.where} (canary {canary.key}: {suffix})",
                                     (model.RouteMatch(path=path.match, headers=(header,)),), (ref,), **common))

    if canary.header is not None:
        if canary.header_value is not None:
            on(model.ValueMatch(canary.header, canary.header_value), second, "by-header-value")
        elif canary.header_pattern is not None:
            on(model.ValueMatch(canary.header, canary.header_pattern, model.ValueMatchType.REGULAR_EXPRESSION),
               second, "by-header-pattern")
        else:
            on(model.ValueMatch(canary.header, "always"), second, "by-header always")
            on(model.ValueMatch(canary.header, "never"), primary, "by-header never")
    if canary.cookie is not None:
        for value, ref in (("always", second), ("never", primary)):
            cookie = rf"(^|.*;\s*){re.escape(canary.cookie)}={value}(\s*;.*|$)"
            on(model.ValueMatch("Cookie", cookie, model.ValueMatchType.REGULAR_EXPRESSION), ref, f"by-cookie {value}")
    if canary.weight:
        refs = (replace(primary, weight=canary.weight_total - canary.weight), replace(second, weight=canary.weight))
        rules.append(model.RouteRule(f"{path.where} (canary {canary.key}: weight {canary.weight}/"
                                     f"{canary.weight_total})", (plain,), tuple(r for r in refs if r.weight),
                                     **common))
    else:
        rules.append(model.RouteRule(path.where, (plain,), (primary,), **common))
    return rules


def _route_key(path: _Path) -> tuple[str | None, model.PathMatch]:
    return path.host, path.match


def build_ingresses(inputs: Inputs, settings: model.Kubernetes, known: Mapping[str, model.Service],
                    cert_dir: Path) -> IngressBuilt:
    assert settings.ingress is not None
    ingress_settings = settings.ingress
    built = IngressBuilt()
    ours = ingress_classes(inputs.classes, ingress_settings.controller)
    backends = _Backends(inputs, settings, known, built)
    mine = sorted((o for o in inputs.ingresses.values() if is_ours(o, ours, ingress_settings)),
                  key=lambda o: (str((o.get("metadata") or {}).get("creationTimestamp") or ""), key_of(o)))
    mains: list[tuple[Obj, dict[str, str], list[_Path]]] = []
    canaries: dict[tuple[str | None, model.PathMatch], tuple[_Canary, Obj]] = {}
    for obj in mine:
        problems: list[Problem] = []
        annotations = _annotations(obj)
        refused = _annotation_problems(obj, annotations)
        if refused:
            built.problems[f"Ingress {key_of(obj)}"] = refused
            continue
        paths = _paths(obj, annotations, problems)
        if _bool(annotations.get("canary")):
            canary = _canary(obj, annotations, problems)
            if canary is not None and not problems:
                for path in paths:
                    canaries.setdefault(_route_key(path), (_Canary(**{**canary.__dict__, "backend": path.backend}),
                                                           obj))
        else:
            mains.append((obj, annotations, paths))
        if problems:
            built.problems[f"Ingress {key_of(obj)}"] = problems
    # TLS: every host in a served Ingress's tls, with its Secret
    certificates: list[model.Certificate] = []
    tls_hosts: set[str] = set()
    for obj, _, _ in mains:
        for i, entry in enumerate((obj.get("spec") or {}).get("tls") or []):
            secret = entry.get("secretName")
            if not secret:
                continue
            namespace = str((obj.get("metadata") or {}).get("namespace"))
            pem_path = _certificate(inputs, f"{namespace}/{secret}", cert_dir, built)
            if isinstance(pem_path, Problem):
                built.problems.setdefault(f"Ingress {key_of(obj)}", []).append(
                    _problem(obj, f"spec.tls[{i}].secretName", secret, pem_path.message))
                continue
            certificate = model.Certificate(pem_path, pem_path)
            if certificate not in certificates:
                certificates.append(certificate)
            tls_hosts.update(h for h in entry.get("hosts") or [] if isinstance(h, str))
    http_routes: list[model.Route] = []
    https_routes: list[model.Route] = []
    default_ref: model.BackendRef | None = None
    used_canaries: set[str] = set()
    for obj, annotations, paths in mains:
        key = key_of(obj)
        namespace = str((obj.get("metadata") or {}).get("namespace"))
        name = str((obj.get("metadata") or {}).get("name"))
        problems = built.problems.setdefault(f"Ingress {key}", [])
        default = (obj.get("spec") or {}).get("defaultBackend")
        if default is not None and not paths:
            if default_ref is None:
                default_ref, why = backends.ref(namespace, default)
                if why is not None:
                    problems.append(_problem(obj, "spec.defaultBackend", why, "its requests are answered 503"))
            else:
                problems.append(_problem(obj, "spec.defaultBackend", str(default), "an older Ingress's defaultBackend "
                                         "is the default already: not used"))
        force = _bool(annotations.get("force-ssl-redirect")) is True
        ssl_redirect = _bool(annotations.get("ssl-redirect")) is not False
        by_host: dict[str | None, list[model.RouteRule]] = {}
        for path in paths:
            found = canaries.get(_route_key(path))
            canary = found[0] if found else None
            if found:
                used_canaries.add(key_of(found[1]))
            for rule in _rules_for(path, namespace, backends, canary, problems, obj):
                if unwritable := rule_problems(rule):  # HAProxy could not take it: left out, and said why
                    problems.append(_problem(obj, path.where, "; ".join(unwritable), "not served"))
                    continue
                by_host.setdefault(path.host, []).append(rule)
        if default is not None and paths:
            for rules in by_host.values():
                ref, why = backends.ref(namespace, default)
                if why is not None:
                    problems.append(_problem(obj, "spec.defaultBackend", why, "its requests are answered 503"))
                rules.append(model.RouteRule("spec.defaultBackend", (model.RouteMatch(),), (ref,)))
        for n, (host, rules) in enumerate(by_host.items()):
            hostnames = (host,) if host else ()
            route_name = f"{name}.{n}" if len(by_host) > 1 else name
            secure = host is not None and any(tls.name_covers(h, host) for h in tls_hosts)
            if secure and certificates:
                # a name of its own: a route's name names its HAProxy backends, and the HTTP one redirects
                https_routes.append(model.Route(namespace, f"{route_name}.tls", (HTTPS_LISTENER,), hostnames,
                                                tuple(rules)))
            if (secure and certificates and ssl_redirect) or force:
                redirect = model.Redirect(scheme="https", port=ingress_settings.https_port, status_code=308)
                http_routes.append(model.Route(namespace, route_name, (HTTP_LISTENER,), hostnames, tuple(
                    model.RouteRule(f"{r.where} (ssl-redirect)", r.matches, redirect=redirect) for r in rules)))
            else:
                http_routes.append(model.Route(namespace, route_name, (HTTP_LISTENER,), hostnames, tuple(rules)))
        built.served.append(key)
    for _, obj in canaries.values():
        if key_of(obj) not in used_canaries:
            built.problems.setdefault(f"Ingress {key_of(obj)}", []).append(_problem(
                obj, "metadata.annotations[nginx.ingress.kubernetes.io/canary]", "true",
                "no main Ingress serves this host and path: the canary has nothing to take a share of"))
    for key in list(built.problems):
        if not built.problems[key]:
            del built.problems[key]
    built.served.extend(key_of(obj) for _, obj in canaries.values() if key_of(obj) in used_canaries)
    built.served = sorted(set(built.served))
    addresses = ingress_settings.addresses
    built.listeners.append(model.Listener(HTTP_LISTENER, addresses, ingress_settings.http_port,
                                          model.ListenerProtocol.HTTP, default_backend=default_ref))
    if certificates:
        built.listeners.append(model.Listener(HTTPS_LISTENER, addresses, ingress_settings.https_port,
                                              model.ListenerProtocol.HTTPS, tuple(certificates),
                                              default_backend=default_ref, hsts=INGRESS_HSTS))
    built.routes = http_routes + https_routes
    return built


def _certificate(inputs: Inputs, key: str, cert_dir: Path, built: IngressBuilt) -> str | Problem:
    """The path the Secret's certificate and key are written to (by the caller), or why it cannot be served."""
    secret = inputs.secrets.get(key)
    if secret is None:
        return Problem(key, key, f"no Secret {key} of type {TLS_SECRET_TYPE}")
    data = secret.get("data") or {}
    try:
        cert = base64.b64decode(data.get("tls.crt") or "", validate=True)
        private = base64.b64decode(data.get("tls.key") or "", validate=True)
    except ValueError:
        return Problem(key, key, f"Secret {key}: tls.crt or tls.key is not base64")
    if not cert or not private:
        return Problem(key, key, f"Secret {key} lacks tls.crt or tls.key")
    pair = tls.pair_of(cert, private, f"Secret {key} tls.crt", f"Secret {key} tls.key")
    if pair.problems:
        return Problem(key, key, "; ".join(f"{p.path}: {p.message}" for p in pair.problems))
    path = str(cert_dir / f"{key.replace('/', '__')}.pem")
    built.certificates[path] = tls.combine(pair).encode()
    return path
