"""cross_mhsa against the formula, against torch.nn.MultiheadAttention (and HF BERT's
cross-attention where transformers is installed), gradcheck, the context cache, options, errors.

The naive reference below is written from "Attention Is All You Need" Sec. 3.2.3 / Eq. (1) with
the module's own weights (timm layout: q = Linear(C, C); kv = Linear(C_ctx, 2 h_kv d) whose rows
are [k heads | v heads]), in float64, with nothing but einsums. It shares no code with attnlab.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import attnlab
from attnlab import ContextCache, KVCache
from attnlab.ops import BackendUnavailable

DIM, HEADS, CTX_DIM = 32, 4, 24
N, M = 7, 5
TIGHT = dict(rtol=1e-10, atol=1e-12)


def cross(dtype=torch.float64, **options):
    return attnlab.create("cross_mhsa", DIM, HEADS, **{"qkv_bias": True, **options}).to(dtype).eval()


def inputs(B=2, n=N, m=M, c_ctx=DIM, dtype=torch.float64):
    return torch.randn(B, n, DIM, dtype=dtype), torch.randn(B, m, c_ctx, dtype=dtype)


def naive_cross(mod, x, ctx, attn_mask=None):
    """softmax(Q K^T * scale + mask) V with Q from x and K, V from the context; then proj.

    attn_mask: None, a (B, M) bool key-padding mask, a bool (B|1, 1, N, M) pattern or a float
    (B|1, 1, N, M) bias. A query with no allowed key gets a zero attention output.
    """
    B, n, C = x.shape
    m = ctx.shape[1]
    h, h_kv = mod.num_heads, mod.num_kv_heads
    d = C // h
    q = x @ mod.q.weight.T
    kv = ctx @ mod.kv.weight.T
    if mod.q.bias is not None:
        q, kv = q + mod.q.bias, kv + mod.kv.bias
    q = q.reshape(B, n, h, d).transpose(1, 2)                                  # (B, h, N, d)
    k = kv[..., :h_kv * d].reshape(B, m, h_kv, d).transpose(1, 2)              # (B, h_kv, M, d)
    v = kv[..., h_kv * d:].reshape(B, m, h_kv, d).transpose(1, 2)              # (B, h_kv, M, d)
    group = torch.arange(h) // (h // h_kv)          # query head i reads kv head i // (h / h_kv)
    k, v = k[:, group], v[:, group]                 # (B, h, M, d)
    scale = 1.0 / math.sqrt(d) if mod.scale is None else mod.scale
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    allowed = torch.ones(B, 1, n, m, dtype=torch.bool)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & (attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask)
    elif attn_mask is not None:
        scores = scores + attn_mask
        allowed = allowed & (attn_mask != -math.inf)
    has_key = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, -math.inf).masked_fill(~has_key, 0.0)
    probs = scores.softmax(-1) * has_key
    out = torch.einsum("bhnm,bhmd->bhnd", probs, v)                            # (B, h, N, d)
    out = out.transpose(1, 2).reshape(B, n, C)
    return F.linear(out, mod.proj.weight, mod.proj.bias)


def outputs_and_grads(fn, mod, x, ctx, cotangent):
    y = fn(x, ctx)
    grads = torch.autograd.grad((y * cotangent).sum(), [x, ctx, *mod.parameters()])
    return y, grads


def make_mask(kind, B, n=N, m=M):
    if kind is None:
        return None
    if kind == "padding":
        valid = torch.rand(B, m) > 0.4
        valid[:, 0] = True
        return valid
    if kind == "empty_row":                # sample 1 has no context token at all
        valid = torch.rand(B, m) > 0.4
        valid[0, 0] = True
        valid[1] = False
        return valid
    if kind == "pattern":
        pattern = torch.rand(B, 1, n, m) > 0.5
        pattern[..., 0] = True
        return pattern
    bias = torch.randn(B, 1, n, m, dtype=torch.float64)    # "float": added to the scores
    bias[..., 1] = -math.inf
    return bias


MASKS = [None, "padding", "empty_row", "pattern", "float"]
OPTIONS = {
    "default": dict(),
    "context_dim": dict(context_dim=CTX_DIM),
    "gqa": dict(num_kv_heads=2),
    "mqa": dict(num_kv_heads=1, context_dim=CTX_DIM),
    "scale": dict(scale=0.3),
    "no_bias": dict(qkv_bias=False, proj_bias=False),
}


@pytest.mark.parametrize("backend", [None, "sdpa", "reference"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_matches_naive_reference_outputs_and_grads(mask, options, backend):
    mod = cross(backend=backend, **options)
    x, ctx = inputs(c_ctx=mod.context_dim)
    x.requires_grad_(True)
    ctx.requires_grad_(True)
    attn_mask = make_mask(mask, 2)
    cot = torch.randn(2, N, DIM, dtype=torch.float64)
    y, grads = outputs_and_grads(lambda a, b: mod(a, b, attn_mask=attn_mask), mod, x, ctx, cot)
    y_ref, grads_ref = outputs_and_grads(lambda a, b: naive_cross(mod, a, b, attn_mask), mod, x, ctx, cot)
    assert_close(y, y_ref, **TIGHT)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_flex_forward_matches_naive_reference(mask):
    mod = cross(backend="flex", num_kv_heads=2, context_dim=CTX_DIM)
    x, ctx = inputs(c_ctx=CTX_DIM)
    attn_mask = make_mask(mask, 2)
    with torch.no_grad():
        try:
            y = mod(x, ctx, attn_mask=attn_mask)
        except BackendUnavailable as err:
            pytest.skip(f"flex cannot run here: {err}")
        assert_close(y, naive_cross(mod, x, ctx, attn_mask), **TIGHT)


def test_float32_matches_naive_float64_and_keeps_dtype():
    mod = cross(dtype=torch.float32, context_dim=CTX_DIM)
    x, ctx = inputs(3, 9, 11, CTX_DIM, torch.float32)
    y = mod(x, ctx)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert_close(y.double(), naive_cross(mod.double(), x.double(), ctx.double()), rtol=1e-5, atol=1e-6)


def test_one_context_token_gives_its_value_to_every_query():
    """M = 1: the softmax is 1, every query gets proj(v) of that token whatever it is."""
    mod = cross()
    x, ctx = inputs(m=1)
    y = mod(x, ctx)
    v = (ctx @ mod.kv.weight.T + mod.kv.bias)[..., DIM:]                       # (B, 1, C)
    assert_close(y, F.linear(v, mod.proj.weight, mod.proj.bias).expand_as(y), **TIGHT)


# --- torch.nn.MultiheadAttention ---------------------------------------------------------------

def torch_mha_from(mod):
    """torch's MultiheadAttention with the key map of the module docstring."""
    c_ctx = mod.context_dim
    mha = torch.nn.MultiheadAttention(DIM, HEADS, bias=True, batch_first=True, kdim=c_ctx, vdim=c_ctx,
                                      dtype=torch.float64)
    with torch.no_grad():
        if c_ctx == DIM:                      # torch keeps one fused (3C, C) in_proj_weight
            mha.in_proj_weight.copy_(torch.cat([mod.q.weight, mod.kv.weight]))
        else:
            k_w, v_w = mod.kv.weight.chunk(2)
            mha.q_proj_weight.copy_(mod.q.weight)
            mha.k_proj_weight.copy_(k_w)
            mha.v_proj_weight.copy_(v_w)
        mha.in_proj_bias.copy_(torch.cat([mod.q.bias, mod.kv.bias]))
        mha.out_proj.weight.copy_(mod.proj.weight)
        mha.out_proj.bias.copy_(mod.proj.bias)
    return mha.eval()


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("c_ctx", [DIM, CTX_DIM], ids=["same_dim", "kdim"])
def test_matches_torch_multihead_attention(c_ctx, padded):
    mod = cross(context_dim=c_ctx)
    mha = torch_mha_from(mod)
    assert mha._qkv_same_embed_dim == (c_ctx == DIM)
    x, ctx = inputs(3, 8, 6, c_ctx)
    valid = key_padding_mask = None
    if padded:
        valid = torch.rand(3, 6) > 0.4
        valid[:, 0] = True            # torch MHA gives NaN for a query with no key; keep one
        key_padding_mask = ~valid     # torch: True = ignore; attnlab: True = may attend
    y_torch, _ = mha(x, ctx, ctx, key_padding_mask=key_padding_mask, need_weights=False)
    y = mod(x, ctx, attn_mask=valid)
    print(f"max |cross_mhsa - torch MHA| = {(y - y_torch).abs().max().item():.3e}")
    assert_close(y, y_torch, **TIGHT)


