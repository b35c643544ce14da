"""The one record sketchtune keeps on each Optuna trial, and the rules that read it.

Everything sketchtune knows about a trial sits in one user attribute (one
storage write per trial): :class:`TrialInfo` is its only reader and writer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "ATTR",
    "TrialInfo",
    "constraint_of",
    "counts_against_budget",
    "finished_twin",
    "frozen_params_key",
    "set_constraint",
]

#: the user attribute that holds a :class:`TrialInfo`
ATTR = "sketchtune"


@dataclass
class TrialInfo:
    """What sketchtune recorded about one trial.

    Attributes:
        plan: the evaluated plan's layers (``SketchPlan.to_dict()["layers"]``).
        worker: ``host:pid`` of the process that ran the trial.
        accuracy: the measured metric (or the bound at which it was stopped early).
        speed: the sketched model's measured speed (``None``: not measured).
        speedup: speed over the interleaved dense speed (or the FLOP model's figure).
        feasible: whether the accuracy kept the floor.
        flops_speedup: the FLOP model's speedup of the plan.
        early_stop: the validation was stopped once the floor was out of reach.
        reason: why the trial failed (non-finite metric, ...).
        skipped: why the trial was not run (the budget was used up by other workers).
        duplicate_of: the finished trial with the same parameters that answered this one.
        rounds: the interleaved timing rounds, ``[[dense, plan], ...]`` throughputs.
        confirmed: the rounds confirm the plan faster than the dense model.
        lower: lower end of the speedup's 95% interval (one-sided bootstrap).
        upper: upper end of that interval.
        run: the run (process and ``tune()`` call) that timed the trial.
    """

    plan: dict[str, Any] | None = None
    worker: str | None = None
    accuracy: float | None = None
    speed: float | None = None
    speedup: float | None = None
    feasible: bool | None = None
    flops_speedup: float | None = None
    early_stop: bool = False
    reason: str | None = None
    skipped: str | None = None
    duplicate_of: int | None = None
    rounds: list[list[float]] | None = None
    confirmed: bool | None = None
    lower: float | None = None
    upper: float | None = None
    run: str | None = None

    @classmethod
    def of(cls, trial: FrozenTrial | optuna.Trial) -> TrialInfo:
        """The record stored on ``trial`` (empty when there is none; unknown keys are ignored)."""
        stored = trial.user_attrs.get(ATTR)
        if not isinstance(stored, dict):
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})

    def to_attr(self) -> dict[str, Any]:
        """The stored form: only the fields that are set, non-finite numbers as ``None``."""
        return {k: _finite_or_none(v) for k, v in asdict(self).items() if v != _DEFAULTS[k]}

    def write(self, trial: optuna.Trial) -> None:
        trial.set_user_attr(ATTR, self.to_attr())

    @property
    def measured(self) -> bool:
        """Whether the trial was evaluated (it has an accuracy)."""
        return self.accuracy is not None


_DEFAULTS = asdict(TrialInfo())


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def counts_against_budget(trial: FrozenTrial) -> bool:
    """COMPLETE and PRUNED trials, and trials that failed for a recorded reason (never crashes)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and TrialInfo.of(trial).reason is not None


def frozen_params_key(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A hashable key of a trial's parameters (bool and int kept apart)."""
    return tuple(sorted((k, (type(v).__name__, v)) for k, v in params.items()))


def finished_twin(
    trial: optuna.Trial | FrozenTrial, trials: Sequence[FrozenTrial]
) -> FrozenTrial | None:
    """A COMPLETE, evaluated trial among ``trials`` with the same parameters as ``trial``."""
    params = trial.params
    key: tuple[tuple[str, Any], ...] | None = None
    for other in trials:
        # plain dict equality first (cheap; it takes True for 1), the typed key only on a match
        if other.params != params or other.state != TrialState.COMPLETE:
            continue
        if key is None:
            key = frozen_params_key(params)
        if (
            other.number != trial.number
            and frozen_params_key(other.params) == key
            and TrialInfo.of(other).measured
        ):
            return other
    return None


def set_constraint(trial: optuna.Trial, violation: float) -> None:
    """Tell Optuna the floor violation (<= 0: feasible)."""
    trial.set_constraint("accuracy", violation)


def constraint_of(trial: FrozenTrial) -> float:
    """The floor violation recorded for ``trial`` (<= 0: feasible)."""
    return float(next(iter(trial.constraints.values()), 0.0))
