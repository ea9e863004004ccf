"""The contracts of tests/contracts against the fakes the agent's unit tests use (the real layers keep them in
tests/integration): FakeBgpSpeaker as a BgpSpeaker, FakeProxy as a ProxyLayer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.contracts import bgp, proxy
from tests.unit.test_haproxy_apply import make_certificate


@pytest.mark.parametrize("promise", bgp.CONTRACT, ids=lambda f: f.__name__)
def test_fake_bgp_speaker_keeps_the_contract(promise: Callable[[bgp.World], Awaitable[None]]) -> None:
    async def scenario() -> None:
        world = bgp.FakeWorld()
        await world.speaker.start()
        try:
            await promise(world)
        finally:
            await world.speaker.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("promise", proxy.CONTRACT, ids=lambda f: f.__name__)
def test_fake_proxy_keeps_the_contract(promise: Callable[[proxy.World], Awaitable[None]]) -> None:
    async def scenario() -> None:
        world = proxy.FakeWorld(lambda serial: make_certificate("www.example", serial))
        try:
            await promise(world)
        finally:
            await world.proxy.stop(1.0)

    asyncio.run(scenario())
