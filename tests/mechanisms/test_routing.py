"""Routing attention against naive float64 references written from the paper's equations and the
released code (google-research routing_transformer/utils.py, lucidrains/routing-transformer).

The reference recomputes everything from the module's parameters, head by head and cluster by
cluster: layer-normed queries and keys, the cluster membership from the routing rule (nearest
centroid with a per-cluster cap in sequence order, or each cluster's top-w tokens; the default
"auto" is top-w without is_causal and nearest with it), then for
each cluster a dense N x N softmax under the mask "query in the cluster, key in the cluster,
key <= query (causal), attn_mask", averaged over the clusters that hold the query. Local heads
are a dense softmax under the block mask. Nothing of the module's gather/scatter path is reused.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab.mechanisms.routing import RoutingAttention

DIM, H = 32, 4
D = DIM // H
CLOSE = dict(rtol=1e-9, atol=1e-11)


def make(dim=DIM, num_heads=H, dtype=torch.float64, **kw) -> RoutingAttention:
    kw.setdefault("qkv_bias", True)
    return attnlab.create("routing", dim, num_heads, **kw).to(dtype).eval()


# --- the naive reference ---------------------------------------------------------------------------

def layer_norm(z, eps=1e-5):
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def heads_qkv(m, x):
    """q, k, v (B, h, N, d) from the fused projection, by einsum over head slices."""
    B, N, C = x.shape
    h, d = m.num_heads, m.head_dim
    W = m.qkv.weight.view(3, h, d, C)
    b = m.qkv.bias.view(3, h, d) if m.qkv.bias is not None else torch.zeros(3, h, d, dtype=x.dtype)
    q, k, v = (torch.einsum("bnc,hdc->bhnd", x, W[s]) + b[s][None, :, None, :] for s in range(3))
    return q, k, v


def allowed_and_bias(attn_mask, B, h, N, is_causal):
    """(B, h, N, N) bool 'may attend' and float bias, from the attnlab mask conventions."""
    allowed = torch.ones(B, h, N, N, dtype=torch.bool)
    bias = torch.zeros(B, h, N, N, dtype=torch.float64)
    if attn_mask is not None:
        mask = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask
        if mask.dtype == torch.bool:
            allowed = allowed & mask.expand(B, h, N, N)
        else:
            mask = mask.expand(B, h, N, N).to(torch.float64)
            allowed = allowed & (mask != float("-inf"))
            bias = torch.where(allowed, mask, torch.zeros_like(mask))
    user_allowed = allowed.clone()
    if is_causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    return allowed, bias, user_allowed


def members(variant, mu, z, pad_row, w):
    """Cluster membership of one head's tokens z (N, d) given its centroids mu (k, d), from the
    routing rule: a list of sets of positions."""
    N = z.shape[0]
    scores = z @ mu.T                                              # (N, k)
    out = []
    for c in range(mu.shape[0]):
        if variant == "nearest":
            ids = [i for i in range(N) if not pad_row[i] and int(scores[i].argmax()) == c]
            out.append(set(ids[:w]))                               # the first w in sequence order
        else:
            ids = sorted((i for i in range(N) if not pad_row[i]), key=lambda i: -float(scores[i, c]))
            out.append(set(ids[:w]))                               # the w most similar
    return out


def masked_softmax_rows(scores, allowed, v):
    """Dense softmax over the allowed keys; rows without one give zeros and ok=False."""
    ok = allowed.any(-1)
    s = scores.masked_fill(~allowed, float("-inf")).masked_fill(~ok[:, None], 0.0)
    p = torch.softmax(s, dim=-1) * allowed
    return p @ v, ok


def reference_routing(m, x, *, attn_mask=None, is_causal=False, return_members=False):
    B, N, C = x.shape
    h, L, d = m.num_heads, m.local_heads, m.head_dim
    scale = 1 / math.sqrt(d) if m.scale is None else m.scale
    q, k, v = heads_qkv(m, x)
    allowed, bias, user_allowed = allowed_and_bias(attn_mask, B, h, N, is_causal)
    W = min(m.window_size, N)
    blk = torch.arange(N) // W
    near = (blk[None, :] >= blk[:, None] - 1) & (blk[None, :] <= blk[:, None] + (0 if is_causal else 1))
    w = max(1, min(N, math.ceil(m.capacity * N / m.num_clusters)))
    # "auto" routes causally when the call may not see the future: is_causal, or a mask hiding it
    later = torch.ones(N, N, dtype=torch.bool).triu(1)
    causal_call = is_causal or (attn_mask is not None and not (user_allowed[:, L:] & later).any())
    heads, found = [], []
    for head in range(h):
        rows = []
        for b in range(B):
            if head < L:   # local head: the block rule, one dense softmax
                s = q[b, head] @ k[b, head].T * scale + bias[b, head]
                out, _ = masked_softmax_rows(s, allowed[b, head] & near, v[b, head])
                rows.append(out)
                continue
            r = head - L
            qn, kn = layer_norm(q[b, head]), layer_norm(k[b, head])
            pad = ~user_allowed[b, head].any(0)                      # a key nobody may see: padding
            mu = m.centroids[r].to(x.dtype)
            variant = m.variant if m.variant != "auto" else ("nearest" if causal_call else "topk")
            Qc, Kc = members(variant, mu, qn.detach(), pad, w), members(variant, mu, kn.detach(), pad, w)
            found.append((b, r, Qc, Kc))
            total = torch.zeros(N, d, dtype=x.dtype)
            count = torch.zeros(N, 1, dtype=x.dtype)
            s = qn @ kn.T * scale + bias[b, head]
            for c in range(len(Qc)):
                in_q = torch.zeros(N, dtype=torch.bool)
                in_q[list(Qc[c])] = True
                in_k = torch.zeros(N, dtype=torch.bool)
                in_k[list(Kc[c])] = True
                mask_c = allowed[b, head] & in_q[:, None] & in_k[None, :]   # the cluster's N x N mask
                out, ok = masked_softmax_rows(s, mask_c, v[b, head])
                total = total + out * ok[:, None]
                count = count + ok[:, None].to(x.dtype)
            rows.append(total / count.clamp(min=1))
        heads.append(torch.stack(rows))                              # (B, N, d)
    out = torch.cat(heads, dim=-1)                                   # (B, N, C), heads in order
    y = out @ m.proj.weight.T + m.proj.bias
    return (y, found) if return_members else y


# --- outputs and gradients against the reference --------------------------------------------------

def key_padding(B, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(B, N, generator=g) > 0.3
    valid[:, 0] = True
    return valid


def pattern(B, N, seed=2):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(B, 1, N, N, generator=g) > 0.4
    allowed[..., 0] = True
    return allowed


MASKS = {
    "none": lambda B, N: None,
    "padding": key_padding,
    "pattern": pattern,
    "float": lambda B, N: torch.randn(B, H, N, N, dtype=torch.float64).masked_fill(~pattern(B, N, 3).expand(B, H, N, N),
                                                                                    float("-inf")),
}


def check_against_reference(m, x, **call):
    xr = x.clone().requires_grad_(True)
    xm = x.clone().requires_grad_(True)
    y = m(xm, **call)
    y_ref = reference_routing(m, xr, **call)
    assert_close(y, y_ref, **CLOSE)
    g = torch.randn_like(y)
    params = [m.qkv.weight, m.proj.weight]
    grads = torch.autograd.grad((y * g).sum(), [xm, *params])
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [xr, *params])
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, **CLOSE)


@pytest.mark.parametrize("variant,is_causal", [("nearest", False), ("nearest", True), ("topk", False)])
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_matches_naive_reference(variant, is_causal, mask_kind):
    m = make(variant=variant, num_clusters=3, local_heads=1, window_size=4)
    B, N = 2, 13
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    check_against_reference(m, x, attn_mask=MASKS[mask_kind](B, N), is_causal=is_causal)


@pytest.mark.parametrize("variant", ["nearest", "topk"])
def test_matches_reference_with_capacity_and_scale(variant):
    m = make(variant=variant, num_clusters=4, capacity=1.7, local_heads=2, window_size=3, scale=0.5)
    check_against_reference(m, torch.randn(2, 11, DIM, dtype=torch.float64))


def test_topk_data_covers_overlap_and_unrouted():
    """The reference test's topk data does have tokens in several clusters and tokens in none,
    so the averaging and the zero output are both exercised."""
    m = make(variant="topk", num_clusters=3, local_heads=0)
    x = torch.randn(2, 13, DIM, dtype=torch.float64)
    _, found = reference_routing(m, x, return_members=True)
    times = [sum(i in Qc[c] for c in range(3)) for _, _, Qc, _ in found for i in range(13)]
    assert max(times) >= 2 and min(times) == 0


def test_topk_mean_skips_clusters_where_the_query_sees_no_key():
    """A query in several clusters averages only over those holding a key it may see; a cluster
    where the mask hides every key adds nothing (not a zero). The data has such queries."""
    m = make(variant="topk", num_clusters=3, local_heads=1, window_size=4)
    x = torch.randn(2, 13, DIM, dtype=torch.float64)
    allowed = torch.rand(2, 1, 13, 13, generator=torch.Generator().manual_seed(0)) > 0.8
    _, found = reference_routing(m, x, attn_mask=allowed, return_members=True)
    mixed = 0
    for b, _, Qc, Kc in found:
        for i in range(13):
            sees = [bool(allowed[b, 0, i, list(Kc[c])].any()) for c in range(3) if i in Qc[c]]
            mixed += any(sees) and not all(sees)
    assert mixed > 0
    check_against_reference(m, x, attn_mask=allowed)


def test_route_matches_the_rule():
    for variant in ("nearest", "topk"):
        m = make(variant=variant, num_clusters=3, local_heads=1)
        x = torch.randn(2, 13, DIM, dtype=torch.float64)
        valid = key_padding(2, 13)
        _, found = reference_routing(m, x, attn_mask=valid, return_members=True)
        q, k, _ = heads_qkv(m, x)
        qn, kn = layer_norm(q[:, 1:]), layer_norm(k[:, 1:])
        q_idx, q_ok, k_idx, k_ok = m.route(qn, kn, (~valid)[:, None, :].expand(2, 3, 13))
        for b, r, Qc, Kc in found:
            for c in range(3):
                assert set(q_idx[b, r, c][q_ok[b, r, c]].tolist()) == Qc[c]
                assert set(k_idx[b, r, c][k_ok[b, r, c]].tolist()) == Kc[c]
                assert not (~valid[b])[q_idx[b, r, c][q_ok[b, r, c]]].any()   # padding never routed


# --- the defaults against the released code --------------------------------------------------------

def released_code_routing(m, x):
    """create("routing", C) at its defaults, non-causal, written from the released code's formulas
    in a few lines of torch (no attnlab code): google-research routing_transformer/utils.py
    clustered_local_attention_helper (LayerNorm of q and k without scale), nearest_neighbor
    (similarity <z, mu_c>), gather_cluster_attention_items (each cluster's top-w queries and top-w
    keys by similarity, sorted by position), softmax(q k^T / sqrt(d)) inside each cluster, and
    scatter_cluster_items (outputs back at the queries' positions, averaged over a query's clusters;
    the released code divides by count + 0.01, attnlab by count: a documented deviation). The local
    heads (the first half) see one block when N <= window_size: a dense softmax on the raw q, k."""
    B, N, C = x.shape
    h = m.num_heads
    d, L = C // h, h // 2
    q, k, v = (x @ m.qkv.weight.T).view(B, N, 3, h, d).permute(2, 0, 3, 1, 4)      # 3 x (B, h, N, d), no bias
    local = torch.softmax(q[:, :L] @ k[:, :L].transpose(-1, -2) / math.sqrt(d), -1) @ v[:, :L]
    qn, kn, vr = layer_norm(q[:, L:]), layer_norm(k[:, L:]), v[:, L:]              # (B, R, N, d)
    w = math.ceil(N / m.num_clusters)
    top = lambda z: torch.einsum("brnd,rcd->brcn", z, m.centroids).topk(w, -1).indices.sort(-1).values
    qi, ki = top(qn.detach()), top(kn.detach())                                    # (B, R, c, w)
    pick = lambda t, i: torch.take_along_dim(t[:, :, None], i[..., None], dim=3)    # (B, R, c, w, d)
    att = torch.softmax(pick(qn, qi) @ pick(kn, ki).transpose(-1, -2) / math.sqrt(d), -1) @ pick(vr, ki)
    idx = qi.flatten(2)[..., None]                                                 # (B, R, c w, 1)
    total = torch.zeros_like(vr).scatter_add(2, idx.expand(-1, -1, -1, d), att.flatten(2, 3))
    count = torch.zeros_like(vr[..., :1]).scatter_add(2, idx, torch.ones_like(idx, dtype=x.dtype))
    routed = total / count.clamp(min=1)
    out = torch.cat([local, routed], 1).transpose(1, 2).reshape(B, N, C)
    return out @ m.proj.weight.T + m.proj.bias


def test_default_matches_the_released_code_outputs_and_grads():
    m = attnlab.create("routing", 64).double().eval()                # every option at its default
    assert m.variant == "auto" and m.routing_variant(False) == "topk"
    x = torch.randn(2, 40, 64, dtype=torch.float64)                   # w = ceil(40 / 16) = 3, one local block
    xm, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_ref = m(xm), released_code_routing(m, xr)
    assert_close(y, y_ref, **CLOSE)
    g = torch.randn_like(y)
    leaves = [m.qkv.weight, m.proj.weight, m.proj.bias]
    for a, b in zip(torch.autograd.grad((y * g).sum(), [xm, *leaves]),
                    torch.autograd.grad((y_ref * g).sum(), [xr, *leaves])):
        assert_close(a, b, **CLOSE)
    assert 0.0 < m.unrouted_fraction < 1.0                            # see the next tests


def reference_unrouted(found, valid, is_causal, N):
    """Share of the valid queries (over samples and routing heads) that no cluster gives a key they may
    see, from the reference's cluster membership: valid (B, N) key padding."""
    missed = total = 0
    for b, _, Qc, Kc in found:
        for i in range(N):
            if not valid[b, i]:
                continue
            total += 1
            missed += not any(i in Qc[c] and any(valid[b, j] and (j <= i or not is_causal) for j in Kc[c])
                              for c in range(len(Qc)))
    return missed / total


