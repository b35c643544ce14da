"""Results: the trials table, plots (Pareto front, history) and a model tree of what was swapped."""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState
from torch import nn

from sketchtune._atomic import write_text_atomic
from sketchtune._redact import redact
from sketchtune._search._trialinfo import TrialInfo
from sketchtune.plan import SketchPlan
from sketchtune.registry import kind_named, kind_of, sketch_of, swapped_whole

if TYPE_CHECKING:
    import pandas as pd
    from optuna.trial import FrozenTrial

    from sketchtune.evaluate import AccuracyFloor

__all__ = [
    "RunSummary",
    "TrialRecord",
    "json_ready",
    "record_from_trial",
    "format_model_tree",
    "plot_history",
    "plot_pareto",
    "records_dataframe",
    "write_report",
]


@dataclass
class TrialRecord:
    """One row of the results table: a trial as sketchtune recorded it.

    ``trial`` is Optuna's trial number (0-based); logs, plots and ``results.csv`` show
    it 1-based, as the trial count. ``rounds`` holds the interleaved timing rounds
    (``[[dense, plan], ...]`` throughputs) behind ``speedup``, their median.
    """

    layer_name: str
    params: dict[str, Any]
    accuracy: float | None
    speed: float | None
    speedup: float | None
    score: float
    feasible: bool
    trial: int
    state: str
    duration: float | None
    reason: str | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    flops_speedup: float | None = None
    rounds: list[list[float]] = field(default_factory=list)
    confirmed: bool = False
    lower: float | None = None
    upper: float | None = None
    run: str | None = None
    duplicate_of: int | None = None


def record_from_trial(
    label: str, trial: FrozenTrial, floor: AccuracyFloor | None = None
) -> TrialRecord:
    """The results-table row of an Optuna trial that sketchtune ran (``label``: its study).

    With ``floor``, feasibility is judged against it (today's floor), not taken from what
    was stored when the trial ran: a resumed study with a tighter floor re-judges every
    trial. A trial stopped early (its validation proved the floor out of reach) stays
    infeasible: only a bound of its accuracy is known.
    """
    info = TrialInfo.of(trial)
    if floor is not None and info.accuracy is not None and not info.early_stop:
        feasible = floor.feasible(info.accuracy) and trial.state == TrialState.COMPLETE
    else:
        feasible = bool(info.feasible) and trial.state == TrialState.COMPLETE
    accuracy = info.accuracy
    speedup = info.speedup
    if not feasible:
        score = -math.inf
    else:
        score = float(speedup) if speedup is not None else float(accuracy or 0.0)
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return TrialRecord(
        layer_name=label,
        params=dict(trial.params),
        accuracy=accuracy,
        speed=info.speed,
        speedup=speedup,
        score=score,
        feasible=feasible,
        trial=trial.number,
        state=trial.state.name,
        duration=duration,
        reason=info.reason,
        plan=dict(info.plan or {}),
        flops_speedup=info.flops_speedup,
        rounds=[list(r) for r in info.rounds or []],
        confirmed=bool(info.confirmed),
        lower=info.lower,
        upper=info.upper,
        run=info.run,
        duplicate_of=info.duplicate_of,
    )


