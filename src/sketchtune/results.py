"""Results: the trials tables, the plots (Pareto front, history), the run's summary and a model
tree of what was swapped.

Every figure these show is read from the study's records: each trial's :class:`TrialRecord`
and the kept plan's :class:`KeptMark`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState
from torch import nn

from sketchtune._report._files import write_report
from sketchtune._report._mark import KeptMark, speed_source
from sketchtune._report._plots import plot_history, plot_pareto
from sketchtune._report._points import (
    HistoryPoint,
    ParetoPoint,
    ParetoPoints,
    StudyHistory,
    history_points,
    pareto_points,
)
from sketchtune._report._summary import DASHBOARD_NOTE, RunSummary, TimingSetup
from sketchtune._report._table import results_table
from sketchtune._search._trialinfo import TrialInfo
from sketchtune.registry import kind_of, sketch_of, swapped_whole

if TYPE_CHECKING:
    import pandas as pd
    from optuna.trial import FrozenTrial

    from sketchtune.evaluate import AccuracyFloor

__all__ = [
    "DASHBOARD_NOTE",
    "HistoryPoint",
    "KeptMark",
    "ParetoPoint",
    "ParetoPoints",
    "RunSummary",
    "StudyHistory",
    "TimingSetup",
    "TrialRecord",
    "format_model_tree",
    "history_points",
    "json_ready",
    "pareto_points",
    "plot_history",
    "plot_pareto",
    "record_from_trial",
    "records_dataframe",
    "results_table",
    "speed_source",
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
    """One row per trial in the seed's form: ``layer_name``, one column per parameter, then
    the metrics (``tuner.get_results_dataframe()``; ``trial`` is Optuna's 0-based number).

    ``results.csv`` is :func:`results_table`: 1-based trials, the layers each trial
    sketched, units in the column names and the kept plan marked.
    """
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
