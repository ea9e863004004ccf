"""`lbagent status`: the running agent answers over a root-only unix socket; the CLI prints it at a glance."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lbagent.files import private_dir
from lbagent.logfmt import event

log = logging.getLogger("lbagent.status")

SOCKET_NAME = "status.sock"


class StatusServer:
    """Answers every connection with one JSON document and closes it. The socket is mode 0600 in the
    agent's 0700 runtime directory: what it reveals (peers, nodes, health) is for the node's root only."""

    def __init__(self, path: Path, document: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self._document = document
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        private_dir(self.path.parent)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._answer, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(self._document(), default=str).encode() + b"\n")
            await writer.drain()
        except Exception as exc:  # a status request must never take the agent down
            event(log, logging.WARNING, "status_failed", error=repr(exc))
        finally:
            writer.close()


def query(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the running agent (the CLI side; plain blocking sockets)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    doc: dict[str, Any] = json.loads(b"".join(chunks))
    return doc


def render(doc: dict[str, Any]) -> str:
    """What an operator needs at a glance."""
    lines = [f"lbagent {doc['version']} on {doc['node']}: config {doc['configHash']}, data plane {doc['dataplane']}"
             + (" (draining)" if doc["draining"] else "")]
    lines.append("\nBGP peers")
    for peer, state in sorted(doc["peers"].items()):
        lines.append(f"  {peer:<28} {state}")
    if doc.get("bfd"):
        lines.append("\nBFD sessions (bfdd)")
        for peer, session in sorted(doc["bfd"].items()):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(session["since"])) if session["since"] else "-"
            timers = (f"tx {session['transmitInterval']} ms, rx {session['receiveInterval']} ms, detect "
                      f"{session['detectTime']} ms" if session["state"] == "up" else "")
            lines.append(f"  {peer:<28} {session['state']:<10} since {since}  {timers}".rstrip())
    lines.append("\nVIPs")
    for vip in doc["vips"]:
        verdict = "announced" if vip["announced"] else "withdrawn"
        lines.append(f"  {vip['prefix']:<28} {verdict:<10} bound={'yes' if vip['bound'] else 'no'}")
    lines.append("\nServices")
    for svc in doc["services"]:
        verdict = "announce" if svc["announce"] else "withdraw"
        lines.append(f"  {svc['service']} ({', '.join(svc['vips'])}): {verdict}, reason {svc['reason']}")
        for node in svc["nodes"]:
            health = {True: "healthy", False: "unhealthy", None: "unknown"}[node["healthy"]]
            lines.append(f"    {node['node']:<16} {health:<10} {node['reason']}")
    lines.append("\nLast successful sync")
    for name, runner in sorted(doc["sync"].items()):
        when = f"{runner['secondsAgo']:.1f}s ago" if runner["secondsAgo"] is not None else "never"
        error = f"  last error: {runner['lastError']}" if runner["lastError"] else ""
        lines.append(f"  {name:<10} {when}{error}")
    return "\n".join(lines)
