"""efficient_probe (EP): the official computation, limiting cases, masks, errors, FLOPs.

"Attention, Please! Revisiting Attentive Probing Through the Lens of Efficiency" (Psomas et
al., ICLR 2026). The naive reference is written from billpsomas/efficient-probing
poolings/ep.py::EfficientProbing with the module's parameters, in float64, one query at a time:
    logits_m = (Q0_m . x_n) * scale                      (query m, token n; scale C^-1/2)
    A_m      = softmax over the valid tokens of logits_m  (no valid token: A_m = 0)
    V        = x W_v^T + b_v,   V^(m) = V[:, m c:(m + 1) c],  c = C / (d_out M)
    y        = [A_1 V^(1); ...; A_M V^(M)]                (B, C / d_out)
The optional test at the end compares with the official module itself (copied weights) when
ATTNLAB_EP_DIR names an efficient-probing checkout (it imports poolings/ep.py from there).
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch
from torch.testing import assert_close

import attnlab

DIM = 24
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)


def ep(dim=DIM, dtype=torch.float64, heads=1, **options):
    m = attnlab.create("efficient_probe", dim, heads, **options).to(dtype).eval()
    with torch.no_grad():   # queries of a trained size, so that the softmax is far from uniform
        m.cls_token.normal_(0.0, 1.0)
        if m.v.bias is not None:
            m.v.bias.normal_(0.0, 0.5)
    return m


def naive_ep(m, x, attn_mask=None):
    B, N, C = x.shape
    M, c = m.num_queries, C // (m.d_out * m.num_queries)
    Q0 = m.cls_token[0]                                                       # (M, C)
    V = x @ m.v.weight.T + (0 if m.v.bias is None else m.v.bias)              # (B, N, C / d_out)
    valid = torch.ones(B, N, dtype=torch.bool)
    bias = torch.zeros(B, N, dtype=x.dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            valid = valid & attn_mask
        else:
            valid = valid & (attn_mask != float("-inf"))
            bias = bias + attn_mask.masked_fill(~valid, 0.0)
    chunks = []
    for q in range(M):
        logits = torch.einsum("c,bnc->bn", Q0[q], x) * m.scale + bias         # (B, N)
        logits = logits.masked_fill(~valid, float("-inf"))
        rows = []
        for b in range(B):
            if valid[b].any():
                rows.append(torch.softmax(logits[b], dim=-1))
            else:
                rows.append(torch.zeros(N, dtype=x.dtype))
        A = torch.stack(rows)                                                 # (B, N)
        chunks.append(torch.einsum("bn,bnc->bc", A, V[:, :, q * c:(q + 1) * c]))
    return torch.cat(chunks, dim=-1)                                          # (B, M c)


def make_mask(kind, B, N):
    if kind is None:
        return None
    valid = torch.rand(B, N) > 0.4
    valid[:, 0] = True
    valid[1] = False                         # one sample is all padding
    if kind == "bool":
        return valid
    return torch.zeros(B, N, dtype=torch.float64).masked_fill(~valid, float("-inf")) + torch.randn(B, N).double()


CONFIGS = {"default": dict(), "m4_d2": dict(num_queries=4, d_out=2), "m8_bias": dict(num_queries=8, qkv_bias=True),
           "m1_scale": dict(num_queries=1, qk_scale=0.3), "m24_d1": dict(num_queries=24),
           "heads_ignored": dict(num_queries=3, heads=4)}


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=False)


@pytest.mark.parametrize("backend", [None, "reference"], ids=["default", "reference"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"], ids=["nomask", "bool", "float"])
@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_matches_naive_reference_outputs_and_grads(cfg, mask_kind, backend):
    torch.manual_seed(0)
    cfg = dict(cfg)
    options = {"num_queries": 2, **cfg}
    m = ep(**options)
    m.backend = backend
    B, N = 3, 7
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = make_mask(mask_kind, B, N)
    y, ref = m(x, attn_mask=mask), naive_ep(m, x, mask)
    assert y.shape == (B, DIM // m.d_out)
    assert_close(y, ref, **TIGHT)
    params = [p for _, p in m.named_parameters()]
    assert {n for n, _ in m.named_parameters()} == {"cls_token", "v.weight"} | ({"v.bias"} if m.v.bias is not None else set())
    g = torch.randn_like(y)
    for got, want in zip(_grads(y, [x, *params], g), _grads(ref, [x, *params], g)):
        assert_close(got, want, **GRAD)


@pytest.mark.parametrize("backend", [None, "reference"], ids=["default", "reference"])
def test_gradcheck(backend):
    torch.manual_seed(0)
    m = ep(dim=8, num_queries=2, d_out=2, qkv_bias=True)
    m.backend = backend
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, False, True, False, False]])
    names = [n for n, _ in m.named_parameters()]

    def f(x, *params):
        out = torch.func.functional_call(m, dict(zip(names, params)), (x,), dict(attn_mask=mask))
        return out

    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8)


def test_zero_queries_average_the_projected_tokens():
    """Q0 = 0 gives uniform weights: every query returns the mean of its value chunk, so EP is
    global average pooling of the value projection, x W_v^T averaged over the tokens."""
    m = ep(num_queries=4, d_out=2, qkv_bias=True)
    with torch.no_grad():
        m.cls_token.zero_()
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    assert_close(m(x), m.v(x).mean(1), **TIGHT)
    valid = torch.tensor([[True] * 9, [True] * 4 + [False] * 5])
    assert_close(m(x, attn_mask=valid)[1], m.v(x[1, :4]).mean(0), **TIGHT)


def test_one_query_is_single_query_attention_pooling():
    """M = 1, d_out = 1: y = softmax(x q / sqrt(C)) (x W_v^T), one full-width query."""
    m = ep(num_queries=1)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    a = torch.softmax(x @ m.cls_token[0, 0] / math.sqrt(DIM), dim=-1)           # (B, N)
    assert_close(m(x), torch.einsum("bn,bnc->bc", a, m.v(x)), **TIGHT)


def test_each_query_reads_only_its_own_value_chunk():
    """Zeroing the value rows of chunk m zeroes output chunk m and nothing else."""
    m = ep(num_queries=4, d_out=1)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    y = m(x)
    c = DIM // 4
    with torch.no_grad():
        m.v.weight[c:2 * c] = 0.0
    y2 = m(x)
    assert_close(y2[:, c:2 * c], torch.zeros(2, c, dtype=torch.float64), rtol=0, atol=0)
    assert_close(torch.cat([y2[:, :c], y2[:, 2 * c:]], 1), torch.cat([y[:, :c], y[:, 2 * c:]], 1), rtol=0, atol=0)


def test_probs_hook_sees_one_distribution_per_query():
    m = ep(num_queries=3)
    m.backend = "reference"
    seen = {}
    m.hook_probs.register_forward_hook(lambda mod, args, out: seen.__setitem__("p", out))
    m.hook_k.register_forward_hook(lambda mod, args, out: seen.__setitem__("k", out))
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    m(x)
    assert seen["p"].shape == (2, 3, 1, 5)
    assert_close(seen["p"].sum(-1), torch.ones(2, 3, 1, dtype=torch.float64))
    assert seen["k"].shape == (2, 1, 5, DIM) and torch.equal(seen["k"][:, 0], x)   # raw tokens are the keys


def test_masked_tokens_have_no_effect_and_empty_samples_give_zeros():
    m = ep(num_queries=4, d_out=2, qkv_bias=True)
    x = torch.randn(3, 6, DIM, dtype=torch.float64)
    valid = torch.tensor([[True] * 6, [True, False, True, False, True, False], [False] * 6])
    x2 = x.clone()
    x2[~valid] = 1e3 * torch.randn(int((~valid).sum()), DIM, dtype=torch.float64)
    y = m(x, attn_mask=valid)
    assert_close(m(x2, attn_mask=valid), y, **TIGHT)
    assert_close(y[1], m(x[1:2, [0, 2, 4]])[0], **TIGHT)
    assert_close(y[2], torch.zeros(DIM // 2, dtype=torch.float64), rtol=0, atol=0)
    assert_close(m(x[:, :0]), torch.zeros(3, DIM // 2, dtype=torch.float64), rtol=0, atol=0)


def test_float32_matches_float64():
    m64 = ep(num_queries=4, d_out=2)
    m32 = attnlab.create("efficient_probe", DIM, 1, num_queries=4, d_out=2)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    y32 = m32(x.float())
    assert y32.dtype == torch.float32
    assert_close(y32.double(), m64(x), rtol=1e-5, atol=1e-5)


def test_defaults_follow_the_official_constructor():
    m = attnlab.create("efficient_probe", 64)
    assert m.num_queries == 32 and m.d_out == 1 and m.v.bias is None
    assert m.cls_token.shape == (1, 32, 64) and m.v.weight.shape == (64, 64)
    assert m.scale == 64 ** -0.5
    assert 0.01 < m.cls_token.std().item() < 0.03          # 0.02 * randn
    assert sum(p.numel() for p in m.parameters()) == 32 * 64 + 64 * 64


def test_attn_drop_only_in_training():
    m = ep(num_queries=2, attn_drop=0.5)
    x = torch.randn(2, 8, DIM, dtype=torch.float64)
    assert_close(m(x), naive_ep(m, x), **TIGHT)
    m.train()
    torch.manual_seed(0)
    assert not torch.allclose(m(x), naive_ep(m, x))


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, DIM), (2, 5, 1, DIM)], ids=["2d", "4d"])
def test_wrong_rank_names_the_shape(shape):
    with pytest.raises(ValueError, match=r"efficient_probe.*\(B, N, C=24\)"):
        ep(num_queries=2)(torch.randn(shape, dtype=torch.float64))


def test_wrong_width_names_both_widths():
    with pytest.raises(ValueError, match=r"efficient_probe.*C=24, got 23"):
        ep(num_queries=2)(torch.randn(2, 5, DIM - 1, dtype=torch.float64))


@pytest.mark.parametrize("mask,err,match", [
    (torch.ones(2, 6, dtype=torch.bool), ValueError, r"\(B, N\) = \(2, 5\), got \(2, 6\)"),
    (torch.ones(2, 1, 1, 5, dtype=torch.bool), ValueError, r"\(B, N\) = \(2, 5\), got \(2, 1, 1, 5\)"),
    ([[True] * 5] * 2, TypeError, "list"),
])
def test_bad_masks(mask, err, match):
    with pytest.raises(err, match=match):
        ep(num_queries=2)(torch.randn(2, 5, DIM, dtype=torch.float64), attn_mask=mask)


@pytest.mark.parametrize("options,match", [
    (dict(num_queries=5), r"dim \(24\) must be divisible by d_out \* num_queries \(1 \* 5 = 5\)"),
    (dict(num_queries=4, d_out=4), r"divisible by d_out \* num_queries \(4 \* 4 = 16\)"),
    (dict(num_queries=0), "num_queries must be a positive int, got 0"),
    (dict(d_out=True), "d_out must be a positive int, got True"),
    (dict(num_queries=2, qk_scale=0.0), "qk_scale must be a finite number > 0, got 0.0"),
    (dict(num_queries=2, attn_drop=1.0), r"attn_drop must be a number in \[0, 1\), got 1.0"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        attnlab.create("efficient_probe", DIM, 1, **options)


def test_causal_and_cache_are_refused():
    m = ep(num_queries=2)
    x = torch.randn(1, 3, DIM, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="efficient_probe.*causal"):
        m(x, is_causal=True)
    with pytest.raises(NotImplementedError, match="efficient_probe.*kv_cache"):
        m(x, cache=attnlab.KVCache())


# --- FLOPs -----------------------------------------------------------------------------------------

def test_useful_flops_match_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    m = attnlab.create("efficient_probe", 48, 4, num_queries=6, d_out=2, backend="reference").eval()
    x = torch.randn(3, 20, 48)
    with FlopCounterMode(display=False) as counter:
        m(x)
    fwd, bwd = m.useful_flops(3, 20, 48, 4, False)
    assert fwd == counter.get_total_flops() and bwd == 2 * fwd
    with pytest.raises(NotImplementedError, match="causal"):
        m.useful_flops(3, 20, 48, 4, True)
    with pytest.raises(ValueError, match="dim=32"):
        m.useful_flops(3, 20, 32, 4, False)


def test_useful_flops_at_vit_small_width():
    """N = 256 tokens of C = 384, M = 32, d_out = 1: value projection 2 N C^2 dominates."""
    m = attnlab.create("efficient_probe", 384)
    N, C, M = 256, 384, 32
    assert m.useful_flops(1, N, C, 8, False)[0] == 2 * N * C * C + 2 * M * N * C + 2 * N * C


# --- the official module, when an efficient-probing checkout is at hand -----------------------------

def _official():
    root = os.environ.get("ATTNLAB_EP_DIR")
    if not root:
        pytest.skip("set ATTNLAB_EP_DIR to a billpsomas/efficient-probing checkout to compare with poolings/ep.py")
    path = os.path.join(root, "poolings", "ep.py")
    if not os.path.exists(path):
        pytest.skip(f"no poolings/ep.py in {root}")
    spec = importlib.util.spec_from_file_location("_official_efficient_probing", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("options", [dict(num_queries=32, d_out=1), dict(num_queries=4, d_out=2, qkv_bias=True),
                                     dict(num_queries=8, d_out=4, qk_scale=0.3)], ids=["q32", "q4_d2_bias", "q8_d4"])
def test_matches_the_official_module_with_copied_weights(options):
    official = _official().EfficientProbing(dim=128, **options).double()
    with torch.no_grad():
        for p in official.parameters():
            p.normal_(0.0, 0.5)
    m = attnlab.create("efficient_probe", 128, 1, **options).double()
    m.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(3, 11, 128, dtype=torch.float64, requires_grad=True)
    y, y_off = m(x), official(x)
    assert_close(y, y_off, **TIGHT)
    g = torch.randn_like(y)
    params, off_params = list(m.parameters()), list(official.parameters())
    for got, want in zip(_grads(y, [x, *params], g), _grads(y_off, [x, *off_params], g)):
        assert_close(got, want, **GRAD)
