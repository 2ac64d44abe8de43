"""Head-layout helpers shared by mechanisms and kernels, SDPA layout (B, h, N, d). The naive
oracles in ops/reference.py keep their own copy on purpose: they never share code with what they check."""
from __future__ import annotations

from torch import Tensor

__all__ = ["split_qkv", "expand_kv"]


def split_qkv(qkv: Tensor, h: int, h_kv: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split a fused projection (B, N, (h + 2 h_kv) d) into q (B, h, N, d), k and v (B, h_kv, N, d).

    The feature axis is laid out [q heads | k heads | v heads]; with h_kv == h this is the
    classic (3, h, d) interleave and one reshape/permute view serves all three.
    """
    B, N, _ = qkv.shape
    if h_kv == h:
        q, k, v = qkv.reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
        return q, k, v
    q, k, v = qkv.split([h * d, h_kv * d, h_kv * d], dim=-1)
    q = q.reshape(B, N, h, d).transpose(1, 2)                    # (B, h, N, d)
    k = k.reshape(B, N, h_kv, d).transpose(1, 2)                 # (B, h_kv, N, d)
    v = v.reshape(B, N, h_kv, d).transpose(1, 2)                 # (B, h_kv, N, d)
    return q, k, v


def expand_kv(k: Tensor, v: Tensor, h: int) -> tuple[Tensor, Tensor]:
    """Grouped-query attention: repeat k (B, h_kv, M, d) and v (B, h_kv, M, dv) to h heads.

    Each kv head serves h // h_kv consecutive query heads; with h_kv == h both come back as they are.
    """
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    return k, v