@pytest.mark.parametrize("variant,is_causal", [("auto", False), ("auto", True), ("nearest", False), ("topk", False)])
def test_unrouted_fraction_is_the_measured_share(variant, is_causal):
    m = make(variant=variant, num_clusters=4, local_heads=1)
    assert math.isnan(m.unrouted_fraction)                            # nothing measured yet
    B, N = 3, 17
    valid = key_padding(B, N)
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    m(x, attn_mask=valid, is_causal=is_causal)
    _, found = reference_routing(m, x, attn_mask=valid, is_causal=is_causal, return_members=True)
    assert isinstance(m.unrouted_fraction, float)
    assert m.unrouted_fraction == pytest.approx(reference_unrouted(found, valid, is_causal, N), abs=1e-12)
    only_local = make(local_heads=H)
    only_local(x)
    assert only_local.unrouted_fraction == 0.0                        # no routing heads, nothing unrouted


def test_topk_clusters_are_full_but_do_not_route_every_query():
    """The released code's balanced top-w fills every cluster with exactly w queries and w keys; it does
    not give every query a cluster: at initialisation a large share of the queries is in none (their
    routing-head output is zero, as in the released code). unrouted_fraction reports that share."""
    m = make(num_clusters=4, local_heads=0)
    N = 32
    w = m.cluster_size(N)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    m(x)
    _, found = reference_routing(m, x, return_members=True)
    assert all(len(Qc[c]) == w and len(Kc[c]) == w for _, _, Qc, Kc in found for c in range(4))
    in_none = [sum(all(i not in Qc[c] for c in range(4)) for i in range(N)) for _, _, Qc, _ in found]
    assert sum(in_none) > 0
    assert m.unrouted_fraction == pytest.approx(sum(in_none) / (N * len(found)), abs=1e-12)


