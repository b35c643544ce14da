"""The planner over a mixed candidate set: dense, int8, low-rank and low-rank with int8 factors."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
from torch import nn

from sketchtune import LayerConfig, OptunaSearch, SKAutoTuner, SketchPlan, TuningConfigs
from sketchtune._planner._costs import shape_key
from sketchtune._planner._errors import closed_form_errors, measured_error
from sketchtune._planner._options import (
    Candidate,
    GroupOptions,
    Recorded,
    _dominated,
    candidate_params,
    predicted_error,
)
from sketchtune._search._trialinfo import TrialInfo
from sketchtune.nn import InputCovariance, Int8Linear, Int8SKLinear, SKLinear
from sketchtune.nn.int8 import int8_kernel

needs_kernel = pytest.mark.skipif(
    int8_kernel(torch.zeros(1)) != "fbgemm",
    reason="torch's x86/fbgemm quantized engine is not available here",
)

SPACE = {
    "num_terms": [1, 2],
    "low_rank": [8, 32, "full"],
    "init": ["activation", "svd"],
    "quant": ["none", "int8"],
}


def _trained_like(d: int = 512, seed: int = 0) -> nn.Linear:
    """A Linear with a decaying spectrum (as trained layers have), so low rank is meaningful."""
    torch.manual_seed(seed)
    layer = nn.Linear(d, d)
    u, _ = torch.linalg.qr(torch.randn(d, d))
    v, _ = torch.linalg.qr(torch.randn(d, d))
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(torch.logspace(0, -3, d)) @ v.t())
    return layer.eval()


def _tuner(model: nn.Module, space: object) -> SKAutoTuner:
    return SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(["0"], space)]),
        lambda m: 1.0,
        accuracy_threshold=0.0,
        search_algorithm=OptunaSearch(n_trials=1, seed=0),
    )


def test_candidates_are_each_form_once() -> None:
    tuner = _tuner(nn.Sequential(_trained_like()), SPACE)
    (group,) = tuner._layout.groups
    forms = sorted(
        (
            str(p["low_rank"] if p["low_rank"] == "full" else p["num_terms"] * p["low_rank"]),
            str(p.get("init")) if p["low_rank"] != "full" else "-",
            p["quant"],
        )
        for p in candidate_params(group)
    )
    # per total rank (the smallest num_terms kept) and init, float and int8 factors; the int8
    # weight once whatever num_terms and init; the full float weight (the dense layer) never
    expected = sorted(
        [
            (str(r), i, q)
            for r in (8, 16, 32, 64)
            for i in ("activation", "svd")
            for q in ("none", "int8")
        ]
        + [("full", "-", "int8")]
    )
    assert forms == expected


@needs_kernel
def test_int8_errors_are_measured_and_int8_factors_add_their_measured_increment() -> None:
    dense = _trained_like()
    model = nn.Sequential(dense)
    tuner = _tuner(model, SPACE)
    (group,) = tuner._layout.groups
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    cov = InputCovariance(512)
    cov.update(x)
    recorded = Recorded(
        calls={"0": [((256, 512), (256, 512))]}, covariance={"0": cov}, samples={"0": ((x,), {})}
    )
    spectra = {"0": closed_form_errors(dense.weight.detach().t(), cov)}

    def built(params: dict[str, object]) -> dict[str, nn.Module]:
        plan = tuner._layout.plan_from([group], {group.key: params})
        return tuner._builder.build(plan)

    def error(params: dict[str, object]) -> float:
        return predicted_error(group, "0", dict(params), {"0": dense}, recorded, spectra, built)

    int8 = {"num_terms": 1, "low_rank": "full", "init": "svd", "quant": "int8"}
    assert error(int8) == measured_error(dense, Int8Linear.from_dense(dense), ((x,), {}))
    assert 0 < error(int8) < 1e-3  # int8 weights and activations: a small error

    for rank in (8, 32):
        floats = {"num_terms": 1, "low_rank": rank, "init": "svd", "quant": "none"}
        quantized = {**floats, "quant": "int8"}
        closed = spectra["0"]["svd"][2 * rank]
        assert error(floats) == closed
        float_sketch, int8_sketch = built(floats)["0"], built(quantized)["0"]
        assert isinstance(int8_sketch, Int8SKLinear) and type(float_sketch) is SKLinear
        assert int8_sketch.down.out_features == float_sketch.S1.shape[1] * 2 == 2 * rank
        increment = measured_error(dense, int8_sketch, ((x,), {})) - (
            measured_error(dense, float_sketch, ((x,), {}))
        )
        assert error(quantized) == pytest.approx(closed + max(0.0, increment), rel=1e-6)
        assert error(quantized) >= error(floats)


@needs_kernel
def test_a_planned_search_runs_over_the_mixed_candidates() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        _trained_like(seed=0), nn.ReLU(), _trained_like(seed=1), nn.ReLU(), nn.Linear(512, 4)
    )
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x).argmax(1)

    def agreement(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == reference).float().mean())

    def throughput(m: nn.Module) -> float:
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(2):
                m(x)
        return 2 * len(x) / (time.perf_counter() - start)

    tuner = SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(["0", "2"], "auto+int8")]),
        agreement,
        accuracy_threshold=0.9,
        optimization_eval_func=throughput,
        strategy="global",
        search_algorithm=OptunaSearch(n_trials=6, seed=0),
    )
    tuner.tune()
    planner = tuner.planner
    assert planner is not None
    params = [c.params for option in planner.options for c in option.candidates]
    if planner.unit == "macs":  # too busy for layer timings: multiply-adds do not price int8
        assert all(p.get("quant", "none") == "none" for p in params)
    # (with timings, int8 candidates are timed like the others and kept when faster than dense)
    for option in planner.options:  # predicted errors are finite; every kept one is cheaper
        assert all(math.isfinite(c.error) and c.cost < option.dense_cost for c in option.candidates)
    # every trial's plan names the form its parameters select
    frame = tuner.get_results_dataframe()
    assert len(frame) == 6
    (study,) = tuner.search_algorithm.studies.values()
    for trial in study.trials:
        plan = SketchPlan(TrialInfo.of(trial).plan or {})
        for name in ("0", "2"):
            values = {
                k.split(".", 1)[1]: v for k, v in trial.params.items() if k.startswith(f"{name}.")
            }
            layer = plan.get(name)
            if not values.pop("enabled") or (values["low_rank"], values.get("quant")) == (
                "full",
                "none",
            ):
                assert layer is None  # left dense
            elif values["low_rank"] == "full":
                assert (layer.type, layer.params) == ("Int8Linear", {"quant": "int8"})
            else:
                assert layer is not None and layer.type == "SKLinear"
                assert layer.params.get("quant", "none") == values.get("quant", "none")


def test_int8_factors_timed_no_faster_than_their_float_twin_are_never_offered() -> None:
    floats = {"num_terms": 1, "low_rank": 8, "init": "svd", "quant": "none"}
    int8 = {**floats, "quant": "int8"}
    costs = {shape_key(floats): 1.0, shape_key(int8): 1.2}
    assert _dominated(int8, 1.2, costs)  # slower and (never) more accurate: skipped
    assert not _dominated(int8, 0.8, costs)  # faster: a real trade, priced
    assert not _dominated(floats, 1.0, costs)
    assert not _dominated({"num_terms": 1, "low_rank": "full", "quant": "int8"}, 5.0, costs)


def test_the_refinement_ladder_is_each_layers_pareto_front() -> None:
    """With several forms per layer, a dearer candidate can also be less accurate (a float
    sketch beside int8 factors of a higher rank): such a candidate is no rung, so a step
    down the ladder always trades error for speed and a step up buys error back."""
    torch.manual_seed(0)
    tuner = SKAutoTuner(
        nn.Sequential(_trained_like(64)),
        TuningConfigs([LayerConfig(["0"], {"num_terms": 1, "low_rank": [4, 8, 16]})]),
        lambda m: 1.0,
        accuracy_threshold=0.0,
        optimization_eval_func="flops",
        strategy="global",
        search_algorithm=OptunaSearch(n_trials=2, seed=0),
    )
    tuner.tune()
    assert tuner.planner is not None
    a, b, c, d = (
        {"num_terms": 1, "low_rank": r, "quant": q}
        for r, q in ((2, "none"), (16, "int8"), (8, "none"), (32, "int8"))
    )
    options = GroupOptions(
        "0",
        10.0,
        (
            Candidate(a, 0.30, 2.0),
            Candidate(c, 0.10, 5.0),
            Candidate(b, 0.05, 4.0),
            Candidate(d, 0.01, 7.0),
        ),
    )
    planner = dataclasses.replace(tuner.planner, options=[options], _ladders={})
    chosen: int | None = 3  # d, the dearest (this space has no "stay dense" rung)
    down = [chosen]
    while rung := planner._rungs(0, chosen, -1):
        chosen = rung[0]
        down.append(chosen)
    assert [options.candidates[i].params for i in down] == [
        d,
        b,
        a,
    ]  # c (dearer than b, worse) is skipped
    costs = [options.candidates[i].cost for i in down]
    errors = [options.candidates[i].error for i in down]
    assert costs == sorted(costs, reverse=True) and errors == sorted(errors)
    assert planner._rungs(0, down[1], 1) == [down[0]]  # one rung up from b is d, not c
