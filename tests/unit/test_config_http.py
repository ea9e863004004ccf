"""The HTTP layer's config, its checks (`lbagent check`), and its pure planning: precedence, weights, decisions."""

from __future__ import annotations

import hashlib
import ipaddress
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbagent import model, routing
from lbagent.ops import artifacts
from lbagent.plan import http as plan_http
from lbagent.plan.services import Reason, listener_decision
from lbagent.sources.file import config
from tests.certs import TestCA

BASE: dict[str, Any] = {
    "node": {"name": "lb1"},
    "bgp": {"localAS": 64512, "routerID": "198.51.100.11", "peers": [{"address": "198.51.100.1", "peerAS": 64500}]},
    "nodes": [{"name": "node1", "addresses": ["203.0.113.11"]}, {"name": "node2", "addresses": ["203.0.113.12"]},
              {"name": "node3", "addresses": ["203.0.113.13"], "weight": 2}],
    "services": [
        {"name": "shop-v1", "ports": [{"port": 80, "nodePort": 30081}]},
        {"name": "shop-v2", "ports": [{"port": 80, "nodePort": 30082}]},
        {"name": "httpbin", "ports": [{"port": 8000, "nodePort": 30083}]},
    ],
    "listeners": [{"name": "web", "vip": "192.0.2.20", "port": 80}],
}


def _doc(**extra: Any) -> dict[str, Any]:
    return {**yaml.safe_load(yaml.safe_dump(BASE)), **extra}


def _route(rules: list[dict[str, Any]], hostnames: list[str] | None = None, name: str = "shop") -> dict[str, Any]:
    return {"name": name, "listeners": ["web"], "hostnames": hostnames or [], "rules": rules}


def _parse(doc: dict[str, Any]) -> model.Model:
    return config.parse(yaml.safe_dump(doc, sort_keys=False))


def _problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(config.ConfigError) as err:
        _parse(doc)
    return [str(p) for p in err.value.problems]


def _healthy(m: model.Model, down: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset()
             ) -> dict[tuple[str, str], bool]:
    return {(s.key, n.name): (s.key, n.name) not in down for s in m.services for n in m.nodes}


def test_misspelt_backend_invalid_regex_and_missing_listener_are_named() -> None:
    problems = _problems(_doc(routes=[{
        "name": "shop", "listeners": ["web", "webb"], "rules": [
            {"backendRefs": [{"name": "httpbn", "port": 8000}]},
            {"matches": [{"path": {"type": "RegularExpression", "value": "^/x(["}}],
             "backendRefs": [{"name": "httpbin", "port": 8001}]},
        ]}]))
    assert any("routes[0].listeners[1]: no listener named 'webb'" in p for p in problems)
    assert any("routes[0].rules[0].backendRefs[0].name: no service default/httpbn in `services`; did you mean "
               "default/httpbin?" in p for p in problems)
    assert any("routes[0].rules[1].backendRefs[0].port: service default/httpbin" in p and "no TCP port 8001" in p
               for p in problems)
    assert any("routes[0].rules[1].matches[0].path.value: invalid regular expression" in p for p in problems)
    assert all(p.startswith("line ") for p in problems), problems


