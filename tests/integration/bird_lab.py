"""A two-namespace BGP lab for the ExaBGP tests: BIRD 2 in `<prefix>-r`, the speaker (and the ExaBGP it runs) in
`<prefix>-s`, one veth between them. The `lab` fixture (conftest.py) builds one per test and tears it down."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import TypeVar

import pytest

from lbagent import model
from tests import programs

ROUTER = IPv4Address("198.51.100.1")
SPEAKER = IPv4Address("198.51.100.2")
ROUTER_AS = 64512
SPEAKER_AS = 64513
HOLD = 9
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def require_lab() -> None:
    """Missing prerequisites fail the run: a skipped BGP test would look like a passing one."""
    if os.geteuid() != 0:
        pytest.fail("the ExaBGP/BIRD tests need root (network namespaces)")
    missing = programs.missing(("ip", "bird", "birdc", "exabgp"))
    if missing:
        pytest.fail(f"missing for the ExaBGP/BIRD tests: {'; '.join(missing)}")


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


@dataclass
class Lab:
    """Two namespaces on one veth: BIRD in `router`, the speaker (and ExaBGP) in `speaker`."""

    prefix: str
    workdir: Path
    bird_pid: int | None = None
    exabgp_pids: set[int] = field(default_factory=set)

    @property
    def router(self) -> str:
        return f"{self.prefix}-r"

    @property
    def speaker(self) -> str:
        return f"{self.prefix}-s"

    @property
    def bird_socket(self) -> str:
        return str(self.workdir / "bird.ctl")

    def start_bird(self, password: str | None = None) -> None:
        conf = self.workdir / "bird.conf"
        conf.write_text(
            f"""\
log "{self.workdir}/bird.log" all;
router id {ROUTER};
protocol device {{}}
protocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; merge paths yes limit 16; }}
protocol bgp speaker {{
  local {ROUTER} as {ROUTER_AS};
  neighbor {SPEAKER} as {SPEAKER_AS};
  hold time {HOLD};
  error wait time 1,1;
  connect delay time 1;
  {f'password "{password}";' if password else ""}
  ipv4 {{ import all; export none; }};
}}
"""
        )
        pidfile = self.workdir / "bird.pid"
        run(
            "ip",
            "netns",
            "exec",
            self.router,
            "bird",
            "-c",
            str(conf),
            "-s",
            self.bird_socket,
            "-P",
            str(pidfile),
        )
        # BIRD's daemonised child writes the pid file after the parent has returned: poll for it.
        deadline = time.monotonic() + 10
        while not (text := pidfile.read_text().strip() if pidfile.exists() else ""):
            if time.monotonic() > deadline:
                raise AssertionError(f"BIRD wrote no pid to {pidfile} within 10 s")
            time.sleep(0.01)
        self.bird_pid = int(text)

    def birdc(self, *command: str) -> str:
        return run("birdc", "-s", self.bird_socket, *command)

    def bird_prefixes(self) -> set[str]:
        """The prefixes BIRD holds from the speaker's session, as `birdc show route` lists them."""
        return set(re.findall(r"^(\S+/\d+)\s", self.birdc("show", "route", "protocol", "speaker"), re.MULTILINE))

    def routes(self) -> dict[str, set[str]]:
        """The router's kernel routes that BIRD installed: destination -> gateways."""
        found: dict[str, set[str]] = {}
        for route in json.loads(run("ip", "-n", self.router, "-j", "route", "show")):
            if route.get("protocol") == "bird":
                hops = route.get("nexthops", [route])
                found[route["dst"]] = {hop["gateway"] for hop in hops}
        return found

    @contextlib.contextmanager
    def inside_speaker(self) -> Iterator[None]:
        """Run this thread (so the speaker and the ExaBGP it forks) in the speaker namespace."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.speaker}", os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the speaker namespace")
            try:
                yield
            finally:
                if libc.setns(home, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back home")
        finally:
            os.close(home)
            os.close(target)


def bgp_settings(password: str | None = None) -> model.Bgp:
    peer = model.Peer(address=ROUTER, peer_as=ROUTER_AS, hold_time=HOLD, password=password)
    return model.Bgp(local_as=SPEAKER_AS, router_id=SPEAKER, peers=(peer,))


def host(prefix: str) -> str:
    return prefix.removesuffix("/32")


async def until(what: str, predicate: Callable[[], T | None], timeout: float = 10.0) -> T:
    """Poll until `predicate` gives something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)




@contextlib.contextmanager
def built() -> Iterator[Lab]:
    """A new lab, torn down (with whatever still runs in it) on the way out."""
    require_lab()
    prefix = f"bgpt{secrets.token_hex(3)}"
    # short: the API socket path must fit in sun_path
    lab = Lab(prefix, Path(tempfile.mkdtemp(prefix=f"{prefix}-")))
    try:
        run("ip", "netns", "add", lab.router)
        run("ip", "netns", "add", lab.speaker)
        run(
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            lab.router,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            lab.speaker,
        )
        for ns, address in ((lab.router, ROUTER), (lab.speaker, SPEAKER)):
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
        yield lab
    finally:
        for pid in [*lab.exabgp_pids, lab.bird_pid]:
            # only what is still ours: a pid of a process that ended may name another one by now
            with contextlib.suppress(OSError):
                if pid is not None and lab.prefix in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
        for ns in (lab.router, lab.speaker):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(lab.workdir, ignore_errors=True)


