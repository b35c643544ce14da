"""RandMultiHeadAttention: random-feature (Performer) attention, a drop-in for ``nn.MultiheadAttention``."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from sketchtune._validation import check_bool, check_choice, check_float, check_int
from sketchtune.nn import _favor, _masks, _sketch

__all__ = ["RandMultiHeadAttention"]

_KERNELS = ("softmax", "relu")


class RandMultiHeadAttention(nn.Module):
    r"""Multi-head attention with Performer (FAVOR+) random features, linear in sequence length.

    Each head's ``softmax(q k^T / sqrt(d)) v`` becomes the kernel estimate
    ``phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)`` with ``m`` random features per
    head (the ``feature_matrix`` buffer, block-orthogonal Gaussian rows shared by
    the heads), so time and memory grow linearly with the sequence lengths.
    ``kernel_fn="softmax"`` uses positive random features, an unbiased estimate of
    softmax attention that approaches it as ``m`` grows; ``"relu"`` uses
    ``relu(W x) / sqrt(m) + 1e-3``. Both are defined in ``nn/_favor.py``.

    What it promises, as a drop-in for ``nn.MultiheadAttention``:

    - The same constructor arguments (minus ``add_bias_kv``/``add_zero_attn``),
      parameter names (so a dense ``state_dict`` loads), ``forward`` signature,
      defaults and return shapes; ``need_weights=True`` returns the implied
      weights at ``O(L * S)`` cost, ``need_weights=False`` stays linear.
    - ``key_padding_mask`` (bool, or additive float per key; the relu kernel takes
      only ``0``/``-inf``) and causal masks (``is_causal=True``, or an ``(L, L)``
      mask with ``True``/``-inf`` strictly above the diagonal) are honoured exactly.
      Any other ``attn_mask`` is a ``ValueError``, never silently ignored.
    - float32/float64/float16/bfloat16 on any device, and autocast (forward and
      backward): the feature maps run in at least float32 (under autocast the
      matrix products follow it). Memory beyond the ``(N, L, E)`` head outputs is a
      few ``(N, T, m)`` tensors (heads run one at a time).
    - Dropout (training only) drops key features, not attention weights (a
      matrix this layer never forms); each query's weights still sum to 1.
    - Inside ``nn.Transformer*Layer`` its own ``forward`` always runs (PyTorch's
      fused fast path would compute exact attention); NestedTensor inputs are
      refused, so build ``nn.TransformerEncoder`` with ``enable_nested_tensor=False``.

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
    causal_chunk_size: int = _favor.CAUSAL_CHUNK

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
        kw: dict[str, Any] = {"device": _sketch.resolve_device(device), "dtype": dtype}
        gen = _sketch.generator(self.seed)
        self.register_buffer(
            "feature_matrix",
            _favor.orthogonal_features(self.num_random_features, self.head_dim, gen, **kw),
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
            device=kw["device"],
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
        batched, n, tgt_len, src_len = _masks.check_inputs(
            query,
            key,
            value,
            embed_dim=self.embed_dim,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
        )
        causal = _masks.resolve_causal(attn_mask, is_causal, tgt_len, src_len)
        key_bias, key_keep = _masks.key_padding_terms(
            key_padding_mask,
            n,
            src_len,
            batched=batched,
            kernel_fn=self.kernel_fn,
            dtype=self.out_proj.weight.dtype,
        )

        # Inputs that are the same tensor share one projection GEMM per head.
        groups = _favor.input_groups(query, key, value)
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
        plans = _favor.projection_plans(
            self._projection_weights(),
            self.in_proj_bias,
            self.feature_matrix,
            num_heads=h,
            kernel_fn=self.kernel_fn,
            groups=groups,
            causal=causal,
        )

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
                projected = _favor.project(inputs[plan.segments[0]], plan, i)
                feats.update(
                    _favor.split_projection(
                        projected, plan, self.feature_matrix, self.kernel_fn, key_bias, key_keep
                    )
                )
            phi_q, phi_k, v = feats["q"], feats["k"], feats["v"]
            if self.training and self.dropout > 0.0:
                phi_k = F.dropout(phi_k, self.dropout, training=True)
            if causal:
                num, den = _favor.causal_attention(phi_q, phi_k, v, chunk, d)
            else:
                num, den = _favor.attention(phi_q, phi_k, v, d)
            den = den.clamp_min(_favor.DEN_MIN)  # (N, L, 1)
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

    def _projection_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        if self.in_proj_weight is not None:
            w = self.in_proj_weight
            return w[:e], w[e : 2 * e], w[2 * e :]
        assert self.q_proj_weight is not None
        assert self.k_proj_weight is not None
        assert self.v_proj_weight is not None
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

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


def _nearest_divisors(value: int, target: int) -> str:
    divisors = [k for k in range(1, value + 1) if value % k == 0]
    below = max(k for k in divisors if k < target)
    above = [k for k in divisors if k > target]
    return f"{below} or {above[0]}" if above else str(below)
