"""The Kubernetes source at scale (issue 12), against the file source with the same services, in one run.

A real kube-apiserver (tests/k8s; node port range widened: 10,000 Services x 2 ports and a healthCheckNodePort
each need 30,000 node ports) holds
N Services of type LoadBalancer (externalTrafficPolicy Local, 2 ports) with an EndpointSlice each over M Nodes.
1. allocation: one writer gives every Service its address (status by server-side apply), timed;
2. a fresh agent (lbagent's Agent itself, with the Kubernetes source, its health checker and the nftables data
   plane) in a throwaway network namespace (the API through tests/k8s/bridge.py): from start to the services
   programmed, timed; the baseline is the file source with the same services (config.load of the equivalent YAML,
   the plan, the apply) in another fresh namespace;
3. network programming latency: C EndpointSlice changes one after the other (each moves one of a Service's two
   endpoint nodes, as a rolling update's step; the next written 0.25 s after the last was applied, more than the
   agent's minSyncInterval), from the write request to the nft change that puts the Service on its new nodes
   (the one that joins after its first probe), applied by the agent's own reload path (the kernel's monotonic
   clock is the host's in every namespace); with the agent's time in its reload (the source's model, health,
   plan bookkeeping) and in the apply, and how many applies were of the changed services only against whole ones.
Every probe passes at once and probes run once an hour (their traffic is bench/idle.py's subject); BGP is the
unit tests' in-memory speaker.

Usage: .venv/bin/python bench/k8s_scale.py [--services 10000] [--nodes 20] [--changes 100] [--json]   (root)
Numbers: docs/benchmarks.md, "The Kubernetes source".
"""

# The orchestrator starts processes and namespaces between awaits on purpose: it measures, it does not serve.
# ruff: noqa: ASYNC220, ASYNC221
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lbagent import model  # noqa: E402
from lbagent.l4.change import FrontendChange  # noqa: E402
from lbagent.l4.forwarder import make_forwarder  # noqa: E402
from lbagent.plan.services import all_healthy, plan  # noqa: E402
from lbagent.sources.file import config  # noqa: E402
from lbagent.sources.kubernetes.source import KubernetesSource  # noqa: E402

NAMESPACE = "bench"
API_PORT_IN_NS = 6443
PACE = 0.25  # seconds between one change applied and the next written
POOL = ["192.0.2.0/24", "198.51.100.0/25"]  # 384 addresses: Services share them by key, on distinct ports


def raw(body: dict[str, Any]) -> Any:
    """A JSON body as kubernetes_asyncio sends it (its signatures want model objects; dicts serialise the same)."""
    return body


def say(what: str) -> None:
    print(f"k8s_scale: {what}", file=sys.stderr, flush=True)


def base_config(runtime_dir: str, kubeconfig: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "node": {"name": "lb1"}, "agent": {"runtimeDir": runtime_dir, "drain": 0},
        "healthCheckDefaults": {"interval": "60m"},
        "bgp": {"localAS": 64512, "routerID": "198.51.100.250",
                "peers": [{"address": "198.51.100.251", "peerAS": 64500}]},
    }
    if kubeconfig is not None:
        doc["kubernetes"] = {"kubeconfig": kubeconfig, "loadBalancerClass": "lbagent.io/lbagent",
                             "pools": [{"name": "bench", "addresses": POOL}], "lease": {"duration": "15s"}}
    return doc


