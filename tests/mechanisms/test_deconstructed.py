"""deconstructed: every variant against a naive float64 reference written from the paper's equations.

The reference below reads the module's weights (qk = [W_Q | W_K], v = W_V, proj = W_O; the MLP's
gate/up/down; the fixed-sequence buffer; the logit table) and recomputes section 3 of
"Deconstructing Attention" (Xue et al., 2025) with einsums and explicit masks. It shares no
code with attnlab: masks are built here as a (B, N, N) bool grid, softmax is exp / sum.
Also here: the limiting cases (standard == mhsa; StaticEmbQK / RndEmbQK with the input as
embeddings / fixed states == standard; Approximate -> Standard as the scores shrink; the
recurrent forms of Appendix I), cached decoding, gradcheck, bad input and hybrid stacks.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import attnlab
from attnlab import KVCache
from attnlab.mechanisms.deconstructed import HYBRID_CONFIGS, VARIANTS, hybrid_variants

DIM, HEADS, N_MAX = 32, 4, 16
TIGHT = dict(rtol=1e-10, atol=1e-12)


def build(variant, dim=DIM, heads=HEADS, dtype=torch.float64, **options):
    """A module of `variant` in float64 eval mode, with biases and randomised tables."""
    kw = dict(options)
    kw.setdefault("qkv_bias", True)
    if variant in ("rnd_emb_qk", "fixed"):
        kw.setdefault("max_seq_len", N_MAX)
    if variant == "rnd_emb_qk":
        kw.setdefault("seed", 0)
    if variant == "fixed_seq_qk" and "fixed_states" not in kw:
        kw["fixed_states"] = torch.randn(N_MAX, dim, dtype=torch.float64)
    m = attnlab.create(f"deconstructed:{variant}", dim, heads, **kw).to(dtype).eval()
    if variant == "fixed":
        with torch.no_grad():
            m.logits.normal_()      # default init is tiny; make the table matter
    return m


def extra_inputs(m, B, N, dtype=torch.float64):
    return {"embeddings": torch.randn(B, N, m.dim, dtype=dtype)} if m.needs_embeddings else {}


# --- the naive reference -----------------------------------------------------------------------

def linear(x, layer):
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def split_heads(t, h):
    B, N, C = t.shape
    return t.reshape(B, N, h, C // h).transpose(1, 2)                      # (B, h, N, d)


def allowed_grid(B, N, key_valid=None, pattern=None, is_causal=False):
    """(B, N, N) bool, True = query i may use key j."""
    allowed = torch.ones(B, N, N, dtype=torch.bool)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    if pattern is not None:
        allowed = allowed & pattern
    if is_causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    return allowed


def normalise(weights, allowed):
    """Rows of nonnegative weights over allowed keys -> probabilities; empty rows -> 0."""
    weights = torch.where(allowed, weights, torch.zeros(()))
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / torch.where(total > 0, total, torch.ones(())), torch.zeros(()))


def naive(m, x, allowed, embeddings=None, fixed_states=None):
    """Section 3 of the paper, per variant, with the module's weights. allowed: (B, N, N)."""
    B, N, C = x.shape
    h = m.num_heads
    d = C // h
    al = allowed[:, None]                                                   # (B, 1, N, N)
    if m.variant == "mlp":                                                  # Eq. 4-5, A = I
        out = linear(F.silu(linear(x, m.gate)) * linear(x, m.up), m.down)
        return out * torch.diagonal(allowed, dim1=1, dim2=2)[..., None]
    V = split_heads(linear(x, m.v), h)                                      # (B, h, N, d)
    if m.variant == "fixed":                                                # learned logit table
        A = normalise(torch.exp(m.logits[None, :, :N, :N]), al)
    else:
        Wq, Wk = m.qk.weight[:C], m.qk.weight[C:]
        bq = bk = 0.0
        if m.qk.bias is not None:
            bq, bk = m.qk.bias[:C], m.qk.bias[C:]
        if m.variant in ("rnd_emb_qk", "fixed_seq_qk"):                     # Eq. 10, 12
            src = (m.fixed_states if fixed_states is None else fixed_states)[:N].expand(B, N, C)
        elif m.variant == "static_emb_qk":                                  # Eq. 13
            src = embeddings
        else:                                                               # Eq. 3
            src = x
        Q = split_heads(src @ Wq.T + bq, h)
        K = split_heads(src @ Wk.T + bk, h)
        if m.variant == "non_approximate":                                  # Eq. 7-8
            s = (F.silu(Q) * K).sum(-1) / math.sqrt(d)                      # (B, h, N), one per key
            A = normalise(torch.exp(s)[:, :, None, :].expand(B, h, N, N), al)
        else:
            s = torch.einsum("bhid,bhjd->bhij", Q, K) / math.sqrt(d)
            if m.variant == "approximate":                                  # Eq. 6
                A = normalise(1 + s + s ** 2 / 2, al)
            else:                                                           # Eq. 1-2
                A = normalise(torch.exp(s), al)
    O = torch.einsum("bhij,bhjd->bhid", A, V)                               # (B, h, N, d)
    return linear(O.transpose(1, 2).reshape(B, N, C), m.proj)


