"""The BGP lab fixture for tests/integration (the lab itself: bird_lab.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.bird_lab import Lab, built


@pytest.fixture
def lab() -> Iterator[Lab]:
    with built() as lab:
        yield lab
