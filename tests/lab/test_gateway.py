"""The Gateway API from a real kube-apiserver (with the Gateway API's own CRDs), served by both LB nodes' HAProxy
(issue 13): a Gateway gets its address from the pool and is announced by both LBs; an HTTPRoute exposes only `/get`
(other paths 404) with a header canary, a weighted split and a header modifier, another one a URL rewrite; each
measured from the lab's client and seen in the objects' status as kubectl shows it.

The lab plays the cluster as in test_ingress.py: the nodes' backends are host-network pods, one port per Service.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.k8s.apiserver import KubeAPIServer
from tests.k8s.objects import manifest, table
from tests.lab.kube import KubeLab, cluster_ip_service, curl_at, pod_slice, served_by_each_lb
from tests.lab.lab import LBS, Lab, wait_for
from tests.lab.traffic import Wrk, count_by_port

V1, V2 = 8091, 8092  # each version's pods answer on their own port of every node
LAB_SERVICES: list[dict[str, Any]] = [{"name": f"pods-{p}", "ports": [{"port": p, "nodePort": p}]} for p in (V1, V2)]
CONTROLLER = "lbagent.io/gateway-controller"
GATEWAY = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
           "metadata": {"name": "gw", "namespace": "default"},
           "spec": {"gatewayClassName": "lbagent", "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}]}}
HTTPBIN = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": "httpbin", "namespace": "default"},
           "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["httpbin.example.com"], "rules": [
               {"matches": [{"path": {"type": "PathPrefix", "value": "/get"},
                             "headers": [{"name": "X-Canary", "value": "true"}]}],
                "backendRefs": [{"name": "svc-v2", "port": 80}]},
               {"matches": [{"path": {"type": "PathPrefix", "value": "/get"}}],
                "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "Authorization", "value": "Bearer demo-token"}]}}],
                "backendRefs": [{"name": "svc-v1", "port": 80, "weight": 90},
                                {"name": "svc-v2", "port": 80, "weight": 10}]}]}}
REWRITE = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": "api", "namespace": "default"},
           "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["api.example.com"], "rules": [
               {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
                    "type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}],
                "backendRefs": [{"name": "svc-v1", "port": 80}]}]}}


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeLab]:
    workdir = tmp_path_factory.mktemp("gateway-lab")
    with KubeAPIServer(workdir / "api") as api, Lab(services=LAB_SERVICES, start_agents=False) as lab:
        lab.up()
        api.install_gateway_api()
        kube = KubeLab(lab, api, workdir, {"gateway": {"controllerName": CONTROLLER}, "podsRoutable": True})
        try:
            kube.start()
            api.kubectl("apply", "-f", "-", input=json.dumps({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": {"name": "lbagent"},
                "spec": {"controllerName": CONTROLLER}}))
            kube.apply(cluster_ip_service("svc-v1", {"http": (80, V1)}),
                       cluster_ip_service("svc-v2", {"http": (80, V2)}),
                       pod_slice("svc-v1", {"http": V1}), pod_slice("svc-v2", {"http": V2}))
            yield kube
        finally:
            kube.stop()


def gateway_address(kube: KubeLab) -> str | None:
    rows = table(kube.api.kubectl("get", "gateway", "gw").stdout)
    return rows[0]["ADDRESS"] if rows and rows[0]["PROGRAMMED"] == "True" and rows[0]["ADDRESS"] else None


def test_a_route_exposing_only_get_with_a_header_canary_a_split_and_a_header_modifier(kube: KubeLab) -> None:
    api, lab = kube.api, kube.lab
    api.kubectl("apply", "-f", "-", input=manifest(GATEWAY, HTTPBIN, REWRITE))
    address = wait_for(lambda: gateway_address(kube), 30, message="kubectl get gateway to show it PROGRAMMED")
    assert address is not None
    wait_for(lambda: kube.announced_by_both(address), 60, message=f"the router to hold {address} via both LBs")
    # served once both versions' pods passed their health checks (rise), on each LB
    wait_for(lambda: served_by_each_lb(lab, address, "http://httpbin.example.com/get", "-H", "X-Canary: true")
             and served_by_each_lb(lab, address, "http://api.example.com/api/x"), 30,
             message="httpbin.example.com/get served by both versions on both LBs")
    status, _, body = curl_at(lab, address, "http://httpbin.example.com/get?a=1")
    assert status == 200 and json.loads(body)["headers"]["authorization"] == "Bearer demo-token"
    assert curl_at(lab, address, "http://httpbin.example.com/post")[0] == 404  # only /get is exposed
    assert curl_at(lab, address, "http://httpbin.example.com/")[0] == 404
    assert count_by_port(lab, "httpbin.example.com", address, 100, {"X-Canary": "true"}, path="/get") == {str(V2): 100}
    counts = count_by_port(lab, "httpbin.example.com", address, 1000, path="/get")
    print(f"HTTPRoute weights 90/10: {counts} from the client")
    assert set(counts) == {str(V1), str(V2)} and 60 <= counts[str(V2)] <= 140, counts
    for lb in LBS:
        lb_counts = count_by_port(lab, "httpbin.example.com", address, 200, path="/get", source=lb)
        print(f"HTTPRoute weights 90/10: {lb_counts} at {lb}")
        assert 8 <= lb_counts.get(str(V2), 0) <= 32, (lb, lb_counts)
    status, _, body = curl_at(lab, address, "http://api.example.com/api/items?page=2")
    assert status == 200 and json.loads(body)["path"] == "/items?page=2" and json.loads(body)["port"] == V1
    route = json.loads(api.kubectl("get", "httproute", "httpbin", "-o", "json").stdout)
    (parent,) = route["status"]["parents"]
    assert {c["type"]: c["status"] for c in parent["conditions"]} == {"Accepted": "True", "ResolvedRefs": "True"}
    gateway = json.loads(api.kubectl("get", "gateway", "gw", "-o", "json").stdout)
    assert gateway["status"]["listeners"][0]["attachedRoutes"] == 2


def _metric(lab: Lab, lb: str, name: str) -> float:
    text = lab.exec(lb, ["curl", "-sS", "--noproxy", "*", "http://127.0.0.1:9469/metrics"]).stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def _served_on_both(lab: Lab, address: str, path: str) -> bool:
    return served_by_each_lb(lab, address, f"http://httpbin.example.com{path}")


def test_endpoint_and_route_changes_through_the_api_under_load_fail_no_request(kube: KubeLab) -> None:
    """100 EndpointSlice changes (a pod's readiness) and 20 HTTPRoute changes (a rule's path) made with kubectl
    while wrk runs: no request fails; how long an HTTPRoute change takes from the API to both LBs serving it."""
    api, lab = kube.api, kube.lab
    api.kubectl("apply", "-f", "-", input=manifest(GATEWAY, HTTPBIN, REWRITE))
    address = wait_for(lambda: gateway_address(kube), 30, message="the Gateway PROGRAMMED")
    assert address is not None
    wait_for(lambda: _served_on_both(lab, address, "/get"), 60, message="httpbin.example.com/get on both LBs")
    updates = "lbagent_haproxy_runtime_updates_total"
    latencies: list[float] = []
    route = json.loads(json.dumps(HTTPBIN))
    with Wrk(lab, f"http://{address}/get", "httpbin.example.com") as wrk:
        for i in range(100):
            before = {lb: _metric(lab, lb, updates) for lb in LBS}
            kube.apply(pod_slice("svc-v1", {"http": V1}, not_ready=frozenset({"node2"}) if i % 2 == 0 else frozenset()))
            wait_for(lambda: all(_metric(lab, lb, updates) > before[lb] for lb in LBS), 30,  # noqa: B023
                     message=f"EndpointSlice change {i + 1} on both LBs, as a runtime update")
            if i % 5 == 4:  # a third rule, for another path each time (the CRD allows 16 rules)
                path = f"/r{i}"
                route["spec"]["rules"][2:] = [{"matches": [{"path": {"type": "PathPrefix", "value": path}}],
                                               "backendRefs": [{"name": "svc-v1", "port": 80}]}]
                started = time.monotonic()
                kube.apply(route)
                wait_for(lambda: _served_on_both(lab, address, path), 30, 0.01,  # noqa: B023
                         message=f"route change {len(latencies) + 1} served by both LBs")
                latencies.append(time.monotonic() - started)
        assert wrk.running(), "wrk ran through every change"
        kube.apply(pod_slice("svc-v1", {"http": V1}))
        result = wrk.stop()
    latencies.sort()
    print(f"\nunder load: {result}; HTTPRoute change -> both LBs serving it: p50 {statistics.median(latencies):.2f} s,"
          f" p99 {latencies[-1]:.2f} s (max of {len(latencies)})")
    assert result["requests"] > 1000 and result["socket_errors"] == 0 and result["non_2xx"] == 0, \
        "\n".join([str(result), *wrk.failed])
