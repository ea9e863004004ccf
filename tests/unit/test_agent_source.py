"""The agent and its source: nothing is programmed until the source is whole (the Kubernetes API's first lists),
and a burst of changes is taken by at most one more reload after the one running, ending on the latest model.
The source is the real file source with a gate on start() and a count of loads (the Kubernetes source against a
real kube-apiserver: tests/k8s and tests/lab/test_kubernetes.py)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import yaml

from lbagent import model
from lbagent.sources.file.source import FileSource
from tests.unit.test_agent import Harness, until


class GatedSource(FileSource):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.whole = asyncio.Event()
        self.loads = 0
        self.slow = threading.Event()  # while set, a load takes long enough for changes to pile up
        self.changed: Any = None

    async def start(self) -> None:
        await self.whole.wait()

    def load(self) -> model.Model:
        self.loads += 1
        if self.slow.is_set():
            threading.Event().wait(0.2)
        return super().load()

    def watch(self, changed: Any) -> None:
        self.changed = changed


def _with_vip(h: Harness, vip: str) -> None:
    doc = yaml.safe_load(h.path.read_text())
    doc["services"][0]["vip"] = vip
    h.path.write_text(yaml.safe_dump(doc))


def test_nothing_is_programmed_until_the_source_is_whole_and_bursts_reload_at_most_twice(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    source = GatedSource(h.path)
    h.agent.source = source

    async def scenario() -> None:
        run = asyncio.create_task(h.agent.run())
        await until(lambda: source.changed is not None)
        _with_vip(h, "192.0.2.20")  # what the source holds once whole differs from the model the agent began with
        await asyncio.sleep(0.3)  # a window in which the agent must program nothing: nothing to wait for
        assert h.binder.vips == set() and h.forwarder.applied is None and source.loads == 0
        source.whole.set()
        await until(lambda: h.announced() == {"192.0.2.20/32"})
        assert {str(v) for v in h.binder.vips} == {"192.0.2.20"}
        loads = source.loads
        source.slow.set()
        _with_vip(h, "192.0.2.21")
        for _ in range(20):  # a burst, as a watch delivers them
            source.changed()
        _with_vip(h, "192.0.2.22")
        source.changed()
        await until(lambda: h.announced() == {"192.0.2.22/32"}, timeout=10)
        await until(lambda: not h.agent._reloading)
        assert source.loads - loads <= 2  # the one running, then one more for everything that came meanwhile
        h.agent.stop()
        assert await run == 0

    asyncio.run(scenario())
