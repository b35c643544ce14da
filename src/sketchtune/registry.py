"""Which dense layers can be sketched, with which parameters, and at what cost.

One :class:`SketchKind` per supported dense type (``nn.Linear``,
``nn.Conv2d``, ``nn.MultiheadAttention``) knows the sketched type, the
parameters it takes and their valid values for a given dense layer, how to
build the sketched layer from the dense one, an ``"auto"`` search space of
values that actually save compute, and a multiply-add count for the FLOP
speed model. Lookups go through :func:`kind_of` (a dense module) and
:func:`kind_named` (a sketched type name, as stored in plans).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from sketchtune.nn import (
    INITS,
    InputCovariance,
    LowRankFactors,
    RandMultiHeadAttention,
    SKConv2d,
    SKLinear,
)
from sketchtune.space import Categorical, Float, Int, ParamSpec

__all__ = [
    "SketchKind",
    "kind_named",
    "is_sketched",
    "kind_of",
    "sketch_of",
    "supported_types",
    "unsupported_reason",
]

Shape = tuple[int, ...]


@dataclass
class BuildAids:
    """What a caller knows about a dense layer beyond its weights, to build sketches faster or better.

    Attributes:
        calibration: covariance of the layer's inputs, for ``init="activation"``.
        factors: precomputed factorizations by init kind (``"svd"``, ``"activation"``),
            reused across ranks (the top part of a nested factorization).
    """

    calibration: InputCovariance | None = None
    factors: dict[str, LowRankFactors] = field(default_factory=dict)


# A validator returns None when the value is fine for the layer, else the reason it is not.
Validator = Callable[[nn.Module, Any], "str | None"]


@dataclass(frozen=True, eq=False)
class SketchKind:
    """How one dense layer type is sketched.

    Attributes:
        name: the sketched type's name, as written in plans (``"SKLinear"``).
        dense_type: the dense type it replaces.
        sketch_type: the sketched module class.
        params: accepted parameter names -> validator for a given dense layer.
        build: ``(dense, params, seed, copy_weights) -> sketched module``.
        auto_space: ``dense -> {param: spec}`` of values that save compute.
        dense_macs / sketch_macs: multiply-adds of one call, from the recorded input shapes.
    """

    name: str
    dense_type: type[nn.Module]
    sketch_type: type[nn.Module]
    params: Mapping[str, Validator]
    build_fn: Callable[[nn.Module, dict[str, Any], int, bool, BuildAids], nn.Module]
    auto_space_fn: Callable[[nn.Module], dict[str, ParamSpec]]
    dense_macs_fn: Callable[[nn.Module, Sequence[Shape]], float]
    sketch_macs_fn: Callable[[nn.Module, dict[str, Any], Sequence[Shape]], float]
    describe_fn: Callable[[nn.Module], str] = field(default=lambda m: type(m).__name__)

    def describe(self, dense: nn.Module) -> str:
        """A short description of the dense layer, e.g. ``Linear(64->32)``."""
        return self.describe_fn(dense)

    def check_params(self, dense: nn.Module, params: Mapping[str, Any], *, where: str) -> None:
        """Raise ``ValueError`` unless ``params`` holds exactly valid values for ``dense``."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(
                f"{where}: {self.describe(dense)} is sketched as {self.name}, which takes "
                f"{sorted(self.params)}; got unknown parameter(s) {unknown}."
            )
        missing = sorted(set(self.params) - set(params) - _OPTIONAL)
        if missing:
            raise ValueError(f"{where}: {self.name} needs a value for {missing}.")
        for name, value in params.items():
            reason = self.params[name](dense, value)
            if reason is not None:
                raise ValueError(
                    f"{where}: {name}={value!r} is not valid for {self.describe(dense)}: {reason}."
                )

    def check_space(self, dense: nn.Module, space: Mapping[str, ParamSpec], *, where: str) -> None:
        """Raise ``ValueError`` unless every value ``space`` can produce is valid for ``dense``."""
        unknown = sorted(set(space) - set(self.params))
        if unknown:
            raise ValueError(
                f"{where}: {self.describe(dense)} is sketched as {self.name}, which takes "
                f"{sorted(self.params)}; got unknown parameter(s) {unknown}."
            )
        missing = sorted(set(self.params) - set(space) - _OPTIONAL)
        if missing:
            raise ValueError(f"{where}: the space needs a value for {missing} ({self.name}).")
        for name, spec in space.items():
            for value in _extremes(spec):
                reason = self.params[name](dense, value)
                if reason is not None:
                    raise ValueError(
                        f"{where}: {name}={spec!r} allows {value!r}, which is not valid for "
                        f"{self.describe(dense)}: {reason}."
                    )

    def build(
        self,
        dense: nn.Module,
        params: dict[str, Any],
        seed: int,
        copy_weights: bool = True,
        aids: BuildAids | None = None,
    ) -> nn.Module:
        """The sketched replacement of ``dense`` (same device, dtype and train/eval mode).

        Built outside inference mode even when called inside it (e.g. during a
        Trainer's validation), so its parameters stay trainable.
        """
        with torch.inference_mode(False):
            module = self.build_fn(dense, params, seed, copy_weights, aids or BuildAids())
        module.train(dense.training)
        return module

    def auto_space(self, dense: nn.Module) -> dict[str, ParamSpec]:
        return self.auto_space_fn(dense)

    def dense_macs(self, dense: nn.Module, shapes: Sequence[Shape]) -> float:
        return self.dense_macs_fn(dense, shapes)

    def sketch_macs(
        self, dense: nn.Module, params: dict[str, Any], shapes: Sequence[Shape]
    ) -> float:
        return self.sketch_macs_fn(dense, params, shapes)


