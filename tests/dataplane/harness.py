"""The behaviour suite's lab: the namespace lab without agents, test VIPs routed to lb1 and bound, forwarders."""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from typing import Any

from lbagent import model
from lbagent.l4.iptables import render as iptables
from lbagent.l4.ipvs import render as ipvs
from lbagent.l4.nftables import render as nftables
from lbagent.plan.services import Backend, Frontend
from tests.dataplane.apply import DATAPLANES
from tests.dataplane.kernel import PYTHON, Flow, ForwarderProcess, parse_conntrack
from tests.lab.lab import NODES, Lab, address, address6, mac_address, time_scale

VIP4, VIP6 = "192.0.2.10", "2001:db8::10"
VIPS = (ip_address(VIP4), ip_address(VIP6))
HTTP, ALT, DNS = 30080, 30081, 30053  # the nodePorts every node's backend listens on
# Only what the backends listen on matters here: the lab's services are never given to an agent.
LAB_SERVICES: list[dict[str, Any]] = [
    {"name": "web", "vips": [VIP4, VIP6], "ports": [
        {"name": "http", "protocol": "TCP", "port": 80, "nodePort": HTTP},
        {"name": "alt", "protocol": "TCP", "port": 8080, "nodePort": ALT}]},
    {"name": "dns", "vips": [VIP4, VIP6], "ports": [{"name": "dns", "protocol": "UDP", "port": 53, "nodePort": DNS}]},
]
CLIENT = {4: address("client"), 6: address6("client")}
LB1_CLUSTER = {4: address("lb1", "cluster"), 6: address6("lb1", "cluster")}

Predictor = Callable[[Frontend, model.IPAddress, int, int], Backend | None]
# How each data plane picks a node (what `lbagent plan --flow` says), to check the kernel against; None: not
# predictable (the suite then only checks that a flow sticks to one node). IPVS mh's own table size is the kernel's
# (the default), not maglevTableSize.
PREDICTORS: dict[str, Predictor | None] = {
    "nftables": nftables.predict,
    "nftables-sharded": nftables.predict,
    "iptables": iptables.predict,
    "iptables-legacy": iptables.predict,
    "ipvs": lambda f, source, port, size: ipvs.predict(f, source, port),
}


def frontend(
    port: int = 80, node_port: int = HTTP, protocol: str = "TCP", family: int = 4,
    nodes: Sequence[str] = NODES, weights: dict[str, int] | None = None,
    mode: model.ForwardingMode = model.ForwardingMode.MASQUERADE, affinity: int | None = None,
    ranges: Iterable[str] = (), service: str = "default/web",
) -> Frontend:
    """A frontend on the test VIP of `family` spreading over `nodes` (weights default to 1; 0 drains)."""
    backends = tuple(
        Backend(node=n, address=ip_address(address(n) if family == 4 else address6(n)),
                weight=(weights or {}).get(n, 1))
        for n in nodes
    )
    return Frontend(
        service=service, port_name=f"{protocol.lower()}-{port}", vip=ip_address(VIP4 if family == 4 else VIP6),
        protocol=model.Protocol(protocol), port=port, backends=backends, node_port=node_port, mode=mode,
        affinity_timeout=affinity,
        source_ranges=tuple(ip_network(r) for r in ranges),
    )


def url(family: int, port: int = 80) -> str:
    return f"http://{VIP4}:{port}/" if family == 4 else f"http://[{VIP6}]:{port}/"


@dataclass(frozen=True)
class Curl:
    """One HTTP GET: curl's exit code (0 answered, 7 refused, 28 timed out), the JSON body, how long it took."""

    code: int
    body: dict[str, Any] | None
    seconds: float

    @property
    def node(self) -> str | None:
        return None if self.body is None else str(self.body["node"])

    @property
    def client_address(self) -> str | None:
        return None if self.body is None else str(self.body["client"]).rsplit(":", 1)[0]


# Run in a lab host: one datagram from a connected socket, so an ICMP port unreachable shows as a refusal.
_UDP = r"""
import json, socket, sys
addr, port, local, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
if local:
    s.bind(("::" if ":" in addr else "0.0.0.0", local))
s.connect((addr, port))
s.send(b"lab")
try:
    print(json.dumps({"result": "answer", "body": json.loads(s.recv(65535))}))
except ConnectionRefusedError:
    print(json.dumps({"result": "refused"}))
except TimeoutError:
    print(json.dumps({"result": "timeout"}))
"""

