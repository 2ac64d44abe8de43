"""`attnlab.ops.neighborhood.flex`: the FlexAttention backend on CPU (forward only there)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from attnlab.ops import BackendUnavailable
from attnlab.ops.neighborhood import neighborhood_attention, reference_neighborhood_mask

def oracle(q, k, v, ks, dil=1, st=1, causal=False, scale=None):
    """softmax(q k^T * scale, masked) v in float64 over the flattened tokens; the mask is the
    reference one, which test_rules.py checks against NATTEN's formulation."""
    spatial = tuple(q.shape[2:-1])
    mask = reference_neighborhood_mask(spatial, ks, dil, st, causal)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    B, h, N = q.shape[0], q.shape[1], math.prod(spatial)
    qf, kf, vf = (t.reshape(B, h, N, t.shape[-1]).double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhnd,bhmd->bhnm", qf, kf) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhnm,bhmd->bhnd", probs, vf).reshape(*q.shape[:-1], v.shape[-1])

def test_flex_on_cpu_without_grad_matches_reference():
    torch.manual_seed(0)
    spatial, ks, dil, st, causal = (9, 10), (3, 4), (2, 2), (2, 3), (True, False)
    q, k, v = (torch.randn(1, 2, *spatial, 8) for _ in range(3))
    out = neighborhood_attention(q, k, v, ks, dil, st, causal, backend="flex")
    assert_close(out, oracle(q, k, v, ks, dil, st, causal).float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, oracle(q, k, v, spatial).float())   # the mask did something

def test_explicit_flex_with_grad_on_cpu_refuses_with_reason():
    q, k, v = (torch.randn(1, 1, 8, 4, requires_grad=True) for _ in range(3))
    with pytest.raises(BackendUnavailable, match="no backward on CPU"):
        neighborhood_attention(q, k, v, 3, backend="flex")
