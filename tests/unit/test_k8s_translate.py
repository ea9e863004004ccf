"""Kubernetes objects into the model: which Services are lbagent's, Nodes as backends, Local from EndpointSlices,
and a problem naming object, field and value for everything that cannot be served (pure translation: plain
objects as the API serves them)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from lbagent import model
from lbagent.plan.services import Reason, plan
from lbagent.sources.kubernetes.translate import (
    AUTOSCALER_TAINT,
    EXCLUDE_LABEL,
    SOURCE_RANGES_ANNOTATION,
    Settings,
    endpoint_nodes,
    is_ours,
    translate_node,
    translate_service,
)

SETTINGS = Settings()


def service(**spec: Any) -> dict[str, Any]:
    status = spec.pop("status", ["192.0.2.10"])
    annotations = spec.pop("annotations", {})
    return {
        "metadata": {"namespace": "shop", "name": "web", "annotations": annotations},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "lbagent.io/lbagent",
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080}],
                 **spec},
        "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in status]}},
    }


def node(name: str, *addresses: tuple[str, str], labels: dict[str, str] | None = None,
         taints: list[dict[str, str]] | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-03T00:00:00Z"
    return {"metadata": meta, "spec": {"taints": taints or []},
            "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]}}


def endpoint_slice(*endpoints: tuple[str, dict[str, bool]], address_type: str = "IPv4") -> dict[str, Any]:
    return {"addressType": address_type, "endpoints": [
        {"addresses": ["198.51.100.21"], "nodeName": n, "conditions": c} for n, c in endpoints]}


def test_only_load_balancers_of_lbagents_class_not_being_deleted_are_ours() -> None:
    assert is_ours(service(), SETTINGS)
    assert not is_ours(service(loadBalancerClass="other.io/lb"), SETTINGS)
    assert not is_ours(service(loadBalancerClass=None), SETTINGS)
    assert not is_ours(service(type="NodePort"), SETTINGS)
    gone = service()
    gone["metadata"]["deletionTimestamp"] = "2026-12-03T00:00:00Z"
    assert not is_ours(gone, SETTINGS)


def test_a_service_with_its_status_address_becomes_a_model_service() -> None:
    s, problems = translate_service(
        service(status=["192.0.2.10", "2001:db8::10"], externalTrafficPolicy="Cluster", sessionAffinity="ClientIP",
                loadBalancerSourceRanges=["198.51.100.0/24"],
                ports=[{"name": "http", "protocol": "TCP", "port": 80, "nodePort": 30080},
                       {"name": "dns", "protocol": "UDP", "port": 53, "nodePort": 30053}]), [], SETTINGS)
    assert problems == [] and s is not None
    assert s.key == "shop/web" and s.vips == (ip_address("192.0.2.10"), ip_address("2001:db8::10"))
    assert s.ports == (model.ServicePort("http", model.Protocol.TCP, 80, 30080),
                       model.ServicePort("dns", model.Protocol.UDP, 53, 30053))
    assert s.session_affinity_timeout == 10800 and s.source_ranges == (ip_network("198.51.100.0/24"),)
    assert s.endpoint_nodes is None and s.external_traffic_policy is model.TrafficPolicy.CLUSTER


def test_no_address_in_status_yet_is_not_served_and_not_a_problem() -> None:
    assert translate_service(service(status=[]), [], SETTINGS) == (None, [])


@pytest.mark.parametrize("spec, path, text", [
    ({"ports": [{"protocol": "SCTP", "port": 9, "nodePort": 30009}]}, "spec.ports[0].protocol", "TCP and UDP only"),
    ({"ports": [{"protocol": "TCP", "port": 80}]}, "spec.ports[0].nodePort", "allocateLoadBalancerNodePorts"),
    ({"externalTrafficPolicy": "Local"}, "spec.healthCheckNodePort", "needs a healthCheckNodePort"),
    ({"loadBalancerSourceRanges": ["198.51.100.0/33"]}, "spec.loadBalancerSourceRanges[0]", "not a CIDR"),
    ({"annotations": {SOURCE_RANGES_ANNOTATION: "198.51.100.0/24, nope"}},
     f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}][1]", "not a CIDR"),
    ({"status": ["192.0.2.10", "192.0.2.11"]}, "status.loadBalancer.ingress[1].ip", "one per family"),
])
def test_what_cannot_be_served_is_refused_naming_object_field_and_value(spec: dict[str, Any], path: str,
                                                                         text: str) -> None:
    s, problems = translate_service(service(**spec), [], SETTINGS)
    assert s is None and len(problems) == 1
    assert str(problems[0]).startswith(f"Service shop/web: {path}") and text in str(problems[0])


def test_source_ranges_field_wins_over_the_annotation() -> None:
    s, _ = translate_service(service(loadBalancerSourceRanges=["198.51.100.0/24"],
                                     annotations={SOURCE_RANGES_ANNOTATION: "203.0.113.0/24"}), [], SETTINGS)
    assert s is not None and s.source_ranges == (ip_network("198.51.100.0/24"),)


def test_nodes_excluded_as_the_service_controller_excludes_them() -> None:
    internal = ("InternalIP", "203.0.113.11")
    assert translate_node(node("n1", internal, ("InternalIP", "2001:db8:c::11"), ("ExternalIP", "198.51.100.99")),
                          SETTINGS) == (model.Node("n1", (ip_address("203.0.113.11"), ip_address("2001:db8:c::11"))),
                                        [])
    assert translate_node(node("n2", internal, labels={EXCLUDE_LABEL: ""}), SETTINGS) == (None, [])
    assert translate_node(node("n3", internal, taints=[{"key": AUTOSCALER_TAINT, "effect": "NoSchedule"}]),
                          SETTINGS) == (None, [])
    assert translate_node(node("n4", internal, deleting=True), SETTINGS) == (None, [])
    external = Settings(node_address_type="ExternalIP")
    assert translate_node(node("n5", internal, ("ExternalIP", "198.51.100.99")), external)[0] == \
        model.Node("n5", (ip_address("198.51.100.99"),))
    none, problems = translate_node(node("n6", ("Hostname", "n6")), SETTINGS)
    assert none is None and "Node n6: status.addresses" in str(problems[0]) and "no InternalIP" in str(problems[0])


def test_local_nodes_are_those_with_ready_endpoints_else_serving_terminating_ones() -> None:
    ready, terminating = {"ready": True, "serving": True}, {"ready": False, "serving": True, "terminating": True}
    assert endpoint_nodes([endpoint_slice(("n1", ready), ("n2", terminating)), endpoint_slice(("n3", {}))]) == \
        ("n1", "n3")  # nil ready counts as ready
    assert endpoint_nodes([endpoint_slice(("n2", terminating), ("n3", {"ready": False, "serving": False}))]) == \
        ("n2",)
    assert endpoint_nodes([endpoint_slice(("n1", ready), address_type="FQDN")]) == ()


def test_local_traffic_goes_only_to_nodes_with_endpoints_and_a_passing_probe() -> None:
    ready = {"ready": True}
    s, problems = translate_service(service(externalTrafficPolicy="Local", healthCheckNodePort=32000),
                                    [endpoint_slice(("n1", ready), ("n2", ready))], SETTINGS)
    assert problems == [] and s is not None and s.endpoint_nodes == ("n1", "n2")
    nodes = tuple(model.Node(f"n{i}", (ip_address(f"203.0.113.1{i}"),)) for i in (1, 2, 3))
    m = model.Model("lb1", "lo", model.Bgp(64512, ip_address("198.51.100.11"), ()), nodes, (s,))  # type: ignore[arg-type]
    probes = {("shop/web", "n1"): True, ("shop/web", "n2"): False, ("shop/web", "n3"): True}
    (decision,) = plan(m, probes).decisions
    assert decision.healthy_nodes == ("n1",)  # n2: endpoints but its probe fails; n3: probe passes, no endpoints
    assert set(decision.unhealthy_nodes) == {"n2", "n3"}
    (nothing,) = plan(m, {**probes, ("shop/web", "n1"): False}).decisions
    assert not nothing.announce and nothing.reason is Reason.NO_LOCAL_ENDPOINTS
