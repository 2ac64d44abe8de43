"""medusa / MedusaGate against a naive float64 reference of the reconstructed formula.

MEDUSA (Aboutalebi et al. 2021, arXiv 2110.06063) released no model code; attnlab's reading is
stated in src/attnlab/mechanisms/medusa.py. The reference below writes that reading out in NCHW
with the module's own parameters, sharing no code with attnlab: the patch embedding is F.conv2d,
the attention is an explicit exp / sum softmax per head over the token grid, and the bilinear
resize (align_corners=False) is an explicit interpolation matrix per axis, R_h A R_w^T:

    t = Embed(S);  t = t + Proj(softmax(q k^T / sqrt(d)) v);  A_s = R_h (Head_s t) R_w^T
    y_s = X_s * sigmoid(A_s)      (residual: X_s * (1 + sigmoid(A_s)))
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import attnlab
from attnlab.mechanisms.medusa import MedusaGate

DIM, HEADS = 32, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)


def medusa(dim=DIM, heads=HEADS, **options):
    return attnlab.create("medusa", dim, heads, **options).double().eval()


def image(B, H, W, C=DIM, requires_grad=False):
    return torch.randn(B, H, W, C, dtype=torch.float64, requires_grad=requires_grad)


# --- the naive reference ------------------------------------------------------------------------

def bilinear_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in): bilinear weights along one axis, half-pixel centres (align_corners=False)."""
    R = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w1 = src - i0
        R[i, i0] += 1.0 - w1
        R[i, i1] += w1
    return R


def naive_body(m, source):
    s = source.permute(0, 3, 1, 2)                                     # (B, C, H, W)
    t = F.conv2d(s, m.embed.weight, m.embed.bias, stride=m.stride)     # (B, D, h', w')
    B, D, Hp, Wp = t.shape
    tok = t.reshape(B, D, Hp * Wp).transpose(1, 2)                     # (B, n, D)
    qkv = tok @ m.qkv.weight.T + (m.qkv.bias if m.qkv.bias is not None else 0.0)
    h, d = m.num_heads, D // m.num_heads
    outs = []
    for head in range(h):
        q = qkv[..., head * d:(head + 1) * d]
        k = qkv[..., D + head * d:D + (head + 1) * d]
        v = qkv[..., 2 * D + head * d:2 * D + (head + 1) * d]
        e = torch.einsum("bnd,bmd->bnm", q, k) / math.sqrt(d)
        e = (e - e.max(-1, keepdim=True).values).exp()
        outs.append(torch.einsum("bnm,bmd->bnd", e / e.sum(-1, keepdim=True), v))
    out = torch.cat(outs, dim=-1) @ m.proj.weight.T + m.proj.bias      # (B, n, D)
    return (tok + out).transpose(1, 2).reshape(B, D, Hp, Wp)           # (B, D, h', w')


def naive_gate(m, features, source=None):
    source = features[0] if source is None else source
    t = naive_body(m, source)                                          # (B, D, h', w')
    outs = []
    for s, x in enumerate(features):
        a = torch.einsum("cd,bdyx->bcyx", m.heads[s].weight, t) + m.heads[s].bias[:, None, None]
        Rh = bilinear_matrix(x.shape[1], a.shape[2])
        Rw = bilinear_matrix(x.shape[2], a.shape[3])
        a = torch.einsum("iy,bcyx,jx->bcij", Rh, a, Rw)                # (B, C_s, H_s, W_s)
        g = torch.sigmoid(a)
        if m.residual:
            g = 1.0 + g
        outs.append(x * g.permute(0, 2, 3, 1))
    return outs


def grads(outs, inputs, params):
    gen = torch.Generator().manual_seed(1)
    gs = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in outs]
    return torch.autograd.grad(outs, (*inputs, *params), gs)


def check(m, features, source=None, *, layer=False):
    """Outputs and gradients (inputs and every parameter) of m against naive_gate; layer=True
    calls the registered one-scale module as m(x)."""
    names, params = zip(*m.named_parameters())
    inputs = list(features) + ([source] if source is not None else [])
    outs = [m(features[0])] if layer else m.gate(features, source)
    refs = naive_gate(m, features, source)
    err = 0.0
    for o, r in zip(outs, refs):
        assert o.shape == r.shape
        assert_close(o, r, **TIGHT)
        err = max(err, (o - r).abs().max().item())
    g, g_ref = grads(outs, inputs, params), grads(refs, inputs, params)
    labels = [f"input{i}" for i in range(len(inputs))] + list(names)
    for name, a, b in zip(labels, g, g_ref):
        assert_close(a, b, **GRAD, msg=lambda s, n=name: f"grad {n}: {s}")
    return err


CASES = {
    "4x8-stride2": dict(H=4, W=8, stride=2),
    "6x4-stride1": dict(H=6, W=4, stride=1),
    "6x9-stride3-residual": dict(H=6, W=9, stride=3, residual=True),
    "8x8-stride4-body16-heads2": dict(H=8, W=8, stride=4, body_dim=16, heads=2, qkv_bias=False),
}


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_layer_matches_naive_reference(case, backend):
    case = dict(case)
    H, W, heads = case.pop("H"), case.pop("W"), case.pop("heads", HEADS)
    m = medusa(heads=heads, backend=backend, **case)
    check(m, [image(2, H, W, requires_grad=True)], layer=True)


