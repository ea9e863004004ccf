"""The metrics module: one announce series per service that follows its reason, health pairs, BGP state."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from lbagent.agent.metrics import Metrics
from lbagent.plan.services import all_healthy, plan
from tests.unit.test_plan_render import three_nodes


def text(m: Metrics) -> str:
    return generate_latest(m.registry).decode()


def test_vip_announced_keeps_one_series_per_service_with_its_reason() -> None:
    model = three_nodes()
    metrics = Metrics()
    metrics.decisions(plan(model, all_healthy(model)).decisions)
    assert 'lbagent_vip_announced{reason="announced",service="default/web"} 1.0' in text(metrics)
    metrics.decisions(plan(model, {}).decisions)
    out = text(metrics)
    assert 'lbagent_vip_announced{reason="noHealthyNodes",service="default/web"} 0.0' in out
    assert 'reason="announced",service="default/web"' not in out


def test_health_bgp_and_config() -> None:
    metrics = Metrics()
    metrics.health({("default/web", "node1"): True, ("default/web", "node2"): False},
                   [("default/web", "node1"), ("default/web", "node2"), ("default/web", "node3")])
    metrics.bgp({"198.51.100.1": "up", "198.51.100.2": "connected"}, 3)
    metrics.config_loaded("abc")
    metrics.config_loaded("def")
    out = text(metrics)
    assert 'lbagent_node_healthy{node="node2",service="default/web"} 0.0' in out
    assert 'node="node3"' not in out  # not probed yet: no verdict to report
    assert 'lbagent_bgp_session_up{peer="198.51.100.2"} 0.0' in out
    assert "lbagent_announced_prefixes 3.0" in out
    assert 'lbagent_config_info{hash="def"} 1.0' in out and 'hash="abc"' not in out


def test_a_cut_off_shows_while_it_lasts_and_counts_once() -> None:
    metrics = Metrics()
    assert "lbagent_health_cut_off 0.0" in text(metrics) and "lbagent_health_cut_offs_total 0.0" in text(metrics)
    metrics.cut_off(True)
    assert "lbagent_health_cut_off 1.0" in text(metrics) and "lbagent_health_cut_offs_total 1.0" in text(metrics)
    metrics.cut_off(False)
    assert "lbagent_health_cut_off 0.0" in text(metrics) and "lbagent_health_cut_offs_total 1.0" in text(metrics)


def test_grafana_dashboard_queries_only_metrics_the_agent_exports() -> None:
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "configs" / "grafana-dashboard.json").read_text())
    exported: set[str] = set()
    for family in Metrics().registry.collect():  # every family, with or without series yet
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        exported.update(family.name + suffix for suffix in suffixes)
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"lbagent_\w+", target["expr"])}
    assert used and used <= exported, used - exported


def test_every_metric_is_in_the_operations_guide_and_the_guide_names_no_other() -> None:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    table = guide.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(lbagent_\w+)` \|", table, re.MULTILINE))
    exported = {family.name + ("_total" if family.type == "counter" else "") for family in Metrics().registry.collect()}
    assert documented == exported, f"undocumented: {exported - documented}; not exported: {documented - exported}"
