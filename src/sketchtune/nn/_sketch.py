"""Seeded random matrices shared by the sketched layers.

Random draws always happen on the CPU in float32 from a ``torch.Generator``
seeded per layer, and are then moved to the requested device and dtype. Two
processes (or two DDP ranks) that build a layer with the same seed therefore get
bit-identical buffers, whatever device they run on.
"""

from __future__ import annotations

import math
import warnings

import torch

from sketchtune._validation import check_int, check_seed

_SEED_BOUND = 2**31 - 1


def resolve_seed(seed: int | None) -> int:
    """Return ``seed``, or draw one from torch's global RNG when it is ``None``.

    Drawing from the global RNG means ``torch.manual_seed`` makes unseeded
    layers reproducible too, as it does for ``nn.Linear``'s initialization.
    """
    checked = check_seed("seed", seed)
    if checked is not None:
        return checked
    return int(torch.randint(0, _SEED_BOUND, (), dtype=torch.int64).item())


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


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
    is what makes the sketch an unbiased estimate of the dense layer.
    """
    signs = torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8)
    out = signs.to(torch.float32).mul_(2.0).sub_(1.0).mul_(1.0 / math.sqrt(scale_dim))
    return out.to(device=device, dtype=dtype or torch.get_default_dtype())


def gaussian_matrix(
    rows: int,
    cols: int,
    gen: torch.Generator,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """Standard normal matrix of shape ``(rows, cols)``."""
    out = torch.randn((rows, cols), generator=gen, dtype=torch.float32)
    return out.to(device=device, dtype=dtype or torch.get_default_dtype())


def uniform_(tensor: torch.Tensor, bound: float, gen: torch.Generator) -> torch.Tensor:
    """Fill ``tensor`` in place with U(-bound, bound) drawn on the CPU from ``gen``."""
    values = torch.empty(tensor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
    with torch.no_grad():
        tensor.copy_(values)
    return tensor


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
        warnings.warn(
            f"{layer} with num_terms={num_terms}, low_rank={low_rank} costs "
            f"2*num_terms*low_rank*({d_in_text}+{d_out_text})={sketch_cost} multiply-adds and "
            f"stored values per output position, not fewer than the dense layer's "
            f"{dense_cost}: it will be slower and larger than the layer it replaces. "
            f"Keep num_terms*low_rank below {budget:.1f} to save compute.",
            UserWarning,
            stacklevel=3,
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
    # The sum is finite for finite weights (barring overflow, checked exactly below) and
    # costs a fraction of an element-wise isfinite pass; trials build layers often.
    if not bool(torch.isfinite(weight.sum())) and not bool(torch.isfinite(weight).all()):
        raise ValueError(
            f"`{name}` contains NaN or Inf values; sketch a layer with finite weights "
            "(check the checkpoint it was loaded from)."
        )
