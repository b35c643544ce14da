"""Per-layer options of the planner: each candidate's predicted output error and cost.

Errors come from :mod:`._errors` (closed form from the spectra, or measured on a
recorded call; int8 candidates are measured, and a sketch with int8 factors adds
the increment its int8 factors cause on the recorded call to its closed form); costs are multiply-adds of every recorded call, or, when speed is
measured, the layer timed alone on its recorded call (:mod:`._costs`), dense and
at each candidate; candidates no faster than the dense layer are dropped.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from sketchtune._planner._costs import (
    call_for_timing,
    candidate_seconds,
    family,
    layer_seconds,
    recorded_calls,
    shape_key,
    sketch_macs,
)
from sketchtune._planner._errors import (
    closed_form_errors,
    dense_output,
    measured_error,
    quantization_increment,
)
from sketchtune._search._studies import Group, StudyLayout
from sketchtune.kinds._base import CallShapes
from sketchtune.kinds._lowrank import LowRankKind
from sketchtune.kinds._quant import FULL
from sketchtune.nn import InputCovariance
from sketchtune.plan import SketchPlan

__all__ = [
    "Candidate",
    "GroupOptions",
    "Recorded",
    "candidate_params",
    "closed_form_errors",
    "dense_macs",
    "estimate_from_macs",
    "predicted_error",
    "observed_layers",
]

#: the most candidates one layer offers the planner (a longer grid is thinned geometrically)
MAX_CANDIDATES = 64
_CLOSED_FORM = ("svd", "activation")
_STEADY = 1.5  # the dense layer timed before and after its candidates agrees within this


@dataclass(frozen=True)
class Candidate:
    """One way to sketch a group: its parameters, predicted relative output error and cost."""

    params: dict[str, Any]
    error: float
    cost: float


@dataclass(frozen=True)
class GroupOptions:
    """What the planner may do with one group: stay dense (``dense_cost``) or take a candidate."""

    key: str
    dense_cost: float
    candidates: tuple[Candidate, ...]
    steady: bool = True  # timed costs: the dense layer timed the same before and after
    estimated: bool = False  # costs are multiply-adds at the steady layers' seconds per MAC

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "dense_cost": self.dense_cost,
            "candidates": [[c.params, c.error, c.cost] for c in self.candidates],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupOptions:
        return cls(
            str(data["key"]),
            float(data["dense_cost"]),
            tuple(Candidate(dict(p), float(e), float(c)) for p, e, c in data["candidates"]),
        )


@dataclass
class Recorded:
    """What the dense baseline left for the planner, per layer name."""

    calls: dict[str, list[CallShapes]]  # every call's shapes (the FLOP model's record)
    covariance: dict[str, InputCovariance]  # gathered input statistics
    samples: dict[str, tuple[tuple[Any, ...], dict[str, Any]]]  # a recorded call's arguments


def candidate_params(group: Group) -> list[dict[str, Any]]:
    """Every parameter set of ``group``'s space, deduplicated and capped at :data:`MAX_CANDIDATES`.

    For low-rank kinds ``num_terms * low_rank`` is what matters (cost and
    factorized error depend on the total rank only), so each product keeps its
    smallest ``num_terms``; ``low_rank="full"`` (no factorization: the int8 weight)
    is one candidate whatever ``num_terms`` and ``init``, and values that describe
    the dense layer itself (``low_rank="full", quant="none"``) are none.

    Raises:
        ValueError: a parameter has no finite grid (a continuous ``Float``).
    """
    grids = {name: spec.grid() for name, spec in group.space.items()}
    combos = [
        dict(zip(grids, values, strict=True)) for values in itertools.product(*grids.values())
    ]
    if isinstance(group.kind, LowRankKind) and {"num_terms", "low_rank"} <= set(grids):
        kept: dict[tuple[Any, ...], dict[str, Any]] = {}
        for params in sorted(combos, key=lambda p: p["num_terms"]):
            full = params["low_rank"] == FULL
            ignored = ("num_terms", "low_rank", "init") if full else ("num_terms", "low_rank")
            others = tuple(sorted((k, repr(v)) for k, v in params.items() if k not in ignored))
            total = FULL if full else params["num_terms"] * params["low_rank"]
            kept.setdefault((total, others), params)
        combos = list(kept.values())
    combos = [params for params in combos if group.kind.plan_entry(params) is not None]
    if len(combos) > MAX_CANDIDATES:
        step = len(combos) / MAX_CANDIDATES
        combos = [combos[int(i * step)] for i in range(MAX_CANDIDATES)]
    return combos


def group_options(
    group: Group,
    dense: dict[str, nn.Module],
    recorded: Recorded,
    build: Callable[[SketchPlan], dict[str, nn.Module]],
    plan_of: Callable[[dict[str, Any]], SketchPlan],
    *,
    timed: bool,
) -> GroupOptions:
    """The candidates of ``group`` with their predicted error and cost (dense cost alongside)."""
    kind = group.kind
    spectra: dict[str, dict[str, list[float]]] = {}
    closed = isinstance(kind, LowRankKind) and group.copy_weights
    if closed:
        for name in group.names:
            weight_t = kind.weight_matrix(dense[name])
            spectra[name] = closed_form_errors(weight_t, recorded.covariance.get(name))

    dense_seconds: dict[str, float] = {}
    if timed:
        for name in group.names:
            call = call_for_timing(name, dense[name], recorded)
            dense_seconds[name] = math.nan if call is None else layer_seconds(dense[name], *call)
    dense_cost = sum(
        _dense_cost(group, name, dense, recorded, dense_seconds) for name in group.names
    )

    params_list = [
        params
        for params in candidate_params(group)
        if timed
        or (
            params.get("quant", "none") == "none"  # multiply-adds do not price int8
            and sum(
                kind.sketch_macs(dense[n], params, c)
                for n in group.names
                for c in recorded_calls(recorded, n)
            )
            < dense_cost  # saves no multiply-adds at the recorded shapes: not worth measuring
        )
    ]
    seconds = (
        candidate_seconds(group, params_list, dense, recorded, build, plan_of, dense_seconds)
        if timed
        else {}
    )

    def cost_of(params: dict[str, Any]) -> float:
        cost = 0.0
        for name in group.names:
            if (name, shape_key(params)) in seconds:
                calls = max(1, len(recorded.calls.get(name, ())))
                cost += seconds[name, shape_key(params)] * calls
            else:
                cost += sketch_macs(group, name, dense, recorded, params)
        return cost

    costs = {shape_key(p): cost_of(p) for p in params_list}
    references: dict[str, Any] = {}  # each layer's dense output on its recorded call
    candidates: list[Candidate] = []
    for params in params_list:
        cost = costs[shape_key(params)]
        if params.get("quant", "none") != "none" and (
            cost >= dense_cost or _dominated(params, cost, costs)
        ):
            continue  # an int8 form that is never chosen: no error to measure
        error = sum(
            predicted_error(
                group,
                name,
                params,
                dense,
                recorded,
                spectra,
                lambda p: build(plan_of(p)),
                references=references,
            )
            for name in group.names
        )
        if math.isfinite(error):
            candidates.append(Candidate(params, error, cost))
    if timed:
        candidates = _monotone_costs(candidates)
    steady = True
    for name, first in dense_seconds.items():
        call = call_for_timing(name, dense[name], recorded)
        if call is not None and math.isfinite(first):
            again = layer_seconds(dense[name], *call)
            steady = steady and max(again, first) <= _STEADY * min(again, first)
    kept = tuple(c for c in candidates if c.cost < dense_cost)
    return GroupOptions(group.key, dense_cost, kept, steady)


def dense_macs(group: Group, dense: dict[str, nn.Module], recorded: Recorded) -> float:
    """Multiply-adds of the group's dense layers over their recorded calls."""
    return sum(
        group.kind.dense_macs(dense[n], c) for n in group.names for c in recorded_calls(recorded, n)
    )


