"""BFD (lbagent.l3.bfd): the config's `bfd` fields into the model, bfdd's config and run-time commands, its JSON
read back, and ExaBGP left alone by a change of BFD settings."""

from __future__ import annotations

import asyncio
import json
import logging
from ipaddress import ip_address
from pathlib import Path

import pytest
import yaml

from lbagent import model
from lbagent.agent.metrics import Metrics
from lbagent.agent.status import render
from lbagent.l3 import bfd
from lbagent.l3.speaker import ExaBgpSpeaker
from lbagent.sources.file import config

MINIMAL = """\
node: {name: lb1}
bgp:
  localAS: 64512
  routerID: 198.51.100.11
  peers:
    - {address: 198.51.100.1, peerAS: 64500}
    - {address: 198.51.100.2, peerAS: 64500, holdTime: 3}
nodes:
  - {name: node1, addresses: [203.0.113.11]}
services: []
"""


def parse(bgp_bfd: object = None, peer0: object = None, peer1: object = None) -> model.Model:
    doc = yaml.safe_load(MINIMAL)
    if bgp_bfd is not None:
        doc["bgp"]["bfd"] = bgp_bfd
    for i, value in enumerate((peer0, peer1)):
        if value is not None:
            doc["bgp"]["peers"][i]["bfd"] = value
    return config.parse(yaml.safe_dump(doc))


def problems(**kwargs: object) -> list[tuple[str, str, str]]:
    with pytest.raises(config.ConfigError) as info:
        parse(**kwargs)
    return [(p.path, p.value, p.message) for p in info.value.problems]


def test_bfd_is_off_unless_enabled_and_peers_take_bgp_bfd_as_defaults() -> None:
    assert [p.bfd for p in parse().bgp.peers] == [None, None]
    m = parse(bgp_bfd={"enabled": True, "receiveInterval": 100}, peer1={"transmitInterval": 200,
                                                                          "detectMultiplier": 5})
    assert [p.bfd for p in m.bgp.peers] == [model.Bfd(100, 300, 3), model.Bfd(100, 200, 5)]
    m = parse(bgp_bfd={"enabled": True}, peer0={"enabled": False})
    assert [p.bfd for p in m.bgp.peers] == [None, model.Bfd()]
    assert m.bgp.bfd_peers == (m.bgp.peers[1],)
    assert parse(peer0={"enabled": True}).bgp.peers[0].bfd == model.Bfd(300, 300, 3)


def test_bad_bfd_settings_are_refused_naming_field_and_value() -> None:
    assert problems(peer0={"enabled": True, "receiveInterval": 5}) == [
        ("bgp.peers[0].bfd.receiveInterval", "5", "Input should be greater than or equal to 10")]
    assert problems(bgp_bfd={"transmitInterval": 60001}) == [
        ("bgp.bfd.transmitInterval", "60001", "Input should be less than or equal to 60000")]
    assert problems(peer1={"detectMultiplier": 1})[0][:2] == ("bgp.peers[1].bfd.detectMultiplier", "1")
    assert problems(peer1={"enabeld": True})[0][0] == "bgp.peers[1].bfd.enabeld"
    # detection no faster than the BGP hold time (3 s for peer 1) is a mistake
    assert problems(peer1={"enabled": True, "receiveInterval": 1000, "detectMultiplier": 3}) == [
        ("bgp.peers[1].bfd", "3 x 1000 ms", "the detection time (detectMultiplier x receiveInterval) must be shorter "
         "than the hold time (3 s), or BFD detects nothing BGP does not")]


DEFAULT_BFD = model.Bfd()


def _peer(address: str, local: str | None, settings: model.Bfd = DEFAULT_BFD) -> bfd.BfdPeer:
    return bfd.BfdPeer(ip_address(address), ip_address(local) if local else None, False, settings)


