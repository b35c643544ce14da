"""transformers' ``Conv1D`` (GPT-2, GPT, ...) sketched as :class:`SKConv1D`.

``Conv1D(nf, nx)`` is a Linear with a transposed weight: ``y = x @ W + b``
with ``W`` of shape ``(nx, nf)``. Its sketch is an
:class:`~sketchtune.nn.SKLinear` of ``W^T``, under its own type name so that
plans say ``"SKConv1D"`` and are applied to ``Conv1D`` layers only.

This module imports transformers; the registry imports it only once
transformers has been imported (a model holding a ``Conv1D`` has imported it),
or when a plan names ``"SKConv1D"``. ``import sketchtune`` never imports it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sketchtune.kinds._base import CallShapes
from sketchtune.kinds._quant import Int8DenseKind, Int8Forms
from sketchtune.kinds.linear import fold_linear_sketch
from sketchtune.nn import Int8Linear, Int8SKLinear, SKLinear

__all__ = ["Conv1DKind", "Int8Conv1D", "Int8Conv1DKind", "Int8SKConv1D", "SKConv1D"]


class _Conv1DNames:
    """``nf`` and ``nx`` read like ``Conv1D``'s (output and input features)."""

    in_features: int
    out_features: int

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features


class SKConv1D(_Conv1DNames, SKLinear):
    """The sketch of a transformers ``Conv1D``: an :class:`~sketchtune.nn.SKLinear` of ``W^T``.

    Same tensors, state_dict keys and forward as ``SKLinear``; ``nf`` and
    ``nx`` read like ``Conv1D``'s (output and input features).

    Example:
        >>> import torch
        >>> from transformers.pytorch_utils import Conv1D
        >>> from sketchtune.registry import kind_of
        >>> conv = Conv1D(96, 64)
        >>> sketch = kind_of(conv).build(conv, {"num_terms": 1, "low_rank": 16}, seed=0)
        >>> type(sketch).__name__, sketch(torch.randn(2, 5, 64)).shape
        ('SKConv1D', torch.Size([2, 5, 96]))
    """


class Int8Conv1D(_Conv1DNames, Int8Linear):
    """The int8 form of a transformers ``Conv1D``: an :class:`~sketchtune.nn.Int8Linear` of ``W^T``."""


class Int8SKConv1D(_Conv1DNames, Int8SKLinear):
    """The sketch of a transformers ``Conv1D`` with int8 factors (an :class:`~sketchtune.nn.Int8SKLinear`)."""


class Conv1DKind(Int8Forms):
    """transformers' ``Conv1D`` -> :class:`SKConv1D`, priced and built like a Linear of ``W^T``.

    With the int8 forms of :class:`~sketchtune.kinds.LinearKind`: int8 factors
    (:class:`Int8SKConv1D`) and int8 weights (:class:`Int8Conv1DKind`).
    """

    name = "SKConv1D"
    dense_type = Conv1D
    sketch_type = SKConv1D
    extra_sketch_types = (Int8SKConv1D,)
    int8_form = "Int8Conv1D"
    int8_sketch_type = Int8SKConv1D

    def describe(self, dense: nn.Module) -> str:
        nx, nf = self.io(dense)
        return f"Conv1D({nx}->{nf})"

    def io(self, layer: Any) -> tuple[int, int]:
        return int(layer.nx), int(layer.nf)

    def rows(self, layer: Any, shapes: CallShapes) -> int:
        if not shapes:
            return 1
        return max(1, math.prod(shapes[0]) // max(int(layer.nx), 1))

    def geometry(self, dense: nn.Module) -> dict[str, Any]:
        nx, nf = self.io(dense)
        return {"in_features": nx, "out_features": nf}

    def init_weight(self, dense: nn.Module) -> torch.Tensor:
        """``W^T`` (``nf x nx``), the ``(out, in)`` weight an ``SKLinear`` sketches."""
        weight = dense.weight
        assert isinstance(weight, torch.Tensor)
        return weight.detach().t()

    def fold(self, sketched: nn.Module) -> nn.Module:
        if isinstance(sketched, Int8SKLinear):
            return super().fold(sketched)  # two int8 Linears
        return fold_linear_sketch(sketched)


class Int8Conv1DKind(Int8DenseKind):
    """transformers' ``Conv1D`` -> :class:`Int8Conv1D` (int8 ``W^T``); a form of :class:`Conv1DKind`."""

    name = "Int8Conv1D"
    dense_type = Conv1D
    sketch_type = Int8Conv1D
    form_of = "SKConv1D"
    base = Conv1DKind
