"""A network-namespace lab: a client, a BIRD router, two lbagent LBs and three backend nodes on two bridges."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
RUN_ROOT = Path("/run/lbagent-lab")
BACKEND = Path(__file__).resolve().with_name("backend.py")

ROUTER_AS = 64500
LB_AS = 64512
ROUTER_UPLINK = "198.51.100.1"
DEFAULT_SERVICES: list[dict[str, Any]] = [
    {
        "name": "web",
        "namespace": "default",
        "vip": "192.0.2.10",
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "nodePort": 30080}],
    }
]

PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,15}$")
REQUIRED_TOOLS = ("ip", "bird", "birdc", "curl", "ping", "nft", "sysctl")
_EXTRA_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

T = TypeVar("T")


class LabError(Exception):
    """The lab cannot be built, found or driven."""


class LabTimeout(LabError, TimeoutError):
    """A wait_for deadline passed."""


class CommandError(subprocess.CalledProcessError):
    """A command in a lab host failed; the message carries its output."""

    def __str__(self) -> str:
        out = (self.stdout or "").strip()
        err = (self.stderr or "").strip()
        return (
            f"command {self.cmd!r} exited with {self.returncode}"
            + (f"\nstdout: {out}" if out else "")
            + (f"\nstderr: {err}" if err else "")
        )


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll `predicate` until it returns something truthy and return that; raise LabTimeout at the deadline.

    Exceptions in `ignore` count as "not yet"; the last value or exception is put in the timeout's message.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LabTimeout(f"timed out after {timeout:g}s waiting for {message} (last: {last!r})")
        time.sleep(min(interval, remaining))


@dataclass(frozen=True)
class Host:
    """One namespace of the lab: its role, its interfaces (name -> address/prefix) and default gateway."""

    name: str
    role: str
    interfaces: dict[str, str] = field(default_factory=dict)
    gateway: str | None = None

    @property
    def addresses(self) -> list[str]:
        return [cidr.split("/")[0] for cidr in self.interfaces.values()]


@dataclass(frozen=True)
class Cable:
    """A veth pair: one end in `host`, the other in `peer` (enslaved to `bridge` there when set)."""

    host: str
    ifname: str
    peer: str
    peer_ifname: str
    bridge: str | None = None


LBS = ("lb1", "lb2")
NODES = ("node1", "node2", "node3")
HOSTS: dict[str, Host] = {
    h.name: h
    for h in (
        Host("sw", "switch"),
        Host("client", "client", {"eth0": "192.0.2.130/25"}, "192.0.2.129"),
        Host("router", "router", {"client": "192.0.2.129/25", "uplink": f"{ROUTER_UPLINK}/24"}),
        Host("lb1", "lb", {"uplink": "198.51.100.11/24", "cluster": "203.0.113.2/24"}, ROUTER_UPLINK),
        Host("lb2", "lb", {"uplink": "198.51.100.12/24", "cluster": "203.0.113.3/24"}, ROUTER_UPLINK),
        Host("node1", "node", {"eth0": "203.0.113.11/24"}),
        Host("node2", "node", {"eth0": "203.0.113.12/24"}),
        Host("node3", "node", {"eth0": "203.0.113.13/24"}),
    )
}
BRIDGES = ("br-uplink", "br-cluster")
CABLES: tuple[Cable, ...] = (
    Cable("client", "eth0", "router", "client"),
    Cable("router", "uplink", "sw", "up-router", "br-uplink"),
    *(Cable(lb, "uplink", "sw", f"up-{lb}", "br-uplink") for lb in LBS),
    *(Cable(lb, "cluster", "sw", f"cl-{lb}", "br-cluster") for lb in LBS),
    *(Cable(node, "eth0", "sw", f"cl-{node}", "br-cluster") for node in NODES),
)
SYSCTLS: dict[str, tuple[str, ...]] = {
    "router": ("net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=1"),
    "lb1": ("net.ipv4.ip_forward=1",),
    "lb2": ("net.ipv4.ip_forward=1",),
    "sw": (
        "net.bridge.bridge-nf-call-iptables=0",
        "net.bridge.bridge-nf-call-ip6tables=0",
        "net.bridge.bridge-nf-call-arptables=0",
    ),
}


def address(host: str, ifname: str | None = None) -> str:
    """A host's address without prefix length: the named interface's, or its first."""
    interfaces = HOSTS[host].interfaces
    cidr = interfaces[ifname] if ifname is not None else next(iter(interfaces.values()))
    return cidr.split("/")[0]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    parts = [str(REPO / ".venv" / "bin"), *env.get("PATH", "").split(":"), *_EXTRA_PATH]
    env["PATH"] = ":".join(dict.fromkeys(p for p in parts if p))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=_env()["PATH"])


def _run(argv: Sequence[str], stdin: str | None = None, check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False, env=_env()
    )
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, list(argv), proc.stdout, proc.stderr)
    return proc.stdout


def _run_all(jobs: Iterable[tuple[Sequence[str], str | None]], timeout: float = 30) -> None:
    """Run commands concurrently (each with optional stdin); raise the first failure after all finished."""
    started = [
        (
            list(argv),
            stdin,
            subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
            ),
        )
        for argv, stdin in jobs
    ]
    failures: list[CommandError] = []
    for argv, stdin, proc in started:
        try:
            out, err = proc.communicate(stdin or "", timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(CommandError(proc.returncode, argv, out, err))
    if failures:
        raise failures[0]


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def _netns_ids(names: Iterable[str]) -> dict[tuple[int, int], str]:
    """(st_dev, st_ino) of each existing named namespace -> its name."""
    ids: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(Path("/run/netns", name))
        except OSError:
            continue
        ids[(st.st_dev, st.st_ino)] = name
    return ids


def _pid_netns(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in_netns(ids: Iterable[tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """Every live (non-zombie) process whose network namespace is one of `ids` -> that namespace id."""
    wanted = set(ids)
    found: dict[int, tuple[int, int]] = {}
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ns = _pid_netns(int(entry))
            if ns in wanted:
                found[int(entry)] = ns
    return found


def process_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat (R, S, D, Z, ...), or None when the pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def check_requirements(agents: bool = False, repo: Path = REPO) -> list[str]:
    """What is missing to build a lab (root, tools, kernel features); empty when everything is there."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("the lab needs root (network namespaces, veths, bridges)")
    problems += [f"missing tool: {tool}" for tool in REQUIRED_TOOLS if _which(tool) is None]
    if not Path("/proc/self/ns/net").exists():
        problems.append("the kernel has no network namespaces")
    if agents and not os.access(repo / ".venv" / "bin" / "lbagent", os.X_OK):
        problems.append(f"missing {repo / '.venv' / 'bin' / 'lbagent'} (pip install -e . in the venv)")
    return problems


