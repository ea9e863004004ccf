"""Fixtures for the lab tests: a shared agent-less lab, a factory for more, and SIGTERM that still cleans up."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

from tests.lab.lab import Lab


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM unwinds like Ctrl-C, so fixtures (and the labs' atexit hooks) tear every lab down."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="module")
def bare_lab() -> Iterator[Lab]:
    """One lab without agents, shared by a test module: tests must leave it as they found it."""
    with Lab(start_agents=False) as lab:
        yield lab


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """Build labs with `lab_factory(**Lab kwargs)`; every one is torn down after the test, pass or fail."""
    labs: list[Lab] = []

    def make(**kwargs: Any) -> Lab:
        lab = Lab(**kwargs)
        labs.append(lab)
        lab.up()
        return lab

    yield make
    errors: list[Exception] = []
    for lab in reversed(labs):
        try:
            lab.down()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
