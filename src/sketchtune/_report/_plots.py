"""``history.png`` and ``pareto.png``."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sketchtune.plan import SketchPlan

if TYPE_CHECKING:
    from sketchtune.results import TrialRecord

__all__ = ["plot_history", "plot_pareto"]


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


def plot_pareto(
    records: Sequence[TrialRecord],
    path: str | os.PathLike[str],
    *,
    floor: float | None = None,
    dense_accuracy: float | None = None,
    chosen: SketchPlan | None = None,
    title: str = "Accuracy vs speedup",
) -> None:
    """Scatter every measured trial (accuracy vs speedup), feasible ones highlighted, floor drawn.

    ``chosen`` circles the trial(s) of the plan that was kept (by default the
    fastest feasible trial); its speedup is as measured in that trial.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    done = [r for r in records if r.accuracy is not None and r.state == "COMPLETE"]
    feasible = [r for r in done if r.feasible and r.speedup is not None]
    infeasible = [r for r in done if not r.feasible]
    if infeasible:
        # Their speed is never measured (it would not count); the FLOP model places them.
        ax.scatter(
            [r.flops_speedup if r.flops_speedup is not None else 1.0 for r in infeasible],
            [r.accuracy for r in infeasible],
            marker="x",
            color="#999999",
            label=f"below the floor ({len(infeasible)}; x = FLOP estimate)",
        )
    if feasible:
        ax.scatter(
            [r.speedup for r in feasible],
            [r.accuracy for r in feasible],
            color="#1f77b4",
            label=f"feasible ({len(feasible)})",
        )
        front = _pareto_front(
            [(float(r.speedup or 0.0), float(r.accuracy or 0.0)) for r in feasible]
        )
        ax.plot(
            [p[0] for p in front],
            [p[1] for p in front],
            color="#1f77b4",
            alpha=0.5,
            drawstyle="steps-post",
        )
        if chosen is None:
            kept = [max(feasible, key=lambda r: r.speedup or 0.0)]
        else:
            kept = [r for r in feasible if SketchPlan(r.plan) == chosen]
        if kept:
            ax.scatter(
                [r.speedup for r in kept],
                [r.accuracy for r in kept],
                s=160,
                facecolors="none",
                edgecolors="#d62728",
                label=f"kept plan ({kept[0].speedup:.2f}x in its trial)",
            )
    if floor is not None:
        ax.axhline(floor, color="#d62728", linestyle="--", linewidth=1, label=f"floor {floor:.4g}")
    if dense_accuracy is not None:
        ax.scatter([1.0], [dense_accuracy], marker="*", s=140, color="black", label="dense model")
    ax.set_xlabel("speedup over the dense model (x)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front: list[tuple[float, float]] = []
    for speed, acc in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((speed, acc))
    return sorted(front)


def plot_history(
    records: Sequence[TrialRecord], path: str | os.PathLike[str], *, title: str = "Tuning history"
) -> None:
    """Best feasible score (speedup) after each trial, per study, with every trial's score dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label in dict.fromkeys(r.layer_name for r in records):
        rows = sorted((r for r in records if r.layer_name == label), key=lambda r: r.trial)
        best = -math.inf
        xs, bests, scores = [], [], []
        for r in rows:
            if r.feasible:
                best = max(best, r.score)
            xs.append(r.trial + 1)
            bests.append(best if best > -math.inf else math.nan)
            scores.append(r.score if r.feasible else math.nan)
        (line,) = ax.plot(xs, bests, drawstyle="steps-post", label=f"{label} best")
        ax.scatter(xs, scores, s=12, color=line.get_color(), alpha=0.5)
    ax.set_xlabel("trial")
    ax.set_ylabel("best feasible score (speedup)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len({r.layer_name for r in records}) <= 8:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
