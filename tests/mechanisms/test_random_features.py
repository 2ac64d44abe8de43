"""random_features against the paper's sum over heads and keys, the frozen part, seeds and means.

The reference is written from the random-feature attention model of Fu, Guo, Bai and Mei (2023):
    f_c(x_0; x_1..x_N) = sum_m sum_i a_i(x_0^T W_m x_i * scale) <v_{m,c}, x_i>
with a_i = ReLU(.) / N (relu) or softmax over i (softmax), as plain Python loops over heads and
keys in float64 with the module's W_m (buffer) and v_m (rows of the value Linear). It shares no
code with attnlab. The paper's own form (scale 1 with ReLU / N, the default) is also checked
without reading the module's scale.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab import KVCache

DIM, HEADS = 8, 5           # heads need not divide the width: each W_m acts on the whole token
TIGHT = dict(rtol=1e-10, atol=1e-12)


def build(dim=DIM, heads=HEADS, dtype=torch.float64, **options):
    options.setdefault("seed", 0)
    return attnlab.create("random_features", dim, heads, **options).to(dtype).eval()


def paper_f(m, x0, keys):
    """The paper's model for one query x0 (C,) and keys (N, C): a C-vector, loops only."""
    C = x0.shape[0]
    N = keys.shape[0]
    out = torch.zeros(C, dtype=x0.dtype)
    for mh in range(m.num_heads):
        W = m.qk_weight[mh]                                                   # the paper's W_m
        s = torch.stack([x0 @ W @ keys[i] for i in range(N)]) * m.scale       # x_0^T W_m x_i
        a = torch.relu(s) / N if m.activation == "relu" else torch.exp(s) / torch.exp(s).sum()
        V_m = m.value.weight[:, mh * C:(mh + 1) * C]                         # (C_out, C): rows are v_{m,c}
        for i in range(N):
            out = out + a[i] * (V_m @ keys[i])
    if m.value.bias is not None:
        out = out + m.value.bias
    return out


def naive(m, x, allowed):
    """Every position as the query over its allowed keys: allowed (B, N, N) bool."""
    B, N, C = x.shape
    rows = []
    for b in range(B):
        row = []
        for i in range(N):
            keys = x[b][allowed[b, i]]
            if keys.shape[0] == 0:        # no key: a zero attention output, then the value layer
                row.append(torch.zeros(C, dtype=x.dtype) + (0 if m.value.bias is None else m.value.bias))
            else:
                row.append(paper_f(m, x[b, i], keys))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def grads(fn, leaves):
    y = fn()
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    return y, torch.autograd.grad((y * w).sum(), leaves)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
@pytest.mark.parametrize("case", ["full", "causal", "causal_padding"])
def test_matches_the_paper_formula_outputs_and_grads(activation, case):
    m = build(activation=activation, qk_mean=0.5, value_bias=True)
    B, N = 2, 5
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    allowed = torch.ones(B, N, N, dtype=torch.bool)
    mask = None
    if case != "full":
        allowed &= torch.ones(N, N, dtype=torch.bool).tril()
    if case == "causal_padding":
        mask = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 1, 1]], dtype=torch.bool)
        allowed &= mask[:, None, :]
    leaves = [x, m.value.weight, m.value.bias]
    y, g = grads(lambda: m(x, attn_mask=mask, is_causal=case != "full"), leaves)
    y_ref, g_ref = grads(lambda: naive(m, x, allowed), leaves)
    assert_close(y, y_ref, **TIGHT)
    for a, b in zip(g, g_ref):
        assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_single_query_of_the_paper_is_one_output_position(activation):
    """f(x_0; x_1..x_N): x_0 appended after the keys, hidden from the keys, read at position N."""
    m = build(activation=activation, qk_mean=1.0, scale=1.0, qk_std=0.3)
    B, N = 3, 6
    X = torch.randn(B, N, DIM, dtype=torch.float64)
    x0 = torch.randn(B, DIM, dtype=torch.float64)
    seq = torch.cat([X, x0[:, None]], dim=1)                                 # (B, N + 1, C)
    valid = torch.ones(B, N + 1, dtype=torch.bool)
    valid[:, N] = False
    y = m(seq, attn_mask=valid)[:, N]                                       # (B, C)
    ref = torch.stack([paper_f(m, x0[b], X[b]) for b in range(B)])
    assert_close(y, ref, **TIGHT)
    # permutation invariance in the keys, as the paper's function class
    perm = torch.randperm(N)
    y_perm = m(torch.cat([X[:, perm], x0[:, None]], dim=1), attn_mask=valid)[:, N]
    assert_close(y_perm, y, **TIGHT)