def test_bfdd_config_has_each_peer_with_its_timers() -> None:
    m = parse(bgp_bfd={"enabled": True, "receiveInterval": 100, "transmitInterval": 150})
    peers = bfd.bfd_peers(m.bgp, {ip_address("198.51.100.1"): ip_address("198.51.100.11")})
    # the second peer has no route here: bfdd picks the source address (single hop)
    assert bfd.render_config(peers.values()) == """\
! written by lbagent: bfdd's sessions for the BGP peers with BFD
bfd
 peer 198.51.100.1 local-address 198.51.100.11
  receive-interval 100
  transmit-interval 150
  detect-multiplier 3
 exit
 !
 peer 198.51.100.2
  receive-interval 100
  transmit-interval 150
  detect-multiplier 3
 exit
 !
exit
"""


def test_a_multihop_peer_needs_a_local_address(caplog: pytest.LogCaptureFixture) -> None:
    doc = yaml.safe_load(MINIMAL)
    doc["bgp"]["peers"][0].update(multihop=2, bfd={"enabled": True})
    doc["bgp"]["peers"][1].update(multihop=2, localAddress="198.51.100.11", bfd={"enabled": True})
    m = config.parse(yaml.safe_dump(doc))
    with caplog.at_level(logging.WARNING):
        peers = bfd.bfd_peers(m.bgp, {})
    assert [p.key for p in peers.values()] == ["peer 198.51.100.2 multihop local-address 198.51.100.11"]
    (record,) = [r for r in caplog.records if r.getMessage() == "bfd_no_local_address"]
    assert str(record.lbagent_fields["peer"]) == "198.51.100.1"  # type: ignore[attr-defined]


def test_run_time_commands_change_timers_in_place_and_recreate_only_a_moved_session() -> None:
    a = _peer("198.51.100.1", "198.51.100.11")
    b = _peer("198.51.100.2", "198.51.100.11")
    assert bfd.commands({"a": a}, {"a": a}) == []
    faster = _peer("198.51.100.1", "198.51.100.11", model.Bfd(100, 100, 3))
    assert bfd.commands({"a": a, "b": b}, {"a": faster}) == [
        "configure terminal", "bfd", "no peer 198.51.100.2 local-address 198.51.100.11",
        "peer 198.51.100.1 local-address 198.51.100.11", "receive-interval 100", "transmit-interval 100",
        "detect-multiplier 3", "exit", "end"]
    moved = _peer("198.51.100.1", "198.51.100.12")
    assert bfd.commands({"a": a}, {"a": moved}) == [
        "configure terminal", "bfd", "no peer 198.51.100.1 local-address 198.51.100.11",
        "peer 198.51.100.1 local-address 198.51.100.12", "receive-interval 300", "transmit-interval 300",
        "detect-multiplier 3", "exit", "end"]


# What bfdd 8.4 printed in the lab (vtysh -c 'show bfd peers json' -c 'show bfd peers counters json').
VTYSH_OUTPUT = """[
  {"multihop":false, "peer":"198.51.100.1", "local":"198.51.100.11", "vrf":"default", "id":1, "remote-id":2,
   "passive-mode":false, "status":"up", "uptime":7, "diagnostic":"ok", "remote-diagnostic":"ok",
   "receive-interval":100, "transmit-interval":100, "echo-receive-interval":50, "echo-transmit-interval":0,
   "detect-multiplier":3, "remote-receive-interval":200, "remote-transmit-interval":250,
   "remote-echo-receive-interval":0, "remote-detect-multiplier":5},
  {"multihop":false, "peer":"198.51.100.2", "local":"198.51.100.11", "vrf":"default", "id":3, "remote-id":0,
   "status":"down", "downtime":4, "receive-interval":300, "transmit-interval":300, "detect-multiplier":3,
   "remote-receive-interval":1000, "remote-transmit-interval":1000, "remote-detect-multiplier":3}
]
[
  {"multihop":false, "peer":"198.51.100.1", "local":"198.51.100.11", "vrf":"default", "control-packet-input":30,
   "control-packet-output":30, "session-up":2, "session-down":1, "zebra-notifications":3},
  {"multihop":false, "peer":"198.51.100.2", "local":"198.51.100.11", "vrf":"default", "session-up":0,
   "session-down":0}
]
"""


