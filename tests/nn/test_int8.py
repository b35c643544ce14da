"""Int8Linear and Int8SKLinear: the int8 forms of a Linear and of a sketch's factors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from sketchtune.nn import Int8Linear, Int8SKLinear, SKLinear
from sketchtune.nn.int8 import int8_kernel, quantize_rows, to_torch_dynamic

needs_kernel = pytest.mark.skipif(
    int8_kernel(torch.zeros(1)) != "fbgemm",
    reason="torch's x86/fbgemm quantized engine is not available here",
)


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def _dense(d_in: int = 96, d_out: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).eval()


def test_weights_are_plain_int8_per_row_and_dequantize_close_to_the_dense_weight() -> None:
    dense = _dense()
    layer = Int8Linear.from_dense(dense)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == (64, 96)
    assert layer.scale.dtype == torch.float32 and layer.scale.shape == (64,)
    assert int(layer.qweight.abs().max()) == 127  # each row uses the full symmetric range
    assert set(layer.state_dict()) == {"qweight", "scale", "bias"}
    weight = dense.weight.detach()
    # rounding: at most half a step per entry
    assert float((layer.dequantized_weight() - weight).abs().max()) <= float(layer.scale.max()) / 2
    assert layer.bias is not None and torch.equal(layer.bias.detach(), dense.bias.detach())


@needs_kernel
def test_the_int8_kernel_is_close_to_the_dense_layer_for_every_batch_shape() -> None:
    dense = _dense()
    layer = Int8Linear.from_dense(dense)
    for batch in ((), (5,), (2, 3)):
        x = torch.randn(*batch, 96)
        with torch.no_grad():
            y, ref = layer(x), dense(x)
        assert y.shape == ref.shape
        assert _relative_error(y, ref) < 0.02  # int8 weights and 7-bit activations


def test_other_dtypes_use_the_dequantized_weight() -> None:
    dense = _dense().double()
    layer = Int8Linear.from_dense(dense)
    x = torch.randn(4, 96, dtype=torch.float64)
    assert int8_kernel(x) == "reference"
    y = layer(x)
    assert y.dtype == torch.float64
    expected = x @ layer.dequantized_weight(torch.float64).t() + dense.bias
    torch.testing.assert_close(y, expected)


@needs_kernel
def test_gradients_reach_the_input_and_the_bias_but_not_the_int8_weights() -> None:
    layer = Int8Linear.from_dense(_dense()).train()
    assert {n for n, _ in layer.named_parameters()} == {"bias"}
    x = torch.randn(6, 96, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.bias is not None and layer.bias.grad is not None
    # the backward multiplies by the dequantized weight (straight through the rounding)
    y = x.detach().requires_grad_(True)
    (y @ layer.dequantized_weight().t() + layer.bias.detach()).square().sum().backward()
    assert y.grad is not None
    torch.testing.assert_close(x.grad, y.grad, rtol=0.05, atol=0.05)


@needs_kernel
def test_state_dict_round_trip_and_repacking_after_load() -> None:
    trained = Int8Linear.from_dense(_dense(seed=0))
    fresh = Int8Linear.from_dense(_dense(seed=1))
    x = torch.randn(8, 96)
    fresh(x)  # packs its own weights first: loading must replace them
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(x), trained(x))


@needs_kernel
def test_copies_do_not_share_the_packed_weights() -> None:
    layer = Int8Linear.from_dense(_dense())
    x = torch.randn(4, 96)
    before = layer(x)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), before)
    twin.set_weight(torch.zeros(64, 96))
    assert torch.equal(layer(x), before)  # the original keeps its own weights


def test_quantize_rows_is_symmetric_and_keeps_zero_rows_finite() -> None:
    weight = torch.tensor([[0.0, 0.0], [1.0, -0.5]])
    q, scale = quantize_rows(weight)
    assert q.tolist() == [[0, 0], [127, -64]]
    assert torch.isfinite(scale).all()


def test_argument_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`in_features` must be a positive int, got 0"):
        Int8Linear(0, 4)
    with pytest.raises(TypeError, match=r"`linear` must have a 2-D `weight`.*got Conv2d"):
        Int8Linear.from_dense(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match=r"weight"):
        Int8Linear(4, 3).set_weight(torch.zeros(4, 3))


@needs_kernel
def test_int8_factors_stand_for_the_float_sketch() -> None:
    dense = _dense(128, 96)
    sketch = SKLinear.from_dense(dense, num_terms=2, low_rank=8, init="svd", seed=3).eval()
    layer = Int8SKLinear.from_sketch(sketch)
    assert (layer.num_terms, layer.low_rank, layer.init, layer.seed) == (2, 8, "svd", 3)
    assert layer.down.qweight.shape == (32, 128) and layer.up.qweight.shape == (96, 32)
    assert layer.bias is layer.up.bias and layer.down.bias is None
    assert set(layer.state_dict()) == {
        "down.qweight",
        "down.scale",
        "up.qweight",
        "up.scale",
        "up.bias",
    }
    x = torch.randn(16, 128)
    with torch.no_grad():
        assert _relative_error(layer(x), sketch(x)) < 0.03
    with pytest.raises(ValueError, match=r"low_rank"):
        Int8SKLinear(8, 8, num_terms=1, low_rank=9)


@needs_kernel
def test_torch_dynamic_linear_computes_the_same_as_int8linear() -> None:
    layer = Int8Linear.from_dense(_dense())
    plain = to_torch_dynamic(layer)
    assert type(plain).__module__.startswith("torch.ao.nn.quantized")
    x = torch.randn(7, 96)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_bias_is_fused_at_inference_and_a_changed_bias_is_seen() -> None:
    layer = Int8Linear.from_dense(_dense()).eval()
    assert layer.bias is not None
    x = torch.randn(3, 96)
    with torch.no_grad():
        before = layer(x)
        layer.bias.add_(1.0)  # as an optimizer step would
        torch.testing.assert_close(layer(x), before + 1.0, rtol=1e-5, atol=1e-5)
    y = layer(x)  # with gradients: the bias outside the kernel, the same outputs
    assert y.requires_grad
    torch.testing.assert_close(y.detach(), before + 1.0, rtol=1e-5, atol=1e-5)
