"""neighborhood1d/2d/3d against a naive per-token reference written from the GNA rules.

The reference takes the module's own weights, finds each token's neighbourhood with plain
loops over the rules (dilation group, stride-tile leader, window shifted inward at the borders,
or the causal band), and runs softmax(q k^T / sqrt(d)) v over exactly those keys in float64.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab import KVCache

DIM, HEADS = 16, 2
TIGHT = dict(rtol=1e-10, atol=1e-12)


def axis_window(n, k, r, s, causal, x):
    """Key positions one axis allows for the query at position x."""
    members = list(range(x % r, n, r))           # x's dilation group, in order
    i, L = members.index(x), len(members)
    if causal:
        leader = min((i // s) * s + s - 1, L - 1)       # last query of the stride tile
        return members[max(leader - k + 1, 0):i + 1]
    leader = min((i // s) * s + s // 2, L - 1)          # centre query (right-hand when s is even)
    left, right = k // 2, k - 1 - k // 2
    centre = min(max(leader, left), L - 1 - right)      # shifted inward near the borders
    return members[centre - left:centre + right + 1]


def naive(m, x, kernel, dilation, stride, causal):
    """The module's forward, written per token: x (B, *spatial, C) float64."""
    B, *spatial, C = x.shape
    h, d = m.num_heads, C // m.num_heads
    nd = len(spatial)
    qkv = x @ m.qkv.weight.T
    if m.qkv.bias is not None:
        qkv = qkv + m.qkv.bias
    qkv = qkv.reshape(B, -1, 3, h, d)                            # tokens row-major
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]           # (B, N, h, d)
    out = torch.zeros_like(q)
    for flat, coord in enumerate(itertools.product(*(range(n) for n in spatial))):
        per_axis = [axis_window(spatial[a], kernel[a], dilation[a], stride[a], causal[a], coord[a])
                    for a in range(nd)]
        keys = [sum(c * math.prod(spatial[a + 1:]) for a, c in enumerate(key)) for key in itertools.product(*per_axis)]
        scores = torch.einsum("bhd,bmhd->bhm", q[:, flat], k[:, keys]) / math.sqrt(d)
        out[:, flat] = torch.einsum("bhm,bmhd->bhd", scores.softmax(-1), v[:, keys])
    out = out.reshape(B, *spatial, C) @ m.proj.weight.T
    return out + m.proj.bias if m.proj.bias is not None else out


def build(name, **kw):
    torch.manual_seed(0)
    return attnlab.create(name, DIM, HEADS, qkv_bias=True, **kw).double()


def compare(m, x, forward, kernel, dilation, stride, causal):
    x = x.clone().requires_grad_(True)
    y = forward(x)
    want = naive(m, x, kernel, dilation, stride, causal)
    assert_close(y, want)
    g = torch.randn_like(y)
    params = [m.qkv.weight, m.proj.weight, x]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(want, params, g)):
        assert_close(a, b)


@pytest.mark.parametrize("kernel,dilation,stride", [(3, 1, 1), (4, 1, 1), (3, 2, 1), (4, 1, 2), (5, 2, 3), (4, 3, 4)])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_1d_matches_naive(kernel, dilation, stride, is_causal):
    m = build("neighborhood1d", kernel_size=kernel, dilation=dilation, stride=stride)
    x = torch.randn(2, 13, DIM, dtype=torch.float64)
    compare(m, x, lambda t: m(t, is_causal=is_causal), (kernel,), (dilation,), (stride,), (is_causal,))


@pytest.mark.parametrize("opts", [
    dict(kernel_size=3),
    dict(kernel_size=(3, 4), dilation=(2, 1), stride=(1, 2)),
    dict(kernel_size=(2, 3), stride=(2, 3), causal=(True, False)),
    dict(kernel_size=4, dilation=(1, 2), causal=(False, True)),
], ids=["plain", "dilation_stride", "causal_rows", "causal_cols"])
def test_2d_matches_naive(opts):
    m = build("neighborhood2d", **opts)
    x = torch.randn(2, 7, 9, DIM, dtype=torch.float64)
    compare(m, x, m, m.kernel_size, m.dilation, m.stride, m.causal)