def test_sessions_are_read_from_bfdd_json_with_negotiated_intervals() -> None:
    peers, counters = bfd.json_documents(VTYSH_OUTPUT)
    sessions = bfd.parse_sessions(peers, counters, now=1000.0)
    up, down = sessions["198.51.100.1"], sessions["198.51.100.2"]
    # sends at the slower of its 100 and the router's 200 receive; expects the router's 250; 5 x 250 without one
    assert (up.state, up.since, up.transmit_interval, up.receive_interval, up.detect_time) == ("up", 993.0, 200,
                                                                                               250, 1250)
    assert (up.ups, up.downs) == (2, 1)
    assert (down.state, down.since, down.transmit_interval, down.detect_time) == ("down", 996.0, 0, 0)
    assert bfd.parse_sessions([{"peer": "198.51.100.3", "status": "shutdown"}], [])["198.51.100.3"].state == \
        "admin-down"
    assert bfd.parse_sessions("garbage", None) == {}


def test_transitions_count_across_bfdd_instances_and_reach_metrics_status(tmp_path: Path) -> None:
    m = parse(bgp_bfd={"enabled": True})
    speaker = bfd.BfdSpeaker(m.bgp, str(tmp_path))
    peers, counters = bfd.json_documents(VTYSH_OUTPUT)
    speaker._update(bfd.parse_sessions(peers, counters))
    speaker._update(bfd.parse_sessions(peers, counters))  # read again: nothing new
    assert speaker.transitions == {("198.51.100.1", "up"): 2, ("198.51.100.1", "down"): 1}
    speaker._exited(None, None, False)  # type: ignore[arg-type]  # a new bfdd counts from 0
    assert speaker.sessions()["198.51.100.1"].state == "down"
    speaker._update(bfd.parse_sessions([{"peer": "198.51.100.1", "status": "up", "uptime": 1}],
                                       [{"peer": "198.51.100.1", "session-up": 1, "session-down": 0}]))
    assert speaker.transitions[("198.51.100.1", "up")] == 3
    metrics = Metrics()
    metrics.bfd(speaker.sessions(), speaker.transitions)
    metrics.bfd(speaker.sessions(), speaker.transitions)
    sample = metrics.registry.get_sample_value
    assert sample("lbagent_bfd_session_up", {"peer": "198.51.100.1"}) == 1
    assert sample("lbagent_bfd_session_up", {"peer": "198.51.100.2"}) == 0  # not reported by bfdd yet
    assert sample("lbagent_bfd_session_transitions_total", {"peer": "198.51.100.1", "to": "up"}) == 3
    doc = json.loads(json.dumps({
        "version": "0", "node": "lb1", "configHash": "x", "dataplane": "nftables", "draining": False, "peers": {},
        "bfd": {p: s.as_dict() for p, s in speaker.sessions().items()}, "vips": [], "services": [], "sync": {}}))
    text = render(doc)
    assert "BFD sessions (bfdd)" in text and "198.51.100.2                 down" in text
    assert "tx 0 ms" in text  # the up session: intervals unknown until bfdd says (uptime 1 above had none)


def test_a_missing_bfdd_is_named_with_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bfd, "FRR_DAEMONS", "/nonexistent")
    with pytest.raises(bfd.BfdUnavailable, match=r"bfdd is not installed .* Debian package frr"):
        bfd.find_programs()
    speaker = bfd.BfdSpeaker(parse().bgp, "/nonexistent")
    speaker.check(parse().bgp)  # no BFD asked for: nothing needed
    with pytest.raises(bfd.BfdUnavailable):
        speaker.check(parse(peer0={"enabled": True}).bgp)


def test_a_bfd_change_alone_leaves_exabgp_running(tmp_path: Path) -> None:
    before, after = parse().bgp, parse(bgp_bfd={"enabled": True}).bgp
    assert before.without_bfd() == after.without_bfd()
    assert before.without_bfd() != config.parse(MINIMAL.replace("peerAS: 64500}", "peerAS: 64501}", 1)).bgp

    async def main() -> None:
        speaker = ExaBgpSpeaker(before, str(tmp_path), lambda: None)
        speaker._started = True  # as if running: a real change would restart ExaBGP (and fail here)
        await speaker.reconfigure(after)
        assert speaker.restarts == 0 and speaker._bgp == after

    asyncio.run(main())