def inputs_and_grads(m, fn, x, extra):
    """Output and the gradients of a fixed random projection of it w.r.t. x, extra inputs, params."""
    leaves = [x, *extra.values(), *[p for p in m.parameters()]]
    y = fn()
    g = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum(), leaves)
    return y, g


MASK_CASES = ("none", "causal", "causal_padding", "pattern")


@pytest.mark.parametrize("mask_case", MASK_CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference_outputs_and_grads(variant, mask_case):
    m = build(variant)
    B, N = 2, 7
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    extra = {k: v.requires_grad_(True) for k, v in extra_inputs(m, B, N).items()}
    key_valid = pattern = None
    is_causal = mask_case.startswith("causal")
    attn_mask = None
    if mask_case == "causal_padding":
        key_valid = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
        attn_mask = key_valid
    elif mask_case == "pattern":
        pattern = torch.rand(B, N, N) > 0.4
        pattern[0, 3] = False                                               # one empty row
        attn_mask = pattern[:, None]                                        # (B, 1, N, N)
    allowed = allowed_grid(B, N, key_valid, pattern, is_causal)
    y, g = inputs_and_grads(m, lambda: m(x, attn_mask=attn_mask, is_causal=is_causal, **extra), x, extra)
    y_ref, g_ref = inputs_and_grads(m, lambda: naive(m, x, allowed, **extra), x, extra)
    assert_close(y, y_ref, **TIGHT)
    for a, b in zip(g, g_ref):
        assert_close(a, b, **TIGHT)
    # the reference is not trivially satisfied: other weights give other outputs
    if variant != "mlp":
        with torch.no_grad():
            m.proj.weight.add_(0.1)
        assert not torch.allclose(m(x, attn_mask=attn_mask, is_causal=is_causal, **extra), y_ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float_mask_equals_bool_mask(variant):
    m = build(variant)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    extra = extra_inputs(m, 2, 6)
    allowed = torch.rand(2, 1, 6, 6) > 0.5
    allowed[..., 0] = True
    as_float = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    assert_close(m(x, attn_mask=as_float, **extra), m(x, attn_mask=allowed, **extra), **TIGHT)


def test_approximate_float_mask_weights_like_softmax():
    """A finite float mask m multiplies the Taylor weights by exp(m), as adding m to softmax scores does."""
    m = build("approximate")
    B, N = 1, 5
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    bias = torch.randn(B, 1, N, N, dtype=torch.float64)
    C, h = DIM, HEADS
    d = C // h
    Q = split_heads(linear(x, m.qk)[..., :C], h)
    K = split_heads(linear(x, m.qk)[..., C:], h)
    V = split_heads(linear(x, m.v), h)
    s = torch.einsum("bhid,bhjd->bhij", Q, K) / math.sqrt(d)
    w = (1 + s + s ** 2 / 2) * torch.exp(bias)
    O = torch.einsum("bhij,bhjd->bhid", w / w.sum(-1, keepdim=True), V)
    ref = linear(O.transpose(1, 2).reshape(B, N, C), m.proj)
    assert_close(m(x, attn_mask=bias), ref, **TIGHT)


# --- properties per variant --------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_no_leak(variant):
    m = build(variant)
    B, N, t = 2, 9, 4
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    extra = extra_inputs(m, B, N)
    x2 = x.clone()
    x2[:, t:] = 3 * torch.randn(B, N - t, DIM, dtype=torch.float64)
    extra2 = {k: v.clone() for k, v in extra.items()}
    for v in extra2.values():
        v[:, t:] = 3 * torch.randn(B, N - t, DIM, dtype=torch.float64)
    y, y2 = m(x, is_causal=True, **extra), m(x2, is_causal=True, **extra2)
    assert_close(y2[:, :t], y[:, :t], **TIGHT)
    assert not torch.allclose(y2[:, t:], y[:, t:])


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_keys_have_no_effect(variant, is_causal):
    m = build(variant)
    B, N = 3, 8
    valid = torch.rand(B, N) > 0.4
    valid[:, 0] = True
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    extra = extra_inputs(m, B, N)
    x2 = x.clone()
    x2[~valid] = 1e3 * torch.randn(int((~valid).sum()), DIM, dtype=torch.float64)
    extra2 = {k: v.clone() for k, v in extra.items()}
    for v in extra2.values():
        v[~valid] = 1e3 * torch.randn(int((~valid).sum()), DIM, dtype=torch.float64)
    y = m(x, attn_mask=valid, is_causal=is_causal, **extra)
    y2 = m(x2, attn_mask=valid, is_causal=is_causal, **extra2)
    assert torch.isfinite(y2).all()
    assert_close(y2[valid], y[valid], **TIGHT)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fully_masked_rows_finite_with_finite_grads(variant):
    m = build(variant)
    B, N = 3, 6
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1] = False
    valid[2, 3:] = False
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    extra = {k: v.requires_grad_(True) for k, v in extra_inputs(m, B, N).items()}
    y = m(x, attn_mask=valid, is_causal=True, **extra)
    assert torch.isfinite(y).all()
    # every row of the all-padding sample is the zero attention output through proj (its bias)
    expected = torch.zeros(DIM, dtype=torch.float64) if variant == "mlp" else m.proj.bias.detach()
    assert_close(y[1], expected.expand(N, DIM), rtol=0, atol=1e-12)
    grads = torch.autograd.grad(y.sum(), [x, *extra.values(), *m.parameters()], allow_unused=True)
    for g in grads:
        assert g is None or torch.isfinite(g).all()


CHUNKS = [3, 1, 1, 3]


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decode_matches_full_causal_forward(variant):
    m = build(variant)
    B, N = 2, sum(CHUNKS)
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    extra = extra_inputs(m, B, N)
    valid = torch.rand(B, N) > 0.3
    valid[:, 0] = True
    full = m(x, attn_mask=valid, is_causal=True, **extra)
    cache, outs, start = KVCache(), [], 0
    with torch.no_grad():
        for n in CHUNKS:
            end = start + n
            step_extra = {k: v[:, start:end] for k, v in extra.items()}
            outs.append(m(x[:, start:end], attn_mask=valid[:, :end], is_causal=True, cache=cache, **step_extra))
            start = end
    assert len(cache) == N
    assert_close(torch.cat(outs, dim=1), full, **TIGHT)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(variant):
    kw = {}
    if variant == "fixed_seq_qk":
        kw["fixed_states"] = torch.randn(4, 4, dtype=torch.float64)
    if variant in ("rnd_emb_qk", "fixed"):
        kw["max_seq_len"] = 4
    m = build(variant, dim=4, heads=2, **kw)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    if m.needs_embeddings:
        e = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, e: m(x, attn_mask=valid, is_causal=True, embeddings=e), (x, e))
    else:
        assert torch.autograd.gradcheck(lambda x: m(x, attn_mask=valid, is_causal=True), (x,))


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_and_bf16_dtype_kept(variant):
    m = build(variant, dtype=torch.float32)
    x = torch.randn(2, 5, DIM)
    extra = extra_inputs(m, 2, 5, torch.float32)
    y32 = m(x, is_causal=True, **extra)
    m16 = m.to(torch.bfloat16)
    y16 = m16(x.bfloat16(), is_causal=True, **{k: v.bfloat16() for k, v in extra.items()})
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
    assert torch.isfinite(y16).all()
    assert_close(y16.float(), m16.float()(x.bfloat16().float(), is_causal=True,
                                           **{k: v.bfloat16().float() for k, v in extra.items()}),
                 rtol=3e-2, atol=3e-2)


