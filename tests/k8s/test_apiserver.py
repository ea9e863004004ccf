"""The tests' kube-apiserver is real and lbagent's user gets exactly what deploy/kubernetes/rbac.yaml grants.

Everything a person would do goes through kubectl: the admin applies a Service of lbagent's class, its
EndpointSlice and a Node; lbagent's user lists and watches them, writes the Service's load-balancer IP into its status
by server-side apply (raw HTTPS with the user's certificate, as the source does it) and records an Event; `kubectl get
svc` shows the IP; `kubectl auth can-i` and real attempts show what that user may not do.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.k8s import apiserver, build, objects
from tests.k8s.apiserver import LBAGENT_USER, RBAC_HTTP_MANIFEST, RBAC_MANIFEST, REPO, SERVICE_CIDRS, KubeAPIServer

NODE_IP = "192.0.2.11"
ENDPOINT_IP = "198.51.100.21"
LB_IP = "203.0.113.10"


def _apply_lb_objects(api: KubeAPIServer, namespace: str, name: str = "web") -> str:
    """Service, EndpointSlice and Node as the admin applies them; returns the node's name."""
    node_name = f"node-{namespace}"
    manifest = objects.manifest(objects.lb_service(name), objects.endpoint_slice(name, {ENDPOINT_IP: node_name}),
                                objects.node(node_name, NODE_IP))
    api.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    return node_name


def _get_svc(api: KubeAPIServer, namespace: str, name: str, user: str = "admin") -> dict[str, str]:
    rows = objects.table(api.kubectl("get", "svc", name, "-n", namespace, user=user).stdout)
    assert len(rows) == 1, rows
    return rows[0]


def _status_apply(ip: str, namespace: str, name: str) -> bytes:
    """What lbagent's writer sends: only the fields it owns, under its field manager."""
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
        "status": {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "Proxy"}]}},
    }).encode()


def test_the_server_is_the_release_go_mod_requires(kube_apiserver: KubeAPIServer) -> None:
    status, version = kube_apiserver.request("admin", "GET", "/version")
    assert status == 200
    assert version["gitVersion"] == build.kubernetes_version()
    assert "Server Version" in kube_apiserver.kubectl("version").stdout


def test_admin_applies_a_load_balancer_service_its_endpointslice_and_a_node(
        kube_apiserver: KubeAPIServer, namespace: str) -> None:
    api = kube_apiserver
    node_name = _apply_lb_objects(api, namespace)

    row = _get_svc(api, namespace, "web")
    assert row["TYPE"] == "LoadBalancer"
    assert row["EXTERNAL-IP"] == "<pending>"  # no one has given it an IP yet
    assert ipaddress.ip_address(row["CLUSTER-IP"]) in ipaddress.ip_network(SERVICE_CIDRS[0])
    service = json.loads(api.kubectl("get", "svc", "web", "-n", namespace, "-o", "json").stdout)
    assert service["spec"]["loadBalancerClass"] == objects.LB_CLASS
    assert 30000 <= service["spec"]["ports"][0]["nodePort"] <= 32767
    assert service["spec"]["healthCheckNodePort"] > 0  # externalTrafficPolicy: Local

    slices = objects.table(api.kubectl("get", "endpointslices", "-n", namespace,
                                       "-l", f"{objects.SERVICE_NAME_LABEL}=web").stdout)
    assert [(s["NAME"], s["ADDRESSTYPE"], s["PORTS"], s["ENDPOINTS"]) for s in slices] == [
        ("web-1", "IPv4", "8080", ENDPOINT_IP)]
    nodes = objects.table(api.kubectl("get", "node", node_name, "-o", "wide").stdout)
    assert [(n["NAME"], n["INTERNAL-IP"]) for n in nodes] == [(node_name, NODE_IP)]


