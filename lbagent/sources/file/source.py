"""The file as a Source: the model is the YAML file's (config.load, in a child process: lbagent.sources.file.apart),
read again when the agent gets SIGHUP."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lbagent import model
from lbagent.sources.file import apart


class FileSource:
    """The model in the YAML file at `path`. It changes when the operator says so: SIGHUP."""

    def __init__(self, path: str | Path, first: model.Model | None = None) -> None:
        """`first`: the file's model as the caller has just loaded it (`lbagent run` does, to report problems
        before it starts): the agent's first load takes it instead of parsing the file again."""
        self.path = Path(path)
        self._first = first

    @property
    def name(self) -> str:
        return str(self.path)

    def load(self) -> model.Model:
        """config.load, apart: raises SourceError with every problem, each with its line."""
        first, self._first = self._first, None
        return first if first is not None else apart.load(self.path)

    def watch(self, changed: Callable[[], None]) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, changed)

    async def start(self) -> None:
        """The file is whole whenever it is read."""

    async def close(self) -> None:
        """Nothing is held open."""

    def status(self) -> dict[str, Any]:
        return {"kind": "file", "path": str(self.path)}