def test_a_rule_that_can_never_match_is_reported_with_the_one_that_wins() -> None:
    problems = _problems(_doc(routes=[
        _route([{"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                 "backendRefs": [{"name": "shop-v1", "port": 80}]}], ["shop.example.com"]),
        _route([{"matches": [{"path": {"type": "PathPrefix", "value": "/api/"}}],
                 "backendRefs": [{"name": "shop-v2", "port": 80}]}], ["shop.example.com"], name="shop2"),
    ]))
    assert len(problems) == 1
    assert "routes[1].rules[0].matches[0]: can never match on listener web: routes[0].rules[0].matches[0]" \
        in problems[0]
    # a wildcard host with a catch-all shadows nothing more specific: exact hosts and longer paths go first
    _parse(_doc(routes=[
        _route([{"backendRefs": [{"name": "shop-v1", "port": 80}]}], ["*.example.com"]),
        _route([{"matches": [{"path": {"value": "/x"}}], "backendRefs": [{"name": "shop-v2", "port": 80}]}],
               ["a.example.com"], name="a"),
    ]))


def test_gateway_api_precedence() -> None:
    m = _parse(_doc(routes=[
        _route([
            {"backendRefs": [{"name": "shop-v1", "port": 80}]},  # 0: PathPrefix /
            {"matches": [{"path": {"value": "/api"}}], "backendRefs": [{"name": "shop-v1", "port": 80}]},  # 1
            {"matches": [{"path": {"type": "Exact", "value": "/api"}}],  # 2
             "backendRefs": [{"name": "shop-v1", "port": 80}]},
            {"matches": [{"path": {"value": "/api"}, "method": "POST"}],  # 3
             "backendRefs": [{"name": "shop-v1", "port": 80}]},
            {"matches": [{"path": {"value": "/api"}, "headers": [{"name": "X-A", "value": "1"}]}],  # 4
             "backendRefs": [{"name": "shop-v1", "port": 80}]},
            {"matches": [{"path": {"value": "/api"}, "headers": [{"name": "X-A", "value": "1"}],  # 5
                          "queryParams": [{"name": "q", "value": "1"}]}],
             "backendRefs": [{"name": "shop-v1", "port": 80}]},
        ], ["*.example.com"]),
        _route([{"backendRefs": [{"name": "shop-v2", "port": 80}]}], ["shop.example.com"], name="exact"),
        _route([{"backendRefs": [{"name": "shop-v2", "port": 80}]}], name="any"),
    ]))
    p = plan_http.plan_proxy(m, _healthy(m), {})
    order = [e.backend for e in p.frontends[0].entries]
    assert order == ["default_exact_0", "default_shop_2", "default_shop_3", "default_shop_5", "default_shop_4",
                     "default_shop_1", "default_shop_0", "default_any_0"]


def test_canary_annotations_become_header_rules_and_a_weighted_split() -> None:
    m = _parse(_doc(routes=[_route([{
        "backendRefs": [{"name": "shop-v1", "port": 80}],
        "canary": {"backendRef": {"name": "shop-v2", "port": 80}, "nginx.ingress.kubernetes.io/canary-weight": "10",
                   "canary-by-header": "X-Canary"}}], ["shop.example.com"])]))
    p = plan_http.plan_proxy(m, _healthy(m), {})
    entries = p.frontends[0].entries
    assert [(e.match.headers, p.backend(e.backend).servers[0].source.split()[0]) for e in entries] == [
        ((model.ValueMatch("X-Canary", "always"),), "default/shop-v2"),
        ((model.ValueMatch("X-Canary", "never"),), "default/shop-v1"),
        ((), "default/shop-v1"),
    ]
    split = p.backend(entries[2].backend)
    share = {v: sum(s.weight for s in split.servers if s.source.startswith(v)) for v in ("default/shop-v1",
                                                                                         "default/shop-v2")}
    assert abs(share["default/shop-v2"] / sum(share.values()) - 0.10) < 0.005
    # node3 has weight 2: twice node1's share within a version
    v1 = {s.name: s.weight for s in split.servers if s.source.startswith("default/shop-v1")}
    assert v1["0_node3"] == 2 * v1["0_node1"] == 2 * v1["0_node2"]


def test_unhealthy_and_draining_servers_and_a_backend_ref_with_nothing_ready() -> None:
    doc = _doc(routes=[_route([{"backendRefs": [{"name": "shop-v1", "port": 80, "weight": 50},
                                                {"name": "shop-v2", "port": 80, "weight": 50}]}])])
    doc["nodes"][1]["draining"] = True
    m = _parse(doc)
    down = {("default/shop-v1", "node1")}
    p = plan_http.plan_proxy(m, _healthy(m, down), {})
    servers = {s.name: (s.weight, s.state) for s in p.backends[0].servers}
    assert servers["0_node1"] == (0, plan_http.ServerState.MAINT)
    assert servers["0_node2"] == (0, plan_http.ServerState.DRAIN)
    assert servers["0_node3"][1] is plan_http.ServerState.READY
    # shop-v2 wholly down: shop-v1 takes every request instead of half of them failing
    all_v2 = {("default/shop-v2", n) for n in ("node1", "node2", "node3")}
    p = plan_http.plan_proxy(m, _healthy(m, all_v2), {})
    assert {s.name for s in p.backends[0].servers if s.weight > 0} == {"0_node1", "0_node3"}
    # a runtime-only difference keeps the structure (no reload)
    assert plan_http.structural(p) == plan_http.structural(plan_http.plan_proxy(m, _healthy(m), {}))


def test_listener_reasons() -> None:
    m = _parse(_doc(routes=[_route([{"backendRefs": [{"name": "shop-v1", "port": 80}]}])]))
    listener = m.listeners[0]
    every = {("default/shop-v1", n.name) for n in m.nodes}
    p = plan_http.plan_proxy(m, _healthy(m, every), {})
    usable, unusable = plan_http.listener_serves(p.frontends[0], p)
    assert listener_decision(listener, usable, unusable, True, False).reason is Reason.NO_HEALTHY_BACKENDS
    p = plan_http.plan_proxy(m, _healthy(m), {})
    usable, unusable = plan_http.listener_serves(p.frontends[0], p)
    assert listener_decision(listener, usable, unusable, False, False).reason is Reason.PROXY_DOWN
    assert listener_decision(listener, usable, unusable, True, False).reason is Reason.ANNOUNCED
    assert listener_decision(listener, usable, unusable, True, True).reason is Reason.DRAINING


def test_listener_may_not_take_a_services_vip_or_port_twice() -> None:
    doc = _doc(routes=[_route([{"backendRefs": [{"name": "shop-v1", "port": 80}]}])])
    doc["services"][0]["vip"] = "192.0.2.20"
    doc["listeners"].append({"name": "web2", "vip": "192.0.2.20", "port": 80})
    problems = _problems(doc)
    assert any("listeners[0].vip: this VIP is a service's" in p for p in problems)
    assert any("listeners[1].port: 192.0.2.20 port 80 is already used by listener web" in p for p in problems)


def test_proxy_settings_reach_the_model_and_bad_ones_are_named() -> None:
    doc = _doc(routes=[_route([{"backendRefs": [{"name": "shop-v1", "port": 80}]}])],
               proxy={"serverConnectionReuse": "aggressive", "maxConnections": 20000})
    proxy = _parse(doc).proxy
    assert (proxy.server_connection_reuse, proxy.max_connections) == ("aggressive", 20000)
    assert _parse({**doc, "proxy": {}}).proxy.server_connection_reuse == "safe"
    doc["proxy"]["serverConnectionReuse"] = "sometimes"
    problems = _problems(doc)
    assert any("proxy.serverConnectionReuse" in p and "sometimes" in p for p in problems), problems


def test_match_limits_and_replace_prefix_match_with_other_path_types_are_named() -> None:
    many = [{"name": f"X-H{i}", "value": "1"} for i in range(17)]
    problems = _problems(_doc(routes=[_route([{"matches": [{"headers": many}],
                                               "backendRefs": [{"name": "shop-v1", "port": 80}]}])]))
    assert any("routes[0].rules[0].matches[0].headers" in p and "at most 16" in p for p in problems), problems
    rewrite = {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}
    problems = _problems(_doc(routes=[_route([{
        "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}, {"path": {"type": "Exact", "value": "/x"}}],
        "filters": [rewrite], "backendRefs": [{"name": "httpbin", "port": 8000}]}])]))
    assert any("routes[0].rules[0]" in p and "matches[1].path.type is Exact" in p for p in problems), problems


def test_replace_prefix_match_knows_which_prefixes_need_their_other_conditions() -> None:
    """A path under /c/long came by that prefix only when X-Long says so; /c (the shortest) needs no test."""
    long = {"path": {"type": "PathPrefix", "value": "/c/long/"}, "headers": [{"name": "X-Long", "value": "yes"}]}
    rewrite = {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}
    m = _parse(_doc(routes=[_route([{"matches": [long, {"path": {"type": "PathPrefix", "value": "/c"}}],
                                     "filters": [rewrite], "backendRefs": [{"name": "httpbin", "port": 8000}]}])]))
    (b,) = plan_http.plan_proxy(m, _healthy(m), {}).backends
    assert b.prefixes == ("/c/long", "/c")
    assert [(p, [x.headers[0].name for x in ms]) for p, ms in b.prefix_conditions] == [("/c/long", ["X-Long"])]


def _https_doc(tmp: Path, ca: TestCA, hostnames: list[str]) -> dict[str, Any]:
    doc = _doc(routes=[_route([{"backendRefs": [{"name": "shop-v1", "port": 80}]}], hostnames)])
    doc["routes"][0]["listeners"] = ["websecure"]
    doc["listeners"].append({"name": "websecure", "vip": "192.0.2.20", "port": 443, "protocol": "HTTPS",
                             "tls": {"certificates": [{"certFile": str(tmp / "shop.crt"),
                                                       "keyFile": str(tmp / "shop.key")}]}})
    return doc


def test_certificates_missing_uncovering_or_with_an_open_key_are_refused(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    ca.issue("shop", ["shop.example.com", "*.example.org"])
    _parse(_https_doc(tmp_path, ca, ["shop.example.com", "a.example.org"]))
    problems = _problems(_https_doc(tmp_path, ca, ["shop.example.com", "a.b.example.org"]))
    assert len(problems) == 1 and "routes[0].hostnames[1]: no certificate of listener websecure covers" in problems[0]
    ca.issue("shop", ["shop.example.com"], key_mode=0o640)
    problems = _problems(_https_doc(tmp_path, ca, ["shop.example.com"]))
    assert any("listeners[1].tls.certificates[0].keyFile" in p and "open to group/others (mode 0640)" in p
               for p in problems), problems
    (tmp_path / "shop.crt").unlink()
    problems = _problems(_https_doc(tmp_path, ca, ["shop.example.com"]))
    assert any("listeners[1].tls.certificates[0].certFile" in p and "does not exist" in p for p in problems)
    other = TestCA(tmp_path / "other")
    wrong = other.issue("shop", ["shop.example.com"])
    (tmp_path / "shop.crt").write_bytes(wrong.cert_file.read_bytes())
    ca.issue("keep", ["x.example.com"]).key_file.replace(tmp_path / "shop.key")
    problems = _problems(_https_doc(tmp_path, ca, ["shop.example.com"]))
    assert any("does not belong to the certificate" in p for p in problems), problems


def _unreachable_by_brute_force(m: model.Model) -> list[tuple[str, str, str]]:
    """The definition: each entry against every earlier one (quadratic; what the index must agree with)."""
    out: dict[str, tuple[str, str, str]] = {}
    for listener in m.listeners:
        if listener.redirect_to_https:
            continue
        entries = [e for _, e in routing.ranked_entries(m, listener)]
        for i, entry in enumerate(entries):
            for earlier in entries[:i]:
                if earlier.where != entry.where and routing.covers(earlier, entry):
                    out.setdefault(entry.where, (entry.where, listener.name, earlier.where))
                    break
    return list(out.values())


def _random_routes(rng: random.Random, count: int) -> list[dict[str, Any]]:
    hosts = [[], ["shop.example.com"], ["*.example.com"], ["a.b.example.com"], ["*.b.example.com", "x.example.org"]]
    paths = ["/", "/a", "/a/", "/a/b", "/a/b/c", "/ab", "/b"]
    routes = []
    for r in range(count):
        matches = []
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(["PathPrefix", "PathPrefix", "Exact", "RegularExpression"])
            value = rng.choice(paths) if kind != "RegularExpression" else rng.choice(["/a.*", "/b/[0-9]+"])
            match: dict[str, Any] = {"path": {"type": kind, "value": value}}
            if rng.random() < 0.3:
                match["method"] = rng.choice(["GET", "POST"])
            if rng.random() < 0.3:
                match["headers"] = [{"name": "x-v", "value": rng.choice(["1", "2"])}]
            matches.append(match)
        routes.append({"name": f"r{r}", "listeners": ["web"], "hostnames": rng.choice(hosts),
                       "rules": [{"matches": matches, "backendRefs": [{"name": "shop-v1", "port": 80}]}]})
    return routes


def _model_unchecked(doc: dict[str, Any]) -> model.Model:
    return config._to_model(config.ConfigFile.model_validate(doc))


@pytest.mark.parametrize("seed", range(40))
def test_the_indexed_reachability_check_agrees_with_the_definition(seed: int) -> None:
    rng = random.Random(seed)
    m = _model_unchecked(_doc(routes=_random_routes(rng, rng.randint(1, 12))))
    assert sorted(routing.unreachable(m)) == sorted(_unreachable_by_brute_force(m))


def test_four_thousand_distinct_routes_are_checked() -> None:
    """A site with thousands of Ingress paths: every one reachable, none compared with all the others (the
    quadratic check took 310 s for these; benchmarks, not this test, measure the time)."""
    routes = [_route([{"matches": [{"path": {"type": "PathPrefix", "value": f"/app{i}/v{i % 7}"}}],
                       "backendRefs": [{"name": "shop-v1", "port": 80}]}], [f"h{i % 50}.example.com"], name=f"r{i}")
              for i in range(4000)]
    m = _model_unchecked(_doc(routes=routes))
    assert routing.unreachable(m) == []


# ---- timeouts.request: a bound on the whole request, every attempt included ------------------------------------


@pytest.mark.parametrize("retry", [None, model.Retry(1), model.Retry(3), model.Retry(10)], ids=str)
def test_every_attempt_together_stays_within_the_request_budget(retry: model.Retry | None) -> None:
    """HAProxy 2.6 has no deadline for a whole request: the budget is shared out over the attempts it may make, and
    the worst case of those timeouts (failed connections, HAProxy's turn-around, answers that never come) fits."""
    for request in (0.044, 0.1, 0.25, 1.0, 2.5, 10.0, 60.0, 3600.0):
        for backend_request in (None, 0.01, 0.3, request):
            for connect in (0.001, 0.05, 5.0):
                try:
                    t = routing.attempt_timeouts(request, backend_request, connect, retry)
                except ValueError:
                    assert request < 0.1, (request, backend_request, connect)
                    continue
                assert t.connect is not None and t.server is not None
                assert t.longest(connect) <= request
                assert t.connect <= connect
                if backend_request is not None:
                    assert t.server <= backend_request
                assert t.retries == (retry.attempts if retry else routing.DEFAULT_RETRIES)
    # the shares for a 1 s budget: four equal attempts with a retry; without, the one attempt that connects gets
    # most of it (failed connections are retried, quickly)
    assert routing.attempt_timeouts(1.0, None, 5.0, model.Retry(3)) == routing.AttemptTimeouts(
        0.062, 0.188, 3, True, 1.0)
    assert routing.attempt_timeouts(1.0, None, 5.0, None) == routing.AttemptTimeouts(0.035, 0.755, 3, False, 1.0)
    # backendRequest alone bounds one attempt, as before
    assert routing.attempt_timeouts(None, 2.0, 5.0, None) == routing.AttemptTimeouts(None, 2.0, 3, False, None)


def test_request_and_backend_request_reach_the_backend() -> None:
    m = _parse(_doc(routes=[_route([
        {"backendRefs": [{"name": "shop-v1", "port": 80}], "timeouts": {"request": "1s"}, "retry": {"attempts": 3}},
        {"matches": [{"path": {"value": "/b"}}], "backendRefs": [{"name": "shop-v1", "port": 80}],
         "timeouts": {"request": "10s", "backendRequest": "500ms"}},
    ])], proxy={"timeouts": {"connect": "2s"}}))
    rule0, rule1 = m.routes[0].rules
    assert (rule0.request_timeout, rule0.backend_request_timeout) == (1.0, None)
    assert (rule1.request_timeout, rule1.backend_request_timeout) == (10.0, 0.5)
    p = plan_http.plan_proxy(m, _healthy(m), {})
    assert p.backend("default_shop_0").timeouts == routing.AttemptTimeouts(0.062, 0.188, 3, True, 1.0)
    assert p.backend("default_shop_1").timeouts == routing.AttemptTimeouts(0.357, 0.5, 3, False, 10.0)


def test_timeouts_haproxy_cannot_keep_are_named() -> None:
    problems = _problems(_doc(routes=[_route([
        {"backendRefs": [{"name": "shop-v1", "port": 80}], "timeouts": {"request": "1s", "backendRequest": "2s"}},
        {"matches": [{"path": {"value": "/a"}}], "backendRefs": [{"name": "shop-v1", "port": 80}],
         "timeouts": {"request": "10ms"}, "retry": {"attempts": 3}},
        {"matches": [{"path": {"value": "/b"}}], "backendRefs": [{"name": "shop-v1", "port": 80}],
         "timeouts": {"request": "20ms"}},
    ])]))
    assert len(problems) == 3, problems
    assert "routes[0].rules[0].timeouts.backendRequest: one attempt cannot take longer than the whole request " \
           "(timeouts.request is 1s) (got 2s)" in problems[0]
    assert "routes[0].rules[1].timeouts.request: too short to share out over 4 attempts (the first and " \
           "retry.attempts 3): give at least 16 ms (got 0.01s)" in problems[1]
    assert "routes[0].rules[2].timeouts.request: too short for up to 4 connection attempts" in problems[2]
    assert "give at least 28 ms (got 0.02s)" in problems[2]


# ---- header limits ------------------------------------------------------------------------------------------------


def test_header_limits_default_to_haproxys_and_are_checked() -> None:
    routes = [_route([{"backendRefs": [{"name": "shop-v1", "port": 80}]}])]
    m = _parse(_doc(routes=routes))
    assert (m.proxy.max_request_header_bytes, m.proxy.max_request_headers) == (15360, 100)
    m = _parse(_doc(routes=routes, proxy={"maxRequestHeaderBytes": 65536, "maxRequestHeaders": 200}))
    assert (m.proxy.max_request_header_bytes, m.proxy.max_request_headers) == (65536, 200)
    problems = _problems(_doc(routes=routes, proxy={"maxRequestHeaderBytes": "16k", "maxRequestHeaders": 0}))
    assert any("proxy.maxRequestHeaderBytes: Input should be a valid integer (got '16k')" in p for p in problems)
    assert any("proxy.maxRequestHeaders: Input should be greater than or equal to 1 (got 0)" in p for p in problems)
    [problem] = _problems(_doc(routes=routes, proxy={"maxRequestHeaderBytes": 2_000_000}))
    assert "proxy.maxRequestHeaderBytes: Input should be less than or equal to 1048576 (got 2000000)" in problem


def test_filters_that_add_more_than_the_buffer_keeps_free_are_named() -> None:
    modifier = {"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "add": [{"name": "X-Big", "value": "v" * 4000}]}}
    route = _route([{"filters": [modifier], "backendRefs": [{"name": "shop-v1", "port": 80}]}])
    _parse(_doc(routes=[route]))  # fits beside the default 15360 bytes
    [problem] = _problems(_doc(routes=[route], proxy={"maxRequestHeaderBytes": 4096}))
    assert "routes[0].rules[0].filters: HAProxy keeps room in its buffer for what the filters add to headers, " \
           "beside proxy.maxRequestHeaderBytes (4096): it must be at least 5037 for this rule (got 4013 bytes added)" \
           in problem


def test_hsts_is_opt_in_for_the_files_https_listeners_and_answers_carry_it(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    issued = ca.issue("shop", ["shop.example.com"])
    tls = {"defaultCertificate": {"certFile": str(issued.cert_file), "keyFile": str(issued.key_file)}}
    listener = {"name": "secure", "vip": "192.0.2.21", "port": 443, "protocol": "HTTPS", "tls": tls}
    route = {"name": "shop", "listeners": ["secure"], "hostnames": ["shop.example.com"],
             "rules": [{"backendRefs": [{"name": "shop-v1", "port": 80}]}]}
    assert _parse(_doc(listeners=[listener], routes=[route])).listeners[0].hsts is None
    listener["tls"] = {**tls, "hsts": {"maxAge": 63072000, "includeSubDomains": True, "preload": True}}
    m = _parse(_doc(listeners=[listener], routes=[route]))
    assert m.listeners[0].hsts == "max-age=63072000; includeSubDomains; preload"
    text = str(artifacts.plan_document(m)["haproxy"])
    assert "http-after-response set-header Strict-Transport-Security 'max-age=63072000; includeSubDomains; preload'" \
        in text
    listener["tls"] = {**tls, "hsts": {"maxAge": -1}}
    assert any("hsts.maxAge" in p for p in _problems(_doc(listeners=[listener], routes=[route])))


@pytest.mark.parametrize(("weights", "expected"), [
    ((90, 10), [9, 9, 9, 1, 1, 1]),        # exactly 10%: HAProxy's 256 cap no longer makes it 9.86%
    ((50, 50), [1, 1, 1, 1, 1, 1]),
    ((999, 1), [256, 256, 256, 1, 1, 1]),  # beyond what whole weights up to 256 can say: the finest split
])
def test_a_split_is_exact_in_whole_weights_when_haproxy_can_take_it(weights: tuple[int, int],
                                                                    expected: list[int]) -> None:
    def group(port: int) -> list[plan_http.Server]:
        return [plan_http.Server(f"{port}_{n}", ipaddress.ip_address(f"203.0.113.1{n}"), port, 1,
                                 plan_http.ServerState.READY, False, "") for n in (1, 2, 3)]

    refs = tuple(model.BackendRef(model.BackendKind.SERVICE, f"default/v{i}", 80, w) for i, w in enumerate(weights))
    servers = plan_http._weighted(refs, [group(30081), group(30082)])
    assert [s.weight for s in servers] == expected
    if max(expected) < plan_http.MAX_WEIGHT:  # exact: the second ref's share is its weight's
        v2 = sum(s.weight for s in servers[3:]) / sum(s.weight for s in servers)
        assert v2 == weights[1] / sum(weights)


def test_the_model_hash_follows_every_route_and_is_the_same_for_the_same_config() -> None:
    rule = {"matches": [{"path": {"type": "PathPrefix", "value": "/a"}}],
            "backendRefs": [{"name": "shop-v1", "port": 80}]}
    doc = _doc(routes=[_route([rule]), _route([rule], ["b.example.com"], name="other")])
    m = _parse(doc)
    assert m.digest() == _parse(doc).digest()
    moved = _doc(routes=[_route([rule]), _route([{**rule, "backendRefs": [{"name": "shop-v2", "port": 80}]}],
                                                ["b.example.com"], name="other")])
    assert m.digest() != _parse(moved).digest()
    assert m.digest() != replace(m, routes=m.routes[:1]).digest()
    assert m.digest() != replace(m, routes=m.routes[::-1]).digest()


@pytest.mark.parametrize("size", [0, 1, 2046, 2047, 2048, 4094, 4095, 10_000])
def test_hashing_in_pieces_is_sha256(size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    assert model._sha256(data[:size]).hexdigest() == hashlib.sha256(data[:size]).hexdigest()
