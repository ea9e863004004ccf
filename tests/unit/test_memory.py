"""lbagent.memory: the pages a sync freed go back to the system."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from lbagent import memory


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_freed_heap_pages_go_back_to_the_system() -> None:
    # lbagent runs on Debian: glibc. A libc without malloc_trim would make release() a no-op; say so, loudly.
    assert platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c"), "these tests need glibc"
    # 16 KiB blocks come from malloc's heap (under its 128 KiB mmap threshold), and a block allocated after them
    # keeps the heap's top in use, so that freeing them gives nothing back by itself: a sync's garbage, in short.
    blocks = [bytearray(16 * 1024) for _ in range(4096)]  # 64 MiB, touched (zeroed)
    pin = [bytearray(16 * 1024) for _ in range(4)]
    held = rss_kib()
    del blocks
    freed = rss_kib()
    assert memory.release(clock=lambda: 1e9)
    released = rss_kib()
    assert pin
    assert held - released > 48 * 1024, f"RSS {held} KiB with the blocks, {freed} after del, {released} after release"


def test_release_runs_at_most_once_a_gap() -> None:
    now = [2e9]
    assert memory.release(clock=lambda: now[0])
    now[0] += memory.MIN_GAP / 2
    assert not memory.release(clock=lambda: now[0]), "a burst of syncs trims once"
    now[0] += memory.MIN_GAP
    assert memory.release(clock=lambda: now[0])


@pytest.fixture(autouse=True)
def _fresh_gap() -> None:
    memory._last = -memory.MIN_GAP