def test_default_is_the_papers_score_outputs_and_grads():
    """create() at its defaults against the paper's f(x_0; X) = sum_m (1/N) sum_i ReLU(x_0^T W_m x_i)
    V_m x_i: no 1/sqrt(d), W_m as stored, written here without the module's scale."""
    m = attnlab.create("random_features", DIM, HEADS, seed=0).double()
    assert m.activation == "relu" and m.scale == 1.0
    B, N = 2, 5
    X = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(B, DIM, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([True] * N + [False])

    def paper():
        W, V = m.qk_weight, m.value.weight.view(DIM, HEADS, DIM)              # V[:, m] is V_m
        s = torch.einsum("bc,mcd,bnd->bmn", x0, W, X)                         # x_0^T W_m x_i
        return torch.einsum("bmn,kmc,bnc->bk", torch.relu(s) / N, V, X)       # (B, C)

    leaves = [X, x0, m.value.weight]
    y, g = grads(lambda: m(torch.cat([X, x0[:, None]], 1), attn_mask=valid)[:, N], leaves)
    y_ref, g_ref = grads(paper, leaves)
    assert_close(y, y_ref, **TIGHT)
    for a, b in zip(g, g_ref):
        assert_close(a, b, **TIGHT)


def test_query_key_matrix_is_stored_as_the_paper_writes_it():
    """qk_weight[m] = W_m with the query on the left: W = E_01 scores x_0[0] * x_i[1], not x_0[1] * x_i[0]."""
    m = build(heads=1, qk_std=0.0)
    with torch.no_grad():
        m.qk_weight.zero_()
        m.qk_weight[0, 0, 1] = 1.0
    x = torch.randn(1, 2, DIM, dtype=torch.float64)
    s = torch.relu(x[0, :, 0, None] * x[0, None, :, 1]) / 2                  # (query, key): x_q[0] x_k[1]
    assert_close(m.features(x)[0], s @ x[0], **TIGHT)


def test_relu_weights_are_averaged_not_normalised():
    """ReLU(s)/N: scaling the scores (qk_mean with qk_std=0) scales the output linearly."""
    a = build(qk_mean=1.0, qk_std=0.0)
    b = build(qk_mean=3.0, qk_std=0.0)
    with torch.no_grad():
        b.value.weight.copy_(a.value.weight)
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    assert_close(b(x), 3.0 * a(x), **TIGHT)
    # identity mean, no noise: phi_m(x_i) = (1/N) sum_j ReLU(<x_i, x_j>) x_j for every head (scale 1)
    s = torch.relu(torch.einsum("bic,bjc->bij", x, x)) / 4
    phi = torch.einsum("bij,bjc->bic", s, x)
    assert_close(a.features(x), phi.repeat(1, 1, HEADS), **TIGHT)


# --- the frozen part ---------------------------------------------------------------------------

def test_query_key_matrices_are_frozen_buffers():
    m = build(dtype=torch.float32)
    names = [n for n, _ in m.named_parameters()]
    assert names == ["value.weight"]
    assert all(p is not m.qk_weight for p in m.parameters())
    assert "qk_weight" in dict(m.named_buffers()) and "qk_weight" in m.state_dict()
    assert m.qk_weight.shape == (HEADS, DIM, DIM) and not m.qk_weight.requires_grad
    before = m.qk_weight.clone()
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    x = torch.randn(2, 6, DIM)
    for _ in range(2):
        opt.zero_grad()
        loss = m(x, is_causal=True).square().mean()
        loss.backward()
        opt.step()
    assert m.qk_weight.grad is None
    assert m.value.weight.grad is not None
    assert torch.equal(m.qk_weight, before)                                 # the optimizer never saw it
    assert all(p is m.value.weight for p in opt.state)
    # the output is linear in the trainable parameters: a random-features model
    x = torch.randn(1, 4, DIM)
    w1, w2 = torch.randn_like(m.value.weight), torch.randn_like(m.value.weight)
    outs = []
    for w in (w1, w2, w1 + 2 * w2):
        with torch.no_grad():
            m.value.weight.copy_(w)
            outs.append(m(x))
    assert_close(outs[2], outs[0] + 2 * outs[1], rtol=1e-5, atol=1e-5)


def test_seed_reproducible_and_independent_of_global_rng():
    torch.manual_seed(1)
    a = attnlab.create("random_features", DIM, HEADS, seed=7)
    torch.manual_seed(2)
    b = attnlab.create("random_features", DIM, HEADS, seed=7)
    c = attnlab.create("random_features", DIM, HEADS, seed=8)
    assert torch.equal(a.qk_weight, b.qk_weight)
    assert not torch.equal(a.qk_weight, c.qk_weight)
    d64 = attnlab.create("random_features", DIM, HEADS, seed=7, dtype=torch.float64)
    assert_close(d64.qk_weight.float(), a.qk_weight, rtol=0, atol=0)         # same draw in every dtype
    # seed=None draws from the global RNG: reproducible with torch.manual_seed
    torch.manual_seed(3)
    e = attnlab.create("random_features", DIM, HEADS)
    torch.manual_seed(3)
    f = attnlab.create("random_features", DIM, HEADS)
    assert torch.equal(e.qk_weight, f.qk_weight)


def test_mean_and_std_of_the_random_matrices():
    C, M = 16, 400
    m = attnlab.create("random_features", C, M, qk_mean=0.7, seed=0, dtype=torch.float64)
    W = m.qk_weight                                                         # (M, C, C)
    eye = torch.eye(C, dtype=torch.bool)
    diag, off = W[:, eye], W[:, ~eye]
    # M * C entries on the diagonal, M * C (C - 1) off it: standard errors ~ 0.0016 and 0.0004
    assert_close(diag.mean().item(), 0.7, rtol=0, atol=0.01)
    assert_close(off.mean().item(), 0.0, rtol=0, atol=0.003)
    assert_close(off.std().item(), 1 / math.sqrt(C), rtol=0.02, atol=0)
    assert_close((diag - 0.7).std().item(), 1 / math.sqrt(C), rtol=0.05, atol=0)
    exact = attnlab.create("random_features", C, 3, qk_mean=2.0, qk_std=0.0, seed=0, dtype=torch.float64)
    assert torch.equal(exact.qk_weight, 2.0 * torch.eye(C, dtype=torch.float64).expand(3, C, C))
    wide = attnlab.create("random_features", C, 2, qk_std=2.0, seed=0, dtype=torch.float64)
    assert_close(wide.qk_weight.std().item(), 2.0, rtol=0.1, atol=0)


# --- attention features ------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_kv_cache_decode_matches_full_causal_forward(activation):
    m = build(activation=activation, qk_mean=1.0)
    B, N = 2, 7
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    valid = torch.rand(B, N) > 0.3
    valid[:, 0] = True
    full = m(x, attn_mask=valid, is_causal=True)
    cache, outs, start = KVCache(), [], 0
    for n in (3, 1, 3):
        end = start + n
        outs.append(m(x[:, start:end], attn_mask=valid[:, :end], is_causal=True, cache=cache))
        start = end
    assert len(cache) == N and cache.keys.shape == (B, 1, N, DIM)           # x once, shared by all heads
    assert_close(torch.cat(outs, dim=1), full, **TIGHT)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_masks_fully_masked_rows_and_float_masks(activation):
    m = build(activation=activation, value_bias=True)
    B, N = 3, 5
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1] = False
    valid[2, 2:] = False
    y = m(x, attn_mask=valid, is_causal=True)
    assert torch.isfinite(y).all()
    assert_close(y[1], m.value.bias.detach().expand(N, DIM), rtol=0, atol=0)
    g = torch.autograd.grad(y.sum(), [x, m.value.weight])
    assert all(torch.isfinite(t).all() for t in g)
    pattern = torch.rand(B, 1, N, N) > 0.5
    pattern[..., 0] = True
    as_float = torch.zeros(pattern.shape, dtype=torch.float64).masked_fill(~pattern, float("-inf"))
    assert_close(m(x, attn_mask=as_float), m(x, attn_mask=pattern), **TIGHT)


