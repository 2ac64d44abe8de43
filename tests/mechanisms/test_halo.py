"""halo2d against a naive per-query reference, limiting cases, 2-D properties, gradcheck, bad input.

"Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (HaloNet, 2021). The naive
reference below is written from the paper's formula with the module's own parameters, in
float64, sharing no code with attnlab: for every query pixel (y, x) of block (y // b, x // b) it
walks the (b + 2 halo)^2 window around the block with loops and computes

    out_yx = Σ_{(ky, kx) in window} softmax(q_yx·k / sqrt(d) + q_yx·rH[ky - y] + q_yx·rW[kx - x]) v

where a window position outside the image has k = v = 0 (mask_padding=False, timm's zero
padding) or is left out of the softmax (mask_padding=True); rH[o] is row o + (b + halo - 1) of
`rel_height` (likewise rW).
The shared property suite covers layout "seq" only, so the 2-D properties are here.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call
from torch.testing import assert_close

import attnlab

DIM, HEADS = 32, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)
SPEC = attnlab.get_spec("halo2d")


def halo(dim=DIM, heads=HEADS, dtype=torch.float64, **options):
    """A halo2d module with random (non-zero) biases so the reference sees them too."""
    options = {"qkv_bias": True, **options}
    m = attnlab.create("halo2d", dim, heads, **options).to(dtype).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.5)
    return m


def image(B, H, W, dim=DIM, dtype=torch.float64, requires_grad=False):
    return torch.randn(B, H, W, dim, dtype=dtype, requires_grad=requires_grad)


# --- the naive reference -----------------------------------------------------------------------

def naive_halo(m, x):
    """The paper's formula, one query pixel at a time, keys gathered from explicit window loops."""
    B, H, W, C = x.shape
    h, d = m.num_heads, m.head_dim
    b, p = m.block_size, m.halo_size
    center = b + p - 1                                   # table row of offset 0
    qkv = x @ m.qkv.weight.T + (m.qkv.bias if m.qkv.bias is not None else 0.0)   # (B, H, W, 3 h d)
    Q, K, V = qkv.reshape(B, H, W, 3, h, d).unbind(3)    # (B, H, W, h, d) each
    rows = []                                            # one (h, d) output per query, raster order
    for bi in range(B):
        for y in range(H):
            for xx in range(W):
                y0, x0 = (y // b) * b - p, (xx // b) * b - p      # window corner (may be outside)
                ky_in, kx_in, rows_h_in, rows_w_in = [], [], [], []
                rows_h_out, rows_w_out = [], []
                for ky in range(y0, y0 + b + 2 * p):
                    for kx in range(x0, x0 + b + 2 * p):
                        if 0 <= ky < H and 0 <= kx < W:
                            ky_in.append(ky)
                            kx_in.append(kx)
                            rows_h_in.append(ky - y + center)
                            rows_w_in.append(kx - xx + center)
                        else:
                            rows_h_out.append(ky - y + center)
                            rows_w_out.append(kx - xx + center)
                q = Q[bi, y, xx]                                            # (h, d)
                k = K[bi, ky_in, kx_in]                                     # (n, h, d)
                v = V[bi, ky_in, kx_in]                                     # (n, h, d)
                rel = m.rel_height[rows_h_in] + m.rel_width[rows_w_in]      # (n, d)
                logits = torch.einsum("hd,nhd->hn", q, k) * m.scale + torch.einsum("hd,nd->hn", q, rel)
                if rows_h_out and not m.mask_padding:   # zero keys/values: only the relative logit
                    rel_out = m.rel_height[rows_h_out] + m.rel_width[rows_w_out]   # (n_out, d)
                    logits = torch.cat([logits, torch.einsum("hd,nd->hn", q, rel_out)], dim=1)
                    v = torch.cat([v, v.new_zeros(len(rows_h_out), h, d)], dim=0)
                probs = torch.softmax(logits, dim=-1)                       # (h, n)
                rows.append(torch.einsum("hn,nhd->hd", probs, v))
    out = torch.stack(rows).reshape(B, H, W, h * d)
    return out @ m.proj.weight.T + m.proj.bias


def dense_relpos(m, x):
    """Full attention over all H W pixels with the relative logits, by einsum (no blocks)."""
    B, H, W, C = x.shape
    h, d = m.num_heads, m.head_dim
    center = m.block_size + m.halo_size - 1
    qkv = x @ m.qkv.weight.T + m.qkv.bias
    Q, K, V = qkv.reshape(B, H * W, 3, h, d).unbind(2)            # (B, N, h, d)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)                       # (N,)
    rel = m.rel_height[ys[None, :] - ys[:, None] + center] + m.rel_width[xs[None, :] - xs[:, None] + center]
    scores = torch.einsum("bnhd,bmhd->bhnm", Q, K) * m.scale + torch.einsum("bnhd,nmd->bhnm", Q, rel)
    out = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), V).reshape(B, H, W, h * d)
    return out @ m.proj.weight.T + m.proj.bias


