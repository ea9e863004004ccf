"""Fixtures of the behaviour suite: one lab for the suite, a data plane kind per test, cleaned up after each."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from tests.dataplane.harness import LAB_SERVICES, DataplaneLab, Plane
from tests.dataplane.kernel import require_root_and_tools
from tests.lab.lab import Lab

# The data planes every behaviour test runs against. DATAPLANE_KINDS picks others (say "ipvs" in a guest
# whose kernel has IPVS); a new kind needs an entry in apply.DATAPLANES and harness.PREDICTORS.
DEFAULT_KINDS = "nftables,nftables-sharded,iptables,iptables-legacy"
KINDS = tuple(k for k in os.environ.get("DATAPLANE_KINDS", DEFAULT_KINDS).split(",") if k)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM unwinds like Ctrl-C, so the lab fixture tears everything down."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="package")
def dataplane_lab() -> Iterator[DataplaneLab]:
    """The namespace lab without agents, dual stack, nat return path on the nodes: shared by every kind and
    torn down after the suite's last test."""
    require_root_and_tools()
    with Lab(start_agents=False, ipv6=True, services=LAB_SERVICES) as lab:
        dl = DataplaneLab(lab)
        dl.setup()
        yield dl


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def plane(dataplane_lab: DataplaneLab, kind: str) -> Iterator[Plane]:
    """The kind's forwarders on the LBs (started on first apply), removed again after the test, pass or fail."""
    p = Plane(dataplane_lab, kind)
    try:
        yield p
    finally:
        p.close()