def test_auto_routes_causally_under_an_explicit_causal_mask():
    """A lower-triangular attn_mask without is_causal: "auto" takes the causal assignment, so the
    future cannot move a past token in or out of a cluster; the result is the reference's."""
    m = make(num_clusters=4, local_heads=1, window_size=3)
    N = 20
    tril = torch.ones(N, N, dtype=torch.bool).tril()[None, None]          # (1, 1, N, N)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    y = m(x, attn_mask=tril)
    assert_close(y, reference_routing(m, x, attn_mask=tril), **CLOSE)
    assert_close(y, m(x, is_causal=True), **CLOSE)
    for t in (4, 11):
        x2 = x.clone()
        x2[:, t:] = 5 * torch.randn(2, N - t, DIM, dtype=torch.float64)
        assert_close(m(x2, attn_mask=tril)[:, :t], y[:, :t], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["auto", "nearest"])
def test_causal_variant_never_sees_a_future_key(variant):
    """No gradient flows from a future token into a past output (the perturbation test below checks
    that the routing decisions, which carry no gradient, do not depend on the future either)."""
    m = make(dim=8, num_heads=2, variant=variant, num_clusters=2, local_heads=1, window_size=2)
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: m(t, is_causal=True), x)      # (1, 9, 8, 1, 9, 8)
    dep = J[0, :, :, 0].abs().sum((1, 3))                                           # (9, 9): output i <- input j
    assert (dep.triu(1) == 0).all()
    assert (dep.tril(-1) != 0).any()
    y = m(x, is_causal=True)
    for t in (3, 6):
        x2 = x.clone()
        x2[:, t:] = 5 * torch.randn(1, 9 - t, 8, dtype=torch.float64)
        assert_close(m(x2, is_causal=True)[:, :t], y[:, :t], rtol=0, atol=0)