def grads(fn, m, x):
    """Output and gradients w.r.t. x and every parameter, for a fixed random upstream gradient."""
    out = fn(m, x)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    names, params = zip(*m.named_parameters())
    gs = torch.autograd.grad(out, (x, *params), g)
    return out, dict(zip(("x",) + names, gs))


def run_module(m, x):
    return m(x)


# --- against the reference ---------------------------------------------------------------------

CASES = {
    "6x6-b2-h1": dict(H=6, W=6, block_size=2, halo_size=1),                    # 9 blocks, 1 inside
    "6x6-b2-h1-masked": dict(H=6, W=6, block_size=2, halo_size=1, mask_padding=True),
    "4x12-b4-h2-masked": dict(H=4, W=12, block_size=4, halo_size=2, mask_padding=True, B=1),
    "6x4-b2-h3": dict(H=6, W=4, block_size=2, halo_size=3, B=1),                    # halo > block
    "6x4-b2-h3-masked": dict(H=6, W=4, block_size=2, halo_size=3, mask_padding=True),
    "4x8-b2-h0": dict(H=4, W=8, block_size=2, halo_size=0),
    "6x6-b3-h1-dimhead6": dict(H=6, W=6, block_size=3, halo_size=1, dim_head=6, heads=2),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_naive_reference(case):
    case = dict(case)
    H, W, heads, B = case.pop("H"), case.pop("W"), case.pop("heads", HEADS), case.pop("B", 2)
    m = halo(heads=heads, **case)
    x = image(B, H, W, requires_grad=True)
    out, g = grads(run_module, m, x)
    ref, g_ref = grads(naive_halo, m, x)
    assert out.shape == x.shape[:3] + (DIM,)
    assert_close(out, ref, **TIGHT)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert_close(g[name], g_ref[name], **GRAD, msg=lambda s, n=name: f"grad {n}: {s}")


def test_default_pads_with_attended_zeros_not_masked():
    """The two border conventions differ exactly at blocks whose window leaves the image."""
    m = halo(block_size=2, halo_size=1)
    mm = copy.deepcopy(m)
    mm.mask_padding = True
    x = image(1, 6, 6)
    y, ym = m(x), mm(x)
    # block (1, 1) covers pixels 2..3 and its window 1..4: inside the image, so both agree
    assert_close(y[:, 2:4, 2:4], ym[:, 2:4, 2:4], **TIGHT)
    diff = (y - ym).abs().amax(-1)[0]                        # (6, 6)
    border = torch.ones(6, 6, dtype=torch.bool)
    border[2:4, 2:4] = False
    assert (diff[border] > 1e-6).all()


# --- limiting cases ----------------------------------------------------------------------------

@pytest.mark.parametrize("mask_padding", [False, True])
def test_halo0_is_independent_attention_per_block(mask_padding):
    """halo 0: each block attends only to itself, so the module on a whole image equals the module
    on every block cut out as its own image (and a block's output ignores the other blocks)."""
    b = 4
    m = halo(block_size=b, halo_size=0, mask_padding=mask_padding)
    x = image(2, 8, 12)
    y = m(x)
    for i in range(0, 8, b):
        for j in range(0, 12, b):
            assert_close(y[:, i:i + b, j:j + b], m(x[:, i:i + b, j:j + b].contiguous()), **TIGHT)
    x2 = x.clone()
    x2[:, 4:, :] = torch.randn_like(x2[:, 4:, :])             # change the lower row of blocks
    assert_close(m(x2)[:, :4], y[:, :4], **TIGHT)


def test_one_block_no_halo_is_full_attention_with_relpos():
    """block_size = image size, halo 0: dense attention over all pixels with relative logits."""
    m = halo(block_size=6, halo_size=0)
    x = image(2, 6, 6, requires_grad=True)
    out, g = grads(run_module, m, x)
    ref, g_ref = grads(dense_relpos, m, x)
    assert_close(out, ref, **TIGHT)
    for name in g:
        assert_close(g[name], g_ref[name], **GRAD, msg=lambda s, n=name: f"grad {n}: {s}")


def test_window_covering_image_with_masked_padding_is_full_attention():
    """A halo that reaches across the whole image, padding masked: every block sees every pixel."""
    m = halo(block_size=4, halo_size=4, mask_padding=True)
    x = image(2, 8, 8)
    assert_close(m(x), dense_relpos(m, x), **TIGHT)


def test_zero_relative_tables_one_block_equals_mhsa():
    """Relative tables zeroed, one block: plain multi-head self-attention over the H W tokens."""
    m = halo(block_size=4, halo_size=0)
    with torch.no_grad():
        m.rel_height.zero_()
        m.rel_width.zero_()
    mh = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True).double().eval()
    mh.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith(("qkv.", "proj."))})
    x = image(3, 4, 4)
    assert_close(m(x), mh(x.reshape(3, 16, DIM)).reshape(3, 4, 4, DIM), **TIGHT)


