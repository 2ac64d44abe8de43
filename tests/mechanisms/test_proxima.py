"""proxima and combined (HTR-JAND) against a naive float64 reference of the formulas.

The reference is written from the formulas in the header of proxima.py, with the module's own
weights, and shares no code with it:

    proxima:  out_hi = sum_j softmax_j(q_hi . k_hj / sqrt(d) - (i - j)^2 / (2 sigma_h^2)) v_hj
    combined: sigmoid(g) * mhsa(x) + sigmoid(-g) * proxima(x)

Limiting cases: sigma -> inf is mhsa, sigma -> 0 is "each token attends to itself", and the
gate of `combined` at +-inf selects one branch.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab import KVCache

DIM, HEADS = 16, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)


def make(name, dtype=torch.float64, **options):
    torch.manual_seed(0)
    m = attnlab.create(name, DIM, HEADS, **{"qkv_bias": True, **options}).to(dtype).eval()
    with torch.no_grad():   # distinct widths per head, so a head mix-up is visible
        prox = m if name == "proxima" else m.proxima
        prox.log_sigma.copy_(torch.log(torch.tensor([0.7, 1.5, 3.0, 8.0], dtype=dtype)))
    return m


def naive_heads(qkv_linear, x):
    B, N, C = x.shape
    qkv = x @ qkv_linear.weight.T + qkv_linear.bias                        # (B, N, 3C)
    q, k, v = qkv.reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)  # (B, h, N, d) each
    return q, k, v


def naive_attention(q, k, v, bias, allowed):
    """softmax over allowed keys of q.k/sqrt(d) + bias; rows with no allowed key -> 0."""
    d = q.shape[-1]
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(d) + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    return torch.einsum("bhnm,bhmd->bhnd", probs, v)


def allowed_grid(B, N, valid=None, is_causal=False):
    allowed = torch.ones(B, 1, N, N, dtype=torch.bool)
    if is_causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    return allowed


def naive_proxima(m, x, valid=None, is_causal=False):
    B, N, C = x.shape
    q, k, v = naive_heads(m.qkv, x)
    sigma = torch.exp(m.log_sigma)                                          # (h,)
    i = torch.arange(N, dtype=x.dtype)
    bias = torch.empty(HEADS, N, N, dtype=x.dtype)
    for hh in range(HEADS):
        for a in range(N):
            for b in range(N):
                bias[hh, a, b] = -(i[a] - i[b]) ** 2 / (2 * sigma[hh] ** 2)
    out = naive_attention(q, k, v, bias, allowed_grid(B, N, valid, is_causal))
    return out.transpose(1, 2).reshape(B, N, C) @ m.proj.weight.T + m.proj.bias


def naive_mhsa_branch(m, x, valid=None, is_causal=False):
    B, N, C = x.shape
    q, k, v = naive_heads(m.qkv, x)
    out = naive_attention(q, k, v, 0.0, allowed_grid(B, N, valid, is_causal))
    return out.transpose(1, 2).reshape(B, N, C) @ m.proj.weight.T + m.proj.bias


def naive_combined(m, x, valid=None, is_causal=False):
    g = m.gate_logit
    return (torch.sigmoid(g) * naive_mhsa_branch(m, x, valid, is_causal)
            + torch.sigmoid(-g) * naive_proxima(m.proxima, x, valid, is_causal))


NAIVE = {"proxima": naive_proxima, "combined": naive_combined}
CASES = [dict(), dict(is_causal=True), dict(padded=True), dict(padded=True, is_causal=True)]


@pytest.mark.parametrize("name", ["proxima", "combined"])
@pytest.mark.parametrize("case", CASES, ids=["full", "causal", "padded", "padded_causal"])
def test_outputs_and_grads_match_naive(name, case):
    m = make(name, gate_init=0.3) if name == "combined" else make(name)
    B, N = 2, 7
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    valid = None
    if case.get("padded"):
        valid = torch.ones(B, N, dtype=torch.bool)
        valid[0, 4:] = False
        valid[1, 1] = False
    is_causal = case.get("is_causal", False)
    y = m(x, attn_mask=valid, is_causal=is_causal)
    y_ref = NAIVE[name](m, x, valid, is_causal)
    assert_close(y, y_ref, **TIGHT)
    params = [p for p in m.parameters()]
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, *params])
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x, *params])
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, **TIGHT)
    # The proximity widths receive a gradient (they are learned), and it is not zero.
    log_sigma = m.log_sigma if name == "proxima" else m.proxima.log_sigma
    g_sigma = grads[1 + [id(p) for p in params].index(id(log_sigma))]
    assert g_sigma.abs().min() > 0


def test_proximity_bias_golden():
    from attnlab.mechanisms.proxima import proximity_bias
    bias = proximity_bias(torch.log(torch.tensor([1.0, 2.0], dtype=torch.float64)), N=2, M=3, dtype=torch.float64)
    # queries are positions 1, 2 of 3 keys (bottom-right alignment, as with a KV cache)
    expected = torch.tensor([[[-0.5, 0.0, -0.5], [-2.0, -0.5, 0.0]],
                             [[-0.125, 0.0, -0.125], [-0.5, -0.125, 0.0]]], dtype=torch.float64)
    assert_close(bias, expected, rtol=0, atol=1e-15)


def test_proxima_is_local_with_small_sigma():
    """A narrow prior pulls each query's attention onto its neighbours; a wide one does not."""
    m = make("proxima")
    x = torch.randn(1, 12, DIM, dtype=torch.float64)
    q, k, v = m.project(x)
    N = x.shape[1]
    dist = (torch.arange(N)[:, None] - torch.arange(N)[None, :]).abs().double()
    for log_sigma, expect_local in ((math.log(0.7), True), (math.log(1e4), False)):
        bias = -dist ** 2 / (2 * math.exp(log_sigma) ** 2)
        probs = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(DIM // HEADS) + bias, -1)
        mean_dist = (probs * dist).sum(-1).mean()
        assert (mean_dist < 1.0) == expect_local, mean_dist


# --- limiting cases -----------------------------------------------------------------------------

def test_proxima_wide_sigma_is_mhsa():
    m = make("proxima")
    ref = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True).double().eval()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k != "log_sigma"})
    with torch.no_grad():
        m.log_sigma.fill_(60.0)             # sigma = e^60: the prior is exactly 0 in float64
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    valid = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    for kwargs in (dict(), dict(is_causal=True), dict(attn_mask=valid)):
        assert_close(m(x, **kwargs), ref(x, **kwargs), **TIGHT)


