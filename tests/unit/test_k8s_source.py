"""The join of the file and the Kubernetes API's services (pure: no server needed; tests/k8s runs the source
against a real kube-apiserver)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lbagent import model
from lbagent.sources.file import config
from lbagent.sources.kubernetes.reflector import LAST_APPLIED, trimmed
from lbagent.sources.kubernetes.source import BuildCache, Snapshot, build, merged
from lbagent.sources.kubernetes.writer import holds_status

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


def _config(tmp_path: Path, **extra: Any) -> Path:
    path = tmp_path / "lb.yaml"
    doc: dict[str, Any] = {
        "node": {"name": "lb1"}, "agent": {"runtimeDir": str(tmp_path / "run")},
        "bgp": {"localAS": 64512, "routerID": "198.51.100.11", "peers": [{"address": "198.51.100.1", "peerAS": 64500}]},
    }
    path.write_text(yaml.safe_dump({**doc, **extra}))
    return path


def _problems(path: Path) -> list[str]:
    try:
        config.load(path)
    except config.ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


def test_the_kubernetes_section_is_checked_as_the_file_is(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    kubeconfig.chmod(0o644)
    path = _config(tmp_path, nodes=[{"name": "n1", "addresses": ["192.0.2.31"]}],
                   services=[{"name": "f", "vip": "203.0.113.70", "ports": [{"port": 80, "nodePort": 30080}]}],
                   kubernetes={"kubeconfig": str(kubeconfig), "pools": [
                       {"name": "a", "addresses": ["203.0.113.64/29"]},
                       {"name": "b", "addresses": ["203.0.113.70-203.0.113.80"]},
                       {"name": "a", "addresses": ["198.51.100.200/32"]},
                       {"name": "c", "addresses": ["192.0.2.31-192.0.2.31"]}]})
    found = _problems(path)
    assert any("kubernetes.kubeconfig" in p and "mode 0644" in p for p in found), found
    assert any("kubernetes.pools[1].addresses" in p and "overlaps kubernetes.pools[0] (a)" in p for p in found)
    assert any("kubernetes.pools[2].name" in p for p in found)
    assert any("kubernetes.pools[3].addresses" in p and "holds nodes[0].addresses's address" in p for p in found)
    assert any("kubernetes.pools[1].addresses" in p and "holds services[0]'s address" in p for p in found), found


def test_nodes_may_come_from_the_api_only_when_it_is_configured(tmp_path: Path) -> None:
    assert any("at least one node" in p for p in _problems(_config(tmp_path)))
    m = config.load(_config(tmp_path, kubernetes={"pools": [{"name": "p", "addresses": [POOL]}],
                                                   "lease": {"duration": "6s"}}))
    assert m.nodes == () and m.kubernetes is not None and m.kubernetes.lease_seconds == 6.0
    assert m.kubernetes.pools == (model.AddressPool("p", (POOL,)),) and m.kubernetes.kubeconfig is None


def test_a_pool_address_that_is_neither_cidr_nor_range_is_named(tmp_path: Path) -> None:
    found = _problems(_config(tmp_path, kubernetes={"pools": [
        {"name": "c", "addresses": ["203.0.113.64/29", "203.0.113.300/32"]}]}))
    assert len(found) == 1 and "kubernetes.pools[0].addresses[1]" in found[0] and "203.0.113.300/32" in found[0]


def test_a_build_translates_again_only_what_changed(tmp_path: Path) -> None:
    base = config.load(_config(tmp_path, kubernetes={"pools": [{"name": "p", "addresses": [POOL]}]}))
    services: dict[str, Mapping[str, Any]] = {}
    for name in ("a", "b"):
        svc = service(name)
        svc["metadata"]["resourceVersion"] = "1"
        svc["spec"].update(externalTrafficPolicy="Local", healthCheckNodePort=32000)
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": f"203.0.113.{65 + len(services)}"}]}}
        services[f"ns/{name}"] = svc

    def slice_of(name: str, node: str, version: str) -> dict[str, Any]:
        return {"metadata": {"name": f"{name}-1", "namespace": "ns", "resourceVersion": version,
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "endpoints": [{"addresses": ["198.51.100.9"], "nodeName": node}]}

    cache = BuildCache()
    first = build(base, Snapshot(services, {"ns/a-1": slice_of("a", "n1", "5"), "ns/b-1": slice_of("b", "n1", "6")},
                                 {}), cache)
    again = build(base, Snapshot(services, {"ns/a-1": slice_of("a", "n2", "7"), "ns/b-1": slice_of("b", "n1", "6")},
                                 {}), cache)
    assert again.services[1] is first.services[1]  # b: nothing of it changed, not translated again
    assert first.services[0].endpoint_nodes == ("n1",) and again.services[0].endpoint_nodes == ("n2",)


def test_lbagent_holds_a_status_only_where_its_manager_wrote_the_load_balancer() -> None:
    """Which Services the writer may clear when they stop being lbagent's: never one another controller wrote."""
    def svc(*entries: dict[str, Any]) -> dict[str, Any]:
        return {"metadata": {"managedFields": list(entries)}}

    ours = {"manager": "lbagent", "operation": "Apply", "subresource": "status",
            "fieldsV1": {"f:status": {"f:loadBalancer": {"f:ingress": {}}}}}
    assert holds_status(svc(ours))
    assert not holds_status(svc({**ours, "manager": "metallb-controller"}))
    assert not holds_status(svc({**ours, "subresource": None}))  # lbagent never writes a Service's spec
    assert not holds_status(svc({**ours, "fieldsV1": {"f:status": {"f:conditions": {}}}}))
    assert not holds_status(svc()) and not holds_status({})


