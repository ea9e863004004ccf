"""Runs in the guest for test_guest.py: IPVS NAT with real HTTP across network namespaces, and each scheduler."""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any

from pyroute2 import IPVS, IPVSDest, IPVSService

# Documentation addresses only. The client reaches the VIP on the LB's lo through the LB; the LB forwards (NAT) to
# the backends on a bridge, and is their default gateway so replies come back through it to be un-NATed.
CLIENT = "192.0.2.2"
LB_CLIENT_SIDE = "192.0.2.1"
VIP = "198.51.100.80"
VIP_PORT = 80
LB_BACKEND_SIDE = "203.0.113.1"
BACKENDS = {"be1": "203.0.113.11", "be2": "203.0.113.12"}
BACKEND_PORT = 8080
SCHEDULERS = ("rr", "wrr", "lc", "sh", "mh")
MASQUERADE = 0  # IP_VS_CONN_F_MASQ; pyroute2's IPVSDest defaults to 3 (direct routing)

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the block in a named network namespace: sockets made there stay there after the block."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def ip(*args: str, batch: list[str]) -> None:
    subprocess.run(["ip", *args, "-batch", "-"], input="\n".join(batch) + "\n", text=True, check=True)


class Namespaces:
    """Namespaces named prefix-NAME, deleted on exit whatever happened."""

    def __init__(self, prefix: str, names: list[str]) -> None:
        self.prefix = prefix
        self.names = names

    def __getitem__(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def __enter__(self) -> Namespaces:
        ip(batch=[f"netns add {self[name]}" for name in self.names])
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {self[n]}\n" for n in self.names),
                       text=True, check=False)


def _attrs(msg: Any, nla: str) -> dict[str, Any]:
    """Raw attributes of a dumped service or destination: IPVSService/IPVSDest.from_message keep class defaults."""
    return dict(msg.get(nla)["attrs"])


def _read_back(ipvs: Any) -> list[dict[str, Any]]:
    services = []
    for msg in ipvs.service("dump"):
        svc = _attrs(msg, "IPVS_CMD_ATTR_SERVICE")
        key = IPVSService(addr=svc["IPVS_SVC_ATTR_ADDR"], port=svc["IPVS_SVC_ATTR_PORT"],
                          protocol=svc["IPVS_SVC_ATTR_PROTOCOL"])
        dests = [_attrs(d, "IPVS_CMD_ATTR_DEST") for d in ipvs.dest("dump", service=key)]
        services.append({
            "addr": svc["IPVS_SVC_ATTR_ADDR"],
            "port": svc["IPVS_SVC_ATTR_PORT"],
            "scheduler": svc["IPVS_SVC_ATTR_SCHED_NAME"],
            "dests": sorted(
                ({"addr": d["IPVS_DEST_ATTR_ADDR"], "port": d["IPVS_DEST_ATTR_PORT"],
                  "fwd_method": d["IPVS_DEST_ATTR_FWD_METHOD"], "weight": d["IPVS_DEST_ATTR_WEIGHT"]} for d in dests),
                key=lambda d: str(d["addr"]),
            ),
        })
    return sorted(services, key=lambda s: int(s["port"]))


def _add_service(ipvs: Any, port: int, scheduler: str, weights: dict[str, int]) -> None:
    service = IPVSService(addr=VIP, port=port, protocol=socket.IPPROTO_TCP, sched_name=scheduler)
    ipvs.service("add", service=service)
    for addr, weight in weights.items():
        ipvs.dest("add", service=service,
                  dest=IPVSDest(addr=addr, port=BACKEND_PORT, fwd_method=MASQUERADE, weight=weight))


class NamedServer(socketserver.ThreadingTCPServer):
    """A threaded TCP server that knows which backend it plays."""

    daemon_threads = True
    allow_reuse_address = True
    name: str


class _Backend(NamedServer):
    """A tiny HTTP server naming itself and the client it saw; never resolves names (the guest has no DNS)."""

    def __init__(self, name: str, addr: str) -> None:
        self.name = name
        super().__init__((addr, BACKEND_PORT), EchoHandler)


