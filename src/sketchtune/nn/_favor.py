"""FAVOR+ random-feature attention: features, fused projections, linear-time products.

The pieces :class:`~sketchtune.nn.RandMultiHeadAttention` assembles per head:
:func:`orthogonal_features` draws the feature matrix; :func:`projection_plans` fuses
the q/k/v projections that read the same input into one GEMM per head (with the
feature matrix folded in when that is no more work); :func:`split_projection` and
:func:`feature_map` turn a GEMM's output into ``phi(Q)``, ``phi(K)`` and ``[V, 1]``;
:func:`attention` and :func:`causal_attention` compute the numerator and the
normaliser in time linear in the sequence length.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sketchtune.nn import _sketch

__all__ = [
    "CAUSAL_CHUNK",
    "DEN_MIN",
    "ProjectionPlan",
    "attention",
    "causal_attention",
    "feature_map",
    "input_groups",
    "orthogonal_features",
    "project",
    "projection_plans",
    "split_projection",
]

# Added to the relu features so that a query whose random projections are all negative
# still gets a positive normaliser (Performer's kernel_epsilon).
_RELU_EPS = 1e-3
# Lower bound of the normaliser sum_j phi(q).phi(k_j): only reached when every key is
# masked (or every feature underflowed); the output of such a row is then 0, not NaN.
DEN_MIN = 1e-30
# Causal chunk length, chosen by measurement (benchmarks/layers.py): at head_dim=64 and
# 64 random features the intra-chunk C x C products and the inter-chunk prefix states
# cost about the same, and every temporary stays below glibc's 32 MB mmap threshold.
CAUSAL_CHUNK = 64


class ProjectionPlan(NamedTuple):
    """One fused per-head GEMM of the q/k/v projections that read the same input tensor.

    See :func:`projection_plans`.
    """

    segments: list[str]  # "q", "k", "v" in column order
    weight_t: Tensor  # (heads, in_features, width)
    bias: Tensor | None  # (heads, width)
    folded: dict[str, bool]  # whether q / k columns are random-feature logits (else q / k)
    ones: bool  # whether a ones column follows the values
    w_feat: Tensor | None  # (m, head_dim) feature matrix, when some segment is not folded


def orthogonal_features(
    num_features: int,
    dim: int,
    gen: torch.Generator,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> Tensor:
    """FAVOR+ random features: ``(num_features, dim)``, block-orthogonal Gaussian rows.

    Each block of ``dim`` rows is the orthogonal factor of the QR decomposition of a
    Gaussian matrix (signs fixed so it is Haar-distributed); row ``i`` is then scaled
    by the norm of an independent Gaussian vector, so every row is marginally
    ``N(0, I)`` while rows of a block stay orthogonal. The QR runs in float64 so the
    float32 result does not depend on the LAPACK build.
    """
    dtype = dtype or torch.get_default_dtype()
    if torch.device(device or "cpu").type == "meta":  # shapes only: nothing drawn
        return torch.empty((num_features, dim), dtype=dtype, device="meta")
    blocks = -(-num_features // dim)
    gauss = _sketch.gaussian_matrix(blocks * dim, dim, gen, dtype=torch.float32, device="cpu")
    q, r = torch.linalg.qr(gauss.view(blocks, dim, dim).double())
    signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    rows = (q * signs.unsqueeze(-2)).transpose(-1, -2).reshape(blocks * dim, dim)[:num_features]
    norms = _sketch.gaussian_matrix(num_features, dim, gen, dtype=torch.float32, device="cpu")
    features: Tensor = (
        rows * torch.linalg.vector_norm(norms.double(), dim=1, keepdim=True)
    ).float()
    return features.to(device=device, dtype=dtype)


def projection_plans(
    weights: tuple[Tensor, Tensor, Tensor],
    in_proj_bias: Tensor | None,
    feature_matrix: Tensor,
    *,
    num_heads: int,
    kernel_fn: str,
    groups: list[str],
    causal: bool,
) -> list[ProjectionPlan]:
    """Per-head GEMM operands, one per group of inputs that are the same tensor.

    A group's GEMM computes, for head ``h``, the concatenation of its segments:
    query logits ``q``, key logits ``k`` and values ``v`` (plus a ones column that
    carries the normaliser, see below), padded to a multiple of 16 columns, which BLAS
    kernels handle markedly faster than odd widths.
    """
    w_q, w_k, w_v = weights
    m, d = feature_matrix.shape
    h, e = num_heads, w_q.shape[0]
    dtype = w_q.dtype
    cdt = _sketch.compute_dtype(dtype)
    b_all = in_proj_bias
    biases = (None, None, None) if b_all is None else (b_all[:e], b_all[e : 2 * e], b_all[2 * e :])
    w_feat = feature_matrix.to(cdt) * d**-0.25  # (m, d), includes the q/k scaling
    softmax = kernel_fn == "softmax"

    segments: dict[str, tuple[Tensor, Tensor | None]] = {}
    folded: dict[str, bool] = {}
    for name, weight, bias in (("q", w_q, biases[0]), ("k", w_k, biases[1])):
        in_dim = weight.shape[1]
        # Folding the feature matrix into the projection (x -> (W Wq_h) x) skips the
        # projected q/k when that is no more work (h*m <= E + m per input feature).
        # The softmax kernel also needs |k|^2 per key: it is read off the first
        # head_dim features, whose rows are an orthogonal block scaled by Gaussian norms.
        fold = (
            cdt == dtype
            and h * m * in_dim <= e * (in_dim + m)
            and (name == "q" or not softmax or m >= d)
        )
        w_h = weight.reshape(h, d, in_dim)
        b_h = None if bias is None else bias.reshape(h, d)
        if fold:
            w_h = torch.matmul(w_feat, w_h)  # (h, m, in)
            b_h = None if b_h is None else torch.matmul(b_h, w_feat.t())  # (h, m)
        segments[name], folded[name] = (w_h, b_h), fold
    segments["v"] = (
        w_v.reshape(h, d, -1),
        None if biases[2] is None else biases[2].reshape(h, d),
    )
    plans = []
    for group in groups:
        names = list(group)
        parts = [segments[name] for name in names]
        # The ones column rides along when it is free (the columns need padding to a
        # multiple of 16 anyway) and for causal attention, where computing the normaliser
        # apart takes four more small products per head (measured slower).
        width = sum(w.shape[1] for w, _ in parts)
        ones = cdt == dtype and "v" in names and (causal or width % 16 != 0)
        if ones:
            in_dim = parts[0][0].shape[-1]
            parts.append((w_v.new_zeros(h, 1, in_dim), w_v.new_ones(h, 1)))
        width = sum(w.shape[1] for w, _ in parts)
        pad = -width % 16 if width > 16 else 0
        if pad:
            parts.append((parts[0][0].new_zeros(h, pad, parts[0][0].shape[-1]), None))
        weight = torch.cat([w for w, _ in parts], dim=1)
        fused_bias: Tensor | None = None
        if any(b is not None for _, b in parts):
            fused_bias = torch.cat(
                [w.new_zeros(h, w.shape[1]) if b is None else b for w, b in parts], dim=1
            )
        unfolded = any(not folded.get(name, True) for name in names)
        plans.append(
            ProjectionPlan(
                names,
                weight.transpose(1, 2),
                fused_bias,
                folded,
                ones,
                w_feat if unfolded else None,
            )
        )
    return plans


def split_projection(
    projected: Tensor,
    plan: ProjectionPlan,
    feature_matrix: Tensor,
    kernel_fn: str,
    key_bias: Tensor | None,
    key_keep: Tensor | None,
) -> dict[str, Tensor]:
    """Query features, key features and values ``[v, 1]`` from one head's GEMM output."""
    m, d = feature_matrix.shape
    cdt = _sketch.compute_dtype(projected.dtype)
    # The segments are views of one buffer and are never modified; the feature maps
    # work in place on their own new tensors, but only when autograd is off (it saves
    # some of them for the backward pass).
    inplace = not (torch.is_grad_enabled() and projected.requires_grad)
    out: dict[str, Tensor] = {}
    start = 0
    for name in plan.segments:
        if name == "v":
            width = d + 1 if plan.ones else d
            out["v"] = projected[..., start : start + width].to(cdt)
        else:
            width = m if plan.folded[name] else d
            logits = projected[..., start : start + width]
            projected_qk: Tensor | None = None
            if not plan.folded[name]:
                assert plan.w_feat is not None
                projected_qk = logits.to(cdt)
                logits = torch.matmul(projected_qk, plan.w_feat.t())
            is_key = name == "k"
            out[name] = feature_map(
                logits,
                projected_qk,
                feature_matrix,
                kernel_fn,
                is_key=is_key,
                bias=key_bias if is_key else None,
                keep=key_keep if is_key else None,
                inplace=inplace,
            )
        start += width
    return out


