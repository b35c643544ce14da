"""The planner: options -> frontier -> the next plan to evaluate (bisection, then refinement).

Every evaluation is a real trial of the study: the planner enqueues fixed
parameters (``study.enqueue_trial``) and the usual objective runs them, so the
results table, plots, resume, duplicate detection and the never-slower
confirmation see them like any other trial. Each planner trial carries a small
user attribute (:data:`TAG`: its phase, frontier point and candidate choice);
the next proposal is a function of the study's trials only (the finished
ones, and the frontier points other workers are evaluating), so a resumed run,
or a second worker on the same storage, continues where the study stands. The per-layer options and the frontier are stored in the
study's user attributes (:data:`STUDY_ATTR`) and never recomputed for it.

:func:`~sketchtune._planner._run.run_planned_study` runs the study with it.

1. Calibration: bisection over the frontier's points for the most aggressive
   one that keeps the floor (``log2`` of the number of points, evaluations).
2. Refinement (default sampler): local search on the rank ladders around the
   best plan so far: one layer one to three rungs cheaper, optionally another
   one or two rungs dearer, always predicted cheaper than the best plan; the
   least (weighted) predicted error first. A layer whose cheaper step broke the
   floor weighs more from then on (the measured correction of its
   sensitivity). With a sampler of the user's own, or once no neighbour is
   left, the rest of the budget goes to the sampler, warm-started by the
   planner's trials already in the study.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sketchtune._planner._frontier import Frontier
from sketchtune._planner._options import GroupOptions
from sketchtune._planner._prepare import STUDY_ATTR, prepare
from sketchtune._search._builder import PlanBuilder
from sketchtune._search._judge import Judge
from sketchtune._search._studies import ENABLED, StudyLayout, StudySpec
from sketchtune._search._trialinfo import TrialInfo
from sketchtune.evaluate import AccuracyFloor

__all__ = ["STUDY_ATTR", "TAG", "Planner", "Proposal"]

#: trial user attribute of a planner trial
TAG = "sketchtune:planned"

_PENALTY = 1.5  # weight factor of a group whose cheaper move broke the floor
_MIN_GAIN = 0.002  # a refinement must be predicted at least this much cheaper
_BACKS = 24  # dearer steps considered as the second half of a pair


@dataclass
class Proposal:
    params: dict[str, Any]
    tag: dict[str, Any]


@dataclass
class Planner:
    """The options, the frontier and the proposals of one planned study.

    Attributes:
        options: each group's candidates (predicted error and cost).
        frontier: the Lagrangian frontier over ``options``.
        unit: ``"macs"`` or ``"seconds"`` (what a cost counts).
        loaded: the options and the frontier came from the study (nothing recomputed).
        prepare_seconds: time spent on spectra and layer timing (0 when loaded).
        allocate_seconds: time the allocation took.
        propose_seconds: time spent choosing the next plan (bisection, refinement).
    """

    spec: StudySpec
    options: list[GroupOptions]
    frontier: Frontier
    unit: str
    seed: int
    refine: bool
    loaded: bool = False
    floor: AccuracyFloor = field(default_factory=lambda: AccuracyFloor(None))
    prepare_seconds: float = 0.0
    allocate_seconds: float = 0.0
    propose_seconds: float = 0.0
    _ladders: dict[int, list[int | None]] = field(default_factory=dict, repr=False)

    # -- building ----------------------------------------------------------------------

    @classmethod
    def for_study(
        cls,
        spec: StudySpec,
        study: optuna.Study,
        layout: StudyLayout,
        judge: Judge,
        builder: PlanBuilder,
        *,
        seed: int,
        refine: bool,
        progress: Callable[[], None] | None = None,
    ) -> Planner:
        """Load the planner's data from ``study`` or compute it (and store it there).

        ``progress`` is called after each group is priced.
        """
        prepared = prepare(spec, study, layout, judge, builder, progress=progress)
        planner = cls(
            spec,
            prepared.options,
            prepared.frontier,
            prepared.unit,
            seed,
            refine,
            loaded=prepared.loaded,
            floor=judge.floor,
        )
        planner.prepare_seconds = prepared.prepare_seconds
        planner.allocate_seconds = prepared.allocate_seconds
        return planner

    # -- plans ---------------------------------------------------------------------------

    def params_of(self, choice: Sequence[int | None]) -> dict[str, Any]:
        """Trial parameters of a per-group choice (``None``: the group stays dense)."""
        params: dict[str, Any] = {}
        for group, option, chosen in zip(self.spec.groups, self.options, choice, strict=True):
            if self.spec.optional:
                params[self.spec.param_name(group, ENABLED)] = chosen is not None
            if chosen is None:
                if not self.spec.optional:  # a lone group cannot stay dense: take its safest
                    chosen = min(
                        range(len(option.candidates)), key=lambda i: option.candidates[i].error
                    )
                else:
                    continue
            for name, value in option.candidates[chosen].params.items():
                params[self.spec.param_name(group, name)] = value
        return params

    def cost_of(self, choice: Sequence[int | None]) -> float:
        return sum(
            o.dense_cost if c is None else o.candidates[c].cost
            for o, c in zip(self.options, choice, strict=True)
        )

    def predicted_speedup(self, choice: Sequence[int | None]) -> float:
        """Dense cost over the choice's cost, over the planned layers."""
        return sum(o.dense_cost for o in self.options) / max(self.cost_of(choice), 1e-30)

    # -- proposals -----------------------------------------------------------------------

    def next(self, trials: Sequence[FrozenTrial]) -> Proposal | None:
        """The next plan to evaluate, from the study's trials; ``None`` hands over to the sampler."""
        points = len(self.frontier)
        if points <= 1:
            return None
        planned = [
            (t, t.user_attrs[TAG]) for t in trials if isinstance(t.user_attrs.get(TAG), dict)
        ]
        finished = [(t, tag) for t, tag in planned if _finished(t)]
        lo, hi = 0, points
        for t, tag in finished:
            if tag.get("phase") == "frontier" and _feasible(t, self.floor):
                lo = max(lo, int(tag["point"]))
        for t, tag in finished:
            if (
                tag.get("phase") == "frontier"
                and not _feasible(t, self.floor)
                and int(tag["point"]) > lo
            ):
                hi = min(hi, int(tag["point"]))
        if hi - lo > 1:
            point = _next_point(lo, hi, planned)
            choice = self.frontier.choice(point, len(self.options))
            moved = [self.frontier.moves[point - 1][0]]  # the group its last step changed
            tag = {"phase": "frontier", "point": point, "choice": choice, "moved": moved}
            return Proposal(self.params_of(choice), tag)
        if not self.refine:
            return None
        return self._refinement(finished, {json.dumps(tag.get("choice")) for _, tag in planned})

    def _refinement(
        self, finished: list[tuple[FrozenTrial, dict[str, Any]]], tried: set[str]
    ) -> Proposal | None:
        """Local search on the rank ladders around the best plan so far (see the module docstring).

        Neighbours of the best plan move one group one or two rungs cheaper,
        optionally with another group one rung dearer, and are predicted cheaper
        than the best plan; the one with the least weighted predicted error goes
        first. A group whose cheaper move broke the floor (on the frontier's
        boundary or here) weighs more from then on: the measured correction of
        its sensitivity.
        """
        weights = [1.0] * len(self.options)
        best: tuple[float, dict[str, Any]] | None = None
        kept = {
            tag.get("point")
            for t, tag in finished
            if tag.get("phase") == "frontier" and _feasible(t, self.floor)
        }
        for t, tag in sorted(finished, key=lambda p: p[0].number):
            # the measured speedup ranks the planner's own trials (the FLOP model's figure
            # under speed="flops"); the predicted one when speed is not measured at all
            score = _score(t, self.predicted_speedup(tag["choice"]), self.floor)
            boundary = tag.get("phase") != "frontier" or tag.get("point", 0) - 1 in kept
            if score is None and boundary:  # a frontier point past the boundary proves little
                for g in tag.get("moved") or ():
                    weights[g] *= _PENALTY
            elif score is not None and (best is None or score > best[0]):
                best = (score, tag)
        if best is None:
            return None  # nothing on the frontier keeps the floor: let the sampler look elsewhere
        choice: list[int | None] = list(best[1]["choice"])
        base_cost = self.cost_of(choice)
        base_error = sum(
            w * self._error(g, c) for g, (w, c) in enumerate(zip(weights, choice, strict=True))
        )
        limit = base_cost * (1 - _MIN_GAIN)
        # per group: (candidate, cost change, weighted error change) one to three rungs
        # cheaper, and one or two rungs dearer
        cheaper: list[list[tuple[int | None, float, float]]] = []
        dearer: list[list[tuple[int | None, float, float]]] = []
        for g, chosen in enumerate(choice):
            for offsets, out in (((-1, -2, -3), cheaper), ((1, 2), dearer)):
                out.append(
                    [
                        (
                            r,
                            self._cost(g, r) - self._cost(g, chosen),
                            weights[g] * (self._error(g, r) - self._error(g, chosen)),
                        )
                        for step in offsets
                        for r in self._rungs(g, chosen, step)
                    ]
                )
        # the dearer half of a pair: the steps that buy back the most error (a few suffice)
        backs = sorted(
            (e_err, e_cost, h, q) for h, back in enumerate(dearer) for q, e_cost, e_err in back
        )[:_BACKS]
        moves: list[tuple[float, float, int, int | None, int, int | None]] = []
        for g, moves_down in enumerate(cheaper):
            for r, d_cost, d_err in moves_down:
                moves.append((base_error + d_err, base_cost + d_cost, g, r, -1, None))
                for e_err, e_cost, h, q in backs:
                    if h != g and base_cost + d_cost + e_cost < limit:
                        error = base_error + d_err + e_err
                        moves.append((error, base_cost + d_cost + e_cost, g, r, h, q))
        moves.sort(key=lambda m: (m[0], m[1]))
        for _, cost, g, r, h, q in moves:
            if cost >= limit:
                continue
            plan = list(choice)
            plan[g] = r
            if h >= 0:
                plan[h] = q
            if json.dumps(plan) not in tried:
                return Proposal(
                    self.params_of(plan), {"phase": "refine", "choice": plan, "moved": [g]}
                )
        return None

    def _cost(self, g: int, chosen: int | None) -> float:
        option = self.options[g]
        return option.dense_cost if chosen is None else option.candidates[chosen].cost

    def _error(self, g: int, chosen: int | None) -> float:
        return 0.0 if chosen is None else self.options[g].candidates[chosen].error

    def _rungs(self, g: int, chosen: int | None, offset: int) -> list[int | None]:
        """The candidate ``offset`` rungs from ``chosen`` on ``g``'s ladder; ``[]`` past either end.

        The ladder is the group's Pareto front of (cost, predicted error), dearest
        first: each rung cheaper than the one before and with a larger error. A
        candidate another one beats on both counts is no rung (with several forms
        per layer, a float sketch dearer and less accurate than an int8 one, say),
        so a step down always trades error for speed, and a step up buys error back.
        """
        ladder = self._ladders.get(g)
        if ladder is None:
            candidates = self.options[g].candidates
            front: list[int] = []
            for i in sorted(
                range(len(candidates)), key=lambda i: (candidates[i].cost, candidates[i].error)
            ):
                if not front or candidates[i].error < candidates[front[-1]].error:
                    front.append(i)  # cheaper ones all have a larger error
            dense: list[int | None] = [None] if self.spec.optional else []
            ladder = dense + list(reversed(front))
            self._ladders[g] = ladder
        here = self._cost(g, chosen)
        above = [i for i, c in enumerate(ladder) if self._cost(g, c) >= here]
        if not above:
            return []
        position = max(above)
        target = position - offset
        return [ladder[target]] if 0 <= target < len(ladder) and target != position else []


