from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from sketchtune.nn import SKLinear


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def test_forward_matches_the_documented_formula_term_by_term() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(12, 10)
    layer = SKLinear.from_dense(dense, num_terms=3, low_rank=2, seed=1)
    x = torch.randn(5, 12)
    k, L = 2, 3
    terms = []
    for i in range(L):
        s1, u2 = layer.S1[:, i * k : (i + 1) * k], layer.U2[:, i * k : (i + 1) * k]
        u1, s2 = layer.U1[i * k : (i + 1) * k], layer.S2[i * k : (i + 1) * k]
        terms.append(x @ s1 @ u1 + x @ u2 @ s2)
    expected = dense.bias + sum(terms) / (2 * L)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().t() + dense.bias)


def test_sketch_definitions_follow_the_seed_math() -> None:
    dense = nn.Linear(9, 7)
    layer = SKLinear.from_dense(dense, num_terms=2, low_rank=3, seed=0)
    w = dense.weight.detach()
    torch.testing.assert_close(layer.S1, w.t() @ layer.U1.t())
    torch.testing.assert_close(layer.S2, layer.U2.t() @ w.t())
    torch.testing.assert_close(layer.U1.abs(), torch.full_like(layer.U1, 3**-0.5))


def test_from_dense_copies_bias_device_dtype_and_leaves_the_dense_layer_alone() -> None:
    dense = nn.Linear(8, 6).double()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    layer = SKLinear.from_dense(dense, num_terms=1, low_rank=2, seed=3)
    assert layer.S1.dtype == torch.float64 and layer.U1.dtype == torch.float64
    assert layer.bias is not None
    assert torch.equal(layer.bias, dense.bias)
    assert layer.bias.data_ptr() != dense.bias.data_ptr()
    for k, v in dense.state_dict().items():
        assert torch.equal(v, before[k])
    nobias = SKLinear.from_dense(nn.Linear(8, 6, bias=False), num_terms=1, low_rank=2)
    assert nobias.bias is None


def test_error_shrinks_as_low_rank_grows() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(96, 64)
    x = torch.randn(256, 96)
    with torch.no_grad():
        ref = dense(x) - dense.bias
        errors = []
        for k in (4, 16, 64):
            runs = [
                _relative_error(
                    SKLinear.from_dense(dense, num_terms=1, low_rank=k, seed=s)(x) - dense.bias, ref
                )
                for s in range(8)
            ]
            errors.append(sum(runs) / len(runs))
    assert errors[0] > errors[1] > errors[2]


def test_sketch_is_unbiased_mean_over_draws_converges_to_dense() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(32, 24)
    x = torch.randn(64, 32)
    with torch.no_grad():
        ref = dense(x)
        draws = torch.stack(
            [SKLinear.from_dense(dense, num_terms=1, low_rank=4, seed=s)(x) for s in range(1600)]
        )
        single = _relative_error(draws[0], ref)
        mean_100 = _relative_error(draws[:100].mean(0), ref)
        mean_1600 = _relative_error(draws.mean(0), ref)
    # Monte Carlo error falls like 1/sqrt(n): 10x more draws -> about 4x smaller error.
    assert mean_100 < single / 5
    assert mean_1600 < mean_100 / 2.5


def test_any_leading_shape_including_1d() -> None:
    layer = SKLinear(10, 6, 1, 2, seed=0).eval()
    x = torch.randn(2, 3, 4, 10)
    y = layer(x)
    assert y.shape == (2, 3, 4, 6)
    torch.testing.assert_close(layer(x[0, 0, 0]), y[0, 0, 0])
    assert layer(x[0, 0, 0]).shape == (6,)
    non_contiguous = torch.randn(10, 5).t()
    torch.testing.assert_close(layer(non_contiguous), layer(non_contiguous.contiguous()))


def test_without_bias_scaling_is_the_same() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(12, 8, bias=False)
    layer = SKLinear.from_dense(dense, num_terms=2, low_rank=3, seed=0)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().t())


def test_w_init_is_sketched_and_unseeded_layers_follow_the_global_rng() -> None:
    w = torch.randn(6, 8)
    layer = SKLinear(8, 6, 1, 2, W_init=w, seed=0)
    torch.testing.assert_close(layer.S1, w.t() @ layer.U1.t())
    torch.manual_seed(5)
    a = SKLinear(8, 6, 1, 2)
    torch.manual_seed(5)
    b = SKLinear(8, 6, 1, 2)
    assert a.seed == b.seed
    assert torch.equal(a.U1, b.U1) and torch.equal(a.S1, b.S1)


