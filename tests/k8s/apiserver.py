"""A real kube-apiserver (with its etcd embedded) on loopback, for tests: certificates, kubeconfigs, kubectl, HTTP.

    with KubeAPIServer(workdir) as api:
        api.kubectl("apply", "-f", "-", input=manifest)            # as the cluster admin
        api.kubectl("get", "svc", "-A", user="lbagent")            # as lbagent's least-privilege user
        api.request("lbagent", "GET", "/api/v1/services")          # raw HTTPS with that user's certificate

What it sets up (tests/k8s/README.md says why):
- a test CA (tests/certs.py) that signs the serving certificate (127.0.0.1, localhost) and two client certificates:
  `lbagent-test-admin` in group system:masters, and `lbagent` (no group), bound by deploy/kubernetes/rbac.yaml;
- authorization Node,RBAC, as a real cluster; service-account keys; the ServiceAccount admission plugin off (no
  controller-manager makes the tokens it waits for);
- ClusterIP ranges 198.18.0.0/16 and 2001:db8:ffff::/112 (dual stack), away from the documentation ranges that
  tests use for node addresses, endpoints and load-balancer IPs;
- `lbagent` also has a bearer token (--token-auth-file), as the Vagrant lab's k3s gives it
  (lbagent-token.kubeconfig: the shape vagrant/provision/lb.sh writes);
- readiness by polling /readyz; a kubeconfig per user in the work directory (admin.kubeconfig, lbagent.kubeconfig).

Stopping sends SIGTERM to the server's process group (SIGKILL after a grace period) and deletes etcd's data; the
server gets SIGTERM by itself when the process that started it dies (main.go).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests import programs
from tests.certs import TestCA
from tests.k8s import build, crds

REPO = programs.REPO
RBAC_MANIFEST = REPO / "deploy" / "kubernetes" / "rbac.yaml"
RBAC_HTTP_MANIFEST = REPO / "deploy" / "kubernetes" / "rbac-http.yaml"  # what serving Ingresses adds
# The least-privilege user lbagent connects as: the common name of its client certificate, the User subject of the
# ClusterRoleBinding in RBAC_MANIFEST.
LBAGENT_USER = "lbagent"
ADMIN_USER = "lbagent-test-admin"
ADMIN_GROUP = "system:masters"
CLUSTER_NAME = "lbagent-test"
# ClusterIPs: 198.18.0.0/15 is reserved for network benchmarks (RFC 2544), routed nowhere; a /16 holds the
# benchmark's 10,000 Services with room to spare, where a /24 of the documentation ranges would not. IPv6 takes a
# /112 (the largest a service range may be is 2^20 addresses) at the top of the documentation prefix 2001:db8::/32.
SERVICE_CIDRS = ("198.18.0.0/16", "2001:db8:ffff::/112")
READY_TIMEOUT = 120.0
POLL_SECONDS = 0.1
STOP_GRACE_SECONDS = 15.0
START_ATTEMPTS = 3
RUN_DIR_PREFIX = "lbagent-kube-apiserver-"
KUBECTL_TIMEOUT = 60.0

Log = Callable[[str], None]


class APIServerError(RuntimeError):
    """The kube-apiserver could not be started or driven; the message says why (with its log's last lines)."""


def _stderr(message: str) -> None:
    print(f"kube-apiserver: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class User:
    """A client identity: its certificate and key files, and a kubeconfig that uses them."""

    name: str
    cert_file: Path
    key_file: Path
    kubeconfig: Path


def _sign(ca: TestCA, stem: str, common_name: str, *, organizations: Sequence[str] = (),
          dns: Sequence[str] = (), ips: Sequence[str] = (), server: bool = False) -> tuple[Path, Path]:
    """A leaf certificate from the test CA, with what TestCA.issue does not give: groups (O=) and IP addresses."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    subject.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name(subject)).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    cert_file, key_file = ca.directory / f"{stem}.crt", ca.directory / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_file, key)
    return cert_file, key_file


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca_file: Path, user: str, cert_file: Path, key_file: Path,
                     namespace: str = "default") -> None:
    """A self-contained kubeconfig (certificates inline), as one would hand to an LB node."""
    context = f"{user}@{CLUSTER_NAME}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER_NAME,
                      "cluster": {"server": server, "certificate-authority-data": _b64(ca_file)}}],
        "users": [{"name": user,
                   "user": {"client-certificate-data": _b64(cert_file), "client-key-data": _b64(key_file)}}],
        "contexts": [{"name": context, "context": {"cluster": CLUSTER_NAME, "user": user, "namespace": namespace}}],
        "current-context": context,
    }
    _write_kubeconfig_file(path, config)


def write_token_kubeconfig(path: Path, server: str, ca_file: Path, user: str, token: str) -> None:
    """A kubeconfig with a bearer token, the shape vagrant/provision/lb.sh writes for the LB nodes."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER_NAME,
                      "cluster": {"server": server, "certificate-authority-data": _b64(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": f"{user}@{CLUSTER_NAME}", "context": {"cluster": CLUSTER_NAME, "user": user}}],
        "current-context": f"{user}@{CLUSTER_NAME}",
    }
    _write_kubeconfig_file(path, config)


def _write_kubeconfig_file(path: Path, config: Mapping[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _remove_orphaned_run_dirs() -> None:
    """etcd data directories of test processes that died without cleaning up (SIGKILL)."""
    for run_dir in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        try:
            os.kill(int((run_dir / "owner").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(run_dir, ignore_errors=True)
        except (OSError, ValueError):
            pass


def kubectl_path() -> str:
    """The kubectl built with the kube-apiserver (tests/k8s/build.py), or $LBAGENT_TEST_KUBECTL."""
    if forced := os.environ.get("LBAGENT_TEST_KUBECTL"):
        return forced
    return str(build.kubectl())


class KubeAPIServer:
    """kube-apiserver and its etcd in one process, on 127.0.0.1; see the module's docstring."""

    def __init__(self, workdir: Path, binary: Path | None = None, log: Log = _stderr,
                 extra_flags: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir)
        self.binary = binary
        self.extra_flags = tuple(extra_flags)  # e.g. a wider --service-node-port-range for the benchmark
        self.log = log
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_dir: Path | None = None
        self.log_file = self.workdir / "kube-apiserver.log"
        self.log_offset = 0  # where the current server's output starts in log_file
        self.startup_seconds = 0.0
        self.users: dict[str, User] = {}
        self.ca: TestCA | None = None
        # lbagent's user also has a bearer token (--token-auth-file), as k3s gives it in the Vagrant lab
        self.lbagent_token = secrets.token_hex(32)
        self.token_kubeconfig = self.workdir / f"{LBAGENT_USER}-token.kubeconfig"

    # Life cycle

    def __enter__(self) -> KubeAPIServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        started = time.monotonic()
        if self.binary is None:
            self.binary = build.build(log=self.log)
        self.workdir.mkdir(parents=True, exist_ok=True)
        _remove_orphaned_run_dirs()
        self._make_pki()
        for attempt in range(1, START_ATTEMPTS + 1):
            self._spawn()
            if self._wait_ready():
                break
            # Another process took the port between free_port() and the server's bind: try another one.
            self._kill()
            if attempt == START_ATTEMPTS:
                raise APIServerError(f"kube-apiserver could not bind a port {START_ATTEMPTS} times\n{self.log_tail()}")
            self.log(f"port {self.port} was taken meanwhile; trying another")
        self._write_kubeconfigs()
        self.kubectl("apply", "-f", str(RBAC_MANIFEST), "-f", str(RBAC_HTTP_MANIFEST))
        self.startup_seconds = time.monotonic() - started
        self.log(f"ready at {self.url} in {self.startup_seconds:.1f} s (kubeconfigs in {self.workdir})")

    def _make_pki(self) -> None:
        pki = self.workdir / "pki"
        self.ca = ca = TestCA(pki, name="lbagent test cluster CA")
        self.serving = _sign(ca, "apiserver", "kube-apiserver", server=True, ips=["127.0.0.1"],
                             dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"])
        self.admin_cert = _sign(ca, "admin", ADMIN_USER, organizations=[ADMIN_GROUP])
        self.lbagent_cert = _sign(ca, "lbagent", LBAGENT_USER)
        self.token_file = pki / "tokens.csv"  # token,user,uid
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.lbagent_token},{LBAGENT_USER},{LBAGENT_USER}\n")
        # Service-account tokens: kube-apiserver insists on a signing key even though no test uses a token.
        self.sa_key = pki / "service-account.key"
        self.sa_pub = pki / "service-account.pub"
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(self.sa_key, key)
        self.sa_pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))

    def _flags(self) -> list[str]:
        serving_cert, serving_key = self.serving
        assert self.ca is not None
        return [
            "--bind-address=127.0.0.1",
            f"--secure-port={self.port}",
            # Only the Service "kubernetes" would list this address; nothing writes its endpoints (no reconciler):
            # a loopback address there is refused by validation, and the machine's own address has no business in
            # a test's API.
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={serving_cert}",
            f"--tls-private-key-file={serving_key}",
            f"--client-ca-file={self.ca.cert_file}",
            f"--token-auth-file={self.token_file}",
            "--authorization-mode=Node,RBAC",
            "--anonymous-auth=false",
            f"--service-cluster-ip-range={','.join(SERVICE_CIDRS)}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={self.sa_pub}",
            f"--service-account-signing-key-file={self.sa_key}",
            # It waits for token controllers of a kube-controller-manager that does not run here.
            "--disable-admission-plugins=ServiceAccount",
            "--profiling=false",
            *self.extra_flags,
        ]

    def _spawn(self) -> None:
        assert self.binary is not None
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
            (self.run_dir / "owner").write_text(str(os.getpid()))
        etcd_dir = self.run_dir / "etcd"
        shutil.rmtree(etcd_dir, ignore_errors=True)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        argv = [str(self.binary), "--etcd-dir", str(etcd_dir), "--", *self._flags()]
        with self.log_file.open("ab") as log:
            log.write(f"\n=== {' '.join(argv)}\n".encode())
            log.flush()
            self.log_offset = log.tell()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def _wait_ready(self) -> bool:
        """Polls /readyz until it answers ok; False when the port turned out to be taken; raises on anything else."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer yet"
        while time.monotonic() < deadline:
            if (code := self.proc.poll()) is not None:
                if "bind: address already in use" in self._log_since_spawn():
                    return False
                raise APIServerError(f"kube-apiserver exited with {code} while starting\n{self.log_tail()}")
            try:
                status, body = self._raw_request(self.admin_cert, "GET", "/readyz", timeout=5.0)
            except (OSError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if status == 200:
                    return True
                last = f"HTTP {status}: {body.decode(errors='replace')[-300:]}"
            time.sleep(POLL_SECONDS)
        raise APIServerError(f"kube-apiserver not ready after {READY_TIMEOUT:.0f} s ({last})\n{self.log_tail()}")

    def _write_kubeconfigs(self) -> None:
        assert self.ca is not None
        for name, (cert, key) in (("admin", self.admin_cert), (LBAGENT_USER, self.lbagent_cert)):
            kubeconfig = self.workdir / f"{name}.kubeconfig"
            write_kubeconfig(kubeconfig, self.url, self.ca.cert_file, name, cert, key)
            self.users[name] = User(name, cert, key, kubeconfig)
        write_token_kubeconfig(self.token_kubeconfig, self.url, self.ca.cert_file, LBAGENT_USER, self.lbagent_token)

    def _kill(self) -> None:
        """SIGTERM to the process group (kube-apiserver shuts down, then etcd), SIGKILL if it takes too long."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.log(f"no exit {STOP_GRACE_SECONDS:.0f} s after SIGTERM: SIGKILL")
        # Whatever is left of the group (the server itself after a timeout), at once.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """Stops the server and deletes etcd's data; certificates, kubeconfigs and the log stay in the workdir."""
        self._kill()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def _log_since_spawn(self) -> str:
        with self.log_file.open("rb") as log:
            log.seek(self.log_offset)
            return log.read().decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # Clients

    def install_gateway_api(self) -> None:
        """The Gateway API's CRDs (tests/k8s/crds.py), established. Applying them again changes nothing."""
        files = crds.crd_files()
        self.kubectl("apply", "--server-side", "--force-conflicts", *(a for f in files for a in ("-f", str(f))))
        names = [d["metadata"]["name"] for f in files for d in yaml.safe_load_all(f.read_text())
                 if d and d.get("kind") == "CustomResourceDefinition"]
        self.kubectl("wait", "--for", "condition=established", "--timeout=60s", *(f"crd/{n}" for n in names))

    def kubeconfig(self, user: str = "admin") -> Path:
        return self.users[user].kubeconfig

    def kubectl(self, *args: str, user: str = "admin", input: str | None = None, check: bool = True,
                timeout: float = KUBECTL_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Runs kubectl as the user (admin: system:masters; lbagent: the ClusterRole of RBAC_MANIFEST).

        check: raise APIServerError on a non-zero exit, with kubectl's output.
        """
        argv = [kubectl_path(), f"--kubeconfig={self.kubeconfig(user)}",
                f"--cache-dir={self.workdir / 'kubectl-cache'}", *args]
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise APIServerError(f"kubectl {' '.join(args)} (as {user}) exited {proc.returncode}:\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def _raw_request(self, cert: tuple[Path, Path], method: str, path: str, body: bytes | None = None,
                     headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
        assert self.ca is not None
        context = ssl.create_default_context(cafile=str(self.ca.cert_file))
        context.load_cert_chain(str(cert[0]), str(cert[1]))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def request(self, user: str, method: str, path: str, body: Any = None, content_type: str = "application/json",
                timeout: float = 30.0) -> tuple[int, Any]:
        """An HTTPS request as the user; a body that is not bytes is sent as JSON. Returns (status, parsed JSON,
        or the text when the answer is not JSON)."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        account = self.users[user]
        status, raw = self._raw_request((account.cert_file, account.key_file), method, path, data,
                                        {"Content-Type": content_type, "Accept": "application/json"}, timeout)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def watch(self, user: str, path: str, seconds: int) -> list[dict[str, Any]]:
        """The events of a watch on a collection path (e.g. /api/v1/services) that the server ends after `seconds`."""
        account = self.users[user]
        separator = "&" if "?" in path else "?"
        status, raw = self._raw_request((account.cert_file, account.key_file), "GET",
                                        f"{path}{separator}watch=1&timeoutSeconds={seconds}",
                                        headers={"Accept": "application/json"}, timeout=seconds + 30.0)
        if status != 200:
            raise APIServerError(f"watch {path} as {user}: HTTP {status}: {raw.decode(errors='replace')}")
        return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
