"""Handing freed memory back to the operating system.

A search builds and drops many tensors (trial modules, statistics, factorizations,
timing inputs). glibc's allocator keeps what was freed for reuse, spread over
per-thread arenas, so the process's resident memory stays at its high-water mark
long after the tensors are gone. ``malloc_trim`` returns the free pages; the
search calls it after each phase and each trial. A no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["release_freed_memory"]


@functools.cache
def _trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None
    return trim


def release_freed_memory() -> None:
    """Return the allocator's free pages to the operating system (glibc only)."""
    trim = _trim()
    if trim is not None:
        trim(0)
