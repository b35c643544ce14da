"""``nn.MultiheadAttention`` sketched as :class:`~sketchtune.nn.RandMultiHeadAttention`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from sketchtune.kinds._base import BuildAids, CallShapes, SketchKind, Validator, positive_int
from sketchtune.nn import RandMultiHeadAttention
from sketchtune.space import Categorical, ParamSpec

__all__ = ["AttentionKind"]


def _kernel_fn(_: nn.Module, value: Any) -> str | None:
    return None if value in ("softmax", "relu") else "kernel_fn must be 'softmax' or 'relu'"


class AttentionKind(SketchKind):
    """``nn.MultiheadAttention`` -> random-feature attention, linear in the sequence length.

    Swapped whole (its ``out_proj`` is never a candidate on its own); gathers
    no input statistics; has no plain-torch fold (random-feature attention is
    not a product of matrices).
    """

    name = "RandMultiHeadAttention"
    dense_type = nn.MultiheadAttention
    sketch_type = RandMultiHeadAttention
    params: ClassVar[dict[str, Validator]] = {
        "num_random_features": positive_int,
        "kernel_fn": _kernel_fn,
    }
    defaults: ClassVar[dict[str, Any]] = {"kernel_fn": "softmax"}
    accuracy_order: ClassVar[dict[str, tuple[Any, ...]]] = {"kernel_fn": ("softmax", "relu")}

    def describe(self, dense: nn.Module) -> str:
        assert isinstance(dense, nn.MultiheadAttention)
        return f"MultiheadAttention(embed_dim={dense.embed_dim}, num_heads={dense.num_heads})"

    def form(self, params: Mapping[str, Any]) -> str:
        return "random features"

    def check_size(self, dense: nn.Module, params: Mapping[str, Any], *, where: str) -> None:
        assert isinstance(dense, nn.MultiheadAttention)
        m = params.get("num_random_features")
        if not isinstance(m, int):
            return  # check_params reports wrong types
        # the features add m x head_dim values to the projections (4 E^2, as in the dense layer)
        head_dim = dense.embed_dim // dense.num_heads
        limit = 4 * dense.embed_dim * dense.embed_dim // head_dim
        if m > limit:
            raise ValueError(
                f"{where}: num_random_features={m} makes a feature matrix of {m * head_dim:,} "
                f"values, more than the {4 * dense.embed_dim**2:,} of {self.describe(dense)}'s "
                "projections; a plan read from a file or checkpoint may not do that. For this "
                f"layer num_random_features must be at most {limit}."
            )

    def auto_space(self, dense: nn.Module) -> dict[str, ParamSpec]:
        # A geometric ladder: which rungs pay off depends on the sequence length, known
        # only once the model runs; the planner prices each rung at the recorded lengths
        # (m < Lq*Lk/(Lq+Lk) saves multiply-adds) and drops the ones that cannot.
        return {
            "num_random_features": Categorical([4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]),
            "kernel_fn": Categorical(["softmax", "relu"]),
        }

    def create(
        self,
        dense: nn.Module,
        params: dict[str, Any],
        seed: int,
        copy_weights: bool,
        aids: BuildAids,
    ) -> nn.Module:
        assert isinstance(dense, nn.MultiheadAttention)
        kernel_fn = params.get("kernel_fn", "softmax")
        m = params["num_random_features"]
        if copy_weights:
            return RandMultiHeadAttention.from_dense(
                dense, num_random_features=m, kernel_fn=kernel_fn, seed=seed
            )
        reference = dense.out_proj.weight
        return RandMultiHeadAttention(
            dense.embed_dim,
            dense.num_heads,
            m,
            kernel_fn=kernel_fn,
            dropout=dense.dropout,
            bias=dense.in_proj_bias is not None,
            batch_first=dense.batch_first,
            device=reference.device,
            dtype=reference.dtype,
            kdim=dense.kdim,
            vdim=dense.vdim,
            seed=seed,
        )

    def call_shapes(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> CallShapes:
        """The query's and the key's shapes (positional or keyword)."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [kwargs[k] for k in ("query", "key") if isinstance(kwargs.get(k), torch.Tensor)]
        return tuple(tuple(t.shape) for t in tensors)

    def dense_macs(self, dense: Any, shapes: CallShapes) -> float:
        n, lq, lk = _lengths(dense, shapes)
        return float(_projection_macs(dense, n, lq, lk) + n * 2 * lq * lk * int(dense.embed_dim))

    def sketch_macs(self, dense: Any, params: dict[str, Any], shapes: CallShapes) -> float:
        n, lq, lk = _lengths(dense, shapes)
        m = params["num_random_features"]
        # features of q and k, the phi(K)^T V state and phi(Q) times it
        attention = n * m * int(dense.embed_dim) * (2 * lq + 2 * lk)
        return float(_projection_macs(dense, n, lq, lk) + attention)


def _lengths(dense: Any, shapes: CallShapes) -> tuple[int, int, int]:
    """(batch, query length, key length) of one call."""
    if not shapes:
        return 1, 1, 1
    query = shapes[0]
    key = shapes[1] if len(shapes) > 1 else query
    if len(query) == 2:
        return 1, query[0], key[0]
    if dense.batch_first:
        return query[0], query[1], key[1]
    return query[1], query[0], key[0]


def _projection_macs(dense: Any, n: int, lq: int, lk: int) -> int:
    e, kdim, vdim = int(dense.embed_dim), int(dense.kdim), int(dense.vdim)
    return n * (lq * e * e + lk * e * kdim + lk * e * vdim + lq * e * e)
