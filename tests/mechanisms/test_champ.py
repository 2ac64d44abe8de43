"""champ_fusion, ChampGuidanceEncoder and ChampGuidanceFusion against a naive float64 reference.

The reference below is written from the official computation (fudan-generative-vision/champ
models/guidance_encoder.py, transformer_3d.py, attention.py with diffusers 0.24's Attention and
GEGLU FeedForward) with the modules' own weights: F.conv2d / F.group_norm on NCHW tensors, an
explicit loop over batch and heads for the attention, GELU written with erf. It shares no code
with attnlab. An optional test runs the official modules themselves (needs diffusers and einops,
and ATTNLAB_CHAMP_DIR=<a checkout of the official repository>); it skips cleanly otherwise.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import attnlab
from attnlab.mechanisms.champ import ChampGuidanceAttention2d, ChampGuidanceEncoder, ChampGuidanceFusion

TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)


def block(dim=32, heads=4, dtype=torch.float64, **options):
    options = {"norm_num_groups": 8, "qkv_bias": True, **options}
    return attnlab.create("champ_fusion", dim, heads, **options).to(dtype).eval()


def randomize(module):
    """Norms start at weight 1, bias 0; random affine parameters make the test see them."""
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.3)
    return module


# --- the naive reference -----------------------------------------------------------------------

def gelu(z):
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def naive_block(m, x):
    """x (B, H, W, C) channels-last -> (B, H, W, C), the official Transformer3DModel on one frame."""
    B, H, W, C = x.shape
    h, d = m.num_heads, m.head_dim
    D = h * d
    blk = m.transformer_blocks[0]
    xc = x.permute(0, 3, 1, 2)                                              # NCHW
    g = F.group_norm(xc, m.norm.num_groups, m.norm.weight, m.norm.bias, 1e-6)
    t = F.conv2d(g, m.proj_in.weight, m.proj_in.bias)                      # (B, D, H, W)
    t = t.permute(0, 2, 3, 1).reshape(B, H * W, D)                         # (B, N, D)
    n1 = F.layer_norm(t, (D,), blk.norm1.weight, blk.norm1.bias, 1e-5)
    a = blk.attn1

    def lin(z, layer):
        out = z @ layer.weight.T
        return out if layer.bias is None else out + layer.bias

    q, k, v = lin(n1, a.to_q), lin(n1, a.to_k), lin(n1, a.to_v)            # (B, N, D)
    scale = 1.0 / math.sqrt(d) if m.scale is None else m.scale
    heads_out = torch.zeros(B, H * W, D, dtype=x.dtype)
    rows = []
    for b in range(B):
        cols = []
        for i in range(h):
            sl = slice(i * d, (i + 1) * d)
            scores = q[b, :, sl] @ k[b, :, sl].T * scale                   # (N, N)
            cols.append(torch.softmax(scores, dim=-1) @ v[b, :, sl])        # (N, d)
        rows.append(torch.cat(cols, dim=-1))
    heads_out = torch.stack(rows)                                           # (B, N, D)
    t = t + lin(heads_out, a.to_out[0])
    n3 = F.layer_norm(t, (D,), blk.norm3.weight, blk.norm3.bias, 1e-5)
    z = lin(n3, blk.ff.net[0].proj)
    hidden = z.shape[-1] // 2
    t = t + lin(z[..., :hidden] * gelu(z[..., hidden:]), blk.ff.net[2])
    out = F.conv2d(t.reshape(B, H, W, D).permute(0, 3, 1, 2), m.proj_out.weight, m.proj_out.bias) + xc
    return out.permute(0, 2, 3, 1)


def naive_encoder(e, c):
    """condition (B, H, W, C_in) -> (B, H', W', C_latent), the official GuidanceEncoder.forward."""
    z = F.conv2d(c.permute(0, 3, 1, 2), e.conv_in.weight, e.conv_in.bias, padding=1)
    z = z * torch.sigmoid(z)
    for i, conv in enumerate(e.blocks):
        z = F.conv2d(z, conv.weight, conv.bias, padding=1, stride=2 if i % 2 else 1)
        z = z * torch.sigmoid(z)
    z = naive_block(e.attentions[-1], z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    z = F.conv2d(z, e.conv_out.weight, e.conv_out.bias, padding=1)
    return z.permute(0, 2, 3, 1)


def outputs_and_grads(fn, module, x, cotangent):
    y = fn(x)
    params = [p for p in module.parameters()]
    return y, torch.autograd.grad((y * cotangent).sum(), [x, *params])


def compare(module, fn, ref, x):
    x = x.requires_grad_(True)
    cot = torch.randn_like(fn(x))
    y, grads = outputs_and_grads(fn, module, x, cot)
    y_ref, grads_ref = outputs_and_grads(ref, module, x, cot)
    assert_close(y, y_ref, **TIGHT)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, **GRAD)
    return (y - y_ref).abs().max().item()


# --- the attention block -------------------------------------------------------------------------

OPTIONS = {
    "default": dict(),
    "no_bias": dict(qkv_bias=False),
    "head_dim": dict(head_dim=12),
    "scale": dict(scale=0.2),
    "groups32": dict(norm_num_groups=32),
    "ff_mult2": dict(ff_mult=2),
}


@pytest.mark.parametrize("backend", [None, "sdpa", "reference"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_block_matches_naive_reference_outputs_and_grads(options, backend):
    m = randomize(block(backend=backend, **options))
    x = torch.randn(2, 4, 6, 32, dtype=torch.float64)
    compare(m, m, lambda t: naive_block(m, t), x)


def test_block_float32_close_to_naive_float64():
    m = randomize(block(dtype=torch.float32))
    x = torch.randn(2, 5, 3, 32)
    y = m(x)
    assert y.dtype == torch.float32
    assert_close(y.double(), naive_block(m.double(), x.double()), rtol=1e-5, atol=1e-5)


def test_block_gradcheck():
    m = randomize(block(dim=8, heads=2, norm_num_groups=2))
    x = torch.randn(1, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    # every parameter, with an input that needs no gradient (an image batch): gradcheck perturbs
    # the parameters in place and the module reads them
    x = x.detach()
    assert torch.autograd.gradcheck(lambda *ps: m(x), tuple(m.parameters()))


def test_block_is_not_the_identity_and_attends_over_the_image():
    m = block()
    x = torch.randn(1, 4, 4, 32, dtype=torch.float64)
    y = m(x)
    assert not torch.allclose(y, x)
    x2 = x.clone()
    x2[0, 3, 3] += 5.0                       # a far pixel changes pixel (0, 0) through attention
    assert not torch.allclose(m(x2)[0, 0, 0], y[0, 0, 0])


def test_block_hooks_carry_the_documented_shapes():
    m = block(backend="reference")
    seen = {}
    for name in m.hook_names:
        getattr(m, name).register_forward_hook(lambda mod, i, out, name=name: seen.__setitem__(name, tuple(out.shape)))
    with torch.no_grad():
        m(torch.randn(2, 4, 6, 32, dtype=torch.float64))
    N = 24
    assert seen == {"hook_q": (2, 4, N, 8), "hook_k": (2, 4, N, 8), "hook_v": (2, 4, N, 8),
                    "hook_scores": (2, 4, N, N), "hook_probs": (2, 4, N, N), "hook_out": (2, 4, N, 8)}


def test_block_parameter_names_are_the_official_ones():
    m = block(dim=256, heads=8, norm_num_groups=32, qkv_bias=False)
    want = {
        "norm.weight": (256,), "norm.bias": (256,),
        "proj_in.weight": (256, 256, 1, 1), "proj_in.bias": (256,),
        "transformer_blocks.0.norm1.weight": (256,), "transformer_blocks.0.norm1.bias": (256,),
        "transformer_blocks.0.attn1.to_q.weight": (256, 256),
        "transformer_blocks.0.attn1.to_k.weight": (256, 256),
        "transformer_blocks.0.attn1.to_v.weight": (256, 256),
        "transformer_blocks.0.attn1.to_out.0.weight": (256, 256),
        "transformer_blocks.0.attn1.to_out.0.bias": (256,),
        "transformer_blocks.0.norm3.weight": (256,), "transformer_blocks.0.norm3.bias": (256,),
        "transformer_blocks.0.ff.net.0.proj.weight": (2048, 256), "transformer_blocks.0.ff.net.0.proj.bias": (2048,),
        "transformer_blocks.0.ff.net.2.weight": (256, 1024), "transformer_blocks.0.ff.net.2.bias": (256,),
        "proj_out.weight": (256, 256, 1, 1), "proj_out.bias": (256,),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want


def test_block_useful_flops():
    m = block()
    fwd, bwd = m.useful_flops(2, 24, 32, 4, False)
    D, N = 32, 24
    assert fwd == 2 * (4 * N * 32 * D + 8 * N * D * D + 4 * N * N * D + 16 * N * D * D + 8 * N * D * D)
    assert bwd == 2 * fwd
    with pytest.raises(NotImplementedError, match="causal"):
        m.useful_flops(2, 24, 32, 4, True)
    with pytest.raises(ValueError, match="dim=64"):
        m.useful_flops(2, 24, 64, 4, False)


@pytest.mark.parametrize("options, match", [
    (dict(norm_num_groups=5), r"norm_num_groups \(5\) must divide dim \(32\)"),
    (dict(norm_num_groups=0), "norm_num_groups must be a positive int, got 0"),
    (dict(head_dim=0), "head_dim must be a positive int, got 0"),
    (dict(ff_mult=1.5), "ff_mult must be a positive int, got 1.5"),
    (dict(scale=-1.0), "scale must be a finite number > 0"),
    (dict(attn_drop=1.0), r"attn_drop must be a number in \[0, 1\)"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_block_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        block(**options)
    with pytest.raises(TypeError, match="qkv_bias must be a bool"):
        block(qkv_bias=1)
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by num_heads \(4\)"):
        attnlab.create("champ_fusion", 30, 4, norm_num_groups=2)


def test_block_bad_input():
    m = block()
    with pytest.raises(ValueError, match=r"champ_fusion: expected x of shape \(B, H, W, C=32\)"):
        m(torch.randn(2, 24, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected x of width C=32 in the last dim.*got 6"):
        m(torch.randn(2, 32, 4, 6, dtype=torch.float64))          # channels-first
    with pytest.raises(TypeError, match="floating point"):
        m(torch.zeros(2, 4, 4, 32, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="champ_fusion.*attn_mask"):
        m(torch.randn(1, 2, 2, 32, dtype=torch.float64), attn_mask=torch.ones(1, 4, dtype=torch.bool))


# --- the encoder and the fusion ------------------------------------------------------------------

SMALL = dict(block_out_channels=(4, 8, 32), attention_num_heads=8)


def encoder(dtype=torch.float64, **options):
    e = ChampGuidanceEncoder(6, 3, **{**SMALL, **options})
    return randomize(e.to(dtype).eval())


def test_encoder_matches_naive_reference_outputs_and_grads():
    e = encoder(zero_init_out=False)
    c = torch.rand(2, 8, 12, 3, dtype=torch.float64)
    y = e(c)
    assert y.shape == (2, 2, 3, 6)
    compare(e, e, lambda t: naive_encoder(e, t), c)


def test_encoder_default_spatial_factor_and_odd_sizes():
    e = ChampGuidanceEncoder(5, 2, block_out_channels=(4, 8, 8, 32), attention_num_heads=4).double()
    assert e(torch.rand(1, 16, 24, 2, dtype=torch.float64)).shape == (1, 2, 3, 5)
    assert e(torch.rand(1, 9, 7, 2, dtype=torch.float64)).shape == (1, 2, 1, 5)   # ceil(H / 2) per step


def test_encoder_zero_init_outputs_zero_and_trains_conv_out():
    e = encoder()                                         # zero_init_out=True, the official default
    assert torch.count_nonzero(e.conv_out.weight) == 0 and torch.count_nonzero(e.conv_out.bias) == 0
    c = torch.rand(2, 8, 8, 3, dtype=torch.float64)
    y = e(c)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert e.conv_out.weight.grad.abs().sum() > 0 and e.conv_out.bias.grad.abs().sum() > 0
    assert e.conv_in.weight.grad.abs().sum() == 0        # nothing reaches the rest while conv_out is 0


def test_encoder_gradcheck():
    e = encoder(zero_init_out=False, block_out_channels=(2, 32), attention_num_heads=4)
    c = torch.rand(1, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: e(t), (c,))


def _official_like_state_dict(e):
    """e's state_dict plus the unused official blocks (attentions 0..n-2, guidance_attention)."""
    sd = dict(e.state_dict())
    for i, conv in enumerate(e.blocks[:-1]):
        c = conv.out_channels
        sd[f"attentions.{i}.norm.weight"] = torch.ones(c)
        sd[f"attentions.{i}.proj_in.weight"] = torch.zeros(c, c, 1, 1)
    for k, v in e.attentions[-1].state_dict().items():
        sd[f"guidance_attention.{k}"] = torch.zeros_like(v)
    return sd


