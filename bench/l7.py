"""Requests per second through lbagent's HAProxy, against a hand-written minimal HAProxy config and against nginx
proxying the same routes, in the same run; then lbagent's HAProxy again while endpoints and routes change.

The namespace lab with both agents. All three proxies run on lb1 and lb2 with the same certificate and the same
routes (Host bench.example.com: /api/ to the `api` Service's nodePort, everything else to `site`'s, any other host
404), each on an address of its own that the router reaches by ECMP over both LBs (lbagent's by BGP, the
baselines' by static routes). The backends are nginx on node1..3. wrk (2 threads) runs from the client with a Lua
script cycling through three paths so both routes are taken; the proxies are measured in turn, round after round.

The runs with changes: wrk through lbagent's HAProxy only, while `--endpoint-changes` node health flips (kube-proxy's
/healthz on node2 answers 503, then 200: HAProxy's runtime API) are paced over the run, every fifth with a route
added or removed (a reload); each change is waited for on both LBs. Two runs (keep-alive, then a new connection
per request): with the defaults, 100 endpoint changes and 20 structural changes in all.

HTTP/2 from clients: h2load (2 threads, the same connections, `--streams` concurrent streams on each, the same
paths) over TLS with ALPN h2, toward each proxy in turn in every round; the proxies speak HTTP/1.1 to the nodes.

Usage: .venv/bin/python bench/l7.py [--seconds 5] [--repeat 3] [--connections 50] [--streams 10]
           [--churn-seconds 60] [--endpoint-changes 50] [--server-connection-reuse safe|aggressive|always]
Needs root, wrk, h2load and nginx (`make bench` installs them). Prints JSON; fails on any socket error or non-2xx
answer.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.certs import TestCA
from tests.lab.lab import LBS, NODES, Lab, address, wait_for

HOST = "bench.example.com"
API_PORT, SITE_PORT = 30091, 30092
PROXIES = {"lbagent": "192.0.2.20", "haproxy-minimal": "192.0.2.21", "nginx": "192.0.2.22"}
UPLINKS = {address(lb, "uplink") for lb in LBS}
CHURN_NODE = "node2"

BACKEND_NGINX = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{ listen {api}; location / {{ return 200 "{node} api\\n"; }} }}
  server {{ listen {site}; location / {{ return 200 "{node} site\\n"; }} }}
}}
"""

# What an operator writes by hand for these routes: no lbagent extras (no X-Forwarded-Proto/-Host/-Port, no
# error pages, TLS settings left to HAProxy's defaults), maxconn as lbagent's default.
MINIMAL_HAPROXY = """
global
    maxconn 8000
    pidfile {dir}/haproxy.pid
defaults
    mode http
    option http-keep-alive
    http-reuse {reuse}
    option forwardfor
    maxconn 8000
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend bench
    bind {vip}:80
    bind {vip}:443 ssl crt {pem} alpn h2,http/1.1
    acl bench_host hdr(host),host_only -i {host}
    http-request return status 404 if !bench_host
    use_backend api if {{ path_beg /api/ }}
    default_backend site
backend api
    balance roundrobin
{api_servers}
backend site
    balance roundrobin
{site_servers}
"""

NGINX_PROXY = """
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_certificate {crt};
  ssl_certificate_key {key};
  upstream api {{ {api_servers} keepalive 64; }}
  upstream site {{ {site_servers} keepalive 64; }}
  server {{ listen {vip}:80 default_server; listen {vip}:443 ssl http2 default_server; return 404; }}
  server {{
    listen {vip}:80; listen {vip}:443 ssl http2; server_name {host};
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    location /api/ {{ proxy_pass http://api; }}
    location / {{ proxy_pass http://site; }}
  }}
}}
"""

PATHS = ("/api/items?page=2", "/", "/static/app.js")
WRK_SCRIPT = """
local paths = {PATHS}
local i = 0
request = function()
  i = i % #paths + 1
  return wrk.format(nil, paths[i])
end
""".replace("PATHS", ", ".join(f'"{p}"' for p in PATHS))


