"""The config file: what it accepts, and that every refusal names the field path, the value and the line."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

import pytest
import yaml

from lbagent import model
from lbagent.sources.file import config

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "lbagent.example.yaml"

MINIMAL = """\
node: {name: lb1}
bgp:
  localAS: 64512
  routerID: 198.51.100.11
  peers: [{address: 198.51.100.1, peerAS: 64500}]
nodes:
  - {name: node1, addresses: [203.0.113.11]}
services:
  - name: web
    vip: 192.0.2.10
    ports: [{port: 80, nodePort: 30080}]
"""


def problems(text: str) -> list[config.Problem]:
    with pytest.raises(config.ConfigError) as info:
        config.parse(text)
    return list(info.value.problems)


def edit(**changes: object) -> str:
    """MINIMAL with a change applied at a dotted path (list indexes as numbers)."""
    doc = yaml.safe_load(MINIMAL)
    for path, value in changes.items():
        target = doc
        parts = path.split("__")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = value
    return yaml.safe_dump(doc)


def test_example_config_is_valid_and_reads_as_documented() -> None:
    m = config.load(EXAMPLE)
    assert m.node_name == "lb1"
    assert m.vip_interface == "lo"
    web = m.service("default/web")
    assert web.vips == (ip_address("192.0.2.10"),)
    assert [(p.name, p.port, p.node_port) for p in web.ports] == [("http", 80, 30080), ("https", 443, 30443)]
    assert web.health_check == model.HealthCheck(interval=1.0, timeout=1.0, rise=2, fall=3)
    assert web.bgp.communities == ("64512:100",)
    assert [n.name for n in m.nodes] == ["node1", "node2", "node3"]


def test_minimal_config_gets_defaults() -> None:
    m = config.parse(MINIMAL)
    assert m.agent.drain_seconds == 2.0
    assert m.bgp.peers[0].hold_time == 9
    assert m.services[0].namespace == "default"
    assert m.services[0].ports[0].protocol is model.Protocol.TCP
    assert m.services[0].external_traffic_policy is model.TrafficPolicy.CLUSTER
    assert m.dataplane.table == "lbagent"


@pytest.mark.parametrize(
    ("text", "value", "seconds"),
    [("500ms", "500ms", 0.5), ("2s", "2s", 2.0), ("1m", "1m", 60.0), ("3", 3, 3.0), ("1.5", 1.5, 1.5)],
)
def test_durations_take_units(text: str, value: object, seconds: float) -> None:
    m = config.parse(edit(healthCheckDefaults={"interval": value}))
    assert m.services[0].health_check.interval == seconds


def test_unknown_key_is_refused_with_its_path_and_line() -> None:
    text = MINIMAL.replace("    vip: 192.0.2.10\n", "    vip: 192.0.2.10\n    loadBalancerIp: 192.0.2.10\n")
    [p] = problems(text)
    assert p.path == "services[0].loadBalancerIp"
    assert "Extra inputs are not permitted" in p.message
    assert p.line == 11
    assert "'192.0.2.10'" in str(p)


def test_bad_values_each_name_field_and_value() -> None:
    text = edit(services__0__ports__0__nodePort=70000, bgp__peers__0__address="198.51.100.300")
    found = problems(text)
    by_path = {p.path: p for p in found}
    assert set(by_path) == {"services[0].ports[0].nodePort", "bgp.peers[0].address"}
    assert by_path["services[0].ports[0].nodePort"].value == "70000"
    assert "198.51.100.300" in by_path["bgp.peers[0].address"].value
    line = by_path["services[0].ports[0].nodePort"].line
    assert line is not None
    assert "nodePort: 70000" in text.splitlines()[line - 1]


def test_missing_field_is_named() -> None:
    doc = yaml.safe_load(MINIMAL)
    del doc["bgp"]["localAS"]
    [p] = problems(yaml.safe_dump(doc))
    assert p.path == "bgp.localAS"
    assert p.value == "nothing"


def test_local_traffic_policy_needs_health_check_node_port() -> None:
    [p] = problems(edit(services__0__externalTrafficPolicy="Local"))
    assert p.path == "services[0].healthCheckNodePort"
    assert "Local needs" in p.message
    m = config.parse(edit(services__0__externalTrafficPolicy="Local", services__0__healthCheckNodePort=32000))
    assert m.services[0].probe is model.ProbeKind.HEALTH_CHECK_NODE_PORT
    assert m.services[0].health_check_node_port == 32000


def test_service_features_read_as_kubernetes_spells_them() -> None:
    doc = yaml.safe_load(MINIMAL)
    doc["nodes"][0]["addresses"].append("2001:db8:2::11")
    doc["nodes"].append({"name": "node2", "addresses": ["203.0.113.12"], "weight": 3, "draining": True})
    doc["services"][0] |= {
        "vip": None, "vips": ["192.0.2.10", "2001:db8::10"], "forwardingMode": "nat",
        "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
        "loadBalancerSourceRanges": ["198.51.100.0/24", "2001:db8:c::/64"], "ipvsScheduler": "wrr",
        "healthCheck": {"kubeProxyHealthz": True},
    }
    del doc["services"][0]["vip"]
    svc = config.parse(yaml.safe_dump(doc)).services[0]
    assert [str(v) for v in svc.vips] == ["192.0.2.10", "2001:db8::10"]
    assert svc.forwarding_mode is model.ForwardingMode.NAT
    assert svc.session_affinity_timeout == 600
    assert [str(n) for n in svc.source_ranges] == ["198.51.100.0/24", "2001:db8:c::/64"]
    assert svc.ipvs_scheduler == "wrr"
    assert svc.probe is model.ProbeKind.KUBE_PROXY
    node2 = config.parse(yaml.safe_dump(doc)).nodes[1]
    assert (node2.weight, node2.draining) == (3, True)
    affinity_default = edit(services__0__sessionAffinity="ClientIP")
    assert config.parse(affinity_default).services[0].session_affinity_timeout == 10800


@pytest.mark.parametrize(
    ("changes", "path", "words"),
    [
        ({"services__0__vips": ["192.0.2.11"]}, "services[0]", "either `vip`"),
        ({"services__0__loadBalancerSourceRanges": ["198.51.100.7/24"]}, "services[0].loadBalancerSourceRanges[0]",
         "host bits set"),
        ({"services__0__sessionAffinity": "Sticky"}, "services[0].sessionAffinity", "ClientIP"),
        ({"dataplane": {"maglevTableSize": 1000}}, "dataplane", "prime"),
        ({"dataplane": {"masqueradeMark": 3}}, "dataplane", "single bit"),
        ({"dataplane": {"kind": "bpf"}}, "dataplane.kind", "nftables"),
        ({"nodes__0__weight": 0}, "nodes[0].weight", "greater than or equal to 1"),
    ],
)
def test_new_fields_refuse_bad_values(changes: dict[str, object], path: str, words: str) -> None:
    found = problems(edit(**changes))
    assert any(p.path == path and words in p.message for p in found), found


def test_dual_stack_vips_need_nodes_of_each_family() -> None:
    doc = yaml.safe_load(MINIMAL)
    del doc["services"][0]["vip"]
    doc["services"][0]["vips"] = ["192.0.2.10", "2001:db8::10", "192.0.2.11"]
    found = {p.path: p.message for p in problems(yaml.safe_dump(doc))}
    assert "at most 2" in found["services[0].vips"]
    doc["services"][0]["vips"] = ["192.0.2.10", "2001:db8::10"]
    [p] = problems(yaml.safe_dump(doc))
    assert p.path == "services[0].vips" and "IPv6" in p.message


def test_cross_field_checks() -> None:
    doc = yaml.safe_load(MINIMAL)
    doc["nodes"].append({"name": "node1", "addresses": ["203.0.113.12"]})
    doc["services"].append({"name": "api", "vip": "192.0.2.10", "ports": [{"port": 80, "nodePort": 30080}],
                            "bgp": {"med": 5}})
    doc["services"].append({"name": "v6", "vip": "2001:db8::10", "ports": [{"port": 80, "nodePort": 30081}]})
    doc["services"].append({"name": "multi", "vip": "192.0.2.11",
                            "ports": [{"port": 80, "nodePort": 30082}, {"port": 81, "nodePort": 30083}]})
    found = {p.path: p.message for p in problems(yaml.safe_dump(doc))}
    assert "duplicate node name" in found["nodes[1].name"]
    assert "already used by default/web" in found["services[1].ports[0].port"]
    assert "nodePort 30080 is already used" in found["services[1].ports[0].nodePort"]
    assert "same attributes" in found["services[1].bgp"]
    assert "IPv6" in found["services[2].vip"]
    assert "needs a name" in found["services[3].ports[0].name"]


def test_yaml_syntax_error_has_a_line() -> None:
    [p] = problems("node: {name: lb1\nbgp: [")
    assert p.line is not None
    assert "invalid YAML" in p.value


def test_not_a_mapping() -> None:
    [p] = problems("- a\n- b\n")
    assert "mapping" in p.message


def test_peer_password_refuses_control_characters() -> None:
    [p] = problems(edit(bgp__peers__0__password="ab\ncd"))
    assert p.path == "bgp.peers[0].password"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(tmp_path / "missing.yaml")
    assert "cannot read" in str(info.value)


def test_digest_changes_with_content() -> None:
    a = config.parse(MINIMAL)
    b = config.parse(edit(services__0__vip="192.0.2.11"))
    assert a.digest() == config.parse(MINIMAL).digest()
    assert a.digest() != b.digest()


@pytest.mark.parametrize("value", ["999.1.1.1:9469", "127.0.0.1:99999", "localhost:9469", "127.0.0.1"])
def test_metrics_addresses_are_checked_as_listen_addresses(value: str) -> None:
    for section in ("agent", "proxy"):
        doc = yaml.safe_load(MINIMAL)
        doc[section] = {"metricsAddress": value}
        found = problems(yaml.safe_dump(doc))
        assert [p.path for p in found] == [f"{section}.metricsAddress"], found
        assert value in str(found[0])
    doc = yaml.safe_load(MINIMAL)
    doc["agent"] = {"metricsAddress": "[::1]:9469"}
    assert config.parse(yaml.safe_dump(doc)).agent.metrics_address == "[::1]:9469"
