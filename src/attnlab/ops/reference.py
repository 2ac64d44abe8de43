"""Naive eager oracles: the formulas written plainly, float64-friendly, no optional deps.

These never share code with the fast paths they check (mask handling included), so a bug in
`attnlab.masks` or a backend cannot hide in both.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None,
                        is_causal: bool = False, scale: float | None = None,
                        dropout_p: float = 0.0, scores_hook: Callable[[Tensor], Tensor] | None = None,
                        probs_hook: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v with attnlab's mask conventions.

    q (B, h, N, d), k (B, h_kv, M, d), v (B, h_kv, M, dv) with h % h_kv == 0 -> (B, h, N, dv).
    Computed in float64 for float64 inputs and float32 otherwise, cast back at the end.
    `scores_hook` / `probs_hook` (e.g. a module's hook points) see, and may replace, the
    softmax input (B, h, N, M) (-inf where masked) and its output before dropout.
    """
    B, h, N, d = q.shape
    M = k.shape[-2]
    if k.shape[1] != h:  # grouped-query attention: each kv head serves h // h_kv query heads
        k = k.repeat_interleave(h // k.shape[1], dim=1)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.einsum("bhnd,bhmd->bhnm", q.to(compute), k.to(compute)) * scale  # (B, h, N, M)

    allowed = torch.ones(N, M, dtype=torch.bool, device=q.device)
    if is_causal:  # query i is position M - N + i of the full sequence and sees keys up to it
        query_pos = torch.arange(N, device=q.device)[:, None] + (M - N)
        allowed = torch.arange(M, device=q.device)[None, :] <= query_pos
    allowed = allowed.expand(B, h, N, M)
    if attn_mask is not None:
        mask = attn_mask
        if mask.dim() == 2:  # key padding (B, M)
            mask = mask[:, None, None, :]
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.to(compute)
            allowed = allowed & (mask != float("-inf"))
    row_has_key = allowed.any(-1, keepdim=True)                            # (B, h, N, 1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores = scores.masked_fill(~row_has_key, 0.0)   # keeps softmax finite; zeroed below
    if scores_hook is not None:
        scores = scores_hook(scores)
    probs = torch.softmax(scores, dim=-1) * row_has_key                    # (B, h, N, M)
    if probs_hook is not None:
        probs = probs_hook(probs)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.einsum("bhnm,bhmd->bhnd", probs, v.to(compute))            # (B, h, N, dv)
    return out.to(q.dtype)
