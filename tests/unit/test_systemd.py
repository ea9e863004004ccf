"""The unit file and the install script as an operator gets them: staged install, systemd's own checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import programs

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "systemd" / "install.sh"
UNIT = REPO / "systemd" / "lbagent.service"


def _tool(name: str) -> str:
    try:
        return programs.path(name)
    except RuntimeError as e:
        pytest.fail(str(e))


def test_install_script_passes_shellcheck() -> None:
    result = subprocess.run([_tool("shellcheck"), str(INSTALL)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """systemd/install.sh into a staging root: a wheel of lbagent built and installed in /opt/lbagent."""
    if os.geteuid() != 0:
        pytest.fail("install.sh runs as root: run the tests as root, as `make test` does")
    root = tmp_path_factory.mktemp("root")
    result = subprocess.run([str(INSTALL)], env={**os.environ, "DESTDIR": str(root)}, capture_output=True,
                            text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr
    return root


def test_staged_install_has_the_agent_the_unit_and_a_private_config(staged: Path) -> None:
    python = staged / "opt/lbagent/bin/python"
    config = staged / "etc/lbagent/lbagent.yaml"
    assert config.stat().st_mode & 0o777 == 0o600
    check = subprocess.run([str(python), "-m", "lbagent.ops.cli", "check", "-c", str(config)], capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stderr
    # the scripts name the interpreter where it will live, not where it was staged
    assert (staged / "opt/lbagent/bin/lbagent").read_text().startswith("#!/opt/lbagent/bin/python")
    assert (staged / "etc/systemd/system/lbagent.service").read_text() == UNIT.read_text()


def test_unit_passes_systemd_analyze_verify(staged: Path, tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point the unit at the staged install
    unit = tmp_path / "lbagent.service"
    unit.write_text(UNIT.read_text().replace("/opt/lbagent", str(staged / "opt/lbagent"))
                    .replace("/etc/lbagent", str(staged / "etc/lbagent")))
    result = subprocess.run([_tool("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_is_notify_with_watchdog_graceful_stop_and_least_capabilities() -> None:
    text = UNIT.read_text()
    assert re.search(r"^Type=notify$", text, re.M) and re.search(r"^WatchdogSec=", text, re.M)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, re.M)
    assert re.search(r"^Restart=on-failure$", text, re.M)
    caps = re.search(r"^CapabilityBoundingSet=(.*)$", text, re.M)
    assert caps and set(caps.group(1).split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}


def test_hardening_exposure_stays_low(staged: Path) -> None:
    result = subprocess.run([_tool("systemd-analyze"), "security", "--offline=true", f"--root={staged}",
                             "lbagent.service"], capture_output=True, text=True, check=False)
    score = re.search(r"Overall exposure level for lbagent.service: ([\d.]+)", result.stdout)
    assert score, result.stdout[-2000:] + result.stderr
    assert float(score.group(1)) <= 3.5, score.group(0)  # 3.0 when written (docs/operations.md)


def test_wheel_builds(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                             str(REPO)], capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.glob("lbagent-*.whl"))
