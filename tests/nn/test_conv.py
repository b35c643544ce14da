from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sketchtune.nn import SKConv2d

GEOMETRIES = [
    {"kernel_size": 3, "stride": 1, "padding": 1, "dilation": 1},
    {"kernel_size": (3, 5), "stride": (2, 1), "padding": (0, 2), "dilation": 1},
    {"kernel_size": 3, "stride": 1, "padding": "same", "dilation": 2},
    {"kernel_size": 2, "stride": 2, "padding": "valid", "dilation": 1},
    {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1},
]


def _reference(layer: SKConv2d, x: torch.Tensor) -> torch.Tensor:
    """Each sketch term as its own convolution followed by its own 1x1 mix, summed."""
    k, terms = layer.low_rank, []
    geometry = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
    for i in range(layer.num_terms):
        block = slice(i * k, (i + 1) * k)
        h1 = F.conv2d(x, layer.S1[block], **geometry)
        h2 = F.conv2d(x, layer.U2[block], **geometry)
        terms.append(torch.einsum("or,nrhw->nohw", layer.U1[:, block], h1))
        terms.append(torch.einsum("or,nrhw->nohw", layer.S2[:, block], h2))
    y = sum(terms) / (2 * layer.num_terms)
    if layer.bias is not None:
        y = y + layer.bias.view(1, -1, 1, 1)
    return y


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_equals_reference_convolution_built_from_its_factors(geometry: dict[str, object]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, **geometry)  # type: ignore[arg-type]
    layer = SKConv2d.from_dense(conv, num_terms=2, low_rank=2, seed=0)
    x = torch.randn(3, 5, 11, 10)
    y = layer(x)
    assert y.shape == conv(x).shape
    torch.testing.assert_close(y, _reference(layer, x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        y,
        F.conv2d(x, layer.dense_weight(), conv.bias, conv.stride, conv.padding, conv.dilation),
        rtol=1e-4,
        atol=1e-5,
    )


def test_channels_last_input_keeps_its_format_and_values() -> None:
    layer = SKConv2d(4, 6, 3, 1, 2, padding=1, seed=0)
    x = torch.randn(2, 4, 8, 8)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y, y_cl = layer(x), layer(x_cl)
    assert y.is_contiguous()
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y)
    nobias = SKConv2d(4, 6, 3, 1, 2, padding=1, bias=False, seed=0)
    torch.testing.assert_close(nobias(x_cl), nobias(x))


def test_sketch_of_the_kernel_follows_the_linear_math() -> None:
    conv = nn.Conv2d(3, 4, 2)
    layer = SKConv2d.from_dense(conv, num_terms=1, low_rank=2, seed=0)
    wm = conv.weight.detach().reshape(4, -1)
    u1_lin = layer.U1.t()  # (r, C_out)
    u2_lin = layer.U2.reshape(2, -1).t()  # (d_in, r)
    torch.testing.assert_close(layer.S1.reshape(2, -1).t(), wm.t() @ u1_lin.t())
    torch.testing.assert_close(layer.S2.t(), u2_lin.t() @ wm.t())


def test_sketch_is_unbiased_and_error_shrinks_with_rank() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        ref = conv(x)
        err = {}
        for k in (2, 8):
            err[k] = sum(
                float(
                    (SKConv2d.from_dense(conv, num_terms=1, low_rank=k, seed=s)(x) - ref).norm()
                    / ref.norm()
                )
                for s in range(6)
            )
        mean = torch.stack(
            [SKConv2d.from_dense(conv, num_terms=1, low_rank=2, seed=s)(x) for s in range(400)]
        ).mean(0)
    assert err[8] < err[2]
    assert float((mean - ref).norm() / ref.norm()) < 0.2 * err[2] / 6


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"groups": 2}, ValueError, r"`groups` must be 1 for SKConv2d, got 2"),
        (
            {"padding_mode": "reflect"},
            ValueError,
            r"`padding_mode` must be 'zeros' for SKConv2d, got 'reflect'",
        ),
        (
            {"padding": "full"},
            ValueError,
            r"`padding` must be an int, a pair of ints, 'same' or 'valid', got 'full'",
        ),
        ({"padding": "same", "stride": 2}, ValueError, r"`padding`='same' needs stride 1"),
        ({"kernel_size": (3, 3, 3)}, ValueError, r"`kernel_size` must be an int or a pair of ints"),
        ({"stride": 0}, ValueError, r"`stride` must be a positive int, got 0"),
        ({"padding": -1}, ValueError, r"`padding` must be a non-negative int, got -1"),
        (
            {"low_rank": 40},
            ValueError,
            r"`low_rank` must be between 1 and 8 \(min\(in_channels\*kh\*kw, out_channels\)=8\), got 40",
        ),
        (
            {"W_init": torch.zeros(8, 4, 1, 1)},
            ValueError,
            r"`W_init` must have shape \(8, 4, 3, 3\)",
        ),
    ],
)
def test_bad_arguments_are_named_with_value_and_fix(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    args: dict[str, object] = {
        "in_channels": 4,
        "out_channels": 8,
        "kernel_size": 3,
        "num_terms": 1,
        "low_rank": 2,
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        SKConv2d(**args)  # type: ignore[arg-type]


def test_from_dense_rejects_unsupported_convolutions() -> None:
    with pytest.raises(ValueError, match="`groups` must be 1"):
        SKConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=4), num_terms=1, low_rank=1)
    with pytest.raises(TypeError, match=r"`conv` must be an nn\.Conv2d, got Linear"):
        SKConv2d.from_dense(nn.Linear(3, 3), num_terms=1, low_rank=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_blocked_inference_path_matches_the_whole_batch_path(geometry: dict[str, object]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, **geometry)  # type: ignore[arg-type]
    for bias in (True, False):
        layer = (
            SKConv2d.from_dense(conv, num_terms=1, low_rank=4, seed=0)
            if bias
            else SKConv2d(
                16,
                24,
                conv.kernel_size,
                1,
                4,
                stride=conv.stride,
                padding=conv.padding,  # type: ignore[arg-type]
                dilation=conv.dilation,
                bias=False,
                seed=0,  # type: ignore[arg-type]
            )
        )
        x = torch.randn(40, 16, 30, 30)  # 8 channels x 900 pixels: blocks of 36 images
        with torch.no_grad():
            blocked = layer(x)
        assert blocked.shape == conv(x).shape
        torch.testing.assert_close(
            blocked, layer(x).detach(), rtol=1e-5, atol=1e-5
        )  # grad mode: whole batch