def gate_module(scale_dims=(8, 16, 24), source_dim=12, **options):
    return MedusaGate(source_dim, scale_dims, 2, **{"body_dim": 8, **options}).double().eval()


@pytest.mark.parametrize("residual", [False, True])
def test_multiscale_gate_matches_naive_reference(residual):
    """Scales above, at and below the token grid (here 4 x 6 tokens, stride 2 on 8 x 12)."""
    m = gate_module(residual=residual)
    source = image(2, 8, 12, 12, requires_grad=True)
    feats = [image(2, 16, 24, 8, requires_grad=True), image(2, 4, 6, 16, requires_grad=True),
             image(2, 2, 3, 24, requires_grad=True)]
    check(m, feats, source)


def test_gate_defaults_to_the_first_feature_map_as_source():
    m = gate_module(scale_dims=(12, 16), source_dim=12)
    feats = [image(1, 4, 4, 12, requires_grad=True), image(1, 2, 2, 16, requires_grad=True)]
    check(m, feats)
    for a, b in zip(m.gate(feats), m.gate(feats, feats[0])):
        assert torch.equal(a, b)


def test_the_body_runs_once_for_all_scales():
    m = gate_module()
    fired = {"hook_q": 0, "hook_gates": 0}
    for n in fired:
        getattr(m, n).register_forward_hook(lambda mod, i, o, n=n: fired.__setitem__(n, fired[n] + 1))
    feats = [image(1, 8, 8, 8), image(1, 4, 4, 16), image(1, 2, 2, 24)]
    m.gate(feats, image(1, 4, 4, 12))
    assert fired == {"hook_q": 1, "hook_gates": 3}


def test_gradcheck():
    m = gate_module(scale_dims=(3, 5), source_dim=4, body_dim=4)
    source = image(1, 2, 4, 4, requires_grad=True)
    a, b = image(1, 3, 5, 3, requires_grad=True), image(1, 1, 2, 5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, x, y: tuple(m.gate([x, y], s)), (source, a, b))
    layer = medusa(dim=4, heads=2, stride=1)
    assert torch.autograd.gradcheck(lambda x: layer(x), (image(1, 2, 3, 4, requires_grad=True),))


# --- limiting cases -----------------------------------------------------------------------------

@pytest.mark.parametrize("residual", [False, True])
def test_zero_head_weights_give_a_constant_gate(residual):
    """Head weights zero: A = the head's bias everywhere, so y = x * sigmoid(b) (or 1 + sigmoid)."""
    m = medusa(residual=residual)
    with torch.no_grad():
        m.heads[0].weight.zero_()
    x = image(2, 4, 6)
    g = torch.sigmoid(m.heads[0].bias)
    assert_close(m(x), x * (1 + g if residual else g), **TIGHT)


def test_stride_one_one_head_reads_as_plain_attention_over_pixels():
    """stride 1, embed = identity conv, proj zero: t = x, so A = Head(x) is per pixel; with the
    attention switched on (proj = identity) the output depends on every pixel."""
    m = medusa(stride=1)
    with torch.no_grad():
        m.embed.weight.copy_(torch.eye(DIM, dtype=torch.float64)[:, :, None, None])
        m.embed.bias.zero_()
        m.proj.weight.zero_()
        m.proj.bias.zero_()
    x = image(1, 4, 4)
    a = x @ m.heads[0].weight.T + m.heads[0].bias
    assert_close(m(x), x * torch.sigmoid(a), **TIGHT)
    x2 = x.clone()
    x2[0, 3, 3] += 1.0
    assert_close(m(x2)[0, 0, 0], m(x)[0, 0, 0], **TIGHT)             # no mixing without proj
    with torch.no_grad():
        m.proj.weight.copy_(torch.eye(DIM, dtype=torch.float64))
    assert not torch.allclose(m(x2)[0, 0, 0], m(x)[0, 0, 0])


def test_backends_agree_and_sdpa_is_the_default(backend_spy):
    m = medusa()
    x = image(2, 8, 8)
    y = m(x)
    assert backend_spy.ran == ["sdpa"]
    m.backend = "reference"
    assert_close(m(x), y, **TIGHT)


# --- bad input ----------------------------------------------------------------------------------

def test_layer_bad_inputs():
    m = medusa()
    with pytest.raises(ValueError, match=rf"medusa: .*multiples of stride=2.*H=5, W=4"):
        m(image(1, 5, 4))
    with pytest.raises(ValueError, match=rf"medusa: .*C={DIM}.*\(2, 16, {DIM}\)"):
        m(torch.randn(2, 16, DIM))
    with pytest.raises(ValueError, match=rf"medusa: .*C={DIM}.*got 8"):
        m(torch.randn(1, 4, 4, 8))
    with pytest.raises(NotImplementedError, match="medusa.*kv_cache"):
        m(torch.randn(1, 4, 4, DIM), cache=attnlab.KVCache())


