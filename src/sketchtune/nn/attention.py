"""RandMultiHeadAttention: random-feature (Performer) attention, a drop-in for ``nn.MultiheadAttention``."""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from sketchtune._validation import check_bool, check_choice, check_float, check_int
from sketchtune.nn import _sketch

__all__ = ["RandMultiHeadAttention"]

_KERNELS = ("softmax", "relu")
# Added to the relu features so that a query whose random projections are all negative
# still gets a positive normaliser (Performer's kernel_epsilon).
_RELU_EPS = 1e-3
# Lower bound of the normaliser sum_j phi(q).phi(k_j): only reached when every key is
# masked (or every feature underflowed); the output of such a row is then 0, not NaN.
_DEN_MIN = 1e-30
# Causal chunk length, chosen by measurement (benchmarks/layers.py): at head_dim=64 and
# 64 random features the intra-chunk C x C products and the inter-chunk prefix states
# cost about the same, and every temporary stays below glibc's 32 MB mmap threshold.
_CAUSAL_CHUNK = 64


class _Plan(NamedTuple):
    """Fused per-head GEMM of the projections that read the same input (see ``_projection_plans``)."""

    segments: list[str]  # "q", "k", "v" in column order
    weight_t: Tensor  # (heads, in_features, width)
    bias: Tensor | None  # (heads, width)
    folded: dict[str, bool]  # whether q / k columns are random-feature logits (else q / k)
    ones: bool  # whether a ones column follows the values
    w_feat: Tensor | None  # (m, head_dim) feature matrix, when some segment is not folded