# --- limiting cases ---------------------------------------------------------------------------------

def copy_weights(dst, src):
    dst.qkv.load_state_dict(src.qkv.state_dict())
    dst.proj.load_state_dict(src.proj.state_dict())
    return dst


@pytest.mark.parametrize("variant", ["nearest", "topk"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_one_cluster_is_dense_attention_on_normed_qk(variant, is_causal):
    """num_clusters=1: w = N, every token routed to the one cluster -> plain softmax attention
    with layer-normed q and k (mhsa with qk_norm, its LayerNorm at the identity affine init)."""
    if variant == "topk" and is_causal:
        pytest.skip("topk is non-causal")
    m = make(variant=variant, num_clusters=1, local_heads=0)
    ref = copy_weights(attnlab.create("mhsa", DIM, H, qkv_bias=True, qk_norm=True).double().eval(), m)
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    valid = key_padding(2, 10)
    assert_close(m(x, is_causal=is_causal), ref(x, is_causal=is_causal), **CLOSE)
    # Padding tokens are routed neither way, so only the valid queries keep mhsa's output.
    assert_close(m(x, attn_mask=valid, is_causal=is_causal)[valid],
                 ref(x, attn_mask=valid, is_causal=is_causal)[valid], **CLOSE)


@pytest.mark.parametrize("is_causal", [False, True])
def test_local_window_covering_everything_is_mhsa(is_causal):
    m = make(local_heads=H, window_size=16)
    ref = copy_weights(attnlab.create("mhsa", DIM, H, qkv_bias=True).double().eval(), m)
    x = torch.randn(2, 16, DIM, dtype=torch.float64)
    assert_close(m(x, is_causal=is_causal), ref(x, is_causal=is_causal), **CLOSE)


def test_reference_backend_agrees():
    m = make(num_clusters=3, local_heads=1, window_size=4)
    x = torch.randn(2, 13, DIM, dtype=torch.float64)
    valid = key_padding(2, 13)
    with attnlab.use_backend("reference"):
        y_ref = m(x, attn_mask=valid, is_causal=True)
    assert_close(m(x, attn_mask=valid, is_causal=True), y_ref, **CLOSE)


# --- gradcheck ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,is_causal", [("nearest", False), ("nearest", True), ("topk", False)])
def test_gradcheck(variant, is_causal):
    m = make(dim=8, num_heads=2, variant=variant, num_clusters=2, local_heads=1, window_size=2)
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, True, False, True, True]])
    assert torch.autograd.gradcheck(lambda t: m(t, attn_mask=valid, is_causal=is_causal), (x,), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


def test_gradcheck_full_jacobian_tiny():
    m = make(dim=4, num_heads=2, num_clusters=2, local_heads=1, window_size=2)
    x = torch.randn(1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t, is_causal=True), (x,), eps=1e-6, atol=1e-6)


