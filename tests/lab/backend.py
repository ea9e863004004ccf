"""A lab node's backend: answers HTTP GET on each TCP port, and any datagram on each UDP port, with JSON."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import FrameType


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A threaded HTTP server that never resolves its own name (the nodes have no DNS)."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, port: int, node: str) -> None:
        self.node = node
        self.port = port
        super().__init__(("0.0.0.0", port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        host, port = self.client_address[:2]
        body = json.dumps(
            {"node": self.server.node, "client": f"{host}:{port}", "port": self.server.port, "path": self.path}
        ).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: a request log per curl would only bury the interesting lines."""


def _serve_udp(sock: socket.socket, node: str, port: int) -> None:
    while True:
        _, (host, peer_port) = sock.recvfrom(65535)
        reply = {"node": node, "client": f"{host}:{peer_port}", "port": port, "protocol": "UDP"}
        sock.sendto(json.dumps(reply).encode() + b"\n", (host, peer_port))


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="the node name put in every answer")
    parser.add_argument("--tcp", type=int, action="append", default=[], help="an HTTP port (repeatable)")
    parser.add_argument("--udp", type=int, action="append", default=[], help="a UDP port (repeatable)")
    parser.add_argument("--ready-file", type=Path, help="written with our pid once every port is bound")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    threads: list[threading.Thread] = []
    for port in args.tcp:
        server = _Server(port, args.name)
        threads.append(threading.Thread(target=server.serve_forever, name=f"tcp-{port}", daemon=True))
    for port in args.udp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        threads.append(threading.Thread(target=_serve_udp, args=(sock, args.name, port), daemon=True))
    for thread in threads:
        thread.start()
    if args.ready_file is not None:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(args.ready_file)
    print(f"backend {args.name}: tcp {args.tcp} udp {args.udp} pid {os.getpid()}", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
