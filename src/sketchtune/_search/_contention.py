"""How much of the machine other processes took while a plan was timed.

On a busy machine a measured speedup is not the one a quiet machine gives: a dense
model whose large matrix products keep every core busy loses more to other processes
than a sketched model whose small products barely use a second core (the main job's
dense batches ran 2.1-2.3x slower beside two busy loops on 2 cores, its sketched ones
1.0-1.15x, so the measured speedup could double: ``benchmarks/under_load.py``). No
choice of rounds or medians undoes that; what a user needs is to be told. :class:`CpuMeter` reads, around the timing
rounds, the CPU time every process spent on the CPUs this process may run on (Linux's
``/proc/stat``, stolen time included) and this process's own CPU time; the difference,
as a share of those CPUs' time, is what other processes took.

Elsewhere (no ``/proc/stat``) the share is unknown (NaN) and nothing is said.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from dataclasses import dataclass

__all__ = ["BUSY_SHARE", "CpuMeter", "CpuReading"]

#: other processes took at least this share of the CPUs while a figure was timed: it was
#: measured on a busy machine (two busy loops on 2 cores read about 0.5; quiet runs, 0-0.05)
BUSY_SHARE = 0.2

_STAT = "/proc/stat"
# user nice system idle iowait irq softirq steal: all but idle and iowait are busy
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


@dataclass(frozen=True)
class CpuReading:
    """One reading: wall clock, this process's CPU seconds, all processes' CPU seconds."""

    wall: float
    own: float
    busy: float | None


class CpuMeter:
    """Readings of ``/proc/stat`` for the CPUs this process may run on."""

    def __init__(self, stat_path: str = _STAT) -> None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            cpus = list(range(os.cpu_count() or 1))
        self._names = {f"cpu{c}".encode() for c in cpus}
        self._lines = max(cpus) + 2  # "cpu " first, then cpu0, cpu1, ... in order
        self.cpus = len(cpus)
        self._tick = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        # one descriptor, read from offset 0 each time: the kernel writes the file anew
        # on every read, and this skips an open and a close per reading (a trial reads twice)
        try:
            self._fd: int | None = os.open(stat_path, os.O_RDONLY)
        except OSError:
            self._fd = None
        else:
            weakref.finalize(self, os.close, self._fd)
        self.available = self._busy_seconds() is not None

    def read(self) -> CpuReading:
        busy = self._busy_seconds() if self.available else None
        return CpuReading(time.perf_counter(), time.process_time(), busy)

    def others_share(self, before: CpuReading, after: CpuReading) -> float:
        """The share of the CPUs' time between two readings that other processes took
        (0 to 1; NaN when unknown)."""
        wall = after.wall - before.wall
        if before.busy is None or after.busy is None or wall <= 0:
            return math.nan
        others = (after.busy - before.busy) - (after.own - before.own)
        return min(1.0, max(0.0, others / (wall * self.cpus)))

    def _busy_seconds(self) -> float | None:
        if self._fd is None:
            return None
        try:
            data = os.pread(self._fd, 1 << 16, 0)
        except OSError:
            return None
        ticks = 0
        found = 0
        for line in data.split(b"\n", self._lines)[: self._lines]:
            if not line.startswith(b"cpu"):
                break
            fields = line.split()
            if fields[0] in self._names and len(fields) > max(_BUSY_FIELDS) + 1:
                values = fields[1:]
                ticks += sum(int(values[i]) for i in _BUSY_FIELDS)
                found += 1
        return ticks / self._tick if found else None
