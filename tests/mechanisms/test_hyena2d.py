"""hyena2d against a naive float64 reference (direct 2-D convolution with the whole filter),
the 2-D FFT convolution against explicit loops, gradcheck, limiting cases, bad input.

"Multi-Dimensional Hyena for Spatial Inductive Bias" (Zimerman, Wolf; AISTATS 2024), official
code Itamarzimm/HyenaND `hyena2d.py::HyenaOperator2d`. The reference is written from that code
with the module's own parameters and shares no code with attnlab: the filter MLPs as explicit
matmuls (separable: h[a, b] = hx[a] hy[b], each with its decay window; joint: the MLP on
[z_a, z_b] times exp(-t_a |dx|) exp(-t_b |dy|) + shift), then each long convolution as one
F.conv2d in NCHW with the filter laid out over every offset -(H-1)..(H-1) x -(W-1)..(W-1):

    full:      K[a, b] = h[|a|, |b|]
    quadrant:  K[a, b] = h[a, b] for a, b >= 0, else 0          (the official convolution)
    reversed:  K[a, b] = h[-a, -b] for a, b <= 0, else 0        (direction "seq", first step)

y[i, j] = sum_{a, b} K[a, b] u[i - a, j - b] (times 1 / (2 l_max) with official_scale) + bias u.
The spatial contract suite (tests/mechanisms/contracts/test_spatial.py) covers shapes, dtypes,
batch invariance, neighbours, bad input and gradients for every test config.
"""
from __future__ import annotations

import importlib.util
import io
import contextlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import attnlab
from attnlab.mechanisms.hyena2d import long_conv2d

DIM = 6
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)


def hyena2d(dim=DIM, dtype=torch.float64, **options):
    options = {"l_max": 8, "filter_order": 8, **options}
    m = attnlab.create("hyena2d", dim, 1, **options).to(dtype).eval()
    return m


def image(B, H, W, dim=DIM, requires_grad=False):
    return torch.randn(B, H, W, dim, dtype=torch.float64, requires_grad=requires_grad)


# --- the naive reference -----------------------------------------------------------------------

def mlp(seq, z):
    h = z
    for layer in seq:
        if isinstance(layer, torch.nn.Linear):
            h = h @ layer.weight.T + (layer.bias if layer.bias is not None else 0.0)
        else:
            h = torch.sin(layer.freq[0] * h)      # freq (1, width)
    return h


def shift_of(mod):
    """The window's shift: a float, or a learned (1, 1, D') parameter (window_mode="learn")."""
    return mod.shift[0, 0] if torch.is_tensor(mod.shift) else mod.shift


def naive_filters(m, H, W):
    """(N-1, D, H, W) taps h[a, b], a < H, b < W, from the module's parameters."""
    f = m.filter_fn
    z, t = f.pos_emb.z[0], f.pos_emb.t[0]                           # (l_max, E), (l_max, 1)
    if m.filter_mode == "separable":
        hx, hy = mlp(f.Ximplicit_filter, z[:H]), mlp(f.Yimplicit_filter, z[:W])   # (H, D'), (W, D')
        if m.window_mode != "no":
            hx = hx * (torch.exp(-t[:H] * f.Xmodulation.deltas[0].abs()) + shift_of(f.Xmodulation))
            hy = hy * (torch.exp(-t[:W] * f.Ymodulation.deltas[0].abs()) + shift_of(f.Ymodulation))
        h = torch.einsum("ak,bk->abk", hx, hy)                       # (H, W, D')
    else:
        rows = []
        for a in range(H):
            row = []
            for b in range(W):
                hab = mlp(f.implicit_filter, torch.cat([z[a], z[b]]))  # (D',)
                if m.window_mode != "no":
                    mod = f.modulation
                    decay = torch.exp(-t[a] * mod.Xdeltas[0, 0].abs()) * torch.exp(-t[b] * mod.Ydeltas[0, 0].abs())
                    hab = hab * (decay + shift_of(mod))
                row.append(hab)
            rows.append(torch.stack(row))
        h = torch.stack(rows)                                        # (H, W, D')
    N, D = m.order, m.dim
    return torch.stack([h[..., o * D:(o + 1) * D].permute(2, 0, 1) for o in range(N - 1)])


