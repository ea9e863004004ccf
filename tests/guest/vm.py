"""Boot the guest once under QEMU (TCG) and run many commands in it, through files in a shared directory."""

from __future__ import annotations

import atexit
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.guest import build
from tests.guest.build import Artifacts, GuestError, Log
from tests.lab.lab import TIME_SCALE_VARIABLE

QEMU = "qemu-system-x86_64"
# mitigations=off: page-table isolation and friends cost far more under TCG than on hardware, for nothing in a test.
KERNEL_CMDLINE = "console=ttyS0 panic=-1 mitigations=off quiet"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POLL_SECONDS = 0.02
# Time the guest may take beyond a command's own timeout to kill it and report (TCG is slow, the host may be busy).
ANSWER_GRACE_SECONDS = 30.0
SHUTDOWN_SECONDS = 10.0
RUN_DIR_PREFIX = "lbagent-guest-"
# What the guest's slowdown is measured with: starting Python (imports read over 9p) and a fixed loop, timed by a
# parent Python in the same system, so the host and the guest are measured alike.
SPEED_PROBE = (
    "import subprocess, sys, time\n"
    "t = time.monotonic()\n"
    "subprocess.run([sys.executable, '-c', 'import json, socket, http.server; sum(i * i for i in range(300000))'],"
    " check=True)\n"
    "print(time.monotonic() - t)\n"
)


def _stderr(message: str) -> None:
    print(f"guest: {message}", file=sys.stderr, flush=True)


