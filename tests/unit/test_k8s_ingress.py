"""Ingress objects into lbagent's HTTP model (pure: plain objects as the API serves them; the lab runs the same
through a real kube-apiserver and HAProxy). Each case ends where a user would look: the routes HAProxy gets, and
HAProxy's own verdict on the configuration (`haproxy -c`)."""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbagent import model
from lbagent.ops import artifacts, judge
from lbagent.sources.file import config
from lbagent.sources.kubernetes.source import Snapshot, build, merged, write_certificates
from tests.certs import TestCA

ADDRESS = "192.0.2.20"
CONTROLLER = "lbagent.io/ingress-controller"


def base_model(tmp_path: Path, pods_routable: bool = True) -> model.Model:
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump({
        "node": {"name": "lb1"}, "agent": {"runtimeDir": str(tmp_path / "run")},
        "bgp": {"localAS": 64512, "routerID": "198.51.100.11", "peers": [{"address": "198.51.100.1", "peerAS": 64500}]},
        "nodes": [{"name": "n1", "addresses": ["203.0.113.11"]}, {"name": "n2", "addresses": ["203.0.113.12"]}],
        "kubernetes": {"ingress": {"addresses": [ADDRESS]}, "podsRoutable": pods_routable},
    }))
    return config.load(path)


def ingress_class(name: str = "nginx", controller: str = CONTROLLER) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"controller": controller}}


def ingress(name: str, host: str | None, service: str, path: str = "/", path_type: str = "Prefix",
            annotations: dict[str, str] | None = None, class_name: str | None = "nginx", port: int = 8080,
            namespace: str = "default", created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    rule: dict[str, Any] = {"http": {"paths": [{"path": path, "pathType": path_type, "backend": {
        "service": {"name": service, "port": {"number": port}}}}]}}
    if host is not None:
        rule["host"] = host
    spec: dict[str, Any] = {"rules": [rule]}
    if class_name is not None:
        spec["ingressClassName"] = class_name
    return {"metadata": {"name": name, "namespace": namespace, "annotations": annotations or {},
                         "creationTimestamp": created}, "spec": spec}


def cluster_ip(name: str, port: int = 8080, namespace: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"type": "ClusterIP", "ports": [{"name": "http", "protocol": "TCP", "port": port,
                                                     "targetPort": 8080}]}}


