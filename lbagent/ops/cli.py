"""The `lbagent` command: run the daemon, check a config, show the plan, clean up, print the version."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lbagent import __version__, files, model
from lbagent.l4.iptables import render as iptables
from lbagent.l4.ipvs import mh
from lbagent.l4.ipvs import render as ipvs
from lbagent.l4.nftables import render as nftables
from lbagent.ops.artifacts import plan_document
from lbagent.plan.services import all_healthy, plan
from lbagent.sources import Problem, Source, SourceError


def _load_or_report(path: str, warnings: list[Problem] | None = None, apart: bool = False) -> model.Model | None:
    """The config's model, or None after printing every problem. `apart`: parsed in a child process, so that this
    one never imports the config schemas (`run`: lbagent.sources.file.apart)."""
    from lbagent.sources.file import apart as in_child

    try:
        if apart:
            return in_child.load(path, warnings)
        from lbagent.sources.file import config

        return config.load(path, warnings)
    except SourceError as exc:
        print(f"{exc.source}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    warnings: list[Problem] = []
    m = _load_or_report(args.config, warnings)
    if m is None:
        return 1
    if warnings:  # served all the same: said, but not a refusal
        print(f"{args.config}: {len(warnings)} warning(s)", file=sys.stderr)
        for warning in warnings:
            print(f"  warning: {warning.for_warning()}", file=sys.stderr)
    unsafe = files.runtime_dir_problems(m.agent.runtime_dir)
    if unsafe:
        line = _field_lines(args.config)("agent.runtimeDir")
        print(f"{args.config}: {len(unsafe)} problem(s)", file=sys.stderr)
        for problem in unsafe:
            print(f"  {f'line {line}: ' if line else ''}agent.runtimeDir: {problem}", file=sys.stderr)
        return 1
    summary = (f"{len(m.services)} services, {len(m.nodes)} nodes, {len(m.bgp.peers)} BGP peers; "
               f"config hash {m.digest()}")
    if not args.no_tools and not _tools_accept(args.config, m):
        return 1
    print(f"{args.config}: ok ({summary})")
    return 0


def _field_lines(source: str) -> Callable[[str], int | None]:
    """A field path's line in the config file (None when it cannot be found)."""
    try:
        text = Path(source).read_text(errors="replace")
    except OSError:
        return lambda path: None
    from lbagent.sources.file import config

    return lambda path: config.field_line(text, path)


def _tools_accept(source: str, m: model.Model) -> bool:
    """Each real tool's verdict on what `run` would write, one line each; False when one refused."""
    from lbagent.ops import judge  # `check` only: it reads certificates (cryptography), which `run` need not load

    try:
        verdicts = judge.judge(m)
    except ValueError as exc:  # a renderer refused what the checks passed: a bug in lbagent, said as such
        print(f"{source}: lbagent cannot render what it would run for this config: {exc}", file=sys.stderr)
        return False
    refused = []
    for verdict in verdicts:
        if verdict.outcome is not judge.Outcome.REFUSED:
            reason = f": {' '.join(verdict.detail)}" if verdict.detail else ""
            print(f"  {verdict.outcome.value:<12} {verdict.judge}{reason}", flush=True)
            continue
        refused.append(verdict.judge)
        print(f"  {verdict.outcome.value:<12} {verdict.judge}", file=sys.stderr)
        for line in verdict.detail:
            print(f"      {line}", file=sys.stderr)
        if verdict.artifact_line:
            print(f"    at {verdict.artifact_line}", file=sys.stderr)
        if verdict.origins:
            print(f"    from {judge.where(verdict.origins, _field_lines(source))}", file=sys.stderr)
    if refused:
        print(f"{source}: refused by {', '.join(refused)} (lbagent's own checks passed; what `run` would write "
              f"for this config is not)", file=sys.stderr)
        return False
    return True


