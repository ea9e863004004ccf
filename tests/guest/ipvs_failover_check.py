"""Runs in the guest for test_ipvs_failover.py: two LB namespaces running IpvsForwarder with the same frontends, and
long-lived connections moved between them mid-stream, in nat mode and in dsr mode (IPVS direct routing).

    client -- router ==front bridge== lbA, lbB (VIP on lo, IPVS)
                     ==back bridge=== lbA, lbB, be1, be2, be3 (the "nodes")

The router sends the VIP to lbA or lbB (one static route, switched by the check: what the routers' ECMP does when
an LB comes or goes). The nodes mark each connection by the MAC address of the LB its latest packet came from and
route their nat answers back through that LB (tests/lab/lab.py return_path_ruleset); dsr packets, still addressed
to the VIP, are taken to the nodePort (kube-proxy's `ipMode: VIP`, tests/lab/lab.py load_balancer_ip_ruleset; here
a `dnat` to the node's own address) and answered through the router, never an LB. Both LBs get the agent's sysctls
(IPVS_SYSCTLS and nf_conntrack_tcp_be_liberal, through lbagent.l3.vips.apply_sysctls): once as they are, once with
`sloppy_tcp=0` to show what that setting does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from lbagent import model
from lbagent.l3.vips import apply_sysctls
from lbagent.l4.ipvs.apply import IpvsForwarder, load_ipvs
from lbagent.plan.services import CONNTRACK_LIBERAL, IPVS_SYSCTLS, Backend, Frontend
from tests.guest.ipvs_forwarder_check import Connection, _Http, fetch, spread
from tests.guest.ipvs_smoke import Namespaces, ip, netns
from tests.lab.lab import LabTimeout, wait_for

# Documentation addresses only.
CLIENT = "192.0.2.2"
ROUTER_CLIENT_SIDE = "192.0.2.1"
ROUTER_FRONT = "198.51.100.1"
ROUTER_BACK = "203.0.113.254"
VIP = "198.51.100.200"
LBS = {"lbA": ("198.51.100.2", "203.0.113.1", "02:00:00:00:00:0a", 1),
       "lbB": ("198.51.100.3", "203.0.113.2", "02:00:00:00:00:0b", 2)}  # front, back, back MAC, return mark
NODES = {"be1": "203.0.113.11", "be2": "203.0.113.12", "be3": "203.0.113.13"}
FAR_NODE = ("far", "192.0.2.50")  # reached through a gateway from the LBs: no MAC address there, left out of dsr
NAT_PORT, NAT_NODE_PORT = 80, 30080
DSR_PORT, DSR_NODE_PORT = 81, 30081
TABLE = "lbagent"
REQUEST_INTERVAL = 0.05
# The agent's settings for an IPVS LB node (lbagent.plan.services.sysctls with VIPs on lo).
AGENT_SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/ipv4/conf/all/arp_ignore": "1",
    "net/ipv4/conf/all/arp_announce": "2",
    CONNTRACK_LIBERAL: "1",
    **IPVS_SYSCTLS,
}


def log(message: str) -> None:
    print(f"check[{time.monotonic():.1f}]: {message}", file=sys.stderr, flush=True)


def sh(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True).stdout


def nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True)


def no_rp_filter(ns: str) -> None:
    """Reverse-path filtering off on every interface (the router gets dsr answers from the VIP on the back side)."""
    sh(ns, "sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done")


# -- the lab ------------------------------------------------------------------------------------------------------

def frontends() -> list[Frontend]:
    tcp, nat, dsr = model.Protocol.TCP, model.ForwardingMode.NAT, model.ForwardingMode.DSR
    vip = ip_address(VIP)
    nodes = tuple(Backend(be, ip_address(a)) for be, a in NODES.items())
    far = Backend(FAR_NODE[0], ip_address(FAR_NODE[1]))
    return [
        Frontend("lab/nat", "http", vip, tcp, NAT_PORT, nodes, NAT_NODE_PORT, mode=nat, scheduler="mh"),
        Frontend("lab/dsr", "http", vip, tcp, DSR_PORT, (*nodes, far), DSR_NODE_PORT, mode=dsr, scheduler="mh"),
    ]


def node_ruleset(address: str) -> str:
    """The nodes' return path (nat) and their kube-proxy stand-in for the VIP (dsr): VIP:port to the node's own
    nodePort. The lab's `redirect` does the same, but the guest's initramfs has no nft_redir module; `dnat` to
    the node's own address is what redirect does for a packet that comes in on e0."""
    return "\n".join([
        "table inet lab {",
        "  chain prerouting_mark {",
        "    type filter hook prerouting priority mangle; policy accept;",
        *(f"    ether saddr {mac} fib daddr type local ct mark set {mark}" for _, _, mac, mark in LBS.values()),
        "    ct mark != 0 meta mark set ct mark",
        "  }",
        "  chain output {",
        "    type route hook output priority mangle; policy accept;",
        "    ct mark != 0 meta mark set ct mark",
        "  }",
        "  chain lbip {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        f"    ip daddr {VIP} tcp dport {DSR_PORT} dnat ip to {address}:{DSR_NODE_PORT}",
        "  }",
        "}",
    ]) + "\n"


