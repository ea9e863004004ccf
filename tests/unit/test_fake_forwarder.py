"""The contract between tests/fake_forwarder.py's FakeForwarder (what tests/unit/test_agent.py drives the agent with)
and the real NftForwarder, which runs the same steps in a network namespace this test makes.

The steps are the agent's (the data-plane reconciler's way of making change records): a full apply, health changes
sent as change records, a new model without one, a resync, nft refusing everything, the repair after it. The real
forwarder's refusal is the kernel's own: another process holds `table inet lbagent` with the `owner` flag, and nft
is not permitted to touch it. Both must answer each step alike ("full", "delta", "unchanged" or the same error) and
report the same VIPs as programmed; the scripts the fake keeps must be ones the kernel takes, and add up to the
table the real forwarder left in its kernel; and the fake's `text` (the table as it believes the kernel holds it)
must be that table too. Both run in one table and with the test model spread over shard tables (whose whole
applies go side by side).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import yaml

from lbagent import model
from lbagent.l4.change import FrontendChange
from lbagent.l4.nft import NftError
from lbagent.l4.nftables import apply, render
from lbagent.l4.nftables.apply import NftForwarder
from lbagent.plan.services import Frontend, all_healthy, plan
from lbagent.sources.file import config
from tests.fake_forwarder import FakeForwarder
from tests.netns import nft, run_python, throwaway_netns
from tests.unit.test_plan_render import THREE_NODES, _canonical, three_nodes

TABLE = "lbagent"
NODES = ("node1", "node2", "node3")

# The real forwarder's side, run inside the namespace: the same steps, the kernel's table listed after each.
INSIDE = "import sys; from tests.unit.test_fake_forwarder import inside; inside(sys.argv[1])"
# The layouts both run in: one table, and the test model's frontends over several shard tables (2 frontends a
# shard), whose whole applies go side by side in 2 nft processes.
LAYOUTS = {"one-table": None, "sharded": 2}


def use_layout(layout: str) -> None:
    if (per_shard := LAYOUTS[layout]) is not None:
        render.SHARD_FRONTENDS = per_shard
        apply.WHOLE_APPLY_PROCESSES = 2


def moved_model() -> model.Model:
    """The same services with one nodePort and one source range changed: a reload, no change record."""
    doc = yaml.safe_load(yaml.safe_dump(THREE_NODES))
    doc["services"][0]["ports"][0]["nodePort"] = 31080
    doc["services"][3]["loadBalancerSourceRanges"] = ["203.0.113.0/24"]
    return config.parse(yaml.safe_dump(doc))


def steps() -> list[tuple[str, model.Model, dict[tuple[str, str], bool], bool, list[str] | None, bool]]:
    """(name, model, health, force, services changed since the last apply or None, nft refuses everything)."""
    m, moved = three_nodes(), moved_model()
    healthy = all_healthy(m)
    node2_down = healthy | {("default/web", "node2"): False}
    web_down = healthy | {("default/web", n): False for n in NODES}
    return [
        ("full", m, healthy, False, None, False),
        ("a node fails", m, node2_down, False, ["default/web"], False),
        ("nothing new", m, node2_down, False, ["default/web"], False),
        ("no node left", m, web_down, False, ["default/web", "kube-system/dns"], False),
        ("all back", m, healthy, False, ["default/web"], False),
        ("new model", moved, healthy, False, None, False),
        ("resync", moved, healthy, True, None, False),
        ("refused", moved, node2_down, False, ["default/web"], True),
        ("repaired", moved, node2_down, False, ["default/web"], False),
    ]


async def scenario(fwd: NftForwarder, refuse: Callable[[bool], Awaitable[None]],
                   observe: Callable[[], Awaitable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Drive `fwd` as the agent's data-plane reconciler does: a change record from what the last successful apply
    got, none after a failure or for a new model. `refuse` turns nft's refusal on and off; `observe` adds what the
    caller sees of the kernel after each step."""
    applied: dict[str, tuple[Frontend, ...]] | None = None
    refusing = False
    out = []
    for name, m, health, force, services, refused in steps():
        if refused != refusing:
            await refuse(refused)
            refusing = refused
        p = plan(m, health)
        change = None if services is None or applied is None else FrontendChange.of(applied, p.by_service, services)
        result: dict[str, Any] = {"step": name}
        try:
            result["how"] = await fwd.apply(p.frontends, p.l4_vips, force=force, change=change)
        except NftError as exc:
            result["error"] = type(exc).__name__
            applied = None
        else:
            applied = dict(p.by_service)
        result["programmed"] = sorted(str(v) for v in fwd.programmed())
        out.append(result | await observe())
    return out


