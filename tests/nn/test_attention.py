"""Tests of RandMultiHeadAttention (random-feature attention, a drop-in for nn.MultiheadAttention)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import Tensor, nn

from sketchtune.nn import RandMultiHeadAttention

E, H = 16, 2  # tiny layers: embed_dim 16, 2 heads of head_dim 8


def _dense(
    *,
    batch_first: bool = True,
    bias: bool = True,
    kdim: int | None = None,
    vdim: int | None = None,
    dropout: float = 0.0,
    seed: int = 0,
    **kwargs: object,
) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(
        E, H, dropout=dropout, bias=bias, batch_first=batch_first, kdim=kdim, vdim=vdim, **kwargs
    )
    if bias:  # nn.MultiheadAttention zeroes its biases; make them count in the comparisons
        with torch.no_grad():
            mha.in_proj_bias.normal_(0.0, 0.1)
            mha.out_proj.bias.normal_(0.0, 0.1)
    return mha.eval()


def _layer(m: int = 16, *, kernel_fn: str = "softmax", seed: int = 0, **kwargs: object):
    return RandMultiHeadAttention.from_dense(
        _dense(**kwargs), num_random_features=m, kernel_fn=kernel_fn, seed=seed
    ).eval()


def _randn(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _reference(
    layer: RandMultiHeadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    causal: bool = False,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The same random-feature kernel by brute force, O(L*S), float64, batch-first inputs.

    Returns the output and the per-head attention weights (N, H, L, S).
    """
    n, tgt, src = query.shape[0], query.shape[1], key.shape[1]
    h, d = layer.num_heads, layer.head_dim
    feats = layer.feature_matrix.double()
    m = feats.shape[0]
    if layer.in_proj_weight is not None:
        w_q, w_k, w_v = layer.in_proj_weight.double().chunk(3)
    else:
        w_q, w_k, w_v = (
            w.double() for w in (layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight)
        )
    if layer.in_proj_bias is not None:
        b_q, b_k, b_v = layer.in_proj_bias.double().chunk(3)
    else:
        b_q = b_k = b_v = torch.zeros(layer.embed_dim, dtype=torch.float64)

    def heads(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return (x.double() @ w.t() + b).view(n, x.shape[1], h, d).transpose(1, 2)

    q = heads(query, w_q, b_q) * d**-0.25
    k = heads(key, w_k, b_k) * d**-0.25
    v = heads(value, w_v, b_v)
    if layer.kernel_fn == "softmax":
        phi_q = torch.exp(q @ feats.t() - q.square().sum(-1, keepdim=True) / 2) / math.sqrt(m)
        phi_k = torch.exp(k @ feats.t() - k.square().sum(-1, keepdim=True) / 2) / math.sqrt(m)
    else:
        phi_q = torch.relu(q @ feats.t()) / math.sqrt(m) + 1e-3
        phi_k = torch.relu(k @ feats.t()) / math.sqrt(m) + 1e-3
    if key_bias is not None:
        phi_k = phi_k * torch.exp(key_bias.double())[:, None, :, None]
    scores = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        scores = scores.tril()
    weights = scores / scores.sum(-1, keepdim=True)
    o = (weights @ v).transpose(1, 2).reshape(n, tgt, layer.embed_dim)
    out = o @ layer.out_proj.weight.double().t()
    if layer.out_proj.bias is not None:
        out = out + layer.out_proj.bias.double()
    assert weights.shape == (n, h, tgt, src)
    return out, weights


# ------------------------------------------------------------------------------------------
# Accuracy


def test_approaches_exact_softmax_attention_as_features_grow() -> None:
    x = _randn(2, 12, E)
    errors = {}
    for m in (16, 256):
        per_seed = []
        for seed in range(4):
            dense = _dense(seed=seed)
            exact, _ = dense(x, x, x, need_weights=False)
            layer = RandMultiHeadAttention.from_dense(dense, num_random_features=m, seed=seed)
            with torch.no_grad():
                out, _ = layer(x, x, x, need_weights=False)
            per_seed.append(((out - exact).norm() / exact.norm()).item())
        errors[m] = sum(per_seed) / len(per_seed)
    assert errors[256] < 0.75 * errors[16], errors
    assert errors[256] < 0.4, errors


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
# m=8 and 12 fold the features into the projections, 32 does not; 8 and 32 carry the
# normaliser as a ones column of the values, 12 (32 aligned columns) computes it apart.
@pytest.mark.parametrize("m", [8, 12, 32])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_brute_force_kernel(kernel_fn: str, m: int, causal: bool) -> None:
    layer = _layer(m, kernel_fn=kernel_fn)
    x = _randn(2, 11, E)
    expected, expected_weights = _reference(layer, x, x, x, causal=causal)
    for chunk in (1, 4, 64):  # several chunks with padding, and a single chunk
        layer.causal_chunk_size = chunk
        with torch.no_grad():
            out, weights = layer(x, x, x, is_causal=causal, average_attn_weights=False)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
        assert weights is not None
        torch.testing.assert_close(weights.double(), expected_weights, atol=1e-5, rtol=1e-4)


def test_cross_attention_with_kdim_vdim() -> None:
    layer = _layer(16, kdim=6, vdim=5)
    assert layer.in_proj_weight is None and layer.q_proj_weight is not None
    q, k, v = _randn(3, 7, E), _randn(3, 10, 6, seed=2), _randn(3, 10, 5, seed=3)
    expected, _ = _reference(layer, q, k, v)
    with torch.no_grad():
        out, weights = layer(q, k, v)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
    assert weights is not None and weights.shape == (3, 7, 10)


def test_float64_layer() -> None:
    layer = _layer(8).double()
    x = _randn(2, 9, E).double()
    expected, _ = _reference(layer, x, x, x, causal=True)
    out, _ = layer(x, x, x, is_causal=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_bfloat16_runs_and_stays_close() -> None:
    layer = _layer(16)
    x = _randn(2, 20, E)
    with torch.no_grad():
        ref, _ = layer(x, x, x, is_causal=True, need_weights=False)
        layer_bf16 = layer.to(torch.bfloat16)
        out, weights = layer_bf16(x.bfloat16(), x.bfloat16(), x.bfloat16(), is_causal=True)
    assert out.dtype == torch.bfloat16 and weights is not None and weights.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


# ------------------------------------------------------------------------------------------
# Causal attention and masks


def test_causal_never_looks_ahead() -> None:
    layer = _layer(16)
    layer.causal_chunk_size = 4
    x = _randn(2, 15, E)
    with torch.no_grad():
        base, _ = layer(x, x, x, is_causal=True, need_weights=False)
        for t in (0, 3, 4, 9, 13):
            changed = x.clone()
            changed[:, t + 1 :] += 5 * _randn(2, 15 - t - 1, E, seed=t + 10)
            out, _ = layer(changed, changed, changed, is_causal=True, need_weights=False)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=1e-5)
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_causal_mask_forms_agree() -> None:
    layer = _layer(16)
    x = _randn(2, 9, E)
    float_mask = nn.Transformer.generate_square_subsequent_mask(9)
    bool_mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    with torch.no_grad():
        expected, _ = layer(x, x, x, is_causal=True, need_weights=False)
        for kwargs in (
            {"attn_mask": float_mask},
            {"attn_mask": bool_mask},
            {"attn_mask": float_mask, "is_causal": True},
            {"attn_mask": bool_mask, "is_causal": True},
        ):
            out, _ = layer(x, x, x, need_weights=False, **kwargs)
            torch.testing.assert_close(out, expected)
        noncausal, _ = layer(x, x, x, need_weights=False)
    assert not torch.allclose(noncausal, expected)


def test_causal_mask_check_sees_in_place_changes() -> None:
    layer = _layer(8)
    x = _randn(1, 5, E)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    layer(x, x, x, attn_mask=mask)
    mask[0, 3] = 0.0  # no longer causal: the cached verdict must not be reused
    with pytest.raises(ValueError, match="cannot honour an arbitrary `attn_mask`"):
        layer(x, x, x, attn_mask=mask)


@pytest.mark.parametrize(
    "mask",
    [
        _randn(6, 6),  # arbitrary float
        torch.zeros(6, 6, dtype=torch.bool).fill_diagonal_(True),  # non-causal bool
        nn.Transformer.generate_square_subsequent_mask(6).expand(2 * H, 6, 6),  # per-head 3-D
        nn.Transformer.generate_square_subsequent_mask(6) * 0.5 + 1.0,  # causal plus a bias
        torch.ones(6, 6, dtype=torch.bool).triu(2),  # shifted causal
    ],
)
def test_arbitrary_attn_mask_raises(mask: Tensor) -> None:
    layer = _layer(8)
    x = _randn(2, 6, E)
    with pytest.raises(
        ValueError, match=r"cannot honour an arbitrary `attn_mask`.*keep this layer dense"
    ):
        layer(x, x, x, attn_mask=mask)
    with pytest.raises(ValueError, match="cannot honour"):
        layer(x, x, x, attn_mask=mask, is_causal=True)


def test_causal_needs_square_attention() -> None:
    layer = _layer(8)
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        layer(_randn(2, 4, E), _randn(2, 6, E), _randn(2, 6, E), is_causal=True)


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_key_padding_mask_equals_unpadded_keys(kernel_fn: str, dtype: torch.dtype) -> None:
    layer = _layer(16, kernel_fn=kernel_fn)
    q, kv = _randn(2, 5, E), _randn(2, 8, E, seed=2)
    lengths = (8, 5)
    pad = torch.arange(8)[None, :] >= torch.tensor(lengths)[:, None]
    mask = pad if dtype == torch.bool else torch.zeros(2, 8).masked_fill(pad, -math.inf)
    with torch.no_grad():
        out, weights = layer(q, kv, kv, key_padding_mask=mask)
        for b, length in enumerate(lengths):
            expected, _ = layer(q[b : b + 1], kv[b : b + 1, :length], kv[b : b + 1, :length])
            torch.testing.assert_close(out[b : b + 1], expected, atol=1e-6, rtol=1e-5)
    assert weights is not None
    assert (weights[1, :, 5:] == 0).all()


def test_float_key_padding_mask_is_an_exact_bias_for_softmax() -> None:
    layer = _layer(16)
    q, kv = _randn(2, 5, E), _randn(2, 7, E, seed=2)
    bias = _randn(2, 7, seed=3)
    bias[0, 2] = -math.inf
    expected, expected_weights = _reference(layer, q, kv, kv, key_bias=bias)
    with torch.no_grad():
        out, weights = layer(q, kv, kv, key_padding_mask=bias, average_attn_weights=False)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
    assert weights is not None
    torch.testing.assert_close(weights.double(), expected_weights, atol=1e-5, rtol=1e-4)


def test_relu_rejects_a_float_bias_it_cannot_honour() -> None:
    layer = _layer(8, kernel_fn="relu")
    x = _randn(2, 4, E)
    with pytest.raises(ValueError, match="kernel_fn='relu' can only honour a float"):
        layer(x, x, x, key_padding_mask=torch.full((2, 4), -1.0))


def test_all_keys_masked_gives_finite_output() -> None:
    layer = _layer(8)
    x = _randn(2, 4, E)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1] = True
    out, weights = layer(x, x, x, key_padding_mask=mask)
    assert torch.isfinite(out).all() and weights is not None and torch.isfinite(weights).all()


