"""attention_pool_latent: timm's AttentionPoolLatent (the MAP head), against a naive reference.

The naive reference is written from the computation of timm/layers/attention_pool.py (read at
timm 1.0.29) with the module's parameters, in float64, one head at a time, with its own
LayerNorm and GELU:
    x <- x + pos_embed;  q = latent W_q^T + b_q;  [k | v] = x W_kv^T + b_kv
    o_i = softmax(q_norm(q_i) k_norm(k_i)^T / sqrt(d)) v_i      (head i; no valid token: 0)
    y = [o_1 ... o_h] W_o^T + b_o;  y <- y + fc2(act(fc1(norm(y))));  out = y[0] or mean_L y
The optional tests at the end compare with timm's own class and with a timm ViT's "map" head
(copied weights) when timm is installed.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import attnlab

DIM, HEADS = 24, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)


def apl(dim=DIM, heads=HEADS, dtype=torch.float64, **options):
    m = attnlab.create("attention_pool_latent", dim, heads, **options).to(dtype).eval()
    with torch.no_grad():   # trained-size parameters: non-trivial norms, a visible proj bias
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
        m.latent.normal_(0.0, 1.0)
    return m


def _layernorm(t, w, b, eps):
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + eps) * w + b


def _gelu(t, kind):
    if kind == "gelu":
        return 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))
    return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t ** 3)))


def _linear(t, lin):
    return t @ lin.weight.T + (0 if lin.bias is None else lin.bias)


def naive_apl(m, x, attn_mask=None, *, act="gelu"):
    B, N, C = x.shape
    h, d, L = m.num_heads, C // m.num_heads, m.latent_len
    if m.pos_embed is not None:
        x = x + m.pos_embed
    q = m.latent[0]                                                          # (L, latent_dim)
    if isinstance(m.q, torch.nn.Linear):
        q = _linear(q, m.q)                                                  # (L, C)
    kv = _linear(x, m.kv)                                                    # (B, N, 2C)
    k, v = kv[..., :C], kv[..., C:]
    valid = torch.ones(B, N, dtype=torch.bool)
    bias = torch.zeros(B, N, dtype=x.dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            valid = valid & attn_mask
        else:
            valid = valid & (attn_mask != float("-inf"))
            bias = bias + attn_mask.masked_fill(~valid, 0.0)
    heads = []
    for i in range(h):
        qi, ki, vi = q[:, i * d:(i + 1) * d], k[..., i * d:(i + 1) * d], v[..., i * d:(i + 1) * d]
        if isinstance(m.q_norm, torch.nn.LayerNorm):
            qi = _layernorm(qi, m.q_norm.weight, m.q_norm.bias, m.q_norm.eps)
            ki = _layernorm(ki, m.k_norm.weight, m.k_norm.bias, m.k_norm.eps)
        s = torch.einsum("ld,bnd->bln", qi, ki) / math.sqrt(d) + bias[:, None, :]
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
        a = torch.stack([torch.softmax(s[b], -1) if valid[b].any() else torch.zeros(L, N, dtype=x.dtype)
                         for b in range(B)])                                 # (B, L, N)
        heads.append(torch.einsum("bln,bnd->bld", a, vi))
    y = torch.cat(heads, -1)                                                 # (B, L, C)
    if m.mlp is not None:
        y = _linear(y, m.proj)                                               # (B, L, C_out)
        z = _layernorm(y, m.norm.weight, m.norm.bias, m.norm.eps) if isinstance(m.norm, torch.nn.LayerNorm) else y
        y = y + _linear(_gelu(_linear(z, m.mlp.fc1), act), m.mlp.fc2)
    y = y * valid.any(-1)[:, None, None]                                     # no token: zeros
    return y[:, 0] if m.pool == "token" else y.mean(1)


def make_mask(kind, B, N):
    if kind is None:
        return None
    valid = torch.rand(B, N) > 0.4
    valid[:, 0] = True
    valid[1] = False                         # one sample is all padding
    if kind == "bool":
        return valid
    return torch.zeros(B, N, dtype=torch.float64).masked_fill(~valid, float("-inf")) + torch.randn(B, N).double()


CONFIGS = {
    "default": dict(),
    "latents_avg_layernorm": dict(latent_len=3, pool_type="avg", norm="layernorm"),
    "latents_token": dict(latent_len=2),
    "qk_norm_siglip": dict(qk_norm=True, norm="layernorm", norm_eps=1e-6, act="gelu_tanh"),
    "out_features": dict(out_features=10, mlp_ratio=2.5),
    "pre_logits": dict(out_features=0),
    "no_q_proj_no_bias": dict(q_proj=False, qkv_bias=False),
    "latent_dim": dict(latent_dim=7),
    "pos_embed": dict(pos_embed="abs", feat_size=7),
    "one_head": dict(heads=1),
}


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("backend", [None, "reference"], ids=["default", "reference"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"], ids=["nomask", "bool", "float"])
@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_matches_naive_reference_outputs_and_grads(cfg, mask_kind, backend):
    torch.manual_seed(0)
    m = apl(**cfg)
    m.backend = backend
    B, N = 3, 7
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = make_mask(mask_kind, B, N)
    y, ref = m(x, attn_mask=mask), naive_apl(m, x, mask, act=cfg.get("act", "gelu"))
    assert y.shape == (B, m.out_features)
    assert_close(y, ref, **TIGHT)
    params = list(m.parameters())
    g = torch.randn_like(y)
    for got, want in zip(_grads(y, [x, *params], g), _grads(ref, [x, *params], g)):
        assert_close(got, want, **GRAD)


@pytest.mark.parametrize("backend", [None, "reference"], ids=["default", "reference"])
def test_gradcheck(backend):
    torch.manual_seed(0)
    m = apl(dim=8, heads=2, latent_len=2, pool_type="avg", qk_norm=True, norm="layernorm", mlp_ratio=1.0)
    m.backend = backend
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 4, [True, False, True, False]])
    names = [n for n, _ in m.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(m, dict(zip(names, params)), (x,), dict(attn_mask=mask))

    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8)


def test_one_token_passes_its_value_through():
    """N = 1: every head's softmax is 1, so o = v(x) and y = proj(v(x)) + MLP(norm(.))."""
    m = apl(out_features=0)
    x = torch.randn(2, 1, DIM, dtype=torch.float64)
    v = _linear(x, m.kv)[..., DIM:]
    assert_close(m(x), v[:, 0], **TIGHT)