def http_config(tls_dir: Path, reuse: str) -> dict[str, Any]:
    """lbagent's part of the config: the same routes the baselines serve, plus the Services behind them."""
    fast = {"interval": "0.1s", "timeout": "0.5s", "rise": 1, "fall": 1, "kubeProxyHealthz": True}
    cert = {"certFile": str(tls_dir / "bench.crt"), "keyFile": str(tls_dir / "bench.key")}
    return {
        "services": [{"name": "api", "ports": [{"port": 80, "nodePort": API_PORT}], "healthCheck": fast},
                     {"name": "site", "ports": [{"port": 80, "nodePort": SITE_PORT}], "healthCheck": fast}],
        "proxy": {"haproxy": "/usr/sbin/haproxy", "metricsAddress": "127.0.0.1:9470", "serverConnectionReuse": reuse},
        "listeners": [{"name": "web", "vip": PROXIES["lbagent"], "port": 80},
                      {"name": "websecure", "vip": PROXIES["lbagent"], "port": 443, "protocol": "HTTPS",
                       "tls": {"defaultCertificate": cert}}],
        "routes": [{"name": "bench", "listeners": ["web", "websecure"], "hostnames": [HOST], "rules": [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api/"}}],
             "backendRefs": [{"name": "api", "port": 80}]},
            {"backendRefs": [{"name": "site", "port": 80}]},
        ]}],
    }


def configure_agents(lab: Lab, tls_dir: Path, reuse: str, extra_routes: int = 0) -> None:
    """Write lbagent's HTTP config into both agents' files and SIGHUP them. `extra_routes` Exact rules more on the
    bench route (each one a new HAProxy backend): changing their number is a structural change (a reload)."""
    for lb in LBS:
        http = http_config(tls_dir, reuse)
        http["routes"][0]["rules"][1:1] = [{"matches": [{"path": {"type": "Exact", "value": f"/extra{i}"}}],
                                            "backendRefs": [{"name": "site", "port": 80}]}
                                           for i in range(extra_routes)]
        config = lab.agent_config(lb)
        config["services"] = [s for s in config["services"] if s["name"] not in ("api", "site")]
        config["services"] += http.pop("services")
        config.update(http)
        lab.write_agent_config(lb, config)
        lab.signal_agent(lb, signal.SIGHUP)


def start_baselines(lab: Lab, tls_dir: Path, reuse: str) -> None:
    """nginx backends on every node; the minimal HAProxy and the nginx proxy on both LBs, each on its address."""
    nodes = [address(node) for node in NODES]
    for node in NODES:
        run_dir = lab.state_dir / node / "nginx"
        run_dir.mkdir(parents=True, exist_ok=True)
        conf = run_dir / "nginx.conf"
        conf.write_text(BACKEND_NGINX.format(dir=run_dir, api=API_PORT, site=SITE_PORT, node=node))
        lab.spawn(node, "nginx", ["nginx", "-c", str(conf), "-g", "daemon off;"])
    pem = tls_dir / "bench.pem"
    pem.write_bytes((tls_dir / "bench.crt").read_bytes() + (tls_dir / "bench.key").read_bytes())
    pem.chmod(0o600)
    for lb in LBS:
        for name in ("haproxy-minimal", "nginx"):
            lab.exec(lb, ["ip", "addr", "replace", f"{PROXIES[name]}/32", "dev", "lo"])
        run_dir = lab.state_dir / lb / "bench"
        run_dir.mkdir(parents=True, exist_ok=True)
        haproxy_cfg = run_dir / "haproxy.cfg"
        haproxy_cfg.write_text(MINIMAL_HAPROXY.format(
            dir=run_dir, vip=PROXIES["haproxy-minimal"], pem=pem, host=HOST, reuse=reuse,
            api_servers="\n".join(f"    server n{i} {a}:{API_PORT}" for i, a in enumerate(nodes)),
            site_servers="\n".join(f"    server n{i} {a}:{SITE_PORT}" for i, a in enumerate(nodes))))
        lab.exec(lb, ["haproxy", "-c", "-q", "-f", str(haproxy_cfg)])
        lab.spawn(lb, "haproxy-minimal", ["haproxy", "-db", "-f", str(haproxy_cfg)])
        nginx_conf = run_dir / "nginx.conf"
        nginx_conf.write_text(NGINX_PROXY.format(
            dir=run_dir, vip=PROXIES["nginx"], crt=tls_dir / "bench.crt", key=tls_dir / "bench.key", host=HOST,
            api_servers=" ".join(f"server {a}:{API_PORT};" for a in nodes),
            site_servers=" ".join(f"server {a}:{SITE_PORT};" for a in nodes)))
        lab.exec(lb, ["nginx", "-t", "-q", "-c", str(nginx_conf)])
        lab.spawn(lb, "nginx", ["nginx", "-c", str(nginx_conf), "-g", "daemon off;"])
    for name in ("haproxy-minimal", "nginx"):
        lab.exec("router", ["ip", "route", "replace", f"{PROXIES[name]}/32",
                            *(w for lb in LBS for w in ("nexthop", "via", address(lb, "uplink")))])


