"""Idle cost (issue 15): the agent keeping 1,000 services and 100 HTTP routes, with nothing changing, for N minutes.

The namespace lab (tests/lab: a BIRD router, two LBs each running lbagent with its ExaBGP and its HAProxy, three
nodes). Every node answers every nodePort: an nftables redirect in the node's namespace sends them to its backend.
Both LBs get the same 1,000 Cluster services (2 TCP ports each, 50 VIPs) and 100 routes on one HTTP listener, and
differ in one setting, side by side in the same run:
- lb1 probes each service's nodePorts on each node (the default): 3,000 probes of 2 connections every 2 s;
- lb2 asks kube-proxy's /healthz (`healthCheckDefaults.kubeProxyHealthz: true`): one shared probe per node.
After both have programmed everything and a settling minute, each process's CPU time (user + system, from
/proc/PID/stat) over the window is a share of one core, and its RSS is sampled every 5 s: the agent, its ExaBGP,
its HAProxy (master and workers together), each apart.

Usage: .venv/bin/python bench/idle.py [--minutes 10] [--services 1000] [--routes 100] [--json]   (root)
Numbers: docs/benchmarks.md, "Idle".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab.lab import NODES, Lab, address, wait_for

LBS = ("lb1", "lb2")
NODE_PORTS = (31000, 33999)  # the generated services' nodePorts: redirected to the backend's port on each node
BACKEND_PORT = 30080  # the lab's own service's nodePort, which every node's backend listens on
LISTENER_VIP = "192.0.2.11"
SETTLE = 60.0
SAMPLE = 5.0
TICKS = os.sysconf("SC_CLK_TCK")


def services(count: int) -> list[dict[str, Any]]:
    """`count` Cluster services of 2 TCP ports: 50 VIPs (192.0.2.20-69) with up to 20 services each."""
    out = []
    for i in range(count):
        vip, port = f"192.0.2.{20 + i % 50}", 1000 + 2 * (i // 50)
        out.append({"name": f"svc{i}", "vip": vip, "ports": [
            {"name": "http", "port": port, "nodePort": NODE_PORTS[0] + 2 * i},
            {"name": "https", "port": port + 1, "nodePort": NODE_PORTS[0] + 2 * i + 1}]})
    return out


def http(routes: int) -> dict[str, Any]:
    return {
        "proxy": {"haproxy": "/usr/sbin/haproxy", "metricsAddress": "127.0.0.1:9470"},
        "listeners": [{"name": "web", "vip": LISTENER_VIP, "port": 80}],
        "routes": [{"name": f"route{i}", "listeners": ["web"], "hostnames": [f"r{i}.example.com"],
                    "rules": [{"backendRefs": [{"name": f"svc{i}", "port": 1000 + 2 * (i // 50)}]}]}
                   for i in range(routes)],
    }


def redirect_node_ports(lab: Lab) -> None:
    """Each node answers every generated nodePort with its backend, as kube-proxy would forward them to a pod."""
    script = (f"table ip idlebench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n"
              f"    tcp dport {NODE_PORTS[0]}-{NODE_PORTS[1]} redirect to :{BACKEND_PORT}\n  }}\n}}\n")
    for node in NODES:
        lab.exec(node, ["nft", "-f", "-"], stdin=script)


def processes(agent: int) -> dict[str, list[int]]:
    """The agent and its descendants, by kind: {"agent": [pid], "exabgp": [...], "haproxy": [...]}."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
        names[int(entry)] = cmdline
    out: dict[str, list[int]] = {"agent": [agent], "exabgp": [], "haproxy": []}
    for pid, cmdline in names.items():
        p = pid
        while p in parents and p != agent and p > 1:
            p = parents[p]
        if p == agent and pid != agent:
            kind = "haproxy" if "haproxy" in cmdline else "exabgp" if "exabgp" in cmdline else None
            if kind is not None:
                out[kind].append(pid)
    return out


