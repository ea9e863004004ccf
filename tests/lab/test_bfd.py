"""BFD between lbagent's bfdd and the router: BIRD (the lab's router, `bfd on`) and FRR (bgpd, bfdd and zebra in
the router's namespace instead of BIRD). An LB whose links go down hard loses its paths in under a second; a BFD
flap that is not a node loss (bfdd killed, intervals changed by SIGHUP) withdraws nothing it should not."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import programs
from tests.lab.lab import LB_AS, ROUTER_AS, ROUTER_UPLINK, Lab, address, wait_for

pytestmark = pytest.mark.lab

VIP = "192.0.2.10"
UPLINKS = {lb: address(lb, "uplink") for lb in ("lb1", "lb2")}
FAST = {"enabled": True, "receiveInterval": 100, "transmitInterval": 100, "detectMultiplier": 3}
TRIES = 10
FRR_TRIES = 5


def _agent_config(lab: Lab, lb: str, bfd: dict[str, Any]) -> dict[str, Any]:
    config = lab.default_agent_config(lb)
    config["bgp"]["bfd"] = dict(bfd)
    return config


def _start_agents(lab: Lab, bfd: dict[str, Any] = FAST) -> None:
    for lb in UPLINKS:
        lab.write_agent_config(lb, _agent_config(lab, lb, bfd))
        lab.start_agent(lb)
    _both_paths(lab)


def _both_paths(lab: Lab, timeout: float = 30) -> None:
    wait_for(lambda: lab.router_nexthops(VIP) == set(UPLINKS.values()), timeout, 0.05,
             f"{VIP} via both LBs")


def _status(lab: Lab, lb: str) -> dict[str, Any]:
    out = lab.exec(lb, [str(lab.repo / ".venv" / "bin" / "lbagent"), "status", "--json", "-c",
                        str(lab.agent_config_path(lb))]).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


def _lb_bfd_up(lab: Lab, lb: str) -> bool:
    return bool(_status(lab, lb)["bfd"].get(ROUTER_UPLINK, {}).get("state") == "up")


def _links(lab: Lab, lb: str, up: bool) -> None:
    """Take the LB away hard (its cables unplugged from the switch: no NOTIFICATION, no BFD AdminDown) or give it
    back."""
    lab.set_links(lb, up)


def _time_to_lose(lab: Lab, lb: str, timeout: float = 10) -> float:
    """Seconds from the LB's links going down to the router's kernel route for the VIP without it."""
    hop = UPLINKS[lb]
    start = time.monotonic()
    _links(lab, lb, up=False)
    wait_for(lambda: hop not in lab.router_nexthops(VIP), timeout, 0.005, f"{lb} to leave {VIP}'s route")
    return time.monotonic() - start


def _metrics(lab: Lab, lb: str) -> str:
    return lab.exec(lb, ["curl", "-sS", "--noproxy", "*", "http://127.0.0.1:9469/metrics"]).stdout


def _metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


# ----- BIRD -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bird_lab() -> Iterator[Lab]:
    with Lab(start_agents=False, router_bfd={"interval": 100, "multiplier": 3}) as lab:
        _start_agents(lab)
        yield lab


def _bird_bfd(lab: Lab) -> dict[str, tuple[str, str, str]]:
    """The router's BFD sessions: peer -> (state, since, interval)."""
    sessions = {}
    for line in lab.birdc("show", "bfd", "sessions").splitlines():
        fields = line.split()
        if len(fields) >= 6 and re.match(r"^\d+\.\d+\.\d+\.\d+$", fields[0]):
            sessions[fields[0]] = (fields[2], fields[3], fields[4])
    return sessions


def _bird_since(lab: Lab, protocol: str) -> str:
    """When BIRD's protocol last changed state (`show protocols`' Since column)."""
    for line in lab.birdc("show", "protocols", protocol).splitlines():
        fields = line.split()
        if fields and fields[0] == protocol:
            return fields[4]
    raise AssertionError(f"no protocol {protocol} in BIRD")


def _wait_bfd_everywhere(lab: Lab, timeout: float = 30) -> None:
    wait_for(lambda: all(_bird_bfd(lab).get(hop, ("",))[0] == "Up" for hop in UPLINKS.values())
             and all(_lb_bfd_up(lab, lb) for lb in UPLINKS), timeout, 0.1, "BFD up on the router and both LBs")


