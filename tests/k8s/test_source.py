"""lbagent's Kubernetes source against the real kube-apiserver, as lbagent's least-privilege user: Services of its
class get an address from the pool, written once into their status by the one writer, and come out of the source as
model services with the Nodes as backends; requests it cannot meet get an Event naming the field; the writer's
Lease passes to another LB node without any address changing; a restart changes no address."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbagent.sources.kubernetes.allocator import IPS_ANNOTATION, SHARING_ANNOTATION
from lbagent.sources.kubernetes.source import KubernetesSource
from tests.k8s import objects
from tests.k8s.apiserver import LBAGENT_USER, KubeAPIServer

POOL = "203.0.113.64/29"


def config_file(tmp_path: Path, api: KubeAPIServer, lb_class: str = "lbagent.io/lbagent", node: str = "lb1",
                kubeconfig: Path | None = None, pool: str = POOL, dataplane: dict[str, Any] | None = None,
                **settings: Any) -> Path:
    """An LB node's config reading the test's API server as lbagent's user; `settings`: more of its `kubernetes`."""
    path = tmp_path / f"{node}.yaml"
    path.write_text(yaml.safe_dump({
        **({"dataplane": dataplane} if dataplane else {}),
        "node": {"name": node},
        "agent": {"runtimeDir": str(tmp_path / node)},
        "bgp": {"localAS": 64512, "routerID": "198.51.100.11", "peers": [{"address": "198.51.100.1", "peerAS": 64500}]},
        "kubernetes": {"kubeconfig": str(kubeconfig or api.kubeconfig(LBAGENT_USER)), "loadBalancerClass": lb_class,
                       "pools": [{"name": "public", "addresses": [pool]}], "lease": {"duration": "4s"}, **settings},
    }))
    return path


def service(name: str, lb_class: str, port: int = 80, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    svc = objects.lb_service(name, port=port, local=False)
    svc["spec"]["loadBalancerClass"] = lb_class
    svc["metadata"]["annotations"] = annotations or {}
    return svc


async def until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


def external_ips(api: KubeAPIServer, namespace: str) -> dict[str, str]:
    out = json.loads(api.kubectl("get", "svc", "-n", namespace, "-o", "json").stdout)
    return {s["metadata"]["name"]: ",".join(i.get("ip", "") for i in
                                             ((s.get("status") or {}).get("loadBalancer") or {}).get("ingress") or [])
            for s in out["items"]}


@contextlib.asynccontextmanager
async def writing(tmp_path: Path, api: KubeAPIServer, lb_class: str, namespace: str,
                  kubeconfig: Path | None = None,
                  dataplane: dict[str, Any] | None = None) -> AsyncIterator[tuple[KubernetesSource, str]]:
    """A source on lb1 once it holds the Lease and the Service `web` has its address: (the source, the address)."""
    source = KubernetesSource(config_file(tmp_path, api, lb_class, kubeconfig=kubeconfig, dataplane=dataplane), "lb1")
    await source.start()
    try:
        await until("lb1 to hold the Lease", lambda: source.status()["writer"])
        ips = await until("the address in status", lambda: external_ips(api, namespace)["web"])
        # the server holds the write before the source has read its answer (kubectl above blocks this loop)
        await until("lb1 to count its write", lambda: source.status()["statusWrites"] >= 1)
        assert ip_address(ips) in ip_network(POOL)
        yield source, ips
    finally:
        await source.close()


def run(coroutine: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coroutine(), timeout=120))


@pytest.fixture
def lb_class() -> str:
    """A class of the test's own: the session's server holds every other test's Services too."""
    return f"lbagent.io/t-{uuid.uuid4().hex[:8]}"


def test_a_service_gets_an_address_written_once_and_becomes_a_model_service(
        kube_apiserver: KubeAPIServer, namespace: str, lb_class: str, tmp_path: Path) -> None:
    api = kube_apiserver
    node_name = f"node-{namespace}"
    api.kubectl("apply", "-n", namespace, "-f", "-", input=objects.manifest(
        service("web", lb_class), objects.endpoint_slice("web", {"198.51.100.21": node_name}),
        objects.node(node_name, "192.0.2.21"), service("other-class", "example.com/other")))

    async def scenario() -> None:
        async with writing(tmp_path, api, lb_class, namespace) as (source, ips):
            assert external_ips(api, namespace)["other-class"] == ""  # not lbagent's class: left alone
            m = await until("the source's model to hold the service",
                            lambda: (m := source.load()).has_service(f"{namespace}/web") and m)
            web = m.service(f"{namespace}/web")
            assert web.vips == (ip_address(ips),) and web.ports[0].port == 80
            assert any(n.name == node_name and n.addresses == (ip_address("192.0.2.21"),) for n in m.nodes)
            writes = source.status()["statusWrites"]
            api.kubectl("label", "svc", "web", "-n", namespace, "touched=yes")  # a change that needs no new write
            await source.write()
            assert source.status()["statusWrites"] == writes == 1
        status, svc = api.request("admin", "GET", f"/api/v1/namespaces/{namespace}/services/web")  # managedFields too
        assert status == 200
        assert svc["status"]["loadBalancer"]["ingress"] == [{"ip": ips, "ipMode": "Proxy"}]
        managers = {(f["manager"], f.get("subresource")) for f in svc["metadata"]["managedFields"]}
        assert ("lbagent", "status") in managers

    run(scenario)