# ------------------------------------------------------------------------------------------
# Shapes, weights, dropout


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("average", [False, True])
def test_shapes_match_nn_multihead_attention(batch_first: bool, average: bool) -> None:
    dense = _dense(batch_first=batch_first)
    layer = RandMultiHeadAttention.from_dense(dense, num_random_features=8, seed=0)
    n, tgt, src = 3, 5, 7
    cases = [
        ((n, tgt, E), (n, src, E)) if batch_first else ((tgt, n, E), (src, n, E)),
        ((tgt, E), (src, E)),  # unbatched
    ]
    for q_shape, kv_shape in cases:
        q, kv = _randn(*q_shape), _randn(*kv_shape, seed=2)
        ours = layer(q, kv, kv, average_attn_weights=average)
        theirs = dense(q, kv, kv, average_attn_weights=average)
        assert ours[0].shape == theirs[0].shape
        assert ours[1] is not None and theirs[1] is not None
        assert ours[1].shape == theirs[1].shape
        assert layer(q, kv, kv, need_weights=False)[1] is None


def test_batch_first_and_unbatched_agree_with_seq_first() -> None:
    seq_first = _layer(8, batch_first=False)
    batch_first = _layer(8, batch_first=True)
    x = _randn(3, 6, E)  # (N, L, E)
    with torch.no_grad():
        a, wa = batch_first(x, x, x, is_causal=True)
        b, wb = seq_first(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), is_causal=True)
        c, wc = batch_first(x[1], x[1], x[1], is_causal=True)
    torch.testing.assert_close(a, b.transpose(0, 1))
    torch.testing.assert_close(a[1], c)
    assert wa is not None and wb is not None and wc is not None
    torch.testing.assert_close(wa, wb)
    torch.testing.assert_close(wa[1], wc)


