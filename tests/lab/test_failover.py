"""Long-lived connections while LB nodes come and go: which forwarding mode keeps which connections across which
event (docs/configuration.md, "Forwarding modes and failover", is this test's table).

16 keep-alive connections from the client, each on its own source port, each sending a request every 100 ms; the
router hashes the 5-tuple over both LBs. One LB (lb1) then goes through six events in turn: its links unplugged
(the node lost), plugged back (it comes back), a clean SIGTERM, the agent started again, ExaBGP killed (a BGP flap
that lbagent repairs), and a SIGHUP that changes its BGP settings (ExaBGP restarted). After each, the test waits
until the router holds the routes it should and every connection still alive has been answered again. A connection
survives an event when it was alive before it, is alive after, and every answer came from the node that answered its
first request. The table is printed (pytest -s); the asserts are the documented guarantees."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.lab.lab import Lab, address, wait_for
from tests.lab.traffic import Flows

pytestmark = pytest.mark.lab

WAITER = Path(__file__).with_name("waiter.py")

VIP = "192.0.2.10"
CLIENT = address("client")
UPLINKS = {address("lb1", "uplink"): "lb1", address("lb2", "uplink"): "lb2"}
COUNT = 16
# Each request's path, echoed in its answer: 4 KB each way every 100 ms, so a connection that spends a few seconds
# on the other LB comes back far beyond the TCP window conntrack last saw here.
PATH_BYTES = 4000
# Answers every connection still alive must get after an event before the next: about 3 s of traffic.
ANSWERS_AFTER = 30
FLAPS = ("ExaBGP killed", "SIGHUP with a bgp change")
EVENTS = ("node lost", "comes back", "clean SIGTERM", "agent restarted", "ExaBGP killed", "SIGHUP with a bgp change")


@dataclass
class Row:
    event: str
    alive: int  # connections alive when the event began
    survived: int
    moved: int  # of the alive ones, those the router sent to the other LB during the event
    moved_survived: int
    stall: float  # the longest gap between two answers of a surviving connection, seconds
    lost: tuple[str, ...] = ()  # how each lost connection ended: "source port: error, nodes"

    def __str__(self) -> str:
        return (f"{self.event:<26} {self.survived:>3}/{self.alive:<3} survive; moved {self.moved_survived}/{self.moved}"
                f" survive; longest stall {self.stall:.2f} s" + "".join(f"\n      lost {x}" for x in self.lost))


def _lb_of(lab: Lab, source_port: int) -> str:
    """The LB the router sends this connection's packets to now (its own 5-tuple hash)."""
    out = lab.exec("router", ["ip", "-j", "route", "get", VIP, "from", CLIENT, "iif", "client", "ipproto", "tcp",
                              "sport", str(source_port), "dport", "80"]).stdout
    return UPLINKS.get(json.loads(out)[0].get("gateway", ""), "none")


def _routes(lab: Lab, flows: Flows) -> list[str]:
    return [_lb_of(lab, flows.base_port + i) for i in range(COUNT)]


def _announced(lab: Lab, by: set[str], timeout: float = 30) -> None:
    want = {a for a, lb in UPLINKS.items() if lb in by}
    wait_for(lambda: lab.router_nexthops(f"{VIP}/32") == want, timeout, 0.02, f"{VIP} via {sorted(by)}")


def _metric(lab: Lab, lb: str, name: str) -> float | None:
    """A metric without labels, as lb's agent exports it (None: not there, or the agent not answering)."""
    out = lab.exec(lb, ["curl", "-sS", "--noproxy", "*", "http://127.0.0.1:9469/metrics"], check=False).stdout
    return next((float(line.split()[1]) for line in out.splitlines() if line.startswith(f"{name} ")), None)


def _exabgp_pid(lab: Lab, lb: str) -> int | None:
    """The ExaBGP process lb's agent runs (its child)."""
    agent = lab.agent_pid(lb)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent and b"exabgp" in cmdline:
            return int(proc.name)
    return None


