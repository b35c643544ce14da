"""Preparing a planned study: every group's options (predicted error and cost) and the frontier.

Computed once per study from what the dense baseline recorded, and stored in the
study's user attributes (:data:`STUDY_ATTR`), so a resumed run or a second worker
reads them instead of computing them again (and reads the planner's trial tags
against the same options). With measured speed each group is timed alone; the
timings of steady groups are kept, an unsteady group is timed once more and then
priced from multiply-adds at the steady groups' rate.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from torch import nn

from sketchtune._memory import release_freed_memory
from sketchtune._planner._frontier import Frontier, allocate
from sketchtune._planner._options import (
    GroupOptions,
    Recorded,
    dense_macs,
    estimate_from_macs,
    group_options,
)
from sketchtune._search._builder import PlanBuilder
from sketchtune._search._judge import Judge
from sketchtune._search._studies import Group, StudyLayout, StudySpec

__all__ = ["STUDY_ATTR", "Prepared", "prepare"]

#: study user attribute holding the options and the frontier
STUDY_ATTR = "sketchtune:planner"


@dataclass
class Prepared:
    """A planned study's options and frontier, computed here or loaded from the study."""

    options: list[GroupOptions]
    frontier: Frontier
    unit: str
    loaded: bool
    prepare_seconds: float = 0.0
    allocate_seconds: float = 0.0


def prepare(
    spec: StudySpec,
    study: optuna.Study,
    layout: StudyLayout,
    judge: Judge,
    builder: PlanBuilder,
    *,
    progress: Callable[[], None] | None = None,
) -> Prepared:
    """The study's stored options and frontier, or new ones (then stored in the study)."""
    timed = judge.speed_model is None and judge.evaluator.has_throughput
    signature = _signature(spec, timed)
    activation = [
        name
        for g in spec.groups
        if "init" in g.space and "activation" in g.space["init"].grid()
        for name in g.names
    ]
    stored = _stored(study, signature)
    if stored is not None:
        builder.release_statistics(activation=activation)
        return _from_stored(spec, stored, study.study_name)
    builder.keep_statistics = True  # the closed-form errors read them
    try:
        return _prepare(spec, study, layout, judge, builder, timed, signature, progress)
    finally:
        builder.keep_statistics = False
        builder.release_statistics(activation=activation)


def _prepare(
    spec: StudySpec,
    study: optuna.Study,
    layout: StudyLayout,
    judge: Judge,
    builder: PlanBuilder,
    timed: bool,
    signature: str,
    progress: Callable[[], None] | None,
) -> Prepared:
    start = time.perf_counter()
    recorded = Recorded(
        calls=dict(judge.shapes.calls),
        covariance={n: a.calibration for n, a in builder.aids.items() if a.calibration is not None},
        samples=builder.samples,
    )
    if timed and any(
        n not in recorded.samples and not recorded.calls.get(n)
        for g in spec.groups
        for n in g.names
    ):
        timed = False  # a layer was never called with a recorded shape: price MACs

    def price(group: Group, timed: bool) -> GroupOptions:
        return group_options(
            group,
            layout.dense,
            recorded,
            builder.build,
            lambda params: layout.plan_from([group], {group.key: params}),
            timed=timed,
        )

    options: list[GroupOptions] = []
    for group in spec.groups:
        options.append(price(group, timed))
        release_freed_memory()  # the group's candidates, built to be timed, are gone
        if progress is not None:
            progress()
    if timed:
        options = _steady_costs(options, spec.groups, price, layout.dense, recorded)
        if not any(o.steady and not o.estimated for o in options):
            # Every layer's timing was unsteady (a dense layer timed twice disagreed by
            # more than 1.5x, twice): plan with multiply-adds; the trials and the
            # confirmation still measure real speed.
            timed = False
            options = [price(group, False) for group in spec.groups]
    prepared = time.perf_counter()
    frontier = allocate(options)
    result = Prepared(options, frontier, "seconds" if timed else "macs", loaded=False)
    result.prepare_seconds = prepared - start
    result.allocate_seconds = time.perf_counter() - prepared
    record = {
        "signature": signature,
        "unit": result.unit,
        "options": [o.to_dict() for o in options],
        "frontier": {
            "moves": [list(m) for m in frontier.moves],
            "errors": list(frontier.errors),
            "costs": list(frontier.costs),
        },
    }
    # Workers sharing the study must read each other's trial tags (frontier points,
    # candidate indices) against the same options: one that started at the same time
    # and stored first wins, and so does one whose write landed just after this one.
    stored = _stored(study, signature)
    if stored is None:
        study.set_user_attr(STUDY_ATTR, record)
        stored = _stored(study, signature)
    if stored is not None and _canonical(stored) != _canonical(record):
        adopted = _from_stored(spec, stored, study.study_name)
        adopted.prepare_seconds = result.prepare_seconds
        return adopted
    return result