def test_attention_weights_rows_sum_to_one_and_reproduce_output() -> None:
    layer = _layer(16)
    q, kv = _randn(2, 5, E), _randn(2, 6, E, seed=2)
    with torch.no_grad():
        out, weights = layer(q, kv, kv, average_attn_weights=False)
    assert weights is not None and weights.shape == (2, H, 5, 6)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, H, 5))
    # The weights are the ones the output used: softmax-free attention with them reproduces it.
    assert layer.in_proj_weight is not None and layer.in_proj_bias is not None
    w_v, b_v = layer.in_proj_weight[2 * E :], layer.in_proj_bias[2 * E :]
    v = (kv @ w_v.t() + b_v).view(2, 6, H, E // H).transpose(1, 2)
    o = (weights @ v).transpose(1, 2).reshape(2, 5, E)
    torch.testing.assert_close(layer.out_proj(o), out, atol=1e-5, rtol=1e-4)

    _, causal_weights = layer(q, q, q, is_causal=True, average_attn_weights=False)
    assert causal_weights is not None
    assert (causal_weights.triu(1) == 0).all()
    torch.testing.assert_close(causal_weights.sum(-1), torch.ones(2, H, 5))


def test_dropout_only_in_training() -> None:
    layer = _layer(16, dropout=0.5)
    assert layer.dropout == 0.5
    no_dropout = _layer(16)
    x = _randn(2, 6, E)
    layer.train()
    torch.manual_seed(0)
    a, wa = layer(x, x, x)
    b, _ = layer(x, x, x)
    assert not torch.allclose(a, b)
    assert wa is not None
    torch.testing.assert_close(wa.sum(-1), torch.ones(2, 6))  # dropped features cancel
    layer.eval()
    with torch.no_grad():
        c, _ = layer(x, x, x)
        d, _ = layer(x, x, x)
        expected, _ = no_dropout(x, x, x)
    assert torch.equal(c, d)
    torch.testing.assert_close(c, expected)


# ------------------------------------------------------------------------------------------
# Construction, seeds, state


def test_seed_gives_bit_identical_layers() -> None:
    x = _randn(2, 7, E)
    a = RandMultiHeadAttention(E, H, 12, seed=123)
    b = RandMultiHeadAttention(E, H, 12, seed=123)
    c = RandMultiHeadAttention(E, H, 12, seed=124)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    assert torch.equal(a(x, x, x)[0], b(x, x, x)[0])
    assert not torch.equal(a.feature_matrix, c.feature_matrix)
    assert not torch.equal(a(x, x, x)[0], c(x, x, x)[0])


def test_unseeded_layers_follow_torch_manual_seed() -> None:
    torch.manual_seed(5)
    a = RandMultiHeadAttention(E, H, 8)
    torch.manual_seed(5)
    b = RandMultiHeadAttention(E, H, 8)
    assert a.seed == b.seed and torch.equal(a.feature_matrix, b.feature_matrix)


def test_initialisation_like_nn_multihead_attention() -> None:
    layer = RandMultiHeadAttention(E, H, 8, seed=0)
    assert layer.in_proj_weight is not None and layer.in_proj_bias is not None
    bound = math.sqrt(6.0 / (E + 3 * E))
    assert layer.in_proj_weight.abs().max() <= bound
    assert layer.in_proj_weight.std() > 0.4 * bound
    assert (layer.in_proj_bias == 0).all()
    assert layer.out_proj.bias is not None and (layer.out_proj.bias == 0).all()
    assert isinstance(layer.out_proj, nn.Linear)


@pytest.mark.parametrize("m", [5, 8, 20])
def test_feature_matrix_is_block_orthogonal(m: int) -> None:
    layer = RandMultiHeadAttention(E, H, m, seed=3)
    feats = layer.feature_matrix
    d = layer.head_dim
    assert feats.shape == (m, d)
    for start in range(0, m, d):
        block = feats[start : start + d]
        gram = block @ block.t()
        torch.testing.assert_close(gram, torch.diag(gram.diagonal()), atol=1e-5, rtol=0)
    norms = feats.norm(dim=1)
    assert norms.std() > 0  # rows rescaled by chi-distributed Gaussian norms


def test_from_dense_copies_weights_and_settings() -> None:
    dense = _dense(batch_first=False, dropout=0.25)
    layer = RandMultiHeadAttention.from_dense(
        dense, num_random_features=8, kernel_fn="relu", seed=4
    )
    assert layer.batch_first is False and layer.dropout == 0.25 and layer.kernel_fn == "relu"
    assert layer.seed == 4 and layer.num_random_features == 8
    for name, value in dense.state_dict().items():
        assert torch.equal(layer.state_dict()[name], value), name
    assert set(layer.state_dict()) == set(dense.state_dict()) | {"feature_matrix"}

    no_bias = RandMultiHeadAttention.from_dense(_dense(bias=False), num_random_features=8)
    assert no_bias.in_proj_bias is None and no_bias.out_proj.bias is None

    separate = _dense(kdim=6, vdim=5)
    layer = RandMultiHeadAttention.from_dense(separate, num_random_features=8)
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
        assert torch.equal(getattr(layer, name), getattr(separate, name)), name


def test_dense_state_dict_loads_and_round_trips() -> None:
    dense = _dense()
    layer = RandMultiHeadAttention(E, H, 8, batch_first=True, seed=1)
    features = layer.feature_matrix.clone()
    layer.load_state_dict(dense.state_dict())  # strict: no random features in it, kept
    assert torch.equal(layer.feature_matrix, features)
    assert layer.in_proj_weight is not None
    assert torch.equal(layer.in_proj_weight, dense.in_proj_weight)

    other = RandMultiHeadAttention(E, H, 8, batch_first=True, seed=2)
    other.load_state_dict(layer.state_dict())
    x = _randn(2, 5, E)
    assert torch.equal(other(x, x, x)[0], layer(x, x, x)[0])


@pytest.mark.parametrize(
    ("mha", "error", "match"),
    [
        (nn.Linear(4, 4), TypeError, "must be an nn.MultiheadAttention, got Linear"),
        (nn.MultiheadAttention(E, H, add_bias_kv=True), ValueError, "add_bias_kv=True"),
        (nn.MultiheadAttention(E, H, add_zero_attn=True), ValueError, "add_zero_attn=True"),
    ],
)
def test_from_dense_errors(mha: nn.Module, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        RandMultiHeadAttention.from_dense(mha, num_random_features=8)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"embed_dim": 0}, ValueError, "`embed_dim` must be a positive int, got 0"),
        ({"embed_dim": 16.0}, TypeError, "`embed_dim` must be an int"),
        ({"num_heads": 0}, ValueError, "`num_heads` must be a positive int"),
        (
            {"num_heads": 3},
            ValueError,
            r"`embed_dim` \(16\) must be divisible by `num_heads` \(3\); use num_heads=2 or 4",
        ),
        ({"num_random_features": 0}, ValueError, "`num_random_features` must be a positive int"),
        ({"num_random_features": True}, TypeError, "`num_random_features` must be an int"),
        (
            {"kernel_fn": "gelu"},
            ValueError,
            "`kernel_fn` must be one of 'softmax', 'relu'; got 'gelu'",
        ),
        ({"dropout": 1.0}, ValueError, "`dropout` must satisfy 0.0 <= dropout < 1.0, got 1.0"),
        ({"dropout": -0.1}, ValueError, "`dropout` must satisfy"),
        ({"dropout": "0.1"}, TypeError, "`dropout` must be a number"),
        ({"bias": 1}, TypeError, "`bias` must be True or False"),
        ({"batch_first": None}, TypeError, "`batch_first` must be True or False"),
        ({"kdim": 0}, ValueError, "`kdim` must be a positive int"),
        ({"vdim": 2.5}, TypeError, "`vdim` must be an int"),
        ({"seed": -1}, ValueError, "`seed` must be between 0 and"),
    ],
)
def test_constructor_validation(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    args: dict[str, object] = {"embed_dim": E, "num_heads": H, "num_random_features": 8}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        RandMultiHeadAttention(**args)  # type: ignore[arg-type]


def test_forward_validation() -> None:
    layer = _layer(8)
    x = _randn(2, 4, E)
    with pytest.raises(ValueError, match=r"`query` must be 2-D .* or 3-D"):
        layer(x[None], x[None], x[None])
    with pytest.raises(ValueError, match="`key` must have 16 features"):
        layer(x, x[..., :8], x)
    with pytest.raises(ValueError, match="`key` must be 3-D like `query`"):
        layer(x, x[0], x)
    with pytest.raises(ValueError, match="`key` and `value` must have the same sequence"):
        layer(x, x, x[:, :3])
    with pytest.raises(ValueError, match="same batch size"):
        layer(x, x[:1], x[:1])
    with pytest.raises(ValueError, match=r"`key_padding_mask` must have shape \(2, 4\)"):
        layer(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="`key_padding_mask` must be a bool or float tensor"):
        layer(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.long))
    nested = torch.nested.nested_tensor([_randn(3, E), _randn(2, E)], layout=torch.jagged)
    with pytest.raises(TypeError, match=r"NestedTensor.*enable_nested_tensor=False"):
        layer(nested, nested, nested)


