"""What SKLinear and SKConv2d share: seeded random matrices, size checks, starting factors.

Random draws always happen on the CPU in float32 from a ``torch.Generator``
seeded per layer, and are then moved to the requested device and dtype. Two
processes (or two DDP ranks) that build a layer with the same seed therefore get
bit-identical buffers, whatever device they run on; on ``meta`` nothing is drawn.
:func:`initial_factors` computes a layer's four matrices (the seed's random-sign
sketch, or a placed factorization, see :mod:`sketchtune.nn._lowrank`), in the
orientation the layer stores them; :func:`initial_bias` and :func:`copy_bias` do
the bias.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from sketchtune._validation import check_int, check_seed, warn
from sketchtune.nn import _lowrank
from sketchtune.nn._lowrank import InputCovariance, LowRankFactors

_SEED_BOUND = 2**31 - 1


def resolve_seed(seed: int | None) -> int:
    """Return ``seed``, or draw one from torch's global RNG when it is ``None``.

    Drawing from the global RNG means ``torch.manual_seed`` makes unseeded
    layers reproducible too, as it does for ``nn.Linear``'s initialization.
    """
    checked = check_seed("seed", seed)
    if checked is not None:
        return checked
    return int(torch.randint(0, _SEED_BOUND, (), dtype=torch.int64, device="cpu").item())


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device``, or the default device (honours ``torch.set_default_device``) when ``None``."""
    if device is not None:
        return torch.device(device)
    return torch.empty(0).device


def sign_matrix(
    rows: int,
    cols: int,
    scale_dim: int,
    gen: torch.Generator,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """Random ±1/sqrt(scale_dim) matrix of shape ``(rows, cols)``.

    With ``scale_dim = k`` rows per block, ``E[U^T U] = I`` for each block, which
    is what makes the sketch an unbiased estimate of the dense layer. On the
    ``meta`` device only the shape exists: nothing is drawn or allocated.
    """
    dtype = dtype or torch.get_default_dtype()
    if torch.device(device or "cpu").type == "meta":
        return torch.empty((rows, cols), dtype=dtype, device="meta")
    signs = torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8, device="cpu")
    out = signs.to(torch.float32).mul_(2.0).sub_(1.0).mul_(1.0 / math.sqrt(scale_dim))
    return out.to(device=device, dtype=dtype)


