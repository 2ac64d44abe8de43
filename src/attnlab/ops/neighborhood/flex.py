"""The flex backend of `neighborhood_attention`: FlexAttention with a neighborhood block mask.

The block mask is built once per geometry from the predicate `neighborhood_mask_mod` (the
window rules of `rules`). FlexAttention skips work per block of 128 queries x 128 keys, so in
2-D and 3-D the tokens are first permuted into tiles (`flex_tile`, `tile_tokens`) that make a
block a compact patch, as GNA's token permutation does. Compiled on GPU; on CPU it runs
eagerly and forward-only.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

from torch import Tensor

from attnlab.ops._dispatch import flex_function, flex_module, flex_reasons
from attnlab.ops.neighborhood.rules import neighborhood_args, neighborhood_mask_mod

__all__ = ["flex_reasons", "flex_neighborhood", "flex_tile", "tile_tokens", "untile_tokens"]


def flex_tile(spatial: Sequence[int], kernel_size, dilation=1, block: int = 128) -> tuple[int, ...] | None:
    """A tile shape of `block` tokens (powers of two dividing each axis) that minimises the key
    blocks a query block touches, or None when row-major order is as good (1-D) or none fits.

    FlexAttention skips work per (128 query, 128 key) block; in row-major order a 2-D window
    spans `kernel` rows, so most of each visited block is masked. Tiled order makes a block a
    compact patch, as GNA's token permutation does.
    """
    spatial = tuple(int(n) for n in spatial)
    if len(spatial) == 1:
        return None
    ks, dil, _, _ = neighborhood_args(spatial, kernel_size, dilation, 1, False)
    best, best_cost = None, None

    def search(axis, remaining, chosen):
        nonlocal best, best_cost
        if axis == len(spatial):
            if remaining == 1:
                cost = math.prod(min(n, t + (k - 1) * r) / t for n, t, k, r in zip(spatial, chosen, ks, dil))
                if best_cost is None or cost < best_cost:
                    best, best_cost = tuple(chosen), cost
            return
        t = 1
        while t <= remaining and spatial[axis] % t == 0:
            search(axis + 1, remaining // t, chosen + [t])
            t *= 2
    search(0, block, [])
    return best


def tile_tokens(x: Tensor, spatial: Sequence[int], tile: Sequence[int]) -> Tensor:
    """(B, h, *spatial, d) -> (B, h, N, d) in tiled order (tiles row-major, tokens row-major inside)."""
    nd = len(spatial)
    B, h, d = x.shape[0], x.shape[1], x.shape[-1]
    split = [s for n, t in zip(spatial, tile) for s in (n // t, t)]
    x = x.reshape(B, h, *split, d)
    order = [0, 1] + [2 + 2 * a for a in range(nd)] + [3 + 2 * a for a in range(nd)] + [2 + 2 * nd]
    return x.permute(order).reshape(B, h, math.prod(spatial), d)


def untile_tokens(x: Tensor, spatial: Sequence[int], tile: Sequence[int]) -> Tensor:
    """Inverse of `tile_tokens`: (B, h, N, d) in tiled order -> (B, h, *spatial, d)."""
    nd = len(spatial)
    B, h, d = x.shape[0], x.shape[1], x.shape[-1]
    grid = [n // t for n, t in zip(spatial, tile)]
    x = x.reshape(B, h, *grid, *tile, d)
    order = [0, 1] + [p for a in range(nd) for p in (2 + a, 2 + nd + a)] + [2 + 2 * nd]
    return x.permute(order).reshape(B, h, *spatial, d)


_block_masks: dict[tuple, tuple] = {}   # (shape, options, device) -> (BlockMask, tile)


def _flex_block_mask(spatial, ks, dil, st, causal, device):
    """The BlockMask (and token tiling) for one geometry, built once: building it evaluates the
    predicate over all N^2 pairs, which costs more than the attention itself."""
    key = (spatial, ks, dil, st, causal, str(device))
    if key not in _block_masks:
        fa = flex_module()
        N = math.prod(spatial)
        tile = flex_tile(spatial, ks, dil)
        mask_mod = neighborhood_mask_mod(spatial, ks, dil, st, causal, device=device, tile=tile)
        if len(_block_masks) >= 64:
            _block_masks.pop(next(iter(_block_masks)))
        _block_masks[key] = (fa.create_block_mask(mask_mod, None, None, N, N, device=device), tile)
    return _block_masks[key]


def flex_neighborhood(q: Tensor, k: Tensor, v: Tensor, spatial: tuple, ks: tuple, dil: tuple, st: tuple,
                      causal: tuple, scale: float) -> Tensor:
    """q (B, h, *spatial, d), k, v (B, h_kv, *spatial, d) -> (B, h, *spatial, d) through FlexAttention,
    options as per-axis tuples (`neighborhood_args`).

    Equivalent PyTorch (h_kv == h; with fewer, k and v repeat_interleave'd to h heads first):
        allowed = reference_neighborhood_mask(spatial, ks, dil, st, causal)          # (N, N)
        scores = q.flatten(2, -2) @ k.flatten(2, -2).transpose(-2, -1) * scale       # (B, h, N, N)
        out = scores.masked_fill(~allowed, -inf).softmax(-1) @ v.flatten(2, -2)      # (B, h, N, d)
    """
    B, h = q.shape[:2]
    N = math.prod(spatial)
    block_mask, tile = _flex_block_mask(spatial, ks, dil, st, causal, q.device)
    if tile is None:
        qf, kf, vf = (t.reshape(t.shape[0], t.shape[1], N, t.shape[-1]) for t in (q, k, v))
    else:
        qf, kf, vf = (tile_tokens(t, spatial, tile) for t in (q, k, v))
    fn = flex_function(q.device.type)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = fn(qf, kf, vf, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    if tile is None:
        return out.view(B, h, *spatial, v.shape[-1])
    return untile_tokens(out, spatial, tile)
