"""Hostile but fair config files (issue 10's minimal reproducers): each is refused by `check`, naming the field and
the value, quickly, with no traceback; none reaches `run`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbagent.sources.file import config
from tests.certs import TestCA
from tests.unit.test_config_http import _https_doc

BASE: dict[str, Any] = {
    "node": {"name": "lb1"},
    "bgp": {"localAS": 64512, "routerID": "198.51.100.11",
            "peers": [{"address": "198.51.100.1", "peerAS": 64500}]},
    "nodes": [{"name": "node1", "addresses": ["203.0.113.11"]}],
    "services": [{"name": "web", "vip": "192.0.2.10", "ports": [{"port": 80, "nodePort": 30080}]}],
}


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(yaml.safe_dump(BASE))
    return doc


def _with(path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    """The base document with one value replaced at `path`."""
    doc = _doc()
    target: Any = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return doc


def _refused(text_or_doc: str | dict[str, Any]) -> list[str]:
    text = text_or_doc if isinstance(text_or_doc, str) else yaml.safe_dump(text_or_doc, sort_keys=False)
    with pytest.raises(config.ConfigError) as err:
        config.parse(text)
    return [str(p) for p in err.value.problems]


def test_the_base_document_is_accepted() -> None:
    config.parse(yaml.safe_dump(_doc()))


def test_a_duplicate_peer_and_a_local_address_of_the_other_family() -> None:
    doc = _doc()
    doc["bgp"]["peers"].append(dict(doc["bgp"]["peers"][0]))
    [problem] = _refused(doc)
    assert "bgp.peers[1].address" in problem and "198.51.100.1" in problem and "duplicate peer" in problem
    doc = _doc()
    doc["bgp"]["peers"][0]["localAddress"] = "2001:db8::11"
    [problem] = _refused(doc)
    assert "bgp.peers[0].localAddress" in problem and "2001:db8::11" in problem and "cannot reach" in problem


@pytest.mark.parametrize("community", ["70000:1", "1:65536", "\u0663:1", "\uff16\uff14\uff15\uff11\uff12:1", "1:2:3"])
def test_communities_out_of_range_or_not_ascii(community: str) -> None:
    doc = _doc()
    doc["services"][0]["bgp"] = {"communities": ["64512:100", community]}
    [problem] = _refused(doc)
    assert "services[0].bgp.communities[1]" in problem and "0-65535" in problem


@pytest.mark.parametrize(("path", "value"), [
    (("nodes", 0, "addresses", 0), "2001:db8::7%lo"),
    (("services", 0, "vip"), "2001:db8::10%eth0\nlisten x"),
    (("bgp", "peers", 0, "address"), "fe80::1%uplink"),
])
def test_ipv6_scope_ids_are_refused_in_every_address(path: tuple[str | int, ...], value: str) -> None:
    doc = _with(path, value)
    problems = _refused(doc)
    assert any("scope id" in p for p in problems), problems


def test_scope_ids_in_endpoints_and_unicode_ports_are_refused() -> None:
    doc = _doc()
    doc["backends"] = [{"name": "legacy", "endpoints": ["[2001:db8::7%lo]:8080"]}]
    assert any("backends[0].endpoints[0]" in p and "scope id" in p for p in _refused(doc))
    doc["backends"] = [{"name": "legacy", "endpoints": ["198.51.100.7:\u0668\u0660"]}]
    assert any("backends[0].endpoints[0]" in p and "ADDRESS:PORT" in p for p in _refused(doc))


@pytest.mark.parametrize(("path", "value"), [
    (("bgp", "localAS"), True),
    (("services", 0, "ports", 0, "nodePort"), "30080"),
    (("services", 0, "ports", 0, "port"), True),
    (("bgp", "peers", 0, "holdTime"), 9.5),
    (("nodes", 0, "draining"), "yes"),
])
def test_no_coercion_between_numbers_strings_and_booleans(path: tuple[str | int, ...], value: object) -> None:
    doc = _with(path, value)
    [problem] = _refused(doc)
    assert repr(value) in problem


def test_duplicate_keys_are_errors_with_both_lines() -> None:
    text = yaml.safe_dump(_doc(), sort_keys=False) + "services: []\n"
    [problem] = _refused(text)
    assert "duplicate key 'services'" in problem and "first on line" in problem


def test_an_alias_bomb_deep_nesting_and_huge_integers_are_refused_without_a_traceback() -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    [problem] = _refused("\n".join(lines) + "\n")
    assert "aliases are expanded" in problem
    [problem] = _refused("node: &n [1, *n]\n")  # a value that contains itself
    assert "contains it" in problem
    [problem] = _refused("node: &n " + "[" * 200 + "]" * 200 + "\n")
    assert "nest more than 64 deep" in problem
    [problem] = _refused("node: " + "[" * 2000 + "]" * 2000 + "\n")
    assert "nesting depth" in problem
    [problem] = _refused("node: {name: " + "1" * 5000 + "}\n")
    assert "4300 digits" in problem


def test_addresses_the_site_already_uses_cannot_be_vips() -> None:
    for vip, owner in (("203.0.113.11", "nodes[0].addresses[0]"), ("198.51.100.1", "bgp.peers[0].address"),
                       ("198.51.100.11", "bgp.routerID")):
        doc = _doc()
        doc["services"][0]["vip"] = vip
        problems = _refused(doc)
        assert any("services[0].vip" in p and vip in p and owner in p for p in problems), problems


@pytest.mark.parametrize("address", ["0.0.0.0", "127.0.0.1", "224.0.0.1", "::1", "fe80::1"])
def test_node_addresses_must_be_reachable_unicast(address: str) -> None:
    doc = _doc()
    doc["nodes"][0]["addresses"] = [address]
    problems = _refused(doc)
    assert any("nodes[0].addresses[0]" in p and "unicast" in p for p in problems), problems


def test_source_ranges_of_the_other_family_only_and_a_relative_runtime_dir() -> None:
    doc = _doc()
    doc["services"][0]["loadBalancerSourceRanges"] = ["2001:db8::/32"]
    [problem] = _refused(doc)
    assert "loadBalancerSourceRanges" in problem and "no range of the VIPs' family (IPv4)" in problem
    doc["services"][0]["vips"] = [doc["services"][0].pop("vip"), "2001:db8::10"]
    doc["nodes"][0]["addresses"].append("2001:db8:c::11")
    config.parse(yaml.safe_dump(doc))  # dual stack admitting IPv6 clients only: a site may mean that
    doc = _doc()
    doc["agent"] = {"runtimeDir": "run/lbagent"}
    [problem] = _refused(doc)
    assert "agent.runtimeDir" in problem and "absolute" in problem


def test_special_files_are_refused_by_type_before_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    for path, reason in ((fifo, "not a regular file: it is a FIFO"),
                         (Path("/dev/zero"), "not a regular file: it is a device"), (tmp_path, "Is a directory")):
        with pytest.raises(config.ConfigError) as err:
            config.load(path)
        assert f"cannot read the file: {reason}" in str(err.value)


def test_a_fifo_as_certificate_file_is_named_not_read(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    ca.issue("shop", ["shop.example.com"])
    (tmp_path / "shop.crt").unlink()
    os.mkfifo(tmp_path / "shop.crt")
    doc = _https_doc(tmp_path, ca, ["shop.example.com"])
    problems = _refused(doc)
    assert any("certificates[0].certFile" in p and "not a regular file: it is a FIFO" in p for p in problems), problems


@pytest.mark.parametrize(("field", "regex", "message"), [
    ("path", "/\\u0041", "PCRE2 does not support \\F, \\L, \\l, \\N{name}, \\U, or \\u at offset 3"),
    ("headers", "/\\N{DIGIT ONE}", "PCRE2 does not support \\F, \\L, \\l, \\N{name}, \\U, or \\u at offset 3"),
    ("queryParams", "(?x)/a#", "missing closing parenthesis at offset 13 of '^(?:(?x)/a#)$', the whole-value "
                               "match HAProxy is given"),
])
def test_regexes_pythons_re_takes_and_haproxys_pcre2_refuses(field: str, regex: str, message: str) -> None:
    """Checked with Python's `re` they passed, then `haproxy -c` refused the config and every HTTP change was
    blocked. Now PCRE2 itself (the library HAProxy is linked with) refuses them, with its message and offset."""
    doc = _doc()
    doc["listeners"] = [{"name": "web", "vip": "192.0.2.20", "port": 80}]
    match: dict[str, Any] = {"path": {"type": "RegularExpression", "value": regex}} if field == "path" else {
        field: [{"name": "x", "type": "RegularExpression", "value": regex}]}
    doc["routes"] = [{"name": "r", "listeners": ["web"], "rules": [
        {"matches": [match], "backendRefs": [{"name": "web", "port": 80}]}]}]
    [problem] = _refused(doc)
    where = "path.value" if field == "path" else f"{field}[0].value"
    assert f"routes[0].rules[0].matches[0].{where}: invalid regular expression for HAProxy (PCRE2): {message} " \
           f"(got {regex!r})" in problem, problem