def run_events(lab: Lab, events: dict[str, Callable[[], None]], fresh: bool = False) -> list[Row]:
    """Each event with the same connections (`fresh`: new ones for each event, when the earlier events ended some)."""
    flows = Flows(lab, VIP, COUNT, 41000, PATH_BYTES)
    rows = []
    for n, (name, do) in enumerate(events.items()):
        if fresh and n:
            flows.stop()
            flows = Flows(lab, VIP, COUNT, 41000 + 100 * n, PATH_BYTES)
        before, routes_before, began = flows.results(), _routes(lab, flows), time.time()
        do()
        wait_for(functools.partial(flows.answered_again, before, ANSWERS_AFTER), 60, 0.1,
                 f"the connections after {name!r}")
        after, routes_after = flows.results(), _routes(lab, flows)
        alive = [i for i, r in enumerate(before) if r["error"] is None]
        survived = [i for i in alive if after[i]["error"] is None and len(after[i]["nodes"]) == 1]
        # moved: the router sent it elsewhere; in a BGP flap, lb1's connections went to lb2 and came back
        moved = [i for i in alive if routes_before[i] != routes_after[i]
                 or (name in FLAPS and routes_before[i] == "lb1")]
        stall = max((s[1] for i in survived for s in after[i]["stalls"] if s[0] >= began), default=0.0)
        lost = tuple(f"{after[i]['sourcePort']} (via {routes_before[i]} -> {routes_after[i]}): {after[i]['error']}, "
                     f"nodes {after[i]['nodes']}" for i in alive if i not in survived)
        rows.append(Row(name, len(alive), len(survived), len(moved), len(set(moved) & set(survived)), stall, lost))
    flows.stop()
    return rows


def lb1_events(lab: Lab) -> dict[str, Callable[[], None]]:
    def node_lost() -> None:
        cut_offs = _metric(lab, "lb1", "lbagent_health_cut_offs_total")
        lab.set_links("lb1", False)
        _announced(lab, {"lb2"})
        # lb1's probes all go unanswered: its metrics say it is cut off from the nodes
        wait_for(lambda: _metric(lab, "lb1", "lbagent_health_cut_off") == 1.0, 30, 0.1, "lb1's cut-off metric")
        assert _metric(lab, "lb1", "lbagent_health_cut_offs_total") == (cut_offs or 0) + 1

    def comes_back() -> None:
        lab.set_links("lb1", True)
        _announced(lab, {"lb1", "lb2"})
        # announced again once the nodes that answer again were shown together: the cut-off is over
        assert _metric(lab, "lb1", "lbagent_health_cut_off") == 0.0

    def sigterm() -> None:
        lab.stop_agent("lb1")
        _announced(lab, {"lb2"})

    def restarted() -> None:
        lab.start_agent("lb1")
        _announced(lab, {"lb1", "lb2"})

    def exabgp_killed() -> None:
        pid = wait_for(lambda: _exabgp_pid(lab, "lb1"), 10, message="lb1's ExaBGP")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _exabgp_pid(lab, "lb1") not in (None, pid), 30, message="a new ExaBGP on lb1")
        _announced(lab, {"lb1", "lb2"})

    def sighup_bgp() -> None:
        pid = _exabgp_pid(lab, "lb1")
        config = lab.agent_config("lb1")
        config["bgp"]["peers"][0]["holdTime"] = 4
        lab.write_agent_config("lb1", config)
        lab.signal_agent("lb1", signal.SIGHUP)
        wait_for(lambda: _exabgp_pid(lab, "lb1") not in (None, pid), 30, message="ExaBGP restarted on lb1")
        _announced(lab, {"lb1", "lb2"})

    return dict(zip(EVENTS, (node_lost, comes_back, sigterm, restarted, exabgp_killed, sighup_bgp), strict=True))


