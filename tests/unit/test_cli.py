"""The `lbagent` command as an operator runs it: check, plan (no root needed), version."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbagent import __version__, model
from lbagent.l4.iptables import render as iptables
from lbagent.l4.ipvs import render as ipvs
from lbagent.l4.nftables import render as nftables
from lbagent.ops import artifacts, cli
from lbagent.plan.services import Backend, Frontend, all_healthy, plan
from lbagent.sources.file import config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "lbagent.example.yaml"


def lbagent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbagent.ops.cli", *args], capture_output=True, text=True,
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


def _kind(tmp_path: Path, kind: str, scheduler: str = "mh") -> Path:
    def edit(doc: dict[str, Any]) -> None:
        doc["dataplane"]["kind"] = kind
        doc["services"][0]["ipvsScheduler"] = scheduler

    return _variant(tmp_path, f"{kind}-{scheduler}.yaml", edit)


def _said(path: Path, flow: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["plan", "-c", str(path), "--flow", flow]) == 0
    return capsys.readouterr().out


PREDICTORS: dict[str, Callable[[Frontend, model.IPAddress, int], Backend | None]] = {
    "nftables": lambda f, source, port: nftables.predict(f, source, port, 1021),
    "iptables": lambda f, source, port: iptables.predict(f, source, port, 1021),
    "ipvs": ipvs.predict,
}


def test_plan_flow_answers_with_the_configured_data_planes_own_hash(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    client, ports = ip_address("192.0.2.130"), range(40000, 40030)
    answers = {}
    for kind, predict in PREDICTORS.items():
        path = _kind(tmp_path, kind)
        m = config.load(str(path))
        web = next(f for f in plan(m, all_healthy(m)).frontends if f.port == 80)
        answers[kind] = [_said(path, f"{client}:{port},192.0.2.10:80", capsys).split(" goes to ")[1].split()[0]
                         for port in ports]
        assert answers[kind] == [b.node if (b := predict(web, client, port)) else None for port in ports], kind
    # Each data plane hashes its own way: the same flow goes to another node under another kind.
    assert answers["nftables"] != answers["iptables"] and answers["iptables"] != answers["ipvs"]
    assert answers["nftables"] != answers["ipvs"]
    out = _said(_kind(tmp_path, "iptables"), f"{client}:40000,192.0.2.10:80", capsys)
    assert "(Maglev slot by HMARK's hash of the client address and port; every LB node running iptables agrees)" in out
    out = _said(_kind(tmp_path, "ipvs"), f"{client}:40000,192.0.2.10:80", capsys)
    assert "(IPVS mh: Maglev slot by the kernel's hsiphash (64-bit kernels) of the client address and port)" in out
    assert "the kernel's mh table has 4093 slots" in out and "in the order they were added" in out


def test_plan_flow_with_an_ipvs_scheduler_that_decides_by_state_names_the_candidates(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for scheduler, why in (("rr", "next node in turn"), ("wrr", "weighted turn"), ("lc", "fewest connections"),
                           ("sh", "lbagent predicts only mh")):
        out = _said(_kind(tmp_path, "ipvs", scheduler), "192.0.2.130:40000,192.0.2.10:80", capsys)
        assert out.startswith("TCP 192.0.2.130:40000 -> 192.0.2.10:80 (default/web) goes to one of node1 "
                              "203.0.113.11:30080, node2 203.0.113.12:30080, node3 203.0.113.13:30080: IPVS "
                              f"{scheduler} "), out
        assert why in out


def test_the_ipvs_mh_table_size_comes_from_the_kernels_build_config(tmp_path: Path) -> None:
    proc, boot = tmp_path / "config.gz", tmp_path / "config-6.1.0"
    paths = (str(proc), str(tmp_path / "config-{release}"))
    assert cli._mh_table_index("6.1.0", paths) == (12, "assumed: the default CONFIG_IP_VS_MH_TAB_INDEX=12; this "
                                                       "machine's kernel build config is not readable")
    boot.write_text("CONFIG_IP_VS=m\nCONFIG_IP_VS_MH=m\nCONFIG_IP_VS_MH_TAB_INDEX=10\n")
    assert cli._mh_table_index("6.1.0", paths) == (10, f"CONFIG_IP_VS_MH_TAB_INDEX=10 in {boot}")
    proc.write_bytes(gzip.compress(b"# CONFIG_IP_VS is not set\n"))  # /proc/config.gz first: the running kernel
    index, where = cli._mh_table_index("6.1.0", paths)
    assert index == 12 and f"{proc} has no IPVS mh" in where


@pytest.mark.parametrize(("kind", "shown", "absent"), [
    ("nftables", ["## nftables (applied with `nft -f` in one transaction)\ntable inet lbagent\n"],
     ["## iptables", "## IPVS"]),
    ("iptables", ["## iptables, ipv4 (applied with `iptables-restore --noflush`)\n*mangle\n",
                  "## iptables, ipv6 (applied with `iptables-restore --noflush`)\n*mangle\n"],
     ["## nftables", "## IPVS", "table inet"]),
    ("ipvs", ["## IPVS services (created over netlink, in this order)\n  add-service tcp/192.0.2.10:80 mh\n",
              "## nftables beside IPVS (source ranges, masquerade, refusals)\ntable inet lbagent_ipvs\n"],
     ["## iptables", "## nftables (applied", "table inet lbagent\n"]),
])
def test_plan_shows_what_the_configured_data_plane_programs(
        kind: str, shown: list[str], absent: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _kind(tmp_path, kind)
    assert cli.main(["plan", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert all(text in out for text in shown), out
    assert not any(text in out for text in absent), out
    m = config.load(str(path))
    p = plan(m, all_healthy(m))
    if kind == "nftables":
        assert nftables.render(p.frontends, p.l4_vips, m.dataplane) in out
    elif kind == "iptables":
        rules = iptables.build(p.frontends, p.l4_vips, m.dataplane)
        assert all(iptables.render_full(rules, family) in out for family in (4, 6))
    else:
        ops = ipvs.diff({}, ipvs.desired(p.frontends))
        assert "".join(f"  {op}\n" for op in ops) in out


def test_version() -> None:
    assert lbagent("version").stdout.strip() == f"lbagent {__version__}"


# ---- check asks the real tools --------------------------------------------------------------------------------


def _variant(tmp_path: Path, name: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    edit(doc)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _with_http(doc: dict[str, Any]) -> None:
    doc["listeners"] = [{"name": "web", "vip": "192.0.2.20", "port": 80}]
    doc["routes"] = [{"name": "shop", "listeners": ["web"], "hostnames": ["shop.example.com"],
                      "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                                 "backendRefs": [{"name": "web", "port": 80}]},
                                {"backendRefs": [{"name": "web", "port": 443}]}]}]


def test_check_names_each_real_tool_and_its_verdict(tmp_path: Path) -> None:
    result = lbagent("check", "-c", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "  accepted     nft -c -f lbagent.nft\n" in result.stdout
    assert "  accepted     exabgp validate exabgp.conf\n" in result.stdout
    assert "haproxy" not in result.stdout  # no listeners: no haproxy.cfg to judge

    def iptables_and_http(doc: dict[str, Any]) -> None:
        doc["dataplane"]["kind"] = "iptables"
        _with_http(doc)

    result = lbagent("check", "-c", str(_variant(tmp_path, "ipt.yaml", iptables_and_http)))
    assert result.returncode == 0, result.stderr
    for line in ("accepted     iptables-nft-restore --test --noflush < iptables-ipv4.rules",
                 "accepted     ip6tables-nft-restore --test --noflush < iptables-ipv6.rules",
                 "accepted     haproxy -c -f haproxy.cfg", "accepted     exabgp validate exabgp.conf"):
        assert line in result.stdout
    assert "nft -c" not in result.stdout

    result = lbagent("check", "-c", str(_variant(tmp_path, "ipvs.yaml", lambda d: d["dataplane"].update(kind="ipvs"))))
    assert result.returncode == 0, result.stderr
    assert "accepted     nft -c -f lbagent-ipvs.nft" in result.stdout
    assert "not checked  ipvs (4 services): no tool checks IPVS services" in result.stdout


def test_check_without_cap_net_admin_or_without_a_tool_says_not_checked_and_goes_on(tmp_path: Path) -> None:
    # setpriv drops CAP_NET_ADMIN from the bounding set: the root process it starts cannot get it back.
    result = subprocess.run(["setpriv", "--bounding-set", "-net_admin", "--", sys.executable, "-m", "lbagent.ops.cli",
                             "check", "-c", str(EXAMPLE)], capture_output=True, text=True, check=False, cwd=REPO,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "not checked  nft -c -f lbagent.nft: nft needs CAP_NET_ADMIN even to check" in result.stdout
    assert "accepted     exabgp validate exabgp.conf" in result.stdout

    def missing(doc: dict[str, Any]) -> None:
        _with_http(doc)
        doc["bgp"]["exabgp"] = str(tmp_path / "no-exabgp")
        doc["proxy"] = {"haproxy": str(tmp_path / "no-haproxy")}

    result = lbagent("check", "-c", str(_variant(tmp_path, "missing.yaml", missing)))
    assert result.returncode == 0, result.stderr
    assert f"not checked  haproxy -c -f haproxy.cfg: cannot run HAProxy: '{tmp_path}/no-haproxy'" in result.stdout
    assert "not checked  exabgp validate exabgp.conf" in result.stdout and "no-exabgp" in result.stdout
    assert "accepted     nft -c -f lbagent.nft" in result.stdout


def test_check_no_tools_runs_none() -> None:
    result = lbagent("check", "--no-tools", "-c", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{EXAMPLE}: ok (2 services")
    assert "accepted" not in result.stdout


def test_a_refusal_names_the_tool_its_words_and_the_config_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the real tools say about artifacts they refuse, traced back into the file. No config lbagent accepts is
    known to be refused (the fuzz test looks for one), so the rendered artifacts are spoilt on their way out."""
    path = _variant(tmp_path, "http.yaml", _with_http)
    render = artifacts.plan_document

    def spoilt(m: model.Model, certificates: Any = None) -> dict[str, Any]:
        doc = render(m, certificates)
        doc["haproxy"] = doc["haproxy"].replace("    # routes[0].rules[1]\n",
                                                "    # routes[0].rules[1]\n    no-such-keyword on\n")
        doc["exabgp"] = doc["exabgp"].replace("hold-time 9;", "hold-time 2;")
        doc["nftables"] = doc["nftables"].replace("192.0.2.10 . tcp . 443 : 30443",
                                                  "192.0.2.10 . tcp . 443 : 99999")
        return doc

    monkeypatch.setattr(artifacts, "plan_document", spoilt)
    assert cli.main(["check", "-c", str(path)]) == 1
    out, err = capsys.readouterr()
    text = path.read_text()
    assert "ok (" not in out
    assert "refused      haproxy -c -f haproxy.cfg" in err and "unknown keyword 'no-such-keyword'" in err
    assert f"from routes[0].rules[1] (line {config.field_line(text, 'routes[0].rules[1]')})" in err
    assert "refused      exabgp validate exabgp.conf" in err and "holdtime must be zero or at least 3" in err
    assert f"from bgp.peers[0] (line {config.field_line(text, 'bgp.peers[0]')})" in err
    assert "refused      nft -c -f lbagent.nft" in err and "99999" in err
    assert f"from services[0] (line {config.field_line(text, 'services[0]')})" in err
    assert err.rstrip().endswith("what `run` would write for this config is not)")
    assert "refused by nft -c -f lbagent.nft, haproxy -c -f haproxy.cfg, exabgp validate exabgp.conf" in err