def gaussian_matrix(
    rows: int,
    cols: int,
    gen: torch.Generator,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """Standard normal matrix of shape ``(rows, cols)``, drawn on the CPU then moved."""
    out = torch.randn((rows, cols), generator=gen, dtype=torch.float32, device="cpu")
    return out.to(device=device, dtype=dtype or torch.get_default_dtype())


def uniform(
    shape: tuple[int, ...],
    bound: float,
    gen: torch.Generator,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A new U(-bound, bound) tensor drawn on the CPU from ``gen`` (nothing drawn on ``meta``)."""
    dtype = dtype or torch.get_default_dtype()
    if torch.device(device or "cpu").type == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    values = torch.empty(shape, dtype=torch.float32, device="cpu").uniform_(
        -bound, bound, generator=gen
    )
    return values.to(device=device, dtype=dtype)


@torch.no_grad()
def uniform_(tensor: torch.Tensor, bound: float, gen: torch.Generator) -> torch.Tensor:
    """Fill ``tensor`` in place with U(-bound, bound) drawn on the CPU from ``gen``."""
    if tensor.is_meta:
        return tensor
    return tensor.copy_(uniform(tuple(tensor.shape), bound, gen, dtype=torch.float32))


def check_sketch_sizes(
    layer: str,
    d_in: int,
    d_out: int,
    num_terms: object,
    low_rank: object,
    *,
    d_in_text: str,
    d_out_text: str,
) -> tuple[int, int]:
    """Validate ``num_terms`` / ``low_rank`` for a layer mapping ``d_in -> d_out`` values.

    Warns (``UserWarning``) when the sketch computes and stores at least as many
    values as the dense layer, because then it is slower and larger, not faster.

    Returns:
        ``(num_terms, low_rank)`` as ints.
    """
    num_terms = check_int("num_terms", num_terms, minimum=1)
    limit = min(d_in, d_out)
    low_rank = check_int(
        "low_rank",
        low_rank,
        minimum=1,
        maximum=limit,
        hint=f" (min({d_in_text}, {d_out_text})={limit})",
    )
    sketch_cost = 2 * num_terms * low_rank * (d_in + d_out)
    dense_cost = d_in * d_out
    if sketch_cost >= dense_cost:
        budget = dense_cost / (2 * (d_in + d_out))
        warn(
            f"{layer} with num_terms={num_terms}, low_rank={low_rank} costs "
            f"2*num_terms*low_rank*({d_in_text}+{d_out_text})={sketch_cost} multiply-adds and "
            f"stored values per output position, not fewer than the dense layer's "
            f"{dense_cost}: it will be slower and larger than the layer it replaces. "
            f"Keep num_terms*low_rank below {budget:.1f} to save compute.",
            UserWarning,
        )
    return num_terms, low_rank


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Initialization math runs in at least float32, even for half-precision layers."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_weight(name: str, weight: object, shape: tuple[int, ...]) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(weight).__name__}.")
    if tuple(weight.shape) != shape:
        raise ValueError(f"`{name}` must have shape {shape}, got {tuple(weight.shape)}.")
    if weight.is_meta:  # deferred initialization: there are no values to check
        return
    # The sum is finite for finite weights (barring overflow, checked exactly below) and
    # costs a fraction of an element-wise isfinite pass; trials build layers often.
    if not bool(torch.isfinite(weight.sum())) and not bool(torch.isfinite(weight).all()):
        raise ValueError(
            f"`{name}` contains NaN or Inf values; sketch a layer with finite weights "
            "(check the checkpoint it was loaded from)."
        )


class SketchFactors(NamedTuple):
    """The four matrices of a sketched layer, 2-D, in the orientation the layer stores them.

    Untransposed (SKLinear): ``S1``, ``U2`` are ``(d_in, r)`` and ``U1``, ``S2`` are
    ``(r, d_out)``; transposed (SKConv2d, whose first stage is a convolution with
    ``r`` kernels): ``S1``, ``U2`` are ``(r, d_in)`` and ``U1``, ``S2`` are ``(d_out, r)``.
    """

    S1: torch.Tensor
    S2: torch.Tensor
    U1: torch.Tensor
    U2: torch.Tensor


def initial_factors(
    d_in: int,
    d_out: int,
    num_terms: int,
    low_rank: int,
    weight: torch.Tensor | None,
    gen: torch.Generator,
    *,
    transposed: bool,
    init: str,
    calibration: InputCovariance | torch.Tensor | None,
    factors: LowRankFactors | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> SketchFactors:
    """Validate the init arguments and compute a layer's starting factors.

    ``init="sketch"`` draws the fixed sign matrices ``U1`` then ``U2`` (each in its
    stored shape) from ``gen`` and sketches ``weight`` (``(d_out, d_in)``; when
    ``None``, one is drawn from ``gen`` like ``nn.Linear``'s default). ``"svd"`` and
    ``"activation"`` place the top-``2Lk`` part of a factorization of ``weight``
    instead. The sketch math runs in at least float32 on the target device; the
    results come back contiguous, in ``dtype`` on ``device``.
    """
    dtype = dtype or torch.get_default_dtype()
    target = resolve_device(device)
    rank = num_terms * low_rank
    placed = _lowrank.factors_to_place(
        init,
        None if weight is None else weight.t(),
        2 * rank,
        calibration=calibration,
        factors=factors,
    )
    if placed is not None:
        s1, u2, u1, s2 = _lowrank.split_factors(
            placed, num_terms, low_rank, dtype=dtype, device=target
        )
        if transposed:
            s1, u2, u1, s2 = (m.t().contiguous() for m in (s1, u2, u1, s2))
        return SketchFactors(s1, s2, u1, u2)

    u1_shape = (d_out, rank) if transposed else (rank, d_out)
    u2_shape = (rank, d_in) if transposed else (d_in, rank)
    u1 = sign_matrix(*u1_shape, low_rank, gen, dtype=dtype, device=target)
    u2 = sign_matrix(*u2_shape, low_rank, gen, dtype=dtype, device=target)
    if weight is None:
        # nn.Linear's and nn.Conv2d's kaiming_uniform_(a=sqrt(5)): bound 1/sqrt(fan_in).
        weight = uniform((d_out, d_in), 1.0 / math.sqrt(d_in), gen, device=target)
    cdt = compute_dtype(dtype)
    w = weight.to(device=target, dtype=cdt)
    if transposed:
        s1 = u1.to(cdt).t() @ w  # (r, d_in) = (W^T U1_lin^T)^T
        s2 = w @ u2.to(cdt).t()  # (d_out, r) = (U2_lin^T W^T)^T
    else:
        wt = w.t()
        s1 = wt @ u1.to(cdt).t()  # S1 = W^T U1^T
        s2 = u2.to(cdt).t() @ wt  # S2 = U2^T W^T
    return SketchFactors(s1.to(dtype).contiguous(), s2.to(dtype).contiguous(), u1, u2)


def initial_bias(
    features: int,
    fan_in: int,
    gen: torch.Generator,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> nn.Parameter:
    """A bias drawn like ``nn.Linear``'s default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(
        uniform((features,), bound, gen, dtype=dtype, device=resolve_device(device))
    )


@torch.no_grad()
def copy_bias(target: torch.Tensor | None, source: torch.Tensor | None) -> None:
    """Copy a dense layer's bias into the sketched layer built from it (both present or absent)."""
    if source is not None:
        assert target is not None  # the layer was built with bias=dense.bias is not None
        target.copy_(source)
