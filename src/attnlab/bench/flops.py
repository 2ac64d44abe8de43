"""FLOPs of one forward and one backward at a bench shape, and the SDPA formulas they rest on.

A mechanism class may define `useful_flops(batch, seq_len, dim, num_heads, causal) ->
(fwd_flops, bwd_flops)` (a classmethod, staticmethod or method). Otherwise one forward and one
backward are counted with `torch.utils.flop_counter.FlopCounterMode`, in which the fused SDPA
kernels count their useful work (the pairs a causal mask keeps, no recompute) and every other op
counts what it executes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def attention_pairs(n: int, m: int, causal: bool) -> int:
    """(query, key) pairs that matter: all N*M, or those with key <= query (top-left causal)."""
    if not causal:
        return n * m
    return m * (m + 1) // 2 + (n - m) * m if n > m else n * (n + 1) // 2


def attention_flops(pairs: int, heads: int, head_dim: int, value_dim: int | None = None) -> int:
    """Forward FLOPs of scores and weighted sum: 2 * (d + dv) per (query, key) pair and head.

    The backward of the same is counted as twice this (dq, dk, dv and the score gradients),
    without a kernel's recompute of the scores.
    """
    return 2 * heads * pairs * (head_dim + (head_dim if value_dim is None else value_dim))


def dense_module_flops(batch: int, seq_len: int, dim: int, causal: bool) -> tuple[int, int]:
    """(fwd, bwd) of Linear(C, 3C) -> dense attention -> Linear(C, C) on (B, N, C) tokens.

    Forward: qkv 2*B*N*C*3C, proj 2*B*N*C*C, and attention_flops over B * pairs with h*d = C.
    Backward: twice the forward (input and weight gradients of each linear; see attention_flops).
    """
    B, N, C = batch, seq_len, dim
    pairs = B * attention_pairs(N, N, causal)
    fwd = 2 * B * N * C * 3 * C + 2 * B * N * C * C + attention_flops(pairs, 1, C)
    return fwd, 2 * fwd


def _sdpa_formula(op, backward: bool) -> Callable[..., int]:
    """A FlopCounterMode formula for one fused SDPA op that counts the useful work only.

    torch's own formulas count every pair even when causal, add the recompute, and miss the CPU
    kernel; with these, dense attention counts the same whichever kernel runs it.
    """
    names = [a.name for a in op.default._schema.arguments]

    def count(*args, out_shape=None, **kwargs) -> int:
        bound = {**dict(zip(names, args)), **kwargs}                 # tensors arrive as their shapes
        (b, h, n, d), m, dv = bound["query"], bound["key"][-2], bound["value"][-1]
        fwd = attention_flops(b * attention_pairs(n, m, bool(bound.get("is_causal", False))), h, d, dv)
        return 2 * fwd if backward else fwd
    return count


def flop_counter_mapping() -> dict:
    """FlopCounterMode's custom_mapping: the fused SDPA kernels of this torch, counted as above."""
    aten = torch.ops.aten
    mapping = {}
    for kernel in ("flash_attention_for_cpu", "flash_attention", "efficient_attention", "cudnn_attention"):
        for backward in (False, True):
            op = getattr(aten, f"_scaled_dot_product_{kernel}{'_backward' if backward else ''}", None)
            if op is not None:
                mapping[op] = _sdpa_formula(op, backward)
    return mapping


def count_flops(m: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, *, heads: int,
                causal: bool) -> tuple[int, int, str]:
    """(forward, backward) FLOPs of `m` on x (B, N, C), and where they come from.

    The module's `useful_flops` where it has one that answers, else one counted forward and
    backward (`out.backward(grad_out)`; gradients of m and x are cleared first).
    """
    batch, seq_len, dim = x.shape
    useful = getattr(m, "useful_flops", None)
    if callable(useful):
        try:
            counts = useful(batch, seq_len, dim, heads, causal)
        except NotImplementedError:
            counts = None
        if counts is not None:
            fwd, bwd = counts
            return int(fwd), int(bwd), "useful_flops"
    for p in m.parameters():
        p.grad = None
    x.grad = None
    kwargs: dict[str, Any] = {"is_causal": True} if causal else {}
    with FlopCounterMode(display=False, custom_mapping=flop_counter_mapping()) as counter:
        out = m(x, **kwargs)
    fwd = counter.get_total_flops()
    with FlopCounterMode(display=False, custom_mapping=flop_counter_mapping()) as counter:
        out.backward(grad_out)
    return int(fwd), int(counter.get_total_flops()), "flop_counter"
