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
search tries (:class:`LowRankFactors`). The factorization runs in float64 on the
weight's device and is cast at the end; input statistics are gathered with float32
products (:class:`InputCovariance`), as a streamed low-rank sketch when a full
``features x features`` Gram would be wasteful for the ranks searched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sketchtune._validation import check_choice

__all__ = ["INITS", "InputCovariance", "LowRankFactors"]

INITS = ("sketch", "svd", "activation")


class InputCovariance:
    """Running second moment ``X^T X`` of a layer's inputs (a covariance, not the data).

    Memory does not grow with the number of samples, so it can be gathered over a
    whole validation set; the products run in float32 (float64 inputs stay float64).
    For convolutions the "inputs" are the ``C_in * kh * kw`` patches the kernel sees
    (:meth:`update_conv`).

    With ``rank`` (the largest rank a search will ask of the layer) and ``rank + 16 <
    features``, only a streamed sketch ``X^T X Omega`` (``features x (rank + 16)``) is kept
    instead of the ``features^2`` Gram, and the covariance is its Nystrom approximation
    (Tropp et al., 2017, "Fixed-rank approximation of a positive-semidefinite matrix
    from streaming data"): exact along the top ``rank + 16`` input directions, which is
    what a rank-``rank`` activation-aware factorization uses; its trace stays exact.

    Args:
        features: input size (``in_features``, or ``in_channels * kh * kw``).
        rank: the largest rank the statistics must serve (``None``: the full Gram).
        seed: seed of the sketch's random test matrix (the same on every process).

    Example:
        >>> import torch
        >>> cov = InputCovariance(4)
        >>> cov.update(torch.randn(100, 4))
        >>> cov.count, tuple(cov.matrix().shape)
        (100, (4, 4))
    """

    #: columns the sketch keeps beyond the rank it serves
    OVERSAMPLE = 16

    def __init__(self, features: int, *, rank: int | None = None, seed: int = 0) -> None:
        self.features = int(features)
        self.gram: torch.Tensor | None = None
        self.count = 0
        width = None if rank is None else int(rank) + self.OVERSAMPLE
        #: columns of the streamed sketch (``None``: the full Gram is kept)
        self.width = width if width is not None and width < self.features else None
        self._seed = seed
        self._test: torch.Tensor | None = None  # Omega, features x width
        self.sketch: torch.Tensor | None = None  # X^T X Omega
        self.sumsq = 0.0  # trace(X^T X): exact whatever the form
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes its statistics hold."""
        held = self.gram if self.width is None else self.sketch
        return 0 if held is None else held.numel() * held.element_size()

    @staticmethod
    def nbytes_for(features: int, rank: int | None, element_size: int = 4) -> int:
        """Bytes an :class:`InputCovariance` of this size would hold once gathered."""
        width = None if rank is None else rank + InputCovariance.OVERSAMPLE
        columns = features if width is None or width >= features else width
        return features * columns * element_size

    def update(self, inputs: torch.Tensor) -> None:
        """Add rows of ``inputs`` (shape ``(..., features)``)."""
        x = inputs.detach().reshape(-1, self.features)
        if x.dtype != torch.float64:
            x = x.to(torch.float32)
        self._eig = None
        self.sumsq += float(x.square().sum(dtype=torch.float64))
        self.count += int(x.shape[0])
        if self.width is None:
            gram = x.t() @ x
            self.gram = gram if self.gram is None else self.gram.add_(gram.to(self.gram))
            return
        if self._test is None:
            generator = torch.Generator().manual_seed(self._seed)
            self._test = torch.randn(self.features, self.width, generator=generator).to(x)
        part = x.t() @ (x @ self._test.to(x))
        self.sketch = part if self.sketch is None else self.sketch.add_(part.to(self.sketch))

    def reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the statistics over processes (DDP), each holding its own share."""
        if self.gram is not None:
            self.gram = reduce_sum(self.gram)
        if self.sketch is not None:
            self.sketch = reduce_sum(self.sketch)
        both = reduce_sum(torch.tensor([float(self.count), self.sumsq], dtype=torch.float64))
        self.count, self.sumsq = int(both[0].item()), float(both[1].item())
        self._eig = None

    @property
    def empty(self) -> bool:
        return self.count == 0 or (self.gram is None and self.sketch is None)

    def release(self) -> None:
        """Free the statistics' tensors once nothing needs them (``count`` stays, for the record)."""
        self.gram = self.sketch = self._test = None
        self._eig = None

    @property
    def mean_eigenvalue(self) -> float:
        """``trace(C) / features``: exact in both forms (ridges are scaled by it)."""
        return self.sumsq / max(self.count, 1) / self.features

    def eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, vectors)`` of the sketch's Nystrom approximation ``C ~ V diag(values) V^T``.

        ``vectors`` is ``features x width`` with orthonormal columns; float64.
        """
        if self.width is None or self.sketch is None or self._test is None:
            raise ValueError("eig() is for a sketched covariance (one gathered with a rank).")
        if self._eig is None:
            sketch = self.sketch.to(torch.float64) / max(self.count, 1)
            omega = self._test.to(sketch)
            # The sketch was summed in float32: shift by more than its rounding, so the
            # core is positive definite even for inputs of lower rank than the sketch.
            shift = 1e-6 * float(torch.linalg.norm(sketch)) + 1e-30
            for _ in range(6):
                y = sketch + shift * omega
                core = omega.t() @ y
                chol, info = torch.linalg.cholesky_ex((core + core.t()) / 2)
                if int(info) == 0:
                    break
                shift *= 100
            else:
                raise ValueError("the input statistics' sketch is degenerate (NaN or Inf inputs?).")
            e = torch.linalg.solve_triangular(chol, y.t(), upper=False).t()  # y chol^{-T}
            u, s, _ = torch.linalg.svd(e, full_matrices=False)
            self._eig = ((s.square() - shift).clamp_min(0), u)
        return self._eig

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``C v`` (float64) without forming ``C`` when it is sketched."""
        if self.width is None:
            return self.matrix().to(v) @ v
        values, vectors = self.eig()
        vectors = vectors.to(v)
        return vectors @ (values.to(v)[:, None] * (vectors.t() @ v))

    def root_apply(self, v: torch.Tensor, jitter: float, power: float) -> torch.Tensor:
        """``(C + jitter I)^power v`` for a sketched ``C`` (``power`` = 1/2 or -1/2)."""
        values, vectors = self.eig()
        vectors = vectors.to(v)
        outside = float(jitter**power)
        scale = (values.to(v) + jitter) ** power - outside
        out: torch.Tensor = vectors @ (scale[:, None] * (vectors.t() @ v)) + outside * v
        return out

    def update_conv(
        self,
        inputs: torch.Tensor,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int] | str,
        dilation: tuple[int, int],
        *,
        chunk_bytes: int = 64 * 2**20,
    ) -> None:
        """Add the patches a convolution with this geometry sees in ``inputs`` (``(N, C, H, W)``).

        Images are unfolded a few at a time, so the patches in memory stay near
        ``chunk_bytes`` (at least one image's).
        """
        x = inputs.detach()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        x = _pad_for(x, kernel_size, padding, dilation)
        positions = 1
        for size, k, d, s in zip(x.shape[2:], kernel_size, dilation, stride, strict=True):
            positions *= max(1, (size - d * (k - 1) - 1) // s + 1)
        per_image = self.features * positions * 4
        chunk = max(1, chunk_bytes // max(per_image, 1))
        for start in range(0, x.shape[0], chunk):  # bounded memory: unfold a few images at a time
            patches = F.unfold(
                x[start : start + chunk], kernel_size, dilation=dilation, stride=stride
            )
            self.update(patches.transpose(1, 2))

    def merge(self, other: InputCovariance) -> None:
        """Add another covariance of the same features and form (e.g. from another process)."""
        if other.empty:
            return
        if (self.width, self._seed) != (other.width, other._seed):
            raise ValueError(
                "cannot merge input statistics of different forms: "
                f"width {self.width} vs {other.width}, seed {self._seed} vs {other._seed}."
            )
        for name in ("gram", "sketch"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs.clone() if mine is None else mine + theirs.to(mine))
        if self._test is None and other._test is not None:
            self._test = other._test.clone()
        self.count += other.count
        self.sumsq += other.sumsq
        self._eig = None

    def matrix(self) -> torch.Tensor:
        """``X^T X / n``, the (uncentered) input covariance (float64).

        A sketched covariance is formed from its Nystrom approximation
        (``features^2`` numbers: for tests and small layers).
        """
        if self.empty:
            raise ValueError(
                "the calibration covariance is empty: run the dense model on some inputs first "
                "(the tuner does this during its baseline evaluation)."
            )
        if self.width is not None:
            values, vectors = self.eig()
            return (vectors * values) @ vectors.t()
        assert self.gram is not None
        return self.gram.to(torch.float64) / self.count


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
        if isinstance(calibration, InputCovariance) and calibration.width is not None:
            return cls._compute_sketched(w, rank, calibration, ridge)
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

    @classmethod
    def _compute_sketched(
        cls, w: torch.Tensor, rank: int, calibration: InputCovariance, ridge: float
    ) -> LowRankFactors:
        """The activation-aware factorization with a sketched covariance.

        The symmetric root ``R = (C + jitter I)^{1/2}`` plays the Cholesky factor's part:
        truncate ``R W^T``, map back with ``R^{-1}``; both apply through the sketch.
        """
        if calibration.features != w.shape[0]:
            raise ValueError(
                f"`calibration` holds {calibration.features} features, but the layer takes "
                f"{w.shape[0]} inputs."
            )
        jitter = ridge * max(calibration.mean_eigenvalue, 1e-12)
        u, s, vh = _truncated_svd(calibration.root_apply(w, jitter, 0.5), rank)
        root = s.sqrt()
        p = calibration.root_apply(u * root, jitter, -0.5)
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
    scale = math.sqrt(2 * num_terms)  # undo the forward's 1/(2L), split over both factors

    def part(m: torch.Tensor, dim: int, start: int) -> torch.Tensor:
        """Directions ``start`` to ``start + rank`` of ``m`` along ``dim``, scaled, zero past
        what ``m`` holds."""
        held = m.narrow(dim, min(start, m.shape[dim]), max(0, min(rank, m.shape[dim] - start)))
        out, missing = (held * scale).contiguous(), rank - held.shape[dim]
        if missing:  # F.pad's last pair pads the last dimension
            out = F.pad(out, (0, missing) if dim else (0, 0, 0, missing))
        return out.to(device=device, dtype=dtype)

    return (
        part(factors.P, 1, 0),
        part(factors.P, 1, rank),
        part(factors.Q, 0, 0),
        part(factors.Q, 0, rank),
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