def _next_point(lo: int, hi: int, planned: Sequence[tuple[FrozenTrial, dict[str, Any]]]) -> int:
    """The frontier point to bisect at between ``lo`` (kept) and ``hi`` (broke).

    Points other workers are evaluating now split the interval too: the midpoint
    of the widest part left (the more aggressive one on a tie), so workers sharing
    the study bisect in parallel instead of waiting on one point. When every point
    between is in flight, the midpoint (answered by its running twin).
    """
    flight = sorted(
        {
            int(tag["point"])
            for t, tag in planned
            if t.state in (TrialState.RUNNING, TrialState.WAITING)
            and tag.get("phase") == "frontier"
            and lo < int(tag["point"]) < hi
        }
    )
    bounds = [lo, *flight, hi]
    gaps = [(b - a, a) for a, b in itertools.pairwise(bounds) if b - a > 1]
    if not gaps:
        return (lo + hi) // 2
    width, start = max(gaps)
    return start + width // 2


def _finished(trial: FrozenTrial) -> bool:
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and TrialInfo.of(trial).reason is not None
    )


def _feasible(trial: FrozenTrial, floor: AccuracyFloor) -> bool:
    """Whether ``trial`` keeps today's ``floor`` (re-judged from its stored accuracy)."""
    if trial.state != TrialState.COMPLETE:
        return False
    info = TrialInfo.of(trial)
    if info.accuracy is None or info.early_stop:
        return bool(info.feasible)
    return floor.feasible(info.accuracy)


def _score(trial: FrozenTrial, predicted: float, floor: AccuracyFloor) -> float | None:
    """A feasible trial's speedup: measured (or the FLOP model's), else ``predicted``."""
    if not _feasible(trial, floor):
        return None
    speedup = TrialInfo.of(trial).speedup
    return predicted if speedup is None else float(speedup)