def test_bird_drops_a_dead_lbs_paths_within_a_second(bird_lab: Lab) -> None:
    lab = bird_lab
    _wait_bfd_everywhere(lab)
    hold = lab.default_agent_config("lb1")["bgp"]["peers"][0]["holdTime"]
    times = []
    for _ in range(TRIES):
        times.append(_time_to_lose(lab, "lb1"))
        assert lab.router_nexthops(VIP) == {UPLINKS["lb2"]}, "lb2 stays"
        _links(lab, "lb1", up=True)
        _both_paths(lab)
        _wait_bfd_everywhere(lab)
    print(f"\nBIRD (bfd on, 100 ms x 3): lb1's links down -> its path gone from the router's kernel route, "
          f"{TRIES} tries: {', '.join(f'{t * 1000:.0f} ms' for t in times)} (max {max(times) * 1000:.0f} ms); "
          f"without BFD the BGP hold time decides: {hold} s")
    assert all(t < 1.0 for t in times), times
    text = _metrics(lab, "lb1")
    assert _metric(text, "lbagent_bfd_session_up", f'peer="{ROUTER_UPLINK}"') == 1
    # lb1's bfdd saw its session go down with every try (its side of the link went down too)
    assert _metric(text, "lbagent_bfd_session_transitions_total", f'peer="{ROUTER_UPLINK}",to="down"') >= TRIES


