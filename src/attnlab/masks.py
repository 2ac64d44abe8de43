"""Masks: predicates `(b, h, q_idx, kv_idx) -> bool` and the normalisation of `attn_mask`.

Conventions (shared by every mechanism and backend):
- bool masks: True = may attend; broadcastable to (B, h, N, M);
- a 2-D mask is a key-padding mask of shape (B, M) (or (1, M)); a pattern over (N, M) must be
  given with explicit leading dims, e.g. (1, 1, N, M);
- float masks are added to the scores (-inf forbids a key);
- `is_causal` aligns the causal diagonal bottom-right: query i of N may see key j of M when
  j <= i + (M - N). With N == M this is the usual lower triangle; with a KV cache (M > N) the
  new queries sit at the end of the sequence. It combines with `attn_mask` by AND;
- a query row with no allowed key outputs zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def causal(offset: int = 0) -> MaskMod:
    """Causal predicate; `offset = M - N` aligns the diagonal bottom-right."""
    def causal_mask(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset
    return causal_mask


def key_padding(valid: Tensor) -> MaskMod:
    """Predicate from a (B, M) bool tensor of valid keys."""
    def key_padding_mask(b, h, q_idx, kv_idx):
        return valid[b, kv_idx]
    return key_padding_mask


def and_masks(*mods: MaskMod) -> MaskMod:
    def all_of(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for mod in mods[1:]:
            out = out & mod(b, h, q_idx, kv_idx)
        return out
    return all_of


def materialize_mask(mask_mod: MaskMod, B: int, h: int, N: int, M: int, device=None) -> Tensor:
    """Evaluate a predicate on the full grid: a bool tensor (B, h, N, M)."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    hh = torch.arange(h, device=device).view(1, h, 1, 1)
    q_idx = torch.arange(N, device=device).view(1, 1, N, 1)
    kv_idx = torch.arange(M, device=device).view(1, 1, 1, M)
    return mask_mod(b, hh, q_idx, kv_idx).expand(B, h, N, M)


def causal_grid(N: int, M: int, device=None) -> Tensor:
    """Bottom-right aligned causal mask (N, M), True = may attend."""
    return materialize_mask(causal(M - N), 1, 1, N, M, device)[0, 0]


def allowed_and_bias(attn_mask: Tensor | None, is_causal: bool, B: int, h: int, N: int, M: int,
                     device) -> tuple[Tensor, Tensor | None]:
    """The mask conventions for eager mechanisms with their own weighting (not softmax over
    ops.attention): (allowed: bool (B|1, h|1, N, M), bias: the float mask or None)."""
    allowed = torch.ones(1, 1, N, M, dtype=torch.bool, device=device)
    bias = None
    if attn_mask is not None:
        mask = check_attn_mask(attn_mask, B, h, N, M).to(device)
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            allowed = allowed & (mask != float("-inf"))
            bias = mask
    if is_causal:   # bottom-right aligned: query i is position M - N + i
        allowed = allowed & causal_grid(N, M, device)
    return allowed, bias


@dataclass
class PreparedMask:
    """What a backend needs: a mask (bool or float, 4-D broadcastable) or the causal flag."""

    mask: Tensor | None          # None when there is nothing to mask (or is_causal covers it)
    is_causal: bool              # only True when mask is None and N == M
    row_valid: Tensor | None     # (B|1, h|1, N, 1) bool; False rows must output zeros


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t) + ")"


def check_attn_mask(attn_mask, B: int, h: int, N: int, M: int) -> Tensor:
    """Validate `attn_mask` and return it as a 4-D tensor broadcastable to (B, h, N, M)."""
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor (bool or float), got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError("attn_mask must be bool (True = may attend) or floating (added to the scores), "
                        f"got dtype {attn_mask.dtype}")
    target = (B, h, N, M)
    if attn_mask.dim() == 2:
        if attn_mask.shape[0] not in (B, 1) or attn_mask.shape[1] not in (M, 1):
            raise ValueError(f"a 2-D attn_mask is a key-padding mask (B, M) = {_shape((B, M))}, got "
                             f"{_shape(attn_mask.shape)}; pass an (N, M) pattern as (1, 1, N, M)")
        attn_mask = attn_mask[:, None, None, :]
    elif attn_mask.dim() > 4 or attn_mask.dim() == 0:
        raise ValueError(f"attn_mask must have 1 to 4 dims broadcastable to (B, h, N, M) = "
                         f"{_shape(target)}, got shape {_shape(attn_mask.shape)}")
    else:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if any(s not in (t, 1) for s, t in zip(attn_mask.shape, target)):
        raise ValueError(f"attn_mask of shape {_shape(attn_mask.shape)} is not broadcastable to "
                         f"(B, h, N, M) = {_shape(target)}")
    if attn_mask.is_floating_point() and torch.isnan(attn_mask).any():
        raise ValueError("attn_mask (float, added to the scores) contains NaN")
    return attn_mask


def prepare_mask(attn_mask: Tensor | None, *, B: int, h: int, N: int, M: int, is_causal: bool,
                 dtype: torch.dtype, device) -> PreparedMask:
    """Combine `attn_mask` and `is_causal` into one mask and find rows with no allowed key."""
    if attn_mask is None:
        if not is_causal:
            return PreparedMask(None, False, None)
        if N == M:
            return PreparedMask(None, True, None)
        if N <= M:  # every query sees at least its own diagonal key
            return PreparedMask(causal_grid(N, M, device)[None, None], False, None)
        attn_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    else:
        attn_mask = check_attn_mask(attn_mask, B, h, N, M)
        attn_mask = attn_mask.to(device)

    if attn_mask.dtype == torch.bool:
        if is_causal:
            attn_mask = attn_mask & causal_grid(N, M, device)
        row_valid = attn_mask.any(-1, keepdim=True)
        attn_mask = attn_mask | ~row_valid      # a fully masked row attends everywhere, then is zeroed
    else:
        if is_causal:
            attn_mask = attn_mask.masked_fill(~causal_grid(N, M, device), float("-inf"))
        # Decide which rows are empty before any cast: a large finite bias (HF uses
        # finfo(float32).min) must not turn into -inf in float16 and silently empty a row.
        row_valid = (attn_mask != float("-inf")).any(-1, keepdim=True)
        attn_mask = attn_mask.masked_fill(~row_valid, 0.0)
        if attn_mask.dtype != dtype:
            info = torch.finfo(dtype)
            finite = attn_mask.clamp(info.min, info.max)
            attn_mask = torch.where(torch.isinf(attn_mask), attn_mask, finite).to(dtype)
    return PreparedMask(attn_mask, False, row_valid)
