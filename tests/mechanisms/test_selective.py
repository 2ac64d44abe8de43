"""Selective self-attention (SSA, arXiv 2411.12892).

The default is the released code's computation (umich-sota/selective_attention,
lit_gpt/model_finetune_att.py::CausalSelfAttention.scaled_dot_product_attention), checked against a
naive float64 reference written here from that formula: outputs and gradients. The opt-in token and
value temperatures (attnlab's reading of the paper's Sec. 3) get their own reference. Also: the
limiting cases (temperatures off / beta -> inf is mhsa), the parameter budget, the position index
under a KV cache, gradcheck and bad input. Shared properties: tests/mechanisms/test_properties.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call
from torch.testing import assert_close

import attnlab
from attnlab import KVCache

DIM, HEADS = 32, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)
TEMP_PARAMS = ("tau_pos_beta", "tau_q_weight", "tau_v_weight")
FLAG_OF = {"tau_pos_beta": "pos_temp", "tau_q_weight": "query_temp", "tau_v_weight": "value_temp"}


def make(dim=DIM, heads=HEADS, *, beta=0.3, **kw):
    """A float64 SSA layer; beta set so that exp(-exp(beta)) ~ 0.26 (a visible position term)."""
    kw = {"qkv_bias": True, "temp_std": 0.5, **kw}
    m = attnlab.create("selective", dim, heads, **kw).double().eval()
    if m.tau_pos_beta is not None:
        with torch.no_grad():
            m.tau_pos_beta.fill_(beta)
    return m


def _split_qkv(m, x):
    B, N, _ = x.shape
    h, g, d = m.num_heads, m.num_kv_heads, m.head_dim
    qkv = x @ m.qkv.weight.T + (m.qkv.bias if m.qkv.bias is not None else 0)
    q = qkv[..., :h * d].reshape(B, N, h, d).transpose(1, 2)                  # (B, h, N, d)
    k = qkv[..., h * d:(h + g) * d].reshape(B, N, g, d).transpose(1, 2)       # (B, g, N, d)
    v = qkv[..., (h + g) * d:].reshape(B, N, g, d).transpose(1, 2)            # (B, g, N, d)
    rep = h // g
    return q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def released_reference(m, x, *, valid=None, is_causal=False):
    """The released code's SSA, written from its formula in float64:

        att = (q k^T) / sqrt(d)
        att = att * (1 + exp(-exp(beta)) * log(n)),   n = 1 .. N the query's row (1-based)
        att = att masked (causal / padding), softmax over keys, out = att v, then proj.
    A query row with no allowed key outputs zeros (attnlab's convention).
    """
    B, N, C = x.shape
    q, k, v = _split_qkv(m, x)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(m.head_dim)                     # (B, h, N, N)
    row = torch.arange(1, N + 1, dtype=x.dtype)[:, None]                        # (N, 1)
    att = att * (1 + torch.exp(-torch.exp(m.tau_pos_beta)) * torch.log(row))
    allowed = torch.ones(B, 1, N, N, dtype=torch.bool)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    if is_causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    att = att.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(att, dim=-1).nan_to_num(0.0)                          # empty rows -> 0
    out = (probs @ v).transpose(1, 2).reshape(B, N, C)
    return out @ m.proj.weight.T + m.proj.bias


def reading_reference(m, x, *, valid=None, is_causal=False, start=0):
    """The opt-in token / value terms (attnlab's reading), a loop over (batch, head, query):

    tau_q = 1 + exp(-exp(beta)) log(n) [pos_temp] + tanh(<w_h, q>) [query_temp], n = start + i + 1
    tau_v = 1 + tanh(<u_g, v>) [value_temp]
    out_i = sum_j softmax_j(tau_q,i q_i.k_j / sqrt(d)) tau_v,j v_j, then proj.
    """
    B, N, C = x.shape
    h, g, d = m.num_heads, m.num_kv_heads, m.head_dim
    qkv = x @ m.qkv.weight.T + (m.qkv.bias if m.qkv.bias is not None else 0)
    q = qkv[..., :h * d].reshape(B, N, h, d)
    k = qkv[..., h * d:(h + g) * d].reshape(B, N, g, d)
    v = qkv[..., (h + g) * d:].reshape(B, N, g, d)
    rows = []
    for b in range(B):
        heads = []
        for hh in range(h):
            gg = hh // (h // g)                      # the kv head this query head reads
            out_rows = []
            for i in range(N):
                tau_q = torch.ones((), dtype=x.dtype)
                if m.pos_temp:
                    tau_q = tau_q + torch.exp(-torch.exp(m.tau_pos_beta)) * math.log(start + i + 1)
                if m.query_temp:
                    tau_q = tau_q + torch.tanh(m.tau_q_weight[hh] @ q[b, i, hh])
                allowed = torch.ones(N, dtype=torch.bool)
                if valid is not None:
                    allowed &= valid[b]
                if is_causal:
                    allowed &= torch.arange(N) <= i
                if not allowed.any():
                    out_rows.append(torch.zeros(d, dtype=x.dtype))
                    continue
                scores = tau_q * (k[b, :, gg] @ q[b, i, hh]) / math.sqrt(d)        # (N,)
                probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=0)
                vals = v[b, :, gg]                                                   # (N, d)
                if m.value_temp:
                    vals = vals * (1 + torch.tanh(vals @ m.tau_v_weight[gg]))[:, None]
                out_rows.append(probs @ vals)
            heads.append(torch.stack(out_rows))                                    # (N, d)
        rows.append(torch.cat(heads, dim=-1))                                      # (N, h d)
    return torch.stack(rows) @ m.proj.weight.T + m.proj.bias


def outputs_and_grads(fn, m, x, seed=1):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((y * g).sum(), [x, *m.parameters()])
    return y, grads


def _assert_outputs_and_grads(m, fn, ref, x):
    y, grads = outputs_and_grads(fn, m, x)
    y_ref, grads_ref = outputs_and_grads(ref, m, x)
    assert_close(y, y_ref, rtol=1e-10, atol=1e-11)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=lambda s, n=name: f"grad of {n}: {s}")


CASES = {
    "full": dict(),
    "causal": dict(is_causal=True),
    "padding": dict(masked=True),
    "padding+causal": dict(masked=True, is_causal=True),
}


def _case_inputs(case, B=2, N=6):
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    valid = None
    if case.get("masked"):
        valid = torch.rand(B, N) > 0.4
        valid[:, 0] = True
        valid[1, 2] = False
    return x, valid, case.get("is_causal", False)


# --- the default: the released code's formula --------------------------------------------------

def test_default_is_the_released_configuration():
    m = attnlab.create("selective", DIM, HEADS)
    assert (m.pos_temp, m.query_temp, m.value_temp) == (True, False, False)
    assert m.tau_q_weight is None and m.tau_v_weight is None
    assert m.tau_pos_beta.shape == () and m.tau_pos_beta.item() == 2.0     # one beta per layer, init 2.0


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_default_matches_released_formula_outputs_and_grads(case, num_kv_heads):
    m = make(num_kv_heads=num_kv_heads)
    x, valid, causal = _case_inputs(case)
    _assert_outputs_and_grads(m, lambda t: m(t, attn_mask=valid, is_causal=causal),
                              lambda t: released_reference(m, t, valid=valid, is_causal=causal), x)


def test_default_at_released_init_matches_released_formula():
    """beta = 2.0 as released (exp(-exp(2)) ~ 6.2e-4) on a longer causal sequence."""
    m = attnlab.create("selective", DIM, HEADS, qkv_bias=True).double()
    x = torch.randn(2, 40, DIM, dtype=torch.float64)
    _assert_outputs_and_grads(m, lambda t: m(t, is_causal=True),
                              lambda t: released_reference(m, t, is_causal=True), x)


def test_position_term_changes_the_output():
    """The reference test above can fail: with beta = 0.3 the position term is not negligible."""
    m = make()
    ref = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True).double()
    ref.load_state_dict(m.state_dict(), strict=False)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    assert (m(x, is_causal=True) - ref(x, is_causal=True)).abs().max() > 1e-3


# --- opt-in token / value temperatures (attnlab's reading) -------------------------------------

@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_token_terms_match_reading_reference(case, num_kv_heads):
    m = make(num_kv_heads=num_kv_heads, query_temp=True, value_temp=True)
    x, valid, causal = _case_inputs(case)
    _assert_outputs_and_grads(m, lambda t: m(t, attn_mask=valid, is_causal=causal),
                              lambda t: reading_reference(m, t, valid=valid, is_causal=causal), x)


@pytest.mark.parametrize("flags", [dict(query_temp=True), dict(value_temp=True),
                                   dict(query_temp=True, pos_temp=False), dict(pos_temp=False, value_temp=True)],
                         ids=["pos+tok_q", "pos+v", "tok_q", "v"])
def test_each_temperature_combination_matches_reference(flags):
    m = make(**flags)
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    assert_close(m(x, is_causal=True), reading_reference(m, x, is_causal=True), rtol=1e-10, atol=1e-11)
    for name in TEMP_PARAMS:   # a switched-off temperature has no parameter
        on = flags.get(FLAG_OF[name], FLAG_OF[name] == "pos_temp")
        assert (getattr(m, name) is None) == (not on)


def test_temperature_values():
    """tau_q = 1 + exp(-exp(beta)) log n + tanh(<w, q>), tau_v = 1 + tanh(<u, v>), read via hooks."""
    m = make(query_temp=True, value_temp=True)
    seen = {}
    m.hook_tau_q.register_forward_hook(lambda mod, i, o: seen.__setitem__("q", o))
    m.hook_tau_v.register_forward_hook(lambda mod, i, o: seen.__setitem__("v", o))
    m.hook_q.register_forward_hook(lambda mod, i, o: seen.__setitem__("qraw", o))
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    m(x)
    q = seen["qraw"]                                                       # (B, h, N, d)
    n = torch.arange(1, 6, dtype=torch.float64)
    want = (1 + torch.exp(-torch.exp(m.tau_pos_beta)) * n.log()[None, :]
            + torch.tanh(torch.einsum("bhnd,hd->bhn", q, m.tau_q_weight)))[..., None]
    assert_close(seen["q"], want, **TIGHT)
    assert seen["v"].shape == (2, HEADS, 5, 1)
    assert ((seen["v"] > 0) & (seen["v"] < 2)).all()


# --- limiting cases: temperatures at 1 equal mhsa ----------------------------------------------

def _mhsa_and_ssa(**ssa_kw):
    mhsa = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True, num_kv_heads=ssa_kw.get("num_kv_heads")).double()
    ssa = attnlab.create("selective", DIM, HEADS, qkv_bias=True, temp_std=0.5, **ssa_kw).double()
    result = ssa.load_state_dict(mhsa.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(n for n in TEMP_PARAMS if getattr(ssa, n) is not None)
    return mhsa, ssa


def _compare_everywhere(mhsa, ssa):
    x = torch.randn(3, 7, DIM, dtype=torch.float64)
    valid = torch.rand(3, 7) > 0.3
    valid[:, 0] = True
    exact = dict(rtol=0, atol=0)
    assert_close(ssa(x), mhsa(x), **exact)
    assert_close(ssa(x, is_causal=True), mhsa(x, is_causal=True), **exact)
    assert_close(ssa(x, attn_mask=valid, is_causal=True), mhsa(x, attn_mask=valid, is_causal=True), **exact)
    c1, c2 = KVCache(), KVCache()
    for s, e in ((0, 4), (4, 5), (5, 7)):
        assert_close(ssa(x[:, s:e], is_causal=True, cache=c1), mhsa(x[:, s:e], is_causal=True, cache=c2), **exact)


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_temperatures_off_is_mhsa(num_kv_heads):
    mhsa, ssa = _mhsa_and_ssa(pos_temp=False, num_kv_heads=num_kv_heads)
    assert sum(p.numel() for p in ssa.parameters()) == sum(p.numel() for p in mhsa.parameters())
    ssa.load_state_dict(mhsa.state_dict())  # strict: the same parameters
    _compare_everywhere(mhsa, ssa)


def test_temperature_parameters_at_one_is_mhsa():
    """w = u = 0 gives tanh(0) = 0 and beta -> inf gives exp(-exp(beta)) = 0: every tau is 1."""
    mhsa, ssa = _mhsa_and_ssa(query_temp=True, value_temp=True)
    with torch.no_grad():
        ssa.tau_q_weight.zero_()
        ssa.tau_v_weight.zero_()
        ssa.tau_pos_beta.fill_(10.0)                 # exp(-exp(10)) underflows to 0
    _compare_everywhere(mhsa, ssa)


def test_default_init_is_close_to_mhsa():
    """A fresh layer (exp(-exp(2)) ~ 6.2e-4) starts close to plain attention, as in the released code."""
    mhsa = attnlab.create("mhsa", DIM, HEADS).double()
    ssa = attnlab.create("selective", DIM, HEADS).double()
    ssa.load_state_dict(mhsa.state_dict(), strict=False)
    x = torch.randn(2, 16, DIM, dtype=torch.float64)
    assert_close(ssa(x, is_causal=True), mhsa(x, is_causal=True), rtol=0, atol=1e-3)


# --- parameter budget --------------------------------------------------------------------------

@pytest.mark.parametrize("num_kv_heads", [12, 4])
def test_parameter_overhead(num_kv_heads):
    dim, heads = 768, 12
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    mhsa = attnlab.create("mhsa", dim, heads, qkv_bias=True, num_kv_heads=num_kv_heads, device="meta")
    ssa = attnlab.create("selective", dim, heads, qkv_bias=True, num_kv_heads=num_kv_heads, device="meta")
    assert count(ssa) - count(mhsa) == 1                                   # beta, one per layer
    full = attnlab.create("selective", dim, heads, qkv_bias=True, num_kv_heads=num_kv_heads,
                          query_temp=True, value_temp=True, device="meta")
    extra = count(full) - count(mhsa)
    head_dim = dim // heads
    assert extra == heads * head_dim + num_kv_heads * head_dim + 1        # w (h, d), u (h_kv, d), beta
    assert extra / count(mhsa) < 0.005
    assert extra < 2 * dim * heads   # without sharing a linear temperature head costs dim per head


# --- position index under a KV cache -----------------------------------------------------------

def test_position_temperature_uses_absolute_position_with_cache():
    m = make(beta=0.0)                               # exp(-exp(0)) = 1/e: tau_q = 1 + log(n) / e
    seen = []
    m.hook_tau_q.register_forward_hook(lambda mod, i, o: seen.append(o))
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    cache = KVCache()
    with torch.no_grad():
        m(x[:, :6], is_causal=True, cache=cache)
        y_chunk = m(x[:, 6:9], is_causal=True, cache=cache)
    want = lambda n: (1 + n.log() / math.e).expand(1, HEADS, 3).unsqueeze(-1)  # noqa: E731
    assert_close(seen[-1], want(torch.arange(7, 10, dtype=torch.float64)), **TIGHT)
    # The chunk equals rows 6..8 of the released formula over the whole prefix ...
    assert_close(y_chunk, released_reference(m, x, is_causal=True)[:, 6:9], rtol=1e-10, atol=1e-11)
    # ... and the offset matters: the same queries at positions 1..3 would get other temperatures.
    assert not torch.allclose(seen[-1], want(torch.arange(1, 4, dtype=torch.float64)))


@pytest.mark.parametrize("flags", [dict(), dict(query_temp=True, value_temp=True)], ids=["default", "tokens"])
@pytest.mark.parametrize("chunks", [[1] * 8, [5, 3], [2, 1, 5]], ids=["tokens", "5+3", "2+1+5"])
def test_cached_decoding_equals_full_causal_forward(chunks, flags):
    m = make(num_kv_heads=2, **flags)
    x = torch.randn(2, sum(chunks), DIM, dtype=torch.float64)
    full = m(x, is_causal=True)
    cache, outs, s = KVCache(), [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(m(x[:, s:s + n], is_causal=True, cache=cache))
            s += n
    assert_close(torch.cat(outs, 1), full, **TIGHT)


# --- gradcheck ---------------------------------------------------------------------------------

@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gradcheck(is_causal):
    m = make(dim=8, heads=2, num_kv_heads=1, query_temp=True, value_temp=True)
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, True, False, True]])
    params = {n: p.detach().clone().requires_grad_(True) for n, p in m.named_parameters() if n in TEMP_PARAMS}

    def fn(x, beta, w, u):
        return functional_call(m, {"tau_pos_beta": beta, "tau_q_weight": w, "tau_v_weight": u}, (x,),
                               {"attn_mask": valid, "is_causal": is_causal})

    assert torch.autograd.gradcheck(fn, (x, params["tau_pos_beta"], params["tau_q_weight"],
                                         params["tau_v_weight"]), eps=1e-6, atol=1e-7)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,exc,words", [
    (dict(query_temp="yes"), TypeError, ["query_temp", "bool", "yes"]),
    (dict(value_temp=1), TypeError, ["value_temp", "bool"]),
    (dict(pos_temp=None), TypeError, ["pos_temp", "bool"]),
    (dict(temp_std=-0.1), ValueError, ["temp_std", "-0.1"]),
    (dict(beta_init=float("nan")), ValueError, ["beta_init", "nan"]),
    (dict(beta_init="big"), TypeError, ["beta_init", "big", "str"]),
    (dict(num_kv_heads=3), ValueError, ["num_kv_heads", "4", "3"]),
    (dict(attn_drop=1.0), ValueError, ["attn_drop", "1.0"]),
    (dict(scale=float("inf")), ValueError, ["scale", "inf"]),
    (dict(qkv_bias="no"), TypeError, ["qkv_bias", "no"]),
], ids=lambda v: None)
def test_bad_options_raise_at_construction(kw, exc, words):
    with pytest.raises(exc) as info:
        attnlab.create("selective", DIM, HEADS, **kw)
    msg = str(info.value)
    assert "selective" in msg and all(w in msg for w in words), msg


def test_bad_cache_type_raises():
    m = make()
    with pytest.raises(TypeError, match="selective.*KVCache.*dict"):
        m(torch.randn(1, 3, DIM, dtype=torch.float64), cache={})


@pytest.mark.parametrize("shape", [(3, DIM), (1, 3, DIM + 1)])
def test_bad_input_shape_raises(shape):
    with pytest.raises(ValueError, match="selective"):
        make()(torch.randn(shape, dtype=torch.float64))


def test_bad_mask_raises_with_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        make()(torch.randn(2, 5, DIM, dtype=torch.float64), attn_mask=torch.ones(2, 4, dtype=torch.bool))