def test_extra_repr() -> None:
    text = repr(RandMultiHeadAttention(E, H, 8, kernel_fn="relu", dropout=0.1, seed=7))
    for part in (
        "embed_dim=16",
        "num_heads=2",
        "num_random_features=8",
        "kernel_fn='relu'",
        "dropout=0.1",
        "bias=True",
        "batch_first=False",
        "seed=7",
    ):
        assert part in text
    assert "kdim=6" in repr(RandMultiHeadAttention(E, H, 8, kdim=6))


def test_qkv_same_embed_dim_is_false_and_read_only() -> None:
    layer = RandMultiHeadAttention(E, H, 8)
    assert layer._qkv_same_embed_dim is False
    with pytest.raises(AttributeError):
        layer._qkv_same_embed_dim = True  # type: ignore[misc]


# ------------------------------------------------------------------------------------------
# Gradients, tracing, compiling


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_gradcheck(kernel_fn: str) -> None:
    layer = _layer(8, kernel_fn=kernel_fn).double()
    layer.causal_chunk_size = 2
    x = _randn(1, 5, E).double().requires_grad_()
    mask = torch.tensor([[False, False, False, True, False]])

    def run(inp: Tensor, causal: bool) -> Tensor:
        return layer(inp, inp, inp, key_padding_mask=mask, is_causal=causal)[0]

    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda inp, c=causal: run(inp, c), (x,), atol=1e-5, fast_mode=True
        )