# --- limiting cases ----------------------------------------------------------------------------

def copy_attention_weights(src, dst):
    with torch.no_grad():
        for name in ("qk", "v", "proj"):
            getattr(dst, name).weight.copy_(getattr(src, name).weight)
            getattr(dst, name).bias.copy_(getattr(src, name).bias)


def test_standard_equals_mhsa():
    m = build("standard")
    ref = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True).double().eval()
    with torch.no_grad():
        ref.qkv.weight.copy_(torch.cat([m.qk.weight, m.v.weight]))         # [q | k | v] heads
        ref.qkv.bias.copy_(torch.cat([m.qk.bias, m.v.bias]))
        ref.proj.weight.copy_(m.proj.weight)
        ref.proj.bias.copy_(m.proj.bias)
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    valid = torch.rand(2, 9) > 0.3
    assert_close(m(x, attn_mask=valid, is_causal=True), ref(x, attn_mask=valid, is_causal=True), **TIGHT)


def test_static_emb_qk_with_the_input_as_embeddings_is_standard():
    m, std = build("static_emb_qk"), build("standard")
    copy_attention_weights(m, std)
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    assert_close(m(x, is_causal=True, embeddings=x), std(x, is_causal=True), **TIGHT)
    assert not torch.allclose(m(x, is_causal=True, embeddings=torch.randn_like(x)), std(x, is_causal=True))


