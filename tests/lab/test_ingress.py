"""Ingress objects from a real kube-apiserver, served by both LB nodes' HAProxy (issue 13): the seeds' manifests
applied with kubectl as their users wrote them (the canary, then its weight moved with `kubectl annotate`), the
Kubernetes documentation's TLS, simple fanout and virtual-host examples; each measured from the lab's client and
from each LB, and the status as `kubectl get ingress` shows it.

The lab plays the cluster: its nodes' backends stand in for the pods (an EndpointSlice's addresses are the nodes'
own, as host-network pods would be, on a port per Service, so an answer says which Service served it), and the
LB nodes route to them (`podsRoutable: true`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.certs import TestCA
from tests.k8s.apiserver import KubeAPIServer
from tests.k8s.objects import manifest, table
from tests.lab.kube import REPO, KubeLab, cluster_ip_service, curl_at, pod_slice, served_by_each_lb
from tests.lab.lab import LBS, Lab, wait_for
from tests.lab.traffic import count_by_port

ADDRESS = "192.0.2.20"
CANARY = REPO / "configs" / "kubernetes" / "canary"
EXAMPLES = REPO / "configs" / "kubernetes" / "examples"
# each Service's pods answer on their own port of every node
PODS = {"svc-v1": 8081, "svc-v2": 8082, "service1": 8083, "service2": 8084, "service3": 8085}
LAB_SERVICES: list[dict[str, Any]] = [{"name": f"pods-{name}", "ports": [{"port": port, "nodePort": port}]}
                                      for name, port in PODS.items()]


def pods(service: str, port_names: tuple[str, ...]) -> dict[str, Any]:
    """The Service's EndpointSlice: a ready pod on every node, on the Service's pod port under each port name."""
    return pod_slice(service, dict.fromkeys(port_names, PODS[service]))


def cluster_ip(name: str, ports: dict[str, int]) -> dict[str, Any]:
    return cluster_ip_service(name, {n: (p, PODS[name]) for n, p in ports.items()})


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeLab]:
    workdir = tmp_path_factory.mktemp("ingress-lab")
    with KubeAPIServer(workdir / "api") as api, Lab(services=LAB_SERVICES, start_agents=False) as lab:
        lab.up()
        kube = KubeLab(lab, api, workdir, {"ingress": {"addresses": [ADDRESS]}, "podsRoutable": True})
        try:
            kube.start()
            api.kubectl("apply", "-f", str(REPO / "configs" / "kubernetes" / "ingressclass-nginx.yaml"))
            yield kube
        finally:
            kube.stop()


def shown_address(kube: KubeLab, name: str) -> str:
    rows = [r for r in objects_table(kube, "ingress") if r["NAME"] == name]
    return rows[0]["ADDRESS"] if rows else ""


def objects_table(kube: KubeLab, kind: str) -> list[dict[str, str]]:
    return table(kube.api.kubectl("get", kind).stdout)


def served_by_both(kube: KubeLab) -> None:
    wait_for(lambda: kube.announced_by_both(ADDRESS), 60, message=f"the router to hold {ADDRESS} via both LBs")


def v2_share(kube: KubeLab, n: int, source: str = "client") -> tuple[int, dict[str, int]]:
    counts = count_by_port(kube.lab, "kans.com", ADDRESS, n, source=source)
    assert set(counts) <= {str(PODS["svc-v1"]), str(PODS["svc-v2"])}, counts
    return counts.get(str(PODS["svc-v2"]), 0), counts


def test_the_seeds_canary_splits_1000_requests_by_its_weight_then_by_the_annotated_one(kube: KubeLab) -> None:
    api = kube.api
    for name in ("svc-v1.yaml", "svc-v2.yaml"):
        api.kubectl("apply", "-f", str(CANARY / name))
    kube.apply(pods("svc-v1", ("web-port",)), pods("svc-v2", ("web-port",)))
    api.kubectl("apply", "-f", str(CANARY / "canary-ingress1.yaml"), "-f", str(CANARY / "canary-ingress2.yaml"))
    for name in ("ingress-canary-v1", "ingress-canary-v2"):
        wait_for(lambda: shown_address(kube, name) == ADDRESS, 30,  # noqa: B023
                 message=f"kubectl get ingress to show {name} at {ADDRESS}")
    served_by_both(kube)
    # served once both versions' pods passed their health checks (rise): until then some answers are 503
    versions = {str(PODS["svc-v1"]), str(PODS["svc-v2"])}
    wait_for(lambda: all(set(count_by_port(kube.lab, "kans.com", ADDRESS, 40, source=lb)) == versions for lb in LBS),
             30, message="kans.com served by both versions on both LBs")
    v2, counts = v2_share(kube, 1000)
    print(f"canary-weight 10: {counts} from the client")
    # 10% of 1,000: mean 100, standard deviation 9.5; HAProxy's weighted round robin is closer still
    assert 60 <= v2 <= 140, counts
    for lb in LBS:  # each LB's own HAProxy splits the same way, and counts each Service's answers apart
        before = _responses(kube.lab, lb)
        lb_v2, lb_counts = v2_share(kube, 200, source=lb)
        print(f"canary-weight 10: {lb_counts} at {lb}")
        assert 8 <= lb_v2 <= 32, (lb, lb_counts)
        after = _responses(kube.lab, lb)
        assert {k: after.get(k, 0) - before.get(k, 0) for k in after} == {
            "default/svc-v1:9001": lb_counts[str(PODS["svc-v1"])], "default/svc-v2:9001": lb_v2}

    api.kubectl("annotate", "--overwrite", "ingress", "ingress-canary-v2",
                "nginx.ingress.kubernetes.io/canary-weight=50")
    for lb in LBS:
        wait_for(lambda: 70 <= v2_share(kube, 200, source=lb)[0] <= 130, 30,  # noqa: B023
                 message=f"{lb} to split 50/50")
    v2, counts = v2_share(kube, 1000)
    print(f"canary-weight 50: {counts} from the client")
    assert 430 <= v2 <= 570, counts


def curl(kube: KubeLab, url: str, *args: str) -> tuple[int, dict[str, str], str]:
    """curl from the client with the URL's host resolved to the Ingress address: status, headers, body."""
    return curl_at(kube.lab, ADDRESS, url, *args)


