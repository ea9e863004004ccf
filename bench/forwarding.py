"""The three forwarding modes side by side in one run: requests per second through a VIP in masquerade, nat and dsr
mode, with answers large enough that they dominate (64 KB), against the same nginx reached by plain routing over
the same hops (the baseline), and what each mode costs the LB nodes per request.

The namespace lab with both agents on nftables; three Services, one per mode, each with node1's nginx as its one
backend (so every mode and the baseline reach the very same server). wrk (2 threads, 50 keep-alive connections) from
the client, the modes and the baseline taking turns in each round, the median of the rounds.

What the LB nodes do per request is read from their interface counters: the packets and bytes both LBs received
(requests, and in masquerade and nat also the answers, which come back through the LB). A namespace lab shares one
kernel, so the LBs' CPU time cannot be told apart from the nodes' or the client's; the whole machine's CPU time
per request is given beside it (from /proc/stat), which includes wrk, nginx and every hop.

Usage: .venv/bin/python bench/forwarding.py [--seconds 5] [--connections 50] [--repeat 3] [--size 65536]
Needs root, wrk and nginx (`make bench` installs them).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab.lab import Lab, address, wait_for

NGINX_PORT = 30090  # one nodePort per Service (as Kubernetes gives them): 30090, 30091, 30092
MODES = {"masquerade": "192.0.2.20", "nat": "192.0.2.21", "dsr": "192.0.2.22"}
NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  server {{ listen {port}; listen {port1}; listen {port2}; keepalive_requests 1000000; root {dir}/www; }}
}}
"""
LBS = ("lb1", "lb2")
COUNTED = [(lb, ifname) for lb in LBS for ifname in ("uplink", "cluster")]


def wrk(lab: Lab, url: str, seconds: int, connections: int) -> tuple[float, int]:
    """Requests per second and the number of requests."""
    out = lab.exec("client", ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", url],
                   timeout=seconds + 30).stdout
    if re.search(r"Socket errors: (.*)", out) or "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    assert rate and total, out
    return float(rate.group(1)), int(total.group(1))


def lb_counters(lab: Lab) -> tuple[int, int]:
    """Packets and bytes both LBs received on their two interfaces."""
    packets = octets = 0
    for lb, ifname in COUNTED:
        stats = json.loads(lab.exec(lb, ["ip", "-j", "-s", "link", "show", "dev", ifname]).stdout)[0]["stats64"]
        packets += int(stats["rx"]["packets"])
        octets += int(stats["rx"]["bytes"])
    return packets, octets


def cpu_seconds() -> float:
    """Busy CPU time of the whole machine (user, nice, system, irq, softirq, steal), in seconds."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure(lab: Lab, url: str, seconds: int, connections: int) -> dict[str, float]:
    packets0, octets0 = lb_counters(lab)
    cpu0 = cpu_seconds()
    rate, requests = wrk(lab, url, seconds, connections)
    cpu1 = cpu_seconds()
    packets1, octets1 = lb_counters(lab)
    return {"rps": rate, "lb_packets_per_request": (packets1 - packets0) / requests,
            "lb_bytes_per_request": (octets1 - octets0) / requests,
            "machine_cpu_us_per_request": (cpu1 - cpu0) / requests * 1e6}


def _announced(lab: Lab, vip: str, uplinks: set[str]) -> bool:
    return lab.router_nexthops(f"{vip}/32") == uplinks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=65536, help="bytes of each answer's body")
    args = parser.parse_args()
    services: list[dict[str, Any]] = [
        {"name": f"bench-{mode}", "vip": vip, "forwardingMode": mode,
         "ports": [{"name": "http", "port": 80, "nodePort": NGINX_PORT + i}]}
        for i, (mode, vip) in enumerate(MODES.items())
    ]
    with Lab(start_agents=False) as lab:
        # The nodes take the three VIPs as kube-proxy would (dsr needs it); the agents serve these three Services.
        lab.program_load_balancer_ips(services)
        run_dir = lab.state_dir / "node1" / "nginx"
        (run_dir / "www").mkdir(parents=True, exist_ok=True)
        (run_dir / "www" / "body").write_bytes(b"x" * args.size)
        conf = run_dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=run_dir, port=NGINX_PORT, port1=NGINX_PORT + 1, port2=NGINX_PORT + 2))
        lab.spawn("node1", "nginx", ["nginx", "-c", str(conf), "-g", "daemon off;"])
        for lb in LBS:
            config = lab.default_agent_config(lb)
            # node1 alone: the baseline reaches the very server every mode does
            config["nodes"] = [n for n in config["nodes"] if n["name"] == "node1"]
            lab.write_agent_config(lb, config)
            lab.start_agent(lb)
        uplinks = {address(lb, "uplink") for lb in LBS}
        for vip in MODES.values():
            wait_for(functools.partial(_announced, lab, vip, uplinks), timeout=30, message=vip)
        # The baseline path: the same router and LB hops, plain routing to node1 instead of lbagent's forwarding.
        lab.exec("router", ["ip", "route", "replace", f"{address('node1')}/32", "via", address("lb1", "uplink")])
        urls = {mode: f"http://{vip}/body" for mode, vip in MODES.items()}
        urls["direct (routed, no lbagent)"] = f"http://{address('node1')}:{NGINX_PORT}/body"
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
        for _ in range(args.repeat):
            for name, url in urls.items():
                rounds[name].append(measure(lab, url, args.seconds, args.connections))
        results = {
            name: {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}
            for name, runs in rounds.items()
        }
        print(json.dumps({"seconds": args.seconds, "connections": args.connections, "repeat": args.repeat,
                          "size": args.size, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
