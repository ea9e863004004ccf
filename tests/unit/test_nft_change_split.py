"""The nftables forwarder's change path (lbagent.l4.nftables.apply: `_run_change`), in a network namespace this test
makes: every change, with new lookup tables and chains or with element changes only, goes over netlink in one batch;
after every change the kernel holds exactly what the whole ruleset written in one transaction holds. When the kernel
refuses the netlink batch, the change goes through libnftables and the kernel still ends there."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from collections.abc import Sequence
from typing import Any

import yaml

from lbagent import model
from lbagent.l4.change import FrontendChange
from lbagent.l4.nft import NftError
from lbagent.l4.nftables import netlink, render
from lbagent.l4.nftables.apply import NftForwarder
from lbagent.plan.services import Plan, all_healthy, plan, replan
from lbagent.sources.file import config
from tests.netns import run_python, throwaway_netns
from tests.unit.test_plan_render import THREE_NODES, _canonical

TABLE = "lbagent"
INSIDE = "import sys; from tests.unit.test_nft_change_split import inside; inside(int(sys.argv[1]))"


def _model() -> model.Model:
    doc = dict(THREE_NODES)
    doc["services"] = [*THREE_NODES["services"],
                       {"name": "masq", "vip": "192.0.2.13", "forwardingMode": "masquerade",
                        "ports": [{"port": 8080, "nodePort": 30088}]},
                       {"name": "web2", "vip": "192.0.2.14", "ports": [{"port": 80, "nodePort": 30082}]}]
    return config.parse(yaml.safe_dump(doc))


def _listing() -> Any:
    return _canonical(subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True,
                                     check=True).stdout)


class _Refusing(netlink.ElementSocket):
    """Refuses its next batch once `refuse` is set, as a kernel that says no would (nothing applied)."""

    refuse = False

    def apply(self, changes: Sequence[netlink.Change]) -> None:
        if _Refusing.refuse:
            _Refusing.refuse = False
            raise NftError("refused for the test")
        super().apply(changes)


def inside(shard_frontends: int) -> None:
    """In the namespace: each change's path and whether the kernel then holds what one whole transaction gives."""
    render.SHARD_FRONTENDS = shard_frontends
    m = _model()
    health = all_healthy(m)
    vias: list[str] = []

    class Watched(NftForwarder):
        async def _run_change(self, transaction: render.Transaction) -> str:
            via = await super()._run_change(transaction)
            vias.append(via)
            return via

    fwd = Watched(model.Dataplane(table=TABLE))
    fwd._elements = _Refusing()
    p = plan(m, health)
    asyncio.run(fwd.apply(p.frontends, p.l4_vips, force=True))

    def change(p: Plan, pairs: list[tuple[str, str]], refuse: bool = False) -> tuple[Plan, dict[str, Any]]:
        for pair in pairs:
            health[pair] = not health[pair]
        services = {s for s, _ in pairs}
        p2 = replan(p, m, health, services)
        vias.clear()
        tables_before = set(fwd.applied.tables) if fwd.applied is not None else set()
        _Refusing.refuse = refuse
        how = asyncio.run(fwd.apply(p2.frontends, p2.l4_vips, change=FrontendChange.of(p.by_service, p2.by_service,
                                                                                      services)))
        assert fwd.applied is not None
        got = _listing()
        whole = render.render_full(fwd.applied, stale=range(fwd.applied.shards, render.MAX_SHARDS))
        subprocess.run(["nft", "-f", "-"], input=whole, text=True, check=True)
        return p2, {"how": how, "via": list(vias), "as_one_transaction": got == _listing(), "refuse": refuse,
                    "new_tables": len(set(fwd.applied.tables) - tables_before)}

    steps: list[dict[str, Any]] = []
    rng = random.Random(3)
    services = [s.key for s in m.services]
    # node2 lost by each service in turn (the first of each kind needs a new lookup table), then back in turn
    # (the lookup tables of the nodes without node2 go when the last service leaves them)
    for step in [[(s, "node2")] for s in services] * 2 + [rng.sample(sorted(health), 2) for _ in range(12)]:
        p, out = change(p, step, refuse=not steps)
        steps.append(out)
    print(json.dumps(steps))


def test_every_change_goes_over_netlink_in_one_batch_and_leaves_what_one_whole_transaction_leaves() -> None:
    for shard_frontends in (2048, 2):  # one table; every service in a shard of its own, nearly
        with throwaway_netns("nfcs") as (name,):
            steps = run_python(name, INSIDE, str(shard_frontends))
        assert all(s["as_one_transaction"] and s["how"] == "delta" for s in steps), steps
        vias = [v for s in steps for v in s["via"]]
        # the first change (web loses node2: a new lookup table) refused over netlink: the rest through libnftables
        assert steps[0]["refuse"] and steps[0]["via"] == ["nft"], steps[0]
        # every other change over netlink, new lookup tables and chains among them (most changes in shards of 2: each
        # has its own; in one table most services find their lookup table there)
        assert vias[1:] == ["netlink"] * (len(vias) - 1), vias
        assert sum(s["new_tables"] > 0 for s in steps[1:]) >= 2, steps


SLOTS = "import sys; from tests.unit.test_nft_change_split import slots_inside; slots_inside()"


def slots_inside() -> None:
    """In the namespace: a large IPv6 lookup table (more than one message's worth of slots) declared over netlink;
    what nft lists."""
    subprocess.run(["nft", "-f", "-"], text=True, check=True, input="table inet t {\n}\n")
    slots = tuple(f"2001:db8::{i % 7 + 1}" for i in range(4099))
    sock = netlink.ElementSocket()
    try:
        sock.apply([netlink.NewLookupTable("t", "mg", 6, slots)])
    finally:
        sock.close()
    listed = json.loads(subprocess.run(["nft", "-j", "list", "map", "inet", "t", "mg"], capture_output=True,
                                       text=True, check=True).stdout)
    elements = next(o["map"]["elem"] for o in listed["nftables"] if "map" in o)
    print(json.dumps({"slots": {str(key): value for key, value in elements}}))


def test_a_large_lookup_table_goes_over_netlink_in_several_messages_of_one_batch() -> None:
    """4,099 IPv6 slots are 164 KB of elements; one message's element list holds 60 KB (its length is 16 bits)."""
    assert len(netlink._slot_elements(tuple(f"2001:db8::{i % 7 + 1}" for i in range(4099)))) == 3
    with throwaway_netns("nfsl") as (name,):
        got = run_python(name, SLOTS)["slots"]
    assert got == {str(i): f"2001:db8::{i % 7 + 1}" for i in range(4099)}
