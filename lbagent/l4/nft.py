"""The one runner of nftables scripts for the L4 data planes (the nftables table, IPVS's companion table): a script
applied in one transaction, its commits remembered as lbagent's own so the drift watcher does not report them.

Two ways to the kernel, chosen by the script's size:

- **In process**, through libnftables (the library `nft` itself is built on), for the small transactions a change
  makes (the nftables data plane sends those that are only dispatch and nodePort elements over netlink itself:
  lbagent.l4.nftables.netlink). An `nft` process costs 2.5 ms to start, and every new one reads the kernel's ruleset
  afresh: deleting one element of a 20,000-element map took 16-23 ms that way, against 0.1-1 ms in a context that
  stays open and keeps its cache (libnftables refreshes the cache when the ruleset's generation moved under it, so a
  foreign change is seen). The binding is five C functions through ctypes: the upstream Python binding ships only as
  Debian's python3-nftables for the system Python, not for the agent's own environment, and its PyPI copies are
  unofficial.
- **An `nft` process** for whole tables (start, resync, repair): parsing 400,000 elements takes about 140 MiB, which a
  process gives back when it exits and a long-running agent's heap would keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import socket
import threading
from collections.abc import Iterator

from lbagent.l4.drift import NETFILTER_SOCKETS, NETLINK_NETFILTER, remember_own
from lbagent.logfmt import event

log = logging.getLogger("lbagent.dataplane")

# Scripts up to this size go through the in-process library (a change's transaction is a few KB: one Maglev table
# of 1,021 slots is 25 KB); larger ones, whole tables, through an `nft` process.
IN_PROCESS_LIMIT = 256 * 1024
FD_SETSIZE = 1024  # glibc's select() limit


class NftError(RuntimeError):
    """nft refused the script; the kernel kept the previous ruleset (the transaction is all or nothing)."""


async def run_nft(args: list[str], script: str | None = None) -> str:
    """Run nft with the script on stdin and return its output."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    proc = await asyncio.create_subprocess_exec(
        nft, *args,
        stdin=asyncio.subprocess.PIPE if script is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    remember_own(proc.pid)  # its commits are lbagent's own, not drift
    out, err = await proc.communicate(script.encode() if script is not None else None)
    if proc.returncode != 0:
        raise NftError(f"nft {' '.join(args)} exited {proc.returncode}: {err.decode(errors='replace').strip()}")
    return out.decode()


async def apply_script(script: str) -> None:
    """Apply an nft script (one transaction), in process when it is small and libnftables is there."""
    library = _library() if len(script) <= IN_PROCESS_LIMIT else None
    if library is None:
        await run_nft(["-f", "-"], script)
        return
    await asyncio.to_thread(library.run, script)


class Libnftables:
    """One libnftables context for the process, used by one thread at a time (libnftables is not thread-safe)."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_filename.restype = ctypes.c_int
        self._lib = lib
        self._lock = threading.Lock()
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        with NETFILTER_SOCKETS:  # no other netfilter socket of lbagent's is opened meanwhile
            before = _sockets()
            self._ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
            if not self._ctx:
                raise OSError("nft_ctx_new failed")
            # The context's own netlink socket, bound now so that its port id is known before its first commit.
            found = {fd: port for fd in _sockets() - before if (port := _bind_netfilter(fd))}
        if any(fd >= FD_SETSIZE for fd in found):
            # libnftables waits for the kernel's answer with select(), which aborts the whole process (glibc's
            # fortify check) on a descriptor from 1024 up: a busy agent (thousands of probe connections) must
            # make its context early (prepare()), or do without it.
            lib.nft_ctx_free(self._ctx)
            raise OSError(f"libnftables' socket is descriptor {max(found)}, beyond select()'s {FD_SETSIZE}")
        self._ports = set(found.values())
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, script: str) -> str:
        """Apply the script and return its output; NftError with libnftables' message when it is refused."""
        # From a file, not a buffer: libnftables 1.0.6 quotes the first line of a buffer in its errors, whichever
        # line it refused; from a file it quotes the right one ("script:2:20-28: Error: ...").
        with self._lock, _script_file(script) as path:
            self._remember_own()
            status = self._lib.nft_run_cmd_from_filename(self._ctx, path.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            self._remember_own()
        if status != 0:
            raise NftError(f"libnftables refused the script: {err.strip()}")
        return out

    def _remember_own(self) -> None:
        """The kernel names the committer of a generation by the committing thread's id (as seen outside any pid
        namespace) and by its netlink socket's port id: both are this process's own, and the drift watcher must
        not take them for someone else's."""
        remember_own(threading.get_native_id())
        for port in self._ports:
            remember_own(port)


@contextlib.contextmanager
def _script_file(script: str) -> Iterator[str]:
    """The script in an anonymous in-memory file, named by a path libnftables can open."""
    fd = os.memfd_create("script", os.MFD_CLOEXEC)
    try:
        os.write(fd, script.encode())
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _sockets() -> set[int]:
    """The process's open sockets, by file descriptor."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                out.add(int(name))
        except OSError:
            continue
    return out


def _bind_netfilter(fd: int) -> int:
    """A netfilter netlink socket's port id, binding it first if it is not bound yet (the kernel picks the port id,
    as it would at its first send); 0 for any other socket (pyroute2's routing sockets, say), left as it is."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family != socket.AF_NETLINK or sock.proto != NETLINK_NETFILTER:
                return 0
            if sock.getsockname()[0] == 0:
                sock.bind((0, 0))
            port: int = sock.getsockname()[0]
            return port
    except OSError:
        return 0


_LIBRARY: Libnftables | None = None
_LIBRARY_LOADED = False
_LIBRARY_LOCK = threading.Lock()


def prepare() -> None:
    """Make the process's libnftables context now, while few descriptors are open (see Libnftables): the agent
    calls it when its nftables forwarder is made, before any probe opens a connection."""
    _library()


def _library() -> Libnftables | None:
    """The process's libnftables context, made on first use; None when the library cannot be loaded (then every
    script goes through an `nft` process)."""
    global _LIBRARY, _LIBRARY_LOADED  # noqa: PLW0603 (one context per process, made lazily)
    with _LIBRARY_LOCK:
        if not _LIBRARY_LOADED:
            _LIBRARY_LOADED = True
            path = ctypes.util.find_library("nftables") or "libnftables.so.1"
            try:
                _LIBRARY = Libnftables(path)
            except OSError as exc:
                _LIBRARY = None
                event(log, logging.WARNING, "libnftables_unused", error=str(exc),
                      consequence="every nftables change runs an nft process (slower, same result)")
        return _LIBRARY
