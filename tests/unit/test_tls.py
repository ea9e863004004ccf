"""Certificates as check and run read them (lbagent.tls): what HAProxy refuses at load is refused, what clients
refuse but a site may be renewing is warned about, with its days; the chain and the run-time log and metrics."""

from __future__ import annotations

import datetime
import logging
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from lbagent import model, tls
from lbagent.agent.metrics import Metrics
from lbagent.l7.certs import CertificateStore
from lbagent.ops import cli
from lbagent.sources import Problem, SourceError
from lbagent.sources.file import apart, config
from lbagent.sources.file.source import FileSource
from tests.certs import Issued, TestCA

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "lbagent.example.yaml"
FIELD = "listeners[0].tls.certificates[0].certFile"
DAY = datetime.timedelta(days=1)
HOUR = datetime.timedelta(hours=1)


def _config(tmp_path: Path, issued: Issued) -> Path:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["listeners"] = [{"name": "websecure", "vip": "192.0.2.20", "port": 443, "protocol": "HTTPS",
                         "tls": {"certificates": [{"certFile": str(issued.cert_file),
                                                   "keyFile": str(issued.key_file)}]}}]
    doc["routes"] = [{"name": "shop", "listeners": ["websecure"], "hostnames": ["shop.example.com"],
                      "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}]
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(config.ConfigError) as refused:
        config.load(path)
    return [str(p) for p in refused.value.problems]


def _warnings(path: Path) -> list[str]:
    found: list[config.Problem] = []
    config.load(path, found)
    return [str(p) for p in found]


def _haproxy_accepts(tmp_path: Path, issued: Issued) -> bool:
    """The real `haproxy -c` on a listener serving this certificate, combined by hand as lbagent would."""
    pem = tmp_path / "combined.pem"
    pem.write_bytes(issued.cert_file.read_bytes() + issued.key_file.read_bytes())
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("defaults\n    mode http\n    timeout client 1s\n    timeout server 1s\n    timeout connect 1s\n"
                   f"frontend f\n    bind 127.0.0.1:18443 ssl crt {pem}\n    default_backend b\n"
                   "backend b\n    server s 127.0.0.1:1\n")
    return subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, check=False,
                          timeout=60).returncode == 0


@pytest.mark.parametrize(("key", "weakness"), [
    (lambda: rsa.generate_private_key(65537, 1024), "RSA key of 1024 bits (at least 2048 needed)"),
    (lambda: ec.generate_private_key(ec.SECP192R1()), "EC key on secp192r1 (192 bits; at least 224 needed)"),
    (lambda: rsa.generate_private_key(65537, 2048), None),
    (lambda: ec.generate_private_key(ec.SECP224R1()), None),
])
def test_a_key_haproxy_refuses_at_load_is_a_check_error_naming_listener_file_and_size(
    tmp_path: Path, key: Any, weakness: str | None
) -> None:
    ca = TestCA(tmp_path / "ca")
    issued = ca.issue("shop", ["shop.example.com"], key=key())
    # The rule is HAProxy's own (Debian's OpenSSL at security level 2): the real haproxy agrees on every case.
    assert _haproxy_accepts(tmp_path, issued) is (weakness is None)
    path = _config(tmp_path, issued)
    if weakness is None:
        config.load(path)
        return
    (problem,) = _problems(path)
    assert f"{FIELD}: listener websecure: the certificate has a {weakness}: HAProxy refuses it at load" in problem
    assert f"(got '{issued.cert_file}')" in problem
    with pytest.raises(tls.TlsError):  # and run never hands it to HAProxy
        tls.combined_pem(str(issued.cert_file), str(issued.key_file))


def test_a_sha1_signature_is_refused_as_haproxy_refuses_it(tmp_path: Path) -> None:
    """cryptography no longer signs with SHA-1: openssl does (the CA's key and certificate from TestCA)."""
    ca = TestCA(tmp_path / "ca")
    good = ca.issue("shop", ["shop.example.com"])
    ca_key = tmp_path / "ca" / "ca.key"
    ca_key.write_bytes(ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    csr = tmp_path / "shop.csr"
    subprocess.run(["openssl", "req", "-new", "-key", str(good.key_file), "-subj", "/CN=shop.example.com",
                    "-out", str(csr)], check=True, capture_output=True, timeout=60)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca.cert_file), "-CAkey", str(ca_key),
                    "-set_serial", "7", "-days", "30", "-sha1", "-out", str(good.cert_file)],
                   check=True, capture_output=True, timeout=60)
    assert not _haproxy_accepts(tmp_path, good)
    (problem,) = _problems(_config(tmp_path, good))
    assert "listener websecure: the certificate has a signature with SHA1: HAProxy refuses it at load" in problem