# --- causality and masks beyond the shared suite -------------------------------------------------------

def test_causal_no_leak_through_routing():
    """Many clusters and tokens: a change of the future never reaches the past, not even by
    changing which past tokens hold a cluster slot."""
    m = make(num_clusters=4, local_heads=1, window_size=3)
    x = torch.randn(2, 24, DIM, dtype=torch.float64)
    y = m(x, is_causal=True)
    for t in (5, 12, 23):
        x2 = x.clone()
        x2[:, t:] = 5 * torch.randn(2, 24 - t, DIM, dtype=torch.float64)
        assert_close(m(x2, is_causal=True)[:, :t], y[:, :t], rtol=0, atol=0)


def test_topk_refuses_causal():
    assert attnlab.create("routing:topk", DIM, H).variant == "topk"       # the registry's variant shorthand
    m = make(variant="topk")
    with pytest.raises(NotImplementedError, match=r"routing.*causal"):
        m(torch.randn(1, 6, DIM, dtype=torch.float64), is_causal=True)
    # without routing heads there is nothing non-causal left
    only_local = make(variant="topk", local_heads=H)
    assert only_local(torch.randn(1, 6, DIM, dtype=torch.float64), is_causal=True).shape == (1, 6, DIM)


@pytest.mark.parametrize("variant", ["nearest", "topk"])
def test_masked_keys_have_no_effect_on_routing(variant):
    """Padding is never routed, so its content cannot move a valid token in or out of a cluster."""
    m = make(variant=variant, num_clusters=3, local_heads=1, window_size=4)
    B, N = 3, 16
    valid = key_padding(B, N, seed=5)
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[~valid] = 1e3 * torch.randn(int((~valid).sum()), DIM, dtype=torch.float64)
    assert_close(m(x2, attn_mask=valid)[valid], m(x, attn_mask=valid)[valid], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["nearest", "topk"])
