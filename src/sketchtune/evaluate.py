"""How a trial is judged: the accuracy floor, evaluators, and the speed models.

An :class:`Evaluator` measures the model's accuracy (and, optionally, its
throughput). :class:`FunctionEvaluator` wraps the seed API's plain functions;
the Lightning integration provides one built on the Trainer's loops. The tuner
never calls user code except through an evaluator.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from sketchtune._validation import check_choice, check_float, warn

if TYPE_CHECKING:
    import optuna

__all__ = [
    "REMOTE_TRIAL",
    "AccuracyFloor",
    "Command",
    "Evaluator",
    "FloorUnreachable",
    "FunctionEvaluator",
    "RemoteTrial",
]

Mode = Literal["max", "min"]


@dataclass(frozen=True)
class AccuracyFloor:
    """The accuracy a sketched model must keep.

    Attributes:
        value: the bound on the metric (``None``: every trial is feasible).
        mode: ``"max"`` when higher is better (accuracy: feasible if metric >= value),
            ``"min"`` when lower is better (a loss: feasible if metric <= value).
    """

    value: float | None
    mode: Mode = "max"

    def violation(self, metric: float) -> float:
        """How far ``metric`` is on the wrong side of the floor (<= 0 means feasible)."""
        if self.value is None:
            return 0.0
        return self.value - metric if self.mode == "max" else metric - self.value

    def feasible(self, metric: float) -> bool:
        return self.violation(metric) <= 0.0

    def describe(self) -> str:
        if self.value is None:
            return "no accuracy floor"
        return f"{'>=' if self.mode == 'max' else '<='} {self.value:.6g}"

    @classmethod
    def resolve(
        cls,
        *,
        threshold: float | None,
        max_drop: float | str | None,
        baseline: float | None,
        mode: Mode = "max",
    ) -> AccuracyFloor:
        """The floor from an absolute ``threshold`` or a ``max_drop`` below the dense ``baseline``.

        ``max_drop`` is in the metric's units (``0.01`` = one point of a 0..1
        accuracy), or a string ending in ``%`` for a drop relative to the
        baseline (``"1%"``).
        """
        check_choice("mode", mode, ("max", "min"))
        check_floor_args(threshold, max_drop)
        if threshold is not None:
            return cls(check_float("accuracy_threshold", threshold), mode)
        if max_drop is None:
            return cls(None, mode)
        if baseline is None:
            raise ValueError(
                "`max_accuracy_drop` needs the dense model's accuracy, which was not measured."
            )
        drop = parse_drop(max_drop)
        amount = drop[0] * abs(baseline) if drop[1] else drop[0]
        return cls(baseline - amount if mode == "max" else baseline + amount, mode)


def check_floor_args(threshold: float | None, max_drop: float | str | None) -> None:
    """Check ``accuracy_threshold`` / ``max_accuracy_drop`` as given, before any work.

    At most one may be set; a threshold must be a finite number and a drop a
    non-negative number or a ``"N%"`` string.
    """
    if threshold is not None and max_drop is not None:
        raise ValueError(
            "give `accuracy_threshold` or `max_accuracy_drop`, not both "
            f"(got {threshold!r} and {max_drop!r})."
        )
    if threshold is not None:
        check_float("accuracy_threshold", threshold)
    if max_drop is not None:
        parse_drop(max_drop)


def parse_drop(value: float | str) -> tuple[float, bool]:
    """``(amount, relative)`` from ``0.01`` or ``"1%"``; errors name ``max_accuracy_drop``."""
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            raise ValueError(
                f"`max_accuracy_drop` must be a number (absolute drop) or a percentage string "
                f"like '1%' (relative drop), got {value!r}."
            )
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError(
                f"`max_accuracy_drop` percentage is not a number: {value!r}."
            ) from None
        return check_float("max_accuracy_drop", pct, minimum=0.0, maximum=100.0) / 100.0, True
    return check_float("max_accuracy_drop", value, minimum=0.0), False


class FloorUnreachable(Exception):
    """Raised by ``Evaluator.accuracy`` when a partial evaluation proves the floor unreachable.

    Attributes:
        bound: the best metric the full evaluation could still have reached.
    """

    def __init__(self, bound: float) -> None:
        super().__init__(f"the floor is out of reach (at best {bound:.6g})")
        self.bound = bound


class RemoteTrial:
    """Stands, on a follower process, for the trial the coordinating process is running."""

    def __repr__(self) -> str:
        return "REMOTE_TRIAL"


REMOTE_TRIAL = RemoteTrial()


@dataclass(frozen=True)
class Command:
    """What the coordinating process announces before each evaluation (for DDP followers)."""

    plan: dict[str, Any]  # SketchPlan.to_dict()["layers"]
    has_trial: bool
    measure_speed: bool
    floor: float | None
    #: time the plan against the dense model until settled, from ``prior`` rounds, nothing else
    confirm: bool = False
    #: the best confirmed speedup so far (a plan that looks faster is timed on)
    beat: float = 1.0
    #: ``[[dense, plan], ...]`` rounds already timed (a confirmation goes on from them)
    prior: list[list[float]] | None = None


class Evaluator(ABC):
    """Measures a model for the tuner.

    ``accuracy`` is required; ``throughput`` is optional (``has_throughput``).
    An evaluator may raise ``optuna.TrialPruned`` from ``accuracy`` when
    ``trial`` is given (intermediate reports, per-trial fine-tuning), or
    :class:`FloorUnreachable` when a partial evaluation already proves the trial infeasible.

    Evaluators that run in several processes at once (DDP) implement
    ``announce``/``receive``/``finish``: the coordinating process announces every
    evaluation before running it, the others receive the same commands and run
    the same evaluations in lockstep (:meth:`SKAutoTuner.follow`).
    """

    #: whether ``throughput`` is implemented
    has_throughput: bool = False
    #: called with a unit (``"batch"``) as an evaluation progresses; the tuner sets it
    progress: Callable[[str], None] | None = None

    def pass_batches(self) -> int | None:
        """Batches one accuracy evaluation runs, when known (for progress displays)."""
        return None

    @property
    def metric_name(self) -> str | None:
        """The name of the accuracy metric (a Lightning ``monitor``), recorded in the study."""
        return getattr(self, "monitor", None)

    def announce(self, command: Command) -> None:  # noqa: B027 - an optional hook
        """Called by the coordinating process before each evaluation (no-op by default)."""

    def receive(self) -> Command | None:
        """Followers: the next evaluation to run, or ``None`` when the search is over."""
        raise NotImplementedError(f"{type(self).__name__} does not coordinate several processes")

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes that evaluate together (identity for one process)."""
        return tensor

    @property
    def alone(self) -> bool:
        """Whether this process times by itself: then any other process's CPU time during a
        timing is contention (several DDP processes time side by side, and count as each
        other's load)."""
        return True

    def finish(self) -> None:  # noqa: B027 - an optional hook
        """Called by the coordinating process when the search is over (no-op by default)."""

    @abstractmethod
    def accuracy(
        self, model: nn.Module, *, trial: optuna.Trial | RemoteTrial | None, floor: AccuracyFloor
    ) -> float:
        """The model's accuracy metric.

        ``trial`` is the Optuna trial being evaluated, :data:`REMOTE_TRIAL` on a
        follower process while the coordinator runs a trial, and ``None`` for
        evaluations outside trials (the dense baseline, the combined plan).
        """

    def throughput(self, model: nn.Module) -> float:
        """The model's speed (higher is faster), e.g. samples per second: one timing slice.

        The tuner calls it in interleaved rounds (dense model, plan; plan, dense model; ...)
        and takes the median of the rounds' ratios, so it should be short and repeatable.
        """
        raise NotImplementedError(f"{type(self).__name__} does not measure speed")

    def warm(self, model: nn.Module) -> None:  # noqa: B027 - an optional hook
        """Run ``model`` untimed before its first timed slice (no-op by default).

        Called once for the dense model, then once each time a plan is about to be timed.
        """

    def start_round(self, index: int) -> None:  # noqa: B027 - an optional hook
        """The next two :meth:`throughput` calls (dense and plan) form timing round ``index``.

        An evaluator that times slices of a fixed set of batches times the same slice for
        both models of a round, and another slice in the next round (no-op by default).
        """


