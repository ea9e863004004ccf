"""The BgpSpeaker contract (tests/contracts/bgp.py) kept by ExaBgpSpeaker: a real ExaBGP, run by the supervisor, in
one network namespace, and BIRD 2 in another (bird_lab.py); what the router holds is what `birdc show route` lists.
Needs root, ip, bird, birdc and exabgp (a missing one fails the test)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

import pytest

from lbagent.l3.speaker import BgpSpeaker, ExaBgpSpeaker
from tests.contracts import bgp
from tests.integration.bird_lab import ROUTER, Lab, bgp_settings, until

pytestmark = pytest.mark.lab


class ExaBgpWorld:
    """ExaBgpSpeaker with one peer, BIRD. Its backoff is long enough (3 s) that a crashed instance is surely not
    back when the contract tries a command."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.bgp = bgp_settings()
        self.seen: list[str] = []
        self.exabgp = ExaBgpSpeaker(self.bgp, str(lab.workdir / "run"),
                                    lambda: self.seen.append(self.exabgp.peers()[self.router]), backoff=(3.0, 10.0))
        self.speaker: BgpSpeaker = self.exabgp
        self._crashed: int | None = None

    @property
    def router(self) -> str:
        return str(ROUTER)

    async def session_up(self) -> None:
        await until("the BGP session", lambda: self.speaker.peers()[self.router] == "up", timeout=30)

    async def router_holds(self, prefixes: set[str]) -> None:
        held: set[str] = set()

        def holds() -> bool:
            nonlocal held
            held = self.lab.bird_prefixes()
            return held == prefixes

        try:
            await until(f"BIRD to hold {sorted(prefixes)}", holds, timeout=15)
        except AssertionError as error:
            raise AssertionError(f"{error}; it holds {sorted(held)}") from None

    async def crash(self) -> None:
        pid = self.exabgp.exabgp_pid
        assert pid is not None
        before = len(self.seen)
        os.kill(pid, signal.SIGKILL)
        await until("the speaker to notice", lambda: self.exabgp.exabgp_pid != pid and len(self.seen) > before)
        self._crashed = pid

    async def recovered(self) -> None:
        pid = await until("a new ExaBGP", lambda: self.exabgp.exabgp_pid not in (None, self._crashed)
                          and self.exabgp.exabgp_pid, timeout=30)
        self.lab.exabgp_pids.add(pid)
        assert await self.exabgp.wait_connected(15), "the new ExaBGP's API connected"


@pytest.mark.parametrize("promise", bgp.CONTRACT, ids=lambda f: f.__name__)
def test_exabgp_speaker_keeps_the_contract(lab: Lab, promise: Callable[[bgp.World], Awaitable[None]]) -> None:
    lab.start_bird()

    async def main() -> None:
        world = ExaBgpWorld(lab)
        try:
            await world.speaker.start()
            if world.exabgp.exabgp_pid is not None:
                lab.exabgp_pids.add(world.exabgp.exabgp_pid)
            await promise(world)
        finally:
            await world.speaker.stop()

    with lab.inside_speaker():
        asyncio.run(main())
