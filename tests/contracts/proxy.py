"""The ProxyLayer contract: a start, then nothing to do for the same config; weights and states through the runtime
API without a reload; a structural change reloaded and served; a refused config changing nothing; a certificate
replaced without a reload; a crash noticed and restarted with its runtime state; a stop, and a start after it that is
no restart. Real: HaproxyProcess with HAProxy on loopback (tests/integration/test_contract_proxy.py); fake: FakeProxy
(tests/unit/test_contracts.py).

Configs are rendered as lbagent.l7.render renders them: each server with its weight, a drained one at weight 0,
one in maintenance `disabled`; the runtime API sets the rest. The structure is the same text with every server's
runtime part set alike (lbagent.plan.http.structural)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import pytest
from cryptography import x509

from lbagent.l7.process import ApplyResult, ConfigRefused, ProxyLayer
from lbagent.l7.runtime import RuntimeState
from lbagent.plan.http import ServerState
from tests.fakes import FakeProxy

READY, DRAIN, MAINT = ServerState.READY, ServerState.DRAIN, ServerState.MAINT
Servers = Mapping[tuple[str, str], tuple[int, ServerState]]
DEFAULT: Servers = {("app", "s1"): (10, READY), ("app", "s2"): (10, READY)}
BAD = "bogus_keyword"  # what a refused config carries


def server_lines(servers: Servers) -> list[str]:
    """The server lines of backend `app` as lbagent.l7.render writes them (without addresses)."""
    return [f"server {name} weight {0 if state is DRAIN else weight}" + (" disabled" if state is MAINT else "")
            for (_, name), (weight, state) in sorted(servers.items())]


class World(Protocol):
    """A proxy layer (not started) serving backend `app` (servers s1 and s2) and one certificate, and what its HAProxy
    serves."""

    proxy: ProxyLayer
    certificate: str  # the certificate file the configs serve

    @property
    def seen(self) -> list[bool]:
        """What `up()` gave at each on_change call so far."""

    def config(self, generation: int, servers: Servers, *, bad: bool = False) -> tuple[str, str]:
        """(the config, its structure) for `generation` (what the responses say) and `servers`; with `bad`, one
        `haproxy -c` refuses."""

    async def serving(self) -> int | None:
        """The generation answering requests now; None when nothing answers."""

    async def servers(self) -> dict[tuple[str, str], tuple[int, ServerState]]:
        """Backend app's servers' weights and states as HAProxy has them now."""

    async def served_serial(self) -> int:
        """The serial number of the certificate served now."""

    def pem(self, serial: int) -> str:
        """A new certificate (and its key) with this serial number."""

    async def crash(self) -> None:
        """HAProxy dies; returns once the layer has noticed (on_change called)."""

    async def recovered(self) -> None:
        """Until HAProxy is up again (the supervisor's restart) and the layer has said so (on_change called)."""


async def start(w: World, servers: Servers = DEFAULT, generation: int = 1) -> ApplyResult:
    text, shape = w.config(generation, servers)
    return await w.proxy.apply(text, shape, servers, "start")


async def starts_and_then_has_nothing_to_do(w: World) -> None:
    assert not w.proxy.up()
    desired: RuntimeState = {("app", "s1"): (10, READY), ("app", "s2"): (7, DRAIN)}
    # The config carries s2 at weight 0 and ready: the runtime API drains it and gives it its weight back.
    assert await start(w, desired) == ApplyResult(reloaded=False, runtime_updates=2, started=True)
    assert w.proxy.up()
    assert await w.servers() == desired
    assert await w.serving() == 1
    assert await start(w, desired) == ApplyResult(reloaded=False, runtime_updates=0, started=False)
    assert w.proxy.reloads == {} and w.proxy.restarts == 0 and w.proxy.runtime_updates == 2
    assert w.seen == [], "what apply did, the caller sees in its result: no on_change"


async def runtime_changes_need_no_reload(w: World) -> None:
    await start(w)
    shape = w.config(1, DEFAULT)[1]
    # Only what differs is sent: s2 drained (state, weight); then s1's weight, s2 into maintenance (state, weight).
    for desired, updates in (({("app", "s1"): (10, READY), ("app", "s2"): (0, DRAIN)}, 2),
                             ({("app", "s1"): (30, READY), ("app", "s2"): (5, MAINT)}, 3)):
        text, structure = w.config(1, desired)
        assert structure == shape
        assert await w.proxy.apply(text, structure, desired, "endpoints") == ApplyResult(False, updates, False)
        assert await w.servers() == desired
    assert w.proxy.reloads == {} and w.proxy.runtime_updates == 5
    assert await w.serving() == 1


async def structural_change_is_reloaded(w: World) -> None:
    await start(w)
    text, shape = w.config(2, DEFAULT)
    assert await w.proxy.apply(text, shape, DEFAULT, "routes") == ApplyResult(True, 0, False)
    assert w.proxy.reloads == {"routes": 1} and w.proxy.up()
    assert await w.serving() == 2
    assert await w.proxy.apply(text, shape, DEFAULT, "routes") == ApplyResult(False, 0, False)


async def refused_config_changes_nothing(w: World) -> None:
    await start(w)
    text, shape = w.config(2, DEFAULT, bad=True)
    with pytest.raises(ConfigRefused, match=BAD):
        await w.proxy.validate(text)
    with pytest.raises(ConfigRefused, match=BAD):
        await w.proxy.apply(text, shape, DEFAULT, "routes")
    assert w.proxy.up() and w.proxy.reloads == {}
    assert await w.serving() == 1, "still served, by what ran before"
    text, shape = w.config(2, DEFAULT)
    assert (await w.proxy.apply(text, shape, DEFAULT, "routes")).reloaded
    assert await w.serving() == 2


async def certificate_is_replaced_without_a_reload(w: World) -> None:
    await start(w)
    assert await w.served_serial() == 1001
    await w.proxy.set_certificate(w.certificate, w.pem(2002))
    assert await w.served_serial() == 2002
    assert w.proxy.reloads == {} and w.proxy.up()


async def crash_is_noticed_and_restarted_with_its_runtime_state(w: World) -> None:
    desired: RuntimeState = {("app", "s1"): (10, READY), ("app", "s2"): (0, DRAIN)}
    await start(w, desired)
    await w.crash()
    assert not w.proxy.up() and w.seen == [False], "on_change, once: down"
    await w.recovered()
    assert w.proxy.up() and w.proxy.restarts == 1 and w.seen == [False, True], "on_change, once: up again"
    assert await w.servers() == desired, "the runtime state set again"
    assert await w.serving() == 1
    assert await start(w, desired) == ApplyResult(False, 0, False), "the agent's next apply: nothing to do"


async def stop_ends_it_and_a_start_after_is_no_restart(w: World) -> None:
    await start(w)
    await w.proxy.stop(1.0)
    assert not w.proxy.up()
    assert await w.serving() is None
    assert (await start(w)).started
    assert w.proxy.up() and w.proxy.restarts == 0
    assert await w.serving() == 1


CONTRACT: list[Callable[[World], Awaitable[None]]] = [
    starts_and_then_has_nothing_to_do,
    runtime_changes_need_no_reload,
    structural_change_is_reloaded,
    refused_config_changes_nothing,
    certificate_is_replaced_without_a_reload,
    crash_is_noticed_and_restarted_with_its_runtime_state,
    stop_ends_it_and_a_start_after_is_no_restart,
]


# ---- the fake's world -------------------------------------------------------------------------------------------


class FakeWorld:
    """FakeProxy, and the test playing HAProxy's clients and its supervisor: what is served is the config the fake
    last started or reloaded with, while it runs."""

    def __init__(self, pem: Callable[[int], str]) -> None:
        self.seen: list[bool] = []
        self.fake = FakeProxy(lambda: self.seen.append(self.fake.up()))
        self.fake.reject = BAD
        self.proxy: ProxyLayer = self.fake
        self.certificate = "/run/lbagent/certs/web.pem"
        self._pem = pem
        self._initial = pem(1001)

    def config(self, generation: int, servers: Servers, *, bad: bool = False) -> tuple[str, str]:
        head = [f"# generation {generation}", f"bind :443 ssl crt {self.certificate}"] + ([f"{BAD} on"] if bad else [])
        shape = server_lines({key: (1, READY) for key in servers})
        return "\n".join(head + server_lines(servers)), "\n".join(head + shape)

    async def serving(self) -> int | None:
        if not self.fake.up():
            return None
        return int(self.fake.configs[-1].split("\n", 1)[0].removeprefix("# generation "))

    async def servers(self) -> dict[tuple[str, str], tuple[int, ServerState]]:
        return dict(self.fake.state)

    async def served_serial(self) -> int:
        return int(x509.load_pem_x509_certificate(self.fake.certificates.get(self.certificate, self._initial)
                                                  .encode()).serial_number)

    def pem(self, serial: int) -> str:
        return self._pem(serial)

    async def crash(self) -> None:
        self.fake.kill()

    async def recovered(self) -> None:
        self.fake.restart()