class FunctionEvaluator(Evaluator):
    """Wraps the seed API's ``accuracy_eval_func(model)`` and ``optimization_eval_func(model)``."""

    def __init__(
        self,
        accuracy_fn: Callable[[nn.Module], Any],
        speed_fn: Callable[[nn.Module], Any] | None = None,
    ) -> None:
        if not callable(accuracy_fn):
            raise TypeError(
                f"`accuracy_eval_func` must be a callable model -> float, got {type(accuracy_fn).__name__}."
            )
        if speed_fn is not None and not callable(speed_fn):
            raise TypeError(
                "`optimization_eval_func` must be a callable model -> float (higher is faster) or "
                f"'flops', got {speed_fn!r}."
            )
        self._accuracy_fn = accuracy_fn
        self._speed_fn = speed_fn
        self.has_throughput = speed_fn is not None

    def accuracy(
        self, model: nn.Module, *, trial: optuna.Trial | RemoteTrial | None, floor: AccuracyFloor
    ) -> float:
        return as_metric(self._accuracy_fn(model), "accuracy_eval_func")

    def throughput(self, model: nn.Module) -> float:
        if self._speed_fn is None:
            raise NotImplementedError("no optimization_eval_func was given")
        return as_metric(self._speed_fn(model), "optimization_eval_func")


