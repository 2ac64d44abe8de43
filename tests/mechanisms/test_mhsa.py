"""mhsa against the formula, against torch.nn.MultiheadAttention, gradcheck, options, backends.

The naive reference below is written from "Attention Is All You Need" eq. 1 with the module's
own weights (timm layout: qkv = Linear(C, (h + 2 h_kv) d) as [q heads | k heads | v heads]),
in float64, with explicit loops over nothing but the einsums. It shares no code with attnlab.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import attnlab
from attnlab import KVCache
from attnlab.ops import BackendUnavailable

DIM, HEADS = 32, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)


def mhsa(dtype=torch.float64, **options):
    return attnlab.create("mhsa", DIM, HEADS, **{"qkv_bias": True, **options}).to(dtype).eval()


def randomize_norms(m):
    """LayerNorms start at weight 1, bias 0; random affine parameters make the test see them."""
    with torch.no_grad():
        for norm in (m.q_norm, m.k_norm):
            if isinstance(norm, torch.nn.LayerNorm):
                norm.weight.normal_(1.0, 0.3)
                norm.bias.normal_(0.0, 0.3)


def naive_mhsa(m, x, attn_mask=None, is_causal=False):
    """softmax(Q K^T * scale + mask) V, then the output projection; float64, from the weights.

    attn_mask here: None, a (B, M) bool key-padding mask or a bool (B|1, 1, N, M) pattern.
    A query with no allowed key gets a zero attention output.
    """
    B, N, C = x.shape
    h, h_kv = m.num_heads, m.num_kv_heads
    d = C // h
    qkv = x @ m.qkv.weight.T
    if m.qkv.bias is not None:
        qkv = qkv + m.qkv.bias
    q = qkv[..., : h * d].reshape(B, N, h, d).transpose(1, 2)                  # (B, h, N, d)
    k = qkv[..., h * d:(h + h_kv) * d].reshape(B, N, h_kv, d).transpose(1, 2)  # (B, h_kv, N, d)
    v = qkv[..., (h + h_kv) * d:].reshape(B, N, h_kv, d).transpose(1, 2)       # (B, h_kv, N, d)
    if isinstance(m.q_norm, torch.nn.LayerNorm):
        q = F.layer_norm(q, (d,), m.q_norm.weight, m.q_norm.bias, m.q_norm.eps)
        k = F.layer_norm(k, (d,), m.k_norm.weight, m.k_norm.bias, m.k_norm.eps)
    group = torch.arange(h) // (h // h_kv)       # query head i reads kv head i // (h / h_kv)
    k, v = k[:, group], v[:, group]              # (B, h, N, d)
    scale = 1.0 / math.sqrt(d) if m.scale is None else m.scale
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    allowed = torch.ones(B, 1, N, N, dtype=torch.bool)
    if is_causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    if attn_mask is not None:
        allowed = allowed & (attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask)
    has_key = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    probs = scores.softmax(-1) * has_key
    out = torch.einsum("bhnm,bhmd->bhnd", probs, v)                            # (B, h, N, d)
    out = out.transpose(1, 2).reshape(B, N, C)
    return F.linear(out, m.proj.weight, m.proj.bias)


def outputs_and_grads(fn, m, x, cotangent):
    y = fn(x)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad((y * cotangent).sum(), [x, *params])
    return y, grads


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "padding": dict(mask="padding"),
    "padding+causal": dict(mask="padding", is_causal=True),
    "pattern": dict(mask="pattern"),
}
OPTIONS = {
    "default": dict(),
    "gqa": dict(num_kv_heads=2),
    "mqa": dict(num_kv_heads=1),
    "qk_norm": dict(qk_norm=True),
    "scale": dict(scale=0.3),
    "no_bias": dict(qkv_bias=False, proj_bias=False),
}


def make_mask(kind, B, N):
    if kind is None:
        return None
    if kind == "padding":
        valid = torch.rand(B, N) > 0.4
        valid[:, 0] = True
        return valid
    pattern = torch.rand(B, 1, N, N) > 0.5
    pattern[..., 0] = True
    return pattern


@pytest.mark.parametrize("backend", [None, "sdpa", "reference"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_naive_reference_outputs_and_grads(case, options, backend):
    m = mhsa(backend=backend, **options)
    randomize_norms(m)
    B, N = 2, 7
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = make_mask(case.get("mask"), B, N)
    is_causal = case.get("is_causal", False)
    cot = torch.randn(B, N, DIM, dtype=torch.float64)
    y, grads = outputs_and_grads(lambda t: m(t, attn_mask=mask, is_causal=is_causal), m, x, cot)
    y_ref, grads_ref = outputs_and_grads(lambda t: naive_mhsa(m, t, mask, is_causal), m, x, cot)
    assert_close(y, y_ref, **TIGHT)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_flex_forward_matches_naive_reference(case):
    m = mhsa(backend="flex", num_kv_heads=2)
    B, N = 2, 7
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    mask = make_mask(case.get("mask"), B, N)
    is_causal = case.get("is_causal", False)
    with torch.no_grad():
        assert_close(m(x, attn_mask=mask, is_causal=is_causal), naive_mhsa(m, x, mask, is_causal), **TIGHT)


def test_float32_matches_naive_float64():
    m = mhsa(dtype=torch.float32)
    x = torch.randn(3, 9, DIM)
    y = m(x, is_causal=True)
    assert y.dtype == torch.float32
    y_ref = naive_mhsa(m.double(), x.double(), is_causal=True)
    assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)


# --- torch.nn.MultiheadAttention ---------------------------------------------------------------

def torch_mha_from(m):
    mha = torch.nn.MultiheadAttention(DIM, HEADS, bias=True, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(m.qkv.weight)
        mha.in_proj_bias.copy_(m.qkv.bias)
        mha.out_proj.weight.copy_(m.proj.weight)
        mha.out_proj.bias.copy_(m.proj.bias)
    return mha.eval()


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_matches_torch_multihead_attention(padded, is_causal):
    m = mhsa()
    mha = torch_mha_from(m)
    B, N = 3, 8
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    valid = None
    key_padding_mask = attn_mask = None
    if padded:
        valid = torch.rand(B, N) > 0.4
        valid[:, 0] = True            # torch MHA gives NaN for a query with no key; keep one
        key_padding_mask = ~valid     # torch: True = ignore; attnlab: True = may attend
    if is_causal:
        attn_mask = torch.ones(N, N, dtype=torch.bool).triu(1)     # torch: True = not allowed
    y_torch, _ = mha(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False)
    y = m(x, attn_mask=valid, is_causal=is_causal)
    assert_close(y, y_torch, **TIGHT)


# --- fully masked rows -------------------------------------------------------------------------

def test_fully_masked_sample_outputs_proj_bias_and_zero_heads():
    m = mhsa()
    captured = {}
    m.hook_out.register_forward_hook(lambda mod, inp, out: captured.setdefault("out", out))
    B, N = 2, 5
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1] = False
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    y = m(x, attn_mask=valid)
    per_head = captured["out"]                                    # (B, h, N, d), before proj
    assert torch.equal(per_head[1], torch.zeros_like(per_head[1]))
    assert_close(y[1], m.proj.bias.expand(N, DIM), rtol=0, atol=0)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all()
    assert torch.equal(gx[1], torch.zeros_like(gx[1]))            # sample 1's output is constant


# --- gradcheck ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [None, "reference"])       # None: the default, sdpa
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_gradcheck(backend, masked):
    m = attnlab.create("mhsa", 4, 2, qkv_bias=True, num_kv_heads=1, backend=backend).double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, True]]) if masked else None
    names = ["qkv.weight", "proj.weight"]
    weights = [m.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def f(x, w_qkv, w_proj):
        return torch.func.functional_call(m, dict(zip(names, (w_qkv, w_proj))), (x,),
                                          dict(attn_mask=mask, is_causal=True))

    assert torch.autograd.gradcheck(f, (x, *weights), eps=1e-6, atol=1e-7)


# --- GQA ---------------------------------------------------------------------------------------

def test_gqa_projection_layout_and_repeated_heads():
    m = mhsa(num_kv_heads=2)
    d = DIM // HEADS
    assert m.qkv.weight.shape == ((HEADS + 2 * 2) * d, DIM)
    # GQA equals MHSA whose k/v weights repeat each kv head for its group of query heads.
    full = mhsa()
    w, b = m.qkv.weight, m.qkv.bias
    q_w, k_w, v_w = w.split([HEADS * d, 2 * d, 2 * d])
    q_b, k_b, v_b = b.split([HEADS * d, 2 * d, 2 * d])

    def rep(t):  # (h_kv d, ...) -> (h d, ...): kv head j serves query heads 2j, 2j + 1
        rest = t.shape[1:]
        return t.reshape(2, d, *rest).repeat_interleave(HEADS // 2, dim=0).reshape(HEADS * d, *rest)

    with torch.no_grad():
        full.qkv.weight.copy_(torch.cat([q_w, rep(k_w), rep(v_w)]))
        full.qkv.bias.copy_(torch.cat([q_b, rep(k_b), rep(v_b)]))
        full.proj.load_state_dict(m.proj.state_dict())
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    assert_close(m(x, is_causal=True), full(x, is_causal=True), **TIGHT)


@pytest.mark.parametrize("num_kv_heads", [3, 0, 8, True])
def test_bad_num_kv_heads_raises(num_kv_heads):
    with pytest.raises(ValueError, match="num_kv_heads"):
        attnlab.create("mhsa", DIM, HEADS, num_kv_heads=num_kv_heads)


def test_gqa_cache_holds_kv_heads_and_decodes_like_full():
    m = mhsa(num_kv_heads=2)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    cache = KVCache()
    steps = [m(x[:, t:t + 1], is_causal=True, cache=cache) for t in range(6)]
    assert cache.keys.shape == (2, 2, 6, DIM // HEADS)
    assert_close(torch.cat(steps, 1), m(x, is_causal=True), **TIGHT)


# --- qk_norm, dropout --------------------------------------------------------------------------

def test_qk_norm_changes_output():
    plain = mhsa()
    normed = mhsa(qk_norm=True)
    missing, unexpected = normed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["k_norm.bias", "k_norm.weight", "q_norm.bias", "q_norm.weight"]
    assert not unexpected
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    y_plain, y_normed = plain(x), normed(x)
    assert torch.isfinite(y_normed).all()
    assert not torch.allclose(y_plain, y_normed)
    assert_close(y_normed, naive_mhsa(normed, x), **TIGHT)


@pytest.mark.parametrize("which", ["attn_drop", "proj_drop"])
def test_dropout_only_in_train_mode(which):
    m = mhsa(**{which: 0.5})
    ref = mhsa()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    # eval: deterministic and equal to the same weights without dropout
    assert_close(m(x), ref(x), rtol=0, atol=0)
    assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    y1, y2 = m(x), m(x)
    assert not torch.allclose(y1, ref(x))
    assert not torch.allclose(y1, y2)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_bad_dropout_raises(value):
    with pytest.raises(ValueError, match="drop"):
        attnlab.create("mhsa", DIM, HEADS, attn_drop=value)


def test_attn_dropout_with_flex_raises_in_train_mode_only():
    m = mhsa(attn_drop=0.1, backend="flex")
    x = torch.randn(1, 4, DIM, dtype=torch.float64)
    with torch.no_grad():
        m(x)                                    # eval: no dropout, flex runs
        m.train()
        with pytest.raises(BackendUnavailable, match="dropout"):
            m(x)


# --- backends ----------------------------------------------------------------------------------

def test_explicit_flex_with_grad_raises_never_falls_back():
    m = mhsa(backend="flex")
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    with pytest.raises(BackendUnavailable) as info:
        m(x)
    msg = str(info.value)
    assert "'flex'" in msg and "backward" in msg and "CPU" in msg, msg


@pytest.mark.parametrize("backend", ["flex", "reference", "sdpa"])
def test_explicit_backends_agree_without_grad(backend):
    m = mhsa(dtype=torch.float32, backend=backend)
    ref = mhsa(dtype=torch.float32)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, DIM)
    with torch.no_grad():
        assert_close(m(x, is_causal=True), ref(x, is_causal=True), rtol=1e-5, atol=1e-6)


def test_unknown_backend_raises_value_error():
    with pytest.raises(ValueError, match="bogus"):
        m = mhsa(backend="bogus")          # accepted at construction or ...
        m(torch.randn(1, 3, DIM, dtype=torch.float64))   # ... refused at the first forward


def test_use_backend_changes_the_default(backend_spy):
    m = mhsa()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    m(x)
    with attnlab.use_backend("reference"):
        m(x)
        with attnlab.use_backend("flex"):
            with pytest.raises(BackendUnavailable, match="flex"):   # no fallback to sdpa/reference
                m(x.requires_grad_(True))
        m(x)
    m(x)
    assert backend_spy.ran == ["sdpa", "reference", "reference", "sdpa"]


def test_module_backend_beats_use_backend(backend_spy):
    m = mhsa(backend="sdpa")
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    with attnlab.use_backend("flex"):
        m(x)
    assert backend_spy.ran == ["sdpa"]


def test_env_var_changes_the_default(monkeypatch, backend_spy):
    m = mhsa()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    monkeypatch.setenv("ATTNLAB_BACKEND", "reference")
    m(x)
    monkeypatch.setenv("ATTNLAB_BACKEND", "flex")
    with pytest.raises(BackendUnavailable, match="flex"):
        m(x.clone().requires_grad_(True))
    assert backend_spy.ran == ["reference"]


# --- hook points -------------------------------------------------------------------------------

def test_hook_point_shapes_with_cache():
    m = mhsa(num_kv_heads=2)
    shapes = {}
    for name in ("hook_q", "hook_k", "hook_v", "hook_out"):
        def record(mod, inputs, out, _name=name):
            shapes[_name] = tuple(out.shape)
        getattr(m, name).register_forward_hook(record)
    cache = KVCache()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    m(x[:, :3], is_causal=True, cache=cache)
    m(x[:, 3:], is_causal=True, cache=cache)
    d = DIM // HEADS
    assert shapes == {"hook_q": (2, HEADS, 2, d), "hook_k": (2, 2, 5, d), "hook_v": (2, 2, 5, d),
                      "hook_out": (2, HEADS, 2, d)}
