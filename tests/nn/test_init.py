"""Accuracy-preserving initialization: truncated SVD and activation-aware SVD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sketchtune.nn import InputCovariance, LowRankFactors, SKConv2d, SKLinear


def _trained_mlp() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """A small MLP trained on a task with structured (correlated, anisotropic) inputs."""
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(48, 48, generator=g) * torch.logspace(0, -2, 48)  # decaying input spectrum
    x = torch.randn(1536, 48, generator=g) @ mixing
    y = (x @ torch.randn(48, 6, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 6)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x[:1024]), y[:1024]).backward()
        opt.step()
    return model, x[:1024], x[1024:]


def _inputs_of(model: nn.Sequential, index: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model[:index](x)


def _error(layer: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    """Relative error of the layer's linear part (bias removed) on ``x``."""
    bias = dense.bias
    assert bias is not None
    shape = (-1,) + (1,) * (x.dim() - 2) if isinstance(dense, nn.Conv2d) else (-1,)
    with torch.no_grad():
        ref = dense(x) - bias.view(shape)
        out = layer(x) - bias.view(shape)
        return float((out - ref).norm() / ref.norm())


def test_on_a_trained_layer_activation_beats_svd_beats_sketch_on_held_out_inputs() -> None:
    model, train_x, test_x = _trained_mlp()
    dense = model[2]  # Linear(96 -> 64), fed by a ReLU of a trained layer
    calibration = InputCovariance(96)
    calibration.update(_inputs_of(model, 2, train_x))
    held_out = _inputs_of(model, 2, test_x)
    for k in (2, 4, 8):
        errors = {
            init: _error(
                SKLinear.from_dense(
                    dense,
                    num_terms=1,
                    low_rank=k,
                    seed=0,
                    init=init,
                    calibration=calibration if init == "activation" else None,
                ),
                dense,
                held_out,
            )
            for init in ("sketch", "svd", "activation")
        }
        assert errors["activation"] <= errors["svd"] <= errors["sketch"], (k, errors)
        assert errors["svd"] < 0.5 * errors["sketch"], (k, errors)


def test_svd_at_full_rank_reproduces_the_dense_layer() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(16, 12)
    layer = SKLinear.from_dense(
        dense, num_terms=2, low_rank=3, init="svd"
    )  # 2Lk = 12 = min(16, 12)
    x = torch.randn(20, 16)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dense_weight(), dense.weight.detach(), rtol=1e-5, atol=1e-5)
    # 2Lk = 16 > 12 directions held: the last four columns of U2 and rows of S2 are zero
    over = SKLinear.from_dense(dense, num_terms=2, low_rank=4, init="svd")
    torch.testing.assert_close(over(x), dense(x), rtol=1e-5, atol=1e-5)
    assert not over.U2[:, 4:].any() and not over.S2[4:].any() and over.U2[:, :4].any()
    conv = nn.Conv2d(3, 6, 2)
    sk = SKConv2d.from_dense(conv, num_terms=1, low_rank=3, init="svd")  # 2Lk = 6 = C_out
    images = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(sk(images), conv(images), rtol=1e-5, atol=1e-5)


def test_factorizations_are_nested_and_reusable_across_ranks() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(40, 30)
    factors = LowRankFactors.compute(dense.weight.detach().t(), 16)
    x = torch.randn(8, 40)
    for k in (1, 3, 8):
        direct = SKLinear.from_dense(dense, num_terms=1, low_rank=k, init="svd")
        reused = SKLinear.from_dense(dense, num_terms=1, low_rank=k, init="svd", factors=factors)
        torch.testing.assert_close(reused(x), direct(x), rtol=1e-5, atol=1e-5)
    # more terms, same total rank: the same approximation
    two = SKLinear.from_dense(dense, num_terms=2, low_rank=4, init="svd", factors=factors)
    one = SKLinear.from_dense(dense, num_terms=1, low_rank=8, init="svd", factors=factors)
    torch.testing.assert_close(two(x), one(x), rtol=1e-5, atol=1e-5)


