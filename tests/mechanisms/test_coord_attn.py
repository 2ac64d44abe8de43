"""coord_attn against a naive float64 reference (eval and train), timm's CoordAttn, limits, bad input.

"Coordinate Attention for Efficient Mobile Network Design" (Hou, Zhou, Feng; CVPR 2021), official
houqb/CoordAttention `coordatt.py::CoordAtt`. The naive reference below follows that code in NCHW,
sharing no code with attnlab: strip means as sums divided by the length, 1 x 1 convs as einsums,
BatchNorm, h_swish (x * min(max(x + 3, 0), 6) / 6) and the sigmoid written out:

    y = h_swish(BN(W1 [mean_W x, mean_H x] + b1)),  out = x * sigmoid(W_w y_w + b_w) * sigmoid(W_h y_h + b_h)

An optional peer test copies the weights into timm's `timm.layers.coord_attn.CoordAttn`.
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import attnlab

DIM, HEADS = 16, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)
EPS = 1e-5


def module(dim=DIM, dtype=torch.float64, **options):
    """A coord_attn module with random BN affine parameters and running statistics."""
    m = attnlab.create("coord_attn", dim, HEADS, **options).to(dtype).eval()
    with torch.no_grad():
        m.bn1.weight.uniform_(0.5, 1.5)
        m.bn1.bias.normal_(0.0, 0.3)
        m.bn1.running_mean.normal_(0.0, 0.3)
        m.bn1.running_var.uniform_(0.5, 2.0)
    return m


# --- the naive reference -----------------------------------------------------------------------

def naive_coord_attn(p, x, training=False):
    """The official CoordAtt.forward on channels-last x, parameters p by the official names."""
    f = x.permute(0, 3, 1, 2)                                   # (B, C, H, W)
    B, C, H, W = f.shape
    x_h = f.sum(3) / W                                          # (B, C, H)
    x_w = f.sum(2) / H                                          # (B, C, W)
    y = torch.cat([x_h, x_w], dim=2)                            # (B, C, H + W)
    y = torch.einsum("mc,bcl->bml", p["conv1.weight"][:, :, 0, 0], y) + p["conv1.bias"][None, :, None]
    if training:
        mean = y.mean((0, 2))
        var = ((y - mean[None, :, None]) ** 2).mean((0, 2))
    else:
        mean, var = p["bn1.running_mean"], p["bn1.running_var"]
    y = (y - mean[None, :, None]) / torch.sqrt(var[None, :, None] + EPS) * p["bn1.weight"][None, :, None] \
        + p["bn1.bias"][None, :, None]
    y = y * torch.clamp(y + 3.0, 0.0, 6.0) / 6.0                # h_swish
    y_h, y_w = y[:, :, :H], y[:, :, H:]

    def gate(name, t):
        a = torch.einsum("cm,bml->bcl", p[f"{name}.weight"][:, :, 0, 0], t) + p[f"{name}.bias"][None, :, None]
        return 1.0 / (1.0 + torch.exp(-a))
    a_h, a_w = gate("conv_h", y_h), gate("conv_w", y_w)          # (B, C, H), (B, C, W)
    out = f * a_w[:, :, None, :] * a_h[:, :, :, None]
    return out.permute(0, 2, 3, 1)


def params_and_buffers(m):
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


@pytest.mark.parametrize("dim,options,shape", [
    (DIM, dict(), (2, 5, 7)), (DIM, dict(), (1, 1, 1)), (DIM, dict(reduction=4, min_channels=2), (2, 4, 6)),
    (64, dict(reduction=4), (1, 3, 9)), (DIM, dict(), (1, 14, 14)), (24, dict(reduction=1, min_channels=1), (2, 2, 3)),
], ids=str)
def test_outputs_and_gradients_match_the_naive_reference(dim, options, shape):
    m = module(dim, **options)
    x = torch.randn(*shape, dim, dtype=torch.float64, requires_grad=True)
    names, params = zip(*m.named_parameters())
    y = m(x)
    ref = naive_coord_attn(params_and_buffers(m), x)
    assert_close(y, ref, **TIGHT)
    g = torch.randn_like(y)
    for n, a, b in zip(("x", *names), torch.autograd.grad(y, (x, *params), g),
                       torch.autograd.grad(ref, (x, *params), g)):
        assert_close(a, b, **GRAD, msg=lambda s, n=n: f"gradient of {n}: {s}")


def test_training_mode_normalises_the_strips_over_the_batch():
    m = module().train()
    x = torch.randn(3, 4, 6, DIM, dtype=torch.float64, requires_grad=True)
    before = {k: v.clone() for k, v in m.named_buffers()}
    names, params = zip(*m.named_parameters())
    y = m(x)
    ref = naive_coord_attn({**dict(m.named_parameters()), **before}, x, training=True)
    assert_close(y, ref, **TIGHT)
    g = torch.randn_like(y)
    for n, a, b in zip(("x", *names), torch.autograd.grad(y, (x, *params), g),
                       torch.autograd.grad(ref, (x, *params), g)):
        assert_close(a, b, **GRAD, msg=lambda s, n=n: f"gradient of {n}: {s}")
    assert m.bn1.momentum == 0.1 and int(m.bn1.num_batches_tracked) == 1


def test_gradcheck():
    m = module(dim=4, reduction=2, min_channels=2)
    x = torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    names, params = zip(*m.named_parameters())

    def of_params(*ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x.detach(),))
    assert torch.autograd.gradcheck(of_params, tuple(p.detach().clone().requires_grad_(True) for p in params))


# --- peer: timm's CoordAttn --------------------------------------------------------------------

def test_matches_timm_coord_attn_with_copied_weights():
    pytest.importorskip("timm")
    from timm.layers.coord_attn import CoordAttn
    torch.manual_seed(0)
    for dim, shape in ((DIM, (2, 5, 7)), (320, (2, 14, 14))):
        ours = module(dim)
        theirs = CoordAttn(dim, rd_channels=max(8, dim // 32), bias=True).double().eval()
        theirs.load_state_dict(ours.state_dict())                  # same keys, strict
        x = torch.randn(*shape, dim, dtype=torch.float64)
        with torch.no_grad():
            y, y_timm = ours(x), theirs(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        print(f"dim {dim}: max |coord_attn - timm CoordAttn| = {(y - y_timm).abs().max().item():.3e}")
        assert_close(y, y_timm, **TIGHT)


# --- structure and limiting cases --------------------------------------------------------------

@pytest.mark.parametrize("dim,options,mip", [(16, {}, 8), (512, {}, 16), (320, {}, 10), (64, dict(reduction=4), 16),
                                             (16, dict(reduction=4, min_channels=2), 4), (16, dict(min_channels=20), 20)])
def test_bottleneck_width_is_the_official_formula(dim, options, mip):
    m = attnlab.create("coord_attn", dim, HEADS, **options)
    assert m.mip == mip
    assert {k: tuple(v.shape) for k, v in m.state_dict().items() if k != "bn1.num_batches_tracked"} == {
        "conv1.weight": (mip, dim, 1, 1), "conv1.bias": (mip,), "conv_h.weight": (dim, mip, 1, 1), "conv_h.bias": (dim,),
        "conv_w.weight": (dim, mip, 1, 1), "conv_w.bias": (dim,),
        **{f"bn1.{n}": (mip,) for n in ("weight", "bias", "running_mean", "running_var")}}


def test_zero_gate_convs_give_a_quarter_of_the_input():
    m = module()
    with torch.no_grad():
        for conv in (m.conv_h, m.conv_w):
            conv.weight.zero_()
            conv.bias.zero_()
    x = torch.randn(2, 3, 5, DIM, dtype=torch.float64)
    assert_close(m(x), x / 4, **TIGHT)                          # sigmoid(0)^2


def test_gates_are_one_per_row_and_one_per_column():
    """out / x = g_h[c, i] g_w[c, j]: rank one per channel, with the hooked gates."""
    m = module()
    x = torch.randn(2, 4, 6, DIM, dtype=torch.float64)
    seen = {}
    m.hook_gates_h.register_forward_hook(lambda mod, i, o: seen.setdefault("h", o))
    m.hook_gates_w.register_forward_hook(lambda mod, i, o: seen.setdefault("w", o))
    with torch.no_grad():
        y = m(x)
    assert seen["h"].shape == (2, DIM, 4, 1) and seen["w"].shape == (2, DIM, 1, 6)
    gates = (seen["h"] * seen["w"]).permute(0, 2, 3, 1)         # (B, H, W, C)
    assert_close(y, x * gates, **TIGHT)
    assert ((seen["h"] > 0) & (seen["h"] < 1)).all()


def test_permuting_rows_or_columns_permutes_the_output():
    """Row means do not see the column order and each column's gate depends on its own mean
    only (in eval mode), and likewise for rows: no position enters but through the strips."""
    m = module()
    x = torch.randn(2, 5, 7, DIM, dtype=torch.float64)
    cols, rows = torch.randperm(7), torch.randperm(5)
    with torch.no_grad():
        y = m(x)
        assert_close(m(x[:, :, cols]), y[:, :, cols], **TIGHT)
        assert_close(m(x[:, rows]), y[:, rows], **TIGHT)


def test_every_pixel_sees_its_row_and_column_only():
    m = module()
    x = torch.randn(1, 5, 6, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 2, 3] += 3.0
    with torch.no_grad():
        changed = (m(x2) - m(x)).abs().amax(-1)[0] > 0          # (H, W)
    same_line = torch.zeros(5, 6, dtype=torch.bool)
    same_line[2, :] = True
    same_line[:, 3] = True
    assert torch.equal(changed, same_line)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_kept_and_close_to_float64(dtype):
    m = module()
    x = torch.randn(2, 5, 5, DIM, dtype=torch.float64)
    ref = m(x)
    y = m.to(dtype)(x.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert_close(y.double(), ref, **tol)


def test_dropout_only_in_training():
    m = attnlab.create("coord_attn", DIM, HEADS, attn_drop=0.5, proj_drop=0.5).double()
    x = torch.randn(2, 6, 6, DIM, dtype=torch.float64)
    m.eval()
    assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x)) and torch.isfinite(a).all()


def test_useful_flops_match_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    m = attnlab.create("coord_attn", 64, HEADS).eval()
    x = torch.randn(2, 8, 8, 64)
    with FlopCounterMode(display=False) as counter:
        m(x)
    fwd, bwd = m.useful_flops(2, 64, 64, HEADS, False)
    assert fwd == counter.get_total_flops() and bwd == 2 * fwd
    with pytest.raises(NotImplementedError, match="causal"):
        m.useful_flops(2, 64, 64, HEADS, True)
    with pytest.raises(ValueError, match="square"):
        m.useful_flops(2, 63, 64, HEADS, False)


def test_runs_in_a_transformer_block_on_a_grid():
    from attnlab.models.transformer import Block
    block = Block(32, 4, mechanism="coord_attn", grid=(4, 4)).eval()
    assert block(torch.randn(2, 16, 32)).shape == (2, 16, 32)


# --- bad input and options ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 64, DIM), (2, 8, 8, 1, DIM), (DIM,)], ids=["seq", "5d", "1d"])
def test_wrong_rank_raises(shape):
    with pytest.raises(ValueError) as info:
        attnlab.create("coord_attn", DIM, HEADS)(torch.randn(shape))
    msg = str(info.value)
    assert "coord_attn" in msg and str(shape) in msg and str(DIM) in msg, msg


def test_channels_first_input_raises_naming_widths():
    with pytest.raises(ValueError) as info:
        attnlab.create("coord_attn", DIM, HEADS)(torch.randn(2, DIM, 8, 6))
    msg = str(info.value)
    assert "coord_attn" in msg and f"C={DIM}" in msg and "got 6" in msg and "channels-last" in msg, msg


@pytest.mark.parametrize("x", [None, [[0.0]], torch.zeros(1, 4, 4, DIM, dtype=torch.int64)], ids=["None", "list", "int64"])
def test_non_tensor_or_non_float_raises(x):
    with pytest.raises(TypeError, match="coord_attn"):
        attnlab.create("coord_attn", DIM, HEADS)(x)


@pytest.mark.parametrize("feature,kwargs", [
    ("attn_mask", dict(attn_mask=torch.ones(2, 16, dtype=torch.bool))),
    ("causal", dict(is_causal=True)),
    ("kv_cache", dict(cache=attnlab.KVCache())),
])
def test_unsupported_features_raise(feature, kwargs):
    with pytest.raises(NotImplementedError) as info:
        attnlab.create("coord_attn", DIM, HEADS)(torch.randn(2, 4, 4, DIM), **kwargs)
    assert "coord_attn" in str(info.value) and feature in str(info.value)


@pytest.mark.parametrize("dim,heads,options,match", [
    (DIM, HEADS, dict(reduction=0), r"coord_attn: reduction must be a positive int, got 0"),
    (DIM, HEADS, dict(reduction=2.5), r"coord_attn: reduction must be a positive int, got 2.5"),
    (DIM, HEADS, dict(min_channels=0), r"coord_attn: min_channels must be a positive int, got 0"),
    (DIM, HEADS, dict(min_channels=True), r"coord_attn: min_channels must be a positive int, got True"),
    (0, HEADS, dict(), r"coord_attn: dim must be a positive int, got 0"),
    (DIM, -2, dict(), r"coord_attn: num_heads must be a positive int, got -2"),
    (DIM, HEADS, dict(attn_drop=1.0), r"coord_attn: attn_drop must be a number in \[0, 1\), got 1.0"),
    (DIM, HEADS, dict(proj_drop=-0.5), r"coord_attn: proj_drop must be a number in \[0, 1\), got -0.5"),
], ids=lambda v: None)
def test_bad_options_raise_at_create(dim, heads, options, match):
    with pytest.raises(ValueError, match=match):
        attnlab.create("coord_attn", dim, heads, **options)


def test_num_heads_is_unused():
    a, b = attnlab.create("coord_attn", 18, 1).eval(), attnlab.create("coord_attn", 18, 4).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 4, 18)
    assert_close(a(x), b(x), rtol=0, atol=0)
