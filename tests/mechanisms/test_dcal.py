"""glca and pwca (DCAL, CVPR 2022) against a naive float64 reference of the paper's Eqs. (3) and (4).

The reference below loops over batch and heads with the modules' own weights (timm layout:
qkv = Linear(C, 3C) as [W_Q | W_K | W_V], proj), masks written out as -inf with empty rows set to
zero; it shares no code with attnlab. Limiting cases tie both to plain self-attention (`mhsa`
with the same weights), and glca to `cross_mhsa` where that mechanism is registered.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import attnlab

DIM, HEADS = 32, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)


def build(name, dtype=torch.float64, **options):
    return attnlab.create(name, DIM, HEADS, **{"qkv_bias": True, **options}).to(dtype).eval()


def naive_attention(m, queries, keys, allowed=None):
    """softmax(q k^T * scale) v per head, concatenated, projected. queries (B, N, C) give q,
    keys (B, M, C) give k and v; allowed: bool (B, N, M) or None. An empty row gives 0."""
    B, N, C = queries.shape
    M = keys.shape[1]
    h, d = m.num_heads, C // m.num_heads
    W, b = m.qkv.weight, m.qkv.bias
    bias = (lambda i: b[i * C:(i + 1) * C]) if b is not None else (lambda i: 0.0)
    q = queries @ W[:C].T + bias(0)
    k = keys @ W[C:2 * C].T + bias(1)
    v = keys @ W[2 * C:].T + bias(2)
    scale = 1.0 / math.sqrt(d) if m.scale is None else m.scale
    rows = []
    for bi in range(B):
        heads = []
        for hi in range(h):
            sl = slice(hi * d, (hi + 1) * d)
            scores = q[bi, :, sl] @ k[bi, :, sl].T * scale                     # (N, M)
            if allowed is not None:
                scores = scores.masked_fill(~allowed[bi], float("-inf"))
            out = torch.zeros(N, d, dtype=queries.dtype)
            for n in range(N):
                if allowed is None or allowed[bi, n].any():
                    out[n] = torch.softmax(scores[n], dim=-1) @ v[bi, :, sl]
            heads.append(out)
        rows.append(torch.cat(heads, dim=-1))
    out = torch.stack(rows) @ m.proj.weight.T
    return out if m.proj.bias is None else out + m.proj.bias


def naive_glca(m, x, ctx, allowed=None):
    return naive_attention(m, x, ctx, allowed)


def naive_pwca(m, x, ctx):
    return naive_attention(m, x, torch.cat([x, ctx], dim=1))


def outputs_and_grads(fn, m, inputs, cotangent):
    y = fn(*inputs)
    return y, torch.autograd.grad((y * cotangent).sum(), [*inputs, *m.parameters()])


def compare(m, fn, ref, inputs):
    inputs = [t.requires_grad_(True) for t in inputs]
    cot = torch.randn_like(fn(*inputs))
    y, grads = outputs_and_grads(fn, m, inputs, cot)
    y_ref, grads_ref = outputs_and_grads(ref, m, inputs, cot)
    assert_close(y, y_ref, **TIGHT)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, **GRAD)


OPTIONS = {
    "default": dict(),
    "no_bias": dict(qkv_bias=False, proj_bias=False),
    "scale": dict(scale=0.3),
}


def tokens(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# --- glca ---------------------------------------------------------------------------------------

def _allowed(kind, B, R, N):
    if kind is None:
        return None, None
    if kind == "padding":
        valid = torch.rand(B, N) > 0.4
        valid[:, 0] = True
        valid[1] = False                            # sample 1 has no context token at all
        return valid, valid[:, None, :].expand(B, R, N)
    pattern = torch.rand(B, 1, R, N) > 0.5
    pattern[0, 0, 0] = False                        # one empty row
    if kind == "pattern":
        return pattern, pattern[:, 0]
    as_float = torch.zeros(B, 1, R, N, dtype=torch.float64).masked_fill(~pattern, float("-inf"))
    return as_float, pattern[:, 0]


@pytest.mark.parametrize("backend", [None, "sdpa", "reference"])
@pytest.mark.parametrize("mask", [None, "padding", "pattern", "float"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_glca_matches_naive_reference_outputs_and_grads(options, mask, backend):
    m = build("glca", backend=backend, **options)
    B, R, N = 3, 4, 9
    attn_mask, allowed = _allowed(mask, B, R, N)
    compare(m, lambda x, c: m(x, c, attn_mask=attn_mask), lambda x, c: naive_glca(m, x, c, allowed),
            [tokens(B, R, DIM), tokens(B, N, DIM)])


def test_glca_on_selected_tokens_is_self_attention_at_those_rows():
    """Q^l = the selected rows of Q: glca(ctx[idx], ctx) = self-attention(ctx)[idx] (same weights);
    with every token selected it is plain self-attention (mhsa)."""
    g = build("glca")
    sa = build("mhsa")
    sa.load_state_dict(g.state_dict())
    ctx = tokens(2, 10, DIM)
    idx = torch.tensor([[3, 0, 7], [9, 4, 5]])
    local = torch.gather(ctx, 1, idx[..., None].expand(-1, -1, DIM))
    with torch.no_grad():
        full = sa(ctx)
        assert_close(g(local, ctx), torch.gather(full, 1, idx[..., None].expand(-1, -1, DIM)), **TIGHT)
        assert_close(g(ctx, ctx), full, **TIGHT)


def test_glca_equals_cross_mhsa_with_split_weights():
    if "cross_mhsa" not in {s.name for s in attnlab.list_specs()}:
        pytest.skip("cross_mhsa is not registered in this checkout")
    g = build("glca")
    ref = attnlab.create("cross_mhsa", DIM, HEADS, qkv_bias=True).double().eval()
    sd = g.state_dict()
    ref.load_state_dict({"q.weight": sd["qkv.weight"][:DIM], "q.bias": sd["qkv.bias"][:DIM],
                         "kv.weight": sd["qkv.weight"][DIM:], "kv.bias": sd["qkv.bias"][DIM:],
                         "proj.weight": sd["proj.weight"], "proj.bias": sd["proj.bias"]})
    x, ctx = tokens(2, 3, DIM), tokens(2, 8, DIM)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 5:] = False
    with torch.no_grad():
        assert_close(g(x, ctx), ref(x, ctx), **TIGHT)
        assert_close(g(x, ctx, attn_mask=valid), ref(x, ctx, attn_mask=valid), **TIGHT)


def test_glca_fully_masked_sample_gives_proj_bias():
    g = build("glca")
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0] = False
    with torch.no_grad():
        y = g(tokens(2, 3, DIM), tokens(2, 6, DIM), attn_mask=valid)
    assert_close(y[0], g.proj.bias.expand(3, DIM), rtol=0, atol=0)


# --- pwca ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [None, "sdpa", "reference"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_pwca_matches_naive_reference_outputs_and_grads(options, backend):
    m = build("pwca", backend=backend, **options)
    compare(m, lambda x, c: m(x, c), lambda x, c: naive_pwca(m, x, c), [tokens(2, 7, DIM), tokens(2, 5, DIM)])


@pytest.mark.parametrize("backend", [None, "reference"])
def test_pwca_forward_self_matches_naive_and_mhsa(backend):
    m = build("pwca", backend=backend)
    compare(m, lambda x: m.forward_self(x), lambda x: naive_attention(m, x, x), [tokens(2, 7, DIM)])
    valid = torch.rand(2, 7) > 0.4
    valid[:, 0] = True
    allowed = valid[:, None, :].expand(2, 7, 7)
    compare(m, lambda x: m.forward_self(x, attn_mask=valid), lambda x: naive_attention(m, x, x, allowed),
            [tokens(2, 7, DIM)])
    sa = build("mhsa")
    sa.load_state_dict(m.state_dict())
    x = tokens(2, 7, DIM)
    with torch.no_grad():
        assert_close(m.forward_self(x), sa(x), **TIGHT)
        assert_close(m.forward_self(x, attn_mask=valid), sa(x, attn_mask=valid), **TIGHT)


def test_pwca_limiting_cases():
    """pwca(x, c) is self-attention over [x; c] read at x's rows; with no distractor it is SA."""
    m = build("pwca")
    x, c = tokens(2, 6, DIM), tokens(2, 4, DIM)
    with torch.no_grad():
        assert_close(m(x, c), m.forward_self(torch.cat([x, c], 1))[:, :6], **TIGHT)
        assert_close(m(x, c[:, :0]), m.forward_self(x), **TIGHT)
        # the distractor takes probability mass: the output differs from plain SA
        assert not torch.allclose(m(x, c), m.forward_self(x))


