"""ExaBgpSpeaker against a real ExaBGP and BIRD 2 (the lab: bird_lab.py): routes must show up in the router's kernel
table. What the agent relies on, the fake speaker too, is in tests/contracts/bgp.py (test_contract_bgp.py)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import sys
import termios
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from lbagent import model
from lbagent.l3 import render
from lbagent.l3.speaker import BgpError, BgpNotConnected, ExaBgpSpeaker
from lbagent.plan.services import Announcement
from tests.integration.bird_lab import HOLD, ROUTER, SPEAKER, Lab, bgp_settings, host, until

pytestmark = pytest.mark.lab


def by_prefix(*announcements: Announcement) -> dict[str, Announcement]:
    return {a.prefix: a for a in announcements}


def with_speaker(
    lab: Lab,
    bgp: model.Bgp,
    body: Callable[[ExaBgpSpeaker, list[str]], Awaitable[None]],
    **options: float,
) -> None:
    """Run `body` with a started speaker in the speaker namespace; stop it whatever happens.

    `body` also gets the router's state as seen by the speaker at every on_change call.
    """
    changes: list[str] = []

    async def main() -> None:
        speaker = ExaBgpSpeaker(
            bgp,
            str(lab.workdir / "run"),
            on_change=lambda: changes.append(speaker.peers()[str(ROUTER)]),
            **options,  # type: ignore[arg-type]
        )
        try:
            await speaker.start()
            if speaker.exabgp_pid is not None:
                lab.exabgp_pids.add(speaker.exabgp_pid)
            await body(speaker, changes)
        finally:
            await speaker.stop()

    with lab.inside_speaker():
        asyncio.run(main())


A = Announcement("192.0.2.10/32", med=10, communities=("64512:100",))
B = Announcement("192.0.2.11/32")
C = Announcement("192.0.2.12/32", med=30)


def test_announce_diff_withdraw(lab: Lab) -> None:
    lab.start_bird()

    async def body(speaker: ExaBgpSpeaker, changes: list[str]) -> None:
        await until("the session", lambda: speaker.peers()[str(ROUTER)] == "up")
        assert changes, "on_change fires on connect and on neighbor state changes"

        started = time.monotonic()
        await speaker.apply(by_prefix(A, B))
        assert speaker.announced() == by_prefix(A, B)
        await until("A and B in the kernel", lambda: {host(A.prefix), host(B.prefix)} <= lab.routes().keys())
        print(f"apply -> routes in the router's kernel: {time.monotonic() - started:.3f} s")
        assert lab.routes()[host(A.prefix)] == {str(SPEAKER)}
        detail = lab.birdc("show", "route", "all", A.prefix)
        assert "BGP.med: 10" in detail
        assert "(64512,100)" in detail

        changed_a = replace(A, med=20)
        await speaker.apply(by_prefix(changed_a, C))
        assert speaker.announced() == by_prefix(changed_a, C)
        await until(
            "B gone, C in", lambda: host(B.prefix) not in lab.routes() and host(C.prefix) in lab.routes()
        )
        await until(
            "A's new MED at the router", lambda: "BGP.med: 20" in lab.birdc("show", "route", "all", A.prefix)
        )

        started = time.monotonic()
        await speaker.apply(by_prefix(changed_a))
        await until("C withdrawn", lambda: host(C.prefix) not in lab.routes())
        print(f"withdraw -> route gone: {(time.monotonic() - started) * 1000:.0f} ms")
        assert host(A.prefix) in lab.routes()

    with_speaker(lab, bgp_settings(), body)


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def test_a_sync_sends_every_announcement_before_exabgp_answers_one(lab: Lab) -> None:
    """One round trip per sync, not one per prefix (at ~2 s per answer from a busy ExaBGP, 50 VIPs sent one at a
    time outlasted the idle bench's 120 s). ExaBGP is stopped: every announcement must still reach its API pipe."""
    lab.start_bird()
    many = [Announcement(f"192.0.2.{100 + i}/32", med=i) for i in range(50)]

    async def body(speaker: ExaBgpSpeaker, changes: list[str]) -> None:
        await until("the session", lambda: speaker.peers()[str(ROUTER)] == "up")
        exabgp = speaker.exabgp_pid
        assert exabgp is not None
        children = _children(exabgp)
        assert len(children) == 1, f"ExaBGP's one API process (the bridge), not {children}"
        # the bridge's stdout is ExaBGP's API pipe: what waits in it was sent and not read by ExaBGP yet
        pipe = os.open(f"/proc/{children[0]}/fd/1", os.O_RDONLY | os.O_NONBLOCK)
        sent = sum(len(render.announce_command(a, [ROUTER])) + 1 for a in many)

        def waiting() -> int:
            return int(struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"\0" * 4))[0])

        os.kill(exabgp, signal.SIGSTOP)
        try:
            applying = asyncio.create_task(speaker.apply(by_prefix(*many)))
            await until(f"{sent} bytes of commands waiting for ExaBGP (a sync that waits for each answer sends one)",
                        lambda: waiting() >= sent)
            assert waiting() == sent
        finally:
            os.kill(exabgp, signal.SIGCONT)
            os.close(pipe)
        await applying
        assert speaker.announced() == by_prefix(*many)
        await until("the 50 in the router's kernel", lambda: {host(a.prefix) for a in many} <= lab.routes().keys())

    with_speaker(lab, bgp_settings(), body)


