"""``results.csv``: one row per trial, with the study, the layers it sketched and the kept mark."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sketchtune._report._mark import KeptMark, speed_source
from sketchtune._search._confirm import others_share_of
from sketchtune.registry import kind_named

if TYPE_CHECKING:
    import pandas as pd

    from sketchtune.results import TrialRecord

__all__ = ["results_table"]

#: each column of results_table(), after the per-layer parameters' place, and what it holds
COLUMNS = {
    "study": "the study's label: a layer, a joint group, or 'global' for one whole-model study",
    "trial": "the trial as the log numbers it (1-based)",
    "optuna_number": "Optuna's trial number (0-based: trial - 1)",
    "state": "Optuna's state: COMPLETE, PRUNED or FAIL",
    "feasible": "the accuracy kept today's floor",
    "kept": "this trial's plan is the kept plan (or, for a combined plan, its study's part)",
    "layers": "the layers the trial sketched, space-separated (empty: all dense)",
    "accuracy": "the measured metric",
    "speedup_x": "the trial's own speedup: median of its interleaved rounds, or the FLOP estimate",
    "speedup_source": "'measured' (timed against the dense model), 'flops' (FLOP model) or "
    "'dense' (every layer left dense: 1x)",
    "confirmed": "the trial's own rounds confirmed it faster (5+ rounds, 95% lower end > 1)",
    "confirmed_speedup_x": "kept row: the kept plan's confirmed figure; other rows: "
    "speedup_x when confirmed",
    "speedup_lower_x": "lower end of the trial's 95% interval",
    "speedup_upper_x": "upper end of the trial's 95% interval",
    "rounds": "interleaved timing rounds of the trial (0: not timed)",
    "others_cpu_share": "the share of the CPUs other processes took while the trial was timed "
    "(median over its rounds; 0.2 or more: a busy machine; empty: not measured)",
    "throughput_samples_per_s": "the sketched model's median throughput over those rounds",
    "dense_throughput_samples_per_s": "the dense model's median throughput in the same rounds",
    "flops_speedup_x": "the FLOP model's estimate (also for trials whose speed was not timed)",
    "duplicate_of": "the trial (1-based) whose result this one reused (same parameters)",
    "duration_s": "the trial's wall time in seconds",
    "reason": "why the trial failed",
    "run": "the run (process and tune() call) that timed the trial",
}
_BEFORE_PARAMS = ["study", "trial", "optuna_number", "state", "feasible", "kept", "layers"]


def results_table(records: Sequence[TrialRecord], kept: KeptMark | None = None) -> pd.DataFrame:
    """One row per trial, for ``results.csv``: the study, the trial as logged, what it
    sketched (per layer a column ``<layer>.form``: ``dense``, ``low-rank``, ``int8``,
    ``low-rank, int8 factors`` or ``random features``, and a column ``<layer>.<param>``
    per parameter of its plan entry) and its figures, units in the column names.

    ``kept`` marks the kept trial(s) and gives their ``confirmed_speedup_x``: the
    figure the kept plan was confirmed at, as the study's ``"sketchtune:kept"`` record
    holds it (for a combined plan, each member keeps its own: the combination was
    measured as one plan, see ``summary.md``). Integer columns with gaps are pandas
    nullable integers (``6``, never ``6.0``). The throughput columns are in the
    evaluator's unit: samples/s for the Lightning callback and ``measure_throughput``,
    a speed function's own unit otherwise.

    Columns: ``study``, ``trial``, ``optuna_number``, ``state``, ``feasible``, ``kept``,
    ``layers``, the ``<layer>.form`` and ``<layer>.<param>`` columns, then ``accuracy``, ``speedup_x``,
    ``speedup_source``, ``confirmed``, ``confirmed_speedup_x``, ``speedup_lower_x``,
    ``speedup_upper_x``, ``rounds``, ``others_cpu_share``, ``throughput_samples_per_s``,
    ``dense_throughput_samples_per_s``, ``flops_speedup_x``, ``duplicate_of``,
    ``duration_s``, ``reason``, ``run``.
    """
    import pandas as pd

    layer_params: dict[str, list[str]] = {}
    for record in records:
        for name, layer in record.plan.items():
            params = layer_params.setdefault(name, [])
            params.extend(p for p in layer.get("params", {}) if p not in params)
    layer_params = {name: layer_params[name] for name in sorted(layer_params, key=_natural)}
    param_columns = [
        column
        for name, params in layer_params.items()
        for column in (f"{name}.form", *(f"{name}.{p}" for p in params))
    ]
    rows = [_row(record, layer_params, kept) for record in records]
    columns = [*_BEFORE_PARAMS, *param_columns, *_after_params()]
    return pd.DataFrame(
        {
            column: pd.Series(
                [row[column] for row in rows],
                dtype=_nullable_dtype([row[column] for row in rows])
                if column in param_columns or column == "duplicate_of"
                else None,
            )
            for column in columns
        },
        columns=columns,
    )


def _natural(name: str) -> list[Any]:
    """``net.2`` before ``net.10``: numbers in layer names compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _form(type_name: str, params: dict[str, Any]) -> str:
    """The layer's form in words (``"low-rank"``, ``"int8"``, ...); its type if unknown."""
    try:
        return kind_named(type_name).form(params)
    except ValueError:  # a kind no longer registered
        return type_name


def _after_params() -> list[str]:
    return [c for c in COLUMNS if c not in _BEFORE_PARAMS]


def _row(
    record: TrialRecord, layer_params: dict[str, list[str]], kept: KeptMark | None
) -> dict[str, Any]:
    source = speed_source(record)
    is_kept = kept is not None and kept.keeps(record)
    confirmed: float | None = None
    if is_kept and kept is not None and kept.confirmed and not kept.combined:
        confirmed = kept.speedup
    elif record.confirmed and source == "measured":
        confirmed = record.speedup
    row: dict[str, Any] = {
        "study": record.layer_name,
        "trial": record.trial + 1,
        "optuna_number": record.trial,
        "state": record.state,
        "feasible": record.feasible,
        "kept": is_kept,
        "layers": " ".join(record.plan),
    }
    for name, params in layer_params.items():
        layer = record.plan.get(name)
        values = {} if layer is None else layer.get("params", {})
        row[f"{name}.form"] = "dense" if layer is None else _form(layer["type"], values)
        row.update({f"{name}.{p}": values.get(p) for p in params})
    row.update(
        accuracy=record.accuracy,
        speedup_x=record.speedup,
        speedup_source=source,
        confirmed=record.confirmed,
        confirmed_speedup_x=confirmed,
        speedup_lower_x=record.lower,
        speedup_upper_x=record.upper,
        rounds=len(record.rounds),
        throughput_samples_per_s=record.speed if source == "measured" else None,
        dense_throughput_samples_per_s=(
            statistics.median(r[0] for r in record.rounds) if record.rounds else None
        ),
        others_cpu_share=_others_share(record),
        flops_speedup_x=record.flops_speedup,
        duplicate_of=None if record.duplicate_of is None else record.duplicate_of + 1,
        duration_s=record.duration,
        reason=record.reason,
        run=record.run,
    )
    return row


def _others_share(record: TrialRecord) -> float | None:
    share = others_share_of(record.rounds)
    return None if math.isnan(share) else round(share, 3)


def _nullable_dtype(values: list[Any]) -> str | None:
    """``Int64`` for whole numbers and ``boolean`` for flags, so gaps stay empty (no ``6.0``)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "boolean"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "Int64"
    return None