def test_warns_when_the_sketch_is_not_smaller_than_the_dense_layer() -> None:
    with pytest.warns(UserWarning, match=r"not fewer than the dense layer's 64.*below 2\.0"):
        SKLinear(8, 8, num_terms=2, low_rank=4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"in_features": 0}, ValueError, r"`in_features` must be a positive int, got 0"),
        ({"out_features": 2.5}, TypeError, r"`out_features` must be an int, got 2.5"),
        ({"num_terms": 0}, ValueError, r"`num_terms` must be a positive int, got 0"),
        (
            {"low_rank": 128},
            ValueError,
            r"`low_rank` must be between 1 and 16 \(min\(in_features, out_features\)=16\), got 128",
        ),
        ({"low_rank": True}, TypeError, r"`low_rank` must be an int, got True"),
        ({"bias": "yes"}, TypeError, r"`bias` must be True or False, got 'yes'"),
        ({"seed": -1}, ValueError, r"`seed` must be between 0 and"),
        (
            {"W_init": torch.zeros(3, 3)},
            ValueError,
            r"`W_init` must have shape \(16, 32\), got \(3, 3\)",
        ),
        ({"W_init": [[1.0]]}, TypeError, r"`W_init` must be a torch.Tensor, got list"),
        (
            {"W_init": torch.full((16, 32), float("nan"))},
            ValueError,
            r"`W_init` contains NaN or Inf",
        ),
    ],
)
def test_bad_arguments_are_named_with_value_and_fix(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    args: dict[str, object] = {"in_features": 32, "out_features": 16, "num_terms": 1, "low_rank": 2}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        SKLinear(**args)  # type: ignore[arg-type]


def test_from_dense_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match=r"`linear` must be an nn.Linear, got Conv2d; use SKConv2d"):
        SKLinear.from_dense(nn.Conv2d(3, 3, 1), num_terms=1, low_rank=1)  # type: ignore[arg-type]


def test_repr_shows_the_sketch() -> None:
    assert "num_terms=2, low_rank=3" in repr(SKLinear(16, 8, 2, 3, seed=11))
    assert "seed=11" in repr(SKLinear(16, 8, 2, 3, seed=11))


# -- the fused inference path ---------------------------------------------------------


def _layer(bias: bool = True, num_terms: int = 2, low_rank: int = 3) -> SKLinear:
    torch.manual_seed(0)
    dense = nn.Linear(16, 12, bias=bias)
    return SKLinear.from_dense(dense, num_terms=num_terms, low_rank=low_rank, seed=0)


def _blockwise(layer: SKLinear, x: torch.Tensor) -> torch.Tensor:
    """The training path's output (gradients on), detached."""
    with torch.enable_grad():
        return layer(x).detach()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("num_terms", "low_rank"), [(1, 1), (1, 4), (3, 2)])
def test_inference_output_equals_the_training_path(
    bias: bool, num_terms: int, low_rank: int
) -> None:
    layer = _layer(bias, num_terms, low_rank)
    kept = set(vars(layer))
    # 10 rows: the narrow (blockwise) products; 128 rows: the concatenated factors for r > 1
    for x in (torch.randn(2, 5, 16), torch.randn(4, 32, 16)):
        with torch.no_grad():
            no_grad = layer(x)
        with torch.inference_mode():
            inference = layer(x)
        expected = x @ layer.dense_weight().t() + (layer.bias.detach() if bias else 0)
        for y in (no_grad, inference, _blockwise(layer, x)):
            assert y.shape == (*x.shape[:-1], 12) and y.is_contiguous()
            torch.testing.assert_close(y, expected)
    # nothing derived from the factors is kept between calls (so nothing can go stale)
    assert set(vars(layer)) == kept


def test_the_inference_cache_follows_every_change_of_the_factors() -> None:
    layer = _layer()
    x = torch.randn(4, 16)

    def check() -> None:
        with torch.no_grad():
            torch.testing.assert_close(layer(x), _blockwise(layer, x))

    check()
    with torch.no_grad():
        layer.S1.mul_(2.0)  # in place: a new version
    check()
    other = _layer()
    with torch.no_grad():
        other.S2.add_(1.0)
    layer.load_state_dict(other.state_dict())
    check()
    layer.S2 = nn.Parameter(torch.randn_like(layer.S2))  # a new tensor
    check()
    layer.double()
    assert "_fused" not in layer.__dict__  # converting the module frees the old copies
    x = x.double()
    check()
    layer.float()
    x = x.float()
    check()


def test_inference_with_frozen_factors_still_gives_input_gradients() -> None:
    layer = _layer().requires_grad_(False)
    with torch.inference_mode():
        layer(torch.randn(3, 16))  # the cache is built inside inference mode
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()  # the cached factors are normal tensors: saved for backward
    assert x.grad is not None
    torch.testing.assert_close(x.grad, layer.dense_weight().sum(0).expand(3, 16))


