"""The certificate files HAProxy reads: each listener's certificate and key, checked and combined into one private
PEM under the runtime directory, and noticed when the operator replaces them on disk."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from lbagent import model
from lbagent.files import private_dir, write_private
from lbagent.logfmt import event

log = logging.getLogger("lbagent.certs")


@dataclass(frozen=True)
class _Seen:
    """What the source files looked like when last read: a replaced file has another identity or time."""

    cert: tuple[int, int, int, int]
    key: tuple[int, int, int, int]


def _identity(path: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


def directory(runtime_dir: str | Path) -> Path:
    """Where `run` writes the combined files, so where haproxy.cfg's `crt` lines point: `<runtimeDir>/haproxy/certs`
    (`lbagent plan` shows the same paths)."""
    return Path(runtime_dir) / "haproxy" / "certs"


def combined_paths(listeners: Iterable[model.Listener], directory: str | Path) -> dict[str, tuple[str, ...]]:
    """Listener name -> its combined files in `directory`, one per certificate in the listener's order, named as
    CertificateStore writes them (listeners without certificates are left out)."""
    return {listener.name: tuple(_combined_path(directory, listener.name, i) for i in range(len(listener.certificates)))
            for listener in listeners if listener.certificates}


def _combined_path(directory: str | Path, listener: str, index: int) -> str:
    return str(Path(directory) / f"{listener}-{index}.pem")


@dataclass(frozen=True)
class Replaced:
    path: str  # the combined file HAProxy reads
    pem: str


class CertificateStore:
    """Combined PEM files, one per (listener, certificate), written 0600 in `directory`."""

    def __init__(self, directory: str | Path, base: str | Path | None = None,
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)) -> None:
        """`base`: the runtime directory `directory` is in (no directory between them may be a symbolic link)."""
        self.directory = Path(directory)
        self._base = base
        self._clock = clock
        self._validity: dict[str, _Validity] = {}  # combined file -> its leaf's validity, as last loaded
        self._seen: dict[str, _Seen] = {}
        self._sources: dict[str, model.Certificate] = {}
        self._pending: dict[str, str] = {}  # combined files rewritten since HAProxy last read them
        self._refused: set[str] = set()  # combined files whose current sources did not pass the checks

    def path_for(self, listener: str, index: int) -> str:
        return _combined_path(self.directory, listener, index)

    def sync(self, listeners: Iterable[model.Listener]) -> dict[str, tuple[str, ...]]:
        """Each HTTPS listener's combined files, written when missing or when their sources changed. A source that
        no longer passes the checks keeps its last good file (and says why in the log)."""
        private_dir(self.directory, self._base)
        out: dict[str, tuple[str, ...]] = {}
        wanted: dict[str, model.Certificate] = {}
        for listener in listeners:
            paths = []
            for i, cert in enumerate(listener.certificates):
                path = self.path_for(listener.name, i)
                wanted[path] = cert
                if self._sources.get(path) != cert:
                    self._seen.pop(path, None)
                    self._sources[path] = cert
                self._refresh(path, cert)  # reads the sources only when new or changed (or the file is gone)
                if Path(path).exists():  # a listener is never given a file that is not there
                    paths.append(path)
            if paths:
                out[listener.name] = tuple(paths)
        for path in set(self._sources) - set(wanted):
            self._sources.pop(path, None)
            self._seen.pop(path, None)
            self._validity.pop(path, None)
            self._refused.discard(path)
            Path(path).unlink(missing_ok=True)
        return out

    def look(self) -> bool:
        """Re-read the sources that changed on disk; True when a combined file was rewritten. A certificate that
        expired (or became valid) since the last look is said in the log."""
        rewritten = any([self._refresh(path, cert) is not None for path, cert in list(self._sources.items())])
        now = self._clock()
        for path, known in list(self._validity.items()):
            state = known.state(now)
            if state != known.said:
                self._validity[path] = replace(known, said=state)
                if state != "valid":
                    known.log(state, now)
        return rewritten

    def validity(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(listener, certificate file) -> the served leaf's notBefore and notAfter as Unix times, for metrics."""
        return {(v.listener, v.cert_file): (v.not_before.timestamp(), v.not_after.timestamp())
                for v in self._validity.values()}

    def take_pending(self) -> list[Replaced]:
        """The combined files rewritten since the last call, for HAProxy's runtime API (a reload reads them anyway)."""
        out = [Replaced(path, pem) for path, pem in self._pending.items()]
        self._pending.clear()
        return out

    def requeue(self, replaced: Replaced) -> None:
        """A replacement HAProxy did not take: offered again by the next take_pending (unless a newer one is)."""
        if replaced.path in self._sources:
            self._pending.setdefault(replaced.path, replaced.pem)

    def _refresh(self, path: str, cert: model.Certificate) -> str | None:
        """Re-read one source when it changed; the new combined text, or None (unchanged or refused)."""
        seen = _Seen(_identity(cert.cert_file), _identity(cert.key_file))
        target = Path(path)
        if self._seen.get(path) == seen and (target.exists() or path in self._refused):
            return None
        self._seen[path] = seen
        # Here, not at the top: cryptography's x509 is 9 MiB of an agent's memory, and only TLS listeners need it.
        from lbagent import tls  # noqa: PLC0415

        pair = tls.read_pair(cert.cert_file, cert.key_file, self._clock())
        try:
            pem = tls.combine(pair)
        except tls.TlsError as exc:
            self._refused.add(path)  # said once; read again when the sources change
            for problem in exc.problems:
                event(log, logging.ERROR, "certificate_refused", file=problem.path, error=problem.message,
                      kept=path if target.exists() else "-")
            return None
        self._refused.discard(path)
        for warning in pair.warnings:  # served all the same (a site may be mid-renewal), but said each time it is read
            event(log, logging.WARNING, f"certificate_{warning.kind}", file=warning.path, error=warning.message)
        if pair.validity is not None:
            start, end = pair.validity
            known = _Validity(self._listener(path), cert.cert_file, start, end, "")
            self._validity[path] = replace(known, said=known.state(self._clock()))
        if target.exists() and target.read_text() == pem:
            return None
        write_private(target, pem)
        self._pending[path] = pem
        event(log, logging.INFO, "certificate_loaded", file=cert.cert_file, key=cert.key_file, combined=path)
        return pem

    def _listener(self, path: str) -> str:
        return Path(path).stem.rsplit("-", 1)[0]  # undoes _combined_path


@dataclass(frozen=True)
class _Validity:
    listener: str
    cert_file: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    said: str  # the state last said in the log (or known when loaded)

    def state(self, now: datetime.datetime) -> str:
        return "not_yet_valid" if now < self.not_before else "expired" if self.not_after < now else "valid"

    def log(self, state: str, now: datetime.datetime) -> None:
        when = self.not_before if state == "not_yet_valid" else self.not_after
        days = abs((now - when).total_seconds()) / 86400
        event(log, logging.WARNING, f"certificate_{state}", file=self.cert_file, listener=self.listener,
              days=f"{days:.1f}", error="expired while served" if state == "expired" else "not valid yet")
