"""Run one data plane's forwarder in this network namespace, driven by JSON lines on stdin."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from typing import Any

from lbagent import model
from lbagent.l3.vips import apply_sysctls
from lbagent.l4.change import FrontendChange
from lbagent.l4.forwarder import Forwarder, make_forwarder
from lbagent.l4.nftables import render as nftables_render
from lbagent.plan.services import IPVS_SYSCTLS, Frontend
from tests.dataplane.frontends import by_service, load

PROTOCOL = """\
Usage: ip netns exec NS python -m tests.dataplane.apply --kind K, then one JSON request per line, one answer each:
  {"op": "apply", "frontends": [...], "vips": [...], "force": false, "changed": ["ns/name", ...] or null}
      -> {"ok": true, "how": "full", "programmed": ["192.0.2.10", ...]}
  {"op": "cleanup"} -> {"ok": true}
  failures -> {"ok": false, "error": "..."}
The forwarder object lives as long as the process, so its delta and update paths run as in the agent: "changed"
names the services whose frontends changed, and this process makes the change record from what it last applied,
as the agent's data-plane reconciler does (none after a failed apply: the next one is full).
"""

# The data planes the suite knows, by the name tests are parameterized with.
DATAPLANES: dict[str, model.Dataplane] = {
    "nftables": model.Dataplane(kind=model.DataplaneKind.NFTABLES),
    # nftables with its dispatch spread over shard tables as at scale (see forwarder())
    "nftables-sharded": model.Dataplane(kind=model.DataplaneKind.NFTABLES),
    "iptables": model.Dataplane(kind=model.DataplaneKind.IPTABLES, iptables_variant="nft"),
    "iptables-legacy": model.Dataplane(kind=model.DataplaneKind.IPTABLES, iptables_variant="legacy"),
    "ipvs": model.Dataplane(kind=model.DataplaneKind.IPVS),
}


def forwarder(kind: str, size: int | None = None) -> Forwarder:
    dataplane = DATAPLANES[kind]
    if kind == "nftables-sharded":
        # Five shards whatever the number of frontends: the suite's services (default/web, kube-system/dns) are
        # then in shard tables of their own (4 and 2), none in lbagent's main table.
        assert {nftables_render.shard_of_service(s, 5) for s in ("default/web", "kube-system/dns")} == {4, 2}
        nftables_render.shard_count = lambda frontends, previous=None: 5
    if size is not None:
        dataplane = dataplane_with(dataplane, maglev_table_size=size)
    fwd = make_forwarder(dataplane)
    if dataplane.kind is model.DataplaneKind.IPVS:
        apply_sysctls(IPVS_SYSCTLS)  # what the agent sets before its first apply (ip_vs is loaded by now)
    return fwd


def dataplane_with(dataplane: model.Dataplane, **changes: Any) -> model.Dataplane:
    return dataclasses.replace(dataplane, **changes)


class Driver:
    """One forwarder and the record of what it was last given, by service (the agent's data-plane reconciler's
    part): what a request's "changed" services were before."""

    def __init__(self, fwd: Forwarder) -> None:
        self.fwd = fwd
        self.applied: dict[str, tuple[Frontend, ...]] | None = None
        self.vips: list[model.IPAddress] = []

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "apply":
            frontends, vips = load(request)
            keys = request.get("changed")
            current = by_service(frontends, {f.service for f in frontends})
            change = None
            if keys is not None and self.applied is not None and vips == self.vips:
                change = FrontendChange.of(self.applied, current, keys)
            self.applied = None  # unknown until the apply succeeds
            how = await self.fwd.apply(frontends, vips, force=bool(request.get("force")), change=change)
            self.applied, self.vips = current, vips
            return {"ok": True, "how": how, "programmed": sorted(str(v) for v in self.fwd.programmed())}
        if op == "cleanup":
            await self.fwd.cleanup()
            self.applied = None
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=PROTOCOL,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, choices=sorted(DATAPLANES))
    parser.add_argument("--size", type=int, help="maglevTableSize (default: the model's)")
    args = parser.parse_args(argv)
    loop = asyncio.new_event_loop()
    fwd: Driver | Exception
    try:
        fwd = Driver(forwarder(args.kind, args.size))
    except Exception as exc:  # a data plane not built yet: every request says so
        fwd = exc
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                if isinstance(fwd, Exception):
                    raise fwd
                answer = loop.run_until_complete(fwd.handle(json.loads(line)))
            except Exception as exc:  # the caller decides: an answer per request, never a dead pipe
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
