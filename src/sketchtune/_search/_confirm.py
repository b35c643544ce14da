"""Timing a plan against the dense model in interleaved rounds, and confirming its speedup.

A *round* times one slice of the dense model and one of the plan back to back (the
order alternates from round to round, so a machine that speeds up or slows down hits
both alike); its ratio is one sample of the speedup. A :class:`Confirmation` is the
median of its rounds' ratios, with a bootstrap interval of that median. The same
rounds serve a trial and the confirmation of its plan:

- A trial is timed :data:`TRIAL_ROUNDS` rounds, so one stall makes one round an
  outlier, never the figure.
- A trial whose speedup would beat the best confirmed one is timed on, two rounds at
  a time (:func:`wants_more`), until it is confirmed (at least :data:`MIN_ROUNDS`
  rounds and the interval's lower end above 1), falls to the best or below, or
  :data:`MAX_ROUNDS` rounds are done. What is shown as the best is therefore always
  a confirmed figure, and it is the figure told to Optuna.
- A plan is kept only once confirmed on this machine in this run: a trial confirmed
  during the search is kept as measured; one measured elsewhere (an earlier run,
  another worker) is timed again here, by the same rule.

Each round also carries the share of the CPUs that other processes took while it ran
(:mod:`._contention`): a figure timed on a busy machine says so (:func:`busy_note`).
"""

from __future__ import annotations

import functools
import math
import random
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from sketchtune._search._contention import BUSY_SHARE

__all__ = [
    "MAX_ROUNDS",
    "MIN_ROUNDS",
    "PRECISE_SPREAD",
    "TRIAL_ROUNDS",
    "Confirmation",
    "busy_mark",
    "busy_note",
    "others_share_of",
    "wants_more",
]

#: rounds every timed trial gets
TRIAL_ROUNDS = 3
#: rounds before a speedup may be called confirmed
MIN_ROUNDS = 5
#: rounds after which a measurement is final, confirmed or not
MAX_ROUNDS = 9
#: a figure is *precise* when its 95% interval spans at most this factor (upper / lower);
#: quiet runs of the main job span 1.1-1.5, runs beside two busy loops 2.8-8
PRECISE_SPREAD = 1.5
_RESAMPLES = 1000
_LEVEL = 0.05  # one-sided: the 5th (and 95th) percentile of the bootstrap distribution