def test_the_tls_example_serves_its_secret_and_a_replaced_secret_without_reload(kube: KubeLab,
                                                                                tmp_path: Path) -> None:
    api, lab = kube.api, kube.lab
    ca = TestCA(tmp_path / "ca")
    issued = ca.issue("sslexample", ["sslexample.foo.com"])
    api.kubectl("create", "secret", "tls", "testsecret-tls", f"--cert={issued.cert_file}", f"--key={issued.key_file}")
    api.kubectl("apply", "-f", "-", input=json.dumps(cluster_ip("service1", {"http": 80, "alt": 4200})))
    kube.apply(pods("service1", ("http", "alt")))
    api.kubectl("apply", "-f", str(EXAMPLES / "tls-example.yaml"))
    served_by_both(kube)
    url = "https://sslexample.foo.com/hello"
    # served once each LB has the certificate and the pods' health checks have passed (rise)
    wait_for(lambda: served_by_each_lb(lab, ADDRESS, url, "--cacert", str(ca.cert_file)), 30,
             message="HTTPS for sslexample.foo.com on both LBs")
    status, headers, body = curl(kube, url, "--cacert", str(ca.cert_file))
    assert status == 200 and json.loads(body)["port"] == PODS["service1"] and json.loads(body)["path"] == "/hello"
    assert headers["strict-transport-security"] == "max-age=15724800; includeSubDomains"  # ingress-nginx's default
    # a request for another host over this TLS connection: 421, the client should connect for that name
    status, _, body = curl(kube, url, "--cacert", str(ca.cert_file), "-H", "Host: first.bar.com")
    assert status == 421 and "misdirected" in body
    status, headers, _ = curl(kube, "http://sslexample.foo.com/hello?x=1")
    assert status == 308 and headers["location"] == "https://sslexample.foo.com/hello?x=1"
    assert shown_address(kube, "tls-example-ingress") == ADDRESS

    reloads = {lb: _metric(lab, lb, "lbagent_haproxy_reloads_total") for lb in LBS}
    fresh = ca.issue("sslexample-2", ["sslexample.foo.com"])
    secret = yaml.safe_load(api.kubectl("create", "secret", "tls", "testsecret-tls", f"--cert={fresh.cert_file}",
                                        f"--key={fresh.key_file}", "--dry-run=client", "-o", "yaml").stdout)
    api.kubectl("apply", "-f", "-", input=json.dumps(secret))

    def serial_served() -> bool:
        for lb in LBS:
            out = lab.exec(lb, ["sh", "-c", f"echo | openssl s_client -connect {ADDRESS}:443 -servername "
                                            "sslexample.foo.com 2>/dev/null | openssl x509 -noout -serial"],
                           check=False).stdout
            if f"{fresh.serial:X}".lstrip("0") not in out.replace("serial=", "").lstrip("0"):
                return False
        return True

    wait_for(serial_served, 30, message="both LBs to serve the replaced Secret's certificate")
    assert {lb: _metric(lab, lb, "lbagent_haproxy_reloads_total") for lb in LBS} == reloads


