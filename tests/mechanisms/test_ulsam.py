"""ulsam against a naive per-subspace float64 reference (eval and train), official keys, limits, bad input.

"ULSAM: Ultra-Lightweight Subspace Attention Module" (Saini et al., WACV 2020), official
Nandan91/ULSAM `ulsam.py::SubSpace` / `::ULSAM`. The naive reference below follows that code one
subspace at a time, on the official per-subspace parameter layout (`subspaces.{i}.conv_dws.weight`
...), in NCHW, sharing no code with attnlab: explicit BatchNorm formulas, the 3 x 3 max-pool as a
maximum over nine shifted copies padded with -inf, the softmax as exp / sum:

    a = maxpool(relu(bn_dws(w_dws * F + b_dws)));  s = relu(bn_point(Σ_c w_point[c] a[c] + b_point))
    A = softmax over H W (s);  out = F * A + F;  outputs of the subspaces concatenated.
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab.mechanisms.ulsam import convert_official_state_dict

DIM, HEADS = 16, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)
EPS = 1e-5


def module(dim=DIM, heads=HEADS, dtype=torch.float64, **options):
    """A ulsam module with random BN affine parameters and running statistics."""
    m = attnlab.create("ulsam", dim, heads, **options).to(dtype).eval()
    with torch.no_grad():
        for bn in (m.bn_dws, m.bn_point):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.3)
            bn.running_mean.normal_(0.0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
        m.conv_dws.bias.normal_(0.0, 0.5)
        m.conv_point.bias.normal_(0.2, 0.5)
    return m


# --- the naive reference -----------------------------------------------------------------------

def naive_bn(y, p, name, training):
    """BatchNorm2d over (B, H, W) per channel: eval with running stats, train with batch stats."""
    if training:
        mean = y.mean((0, 2, 3))
        var = ((y - mean.reshape(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
    else:
        mean, var = p[f"{name}.running_mean"], p[f"{name}.running_var"]
    shape = (1, -1, 1, 1)
    return (y - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + EPS) * p[f"{name}.weight"].reshape(shape) \
        + p[f"{name}.bias"].reshape(shape)


def naive_maxpool3(a):
    B, C, H, W = a.shape
    padded = a.new_full((B, C, H + 2, W + 2), float("-inf"))
    padded[:, :, 1:H + 1, 1:W + 1] = a
    taps = [padded[:, :, i:i + H, j:j + W] for i in range(3) for j in range(3)]
    return torch.stack(taps).amax(0)


def naive_subspace(p, f, training=False):
    """The official SubSpace.forward: f (B, C/g, H, W), p the subspace's parameters."""
    B, c, H, W = f.shape
    a = p["conv_dws.weight"].reshape(1, c, 1, 1) * f + p["conv_dws.bias"].reshape(1, c, 1, 1)
    a = naive_maxpool3(torch.clamp(naive_bn(a, p, "bn_dws", training), min=0))
    s = torch.einsum("c,bchw->bhw", p["conv_point.weight"].reshape(c), a)[:, None] + p["conv_point.bias"].reshape(1, 1, 1, 1)
    s = torch.clamp(naive_bn(s, p, "bn_point", training), min=0).reshape(B, 1, H * W)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    A = (e / e.sum(-1, keepdim=True)).reshape(B, 1, H, W)
    return f * A + f


def naive_ulsam(subspaces, x, training=False):
    """The official ULSAM.forward on channels-last x: chunk the channels, run each subspace, concat."""
    f = x.permute(0, 3, 1, 2)
    chunks = f.chunk(len(subspaces), dim=1)
    out = torch.cat([naive_subspace(p, c, training) for p, c in zip(subspaces, chunks)], dim=1)
    return out.permute(0, 2, 3, 1)


def official_layout(params, groups):
    """This module's parameters (name -> tensor) split into the official per-subspace dicts
    (slices, so gradients flow back to the module's tensors)."""
    subspaces = [{} for _ in range(groups)]
    for name, t in params.items():
        if name.endswith("num_batches_tracked"):
            continue
        for i, piece in enumerate(t.chunk(groups, dim=0)):
            subspaces[i][name] = piece
    return subspaces


