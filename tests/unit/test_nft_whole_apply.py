"""The nftables forwarder's whole apply over shards (lbagent.l4.nftables.apply: `_replace`), in a network namespace
this test makes: the shard tables replaced side by side, one nft process per group, leave exactly what one
transaction leaves; it is done so only when every table keeps its services (the kernel's shards are the ruleset's,
or none is there); a kernel with another number of shards is brought to the new one in one transaction; a group the
kernel refuses fails the apply without stopping the others, and the next apply repairs the whole."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

from lbagent import model
from lbagent.l4.nft import NftError
from lbagent.l4.nftables import apply, render
from lbagent.l4.nftables.apply import NftForwarder
from lbagent.plan.services import all_healthy, plan
from tests.netns import run_python, throwaway_netns
from tests.unit.test_plan_render import _canonical, three_nodes

TABLE = "lbagent"
INSIDE = "from tests.unit.test_nft_whole_apply import inside; inside()"


def _listing() -> Any:
    """Every table in the namespace, canonical (no handles, elements sorted)."""
    return _canonical(subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True,
                                     check=True).stdout)


def _tables() -> list[str]:
    out = subprocess.run(["nft", "-j", "list", "tables", "inet"], capture_output=True, text=True, check=True).stdout
    return sorted(o["table"]["name"] for o in json.loads(out)["nftables"] if "table" in o)


def _handle(table: str) -> int:
    """The table's handle: a table replaced (deleted and made again) has a new one."""
    out = subprocess.run(["nft", "-j", "list", "tables", "inet"], capture_output=True, text=True, check=True).stdout
    return int(next(o["table"]["handle"] for o in json.loads(out)["nftables"]
                    if "table" in o and o["table"]["name"] == table))


def inside() -> None:
    """In the namespace: each step's path (side by side or one transaction), the tables after it, and whether the
    kernel holds exactly what one transaction of the same ruleset gives."""
    m = three_nodes()
    p = plan(m, all_healthy(m))
    dataplane = model.Dataplane(table=TABLE)
    paths: list[str] = []

    class Watched(NftForwarder):
        async def _run_side_by_side(self, scripts: list[str]) -> None:
            paths.append(f"side by side: {len(scripts)}")
            await super()._run_side_by_side(scripts)

        async def _run(self, script: str) -> None:
            if "delete table inet" in script:
                paths.append("one transaction")
            await super()._run(script)

    def step(fwd: NftForwarder, force: bool = False) -> dict[str, Any]:
        paths.clear()
        out: dict[str, Any] = {}
        try:
            out["how"] = asyncio.run(fwd.apply(p.frontends, p.l4_vips, force=force))
        except NftError as exc:
            out["error"] = str(exc)
        out |= {"paths": list(paths), "tables": _tables(), "known": fwd.applied is not None}
        if "how" in out:
            assert fwd.applied is not None
            got = _listing()
            script = render.render_full(fwd.applied, stale=range(fwd.applied.shards, render.MAX_SHARDS))
            subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)
            out["as_one_transaction"] = got == _listing()
        return out

    steps = []
    render.SHARD_FRONTENDS = 2  # the test model's services over several shards
    apply.WHOLE_APPLY_PROCESSES = 2
    fwd = Watched(dataplane)
    steps.append(step(fwd))  # nothing there
    steps.append(step(fwd, force=True))  # a resync: the same shards
    steps.append(step(Watched(dataplane)))  # a restarted agent: unknown, but the kernel's are the same
    render.SHARD_FRONTENDS = 3  # fewer shards for the same frontends: services move between tables
    steps.append(step(Watched(dataplane)))
    # another process takes one shard table's name with the owner flag: nft may not touch that table
    victim = render.shard_table(TABLE, render.shard_count(len(p.frontends)) - 1)
    subprocess.run(["nft", "delete", "table", "inet", victim], check=True)
    owner = subprocess.Popen(["nft", "-i"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert owner.stdin is not None
        owner.stdin.write(f"add table inet {victim} {{ flags owner; }}\n")
        owner.stdin.flush()
        deadline = time.monotonic() + 10
        while "flags owner" not in subprocess.run(["nft", "list", "table", "inet", victim], capture_output=True,
                                                  text=True, check=False).stdout:
            assert time.monotonic() < deadline, "the owned table"
            time.sleep(0.02)
        fwd = Watched(dataplane)
        main_before = _handle(TABLE)
        refused = step(fwd, force=True)
        steps.append(refused | {"victim": victim, "main_replaced": _handle(TABLE) != main_before})
        owner.stdin.close()
        owner.wait(timeout=10)
    finally:
        owner.kill()
    steps.append(step(fwd))  # the owner gone: the next apply repairs
    print(json.dumps(steps))


def test_shards_replaced_side_by_side_leave_what_one_transaction_leaves() -> None:
    with throwaway_netns("nfwa") as (name,):
        steps = run_python(name, INSIDE)
    m = three_nodes()
    frontends = len(plan(m, all_healthy(m)).frontends)
    many, fewer = -(-frontends // 2), -(-frontends // 3)
    assert many > fewer > 1
    fresh, resync, restarted, resharded, refused, repaired = steps
    for s in (fresh, resync, restarted):
        assert s["paths"] == ["side by side: 2"] and s["how"] == "full" and s["as_one_transaction"], s
        assert s["tables"] == sorted(render.shard_table(TABLE, i) for i in range(many)), s
    assert resharded["paths"] == ["one transaction"] and resharded["as_one_transaction"], resharded
    assert resharded["tables"] == sorted(render.shard_table(TABLE, i) for i in range(fewer)), resharded
    # one group refused: the apply fails, the forwarder no longer claims to know the kernel; the other group is in
    assert refused["paths"] == ["side by side: 2"] and "error" in refused and not refused["known"], refused
    assert refused["victim"] in refused["tables"] and refused["main_replaced"], refused
    assert repaired["how"] == "full" and repaired["as_one_transaction"] and repaired["known"], repaired
    assert repaired["tables"] == resharded["tables"], repaired
