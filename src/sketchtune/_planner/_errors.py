"""Predicted output error of a layer candidate: closed form from spectra, or measured.

For the low-rank kinds (Linear, Conv2d, Conv1D) with ``init="svd"`` or
``"activation"`` the output error of every rank follows in closed form from one
spectrum per layer (relative to the layer's output energy on the calibration
inputs, bias excluded):

- ``activation``: ``sum_{i > r} sigma_i^2 / sum_i sigma_i^2``, ``sigma`` the singular
  values of ``L^T W^T`` with ``C = L L^T`` the input covariance (ASVD / SVD-LLM);
- ``svd``: ``sum_{i > r} s_i^2 u_i^T C u_i / tr(W C W^T)`` from the SVD ``W^T = U S V^T``
  (``C = I`` when no covariance was gathered).

Every other candidate is measured: the layer alone, built at the candidate, on
the call recorded during the dense baseline (:func:`measured_error`). That
includes the int8 form of the dense layer.

A sketch with int8 factors combines the two: its closed-form low-rank error plus
the increment int8 factors cause, measured on the recorded call as the error of
the int8 sketch minus that of the same sketch in float
(:func:`quantization_increment`). On the recorded call this sum is exactly the
int8 sketch's measured error (the increment holds the cross term between the
truncation residual and the quantization noise, whatever its sign); on the
calibration set it assumes that increment is representative, as the measured
errors of every other candidate do.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sketchtune._modes import eval_mode
from sketchtune.nn import InputCovariance

__all__ = ["closed_form_errors", "dense_output", "measured_error", "quantization_increment"]


def closed_form_errors(
    weight_t: torch.Tensor, covariance: InputCovariance | None, *, ridge: float = 1e-4
) -> dict[str, list[float]]:
    """Relative output error of the best rank-``r`` factorization, for ``r = 0 .. min(d_in, d_out)``.

    Returns ``{"svd": [...], "activation": [...]}`` (index ``r``; the last entry is 0).
    Without a covariance both are the plain weight's tail energies.

    Only eigenvalues (and, for ``svd`` with a covariance, the singular directions
    on the input side) are needed, so everything comes from symmetric
    eigenproblems of the smaller side's Gram matrix, in float32 for float32
    weights: about 2.5x faster than the SVDs they replace (0.16 s against
    0.43 s for a 1024x1024 layer), with tails equal to theirs within 1e-6.
    """
    dtype = torch.float64 if weight_t.dtype == torch.float64 else torch.float32
    w = weight_t.detach().to(dtype)
    d_in, d_out = w.shape
    k = min(d_in, d_out)
    if covariance is None or covariance.empty:
        gram = w.t() @ w if d_out <= d_in else w @ w.t()
        plain = _tails(_top_eigenvalues(gram, k))
        return {"svd": plain, "activation": plain}
    if covariance.width is not None:
        return _sketched_errors(w.to(torch.float64), covariance, ridge)
    cov = covariance.matrix().to(device=w.device, dtype=dtype)
    # svd: the tail energies s_i^2 weighted by u_i^T C u_i, the input energy along the
    # weight's i-th singular direction on the input side (u_i: left singular vector of W^T)
    if d_in <= d_out:
        energy, u = torch.linalg.eigh(w @ w.t())
        energy, u = energy.flip(0)[:k].clamp_min(0), u.flip(1)[:, :k]
    else:
        energy, v = torch.linalg.eigh(w.t() @ w)
        energy, v = energy.flip(0)[:k].clamp_min(0), v.flip(1)[:, :k]
        u = (w @ v) / energy.sqrt().clamp_min(torch.finfo(dtype).tiny)
    along = ((cov @ u) * u).sum(0)
    svd = _tails(energy * along)
    # activation: the spectrum of W^T (C + jitter I) W, from the smaller side
    jitter = ridge * float(torch.diagonal(cov).mean().clamp_min(1e-12))
    ridged = cov + jitter * torch.eye(d_in, dtype=dtype, device=w.device)
    if d_out <= d_in:
        weighted = w.t() @ (ridged @ w)
    else:
        chol, info = torch.linalg.cholesky_ex(ridged)
        if int(info) != 0:
            return {"svd": svd, "activation": svd}
        weighted = chol.t() @ (w @ w.t()) @ chol
    activation = _tails(_top_eigenvalues(weighted, k))
    # the activation-aware truncation is never worse on these inputs than the plain one
    return {"svd": svd, "activation": [min(a, b) for a, b in zip(activation, svd, strict=True)]}


def _sketched_errors(
    w: torch.Tensor, covariance: InputCovariance, ridge: float
) -> dict[str, list[float]]:
    """:func:`closed_form_errors` with a sketched covariance (applied, never formed)."""
    d_in, d_out = w.shape
    k = min(d_in, d_out)
    if d_in <= d_out:
        energy, u = torch.linalg.eigh(w @ w.t())
        energy, u = energy.flip(0)[:k].clamp_min(0), u.flip(1)[:, :k]
    else:
        energy, v = torch.linalg.eigh(w.t() @ w)
        energy, v = energy.flip(0)[:k].clamp_min(0), v.flip(1)[:, :k]
        u = (w @ v) / energy.sqrt().clamp_min(torch.finfo(w.dtype).tiny)
    along = (covariance.apply(u) * u).sum(0)
    svd = _tails(energy * along)
    jitter = ridge * max(covariance.mean_eigenvalue, 1e-12)
    rooted = covariance.root_apply(w, jitter, 0.5)  # (C + jitter I)^{1/2} W^T
    gram = rooted.t() @ rooted if d_out <= d_in else rooted @ rooted.t()
    activation = _tails(_top_eigenvalues(gram, k))
    return {"svd": svd, "activation": [min(a, b) for a, b in zip(activation, svd, strict=True)]}


def _top_eigenvalues(gram: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest eigenvalues of a symmetric PSD matrix, descending (rounding clipped at 0)."""
    values: torch.Tensor = torch.linalg.eigvalsh(gram)
    return values.flip(0)[:k].clamp_min(0)


