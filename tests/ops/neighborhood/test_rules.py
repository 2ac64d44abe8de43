"""`attnlab.ops.neighborhood.rules`: the window rules, the reference mask, argument checks.

The oracle here is written from NATTEN's documented rules (its FlexAttention mask: leader,
centre clamped inward, |centre - key| within the left/right half-windows, same dilation group)
in a different form from `reference_neighborhood_mask` (which walks the rules query by query).
"""
from __future__ import annotations

import math

import pytest
import torch

from attnlab.ops.neighborhood import (BlockedConfig, neighborhood_attention, neighborhood_mask_mod,
                                      neighborhood_pairs, reference_neighborhood_mask)

# --- an independent oracle -------------------------------------------------------------------------

def natten_axis_mask(n, k, r, s, causal):
    """(n, n) bool from NATTEN's formulation, vectorised: coordinates inside the dilation group,
    the group's length, the stride-tile leader, then either the causal band or the clamped centre."""
    q = torch.arange(n)[:, None]
    kv = torch.arange(n)[None, :]
    qg, kg = q // r, kv // r                       # coordinates within the dilation group
    same_group = (q % r) == (kv % r)
    length = (n - q % r + r - 1) // r              # length of the query's group
    if causal:
        leader = torch.minimum(qg // s * s + s - 1, length - 1)
        ok = (qg - kg >= 0) & (leader - kg < k)
    else:
        left, right = k // 2, k // 2 + k % 2 - 1
        leader = torch.minimum(qg // s * s + s // 2, length - 1)
        centre = torch.maximum(torch.minimum(leader, length - 1 - right), torch.full_like(leader, left))
        ok = ((centre - kg >= 0) & (centre - kg <= left)) | ((kg - centre >= 0) & (kg - centre <= right))
    return ok & same_group

def natten_mask(spatial, ks, dil, st, causal):
    mask = torch.ones(1, 1, dtype=torch.bool)
    for n, k, r, s, c in zip(spatial, ks, dil, st, causal):
        a = natten_axis_mask(n, k, r, s, c)
        mask = (mask[:, None, :, None] & a[None, :, None, :]).reshape(mask.shape[0] * n, -1)
    return mask

def window(mask, query):
    return set(torch.nonzero(mask[query]).flatten().tolist())

# --- the mask itself -------------------------------------------------------------------------------

def test_hand_written_windows():
    m = reference_neighborhood_mask((7,), 3)
    assert window(m, 0) == {0, 1, 2} and window(m, 3) == {2, 3, 4} and window(m, 6) == {4, 5, 6}
    m = reference_neighborhood_mask((7,), 4)                       # even: 2 left, 1 right
    assert window(m, 3) == {1, 2, 3, 4} and window(m, 0) == {0, 1, 2, 3} and window(m, 6) == {3, 4, 5, 6}
    m = reference_neighborhood_mask((8,), 3, dilation=2)           # groups {0,2,4,6} and {1,3,5,7}
    assert window(m, 0) == {0, 2, 4} and window(m, 4) == {2, 4, 6} and window(m, 7) == {3, 5, 7}
    m = reference_neighborhood_mask((7,), 3, dilation=2)           # uneven groups: lengths 4 and 3
    assert window(m, 5) == {1, 3, 5} and window(m, 6) == {2, 4, 6}
    m = reference_neighborhood_mask((6,), 3, is_causal=True)
    assert window(m, 0) == {0} and window(m, 1) == {0, 1} and window(m, 4) == {2, 3, 4}
    m = reference_neighborhood_mask((8,), 4, stride=2)             # leaders 1, 3, 5, 7 (right-hand centre)
    assert window(m, 2) == window(m, 3) == {1, 2, 3, 4} and window(m, 7) == {4, 5, 6, 7}
    m = reference_neighborhood_mask((8,), 4, stride=2, is_causal=True)   # leaders 1, 3, 5, 7 (last)
    assert window(m, 2) == {0, 1, 2} and window(m, 3) == {0, 1, 2, 3} and window(m, 4) == {2, 3, 4}
    m = reference_neighborhood_mask((7,), 3, stride=3)             # blocks, the partial one shifted in
    assert window(m, 0) == window(m, 2) == {0, 1, 2} and window(m, 5) == {3, 4, 5} and window(m, 6) == {4, 5, 6}
    m = reference_neighborhood_mask((3, 4), (3, 2), is_causal=(False, True))
    assert window(m, 1 * 4 + 2) == {r * 4 + c for r in range(3) for c in (1, 2)}

@pytest.mark.parametrize("n,k,r", [(n, k, r) for n in (5, 8, 9, 13) for k in (1, 2, 3, 4, 5) for r in (1, 2, 3)
                                   if k * r <= n])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_mask_matches_natten_formulation(n, k, r, causal):
    for s in range(1, k + 1):
        assert torch.equal(reference_neighborhood_mask((n,), k, r, s, causal), natten_axis_mask(n, k, r, s, causal))
        assert neighborhood_pairs((n,), k, r, s, causal) == int(natten_axis_mask(n, k, r, s, causal).sum())

def test_multi_axis_reference_mask_matches_natten_formulation():
    for spatial, ks, dil, st, causal in [((9, 10), (3, 4), (2, 2), (2, 3), (True, False)),
                                         ((5, 6, 7), (2, 3, 2), (2, 1, 3), (2, 3, 1), (False, True, False))]:
        assert torch.equal(reference_neighborhood_mask(spatial, ks, dil, st, causal),
                           natten_mask(spatial, ks, dil, st, causal))

def test_every_query_sees_exactly_kernel_size_keys_without_causal():
    m = reference_neighborhood_mask((11, 9), (4, 3), dilation=(2, 3), stride=(3, 2))
    assert (m.sum(-1) == 12).all()

def test_mask_mod_matches_reference():
    spatial, ks, dil, st, c = (5, 6, 4), (3, 2, 2), (1, 3, 2), (2, 1, 2), (True, False, False)
    mod = neighborhood_mask_mod(spatial, ks, dil, st, c)
    N = math.prod(spatial)
    idx = torch.arange(N)
    got = mod(torch.zeros(()), torch.zeros(()), idx[:, None], idx[None, :])
    assert torch.equal(got, reference_neighborhood_mask(spatial, ks, dil, st, c))

# --- bad input ---------------------------------------------------------------------------------------

def qkv(*shape):
    return tuple(torch.randn(*shape) for _ in range(3))

def test_kernel_times_dilation_longer_than_axis():
    with pytest.raises(ValueError, match=r"axis 1 has length 6.*kernel_size 4 \* dilation 2 = 8"):
        neighborhood_attention(*qkv(1, 1, 9, 6, 4), (3, 4), dilation=2)

@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=0), "kernel_size must be >= 1, got 0"),
    (dict(kernel_size=3, dilation=0), "dilation must be >= 1, got 0"),
    (dict(kernel_size=3, stride=0), "stride must be >= 1, got 0"),
    (dict(kernel_size=3, stride=4), r"stride \(4\) must be <= kernel_size \(3\)"),
    (dict(kernel_size=(3, 3)), r"kernel_size has 2 entries \(3, 3\), expected one per spatial axis \(1\)"),
    (dict(kernel_size=3, backend="cuda"), "unknown backend 'cuda'"),
    (dict(kernel_size=3, config=BlockedConfig(method="fast")), "method must be 'fused', 'sdpa' or 'chunks', got 'fast'"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(*qkv(1, 2, 8, 4), **kwargs)

@pytest.mark.parametrize("kwargs", [dict(kernel_size=3.0), dict(kernel_size=True), dict(kernel_size=3, is_causal=1)])
def test_bad_option_types_raise_type_error(kwargs):
    with pytest.raises(TypeError, match="kernel_size|is_causal"):
        neighborhood_attention(*qkv(1, 2, 8, 4), **kwargs)

@pytest.mark.parametrize("shape", [(2, 8, 4), (1, 1, 2, 2, 2, 2, 4)])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"\(B, h, \*spatial, d\) with 1 to 3 spatial axes"):
        neighborhood_attention(*qkv(*shape), 1)

def test_mismatched_tensors():
    q, k, v = qkv(1, 2, 8, 4)
    with pytest.raises(ValueError, match="share batch and spatial shape"):
        neighborhood_attention(q, k[:, :, :7], v, 3)
    with pytest.raises(ValueError, match="head dim"):
        neighborhood_attention(q, k[..., :3], v, 3)
    with pytest.raises(TypeError, match="floating point"):
        neighborhood_attention(q.long(), k, v, 3)
    with pytest.raises(TypeError, match="one dtype"):
        neighborhood_attention(q, k.double(), v, 3)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        neighborhood_attention(torch.randn(1, 3, 8, 4), k, v, 3)
