"""HAProxy's per-server response counters (`show stat` on the admin socket), summed by the backendRef each server
serves: lbagent's HAProxy backends are per route rule, so a canary's two Services share one backend, and only the
servers tell them apart. Read when Prometheus scrapes (in the metrics server's thread: a blocking read of a local
socket, bounded by a timeout)."""

from __future__ import annotations

import csv
import io
import socket
from collections.abc import Mapping

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
TIMEOUT = 2.0


def show_stat(path: str, timeout: float = TIMEOUT) -> str:
    """The answer to `show stat` (CSV) on HAProxy's admin socket; OSError when it is not there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"show stat\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def responses_by_target(text: str, targets: Mapping[tuple[str, str], str]) -> dict[tuple[str, str], int]:
    """(target, class) -> responses, from `show stat`'s server rows (pxname, svname, hrsp_1xx ... hrsp_other) of the
    servers `targets` names; other rows (frontends, BACKEND totals, servers lbagent does not know) are left out."""
    lines = text.lstrip("# ").splitlines()
    out: dict[tuple[str, str], int] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        target = targets.get((row.get("pxname") or "", row.get("svname") or ""))
        if target is None:
            continue
        for name in CLASSES:
            value = row.get(f"hrsp_{name}") or "0"
            if value.isdigit():
                out[(target, name)] = out.get((target, name), 0) + int(value)
    return out