def test_router_session_flap_gets_routes_again(lab: Lab) -> None:
    lab.start_bird()

    async def body(speaker: ExaBgpSpeaker, changes: list[str]) -> None:
        await speaker.apply(by_prefix(A))
        await until("A in the kernel", lambda: host(A.prefix) in lab.routes())
        seen = len(changes)
        lab.birdc("restart", "speaker")
        await until(
            "the session to go down and up", lambda: changes[seen:].count("up") and "down" in changes[seen:]
        )
        # ExaBGP re-sends its adj-rib-out: nobody had to apply again.
        await until("A back in the kernel", lambda: host(A.prefix) in lab.routes())
        assert speaker.announced() == by_prefix(A)

    with_speaker(lab, bgp_settings(), body)


def test_killed_exabgp_is_restarted_and_routes_come_back(lab: Lab) -> None:
    lab.start_bird()
    desired = by_prefix(A, B)

    async def body(speaker: ExaBgpSpeaker, changes: list[str]) -> None:
        await speaker.apply(desired)
        await until("A and B in the kernel", lambda: {host(A.prefix), host(B.prefix)} <= lab.routes().keys())
        first = speaker.exabgp_pid
        assert first is not None
        seen = len(changes)

        os.kill(first, signal.SIGKILL)
        await until("the loss noticed", lambda: speaker.announced() == {} and len(changes) > seen)
        await until("the routes withdrawn by the router", lambda: not lab.routes(), timeout=HOLD + 2)
        second = await until(
            "a new ExaBGP", lambda: speaker.exabgp_pid if speaker.exabgp_pid != first else None
        )
        lab.exabgp_pids.add(second)
        assert speaker.restarts == 1
        assert await speaker.wait_connected(15)
        assert speaker.announced() == {}, "a new instance has announced nothing yet"

        # What the agent does on on_change: apply its desired set again.
        await speaker.apply(desired)
        await until("A and B back", lambda: {host(A.prefix), host(B.prefix)} <= lab.routes().keys())
        assert speaker.announced() == desired

    with_speaker(lab, bgp_settings(), body)