def test_batch_invariance(variant):
    m = make(variant=variant, num_clusters=3, local_heads=1, window_size=4, dtype=torch.float32)
    x = torch.randn(4, 15, DIM)
    y = m(x)
    for i in range(4):
        assert_close(m(x[i:i + 1]), y[i:i + 1], rtol=1e-5, atol=1e-6)


def test_bf16_routes_like_float32():
    m16 = make(num_clusters=3, local_heads=1, dtype=torch.bfloat16)
    m32 = copy.deepcopy(m16).float()
    x = torch.randn(2, 21, DIM, dtype=torch.bfloat16)
    y16, y32 = m16(x), m32(x.float())
    assert y16.dtype == torch.bfloat16
    assert_close(y16.float(), y32, rtol=1.6e-2, atol=1e-2 * y32.abs().max().item())


# --- centroids: moving average, never gradients -----------------------------------------------------

def test_centroids_are_a_buffer_not_a_parameter():
    m = make(num_clusters=5, local_heads=1)
    assert m.centroids.shape == (H - 1, 5, D)
    assert "centroids" in dict(m.named_buffers()) and "centroids" in m.state_dict()
    assert all(p is not m.centroids for p in m.parameters())
    assert not m.centroids.requires_grad
    before = m.centroids.clone()
    x = torch.randn(2, 9, DIM, dtype=torch.float64, requires_grad=True)
    m(x).sum().backward()                                    # eval: no update, and no gradient
    assert m.centroids.grad is None
    assert torch.equal(m.centroids, before)


def reference_ema(m, x, valid, decay):
    """mu_c <- decay mu_c + (1 - decay) sqrt(d) S_c / |S_c|, S_c the sum of the layer-normed queries
    and keys (both halves of every valid token of every sample) whose nearest centroid is mu_c
    (lucidrains' kmeans_iter: F.normalize of the member sum, here on the layer-norm radius sqrt(d));
    empty clusters stay."""
    q, k, _ = heads_qkv(m, x)
    L = m.local_heads
    new = m.centroids.clone()
    for r in range(m.routing_heads):
        members_ = [[] for _ in range(m.num_clusters)]
        for b in range(x.shape[0]):
            for z in (layer_norm(q[b, L + r]), layer_norm(k[b, L + r])):
                for i in range(x.shape[1]):
                    if valid is None or valid[b, i]:
                        members_[int((z[i] @ m.centroids[r].T).argmax())].append(z[i])
        for c, zs in enumerate(members_):
            if zs:
                total = torch.stack(zs).sum(0)
                new[r, c] = decay * m.centroids[r, c] + (1 - decay) * total / total.norm() * math.sqrt(m.head_dim)
    return new


@pytest.mark.parametrize("use_mask", [False, True])
def test_ema_update_in_training_only(use_mask):
    m = make(num_clusters=4, local_heads=2, decay=0.9)
    x = torch.randn(3, 10, DIM, dtype=torch.float64)
    valid = key_padding(3, 10) if use_mask else None
    before = m.centroids.clone()
    y_eval = m(x, attn_mask=valid)
    assert torch.equal(m.centroids, before)
    expected = reference_ema(m, x, valid, 0.9)
    m.train()
    y_train = m(x, attn_mask=valid)
    # This call was routed with the old centroids; the update comes after it.
    assert_close(y_train, y_eval, rtol=0, atol=0)
    assert not torch.equal(m.centroids, before)
    assert_close(m.centroids, expected, **CLOSE)