def test_relu_float_mask_is_added_to_the_scores():
    m = build(qk_mean=1.0)
    x = torch.randn(1, 4, DIM, dtype=torch.float64)
    bias = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    q = torch.einsum("bnc,mcd->bmnd", x, m.qk_weight)                        # x_i^T W_m
    s = torch.einsum("bmnd,bkd->bmnk", q, x) * m.scale + bias
    phi = torch.einsum("bmnk,bkc->bmnc", torch.relu(s) / 4, x)
    ref = m.value(phi.transpose(1, 2).reshape(1, 4, HEADS * DIM))
    assert_close(m(x, attn_mask=bias), ref, **TIGHT)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_gradcheck(activation):
    m = build(dim=4, heads=3, activation=activation, qk_mean=1.0)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: m(x, attn_mask=valid, is_causal=True), (x,))


def test_many_heads_wider_than_the_token():
    """M > C heads (the random-features regime) is allowed; dtype is kept."""
    m = attnlab.create("random_features", 4, 64, seed=0)
    y = m(torch.randn(2, 5, 4), is_causal=True)
    assert y.shape == (2, 5, 4) and y.dtype == torch.float32
    yb = m.to(torch.bfloat16)(torch.randn(2, 5, 4, dtype=torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()


@pytest.mark.parametrize("options,error,match", [
    (dict(activation="gelu"), ValueError, "gelu"),
    (dict(qk_mean=float("nan")), ValueError, "qk_mean"),
    (dict(qk_mean="1"), ValueError, "qk_mean"),
    (dict(qk_std=-0.1), ValueError, "qk_std"),
    (dict(qk_std=float("inf")), ValueError, "qk_std"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(attn_drop=1.0), ValueError, "attn_drop"),
    (dict(backend="sdpa"), ValueError, "softmax"),
])
def test_bad_options_raise_at_create(options, error, match):
    with pytest.raises(error, match=match):
        attnlab.create("random_features", DIM, HEADS, **options)


@pytest.mark.parametrize("dim,heads", [(0, 4), (8, 0), (8, -2), (8, True)])
def test_bad_dims_raise(dim, heads):
    with pytest.raises(ValueError, match="must be a positive int"):
        attnlab.create("random_features", dim, heads)


def test_bad_input_raises():
    m = build()
    with pytest.raises(ValueError, match=r"random_features.*\(2, 5, 7\)"):
        m(torch.randn(2, 5, DIM - 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="float"):
        m(torch.zeros(2, 5, DIM, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        m(torch.randn(2, 5, DIM, dtype=torch.float64), attn_mask=torch.ones(2, 6, dtype=torch.bool))