def _endpoint(text: str) -> tuple[model.IPAddress, int]:
    endpoint = model.Endpoint.parse(text)
    return endpoint.address, endpoint.port


def cmd_flow(m: model.Model, flow: str) -> int:
    """Which node a new flow goes to, as the configured data plane decides it with its own hash (all nodes assumed
    healthy); for an IPVS scheduler that decides by state no config shows, the candidates and why."""
    try:
        parts = [p.strip() for p in flow.split(",")]
        if len(parts) not in (2, 3):
            raise ValueError("expected CLIENT:PORT,VIP:PORT[,tcp|udp]")
        (source, source_port), (vip, port) = _endpoint(parts[0]), _endpoint(parts[1])
        protocol = model.Protocol((parts[2] if len(parts) == 3 else "tcp").upper())
    except ValueError as exc:
        print(f"--flow {flow!r}: {exc}", file=sys.stderr)
        return 2
    p = plan(m, all_healthy(m))
    frontend = next((f for f in p.frontends if f.vip == vip and f.port == port and f.protocol is protocol), None)
    if frontend is None:
        print(f"no service listens on {protocol.value} {vip} port {port}: the LB refuses the flow")
        return 1
    what = f"{protocol.value} {parts[0]} -> {parts[1]} ({frontend.service})"
    if not frontend.active:
        print(f"{frontend.service}: no node takes new flows")
        return 1
    hashed = "client address (session affinity)" if frontend.affinity_timeout else "client address and port"
    kind = m.dataplane.kind
    notes: list[str] = []
    if kind is model.DataplaneKind.NFTABLES:
        backend = nftables.predict(frontend, source, source_port, m.dataplane.maglev_table_size)
        how = f"Maglev slot by nft's jhash of the {hashed}; every LB node running nftables agrees"
    elif kind is model.DataplaneKind.IPTABLES:
        backend = iptables.predict(frontend, source, source_port, m.dataplane.maglev_table_size)
        how = f"Maglev slot by HMARK's hash of the {hashed}; every LB node running iptables agrees"
    elif frontend.scheduler != "mh":
        nodes = ", ".join(f"{b.node} {b.address}:{frontend.node_port}" for b in frontend.active)
        print(f"{what} goes to one of {nodes}: IPVS {frontend.scheduler} {_UNPREDICTABLE[frontend.scheduler]}")
        return 0
    else:
        index, where = _mh_table_index()
        backend = ipvs.predict(frontend, source, source_port, index)
        how = f"IPVS mh: Maglev slot by the kernel's hsiphash (64-bit kernels) of the {hashed}"
        notes = [f"the kernel's mh table has {mh.table_size(index)} slots ({where})",
                 "holds while the service's real servers are the ones lbagent added when it created it: the kernel "
                 "fills the table in the order they were added, so a node deleted and added back since can move a "
                 "few slots (a few flows in a thousand), and LB nodes that saw different changes can disagree on those"]
    if backend is None:  # not expected with an active backend; said rather than guessed
        print(f"{what}: the {kind.value} data plane refuses it")
        return 1
    if len(frontend.active) == 1:
        how = "the only node taking new flows"
    print(f"{what} goes to {backend.node} {backend.address}:{frontend.node_port} ({how})")
    for note in notes:
        print(f"  {note}")
    return 0


# Why IPVS places a flow by what happened before it, per scheduler lbagent can configure (but mh).
_UNPREDICTABLE = {
    "rr": "gives each new connection to the next node in turn on the LB node that gets it, so the answer depends on "
          "every connection before it: lbagent cannot predict it",
    "wrr": "gives each new connection to the next node in weighted turn on the LB node that gets it, so the answer "
           "depends on every connection before it: lbagent cannot predict it",
    "lc": "gives each new connection to the node with the fewest connections on the LB node that gets it at that "
          "moment: lbagent cannot predict it",
    "sh": "hashes the client address into a table the kernel fills in the order the real servers were added, which "
          "no config shows: lbagent predicts only mh",
}