# Run in the client: one HTTP/1.1 keep-alive connection; each stdin line sends a GET on it, each answer's
# body goes out as one line.
_KEEPALIVE = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = s.makefile("rb")
print('{"local": %d}' % s.getsockname()[1], flush=True)
for line in sys.stdin:
    s.sendall(b"GET /keepalive HTTP/1.1\r\nHost: lab\r\n\r\n")
    f.readline()
    length = 0
    while True:
        header = f.readline()
        if header in (b"\r\n", b""):
            break
        if header.lower().startswith(b"content-length:"):
            length = int(header.split(b":")[1])
    print(f.read(length).decode().strip(), flush=True)
"""


class KeepAlive:
    """A persistent HTTP connection from the client to a VIP, kept open across data plane changes."""

    def __init__(self, lab: Lab, vip: str, port: int, timeout: float = 10) -> None:
        self.timeout = timeout * time_scale()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns("client"), PYTHON, "-c", _KEEPALIVE, vip, str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        self.local_port = int(self._line()["local"])

    def get(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("GET\n")
        self.proc.stdin.flush()
        return self._line()

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], self.timeout)[0]:
            raise TimeoutError(f"no answer on the keep-alive connection in {self.timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr is not None else ""
            raise ConnectionError(f"the keep-alive connection broke: {err.strip()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate()


class DataplaneLab:
    """A Lab(start_agents=False) made ready for forwarders: routes to the test VIPs and the VIPs bound."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def setup(self) -> None:
        """The router sends the test VIPs to lb1 (static routes: BIRD's kernel protocol leaves them alone),
        and both LBs have them on `lo`, as the agent's VIP binder would."""
        self.lab.exec("router", ["ip", "route", "replace", f"{VIP4}/32", "via", address("lb1", "uplink")])
        self.lab.exec("router", ["ip", "-6", "route", "replace", f"{VIP6}/128", "via", address6("lb1", "uplink")])
        for lb in ("lb1", "lb2"):
            self.lab.exec(lb, ["ip", "addr", "replace", f"{VIP4}/32", "dev", "lo"])
            self.lab.exec(lb, ["ip", "addr", "replace", f"{VIP6}/128", "dev", "lo"])

    def curl(self, target: str, local_port: int | None = None, timeout: float = 2, host: str = "client") -> Curl:
        """One HTTP request from `host`; the client's timeouts are `timeout` times the lab's time scale (an
        emulated guest's Python backends answer many times slower)."""
        timeout *= time_scale()
        argv = ["curl", "-sS", "-g", "--noproxy", "*", "--connect-timeout", f"{timeout:g}", "--max-time",
                f"{timeout:g}"]
        if local_port is not None:
            argv += ["--local-port", str(local_port)]
        start = time.monotonic()
        proc = self.lab.exec(host, [*argv, target], check=False, timeout=timeout + 10)
        seconds = time.monotonic() - start
        body = None
        if proc.returncode == 0:
            with contextlib.suppress(ValueError):
                body = json.loads(proc.stdout)
        return Curl(proc.returncode, body, seconds)

    def udp(self, vip: str, port: int, local_port: int = 0, timeout: float = 2,
            host: str = "client") -> tuple[str, dict[str, Any] | None]:
        """One datagram and its answer: ("answer", body), ("refused", None) or ("timeout", None)."""
        timeout *= time_scale()
        proc = self.lab.exec(host, [PYTHON, "-c", _UDP, vip, str(port), str(local_port), f"{timeout:g}"],
                             timeout=timeout + 10)
        result = json.loads(proc.stdout)
        return str(result["result"]), result.get("body")

    def keepalive(self, vip: str, port: int = 80) -> KeepAlive:
        return KeepAlive(self.lab, vip, port)

    def conntrack(self, lb: str) -> list[Flow]:
        return parse_conntrack(self.lab.exec(lb, ["conntrack", "-L"]).stdout)

    def flush_conntrack(self, lb: str) -> None:
        self.lab.exec(lb, ["conntrack", "-F"], check=False)  # exits 1 when the table was already empty

    def uplink_mac(self, lb: str) -> str:
        return mac_address(lb, "uplink")

    def send_syns(self, lb: str, flows: Sequence[tuple[str, int]], vip: str = VIP4, port: int = 80) -> None:
        """Crafted SYNs from the router straight to an LB's uplink MAC: (source address, source port) each."""
        doc = json.dumps({"mac": self.uplink_mac(lb), "iface": "uplink", "vip": vip, "port": port,
                          "flows": [list(f) for f in flows]})
        self.lab.exec("router", [PYTHON, "-m", "tests.dataplane.send_syns"], stdin=doc, timeout=120)

    def placed(self, lb: str, flows: Sequence[tuple[str, int]], vip: str = VIP4,
               port: int = 80) -> dict[tuple[str, int], str]:
        """Where the LB sent those of these flows that its conntrack holds (the reply source of each)."""
        wanted = set(flows)
        return {(f.source, f.source_port): f.reply_source for f in self.conntrack(lb)
                if f.destination == vip and f.destination_port == port and (f.source, f.source_port) in wanted}

    def destinations(self, lb: str, flows: Sequence[tuple[str, int]], vip: str = VIP4, port: int = 80,
                     rounds: int = 5) -> dict[tuple[str, int], str]:
        """Send each flow's SYN to the LB and return where the LB sent every flow (its conntrack's reply source).

        A busy machine drops some of thousands of back-to-back frames (a veth's receive backlog), so the flows the
        conntrack does not hold once it stops growing are sent again, as a client retransmits a lost SYN. Fails
        after `rounds` sends that leave flows missing, naming how many each round placed."""
        wanted = sorted(set(flows))
        found: dict[tuple[str, int], str] = {}
        history: list[int] = []
        for _ in range(rounds):
            self.send_syns(lb, [flow for flow in wanted if flow not in found], vip, port)
            last = -1
            while True:  # until every flow is in, or two looks agree (every frame sent is handled)
                found = self.placed(lb, wanted, vip, port)
                if len(found) == len(wanted):
                    return found
                if len(found) == last:
                    break
                last = len(found)
                time.sleep(0.2)
            history.append(len(found))
        raise AssertionError(f"{lb}'s conntrack holds {len(found)} of {len(wanted)} flows after {rounds} sends "
                             f"(placed after each: {history})")


