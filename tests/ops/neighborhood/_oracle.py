"""The float64 oracle every neighborhood test file compares a backend with."""
from __future__ import annotations

import math

import torch

from attnlab.ops.neighborhood import reference_neighborhood_mask


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
