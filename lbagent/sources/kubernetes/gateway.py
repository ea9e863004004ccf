"""Gateway API objects (gateway.networking.k8s.io/v1, standard channel) into lbagent's HTTP model, and the status
they should show. Pure. What is lbagent's and how it is served:

- A GatewayClass is lbagent's when its `spec.controllerName` is lbagent's (`kubernetes.gateway.controllerName`);
  a Gateway of such a class is served on the addresses its status holds: the writer gives each Gateway its own
  address from the pools (or the one `spec.addresses` asks for), as for Services, and every LB node programs what the
  status says.
- Listeners: HTTP and HTTPS (TLS mode Terminate, certificateRefs to Secrets of type kubernetes.io/tls; another
  namespace's Secret needs a ReferenceGrant). Listeners of one Gateway on one port are one HAProxy listener; a
  listener's `hostname` narrows the routes attached to it (hostname intersection, as the spec says).
- HTTPRoutes attach by `parentRefs` (Gateway, optional `sectionName` and `port`) where the listener allows them
  (`allowedRoutes.namespaces.from`: Same, the default, or All; Selector is not implemented and says so). Their
  rules become lbagent's routes with Gateway API precedence: matches, RequestHeaderModifier,
  ResponseHeaderModifier, URLRewrite, RequestRedirect, timeouts, weighted backendRefs to Services (another
  namespace's needs a ReferenceGrant). A backendRef that cannot be resolved keeps its share of requests, which are
  answered with an error, and the route's ResolvedRefs condition says why.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbagent import model, tls
from lbagent.sources import Problem
from lbagent.sources.kubernetes.allocator import POOL_ANNOTATION, Request
from lbagent.sources.kubernetes.httpcheck import rule_problems
from lbagent.sources.kubernetes.ingress import IngressBuilt, _Backends, _certificate
from lbagent.sources.kubernetes.ingress import Inputs as IngressInputs
from lbagent.sources.kubernetes.translate import key_of

Obj = Mapping[str, Any]
GROUP = "gateway.networking.k8s.io"
HTTP_KINDS = [{"group": GROUP, "kind": "HTTPRoute"}]


@dataclass(frozen=True)
class GatewayInputs:
    classes: Mapping[str, Obj]  # GatewayClasses by name
    gateways: Mapping[str, Obj]
    routes: Mapping[str, Obj]  # HTTPRoutes
    grants: Mapping[str, Obj]  # ReferenceGrants
    services: Mapping[str, Obj]
    slices: Mapping[str, Sequence[Obj]]
    secrets: Mapping[str, Obj]


def condition(kind: str, ok: bool, reason: str, message: str, generation: Any) -> dict[str, Any]:
    """A status condition (lastTransitionTime is filled in by the writer)."""
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message[:32768],
            "observedGeneration": generation}


@dataclass
class GatewayBuilt:
    listeners: list[model.Listener] = field(default_factory=list)
    routes: list[model.Route] = field(default_factory=list)
    problems: dict[str, list[Problem]] = field(default_factory=dict)
    # the status each object should have (the writer applies it): GatewayClass name, "ns/name" of Gateways and
    # HTTPRoutes -> their status (conditions without lastTransitionTime)
    class_status: dict[str, dict[str, Any]] = field(default_factory=dict)
    gateway_status: dict[str, dict[str, Any]] = field(default_factory=dict)
    route_status: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # our entries of status.parents
    controller: str | None = None


def our_classes(classes: Mapping[str, Obj], controller: str) -> set[str]:
    return {name for name, c in classes.items() if (c.get("spec") or {}).get("controllerName") == controller}


def our_gateways(inputs: GatewayInputs, controller: str) -> list[Obj]:
    ours = our_classes(inputs.classes, controller)
    return sorted((g for g in inputs.gateways.values() if (g.get("spec") or {}).get("gatewayClassName") in ours
                   and not (g.get("metadata") or {}).get("deletionTimestamp")),
                  key=lambda g: (str((g.get("metadata") or {}).get("creationTimestamp") or ""), key_of(g)))


def status_addresses(gateway: Obj) -> list[model.IPAddress]:
    out = []
    for entry in (gateway.get("status") or {}).get("addresses") or []:
        if entry.get("type", "IPAddress") == "IPAddress":
            try:
                out.append(ipaddress.ip_address(str(entry.get("value"))))
            except ValueError:
                continue
    return out


def address_request(gateway: Obj) -> tuple[Request | None, list[Problem]]:
    """What a Gateway asks of the allocator: `spec.addresses` of type IPAddress, else one from the pools (the pool
    annotation of Services works here too); the listeners' ports must not clash with a shared address's."""
    meta = gateway.get("metadata") or {}
    spec = gateway.get("spec") or {}
    key = f"Gateway {key_of(gateway)}"
    problems: list[Problem] = []
    requested: list[model.IPAddress] = []
    for i, entry in enumerate(spec.get("addresses") or []):
        if entry.get("type", "IPAddress") != "IPAddress":
            problems.append(Problem(f"{key}: spec.addresses[{i}].type", str(entry.get("type")),
                                    "lbagent gives IPAddress addresses only"))
            continue
        try:
            requested.append(ipaddress.ip_address(str(entry.get("value"))))
        except ValueError:
            problems.append(Problem(f"{key}: spec.addresses[{i}].value", str(entry.get("value")),
                                    "not an IP address"))
    if problems:
        return None, problems
    ports = frozenset(("TCP", int(lst["port"])) for lst in spec.get("listeners") or []
                      if isinstance(lst.get("port"), int))
    families = tuple(a.version for a in requested) or (4,)
    return Request(key, families, True, tuple(requested), (meta.get("annotations") or {}).get(POOL_ANNOTATION), None,
                   ports, tuple(status_addresses(gateway)), str(meta.get("creationTimestamp") or ""),
                   "spec.addresses"), []


def _granted(grants: Mapping[str, Obj], from_kind: str, from_namespace: str, to_kind: str, to_namespace: str,
             to_name: str) -> bool:
    """Whether a ReferenceGrant in `to_namespace` lets `from_kind` objects of `from_namespace` refer to it."""
    for grant in grants.values():
        if (grant.get("metadata") or {}).get("namespace") != to_namespace:
            continue
        spec = grant.get("spec") or {}
        if not any(f.get("group", "") == (GROUP if from_kind != "Service" else "") and f.get("kind") == from_kind
                   and f.get("namespace") == from_namespace for f in spec.get("from") or []):
            continue
        if any(t.get("group", "") == ("" if to_kind in ("Service", "Secret") else GROUP) and t.get("kind") == to_kind
               and t.get("name") in (None, to_name) for t in spec.get("to") or []):
            return True
    return False


def _intersect(listener: str | None, route: Sequence[str]) -> list[str] | None:
    """The hostnames a route serves on a listener (the spec's intersection); [] means every host, None none."""
    if not route:
        return [listener] if listener else []
    if not listener:
        return list(route)
    out = []
    for name in route:
        if name == listener or (listener.startswith("*.") and not name.startswith("*.")
                                and tls.name_covers(listener, name)):
            out.append(name)
        elif name.startswith("*.") and not listener.startswith("*.") and tls.name_covers(name, listener):
            out.append(listener)
    return out or None


@dataclass(frozen=True)
class _Listener:
    gateway: str  # ns/name
    name: str
    port: int
    protocol: str
    hostname: str | None
    allowed_from: str  # Same | All


def _match(entry: Obj) -> model.RouteMatch:
    path = entry.get("path") or {}
    kind = {"Exact": model.PathMatchType.EXACT, "PathPrefix": model.PathMatchType.PATH_PREFIX,
            "RegularExpression": model.PathMatchType.REGULAR_EXPRESSION}.get(path.get("type", "PathPrefix"),
                                                                              model.PathMatchType.PATH_PREFIX)

    def values(items: Sequence[Obj]) -> tuple[model.ValueMatch, ...]:
        return tuple(model.ValueMatch(str(i.get("name")), str(i.get("value")),
                                      model.ValueMatchType.REGULAR_EXPRESSION if i.get("type") == "RegularExpression"
                                      else model.ValueMatchType.EXACT) for i in items)

    return model.RouteMatch(model.PathMatch(kind, str(path.get("value", "/"))), values(entry.get("headers") or []),
                            values(entry.get("queryParams") or []), entry.get("method"))


def _modifier(entry: Obj | None) -> model.HeaderModifier:
    entry = entry or {}
    return model.HeaderModifier(tuple((str(h["name"]), str(h["value"])) for h in entry.get("set") or []),
                                tuple((str(h["name"]), str(h["value"])) for h in entry.get("add") or []),
                                tuple(str(n) for n in entry.get("remove") or []))


def _path_modifier(entry: Obj | None) -> model.PathModifier | None:
    if not entry:
        return None
    if entry.get("type") == "ReplaceFullPath":
        return model.PathModifier(model.PathModifierType.REPLACE_FULL_PATH, str(entry.get("replaceFullPath")))
    return model.PathModifier(model.PathModifierType.REPLACE_PREFIX_MATCH, str(entry.get("replacePrefixMatch")))


def _duration(text: Any) -> float | None:
    """A Gateway API duration (`10s`, `500ms`, `1h`, `1m30s`)."""
    if not isinstance(text, str) or not text:
        return None
    total, number = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    i = 0
    while i < len(text):
        if text[i].isdigit():
            number += text[i]
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else text[i]
        if unit not in units or not number:
            return None
        total += int(number) * units[unit]
        number = ""
        i += len(unit)
    return total if not number else None


def build_gateways(inputs: GatewayInputs, settings: model.Kubernetes, known: Mapping[str, model.Service],
                   cert_dir: Path, built_http: IngressBuilt) -> GatewayBuilt:
    """Every Gateway of lbagent's classes and the HTTPRoutes attached to them. `built_http` collects the backends,
    Services and certificate files (shared with the Ingress part, so a Service has one backend)."""
    assert settings.gateway is not None
    controller = settings.gateway.controller_name
    out = GatewayBuilt(controller=controller)
    for name in sorted(our_classes(inputs.classes, controller)):
        generation = (inputs.classes[name].get("metadata") or {}).get("generation")
        out.class_status[name] = {"conditions": [condition("Accepted", True, "Accepted", "lbagent serves it",
                                                           generation)]}
    backends = _Backends(IngressInputs({}, {}, inputs.services, inputs.slices, inputs.secrets), settings, known,
                         built_http, target_port=False, invalid_is_500=True)
    listeners: list[_Listener] = []
    listener_conditions: dict[tuple[str, str], list[dict[str, Any]]] = {}
    model_listener: dict[tuple[str, int], model.Listener] = {}
    for gateway in our_gateways(inputs, controller):
        key = key_of(gateway)
        meta = gateway.get("metadata") or {}
        namespace, generation = str(meta.get("namespace")), meta.get("generation")
        addresses = tuple(status_addresses(gateway))
        certificates: dict[int, list[model.Certificate]] = {}
        for spec in (gateway.get("spec") or {}).get("listeners") or []:
            name, port, protocol = str(spec.get("name")), spec.get("port"), spec.get("protocol")
            conds: list[dict[str, Any]] = []
            ok = True
            if protocol not in ("HTTP", "HTTPS") or not isinstance(port, int):
                conds.append(condition("Accepted", False, "UnsupportedProtocol",
                                       f"lbagent serves HTTP and HTTPS listeners, not {protocol}", generation))
                ok = False
            allowed = ((spec.get("allowedRoutes") or {}).get("namespaces") or {}).get("from", "Same")
            if ok and allowed not in ("Same", "All"):
                conds.append(condition("Accepted", False, "UnsupportedValue",
                                       f"allowedRoutes.namespaces.from {allowed} is not implemented by lbagent",
                                       generation))
                ok = False
            if ok and protocol == "HTTPS":
                tls_spec = spec.get("tls") or {}
                refs = tls_spec.get("certificateRefs") or []
                found: list[model.Certificate] = []
                why = None
                if tls_spec.get("mode", "Terminate") != "Terminate" or not refs:
                    why = "an HTTPS listener needs tls.mode Terminate and certificateRefs"
                for ref in refs:
                    ref_ns = str(ref.get("namespace") or namespace)
                    if ref.get("kind", "Secret") != "Secret" or ref.get("group", "") != "":
                        why = f"certificateRef {ref.get('kind')} is not a Secret"
                        break
                    if ref_ns != namespace and not _granted(inputs.grants, "Gateway", namespace, "Secret", ref_ns,
                                                            str(ref.get("name"))):
                        why = f"Secret {ref_ns}/{ref.get('name')}: no ReferenceGrant allows it"
                        break
                    path = _certificate(IngressInputs({}, {}, {}, {}, inputs.secrets), f"{ref_ns}/{ref.get('name')}",
                                        cert_dir, built_http)
                    if isinstance(path, Problem):
                        why = path.message
                        break
                    found.append(model.Certificate(path, path))
                if why is not None:
                    conds.append(condition("ResolvedRefs", False, "InvalidCertificateRef", why, generation))
                    ok = False
                else:
                    certificates.setdefault(port, []).extend(c for c in found if c not in certificates.get(port, []))
            if ok:
                listeners.append(_Listener(key, name, port, protocol, spec.get("hostname"), allowed))
                conds += [condition("Accepted", True, "Accepted", "", generation),
                          condition("ResolvedRefs", True, "ResolvedRefs", "", generation)]
            listener_conditions[(key, name)] = conds
        ports = {(lst.port, lst.protocol) for lst in listeners if lst.gateway == key}
        for port, protocol in sorted(ports):
            if not addresses:
                continue
            listener = model.Listener(f"gateway:{key}:{port}", addresses, port, model.ListenerProtocol(protocol),
                                      tuple(certificates.get(port, ())))
            model_listener[(key, port)] = listener
            out.listeners.append(listener)
    attached: dict[tuple[str, str], int] = {}
    ours = {key_of(g) for g in our_gateways(inputs, controller)}  # once: every parentRef asks
    for route_key, route in sorted(inputs.routes.items()):
        _attach(route_key, route, inputs, listeners, model_listener, backends, controller, out, attached, ours)
    for gateway in our_gateways(inputs, controller):
        key = key_of(gateway)
        meta = gateway.get("metadata") or {}
        generation = meta.get("generation")
        assigned = status_addresses(gateway)
        statuses = []
        for spec in (gateway.get("spec") or {}).get("listeners") or []:
            name = str(spec.get("name"))
            conds = listener_conditions.get((key, name), [])
            programmed = bool(assigned) and all(c["status"] == "True" for c in conds)
            conds = [*conds, condition("Programmed", programmed, "Programmed" if programmed else "Pending",
                                       "" if programmed else "no address yet" if not assigned else "not accepted",
                                       generation)]
            statuses.append({"name": name, "supportedKinds": HTTP_KINDS, "attachedRoutes": attached.get((key, name), 0),
                             "conditions": conds})
        out.gateway_status[key] = {
            "addresses": [{"type": "IPAddress", "value": str(a)} for a in assigned],
            "conditions": [condition("Accepted", True, "Accepted", "", generation),
                           condition("Programmed", bool(assigned), "Programmed" if assigned else "AddressNotAssigned",
                                     "" if assigned else "no address from the pools yet", generation)],
            "listeners": statuses,
        }
    return out


def _attach(route_key: str, route: Obj, inputs: GatewayInputs, listeners: list[_Listener],
            model_listener: Mapping[tuple[str, int], model.Listener], backends: _Backends, controller: str,
            out: GatewayBuilt, attached: dict[tuple[str, str], int], ours: set[str]) -> None:
    meta = route.get("metadata") or {}
    spec = route.get("spec") or {}
    namespace, generation = str(meta.get("namespace")), meta.get("generation")
    hostnames = [str(h) for h in spec.get("hostnames") or []]
    parents: list[dict[str, Any]] = []
    for parent in spec.get("parentRefs") or []:
        if parent.get("group", GROUP) != GROUP or parent.get("kind", "Gateway") != "Gateway":
            continue
        gateway_key = f"{parent.get('namespace') or namespace}/{parent.get('name')}"
        if gateway_key not in ours:
            continue  # another controller's Gateway: its status entry is not ours to write
        candidates = [lst for lst in listeners if lst.gateway == gateway_key]
        ref = {k: v for k, v in parent.items() if v is not None}
        if parent.get("sectionName"):
            candidates = [lst for lst in candidates if lst.name == parent["sectionName"]]
        if isinstance(parent.get("port"), int):
            candidates = [lst for lst in candidates if lst.port == parent["port"]]
        same = gateway_key.partition("/")[0] == namespace
        allowed = [lst for lst in candidates if lst.allowed_from == "All" or same]
        served = [(lst, names) for lst in allowed if (names := _intersect(lst.hostname, hostnames)) is not None]
        conds: list[dict[str, Any]] = []
        if not candidates:
            conds.append(condition("Accepted", False, "NoMatchingParent", "no listener of the Gateway matches",
                                   generation))
        elif not allowed:
            conds.append(condition("Accepted", False, "NotAllowedByListeners",
                                   "the listeners do not allow routes from this namespace", generation))
        elif not served:
            conds.append(condition("Accepted", False, "NoMatchingListenerHostname",
                                   "no hostname of the route is a listener's", generation))
        else:
            conds.append(condition("Accepted", True, "Accepted", "", generation))
        rules, unresolved = _rules(route, namespace, inputs, backends) if served else ([], [])
        if served:
            conds.append(condition("ResolvedRefs", not unresolved, unresolved[0][0] if unresolved else "ResolvedRefs",
                                   "; ".join(m for _, m in unresolved), generation))
        parents.append({"parentRef": ref, "controllerName": controller, "conditions": conds})
        for n, (lst, names) in enumerate(served):
            attached[(lst.gateway, lst.name)] = attached.get((lst.gateway, lst.name), 0) + 1
            listener = model_listener.get((lst.gateway, lst.port))
            if listener is None or not rules:
                continue
            out.routes.append(model.Route(namespace, f"{meta.get('name')}.{lst.gateway}.{lst.name}.{n}",
                                          (listener.name,), tuple(names), tuple(rules)))
        if unresolved:
            out.problems.setdefault(f"HTTPRoute {route_key}", []).extend(
                Problem(f"HTTPRoute {route_key}: spec.rules", reason, message) for reason, message in unresolved)
    if parents:
        out.route_status[route_key] = parents


def _rules(route: Obj, namespace: str, inputs: GatewayInputs, backends: _Backends
           ) -> tuple[list[model.RouteRule], list[tuple[str, str]]]:
    rules: list[model.RouteRule] = []
    unresolved: list[tuple[str, str]] = []
    for i, rule in enumerate((route.get("spec") or {}).get("rules") or []):
        where = f"HTTPRoute {key_of(route)}: spec.rules[{i}]"
        matches = tuple(_match(m) for m in rule.get("matches") or [{}])
        request_headers = model.HeaderModifier()
        response_headers = model.HeaderModifier()
        rewrite = None
        redirect = None
        skip = False
        for f in rule.get("filters") or []:
            kind = f.get("type")
            if kind == "RequestHeaderModifier":
                request_headers = _modifier(f.get("requestHeaderModifier"))
            elif kind == "ResponseHeaderModifier":
                response_headers = _modifier(f.get("responseHeaderModifier"))
            elif kind == "URLRewrite":
                entry = f.get("urlRewrite") or {}
                rewrite = model.URLRewrite(entry.get("hostname"), _path_modifier(entry.get("path")))
            elif kind == "RequestRedirect":
                entry = f.get("requestRedirect") or {}
                redirect = model.Redirect(entry.get("scheme"), entry.get("hostname"), entry.get("port"),
                                          _path_modifier(entry.get("path")), int(entry.get("statusCode") or 302))
            elif kind == "RequestMirror":  # a copy for observation: the rule is served, only without the copy
                unresolved.append(("UnsupportedValue", f"spec.rules[{i}]: filter RequestMirror is not implemented "
                                                       "by lbagent (HAProxy 2.6 cannot mirror): served unmirrored"))
            else:  # a filter that may change what is served (ExtensionRef, CORS...): not served without it
                unresolved.append(("UnsupportedValue", f"spec.rules[{i}]: filter {kind} is not implemented by "
                                                       "lbagent: the rule is not served"))
                skip = True
        refs: list[model.BackendRef] = []
        for j, ref in enumerate(rule.get("backendRefs") or []):
            ref_ns = str(ref.get("namespace") or namespace)
            weight = int(ref.get("weight", 1))
            where_ref = f"spec.rules[{i}].backendRefs[{j}]"
            refused: tuple[str, str] | None = None
            if ref.get("group", "") != "" or ref.get("kind", "Service") != "Service":
                refused = ("InvalidKind", f"{where_ref}: {ref.get('kind')} is not a Service")
            elif ref_ns != namespace and not _granted(inputs.grants, "HTTPRoute", namespace, "Service", ref_ns,
                                                      str(ref.get("name"))):
                refused = ("RefNotPermitted", f"{where_ref}: Service {ref_ns}/{ref.get('name')}: no ReferenceGrant "
                                              "allows it")
            if refused is not None:
                unresolved.append(refused)
                if weight > 0:  # its share is answered 500
                    refs.append(model.BackendRef(model.BackendKind.BACKEND, "", None, weight, invalid=refused[1]))
                continue
            if weight <= 0:
                continue
            ref_obj = {"service": {"name": ref.get("name"), "port": {"number": ref.get("port")}}}
            backend, why = backends.ref(ref_ns, ref_obj, weight)
            if backend.invalid is not None:
                unresolved.append(("BackendNotFound", f"{where_ref}: {why}"))
            refs.append(backend)
        timeouts = rule.get("timeouts") or {}
        made = model.RouteRule(where, matches, tuple(refs) if redirect is None else (), request_headers,
                               response_headers, rewrite, redirect, _duration(timeouts.get("request")),
                               _duration(timeouts.get("backendRequest")))
        if unwritable := rule_problems(made):  # HAProxy could not take it: left out, and said why
            unresolved += [("UnsupportedValue", f"spec.rules[{i}].{p}") for p in unwritable]
            continue
        if not skip:
            rules.append(made)
    return rules, unresolved