async def populate(kubeconfig: str, services: int, nodes: int) -> None:
    from kubernetes_asyncio import client  # noqa: PLC0415
    from kubernetes_asyncio import config as kube_config  # noqa: PLC0415

    configuration = client.Configuration()
    await kube_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
        await core.create_namespace(raw({"metadata": {"name": NAMESPACE}}))
        limit = asyncio.Semaphore(32)

        async def bounded(coro: Any) -> None:
            async with limit:
                await coro

        await asyncio.gather(*(bounded(core.create_node(raw({
            "metadata": {"name": f"node{i}"},
            "status": {"addresses": [{"type": "InternalIP", "address": f"203.0.113.{100 + i}"}]}})))
            for i in range(nodes)))
        await asyncio.gather(*(bounded(core.create_namespaced_service(NAMESPACE, raw({
            "metadata": {"name": f"svc{i}", "annotations": {"lbagent.io/allow-shared-ip": "bench"}},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "lbagent.io/lbagent",
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 20002 + 3 * i,
                     "ports": [{"name": "http", "port": 1000 + 2 * (i // 300), "nodePort": 20000 + 3 * i},
                               {"name": "https", "port": 1001 + 2 * (i // 300), "nodePort": 20001 + 3 * i}]}})))
            for i in range(services)))
        await asyncio.gather(*(bounded(discovery.create_namespaced_endpoint_slice(
            NAMESPACE, raw(slice_of(i, nodes, 0)))) for i in range(services)))


def slice_nodes(i: int, nodes: int, shift: int) -> list[str]:
    """The two nodes of Service i's endpoints; one shift more moves one of them (a rolling update's step)."""
    return [f"node{(i + shift) % nodes}", f"node{(i + shift + 1) % nodes}"]


def slice_of(i: int, nodes: int, shift: int) -> dict[str, Any]:
    on = slice_nodes(i, nodes, shift)
    return {"metadata": {"name": f"svc{i}-1", "labels": {"kubernetes.io/service-name": f"svc{i}"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [f"198.51.100.{(2 * i + k) % 250 + 1}"], "nodeName": n,
                           "conditions": {"ready": True}}
                          for k, n in enumerate(on)],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


# ---- inside a namespace ---------------------------------------------------------------------------------------


def rss_now_mib() -> float:
    """This process's resident memory now (ru_maxrss is the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS in /proc/self/status")


def top_allocations(snapshot: tracemalloc.Snapshot, count: int = 15) -> list[str]:
    """The files that hold the most of what Python allocated (tracemalloc), then lbagent's lines, largest first."""
    ours = snapshot.filter_traces([tracemalloc.Filter(True, str(REPO / "lbagent" / "*"))])
    return [f"{stat.size / 2**20:8.1f} MiB {stat.count:>9,} blocks  {stat.traceback}"
            for stats in (snapshot.statistics("filename"), ours.statistics("lineno")) for stat in stats[:count]]


async def inside_kubernetes(config_path: str, trace_memory: bool = False) -> dict[str, Any]:
    """The agent itself (lbagent.agent.Agent with the Kubernetes source and the nftables data plane) from nothing to
    programmed, then the latency of EndpointSlice changes through its own reload path. BGP is the in-memory speaker
    of the unit tests and every probe passes (probes once an hour: their traffic is not what is measured)."""
    from lbagent.agent.agent import Agent  # noqa: PLC0415
    from lbagent.l3.vips import VipBinder  # noqa: PLC0415
    from lbagent.l4.nftables.apply import NftForwarder  # noqa: PLC0415
    from tests.fakes import FakeBgpSpeaker  # noqa: PLC0415

    steps: dict[str, list[float]] = {"reload": [], "apply": []}
    applies = {"changed services": 0, "whole": 0}
    programmed = asyncio.Event()

    class Reporting(NftForwarder):
        """The real forwarder; each apply says which services it brought into the kernel, and when."""

        async def apply(self, frontends: Any, vips: Any, force: bool = False,
                        change: FrontendChange | None = None) -> str:
            t0 = time.perf_counter()
            how = await super().apply(frontends, vips, force, change)
            now = time.monotonic()
            if force:
                pass  # the periodic resync: no change of a Service
            elif programmed.is_set():
                steps["apply"].append(time.perf_counter() - t0)
                applies["whole" if change is None else "changed services"] += 1
                for key in sorted(change.services) if change is not None else ["*"]:
                    nodes = sorted({b.node for f in change.after(key) for b in f.backends}) if change else None
                    print(json.dumps({"applied": key, "nodes": nodes, "at": now}), flush=True)
            elif len(frontends):
                programmed.set()
            return how

    class Timed(Agent):
        async def _reload(self) -> bool:
            t0 = time.perf_counter()
            try:
                return await super()._reload()
            finally:
                steps["reload"].append(time.perf_counter() - t0)

    if trace_memory:
        tracemalloc.start()
    started = time.perf_counter()
    source = KubernetesSource(config_path, "bench-lb")
    initial = config.load(config_path)

    async def every_probe_passes(target: Any) -> None:
        return None

    agent = Timed(source, initial, speaker_factory=lambda bgp, _dir, on_change: FakeBgpSpeaker(bgp, on_change),
                  forwarder=Reporting(initial.dataplane), binder=VipBinder("lo"), prober=every_probe_passes)
    run = asyncio.create_task(agent.run())
    await programmed.wait()
    total = time.perf_counter() - started
    services = len(agent.model.services)
    rss_programmed = rss_now_mib()
    if trace_memory:
        for line in top_allocations(tracemalloc.take_snapshot()):
            print(line, file=sys.stderr)
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # the orchestrator has made its changes
    agent.stop("bench done")
    await run
    await agent.dataplane.forwarder.cleanup()
    return {"to_programmed_s": round(total, 2), "services": services,
            "rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_programmed_mib": rss_programmed, "applies": applies,
            "change_p50_ms": {step: round(statistics.median(v) * 1000, 1) for step, v in steps.items() if v}}


async def inside_file(config_path: str) -> dict[str, Any]:
    started = time.perf_counter()
    m = config.load(config_path)
    t_model = time.perf_counter() - started
    p = plan(m, all_healthy(m))
    fwd = make_forwarder(m.dataplane)
    await fwd.apply(p.frontends, p.vips, force=True)
    total = time.perf_counter() - started
    await fwd.cleanup()
    return {"model_s": round(t_model, 2), "to_programmed_s": round(total, 2),
            "rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--trace-memory", action="store_true",
                        help="the agent's largest Python allocations by file once programmed (tracemalloc: slower)")
    parser.add_argument("--inside", choices=["kubernetes", "file"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, nft)", file=sys.stderr)
        return 1
    if args.inside == "kubernetes":
        print(json.dumps({"result": asyncio.run(inside_kubernetes(args.config, args.trace_memory))}), flush=True)
        return 0
    if args.inside == "file":
        print(json.dumps({"result": asyncio.run(inside_file(args.config))}), flush=True)
        return 0
    return asyncio.run(orchestrate(args))


async def orchestrate(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="lbagent-k8s-bench-"))
    try:
        return await run_in(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def run_in(work: Path, args: argparse.Namespace) -> int:
    from tests.k8s.apiserver import LBAGENT_USER, KubeAPIServer, write_kubeconfig  # noqa: PLC0415

    result: dict[str, Any] = {"services": args.services, "nodes": args.nodes}
    with KubeAPIServer(work / "api", extra_flags=["--service-node-port-range=20000-55000"]) as api:
        started = time.perf_counter()
        await populate(str(api.kubeconfig("admin")), args.services, args.nodes)
        result["populate_s"] = round(time.perf_counter() - started, 1)
        say(f"populated in {result['populate_s']} s")
        # 1. allocation by one writer, on the host
        host_config = work / "host.yaml"
        host_config.write_text(json.dumps(base_config(str(work / "host-run"), str(api.kubeconfig(LBAGENT_USER)))))
        writer = KubernetesSource(host_config, "bench-writer")
        started = time.perf_counter()
        await writer.start()
        while not writer.status()["writer"]:  # noqa: ASYNC110 - the Lease is taken within a retry period
            await asyncio.sleep(0.1)
        await writer.write()
        result["allocation_s"] = round(time.perf_counter() - started, 1)
        result["status_writes"] = writer.status()["statusWrites"]
        say(f"allocated in {result['allocation_s']} s")
        await writer.close()
        # 2. and 3. a fresh agent in a namespace, the API through the bridge
        sock = work / "api.sock"
        port = api.url.rsplit(":", 1)[1]
        bridge = subprocess.Popen([sys.executable, "-m", "tests.k8s.bridge", "unix-to-tcp", str(sock),
                                   f"127.0.0.1:{port}"], cwd=REPO, stdout=subprocess.PIPE)
        assert bridge.stdout is not None and bridge.stdout.readline().strip() == b"ready"
        ns = f"k8sbench{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            inner_bridge = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.k8s.bridge",
                                             "tcp-to-unix", f"127.0.0.1:{API_PORT_IN_NS}", str(sock)], cwd=REPO,
                                            stdout=subprocess.PIPE)
            assert inner_bridge.stdout is not None and inner_bridge.stdout.readline().strip() == b"ready"
            kubeconfig = work / "ns.kubeconfig"
            assert api.ca is not None
            user = api.users[LBAGENT_USER]
            write_kubeconfig(kubeconfig, f"https://127.0.0.1:{API_PORT_IN_NS}", api.ca.cert_file, LBAGENT_USER,
                             user.cert_file, user.key_file)
            ns_config = work / "ns.yaml"
            ns_config.write_text(json.dumps(base_config(str(work / "ns-run"), str(kubeconfig))))
            agent = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, __file__, "--inside", "kubernetes",
                                      "--config", str(ns_config), *(["--trace-memory"] if args.trace_memory else [])],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert agent.stdout is not None
            assert json.loads(agent.stdout.readline()).get("ready")
            say("agent programmed; changes")
            latencies = await measure_changes(api, agent, args)
            assert agent.stdin is not None
            agent.stdin.write("done\n")
            agent.stdin.flush()
            inner = json.loads(agent.stdout.readlines()[-1])["result"]
            agent.wait()
            inner_bridge.kill()
            result["kubernetes"] = inner | {
                "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
                "latency_p99_ms": round(sorted(latencies)[max(0, int(len(latencies) * 0.99) - 1)] * 1000, 1)}
            # the baseline: the same services from a file
            result["file"] = file_baseline(work, ns, await writer_model(host_config))
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
            bridge.kill()
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


async def writer_model(path: Path) -> model.Model:
    """The services as the API holds them now (with their addresses), for the file baseline."""
    source = KubernetesSource(path, "bench-reader")
    await source.start()
    try:
        return await asyncio.to_thread(source.load)
    finally:
        await source.close()


def file_baseline(work: Path, ns: str, m: model.Model) -> dict[str, Any]:
    doc = base_config(str(work / "file-run"), None)
    doc["nodes"] = [{"name": n.name, "addresses": [str(a) for a in n.addresses]} for n in m.nodes]
    doc["services"] = [{"name": s.name, "namespace": s.namespace, "vips": [str(v) for v in s.vips],
                        "externalTrafficPolicy": "Local", "healthCheckNodePort": s.health_check_node_port,
                        "ports": [{"name": p.name, "port": p.port, "nodePort": p.node_port} for p in s.ports]}
                       for s in m.services]
    path = work / "file.yaml"
    path.write_text(json.dumps(doc))
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--inside", "file", "--config",
                          str(path)], cwd=REPO, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])["result"]
    return result


async def measure_changes(api: Any, agent: subprocess.Popen[str], args: argparse.Namespace) -> list[float]:
    """Write C EndpointSlice changes one after the other; each one's latency: API answer -> nft applied."""
    from kubernetes_asyncio import client  # noqa: PLC0415
    from kubernetes_asyncio import config as kube_config  # noqa: PLC0415

    configuration = client.Configuration()
    await kube_config.load_kube_config(config_file=str(api.kubeconfig("admin")), client_configuration=configuration)
    latencies: list[float] = []
    assert agent.stdout is not None
    shifts: dict[int, int] = {}
    async with client.ApiClient(configuration) as c:
        discovery = client.DiscoveryV1Api(c)
        for n in range(args.changes):
            i = (n * 7919) % args.services
            # a shift the slice does not have now (a multiple of the node count would change nothing, and
            # nothing would be applied)
            shift = shifts[i] = 1 + shifts.get(i, 0) % (args.nodes - 1)
            # paced: the agent's rate limit (agent.minSyncInterval, 0.1 s) holds back a change that comes sooner
            # after the last sync, and that wait is a setting, not the cost measured here
            await asyncio.sleep(PACE)
            written = time.monotonic()  # from the write request: the watch event may beat the API's answer
            await discovery.replace_namespaced_endpoint_slice(
                f"svc{i}-1", NAMESPACE, raw(slice_of(i, args.nodes, shift)))
            while True:
                line = await asyncio.to_thread(agent.stdout.readline)
                item = json.loads(line)
                # until the Service's frontends hold exactly the new nodes: the one that joins does so after its
                # first probe (a second apply); "*": a whole apply, which holds everything
                if item.get("applied") == "*" or (item.get("applied") == f"{NAMESPACE}/svc{i}" and sorted(
                        item["nodes"]) == sorted(slice_nodes(i, args.nodes, shift))):
                    latencies.append(item["at"] - written)
                    break
    return latencies


if __name__ == "__main__":
    sys.exit(main())