def cpu_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(lab: Lab, minutes: float) -> dict[str, dict[str, dict[str, float]]]:
    procs = {}
    for lb in LBS:
        pid = lab.agent_pid(lb)
        assert pid is not None, f"the agent on {lb} is not running"
        procs[lb] = processes(pid)
        assert procs[lb]["exabgp"] and procs[lb]["haproxy"], procs[lb]
    start = {lb: {kind: sum(cpu_ticks(p) for p in pids) for kind, pids in ps.items()} for lb, ps in procs.items()}
    rss: dict[str, dict[str, list[float]]] = {lb: {kind: [] for kind in ps} for lb, ps in procs.items()}
    began = time.monotonic()
    while (elapsed := time.monotonic() - began) < minutes * 60:
        for lb, ps in procs.items():
            for kind, pids in ps.items():
                rss[lb][kind].append(sum(rss_mib(p) for p in pids))
        time.sleep(min(SAMPLE, max(0.0, minutes * 60 - elapsed)))
    window = time.monotonic() - began
    out: dict[str, dict[str, dict[str, float]]] = {}
    for lb, ps in procs.items():
        assert all(lab.agent_running(lb) for lb in LBS)
        out[lb] = {}
        for kind, pids in ps.items():
            ticks = sum(cpu_ticks(p) for p in pids) - start[lb][kind]
            out[lb][kind] = {"cpu_percent": round(100 * ticks / TICKS / window, 2),
                             "rss_peak_mib": round(max(rss[lb][kind]), 1),
                             "rss_mean_mib": round(statistics.fmean(rss[lb][kind]), 1)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--routes", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (the namespace lab)", file=sys.stderr)
        return 1
    if not 0 < args.routes <= args.services <= 1500:
        print("--routes must be 1..--services, and --services at most 1500 (the nodePort range)", file=sys.stderr)
        return 1
    lab = Lab()
    lab.up()
    try:
        redirect_node_ports(lab)
        started: dict[str, float] = {}
        for lb in LBS:
            lab.stop_agent(lb)
            config = lab.agent_config(lb)
            config["services"] = [*config["services"], *services(args.services)]
            config.update(http(args.routes))
            if lb == "lb2":
                config["healthCheckDefaults"] = {"kubeProxyHealthz": True}
            else:
                config.pop("healthCheckDefaults", None)  # the defaults: 2 s interval, 1 s timeout
            lab.write_agent_config(lb, config)
            started[lb] = time.monotonic()
            lab.start_agent(lb)
        last = f"192.0.2.{20 + (args.services - 1) % 50}/32"
        announced: dict[str, float] = {}

        def everything_announced() -> bool:
            # when the last VIP's route and the listener's have this LB's next hop
            for lb in LBS:
                if lb not in announced and address(lb, "uplink") in lab.router_nexthops(last) \
                        and address(lb, "uplink") in lab.router_nexthops(f"{LISTENER_VIP}/32"):
                    announced[lb] = time.monotonic() - started[lb]
            return len(announced) == len(LBS)

        try:
            wait_for(everything_announced, timeout=120, message="every VIP and the listener's announced by both LBs")
        except Exception:
            for lb in LBS:
                print(f"--- {lb}'s agent log (end)\n{lab.agent_log(lb, since_start=True)[-3000:]}", file=sys.stderr)
            raise
        answer = lab.exec("client", ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                                     f"Host: r{args.routes - 1}.example.com", f"http://{LISTENER_VIP}/"]).stdout
        assert answer == "200", f"the last route answers {answer}"
        if not args.json:
            print(f"idle: both LBs serve {args.services} services and {args.routes} routes (every VIP at the router"
                  f" {announced['lb1']:.1f} s after lb1's start, {announced['lb2']:.1f} s after lb2's); settling"
                  f" {SETTLE:.0f} s, then {args.minutes:g} min", flush=True)
        time.sleep(SETTLE)
        result = measure(lab, args.minutes)
    finally:
        lab.down()
    doc = {"services": args.services, "routes": args.routes, "minutes": args.minutes,
           "announced_after_start_s": {lb: round(announced[lb], 1) for lb in LBS},
           "lb1 (nodePort probes)": result["lb1"], "lb2 (kubeProxyHealthz)": result["lb2"]}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"| | {' | '.join(f'{k} CPU / RSS peak (mean)' for k in ('agent', 'ExaBGP', 'HAProxy'))} |")
    for name in ("lb1 (nodePort probes)", "lb2 (kubeProxyHealthz)"):
        cells = [f"{v['cpu_percent']:.2f}% / {v['rss_peak_mib']:.0f} MiB ({v['rss_mean_mib']:.0f})"
                 for v in (doc[name][k] for k in ("agent", "exabgp", "haproxy"))]
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
