"""Files lbagent writes for the daemons it runs (configs, combined certificates): private and replaced atomically."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: str | Path, text: str) -> None:
    """Replace `path` atomically with a file only its owner can read (0600, also when a leftover temporary file
    had another mode)."""
    target = Path(path)
    temporary = target.with_name(target.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(text)
    os.replace(temporary, target)
