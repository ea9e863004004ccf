"""Runs in the guest for test_ipvs_forwarder.py: IpvsForwarder driven with real frontends, checked with real packets."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from ipaddress import ip_address, ip_network
from typing import Any, TypeVar

from pyroute2 import IPVS, IPVSService

from lbagent import model
from lbagent.l4.change import FrontendChange
from lbagent.l4.ipvs import render
from lbagent.l4.ipvs.apply import IpvsForwarder, load_ipvs
from lbagent.plan.services import Backend, Frontend
from tests.guest.ipvs_smoke import EchoHandler, NamedServer, Namespaces, ip, netns

# Documentation addresses only. client -- l0 [lb: VIPs on lo, IPVS] br0 -- be1, be2, be3 (the "nodes").
CLIENT = "192.0.2.2"
OTHER_CLIENT = "192.0.2.3"  # outside the source range of the ranged frontend
LB_CLIENT_SIDE = "192.0.2.1"
LB_BACKEND_SIDE = "203.0.113.1"
CLIENT6 = "2001:db8:2::2"
LB_CLIENT_SIDE6 = "2001:db8:2::1"
LB_BACKEND_SIDE6 = "2001:db8:113::1"
VIP = "198.51.100.80"
VIP6 = "2001:db8:100::80"
FOREIGN_VIP = "198.51.100.99"  # an IPVS service someone else made: lbagent must leave it alone
NODES = {
    "be1": ("203.0.113.11", "2001:db8:113::11"),
    "be2": ("203.0.113.12", "2001:db8:113::12"),
    "be3": ("203.0.113.13", "2001:db8:113::13"),
}
# Each frontend has its own nodePort, as each Kubernetes service port does.
TCP_PORTS = (30080, 30081, 30082, 30083, 30084, 30085)
UDP_PORT = 30053
TABLE = "lbagent"
SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/ipv6/conf/all/forwarding": "1",
    "net/ipv4/vs/expire_nodest_conn": "1",
    "net/ipv4/vs/expire_quiescent_template": "1",
    "net/ipv4/vs/conntrack": "1",
}
CONNECT_TIMEOUT = 3.0

T = TypeVar("T")


def log(message: str) -> None:
    print(f"check[{time.monotonic():.1f}]: {message}", file=sys.stderr, flush=True)


# -- the nodes: HTTP (keep-alive) and UDP, answering their name and the client address they saw -----------------

class _Http(NamedServer):
    def __init__(self, name: str, addr: str, port: int) -> None:
        self.name = name
        self.address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        super().__init__((addr, port), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: the client resets every connection on purpose (see Connection)."""