def test_latents_are_independent_queries():
    """latent_len = L with pool 'avg' equals the average of L single-latent modules."""
    m = apl(latent_len=3, pool_type="avg", norm="layernorm")
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    singles = []
    for i in range(3):
        one = apl(latent_len=1, norm="layernorm")
        state = dict(m.state_dict())
        state["latent"] = m.latent[:, i:i + 1]
        one.load_state_dict(state)
        singles.append(one(x))
    assert_close(m(x), torch.stack(singles).mean(0), **TIGHT)


def test_probs_hook_sees_one_distribution_per_head_and_latent():
    m = apl(latent_len=2)
    m.backend = "reference"
    seen = []
    m.hook_probs.register_forward_hook(lambda mod, args, out: seen.append(out))
    m(torch.randn(2, 5, DIM, dtype=torch.float64))
    assert seen[0].shape == (2, HEADS, 2, 5)
    assert_close(seen[0].sum(-1), torch.ones(2, HEADS, 2, dtype=torch.float64))


def test_masked_tokens_have_no_effect_and_empty_samples_give_zeros():
    m = apl(latent_len=2, pool_type="avg", norm="layernorm")
    x = torch.randn(3, 6, DIM, dtype=torch.float64)
    valid = torch.tensor([[True] * 6, [True, False, True, False, True, False], [False] * 6])
    x2 = x.clone()
    x2[~valid] = 1e3 * torch.randn(int((~valid).sum()), DIM, dtype=torch.float64)
    y = m(x, attn_mask=valid)
    assert_close(m(x2, attn_mask=valid), y, **TIGHT)
    assert_close(y[1], m(x[1:2, [0, 2, 4]])[0], **TIGHT)
    assert_close(y[2], torch.zeros(DIM, dtype=torch.float64), rtol=0, atol=0)
    assert_close(m(x[:, :0]), torch.zeros(3, DIM, dtype=torch.float64), rtol=0, atol=0)


