"""The causal-mask check and its cache: fast for a reused mask, never fooled by a new one."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from sketchtune.nn import RandMultiHeadAttention
from sketchtune.nn._masks import is_causal_mask


def _layer() -> RandMultiHeadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    return RandMultiHeadAttention.from_dense(mha, num_random_features=4, seed=0).eval()


def test_bool_and_float_causal_masks_are_recognised_and_others_refused() -> None:
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    assert is_causal_mask(causal, 6)
    assert is_causal_mask(torch.ones(6, 6, dtype=torch.bool).triu(1), 6)
    assert not is_causal_mask(causal, 5)
    assert not is_causal_mask(torch.zeros(6, 6), 6)
    assert not is_causal_mask(torch.ones(6, 6, dtype=torch.bool).triu(2), 6)
    assert not is_causal_mask(torch.ones(6, 6, dtype=torch.int64).triu(1), 6)


def test_an_in_place_change_of_a_verified_mask_is_seen() -> None:
    layer = _layer()
    x = torch.randn(2, 6, 8)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    layer(x, x, x, attn_mask=mask, need_weights=False)  # verified and cached
    mask[3, 0] = True  # no longer causal
    with pytest.raises(ValueError, match=r"cannot honour an arbitrary `attn_mask`"):
        layer(x, x, x, attn_mask=mask, need_weights=False)


def test_a_new_tensor_is_checked_even_where_a_verified_one_died() -> None:
    for _ in range(3):
        causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
        assert is_causal_mask(causal, 7)
        del causal
        gc.collect()
        # Same size, device and dtype, possibly the same id() and storage: still checked.
        other = torch.zeros(7, 7, dtype=torch.bool)
        assert not is_causal_mask(other, 7)


def test_several_masks_of_one_size_stay_verified() -> None:
    a = torch.ones(5, 5, dtype=torch.bool).triu(1)
    b = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert is_causal_mask(a, 5) and is_causal_mask(b, 5)
    assert is_causal_mask(a, 5) and is_causal_mask(b, 5)
    a[0, 1] = False
    assert not is_causal_mask(a, 5)
    assert is_causal_mask(b, 5)