def full_kernel(h, kind):
    """(D, H, W) taps -> (D, 2H-1, 2W-1) filter K over offsets, index (a + H - 1, b + W - 1)."""
    D, H, W = h.shape
    K = torch.zeros(D, 2 * H - 1, 2 * W - 1, dtype=h.dtype)
    for a in range(-(H - 1), H):
        for b in range(-(W - 1), W):
            if kind == "full":
                K[:, a + H - 1, b + W - 1] = h[:, abs(a), abs(b)]
            elif kind == "quadrant" and a >= 0 and b >= 0:
                K[:, a + H - 1, b + W - 1] = h[:, a, b]
            elif kind == "reversed" and a <= 0 and b <= 0:
                K[:, a + H - 1, b + W - 1] = h[:, -a, -b]
    return K


def naive_conv2d(u, h, bias, kind, scale=1.0):
    """u (B, D, H, W): y[i, j] = scale sum K[a, b] u[i - a, j - b] + bias u, as one F.conv2d."""
    D, H, W = h.shape
    K = full_kernel(h, kind)
    # conv2d correlates: out[i, j] = sum_pq W[p, q] u[i + p - (H-1), j + q - (W-1)], offset a = H-1-p.
    y = F.conv2d(u, K.flip(-2, -1)[:, None], padding=(H - 1, W - 1), groups=D)
    return scale * y + bias[None, :, None, None] * u


def naive_hyena2d(m, x):
    B, H, W, C = x.shape
    N = m.order
    u = (x @ m.in_proj.weight.T + m.in_proj.bias).permute(0, 3, 1, 2)       # (B, (N+1) C, H, W)
    uc = F.conv2d(u, m.short_filter.weight, m.short_filter.bias, padding=1, groups=u.shape[1])
    *gates, v = [uc[:, i * C:(i + 1) * C] for i in range(N + 1)]
    h = naive_filters(m, H, W)
    bias = m.filter_fn.bias.reshape(N - 1, C)
    scale = 1.0 / (2 * m.l_max) if m.official_scale else 1.0
    for o, x_i in enumerate(reversed(gates[1:])):
        kind = {"full": "full", "quadrant": "quadrant", "seq": "reversed" if o == 0 else "quadrant"}[m.direction]
        v = naive_conv2d(v * x_i, h[o], bias[o], kind, scale)
    y = (v * gates[0]).permute(0, 2, 3, 1)
    return y @ m.out_proj.weight.T + m.out_proj.bias


CONFIGS = [
    dict(),
    dict(direction="quadrant"),
    dict(direction="quadrant", official_scale=True),
    dict(direction="seq", order=3),
    dict(filter_mode="joint"),
    dict(filter_mode="joint", direction="seq", window_mode="learn", emb_dim=5),
    dict(window_mode="learn", order=3, shift=0.2),
    dict(window_mode="no", num_inner_mlps=1, learn_pos_emb=False),
    dict(filter_mode="joint", window_mode="no", direction="quadrant", order=4, filter_order=4),
    dict(shift=0.3, w=3.0, fast_decay_pct=0.5, target=0.05),
]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("H,W", [(5, 7), (8, 8), (1, 3)])
def test_matches_naive_reference_outputs_and_gradients(options, H, W):
    m = hyena2d(**options)
    x = image(2, H, W, requires_grad=True)
    y = m(x)
    ref = naive_hyena2d(m, x)
    assert_close(y, ref, **TIGHT)
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *(p for _, p in named)])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, *(p for _, p in named)])
    for name, a, b in zip(["x"] + [n for n, _ in named], grads, grads_ref):
        assert_close(a, b, **GRAD, msg=lambda s: f"gradient of {name}: {s}")


# --- the FFT convolution against loops -------------------------------------------------------------

def loop_conv2d(u, h, bias, full):
    B, D, H, W = u.shape
    y = torch.zeros_like(u)
    for i in range(H):
        for j in range(W):
            for s in range(H):
                for r in range(W):
                    a, b = i - s, j - r
                    if full:
                        y[:, :, i, j] += h[:, abs(a), abs(b)] * u[:, :, s, r]
                    elif a >= 0 and b >= 0:
                        y[:, :, i, j] += h[:, a, b] * u[:, :, s, r]
    return y + bias[:, None, None] * u


