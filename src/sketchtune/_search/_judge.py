"""Judging one plan: swap it in, measure accuracy and speed, swap it out; the floor lives here.

Every evaluation of the model goes through :meth:`Judge.evaluate` (announced to
DDP followers first) or, on a follower, :meth:`Judge.run`. The judge is the
only owner of the accuracy floor.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import optuna
from torch import nn

from sketchtune._search._builder import PlanBuilder
from sketchtune._search._confirm import TRIAL_ROUNDS, Confirmation, wants_more
from sketchtune._search._contention import CpuMeter
from sketchtune._validation import warn
from sketchtune.evaluate import (
    REMOTE_TRIAL,
    AccuracyFloor,
    Command,
    Evaluator,
    FloorUnreachable,
    Mode,
    NonFiniteMetric,
    RemoteTrial,
)
from sketchtune.flops import ShapeRecorder, plan_flops_speedup
from sketchtune.measure import Toggle
from sketchtune.plan import SketchPlan, Swap
from sketchtune.registry import SketchKind

__all__ = ["Judge", "Outcome", "TrialFailed"]


class TrialFailed(Exception):
    """A trial failed for a recorded reason (non-finite metric, ...); the study continues."""


@dataclass
class Outcome:
    """What one evaluation of a plan measured."""

    accuracy: float
    speed: float | None
    speedup: float | None
    feasible: bool
    violation: float
    speed_measured: bool
    flops_speedup: float
    early_stop: bool = False
    timing: Confirmation | None = None

    def value(self, mode: Mode) -> float:
        """What Optuna is told (maximized): the speedup, or the accuracy when speed is not measured.

        An infeasible trial with a speed objective gets ``-1 - violation``: below every
        feasible speedup (> 0) and better the closer it came to the floor, which
        guides samplers that ignore constraints. Without speed, the (signed)
        accuracy itself is already below every feasible one.
        """
        if self.speedup is not None:
            return self.speedup
        if not self.feasible and self.speed_measured:
            return -1.0 - self.violation
        return self.accuracy if mode == "max" else -self.accuracy


class Judge:
    """Measures plans on ``model`` against the accuracy floor.

    Args:
        model: the dense model (plans are swapped in and out of it).
        evaluator: accuracy and (optionally) throughput.
        builder: builds the plans' sketched modules.
        kinds: each selected layer's kind.
        speed_model: ``"flops"`` for the FLOP speed model, ``None`` for the evaluator's timing.
        runs: accuracy evaluations per trial (the median is kept); also the least
            number of timing rounds.
        mode: ``"max"`` when higher accuracy is better.
    """

    def __init__(
        self,
        model: nn.Module,
        evaluator: Evaluator,
        builder: PlanBuilder,
        kinds: dict[str, SketchKind],
        *,
        speed_model: Literal["flops"] | None,
        runs: int,
        mode: Mode,
    ) -> None:
        self.model = model
        self.evaluator = evaluator
        self.builder = builder
        self.kinds = kinds
        self.speed_model = speed_model
        self.runs = runs
        self.mode: Mode = mode
        self._floor = AccuracyFloor(None, mode)
        self._shapes = ShapeRecorder(model, sorted(builder.dense))
        self._dense_warm = False
        #: called after every timing round (the search's progress)
        self.progress: Callable[[], None] | None = None
        #: the run (this process and ``tune()`` call) whose timings can be trusted here
        self.run_id = ""
        self._meter = CpuMeter()

    # -- the floor ---------------------------------------------------------------------

    @property
    def floor(self) -> AccuracyFloor:
        return self._floor

    def set_floor(self, floor: AccuracyFloor) -> None:
        """The floor every later evaluation is judged (and stopped early) against."""
        self._floor = floor

    def dense_accuracy(self) -> float:
        """Measure the dense model (gathering calibration statistics on the way), with no floor."""
        self._floor = AccuracyFloor(None, self.mode)  # nothing to stop early against yet
        try:
            return self.evaluate(SketchPlan(), None, measure_speed=False).accuracy
        except TrialFailed as exc:
            raise ValueError(
                f"the dense model's accuracy is not finite ({exc}); check the evaluation."
            ) from None

    def resolve_floor(
        self, dense: float | None, *, threshold: float | None, max_drop: float | str | None
    ) -> AccuracyFloor:
        """Set the floor from an absolute ``threshold`` or a ``max_drop`` below ``dense``.

        Raises:
            ValueError: the dense model itself does not keep the floor.
        """
        floor = AccuracyFloor.resolve(
            threshold=threshold, max_drop=max_drop, baseline=dense, mode=self.mode
        )
        if floor.value is not None and dense is not None and not floor.feasible(dense):
            raise ValueError(
                f"accuracy_threshold={floor.value:.6g} is out of reach: the dense model itself "
                f"scores {dense:.6g}. Use a threshold the dense model meets, or "
                "max_accuracy_drop for a floor relative to it."
            )
        if floor.value is None and self.speed_measured:
            warn(
                "no accuracy floor is set (accuracy_threshold / max_accuracy_drop): the fastest "
                "configuration wins whatever its accuracy."
            )
        self._floor = floor
        return floor

    # -- speed -------------------------------------------------------------------------

    @property
    def speed_measured(self) -> bool:
        return self.speed_model is not None or self.evaluator.has_throughput

    @property
    def shapes(self) -> ShapeRecorder:
        """The call shapes recorded during evaluations (the FLOP model's and the planner's record)."""
        return self._shapes

    def flops_speedup(self, plan: SketchPlan) -> float:
        """FLOP-model speedup of the selected layers with ``plan`` applied (needs recorded shapes)."""
        return plan_flops_speedup(self.builder.dense, self._shapes, plan)

    def confirm(self, plan: SketchPlan, *, prior: Confirmation | None, beat: float) -> Confirmation:
        """Time ``plan`` on from ``prior`` (its rounds in this run, if any) until settled.

        Settled (:func:`~sketchtune._search._confirm.wants_more`): confirmed, no faster
        than ``beat``, or out of rounds. Announced to DDP followers first (they time the
        same rounds in lockstep and, seeing the same reduced rates, stop with it).
        """
        rounds = None if prior is None else prior.rounds_list()
        self.evaluator.announce(
            Command(
                plan.to_dict()["layers"],
                False,
                True,
                self._floor.value,
                confirm=True,
                beat=beat,
                prior=rounds,
            )
        )
        return self._confirm(plan, prior, beat)

    def _confirm(self, plan: SketchPlan, prior: Confirmation | None, beat: float) -> Confirmation:
        with Swap(self.model, self.builder.build(plan)) as swap:
            try:
                return self._time(swap, prior=prior, beat=beat)
            except NonFiniteMetric as exc:
                raise TrialFailed(str(exc)) from None

    def _time(self, swap: Toggle, *, prior: Confirmation | None, beat: float) -> Confirmation:
        """Interleaved rounds of the swapped-in plan and the dense model, while wanted."""
        evaluator = self.evaluator
        if not self._dense_warm:
            swap.restore()
            evaluator.warm(self.model)  # the dense model first: it sizes the timing slices
            self._dense_warm = True
        swap.apply()
        evaluator.warm(self.model)
        timing = prior
        least = max(TRIAL_ROUNDS, self.runs)
        while (timing is None or timing.rounds < least) or wants_more(timing, beat):
            done = 0 if timing is None else timing.rounds
            step = least - done if done < least else 2
            dense: list[float] = []
            sketched: list[float] = []
            before = self._meter.read() if evaluator.alone else None
            for index in range(done, done + step):
                evaluator.start_round(index)
                # alternate which model goes first: a drifting machine hits both alike
                for dense_turn in (True, False) if index % 2 == 0 else (False, True):
                    if dense_turn:
                        swap.restore()
                        dense.append(evaluator.throughput(self.model))
                    else:
                        swap.apply()
                        sketched.append(evaluator.throughput(self.model))
            swap.apply()
            share = (
                math.nan if before is None else self._meter.others_share(before, self._meter.read())
            )
            others = [share] * len(dense)
            if self.progress is not None:
                self.progress()
            if min(dense) <= 0:  # every trial would fail the same way: stop the search
                raise ValueError(
                    f"the speed function returned {min(dense)} for the dense model; speeds must "
                    "be > 0 (higher is faster, e.g. samples per second)."
                )
            more = Confirmation.of(dense, sketched, others)
            timing = more if timing is None else timing.extended(dense, sketched, others)
        return timing

    def _speed(
        self, swap: Swap, plan: SketchPlan, beat: float
    ) -> tuple[float | None, float | None, Confirmation | None]:
        """``(speed, speedup, timing)`` of the swapped-in plan, timed interleaved in rounds."""
        if self.speed_model == "flops":
            speedup = self.flops_speedup(plan)
            return speedup, speedup, None
        if not self.evaluator.has_throughput:
            return None, None, None
        timing = self._time(swap, prior=None, beat=beat)
        return statistics.median(timing.plan_rates), timing.speedup, timing

    # -- evaluating --------------------------------------------------------------------

    def evaluate(
        self,
        plan: SketchPlan,
        trial: optuna.Trial | None,
        *,
        measure_speed: bool = True,
        beat: float = 1.0,
    ) -> Outcome:
        """Swap ``plan`` in, measure it, swap it out. Announced to DDP followers first.

        ``beat``: the best confirmed speedup so far; a plan that looks faster is timed
        on until its figure is confirmed (see :mod:`sketchtune._search._confirm`).
        """
        self.evaluator.announce(
            Command(
                plan.to_dict()["layers"],
                trial is not None,
                measure_speed,
                self._floor.value,
                beat=beat,
            )
        )
        return self.run(plan, trial, measure_speed=measure_speed, beat=beat)

    def run(
        self,
        plan: SketchPlan,
        trial: optuna.Trial | RemoteTrial | None,
        *,
        measure_speed: bool,
        beat: float = 1.0,
    ) -> Outcome:
        """Evaluate ``plan`` without announcing it (followers run what was announced)."""
        modules = self.builder.build(plan)
        early_stop = False
        calibrating = not plan and self.builder.observes and not self.builder.calibrated
        with Swap(self.model, modules) as swap:
            try:
                if calibrating:
                    with self.builder.calibration_hooks(self.kinds, self.evaluator.reduce_sum):
                        accuracy = self._accuracy(trial)
                else:
                    accuracy = self._accuracy(trial)
            except NonFiniteMetric as exc:
                raise TrialFailed(str(exc)) from None
            except FloorUnreachable as exc:
                accuracy, early_stop = exc.bound, True
            violation = self._floor.violation(accuracy)
            feasible = violation <= 0.0 and not early_stop
            speed = speedup = timing = None
            if feasible and measure_speed:
                try:
                    speed, speedup, timing = self._speed(swap, plan, beat)
                except NonFiniteMetric as exc:
                    raise TrialFailed(str(exc)) from None
        return Outcome(
            accuracy,
            speed,
            speedup,
            feasible,
            violation,
            self.speed_measured,
            self.flops_speedup(plan),
            early_stop,
            timing,
        )

    def follow(self) -> None:
        """Run the evaluations the coordinating process announces, until it finishes (DDP)."""
        while True:
            command = self.evaluator.receive()
            if command is None:
                return
            self._floor = AccuracyFloor(command.floor, self.mode)
            trial = REMOTE_TRIAL if command.has_trial else None
            try:
                if command.confirm:
                    prior = Confirmation.from_rounds(command.prior or [])
                    self._confirm(SketchPlan(command.plan), prior, command.beat)
                    continue
                self.run(
                    SketchPlan(command.plan),
                    trial,
                    measure_speed=command.measure_speed,
                    beat=command.beat,
                )
            except (TrialFailed, optuna.TrialPruned):
                continue  # the coordinator records the outcome; followers just keep in step

    def dense_outcome(self, accuracy: float) -> Outcome:
        """The outcome of the empty plan, from the dense accuracy already measured."""
        return Outcome(
            accuracy,
            None,
            1.0 if self.speed_measured else None,
            self._floor.feasible(accuracy),
            self._floor.violation(accuracy),
            self.speed_measured,
            1.0,
        )

    def _accuracy(self, trial: optuna.Trial | RemoteTrial | None) -> float:
        runs = []
        for _ in range(self.runs):
            with self._shapes:
                runs.append(self.evaluator.accuracy(self.model, trial=trial, floor=self._floor))
        return float(statistics.median(runs))
