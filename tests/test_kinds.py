"""Layer kinds: an outside kind plugs in with one class and one register_kind call.

The toy kind below lives in this file only: a custom dense layer type
(``Affine``), its low-rank replacement (``LowRankAffine``) and a ``SketchKind``
that ties them together. Nothing in sketchtune knows about them, yet the tuner
selects, tunes (real Optuna study, FLOP speed model), applies, prices, prints
and folds them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import optuna
import pytest
import torch
from torch import nn

from sketchtune import (
    LayerConfig,
    OptunaSearch,
    SKAutoTuner,
    SketchPlan,
    TuningConfigs,
    apply_plan,
    estimate_speedup,
    export_plain,
    format_model_tree,
    select_layers,
)
from sketchtune.flops import ShapeRecorder, plan_flops_speedup
from sketchtune.kinds import BuildAids, CallShapes, SketchKind, positive_int
from sketchtune.nn import InputCovariance
from sketchtune.registry import kind_named, kind_of, register_kind, sketch_of
from sketchtune.space import Categorical, Int

from .conftest import MLP, ConvNet, TinyTransformer


class Affine(nn.Module):
    """A custom dense layer type: ``y = x W^T + b``, not an nn.Linear."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        # a weight of rank `rank`, so a LowRankAffine of that rank is exact
        self.weight = nn.Parameter(torch.randn(d_out, rank) @ torch.randn(rank, d_in) / d_in)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


