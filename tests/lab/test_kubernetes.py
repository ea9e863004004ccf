"""Both LB nodes take their services from a real kube-apiserver (issue 12): Services applied with kubectl get an
address from the pool, written once by the one writer, announced by both LBs and served through the nodes'
nodePorts; EndpointSlices steer Local traffic; deletions, excluded nodes, bad objects, an API outage, a killed
writer and restarted agents, each as a user would see them (kubectl, the router's routes, the client's answers).

The kube-apiserver runs on the host's loopback (tests/k8s) and reaches each LB namespace as tests/lab/kube.py
describes. The test plays the cluster's controllers: it writes Nodes and EndpointSlices as the kubelet and the
EndpointSlice controller would, and tells each lab node's backend (kube-proxy's health check) how many local
endpoints it has.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.k8s.apiserver import KubeAPIServer
from tests.lab.kube import REPO, KubeLab, endpoint_slice, lb_service
from tests.lab.lab import LBS, NODES, Lab, address, wait_for

SEED_SERVICE = REPO / "configs" / "kubernetes" / "ingress-nginx-controller.yaml"
SEED_KEY = "ingress/ingress-nginx-controller"
HC_PORT = 32080
API_PORT_IN_LB = 6443
# The lab's backends listen on what these say (nodePorts, the healthCheckNodePort per Service); the addresses are
# the API's business, not the lab's.
LAB_SERVICES: list[dict[str, Any]] = [
    {"name": "ingress-nginx-controller", "namespace": "ingress", "vip": "192.0.2.10",
     "externalTrafficPolicy": "Local", "healthCheckNodePort": HC_PORT,
     "ports": [{"name": "http", "port": 80, "nodePort": 30080}, {"name": "https", "port": 443, "nodePort": 30443}]},
    {"name": "shop", "namespace": "default", "vip": "192.0.2.11",
     "ports": [{"name": "http", "port": 80, "nodePort": 30081}]},
]


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeLab]:
    workdir = tmp_path_factory.mktemp("kube-lab")
    with KubeAPIServer(workdir / "api") as api, Lab(services=LAB_SERVICES, start_agents=False) as lab:
        lab.up()
        kube = KubeLab(lab, api, workdir)
        try:
            kube.start()
            yield kube
        finally:
            kube.stop()


def seed_service() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SEED_SERVICE.read_text())
    return doc


def test_the_seeds_service_gets_an_address_announced_by_both_lbs_and_served_by_its_nodes(kube: KubeLab) -> None:
    lab = kube.lab
    for node in NODES:
        lab.set_local_endpoints(node, SEED_KEY, 1 if node in ("node1", "node2") else 0)
    kube.apply(endpoint_slice(SEED_KEY, ["node1", "node2"]))
    kube.api.kubectl("apply", "-f", str(SEED_SERVICE))  # the manifest as a user applies it
    ip = kube.wait_ip(SEED_KEY)
    assert ip.startswith("192.0.2.6") or ip.startswith("192.0.2.7")
    wait_for(lambda: kube.announced_by_both(ip), 30, message=f"the router to hold {ip} via both LBs")
    assert wait_for(lambda: kube.answering_nodes(ip) == {"node1", "node2"}, 30,
                    message="answers from node1 and node2 only (Local: node3 has no endpoint)")
    assert kube.answering_nodes(ip, 443) <= {"node1", "node2"}
    svc = kube.service(SEED_KEY)
    assert svc["status"]["loadBalancer"]["ingress"] == [{"ip": ip, "ipMode": "Proxy"}]
    allocated = [e for e in kube.events(SEED_KEY) if e["reason"] == "IPAllocated"]
    assert len(allocated) == 1 and allocated[0]["count"] == 1  # written once, by the one writer
    writers = [lb for lb in LBS if kube.status(lb)["source"]["writer"]]
    assert len(writers) == 1


def test_endpoint_slices_move_local_traffic(kube: KubeLab) -> None:
    ip = kube.wait_ip(SEED_KEY)
    lab = kube.lab
    lab.set_local_endpoints("node3", SEED_KEY, 1)
    lab.set_local_endpoints("node1", SEED_KEY, 0)
    lab.set_local_endpoints("node2", SEED_KEY, 0)
    kube.apply(endpoint_slice(SEED_KEY, ["node3"]))
    wait_for(lambda: kube.answering_nodes(ip, tries=12) == {"node3"}, 30, message="answers from node3 alone")
    # the API says node2 has an endpoint again, but its kube-proxy does not (yet): both must agree
    kube.apply(endpoint_slice(SEED_KEY, ["node2", "node3"]))
    time_to_settle = time.monotonic() + 3
    while time.monotonic() < time_to_settle:
        assert kube.answering_nodes(ip, tries=4) == {"node3"}
    lab.set_local_endpoints("node2", SEED_KEY, 1)
    wait_for(lambda: kube.answering_nodes(ip, tries=20) == {"node2", "node3"}, 30,
             message="node2 back once its kube-proxy agrees")


def test_an_excluded_node_leaves_rotation_on_both_lbs(kube: KubeLab) -> None:
    kube.apply(lb_service("shop", 80, node_port=30081))
    ip = kube.wait_ip("default/shop")
    wait_for(lambda: kube.answering_nodes(ip, tries=30) == set(NODES), 30, message="every node answers")
    kube.api.kubectl("label", "node", "node2", "node.kubernetes.io/exclude-from-external-load-balancers=")
    try:
        for lb in LBS:
            wait_for(lambda: address("node2") not in kube.lab.nft_ruleset(lb), 30,  # noqa: B023
                     message=f"node2 gone from {lb}'s nft table")
        assert kube.answering_nodes(ip, tries=30) == {"node1", "node3"}
    finally:
        kube.api.kubectl("label", "node", "node2", "node.kubernetes.io/exclude-from-external-load-balancers-")
    wait_for(lambda: kube.answering_nodes(ip, tries=30) == set(NODES), 30, message="node2 back")


def test_a_taken_or_out_of_pool_address_gets_an_event_and_nothing_else_changes(kube: KubeLab) -> None:
    taken = kube.wait_ip(SEED_KEY)
    shop = kube.wait_ip("default/shop")
    before = {lb: kube.lab.nft_ruleset(lb) for lb in LBS}
    for name, wanted in (("wants-taken", taken), ("wants-outside", "198.51.100.99"), ("bad-annotation", "nope")):
        kube.apply(lb_service(name, 8000, annotations={"lbagent.io/loadBalancerIPs": wanted}))
    kube.apply(lb_service("other-class", 8001, lb_class="example.com/other"))
    # shop's port and address, asked for with shop's sharing key missing: a clash on a shared address
    kube.apply(lb_service("clash", 80, annotations={"lbagent.io/loadBalancerIPs": shop,
                                                    "lbagent.io/allow-shared-ip": "k"}))
    reasons = {"wants-taken": "AllocationFailed", "wants-outside": "AllocationFailed",
               "bad-annotation": "InvalidLoadBalancerRequest", "clash": "AllocationFailed"}
    for name, reason in reasons.items():
        event = wait_for(lambda: next(
            (e for e in kube.events(f"default/{name}") if e["reason"] == reason), None), 30,  # noqa: B023
            message=f"the {reason} Event on {name}")
        assert event is not None and "lbagent.io/loadBalancerIPs" in event["message"], event
    assert "already given to ingress/ingress-nginx-controller" in next(
        e["message"] for e in kube.events("default/wants-taken") if e["reason"] == "AllocationFailed")
    for name in (*reasons, "other-class"):
        assert kube.external_ip(f"default/{name}") == "<pending>"
    assert kube.events("default/other-class") == []  # another class: not lbagent's, left alone
    assert kube.external_ip(SEED_KEY) == taken and kube.external_ip("default/shop") == shop
    assert {lb: kube.lab.nft_ruleset(lb) for lb in LBS} == before
    writer = next(lb for lb in LBS if kube.status(lb)["source"]["writer"])
    for name in reasons:  # the writer logs what it could not give, naming object and field
        assert (f"event=kubernetes_object_problem object=\"Service default/{name}\" "
                "field=metadata.annotations[lbagent.io/loadBalancerIPs]") in kube.lab.agent_log(writer), name
    kube.api.kubectl("delete", "svc", "-n", "default", *reasons, "other-class")


def test_an_api_outage_changes_nothing_and_what_changed_meanwhile_is_applied_after(kube: KubeLab) -> None:
    ip = kube.wait_ip(SEED_KEY)
    shop = kube.wait_ip("default/shop")
    routes = {p: kube.lab.router_nexthops(f"{p}/32") for p in (ip, shop)}
    kube.bridge_signal(signal.SIGSTOP)  # both LBs cut off, their connections hanging as with a dead control plane
    try:
        kube.api.kubectl("delete", "svc", "shop", "-n", "default")  # meanwhile, in the cluster
        started = time.monotonic()
        stale_seen = False
        while time.monotonic() - started < 60:
            assert kube.answering_nodes(shop, tries=2), "shop's traffic must keep flowing while the API is away"
            assert {p: kube.lab.router_nexthops(f"{p}/32") for p in (ip, shop)} == routes
            stale_seen = stale_seen or all(kube.status(lb)["source"]["staleSince"] for lb in LBS)
            time.sleep(2)
        assert stale_seen, "lbagent status must say the source is stale"
    finally:
        kube.bridge_signal(signal.SIGCONT)
    wait_for(lambda: not kube.lab.router_nexthops(f"{shop}/32"), 120,
             message="shop, deleted during the outage, withdrawn once the API is back")
    for lb in LBS:
        wait_for(lambda: f"{shop} " not in kube.lab.nft_ruleset(lb), 30, message=f"shop gone from {lb}")  # noqa: B023
        wait_for(lambda: kube.status(lb)["source"]["staleSince"] is None, 30, message=f"{lb} fresh again")  # noqa: B023
    assert kube.announced_by_both(ip)


def test_the_writer_killed_then_every_agent_restarted_and_no_address_changes(kube: KubeLab) -> None:
    ip = kube.wait_ip(SEED_KEY)
    writer = wait_for(lambda: next((lb for lb in LBS if kube.status(lb)["source"]["writer"]), None), 30,
                      message="a writer")
    assert writer is not None
    other = next(lb for lb in LBS if lb != writer)
    kube.lab.signal_agent(writer, signal.SIGKILL)
    kube.lab.wait_process_exit(writer, "agent", 10)
    wait_for(lambda: kube.status(other)["source"]["writer"], 30, message=f"{other} to take the Lease over")
    kube.apply(lb_service("late", 8080, node_port=30081))
    late = kube.wait_ip("default/late")
    assert kube.external_ip(SEED_KEY) == ip
    kube.lab.start_agent(writer)
    for lb in LBS:
        kube.lab.stop_agent(lb)
    for lb in LBS:
        kube.lab.start_agent(lb)
    for lb in LBS:
        wait_for(lambda: "event=agent_started" in kube.lab.agent_log(lb, since_start=True), 60,  # noqa: B023
                 message=f"{lb} restarted")
    wait_for(lambda: kube.announced_by_both(late) and kube.announced_by_both(ip), 30,
             message="both addresses announced by both LBs again")
    assert kube.external_ip(SEED_KEY) == ip and kube.external_ip("default/late") == late
    assert len([e for e in kube.events(SEED_KEY) if e["reason"] == "IPAllocated"]) == 1
    kube.api.kubectl("delete", "svc", "late", "-n", "default")


def test_a_deleted_service_is_withdrawn_unbound_and_unprogrammed_on_both_lbs(kube: KubeLab) -> None:
    ip = kube.wait_ip(SEED_KEY)
    kube.api.kubectl("delete", "-f", str(SEED_SERVICE))
    wait_for(lambda: not kube.lab.router_nexthops(f"{ip}/32"), 30, message="the route withdrawn")
    for lb in LBS:
        wait_for(lambda: ip not in kube.lab.exec(lb, ["ip", "-o", "addr", "show", "dev", "lo"]).stdout, 30,  # noqa: B023
                 message=f"{ip} unbound on {lb}")
        wait_for(lambda: f"{ip} " not in kube.lab.nft_ruleset(lb), 30, message=f"{ip} unprogrammed on {lb}")  # noqa: B023
    assert kube.lab.request(f"http://{ip}/", timeout=1) is None
