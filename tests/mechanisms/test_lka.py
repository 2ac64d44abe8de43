"""lka and van against a naive float64 reference, receptive field, gradcheck, checkpoint keys, bad input.

"Visual Attention Network" (Guo et al., 2022), official Visual-Attention-Network/VAN-Classification
`models/van.py::LKA` and `::Attention`. The naive reference below is written from that code's
computation in NCHW, sharing no code with attnlab: each depth-wise convolution is a sum over its
kernel taps of shifted, zero-padded copies of the input (no F.conv2d), each 1 x 1 convolution an
einsum, GELU the erf formula:

    lka(u) = u * (W1 · DWd(DW(u)) + b1),   van(x) = P2 · lka(gelu(P1 · x + p1)) + p2 + x

An optional peer test compares with HuggingFace transformers' VanLargeKernelAttentionLayer /
VanSpatialAttentionLayer (transformers < 5, where VAN still ships as a deprecated model).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab.mechanisms.lka import decomposition

DIM, HEADS = 16, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)


def module(name="lka", dim=DIM, dtype=torch.float64, **options):
    """A module with random (non-zero) biases, so the reference sees them too."""
    m = attnlab.create(name, dim, HEADS, **options).to(dtype).eval()
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0.0, 0.5)
    return m


def image(B, H, W, dim=DIM, dtype=torch.float64):
    return torch.randn(B, H, W, dim, dtype=dtype)


# --- the naive reference -----------------------------------------------------------------------

def naive_depthwise(u, weight, bias, dilation, padding):
    """u (B, C, H, W), weight (C, 1, k, k): out[c, y, x] = b[c] + Σ_ij w[c, i, j] u[c, y - p + d i, x - p + d j]."""
    B, C, H, W = u.shape
    k = weight.shape[-1]
    padded = u.new_zeros(B, C, H + 2 * padding, W + 2 * padding)
    padded[:, :, padding:padding + H, padding:padding + W] = u
    out = bias.reshape(1, C, 1, 1).expand(B, C, H, W).clone()
    for i in range(k):
        for j in range(k):
            tap = padded[:, :, i * dilation:i * dilation + H, j * dilation:j * dilation + W]
            out = out + weight[:, 0, i, j].reshape(1, C, 1, 1) * tap
    return out


def naive_pointwise(u, weight, bias):
    """u (B, C, H, W), weight (C_out, C, 1, 1)."""
    return torch.einsum("oc,bchw->bohw", weight[:, :, 0, 0], u) + bias.reshape(1, -1, 1, 1)


def naive_lka(p, u, dilation):
    """The official LKA.forward with parameters p (a dict of the official names), u NCHW."""
    k0, k1 = p["conv0.weight"].shape[-1], p["conv_spatial.weight"].shape[-1]
    attn = naive_depthwise(u, p["conv0.weight"], p["conv0.bias"], 1, (k0 - 1) // 2)
    attn = naive_depthwise(attn, p["conv_spatial.weight"], p["conv_spatial.bias"], dilation,
                           dilation * (k1 - 1) // 2)
    attn = naive_pointwise(attn, p["conv1.weight"], p["conv1.bias"])
    return u * attn


def naive_van(p, x_nchw, dilation, shortcut=True):
    """The official Attention.forward (proj_1, GELU, LKA, proj_2, + shortcut)."""
    y = naive_pointwise(x_nchw, p["proj_1.weight"], p["proj_1.bias"])
    y = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))
    lka = {k.removeprefix("spatial_gating_unit."): v for k, v in p.items() if k.startswith("spatial_gating_unit.")}
    y = naive_pointwise(naive_lka(lka, y, dilation), p["proj_2.weight"], p["proj_2.bias"])
    return y + x_nchw if shortcut else y


def reference(m, x, params):
    """The naive reference on channels-last x with the module's parameters `params` (name -> tensor)."""
    u = x.permute(0, 3, 1, 2)
    if type(m).spec.name == "lka":
        out = naive_lka(params, u, m.dilation)
    else:
        out = naive_van(params, u, m.spatial_gating_unit.dilation, m.shortcut)
    return out.permute(0, 2, 3, 1)


