"""MoH (Mixture-of-Head attention) against naive float64 references of the released code and of
the paper's equations.

`reference_moh` is written from Sec. 3.2 of the paper, token by token and head by head, in
the summation form of Eq. 4 (Σ_i g_i H^i W_O^i, each head's own slice of the output
projection) rather than the module's gate-then-concatenate-then-project, with the gates of
Eq. 5-6 and the load-balance loss of Eq. 7 computed from their definitions; `official=True`
adds the scaling of the authors' released code (see the module docstring). `released_moh` is
the released layer itself (SkyworkAI/MoH, MoH-DiT/models.py `MoHAttention.forward`, with
MoH-ViT's path for one shared head), vectorised as there, against which the default is checked.
"""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab import KVCache
from attnlab.mechanisms.moh import MoHAttention

DIM, H = 32, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)


def make(dim=DIM, num_heads=H, dtype=torch.float64, **kw) -> MoHAttention:
    kw.setdefault("qkv_bias", True)
    return attnlab.create("moh", dim, num_heads, **kw).to(dtype).eval()


# --- the naive reference -----------------------------------------------------------------------

def allowed_grid(B, h, N, M, attn_mask, is_causal):
    """(B, h, N, M) bool: which keys each query of each head may see."""
    allowed = torch.ones(B, h, N, M, dtype=torch.bool)
    if is_causal:
        for n in range(N):
            allowed[:, :, n, n + (M - N) + 1:] = False
    if attn_mask is not None:
        mask = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask
        allowed = allowed & mask.expand(B, h, N, M)
    return allowed


def reference_gates(m: MoHAttention, xt, official: bool):
    """g (h,) for one token x_t, from Eq. 5-6 (and the released code's scaling if official)."""
    h_s, h_r, K = m.shared_heads, m.routed_heads, m.top_k
    g = []
    alpha = [1.0, 1.0]
    if h_s and h_r:
        alpha = torch.softmax(m.w_h.weight @ xt, dim=0)                      # Eq. 6
        if official:
            alpha = 2 * alpha
    if h_s:
        shared = torch.softmax(m.w_s.weight @ xt, dim=0) if h_s > 1 else torch.ones(1, dtype=xt.dtype)
        if official:
            shared = shared * h_s
        g += [alpha[0] * shared[i] for i in range(h_s)]
    if h_r:
        logits = m.w_r.weight @ xt
        probs = torch.softmax(logits, dim=0)
        top = set(torch.argsort(logits, descending=True)[:K].tolist())
        routed = [probs[i] if i in top else probs[i] * 0 for i in range(h_r)]
        if official:
            total = sum(routed[i] for i in top)
            routed = [K * r / total for r in routed]
        g += [alpha[1] * routed[i] for i in range(h_r)]
    return g


