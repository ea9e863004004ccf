"""Certificates and private keys: read, checked (key matches, only root may read the key, names covered), combined."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from lbagent.config_base import read_file


@dataclass(frozen=True)
class TlsProblem:
    path: str
    message: str
    key: bool = False  # about the private key (else the certificate)


class TlsError(Exception):
    def __init__(self, problems: list[TlsProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))


def _read(path: str) -> bytes | str:
    try:
        return read_file(path)
    except FileNotFoundError:
        return "the file does not exist"
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or exc}"


def key_permission_problem(path: str) -> str | None:
    """A private key must be readable by root alone: owned by root, no group or other permissions."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot stat the key: {exc.strerror or exc}"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"the private key is open to group/others (mode {mode:04o}); make it 0600 or 0400, owned by root"
    if st.st_uid != 0:
        return f"the private key is owned by uid {st.st_uid}; only root may own and read it"
    return None


def load_pair(cert_file: str, key_file: str) -> tuple[list[x509.Certificate], PrivateKeyTypes | None, list[TlsProblem]]:
    """The certificate chain and key, or the problems that keep them from being served."""
    problems: list[TlsProblem] = []
    chain: list[x509.Certificate] = []
    key: PrivateKeyTypes | None = None
    data = _read(cert_file)
    if isinstance(data, str):
        problems.append(TlsProblem(cert_file, data))
    else:
        try:
            chain = x509.load_pem_x509_certificates(data)
        except ValueError:
            problems.append(TlsProblem(cert_file, "no PEM certificate in the file"))
    if (why := key_permission_problem(key_file)) is not None and not why.startswith("cannot stat"):
        problems.append(TlsProblem(key_file, why, key=True))
    key_data = _read(key_file)
    if isinstance(key_data, str):
        problems.append(TlsProblem(key_file, key_data, key=True))
    else:
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except (ValueError, TypeError) as exc:
            problems.append(TlsProblem(key_file, f"no usable unencrypted PEM private key: {exc}", key=True))
    if chain and key is not None:
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        leaf = chain[0].public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        if public != leaf:
            problems.append(TlsProblem(key_file, f"the private key does not belong to the certificate in {cert_file}",
                                       key=True))
    return chain, key, problems


def check_pair(cert_file: str, key_file: str) -> list[TlsProblem]:
    return load_pair(cert_file, key_file)[2]


def combined_pem(cert_file: str, key_file: str) -> str:
    """The chain then the key, as HAProxy reads one `crt` file; TlsError when they cannot be served."""
    chain, key, problems = load_pair(cert_file, key_file)
    if problems or key is None:
        raise TlsError(problems or [TlsProblem(key_file, "no private key", key=True)])
    text = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)
    return text + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()


def certificate_names(cert_file: str) -> list[str]:
    """The DNS names a certificate serves: its subjectAltName DNS entries, else its common name."""
    try:
        cert = x509.load_pem_x509_certificates(read_file(cert_file))[0]
    except (OSError, ValueError, IndexError):
        return []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def name_covers(cert_name: str, hostname: str) -> bool:
    """RFC 6125: `*.example.com` covers one label (`a.example.com`, not `a.b.example.com` nor `example.com`).
    A route hostname that is itself a wildcard is covered by the same wildcard only."""
    cert_name, hostname = cert_name.lower().rstrip("."), hostname.lower().rstrip(".")
    if cert_name == hostname:
        return True
    if cert_name.startswith("*.") and not hostname.startswith("*."):
        first, _, rest = hostname.partition(".")
        return bool(first) and rest == cert_name[2:]
    return False
