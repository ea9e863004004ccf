"""Gateway API objects into lbagent's model and their status (pure; tests/k8s runs the same against a real
kube-apiserver with the Gateway API's CRDs, tests/lab through HAProxy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbagent import model
from lbagent.l7 import render
from lbagent.ops import artifacts, judge
from lbagent.plan import http as plan_http
from lbagent.plan.services import all_healthy
from lbagent.sources.file import config
from lbagent.sources.kubernetes import gateway
from lbagent.sources.kubernetes.source import Snapshot, build, merged

GROUP = "gateway.networking.k8s.io"


def base_model(tmp_path: Path) -> model.Model:
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump({
        "node": {"name": "lb1"}, "agent": {"runtimeDir": str(tmp_path / "run")},
        "bgp": {"localAS": 64512, "routerID": "198.51.100.11", "peers": [{"address": "198.51.100.1", "peerAS": 64500}]},
        "kubernetes": {"pools": [{"name": "p", "addresses": ["203.0.113.64/29"]}], "gateway": {},
                       "podsRoutable": True},
    }))
    return config.load(path)


def gw(listeners: list[dict[str, Any]], address: str | None = "203.0.113.65", namespace: str = "default"
       ) -> dict[str, Any]:
    status = {"addresses": [{"type": "IPAddress", "value": address}]} if address else {}
    return {"metadata": {"name": "gw", "namespace": namespace, "generation": 1},
            "spec": {"gatewayClassName": "lbagent", "listeners": listeners}, "status": status}


def route(name: str, rules: list[dict[str, Any]], hostnames: list[str] | None = None,
          parent: dict[str, Any] | None = None, namespace: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "generation": 1},
            "spec": {"parentRefs": [parent or {"name": "gw", "namespace": "default"}],
                     "hostnames": hostnames or [], "rules": rules}}


def svc(name: str, namespace: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


def pods(name: str, address: str, namespace: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": f"{name}-x", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}]}


def keyed(*objects: dict[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {(f"{o['metadata']['namespace']}/" if o["metadata"].get("namespace") else "") + o["metadata"]["name"]: o
            for o in objects}


def snap(gateways: list[dict[str, Any]], routes: list[dict[str, Any]], grants: Sequence[dict[str, Any]] = ()
         ) -> Snapshot:
    services = [svc("v1"), svc("v2"), svc("other", "team")]
    slices = [pods("v1", "198.51.100.31"), pods("v2", "198.51.100.32"), pods("other", "198.51.100.33", "team")]
    lbagent = {"metadata": {"name": "lbagent", "generation": 1},
               "spec": {"controllerName": "lbagent.io/gateway-controller"}}
    return Snapshot(keyed(*services), keyed(*slices), {}, gateway_classes=keyed(lbagent), gateways=keyed(*gateways),
                    httproutes=keyed(*routes), grants=keyed(*grants))


HTTP = {"name": "http", "protocol": "HTTP", "port": 80}


def test_a_route_exposing_only_get_with_a_header_canary_split_rewrite_and_header_modifier(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    rules = [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/get"}, "headers": [{"name": "X-Canary",
                                                                                      "value": "true"}]}],
         "backendRefs": [{"name": "v2", "port": 80}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/get"}}],
         "filters": [{"type": "RequestHeaderModifier",
                      "requestHeaderModifier": {"set": [{"name": "Authorization", "value": "Bearer t"}]}},
                     {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                                                                     "replacePrefixMatch": "/anything"}}}],
         "backendRefs": [{"name": "v1", "port": 80, "weight": 50}, {"name": "v2", "port": 80, "weight": 50}],
         "timeouts": {"request": "10s", "backendRequest": "1500ms"}},
    ]
    built = build(base, snap([gw([HTTP])], [route("httpbin", rules, ["httpbin.example.com"])]))
    assert not built.problems
    m = merged(base, built)
    (listener,) = m.listeners
    assert listener.name == "gateway:default/gw:80" and [str(v) for v in listener.vips] == ["203.0.113.65"]
    (r,) = m.routes
    assert r.hostnames == ("httpbin.example.com",)
    canary, split = r.rules
    assert canary.matches[0].headers == (model.ValueMatch("X-Canary", "true"),)
    assert [(b.name, b.weight) for b in split.backend_refs] == [("default/v1:80", 50), ("default/v2:80", 50)]
    assert split.request_headers.set == (("Authorization", "Bearer t"),)
    assert split.rewrite == model.URLRewrite(path=model.PathModifier(model.PathModifierType.REPLACE_PREFIX_MATCH,
                                                                     "/anything"))
    assert (split.request_timeout, split.backend_request_timeout) == (10.0, 1.5)
    assert built.gateway is not None
    (parent,) = built.gateway.route_status["default/httpbin"]
    assert {c["type"]: c["status"] for c in parent["conditions"]} == {"Accepted": "True", "ResolvedRefs": "True"}
    status = built.gateway.gateway_status["default/gw"]
    assert status["listeners"][0]["attachedRoutes"] == 1
    verdicts = {v.judge.split()[0]: v for v in judge.judge(m)}
    assert verdicts["haproxy"].outcome is judge.Outcome.ACCEPTED, verdicts["haproxy"]
    # the runtime API addresses every server by the names the config gives them (a route named after
    # `default/gw` once put a `/` in a backend's name: the config had `_`, and every runtime update was refused)
    healthy = all_healthy(m)
    proxy = plan_http.plan_proxy(m, healthy, artifacts.certificate_paths(m))
    text = render.render(proxy, m.proxy, "/run/lbagent/haproxy.sock")
    for backend, server in proxy.runtime():
        assert f"\nbackend {backend}\n" in text and f" server {server} " in text, (backend, server)


@pytest.mark.parametrize(("listener", "route_names", "served"), [
    (None, [], ()),
    ("*.example.com", [], ("*.example.com",)),
    ("*.example.com", ["a.example.com", "b.example.org"], ("a.example.com",)),
    ("a.example.com", ["*.example.com"], ("a.example.com",)),
    ("a.example.com", ["b.example.com"], None),
])
def test_hostnames_intersect(tmp_path: Path, listener: str | None, route_names: list[str],
                             served: tuple[str, ...] | None) -> None:
    base = base_model(tmp_path)
    spec = {**HTTP, **({"hostname": listener} if listener else {})}
    built = build(base, snap([gw([spec])], [route("r", [{"backendRefs": [{"name": "v1", "port": 80}]}],
                                                   route_names)]))
    routes = merged(base, built).routes
    assert built.gateway is not None
    accepted = built.gateway.route_status["default/r"][0]["conditions"][0]
    if served is None:
        assert routes == () and (accepted["status"], accepted["reason"]) == ("False", "NoMatchingListenerHostname")
    else:
        assert routes[0].hostnames == served and accepted["status"] == "True"


def test_other_namespaces_need_the_listener_and_a_reference_grant(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    theirs = route("theirs", [{"backendRefs": [{"name": "other", "port": 80}]}], namespace="team")
    cross = route("cross", [{"backendRefs": [{"name": "other", "namespace": "team", "port": 80}]}])
    built = build(base, snap([gw([HTTP])], [theirs, cross]))
    assert built.gateway is not None
    assert built.gateway.route_status["team/theirs"][0]["conditions"][0]["reason"] == "NotAllowedByListeners"
    resolved = built.gateway.route_status["default/cross"][0]["conditions"][1]
    assert (resolved["status"], resolved["reason"]) == ("False", "RefNotPermitted")
    grant = {"metadata": {"name": "g", "namespace": "team"},
             "spec": {"from": [{"group": GROUP, "kind": "HTTPRoute", "namespace": "default"}],
                      "to": [{"group": "", "kind": "Service"}]}}
    everyone = {**HTTP, "allowedRoutes": {"namespaces": {"from": "All"}}}
    built = build(base, snap([gw([everyone])], [theirs, cross], [grant]))
    assert built.gateway is not None
    assert all(c["status"] == "True" for p in built.gateway.route_status.values() for c in p[0]["conditions"])


def test_a_gateway_without_an_address_is_not_programmed_and_serves_nothing(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    built = build(base, snap([gw([HTTP], address=None)], [route("r", [{"backendRefs": [{"name": "v1", "port": 80}]}])]))
    assert merged(base, built).listeners == ()
    assert built.gateway is not None
    programmed = built.gateway.gateway_status["default/gw"]["conditions"][1]
    assert (programmed["status"], programmed["reason"]) == ("False", "AddressNotAssigned")


def test_the_address_request_of_a_gateway() -> None:
    request, problems = gateway.address_request(gw([HTTP, {"name": "https", "protocol": "HTTPS", "port": 443}]))
    assert not problems and request is not None
    assert request.key == "Gateway default/gw" and request.ports == frozenset({("TCP", 80), ("TCP", 443)})
    asked = gw([HTTP])
    asked["spec"]["addresses"] = [{"type": "Hostname", "value": "lb.example.com"}]
    assert gateway.address_request(asked)[0] is None


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10.0), ("1500ms", 1.5), ("1m30s", 90.0), ("1h", 3600.0),
                                               ("", None), ("10", None), ("s", None)])
def test_durations(text: str, seconds: float | None) -> None:
    assert gateway._duration(text) == seconds


def test_an_invalid_backend_refs_share_is_answered_500_and_the_rest_is_served(tmp_path: Path) -> None:
    """The Gateway API: a backendRef that cannot be resolved keeps its share of requests, answered 500, while a
    Service without ready endpoints is a 503 (and gives its share to the others, as lbagent's routes do)."""
    base = base_model(tmp_path)
    rules = [{"backendRefs": [{"name": "v1", "port": 80, "weight": 3}, {"name": "absent", "port": 80, "weight": 1}]}]
    built = build(base, snap([gw([HTTP])], [route("r", rules)]))
    assert built.gateway is not None
    resolved = built.gateway.route_status["default/r"][0]["conditions"][1]
    assert (resolved["status"], resolved["reason"]) == ("False", "BackendNotFound")
    m = merged(base, built)
    proxy = plan_http.plan_proxy(m, all_healthy(m), {})
    (backend,) = proxy.backends
    assert backend.error_share == Fraction(1, 4) and [s.weight > 0 for s in backend.servers] == [True]
    text = render.render(proxy, m.proxy, "/run/lbagent/haproxy.sock")
    assert "http-request return status 500" in text and "if { rand(1000000) lt 250000 }" in text
    verdicts = {v.judge.split()[0]: v for v in judge.judge(m)}
    assert verdicts["haproxy"].outcome is judge.Outcome.ACCEPTED, verdicts["haproxy"]


def test_a_rule_haproxy_could_not_take_is_left_out_and_the_route_says_why(tmp_path: Path) -> None:
    """A quote in a header value, or a regex PCRE2 refuses, would make HAProxy refuse the whole config (and with it
    every later change): that rule is left out, the rest served, the route's condition says which and why."""
    base = base_model(tmp_path)
    rules = [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/ok"}}], "backendRefs": [{"name": "v1", "port": 80}]},
        {"matches": [{"headers": [{"name": "X-Note", "value": "it's"}]}], "backendRefs": [{"name": "v1", "port": 80}]},
        {"matches": [{"path": {"type": "RegularExpression", "value": "/\\N{LATIN SMALL LETTER A}"}}],
         "backendRefs": [{"name": "v1", "port": 80}]},
    ]
    built = build(base, snap([gw([HTTP])], [route("r", rules)]))
    m = merged(base, built)
    (r,) = m.routes
    assert [rule.matches[0].path.value for rule in r.rules] == ["/ok"]
    assert built.gateway is not None
    resolved = built.gateway.route_status["default/r"][0]["conditions"][1]
    assert (resolved["status"], resolved["reason"]) == ("False", "UnsupportedValue")
    assert "single quote" in resolved["message"] and "PCRE2" in resolved["message"]
    verdicts = {v.judge.split()[0]: v for v in judge.judge(m)}
    assert verdicts["haproxy"].outcome is judge.Outcome.ACCEPTED, verdicts["haproxy"]