# --- gradcheck ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_padding", [False, True])
def test_gradcheck(mask_padding):
    m = halo(dim=4, heads=2, block_size=2, halo_size=1, mask_padding=mask_padding)
    params = dict(m.named_parameters())
    names = ["rel_height", "rel_width"]
    x = image(1, 4, 4, dim=4, requires_grad=True)

    def fn(x, *tensors):
        return functional_call(m, {**params, **dict(zip(names, tensors))}, (x,))

    inputs = (x, *(params[n].detach().clone().requires_grad_() for n in names))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


# --- 2-D properties (the shared suite covers layout "seq" only) --------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 8), (0, 8, 8), (1, 4, 4), (3, 4, 12)], ids=str)
def test_shape_and_dtype_kept(dtype, shape):
    m = attnlab.create("halo2d", DIM, HEADS, **SPEC.test_kwargs).to(dtype).eval()
    x = torch.randn(*shape, DIM, dtype=dtype)
    y = m(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y).all()


def test_spec_test_kwargs_fit_the_documented_input():
    m = attnlab.create("halo2d", DIM, HEADS, **SPEC.test_kwargs)
    assert m(torch.randn(2, 8, 8, DIM)).shape == (2, 8, 8, DIM)
    assert SPEC.layout == "2d" and not (SPEC.causal or SPEC.attn_mask or SPEC.kv_cache)