def test_pwca_return_probs_are_the_softmax_and_feed_hook_probs():
    m = build("pwca")
    x = tokens(2, 5, DIM)
    seen = []
    m.hook_probs.register_forward_hook(lambda mod, i, out: seen.append(out))
    with torch.no_grad():
        y, probs = m.forward_self(x, return_probs=True)
        assert_close(y, m.forward_self(x), **TIGHT)
    C, d = DIM, DIM // HEADS
    q = (x @ m.qkv.weight[:C].T + m.qkv.bias[:C]).reshape(2, 5, HEADS, d).transpose(1, 2)
    k = (x @ m.qkv.weight[C:2 * C].T + m.qkv.bias[C:2 * C]).reshape(2, 5, HEADS, d).transpose(1, 2)
    assert_close(probs, torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1), **TIGHT)
    assert len(seen) == 1 and seen[0] is probs
    _, empty = m.forward_self(tokens(0, 5, DIM), return_probs=True)
    assert empty.shape == (0, HEADS, 5, 5)


def test_pwca_hooks_carry_the_concatenated_keys():
    m = build("pwca", backend="reference")
    shapes = {}
    for name in m.hook_names:
        getattr(m, name).register_forward_hook(lambda mod, i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
    with torch.no_grad():
        m(tokens(2, 6, DIM), tokens(2, 4, DIM))
    assert shapes == {"hook_q": (2, 4, 6, 8), "hook_k": (2, 4, 10, 8), "hook_v": (2, 4, 10, 8),
                      "hook_scores": (2, 4, 6, 10), "hook_probs": (2, 4, 6, 10), "hook_out": (2, 4, 6, 8)}


# --- both ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["glca", "pwca"])
def test_gradcheck(name):
    m = attnlab.create(name, 8, 2, qkv_bias=True).double()
    x = tokens(1, 3, 8).requires_grad_(True)
    c = tokens(1, 4, 8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: m(a, b), (x, c))
    assert torch.autograd.gradcheck(lambda *ps: m(x.detach(), c.detach()), tuple(m.parameters()))


@pytest.mark.parametrize("name", ["glca", "pwca"])
def test_float32_close_to_naive_float64(name):
    m = build(name, dtype=torch.float32)
    x, c = torch.randn(2, 5, DIM), torch.randn(2, 7, DIM)
    y = m(x, c)
    assert y.dtype == torch.float32
    ref = naive_glca if name == "glca" else naive_pwca
    m64 = m.double()
    assert_close(y.double(), ref(m64, x.double(), c.double()), rtol=1e-5, atol=1e-6)


def test_parameter_names_are_timm_attention_names():
    for name in ("glca", "pwca"):
        sd = build(name).state_dict()
        assert {k: tuple(v.shape) for k, v in sd.items()} == {
            "qkv.weight": (3 * DIM, DIM), "qkv.bias": (3 * DIM,), "proj.weight": (DIM, DIM), "proj.bias": (DIM,)}


def test_useful_flops():
    C = DIM
    assert build("glca").useful_flops(2, 3, C, HEADS, False, context_len=9) == (
        2 * (4 * 3 * C * C + 4 * 9 * C * C + 4 * 3 * 9 * C), 4 * (4 * 3 * C * C + 4 * 9 * C * C + 4 * 3 * 9 * C))
    fwd, _ = build("pwca").useful_flops(2, 6, C, HEADS, False, context_len=4)
    assert fwd == 2 * (8 * 6 * C * C + 4 * 4 * C * C + 4 * 6 * 10 * C)
    for name in ("glca", "pwca"):
        with pytest.raises(NotImplementedError, match="causal"):
            build(name).useful_flops(1, 4, C, HEADS, True)
        with pytest.raises(ValueError, match="num_heads=2"):
            build(name).useful_flops(1, 4, C, 2, False)


@pytest.mark.parametrize("name", ["glca", "pwca"])
def test_bad_input(name):
    m = build(name)
    x, c = tokens(2, 5, DIM), tokens(2, 6, DIM)
    with pytest.raises(ValueError, match=rf"{name}: expected x of shape \(B, N, C=32\)"):
        m(x[0], c)
    with pytest.raises(ValueError, match=rf"{name}: expected context of shape \(B, M, C=32\)"):
        m(x, c[0])
    with pytest.raises(ValueError, match=rf"{name}: expected context of width C=32, got 31"):
        m(x, c[..., :31])
    with pytest.raises(ValueError, match="share the batch size"):
        m(x, c[:1])
    with pytest.raises(TypeError, match="share dtype"):
        m(x, c.float())
    with pytest.raises(TypeError, match="expected context as a torch.Tensor"):
        m(x, None)
    with pytest.raises(NotImplementedError, match=f"'{name}' does not support causal"):
        m(x, c, is_causal=True)
    with pytest.raises(NotImplementedError, match=f"'{name}' does not support kv_cache"):
        m(x, c, cache=attnlab.KVCache())


def test_bad_masks():
    g = build("glca")
    x, c = tokens(2, 3, DIM), tokens(2, 6, DIM)
    with pytest.raises(ValueError, match=r"glca: a 2-D attn_mask is a key-padding mask \(B, M\) = \(2, 6\)"):
        g(x, c, attn_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="glca: attn_mask must be bool"):
        g(x, c, attn_mask=torch.ones(2, 6, dtype=torch.int64))
    p = build("pwca")
    with pytest.raises(NotImplementedError, match="'pwca' does not support attn_mask"):
        p(x, c, attn_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pwca: .*\(B, M\) = \(2, 3\)"):
        p.forward_self(x, attn_mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("name", ["glca", "pwca"])
@pytest.mark.parametrize("options, error, match", [
    (dict(qkv_bias=1), TypeError, "qkv_bias must be a bool, got int"),
    (dict(proj_bias="yes"), TypeError, "proj_bias must be a bool, got str"),
    (dict(attn_drop=-0.1), ValueError, r"attn_drop must be a number in \[0, 1\)"),
    (dict(scale=0.0), ValueError, "scale must be a finite number > 0, got 0.0"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
])
def test_bad_options(name, options, error, match):
    with pytest.raises(error, match=f"{name}: {match}"):
        attnlab.create(name, DIM, HEADS, **options)
    with pytest.raises(ValueError, match=rf"{name}: dim \(30\) must be divisible by num_heads \(4\)"):
        attnlab.create(name, 30, 4)