@pytest.mark.parametrize("H,W", [(1, 1), (3, 4), (5, 2)])
@pytest.mark.parametrize("full", [True, False], ids=["full", "quadrant"])
def test_fft_conv2d_equals_loops(H, W, full):
    u = torch.randn(2, 3, H, W, dtype=torch.float64)
    h = torch.randn(3, H, W, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    assert_close(long_conv2d(u, h, bias, full=full), loop_conv2d(u, h, bias, full), **TIGHT)
    assert_close(long_conv2d(u, h, bias, full=full, scale=0.25),
                 0.25 * (loop_conv2d(u, h, bias, full) - bias[:, None, None] * u) + bias[:, None, None] * u, **TIGHT)


def test_fft_conv2d_gradcheck():
    u = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    for full in (True, False):
        assert torch.autograd.gradcheck(lambda a, b, c: long_conv2d(a, b, c, full=full), (u, h, bias))


@pytest.mark.parametrize("options", [dict(), dict(filter_mode="joint", direction="seq", order=3)])
def test_module_gradcheck(options):
    m = hyena2d(dim=3, l_max=4, filter_order=4, **options)
    x = image(1, 3, 4, dim=3, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


# --- limiting cases and properties ---------------------------------------------------------------

def test_quadrant_long_conv_is_causal_along_both_axes():
    u = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    h = torch.randn(2, 5, 6, dtype=torch.float64)
    bias = torch.randn(2, dtype=torch.float64)
    y = long_conv2d(u, h, bias, full=False)
    u2 = u.clone()
    u2[..., 2, 3] += 5.0
    y2 = long_conv2d(u2, h, bias, full=False)
    changed = (y2 - y).abs() > 1e-12
    rows, cols = torch.nonzero(changed[0, 0], as_tuple=True)
    assert rows.min() >= 2 and cols.min() >= 3
    assert changed[0, 0, 4, 5]


def test_full_direction_commutes_with_flips():
    """The mirrored filter is symmetric along each axis: flipping the image (and the 3 x 3 short
    filter) flips the output."""
    m = hyena2d()
    x = image(2, 5, 7)
    y = m(x)
    with torch.no_grad():
        m.short_filter.weight.copy_(m.short_filter.weight.flip(-1, -2))
    assert_close(m(x.flip(1, 2)).flip(1, 2), y, **TIGHT)


def test_official_scale_only_scales_the_convolution():
    """With a zero filter the bias term is all that is left, with or without the factor."""
    a, b = hyena2d(direction="quadrant"), hyena2d(direction="quadrant", official_scale=True)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.hook_filter.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
    x = image(2, 4, 4)
    assert_close(a(x), b(x), **TIGHT)


def test_filter_of_a_smaller_grid_is_the_corner_of_the_l_max_filter():
    m = hyena2d(filter_mode="joint")
    big = m.long_filters(8, 8, torch.float64)
    assert_close(m.long_filters(3, 5, torch.float64), big[..., :3, :5], **TIGHT)
    m = hyena2d()
    assert_close(m.long_filters(6, 2, torch.float64), m.long_filters(8, 8, torch.float64)[..., :6, :2], **TIGHT)


def test_hooks_carry_the_gates_and_filters():
    m = hyena2d(order=3)
    seen = {}
    for name in m.hook_names:
        getattr(m, name).register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out))
    with torch.no_grad():
        m(image(2, 3, 5))
    assert seen["hook_q"].shape == seen["hook_v"].shape == seen["hook_out"].shape == (2, DIM, 3, 5)
    assert seen["hook_k"].shape == (2, 2, DIM, 3, 5)
    assert_close(seen["hook_filter"], naive_filters(m, 3, 5), **TIGHT)


def test_parameters_and_buffers_follow_the_official_names():
    sep = dict(hyena2d().named_buffers())
    assert {"filter_fn.Xmodulation.deltas", "filter_fn.Ymodulation.deltas", "filter_fn.pos_emb.t"} <= set(sep)
    joint = hyena2d(filter_mode="joint", window_mode="learn")
    params = dict(joint.named_parameters())
    assert {"filter_fn.modulation.Xdeltas", "filter_fn.modulation.Ydeltas", "filter_fn.modulation.shift",
            "filter_fn.implicit_filter.0.weight", "filter_fn.pos_emb.z"} <= set(params)
    assert params["filter_fn.implicit_filter.0.weight"].shape == (8, 6)         # 2 emb_dim inputs
    none = hyena2d(window_mode="no")
    assert not any("deltas" in n for n in dict(none.state_dict()))
    # One Sin module for both axes' MLPs, as the official HyenaFilter2d.
    f = hyena2d().filter_fn
    assert f.Ximplicit_filter[1] is f.Yimplicit_filter[1] is f.Ximplicit_filter[3]