def reference_moh(m: MoHAttention, x, *, attn_mask=None, is_causal=False, official=False):
    """y (B, N, C) and L_b of Eq. 7, by loops over tokens and heads."""
    B, N, C = x.shape
    h, d = m.num_heads, m.head_dim
    Wqkv, bqkv = m.qkv.weight, m.qkv.bias
    Wo, bo = m.proj.weight, m.proj.bias
    allowed = allowed_grid(B, h, N, N, attn_mask, is_causal)

    def head_proj(s, i):  # rows of the fused qkv for part s (0 q, 1 k, 2 v) of head i
        rows = slice(s * C + i * d, s * C + (i + 1) * d)
        return x @ Wqkv[rows].T + bqkv[rows]                                 # (B, N, d)

    H_out = []                                                               # h x (B, N, d)
    for i in range(h):
        q, k, v = head_proj(0, i), head_proj(1, i), head_proj(2, i)
        scores = torch.einsum("bnd,bmd->bnm", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~allowed[:, i], float("-inf"))
        has_key = allowed[:, i].any(-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
        H_out.append(probs @ v)
    rows = []
    for b in range(B):
        for t in range(N):
            g = reference_gates(m, x[b, t], official)
            y = bo.clone()
            for i in range(h):                                               # Eq. 4
                y = y + g[i] * (Wo[:, i * d:(i + 1) * d] @ H_out[i][b, t])
            rows.append(y)
    y = torch.stack(rows).reshape(B, N, C)

    aux = x.new_zeros(())
    if m.routed_heads:                                                       # Eq. 7
        h_r, K, T = m.routed_heads, m.top_k, B * N
        f, P = [0.0] * h_r, [0.0] * h_r
        for b in range(B):
            for t in range(N):
                logits = m.w_r.weight @ x[b, t]
                probs = torch.softmax(logits, dim=0)
                for i in torch.argsort(logits, descending=True)[:K].tolist():
                    f[i] += 1.0 / T
                for i in range(h_r):
                    P[i] = P[i] + probs[i] / T
        aux = sum(f[i] * P[i] for i in range(h_r))
        if official:
            aux = h_r * aux
    return y, aux


# --- outputs, gradients and loss against the reference ------------------------------------------

CONFIGS = {"hs2_k1": dict(shared_heads=2, top_k=1), "hs1_k2": dict(shared_heads=1, top_k=2),
           "hs0_k2": dict(shared_heads=0, top_k=2), "all_shared": dict(shared_heads=4)}


def masking(kind, B, N):
    if kind == "none":
        return dict()
    if kind == "causal":
        return dict(is_causal=True)
    valid = torch.rand(B, N) > 0.4
    valid[:, 0] = True
    valid[1, :] = False                     # a fully padded sample: every query row is empty
    if kind == "padding_causal":
        return dict(attn_mask=valid, is_causal=True)
    pattern = torch.rand(B, 1, N, N) > 0.5  # a (B, 1, N, M) pattern with some empty rows
    return dict(attn_mask=pattern)


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("mask_kind", ["none", "padding_causal", "pattern"])
def test_matches_reference_outputs_grads_and_aux_loss(variant, config, mask_kind):
    m = make(variant=variant, **config).train()    # no dropout; "official" computes L_b in training only
    B, N = 2, 4
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    kw = masking(mask_kind, B, N)
    y = m(x, **kw)
    y_ref, aux_ref = reference_moh(m, x, official=variant == "official", **kw)
    assert_close(y, y_ref, **TIGHT)
    assert_close(m.aux_loss, aux_ref, **TIGHT)
    assert torch.isfinite(y).all()

    params = [p for p in m.parameters()]
    w = torch.randn_like(y)
    loss = (y * w).sum() + 0.5 * m.aux_loss
    loss_ref = (y_ref * w).sum() + 0.5 * aux_ref
    grads = torch.autograd.grad(loss, [x, *params])
    grads_ref = torch.autograd.grad(loss_ref, [x, *params], allow_unused=True)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert torch.isfinite(g).all(), name
        if g_ref is None:
            g_ref = torch.zeros_like(g)
        assert_close(g, g_ref, **TIGHT, msg=lambda s, n=name: f"grad of {n}: {s}")


def test_the_reference_can_fail():
    """The tolerance above detects a one-head change of routing or weighting."""
    m = make(variant="paper", shared_heads=2, top_k=1)
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    y_ref, _ = reference_moh(m, x)
    with torch.no_grad():
        m.w_h.weight.mul_(1.0 + 1e-6)
    with pytest.raises(AssertionError):
        assert_close(m(x), y_ref, **TIGHT)
    # The paper's and the released code's scalings are different functions.
    with pytest.raises(AssertionError):
        assert_close(reference_moh(m, x, official=True)[0], y_ref, rtol=1e-3, atol=1e-3)


# --- the default is the released layer -----------------------------------------------------------

def released_moh(m: MoHAttention, x):
    """y (B, N, C) and the load-balance loss (None outside training) of the released layer,
    vectorised as in SkyworkAI/MoH MoH-DiT/models.py `MoHAttention.forward` (wg = W_r, wg_1 = W_s,
    wg_0 = W_h; its `routed_head` is K), with MoH-ViT/attention.py's gate for one shared head."""
    B, N, C = x.shape
    h, hs, K = m.num_heads, m.shared_heads, m.top_k
    hr, d = h - hs, C // h
    xt = x.reshape(B * N, C)
    q, k, v = (x @ m.qkv.weight.T + m.qkv.bias).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    heads = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1) @ v).transpose(1, 2)  # (B, N, h, d)
    aux = None
    if K > 0:
        gates = torch.softmax(xt @ m.w_r.weight.T, dim=1)                     # (BN, h_r)
        mask = torch.nn.functional.one_hot(torch.topk(gates, k=K, dim=1).indices, hr).sum(1)
        if m.training:
            aux = torch.mean(gates.mean(0) * mask.double().mean(0)) * hr * hr
        routed = gates * mask
        routed = routed / routed.sum(1, keepdim=True).clamp(min=torch.finfo(routed.dtype).eps)
        routed = routed.reshape(B, N, -1) * K
        if hs > 1:
            shared = torch.softmax(xt @ m.w_s.weight.T, dim=1).reshape(B, N, -1) * hs
        else:
            shared = torch.ones(B, N, hs, dtype=x.dtype) * hs
        if hs == 0:
            g = routed
        else:
            w0 = torch.softmax(xt @ m.w_h.weight.T, dim=1).reshape(B, N, 2) * 2
            g = torch.cat([w0[..., :1] * shared, w0[..., 1:] * routed], dim=2)
    else:
        g = torch.softmax(xt @ m.w_s.weight.T, dim=1).reshape(B, N, -1) * hs
    y = (g[..., None] * heads).reshape(B, N, C)
    return y @ m.proj.weight.T + m.proj.bias, aux


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_default_is_the_released_layer(config):
    """create("moh") at its default variant computes the released layer: outputs, the training
    load-balance loss and all gradients; in eval the loss is None, as there."""
    m = attnlab.create("moh", DIM, H, qkv_bias=True, **config).double().train()
    with torch.no_grad():
        m.qkv.bias.normal_(0.0, 0.5)
        m.proj.bias.normal_(0.0, 0.5)
    x = torch.randn(3, 5, DIM, dtype=torch.float64, requires_grad=True)
    y, (y_ref, aux_ref) = m(x), released_moh(m, x)
    assert_close(y, y_ref, **TIGHT)
    params = list(m.parameters())
    w = torch.randn_like(y)
    if aux_ref is None:                                                      # no routed heads: L_b is 0
        assert m.aux_loss.item() == 0.0
        loss, loss_ref = (y * w).sum(), (y_ref * w).sum()
    else:
        assert_close(m.aux_loss, aux_ref, **TIGHT)
        loss, loss_ref = (y * w).sum() + 0.5 * m.aux_loss, (y_ref * w).sum() + 0.5 * aux_ref
    grads = torch.autograd.grad(loss, [x, *params])
    grads_ref = torch.autograd.grad(loss_ref, [x, *params], allow_unused=True)
    for name, g, g_ref in zip(["x"] + [n for n, _ in m.named_parameters()], grads, grads_ref):
        g_ref = torch.zeros_like(g) if g_ref is None else g_ref
        assert_close(g, g_ref, **TIGHT, msg=lambda s, n=name: f"grad of {n}: {s}")
    m.eval()
    assert_close(m(x), released_moh(m, x)[0], **TIGHT)
    assert m.aux_loss is None


