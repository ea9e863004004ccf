"""Scale benchmark: plan, render and apply N services x 2 ports x M nodes with a data plane, then one change.

Each data plane is driven through the same Forwarder interface the agent uses, inside a throwaway network
namespace (the script re-runs itself there), so the kernel work is real. One change = one node fails one
service's health check, applied as the agent does it (re-plan that service, hand the forwarder its change record
from the previous plan to the new one), twice: the first service to lose the node needs a new lookup table, the
second (the next one in the same nftables shard) finds it programmed; its baseline, in the same run, is a forced
full re-apply (what a naive agent does, and what the periodic resync does), measured in a loop of its own after the
changes (the kernel frees a replaced table in the background: a change right after one would carry part of it).
The model is loaded as the agent loads its own (lbagent.agent.agent.loaded). Last, the full sync of a restarted
agent: a new forwarder, which knows nothing of the tables the previous one left in the kernel.

Usage: .venv/bin/python bench/scale.py [--dataplane nftables iptables iptables-legacy] [--services 1000 10000]
       [--nodes 20] [--repeat 5] [--json]
IPVS runs only in a kernel that has it: `python -m tests.guest run -- .venv/bin/python bench/scale.py
--dataplane ipvs --services 1000` (emulated: report apart).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
import uuid
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbagent import model
from lbagent.agent.agent import loaded
from lbagent.l3.vips import apply_sysctls
from lbagent.l4.forwarder import FrontendChange, make_forwarder
from lbagent.l4.nftables.apply import NftForwarder
from lbagent.l4.nftables.render import shard_of_service
from lbagent.plan.services import IPVS_SYSCTLS, plan, replan
from lbagent.verdicts import Verdicts

POOL = [f"{net}.{i}" for net in ("192.0.2", "198.51.100", "203.0.113") for i in range(1, 255)]
DATAPLANES = {
    "nftables": model.Dataplane(kind=model.DataplaneKind.NFTABLES),
    "iptables": model.Dataplane(kind=model.DataplaneKind.IPTABLES, iptables_variant="nft"),
    "iptables-legacy": model.Dataplane(kind=model.DataplaneKind.IPTABLES, iptables_variant="legacy"),
    "ipvs": model.Dataplane(kind=model.DataplaneKind.IPVS),
}


def build_model(services: int, nodes: int, dataplane: model.Dataplane | None = None) -> model.Model:
    check = model.HealthCheck(interval=2, timeout=1, rise=2, fall=3)
    node_list = tuple(model.Node(f"node{i}", (ip_address(f"203.0.113.{100 + i}"),)) for i in range(nodes))
    svcs = []
    for i in range(services):
        vip = ip_address(POOL[i % len(POOL)])
        base = 1000 + 2 * (i // len(POOL))
        ports = (model.ServicePort("http", model.Protocol.TCP, base, 20000 + 2 * i),
                 model.ServicePort("https", model.Protocol.TCP, base + 1, 20001 + 2 * i))
        svcs.append(model.Service("bench", f"svc{i}", (vip,), ports, model.TrafficPolicy.CLUSTER, check))
    bgp = model.Bgp(64512, IPv4Address("198.51.100.11"), (model.Peer(ip_address("198.51.100.1"), 64500, 9),))
    return model.Model("lb1", "lo", bgp, node_list, tuple(svcs), dataplane or model.Dataplane())


async def measure(kind: str, services: int, nodes: int, repeat: int) -> dict[str, Any]:
    """Runs inside the namespace."""
    m = loaded(lambda: build_model(services, nodes, DATAPLANES[kind]))  # as the agent loads its model
    health = Verdicts()  # the agent's kind, filled pair by pair as its health checker does (no dict of every pair)
    for s in m.services:
        for n in m.nodes:
            health[(s.key, n.name)] = True
    fwd = make_forwarder(m.dataplane)
    if kind == "ipvs":
        apply_sysctls(IPVS_SYSCTLS)
    start = time.perf_counter()
    p = plan(m, health)
    t_plan = time.perf_counter() - start
    start = time.perf_counter()
    await fwd.apply(p.frontends, p.vips, force=True)
    t_apply = time.perf_counter() - start
    children_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    changes, shared_changes, baselines = [], [], []
    for r in range(repeat):
        # The first service to lose node3 needs a lookup table for the other 19 nodes; the next one finds it there
        # (the next in the same nftables shard: each shard's table has its own lookup tables).
        victim = m.services[(r * 7919) % services].key
        second = next(s.key for k in range(1, services) if _same_table(
            fwd, victim, (s := m.services[(r * 7919 + k) % services]).key))
        health[(victim, "node3")] = False
        start = time.perf_counter()
        p2 = replan(p, m, health, {victim})
        how = await fwd.apply(p2.frontends, p2.vips, change=FrontendChange.of(p.by_service, p2.by_service, [victim]))
        fwd.programmed()  # the agent asks after every apply which VIPs the kernel forwards
        changes.append(time.perf_counter() - start)
        assert how == "delta", how
        health[(second, "node3")] = False
        start = time.perf_counter()
        p3 = replan(p2, m, health, {second})
        how = await fwd.apply(p3.frontends, p3.vips, change=FrontendChange.of(p2.by_service, p3.by_service, [second]))
        fwd.programmed()
        shared_changes.append(time.perf_counter() - start)
        assert how == "delta", how
        health[(victim, "node3")] = health[(second, "node3")] = True
        p = replan(p3, m, health, {victim, second})
        await fwd.apply(p.frontends, p.vips, change=FrontendChange.of(p3.by_service, p.by_service, [victim, second]))
    # The baseline in a loop of its own: the kernel frees a replaced table's objects after the transaction, in the
    # background, and a change measured right after a full apply would carry part of that.
    for _ in range(repeat):
        start = time.perf_counter()
        await fwd.apply(p.frontends, p.vips, force=True)
        baselines.append(time.perf_counter() - start)
    floor = await _tool_floor(fwd, kind) if kind.startswith("iptables") else {}
    # A restarted agent: its first apply finds the previous run's tables in the kernel, and knows nothing of them.
    start = time.perf_counter()
    p = plan(m, health)
    await make_forwarder(m.dataplane).apply(p.frontends, p.vips)
    t_restart = time.perf_counter() - start
    # Peak Python memory of deciding, in its own pass: tracemalloc slows Python, so it stays out of the timings.
    tracemalloc.start()
    plan(m, health)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    await fwd.cleanup()
    return {
        "dataplane": kind, "services": services, "nodes": nodes, "frontends": len(p.frontends),
        "plan_s": round(t_plan, 3), "apply_s": round(t_apply, 3), "full_sync_s": round(t_plan + t_apply, 3),
        "restart_sync_s": round(t_restart, 3),
        "change_ms": round(statistics.median(changes) * 1000, 1), "change_p90_ms": _p90_ms(changes),
        "change_table_there_ms": round(statistics.median(shared_changes) * 1000, 1),
        "change_table_there_p90_ms": _p90_ms(shared_changes),
        "baseline_forced_full_ms": round(statistics.median(baselines) * 1000, 1),
        **floor,
        "python_plan_peak_mib": round(peak / 2**20, 1), "agent_peak_rss_mib": round(self_rss / 1024, 1),
        "tools_peak_rss_mib": round(children_rss / 1024, 1),
    }


def _same_table(fwd: Any, a: str, b: str) -> bool:
    """Whether two services' frontends are in the same nft table (nftables' shards; one table for the others)."""
    shards = fwd.applied.shards if isinstance(fwd, NftForwarder) and fwd.applied is not None else 1
    return shard_of_service(a, shards) == shard_of_service(b, shards)


def _p90_ms(times: list[float]) -> float:
    """The 90th percentile, in ms (the slowest of one or two runs)."""
    return round((statistics.quantiles(times, n=10)[8] if len(times) > 2 else max(times)) * 1000, 1)


async def _tool_floor(fwd: Any, kind: str) -> dict[str, float]:
    """The iptables tools alone on the full apply's IPv4 input, the floor under the forwarder's full apply: the
    save that reads what is there, and the restore of the same text the forwarder sends."""
    from lbagent.l4.iptables import apply as ipt  # noqa: PLC0415 (only for the iptables runs)
    from lbagent.l4.iptables.render import parse_save, render_full  # noqa: PLC0415

    variant = "nft" if kind == "iptables" else "legacy"
    start = time.perf_counter()
    existing = parse_save(await ipt.run_tool([ipt.tool(4, variant, "save")]))
    t_save = time.perf_counter() - start
    text = render_full(fwd.applied, 4, existing)
    start = time.perf_counter()
    await ipt.run_tool([ipt.tool(4, variant, "restore"), "--wait", "10", "--noflush"], text)
    t_restore = time.perf_counter() - start
    return {"tool_save_s": round(t_save, 2), "tool_restore_alone_s": round(t_restore, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataplane", nargs="+", default=["nftables", "iptables", "iptables-legacy"],
                        choices=sorted(DATAPLANES))
    parser.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, nft, iptables, IPVS)", file=sys.stderr)
        return 1
    if args.inside:
        result = asyncio.run(measure(args.dataplane[0], args.services[0], args.nodes, args.repeat))
        print(json.dumps(result))
        return 0
    results = []
    for kind in args.dataplane:
        for services in args.services:
            ns = f"bench{uuid.uuid4().hex[:6]}"
            subprocess.run(["ip", "netns", "add", ns], check=True)
            try:
                subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
                out = subprocess.run(
                    ["ip", "netns", "exec", ns, sys.executable, __file__, "--inside", "--dataplane", kind,
                     "--services", str(services), "--nodes", str(args.nodes), "--repeat", str(args.repeat)],
                    capture_output=True, text=True, check=True,
                ).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
            finally:
                subprocess.run(["ip", "netns", "del", ns], check=False)
            if not args.json:
                print(" | ".join(f"{k}={v}" for k, v in results[-1].items()), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

