"""Sketched drop-in layers (pure PyTorch; this subpackage never imports Optuna or Lightning).

- :class:`SKLinear` replaces ``nn.Linear``.
- :class:`SKConv2d` replaces ``nn.Conv2d`` (``groups=1``, zero padding).
- :class:`RandMultiHeadAttention` replaces ``nn.MultiheadAttention`` with
  random-feature (Performer-style) attention, linear in sequence length.
- :class:`Int8Linear` (int8 weights) and :class:`Int8SKLinear` (a sketch with int8
  factors) are the int8 forms of ``nn.Linear`` (see :mod:`sketchtune.nn.int8`).
"""

from __future__ import annotations

from sketchtune.nn._lowrank import INITS, InputCovariance, LowRankFactors
from sketchtune.nn.attention import RandMultiHeadAttention
from sketchtune.nn.conv import SKConv2d
from sketchtune.nn.int8 import Int8Linear, Int8SKLinear
from sketchtune.nn.linear import SKLinear

__all__ = [
    "INITS",
    "InputCovariance",
    "Int8Linear",
    "Int8SKLinear",
    "LowRankFactors",
    "RandMultiHeadAttention",
    "SKConv2d",
    "SKLinear",
]
