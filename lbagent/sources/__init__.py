"""Where the model comes from: the seam between a source and the rest of lbagent.

A source reads the model (services, nodes, listeners, routes, certificates) from wherever it lives, refuses one that
cannot be used with every problem listed, and says when the model may have changed. The agent asks its Source for the
model and never knows which one it is: the YAML file now (lbagent.sources.file), the Kubernetes API next, beside it.
Only `ops` picks a source; nothing below the agent imports one (tests/unit/test_layout.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lbagent import model


@dataclass(frozen=True)
class Problem:
    """One thing wrong with what a source holds: where (field path and line), the value found, and what is wrong."""

    path: str
    value: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.path or '(top)'}: {self.message} (got {self.value})"

    def for_warning(self) -> str:
        """A warning names the value it is about first (a file), then what is wrong with it."""
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.path or '(top)'}: {self.value}: {self.message}"


class SourceError(Exception):
    """The source's model cannot be used; every problem is listed, not just the first."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


class Source(Protocol):
    """Where the agent's model comes from."""

    @property
    def name(self) -> str:
        """What the logs call this source (the file's path)."""

    def load(self) -> model.Model:
        """The model as the source holds it now; SourceError when it cannot be used. Blocking (it may take
        seconds): the agent calls it in a worker thread."""

    def watch(self, changed: Callable[[], None]) -> None:
        """From now on, call `changed` on the running event loop whenever the model may have changed: the agent
        then loads it again."""

    async def start(self) -> None:
        """Connect, and return once `load` gives the whole model (the Kubernetes API: its first full lists). The
        agent programs nothing before."""

    async def close(self) -> None:
        """The agent stops: let go of connections (and of the writer's Lease, so another node takes over)."""

    def status(self) -> dict[str, Any]:
        """What `lbagent status` shows of the source (e.g. since when it may be behind)."""