@pytest.mark.parametrize(("kind", "path"), [
    ("service", "/api/v1/services"),
    ("endpointslice", "/apis/discovery.k8s.io/v1/endpointslices"),
    ("node", "/api/v1/nodes"),
])
def test_lbagent_lists_and_watches(kube_apiserver: KubeAPIServer, namespace: str, kind: str, path: str) -> None:
    """A full list across namespaces, then a watch from the list's resourceVersion sees a change made after it."""
    api = kube_apiserver
    node_name = _apply_lb_objects(api, namespace)
    name, where = {"service": ("web", ["-n", namespace]), "endpointslice": ("web-1", ["-n", namespace]),
                   "node": (node_name, [])}[kind]

    listed = objects.table(api.kubectl("get", f"{kind}s", "--all-namespaces", user=LBAGENT_USER).stdout)
    assert name in {row["NAME"] for row in listed}
    status, collection = api.request(LBAGENT_USER, "GET", path)
    assert status == 200, collection
    assert name in {item["metadata"]["name"] for item in collection["items"]}

    api.kubectl("label", kind, name, *where, "tests.lbagent.io/touched=yes")
    events = api.watch(LBAGENT_USER, f"{path}?resourceVersion={collection['metadata']['resourceVersion']}", 1)
    assert ("MODIFIED", name, "yes") in {
        (e["type"], e["object"]["metadata"]["name"], e["object"]["metadata"].get("labels", {}).get(
            "tests.lbagent.io/touched")) for e in events}


def test_lbagent_writes_the_load_balancer_ip_into_the_status(kube_apiserver: KubeAPIServer, namespace: str) -> None:
    api = kube_apiserver
    _apply_lb_objects(api, namespace)
    assert _get_svc(api, namespace, "web")["EXTERNAL-IP"] == "<pending>"

    status, answer = api.request(
        LBAGENT_USER, "PATCH", f"/api/v1/namespaces/{namespace}/services/web/status?fieldManager=lbagent&force=true",
        _status_apply(LB_IP, namespace, "web"), content_type="application/apply-patch+yaml")
    assert status == 200, answer
    assert answer["status"]["loadBalancer"]["ingress"] == [{"ip": LB_IP, "ipMode": "Proxy"}]

    assert _get_svc(api, namespace, "web")["EXTERNAL-IP"] == LB_IP
    assert _get_svc(api, namespace, "web", user=LBAGENT_USER)["EXTERNAL-IP"] == LB_IP
    # kubectl 1.21 and later hide managedFields.
    status, service = api.request("admin", "GET", f"/api/v1/namespaces/{namespace}/services/web")
    assert {(m["manager"], m["operation"], m.get("subresource")) for m in service["metadata"]["managedFields"]} >= {
        ("lbagent", "Apply", "status")}


def test_lbagent_records_an_event_about_a_service(kube_apiserver: KubeAPIServer, namespace: str) -> None:
    api = kube_apiserver
    _apply_lb_objects(api, namespace)
    uid = api.kubectl("get", "svc", "web", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
    event = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": "web.lbagent-test", "namespace": namespace},
        "involvedObject": {"apiVersion": "v1", "kind": "Service", "name": "web", "namespace": namespace, "uid": uid},
        "type": "Warning", "reason": "AllocationFailed",
        "message": "no free address in pool default for spec.loadBalancerIP 203.0.113.99",
        "source": {"component": "lbagent"}, "count": 1,
    }
    api.kubectl("create", "-n", namespace, "-f", "-", user=LBAGENT_USER, input=objects.manifest(event))
    events = api.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=web").stdout
    assert "AllocationFailed" in events and "203.0.113.99" in events