class LowRankAffine(nn.Module):
    """``y = (x A) B + b`` with ``A``: ``d_in x rank``, ``B``: ``rank x d_out``."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.A = nn.Parameter(torch.zeros(d_in, rank))
        self.B = nn.Parameter(torch.zeros(rank, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A) @ self.B + self.bias


def _rank_ok(dense: nn.Module, value: Any) -> str | None:
    reason = positive_int(dense, value)
    if reason is None and value > min(dense.d_in, dense.d_out):  # type: ignore[operator]
        return f"rank can be at most {min(dense.d_in, dense.d_out)}"  # type: ignore[call-overload]
    return reason


class AffineKind(SketchKind):
    name = "LowRankAffine"
    dense_type = Affine
    sketch_type = LowRankAffine
    params: ClassVar[dict[str, Any]] = {"rank": _rank_ok}

    def describe(self, dense: nn.Module) -> str:
        return f"Affine({dense.d_in}->{dense.d_out})"

    def auto_space(self, dense: nn.Module) -> dict[str, Any]:
        return {"rank": Categorical([4, 8, 16])}

    def create(
        self, dense: nn.Module, params: dict[str, Any], seed: int, copy: bool, aids: BuildAids
    ) -> nn.Module:
        assert isinstance(dense, Affine)
        layer = LowRankAffine(dense.d_in, dense.d_out, params["rank"])
        if copy:  # truncated SVD of W^T, singular values split between the factors
            u, s, vh = torch.linalg.svd(dense.weight.detach().t(), full_matrices=False)
            root = s[: layer.rank].sqrt()
            with torch.no_grad():
                layer.A.copy_(u[:, : layer.rank] * root)
                layer.B.copy_(root[:, None] * vh[: layer.rank])
                layer.bias.copy_(dense.bias)
        return layer

    def dense_macs(self, dense: Any, shapes: CallShapes) -> float:
        return float(self._rows(dense, shapes) * dense.d_in * dense.d_out)

    def sketch_macs(self, dense: Any, params: dict[str, Any], shapes: CallShapes) -> float:
        return float(self._rows(dense, shapes) * params["rank"] * (dense.d_in + dense.d_out))

    def _rows(self, dense: Any, shapes: CallShapes) -> int:
        return shapes[0][0] if shapes else 1

    def fold(self, sketched: nn.Module) -> nn.Module:
        assert isinstance(sketched, LowRankAffine)
        down = nn.Linear(sketched.d_in, sketched.rank, bias=False)
        up = nn.Linear(sketched.rank, sketched.d_out)
        with torch.no_grad():
            down.weight.copy_(sketched.A.t())
            up.weight.copy_(sketched.B.t())
            up.bias.copy_(sketched.bias)
        return nn.Sequential(down, up)


register_kind(AffineKind())


class AffineNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a1 = Affine(32, 64, rank=8)
        self.a2 = Affine(64, 64, rank=8)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a2(torch.relu(self.a1(x)))))


X = torch.randn(128, 32, generator=torch.Generator().manual_seed(0))


def test_an_outside_kind_is_tuned_end_to_end_and_reloads() -> None:
    torch.manual_seed(0)
    model = AffineNet().eval()
    with torch.no_grad():
        reference = model(X).argmax(1)

    def agreement(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(X).argmax(1) == reference).float().mean())

    assert select_layers(model, r"a\d") == ["a1", "a2"]
    tuner = SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(r"a\d", "auto")]),
        agreement,
        accuracy_threshold=0.99,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(n_trials=6, seed=0),
    )
    tuner.tune()
    study = tuner.search_algorithm.study
    assert isinstance(study, optuna.Study)
    assert len(study.trials) == 6
    # rank 8 is exact for these rank-8 weights and the cheapest exact one; rank 4 misses the floor
    assert {n: e["params"] for n, e in tuner.best_params.items()} == {
        "a1": {"rank": 8},
        "a2": {"rank": 8},
    }
    assert {layer.type for layer in tuner.best_plan.values()} == {"LowRankAffine"}
    assert isinstance(model.a1, Affine)  # left dense after tune()

    expected = _with_head((32 * 64 + 64 * 64) / (8 * (32 + 64) + 8 * (64 + 64)))
    assert tuner.best_speedup == pytest.approx(expected)
    tuned = tuner.apply_best_params()
    assert isinstance(tuned.a1, LowRankAffine)
    assert estimate_speedup(tuned, X) == pytest.approx(expected)
    assert "a1: LowRankAffine  * rank=8" in format_model_tree(tuned)

    # reload: the plan as JSON + the state_dict, on a fresh dense model
    plan = SketchPlan.from_json(tuner.best_plan.to_json())
    fresh = apply_plan(AffineNet(), plan)
    fresh.load_state_dict(tuned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(X), tuned(X))
        plain = export_plain(fresh)  # the kind's fold
        assert not any(isinstance(m, LowRankAffine) for m in plain.modules())
        torch.testing.assert_close(plain(X), tuned(X), rtol=1e-5, atol=1e-5)


def _with_head(layer_speedup: float) -> float:
    """The model-level FLOP speedup once the dense head (64 x 5 per row) counts too."""
    dense = 32 * 64 + 64 * 64 + 64 * 5
    return dense / (dense - 32 * 64 - 64 * 64 + (32 * 64 + 64 * 64) / layer_speedup)


def test_registering_a_kind_checks_it() -> None:
    with pytest.raises(TypeError, match=r"`kind` must be an instance of a SketchKind subclass"):
        register_kind(AffineKind)  # type: ignore[arg-type]

    class Clash(AffineKind):
        name = "SKLinear"

    with pytest.raises(
        ValueError, match=r"SKLinear \(LinearKind\) already has the name 'SKLinear'"
    ):
        register_kind(Clash())
    register_kind(AffineKind())  # the same kind again replaces itself
    assert kind_named("LowRankAffine").dense_type is Affine


def test_the_most_specific_registered_class_wins() -> None:
    class MyLinear(nn.Linear):
        pass

    assert kind_of(MyLinear(4, 4)) is kind_named("SKLinear")
    assert kind_of(nn.MultiheadAttention(8, 2).out_proj) is None  # declined by the Linear kind
    assert kind_of(ConvNet().depthwise) is None  # declined by the Conv2d kind
    assert sketch_of(LowRankAffine(4, 4, 2)) == (kind_named("LowRankAffine"), {"rank": 2})


def test_each_kind_answers_its_type_specific_questions() -> None:
    linear, conv = kind_named("SKLinear"), kind_named("SKConv2d")
    attention = kind_named("RandMultiHeadAttention")
    ranks = Categorical([4, 16, 8])
    assert linear.most_accurate("low_rank", ranks) == 16
    assert (
        linear.most_accurate("init", Categorical(["sketch", "svd", "activation"])) == "activation"
    )
    assert linear.most_accurate("low_rank", Int(2, 12, step=2)) == 12
    assert attention.most_accurate("kernel_fn", Categorical(["relu", "softmax"])) == "softmax"
    assert attention.calibration_hook(nn.MultiheadAttention(8, 2), InputCovariance(8)) is None

    net = ConvNet()
    assert conv.fan_in(net.conv2) == 16 * 9
    assert conv.weight_matrix(net.conv2).shape == (16 * 9, 32)
    cov = InputCovariance(conv.fan_in(net.conv2))
    hook = conv.calibration_hook(net.conv2, cov)
    assert hook is not None
    handle = net.conv2.register_forward_pre_hook(hook)
    net(torch.randn(2, 3, 8, 8))
    handle.remove()
    assert cov.count == 2 * 8 * 8  # one row per output position


def test_the_transformer_fast_path_switches_come_from_the_kinds_and_are_restored() -> None:
    from sketchtune.plan import Swap

    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)).eval()
    encoder = model[0]
    inner = encoder.layers[0]
    assert encoder.use_nested_tensor and inner.activation_relu_or_gelu == 1
    sketch = kind_named("SKLinear").build(inner.linear1, {"num_terms": 1, "low_rank": 2}, 0)
    x = torch.randn(2, 5, 16)
    with Swap(model, {"0.layers.0.linear1": sketch}), torch.no_grad():
        assert not encoder.use_nested_tensor and inner.activation_relu_or_gelu == 0
        model(x)  # the fused path would read linear1.weight, which a sketch does not have
    assert encoder.use_nested_tensor and inner.activation_relu_or_gelu == 1


def test_the_flop_model_counts_every_call_of_a_layer() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)
            self.head = nn.Linear(64, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.fc(torch.relu(self.fc(x))))

    model = Twice()
    recorder = ShapeRecorder(model, ["fc", "head"])
    with recorder, torch.no_grad():
        model(torch.randn(3, 64))
        model(torch.randn(5, 64))  # a second pass: not counted again
    assert recorder.calls["fc"] == [((3, 64), (3, 64)), ((3, 64), (3, 64))]
    assert recorder.shapes["head"] == ((3, 64), (3, 4))
    plan = SketchPlan(
        {"fc": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 4}, "seed": 0}}
    )
    dense = {"fc": model.fc, "head": model.head}
    expected = (2 * 64 * 64 + 64 * 4) / (2 * 8 * (64 + 64) + 64 * 4)
    assert plan_flops_speedup(dense, recorder, plan) == pytest.approx(expected)
    assert plan_flops_speedup(dense, recorder.calls, plan) == pytest.approx(expected)
    assert estimate_speedup(apply_plan(model, plan), torch.randn(3, 64)) == pytest.approx(expected)


def test_builtin_kinds_price_what_they_did_before() -> None:
    mlp, transformer = MLP(), TinyTransformer()
    linear = kind_named("SKLinear")
    assert linear.dense_macs(mlp.fc2, ((10, 64), (10, 64))) == 10 * 64 * 64
    assert linear.sketch_macs(mlp.fc2, {"num_terms": 2, "low_rank": 4}, ()) == 16 * 128
    attention = kind_named("RandMultiHeadAttention")
    dense = attention.dense_macs(transformer.attn, ((2, 7, 16), (2, 7, 16)))
    assert dense == 2 * (4 * 7 * 16 * 16) + 2 * 2 * 7 * 7 * 16