def json_ready(value: Any) -> Any:
    """``value`` with infinities as strings and NaN as ``None``, so ``json.dump`` writes standard JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "-inf" if value < 0 else "inf"
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


_FIXED_COLUMNS = [
    "accuracy",
    "speed",
    "speedup",
    "score",
    "feasible",
    "trial",
    "state",
    "duration",
    "reason",
]


def records_dataframe(records: Sequence[TrialRecord]) -> pd.DataFrame:
    """One row per trial: ``layer_name``, one column per parameter, then the metrics."""
    import pandas as pd

    param_names: list[str] = []
    for record in records:
        for name in record.params:
            if name not in param_names:
                param_names.append(name)
    rows = []
    for r in records:
        row: dict[str, Any] = {"layer_name": r.layer_name}
        row.update({p: r.params.get(p) for p in param_names})
        row.update(
            accuracy=r.accuracy,
            speed=r.speed,
            speedup=r.speedup,
            score=r.score,
            feasible=r.feasible,
            trial=r.trial,
            state=r.state,
            duration=r.duration,
            reason=r.reason,
        )
        rows.append(row)
    columns = ["layer_name", *param_names, *_FIXED_COLUMNS]
    return pd.DataFrame(rows, columns=columns)


def format_model_tree(model: nn.Module, *, max_depth: int | None = None) -> str:
    """The module tree, marking sketched layers (``*``) and layers that could be sketched (``.``).

    Example:
        >>> import torch
        >>> from sketchtune.nn import SKLinear
        >>> print(format_model_tree(torch.nn.Sequential(SKLinear(64, 64, 1, 8, seed=0), torch.nn.ReLU())))
        Sequential
        ├── 0: SKLinear  * num_terms=1 low_rank=8
        └── 1: ReLU
        (* sketched: 1, . sketchable dense: 0)
    """
    lines = [type(model).__name__]
    counts = {"sketched": 0, "dense": 0}

    def label(module: nn.Module) -> str:
        sketched = sketch_of(module)
        if sketched is not None:
            counts["sketched"] += 1
            params = " ".join(f"{k}={v}" for k, v in sketched[1].items())
            return f"{type(module).__name__}  * {params}"
        kind = kind_of(module)
        if kind is not None:
            counts["dense"] += 1
            return f"{kind.describe(module)}  ."
        return type(module).__name__

    def walk(module: nn.Module, prefix: str, depth: int) -> None:
        if swapped_whole(module):
            return  # priced and swapped whole
        children = list(module.named_children())
        for i, (name, child) in enumerate(children):
            last = i == len(children) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{name}: {label(child)}")
            if max_depth is None or depth + 1 < max_depth:
                walk(child, prefix + ("    " if last else "│   "), depth + 1)

    walk(model, "", 0)
    lines.append(f"(* sketched: {counts['sketched']}, . sketchable dense: {counts['dense']})")
    return "\n".join(lines)


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


@dataclass
class RunSummary:
    """Dense vs tuned, for the end-of-run table and ``summary.md``."""

    monitor: str
    floor: str
    dense_accuracy: float | None
    tuned_accuracy: float | None
    dense_throughput: float | None
    tuned_throughput: float | None
    dense_weights: int
    tuned_weights: int
    plan: SketchPlan
    trials: int
    feasible: int
    storage: str | None
    study_name: str | None
    confirmed_speedup: float | None = None
    #: what was kept, or why the model stays dense (the tuner's ``verdict``)
    verdict: str | None = None

    def __repr__(self) -> str:
        # the storage only as it may be shown: a password never reaches a log or a notebook
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["storage"] = redact(self.storage)
        return f"RunSummary({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def speedup(self) -> float | None:
        """The confirmed speedup (median per-round ratio), else the ratio of the throughputs."""
        if self.confirmed_speedup is not None:
            return self.confirmed_speedup
        if self.dense_throughput and self.tuned_throughput:
            return self.tuned_throughput / self.dense_throughput
        return None

    def table(self) -> str:
        """A Markdown table: accuracy, throughput, speedup and weights, then each sketched layer."""

        def num(value: float | None, fmt: str) -> str:
            return "n/a" if value is None else format(value, fmt)

        speedup = self.speedup
        lines = [
            f"| model | {self.monitor} | throughput (samples/s) | speedup | weights (params + buffers) |",
            "|---|---:|---:|---:|---:|",
            f"| dense | {num(self.dense_accuracy, '.4f')} | {num(self.dense_throughput, ',.0f')} | 1.00x "
            f"| {self.dense_weights:,} |",
            f"| tuned | {num(self.tuned_accuracy, '.4f')} | {num(self.tuned_throughput, ',.0f')} "
            f"| {num(speedup, '.2f')}{'x' if speedup is not None else ''} | {self.tuned_weights:,} |",
            "",
            f"Floor {self.floor}; {self.feasible}/{self.trials} trials feasible.",
            "",
        ]
        if self.plan:
            lines += ["| layer | form | sketched as | parameters |", "|---|---|---|---|"]
            for name, layer in self.plan.items():
                params = ", ".join(f"{k}={v}" for k, v in layer.params.items())
                form = kind_named(layer.type).form(layer.params)
                lines.append(f"| {name} | {form} | {layer.type} | {params} |")
        else:
            lines.append(
                f"Nothing was kept: {self.verdict}"
                if self.verdict
                else "No sketch kept the floor and ran faster: the model stays dense."
            )
        return "\n".join(lines)

    def dashboard_hint(self) -> str:
        if self.storage and "://" in self.storage:
            # quoted for a shell: a path may hold spaces, quotes or `$`
            return f"Browse the study: optuna-dashboard {shlex.quote(str(redact(self.storage)))}"
        return "The study is in memory; pass storage='sqlite:///tune.db' to browse it with optuna-dashboard."


def write_report(
    out_dir: str | os.PathLike[str],
    summary: RunSummary,
    records: Sequence[TrialRecord],
    *,
    floor: float | None = None,
) -> dict[str, str]:
    """Write ``results.csv``, ``plan.json``, ``summary.md`` and (with matplotlib) the two plots.

    Returns:
        ``{name: path}`` of the files written.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        name: os.path.join(os.fspath(out_dir), name)
        for name in ("results.csv", "plan.json", "summary.md")
    }
    write_text_atomic(paths["results.csv"], records_dataframe(records).to_csv(index=False))
    summary.plan.save(paths["plan.json"])
    write_text_atomic(
        paths["summary.md"], summary.table() + "\n\n" + summary.dashboard_hint() + "\n"
    )
    try:
        _pyplot()
    except ImportError:
        return paths
    paths["pareto.png"] = os.path.join(os.fspath(out_dir), "pareto.png")
    paths["history.png"] = os.path.join(os.fspath(out_dir), "history.png")
    plot_pareto(
        records,
        paths["pareto.png"],
        floor=floor,
        dense_accuracy=summary.dense_accuracy,
        chosen=summary.plan,
    )
    plot_history(records, paths["history.png"])
    return paths