def _responses(lab: Lab, lb: str) -> dict[str, float]:
    """lbagent_http_responses_total{code="2xx"} by target, as the LB's /metrics says it."""
    text = lab.exec(lb, ["curl", "-sS", "--noproxy", "*", "http://127.0.0.1:9469/metrics"]).stdout
    out = {}
    for line in text.splitlines():
        found = re.match(r'lbagent_http_responses_total\{code="2xx",target="([^"]+)"\} (\S+)', line)
        if found:
            out[found.group(1)] = float(found.group(2))
    return out


def _metric(lab: Lab, lb: str, name: str) -> float:
    text = lab.exec(lb, ["curl", "-sS", "--noproxy", "*", "http://127.0.0.1:9469/metrics"]).stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_the_fanout_rewrites_and_virtual_hosts_fall_back_to_the_host_less_rule(kube: KubeLab) -> None:
    api = kube.api
    api.kubectl("apply", "-f", "-", input=manifest(
        cluster_ip("service1", {"http": 80, "alt": 4200}), cluster_ip("service2", {"http": 80, "alt": 8080}),
        cluster_ip("service3", {"http": 80})))
    kube.apply(pods("service1", ("http", "alt")), pods("service2", ("http", "alt")), pods("service3", ("http",)))
    api.kubectl("apply", "-f", str(EXAMPLES / "simple-fanout.yaml"), "-f", str(EXAMPLES / "name-virtual-host.yaml"))
    served_by_both(kube)

    def answer(url: str) -> tuple[int, str]:
        status, _, body = curl(kube, url)
        data = json.loads(body) if status == 200 else {}
        return int(data.get("port", status)), str(data.get("path", ""))

    expected = {
        # rewrite-target `/`: nginx's rewrite replaces the whole path
        "http://foo.bar.com/foo/x?y=1": (PODS["service1"], "/?y=1"),
        "http://foo.bar.com/bar": (PODS["service2"], "/"),
        "http://first.bar.com/a": (PODS["service1"], "/a"),
        "http://second.foo.com/a": (PODS["service2"], "/a"),
        "http://third.example.com/a": (PODS["service3"], "/a"),  # the host-less rule takes the rest
    }
    # each answers once the routes are in HAProxy (404 until then) and its pods' health checks passed (503 until
    # then); then exactly as expected
    wait_for(lambda: all(served_by_each_lb(kube.lab, ADDRESS, url) for url in expected), 30,
             message="every route in both LBs' HAProxy and every Service's pods in rotation")
    assert {url: answer(url) for url in expected} == expected
