"""Requests per second through a VIP (router ECMP -> lbagent's nftables -> nginx on node1) against the same
nginx reached directly over the same hops (router -> lb1 -> node1) without lbagent's NAT, in the same run.

Usage: .venv/bin/python bench/throughput.py [--seconds 5] [--connections 50] [--repeat 3]
Needs root, wrk and nginx (`make bench` installs them).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab.lab import Lab, address, wait_for

NGINX_PORT = 30090
NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server {{ listen {port} reuseport; keepalive_requests 1000000;
           location / {{ return 200 "{node}\\n"; }} }}
}}
"""


def wrk(lab: Lab, url: str, seconds: int, connections: int, keepalive: bool) -> float:
    argv = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", url]
    if not keepalive:
        argv[1:1] = ["-H", "Connection: close"]
    out = lab.exec("client", argv, timeout=seconds + 30).stdout
    errors = re.search(r"Socket errors: (.*)", out)
    if errors or "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with Lab() as lab:
        uplinks = {address("lb1", "uplink"), address("lb2", "uplink")}
        # The agents handle SIGHUP once they run: wait until they announce the lab's first VIP.
        wait_for(lambda: lab.router_nexthops("192.0.2.10/32") == uplinks, timeout=20, message="the agents")
        # nginx on node1 only: the VIP's one healthy backend is the very server the baseline reaches directly.
        for node in ("node1",):
            run_dir = lab.state_dir / node / "nginx"
            run_dir.mkdir(parents=True, exist_ok=True)
            conf = run_dir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=run_dir, port=NGINX_PORT, node=node))
            lab.spawn(node, "nginx", ["nginx", "-c", str(conf), "-g", "daemon off;"])
        for lb in ("lb1", "lb2"):
            config = lab.agent_config(lb)
            config["services"].append({"name": "bench", "vip": "192.0.2.20",
                                       "ports": [{"port": 80, "nodePort": NGINX_PORT}]})
            lab.write_agent_config(lb, config)
            lab.signal_agent(lb, signal.SIGHUP)
        wait_for(lambda: lab.router_nexthops("192.0.2.20/32") == uplinks, timeout=20, message="the bench VIP")
        # The baseline path: the same router and LB hops, plain routing to node1 instead of lbagent's NAT.
        lab.exec("router", ["ip", "route", "replace", f"{address('node1')}/32", "via", address("lb1", "uplink")])
        results: dict[str, Any] = {}
        for keepalive in (True, False):
            mode = "keepalive" if keepalive else "new_connection_per_request"
            via_vip, direct = [], []
            for _ in range(args.repeat):
                via_vip.append(wrk(lab, "http://192.0.2.20/", args.seconds, args.connections, keepalive))
                direct.append(wrk(lab, f"http://{address('node1')}:{NGINX_PORT}/", args.seconds, args.connections,
                                  keepalive))
            results[mode] = {"through_vip_rps": round(statistics.median(via_vip)),
                             "direct_to_node_rps": round(statistics.median(direct)),
                             "ratio": round(statistics.median(via_vip) / statistics.median(direct), 3)}
        print(json.dumps({"seconds": args.seconds, "connections": args.connections, "repeat": args.repeat,
                          **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