def _tails(energy: torch.Tensor) -> list[float]:
    """``tails[r] = sum_{i >= r} energy_i / sum energy`` for ``r = 0 .. len(energy)``."""
    total = float(energy.sum())
    if total <= 0:
        return [0.0] * (len(energy) + 1)
    suffix = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])
    return [float(v) / total for v in suffix] + [0.0]


def measured_error(
    dense: nn.Module,
    sketch: nn.Module,
    sample: tuple[tuple[Any, ...], dict[str, Any]],
    *,
    reference: torch.Tensor | None = None,
) -> float:
    """``||y_sketch - y||^2 / ||y||^2`` of one layer alone on a recorded call.

    ``reference`` is the dense layer's output on that call (:func:`dense_output`),
    when the caller measures several candidates of one layer.
    """
    args, kwargs = sample
    if reference is None:
        reference = dense_output(dense, sample)
    with torch.no_grad(), eval_mode(sketch):
        approx = _first_tensor(sketch(*args, **kwargs)).double()
    energy = float(reference.square().sum())
    error = float((approx - reference).square().sum())
    if not math.isfinite(error):
        return math.inf
    return error / energy if energy > 0 else error


def dense_output(dense: nn.Module, sample: tuple[tuple[Any, ...], dict[str, Any]]) -> torch.Tensor:
    """The dense layer's output on a recorded call, in float64 (what errors are measured against)."""
    args, kwargs = sample
    with torch.no_grad(), eval_mode(dense):
        return _first_tensor(dense(*args, **kwargs)).double()


def quantization_increment(
    dense: nn.Module,
    float_sketch: nn.Module,
    int8_sketch: nn.Module,
    sample: tuple[tuple[Any, ...], dict[str, Any]],
    *,
    reference: torch.Tensor | None = None,
) -> float:
    """The relative output error int8 factors add to a sketch on a recorded call (never below 0)."""
    if reference is None:
        reference = dense_output(dense, sample)
    added = measured_error(dense, int8_sketch, sample, reference=reference) - measured_error(
        dense, float_sketch, sample, reference=reference
    )
    return max(0.0, added) if math.isfinite(added) else math.inf


def _first_tensor(output: Any) -> torch.Tensor:
    first = output[0] if isinstance(output, tuple) else output
    assert isinstance(first, torch.Tensor)
    return first