def estimate_from_macs(
    option: GroupOptions,
    group: Group,
    dense: dict[str, nn.Module],
    recorded: Recorded,
    seconds_per_mac: float,
) -> GroupOptions:
    """``option`` with its timed costs replaced by multiply-adds at ``seconds_per_mac``.

    For a group whose timing stayed unsteady: its errors stand, its costs come from
    the rate the steady groups were timed at, so every cost keeps one unit. int8
    candidates are dropped: their multiply-adds say nothing of their speed.
    """
    dense_cost = seconds_per_mac * dense_macs(group, dense, recorded)
    candidates = [
        Candidate(
            c.params,
            c.error,
            seconds_per_mac
            * sum(sketch_macs(group, n, dense, recorded, c.params) for n in group.names),
        )
        for c in option.candidates
        if c.params.get("quant", "none") == "none"  # multiply-adds do not price int8
    ]
    kept = tuple(c for c in candidates if c.cost < dense_cost)
    return GroupOptions(option.key, dense_cost, kept, steady=True, estimated=True)


def _dominated(params: dict[str, Any], cost: float, costs: dict[str, float]) -> bool:
    """An int8-factor candidate timed no faster than the same sketch in float.

    Its error is the float sketch's plus a non-negative increment, so it is never
    a better trade than its float twin (at small ranks the per-call activation
    quantization costs more than the int8 product saves).
    """
    if params.get("quant", "none") == "none" or params.get("low_rank") == FULL:
        return False
    twin = costs.get(shape_key({**params, "quant": "none"}))
    return twin is not None and cost >= twin