class RandMultiHeadAttention(nn.Module):
    r"""Multi-head attention with Performer random features, linear in sequence length.

    A drop-in replacement for ``nn.MultiheadAttention``: the same constructor
    arguments (minus ``add_bias_kv``/``add_zero_attn``), the same parameter names
    (``in_proj_weight``/``in_proj_bias`` or ``q_proj_weight``/``k_proj_weight``/
    ``v_proj_weight``, and ``out_proj``), so a dense ``state_dict`` loads into it,
    and the same ``forward`` signature, defaults and return shapes.

    Each head's ``softmax(q k^T / sqrt(d)) v`` is replaced by the kernel estimate

    .. math::

        \mathrm{out}_i = \frac{\phi(q_i)^\top \sum_j \phi(k_j) v_j^\top}
                              {\phi(q_i)^\top \sum_j \phi(k_j)},

    computed as ``phi(Q) (phi(K)^T V)``, so time and memory grow linearly with the
    sequence lengths. With ``W`` the ``(m, head_dim)`` buffer ``feature_matrix``
    (block-orthogonal Gaussian rows, as in FAVOR+, shared by the heads) and
    ``x`` scaled by ``head_dim ** -0.25``:

    - ``kernel_fn="softmax"``: positive random features
      ``phi(x) = exp(W x - |x|^2 / 2 - c) / sqrt(m)``, an unbiased estimate of
      ``exp(q.k / sqrt(d))``. The stabiliser ``c`` is the row maximum for a query
      and one maximum per (batch, head) over all keys and features for the keys;
      both, like ``1 / sqrt(m)`` and the query's ``exp(-|q|^2 / 2)``, cancel
      exactly between numerator and denominator. The estimate approaches exact
      softmax attention as ``num_random_features`` grows.
    - ``kernel_fn="relu"``: ``phi(x) = relu(W x) / sqrt(m) + 1e-3``.

    Features and normalisation are computed in float32 for float16/bfloat16 layers.

    Masks: ``key_padding_mask`` is honoured exactly (bool, or an additive float
    bias per key: a key with bias ``b`` gets its features multiplied by ``exp(b)``,
    which for the relu kernel is only defined for ``0``/``-inf``). ``attn_mask`` may
    only be a causal mask (``(L, L)``, ``True``/``-inf`` strictly above the
    diagonal), or pass ``is_causal=True``; causal attention uses chunked prefix
    sums (an exact ``C x C`` masked product inside each chunk of
    ``causal_chunk_size`` positions, plus prefix sums of the ``phi(K)^T V`` states
    of the earlier chunks), still linear in length. Any other mask raises a
    ``ValueError``: random-feature attention cannot honour arbitrary masks, so keep
    such layers dense.

    Heads are processed one at a time, so the working memory beyond the ``(N, L, E)``
    head outputs is a few ``(N, T, m)`` tensors. Per head, one GEMM per distinct
    input tensor (one for self-attention) yields the query and key random
    projections, with the feature matrix folded into the projection weights when
    that is no more work (``num_heads * m <= E + m``), and the values; ``out_proj``
    runs once on all heads.

    ``need_weights=True`` (the default, as in ``nn.MultiheadAttention``) also
    returns the implied attention weights ``phi(q_i).phi(k_j) / sum_j``, which
    costs ``O(L * S)``; pass ``need_weights=False`` for the linear-time path.

    Dropout differs from ``nn.MultiheadAttention``, which drops entries of the
    ``L x S`` attention matrix, a matrix this layer never forms. In training with
    ``dropout > 0`` it applies inverted dropout to the key feature map ``phi(K)``;
    the same dropped features enter the numerator and the denominator, so each
    query still averages the values with weights summing to 1. No dropout in eval.

    Inside ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` the layer
    always runs its own ``forward``: ``_qkv_same_embed_dim`` is ``False``, which
    turns off PyTorch's fused fast path (that path would compute exact softmax
    attention from the projection weights). NestedTensor inputs are refused; build
    ``nn.TransformerEncoder`` with ``enable_nested_tensor=False``.

    Args:
        embed_dim: model dimension ``E``.
        num_heads: number of heads; must divide ``embed_dim``.
        num_random_features: number of random features ``m`` per head.
        kernel_fn: ``"softmax"`` (approximates softmax attention) or ``"relu"``.
        dropout: dropout probability on the key features during training, in ``[0, 1)``.
        bias: whether the input and output projections have biases.
        batch_first: inputs and outputs are ``(N, L, E)`` instead of ``(L, N, E)``.
        device: parameter device.
        dtype: parameter dtype.
        kdim: feature size of ``key`` (default ``embed_dim``).
        vdim: feature size of ``value`` (default ``embed_dim``).
        seed: seed of the random features and of the initial weights. The same seed
            gives bit-identical buffers on any device. ``None`` draws one from
            torch's global RNG (so ``torch.manual_seed`` makes it reproducible).

    Attributes:
        feature_matrix: ``(num_random_features, head_dim)`` buffer of random
            features. A ``state_dict`` without it (e.g. a dense layer's) loads and
            keeps the seeded features.
        causal_chunk_size: chunk length of the causal algorithm (any positive int
            gives the same result up to rounding; the default was measured fastest).

    Example:
        >>> import torch
        >>> from sketchtune.nn import RandMultiHeadAttention
        >>> dense = torch.nn.MultiheadAttention(64, 4, batch_first=True)
        >>> layer = RandMultiHeadAttention.from_dense(dense, num_random_features=32, seed=0)
        >>> x = torch.randn(2, 100, 64)
        >>> out, weights = layer(x, x, x)
        >>> out.shape, weights.shape
        (torch.Size([2, 100, 64]), torch.Size([2, 100, 100]))
        >>> out, _ = layer(x, x, x, is_causal=True, need_weights=False)
        >>> out.shape
        torch.Size([2, 100, 64])
    """

    feature_matrix: Tensor
    in_proj_weight: nn.Parameter | None
    q_proj_weight: nn.Parameter | None
    k_proj_weight: nn.Parameter | None
    v_proj_weight: nn.Parameter | None
    in_proj_bias: nn.Parameter | None
    causal_chunk_size: int = _CAUSAL_CHUNK

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_random_features: int,
        kernel_fn: str = "softmax",
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = check_int("embed_dim", embed_dim, minimum=1)
        self.num_heads = check_int("num_heads", num_heads, minimum=1)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"`embed_dim` ({self.embed_dim}) must be divisible by `num_heads` "
                f"({self.num_heads}); use num_heads={_nearest_divisors(self.embed_dim, self.num_heads)}."
            )
        self.num_random_features = check_int("num_random_features", num_random_features, minimum=1)
        self.kernel_fn: str = check_choice("kernel_fn", kernel_fn, _KERNELS)
        self.dropout = check_float(
            "dropout", dropout, minimum=0.0, maximum=1.0, max_inclusive=False
        )
        check_bool("bias", bias)
        self.batch_first = check_bool("batch_first", batch_first)
        self.kdim = self.embed_dim if kdim is None else check_int("kdim", kdim, minimum=1)
        self.vdim = self.embed_dim if vdim is None else check_int("vdim", vdim, minimum=1)
        self.head_dim = self.embed_dim // self.num_heads
        self.seed = _sketch.resolve_seed(seed)
        # Whether q/k/v weights are packed in `in_proj_weight` (nn.MultiheadAttention's
        # `_qkv_same_embed_dim`, which we must not expose under that name; see below).
        self._packed = self.kdim == self.embed_dim and self.vdim == self.embed_dim

        e = self.embed_dim
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        gen = _sketch.generator(self.seed)
        self.register_buffer(
            "feature_matrix",
            _orthogonal_features(self.num_random_features, self.head_dim, gen, **kw),
        )
        if self._packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * e, e, **kw))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = nn.Parameter(torch.empty(e, e, **kw))
            self.k_proj_weight = nn.Parameter(torch.empty(e, self.kdim, **kw))
            self.v_proj_weight = nn.Parameter(torch.empty(e, self.vdim, **kw))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * e, **kw))
        else:
            self.register_parameter("in_proj_bias", None)
        # skip_init: no draw from the global RNG; the weights come from `gen` below.
        # NonDynamicallyQuantizableLinear (an nn.Linear, as in nn.MultiheadAttention) keeps
        # layer selectors from swapping out_proj on its own.
        self.out_proj = torch.nn.utils.skip_init(
            NonDynamicallyQuantizableLinear,
            e,
            e,
            bias=bias,
            device=_resolve_device(device),
            dtype=dtype,
        )
        self._reset_parameters(gen)

    @torch.no_grad()
    def _reset_parameters(self, gen: torch.Generator) -> None:
        # nn.MultiheadAttention's initialisation (xavier_uniform_ projections, zero biases,
        # nn.Linear's default for out_proj.weight), drawn from this layer's generator.
        e = self.embed_dim
        if self.in_proj_weight is not None:
            _sketch.uniform_(self.in_proj_weight, math.sqrt(6.0 / (e + 3 * e)), gen)
        else:
            for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                assert weight is not None  # set in __init__ when not packed
                _sketch.uniform_(weight, math.sqrt(6.0 / (weight.shape[0] + weight.shape[1])), gen)
        _sketch.uniform_(self.out_proj.weight, 1.0 / math.sqrt(e), gen)
        if self.in_proj_bias is not None:
            self.in_proj_bias.zero_()
        if self.out_proj.bias is not None:
            self.out_proj.bias.zero_()

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # nn.TransformerEncoderLayer / nn.TransformerEncoder read this flag to decide whether
        # their fused fast path (torch._transformer_encoder_layer_fwd) may run. That kernel
        # computes exact softmax attention from in_proj_weight and never calls our forward,
        # so it must always be refused: the flag is False even when the projections are
        # packed (that fact lives in `_packed`). It also keeps TransformerEncoder from
        # building NestedTensor inputs for this layer.
        return False

    @classmethod
    def from_dense(
        cls,
        mha: nn.MultiheadAttention,
        *,
        num_random_features: int,
        kernel_fn: str = "softmax",
        seed: int | None = None,
    ) -> RandMultiHeadAttention:
        """Build a random-feature version of ``mha``, copying its projections.

        Copies the packed or separate q/k/v projection weights, the biases,
        ``out_proj``, ``dropout``, ``batch_first``, the device and the dtype.

        Args:
            mha: the dense layer to replace (left unchanged).
            num_random_features: number of random features ``m`` per head.
            kernel_fn: ``"softmax"`` or ``"relu"``.
            seed: seed of the random features (see the class docstring).

        Raises:
            TypeError: ``mha`` is not an ``nn.MultiheadAttention``.
            ValueError: ``mha`` uses ``add_bias_kv`` or ``add_zero_attn``.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(
                f"`mha` must be an nn.MultiheadAttention, got {type(mha).__name__}; "
                "use SKLinear.from_dense for nn.Linear and SKConv2d.from_dense for nn.Conv2d."
            )
        if mha.bias_k is not None or mha.bias_v is not None:
            raise ValueError(
                "`mha` was built with add_bias_kv=True, which RandMultiHeadAttention does not "
                "support (the learned extra key/value has no random-feature equivalent); keep "
                "this layer dense."
            )
        if mha.add_zero_attn:
            raise ValueError(
                "`mha` was built with add_zero_attn=True, which RandMultiHeadAttention does "
                "not support; keep this layer dense."
            )
        weight = mha.out_proj.weight
        layer = cls(
            mha.embed_dim,
            mha.num_heads,
            num_random_features,
            kernel_fn,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            device=weight.device,
            dtype=weight.dtype,
            kdim=mha.kdim,
            vdim=mha.vdim,
            seed=seed,
        )
        with torch.no_grad():
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                ours, theirs = getattr(layer, name), getattr(mha, name)
                if ours is not None and theirs is not None:
                    ours.copy_(theirs)
            if layer.in_proj_bias is not None and mha.in_proj_bias is not None:
                layer.in_proj_bias.copy_(mha.in_proj_bias)
            layer.out_proj.weight.copy_(mha.out_proj.weight)
            if layer.out_proj.bias is not None and mha.out_proj.bias is not None:
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        layer.train(mha.training)
        return layer

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A dense nn.MultiheadAttention state_dict has every parameter but no random
        # features: keep the seeded ones instead of reporting a missing key.
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + "feature_matrix"
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key``/``value``, as ``nn.MultiheadAttention.forward``.

        Args:
            query: ``(L, N, E)``, ``(N, L, E)`` when ``batch_first``, or ``(L, E)`` unbatched.
            key: ``(S, N, kdim)``, ``(N, S, kdim)`` or ``(S, kdim)``.
            value: ``(S, N, vdim)``, ``(N, S, vdim)`` or ``(S, vdim)``.
            key_padding_mask: ``(N, S)`` (or ``(S,)`` unbatched); bool ``True`` ignores a
                key, a float is added to the key's attention logits.
            need_weights: also return the ``O(L * S)`` attention weights.
            attn_mask: ``None`` or a causal ``(L, L)`` mask (bool ``True`` or float
                ``-inf`` strictly above the diagonal, ``False``/``0`` elsewhere).
            average_attn_weights: average the returned weights over heads.
            is_causal: apply a causal mask (``attn_mask`` may be omitted).

        Returns:
            ``(output, weights)``: output shaped like ``query`` with ``embed_dim``
            features; weights ``(N, L, S)`` (``(N, num_heads, L, S)`` when not
            averaged, without ``N`` unbatched), or ``None`` when ``need_weights`` is False.
        """
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            if tensor.is_nested:
                raise TypeError(
                    f"RandMultiHeadAttention does not accept NestedTensor inputs (`{name}` is "
                    "nested). nn.TransformerEncoder builds them on its fast path: construct it "
                    "with enable_nested_tensor=False (sketchtune's layer swapping does this)."
                )
        batched = self._check_shapes(query, key, value)
        n, tgt_len, src_len = self._sizes(query, key, batched)
        causal = self._resolve_causal(attn_mask, is_causal, tgt_len, src_len)
        key_bias, key_keep = self._key_padding(key_padding_mask, n, src_len, batched)

        # Inputs that are the same tensor share one projection GEMM per head.
        groups = _input_groups(query, key, value)
        # Work in a batch-major logical layout (N, T, features): a transposed view for
        # seq-first inputs (batched matrix products read it in place), a batch of one
        # for unbatched inputs.
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        inputs = {"q": query, "k": key, "v": value}

        h, d = self.num_heads, self.head_dim
        dtype = self.out_proj.weight.dtype
        chunk = min(self.causal_chunk_size, tgt_len) if causal else 0
        plans = self._projection_plans(groups, causal)

        # One head at a time: every temporary is (N, T, width)-sized and freed before the
        # next head, so the peak memory is the per-head working set plus the (N, L, E)
        # head outputs `o` (laid out like the final output: one out_proj GEMM at the end).
        seq_first = batched and not self.batch_first
        o_shape = (tgt_len, n, h, d) if seq_first else (n, tgt_len, h, d)
        o = query.new_empty(o_shape, dtype=dtype)
        o_heads = o.transpose(0, 1) if seq_first else o  # (N, L, H, D) view
        weights: Tensor | None = None
        for i in range(h):
            feats: dict[str, Tensor] = {}
            for plan in plans:
                projected = _project(inputs[plan.segments[0]], plan, i)
                feats.update(self._split(projected, plan, key_bias, key_keep))
            phi_q, phi_k, v = feats["q"], feats["k"], feats["v"]
            if self.training and self.dropout > 0.0:
                phi_k = F.dropout(phi_k, self.dropout, training=True)
            if causal:
                num, den = _causal_attention(phi_q, phi_k, v, chunk, d)
            else:
                num, den = _attention(phi_q, phi_k, v, d)
            den = den.clamp_min(_DEN_MIN)  # (N, L, 1)
            if (torch.is_grad_enabled() and num.requires_grad) or torch.compiler.is_compiling():
                o_heads[:, :, i].copy_(num / den)  # (Dynamo refuses strided out=)
            else:
                torch.div(num, den, out=o_heads[:, :, i])  # one pass, no temporary
            if need_weights:
                scores = torch.bmm(phi_q, phi_k.transpose(1, 2))
                if causal:
                    scores = scores.tril()
                head_weights = (scores / den).to(query.dtype)
                if average_attn_weights:
                    weights = head_weights if weights is None else weights + head_weights
                else:
                    if weights is None:
                        weights = query.new_empty((n, h, tgt_len, src_len))
                    weights[:, i] = head_weights
        if need_weights and average_attn_weights:
            assert weights is not None
            weights = weights / h

        out = self.out_proj(o.flatten(-2))
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    # ----------------------------------------------------------------------------------
    # Checks

    def _check_shapes(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        if query.dim() not in (2, 3):
            raise ValueError(
                f"`query` must be 2-D (unbatched) or 3-D (batched), got shape {tuple(query.shape)}."
            )
        batched = query.dim() == 3
        for name, tensor, width in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if tensor.dim() != query.dim():
                raise ValueError(
                    f"`{name}` must be {query.dim()}-D like `query`, got shape {tuple(tensor.shape)}."
                )
            if tensor.shape[-1] != width:
                raise ValueError(
                    f"`{name}` must have {width} features in its last dimension, "
                    f"got shape {tuple(tensor.shape)}."
                )
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"`key` and `value` must have the same sequence and batch sizes, got "
                f"{tuple(key.shape)} and {tuple(value.shape)}."
            )
        if batched:
            bdim = 0 if self.batch_first else 1
            if key.shape[bdim] != query.shape[bdim]:
                raise ValueError(
                    f"`query` and `key` must have the same batch size, got {tuple(query.shape)} "
                    f"and {tuple(key.shape)} (batch_first={self.batch_first})."
                )
        return batched

    def _sizes(self, query: Tensor, key: Tensor, batched: bool) -> tuple[int, int, int]:
        if not batched:
            return 1, query.shape[0], key.shape[0]
        if self.batch_first:
            return query.shape[0], query.shape[1], key.shape[1]
        return query.shape[1], query.shape[0], key.shape[0]

    def _resolve_causal(
        self, attn_mask: Tensor | None, is_causal: bool, tgt_len: int, src_len: int
    ) -> bool:
        causal = bool(is_causal)
        if attn_mask is not None:
            if not _is_causal_mask(attn_mask, tgt_len):
                raise ValueError(
                    "RandMultiHeadAttention cannot honour an arbitrary `attn_mask`: random-feature "
                    "attention only supports no mask or a causal (L, L) mask (True or -inf "
                    f"strictly above the diagonal, L={tgt_len}); got a "
                    f"{str(attn_mask.dtype).replace('torch.', '')} mask of shape "
                    f"{tuple(attn_mask.shape)} that is not causal. Use key_padding_mask for "
                    "padding, is_causal=True for causal attention, or keep this layer dense."
                )
            causal = True
        if causal and tgt_len != src_len:
            raise ValueError(
                f"causal attention needs as many queries as keys, got L={tgt_len} queries "
                f"and S={src_len} keys; drop is_causal/attn_mask for cross-attention."
            )
        return causal

    def _key_padding(
        self, mask: Tensor | None, n: int, src_len: int, batched: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """Turn ``key_padding_mask`` into an additive log-weight (softmax) or a 0/1 keep mask (relu)."""
        if mask is None:
            return None, None
        expected = (n, src_len) if batched else (src_len,)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"`key_padding_mask` must have shape {expected} (batch, source length), "
                f"got {tuple(mask.shape)}."
            )
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(
                f"`key_padding_mask` must be a bool or float tensor, got dtype {mask.dtype}."
            )
        mask = mask.reshape(n, src_len)
        cdt = _sketch.compute_dtype(self.out_proj.weight.dtype)
        if self.kernel_fn == "softmax":
            if mask.dtype == torch.bool:
                bias = torch.zeros(mask.shape, dtype=cdt, device=mask.device)
                return bias.masked_fill_(mask, -math.inf), None
            return mask.to(cdt), None
        if mask.dtype == torch.bool:
            return None, (~mask).to(cdt)
        if not bool(((mask == 0) | torch.isneginf(mask)).all()):
            raise ValueError(
                "kernel_fn='relu' can only honour a float `key_padding_mask` of 0 (keep) and "
                "-inf (ignore); other additive biases are exact only for kernel_fn='softmax'. "
                "Pass a bool mask, or use kernel_fn='softmax'."
            )
        return None, (mask == 0).to(cdt)

    # ----------------------------------------------------------------------------------
    # Projections and feature maps

    def _projection_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        if self.in_proj_weight is not None:
            w = self.in_proj_weight
            return w[:e], w[e : 2 * e], w[2 * e :]
        assert self.q_proj_weight is not None
        assert self.k_proj_weight is not None
        assert self.v_proj_weight is not None
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _projection_plans(self, groups: list[str], causal: bool) -> list[_Plan]:
        """Per-head GEMM operands, one per group of inputs that are the same tensor.

        A group's GEMM computes, for head ``h``, the concatenation of its segments:
        query logits ``q``, key logits ``k`` and values ``v`` (plus a ones column that
        carries the normaliser, see below), padded to a multiple of 16 columns, which BLAS
        kernels handle markedly faster than odd widths.
        """
        h, d, m, e = self.num_heads, self.head_dim, self.num_random_features, self.embed_dim
        w_q, w_k, w_v = self._projection_weights()
        dtype = w_q.dtype
        cdt = _sketch.compute_dtype(dtype)
        b_all = self.in_proj_bias
        biases = (
            (None, None, None) if b_all is None else (b_all[:e], b_all[e : 2 * e], b_all[2 * e :])
        )
        w_feat = self.feature_matrix.to(cdt) * d**-0.25  # (m, d), includes the q/k scaling
        softmax = self.kernel_fn == "softmax"

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
                _Plan(
                    names,
                    weight.transpose(1, 2),
                    fused_bias,
                    folded,
                    ones,
                    w_feat if unfolded else None,
                )
            )
        return plans

    def _split(
        self,
        projected: Tensor,
        plan: _Plan,
        key_bias: Tensor | None,
        key_keep: Tensor | None,
    ) -> dict[str, Tensor]:
        """Query features, key features and values ``[v, 1]`` from one head's GEMM output."""
        d, m = self.head_dim, self.num_random_features
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
                out[name] = self._feature_map(
                    logits,
                    projected_qk,
                    is_key=is_key,
                    bias=key_bias if is_key else None,
                    keep=key_keep if is_key else None,
                    inplace=inplace,
                )
            start += width
        return out

    def _feature_map(
        self,
        logits: Tensor,
        projected: Tensor | None,
        *,
        is_key: bool,
        bias: Tensor | None,
        keep: Tensor | None,
        inplace: bool,
    ) -> Tensor:
        """``phi`` from the random projections ``logits = W x`` of one head: ``(N, T, m)``.

        ``logits`` may be a strided view (a segment of the fused GEMM output); the result
        is always a new contiguous tensor, which the matrix products after it prefer.
        ``projected`` is ``x`` itself when the features were not folded into the GEMM.
        """
        n, t = logits.shape[0], logits.shape[1]
        if self.kernel_fn == "relu":
            # relu(Wx)/sqrt(m) + eps, up to the factor 1/sqrt(m) that cancels in the output.
            eps = _RELU_EPS * math.sqrt(self.num_random_features)
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

        d = self.head_dim
        if projected is None:
            inv_norms = self.feature_matrix[:d].to(logits.dtype).norm(dim=1).reciprocal()
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

    def extra_repr(self) -> str:
        dims = ""
        if not self._packed:
            dims = f", kdim={self.kdim}, vdim={self.vdim}"
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_random_features={self.num_random_features}, kernel_fn={self.kernel_fn!r}, "
            f"dropout={self.dropout}, bias={self.in_proj_bias is not None}, "
            f"batch_first={self.batch_first}{dims}, seed={self.seed}"
        )


