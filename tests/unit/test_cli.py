"""The `lbagent` command as an operator runs it: check, plan (no root needed), version."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lbagent import __version__

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "lbagent.example.yaml"


def lbagent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbagent.cli", *args], capture_output=True, text=True,
                          check=False, cwd=REPO, timeout=60)


def test_check_accepts_the_example() -> None:
    result = lbagent("check", "-c", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "ok (2 services, 3 nodes, 1 BGP peers" in result.stdout


def test_check_lists_every_problem_with_line_field_and_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("nodePort: 30080", "nodePort: 70000")
                   .replace("externalTrafficPolicy: Cluster", "externalTrafficPolicy: Sometimes"))
    result = lbagent("check", "-c", str(bad))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"{bad}: 2 problem(s)"
    assert any("services[0].ports[0].nodePort" in line and "(got 70000)" in line and "line " in line
               for line in lines)
    assert any("services[0].externalTrafficPolicy" in line and "'Sometimes'" in line for line in lines)


def test_plan_shows_vips_decisions_bgp_and_the_ruleset() -> None:
    result = lbagent("plan", "-c", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "## VIPs bound on lo\n  192.0.2.10" in out
    assert "default/web" in out and "announce (announced)" in out
    assert "announce route 192.0.2.10/32 next-hop self community [64512:100]" in out
    assert "table inet lbagent {" in out
    assert "192.0.2.10 . tcp . 443 : 30443" in out


def test_plan_json_is_machine_readable() -> None:
    result = lbagent("plan", "-c", str(EXAMPLE), "--json")
    doc = json.loads(result.stdout)
    assert doc["vips"] == [{"address": a, "interface": "lo"} for a in ("192.0.2.10", "192.0.2.11", "2001:db8::11")]
    assert doc["decisions"][0]["reason"] == "announced"
    frontends = {(f["listen"], tuple(f["backends"])) for f in doc["frontends"]}
    assert (80, ("node1=203.0.113.11:30080", "node2=203.0.113.12:30080", "node3=203.0.113.13:30080")) in frontends
    assert doc["bgp"]["peers"][0]["password"] is None


def test_plan_flow_names_the_node_and_refuses_nonsense() -> None:
    result = lbagent("plan", "-c", str(EXAMPLE), "--flow", "192.0.2.130:40000,192.0.2.10:80")
    assert result.returncode == 0, result.stderr
    assert "goes to node" in result.stdout and "default/web" in result.stdout
    assert lbagent("plan", "-c", str(EXAMPLE), "--flow", "192.0.2.130:40000,192.0.2.10:8080").returncode == 1
    bad = lbagent("plan", "-c", str(EXAMPLE), "--flow", "192.0.2.130,192.0.2.10:80")
    assert bad.returncode == 2 and "not ADDRESS:PORT" in bad.stderr


def test_version() -> None:
    assert lbagent("version").stdout.strip() == f"lbagent {__version__}"