def _from_stored(spec: StudySpec, stored: dict[str, Any], study_name: str) -> Prepared:
    """The options of the record ``stored``; ``ValueError`` naming the study if it is damaged."""
    try:
        options = [GroupOptions.from_dict(g) for g in stored["options"]]
        kept = stored["frontier"]
        frontier = Frontier(
            tuple((int(g), int(c)) for g, c in kept["moves"]),
            tuple(float(e) for e in kept["errors"]),
            tuple(float(c) for c in kept["costs"]),
        )
        unit = stored["unit"]
        problem = _inconsistency(spec, options, frontier, unit)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        raise ValueError(
            f"study {study_name!r} holds a damaged planner record (its user attribute "
            f"{STUDY_ATTR!r}: {problem}), so its planned trials cannot be read. Continue in a "
            "new study (another study_name), or clear the record to plan again: "
            f"optuna.load_study(study_name={study_name!r}, storage=...)"
            f".set_user_attr({STUDY_ATTR!r}, None)."
        )
    return Prepared(options, frontier, str(unit), loaded=True)


def _steady_costs(
    options: list[GroupOptions],
    groups: Sequence[Group],
    price: Callable[[Group, bool], GroupOptions],
    dense: dict[str, nn.Module],
    recorded: Recorded,
) -> list[GroupOptions]:
    """Timed options with each unsteady group timed once more, else estimated.

    A group whose dense layer timed differently before and after its candidates
    (the machine was busy meanwhile) is timed again; if it is still unsteady, its
    costs are its multiply-adds at the seconds per multiply-add the steady groups
    were timed at. The steady groups' timings are kept: they were paid for.
    """
    out = list(options)
    for i, option in enumerate(out):
        if not option.steady:
            out[i] = price(groups[i], True)
    steady = [i for i, o in enumerate(out) if o.steady]
    rates = [
        out[i].dense_cost / macs
        for i in steady
        if (macs := dense_macs(groups[i], dense, recorded)) > 0
    ]
    if not rates:
        return out  # nothing steady to scale by: the caller falls back to multiply-adds
    rate = statistics.median(rates)
    for i, option in enumerate(out):
        if not option.steady:
            out[i] = estimate_from_macs(option, groups[i], dense, recorded, rate)
    return out


def _stored(study: optuna.Study, signature: str) -> dict[str, Any] | None:
    """The planner data stored in ``study`` for this search (read from the storage now)."""
    stored = study.user_attrs.get(STUDY_ATTR)
    if isinstance(stored, dict) and stored.get("signature") == signature:
        return stored
    return None


def _inconsistency(
    spec: StudySpec, options: list[GroupOptions], frontier: Frontier, unit: Any
) -> str | None:
    """What makes a stored record unusable for ``spec``, or ``None``."""
    if unit not in ("macs", "seconds"):
        return f"unit {unit!r} is neither 'macs' nor 'seconds'"
    keys = [o.key for o in options]
    if keys != [g.key for g in spec.groups]:
        return f"options for groups {keys}, the search has {[g.key for g in spec.groups]}"
    if not len(frontier.costs) == len(frontier.errors) == len(frontier.moves) + 1:
        return (
            f"a frontier of {len(frontier.moves)} moves with {len(frontier.costs)} costs and "
            f"{len(frontier.errors)} errors"
        )
    for group, candidate in frontier.moves:
        if not (0 <= group < len(options) and 0 <= candidate < len(options[group].candidates)):
            return f"a frontier move to group {group}, candidate {candidate}, which does not exist"
    return None


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True)


def _signature(spec: StudySpec, timed: bool) -> str:
    """What the stored options depend on: the groups, their spaces and the cost unit."""
    described = [
        [g.key, g.names, g.kind.name, {k: repr(v) for k, v in g.space.items()}, g.copy_weights]
        for g in spec.groups
    ]
    text = json.dumps([described, timed], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
