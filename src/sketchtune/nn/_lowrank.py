"""Accuracy-preserving initialization of sketched layers: truncated and activation-aware SVD.

A sketched layer applies ``W^T ~ (S1 U1 + U2 S2) / (2L)``: a rank-``2Lk`` product
``[S1 | U2] [U1; S2] / (2L)``. The seed's ``"sketch"`` initialization fills it
with random sign matrices (unbiased, but with variance that grows like
``d_out / k``). Here the same two factors, with the same shapes and forward
cost, are filled with a best rank-``2Lk`` approximation instead:

- ``"svd"``: truncated SVD of ``W`` (best in the Frobenius norm of the weight);
- ``"activation"``: best for the layer's real inputs ``X``, i.e. minimizing
  ``||X (W^T - A B)||_F`` (ASVD / SVD-LLM style whitening by the input
  covariance ``C = X^T X / n = L L^T``: truncate ``L^T W^T``, map back with ``L^{-T}``).

Both factorizations are *nested*: the top-``r`` part of a rank-``R`` factorization
is the best rank-``r`` one, so one factorization per layer serves every rank a
search tries (:class:`LowRankFactors`). All math runs in float64 on the weight's
device and is cast at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sketchtune._validation import check_choice

__all__ = ["INITS", "InputCovariance", "LowRankFactors"]

INITS = ("sketch", "svd", "activation")


class InputCovariance:
    """Running second moment ``X^T X`` of a layer's inputs, in float64 (a covariance, not the data).

    Memory is ``features^2`` numbers whatever the number of samples, so it can be
    gathered over a whole validation set. For convolutions the "inputs" are the
    ``C_in * kh * kw`` patches the kernel sees (:meth:`update_conv`).

    Args:
        features: input size (``in_features``, or ``in_channels * kh * kw``).

    Example:
        >>> import torch
        >>> cov = InputCovariance(4)
        >>> cov.update(torch.randn(100, 4))
        >>> cov.count, tuple(cov.matrix().shape)
        (100, (4, 4))
    """

    def __init__(self, features: int) -> None:
        self.features = int(features)
        self.gram: torch.Tensor | None = None
        self.count = 0

    def update(self, inputs: torch.Tensor) -> None:
        """Add rows of ``inputs`` (shape ``(..., features)``)."""
        x = inputs.detach().reshape(-1, self.features).to(torch.float64)
        gram = x.t() @ x
        self.gram = gram if self.gram is None else self.gram + gram.to(self.gram.device)
        self.count += int(x.shape[0])

    def update_conv(
        self,
        inputs: torch.Tensor,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int] | str,
        dilation: tuple[int, int],
        *,
        chunk: int = 8,
    ) -> None:
        """Add the patches a convolution with this geometry sees in ``inputs`` (``(N, C, H, W)``)."""
        x = inputs.detach()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        x = _pad_for(x, kernel_size, padding, dilation)
        for start in range(0, x.shape[0], chunk):  # bounded memory: unfold a few images at a time
            patches = F.unfold(
                x[start : start + chunk], kernel_size, dilation=dilation, stride=stride
            )
            self.update(patches.transpose(1, 2))

    def merge(self, other: InputCovariance) -> None:
        """Add another covariance of the same features (e.g. from another process)."""
        if other.gram is None:
            return
        self.gram = (
            other.gram.clone() if self.gram is None else self.gram + other.gram.to(self.gram.device)
        )
        self.count += other.count

    def matrix(self) -> torch.Tensor:
        """``X^T X / n``, the (uncentered) input covariance."""
        if self.gram is None or self.count == 0:
            raise ValueError(
                "the calibration covariance is empty: run the dense model on some inputs first "
                "(the tuner does this during its baseline evaluation)."
            )
        return self.gram / self.count


def _pad_for(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
) -> torch.Tensor:
    """``x`` zero-padded as ``F.conv2d`` would pad it (``F.unfold`` takes no 'same')."""
    if padding == "valid":
        return x
    if padding == "same":
        pads: list[int] = []
        for k, d in zip(reversed(kernel_size), reversed(dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)
    assert isinstance(padding, tuple)
    ph, pw = padding
    return F.pad(x, [pw, pw, ph, ph]) if ph or pw else x


@dataclass(frozen=True)
class LowRankFactors:
    """A nested rank-``rank`` factorization ``W^T ~ P Q`` (``P``: ``d_in x rank``, ``Q``: ``rank x d_out``).

    ``P[:, :r] @ Q[:r]`` is the best rank-``r`` approximation for every
    ``r <= rank`` (plainly, or for the calibration inputs), with the singular
    values split evenly between the factors.
    """

    P: torch.Tensor
    Q: torch.Tensor
    kind: str

    @property
    def rank(self) -> int:
        return int(self.P.shape[1])

    @classmethod
    def compute(
        cls,
        weight_t: torch.Tensor,
        rank: int,
        *,
        calibration: InputCovariance | torch.Tensor | None = None,
        ridge: float = 1e-4,
    ) -> LowRankFactors:
        """Factorize ``weight_t`` (``d_in x d_out``) to ``rank`` (capped at ``min(d_in, d_out)``).

        With ``calibration`` (an :class:`InputCovariance` or a batch of inputs
        ``(n, d_in)``) the factorization is activation-aware; ``ridge`` adds
        ``ridge * mean eigenvalue`` to the covariance for numerical safety.
        """
        w = weight_t.detach().to(torch.float64)
        d_in, d_out = w.shape
        rank = max(1, min(int(rank), d_in, d_out))
        kind = "svd" if calibration is None else "activation"
        if w.is_meta:  # deferred initialization (device="meta"): shapes only, nothing computed
            return cls(w.new_empty(d_in, rank), w.new_empty(rank, d_out), kind)
        if calibration is None:
            u, s, vh = _truncated_svd(w, rank)
            root = s.sqrt()
            return cls(u * root, root[:, None] * vh, "svd")
        cov = _as_covariance(calibration, d_in).to(device=w.device, dtype=torch.float64)
        jitter = ridge * float(torch.diagonal(cov).mean().clamp_min(1e-12))
        eye = torch.eye(d_in, dtype=torch.float64, device=w.device)
        chol, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        if int(info) != 0:  # not positive definite even with the ridge: add more
            chol = torch.linalg.cholesky(cov + (jitter * 100 + 1e-8) * eye)
        u, s, vh = _truncated_svd(chol.t() @ w, rank)
        root = s.sqrt()
        # P = L^{-T} U sqrt(S): solve L^T P = U sqrt(S)
        p = torch.linalg.solve_triangular(chol.t(), u * root, upper=True)
        return cls(p, root[:, None] * vh, "activation")


def _as_covariance(calibration: InputCovariance | torch.Tensor, d_in: int) -> torch.Tensor:
    if isinstance(calibration, InputCovariance):
        if calibration.features != d_in:
            raise ValueError(
                f"`calibration` holds {calibration.features} features, but the layer takes {d_in} inputs."
            )
        return calibration.matrix()
    if isinstance(calibration, torch.Tensor):
        cov = InputCovariance(d_in)
        cov.update(calibration)
        return cov.matrix()
    raise TypeError(
        f"`calibration` must be an InputCovariance or a tensor of inputs, got {type(calibration).__name__}."
    )


def _truncated_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets; randomized (a few power iterations) when ``rank`` is small."""
    if not bool(torch.isfinite(a).all()):
        raise ValueError("cannot factorize a weight with NaN or Inf values.")
    smallest = min(a.shape)
    if rank * 4 < smallest and smallest > 256:
        u, s, v = torch.svd_lowrank(a, q=min(smallest, rank + max(10, rank // 2)), niter=4)
        return u[:, :rank], s[:rank], v[:, :rank].t()
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def split_factors(
    factors: LowRankFactors,
    num_terms: int,
    low_rank: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(S1, U2, U1, S2)`` in SKLinear's layout whose ``(S1 U1 + U2 S2) / (2L)`` is the top-``2Lk`` part.

    The leading ``Lk`` directions go to ``S1``/``U1``, the next ``Lk`` to ``U2``/``S2``;
    ranks beyond what the factorization holds (or the layer allows) are zero.
    """
    rank = num_terms * low_rank
    total = 2 * rank
    scale = math.sqrt(2 * num_terms)  # undo the forward's 1/(2L), split over both factors
    d_in, d_out = factors.P.shape[0], factors.Q.shape[1]
    a = factors.P.new_zeros(d_in, total)
    b = factors.Q.new_zeros(total, d_out)
    used = min(total, factors.rank)
    a[:, :used] = factors.P[:, :used] * scale
    b[:used] = factors.Q[:used] * scale
    return (
        a[:, :rank].to(device=device, dtype=dtype),
        a[:, rank:].to(device=device, dtype=dtype),
        b[:rank].to(device=device, dtype=dtype),
        b[rank:].to(device=device, dtype=dtype),
    )


def factors_to_place(
    init: str,
    weight_t: torch.Tensor | None,
    total_rank: int,
    *,
    calibration: InputCovariance | torch.Tensor | None,
    factors: LowRankFactors | None,
) -> LowRankFactors | None:
    """Validate the init arguments of a sketched layer; the factors to place (``None`` for "sketch")."""
    check_choice("init", init, INITS)
    if init == "sketch":
        if calibration is not None or factors is not None:
            raise ValueError(
                "`calibration` and `factors` are used by init='svd'/'activation', not by "
                f"init='sketch'; got init={init!r} with them. Pass init='activation' to use calibration."
            )
        return None
    if weight_t is None:
        raise ValueError(
            f"init={init!r} factorizes a dense weight: pass W_init (or use from_dense), or init='sketch'."
        )
    if init == "activation" and calibration is None and factors is None:
        raise ValueError(
            "init='activation' needs `calibration`: the layer's inputs (a tensor) or an "
            "InputCovariance gathered from them; use init='svd' without calibration data."
        )
    if factors is not None:
        if factors.kind != init:
            raise ValueError(
                f"`factors` were computed for init={factors.kind!r}, not init={init!r}."
            )
        if factors.P.shape[0] != weight_t.shape[0] or factors.Q.shape[1] != weight_t.shape[1]:
            raise ValueError(
                f"`factors` have shape {tuple(factors.P.shape)} x {tuple(factors.Q.shape)}, which does "
                f"not fit a {tuple(weight_t.shape)} weight."
            )
        if factors.rank >= min(total_rank, *weight_t.shape):
            return factors
    return LowRankFactors.compute(
        weight_t, total_rank, calibration=calibration if init == "activation" else None
    )