CASES = [
    ("lka", dict(), (2, 5, 7)),                              # official 5x5 + 7x7 dil 3 on a small image
    ("lka", dict(), (1, 14, 14)),
    ("lka", dict(kernel_size=5, dilation=2), (2, 4, 6)),
    ("lka", dict(kernel_size=9, dilation=2), (1, 6, 5)),
    ("lka", dict(kernel_size=13, dilation=3), (1, 3, 9)),
    ("lka", dict(kernel_size=3, dilation=1), (2, 4, 4)),
    ("lka", dict(), (1, 1, 1)),
    ("van", dict(), (2, 5, 7)),
    ("van", dict(kernel_size=5, dilation=2, shortcut=False), (2, 4, 4)),
    ("van", dict(kernel_size=9, dilation=2), (1, 14, 14)),
]


@pytest.mark.parametrize("name,options,shape", CASES, ids=lambda v: str(v))
def test_outputs_and_gradients_match_the_naive_reference(name, options, shape):
    m = module(name, **options)
    x = image(*shape).requires_grad_(True)
    names, params = zip(*m.named_parameters())
    y = m(x)
    ref = reference(m, x, dict(zip(names, params)))
    assert_close(y, ref, **TIGHT)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, *params), g)
    grads_ref = torch.autograd.grad(ref, (x, *params), g)
    for n, a, b in zip(("x", *names), grads, grads_ref):
        assert_close(a, b, **GRAD, msg=lambda s, n=n: f"gradient of {n}: {s}")


@pytest.mark.parametrize("name", ["lka", "van"])
def test_gradcheck(name):
    m = module(name, dim=3, kernel_size=5, dilation=2)
    x = image(1, 3, 4, dim=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    names, params = zip(*m.named_parameters())

    def of_params(*ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x.detach(),))
    assert torch.autograd.gradcheck(of_params, tuple(p.detach().clone().requires_grad_(True) for p in params))


# --- the decomposition and its receptive field -------------------------------------------------

@pytest.mark.parametrize("K,d,want", [(21, 3, (5, 7)), (5, 2, (3, 3)), (9, 2, (3, 5)), (13, 3, (5, 5)),
                                      (27, 3, (5, 9)), (7, 1, (1, 7)), (1, 1, (1, 1))])