def test_proxima_narrow_sigma_attends_to_itself():
    m = make("proxima")
    with torch.no_grad():
        m.log_sigma.fill_(math.log(0.02))   # neighbours at distance 1 get exp(-1250) = 0
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    _, _, v = m.project(x)
    expected = m.proj(v.transpose(1, 2).reshape(2, 6, DIM))
    assert_close(m(x), expected, **TIGHT)
    assert_close(m(x, is_causal=True), expected, **TIGHT)


@pytest.mark.parametrize("branch", ["mhsa", "proxima"])
def test_combined_gate_limits_select_one_branch(branch):
    m = make("combined")
    mhsa = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True).double().eval()
    mhsa.load_state_dict({"qkv.weight": m.qkv.weight, "qkv.bias": m.qkv.bias,
                          "proj.weight": m.proj.weight, "proj.bias": m.proj.bias})
    with torch.no_grad():
        m.gate_logit.fill_(60.0 if branch == "mhsa" else -60.0)   # sigmoid(+-60) is 1 / 1e-26
    x = torch.randn(2, 8, DIM, dtype=torch.float64)
    valid = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    for kwargs in (dict(), dict(is_causal=True), dict(attn_mask=valid, is_causal=True)):
        want = mhsa(x, **kwargs) if branch == "mhsa" else m.proxima(x, **kwargs)
        assert_close(m(x, **kwargs), want, **TIGHT)


def test_combined_default_gate_is_an_even_mix():
    m = attnlab.create("combined", DIM, HEADS).double().eval()
    assert_close(m.alpha, torch.tensor(0.5, dtype=torch.float64))
    x = torch.randn(1, 5, DIM, dtype=torch.float64)
    y = m(x)
    # Not one branch alone.
    m.gate_logit.data.fill_(60.0)
    y_mhsa = m(x)
    assert not torch.allclose(y, y_mhsa)


def test_combined_cache_holds_both_branches():
    m = make("combined", gate_init=0.2)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    cache = KVCache()
    with torch.no_grad():
        outs = [m(x[:, t:t + 1], is_causal=True, cache=cache) for t in range(6)]
    assert cache.keys.shape == (2, 2 * HEADS, 6, DIM // HEADS)
    assert_close(torch.cat(outs, 1), m(x, is_causal=True), **TIGHT)


# --- gradcheck ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["proxima", "combined"])
def test_gradcheck(name):
    torch.manual_seed(1)
    m = attnlab.create(name, 4, 2, qkv_bias=True, sigma=1.5).double().eval()
    params = dict(m.named_parameters())
    keys = sorted(k for k in params if "log_sigma" in k or "gate" in k)

    def f(x, *extra):
        return torch.func.functional_call(m, {**params, **dict(zip(keys, extra))}, (x,),
                                          dict(is_causal=True))

    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    extra = [params[k].detach().clone().requires_grad_(True) for k in keys]
    assert torch.autograd.gradcheck(f, (x, *extra))


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["proxima", "combined"])
@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf"), True, "2"])
def test_bad_sigma_raises(name, sigma):
    with pytest.raises(ValueError, match=rf"{name}: sigma must be a finite number > 0, got"):
        attnlab.create(name, DIM, HEADS, sigma=sigma)


@pytest.mark.parametrize("gate_init", [float("nan"), float("inf"), None, True])
def test_bad_gate_raises(gate_init):
    with pytest.raises(ValueError, match="combined: gate_init must be a finite number"):
        attnlab.create("combined", DIM, HEADS, gate_init=gate_init)


@pytest.mark.parametrize("name", ["proxima", "combined"])
@pytest.mark.parametrize("option", [dict(attn_drop=1.0), dict(proj_drop=-0.1), dict(scale=0.0)])
def test_bad_options_raise(name, option):
    with pytest.raises(ValueError, match=name):
        attnlab.create(name, DIM, HEADS, **option)


def test_bad_learn_sigma_raises():
    with pytest.raises(TypeError, match="learn_sigma must be a bool"):
        attnlab.create("proxima", DIM, HEADS, learn_sigma=1)


def test_fixed_sigma_is_a_buffer():
    m = attnlab.create("proxima", DIM, HEADS, learn_sigma=False, sigma=3.0)
    assert "log_sigma" not in dict(m.named_parameters())
    assert_close(m.log_sigma, torch.full((HEADS,), math.log(3.0)))


@pytest.mark.parametrize("name", ["proxima", "combined"])
def test_bad_mask_shape_names_shapes(name):
    m = make(name)
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        m(torch.randn(2, 5, DIM, dtype=torch.float64), attn_mask=torch.ones(2, 4, dtype=torch.bool))