def test_backward_reaches_every_parameter() -> None:
    layer = _layer(8, dropout=0.1).train()
    x = _randn(2, 6, E).requires_grad_()
    out, weights = layer(x, x, x, is_causal=True)
    assert weights is not None
    (out.square().sum() + weights.sum()).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad is not None


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_jit_trace_agrees_with_eager() -> None:
    layer = _layer(8)
    layer.causal_chunk_size = 4
    x = _randn(2, 10, E)

    class Wrapper(nn.Module):
        def __init__(self, causal: bool) -> None:
            super().__init__()
            self.attn, self.causal = layer, causal

        def forward(self, inp: Tensor) -> Tensor:
            return self.attn(inp, inp, inp, need_weights=False, is_causal=self.causal)[0]

    with torch.no_grad():
        for causal in (False, True):
            traced = torch.jit.trace(Wrapper(causal), (x,))
            torch.testing.assert_close(traced(x), Wrapper(causal)(x))


def test_torch_compile_agrees_with_eager() -> None:
    layer = _layer(8)
    layer.causal_chunk_size = 4
    x = _randn(2, 10, E)
    with torch.no_grad():
        expected, _ = layer(x, x, x, is_causal=True, need_weights=False)
        # Dynamo captures the whole forward (no graph break) and AOTAutograd functionalises it.
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        out, _ = compiled(x, x, x, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, expected)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SKETCHTUNE_RUN_SLOW"),
    reason="inductor builds C++ kernels (about 30 s on 2 cores); set SKETCHTUNE_RUN_SLOW=1",
)
def test_torch_compile_inductor_agrees_with_eager() -> None:
    layer = _layer(8)
    x = _randn(2, 10, E)
    with torch.no_grad():
        expected, _ = layer(x, x, x, is_causal=True, need_weights=False)
        try:
            out, _ = torch.compile(layer)(x, x, x, is_causal=True, need_weights=False)
        except Exception as exc:  # pragma: no cover - depends on the machine's C++ toolchain
            pytest.skip(f"inductor cannot build here: {type(exc).__name__}: {exc}")
    torch.testing.assert_close(out, expected)


