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


# The geometries every backend test runs: 1-D edge cases (odd/even windows, dilation groups,
# stride, causal) and mixed 2-D/3-D options.
CASES = {  # spatial, kernel_size, dilation, stride, is_causal
    "odd": ((13,), 5, 1, 1, False),
    "even": ((13,), 4, 1, 1, False),
    "full_length": ((9,), 9, 1, 1, False),
    "kernel_1": ((6,), 1, 1, 1, False),
    "dilation_even_groups": ((12,), 3, 2, 1, False),
    "dilation_uneven_groups": ((13,), 3, 3, 1, False),
    "stride_odd": ((14,), 5, 1, 3, False),
    "stride_even": ((14,), 4, 1, 2, False),
    "stride_is_kernel": ((12,), 4, 1, 4, False),
    "causal": ((13,), 4, 1, 1, True),
    "causal_stride": ((13,), 4, 1, 3, True),
    "causal_dilation_stride": ((17,), 3, 2, 2, True),
    "all_1d": ((23,), 6, 3, 4, False),
    "2d": ((7, 9), (3, 4), 1, 1, False),
    "2d_combined": ((9, 10), (3, 4), (2, 2), (2, 3), (True, False)),
    "3d": ((4, 5, 6), (2, 3, 3), 1, 1, False),
    "3d_combined": ((5, 6, 7), (2, 3, 2), (2, 1, 3), (2, 3, 1), (False, True, False)),
}
