"""What the kinds sketched as a low-rank product (Linear, Conv2d, Conv1D) share.

Each of these layers applies a ``d_in x d_out`` matrix per output row (a
Linear's input row, a convolution's patch); the sketch replaces it by a
rank-``2 * num_terms * low_rank`` product, so validation, the ``"auto"``
ladder, the build (from the dense weights or fresh) and the fold to two plain
layers are the same code for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from sketchtune._validation import warn
from sketchtune.kinds._base import BuildAids, CallShapes, SketchKind, Validator, positive_int
from sketchtune.nn import INITS, InputCovariance
from sketchtune.space import Categorical, ParamSpec

__all__ = ["LowRankKind"]


def _init_kind(_: nn.Module, value: Any) -> str | None:
    return None if value in INITS else f"init must be one of {list(INITS)}"


# total ranks offered by 'auto': powers of two and the midpoints between them
_RANK_LADDER: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_RANK_LADDER += (384, 512, 768, 1024, 1536, 2048)


class LowRankKind(SketchKind):
    """A kind whose sketch is ``y = b + x [S1 | U2] [U1; S2] / (2L)`` per row ``x`` of ``d_in`` features.

    Subclasses say how to read the geometry (:meth:`io`, :meth:`geometry`),
    which weight the sketch's ``W_init`` expects (:meth:`init_weight`), how
    many rows one call multiplies (:meth:`rows`) and how to fold a sketch.
    """

    params: ClassVar[dict[str, Validator]] = {
        "num_terms": positive_int,
        "low_rank": positive_int,
        "init": _init_kind,
    }
    defaults: ClassVar[dict[str, Any]] = {"init": "sketch"}
    accuracy_order: ClassVar[dict[str, tuple[Any, ...]]] = {"init": ("activation", "svd", "sketch")}

    # ------------------------------------------------------------------ geometry (per kind)

    def io(self, layer: Any) -> tuple[int, int]:
        """``(d_in, d_out)`` of the matrix applied per row (of a dense or a sketched layer)."""
        raise NotImplementedError

    def rows(self, layer: Any, shapes: CallShapes) -> int:
        """Rows one call multiplies (a Linear's input rows, a convolution's output positions)."""
        raise NotImplementedError

    def geometry(self, dense: nn.Module) -> dict[str, Any]:
        """Keyword arguments of :attr:`sketch_type` that copy the dense layer's geometry."""
        raise NotImplementedError

    def init_weight(self, dense: nn.Module) -> torch.Tensor:
        """The dense weight in the layout the sketch's ``W_init`` takes."""
        return dense.weight.detach()  # type: ignore[operator]

    # ------------------------------------------------------------------ SketchKind

    def form(self, params: Mapping[str, Any]) -> str:
        return "low-rank"

    def validate(self, param: str, dense: nn.Module, value: Any) -> str | None:
        reason = super().validate(param, dense, value)
        if reason is None and param == "low_rank":
            limit = min(self.io(dense))
            if value > limit:
                return f"low_rank can be at most min(in, out)={limit}"
        return reason

    def auto_space(self, dense: nn.Module) -> dict[str, ParamSpec]:
        d_in, d_out = self.io(dense)
        # 2*L*k*(d_in + d_out) < d_in*d_out is when a sketch saves compute; offer L=1 ranks below that.
        budget = d_in * d_out / (2 * (d_in + d_out))
        ranks = [k for k in _RANK_LADDER if k < budget and k <= min(d_in, d_out)]
        if not ranks:
            raise ValueError(
                f"{self.describe(dense)} is too small for any sketch to save compute "
                f"(num_terms*low_rank would have to be below {budget:.2f}); leave it dense "
                "(exclude it from the selection)."
            )
        # The whole geometric ladder up to break-even: real speedups on a CPU come from
        # ranks far below it (a GEMM at break-even is no faster than the dense one), and
        # the planner prices every rung from one spectrum per layer.
        return {
            "num_terms": Categorical([1]),
            "low_rank": Categorical(ranks),
            "init": Categorical(["activation", "svd"]),
        }

    def check_size(self, dense: nn.Module, params: Mapping[str, Any], *, where: str) -> None:
        d_in, d_out = self.io(dense)
        terms, rank = params.get("num_terms"), params.get("low_rank")
        if not isinstance(terms, int) or not isinstance(rank, int):
            return  # check_params reports wrong types
        # S1, U2: d_in x Lk each; U1, S2: Lk x d_out each; the bias is the same as the dense one's
        limit = (d_in * d_out) // (2 * (d_in + d_out))
        if terms * rank > max(limit, 1):
            raise ValueError(
                f"{where}: num_terms={terms}, low_rank={rank} make a sketch of "
                f"{2 * terms * rank * (d_in + d_out):,} values, more than the {d_in * d_out:,} of "
                f"{self.describe(dense)} it replaces; a plan read from a file or checkpoint may "
                f"not do that. For this layer num_terms * low_rank must be at most {max(limit, 1)}."
            )

    def dense_macs(self, dense: Any, shapes: CallShapes) -> float:
        d_in, d_out = self.io(dense)
        return float(self.rows(dense, shapes) * d_in * d_out)

    def sketch_macs(self, dense: Any, params: dict[str, Any], shapes: CallShapes) -> float:
        d_in, d_out = self.io(dense)
        rank = 2 * params["num_terms"] * params["low_rank"]
        return float(self.rows(dense, shapes) * rank * (d_in + d_out))

    def fan_in(self, dense: nn.Module) -> int:
        return self.io(dense)[0]

    def weight_matrix(self, dense: nn.Module) -> torch.Tensor:
        d_in, _ = self.io(dense)
        weight = self.init_weight(dense)
        return weight.reshape(weight.shape[0], d_in).t()

    def calibration_hook(
        self, dense: nn.Module, cov: InputCovariance
    ) -> Callable[[nn.Module, tuple[Any, ...]], None] | None:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                cov.update(args[0])

        return hook

    def create(
        self,
        dense: nn.Module,
        params: dict[str, Any],
        seed: int,
        copy_weights: bool,
        aids: BuildAids,
    ) -> nn.Module:
        """The sketch, from the dense weights (``copy_weights``) or drawn fresh like the dense init."""
        weight = self.init_weight(dense)
        bias = getattr(dense, "bias", None)
        options = self._init_args(dense, params, aids) if copy_weights else {}
        layer = self.sketch_type(
            **self.geometry(dense),
            num_terms=params["num_terms"],
            low_rank=params["low_rank"],
            W_init=weight if copy_weights else None,
            bias=bias is not None,
            dtype=weight.dtype,
            device=weight.device,
            seed=seed,
            **options,
        )
        if copy_weights and bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)  # type: ignore[operator]
        return layer

    def _init_args(
        self, dense: nn.Module, params: dict[str, Any], aids: BuildAids
    ) -> dict[str, Any]:
        """``init``/``calibration``/``factors`` keyword arguments of the sketch."""
        init = params.get("init", "sketch")
        if init == "sketch":
            return {"init": "sketch"}
        gathered = aids.calibration is not None and not aids.calibration.empty
        if init == "activation" and not gathered and "activation" not in aids.factors:
            if not aids.quiet:
                warn(
                    f"{self.describe(dense)}: init='activation' needs the layer's input statistics, "
                    "which are not available here; building it with init='svd'. Load the tuned "
                    "state_dict afterwards to get the tuned weights exactly "
                    "(apply_plan + load_state_dict).",
                    UserWarning,
                )
            init = "svd"
        return {
            "init": init,
            "calibration": aids.calibration if init == "activation" else None,
            "factors": aids.factors.get(init),
        }

    def fold(self, sketched: nn.Module) -> nn.Module:
        """Two plain layers: ``d_in -> 2Lk`` without bias, then ``2Lk -> d_out`` with the bias."""
        raise NotImplementedError(f"{type(self).__name__} must implement fold()")


def sketch_factors(sketched: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``y = x A B + b``: ``A = [S1 | U2]`` (``d_in x 2Lk``), ``B = [U1; S2] / (2L)``.

    For an :class:`~sketchtune.nn.SKLinear` layout (``S1``: ``d_in x r``,
    ``U1``: ``r x d_out``).
    """
    with torch.no_grad():
        first = torch.cat([sketched.S1, sketched.U2], dim=1)  # type: ignore[list-item]
        second = torch.cat([sketched.U1, sketched.S2], dim=0) / (2 * sketched.num_terms)  # type: ignore[list-item, operator]
    return first, second