def test_3d_matches_naive():
    m = build("neighborhood3d", kernel_size=(2, 3, 2), dilation=(1, 1, 2), stride=(2, 1, 1),
              causal=(True, False, False))
    x = torch.randn(1, 4, 5, 6, DIM, dtype=torch.float64)
    compare(m, x, m, m.kernel_size, m.dilation, m.stride, m.causal)


@pytest.mark.parametrize("is_causal", [False, True])
def test_kernel_covering_the_sequence_is_mhsa(is_causal):
    m = build("neighborhood1d", kernel_size=10)
    ref = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 10, DIM, dtype=torch.float64)
    assert_close(m(x, is_causal=is_causal), ref(x, is_causal=is_causal), **TIGHT)


def test_2d_kernel_covering_the_image_is_mhsa():
    m = build("neighborhood2d", kernel_size=(3, 5))
    ref = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 5, DIM, dtype=torch.float64)
    assert_close(m(x), ref(x.flatten(1, 2)).view_as(x), **TIGHT)


# --- cached decoding and short sequences -----------------------------------------------------------

@pytest.mark.parametrize("kernel,dilation", [(3, 2), (4, 1), (2, 3)])
def test_cached_decoding_with_dilation_matches_full_forward(kernel, dilation):
    m = build("neighborhood1d", kernel_size=kernel, dilation=dilation)
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    full = m(x, is_causal=True)
    cache = KVCache()
    with torch.no_grad():
        steps = [m(x[:, t:t + 1], is_causal=True, cache=cache) for t in range(11)]
    assert_close(torch.cat(steps, 1), full, **TIGHT)


def test_short_causal_sequence_keeps_its_window():
    """N < kernel * dilation, causal, stride 1: the rule needs no length, nothing is clipped."""
    m = build("neighborhood1d", kernel_size=3, dilation=3)
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    compare(m, x, lambda t: m(t, is_causal=True), (3,), (3,), (1,), (True,))


def test_short_axis_clips_the_window():
    """N < kernel_size (not causal): the window is the whole sequence, i.e. full attention."""
    m = build("neighborhood1d", kernel_size=7, dilation=2)
    ref = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    assert_close(m(x), ref(x), **TIGHT)
    m2 = build("neighborhood2d", kernel_size=5)
    x2 = torch.randn(1, 3, 7, DIM, dtype=torch.float64)
    compare(m2, x2, m2, (3, 5), (1, 1), (1, 1), (False, False))


def test_cache_needs_causal_and_stride_one():
    x = torch.randn(1, 3, DIM, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="neighborhood1d.*is_causal=True"):
        build("neighborhood1d", kernel_size=3)(x, cache=KVCache())
    with pytest.raises(NotImplementedError, match="neighborhood1d.*stride=1"):
        build("neighborhood1d", kernel_size=3, stride=2)(x, is_causal=True, cache=KVCache())


def test_attn_mask_is_refused():
    with pytest.raises(NotImplementedError, match="neighborhood1d.*attn_mask"):
        build("neighborhood1d", kernel_size=3)(torch.randn(1, 4, DIM, dtype=torch.float64),
                                               attn_mask=torch.ones(1, 4, dtype=torch.bool))


# --- spatial interface -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,shape", [("neighborhood2d", (2, 5, 6)), ("neighborhood3d", (2, 3, 4, 5))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_spatial_shape_dtype_and_empty_batch(name, shape, dtype):
    m = attnlab.create(name, DIM, HEADS, kernel_size=3).to(dtype)
    x = torch.randn(*shape, DIM).to(dtype)
    y = m(x)
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()
    assert m(x[:0]).shape == (0, *shape[1:], DIM)
    if dtype == torch.bfloat16:
        y32 = attnlab.create(name, DIM, HEADS, kernel_size=3)
        y32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
        assert_close(y.float(), y32(x.float()), rtol=2e-2, atol=2e-2 * y32(x.float()).abs().max().item())