@pytest.mark.parametrize("variant", ["rnd_emb_qk", "fixed_seq_qk"])
def test_fixed_sequence_equal_to_the_input_is_standard(variant):
    """With X = the input itself (batch 1), Eq. 10/12 reduce to Eq. 3."""
    m, std = build(variant), build("standard")
    copy_attention_weights(m, std)
    x = torch.randn(1, 7, DIM, dtype=torch.float64)
    assert_close(m(x, is_causal=True, fixed_states=x[0]), std(x, is_causal=True), **TIGHT)
    assert_close(m(x, is_causal=True, fixed_states=x), std(x, is_causal=True), **TIGHT)
    # ... and by default the map is input independent: two inputs share one attention matrix
    x2 = torch.randn(1, 7, DIM, dtype=torch.float64)
    with torch.no_grad():
        m.v.weight.copy_(torch.eye(DIM)), m.v.bias.zero_(), m.proj.weight.copy_(torch.eye(DIM)), m.proj.bias.zero_()
    ones = torch.ones(1, 7, DIM, dtype=torch.float64)
    assert_close(m(ones, is_causal=True), ones, **TIGHT)                    # rows of A sum to 1
    lin = m(x + 2 * x2, is_causal=True)                                     # A (x + 2 x2) = A x + 2 A x2
    assert_close(lin, m(x, is_causal=True) + 2 * m(x2, is_causal=True), **TIGHT)