def test_encoder_loads_an_official_layout_state_dict():
    src = encoder(zero_init_out=False)
    sd = _official_like_state_dict(src)
    dst = encoder()
    dropped = dst.load_official_state_dict(sd)
    assert all(k.startswith(("attentions.0.", "attentions.1.", "attentions.2.", "guidance_attention."))
               for k in dropped) and "attentions.0.norm.weight" in dropped
    assert not any(k.startswith("attentions.3.") for k in dropped)
    c = torch.rand(1, 8, 8, 3, dtype=torch.float64)
    assert_close(dst(c), src(c), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        dst.load_official_state_dict({k: v for k, v in sd.items() if k != "conv_out.bias"})


def fusion(**options):
    f = ChampGuidanceFusion(("depth", "normal", "dwpose"), 6, (3, 1, 3), zero_init_out=False, **{**SMALL, **options})
    return randomize(f.double().eval())


def test_fusion_is_the_sum_of_the_encoders():
    f = fusion()
    g = {"depth": torch.rand(2, 8, 8, 3, dtype=torch.float64), "normal": torch.rand(2, 8, 8, 1, dtype=torch.float64),
         "dwpose": torch.rand(2, 8, 8, 3, dtype=torch.float64)}
    want = sum(naive_encoder(f.encoder(t), g[t]) for t in ("depth", "normal", "dwpose"))
    assert_close(f(g), want, **TIGHT)
    packed = torch.cat([g["depth"], g["normal"], g["dwpose"]], dim=-1)      # ChampModel's channel order
    assert_close(f(packed), want, **TIGHT)
    assert {k.split(".")[0] for k in f.state_dict()} == {"guidance_encoder_depth", "guidance_encoder_normal",
                                                         "guidance_encoder_dwpose"}


def test_fusion_loads_a_champ_model_state_dict():
    src = fusion()
    sd = {"denoising_unet.conv_in.weight": torch.zeros(1)}
    for t in src.guidance_types:
        sd.update({f"guidance_encoder_{t}.{k}": v for k, v in _official_like_state_dict(src.encoder(t)).items()})
    dst = ChampGuidanceFusion(("depth", "normal", "dwpose"), 6, (3, 1, 3), **SMALL).double()
    dropped = dst.load_official_state_dict(sd)
    assert dropped and all(".attentions." in k or ".guidance_attention." in k for k in dropped)
    packed = torch.rand(1, 8, 8, 7, dtype=torch.float64)
    assert_close(dst(packed), src(packed), rtol=0, atol=0)


def test_encoder_and_fusion_bad_input():
    e = encoder()
    with pytest.raises(ValueError, match="ChampGuidanceEncoder: expected condition of width C=3"):
        e(torch.rand(1, 3, 8, 8, dtype=torch.float64))                 # channels-first
    with pytest.raises(ValueError, match="at least 2 entries"):
        ChampGuidanceEncoder(4, 3, block_out_channels=(32,))
    with pytest.raises(ValueError, match="must be a positive int"):
        ChampGuidanceEncoder(0, 3)
    with pytest.raises(ValueError, match=r"norm_num_groups \(32\) must divide dim \(48\)"):
        ChampGuidanceEncoder(4, 3, block_out_channels=(16, 48))
    f = fusion()
    with pytest.raises(ValueError, match=r"missing \['dwpose'\], unknown \['pose'\]"):
        f({"depth": torch.rand(1, 8, 8, 3), "normal": torch.rand(1, 8, 8, 1), "pose": torch.rand(1, 8, 8, 3)})
    with pytest.raises(ValueError, match="expected guidance of width C=7"):
        f(torch.rand(1, 8, 8, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="different shapes"):
        f({"depth": torch.rand(1, 8, 8, 3, dtype=torch.float64), "normal": torch.rand(1, 16, 8, 1, dtype=torch.float64),
           "dwpose": torch.rand(1, 8, 8, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="distinct identifiers"):
        ChampGuidanceFusion(("depth", "depth"))
    with pytest.raises(ValueError, match="2 entries for 3 guidance types"):
        ChampGuidanceFusion(("a", "b", "c"), 8, (3, 3))


# --- the official modules (optional) -------------------------------------------------------------

def _official_modules():
    root = os.environ.get("ATTNLAB_CHAMP_DIR")
    if not root:
        pytest.skip("set ATTNLAB_CHAMP_DIR to a checkout of fudan-generative-vision/champ to compare with it")
    pytest.importorskip("diffusers")
    pytest.importorskip("einops")
    sys.path.insert(0, root)
    try:
        from models.guidance_encoder import GuidanceEncoder
    finally:
        sys.path.remove(root)
    return GuidanceEncoder


def test_matches_the_official_guidance_encoder():
    GuidanceEncoder = _official_modules()
    torch.manual_seed(1)
    official = GuidanceEncoder(guidance_embedding_channels=320, guidance_input_channels=3).double().eval()
    with torch.no_grad():                               # conv_out is zeroed by the official init
        for p in official.conv_out.parameters():
            p.normal_(0.0, 0.05)
        for mod in official.modules():
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.3)
    ours = ChampGuidanceEncoder(320, 3).double().eval()
    dropped = ours.load_official_state_dict(official.state_dict())
    assert any(k.startswith("guidance_attention.") for k in dropped)
    c = torch.rand(2, 64, 48, 3, dtype=torch.float64)
    with torch.no_grad():
        want = official(c.permute(0, 3, 1, 2).unsqueeze(2))          # (B, C, F=1, H, W)
        got = ours(c)
    want = want.squeeze(2).permute(0, 2, 3, 1)
    assert_close(got, want, rtol=1e-10, atol=1e-12)
    official_block = official.attentions[-1]
    ours_block = ours.attentions[-1]
    x = torch.randn(1, 4, 6, 256, dtype=torch.float64)
    with torch.no_grad():
        want = official_block(x.permute(0, 3, 1, 2).unsqueeze(2)).sample.squeeze(2).permute(0, 2, 3, 1)
        assert_close(ours_block(x), want, rtol=1e-10, atol=1e-12)