def test_ema_not_driven_by_gradients():
    m = make(num_clusters=4, local_heads=1).train()
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    expected = reference_ema(m, x, None, m.decay)
    y = m(x)
    assert_close(m.centroids, expected, **CLOSE)          # moved by the average, in the forward
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    y.pow(2).sum().backward()
    opt.step()
    assert m.centroids.grad is None
    assert_close(m.centroids, expected, **CLOSE)          # backward and the optimizer leave it alone


def test_decay_zero_sets_centroids_to_the_normalised_batch_sums():
    m = make(num_clusters=2, local_heads=0, decay=0.0).train()
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    expected = reference_ema(m.eval(), x, None, 0.0)
    m.train()(x)
    assert_close(m.centroids, expected, **CLOSE)


def test_routing_seed_reproducible_and_private():
    a = attnlab.create("routing", DIM, H, routing_seed=7)
    b = attnlab.create("routing", DIM, H, routing_seed=7)
    assert torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, attnlab.create("routing", DIM, H, routing_seed=8).centroids)
    # The seed does not touch the global generator: what comes after is the same for any seed.
    draws = []
    for seed in (7, 3):
        torch.manual_seed(0)
        attnlab.create("routing", DIM, H, routing_seed=seed)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


# --- FLOP count -------------------------------------------------------------------------------------

@pytest.mark.parametrize("is_causal", [False, True])
def test_useful_flops_counts_the_local_mask(is_causal):
    m = make(num_clusters=1, local_heads=2, window_size=3)
    N = 11
    allowed, _, _ = allowed_and_bias(None, 1, 1, N, is_causal)
    blk = torch.arange(N) // 3
    near = (blk[None, :] >= blk[:, None] - 1) & (blk[None, :] <= blk[:, None] + (0 if is_causal else 1))
    local_pairs = int((allowed[0, 0] & near).sum())
    routed_pairs = N * (N + 1) // 2 if is_causal else N * N      # one cluster of w = N
    proj = 2 * N * DIM * 3 * DIM + 2 * N * DIM * DIM
    expected = proj + 2 * 2 * 2 * N * 1 * D + 4 * D * (2 * routed_pairs + 2 * local_pairs)
    assert m.useful_flops(1, N, DIM, H, is_causal) == (expected, 2 * expected)


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("option,value,words", [
    ("variant", "kmeans", ["variant", "nearest", "topk", "kmeans"]),
    ("num_clusters", 0, ["num_clusters", ">= 1", "0"]),
    ("num_clusters", 2.5, ["num_clusters", "2.5"]),
    ("local_heads", 5, ["local_heads", "[0, 4]", "5"]),
    ("local_heads", -1, ["local_heads", "-1"]),
    ("window_size", 0, ["window_size", "0"]),
    ("capacity", 0.0, ["capacity", "> 0", "0.0"]),
    ("capacity", float("inf"), ["capacity", "inf"]),
    ("decay", 1.0, ["decay", "[0, 1)", "1.0"]),
    ("attn_drop", 1.5, ["attn_drop", "1.5"]),
])
def test_bad_options_raise_at_construction(option, value, words):
    with pytest.raises(ValueError) as info:
        attnlab.create("routing", DIM, H, **{option: value})
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_seed_type_raises():
    with pytest.raises(TypeError, match="routing_seed.*str"):
        attnlab.create("routing", DIM, H, routing_seed="7")


def test_bad_input_names_expected_and_got():
    m = make()
    with pytest.raises(ValueError, match=r"routing.*C=32.*31"):
        m(torch.randn(2, 5, 31, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        m(torch.randn(2, 5, DIM, dtype=torch.float64), attn_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match=r"routing.*kv_cache"):
        m(torch.randn(2, 5, DIM, dtype=torch.float64), cache=attnlab.KVCache())


# --- attnlab info -----------------------------------------------------------------------------------

def test_info_prints_the_measured_unrouted_fraction(capsys):
    from attnlab.cli import build_parser
    torch.manual_seed(1)
    lines = RoutingAttention.describe()
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(3))              # describe leaves the global RNG where it was
    assert "unrouted" in lines[0] and any("topk" in line for line in lines) and any("nearest" in line for line in lines)
    args = build_parser().parse_args(["info", "routing"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for line in lines:
        assert line in out
