"""Config load benchmark: `lbagent check` on large configs, against libyaml's parse alone (the floor) and against
the code before issue 10's fixes (the baseline), in the same run.

Three generated configs (documentation-range addresses only): 10,000 services x 2 ports with 20 nodes, and 1,000
and 4,000 HTTP routes on one listener (hostnames, path prefixes, header and query matches, an Exact and a regular
expression path, a catch-all per hostname, so the route reachability check has work). Each is measured three ways,
each run in a fresh process with only the tree under test on PYTHONPATH, round after round:

- floor: `yaml.load(text, Loader=yaml.CSafeLoader)` alone;
- before: `config.load` and what `check` adds (the config hash) with lbagent at --before (default 8e52584, the
  parent of the commit that made the parser libyaml's; the indexed reachability check came two commits later),
  extracted with `git archive`; a run over --before-timeout seconds is stopped and reported as "> N s";
- now: the same with this tree; and, in processes of their own, the whole `lbagent check -c FILE` command (its
  imports and the real tools' judging included: nft -c, haproxy -c, exabgp validate), and a reload as the agent
  does it on SIGHUP (config.load in a worker thread while the event loop runs): the loop's longest stall, the
  longest garbage collector pause in it (a collection holds the GIL, so the loop waits for it) and the config
  hash the agent then works out on the loop.

Times are medians over --repeat processes; peak RSS is the largest of the processes' (the whole interpreter with
lbagent imported: the config's own share is the difference from the floor's). With --json the figures are printed
as JSON and the table goes to stderr.

Usage: .venv/bin/python bench/config_load.py [--services 10000] [--nodes 20] [--routes 1000 4000] [--repeat 3]
       [--before 8e52584 | --before-tree DIR] [--before-timeout 300] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "8e52584"
LIMIT = 1800.0  # seconds for any one run of the current code (the old code's limit is --before-timeout)
ROUTER_ID, PEERS = "198.51.100.11", ("198.51.100.1", "198.51.100.2")
NODE_ADDRESS = "203.0.113.{}"  # node i: .101 + i
# The VIPs: the documentation ranges less the site's own addresses (a VIP may not be one of them).
POOL = [a for a in (f"{net}.{i}" for net in ("192.0.2", "198.51.100", "203.0.113") for i in range(1, 255))
        if a not in {ROUTER_ID, *PEERS} and not (a.startswith("203.0.113.") and 101 <= int(a.split(".")[3]) < 201)]
LISTENER_VIP = "192.0.2.254"  # the routes configs' services have no VIP of their own


# ---- generated configs ------------------------------------------------------------------------------------------


def _base(nodes: int) -> dict[str, Any]:
    return {
        "node": {"name": "lb1"},
        "agent": {"runtimeDir": "/run/lbagent"},
        "bgp": {"localAS": 64512, "routerID": ROUTER_ID,
                "peers": [{"address": peer, "peerAS": 64500, "holdTime": 9} for peer in PEERS]},
        "dataplane": {"kind": "nftables", "forwardingMode": "masquerade"},
        "nodes": [{"name": f"node{i}", "addresses": [NODE_ADDRESS.format(101 + i), f"2001:db8:2::{101 + i:x}"]}
                  for i in range(nodes)],
    }


def services_config(services: int, nodes: int) -> dict[str, Any]:
    """N services x 2 ports sharing the documentation-range VIPs on distinct ports (as bench/scale.py), with
    the variety a cluster has: Local policy, affinity, source ranges, health-check overrides, BGP communities."""
    doc = _base(nodes)
    out = []
    for i in range(services):
        slot = i % len(POOL)
        base = 80 if i < len(POOL) else 1000 + 2 * (i // len(POOL))
        svc: dict[str, Any] = {
            "name": f"svc{i}", "namespace": f"team{i % 50}", "vip": POOL[slot],
            "ports": [{"name": "http", "port": base, "nodePort": 20000 + 2 * i},
                      {"name": "https", "port": base + 1 if base != 80 else 443, "nodePort": 20001 + 2 * i}],
        }
        if slot % 3 == 0:  # services sharing a VIP announce it alike: attributes follow the VIP
            svc["bgp"] = {"communities": ["64512:100"], "med": 10}
        if i % 10 == 0:
            svc["externalTrafficPolicy"] = "Local"
            svc["healthCheckNodePort"] = 45000 + i // 10
        if i % 7 == 0:
            svc["sessionAffinity"] = "ClientIP"
        if i % 11 == 0:
            svc["loadBalancerSourceRanges"] = ["198.51.100.0/24", "203.0.113.0/25"]
        if i % 13 == 0:
            svc["healthCheck"] = {"interval": "1s", "fall": 2}
        out.append(svc)
    doc["services"] = out
    return doc


def routes_config(routes: int, nodes: int, backends: int = 200) -> dict[str, Any]:
    """N HTTPRoutes on one listener, each with 6 rules and 7 matches on 1 or 2 hostnames; none shadows another."""
    doc = _base(nodes)
    doc["services"] = [{"name": f"backend{j}", "namespace": "apps", "ports": [{"port": 80, "nodePort": 30000 + j}]}
                       for j in range(backends)]
    doc["listeners"] = [{"name": "web", "vip": LISTENER_VIP, "port": 80}]

    def ref(j: int) -> list[dict[str, Any]]:
        return [{"name": f"backend{j % backends}", "namespace": "apps", "port": 80}]

    out = []
    for i in range(routes):
        if i % 10 == 0:
            hostnames = [f"t{i}.tenants.example.org"]
        elif i % 4 == 0:
            hostnames = [f"app{i}.example.com", f"www.app{i}.example.com"]
        else:
            hostnames = [f"app{i}.example.com"]
        static: dict[str, Any] = {"path": {"type": "PathPrefix", "value": "/static"}}
        if i % 5 == 0:
            static = {"path": {"type": "RegularExpression", "value": "^/assets/[a-z0-9]+[.](js|css)$"}}
        out.append({
            "name": f"app{i}", "namespace": f"team{i % 20}", "listeners": ["web"], "hostnames": hostnames,
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api/v2"},
                              "headers": [{"name": "x-api-version", "value": "2"}]},
                             {"path": {"type": "PathPrefix", "value": "/api/v2"}, "method": "POST"}],
                 "backendRefs": ref(i + 1)},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                              "queryParams": [{"name": "debug", "value": "1"}]}],
                 "backendRefs": ref(i + 2)},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                 "timeouts": {"request": "10s"}, "backendRefs": ref(i)},
                {"matches": [{"path": {"type": "Exact", "value": "/healthz"}}], "backendRefs": ref(i)},
                {"matches": [static], "backendRefs": ref(i + 3),
                 **({} if i % 5 == 0 else {"filters": [{"type": "URLRewrite", "urlRewrite": {
                     "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}]})},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": ref(i)},
            ],
        })
    doc["routes"] = out
    return doc


# ---- one measurement, in its own process --------------------------------------------------------------------------


class GcClock:
    """The garbage collector's time and its longest pause (it holds the GIL: no other thread runs meanwhile)."""

    def __init__(self) -> None:
        self.total = self.longest = self._started = 0.0
        gc.callbacks.append(self._tick)

    def _tick(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            pause = time.perf_counter() - self._started
            self.total += pause
            self.longest = max(self.longest, pause)


async def _reload_on_a_loop(path: str, agent_way: bool, tick: float = 0.002) -> dict[str, Any]:
    """What the agent does on SIGHUP: a load in a worker thread while the event loop runs (here a task that wakes
    every 2 ms: its longest wait beyond that is the loop's longest stall), then the config hash on the loop.
    agent_way: the agent's own `load_off_the_loop` (collector off during the load, a large model frozen, the hash
    worked out in the thread); else plain `config.load`, as the agent did before (the same run's baseline)."""
    from lbagent.agent import agent  # noqa: PLC0415 - the tree under test, from PYTHONPATH only
    from lbagent.sources.file import config  # noqa: PLC0415 - the tree under test, from PYTHONPATH only
    from lbagent.sources.file.source import FileSource  # noqa: PLC0415 - the tree under test, from PYTHONPATH only

    loop = asyncio.get_running_loop()
    worst, loading = 0.0, True

    async def ticker() -> None:
        nonlocal worst
        last = loop.time()
        while loading:
            await asyncio.sleep(tick)
            now = loop.time()
            worst, last = max(worst, now - last - tick), now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    clock = GcClock()
    load_s = time.perf_counter()
    m = await (asyncio.to_thread(agent.load_off_the_loop, FileSource(path)) if agent_way
               else asyncio.to_thread(config.load, path))
    load_s = time.perf_counter() - load_s
    loading = False
    await task
    stall_gc = clock.longest
    start = time.perf_counter()
    m.digest()  # on the loop: the agent logs and exports the new and the old hash after a reload
    return {"stall_s": worst, "stall_gc_s": stall_gc, "digest_s": time.perf_counter() - start,
            "reload_load_s": load_s, "module": config.__file__}


def _config_module() -> Any:
    """The tree under test's config loader (from PYTHONPATH only): lbagent.sources.file.config, or lbagent.config in
    a tree from before issue 11's layout (the --before baseline)."""
    try:
        return importlib.import_module("lbagent.sources.file.config")
    except ModuleNotFoundError:
        return importlib.import_module("lbagent.config")


def measure(kind: str, path: str) -> dict[str, Any]:
    """Runs in the child: one parse (floor), one load + config hash (lbagent) or one reload on an event loop
    (loop); then the peak RSS."""
    text = Path(path).read_text(encoding="utf-8")
    clock = GcClock()
    result: dict[str, Any]
    if kind == "floor":
        start = time.perf_counter()
        yaml.load(text, Loader=yaml.CSafeLoader)
        elapsed = time.perf_counter() - start
        result = {"load_s": elapsed, "check_s": elapsed, "load_gc_s": clock.total, "module": yaml.__file__}
    elif kind in ("loop", "loop-plain"):
        result = asyncio.run(_reload_on_a_loop(path, agent_way=kind == "loop"))
    elif kind == "cli":  # the whole command, the real tools' judging included
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-P", "-m", "lbagent.ops.cli", "check", "-c", path], capture_output=True,
                              text=True, check=False)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"lbagent check -c {path}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        verdicts = {}
        for line in proc.stdout.splitlines():  # "  accepted     nft -c -f lbagent.nft", "  not checked  haproxy ..."
            words = line.split()
            if line.startswith("  ") and words:
                outcome = "not checked" if words[:2] == ["not", "checked"] else words[0]
                verdicts[words[2 if outcome == "not checked" else 1]] = outcome
        result = {"check_s": elapsed, "verdicts": verdicts, "module": str(ROOT / "lbagent"),
                  "tools_peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
    else:
        config = _config_module()

        start = time.perf_counter()
        m = config.load(path)
        load_s, load_gc_s = time.perf_counter() - start, clock.total
        m.digest()  # the rest of what `lbagent check` does
        result = {"load_s": load_s, "check_s": time.perf_counter() - start, "load_gc_s": load_gc_s,
                  "module": config.__file__}
    return {**result, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def run_child(kind: str, path: Path, tree: Path | None, timeout: float) -> dict[str, Any]:
    """One measurement in a fresh interpreter; {"timeout": s, "peak_rss_kib": at the kill} when it runs over."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    argv = [sys.executable, "-P", __file__, "--child", kind, str(path)]
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True, cwd="/") as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            peak = _peak_rss_kib(proc.pid)
            proc.kill()
            proc.communicate()
            return {"timeout": timeout, "peak_rss_kib": peak}
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} on {path.name}: exit {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if tree is not None and not result["module"].startswith(str(tree)):
        raise RuntimeError(f"{kind} imported {result['module']}, not the tree under test {tree}")
    return result


def _peak_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# ---- the run -------------------------------------------------------------------------------------------------------


def before_tree(rev: str, into: Path) -> Path:
    """lbagent as it was at `rev` (the package only, from git: nothing in the work tree changes)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "lbagent"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    libyaml = "with libyaml" if yaml.__with_libyaml__ else "without libyaml"
    return (f"{os.cpu_count()} vCPU ({cpu}), Python {platform.python_version()}, PyYAML {yaml.__version__} "
            f"({libyaml}), load average {os.getloadavg()[0]:.2f} at the start")


def _cell(runs: list[dict[str, Any]], field: str) -> dict[str, Any]:
    done = [r for r in runs if "timeout" not in r]
    over = [r["timeout"] for r in runs if "timeout" in r]
    rss = [r["peak_rss_kib"] for r in runs if r.get("peak_rss_kib")]
    cell = {"median_s": round(statistics.median(r[field] for r in done), 3) if done else None, "runs": len(done),
            "timed_out_after_s": over[0] if over else None,
            "peak_rss_mib": round(max(rss) / 1024, 1) if rss else None, "rss_at_kill": bool(over) and not done}
    # the same run's companions of the median's field
    for extra in ("load_gc_s", "stall_gc_s", "digest_s", "reload_load_s"):
        if done and extra in done[0]:
            cell[extra.removesuffix("_s") + "_median_s"] = round(statistics.median(r[extra] for r in done), 3)
    if done and "verdicts" in done[0]:  # cli: the largest process (lbagent or a tool), each tool's verdicts
        cell["peak_rss_mib"] = round(max(max(r["peak_rss_kib"], r["tools_peak_rss_kib"]) for r in done) / 1024, 1)
        cell["not_checked"] = sorted({tool for r in done for tool, v in r["verdicts"].items() if v != "accepted"})
    return cell


def _seconds(cell: dict[str, Any]) -> str:
    if cell["median_s"] is None:
        return f"> {cell['timed_out_after_s']:g} s"
    return f"{cell['median_s']:.2f} s"


def _rss(cell: dict[str, Any]) -> str:
    if cell["peak_rss_mib"] is None:
        return "-"
    return f"{'>= ' if cell['rss_at_kill'] else ''}{cell['peak_rss_mib']:.0f} MiB"


def table(results: list[dict[str, Any]], before: str) -> str:
    rows = [f"| config | floor: libyaml parse | before ({before}): check | now: config.load (GC in it) | now: check "
            "| before / now | peak RSS floor / before / now |", "|---|---|---|---|---|---|---|"]
    for r in results:
        floor, old, new, load = r["floor"], r["before"], r["now"], r["now_load"]
        if old["median_s"] is not None:
            ratio = f"{old['median_s'] / new['median_s']:.1f}x"
        else:
            ratio = f"> {old['timed_out_after_s'] / new['median_s']:.0f}x"
        rows.append(f"| {r['size']} | {_seconds(floor)} | {_seconds(old)} "
                    f"| {_seconds(load)} ({load['load_gc_median_s']:.2f} s) | **{_seconds(new)}** | {ratio} "
                    f"| {_rss(floor)} / {_rss(old)} / {_rss(new)} |")
    rows += ["", "| config | now: `lbagent check -c FILE`, the real tools' judging included (largest process) "
             "| reload, plain config.load in a thread: longest event-loop stall (GC pause in it) / load / hash on "
             "the loop | reload, the agent's load_off_the_loop: longest stall (GC pause in it) / load / hash on the "
             "loop |", "|---|---|---|---|"]
    for r in results:
        cli = r["cli"]
        unjudged = f"; not checked: {', '.join(cli['not_checked'])}" if cli.get("not_checked") else ""
        cells = [f"{c['median_s'] * 1000:,.0f} ms ({c['stall_gc_median_s'] * 1000:,.0f} ms) / "
                 f"{c['reload_load_median_s']:.2f} s / {c['digest_median_s'] * 1000:,.0f} ms"
                 for c in (r["loop_plain"], r["loop"])]
        rows.append(f"| {r['size']} | {_seconds(cli)} ({_rss(cli)}{unjudged}) | {cells[0]} | **{cells[1]}** |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--routes", type=int, nargs="*", default=[1000, 4000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help="the revision to compare with (git archive of lbagent/)")
    parser.add_argument("--before-tree", type=Path, help="an existing checkout to compare with instead")
    parser.add_argument("--before-timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return 0
    label = str(args.before_tree) if args.before_tree else args.before
    if not args.json:
        print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lbagent-bench-") as tmp:
        work = Path(tmp)
        old_tree = args.before_tree.resolve() if args.before_tree else before_tree(args.before, work)
        cases = [("services", f"{args.services:,} services x 2 ports, {args.nodes} nodes",
                  services_config(args.services, args.nodes))]
        cases += [("routes", f"{n:,} HTTP routes", routes_config(n, args.nodes)) for n in args.routes]
        results = []
        for name, size, doc in cases:
            path = work / f"{name}-{len(doc.get('routes') or doc['services'])}.yaml"
            path.write_text(yaml.dump(doc, Dumper=yaml.CSafeDumper, sort_keys=False))
            runs: dict[str, list[dict[str, Any]]] = {"floor": [], "before": [], "now": [], "loop": [],
                                                     "loop-plain": [], "cli": []}
            for _ in range(args.repeat):  # round after round, so a busy moment hits every variant alike
                runs["floor"].append(run_child("floor", path, None, LIMIT))
                if not any("timeout" in r for r in runs["before"]):
                    runs["before"].append(run_child("lbagent", path, old_tree, args.before_timeout))
                runs["now"].append(run_child("lbagent", path, ROOT, LIMIT))
                runs["loop-plain"].append(run_child("loop-plain", path, ROOT, LIMIT))
                runs["loop"].append(run_child("loop", path, ROOT, LIMIT))
                runs["cli"].append(run_child("cli", path, ROOT, LIMIT))
            result: dict[str, Any] = {
                "config": name, "size": size, "bytes": path.stat().st_size,
                "floor": _cell(runs["floor"], "load_s"), "before": _cell(runs["before"], "check_s"),
                "before_load": _cell(runs["before"], "load_s"),
                "now": _cell(runs["now"], "check_s"), "now_load": _cell(runs["now"], "load_s"),
                "loop": _cell(runs["loop"], "stall_s"), "loop_plain": _cell(runs["loop-plain"], "stall_s"),
                "cli": _cell(runs["cli"], "check_s"),
            }
            results.append(result)
            if not args.json:
                print(f"{size} ({result['bytes'] / 2**20:.1f} MiB of YAML): floor {_seconds(result['floor'])}, "
                      f"before {_seconds(result['before'])}, now {_seconds(result['now'])}, lbagent check -c "
                      f"{_seconds(result['cli'])}, event-loop stall "
                      f"{result['loop_plain']['median_s'] * 1000:.0f} ms plain, "
                      f"{result['loop']['median_s'] * 1000:.0f} ms the agent's way",
                      flush=True)
    if args.json:
        print(json.dumps({"machine": machine(), "before": label, "repeat": args.repeat, "results": results},
                         indent=2))
    print(f"\n{table(results, label)}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