class _Handler(EchoHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: several requests on one connection


def _udp_server(name: str, sock: socket.socket) -> None:
    while True:
        try:
            data, peer = sock.recvfrom(2048)
        except OSError:
            return
        sock.sendto(json.dumps({"backend": name, "client": peer[0], "echo": data.decode()}).encode(), peer)


# -- the client ---------------------------------------------------------------------------------------------------

class Connection:
    """An HTTP/1.1 keep-alive connection from the client namespace; closed with a reset (SO_LINGER 0), so IPVS
    forgets it after its CLOSE timeout (10 s) rather than TIME_WAIT's 2 minutes."""

    def __init__(self, ns: str, source: str, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with netns(ns):
            self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.settimeout(CONNECT_TIMEOUT)
        try:
            self.sock.bind((source, 0))
            self.sock.connect((host, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(10)
        self.host = host

    def get(self) -> dict[str, Any]:
        self.sock.sendall(f"GET / HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += self._recv()
        head, _, body = data.partition(b"\r\n\r\n")
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
        length = int(fields[b"Content-Length"])
        while len(body) < length:
            body += self._recv()
        reply: dict[str, Any] = json.loads(body)
        return reply

    def _recv(self) -> bytes:
        chunk = self.sock.recv(4096)
        if not chunk:
            raise ConnectionError("the connection closed")
        return chunk

    def close(self) -> None:
        self.sock.close()


def fetch(ns: str, host: str, port: int, source: str = CLIENT) -> dict[str, Any]:
    """One request on a fresh connection (so the scheduler picks anew each time)."""
    conn = Connection(ns, source, host, port)
    try:
        return conn.get()
    finally:
        conn.close()


def attempt(ns: str, host: str, port: int, source: str = CLIENT) -> str:
    """What a connection attempt meets: "answered", "refused" (reset or ICMP) or "timeout" (dropped)."""
    try:
        fetch(ns, host, port, source)
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    return "answered"


def connect(ns: str, host: str, port: int) -> str:
    """A bare TCP connection attempt: "connected", "refused" or "timeout"."""
    with netns(ns):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect((host, port))
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    finally:
        sock.close()
    return "connected"


def udp_ask(ns: str, host: str, port: int, source: str = CLIENT) -> dict[str, Any]:
    with netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((source, 0))
        sock.settimeout(CONNECT_TIMEOUT)
        sock.sendto(b"ping", (host, port))
        reply: dict[str, Any] = json.loads(sock.recv(2048))
        return reply
    finally:
        sock.close()


def spread(replies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "backends": dict(sorted(Counter(r["backend"] for r in replies).items())),
        "clients": sorted({r["client"] for r in replies}),
    }


# -- the lab ------------------------------------------------------------------------------------------------------

def build_lab(ns: Namespaces, stack: ExitStack) -> None:
    """The namespaces, addresses and servers; the LB's sysctls as the agent sets them for IPVS."""
    ip(batch=[
        f"link add c0 netns {ns['client']} type veth peer name l0 netns {ns['lb']}",
        *(f"link add e0 netns {ns[be]} type veth peer name {be} netns {ns['lb']}" for be in NODES),
    ])
    ip("-n", ns["client"], batch=[
        "link set lo up", f"addr add {CLIENT}/24 dev c0", f"addr add {OTHER_CLIENT}/24 dev c0",
        f"addr add {CLIENT6}/64 dev c0 nodad", "link set c0 up",
        f"route add default via {LB_CLIENT_SIDE}", f"route add default via {LB_CLIENT_SIDE6}",
    ])
    ip("-n", ns["lb"], batch=[
        # lo must be up before IPVS takes a masquerading real server (EINVAL otherwise).
        "link set lo up", f"addr add {VIP}/32 dev lo", f"addr add {VIP6}/128 dev lo",
        f"addr add {FOREIGN_VIP}/32 dev lo",
        f"addr add {LB_CLIENT_SIDE}/24 dev l0", f"addr add {LB_CLIENT_SIDE6}/64 dev l0 nodad", "link set l0 up",
        "link add br0 type bridge", f"addr add {LB_BACKEND_SIDE}/24 dev br0",
        f"addr add {LB_BACKEND_SIDE6}/64 dev br0 nodad", "link set br0 up",
        *(line for be in NODES for line in (f"link set {be} master br0", f"link set {be} up")),
    ])
    for be, (addr4, addr6) in NODES.items():
        ip("-n", ns[be], batch=[
            "link set lo up", f"addr add {addr4}/24 dev e0", f"addr add {addr6}/64 dev e0 nodad", "link set e0 up",
            # The LB is the nodes' gateway: in nat mode the replies to the client's own address come back through it.
            f"route add default via {LB_BACKEND_SIDE}", f"route add default via {LB_BACKEND_SIDE6}",
        ])
        with netns(ns[be]):
            servers = [_Http(be, addr, port) for port in TCP_PORTS for addr in (addr4, addr6)]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((addr4, UDP_PORT))
        for server in servers:
            stack.callback(server.server_close)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            stack.callback(server.shutdown)
        stack.callback(udp.close)
        threading.Thread(target=_udp_server, args=(be, udp), daemon=True).start()
    # The /proc/sys/net/ipv4/vs files appear once ip_vs is loaded, which load_ipvs() does as the agent would.
    # /proc/sys/net belongs to the namespace of whoever opens it.
    with netns(ns["lb"]):
        load_ipvs()
        for name, value in SYSCTLS.items():
            with open(f"/proc/sys/{name}", "w") as f:
                f.write(value + "\n")


def backends(family: int = 4, only: Sequence[str] = tuple(NODES)) -> tuple[Backend, ...]:
    return tuple(Backend(be, ip_address(NODES[be][0 if family == 4 else 1])) for be in only)


def frontends(nodes: Sequence[str] = tuple(NODES)) -> dict[str, Frontend]:
    """The lab's frontends by name, with `nodes` as their healthy backends."""
    v4 = ip_address(VIP)
    tcp, udp = model.Protocol.TCP, model.Protocol.UDP
    nat, masq = model.ForwardingMode.NAT, model.ForwardingMode.MASQUERADE
    return {
        "rr": Frontend("lab/rr", "http", v4, tcp, 80, backends(only=nodes), 30080, mode=nat, scheduler="rr"),
        "mh": Frontend("lab/mh", "http", v4, tcp, 81, backends(only=nodes), 30081, mode=masq, scheduler="mh"),
        "ranged": Frontend("lab/ranged", "http", v4, tcp, 82, backends(only=nodes), 30082, mode=nat, scheduler="rr",
                           source_ranges=(ip_network(f"{CLIENT}/32"), ip_network("2001:db8:2::/64"))),
        "affinity": Frontend("lab/affinity", "http", v4, tcp, 83, backends(only=nodes), 30083, mode=nat,
                             scheduler="rr", affinity_timeout=60),
        "empty": Frontend("lab/empty", "http", v4, tcp, 84, (), 0, mode=nat, scheduler="rr"),
        "udp": Frontend("lab/udp", "dns", v4, udp, 53, backends(only=nodes), UDP_PORT, mode=masq, scheduler="rr"),
        "v6": Frontend("lab/v6", "http", ip_address(VIP6), tcp, 80, backends(6, only=nodes), 30085, mode=nat,
                       scheduler="rr"),
    }


VIPS = (ip_address(VIP), ip_address(VIP6))


class Driver:
    """Calls the forwarder inside the LB namespace: its netlink sockets and its nft both belong there."""

    def __init__(self, lb: str) -> None:
        self.lb = lb
        self.forwarder = IpvsForwarder(model.Dataplane(kind=model.DataplaneKind.IPVS, table=TABLE))
        self.applied: dict[str, tuple[Frontend, ...]] = {}  # what the last apply got, by service (the agent's part)

    def run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        with netns(self.lb):
            return asyncio.run(make())

    def apply(self, fronts: dict[str, Frontend], vips: Sequence[model.IPAddress] = VIPS, force: bool = False,
              changed: Sequence[str] | None = None) -> dict[str, Any]:
        """`changed`: the services whose frontends changed since the last apply, as the agent says it (a change
        record from what that apply got)."""
        current: dict[str, tuple[Frontend, ...]] = {}
        for f in fronts.values():
            current[f.service] = (*current.get(f.service, ()), f)
        change = None if changed is None else FrontendChange.of(self.applied, current, changed)
        how = self.run(lambda: self.forwarder.apply(list(fronts.values()), vips, force=force, change=change))
        self.applied = current
        ops = [str(op) for op in self.forwarder.last_ops]
        log(f"apply -> {how}: {ops}")
        return {"how": how, "ops": ops}

    def services(self) -> dict[str, Any]:
        """The kernel's IPVS services in the LB namespace, keyed "tcp 198.51.100.80:80", with raw attributes."""
        out: dict[str, Any] = {}
        with netns(self.lb):
            ipvs = IPVS()
            try:
                for msg in ipvs.service("dump"):
                    svc = dict(msg.get("IPVS_CMD_ATTR_SERVICE")["attrs"])
                    proto = {6: "tcp", 17: "udp"}[svc["IPVS_SVC_ATTR_PROTOCOL"]]
                    addr, port = svc["IPVS_SVC_ATTR_ADDR"], svc["IPVS_SVC_ATTR_PORT"]
                    key = IPVSService(addr=addr, port=port, protocol=svc["IPVS_SVC_ATTR_PROTOCOL"])
                    dests = {}
                    for d in ipvs.dest("dump", service=key):
                        a = dict(d.get("IPVS_CMD_ATTR_DEST")["attrs"])
                        dests[NAMES[a["IPVS_DEST_ATTR_ADDR"]]] = {
                            "weight": a["IPVS_DEST_ATTR_WEIGHT"], "fwd_method": a["IPVS_DEST_ATTR_FWD_METHOD"],
                            "active": a["IPVS_DEST_ATTR_ACTIVE_CONNS"], "inactive": a["IPVS_DEST_ATTR_INACT_CONNS"],
                            "port": a["IPVS_DEST_ATTR_PORT"],
                        }
                    out[f"{proto} {host_port(addr, port)}"] = {
                        "scheduler": svc["IPVS_SVC_ATTR_SCHED_NAME"],
                        "flags": svc["IPVS_SVC_ATTR_FLAGS"]["flags"] & render.FLAGS_MASK,
                        "timeout": svc["IPVS_SVC_ATTR_TIMEOUT"], "netmask": svc["IPVS_SVC_ATTR_NETMASK"],
                        "dests": dests,
                    }
            finally:
                ipvs.close()
        return out

    def sh(self, *argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.lb, *argv], capture_output=True, text=True,
                              check=False).stdout


def host_port(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


NAMES = {addr: be for be, addrs in NODES.items() for addr in addrs}


@contextmanager
def listener_on_lb(lb: str, port: int) -> Iterator[None]:
    """A process on the LB node listening on the wildcard address: it must not answer on a VIP."""
    with netns(lb):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(16)
    try:
        yield
    finally:
        sock.close()


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 1.0) -> float | None:
    begin = time.monotonic()
    while time.monotonic() - begin < timeout:
        if predicate():
            return round(time.monotonic() - begin, 1)
        time.sleep(step)
    return None


# -- the checks ---------------------------------------------------------------------------------------------------

def check(requests: int) -> dict[str, Any]:
    report: dict[str, Any] = {"ipvs_loaded_before": os.path.exists("/proc/sys/net/ipv4/vs")}
    begin = time.monotonic()
    with Namespaces(f"ipvsf{os.getpid()}", ["client", "lb", *NODES]) as ns, ExitStack() as stack:
        build_lab(ns, stack)
        lab = Driver(ns["lb"])
        c = ns["client"]
        # Someone else's service, and a stray one on lbagent's VIP (a port no frontend has).
        lab.sh("ipvsadm", "-A", "-t", f"{FOREIGN_VIP}:80", "-s", "rr")
        lab.sh("ipvsadm", "-A", "-t", f"{VIP}:9999", "-s", "rr")

        fronts = frontends()
        report["first"] = lab.apply(fronts)
        report["second"] = lab.apply(fronts)
        report["forced"] = lab.apply(fronts, force=True)
        report["services"] = lab.services()
        report["programmed"] = sorted(map(str, lab.forwarder.programmed()))
        report["nft"] = lab.sh("nft", "list", "table", "inet", f"{TABLE}_ipvs")
        report["ipvsadm"] = lab.sh("ipvsadm", "-Ln")

        log("traffic")
        report["rr"] = spread([fetch(c, VIP, 80) for _ in range(requests)])
        report["mh"] = spread([fetch(c, VIP, 81) for _ in range(requests)])
        report["udp"] = spread([udp_ask(c, VIP, 53) for _ in range(requests)])
        report["v6"] = spread([fetch(c, VIP6, 80, CLIENT6) for _ in range(requests // 2)])
        report["ranged"] = {
            "allowed": attempt(c, VIP, 82, CLIENT), "other_client": attempt(c, VIP, 82, OTHER_CLIENT),
            "other_client_unranged_frontend": attempt(c, VIP, 80, OTHER_CLIENT),
        }
        # A process on the LB node itself: its source is the VIP (the route to a local address), the replies come
        # back to the VIP, are un-NATed by IPVS at LOCAL_IN, and must then reach the process.
        report["local"] = {
            "nat": attempt(ns["lb"], VIP, 80, VIP), "masquerade": attempt(ns["lb"], VIP, 81, VIP),
            "v6": attempt(ns["lb"], VIP6, 80, VIP6),
        }
        report["affinity"] = {
            src: spread([fetch(c, VIP, 83, src) for _ in range(requests // 2)]) for src in (CLIENT, OTHER_CLIENT)
        }
        with listener_on_lb(ns["lb"], 84):
            report["empty"] = {
                "vip": connect(c, VIP, 84), "lb_own_address": connect(c, LB_CLIENT_SIDE, 84),
                "vip_unconfigured_port": connect(c, VIP, 8080),
            }

        log("graceful removal")
        kept = Connection(c, CLIENT, VIP, 80)
        victim = kept.get()["backend"]
        kept_mh: Connection | None = None
        for _ in range(60):
            conn = Connection(c, CLIENT, VIP, 81)
            if conn.get()["backend"] == victim:
                kept_mh = conn
                break
            conn.close()
        assert kept_mh is not None, f"no mh connection landed on {victim}"
        rest = tuple(be for be in NODES if be != victim)
        without = frontends(rest)
        removal: dict[str, Any] = {"victim": victim, "applies": [lab.apply(without)]}
        removal["services_after_removal"] = lab.services()
        removal["new_flows"] = {
            "rr": spread([fetch(c, VIP, 80) for _ in range(requests)]),
            "mh": spread([fetch(c, VIP, 81) for _ in range(requests)]),
        }
        removal["kept_alive"] = [kept.get()["backend"], kept_mh.get()["backend"], kept.get()["backend"]]
        removal["applies"].append(lab.apply(without))
        removal["services_while_kept"] = lab.services()
        kept.close()
        kept_mh.close()
        closed = time.monotonic()

        def victim_gone() -> bool:
            # As the agent calls it when no service changed: only the draining services are read back.
            removal["applies"].append(lab.apply(without, changed=[]))
            return all(victim not in s["dests"] for s in lab.services().values())

        removal["deleted_after_close_s"] = wait_until(victim_gone, 60)
        removal["waited_s"] = round(time.monotonic() - closed, 1)
        removal["applies"] = [a for a in removal["applies"] if a["ops"]] + [lab.apply(without)]
        removal["services_after"] = lab.services()
        report["removal"] = removal

        log("node back, then settings change in place")
        back = lab.apply(fronts)
        changed_fronts = dict(fronts)
        changed_fronts["rr"] = Frontend("lab/rr", "http", ip_address(VIP), model.Protocol.TCP, 80, backends(), 30080,
                                        mode=model.ForwardingMode.NAT, scheduler="wrr", affinity_timeout=30)
        settings = lab.apply(changed_fronts)
        report["changes"] = {
            "back": back, "settings": settings, "rr_after": lab.services()[f"tcp {VIP}:80"],
            "settings_again": lab.apply(changed_fronts),
        }

        log("delta apply for one service")
        weighted = dict(changed_fronts)
        weighted["mh"] = Frontend("lab/mh", "http", ip_address(VIP), model.Protocol.TCP, 81,
                                  tuple(b._replace(weight=3) if b.node == "be1" else b for b in backends()), 30081,
                                  mode=model.ForwardingMode.MASQUERADE, scheduler="mh")
        report["delta"] = lab.apply(weighted, changed=["lab/mh"])
        report["delta_weights"] = {be: d["weight"] for be, d in lab.services()[f"tcp {VIP}:81"]["dests"].items()}

        log("frontend gone")
        gone = {name: f for name, f in weighted.items() if name != "affinity"}
        report["gone"] = lab.apply(gone)
        report["gone_services"] = sorted(lab.services())

        log("a frontend left without backends: drained, then its service goes")
        drained = dict(gone)
        drained["v6"] = Frontend("lab/v6", "http", ip_address(VIP6), model.Protocol.TCP, 80, (), 0,
                                 mode=model.ForwardingMode.NAT, scheduler="rr")
        first = lab.apply(drained)
        report["drain"] = {
            "first": first, "programmed": sorted(map(str, lab.forwarder.programmed())),
            "service": lab.services().get(f"tcp [{VIP6}]:80"), "connect_while_draining": connect(c, VIP6, 80),
        }
        report["drain"]["second"] = lab.apply(drained)
        report["drain"]["service_after"] = lab.services().get(f"tcp [{VIP6}]:80")
        report["drain"]["connect_after"] = connect(c, VIP6, 80)

        log("restart, then cleanup from a fresh forwarder (as `lbagent cleanup` after the VIPs were unbound)")
        lab.forwarder = IpvsForwarder(model.Dataplane(kind=model.DataplaneKind.IPVS, table=TABLE))
        report["restart"] = lab.apply(drained)
        lab.forwarder = IpvsForwarder(model.Dataplane(kind=model.DataplaneKind.IPVS, table=TABLE))
        lab.run(lab.forwarder.cleanup)
        report["after_cleanup"] = {
            "services": sorted(lab.services()),
            "nft_tables": lab.sh("nft", "list", "tables"),
        }
    report["seconds"] = round(time.monotonic() - begin, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args(argv)
    print(json.dumps(check(args.requests), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