def test_float32_matches_float64():
    m64 = apl(qk_norm=True, norm="layernorm")
    m32 = attnlab.create("attention_pool_latent", DIM, HEADS, qk_norm=True, norm="layernorm")
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    y32 = m32(x.float())
    assert y32.dtype == torch.float32
    assert_close(y32.double(), m64(x), rtol=1e-5, atol=1e-5)


def test_state_dict_keys_are_timms():
    m = attnlab.create("attention_pool_latent", DIM, HEADS, qk_norm=True, norm="layernorm", pos_embed="abs",
                       feat_size=5)
    assert set(m.state_dict()) == {
        "pos_embed", "latent", "q.weight", "q.bias", "kv.weight", "kv.bias", "q_norm.weight", "q_norm.bias",
        "k_norm.weight", "k_norm.bias", "proj.weight", "proj.bias", "norm.weight", "norm.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}
    assert m.latent.shape == (1, 1, DIM) and m.kv.weight.shape == (2 * DIM, DIM)
    assert m.mlp.fc1.weight.shape == (4 * DIM, DIM)
    assert m.latent.abs().max() <= 2 * DIM ** -0.5 + 1e-7          # truncated at 2 std


def test_proj_drop_and_attn_drop_only_in_training():
    m = apl(attn_drop=0.5, proj_drop=0.5)
    x = torch.randn(2, 8, DIM, dtype=torch.float64)
    assert_close(m(x), naive_apl(m, x), **TIGHT)
    m.train()
    torch.manual_seed(0)
    assert not torch.allclose(m(x), naive_apl(m, x))


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, DIM), (2, 5, 1, DIM)], ids=["2d", "4d"])
def test_wrong_rank_names_the_shape(shape):
    with pytest.raises(ValueError, match=r"attention_pool_latent.*\(B, N, C=24\)"):
        apl()(torch.randn(shape, dtype=torch.float64))


def test_wrong_width_names_both_widths():
    with pytest.raises(ValueError, match=r"attention_pool_latent.*C=24, got 23"):
        apl()(torch.randn(2, 5, DIM - 1, dtype=torch.float64))


def test_pos_embed_needs_feat_size_tokens():
    with pytest.raises(ValueError, match=r"feat_size = 7 tokens, got N=6"):
        apl(pos_embed="abs", feat_size=7)(torch.randn(2, 6, DIM, dtype=torch.float64))


@pytest.mark.parametrize("mask,err,match", [
    (torch.ones(2, 6, dtype=torch.bool), ValueError, r"\(B, N\) = \(2, 5\), got \(2, 6\)"),
    (torch.ones(2, 1, 1, 5, dtype=torch.bool), ValueError, r"\(B, N\) = \(2, 5\), got \(2, 1, 1, 5\)"),
    ("mask", TypeError, "str"),
])
def test_bad_masks(mask, err, match):
    with pytest.raises(err, match=match):
        apl()(torch.randn(2, 5, DIM, dtype=torch.float64), attn_mask=mask)


@pytest.mark.parametrize("options,match", [
    (dict(heads=5), r"dim \(24\) must be divisible by num_heads \(5\)"),
    (dict(pool_type=""), r"pool_type must be one of \('token', 'avg'\).*got ''"),
    (dict(q_proj=False, latent_dim=12), r"latent_dim must equal dim \(24\), got 12"),
    (dict(pos_embed="abs"), "needs feat_size"),
    (dict(pos_embed="learned"), "pos_embed must be '' or 'abs', got 'learned'"),
    (dict(norm="rmsnorm"), "norm must be None or 'layernorm', got 'rmsnorm'"),
    (dict(act="relu"), r"act must be one of \['gelu', 'gelu_tanh'\], got 'relu'"),
    (dict(latent_len=0), "latent_len must be a positive int, got 0"),
    (dict(out_features=-1), "out_features must be a non-negative int, got -1"),
    (dict(mlp_ratio=0), "mlp_ratio must be a finite number > 0, got 0"),
    (dict(proj_drop=1.5), r"proj_drop must be a number in \[0, 1\), got 1.5"),
])
def test_bad_options(options, match):
    heads = options.pop("heads", HEADS)
    with pytest.raises(ValueError, match=match):
        attnlab.create("attention_pool_latent", DIM, heads, **options)