# (verb, resource, subresource[, namespace]): what lbagent needs and nothing more. Without a namespace: in every one.
GRANTED: list[tuple[str, ...]] = [
    ("list", "services", ""), ("watch", "services", ""), ("get", "services", ""),
    ("list", "endpointslices.discovery.k8s.io", ""), ("watch", "endpointslices.discovery.k8s.io", ""),
    ("list", "nodes", ""), ("watch", "nodes", ""),
    ("patch", "services", "status"),
    ("create", "events", ""), ("create", "events.events.k8s.io", ""),
    # the writer's Lease: in kube-system, and only the one named lbagent may be read or renewed
    ("create", "leases.coordination.k8s.io", "", "kube-system"),
    ("get", "leases.coordination.k8s.io/lbagent", "", "kube-system"),
    ("update", "leases.coordination.k8s.io/lbagent", "", "kube-system"),
    # rbac-http.yaml: Ingresses and their classes, the status of Ingresses, Secrets (TLS) to read
    ("list", "ingresses.networking.k8s.io", ""), ("watch", "ingresses.networking.k8s.io", ""),
    ("list", "ingressclasses.networking.k8s.io", ""), ("patch", "ingresses.networking.k8s.io", "status"),
    ("get", "secrets", ""), ("list", "secrets", ""), ("watch", "secrets", ""),
    ("list", "gateways.gateway.networking.k8s.io", ""), ("watch", "httproutes.gateway.networking.k8s.io", ""),
    ("list", "gatewayclasses.gateway.networking.k8s.io", ""),
    ("list", "referencegrants.gateway.networking.k8s.io", ""),
    ("patch", "gateways.gateway.networking.k8s.io", "status"),
    ("patch", "httproutes.gateway.networking.k8s.io", "status"),
    ("patch", "gatewayclasses.gateway.networking.k8s.io", "status"),
]
REFUSED: list[tuple[str, ...]] = [
    ("delete", "services", ""), ("create", "services", ""), ("update", "services", ""), ("patch", "services", ""),
    ("update", "services", "status"), ("deletecollection", "services", ""),
    ("create", "secrets", ""), ("update", "secrets", ""), ("delete", "secrets", ""),
    ("patch", "ingresses.networking.k8s.io", ""), ("update", "ingresses.networking.k8s.io", "status"),
    ("create", "ingresses.networking.k8s.io", ""), ("update", "ingressclasses.networking.k8s.io", ""),
    ("patch", "gateways.gateway.networking.k8s.io", ""), ("create", "httproutes.gateway.networking.k8s.io", ""),
    ("delete", "gateways.gateway.networking.k8s.io", ""), ("create", "referencegrants.gateway.networking.k8s.io", ""),
    ("list", "pods", ""), ("list", "configmaps", ""),
    ("create", "endpointslices.discovery.k8s.io", ""), ("delete", "endpointslices.discovery.k8s.io", ""),
    ("patch", "nodes", ""), ("delete", "nodes", ""), ("patch", "nodes", "status"),
    ("delete", "events", ""), ("list", "events", ""),
    ("create", "leases.coordination.k8s.io", ""),
    ("get", "leases.coordination.k8s.io/kube-scheduler", "", "kube-system"),
    ("update", "leases.coordination.k8s.io/kube-scheduler", "", "kube-system"),
    ("delete", "leases.coordination.k8s.io/lbagent", "", "kube-system"),
    ("update", "leases.coordination.k8s.io/lbagent", "", "default"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", ""), ("escalate", "clusterroles", ""),
    ("impersonate", "users", ""),
]


def _can_i(api: KubeAPIServer, verb: str, resource: str, subresource: str, namespace: str = "") -> str:
    args = ["auth", "can-i", verb, resource, *(["-n", namespace] if namespace else ["--all-namespaces"])]
    if subresource:
        args.append(f"--subresource={subresource}")
    proc = api.kubectl(*args, user=LBAGENT_USER, check=False)
    return proc.stdout.strip()


def test_lbagent_may_do_what_the_cluster_role_grants_and_nothing_else(kube_apiserver: KubeAPIServer) -> None:
    kube_apiserver.install_gateway_api()  # kubectl auth can-i says no for a resource the server does not have
    answers = {case: _can_i(kube_apiserver, *case) for case in GRANTED + REFUSED}
    assert {case: answer for case, answer in answers.items() if answer != "yes" and case in GRANTED} == {}
    assert {case: answer for case, answer in answers.items() if answer != "no" and case in REFUSED} == {}


def test_what_lbagent_may_not_do_is_refused(kube_apiserver: KubeAPIServer, namespace: str) -> None:
    api = kube_apiserver
    _apply_lb_objects(api, namespace)
    api.kubectl("create", "secret", "generic", "s", "-n", namespace, "--from-literal=k=v")

    for args in (["delete", "svc", "web", "-n", namespace],
                 ["delete", "secret", "s", "-n", namespace],
                 ["label", "svc", "web", "-n", namespace, "x=y"],
                 ["create", "configmap", "c", "-n", namespace]):
        proc = api.kubectl(*args, user=LBAGENT_USER, check=False)
        assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), (args, proc.stdout, proc.stderr)
    # Server-side apply on the Service itself (not its status): lbagent does not own the spec.
    status, answer = api.request(
        LBAGENT_USER, "PATCH", f"/api/v1/namespaces/{namespace}/services/web?fieldManager=lbagent",
        yaml.safe_dump({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": namespace},
                        "spec": {"loadBalancerIP": LB_IP}}).encode(), content_type="application/apply-patch+yaml")
    assert status == 403, answer
    assert _get_svc(api, namespace, "web")["EXTERNAL-IP"] == "<pending>"