@dataclass(frozen=True)
class Confirmation:
    """Interleaved timing rounds of one plan against the dense model.

    Attributes:
        dense_rates: the dense model's throughput in each round.
        plan_rates: the plan's throughput in each round (timed beside the dense one).
        others: per round, the share of the CPUs other processes took while it was timed
            (rounds timed together, two or three at a time, share one reading; NaN: unknown).
    """

    dense_rates: tuple[float, ...]
    plan_rates: tuple[float, ...]
    others: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.others) != len(self.dense_rates):  # not measured: unknown in every round
            object.__setattr__(self, "others", (math.nan,) * len(self.dense_rates))

    @classmethod
    def of(
        cls, dense: list[float], plan: list[float], others: list[float] | None = None
    ) -> Confirmation:
        return cls(tuple(dense), tuple(plan), tuple(others or ()))

    @classmethod
    def from_rounds(cls, rounds: Any) -> Confirmation | None:
        """From stored ``[[dense, plan, others], ...]`` (``others`` may be absent: rounds
        stored before it was measured); ``None`` when there is nothing usable."""
        try:
            rows = [[float(v) for v in r] for r in rounds]
        except (TypeError, ValueError):
            return None
        if not rows or any(len(r) not in (2, 3) for r in rows):
            return None
        return cls(
            tuple(r[0] for r in rows),
            tuple(r[1] for r in rows),
            tuple(r[2] if len(r) == 3 else math.nan for r in rows),
        )

    def rounds_list(self) -> list[list[float]]:
        """``[[dense, plan, others], ...]`` (``[dense, plan]`` where ``others`` is unknown):
        the stored form."""
        return [
            [d, p] if math.isnan(o) else [d, p, o]
            for d, p, o in zip(self.dense_rates, self.plan_rates, self.others, strict=True)
        ]

    def extended(
        self, dense: list[float], plan: list[float], others: list[float] | None = None
    ) -> Confirmation:
        more = Confirmation.of(dense, plan, others)
        return Confirmation(
            self.dense_rates + more.dense_rates,
            self.plan_rates + more.plan_rates,
            self.others + more.others,
        )

    @property
    def others_share(self) -> float:
        """The median share of the CPUs other processes took during the rounds (NaN: unknown)."""
        known = [o for o in self.others if math.isfinite(o)]
        return statistics.median(known) if known else math.nan

    @property
    def busy(self) -> bool:
        """Timed while other processes took at least :data:`BUSY_SHARE` of the CPUs."""
        return self.others_share >= BUSY_SHARE

    @property
    def rounds(self) -> int:
        return len(self.dense_rates)

    @property
    def ratios(self) -> list[float]:
        """Per-round speedups (each round pairs a dense and a plan measurement)."""
        return [
            p / d if d > 0 else math.nan
            for d, p in zip(self.dense_rates, self.plan_rates, strict=True)
        ]

    @property
    def speedup(self) -> float:
        """The median per-round speedup: the figure that is reported."""
        ratios = self.ratios
        if not ratios or any(math.isnan(r) for r in ratios):
            return math.nan
        return statistics.median(ratios)

    @functools.cached_property
    def interval(self) -> tuple[float, float]:
        """A one-sided 95% bootstrap bound on each side of the median speedup.

        The resamples are those of ``random.Random(0).choices`` (the same measurement
        always gives the same verdict), their medians taken at once (:func:`_resampled`).
        """
        ratios = self.ratios
        if not ratios or any(not math.isfinite(r) for r in ratios):
            return math.nan, math.nan
        n = len(ratios)
        rows = torch.tensor(ratios, dtype=torch.float64)[_resampled(n)].sort(dim=1).values
        # statistics.median: the middle value, or the mean of the two middle ones
        medians = ((rows[:, (n - 1) // 2] + rows[:, n // 2]) / 2).sort().values.tolist()
        return medians[int(_LEVEL * _RESAMPLES)], medians[int((1 - _LEVEL) * _RESAMPLES) - 1]

    @property
    def lower(self) -> float:
        """The lower end of a one-sided 95% bootstrap interval of the median speedup."""
        return self.interval[0]

    @property
    def upper(self) -> float:
        return self.interval[1]

    @property
    def confirmed(self) -> bool:
        """Faster than the dense model with confidence, over enough rounds."""
        return self.rounds >= MIN_ROUNDS and self.lower > 1.0

    @property
    def precise(self) -> bool:
        """The 95% interval spans at most :data:`PRECISE_SPREAD` (a steady machine)."""
        return not _wide(*self.interval)

    def describe(self) -> str:
        low, high = self.interval
        return (
            f"{self.speedup:.2f}x (95% interval {low:.2f}x-{high:.2f}x over {self.rounds} "
            "interleaved rounds)"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values for logs, results files, the study and the callback's summary."""
        low, high = self.interval
        return {
            "speedup": self.speedup,
            "lower": low,
            "upper": high,
            "confirmed": self.confirmed,
            "precise": self.precise,
            "others_cpu": None if math.isnan(self.others_share) else self.others_share,
            "dense_throughput": statistics.median(self.dense_rates),
            "tuned_throughput": statistics.median(self.plan_rates),
            "rounds": self.rounds,
        }


@functools.cache
def _resampled(n: int) -> torch.Tensor:
    """Indices of the bootstrap resamples of ``n`` rounds: ``random.Random(0).choices``'s draws.

    ``choices`` picks ``floor(random() * n)``; drawn once per ``n`` (they depend on
    nothing else), as a ``(resamples, n)`` tensor.
    """
    draw = random.Random(0).random
    picks = [math.floor(draw() * n) for _ in range(n * _RESAMPLES)]
    return torch.tensor(picks, dtype=torch.long).view(_RESAMPLES, n)


def wants_more(timing: Confirmation | None, beat: float) -> bool:
    """Whether to time more rounds of a plan whose speedup is to be compared with ``beat``.

    ``beat`` is the best confirmed speedup so far (at least 1: the dense model). A plan
    gets :data:`TRIAL_ROUNDS` rounds; then more only while it still looks faster than
    ``beat`` and is not yet both confirmed and precise, up to :data:`MAX_ROUNDS` (on a
    busy machine a would-be best is timed the full :data:`MAX_ROUNDS`).
    """
    rounds = 0 if timing is None else timing.rounds
    if rounds < TRIAL_ROUNDS:
        return True
    assert timing is not None
    if rounds >= MAX_ROUNDS or not timing.speedup > max(beat, 1.0):
        return False
    return not (timing.confirmed and timing.precise)


def _wide(lower: float, upper: float) -> bool:
    """An interval spanning more than :data:`PRECISE_SPREAD` (or not measured: not precise)."""
    return not (math.isfinite(lower) and math.isfinite(upper) and lower > 0) or (
        upper / lower > PRECISE_SPREAD
    )


def others_share_of(rounds: Any) -> float:
    """The median share of the CPUs other processes took during stored rounds (NaN: unknown)."""
    timing = Confirmation.from_rounds(rounds) if rounds else None
    return math.nan if timing is None else timing.others_share


def busy_mark(rounds: Any) -> str:
    """``"busy machine: others took 51% of the CPUs"`` for a trial timed on a busy machine
    (from its stored rounds), ``""`` otherwise: the per-trial log lines' mark."""
    share = others_share_of(rounds)
    return f"busy machine: others took {share:.0%} of the CPUs" if share >= BUSY_SHARE else ""


def busy_note(lower: float | None, upper: float | None, others: float | None = None) -> str:
    """A sentence for a figure timed on a busy machine: other processes took at least
    :data:`BUSY_SHARE` of the CPUs (``others``), or its 95% interval is wide. ``""`` when
    neither."""
    busy = others is not None and math.isfinite(others) and others >= BUSY_SHARE
    wide = (
        lower is not None
        and upper is not None
        and math.isfinite(lower)
        and math.isfinite(upper)
        and _wide(lower, upper)
    )
    if not (busy or wide):
        return ""
    why = []
    if busy:
        why.append(f"other processes took {others:.0%} of the CPUs while it was timed")
    if wide:
        why.append(f"its 95% interval is wide ({lower:.2f}x-{upper:.2f}x)")
    return (
        f"Measured on a busy machine: {', and '.join(why)}. Under load a speedup can be off by "
        "2x either way (dense products that use every core lose more to other processes than "
        "small sketched ones), and the plan chosen can differ from a quiet machine's. For a "
        "figure to rely on, rerun the same search (same storage and study) on a quiet "
        "machine: a plan timed in another run is timed again there before it is kept."
    )
