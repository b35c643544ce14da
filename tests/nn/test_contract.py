"""One contract every sketched layer honours (shapes, dtypes, autograd, state_dict, tracing, seeds)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from sketchtune.nn import RandMultiHeadAttention, SKConv2d, SKLinear


@dataclass(frozen=True)
class Case:
    """How to build one sketched layer and feed it."""

    name: str
    make: Callable[[int], nn.Module]  # seed -> layer (float32, CPU)
    inputs: Callable[[tuple[int, ...], torch.dtype], tuple[torch.Tensor, ...]]  # batch dims -> args
    learnable: frozenset[str]
    batch_shapes: tuple[tuple[int, ...], ...]

    def run(self, layer: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = layer(*args)
        return out[0] if isinstance(out, tuple) else out


def _linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return SKLinear.from_dense(nn.Linear(24, 20), num_terms=2, low_rank=3, seed=seed)


def _linear_nobias(seed: int) -> nn.Module:
    return SKLinear(24, 20, num_terms=1, low_rank=4, bias=False, seed=seed)


def _conv(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 12, 3, stride=2, padding=1)
    return SKConv2d.from_dense(conv, num_terms=2, low_rank=2, seed=seed)


def _conv_nobias(seed: int) -> nn.Module:
    return SKConv2d(6, 12, (3, 1), 1, 4, padding="same", dilation=2, bias=False, seed=seed)


def _attention(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    return RandMultiHeadAttention.from_dense(mha, num_random_features=8, seed=seed)


def _vec_inputs(
    features: int,
) -> Callable[[tuple[int, ...], torch.dtype], tuple[torch.Tensor, ...]]:
    return lambda batch, dtype: (torch.randn(*batch, features, dtype=dtype),)


def _image_inputs(batch: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return (torch.randn(*batch, 6, 9, 9, dtype=dtype),)


def _attention_inputs(batch: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x = torch.randn(*batch, 5, 16, dtype=dtype)
    return (x, x, x)


_ATTN_PARAMS = frozenset({"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"})

CASES = [
    Case("SKLinear", _linear, _vec_inputs(24), frozenset({"S1", "S2", "bias"}), ((), (4,), (2, 3))),
    Case("SKLinear-nobias", _linear_nobias, _vec_inputs(24), frozenset({"S1", "S2"}), ((), (4,))),
    Case("SKConv2d", _conv, _image_inputs, frozenset({"S1", "S2", "bias"}), ((), (3,))),
    Case("SKConv2d-nobias", _conv_nobias, _image_inputs, frozenset({"S1", "S2"}), ((2,),)),
    Case("RandMultiHeadAttention", _attention, _attention_inputs, _ATTN_PARAMS, ((), (3,))),
]


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


def test_shapes_for_every_batch_shape(case: Case) -> None:
    layer = case.make(0).eval()
    for batch in case.batch_shapes:
        args = case.inputs(batch, torch.float32)
        out = case.run(layer, args)
        assert out.shape[: len(batch)] == batch
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_follows_module(case: Case, dtype: torch.dtype) -> None:
    layer = case.make(0).to(dtype).eval()
    args = case.inputs(case.batch_shapes[-1], dtype)
    out = case.run(layer, args)
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    reference = case.run(case.make(0).eval(), tuple(a.float() for a in args))
    tolerance = 0.1 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), reference, rtol=tolerance, atol=tolerance)


def test_autograd_reaches_exactly_the_learnable_parameters(case: Case) -> None:
    layer = case.make(0).train()
    assert {n for n, p in layer.named_parameters()} == case.learnable
    args = case.inputs(case.batch_shapes[-1], torch.float32)
    args[0].requires_grad_(True)
    case.run(layer, args).square().sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    for name, buffer in layer.named_buffers():
        assert not buffer.requires_grad, name
    assert args[0].grad is not None


def test_state_dict_round_trip_into_a_fresh_layer(case: Case) -> None:
    trained = case.make(0).eval()
    fresh = case.make(1).eval()  # another seed: different random buffers
    args = case.inputs(case.batch_shapes[-1], torch.float32)
    assert not torch.equal(case.run(trained, args), case.run(fresh, args))
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(case.run(trained, args), case.run(fresh, args))


def test_same_seed_is_bit_identical_other_seed_differs(case: Case) -> None:
    a, b, c = case.make(7), case.make(7), case.make(8)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    buffers_a = dict(a.named_buffers())
    buffers_c = dict(c.named_buffers())
    assert buffers_a
    assert any(not torch.equal(buffers_a[n], buffers_c[n]) for n in buffers_a)


def test_jit_trace_agrees_with_eager(case: Case) -> None:
    layer = case.make(0).eval()
    args = case.inputs(case.batch_shapes[-1], torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values are expected
        traced = torch.jit.trace(layer, args, check_trace=False)
    fresh_args = case.inputs(case.batch_shapes[-1], torch.float32)
    torch.testing.assert_close(case.run(traced, fresh_args), case.run(layer, fresh_args))


def test_torch_compile_agrees_with_eager(case: Case) -> None:
    layer = case.make(0).eval()
    args = case.inputs(case.batch_shapes[-1], torch.float32)
    try:
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=False)
        out = compiled(*args)
    except Exception as exc:  # pragma: no cover - depends on the local toolchain
        pytest.skip(f"torch.compile is unavailable here: {type(exc).__name__}: {exc}")
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, case.run(layer, args))
