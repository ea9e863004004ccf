"""Fixtures for the lab tests: a shared agent-less lab and a factory for more (SIGTERM handling: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.lab.lab import Lab


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
