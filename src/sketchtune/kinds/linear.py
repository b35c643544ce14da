"""``nn.Linear`` sketched as :class:`~sketchtune.nn.SKLinear`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from sketchtune.kinds._base import CallShapes
from sketchtune.kinds._lowrank import sketch_factors
from sketchtune.kinds._quant import Int8DenseKind, Int8Forms
from sketchtune.nn import Int8Linear, Int8SKLinear, SKLinear

__all__ = ["Int8LinearKind", "LinearKind", "fold_linear_sketch"]


class LinearKind(Int8Forms):
    """``nn.Linear`` -> :class:`~sketchtune.nn.SKLinear`, ``2Lk(d_in + d_out)`` multiply-adds per row.

    Also the int8 forms (:mod:`sketchtune.kinds._quant`): ``quant="int8"`` gives the
    sketch int8 factors (:class:`~sketchtune.nn.Int8SKLinear`), and
    ``low_rank="full", quant="int8"`` is the :class:`Int8LinearKind` form.

    ``NonDynamicallyQuantizableLinear`` (the ``out_proj`` of an
    ``nn.MultiheadAttention``, whose forward is never called) is not sketched
    on its own, as in torchao: attention is sketched whole.
    """

    name = "SKLinear"
    dense_type = nn.Linear
    sketch_type = SKLinear
    extra_sketch_types = (Int8SKLinear,)
    int8_form = "Int8Linear"
    int8_sketch_type = Int8SKLinear

    def describe(self, dense: nn.Module) -> str:
        assert isinstance(dense, nn.Linear)
        return f"Linear({dense.in_features}->{dense.out_features})"

    def unsupported(self, dense: nn.Module) -> str | None:
        if isinstance(dense, NonDynamicallyQuantizableLinear):
            return "it is the out_proj of an nn.MultiheadAttention, which is sketched as a whole"
        return None

    def io(self, layer: Any) -> tuple[int, int]:
        return int(layer.in_features), int(layer.out_features)

    def rows(self, layer: Any, shapes: CallShapes) -> int:
        if not shapes:
            return 1
        return max(1, math.prod(shapes[0]) // max(int(layer.in_features), 1))

    def geometry(self, dense: nn.Module) -> dict[str, Any]:
        in_features, out_features = self.io(dense)
        return {"in_features": in_features, "out_features": out_features}

    def fold(self, sketched: nn.Module) -> nn.Module:
        if isinstance(sketched, Int8SKLinear):
            return super().fold(sketched)  # two int8 Linears
        return fold_linear_sketch(sketched)


class Int8LinearKind(Int8DenseKind):
    """``nn.Linear`` -> :class:`~sketchtune.nn.Int8Linear`: int8 weights, int8 activations per call.

    A form of :class:`LinearKind` (plans say ``"Int8Linear"``); folds to torch's own
    ``torch.ao.nn.quantized.dynamic.Linear``.
    """

    name = "Int8Linear"
    dense_type = nn.Linear
    sketch_type = Int8Linear
    form_of = "SKLinear"
    base = LinearKind


def fold_linear_sketch(sketched: nn.Module) -> nn.Sequential:
    """``nn.Sequential(Linear(d_in, 2Lk, bias=False), Linear(2Lk, d_out))`` computing ``sketched``.

    For any layer with :class:`~sketchtune.nn.SKLinear`'s tensors (``S1``,
    ``U2``: ``d_in x r``; ``U1``, ``S2``: ``r x d_out``).
    """
    first, second = sketch_factors(sketched)
    rank = first.shape[1]
    bias = getattr(sketched, "bias", None)
    kw: dict[str, Any] = {"dtype": first.dtype, "device": first.device}
    down = nn.Linear(first.shape[0], rank, bias=False, **kw)
    up = nn.Linear(rank, second.shape[1], bias=bias is not None, **kw)
    with torch.no_grad():
        down.weight.copy_(first.t())
        up.weight.copy_(second.t())
        if bias is not None:
            up.bias.copy_(bias)
    return nn.Sequential(down, up)
