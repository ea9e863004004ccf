"""Kubernetes objects (as the API serves them: JSON dicts) into lbagent's model. Pure: no client, no I/O.

What is translated, and what is deliberately not:
- A Service is lbagent's when it is `type: LoadBalancer` with `spec.loadBalancerClass` equal to lbagent's class.
  Its VIPs are the addresses in `status.loadBalancer.ingress` (the writer allocates them and writes them there;
  every LB node programs what status says), so a Service without them yet is not programmed, and not a problem.
- Nodes are backends unless being deleted, labelled `node.kubernetes.io/exclude-from-external-load-balancers`, or
  tainted `ToBeDeletedByClusterAutoscaler` (the upstream service controller's rules, KEP-3458); their readiness is
  left to lbagent's health checks, as upstream does.
- externalTrafficPolicy Local: the nodes with a ready endpoint in the Service's EndpointSlices (or, when no
  endpoint anywhere is ready, a serving one that is terminating, as kube-proxy falls back to). The plan takes a node
  only when this list has it AND its healthCheckNodePort probe passes (see docs/kubernetes.md for why both).
Every problem names the object and the field, and the value; a bad Service never affects another.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lbagent import model
from lbagent.sources import Problem

EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"
AUTOSCALER_TAINT = "ToBeDeletedByClusterAutoscaler"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"
DEFAULT_AFFINITY_TIMEOUT = 10800  # Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Settings:
    """What the translation takes from lbagent's own configuration."""

    load_balancer_class: str = "lbagent.io/lbagent"
    node_address_type: str = "InternalIP"
    health_check: model.HealthCheck = field(
        default_factory=lambda: model.HealthCheck(interval=2.0, timeout=1.0, rise=2, fall=3))
    forwarding_mode: model.ForwardingMode = model.ForwardingMode.MASQUERADE


def key_of(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))


def _problem(kind: str, obj: Obj, path: str, value: Any, message: str) -> Problem:
    return Problem(f"{kind} {key_of(obj)}: {path}", repr(value) if not isinstance(value, str) else value, message)


def is_ours(service: Obj, settings: Settings) -> bool:
    """A Service lbagent serves: type LoadBalancer of lbagent's class, not being deleted."""
    spec = service.get("spec") or {}
    return (spec.get("type") == "LoadBalancer" and spec.get("loadBalancerClass") == settings.load_balancer_class
            and not (service.get("metadata") or {}).get("deletionTimestamp"))


# ---- Nodes ------------------------------------------------------------------------------------------------------


def node_excluded(node: Obj) -> str | None:
    """Why a Node takes no load-balancer traffic, or None when it does."""
    meta = node.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return "being deleted"
    if EXCLUDE_LABEL in (meta.get("labels") or {}):
        return f"labelled {EXCLUDE_LABEL}"
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("key") == AUTOSCALER_TAINT:
            return f"tainted {AUTOSCALER_TAINT} (the cluster autoscaler is removing it)"
    return None


def translate_node(node: Obj, settings: Settings) -> tuple[model.Node | None, list[Problem]]:
    """A Node as a backend: its addresses of the configured type, one per family (the first of each)."""
    if node_excluded(node) is not None:
        return None, []
    addresses: dict[int, model.IPAddress] = {}
    problems = []
    for i, entry in enumerate((node.get("status") or {}).get("addresses") or []):
        if entry.get("type") != settings.node_address_type:
            continue
        try:
            address = ipaddress.ip_address(entry.get("address", ""))
        except ValueError:
            problems.append(_problem("Node", node, f"status.addresses[{i}].address", entry.get("address"),
                                     f"not an IP address ({settings.node_address_type})"))
            continue
        addresses.setdefault(address.version, address)
    if not addresses:
        problems.append(_problem("Node", node, "status.addresses", [a.get("type") for a in
                                 (node.get("status") or {}).get("addresses") or []],
                                 f"has no {settings.node_address_type} address: it takes no traffic"))
        return None, problems
    name = str((node.get("metadata") or {}).get("name"))
    return model.Node(name=name, addresses=tuple(addresses[v] for v in sorted(addresses))), problems


# ---- EndpointSlices -------------------------------------------------------------------------------------------


def endpoint_nodes(slices: Iterable[Obj]) -> tuple[str, ...]:
    """The nodes with a ready endpoint of the Service; when none is ready anywhere, those with a serving
    (terminating) one: kube-proxy sends Local traffic to terminating endpoints only when nothing else is left.
    A nil `ready` or `serving` counts as true, as the API documents."""
    ready: set[str] = set()
    serving: set[str] = set()
    for eps in slices:
        if eps.get("addressType") not in ("IPv4", "IPv6"):
            continue
        for endpoint in eps.get("endpoints") or []:
            node = endpoint.get("nodeName")
            if not node:
                continue
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is not False:
                ready.add(node)
            if conditions.get("serving", conditions.get("ready")) is not False:
                serving.add(node)
    return tuple(sorted(ready or serving))