def test_gate_bad_inputs():
    m = gate_module()
    feats = [image(1, 8, 8, 8), image(1, 4, 4, 16), image(1, 2, 2, 24)]
    src = image(1, 4, 4, 12)
    with pytest.raises(ValueError, match=r"medusa: expected 3 feature maps \(scale_dims=\(8, 16, 24\)\), got 2"):
        m.gate(feats[:2], src)
    with pytest.raises(ValueError, match=r"medusa: expected features\[1\] of width C=16.*got 24"):
        m.gate([feats[0], feats[2], feats[2]], src)
    with pytest.raises(ValueError, match=r"medusa: expected source of width C=12"):
        m.gate(feats, image(1, 4, 4, 8))
    with pytest.raises(ValueError, match=r"medusa: feature maps \[2\] have another batch size"):
        m.gate([feats[0], feats[1], image(2, 2, 2, 24)], src)
    with pytest.raises(TypeError, match=r"medusa: features must be a list"):
        m.gate(feats[0], src)


@pytest.mark.parametrize("kwargs,match", [
    (dict(body_dim=30), r"dim \(30\) must be divisible by num_heads \(4\)"),
    (dict(stride=0), r"stride must be a positive int, got 0"),
    (dict(residual=1), r"residual must be a bool, got int"),
    (dict(backend="xla"), r"backend must be one of .*got 'xla'"),
    (dict(proj_drop=-0.1), r"proj_drop must be a number in \[0, 1\), got -0.1"),
])
def test_bad_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=rf"medusa: {match}"):
        attnlab.create("medusa", DIM, HEADS, **kwargs)


@pytest.mark.parametrize("scale_dims", [(), 8, (8, 0), "ab"])
def test_bad_scale_dims(scale_dims):
    with pytest.raises(ValueError, match=r"medusa: scale_dims"):
        MedusaGate(8, scale_dims, 2)


def test_useful_flops():
    m = medusa(dim=64, heads=4, stride=2)
    N, n = 196, 49
    fwd, bwd = m.useful_flops(1, N, 64, 4, False)
    assert fwd == 2 * N * 64 * 64 + 2 * n * 64 * 192 + 4 * n * n * 64 + 2 * n * 64 * 64 + 2 * n * 64 * 64
    assert bwd == 2 * fwd


# --- a swapped-in body attention ---------------------------------------------------------------

def test_mhsa_swapped_in_with_copied_weights_computes_the_builtin_body():
    """attention=create("mhsa") with the built-in qkv/proj weights copied gives the naive
    reference's outputs and gradients (so the swap changes nothing but the module)."""
    ref = gate_module()
    mhsa = attnlab.create("mhsa", 8, 2, qkv_bias=True).double()
    swapped = MedusaGate(12, (8, 16, 24), 2, body_dim=8, attention=mhsa).double().eval()
    assert not hasattr(swapped, "qkv") and not hasattr(swapped, "proj")
    with torch.no_grad():
        swapped.embed.load_state_dict(ref.embed.state_dict())
        swapped.heads.load_state_dict(ref.heads.state_dict())
        mhsa.qkv.load_state_dict(ref.qkv.state_dict())
        mhsa.proj.load_state_dict(ref.proj.state_dict())
    source = image(2, 8, 12, 12)
    feats = [image(2, 16, 24, 8), image(2, 4, 6, 16), image(2, 2, 3, 24)]
    for a, b in zip(swapped.gate(feats, source), naive_gate(ref, feats, source)):
        assert_close(a, b, **TIGHT)


def test_a_2d_body_attention_sees_the_token_grid():
    seen = []

    class Grid(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return torch.zeros_like(x)

    m = MedusaGate(12, (8,), 2, body_dim=8, attention=Grid(), attention_layout="2d").double()
    source = image(2, 8, 12, 12)
    t = m.body(source)
    assert seen == [(2, 4, 6, 8)]
    # a zero attention leaves the body as the patch embedding alone: t = Embed(S)
    embed = F.conv2d(source.permute(0, 3, 1, 2), m.embed.weight, m.embed.bias, stride=2)   # (B, D, 4, 6)
    assert_close(t, embed.permute(0, 2, 3, 1), **TIGHT)


def test_gate_scale_checks_its_scale():
    m = gate_module()
    t = m.body(image(1, 4, 4, 12))
    with pytest.raises(IndexError, match=r"medusa: scale 3 out of range \(the gate has 3 scales\)"):
        m.gate_scale(t, image(1, 2, 2, 24), 3)
    with pytest.raises(ValueError, match=r"medusa: expected features\[0\] of width C=8"):
        m.gate_scale(t, image(1, 2, 2, 24), 0)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(attention="mhsa"), TypeError, r"medusa: attention must be an nn.Module .*got str"),
    (dict(attention_layout="3d"), ValueError, r"medusa: attention_layout must be 'seq' .* or '2d' .*got '3d'"),
])
def test_bad_body_attention(kwargs, err, match):
    with pytest.raises(err, match=match):
        MedusaGate(8, (8,), 2, **kwargs)
