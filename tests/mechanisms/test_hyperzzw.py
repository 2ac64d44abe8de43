"""hyperzzw against a naive float64 reference of the official FastMultiBranchLayer, the context
option, gradcheck, the official key names, bad input.

"HyperZ·Z·W Operator Connects Slow-Fast Networks for Full Context Interaction" (Zhang, 2024).
`official_layer` below is written from the official code (hyperevolnet/Terminator as kept in the
fork lalalune/Terminator: fast_multi_branch.py, magnet.py, slow_net.py, local_conv.py, rgu.py,
hyper_interact.py) and shares no code with attnlab: 1 x 1 convolutions as einsums, the
standardisations and GELU written out, MAGNet_L's s_renormalization with its transpose, its
`out.data.clone()` and F.normalize-style norm over (rows, k, k), the batch mean of the local
context and the batch statistics of LocalConv's BatchNorm. It is the official computation on a
whole batch (context="batch"); the per-sample default is that computation on each sample alone.
For the sizes the official code refuses (H != W, or H, W != global_size) it follows attnlab's
documented generalisation, written independently here: per-position biases resampled with
explicit bilinear (align_corners) weight matrices, and plane products of zero-padded squares.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.testing import assert_close

import attnlab

DIM = 6
TIGHT = dict(rtol=1e-10, atol=1e-11)
GRAD = dict(rtol=1e-9, atol=1e-10)
SPEC = attnlab.get_spec("hyperzzw")
SMALL = dict(global_size=6, local_kernel_sizes=(3, 5, 3, 5), no_hidden=5)


def hyper(dim=DIM, dtype=torch.float64, randomise=True, **options):
    """A hyperzzw module; zero-initialised biases (the official init) are randomised so that the
    reference sees them."""
    m = attnlab.create("hyperzzw", dim, 1, **{**SMALL, **options}).to(dtype).eval()
    if randomise:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith(("bias_p", "bias_pk")) or name.startswith("bias"):
                    p.normal_(0.0, 0.3)
    return m


def image(B, H, W, dim=DIM, dtype=torch.float64, requires_grad=False):
    return torch.randn(B, H, W, dim, dtype=dtype, requires_grad=requires_grad)


# --- the naive reference of the official computation -------------------------------------------

def lin(p, name, z):
    """The official Linear1d/Linear2d (a 1 x 1 convolution) as an einsum."""
    w, b = p[f"{name}.weight"], p[f"{name}.bias"]
    w = w.reshape(w.shape[0], w.shape[1])
    if z.dim() == 3:
        return torch.einsum("oc,bcn->bon", w, z) + b[:, None]
    return torch.einsum("oc,bchw->bohw", w, z) + b[:, None, None]


def grid(*sizes):
    """linspace_grid: (1, D, *sizes) coordinates in [-1, 1]."""
    axes = [torch.linspace(-1, 1, s, dtype=torch.float64) for s in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def gelu(z):
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def standardise(z, dims):
    """(z - mean) / sqrt(biased var + 1e-5) over `dims` (InstanceNorm2d: (2, 3); BatchNorm2d: (0, 2, 3))."""
    mean = z.mean(dim=dims, keepdim=True)
    var = ((z - mean) ** 2).mean(dim=dims, keepdim=True)
    return (z - mean) / torch.sqrt(var + 1e-5)


def layers_of(p, prefix):
    return sum(1 for k in p if k.startswith(f"{prefix}.linears.") and k.endswith(".weight"))


def magnet(p, prefix, coords, bias, ctx=None, detach=True):
    """MAGNet_G / MAGNet_GC forward, or MAGNet_L's when `ctx` is given."""
    L = layers_of(p, prefix)
    out = torch.sin(lin(p, f"{prefix}.filters.0.linear", coords))
    for i in range(1, L + 1):
        out = torch.sin(lin(p, f"{prefix}.filters.{i}.linear", coords)) * lin(p, f"{prefix}.linears.{i - 1}", out) + bias
        if ctx is not None:
            t = out.transpose(0, 1)                                   # s_renormalization
            delta = t.detach().clone() if detach else t
            flat = t.reshape(t.shape[0], -1)
            normed = (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(t.shape)
            out = (1.0 * delta + 0.1 * normed).transpose(0, 1)
            out = out * lin(p, f"{prefix}.fast_linears_x.{i - 1}", ctx)
    return lin(p, f"{prefix}.output_linear", out)


def interp_matrix(n_out, n_in):
    """(n_out, n_in) bilinear weights, align_corners=True."""
    M = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        t = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        lo = min(int(math.floor(t)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        M[i, lo] += 1.0 - (t - lo)
        M[i, hi] += t - lo
    return M


def on_grid(bias, H, W):
    """A (1, 1, S, S) position bias on the H x W grid."""
    S = bias.shape[-1]
    return (interp_matrix(H, S) @ bias[0, 0] @ interp_matrix(W, S).T)[None, None]


def plane_product(a, b):
    """torch.matmul over (H, W); for H != W both zero-padded to a square and the product cropped."""
    H, W = a.shape[-2:]
    n = max(H, W)
    pa = a.new_zeros(*a.shape[:2], n, n)
    pb = b.new_zeros(*b.shape[:2], n, n)
    pa[..., :H, :W] = a
    pb[..., :H, :W] = b
    return (pa @ pb)[..., :H, :W]


def official_layer(p, x, sizes, detach=True):
    """FastMultiBranchLayer.forward on x (B, C, H, W), bottleneck to C, no x_pre."""
    B, C, H, W = x.shape

    def rgu(prefix, z):
        k, v = lin(p, f"{prefix}.fast_linear_k", z), lin(p, f"{prefix}.fast_linear_v", z)
        q = gelu(standardise(k * lin(p, f"{prefix}.fast_linear_q", v), (2, 3))) + on_grid(p[f"{prefix}.bias_p"], H, W)
        return lin(p, f"{prefix}.fast_linear_y", q)

    def channel_kernel(prefix):                                      # (1, 1, C)
        return magnet(p, prefix, grid(C), p[f"{prefix}.bias_p"])

    def hci(z):
        y = z.mean(dim=(2, 3))[:, None, :]                           # (B, 1, C)
        score = torch.sigmoid((y * channel_kernel("channel_mixer_hci.slow_net_gc.Kernel")) * y)
        return z * score.transpose(1, 2)[..., None]                  # (B, C, 1, 1)

    def hyper_interact(y, z):
        y_c = y.mean(dim=(2, 3))[:, None, :]                         # (B, 1, C)
        score_c = ((y_c * channel_kernel("hyper_interact.slow_net_gc.Kernel")) * y_c).transpose(1, 2)[..., None]
        y_s = y.mean(dim=1, keepdim=True)                            # (B, 1, H, W)
        pre = "hyper_interact.slow_net_gs.Kernel"
        score_s = (y_s * magnet(p, pre, grid(H, W), on_grid(p[f"{pre}.bias_p"], H, W))) * y_s
        return z * torch.sigmoid(score_s * score_c)

    def local_kernel(j, z):
        pre, k = f"slow_net_l{j}.Kernel", sizes[j - 1]
        ctx = lin(p, f"{pre}.fast_reduce", F.adaptive_avg_pool2d(z, (k, k))).mean(dim=0, keepdim=True)
        ctx = gelu(lin(p, f"{pre}.fast_fc1", ctx))
        return magnet(p, pre, grid(k, k), p[f"{pre}.bias_pk"], ctx=ctx, detach=detach).reshape(C, 1, k, k)

    def local_conv(j, hk, z):
        k = sizes[j - 1]
        feat = F.conv2d(z, hk, padding=(k - 1) // 2, groups=C)
        return gelu(standardise(lin(p, f"local_interact_conv_{j}.channel_mixer", feat), (0, 2, 3)))

    pre = "slow_net_g.Kernel"
    ghk = magnet(p, pre, grid(H, W), on_grid(p[f"{pre}.bias_p"], H, W))   # (1, C, H, W)
    gctx = x * ghk
    fast = standardise(rgu("Fast_Kernel_rgu_2", gctx) + rgu("Fast_Kernel_rgu", x), (2, 3))
    mixer_x = standardise(lin(p, "channel_mixer_mlp", x), (2, 3))
    x_hci = standardise(hci(x), (2, 3))
    out, out_x, out_eca = (plane_product(gctx, f) for f in (fast, mixer_x, x_hci))
    out_glu = torch.sigmoid(out) * out
    x_hyper = hyper_interact(out, x)
    lf1 = local_conv(1, local_kernel(1, x), x_hci) + p["bias1"]
    lf2 = local_conv(2, local_kernel(2, x_hci), x) + p["bias2"]
    lf3 = local_conv(3, local_kernel(3, mixer_x), x) + p["bias3"]
    lf4 = local_conv(4, local_kernel(4, x), mixer_x) + p["bias4"]
    cat = torch.cat([out, lf2, fast, out_x, lf1, out_glu, lf3, out_eca, lf4, x_hyper], dim=1)
    return lin(p, "bottleneck_layer", cat)


def reference(m, x, p=None):
    """The module's computation by the naive reference: channels-last in and out."""
    p = dict(m.named_parameters()) if p is None else p
    z = x.permute(0, 3, 1, 2)
    sizes, detach = m.local_kernel_sizes, m.renorm_detach
    if m.context == "batch":
        y = official_layer(p, z, sizes, detach)
    else:
        y = torch.cat([official_layer(p, z[b:b + 1], sizes, detach) for b in range(z.shape[0])])
    return y.permute(0, 2, 3, 1)


def grads(fn, m, x):
    out = fn(m, x)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    names, params = zip(*m.named_parameters())
    gs = torch.autograd.grad(out, (x, *params), g)
    return out, dict(zip(("x",) + names, gs))


# --- against the reference ---------------------------------------------------------------------

CASES = {
    "sample-6x6": dict(H=6, W=6),                                          # the official size: S = H = W
    "batch-6x6": dict(H=6, W=6, context="batch"),
    "sample-6x6-layers1": dict(H=6, W=6, num_layers=1, no_hidden=dict(l=4, g=7)),
    "sample-6x6-nodetach": dict(H=6, W=6, renorm_detach=False, num_layers=dict(l=3)),
    "batch-5x5-k9": dict(H=5, W=5, global_size=5, local_kernel_sizes=(9, 3, 7, 1), context="batch"),
    "sample-4x7-resampled": dict(H=4, W=7, B=2),                           # non-square, biases resampled
    "batch-7x4-resampled": dict(H=7, W=4, context="batch"),
    "sample-8x8-upsampled": dict(H=8, W=8, global_size=5, B=2),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_naive_reference(case):
    case = dict(case)
    H, W, B = case.pop("H"), case.pop("W"), case.pop("B", 3)
    m = hyper(**case)
    x = image(B, H, W, requires_grad=True)
    out, g = grads(lambda mm, xx: mm(xx), m, x)
    ref, g_ref = grads(reference, m, x)
    assert out.shape == x.shape
    assert_close(out, ref, **TIGHT)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert_close(g[name], g_ref[name], **GRAD, msg=lambda s, n=name: f"grad {n}: {s}")


# --- context: per sample by default, the official batch coupling as an option -----------------

def test_default_output_never_depends_on_other_samples():
    m = hyper()
    x = image(4, 6, 6)
    y = m(x)
    x2 = x.clone()
    x2[1:] = 5.0 * torch.randn_like(x2[1:])
    assert_close(m(x2)[0], y[0], **TIGHT)
    for i in range(4):
        assert_close(m(x[i:i + 1]), y[i:i + 1], **TIGHT)


def test_batch_context_makes_outputs_depend_on_other_samples():
    """Official: the local kernels average the batch's context and LocalConv's BatchNorm uses the
    batch's statistics (in eval too), so sample 0's output moves when sample 1 changes."""
    m = hyper(context="batch")
    x = image(3, 6, 6)
    y = m(x)
    x2 = x.clone()
    x2[1:] = 5.0 * torch.randn_like(x2[1:])
    assert (m(x2)[0] - y[0]).abs().max() > 1e-3
    assert (m(x[:1]) - y[:1]).abs().max() > 1e-3


def test_batch_context_couples_through_kernels_and_statistics_both():
    """Each coupling alone: the batch-mean kernels (hook_local_hk) are shared by the batch, and with
    identical kernels the BatchNorm still mixes samples."""
    m = hyper(context="batch")
    seen = {}
    m.hook_local_hk_1.register_forward_hook(lambda mod, i, o: seen.__setitem__("hk", o))
    x = image(2, 6, 6)
    m(x)
    assert seen["hk"].shape == (1, DIM, 3, 3)
    m(x[:1])
    single = seen["hk"]
    m(x)
    assert (seen["hk"] - single).abs().max() > 1e-6


def test_sample_and_batch_agree_at_batch_size_one():
    m = hyper()
    mb = hyper(context="batch", randomise=False)
    mb.load_state_dict(m.state_dict())
    x = image(1, 6, 6)
    assert_close(m(x), mb(x), **TIGHT)


def test_per_sample_local_kernels_differ_between_samples():
    m = hyper()
    seen = {}
    for j in range(1, 5):
        getattr(m, f"hook_local_hk_{j}").register_forward_hook(lambda mod, i, o, j=j: seen.__setitem__(j, o))
    m(image(2, 6, 6))
    assert [tuple(seen[j].shape) for j in range(1, 5)] == [(2, DIM, k, k) for k in (3, 5, 3, 5)]
    assert (seen[1][0] - seen[1][1]).abs().max() > 1e-6


# --- pieces and limiting cases -----------------------------------------------------------------

def test_global_hyper_kernel_is_the_coordinate_net_and_input_independent():
    m = hyper()
    seen = []
    m.hook_global_hk.register_forward_hook(lambda mod, i, o: seen.append(o))
    m.hook_global_ctx_hk.register_forward_hook(lambda mod, i, o: seen.append(o))
    x = image(2, 6, 6)
    m(x)
    m(3.0 * image(1, 6, 6))
    assert seen[0].shape == (1, DIM, 6, 6)
    assert_close(seen[0], seen[2], rtol=0, atol=0)                            # W_g: coordinates only
    assert_close(seen[1], x.permute(0, 3, 1, 2) * seen[0], rtol=0, atol=0)    # Z·W


def test_plane_product_square_is_matmul_and_rectangular_contracts_min_side():
    from attnlab.mechanisms.hyperzzw import plane_matmul
    a, b = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert_close(plane_matmul(a, b), torch.matmul(a, b), rtol=0, atol=0)
    for H, W in ((3, 7), (7, 3)):
        a, b = torch.randn(2, 3, H, W, dtype=torch.float64), torch.randn(2, 3, H, W, dtype=torch.float64)
        assert_close(plane_matmul(a, b), plane_product(a, b), **TIGHT)


def test_renorm_detach_changes_gradients_not_the_forward():
    m = hyper()
    md = hyper(renorm_detach=False, randomise=False)
    md.load_state_dict(m.state_dict())
    x = image(2, 6, 6)
    assert_close(m(x), md(x), rtol=0, atol=0)
    m(x).square().sum().backward()
    md(x).square().sum().backward()
    g, gd = dict(m.named_parameters()), dict(md.named_parameters())
    pre = "slow_net_l1.Kernel.filters.0.linear.weight"        # feeds the renormalised layers
    assert (g[pre].grad - gd[pre].grad).abs().max() > 1e-8
    # the global branch never meets the renormalisation
    assert_close(g["slow_net_g.Kernel.bias_p"].grad, gd["slow_net_g.Kernel.bias_p"].grad, **TIGHT)


def test_chang_initialisation_scales_the_output_layers():
    """Output layers start at kaiming-uniform bounds times sqrt(1 / kernel points)."""
    m = attnlab.create("hyperzzw", 16, 1, global_size=10, no_hidden=8)
    for name, points in (("slow_net_g", 100), ("slow_net_l2", 81), ("channel_mixer_hci.slow_net_gc", 16)):
        w = m.get_submodule(name).Kernel.output_linear.weight
        bound = math.sqrt(3.0 / w.shape[1]) * math.sqrt(1.0 / points)
        assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound, name


def test_official_state_dict_keys():
    """The official FastMultiBranchLayer's keys (less its train_length buffers), written out."""
    m = attnlab.create("hyperzzw", 4, 1, global_size=4, local_kernel_sizes=(3, 3, 3, 3), no_hidden=4, num_layers=1)

    def mag(prefix, local=False):
        keys = [f"{prefix}.{n}.{t}" for n in ("linears.0", "output_linear", "filters.0.linear", "filters.1.linear")
                for t in ("weight", "bias")]
        keys.append(f"{prefix}.bias_pk" if local else f"{prefix}.bias_p")
        if local:
            keys += [f"{prefix}.{n}.{t}" for n in ("fast_reduce", "fast_fc1", "fast_linears_x.0") for t in ("weight", "bias")]
        return keys

    expect = mag("slow_net_g.Kernel") + [f"bias{j}" for j in range(1, 5)]
    for j in range(1, 5):
        expect += mag(f"slow_net_l{j}.Kernel", local=True)
        expect += [f"local_interact_conv_{j}.channel_mixer.{t}" for t in ("weight", "bias")]
    expect += [f"{n}.{t}" for n in ("channel_mixer_mlp", "bottleneck_layer") for t in ("weight", "bias")]
    for r in ("Fast_Kernel_rgu", "Fast_Kernel_rgu_2"):
        expect += [f"{r}.bias_p"] + [f"{r}.fast_linear_{n}.{t}" for n in "kvqy" for t in ("weight", "bias")]
    expect += mag("channel_mixer_hci.slow_net_gc.Kernel") + mag("hyper_interact.slow_net_gc.Kernel")
    expect += mag("hyper_interact.slow_net_gs.Kernel")
    sd = m.state_dict()
    assert sorted(sd) == sorted(expect)
    assert sd["bottleneck_layer.weight"].shape == (4, 40, 1, 1)
    assert sd["channel_mixer_hci.slow_net_gc.Kernel.filters.0.linear.weight"].shape == (4, 1, 1)   # Conv1d


def test_each_pixel_sees_the_whole_row_and_column_through_the_global_branch():
    """Local kernels reach at most 2 pixels here (k = 5); the plane products carry pixel (0, 0)
    to every pixel of its row and column, on a 12 x 12 image with only 3 x 3 local kernels."""
    m = hyper(global_size=12, local_kernel_sizes=(3, 3, 3, 3))
    x = image(1, 12, 12)
    x2 = x.clone()
    x2[0, 0, 0] += 1.0
    diff = (m(x2) - m(x)).abs().amax(-1)[0]                    # (12, 12)
    assert (diff[0, :] > 1e-9).all() and (diff[:, 0] > 1e-9).all()


# --- gradcheck ----------------------------------------------------------------------------------

def test_gradcheck_all_inputs_without_the_stop_gradient():
    m = hyper(dim=3, global_size=3, local_kernel_sizes=(3, 1, 3, 1), no_hidden=3, num_layers=1, renorm_detach=False)
    params = dict(m.named_parameters())
    names = list(params)
    x = image(2, 3, 3, dim=3, requires_grad=True)

    def fn(x, *tensors):
        return functional_call(m, dict(zip(names, tensors)), (x,))

    inputs = (x, *(params[n].detach().clone().requires_grad_() for n in names))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("context", ["sample", "batch"])
def test_gradcheck_input_with_the_official_stop_gradient(context):
    """With one hidden layer the detached term lies before the context enters, so the input
    gradient is the true one."""
    m = hyper(dim=3, global_size=4, local_kernel_sizes=(3, 3, 1, 3), no_hidden=3, num_layers=dict(l=1),
              context=context)
    x = image(2, 4, 3, dim=3, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


# --- dtypes, sizes, flops ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 6, 6), (0, 6, 6), (1, 1, 2), (2, 3, 9)], ids=str)
def test_shape_and_dtype_kept(dtype, shape):
    m = attnlab.create("hyperzzw", DIM, 1, **SMALL).to(dtype).eval()
    y = m(torch.randn(*shape, DIM, dtype=dtype))
    assert y.shape == shape + (DIM,) and y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("context", ["sample", "batch"])
def test_useful_flops_match_the_flop_counter(context):
    from torch.utils.flop_counter import FlopCounterMode
    m = attnlab.create("hyperzzw", 16, 4, global_size=8, no_hidden=dict(l=6, gs_hi=5), num_layers=dict(l=3),
                       context=context).eval()
    x = torch.randn(3, 8, 8, 16)
    with FlopCounterMode(display=False) as counter:
        m(x)
    fwd, bwd = m.useful_flops(3, 64, 16, 4, False)
    assert fwd == counter.get_total_flops() and bwd == 2 * fwd
    with pytest.raises(NotImplementedError, match="causal"):
        m.useful_flops(3, 64, 16, 4, True)
    with pytest.raises(ValueError, match="square"):
        m.useful_flops(3, 60, 16, 4, False)


def test_proj_drop_only_in_training():
    m = hyper(proj_drop=0.5)
    x = image(1, 6, 6)
    assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    y = m(x)
    assert torch.isfinite(y).all() and (y == 0).any() and not torch.equal(y, m(x))
    with pytest.raises(ValueError, match=r"hyperzzw: proj_drop must be a number in \[0, 1\), got 1.0"):
        hyper(proj_drop=1.0)


def test_num_heads_is_accepted_and_unused():
    torch.manual_seed(0)
    a = attnlab.create("hyperzzw", 8, 1, **SMALL)
    torch.manual_seed(0)
    b = attnlab.create("hyperzzw", 8, 4, **SMALL)
    x = torch.randn(1, 6, 6, 8)
    assert_close(a(x), b(x), rtol=0, atol=0)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 36, DIM), (2, 6, 6, 1, DIM), (DIM,)], ids=["seq", "5d", "1d"])
def test_wrong_rank_raises(shape):
    with pytest.raises(ValueError) as info:
        hyper()(torch.randn(shape, dtype=torch.float64))
    msg = str(info.value)
    assert "hyperzzw" in msg and str(shape) in msg and str(DIM) in msg, msg


def test_channels_first_input_raises_naming_widths():
    with pytest.raises(ValueError) as info:
        hyper()(torch.randn(2, DIM, 5, 5, dtype=torch.float64))
    msg = str(info.value)
    assert "hyperzzw" in msg and f"C={DIM}" in msg and "got 5" in msg and "channels-last" in msg, msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_input_raises(dtype):
    with pytest.raises(TypeError, match=rf"hyperzzw.*{str(dtype).removeprefix('torch.')}"):
        hyper()(torch.zeros(2, 6, 6, DIM, dtype=dtype))


def test_one_pixel_image_raises():
    with pytest.raises(ValueError, match=r"hyperzzw.*H \* W >= 2.*H=1, W=1"):
        hyper()(image(2, 1, 1))


@pytest.mark.parametrize("feature,kwargs", [
    ("attn_mask", dict(attn_mask=torch.ones(2, 36, dtype=torch.bool))),
    ("causal", dict(is_causal=True)),
    ("kv_cache", dict(cache=attnlab.KVCache())),
])
def test_unsupported_features_raise(feature, kwargs):
    with pytest.raises(NotImplementedError, match=rf"hyperzzw.*{feature}"):
        hyper()(image(2, 6, 6), **kwargs)


@pytest.mark.parametrize("options,needle", [
    (dict(global_size=0), "global_size"), (dict(global_size=4.0), "global_size"),
    (dict(local_kernel_sizes=(3, 5, 7)), "local_kernel_sizes"), (dict(local_kernel_sizes=(3, 4, 5, 7)), "odd"),
    (dict(local_kernel_sizes=3), "local_kernel_sizes"), (dict(local_kernel_sizes=(3, 5, 7, True)), "odd"),
    (dict(no_hidden=0), "no_hidden"), (dict(no_hidden=dict(q=4)), "no_hidden"), (dict(num_layers=dict(l=0)), "num_layers"),
    (dict(omega_0=0.0), "omega_0"), (dict(omega_0=float("inf")), "omega_0"), (dict(context="batchwise"), "context"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_options_raise_at_create(options, needle):
    with pytest.raises(ValueError) as info:
        attnlab.create("hyperzzw", DIM, 1, **options)
    msg = str(info.value)
    assert "hyperzzw" in msg and needle in msg, msg


def test_bad_renorm_detach_type_raises():
    with pytest.raises(TypeError, match="renorm_detach"):
        attnlab.create("hyperzzw", DIM, 1, renorm_detach=1)


@pytest.mark.parametrize("dim,heads", [(0, 1), (8, 0), (8, -2)])
def test_non_positive_sizes_raise(dim, heads):
    with pytest.raises(ValueError, match="hyperzzw"):
        attnlab.create("hyperzzw", dim, heads)


def test_unknown_option_raises_type_error():
    with pytest.raises(TypeError, match="bogus_option"):
        attnlab.create("hyperzzw", DIM, 1, bogus_option=1)
