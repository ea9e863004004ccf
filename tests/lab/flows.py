"""Long-lived connections from the lab's client: N keep-alive HTTP connections to VIP:port, each from its own source
port, each sending a request every `interval`, for as long as it runs. What a user of a load balancer cares about
when LB nodes come and go: does each connection keep working, on the same backend, and how long did it stall.

Run in the client's namespace (Lab.spawn); `--ready FILE` is written once every connection has had its first
answer; every 0.2 s and on SIGTERM (then the program ends) the results go to `--out FILE` as JSON: per connection
its source port, the nodes that answered it (in order), its answers, whether and when it ended (reset, closed, timed
out), and each gap of more than 0.3 s between two answers (when it ended, wall clock, and how long).

Each connection has TCP keepalive on (`--keepalive`, 1 s): a client that waits in silence for an answer the node sent
through an LB that is lost meanwhile would wait for ever in `nat` mode (the node sends it again through that LB only),
and its keepalive probe, taken to another LB, turns the node's return path there (tests/lab/test_failover.py).
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

_stop = threading.Event()
STALL = 0.3


def _connection(vip: str, port: int, source: tuple[str, int], interval: float, timeout: float, path: str,
                keepalive: int, result: dict[str, Any], first: threading.Event) -> None:
    conn = http.client.HTTPConnection(vip, port, timeout=timeout, source_address=source)
    last = None
    try:
        conn.connect()
        if keepalive and conn.sock is not None:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive)
        while not _stop.is_set():
            started = time.monotonic()
            conn.request("GET", path, headers={"Host": "flows"})
            response = conn.getresponse()
            body = response.read()
            now = time.monotonic()
            node = json.loads(body)["node"] if response.status == 200 else f"status {response.status}"
            if not result["nodes"] or result["nodes"][-1] != node:
                result["nodes"].append(node)
            result["requests"] += 1
            if last is not None and now - last > STALL:
                result["stalls"].append([time.time(), now - last])
            last = now
            first.set()
            _stop.wait(max(0.0, interval - (time.monotonic() - started)))
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["endedAt"] = time.time()
    finally:
        first.set()
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vip", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--source", required=True, help="the client's address")
    parser.add_argument("--base-port", type=int, default=41000)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=30.0, help="an answer later than this ends the connection")
    parser.add_argument("--keepalive", type=int, default=1, help="TCP keepalive after this many idle seconds (0: off)")
    parser.add_argument("--path-bytes", type=int, default=1,
                        help="the request's path this long: the backend echoes it, so both directions carry it")
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    def stop(signum: int, frame: FrameType | None) -> None:
        _stop.set()

    signal.signal(signal.SIGTERM, stop)
    results: list[dict[str, Any]] = [
        {"sourcePort": args.base_port + i, "nodes": [], "requests": 0, "stalls": [], "error": None, "endedAt": None}
        for i in range(args.count)
    ]
    firsts = [threading.Event() for _ in results]
    threads = [
        threading.Thread(target=_connection, daemon=True,
                         args=(args.vip, args.port, (args.source, r["sourcePort"]), args.interval, args.timeout,
                               "/" + "x" * (args.path_bytes - 1), args.keepalive, r, first))
        for r, first in zip(results, firsts, strict=True)
    ]
    for t in threads:
        t.start()
    for first in firsts:
        first.wait()
    args.ready.write_text(json.dumps({"at": time.time()}) + "\n")
    while not _stop.wait(0.2):
        _write(args.out, results)
    for t in threads:
        t.join(args.timeout + 5)
    _write(args.out, results)
    return 0


def _write(path: Path, results: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    raise SystemExit(main())
