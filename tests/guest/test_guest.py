"""The guest harness and IPVS in the guest: Debian's kernel, this repo's venv, NAT with real HTTP, every scheduler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from tests import programs
from tests.guest.ipvs_smoke import BACKENDS, CLIENT, MASQUERADE, SCHEDULERS, VIP
from tests.guest.vm import QEMU, Guest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
SMOKE = Path(__file__).with_name("ipvs_smoke.py")


def _smoke(guest: Guest, mode: str) -> dict[str, Any]:
    result = guest.run([sys.executable, str(SMOKE), mode], cwd=REPO, timeout=240)
    assert result.returncode == 0, f"ipvs_smoke.py {mode} failed:\n{result.stdout}\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_host_has_what_the_guest_needs() -> None:
    """Missing tools fail here by name, loudly, never skip."""
    assert programs.missing((QEMU, "apt-get", "apt-cache", "dpkg", "ipvsadm")) == []


def test_guest_runs_debians_6_1_kernel(guest: Guest) -> None:
    assert guest.artifacts is not None
    release = guest.run(["uname", "-r"], check=True).stdout.strip()
    assert release == guest.kernel_release == guest.artifacts.kernel_version
    assert release.startswith("6.1.") and release.endswith("-amd64"), release
    assert release != os.uname().release
    assert "Debian" in guest.run(["cat", "/proc/version"], check=True).stdout


def test_host_venv_runs_in_guest_and_imports_lbagent(guest: Guest) -> None:
    code = "import lbagent, sys; print(lbagent.__file__); print(sys.prefix)"
    result = guest.run([sys.executable, "-c", code], cwd=REPO, timeout=120, check=True)
    module, prefix = result.stdout.split()
    assert Path(module) == REPO / "lbagent" / "__init__.py"
    assert prefix == sys.prefix


def test_run_reports_output_exit_code_cwd_and_env(guest: Guest) -> None:
    result = guest.run('echo "$GREETING from $(pwd)"; echo oops >&2; exit 7', cwd="/tmp", env={"GREETING": "hi"})
    assert (result.returncode, result.stdout, result.stderr) == (7, "hi from /tmp\n", "oops\n")
    quoted = guest.run(["printf", "%s|", "a b", "$HOME", "it's"], check=True)
    assert quoted.stdout == "a b|$HOME|it's|"
    with pytest.raises(subprocess.CalledProcessError):
        guest.run(["false"], check=True)


def test_commands_start_with_no_signal_ignored(guest: Guest) -> None:
    """A command must be stoppable with SIGINT/SIGQUIT, as from a terminal (Python's KeyboardInterrupt needs it)."""
    status = guest.run(["grep", "^SigIgn:", "/proc/self/status"], check=True).stdout
    assert status.split() == ["SigIgn:", "0000000000000000"]


def test_guest_writes_stay_in_the_guest(guest: Guest) -> None:
    probe = REPO / "tests" / "guest" / f".write-probe-{os.getpid()}"
    guest.run(["touch", str(probe)], check=True)
    assert guest.run(["test", "-e", str(probe)]).returncode == 0
    assert not probe.exists()


def test_files_the_host_creates_after_boot_show_in_the_guest(guest: Guest, tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("from the host\n")
    assert guest.run(["cat", "hello.txt"], cwd=tmp_path, check=True).stdout == "from the host\n"


def test_timeout_kills_the_commands_process_group_and_the_guest_goes_on(guest: Guest) -> None:
    begin = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        guest.run("echo started; sleep 271 & sleep 272", timeout=2)
    assert time.monotonic() - begin < 20
    assert caught.value.output == "started\n"
    processes = guest.run(["ps", "-eo", "args"], check=True).stdout
    assert "sleep 271" not in processes and "sleep 272" not in processes


def test_ipvs_nat_round_robin_alternates_between_real_servers_over_http(guest: Guest) -> None:
    report = _smoke(guest, "http")
    [service] = report["services"]
    assert (service["addr"], service["port"], service["scheduler"]) == (VIP, 80, "rr")
    assert [(d["addr"], d["fwd_method"], d["weight"]) for d in service["dests"]] == [
        (addr, MASQUERADE, 1) for addr in sorted(BACKENDS.values())
    ]
    assert report["ipvsadm_lb"].count("Masq") == 2, report["ipvsadm_lb"]
    # IPVS state is per network namespace: the guest's initial one has no service.
    assert "TCP" not in report["ipvsadm_init_netns"], report["ipvsadm_init_netns"]
    backends = report["backends"]
    assert len(backends) == 6 and set(backends) == set(BACKENDS), backends
    assert all(a != b for a, b in pairwise(backends)), f"round robin should alternate: {backends}"
    # NAT rewrites only the destination: the real servers see the client's own address.
    assert report["clients"] == [CLIENT]


def test_schedulers_rr_wrr_lc_sh_mh_can_each_be_created(guest: Guest) -> None:
    report = _smoke(guest, "schedulers")
    assert [s["scheduler"] for s in report["services"]] == list(SCHEDULERS)
    for service in report["services"]:
        assert [(d["fwd_method"], d["weight"]) for d in service["dests"]] == [(MASQUERADE, 1), (MASQUERADE, 2)]
    assert report["after_delete"] == []