# --- HuggingFace BERT cross-attention (optional) -----------------------------------------------

@pytest.mark.hf
def test_matches_hf_bert_cross_attention_with_copied_weights():
    pytest.importorskip("transformers")
    import inspect

    from transformers import BertConfig
    from transformers.models.bert import modeling_bert

    config = BertConfig(hidden_size=DIM, num_attention_heads=HEADS, intermediate_size=2 * DIM,
                        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, is_decoder=True,
                        add_cross_attention=True, attn_implementation="eager")
    if "is_cross_attention" in inspect.signature(modeling_bert.BertAttention.__init__).parameters:
        hf = modeling_bert.BertAttention(config, is_cross_attention=True)           # transformers >= 5
    else:
        hf = modeling_bert.BertAttention(config)                                    # 4.x: one class
    hf = hf.double().eval()
    mod = cross()
    k_w, v_w = mod.kv.weight.chunk(2)
    k_b, v_b = mod.kv.bias.chunk(2)
    hf.load_state_dict({"self.query.weight": mod.q.weight, "self.query.bias": mod.q.bias,
                        "self.key.weight": k_w, "self.key.bias": k_b,
                        "self.value.weight": v_w, "self.value.bias": v_b,
                        "output.dense.weight": mod.proj.weight, "output.dense.bias": mod.proj.bias,
                        "output.LayerNorm.weight": 1 + 0.3 * torch.randn(DIM, dtype=torch.float64),
                        "output.LayerNorm.bias": 0.3 * torch.randn(DIM, dtype=torch.float64)})
    x, ctx = inputs(2, 6, 5)
    valid = torch.tensor([[True] * 5, [True, True, False, True, False]])
    # HF's extended mask: 0 where present, the dtype's minimum where padded, (B, 1, 1, M).
    ext = (~valid).double()[:, None, None, :] * torch.finfo(torch.float64).min
    with torch.no_grad():
        y_hf = hf(x, encoder_hidden_states=ctx, encoder_attention_mask=ext)[0]
        ln = hf.output.LayerNorm       # BERT's block: LayerNorm(dense(attention) + x)
        y = F.layer_norm(mod(x, ctx, attn_mask=valid) + x, (DIM,), ln.weight, ln.bias, ln.eps)
    print(f"max |cross_mhsa - HF BERT crossattention| = {(y - y_hf).abs().max().item():.3e}")
    assert_close(y, y_hf, **TIGHT)