def test_causal_mask_made_in_inference_mode() -> None:
    layer = _layer(8)
    x = _randn(2, 6, E)
    with torch.inference_mode():
        mask = nn.Transformer.generate_square_subsequent_mask(6)  # no version counter
        out, _ = layer(x, x, x, attn_mask=mask, need_weights=False)
        expected, _ = layer(x, x, x, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------------------------------
# Inside PyTorch's Transformer layers


def _swap(module: nn.Module, name: str, m: int = 16) -> RandMultiHeadAttention:
    dense = getattr(module, name)
    rand = RandMultiHeadAttention.from_dense(dense, num_random_features=m, seed=0)
    setattr(module, name, rand)
    return rand


def _encoder_layer() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.1, batch_first=True)


def _manual_encoder(layer: nn.TransformerEncoderLayer, x: Tensor, **attn: object) -> Tensor:
    sa = layer.self_attn(x, x, x, need_weights=False, **attn)[0]
    y = layer.norm1(x + sa)
    return layer.norm2(y + layer.linear2(layer.activation(layer.linear1(y))))


def test_encoder_layer_runs_our_forward_in_eval() -> None:
    layer = _encoder_layer().eval()
    x = _randn(2, 7, E)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    with torch.no_grad():
        dense_out = layer(x, src_key_padding_mask=pad)  # PyTorch's fused fast path
        _swap(layer, "self_attn")
        out = layer(x, src_key_padding_mask=pad)
        assert not torch.allclose(out, dense_out, atol=1e-3)
        torch.testing.assert_close(out, _manual_encoder(layer, x, key_padding_mask=pad))

        out = layer(x, src_mask=causal, is_causal=True, src_key_padding_mask=pad)
        expected = _manual_encoder(layer, x, attn_mask=causal, key_padding_mask=pad)
        torch.testing.assert_close(out, expected)
        assert torch.isfinite(out).all()


