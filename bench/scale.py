"""Scale benchmark: plan, render and apply N services x 2 ports x M nodes, then one endpoint change.

Runs inside a throwaway network namespace so the kernel work is real. The baseline for one change is a
full re-apply of the whole table (what a naive agent does, and what lbagent's periodic resync does),
measured in the same run.
Usage: .venv/bin/python bench/scale.py [--services 10000] [--nodes 20] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbagent import model
from lbagent.plan import plan, replan
from lbagent.render import nftables

POOL = [f"{net}.{i}" for net in ("192.0.2", "198.51.100", "203.0.113") for i in range(1, 255)]


def build_model(services: int, nodes: int) -> model.Model:
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
    return model.Model("lb1", "lo", bgp, node_list, tuple(svcs))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def nft(ns: str, script: str) -> float:
    start = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True,
                   capture_output=True)
    return time.perf_counter() - start


def run(services: int, nodes: int, repeat: int) -> dict[str, Any]:
    m = build_model(services, nodes)
    health = {(s.key, n.name): True for s in m.services for n in m.nodes}
    ns = f"bench{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        t_plan, p = timed(lambda: plan(m, health))
        t_build, rs = timed(lambda: nftables.build(p.frontends, p.vips, m.dataplane))
        t_render, text = timed(lambda: nftables.render_full(rs))
        t_apply = nft(ns, text)
        nft_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child so far
        # Peak Python memory in a second pass: tracemalloc slows Python down, so it stays out of the timings.
        tracemalloc.start()
        again = plan(m, health)
        nftables.render_full(nftables.build(again.frontends, again.vips, m.dataplane))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del again
        # One endpoint change, as the agent does it: one node of one service fails its check; re-plan that
        # service, update the ruleset in place, send the element changes. Baseline: the whole table again.
        changes, decides, baselines, sizes = [], [], [], []
        for r in range(repeat):
            victim = m.services[(r * 7919) % services].key
            health[(victim, "node3")] = False
            start = time.perf_counter()
            p2 = replan(p, m, health, {victim})
            script = nftables.update(rs, p.by_service[victim], p2.by_service[victim])
            decides.append(time.perf_counter() - start)
            changes.append(decides[-1] + nft(ns, script))
            sizes.append(len(script))
            baselines.append(nft(ns, nftables.render_full(nftables.build(p2.frontends, p2.vips, m.dataplane))))
            health[(victim, "node3")] = True  # and back, through the same path
            p3 = replan(p2, m, health, {victim})
            nft(ns, nftables.update(rs, p2.by_service[victim], p3.by_service[victim]))
            p = p3
        return {
            "services": services, "ports_per_service": 2, "nodes": nodes, "frontends": len(p.frontends),
            "lookup_tables": len(rs.tables), "script_bytes": len(text),
            "plan_s": round(t_plan, 3), "build_s": round(t_build, 3), "render_s": round(t_render, 3),
            "apply_s": round(t_apply, 3), "full_sync_s": round(t_plan + t_build + t_render + t_apply, 3),
            "python_peak_mib": round(peak / 2**20, 1), "nft_peak_rss_mib": round(nft_rss / 1024, 1),
            "change_decide_ms": round(statistics.median(decides) * 1000, 2),
            "change_total_ms": round(statistics.median(changes) * 1000, 1),
            "change_bytes": int(statistics.median(sizes)),
            "baseline_full_reapply_ms": round(statistics.median(baselines) * 1000, 1),
        }
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, nft)", file=sys.stderr)
        return 1
    results = [run(n, args.nodes, args.repeat) for n in args.services]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        keys = list(results[0])
        print(" | ".join(keys))
        for r in results:
            print(" | ".join(str(r[k]) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