def _attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """Numerator ``phi(Q) (phi(K)^T V)`` and normaliser ``phi(Q) phi(K)^T 1``.

    ``v`` holds ``d`` value columns, possibly followed by a ones column that makes the
    normaliser come out of the same products.
    """
    num = torch.bmm(phi_q, torch.bmm(phi_k.transpose(1, 2), v))
    if v.shape[-1] > d:
        return num[..., :d], num[..., d:]
    z = phi_k.sum(dim=1).unsqueeze(-1)  # (N, m, 1)
    return num, torch.bmm(phi_q, z)


def _causal_attention(
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


def _project(x: Tensor, plan: _Plan, head: int) -> Tensor:
    """``x @ w + b`` for one head, batched over ``x``'s first dimension (strides kept)."""
    w = plan.weight_t[head].expand(x.shape[0], -1, -1)
    if plan.bias is None:
        return torch.bmm(x, w)
    return torch.baddbmm(plan.bias[head], x, w)


def _input_groups(query: Tensor, key: Tensor, value: Tensor) -> list[str]:
    """Projections grouped by input tensor: "qkv" for self-attention, "q", "kv" for memory."""
    if key is value:
        return ["qkv"] if query is key else ["q", "kv"]
    if query is key:
        return ["qk", "v"]
    if query is value:
        return ["qv", "k"]
    return ["q", "k", "v"]


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.empty(0).device  # honours torch.set_default_device


def _nearest_divisors(value: int, target: int) -> str:
    divisors = [k for k in range(1, value + 1) if value % k == 0]
    below = max(k for k in divisors if k < target)
    above = [k for k in divisors if k > target]
    return f"{below} or {above[0]}" if above else str(below)


def _orthogonal_features(
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
    blocks = -(-num_features // dim)
    gauss = _sketch.gaussian_matrix(blocks * dim, dim, gen, dtype=torch.float32, device="cpu")
    q, r = torch.linalg.qr(gauss.view(blocks, dim, dim).double())
    signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    rows = (q * signs.unsqueeze(-2)).transpose(-1, -2).reshape(blocks * dim, dim)[:num_features]
    norms = _sketch.gaussian_matrix(num_features, dim, gen, dtype=torch.float32, device="cpu")
    features: Tensor = (
        rows * torch.linalg.vector_norm(norms.double(), dim=1, keepdim=True)
    ).float()
    return features.to(device=device, dtype=dtype or torch.get_default_dtype())


# Masks already verified causal, by id: (weak reference, version counter). A model that
# passes the same causal mask tensor to every layer and every step pays the O(L^2) check
# once; an in-place change of the mask bumps its version and forces a new check.
_CAUSAL_VERIFIED: dict[int, tuple[weakref.ref[Tensor], int]] = {}
_CAUSAL_CACHE_SIZE = 16


def _is_causal_mask(mask: Tensor, size: int) -> bool:
    """Whether ``mask`` equals the ``(size, size)`` causal mask (bool or additive float)."""
    if tuple(mask.shape) != (size, size):
        return False
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return False
    # Inference tensors have no version counter; compiled and traced code must not branch on it.
    use_cache = not (
        mask.is_inference() or torch.compiler.is_compiling() or torch.jit.is_tracing()  # type: ignore[attr-defined]
    )
    if use_cache:
        hit = _CAUSAL_VERIFIED.get(id(mask))
        if hit is not None and hit[0]() is mask and hit[1] == mask._version:
            return True
    upper = torch.ones(size, size, dtype=torch.bool, device=mask.device).triu_(1)
    if mask.dtype == torch.bool:
        ok = torch.equal(mask, upper)
    else:
        # -inf exactly above the diagonal, and every other entry 0 (non-zeros are counted).
        ok = torch.equal(torch.isneginf(mask), upper) and int(torch.count_nonzero(mask)) == (
            size * (size - 1) // 2
        )
    if ok and use_cache:
        if len(_CAUSAL_VERIFIED) >= _CAUSAL_CACHE_SIZE:
            _CAUSAL_VERIFIED.pop(next(iter(_CAUSAL_VERIFIED)))
        _CAUSAL_VERIFIED[id(mask)] = (weakref.ref(mask), mask._version)
    return ok
