"""A backend that refuses clients: how long it stays in rotation, with and without the probe a refusal asks for.

The namespace lab with both agents (nftables, probes every 0.5 s, fall 2). A client opens one connection per
request to the VIP; node2's service stops; the time until node2 is out of both LBs' tables and the requests
refused meanwhile are counted. Rounds alternate `probeOnRefusal: true` (the default) and `false` (the probes'
schedule alone: the baseline, in the same run), changed by SIGHUP.

Usage: .venv/bin/python bench/refusals.py [--rounds 5] [--json]   (root)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab.lab import DEFAULT_SERVICES, Lab, address, wait_for
from tests.lab.traffic import RequestLoop

LBS = ("lb1", "lb2")
VIP = str(DEFAULT_SERVICES[0]["vip"])  # the lab's own service
LB_UPLINKS = {lb: address(lb, "uplink") for lb in LBS}


def _set_probe_on_refusal(lab: Lab, on: bool) -> None:
    for lb in LBS:
        config = lab.agent_config(lb)
        config["healthCheckDefaults"]["probeOnRefusal"] = on
        lab.write_agent_config(lb, config)
        mark = len(lab.agent_log(lb))
        lab.signal_agent(lb, signal.SIGHUP)

        def reloaded(lb: str = lb, mark: int = mark) -> bool:
            return any(f"event=config_{what}" in lab.agent_log(lb)[mark:] for what in ("loaded", "unchanged"))

        wait_for(reloaded, timeout=20, message=f"{lb} to reload")


def _round(lab: Lab) -> dict[str, float]:
    node2 = address("node2")
    wait_for(lambda: all(node2 in lab.nft_ruleset(lb) for lb in LBS), timeout=30, message="node2 in rotation")
    with RequestLoop(lab, f"http://{VIP}/") as loop:
        wait_for(lambda: len(loop.answers) >= 10, timeout=10, message="requests flowing")
        lab.stop_backend("node2")
        stopped = time.monotonic()
        wait_for(lambda: all(node2 not in lab.nft_ruleset(lb) for lb in LBS), timeout=30,
                 message="node2 out of rotation")
        took = time.monotonic() - stopped
        refused = sum(1 for t in loop.failures if t >= stopped)
    lab.start_backend("node2")
    return {"out_ms": round(took * 1000), "refused": refused}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (the namespace lab)", file=sys.stderr)
        return 1
    results: dict[str, list[dict[str, float]]] = {"probeOnRefusal": [], "schedule only (baseline)": []}
    lab = Lab()
    lab.up()
    try:
        wait_for(lambda: lab.router_nexthops(f"{VIP}/32") == set(LB_UPLINKS.values()), timeout=20,
                 message="the router to learn the VIP from both LBs")
        for _ in range(args.rounds):
            for on, name in ((True, "probeOnRefusal"), (False, "schedule only (baseline)")):
                _set_probe_on_refusal(lab, on)
                results[name].append(_round(lab))
                if not args.json:
                    print(f"{name}: {results[name][-1]}", flush=True)
    finally:
        lab.down()
    summary: dict[str, Any] = {
        name: {"out_ms_median": statistics.median(r["out_ms"] for r in rounds),
               "out_ms_range": [min(r["out_ms"] for r in rounds), max(r["out_ms"] for r in rounds)],
               "refused_median": statistics.median(r["refused"] for r in rounds),
               "refused_range": [min(r["refused"] for r in rounds), max(r["refused"] for r in rounds)]}
        for name, rounds in results.items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
