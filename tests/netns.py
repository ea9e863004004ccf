"""Throwaway network namespaces for tests that need a kernel of their own (nftables, addresses, netlink), and Python
snippets run inside them from the repository's root, answering in JSON."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.programs import REPO


def need_root() -> None:
    """Fail loudly (never skip) where network namespaces cannot be made."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces): run it as root, as `make test` does")


@contextlib.contextmanager
def throwaway_netns(prefix: str, count: int = 1) -> Iterator[list[str]]:
    """`count` new network namespaces named `prefix` + a random tail; deleted afterwards, also when the test
    fails."""
    need_root()
    names = [f"{prefix}{i if count > 1 else ''}{uuid.uuid4().hex[:6]}" for i in range(count)]
    made: list[str] = []
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
        yield names
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


def run_python(netns: str, script: str, *args: str, wrap: Sequence[str] = (), timeout: float = 120) -> Any:
    """Run `script` (with `args`) under this Python in `netns`, inside `wrap` (such as `unshare --pid`); the JSON
    it printed. A script that fails fails the test with its stderr."""
    out = subprocess.run(["ip", "netns", "exec", netns, *wrap, sys.executable, "-c", script, *args],
                         capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def nft(netns: str, *args: str, script: str | None = None) -> str:
    """`nft args` in `netns` (`script` on its stdin); its output. A refusal fails the test with nft's message and
    the script's start."""
    r = subprocess.run(["ip", "netns", "exec", netns, "nft", *args], input=script, capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, f"nft {' '.join(args)} in {netns}: {r.stderr}\n{(script or '')[:3000]}"
    return r.stdout
