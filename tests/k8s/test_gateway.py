"""The Gateway API part of lbagent's Kubernetes source against the real kube-apiserver with the Gateway API's own
CRDs (tests/k8s/crds.py), as lbagent's least-privilege user: a GatewayClass of lbagent's controller is Accepted; a
Gateway gets an address from the pool, PROGRAMMED as `kubectl get gateway` shows it, with each listener's attached
routes counted; an HTTPRoute is Accepted with its backends resolved, or says BackendNotFound and RefNotPermitted
until a ReferenceGrant allows the other namespace's Service; the routes become lbagent's."""

from __future__ import annotations

import ipaddress
import json
import uuid
from pathlib import Path
from typing import Any

from lbagent.sources.kubernetes.source import KubernetesSource
from tests.k8s import objects
from tests.k8s.apiserver import KubeAPIServer
from tests.k8s.test_source import config_file, run, until

POOL = "203.0.113.72/29"
CONTROLLER = "lbagent.io/gateway-controller"


def get(api: KubeAPIServer, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    where = ["-n", namespace] if namespace else []
    answer: dict[str, Any] = json.loads(api.kubectl("get", kind, name, *where, "-o", "json").stdout)
    return answer


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions") or []}


def route_conditions(api: KubeAPIServer, name: str, namespace: str) -> dict[str, tuple[str, str]]:
    parents = (get(api, "httproute", name, namespace).get("status") or {}).get("parents") or []
    ours = [p for p in parents if p["controllerName"] == CONTROLLER]
    return conditions(ours[0]) if ours else {}


def service(name: str, port: int = 9001) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"ports": [{"name": "web-port", "port": port, "targetPort": 8080}]}}


def test_a_gateway_and_its_routes_get_their_status(kube_apiserver: KubeAPIServer, namespace: str,
                                                   tmp_path: Path) -> None:
    api = kube_apiserver
    api.install_gateway_api()
    gateway_class = f"lbagent-{uuid.uuid4().hex[:6]}"
    api.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": {"name": gateway_class},
        "spec": {"controllerName": CONTROLLER}}))
    other = f"{namespace}-backends"
    api.kubectl("create", "namespace", other)
    api.kubectl("apply", "-n", namespace, "-f", "-", input=objects.manifest(
        service("svc-v1"), objects.endpoint_slice("svc-v1", {"198.51.100.31": "n1"}, port_name="web-port")))
    api.kubectl("apply", "-n", other, "-f", "-", input=objects.manifest(
        service("shared"), objects.endpoint_slice("shared", {"198.51.100.41": "n1"}, port_name="web-port")))
    api.kubectl("apply", "-n", namespace, "-f", "-", input=objects.manifest(
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "gw"},
         "spec": {"gatewayClassName": gateway_class,
                  "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}]}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "get-only"},
         "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["httpbin.example.com"],
                  "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/get"}}],
                             "backendRefs": [{"name": "svc-v1", "port": 9001}]}]}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "broken"},
         "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["broken.example.com"],
                  "rules": [{"backendRefs": [{"name": "absent", "port": 80}]}]}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "cross"},
         "spec": {"parentRefs": [{"name": "gw", "sectionName": "http"}], "hostnames": ["shared.example.com"],
                  "rules": [{"backendRefs": [{"name": "shared", "namespace": other, "port": 9001}]}]}}))

    async def scenario() -> None:
        source = KubernetesSource(config_file(tmp_path, api, pool=POOL, gateway={"controllerName": CONTROLLER},
                                              podsRoutable=True), "lb1")
        await source.start()
        try:
            await until("lb1 to hold the Lease", lambda: source.status()["writer"])
            await until("the GatewayClass Accepted", lambda: conditions(
                get(api, "gatewayclass", gateway_class).get("status") or {}).get("Accepted") == ("True", "Accepted"))
            gw = await until("the Gateway Programmed with an address", lambda: (
                g := get(api, "gateway", "gw", namespace)) and conditions(g.get("status") or {}).get(
                "Programmed") == ("True", "Programmed") and g)
            (address,) = [a["value"] for a in gw["status"]["addresses"]]
            assert ipaddress.ip_address(address) in ipaddress.ip_network(POOL)
            row = objects.table(api.kubectl("get", "gateway", "gw", "-n", namespace).stdout)[0]
            assert row["ADDRESS"] == address and row["PROGRAMMED"] == "True"
            (listener,) = gw["status"]["listeners"]
            assert listener["attachedRoutes"] == 3 and conditions(listener)["Programmed"][0] == "True"
            await until("get-only Accepted and resolved", lambda: route_conditions(api, "get-only", namespace) == {
                "Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")})
            # each route's status is a write of its own: wait for each
            await until("broken's backend not found", lambda: route_conditions(api, "broken", namespace).get(
                "ResolvedRefs") == ("False", "BackendNotFound"))
            await until("cross's reference not permitted", lambda: route_conditions(api, "cross", namespace).get(
                "ResolvedRefs") == ("False", "RefNotPermitted"))
            # the source's own store has the status once the watch brings back what the writer wrote
            m = await until("the source's model to hold the Gateway's listener", lambda: (
                m := source.load()) and any(lst.name == f"gateway:{namespace}/gw:80" for lst in m.listeners) and m)
            (model_listener,) = [lst for lst in m.listeners if lst.name == f"gateway:{namespace}/gw:80"]
            assert model_listener.vips == (ipaddress.ip_address(address),)
            routes = {r.hostnames: r for r in m.routes if r.namespace == namespace}
            assert routes[("httpbin.example.com",)].rules[0].matches[0].path.value == "/get"
            # the other namespace allows it: resolved
            api.kubectl("apply", "-n", other, "-f", "-", input=json.dumps({
                "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
                "metadata": {"name": "routes-from-" + namespace},
                "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                   "namespace": namespace}],
                         "to": [{"group": "", "kind": "Service"}]}}))
            await until("cross resolved by the ReferenceGrant", lambda: route_conditions(
                api, "cross", namespace).get("ResolvedRefs") == ("True", "ResolvedRefs"))
            await source.write()  # a pass still in flight (its write already seen above) ends first
            writes = source.status()["statusWrites"]
            await source.write()
            assert source.status()["statusWrites"] == writes  # nothing written again when nothing changed
        finally:
            await source.close()

    run(scenario)