class EchoHandler(BaseHTTPRequestHandler):
    """Answers every GET with the backend's name and the client address it saw, as JSON."""

    server: NamedServer

    def do_GET(self) -> None:
        body = json.dumps({"backend": self.server.name, "client": self.client_address[0]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: stdout carries the JSON report."""


def _get(host: str, port: int) -> dict[str, Any]:
    """One GET on a fresh connection, so the scheduler picks a real server for each."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"GET http://{host}:{port}/ answered {response.status}")
        reply: dict[str, Any] = json.loads(response.read())
        return reply
    finally:
        conn.close()


def http_through_ipvs(requests: int) -> dict[str, Any]:
    """client -> VIP on lb (IPVS NAT, rr) -> be1/be2 over a bridge; the real servers answer over HTTP."""
    with Namespaces(f"ipvs{os.getpid()}", ["client", "lb", *BACKENDS]) as ns, ExitStack() as stack:
        ip(batch=[
            f"link add c0 netns {ns['client']} type veth peer name l0 netns {ns['lb']}",
            *(f"link add e0 netns {ns[be]} type veth peer name {be} netns {ns['lb']}" for be in BACKENDS),
        ])
        ip("-n", ns["client"], batch=[
            "link set lo up", f"addr add {CLIENT}/24 dev c0", "link set c0 up",
            f"route add default via {LB_CLIENT_SIDE}",
        ])
        ip("-n", ns["lb"], batch=[
            "link set lo up", f"addr add {VIP}/32 dev lo",
            f"addr add {LB_CLIENT_SIDE}/24 dev l0", "link set l0 up",
            "link add br0 type bridge", f"addr add {LB_BACKEND_SIDE}/24 dev br0", "link set br0 up",
            *(line for be in BACKENDS for line in (f"link set {be} master br0", f"link set {be} up")),
        ])
        for be, addr in BACKENDS.items():
            ip("-n", ns[be], batch=[
                "link set lo up", f"addr add {addr}/24 dev e0", "link set e0 up",
                f"route add default via {LB_BACKEND_SIDE}",
            ])
            with netns(ns[be]):
                server = _Backend(be, addr)
            stack.callback(server.server_close)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            stack.callback(server.shutdown)

        with netns(ns["lb"]):
            # /proc/sys/net belongs to the namespace of whoever opens it.
            with open("/proc/sys/net/ipv4/ip_forward", "w") as forward:
                forward.write("1\n")
            ipvs = IPVS()
            stack.callback(ipvs.close)
            _add_service(ipvs, VIP_PORT, "rr", dict.fromkeys(BACKENDS.values(), 1))
            services = _read_back(ipvs)
        ipvsadm = subprocess.run(["ip", "netns", "exec", ns["lb"], "ipvsadm", "-Ln"],
                                 capture_output=True, text=True, check=True).stdout
        host_ipvsadm = subprocess.run(["ipvsadm", "-Ln"], capture_output=True, text=True, check=True).stdout

        with netns(ns["client"]):
            replies = [_get(VIP, VIP_PORT) for _ in range(requests)]
        return {
            "services": services,
            "ipvsadm_lb": ipvsadm,
            "ipvsadm_init_netns": host_ipvsadm,
            "backends": [r["backend"] for r in replies],
            "clients": sorted({r["client"] for r in replies}),
        }


def schedulers() -> dict[str, Any]:
    """A NAT service with two real servers for each scheduler, read back from the kernel, in a fresh namespace."""
    with Namespaces(f"ipvs{os.getpid()}", ["sched"]) as ns:
        # A masquerade destination in a namespace whose lo is down is refused with EINVAL.
        ip("-n", ns["sched"], batch=["link set lo up"])
        with netns(ns["sched"]):
            ipvs = IPVS()
            try:
                weights = dict(zip(BACKENDS.values(), (1, 2), strict=True))
                for i, scheduler in enumerate(SCHEDULERS):
                    _add_service(ipvs, 8001 + i, scheduler, weights)
                services = _read_back(ipvs)
                for i in range(len(SCHEDULERS)):
                    ipvs.service("del", service=IPVSService(addr=VIP, port=8001 + i, protocol=socket.IPPROTO_TCP))
                left = _read_back(ipvs)
            finally:
                ipvs.close()
    return {"services": services, "after_delete": left}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("http", help="IPVS NAT (rr) with HTTP through namespaces").add_argument(
        "--requests", type=int, default=6)
    sub.add_parser("schedulers", help="create a service with each scheduler")
    args = parser.parse_args(argv)
    run: Callable[[], dict[str, Any]] = (
        (lambda: http_through_ipvs(args.requests)) if args.mode == "http" else schedulers
    )
    print(json.dumps(run(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