def params_and_buffers(m):
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


@pytest.mark.parametrize("groups,shape", [(None, (2, 5, 7)), (1, (2, 4, 4)), (8, (1, 6, 3)), (16, (2, 3, 5)),
                                          (2, (3, 1, 1)), (None, (1, 14, 14))], ids=str)
def test_outputs_and_gradients_match_the_naive_reference(groups, shape):
    m = module(groups=groups)
    x = torch.randn(*shape, DIM, dtype=torch.float64, requires_grad=True)
    names, params = zip(*m.named_parameters())
    y = m(x)
    ref = naive_ulsam(official_layout(params_and_buffers(m), m.groups), x)
    assert_close(y, ref, **TIGHT)
    g = torch.randn_like(y)
    for n, a, b in zip(("x", *names), torch.autograd.grad(y, (x, *params), g),
                       torch.autograd.grad(ref, (x, *params), g)):
        assert_close(a, b, **GRAD, msg=lambda s, n=n: f"gradient of {n}: {s}")


def test_training_mode_uses_batch_statistics_and_updates_with_momentum_0_1():
    m = module(groups=4).train()
    x = torch.randn(3, 5, 6, DIM, dtype=torch.float64, requires_grad=True)
    before = {k: v.clone() for k, v in m.named_buffers()}
    names, params = zip(*m.named_parameters())
    y = m(x)
    ref = naive_ulsam(official_layout({**dict(m.named_parameters()), **before}, 4), x, training=True)
    assert_close(y, ref, **TIGHT)
    g = torch.randn_like(y)
    for n, a, b in zip(("x", *names), torch.autograd.grad(y, (x, *params), g),
                       torch.autograd.grad(ref, (x, *params), g)):
        assert_close(a, b, **GRAD, msg=lambda s, n=n: f"gradient of {n}: {s}")
    # PyTorch's momentum 0.1: running = 0.9 running + 0.1 batch (unbiased variance).
    f = x.detach().permute(0, 3, 1, 2)
    dws = m.conv_dws.weight.detach().reshape(1, -1, 1, 1) * f + m.conv_dws.bias.detach().reshape(1, -1, 1, 1)
    assert m.bn_dws.momentum == 0.1 and m.bn_point.momentum == 0.1
    assert_close(m.bn_dws.running_mean, 0.9 * before["bn_dws.running_mean"] + 0.1 * dws.mean((0, 2, 3)), **TIGHT)
    assert_close(m.bn_dws.running_var,
                 0.9 * before["bn_dws.running_var"] + 0.1 * dws.var((0, 2, 3), correction=1), **TIGHT)
    assert int(m.bn_dws.num_batches_tracked) == 1


def test_gradcheck():
    m = module(dim=4, heads=2)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    names, params = zip(*m.named_parameters())

    def of_params(*ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x.detach(),))
    assert torch.autograd.gradcheck(of_params, tuple(p.detach().clone().requires_grad_(True) for p in params))


# --- official checkpoint keys ------------------------------------------------------------------

def test_official_state_dict_converts_loads_and_computes_the_same():
    C, g = DIM, 4
    official = {}
    for i in range(g):
        c = C // g
        official |= {f"ulsam.subspaces.{i}.conv_dws.weight": torch.randn(c, 1, 1, 1),
                     f"ulsam.subspaces.{i}.conv_dws.bias": torch.randn(c),
                     f"ulsam.subspaces.{i}.conv_point.weight": torch.randn(1, c, 1, 1),
                     f"ulsam.subspaces.{i}.conv_point.bias": torch.randn(1)}
        for bn, n in (("bn_dws", c), ("bn_point", 1)):
            official |= {f"ulsam.subspaces.{i}.{bn}.weight": torch.rand(n) + 0.5,
                         f"ulsam.subspaces.{i}.{bn}.bias": torch.randn(n),
                         f"ulsam.subspaces.{i}.{bn}.running_mean": torch.randn(n),
                         f"ulsam.subspaces.{i}.{bn}.running_var": torch.rand(n) + 0.5,
                         f"ulsam.subspaces.{i}.{bn}.num_batches_tracked": torch.tensor(7)}
    official = {k: v.double() if v.is_floating_point() else v for k, v in official.items()}
    m = attnlab.create("ulsam", C, HEADS, groups=g).double().eval()
    m.load_state_dict(convert_official_state_dict(official))          # strict: every key, every shape
    assert int(m.bn_point.num_batches_tracked) == 7
    subspaces = [{k.split(f"subspaces.{i}.")[1]: v for k, v in official.items() if f"subspaces.{i}." in k}
                 for i in range(g)]
    x = torch.randn(2, 5, 4, C, dtype=torch.float64)
    with torch.no_grad():
        assert_close(m(x), naive_ulsam(subspaces, x), **TIGHT)