def test_training_gradients_reach_only_the_learnable_halves() -> None:
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(3, 16))  # a cache exists; training must not use it
    layer(torch.randn(3, 16)).square().sum().backward()
    assert layer.S1.grad is not None and layer.S2.grad is not None
    assert layer.U1.grad is None and layer.U2.grad is None


def test_a_layer_built_in_inference_mode_runs_outside_it() -> None:
    with torch.inference_mode():
        layer = _layer()
        inside = layer(torch.ones(2, 16))
    with torch.no_grad():
        torch.testing.assert_close(layer(torch.ones(2, 16)), inside)
    assert "_fused" not in layer.__dict__  # inference tensors have no version counter


def test_the_cache_is_not_copied_or_pickled_and_traces_follow_the_parameters() -> None:
    import copy
    import io

    layer = _layer().eval()
    kept = set(vars(layer))
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
        layer(torch.randn(64, 16))  # the concatenating path
    assert set(vars(layer)) == kept  # no derived copy of the factors to copy or pickle
    assert "_fused" not in copy.deepcopy(layer).__dict__
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert "_fused" not in loaded.__dict__
    with torch.no_grad():
        traced = torch.jit.trace(layer, (x,))
        layer.S1.mul_(3.0)
        torch.testing.assert_close(traced(x), layer(x))  # the trace holds no cached constant


def test_a_meta_layer_runs_shapes_only_without_a_cache() -> None:
    layer = SKLinear(16, 12, num_terms=1, low_rank=4, device="meta")
    with torch.no_grad():
        y = layer(torch.empty(3, 16, device="meta"))
    assert y.shape == (3, 12) and y.is_meta
    assert "_fused" not in layer.__dict__


# -- every way of changing the factors reaches the next inference call -----------------


def _write_through_data(layer: SKLinear, other: SKLinear) -> None:
    layer.S1.data.mul_(0.0)  # common in pruning and clipping: no version bump


def _copy_through_data(layer: SKLinear, other: SKLinear) -> None:
    layer.S2.data.copy_(other.S2)  # weight swap, EMA: no version bump


def _assign_data(layer: SKLinear, other: SKLinear) -> None:
    layer.S1.data = other.S1.detach().clone()  # a new storage under the same Parameter


def _ema_every_tensor(layer: SKLinear, other: SKLinear) -> None:
    for mine, theirs in zip(layer.state_dict().values(), other.state_dict().values(), strict=True):
        mine.lerp_(theirs, 0.5)  # timm's ModelEmaV2 writes into state_dict() entries


def _buffer_and_bias_through_data(layer: SKLinear, other: SKLinear) -> None:
    layer.U1.data.mul_(-1.0)
    assert layer.bias is not None
    layer.bias.data.zero_()


def _through_numpy(layer: SKLinear, other: SKLinear) -> None:
    layer.S2.detach().numpy()[:] = 0.0  # a numpy view: torch never hears of it


def _vector_to_parameters(layer: SKLinear, other: SKLinear) -> None:
    vector = torch.nn.utils.parameters_to_vector(other.parameters())
    torch.nn.utils.vector_to_parameters(vector, layer.parameters())  # sets param.data


def _load_assign(layer: SKLinear, other: SKLinear) -> None:
    layer.load_state_dict(other.state_dict(), assign=True)


@pytest.mark.parametrize(
    "change",
    [
        _write_through_data,
        _copy_through_data,
        _assign_data,
        _ema_every_tensor,
        _buffer_and_bias_through_data,
        _through_numpy,
        _vector_to_parameters,
        _load_assign,
    ],
)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("rows", [3, 64])  # the blockwise and the concatenating path
def test_inference_follows_every_change_of_the_factors(change: Any, mode: str, rows: int) -> None:
    layer, other = _layer(), _layer(num_terms=2, low_rank=3)
    with torch.no_grad():
        for t in other.state_dict().values():
            t.add_(torch.randn_like(t))  # other values, same shapes (r = 6)
    x = torch.randn(rows, 16)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        if rows == 64:  # what this case is about: the path that used to cache the factors
            factors = (layer.S1, layer.S2, layer.U1, layer.U2)
            assert layer._fuse(rows, factors)
        before = layer(x).clone()
    with torch.no_grad():
        change(layer, other)
    expected = x @ layer.dense_weight().t() + (layer.bias.detach() if layer.bias is not None else 0)
    with context():
        after = layer(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected)
    torch.testing.assert_close(after, _blockwise(layer, x))