def inside(layout: str) -> None:
    """In the namespace: the real forwarder through the steps, printing each step's answer and the kernel's tables."""
    use_layout(layout)
    owner: asyncio.subprocess.Process | None = None

    def nft(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nft", *args], capture_output=True, text=True, check=False)

    async def until(predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 10
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            await asyncio.sleep(0.02)

    async def refuse(on: bool) -> None:
        nonlocal owner
        if on:
            # Someone deletes lbagent's table and takes its name with the owner flag: only that process may touch it.
            assert nft("delete", "table", "inet", TABLE).returncode == 0
            owner = await asyncio.create_subprocess_exec("nft", "-i", stdin=asyncio.subprocess.PIPE,
                                                         stdout=asyncio.subprocess.DEVNULL)
            assert owner.stdin is not None
            owner.stdin.write(f"add table inet {TABLE} {{ flags owner; }}\n".encode())
            await owner.stdin.drain()
            await until(lambda: "flags owner" in nft("list", "table", "inet", TABLE).stdout, "the owned table")
        else:
            assert owner is not None and owner.stdin is not None
            owner.stdin.close()  # the owner goes, and its table with it
            async with asyncio.timeout(10):
                await owner.wait()
            owner = None
            await until(lambda: nft("list", "table", "inet", TABLE).returncode != 0, "the owned table to go")

    async def observe() -> dict[str, Any]:
        listing = nft("-j", "list", "table", "inet", TABLE)
        tables = nft("-j", "list", "ruleset")  # with the shard tables
        return {"table": tables.stdout if listing.returncode == 0 and owner is None else None}

    async def main() -> list[dict[str, Any]]:
        try:
            return await scenario(NftForwarder(model.Dataplane(table=TABLE)), refuse, observe)
        finally:
            if owner is not None:
                owner.kill()
                await owner.wait()

    print(json.dumps(asyncio.run(main())))


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(render, "SHARD_FRONTENDS", render.SHARD_FRONTENDS)
    monkeypatch.setattr(apply, "WHOLE_APPLY_PROCESSES", apply.WHOLE_APPLY_PROCESSES)
    use_layout(request.param)
    return str(request.param)


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    with throwaway_netns("ffw", 3) as names:
        yield names


def test_the_fake_forwarder_keeps_the_real_ones_promises(namespaces: list[str], layout: str) -> None:
    real_ns, replay_ns, text_ns = namespaces
    real = run_python(real_ns, INSIDE, layout)

    fake = FakeForwarder(model.Dataplane(table=TABLE))

    async def refuse(on: bool) -> None:
        fake.fail = on

    async def observe() -> dict[str, Any]:
        return {"scripts": len(fake.scripts), "text": fake.text}

    faked = asyncio.run(scenario(fake, refuse, observe))

    answers = [{k: s.get(k) for k in ("step", "how", "error", "programmed")} for s in real]
    assert [{k: s.get(k) for k in ("step", "how", "error", "programmed")} for s in faked] == answers
    # the answers themselves: what the agent's tests rely on
    assert [s.get("how", s.get("error")) for s in real] == [
        "full", "delta", "unchanged", "delta", "delta", "delta", "full", "NftError", "full"]
    assert "192.0.2.10" not in next(s for s in real if s["step"] == "no node left")["programmed"]
    assert next(s for s in real if s["step"] == "refused")["programmed"] == []

    sent = 0
    for real_step, fake_step in zip(real, faked, strict=True):
        # what the fake would have sent, replayed in a kernel of its own: taken, and the same table
        for script in fake.scripts[sent:fake_step["scripts"]]:
            nft(replay_ns, "-f", "-", script=script)
        sent = fake_step["scripts"]
        if real_step["table"] is None:  # nft refused: the table belongs to someone else
            assert "error" in fake_step and fake_step["text"] == ""
            continue
        kernel = _canonical(real_step["table"])
        assert _canonical(nft(replay_ns, "-j", "list", "ruleset")) == kernel, real_step["step"]
        nft(text_ns, "-f", "-", script=fake_step["text"])
        assert _canonical(nft(text_ns, "-j", "list", "ruleset")) == kernel, real_step["step"]
    # only the full applies replaced the table; the health changes and the new model went as element changes
    assert sum(s.count(f"delete table inet {TABLE}\n") for s in fake.scripts) == 3
    if layout == "sharded":  # the real kernel held shard tables, and the fake replaced them side by side
        assert f'"name": "{TABLE}_shard2"' in real[0]["table"]
        assert sum(f"delete table inet {TABLE}_shard1\n" in s and f"delete table inet {TABLE}\n" not in s
                   for s in fake.scripts) == 3