def test_decomposition_follows_the_paper_formula(K, d, want):
    assert decomposition(K, d) == want
    m = attnlab.create("lka", DIM, HEADS, kernel_size=K, dilation=d)
    assert m.conv0.kernel_size == (want[0],) * 2 and m.conv0.padding == (d - 1,) * 2
    assert m.conv_spatial.kernel_size == (want[1],) * 2 and m.conv_spatial.dilation == (d, d)
    assert m.conv_spatial.padding == (d * (want[1] - 1) // 2,) * 2


def test_default_is_the_official_layer():
    m = attnlab.create("lka", DIM, HEADS)
    assert (m.conv0.kernel_size, m.conv0.padding, m.conv0.groups) == ((5, 5), (2, 2), DIM)
    assert (m.conv_spatial.kernel_size, m.conv_spatial.padding, m.conv_spatial.dilation,
            m.conv_spatial.groups) == ((7, 7), (9, 9), (3, 3), DIM)
    assert m.conv1.kernel_size == (1, 1) and m.conv1.groups == 1
    assert all(c.bias is not None for c in (m.conv0, m.conv_spatial, m.conv1))


@pytest.mark.parametrize("K,d,half", [(21, 3, 11), (5, 2, 3), (9, 2, 5), (3, 1, 1), (1, 1, 0)])
def test_receptive_field_reaches_exactly_its_half_width(K, d, half):
    """Changing pixel (0, 0) changes the outputs at columns 0..half of row 0 and no further:
    half = (2d - 2) / 2 + d (ceil(K / d) - 1) / 2."""
    m = module("lka", kernel_size=K, dilation=d)
    x = image(1, 1, 16)
    x2 = x.clone()
    x2[0, 0, 0] += 3.0
    with torch.no_grad():
        changed = (m(x2) - m(x)).abs().amax(-1)[0, 0] > 0      # (16,) per column
    assert changed[:half + 1].all() and not changed[half + 1:].any(), changed


def test_one_by_one_kernels_are_a_per_pixel_map():
    """kernel_size=1, dilation=1: every conv is 1x1, so no pixel sees another (the contract
    suite's neighbour test would fail, which is why it is not the default)."""
    m = module("lka", kernel_size=1, dilation=1)
    x = image(1, 3, 3)
    x2 = x.clone()
    x2[0, 0, 0] += 3.0
    with torch.no_grad():
        diff = (m(x2) - m(x)).abs().amax(-1)[0]
    assert diff[0, 0] > 0 and (diff.flatten()[1:] == 0).all()


def test_identity_attention_map_gives_the_input():
    """With conv1 = 0 and bias 1 the attention map is all ones and lka is the identity; van with
    identity projections and GELU reduces to gelu(x) + x."""
    m = module("lka")
    with torch.no_grad():
        m.conv1.weight.zero_()
        m.conv1.bias.fill_(1.0)
    x = image(2, 5, 6)
    assert_close(m(x), x, rtol=0, atol=0)
    v = module("van")
    with torch.no_grad():
        lka = v.spatial_gating_unit
        lka.conv1.weight.zero_()
        lka.conv1.bias.fill_(1.0)
        for proj in (v.proj_1, v.proj_2):
            proj.weight.copy_(torch.eye(DIM, dtype=torch.float64)[:, :, None, None])
            proj.bias.zero_()
    assert_close(v(x), torch.nn.functional.gelu(x) + x, **TIGHT)


def test_van_shortcut_adds_the_input():
    x = image(2, 4, 5)
    with_sc, without = module("van"), module("van", shortcut=False)
    without.load_state_dict(with_sc.state_dict())
    assert_close(with_sc(x), without(x) + x, **TIGHT)


# --- initialisation and checkpoint keys --------------------------------------------------------

def test_initialisation_is_the_official_block_init():
    """Block._init_weights: normal(0, sqrt(2 / fan_out)) with fan_out = k^2 C_out / groups, zero bias."""
    torch.manual_seed(0)
    v = attnlab.create("van", 64, HEADS)
    convs = {"proj_1": v.proj_1, "proj_2": v.proj_2, "conv1": v.spatial_gating_unit.conv1,
             "conv0": v.spatial_gating_unit.conv0, "conv_spatial": v.spatial_gating_unit.conv_spatial}
    for name, conv in convs.items():
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
        assert (conv.bias == 0).all(), name
        assert_close(conv.weight.std().item(), math.sqrt(2.0 / fan_out), rtol=0.12, atol=0, msg=name)
        assert abs(conv.weight.mean().item()) < 0.2 * math.sqrt(2.0 / fan_out), name


def test_state_dict_keys_and_shapes_are_the_official_ones():
    C = DIM
    official = {  # models/van.py::Attention(C) as it names and shapes its parameters
        "proj_1.weight": (C, C, 1, 1), "proj_1.bias": (C,),
        "spatial_gating_unit.conv0.weight": (C, 1, 5, 5), "spatial_gating_unit.conv0.bias": (C,),
        "spatial_gating_unit.conv_spatial.weight": (C, 1, 7, 7), "spatial_gating_unit.conv_spatial.bias": (C,),
        "spatial_gating_unit.conv1.weight": (C, C, 1, 1), "spatial_gating_unit.conv1.bias": (C,),
        "proj_2.weight": (C, C, 1, 1), "proj_2.bias": (C,),
    }
    v = attnlab.create("van", C, HEADS)
    assert {k: tuple(t.shape) for k, t in v.state_dict().items()} == official
    lka = attnlab.create("lka", C, HEADS)
    assert {k: tuple(t.shape) for k, t in lka.state_dict().items()} == {
        k.removeprefix("spatial_gating_unit."): s for k, s in official.items() if k.startswith("spatial_gating_unit.")}
    # A checkpoint's block entries load after stripping the block prefix.
    ckpt = {f"block3.1.attn.{k}": torch.randn(s) for k, s in official.items()}
    ckpt["block3.1.norm1.weight"] = torch.ones(C)
    prefix = "block3.1.attn."
    v.load_state_dict({k.removeprefix(prefix): t for k, t in ckpt.items() if k.startswith(prefix)})
    assert torch.equal(v.proj_2.bias, ckpt[prefix + "proj_2.bias"])


# --- peer: HuggingFace transformers' VAN (deprecated; removed in transformers 5) --------------

def _hf_van():
    pytest.importorskip("transformers")
    try:
        from transformers.models.deprecated.van import modeling_van
    except ImportError as err:
        pytest.skip(f"this transformers has no VAN model (removed in v5): {err}")
    return modeling_van


def test_matches_hf_transformers_van_with_copied_weights():
    hf = _hf_van()
    torch.manual_seed(0)
    ours = module("van", dim=DIM)
    layer = hf.VanSpatialAttentionLayer(DIM, hidden_act="gelu").double().eval()
    key_map = {"pre_projection.conv": "proj_1", "post_projection": "proj_2",
               "attention_layer.attention.depth_wise": "spatial_gating_unit.conv0",
               "attention_layer.attention.depth_wise_dilated": "spatial_gating_unit.conv_spatial",
               "attention_layer.attention.point_wise": "spatial_gating_unit.conv1"}
    theirs = ours.state_dict()
    layer.load_state_dict({f"{hf_name}.{p}": theirs[f"{name}.{p}"] for hf_name, name in key_map.items()
                           for p in ("weight", "bias")})
    x = image(2, 7, 9)
    with torch.no_grad():
        y_hf = layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        lka_hf = hf.VanLargeKernelAttentionLayer(DIM).double().eval()
        lka_hf.attention.load_state_dict({k.split(".", 1)[1].replace("conv0", "depth_wise")
                                          .replace("conv_spatial", "depth_wise_dilated").replace("conv1", "point_wise"): t
                                          for k, t in theirs.items() if k.startswith("spatial_gating_unit.")})
        lka = attnlab.create("lka", DIM, HEADS).double().eval()
        lka.load_state_dict({k.split(".", 1)[1]: t for k, t in theirs.items() if k.startswith("spatial_gating_unit.")})
        z_hf = lka_hf(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y, z = ours(x), lka(x)
    print(f"max |van - hf| = {(y - y_hf).abs().max().item():.3e}, "
          f"max |lka - hf| = {(z - z_hf).abs().max().item():.3e}")
    assert_close(y, y_hf, **TIGHT)
    assert_close(z, z_hf, **TIGHT)


# --- modes, dtypes, flops ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lka", "van"])
def test_dropout_only_in_training(name):
    m = attnlab.create(name, DIM, HEADS, attn_drop=0.5, proj_drop=0.5).double()
    x = image(1, 6, 6)
    m.eval()
    assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x)) and torch.isfinite(a).all()