# --- fully masked rows -------------------------------------------------------------------------

def test_fully_masked_sample_outputs_proj_bias_zero_heads_and_finite_grads():
    mod = cross()
    captured = {}
    mod.hook_out.register_forward_hook(lambda m, i, out: captured.setdefault("out", out))
    x, ctx = inputs()
    x.requires_grad_(True)
    ctx.requires_grad_(True)
    valid = torch.ones(2, M, dtype=torch.bool)
    valid[1] = False
    y = mod(x, ctx, attn_mask=valid)
    assert torch.isfinite(y).all()
    assert torch.equal(captured["out"][1], torch.zeros_like(captured["out"][1]))
    assert_close(y[1], mod.proj.bias.expand(N, DIM), rtol=0, atol=0)
    gx, gc = torch.autograd.grad(y.sum(), (x, ctx))
    assert torch.isfinite(gx).all() and torch.isfinite(gc).all()
    assert torch.equal(gx[1], torch.zeros_like(gx[1])) and torch.equal(gc[1], torch.zeros_like(gc[1]))


def test_empty_context_gives_proj_bias():
    mod = cross()
    x, ctx = inputs(m=0)
    assert_close(mod(x, ctx), mod.proj.bias.expand(2, N, DIM), rtol=0, atol=0)


# --- gradcheck ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [None, "reference"])       # None: the default, sdpa
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_gradcheck(backend, masked):
    mod = attnlab.create("cross_mhsa", 4, 2, qkv_bias=True, num_kv_heads=1, context_dim=3,
                         backend=backend).double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, True], [True, False, True, False]]) if masked else None
    names = ["q.weight", "kv.weight", "kv.bias", "proj.weight"]
    weights = [mod.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def f(x, ctx, *ws):
        return torch.func.functional_call(mod, dict(zip(names, ws)), (x, ctx), dict(attn_mask=mask))

    assert torch.autograd.gradcheck(f, (x, ctx, *weights), eps=1e-6, atol=1e-7)


# --- the context cache -------------------------------------------------------------------------

class CountingKV:
    """Counts the calls of mod.kv (the context projection)."""

    def __init__(self, mod):
        self.calls = 0
        mod.kv.register_forward_hook(lambda *args: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize("options", [dict(), dict(num_kv_heads=2, context_dim=CTX_DIM)], ids=["mha", "gqa"])
def test_context_cache_equals_recompute_over_decoding_steps(options):
    mod = cross(**options)
    counter = CountingKV(mod)
    _, ctx = inputs(c_ctx=mod.context_dim)
    valid = torch.tensor([[True] * M, [True, False, True, True, False]])
    cache = ContextCache()
    assert not cache.full and len(cache) == 0 and cache.keys is None
    for t in range(4):
        x_t = torch.randn(2, 1 + t % 2, DIM, dtype=torch.float64)       # new queries every step
        y_t = mod(x_t, ctx, attn_mask=valid, cache=cache)
        assert_close(y_t, mod(x_t, ctx, attn_mask=valid), **TIGHT)
        assert_close(y_t, naive_cross(mod, x_t, ctx, valid), **TIGHT)
    # 4 cached steps projected the context once; the 4 recomputes and nothing else did
    assert counter.calls == 1 + 4
    assert cache.full and len(cache) == M
    assert cache.keys.shape == (2, mod.num_kv_heads, M, DIM // HEADS) == cache.values.shape


def test_context_cache_refuses_another_context_until_reset():
    mod = cross()
    x, ctx = inputs()
    cache = ContextCache()
    mod(x, ctx, cache=cache)
    for bad_ctx, what in ((ctx[:1], "batch"), (ctx[:, :3], "length"), (ctx.float(), "dtype")):
        bad_x = x[:1] if what == "batch" else (x.float() if what == "dtype" else x)
        m = mod.float() if what == "dtype" else mod
        with pytest.raises(ValueError, match=r"reset\(\)") as info:
            m(bad_x, bad_ctx, cache=cache)
        assert str(tuple(ctx.shape)) in str(info.value) and str(tuple(bad_ctx.shape)) in str(info.value)
        mod.double()
    cache.reset()
    assert not cache.full
    new_x, new_ctx = inputs(3, 2, 9)
    assert_close(mod(new_x, new_ctx, cache=cache), mod(new_x, new_ctx), **TIGHT)
    assert len(cache) == 9


def test_context_cache_serves_one_layer():
    a, b = cross(), cross()
    x, ctx = inputs()
    cache = ContextCache()
    a(x, ctx, cache=cache)
    with pytest.raises(ValueError, match="one cache per layer"):
        b(x, ctx, cache=cache)
    cache.reset()
    assert_close(b(x, ctx, cache=cache), b(x, ctx), **TIGHT)


def test_context_cache_keeps_the_graph_on_the_filling_call_only():
    mod = cross()
    x, ctx = inputs()
    ctx.requires_grad_(True)
    cache = ContextCache()
    mod(x, ctx, cache=cache).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0 and mod.kv.weight.grad.abs().sum() > 0
    assert not cache.keys.requires_grad and not cache.values.requires_grad
    ctx.grad = None
    mod.zero_grad(set_to_none=True)
    mod(x, ctx, cache=cache).sum().backward()                 # reuses the detached keys/values
    assert ctx.grad is None and mod.kv.weight.grad is None and mod.q.weight.grad is not None


def test_hooks_see_the_cached_keys_and_values():
    mod = cross(num_kv_heads=2)
    shapes = {}
    for name in ("hook_q", "hook_k", "hook_v", "hook_out"):
        getattr(mod, name).register_forward_hook(
            lambda m, i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
    x, ctx = inputs()
    cache = ContextCache()
    mod(x, ctx, cache=cache)
    mod(x[:, :1], ctx, cache=cache)
    d = DIM // HEADS
    assert shapes == {"hook_q": (2, HEADS, 1, d), "hook_k": (2, 2, M, d), "hook_v": (2, 2, M, d),
                      "hook_out": (2, HEADS, 1, d)}


def test_a_kv_cache_is_refused():
    mod = cross()
    with pytest.raises(TypeError, match="ContextCache") as info:
        mod(*inputs(), cache=KVCache())
    assert "cross_mhsa" in str(info.value) and "KVCache" in str(info.value)


def test_causal_is_refused():
    with pytest.raises(NotImplementedError, match="'cross_mhsa' does not support causal"):
        cross()(*inputs(), is_causal=True)


# --- GQA ---------------------------------------------------------------------------------------

def test_gqa_equals_full_heads_with_repeated_kv_weights():
    mod = cross(num_kv_heads=2, context_dim=CTX_DIM)
    d = DIM // HEADS
    assert mod.kv.weight.shape == (2 * 2 * d, CTX_DIM)
    full = cross(context_dim=CTX_DIM)

    def rep(t):  # (2 h_kv d, ...) -> (2 h d, ...): kv head j serves query heads 2j, 2j + 1
        rest = t.shape[1:]
        return t.reshape(2, 2, d, *rest).repeat_interleave(HEADS // 2, dim=1).reshape(2 * HEADS * d, *rest)

    with torch.no_grad():
        full.q.load_state_dict(mod.q.state_dict())
        full.proj.load_state_dict(mod.proj.state_dict())
        full.kv.weight.copy_(rep(mod.kv.weight))
        full.kv.bias.copy_(rep(mod.kv.bias))
    x, ctx = inputs(c_ctx=CTX_DIM)
    assert_close(mod(x, ctx), full(x, ctx), **TIGHT)


# --- options, dropout, flops -------------------------------------------------------------------

@pytest.mark.parametrize("options,match", [
    (dict(num_kv_heads=3), "num_kv_heads"), (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(num_kv_heads=True), "num_kv_heads"), (dict(context_dim=0), "context_dim"),
    (dict(context_dim=2.5), "context_dim"), (dict(attn_drop=1.0), "attn_drop"),
    (dict(scale=0.0), "scale")])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match) as info:
        attnlab.create("cross_mhsa", DIM, HEADS, **options)
    assert "cross_mhsa" in str(info.value)


def test_bad_dims_raise():
    with pytest.raises(ValueError, match=r"cross_mhsa: dim \(30\) must be divisible by num_heads \(4\)"):
        attnlab.create("cross_mhsa", 30, 4)


@pytest.mark.parametrize("which", ["attn_drop", "proj_drop"])
def test_dropout_only_in_train_mode(which):
    mod = cross(**{which: 0.5})
    ref = cross()
    ref.load_state_dict(mod.state_dict())
    x, ctx = inputs()
    assert_close(mod(x, ctx), ref(x, ctx), rtol=0, atol=0)
    mod.train()
    y1, y2 = mod(x, ctx), mod(x, ctx)
    assert not torch.allclose(y1, ref(x, ctx)) and not torch.allclose(y1, y2)


def test_useful_flops_formula_and_the_flop_counter_agree():
    from torch.utils.flop_counter import FlopCounterMode
    mod = cross(dtype=torch.float32, context_dim=CTX_DIM, num_kv_heads=2, backend="reference")
    x, ctx = inputs(2, 6, 9, CTX_DIM, torch.float32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        mod(x, ctx)
    fwd, bwd = mod.useful_flops(2, 6, DIM, HEADS, False, context_len=9)
    assert fwd == counter.get_total_flops() and bwd == 2 * fwd
    assert mod.useful_flops(2, 6, DIM, HEADS, False) == mod.useful_flops(2, 6, DIM, HEADS, False, context_len=6)
    with pytest.raises(NotImplementedError, match="causal"):
        mod.useful_flops(2, 6, DIM, HEADS, True)
    with pytest.raises(ValueError, match="dim=16"):
        mod.useful_flops(2, 6, 16, HEADS, False)


# --- bad input ---------------------------------------------------------------------------------

def test_bad_inputs_name_the_mechanism_and_what_was_expected():
    mod = cross(context_dim=CTX_DIM)
    x, ctx = inputs(c_ctx=CTX_DIM)
    cases = [
        ((x[0], ctx), ValueError, r"cross_mhsa: expected x of shape \(B, N, C=32\), got \(7, 32\)"),
        ((x, ctx[0]), ValueError, r"cross_mhsa: expected context of shape \(B, M, C=24\), got \(5, 24\)"),
        ((x[..., :-1], ctx), ValueError, r"cross_mhsa: expected x of width C=32, got 31"),
        ((x, torch.randn(2, M, DIM, dtype=torch.float64)), ValueError,
         r"cross_mhsa: expected context of width C=24, got 32"),
        ((x, ctx[:1]), ValueError, r"cross_mhsa: x and context must share the batch size, got x \(2, 7, 32\) "
                                   r"and context \(1, 5, 24\)"),
        ((x, None), TypeError, r"cross_mhsa: expected context as a torch.Tensor \(B, M, C\), got NoneType"),
        ((x.long(), ctx), TypeError, r"cross_mhsa: expected floating point x, got torch.int64"),
        ((x, ctx.float()), TypeError, r"cross_mhsa: x and context must share dtype"),
    ]
    for args, err, match in cases:
        with pytest.raises(err, match=match):
            mod(*args)


@pytest.mark.parametrize("mask,err,match", [
    (torch.ones(2, M + 1, dtype=torch.bool), ValueError, r"key-padding mask \(B, M\) = \(2, 5\), got \(2, 6\)"),
    (torch.ones(3, M, dtype=torch.bool), ValueError, r"\(B, M\) = \(2, 5\), got \(3, 5\)"),
    (torch.ones(2, 1, N + 1, M, dtype=torch.bool), ValueError, r"not broadcastable to \(B, h, N, M\) = \(2, 4, 7, 5\)"),
    (torch.ones(2, M, dtype=torch.int64), TypeError, r"bool .* or floating"),
], ids=["M", "batch", "pattern", "int"])
def test_bad_masks_raise_naming_the_mechanism_and_shapes(mask, err, match):
    with pytest.raises(err, match=match) as info:
        cross()(*inputs(), attn_mask=mask)
    assert str(info.value).startswith("cross_mhsa: "), str(info.value)
