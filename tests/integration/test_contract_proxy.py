"""The ProxyLayer contract (tests/contracts/proxy.py) kept by HaproxyProcess: a real HAProxy (Debian's 2.6) run by
the supervisor, on 127.0.0.1 (no root needed), in front of two small HTTP servers; what it serves is read with HTTP
requests, TLS handshakes and its admin socket. Needs haproxy (a missing one fails the test)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from lbagent.l7.process import HaproxyProcess, ProxyLayer
from lbagent.l7.runtime import parse_servers_state
from lbagent.plan.http import ServerState
from tests import programs
from tests.contracts import proxy
from tests.contracts.proxy import BAD, DRAIN, MAINT, Servers
from tests.unit.test_haproxy_apply import (
    Backend,
    _haproxy_pids,
    admin,
    free_port,
    get,
    make_certificate,
    served_certificate,
    until,
)


class HaproxyWorld:
    """HaproxyProcess with a short backoff (0.3 s), serving backend app (s1, s2: the two servers) on an HTTP port
    and a TLS port."""

    def __init__(self, haproxy: str, runtime_dir: Path, backends: tuple[Backend, Backend]) -> None:
        self.seen: list[bool] = []
        self.haproxy = HaproxyProcess(haproxy, runtime_dir, lambda: self.seen.append(self.haproxy.up()),
                                      backoff=(0.3, 2.0))
        self.proxy: ProxyLayer = self.haproxy
        self.backends = backends
        self.port, self.tls_port = free_port(), free_port()
        self.certificate = str(runtime_dir / "web.pem")
        Path(self.certificate).write_text(self.pem(1001))
        os.chmod(self.certificate, 0o600)
        self._crashed: int | None = None

    def config(self, generation: int, servers: Servers, *, bad: bool = False) -> tuple[str, str]:
        def text(servers: Servers) -> str:
            lines = []
            for name, backend in zip(("s1", "s2"), self.backends, strict=True):
                weight, state = servers[("app", name)]
                lines.append(f"    server {name} 127.0.0.1:{backend.port} weight {0 if state is DRAIN else weight}"
                             + (" disabled" if state is MAINT else ""))
            server_lines = "\n".join(lines)
            return f"""global
    stats socket {self.haproxy.runtime_socket} mode 600 level admin expose-fd listeners
    stats timeout 10s
defaults
    mode http
    option idle-close-on-response
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend web
    bind 127.0.0.1:{self.port}
    bind 127.0.0.1:{self.tls_port} ssl crt {self.certificate}
{f"    {BAD} on" if bad else ""}
    http-response set-header X-Generation {generation}
    default_backend app
backend app
    balance roundrobin
{server_lines}
"""

        return text(servers), text({key: (1, ServerState.READY) for key in servers})

    async def serving(self) -> int | None:
        try:
            status, _, generation = await get(self.port)
        except OSError:
            return None
        assert status == 200 and generation is not None
        return int(generation)

    async def servers(self) -> dict[tuple[str, str], tuple[int, ServerState]]:
        state = parse_servers_state(await admin(self.haproxy, "show servers state"))
        return {key: (s.weight, s.state) for key, s in state.items() if key[0] == "app"}

    async def served_serial(self) -> int:
        return int((await asyncio.to_thread(served_certificate, self.tls_port)).serial_number)

    def pem(self, serial: int) -> str:
        return make_certificate("www.example", serial)

    async def crash(self) -> None:
        master = self.haproxy.master_pid
        assert master is not None
        os.kill(master, signal.SIGKILL)
        assert await until(lambda: not self.haproxy.up() and bool(self.seen), 5.0), "the layer noticed"

    async def recovered(self) -> None:
        assert await until(lambda: self.haproxy.up() and self.seen[-1:] == [True], 15.0), "HAProxy back"


@pytest.fixture
def world() -> Iterator[HaproxyWorld]:
    haproxy = programs.path("haproxy")
    directory = Path(tempfile.mkdtemp(prefix="lbhc-", dir="/tmp"))  # short: unix socket paths are limited
    backends = (Backend("one"), Backend("two"))
    try:
        yield HaproxyWorld(haproxy, directory, backends)
    finally:
        for backend in backends:
            backend.close()
        for pid in _haproxy_pids(directory):  # whatever the test left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("promise", proxy.CONTRACT, ids=lambda f: f.__name__)
def test_haproxy_process_keeps_the_contract(world: HaproxyWorld,
                                            promise: Callable[[proxy.World], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            await promise(world)
        finally:
            await world.proxy.stop(1.0)

    asyncio.run(main())
