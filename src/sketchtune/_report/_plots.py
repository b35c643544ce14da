"""``history.png`` and ``pareto.png``: drawing what :mod:`._points` computes.

A measured speedup and a FLOP-model estimate never share an axis; a trial's own figure
is filled when its rounds confirmed it and hollow when not; the kept plan is circled at
the figure it was kept at, with its 95% interval.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sketchtune._report._mark import KeptMark
from sketchtune._report._points import ParetoPoints, history_points, pareto_points

if TYPE_CHECKING:
    from sketchtune.results import TrialRecord

__all__ = ["plot_history", "plot_pareto"]


#: the kept plan's mark in both plots: a red ring with its confirmed interval as error bars
_KEPT_MARK: dict[str, Any] = {
    "fmt": "o",
    "mfc": "none",
    "mec": "#d62728",
    "ecolor": "#d62728",
    "capsize": 3,
}


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


def _span(value: float, low: float | None, high: float | None) -> list[list[float]] | None:
    """Matplotlib's error-bar lengths for an interval around ``value`` (``None``: no interval)."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    return [[value - low], [high - value]]


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
            trial = next(iter(kept.trials.values()), None) if not kept.combined else None
            ax.errorbar(
                [speedup],
                [accuracy],
                xerr=_span(speedup, low, high),
                ms=13,
                **_KEPT_MARK,
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
            ax.errorbar(
                [trial],
                [figure],
                yerr=_span(figure, low, high),
                ms=11,
                **_KEPT_MARK,
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
