"""The certificate store: combined private files for HAProxy, replacements noticed on disk, refusals said once."""

from __future__ import annotations

import logging
from dataclasses import replace
from ipaddress import ip_address
from pathlib import Path

import pytest

from lbagent import model
from lbagent.l7 import certs
from lbagent.l7.certs import CertificateStore
from lbagent.ops import artifacts
from tests.certs import TestCA


def _listener(ca: TestCA, stem: str) -> model.Listener:
    issued = ca.issue(stem, [f"{stem}.example.com"])
    return model.Listener("websecure", (ip_address("192.0.2.20"),), 443, model.ListenerProtocol.HTTPS,
                          certificates=(model.Certificate(str(issued.cert_file), str(issued.key_file)),))


def test_combined_file_replacement_and_requeue(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "src")
    listener = _listener(ca, "shop")
    store = CertificateStore(tmp_path / "run")
    (path,) = store.sync([listener])["websecure"]
    assert Path(path).stat().st_mode & 0o777 == 0o600
    assert "BEGIN CERTIFICATE" in Path(path).read_text() and "PRIVATE KEY" in Path(path).read_text()
    store.take_pending()  # HAProxy's first start reads the file
    assert store.look() is False and store.take_pending() == []

    ca.issue("shop", ["shop.example.com"])  # replaced on disk
    assert store.look() is True
    (replaced,) = store.take_pending()
    assert replaced.path == path and replaced.pem == Path(path).read_text()
    store.requeue(replaced)  # HAProxy did not take it: offered again
    assert store.take_pending() == [replaced]


def test_a_refused_source_is_said_once_and_keeps_the_last_good_file(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    ca = TestCA(tmp_path / "src")
    listener = _listener(ca, "shop")
    store = CertificateStore(tmp_path / "run")
    (path,) = store.sync([listener])["websecure"]
    good = Path(path).read_text()
    Path(listener.certificates[0].key_file).chmod(0o644)  # readable by anyone: refused
    caplog.set_level(logging.INFO)
    for _ in range(3):
        store.look()
        store.sync([listener])
    assert [r.getMessage() for r in caplog.records].count("certificate_refused") == 1
    assert Path(path).read_text() == good

    fresh = _listener(TestCA(tmp_path / "other"), "new")  # a listener whose only source is refused from the start
    Path(fresh.certificates[0].key_file).chmod(0o644)
    caplog.clear()
    store2 = CertificateStore(tmp_path / "run2")
    for _ in range(3):
        assert store2.sync([fresh]) == {}  # no file to give HAProxy
    assert [r.getMessage() for r in caplog.records].count("certificate_refused") == 1


def test_plan_names_the_files_the_store_writes(tmp_path: Path) -> None:
    """haproxy.cfg as `lbagent plan` and `check` render it points at the files `run` writes: one naming for both."""
    ca = TestCA(tmp_path / "src")
    first, second = _listener(ca, "shop"), _listener(ca, "blog")
    listener = replace(first, certificates=first.certificates + second.certificates)
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir(mode=0o700)
    written = CertificateStore(certs.directory(runtime_dir), runtime_dir).sync([listener])
    assert written == certs.combined_paths([listener], certs.directory(runtime_dir))
    assert written["websecure"] == (f"{runtime_dir}/haproxy/certs/websecure-0.pem",
                                    f"{runtime_dir}/haproxy/certs/websecure-1.pem")
    bgp = model.Bgp(local_as=64512, router_id=ip_address("192.0.2.1"), peers=())  # type: ignore[arg-type]
    m = model.Model("lb1", "lo", bgp, nodes=(), services=(), agent=model.Agent(runtime_dir=str(runtime_dir)),
                    listeners=(listener,))
    assert artifacts.certificate_paths(m) == written
