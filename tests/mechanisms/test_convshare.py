"""convshare against a naive float64 reference, the two padding regimes, gradcheck, bad input.

ConvShareViT (Ibadulla, Chen, Reyes-Aldasoro 2025) is a reconstruction from the abstract (see the
module docstring for the reading). The naive reference below is written from that reading with
plain loops, sharing no code with attnlab: for every channel c and output position (i, j)

    q_c[i, j] = Σ_{a, b} w_q[a, b] xp_c[i + a, j + b] + b_q[c]          (likewise k, v)

where xp is x zero-padded by (k - 1) // 2 before and k // 2 after ("same") or not at all
("valid"); per head, softmax(q k^T / sqrt(d)) v over the tokens of the q/k/v maps; then the output
kernel: a "same" convolution, or for "valid" the transposed convolution
out[i, j] = Σ_{a, b} y[i - a, j - b] w_o[a, b] over the (i - a, j - b) that lie in the map.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch.testing import assert_close

import attnlab

DIM, HEADS = 8, 2
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)
SPEC = attnlab.get_spec("convshare")


def convshare(dim=DIM, heads=HEADS, dtype=torch.float64, **options):
    options = {"qkv_bias": True, **options}
    return attnlab.create("convshare", dim, heads, **options).to(dtype).eval()


def image(B, H, W, dim=DIM, dtype=torch.float64, requires_grad=False):
    return torch.randn(B, H, W, dim, dtype=dtype, requires_grad=requires_grad)


# --- the naive reference -----------------------------------------------------------------------

def shared_conv(maps, w, padding):
    """maps (B, C, H, W), w (k, k) -> (B, C, H', W'): one kernel for every channel, by loops."""
    k = w.shape[-1]
    if padding == "same":
        lo, hi = (k - 1) // 2, k // 2
        B, C, H, W = maps.shape
        padded = maps.new_zeros(B, C, H + k - 1, W + k - 1)
        padded[:, :, lo:lo + H, lo:lo + W] = maps
        maps = padded
    Ho, Wo = maps.shape[2] - k + 1, maps.shape[3] - k + 1
    rows = []
    for i in range(Ho):
        cols = []
        for j in range(Wo):
            acc = 0.0
            for a in range(k):
                for b in range(k):
                    acc = acc + w[a, b] * maps[:, :, i + a, j + b]
            cols.append(acc)                                   # (B, C)
        rows.append(torch.stack(cols, dim=-1))                 # (B, C, Wo)
    return torch.stack(rows, dim=-2)                           # (B, C, Ho, Wo)


def shared_conv_transpose(maps, w):
    """maps (B, C, h, w), w (k, k) -> (B, C, h + k - 1, w + k - 1): the adjoint of a valid conv."""
    k = w.shape[-1]
    B, C, h, ww = maps.shape
    rows = []
    for i in range(h + k - 1):
        cols = []
        for j in range(ww + k - 1):
            acc = maps.new_zeros(B, C)
            for a in range(k):
                for b in range(k):
                    if 0 <= i - a < h and 0 <= j - b < ww:
                        acc = acc + maps[:, :, i - a, j - b] * w[a, b]
            cols.append(acc)
        rows.append(torch.stack(cols, dim=-1))
    return torch.stack(rows, dim=-2)


def naive_convshare(m, x):
    B, H, W, C = x.shape
    h, d = m.num_heads, m.head_dim
    maps = x.permute(0, 3, 1, 2)                               # (B, C, H, W)
    bias = m.qkv_bias if m.qkv_bias is not None else x.new_zeros(3 * C)
    qkv = [shared_conv(maps, m.qkv_weight[i, 0], m.padding) + bias[i * C:(i + 1) * C, None, None]
           for i in range(3)]                                  # 3 x (B, C, H', W')
    Hq, Wq = qkv[0].shape[-2:]
    q, k, v = (t.reshape(B, h, d, Hq * Wq) for t in qkv)       # (B, h, d, N')
    scores = torch.einsum("bhdn,bhdm->bhnm", q, k) * d ** -0.5
    out = torch.einsum("bhnm,bhdm->bhdn", scores.softmax(-1), v).reshape(B, C, Hq, Wq)
    if m.padding == "same":
        out = shared_conv(out, m.proj_weight[0, 0], "same")
    else:
        out = shared_conv_transpose(out, m.proj_weight[0, 0])
    out = out.permute(0, 2, 3, 1)                              # (B, H, W, C)
    return out + (m.proj_bias if m.proj_bias is not None else 0.0)


def grads(fn, m, x):
    out = fn(m, x)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    names, params = zip(*m.named_parameters())
    gs = torch.autograd.grad(out, (x, *params), g)
    return out, dict(zip(("x",) + names, gs))


CASES = {
    "valid-k3-5x7": dict(H=5, W=7, kernel_size=3, padding="valid"),
    "valid-k2-4x6": dict(H=4, W=6, kernel_size=2, padding="valid"),
    "valid-k1-3x4": dict(H=3, W=4, kernel_size=1, padding="valid"),
    "same-k3-4x5": dict(H=4, W=5, kernel_size=3, padding="same"),
    "same-k2-4x5": dict(H=4, W=5, kernel_size=2, padding="same"),           # even kernel: asymmetric pad
    "same-k4-3x3": dict(H=3, W=3, kernel_size=4, padding="same", heads=4),  # kernel larger than the image
    "valid-nobias": dict(H=4, W=4, kernel_size=2, padding="valid", qkv_bias=False, proj_bias=False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_naive_reference(case):
    case = dict(case)
    H, W, heads = case.pop("H"), case.pop("W"), case.pop("heads", HEADS)
    m = convshare(heads=heads, **case)
    x = image(2, H, W, requires_grad=True)
    out, g = grads(lambda mm, xx: mm(xx), m, x)
    ref, g_ref = grads(naive_convshare, m, x)
    assert out.shape == x.shape
    assert_close(out, ref, **TIGHT)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert_close(g[name], g_ref[name], **GRAD, msg=lambda s, n=name: f"grad {n}: {s}")


# --- the two padding regimes --------------------------------------------------------------------

@pytest.mark.parametrize("padding,H,W,k,tokens", [
    ("valid", 4, 8, 3, 2 * 6), ("valid", 14, 14, 3, 12 * 12), ("valid", 5, 5, 5, 1),
    ("same", 4, 8, 3, 32), ("same", 14, 14, 4, 196),
])
def test_token_grid_of_each_padding(padding, H, W, k, tokens):
    m = convshare(dim=16, heads=4, kernel_size=k, padding=padding)
    seen = {}
    for name in ("hook_q", "hook_k", "hook_v", "hook_out"):
        getattr(m, name).register_forward_hook(lambda mod, i, o, n=name: seen.__setitem__(n, o.shape))
    y = m(image(2, H, W, dim=16))
    assert y.shape == (2, H, W, 16)
    assert set(seen.values()) == {torch.Size((2, 4, tokens, 4))}
    Hq, Wq = m.token_grid(H, W)
    assert Hq * Wq == tokens


def test_same_1x1_is_mhsa_with_scalar_identity_projections():
    """k = 1, "same": q = a_q x + b_q etc. and proj = a_o I: mhsa with those weights."""
    m = convshare(dim=16, heads=4, kernel_size=1, padding="same")
    mh = attnlab.create("mhsa", 16, 4, qkv_bias=True).double().eval()
    eye = torch.eye(16, dtype=torch.float64)
    with torch.no_grad():
        a = m.qkv_weight.reshape(3)
        mh.qkv.weight.copy_(torch.cat([a[0] * eye, a[1] * eye, a[2] * eye]))
        mh.qkv.bias.copy_(m.qkv_bias)
        mh.proj.weight.copy_(m.proj_weight.reshape(()) * eye)
        mh.proj.bias.copy_(m.proj_bias)
    x = image(3, 4, 5, dim=16)
    assert_close(m(x), mh(x.reshape(3, 20, 16)).reshape(3, 4, 5, 16), **TIGHT)


def test_valid_1x1_equals_same_1x1():
    """A 1 x 1 kernel needs no padding: the two regimes are one computation."""
    m = convshare(kernel_size=1, padding="valid")
    ms = convshare(kernel_size=1, padding="same")
    ms.load_state_dict(m.state_dict())
    x = image(2, 3, 5)
    assert_close(m(x), ms(x), **TIGHT)


def test_valid_kernel_covering_the_image_is_one_token():
    """k = H = W, "valid": one token attends to itself (weight 1), so q and k kernels do not matter
    and the output is the output kernel spread over the image: out[i, j] = v_c * w_o[i, j] + b_o."""
    m = convshare(kernel_size=4, padding="valid")
    x = image(2, 4, 4)
    y = m(x)
    with torch.no_grad():
        m.qkv_weight[:2].normal_()
    assert_close(m(x), y, **TIGHT)
    v = torch.einsum("bijc,ij->bc", x, m.qkv_weight[2, 0]) + m.qkv_bias[2 * DIM:]
    expect = torch.einsum("bc,ij->bijc", v, m.proj_weight[0, 0]) + m.proj_bias
    assert_close(y, expect, **TIGHT)


def test_valid_border_pixels_reach_fewer_tokens():
    """Valid: the corner pixel lies in one k x k window (one token), the centre in k^2; a change at
    the corner moves only the token of the corner window in the q/k/v maps."""
    m = convshare(kernel_size=3, padding="valid")
    seen = []
    m.hook_v.register_forward_hook(lambda mod, i, o: seen.append(o.detach().clone()))
    x = image(1, 5, 5)
    x2 = x.clone()
    x2[0, 0, 0] += 1.0
    m(x), m(x2)
    changed = (seen[0] - seen[1]).abs().amax(dim=(0, 1, 3)) > 0        # (N',)
    assert changed.tolist() == [True] + [False] * 8


def test_same_1x1_rolls_with_the_input():
    """Global attention is permutation-equivariant over tokens; with a 1 x 1 kernel no padding
    breaks that, so a circular roll of the image rolls the whole output."""
    m = convshare(kernel_size=1, padding="same")
    x = image(1, 4, 6)
    assert_close(m(torch.roll(x, 2, dims=2)), torch.roll(m(x), 2, dims=2), **TIGHT)


# --- gradcheck, dtypes, backends ----------------------------------------------------------------

@pytest.mark.parametrize("padding,k", [("valid", 2), ("same", 3)])
def test_gradcheck(padding, k):
    m = convshare(dim=4, heads=2, kernel_size=k, padding=padding)
    params = dict(m.named_parameters())
    names = list(params)
    x = image(1, 3, 4, dim=4, requires_grad=True)

    def fn(x, *tensors):
        return functional_call(m, dict(zip(names, tensors)), (x,))

    inputs = (x, *(params[n].detach().clone().requires_grad_() for n in names))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_backends_agree(padding, backend):
    m = convshare(dim=16, heads=4, kernel_size=3, padding=padding, dtype=torch.float32)
    x = image(2, 5, 6, dim=16, dtype=torch.float32)
    with torch.no_grad():
        ref = m(x)
        with attnlab.use_backend(backend):
            out = m(x)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_batch_invariance_and_empty_batch(padding):
    m = convshare(dim=16, heads=4, padding=padding, dtype=torch.float32)
    x = image(3, 6, 6, dim=16, dtype=torch.float32)
    y = m(x)
    for i in range(3):
        assert_close(y[i:i + 1], m(x[i:i + 1]), rtol=1e-5, atol=1e-6)
    assert m(x[:0]).shape == (0, 6, 6, 16)


def test_dropout_only_in_training():
    m = attnlab.create("convshare", DIM, HEADS, attn_drop=0.5, proj_drop=0.5).double()
    x = image(1, 5, 5)
    m.eval()
    assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    assert torch.isfinite(m(x)).all() and not torch.equal(m(x), m(x))


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_useful_flops_match_the_flop_counter(padding):
    from torch.utils.flop_counter import FlopCounterMode
    m = attnlab.create("convshare", 32, 4, kernel_size=3, padding=padding).eval()
    x = torch.randn(2, 8, 8, 32)
    with FlopCounterMode(display=False) as counter:
        m(x)
    fwd, bwd = m.useful_flops(2, 64, 32, 4, False)
    assert fwd == counter.get_total_flops()
    assert bwd == 2 * fwd
    with pytest.raises(NotImplementedError, match="causal"):
        m.useful_flops(2, 64, 32, 4, True)
    with pytest.raises(ValueError, match="square"):
        m.useful_flops(2, 60, 32, 4, False)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 16, DIM), (2, 4, 4, 1, DIM), (DIM,)], ids=["seq", "5d", "1d"])
def test_wrong_rank_raises(shape):
    m = convshare()
    with pytest.raises(ValueError) as info:
        m(torch.randn(shape, dtype=torch.float64))
    msg = str(info.value)
    assert "convshare" in msg and str(shape) in msg and str(DIM) in msg, msg


def test_channels_first_input_raises_naming_widths():
    m = convshare()
    with pytest.raises(ValueError) as info:
        m(torch.randn(2, DIM, 5, 5, dtype=torch.float64))
    msg = str(info.value)
    assert "convshare" in msg and f"C={DIM}" in msg and "got 5" in msg and "channels-last" in msg, msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_input_raises(dtype):
    with pytest.raises(TypeError, match=rf"convshare.*{str(dtype).removeprefix('torch.')}"):
        convshare()(torch.zeros(2, 5, 5, DIM, dtype=dtype))


@pytest.mark.parametrize("H,W", [(2, 5), (5, 2), (1, 1)])
def test_valid_image_smaller_than_the_kernel_raises(H, W):
    m = convshare(kernel_size=3, padding="valid")
    with pytest.raises(ValueError) as info:
        m(image(1, H, W))
    msg = str(info.value)
    assert "convshare" in msg and "kernel_size=3" in msg and f"H={H}" in msg and f"W={W}" in msg, msg
    assert convshare(kernel_size=3, padding="same")(image(1, H, W)).shape == (1, H, W, DIM)


@pytest.mark.parametrize("feature,kwargs", [
    ("attn_mask", dict(attn_mask=torch.ones(2, 25, dtype=torch.bool))),
    ("causal", dict(is_causal=True)),
    ("kv_cache", dict(cache=attnlab.KVCache())),
])
def test_unsupported_features_raise(feature, kwargs):
    with pytest.raises(NotImplementedError, match=rf"convshare.*{feature}"):
        convshare()(image(2, 5, 5), **kwargs)


@pytest.mark.parametrize("options,needle", [
    (dict(kernel_size=0), "kernel_size"), (dict(kernel_size=2.0), "kernel_size"), (dict(kernel_size=True), "kernel_size"),
    (dict(padding="full"), "padding"), (dict(padding=None), "padding"), (dict(attn_drop=1.0), "attn_drop"),
    (dict(proj_drop=-0.1), "proj_drop"), (dict(scale=0.0), "scale"), (dict(backend="cuda"), "backend"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_options_raise_at_create(options, needle):
    with pytest.raises(ValueError) as info:
        attnlab.create("convshare", DIM, HEADS, **options)
    msg = str(info.value)
    assert "convshare" in msg and needle in msg and repr(next(iter(options.values()))) in msg, msg


def test_bad_bias_flag_type_raises():
    with pytest.raises(TypeError, match="qkv_bias"):
        attnlab.create("convshare", DIM, HEADS, qkv_bias=1)


def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"\(30\).*\(4\)"):
        attnlab.create("convshare", 30, 4)