def _mh_table_index(release: str | None = None,
                    paths: tuple[str, ...] = ("/proc/config.gz", "/boot/config-{release}")) -> tuple[int, str]:
    """The IPVS mh table size this machine's kernel was built with (CONFIG_IP_VS_MH_TAB_INDEX) and where that was
    read; the kernel's default when its build config does not say (`plan` may run on another machine than the LB)."""
    release = release or os.uname().release
    for template in paths:
        path = template.format(release=release)
        try:
            raw = Path(path).read_bytes()
            if path.endswith(".gz"):
                raw = gzip.decompress(raw)
        except (OSError, EOFError):
            continue
        for line in raw.decode(errors="replace").splitlines():
            if line.startswith("CONFIG_IP_VS_MH_TAB_INDEX="):
                value = line.partition("=")[2]
                if value.isdigit() and 8 <= int(value) <= 17:
                    return int(value), f"CONFIG_IP_VS_MH_TAB_INDEX={value} in {path}"
        return mh.DEFAULT_TABLE_INDEX, (f"assumed: the default CONFIG_IP_VS_MH_TAB_INDEX={mh.DEFAULT_TABLE_INDEX}; "
                                        f"{path} has no IPVS mh, so this is not the LB node's kernel")
    return mh.DEFAULT_TABLE_INDEX, (f"assumed: the default CONFIG_IP_VS_MH_TAB_INDEX={mh.DEFAULT_TABLE_INDEX}; this "
                                    f"machine's kernel build config is not readable")