def existing_prefixes(run_root: Path = RUN_ROOT) -> list[str]:
    """Prefixes of labs found on this machine: state dirs, plus namespaces named like a default-prefix lab."""
    found: set[str] = set()
    if run_root.is_dir():
        found.update(p.name for p in run_root.iterdir() if p.is_dir() and PREFIX_PATTERN.match(p.name))
    pattern = re.compile(r"^(lab[0-9a-f]{4})-(" + "|".join(map(re.escape, HOSTS)) + r")$")
    with contextlib.suppress(OSError):
        for name in os.listdir("/run/netns"):
            match = pattern.match(name)
            if match:
                found.add(match.group(1))
    return sorted(found)


class Lab:
    """One lab. `up()` builds it, `down()` removes every trace; both are safe to call more than once."""

    def __init__(
        self,
        prefix: str | None = None,
        services: list[dict[str, Any]] | None = None,
        start_agents: bool = True,
        repo: Path = REPO,
        router_as: int = ROUTER_AS,
        bgp_peers: Mapping[str, int] | None = None,
        router_hold_time: int = 9,
        router_passive: bool = True,
        run_root: Path = RUN_ROOT,
    ) -> None:
        self._random_prefix = prefix is None
        self.prefix = prefix if prefix is not None else _random_prefix(run_root)
        if not PREFIX_PATTERN.match(self.prefix):
            raise LabError(f"bad lab prefix {self.prefix!r}: want {PREFIX_PATTERN.pattern}")
        self.services: list[dict[str, Any]] = json.loads(json.dumps(services or DEFAULT_SERVICES))
        self.start_agents = start_agents
        self.repo = Path(repo)
        self.router_as = router_as
        self.bgp_peers: dict[str, int] = dict(
            bgp_peers if bgp_peers is not None else {address(lb, "uplink"): LB_AS for lb in LBS}
        )
        self.router_hold_time = router_hold_time
        self.router_passive = router_passive
        self.run_root = Path(run_root)
        self.state_dir = self.run_root / self.prefix
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # "host/name" -> the ones this process started
        self._pids: dict[str, int] = {}  # "host/name" -> pid, for every process the lab started
        self._log_offsets: dict[str, int] = {}  # "host/name" -> where its latest start began in its log
        self._atexit_registered = False

    # ----- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def attach(cls, prefix: str, run_root: Path = RUN_ROOT) -> Lab:
        """A handle on a lab another process built, from its state.json (down() works on it too)."""
        path = Path(run_root) / prefix / "state.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LabError(f"no lab {prefix!r}: cannot read {path}: {exc}") from exc
        lab = cls(
            prefix=prefix,
            services=state["services"],
            start_agents=state["startAgents"],
            repo=Path(state["repo"]),
            router_as=state["routerAS"],
            bgp_peers=state["bgpPeers"],
            router_hold_time=state["routerHoldTime"],
            router_passive=state["routerPassive"],
            run_root=run_root,
        )
        lab._pids = {k: int(v) for k, v in state["pids"].items()}
        lab._log_offsets = {k: int(v) for k, v in state["logOffsets"].items()}
        return lab

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def namespaces(self) -> list[str]:
        return [self.ns(host) for host in HOSTS]

    def exists(self) -> bool:
        return self.state_dir.exists() or any(_netns_exists(ns) for ns in self.namespaces())

    def up(self) -> None:
        """Build the lab. On any failure (or Ctrl-C) tear down what was built, then raise."""
        if self._pids and self.state_dir.exists():
            return
        problems = check_requirements(self.start_agents, self.repo)
        if problems:
            raise LabError("cannot build the lab:\n  " + "\n  ".join(problems))
        while self.exists():
            if not self._random_prefix:
                raise LabError(f"lab {self.prefix!r} already exists (run: python -m tests.lab down --prefix ...)")
            self.prefix = _random_prefix(self.run_root)
            self.state_dir = self.run_root / self.prefix
        if not self._atexit_registered:
            atexit.register(self.down)
            self._atexit_registered = True
        try:
            self._build()
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise

    def detach(self) -> None:
        """Leave the lab running after this process exits (the CLI's `up`)."""
        if self._atexit_registered:
            atexit.unregister(self.down)
            self._atexit_registered = False
        self._procs.clear()

    def down(self) -> None:
        """Kill every process in the lab's namespaces, delete them and the state dir. Quiet about what is gone."""
        if self._atexit_registered:
            atexit.unregister(self.down)
            self._atexit_registered = False
        ids = _netns_ids(self.namespaces())
        deadline = time.monotonic() + 10
        while True:
            pids = set(pids_in_netns(ids)) | {p.pid for p in self._procs.values() if p.poll() is None}
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for proc in self._procs.values():
                proc.poll()
            time.sleep(0.01)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        self._procs.clear()
        self._pids.clear()
        existing = [ns for ns in self.namespaces() if _netns_exists(ns)]
        if existing:
            _run(["ip", "-force", "-batch", "-"], "".join(f"netns del {ns}\n" for ns in existing), check=False)
        shutil.rmtree(self.state_dir, ignore_errors=True)  # run_root stays: another lab may be starting in it
        left = [ns for ns in self.namespaces() if _netns_exists(ns)]
        survivors = pids_in_netns(ids)
        if left or survivors:
            raise LabError(f"lab {self.prefix}: could not remove namespaces {left} / processes {sorted(survivors)}")

    def _build(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=False)
        for host in HOSTS:
            (self.state_dir / host).mkdir()
        self._save_state()
        _run(["ip", "-batch", "-"], "".join(f"netns add {ns}\n" for ns in self.namespaces()))
        _run(
            ["ip", "-batch", "-"],
            "".join(
                f"link add name {c.ifname} netns {self.ns(c.host)} type veth "
                f"peer name {c.peer_ifname} netns {self.ns(c.peer)}\n"
                for c in CABLES
            ),
        )
        jobs: list[tuple[Sequence[str], str | None]] = [
            (["ip", "-n", self.ns(host), "-batch", "-"], self._link_script(host)) for host in HOSTS
        ]
        jobs += [
            (["ip", "netns", "exec", self.ns(host), "sysctl", "-q", "-e", "-w", *values], None)
            for host, values in SYSCTLS.items()
        ]
        _run_all(jobs)
        self._write_bird_config()
        self.spawn("router", "bird", self._bird_argv())
        for node in NODES:
            self._spawn_backend(node)
        for lb in LBS:
            (self.state_dir / lb / "run").mkdir(exist_ok=True)
            self.write_agent_config(lb, self.default_agent_config(lb))
        wait_for(self._bird_ready, 10, 0.01, "BIRD's control socket")
        for node in NODES:
            self._wait_backend(node)
        if self.start_agents:
            for lb in LBS:
                self.start_agent(lb)
        self._save_state()

    def _link_script(self, host: str) -> str:
        lines = ["link set dev lo up"]
        if host == "sw":
            for bridge in BRIDGES:
                lines += [f"link add name {bridge} type bridge", f"link set dev {bridge} up"]
        for cable in CABLES:
            if cable.peer == host:
                if cable.bridge is not None:
                    lines.append(f"link set dev {cable.peer_ifname} master {cable.bridge}")
                lines.append(f"link set dev {cable.peer_ifname} up")
        for ifname, cidr in HOSTS[host].interfaces.items():
            lines += [f"addr add {cidr} dev {ifname}", f"link set dev {ifname} up"]
        gateway = HOSTS[host].gateway
        if gateway is not None:
            lines.append(f"route add default via {gateway}")
        return "".join(line + "\n" for line in lines)

    def _save_state(self) -> None:
        if not self.state_dir.is_dir():
            return
        state = {
            "prefix": self.prefix,
            "createdBy": os.getpid(),
            "repo": str(self.repo),
            "routerAS": self.router_as,
            "bgpPeers": self.bgp_peers,
            "routerHoldTime": self.router_hold_time,
            "routerPassive": self.router_passive,
            "services": self.services,
            "startAgents": self.start_agents,
            "topology": self.topology(),
            "pids": self._pids,
            "logOffsets": self._log_offsets,
        }
        _atomic_write(self.state_dir / "state.json", json.dumps(state, indent=2) + "\n")

    # ----- processes -------------------------------------------------------------------------------

    def spawn(self, host: str, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        """Start `argv` in a host's namespace as process `name` of that host; its pid.

        Output goes to `<state dir>/<host>/<name>.log`; down() kills it with everything else in the lab.
        """
        key = self._key(host, name)
        if self._alive(key):
            raise LabError(f"{name} is already running on {host} (pid {self._pids[key]})")
        log_path = self.log_path(host, name)
        with log_path.open("ab") as log:
            offset = log.tell()
            log.write(f"===== {time.strftime('%H:%M:%S')} start: {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(host), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.repo,
                env={**_env(), **(env or {})},
            )
        self._procs[key] = proc
        self._pids[key] = proc.pid
        self._log_offsets[key] = offset
        self._save_state()
        return proc.pid

    def process_running(self, host: str, name: str) -> bool:
        """Whether the lab's process `name` on `host` exists and is not a zombie."""
        return self._alive(self._key(host, name))

    def process_pid(self, host: str, name: str) -> int | None:
        """The pid of a running lab process, None when it is not running."""
        key = self._key(host, name)
        return self._pids.get(key) if self._alive(key) else None

    def wait_process_exit(self, host: str, name: str, timeout: float) -> int | None:
        """Wait for a lab process to exit: its exit code (negative: killed by that signal), or None when
        this Python process did not start it (code unknown). LabTimeout when it still runs at the deadline."""
        key = self._key(host, name)
        wait_for(lambda: not self._alive(key), timeout, 0.02, f"{name} on {host} to exit")
        proc = self._procs.get(key)
        return proc.returncode if proc is not None else None

    def stop_process(self, host: str, name: str, sig: int = signal.SIGTERM, timeout: float = 5) -> int | None:
        """Send `sig`, wait for the exit (SIGKILL at the deadline); the code as in wait_process_exit."""
        pid = self.process_pid(host, name)
        if pid is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        try:
            return self.wait_process_exit(host, name, timeout)
        except LabTimeout:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return self.wait_process_exit(host, name, 5)

    def log_path(self, host: str, name: str) -> Path:
        self._key(host, name)
        return self.state_dir / host / f"{name}.log"

    def process_log(self, host: str, name: str, since_start: bool = False) -> str:
        """A lab process's output: all of it, or what its latest start wrote."""
        key = self._key(host, name)
        try:
            with self.log_path(host, name).open("rb") as f:
                if since_start:
                    f.seek(self._log_offsets.get(key, 0))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _key(self, host: str, name: str) -> str:
        self.ns(host)
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
            raise LabError(f"bad process name {name!r}")
        return f"{host}/{name}"

    def _alive(self, key: str) -> bool:
        proc = self._procs.get(key)
        if proc is not None:
            return proc.poll() is None
        pid = self._pids.get(key)
        if pid is None:
            return False
        ids = _netns_ids([self.ns(key.split("/", 1)[0])])
        return process_state(pid) not in (None, "Z", "X") and _pid_netns(pid) in ids

    # ----- router ----------------------------------------------------------------------------------

    @property
    def bird_socket(self) -> Path:
        return self.state_dir / "router" / "bird.ctl"

    def _bird_argv(self) -> list[str]:
        d = self.state_dir / "router"
        return ["bird", "-f", "-c", str(d / "bird.conf"), "-s", str(self.bird_socket), "-P", str(d / "bird.pid")]

    def bird_protocol_name(self, peer: str) -> str:
        """The BIRD protocol of a BGP peer: the LB's name for an LB address, else peer_<address>."""
        for lb in LBS:
            if address(lb, "uplink") == peer:
                return lb
        return "peer_" + re.sub(r"[^0-9A-Za-z]", "_", peer)

    def _write_bird_config(self) -> None:
        peers = "".join(
            f"""
protocol bgp {self.bird_protocol_name(peer)} {{
    local {ROUTER_UPLINK} as {self.router_as};
    neighbor {peer} as {peer_as};
    passive {"on" if self.router_passive else "off"};
    hold time {self.router_hold_time};
    connect delay time 1;
    error wait time 1, 1;
    ipv4 {{ import all; export none; }};
}}
"""
            for peer, peer_as in self.bgp_peers.items()
        )
        text = f"""# generated by tests/lab for lab {self.prefix}
log stderr all;
timeformat protocol "%T";
router id {ROUTER_UPLINK};

protocol device {{ scan time 1; }}

protocol kernel {{
    ipv4 {{ export where source = RTS_BGP; }};
    merge paths yes limit 16;
}}
{peers}"""
        _atomic_write(self.state_dir / "router" / "bird.conf", text)

    def _bird_ready(self) -> bool:
        if not self.process_running("router", "bird"):
            raise LabError(f"BIRD exited:\n{self.process_log('router', 'bird', since_start=True)}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            try:
                sock.connect(str(self.bird_socket))
                return sock.recv(256).startswith(b"0001 ")
            except OSError:
                return False

    def birdc(self, *command: str, check: bool = True) -> str:
        """Run a birdc command against the router's BIRD; its output."""
        return _run(["birdc", "-s", str(self.bird_socket), *command], check=check)

    def bgp_sessions(self) -> dict[str, str]:
        """BIRD's BGP protocols -> their state info (`Established`, `Passive`, `Active`, ...)."""
        sessions: dict[str, str] = {}
        for line in self.birdc("show", "protocols").splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[1] == "BGP":
                sessions[fields[0]] = " ".join(fields[5:]) or fields[3]
        return sessions

    def router_nexthops(self, prefix: str) -> set[str]:
        """Next-hop gateways of the route for `prefix` in the router's kernel table (empty when there is none)."""
        if "/" not in prefix:
            prefix += "/128" if ":" in prefix else "/32"
        routes = json.loads(_run(["ip", "-n", self.ns("router"), "-j", "route", "show", "exact", prefix]) or "[]")
        hops: set[str] = set()
        for route in routes:
            if "gateway" in route:
                hops.add(route["gateway"])
            hops.update(hop["gateway"] for hop in route.get("nexthops", []) if "gateway" in hop)
        return hops

    def router_route(self, prefix: str) -> str:
        """The router's kernel route for `prefix` as `ip route` prints it (multipath spans several lines)."""
        if "/" not in prefix:
            prefix += "/128" if ":" in prefix else "/32"
        return _run(["ip", "-n", self.ns("router"), "route", "show", "exact", prefix]).rstrip()

    # ----- hosts -----------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        if host not in HOSTS:
            raise LabError(f"no host {host!r} in the lab (hosts: {', '.join(HOSTS)})")
        return f"{self.prefix}-{host}"

    def address(self, host: str, ifname: str | None = None) -> str:
        return address(host, ifname)

    def topology(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "stateDir": str(self.state_dir),
            "hosts": {
                h.name: {
                    "role": h.role,
                    "namespace": self.ns(h.name),
                    "addresses": h.addresses,
                    "interfaces": dict(h.interfaces),
                    **({"gateway": h.gateway} if h.gateway else {}),
                    **({"bridges": {b: [c.peer_ifname for c in CABLES if c.bridge == b] for b in BRIDGES}}
                       if h.role == "switch" else {}),
                }
                for h in HOSTS.values()
            },
            "router": {
                "as": self.router_as,
                "peers": {peer: {"as": peer_as, "protocol": self.bird_protocol_name(peer)}
                          for peer, peer_as in self.bgp_peers.items()},
                "birdSocket": str(self.bird_socket),
            },
            "services": self.services,
        }

    def exec(
        self, host: str, argv: Sequence[str], check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in a host's namespace and capture its output; CommandError on failure when `check`."""
        cmd = ["ip", "netns", "exec", self.ns(host), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=_env())
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def request(self, url: str, timeout: float = 2, host: str = "client") -> dict[str, Any] | None:
        """GET `url` with curl from `host`; the JSON answer, or None on any failure."""
        argv = ["curl", "-sS", "--noproxy", "*", "--connect-timeout", f"{timeout:g}", "--max-time", f"{timeout:g}", url]
        try:
            proc = self.exec(host, argv, check=False, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode != 0:
            return None
        try:
            body = json.loads(proc.stdout)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def ping(self, host: str, target: str, timeout: float = 2) -> bool:
        """One ICMP echo from `host` to `target`, answered within `timeout`."""
        proc = self.exec(host, ["ping", "-n", "-q", "-c", "1", "-W", f"{timeout:g}", target], check=False,
                         timeout=timeout + 5)
        return proc.returncode == 0

    def nft_ruleset(self, lb: str) -> str:
        return self.exec(lb, ["nft", "list", "ruleset"]).stdout

    # ----- backends --------------------------------------------------------------------------------

    def node_ports(self, protocol: str = "TCP") -> list[int]:
        """Every nodePort of the lab's services with that protocol (what each backend listens on)."""
        return sorted(
            {int(p["nodePort"]) for s in self.services for p in s["ports"] if p.get("protocol", "TCP") == protocol}
        )

    def _spawn_backend(self, node: str) -> None:
        ready = self.state_dir / node / "backend.ready"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, str(BACKEND), "--name", node, "--ready-file", str(ready)]
        argv += [a for port in self.node_ports("TCP") for a in ("--tcp", str(port))]
        argv += [a for port in self.node_ports("UDP") for a in ("--udp", str(port))]
        self.spawn(node, "backend", argv)

    def _wait_backend(self, node: str) -> None:
        ready = self.state_dir / node / "backend.ready"

        def is_ready() -> bool:
            if not self.process_running(node, "backend"):
                raise LabError(f"backend on {node} exited:\n{self.backend_log(node)}")
            return ready.exists()

        wait_for(is_ready, 10, 0.01, f"the backend on {node} to listen")

    def backend_running(self, node: str) -> bool:
        return self.process_running(node, "backend")

    def stop_backend(self, node: str) -> None:
        """Stop a node's backend (SIGTERM, then SIGKILL) and wait until it is gone: its ports refuse."""
        self.stop_process(node, "backend")
        self._save_state()

    def start_backend(self, node: str) -> None:
        """Start a node's backend again and wait until it listens on every nodePort."""
        if self.backend_running(node):
            raise LabError(f"the backend on {node} is already running")
        self._spawn_backend(node)
        self._wait_backend(node)
        self._save_state()

    def backend_log(self, node: str) -> str:
        return self.process_log(node, "backend")

    # ----- agents ----------------------------------------------------------------------------------

    def agent_config_path(self, lb: str) -> Path:
        self._check_lb(lb)
        return self.state_dir / lb / "lbagent.yaml"

    def default_agent_config(self, lb: str) -> dict[str, Any]:
        """The lab's lbagent config for an LB, as a dict in the config file's (camelCase) format."""
        self._check_lb(lb)
        uplink = address(lb, "uplink")
        return {
            "node": {"name": lb, "vipInterface": "lo"},
            "agent": {"drain": "1s", "runtimeDir": str(self.state_dir / lb / "run")},
            "bgp": {
                "localAS": self.bgp_peers.get(uplink, LB_AS),
                "routerID": uplink,
                "exabgp": str(self.repo / ".venv" / "bin" / "exabgp"),
                "peers": [{"address": ROUTER_UPLINK, "peerAS": self.router_as, "holdTime": 3}],
            },
            "dataplane": {"kind": "nftables", "table": "lbagent", "manageSysctls": True},
            "healthCheckDefaults": {"interval": "0.5s", "timeout": "0.5s", "rise": 2, "fall": 2},
            "nodes": [{"name": node, "addresses": [address(node)]} for node in NODES],
            "services": json.loads(json.dumps(self.services)),
        }

    def write_agent_config(self, lb: str, config: Mapping[str, Any] | str) -> Path:
        """Write (atomically) an LB's lbagent config: a dict, or YAML text as is (may be invalid on purpose)."""
        text = config if isinstance(config, str) else yaml.safe_dump(dict(config), sort_keys=False)
        path = self.agent_config_path(lb)
        _atomic_write(path, text)
        return path

    def agent_config(self, lb: str) -> dict[str, Any]:
        data = yaml.safe_load(self.agent_config_path(lb).read_text())
        if not isinstance(data, dict):
            raise LabError(f"{self.agent_config_path(lb)} is not a YAML mapping")
        return data

    def start_agent(self, lb: str, extra_args: Sequence[str] = ()) -> None:
        """Start `lbagent run -c <config>` in the LB's namespace; its output goes to agent_log(lb)."""
        self._check_lb(lb)
        if self.agent_running(lb):
            raise LabError(f"the agent on {lb} is already running (pid {self.agent_pid(lb)})")
        exe = self.repo / ".venv" / "bin" / "lbagent"
        if not os.access(exe, os.X_OK):
            raise LabError(f"cannot start the agent: {exe} is missing")
        argv = [str(exe), "run", "-c", str(self.agent_config_path(lb)), *extra_args]
        self.spawn(lb, "agent", argv)

    def agent_pid(self, lb: str) -> int | None:
        self._check_lb(lb)
        return self.process_pid(lb, "agent")

    def agent_running(self, lb: str) -> bool:
        """Whether the agent process exists and is not a zombie."""
        self._check_lb(lb)
        return self.process_running(lb, "agent")

    def signal_agent(self, lb: str, sig: int) -> None:
        pid = self.agent_pid(lb)
        if pid is None:
            raise LabError(f"the agent on {lb} is not running:\n{self.agent_log(lb, since_start=True)[-2000:]}")
        os.kill(pid, sig)

    def wait_agent_exit(self, lb: str, timeout: float) -> int | None:
        """Wait for the agent to exit: its exit code (negative: killed by that signal), or None when this
        process did not start it (code unknown). LabTimeout when it is still running at the deadline."""
        self._check_lb(lb)
        return self.wait_process_exit(lb, "agent", timeout)

    def stop_agent(self, lb: str, timeout: float = 10) -> int | None:
        """SIGTERM the agent and wait (SIGKILL at the deadline); its exit code as in wait_agent_exit."""
        self._check_lb(lb)
        code = self.stop_process(lb, "agent", signal.SIGTERM, timeout)
        self._save_state()
        return code

    def agent_log(self, lb: str, since_start: bool = False) -> str:
        """The agent's log file: everything, or only what its latest start wrote."""
        self._check_lb(lb)
        return self.process_log(lb, "agent", since_start)

    def _check_lb(self, lb: str) -> None:
        if lb not in LBS:
            raise LabError(f"{lb!r} is not an LB (LBs: {', '.join(LBS)})")


def _random_prefix(run_root: Path) -> str:
    while True:
        prefix = "lab" + secrets.token_hex(2)
        if not (run_root / prefix).exists() and not any(_netns_exists(f"{prefix}-{h}") for h in HOSTS):
            return prefix


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