def _remove_orphaned_run_dirs() -> None:
    """Run directories of processes that died without cleaning up (SIGKILL); their QEMU died with them."""
    for run_dir in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        try:
            os.kill(int((run_dir / "owner").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(run_dir, ignore_errors=True)
        except (OSError, ValueError):
            pass


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Guest:
    """A booted Debian guest whose root is this host's root (read-only, with a tmpfs overlay), running as root.

    The host's programs, venv and this repository run in it unchanged; writes stay in the guest. The root is cached
    loosely: files the host creates after boot show up in the guest, but a file the guest has read and the host then
    changes may read stale, so give changed content a new name. Commands run one at a time, each in its own process
    group, which is killed when the command exits or times out.

    `start()` boots (preparing the kernel first if needed); `run()` runs a command; `stop()` powers off and cleans up.
    Use it as a context manager. QEMU is killed if this process dies, or, strictly, if the thread that called
    `start()` ends (PR_SET_PDEATHSIG): start it from a thread that lives as long as the guest.
    """

    def __init__(
        self,
        artifacts: Artifacts | None = None,
        *,
        memory_mib: int = 1024,
        cpus: int = 2,
        boot_timeout: float = 120.0,
        log: Log = _stderr,
    ) -> None:
        self.artifacts = artifacts
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.boot_timeout = boot_timeout
        self.log = log
        self.kernel_release = ""
        self.boot_seconds = 0.0
        # How many times slower than the host the guest runs Python, measured after boot; every command gets it as
        # LBAGENT_TEST_TIME_SCALE, which multiplies the lab's deadlines (tests/lab/lab.py, time_scale).
        self.slowdown = 1.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._next = 1
        # The request the guest is working on, until its answer is read: an interrupted run() leaves it set.
        self._pending: int | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def _share(self) -> Path:
        assert self._dir is not None, "the guest is not started"
        return self._dir / "share"

    def console_tail(self, lines: int = 40) -> str:
        """The end of the guest's serial console and of QEMU's own output, for error messages."""
        if self._dir is None:
            return ""
        parts = [
            f"--- {name} (last {lines} lines) ---\n{text}"
            for name, text in (("console", _tail(self._dir / "console.log", lines)),
                               ("qemu", _tail(self._dir / "qemu.log", lines)))
            if text
        ]
        return "\n".join(parts) or "(no console output)"

    def qemu_argv(self, art: Artifacts, qemu: str) -> list[str]:
        assert self._dir is not None
        return [
            qemu,
            # TCG only: this host's /dev/kvm cannot run a stock Debian kernel.
            "-machine", "pc,accel=tcg",
            # Every CPU feature TCG can emulate: Python runs about a fifth faster than on the default qemu64 model.
            "-cpu", "max",
            "-smp", str(self.cpus),
            "-m", f"{self.memory_mib}M",
            "-nodefaults", "-no-user-config", "-display", "none",
            # A guest panic (panic=-1 reboots) or poweroff ends QEMU instead of booting again.
            "-no-reboot",
            "-kernel", str(art.vmlinux),
            "-initrd", str(art.initramfs),
            "-append", KERNEL_CMDLINE,
            "-chardev", f"file,id=console,path={self._dir / 'console.log'}",
            "-serial", "chardev:console",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={self._share},mount_tag=share,security_model=none,multidevs=remap",
        ]

    def start(self) -> None:
        """Boot and wait until the guest takes commands; GuestError (with the console's end) if it does not."""
        if self._proc is not None:
            raise GuestError("the guest is already started")
        qemu = shutil.which(QEMU)
        if qemu is None:
            raise GuestError(f"{QEMU} not found: apt-get install --no-install-recommends qemu-system-x86")
        art = self.artifacts = self.artifacts or build.prepare(log=self.log)
        self.kernel_release = ""
        self._next = 1
        self._pending = None
        begin = time.monotonic()
        atexit.register(self.stop)
        try:
            _remove_orphaned_run_dirs()
            self._dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
            (self._dir / "owner").write_text(f"{os.getpid()}\n")
            self._share.mkdir()
            with (self._dir / "qemu.log").open("wb") as qemu_log:
                # setpriv (util-linux) makes the kernel kill QEMU when this process dies, even by SIGKILL.
                self._proc = subprocess.Popen(
                    ["setpriv", "--pdeathsig", "KILL", *self.qemu_argv(art, qemu)],
                    stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log,
                )
            self.kernel_release = self._wait_ready(begin + self.boot_timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - begin
        self.slowdown = self.measure_slowdown()
        self.log(f"guest {self.kernel_release} booted in {self.boot_seconds:.1f}s; it runs Python "
                 f"{self.slowdown:.1f}x slower than this host")

    def measure_slowdown(self, tries: int = 3) -> float:
        """The guest's time for SPEED_PROBE over the host's, each the best of `tries`, measured now (a busy host
        slows both, and the guest more: it is the guest's slowdown the deadlines need)."""
        host = min(float(subprocess.run([sys.executable, "-c", SPEED_PROBE], capture_output=True, text=True,
                                        check=True).stdout) for _ in range(tries))
        guest = min(float(self.run([sys.executable, "-c", SPEED_PROBE], env={TIME_SCALE_VARIABLE: "1"},
                                   timeout=300, check=True).stdout) for _ in range(tries))
        return max(1.0, guest / host)

    def _wait_ready(self, deadline: float) -> str:
        ready = self._share / "ready"
        while not ready.exists():
            self._check_alive("while booting")
            if time.monotonic() > deadline:
                raise GuestError(f"the guest did not boot within {self.boot_timeout:g}s\n{self.console_tail()}")
            time.sleep(POLL_SECONDS)
        return ready.read_text().strip()

    def _check_alive(self, doing: str) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise GuestError(
                f"QEMU exited (status {self._proc.returncode}) {doing}: the guest powered off or panicked\n"
                f"{self.console_tail()}"
            )

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the guest like subprocess.run with captured text output.

        cmd is an argv list, or a string for /bin/sh. cwd defaults to this process's working directory (the same
        path exists in the guest). The environment is a plain root one (PATH, HOME, LANG) plus env. On timeout the
        command's process group is killed and subprocess.TimeoutExpired raised with the output so far; with check,
        a non-zero exit raises subprocess.CalledProcessError. GuestError if the guest itself stops answering.
        """
        if not cmd:
            raise ValueError("empty command")
        variables = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8",
                     TIME_SCALE_VARIABLE: f"{self.slowdown:.2f}", **(env or {})}
        if bad := [name for name in variables if not name.isidentifier() or not name.isascii()]:
            raise ValueError(f"not environment variable names: {bad}")
        with self._lock:
            if not self.running:
                raise GuestError("the guest is not running")
            n = self._next
            self._next += 1
            share = self._share
            lines = [
                f"# timeout={max(1, math.ceil(timeout))}",
                *(f"export {name}={shlex.quote(value)}" for name, value in variables.items()),
                f"cd {shlex.quote(os.fspath(cwd if cwd is not None else os.getcwd()))} || exit 125",
                cmd if isinstance(cmd, str) else f"exec {shlex.join(cmd)}",
            ]
            request = share / f"{n}.sh"
            tmp = share / f"{n}.sh.tmp"
            tmp.write_text("\n".join(lines) + "\n")
            self._pending = n
            tmp.replace(request)
            try:
                rc_file = share / f"{n}.rc"
                deadline = time.monotonic() + timeout + ANSWER_GRACE_SECONDS
                while not rc_file.exists():
                    self._check_alive(f"while running {cmd!r}")
                    if time.monotonic() > deadline:
                        tail = self.console_tail()
                        self.stop()
                        raise GuestError(f"the guest stopped answering while running {cmd!r}\n{tail}")
                    time.sleep(POLL_SECONDS)
                returncode = int(rc_file.read_text())
                stdout = (share / f"{n}.out").read_text(errors="replace")
                stderr = (share / f"{n}.err").read_text(errors="replace")
                timed_out = (share / f"{n}.timedout").exists()
                self._pending = None
            finally:
                if self._dir is not None:
                    for leftover in share.glob(f"{n}.*"):
                        leftover.unlink(missing_ok=True)
        if timed_out:
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
        if check and returncode != 0:
            raise subprocess.CalledProcessError(returncode, cmd, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)

    def stop(self) -> None:
        """Power the guest off (or kill QEMU if it does not), then remove the temporary files. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # An idle guest powers off by itself; one still booting or busy (a command hung) is not worth waiting for.
            if self.kernel_release and self._pending is None and self._dir is not None:
                try:
                    (self._share / "shutdown").touch()
                    proc.wait(timeout=SHUTDOWN_SECONDS)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        atexit.unregister(self.stop)