@pytest.mark.parametrize("state,needle", [
    ({"subspaces.0.conv_dws.weight": torch.zeros(2, 1, 1, 1), "head.weight": torch.zeros(1)}, "head.weight"),
    ({"subspaces.1.conv_dws.weight": torch.zeros(2, 1, 1, 1)}, "expected 0 .. 0"),
    ({"a.subspaces.0.conv_dws.weight": torch.zeros(2, 1, 1, 1),
      "b.subspaces.0.conv_dws.bias": torch.zeros(2)}, "prefixes"),
], ids=["foreign-key", "missing-subspace", "two-prefixes"])
def test_convert_refuses_what_is_not_one_official_ulsam(state, needle):
    with pytest.raises(ValueError, match=needle):
        convert_official_state_dict(state)


def test_parameter_shapes():
    m = attnlab.create("ulsam", DIM, HEADS, groups=4)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")} == {
        "conv_dws.weight": (DIM, 1, 1, 1), "conv_dws.bias": (DIM,),
        **{f"bn_dws.{n}": (DIM,) for n in ("weight", "bias", "running_mean", "running_var")},
        "conv_point.weight": (4, DIM // 4, 1, 1), "conv_point.bias": (4,),
        **{f"bn_point.{n}": (4,) for n in ("weight", "bias", "running_mean", "running_var")}}


# --- limiting cases and properties -------------------------------------------------------------

