"""Mixed precision and devices on the CPU: autocast, half-precision builds, meta, moves, seeds.

The CUDA counterparts are in ``test_cuda.py`` (skipped without a GPU).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from sketchtune.nn import RandMultiHeadAttention, SKConv2d, SKLinear


@dataclass(frozen=True)
class Built:
    """A dense layer, a way to sketch it, and inputs for both."""

    name: str
    dense: Callable[[], nn.Module]  # seeded, float32, CPU
    sketch: Callable[[nn.Module], nn.Module]  # from_dense with a fixed seed
    inputs: Callable[[torch.dtype], tuple[torch.Tensor, ...]]


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return make()

    return build


def _images(
    batch: int, memory_format: torch.memory_format = torch.contiguous_format
) -> Callable[[torch.dtype], tuple[torch.Tensor, ...]]:
    def make(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 8, 12, 12, generator=gen).to(dtype)
        return (x.contiguous(memory_format=memory_format),)

    return make


def _vectors(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(6, 48, generator=gen).to(dtype),)


def _sequence(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 32, generator=gen).to(dtype)
    return (x, x, x)


def _linear_sketch(dense: nn.Module) -> nn.Module:
    assert isinstance(dense, nn.Linear)
    return SKLinear.from_dense(dense, num_terms=2, low_rank=4, seed=3)


def _conv_sketch(dense: nn.Module) -> nn.Module:
    assert isinstance(dense, nn.Conv2d)
    return SKConv2d.from_dense(dense, num_terms=1, low_rank=6, seed=3)


def _attention_sketch(dense: nn.Module) -> nn.Module:
    assert isinstance(dense, nn.MultiheadAttention)
    return RandMultiHeadAttention.from_dense(dense, num_random_features=16, seed=3)


BUILDS = [
    Built("SKLinear", _seeded(lambda: nn.Linear(48, 40)), _linear_sketch, _vectors),
    Built(
        "SKLinear-nobias", _seeded(lambda: nn.Linear(48, 40, bias=False)), _linear_sketch, _vectors
    ),
    Built("SKConv2d", _seeded(lambda: nn.Conv2d(8, 16, 3, padding=1)), _conv_sketch, _images(2)),
    Built(
        "SKConv2d-channels_last",
        _seeded(lambda: nn.Conv2d(8, 16, 3, stride=2)),
        _conv_sketch,
        _images(2, torch.channels_last),
    ),
    Built(
        "RandMultiHeadAttention",
        _seeded(lambda: nn.MultiheadAttention(32, 4, batch_first=True)),
        _attention_sketch,
        _sequence,
    ),
]


def _output(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    out = layer(*args)
    return out[0] if isinstance(out, tuple) else out


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture(params=BUILDS, ids=lambda b: b.name)
def built(request: pytest.FixtureRequest) -> Built:
    return request.param  # type: ignore[no-any-return]


def test_bf16_autocast_forward_and_backward_match_float32(built: Built) -> None:
    layer = built.sketch(built.dense()).train()
    args = built.inputs(torch.float32)
    x = args[0].clone().requires_grad_(True)
    reference = _output(layer, (x, *args[1:]))
    reference.square().sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    expected_input_grad = x.grad.clone()  # type: ignore[union-attr]
    layer.zero_grad(set_to_none=True)
    x.grad = None

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _output(layer, (x, *args[1:]))
    assert out.dtype == torch.bfloat16  # the products ran in bf16, like the dense layer's
    if args[0].is_contiguous(memory_format=torch.channels_last) and args[0].dim() == 4:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert _relative_error(out, reference.detach()) < 0.03
    out.float().square().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert _relative_error(x.grad, expected_input_grad) < 0.05
    assert set(expected_grads) == {n for n, p in layer.named_parameters()}
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert _relative_error(param.grad, expected_grads[name]) < 0.05, name


def test_bf16_autocast_under_inference_mode(built: Built) -> None:
    # Inference takes other paths (in-place and out= products) than autograd does.
    layer = built.sketch(built.dense()).eval()
    args = built.inputs(torch.float32)
    with torch.inference_mode():
        reference = _output(layer, args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _output(layer, args)
    assert out.dtype == torch.bfloat16
    assert _relative_error(out, reference) < 0.03


def test_bf16_autocast_inference_of_a_large_conv_batch() -> None:
    # Batches whose 2Lk-channel intermediate exceeds ~1 MB run block by block (out= products,
    # which autocast does not cover); the result must match the whole-batch path.
    torch.manual_seed(0)
    layer = SKConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1), num_terms=1, low_rank=6, seed=0)
    x = torch.randn(160, 8, 24, 24)
    with torch.inference_mode():
        reference = layer(x)
        for bias in (True, False):
            if not bias:
                layer.bias = None
                reference = layer(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
            assert out.dtype == torch.bfloat16
            assert _relative_error(out, reference) < 0.03


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("init", ["sketch", "svd"])
def test_built_from_a_half_precision_dense_layer_keeps_its_dtype(
    built: Built, dtype: torch.dtype, init: str
) -> None:
    dense = built.dense()
    if init != "sketch" and isinstance(dense, nn.MultiheadAttention):
        pytest.skip("RandMultiHeadAttention has no init argument")
    half = built.dense().to(dtype)
    rounded = built.dense().to(dtype).float()  # the half weights, exactly, in float32

    def sketch(source: nn.Module) -> nn.Module:
        if init == "sketch":
            return built.sketch(source)
        kind = SKLinear if isinstance(source, nn.Linear) else SKConv2d
        return kind.from_dense(source, num_terms=1, low_rank=6, seed=3, init="svd")  # type: ignore[attr-defined, no-any-return]

    layer, reference = sketch(half), sketch(rounded)
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        assert tensor.dtype == dtype, name
        assert tensor.device.type == "cpu", name
    # The initialization math ran in float32 (float64 for the SVD), not in half precision:
    # the half layer is the float32 one built from the same weights, within one rounding
    # (its U's are the float32 ones rounded, and its sketches are taken against them).
    expected = dict(reference.named_parameters())
    eps = torch.finfo(dtype).eps
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param, expected[name].to(dtype), rtol=eps, atol=eps)
    layer.eval()
    out = _output(layer, built.inputs(dtype))
    assert out.dtype == dtype
    assert _relative_error(out, _output(reference.eval(), built.inputs(torch.float32))) < 0.05


def test_meta_build_has_the_shapes_of_the_cpu_build_and_loads_its_weights(built: Built) -> None:
    cpu = built.sketch(built.dense()).eval()
    meta = built.sketch(built.dense().to("meta")).eval()
    meta_state, cpu_state = meta.state_dict(), cpu.state_dict()
    assert meta_state.keys() == cpu_state.keys()
    for name, tensor in meta_state.items():
        assert tensor.is_meta, name
        assert (tensor.shape, tensor.dtype) == (cpu_state[name].shape, cpu_state[name].dtype), name
    out = _output(meta, tuple(a.to("meta") for a in built.inputs(torch.float32)))
    assert out.is_meta and out.shape == _output(cpu, built.inputs(torch.float32)).shape
    # Deferred initialization: materialize, load the real weights, get the real layer.
    meta.to_empty(device="cpu")
    meta.load_state_dict(cpu_state)
    args = built.inputs(torch.float32)
    torch.testing.assert_close(_output(meta, args), _output(cpu, args), rtol=0, atol=0)


def test_meta_default_device_builds_every_layer_on_meta() -> None:
    with torch.device("meta"):
        layers = [
            SKLinear(4096, 4096, 1, 64, seed=0),
            SKLinear(4096, 4096, 1, 64),  # the seed comes from the CPU's global RNG
            SKConv2d(256, 256, 3, 1, 16, seed=0),
            RandMultiHeadAttention(1024, 8, 256, seed=0),
        ]
    for layer in layers:
        for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            assert tensor.is_meta, name


def test_same_seed_gives_the_same_random_matrices_whatever_the_dtype_or_device() -> None:
    # Draws happen on the CPU in float32 and are cast afterwards, so a layer built in
    # another dtype (or on another device, see test_cuda.py) holds the same values.
    for make in (
        lambda **kw: SKLinear(40, 24, 2, 3, seed=11, **kw),
        lambda **kw: SKConv2d(6, 10, 3, 2, 2, seed=11, **kw),
        lambda **kw: RandMultiHeadAttention(16, 2, 12, seed=11, **kw),
    ):
        base = make()
        wide = make(dtype=torch.float64)
        meta = make(device="meta")
        for name, buffer in base.named_buffers():
            assert torch.equal(dict(wide.named_buffers())[name], buffer.double()), name
            assert dict(meta.named_buffers())[name].shape == buffer.shape, name


def test_to_moves_and_casts_every_tensor(built: Built) -> None:
    layer = built.sketch(built.dense()).eval()
    args = built.inputs(torch.float32)
    reference = _output(layer, args)
    layer.to(torch.float64)
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        assert tensor.dtype == torch.float64, name
    out = _output(layer, built.inputs(torch.float64))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), reference, rtol=1e-4, atol=1e-5)
    layer.to("meta")
    assert all(t.is_meta for t in [*layer.parameters(), *layer.buffers()])


def test_cost_warning_points_at_the_callers_line() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SKLinear(8, 8, num_terms=2, low_rank=4, seed=0)
        SKConv2d(2, 2, 1, 1, 2, seed=0)
    assert len(caught) == 2
    assert all(w.filename == __file__ for w in caught), [w.filename for w in caught]