# --- the limiting case: all heads active with equal weight is mhsa -------------------------------

def mhsa_with_same_weights(m: MoHAttention):
    mhsa = attnlab.create("mhsa", m.dim, m.num_heads, qkv_bias=True).double().eval()
    missing, unexpected = m.load_state_dict(mhsa.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) <= {"w_r.weight", "w_s.weight", "w_h.weight"}, missing
    return mhsa


def zero_routers(m):
    with torch.no_grad():
        for router in (m.w_r, m.w_s, m.w_h):
            if router is not None:
                router.weight.zero_()


@pytest.mark.parametrize("shared_heads", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), "padding_causal"], ids=["full", "causal", "pad"])
def test_all_heads_equal_weight_official_equals_mhsa(shared_heads, kw):
    """Routers at zero, Top-K = all routed heads: every gate of the released code's scaling is 1."""
    routed = H - shared_heads
    m = make(variant="official", shared_heads=shared_heads, top_k=routed or None)
    zero_routers(m)
    mhsa = mhsa_with_same_weights(m)
    B, N = 3, 6
    kw = masking(kw, B, N) if isinstance(kw, str) else kw
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    y, y_mhsa = m(x, **kw), mhsa(x, **kw)
    assert_close(y, y_mhsa, **TIGHT)
    assert m.last_active_fraction == 1.0
    w = torch.randn_like(y)
    gx, = torch.autograd.grad((y * w).sum(), x)
    gx_mhsa, = torch.autograd.grad((y_mhsa * w).sum(), x)
    assert_close(gx, gx_mhsa, **TIGHT)