def test_approximate_tends_to_standard_as_scores_shrink():
    """T(s) = 1 + s + s^2/2 agrees with exp(s) up to s^3/6: small scores, small error; large, not."""
    m, std = build("approximate"), build("standard")
    copy_attention_weights(m, std)
    x = torch.randn(2, 8, DIM, dtype=torch.float64)
    for mod in (m, std):
        with torch.no_grad():
            mod.qk.weight.mul_(0.05)
            mod.qk.bias.mul_(0.05)
    assert_close(m(x, is_causal=True), std(x, is_causal=True), rtol=1e-5, atol=1e-6)
    for mod in (m, std):
        with torch.no_grad():
            mod.qk.weight.mul_(60.0)
            mod.qk.bias.mul_(60.0)
    assert not torch.allclose(m(x, is_causal=True), std(x, is_causal=True), rtol=1e-3, atol=1e-3)


def test_approximate_equals_its_linear_recurrent_form():
    """Appendix I: the Taylor weights factor through phi(q) = [1, q / d^(1/4), (q q^T) / (sqrt 2 sqrt d)],
    so causal Approximate attention is a running sum of phi(k_j) v_j^T over a running sum of phi(k_j)."""
    m = build("approximate")
    B, N, C, h = 2, 6, DIM, HEADS
    d = C // h
    x = torch.randn(B, N, C, dtype=torch.float64)
    Q = split_heads(linear(x, m.qk)[..., :C], h)
    K = split_heads(linear(x, m.qk)[..., C:], h)
    V = split_heads(linear(x, m.v), h)

    def phi(t):                                                             # (..., d) -> (..., 1 + d + d^2)
        outer = (t[..., :, None] * t[..., None, :]).flatten(-2) / (math.sqrt(2) * math.sqrt(d))
        return torch.cat([torch.ones_like(t[..., :1]), t / d ** 0.25, outer], dim=-1)

    num = torch.zeros(B, h, 1 + d + d * d, d, dtype=torch.float64)
    den = torch.zeros(B, h, 1 + d + d * d, dtype=torch.float64)
    outs = []
    for i in range(N):                                                      # Eq. 14-17, one normaliser
        fk = phi(K[:, :, i])
        num = num + fk[..., None] * V[:, :, i, None, :]
        den = den + fk
        fq = phi(Q[:, :, i])
        outs.append(torch.einsum("bhf,bhfd->bhd", fq, num) / torch.einsum("bhf,bhf->bh", fq, den)[..., None])
    O = torch.stack(outs, dim=2)
    ref = linear(O.transpose(1, 2).reshape(B, N, C), m.proj)
    assert_close(m(x, is_causal=True), ref, **TIGHT)


def test_non_approximate_equals_its_recurrence_eq18():
    m = build("non_approximate")
    B, N, C, h = 2, 6, DIM, HEADS
    d = C // h
    x = torch.randn(B, N, C, dtype=torch.float64)
    Q = F.silu(split_heads(linear(x, m.qk)[..., :C], h))
    K = split_heads(linear(x, m.qk)[..., C:], h)
    V = split_heads(linear(x, m.v), h)
    num = torch.zeros(B, h, d, dtype=torch.float64)
    den = torch.zeros(B, h, 1, dtype=torch.float64)
    outs = []
    for i in range(N):                  # o_i = sum_{j<=i} e^{q_j k_j} v_j / sum_{j<=i} e^{q_j k_j}
        w = torch.exp((Q[:, :, i] * K[:, :, i]).sum(-1, keepdim=True) / math.sqrt(d))
        num, den = num + w * V[:, :, i], den + w
        outs.append(num / den)
    O = torch.stack(outs, dim=2)
    assert_close(m(x, is_causal=True), linear(O.transpose(1, 2).reshape(B, N, C), m.proj), **TIGHT)


def test_fixed_with_zero_logits_is_a_causal_mean():
    m = build("fixed")
    with torch.no_grad():
        m.logits.zero_()
        m.v.weight.copy_(torch.eye(DIM)), m.v.bias.zero_(), m.proj.weight.copy_(torch.eye(DIM)), m.proj.bias.zero_()
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    mean = x.cumsum(1) / torch.arange(1, 8, dtype=torch.float64)[None, :, None]
    assert_close(m(x, is_causal=True), mean, **TIGHT)