def cmd_plan(args: argparse.Namespace) -> int:
    m = _load_or_report(args.config)
    if m is None:
        return 1
    if args.flow:
        return cmd_flow(m, args.flow)
    try:
        doc = plan_document(m)
    except ValueError as exc:
        print(f"{args.config}: lbagent cannot render what it would run for this config: {exc}", file=sys.stderr)
        return 1
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
        print(f"  {d['service']:<32} {','.join(d['vips']):<20} {verdict} ({d['reason']}) nodes: {nodes}")
    print("\n## BGP (ExaBGP API commands, sent to every peer)")
    for peer in doc["bgp"]["peers"]:
        print(f"  peer {peer['address']} AS {peer['peer_as']} hold {peer['hold_time']}s")
    for line in doc["bgp"]["announcements"]:
        print(f"  {line}")
    print("\n## sysctls")
    for key, value in doc["sysctls"].items():
        print(f"  {key} = {value}")
    if doc["nftables"] is not None:
        print("\n## nftables (applied with `nft -f` in one transaction)")
        print(doc["nftables"], end="")
    if doc["nftablesDsr"] is not None:
        dsr = doc["nftablesDsr"]
        print("\n## nftables, direct server return (as this host's interfaces and routes give it)")
        for interface in dsr["missingInterfaces"]:
            print(f"  # dataplane.dsrInterfaces {interface}: not on this host")
        for node, address in dsr["notOnLink"].items():
            print(f"  # node {node} {address}: not on-link from this host, left out")
        print(dsr["text"], end="")
    for family, rules in (doc["iptables"] or {}).items():
        print(f"\n## iptables, {family} (applied with `iptables-restore --noflush`)")
        print(rules, end="")
    if doc["ipvs"] is not None:
        print("\n## IPVS services (created over netlink, in this order)")
        for op in doc["ipvs"]["operations"]:
            print(f"  {op}")
        print("\n## nftables beside IPVS (source ranges, masquerade, refusals)")
        print(doc["ipvs"]["nftables"], end="")
    if doc["haproxy"] is not None:
        print("\n## HTTP listeners (routes in precedence order: the first that matches takes the request)")
        for listener in doc["listeners"]:
            vips = ",".join(listener["vips"])
            redirect = listener["redirectToHTTPS"]
            print(f"  {listener['listener']} {listener['protocol']} {vips} port {listener['port']}"
                  + (f" -> redirect to HTTPS port {redirect}" if redirect else ""))
            for route in listener["routes"]:
                print(f"    {route['host']:<24} {route['match']:<40} -> {route['backend']}  ({route['where']})")
            if not listener["redirectToHTTPS"]:
                print(f"    {'*':<24} {'anything else':<40} -> {listener['defaultBackend']}")
        print("\n## haproxy.cfg (checked with `haproxy -c`, applied by seamless reload or the runtime API)")
        print(doc["haproxy"], end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lbagent import logfmt
    from lbagent.agent.agent import Agent
    from lbagent.sources.file.source import FileSource

    logfmt.setup(args.log_level, with_time=not args.no_timestamps)
    m = _load_or_report(args.config, apart=True)
    if m is None:
        return 1
    source: Source = FileSource(args.config, first=m)
    if m.kubernetes is not None:
        from lbagent.sources.kubernetes.source import KubernetesSource

        source = KubernetesSource(args.config, identity=m.node_name)
    return asyncio.run(Agent(source, m).run(serve_metrics=True))


def cmd_cleanup(args: argparse.Namespace) -> int:
    from lbagent.l3.vips import VipBinder
    from lbagent.l4.forwarder import make_forwarder
    from lbagent.l4.ipvs.apply import IpvsError
    from lbagent.l4.nft import NftError

    m = _load_or_report(args.config)
    if m is None:
        return 1
    async def cleanup() -> set[model.IPAddress]:
        binder = VipBinder(m.vip_interface)
        removed = await binder.bound()
        await binder.sync([])
        await make_forwarder(m.dataplane).cleanup()
        return removed

    try:
        removed = asyncio.run(cleanup())
    except (NftError, IpvsError, OSError) as exc:
        print(f"cannot remove the {m.dataplane.kind.value} data plane: {exc}", file=sys.stderr)
        return 1
    vips = ", ".join(map(str, sorted(removed, key=str))) or "-"
    print(f"removed lbagent's {m.dataplane.kind.value} data plane and VIPs {vips}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from lbagent.agent import status

    if args.socket:
        path = Path(args.socket)
    else:
        m = _load_or_report(args.config)
        if m is None:
            return 1
        path = Path(m.agent.runtime_dir) / status.SOCKET_NAME
    try:
        doc = status.query(path)
    except OSError as exc:
        print(f"cannot reach the agent at {path}: {exc} (is `lbagent run` up, and are you root?)", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if args.json else status.render(doc))
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
    check = sub.add_parser("check", help="validate a config file and what `run` would write for it with the real "
                                         "tools; non-zero exit with every problem listed")
    check.add_argument("-c", "--config", required=True)
    check.add_argument("--no-tools", action="store_true",
                       help="only lbagent's own checks: do not ask nft, iptables, haproxy and exabgp")
    check.set_defaults(func=cmd_check)
    plan_cmd = sub.add_parser("plan", help="print what would be programmed (needs no root)")
    plan_cmd.add_argument("-c", "--config", required=True)
    plan_cmd.add_argument("--json", action="store_true")
    plan_cmd.add_argument("--flow", metavar="CLIENT:PORT,VIP:PORT[,tcp|udp]",
                          help="say which node this new flow goes to, by the configured data plane's own hash "
                               "(all nodes healthy)")
    plan_cmd.set_defaults(func=cmd_plan)
    cleanup = sub.add_parser("cleanup", help="remove what lbagent programmed in its data plane and the VIPs it bound")
    cleanup.add_argument("-c", "--config", required=True)
    cleanup.set_defaults(func=cmd_cleanup)
    status_cmd = sub.add_parser("status", help="ask the running agent what it is doing")
    where = status_cmd.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", help="the agent's config (for agent.runtimeDir)")
    where.add_argument("--socket", help="the status socket itself")
    status_cmd.add_argument("--json", action="store_true")
    status_cmd.set_defaults(func=cmd_status)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