@pytest.mark.parametrize("shared_heads,top_k", [(0, 1), (1, 2), (2, 1)])
def test_zero_routers_official_is_mhsa_on_the_shared_and_k_routed_heads(shared_heads, top_k):
    """Routers at zero and K < h_r, the released gating: the shared gates are 2 · 1/2 · h_s · 1/h_s
    = 1, the routed probabilities tie at 1/h_r, Top-K picks K of them (torch.topk's choice, the
    same for every token) and renormalising gives 2 · 1/2 · K · (1/h_r) / (K/h_r) = 1 each, the
    others 0. So the output is mhsa with the W_O slices of the h_r - K unpicked heads zeroed, for
    exactly one K-subset of the routed heads."""
    m = make(shared_heads=shared_heads, top_k=top_k)
    zero_routers(m)
    mhsa = mhsa_with_same_weights(m)                                         # m now has mhsa's weights
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    y = m(x, is_causal=True)
    matches = []
    for picked in itertools.combinations(range(shared_heads, H), top_k):
        pruned = copy.deepcopy(mhsa)
        with torch.no_grad():
            for i in set(range(shared_heads, H)) - set(picked):
                pruned.proj.weight[:, i * m.head_dim:(i + 1) * m.head_dim] = 0.0
        if torch.allclose(y, pruned(x, is_causal=True), rtol=1e-10, atol=1e-12):
            matches.append(picked)
    assert len(matches) == 1, matches


def test_all_heads_equal_weight_paper_equals_scaled_mhsa():
    """Eq. 5-6 with h_s = h_r, all routed heads chosen and routers at zero: g_i = 1/2 · 1/(h/2)
    = 1/h for every head, i.e. mhsa with W_O scaled by 1/h."""
    m = make(variant="paper", shared_heads=2, top_k=2)
    zero_routers(m)
    mhsa = mhsa_with_same_weights(m)
    with torch.no_grad():
        mhsa.proj.weight.div_(H)
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    for kw in (dict(), dict(is_causal=True)):
        assert_close(m(x, **kw), mhsa(x, **kw), **TIGHT)


# --- routing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_each_token_activates_shared_plus_top_k_heads(variant, config):
    m = make(variant=variant, **config)
    seen = {}
    m.hook_gates.register_forward_hook(lambda mod, inp, out: seen.setdefault("gates", out))
    x = torch.randn(3, 8, DIM, dtype=torch.float64)
    m(x)
    g = seen["gates"]                                                        # (B, N, h)
    h_s, K = m.shared_heads, m.top_k
    assert g.shape == (3, 8, H)
    assert (g[..., :h_s] > 0).all()                                          # shared: always on
    assert ((g[..., h_s:] > 0).sum(-1) == K).all()                           # routed: exactly K
    assert m.last_active_fraction == (h_s + K) / H == m.active_fraction
    if variant == "paper":
        # Eq. 5-6: shared gates sum to α1, routed gates to α2 times the chosen probability mass.
        assert (g.sum(-1) <= 1 + 1e-12).all()


def test_defaults_and_last_active_fraction():
    m = attnlab.create("moh", 64, 8)
    assert (m.shared_heads, m.routed_heads, m.top_k, m.variant) == (4, 4, 2, "official")
    assert m.aux_loss is None and m.last_active_fraction is None
    x = torch.randn(2, 3, 64)
    m(x)                                                                     # training mode
    assert m.last_active_fraction == 0.75
    assert m.aux_loss.shape == () and m.aux_loss.dtype == torch.float32
    m.eval()(x)                                                              # released code: no L_b in eval
    assert m.aux_loss is None
    paper = attnlab.create("moh:paper", 64, 8).eval()
    paper(x)
    assert paper.variant == "paper" and paper.aux_loss.shape == ()           # Eq. 7 whatever the mode


def test_aux_loss_empty_batch_and_bf16_dtype():
    m = make(shared_heads=1, top_k=2).train()
    y = m(torch.randn(0, 4, DIM, dtype=torch.float64))
    assert y.shape == (0, 4, DIM)
    assert m.aux_loss.item() == 0.0
    m16 = make(shared_heads=1, top_k=2, dtype=torch.bfloat16).train()
    m16(torch.randn(2, 3, DIM, dtype=torch.bfloat16))
    assert m16.aux_loss.dtype == torch.float32                              # router in float32


