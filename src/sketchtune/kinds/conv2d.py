"""``nn.Conv2d`` sketched as :class:`~sketchtune.nn.SKConv2d`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sketchtune.kinds._base import CallShapes
from sketchtune.kinds._lowrank import LowRankKind
from sketchtune.nn import InputCovariance, SKConv2d

__all__ = ["Conv2dKind"]


class Conv2dKind(LowRankKind):
    """``nn.Conv2d`` -> :class:`~sketchtune.nn.SKConv2d`: a ``2Lk``-channel conv, then a 1x1 mix.

    The kernel is the ``C_in*kh*kw x C_out`` map of a patch; grouped
    (depthwise) convolutions and padding modes other than ``"zeros"`` are not
    sketched (a depthwise kernel is already rank one per channel).
    """

    name = "SKConv2d"
    dense_type = nn.Conv2d
    sketch_type = SKConv2d

    def describe(self, dense: nn.Module) -> str:
        assert isinstance(dense, nn.Conv2d)
        return (
            f"Conv2d({dense.in_channels}->{dense.out_channels}, "
            f"kernel_size={tuple(dense.kernel_size)})"
        )

    def unsupported(self, dense: nn.Module) -> str | None:
        assert isinstance(dense, nn.Conv2d)
        if dense.groups != 1:
            # Per group the kernel maps C_in/groups*kh*kw values to C_out/groups channels
            # (a depthwise 3x3: 9 -> 1); no rank below that saves compute.
            return (
                f"grouped convolutions (groups={dense.groups}) are not sketched: each group "
                f"maps {dense.in_channels // dense.groups * math.prod(dense.kernel_size)} "
                f"inputs to {dense.out_channels // dense.groups} channel(s), too few for a "
                "low-rank sketch to save compute"
            )
        if dense.padding_mode != "zeros":
            return f"padding_mode={dense.padding_mode!r} is not supported (only 'zeros')"
        return None

    def io(self, layer: Any) -> tuple[int, int]:
        kh, kw = layer.kernel_size
        return int(layer.in_channels) * kh * kw, int(layer.out_channels)

    def rows(self, layer: Any, shapes: CallShapes) -> int:
        """Output positions (batch * H_out * W_out) of one call, from its recorded output shape."""
        if len(shapes) < 2:
            return 1
        return math.prod(shapes[1]) // max(int(layer.out_channels), 1)

    def dense_macs(self, dense: Any, shapes: CallShapes) -> float:
        return super().dense_macs(dense, shapes) / int(getattr(dense, "groups", 1))

    def geometry(self, dense: nn.Module) -> dict[str, Any]:
        assert isinstance(dense, nn.Conv2d)
        return {
            "in_channels": dense.in_channels,
            "out_channels": dense.out_channels,
            "kernel_size": dense.kernel_size,
            "stride": dense.stride,
            "padding": dense.padding,
            "dilation": dense.dilation,
            "groups": dense.groups,
            "padding_mode": dense.padding_mode,
        }

    def calibration_hook(
        self, dense: nn.Module, cov: InputCovariance
    ) -> Callable[[nn.Module, tuple[Any, ...]], None] | None:
        assert isinstance(dense, nn.Conv2d)

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                cov.update_conv(
                    args[0],
                    dense.kernel_size,  # type: ignore[arg-type]
                    dense.stride,  # type: ignore[arg-type]
                    dense.padding,  # type: ignore[arg-type]
                    dense.dilation,  # type: ignore[arg-type]
                )

        return hook

    def fold(self, sketched: nn.Module) -> nn.Module:
        """``nn.Sequential(Conv2d(C_in, 2Lk, k, bias=False), Conv2d(2Lk, C_out, 1))``."""
        assert isinstance(sketched, SKConv2d)
        with torch.no_grad():
            kernels = torch.cat([sketched.S1, sketched.U2], dim=0)
            mix = torch.cat([sketched.U1, sketched.S2], dim=1) / (2 * sketched.num_terms)
        rank = kernels.shape[0]
        kw: dict[str, Any] = {"dtype": kernels.dtype, "device": kernels.device}
        spread = nn.Conv2d(
            sketched.in_channels,
            rank,
            sketched.kernel_size,
            stride=sketched.stride,
            padding=sketched.padding,
            dilation=sketched.dilation,
            bias=False,
            **kw,
        )
        combine = nn.Conv2d(rank, sketched.out_channels, 1, bias=sketched.bias is not None, **kw)
        with torch.no_grad():
            spread.weight.copy_(kernels)
            combine.weight.copy_(mix[:, :, None, None])
            if sketched.bias is not None:
                combine.bias.copy_(sketched.bias)  # type: ignore[union-attr]
        return nn.Sequential(spread, combine)
