"""A network-namespace lab: a client, a BIRD router, two lbagent LBs and three backend nodes on two bridges."""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml

from tests import programs

REPO = Path(__file__).resolve().parents[2]
RUN_ROOT = Path("/run/lbagent-lab")
BACKEND = Path(__file__).resolve().with_name("backend.py")

ROUTER_AS = 64500
LB_AS = 64512
ROUTER_UPLINK = "198.51.100.1"
ROUTER_UPLINK6 = "2001:db8:1::1"
ROUTER_CLUSTER = "203.0.113.1"  # the router's leg on the nodes' segment: their default gateway
ROUTER_CLUSTER6 = "2001:db8:2::1"
KUBE_PROXY_PORT = 10256  # kube-proxy's /healthz, served by every node's backend
RETURN_TABLES = {"lb1": 101, "lb2": 102}  # nat return path: fwmark N (and routing table 100 + N) per LB
RETURN_MARKS = {"lb1": 1, "lb2": 2}
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


TIME_SCALE_VARIABLE = "LBAGENT_TEST_TIME_SCALE"


def time_scale() -> float:
    """How many times slower than this project's 2-core machines the lab runs here: 1, or what the guest harness
    measured for its emulated CPU (tests/guest/vm.py sets LBAGENT_TEST_TIME_SCALE in every guest command).
    Every wait_for deadline is multiplied by it: a deadline catches a hang, it is not a speed requirement."""
    try:
        return max(1.0, float(os.environ.get(TIME_SCALE_VARIABLE, "1")))
    except ValueError:
        return 1.0


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll `predicate` until it returns something truthy and return that; raise LabTimeout at the deadline.

    Exceptions in `ignore` count as "not yet"; the last value or exception is put in the timeout's message.
    The deadline is `timeout` times time_scale().
    """
    timeout *= time_scale()
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
    """One namespace of the lab: its role, its interfaces (name -> address/prefix) and default gateway, the
    same for IPv6 (configured only in a Lab(ipv6=True))."""

    name: str
    role: str
    interfaces: dict[str, str] = field(default_factory=dict)
    gateway: str | None = None
    interfaces6: dict[str, str] = field(default_factory=dict)
    gateway6: str | None = None

    @property
    def addresses(self) -> list[str]:
        return [cidr.split("/")[0] for cidr in self.interfaces.values()]

    @property
    def addresses6(self) -> list[str]:
        return [cidr.split("/")[0] for cidr in self.interfaces6.values()]


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
        Host("client", "client", {"eth0": "192.0.2.130/25"}, "192.0.2.129",
             {"eth0": "2001:db8:c::130/64"}, "2001:db8:c::129"),
        Host("router", "router",
             {"client": "192.0.2.129/25", "uplink": f"{ROUTER_UPLINK}/24", "cluster": f"{ROUTER_CLUSTER}/24"}, None,
             {"client": "2001:db8:c::129/64", "uplink": f"{ROUTER_UPLINK6}/64", "cluster": f"{ROUTER_CLUSTER6}/64"}),
        Host("lb1", "lb", {"uplink": "198.51.100.11/24", "cluster": "203.0.113.2/24"}, ROUTER_UPLINK,
             {"uplink": "2001:db8:1::11/64", "cluster": "2001:db8:2::2/64"}, ROUTER_UPLINK6),
        Host("lb2", "lb", {"uplink": "198.51.100.12/24", "cluster": "203.0.113.3/24"}, ROUTER_UPLINK,
             {"uplink": "2001:db8:1::12/64", "cluster": "2001:db8:2::3/64"}, ROUTER_UPLINK6),
        # The nodes' default route is the router's leg on their segment, as at a real site: direct server return
        # answers the client that way. (nat's answers follow the return path's marks instead, see below.)
        Host("node1", "node", {"eth0": "203.0.113.11/24"}, ROUTER_CLUSTER, {"eth0": "2001:db8:2::11/64"},
             ROUTER_CLUSTER6),
        Host("node2", "node", {"eth0": "203.0.113.12/24"}, ROUTER_CLUSTER, {"eth0": "2001:db8:2::12/64"},
             ROUTER_CLUSTER6),
        Host("node3", "node", {"eth0": "203.0.113.13/24"}, ROUTER_CLUSTER, {"eth0": "2001:db8:2::13/64"},
             ROUTER_CLUSTER6),
    )
}
BRIDGES = ("br-uplink", "br-cluster")
CABLES: tuple[Cable, ...] = (
    Cable("client", "eth0", "router", "client"),
    Cable("router", "uplink", "sw", "up-router", "br-uplink"),
    Cable("router", "cluster", "sw", "cl-router", "br-cluster"),
    *(Cable(lb, "uplink", "sw", f"up-{lb}", "br-uplink") for lb in LBS),
    *(Cable(lb, "cluster", "sw", f"cl-{lb}", "br-cluster") for lb in LBS),
    *(Cable(node, "eth0", "sw", f"cl-{node}", "br-cluster") for node in NODES),
)
SYSCTLS: dict[str, tuple[str, ...]] = {
    # No TIME_WAIT on the client: request(local_port=N) can reuse a source port at once.
    "client": ("net.ipv4.tcp_max_tw_buckets=0",),
    # ECMP by the 5-tuple (policy 3 with the fields source and destination address, protocol, ports), as a real
    # router hashes: policy 1 would reuse the client socket's hash, which Linux re-randomises on a retransmission
    # timeout, so a retransmit could move a flow to the other LB.
    "router": ("net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=3",
               "net.ipv4.fib_multipath_hash_fields=0x0037"),
    "lb1": ("net.ipv4.ip_forward=1",),
    "lb2": ("net.ipv4.ip_forward=1",),
    "sw": (
        "net.bridge.bridge-nf-call-iptables=0",
        "net.bridge.bridge-nf-call-ip6tables=0",
        "net.bridge.bridge-nf-call-arptables=0",
    ),
}
SYSCTLS6: dict[str, tuple[str, ...]] = {
    "router": ("net.ipv6.conf.all.forwarding=1", "net.ipv6.fib_multipath_hash_policy=3",
               "net.ipv6.fib_multipath_hash_fields=0x0037"),
    "lb1": ("net.ipv6.conf.all.forwarding=1",),
    "lb2": ("net.ipv6.conf.all.forwarding=1",),
}
# On the nodes with the nat return path: no reverse-path filter (the client's address is reachable only through
# the mark's table), marks count in source validation, and TCP/ICMP answers are routed with the request's mark.
RETURN_PATH_SYSCTLS = (
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv4.conf.eth0.rp_filter=0",
    "net.ipv4.conf.all.src_valid_mark=1",
    "net.ipv4.tcp_fwmark_accept=1",
    "net.ipv4.fwmark_reflect=1",
    "net.ipv6.fwmark_reflect=1",
)


def address(host: str, ifname: str | None = None) -> str:
    """A host's address without prefix length: the named interface's, or its first."""
    interfaces = HOSTS[host].interfaces
    cidr = interfaces[ifname] if ifname is not None else next(iter(interfaces.values()))
    return cidr.split("/")[0]


def address6(host: str, ifname: str | None = None) -> str:
    """A host's IPv6 address (configured in a Lab(ipv6=True)) without prefix length: the interface's, or its first."""
    interfaces = HOSTS[host].interfaces6
    cidr = interfaces[ifname] if ifname is not None else next(iter(interfaces.values()))
    return cidr.split("/")[0]


def link_local(host: str, ifname: str) -> str:
    """The fixed link-local address of an interface in a Lab(ipv6=True): fe80:: plus its global address's
    interface identifier (fe80::11 for 2001:db8:1::11), added without DAD like the global one."""
    iid = int(ipaddress.IPv6Address(address6(host, ifname))) & ((1 << 64) - 1)
    return str(ipaddress.IPv6Address((0xFE80 << 112) | iid))


def mac_address(host: str, ifname: str) -> str:
    """The fixed MAC of an addressed interface: 02:00 (locally administered) then its IPv4 address in hex."""
    octets = ipaddress.IPv4Address(address(host, ifname)).packed
    return "02:00:" + ":".join(f"{b:02x}" for b in octets)


def service_key(service: Mapping[str, Any]) -> str:
    """A service's `namespace/name` (namespace defaults to "default"), as lbagent and kube-proxy name it."""
    return f"{service.get('namespace') or 'default'}/{service['name']}"


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
    problems += programs.missing(REQUIRED_TOOLS)
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
        ipv6: bool = False,
        return_path: bool = True,
        http: Mapping[str, Any] | None = None,
        router_bfd: Mapping[str, int] | None = None,
    ) -> None:
        self._random_prefix = prefix is None
        self.prefix = prefix if prefix is not None else _random_prefix(run_root)
        if not PREFIX_PATTERN.match(self.prefix):
            raise LabError(f"bad lab prefix {self.prefix!r}: want {PREFIX_PATTERN.pattern}")
        self.services: list[dict[str, Any]] = json.loads(json.dumps(services or DEFAULT_SERVICES))
        # The HTTP layer's part of every agent's config (proxy, listeners, routes, backends), as is.
        self.http: dict[str, Any] = json.loads(json.dumps(dict(http or {})))
        self.start_agents = start_agents
        self.repo = Path(repo)
        self.router_as = router_as
        self.ipv6 = ipv6
        self.return_path = return_path
        default_peers = {address(lb, "uplink"): LB_AS for lb in LBS}
        if ipv6:
            default_peers.update({address6(lb, "uplink"): LB_AS for lb in LBS})
        self.bgp_peers: dict[str, int] = dict(bgp_peers if bgp_peers is not None else default_peers)
        if not ipv6 and any(":" in peer for peer in self.bgp_peers):
            raise LabError("IPv6 BGP peers need Lab(ipv6=True)")
        self._check_ports()
        self.router_hold_time = router_hold_time
        self.router_passive = router_passive
        # BFD on the router's BGP sessions (BIRD `protocol bfd` and `bfd on`): {"interval": ms, "multiplier": n}.
        self.router_bfd: dict[str, int] | None = dict(router_bfd) if router_bfd is not None else None
        self.run_root = Path(run_root)
        self.state_dir = self.run_root / self.prefix
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # "host/name" -> the ones this process started
        self._pids: dict[str, int] = {}  # "host/name" -> pid, for every process the lab started
        self._log_offsets: dict[str, int] = {}  # "host/name" -> where its latest start began in its log
        self._atexit_registered = False
        self._health_lock = threading.Lock()

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
            ipv6=state.get("ipv6", False),
            return_path=state.get("returnPath", False),
            http=state.get("http"),
            router_bfd=state.get("routerBfd"),
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
        # Each veth end gets its own ifindex (100 + i here, 200 + i there): when both ends of a pair share one,
        # the kernel's linkwatch treats the carrier change as not urgent and delays it up to a second, and
        # IPv6 (operstate) or the first packets (qdisc) wait for it.
        _run(
            ["ip", "-batch", "-"],
            "".join(
                f"link add name {c.ifname} index {100 + i} address {mac_address(c.host, c.ifname)} "
                f"netns {self.ns(c.host)} type veth peer name {c.peer_ifname} index {200 + i} netns {self.ns(c.peer)}\n"
                for i, c in enumerate(CABLES)
            ),
        )
        for node in NODES:
            _atomic_write(self.health_state_path(node), json.dumps(_DEFAULT_HEALTH_STATE) + "\n")
        jobs: list[tuple[Sequence[str], str | None]] = [
            (["ip", "-n", self.ns(host), "-batch", "-"], self._link_script(host)) for host in HOSTS
        ]
        jobs += [
            (["ip", "netns", "exec", self.ns(host), "sysctl", "-q", "-e", "-w", *values], None)
            for host, values in self._sysctls().items()
        ]
        if self.return_path:
            # One nft first, alone, so that nftables' modules are loaded before three nft run at once: in the test
            # guest, where they load on demand, one of three first nft processes once got "Unable to initialize
            # Netlink socket: Protocol not supported" (CI, 2026-12-05).
            _run(["ip", "netns", "exec", self.ns(NODES[0]), "nft", "list", "tables"])
            for node in NODES:
                jobs.append((["ip", "netns", "exec", self.ns(node), "nft", "-f", "-"], self.return_path_ruleset()))
                if self.ipv6:
                    jobs.append((["ip", "-6", "-n", self.ns(node), "-batch", "-"], self._return_rules6()))
        _run_all(jobs)
        self.program_load_balancer_ips()
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
        """`ip -batch` lines that set up a host: bridges, addresses, default routes, the return path's tables."""
        lines = ["link set dev lo up"]
        if host == "sw":
            for bridge in BRIDGES:
                lines.append(f"link add name {bridge} type bridge mcast_snooping 0")
                if self.ipv6:
                    lines.append(f"link set dev {bridge} addrgenmode none")
                lines.append(f"link set dev {bridge} up")
        for cable in CABLES:
            if cable.peer == host:
                if cable.bridge is not None:
                    lines.append(f"link set dev {cable.peer_ifname} master {cable.bridge}")
                if self.ipv6:
                    lines.append(f"link set dev {cable.peer_ifname} addrgenmode none")
                lines.append(f"link set dev {cable.peer_ifname} up")
        h = HOSTS[host]
        for ifname, cidr in h.interfaces.items():
            lines.append(f"addr add {cidr} dev {ifname}")
            if self.ipv6:  # no DAD (usable at once), and a fixed link-local address instead of a generated one
                lines += [
                    f"link set dev {ifname} addrgenmode none",
                    f"addr add {h.interfaces6[ifname]} dev {ifname} nodad",
                    f"addr add {link_local(host, ifname)}/64 dev {ifname} nodad",
                ]
            lines.append(f"link set dev {ifname} up")
        if h.gateway is not None:
            lines.append(f"route add default via {h.gateway}")
        if self.ipv6 and h.gateway6 is not None:
            lines.append(f"route add default via {h.gateway6}")
        if host in NODES and self.return_path:
            for lb in LBS:
                lines += [
                    f"rule add fwmark {RETURN_MARKS[lb]} table {RETURN_TABLES[lb]}",
                    f"route add default via {address(lb, 'cluster')} table {RETURN_TABLES[lb]}",
                ]
                if self.ipv6:
                    lines.append(f"route add default via {address6(lb, 'cluster')} table {RETURN_TABLES[lb]}")
            # A UDP answer's first route lookup uses the socket's mark (0) and takes main's default route; the
            # output hook then re-routes it by the connection's mark. (TCP and ICMP answers carry the request's
            # mark from the start: fwmark_accept, fwmark_reflect.)
        return "".join(line + "\n" for line in lines)

    @staticmethod
    def _return_rules6() -> str:
        """IPv6 policy rules of the return path (`ip -6 -batch`): the marks' tables."""
        lines = [f"rule add fwmark {RETURN_MARKS[lb]} table {RETURN_TABLES[lb]}" for lb in LBS]
        return "".join(line + "\n" for line in lines)

    def _sysctls(self) -> dict[str, tuple[str, ...]]:
        sysctls = dict(SYSCTLS)
        if self.ipv6:
            for host, values in SYSCTLS6.items():
                sysctls[host] = sysctls.get(host, ()) + values
        if self.return_path:
            for node in NODES:
                sysctls[node] = sysctls.get(node, ()) + RETURN_PATH_SYSCTLS
        return sysctls

    def return_path_ruleset(self) -> str:
        """The nftables table the nodes get for the nat return path (Lab(return_path=True)).

        Every packet from an LB's MAC to the node's own address (nat: the LB rewrote the destination to it)
        stamps the connection with that LB's mark (so it follows the LB that forwarded its latest packet); the
        mark is copied onto the packets of the connection in both directions, and `ip rule fwmark N table 100+N`
        routes the answers back through that LB. Packets still addressed to a VIP (direct server return) are
        left alone: their answers take the default route to the client, not the LB."""
        lines = [
            "table inet lab_return {",
            "    chain prerouting {",
            "        type filter hook prerouting priority mangle; policy accept;",
            *(f"        ether saddr {mac_address(lb, 'cluster')} fib daddr type local ct mark set {RETURN_MARKS[lb]}"
              for lb in LBS),
            "        ct mark != 0 meta mark set ct mark",
            "    }",
            "    chain output {",
            "        type route hook output priority mangle; policy accept;",
            "        ct mark != 0 meta mark set ct mark",
            "    }",
            "}",
        ]
        return "".join(line + "\n" for line in lines)

    def load_balancer_ip_ruleset(self, node: str) -> str:
        """What kube-proxy does on a node for a LoadBalancer Service's address in `ipMode: VIP` (and for every
        one before Kubernetes 1.29): a packet that reaches the node still addressed to VIP:port (direct server
        return: the LB changed only the MAC address) goes to the Service, here the backend's nodePort. The node
        does not hold the VIP, so it never answers ARP for it; the answer leaves with the VIP as its source."""
        rules = []
        for service in self.services:
            vips = [service["vip"]] if "vip" in service else list(service.get("vips", []))
            for vip in vips:
                l3 = "ip6" if ":" in str(vip) else "ip"
                for port in service.get("ports", []):
                    proto = str(port.get("protocol", "TCP")).lower()
                    # to the node's own address: what `redirect` does, without nft_redir (not in every kernel)
                    own = f"[{address6(node)}]" if l3 == "ip6" else address(node)
                    rules.append(f"        {l3} daddr {vip} {proto} dport {port['port']}"
                                 f" dnat {l3} to {own}:{port['nodePort']}")
        return "".join(line + "\n" for line in [
            "table inet lab_lbip",
            "delete table inet lab_lbip",
            "table inet lab_lbip {",
            "    chain prerouting {",
            "        type nat hook prerouting priority dstnat; policy accept;",
            *rules,
            "    }",
            "}",
        ])

    def program_load_balancer_ips(self, services: list[dict[str, Any]] | None = None) -> None:
        """(Re)write every node's load_balancer_ip_ruleset, for `services` (then kept as the lab's) or the lab's."""
        if services is not None:
            self.services = json.loads(json.dumps(services))
            self._save_state()
        _run_all([(["ip", "netns", "exec", self.ns(node), "nft", "-f", "-"], self.load_balancer_ip_ruleset(node))
                  for node in NODES])

    def set_links(self, host: str, up: bool) -> None:
        """Unplug a host's cables from the switch (a node lost, hard: no BGP NOTIFICATION, no FIN; its links lose
        carrier, its routes stay, as when a machine or its switch port dies), or plug them back in."""
        state = "up" if up else "down"
        ports = [c.peer_ifname for c in CABLES if c.host == host and c.peer == "sw"]
        if not ports:
            raise LabError(f"{host!r} has no cable to the switch")
        _run(["ip", "-n", self.ns("sw"), "-batch", "-"], "".join(f"link set dev {i} {state}\n" for i in ports))

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
            "routerBfd": self.router_bfd,
            "ipv6": self.ipv6,
            "returnPath": self.return_path,
            "services": self.services,
            "http": self.http,
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
        """The BIRD protocol of a BGP peer: the LB's name for an LB address (`lb1`; `lb1v6` for its IPv6
        address), else peer_<address>."""
        for lb in LBS:
            if address(lb, "uplink") == peer:
                return lb
            if address6(lb, "uplink") == peer:
                return f"{lb}v6"
        return "peer_" + re.sub(r"[^0-9A-Za-z]", "_", peer)

    def _write_bird_config(self) -> None:
        bfd_on = "\n    bfd on;" if self.router_bfd is not None else ""
        peers = "".join(
            f"""
protocol bgp {self.bird_protocol_name(peer)} {{
    local {ROUTER_UPLINK6 if ":" in peer else ROUTER_UPLINK} as {self.router_as};
    neighbor {peer} as {peer_as};
    passive {"on" if self.router_passive else "off"};
    hold time {self.router_hold_time};
    connect delay time 1;
    error wait time 1, 1;{bfd_on}
    {"ipv6" if ":" in peer else "ipv4"} {{ import all; export none; }};
}}
"""
            for peer, peer_as in self.bgp_peers.items()
        )
        bfd = self.router_bfd
        if bfd is not None:
            interval = f"{bfd.get('interval', 100)} ms"
            peers = f"""
protocol bfd {{
    interface "*" {{
        min rx interval {interval};
        min tx interval {interval};
        idle tx interval {interval};
        multiplier {bfd.get('multiplier', 3)};
    }};
}}
{peers}"""
        kernel6 = """
protocol kernel kernel6 {
    ipv6 { export where source = RTS_BGP; };
    merge paths yes limit 16;
}
""" if self.ipv6 else ""
        text = f"""# generated by tests/lab for lab {self.prefix}
log stderr all;
timeformat protocol "%T";
router id {ROUTER_UPLINK};

protocol device {{ scan time 1; }}

protocol kernel {{
    ipv4 {{ export where source = RTS_BGP; }};
    merge paths yes limit 16;
}}
{kernel6}{peers}"""
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

    def bfd_sessions(self) -> dict[str, str]:
        """The router's BFD sessions (Lab(router_bfd=...)): neighbor address -> state (`Up`, `Down`, `Init`)."""
        sessions = {}
        for line in self.birdc("show", "bfd", "sessions").splitlines():
            fields = line.split()
            if len(fields) >= 6 and re.match(r"^[0-9a-f.:]+$", fields[0]) and any(c.isdigit() for c in fields[0]):
                sessions[fields[0]] = fields[2]
        return sessions

    def router_nexthops(self, prefix: str) -> set[str]:
        """Next-hop gateways of the route for `prefix` (IPv4 or IPv6; a bare address means /32 or /128) in the
        router's kernel table (empty when there is none)."""
        if "/" not in prefix:
            prefix += "/128" if ":" in prefix else "/32"
        family = "-6" if ":" in prefix else "-4"
        routes = json.loads(
            _run(["ip", family, "-n", self.ns("router"), "-j", "route", "show", "exact", prefix]) or "[]"
        )
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
        family = "-6" if ":" in prefix else "-4"
        return _run(["ip", family, "-n", self.ns("router"), "route", "show", "exact", prefix]).rstrip()

    # ----- hosts -----------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        if host not in HOSTS:
            raise LabError(f"no host {host!r} in the lab (hosts: {', '.join(HOSTS)})")
        return f"{self.prefix}-{host}"

    def address(self, host: str, ifname: str | None = None) -> str:
        return address(host, ifname)

    def address6(self, host: str, ifname: str | None = None) -> str:
        """A host's IPv6 address; LabError unless the lab was built with ipv6=True."""
        if not self.ipv6:
            raise LabError("this lab has no IPv6 addresses: build it with Lab(ipv6=True)")
        return address6(host, ifname)

    def topology(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "stateDir": str(self.state_dir),
            "ipv6": self.ipv6,
            "returnPath": self.return_path,
            "hosts": {
                h.name: {
                    "role": h.role,
                    "namespace": self.ns(h.name),
                    "addresses": h.addresses + (h.addresses6 if self.ipv6 else []),
                    "interfaces": dict(h.interfaces),
                    **({"interfaces6": dict(h.interfaces6)} if self.ipv6 and h.interfaces6 else {}),
                    **({"macs": {i: mac_address(h.name, i) for i in h.interfaces}} if h.interfaces else {}),
                    **({"gateway": h.gateway} if h.gateway else {}),
                    **({"gateway6": h.gateway6} if self.ipv6 and h.gateway6 else {}),
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
            "healthCheckNodePorts": self.health_check_node_ports(),
            "kubeProxyPort": KUBE_PROXY_PORT,
        }

    def exec(
        self, host: str, argv: Sequence[str], check: bool = True, timeout: float = 30, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in a host's namespace (with `stdin` as its input) and capture its output; CommandError
        on failure when `check`."""
        cmd = ["ip", "netns", "exec", self.ns(host), *argv]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout * time_scale(),
                              check=False, env=_env())
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def request(
        self, url: str, timeout: float = 2, host: str = "client", local_port: int | None = None
    ) -> dict[str, Any] | None:
        """GET `url` (IPv6 literals as `http://[2001:db8::10]/`) with curl from `host`, from source port
        `local_port` when given; the JSON answer, or None on any failure."""
        argv = ["curl", "-sS", "-g", "--noproxy", "*", "--connect-timeout", f"{timeout:g}",
                "--max-time", f"{timeout:g}"]
        if local_port is not None:
            argv += ["--local-port", str(local_port)]
        argv.append(url)
        return self._json_answer(host, argv, timeout + 5)

    def request_udp(
        self,
        addr: str,
        port: int,
        payload: bytes | str = b"",
        host: str = "client",
        timeout: float = 2,
        local_port: int | None = None,
    ) -> dict[str, Any] | None:
        """Send one datagram from `host` (from `local_port` when given) to addr:port and wait for one answer;
        the backend's JSON answer, or None on a timeout or anything that is not JSON."""
        data = payload.encode() if isinstance(payload, str) else payload
        argv = [sys.executable, "-c", _UDP_CLIENT, addr, str(port), data.hex(), f"{timeout:g}", str(local_port or 0)]
        return self._json_answer(host, argv, timeout + 10)

    def _json_answer(self, host: str, argv: list[str], timeout: float) -> dict[str, Any] | None:
        """Run a client in `host`; the JSON object it printed, or None on any failure."""
        try:
            proc = self.exec(host, argv, check=False, timeout=timeout)
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
        """One ICMP echo from `host` to `target` (IPv4 or IPv6), answered within `timeout`."""
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

    def health_check_node_ports(self) -> dict[str, int]:
        """`namespace/name` -> healthCheckNodePort, for every service that has one (each node serves it)."""
        return {service_key(s): int(s["healthCheckNodePort"]) for s in self.services if s.get("healthCheckNodePort")}

    def _check_ports(self) -> None:
        """Every TCP port a backend binds (nodePorts, healthCheckNodePorts, kube-proxy's) must be distinct."""
        seen: dict[int, str] = {KUBE_PROXY_PORT: "kube-proxy's healthz"}
        for port in self.node_ports("TCP"):
            if port in seen:
                raise LabError(f"TCP nodePort {port} is also {seen[port]}")
            seen[port] = "a TCP nodePort"
        for key, port in self.health_check_node_ports().items():
            if port in seen:
                raise LabError(f"healthCheckNodePort {port} of {key} is also {seen[port]}")
            seen[port] = f"the healthCheckNodePort of {key}"

    def _spawn_backend(self, node: str) -> None:
        ready = self.state_dir / node / "backend.ready"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, str(BACKEND), "--name", node, "--ready-file", str(ready)]
        argv += [a for port in self.node_ports("TCP") for a in ("--tcp", str(port))]
        argv += [a for port in self.node_ports("UDP") for a in ("--udp", str(port))]
        argv += [a for key, port in self.health_check_node_ports().items() for a in ("--health", f"{key}={port}")]
        argv += ["--kube-proxy-port", str(KUBE_PROXY_PORT), "--state-file", str(self.health_state_path(node))]
        if self.ipv6:
            argv.append("--dual-stack")
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

    # ----- kube-proxy health, as the nodes' backends fake it -----------------------------------------

    def health_state_path(self, node: str) -> Path:
        """The node's health state, which its backend reads on every health request (see backend.py)."""
        if node not in NODES:
            raise LabError(f"{node!r} is not a node (nodes: {', '.join(NODES)})")
        return self.state_dir / node / "health.json"

    def health_state(self, node: str) -> dict[str, Any]:
        """A node's health state: {"localEndpoints": {"ns/name": count}, "kubeProxyHealthy": bool}."""
        try:
            state = json.loads(self.health_state_path(node).read_text())
        except FileNotFoundError:
            state = {}
        return {**json.loads(json.dumps(_DEFAULT_HEALTH_STATE)), **state}

    def _update_health_state(self, node: str, update: Callable[[dict[str, Any]], None]) -> None:
        with self._health_lock:
            state = self.health_state(node)
            update(state)
            _atomic_write(self.health_state_path(node), json.dumps(state, sort_keys=True) + "\n")

    def set_local_endpoints(self, node: str, service: str, count: int) -> None:
        """How many ready endpoints of `service` ("namespace/name", or "name" in "default") `node` has: its
        healthCheckNodePort answers 200 when count > 0, else 503. Every node starts with 1. The very next
        request sees the change."""
        key = service if "/" in service else f"default/{service}"
        if key not in self.health_check_node_ports():
            raise LabError(f"no service {key!r} with a healthCheckNodePort in this lab "
                           f"(have: {', '.join(self.health_check_node_ports()) or 'none'})")
        if count < 0:
            raise LabError(f"a count of endpoints cannot be negative: {count}")
        self._update_health_state(node, lambda state: state["localEndpoints"].__setitem__(key, count))

    def local_endpoints(self, node: str, service: str) -> int:
        key = service if "/" in service else f"default/{service}"
        return int(self.health_state(node)["localEndpoints"].get(key, 1))

    def set_kube_proxy_healthy(self, node: str, healthy: bool) -> None:
        """Whether kube-proxy's /healthz on `node` (port 10256) answers 200, or 503 as while the node drains.
        Every node starts healthy. The very next request sees the change."""
        self._update_health_state(node, lambda state: state.__setitem__("kubeProxyHealthy", bool(healthy)))

    def kube_proxy_healthy(self, node: str) -> bool:
        return bool(self.health_state(node)["kubeProxyHealthy"])

    # ----- agents ----------------------------------------------------------------------------------

    def agent_config_path(self, lb: str) -> Path:
        self._check_lb(lb)
        return self.state_dir / lb / "lbagent.yaml"

    def default_agent_config(self, lb: str) -> dict[str, Any]:
        """The lab's lbagent config for an LB, as a dict in the config file's (camelCase) format. With ipv6 it
        also peers with the router's IPv6 address and lists each node's IPv6 address after its IPv4 one."""
        self._check_lb(lb)
        uplink = address(lb, "uplink")
        config: dict[str, Any] = {
            "node": {"name": lb, "vipInterface": "lo"},
            "agent": {"drain": "1s", "runtimeDir": str(self.state_dir / lb / "run")},
            "bgp": {
                "localAS": self.bgp_peers.get(uplink, LB_AS),
                "routerID": uplink,
                "exabgp": str(self.repo / ".venv" / "bin" / "exabgp"),
                "peers": [
                    {"address": ROUTER_UPLINK, "peerAS": self.router_as, "holdTime": 3},
                    *([{"address": ROUTER_UPLINK6, "peerAS": self.router_as, "holdTime": 3}] if self.ipv6 else []),
                ],
            },
            # dsrInterfaces: the routers' traffic comes in on the uplink (used only by forwardingMode dsr Services)
            "dataplane": {"kind": "nftables", "table": "lbagent", "manageSysctls": True, "dsrInterfaces": ["uplink"]},
            "healthCheckDefaults": {"interval": "0.5s", "timeout": "0.5s", "rise": 2, "fall": 2},
            "nodes": [
                {"name": node, "addresses": [address(node), *([address6(node)] if self.ipv6 else [])]}
                for node in NODES
            ],
            "services": json.loads(json.dumps(self.services)),
            **json.loads(json.dumps(self.http)),
        }
        if self.router_bfd is not None:  # the agents speak BFD with the router when it does, at its intervals
            interval = self.router_bfd.get("interval", 100)
            config["bgp"]["bfd"] = {"enabled": True, "receiveInterval": interval, "transmitInterval": interval,
                                    "detectMultiplier": self.router_bfd.get("multiplier", 3)}
        return config

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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


_DEFAULT_HEALTH_STATE: dict[str, Any] = {"localEndpoints": {}, "kubeProxyHealthy": True}

# Run in a lab host by request_udp: argv = address, port, payload (hex), timeout, local port (0: any).
_UDP_CLIENT = """
import socket, sys
addr, port, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
timeout, local = float(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
if local:
    s.bind(("::" if ":" in addr else "0.0.0.0", local))
s.sendto(payload, (addr, port))
try:
    sys.stdout.write(s.recvfrom(65535)[0].decode(errors="replace"))
except socket.timeout:
    sys.exit(1)
"""
