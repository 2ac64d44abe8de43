"""mhsa(softmax="edgemoe"): attention with the Edge-MoE single-pass softmax (ICCAD 2023).

The naive reference is written here from the formulas with the module's own weights, in
float64: scores = Q K^T / sqrt(d) (+ mask), probabilities from the paper's streaming recurrence
in 22-fractional-bit fixed point (one key per step: new max -> S = q(S exp(b - x)) + 1, else
S += q(exp(x - b)); p = q(q(exp(x - b)) q(1 / S))), then P V and the output projection.

Measured (float64, N(0, 1) tokens, B=2, N=9, C=32): |mhsa(edgemoe) - mhsa(exact)| <= 6.6e-7,
asserted with atol 1e-6; input gradients differ by <= 1.6e-6 (atol 3e-6). Against the naive
reference: outputs equal (atol 4u allowed), gradients within 3.6e-6 (atol 6e-6); with grouped
queries + QK-norm 4.1e-7 (atol 1e-6); a Block with both approximations 1.03e-4 (atol 2e-4).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab import KVCache

DIM, HEADS = 32, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)
U = 2.0 ** -22


def mhsa(dtype=torch.float64, softmax="edgemoe", **options):
    torch.manual_seed(0)
    m = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True, softmax=softmax, **options)
    return m.to(dtype).eval()


def q(t):
    return torch.floor(t / U) * U


def streaming_softmax(scores):
    """The paper's recurrence over the last axis, one key per step (rows vectorised); -inf = masked."""
    x = q(scores)
    bias = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype)
    total = torch.zeros(x.shape[:-1], dtype=x.dtype)
    for j in range(x.shape[-1]):
        xj = x[..., j]
        new = xj > bias
        first = new & (bias == float("-inf"))
        rescale = torch.where(first, torch.zeros_like(xj), q(torch.exp(bias - xj)))
        grown = q(total * rescale) + 1.0                                    # S = S e^(b - x) + 1
        added = total + torch.where(xj == float("-inf"), torch.zeros_like(xj),
                                    q(torch.exp(xj - bias)))                # S = S + e^(x - b)
        total = torch.where(new, grown, added)
        bias = torch.where(new, xj, bias)
    recip = torch.where(total > 0, q(1.0 / total), torch.zeros_like(total))
    return q(q(torch.exp(x - bias[..., None])) * recip[..., None]).nan_to_num(0.0)


def naive_mhsa_edgemoe(m, x, valid=None, is_causal=False):
    """valid: None or (B, M) bool key padding. Rows with no allowed key attend to nothing (zeros).

    The fixed-point probabilities enter as constants (straight-through): gradients are those of
    exact softmax attention at the same scores, which the module's match up to O(|p - p_hat|).
    """
    B, N, C = x.shape
    h, d = HEADS, C // HEADS
    qkv = x @ m.qkv.weight.T + m.qkv.bias
    qh, kh, vh = qkv.reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)             # 3 x (B, h, N, d)
    scores = torch.einsum("bhnd,bhmd->bhnm", qh, kh) / math.sqrt(d)             # (B, h, N, N)
    allowed = torch.ones(B, 1, N, N, dtype=torch.bool)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    if is_causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    exact = torch.softmax(scores.masked_fill(~has_key, 0.0), -1) * has_key
    fixed = streaming_softmax(scores.detach()) * has_key
    probs = exact + (fixed - exact).detach()
    out = torch.einsum("bhnm,bhmd->bhnd", probs, vh)                            # (B, h, N, d)
    out = out.transpose(1, 2).reshape(B, N, C)
    return out @ m.proj.weight.T + m.proj.bias


@pytest.mark.parametrize("case", ["full", "causal", "padding", "padding_causal"])
def test_matches_naive_reference(case):
    m = mhsa()
    B, N = 2, 7
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True] * N, [True, False, True, True, False, True, False]]) if "padding" in case else None
    causal = "causal" in case
    y = m(x, attn_mask=valid, is_causal=causal)
    ref = naive_mhsa_edgemoe(m, x, valid, causal)
    assert_close(y, ref, rtol=0, atol=4 * U)      # same fixed-point probabilities, float64 rest
    g = torch.randn_like(y)
    params = [x, *m.parameters()]
    grads = torch.autograd.grad((y * g).sum(), params)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, rtol=0, atol=6e-6)


def test_close_to_exact_mhsa():
    m_exact = mhsa(softmax="exact")
    m_edge = mhsa()
    assert_close(dict(m_edge.state_dict()), dict(m_exact.state_dict()), rtol=0, atol=0)
    x = torch.randn(2, 9, DIM, dtype=torch.float64, requires_grad=True)
    for kw in (dict(), dict(is_causal=True), dict(attn_mask=torch.rand(2, 9) > 0.3, is_causal=True)):
        y_exact, y_edge = m_exact(x, **kw), m_edge(x, **kw)
        assert_close(y_edge, y_exact, rtol=0, atol=1e-6)
        (g_exact,) = torch.autograd.grad(y_exact.pow(2).sum(), x)
        (g_edge,) = torch.autograd.grad(y_edge.pow(2).sum(), x)
        assert_close(g_edge, g_exact, rtol=0, atol=3e-6)
    # the approximation is visible: not bit-identical to exact attention
    assert not torch.equal(m_edge(x), m_exact(x))