def test_the_store_leaves_out_other_managers_fields_and_kubectls_copy_but_keeps_what_lbagent_wrote() -> None:
    ours = {"manager": "lbagent", "operation": "Apply", "subresource": "status",
            "fieldsV1": {"f:status": {"f:loadBalancer": {"f:ingress": {}}}}}
    theirs = {"manager": "kubectl-client-side-apply", "operation": "Update",
              "fieldsV1": {"f:spec": {"f:ports": {}, "f:type": {}}}}
    spec = {"type": "LoadBalancer", "ports": [{"port": 80, "nodePort": 30080}]}
    service = {"metadata": {"name": "web", "namespace": "default", "managedFields": [theirs, ours],
                            "annotations": {LAST_APPLIED: json.dumps({"spec": spec}), "team": "shop"}},
               "spec": json.loads(json.dumps(spec))}
    assert holds_status(service)
    kept = trimmed(service)
    assert kept["metadata"]["managedFields"] == [ours] and holds_status(kept)
    assert kept["metadata"]["annotations"] == {"team": "shop"} and kept["spec"] == spec
    other = trimmed({"metadata": {"name": "web", "managedFields": [theirs]}, "spec": spec})
    assert "managedFields" not in other["metadata"] and not holds_status(other)
    assert trimmed({"metadata": None}) == {"metadata": None}


def test_builds_with_a_kept_cache_equal_fresh_builds_through_any_changes(tmp_path: Path) -> None:
    """The cache reads again only objects that are new: whatever changes between builds (EndpointSlices moved, added
    or removed, Services changed, added, removed, made another class's, clashing or no longer clashing on an
    address and port, a slice relabelled to another Service), a build with the kept cache gives what a fresh one
    does: the same Services (in the same order), the same problems."""
    import random  # noqa: PLC0415

    base = config.load(_config(tmp_path, kubernetes={"pools": [{"name": "p", "addresses": [POOL]}]}))
    rng = random.Random(9)
    version = iter(range(1, 10**6))
    names = [f"s{i}" for i in range(12)]

    def make_service(name: str) -> dict[str, Any]:
        svc = service(name)
        svc["metadata"].update(resourceVersion=str(next(version)),
                               creationTimestamp=f"2026-12-05T00:00:{rng.randrange(6):02d}Z")
        svc["spec"]["ports"][0]["port"] = rng.choice([80, 81])  # two Services on one address and port: a clash
        svc["spec"]["ports"][0]["nodePort"] = 31000 + names.index(name)
        svc["spec"].update(externalTrafficPolicy=rng.choice(["Local", "Cluster"]), healthCheckNodePort=32000)
        if rng.random() < 0.1:
            svc["spec"]["loadBalancerClass"] = "someone-else"
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": f"203.0.113.{rng.choice([65, 66])}"}]}}
        return svc

    def make_slice(name: str, owner: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": str(next(version)),
                             "labels": {"kubernetes.io/service-name": owner}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["198.51.100.9"], "nodeName": rng.choice(["n1", "n2", "n3"]),
                               "conditions": {"ready": rng.random() < 0.8}}]}

    services = {f"ns/{n}": make_service(n) for n in names[:8]}
    slices = {f"ns/{n}-{k}": make_slice(f"{n}-{k}", n) for n in names[:8] for k in range(2)}
    cache = BuildCache()
    seen_clash = seen_dropped = False
    for step in range(150):
        for _ in range(rng.randrange(1, 4)):
            what = rng.random()
            name = rng.choice(names)
            if what < 0.45:  # a slice moves (a rolling update's step), appears or goes
                key = f"ns/{name}-{rng.randrange(3)}"
                if key in slices and rng.random() < 0.2:
                    del slices[key]
                else:
                    owner = name if rng.random() < 0.9 else rng.choice(names)  # relabelled now and then
                    slices[key] = make_slice(key.split("/")[1], owner)
            elif what < 0.8:  # a Service changes or comes
                services[f"ns/{name}"] = make_service(name)
            elif f"ns/{name}" in services:  # a Service goes
                del services[f"ns/{name}"]
        snap = Snapshot(dict(services), dict(slices), {})
        kept, fresh = build(base, snap, cache), build(base, snap)
        assert kept.services == fresh.services, step
        assert dict(kept.problems) == dict(fresh.problems), step
        seen_clash |= any("also served by" in p.message for ps in fresh.problems.values() for p in ps)
        seen_dropped |= len(fresh.services) < sum(1 for s in services.values()
                                                  if s["spec"]["loadBalancerClass"] == "lbagent.io/lbagent")
    assert seen_clash and seen_dropped  # the steps went through clashes
