"""Golden files: what a renderer writes, kept under tests/golden/<kind>/<name> and compared byte for byte.

A difference fails with a unified diff (the golden file against the text rendered now) and the command that
accepts the new text: `UPDATE_GOLDEN=1` rewrites the golden files of the tests it runs instead of comparing. Review
the diff before committing it; the tests that also hand the text to the real tool (nft -c, iptables-restore --test,
haproxy -c, exabgp validate) keep doing so either way.
"""

from __future__ import annotations

import difflib
import os
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent / "golden"
UPDATE = "UPDATE_GOLDEN"


def path(kind: str, name: str) -> Path:
    return ROOT / kind / name


def check(kind: str, name: str, text: str) -> None:
    """`text` must equal tests/golden/<kind>/<name> (with UPDATE_GOLDEN=1: becomes it)."""
    golden = path(kind, name)
    if os.environ.get(UPDATE) == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
        return
    if not golden.exists():
        pytest.fail(f"{golden} is missing: check the rendering, then create it with {_update_command()}", pytrace=False)
    want = golden.read_text()
    if text == want:
        return
    diff = "".join(difflib.unified_diff(want.splitlines(keepends=True), text.splitlines(keepends=True),
                                        fromfile=str(golden), tofile="rendered now"))
    pytest.fail(f"{golden} differs from what the test renders now:\n{diff}\n"
                f"if the change is intended, accept it with {_update_command()}", pytrace=False)


def _update_command() -> str:
    """The command that rewrites the golden files of the running test (PYTEST_CURRENT_TEST: "<nodeid> (call)")."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    return f"{UPDATE}=1 .venv/bin/pytest {shlex.quote(test) if test else '<the test>'}"