def test_mlp_has_no_token_mixing_and_matched_parameters():
    m = build("mlp", qkv_bias=False)
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    y = m(x)
    x2 = x.clone()
    x2[:, 3] += 1.0
    y2 = m(x2)
    assert_close(y2[:, [0, 1, 2, 4, 5, 6]], y[:, [0, 1, 2, 4, 5, 6]], **TIGHT)
    assert m.gate.out_features == round(4 * DIM / 3)
    std = build("standard", qkv_bias=False)
    n_mlp = sum(p.numel() for n, p in m.named_parameters() if not n.endswith("bias"))
    n_std = sum(p.numel() for n, p in std.named_parameters() if not n.endswith("bias"))
    assert abs(n_mlp - n_std) <= 3 * DIM                                    # rounding of 4C/3 only
    assert m.down.bias is not None and m.gate.bias is None                  # proj_bias / qkv_bias


@pytest.mark.parametrize("variant", ["standard", "approximate", "non_approximate", "rnd_emb_qk",
                                     "fixed_seq_qk", "static_emb_qk"])
def test_paper_variants_have_the_parameter_count_of_standard(variant):
    count = lambda mod: sum(p.numel() for p in mod.parameters())          # noqa: E731
    assert count(build(variant)) == count(build("standard"))


# --- options, buffers, variants ----------------------------------------------------------------

def test_variant_shorthand_and_spec():
    spec = attnlab.get_spec("deconstructed")
    assert spec.variants == VARIANTS
    for v in VARIANTS:
        m = build(v)
        assert m.variant == v
        assert m.needs_embeddings == (v == "static_emb_qk")
    assert attnlab.create("deconstructed:fixed", DIM, HEADS, max_seq_len=8).variant == "fixed"
    assert attnlab.create("deconstructed", DIM, HEADS, max_seq_len=8).variant == "rnd_emb_qk"
    with pytest.raises(TypeError, match="variant"):
        attnlab.create("deconstructed:fixed", DIM, HEADS, variant="mlp")


def test_random_embeddings_are_a_seeded_buffer():
    a = attnlab.create("deconstructed:rnd_emb_qk", DIM, HEADS, max_seq_len=8, seed=3)
    torch.manual_seed(123)
    b = attnlab.create("deconstructed:rnd_emb_qk", DIM, HEADS, max_seq_len=8, seed=3)
    c = attnlab.create("deconstructed:rnd_emb_qk", DIM, HEADS, max_seq_len=8, seed=4)
    assert_close(a.fixed_states, b.fixed_states, rtol=0, atol=0)
    assert not torch.equal(a.fixed_states, c.fixed_states)
    assert a.fixed_states.shape == (8, DIM) and a.fixed_states.dtype == torch.float32
    assert "fixed_states" in a.state_dict()
    assert all(p is not a.fixed_states for p in a.parameters())
    s = attnlab.create("deconstructed:rnd_emb_qk", DIM, HEADS, max_seq_len=4000, seed=0, fixed_std=0.5)
    assert_close(s.fixed_states.std().item(), 0.5, rtol=0.02, atol=0)
    assert attnlab.create("deconstructed:rnd_emb_qk", DIM, HEADS).fixed_states.shape == (2048, DIM)


