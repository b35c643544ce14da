"""SKLinear: a sketched, randomized low-rank replacement for ``nn.Linear``."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from sketchtune._validation import check_bool, check_int
from sketchtune.nn import _sketch
from sketchtune.nn._lowrank import InputCovariance, LowRankFactors

__all__ = ["SKLinear"]

#: the inference path concatenates the factors for ranks up to this ...
_FUSED_MAX_RANK = 12
#: ... and calls of at least this many rows per unit of rank (``benchmarks/layers.py``)
_FUSED_ROWS_PER_RANK = 4


class SKLinear(nn.Module):
    r"""Sketched linear layer: ``num_terms`` pairs of rank-``low_rank`` sketches of a dense weight.

    With fixed random sign matrices ``U1_i`` (``k x d_out``) and ``U2_i``
    (``d_in x k``), scaled by ``1/sqrt(k)``, and learnable sketches
    ``S1_i = W^T U1_i^T`` and ``S2_i = U2_i^T W^T``, the layer computes

    .. math::

        y = b + \frac{1}{2L} \sum_{i=1}^{L} \left(x S1_i U1_i + x U2_i S2_i\right),

    an unbiased estimate of ``x W^T + b``. The sum over ``i`` and both terms is a
    single rank-``2Lk`` product ``x [S1 | U2] [U1; S2] / (2L)``. The factors are
    stored already concatenated over ``i`` in GEMM-ready layout, and the product
    is evaluated blockwise: ``h1 = x S1`` and ``h2 = x U2`` (one pass over ``x``
    each), then ``y = b + (h1 U1 + h2 S2) / (2L)`` accumulated into one output by
    ``addmm``. That is ``2Lk (d_in + d_out)`` multiply-adds per row, against
    ``d_in d_out`` for the dense layer; no per-term loop, no temporary wider
    than ``2Lk``, and no dense ``d_in x d_out`` matrix is ever formed. Keeping
    the learnable and fixed blocks apart lets autograd skip the gradients of the
    fixed blocks. At inference (no gradient to the factors), for small ranks and
    enough rows, the layer instead concatenates ``[S1 | U2]`` and ``[U1; S2]`` in
    that call and multiplies by them: two wide products, the folded form
    :func:`~sketchtune.export_plain` writes, faster on CPU BLAS. Nothing derived
    from the factors is kept between calls, so every way of changing them (an
    optimizer, ``load_state_dict``, in-place writes through ``.data``, a replaced
    tensor) is seen by the next call. Under ``torch.autocast`` the GEMMs run in the
    autocast dtype, forward and backward, like ``nn.Linear``'s.

    Shapes of the stored tensors (``r = num_terms * low_rank``):

    - ``S1``: ``(in_features, r)`` learnable, column block ``i`` is ``S1_i``.
    - ``S2``: ``(r, out_features)`` learnable, row block ``i`` is ``S2_i``.
    - ``U1``: ``(r, out_features)`` buffer, row block ``i`` is ``U1_i``.
    - ``U2``: ``(in_features, r)`` buffer, column block ``i`` is ``U2_i``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        num_terms: number of sketch pairs ``L``.
        low_rank: rank ``k`` of each sketch; at most ``min(in_features, out_features)``.
        W_init: dense weight ``(out_features, in_features)`` to sketch. When
            ``None``, a weight is drawn like ``nn.Linear``'s default initialization.
        bias: whether to learn an additive bias.
        dtype: parameter dtype (float32/64, float16, bfloat16); the initialization
            math runs in at least float32 on ``device``.
        device: parameter device; ``None`` is the default device, ``"meta"`` builds
            the shapes only (nothing is drawn, computed or allocated).
        seed: seed of this layer's random matrices. The same seed gives
            bit-identical buffers on any device. ``None`` draws one from torch's
            global RNG (so ``torch.manual_seed`` makes it reproducible).

    Example:
        >>> import torch
        >>> from sketchtune.nn import SKLinear
        >>> dense = torch.nn.Linear(512, 256)
        >>> layer = SKLinear.from_dense(dense, num_terms=1, low_rank=32, seed=0)
        >>> layer(torch.randn(8, 512)).shape
        torch.Size([8, 256])
    """

    S1: nn.Parameter
    S2: nn.Parameter
    U1: torch.Tensor
    U2: torch.Tensor
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_terms: int,
        low_rank: int,
        W_init: torch.Tensor | None = None,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        seed: int | None = None,
        init: str = "sketch",
        calibration: InputCovariance | torch.Tensor | None = None,
        factors: LowRankFactors | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.out_features = check_int("out_features", out_features, minimum=1)
        self.num_terms, self.low_rank = _sketch.check_sketch_sizes(
            "SKLinear",
            self.in_features,
            self.out_features,
            num_terms,
            low_rank,
            d_in_text="in_features",
            d_out_text="out_features",
        )
        check_bool("bias", bias)
        if W_init is not None:
            _sketch.check_weight("W_init", W_init, (self.out_features, self.in_features))
        self.seed = _sketch.resolve_seed(seed)
        self._scale = 1.0 / (2 * self.num_terms)
        self.init = init
        gen = _sketch.generator(self.seed)
        with torch.no_grad():
            start = _sketch.initial_factors(
                self.in_features,
                self.out_features,
                self.num_terms,
                self.low_rank,
                W_init,
                gen,
                transposed=False,
                init=init,
                calibration=calibration,
                factors=factors,
                dtype=dtype,
                device=device,
            )
        self.register_buffer("U1", start.U1)
        self.register_buffer("U2", start.U2)
        self.S1 = nn.Parameter(start.S1)
        self.S2 = nn.Parameter(start.S2)
        self.bias = (
            _sketch.initial_bias(
                self.out_features, self.in_features, gen, dtype=dtype, device=device
            )
            if bias
            else None
        )

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        *,
        num_terms: int,
        low_rank: int,
        seed: int | None = None,
        init: str = "sketch",
        calibration: InputCovariance | torch.Tensor | None = None,
        factors: LowRankFactors | None = None,
    ) -> SKLinear:
        """Build a sketch of ``linear``, copying its weight, bias, device and dtype.

        Args:
            linear: the dense layer to replace (left unchanged).
            num_terms: number of sketch pairs ``L``.
            low_rank: rank ``k`` of each sketch.
            seed: seed of the random matrices (see the class docstring).
            init: how the factors start: ``"sketch"`` (the seed's random-sign
                sketch, unbiased), ``"svd"`` (best rank-``2Lk`` approximation of the
                weight) or ``"activation"`` (best for the layer's inputs; needs
                ``calibration``). Same shapes and forward cost for all three.
            calibration: the layer's inputs (``(n, in_features)``) or an
                :class:`InputCovariance` of them, for ``init="activation"``.
            factors: a precomputed :class:`LowRankFactors` of this weight to reuse
                across ranks (its top-``2Lk`` part is used).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"`linear` must be an nn.Linear, got {type(linear).__name__}; "
                "use SKConv2d.from_dense for nn.Conv2d and "
                "RandMultiHeadAttention.from_dense for nn.MultiheadAttention."
            )
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            num_terms,
            low_rank,
            W_init=weight,
            bias=linear.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
            seed=seed,
            init=init,
            calibration=calibration,
            factors=factors,
        )
        _sketch.copy_bias(layer.bias, linear.bias)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        shape = input.shape
        x = input.reshape(-1, self.in_features)
        # plain dicts, not Module.__getattr__: this runs on every call of a small layer
        params, buffers, s = self._parameters, self._buffers, self._scale
        s1, s2, u1, u2 = cast(  # registered in __init__, never None
            "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]",
            (params["S1"], params["S2"], buffers["U1"], buffers["U2"]),
        )
        bias = params.get("bias")
        if self._fuse(x.shape[0], (s1, s2, u1, u2)):
            # Inference: the two wide products of the folded form (export_plain's two Linears),
            # on factors concatenated in this call, so that no copy of them can go stale.
            h = torch.mm(x, torch.cat([s1, u2], dim=1))
            up = torch.cat([u1, s2])
            y = torch.addmm(bias, h, up, alpha=s) if bias is not None else torch.mm(h.mul_(s), up)
            return y.view((*shape[:-1], self.out_features))
        h1 = torch.mm(x, s1)
        h2 = torch.mm(x, u2)
        if bias is not None:
            y, beta = torch.addmm(bias, h1, u1, alpha=s), 1.0
        else:
            y, beta = torch.mm(h1, u1), s
        if y.dtype == h2.dtype == s2.dtype:
            y = y.addmm_(h2, s2, beta=beta, alpha=s)  # accumulate in place, no temporary
        else:
            # Under autocast the products above ran in float16/bfloat16 while S2 is still
            # float32; in-place ops are not autocast, the out-of-place one casts all three.
            y = torch.addmm(y, h2, s2, beta=beta, alpha=s)
        return y.view((*shape[:-1], self.out_features))

    def _fuse(self, rows: int, factors: tuple[torch.Tensor, ...]) -> bool:
        """Whether this call multiplies by the concatenated factors (else blockwise).

        Concatenating copies the factors, ``2r (d_in + d_out)`` values, in every
        call; the two wide products save a pass over the input and one over the
        output against the four narrow ones. On a 2-core CPU that paid for ranks
        ``r = num_terms * low_rank`` from 2 to ``_FUSED_MAX_RANK`` in calls of at least
        ``_FUSED_ROWS_PER_RANK * r`` rows (up to 2x over the narrow products at 256
        rows); above that rank the narrow products are as fast, and ``r = 1`` hits
        BLAS's faster matrix-vector kernels. A cached concatenation would save the
        copy but goes stale when a factor is written through ``.data`` (no version
        counter sees that); :func:`~sketchtune.export_plain` is the copy-free form
        for deployment. Training (gradients for the factors), tracing and
        compilation keep the blockwise products.
        """
        rank = self.num_terms * self.low_rank
        if not 1 < rank <= _FUSED_MAX_RANK or rows < _FUSED_ROWS_PER_RANK * rank:
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in factors):
            return False
        return not (torch.jit.is_tracing() or torch.compiler.is_compiling())  # type: ignore[attr-defined]

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight this layer applies.

        Forms the dense matrix, so it costs ``O(in * out)``: for export and tests,
        never used by ``forward``.
        """
        w_t = self.S1 @ self.U1 + self.U2 @ self.S2
        return (w_t * self._scale).t().contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_terms={self.num_terms}, low_rank={self.low_rank}, "
            f"bias={self.bias is not None}, init={self.init!r}, seed={self.seed}"
        )