@pytest.mark.parametrize(("valid", "said"), [
    ((-40 * DAY, -3 * DAY), "the certificate expired on {end} UTC, 3 days ago; clients refuse it"),
    ((2 * DAY + HOUR, 60 * DAY), "the certificate is not valid yet: from {start} UTC, in 2 days"),
    ((-DAY, 5 * DAY + HOUR), "the certificate expires on {end} UTC, in 5 days: renew it"),
    ((-DAY, (tls.EXPIRY_WARNING_DAYS + 1) * DAY), None),
])
def test_validity_is_a_warning_with_its_days(
    tmp_path: Path, valid: tuple[datetime.timedelta, datetime.timedelta], said: str | None
) -> None:
    root = TestCA(tmp_path / "ca")
    issued = root.issue("shop", ["shop.example.com"], valid=valid)
    cert = tls.read_pair(str(issued.cert_file), str(issued.key_file)).chain[0]
    path = _config(tmp_path, issued)
    found = [w for w in _warnings(path) if "issuer" not in w]  # TestCA is no CA this system trusts
    if said is None:
        assert found == []
        return
    (warning,) = found
    text = said.format(start=f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M}",
                       end=f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}")
    assert f"{FIELD}: listener websecure: {text}" in warning


def test_check_prints_warnings_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = TestCA(tmp_path / "ca")
    path = _config(tmp_path, ca.issue("shop", ["shop.example.com"], valid=(-40 * DAY, -3 * DAY)))
    assert cli.main(["check", "-c", str(path)]) == 0  # with the real tools: haproxy serves an expired certificate
    out, err = capsys.readouterr()
    assert f"{path}: 2 warning(s)" in err
    assert "  warning: line " in err and "3 days ago" in err and "does not hold the issuer" in err
    assert "accepted     haproxy -c -f haproxy.cfg" in out and f"{path}: ok (" in out


def _chain_notes(issued: Issued) -> tuple[list[str], list[str]]:
    pair = tls.read_pair(str(issued.cert_file), str(issued.key_file))
    return [p.message for p in pair.problems], [w.message for w in pair.warnings]


def test_the_chain_must_hold_the_leafs_issuer_and_only_its_chain(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = TestCA(tmp_path / "root", "lbagent test root")
    intermediate = TestCA(tmp_path / "inter", "lbagent test intermediate", issuer=root)
    # certbot's cert.pem instead of fullchain.pem: the leaf alone, its issuer an intermediate nobody has
    problems, warnings = _chain_notes(intermediate.issue("leaf", ["shop.example.com"]))
    assert problems == []
    assert warnings == ["the file does not hold the issuer of the certificate, CN=lbagent test intermediate, and "
                        "this system does not trust it: clients that do not already have it cannot verify the "
                        "certificate (serve the full chain, e.g. certbot's fullchain.pem; a private CA that clients "
                        "trust directly is fine, and is not warned about once it is in this system's trust store)"]
    # the full chain: the root above the intermediate is the clients' own business
    assert _chain_notes(intermediate.issue("full", ["shop.example.com"], chain=(intermediate.cert,))) == ([], [])
    # a certificate of another chain as well
    other = TestCA(tmp_path / "other", "lbagent other CA")
    problems, warnings = _chain_notes(intermediate.issue("mixed", ["shop.example.com"],
                                                         chain=(intermediate.cert, other.cert)))
    assert problems == []
    assert warnings == ["certificate 3 in the file (CN=lbagent other CA) is no part of the leaf's chain (HAProxy "
                        "sends it to every client all the same)"]
    # an intermediate of the right name that did not sign the leaf (a CA that was renewed with a new key)
    impostor = TestCA(tmp_path / "impostor", "lbagent test intermediate", issuer=root)
    issued = intermediate.issue("wrong", ["shop.example.com"], chain=(impostor.cert,))
    problems, _ = _chain_notes(issued)
    assert problems == ["certificate 2 in the file (CN=lbagent test intermediate) has the name of the issuer of the "
                        "certificate but did not sign it: the file mixes certificates of different chains"]
    assert any("did not sign it" in p for p in _problems(_config(tmp_path, issued)))
    # a leaf signed by a CA this system trusts needs nothing more in the file
    monkeypatch.setattr(tls, "_trusted", lambda: {intermediate.cert.subject: (intermediate.cert,)})
    assert _chain_notes(intermediate.issue("trusted", ["shop.example.com"])) == ([], [])
    monkeypatch.setattr(tls, "_trusted", lambda: {intermediate.cert.subject: (impostor.cert,)})
    assert _chain_notes(intermediate.issue("untrusted", ["shop.example.com"]))[1] != []


def _listener(issued: Issued) -> model.Listener:
    return model.Listener("websecure", (ip_address("192.0.2.20"),), 443, model.ListenerProtocol.HTTPS,
                          certificates=(model.Certificate(str(issued.cert_file), str(issued.key_file)),))


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == name]


