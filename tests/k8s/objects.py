"""Kubernetes objects as the tests apply them with kubectl: a Service of lbagent's class, its EndpointSlice, a Node.

No kubelet or controller-manager runs beside the tests' kube-apiserver, so the tests write EndpointSlices and Nodes
themselves, as those controllers would. Addresses come from the documentation ranges (RFC 5737): nodes in
192.0.2.0/24, endpoints (pods) in 198.51.100.0/24, load-balancer IPs in 203.0.113.0/24.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

LB_CLASS = "lbagent.io/lbagent"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "tests.lbagent.io"

Object = dict[str, Any]


def lb_service(name: str, port: int = 80, target_port: int = 8080, local: bool = True) -> Object:
    """A Service of type LoadBalancer for lbagent, without a selector (its EndpointSlices are written by hand)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": LB_CLASS,
            "externalTrafficPolicy": "Local" if local else "Cluster",
            "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": target_port}],
        },
    }


def endpoint_slice(service: str, addresses: dict[str, str], port: int = 8080, port_name: str = "http") -> Object:
    """The Service's endpoints, address -> node name, all ready, on the port of that name."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-1", "labels": {SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: MANAGED_BY}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "nodeName": node,
                       "conditions": {"ready": True, "serving": True, "terminating": False}}
                      for address, node in addresses.items()],
        "ports": [{"name": port_name, "protocol": "TCP", "port": port}],
    }


def node(name: str, internal_ip: str) -> Object:
    """A Node as a kubelet registers it: the status (addresses) is taken on creation."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"addresses": [{"type": "InternalIP", "address": internal_ip},
                                 {"type": "Hostname", "address": name}]},
    }


def manifest(*objects: Object) -> str:
    """A multi-document YAML text for `kubectl apply -f -`."""
    return yaml.safe_dump_all(objects, sort_keys=False)


def table(output: str) -> list[dict[str, str]]:
    """The rows of a `kubectl get` table by column name. Columns are cut where the header's words start, since a
    cell may be empty (a Node's VERSION without a kubelet)."""
    lines = [line for line in output.splitlines() if line.strip()]
    if not lines:
        return []
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    names = lines[0].split()
    bounds = [*starts[1:], None]
    return [{name: line[start:end].strip() for name, start, end in zip(names, starts, bounds, strict=True)}
            for line in lines[1:]]