# ---- Services ---------------------------------------------------------------------------------------------------


def status_ips(service: Obj) -> list[str]:
    """The addresses written in `status.loadBalancer.ingress` (hostnames are not addresses and are left out)."""
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return [str(entry["ip"]) for entry in ingress if entry.get("ip")]


def _source_ranges(service: Obj, problems: list[Problem]) -> tuple[model.IPNetwork, ...]:
    spec = service.get("spec") or {}
    ranges = spec.get("loadBalancerSourceRanges")
    path = "spec.loadBalancerSourceRanges"
    if not ranges:  # the field wins over the older annotation, as upstream
        text = ((service.get("metadata") or {}).get("annotations") or {}).get(SOURCE_RANGES_ANNOTATION)
        if text is None:
            return ()
        ranges = [r.strip() for r in str(text).split(",") if r.strip()]
        path = f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"
    out = []
    for i, text in enumerate(ranges):
        try:
            out.append(ipaddress.ip_network(str(text).strip(), strict=False))
        except ValueError:
            problems.append(_problem("Service", service, f"{path}[{i}]", text, "not a CIDR"))
    return tuple(out)


def translate_service(
    service: Obj, slices: Sequence[Obj], settings: Settings
) -> tuple[model.Service | None, list[Problem]]:
    """lbagent's Service into the model; None (with the reasons) when it cannot be served. A Service whose
    status holds no address yet is None without a problem: the writer has not given it one yet."""
    problems: list[Problem] = []
    spec = service.get("spec") or {}
    meta = service.get("metadata") or {}
    vips: list[model.IPAddress] = []
    for i, text in enumerate(status_ips(service)):
        try:
            vip = ipaddress.ip_address(text)
        except ValueError:
            problems.append(_problem("Service", service, f"status.loadBalancer.ingress[{i}].ip", text,
                                     "not an IP address"))
            continue
        if any(v.version == vip.version for v in vips):
            problems.append(_problem("Service", service, f"status.loadBalancer.ingress[{i}].ip", text,
                                     f"a second IPv{vip.version} address: lbagent serves one per family"))
            continue
        vips.append(vip)
    ports = []
    seen: set[tuple[str, int]] = set()
    for i, port in enumerate(spec.get("ports") or []):
        protocol = port.get("protocol", "TCP")
        if protocol not in ("TCP", "UDP"):
            problems.append(_problem("Service", service, f"spec.ports[{i}].protocol", protocol,
                                     "lbagent forwards TCP and UDP only"))
            continue
        node_port = port.get("nodePort")
        if not isinstance(node_port, int) or not 1 <= node_port <= 65535:
            problems.append(_problem("Service", service, f"spec.ports[{i}].nodePort", node_port,
                                     "no nodePort: lbagent forwards to the nodes' nodePorts (keep "
                                     "spec.allocateLoadBalancerNodePorts true)"))
            continue
        if (protocol, port.get("port")) in seen:
            continue
        seen.add((protocol, port.get("port")))
        ports.append(model.ServicePort(str(port.get("name") or ""), model.Protocol(protocol), int(port["port"]),
                                       node_port))
    policy = model.TrafficPolicy(spec.get("externalTrafficPolicy") or "Cluster") \
        if spec.get("externalTrafficPolicy") in (None, "Cluster", "Local") else None
    if policy is None:
        problems.append(_problem("Service", service, "spec.externalTrafficPolicy", spec.get("externalTrafficPolicy"),
                                 "must be Cluster or Local"))
    hc_port = spec.get("healthCheckNodePort")
    if policy is model.TrafficPolicy.LOCAL and not isinstance(hc_port, int):
        problems.append(_problem("Service", service, "spec.healthCheckNodePort", hc_port,
                                 "externalTrafficPolicy Local needs a healthCheckNodePort"))
    affinity = None
    if spec.get("sessionAffinity") == "ClientIP":
        affinity = int(((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
                       .get("timeoutSeconds") or DEFAULT_AFFINITY_TIMEOUT)
    ranges = _source_ranges(service, problems)
    if problems or not vips or not ports or policy is None:
        return None, problems
    local = policy is model.TrafficPolicy.LOCAL
    return model.Service(
        namespace=str(meta.get("namespace")), name=str(meta.get("name")), vips=tuple(vips), ports=tuple(ports),
        external_traffic_policy=policy, health_check=settings.health_check,
        health_check_node_port=hc_port if local else None, forwarding_mode=settings.forwarding_mode,
        session_affinity_timeout=affinity, source_ranges=ranges,
        endpoint_nodes=endpoint_nodes(slices) if local else None,
    ), problems
