"""``history.png`` and ``pareto.png``, and the functions that compute what they draw.

A measured speedup and a FLOP-model estimate are two units: they never share an axis.
A trial's own figure is drawn as measured (filled when its rounds confirmed it, hollow
when not); the best line and the front use confirmed figures only, and the kept plan is
marked with the figure it was confirmed at.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

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
    "plot_history",
    "plot_pareto",
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


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib: pip install 'sketchtune[plots]' (or matplotlib)."
        ) from None
    if os.environ.get("MPLBACKEND") is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _interval_text(lower: float | None, upper: float | None) -> str:
    if lower is None or upper is None or not (math.isfinite(lower) and math.isfinite(upper)):
        return ""
    return f", 95% {lower:.2f}-{upper:.2f}x"


def _kept_label(kept: KeptMark, trial: int | None = None) -> str:
    assert kept.speedup is not None
    where = "combined plan" if kept.combined else f"trial {trial}" if trial else "plan"
    if kept.confirmed:
        return (
            f"kept {where}: {kept.speedup:.2f}x confirmed "
            f"({kept.rounds} rounds{_interval_text(kept.lower, kept.upper)})"
        )
    if kept.speed_model == "flops":
        return f"kept {where}: {kept.speedup:.2f}x (FLOP estimate)"
    return f"kept {where}: {kept.speedup:.2f}x"


def plot_pareto(
    records: Sequence[TrialRecord],
    path: str | os.PathLike[str],
    *,
    floor: float | None = None,
    dense_accuracy: float | None = None,
    kept: KeptMark | None = None,
    title: str = "Accuracy vs speedup",
) -> None:
    """Accuracy against speedup: timed trials in one panel, FLOP-model estimates in another.

    The timed panel shows each feasible trial's own median (filled: confirmed by its
    rounds; hollow: not), the front of the confirmed figures, and ``kept``'s plan at
    its confirmed figure with its 95% interval. Infeasible trials are never timed: they
    appear only in the FLOP-estimate panel, beside the feasible trials' estimates.
    The points are :func:`pareto_points`.
    """
    plt = _pyplot()
    data = pareto_points(records, kept)
    panels: list[str] = (["measured"] if data.measured else []) + ["flops"]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6.4 * len(panels), 4.4), dpi=110, squeeze=False
    )
    for ax, unit in zip(axes[0], panels, strict=True):
        if unit == "measured":
            _measured_panel(ax, data)
        else:
            _estimate_panel(ax, data, front=not data.measured)
        if data.kept is not None and data.kept_unit == unit and kept is not None:
            speedup, accuracy, low, high = data.kept
            xerr = None
            if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
                xerr = [[speedup - low], [high - speedup]]
            trial = next(iter(kept.trials.values()), None) if not kept.combined else None
            ax.errorbar(
                [speedup],
                [accuracy],
                xerr=xerr,
                fmt="o",
                ms=13,
                mfc="none",
                mec="#d62728",
                ecolor="#d62728",
                capsize=3,
                label=_kept_label(kept, None if trial is None else trial + 1),
            )
        if floor is not None:
            ax.axhline(
                floor, color="#d62728", linestyle="--", linewidth=1, label=f"floor {floor:.4g}"
            )
        if dense_accuracy is not None:
            ax.scatter(
                [1.0], [dense_accuracy], marker="*", s=140, color="black", label="dense model"
            )
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _measured_panel(ax: Any, data: ParetoPoints) -> None:
    confirmed = [p for p in data.measured if p.confirmed]
    unconfirmed = [p for p in data.measured if not p.confirmed]
    if confirmed:
        ax.scatter(
            [p.speedup for p in confirmed],
            [p.accuracy for p in confirmed],
            color="#1f77b4",
            label=f"feasible, confirmed by its rounds ({len(confirmed)})",
        )
    if unconfirmed:
        ax.scatter(
            [p.speedup for p in unconfirmed],
            [p.accuracy for p in unconfirmed],
            facecolors="none",
            edgecolors="#1f77b4",
            label=f"feasible, not confirmed ({len(unconfirmed)})",
        )
    if data.front:
        ax.plot(
            [p[0] for p in data.front],
            [p[1] for p in data.front],
            color="#1f77b4",
            alpha=0.5,
            drawstyle="steps-post",
            label="front of confirmed figures",
        )
    ax.set_xlabel("measured speedup over the dense model (x, median of interleaved rounds)")
    ax.set_title("timed (feasible trials only)", fontsize=9)


def _estimate_panel(ax: Any, data: ParetoPoints, *, front: bool) -> None:
    feasible = [p for p in data.estimated if p.feasible]
    infeasible = [p for p in data.estimated if not p.feasible]
    if feasible:
        ax.scatter(
            [p.speedup for p in feasible],
            [p.accuracy for p in feasible],
            color="#1f77b4" if front else "#9ecae1",
            label=f"feasible ({len(feasible)})",
        )
    if infeasible:
        ax.scatter(
            [p.speedup for p in infeasible],
            [p.accuracy for p in infeasible],
            marker="x",
            color="#999999",
            label=f"below the floor ({len(infeasible)})",
        )
    if front and data.front:
        ax.plot(
            [p[0] for p in data.front],
            [p[1] for p in data.front],
            color="#1f77b4",
            alpha=0.5,
            drawstyle="steps-post",
        )
    ax.set_xlabel("FLOP-model speedup estimate (x, not timed)")
    ax.set_title("FLOP-model estimates (every evaluated trial)", fontsize=9)


def plot_history(
    records: Sequence[TrialRecord],
    path: str | os.PathLike[str],
    *,
    kept: KeptMark | None = None,
    title: str = "Tuning history",
) -> None:
    """The best confirmed speedup after each trial (1-based, as logged), per study.

    Each trial's own figure is a point (filled: confirmed; hollow: not); trials below
    the floor and failed ones are ticks along the bottom; the kept plan is marked at the
    figure it was kept at. FLOP-model estimates (``speed="flops"``) and accuracies
    (no speed objective) are labelled as such. The data are :func:`history_points`.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    histories = history_points(records, kept)
    measures = {h.measure for h in histories}
    for h in histories:
        what = {"measured": "best confirmed", "flops": "best FLOP estimate"}.get(
            h.measure, "best accuracy"
        )
        (line,) = ax.plot(
            h.trials,
            [math.nan if b is None else b for b in h.best],
            drawstyle="steps-post",
            label=f"{h.study}: {what}",
        )
        color = line.get_color()
        for kinds, style in (
            (("confirmed", "estimate", "accuracy"), {"color": color}),
            (("unconfirmed",), {"facecolors": "none", "edgecolors": color}),
        ):
            shown = [p for p in h.points if p.kind in kinds and p.value is not None]
            if shown:
                label = "unconfirmed trial figure" if kinds == ("unconfirmed",) else None
                ax.scatter(
                    [p.trial for p in shown],
                    [p.value for p in shown],
                    s=14,
                    alpha=0.7,
                    label=label,
                    **style,
                )
        dense = [p.trial for p in h.points if p.kind == "dense"]
        if dense:
            ax.scatter(
                dense,
                [1.0] * len(dense),
                s=14,
                marker="s",
                color="#555555",
                label="all layers dense (1x)",
            )
        missed = [p.trial for p in h.points if p.kind in ("infeasible", "failed")]
        if missed:
            ax.plot(
                missed,
                [0.0] * len(missed),
                "|",
                color="#999999",
                ms=10,
                transform=ax.get_xaxis_transform(),
                label="below the floor / failed",
            )
        if h.kept is not None and kept is not None:
            trial, figure, low, high = h.kept
            yerr = None
            if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
                yerr = [[figure - low], [high - figure]]
            ax.errorbar(
                [trial],
                [figure],
                yerr=yerr,
                fmt="o",
                ms=11,
                mfc="none",
                mec="#d62728",
                ecolor="#d62728",
                capsize=3,
                label=None if kept.combined else _kept_label(kept, trial),
            )
    if kept is not None and kept.combined and kept.speedup is not None:
        ax.axhline(kept.speedup, color="#d62728", linestyle=":", label=_kept_label(kept))
    ax.set_xlabel("trial (as logged)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if measures == {"measured"}:
        ax.set_ylabel("speedup over the dense model (x, measured)")
    elif measures == {"flops"}:
        ax.set_ylabel("speedup (x, FLOP-model estimate)")
    elif measures == {"accuracy"}:
        ax.set_ylabel("accuracy (no speed objective)")
    else:
        ax.set_ylabel("speedup (x) or accuracy, per study")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(histories) <= 8:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