class Plane:
    """One data plane kind under test: a forwarder process per LB, applied the way the agent applies."""

    def __init__(self, dl: DataplaneLab, kind: str) -> None:
        self.dl, self.kind = dl, kind
        self.lab = dl.lab
        self.forwarders: dict[str, ForwarderProcess] = {}
        self.size = DATAPLANES[kind].maglev_table_size
        # lb1's IPVS services and real servers (/proc/net/ip_vs), read once after each apply
        self._ipvs_listing: dict[ipvs.ServiceKey, dict[ipvs.DestKey, ipvs.Dest]] | None = None
        for lb in ("lb1", "lb2"):
            dl.flush_conntrack(lb)  # no flow of an earlier test may bypass this one's rules

    def apply(self, *frontends: Frontend, lb: str = "lb1", changed: Iterable[str] | None = None,
              force: bool = False) -> dict[str, Any]:
        fwd = self.forwarders.get(lb)
        if fwd is None:
            fwd = self.forwarders[lb] = ForwarderProcess(self.lab.ns(lb), self.kind)
        self._ipvs_listing = None
        return fwd.apply(frontends, VIPS, force=force, changed=changed)

    @property
    def predictable(self) -> bool:
        return PREDICTORS.get(self.kind) is not None

    def predict(self, f: Frontend, source: str, source_port: int) -> Backend | None:
        """Where lb1 sends a new flow, as the data plane's prediction says; None when the kind has none, or (IPVS)
        when lb1's service no longer is as lbagent creates it, the state the prediction is for."""
        predictor = PREDICTORS.get(self.kind)
        if predictor is None or (self.kind == "ipvs" and not self._ipvs_as_created(f)):
            return None
        return predictor(f, ip_address(source), source_port, self.size)

    def _ipvs_as_created(self, f: Frontend) -> bool:
        """Whether lb1's real servers for f are those lbagent adds when it creates the service, in the order the
        kernel keeps them and with their weights: false while one drains at weight 0 (what it weighed before, which
        the kernel fills its table by, is not shown anywhere)."""
        if self._ipvs_listing is None:
            self._ipvs_listing = ipvs.parse_proc(self.lab.exec("lb1", ["cat", "/proc/net/ip_vs"]).stdout)
        listed = self._ipvs_listing.get(ipvs.key_of(f), {})
        return [(d, dest.weight) for d, dest in listed.items()] == [
            (ipvs.DestKey(s.address, s.port), s.weight) for s in ipvs.mh_servers(f)]

    def close(self) -> None:
        errors = []
        for lb, fwd in self.forwarders.items():
            try:
                fwd.cleanup()
            except Exception as exc:
                errors.append(f"{lb}: {exc}")
            finally:
                fwd.close()
            self.dl.flush_conntrack(lb)
        self.forwarders.clear()
        if errors:
            raise RuntimeError(f"cleanup of the {self.kind} data plane failed: {'; '.join(errors)}")


def require_scapy() -> None:
    """The crafted-packet test needs scapy in the venv (the project's dev dependency)."""
    proc = subprocess.run([PYTHON, "-c", "import scapy"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"scapy is missing from {PYTHON} (pip install 'scapy>=2.6,<3'): {proc.stderr.strip()}")