def test_only_the_ingress_manifest_grants_secrets() -> None:
    """A site that serves no Ingress applies rbac.yaml alone: lbagent then holds no right on Secrets."""
    def resources(path: Path) -> set[str]:
        return {r for d in yaml.safe_load_all(path.read_text()) if d["kind"] in ("ClusterRole", "Role")
                for rule in d["rules"] for r in rule["resources"]}

    assert "secrets" not in resources(RBAC_MANIFEST) and "secrets" in resources(RBAC_HTTP_MANIFEST)


def test_the_rbac_manifest_is_what_the_server_holds(kube_apiserver: KubeAPIServer) -> None:
    """The fixture applied deploy/kubernetes/rbac.yaml and rbac-http.yaml themselves: no rule was added on the
    side."""
    documents = [*yaml.safe_load_all(RBAC_MANIFEST.read_text()), *yaml.safe_load_all(RBAC_HTTP_MANIFEST.read_text())]
    for role in (d for d in documents if d["kind"] in ("ClusterRole", "Role")):
        where = ["-n", role["metadata"]["namespace"]] if role["kind"] == "Role" else []
        held = json.loads(kube_apiserver.kubectl("get", role["kind"].lower(), role["metadata"]["name"], *where,
                                                 "-o", "json").stdout)
        assert held["rules"] == [{k: v for k, v in rule.items() if v} for rule in role["rules"]]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie has exited; its parent (not us, for the orphan case) has not reaped it yet.
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


def test_a_failing_test_still_tears_the_server_down(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="a failing test"), KubeAPIServer(tmp_path) as api:
        assert api.proc is not None and api.run_dir is not None
        pid, run_dir, port = api.proc.pid, api.run_dir, api.port
        raise RuntimeError("a failing test")
    assert _gone(pid)
    assert not run_dir.exists()
    with pytest.raises(ConnectionRefusedError):
        api._raw_request(api.admin_cert, "GET", "/readyz", timeout=5.0)
    assert port == api.port


def test_a_port_taken_meanwhile_is_retried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Another process may bind the port between choosing it and kube-apiserver's bind: a new one is tried."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1], apiserver.free_port()]
        monkeypatch.setattr(apiserver, "free_port", lambda: ports.pop(0))
        with KubeAPIServer(tmp_path) as api:
            assert api.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    assert "bind: address already in use" in (tmp_path / "kube-apiserver.log").read_text()
    assert ports == []


STARTER = """
import sys
from pathlib import Path
from tests.k8s.apiserver import KubeAPIServer
api = KubeAPIServer(Path(sys.argv[1]))
api.start()
print(api.proc.pid, api.run_dir, flush=True)
sys.stdin.read()
"""


def test_a_killed_test_run_leaves_no_server_behind(tmp_path: Path) -> None:
    """SIGKILL gives the test process no chance to stop the server: the server goes by itself (parent-death
    signal), and the next start removes the etcd data it left."""
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path)], cwd=REPO,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert starter.stdout is not None
        pid_text, run_dir_text = starter.stdout.readline().split()
        pid, run_dir = int(pid_text), Path(run_dir_text)
        assert not _gone(pid) and run_dir.is_dir()
    finally:
        starter.send_signal(signal.SIGKILL)
        starter.wait()
    assert _wait_gone(pid, 20.0), f"kube-apiserver {pid} still runs after its parent was killed"
    with KubeAPIServer(tmp_path / "next"):
        assert not run_dir.exists()