def lb_probe_ruleset() -> str:
    """Counters on an LB: what it receives for each frontend from the router, and what the nodes send it back."""
    return "\n".join([
        "table inet probe {",
        "  chain prerouting {",
        "    type filter hook prerouting priority -400; policy accept;",
        f'    iifname "f0" ip daddr {VIP} tcp dport {NAT_PORT} counter comment "to_nat"',
        f'    iifname "f0" ip daddr {VIP} tcp dport {DSR_PORT} counter comment "to_dsr"',
        f'    iifname "b0" ip saddr {VIP} counter comment "answers_from_vip"',
        f'    iifname "b0" tcp sport {NAT_NODE_PORT} counter comment "nat_answers"',
        "  }",
        "}",
    ]) + "\n"


def router_probe_ruleset() -> str:
    return "\n".join([
        "table inet probe {",
        "  chain prerouting {",
        "    type filter hook prerouting priority -400; policy accept;",
        f'    iifname "back" ip saddr {VIP} counter comment "answers_from_vip"',
        "  }",
        "}",
    ]) + "\n"


def counters(ns: str) -> dict[str, int]:
    """The probe rules' packet counts, by their comments."""
    listing = json.loads(sh(ns, "nft", "-j", "list", "chain", "inet", "probe", "prerouting"))
    out: dict[str, int] = {}
    for item in listing["nftables"]:
        rule = item.get("rule")
        if rule and "comment" in rule:
            out[rule["comment"]] = next(int(e["counter"]["packets"]) for e in rule["expr"] if "counter" in e)
    return out