def test_conv_activation_init_uses_patch_statistics() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding="same")
    # images whose patches are strongly correlated: smooth (low-pass) inputs
    images = F.avg_pool2d(torch.randn(24, 8, 20, 20), 5, stride=1, padding=2)
    calib, held = images[:16], images[16:]
    errors = {}
    for init in ("sketch", "svd", "activation"):
        layer = SKConv2d.from_dense(
            conv,
            num_terms=1,
            low_rank=3,
            init=init,
            calibration=calib if init == "activation" else None,
            seed=0,
        )
        errors[init] = _error(layer, conv, held)
    assert errors["activation"] <= errors["svd"] <= errors["sketch"], errors
    cov = InputCovariance(8 * 9)
    cov.update_conv(calib, (3, 3), (1, 1), "same", (1, 1))
    from_cov = SKConv2d.from_dense(
        conv, num_terms=1, low_rank=3, init="activation", calibration=cov, seed=0
    )
    from_images = SKConv2d.from_dense(
        conv, num_terms=1, low_rank=3, init="activation", calibration=calib, seed=0
    )
    torch.testing.assert_close(from_cov(held), from_images(held))


def test_input_covariance_matches_the_data_and_merges() -> None:
    x = torch.randn(50, 5, dtype=torch.float64)
    a, b = InputCovariance(5), InputCovariance(5)
    a.update(x[:20])
    b.update(x[20:])
    a.merge(b)
    torch.testing.assert_close(a.matrix(), x.t() @ x / 50)
    conv_cov = InputCovariance(2 * 4)
    images = torch.randn(3, 2, 5, 5)
    conv_cov.update_conv(images, (2, 2), (1, 1), (0, 0), (1, 1), chunk_bytes=1024)  # 2 images
    patches = F.unfold(images, 2).transpose(1, 2).reshape(-1, 8).double()
    torch.testing.assert_close(conv_cov.matrix(), patches.t() @ patches / patches.shape[0])


def test_low_precision_layers_factorize_in_float64() -> None:
    dense = nn.Linear(32, 32).to(torch.bfloat16)
    layer = SKLinear.from_dense(dense, num_terms=1, low_rank=16, init="svd")
    assert layer.S1.dtype == torch.bfloat16 and layer.U1.dtype == torch.bfloat16
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"init": "qr"},
            ValueError,
            r"`init` must be one of 'sketch', 'svd', 'activation'; got 'qr'",
        ),
        ({"init": "activation"}, ValueError, r"init='activation' needs `calibration`"),
        (
            {"init": "sketch", "calibration": torch.randn(4, 16)},
            ValueError,
            r"are used by init='svd'/'activation'",
        ),
        (
            {"init": "activation", "calibration": InputCovariance(3)},
            ValueError,
            r"`calibration` holds 3 features, but the layer takes 16",
        ),
        (
            {"init": "activation", "calibration": "x"},
            TypeError,
            r"`calibration` must be an InputCovariance or a tensor",
        ),
        (
            {
                "init": "svd",
                "factors": LowRankFactors.compute(
                    torch.randn(16, 8), 4, calibration=torch.randn(9, 16)
                ),
            },
            ValueError,
            r"computed for init='activation', not init='svd'",
        ),
        (
            {"init": "activation", "calibration": InputCovariance(16)},
            ValueError,
            r"the calibration covariance is empty",
        ),
    ],
)
def test_bad_init_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SKLinear.from_dense(nn.Linear(16, 8), num_terms=1, low_rank=2, **kwargs)  # type: ignore[arg-type]


def test_non_finite_weights_are_refused() -> None:
    dense = nn.Linear(8, 8)
    with torch.no_grad():
        dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`W_init` contains NaN or Inf values"):
        SKLinear.from_dense(dense, num_terms=1, low_rank=2, init="svd")
    with pytest.raises(ValueError, match=r"`W_init` must have shape"):
        SKLinear(8, 8, 1, 2, W_init=torch.zeros(3, 3), init="svd")
    with pytest.raises(ValueError, match=r"init='svd' factorizes a dense weight: pass W_init"):
        SKLinear(8, 8, 1, 2, init="svd")