def test_one_pixel_blocks():
    """block_size 1, halo 1: each pixel attends its 3x3 neighbourhood (SASA with k = 3)."""
    m = halo(block_size=1, halo_size=1, mask_padding=True)
    x = image(1, 3, 4)
    assert_close(m(x), naive_halo(m, x), **TIGHT)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_batch_invariance(mask_padding):
    m = halo(block_size=4, halo_size=1, mask_padding=mask_padding, dtype=torch.float32)
    x = image(4, 8, 8, dtype=torch.float32)
    y = m(x)
    for i in range(4):
        assert_close(y[i:i + 1], m(x[i:i + 1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_bf16_close_to_float32(mask_padding):
    m16 = attnlab.create("halo2d", DIM, HEADS, **SPEC.test_kwargs, mask_padding=mask_padding).bfloat16().eval()
    m32 = copy.deepcopy(m16).float()           # the same (bf16-rounded) weights, float32 compute
    x16 = torch.randn(2, 8, 8, DIM, dtype=torch.bfloat16)
    y16, y32 = m16(x16), m32(x16.float())
    assert y16.dtype == torch.bfloat16
    scale = y32.abs().max().item()
    assert_close(y16.float(), y32, rtol=1.6e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_translation_by_whole_blocks_is_equivariant_inside(mask_padding):
    """Shifting the image by one block moves every block's window with it, so away from the border
    (and the wrap-around seam of the roll) outputs shift too. A one-pixel shift changes which
    pixels share a block: the paper's blocked attention is not translation equivariant."""
    b, p = 4, 1
    m = halo(block_size=b, halo_size=p, mask_padding=mask_padding)
    x = image(1, 12, 16)
    y = m(x)
    y_shift = m(torch.roll(x, shifts=b, dims=2))
    # block column 1 of x (window columns 3..8) is block column 2 of the shifted image (7..12)
    assert_close(y_shift[:, 4:8, 2 * b:3 * b], y[:, 4:8, b:2 * b], **TIGHT)
    y_pixel = m(torch.roll(x, shifts=1, dims=2))
    assert not torch.allclose(y_pixel[:, 4:8, b + 1:2 * b + 1], y[:, 4:8, b:2 * b], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_large_inputs_no_nan_in_output_or_grads(mask_padding):
    m = halo(block_size=2, halo_size=1, mask_padding=mask_padding, dtype=torch.float32)
    x = (1e3 * torch.randn(2, 4, 6, DIM)).requires_grad_()
    y = m(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("backend", ["sdpa", "reference"])   # flex (eager on CPU) takes seconds
def test_backends_agree(backend):
    m = halo(block_size=2, halo_size=1, mask_padding=True, dtype=torch.float32)
    x = image(2, 4, 6, dtype=torch.float32)
    with torch.no_grad():
        ref = m(x)
        with attnlab.use_backend(backend):
            out = m(x)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
    m = attnlab.create("halo2d", DIM, HEADS, block_size=4, halo_size=1, attn_drop=0.5).double()
    x = image(1, 8, 8)
    m.eval()
    assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    assert torch.isfinite(m(x)).all()


def test_useful_flops_match_the_flop_counter():
    """Projections, relative-logit matmuls and the block attention: what FlopCounterMode sees."""
    from torch.utils.flop_counter import FlopCounterMode
    m = attnlab.create("halo2d", DIM, HEADS, block_size=4, halo_size=1).eval()
    x = torch.randn(2, 8, 8, DIM)
    with FlopCounterMode(display=False) as counter:
        m(x)
    fwd, bwd = m.useful_flops(2, 64, DIM, HEADS, False)
    assert fwd == counter.get_total_flops()
    assert bwd == 2 * fwd
    with pytest.raises(NotImplementedError, match="causal"):
        m.useful_flops(2, 64, DIM, HEADS, True)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 64, DIM), (2, 8, 8, 1, DIM), (DIM,)], ids=["seq", "5d", "1d"])
def test_wrong_rank_raises(shape):
    m = attnlab.create("halo2d", DIM, HEADS, **SPEC.test_kwargs)
    with pytest.raises(ValueError) as info:
        m(torch.randn(shape))
    msg = str(info.value)
    assert "halo2d" in msg and str(shape) in msg and str(DIM) in msg, msg


def test_channels_first_input_raises_naming_widths():
    m = attnlab.create("halo2d", DIM, HEADS, **SPEC.test_kwargs)
    with pytest.raises(ValueError) as info:
        m(torch.randn(2, DIM, 8, 8))
    msg = str(info.value)
    assert "halo2d" in msg and "C=32" in msg and "got 8" in msg and "channels-last" in msg, msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_input_raises(dtype):
    m = attnlab.create("halo2d", DIM, HEADS, **SPEC.test_kwargs)
    with pytest.raises(TypeError) as info:
        m(torch.zeros(2, 8, 8, DIM, dtype=dtype))
    msg = str(info.value)
    assert "halo2d" in msg and str(dtype).removeprefix("torch.") in msg and "float" in msg, msg


def test_not_a_tensor_raises():
    m = attnlab.create("halo2d", DIM, HEADS, **SPEC.test_kwargs)
    with pytest.raises(TypeError, match="halo2d.*list"):
        m([[0.0]])


@pytest.mark.parametrize("H,W", [(6, 8), (8, 10), (3, 3)])
def test_size_not_multiple_of_block_raises(H, W):
    m = attnlab.create("halo2d", DIM, HEADS, block_size=4, halo_size=1)
    with pytest.raises(ValueError) as info:
        m(torch.randn(1, H, W, DIM))
    msg = str(info.value)
    assert "halo2d" in msg and "block_size=4" in msg and f"H={H}" in msg and f"W={W}" in msg, msg


@pytest.mark.parametrize("feature,kwargs", [
    ("attn_mask", dict(attn_mask=torch.ones(2, 64, dtype=torch.bool))),
    ("causal", dict(is_causal=True)),
    ("kv_cache", dict(cache=attnlab.KVCache())),
])
def test_unsupported_features_raise(feature, kwargs):
    m = attnlab.create("halo2d", DIM, HEADS, **SPEC.test_kwargs)
    with pytest.raises(NotImplementedError) as info:
        m(torch.randn(2, 8, 8, DIM), **kwargs)
    assert "halo2d" in str(info.value) and feature in str(info.value)


@pytest.mark.parametrize("options,needle", [
    (dict(block_size=0), "block_size"), (dict(block_size=-2), "block_size"), (dict(block_size=2.0), "block_size"),
    (dict(block_size=True), "block_size"), (dict(halo_size=-1), "halo_size"), (dict(halo_size=1.5), "halo_size"),
    (dict(dim_head=0), "dim_head"), (dict(attn_drop=1.0), "attn_drop"), (dict(proj_drop=-0.1), "proj_drop"),
    (dict(scale=0.0), "scale"), (dict(scale=float("nan")), "scale"), (dict(backend="cuda"), "backend"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_options_raise_at_create(options, needle):
    with pytest.raises(ValueError) as info:
        attnlab.create("halo2d", DIM, HEADS, **options)
    assert "halo2d" in str(info.value) and needle in str(info.value), str(info.value)


def test_bad_mask_padding_type_raises():
    with pytest.raises(TypeError, match="mask_padding"):
        attnlab.create("halo2d", DIM, HEADS, mask_padding=1)


@pytest.mark.parametrize("num_heads", [0, -4])
def test_non_positive_heads_raise(num_heads):
    with pytest.raises(ValueError, match=str(num_heads)):
        attnlab.create("halo2d", DIM, num_heads)
    with pytest.raises(ValueError, match=str(num_heads)):
        attnlab.create("halo2d", DIM, num_heads, dim_head=8)


def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"\(30\).*\(4\)"):
        attnlab.create("halo2d", 30, 4)
    m = attnlab.create("halo2d", 30, 4, dim_head=8, block_size=2, halo_size=1)  # explicit head width
    assert m(torch.randn(1, 4, 4, 30)).shape == (1, 4, 4, 30)


def test_unknown_option_raises_type_error():
    with pytest.raises(TypeError, match="bogus_option"):
        attnlab.create("halo2d", DIM, HEADS, bogus_option=1)