def answers(lab: Lab, vip: str, scheme: str, path: str, host: str = HOST) -> str:
    """One request from the client: "STATUS BODY", so every proxy is checked to route alike before timing."""
    port = 443 if scheme == "https" else 80
    out = lab.exec("client", ["curl", "-sk", "--noproxy", "*", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}",
                              "--resolve", f"{host}:{port}:{vip}", f"{scheme}://{host}{path}"], check=False)
    body, _, status = out.stdout.rpartition("\n")
    return f"{status} {body.strip()}"


def check_routes(lab: Lab) -> bool:
    """Whether every proxy answers /api/ from `api`, other paths from `site` and other hosts 404, over both schemes."""
    for name, vip in PROXIES.items():
        for scheme in ("http", "https"):
            got = {path: answers(lab, vip, scheme, path) for path in ("/api/items", "/static/app.js")}
            missing = answers(lab, vip, scheme, "/", host="other.example.com")
            if not (re.fullmatch(r"200 node\d api", got["/api/items"])
                    and re.fullmatch(r"200 node\d site", got["/static/app.js"]) and missing.startswith("404")):
                raise RuntimeError(f"{name} over {scheme} does not route like the others: {got}, other host {missing}")
    return True


def wrk_argv(lab: Lab, script: Path, url: str, seconds: float, connections: int, keepalive: bool) -> list[str]:
    argv = ["ip", "netns", "exec", lab.ns("client"), "wrk", "-t", "2", "-c", str(connections),
            "-d", f"{seconds:g}s", "--timeout", "5s", "-s", str(script), "-H", f"Host: {HOST}"]
    if not keepalive:
        argv += ["-H", "Connection: close"]
    return [*argv, url]


def wrk_result(out: str, url: str) -> dict[str, float]:
    """Requests per second and totals from wrk's summary; any socket error or non-2xx answer fails the run."""
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors or non2xx:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise RuntimeError(f"no summary from wrk against {url}:\n{out}")
    return {"rps": float(rps.group(1)), "requests": int(total.group(1))}


def h2load_argv(lab: Lab, vip: str, seconds: float, connections: int, streams: int) -> list[str]:
    """HTTP/2 over TLS (ALPN h2) to `vip`, with the bench's host as authority and server name, the same paths."""
    return ["ip", "netns", "exec", lab.ns("client"), "h2load", "-t", "2", "-c", str(connections),
            "-m", str(streams), "-D", f"{seconds:g}", "--warm-up-time", "1", f"--connect-to={vip}:443",
            *(f"https://{HOST}{path}" for path in PATHS)]


