"""`attention(q, k, v, ...)`: scaled dot-product attention over several backends.

Backends, in default priority order (`attnlab.ops._dispatch.BACKENDS` describes them all):
- `sdpa`: torch.nn.functional.scaled_dot_product_attention (fused kernels where torch has them).
- `flex`: FlexAttention (torch.nn.attention.flex_attention); compiled on GPU, forward-only on CPU.
- `reference`: the naive eager oracle in `attnlab.ops.reference`.

`backend=None` picks the first backend that can run the call (the default can be changed with
`use_backend(name)` or the ATTNLAB_BACKEND environment variable). An explicit backend never
falls back: when it cannot run, the error says why; when none can, it lists every reason.

Equivalent PyTorch (for every backend):
    scores = q @ k.transpose(-2, -1) * scale + mask      # (B, h, N, M)
    out = scores.softmax(-1) @ v                         # (B, h, N, dv); empty rows -> 0
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import shape_text
from attnlab.masks import PreparedMask, prepare_mask
from attnlab.ops._dispatch import (BackendUnavailable, check_backend, choose, default_backend, flex_function,
                                   flex_module, flex_reasons, implementations, no_reasons, serving, use_backend)
from attnlab.ops.reference import reference_attention

__all__ = ["attention", "check_qkv", "use_backend", "default_backend", "BackendUnavailable", "PRIORITY",
           "IMPLEMENTATIONS"]

OP = "attention"
PRIORITY = serving(OP)          # ("sdpa", "flex", "reference")


# --- backends: each is a pair (reasons it cannot run, run) -------------------------------------

def _sdpa_run(q, k, v, prepared: PreparedMask, scale, dropout_p, attn_mask, is_causal):
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=prepared.mask, is_causal=prepared.is_causal,
                                          dropout_p=dropout_p, scale=scale, enable_gqa=gqa)


def _flex_reasons(q, k, v, prepared, dropout_p) -> list[str]:
    return flex_reasons(q, k, v, dropout_p)


def _flex_run(q, k, v, prepared: PreparedMask, scale, dropout_p, attn_mask, is_causal):
    fa = flex_module()
    B, h, N, _ = q.shape
    M = k.shape[-2]
    block_mask = score_mod = None
    mask = prepared.mask
    if prepared.is_causal:
        def causal_mask(b, hh, q_idx, kv_idx):
            return kv_idx <= q_idx
        block_mask = fa.create_block_mask(causal_mask, None, None, N, M, device=q.device)
    elif mask is not None and mask.dtype == torch.bool:
        full = mask.expand(B, h, N, M)

        def tensor_mask(b, hh, q_idx, kv_idx):
            return full[b, hh, q_idx, kv_idx]
        block_mask = fa.create_block_mask(tensor_mask, B, h, N, M, device=q.device)
    elif mask is not None:
        bias = mask.expand(B, h, N, M)

        def add_bias(score, b, hh, q_idx, kv_idx):
            return score + bias[b, hh, q_idx, kv_idx]
        score_mod = add_bias
    # FlexAttention's compiled wrapper guards on its inputs not aliasing each other. A call whose
    # k and v are one tensor (minimal with collapse_qk and collapse_vo="one" uses x for both)
    # after calls that did not alias fails that guard, and torch 2.13 then crashes with a
    # TypeError while explaining the recompile. A copy costs one (B, h, M, d) tensor.
    if k.data_ptr() == q.data_ptr():
        k = k.clone()
    if v.data_ptr() in (q.data_ptr(), k.data_ptr()):
        v = v.clone()
    fn = flex_function(q.device.type)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                  enable_gqa=k.shape[1] != q.shape[1])


def _reference_run(q, k, v, prepared, scale, dropout_p, attn_mask, is_causal, scores_hook=None, probs_hook=None):
    # The oracle gets the caller's raw mask, not the prepared one, so it checks the preparation.
    return reference_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                               dropout_p=dropout_p, scores_hook=scores_hook, probs_hook=probs_hook)


# name -> (reasons it cannot run a call, run it); the names are the dispatch table's
IMPLEMENTATIONS = implementations(OP, {
    "sdpa": (no_reasons, _sdpa_run),
    "flex": (_flex_reasons, _flex_run),
    "reference": (no_reasons, _reference_run),
})


def check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, h, N, d), got shape {shape_text(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v must share the batch size, got q {shape_text(q)}, k {shape_text(k)}, v {shape_text(v)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim, got q {shape_text(q)} and k {shape_text(k)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must share heads and length, got k {shape_text(k)} and v {shape_text(v)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def attention(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None,
              is_causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
              backend: str | None = None, scores_hook: Callable[[Tensor], Tensor] | None = None,
              probs_hook: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Scaled dot-product attention in the SDPA layout.

    q (B, h, N, d), k (B, h_kv, M, d), v (B, h_kv, M, dv), h a multiple of h_kv (grouped-query
    attention) -> out (B, h, N, dv) in q's dtype. See `attnlab.masks` for the mask conventions.
    `scores_hook` / `probs_hook` (a mechanism's hook points) see and may replace the scores
    (B, h, N, M) and probabilities when the reference backend runs the call; the fused
    backends never materialise them, so there the hooks are not called.
    """
    check_qkv(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    B, h, N, d = q.shape
    M = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    prepared = prepare_mask(attn_mask, B=B, h=h, N=N, M=M, is_causal=is_causal, dtype=q.dtype, device=q.device)

    check_backend(OP, backend)
    if backend is None:
        default_backend()       # a bad ATTNLAB_BACKEND is an error on every call, empty ones too

    if B == 0 or N == 0 or M == 0 or h == 0:  # nothing to attend: defined as zeros, on every backend
        return q.new_zeros(B, h, N, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())

    name = choose(OP, backend, PRIORITY, lambda n: IMPLEMENTATIONS[n][0](q, k, v, prepared, dropout_p))
    hooks = dict(scores_hook=scores_hook, probs_hook=probs_hook) if name == "reference" else {}
    out = IMPLEMENTATIONS[name][1](q, k, v, prepared, scale, dropout_p, attn_mask, is_causal, **hooks)
    if prepared.row_valid is not None and name != "reference":
        out = out.masked_fill(~prepared.row_valid, 0.0)
    return out
