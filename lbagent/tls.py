"""Certificates and private keys: read, checked, combined. Refused (never served): a key that does not match, a key
others may read, a key or signature HAProxy's OpenSSL refuses, a file that mixes chains. Warned about (served: a
site may be mid-renewal): expired, not yet valid or soon expiring certificates, an issuer missing from the chain."""

from __future__ import annotations

import datetime
import functools
import os
import re
import ssl
import stat
from dataclasses import dataclass
from warnings import catch_warnings, simplefilter

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

from lbagent.files import read_file

# HAProxy loads certificates through OpenSSL at Debian's default security level 2 (112-bit security): it refuses,
# at load, a certificate (leaf or chain) whose key is weaker or whose signature uses MD5 or SHA-1.
MIN_RSA_BITS = 2048  # RSA and DSA
MIN_EC_BITS = 224
WEAK_SIGNATURE_HASHES = (hashes.MD5, hashes.SHA1)
EXPIRY_WARNING_DAYS = 14  # a certificate that expires sooner is warned about: its renewal is late


@dataclass(frozen=True)
class TlsProblem:
    path: str
    message: str
    key: bool = False  # about the private key (else the certificate)
    kind: str = "refused"  # a warning's kind: expired, not_yet_valid, expiring, chain_incomplete, chain_extra


class TlsError(Exception):
    def __init__(self, problems: list[TlsProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))


@dataclass(frozen=True)
class Pair:
    """A certificate file and its key as read: `problems` keep them from being served; `warnings` do not (a site
    may be mid-renewal), but an operator must hear of them."""

    chain: list[x509.Certificate]
    key: PrivateKeyTypes | None
    problems: list[TlsProblem]
    warnings: list[TlsProblem]

    @property
    def validity(self) -> tuple[datetime.datetime, datetime.datetime] | None:
        """The leaf's notBefore and notAfter (UTC)."""
        if not self.chain:
            return None
        return self.chain[0].not_valid_before_utc, self.chain[0].not_valid_after_utc


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


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "an empty subject"


def _which(chain: list[x509.Certificate], index: int) -> str:
    return "the certificate" if index == 0 else f"certificate {index + 1} in the file ({_name(chain[index])})"


def key_weakness(public: PublicKeyTypes) -> str | None:
    """Why OpenSSL at security level 2 refuses this key, if it does."""
    if isinstance(public, (rsa.RSAPublicKey, dsa.DSAPublicKey)) and public.key_size < MIN_RSA_BITS:
        kind = "RSA" if isinstance(public, rsa.RSAPublicKey) else "DSA"
        return f"{kind} key of {public.key_size} bits (at least {MIN_RSA_BITS} needed)"
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.key_size < MIN_EC_BITS:
        return f"EC key on {public.curve.name} ({public.curve.key_size} bits; at least {MIN_EC_BITS} needed)"
    return None


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def _weakness_problems(cert_file: str, chain: list[x509.Certificate]) -> list[TlsProblem]:
    problems = []
    for i, cert in enumerate(chain):
        why = key_weakness(cert.public_key())
        if why is None and not _self_issued(cert):  # OpenSSL does not judge a self-signed certificate's signature
            try:
                algorithm = cert.signature_hash_algorithm
            except UnsupportedAlgorithm:
                algorithm = None
            if isinstance(algorithm, WEAK_SIGNATURE_HASHES):
                why = f"signature with {algorithm.name.upper()}"
        if why is not None:
            problems.append(TlsProblem(cert_file, f"{_which(chain, i)} has a {why}: HAProxy refuses it at load "
                                                  f"(OpenSSL security level 2, Debian's default)"))
    return problems


def _days(delta: datetime.timedelta) -> str:
    days = abs(delta.total_seconds()) / 86400
    return "less than a day" if days < 1 else f"{int(days)} day{'s' if int(days) != 1 else ''}"


def validity_warnings(cert_file: str, chain: list[x509.Certificate], now: datetime.datetime | None = None,
                      within_days: int = EXPIRY_WARNING_DAYS) -> list[TlsProblem]:
    """Expired, not yet valid, or expiring within `within_days`: the leaf and every certificate above it in the
    file (an expired intermediate fails clients just as well)."""
    now = now or datetime.datetime.now(datetime.UTC)
    out = []
    for i, cert in enumerate(chain):
        which, start, end = _which(chain, i), cert.not_valid_before_utc, cert.not_valid_after_utc
        if now < start:
            out.append(TlsProblem(cert_file, f"{which} is not valid yet: from {start:%Y-%m-%d %H:%M} UTC, in "
                                             f"{_days(start - now)}; clients refuse it until then",
                                  kind="not_yet_valid"))
        if end < now:
            out.append(TlsProblem(cert_file, f"{which} expired on {end:%Y-%m-%d %H:%M} UTC, {_days(now - end)} ago; "
                                             f"clients refuse it", kind="expired"))
        elif end - now < datetime.timedelta(days=within_days):
            out.append(TlsProblem(cert_file, f"{which} expires on {end:%Y-%m-%d %H:%M} UTC, in {_days(end - now)}: "
                                             f"renew it", kind="expiring"))
    return out


