"""Handing freed memory back to the system after a sync.

A sync builds its plan, scripts and messages (a full resync of 1,000 services: several MiB of them), and frees them
when it ends. Python gives what it freed to glibc's malloc, which keeps it in its heaps for the next allocation; the
pages stay in the agent's RSS although nothing uses them, and the next sync, whose objects land elsewhere in the
heap, adds its own. An idle agent's RSS then climbed by steps of 6-8 MiB at its 30-second resyncs.
`malloc_trim(0)` hands the free pages of every heap back (glibc madvises them away, also between used chunks): after
a sync it took 0.2-1.5 ms and gave back up to 9 MiB (docs/benchmarks.md, "Idle").

Without glibc (musl has no malloc_trim) this does nothing.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

# At most one trim per this many seconds: a burst of syncs (a Kubernetes change after another) trims once.
MIN_GAP = 1.0


def _malloc_trim() -> Callable[[int], int] | None:
    # the C library the process already runs (dlopen of the program itself): no ldconfig run at start-up, as
    # ctypes.util.find_library would
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()
_last = -MIN_GAP


def release(clock: Callable[[], float] = time.monotonic) -> bool:
    """Give the heaps' free pages back, unless that was done less than MIN_GAP ago; whether it was done."""
    global _last  # noqa: PLW0603 - one process, one set of heaps
    now = clock()
    if _TRIM is None or now - _last < MIN_GAP:
        return False
    _last = now
    _TRIM(0)
    return True
