"""danet_pam and danet_cam against naive NCHW references written from the official code.

"Dual Attention Network for Scene Segmentation" (Fu et al., CVPR 2019); the official modules are
junfu1115/DANet encoding/nn/da_att.py::PAM_Module, CAM_Module. The references below follow that
code's computation in float64, sharing no code with attnlab: the input goes to NCHW, the 1 x 1
convs are F.conv2d with the module's own weights, the N x N (PAM) or C x C (CAM) energy is built
with bmm, the softmax is written out as exp / sum, and

    PAM: out = V A^T  (B, C, N),  y = gamma * out + x
    CAM: A = softmax(rowmax(E) - E), E = X X^T,  out = A X,  y = gamma * out + x

PAM with heads > 1 (an attnlab option) loops over contiguous channel groups.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.testing import assert_close

import attnlab

DIM = 32
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)


def pam(dim=DIM, dtype=torch.float64, **options):
    options = {"gamma_init": 0.7, **options}
    return attnlab.create("danet_pam", dim, 4, **options).to(dtype).eval()


def cam(dim=DIM, dtype=torch.float64, **options):
    options = {"gamma_init": 0.7, **options}
    return attnlab.create("danet_cam", dim, 4, **options).to(dtype).eval()


def image(B, H, W, C=DIM, dtype=torch.float64, requires_grad=False, scale=1.0):
    return (scale * torch.randn(B, H, W, C, dtype=dtype)).requires_grad_(requires_grad)


def explicit_softmax(e):
    e = e - e.max(dim=-1, keepdim=True).values
    p = e.exp()
    return p / p.sum(dim=-1, keepdim=True)


# --- the naive references (NCHW, as the official code) --------------------------------------------

def naive_pam(m, x):
    xn = x.permute(0, 3, 1, 2)                                         # (B, C, H, W)
    B, C, H, W = xn.shape
    q = F.conv2d(xn, m.query_conv.weight, m.query_conv.bias).reshape(B, -1, H * W)   # (B, C/8, N)
    k = F.conv2d(xn, m.key_conv.weight, m.key_conv.bias).reshape(B, -1, H * W)       # (B, C/8, N)
    v = F.conv2d(xn, m.value_conv.weight, m.value_conv.bias).reshape(B, C, H * W)    # (B, C, N)
    h = m.heads
    dq, dv = q.shape[1] // h, C // h
    outs = []
    for g in range(h):
        qg, kg, vg = q[:, g * dq:(g + 1) * dq], k[:, g * dq:(g + 1) * dq], v[:, g * dv:(g + 1) * dv]
        energy = torch.bmm(qg.permute(0, 2, 1), kg)                    # (B, N, N), no 1/sqrt(d)
        attn = explicit_softmax(energy)
        outs.append(torch.bmm(vg, attn.permute(0, 2, 1)))              # (B, C/h, N)
    out = torch.cat(outs, dim=1).reshape(B, C, H, W)
    return (m.gamma * out + xn).permute(0, 2, 3, 1)


def naive_cam(m, x):
    xn = x.permute(0, 3, 1, 2)                                         # (B, C, H, W)
    B, C, H, W = xn.shape
    X = xn.reshape(B, C, H * W)
    energy = torch.bmm(X, X.permute(0, 2, 1))                          # (B, C, C)
    energy_new = energy.max(-1, keepdim=True)[0].expand_as(energy) - energy
    attn = explicit_softmax(energy_new)
    out = torch.bmm(attn, X).reshape(B, C, H, W)
    return (m.gamma * out + xn).permute(0, 2, 3, 1)


def grads(fn, m, x):
    out = fn(m, x)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    names, params = zip(*m.named_parameters())
    gs = torch.autograd.grad(out, (x, *params), g)
    return out, dict(zip(("x",) + names, gs))


def run_module(m, x):
    return m(x)


def check_against(fn, m, x):
    out, g = grads(run_module, m, x)
    ref, g_ref = grads(fn, m, x)
    assert out.shape == x.shape
    assert_close(out, ref, **TIGHT)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert_close(g[name], g_ref[name], **GRAD, msg=lambda s, n=name: f"grad {n}: {s}")
    return (out - ref).abs().max().item()


# --- against the references ---------------------------------------------------------------------

PAM_CASES = {
    "official-4x8": dict(H=4, W=8),
    "5x3-nobias": dict(H=5, W=3, qkv_bias=False),
    "6x6-heads2-red4": dict(H=6, W=6, heads=2, reduction=4),
    "3x7-heads4-red2-dim48": dict(H=3, W=7, heads=4, reduction=2, dim=48),
    "1x1": dict(H=1, W=1),
}


@pytest.mark.parametrize("backend", ["sdpa", "reference", None])
@pytest.mark.parametrize("case", PAM_CASES.values(), ids=PAM_CASES.keys())
def test_pam_matches_naive_reference(case, backend):
    case = dict(case)
    H, W, dim = case.pop("H"), case.pop("W"), case.pop("dim", DIM)
    m = pam(dim=dim, backend=backend, **case)
    with torch.no_grad():                                              # biases away from zero
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.5)
    check_against(naive_pam, m, image(2, H, W, dim, requires_grad=True, scale=2.0))


CAM_CASES = {"4x8": dict(H=4, W=8), "5x3": dict(H=5, W=3), "1x1-dim5": dict(H=1, W=1, dim=5),
             "7x7-dim16": dict(H=7, W=7, dim=16)}


@pytest.mark.parametrize("case", CAM_CASES.values(), ids=CAM_CASES.keys())
def test_cam_matches_naive_reference(case):
    m = cam(dim=case.get("dim", DIM))
    check_against(naive_cam, m, image(2, case["H"], case["W"], case.get("dim", DIM), requires_grad=True))


def test_gradcheck_pam_and_cam():
    torch.manual_seed(0)
    m = pam(dim=8, reduction=4, heads=2)
    x = image(1, 2, 3, 8, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    for backend in ("sdpa", "reference"):
        m.backend = backend
        params = tuple(m.parameters())
        assert torch.autograd.gradcheck(
            lambda t, *ps: torch.func.functional_call(m, dict(zip(dict(m.named_parameters()), ps)), (t,)),
            (x, *params))
    c = cam(dim=5)
    x = image(2, 2, 3, 5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, g: torch.func.functional_call(c, {"gamma": g}, (t,)),
                                    (x, c.gamma))


# --- limiting cases and options -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["danet_pam", "danet_cam"])
def test_official_zero_gamma_is_the_identity_and_gamma_still_learns(name):
    m = attnlab.create(name, DIM, 4).double()                          # gamma_init = 0, as the official code
    assert m.gamma.item() == 0.0
    x = image(2, 4, 4, requires_grad=True)
    y = m(x)
    assert torch.equal(y, x)
    y.pow(2).sum().backward()
    assert m.gamma.grad.abs().item() > 0


def test_pam_with_constant_queries_averages_the_values():
    """Zero query/key weights: every energy is the same, so each pixel gets the mean of V."""
    m = pam()
    with torch.no_grad():
        m.query_conv.weight.zero_()
        m.key_conv.weight.zero_()
    x = image(2, 3, 5)
    v = x @ m.value_conv.weight[:, :, 0, 0].T + m.value_conv.bias      # (B, H, W, C)
    expected = m.gamma * v.mean(dim=(1, 2), keepdim=True) + x
    assert_close(m(x), expected.expand_as(x), **TIGHT)


def test_pam_heads_are_independent_group_attentions():
    """heads=2 equals two single-head PAMs on the channel halves of q/k/v, side by side."""
    m = pam(heads=2, reduction=4)
    x = image(1, 4, 4)
    qk = m.qk_dim // 2
    outs = []
    for g in range(2):
        one = pam(reduction=4)
        with torch.no_grad():
            for conv, rows in (("query_conv", slice(g * qk, (g + 1) * qk)),
                               ("key_conv", slice(g * qk, (g + 1) * qk)),
                               ("value_conv", slice(g * DIM // 2, (g + 1) * DIM // 2))):
                src, dst = getattr(m, conv), getattr(one, conv)
                w = torch.zeros_like(dst.weight)
                b = torch.zeros_like(dst.bias)
                n = rows.stop - rows.start
                w[:n] = src.weight[rows]
                b[:n] = src.bias[rows]
                dst.weight.copy_(w)
                dst.bias.copy_(b)
            one.gamma.copy_(m.gamma)
        # the single-head module's first n q/k rows and the group's value rows carry the group
        outs.append(one(x) - x)
    got = m(x) - x
    assert_close(got[..., :DIM // 2], outs[0][..., :DIM // 2], **TIGHT)
    assert_close(got[..., DIM // 2:], outs[1][..., :DIM // 2], **TIGHT)


def test_cam_one_channel_scales_by_one_plus_gamma():
    """C = 1: the 1 x 1 attention is 1, so y = (1 + gamma) x."""
    m = cam(dim=1)
    x = image(2, 3, 4, 1)
    assert_close(m(x), (1 + m.gamma) * x, **TIGHT)


def test_cam_equals_softmax_of_minus_energy():
    """softmax(rowmax(E) - E) = softmax(-E): the official shift changes nothing."""
    m = cam()
    x = image(2, 4, 4)
    X = x.reshape(2, 16, DIM).transpose(1, 2)                          # (B, C, N)
    out = torch.softmax(-(X @ X.transpose(1, 2)), -1) @ X              # (B, C, N)
    assert_close(m(x), m.gamma * out.transpose(1, 2).reshape(x.shape) + x, **TIGHT)


def test_cam_large_energy_is_stable_in_bf16_and_float32():
    """E sums H W products (here ~1e4): bf16 input still gives finite output close to float32."""
    torch.manual_seed(0)
    m = cam(dim=16, dtype=torch.float32)
    x = image(2, 32, 32, 16, dtype=torch.float32, scale=3.0)
    y32 = m(x)
    y16 = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all() and torch.isfinite(y32).all()
    assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2 * y32.abs().max().item())
    ref = naive_cam(cam(dim=16, gamma_init=0.7), x.double())
    assert_close(y32.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# --- hooks and memory ---------------------------------------------------------------------------

def test_pam_hooks_on_the_reference_backend():
    m = pam(backend="reference", heads=2, reduction=4)
    x = image(1, 3, 4)
    seen = {}
    for name in m.hook_names:
        getattr(m, name).register_forward_hook(lambda mod, i, o, n=name: seen.__setitem__(n, o))
    m(x)
    N = 12
    assert seen["hook_q"].shape == (1, 2, N, 4) and seen["hook_v"].shape == (1, 2, N, 16)
    assert seen["hook_scores"].shape == (1, 2, N, N)
    assert_close(seen["hook_probs"], explicit_softmax(seen["hook_q"] @ seen["hook_k"].transpose(-2, -1)))
    assert_close(seen["hook_out"], seen["hook_probs"] @ seen["hook_v"])


def test_cam_hooks_carry_the_official_tensors():
    m = cam()
    x = image(2, 3, 4)
    seen = {}
    for name in m.hook_names:
        getattr(m, name).register_forward_hook(lambda mod, i, o, n=name: seen.__setitem__(n, o))
    m(x)
    X = x.reshape(2, 12, DIM).transpose(1, 2)[:, None]                 # (B, 1, C, N)
    E = X @ X.transpose(-2, -1)
    for name in ("hook_q", "hook_k", "hook_v"):                        # CAM: X plays all three
        assert_close(seen[name], X)
    assert_close(seen["hook_scores"], E.amax(-1, keepdim=True) - E)
    assert (seen["hook_scores"].amin(-1) == 0).all()
    assert_close(seen["hook_probs"], explicit_softmax(E.amax(-1, keepdim=True) - E))


def test_pam_runs_on_sdpa_by_default(backend_spy):
    pam()(image(1, 4, 4))
    assert backend_spy.ran == ["sdpa"]


def _largest_allocation(m, x) -> tuple[int, set[str]]:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        m(x)
    events = prof.key_averages()
    return max(e.cpu_memory_usage for e in events), {e.key for e in events}


@pytest.mark.parametrize("heads", [1, 2])
def test_pam_does_not_materialise_the_pixel_matrix_on_sdpa(heads):
    """N = 1600 pixels: an N x N float32 matrix is 10 MB per head. The sdpa path (q, k padded to
    the value width so that the CPU flash kernel runs) allocates a fraction of it in any one op,
    the reference path at least that much."""
    m = pam(dim=64, heads=heads, dtype=torch.float32)
    x = image(1, 40, 40, 64, dtype=torch.float32)
    nn_bytes = heads * 1600 * 1600 * 4
    peak, ops = _largest_allocation(m, x)
    assert "aten::_scaled_dot_product_attention_math" not in ops, sorted(ops)
    assert peak < nn_bytes / 3, (peak, nn_bytes)
    m.backend = "reference"
    peak_ref, _ = _largest_allocation(m, x)
    assert peak_ref >= nn_bytes
    m.backend = "sdpa"
    with torch.no_grad():
        y = m(x)
        m.backend = "reference"
        assert_close(y, m(x), rtol=1e-5, atol=1e-5)


def test_official_state_dict_keys_load():
    """A state_dict with the official PAM_Module / CAM_Module keys and shapes loads strictly."""
    C = 64
    official_pam = {"query_conv.weight": torch.randn(C // 8, C, 1, 1), "query_conv.bias": torch.randn(C // 8),
                    "key_conv.weight": torch.randn(C // 8, C, 1, 1), "key_conv.bias": torch.randn(C // 8),
                    "value_conv.weight": torch.randn(C, C, 1, 1), "value_conv.bias": torch.randn(C),
                    "gamma": torch.randn(1)}
    m = attnlab.create("danet_pam", C)
    m.load_state_dict(official_pam, strict=True)
    assert torch.equal(m.gamma, official_pam["gamma"])
    c = attnlab.create("danet_cam", C)
    c.load_state_dict({"gamma": torch.tensor([0.3])}, strict=True)
    assert set(c.state_dict()) == {"gamma"}


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["danet_pam", "danet_cam"])
def test_bad_inputs_name_what_was_expected(name):
    m = attnlab.create(name, DIM, gamma_init=0.5)
    with pytest.raises(ValueError, match=rf"{name}.*C={DIM}.*\(2, 16, {DIM}\)"):
        m(torch.randn(2, 16, DIM))
    with pytest.raises(ValueError, match=rf"{name}.*C={DIM}.*got 31"):
        m(torch.randn(2, 4, 4, 31))
    with pytest.raises(ValueError, match=rf"{name}.*C={DIM}"):
        m(torch.randn(2, DIM, 4, 4))
    with pytest.raises(TypeError, match=rf"{name}.*Tensor.*list"):
        m([1.0])
    with pytest.raises(TypeError, match=rf"{name}.*float.*int64"):
        m(torch.zeros(2, 4, 4, DIM, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match=rf"{name}.*attn_mask"):
        m(torch.randn(1, 4, 4, DIM), attn_mask=torch.ones(1, 16, dtype=torch.bool))


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=4), r"dim // reduction must be >= 1.*dim=4, reduction=8"),
    (dict(reduction=0), r"reduction must be a positive int, got 0"),
    (dict(heads=3), r"heads=3 must divide.*4.*32"),
    (dict(gamma_init=float("nan")), r"gamma_init must be a finite number, got nan"),
    (dict(gamma_init=True), r"gamma_init must be a finite number, got True"),
    (dict(backend="cuda"), r"backend must be one of .*got 'cuda'"),
    (dict(attn_drop=1.0), r"attn_drop must be a number in \[0, 1\), got 1.0"),
    (dict(qkv_bias=1), r"qkv_bias must be a bool, got int"),
])
def test_bad_pam_options(kwargs, match):
    dim = kwargs.pop("dim", DIM)
    with pytest.raises((ValueError, TypeError), match=rf"danet_pam: {match}"):
        attnlab.create("danet_pam", dim, 1, **kwargs)


def test_bad_cam_options():
    with pytest.raises(ValueError, match=r"danet_cam: gamma_init must be a finite number, got inf"):
        attnlab.create("danet_cam", DIM, gamma_init=float("inf"))
    with pytest.raises(ValueError, match=r"danet_cam: dim must be a positive int, got 0"):
        attnlab.create("danet_cam", 0)
    with pytest.raises(TypeError, match="unknown option 'reduction'"):
        attnlab.create("danet_cam", DIM, reduction=8)


def test_useful_flops():
    m = pam(dim=64)
    fwd, bwd = m.useful_flops(2, 100, 64, 4, False)
    assert fwd == 2 * 2 * 100 * 64 * (2 * 8 + 64) + 2 * 2 * 100 * 100 * (8 + 64) and bwd == 2 * fwd
    assert cam(dim=64).useful_flops(2, 100, 64, 4, False) == (4 * 2 * 100 * 64 ** 2, 8 * 2 * 100 * 64 ** 2)
    with pytest.raises(NotImplementedError, match="danet_pam.*causal"):
        m.useful_flops(2, 100, 64, 4, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dim, dtype, heads", [(32, torch.bfloat16, 1), (16, torch.float16, 1),
                                               (64, torch.float32, 2), (256, torch.bfloat16, 1)])
def test_pam_on_cuda_never_takes_the_math_path(dim, dtype, heads):
    """On CUDA q, k are padded only to a multiple of 8 (C/8 of 4 or 2 would otherwise send SDPA
    to its math kernel, which forms the N x N matrix); outputs match the float64 reference."""
    m = pam(dim=dim, heads=heads, dtype=torch.float64)
    x = image(1, 24, 24, dim, dtype=torch.float64)
    ref = m(x)
    m = m.to("cuda", dtype)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        y = m(x.to("cuda", dtype))
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in ops, sorted(ops)
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    assert_close(y.double().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())