def _lab(lab_factory: Callable[..., Lab], mode: str, kind: str) -> Lab:
    services = [{"name": "web", "vip": VIP, "forwardingMode": mode,
                 "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}]
    lab = lab_factory(services=services, start_agents=False)
    for lb in ("lb1", "lb2"):
        config = lab.default_agent_config(lb)
        config["dataplane"]["kind"] = kind
        lab.write_agent_config(lb, config)
        lab.start_agent(lb)
    _announced(lab, {"lb1", "lb2"})
    return lab


def _print(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    for row in rows:
        print(f"  {row}")


@pytest.fixture
def matrix(lab_factory: Callable[..., Lab]) -> Iterator[Callable[[str, str], list[Row]]]:
    def run(mode: str, kind: str) -> list[Row]:
        lab = _lab(lab_factory, mode, kind)
        rows = run_events(lab, lb1_events(lab), fresh=mode == "masquerade")
        _print(f"forwardingMode {mode}, dataplane {kind}: {COUNT} connections, a request every 100 ms", rows)
        return rows

    yield run


@pytest.mark.parametrize(("mode", "kind"), [("nat", "nftables"), ("nat", "iptables"), ("dsr", "nftables")])
def test_every_connection_survives_every_event(matrix: Callable[[str, str], list[Row]], mode: str,
                                               kind: str) -> None:
    rows = matrix(mode, kind)
    assert [r.event for r in rows] == list(EVENTS)
    for row in rows:
        assert row.alive == COUNT and row.survived == COUNT, row
    # the events did move connections between the LBs (else this would prove nothing)
    assert all(rows[i].moved > 0 for i in (0, 1, 2, 3)), rows


def test_masquerade_keeps_only_the_connections_that_stay_on_their_lb(matrix: Callable[[str, str], list[Row]]) -> None:
    """The node sees the LB's address as the client's: a connection the router moves to the other LB arrives at the
    node from another address, and the node answers it with a reset. The ones that stay where they are survive."""
    rows = matrix("masquerade", "nftables")
    assert all(row.alive == COUNT for row in rows), rows
    # LB lost, back, stopped: exactly the connections the router moves are lost. (The other events are printed, not
    # asserted: after an agent restart, CI's fresh root twice showed the connections `ip route get` names for lb1
    # going on unharmed, where this machine's own runs lose them; see docs/configuration.md.)
    for row in rows[:3]:
        assert row.moved > 0 and row.moved_survived == 0 and row.survived == row.alive - row.moved, row


def _waiter(lab: Lab, name: str) -> dict[str, Any]:
    """What a waiter (tests/lab/waiter.py) has said so far, its steps merged: first, asked, answered or error, at."""
    said: dict[str, Any] = {}
    for line in lab.process_log("client", name).splitlines():
        if line.startswith("{"):
            said |= json.loads(line)
    return said


def _asked(lab: Lab, name: str) -> bool:
    said = _waiter(lab, name)
    return "asked" in said or "error" in said


def _ended(lab: Lab, name: str) -> dict[str, Any]:
    """A waiter's steps once it has its answer (or an error), else nothing."""
    said = _waiter(lab, name)
    return said if "at" in said else {}


def test_a_nat_answer_in_flight_through_a_lost_lb_waits_for_the_clients_next_packet(
        lab_factory: Callable[..., Lab]) -> None:
    """nat: the node sends its answers back through the LB that forwarded the connection's latest packet (the
    return path). Two clients wait in silence for an answer the node sends 3 s after their request, both through lb1,
    and lb1 is lost meanwhile. The node's answer, and every retransmission of it, goes to lb1: gone. The client with
    TCP keepalive sends a probe after 1 s of silence, the router takes it to lb2, lb2 picks the flow up and forwards
    it to the same node, and the node's next retransmission follows lb2: answered while lb1 is still down. The client
    without it has nothing to send: it is answered only when lb1 comes back."""
    lab = _lab(lab_factory, "nat", "nftables")
    ports = [p for p in range(43000, 43200) if _lb_of(lab, p) == "lb1"][:2]
    assert len(ports) == 2, "two source ports the router hashes to lb1"
    for name, port, idle in (("silent", ports[0], "0"), ("keepalive", ports[1], "1")):
        lab.spawn("client", name, [sys.executable, str(WAITER), "--vip", VIP, "--source", CLIENT, "--source-port",
                                   str(port), "--delay", "3", "--keepalive", idle])
    for name in ("silent", "keepalive"):
        wait_for(functools.partial(_asked, lab, name), 30, 0.01, f"{name}'s slow request acknowledged")
    lab.set_links("lb1", False)
    _announced(lab, {"lb2"})
    keepalive = wait_for(lambda: _ended(lab, "keepalive"), 30, 0.1, "the keepalive client's answer")
    silent = _waiter(lab, "silent")
    assert keepalive.get("answered") == keepalive["first"], keepalive
    assert "at" not in silent, silent

    # the node has the silent client's answer out, unacknowledged, and sends it again into lb1's return path
    def retransmitting() -> str | None:
        out = lab.exec(silent["first"], ["ss", "-tin", "dst", f"{CLIENT}:{ports[0]}"]).stdout
        return out if "unacked:" in out and "retrans:" in out else None

    stuck = wait_for(retransmitting, 30, 0.1, "the node sending the answer again")
    back = time.time()
    lab.set_links("lb1", True)
    late = wait_for(lambda: _ended(lab, "silent"), 60, 0.1, "the silent client's answer")
    print(f"\nkeepalive client, answered while lb1 was down: {keepalive}\nsilent client: {late} "
          f"(lb1 back at {back:.2f})\nthe node meanwhile:\n{stuck}")
    assert late.get("answered") == late["first"] and late["at"] > back, late
