"""One connection from the lab's client that waits in silence for a slow answer: a first request, then one the node
answers `--delay` seconds after it came in (the backend's `?delay=`). What a client sees when the LB that forwarded
its request is lost while the answer is on its way (docs/configuration.md, "Forwarding modes and failover").

Run in the client's namespace (Lab.spawn). Prints one JSON line per step: `{"first": NODE}`, then `{"asked": TIME}`
once the node has acknowledged the slow request (nothing of it left to send again: from here on the client has
nothing to say), then `{"answered": NODE, "at": TIME}` or `{"error": ..., "at": TIME}`. `--keepalive S` turns on TCP
keepalive, a probe after S seconds of silence and every S seconds after that.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import struct
import time


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _unacked(sock: socket.socket) -> int:
    """Segments sent and not acknowledged yet (struct tcp_info's tcpi_unacked, after 8 bytes and four u32s)."""
    return int(struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 24)[0])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vip", required=True)
    parser.add_argument("--source", required=True, help="the client's address")
    parser.add_argument("--source-port", type=int, required=True)
    parser.add_argument("--delay", type=float, required=True)
    parser.add_argument("--keepalive", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    conn = http.client.HTTPConnection(args.vip, 80, timeout=args.timeout,
                                      source_address=(args.source, args.source_port))
    conn.connect()
    assert conn.sock is not None
    if args.keepalive:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, args.keepalive)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, args.keepalive)
    try:
        conn.request("GET", "/", headers={"Host": "waiter"})
        _say(first=json.loads(conn.getresponse().read())["node"])
        conn.request("GET", f"/?delay={args.delay}", headers={"Host": "waiter"})
        deadline = time.monotonic() + args.timeout
        while _unacked(conn.sock) and time.monotonic() < deadline:
            time.sleep(0.001)
        _say(asked=time.time())
        _say(answered=json.loads(conn.getresponse().read())["node"], at=time.time())
    except (OSError, http.client.HTTPException, ValueError) as exc:
        _say(error=f"{type(exc).__name__}: {exc}", at=time.time())
        return 1
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