@pytest.mark.parametrize("name", ["lka", "van"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_kept_and_close_to_float64(name, dtype):
    m = module(name)
    x = image(2, 5, 5)
    ref = m(x)
    y = m.to(dtype)(x.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2 * ref.abs().max().item())
    assert_close(y.double(), ref, **tol)


@pytest.mark.parametrize("name,options", [("lka", {}), ("lka", dict(kernel_size=9, dilation=2)), ("van", {})])
def test_useful_flops_match_the_flop_counter(name, options):
    from torch.utils.flop_counter import FlopCounterMode
    m = attnlab.create(name, DIM, HEADS, **options).eval()
    x = torch.randn(2, 8, 8, DIM)
    with FlopCounterMode(display=False) as counter:
        m(x)
    fwd, bwd = m.useful_flops(2, 64, DIM, HEADS, False)
    assert fwd == counter.get_total_flops() and bwd == 2 * fwd
    with pytest.raises(NotImplementedError, match="causal"):
        m.useful_flops(2, 64, DIM, HEADS, True)


@pytest.mark.parametrize("name", ["lka", "van"])
def test_runs_in_a_transformer_block_on_a_grid(name):
    from attnlab.models.transformer import Block
    block = Block(32, 4, mechanism=name, grid=(4, 4)).eval()
    x = torch.randn(2, 16, 32)
    assert block(x).shape == (2, 16, 32)


# --- bad input and options ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lka", "van"])
@pytest.mark.parametrize("shape", [(2, 64, DIM), (2, 8, 8, 1, DIM), (DIM,)], ids=["seq", "5d", "1d"])
def test_wrong_rank_raises(name, shape):
    with pytest.raises(ValueError) as info:
        attnlab.create(name, DIM, HEADS)(torch.randn(shape))
    msg = str(info.value)
    assert name in msg and str(shape) in msg and str(DIM) in msg, msg


@pytest.mark.parametrize("name", ["lka", "van"])
def test_channels_first_input_raises_naming_widths(name):
    with pytest.raises(ValueError) as info:
        attnlab.create(name, DIM, HEADS)(torch.randn(2, DIM, 8, 6))
    msg = str(info.value)
    assert name in msg and f"C={DIM}" in msg and "got 6" in msg and "channels-last" in msg, msg


@pytest.mark.parametrize("name", ["lka", "van"])
@pytest.mark.parametrize("x,kind", [(None, TypeError), ([[0.0]], TypeError), (torch.zeros(1, 4, 4, DIM, dtype=torch.int64), TypeError)],
                         ids=["None", "list", "int64"])
def test_non_tensor_or_non_float_raises(name, x, kind):
    with pytest.raises(kind, match=name):
        attnlab.create(name, DIM, HEADS)(x)


@pytest.mark.parametrize("name", ["lka", "van"])
@pytest.mark.parametrize("feature,kwargs", [
    ("attn_mask", dict(attn_mask=torch.ones(2, 16, dtype=torch.bool))),
    ("causal", dict(is_causal=True)),
    ("kv_cache", dict(cache=attnlab.KVCache())),
])
def test_unsupported_features_raise(name, feature, kwargs):
    with pytest.raises(NotImplementedError) as info:
        attnlab.create(name, DIM, HEADS)(torch.randn(2, 4, 4, DIM), **kwargs)
    assert name in str(info.value) and feature in str(info.value)


@pytest.mark.parametrize("name", ["lka", "van"])
@pytest.mark.parametrize("options,needles", [
    (dict(kernel_size=7, dilation=2), ("kernel_size=7", "dilation=2", "4", "even", "odd")),
    (dict(kernel_size=8, dilation=1), ("kernel_size=8", "even")),
    (dict(kernel_size=0), ("kernel_size", "positive int", "0")),
    (dict(kernel_size=5.0), ("kernel_size", "5.0")),
    (dict(dilation=0), ("dilation", "0")),
    (dict(dilation=True), ("dilation", "True")),
    (dict(attn_drop=1.0), ("attn_drop", "1.0")),
    (dict(proj_drop=-0.1), ("proj_drop", "-0.1")),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_options_raise_at_create(name, options, needles):
    with pytest.raises(ValueError) as info:
        attnlab.create(name, DIM, HEADS, **options)
    msg = str(info.value)
    assert name in msg and all(n in msg for n in needles), msg


@pytest.mark.parametrize("name", ["lka", "van"])
@pytest.mark.parametrize("dim,heads,needle", [(0, 4, "dim"), (DIM, 0, "num_heads"), (DIM, -1, "num_heads")])
def test_bad_dims_raise(name, dim, heads, needle):
    with pytest.raises(ValueError, match=rf"{name}: {needle} must be a positive int, got {heads if needle != 'dim' else dim}"):
        attnlab.create(name, dim, heads)


def test_bad_shortcut_type_raises():
    with pytest.raises(TypeError, match="van: shortcut must be a bool, got int"):
        attnlab.create("van", DIM, HEADS, shortcut=1)


def test_num_heads_is_unused():
    a, b = attnlab.create("van", DIM, 1), attnlab.create("van", DIM, 8)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 4, DIM)
    assert_close(a(x), b(x), rtol=0, atol=0)