@pytest.mark.parametrize("options,match", [
    (dict(variant="bogus"), "bogus"),
    (dict(variant="fixed_seq_qk"), "fixed_states"),
    (dict(variant="standard", mlp_hidden=8), "mlp_hidden"),
    (dict(variant="standard", seed=0), "seed"),
    (dict(variant="mlp", fixed_states=torch.zeros(4, DIM)), "fixed_states"),
    (dict(variant="approximate", backend="sdpa"), "backend"),
    (dict(variant="mlp", backend="sdpa"), "backend"),
    (dict(variant="rnd_emb_qk", max_seq_len=0), "max_seq_len"),
    (dict(variant="rnd_emb_qk", max_seq_len=True), "max_seq_len"),
    (dict(variant="rnd_emb_qk", fixed_std=-1.0), "fixed_std"),
    (dict(variant="mlp", mlp_hidden=0), "mlp_hidden"),
    (dict(variant="fixed_seq_qk", fixed_states=torch.zeros(4, DIM + 1)), r"\(4, 33\)"),
    (dict(variant="fixed_seq_qk", fixed_states=torch.zeros(4, DIM), max_seq_len=5), "max_seq_len"),
    (dict(variant="standard", attn_drop=1.0), "attn_drop"),
    (dict(variant="standard", scale=-1.0), "scale"),
    (dict(variant="standard", max_seq_len=8), "max_seq_len"),
    (dict(variant="mlp", attn_drop=0.1), "attn_drop"),
])
def test_bad_options_raise_at_create(options, match):
    with pytest.raises(ValueError, match=match):
        attnlab.create("deconstructed", DIM, HEADS, **options)


def test_unknown_variant_message_lists_the_variants():
    with pytest.raises(ValueError) as info:
        attnlab.create("deconstructed:nonsense", DIM, HEADS)
    assert all(v in str(info.value) for v in VARIANTS)


def test_bad_seed_type():
    with pytest.raises(TypeError, match="seed"):
        attnlab.create("deconstructed:rnd_emb_qk", DIM, HEADS, max_seq_len=4, seed=1.5)


@pytest.mark.parametrize("variant", ["rnd_emb_qk", "fixed"])
def test_sequence_longer_than_max_seq_len_raises(variant):
    m = build(variant, max_seq_len=8)
    with pytest.raises(ValueError, match=r"8.*9|9.*8"):
        m(torch.randn(1, 9, DIM, dtype=torch.float64))
    cache = KVCache()
    m(torch.randn(1, 6, DIM, dtype=torch.float64), is_causal=True, cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.randn(1, 3, DIM, dtype=torch.float64), is_causal=True, cache=cache)