def test_encoder_layer_trains() -> None:
    layer = _encoder_layer().train()
    _swap(layer, "self_attn")
    x = _randn(2, 7, E)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 6] = True
    out = layer(x, src_mask=torch.ones(7, 7, dtype=torch.bool).triu(1), src_key_padding_mask=pad)
    out.sum().backward()
    assert layer.self_attn.in_proj_weight.grad is not None


def test_decoder_layer_with_causal_and_memory_padding() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=32, batch_first=True).eval()
    _swap(layer, "self_attn")
    _swap(layer, "multihead_attn")
    tgt, memory = _randn(2, 6, E), _randn(2, 9, E, seed=2)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(6)
    memory_pad = torch.zeros(2, 9, dtype=torch.bool)
    memory_pad[0, 7:] = True
    with torch.no_grad():
        out = layer(
            tgt, memory, tgt_mask=tgt_mask, tgt_is_causal=True, memory_key_padding_mask=memory_pad
        )
        x = layer.norm1(tgt + layer.self_attn(tgt, tgt, tgt, attn_mask=tgt_mask)[0])
        x = layer.norm2(x + layer.multihead_attn(x, memory, memory, key_padding_mask=memory_pad)[0])
        expected = layer.norm3(x + layer.linear2(layer.activation(layer.linear1(x))))
    torch.testing.assert_close(out, expected)

    layer.train()
    layer(tgt, memory, tgt_mask=tgt_mask, memory_key_padding_mask=memory_pad).sum().backward()
    assert layer.multihead_attn.in_proj_weight.grad is not None


