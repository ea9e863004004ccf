"""Fetch and cache the guest: Debian's kernel as an uncompressed vmlinux, and a busybox initramfs with its modules."""

from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CACHE_ROOT = Path(os.environ.get("LBAGENT_GUEST_CACHE", "/var/cache/lbagent-test/guest"))
KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# /init loads these first: the PCI transport, the two 9p shares and the overlay that make the root.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# Everything else loads on demand through the kernel's modprobe helper, as on a real node.
REQUIRED_MODULES = (
    *BOOT_MODULES,
    "veth", "nf_conntrack", "nf_nat", "xt_ipvs",
    "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_wlc", "ip_vs_sh", "ip_vs_mh",
    # libcrc32c (under nf_conntrack) asks the crypto API for crc32c: a soft dependency modules.dep does not list.
    "crc32c_generic",
)
# So the namespace lab (nftables data plane, bridge) can run in the guest too; any this kernel lacks is left out.
EXTRA_MODULES = (
    "dummy", "bridge", "nf_conntrack_netlink", "nf_tables", "nft_chain_nat", "nft_nat", "nft_ct", "nft_numgen",
    "nft_hash", "nft_masq", "nft_reject_inet", "nft_fib_inet", "nft_limit",
)
# Every IPVS scheduler and helper, so any `ipvsScheduler` a config names can be tried.
EXTRA_MODULE_DIRS = ("kernel/net/netfilter/ipvs/",)

XZ_MAGIC = b"\xfd7zXZ\x00"

INIT_SCRIPT = r"""#!/bin/sh
# PID 1 of the lbagent test guest, written by tests/guest/build.py. The host's root (9p, read-only) under a tmpfs
# overlay becomes the root of every command the host drops into the writable 9p share; see tests/guest/vm.py.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
R=/newroot
S=/share

say() { echo "guest[$(cut -d' ' -f1 /proc/uptime)]: $*"; }
die() { echo "guest: FATAL: $*"; poweroff -f; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say "init started on $(uname -r)"
modprobe -a virtio_pci 9pnet_virtio 9p overlay || die "cannot load the virtio, 9p and overlay modules"

mkdir -p /host $S /rw $R
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro,cache=loose hostroot /host || die "no hostroot share"
# No cache on the share: the host creates request files there while the guest runs.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share $S || die "no command share"
mount -t tmpfs -o mode=0755 rw /rw && mkdir /rw/upper /rw/work || die "no tmpfs"
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work root $R || die "no overlay root"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
# udev would make these; bash process substitution and /dev/stdin users need them.
ln -sfn /proc/self/fd $R/dev/fd
ln -sfn /proc/self/fd/0 $R/dev/stdin
ln -sfn /proc/self/fd/1 $R/dev/stdout
ln -sfn /proc/self/fd/2 $R/dev/stderr
# A clean /run (netns mounts, pid and lock files); /tmp stays the host's, so the tests' tmp_path files show through.
mount -t tmpfs -o mode=0755 run $R/run
mkdir -p $R/run/lbagent-guest $R/lib/modules
mount -o bind $S $R/run/lbagent-guest || die "cannot bind the command share"
# The guest kernel's modules, for tools in the root that look there (the kernel itself uses /sbin/modprobe here).
mount -o bind /lib/modules $R/lib/modules
ip link set lo up
hostname lbagent-guest

# Runs request N: "$S/N.sh" is a shell script whose first line is "# timeout=SECONDS". setsid makes the command a
# process group of its own, which a watchdog kills whole on timeout (after marking N.timedout), and which is killed
# anyway when the command exits, so nothing outlives it. This shell (PID 1) ignores SIGQUIT and gives its background
# jobs SIGINT ignored too; env (coreutils, in the root) puts every signal back to default for the command. N.rc
# appears last, by rename, so the host never reads a half-written result.
run() {
    n=$1
    read -r head < $S/$n.sh
    setsid chroot $R /usr/bin/env --default-signal /bin/sh /run/lbagent-guest/$n.sh \
        < /dev/null > $S/$n.out 2> $S/$n.err &
    pid=$!
    setsid sh -c 'sleep "$1" && : > "$2" && kill -KILL -"$3"' watchdog "${head#\# timeout=}" $S/$n.timedout $pid &
    dog=$!
    wait $pid
    rc=$?
    kill -KILL -$dog -$pid 2> /dev/null
    echo $rc > $S/$n.rc.tmp && mv $S/$n.rc.tmp $S/$n.rc
}

uname -r > $S/ready.tmp && mv $S/ready.tmp $S/ready
say "ready for commands"
n=1
while :; do
    if [ -e $S/$n.sh ]; then
        run $n
        n=$((n + 1))
    elif [ -e $S/shutdown ]; then
        break
    else
        sleep 0.02
    fi
done
say "shutting down"
poweroff -f
"""