@pytest.mark.parametrize("name,bad,match", [
    ("neighborhood2d", (2, 5, DIM), r"expected x of shape \(B, H, W, C=16\), got \(2, 5, 16\)"),
    ("neighborhood3d", (2, 3, 5, DIM), r"expected x of shape \(B, D, H, W, C=16\), got \(2, 3, 5, 16\)"),
    ("neighborhood2d", (2, 4, 5, DIM - 1), "expected x of width C=16, got 15"),
])
def test_spatial_bad_input(name, bad, match):
    m = attnlab.create(name, DIM, HEADS, kernel_size=3)
    with pytest.raises(ValueError, match=match):
        m(torch.randn(*bad))


def test_spatial_non_float_input():
    with pytest.raises(TypeError, match="neighborhood2d: expected floating point x, got torch.int64"):
        attnlab.create("neighborhood2d", DIM, HEADS, kernel_size=3)(torch.zeros(1, 4, 4, DIM, dtype=torch.long))


@pytest.mark.parametrize("name,kwargs,exc,match", [
    ("neighborhood1d", dict(kernel_size=0), ValueError, "neighborhood1d: kernel_size must be >= 1, got 0"),
    ("neighborhood1d", dict(kernel_size=3, stride=5), ValueError, r"stride \(5\) must be <= kernel_size \(3\)"),
    ("neighborhood2d", dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size has 3 entries .* \(2\)"),
    ("neighborhood3d", dict(causal=1), TypeError, "causal"),
    ("neighborhood2d", dict(dilation=(1, 0)), ValueError, "dilation must be >= 1, got 0 on axis 1"),
    ("neighborhood1d", dict(attn_drop=0.1), NotImplementedError, "neighborhood1d.*attention dropout"),
    ("neighborhood1d", dict(attn_drop=1.5), ValueError, r"neighborhood1d: attn_drop must be a number in \[0, 1\), got 1.5"),
    ("neighborhood2d", dict(backend="sdpa"), ValueError, "backend must be None or one of"),
])
def test_bad_options_at_construction(name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        attnlab.create(name, DIM, HEADS, **kwargs)


def test_useful_flops_counts_projections_and_kept_pairs():
    m = attnlab.create("neighborhood1d", 512, 8, kernel_size=127)
    B, N, C = 2, 1024, 512
    proj = 2 * B * N * C * 3 * C + 2 * B * N * C * C
    fwd, bwd = m.useful_flops(B, N, C, 8, False)
    assert fwd == proj + 4 * B * C * N * 127 and bwd == 2 * fwd
    causal_pairs = sum(min(i + 1, 127) for i in range(N))
    assert m.useful_flops(B, N, C, 8, True)[0] == proj + 4 * B * C * causal_pairs
    m2 = attnlab.create("neighborhood2d", 512, 8, kernel_size=13)          # the bench's 32 x 32 square
    assert m2.useful_flops(B, N, C, 8, False)[0] == proj + 4 * B * C * N * 169
    m3 = attnlab.create("neighborhood3d", 512, 8, kernel_size=(3, 7, 7), causal=(True, False, False))
    pairs = sum(min(i + 1, 3) for i in range(8)) * 64 * 49                # an 8 x 8 x 8 cube, causal in depth
    assert m3.useful_flops(1, 512, C, 8, False)[0] == 2 * 512 * C * 4 * C + 4 * C * pairs


def test_gradcheck_2d_module():
    m = build("neighborhood2d", kernel_size=(2, 3), stride=(1, 2), causal=(True, False))
    x = torch.randn(1, 3, 4, DIM, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