def test_embeddings_contract_errors():
    m = build("static_emb_qk")
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="embeddings"):
        m(x)
    with pytest.raises(ValueError, match=r"\(2, 5, 32\).*\(2, 4, 32\)"):
        m(x, embeddings=torch.randn(2, 4, DIM, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        m(x, embeddings=torch.randn(2, 5, DIM))
    with pytest.raises(TypeError, match="Tensor"):
        m(x, embeddings=[[0.0]])
    with pytest.raises(ValueError, match="static_emb_qk"):
        build("standard")(x, embeddings=x)


def test_fixed_states_forward_errors():
    m = build("rnd_emb_qk")
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(5, 31\)"):
        m(x, fixed_states=torch.randn(5, DIM - 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="4 positions"):
        m(x, fixed_states=torch.randn(4, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(3, 5, 32\)"):
        m(x, fixed_states=torch.randn(3, 5, DIM, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        m(x, fixed_states=torch.zeros(5, DIM, dtype=torch.long))
    with pytest.raises(ValueError, match="fixed_states"):
        build("standard")(x, fixed_states=x[0])
    # per-sample fixed states (B, L, C) are accepted: the stack may contextualise them per batch
    assert m(x, fixed_states=torch.randn(2, 5, DIM, dtype=torch.float64)).shape == x.shape


def test_backend_reaches_ops_attention():
    from attnlab.ops import BackendUnavailable
    m = build("non_approximate", backend="flex")     # head dim 1 for q/k, d for v: flex refuses
    with pytest.raises(BackendUnavailable, match="flex"):
        m(torch.randn(1, 4, DIM, dtype=torch.float64))
    r = build("standard", backend="reference")
    s = build("standard")
    copy_attention_weights(r, s)
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    assert_close(r(x, is_causal=True), s(x, is_causal=True), **TIGHT)


# --- hybrids -----------------------------------------------------------------------------------

TABLE_11 = {   # the paper's Table 11: standard-attention layer ids of the 24-layer 500M model
    "even": set(range(2, 25, 2)), "odd": set(range(1, 25, 2)), "top": set(range(1, 13)),
    "middle": set(range(1, 7)) | set(range(19, 25)), "bottom": set(range(13, 25)),
    "quarter": {4, 8, 12, 16, 20, 24}, "first": {1}, "last": {24}, "bilateral": {1, 24},
}


@pytest.mark.parametrize("config", sorted(TABLE_11))
def test_hybrid_variants_follow_table_11(config):
    names = hybrid_variants(24, "non_approximate", config)
    standard = {i + 1 for i, n in enumerate(names) if n == "deconstructed:standard"}
    assert standard == TABLE_11[config]
    assert all(n in ("deconstructed:standard", "deconstructed:non_approximate") for n in names)


def test_hybrid_variants_other_layouts_and_errors():
    assert hybrid_variants(3, "mlp", "uniform") == ["deconstructed:mlp"] * 3
    assert hybrid_variants(2, "mlp", "all") == ["deconstructed:standard"] * 2
    assert hybrid_variants(4, "mlp", [1, 3]) == ["deconstructed:standard", "deconstructed:mlp"] * 2
    assert set(HYBRID_CONFIGS) >= set(TABLE_11)
    with pytest.raises(ValueError, match="bogus"):
        hybrid_variants(4, "mlp", "bogus")
    with pytest.raises(ValueError, match="nope"):
        hybrid_variants(4, "nope")
    with pytest.raises(ValueError, match=r"\[5\]"):
        hybrid_variants(4, "mlp", [1, 5])
    with pytest.raises(ValueError, match="num_layers"):
        hybrid_variants(0, "mlp")


def test_hybrid_stack_runs_and_decodes_with_a_cache():
    """A Transformer whose odd layers are StaticEmbQK (embeddings passed by the stack) and even
    layers standard: the full causal forward equals token-by-token decoding."""
    layers = hybrid_variants(4, "static_emb_qk", "even")
    body = attnlab.Transformer(DIM, HEADS, layers=layers, mlp_ratio=1.0).double().eval()
    assert [b.attn.variant for b in body.blocks] == ["static_emb_qk", "standard"] * 2
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    full = body(x, is_causal=True)
    cache = body.new_cache()
    steps = [body(x[:, i:i + 1], is_causal=True, cache=cache) for i in range(6)]
    assert_close(torch.cat(steps, dim=1), full, **TIGHT)


def test_non_approximate_without_causal_mask_gives_every_query_the_same_row():
    """Eq. 7, A = Softmax((Q o K) 1^T / sqrt(d_h)): a key's score s_j = SiLU(q_j).k_j / sqrt(d) does
    not involve the query, so with every key visible all rows of A, and all outputs, are equal:
    out_i = sum_j softmax_j(s_j) v_j for every i (the paper, arXiv 2510.11602 Sec. 3.3)."""
    m = build("non_approximate")
    B, N, C, h = 2, 5, DIM, HEADS
    d = C // h
    x = torch.randn(B, N, C, dtype=torch.float64)
    Q = F.silu(split_heads(linear(x, m.qk)[..., :C], h))                   # Eq. 8
    K = split_heads(linear(x, m.qk)[..., C:], h)
    V = split_heads(linear(x, m.v), h)
    w = torch.softmax((Q * K).sum(-1) / math.sqrt(d), dim=-1)               # (B, h, N) over keys
    O = torch.einsum("bhj,bhjd->bhd", w, V)[:, :, None].expand(B, h, N, d)
    y = m(x)
    assert_close(y, linear(O.transpose(1, 2).reshape(B, N, C), m.proj), **TIGHT)
    assert_close(y, y[:, :1].expand_as(y), **TIGHT)