class GuestError(RuntimeError):
    """The guest could not be prepared, booted or driven; the message says what to fix."""


@dataclass(frozen=True)
class Artifacts:
    """What QEMU boots: the kernel's uncompressed ELF image and the initramfs built for it."""

    kernel_version: str
    vmlinux: Path
    initramfs: Path


Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"guest: {message}", file=sys.stderr, flush=True)


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise GuestError(f"{argv[0]} not found: the guest is built with apt-get and dpkg (Debian)") from exc


def _recipe_hash() -> str:
    """Any change to this file (init script, module lists, build steps) gives a new initramfs."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def _cached_versions(cache: Path) -> list[str]:
    if not cache.is_dir():
        return []
    versions = (p.parent.name for p in cache.glob("*/vmlinux"))
    return sorted(versions, key=lambda v: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", v)])


def _apt_kernel_version() -> str | None:
    proc = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
    match = re.search(r"^\s*\|?Depends:\s+linux-image-(\d\S*)\s*$", proc.stdout, re.MULTILINE)
    return match.group(1) if match else None


def kernel_version(cache: Path = CACHE_ROOT, log: Log = _stderr) -> str:
    """The kernel to boot: $LBAGENT_GUEST_KERNEL, else the one linux-image-amd64 depends on (e.g. 6.1.0-56-amd64).

    Without apt lists, a cached kernel is used rather than refreshing them; with neither, `apt-get update` runs once.
    """
    if forced := os.environ.get("LBAGENT_GUEST_KERNEL"):
        return forced
    if version := _apt_kernel_version():
        return version
    if cached := _cached_versions(cache):
        log(f"apt does not know {KERNEL_METAPACKAGE}; using the cached kernel {cached[-1]}")
        return cached[-1]
    log(f"apt does not know {KERNEL_METAPACKAGE}: running apt-get update")
    _run(["apt-get", "update", "-q"])
    if version := _apt_kernel_version():
        return version
    raise GuestError(f"apt-cache knows no {KERNEL_METAPACKAGE}: is this Debian with a working apt source?")


def artifacts(version: str, cache: Path = CACHE_ROOT) -> Artifacts:
    """Where the files for this kernel live (whether built yet or not)."""
    directory = cache / version
    return Artifacts(version, directory / "vmlinux", directory / f"initramfs-{_recipe_hash()}.cpio")


def _is_built(art: Artifacts) -> bool:
    return art.vmlinux.is_file() and art.initramfs.is_file()


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One builder at a time per cache, so parallel test sessions do not download twice or trip over each other."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare(version: str | None = None, cache: Path = CACHE_ROOT, log: Log = _stderr) -> Artifacts:
    """Download and build what is missing for the guest kernel; cached runs only look at the files."""
    version = version or kernel_version(cache, log)
    art = artifacts(version, cache)
    if _is_built(art):
        return art
    with _locked(cache):
        if _is_built(art):
            return art
        # Holding the lock, any other build directory is what a killed builder left: 400 MB of unpacked kernel.
        for leftover in cache.glob(".build-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            _build(art, work, log)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return art


def _download(packages: list[str], dest: Path, log: Log) -> None:
    # The sandbox user _apt cannot write into a root-owned temporary directory; apt would only warn and go on.
    argv = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *packages]
    log(f"downloading {' '.join(packages)}")
    proc = _run(argv, cwd=dest)
    if proc.returncode != 0:
        # Usually stale lists: the mirror has moved on to a newer build of the package.
        log("apt-get download failed; running apt-get update and trying again")
        _run(["apt-get", "update", "-q"])
        proc = _run(argv, cwd=dest)
    if proc.returncode != 0:
        raise GuestError(f"apt-get download {' '.join(packages)} failed:\n{proc.stdout}{proc.stderr}")


def _unpack(deb_glob: str, work: Path, name: str) -> Path:
    debs = sorted(work.glob(deb_glob))
    if len(debs) != 1:
        raise GuestError(f"expected one {deb_glob} in {work}, found {[d.name for d in debs]}")
    root = work / name
    proc = _run(["dpkg", "-x", str(debs[0]), str(root)])
    if proc.returncode != 0:
        raise GuestError(f"dpkg -x {debs[0].name} failed: {proc.stderr}")
    return root


def _build(art: Artifacts, work: Path, log: Log) -> None:
    version = art.kernel_version
    _download([f"linux-image-{version}", BUSYBOX_PACKAGE], work, log)
    kernel = _unpack(f"linux-image-{version}_*.deb", work, "kernel")
    busybox_root = _unpack(f"{BUSYBOX_PACKAGE}_*.deb", work, "busybox")
    busybox = busybox_root / "bin" / "busybox"

    art.vmlinux.parent.mkdir(parents=True, exist_ok=True)
    if not art.vmlinux.is_file():
        log(f"extracting vmlinux from vmlinuz-{version}")
        _write_atomic(art.vmlinux, extract_vmlinux((kernel / "boot" / f"vmlinuz-{version}").read_bytes()))

    log("building the initramfs")
    # The package ships no modules.dep (its postinst makes it), so busybox's depmod makes one for the whole tree.
    _depmod(busybox, kernel, version)
    moddir = kernel / "lib" / "modules" / version
    wanted = module_closure(moddir, REQUIRED_MODULES, EXTRA_MODULES, EXTRA_MODULE_DIRS)
    stage = work / "stage"
    stage_moddir = stage / "lib" / "modules" / version
    for rel in wanted:
        (stage_moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, stage_moddir / rel)
    shutil.copy2(moddir / "modules.builtin", stage_moddir / "modules.builtin")
    _depmod(busybox, stage, version)

    tmp = art.initramfs.with_name(art.initramfs.name + ".tmp")
    with tmp.open("wb") as out:
        write_initramfs(out, busybox, stage)
    tmp.replace(art.initramfs)
    for stale in art.initramfs.parent.glob("initramfs-*.cpio"):
        if stale != art.initramfs:
            stale.unlink()
    log(f"guest ready in {art.initramfs.parent}: {len(wanted)} modules, initramfs {art.initramfs.stat().st_size} bytes")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _depmod(busybox: Path, base: Path, version: str) -> None:
    proc = _run([str(busybox), "depmod", "-b", str(base), version])
    if proc.returncode != 0:
        raise GuestError(f"depmod failed: {proc.stderr}")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage: booting it directly saves the seconds TCG spends decompressing it."""
    start = bzimage.find(XZ_MAGIC)
    while start != -1:
        try:
            elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(bzimage[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        start = bzimage.find(XZ_MAGIC, start + 1)
    raise GuestError("no xz-compressed ELF kernel found in vmlinuz")


def _module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def module_closure(
    moddir: Path, required: Iterable[str], extra: Iterable[str] = (), extra_dirs: Iterable[str] = ()
) -> list[str]:
    """Module paths (relative to moddir) for the named modules and everything they depend on, per modules.dep.

    A required module that is neither in the tree nor built in is an error; a missing extra one is left out.
    """
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {_module_name(path): path for path in deps}
    builtin = {_module_name(p) for p in (moddir / "modules.builtin").read_text().split()}

    roots: list[str] = []
    for name in required:
        if name in by_name:
            roots.append(by_name[name])
        elif name not in builtin:
            raise GuestError(f"kernel module {name} is neither in {moddir} nor built in")
    roots += [by_name[name] for name in extra if name in by_name]
    roots += [path for path in deps if path.startswith(tuple(extra_dirs))]

    closure: set[str] = set()
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path not in closure:
            closure.add(path)
            todo += deps[path]
    return sorted(closure)


class _Cpio:
    """Writes the "newc" cpio format the kernel unpacks into its initial root file system."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ino = 0

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self.out.write(b"\0" * (-(110 + len(encoded)) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self.add(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self.add(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, 0o120777, target.encode())

    def close(self) -> None:
        self.add("TRAILER!!!", 0)


def write_initramfs(out: BinaryIO, busybox: Path, tree: Path) -> None:
    """Uncompressed, so the guest spends no time inflating it: /init, busybox and its applets, the modules in tree."""
    cpio = _Cpio(out)
    applets = _run([str(busybox), "--list-full"]).stdout.split()
    dirs = {"dev", "proc", "sys", "bin", "sbin", "usr", "usr/bin", "usr/sbin"}
    dirs |= {str(Path(a).parent) for a in applets} - {"."}
    for path in tree.rglob("*"):
        rel = path.relative_to(tree)
        dirs |= {str(p) for p in rel.parents if str(p) != "."}
        if path.is_dir():
            dirs.add(str(rel))
    for name in sorted(dirs):
        cpio.directory(name)
    cpio.add("dev/console", 0o020600, rdev=(5, 1))
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in applets:
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")
    for path in sorted(tree.rglob("*")):
        if path.is_file():
            cpio.file(str(path.relative_to(tree)), path.read_bytes())
    cpio.close()
