"""Results in the seed's forms (``tune()``'s return value, ``tuner.results``) and the results file."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from sketchtune._atomic import write_text_atomic
from sketchtune._search._best import Decision
from sketchtune._search._studies import StudySpec
from sketchtune._search._trialinfo import TrialInfo
from sketchtune.evaluate import AccuracyFloor
from sketchtune.plan import SketchPlan
from sketchtune.registry import kind_named
from sketchtune.results import TrialRecord, json_ready, record_from_trial

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "LoadedResults",
    "read_results",
    "seed_layer_results",
    "seed_results",
    "study_records",
    "write_results",
]

_RESULTS_TYPE = "sketchtune.TuningResults"
_RESULTS_VERSION = 1


def seed_layer_results(
    names: Sequence[str], plan: SketchPlan, kept: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """``{layer: {"params", **kept}}`` for layers in ``plan``; the others ``params=None``, score -inf."""
    dense = {"accuracy": None, "speed": None, "score": -math.inf}
    return {
        name: (
            {"params": dict(plan[name].params), **kept}
            if name in plan
            else {"params": None, **dense}
        )
        for name in names
    }


def seed_results(
    records: Sequence[TrialRecord], labels: Mapping[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """Each study's trials as ``{"params", "accuracy", "speed", "score"}``, under ``labels[study]``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        out.setdefault(labels.get(record.layer_name, record.layer_name), []).append(
            {
                "params": dict(record.params),
                "accuracy": record.accuracy,
                "speed": record.speed,
                "score": record.score,
            }
        )
    return out


@dataclass
class LoadedResults:
    """What a results file holds."""

    records: list[TrialRecord]
    floor: AccuracyFloor
    dense_accuracy: float | None
    decision: Decision | None


def write_results(
    path: str | os.PathLike[str],
    *,
    strategy: str | None,
    dense_accuracy: float | None,
    floor: AccuracyFloor,
    records: Sequence[TrialRecord],
    decision: Decision | None,
) -> None:
    """Write the results (the trials and the decision) as standard JSON, atomically."""
    data = {
        "_type": _RESULTS_TYPE,
        "_version": _RESULTS_VERSION,
        "strategy": strategy,
        "dense_accuracy": dense_accuracy,
        "floor": {"value": floor.value, "mode": floor.mode},
        "records": [asdict(r) for r in records],
        "best_plan": None if decision is None else decision.plan.to_dict(),
        "decision": None if decision is None else decision.to_dict(),
    }
    write_text_atomic(path, json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")


def study_records(
    specs: Sequence[StudySpec],
    studies: Mapping[str, optuna.Study],
    floor: AccuracyFloor | None = None,
) -> list[TrialRecord]:
    """Every finished (or failed) trial of the studies, as rows of the results table.

    With ``floor``, each trial's feasibility is judged against it (today's floor).
    """
    return [
        record_from_trial(spec.label, trial, floor)
        for spec in specs
        if spec.label in studies
        for trial in studies[spec.label].get_trials(deepcopy=False)
        if trial.state not in (TrialState.RUNNING, TrialState.WAITING)
        and TrialInfo.of(trial).skipped is None
    ]


def read_results(
    path: str | os.PathLike[str],
    *,
    layers: Collection[str] | Mapping[str, nn.Module] | None = None,
) -> LoadedResults:
    """Read a file written by :func:`write_results` (no code is executed).

    With ``layers``, a best plan that sketches any other layer is refused; when
    ``layers`` maps names to the dense modules, a best plan whose sketch would
    store more values than the layer it replaces is refused too, as plan files
    and checkpoints are (``apply_plan``'s ``bounded``): a file must not make us
    allocate more than the model.
    """
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}.") from None
    if not isinstance(data, dict) or data.get("_type") != _RESULTS_TYPE:
        raise ValueError(f"{where} is not a sketchtune results file (no _type={_RESULTS_TYPE!r}).")
    version = data.get("_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > _RESULTS_VERSION:
        raise ValueError(
            f"{where} has results format version {version!r}; this sketchtune reads up to "
            f"{_RESULTS_VERSION}. Upgrade sketchtune to load it."
        )
    try:
        records = [TrialRecord(**{**r, "score": float(r["score"])}) for r in data["records"]]
        plan = None if data["best_plan"] is None else SketchPlan.from_dict(data["best_plan"])
        floor = AccuracyFloor(data["floor"]["value"], data["floor"]["mode"])
        stored = data.get("decision")
        if stored is not None:
            decision: Decision | None = Decision.from_dict(stored)
        else:  # written before decisions were kept whole: the plan and its combination log
            decision = None if plan is None else Decision(plan)
            if decision is not None:
                decision.combination_log = list(data.get("combination_log") or [])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where} is malformed: {exc}.") from None
    if plan is not None and layers is not None:
        missing = [name for name in plan if name not in layers]
        if missing:
            raise ValueError(
                f"{where} was made for another model: it sketches {missing}, which this model "
                "lacks (or has already sketched)."
            )
    if plan is not None and isinstance(layers, Mapping):
        try:
            for name, layer in plan.items():
                kind_named(layer.type).check_size(
                    layers[name], layer.params, where=f"{where}: best_plan[{name!r}]"
                )
        except ValueError as exc:
            raise ValueError(
                f"{exc} The file is damaged or was edited; re-run the tuning."
            ) from None
    return LoadedResults(
        records=records,
        floor=floor,
        dense_accuracy=data.get("dense_accuracy"),
        decision=decision,
    )
