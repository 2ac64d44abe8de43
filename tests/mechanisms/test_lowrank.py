"""lowrank (LAMA) attention pooling: the paper's formula, its limiting case, and pool properties.

"Low Rank Factorization for Compact Multi-Head Self-Attention" (Mehta et al., 2019). The naive
reference is written from the equations with the module's parameters, in float64:
    f_i^j = sum_r P[r, j] * sigma(U^T h_i)_r * sigma(V^T c)_r       (head j, token i)
    a^j   = softmax over the valid tokens of f^j                   (no valid token: a^j = 0)
    out   = [sum_i a_i^1 h_i ; ... ; sum_i a_i^h h_i]               (then Linear to out_dim if set)
The shared sequence property suite skips pooling mechanisms, so its pool analogues live here.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch.func import functional_call
from torch.testing import assert_close

import attnlab

DIM, HEADS, RANK = 32, 4, 8
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)


def lowrank(dtype=torch.float64, dim=DIM, heads=HEADS, **options):
    options = {"rank": RANK, **options}
    m = attnlab.create("lowrank", dim, heads, **options).to(dtype).eval()
    if m.proj is not None and m.proj.bias is not None:
        with torch.no_grad():
            m.proj.bias.normal_(0.0, 0.5)    # a visible bias, so "padded rows give zeros" means something
    return m


def naive_lowrank(m, x, attn_mask=None):
    B, N, C = x.shape
    sigma = torch.tanh if m.activation == "tanh" else (lambda t: t)
    U, V, P, c = m.word_proj.weight.T, m.context_proj.weight.T, m.head_weights, m.context   # (C,k) (C,k) (k,h) (C,)
    context = sigma(V.T @ c)                                                  # (k,)
    words = sigma(torch.einsum("ck,bnc->bnk", U, x))                          # (B, N, k)
    f = torch.einsum("rj,bnr,r->bjn", P, words, context)                      # (B, h, N)
    valid = torch.ones(B, N, dtype=torch.bool)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            valid = valid & attn_mask
        else:
            f = f + attn_mask[:, None, :]
            valid = valid & (attn_mask != float("-inf"))
    f = f.masked_fill(~valid[:, None, :], float("-inf"))
    any_valid = valid.any(-1)                                                 # (B,)
    a = f.masked_fill(~any_valid[:, None, None], 0.0).softmax(-1) * any_valid[:, None, None]
    heads = [torch.einsum("bn,bnc->bc", a[:, j], x) for j in range(m.num_heads)]
    out = torch.cat(heads, dim=-1)                                            # (B, h C)
    if m.proj is not None:
        out = (out @ m.proj.weight.T + (0 if m.proj.bias is None else m.proj.bias)) * any_valid[:, None]
    return out


def make_mask(kind, B, N):
    if kind is None:
        return None
    valid = torch.rand(B, N) > 0.4
    valid[:, 0] = True
    valid[1] = False                         # one sample is all padding
    if kind == "bool":
        return valid
    return torch.zeros(B, N, dtype=torch.float64).masked_fill(~valid, float("-inf")) + torch.randn(B, N).double()


CONFIGS = {"tanh": dict(), "identity": dict(activation="identity"), "out_dim": dict(out_dim=10),
           "rank_gt_dim": dict(rank=40, heads=3)}


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"], ids=["nomask", "bool", "float"])
@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_matches_naive_reference_outputs_and_grads(cfg, mask_kind):
    m = lowrank(**cfg)
    B, N = 3, 7
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = make_mask(mask_kind, B, N)
    y = m(x, attn_mask=mask)
    y_ref = naive_lowrank(m, x, mask)
    assert y.shape == (B, m.out_dim)
    assert_close(y, y_ref, **TIGHT)
    cot = torch.randn_like(y)
    params = list(m.parameters())
    grads = torch.autograd.grad((y * cot).sum(), [x, *params])
    grads_ref = torch.autograd.grad((y_ref * cot).sum(), [x, *params])
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, **GRAD)


def test_scores_are_the_affinities():
    m = lowrank()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    sigma = torch.tanh
    f = torch.einsum("rj,bnr,r->bjn", m.head_weights, sigma(m.word_proj(x)), sigma(m.context_proj(m.context)))
    assert_close(m.scores(x), f, **TIGHT)


# --- limiting cases ----------------------------------------------------------------------------

def test_identity_single_head_full_rank_is_bilinear_context_attention():
    """sigma = identity, one head, U = I, P = 1, V^T = W: f_i = h_i^T W c, plain bilinear attention
    pooling with a global context vector."""
    m = lowrank(heads=1, rank=DIM, activation="identity")
    W = torch.randn(DIM, DIM, dtype=torch.float64) / DIM ** 0.5
    with torch.no_grad():
        m.word_proj.weight.copy_(torch.eye(DIM))
        m.head_weights.fill_(1.0)
        m.context_proj.weight.copy_(W)        # context_proj(c) = V^T c = W c
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    f = torch.einsum("bnc,ce,e->bn", x, W, m.context)                         # h_i^T W c
    expected = torch.einsum("bn,bnc->bc", f.softmax(-1), x)
    assert_close(m(x), expected, **TIGHT)


def test_identity_heads_are_rank_k_bilinear_forms():
    """With sigma = identity, head j scores h_i^T W_j c with W_j = U diag(P_j) V^T of rank <= k:
    h distinct distributions from shared factors and one k-vector per head."""
    k = 3
    m = lowrank(heads=HEADS, rank=k, activation="identity")
    U, V = m.word_proj.weight.T, m.context_proj.weight.T                    # (C, k) each
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    for j in range(HEADS):
        W_j = U @ torch.diag(m.head_weights[:, j]) @ V.T                     # (C, C)
        assert torch.linalg.matrix_rank(W_j) <= k
        assert_close(m.scores(x)[:, j], torch.einsum("bnc,ce,e->bn", x, W_j, m.context), **TIGHT)
    # the heads' distributions differ
    probs = m.scores(x).softmax(-1)
    assert not torch.allclose(probs[:, 0], probs[:, 1])


def test_parameter_count():
    C, h, k = DIM, HEADS, RANK
    m = lowrank()
    assert sum(p.numel() for p in m.parameters()) == 2 * C * k + C + k * h     # U, V, c, P
    m = lowrank(out_dim=10)
    assert sum(p.numel() for p in m.parameters()) == 2 * C * k + C + k * h + h * C * 10 + 10


# --- pool properties ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B,N", [(2, 7), (0, 5), (3, 1), (2, 0)])
@pytest.mark.parametrize("out_dim", [None, 10])
def test_shape_and_dtype(dtype, B, N, out_dim):
    m = lowrank(dtype=dtype, out_dim=out_dim)
    y = m(torch.randn(B, N, DIM, dtype=dtype))
    assert y.shape == (B, HEADS * DIM if out_dim is None else out_dim)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    if N == 0:
        assert torch.equal(y, torch.zeros_like(y))            # nothing to pool: zeros


@pytest.mark.parametrize("out_dim", [None, 10])
def test_padded_tokens_have_no_effect(out_dim):
    m = lowrank(out_dim=out_dim)
    B, N = 3, 8
    valid = torch.rand(B, N) > 0.4
    valid[:, 0] = True
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[~valid] = 1e3 * torch.randn(int((~valid).sum()), DIM, dtype=torch.float64)
    assert_close(m(x2, attn_mask=valid), m(x, attn_mask=valid), **TIGHT)
    assert not torch.allclose(m(x2), m(x))                    # without the mask the change shows
    # and padding is the same as dropping the padded tokens
    for b in range(B):
        assert_close(m(x, attn_mask=valid)[b], m(x[b:b + 1, valid[b]])[0], **TIGHT)


@pytest.mark.parametrize("out_dim", [None, 10])
def test_fully_padded_sample_gives_zeros_and_finite_grads(out_dim):
    m = lowrank(out_dim=out_dim)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[1] = False
    x = torch.randn(3, 5, DIM, dtype=torch.float64, requires_grad=True)
    y = m(x, attn_mask=valid)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert_close(y[[0, 2]], m(x[[0, 2]].detach(), attn_mask=valid[[0, 2]]), **TIGHT)
    grads = torch.autograd.grad((y * torch.randn_like(y)).sum(), [x, *m.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_batch_invariance(masked):
    m = lowrank(dtype=torch.float32, out_dim=10)
    B, N = 4, 7
    x = torch.randn(B, N, DIM)
    valid = (torch.rand(B, N) > 0.4) | (torch.arange(N) == 0) if masked else None
    y = m(x, attn_mask=valid)
    for i in range(B):
        yi = m(x[i:i + 1], attn_mask=None if valid is None else valid[i:i + 1])
        assert_close(y[i:i + 1], yi, rtol=1e-5, atol=1e-6)


def test_permutation_invariance():
    m = lowrank()
    B, N = 3, 9
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    valid = torch.rand(B, N) > 0.3
    valid[:, 0] = True
    perm = torch.randperm(N)
    assert_close(m(x[:, perm], attn_mask=valid[:, perm]), m(x, attn_mask=valid), **TIGHT)


def test_bf16_close_to_float32():
    m16 = lowrank(dtype=torch.bfloat16, out_dim=10)
    m32 = lowrank(dtype=torch.float32, out_dim=10)
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    x = torch.randn(2, 11, DIM, dtype=torch.bfloat16)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, 6:] = False
    y16 = m16(x, attn_mask=valid)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert_close(y16.float(), m32(x.float(), attn_mask=valid), rtol=2e-2, atol=2e-2)


def test_backends_agree():
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    valid = make_mask("bool", 2, 6)
    m = lowrank(out_dim=10)
    outs = []
    for backend in ("sdpa", "reference"):
        m.backend = backend
        outs.append(m(x, attn_mask=valid))
    assert_close(outs[0], outs[1], **TIGHT)


def test_registered_as_pooling():
    spec = attnlab.get_spec("lowrank")
    assert spec.layout == "pool" and spec.attn_mask and not spec.causal and not spec.kv_cache
    assert spec not in attnlab.list_specs(layout="seq")
    assert spec in attnlab.list_specs(layout="pool")


# --- gradcheck ---------------------------------------------------------------------------------

@pytest.mark.parametrize("out_dim", [None, 3])
def test_gradcheck(out_dim):
    m = lowrank(dim=4, heads=2, rank=3, out_dim=out_dim)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, False, True, True], [False] * 4, [True, True, True, False]])
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())

    def fn(x, *ps):
        return functional_call(m, dict(zip(names, ps)), (x,), dict(attn_mask=valid))

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options,error,words", [
    (dict(rank=0), ValueError, ["rank", "0"]),
    (dict(rank=True), ValueError, ["rank", "True"]),
    (dict(rank=2.5), ValueError, ["rank", "2.5"]),
    (dict(out_dim=-1), ValueError, ["out_dim", "-1"]),
    (dict(activation="relu"), ValueError, ["activation", "tanh", "relu"]),
    (dict(attn_drop=1.5), ValueError, ["attn_drop", "1.5"]),
])
def test_bad_options_raise(options, error, words):
    with pytest.raises(error) as info:
        attnlab.create("lowrank", DIM, HEADS, **options)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("dim,heads,bad", [(0, 4, "dim"), (32, 0, "num_heads"), (32, -2, "num_heads")])
def test_bad_dims_raise(dim, heads, bad):
    with pytest.raises(ValueError, match=f"lowrank: {bad} must be a positive int, got {min(dim, heads)}"):
        attnlab.create("lowrank", dim, heads)


def test_heads_need_not_divide_dim():
    m = lowrank(heads=3)                       # every head pools full-width tokens
    assert m(torch.randn(2, 5, DIM, dtype=torch.float64)).shape == (2, 3 * DIM)


def test_bad_input_raises():
    m = lowrank()
    with pytest.raises(ValueError, match=r"lowrank.*\(B, N, C=32\).*\(5, 32\)"):
        m(torch.randn(5, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="lowrank.*32.*31"):
        m(torch.randn(2, 5, DIM - 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="lowrank.*float.*int64"):
        m(torch.zeros(2, 5, DIM, dtype=torch.int64))
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    for shape in [(2, 6), (3, 5), (2, 1, 1, 5), (5,)]:
        with pytest.raises(ValueError, match=re.escape("(B, N) = (2, 5)") + ".*" + re.escape(repr(shape))):
            m(x, attn_mask=torch.ones(shape, dtype=torch.bool))
    with pytest.raises(TypeError, match="int64"):
        m(x, attn_mask=torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="list"):
        m(x, attn_mask=[[True] * 5] * 2)
    nan_mask = torch.zeros(2, 5, dtype=torch.float64)
    nan_mask[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m(x, attn_mask=nan_mask)
    with pytest.raises(NotImplementedError, match="lowrank.*causal"):
        m(x, is_causal=True)                      # pooling has no causal mode