def build_lab(ns: Namespaces, stack: ExitStack) -> None:
    r = ns["router"]
    ip(batch=[
        f"link add c0 netns {ns['client']} type veth peer name r0 netns {r}",
        *(f"link add f0 netns {ns[lb]} type veth peer name f{lb[-1]} netns {r}" for lb in LBS),
        *(f"link add b0 netns {ns[lb]} address {mac} type veth peer name b{lb[-1]} netns {r}"
          for lb, (_, _, mac, _) in LBS.items()),
        *(f"link add e0 netns {ns[be]} type veth peer name {be} netns {r}" for be in NODES),
    ])
    ip("-n", ns["client"], batch=[
        "link set lo up", f"addr add {CLIENT}/24 dev c0", "link set c0 up",
        f"route add default via {ROUTER_CLIENT_SIDE}",
    ])
    ip("-n", r, batch=[
        "link set lo up", f"addr add {ROUTER_CLIENT_SIDE}/24 dev r0", "link set r0 up",
        "link add front type bridge", f"addr add {ROUTER_FRONT}/25 dev front", "link set front up",
        "link add back type bridge", f"addr add {ROUTER_BACK}/24 dev back", "link set back up",
        *(line for lb in LBS for line in (f"link set f{lb[-1]} master front", f"link set f{lb[-1]} up",
                                          f"link set b{lb[-1]} master back", f"link set b{lb[-1]} up")),
        *(line for be in NODES for line in (f"link set {be} master back", f"link set {be} up")),
        f"route add {VIP}/32 via {LBS['lbA'][0]}",
    ])
    sh(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    for lb, (front, back, _, _) in LBS.items():
        ip("-n", ns[lb], batch=[
            "link set lo up", f"addr add {VIP}/32 dev lo",
            f"addr add {front}/25 dev f0", "link set f0 up", f"addr add {back}/24 dev b0", "link set b0 up",
            f"route add default via {ROUTER_FRONT}",
        ])
        nft(ns[lb], lb_probe_ruleset())
    nft(r, router_probe_ruleset())
    for be, address in NODES.items():
        ip("-n", ns[be], batch=[
            "link set lo up", f"addr add {address}/24 dev e0", "link set e0 up",
            f"route add default via {ROUTER_BACK}",
            *(line for _, back, _, mark in LBS.values()
              for line in (f"route add default via {back} table {100 + mark}",
                           f"rule add fwmark {mark} table {100 + mark}")),
        ])
        sh(ns[be], "sysctl", "-qw", "net.ipv4.conf.all.src_valid_mark=1", "net.ipv4.tcp_fwmark_accept=1")
        nft(ns[be], node_ruleset(address))
        with netns(ns[be]):
            servers = [_Http(be, address, port) for port in (NAT_NODE_PORT, DSR_NODE_PORT)]
        for server in servers:
            stack.callback(server.server_close)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            stack.callback(server.shutdown)
    for name in ns.names:
        no_rp_filter(ns[name])


def set_sysctls(ns: str, sloppy: bool) -> dict[str, str]:
    """The agent's settings, written as the agent writes them (in the LB's namespace: /proc/sys/net is per
    namespace of whoever opens it); read back."""
    settings = {**AGENT_SYSCTLS, "net/ipv4/vs/sloppy_tcp": "1" if sloppy else "0"}
    with netns(ns):
        load_ipvs()
        apply_sysctls(settings)
        return {key: path.read_text().strip() for key in settings if (path := Path("/proc/sys", key)).exists()}


class Lb:
    """One LB namespace with its own IpvsForwarder, as one agent."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.forwarder = IpvsForwarder(model.Dataplane(kind=model.DataplaneKind.IPVS, table=TABLE))

    def apply(self, fronts: Sequence[Frontend]) -> list[str]:
        with netns(self.ns):
            asyncio.run(self.forwarder.apply(fronts, [ip_address(VIP)]))
        return [str(op) for op in self.forwarder.last_ops]

    def ipvsadm(self) -> str:
        return sh(self.ns, "ipvsadm", "-Ln")


# -- long-lived connections ---------------------------------------------------------------------------------------

class Phase:
    """Which LB the router sends the VIP to, numbered: 0 lbA, 1 lbB, 2 lbA again. `number` changes once the route
    has changed (an answer to a request sent after that came through the new LB), `started` before it does (a
    failure after that may be the move's doing)."""

    def __init__(self) -> None:
        self.number = 0
        self.started = 0


class Keeper(threading.Thread):
    """A keep-alive HTTP connection sending a request every REQUEST_INTERVAL until stopped or it fails."""

    def __init__(self, ns: str, port: int, phase: Phase) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.phase = phase
        self.conn = Connection(ns, CLIENT, VIP, port)
        self.source_port = int(self.conn.sock.getsockname()[1])
        self.answers: list[tuple[int, str, str]] = []  # (phase, node, client address the node saw)
        self.error: tuple[int, str] | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            phase = self.phase.number
            try:
                reply = self.conn.get()
            except OSError as exc:
                self.error = (self.phase.started, type(exc).__name__)
                return
            self.answers.append((phase, reply["backend"], reply["client"]))
            self.stopping.wait(REQUEST_INTERVAL)

    def answered_in(self, phase: int) -> int:
        return sum(1 for p, _, _ in self.answers if p == phase)

    def report(self) -> dict[str, Any]:
        return {
            "port": self.port, "source_port": self.source_port,
            "nodes": sorted({node for _, node, _ in self.answers}),
            "clients": sorted({client for _, _, client in self.answers}),
            "answers_by_phase": [self.answered_in(p) for p in range(3)],
            "error": self.error,
        }


def ipvs_connections(ns: str) -> dict[str, list[str]]:
    """`ipvsadm -Lnc` of the client's connections: client port -> [state, real server]."""
    out: dict[str, list[str]] = {}
    for line in sh(ns, "ipvsadm", "-Lnc").splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[3].startswith(f"{CLIENT}:"):
            out[fields[3].rpartition(":")[2]] = [fields[2], fields[5]]
    return out


def route_via(router: str, lb: str) -> None:
    subprocess.run(["ip", "-n", router, "route", "replace", f"{VIP}/32", "via", LBS[lb][0]], check=True)


def moves(ns: Namespaces, per_port: int, route: Sequence[str], answers: int) -> dict[str, Any]:
    """`per_port` connections to each frontend while the router's route for the VIP goes through `route` in turn;
    each phase ends once every connection has `answers` answers in it or has failed."""
    phase = Phase()
    route_via(ns["router"], route[0])
    keepers: list[Keeper] = []
    report: dict[str, Any] = {"route": list(route), "lb_packets_by_phase": []}
    try:
        for port in (NAT_PORT, DSR_PORT):
            keepers += [Keeper(ns["client"], port, phase) for _ in range(per_port)]
        for k in keepers:
            k.start()
        for number, lb in enumerate(route):
            before = {name: counters(ns[name]) for name in LBS}
            if number:
                phase.started = number
                route_via(ns["router"], lb)
                phase.number = number
            log(f"phase {number}: via {lb}")
            def phase_done(n: int = number) -> bool:
                return all(k.error is not None or k.answered_in(n) >= answers for k in keepers)

            try:
                wait_for(phase_done, 30, message=f"{answers} answers per connection via {lb}")
            except LabTimeout as exc:
                report.setdefault("timeouts", []).append(str(exc))
            after = {name: counters(ns[name]) for name in LBS}
            report["lb_packets_by_phase"].append({
                name: {probe: after[name][probe] - before[name][probe] for probe in ("to_nat", "to_dsr")}
                for name in LBS
            })
        # Each LB's IPVS connections for these flows while they are still open: (LB, client port) -> real server.
        report["ipvs_connections"] = {name: ipvs_connections(ns[name]) for name in LBS}
    finally:
        for k in keepers:
            k.stopping.set()
        for k in keepers:
            k.join(timeout=15)
            k.conn.close()
    report["connections"] = [k.report() for k in keepers]
    return report


# -- the check ------------------------------------------------------------------------------------------------------

class Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "lbagent_fields", {})  # lbagent.logfmt.event's fields
        self.records.append({"event": record.getMessage(), **{str(k): str(v) for k, v in fields.items()}})


@contextmanager
def captured_events() -> Iterator[Events]:
    handler = Events()
    logger = logging.getLogger("lbagent.dataplane")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def check(per_port: int, answers: int) -> dict[str, Any]:
    report: dict[str, Any] = {}
    begin = time.monotonic()
    with Namespaces(f"ipvsm{os.getpid()}", ["client", "router", *LBS, *NODES]) as ns, ExitStack() as stack, \
            captured_events() as events:
        build_lab(ns, stack)
        lbs = {name: Lb(ns[name]) for name in LBS}
        fronts = frontends()
        report["sysctls"] = {name: set_sysctls(ns[name], sloppy=True) for name in LBS}
        report["ops"] = {name: lb.apply(fronts) for name, lb in lbs.items()}
        # nf_conntrack is loaded now (the companion table's ct rules): the conntrack setting can be written.
        report["sysctls"] = {name: set_sysctls(ns[name], sloppy=True) for name in LBS}
        report["ipvsadm"] = {name: lb.ipvsadm() for name, lb in lbs.items()}
        report["events"] = [e for e in events.records if e["event"] == "dsr_node_not_on_link"]

        log("fresh connections through lbA, then lbB")
        fresh: dict[str, Any] = {}
        for lb in LBS:
            route_via(ns["router"], lb)
            fresh[lb] = {str(port): spread([fetch(ns["client"], VIP, port) for _ in range(12)])
                         for port in (NAT_PORT, DSR_PORT)}
        report["fresh"] = fresh
        report["counters"] = {name: counters(ns[name]) for name in [*LBS, "router"]}

        log("moves with sloppy_tcp=1")
        report["sloppy"] = moves(ns, per_port, ["lbA", "lbB", "lbA"], answers)
        report["counters_after_moves"] = {name: counters(ns[name]) for name in [*LBS, "router"]}

        log("moves with sloppy_tcp=0")
        report["strict_sysctls"] = {name: set_sysctls(ns[name], sloppy=False)["net/ipv4/vs/sloppy_tcp"]
                                    for name in LBS}
        report["strict"] = moves(ns, per_port, ["lbA", "lbB"], answers)
    report["seconds"] = round(time.monotonic() - begin, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-port", type=int, default=3)
    parser.add_argument("--answers", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(check(args.per_port, args.answers), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
