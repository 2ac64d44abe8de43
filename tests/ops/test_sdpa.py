"""`attnlab.ops.sdpa`: `attention` backends against the oracle, and the oracle against the definition.

- `reference_attention` is checked against a plain Python loop over (b, h, i, j) written from
  the definition and the mask conventions of attnlab.masks (this guards the oracle).
- Every backend is checked against `reference_attention` by hypothesis over shapes (empty ones
  included), grouped-query heads, masks of every accepted form and `is_causal` with N != M
  (bottom-right aligned). FlexAttention has no backward on CPU, so it runs under no_grad.
- Dispatch: explicit backends never fall back; `use_backend` and ATTNLAB_BACKEND change the
  default; errors name what was expected and what was got.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import attnlab
from attnlab.ops import BackendUnavailable, attention, reference_attention

NEG_INF = float("-inf")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


# --- the definition, as a loop -----------------------------------------------------------------

def _as_4d(mask):
    """attnlab.masks convention: 2-D is key padding (B, M); fewer than 4 dims pad on the left."""
    if mask.dim() == 2:
        return mask[:, None, None, :]
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def loop_attention(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """out[b, i, n] = sum_j softmax_j(q_i . k_j * scale + mask_ij) v_j over allowed j; else 0."""
    B, h, N, d = q.shape
    h_kv, M, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask = None if attn_mask is None else _as_4d(attn_mask)
    out = torch.zeros(B, h, N, dv, dtype=torch.float64)
    for b in range(B):
        for hh in range(h):
            g = hh // (h // h_kv)                     # the kv head serving query head hh
            for i in range(N):
                logits = {}
                for j in range(M):
                    if is_causal and j > i + (M - N):
                        continue
                    s = sum(float(q[b, hh, i, c]) * float(k[b, g, j, c]) for c in range(d)) * scale
                    if mask is not None:
                        mv = mask[b if mask.shape[0] > 1 else 0, hh if mask.shape[1] > 1 else 0,
                                  i if mask.shape[2] > 1 else 0, j if mask.shape[3] > 1 else 0]
                        if mask.dtype == torch.bool:
                            if not bool(mv):
                                continue
                        else:
                            if float(mv) == NEG_INF:
                                continue
                            s += float(mv)
                    logits[j] = s
                if not logits:
                    continue                            # no allowed key: the row stays zero
                top = max(logits.values())
                weights = {j: math.exp(s - top) for j, s in logits.items()}
                total = sum(weights.values())
                for j, w in weights.items():
                    out[b, hh, i] += (w / total) * v[b, g, j].double()
    return out


def qkv(B, h, h_kv, N, M, d, dv=None, dtype=torch.float64, generator=None):
    dv = d if dv is None else dv
    q = torch.randn(B, h, N, d, dtype=dtype, generator=generator)
    k = torch.randn(B, h_kv, M, d, dtype=dtype, generator=generator)
    v = torch.randn(B, h_kv, M, dv, dtype=dtype, generator=generator)
    return q, k, v


def _float_mask(shape, p=0.3):
    m = torch.randn(shape, dtype=torch.float64)
    return m.masked_fill(torch.rand(shape) < p, NEG_INF)


ORACLE_CASES = {
    "plain": dict(),
    "causal_square": dict(is_causal=True, N=4, M=4),
    "causal_N<M": dict(is_causal=True, N=2, M=5),
    "causal_N>M": dict(is_causal=True, N=5, M=2),
    "padding_with_empty_sample": dict(mask=lambda B, h, N, M: torch.tensor([[True, False, True, True],
                                                                           [False] * 4])),
    "padding_(1,M)": dict(mask=lambda B, h, N, M: torch.tensor([[False, True, True, False]])),
    "bool_(1,h,N,M)": dict(mask=lambda B, h, N, M: torch.rand(1, h, N, M) > 0.5),
    "bool_3d_(h,N,M)": dict(mask=lambda B, h, N, M: torch.rand(h, N, M) > 0.5),
    "bool_(B,1,1,M)+causal": dict(mask=lambda B, h, N, M: torch.rand(B, 1, 1, M) > 0.3, is_causal=True),
    "float_with_-inf": dict(mask=lambda B, h, N, M: _float_mask((B, h, N, M))),
    "float_1d_(M,)+causal": dict(mask=lambda B, h, N, M: _float_mask((M,)), is_causal=True, N=3, M=4),
    "scale": dict(scale=0.7),
    "dv!=d": dict(dv=5),
}


@pytest.mark.parametrize("case", list(ORACLE_CASES.values()), ids=list(ORACLE_CASES))
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (2, 1)], ids=lambda t: f"h{t[0]}kv{t[1]}")
def test_reference_matches_definition(case, heads):
    B, (h, h_kv), N, M, d = 2, heads, case.get("N", 3), case.get("M", 4), 3
    q, k, v = qkv(B, h, h_kv, N, M, d, dv=case.get("dv"))
    mask = case["mask"](B, h, N, M) if "mask" in case else None
    kw = dict(attn_mask=mask, is_causal=case.get("is_causal", False), scale=case.get("scale"))
    out = reference_attention(q, k, v, **kw)
    assert out.shape == (B, h, N, v.shape[-1])
    assert_close(out, loop_attention(q, k, v, **kw), rtol=1e-12, atol=1e-12)


def test_definition_loop_is_not_trivial():
    """The loop itself: a single key gives exactly that key's value; uniform scores average."""
    q = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    k = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    v = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    assert_close(loop_attention(q, k, v), v.mean(2, keepdim=True))
    only_1 = torch.tensor([[False, True, False]])
    assert_close(loop_attention(q, k, v, attn_mask=only_1), v[:, :, 1:2])