def _bfdd_pid(lab: Lab, lb: str) -> int | None:
    try:
        pid = int((lab.state_dir / lb / "run" / "bfd" / "bfdd.pid").read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return pid if comm == "bfdd" else None


def test_a_bfd_flap_that_is_no_node_loss_withdraws_nothing_it_should_not(bird_lab: Lab) -> None:
    lab = bird_lab
    _both_paths(lab)
    _wait_bfd_everywhere(lab)
    old: int = wait_for(lambda: _bfdd_pid(lab, "lb1") or 0, 10, 0.1, "lb1's bfdd")
    os.kill(old, signal.SIGKILL)

    def back() -> bool:
        # all along: lb2's path never leaves, lb1 keeps its VIP bound and its data plane programmed
        assert UPLINKS["lb2"] in lab.router_nexthops(VIP), "lb2's path left the router"
        assert VIP in lab.exec("lb1", ["ip", "-br", "addr", "show", "dev", "lo"]).stdout, "lb1 unbound its VIP"
        assert VIP in lab.nft_ruleset("lb1"), "lb1 unprogrammed its VIP"
        pid = _bfdd_pid(lab, "lb1")
        return pid not in (None, old) and lab.router_nexthops(VIP) == set(UPLINKS.values()) and \
            _bird_bfd(lab).get(UPLINKS["lb1"], ("",))[0] == "Up"

    wait_for(back, 30, 0.02, "lb1's bfdd restarted by its agent, its BFD session and path back")
    log = lab.agent_log("lb1")
    assert "event=bfdd_exited" in log and "planned=false" in log and log.count("event=bfdd_started") >= 2

    # SIGHUP with new BFD intervals: bfdd renegotiates, no session flaps, ExaBGP is not restarted
    _wait_bfd_everywhere(lab)
    bgp_since, bfd_since = _bird_since(lab, "lb1"), _bird_bfd(lab)[UPLINKS["lb1"]][1]
    lab.write_agent_config("lb1", _agent_config(lab, "lb1", {**FAST, "receiveInterval": 200,
                                                             "transmitInterval": 200}))
    lab.signal_agent("lb1", signal.SIGHUP)
    wait_for(lambda: _bird_bfd(lab)[UPLINKS["lb1"]][2] == "0.200", 15, 0.1, "the router to use lb1's new interval")
    wait_for(lambda: _status(lab, "lb1")["bfd"][ROUTER_UPLINK]["transmitInterval"] == 200, 10, 0.2,
             "lb1's status to show the new interval")
    assert _bird_since(lab, "lb1") == bgp_since, "the router's BGP session to lb1 was reset"
    assert _bird_bfd(lab)[UPLINKS["lb1"]][1] == bfd_since, "the router's BFD session to lb1 flapped"
    assert "event=bfd_reconfigured" in lab.agent_log("lb1", since_start=True)
    assert "exabgp_restart" not in lab.agent_log("lb1", since_start=True)
    assert lab.router_nexthops(VIP) == set(UPLINKS.values())


# ----- FRR ------------------------------------------------------------------------------------------------------


def _frr_configs() -> dict[str, str]:
    """Each FRR daemon's own config file (a daemon stops reading at a command it does not know)."""
    neighbors = "".join(f""" neighbor {hop} remote-as {LB_AS}
 neighbor {hop} timers 1 3
 neighbor {hop} bfd profile fast
""" for hop in UPLINKS.values())
    return {
        "zebra": "hostname router\n",
        "bfdd": """bfd
 profile fast
  receive-interval 100
  transmit-interval 100
  detect-multiplier 3
 exit
exit
""",
        "bgpd": f"""router bgp {ROUTER_AS}
 bgp router-id {ROUTER_UPLINK}
 no bgp ebgp-requires-policy
{neighbors} address-family ipv4 unicast
  maximum-paths 16
 exit-address-family
exit
""",
    }


@contextlib.contextmanager
def _frr_lab() -> Iterator[Lab]:
    """The lab with FRR (zebra, bgpd, bfdd on sockets under the lab's state dir) as the router instead of BIRD;
    Lab.down() kills them with everything else in the lab's namespaces, pass or fail."""
    daemons = {name: programs.path(name) for name in ("zebra", "bgpd", "bfdd", "vtysh")}
    with Lab(start_agents=False) as lab:
        lab.stop_process("router", "bird")
        d = lab.state_dir / "router" / "frr"
        d.mkdir()
        for name, text in _frr_configs().items():
            (d / f"{name}.conf").write_text(f"frr defaults traditional\n{text}")
        common = ["-u", "root", "-g", "frrvty", "--vty_socket", str(d), "-z", str(d / "zserv.api"), "-P", "0",
                  "--log", "stdout"]
        lab.spawn("router", "zebra", [daemons["zebra"], *common, "-i", str(d / "zebra.pid"), "-f",
                                      str(d / "zebra.conf")])
        wait_for((d / "zserv.api").exists, 10, 0.05, "FRR's zebra")
        for name in ("bfdd", "bgpd"):
            extra = ["--bfdctl", str(d / "bfdd.ctl")] if name == "bfdd" else []
            lab.spawn("router", name, [daemons[name], *common, *extra, "-i", str(d / f"{name}.pid"),
                                       "-f", str(d / f"{name}.conf")])
        wait_for(lambda: all((d / f"{name}.vty").exists() for name in ("zebra", "bfdd", "bgpd")), 10, 0.05,
                 "FRR's daemons")
        yield lab


def _frr_bfd_up(lab: Lab, hop: str) -> bool:
    d = lab.state_dir / "router" / "frr"
    out = lab.exec("router", [programs.path("vtysh"), "--vty_socket", str(d), "-d", "bfdd", "-c",
                              "show bfd peers json"], check=False).stdout
    try:
        peers = json.loads(out)
    except ValueError:
        return False
    return any(p.get("peer") == hop and p.get("status") == "up" for p in peers)


def test_frr_drops_a_dead_lbs_paths_within_a_second() -> None:
    with _frr_lab() as lab:
        _start_agents(lab)

        def bfd_up() -> bool:
            return all(_frr_bfd_up(lab, hop) for hop in UPLINKS.values()) and all(
                _lb_bfd_up(lab, lb) for lb in UPLINKS)

        wait_for(bfd_up, 30, 0.1, "BFD up between FRR and both LBs")
        times = []
        for _ in range(FRR_TRIES):
            times.append(_time_to_lose(lab, "lb1"))
            assert lab.router_nexthops(VIP) == {UPLINKS["lb2"]}, "lb2 stays"
            _links(lab, "lb1", up=True)
            _both_paths(lab)
            wait_for(bfd_up, 30, 0.1, "BFD up again")
        print(f"\nFRR (neighbor bfd, 100 ms x 3): lb1's links down -> its path gone from the router's kernel route, "
              f"{FRR_TRIES} tries: {', '.join(f'{t * 1000:.0f} ms' for t in times)} (max {max(times) * 1000:.0f} ms)")
        assert all(t < 1.0 for t in times), times