def test_transformer_encoder_without_nested_tensors() -> None:
    encoder = nn.TransformerEncoder(_encoder_layer(), num_layers=2, enable_nested_tensor=False)
    for layer in encoder.layers:
        _swap(layer, "self_attn")
    encoder.eval()
    x = _randn(2, 7, E)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        out = encoder(x, src_key_padding_mask=pad)
        expected = x
        for layer in encoder.layers:
            expected = _manual_encoder(layer, expected, key_padding_mask=pad)
        causal_out = encoder(x, mask=torch.ones(7, 7, dtype=torch.bool).triu(1))
    torch.testing.assert_close(out, expected)
    assert torch.isfinite(causal_out).all()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_transformer_encoder_nested_fast_path_is_refused_clearly() -> None:
    with pytest.warns(UserWarning, match="enable_nested_tensor"):
        nn.TransformerEncoder(_encoder_layer_with_rand(), num_layers=1)
    # Swapped after construction, the encoder still believes nested tensors are fine.
    encoder = nn.TransformerEncoder(_encoder_layer(), num_layers=1)
    _swap(encoder.layers[0], "self_attn")
    encoder.eval()
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad(), pytest.raises(TypeError, match="NestedTensor"):
        encoder(_randn(2, 5, E), src_key_padding_mask=pad)


def _encoder_layer_with_rand() -> nn.TransformerEncoderLayer:
    layer = _encoder_layer()
    _swap(layer, "self_attn")
    return layer


def test_causal_normaliser_with_and_without_a_ones_column() -> None:
    from sketchtune.nn._favor import causal_attention as _causal_attention

    gen = torch.Generator().manual_seed(0)
    phi_q, phi_k = torch.rand(2, 11, 5, generator=gen), torch.rand(2, 11, 5, generator=gen)
    v = torch.randn(2, 11, 3, generator=gen)
    scores = (phi_q @ phi_k.transpose(1, 2)).tril()
    for chunk in (1, 4, 11):
        num, den = _causal_attention(phi_q, phi_k, v, chunk, 3)
        num1, den1 = _causal_attention(
            phi_q, phi_k, torch.cat([v, torch.ones(2, 11, 1)], -1), chunk, 3
        )
        torch.testing.assert_close(num, scores @ v)
        torch.testing.assert_close(den, scores.sum(-1, keepdim=True))
        torch.testing.assert_close(num1, num)
        torch.testing.assert_close(den1, den)