def predicted_error(
    group: Group,
    name: str,
    params: dict[str, Any],
    dense: dict[str, nn.Module],
    recorded: Recorded,
    spectra: dict[str, dict[str, list[float]]],
    built: Callable[[dict[str, Any]], dict[str, nn.Module]],
    *,
    references: dict[str, Any] | None = None,
) -> float:
    """The relative output error of layer ``name`` at ``params`` (``inf``: cannot be predicted).

    Closed form from the layer's spectra (when it has them) for factorized inits;
    plus, for int8 factors, the increment they cause on the recorded call; measured
    on the recorded call for everything else (the int8 weight, random sketches,
    attention). ``built(params)`` gives the modules of a candidate by layer name;
    ``references`` keeps each layer's dense output across calls.
    """
    init = params.get("init", group.kind.defaults.get("init"))
    sample = recorded.samples.get(name)
    reference = None
    if sample is not None and references is not None:
        if name not in references:
            references[name] = dense_output(dense[name], sample)
        reference = references[name]
    if name in spectra and init in _CLOSED_FORM and params.get("low_rank") != FULL:
        rank = 2 * int(params["num_terms"]) * int(params["low_rank"])
        tails = spectra[name][str(init)]
        error = tails[min(rank, len(tails) - 1)]
        if params.get("quant", "none") == "none":
            return error
        if sample is None:
            return math.inf
        floats = built({**params, "quant": "none"})[name]
        return error + quantization_increment(
            dense[name], floats, built(params)[name], sample, reference=reference
        )
    if sample is None:
        return math.inf
    return measured_error(dense[name], built(params)[name], sample, reference=reference)


def _monotone_costs(candidates: list[Candidate]) -> list[Candidate]:
    """Timed costs made non-decreasing in the size of the sketch (pool-adjacent-violators).

    A larger rank (or more random features) never runs faster; single timings
    on a busy machine say otherwise now and then, and one lucky sample would
    otherwise steer the allocation.
    """

    def size(c: Candidate) -> float:
        numbers = [v for v in c.params.values() if isinstance(v, int) and not isinstance(v, bool)]
        return float(math.prod(numbers)) if numbers else 0.0

    smoothed: dict[int, float] = {}
    for name in {family(c.params) for c in candidates}:
        members = sorted(
            (i for i, c in enumerate(candidates) if family(c.params) == name),
            key=lambda i: size(candidates[i]),
        )
        blocks: list[list[float]] = []  # [sum, count] of pooled neighbours
        for i in members:
            blocks.append([candidates[i].cost, 1.0])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                total, count = blocks.pop()
                blocks[-1][0] += total
                blocks[-1][1] += count
        values = [total / count for total, count in blocks for _ in range(int(count))]
        smoothed.update(zip(members, values, strict=True))
    return [Candidate(c.params, c.error, smoothed.get(i, c.cost)) for i, c in enumerate(candidates)]


def _dense_cost(
    group: Group,
    name: str,
    dense: dict[str, nn.Module],
    recorded: Recorded,
    seconds: dict[str, float],
) -> float:
    if name in seconds and math.isfinite(seconds[name]):
        return seconds[name] * max(1, len(recorded.calls.get(name, ())))
    return sum(group.kind.dense_macs(dense[name], c) for c in recorded_calls(recorded, name))


def observed_layers(layout: StudyLayout) -> tuple[list[str], list[str]]:
    """``(covariance, capture)``: layers whose input statistics / first call the baseline keeps.

    Every low-rank layer that may start from the dense weights gets its input
    covariance (closed-form errors on real inputs); every layer with a
    candidate that has no closed form gets its first call recorded.
    """
    covariance = set(layout.layers_to_calibrate())
    capture: set[str] = set()
    for group in layout.groups:
        inits = set(group.space["init"].grid()) if "init" in group.space else {"sketch"}
        low_rank = isinstance(group.kind, LowRankKind) and group.copy_weights
        if low_rank and inits & {"svd", "activation"}:
            covariance.update(group.names)
        quants = set(group.space["quant"].grid()) if "quant" in group.space else set()
        if not low_rank or "sketch" in inits or quants - {"none"}:
            capture.update(group.names)  # int8 errors are measured on the recorded call
    return sorted(covariance), sorted(capture)
