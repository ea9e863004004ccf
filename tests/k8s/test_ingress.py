"""The Ingress part of lbagent's Kubernetes source against the real kube-apiserver, as lbagent's least-privilege
user (deploy/kubernetes/rbac.yaml and rbac-http.yaml): the seeds' canary manifests applied verbatim with kubectl
become routes with their split, `kubectl annotate` moves it, the writer puts the Ingress address into their status
(`kubectl get ingress` shows it), and an annotation lbagent does not implement gets an Event naming it."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import yaml

from lbagent.sources.kubernetes.source import KubernetesSource
from tests.k8s import objects
from tests.k8s.apiserver import REPO, KubeAPIServer
from tests.k8s.test_source import config_file, run, until

ADDRESS = "192.0.2.20"
CANARY = REPO / "configs" / "kubernetes" / "canary"
INGRESS_CLASS = REPO / "configs" / "kubernetes" / "ingressclass-nginx.yaml"


def addresses(api: KubeAPIServer, namespace: str) -> dict[str, str]:
    """NAME -> ADDRESS as `kubectl get ingress` prints them."""
    return {row["NAME"]: row["ADDRESS"] for row in objects.table(api.kubectl("get", "ingress", "-n", namespace).stdout)}


def split(source: KubernetesSource, namespace: str) -> list[tuple[str, int]]:
    """The backends and weights of the route for kans.com in the namespace (empty while there is none)."""
    routes = [r for r in source.load().routes if r.namespace == namespace and r.hostnames == ("kans.com",)]
    return [(ref.name, ref.weight) for r in routes for rule in r.rules for ref in rule.backend_refs]


def test_the_seeds_canary_applied_with_kubectl(kube_apiserver: KubeAPIServer, namespace: str, tmp_path: Path) -> None:
    api = kube_apiserver
    api.kubectl("apply", "-f", str(INGRESS_CLASS))
    for name in ("svc-v1.yaml", "svc-v2.yaml", "canary-ingress1.yaml", "canary-ingress2.yaml"):
        api.kubectl("apply", "-n", namespace, "-f", str(CANARY / name))  # as written: no namespace in them
    api.kubectl("apply", "-n", namespace, "-f", "-", input=objects.manifest(
        objects.endpoint_slice("svc-v1", {"198.51.100.31": "n1", "198.51.100.32": "n2"}, port_name="web-port"),
        objects.endpoint_slice("svc-v2", {"198.51.100.41": "n1"}, port_name="web-port")))
    unsupported = yaml.safe_load((CANARY / "canary-ingress1.yaml").read_text())
    unsupported["metadata"] = {"name": "guarded", "annotations": {
        "nginx.ingress.kubernetes.io/auth-url": "https://auth.example.com/check"}}
    unsupported["spec"]["rules"][0]["host"] = "guarded.example.com"
    api.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(unsupported))

    async def scenario() -> None:
        source = KubernetesSource(config_file(tmp_path, api, ingress={"addresses": [ADDRESS]}, podsRoutable=True),
                                  "lb1")
        await source.start()
        try:
            await until("lb1 to hold the Lease", lambda: source.status()["writer"])
            shown = await until("kubectl get ingress to show the address of both",
                                lambda: (a := addresses(api, namespace))["ingress-canary-v1"] == ADDRESS
                                and a["ingress-canary-v2"] == ADDRESS and a)
            assert shown["guarded"] == ""  # not served: no address in its status
            assert split(source, namespace) == [(f"{namespace}/svc-v1:9001", 90), (f"{namespace}/svc-v2:9001", 10)]
            m = source.load()
            listener = next(lst for lst in m.listeners if lst.name == "ingress-http")
            assert listener.vips == (ipaddress.ip_address(ADDRESS),) and listener.port == 80
            api.kubectl("annotate", "--overwrite", "-n", namespace, "ingress", "ingress-canary-v2",
                        "nginx.ingress.kubernetes.io/canary-weight=50")
            await until("the split to follow the annotation", lambda: split(source, namespace) == [
                (f"{namespace}/svc-v1:9001", 50), (f"{namespace}/svc-v2:9001", 50)])
            await source.write()
            events = json.loads(api.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
            (refused,) = [e for e in events if e["involvedObject"]["name"] == "guarded"]
            assert refused["reason"] == "NotServed" and refused["involvedObject"]["kind"] == "Ingress"
            assert "nginx.ingress.kubernetes.io/auth-url" in refused["message"]
            assert "not served" in api.kubectl("describe", "ingress", "guarded", "-n", namespace).stdout
            await source.write()  # a pass still in flight (its write already seen above) ends first
            writes = source.status()["statusWrites"]
            await source.write()
            assert source.status()["statusWrites"] == writes  # each Ingress's status written once
        finally:
            await source.close()

    run(scenario)
