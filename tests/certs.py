"""Throwaway certificates for tests: a CA and leaf certificates for given DNS names, written as PEM files."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Issued:
    cert_file: Path
    key_file: Path
    serial: int


def _write_key(path: Path, key: CertificateIssuerPrivateKeyTypes, mode: int = 0o600) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


class TestCA:
    """A certificate authority whose certificate a client trusts with `curl --cacert ca.pem`."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "lbagent test CA", issuer: TestCA | None = None) -> None:
        """A root CA, or with `issuer` an intermediate CA that `issuer` signs."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert: x509.Certificate = (
            x509.CertificateBuilder().subject_name(subject)
            .issuer_name(issuer.cert.subject if issuer else subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(issuer.key if issuer else self.key, hashes.SHA256())
        )
        self.cert_file = self.directory / "ca.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, names: list[str], key_mode: int = 0o600, *,
              key: CertificateIssuerPrivateKeyTypes | None = None,
              valid: tuple[datetime.timedelta, datetime.timedelta] = (datetime.timedelta(hours=-1),
                                                                      datetime.timedelta(days=30)),
              chain: tuple[x509.Certificate, ...] = ()) -> Issued:
        """A leaf certificate for `names` (the first is also the common name): STEM.crt and STEM.key. `key`: the
        leaf's key (else a new P-256 one); `valid`: from and until, relative to now; `chain`: certificates written
        after the leaf in STEM.crt."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now + valid[0]).not_valid_after(now + valid[1])
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_file, key_file = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        tmp = cert_file.with_suffix(".crt.tmp")
        tmp.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain)))
        key_tmp = self.directory / f"{stem}.key.tmp"
        _write_key(key_tmp, key, key_mode)
        key_tmp.replace(key_file)  # the key first: a watcher that sees the new certificate finds its key
        tmp.replace(cert_file)
        return Issued(cert_file, key_file, serial)
