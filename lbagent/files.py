"""Files lbagent reads and writes, safely. Read (config and certificate files, read_file): regular files only, of a
bounded size. Written, for the daemons it runs (configs, combined certificates, sockets), with the runtime directory
that holds them: private, replaced atomically, never written through a symbolic link.

The runtime directory (`agent.runtimeDir`) and every directory above it must be safe from other users: owned by root
(or the agent's own user) and not writable by group or others, since whoever can write to a directory can replace
what is in it. A root-owned directory with the sticky bit (/tmp) is the one exception above the runtime directory:
others may create entries in it but not remove or rename ours. `lbagent run` refuses to start on an unsafe one and
`lbagent check` reports it."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import pwd
import stat
from collections.abc import Callable
from pathlib import Path

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(OSError):
    """A path lbagent will not create files in or write through; `problems` says why, each naming path, owner and
    mode."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _described(path: str, st: os.stat_result) -> str:
    return f"{path} (owner {_owner(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o})"


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _problem(path: str, st: os.stat_result, final: bool) -> str | None:
    """Why this existing component of the runtime directory's path is unsafe (`final`: the directory itself)."""
    if stat.S_ISLNK(st.st_mode):
        if final:
            return f"{_described(path, st)} is a symbolic link (to {os.readlink(path)}): give the directory itself"
        if not _trusted_owner(st.st_uid):
            return f"{_described(path, st)} is a symbolic link owned by another user, who could point it elsewhere"
        return None
    if not stat.S_ISDIR(st.st_mode):
        return f"{_described(path, st)} is not a directory"
    if not _trusted_owner(st.st_uid):
        return f"{_described(path, st)} is owned by another user, who could replace what the agent keeps in it"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and (final or not (mode & stat.S_ISVTX and st.st_uid == 0)):
        return f"{_described(path, st)} is writable by group or others, who could replace what the agent keeps in it"
    return None


def _components(path: str) -> list[str]:
    """`/run/lbagent` -> ["/", "/run", "/run/lbagent"]."""
    out = ["/"]
    for part in Path(path).parts[1:]:
        out.append(os.path.join(out[-1], part))
    return out


def runtime_dir_problems(path: str) -> list[str]:
    """Why `path` is unsafe as the runtime directory: the directory (when it exists) and every existing directory
    above it up to /, as written and with symbolic links resolved. Nothing is created or changed."""
    path = os.path.abspath(path)
    problems: list[str] = []
    for walked in dict.fromkeys([path, os.path.realpath(path)]):
        for component in _components(walked):
            try:
                st = os.lstat(component)
            except FileNotFoundError:
                break  # created by the agent from here on, 0700
            except OSError as exc:
                problems.append(f"{component}: cannot look at it: {exc.strerror or exc}")
                break
            why = _problem(component, st, component == walked)
            if why is not None and why not in problems:
                problems.append(why)
    return problems


def prepare_runtime_dir(path: str) -> Path:
    """The runtime directory, safe and private: refused (UnsafePath) when it or a directory above it is unsafe,
    created 0700 with whatever is missing above it, and made 0700 when it exists."""
    problems = runtime_dir_problems(path)
    if problems:
        raise UnsafePath(problems)
    path = os.path.abspath(path)
    for component in _components(path)[1:]:
        with contextlib.suppress(FileExistsError):
            os.mkdir(component, 0o700)
    problems = runtime_dir_problems(path)  # again: something may have come in between
    if problems:
        raise UnsafePath(problems)
    return private_dir(path)


def private_dir(path: str | Path, base: str | Path | None = None) -> Path:
    """A directory only the agent uses (the runtime directory or one below it): created 0700 when missing, made
    0700, refused (UnsafePath) when it is a symbolic link, no directory, or another user's. `base`: a directory above
    it already known safe (the runtime directory): every directory between the two is opened without following a
    symbolic link too (and created 0700 when missing). Without `base`, what is missing above is created 0700."""
    directory = Path(os.path.abspath(path))
    if base is None:
        start, names = directory.parent, [directory.name]
        if not start.exists():
            private_dir(start)
        fd = os.open(start, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        start = Path(os.path.abspath(base))
        names = list(directory.relative_to(start).parts)
        fd = _open_dir(start, os.open, str(start))
    try:
        here = start
        for name in names:
            here = here / name
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=fd)
            parent, fd = fd, _open_dir(name, functools.partial(os.open, dir_fd=fd), str(here), parent=fd)
            os.close(parent)
            st = os.fstat(fd)
            if not _trusted_owner(st.st_uid):
                raise UnsafePath([f"{_described(str(here), st)} is owned by another user"])
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return directory


def _open_dir(name: str | Path, opener: Callable[[str | Path, int], int], shown: str, parent: int | None = None) -> int:
    """The directory opened without following a symbolic link; UnsafePath naming what is there instead."""
    try:
        return opener(name, _OPEN_DIR)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = os.lstat(name, dir_fd=parent)
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafePath([f"{_described(shown, st)} is {kind}: lbagent keeps its files in a directory of its "
                          f"own"]) from exc


def write_private(path: str | Path, text: str) -> None:
    """Replace `path` atomically with a file only its owner can read (0600), never through a symbolic link: the
    directory is opened without following one, a symbolic link in the file's place is refused (UnsafePath), and the
    text goes to a fresh temporary file beside it (created exclusively, so a link left in its place is removed, not
    followed) that is then renamed over the file."""
    target = Path(path)
    directory = _open_dir(target.parent, os.open, str(target.parent))
    temporary = target.name + ".tmp"
    try:
        try:
            st = os.lstat(target.name, dir_fd=directory)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePath([f"{_described(str(target), st)} is a symbolic link: lbagent does not write "
                                  f"through one"])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=directory)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=directory)
        with open(fd, "w") as f:
            os.fchmod(fd, 0o600)
            f.write(text)
        os.replace(temporary, target.name, src_dir_fd=directory, dst_dir_fd=directory)
    finally:
        os.close(directory)


MAX_FILE_BYTES = 16 * 1024 * 1024


def read_file(path: str | os.PathLike[str], limit: int = MAX_FILE_BYTES) -> bytes:
    """A config or certificate file's bytes. What is no regular file (a FIFO, a device such as /dev/zero, a
    directory) or is larger than `limit` raises OSError before anything is read, so it can neither block nor
    fill memory."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        mode, size = info.st_mode, info.st_size
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a directory" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "special")
            raise OSError(errno.EINVAL, f"not a regular file: it is {kind}")
        if size > limit:
            raise OSError(errno.EFBIG, f"the file has {size} bytes, more than the {limit} allowed")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"the file has more than the {limit} bytes allowed")
    return data
