"""What a search tells as it goes: lines of text, finished trials, and the progress of its phases.

The core never draws anything itself. It tells an :class:`Events`, which logs
every line (the ``sketchtune`` logger), prints it when ``verbose``, and hands
lines, trials and phase progress to listeners: the Lightning callback draws
them as progress bars in the Trainer's style, or as one log line per phase.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sketchtune._memory import release_freed_memory

if TYPE_CHECKING:
    from sketchtune.results import TrialRecord

__all__ = ["PHASES", "Events", "Listener", "Phase"]

log = logging.getLogger("sketchtune")

#: the phases of a search, in order, and what each counts
PHASES = {
    "baseline": "the dense model's validation (and input statistics)",
    "planner": "per-layer error and cost of every candidate",
    "trials": "the study's trials",
    "confirmation": "interleaved timing rounds that confirm the kept plan",
}


class Listener:
    """Receives a search's events. Every method does nothing unless overridden."""

    def note(self, text: str) -> None:
        """A line the user must see (the study reused, the floor changed, a fallback taken)."""

    def trial(self, record: TrialRecord) -> None:
        """A trial finished."""

    def phase_start(self, phase: Phase) -> None:
        """``phase`` begins (its ``total`` may be ``None`` when not known in advance)."""

    def phase_advance(self, phase: Phase) -> None:
        """``phase.done`` grew."""

    def phase_end(self, phase: Phase) -> None:
        """``phase`` is over."""


class Phase:
    """One phase of a search and how far it got.

    Attributes:
        name: one of :data:`PHASES`.
        total: the steps it will take (``None``: unknown).
        unit: what a step is (``"pass"``, ``"layer"``, ``"trial"``, ``"round"``).
        done: steps done so far.
        started: ``time.monotonic()`` when it began.
        ended: ``time.monotonic()`` when it ended (``None`` while it runs).
    """

    def __init__(self, name: str, total: float | None, unit: str) -> None:
        self.name = name
        self.total = total
        self.unit = unit
        self.done = 0.0
        self.started = time.monotonic()
        self.ended: float | None = None

    @property
    def elapsed(self) -> float:
        """Seconds it took (so far, while it runs)."""
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    @property
    def eta(self) -> float | None:
        """Seconds left at the pace so far (``None`` before the first step or without a total)."""
        if not self.total or self.done <= 0:
            return None
        return max(0.0, self.elapsed / self.done * (self.total - self.done))

    def describe(self) -> str:
        count = f"{self.done:g}/{self.total:g}" if self.total else f"{self.done:g}"
        return f"{self.name}: {count} {self.unit}(s) in {self.elapsed:.1f} s"


class Events:
    """The search's voice: lines, trials and phases, to the log, the screen and listeners.

    Args:
        verbose: also print every line.
        listeners: receive every event.
        trial_callbacks: called with each finished trial's record (``tune(callbacks=...)``).
    """

    def __init__(
        self,
        *,
        verbose: bool = False,
        listeners: Sequence[Listener] = (),
        trial_callbacks: Sequence[Callable[[TrialRecord], None]] = (),
    ) -> None:
        self.verbose = verbose
        self.listeners = list(listeners)
        self.trial_callbacks = list(trial_callbacks)
        self.current: Phase | None = None
        #: every phase that ended, in order (``Phase.describe()`` gives its line)
        self.finished: list[Phase] = []

    def say(self, text: str) -> None:
        """A progress line: logged, and printed when verbose."""
        log.info(text)
        if self.verbose:
            print(text, flush=True)

    def note(self, text: str) -> None:
        """A line the user must see whatever the verbosity (listeners show it too)."""
        self.say(text)
        for listener in self.listeners:
            listener.note(text)

    def trial(self, record: TrialRecord) -> None:
        for callback in self.trial_callbacks:
            callback(record)
        for listener in self.listeners:
            listener.trial(record)

    @contextmanager
    def phase(self, name: str, total: float | None, unit: str) -> Iterator[Phase]:
        """A phase: listeners see it start, advance (``advance``) and end, even on errors."""
        phase = Phase(name, total, unit)
        outer, self.current = self.current, phase
        for listener in self.listeners:
            listener.phase_start(phase)
        try:
            yield phase
        finally:
            release_freed_memory()  # what the phase dropped stays dropped
            phase.ended = time.monotonic()
            self.current = outer
            self.finished.append(phase)
            self.say(phase.describe())
            for listener in self.listeners:
                listener.phase_end(phase)

    def advance(self, steps: float = 1.0, *, unit: str | None = None) -> None:
        """The current phase moved ``steps`` further (nothing when no phase is open, or
        when ``unit`` is given and the phase counts something else)."""
        phase = self.current
        if phase is None or (unit is not None and unit != phase.unit):
            return
        phase.done += steps
        for listener in self.listeners:
            listener.phase_advance(phase)