def test_attention_maps_are_softmaxes_over_the_pixels():
    m = module()
    x = torch.randn(2, 5, 6, DIM, dtype=torch.float64)
    seen = {}
    m.hook_scores.register_forward_hook(lambda mod, i, o: seen.setdefault("scores", o))
    m.hook_probs.register_forward_hook(lambda mod, i, o: seen.setdefault("probs", o))
    with torch.no_grad():
        y = m(x)
    assert seen["scores"].shape == seen["probs"].shape == (2, HEADS, 30)
    assert (seen["scores"] >= 0).all()                                    # after the ReLU
    assert_close(seen["probs"].sum(-1), torch.ones(2, HEADS, dtype=torch.float64), **TIGHT)
    A = seen["probs"].reshape(2, HEADS, 5, 6).permute(0, 2, 3, 1).repeat_interleave(DIM // HEADS, dim=-1)
    assert_close(y, x * A + x, **TIGHT)


def test_constant_scores_give_uniform_maps():
    """bn_point's weight and bias 0: every score is relu(0) = 0, A = 1 / (H W), out = x (1 + 1 / (H W))."""
    m = module()
    with torch.no_grad():
        m.bn_point.weight.zero_()
        m.bn_point.bias.zero_()
    x = torch.randn(2, 3, 5, DIM, dtype=torch.float64)
    assert_close(m(x), x * (1 + 1 / 15), **TIGHT)


def test_one_pixel_image_doubles_the_input():
    m = module()
    x = torch.randn(3, 1, 1, DIM, dtype=torch.float64)
    assert_close(m(x), 2 * x, **TIGHT)


def test_groups_default_to_num_heads_and_groups_are_independent():
    assert attnlab.create("ulsam", DIM, 4).groups == 4
    assert attnlab.create("ulsam", DIM, 4, groups=2).groups == 2
    m = module(groups=4)
    x = torch.randn(1, 4, 4, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[..., :4] += torch.randn(1, 4, 4, 4, dtype=torch.float64)          # change group 0's channels only
    with torch.no_grad():
        diff = (m(x2) - m(x)).abs().amax((0, 1, 2))
    assert (diff[:4] > 0).all() and (diff[4:] == 0).all()


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
    m = attnlab.create("ulsam", DIM, HEADS, attn_drop=0.5, proj_drop=0.5).double()
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
    m = attnlab.create("ulsam", DIM, HEADS).eval()
    x = torch.randn(2, 8, 8, DIM)
    with FlopCounterMode(display=False) as counter:
        m(x)
    fwd, bwd = m.useful_flops(2, 64, DIM, HEADS, False)
    assert fwd == counter.get_total_flops() and bwd == 2 * fwd
    with pytest.raises(NotImplementedError, match="causal"):
        m.useful_flops(2, 64, DIM, HEADS, True)


def test_runs_in_a_transformer_block_on_a_grid():
    from attnlab.models.transformer import Block
    block = Block(32, 4, mechanism="ulsam", grid=(4, 4)).eval()
    assert block(torch.randn(2, 16, 32)).shape == (2, 16, 32)


# --- bad input and options ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 64, DIM), (2, 8, 8, 1, DIM), (DIM,)], ids=["seq", "5d", "1d"])
def test_wrong_rank_raises(shape):
    with pytest.raises(ValueError) as info:
        attnlab.create("ulsam", DIM, HEADS)(torch.randn(shape))
    msg = str(info.value)
    assert "ulsam" in msg and str(shape) in msg and str(DIM) in msg, msg


def test_channels_first_input_raises_naming_widths():
    with pytest.raises(ValueError) as info:
        attnlab.create("ulsam", DIM, HEADS)(torch.randn(2, DIM, 8, 6))
    msg = str(info.value)
    assert "ulsam" in msg and f"C={DIM}" in msg and "got 6" in msg and "channels-last" in msg, msg


@pytest.mark.parametrize("x", [None, [[0.0]], torch.zeros(1, 4, 4, DIM, dtype=torch.int64)], ids=["None", "list", "int64"])
def test_non_tensor_or_non_float_raises(x):
    with pytest.raises(TypeError, match="ulsam"):
        attnlab.create("ulsam", DIM, HEADS)(x)


@pytest.mark.parametrize("feature,kwargs", [
    ("attn_mask", dict(attn_mask=torch.ones(2, 16, dtype=torch.bool))),
    ("causal", dict(is_causal=True)),
    ("kv_cache", dict(cache=attnlab.KVCache())),
])
def test_unsupported_features_raise(feature, kwargs):
    with pytest.raises(NotImplementedError) as info:
        attnlab.create("ulsam", DIM, HEADS)(torch.randn(2, 4, 4, DIM), **kwargs)
    assert "ulsam" in str(info.value) and feature in str(info.value)


@pytest.mark.parametrize("dim,heads,options,match", [
    (DIM, HEADS, dict(groups=0), r"ulsam: groups must be a positive int, got 0"),
    (DIM, HEADS, dict(groups=2.0), r"ulsam: groups must be a positive int, got 2.0"),
    (DIM, HEADS, dict(groups=True), r"ulsam: groups must be a positive int, got True"),
    (DIM, HEADS, dict(groups=3), r"ulsam: dim \(16\) must be divisible by groups \(3\)"),
    (18, 4, dict(), r"ulsam: dim \(18\) must be divisible by num_heads \(the default groups\) \(4\)"),
    (0, 4, dict(), r"ulsam: dim must be a positive int, got 0"),
    (DIM, 0, dict(), r"ulsam: num_heads must be a positive int, got 0"),
    (DIM, HEADS, dict(attn_drop=1.0), r"ulsam: attn_drop must be a number in \[0, 1\), got 1.0"),
    (DIM, HEADS, dict(proj_drop=-0.5), r"ulsam: proj_drop must be a number in \[0, 1\), got -0.5"),
], ids=lambda v: None)
def test_bad_options_raise_at_create(dim, heads, options, match):
    with pytest.raises(ValueError, match=match):
        attnlab.create("ulsam", dim, heads, **options)


def test_explicit_groups_lift_the_heads_constraint():
    m = attnlab.create("ulsam", 18, 4, groups=3).eval()
    assert m(torch.randn(1, 4, 4, 18)).shape == (1, 4, 4, 18)