def h2load_result(out: str, vip: str) -> dict[str, float]:
    """Requests per second from h2load's summary; HTTP/1.1 negotiated, a failed request or a non-2xx fails the run."""
    protocol = re.search(r"Application protocol: (\S+)", out)
    rps = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored,"
                     r" (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not protocol or protocol.group(1) != "h2" or not rps or not done or not codes:
        raise RuntimeError(f"no HTTP/2 summary from h2load against {vip}:\n{out}")
    if int(done.group(4)) or int(done.group(5)) or int(done.group(6)) or any(int(codes.group(i)) for i in (2, 3, 4)):
        raise RuntimeError(f"h2load saw errors against {vip}:\n{out}")
    return {"rps": float(rps.group(1)), "requests": int(done.group(3))}


def run_h2load(lab: Lab, vip: str, seconds: float, connections: int, streams: int) -> dict[str, float]:
    proc = subprocess.run(h2load_argv(lab, vip, seconds, connections, streams),
                          capture_output=True, text=True, timeout=seconds + 60, check=True)
    return h2load_result(proc.stdout, vip)


def run_wrk(lab: Lab, script: Path, url: str, seconds: float, connections: int, keepalive: bool) -> dict[str, float]:
    proc = subprocess.run(wrk_argv(lab, script, url, seconds, connections, keepalive),
                          capture_output=True, text=True, timeout=seconds + 60, check=True)
    return wrk_result(proc.stdout, url)


def agent_metric(lab: Lab, lb: str, name: str) -> float:
    text = lab.exec(lb, ["curl", "-sS", "--noproxy", "*", "http://127.0.0.1:9469/metrics"]).stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def extra_routes(lab: Lab) -> int:
    """How many /extraN rules the agents' config has now (each structural change sets a different number)."""
    rules = lab.agent_config(LBS[0])["routes"][0]["rules"]
    return sum(1 for r in rules if str(r.get("matches", [{}])[0].get("path", {}).get("value", "")).startswith("/extra"))


def grew(lab: Lab, name: str, before: dict[str, float]) -> Callable[[], bool]:
    return lambda: all(agent_metric(lab, lb, name) > before[lb] for lb in LBS)