class NonFiniteMetric(ValueError):
    """An evaluator returned NaN or infinity: the trial fails with this reason."""


def as_metric(value: Any, source: str) -> float:
    """``value`` as a float; NaN/inf raise :class:`NonFiniteMetric`, other types ``TypeError``.

    Numbers, numpy scalars and one-element tensors are accepted; strings and
    bools are not (``"0.38"`` or ``True`` is a bug in the evaluation, not a metric).
    """
    if isinstance(value, (str, bytes, bool)) or str(getattr(value, "dtype", "")) in (
        "bool",
        "torch.bool",
    ):
        raise TypeError(f"{source} must return a number, got {value!r} ({type(value).__name__}).")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{source} must return a number, got {value!r} ({type(value).__name__})."
        ) from None
    if not math.isfinite(number):
        raise NonFiniteMetric(f"{source} returned {number}")
    return number


def make_evaluator(
    accuracy_eval_func: Callable[[nn.Module], Any] | Evaluator,
    optimization_eval_func: Callable[[nn.Module], Any] | str | None,
    *,
    misspelled: Callable[[nn.Module], Any] | str | None = None,
) -> tuple[Evaluator, Literal["flops"] | None]:
    """The tuner's evaluator and speed model from the seed API's arguments.

    ``optimization_eval_func="flops"`` selects the FLOP speed model; ``misspelled``
    is the seed's ``optmization_eval_func`` spelling (deprecated, still accepted).
    """
    if misspelled is not None:
        warn(
            "`optmization_eval_func` is a misspelling kept for compatibility; use "
            "`optimization_eval_func`.",
            DeprecationWarning,
        )
        if optimization_eval_func is not None:
            raise ValueError(
                "give `optimization_eval_func` only once (not also as `optmization_eval_func`)."
            )
        optimization_eval_func = misspelled
    speed_model: Literal["flops"] | None = None
    if isinstance(optimization_eval_func, str):
        check_choice("optimization_eval_func", optimization_eval_func, ("flops",))
        speed_model, optimization_eval_func = "flops", None
    if isinstance(accuracy_eval_func, Evaluator):
        return accuracy_eval_func, speed_model
    return FunctionEvaluator(accuracy_eval_func, optimization_eval_func), speed_model
