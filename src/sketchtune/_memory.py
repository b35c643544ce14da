"""Handing freed memory back to the operating system.

A search builds and drops many tensors (trial modules, statistics, factorizations,
timing inputs). glibc's allocator keeps what was freed for reuse, spread over
per-thread arenas, so the process's resident memory stays at its high-water mark
long after the tensors are gone. ``malloc_trim`` returns the free pages; the
search calls it after each phase and after trials, at most as often as keeps it under a
small share of the search's time. A no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
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


#: (when the last trim ended, how long it took), by ``time.perf_counter``
_LAST = [0.0, 0.0]


def release_freed_memory(*, share: float | None = None) -> None:
    """Return the allocator's free pages to the operating system (glibc only).

    ``share``: skip the trim while the time since the last one ended is under the last
    trim's duration divided by ``share``, so trimming costs at most about that share of
    the time. A trial of a large model (seconds) is trimmed after every trial; the
    millisecond trials of a small one are trimmed every few trials. ``None``: always.
    """
    trim = _trim()
    if trim is None:
        return
    begin = time.perf_counter()
    if share is not None and begin - _LAST[0] < _LAST[1] / share:
        return
    trim(0)
    _LAST[0] = time.perf_counter()
    _LAST[1] = _LAST[0] - begin
