"""minimal against the paper's formulas, against mhsa, parameter arithmetic, cache, gradcheck.

"Reducing the Transformer Architecture to a Minimum" (2024). The naive reference below is written
from the equations with the module's own parameters, in float64, sharing no code with attnlab:
    scores_h = x_i^T W_h x_j * scale, W_h = W_q,h W_k,h^T (two matrices), one matrix (collapsed),
               or a symmetric matrix (rebuilt here entry by entry from its upper triangle);
    P_h = softmax over allowed keys (a query with no allowed key: P_h row = 0);
    out = concat_h P_h (X W_v,h + b_v,h) W_o + b_o      (collapse_vo="separate")
        = sum_h P_h X W_vo,h + b_vo                     (collapse_vo="one")
        = (1/h) sum_h P_h X                             (collapse_vo="none").
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.testing import assert_close

import attnlab
from attnlab import KVCache

DIM, HEADS = 32, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)
MinimalAttention = attnlab.get_spec("minimal").cls

CONFIGS = {
    f"{'cqk' if cqk else 'qk'}{'-sym' if sym else ''}-{vo}": dict(collapse_qk=cqk, symmetric=sym, collapse_vo=vo)
    for cqk, sym, vo in itertools.product([False, True], [False, True], ["separate", "one", "none"])
}


def with_biases(cfg):
    """Every bias the configuration has room for (so the reference sees them too)."""
    vo = cfg["collapse_vo"]
    return dict(cfg, qkv_bias=not cfg["collapse_qk"] or vo == "separate", proj_bias=vo != "none")


def minimal(dtype=torch.float64, dim=DIM, heads=HEADS, **options):
    m = attnlab.create("minimal", dim, heads, **options).to(dtype).eval()
    with torch.no_grad():  # biases start at zero; random ones make the test see them
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.5)
    return m


# --- the naive reference -----------------------------------------------------------------------

def symmetric_from_upper(p, C):
    """(h, C(C+1)/2) upper triangle, row by row -> (h, C, C) symmetric, entry by entry."""
    entries = {}
    idx = 0
    for i in range(C):
        for j in range(i, C):
            entries[i, j] = entries[j, i] = p[:, idx]
            idx += 1
    return torch.stack([torch.stack([entries[i, j] for j in range(C)], -1) for i in range(C)], -2)


def linear(x, layer):
    return F.linear(x, layer.weight, layer.bias)


def naive_minimal(m, x, attn_mask=None, is_causal=False):
    B, N, C = x.shape
    h = m.num_heads
    d = C // h
    heads = lambda t: t.reshape(B, N, h, -1).transpose(1, 2)                 # noqa: E731
    if m.collapse_qk:
        W = symmetric_from_upper(m.qk_triu, C) if m.symmetric else m.qk_weight   # (h, C, C)
        scores = torch.einsum("bnc,hce,bme->bhnm", x, W, x) * m.scale
    else:
        qk = linear(x, m.qk)
        q = heads(qk[..., :C])
        k = q if m.symmetric else heads(qk[..., C:])
        scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * m.scale
    allowed = torch.ones(B, 1, N, N, dtype=torch.bool)
    if is_causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    if attn_mask is not None:
        allowed = allowed & (attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask)
    has_key = allowed.any(-1, keepdim=True)
    probs = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0).softmax(-1) * has_key
    if m.collapse_vo == "separate":
        v = heads(linear(x, m.v))                                             # (B, h, N, d)
        out = torch.einsum("bhnm,bhmd->bnhd", probs, v).reshape(B, N, C)
        return linear(out, m.proj)
    if m.collapse_vo == "one":
        out = torch.einsum("bhnm,bmc,hce->bne", probs, x, m.vo_weight)
        return out if m.vo_bias is None else out + m.vo_bias
    return torch.einsum("bhnm,bmc->bnc", probs, x) / h


def outputs_and_grads(fn, m, x, cotangent):
    y = fn(x)
    params = list(m.parameters())
    grads = torch.autograd.grad((y * cotangent).sum(), [x, *params])
    return y, grads


CASES = {
    "plain": dict(),
    "padding+causal": dict(mask="padding", is_causal=True),
    "pattern": dict(mask="pattern"),
}


def make_mask(kind, B, N):
    if kind is None:
        return None
    if kind == "padding":
        valid = torch.rand(B, N) > 0.4
        valid[:, 0] = True
        valid[1, :] = False if B > 2 else valid[1, :]    # with B > 2 one sample is all padding
        return valid
    pattern = torch.rand(B, 1, N, N) > 0.5
    pattern[0, 0, 2] = False                             # one query row with no allowed key
    return pattern


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_matches_naive_reference_outputs_and_grads(cfg, case):
    m = minimal(**with_biases(cfg))
    B, N = 3, 6
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = make_mask(case.get("mask"), B, N)
    is_causal = case.get("is_causal", False)
    cot = torch.randn(B, N, DIM, dtype=torch.float64)
    y, grads = outputs_and_grads(lambda t: m(t, attn_mask=mask, is_causal=is_causal), m, x, cot)
    y_ref, grads_ref = outputs_and_grads(lambda t: naive_minimal(m, t, mask, is_causal), m, x, cot)
    assert_close(y, y_ref, **TIGHT)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, **GRAD)


def test_float32_matches_naive_float64():
    m = minimal(dtype=torch.float32, collapse_qk=True, symmetric=True, collapse_vo="one", proj_bias=True)
    x = torch.randn(2, 9, DIM)
    y = m(x, is_causal=True)
    assert y.dtype == torch.float32
    assert_close(y.double(), naive_minimal(m.double(), x.double(), is_causal=True), rtol=1e-5, atol=1e-6)


# --- the limiting case: collapsing W_q W_k^T reproduces mhsa -----------------------------------

def mhsa_and_collapsed(qkv_bias=False):
    mhsa = attnlab.create("mhsa", DIM, HEADS, qkv_bias=qkv_bias).double().eval()
    m = minimal(collapse_qk=True, collapse_vo="separate", qkv_bias=qkv_bias, proj_bias=True)
    C, h, d = DIM, HEADS, DIM // HEADS
    with torch.no_grad():
        w_q, w_k, w_v = mhsa.qkv.weight.split(C)                 # (C_out, C_in) each
        for i in range(h):
            rows = slice(i * d, (i + 1) * d)
            m.qk_weight[i] = w_q[rows].T @ w_k[rows]             # W_q,i W_k,i^T, (C, C)
        m.v.weight.copy_(w_v)
        if qkv_bias:
            m.v.bias.copy_(mhsa.qkv.bias[2 * C:])
        m.proj.weight.copy_(mhsa.proj.weight)
        m.proj.bias.copy_(mhsa.proj.bias)
    return mhsa, m


def test_collapsed_scores_equal_mhsa_scores():
    mhsa, m = mhsa_and_collapsed()
    captured = {}
    mhsa.hook_q.register_forward_hook(lambda mod, inp, out: captured.setdefault("q", out))
    mhsa.hook_k.register_forward_hook(lambda mod, inp, out: captured.setdefault("k", out))
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    mhsa(x)
    d = DIM // HEADS
    scores_mhsa = captured["q"] @ captured["k"].transpose(-2, -1) * d ** -0.5     # (B, h, N, N)
    assert_close(m.scores(x), scores_mhsa, **TIGHT)
    assert_close(m.similarity_matrices(), m.qk_weight, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_collapsed_module_equals_mhsa(case):
    mhsa, m = mhsa_and_collapsed()
    B, N = 3, 6
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = make_mask(case.get("mask"), B, N)
    is_causal = case.get("is_causal", False)
    y = m(x, attn_mask=mask, is_causal=is_causal)
    y_mhsa = mhsa(x, attn_mask=mask, is_causal=is_causal)
    assert_close(y, y_mhsa, **TIGHT)
    cot = torch.randn_like(y)
    (gx,), (gx_mhsa,) = torch.autograd.grad((y * cot).sum(), [x]), torch.autograd.grad((y_mhsa * cot).sum(), [x])
    assert_close(gx, gx_mhsa, **GRAD)


def test_uncollapsed_module_equals_mhsa_with_biases():
    mhsa = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True).double().eval()
    m = minimal(collapse_qk=False, collapse_vo="separate", qkv_bias=True, proj_bias=True)
    C = DIM
    with torch.no_grad():
        m.qk.weight.copy_(mhsa.qkv.weight[:2 * C])
        m.qk.bias.copy_(mhsa.qkv.bias[:2 * C])
        m.v.weight.copy_(mhsa.qkv.weight[2 * C:])
        m.v.bias.copy_(mhsa.qkv.bias[2 * C:])
        m.proj.load_state_dict(mhsa.proj.state_dict())
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    valid = make_mask("padding", 2, 7)
    assert_close(m(x, attn_mask=valid, is_causal=True), mhsa(x, attn_mask=valid, is_causal=True), **TIGHT)
    # Without q/k biases the uncollapsed module and its collapsed form (W_h = W_q,h W_k,h^T) agree.
    m_nobias = minimal(collapse_qk=False, collapse_vo="none")
    collapsed_none = minimal(collapse_qk=True, collapse_vo="none")
    with torch.no_grad():
        collapsed_none.qk_weight.copy_(m_nobias.similarity_matrices())
    assert_close(collapsed_none(x, is_causal=True), m_nobias(x, is_causal=True), **TIGHT)


# --- symmetric similarity ----------------------------------------------------------------------

@pytest.mark.parametrize("collapse_qk", [False, True], ids=["qk", "collapsed"])
def test_symmetric_scores_are_symmetric(collapse_qk):
    m = minimal(collapse_qk=collapse_qk, symmetric=True)
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    s = m.scores(x)
    assert_close(s, s.transpose(-2, -1), **TIGHT)
    asym = minimal(collapse_qk=collapse_qk, symmetric=False).scores(x)
    assert not torch.allclose(asym, asym.transpose(-2, -1))       # the test can see asymmetry
    if not collapse_qk:  # W = W_q W_q^T is positive semi-definite: every token is similar to itself
        assert (s.diagonal(dim1=-2, dim2=-1) >= 0).all()


# --- parameter arithmetic ----------------------------------------------------------------------

def numel(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_parameter_count_formula_matches_numel(cfg, heads):
    for opts in (cfg, with_biases(cfg)):
        m = attnlab.create("minimal", DIM, heads, **opts)
        assert numel(m) == MinimalAttention.parameter_count_formula(DIM, heads, **opts) \
            == m.parameter_count_formula(DIM, heads, **opts)


def test_parameter_arithmetic_of_the_paper():
    C = DIM
    count = lambda h, **o: numel(attnlab.create("minimal", C, h, **o))                      # noqa: E731
    original = count(1, collapse_qk=False, collapse_vo="separate")
    assert original == 4 * C * C                                        # W_q, W_k, W_v, W_o
    # single head: W_q W_k^T collapses into one matrix of the same size as W_q
    assert count(1, collapse_qk=True, collapse_vo="separate") == 3 * C * C
    assert count(1, collapse_qk=True, collapse_vo="one") == 2 * C * C
    assert count(1, collapse_qk=True, collapse_vo="none") == C * C
    # symmetric similarity: half the parameters of the asymmetric one
    assert count(1, collapse_qk=False, symmetric=True, collapse_vo="none") == C * C              # vs 2 C^2
    assert count(1, collapse_qk=True, symmetric=True, collapse_vo="none") == C * (C + 1) // 2    # vs C^2
    # multi-head: collapsing costs h C^2 against 2 C^2, so it only saves with h < 2
    assert count(4, collapse_qk=True, collapse_vo="one") == 4 * C * C + 4 * C * C
    assert count(4, collapse_qk=False, collapse_vo="separate") == 4 * C * C
    # a block without MLP keeps only the attention (and its norm): with the usual MLP ratio 4 the
    # layer's weights go from 4 C^2 + 8 C^2 to C^2, the ~90 % saving of the paper's abstract.
    block = attnlab.Block(C, 1, mechanism=("minimal", dict(collapse_vo="none")), mlp_ratio=0)
    assert block.mlp is None
    assert numel(block) == C * C + numel(block.norm1)
    assert 1 - C * C / (4 * C * C + 8 * C * C) == pytest.approx(11 / 12)


# --- causal, masks and the KV cache over every configuration -----------------------------------

@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_kv_cache_decode_matches_full_causal_forward(cfg):
    m = minimal(**with_biases(cfg))
    B, N = 2, 7
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    valid = make_mask("padding", B, N)
    full = m(x, attn_mask=valid, is_causal=True)
    cache, outs, start = KVCache(), [], 0
    with torch.no_grad():
        for n in (1, 3, 1, 2):
            end = start + n
            outs.append(m(x[:, start:end], attn_mask=valid[:, :end], is_causal=True, cache=cache))
            start = end
    assert len(cache) == N
    assert_close(torch.cat(outs, 1), full, **TIGHT)


def test_collapsed_cache_holds_the_inputs():
    m = minimal(collapse_qk=True, collapse_vo="none")
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    cache = KVCache()
    m(x, is_causal=True, cache=cache)
    assert cache.keys.shape == (2, 1, 5, DIM) and cache.values.shape == (2, 1, 5, 0)
    assert_close(cache.keys[:, 0], x, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_causal_no_leak_and_masked_keys(cfg):
    m = minimal(**with_biases(cfg))
    x = torch.randn(2, 8, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 5:] = 3 * torch.randn(2, 3, DIM, dtype=torch.float64)
    assert_close(m(x2, is_causal=True)[:, :5], m(x, is_causal=True)[:, :5], **TIGHT)
    assert not torch.allclose(m(x2)[:, :5], m(x)[:, :5])
    valid = make_mask("padding", 2, 8)
    x3 = x.clone()
    x3[~valid] = 1e3 * torch.randn(int((~valid).sum()), DIM, dtype=torch.float64)
    assert_close(m(x3, attn_mask=valid)[valid], m(x, attn_mask=valid)[valid], **TIGHT)


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_fully_masked_rows_are_finite_with_finite_grads(cfg):
    m = minimal(**with_biases(cfg))
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1] = False
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    y = m(x, attn_mask=valid, is_causal=True)
    assert torch.isfinite(y).all()
    assert_close(y[1], y[1, :1].expand(5, DIM), rtol=0, atol=0)
    grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))


@pytest.mark.parametrize("cfg", [CONFIGS["cqk-sym-separate"], CONFIGS["cqk-one"], CONFIGS["qk-none"]],
                         ids=["cqk-sym-separate", "cqk-one", "qk-none"])
def test_backends_agree(cfg):
    m = minimal(**with_biases(cfg))
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    valid = make_mask("padding", 2, 6)
    outs = {}
    for backend in ("sdpa", "reference"):
        m.backend = backend
        outs[backend] = m(x, attn_mask=valid, is_causal=True)
    assert_close(outs["sdpa"], outs["reference"], **TIGHT)


@pytest.mark.parametrize("cfg", [dict(), dict(collapse_vo="separate", symmetric=True)], ids=["default", "cqk-sym-sep"])
def test_flex_forward_matches_reference_backend(cfg):
    m = minimal(**cfg)      # collapse_qk: q, k and v all C wide, as FlexAttention needs here
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    valid = make_mask("padding", 2, 7)
    outs = {}
    with torch.no_grad():
        for backend in ("flex", "reference"):
            m.backend = backend
            outs[backend] = m(x, attn_mask=valid, is_causal=True)
    assert_close(outs["flex"], outs["reference"], **TIGHT)


def test_bf16_close_to_float32():
    m16 = minimal(dtype=torch.bfloat16, collapse_qk=True, collapse_vo="separate")
    m32 = minimal(dtype=torch.float32, collapse_qk=True, collapse_vo="separate")
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    x = torch.randn(2, 9, DIM, dtype=torch.bfloat16)
    y16 = m16(x, is_causal=True)
    assert y16.dtype == torch.bfloat16
    assert_close(y16.float(), m32(x.float(), is_causal=True), rtol=2e-2, atol=2e-2)


# --- gradcheck ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [CONFIGS["cqk-sym-one"], CONFIGS["qk-sym-none"], CONFIGS["cqk-separate"]],
                         ids=["cqk-sym-one", "qk-sym-none", "cqk-separate"])
def test_gradcheck(cfg):
    m = minimal(dim=4, heads=2, **with_biases(cfg))
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, False, True], [False, False, False]])   # sample 1: no key at all
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())

    def fn(x, *ps):
        return functional_call(m, dict(zip(names, ps)), (x,), dict(attn_mask=valid, is_causal=True))

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options,error,words", [
    (dict(collapse_vo="bogus"), ValueError, ["collapse_vo", "'none'", "bogus"]),
    (dict(collapse_vo=2), ValueError, ["collapse_vo", "2"]),
    (dict(collapse_vo=1), ValueError, ["collapse_vo", "1"]),     # 1 == True, but not a bool
    (dict(collapse_qk="yes"), TypeError, ["collapse_qk", "bool", "yes"]),
    (dict(symmetric=1), TypeError, ["symmetric", "bool", "int"]),
    (dict(collapse_qk=True, collapse_vo="none", qkv_bias=True), ValueError, ["qkv_bias", "collapse_vo"]),
    (dict(collapse_vo="none", proj_bias=True), ValueError, ["proj_bias", "'none'"]),
    (dict(scale=-1.0), ValueError, ["scale", "-1.0"]),
    (dict(attn_drop=1.0), ValueError, ["attn_drop", "1.0"]),
])
def test_bad_options_raise_at_construction(options, error, words):
    with pytest.raises(error) as info:
        attnlab.create("minimal", DIM, HEADS, **options)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_input_raises():
    m = minimal()
    with pytest.raises(ValueError, match=r"minimal.*\(B, N, C=32\).*\(5, 32\)"):
        m(torch.randn(5, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="minimal.*32.*31"):
        m.scores(torch.randn(2, 5, DIM - 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="minimal.*float.*int64"):
        m(torch.zeros(2, 5, DIM, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        m(torch.randn(2, 5, DIM, dtype=torch.float64), attn_mask=torch.ones(3, 5, dtype=torch.bool))