def test_run_serves_an_expired_certificate_and_says_so_with_log_and_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ca = TestCA(tmp_path / "ca")
    expired = ca.issue("old", ["shop.example.com"], valid=(-40 * DAY, -3 * DAY))
    store = CertificateStore(tmp_path / "run")
    (path,) = store.sync([_listener(expired)])["websecure"]
    assert "BEGIN CERTIFICATE" in Path(path).read_text()  # served all the same: a site may be mid-renewal
    (record,) = _events(caplog, "certificate_expired")
    assert record.levelno == logging.WARNING and "3 days ago" in str(record.__dict__)
    metrics = Metrics()
    metrics.certificates(store.validity())
    cert = tls.read_pair(str(expired.cert_file), str(expired.key_file)).chain[0]
    labels = {"listener": "websecure", "file": str(expired.cert_file)}
    assert metrics.registry.get_sample_value("lbagent_certificate_not_after_timestamp_seconds", labels) == \
        cert.not_valid_after_utc.timestamp()
    assert metrics.registry.get_sample_value("lbagent_certificate_not_before_timestamp_seconds", labels) == \
        cert.not_valid_before_utc.timestamp()


def test_a_certificate_that_expires_while_served_is_said_once(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    now = [datetime.datetime.now(datetime.UTC)]
    ca = TestCA(tmp_path / "ca")
    issued = ca.issue("shop", ["shop.example.com"], valid=(-DAY, HOUR))
    store = CertificateStore(tmp_path / "run", clock=lambda: now[0])
    store.sync([_listener(issued)])
    assert _events(caplog, "certificate_expiring") and not _events(caplog, "certificate_expired")
    store.look()
    assert not _events(caplog, "certificate_expired")
    now[0] += 2 * HOUR
    for _ in range(3):
        store.look()
    (record,) = _events(caplog, "certificate_expired")
    assert "expired while served" in str(record.__dict__)



def test_the_agents_parse_in_a_child_gives_the_same_model_problems_and_warnings(tmp_path: Path) -> None:
    """`run` parses apart (lbagent.sources.file.apart): the same model, the same problems, the same warnings as
    `check`'s in-process parse; and the agent's process never imports the config schemas or cryptography."""
    ca = TestCA(tmp_path / "ca")
    path = _config(tmp_path, ca.issue("shop", ["shop.example.com"], valid=(-40 * DAY, -3 * DAY)))
    said: list[Problem] = []
    m = apart.load(path, said)
    assert m == config.load(path) and m.digest() == config.load(path).digest()
    assert [str(p) for p in said] == _warnings(path) and said
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("port: 443", "port: 0"))
    with pytest.raises(SourceError) as refused:
        apart.load(bad)
    assert [str(p) for p in refused.value.problems] == _problems(bad)
    with pytest.raises(SourceError, match="cannot read the file"):
        apart.load(tmp_path / "absent.yaml")
    probe = ("import sys; from lbagent.ops import cli; from lbagent.agent.agent import Agent; "
             "from lbagent.sources.file.source import FileSource; FileSource(sys.argv[1]).load(); "
             "print(sorted(m for m in ('pydantic', 'cryptography', 'lbagent.sources.file.config') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_childs_model_comes_back_whole_across_chunks(tmp_path: Path) -> None:
    """The child sends services and routes in chunks of apart.CHUNK (the agent's event loop runs between two): a
    config of more than two chunks of each comes back as the in-process parse makes it, in the same order."""
    ca = TestCA(tmp_path / "ca")
    doc = yaml.safe_load(_config(tmp_path, ca.issue("shop", ["shop.example.com"])).read_text())
    n = 2 * apart.CHUNK + 7
    doc["services"] += [{"name": f"s{i}", "vip": "192.0.2.30", "ports": [{"port": 1000 + i, "nodePort": 31000 + i}]}
                        for i in range(n)]
    doc["routes"] += [{"name": f"r{i}", "listeners": ["websecure"], "hostnames": ["shop.example.com"],
                       "rules": [{"matches": [{"path": {"type": "Exact", "value": f"/r{i}"}}],
                                  "backendRefs": [{"name": f"s{i}", "port": 1000 + i}]}]} for i in range(n)]
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    m, whole = apart.load(path), config.load(path)
    assert len(m.services) == len(whole.services) > n and len(m.routes) == n + 1
    assert [s.key for s in m.services] == [s.key for s in whole.services]
    assert m == whole and m.digest() == whole.digest()


def test_run_parses_the_file_once_at_start_and_again_on_each_reload(tmp_path: Path) -> None:
    """`lbagent run` loads the file to report its problems before starting; the agent's first load takes that
    model (no second parse), every later one reads the file again."""
    ca = TestCA(tmp_path / "ca")
    path = _config(tmp_path, ca.issue("shop", ["shop.example.com"]))
    first = apart.load(path)
    source = FileSource(path, first=first)
    path.write_text(path.read_text().replace("port: 443", "port: 8443"))
    assert source.load() is first
    again = source.load()
    assert again != first and again == config.load(path)