def test_default_path_unchanged():
    torch.manual_seed(0)
    default = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True).double().eval()
    explicit = mhsa(softmax="exact")
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    assert torch.equal(default(x), explicit(x))
    assert default.softmax == "exact" and "softmax" not in repr(default)
    assert "softmax='edgemoe'" in repr(mhsa())


def test_grouped_query_and_qk_norm():
    m = mhsa(num_kv_heads=2, qk_norm=True)
    m_exact = copy.deepcopy(m)
    m_exact.softmax = "exact"
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    assert_close(m(x, is_causal=True), m_exact(x, is_causal=True), rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunks", [[1] * 7, [3, 1, 3], [7]], ids=["token_by_token", "3+1+3", "all_at_once"])
def test_kv_cache_decode_matches_full_forward(chunks):
    m = mhsa()
    x = torch.randn(2, sum(chunks), DIM, dtype=torch.float64)
    full = m(x, is_causal=True)
    cache, outs, start = KVCache(), [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(m(x[:, start:start + n], is_causal=True, cache=cache))
            start += n
    assert_close(torch.cat(outs, 1), full, **TIGHT)


def test_causal_no_leak_and_masked_keys_no_effect():
    m = mhsa()
    x = torch.randn(2, 8, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 5:] = 3 * torch.randn(2, 3, DIM, dtype=torch.float64)
    assert_close(m(x2, is_causal=True)[:, :5], m(x, is_causal=True)[:, :5], **TIGHT)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, 2] = valid[1, 6] = False
    x3 = x.clone()
    x3[~valid] = 1e3 * torch.randn(2, DIM, dtype=torch.float64)
    float_mask = torch.zeros(2, 8, dtype=torch.float64).masked_fill(~valid, float("-inf"))
    for mask in (valid, float_mask):
        assert_close(m(x3, attn_mask=mask)[valid], m(x, attn_mask=mask)[valid], **TIGHT)
    assert_close(m(x, attn_mask=float_mask), m(x, attn_mask=valid), **TIGHT)


def test_fully_masked_rows_output_proj_bias_without_nan():
    m = mhsa()
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1] = False
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    y = m(x, attn_mask=valid, is_causal=True)
    assert_close(y[1], m.proj.bias.detach().expand(5, DIM), rtol=0, atol=0)   # zero attention output
    y.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dtype_kept_and_close_to_float64(dtype):
    m = mhsa(dtype=dtype)
    x = torch.randn(2, 6, DIM).to(dtype)
    y = m(x, is_causal=True)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y64 = copy.deepcopy(m).double()(x.double(), is_causal=True)
    assert_close(y.double(), y64, rtol=2e-2, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("B,N", [(0, 4), (2, 1)])
def test_empty_batch_and_single_token(B, N):
    m = mhsa()
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    y = m(x, is_causal=True)
    assert y.shape == x.shape and torch.isfinite(y).all()
    if N == 1:  # a single key: probability exactly 1, attention output = v
        assert_close(y, mhsa(softmax="exact")(x), rtol=0, atol=1e-12)


def test_attention_dropout_in_training_only():
    m = mhsa(attn_drop=0.5)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    assert torch.equal(m(x), m(x))                       # eval: deterministic
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.equal(a, m(x))


def test_block_and_activation_options():
    torch.manual_seed(0)
    block = attnlab.Block(DIM, HEADS, softmax="edgemoe", act="gelu_edgemoe").double()
    assert block.attn.softmax == "edgemoe"
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    exact = copy.deepcopy(block)
    exact.attn.softmax = "exact"
    exact.mlp.act = torch.nn.GELU()
    assert_close(block(x, is_causal=True), exact(x, is_causal=True), rtol=0, atol=2e-4)


def test_bad_softmax_value_lists_choices():
    with pytest.raises(ValueError, match=r"softmax must be one of \['edgemoe', 'exact'\], got 'fast'"):
        attnlab.create("mhsa", DIM, HEADS, softmax="fast")
    with pytest.raises(ValueError, match="softmax must be one of"):
        attnlab.create("mhsa", DIM, HEADS, softmax=None)
    with pytest.raises(ValueError, match="backend='sdpa'"):
        attnlab.create("mhsa", DIM, HEADS, softmax="edgemoe", backend="sdpa")


def test_bad_input_still_checked():
    m = mhsa()
    with pytest.raises(ValueError, match="mhsa"):
        m(torch.randn(2, 5, DIM - 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        m(torch.randn(2, 5, DIM, dtype=torch.float64), attn_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="int64"):
        m(torch.randn(2, 5, DIM, dtype=torch.float64), attn_mask=torch.ones(2, 5, dtype=torch.int64))
