"""visor against its formula (a naive float64 reference), mhsa over [V; T], HF Qwen2Attention
(optional), gradcheck, the context cache, hooks, FLOPs, errors.

The naive reference below is written from the formula in src/attnlab/mechanisms/visor.py's
docstring with the module's weights (q_proj, k_proj, v_proj, o_proj as HF Qwen2), in float64,
with einsums and an explicit (query position, key position) mask built in a loop. It shares no
code with attnlab: the joint sequence is [V; T], text token t sits at position M + t, a text query
attends every visual key (unless padded) and, when causal, text keys at positions <= its own.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import attnlab
from attnlab import ContextCache, KVCache

DIM, HEADS = 32, 4
N, M = 6, 5
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)


def visor(dtype=torch.float64, **options):
    return attnlab.create("visor", DIM, HEADS, **{"qkv_bias": True, **options}).to(dtype).eval()


def inputs(B=2, n=N, m=M, dtype=torch.float64):
    return torch.randn(B, n, DIM, dtype=dtype), torch.randn(B, m, DIM, dtype=dtype)


def _linear(t, lin):
    out = torch.einsum("blc,oc->blo", t, lin.weight)
    return out if lin.bias is None else out + lin.bias


def naive(mod, x, ctx, attn_mask=None, causal=False, rows="text"):
    """softmax(Q [K_V; K_T]^T / sqrt(d) + mask) [V_V; V_T], then o_proj.

    rows="text": the text queries (the cross layer, `forward`); rows="all": every token of [V; T]
    queries (the refinement layer, `joint`), returned as (text, visual). attn_mask: None, a (B, M)
    bool key padding over the visual tokens, a bool (B, 1, N, M) pattern or a float (B, 1, N, M)
    bias over (text query, visual key) pairs (the last two for rows="text" only).
    """
    B, n, C = x.shape
    m = ctx.shape[1]
    h, h_kv = mod.num_heads, mod.num_kv_heads
    d = C // h
    seq = torch.cat([ctx, x], 1)                                           # (B, m + n, C): [V; T]
    queries = x if rows == "text" else seq
    q_pos = list(range(m, m + n)) if rows == "text" else list(range(m + n))
    L = queries.shape[1]
    q = _linear(queries, mod.q_proj).reshape(B, L, h, d).transpose(1, 2)   # (B, h, L, d)
    k = _linear(seq, mod.k_proj).reshape(B, m + n, h_kv, d).transpose(1, 2)
    v = _linear(seq, mod.v_proj).reshape(B, m + n, h_kv, d).transpose(1, 2)
    group = torch.arange(h) // (h // h_kv)
    k, v = k[:, group], v[:, group]                                        # (B, h, m + n, d)
    scale = 1.0 / math.sqrt(d) if mod.scale is None else mod.scale
    scores = torch.einsum("bhld,bhsd->bhls", q, k) * scale                 # (B, h, L, m + n)
    allowed = torch.ones(B, 1, L, m + n, dtype=torch.bool)
    bias = torch.zeros(B, 1, L, m + n, dtype=torch.float64)
    for i, p in enumerate(q_pos):
        for j in range(m + n):
            if causal and j > p:
                allowed[:, :, i, j] = False
            if j < m and attn_mask is not None:
                if attn_mask.dim() == 2:
                    allowed[:, :, i, j] &= attn_mask[:, j, None]
                elif attn_mask.dtype == torch.bool:
                    allowed[:, :, i, j] &= attn_mask[:, :, i, j]
                else:
                    bias[:, :, i, j] = attn_mask[:, :, i, j]
    allowed &= bias != -math.inf
    scores = (scores + bias.masked_fill(~allowed, 0.0)).masked_fill(~allowed, -math.inf)
    probs = scores.softmax(-1)
    out = torch.einsum("bhls,bhsd->bhld", probs, v).transpose(1, 2).reshape(B, L, C)
    out = _linear(out, mod.o_proj)
    return out if rows == "text" else (out[:, m:], out[:, :m])


def make_mask(kind, B, n=N, m=M):
    if kind is None:
        return None
    if kind == "padding":
        valid = torch.rand(B, m) > 0.4
        valid[:, 0] = True
        return valid
    if kind == "empty_row":                # sample 1 has no visual token: its text attends the text only
        valid = torch.rand(B, m) > 0.4
        valid[0, 0] = True
        valid[1] = False
        return valid
    if kind == "pattern":
        return torch.rand(B, 1, n, m) > 0.5
    bias = torch.randn(B, 1, n, m, dtype=torch.float64)     # "float": added to the scores
    bias[..., 1] = -math.inf
    return bias


MASKS = [None, "padding", "empty_row", "pattern", "float"]
OPTIONS = {
    "default": dict(),
    "gqa": dict(num_kv_heads=2),
    "mqa": dict(num_kv_heads=1),
    "scale": dict(scale=0.3),
    "qwen2": dict(proj_bias=False),
    "no_bias": dict(qkv_bias=False, proj_bias=False),
}


def outputs_and_grads(fn, mod, tensors, cotangents):
    ys = fn(*tensors)
    ys = ys if isinstance(ys, tuple) else (ys,)
    loss = sum((y * c).sum() for y, c in zip(ys, cotangents))
    return ys, torch.autograd.grad(loss, [*tensors, *mod.parameters()])


# --- the cross layer (forward) -------------------------------------------------------------------

@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_forward_matches_naive_reference_outputs_and_grads(mask, options, causal, backend):
    mod = visor(backend=backend, **options)
    x, ctx = (t.requires_grad_(True) for t in inputs())
    attn_mask = make_mask(mask, 2)
    cot = [torch.randn(2, N, DIM, dtype=torch.float64)]
    ys, grads = outputs_and_grads(lambda a, b: mod(a, b, attn_mask=attn_mask, is_causal=causal), mod, (x, ctx), cot)
    ys_ref, grads_ref = outputs_and_grads(lambda a, b: naive(mod, a, b, attn_mask, causal), mod, (x, ctx), cot)
    assert_close(ys[0], ys_ref[0], **TIGHT)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, **GRAD)


def test_float32_matches_naive_float64_and_keeps_dtype():
    mod = visor(torch.float32, num_kv_heads=2)
    x, ctx = inputs(3, 9, 11, torch.float32)
    y = mod(x, ctx, is_causal=True)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert_close(y.double(), naive(mod.double(), x.double(), ctx.double(), causal=True), rtol=1e-5, atol=1e-6)


def test_fully_masked_or_empty_context_is_text_self_attention():
    """No visual token present: the text attends the text only, whether the context is fully masked,
    empty, or the text-only layer runs; that equals mhsa with the same weights."""
    mod = visor(num_kv_heads=2)
    x, ctx = inputs()
    none = torch.zeros(2, M, dtype=torch.bool)
    for causal in (False, True):
        ref = naive(mod, x, ctx[:, :0], causal=causal)
        assert_close(mod(x, ctx, attn_mask=none, is_causal=causal), ref, **TIGHT)
        assert_close(mod(x, ctx[:, :0], is_causal=causal), ref, **TIGHT)
        assert_close(mod.text_self_attention(x, is_causal=causal), ref, **TIGHT)
        assert_close(mhsa_from(mod)(x, is_causal=causal), ref, **TIGHT)


def test_visual_tokens_change_the_text_only_where_present():
    mod = visor()
    x, ctx = inputs()
    valid = torch.tensor([[True, False, True, True, False], [True] * M])
    y = mod(x, ctx, attn_mask=valid)
    ctx2 = ctx.clone()
    ctx2[0, 1] += 5.0                                     # a padded token
    assert_close(mod(x, ctx2, attn_mask=valid), y, **TIGHT)
    ctx2[0, 2] += 5.0                                     # a present one
    assert not torch.allclose(mod(x, ctx2, attn_mask=valid)[0], y[0])


# --- the refinement layer (joint) and the text-only layer ----------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("mask", [None, "padding"], ids=str)
def test_joint_matches_naive_reference_outputs_and_grads(mask, options, causal):
    mod = visor(**options)
    x, ctx = (t.requires_grad_(True) for t in inputs())
    attn_mask = make_mask(mask, 2)
    cot = [torch.randn(2, N, DIM, dtype=torch.float64), torch.randn(2, M, DIM, dtype=torch.float64)]
    ys, grads = outputs_and_grads(lambda a, b: mod.joint(a, b, attn_mask=attn_mask, is_causal=causal), mod,
                                  (x, ctx), cot)
    ys_ref, grads_ref = outputs_and_grads(lambda a, b: naive(mod, a, b, attn_mask, causal, rows="all"), mod,
                                          (x, ctx), cot)
    for y, y_ref in zip(ys, ys_ref):
        assert_close(y, y_ref, **TIGHT)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, **GRAD)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_joint_text_rows_are_the_cross_layer(causal):
    """A cross layer is the refinement layer with its visual query rows skipped."""
    mod = visor(num_kv_heads=2)
    x, ctx = inputs(3)
    valid = make_mask("padding", 3)
    text, visual = mod.joint(x, ctx, attn_mask=valid, is_causal=causal)
    assert text.shape == x.shape and visual.shape == ctx.shape
    assert_close(text, mod(x, ctx, attn_mask=valid, is_causal=causal), **TIGHT)


def mhsa_from(mod):
    """attnlab's mhsa with visor's weights: qkv = [q_proj; k_proj; v_proj], proj = o_proj."""
    mh = attnlab.create("mhsa", DIM, HEADS, num_kv_heads=mod.num_kv_heads, qkv_bias=mod.q_proj.bias is not None,
                        proj_bias=mod.o_proj.bias is not None, scale=mod.scale).double().eval()
    state = {"qkv.weight": torch.cat([mod.q_proj.weight, mod.k_proj.weight, mod.v_proj.weight]),
             "proj.weight": mod.o_proj.weight}
    if mod.q_proj.bias is not None:
        state["qkv.bias"] = torch.cat([mod.q_proj.bias, mod.k_proj.bias, mod.v_proj.bias])
    if mod.o_proj.bias is not None:
        state["proj.bias"] = mod.o_proj.bias
    mh.load_state_dict(state)
    return mh


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("options", [dict(), dict(num_kv_heads=2, proj_bias=False)], ids=["mha", "gqa"])
def test_joint_is_mhsa_over_the_concatenation(options, causal):
    """Limiting case: the refinement layer is plain self-attention over [V; T] (LLaVA's layer)."""
    mod = visor(**options)
    x, ctx = inputs()
    text, visual = mod.joint(x, ctx, is_causal=causal)
    full = mhsa_from(mod)(torch.cat([ctx, x], 1), is_causal=causal)           # (B, M + N, C)
    assert_close(torch.cat([visual, text], 1), full, **TIGHT)
    valid = make_mask("padding", 2)
    text, visual = mod.joint(x, ctx, attn_mask=valid)
    keys = torch.cat([valid, torch.ones(2, N, dtype=torch.bool)], 1)
    assert_close(torch.cat([visual, text], 1), mhsa_from(mod)(torch.cat([ctx, x], 1), attn_mask=keys), **TIGHT)


def test_text_self_attention_takes_a_text_mask():
    mod = visor()
    x, _ = inputs()
    pad = torch.tensor([[True] * N, [True] * (N - 2) + [False] * 2])
    assert_close(mod.text_self_attention(x, attn_mask=pad), mhsa_from(mod)(x, attn_mask=pad), **TIGHT)


# --- HuggingFace Qwen2 (LLaVA-OneVision's language model), optional ------------------------------

@pytest.mark.hf
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_matches_hf_qwen2_attention_with_copied_weights_and_no_rotation(causal):
    """The key map of the docstring: a Qwen2 layer's self_attn.{q,k,v,o}_proj load as they are. With
    the rotary embedding switched off (cos = 1, sin = 0), Qwen2Attention over [V; T] is `joint`."""
    pytest.importorskip("transformers")
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    config = Qwen2Config(hidden_size=DIM, num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=64,
                         num_hidden_layers=1, attention_dropout=0.0, attn_implementation="sdpa")
    hf = Qwen2Attention(config, layer_idx=0).double().eval()
    mod = visor(num_kv_heads=2, proj_bias=False)
    mod.load_state_dict(hf.state_dict(), strict=True)
    x, ctx = inputs()
    seq = torch.cat([ctx, x], 1)                                               # (B, M + N, C)
    d = DIM // HEADS
    rope_off = (torch.ones(2, M + N, d, dtype=torch.float64), torch.zeros(2, M + N, d, dtype=torch.float64))
    # HF's 4-D additive mask, 0 where allowed and the dtype's minimum elsewhere, given in both cases
    # (without one HF's SDPA path is causal). SDPA, not HF's eager path: that one runs the softmax
    # in float32 whatever the input (3.6e-8 from float64 here).
    mask = torch.zeros(1, 1, M + N, M + N, dtype=torch.float64)
    if causal:
        mask = torch.full((M + N, M + N), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        y_hf, _ = hf(seq, position_embeddings=rope_off, attention_mask=mask)
        text, visual = mod.joint(x, ctx, is_causal=causal)
        cross = mod(x, ctx, is_causal=causal)
    print(f"max |visor.joint - HF Qwen2Attention| = {(torch.cat([visual, text], 1) - y_hf).abs().max().item():.3e}")
    assert_close(torch.cat([visual, text], 1), y_hf, **TIGHT)
    assert_close(cross, y_hf[:, M:], **TIGHT)


# --- gradcheck -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_gradcheck(masked, causal, backend):
    mod = attnlab.create("visor", 4, 2, qkv_bias=True, num_kv_heads=1, backend=backend).double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, True], [False, False, True, False]]) if masked else None
    names = [n for n, _ in mod.named_parameters()]
    weights = [mod.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def cross(x, ctx, *ws):
        return torch.func.functional_call(mod, dict(zip(names, ws)), (x, ctx), dict(attn_mask=mask, is_causal=causal))

    def joint(x, ctx, *ws):
        params = {f"m.{n}": w for n, w in zip(names, ws)}
        text, visual = torch.func.functional_call(_Joint(mod), params, (x, ctx), dict(attn_mask=mask, is_causal=causal))
        return torch.cat([visual, text], 1)

    assert torch.autograd.gradcheck(cross, (x, ctx, *weights), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(joint, (x, ctx, *weights), eps=1e-6, atol=1e-7)


class _Joint(torch.nn.Module):
    """`joint` as a module's forward, for functional_call."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, ctx, **kw):
        return self.m.joint(x, ctx, **kw)


# --- the context cache -----------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_context_cache_projects_the_visual_tokens_once(causal):
    mod = visor(num_kv_heads=2)
    calls = []
    mod.k_proj.register_forward_hook(lambda m, i, out: calls.append(i[0].shape[1]))
    _, ctx = inputs()
    valid = torch.tensor([[True] * M, [True, False, True, True, False]])
    cache = ContextCache()
    for t in range(4):
        x_t = torch.randn(2, 1 + t % 2, DIM, dtype=torch.float64)
        y_t = mod(x_t, ctx, attn_mask=valid, is_causal=causal, cache=cache)
        assert_close(y_t, naive(mod, x_t, ctx, valid, causal), **TIGHT)
    # the visual tokens (M rows) went through k_proj once; every step projected its own text
    assert calls.count(M) == 1 and sorted(c for c in calls if c != M) == [1, 1, 2, 2]
    assert cache.keys.shape == (2, 2, M, DIM // HEADS) == cache.values.shape


def test_a_kv_cache_is_refused():
    mod = visor()
    with pytest.raises(TypeError, match="ContextCache") as info:
        mod(*inputs(), cache=KVCache())
    assert "visor" in str(info.value) and "KVCache" in str(info.value)


def test_hooks_carry_the_joint_keys():
    mod = visor(num_kv_heads=2, backend="reference")
    shapes = {}
    for name in mod.hook_names:
        getattr(mod, name).register_forward_hook(lambda m, i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
    x, ctx = inputs()
    d = DIM // HEADS
    mod(x, ctx, cache=ContextCache())
    assert shapes == {"hook_q": (2, HEADS, N, d), "hook_k": (2, 2, M + N, d), "hook_v": (2, 2, M + N, d),
                      "hook_scores": (2, HEADS, N, M + N), "hook_probs": (2, HEADS, N, M + N),
                      "hook_out": (2, HEADS, N, d)}
    mod.joint(x, ctx)
    assert shapes["hook_q"] == (2, HEADS, M + N, d) and shapes["hook_scores"] == (2, HEADS, M + N, M + N)


# --- GQA, options, dropout -------------------------------------------------------------------------

def test_gqa_equals_full_heads_with_repeated_kv_weights():
    mod = visor(num_kv_heads=2)
    full = visor()
    d = DIM // HEADS

    def rep(t):  # (h_kv d, ...) -> (h d, ...): kv head j serves query heads 2j, 2j + 1
        return t.reshape(2, d, *t.shape[1:]).repeat_interleave(HEADS // 2, dim=0).reshape(HEADS * d, *t.shape[1:])

    with torch.no_grad():
        full.q_proj.load_state_dict(mod.q_proj.state_dict())
        full.o_proj.load_state_dict(mod.o_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            getattr(full, name).weight.copy_(rep(getattr(mod, name).weight))
            getattr(full, name).bias.copy_(rep(getattr(mod, name).bias))
    x, ctx = inputs()
    assert_close(mod(x, ctx, is_causal=True), full(x, ctx, is_causal=True), **TIGHT)


def test_dropout_acts_in_training_only():
    mod = visor(attn_drop=0.5, proj_drop=0.5)
    x, ctx = inputs()
    y = mod(x, ctx)
    assert_close(mod(x, ctx), y, rtol=0, atol=0)
    mod.train()
    torch.manual_seed(0)
    assert not torch.allclose(mod(x, ctx), y)


@pytest.mark.parametrize("options,match", [
    (dict(num_kv_heads=3), "num_kv_heads must be a positive divisor of num_heads"),
    (dict(num_kv_heads=0), "num_kv_heads must be a positive divisor"),
    (dict(num_kv_heads=True), "num_kv_heads must be a positive divisor"),
    (dict(scale=0.0), "scale must be a finite number > 0"),
    (dict(attn_drop=1.0), "attn_drop must be a number in"),
])
def test_bad_options_name_what_was_expected(options, match):
    with pytest.raises(ValueError, match=match) as info:
        attnlab.create("visor", DIM, HEADS, **options)
    assert "visor" in str(info.value)


def test_bad_dims_are_refused():
    with pytest.raises(ValueError, match="visor"):
        attnlab.create("visor", 30, 4)


def test_bad_inputs_name_the_mechanism_and_the_shapes():
    mod = visor()
    x, ctx = inputs()
    with pytest.raises(ValueError, match=r"visor: expected context of width C=32, got 24"):
        mod(x, torch.randn(2, M, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"visor: joint takes a \(B, M\) = \(2, 5\) bool key-padding mask"):
        mod.joint(x, ctx, attn_mask=torch.ones(2, 1, N, M, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"visor: joint takes"):
        mod.joint(x, ctx, attn_mask=torch.zeros(2, M))
    with pytest.raises(ValueError, match=r"visor: .*M = 5 visual tokens"):
        mod(x, ctx, attn_mask=torch.ones(2, M + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="visor: expected x of shape"):
        mod.text_self_attention(x[0])
    with pytest.raises(TypeError, match="visor: x and context must share dtype"):
        mod(x, ctx.float())


# --- FLOPs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(), dict(num_kv_heads=2, proj_bias=False)], ids=["mha", "gqa"])
def test_useful_flops_count_what_flop_counter_mode_sees(options):
    """On the reference backend every matmul runs (einsums for the scores and weighted sum)."""
    from torch.utils.flop_counter import FlopCounterMode

    mod = visor(torch.float32, backend="reference", **options)
    x, ctx = inputs(3, N, 11, torch.float32)
    with FlopCounterMode(display=False) as counter:
        mod(x, ctx)
    fwd, bwd = mod.useful_flops(3, N, DIM, HEADS, False, context_len=11)
    assert counter.get_total_flops() == fwd and bwd == 2 * fwd
    kv = 2 * mod.num_kv_heads * (DIM // HEADS)
    assert fwd == 3 * (4 * N * DIM * DIM + 2 * (N + 11) * DIM * kv + 4 * N * (11 + N) * DIM)
    causal, _ = mod.useful_flops(3, N, DIM, HEADS, True, context_len=11)
    assert fwd - causal == 3 * 4 * DIM * N * (N - 1) // 2          # the text pairs above the diagonal
    with pytest.raises(ValueError, match="visor: useful_flops for dim=16"):
        mod.useful_flops(1, N, 16, HEADS, False)
