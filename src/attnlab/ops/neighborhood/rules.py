"""The rules of Generalized Neighborhood Attention: arguments, windows, the reference mask.

Papers: Neighborhood Attention Transformer (2022); Dilated Neighborhood Attention Transformer
(2022); Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of
Light (2025). Semantics are NATTEN's (`na1d/na2d/na3d`, its reference and FlexAttention
masks), per spatial axis of length n with kernel k, dilation r, stride s:

- dilation: the axis splits into r interleaved groups (positions with the same index mod r);
  a query only sees keys of its own group, and everything below is counted in group
  coordinates (position // r) inside a group of length L = ceil((n - g) / r). Needs k * r <= n.
- stride (GNA): queries are grouped in tiles of s (in group coordinates) and every query of a
  tile uses the window of the tile's leader: the centre query (the right-hand one when s is
  even), or with causal masking the last query; a leader past the end of the group is
  clamped to its last position. Needs s <= k.
- not causal: the window is k keys around the leader, k // 2 to the left and k // 2 + k % 2 - 1
  to the right; near a border it shifts inward instead of shrinking:
  start = clamp(leader - k // 2, 0, L - k), keys [start, start + k - 1].
- causal: keys [max(leader - k + 1, 0), query]: the query itself and up to k - 1 before it
  (with stride, the leader's window cut at the query, so key <= query always holds).
- several axes: the neighborhood is the product of the per-axis ones.
stride == kernel_size is blocked (window) attention; kernel_size == n (stride 1) is full
attention on that axis.

`reference_neighborhood_mask` writes the rules out query by query (the oracle);
`axis_windows` is the same rules vectorised, which every kernel builds on.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from attnlab._checks import shape_text

__all__ = ["neighborhood_options", "neighborhood_args", "check_neighborhood_qkv", "reference_neighborhood_mask",
           "axis_windows", "neighborhood_pairs", "neighborhood_mask_mod"]


# --- arguments -----------------------------------------------------------------------------------

def _per_axis(who: str, name: str, value, ndim: int, *, kind: type) -> tuple:
    """An int (bool for is_causal) or a tuple of ndim of them -> a tuple of ndim."""
    def ok(x):
        return isinstance(x, bool) if kind is bool else (isinstance(x, int) and not isinstance(x, bool))
    if ok(value):
        return (value,) * ndim
    if isinstance(value, (tuple, list)) and all(ok(x) for x in value):
        if len(value) != ndim:
            raise ValueError(f"{who}: {name} has {len(value)} entries {tuple(value)}, expected one per "
                             f"spatial axis ({ndim})")
        return tuple(value)
    what = "a bool or a tuple of bools" if kind is bool else "an int or a tuple of ints"
    raise TypeError(f"{who}: {name} must be {what} (one per spatial axis), got {value!r}")


def neighborhood_options(ndim: int, kernel_size, dilation=1, stride=1, is_causal=False, *,
                         who: str = "neighborhood_attention"
                         ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """Check the options on their own (no input shape yet); return per-axis tuples.

    kernel_size >= 1, dilation >= 1, 1 <= stride <= kernel_size; `who` starts the messages.
    """
    ks = _per_axis(who, "kernel_size", kernel_size, ndim, kind=int)
    dil = _per_axis(who, "dilation", dilation, ndim, kind=int)
    st = _per_axis(who, "stride", stride, ndim, kind=int)
    causal = _per_axis(who, "is_causal", is_causal, ndim, kind=bool)
    for axis, (k, r, s) in enumerate(zip(ks, dil, st)):
        if k < 1:
            raise ValueError(f"{who}: kernel_size must be >= 1, got {k} on axis {axis}")
        if r < 1:
            raise ValueError(f"{who}: dilation must be >= 1, got {r} on axis {axis}")
        if s < 1:
            raise ValueError(f"{who}: stride must be >= 1, got {s} on axis {axis}")
        if s > k:
            raise ValueError(f"{who}: stride ({s}) must be <= kernel_size ({k}) on axis {axis}")
    return ks, dil, st, causal


def neighborhood_args(spatial_shape: Sequence[int], kernel_size, dilation=1, stride=1, is_causal=False
                      ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """Check the options against the spatial shape; return them as per-axis tuples.

    ValueError/TypeError name the axis and the expected versus received values.
    """
    spatial = tuple(int(n) for n in spatial_shape)
    ndim = len(spatial)
    if not 1 <= ndim <= 3:
        raise ValueError(f"neighborhood_attention: expected 1 to 3 spatial axes, got {ndim} (shape {spatial})")
    ks, dil, st, causal = neighborhood_options(ndim, kernel_size, dilation, stride, is_causal)
    for axis, (n, k, r) in enumerate(zip(spatial, ks, dil)):
        if k * r > n:
            raise ValueError(f"neighborhood_attention: kernel_size * dilation must be <= the axis length; "
                             f"axis {axis} has length {n}, got kernel_size {k} * dilation {r} = {k * r}")
    return ks, dil, st, causal


# --- the naive mask: the rules written out, one query at a time ----------------------------------

def _reference_axis_mask(n: int, k: int, r: int, s: int, causal: bool) -> Tensor:
    """(n, n) bool along one axis: [query, key] True when the key is in the query's window."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for query in range(n):
        group = query % r
        length = len(range(group, n, r))            # positions of this dilation group
        i = query // r                              # the query inside its group
        if causal:
            leader = min((i // s) * s + s - 1, length - 1)      # last query of the stride tile
            first, last = max(leader - k + 1, 0), i             # ... cut at the query itself
        else:
            leader = min((i // s) * s + s // 2, length - 1)     # centre (right-hand) query of the tile
            first = min(max(leader - k // 2, 0), length - k)    # shift inward at the borders
            last = first + k - 1
        for j in range(first, last + 1):
            allowed[query, group + j * r] = True
    return allowed


def reference_neighborhood_mask(spatial_shape: Sequence[int], kernel_size, dilation=1, stride=1,
                                is_causal=False) -> Tensor:
    """The full (N, N) bool mask, N = prod(spatial_shape), token order row-major (`flatten`).

    Built per axis with plain loops over the rules (see the module docstring), then combined:
    a key is allowed when it is allowed along every axis. The naive oracle for every backend.
    """
    spatial = tuple(int(n) for n in spatial_shape)
    ks, dil, st, causal = neighborhood_args(spatial, kernel_size, dilation, stride, is_causal)
    mask = torch.ones(1, 1, dtype=torch.bool)
    for n, k, r, s, c in zip(spatial, ks, dil, st, causal):
        axis = _reference_axis_mask(n, k, r, s, c)
        # outer AND: (Q, K) x (n, n) -> (Q * n, K * n), row-major like flatten()
        mask = (mask[:, None, :, None] & axis[None, :, None, :]).reshape(mask.shape[0] * n, mask.shape[1] * n)
    return mask


# --- vectorised windows (shared by every kernel and the FLOP count) -----------------------------

def axis_windows(n: int, k: int, r: int, s: int, causal: bool, device=None):
    """The window rules vectorised over one axis of length n (kernel k, dilation r, stride s).

    Returns, per position, tensors of n: dilation group g, index in the group i, the group's
    length L, and the window [first, last] in group coordinates (key positions g + j * r).
    """
    x = torch.arange(n, device=device)
    g, i = x % r, x // r
    length = (n - g + r - 1) // r
    if causal:
        leader = torch.minimum((i // s) * s + s - 1, length - 1)
        first = (leader - k + 1).clamp(min=0)
        last = i
    else:
        leader = torch.minimum((i // s) * s + s // 2, length - 1)
        first = torch.minimum((leader - k // 2).clamp(min=0), length - k)
        last = first + k - 1
    return g, i, length, first, last


def neighborhood_pairs(spatial_shape: Sequence[int], kernel_size, dilation=1, stride=1, is_causal=False) -> int:
    """Number of (query, key) pairs the neighborhood keeps (N * prod(kernel) without causal)."""
    spatial = tuple(int(n) for n in spatial_shape)
    ks, dil, st, causal = neighborhood_args(spatial, kernel_size, dilation, stride, is_causal)
    pairs = 1
    for n, k, r, s, c in zip(spatial, ks, dil, st, causal):
        _, _, _, first, last = axis_windows(n, k, r, s, c)
        pairs *= int((last - first + 1).sum())
    return pairs


def neighborhood_mask_mod(spatial_shape: Sequence[int], kernel_size, dilation=1, stride=1, is_causal=False,
                          device=None, tile: Sequence[int] | None = None
                          ) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """A FlexAttention-style predicate `(b, h, q_idx, kv_idx) -> bool` over token indices.

    Indices are row-major (`flatten`) by default; with `tile` they are in tiled order (see
    `attnlab.ops.neighborhood.flex.tile_tokens`): consecutive indices fill one tile of that shape before the next tile.
    """
    spatial = tuple(int(n) for n in spatial_shape)
    ks, dil, st, causal = neighborhood_args(spatial, kernel_size, dilation, stride, is_causal)
    tables = []
    for n, k, r, s, c in zip(spatial, ks, dil, st, causal):
        g, _, _, first, last = axis_windows(n, k, r, s, c, device=device)
        tables.append((n, r, g + first * r, g + last * r))   # first/last allowed key position
    coords = _coordinates(spatial, tile)

    def neighborhood_mask(b, h, q_idx, kv_idx):
        ok = None
        for (n, r, first_pos, last_pos), qa, ka in zip(tables, coords(q_idx), coords(kv_idx)):
            axis_ok = (ka % r == qa % r) & (ka >= first_pos[qa]) & (ka <= last_pos[qa])
            ok = axis_ok if ok is None else ok & axis_ok
        return ok
    return neighborhood_mask


def _coordinates(spatial: tuple[int, ...], tile: Sequence[int] | None) -> Callable[[Tensor], list[Tensor]]:
    """idx -> per-axis positions, for row-major (tile None) or tiled token order."""
    ndim = len(spatial)
    if tile is None:
        inner = [math.prod(spatial[a + 1:]) for a in range(ndim)]
        return lambda idx: [(idx // inner[a]) % spatial[a] for a in range(ndim)]
    tile = tuple(tile)
    grid = tuple(n // t for n, t in zip(spatial, tile))
    per_tile = math.prod(tile)
    grid_inner = [math.prod(grid[a + 1:]) for a in range(ndim)]
    tile_inner = [math.prod(tile[a + 1:]) for a in range(ndim)]

    def coords(idx):
        which, within = idx // per_tile, idx % per_tile
        return [((which // grid_inner[a]) % grid[a]) * tile[a] + (within // tile_inner[a]) % tile[a]
                for a in range(ndim)]
    return coords


# --- tensors -------------------------------------------------------------------------------------

def check_neighborhood_qkv(q, k, v) -> int:
    """Check q, k, v of `neighborhood_attention`; return the number of spatial axes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"neighborhood_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"neighborhood_attention: {name} must be floating point, got {t.dtype}")
        if not 4 <= t.dim() <= 6:
            raise ValueError(f"neighborhood_attention: {name} must be (B, h, *spatial, d) with 1 to 3 spatial "
                             f"axes (4 to 6 dims), got shape {shape_text(t)} ({t.dim()}-D)")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"neighborhood_attention: q, k, v must have the same rank, got q {shape_text(q)}, "
                         f"k {shape_text(k)}, v {shape_text(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"neighborhood_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"neighborhood_attention: q, k, v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if q.shape[0] != k.shape[0] or q.shape[0] != v.shape[0] or q.shape[2:-1] != k.shape[2:-1] \
            or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"neighborhood_attention: q, k, v must share batch and spatial shape (k and v also heads), "
                         f"got q {shape_text(q)}, k {shape_text(k)}, v {shape_text(v)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"neighborhood_attention: q and k must share the head dim, got q {shape_text(q)} and "
                         f"k {shape_text(k)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"neighborhood_attention: query heads ({q.shape[1]}) must be a multiple of key/value "
                         f"heads ({k.shape[1]})")
    return q.dim() - 3