def pods(service: str, addresses: list[str], namespace: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": f"{service}-abc", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}


def keyed(*objects: dict[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {(f"{o['metadata']['namespace']}/" if o["metadata"].get("namespace") else "") + o["metadata"]["name"]: o
            for o in objects}


def snapshot(ingresses: list[dict[str, Any]], services: list[dict[str, Any]], slices: list[dict[str, Any]],
             secrets: Sequence[dict[str, Any]] = (), classes: list[dict[str, Any]] | None = None) -> Snapshot:
    return Snapshot(keyed(*services), keyed(*slices), {}, keyed(*ingresses),
                    keyed(*(classes if classes is not None else [ingress_class()])), keyed(*secrets))


def haproxy_accepts(m: model.Model) -> None:
    verdicts = {v.judge.split()[0]: v for v in judge.judge(m)}
    verdict = verdicts["haproxy"]
    assert verdict.outcome is judge.Outcome.ACCEPTED, verdict


SEED_V1 = ingress("ingress-canary-v1", "kans.com", "svc-v1")
SEED_V2 = ingress("ingress-canary-v2", "kans.com", "svc-v2", annotations={
    "nginx.ingress.kubernetes.io/canary": "true", "nginx.ingress.kubernetes.io/canary-weight": "10"})


def seeds_snapshot(v2: dict[str, Any] = SEED_V2) -> Snapshot:
    return snapshot([SEED_V1, v2], [cluster_ip("svc-v1"), cluster_ip("svc-v2")],
                    [pods("svc-v1", ["198.51.100.31", "198.51.100.32"]), pods("svc-v2", ["198.51.100.41"])])


def test_the_seeds_canary_splits_kans_com_by_weight_to_the_pods(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    built = build(base, seeds_snapshot())
    assert not built.problems
    m = merged(base, built)
    (listener,) = m.listeners
    assert (listener.name, listener.vips, listener.port) == ("ingress-http", (ipaddress.ip_address(ADDRESS),), 80)
    (route,) = m.routes
    assert route.hostnames == ("kans.com",) and route.listeners == ("ingress-http",)
    (rule,) = route.rules
    assert [(r.name, r.weight) for r in rule.backend_refs] == [("default/svc-v1:8080", 90), ("default/svc-v2:8080", 10)]
    assert {b.name: [str(e) for e in b.endpoints] for b in m.backends} == {
        "default/svc-v1:8080": ["198.51.100.31:8080", "198.51.100.32:8080"],
        "default/svc-v2:8080": ["198.51.100.41:8080"]}
    assert built.http is not None and built.http.served == ["default/ingress-canary-v1", "default/ingress-canary-v2"]
    haproxy_accepts(m)


def test_annotating_the_weight_to_50_moves_half(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    v2 = json.loads(json.dumps(SEED_V2))
    v2["metadata"]["annotations"]["nginx.ingress.kubernetes.io/canary-weight"] = "50"
    (route,) = merged(base, build(base, seeds_snapshot(v2))).routes
    assert [r.weight for r in route.rules[0].backend_refs] == [50, 50]


def test_canary_header_beats_cookie_beats_weight(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    v2 = json.loads(json.dumps(SEED_V2))
    v2["metadata"]["annotations"].update({"nginx.ingress.kubernetes.io/canary-by-header": "X-Canary",
                                          "nginx.ingress.kubernetes.io/canary-by-cookie": "canary"})
    m = merged(base, build(base, seeds_snapshot(v2)))
    (route,) = m.routes
    got = [(r.matches[0].headers[0].name if r.matches[0].headers else None, [b.name for b in r.backend_refs])
           for r in route.rules]
    assert got == [("X-Canary", ["default/svc-v2:8080"]), ("X-Canary", ["default/svc-v1:8080"]),
                   ("Cookie", ["default/svc-v2:8080"]), ("Cookie", ["default/svc-v1:8080"]),
                   (None, ["default/svc-v1:8080", "default/svc-v2:8080"])]
    # the order HAProxy tests them in: header rules before the cookie's (a route's rules keep their order on a tie)
    doc = artifacts.plan_document(m)
    wheres = [r["where"] for r in doc["listeners"][0]["routes"]]
    order = ["by-header always", "by-header never", "by-cookie always", "by-cookie never", "weight 10/100"]
    assert len(wheres) == len(order)
    assert all(f"default/ingress-canary-v2: {o})" in w for o, w in zip(order, wheres, strict=True))
    haproxy_accepts(m)


def test_an_annotation_lbagent_does_not_implement_keeps_the_ingress_from_being_served(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    v1 = json.loads(json.dumps(SEED_V1))
    v1["metadata"]["annotations"]["nginx.ingress.kubernetes.io/auth-url"] = "https://auth.example.com/check"
    built = build(base, snapshot([v1], [cluster_ip("svc-v1")], [pods("svc-v1", ["198.51.100.31"])]))
    (problem,) = built.problems["Ingress default/ingress-canary-v1"]
    assert "auth-url" in problem.path and "not served" in problem.message
    assert built.http is not None and built.http.served == [] and merged(base, built).routes == ()


def test_only_ingresses_of_lbagents_classes(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    theirs = ingress("theirs", "a.example.com", "svc-v1", class_name="other")
    legacy = ingress("legacy", "b.example.com", "svc-v1", class_name=None,
                     annotations={"kubernetes.io/ingress.class": "nginx"})
    classless = ingress("classless", "c.example.com", "svc-v1", class_name=None)
    built = build(base, snapshot([theirs, legacy, classless], [cluster_ip("svc-v1")], [],
                                 classes=[ingress_class(), ingress_class("other", "k8s.io/ingress-nginx")]))
    assert built.http is not None and built.http.served == ["default/legacy"]


def test_a_missing_service_or_unroutable_pods_answer_503_with_a_reason(tmp_path: Path) -> None:
    base = base_model(tmp_path, pods_routable=False)
    built = build(base, snapshot([ingress("web", "web.example.com", "absent"),
                                  ingress("pods", "pods.example.com", "svc-v1")], [cluster_ip("svc-v1")], []))
    assert "no Service default/absent" in built.problems["Ingress default/web"][0].value
    assert "podsRoutable is false" in built.problems["Ingress default/pods"][0].value
    m = merged(base, built)
    assert all(not b.endpoints for b in m.backends)  # HAProxy answers 503 for them
    assert built.http is not None and built.http.served == ["default/pods", "default/web"]
    haproxy_accepts(m)


def test_a_nodeport_service_is_reached_through_the_nodes(tmp_path: Path) -> None:
    base = base_model(tmp_path, pods_routable=False)
    svc = {"metadata": {"name": "shop", "namespace": "default"},
           "spec": {"type": "NodePort", "ports": [{"name": "http", "protocol": "TCP", "port": 80, "nodePort": 30081}]}}
    built = build(base, snapshot([ingress("shop", "shop.example.com", "shop", port=80)], [svc], []))
    assert not built.problems
    m = merged(base, built)
    assert m.service("default/shop").vips == () and m.service("default/shop").ports[0].node_port == 30081
    assert m.routes[0].rules[0].backend_refs[0].kind is model.BackendKind.SERVICE
    doc = artifacts.plan_document(m)
    assert "203.0.113.11:30081" in str(doc["haproxy"]) and "203.0.113.12:30081" in str(doc["haproxy"])


def test_rewrite_target_takes_the_paths_capture_groups(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    fanout = ingress("fanout", "foo.bar.com", "svc-v1", path="/something(/|$)(.*)", path_type="ImplementationSpecific",
                     annotations={"nginx.ingress.kubernetes.io/rewrite-target": "/$2"})
    m = merged(base, build(base, snapshot([fanout], [cluster_ip("svc-v1")], [pods("svc-v1", ["198.51.100.31"])])))
    rule = m.routes[0].rules[0]
    assert rule.matches[0].path == model.PathMatch(model.PathMatchType.REGULAR_EXPRESSION, "(?i)/something(/|$)(.*).*")
    assert rule.rewrite is not None and rule.rewrite.path == model.PathModifier(
        model.PathModifierType.REGEX_REPLACE, "/\\2", pattern="(?i)/something(/|$)(.*)")
    assert "http-request replace-path '(?i)/something(/|$)(.*)' '/\\2'" in str(artifacts.plan_document(m)["haproxy"])
    haproxy_accepts(m)


def tls_secret(ca: TestCA, name: str, hosts: list[str]) -> dict[str, Any]:
    issued = ca.issue(name, hosts)
    return {"metadata": {"name": name, "namespace": "default"}, "type": "kubernetes.io/tls",
            "data": {"tls.crt": base64.b64encode(issued.cert_file.read_bytes()).decode(),
                     "tls.key": base64.b64encode(issued.key_file.read_bytes()).decode()}}


def test_tls_from_a_secret_is_served_on_https_and_http_redirects(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    ca = TestCA(tmp_path / "ca")
    tls = ingress("tls-example-ingress", "sslexample.foo.com", "svc-v1")
    tls["spec"]["tls"] = [{"hosts": ["sslexample.foo.com"], "secretName": "testsecret-tls"}]
    built = build(base, snapshot([tls], [cluster_ip("svc-v1")], [pods("svc-v1", ["198.51.100.31"])],
                                 secrets=[tls_secret(ca, "testsecret-tls", ["sslexample.foo.com"])]))
    assert not built.problems
    m = merged(base, built)
    https = next(lst for lst in m.listeners if lst.protocol is model.ListenerProtocol.HTTPS)
    assert https.port == 443 and len(https.certificates) == 1
    by_listener = {r.listeners[0]: r for r in m.routes}
    assert by_listener["ingress-https"].rules[0].backend_refs[0].name == "default/svc-v1:8080"
    redirect = by_listener["ingress-http"].rules[0].redirect
    assert redirect == model.Redirect(scheme="https", port=443, status_code=308)
    # each listener's route has its own HAProxy backend: the HTTP one redirects, the HTTPS one serves
    backends = {r["backend"] for listener in artifacts.plan_document(m)["listeners"] for r in listener["routes"]}
    assert len(backends) == 2
    assert built.http is not None
    write_certificates(base, built.http.certificates)
    (pem,) = built.http.certificates
    assert Path(pem).stat().st_mode & 0o777 == 0o600 and b"PRIVATE KEY" in Path(pem).read_bytes()
    haproxy_accepts(m)


def test_a_secret_whose_key_does_not_match_is_named_and_the_host_stays_on_http(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    ca = TestCA(tmp_path / "ca")
    secret = tls_secret(ca, "testsecret-tls", ["sslexample.foo.com"])
    other = tls_secret(ca, "other", ["sslexample.foo.com"])
    secret["data"]["tls.key"] = other["data"]["tls.key"]
    tls = ingress("tls-example-ingress", "sslexample.foo.com", "svc-v1")
    tls["spec"]["tls"] = [{"hosts": ["sslexample.foo.com"], "secretName": "testsecret-tls"}]
    built = build(base, snapshot([tls], [cluster_ip("svc-v1")], [pods("svc-v1", ["198.51.100.31"])],
                                 secrets=[secret]))
    (problem,) = built.problems["Ingress default/tls-example-ingress"]
    assert problem.path.endswith("spec.tls[0].secretName") and "does not belong" in problem.message
    m = merged(base, built)
    assert [lst.name for lst in m.listeners] == ["ingress-http"]
    assert m.routes[0].rules[0].redirect is None  # no certificate: served on HTTP rather than redirected to nothing


@pytest.mark.parametrize(("path_type", "kind"), [("Exact", model.PathMatchType.EXACT),
                                                 ("Prefix", model.PathMatchType.PATH_PREFIX),
                                                 ("ImplementationSpecific", model.PathMatchType.PATH_PREFIX)])
def test_path_types(tmp_path: Path, path_type: str, kind: model.PathMatchType) -> None:
    base = base_model(tmp_path)
    m = merged(base, build(base, snapshot([ingress("p", None, "svc-v1", path="/foo", path_type=path_type)],
                                          [cluster_ip("svc-v1")], [pods("svc-v1", ["198.51.100.31"])])))
    assert m.routes[0].hostnames == () and m.routes[0].rules[0].matches[0].path == model.PathMatch(kind, "/foo")


SEEDS = Path(__file__).resolve().parents[2] / "configs" / "kubernetes" / "canary"


def test_the_seeds_manifests_as_written_their_ingresses_name_the_target_port(tmp_path: Path) -> None:
    """configs/kubernetes/canary: the Services listen on 9001 and the Ingresses name 8080, the targetPort."""
    docs = [d for name in ("svc-v1.yaml", "svc-v2.yaml", "canary-ingress1.yaml", "canary-ingress2.yaml")
            for d in yaml.safe_load_all((SEEDS / name).read_text()) if d]
    for d in docs:
        d["metadata"].setdefault("namespace", "default")
    services = [d for d in docs if d["kind"] == "Service"]
    ingresses = [d for d in docs if d["kind"] == "Ingress"]
    assert {p["port"] for s in services for p in s["spec"]["ports"]} == {9001}
    slices = [pods("svc-v1", ["198.51.100.31"]), pods("svc-v2", ["198.51.100.41"])]
    for eps in slices:
        eps["ports"][0]["name"] = "web-port"
    base = base_model(tmp_path)
    built = build(base, snapshot(ingresses, services, slices))
    assert not built.problems
    (route,) = merged(base, built).routes
    assert [(r.name, r.weight) for r in route.rules[0].backend_refs] == [("default/svc-v1:9001", 90),
                                                                         ("default/svc-v2:9001", 10)]


def test_whitelist_source_range_admits_only_those_clients_and_a_bad_one_serves_nothing(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    v1 = json.loads(json.dumps(SEED_V1))
    v1["metadata"]["annotations"]["nginx.ingress.kubernetes.io/whitelist-source-range"] = "192.0.2.128/25, 198.51.100.7"
    m = merged(base, build(base, snapshot([v1, SEED_V2], [cluster_ip("svc-v1"), cluster_ip("svc-v2")],
                                          [pods("svc-v1", ["198.51.100.31"]), pods("svc-v2", ["198.51.100.41"])])))
    (rule,) = m.routes[0].rules
    assert [str(n) for n in rule.source_ranges] == ["192.0.2.128/25", "198.51.100.7/32"]
    assert "http-request deny deny_status 403 unless { src 192.0.2.128/25 198.51.100.7/32 }" in str(
        artifacts.plan_document(m)["haproxy"])
    haproxy_accepts(m)
    v1["metadata"]["annotations"]["nginx.ingress.kubernetes.io/whitelist-source-range"] = "192.0.2.128/25, nowhere"
    built = build(base, snapshot([v1], [cluster_ip("svc-v1")], [pods("svc-v1", ["198.51.100.31"])]))
    (problem,) = built.problems["Ingress default/ingress-canary-v1"]
    assert "'nowhere'" in problem.message and merged(base, built).routes == ()


def test_cookie_affinity_names_each_server_in_a_cookie(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    v1 = json.loads(json.dumps(SEED_V1))
    v1["metadata"]["annotations"].update({"nginx.ingress.kubernetes.io/affinity": "cookie",
                                          "nginx.ingress.kubernetes.io/session-cookie-name": "route",
                                          "nginx.ingress.kubernetes.io/session-cookie-max-age": "172800"})
    m = merged(base, build(base, snapshot([v1], [cluster_ip("svc-v1")],
                                          [pods("svc-v1", ["198.51.100.31", "198.51.100.32"])])))
    assert m.routes[0].rules[0].session_cookie == model.SessionCookie("route", 172800)
    text = str(artifacts.plan_document(m)["haproxy"])
    assert "cookie route insert indirect nocache httponly attr Max-Age=172800" in text
    assert "server 0_ep0 198.51.100.31:8080 weight 1 cookie 0_ep0" in text
    haproxy_accepts(m)
    v1["metadata"]["annotations"]["nginx.ingress.kubernetes.io/affinity"] = "ip"
    built = build(base, snapshot([v1], [cluster_ip("svc-v1")], [pods("svc-v1", ["198.51.100.31"])]))
    assert "affinity `cookie` only" in built.problems["Ingress default/ingress-canary-v1"][0].message


def test_backend_protocol_https_encrypts_to_the_pods(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    v1 = json.loads(json.dumps(SEED_V1))
    v1["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] = "HTTPS"
    m = merged(base, build(base, snapshot([v1], [cluster_ip("svc-v1")], [pods("svc-v1", ["198.51.100.31"])])))
    assert m.routes[0].rules[0].backend_refs[0].tls
    assert "server 0_ep0 198.51.100.31:8080 weight 1 ssl verify none" in str(artifacts.plan_document(m)["haproxy"])
    haproxy_accepts(m)
    v1["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] = "GRPC"
    built = build(base, snapshot([v1], [cluster_ip("svc-v1")], [pods("svc-v1", ["198.51.100.31"])]))
    assert merged(base, built).routes == () and "GRPC" in built.problems["Ingress default/ingress-canary-v1"][0].value


@pytest.mark.parametrize(("size", "limit"), [("8m", 8 * 1024**2), ("512k", 512 * 1024), ("1G", 1024**3), ("0", None)])
def test_proxy_body_size_refuses_larger_declared_bodies(tmp_path: Path, size: str, limit: int | None) -> None:
    base = base_model(tmp_path)
    v1 = json.loads(json.dumps(SEED_V1))
    v1["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] = size
    m = merged(base, build(base, snapshot([v1], [cluster_ip("svc-v1")], [pods("svc-v1", ["198.51.100.31"])])))
    assert m.routes[0].rules[0].max_body_bytes == limit
    text = str(artifacts.plan_document(m)["haproxy"])
    assert (f"http-request deny deny_status 413 if {{ req.hdr_val(content-length) gt {limit} }}" in text) == bool(limit)
    haproxy_accepts(m)