# Parameters with a default in the sketched layer's from_dense.
_OPTIONAL = frozenset({"kernel_fn", "init"})


def _extremes(spec: ParamSpec) -> list[Any]:
    """The values worth validating: every choice, or the ends of a range (validators are monotone)."""
    if isinstance(spec, Categorical):
        return list(spec.choices)
    if isinstance(spec, Int):
        return [spec.low, spec.grid()[-1]]
    if isinstance(spec, Float):
        return [spec.low, spec.high]
    return spec.grid()


def _positive_int(_: nn.Module, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"it must be an int, got {type(value).__name__}"
    return None if value >= 1 else "it must be >= 1"


def _rank_limit(dense: nn.Module) -> int:
    if isinstance(dense, nn.Conv2d):
        kh, kw = dense.kernel_size
        return min(dense.in_channels * kh * kw, dense.out_channels)
    assert isinstance(dense, nn.Linear)
    return min(dense.in_features, dense.out_features)


def _low_rank(dense: nn.Module, value: Any) -> str | None:
    reason = _positive_int(dense, value)
    if reason is not None:
        return reason
    limit = _rank_limit(dense)
    return None if value <= limit else f"low_rank can be at most min(in, out)={limit}"


def _init_kind(_: nn.Module, value: Any) -> str | None:
    return None if value in INITS else f"init must be one of {list(INITS)}"


def _kernel_fn(_: nn.Module, value: Any) -> str | None:
    return None if value in ("softmax", "relu") else "kernel_fn must be 'softmax' or 'relu'"


def _io(layer: Any) -> tuple[int, int]:
    """(d_in, d_out) of the linear map a (sketched) Linear or Conv2d applies per output position."""
    if hasattr(layer, "in_channels"):
        kh, kw = layer.kernel_size
        return int(layer.in_channels) * kh * kw, int(layer.out_channels)
    return int(layer.in_features), int(layer.out_features)


_RANK_LADDER = (
    1,
    2,
    3,
    4,
    6,
    8,
    12,
    16,
    24,
    32,
    48,
    64,
    96,
    128,
    192,
    256,
    384,
    512,
    768,
    1024,
    1536,
    2048,
)


def _rank_auto_space(dense: nn.Module) -> dict[str, ParamSpec]:
    d_in, d_out = _io(dense)
    # 2*L*k*(d_in + d_out) < d_in*d_out is when a sketch saves compute; offer L=1 ranks below that.
    budget = d_in * d_out / (2 * (d_in + d_out))
    ranks = [k for k in _RANK_LADDER if k < budget and k <= min(d_in, d_out)]
    if not ranks:
        raise ValueError(
            f"{_describe(dense)} is too small for any sketch to save compute "
            f"(num_terms*low_rank would have to be below {budget:.2f}); leave it dense "
            "(exclude it from the selection)."
        )
    return {
        "num_terms": Categorical([1]),
        "low_rank": Categorical(ranks[-8:]),
        "init": Categorical(["activation", "svd"]),
    }


# The cost functions below read only attributes that the dense layers and their sketched
# counterparts share (in_features, in_channels, kernel_size, embed_dim, ...), so they price both.


def _rows(shape: Shape, features: int) -> int:
    return max(1, math.prod(shape) // max(features, 1))


def _linear_dense_macs(dense: Any, shapes: Sequence[Shape]) -> float:
    rows = _rows(shapes[0], dense.in_features) if shapes else 1
    return float(rows * dense.in_features * dense.out_features)


def _linear_sketch_macs(dense: Any, params: dict[str, Any], shapes: Sequence[Shape]) -> float:
    rows = _rows(shapes[0], dense.in_features) if shapes else 1
    rank = 2 * params["num_terms"] * params["low_rank"]
    return float(rows * rank * (dense.in_features + dense.out_features))


def _conv_positions(dense: Any, shapes: Sequence[Shape]) -> int:
    """Output positions (batch * H_out * W_out) of one call, from its recorded output shape."""
    if len(shapes) < 2:
        return 1
    out = shapes[1]
    return math.prod(out) // max(int(dense.out_channels), 1)


def _conv_dense_macs(dense: Any, shapes: Sequence[Shape]) -> float:
    d_in, d_out = _io(dense)
    return float(_conv_positions(dense, shapes) * d_in * d_out // int(getattr(dense, "groups", 1)))


def _conv_sketch_macs(dense: Any, params: dict[str, Any], shapes: Sequence[Shape]) -> float:
    d_in, d_out = _io(dense)
    rank = 2 * params["num_terms"] * params["low_rank"]
    return float(_conv_positions(dense, shapes) * rank * (d_in + d_out))


def _mha_lengths(dense: Any, shapes: Sequence[Shape]) -> tuple[int, int, int]:
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


def _mha_projection_macs(dense: Any, n: int, lq: int, lk: int) -> int:
    e, kdim, vdim = int(dense.embed_dim), int(dense.kdim), int(dense.vdim)
    return n * (lq * e * e + lk * e * kdim + lk * e * vdim + lq * e * e)


def _mha_dense_macs(dense: Any, shapes: Sequence[Shape]) -> float:
    n, lq, lk = _mha_lengths(dense, shapes)
    return float(_mha_projection_macs(dense, n, lq, lk) + n * 2 * lq * lk * int(dense.embed_dim))


def _mha_sketch_macs(dense: Any, params: dict[str, Any], shapes: Sequence[Shape]) -> float:
    n, lq, lk = _mha_lengths(dense, shapes)
    m = params["num_random_features"]
    # features of q and k, the phi(K)^T V state and phi(Q) times it
    attention = n * m * int(dense.embed_dim) * (2 * lq + 2 * lk)
    return float(_mha_projection_macs(dense, n, lq, lk) + attention)


def _mha_auto_space(dense: nn.Module) -> dict[str, ParamSpec]:
    assert isinstance(dense, nn.MultiheadAttention)
    return {
        "num_random_features": Categorical([16, 32, 64, 128, 256]),
        "kernel_fn": Categorical(["softmax", "relu"]),
    }


def _describe(dense: nn.Module) -> str:
    if isinstance(dense, nn.Conv2d):
        return (
            f"Conv2d({dense.in_channels}->{dense.out_channels}, "
            f"kernel_size={tuple(dense.kernel_size)})"
        )
    if isinstance(dense, nn.Linear):
        return f"Linear({dense.in_features}->{dense.out_features})"
    if isinstance(dense, nn.MultiheadAttention):
        return f"MultiheadAttention(embed_dim={dense.embed_dim}, num_heads={dense.num_heads})"
    return type(dense).__name__


def _init_args(
    params: dict[str, Any], copy: bool, aids: BuildAids, describe: str
) -> dict[str, Any]:
    """``init``/``calibration``/``factors`` keyword arguments for ``from_dense``."""
    init = params.get("init", "sketch")
    if init == "sketch" or not copy:
        return {"init": "sketch"}
    if init == "activation" and aids.calibration is None and "activation" not in aids.factors:
        warnings.warn(
            f"{describe}: init='activation' needs the layer's input statistics, which are not "
            "available here; building it with init='svd'. Load the tuned state_dict afterwards "
            "to get the tuned weights exactly (apply_plan + load_state_dict).",
            UserWarning,
            stacklevel=5,
        )
        init = "svd"
    return {
        "init": init,
        "calibration": aids.calibration if init == "activation" else None,
        "factors": aids.factors.get(init),
    }


def _build_linear(
    dense: nn.Module, params: dict[str, Any], seed: int, copy: bool, aids: BuildAids
) -> nn.Module:
    assert isinstance(dense, nn.Linear)
    if copy:
        return SKLinear.from_dense(
            dense,
            num_terms=params["num_terms"],
            low_rank=params["low_rank"],
            seed=seed,
            **_init_args(params, copy, aids, _describe(dense)),
        )
    weight = dense.weight
    return SKLinear(
        dense.in_features,
        dense.out_features,
        params["num_terms"],
        params["low_rank"],
        bias=dense.bias is not None,
        dtype=weight.dtype,
        device=weight.device,
        seed=seed,
    )


def _build_conv(
    dense: nn.Module, params: dict[str, Any], seed: int, copy: bool, aids: BuildAids
) -> nn.Module:
    assert isinstance(dense, nn.Conv2d)
    if copy:
        return SKConv2d.from_dense(
            dense,
            num_terms=params["num_terms"],
            low_rank=params["low_rank"],
            seed=seed,
            **_init_args(params, copy, aids, _describe(dense)),
        )
    weight = dense.weight
    return SKConv2d(
        dense.in_channels,
        dense.out_channels,
        dense.kernel_size,  # type: ignore[arg-type]
        params["num_terms"],
        params["low_rank"],
        stride=dense.stride,  # type: ignore[arg-type]
        padding=dense.padding,  # type: ignore[arg-type]
        dilation=dense.dilation,  # type: ignore[arg-type]
        bias=dense.bias is not None,
        dtype=weight.dtype,
        device=weight.device,
        groups=dense.groups,
        padding_mode=dense.padding_mode,
        seed=seed,
    )


def _build_mha(
    dense: nn.Module, params: dict[str, Any], seed: int, copy: bool, aids: BuildAids
) -> nn.Module:
    assert isinstance(dense, nn.MultiheadAttention)
    kernel_fn = params.get("kernel_fn", "softmax")
    m = params["num_random_features"]
    if copy:
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


LINEAR = SketchKind(
    name="SKLinear",
    dense_type=nn.Linear,
    sketch_type=SKLinear,
    params={"num_terms": _positive_int, "low_rank": _low_rank, "init": _init_kind},
    build_fn=_build_linear,
    auto_space_fn=_rank_auto_space,
    dense_macs_fn=_linear_dense_macs,
    sketch_macs_fn=_linear_sketch_macs,
    describe_fn=_describe,
)
CONV2D = SketchKind(
    name="SKConv2d",
    dense_type=nn.Conv2d,
    sketch_type=SKConv2d,
    params={"num_terms": _positive_int, "low_rank": _low_rank, "init": _init_kind},
    build_fn=_build_conv,
    auto_space_fn=_rank_auto_space,
    dense_macs_fn=_conv_dense_macs,
    sketch_macs_fn=_conv_sketch_macs,
    describe_fn=_describe,
)
MHA = SketchKind(
    name="RandMultiHeadAttention",
    dense_type=nn.MultiheadAttention,
    sketch_type=RandMultiHeadAttention,
    params={"num_random_features": _positive_int, "kernel_fn": _kernel_fn},
    build_fn=_build_mha,
    auto_space_fn=_mha_auto_space,
    dense_macs_fn=_mha_dense_macs,
    sketch_macs_fn=_mha_sketch_macs,
    describe_fn=_describe,
)

_KINDS: tuple[SketchKind, ...] = (MHA, CONV2D, LINEAR)


def kind_of(module: nn.Module) -> SketchKind | None:
    """The kind that sketches ``module``, or ``None`` when it is not sketchable.

    ``NonDynamicallyQuantizableLinear`` (``nn.MultiheadAttention.out_proj``,
    whose forward is never called) is not a Linear here, as in torchao.
    """
    if isinstance(module, NonDynamicallyQuantizableLinear):
        return None
    for kind in _KINDS:
        if isinstance(module, kind.dense_type):
            if isinstance(module, nn.Conv2d) and (
                module.groups != 1 or module.padding_mode != "zeros"
            ):
                return None
            return kind
    return None


def kind_named(name: str) -> SketchKind:
    """The kind whose sketched type is called ``name`` (as stored in plans)."""
    for kind in _KINDS:
        if kind.name == name:
            return kind
    raise ValueError(
        f"unknown sketched layer type {name!r}; known types: {[k.name for k in _KINDS]}."
    )


def sketch_of(module: nn.Module) -> tuple[SketchKind, dict[str, Any]] | None:
    """``(kind, params)`` of a sketched layer, or ``None`` for any other module."""
    for kind in _KINDS:
        if isinstance(module, kind.sketch_type):
            return kind, {name: getattr(module, name) for name in kind.params}
    return None


def is_sketched(module: nn.Module) -> bool:
    """Whether ``module`` is one of the sketched layer types."""
    return any(isinstance(module, kind.sketch_type) for kind in _KINDS)


def supported_types() -> list[str]:
    """Names of the dense types that can be sketched."""
    return [kind.dense_type.__name__ for kind in reversed(_KINDS)]


def unsupported_reason(module: nn.Module) -> str:
    """Why ``module`` cannot be sketched (for error messages)."""
    if isinstance(module, NonDynamicallyQuantizableLinear):
        return "it is the out_proj of an nn.MultiheadAttention, which is sketched as a whole"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped convolutions (groups={module.groups}) are not sketched"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
    return f"sketchtune sketches only {', '.join(supported_types())}"
