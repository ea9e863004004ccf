"""Generated configs: the parser never crashes, and what `check` accepts renders to what the real tools accept.

A fixed seed and a small budget here (`make test`); `make fuzz` runs the same properties long (FUZZ_EXAMPLES).
FUZZ_REPORT=path writes what a run saw as JSON (rewritten every 1,000 examples and at the end): examples,
accepted, refused, crashes, accepted-then-refused by a tool, the tools' verdicts, the slowest parse and how many
took over 1 s (each also without the garbage collector's time, and timed again). A failure stops the run; its
count includes hypothesis's replays while it shrinks to the minimal example it prints.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import json
import os
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from lbagent import model
from lbagent.ops import judge
from lbagent.sources.file import config

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
SEED = int(os.environ.get("FUZZ_SEED", "20261202"))
REPORT = os.environ.get("FUZZ_REPORT")
HANG_SECONDS = 1.0  # a parse slower than this counts as a hang in the report
SEEDS: list[dict[str, Any]] = [
    {
        "node": {"name": "lb1"},
        "agent": {"runtimeDir": "/run/lbagent", "drain": "2s"},
        "bgp": {"localAS": 64512, "routerID": "198.51.100.11",
                "peers": [{"address": "198.51.100.1", "peerAS": 64500, "holdTime": 9}]},
        "dataplane": {"kind": "nftables", "forwardingMode": "masquerade"},
        "nodes": [{"name": "node1", "addresses": ["203.0.113.11"]},
                  {"name": "node2", "addresses": ["203.0.113.12", "2001:db8:c::12"], "weight": 2}],
        "services": [
            {"name": "web", "vip": "192.0.2.10", "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                                                            {"name": "dns", "protocol": "UDP", "port": 53,
                                                             "nodePort": 30053}],
             "bgp": {"med": 10, "communities": ["64512:100"]}, "loadBalancerSourceRanges": ["192.0.2.128/25"]},
            {"name": "api", "vips": ["192.0.2.11", "2001:db8::11"], "externalTrafficPolicy": "Local",
             "healthCheckNodePort": 32000, "sessionAffinity": "ClientIP",
             "ports": [{"port": 443, "nodePort": 30443}]},
        ],
    },
    {
        "node": {"name": "lb1"},
        "bgp": {"localAS": 64512, "routerID": "198.51.100.11",
                "peers": [{"address": "198.51.100.1", "peerAS": 64500}]},
        "nodes": [{"name": "node1", "addresses": ["203.0.113.11"]}],
        "services": [{"name": "shop", "ports": [{"port": 80, "nodePort": 30081}]}],
        "backends": [{"name": "legacy", "endpoints": ["198.51.100.7:8080"]}],
        "listeners": [{"name": "web", "vip": "192.0.2.20", "port": 80}],
        "routes": [{"name": "shop", "listeners": ["web"], "hostnames": ["shop.example.com", "*.example.org"],
                    "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                                            "headers": [{"name": "x-v", "value": "2"}]}],
                               "filters": [{"type": "URLRewrite", "urlRewrite": {
                                   "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}],
                               "backendRefs": [{"name": "shop", "port": 80}]},
                              {"matches": [{"path": {"type": "Exact", "value": "/old"}}],
                               "backendRefs": [{"kind": "Backend", "name": "legacy"}]}]}],
    },
]

# Values a hostile or careless operator writes: wrong types, edges of ranges, scope ids, control characters.
ODD_TEXT = st.sampled_from([
    "", " ", "0", "-1", "70000:1", "1:2", "true", "null", "2001:db8::7%lo", "192.0.2.10\nlisten x", "198.51.100.7",
    "198.51.100.7:99999", "[2001:db8::7]:8080", "/", "/a/../b", "*.example.com", "a b", "é", "\u0663", "x" * 300,
    "10ms", "1m", "0s", "999999999s", "TCP", "UDP", "Local", "Cluster", "nft", "legacy", "ipvs", "iptables",
    "192.0.2.0/24", "2001:db8::/33", "198.51.100.1", "203.0.113.11", "127.0.0.1", "0.0.0.0", "224.0.0.1",
])
VALUES = st.one_of(
    ODD_TEXT, st.text(max_size=20), st.booleans(), st.none(),
    st.integers(min_value=-2, max_value=70000), st.sampled_from([2**32, 2**63, 10**30, 0, 1, 65535, 65536]),
    st.floats(allow_nan=True, allow_infinity=True), st.lists(ODD_TEXT, max_size=3),
    st.dictionaries(ODD_TEXT, ODD_TEXT, max_size=2),
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in the document a mutation may hit (a key of a mapping, an index of a list)."""
    found: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((*prefix, key))
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.append((*prefix, i))
            found += _paths(value, (*prefix, i))
    return found


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "replace", "delete", "duplicate"]))
        if action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
    return doc


