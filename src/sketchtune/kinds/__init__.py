"""Layer kinds: one complete unit per dense layer type that sketchtune can sketch.

A kind (a :class:`SketchKind` subclass) holds everything about its layer
type: parameter validation, the ``"auto"`` search space, the FLOP cost of the
dense layer and of its sketch, the build, the fold to plain torch modules, the
input-statistics hook for ``init="activation"``, which values are the most
accurate, and model-level switches needed while a sketch is in. The kinds
registered with :func:`sketchtune.registry.register_kind` are what every other
part of sketchtune (selection, plans, the tuner, the FLOP model, export) uses.

Built in: :class:`LinearKind`, :class:`Conv2dKind`, :class:`AttentionKind`,
and ``Conv1DKind`` (transformers' ``Conv1D``, registered when transformers is
imported; see :mod:`sketchtune.kinds.conv1d`); and the int8 forms of the Linear
and Conv1D layers, :class:`Int8LinearKind` and ``Int8Conv1DKind`` (see
:mod:`sketchtune.kinds._quant`).
"""

from __future__ import annotations

from sketchtune.kinds._base import BuildAids, CallShapes, Override, SketchKind, positive_int
from sketchtune.kinds._lowrank import LowRankKind
from sketchtune.kinds.attention import AttentionKind
from sketchtune.kinds.conv2d import Conv2dKind
from sketchtune.kinds.linear import Int8LinearKind, LinearKind

__all__ = [
    "AttentionKind",
    "BuildAids",
    "CallShapes",
    "Conv2dKind",
    "Int8LinearKind",
    "LinearKind",
    "LowRankKind",
    "Override",
    "SketchKind",
    "positive_int",
]
