"""tests/k8s: the kube-apiserver fixture, and its binary built before the first test that needs it."""

from __future__ import annotations

import sys
import time
import uuid

import pytest

from tests.k8s import build
from tests.k8s.apiserver import KubeAPIServer
from tests.k8s.fixtures import kube_apiserver

__all__ = ["kube_apiserver"]


def pytest_collection_finish(session: pytest.Session) -> None:
    """The first build takes minutes, longer than one test may (pytest-timeout): do it here, once, before any test
    runs, when a collected test uses the server. A cached build costs a stat."""
    if session.config.option.collectonly:
        return
    if any("kube_apiserver" in getattr(item, "fixturenames", ()) for item in session.items):
        started = time.monotonic()
        try:
            binary = build.build()
        except build.BuildError as exc:
            # The tests that need the server error with this message (the fixture gets it again at once).
            print(f"\nkube-apiserver build failed: {exc}", file=sys.stderr)
            return
        print(f"\nkube-apiserver: {binary} ({time.monotonic() - started:.1f} s)", file=sys.stderr)


@pytest.fixture
def namespace(kube_apiserver: KubeAPIServer) -> str:
    """A namespace of the test's own in the session's server (never deleted: no controller would finish that)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube_apiserver.kubectl("create", "namespace", name)
    return name
