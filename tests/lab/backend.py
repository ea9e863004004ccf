"""A lab node's backend: answers HTTP GET on each TCP port, and any datagram on each UDP port, with JSON.

It also plays kube-proxy's two health servers: a healthCheckNodePort per service (`--health ns/name=PORT`:
any path, 200 while the node has local endpoints of the service, else 503) and `/healthz` on
`--kube-proxy-port` (200, or 503 while the node drains). Both read `--state-file` on every request, so a
test flips them by rewriting that file (atomically): {"localEndpoints": {"ns/name": 0}, "kubeProxyHealthy": false}.
Missing keys (or a missing file) mean 1 local endpoint and a healthy kube-proxy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import FrameType
from typing import Any


def _peer(host: str) -> str:
    """An address as the node's kernel sees it: an IPv4 client of a dual-stack socket without its ::ffff:."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A threaded HTTP server that never resolves its own name (the nodes have no DNS); dual stack on request."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        port: int,
        node: str,
        handler: type[BaseHTTPRequestHandler],
        dual_stack: bool = False,
        state_file: Path | None = None,
        service: tuple[str, str] = ("", ""),
    ) -> None:
        self.node = node
        self.port = port
        self.state_file = state_file
        self.service = service
        self.address_family = socket.AF_INET6 if dual_stack else socket.AF_INET
        super().__init__(("::" if dual_stack else "0.0.0.0", port), handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def state(self) -> dict[str, Any]:
        """The node's health state, read afresh: a missing file is the default state."""
        if self.state_file is None:
            return {}
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}


class _JSONHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def reply(self, status: int, body: bytes, content_type: str = "application/json",
              headers: tuple[tuple[str, str], ...] = ()) -> None:
        """The whole answer in one write, so a client that reads once (lbagent's prober) gets the body too."""
        lines = [f"{self.protocol_version} {status} {HTTPStatus(status).phrase}",
                 f"Date: {self.date_time_string()}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
                 *(f"{name}: {value}" for name, value in headers)]
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: a request log per curl would only bury the interesting lines."""


class _Handler(_JSONHandler):
    def do_GET(self) -> None:
        host, port = self.client_address[:2]
        query = dict(q.partition("=")[::2] for q in self.path.partition("?")[2].split("&") if q)
        with contextlib.suppress(ValueError):  # ?delay=S: answer S seconds after the request came in
            time.sleep(min(float(query.get("delay", "0")), 60.0))
        body = json.dumps(
            {"node": self.server.node, "client": f"{_peer(host)}:{port}", "port": self.server.port, "path": self.path,
             "method": self.command, "headers": {k.lower(): v for k, v in self.headers.items()}}
        ).encode() + b"\n"
        self.reply(200, body)


class _HealthCheckNodePortHandler(_JSONHandler):
    """kube-proxy's per-service health check: any path; 200 with local endpoints, else 503."""

    def do_GET(self) -> None:
        namespace, name = self.server.service
        try:
            count = int(self.server.state().get("localEndpoints", {}).get(f"{namespace}/{name}", 1))
        except (ValueError, TypeError, AttributeError) as exc:
            self.reply(500, f"bad state file: {exc}\n".encode(), "text/plain")
            return
        body = {"service": {"namespace": namespace, "name": name}, "localEndpoints": count,
                "serviceProxyHealthy": True}
        self.reply(200 if count > 0 else 503, json.dumps(body).encode() + b"\n",
                   headers=(("X-Content-Type-Options", "nosniff"), ("X-Load-Balancing-Endpoint-Weight", str(count))))


class _KubeProxyHandler(_JSONHandler):
    """kube-proxy's /healthz: 200 while healthy, 503 while the node is unhealthy or draining."""

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/healthz":
            self.reply(404, b"404 page not found\n", "text/plain; charset=utf-8")
            return
        healthy = self.server.state().get("kubeProxyHealthy", True) is not False
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        body = {"lastUpdated": now, "currentTime": now, "nodeEligible": healthy}
        self.reply(200 if healthy else 503, json.dumps(body).encode() + b"\n",
                   headers=(("X-Content-Type-Options", "nosniff"),))


def _serve_udp(sock: socket.socket, node: str, port: int) -> None:
    while True:
        data, peer = sock.recvfrom(65535)
        reply = {"node": node, "client": f"{_peer(peer[0])}:{peer[1]}", "port": port, "protocol": "UDP",
                 "payload": data.decode(errors="replace")[:512]}
        sock.sendto(json.dumps(reply).encode() + b"\n", peer)


def _udp_socket(port: int, dual_stack: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if dual_stack else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if dual_stack:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::" if dual_stack else "0.0.0.0", port))
    return sock


def _health_arg(value: str) -> tuple[str, str, int]:
    key, sep, port = value.rpartition("=")
    namespace, slash, name = key.rpartition("/")
    if not sep or not port.isdigit() or not name:
        raise argparse.ArgumentTypeError(f"want [NAMESPACE/]NAME=PORT, got {value!r}")
    return (namespace if slash else "default"), name, int(port)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the node name put in every answer")
    parser.add_argument("--tcp", type=int, action="append", default=[], help="an HTTP port (repeatable)")
    parser.add_argument("--udp", type=int, action="append", default=[], help="a UDP port (repeatable)")
    parser.add_argument("--health", type=_health_arg, action="append", default=[], metavar="NS/NAME=PORT",
                        help="a service's healthCheckNodePort (repeatable)")
    parser.add_argument("--kube-proxy-port", type=int, help="serve kube-proxy's /healthz on this port")
    parser.add_argument("--state-file", type=Path, help="the health state (JSON), read on every health request")
    parser.add_argument("--dual-stack", action="store_true", help="listen on IPv6 and IPv4 (:: without V6ONLY)")
    parser.add_argument("--ready-file", type=Path, help="written with our pid once every port is bound")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    servers: list[_Server] = [_Server(port, args.name, _Handler, args.dual_stack) for port in args.tcp]
    servers += [
        _Server(port, args.name, _HealthCheckNodePortHandler, args.dual_stack, args.state_file, (namespace, name))
        for namespace, name, port in args.health
    ]
    if args.kube_proxy_port is not None:
        servers.append(_Server(args.kube_proxy_port, args.name, _KubeProxyHandler, args.dual_stack, args.state_file))
    threads = [threading.Thread(target=s.serve_forever, name=f"tcp-{s.port}", daemon=True) for s in servers]
    for port in args.udp:
        sock = _udp_socket(port, args.dual_stack)
        threads.append(threading.Thread(target=_serve_udp, args=(sock, args.name, port), daemon=True))
    for thread in threads:
        thread.start()
    if args.ready_file is not None:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(args.ready_file)
    health = " ".join(f"{ns}/{name}={port}" for ns, name, port in args.health) or "-"
    print(f"backend {args.name}: tcp {args.tcp} udp {args.udp} health {health} kube-proxy {args.kube_proxy_port} "
          f"dual-stack {args.dual_stack} pid {os.getpid()}", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