@functools.cache
def _trusted() -> dict[x509.Name, tuple[x509.Certificate, ...]]:
    """This system's trusted CA certificates (Debian: ca-certificates), by subject."""
    paths = ssl.get_default_verify_paths()
    out: dict[x509.Name, tuple[x509.Certificate, ...]] = {}
    for bundle in (paths.cafile, paths.openssl_cafile):
        if not bundle:
            continue
        try:
            data = read_file(bundle, limit=64 * 1024 * 1024)
        except OSError:
            continue
        for block in re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.DOTALL):
            try:  # one by one: a CA certificate this cryptography dislikes (a negative serial) costs only itself
                with catch_warnings():
                    simplefilter("ignore")
                    cert = x509.load_pem_x509_certificate(block)
            except ValueError:
                continue
            out[cert.subject] = (*out.get(cert.subject, ()), cert)
        break
    return out


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def chain_findings(cert_file: str, chain: list[x509.Certificate]) -> tuple[list[TlsProblem], list[TlsProblem]]:
    """(problems, warnings) about the chain in the file: a certificate that has the name of another's issuer but did
    not sign it is a problem (the file mixes certificates of different chains); a leaf whose issuer is neither in the
    file nor in this system's trust store, or a certificate that is no part of the leaf's chain, is a warning
    (clients that trust a private CA directly are content)."""
    problems: list[TlsProblem] = []
    warnings: list[TlsProblem] = []
    used = {0}
    current = 0
    while not _self_issued(chain[current]):
        cert = chain[current]
        found = [i for i, c in enumerate(chain) if i not in used and c.subject == cert.issuer]
        if not found:
            # Only the leaf's own issuer: above an intermediate comes a root, which clients must have anyway.
            if current == 0 and not any(_signed_by(cert, ca) for ca in _trusted().get(cert.issuer, ())):
                warnings.append(TlsProblem(
                    cert_file, f"the file does not hold the issuer of {_which(chain, current)}, "
                               f"{cert.issuer.rfc4514_string()}, and this system does not trust it: clients that do "
                               f"not already have it cannot verify the certificate (serve the full chain, e.g. "
                               f"certbot's fullchain.pem; a private CA that clients trust directly is fine, and is "
                               f"not warned about once it is in this system's trust store)",
                    kind="chain_incomplete"))
            break
        signer = next((i for i in found if _signed_by(cert, chain[i])), None)
        if signer is None:
            problems.append(TlsProblem(
                cert_file, f"{_which(chain, found[0])} has the name of the issuer of {_which(chain, current)} but did "
                           f"not sign it: the file mixes certificates of different chains"))
            break
        used.add(signer)
        current = signer
    if not problems:
        for i in range(len(chain)):
            if i not in used:
                warnings.append(TlsProblem(cert_file, f"{_which(chain, i)} is no part of the leaf's chain (HAProxy "
                                                      f"sends it to every client all the same)", kind="chain_extra"))
    return problems, warnings


def read_pair(cert_file: str, key_file: str, now: datetime.datetime | None = None) -> Pair:
    """The certificate chain and key, what keeps them from being served, and what should be known about them."""
    problems: list[TlsProblem] = []
    data = _read(cert_file)
    if isinstance(data, str):
        problems.append(TlsProblem(cert_file, data))
    if (why := key_permission_problem(key_file)) is not None and not why.startswith("cannot stat"):
        problems.append(TlsProblem(key_file, why, key=True))
    key_data = _read(key_file)
    if isinstance(key_data, str):
        problems.append(TlsProblem(key_file, key_data, key=True))
    pair = pair_of(data if isinstance(data, bytes) else None, key_data if isinstance(key_data, bytes) else None,
                   cert_file, key_file, now)
    return Pair(pair.chain, pair.key, problems + pair.problems, pair.warnings)


def pair_of(data: bytes | None, key_data: bytes | None, cert_name: str, key_name: str,
            now: datetime.datetime | None = None) -> Pair:
    """read_pair's checks on PEM data already read (a Kubernetes Secret's tls.crt and tls.key); None: not read."""
    problems: list[TlsProblem] = []
    warnings: list[TlsProblem] = []
    chain: list[x509.Certificate] = []
    key: PrivateKeyTypes | None = None
    if data is not None:
        try:
            chain = x509.load_pem_x509_certificates(data)
        except ValueError:
            problems.append(TlsProblem(cert_name, "no PEM certificate in the file"))
    if key_data is not None:
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            problems.append(TlsProblem(key_name, f"no usable unencrypted PEM private key: {exc}", key=True))
    if chain and key is not None:
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        leaf = chain[0].public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        if public != leaf:
            problems.append(TlsProblem(key_name, f"the private key does not belong to the certificate in {cert_name}",
                                       key=True))
    if chain:
        problems += _weakness_problems(cert_name, chain)
        chain_problems, chain_warnings = chain_findings(cert_name, chain)
        problems += chain_problems
        warnings += validity_warnings(cert_name, chain, now) + chain_warnings
    return Pair(chain, key, problems, warnings)


def check_pair(cert_file: str, key_file: str) -> list[TlsProblem]:
    """What keeps the pair from being served (warnings are not here: see read_pair)."""
    return read_pair(cert_file, key_file).problems


def combine(pair: Pair) -> str:
    """The chain then the key, as HAProxy reads one `crt` file; TlsError when they cannot be served."""
    if pair.problems or pair.key is None:
        raise TlsError(pair.problems or [TlsProblem("-", "no private key", key=True)])
    text = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in pair.chain)
    return text + pair.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode()


def combined_pem(cert_file: str, key_file: str) -> str:
    """The chain then the key, as HAProxy reads one `crt` file; TlsError when they cannot be served."""
    return combine(read_pair(cert_file, key_file))


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
