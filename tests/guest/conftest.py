"""The session's guest: booted once, on first use, for every test that needs a kernel with IPVS."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.guest.vm import Guest


@pytest.fixture(scope="session")
def guest() -> Iterator[Guest]:
    """The Debian guest; missing QEMU or failed downloads make the tests error, never skip."""
    with Guest() as booted:
        yield booted
