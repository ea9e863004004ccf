"""The data-plane behaviour suite (tests/dataplane), the same one nftables and iptables pass on this host,
run against real IPVS inside the guest kernel."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.guest.vm import Guest

# A hang guard above guest.run's own timeout below (the default 300 s is less than the suite takes under TCG, and
# the session's guest, fetched and booted on first use, may be set up inside this test).
pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]


def test_the_behaviour_suite_passes_on_ipvs(guest: Guest) -> None:
    result = guest.run([str(REPO / ".venv/bin/pytest"), "-q", "-p", "no:cacheprovider", "tests/dataplane"],
                       cwd=REPO, env={"DATAPLANE_KINDS": "ipvs"}, timeout=1500)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"{summary}\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 11 and "failed" not in summary and "skipped" not in summary, summary