def feature_map(
    logits: Tensor,
    projected: Tensor | None,
    feature_matrix: Tensor,
    kernel_fn: str,
    *,
    is_key: bool,
    bias: Tensor | None,
    keep: Tensor | None,
    inplace: bool,
) -> Tensor:
    """``phi`` from the random projections ``logits = W x`` of one head: ``(N, T, m)``.

    With ``W`` the feature matrix and ``x`` scaled by ``head_dim ** -0.25``:

    - softmax: ``phi(x) = exp(W x - |x|^2 / 2 - c) / sqrt(m)``, an unbiased estimate
      of ``exp(q.k / sqrt(d))``. The stabiliser ``c`` is the row maximum for a query
      and one maximum per (batch, head) over all keys and features for the keys;
      both, like ``1 / sqrt(m)`` and the query's ``exp(-|q|^2 / 2)``, cancel exactly
      between numerator and normaliser. A key padding ``bias`` ``b`` multiplies the
      key's features by ``exp(b)``.
    - relu: ``phi(x) = relu(W x) / sqrt(m) + 1e-3``; ``keep`` zeroes padded keys.

    ``logits`` may be a strided view (a segment of the fused GEMM output); the result
    is always a new contiguous tensor, which the matrix products after it prefer.
    ``projected`` is ``x`` itself when the features were not folded into the GEMM.
    """
    n, t = logits.shape[0], logits.shape[1]
    if kernel_fn == "relu":
        # relu(Wx)/sqrt(m) + eps, up to the factor 1/sqrt(m) that cancels in the output.
        eps = _RELU_EPS * math.sqrt(feature_matrix.shape[0])
        phi = torch.relu(logits)
        phi = phi.add_(eps) if inplace else phi + eps
        if keep is not None:
            phi = phi.mul_(keep.view(n, t, 1)) if inplace else phi * keep.view(n, t, 1)
        return phi

    if not is_key:
        # exp(Wq - |q|^2/2 - max) up to a factor per query, which cancels between the
        # numerator and the normaliser: that is a softmax over the features (one fused,
        # stable kernel), and |q|^2 is never needed.
        return torch.softmax(logits, dim=-1)

    d = feature_matrix.shape[1]
    if projected is None:
        inv_norms = feature_matrix[:d].to(logits.dtype).norm(dim=1).reciprocal()
        sq_norm = torch.linalg.vector_norm(logits[..., :d] * inv_norms, dim=-1).square()
    else:
        sq_norm = projected.square().sum(-1) * d**-0.5
    shift = sq_norm.mul_(-0.5)  # (N, T): -|k|^2/2 plus the padding bias
    if bias is not None:
        shift = shift.add_(bias)
    # One stabiliser c per batch element (and head), the maximum exponent over keys and
    # features: a constant, so it cancels exactly. phi = exp(logits - (c - shift)).
    row_max = logits.detach().amax(dim=-1)
    c = (row_max + shift.detach()).amax(dim=1, keepdim=True)
    c = c.clamp_min(torch.finfo(c.dtype).min)  # every key masked: -inf
    offset = (c - shift).unsqueeze(-1)
    return (logits - offset).exp_() if inplace else torch.exp(logits - offset)


def attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """Numerator ``phi(Q) (phi(K)^T V)`` and normaliser ``phi(Q) phi(K)^T 1``.

    ``v`` holds ``d`` value columns, possibly followed by a ones column that makes the
    normaliser come out of the same products.
    """
    num = torch.bmm(phi_q, torch.bmm(phi_k.transpose(1, 2), v))
    if v.shape[-1] > d:
        return num[..., :d], num[..., d:]
    z = phi_k.sum(dim=1).unsqueeze(-1)  # (N, m, 1)
    return num, torch.bmm(phi_q, z)


def causal_attention(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, chunk: int, d: int
) -> tuple[Tensor, Tensor]:
    """Causal numerator ``sum_{j <= i} (phi(q_i).phi(k_j)) v_j`` and normaliser
    ``sum_{j <= i} phi(q_i).phi(k_j)`` for every ``i``, in ``O(T * chunk)`` time and memory.

    Inputs ``(N, T, m)``, ``(N, T, m)`` and ``(N, T, c)`` (``d`` value columns, possibly
    followed by a ones column that carries the normaliser). Inside each chunk of
    ``chunk`` positions the masked ``chunk x chunk`` product is exact; earlier chunks
    enter through prefix sums of the per-chunk states ``phi(K_c)^T V_c``. Every chunk
    is handled by the same batched matrix products: no Python loop over positions or
    chunks.
    """
    n, t, m = phi_q.shape
    width = v.shape[-1]
    ones = width > d
    pad = -t % chunk
    if pad:  # zero rows: padded keys add nothing, padded queries are dropped below
        phi_q, phi_k, v = (F.pad(z, (0, 0, 0, pad)) for z in (phi_q, phi_k, v))
    chunks = (t + pad) // chunk
    q = phi_q.reshape(n * chunks, chunk, m)
    k = phi_k.reshape(n * chunks, chunk, m)
    vv = v.reshape(n * chunks, chunk, width)

    scores = torch.bmm(q, k.transpose(1, 2)).tril_()  # the result is not saved by autograd
    out = torch.bmm(scores, vv)
    den = None if ones else scores.sum(dim=-1, keepdim=True)
    del scores
    if chunks > 1:
        # Inclusive prefix sums of the chunk states, in place; chunk c reads the sum up to
        # chunk c-1, i.e. the previous batch entry. The last chunk's sum is never read by its
        # own sequence, so it is zeroed: it is what the next sequence's first chunk sees.
        states = torch.bmm(k.transpose(1, 2), vv)
        states.view(n, chunks, m, width).cumsum_(dim=1)[:, -1].zero_()
        out[1:].baddbmm_(q[1:], states[:-1])
        if den is not None:
            sums = k.sum(dim=1).unsqueeze(-1)  # (N * chunks, m, 1): the ones column's states
            sums.view(n, chunks, m, 1).cumsum_(dim=1)[:, -1].zero_()
            den[1:].baddbmm_(q[1:], sums[:-1])
    if den is None:
        out, den = out[..., :d], out[..., d:]
    out = out.view(n, t + pad, d)
    den = den.view(n, t + pad, 1)
    return (out[:, :t], den[:, :t]) if pad else (out, den)


def project(x: Tensor, plan: ProjectionPlan, head: int) -> Tensor:
    """``x @ w + b`` for one head, batched over ``x``'s first dimension (strides kept)."""
    w = plan.weight_t[head].expand(x.shape[0], -1, -1)
    if plan.bias is None:
        return torch.bmm(x, w)
    return torch.baddbmm(plan.bias[head], x, w)


def input_groups(query: Tensor, key: Tensor, value: Tensor) -> list[str]:
    """Projections grouped by input tensor: "qkv" for self-attention, "q", "kv" for memory."""
    if key is value:
        return ["qkv"] if query is key else ["q", "kv"]
    if query is key:
        return ["qk", "v"]
    if query is value:
        return ["qv", "k"]
    return ["q", "k", "v"]