# --- hypothesis: every backend against the oracle ----------------------------------------------

MASK_KINDS = ("none", "bool", "padding", "float")


@st.composite
def attention_cases(draw, mask_kinds=MASK_KINDS, dtypes=(torch.float64, torch.float32), same_dv=True):
    # sampled_from spreads draws evenly (integers() favours the small end); a size of 0 comes
    # up about one time in ten for B and one in 28 for N and M, so most cases are not empty.
    B = draw(st.sampled_from([0] + [1, 2, 3] * 3))
    h = draw(st.sampled_from([1, 2, 4]))
    h_kv = draw(st.sampled_from([g for g in (1, 2, 4) if h % g == 0]))
    lengths = st.sampled_from([0] + list(range(1, 10)) * 3)
    N, M = draw(lengths), draw(lengths)
    d = draw(st.sampled_from(range(1, 9)))
    dv = d if same_dv else draw(st.sampled_from(range(1, 9)))
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(mask_kinds))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    p_masked = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    mask = None
    if kind == "bool":       # any broadcastable 3-D or 4-D shape
        shape = [draw(st.sampled_from([full, 1])) for full in (B, h, N, M)]
        if draw(st.booleans()) and shape[0] == 1:
            shape = shape[1:]
        mask = torch.rand(shape, generator=gen) >= p_masked
    elif kind == "padding":  # (B, M) or (1, M) key padding
        mask = torch.rand(draw(st.sampled_from([B, 1])), M, generator=gen) >= p_masked
    elif kind == "float":    # additive, some -inf
        shape = [draw(st.sampled_from([full, 1])) for full in (B, h, N, M)]
        mask = torch.randn(shape, generator=gen, dtype=dtype)
        mask = mask.masked_fill(torch.rand(shape, generator=gen) < p_masked, NEG_INF)
    q = torch.randn(B, h, N, d, generator=gen, dtype=dtype)
    k = torch.randn(B, h_kv, M, d, generator=gen, dtype=dtype)
    v = torch.randn(B, h_kv, M, dv, generator=gen, dtype=dtype)
    return dict(q=q, k=k, v=v, attn_mask=mask, is_causal=draw(st.booleans()),
                scale=draw(st.sampled_from([None, 0.5])))


def allowed_rows(case):
    """(B, h, N, 1) bool: which query rows have at least one allowed key (independent of attnlab)."""
    q, k = case["q"], case["k"]
    B, h, N, M = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    allowed = torch.ones(B, h, N, M, dtype=torch.bool)
    if case["is_causal"]:
        allowed &= torch.arange(M)[None, :] <= torch.arange(N)[:, None] + (M - N)
    mask = case["attn_mask"]
    if mask is not None:
        mask = _as_4d(mask)
        allowed &= mask if mask.dtype == torch.bool else mask != NEG_INF
    return allowed.any(-1, keepdim=True)