# ---- the optional report (FUZZ_REPORT) -------------------------------------------------------------------------

_TALLY: dict[str, Any] = {
    "examples": 0, "accepted": 0, "refused": 0, "crashes": 0, "accepted_then_refused": 0, "accepted_not_judged": 0,
    "verdicts": {}, "judging_s": 0.0, "slowest_parse_s": 0.0, "slowest_parse_gc_s": 0.0, "slowest_parse_cpu_s": 0.0,
    "slowest_parse_without_gc_s": 0.0, "parses_over_1s": 0, "parses_over_1s_without_gc": 0, "over_1s": [],
    "slowest_parse_config": None,
}
_STARTED = time.time()
_PARSED: list[bool | None] = [None]  # the current example's parse: accepted, refused, or None (did not finish)
# Time in the garbage collector, which runs inside whichever allocation trips it: late in a long run its full
# collections walk hypothesis's whole history, a pause that is the test process's and not the parser's.
_GC = {"started": 0.0, "spent": 0.0}


def _gc_timer(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _GC["started"] = time.perf_counter()
    else:
        _GC["spent"] += time.perf_counter() - _GC["started"]


if REPORT:
    gc.callbacks.append(_gc_timer)


def _write_report(finished: bool) -> None:
    if not REPORT:
        return
    elapsed = time.time() - _STARTED
    body = {**_TALLY, "seed": SEED, "max_examples": EXAMPLES, "finished": finished, "elapsed_s": round(elapsed, 1),
            "examples_per_s": round(_TALLY["examples"] / elapsed, 1) if elapsed else None,
            "gc_total_s": round(_GC["spent"], 1),
            "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    body["judging_s"] = round(body["judging_s"], 1)
    tmp = f"{REPORT}.tmp"
    Path(tmp).write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, REPORT)


def _counting(real: Callable[[model.Model], list[judge.Verdict]]) -> Callable[[model.Model], list[judge.Verdict]]:
    """judge.judge, its verdicts counted by tool and outcome and its time added up for the report."""

    def run(m: model.Model) -> list[judge.Verdict]:
        start = time.perf_counter()
        try:
            verdicts = real(m)
        finally:
            _TALLY["judging_s"] += time.perf_counter() - start
        for verdict in verdicts:
            counts = _TALLY["verdicts"].setdefault(verdict.judge.split()[0], {})
            counts[verdict.outcome.value] = counts.get(verdict.outcome.value, 0) + 1
        return verdicts

    return run


@pytest.fixture(scope="module", autouse=True)
def _report_at_the_end() -> Iterator[None]:
    if not REPORT:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(judge, "judge", _counting(judge.judge))
        yield
    _write_report(finished=True)


def _parse_seconds(text: str) -> float:
    start = time.perf_counter()
    with contextlib.suppress(Exception):
        config.parse(text)
    return time.perf_counter() - start


def _timed_parse(text: str) -> model.Model:
    """config.parse, its wall, CPU and garbage-collector time and its outcome recorded for the report; a parse
    over HANG_SECONDS is timed again at once (up to 20 listed)."""
    _PARSED[0] = None
    wall, cpu, in_gc = time.perf_counter(), time.thread_time(), _GC["spent"]
    try:
        m = config.parse(text)
    except config.ConfigError:
        _PARSED[0] = False
        raise
    finally:
        wall, cpu, in_gc = time.perf_counter() - wall, time.thread_time() - cpu, _GC["spent"] - in_gc
        if wall > _TALLY["slowest_parse_s"]:
            _TALLY.update(slowest_parse_s=round(wall, 4), slowest_parse_gc_s=round(in_gc, 4),
                          slowest_parse_config=text)
        _TALLY["slowest_parse_cpu_s"] = max(_TALLY["slowest_parse_cpu_s"], round(cpu, 4))
        _TALLY["slowest_parse_without_gc_s"] = max(_TALLY["slowest_parse_without_gc_s"], round(wall - in_gc, 4))
        if wall > HANG_SECONDS:
            _TALLY["parses_over_1s"] += 1
            _TALLY["parses_over_1s_without_gc"] += wall - in_gc > HANG_SECONDS
            if len(_TALLY["over_1s"]) < 20:
                _TALLY["over_1s"].append({"example": _TALLY["examples"], "wall_s": round(wall, 4),
                                          "gc_s": round(in_gc, 4), "again_s": round(_parse_seconds(text), 4)})
    _PARSED[0] = True
    return m


def _tallied(test: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """Counts each example's outcome for the report (a failing example still fails the test)."""

    @functools.wraps(test)
    def run(doc: dict[str, Any]) -> None:
        _TALLY["examples"] += 1
        try:
            test(doc)
        except AssertionError as exc:
            if _PARSED[0] is not True:
                _TALLY["crashes"] += 1  # a refusal without problems
            elif "refused what check accepted" in str(exc):
                _TALLY["accepted_then_refused"] += 1
            else:
                _TALLY["accepted_not_judged"] += 1  # a tool could not give its verdict
            raise
        except BaseException:
            _TALLY["crashes"] += 1
            raise
        finally:
            if _PARSED[0] is not None:
                _TALLY["accepted" if _PARSED[0] else "refused"] += 1
            if _TALLY["examples"] % 1000 == 0:
                _write_report(finished=False)

    return run


@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(documents())
@_tallied
def test_check_never_crashes_and_what_it_accepts_the_real_tools_accept(doc: dict[str, Any]) -> None:
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    try:
        m = _timed_parse(text)
    except config.ConfigError as exc:
        assert exc.problems and all(p.message for p in exc.problems)
        return
    # Accepted: every artifact renders without an exception, and each real tool takes its own (what check runs).
    verdicts = judge.judge(m)
    refused = [v for v in verdicts if v.outcome is judge.Outcome.REFUSED]
    assert not refused, f"a tool refused what check accepted:\n{text}\n{refused}"
    # The tools are installed and this runs as root: everything but IPVS services (no tool checks them) was judged.
    assert all(v.outcome is judge.Outcome.ACCEPTED for v in verdicts if not v.judge.startswith("ipvs ")), verdicts


def test_the_generator_reaches_both_accepted_and_refused_configs() -> None:
    """The property above is not vacuous: the mutations produce configs check accepts and ones it refuses."""
    outcomes: set[bool] = set()

    @seed(7)
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(documents())
    def probe(doc: dict[str, Any]) -> None:
        try:
            config.parse(yaml.safe_dump(doc))
            outcomes.add(True)
        except config.ConfigError:
            outcomes.add(False)

    probe()
    assert outcomes == {True, False}


@pytest.mark.parametrize("index", range(len(SEEDS)))
def test_every_seed_is_accepted(index: int, tmp_path: Path) -> None:
    config.parse(yaml.safe_dump(SEEDS[index]))
