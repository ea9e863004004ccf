"""The join of the file and the Kubernetes API's services (pure: no server needed; tests/k8s runs the source
against a real kube-apiserver)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lbagent import model
from lbagent.sources.file import config
from lbagent.sources.kubernetes.source import Snapshot, build, merged

POOL = "203.0.113.64/29"


def service(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "lbagent.io/lbagent",
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80, "nodePort": 31000}]}}


def test_the_model_keeps_file_services_and_drops_an_api_service_that_clashes(tmp_path: Path) -> None:
    """Pure: the join of the file and the API (no server needed)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "node": {"name": "lb1"}, "agent": {"runtimeDir": str(tmp_path / "run")},
        "bgp": {"localAS": 64512, "routerID": "198.51.100.11", "peers": [{"address": "198.51.100.1", "peerAS": 64500}]},
        "nodes": [{"name": "n1", "addresses": ["192.0.2.31"]}],
        "services": [{"name": "file", "vip": "203.0.113.9", "ports": [{"port": 80, "nodePort": 30080}]}],
        "kubernetes": {"pools": [{"name": "p", "addresses": [POOL]}]},
    }))
    base = config.load(path)
    clash = service("clash")
    clash["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}
    fine = json.loads(json.dumps(clash))
    fine["metadata"]["name"] = "fine"
    fine["status"]["loadBalancer"]["ingress"][0]["ip"] = "203.0.113.65"
    built = build(base, Snapshot({"ns/clash": clash, "ns/fine": fine}, {}, {}))
    m = merged(base, built)
    assert [s.key for s in m.services] == ["default/file", "ns/fine"]
    (problem,) = built.problems["Service ns/clash"]
    assert "the file's services[0] (default/file)" in problem.message and "203.0.113.9 TCP 80" in problem.value
    assert isinstance(m, model.Model)
