"""FakeBgpSpeaker's own workings: the API lines it renders, refusals, its simulated ExaBGP. The promises the real
speaker keeps too are in tests/contracts/bgp.py."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from ipaddress import ip_address

import pytest

from lbagent import model
from lbagent.l3.speaker import BgpCommandError, BgpNotConnected, BgpSpeaker, diff, sync
from lbagent.plan.services import Announcement
from tests.fakes import FakeBgpSpeaker

BGP = model.Bgp(
    local_as=64513,
    router_id=ip_address("198.51.100.2"),  # type: ignore[arg-type]
    peers=(model.Peer(address=ip_address("198.51.100.1"), peer_as=64512, hold_time=9),),
)
A = Announcement("192.0.2.10/32", med=10, communities=("64512:100",))
B = Announcement("192.0.2.11/32")
C = Announcement("192.0.2.12/32", local_pref=200)
V6 = Announcement("2001:db8::10/128")


def by_prefix(*announcements: Announcement) -> dict[str, Announcement]:
    return {a.prefix: a for a in announcements}


class Changes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def make() -> tuple[FakeBgpSpeaker, Changes]:
    changes = Changes()
    return FakeBgpSpeaker(BGP, changes), changes


def test_fake_is_a_bgp_speaker() -> None:
    speaker: BgpSpeaker = FakeBgpSpeaker(BGP)
    assert speaker.peers() == {"198.51.100.1": "unknown"}


def test_announce_then_diff() -> None:
    speaker, _ = make()

    async def scenario() -> None:
        await speaker.start()
        await speaker.apply(by_prefix(A, B))
        assert speaker.announced() == by_prefix(A, B)
        assert speaker.commands == [
            "neighbor 198.51.100.1 announce route 192.0.2.10/32 next-hop self med 10 community [64512:100]",
            "neighbor 198.51.100.1 announce route 192.0.2.11/32 next-hop self",
        ]
        speaker.commands.clear()
        await speaker.apply(by_prefix(A, B))
        assert speaker.commands == [], "an unchanged set sends nothing"
        changed_a = replace(A, med=20)
        await speaker.apply(by_prefix(changed_a, C))
        assert speaker.commands == [
            "neighbor 198.51.100.1 withdraw route 192.0.2.11/32",
            "neighbor 198.51.100.1 announce route 192.0.2.10/32 next-hop self med 20 community [64512:100]",
            "neighbor 198.51.100.1 announce route 192.0.2.12/32 next-hop self local-preference 200",
        ]
        assert speaker.announced() == by_prefix(changed_a, C)

    asyncio.run(scenario())


def test_refused_announcement_raises_and_is_not_announced() -> None:
    speaker, _ = make()
    speaker.refuse.add(B.prefix)

    async def scenario() -> None:
        with pytest.raises(BgpCommandError, match=r"192\.0\.2\.11/32"):
            await speaker.apply(by_prefix(A, B, C))
        assert speaker.announced() == by_prefix(A, C), "the others still went through"
        assert "neighbor 198.51.100.1 withdraw route 192.0.2.11/32" in speaker.commands
        speaker.refuse.clear()
        await speaker.apply(by_prefix(A, B, C))
        assert speaker.announced() == by_prefix(A, B, C)

    asyncio.run(scenario())


def test_disconnected_raises_and_reconnect_starts_empty() -> None:
    speaker, changes = make()

    async def scenario() -> None:
        await speaker.apply(by_prefix(A))
        speaker.disconnect()
        assert changes.count == 1
        assert speaker.announced() == {}
        assert speaker.peers() == {"198.51.100.1": "down"}
        with pytest.raises(BgpNotConnected):
            await speaker.apply(by_prefix(A))
        speaker.restart()
        assert changes.count == 2
        assert speaker.announced() == {}, "a new ExaBGP instance has announced nothing"
        await speaker.apply(by_prefix(A))
        assert speaker.announced() == by_prefix(A)

    asyncio.run(scenario())


def test_withdraw_all() -> None:
    speaker, _ = make()

    async def scenario() -> None:
        await speaker.apply(by_prefix(A, B))
        await speaker.withdraw_all()
        assert speaker.announced() == {}
        assert speaker.commands[-2:] == [
            "neighbor 198.51.100.1 withdraw route 192.0.2.10/32",
            "neighbor 198.51.100.1 withdraw route 192.0.2.11/32",
        ]

    asyncio.run(scenario())


def test_reconfigure_restarts_only_on_change_and_reannounces() -> None:
    speaker, changes = make()

    async def scenario() -> None:
        await speaker.apply(by_prefix(A))
        await speaker.reconfigure(BGP)
        assert speaker.restarts == 0
        await speaker.reconfigure(replace(BGP, graceful_restart=120))
        assert speaker.restarts == 1
        assert changes.count == 1
        assert speaker.announced() == by_prefix(A)

    asyncio.run(scenario())


def test_neighbor_state_reports_change() -> None:
    speaker, changes = make()
    speaker.set_peer_state("198.51.100.1", "up")
    assert speaker.peers() == {"198.51.100.1": "up"}
    assert changes.count == 1


def test_prefix_without_a_peer_of_its_family() -> None:
    speaker, _ = make()

    async def scenario() -> None:
        with pytest.raises(BgpCommandError, match="no IPv6 peer"):
            await speaker.apply(by_prefix(A, V6))
        assert speaker.announced() == by_prefix(A)

    asyncio.run(scenario())


def test_prefixes_go_to_the_peers_of_their_family() -> None:
    v6_peer = model.Peer(address=ip_address("2001:db8::1"), peer_as=64512, hold_time=9)
    speaker = FakeBgpSpeaker(replace(BGP, peers=(*BGP.peers, v6_peer)))

    async def scenario() -> None:
        await speaker.apply(by_prefix(B, V6))
        assert speaker.commands == [
            "neighbor 198.51.100.1 announce route 192.0.2.11/32 next-hop self",
            "neighbor 2001:db8::1 announce route 2001:db8::10/128 next-hop self",
        ]

    asyncio.run(scenario())


def test_bad_values_are_refused_before_anything_is_sent() -> None:
    speaker, _ = make()
    bad = Announcement("192.0.2.13/32", communities=("1:2\nwithdraw route 192.0.2.10/32",))

    async def scenario() -> None:
        with pytest.raises(ValueError):
            await speaker.apply(by_prefix(A, bad))
        with pytest.raises(ValueError):
            await speaker.apply({"192.0.2.99/32": A})
        assert speaker.commands == []

    asyncio.run(scenario())


def test_diff() -> None:
    assert diff(by_prefix(A, B), by_prefix(replace(A, med=1), C)) == ([B], [replace(A, med=1), C])
    assert diff(by_prefix(A), by_prefix(A)) == ([], [])


class SlowExaBgp:
    """`send` for `sync` that answers only when told: what a busy ExaBGP, or a busy agent, looks like from sync."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.answers: list[asyncio.Future[str]] = []

    async def send(self, line: str) -> None:
        self.sent.append(line)
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.answers.append(answer)
        if await answer != "done":
            raise BgpCommandError(f"ExaBGP answered error to: {line}")

    async def until_sent(self, count: int) -> None:
        for _ in range(1000):  # loop turns, not time: each waiting command sends as soon as it runs
            if len(self.sent) >= count:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"{len(self.sent)} commands sent, not {count}: sync waits for answers between them")


