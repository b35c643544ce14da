"""Confirming a measured speedup before a plan is applied: never slower than the dense model.

A trial's speedup comes from one short interleaved measurement, and the best
of many noisy measurements is biased upwards (the winner's curse). Before a
plan is kept it is timed again against the dense model over several rounds;
it is confirmed only when the lower end of a bootstrap interval of its median
per-round speedup is above 1. The reported speedup is this confirmed median.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Any

__all__ = ["ROUNDS", "Confirmation"]

#: rounds of the confirming measurement (each times the dense model and the plan once)
ROUNDS = 7
_RESAMPLES = 2000
_LEVEL = 0.05  # one-sided: the 5th percentile of the bootstrap distribution


@dataclass(frozen=True)
class Confirmation:
    """The confirming measurement of one plan.

    Attributes:
        dense_rates: the dense model's throughput in each round.
        plan_rates: the plan's throughput in each round (measured right after the dense one).
    """

    dense_rates: tuple[float, ...]
    plan_rates: tuple[float, ...]

    @classmethod
    def of(cls, dense: list[float], plan: list[float]) -> Confirmation:
        return cls(tuple(dense), tuple(plan))

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
        return math.nan if any(math.isnan(r) for r in ratios) else statistics.median(ratios)

    @property
    def lower(self) -> float:
        """The lower end of a one-sided 95% bootstrap interval of the median speedup."""
        ratios = self.ratios
        if not ratios or any(not math.isfinite(r) for r in ratios):
            return math.nan
        rng = random.Random(0)  # the same measurement always gives the same verdict
        medians = sorted(
            statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(_RESAMPLES)
        )
        return medians[int(_LEVEL * _RESAMPLES)]

    @property
    def confirmed(self) -> bool:
        """Whether the plan is faster than the dense model with confidence."""
        return self.lower > 1.0

    def describe(self) -> str:
        return (
            f"{self.speedup:.2f}x (lower bound {self.lower:.2f}x over {len(self.ratios)} "
            "interleaved rounds)"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values for logs, results files and the callback's summary."""
        return {
            "speedup": self.speedup,
            "lower": self.lower,
            "confirmed": self.confirmed,
            "dense_throughput": statistics.median(self.dense_rates),
            "tuned_throughput": statistics.median(self.plan_rates),
            "rounds": len(self.ratios),
        }
