"""The session's kube-apiserver, for any test directory: its conftest.py imports the fixture,

    from tests.k8s.fixtures import kube_apiserver  # noqa: F401  (a pytest fixture)

and tests take `kube_apiserver` as an argument. tests/k8s/conftest.py also builds the binary before the first test
(outside the per-test timeout); `make test` builds it before pytest starts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.k8s.apiserver import KubeAPIServer


@pytest.fixture(scope="session")
def kube_apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPIServer]:
    """A real kube-apiserver on 127.0.0.1, started once; a failed build or start makes the tests error, never skip."""
    with KubeAPIServer(tmp_path_factory.mktemp("kube-apiserver")) as api:
        yield api
