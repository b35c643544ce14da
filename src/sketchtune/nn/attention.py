"""RandMultiHeadAttention (being written)."""

from __future__ import annotations

from torch import nn

__all__ = ["RandMultiHeadAttention"]


class RandMultiHeadAttention(nn.Module):
    pass
