"""The session's guest: booted once, on first use, for every test that needs a kernel with IPVS."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from tests.guest.vm import Guest


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM unwinds like Ctrl-C, so the fixture powers the guest off and removes its files."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session")
def guest() -> Iterator[Guest]:
    """The Debian guest; missing QEMU or failed downloads make the tests error, never skip."""
    with Guest() as booted:
        yield booted