def check_against_reference(case, backend):
    kw = dict(attn_mask=case["attn_mask"], is_causal=case["is_causal"], scale=case["scale"])
    q, k, v = case["q"], case["k"], case["v"]
    out = attention(q, k, v, backend=backend, **kw)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert_close(out, reference_attention(q, k, v, **kw), **TOL[q.dtype])
    empty = ~allowed_rows(case)
    assert torch.equal(out.masked_select(empty), torch.zeros_like(out.masked_select(empty)))


@settings(max_examples=100)
@given(case=attention_cases(same_dv=False))
def test_sdpa_matches_reference(case):
    check_against_reference(case, "sdpa")


@settings(max_examples=30)   # eager FlexAttention on CPU costs ~50 ms a call
@given(case=attention_cases())
def test_flex_matches_reference(case):
    with torch.no_grad():
        check_against_reference(case, "flex")


@given(case=attention_cases(dtypes=(torch.float64,), same_dv=False))
def test_auto_backend_matches_reference(case):
    check_against_reference(case, None)


@settings(max_examples=40)
@given(case=attention_cases(dtypes=(torch.float64,), same_dv=False))
def test_sdpa_gradients_match_reference(case):
    q, k, v = (case[n].clone().requires_grad_(True) for n in "qkv")
    kw = dict(attn_mask=case["attn_mask"], is_causal=case["is_causal"], scale=case["scale"])
    cot = torch.randn(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    g = torch.autograd.grad((attention(q, k, v, backend="sdpa", **kw) * cot).sum(), (q, k, v))
    g_ref = torch.autograd.grad((reference_attention(q, k, v, **kw) * cot).sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        assert torch.isfinite(a).all()
        assert_close(a, b, rtol=1e-9, atol=1e-11)


# --- fully masked rows -------------------------------------------------------------------------

EMPTY_ROW_CASES = {
    "bool_row": lambda B, h, N, M: torch.ones(B, h, N, M, dtype=torch.bool).index_fill(
        2, torch.tensor([1]), False),
    "padding_all_false": lambda B, h, N, M: torch.tensor([[True] * M, [False] * M]),
    "float_row_-inf": lambda B, h, N, M: torch.zeros(B, 1, N, M, dtype=torch.float64).index_fill(
        2, torch.tensor([0, 2]), NEG_INF),
    "causal_N>M": None,
}


@pytest.mark.parametrize("backend", ["sdpa", "reference", "flex"])
@pytest.mark.parametrize("case", list(EMPTY_ROW_CASES), ids=list(EMPTY_ROW_CASES))
def test_fully_masked_rows_are_zero_with_finite_grads(case, backend):
    B, h, N, M, d = 2, 2, 4, 3 if case == "causal_N>M" else 4, 3
    q, k, v = (t.requires_grad_(backend != "flex") for t in qkv(B, h, 1, N, M, d))
    make = EMPTY_ROW_CASES[case]
    mask = make(B, h, N, M) if make else None
    is_causal = case == "causal_N>M"
    with torch.set_grad_enabled(backend != "flex"):
        out = attention(q, k, v, attn_mask=mask, is_causal=is_causal, backend=backend)
    empty = ~allowed_rows(dict(q=q, k=k, attn_mask=mask, is_causal=is_causal))
    assert empty.any() and (~empty).any()
    assert torch.equal(out.masked_select(empty), torch.zeros(int(empty.sum()) * d, dtype=torch.float64))
    assert torch.isfinite(out).all()
    if backend != "flex":
        gq, gk, gv = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in (gq, gk, gv))
        assert torch.equal(gq.masked_select(empty), torch.zeros_like(gq.masked_select(empty)))


@pytest.mark.parametrize("backend", ["sdpa", "reference", "flex"])
@pytest.mark.parametrize("shape", [(0, 2, 3, 4), (2, 2, 0, 4), (2, 2, 3, 0)], ids=["B=0", "N=0", "M=0"])
def test_empty_shapes_give_zeros(backend, shape):
    B, h, N, M = shape
    q, k, v = qkv(B, h, h, N, M, 3)
    out = attention(q, k, v, is_causal=True, backend=backend)
    assert out.shape == (B, h, N, 3)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["sdpa", "reference", "flex"])
