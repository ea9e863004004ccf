"""The namespace lab with a real kube-apiserver (tests/k8s) as both LB nodes' source: used by the lab tests of the
Kubernetes source (test_kubernetes.py) and by `make demo`.

The kube-apiserver runs on the host's loopback; each LB namespace reaches it at its own 127.0.0.1:6443 through
tests/k8s/bridge.py (a unix socket joins the namespaces). Whoever uses it plays the cluster's controllers: it writes
Nodes and EndpointSlices as the kubelet and the EndpointSlice controller would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.k8s import objects
from tests.k8s.apiserver import LBAGENT_USER, KubeAPIServer, write_kubeconfig
from tests.lab.lab import LBS, NODES, Lab, address, wait_for

REPO = Path(__file__).resolve().parents[2]
API_PORT_IN_LB = 6443
POOL = "192.0.2.64/28"


class KubeLab:
    """The lab, the API server and the bridges between them."""

    def __init__(self, lab: Lab, api: KubeAPIServer, workdir: Path, settings: dict[str, Any] | None = None) -> None:
        """`settings`: more of the agents' `kubernetes` section (e.g. `ingress`)."""
        self.lab, self.api, self.workdir = lab, api, workdir
        self.settings = settings or {}
        self.socket = workdir / "api.sock"
        self.host_bridge: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        port = self.api.url.rsplit(":", 1)[1]
        self.host_bridge = subprocess.Popen(
            [sys.executable, "-m", "tests.k8s.bridge", "unix-to-tcp", str(self.socket), f"127.0.0.1:{port}"],
            cwd=REPO, stdout=subprocess.PIPE, start_new_session=True)
        assert self.host_bridge.stdout is not None and self.host_bridge.stdout.readline().strip() == b"ready"
        assert self.api.ca is not None
        for lb in LBS:
            self.lab.spawn(lb, "apibridge", [sys.executable, "-m", "tests.k8s.bridge", "tcp-to-unix",
                                             f"127.0.0.1:{API_PORT_IN_LB}", str(self.socket)])
            kubeconfig = self.lab.state_dir / lb / "kubeconfig"
            user = self.api.users[LBAGENT_USER]
            write_kubeconfig(kubeconfig, f"https://127.0.0.1:{API_PORT_IN_LB}", self.api.ca.cert_file, LBAGENT_USER,
                             user.cert_file, user.key_file)
            # the API gives the nodes and the services; the file keeps the LB's own part (no HTTP listeners: their
            # backends would be file services)
            config = {k: v for k, v in self.lab.default_agent_config(lb).items() if k not in self.lab.http}
            config["nodes"], config["services"] = [], []
            config["kubernetes"] = {"kubeconfig": str(kubeconfig), "pools": [{"name": "lab", "addresses": [POOL]}],
                                    "lease": {"duration": "4s"}, **self.settings}
            self.lab.write_agent_config(lb, config)
        self.apply(*(objects.node(node, address(node)) for node in NODES))
        self.api.kubectl("create", "namespace", "ingress")
        for lb in LBS:
            self.lab.start_agent(lb)
        for lb in LBS:
            wait_for(lambda: "event=agent_started" in self.lab.agent_log(lb, since_start=True), 60,  # noqa: B023
                     message=f"the agent on {lb} to start")

    def stop(self) -> None:
        if self.host_bridge is not None:
            self.host_bridge.kill()
            self.host_bridge.wait()

    def apply(self, *docs: dict[str, Any], namespace: str | None = None) -> None:
        self.api.kubectl("apply", *(["-n", namespace] if namespace else []), "-f", "-",
                         input=objects.manifest(*docs))

    def service(self, key: str) -> dict[str, Any]:
        namespace, name = key.split("/")
        answer: dict[str, Any] = json.loads(self.api.kubectl("get", "svc", name, "-n", namespace, "-o", "json").stdout)
        return answer

    def external_ip(self, key: str) -> str:
        namespace, name = key.split("/")
        rows = objects.table(self.api.kubectl("get", "svc", name, "-n", namespace).stdout)
        return rows[0]["EXTERNAL-IP"]

    def wait_ip(self, key: str) -> str:
        def shown() -> str | None:
            ip = self.external_ip(key)
            return None if ip == "<pending>" else ip

        found = wait_for(shown, 30, message=f"kubectl get svc to show {key}'s address")
        assert found is not None
        return found

    def events(self, key: str) -> list[dict[str, Any]]:
        namespace, name = key.split("/")
        items = json.loads(self.api.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        return [e for e in items if e["involvedObject"]["name"] == name]

    def announced_by_both(self, ip: str) -> bool:
        return self.lab.router_nexthops(f"{ip}/32") == {address(lb, "uplink") for lb in LBS}

    def answering_nodes(self, ip: str, port: int = 80, tries: int = 30) -> set[str]:
        nodes = set()
        for source_port in range(42000, 42000 + tries):
            answer = self.lab.request(f"http://{ip}:{port}/", local_port=source_port)
            if answer is not None:
                nodes.add(str(answer["node"]))
        return nodes

    def bridge_signal(self, sig: int) -> None:
        for lb in LBS:
            pid = self.lab.process_pid(lb, "apibridge")
            assert pid is not None
            os.kill(pid, sig)

    def status(self, lb: str) -> dict[str, Any]:
        out = self.lab.exec(lb, [str(REPO / ".venv" / "bin" / "lbagent"), "status", "-c",
                                 str(self.lab.agent_config_path(lb)), "--json"])
        answer: dict[str, Any] = json.loads(out.stdout)
        return answer


def lb_service(name: str, port: int, node_port: int | None = None,
               annotations: dict[str, str] | None = None, lb_class: str = objects.LB_CLASS) -> dict[str, Any]:
    """A Cluster-policy Service of lbagent's class in `default` (nodePort: one the lab's backends serve)."""
    svc = objects.lb_service(name, port=port, local=False)
    svc["metadata"] = {"name": name, "namespace": "default", "annotations": annotations or {}}
    svc["spec"]["loadBalancerClass"] = lb_class
    if node_port is not None:
        svc["spec"]["ports"][0]["nodePort"] = node_port
    return svc


def endpoint_slice(key: str, nodes: list[str]) -> dict[str, Any]:
    namespace, name = key.split("/")
    eps = objects.endpoint_slice(name, {f"198.51.100.{20 + NODES.index(n)}": n for n in nodes})
    eps["metadata"]["namespace"] = namespace
    return eps


def pod_slice(service: str, ports: dict[str, int], namespace: str = "default",
              not_ready: frozenset[str] = frozenset()) -> dict[str, Any]:
    """An EndpointSlice of `service` with a pod on every lab node, at the node's own address (a host-network pod:
    the LB nodes reach it), on `ports` (port name -> number); ready but on the nodes named in `not_ready`."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-lab", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address(node)], "nodeName": node,
                           "conditions": {"ready": node not in not_ready}} for node in NODES],
            "ports": [{"name": name, "protocol": "TCP", "port": number} for name, number in ports.items()]}


def cluster_ip_service(name: str, ports: dict[str, tuple[int, int]], namespace: str = "default") -> dict[str, Any]:
    """A ClusterIP Service without a selector (its EndpointSlice is pod_slice's): port name -> (port, targetPort)."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"name": n, "port": p, "targetPort": t} for n, (p, t) in ports.items()]}}


def curl_at(lab: Lab, vip: str, url: str, *args: str) -> tuple[int, dict[str, str], str]:
    """curl from the lab's client with the URL's host resolved to `vip`: status, headers (lower case), body."""
    name = url.split("/")[2]
    port = 443 if url.startswith("https:") else 80
    out = lab.exec("client", ["curl", "-sS", "-i", "--noproxy", "*", "--max-time", "5", "--resolve",
                              f"{name}:{port}:{vip}", *args, url], timeout=15).stdout
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def served_by_each_lb(lab: Lab, vip: str, url: str, *args: str) -> bool:
    """Whether every LB's own HAProxy answers the URL (its host resolved to `vip`) with 200: an answer through the
    router comes from one LB only, and the other may not have its backends up yet."""
    name = url.split("/")[2]
    port = 443 if url.startswith("https:") else 80
    return all(lab.exec(lb, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", "--noproxy", "*",
                             "--resolve", f"{name}:{port}:{vip}", *args, url], check=False).stdout == "200"
               for lb in LBS)