def test_useful_flops():
    m = hyena2d(dim=64, l_max=64)
    f1, b1 = m.useful_flops(1, 32 * 32, 64, 8, False)
    f2, _ = m.useful_flops(1, 64 * 64, 64, 8, False)
    assert b1 == 2 * f1 and 4.0 < f2 / f1 < 5.0
    with pytest.raises(NotImplementedError, match="hyena2d.*causal"):
        m.useful_flops(1, 1024, 64, 8, True)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("H,W", [(9, 4), (4, 9)])
def test_image_larger_than_l_max_raises(H, W):
    with pytest.raises(ValueError, match=rf"hyena2d: image {H} x {W} exceeds l_max=8"):
        hyena2d()(image(1, H, W))


def test_causal_mask_and_cache_refused():
    m = hyena2d()
    x = image(1, 4, 4)
    for kwargs, feature in ((dict(is_causal=True), "causal"), (dict(attn_mask=torch.ones(1, 16, dtype=torch.bool)),
                            "attn_mask"), (dict(cache=attnlab.KVCache()), "kv_cache")):
        with pytest.raises(NotImplementedError, match=f"hyena2d.*{feature}"):
            m(x, **kwargs)


@pytest.mark.parametrize("options,match", [
    (dict(direction="4dir"), r"direction must be one of \('full', 'quadrant', 'seq'\), got '4dir'"),
    (dict(filter_mode="product"), r"filter_mode must be one of \('separable', 'joint'\), got 'product'"),
    (dict(window_mode="symettric"), r"window_mode 'symettric' .* not supported"),
    (dict(window_mode="learned"), r"window_mode must be one of \('standard', 'learn', 'no'\), got 'learned'"),
    (dict(order=1), r"order must be an int >= 2, got 1"),
    (dict(l_max=0), r"l_max must be an int >= 1, got 0"),
    (dict(emb_dim=2), r"emb_dim must be an odd int >= 3.*got 2"),
    (dict(target=0.0), r"target must be a finite number > 0, got 0.0"),
    (dict(proj_drop=-0.1), r"proj_drop must be a number in \[0, 1\), got -0.1"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        attnlab.create("hyena2d", DIM, 1, **options)


def test_non_bool_flag_raises():
    with pytest.raises(TypeError, match="hyena2d: official_scale must be a bool, got int"):
        attnlab.create("hyena2d", DIM, 1, official_scale=1)


# --- the official module, when a HyenaND checkout is at hand ----------------------------------------

def _official():
    root = os.environ.get("ATTNLAB_HYENAND_DIR")
    if not root:
        pytest.skip("set ATTNLAB_HYENAND_DIR to an Itamarzimm/HyenaND checkout to compare with its hyena2d.py")
    pytest.importorskip("einops")
    path = os.path.join(root, "pytorch-image-models", "timm", "models", "layers", "hyena2d.py")
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    spec = importlib.util.spec_from_file_location("_hyenand_hyena2d", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("official_kw,options", [
    (dict(), dict()),
    (dict(hyena2d_filter=True), dict(filter_mode="joint")),
    (dict(order=3, directional_mode="seq", window_mode="learn"), dict(order=3, direction="seq", window_mode="learn")),
    (dict(window_mode="no"), dict(window_mode="no")),
])
def test_matches_the_official_module_with_copied_weights(official_kw, options):
    """The official module computes its FFTs in float32 whatever the input: float32 tolerances."""
    with contextlib.redirect_stdout(io.StringIO()):          # it prints its configuration
        official = _official().HyenaOperator2d(d_model=DIM, l_max=7, filter_order=16, **official_kw)
    m = attnlab.create("hyena2d", DIM, 1, l_max=7, filter_order=16, official_scale=True,
                       **{"direction": "quadrant", **options})
    m.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 7, 7, DIM)
    with torch.no_grad():
        assert_close(m(x), official(x), rtol=1e-5, atol=1e-6)
