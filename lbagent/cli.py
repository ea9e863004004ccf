"""The `lbagent` command: run the daemon, check a config, show the plan, clean up, print the version."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from typing import Any

from lbagent import __version__, config, model
from lbagent.plan import all_healthy, plan
from lbagent.render import exabgp, nftables


def _load_or_report(path: str) -> model.Model | None:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        print(f"{exc.source}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    m = _load_or_report(args.config)
    if m is None:
        return 1
    print(f"{args.config}: ok ({len(m.services)} services, {len(m.nodes)} nodes, "
          f"{len(m.bgp.peers)} BGP peers; config hash {m.digest()})")
    return 0


def _plan_document(m: model.Model) -> dict[str, Any]:
    p = plan(m, all_healthy(m))
    return {
        "assumption": "every node healthy for every service (plan does not probe)",
        "configHash": m.digest(),
        "vips": [{"address": str(v), "interface": m.vip_interface} for v in p.vips],
        "decisions": [
            {"service": d.service, "vip": str(d.vip), "announce": d.announce, "reason": d.reason.value,
             "healthyNodes": list(d.healthy_nodes)}
            for d in p.decisions
        ],
        "frontends": [
            {"service": f.service, "port": f.port_name, "vip": str(f.vip), "protocol": f.protocol.value,
             "listen": f.port, "backends": [f"{b.node}={b.address}:{b.port}" for b in f.backends]}
            for f in p.frontends
        ],
        "bgp": {
            "localAS": m.bgp.local_as, "routerID": str(m.bgp.router_id),
            "peers": [{**asdict(peer), "address": str(peer.address), "password": "***" if peer.password else None,
                       "local_address": str(peer.local_address) if peer.local_address else None}
                      for peer in m.bgp.peers],
            "announcements": [exabgp.announce_command(a) for a in p.announcements.values()],
        },
        "sysctls": {k.replace("/", "."): v for k, v in p.sysctls.items()},
        "nftables": nftables.render(p.frontends, p.vips, m.dataplane),
    }


def cmd_plan(args: argparse.Namespace) -> int:
    m = _load_or_report(args.config)
    if m is None:
        return 1
    doc = _plan_document(m)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"# plan for {m.node_name} (config hash {doc['configHash']}); {doc['assumption']}")
    print("\n## VIPs bound on", m.vip_interface)
    for vip in doc["vips"]:
        print(f"  {vip['address']}")
    print("\n## Services")
    for d in doc["decisions"]:
        verdict = "announce" if d["announce"] else "withdraw"
        nodes = ", ".join(d["healthyNodes"]) or "-"
        print(f"  {d['service']:<32} {d['vip']:<20} {verdict} ({d['reason']}) nodes: {nodes}")
    print("\n## BGP (ExaBGP API commands, sent to every peer)")
    for peer in doc["bgp"]["peers"]:
        print(f"  peer {peer['address']} AS {peer['peer_as']} hold {peer['hold_time']}s")
    for line in doc["bgp"]["announcements"]:
        print(f"  {line}")
    print("\n## sysctls")
    for key, value in doc["sysctls"].items():
        print(f"  {key} = {value}")
    print("\n## nftables (applied with `nft -f` in one transaction)")
    print(doc["nftables"], end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lbagent import logfmt
    from lbagent.agent import Agent

    logfmt.setup(args.log_level, with_time=not args.no_timestamps)
    m = _load_or_report(args.config)
    if m is None:
        return 1
    return asyncio.run(Agent(args.config, m).run())


def cmd_cleanup(args: argparse.Namespace) -> int:
    from lbagent.apply.nftables import NftError, run_nft
    from lbagent.apply.vips import VipBinder

    m = _load_or_report(args.config)
    if m is None:
        return 1
    async def cleanup() -> set[model.IPAddress]:
        binder = VipBinder(m.vip_interface)
        removed = await binder.bound()
        await binder.sync([])
        await run_nft(["-f", "-"], nftables.render_delete(m.dataplane))
        return removed

    try:
        removed = asyncio.run(cleanup())
    except NftError as exc:
        print(f"cannot remove table inet {m.dataplane.table}: {exc}", file=sys.stderr)
        return 1
    print(f"removed table inet {m.dataplane.table} and VIPs {', '.join(map(str, sorted(removed, key=str))) or '-'}")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"lbagent {__version__}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lbagent", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", required=True)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--no-timestamps", action="store_true", help="leave timestamps to journald")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a config file; non-zero exit with every problem listed")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=cmd_check)
    plan_cmd = sub.add_parser("plan", help="print what would be programmed (needs no root)")
    plan_cmd.add_argument("-c", "--config", required=True)
    plan_cmd.add_argument("--json", action="store_true")
    plan_cmd.set_defaults(func=cmd_plan)
    cleanup = sub.add_parser("cleanup", help="remove lbagent's nftables table and the VIPs it bound")
    cleanup.add_argument("-c", "--config", required=True)
    cleanup.set_defaults(func=cmd_cleanup)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
