"""What ``history.png`` and ``pareto.png`` draw, computed from the trials' records.

A measured speedup and a FLOP-model estimate are two units: they never share an axis.
A trial's own figure is shown as measured (confirmed by its rounds or not); the best
line and the front use confirmed figures only, and the kept plan is marked with the
figure it was kept at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from sketchtune._report._mark import KeptMark, speed_source

if TYPE_CHECKING:
    from sketchtune.results import TrialRecord

__all__ = [
    "HistoryPoint",
    "ParetoPoint",
    "ParetoPoints",
    "StudyHistory",
    "history_points",
    "pareto_points",
]

#: what a study's figures are: timed speedups, FLOP-model estimates, or accuracies
Measure = Literal["measured", "flops", "accuracy"]


@dataclass(frozen=True)
class HistoryPoint:
    """One trial in ``history.png``.

    ``kind``: ``"confirmed"`` (its rounds confirmed it), ``"unconfirmed"``,
    ``"estimate"`` (FLOP model), ``"accuracy"`` (no speed objective), ``"dense"``
    (every layer left dense: 1x by definition), or
    ``"infeasible"`` / ``"failed"`` (no figure: drawn as ticks along the trial axis).
    """

    trial: int  # 1-based, as the log shows it
    value: float | None
    kind: str


@dataclass(frozen=True)
class StudyHistory:
    """What ``history.png`` draws for one study.

    Attributes:
        study: the study's label.
        measure: what the values are (``"measured"``, ``"flops"`` or ``"accuracy"``).
        trials: every finished trial, 1-based.
        best: the best confirmed figure after each trial (a FLOP estimate or an
            accuracy needs no confirming); ``None`` before there is one.
        points: each trial's own figure.
        kept: ``(trial, figure, lower, upper)`` of the kept trial of this study, at the
            figure the plan was kept at (``None``: not kept from this study).
    """

    study: str
    measure: Measure
    trials: list[int]
    best: list[float | None]
    points: list[HistoryPoint]
    kept: tuple[int, float, float | None, float | None] | None = None


def _measure(records: Sequence[TrialRecord]) -> Measure:
    sources = {speed_source(r) for r in records if r.feasible}
    if "measured" in sources:
        return "measured"
    return "flops" if "flops" in sources else "accuracy"


def history_points(
    records: Sequence[TrialRecord], kept: KeptMark | None = None
) -> list[StudyHistory]:
    """Per study, in trial order: the best confirmed figure so far and every trial's own.

    A timed trial counts toward the best once its own rounds confirmed it faster than
    the dense model; an unconfirmed figure is a point, never the best. The FLOP model's
    estimates of infeasible trials are not drawn on the speedup axis (their speed was
    never timed): they are ticks along the trial axis, as failed trials are.
    """
    out = []
    for label in dict.fromkeys(r.layer_name for r in records):
        rows = sorted((r for r in records if r.layer_name == label), key=lambda r: r.trial)
        measure = _measure(rows)
        best: float | None = None
        trials, bests, points = [], [], []
        for r in rows:
            point = _history_point(r, measure)
            counts = point.kind in ("confirmed", "estimate", "accuracy")
            if counts and point.value is not None and (measure == "accuracy" or point.value > 1.0):
                best = point.value if best is None else max(best, point.value)
            trials.append(r.trial + 1)
            bests.append(best)
            points.append(point)
        out.append(StudyHistory(label, measure, trials, bests, points, _kept_at(rows, kept)))
    return out


def _history_point(record: TrialRecord, measure: Measure) -> HistoryPoint:
    trial = record.trial + 1
    if record.state != "COMPLETE":
        return HistoryPoint(trial, None, "failed")
    if not record.feasible:
        return HistoryPoint(trial, None, "infeasible")
    if measure == "accuracy":
        return HistoryPoint(trial, record.score, "accuracy")
    if speed_source(record) == "dense":
        return HistoryPoint(trial, record.speedup, "dense")
    if speed_source(record) == "flops":
        return HistoryPoint(trial, record.speedup, "estimate")
    kind = "confirmed" if record.confirmed else "unconfirmed"
    return HistoryPoint(trial, record.speedup, kind)


def _kept_at(
    rows: Sequence[TrialRecord], kept: KeptMark | None
) -> tuple[int, float, float | None, float | None] | None:
    record = next((r for r in rows if kept is not None and kept.keeps(r)), None)
    if record is None or kept is None:
        return None
    if kept.combined or kept.speedup is None:
        # the combination was measured as one plan: the study's part shows its own figure
        own = record.speedup if record.speedup is not None else record.score
        return record.trial + 1, float(own), record.lower, record.upper
    return record.trial + 1, kept.speedup, kept.lower, kept.upper


@dataclass(frozen=True)
class ParetoPoint:
    """One trial in ``pareto.png``: its speedup (measured or estimated) and accuracy."""

    study: str
    trial: int  # 1-based
    speedup: float
    accuracy: float
    feasible: bool
    confirmed: bool


@dataclass(frozen=True)
class ParetoPoints:
    """What ``pareto.png`` draws, one panel per unit.

    Attributes:
        measured: feasible trials with a timed speedup (median of their rounds).
        estimated: every evaluated trial at the FLOP model's estimate (infeasible ones
            too: their speed is never timed).
        front: the accuracy/speedup front of the confirmed measured figures (of the
            feasible estimates when nothing was timed), ``(speedup, accuracy)`` ascending.
        kept: ``(speedup, accuracy, lower, upper)`` of the kept plan as it was kept.
        kept_unit: the panel the kept plan is drawn in (``"measured"`` or ``"flops"``).
    """

    measured: list[ParetoPoint] = field(default_factory=list)
    estimated: list[ParetoPoint] = field(default_factory=list)
    front: list[tuple[float, float]] = field(default_factory=list)
    kept: tuple[float, float, float | None, float | None] | None = None
    kept_unit: str | None = None


def pareto_points(records: Sequence[TrialRecord], kept: KeptMark | None = None) -> ParetoPoints:
    """Accuracy against speedup, the timed figures apart from the FLOP model's estimates."""
    done = [r for r in records if r.state == "COMPLETE" and r.accuracy is not None]
    measured = [
        ParetoPoint(r.layer_name, r.trial + 1, r.speedup, r.accuracy, True, r.confirmed)
        for r in done
        if r.feasible
        and r.speedup is not None
        and speed_source(r) == "measured"
        and r.accuracy is not None
    ]
    estimated = [
        ParetoPoint(r.layer_name, r.trial + 1, r.flops_speedup, r.accuracy, r.feasible, False)
        for r in done
        if r.flops_speedup is not None and r.accuracy is not None
    ]
    if measured:
        front = _pareto_front([(p.speedup, p.accuracy) for p in measured if p.confirmed])
    else:
        front = _pareto_front([(p.speedup, p.accuracy) for p in estimated if p.feasible])
    mark = None
    unit = None
    if kept is not None and kept.speedup is not None and kept.accuracy is not None:
        mark = (kept.speedup, kept.accuracy, kept.lower, kept.upper)
        unit = "measured" if kept.confirmed or kept.speed_model == "measured" else "flops"
    return ParetoPoints(measured, estimated, front, mark, unit)


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front: list[tuple[float, float]] = []
    for speed, acc in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((speed, acc))
    return sorted(front)
