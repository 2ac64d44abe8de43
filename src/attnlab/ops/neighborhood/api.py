"""`neighborhood_attention(q, k, v, kernel_size, ...)`: Generalized Neighborhood Attention, 1-3 spatial axes.

The window rules (kernel_size, dilation, stride, is_causal) are NATTEN's; see `rules`.

Backends (one table for every op: `attnlab.ops._dispatch`), in priority order:
- `flex` (first choice on CUDA only): FlexAttention with a block mask built from the predicate
  `neighborhood_mask_mod` (`flex`); on CPU only when asked and without autograd (FlexAttention
  has no CPU backward).
- `blocked`: attnlab's own kernels, with backward. Methods (`BlockedConfig.method`):
  `fused` (default on CPU where it runs: float32/half inputs, head dims multiples of 8, a C++
  compiler) is a C++ kernel built on first use (`fused`): queries in groups of 4 along the last
  axis, only the union of their windows computed per key row, exact per-query masks, forward
  and backward one pass each. `chunks` (the fallback, and float64) tiles the queries and
  attends each tile's box of keys with batched matmuls; `sdpa` sends every tile's box through
  SDPA's fused kernel at once (`chunked`). Half-precision inputs are computed in float32.
- `reference`: the full (N, N) mask from `reference_neighborhood_mask` (plain Python loops
  over the rules) and dense masked attention through `attnlab.ops.reference`'s naive oracle.
  O(N^2) memory; the correctness oracle.
`backend=None` takes the default of `attnlab.use_backend` / ATTNLAB_BACKEND when it is one of
these (without fallback), else the first backend above that can run the call. An explicit
backend never falls back; when it cannot run, the error says why.

Equivalent PyTorch (every backend):
    allowed = reference_neighborhood_mask(spatial, kernel_size, dilation, stride, is_causal)  # (N, N)
    scores = q.flatten(2, -2) @ k.flatten(2, -2).transpose(-2, -1) * scale                     # (B, h, N, N)
    out = scores.masked_fill(~allowed, -inf).softmax(-1) @ v.flatten(2, -2)                    # (B, h, N, dv)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from attnlab.ops._dispatch import BackendUnavailable, check_backend, choose, implementations, no_reasons, serving
from attnlab.ops.neighborhood import fused
from attnlab.ops.neighborhood.chunked import (BlockedConfig, blocked_tile, chunked_neighborhood,
                                              sdpa_tiles_neighborhood)
from attnlab.ops.neighborhood.flex import flex_neighborhood, flex_reasons
from attnlab.ops.neighborhood.rules import check_neighborhood_qkv, neighborhood_args, reference_neighborhood_mask
from attnlab.ops.reference import reference_attention

__all__ = ["neighborhood_attention", "NA_BACKENDS", "IMPLEMENTATIONS"]

OP = "neighborhood_attention"
NA_BACKENDS = serving(OP)       # ("flex", "blocked", "reference")


def _blocked(q, k, v, spatial, ks, dil, st, causal, scale, config: BlockedConfig | None):
    """q (B, h, *spatial, d), k, v with as many heads -> (B, h, *spatial, dv): the fused kernel
    where it can run (or is asked for), else the chunked or SDPA-tile method."""
    config = config or BlockedConfig()
    blocked_tile(spatial, ks, st, config.tile)      # a bad tile is an error whichever method runs
    B, h = q.shape[:2]
    N = math.prod(spatial)
    d, dv = q.shape[-1], v.shape[-1]
    compute = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    qf = q.reshape(B * h, N, d).to(compute).contiguous()                 # (BH, N, d)
    kf = k.reshape(B * h, N, d).to(compute).contiguous()                 # (BH, N, d)
    vf = v.reshape(B * h, N, dv).to(compute).contiguous()                # (BH, N, dv)
    method = config.method
    if method is None or method == "fused":
        reasons = fused.fused_reasons(q, k, v)
        if not reasons:
            out = fused.fused_neighborhood(qf, kf, vf, spatial, ks, dil, st, causal, scale, config.threads,
                                           config.save_probs)
            return out.view(B, h, *spatial, dv).to(q.dtype)
        if method == "fused":
            raise BackendUnavailable("neighborhood_attention: BlockedConfig(method='fused') cannot run this call ("
                                     + "; ".join(reasons) + ")")
        method = "chunks"
    if method == "sdpa":
        out = sdpa_tiles_neighborhood(qf, kf, vf, spatial, ks, dil, st, causal, scale, config)
    elif method == "chunks":
        out = chunked_neighborhood(qf, kf, vf, spatial, ks, dil, st, causal, scale, config)
    else:
        raise ValueError(f"neighborhood_attention: BlockedConfig.method must be 'fused', 'sdpa' or 'chunks', "
                         f"got {method!r}")
    return out.view(B, h, *spatial, dv).to(q.dtype)


def _blocked_run(q, k, v, spatial, ks, dil, st, causal, scale, config):
    h = q.shape[1]
    if k.shape[1] != h:  # grouped-query attention: each kv head serves h // h_kv query heads
        k = k.repeat_interleave(h // k.shape[1], dim=1)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    return _blocked(q, k, v, spatial, ks, dil, st, causal, scale, config)


def _flex_run(q, k, v, spatial, ks, dil, st, causal, scale, config):
    return flex_neighborhood(q, k, v, spatial, ks, dil, st, causal, scale)


def _reference_run(q, k, v, spatial, ks, dil, st, causal, scale, config):
    B, h = q.shape[:2]
    N = math.prod(spatial)
    mask = reference_neighborhood_mask(spatial, ks, dil, st, causal).to(q.device)[None, None]  # (1, 1, N, N)
    qf, kf, vf = (t.reshape(t.shape[0], t.shape[1], N, t.shape[-1]) for t in (q, k, v))     # (B, h|h_kv, N, d)
    out = reference_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    return out.view(B, h, *spatial, v.shape[-1])


# name -> (reasons it cannot run a call, run it); the names are the dispatch table's
IMPLEMENTATIONS = implementations(OP, {
    "flex": (flex_reasons, _flex_run),
    "blocked": (no_reasons, _blocked_run),
    "reference": (no_reasons, _reference_run),
})


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, kernel_size, dilation=1, stride=1,
                           is_causal=False, scale: float | None = None, backend: str | None = None, *,
                           config: BlockedConfig | None = None) -> Tensor:
    """Generalized neighborhood attention in the SDPA layout with 1 to 3 spatial axes.

    q (B, h, *spatial, d), k (B, h_kv, *spatial, d), v (B, h_kv, *spatial, dv), h a multiple of
    h_kv -> out (B, h, *spatial, dv) in q's dtype. `kernel_size`, `dilation`, `stride` are ints
    or per-axis tuples, `is_causal` a bool or a per-axis tuple; semantics in
    `attnlab.ops.neighborhood.rules`. `backend`: "flex", "blocked" or "reference", or None: the
    default of `attnlab.use_backend` / ATTNLAB_BACKEND where it is one of these, else the
    automatic pick (module docstring); `config` tunes the blocked backend.
    """
    check_neighborhood_qkv(q, k, v)
    spatial = tuple(q.shape[2:-1])
    ks, dil, st, causal = neighborhood_args(spatial, kernel_size, dilation, stride, is_causal)
    check_backend(OP, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    B, h = q.shape[:2]
    if B == 0 or h == 0 or math.prod(spatial) == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())
    # FlexAttention is the first choice on CUDA only: on CPU it runs eagerly and the blocked kernel is faster
    priority = NA_BACKENDS if q.device.type == "cuda" else tuple(n for n in NA_BACKENDS if n != "flex")
    name = choose(OP, backend, priority, lambda n: IMPLEMENTATIONS[n][0](q, k, v))
    return IMPLEMENTATIONS[name][1](q, k, v, spatial, ks, dil, st, causal, scale, config)