MANY = [Announcement(f"192.0.2.{20 + i}/32") for i in range(30)]


def test_sync_sends_every_command_before_the_first_answer_and_matches_answers_in_order() -> None:
    """One round trip per sync, not one per prefix: at ~2 s per answer from a busy ExaBGP, 50 VIPs announced one
    at a time took longer than the idle bench's 120 s."""
    exabgp = SlowExaBgp()
    announced = by_prefix(A)
    peers = [ip_address("198.51.100.1")]
    refused = MANY[7]

    async def scenario() -> None:
        task = asyncio.create_task(sync(announced, by_prefix(*MANY), peers, exabgp.send))
        await exabgp.until_sent(1 + len(MANY))
        assert exabgp.sent[0] == "neighbor 198.51.100.1 withdraw route 192.0.2.10/32", "withdrawals first"
        assert [line.split()[4] for line in exabgp.sent[1:]] == [a.prefix for a in MANY], "then in order"
        for index, answer in enumerate(exabgp.answers):
            answer.set_result("error" if index == 1 + MANY.index(refused) else "done")
        await exabgp.until_sent(2 + len(MANY))
        assert exabgp.sent[-1] == f"neighbor 198.51.100.1 withdraw route {refused.prefix}", "the refused one"
        exabgp.answers[-1].set_result("done")
        with pytest.raises(BgpCommandError, match=refused.prefix.replace(".", r"\.")):
            await task

    asyncio.run(scenario())
    assert announced == by_prefix(*(a for a in MANY if a is not refused))


def test_sync_that_loses_exabgp_midway_keeps_what_was_answered() -> None:
    exabgp = SlowExaBgp()
    announced: dict[str, Announcement] = {}
    peers = [ip_address("198.51.100.1")]

    async def scenario() -> None:
        task = asyncio.create_task(sync(announced, by_prefix(*MANY), peers, exabgp.send))
        await exabgp.until_sent(len(MANY))
        for answer in exabgp.answers[:10]:
            answer.set_result("done")
        for answer in exabgp.answers[10:]:
            answer.set_exception(BgpNotConnected("ExaBGP went away (API connection closed)"))
        with pytest.raises(BgpNotConnected, match="went away"):
            await task

    asyncio.run(scenario())
    assert announced == by_prefix(*MANY[:10]), "the answered ones, and no other"