def test_aux_loss_uniform_router_value():
    """Routers at zero: P_i = 1/h_r, f_i = K/h_r, so L_b = K/h_r (paper) and K (released code)."""
    for variant, want in (("paper", 2 / 3), ("official", 2.0)):
        m = make(variant=variant, shared_heads=1, top_k=2).train()
        zero_routers(m)
        m(torch.randn(2, 5, DIM, dtype=torch.float64))
        assert_close(m.aux_loss, torch.tensor(want, dtype=torch.float64), **TIGHT)


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("config", [dict(shared_heads=0, top_k=1), dict(shared_heads=1, top_k=2)],
                         ids=["hs0_k1", "hs1_k2"])
def test_kv_cache_decode_matches_full_causal_forward(variant, config):
    m = make(variant=variant, **config)
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    full = m(x, is_causal=True)
    cache = KVCache()
    with torch.no_grad():
        outs = [m(x[:, t:t + 1], is_causal=True, cache=cache) for t in range(7)]
    assert_close(torch.cat(outs, dim=1), full, **TIGHT)


# --- gradcheck ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["paper", "official"])
def test_gradcheck(variant):
    m = make(dim=8, num_heads=4, variant=variant, shared_heads=2, top_k=1).train()   # L_b for both
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, False, True]])
    names = ["w_r.weight", "w_s.weight", "w_h.weight", "qkv.weight", "proj.weight"]
    params = dict(m.named_parameters())
    leaves = [params[n].detach().clone().requires_grad_(True) for n in names]

    def f(x, *weights):
        m_params = {**params, **dict(zip(names, weights))}
        y = torch.func.functional_call(m, m_params, (x,), dict(attn_mask=valid, is_causal=True))
        return y, m.aux_loss

    # fast_mode checks a random projection of the Jacobian (a few evaluations per input);
    # the full Jacobians are compared against the reference's autograd above.
    assert torch.autograd.gradcheck(f, (x, *leaves), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: f(x, *leaves), (x,))


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,words", [
    (dict(shared_heads=5), ["shared_heads", "[0, 4]", "5"]),
    (dict(shared_heads=-1), ["shared_heads", "-1"]),
    (dict(shared_heads=2.0), ["shared_heads", "2.0"]),
    (dict(shared_heads=True), ["shared_heads", "True"]),
    (dict(shared_heads=2, top_k=3), ["top_k", "[1, 2]", "3"]),
    (dict(shared_heads=2, top_k=0), ["top_k", "0"]),
    (dict(shared_heads=4, top_k=1), ["top_k", "shared_heads=4", "1"]),
    (dict(variant="switch"), ["variant", "paper", "official", "switch"]),
    (dict(attn_drop=1.0), ["attn_drop", "1.0"]),
], ids=["hs_big", "hs_neg", "hs_float", "hs_bool", "k_big", "k_zero", "k_no_routed", "variant", "drop"])
def test_bad_options_raise_at_construction(kw, words):
    with pytest.raises(ValueError) as info:
        attnlab.create("moh", DIM, H, **kw)
    msg = str(info.value)
    assert "moh" in msg and all(w in msg for w in words), msg


def test_bad_input_raises():
    m = make()
    with pytest.raises(ValueError, match=r"moh.*C=32.*\(2, 5, 31\)"):
        m(torch.randn(2, 5, 31, dtype=torch.float64))
    with pytest.raises(TypeError, match="moh.*int64"):
        m(torch.zeros(2, 5, DIM, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        m(torch.randn(2, 5, DIM, dtype=torch.float64), attn_mask=torch.ones(2, 6, dtype=torch.bool))


# --- bookkeeping --------------------------------------------------------------------------------

def test_useful_flops_counts_active_heads_only():
    B, N, C = 2, 64, DIM
    pairs = N * (N + 1) // 2
    dense = 2 * B * N * C * 3 * C + 2 * B * N * C * C + 4 * B * C * pairs   # all heads, no routers
    m = make(shared_heads=4)                                                 # all heads, one router
    routers = 2 * B * N * C * 4
    assert m.useful_flops(B, N, C, H, True) == (dense + B * N * C + routers,
                                               2 * (dense + B * N * C + routers))
    half = make(shared_heads=1, top_k=1)                                     # 2 of 4 heads
    fwd, bwd = half.useful_flops(B, N, C, H, True)
    want = (2 * B * N * C * (C / 2 + 2 * C) + 4 * B * C * pairs / 2 + B * N * C / 2
            + 2 * B * N * C * C / 2 + 2 * B * N * C * (3 + 2))
    assert (fwd, bwd) == (int(want), int(2 * want))