def churn(lab: Lab, tls_dir: Path, script: Path, args: argparse.Namespace, keepalive: bool) -> dict[str, Any]:
    """One run with changes (see the module's description)."""
    url = f"http://{PROXIES['lbagent']}/"
    proc = subprocess.Popen(wrk_argv(lab, script, url, args.churn_seconds, args.connections, keepalive),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    updates, reloads = "lbagent_haproxy_runtime_updates_total", 'lbagent_haproxy_reloads_total{reason="routes"}'
    start, done, structural, extra = time.monotonic(), 0, 0, extra_routes(lab)
    pace = args.churn_seconds * 0.85 / args.endpoint_changes
    for i in range(args.endpoint_changes):
        time.sleep(max(0.0, start + i * pace - time.monotonic()))  # pacing the changes over the run, not a wait
        if proc.poll() is not None:
            break
        before = {lb: agent_metric(lab, lb, updates) for lb in LBS}
        lab.set_kube_proxy_healthy(CHURN_NODE, i % 2 == 1)  # node2 drains, then comes back
        wait_for(grew(lab, updates, before), timeout=30, message=f"endpoint change {i + 1} on both LBs")
        done += 1
        if i % 5 == 4:
            before = {lb: agent_metric(lab, lb, reloads) for lb in LBS}
            extra = extra % 3 + 1  # always a different number of routes: always a reload
            configure_agents(lab, tls_dir, args.server_connection_reuse, extra)
            wait_for(grew(lab, reloads, before), timeout=30, message="the reload on both LBs")
            structural += 1
    lab.set_kube_proxy_healthy(CHURN_NODE, True)
    changes_over = round(time.monotonic() - start, 1)
    out, _ = proc.communicate(timeout=args.churn_seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed:\n{out}")
    return {**wrk_result(out, url), "endpoint_changes": done, "structural_changes": structural,
            "changes_made_within_s": changes_over}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5, help="each quiet wrk run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over every proxy and mode (median reported)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--streams", type=int, default=10,
                        help="HTTP/2 row (h2load): concurrent streams per connection (0: no HTTP/2 row)")
    parser.add_argument("--churn-seconds", type=float, default=60, help="each run with changes (0: none)")
    parser.add_argument("--endpoint-changes", type=int, default=50, help="per churn run (keep-alive, then close)")
    parser.add_argument("--server-connection-reuse", choices=("safe", "aggressive", "always"), default="safe",
                        help="lbagent's proxy.serverConnectionReuse, and http-reuse in the minimal HAProxy config")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lbagent-bench-") as tmp, Lab() as lab:
        try:
            return bench(lab, Path(tmp), args)
        except Exception:
            for lb in LBS:
                for name in ("agent", "haproxy-minimal", "nginx"):
                    tail = "".join(lab.process_log(lb, name).splitlines(True)[-30:])
                    print(f"----- {lb} {name} log (tail)\n{tail}", file=sys.stderr)
            raise


def bench(lab: Lab, tls_dir: Path, args: argparse.Namespace) -> int:
    TestCA(tls_dir).issue("bench", [HOST])
    script = tls_dir / "paths.lua"
    script.write_text(WRK_SCRIPT)
    wait_for(lambda: lab.router_nexthops("192.0.2.10/32") == UPLINKS, timeout=30, message="the agents")
    start_baselines(lab, tls_dir, args.server_connection_reuse)
    configure_agents(lab, tls_dir, args.server_connection_reuse)
    wait_for(lambda: lab.router_nexthops(f"{PROXIES['lbagent']}/32") == UPLINKS, timeout=30,
             message="lbagent's listener VIP via both LBs")
    wait_for(lambda: check_routes(lab), timeout=30, message="every proxy routing alike",
             ignore=(RuntimeError,))
    modes = [(scheme, keepalive) for scheme in ("http", "https") for keepalive in (True, False)]
    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.repeat):
        for scheme, keepalive in modes:
            mode = f"{scheme} {'keep-alive' if keepalive else 'new connection per request'}"
            for name, vip in PROXIES.items():
                result = run_wrk(lab, script, f"{scheme}://{vip}/", args.seconds, args.connections, keepalive)
                runs.setdefault(mode, {}).setdefault(name, []).append(result["rps"])
        if args.streams > 0:
            mode = f"https http/2 ({args.streams} streams per connection)"
            for name, vip in PROXIES.items():
                result = run_h2load(lab, vip, args.seconds, args.connections, args.streams)
                runs.setdefault(mode, {}).setdefault(name, []).append(result["rps"])
    results: dict[str, Any] = {}
    for mode, by_proxy in runs.items():
        medians = {name: round(statistics.median(values)) for name, values in by_proxy.items()}
        results[mode] = {**{f"{name}_rps": rps for name, rps in medians.items()},
                         "lbagent_vs_minimal": round(medians["lbagent"] / medians["haproxy-minimal"], 3),
                         "lbagent_vs_nginx": round(medians["lbagent"] / medians["nginx"], 3)}
    if args.churn_seconds > 0:
        for keepalive in (True, False):
            mode = f"http {'keep-alive' if keepalive else 'new connection per request'} with changes"
            results[mode] = churn(lab, tls_dir, script, args, keepalive)
    print(json.dumps({"seconds": args.seconds, "repeat": args.repeat, "connections": args.connections,
                      "server_connection_reuse": args.server_connection_reuse, "streams": args.streams,
                      "churn_seconds": args.churn_seconds, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