def test_graceful_restart_keeps_the_routes_through_an_exabgp_restart(lab: Lab) -> None:
    """With graceful restart the router keeps the routes of a killed ExaBGP (marked stale) while a new one comes
    up; lbagent sends End-of-RIB only after announcing again, so the router never loses them. The data plane
    of an LB node goes on forwarding meanwhile: a control-plane crash costs no traffic."""
    lab.start_bird()
    desired = by_prefix(A, B)
    bgp = replace(bgp_settings(), graceful_restart=30)

    async def body(speaker: ExaBgpSpeaker, changes: list[str]) -> None:
        await until("the session", lambda: speaker.peers()[str(ROUTER)] == "up")
        await speaker.apply(desired)
        await until("A and B in the kernel", lambda: {host(A.prefix), host(B.prefix)} <= lab.routes().keys())
        first = speaker.exabgp_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        second = await until("a new ExaBGP", lambda: speaker.exabgp_pid if speaker.exabgp_pid != first else None)
        lab.exabgp_pids.add(second)
        samples = 0
        while speaker.peers()[str(ROUTER)] != "up" or speaker.exabgp_pid != second:
            assert {host(A.prefix), host(B.prefix)} <= lab.routes().keys(), "a route left the router's table"
            samples += 1
            assert samples < 1500, "the new session did not come up within 30 s"
            await asyncio.sleep(0.02)
        # The router holds them as long as the agent takes to announce again (here: a second on purpose).
        held_until = time.monotonic() + 1.0
        while time.monotonic() < held_until:
            assert {host(A.prefix), host(B.prefix)} <= lab.routes().keys(), "End-of-RIB came before the routes"
            await asyncio.sleep(0.02)
        assert "Neighbor graceful restart active" in lab.birdc("show", "protocols", "all", "speaker")
        # What the agent does on on_change: apply its desired set again; End-of-RIB follows it.
        await speaker.apply(desired)
        await until("the restart ended by End-of-RIB",
                    lambda: "graceful restart active" not in lab.birdc("show", "protocols", "all", "speaker"))
        assert {host(A.prefix), host(B.prefix)} <= lab.routes().keys()
        # and End-of-RIB ends the restart for what is not announced again: C, announced before a second kill
        # and not after, goes
        await speaker.apply(by_prefix(A, B, C))
        await until("C in the kernel", lambda: host(C.prefix) in lab.routes())
        os.kill(second, signal.SIGKILL)
        third = await until("a third ExaBGP", lambda: speaker.exabgp_pid if speaker.exabgp_pid not in (second, None)
                            else None)
        lab.exabgp_pids.add(third)
        await until("the session again", lambda: speaker.peers()[str(ROUTER)] == "up" and speaker.exabgp_pid == third,
                    timeout=30)
        assert host(C.prefix) in lab.routes(), "kept through the restart"
        await speaker.apply(desired)
        await until("C gone at End-of-RIB", lambda: host(C.prefix) not in lab.routes())
        assert {host(A.prefix), host(B.prefix)} <= lab.routes().keys()

    with_speaker(lab, bgp, body)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid
            ):
                found.append(int(entry.name))
    return found


def test_killed_bridge_restarts_exabgp(lab: Lab) -> None:
    lab.start_bird()

    async def body(speaker: ExaBgpSpeaker, changes: list[str]) -> None:
        await speaker.apply(by_prefix(A))
        first = speaker.exabgp_pid
        assert first is not None
        (bridge,) = children(first)
        os.kill(bridge, signal.SIGKILL)
        # The link to ExaBGP is gone, so ExaBGP cannot be trusted to match announced(): restart it.
        second = await until(
            "a new ExaBGP", lambda: speaker.exabgp_pid not in (first, None) and speaker.exabgp_pid
        )
        lab.exabgp_pids.add(second)
        assert await speaker.wait_connected(15)
        assert speaker.announced() == {}
        await speaker.apply(by_prefix(A))
        await until("A in the kernel", lambda: host(A.prefix) in lab.routes())

    with_speaker(lab, bgp_settings(), body)


def test_unanswered_command_restarts_exabgp(lab: Lab) -> None:
    lab.start_bird()

    async def body(speaker: ExaBgpSpeaker, changes: list[str]) -> None:
        await speaker.apply(by_prefix(A))
        hung = speaker.exabgp_pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(BgpNotConnected, match="no answer"):
            await speaker.apply(by_prefix(A, B))
        # it waited for its answer timeout (1 s), and then gave up (the bound only catches a hang)
        assert 1.0 <= time.monotonic() - started < 30
        assert speaker.announced() == {}
        # SIGTERM stays pending on a stopped process: the speaker has to escalate to SIGKILL.
        second = await until(
            "a new ExaBGP", lambda: speaker.exabgp_pid not in (hung, None) and speaker.exabgp_pid
        )
        lab.exabgp_pids.add(second)
        assert not alive(hung)
        assert await speaker.wait_connected(15)
        await speaker.apply(by_prefix(A, B))
        await until("A and B in the kernel", lambda: {host(A.prefix), host(B.prefix)} <= lab.routes().keys())

    with_speaker(lab, bgp_settings(), body, ack_timeout=1.0, stop_timeout=1.0)