def test_constant_finite_bias_leaves_output_unchanged(backend, dtype):
    """softmax is shift-invariant: adding one finite value to every key of a row changes nothing.

    -1e5 is finite in the float32 mask but beyond float16's range (65504): casting the mask to
    q's dtype must not turn it into -inf (which would make the row "fully masked" -> zeros).
    """
    q, k, v = qkv(1, 2, 2, 3, 4, 4, dtype=dtype)
    bias = torch.full((1, 1, 3, 4), -1e5)          # float32, like HF's extended attention masks
    with torch.no_grad():
        out = attention(q, k, v, attn_mask=bias, backend=backend)
        plain = attention(q, k, v, backend=backend)
    assert torch.isfinite(out).all()
    # float32 scores absorb part of q.k next to 1e5 (spacing 2**-7), hence the loose tolerance.
    assert_close(out.float(), plain.float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_low_precision_output_dtype(backend):
    q, k, v = qkv(2, 2, 2, 5, 6, 4, dtype=torch.bfloat16)
    out = attention(q, k, v, is_causal=True, backend=backend)
    assert out.dtype == torch.bfloat16
    ref = loop_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_close(out.double(), ref, rtol=1.6e-2, atol=1e-2)


# --- dispatch ----------------------------------------------------------------------------------

def _small(requires_grad=False):
    q, k, v = qkv(1, 2, 2, 3, 3, 4)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def test_auto_picks_in_priority_order(backend_spy):
    ran, refuse = backend_spy.ran, backend_spy.refuse
    attention(*_small())
    assert ran == ["sdpa"]
    refuse("sdpa", "refused for the test")
    attention(*_small())                       # next in line without grad: flex
    attention(*_small(requires_grad=True))     # flex has no CPU backward: reference
    assert ran == ["sdpa", "flex", "reference"]


def test_no_backend_fits_lists_every_reason(backend_spy):
    refuse = backend_spy.refuse
    for name in ("sdpa", "flex", "reference"):
        refuse(name, f"{name} refused for the test")
    with pytest.raises(BackendUnavailable) as info:
        attention(*_small())
    msg = str(info.value)
    for name in ("sdpa", "flex", "reference"):
        assert f"{name} refused for the test" in msg, msg


@pytest.mark.parametrize("backend", ["sdpa", "flex", "reference"])
def test_explicit_backend_never_falls_back(backend_spy, backend):
    ran, refuse = backend_spy.ran, backend_spy.refuse
    refuse(backend, "refused for the test")
    with pytest.raises(BackendUnavailable) as info:
        attention(*_small(), backend=backend)
    assert f"'{backend}'" in str(info.value) and "refused for the test" in str(info.value)
    assert ran == []


def test_flex_refusals_name_their_reason():
    with pytest.raises(BackendUnavailable, match=r"'flex'.*backward on CPU"):
        attention(*_small(requires_grad=True), backend="flex")
    with pytest.raises(BackendUnavailable, match=r"'flex'.*dropout"):
        attention(*_small(), backend="flex", dropout_p=0.1)
    q, k, _ = _small()
    with pytest.raises(BackendUnavailable, match=r"'flex'.*head dim"):
        attention(q, k, torch.randn(1, 2, 3, 5, dtype=torch.float64), backend="flex")


def test_unknown_backend_raises_value_error():
    with pytest.raises(ValueError, match="bogus"):
        attention(*_small(), backend="bogus")
    with pytest.raises(ValueError, match="bogus"):
        with attnlab.use_backend("bogus"):
            pass


def test_use_backend_nests_and_restores(backend_spy):
    ran = backend_spy.ran
    assert attnlab.ops.default_backend() is None
    with attnlab.use_backend("reference"):
        attention(*_small())
        with attnlab.use_backend("flex"):
            assert attnlab.ops.default_backend() == "flex"
            attention(*_small())
            with pytest.raises(BackendUnavailable):
                attention(*_small(requires_grad=True))      # the default is explicit: no fallback
        attention(*_small())
        attention(*_small(), backend="sdpa")                # an explicit argument wins
    attention(*_small())
    assert ran == ["reference", "flex", "reference", "sdpa", "sdpa"]
    assert attnlab.ops.default_backend() is None


def test_env_var_changes_the_default(monkeypatch, backend_spy):
    ran = backend_spy.ran
    monkeypatch.setenv("ATTNLAB_BACKEND", "reference")
    attention(*_small())
    with attnlab.use_backend("flex"):                       # the context manager beats the env
        attention(*_small())
    monkeypatch.setenv("ATTNLAB_BACKEND", "")               # empty means unset
    attention(*_small())
    assert ran == ["reference", "flex", "sdpa"]
    monkeypatch.setenv("ATTNLAB_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        attention(*_small())


def test_dropout_is_applied_and_validated():
    q, k, v = _small()
    torch.manual_seed(1)
    a = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(2)
    b = attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(a, b)
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout_p"):
            attention(q, k, v, dropout_p=p)


# --- input errors name expected and got --------------------------------------------------------

def test_wrong_rank_names_shape():
    q, k, v = _small()
    with pytest.raises(ValueError) as info:
        attention(q[0], k, v)
    msg = str(info.value)
    assert "q" in msg and "4-D" in msg and "(2, 3, 4)" in msg, msg


def test_dtype_mismatch_names_dtypes():
    q, k, v = _small()
    with pytest.raises(TypeError) as info:
        attention(q, k.float(), v)
    msg = str(info.value)
    assert "torch.float64" in msg and "torch.float32" in msg, msg


def test_int_input_raises_type_error():
    q, k, v = _small()
    with pytest.raises(TypeError, match="int64"):
        attention(q.long(), k, v)


def test_head_dim_mismatch_names_shapes():
    q, k, v = _small()
    with pytest.raises(ValueError) as info:
        attention(q, k[..., :3], v)
    msg = str(info.value)
    assert "(1, 2, 3, 4)" in msg and "(1, 2, 3, 3)" in msg, msg


@pytest.mark.parametrize("which,shape", [("batch", (2, 2, 3, 4)), ("heads", (1, 3, 3, 4))])
def test_kv_batch_and_heads_mismatch(which, shape):
    q, _, _ = _small()
    k = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        attention(q, k, k.clone())
    msg = str(info.value)
    if which == "batch":
        assert "(1, 2, 3, 4)" in msg and "(2, 2, 3, 4)" in msg, msg
    else:
        assert "(2)" in msg and "(3)" in msg, msg


def test_k_v_length_mismatch():
    q, k, v = _small()
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4\).*\(1, 2, 2, 4\)"):
        attention(q, k, v[:, :, :2])


@pytest.mark.parametrize("mask,error", [
    (torch.ones(1, 4, dtype=torch.bool), ValueError),            # key padding with M + 1
    (torch.ones(1, 3, 3, 3, dtype=torch.bool), ValueError),      # 3 heads, have 2
    (torch.ones(1, 1, 1, 1, 1, dtype=torch.bool), ValueError),   # 5-D
    (torch.ones(1, 3, dtype=torch.int64), TypeError),
    ([[True, True, True]], TypeError),
    (torch.full((1, 3), float("nan"), dtype=torch.float64), ValueError),
], ids=["pad_M+1", "heads", "5d", "int64", "list", "nan"])
def test_bad_masks_raise(mask, error):
    with pytest.raises(error):
        attention(*_small(), attn_mask=mask)


def test_score_and_prob_hooks_run_on_the_reference_backend_only():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    seen = []
    uniform = lambda p: seen.append(p.shape) or torch.full_like(p, 1 / p.shape[-1])  # noqa: E731
    out = attention(q, k, v, backend="reference", scores_hook=lambda s: seen.append(s.shape) or s,
                    probs_hook=uniform)
    assert seen == [(1, 2, 5, 5), (1, 2, 5, 5)]
    torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand_as(out))   # uniform probs: the mean of v
    seen.clear()
    attention(q, k, v, backend="sdpa", scores_hook=uniform, probs_hook=uniform)
    assert seen == []