def test_direct_server_return_is_written_as_ip_mode_vip(
        kube_apiserver: KubeAPIServer, namespace: str, lb_class: str, tmp_path: Path) -> None:
    """forwardingMode dsr: the packet reaches the node still addressed to the VIP, which only kube-proxy's rules for
    the address take: ipMode VIP. Back to nat, the same address is written again as Proxy."""
    api = kube_apiserver
    api.kubectl("apply", "-n", namespace, "-f", "-", input=objects.manifest(service("web", lb_class)))

    def ingress() -> list[dict[str, str]]:
        status, svc = api.request("admin", "GET", f"/api/v1/namespaces/{namespace}/services/web")
        assert status == 200
        return list(((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or [])

    async def scenario() -> None:
        dsr = {"forwardingMode": "dsr", "dsrInterfaces": ["eth0"]}
        async with writing(tmp_path, api, lb_class, namespace, dataplane=dsr) as (_, ips):
            assert ingress() == [{"ip": ips, "ipMode": "VIP"}]
        async with writing(tmp_path, api, lb_class, namespace, dataplane={"forwardingMode": "nat"}) as (source, ips2):
            assert ips2 == ips
            await until("ipMode Proxy", lambda: ingress() == [{"ip": ips, "ipMode": "Proxy"}])
            assert source.status()["statusWrites"] == 1

    run(scenario)


def test_a_bearer_token_kubeconfig_does_the_same(
        kube_apiserver: KubeAPIServer, namespace: str, lb_class: str, tmp_path: Path) -> None:
    """The Vagrant lab's LB nodes authenticate with a token (vagrant/provision/lb.sh), not a client certificate:
    the same user, the same rights (deploy/kubernetes/rbac.yaml), the Lease taken and the status written."""
    api = kube_apiserver
    kubeconfig = yaml.safe_load(api.token_kubeconfig.read_text())
    assert set(kubeconfig["users"][0]["user"]) == {"token"}
    api.kubectl("apply", "-n", namespace, "-f", "-", input=objects.manifest(service("web", lb_class)))

    async def scenario() -> None:
        async with writing(tmp_path, api, lb_class, namespace, kubeconfig=api.token_kubeconfig) as (source, _):
            assert source.status()["statusWrites"] == 1

    run(scenario)


def test_a_service_that_stops_being_lbagents_gives_its_address_back(
        kube_apiserver: KubeAPIServer, namespace: str, lb_class: str, tmp_path: Path) -> None:
    """Its type changed to ClusterIP: the writer takes the address out of its status (only what lbagent wrote),
    once, and another Service may have it."""
    api = kube_apiserver
    api.kubectl("apply", "-n", namespace, "-f", "-", input=objects.manifest(service("web", lb_class)))

    async def scenario() -> None:
        async with writing(tmp_path, api, lb_class, namespace) as (source, ips):
            api.kubectl("patch", "svc", "web", "-n", namespace, "--type", "merge", "-p",
                        json.dumps({"spec": {"type": "ClusterIP"}}))
            await until("the address to leave the status", lambda: external_ips(api, namespace)["web"] == "")
            await until("the model to drop the service", lambda: not source.load().has_service(f"{namespace}/web"))
            await until("the release counted", lambda: source.status()["statusWrites"] >= 2)
            writes = source.status()["statusWrites"]
            assert writes == 2  # the address, then its release
            api.kubectl("label", "svc", "web", "-n", namespace, "touched=yes")
            await source.write()  # nothing more: lbagent holds no field of it now
            assert source.status()["statusWrites"] == writes
            status, svc = api.request("admin", "GET", f"/api/v1/namespaces/{namespace}/services/web")
            assert status == 200
            assert not any(f["manager"] == "lbagent" for f in svc["metadata"].get("managedFields") or [])
            # the address is free again: a Service that asks for it gets it
            api.kubectl("apply", "-n", namespace, "-f", "-", input=objects.manifest(
                service("web2", lb_class, annotations={IPS_ANNOTATION: ips})))
            assert await until("web2's address", lambda: external_ips(api, namespace).get("web2")) == ips

    run(scenario)


def test_requests_it_cannot_meet_get_an_event_naming_the_field(
        kube_apiserver: KubeAPIServer, namespace: str, lb_class: str, tmp_path: Path) -> None:
    api = kube_apiserver
    api.kubectl("apply", "-n", namespace, "-f", "-", input=objects.manifest(
        service("first", lb_class, annotations={IPS_ANNOTATION: "203.0.113.66"}),
        service("outside", lb_class, annotations={IPS_ANNOTATION: "203.0.113.200"})))

    async def scenario() -> None:
        source = KubernetesSource(config_file(tmp_path, api, lb_class), "lb1")
        await source.start()
        try:
            await until("first's requested address", lambda: external_ips(api, namespace)["first"] == "203.0.113.66")
            shared = {SHARING_ANNOTATION: "k", IPS_ANNOTATION: "203.0.113.67"}
            api.kubectl("apply", "-n", namespace, "-f", "-", input=objects.manifest(
                service("taken", lb_class, annotations={IPS_ANNOTATION: "203.0.113.66"}),
                service("shared-a", lb_class, 53, annotations=shared),
                service("shared-b", lb_class, 53, annotations=shared)))

            def events() -> str:
                return api.kubectl("get", "events", "-n", namespace, "-o", "json").stdout

            await until("the Events", lambda: all(
                any(e["involvedObject"]["name"] == name and e["reason"] == "AllocationFailed"
                    for e in json.loads(events())["items"]) for name in ("outside", "taken", "shared-b")))
            by_name = {e["involvedObject"]["name"]: e["message"] for e in json.loads(events())["items"]
                       if e["reason"] == "AllocationFailed"}
            assert IPS_ANNOTATION in by_name["outside"] and "none of lbagent's pools" in by_name["outside"]
            assert "already given to" in by_name["taken"] and f"{namespace}/first" in by_name["taken"]
            assert "uses TCP 53 too" in by_name["shared-b"]  # the same key, but the same port: b came second
            # the Events go out before the statuses of the same pass are written
            ips = await until("shared-a's address", lambda: (
                ips := external_ips(api, namespace))["shared-a"] == "203.0.113.67" and ips)
            assert ips["first"] == "203.0.113.66" and ips["outside"] == "" and ips["taken"] == ""
            assert ips["shared-b"] == ""
        finally:
            await source.close()

    run(scenario)


def test_the_lease_passes_to_another_node_and_no_address_changes(
        kube_apiserver: KubeAPIServer, namespace: str, lb_class: str, tmp_path: Path) -> None:
    api = kube_apiserver
    api.kubectl("apply", "-n", namespace, "-f", "-", input=objects.manifest(service("a", lb_class)))

    async def scenario() -> None:
        lb1 = KubernetesSource(config_file(tmp_path, api, lb_class, "lb1"), "lb1")
        lb2 = KubernetesSource(config_file(tmp_path, api, lb_class, "lb2"), "lb2")
        restarted = KubernetesSource(config_file(tmp_path, api, lb_class, "lb1"), "lb1")
        try:
            await lb1.start()
            await until("lb1 to write", lambda: lb1.status()["writer"])
            await lb2.start()
            first = await until("a's address", lambda: external_ips(api, namespace)["a"])
            await until("lb2 to see lb1 hold the Lease", lambda: lb2.status()["writerIdentity"] == "lb1")
            assert not lb2.status()["writer"]
            # lb1 dies without releasing the Lease: lb2 waits out the lease (4 s) and takes over
            assert lb1.lease is not None
            lb1.lease.leading = False
            for task in lb1._tasks:
                task.cancel()
            started = time.monotonic()
            await until("lb2 to take over", lambda: lb2.status()["writer"], timeout=20)
            took = time.monotonic() - started
            api.kubectl("apply", "-n", namespace, "-f", "-", input=objects.manifest(service("b", lb_class, 81)))
            second = await until("b's address from lb2", lambda: external_ips(api, namespace)["b"])
            assert external_ips(api, namespace)["a"] == first
            assert took >= 2, "lb2 must not take a live-looking Lease before it expires"
            # lb2 stops cleanly: it releases the Lease (no holder: a restarted lb1 need not wait out a lease)
            # and a restarted lb1 writes, changing nothing
            await lb2.close()
            lease = json.loads(api.kubectl("get", "lease", "lbagent", "-n", "kube-system", "-o", "json").stdout)
            assert not lease["spec"].get("holderIdentity"), lease["spec"]
            await restarted.start()
            await until("the restarted lb1 to write", lambda: restarted.status()["writer"])
            await restarted.write()
            assert external_ips(api, namespace) == {"a": first, "b": second}
            assert restarted.status()["statusWrites"] == 0
        finally:
            for source in (restarted, lb2, lb1):
                await source.close()

    run(scenario)
