"""What RandMultiHeadAttention accepts: input shapes and the masks it can honour exactly.

Random-feature attention never forms the ``L x S`` score matrix, so of
``nn.MultiheadAttention``'s masks it can honour exactly a per-key padding mask and
the causal mask; anything else is an error (:func:`resolve_causal`). Whether a mask
is causal costs an ``O(L^2)`` check, done once per mask tensor (a small cache).
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import Tensor

from sketchtune.nn import _sketch

__all__ = ["check_inputs", "is_causal_mask", "key_padding_terms", "resolve_causal"]

# Causal masks verified recently, a few per (size, device, dtype): weak references to the
# tensors (they never keep a mask alive, and identity, not a reused id(), decides a hit)
# with their version counters (an in-place change of a mask bumps it and forces a new
# check). A model that passes the same mask tensors to every layer and every step pays
# the O(L^2) check once per tensor.
_VerifiedKey = tuple[int, torch.device, torch.dtype]
_VERIFIED: dict[_VerifiedKey, list[tuple[weakref.ref[Tensor], int]]] = {}
_VERIFIED_KEYS = 16
_VERIFIED_PER_KEY = 4
_VERIFIED_LOCK = threading.Lock()


def is_causal_mask(mask: Tensor, size: int) -> bool:
    """Whether ``mask`` equals the ``(size, size)`` causal mask (bool or additive float)."""
    if tuple(mask.shape) != (size, size):
        return False
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return False
    # Inference tensors have no version counter; compiled and traced code must not branch on it.
    use_cache = not (
        mask.is_inference() or torch.compiler.is_compiling() or torch.jit.is_tracing()  # type: ignore[attr-defined]
    )
    key = (size, mask.device, mask.dtype)
    if use_cache:
        for ref, version in _VERIFIED.get(key, ()):
            if ref() is mask and version == mask._version:
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
        _remember_causal(key, mask)
    return ok


def _remember_causal(key: _VerifiedKey, mask: Tensor) -> None:
    with _VERIFIED_LOCK:
        # Identity, never ==: comparing tensors is elementwise.
        entries = [
            (r, v) for r, v in _VERIFIED.pop(key, []) if (t := r()) is not None and t is not mask
        ]
        entries = [*entries[-(_VERIFIED_PER_KEY - 1) :], (weakref.ref(mask), mask._version)]
        if len(_VERIFIED) >= _VERIFIED_KEYS:  # the least recently verified size goes first
            _VERIFIED.pop(next(iter(_VERIFIED)))
        _VERIFIED[key] = entries


def resolve_causal(attn_mask: Tensor | None, is_causal: bool, tgt_len: int, src_len: int) -> bool:
    """Whether attention is causal; an ``attn_mask`` that is not the causal mask is an error."""
    causal = bool(is_causal)
    if attn_mask is not None:
        if not is_causal_mask(attn_mask, tgt_len):
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


def key_padding_terms(
    mask: Tensor | None,
    n: int,
    src_len: int,
    *,
    batched: bool,
    kernel_fn: str,
    dtype: torch.dtype,
) -> tuple[Tensor | None, Tensor | None]:
    """``key_padding_mask`` as ``(additive log-weight, None)`` (softmax) or ``(None, 0/1 keep)`` (relu).

    Both come back ``(n, src_len)`` in the compute dtype of a ``dtype`` layer.
    """
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
    cdt = _sketch.compute_dtype(dtype)
    if kernel_fn == "softmax":
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


def check_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    embed_dim: int,
    kdim: int,
    vdim: int,
    batch_first: bool,
) -> tuple[bool, int, int, int]:
    """Validate the inputs of ``RandMultiHeadAttention.forward``.

    Returns:
        ``(batched, N, L, S)``: whether the inputs are batched, the batch size, and
        the target and source lengths.
    """
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.is_nested:
            raise TypeError(
                f"RandMultiHeadAttention does not accept NestedTensor inputs (`{name}` is "
                "nested). nn.TransformerEncoder builds them on its fast path: construct it "
                "with enable_nested_tensor=False (sketchtune's layer swapping does this)."
            )
    if query.dim() not in (2, 3):
        raise ValueError(
            f"`query` must be 2-D (unbatched) or 3-D (batched), got shape {tuple(query.shape)}."
        )
    batched = query.dim() == 3
    for name, tensor, width in (
        ("query", query, embed_dim),
        ("key", key, kdim),
        ("value", value, vdim),
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
    if not batched:
        return batched, 1, query.shape[0], key.shape[0]
    bdim = 0 if batch_first else 1
    if key.shape[bdim] != query.shape[bdim]:
        raise ValueError(
            f"`query` and `key` must have the same batch size, got {tuple(query.shape)} "
            f"and {tuple(key.shape)} (batch_first={batch_first})."
        )
    if batch_first:
        return batched, query.shape[0], query.shape[1], key.shape[1]
    return batched, query.shape[1], query.shape[0], key.shape[0]
