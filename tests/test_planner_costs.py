"""The planner's costs with measured speed: each layer timed alone, every other candidate
shape timed and the rest interpolated within a family (real layers, real timings)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
import torch
from torch import nn

from sketchtune import LayerConfig, OptunaSearch, SKAutoTuner, SketchPlan, TuningConfigs
from sketchtune._planner._costs import candidate_seconds, shape_key
from sketchtune._planner._options import Recorded, candidate_params


def test_measured_speed_prices_each_layer_timed_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)
    )
    model.eval()
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x).argmax(1)

    def agreement(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == reference).float().mean())

    def throughput(m: nn.Module) -> float:
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(3):
                m(x)
        return 3 * len(x) / (time.perf_counter() - start)

    tuner = SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(["0", "2"], "auto")]),
        agreement,
        accuracy_threshold=0.0,
        optimization_eval_func=throughput,
        strategy="global",
        search_algorithm=OptunaSearch(n_trials=2, seed=0),
    )
    tuner.tune()
    # seconds; multiply-adds when the machine is too busy for layer timings to agree
    assert tuner.planner is not None and tuner.planner.unit in {"seconds", "macs"}
    # candidates timed no faster than the dense layer are dropped; costs grow with the rank
    assert any(option.candidates for option in tuner.planner.options)
    for option in tuner.planner.options:
        assert all(c.cost < option.dense_cost for c in option.candidates)
        floats = [c for c in option.candidates if c.params.get("quant", "none") == "none"]
        by_rank = sorted(floats, key=lambda c: c.params["low_rank"])
        assert all(a.cost <= b.cost for a, b in itertools.pairwise(by_rank))


def _time_candidates(
    model: nn.Module, config: LayerConfig, recorded: Recorded
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], float], list[dict[str, Any]]]:
    """``(candidates, seconds, the parameters built for timing)`` of the model's one layer."""
    tuner = SKAutoTuner(
        model,
        TuningConfigs([config]),
        lambda m: 1.0,
        accuracy_threshold=0.0,
        search_algorithm=OptunaSearch(n_trials=1, seed=0),
    )
    (group,) = tuner._layout.groups
    (name,) = group.names
    built: list[dict[str, Any]] = []

    def build(plan: SketchPlan) -> dict[str, nn.Module]:
        built.append(dict(plan[name].params))
        return tuner._builder.build(plan)

    # the float ladder (the int8 forms are families of their own: tests/test_planner_int8.py)
    params = [p for p in candidate_params(group) if p.get("quant", "none") == "none"]
    seconds = candidate_seconds(
        group,
        params,
        tuner._layout.dense,
        recorded,
        build,
        lambda p: tuner._layout.plan_from([group], {group.key: p}),
        {name: 1e-3},
    )
    return params, seconds, built


def test_every_other_candidate_shape_is_timed_and_the_rest_interpolated() -> None:
    torch.manual_seed(0)
    recorded = Recorded(calls={"0": [((64, 256),)]}, covariance={}, samples={})
    params, seconds, built = _time_candidates(
        nn.Sequential(nn.Linear(256, 256)), LayerConfig(["0"], "auto"), recorded
    )
    ranks = sorted({p["num_terms"] * p["low_rank"] for p in params})
    assert len(ranks) >= 5
    # candidates differing only in init share one timing; half the shapes are built
    assert {k for _, k in seconds} == {shape_key(p) for p in params}
    assert len(built) == (len(ranks) + 1) // 2 + (len(ranks) % 2 == 0)
    timed = {p["num_terms"] * p["low_rank"] for p in built}
    assert min(ranks) in timed and max(ranks) in timed
    by_rank = {p["num_terms"] * p["low_rank"]: seconds["0", shape_key(p)] for p in params}
    for i, rank in enumerate(ranks):
        if rank not in timed:  # linear in multiply-adds (here, in the rank) between neighbours
            lo, hi = ranks[i - 1], ranks[i + 1]
            share = (rank - lo) / (hi - lo)
            expected = by_rank[lo] + share * (by_rank[hi] - by_rank[lo])
            assert by_rank[rank] == pytest.approx(expected)
            assert lo in timed and hi in timed


def test_interpolated_timings_stay_within_a_family_of_candidates() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(32, 4, batch_first=True))
    x = torch.randn(2, 64, 32)
    recorded = Recorded(
        calls={}, covariance={}, samples={"attn": ((x, x, x), {"need_weights": False})}
    )
    space = {"num_random_features": [8, 16, 32, 64, 128], "kernel_fn": ["softmax", "relu"]}
    params, seconds, built = _time_candidates(model, LayerConfig(["attn"], space), recorded)
    assert len(seconds) == 10
    # each kernel is timed at 8, 32 and 128 features; 16 and 64 lie between its own timings
    assert sorted((p["kernel_fn"], p["num_random_features"]) for p in built) == [
        (kernel, m) for kernel in ("relu", "softmax") for m in (8, 32, 128)
    ]
    for kernel in ("relu", "softmax"):
        at = {
            p["num_random_features"]: seconds["attn", shape_key(p)]
            for p in params
            if p["kernel_fn"] == kernel
        }
        for lo, mid, hi in ((8, 16, 32), (32, 64, 128)):
            assert min(at[lo], at[hi]) <= at[mid] <= max(at[lo], at[hi])