def test_causal_and_cache_are_refused():
    m = apl()
    x = torch.randn(1, 3, DIM, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="attention_pool_latent.*causal"):
        m(x, is_causal=True)
    with pytest.raises(NotImplementedError, match="attention_pool_latent.*kv_cache"):
        m(x, cache=attnlab.KVCache())


# --- FLOPs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(), dict(latent_len=3, out_features=16, mlp_ratio=2.0, latent_dim=10),
                                     dict(out_features=0, q_proj=False)], ids=["default", "options", "pre_logits"])
def test_useful_flops_match_the_flop_counter(options):
    from torch.utils.flop_counter import FlopCounterMode
    m = attnlab.create("attention_pool_latent", 48, 4, pool_type="avg", backend="reference", **options).eval()
    x = torch.randn(3, 20, 48)
    with FlopCounterMode(display=False) as counter:
        m(x)
    fwd, bwd = m.useful_flops(3, 20, 48, 4, False)
    assert fwd == counter.get_total_flops() and bwd == 2 * fwd
    with pytest.raises(NotImplementedError, match="causal"):
        m.useful_flops(3, 20, 48, 4, True)
    with pytest.raises(ValueError, match="num_heads=8"):
        m.useful_flops(3, 20, 48, 8, False)


def test_useful_flops_at_vit_small_width():
    """N = 256 tokens of C = 384, 6 heads, one latent: the kv projection 4 N C^2 dominates."""
    m = attnlab.create("attention_pool_latent", 384, 6)
    N, C = 256, 384
    expected = 4 * N * C * C + 4 * N * C + 2 * C * C + 2 * C * C + 4 * C * 4 * C
    assert m.useful_flops(1, N, C, 6, False)[0] == expected


# --- timm, when it is installed ---------------------------------------------------------------------

def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)


@pytest.mark.parametrize("options", [dict(), dict(latent_len=3, pool_type="avg", qk_norm=True),
                                     dict(out_features=0), dict(q_proj=False, qkv_bias=False),
                                     dict(latent_dim=20, out_features=16, mlp_ratio=2.0),
                                     dict(pos_embed="abs", feat_size=9)],
                         ids=["default", "latents_qk_norm", "pre_logits", "no_q_proj", "widths", "pos_embed"])
@pytest.mark.parametrize("norm", [None, "layernorm"])
def test_matches_timm_with_copied_weights(options, norm):
    timm_layers = pytest.importorskip("timm.layers")
    from functools import partial
    extra = dict(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)) if norm else {}
    theirs = timm_layers.AttentionPoolLatent(32, num_heads=4, **options, **extra).double()
    _randomise(theirs)
    ours = attnlab.create("attention_pool_latent", 32, 4, norm=norm, norm_eps=1e-6 if norm else None,
                          **options).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 9, 32, dtype=torch.float64, requires_grad=True)
    y, y_timm = ours(x), theirs(x)
    assert_close(y, y_timm, **TIGHT)
    g = torch.randn_like(y)
    for got, want in zip(_grads(y, [x, *ours.parameters()], g), _grads(y_timm, [x, *theirs.parameters()], g)):
        assert_close(got, want, **GRAD)
    valid = torch.rand(3, 9) > 0.3
    valid[:, 0] = True
    assert_close(ours(x, attn_mask=valid), theirs(x, attn_mask=valid[:, None, None, :]), **TIGHT)


def test_matches_a_timm_siglip_style_vit_map_head():
    """A timm ViT with global_pool='map' and act gelu_tanh (its SigLIP configuration): its
    `attn_pool.` keys load with the prefix stripped, and the head computes the same."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    vit = timm_vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=4,
                                     class_token=False, global_pool="map", act_layer="gelu_tanh",
                                     num_classes=0).double().eval()
    _randomise(vit.attn_pool)
    state = {k.removeprefix("attn_pool."): v for k, v in vit.state_dict().items() if k.startswith("attn_pool.")}
    ours = attnlab.create("attention_pool_latent", 32, 4, norm="layernorm", norm_eps=1e-6,
                          act="gelu_tanh").double().eval()
    ours.load_state_dict(state, strict=True)
    tokens = torch.randn(2, 5, 32, dtype=torch.float64)
    assert_close(ours(tokens), vit.attn_pool(tokens), **TIGHT)
