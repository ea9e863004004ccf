"""The BgpSpeaker contract: announce, change and withdraw as `announced()` and the router say; peers' states; a
crashed speaker's loss noticed, refused commands meanwhile, a new instance that starts empty; reconfigure restarts
only on a change; a stopped speaker refuses. Real: ExaBgpSpeaker with ExaBGP and BIRD (tests/integration/
test_contract_bgp.py); fake: FakeBgpSpeaker (tests/unit/test_contracts.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from ipaddress import ip_address
from typing import Protocol

import pytest

from lbagent import model
from lbagent.l3.speaker import BgpCommandError, BgpError, BgpNotConnected, BgpSpeaker
from lbagent.plan.services import Announcement
from tests.fakes import FakeBgpSpeaker

A = Announcement("192.0.2.10/32", med=10, communities=("64512:100",))
B = Announcement("192.0.2.11/32")
C = Announcement("192.0.2.12/32", med=30)
V6 = Announcement("2001:db8::10/128")


def by_prefix(*announcements: Announcement) -> dict[str, Announcement]:
    return {a.prefix: a for a in announcements}


class World(Protocol):
    """A speaker (started) with one IPv4 peer, the router, and what happens to them."""

    speaker: BgpSpeaker
    bgp: model.Bgp  # the settings it was started with

    @property
    def router(self) -> str:
        """The peer's address."""

    @property
    def seen(self) -> list[str]:
        """The router's state as `peers()` gave it at each on_change call so far."""

    async def session_up(self) -> None:
        """Until the router's session is up."""

    async def router_holds(self, prefixes: set[str]) -> None:
        """Until the router holds exactly `prefixes` from the speaker (AssertionError at a deadline)."""

    async def crash(self) -> None:
        """The daemon behind the speaker dies; returns once the speaker has noticed (on_change called)."""

    async def recovered(self) -> None:
        """Until a new daemon instance is connected."""


async def eventually(what: str, predicate: Callable[[], object], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def announce_change_withdraw(w: World) -> None:
    await w.session_up()
    await w.speaker.apply(by_prefix(A, B))
    assert w.speaker.announced() == by_prefix(A, B)
    await w.router_holds({A.prefix, B.prefix})
    changed = replace(A, med=20)
    await w.speaker.apply(by_prefix(changed, C))
    assert w.speaker.announced() == by_prefix(changed, C), "attributes changed, B gone, C new"
    await w.router_holds({A.prefix, C.prefix})
    await w.speaker.withdraw_all()
    assert w.speaker.announced() == {}
    await w.router_holds(set())


async def peers_report_the_session(w: World) -> None:
    assert set(w.speaker.peers()) == {w.router}, "every configured peer, by address"
    await w.session_up()
    assert w.speaker.peers()[w.router] == "up"
    assert "up" in w.seen, "on_change fires when a session comes up"


async def prefix_without_a_peer_of_its_family_is_refused(w: World) -> None:
    await w.session_up()
    with pytest.raises(BgpCommandError, match="no IPv6 peer"):
        await w.speaker.apply(by_prefix(A, V6))
    assert w.speaker.announced() == by_prefix(A), "the others still went through"
    await w.router_holds({A.prefix})


async def crash_is_noticed_and_a_new_instance_starts_empty(w: World) -> None:
    await w.session_up()
    await w.speaker.apply(by_prefix(A))
    await w.router_holds({A.prefix})
    before, restarts = len(w.seen), w.speaker.restarts
    await w.crash()
    assert w.speaker.announced() == {}, "nothing is announced by a dead instance"
    assert w.speaker.peers()[w.router] != "up"
    assert "down" in w.seen[before:], "on_change fires with the session down: the agent applies again"
    with pytest.raises(BgpNotConnected):
        await w.speaker.apply(by_prefix(A))
    await w.recovered()
    assert w.speaker.restarts == restarts + 1
    assert w.speaker.announced() == {}, "a new instance has announced nothing yet"
    await w.speaker.apply(by_prefix(A, B))  # what the agent does on on_change
    assert w.speaker.announced() == by_prefix(A, B)
    await w.session_up()
    await w.router_holds({A.prefix, B.prefix})


async def reconfigure_restarts_only_on_a_change_and_announces_again(w: World) -> None:
    await w.session_up()
    await w.speaker.apply(by_prefix(A))
    restarts = w.speaker.restarts
    await w.speaker.reconfigure(w.bgp)
    assert w.speaker.restarts == restarts, "the same settings: no session reset"
    peer = replace(w.bgp.peers[0], hold_time=w.bgp.peers[0].hold_time + 3)
    await w.speaker.reconfigure(replace(w.bgp, peers=(peer,)))
    assert w.speaker.restarts == restarts + 1
    assert w.speaker.announced() == by_prefix(A), "announced again by the new instance"
    await w.session_up()
    await w.router_holds({A.prefix})


async def reconfigure_refuses_bad_settings_and_keeps_running(w: World) -> None:
    await w.session_up()
    await w.speaker.apply(by_prefix(A))
    restarts = w.speaker.restarts
    bad = replace(w.bgp, peers=(replace(w.bgp.peers[0], hold_time=1),))
    with pytest.raises(ValueError, match="hold-time"):
        await w.speaker.reconfigure(bad)
    assert w.speaker.restarts == restarts and w.speaker.announced() == by_prefix(A)
    await w.router_holds({A.prefix})


async def stopped_speaker_refuses(w: World) -> None:
    await w.session_up()
    await w.speaker.apply(by_prefix(A))
    await w.router_holds({A.prefix})
    await w.speaker.stop()
    assert w.speaker.announced() == {}
    assert w.speaker.peers()[w.router] != "up"
    with pytest.raises(BgpError):
        await w.speaker.apply(by_prefix(A, B))
    await w.router_holds(set())


CONTRACT: list[Callable[[World], Awaitable[None]]] = [
    announce_change_withdraw,
    peers_report_the_session,
    prefix_without_a_peer_of_its_family_is_refused,
    crash_is_noticed_and_a_new_instance_starts_empty,
    reconfigure_restarts_only_on_a_change_and_announces_again,
    reconfigure_refuses_bad_settings_and_keeps_running,
    stopped_speaker_refuses,
]


# ---- the fake's world -------------------------------------------------------------------------------------------

FAKE_BGP = model.Bgp(
    local_as=64513,
    router_id=ip_address("198.51.100.2"),  # type: ignore[arg-type]
    peers=(model.Peer(address=ip_address("198.51.100.1"), peer_as=64512, hold_time=9),),
)


class FakeWorld:
    """FakeBgpSpeaker, and the test playing ExaBGP, the router and the supervisor. There is no router: what the fake
    has acknowledged while the session is up is what a router would hold."""

    def __init__(self) -> None:
        self.bgp = FAKE_BGP
        self.seen: list[str] = []
        self.fake = FakeBgpSpeaker(FAKE_BGP, lambda: self.seen.append(self.fake.peers()[self.router]))
        self.speaker: BgpSpeaker = self.fake

    @property
    def router(self) -> str:
        return str(self.bgp.peers[0].address)

    async def session_up(self) -> None:
        if self.fake.connected and self.fake.peers()[self.router] != "up":
            self.fake.set_peer_state(self.router, "up")
        assert self.fake.peers()[self.router] == "up", "no session without a connected speaker"

    async def router_holds(self, prefixes: set[str]) -> None:
        held = set(self.fake.announced()) if self.fake.peers()[self.router] == "up" else set()
        assert held == prefixes

    async def crash(self) -> None:
        self.fake.disconnect()

    async def recovered(self) -> None:
        self.fake.restart()