def test_missing_exabgp_is_retried_not_fatal(lab: Lab) -> None:
    async def body(speaker: ExaBgpSpeaker, changes: list[str]) -> None:
        assert speaker.exabgp_pid is None
        with pytest.raises(BgpNotConnected):
            await speaker.apply(by_prefix(A))

    with_speaker(lab, replace(bgp_settings(), exabgp="/nonexistent/exabgp"), body, connect_timeout=0.5)


def test_md5_and_reconfigure(lab: Lab) -> None:
    lab.start_bird(password="s3cr et;#x")

    async def body(speaker: ExaBgpSpeaker, changes: list[str]) -> None:
        # ExaBGP acknowledges into its RIB even while the session is down.
        await speaker.apply(by_prefix(A))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert speaker.peers()[str(ROUTER)] != "up", "a session without the password must not come up"
            await asyncio.sleep(0.1)
        assert not lab.routes()

        pid = speaker.exabgp_pid
        await speaker.reconfigure(bgp_settings(password="wrong"))
        assert speaker.exabgp_pid == pid, "unchanged settings do not restart ExaBGP"

        await speaker.reconfigure(bgp_settings(password="s3cr et;#x"))
        assert speaker.exabgp_pid not in (pid, None)
        lab.exabgp_pids.add(speaker.exabgp_pid)  # type: ignore[arg-type]
        assert speaker.announced() == by_prefix(A), "reconfigure re-announces"
        await until("the MD5 session", lambda: speaker.peers()[str(ROUTER)] == "up")
        await until("A in the kernel", lambda: host(A.prefix) in lab.routes())

    with_speaker(lab, bgp_settings(password="wrong"), body)


def test_withdraw_all_and_stop(lab: Lab) -> None:
    lab.start_bird()
    pids: list[int] = []

    async def body(speaker: ExaBgpSpeaker, changes: list[str]) -> None:
        await speaker.apply(by_prefix(A, B, C))
        await until("all three", lambda: len(lab.routes()) == 3)
        await speaker.withdraw_all()
        assert speaker.announced() == {}
        await until("all gone", lambda: not lab.routes())
        pid = speaker.exabgp_pid
        assert pid is not None
        pids.append(pid)

    with_speaker(lab, bgp_settings(), body)
    assert not alive(pids[0]), "stop() leaves no ExaBGP behind"
    assert not (lab.workdir / "run" / "exabgp-api.sock").exists()


def test_not_connected_raises(lab: Lab) -> None:
    lab.start_bird()

    async def body(speaker: ExaBgpSpeaker, changes: list[str]) -> None:
        await speaker.apply(by_prefix(A))
        await speaker.stop()
        with pytest.raises(BgpError):
            await speaker.apply(by_prefix(A, B))
        assert speaker.announced() == {}

    with_speaker(lab, bgp_settings(), body)


def test_bridge_keeps_reading_exabgp_while_the_agent_does_not(tmp_path: Path) -> None:
    socket_path = str(tmp_path / "api.sock")
    blob = b"".join(b'{ "line": %d }\n' % i for i in range(200_000))  # ~3 MB, far beyond pipe buffers

    async def main() -> None:
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        server = await asyncio.start_unix_server(
            lambda r, w: accepted.put_nowait((r, w)), path=socket_path, limit=1 << 20
        )
        bridge = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lbagent.l3.exabgp_bridge",
            socket_path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert bridge.stdin is not None and bridge.stdout is not None
        try:
            reader, writer = await asyncio.wait_for(accepted.get(), 10)
            # "ExaBGP" writes everything while "the agent" reads nothing: the bridge must not block.
            bridge.stdin.write(blob)
            await asyncio.wait_for(bridge.stdin.drain(), 10)
            assert await asyncio.wait_for(reader.readexactly(len(blob)), 10) == blob
            writer.write(b"announce route 192.0.2.10/32 next-hop self\n")
            await writer.drain()
            line = await asyncio.wait_for(bridge.stdout.readline(), 10)
            assert line == b"announce route 192.0.2.10/32 next-hop self\n"
            writer.close()
            assert await asyncio.wait_for(bridge.wait(), 10) == 0, "the agent closing ends the bridge"
        finally:
            if bridge.returncode is None:
                bridge.kill()
                await bridge.wait()
            server.close()

    asyncio.run(main())
